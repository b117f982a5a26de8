//! sandbox-runner: a gRPC service that runs commands in sandboxes and streams their output live.
//!
//! # Layout
//! - [`server`]: `run(listener, config, shutdown)`, the one entry point of `main` and the tests.
//! - [`cli`]: the client subcommands of the same binary (`exec`, `attach`, `status`, ...).
//! - [`config`]: flags and environment, checked once at start.
//! - [`connection`]: accepted connections, bounded in number, handshake time and idleness.
//! - [`metrics`]: Prometheus metrics (`--metrics-port`): per RPC, per job, the budget.
//! - [`response_watch`]: a layer following each response to its end (stream counting, metrics).
//! - [`grpc`]: the thin gRPC layer: handlers, validation and proto conversion, auth, status codes.
//! - [`rest`]: the REST routes on the same port (the Node runner's API, Server-Sent Events),
//!   over the same core, validated and mapped through `grpc`.
//! - [`job`]: the job core: specs, events, lifecycle, the registry of jobs, and the traits it
//!   drives (`Backend`, `Execution`, `Sink`, `JobSink`). It depends on none of the modules below.
//! - [`backend`]: where commands run, implementing `job::Backend` (`local`: processes on this
//!   host; `daytona`: process sessions in Daytona sandboxes).
//! - [`sink`]: where copies of job events go, implementing `job::Sink` (`convex`).
//! - [`secrets`]: secrets from the environment or files, swapped at run time when files change.
//! - [`error`]: the service's error type.
//! - [`proto`]: generated protobuf code.
//! - [`telemetry`]: logging setup.
//! - [`tls`]: the one TLS crypto provider.
//! - `testing` (feature `testing`): fakes (Daytona, Convex ingest, an in-memory backend) and
//!   fixtures (the binary as a child process, the stream-contract reader) shared by the tests
//!   and the benchmark.

// Denied, not forbidden: the audited job spawn (vfork-style clone and exec) is allowed
// (src/backend/local/spawn.rs).
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod backend;
pub mod cli;
pub mod config;
pub mod connection;
pub mod error;
pub mod grpc;
pub mod job;
pub mod metrics;
pub mod proto;
pub mod response_watch;
pub mod rest;
pub mod secrets;
pub mod server;
pub mod sink;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;

pub use config::Config;
pub use server::run;
