//! Test support shared by the integration tests and the benchmark (feature `testing`): fakes
//! of the HTTP services the runner talks to. Not part of the service.

pub mod contract;
pub mod convex_ingest;
pub mod daytona;
pub mod procfs;
pub mod server_process;
