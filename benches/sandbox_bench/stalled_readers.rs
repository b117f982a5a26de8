//! Stalled readers (issue 11, defect 1): N Exec streams of 4 KiB-line `yes`, each on its own
//! connection, read up to `Started` and never again. Server memory and fds while they are held,
//! how a new client is served meanwhile, and how much memory comes back after they close.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use sandbox_runner::{
    proto::{self as pb, JobState, sandbox_service_client::SandboxServiceClient},
    testing::{
        contract::{Job, Output},
        procfs,
    },
};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::{
    harness::{Server, exec, loadavg, request, sample, server_bin},
    stats::{Samples, mib, ms},
};

/// 4 KiB lines fill the job's pipe exactly, so the server's reads (and its chunks) grow to
/// 1 MiB. Plain `yes` writes 8,184-byte blocks that never fill a 64 KiB pipe exactly: its
/// chunks stay small and hide the problem (issue 11).
const YES_4K: &str = r#"yes "$(head -c 4095 /dev/zero | tr '\0' x)""#;
/// The server's `--max-concurrent-jobs` default.
const DEFAULT_JOB_LIMIT: usize = 256;
/// Any single call (connect, Exec to `Started`, Health, Status, a probe's `echo hi`).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the background sampler reads the server's RSS and fds.
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

#[derive(clap::Args, Clone)]
pub(crate) struct StalledReadersArgs {
    /// Unread Exec streams, each on its own connection (its own tonic Channel).
    #[arg(long, default_value_t = 256)]
    streams: usize,
    /// The stalled clients' HTTP/2 stream and connection windows, in KiB (e.g. 64, as the
    /// issue's raw client). Default: tonic's `Endpoint` defaults.
    #[arg(long)]
    window_kib: Option<u32>,
    /// How long the streams are held, sampling RSS, before the probe runs (they stay held
    /// through the probe).
    #[arg(long, default_value_t = 20)]
    hold_secs: u64,
    /// How long after closing the streams RSS is read again.
    #[arg(long, default_value_t = 30)]
    settle_secs: u64,
    /// Sequential `echo hi` Execs and Health calls of the probe, idle and while held.
    #[arg(long, default_value_t = 50)]
    probes: usize,
    /// Extra server flags, as one string. Unless it sets `--max-concurrent-jobs`, the job limit
    /// is raised to streams + 1 when that is above the default 256, so the probe's `echo hi`
    /// has a slot while the streams are held.
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    server_args: String,
    /// Extra server environment, as `K=V K2=V2` (e.g. to try allocator settings).
    #[arg(long, default_value = "")]
    server_env: String,
    /// Measure this (older) server binary first, then the current one, same settings.
    #[arg(long)]
    before: Option<PathBuf>,
    /// What each held job runs (default: 4 KiB-line `yes`, which fills every buffer on the way).
    /// A quiet command such as `sleep 1000` holds as many jobs and connections with no output,
    /// to tell their cost from the stalled output's.
    #[arg(long)]
    command: Option<String>,
    /// Stop opening streams if the machine's MemAvailable falls below this (MiB).
    #[arg(long, default_value_t = 2048)]
    min_available_mib: u64,
    /// Most time to open all streams.
    #[arg(long, default_value_t = 300)]
    open_timeout_secs: u64,
    /// Most time to wait, after closing, for Health's active_jobs to reach 0 (and again after
    /// cancelling what is left).
    #[arg(long, default_value_t = 60)]
    drain_wait_secs: u64,
}

pub(crate) async fn stalled_readers(a: StalledReadersArgs) -> anyhow::Result<()> {
    if let Some(before) = &a.before {
        run(&a, before, "before").await?;
    }
    let label = if a.before.is_some() {
        "after"
    } else {
        "current"
    };
    run(&a, &server_bin(), label).await
}

/// One row of the memory table.
struct Moment {
    name: String,
    rss: u64,
    hwm: u64,
    fds: usize,
    active: String,
}

impl Moment {
    fn read(name: impl Into<String>, server: &Server, active: Option<u32>) -> Moment {
        let (rss, hwm) = server.memory();
        Moment {
            name: name.into(),
            rss,
            hwm,
            fds: server.fds(),
            active: active.map_or("-".into(), |n| n.to_string()),
        }
    }
}

async fn run(a: &StalledReadersArgs, bin: &Path, label: &str) -> anyhow::Result<()> {
    let mut args: Vec<String> = a.server_args.split_whitespace().map(Into::into).collect();
    if !args.iter().any(|x| x.starts_with("--max-concurrent-jobs"))
        && a.streams >= DEFAULT_JOB_LIMIT
    {
        args.extend(["--max-concurrent-jobs".into(), (a.streams + 1).to_string()]);
    }
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = a
        .server_env
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let load_start = loadavg();
    let server = Server::spawn_bin(bin, &arg_refs, &env).await?;
    let url = server.url();
    let mut control = server.client(false).await?;
    let limit = health(&mut control).await?.max_concurrent_jobs;
    eprintln!(
        "stalled readers ({label}): {} streams, window {}, {}",
        a.streams,
        window_name(a.window_kib),
        bin.display()
    );

    // Idle: warmed up by a few jobs and the probe itself, then read.
    for _ in 0..5 {
        exec(&mut control, request("true", None), false).await?;
    }
    let idle_probe = probe(&mut server.client(false).await?, a.probes).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_active = health(&mut control).await?.active_jobs;
    let idle = Moment::read("idle, before", &server, Some(idle_active));
    let bench_rss_idle = procfs::memory_kib(std::process::id()).0;

    let stop_sampling = CancellationToken::new();
    let _stop_on_error = stop_sampling.clone().drop_guard();
    let sampler = tokio::spawn(sample(server.pid(), SAMPLE_EVERY, stop_sampling.clone()));

    // Open the streams, one connection each, in a bounded loop.
    let t_open = Instant::now();
    let open_deadline = t_open + Duration::from_secs(a.open_timeout_secs);
    let mut held: Vec<(SandboxServiceClient<Channel>, Job)> = Vec::with_capacity(a.streams);
    let mut open_stopped = None;
    for i in 0..a.streams {
        if i % 100 == 0 {
            eprintln!("  {i}/{} streams open", a.streams);
        }
        let available = procfs::meminfo_kib("MemAvailable").unwrap_or(u64::MAX);
        if available < a.min_available_mib << 10 {
            open_stopped = Some(format!(
                "MemAvailable {:.0} MiB is below --min-available-mib",
                mib(available)
            ));
            break;
        }
        let left = open_deadline.saturating_duration_since(Instant::now());
        let command = a.command.as_deref().unwrap_or(YES_4K);
        match tokio::time::timeout(left, open_stalled(&url, a.window_kib, command)).await {
            Ok(Ok(stream)) => held.push(stream),
            Ok(Err(e)) => {
                open_stopped = Some(format!("stream {}: {e:#}", i + 1));
                break;
            }
            Err(_) => {
                open_stopped = Some(format!("--open-timeout-secs {}", a.open_timeout_secs));
                break;
            }
        }
    }
    let opened_in = t_open.elapsed();
    let opened = held.len();
    if let Some(why) = &open_stopped {
        eprintln!("  stopped opening after {opened} streams: {why}");
    }

    // Hold them, reading memory at fixed times.
    let t_held = Instant::now();
    let cpu_held = server.cpu();
    let mut moments = vec![Moment::read(
        format!(
            "all {opened} open ({:.1} s to open)",
            opened_in.as_secs_f64()
        ),
        &server,
        Some(health(&mut control).await?.active_jobs),
    )];
    let mut marks: Vec<u64> = [1, 2, 5, 10, 20, 30, 60, 120, 300, 600]
        .into_iter()
        .filter(|s| *s < a.hold_secs)
        .collect();
    marks.push(a.hold_secs);
    for second in marks {
        tokio::time::sleep_until((t_held + Duration::from_secs(second)).into()).await;
        moments.push(Moment::read(format!("held {second} s"), &server, None));
    }
    let cpu_held = {
        let (u, s) = server.cpu();
        (u - cpu_held.0, s - cpu_held.1)
    };
    let bench_rss_held = procfs::memory_kib(std::process::id()).0;

    // A new client while they are held: the probe, then what each stalled job has written.
    eprintln!("  probe while held");
    let mut newcomer = server.client(false).await?;
    let held_probe = probe(&mut newcomer, a.probes).await;
    let mut produced = Samples::new("stdout_bytes");
    let (mut running, mut status_failed) = (0, 0);
    for (_, job) in &held {
        let req = pb::StatusRequest {
            job_id: job.job_id.clone(),
        };
        match tokio::time::timeout(CALL_TIMEOUT, newcomer.status(req)).await {
            Ok(Ok(s)) => {
                let s = s.into_inner();
                produced.push(s.stdout_bytes as f64);
                running += usize::from(s.state == JobState::Running as i32);
            }
            _ => status_failed += 1,
        }
    }
    moments.push(Moment::read(
        format!(
            "held {:.0} s, after the probe",
            t_held.elapsed().as_secs_f64()
        ),
        &server,
        Some(health(&mut control).await?.active_jobs),
    ));

    // Close them all: the clients go away (their channels and streams dropped).
    let jobs: Vec<(String, u32)> = held
        .iter()
        .map(|(_, job)| (job.job_id.clone(), job.pid))
        .collect();
    drop(held);
    let t_close = Instant::now();
    stop_sampling.cancel();
    let peaks = sampler.await?;
    let closed_at = moments.len();
    moments.push(Moment::read("closed, right after", &server, None));
    let drain_wait = Duration::from_secs(a.drain_wait_secs);
    let (mut active, ended_after) = wait_idle(&mut control, drain_wait).await;
    moments.push(Moment::read(
        match ended_after {
            Some(t) => format!("closed, all jobs ended (+{:.1} s)", t.as_secs_f64()),
            None => format!("closed, jobs still running after {} s", a.drain_wait_secs),
        },
        &server,
        Some(active),
    ));
    let mut cancelled_by_us = 0;
    if active > 0 {
        // Clean up what the server did not: cancel every job, then wait again.
        for (job_id, _) in &jobs {
            let req = pb::CancelRequest {
                job_id: job_id.clone(),
            };
            if let Ok(Ok(r)) = tokio::time::timeout(CALL_TIMEOUT, control.cancel(req)).await
                && r.into_inner().state == JobState::Running as i32
            {
                cancelled_by_us += 1;
            }
        }
        let ended_after;
        (active, ended_after) = wait_idle(&mut control, drain_wait).await;
        moments.push(Moment::read(
            match ended_after {
                Some(t) => format!(
                    "after cancelling, all jobs ended (+{:.1} s)",
                    t.as_secs_f64()
                ),
                None => format!(
                    "after cancelling, still running after {} s",
                    a.drain_wait_secs
                ),
            },
            &server,
            Some(active),
        ));
    }
    tokio::time::sleep_until((t_close + Duration::from_secs(a.settle_secs)).into()).await;
    // Cleaning up can take longer than the settle time (1,000 jobs here: up to ~30 s): the row
    // says when it was read.
    let settled = Moment::read(
        format!("closed, +{:.1} s", t_close.elapsed().as_secs_f64()),
        &server,
        Some(health(&mut control).await?.active_jobs),
    );
    let mut states = std::collections::BTreeMap::<String, usize>::new();
    for (job_id, _) in &jobs {
        let req = pb::StatusRequest {
            job_id: job_id.clone(),
        };
        let state = match tokio::time::timeout(CALL_TIMEOUT, control.status(req)).await {
            Ok(Ok(s)) => JobState::try_from(s.into_inner().state)
                .map_or("unknown".into(), |s| s.as_str_name().to_owned()),
            Ok(Err(e)) => format!("Status {:?}", e.code()),
            Err(_) => "Status timed out".into(),
        };
        *states.entry(state).or_default() += 1;
    }
    let live = procfs::live_groups();
    let left_running = jobs.iter().filter(|(_, pid)| live.contains(pid)).count();
    let load_end = loadavg();
    server.stop().await;

    // The tables.
    let max_rss = peaks
        .rss
        .max(moments.iter().map(|m| m.rss).max().unwrap_or(0));
    println!(
        "### Stalled readers ({label}): {opened} unread Exec streams of 4 KiB-line `yes`, one \
         connection each, {} client windows\n",
        window_name(a.window_kib)
    );
    println!(
        "Server `{}` {}{}(job limit {limit}); opened {opened} of {} streams in {:.1} s{}; held {} s, \
         then the probe.\n",
        bin.display(),
        if args.is_empty() {
            String::new()
        } else {
            format!("`{}` ", args.join(" "))
        },
        if a.server_env.is_empty() {
            String::new()
        } else {
            format!("with `{}` ", a.server_env)
        },
        a.streams,
        opened_in.as_secs_f64(),
        open_stopped.map_or(String::new(), |why| format!(" (stopped: {why})")),
        a.hold_secs,
    );
    println!("| moment | server RSS | VmHWM | fds | active jobs (Health) |\n|---|---|---|---|---|");
    let row = |m: &Moment| {
        println!(
            "| {} | {:.1} MiB | {:.1} MiB | {} | {} |",
            m.name,
            mib(m.rss),
            mib(m.hwm),
            m.fds,
            m.active
        )
    };
    row(&idle);
    let (before_close, after_close) = moments.split_at(closed_at);
    before_close.iter().for_each(row);
    println!(
        "| **max while held** (sampled every {} ms) | **{:.1} MiB** | | {} | |",
        SAMPLE_EVERY.as_millis(),
        mib(max_rss),
        peaks.fds
    );
    after_close.iter().for_each(row);
    row(&settled);

    println!(
        "\n| new client, {} sequential calls (ms) | idle p50 | idle p99 | held p50 | held p99 | held max | p50 held/idle | failed idle/held |\n|---|---|---|---|---|---|---|---|",
        a.probes
    );
    for (name, idle, held) in [
        (
            "Exec `echo hi`, request → Exited",
            &idle_probe.echo,
            &held_probe.echo,
        ),
        ("Health", &idle_probe.health, &held_probe.health),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2}x | {}/{} |",
            idle.median(),
            idle.pct(99.0),
            held.median(),
            held.pct(99.0),
            held.pct(100.0),
            held.median() / idle.median(),
            a.probes - idle.values.len(),
            a.probes - held.values.len(),
        );
    }
    for (when, p) in [("idle", &idle_probe), ("held", &held_probe)] {
        if let Some(e) = &p.first_error {
            println!("\nFirst probe failure ({when}): {e}");
        }
    }

    let per_stream = max_rss.saturating_sub(idle.rss) as f64 / opened.max(1) as f64;
    let p = produced.sorted();
    let over_4_mib = p.iter().filter(|b| **b > 4.0 * 1048576.0).count();
    println!(
        "\nPer held stream: **{:.2} MiB** of server RSS ((max − idle) / {opened}) and {:.2} fds. \
         Each job's stdout_bytes (Status, after the probe; bytes the server read from its pipe): \
         median {:.2} MiB (min {:.2}, p10 {:.2}, p90 {:.2}, max {:.2}), {over_4_mib} jobs over \
         4 MiB, {:.2} GiB in all; {running} of {opened} running{}. The client window takes at \
         most {} of each; the rest is held by the server (or its socket).",
        per_stream / 1024.0,
        (peaks.fds.saturating_sub(idle.fds)) as f64 / opened.max(1) as f64,
        produced.median() / 1048576.0,
        p.first().unwrap_or(&f64::NAN) / 1048576.0,
        produced.pct(10.0) / 1048576.0,
        produced.pct(90.0) / 1048576.0,
        p.last().unwrap_or(&f64::NAN) / 1048576.0,
        p.iter().sum::<f64>() / (1u64 << 30) as f64,
        if status_failed > 0 {
            format!(", {status_failed} Status calls failed")
        } else {
            String::new()
        },
        window_name(a.window_kib),
    );
    println!(
        "After closing: jobs' states {}; {cancelled_by_us} cancelled by the bench; {left_running} \
         of {} jobs' process groups still alive; Health active_jobs {active}.",
        states
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect::<Vec<_>>()
            .join(", "),
        jobs.len()
    );
    println!(
        "Server CPU while held ({} s): {:.2} s user + {:.2} s sys. This process (the clients) RSS \
         {:.0} → {:.0} MiB held (max {:.0}). Machine: load average {load_start} → {load_end}, \
         MemAvailable at least {:.1} GiB.",
        a.hold_secs,
        cpu_held.0,
        cpu_held.1,
        mib(bench_rss_idle),
        mib(bench_rss_held),
        mib(peaks.bench_rss),
        peaks.min_available as f64 / 1048576.0,
    );
    println!(
        "Issue 11 targets: RSS while held < 300 MiB (256 streams) / < 400 MiB (1,000): **{:.1} \
         MiB**; {} s after closing within 64 MiB of the start: **{:+.1} MiB**; a new client as \
         fast as on an idle server: `echo hi` **{:.2}x**, Health **{:.2}x** (p50).\n",
        mib(max_rss),
        a.settle_secs,
        (settled.rss as f64 - idle.rss as f64) / 1024.0,
        held_probe.echo.median() / idle_probe.echo.median(),
        held_probe.health.median() / idle_probe.health.median(),
    );
    Ok(())
}

fn window_name(kib: Option<u32>) -> String {
    kib.map_or("default (2 MiB stream)".into(), |k| format!("{k} KiB"))
}

/// A client on its own connection starts the job and reads its `Started` event; the returned
/// job keeps the stream open and is never read again.
async fn open_stalled(
    url: &str,
    window_kib: Option<u32>,
    command: &str,
) -> anyhow::Result<(SandboxServiceClient<Channel>, Job)> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())?.connect_timeout(CALL_TIMEOUT);
    if let Some(kib) = window_kib {
        endpoint = endpoint
            .initial_stream_window_size(kib << 10)
            .initial_connection_window_size(kib << 10);
    }
    let mut client = SandboxServiceClient::new(endpoint.connect().await?);
    let job = tokio::time::timeout(
        CALL_TIMEOUT,
        Job::start(&mut client, request(command, None), Output::Count),
    )
    .await??;
    Ok((client, job))
}

struct Probe {
    echo: Samples,
    health: Samples,
    first_error: Option<String>,
}

/// `runs` sequential `echo hi` Execs (request → Exited) and Health calls, alternating; each
/// bounded by CALL_TIMEOUT, failures counted.
async fn probe(client: &mut SandboxServiceClient<Channel>, runs: usize) -> Probe {
    let mut p = Probe {
        echo: Samples::new("echo hi"),
        health: Samples::new("Health"),
        first_error: None,
    };
    for _ in 0..runs {
        let run =
            tokio::time::timeout(CALL_TIMEOUT, exec(client, request("echo hi", None), true)).await;
        match run {
            Ok(Ok(run)) if run.stdout == b"hi\n" => p.echo.push(ms(run.exited_after)),
            Ok(Ok(run)) => {
                let out = String::from_utf8_lossy(&run.stdout).into_owned();
                p.first_error
                    .get_or_insert(format!("echo hi wrote {out:?}"));
            }
            Ok(Err(e)) => {
                p.first_error.get_or_insert(format!("echo hi: {e:#}"));
            }
            Err(_) => {
                p.first_error
                    .get_or_insert(format!("echo hi: no Exited within {CALL_TIMEOUT:?}"));
            }
        }
        let t = Instant::now();
        match tokio::time::timeout(CALL_TIMEOUT, client.health(pb::HealthRequest {})).await {
            Ok(Ok(_)) => p.health.push(ms(t.elapsed())),
            Ok(Err(e)) => {
                p.first_error.get_or_insert(format!("Health: {e}"));
            }
            Err(_) => {
                p.first_error
                    .get_or_insert(format!("Health: no answer within {CALL_TIMEOUT:?}"));
            }
        }
    }
    p
}

async fn health(client: &mut SandboxServiceClient<Channel>) -> anyhow::Result<pb::HealthResponse> {
    let r = tokio::time::timeout(CALL_TIMEOUT, client.health(pb::HealthRequest {})).await??;
    Ok(r.into_inner())
}

/// Polls Health until no job is active or `wait` passed: (active jobs, when it reached 0).
async fn wait_idle(
    client: &mut SandboxServiceClient<Channel>,
    wait: Duration,
) -> (u32, Option<Duration>) {
    let t = Instant::now();
    let mut active = u32::MAX;
    while t.elapsed() < wait {
        if let Ok(h) = health(client).await {
            active = h.active_jobs;
            if active == 0 {
                return (0, Some(t.elapsed()));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (active, None)
}
