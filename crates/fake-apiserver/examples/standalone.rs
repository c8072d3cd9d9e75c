//! Runs the fake API server as a process: `cargo run -p fake-apiserver --example
//! standalone -- /tmp/kubeconfig [node-name]`. Writes a kubeconfig for it, creates
//! the Node, and serves until killed. Handy for trying `vfio-gpu-dra serve` by hand.

use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let kubeconfig = args.next().unwrap_or_else(|| "kubeconfig".into());
    let node = args.next().unwrap_or_else(|| "demo-node".into());
    let server = fake_apiserver::FakeApiServer::start().await?;
    server.insert(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}))?;
    server.write_kubeconfig(&kubeconfig)?;
    println!(
        "API server {} (kubeconfig {kubeconfig}, node {node})",
        server.url()
    );
    tokio::signal::ctrl_c().await?;
    server.shutdown().await;
    Ok(())
}
