//! Partition tables (reference §5) and exact-set selection over all 256
//! subsets of 8 modules.

use std::collections::BTreeSet;

use vfio_gpu_fabric::{ModuleId, PartitionId, PartitionSpec, Platform, Topology, TopologyError};

fn set(mask: u32) -> BTreeSet<ModuleId> {
    (1..=8)
        .filter(|m| mask & (1 << (m - 1)) != 0)
        .map(ModuleId)
        .collect()
}

fn mask(modules: &[u32]) -> u32 {
    modules.iter().map(|m| 1 << (m - 1)).sum()
}

/// The reference's rows, typed in again (not derived from the library's tables).
fn expected(platform: Platform) -> Vec<(u32, u32)> {
    let rows: Vec<(u32, Vec<u32>)> = match platform {
        Platform::HgxH100 => vec![
            (0, vec![1, 2, 3, 4, 5, 6, 7, 8]),
            (1, vec![1, 2, 3, 4]),
            (2, vec![5, 6, 7, 8]),
            (3, vec![1, 3]),
            (4, vec![2, 4]),
            (5, vec![5, 7]),
            (6, vec![6, 8]),
            (7, vec![1]),
            (8, vec![2]),
            (9, vec![3]),
            (10, vec![4]),
            (11, vec![5]),
            (12, vec![6]),
            (13, vec![7]),
            (14, vec![8]),
        ],
        Platform::HgxB200 => vec![
            (1, vec![1, 2, 3, 4, 5, 6, 7, 8]),
            (2, vec![1, 2, 3, 4]),
            (3, vec![5, 6, 7, 8]),
            (4, vec![1, 2]),
            (5, vec![3, 4]),
            (6, vec![5, 6]),
            (7, vec![7, 8]),
            (8, vec![1]),
            (9, vec![2]),
            (10, vec![3]),
            (11, vec![4]),
            (12, vec![5]),
            (13, vec![6]),
            (14, vec![7]),
            (15, vec![8]),
        ],
    };
    rows.into_iter().map(|(id, m)| (mask(&m), id)).collect()
}

#[test]
fn exact_over_all_256_subsets() {
    for platform in [Platform::HgxH100, Platform::HgxB200] {
        let t = platform.topology();
        let rows = expected(platform);
        let mut mapped = 0;
        for m in 0u32..256 {
            let want = rows
                .iter()
                .find(|(mask, _)| *mask == m)
                .map(|(_, id)| PartitionId(*id));
            assert_eq!(t.exact(&set(m)), want, "{platform:?} mask {m:#010b}");
            mapped += usize::from(want.is_some());
        }
        assert_eq!(mapped, 15, "{platform:?}");
    }
}

#[test]
fn tables_match_reference_and_validate() {
    for platform in [Platform::HgxH100, Platform::HgxB200] {
        let t = platform.topology();
        let rows = expected(platform);
        assert_eq!(t.partitions().len(), 15);
        for p in t.partitions() {
            let m: u32 = p.modules.iter().map(|m| 1 << (m.0 - 1)).sum();
            assert!(rows.contains(&(m, p.id.0)), "{platform:?} {p:?}");
        }
        assert_eq!(Topology::new(t.partitions().to_vec()), Ok(t.clone()));
    }
    // Hopper is 0-based, Blackwell 1-based.
    assert_eq!(
        Topology::h100_8gpu().exact(&set(0xff)),
        Some(PartitionId(0))
    );
    assert_eq!(
        Topology::b200_8gpu().exact(&set(0xff)),
        Some(PartitionId(1))
    );
    // Hopper pairs are not adjacent: {1,2} is no partition there.
    assert_eq!(Topology::h100_8gpu().exact(&set(mask(&[1, 2]))), None);
    assert_eq!(
        Topology::h100_8gpu().exact(&set(mask(&[1, 3]))),
        Some(PartitionId(3))
    );
    assert_eq!(
        Topology::b200_8gpu().exact(&set(mask(&[1, 2]))),
        Some(PartitionId(4))
    );
    assert_eq!(Platform::HgxH100.fabric_name(), "nvl4");
    assert_eq!(Platform::HgxB200.fabric_name(), "nvl5");
}

#[test]
fn partition_attributes_match_nvidia_examples() {
    // NVIDIA's DRA doc (B200): module 1 → partition1: 8, partition2: 4,
    // partition4: 2, partition8: 1.
    let b = Topology::b200_8gpu().partition_attributes(ModuleId(1));
    let got: Vec<(usize, u32)> = b.iter().map(|(n, p)| (*n, p.0)).collect();
    assert_eq!(got, vec![(1, 8), (2, 4), (4, 2), (8, 1)]);
    // fmpm -l on H100: physicalId 7 → 1-GPU partition 13.
    let h = Topology::h100_8gpu().partition_attributes(ModuleId(7));
    let got: Vec<(usize, u32)> = h.iter().map(|(n, p)| (*n, p.0)).collect();
    assert_eq!(got, vec![(1, 13), (2, 5), (4, 2), (8, 0)]);
    assert!(
        Topology::h100_8gpu()
            .partition_attributes(ModuleId(9))
            .is_empty()
    );
}

#[test]
fn overlap_queries() {
    let t = Topology::h100_8gpu();
    let over: BTreeSet<u32> = t.overlapping(PartitionId(3)).iter().map(|p| p.0).collect();
    // {1,3}: the 8-GPU, the first 4-GPU, and the 1-GPU partitions of 1 and 3.
    assert_eq!(over, BTreeSet::from([0, 1, 7, 9]));
    assert_eq!(
        t.overlaps_active(
            PartitionId(4),
            &[PartitionId(3), PartitionId(1), PartitionId(5)]
        ),
        vec![PartitionId(1)]
    );
    assert!(t.overlapping(PartitionId(99)).is_empty());
}

#[test]
fn hash_is_order_independent_and_distinguishes_tables() {
    let t = Topology::h100_8gpu();
    let mut rev = t.partitions().to_vec();
    rev.reverse();
    assert_eq!(Topology::new(rev).map(|r| r.hash()), Ok(t.hash()));
    assert_ne!(t.hash(), Topology::b200_8gpu().hash());
    assert!(t.hash().starts_with("sha256:"));
}

#[test]
fn invalid_tables_are_rejected() {
    let p = |id, m: &[u32]| PartitionSpec {
        id: PartitionId(id),
        modules: m.iter().copied().map(ModuleId).collect(),
    };
    assert_eq!(
        Topology::new(vec![p(1, &[1]), p(1, &[2])]),
        Err(TopologyError::DuplicateId(PartitionId(1)))
    );
    assert_eq!(
        Topology::new(vec![p(1, &[1, 2]), p(2, &[2, 1])]),
        Err(TopologyError::DuplicateSet(PartitionId(1), PartitionId(2)))
    );
    assert_eq!(
        Topology::new(vec![p(1, &[])]),
        Err(TopologyError::Empty(PartitionId(1)))
    );
    assert_eq!(
        Topology::new(vec![p(1, &[0])]),
        Err(TopologyError::ZeroModule(PartitionId(1)))
    );
    assert_eq!(Topology::h100_8gpu().exact(&BTreeSet::new()), None);
}
