//! Compiles the wire contract with `protox` (pure Rust, no system `protoc`) and generates the tonic
//! server and client. Also writes the encoded descriptor set that gRPC reflection serves, and a
//! client for `tests/proto/go_contract.proto` — the Go service's contract as it was, used by the
//! interoperability test to prove old clients still work.

use std::{env, io, path::PathBuf};

use prost::Message;

fn main() -> io::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    let contract = compile("proto/election_agent/v1/election_agent.proto", "proto")?;
    std::fs::write(
        out_dir.join("election_agent_descriptor.bin"),
        contract.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .codec_path("crate::grpc::codec::SmallBuffers")
        // GetPods' answer, sent from pods encoded once per change of the caches.
        .extern_path(".grpc.election_agent.v1.Pods", "crate::grpc::Pods")
        .compile_fds(contract)?;

    let legacy_dir = out_dir.join("go_contract");
    std::fs::create_dir_all(&legacy_dir)?;
    let legacy = compile("tests/proto/go_contract.proto", "tests/proto")?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .build_server(false)
        .out_dir(legacy_dir)
        .compile_fds(legacy)?;

    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=tests/proto");
    Ok(())
}

fn compile(file: &str, include: &str) -> io::Result<prost_types::FileDescriptorSet> {
    protox::compile([file], [include]).map_err(|err| io::Error::other(format!("{err:?}")))
}
