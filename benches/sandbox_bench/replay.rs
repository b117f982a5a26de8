//! Replay and watchers (issue 12): the time from Attach to the first replayed byte, the
//! replay throughput of a large finished log against live Exec, and many watchers on one job
//! writing flat out (server memory, the job's throughput against a single reader's).

use std::time::{Duration, Instant};

use sandbox_runner::{
    proto::{self as pb, exec_event::Kind, sandbox_service_client::SandboxServiceClient},
    testing::{
        contract::{Job, Output, attach_open},
        procfs,
    },
};
use tonic::transport::Channel;

use crate::{
    harness::{Server, exec, request},
    stats::{Samples, gbps, mib, ms},
};

#[derive(clap::Args, Clone)]
pub(crate) struct ReplayArgs {
    /// Size of the finished log that is replayed, in MiB.
    #[arg(long, default_value_t = 256)]
    log_mib: u64,
    /// Replays (and live Execs of the same size), interleaved.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Attaches timed to their first replayed byte.
    #[arg(long, default_value_t = 200)]
    attaches: usize,
    /// Watchers of one job (each on its own connection), besides its Exec caller.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// What the watched job writes, in MiB.
    #[arg(long, default_value_t = 256)]
    watched_mib: u64,
    /// Extra flags of the watched job's server, as one string (e.g. to try
    /// `--watchers-bytes-per-sec`).
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    watched_server_args: String,
}

async fn attach(
    client: &mut SandboxServiceClient<Channel>,
    job_id: &str,
    lossless: bool,
) -> anyhow::Result<tonic::Streaming<pb::ExecEvent>> {
    Ok(client
        .attach(tokio_stream::iter([attach_open(
            job_id,
            None,
            pb::GapPolicy::Report,
            lossless,
        )]))
        .await?
        .into_inner())
}

/// Starts a detached job, drops its stream, and waits (bounded) for it to finish.
async fn finished_job(
    client: &mut SandboxServiceClient<Channel>,
    command: &str,
) -> anyhow::Result<pb::StatusResponse> {
    let req = pb::ExecRequest {
        on_disconnect: pb::DisconnectPolicy::Detach as i32,
        ..request(command, None)
    };
    let job = Job::start(client, req, Output::Count).await?;
    let (id, _) = job.disconnect();
    for _ in 0..6000 {
        let status = client
            .status(pb::StatusRequest { job_id: id.clone() })
            .await?
            .into_inner();
        if status.state != pb::JobState::Running as i32 {
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("job {id} did not finish in 60 s")
}

pub(crate) async fn replay(a: ReplayArgs) -> anyhow::Result<()> {
    let log_bytes = a.log_mib << 20;
    let server = Server::spawn(
        &[
            "--job-log-bytes",
            &(log_bytes + (1 << 20)).to_string(),
            "--job-log-events",
            "1048576",
            "--output-budget-bytes",
            &(3 * log_bytes + (64 << 20)).to_string(),
            // A finished log is kept whole only within the retained bound, which counts the
            // read buffers its chunks occupy (up to 4x a chunk; about 1x for /dev/zero).
            "--retained-output-bytes",
            &(2 * log_bytes).to_string(),
        ],
        &[],
    )
    .await?;
    let mut client = server.client(true).await?;
    let command = format!("head -c {log_bytes} /dev/zero");
    let status = finished_job(&mut client, &command).await?;
    let log = status.log.unwrap_or_default();
    anyhow::ensure!(
        log.held_bytes == log_bytes,
        "the log holds {} of {log_bytes} bytes",
        log.held_bytes
    );

    // Attach → first replayed byte, on a small finished job read to its end (dropping a
    // stream early resets it, and a client that resets hundreds of streams on one connection
    // is told to calm down by its own HTTP/2 library).
    let small = finished_job(&mut client, "head -c 65536 /dev/zero").await?;
    let mut first_byte = Samples::new("Attach from the start → first Output");
    for _ in 0..a.attaches {
        let t0 = Instant::now();
        let mut stream = attach(&mut client, &small.job_id, true).await?;
        let mut first = None;
        while let Some(event) = stream.message().await? {
            if let (Some(Kind::Output(_)), None) = (&event.kind, first) {
                first = Some(t0.elapsed());
            }
        }
        first_byte.push(ms(
            first.ok_or_else(|| anyhow::anyhow!("no output replayed"))?
        ));
    }

    // Replay of the whole log against a live Exec of the same size, on a server of its own (its
    // finished jobs would push the replayed log out of the retained bound).
    let live_server = Server::spawn(&[], &[]).await?;
    let mut live_client = live_server.client(true).await?;
    let mut replayed = Samples::new(format!("Attach replay of a finished {} MiB log", a.log_mib));
    let mut live = Samples::new(format!("live Exec of {} MiB", a.log_mib));
    for round in 0..a.rounds {
        eprintln!("replay round {}/{}", round + 1, a.rounds);
        let t0 = Instant::now();
        let stream = attach(&mut client, &status.job_id, true).await?;
        let run = Job::resume(stream, Output::Count, None, [0, 0])
            .await?
            .finish()
            .await?;
        anyhow::ensure!(run.bytes() == log_bytes && run.gaps.is_empty());
        replayed.push(gbps(run.bytes(), t0.elapsed()));
        let t0 = Instant::now();
        let run = exec(&mut live_client, request(&command, None), false).await?;
        live.push(gbps(run.bytes(), t0.elapsed()));
    }
    server.stop().await;
    live_server.stop().await;

    // Watchers of one job writing flat out, at the default limits; rounds with its caller alone
    // interleaved with rounds with the watchers.
    let server_args: Vec<&str> = a.watched_server_args.split_whitespace().collect();
    let server = Server::spawn(&server_args, &[]).await?;
    let watched = a.watched_mib << 20;
    let command = format!("head -c {watched} /dev/zero");
    let mut caller = server.client(true).await?;
    let mut single = Samples::new("the job, one reader (its Exec caller)");
    let run = exec(&mut caller, request(&command, None), false).await?;
    single.push(gbps(run.bytes(), run.exited_after));
    let (idle_rss, _) = server.memory();
    let mut watcher_clients = Vec::new();
    for _ in 0..a.watchers {
        watcher_clients.push(server.client(true).await?);
    }
    let mut watched_runs = Samples::new(format!("the job, with {} watchers", a.watchers));
    let mut peak_rss = idle_rss;
    let mut watcher_rates = Samples::new("each watcher, MiB/s (bytes received / its time)");
    let (mut gaps, mut lost) = (0usize, 0u64);
    for round in 0..a.rounds {
        eprintln!("watchers round {}/{}", round + 1, a.rounds);
        let job = Job::start(&mut caller, request(&command, None), Output::Count).await?;
        let id = job.job_id.clone();
        let mut tasks = tokio::task::JoinSet::new();
        for client in &watcher_clients {
            let mut client = client.clone();
            let id = id.clone();
            tasks.spawn(async move {
                let stream = attach(&mut client, &id, false).await?;
                Job::resume(stream, Output::Count, None, [0, 0])
                    .await?
                    .finish()
                    .await
            });
        }
        let done = tokio_util::sync::CancellationToken::new();
        let sampler = tokio::spawn({
            let (pid, done) = (server.pid(), done.clone());
            async move {
                let mut peak = 0;
                while !done.is_cancelled() {
                    peak = peak.max(procfs::memory_kib(pid).0);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                peak
            }
        });
        let run = job.finish().await?;
        watched_runs.push(gbps(run.bytes(), run.exited_after));
        if round + 1 < a.rounds {
            let run = exec(&mut caller, request(&command, None), false).await?;
            single.push(gbps(run.bytes(), run.exited_after));
        }
        while let Some(watcher) = tasks.join_next().await {
            let watcher = watcher??;
            let lost_here: u64 = watcher.gaps.iter().map(|g| g.lost_stdout_bytes).sum();
            anyhow::ensure!(
                watcher.exited.stdout_bytes == watched,
                "a watcher's Exited says {} bytes",
                watcher.exited.stdout_bytes
            );
            gaps += watcher.gaps.len();
            lost += lost_here;
            watcher_rates.push(
                gbps(
                    watched - lost_here,
                    watcher.exited_after.max(Duration::from_millis(1)),
                ) * 1e9
                    / (1 << 20) as f64,
            );
        }
        done.cancel();
        let peak = sampler.await?;
        peak_rss = peak_rss.max(peak);
    }
    server.stop().await;

    println!(
        "### Replay and watchers: a {} MiB finished log, {} attaches, {} watchers of a {} MiB job, {} rounds\n",
        a.log_mib, a.attaches, a.watchers, a.watched_mib, a.rounds
    );
    println!("| measure | p50 | p99 | min..max |\n|---|---|---|---|");
    println!(
        "| {} (ms) | {:.2} | {:.2} | {:.2}..{:.2} |",
        first_byte.name,
        first_byte.median(),
        first_byte.pct(99.0),
        first_byte.pct(0.0),
        first_byte.pct(100.0)
    );
    println!("\n| throughput | median | min..max | ratio |\n|---|---|---|---|");
    replayed.rate_row(Some(&live), None);
    live.rate_row(None, None);
    watched_runs.rate_row(Some(&single), None);
    single.rate_row(None, None);
    println!(
        "| {} | {:.2} | {:.2}..{:.2} | all together {:.1} MiB/s |",
        watcher_rates.name,
        watcher_rates.median(),
        watcher_rates.pct(0.0),
        watcher_rates.pct(100.0),
        watcher_rates.median() * a.watchers as f64
    );
    println!(
        "\nServer RSS with {} watchers: idle {:.1} MiB, peak {:.1} MiB (sampled every 100 ms): \
         **{:+.1} MiB**; the output budget is 64 MiB. Watchers that fell a full log behind: \
         {gaps} gaps, {:.1} MiB reported lost in all (watchers never slow the job; each gap \
         says what it missed).\n",
        a.watchers,
        mib(idle_rss),
        mib(peak_rss),
        mib(peak_rss) - mib(idle_rss),
        lost as f64 / (1 << 20) as f64
    );
    Ok(())
}
