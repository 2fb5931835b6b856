//! Generates the gRPC code of the CA's API (proto/ca.proto, Istio's
//! certificate service): the server for `warren-ca`, the client for the agent.
use std::{env, path::PathBuf};

/// Rust code for Istio's certificate API (server and client), with the protoc
/// of `protoc-bin-vendored` so that nothing has to be installed.
fn main() {
    let proto_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto");
    let proto = proto_dir.join("ca.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let protoc = protoc_bin_vendored::protoc_bin_path()
        .unwrap_or_else(|e| panic!("no vendored protoc for this host: {e}"));
    let includes = protoc_bin_vendored::include_path()
        .unwrap_or_else(|e| panic!("no vendored protobuf includes: {e}"));
    // prost-build finds protoc through this variable. Setting it is sound
    // here: a build script runs this on its only thread.
    unsafe { env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .compile_protos(&[&proto], &[&proto_dir, &includes])
        .unwrap_or_else(|e| panic!("cannot generate the CA API from {}: {e}", proto.display()));
}
