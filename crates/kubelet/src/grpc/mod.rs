//! gRPC transport: kubelet DRA services (v1, v1beta1), plugin registration, the
//! `:authority` adapter for kubelet-dialed sockets, the server and a kubelet emulator.

/// Generated types for `k8s.io.kubelet.pkg.apis.dra.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1");
}

/// Generated types for `k8s.io.kubelet.pkg.apis.dra.v1beta1`.
#[allow(missing_docs, clippy::all)]
pub mod v1beta1 {
    tonic::include_proto!("k8s.io.kubelet.pkg.apis.dra.v1beta1");
}

/// Generated types for the kubelet's `v1alpha1.DRAResourceHealth` (package `v1alpha1`).
#[allow(missing_docs, clippy::all)]
pub mod health_v1alpha1 {
    tonic::include_proto!("v1alpha1");
}

/// Generated types for the kubelet's `v1.DRAResourceHealth` (package `v1`, Kubernetes
/// 1.37+): the same messages as [`health_v1alpha1`].
#[allow(missing_docs, clippy::all)]
pub mod health_v1 {
    tonic::include_proto!("v1");
}

pub mod dra;
pub mod emulator;
pub mod peers;
pub mod registration;
pub mod server;
pub mod v1beta1_adapter;

/// The `:authority` adapter lives in its own crate (small enough to fuzz); this path
/// stays for existing users.
pub use vfio_gpu_h2_authority as authority;
