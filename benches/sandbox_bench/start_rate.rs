//! Start rate (issue 15): `true` jobs per second from many concurrent clients, each running
//! jobs back to back through Exec to `Exited`, against the same command spawned directly
//! (fork+exec and wait) from as many concurrent tasks in this process; interleaved rounds.

use std::{
    future::Future,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use sandbox_runner::{proto::sandbox_service_client::SandboxServiceClient, testing::procfs};
use tokio::process::Command;
use tonic::transport::Channel;

use crate::{
    harness::{Server, exec, loadavg, request, server_bin},
    stats::Samples,
};

/// Most time one job (or one spawn) may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// What the service's local backend runs for the job `true` (`/bin/sh -c LINE`), so the
/// baseline spawns the same program with the same arguments.
const SHELL: &str = "/bin/sh";

#[derive(clap::Args, Clone)]
pub(crate) struct StartRateArgs {
    /// Concurrent clients, each on its own connection; and concurrent spawning tasks in the
    /// baseline.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Length of each round, in seconds.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Rounds of each variant (baseline, service, baseline, service, ...).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also measure this (older) server binary, in the same rounds (baseline, before, current).
    #[arg(long)]
    before: Option<PathBuf>,
}

/// One round: how many operations completed, and failed, over how long.
struct Round {
    done: u64,
    failed: u64,
    first_error: Option<String>,
    took: Duration,
}

impl Round {
    fn rate(&self) -> f64 {
        self.done as f64 / self.took.as_secs_f64()
    }
}

/// One server under test, its clients and what its rounds measured.
struct Service {
    server: Server,
    clients: Vec<SandboxServiceClient<Channel>>,
    rates: Samples,
    jobs: u64,
    /// CPU seconds (user, system) over its rounds: the server's, and this process's.
    cpu_server: (f64, f64),
    cpu_bench: (f64, f64),
}

impl Service {
    async fn start(bin: &Path, clients: usize, name: String) -> anyhow::Result<Service> {
        // As deployed (default flags): 64 clients are well within the default 256 jobs.
        let server = Server::spawn_bin(bin, &[], &[]).await?;
        let mut connected = Vec::with_capacity(clients);
        for _ in 0..clients {
            connected.push(tokio::time::timeout(CALL_TIMEOUT, server.client(false)).await??);
        }
        Ok(Service {
            server,
            clients: connected,
            rates: Samples::new(name),
            jobs: 0,
            cpu_server: (0.0, 0.0),
            cpu_bench: (0.0, 0.0),
        })
    }

    async fn round(&mut self, secs: Duration) -> Round {
        let (server_before, bench_before) =
            (self.server.cpu(), procfs::cpu_seconds(std::process::id()));
        let r = service_round(&self.clients, secs).await;
        let (server_after, bench_after) =
            (self.server.cpu(), procfs::cpu_seconds(std::process::id()));
        self.cpu_server.0 += server_after.0 - server_before.0;
        self.cpu_server.1 += server_after.1 - server_before.1;
        self.cpu_bench.0 += bench_after.0 - bench_before.0;
        self.cpu_bench.1 += bench_after.1 - bench_before.1;
        self.jobs += r.done;
        self.rates.push(r.rate());
        r
    }

    /// CPU per job, in ms.
    fn cpu_per_job(&self, cpu: (f64, f64)) -> String {
        let per = 1e3 / self.jobs.max(1) as f64;
        format!("{:.3} ms user + {:.3} ms sys", cpu.0 * per, cpu.1 * per)
    }
}

pub(crate) async fn start_rate(a: StartRateArgs) -> anyhow::Result<()> {
    let load_start = loadavg();
    let exec_name = |which: &str| {
        format!(
            "Exec `true` to `Exited`, {} clients (one connection each){which}",
            a.clients
        )
    };
    let mut before = match &a.before {
        Some(bin) => {
            let name = exec_name(&format!(", before: `{}`", bin.display()));
            Some(Service::start(bin, a.clients, name).await?)
        }
        None => None,
    };
    let name = exec_name(if before.is_some() { ", current" } else { "" });
    let mut current = Service::start(&server_bin(), a.clients, name).await?;
    eprintln!(
        "start rate: {} clients, {} s rounds, {} rounds each",
        a.clients, a.secs, a.rounds
    );
    // A short round of each first, discarded: connections, caches, the page cache for `sh`.
    let warm = Duration::from_secs(1);
    spawn_round(a.clients, warm).await;
    for service in before.iter_mut().chain([&mut current]) {
        service_round(&service.clients, warm).await;
    }

    let secs = Duration::from_secs(a.secs);
    let mut direct = Samples::new(format!(
        "spawn `{SHELL} -c true` directly, {} tasks",
        a.clients
    ));
    let (mut failed, mut first_error) = (0, None);
    for round in 0..a.rounds {
        eprintln!("  round {}/{}", round + 1, a.rounds);
        let r = spawn_round(a.clients, secs).await;
        direct.push(r.rate());
        failed += r.failed;
        first_error = first_error.or(r.first_error);
        for service in before.iter_mut().chain([&mut current]) {
            let r = service.round(secs).await;
            failed += r.failed;
            first_error = first_error.or(r.first_error);
        }
    }
    let load_end = loadavg();

    println!(
        "### Start rate: `true` from {} concurrent clients, {} rounds of {} s each, interleaved\n",
        a.clients, a.rounds, a.secs
    );
    println!(
        "| variant | median | min..max | ratio to direct | ratio to before |\n|---|---|---|---|---|"
    );
    direct.rate_row_in("spawns/s", 0, None, None);
    if let Some(before) = &before {
        before.rates.rate_row_in("jobs/s", 0, Some(&direct), None);
    }
    current.rates.rate_row_in(
        "jobs/s",
        0,
        Some(&direct),
        before.as_ref().map(|b| &b.rates),
    );
    println!();
    for service in before.iter().chain([&current]) {
        println!(
            "- {}: CPU per job: server {}, this process (the clients) {}.",
            service.rates.name,
            service.cpu_per_job(service.cpu_server),
            service.cpu_per_job(service.cpu_bench)
        );
    }
    println!(
        "\nFailed: {failed}{}. Load average {load_start} → {load_end}.\n",
        first_error.map_or(String::new(), |e| format!(" (first: {e})")),
    );
    for service in before.into_iter().chain([current]) {
        service.server.stop().await;
    }
    Ok(())
}

/// `tasks` concurrent tasks, each spawning `sh -c true` and waiting for it, back to back.
async fn spawn_round(tasks: usize, secs: Duration) -> Round {
    round(tasks, secs, |_| async {
        let status = Command::new(SHELL)
            .args(["-c", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "{status}");
        Ok(())
    })
    .await
}

/// Each client running `true` through Exec to `Exited`, back to back (the stream contract and
/// exit code 0 checked).
async fn service_round(clients: &[SandboxServiceClient<Channel>], secs: Duration) -> Round {
    let clients = clients.to_vec();
    round(clients.len(), secs, move |i| {
        let mut client = clients[i].clone();
        async move {
            exec(&mut client, request("true", None), false).await?;
            Ok(())
        }
    })
    .await
}

/// Runs `op(task)` back to back in `tasks` concurrent tasks until `secs` passed (each
/// operation bounded by CALL_TIMEOUT, each task by a count): operations completed over the time
/// until the last one ended.
async fn round<F, Fut>(tasks: usize, secs: Duration, op: F) -> Round
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    // Far beyond any machine's rate; only a guard against a loop that never waits.
    let max_per_task = 100_000 * secs.as_secs().max(1);
    let op = Arc::new(op);
    let t = Instant::now();
    let deadline = t + secs;
    let mut set = tokio::task::JoinSet::new();
    for task in 0..tasks {
        let op = Arc::clone(&op);
        set.spawn(async move {
            let (mut done, mut failed, mut first_error) = (0, 0, None);
            while Instant::now() < deadline && done + failed < max_per_task {
                match tokio::time::timeout(CALL_TIMEOUT, op(task)).await {
                    Ok(Ok(())) => done += 1,
                    Ok(Err(e)) => {
                        failed += 1;
                        first_error.get_or_insert(format!("{e:#}"));
                    }
                    Err(_) => {
                        failed += 1;
                        first_error.get_or_insert(format!("no end within {CALL_TIMEOUT:?}"));
                    }
                }
            }
            (done, failed, first_error)
        });
    }
    let mut r = Round {
        done: 0,
        failed: 0,
        first_error: None,
        took: Duration::ZERO,
    };
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((done, failed, first_error)) => {
                r.done += done;
                r.failed += failed;
                r.first_error = r.first_error.or(first_error);
            }
            Err(e) => {
                r.failed += 1;
                r.first_error.get_or_insert(format!("task: {e}"));
            }
        }
    }
    r.took = t.elapsed();
    r
}
