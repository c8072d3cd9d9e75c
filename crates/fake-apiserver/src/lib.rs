//! A small in-memory Kubernetes API server over plain HTTP.
//!
//! It serves core `v1` `nodes` and `resource.k8s.io/v1` `resourceslices`,
//! `deviceclasses` and `resourceclaims` (with `/status`) with the semantics a
//! DRA kubelet plugin relies on: global resourceVersions, optimistic
//! concurrency, `generateName`, field/label selectors, delete preconditions,
//! delete-collection, merge/JSON patches and resumable watches with
//! bookmarks. Integration tests drive it through the real `kube` client, and
//! the product's `demo` command runs it as a stand-in cluster; objects are
//! plain `serde_json::Value`s so this crate needs no Kubernetes type crates.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let server = fake_apiserver::FakeApiServer::start().await?;
//! server.insert(serde_json::json!({
//!     "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}
//! }))?;
//! server.write_kubeconfig("/tmp/kubeconfig")?;
//! println!("API server at {}", server.url());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod router;
mod store;
mod util;
pub mod validation;

use anyhow::{Context, anyhow};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use router::Shared;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// One request as the server saw it, for asserting what a client did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `GET`.
    pub method: String,
    /// URL path, e.g. `/apis/resource.k8s.io/v1/resourceslices`.
    pub path: String,
    /// Raw (still URL-encoded) query string, empty when absent.
    pub query: String,
}

impl RecordedRequest {
    /// The decoded value of a query parameter, if present.
    pub fn query_param(&self, key: &str) -> Option<String> {
        util::parse_query(&self.query)
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// Whether this was a watch request (`?watch=true` or `?watch=1`).
    pub fn is_watch(&self) -> bool {
        matches!(self.query_param("watch").as_deref(), Some("true" | "1"))
    }
}

/// A running fake API server; stops on [`FakeApiServer::shutdown`] or drop.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

fn resource_for(resource: &str) -> anyhow::Result<&'static store::ResourceType> {
    store::RESOURCES
        .iter()
        .find(|r| r.plural == resource)
        .ok_or_else(|| anyhow!("the fake API server does not serve {resource:?}"))
}

impl FakeApiServer {
    /// Starts a server on `127.0.0.1` with a random free port.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts a server on a given address (port 0 picks a free one).
    pub async fn start_on(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the fake API server to {addr}"))?;
        let shared = Arc::new(Shared {
            store: Mutex::new(store::Store::new()),
            unavailable: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            resource_v1: AtomicBool::new(true),
            prune_device_taints: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
            disrupt: watch::channel(0).0,
            bookmark_ms: AtomicU64::new(5_000),
            addr: listener.local_addr()?,
            get_delay: Mutex::new(std::collections::HashMap::new()),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, shared.clone(), stop_rx));
        Ok(Self {
            shared,
            stop,
            task: Some(task),
        })
    }

    /// The bound socket address.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Creates or replaces an object directly, bypassing HTTP. The resource
    /// is derived from `apiVersion`/`kind`; unlike API writes, `status` is
    /// kept (to seed e.g. allocated claims). Namespaced objects without a
    /// namespace go to `default`. Watches see the change. Returns the stored
    /// object with server-set metadata.
    pub fn insert(&self, object: Value) -> anyhow::Result<Value> {
        let api_version = object.get("apiVersion").and_then(Value::as_str);
        let kind = object.get("kind").and_then(Value::as_str);
        let rt = store::RESOURCES
            .iter()
            .find(|r| Some(r.api_version().as_str()) == api_version && Some(r.kind) == kind)
            .ok_or_else(|| anyhow!("unsupported apiVersion/kind {api_version:?}/{kind:?}"))?;
        self.shared
            .store()
            .upsert(rt, object)
            .map_err(|e| anyhow!("{}", e.message))
    }

    /// One object by plural resource name (`"resourceclaims"`); `namespace`
    /// is ignored for cluster-scoped resources and defaults to `default`.
    pub fn get(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let rt = resource_for(resource).ok()?;
        self.shared
            .store()
            .get(rt, namespace.unwrap_or("default"), name)
            .cloned()
    }

    /// All objects of a resource, optionally of one namespace, in name order.
    pub fn list(&self, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        let Ok(rt) = resource_for(resource) else {
            return Vec::new();
        };
        let store = self.shared.store();
        store
            .iter(rt)
            .filter(|o| namespace.is_none_or(|ns| util::meta_str(o, "namespace") == Some(ns)))
            .cloned()
            .collect()
    }

    /// Deletes an object directly with API semantics (finalizers only mark
    /// it with a deletionTimestamp). Returns the object as last stored, or
    /// `None` if it was absent.
    pub fn delete(&self, resource: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let rt = resource_for(resource).ok()?;
        self.shared
            .store()
            .delete(rt, namespace.unwrap_or("default"), name, None, None)
            .ok()
            .map(|(obj, _)| obj)
    }

    /// The latest resourceVersion handed out (one counter for all types).
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Forgets the watch event history, so watches resuming from any
    /// earlier resourceVersion get `410 Gone` and must re-list.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// While set, every request is answered `503 ServiceUnavailable`; turning
    /// it on also ends open watch streams, as an apiserver restart would.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
        if unavailable {
            self.shared.disrupt_watches();
        }
    }

    /// While set, new connections are closed right after accept and requests
    /// on open connections drop their connection, so clients see transport
    /// errors instead of HTTP answers.
    pub fn set_refuse_connections(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::SeqCst);
        if refuse {
            self.shared.disrupt_watches();
        }
    }

    /// Whether `resource.k8s.io/v1` is served (default). Off, the server acts like a
    /// Kubernetes < 1.34 API server: the group-version is missing from discovery and
    /// every path under `/apis/resource.k8s.io/` answers 404 NotFound.
    pub fn set_resource_v1_served(&self, served: bool) {
        self.shared.resource_v1.store(served, Ordering::SeqCst);
        if !served {
            self.shared.disrupt_watches();
        }
    }

    /// Whether ResourceSlice writes lose their devices' `taints` (default off),
    /// as on an API server with the `DRADeviceTaints` gate off (before 1.37),
    /// which prunes the field silently instead of refusing the write.
    pub fn set_prune_device_taints(&self, prune: bool) {
        self.shared
            .prune_device_taints
            .store(prune, Ordering::SeqCst);
    }

    /// How often watches with `allowWatchBookmarks` get a BOOKMARK (default
    /// 5 s); applies to watches started afterwards.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        self.shared.bookmark_ms.store(ms, Ordering::SeqCst);
    }

    /// Delays every GET of a single object of `resource` (plural, e.g.
    /// `resourceclaims`) by `delay` before it is answered, like a slow API server;
    /// `Duration::ZERO` removes the delay. Lists and watches are not delayed.
    pub fn set_get_delay(&self, resource: &str, delay: Duration) {
        let mut delays = self
            .shared
            .get_delay
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if delay.is_zero() {
            delays.remove(resource);
        } else {
            delays.insert(resource.to_string(), delay);
        }
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.log().clone()
    }

    /// Empties the request log.
    pub fn clear_requests(&self) {
        self.shared.log().clear();
    }

    /// A kubeconfig (YAML) for this server: plain HTTP, no credentials,
    /// context `fake` with namespace `default`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    \
             user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.url()
        )
    }

    /// Writes [`FakeApiServer::kubeconfig`] to `path`, for `--kubeconfig`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> anyhow::Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.kubeconfig())
            .with_context(|| format!("writing kubeconfig {}", path.display()))
    }

    /// Stops accepting, closes every connection and ends watch streams.
    pub async fn shutdown(mut self) {
        self.signal_stop();
        if let Some(task) = self.task.take() {
            // The accept loop exits promptly on the stop signal; its
            // cancellation/join error carries nothing useful.
            let _ = task.await;
        }
    }

    fn signal_stop(&self) {
        // No receiver means the accept loop is already gone: stopped either way.
        let _ = self.stop.send(true);
        self.shared.disrupt_watches();
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.signal_stop();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Accept loop. Connections live in a `JoinSet` so leaving the loop (stop
/// signal or abort) drops and thereby aborts all of them.
async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => accepted,
        };
        while conns.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::warn!("fake apiserver accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shared.refuse.load(Ordering::SeqCst) {
            drop(stream);
            continue;
        }
        let shared = shared.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| router::handle(shared.clone(), req));
            // Connection errors (client hung up, refuse mode) end just this
            // connection and need no reporting.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
