//! sandbox-bench: measures the service against its physical baselines (see BENCHMARKS.md).
//!
//! ```sh
//! cargo run --release --features testing --bin sandbox-bench -- all
//! cargo run --release --features testing --bin sandbox-bench -- throughput|latency|concurrency|slow-reader|stalled-readers|mirror|replay|stdin|keystrokes|start-rate
//! # issue 15, not in `all`: 10,000 concurrent streams (as root, to raise the fd hard limit)
//! cargo run --release --features testing --bin sandbox-bench -- load --streams 10000 --connections 10
//! ```
//!
//! Issue 15: `load` opens N Exec streams of `sleep 5; echo done` at once, round robin over
//! several connections, against a server with `--max-concurrent-jobs` and `--max-connections`
//! raised and, where this process may (CAP_SYS_RESOURCE), an fd hard limit that holds 4 per job;
//! it checks every stream (contract, `done\n`, exit 0), samples the server's RSS, fds and
//! threads, and calls Health every 10 ms on a connection and thread of its own throughout.
//! `start-rate` runs `true` jobs back to back from 64 clients (a connection each) for fixed
//! rounds, interleaved with 64 tasks spawning `/bin/sh -c true` directly.
//!
//! The server under test is the real `sandbox-runner` binary, run as a child process so its
//! memory and file descriptors are read from /proc apart from the client's. Under `cargo run` the
//! harness builds it first (same profile and features); otherwise it is expected next to this
//! executable, or at `$SANDBOX_RUNNER_BIN`.
//!
//! Each comparison runs interleaved (baseline, service, baseline, service, ...) in one process so
//! a noisy machine affects both alike; results are medians (or percentiles) with their spread, and
//! ratios to the baseline.
//!
//! One module per measurement; `harness` starts the server and runs jobs, `stats` summarises.

mod compare;
mod concurrency;
mod harness;
mod keystrokes;
mod latency;
mod load;
mod mirror;
mod replay;
mod slow_reader;
mod stalled_readers;
mod start_rate;
mod stats;
mod stdin;
mod throughput;

use clap::{Parser, Subcommand};

use compare::{CompareArgs, compare};
use concurrency::{ConcurrencyArgs, concurrency};
use harness::{ensure_server_built, machine_header, raise_fd_limit};
use keystrokes::{KeystrokesArgs, keystrokes};
use latency::{LatencyArgs, latency};
use load::{LoadArgs, load};
use mirror::{MirrorArgs, mirror};
use replay::{ReplayArgs, replay};
use slow_reader::{SlowReaderArgs, slow_reader};
use stalled_readers::{StalledReadersArgs, stalled_readers};
use start_rate::{StartRateArgs, start_rate};
use stdin::{StdinArgs, stdin};
use throughput::{ThroughputArgs, throughput};

#[derive(Parser)]
#[command(about = "Benchmarks for sandbox-runner (see BENCHMARKS.md)")]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Every benchmark below with its defaults, except `load` and `compare`.
    All,
    /// Bytes of /dev/zero through Exec to a discarding client, against a plain pipe.
    Throughput(ThroughputArgs),
    /// Request→Exited for `true` and time to first output for `echo hi`, against direct spawns.
    Latency(LatencyArgs),
    /// Many concurrent `sleep 2; echo done` jobs: correctness, server memory and fds.
    Concurrency(ConcurrencyArgs),
    /// A client reading ~1 KiB/s while the job writes without limit: server RSS and throttling.
    SlowReader(SlowReaderArgs),
    /// Many Exec streams of 4 KiB-line `yes` that are never read, one connection each: server
    /// RSS and fds while held and after they close, a new client's latency meanwhile (issue 11).
    StalledReaders(StalledReadersArgs),
    /// The Convex mirror against a local ingest receiver: throughput cost, requests/MiB, lag.
    Mirror(MirrorArgs),
    /// Attach to a finished log (first byte, replay throughput against live Exec) and many
    /// watchers of one job writing flat out (server memory, the job's throughput) (issue 12).
    Replay(ReplayArgs),
    /// Bytes into a job's stdin (`wc -c`) by Attach and by SendInput, against a local pipe
    /// (issue 13).
    Stdin(StdinArgs),
    /// Echo latency of single keystrokes through a `tty` job, against a local pseudo-terminal
    /// (issue 13).
    Keystrokes(KeystrokesArgs),
    /// Many concurrent Exec streams of `sleep 5; echo done` over several connections, the
    /// server's limits raised: correctness, server memory, fds and threads per stream, and a
    /// Health loop's latency throughout (issue 15).
    Load(LoadArgs),
    /// `true` jobs per second from many concurrent clients, against direct spawns of the same
    /// command from as many tasks (issue 15).
    StartRate(StartRateArgs),
    /// Two server binaries (before/after a change) interleaved: latency and throughput.
    Compare(CompareArgs),
}

fn main() -> anyhow::Result<()> {
    raise_fd_limit();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        ensure_server_built()?;
        machine_header();
        match args.bench {
            Bench::All => {
                throughput(parse_args::<ThroughputArgs>()).await?;
                latency(parse_args::<LatencyArgs>()).await?;
                concurrency(parse_args::<ConcurrencyArgs>()).await?;
                slow_reader(parse_args::<SlowReaderArgs>()).await?;
                stalled_readers(parse_args::<StalledReadersArgs>()).await?;
                mirror(parse_args::<MirrorArgs>()).await?;
                replay(parse_args::<ReplayArgs>()).await?;
                stdin(parse_args::<StdinArgs>()).await?;
                keystrokes(parse_args::<KeystrokesArgs>()).await?;
                // Not `load`: its 10,000 streams need a raised fd limit (root) and 20,000
                // processes, and take a minute of the whole machine.
                start_rate(parse_args::<StartRateArgs>()).await
            }
            Bench::Throughput(a) => throughput(a).await,
            Bench::Latency(a) => latency(a).await,
            Bench::Concurrency(a) => concurrency(a).await,
            Bench::SlowReader(a) => slow_reader(a).await,
            Bench::StalledReaders(a) => stalled_readers(a).await,
            Bench::Mirror(a) => mirror(a).await,
            Bench::Replay(a) => replay(a).await,
            Bench::Stdin(a) => stdin(a).await,
            Bench::Keystrokes(a) => keystrokes(a).await,
            Bench::Load(a) => load(a).await,
            Bench::StartRate(a) => start_rate(a).await,
            Bench::Compare(a) => compare(a).await,
        }
    })
}

/// Default arguments of one benchmark, for `all`.
fn parse_args<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults"));
    T::from_arg_matches(&cmd.get_matches_from(["defaults"])).expect("defaults parse")
}
