//! Compiles the eBPF programs (ebpf/) for the BPF target so the agent can
//! embed the object file (`$OUT_DIR/warren-ebpf`), and generates the gRPC
//! code of the CA's API (proto/ca.proto, Istio's certificate service).
//!
//! This is what aya-build does, minus one thing: aya-build relays all of the
//! inner cargo's output as `cargo:warning` lines, which cargo then replays on
//! every later build of the agent. Here the output is shown only on failure.
//!
//! Needs the nightly toolchain with rust-src, and bpf-linker: `cargo xtask
//! setup` installs them.
use std::{env, path::PathBuf, process::Command};

fn main() {
    build_ebpf();
    build_ca_api();
}

/// Rust code for Istio's certificate API (server and client), with the protoc
/// of `protoc-bin-vendored` so that nothing has to be installed.
fn build_ca_api() {
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

fn build_ebpf() {
    let ebpf_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ebpf");
    let common_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../common");
    for dir in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = out_dir.join("ebpf-target");
    let target = "bpfel-unknown-none";
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");

    let mut cargo = Command::new("rustup");
    cargo
        .args([
            "run",
            "nightly",
            "cargo",
            "build",
            "--release",
            "--package",
            "warren-ebpf",
        ])
        .args(["--target", target, "-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&ebpf_dir)
        // BTF for the loader; the cfg tells aya-ebpf which kernel ABI to use.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                &format!("--cfg=bpf_target_arch=\"{arch}\""),
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        )
        // The outer build's compiler settings are not for this one.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS");
    let output = cargo.output().unwrap_or_else(|e| {
        panic!("cannot run rustup ({e}); run `cargo xtask setup` to install the eBPF toolchain")
    });
    if !output.status.success() {
        panic!(
            "building the eBPF programs failed; `cargo xtask setup` installs what they need \
             (nightly rust-src, bpf-linker).\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let object = target_dir.join(target).join("release/warren-ebpf");
    std::fs::copy(&object, out_dir.join("warren-ebpf"))
        .unwrap_or_else(|e| panic!("cannot copy {}: {e}", object.display()));
}
