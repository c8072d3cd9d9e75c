//! Compiles the vendored kubelet protos with the pure-Rust `protox` compiler (no `protoc`
//! needed on build hosts) and generates tonic server and client code from the descriptors.

use std::error::Error;

const PROTOS: &[&str] = &[
    "proto/dra/v1/api.proto",
    "proto/dra/v1beta1/api.proto",
    "proto/pluginregistration/api.proto",
    "proto/dra-health/v1alpha1/api.proto",
    "proto/dra-health/v1/api.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
