//! `/healthz` latency on the metrics endpoint while idle connections flood it
//! (security review H1), loopback only.
//!
//! For each measured probe, `idle` fresh connections that never send a byte are
//! opened first (not timed), so the probe always arrives at a full endpoint; the
//! timed part is connect + request + answer. `idle = 0` is the baseline.
//!
//! `cargo bench -p vfio-gpu-kubelet --bench metrics_flood`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use vfio_gpu_kubelet::metrics::{Metrics, serve_http, tokio_listener};

async fn healthz(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut buf = Vec::with_capacity(256);
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("/healthz answers within 5 s")
        .expect("read");
    assert!(buf.starts_with(b"HTTP/1.1 200"), "{buf:?}");
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    let addr = listener.local_addr().expect("bound address");
    let stop = CancellationToken::new();
    rt.spawn({
        let stop = stop.clone();
        async move {
            let listener = tokio_listener(listener).expect("tokio listener");
            serve_http(listener, Metrics::new(), stop).await;
        }
    });

    let mut group = c.benchmark_group("healthz_under_idle_flood");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    for idle in [0usize, 16, 128] {
        group.bench_with_input(BenchmarkId::from_parameter(idle), &idle, |b, &idle| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let mut flood = Vec::with_capacity(idle);
                        for _ in 0..idle {
                            flood.push(TcpStream::connect(addr).await.expect("connect"));
                        }
                        let t = Instant::now();
                        healthz(addr).await;
                        total += t.elapsed();
                    }
                    total
                })
            });
        });
    }
    group.finish();
    stop.cancel();
}

criterion_group!(benches, bench);
criterion_main!(benches);
