//! The gRPC edge: thin handlers (`service`), proto <-> domain conversion and request validation
//! (`convert`), the mapping of errors to status codes (`error`) and bearer-token auth (`auth`).

pub mod auth;
pub mod convert;
pub mod error;
pub mod service;
