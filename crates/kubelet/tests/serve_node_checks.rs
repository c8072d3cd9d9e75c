//! `serve` logs, at start, the node checks `doctor` prints: the same
//! `vfio_gpu_node` checks, each failure with its fix.

use std::io::Write;
use std::sync::{Arc, Mutex};

use vfio_gpu_host::{GpuSelector, HostRoot};
use vfio_gpu_intent::Policy;
use vfio_gpu_kubelet::serve::log_node_checks;
use vfio_gpu_node::Status;

/// A log sink the test reads back.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn serve_start_logs_the_demo_hosts_failing_isolation_check_with_its_fix() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path().join("host");
    vfio_gpu_host::demo::build_demo_host(&host).unwrap();
    let root = HostRoot::open(&host).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let checks = tracing::subscriber::with_default(subscriber, || {
        log_node_checks(
            &root,
            &GpuSelector::default(),
            &Policy::default(),
            &root.rel("etc/vfio-gpu-dra/policy.toml"),
            &state,
        )
    });
    let failed: Vec<_> = checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .map(|c| (c.check, c.gpu.map(|b| b.to_string())))
        .collect();
    assert_eq!(
        failed,
        [("gpu-isolation", Some("0000:db:00.0".to_string()))]
    );
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("node check failed"))
        .unwrap_or_else(|| panic!("no failed check logged:\n{text}"));
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("check=\"gpu-isolation\""), "{line}");
    assert!(line.contains("0000:db:00.0"), "{line}");
    assert!(line.contains("fix=move the card to a slot"), "{line}");
    assert!(
        !text.lines().any(|l| l.contains("check=\"iommu\"")),
        "passing checks stay silent:\n{text}"
    );
}
