//! `v1beta1.DRAPlugin` as one thin wrapper over the v1 implementation, like the Go
//! helper's `V1ServerWrapper`: the two versions differ only in v1's `Device.share_id`,
//! so each message converts field by field and v1beta1 drops `share_id`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{v1, v1beta1};

/// Marks a v1 request that arrived as v1beta1, so logs name the version the kubelet used.
#[derive(Debug, Clone, Copy)]
pub struct ServedAsV1beta1;

/// Serves `v1beta1.DRAPlugin` by converting each call to v1 and the answer back.
pub struct V1beta1Server<S>(pub Arc<S>);

impl From<v1beta1::Claim> for v1::Claim {
    fn from(c: v1beta1::Claim) -> Self {
        v1::Claim {
            namespace: c.namespace,
            uid: c.uid,
            name: c.name,
        }
    }
}

impl From<v1::Claim> for v1beta1::Claim {
    fn from(c: v1::Claim) -> Self {
        v1beta1::Claim {
            namespace: c.namespace,
            uid: c.uid,
            name: c.name,
        }
    }
}

impl From<v1beta1::Device> for v1::Device {
    fn from(d: v1beta1::Device) -> Self {
        v1::Device {
            request_names: d.request_names,
            pool_name: d.pool_name,
            device_name: d.device_name,
            cdi_device_ids: d.cdi_device_ids,
            share_id: None,
        }
    }
}

impl From<v1::Device> for v1beta1::Device {
    fn from(d: v1::Device) -> Self {
        // share_id (consumable capacity) does not exist in v1beta1.
        v1beta1::Device {
            request_names: d.request_names,
            pool_name: d.pool_name,
            device_name: d.device_name,
            cdi_device_ids: d.cdi_device_ids,
        }
    }
}

/// Converts every element of a list.
fn all<A, B: From<A>>(items: Vec<A>) -> Vec<B> {
    items.into_iter().map(B::from).collect()
}

impl From<v1beta1::NodePrepareResourcesRequest> for v1::NodePrepareResourcesRequest {
    fn from(r: v1beta1::NodePrepareResourcesRequest) -> Self {
        v1::NodePrepareResourcesRequest {
            claims: all(r.claims),
        }
    }
}

impl From<v1::NodePrepareResourcesRequest> for v1beta1::NodePrepareResourcesRequest {
    fn from(r: v1::NodePrepareResourcesRequest) -> Self {
        v1beta1::NodePrepareResourcesRequest {
            claims: all(r.claims),
        }
    }
}

impl From<v1beta1::NodeUnprepareResourcesRequest> for v1::NodeUnprepareResourcesRequest {
    fn from(r: v1beta1::NodeUnprepareResourcesRequest) -> Self {
        v1::NodeUnprepareResourcesRequest {
            claims: all(r.claims),
        }
    }
}

impl From<v1::NodeUnprepareResourcesRequest> for v1beta1::NodeUnprepareResourcesRequest {
    fn from(r: v1::NodeUnprepareResourcesRequest) -> Self {
        v1beta1::NodeUnprepareResourcesRequest {
            claims: all(r.claims),
        }
    }
}

impl From<v1::NodePrepareResourcesResponse> for v1beta1::NodePrepareResourcesResponse {
    fn from(r: v1::NodePrepareResourcesResponse) -> Self {
        let claims = r
            .claims
            .into_iter()
            .map(|(uid, c)| {
                let entry = v1beta1::NodePrepareResourceResponse {
                    devices: all(c.devices),
                    error: c.error,
                };
                (uid, entry)
            })
            .collect();
        v1beta1::NodePrepareResourcesResponse { claims }
    }
}

impl From<v1beta1::NodePrepareResourcesResponse> for v1::NodePrepareResourcesResponse {
    fn from(r: v1beta1::NodePrepareResourcesResponse) -> Self {
        let claims = r
            .claims
            .into_iter()
            .map(|(uid, c)| {
                let entry = v1::NodePrepareResourceResponse {
                    devices: all(c.devices),
                    error: c.error,
                };
                (uid, entry)
            })
            .collect();
        v1::NodePrepareResourcesResponse { claims }
    }
}

impl From<v1::NodeUnprepareResourcesResponse> for v1beta1::NodeUnprepareResourcesResponse {
    fn from(r: v1::NodeUnprepareResourcesResponse) -> Self {
        let claims = r
            .claims
            .into_iter()
            .map(|(uid, c)| {
                (
                    uid,
                    v1beta1::NodeUnprepareResourceResponse { error: c.error },
                )
            })
            .collect();
        v1beta1::NodeUnprepareResourcesResponse { claims }
    }
}

impl From<v1beta1::NodeUnprepareResourcesResponse> for v1::NodeUnprepareResourcesResponse {
    fn from(r: v1beta1::NodeUnprepareResourcesResponse) -> Self {
        let claims = r
            .claims
            .into_iter()
            .map(|(uid, c)| (uid, v1::NodeUnprepareResourceResponse { error: c.error }))
            .collect();
        v1::NodeUnprepareResourcesResponse { claims }
    }
}

/// The v1 request for a v1beta1 one, metadata kept and marked [`ServedAsV1beta1`].
fn to_v1<A, B: From<A>>(request: Request<A>) -> Request<B> {
    let (metadata, mut extensions, message) = request.into_parts();
    extensions.insert(ServedAsV1beta1);
    Request::from_parts(metadata, extensions, B::from(message))
}

#[tonic::async_trait]
impl<S: v1::dra_plugin_server::DraPlugin> v1beta1::dra_plugin_server::DraPlugin
    for V1beta1Server<S>
{
    async fn node_prepare_resources(
        &self,
        request: Request<v1beta1::NodePrepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodePrepareResourcesResponse>, Status> {
        let response = self.0.node_prepare_resources(to_v1(request)).await?;
        Ok(response.map(Into::into))
    }

    async fn node_unprepare_resources(
        &self,
        request: Request<v1beta1::NodeUnprepareResourcesRequest>,
    ) -> Result<Response<v1beta1::NodeUnprepareResourcesResponse>, Status> {
        let response = self.0.node_unprepare_resources(to_v1(request)).await?;
        Ok(response.map(Into::into))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1beta1_round_trip_keeps_everything_but_share_id() {
        let device = v1::Device {
            request_names: vec!["gpu".into()],
            pool_name: "node".into(),
            device_name: "gpu-0000-ab-00-0".into(),
            cdi_device_ids: vec!["v/c=x".into()],
            share_id: Some("s".into()),
        };
        let response = v1::NodePrepareResourcesResponse {
            claims: [(
                "uid".to_string(),
                v1::NodePrepareResourceResponse {
                    devices: vec![device.clone()],
                    error: String::new(),
                },
            )]
            .into(),
        };
        let back = v1::NodePrepareResourcesResponse::from(
            v1beta1::NodePrepareResourcesResponse::from(response),
        );
        let want = v1::Device {
            share_id: None,
            ..device
        };
        assert_eq!(back.claims["uid"].devices, [want]);
    }
}
