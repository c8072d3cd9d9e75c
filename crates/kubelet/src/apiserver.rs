//! What the API server serves: the plugin speaks only `resource.k8s.io/v1`
//! (Kubernetes ≥ 1.34), and an older server answers 404 for every claim and slice,
//! which must not read as "ResourceClaim not found".

/// The error text for an API server without `resource.k8s.io/v1`.
pub const NO_RESOURCE_V1: &str =
    "API server does not serve resource.k8s.io/v1; Kubernetes ≥ 1.34 required";

/// Whether a kube error is an HTTP 404 (a NotFound `Status` or a bare 404 body).
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Asks discovery for `resource.k8s.io/v1`: `Ok(false)` when the server answers 404.
pub async fn serves_resource_v1(client: &kube::Client) -> Result<bool, kube::Error> {
    match client.list_api_group_resources("resource.k8s.io/v1").await {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// After a 404 from a `resource.k8s.io/v1` call: [`NO_RESOURCE_V1`] when the
/// group-version is missing, `None` when it is served (the object is simply
/// absent) or discovery itself failed (the caller reports its own error).
pub async fn missing_resource_v1(client: &kube::Client) -> Option<&'static str> {
    match serves_resource_v1(client).await {
        Ok(false) => Some(NO_RESOURCE_V1),
        Ok(true) => None,
        Err(e) => {
            tracing::debug!(error = %e, "discovery of resource.k8s.io/v1 failed");
            None
        }
    }
}

/// [`missing_resource_v1`] for an error of a `resource.k8s.io/v1` call: only a 404
/// is looked into.
pub async fn missing_resource_v1_after(
    client: &kube::Client,
    e: &kube::Error,
) -> Option<&'static str> {
    if is_not_found(e) {
        missing_resource_v1(client).await
    } else {
        None
    }
}
