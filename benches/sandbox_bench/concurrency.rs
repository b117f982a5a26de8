//! Concurrency: many concurrent `sleep 2; echo done` jobs: correctness, server memory and fds.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sandbox_runner::testing::procfs;

use crate::{
    harness::{SANDBOX, Server, daytona_server, exec, fake_daytona, request},
    stats::mib,
};

#[derive(clap::Args, Clone)]
pub(crate) struct ConcurrencyArgs {
    /// Concurrent jobs on the local backend.
    #[arg(long, default_value_t = 1000)]
    local: usize,
    /// Concurrent jobs through the Daytona fake.
    #[arg(long, default_value_t = 5000)]
    daytona: usize,
}

/// Peak fds of this process (client, and the Daytona fake with its jobs' pipes).
static BENCH_FDS_PEAK: AtomicU64 = AtomicU64::new(0);

/// Samples the server's RSS and fds until stopped; returns (peak RSS KiB, peak fds).
fn watch(server: &Server) -> (tokio::task::JoinHandle<(u64, usize)>, Arc<AtomicU64>) {
    let stop = Arc::new(AtomicU64::new(0));
    let pid = server.pid();
    let handle = tokio::spawn({
        let stop = Arc::clone(&stop);
        async move {
            let (mut rss, mut fds) = (0, 0);
            while stop.load(Ordering::Relaxed) == 0 {
                let own = procfs::fd_count(std::process::id());
                BENCH_FDS_PEAK.fetch_max(own as u64, Ordering::Relaxed);
                rss = rss.max(procfs::memory_kib(pid).0);
                fds = fds.max(procfs::fd_count(pid));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (rss, fds)
        }
    });
    (handle, stop)
}

pub(crate) async fn concurrency(a: ConcurrencyArgs) -> anyhow::Result<()> {
    println!("### Concurrency: `sleep 2; echo done` jobs started at once over one connection\n");
    println!(
        "| backend | jobs | all correct | wall | server RSS idle → peak | per stream | fds idle → peak | fds per stream |\n|---|---|---|---|---|---|---|---|"
    );
    let limit = (a.local.max(a.daytona) + 100).to_string();
    let server = Server::spawn(&["--max-concurrent-jobs", &limit], &[]).await?;
    concurrency_run(&server, "local", a.local, None).await?;
    server.stop().await;

    let fake = fake_daytona().await;
    let server = daytona_server(&fake, &["--max-concurrent-jobs", &limit]).await?;
    concurrency_run(&server, "daytona (fake)", a.daytona, Some(SANDBOX)).await?;
    server.stop().await;
    println!();
    Ok(())
}

async fn concurrency_run(
    server: &Server,
    name: &str,
    jobs: usize,
    sandbox: Option<&str>,
) -> anyhow::Result<()> {
    let client = server.client(false).await?;
    // One warm-up job so lazily built state (connection pools, TLS config) is in the idle figure.
    exec(&mut client.clone(), request("true", sandbox), false).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle_rss, _) = server.memory();
    let idle_fds = server.fds();
    let (watcher, stop) = watch(server);
    eprintln!("concurrency {name}: {jobs} jobs");
    let t = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..jobs {
        let mut client = client.clone();
        let req = request("sleep 2; echo done", sandbox);
        set.spawn(async move { exec(&mut client, req, true).await });
    }
    let (mut ok, mut failed) = (0, Vec::new());
    while let Some(r) = set.join_next().await {
        // Both streams, in arrival order.
        let output = r?.map(|r| {
            r.chunks
                .into_iter()
                .flat_map(|(_, data)| data)
                .collect::<Vec<_>>()
        });
        match output {
            Ok(output) if output == b"done\n" => ok += 1,
            Ok(output) => failed.push(format!("output {:?}", String::from_utf8_lossy(&output))),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    let wall = t.elapsed();
    stop.store(1, Ordering::Relaxed);
    let (peak_rss, peak_fds) = watcher.await?;
    // VmHWM: the true peak between samples (this server ran nothing bigger before).
    let peak_rss = peak_rss.max(server.memory().1);
    if !failed.is_empty() {
        println!(
            "\n{} failed, e.g. {}; this process (client + fake) peaked at {} fds of its limit {}\n",
            failed.len(),
            failed[0],
            BENCH_FDS_PEAK.load(Ordering::Relaxed),
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map_or(0, |l| l.0)
        );
    }
    println!(
        "| {name} | {jobs} | {ok}/{jobs} | {:.2} s | {:.1} → {:.1} MiB | {:.1} KiB | {idle_fds} → {peak_fds} | {:.2} |",
        wall.as_secs_f64(),
        mib(idle_rss),
        mib(peak_rss),
        (peak_rss.saturating_sub(idle_rss)) as f64 / jobs as f64,
        (peak_fds.saturating_sub(idle_fds)) as f64 / jobs as f64,
    );
    Ok(())
}
