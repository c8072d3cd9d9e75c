//! Target `slice_diff`: the ResourceSlice publisher's diff
//! (`vfio_gpu_kubelet::slices::plan_sync`): what the API server listed (any
//! slices: this driver's, another driver's, another node's, other pools, any
//! generation up to `i64::MAX`, stray selectors, duplicate devices) against the
//! GPUs to publish.
//!
//! Input: byte 0 picks the GPUs (bit 7: 129 to 255 consecutive ones, so the pool
//! needs several slices; else up to 15 from address bytes), then a count of GPUs
//! another driver publishes and their indexes, then a count of listed slices and
//! for each: owner (ours, another driver, another node, no node), pool, generation,
//! selector flags and devices (a published GPU's exact device, a desired chunk,
//! or a bare name).
//!
//! Properties, on an in-memory server the plan is applied to:
//! - every update and delete is of a listed slice this driver owns on this node
//!   (never another driver's, node's); other slices stay byte for byte;
//! - applying the plan converges: this driver's slices are exactly one pool
//!   named after the node, all at the plan's generation with the right slice
//!   count, holding exactly the offered GPUs (not the other driver's), each once,
//!   in slices of at most 128 (64 where a slice holds a tainted device), filled
//!   in address order;
//! - a quarantined GPU is published once, with its taint, and no other device
//!   carries one;
//! - the generation never goes backwards (nor overflows);
//! - a second sync on the result writes nothing.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::NodeSelector;
use k8s_openapi::api::resource::v1::{
    Device, DeviceTaint, ResourcePool, ResourceSlice, ResourceSliceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use vfio_gpu_engine::ledger::QuarantineCause;
use vfio_gpu_host::Bdf;
use vfio_gpu_kubelet::slices::{
    DeviceInfo, MAX_DEVICES_PER_SLICE, MAX_DEVICES_PER_SLICE_WITH_TAINTS, QuarantineTaint,
    SliceConfig, TaintEffect, device, device_name, plan_sync,
};

const DRIVER: &str = "vfio-gpu.dra.dev";
const NODE: &str = "node-a";

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
}

fn gpu(bdf: Bdf, bar: u8, quarantined: bool) -> DeviceInfo {
    DeviceInfo {
        bdf,
        vendor: 0x10de,
        device: 0x2330,
        product_name: None,
        driver: Some("nvidia".into()),
        iommu_group: u32::from(bdf.bus()),
        numa_node: None,
        pcie_root: None,
        keep_on_vfio: false,
        bar_bytes: u64::from(bar) << 30,
        bar_prefetchable64_bytes: u64::from(bar) << 30,
        fabric: None,
        quarantine: quarantined.then(|| QuarantineTaint {
            cause: QuarantineCause::VerificationFailed,
            reason: "link trained to x4 of x16".into(),
            since_unix: u64::from(bar) * 1000,
            effect: TaintEffect::NoSchedule,
        }),
        unhealthy: None,
    }
}

fn listed_slice(inp: &mut Input<'_>, i: usize, gpus: &[DeviceInfo]) -> ResourceSlice {
    let (driver, node) = match inp.byte() % 5 {
        0..=2 => (DRIVER, Some(NODE)),
        3 => ("gpu.nvidia.com", Some(NODE)),
        _ => (DRIVER, (inp.byte() & 1 == 0).then_some("node-b")),
    };
    let pool_name = if inp.byte().is_multiple_of(4) {
        "old-pool"
    } else {
        NODE
    };
    let generation = match inp.byte() {
        g @ 0..=250 => i64::from(g % 4),
        251 => i64::MAX,
        252 => i64::MAX - 1,
        253 => -1,
        _ => i64::MIN,
    };
    let flags = inp.byte();
    let count = i64::from(inp.byte() % 4);
    let mut devices: Vec<Device> = Vec::new();
    let shape = inp.byte();
    if shape & 0x80 != 0 {
        // A whole chunk of the desired pool, as a previous sync wrote it.
        let chunk = usize::from(shape & 3);
        devices.extend(
            gpus.chunks(MAX_DEVICES_PER_SLICE)
                .nth(chunk)
                .unwrap_or_default()
                .iter()
                .map(|g| device(DRIVER, g)),
        );
    } else {
        for _ in 0..shape % 8 {
            let pick = inp.byte();
            if pick & 0x80 == 0 && !gpus.is_empty() {
                devices.push(device(DRIVER, &gpus[usize::from(pick) % gpus.len()]));
            } else {
                devices.push(Device {
                    name: format!("gpu-{pick}"),
                    ..Default::default()
                });
            }
        }
    }
    ResourceSlice {
        metadata: ObjectMeta {
            name: Some(format!("listed-{i}")),
            uid: Some(format!("uid-{i}")),
            resource_version: Some(format!("{i}")),
            ..Default::default()
        },
        spec: ResourceSliceSpec {
            driver: driver.into(),
            node_name: node.map(str::to_string),
            pool: ResourcePool {
                name: pool_name.into(),
                generation,
                resource_slice_count: count,
            },
            node_selector: (flags & 1 != 0).then(NodeSelector::default),
            all_nodes: (flags & 2 != 0).then_some(true),
            per_device_node_selection: (flags & 4 != 0).then_some(true),
            devices: (flags & 8 == 0 || !devices.is_empty()).then_some(devices),
            ..Default::default()
        },
    }
}

fn owned(cfg: &SliceConfig, s: &ResourceSlice) -> bool {
    s.spec.driver == cfg.driver_name && s.spec.node_name.as_deref() == Some(&cfg.node_name)
}

/// How many slices the publisher must fill, in address order: a slice closes
/// at 128 devices, or at 64 once it holds a tainted one.
fn expected_slices(sorted: &[DeviceInfo], offered: &[Bdf]) -> usize {
    let mut want_slices = 1;
    let (mut in_slice, mut slice_tainted) = (0usize, false);
    for g in sorted
        .iter()
        .filter(|g| offered.binary_search(&g.bdf).is_ok())
    {
        let tainted = slice_tainted || g.quarantine.is_some();
        let limit = if tainted {
            MAX_DEVICES_PER_SLICE_WITH_TAINTS
        } else {
            MAX_DEVICES_PER_SLICE
        };
        if in_slice >= limit {
            want_slices += 1;
            in_slice = 0;
            slice_tainted = false;
        }
        in_slice += 1;
        slice_tainted |= g.quarantine.is_some();
    }
    want_slices
}

/// Each published device carries exactly the taints of the GPU it names (the
/// first GPU listed for an address, as the publisher dedups): a quarantined
/// one its taint, every other none.
/// `taints` is each GPU's expected taints by device name (built once per
/// input: a search per device made the check quadratic in the GPU count).
fn check_taints(devices: &[Device], taints: &BTreeMap<String, Option<Vec<DeviceTaint>>>) {
    for d in devices {
        assert_eq!(Some(&d.taints), taints.get(&d.name), "{}: taints", d.name);
    }
}

/// The property for one input.
pub fn check(data: &[u8]) {
    let mut inp = Input(data);
    let cfg = SliceConfig::new(DRIVER, NODE);
    let pick = inp.byte();
    let mut gpus: Vec<DeviceInfo> = Vec::new();
    if pick & 0x80 != 0 {
        let n = 129 + usize::from(pick & 0x7f);
        for i in 0..n {
            let bus = u8::try_from(i / 8).unwrap_or(u8::MAX);
            let dev = u8::try_from(i % 8).unwrap_or(0);
            if let Some(b) = Bdf::new(0, bus, dev, 0) {
                gpus.push(gpu(b, 0, pick & 0x40 != 0 && i % 3 == 0));
            }
        }
    } else {
        for _ in 0..pick % 16 {
            let (bus, devfn, bar) = (inp.byte(), inp.byte(), inp.byte());
            if let Some(b) = Bdf::new(0, bus, devfn >> 3, devfn & 7) {
                gpus.push(gpu(b, bar % 4, bar & 4 != 0));
            }
        }
    }
    let mut foreign = BTreeMap::new();
    for _ in 0..inp.byte() % 4 {
        let i = usize::from(inp.byte());
        if let Some(g) = gpus.get(i % gpus.len().max(1)) {
            foreign.insert(g.bdf.to_string(), "gpu.nvidia.com".to_string());
        }
    }
    // What the publisher must end up offering: each GPU once, in address order.
    let mut offered: Vec<Bdf> = gpus
        .iter()
        .map(|g| g.bdf)
        .filter(|b| !foreign.contains_key(&b.to_string()))
        .collect();
    offered.sort();
    offered.dedup();
    let mut sorted = gpus.clone();
    sorted.sort_by_key(|g| g.bdf);
    sorted.dedup_by_key(|g| g.bdf);

    let listed: Vec<ResourceSlice> = (0..usize::from(inp.byte() % 7))
        .map(|i| listed_slice(&mut inp, i, &sorted))
        .collect();
    let highest_before = listed
        .iter()
        .filter(|s| owned(&cfg, s) && s.spec.pool.name == NODE)
        .map(|s| s.spec.pool.generation)
        .max()
        .unwrap_or(0);

    let plan = plan_sync(&cfg, listed.clone(), &gpus, &foreign);

    // Apply it to an in-memory server, as the API would.
    let mut server: BTreeMap<String, ResourceSlice> = listed
        .iter()
        .map(|s| (s.metadata.name.clone().unwrap_or_default(), s.clone()))
        .collect();
    for u in &plan.updates {
        let name = u.metadata.name.clone().unwrap_or_default();
        let before = server.get(&name);
        assert!(
            before.is_some_and(|b| owned(&cfg, b) && b.metadata == u.metadata),
            "update of {name}, which is not a listed slice of ours"
        );
        assert!(owned(&cfg, u), "update of {name} hands it to another owner");
        server.insert(name, u.clone());
    }
    for (i, spec) in plan.creates.iter().enumerate() {
        let name = format!("created-{i}");
        server.insert(
            name.clone(),
            ResourceSlice {
                metadata: ObjectMeta {
                    name: Some(name),
                    ..Default::default()
                },
                spec: spec.clone(),
            },
        );
    }
    for d in &plan.deletes {
        let name = d.metadata.name.clone().unwrap_or_default();
        let gone = server.remove(&name);
        assert!(
            gone.is_some_and(|g| owned(&cfg, &g)),
            "delete of {name}, which is not a listed slice of ours"
        );
    }

    let others_before: Vec<&ResourceSlice> = listed.iter().filter(|s| !owned(&cfg, s)).collect();
    let others_after: Vec<&ResourceSlice> = server.values().filter(|s| !owned(&cfg, s)).collect();
    assert_eq!(
        others_before, others_after,
        "another owner's slices changed"
    );

    assert!(
        plan.generation >= highest_before.max(1),
        "generation {} after {highest_before}",
        plan.generation
    );
    let ours: Vec<&ResourceSlice> = server.values().filter(|s| owned(&cfg, s)).collect();
    // `sorted` holds each address once, the first GPU listed for it.
    let taints: BTreeMap<String, Option<Vec<DeviceTaint>>> = sorted
        .iter()
        .map(|g| (device_name(&g.bdf), device(DRIVER, g).taints))
        .collect();
    assert_eq!(ours.len(), plan.slices, "slice count");
    let mut names: Vec<String> = Vec::new();
    for s in &ours {
        let want = ResourcePool {
            name: NODE.into(),
            generation: plan.generation,
            resource_slice_count: i64::try_from(plan.slices).unwrap_or(i64::MAX),
        };
        assert_eq!(s.spec.pool, want, "a slice outside the published pool");
        assert!(
            s.spec.node_selector.is_none()
                && s.spec.all_nodes != Some(true)
                && s.spec.per_device_node_selection != Some(true),
            "a published slice keeps a stray selector"
        );
        let devices = s.spec.devices.as_deref().unwrap_or_default();
        assert!(devices.len() <= MAX_DEVICES_PER_SLICE, "a slice over 128");
        let tainted = devices
            .iter()
            .any(|d| d.taints.as_ref().is_some_and(|t| !t.is_empty()));
        assert!(
            !tainted || devices.len() <= MAX_DEVICES_PER_SLICE_WITH_TAINTS,
            "a slice with a tainted device over 64"
        );
        check_taints(devices, &taints);
        names.extend(devices.iter().map(|d| d.name.clone()));
    }
    let expected: BTreeSet<String> = offered.iter().map(device_name).collect();
    let got: BTreeSet<String> = names.iter().cloned().collect();
    assert_eq!(got.len(), names.len(), "a device published twice");
    assert_eq!(
        got, expected,
        "published devices differ from the offered GPUs"
    );
    let want_slices = expected_slices(&sorted, &offered);
    assert_eq!(plan.slices, want_slices, "number of slices");

    let again = plan_sync(&cfg, server.into_values().collect(), &gpus, &foreign);
    assert!(
        again.updates.is_empty() && again.creates.is_empty() && again.deletes.is_empty(),
        "a second sync writes again: {} updates, {} creates, {} deletes",
        again.updates.len(),
        again.creates.len(),
        again.deletes.len()
    );
    assert_eq!(
        again.generation, plan.generation,
        "a second sync moves the generation"
    );
}
