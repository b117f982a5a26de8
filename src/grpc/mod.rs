//! The gRPC edge: thin handlers (`service`), proto <-> domain conversion and request validation
//! (`convert`), the mapping of errors to status codes (`error`), bearer-token auth (`auth`) and
//! the protobuf codec that reports undecodable requests as the caller's error (`codec`).

pub mod auth;
pub mod codec;
pub mod convert;
pub mod error;
pub mod service;
