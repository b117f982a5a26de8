//! Generated protobuf and gRPC code for `sandbox.v1`, and the descriptor set reflection serves.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("sandbox.v1");

/// Encoded `FileDescriptorSet` of `proto/`, registered with server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sandbox_descriptor");
