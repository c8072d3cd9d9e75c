//! The kubelet plugin-registration API (`pluginregistration`): generated wire types and
//! our implementation of the `Registration` service.

use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// Generated code lives in a private module so lints can be relaxed for it alone.
#[allow(missing_docs, clippy::all)]
mod pb {
    tonic::include_proto!("pluginregistration");
}

pub use pb::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse, registration_client,
    registration_server,
};

/// `PluginInfo.type` for DRA drivers.
pub const DRA_PLUGIN_TYPE: &str = "DRAPlugin";

/// Service versions offered to the kubelet, in order of preference: the kubelet takes the
/// first entry of this list it knows, so v1 must come first.
pub const SUPPORTED_VERSIONS: [&str; 2] = ["v1.DRAPlugin", "v1beta1.DRAPlugin"];

/// Health service versions advertised next to [`SUPPORTED_VERSIONS`] when the DRA socket
/// serves them. Kubelet 1.37 (and 1.36 with kubernetes#141858) opens the health stream
/// only for an advertised version, picking the newest both sides know; the kubelet's
/// DRAPlugin choice ignores these names.
pub const HEALTH_VERSIONS: [&str; 2] = ["v1.DRAResourceHealth", "v1alpha1.DRAResourceHealth"];

/// What the kubelet last reported through `NotifyRegistrationStatus`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    /// No status received yet.
    Pending,
    /// The kubelet accepted the plugin.
    Registered,
    /// The kubelet rejected the plugin with this error.
    Failed(String),
}

/// tonic implementation of the registration service.
pub struct RegistrationService {
    info: pb::PluginInfo,
    status: watch::Sender<RegistrationState>,
}

impl RegistrationService {
    /// Creates the service for `driver_name` whose DRA socket is at the absolute path
    /// `endpoint` and serves no health service.
    pub fn new(driver_name: impl Into<String>, endpoint: impl Into<String>) -> Self {
        let (status, _) = watch::channel(RegistrationState::Pending);
        Self {
            info: pb::PluginInfo {
                r#type: DRA_PLUGIN_TYPE.to_owned(),
                name: driver_name.into(),
                endpoint: endpoint.into(),
                supported_versions: SUPPORTED_VERSIONS.iter().map(|v| (*v).to_owned()).collect(),
            },
            status,
        }
    }

    /// Also advertises [`HEALTH_VERSIONS`]: for a DRA socket that serves them.
    pub fn with_health(mut self) -> Self {
        self.info
            .supported_versions
            .extend(HEALTH_VERSIONS.iter().map(|v| (*v).to_owned()));
        self
    }

    /// The `PluginInfo` answered to `GetInfo`.
    pub fn plugin_info(&self) -> &pb::PluginInfo {
        &self.info
    }

    /// A receiver that observes every status the kubelet reports (latest value wins).
    pub fn subscribe(&self) -> watch::Receiver<RegistrationState> {
        self.status.subscribe()
    }

    /// The latest status the kubelet reported.
    pub fn status(&self) -> RegistrationState {
        self.status.borrow().clone()
    }
}

#[tonic::async_trait]
impl pb::registration_server::Registration for RegistrationService {
    async fn get_info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::PluginInfo>, Status> {
        tracing::debug!(driver = %self.info.name, "kubelet called GetInfo");
        Ok(Response::new(self.info.clone()))
    }

    async fn notify_registration_status(
        &self,
        request: Request<pb::RegistrationStatus>,
    ) -> Result<Response<pb::RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        let state = if status.plugin_registered {
            tracing::info!(driver = %self.info.name, "kubelet registered the plugin");
            RegistrationState::Registered
        } else {
            tracing::error!(
                driver = %self.info.name,
                error = %status.error,
                "kubelet rejected the plugin registration"
            );
            RegistrationState::Failed(status.error)
        };
        // send_replace stores the value even when nobody subscribes yet.
        self.status.send_replace(state);
        Ok(Response::new(pb::RegistrationStatusResponse {}))
    }
}
