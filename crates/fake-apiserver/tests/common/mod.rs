//! Shared setup for the integration tests: a server plus a real kube client.

#![allow(dead_code)]

use fake_apiserver::FakeApiServer;
use k8s_openapi::api::resource::v1::{ResourceClaim, ResourceSlice};
use serde_json::json;

/// Starts a server and a kube client pointed at it.
pub async fn setup() -> (FakeApiServer, kube::Client) {
    let server = FakeApiServer::start().await.expect("server starts");
    let client = client_for(&server, true);
    (server, client)
}

/// A kube client for `server`; `retry` toggles kube's default retry of
/// 429/503/504 answers (exponential backoff, up to 15 attempts).
pub fn client_for(server: &FakeApiServer, retry: bool) -> kube::Client {
    install_crypto_provider();
    let mut config = kube::Config::new(server.url().parse().expect("server URL parses"));
    config.default_retry = retry;
    kube::Client::try_from(config).expect("client builds")
}

/// A workspace-wide test build also compiles rustls' aws-lc-rs provider (a
/// dev-dependency of another crate enables it); with two providers rustls
/// cannot pick, so pick ring as the product does.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The `Status` inside a `kube::Error::Api`, panicking on other errors.
pub fn api_status(err: kube::Error) -> kube::core::Status {
    match err {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// A node-local slice for `node`/`driver` in pool `node`.
pub fn slice(name: Option<&str>, node: &str, driver: &str) -> ResourceSlice {
    let meta = match name {
        Some(n) => json!({"name": n, "labels": {"node": node}}),
        None => json!({"generateName": format!("{node}-{driver}-"), "labels": {"node": node}}),
    };
    serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice", "metadata": meta,
        "spec": {"driver": driver, "nodeName": node,
                 "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
                 "devices": [{"name": "gpu-0"}]}
    }))
    .expect("valid ResourceSlice")
}

/// A claim requesting one device of class `vfio.example.com`.
pub fn claim(name: &str) -> ResourceClaim {
    serde_json::from_value(json!({
        "apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
        "metadata": {"name": name},
        "spec": {"devices": {"requests": [
            {"name": "gpu", "exactly": {"deviceClassName": "vfio.example.com"}}]}}
    }))
    .expect("valid ResourceClaim")
}
