//! Regression tests for the host-side findings of the 2026-11-30 engine
//! review (M5, M6, m7, m9, m21 …), one test per finding.

mod common;

use common::*;
use vfio_gpu_engine::{EngineError, Holder};
use vfio_gpu_host::fixture::{FixtureHost, FunctionSpec};

fn claim(uid: &str) -> Holder {
    Holder::Claim {
        uid: uid.into(),
        namespace: "vms".into(),
        name: format!("claim-{uid}"),
    }
}

/// R8 / M6: an Intel xHCI in B's IOMMU group is not B's companion; the move
/// is refused without allow-foreign-group-members and nothing is written.
#[test]
fn chipset_usb_in_the_group_is_foreign_and_blocks_the_move() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    build_host(&host);
    let mut h = FixtureHost::open(&host);
    h.add_driver("xhci_hcd").unwrap();
    h.add_function(
        &FunctionSpec::new(bdf("0000:00:14.0"), 0x8086, 0xa36d, 0x0c0330)
            .driver("xhci_hcd")
            .group(12),
    )
    .unwrap();
    let k = sim(&host);
    let e = engine(&k, &dir.path().join("state"));
    let err = e.configure(bdf(B), claim("u1")).unwrap_err();
    assert!(
        matches!(&err, EngineError::ForeignGroupMembers { members, .. } if members.contains("0000:00:14.0")),
        "{err}"
    );
    assert!(k.log().is_empty(), "{:?}", k.log());
    assert_eq!(
        driver_of(&host, "0000:00:14.0").as_deref(),
        Some("xhci_hcd")
    );
}
