//! Test support shared by the integration tests and the benchmark (feature `testing`): fakes
//! of the HTTP services the runner talks to. Not part of the service.

pub mod daytona;
/// An in-memory `job::Backend` playing scripted jobs, and a sink recording events.
pub mod fake_backend;
