//! The per-GPU gauges: `gpu_quarantined` (one series per quarantined GPU,
//! with the failed step as its reason, gone once it leaves quarantine) and
//! `gpu_owner` (the claim holding each GPU, gone once released).

mod slices_common;

use std::time::Duration;

use slices_common::demo_views;
use vfio_gpu_engine::ledger::{Quarantine, QuarantineCause};
use vfio_gpu_kubelet::metrics::Metrics;

#[test]
fn a_quarantined_gpu_has_one_series_with_its_reason_until_cleared() {
    let mut views = demo_views();
    let a100 = views
        .iter_mut()
        .find(|v| v.gpu.bdf().to_string() == "0000:ba:00.0")
        .expect("the demo's A100");
    a100.quarantine = Some(Quarantine {
        reason: "0000:ba:00.0: link trained to x4 of x16".into(),
        cause: QuarantineCause::VerificationFailed,
        since: 1,
        boot_id: "boot".into(),
        fingerprints: Default::default(),
        extra: Default::default(),
    });
    let m = Metrics::new();
    m.record_scan(&views, 0, Duration::from_millis(1));
    let text = m.encode();
    let series = series_of(&text, "vfio_gpu_dra_gpu_quarantined");
    assert_eq!(
        series,
        ["vfio_gpu_dra_gpu_quarantined{gpu=\"0000:ba:00.0\",reason=\"VerificationFailed\"} 1"],
        "{text}"
    );
    for v in &mut views {
        v.quarantine = None;
    }
    m.record_scan(&views, 0, Duration::from_millis(1));
    assert!(
        !m.encode().contains("vfio_gpu_dra_gpu_quarantined{"),
        "cleared: no series left"
    );
}

#[test]
fn a_gpu_held_by_a_claim_has_one_owner_series_until_released() {
    let mut views = demo_views();
    let view = views
        .iter_mut()
        .find(|v| v.gpu.bdf().to_string() == "0000:ab:00.0")
        .expect("the demo's RTX 6000");
    let mut record = vfio_gpu_engine::ledger::GpuRecord::configuring(
        vfio_gpu_engine::Holder::Claim {
            uid: "u1".into(),
            namespace: "vms".into(),
            name: "vm-a-gpu-claim-x7".into(),
        },
        std::slice::from_ref(&view.gpu.function),
        &vfio_gpu_host::DriverName::vfio_pci(),
        Default::default(),
        "boot".into(),
        1,
    );
    record.state = vfio_gpu_engine::ledger::OpState::Configured;
    view.record = Some(record.clone());
    let m = Metrics::new();
    m.record_scan(&views, 0, Duration::from_millis(1));
    let text = m.encode();
    let series = series_of(&text, "vfio_gpu_dra_gpu_owner");
    assert_eq!(
        series,
        [
            "vfio_gpu_dra_gpu_owner{gpu=\"0000:ab:00.0\",namespace=\"vms\",claim=\"vm-a-gpu-claim-x7\",pod=\"\"} 1"
        ],
        "{text}"
    );
    // The plugin read the claim (at prepare): the pod it is reserved for.
    m.set_claim_pod("u1", "virt-launcher-vm-a-x7k2p");
    m.record_scan(&views, 0, Duration::from_millis(1));
    let text = m.encode();
    let series = series_of(&text, "vfio_gpu_dra_gpu_owner");
    assert_eq!(
        series,
        [
            "vfio_gpu_dra_gpu_owner{gpu=\"0000:ab:00.0\",namespace=\"vms\",claim=\"vm-a-gpu-claim-x7\",pod=\"virt-launcher-vm-a-x7k2p\"} 1"
        ],
        "one series per GPU, now with its pod: {text}"
    );
    // Released (or kept by the admin): no owner.
    for state in [
        vfio_gpu_engine::ledger::OpState::Releasing,
        vfio_gpu_engine::ledger::OpState::Prebound,
    ] {
        let mut released = views.clone();
        for v in &mut released {
            if let Some(r) = v.record.as_mut() {
                r.state = state;
            }
        }
        m.record_scan(&released, 0, Duration::from_millis(1));
        assert!(!m.encode().contains("vfio_gpu_dra_gpu_owner{"), "{state:?}");
    }
    // Released, the claim's pod is forgotten: the same claim UID holding a
    // GPU again without a fresh read has no pod.
    m.record_scan(&views, 0, Duration::from_millis(1));
    assert!(
        m.encode().contains(",pod=\"\"} 1"),
        "a released claim's pod is not kept"
    );
}

/// The lines of `metric`'s series in `text`.
fn series_of<'a>(text: &'a str, metric: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{'))
        })
        .collect()
}
