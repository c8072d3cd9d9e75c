//! The metrics endpoint when the process runs out of file descriptors (security
//! review H1). Its own test binary: it lowers this process's open-file limit.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use vfio_gpu_kubelet::metrics::{Metrics, serve_http, tokio_listener};

fn cpu_time() -> Duration {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `u` is valid for writes of one rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage");
    // SAFETY: getrusage succeeded, so it initialised `u`.
    let u = unsafe { u.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.unsigned_abs())
            + Duration::from_micros(t.tv_usec.unsigned_abs())
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// H1: while accept fails with EMFILE the endpoint backs off instead of spinning,
/// and it answers the queued connection once descriptors are free again. (The
/// code before the fix slept 100 ms per failure, so this guards the behaviour
/// rather than reproducing a failure; it fails when the back-off is replaced by a
/// yield.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_failing_with_emfile_neither_spins_nor_stops_the_endpoint() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    let addr = listener.local_addr().expect("bound address");
    let stop = CancellationToken::new();
    tokio::spawn(serve_http(
        tokio_listener(listener).expect("tokio listener"),
        Metrics::new(),
        stop.clone(),
    ));

    // A low limit keeps filling the table quick and bounded.
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `old` is valid for writes.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
    let open_now = std::fs::read_dir("/proc/self/fd").expect("/proc").count() as libc::rlim_t;
    let low = libc::rlimit {
        rlim_cur: (open_now + 32).min(old.rlim_cur),
        rlim_max: old.rlim_max,
    };
    // SAFETY: `low` is a valid rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
    let mut hog = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(f) => hog.push(f),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
            Err(e) => panic!("opening /dev/null: {e}"),
        }
        assert!(hog.len() < 10_000, "no EMFILE");
    }
    // Exactly one free descriptor: the client's socket. The server's accept fails.
    drop(hog.pop());
    let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    client
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");

    // The table is full again: the server cannot accept.
    let full = std::fs::File::open("/dev/null").map(drop);
    assert_eq!(
        full.err().and_then(|e| e.raw_os_error()),
        Some(libc::EMFILE)
    );
    let before = cpu_time();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_time() - before;

    drop(hog);
    // SAFETY: `old` is a valid rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) }, 0);
    assert!(
        used < Duration::from_millis(300),
        "{used:?} of CPU in 1 s of EMFILE"
    );
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), client.read_to_end(&mut buf))
        .await
        .expect("answered once descriptors are free")
        .expect("read");
    assert!(
        buf.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    stop.cancel();
}
