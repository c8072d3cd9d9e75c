//! Kubernetes layer of vfio-gpu-dra: kubelet DRA gRPC transport and registration.

pub mod grpc;
