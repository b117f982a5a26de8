//! Load (issue 15): many concurrent Exec streams of `sleep 5; echo done`, spread over several
//! HTTP/2 connections, against a server whose limits are raised to hold them all: every
//! stream's contract, server memory, fds and threads per stream, and a Health loop on its own
//! connection (and its own thread) answering throughout.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use sandbox_runner::{
    proto as pb,
    testing::{
        contract::{Job, Output},
        procfs,
    },
};
use tokio_util::sync::CancellationToken;

use crate::{
    harness::{Server, exec, loadavg, raise_fd_limit_to, request, sample},
    stats::{Samples, mib, ms},
};

/// Any single call outside the streams (connect, warm-up, Health).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the background sampler reads the server's RSS, fds and threads. Counting 40,000
/// fds takes a few ms, so not much more often.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Descriptors the server keeps for itself and a local job holds (`RESERVED_FDS`,
/// `FDS_PER_JOB` in src/server.rs): below their sum plus the connections, the server lowers
/// `--max-connections` at start.
const SERVER_RESERVED_FDS: u64 = 64;
const SERVER_FDS_PER_JOB: u64 = 4;
/// Jobs and connections beyond the streams' own: warm-up, the control and Health clients.
const SPARE: usize = 64;

#[derive(clap::Args, Clone)]
pub(crate) struct LoadArgs {
    /// Concurrent Exec streams of `sleep S; echo done`.
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// HTTP/2 connections the streams are spread over, round robin (the server sets no limit on
    /// concurrent streams per connection).
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// S: how long each job sleeps before `echo done`.
    #[arg(long, default_value_t = 5)]
    sleep_secs: u64,
    /// How often the Health loop calls, in ms (the next call waits this long after an answer).
    #[arg(long, default_value_t = 10)]
    health_every_ms: u64,
    /// The Health target: every answer within this many ms.
    #[arg(long, default_value_t = 100)]
    health_target_ms: u64,
    /// Most time from the first request until every stream has ended; a stream still open
    /// then counts as failed.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// How long after the last stream ends the server is read again (and Health goes on).
    #[arg(long, default_value_t = 10)]
    settle_secs: u64,
    /// Extra server flags, as one string (e.g. `--job-cgroups off`).
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    server_args: String,
    /// Do not start below this MemAvailable (MiB).
    #[arg(long, default_value_t = 4096)]
    min_available_mib: u64,
}

/// The server at one moment.
struct Moment {
    rss: u64,
    fds: usize,
    threads: u64,
}

impl Moment {
    fn read(server: &Server) -> Moment {
        Moment {
            rss: server.memory().0,
            fds: server.fds(),
            threads: server.threads(),
        }
    }
}

/// One stream's outcome: when its `Started` and `Exited` arrived (from the first request).
struct Stream {
    started: Duration,
    exited: Duration,
}

pub(crate) async fn load(a: LoadArgs) -> anyhow::Result<()> {
    let available = procfs::meminfo_kib("MemAvailable").unwrap_or(0);
    anyhow::ensure!(
        available >= a.min_available_mib << 10,
        "MemAvailable {:.0} MiB is below --min-available-mib {}",
        mib(available),
        a.min_available_mib
    );
    anyhow::ensure!(
        a.streams > 0 && a.connections > 0,
        "--streams and --connections must be positive"
    );
    let max_jobs = a.streams + SPARE;
    let max_connections = a.connections + SPARE;
    // The server raises its soft limit to the hard one it inherits; it needs this many.
    let want_fds =
        SERVER_RESERVED_FDS + SERVER_FDS_PER_JOB * max_jobs as u64 + max_connections as u64 + 1024;
    let fd_note = match raise_fd_limit_to(want_fds) {
        Ok(limit) if limit >= want_fds => format!("enough for the {want_fds} wanted"),
        Ok(limit) => format!("the bench wanted {want_fds}; the kernel's fs.nr_open allows {limit}"),
        Err(e) => format!(
            "the hard limit: raising it to the {want_fds} wanted failed ({e}; it needs \
             CAP_SYS_RESOURCE)"
        ),
    };
    let processes = process_limits();
    let load_start = loadavg();
    let (max_jobs_s, max_conn_s) = (max_jobs.to_string(), max_connections.to_string());
    let mut flags = vec![
        "--max-concurrent-jobs",
        &max_jobs_s,
        "--max-connections",
        &max_conn_s,
    ];
    flags.extend(a.server_args.split_whitespace());
    let server = Server::spawn(&flags, &[]).await?;
    let server_nofile = max_open_files(server.pid());
    // The server's own reckoning (src/server.rs): past this many jobs, spawns fail with EMFILE.
    let jobs_fit = server_nofile.parse::<u64>().map_or(u64::MAX, |n| {
        n.saturating_sub(SERVER_RESERVED_FDS + max_connections as u64)
    }) / SERVER_FDS_PER_JOB;
    if (a.streams as u64) > jobs_fit {
        eprintln!(
            "load: the server's RLIMIT_NOFILE {server_nofile} holds about {jobs_fit} jobs at \
             {SERVER_FDS_PER_JOB} fds each: streams past that will fail ({fd_note})"
        );
    }
    let url = server.url();
    eprintln!(
        "load: {} streams over {} connections, server RLIMIT_NOFILE {server_nofile}, {processes}",
        a.streams, a.connections
    );

    let mut control = server.client(false).await?;
    let mut clients = Vec::with_capacity(a.connections);
    for _ in 0..a.connections {
        let mut client = tokio::time::timeout(CALL_TIMEOUT, server.client(false)).await??;
        // Each connection warmed up, so the idle figures include what a connection costs.
        tokio::time::timeout(
            CALL_TIMEOUT,
            exec(&mut client, request("true", None), false),
        )
        .await??;
        clients.push(client);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = Moment::read(&server);

    // The Health loop, on its own connection and thread (a runtime of its own), so its
    // latency is the server's and not the wait behind this process's 10,000 stream tasks.
    let every = Duration::from_millis(a.health_every_ms.max(1));
    let health_limit = Duration::from_secs(a.timeout_secs + a.settle_secs + 30);
    let health_stop = Arc::new(AtomicBool::new(false));
    let health_thread = std::thread::spawn({
        let (url, stop) = (url.clone(), Arc::clone(&health_stop));
        move || -> anyhow::Result<Vec<Call>> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(health_loop(url, every, health_limit, stop))
        }
    });
    // A second of the loop against the idle server first.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let stop_sampling = CancellationToken::new();
    let _stop_on_error = stop_sampling.clone().drop_guard();
    let sampler = tokio::spawn(sample(server.pid(), SAMPLE_EVERY, stop_sampling.clone()));
    let cpu_start = server.cpu();
    let command = format!("sleep {}; echo done", a.sleep_secs);
    let deadline = Duration::from_secs(a.timeout_secs);
    eprintln!("load: starting {} streams", a.streams);
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..a.streams {
        let mut client = clients[i % a.connections].clone();
        let req = request(&command, None);
        set.spawn(async move {
            let left = deadline.saturating_sub(t0.elapsed());
            tokio::time::timeout(left, async {
                let job = Job::start(&mut client, req, Output::Keep).await?;
                let started = t0.elapsed();
                let run = job.finish().await?;
                let exited = t0.elapsed();
                // The contract reader checked seq (from 0, no gaps), Started first, exactly one
                // Exited last and the byte totals; the rest is this job's own.
                let e = &run.exited;
                anyhow::ensure!(
                    run.stdout == b"done\n"
                        && run.stderr.is_empty()
                        && run.gaps.is_empty()
                        && e.exit_code == Some(0),
                    "{:?} exit code {:?} signal {:?} {:?}, stdout {:?}, stderr {:?}, {} gaps",
                    pb::JobState::try_from(e.state).unwrap_or_default(),
                    e.exit_code,
                    e.signal,
                    e.message,
                    String::from_utf8_lossy(&run.stdout),
                    String::from_utf8_lossy(&run.stderr),
                    run.gaps.len()
                );
                Ok(Stream { started, exited })
            })
            .await
            .map_err(|_| anyhow::anyhow!("not ended within --timeout-secs"))?
        });
    }
    let (mut ok, mut failures) = (
        Vec::with_capacity(a.streams),
        BTreeMap::<String, usize>::new(),
    );
    let mut progress = Instant::now();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(stream)) => ok.push(stream),
            Ok(Err(e)) => *failures.entry(kind_of(&format!("{e:#}"))).or_default() += 1,
            Err(e) => *failures.entry(format!("task: {e}")).or_default() += 1,
        }
        if progress.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "  {:.0} s: {} streams ended",
                t0.elapsed().as_secs_f64(),
                ok.len() + failures.values().sum::<usize>()
            );
            progress = Instant::now();
        }
    }
    let all_ended = t0.elapsed();
    let cpu = {
        let (u, s) = server.cpu();
        (u - cpu_start.0, s - cpu_start.1)
    };
    let right_after = Moment::read(&server);
    let active_after = control_active(&mut control).await;
    tokio::time::sleep(Duration::from_secs(a.settle_secs)).await;
    let settled = Moment::read(&server);
    let active_settled = control_active(&mut control).await;
    stop_sampling.cancel();
    let peaks = sampler.await?;
    health_stop.store(true, Ordering::Relaxed);
    let calls = health_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the Health thread panicked"))??;
    let (_, hwm) = server.memory();
    let load_end = loadavg();
    server.stop().await;

    // The figures.
    let n_ok = ok.len();
    let n_failed: usize = failures.values().sum();
    let mut started = Samples::new("started");
    let mut exited = Samples::new("exited");
    for s in &ok {
        started.push(s.started.as_secs_f64());
        exited.push(s.exited.as_secs_f64());
    }
    let all_started = started.pct(100.0);
    // VmHWM: the true peak between samples (this server ran nothing bigger).
    let peak_rss = peaks.rss.max(hwm);
    let peak_active = calls.iter().map(|c| c.active).max().unwrap_or(0);
    // Streams between their `Started` and their `Exited` at once, as the clients saw them.
    let mut edges: Vec<(Duration, i64)> = ok
        .iter()
        .flat_map(|s| [(s.started, 1), (s.exited, -1)])
        .collect();
    edges.sort();
    let peak_running = edges
        .iter()
        .scan(0i64, |running, (_, d)| {
            *running += d;
            Some(*running)
        })
        .max()
        .unwrap_or(0);
    let per = peak_running.max(1) as f64;

    println!(
        "### Load: {} concurrent Exec streams of `{command}` over {} connections\n",
        a.streams, a.connections
    );
    println!(
        "Server `{}`; its RLIMIT_NOFILE {server_nofile} ({fd_note}), about {jobs_fit} jobs at \
         {SERVER_FDS_PER_JOB} fds each. Processes: {processes}. Load average {load_start} → \
         {load_end}.\n",
        flags.join(" ")
    );
    println!("| measure | value |\n|---|---|");
    println!("| streams correct | **{n_ok}/{}** |", a.streams);
    println!(
        "| time for all to start (last `Started`, from the first request) | {:.2} s (p50 {:.2} s) |",
        all_started,
        started.median()
    );
    println!(
        "| all ended (last `Exited`) | {:.2} s (first {:.2} s) |",
        all_ended.as_secs_f64(),
        exited.pct(0.0)
    );
    println!(
        "| peak concurrent streams (between `Started` and `Exited` as received) | **{peak_running}** |"
    );
    println!(
        "| peak Health `active_jobs` (jobs admitted, those waiting to spawn included) | {peak_active} |"
    );
    println!(
        "| server RSS before → peak → right after → +{} s | {:.1} → **{:.1}** → {:.1} → {:.1} MiB |",
        a.settle_secs,
        mib(idle.rss),
        mib(peak_rss),
        mib(right_after.rss),
        mib(settled.rss)
    );
    // Every stream is open from its request (all sent at once) to its `Exited`, so the peak
    // holds all of them, running or waiting to spawn; fds are held by running jobs only.
    println!(
        "| server RSS per stream ((peak − before) / streams correct; / peak concurrent) | \
         **{:.1} KiB**; {:.1} KiB |",
        peak_rss.saturating_sub(idle.rss) as f64 / n_ok.max(1) as f64,
        peak_rss.saturating_sub(idle.rss) as f64 / per
    );
    println!(
        "| server fds before → peak → right after → +{} s | {} → **{}** → {} → {} |",
        a.settle_secs, idle.fds, peaks.fds, right_after.fds, settled.fds
    );
    println!(
        "| server fds per stream ((peak − before) / peak concurrent streams) | **{:.2}** |",
        peaks.fds.saturating_sub(idle.fds) as f64 / per
    );
    println!(
        "| server threads before → peak → +{} s | {} → {} → {} |",
        a.settle_secs, idle.threads, peaks.threads, settled.threads
    );
    println!(
        "| server CPU, first request → last `Exited` | {:.2} s user + {:.2} s sys |",
        cpu.0, cpu.1
    );
    println!(
        "| Health `active_jobs` right after → +{} s | {active_after} → {active_settled} |",
        a.settle_secs
    );
    println!(
        "| this process (the clients) RSS, peak | {:.0} MiB |",
        mib(peaks.bench_rss)
    );
    println!(
        "| machine MemAvailable, lowest | {:.1} GiB |",
        peaks.min_available as f64 / 1048576.0
    );
    if !failures.is_empty() {
        println!("\n{n_failed} streams failed:\n");
        for (kind, n) in &failures {
            println!("- {n} × {kind}");
        }
    }

    health_table(&calls, t0, all_started, all_ended, a.health_target_ms);
    Ok(())
}

/// One Health call: when it was made, how long it took (None: failed or timed out), and the
/// active jobs it reported.
struct Call {
    at: Instant,
    took: Option<Duration>,
    active: u32,
}

/// Calls Health every `every` (after each answer) on a connection of its own until `stop`, or
/// `limit` passed: bounded by time and so by count.
async fn health_loop(
    url: String,
    every: Duration,
    limit: Duration,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<Call>> {
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect_timeout(CALL_TIMEOUT)
        .connect()
        .await?;
    let mut client = pb::sandbox_service_client::SandboxServiceClient::new(channel);
    let t = Instant::now();
    let max_calls = (limit.as_millis() / every.as_millis().max(1)) as usize + 1;
    let mut calls = Vec::with_capacity(max_calls.min(1 << 20));
    while !stop.load(Ordering::Relaxed) && t.elapsed() < limit && calls.len() < max_calls {
        let at = Instant::now();
        let r = tokio::time::timeout(CALL_TIMEOUT, client.health(pb::HealthRequest {})).await;
        let (took, active) = match r {
            Ok(Ok(h)) => (Some(at.elapsed()), h.into_inner().active_jobs),
            _ => (None, 0),
        };
        calls.push(Call { at, took, active });
        tokio::time::sleep(every).await;
    }
    Ok(calls)
}

/// Health latency over the whole run and by phase: before the first request, while the
/// streams start, while they all run, while they end, after.
fn health_table(
    calls: &[Call],
    t0: Instant,
    all_started: f64,
    all_ended: Duration,
    target_ms: u64,
) {
    let started = t0 + Duration::from_secs_f64(all_started.max(0.0));
    let ended = t0 + all_ended;
    // (name, from, until): calls made in [from, until).
    let phases = [
        ("whole run", None, None),
        ("before the first request", None, Some(t0)),
        (
            "streams starting (to the last `Started`)",
            Some(t0),
            Some(started),
        ),
        (
            "all started, to the last `Exited`",
            Some(started),
            Some(ended),
        ),
        ("after the last `Exited`", Some(ended), None),
    ];
    let mut spacing = Samples::new("between calls");
    for w in calls.windows(2) {
        spacing.push(ms(w[1].at - w[0].at));
    }
    println!(
        "\nHealth, a call every {:.1} ms (median, start to start) on its own connection and \
         thread (ms):\n",
        spacing.median()
    );
    println!(
        "| phase | calls | p50 | p99 | max | over {target_ms} ms | failed |\n|---|---|---|---|---|---|---|"
    );
    let mut whole_max = 0.0;
    let mut whole_failed = 0;
    for (name, from, until) in phases {
        let mut s = Samples::new(name);
        let mut failed = 0;
        let within = |at: Instant| from.is_none_or(|f| at >= f) && until.is_none_or(|u| at < u);
        for c in calls.iter().filter(|c| within(c.at)) {
            match c.took {
                Some(d) => s.push(ms(d)),
                None => failed += 1,
            }
        }
        let over = s.values.iter().filter(|v| **v >= target_ms as f64).count();
        if name == "whole run" {
            whole_max = s.pct(100.0);
            whole_failed = failed;
        }
        println!(
            "| {name} | {} | {:.2} | {:.2} | {:.2} | {over} | {failed} |",
            s.values.len() + failed,
            s.median(),
            s.pct(99.0),
            s.pct(100.0),
        );
    }
    let worst = calls
        .iter()
        .filter_map(|c| c.took.map(|d| (d, c.at)))
        .max_by_key(|(d, _)| *d);
    if let Some((d, at)) = worst {
        println!(
            "\nSlowest Health answer: {:.1} ms, {:+.2} s from the first request.",
            ms(d),
            // Signed: the loop starts before the first request.
            at.saturating_duration_since(t0).as_secs_f64()
                - t0.saturating_duration_since(at).as_secs_f64()
        );
    }
    println!(
        "Target (every Health answer within {target_ms} ms throughout): **{}** (max {:.1} ms, \
         {whole_failed} failed).\n",
        if whole_max < target_ms as f64 && whole_failed == 0 {
            "met"
        } else {
            "not met"
        },
        whole_max
    );
}

/// Health's active jobs on the control connection (u32::MAX if it did not answer).
async fn control_active(
    client: &mut pb::sandbox_service_client::SandboxServiceClient<tonic::transport::Channel>,
) -> u32 {
    match tokio::time::timeout(CALL_TIMEOUT, client.health(pb::HealthRequest {})).await {
        Ok(Ok(h)) => h.into_inner().active_jobs,
        _ => u32::MAX,
    }
}

/// An error's kind for counting: its message with digits dropped (job ids, counts, times).
fn kind_of(message: &str) -> String {
    message
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(160)
        .collect()
}

/// The soft "Max open files" of process `pid`, from /proc/<pid>/limits.
fn max_open_files(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// What bounds the number of processes: up to 2 per job here (`sh` and its `sleep`).
fn process_limits() -> String {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".into())
    };
    // /proc/loadavg's fourth field: runnable/total tasks (threads included).
    let tasks = read("/proc/loadavg")
        .split_whitespace()
        .nth(3)
        .and_then(|f| f.split_once('/').map(|(_, total)| total.to_owned()))
        .unwrap_or_else(|| "?".into());
    let nproc = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NPROC)
        .map_or("?".into(), |(soft, _)| soft.to_string());
    format!(
        "kernel.pid_max {}, kernel.threads-max {}, {tasks} tasks at the start, RLIMIT_NPROC {nproc}",
        read("/proc/sys/kernel/pid_max"),
        read("/proc/sys/kernel/threads-max"),
    )
}
