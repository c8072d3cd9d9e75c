//! The Kubernetes layer of vfio-gpu-dra: the kubelet plugin.
//!
//! - [`grpc`]: kubelet registration and the DRA gRPC services (v1, v1beta1) over Unix sockets.
//! - [`plugin`]: NodePrepareResources / NodeUnprepareResources on top of the engine.
//! - [`prepare_error`]: why a claim could not be prepared, rendered once for the kubelet.
//! - [`cdi`], [`metadata`]: CDI specs and KEP-5304 device metadata for KubeVirt.
//! - [`config`]: the opaque per-claim configuration of this driver.
//! - [`slices`]: publishing the node's GPUs as ResourceSlices.
//! - [`fabric`]: NVLink partition attributes and reconcile (the engine activates them).
//! - [`health`]: device health for the kubelet (`v1.DRAResourceHealth`, `v1alpha1.DRAResourceHealth`).
//! - [`metrics`]: Prometheus metrics and the liveness/readiness endpoint.
//! - [`node_events`]: Events on the Node (a GPU quarantined).
//! - [`serve`]: `vfio-gpu-dra serve`, wiring it all together.
//! - [`apiserver`]: telling "object not found" from "API server too old".

#![warn(missing_docs)]

pub mod apiserver;
pub mod cdi;
/// `VfioDeviceConfig` lives in its own crate (small enough to fuzz); this path stays.
pub use vfio_gpu_claim_config as config;
pub mod fabric;
pub mod grpc;
pub mod health;
pub mod metadata;
pub mod metrics;
pub mod node_events;
pub mod plugin;
pub mod prepare_error;
pub mod serve;
pub mod slices;
