//! Version-neutral DRA backend trait and the tonic `DRAPlugin` service that delegates
//! to it: v1 here, v1beta1 through the wrapper in [`super::v1beta1_adapter`].
//!
//! The kubelet treats a response without an entry for a requested claim as an error
//! ("skipped N ResourceClaims") and retries, so the service guarantees one entry per
//! requested claim even when a backend forgets one.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::v1beta1_adapter::{ServedAsV1beta1, V1beta1Server};
use super::{v1, v1beta1};

/// A boxed, sendable future, used so the backend trait stays object-safe without macros.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Identity of a ResourceClaim as the kubelet sends it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClaimRef {
    /// ResourceClaim `metadata.uid`; key of the response map.
    pub uid: String,
    /// Namespace of the claim.
    pub namespace: String,
    /// Name of the claim.
    pub name: String,
}

/// One device prepared for a claim.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreparedDevice {
    /// Requests this device satisfies; empty means all requests of the claim.
    pub request_names: Vec<String>,
    /// ResourceSlice pool the device belongs to.
    pub pool_name: String,
    /// Device name within the pool.
    pub device_name: String,
    /// Fully qualified CDI device IDs (`vendor/class=name`).
    pub cdi_device_ids: Vec<String>,
    /// Consumable-capacity share ID; only transported by the v1 API.
    pub share_id: Option<String>,
}

/// Per-claim outcome of a prepare call, keyed by claim UID.
pub type PrepareResults = HashMap<String, Result<Vec<PreparedDevice>, String>>;

/// Per-claim outcome of an unprepare call, keyed by claim UID.
pub type UnprepareResults = HashMap<String, Result<(), String>>;

/// The driver logic behind the kubelet DRA API, independent of the API version.
///
/// Implementations return one entry per claim UID; errors are per claim (the kubelet
/// retries failed claims). Both calls must be idempotent.
pub trait DraBackend: Send + Sync + 'static {
    /// Prepares the given claims and reports the devices of each one.
    fn prepare(&self, claims: Vec<ClaimRef>) -> BoxFuture<'_, PrepareResults>;
    /// Releases the given claims.
    fn unprepare(&self, claims: Vec<ClaimRef>) -> BoxFuture<'_, UnprepareResults>;
}

/// Error text used for a claim the backend gave no result for.
fn missing_entry_error(uid: &str) -> String {
    format!("driver returned no result for claim {uid}")
}

/// Calls the backend and fills in an error entry for every requested claim it omitted,
/// dropping entries for UIDs that were not requested (the kubelet rejects unknown UIDs).
async fn prepare_complete<B: DraBackend + ?Sized>(
    backend: &B,
    claims: Vec<ClaimRef>,
) -> PrepareResults {
    let uids: Vec<String> = claims.iter().map(|c| c.uid.clone()).collect();
    let mut results = backend.prepare(claims).await;
    complete(
        &uids,
        &mut results,
        |uid| Err(missing_entry_error(uid)),
        "prepare",
    );
    results
}

/// Unprepare counterpart of [`prepare_complete`].
async fn unprepare_complete<B: DraBackend + ?Sized>(
    backend: &B,
    claims: Vec<ClaimRef>,
) -> UnprepareResults {
    let uids: Vec<String> = claims.iter().map(|c| c.uid.clone()).collect();
    let mut results = backend.unprepare(claims).await;
    complete(
        &uids,
        &mut results,
        |uid| Err(missing_entry_error(uid)),
        "unprepare",
    );
    results
}

fn complete<T>(
    uids: &[String],
    results: &mut HashMap<String, T>,
    missing: impl Fn(&str) -> T,
    op: &str,
) {
    results.retain(|uid, _| {
        let requested = uids.contains(uid);
        if !requested {
            tracing::warn!(claim_uid = %uid, op, "backend returned a result for a claim that was not requested; dropping it");
        }
        requested
    });
    for uid in uids {
        if !results.contains_key(uid) {
            tracing::warn!(claim_uid = %uid, op, "backend returned no result for claim; reporting an error");
            results.insert(uid.clone(), missing(uid));
        }
    }
}

/// tonic service implementing `v1.DRAPlugin` on top of a [`DraBackend`]; `v1beta1` is
/// served through [`V1beta1Server`].
pub struct DraService {
    backend: Arc<dyn DraBackend>,
}

impl DraService {
    /// Wraps a backend.
    pub fn new(backend: Arc<dyn DraBackend>) -> Self {
        Self { backend }
    }

    /// The v1 tonic server for this service.
    pub fn v1_server(self: &Arc<Self>) -> v1::dra_plugin_server::DraPluginServer<DraService> {
        v1::dra_plugin_server::DraPluginServer::from_arc(Arc::clone(self))
    }

    /// The v1beta1 tonic server: the v1 service behind the version wrapper.
    pub fn v1beta1_server(
        self: &Arc<Self>,
    ) -> v1beta1::dra_plugin_server::DraPluginServer<V1beta1Server<DraService>> {
        v1beta1::dra_plugin_server::DraPluginServer::new(V1beta1Server(Arc::clone(self)))
    }
}

fn claims_from_v1(claims: Vec<v1::Claim>) -> Vec<ClaimRef> {
    claims
        .into_iter()
        .map(|c| ClaimRef {
            uid: c.uid,
            namespace: c.namespace,
            name: c.name,
        })
        .collect()
}

/// The API version the kubelet called: v1, unless the v1beta1 wrapper marked it.
fn served_version<T>(request: &Request<T>) -> &'static str {
    if request.extensions().get::<ServedAsV1beta1>().is_some() {
        "v1beta1"
    } else {
        "v1"
    }
}

fn log_request(op: &str, version: &str, claims: &[ClaimRef]) {
    // An empty call is the liveness probe's (or the kubelet's own health check): no
    // line every 20 s at info.
    if claims.is_empty() {
        tracing::debug!(op, version, "empty DRA request");
        return;
    }
    tracing::info!(
        op,
        version,
        claims = ?claims.iter().map(|c| format!("{}/{} ({})", c.namespace, c.name, c.uid)).collect::<Vec<_>>(),
        "kubelet DRA request"
    );
}

/// Converts version-neutral results to v1 wire types.
pub fn prepare_results_to_v1(results: PrepareResults) -> v1::NodePrepareResourcesResponse {
    let claims = results
        .into_iter()
        .map(|(uid, r)| {
            let entry = match r {
                Ok(devices) => v1::NodePrepareResourceResponse {
                    devices: devices
                        .into_iter()
                        .map(|d| v1::Device {
                            request_names: d.request_names,
                            pool_name: d.pool_name,
                            device_name: d.device_name,
                            cdi_device_ids: d.cdi_device_ids,
                            share_id: d.share_id,
                        })
                        .collect(),
                    error: String::new(),
                },
                Err(error) => v1::NodePrepareResourceResponse {
                    devices: Vec::new(),
                    error,
                },
            };
            (uid, entry)
        })
        .collect();
    v1::NodePrepareResourcesResponse { claims }
}

fn unprepare_error_text(r: Result<(), String>) -> String {
    // The wire format has no separate success flag: an empty error means success.
    r.err().unwrap_or_default()
}

#[tonic::async_trait]
impl v1::dra_plugin_server::DraPlugin for DraService {
    async fn node_prepare_resources(
        &self,
        request: Request<v1::NodePrepareResourcesRequest>,
    ) -> Result<Response<v1::NodePrepareResourcesResponse>, Status> {
        let version = served_version(&request);
        let claims = claims_from_v1(request.into_inner().claims);
        log_request("prepare", version, &claims);
        let results = prepare_complete(self.backend.as_ref(), claims).await;
        Ok(Response::new(prepare_results_to_v1(results)))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<v1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<v1::NodeUnprepareResourcesResponse>, Status> {
        let version = served_version(&request);
        let claims = claims_from_v1(request.into_inner().claims);
        log_request("unprepare", version, &claims);
        let results = unprepare_complete(self.backend.as_ref(), claims).await;
        let claims = results
            .into_iter()
            .map(|(uid, r)| {
                let error = unprepare_error_text(r);
                (uid, v1::NodeUnprepareResourceResponse { error })
            })
            .collect();
        Ok(Response::new(v1::NodeUnprepareResourcesResponse { claims }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Partial;
    impl DraBackend for Partial {
        fn prepare(&self, claims: Vec<ClaimRef>) -> BoxFuture<'_, PrepareResults> {
            Box::pin(async move {
                let mut m = PrepareResults::new();
                if let Some(c) = claims.first() {
                    m.insert(c.uid.clone(), Ok(vec![]));
                }
                m.insert("stranger".into(), Ok(vec![]));
                m
            })
        }
        fn unprepare(&self, _claims: Vec<ClaimRef>) -> BoxFuture<'_, UnprepareResults> {
            Box::pin(async { UnprepareResults::new() })
        }
    }

    fn claim(uid: &str) -> ClaimRef {
        ClaimRef {
            uid: uid.into(),
            namespace: "ns".into(),
            name: format!("c-{uid}"),
        }
    }

    #[tokio::test]
    async fn fills_missing_and_drops_unknown() {
        let r = prepare_complete(&Partial, vec![claim("a"), claim("b")]).await;
        assert_eq!(r.len(), 2);
        assert_eq!(r["a"], Ok(vec![]));
        assert!(r["b"].is_err());
        let u = unprepare_complete(&Partial, vec![claim("a")]).await;
        assert!(u["a"].is_err());
    }
}
