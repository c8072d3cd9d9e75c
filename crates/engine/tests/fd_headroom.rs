#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! File-descriptor exhaustion is a fault like any other (security review H1:
//! under a 1024-fd limit flooded by connections a prepare failed halfway and
//! left a GPU on no driver). A move does not start without the descriptors
//! its rollback needs, and nothing on the host changes. Its own process: the
//! test lowers this process's limit.

mod common;

use common::*;
use vfio_gpu_engine::{Action, EngineError, Holder};

fn set_soft_limit(n: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on structs we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let old = lim.rlim_cur;
        lim.rlim_cur = n;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        old
    }
}

#[test]
fn a_move_without_fds_for_its_rollback_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    build_host(&root);
    let k = sim(&root);
    let e = engine(&k, &dir.path().join("state"));
    let claim = Holder::Claim {
        uid: "u1".into(),
        namespace: "ns".into(),
        name: "vm".into(),
    };
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    let old = set_soft_limit(open + 20);
    let r = e.configure(bdf(B), claim.clone());
    set_soft_limit(old);
    assert!(matches!(r, Err(EngineError::FdsExhausted { .. })), "{r:?}");
    assert!(k.log().is_empty(), "{:?}", k.log());
    assert!(e.ledger().gpus.is_empty());
    let out = e.configure(bdf(B), claim).unwrap();
    assert_eq!(out.action, Action::Moved);
}
