//! Test support shared by the integration tests and the benchmark (feature `testing`). Not
//! part of the service.
//!
//! - `daytona`, `convex_ingest`: fakes of the HTTP services the runner talks to, on loopback;
//!   `otlp`: a receiver of the traces it exports.
//! - `fake_backend`: an in-memory `job::Backend` playing scripted jobs, and a sink recording
//!   events, for unit tests of the job core.
//! - `server_process`: the real binary as a child process, its address from its log.
//! - `contract`: reads a job's event stream, checking the stream contract on every event.
//! - `procfs`: what /proc says of processes (group members, CPU, memory, fds).
//! - `local_config`: the local backend's settings for tests.
//!
//! The tests' in-process server and their panicking helpers stay in tests/common; the
//! benchmark's measurements stay in benches/sandbox_bench.

pub mod contract;
pub mod convex_ingest;
pub mod daytona;
pub mod fake_backend;
pub mod otlp;
pub mod procfs;
pub mod server_process;

/// A local backend's settings for tests: no cgroups, no job user, a 1 s grace, 64 KiB reads;
/// `subreaper` as the process under test is one or not.
pub fn local_config(subreaper: bool) -> crate::backend::local::LocalConfig {
    crate::backend::local::LocalConfig {
        default_cwd: None,
        grace: std::time::Duration::from_secs(1),
        chunk_bytes: 1 << 16,
        withheld_env: Vec::new(),
        identity: None,
        cgroups: crate::backend::local::JobCgroups::Off,
        subreaper,
        max_running: None,
        priority: crate::backend::local::JobPriority::with_nice(0),
    }
}

/// `data` cut at the given offsets (in any order, each at most `data.len()`; empty pieces
/// included): for tests that feed a streaming decoder every way of splitting its input.
pub fn cut_at(data: &[u8], cuts: impl IntoIterator<Item = usize>) -> Vec<&[u8]> {
    let mut at: Vec<usize> = cuts.into_iter().collect();
    at.sort_unstable();
    let mut pieces = Vec::new();
    let mut start = 0;
    for end in at.into_iter().chain([data.len()]) {
        pieces.push(&data[start..end]);
        start = end;
    }
    pieces
}
