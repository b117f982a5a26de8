//! Compiles `proto/` with a vendored `protoc` so a fresh machine needs no system protobuf
//! install, and writes the descriptor set that server reflection serves.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("sandbox_descriptor.bin"))
        // `bytes` fields become `bytes::Bytes`, so output chunks move into messages without a copy.
        .bytes(".")
        // Undecodable requests are INVALID_ARGUMENT rather than INTERNAL (see the codec).
        .codec_path("crate::grpc::codec::ProtoCodec")
        .compile_protos(&["proto/sandbox/v1/sandbox.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
