//! The `gpu_quarantined` gauge: one series per quarantined GPU, with the
//! failed step as its reason, gone once the GPU leaves quarantine.

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
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("vfio_gpu_dra_gpu_quarantined{"))
        .collect();
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
