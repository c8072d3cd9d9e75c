#![allow(clippy::disallowed_methods)] // tests read the simulated host directly
//! The `/proc` holder scan on this machine's real `/proc` with many open
//! descriptors on the host (security review M1: 6.5 s at 380 k fds).
//!
//! Spawns fd-holder children (this bench re-executed with
//! `HOLDER_SCAN_CHILD_FDS=N`: each dup's `/dev/null` N times and waits on
//! stdin), then times `scan_holders` for a node nobody holds (the worst
//! case: every fd is looked at). Prints min/median/max of the runs.
//!
//! `cargo bench -p vfio-gpu-engine --bench holder_scan` (env `HOLDER_SCAN_FDS`,
//! default 500000; `HOLDER_SCAN_RUNS`, default 5).

use std::io::Read;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use vfio_gpu_engine::preflight::scan_holders;
use vfio_gpu_host::HostRoot;

const PER_CHILD: usize = 19_000;

fn child(fds: usize) -> ! {
    // Root may raise its own limit; otherwise stay under the hard limit.
    let want = (fds + 64) as libc::rlim_t;
    let lim = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: setrlimit reads a valid struct; failure only lowers what we open.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    let null = std::fs::File::open("/dev/null").expect("/dev/null");
    let mut opened = 0;
    for _ in 0..fds {
        // SAFETY: dup of a valid fd; the copies live until the process exits.
        if unsafe { libc::dup(null.as_raw_fd()) } < 0 {
            break;
        }
        opened += 1;
    }
    println!("{opened}");
    let mut buf = [0u8; 1];
    let _ = std::io::stdin().read(&mut buf);
    std::process::exit(0)
}

fn main() {
    if let Ok(n) = std::env::var("HOLDER_SCAN_CHILD_FDS") {
        child(n.parse().expect("a number"));
    }
    let total: usize = std::env::var("HOLDER_SCAN_FDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    let runs: usize = std::env::var("HOLDER_SCAN_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let exe = std::env::current_exe().expect("current exe");
    let mut children: Vec<Child> = Vec::new();
    let mut opened = 0usize;
    while opened < total {
        let n = PER_CHILD.min(total - opened);
        let mut c = Command::new(&exe)
            .env("HOLDER_SCAN_CHILD_FDS", n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn fd holder");
        let mut line = String::new();
        let mut out = c.stdout.take().expect("stdout");
        let mut b = [0u8; 1];
        while out.read(&mut b).map(|n| n == 1).unwrap_or(false) && b[0] != b'\n' {
            line.push(b[0] as char);
        }
        let got: usize = line.trim().parse().unwrap_or(0);
        opened += got;
        children.push(c);
        if got == 0 {
            break;
        }
    }
    let root = HostRoot::open(std::path::Path::new("/")).expect("host root");
    // A node nobody holds: every fd of every process is looked at.
    let nodes = vec![std::path::PathBuf::from("/dev/full")];
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let held = scan_holders(&root, &nodes).expect("scan");
        times.push(t.elapsed().as_secs_f64());
        assert!(held.is_empty());
    }
    times.sort_by(f64::total_cmp);
    println!(
        "holder scan over {opened} extra open fds in {} processes: min {:.3} s, median {:.3} s, max {:.3} s ({runs} runs, {} threads available)",
        children.len(),
        times[0],
        times[times.len() / 2],
        times[times.len() - 1],
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    for mut c in children {
        drop(c.stdin.take());
        let _ = c.wait();
    }
}
