//! Mirror: the Convex mirror against a local ingest receiver: throughput cost, requests
//! per MiB, lag.

use std::time::{Duration, Instant};

use sandbox_runner::{
    proto as pb,
    testing::convex_ingest::{FakeIngest, Keep},
};

use crate::{
    harness::{Server, exec, request},
    stats::{Samples, gbps},
};

#[derive(clap::Args, Clone)]
pub(crate) struct MirrorArgs {
    /// Bytes per throughput run.
    #[arg(long, default_value_t = 256 << 20)]
    bytes: u64,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Timestamped lines written for the lag measurement.
    #[arg(long, default_value_t = 500)]
    lines: usize,
}

/// The secret the fake ingest route and the mirrored server share.
const SECRET: &str = "bench-secret";

/// A request the Convex mirror takes: it keys rows by task and session.
fn mirrored_request(command: &str) -> pb::ExecRequest {
    pb::ExecRequest {
        task_id: "bench-task".into(),
        session_id: "bench-session".into(),
        ..request(command, None)
    }
}

pub(crate) async fn mirror(a: MirrorArgs) -> anyhow::Result<()> {
    // Counts only: the runs mirror hundreds of MiB.
    let ingest = FakeIngest::start_keeping(SECRET, Keep::Counts).await;
    let url = ingest.site_url();
    let plain = Server::spawn(&[], &[]).await?;
    let mirrored = Server::spawn(
        &[],
        &[
            ("CONVEX_SITE_URL", url.as_str()),
            ("CONVEX_INGEST_SECRET", SECRET),
        ],
    )
    .await?;
    let mut plain_client = plain.client(true).await?;
    let mut mirror_client = mirrored.client(true).await?;
    println!("### Mirror: Convex sink against a loopback ingest receiver\n");
    let health = mirror_client
        .health(pb::HealthRequest {})
        .await?
        .into_inner();
    if !health.convex_configured || health.sinks.is_empty() {
        println!("| measure | result |\n|---|---|");
        for row in [
            "throughput with the mirror on, ratio to off",
            "HTTP requests per MiB mirrored",
            "write → receipt lag p50 / p99",
        ] {
            println!("| {row} | pending the mirror sink (this build has no Convex sink) |");
        }
        println!();
        plain.stop().await;
        mirrored.stop().await;
        return Ok(());
    }

    // Text output, so the mirror carries it as is: 128-byte lines.
    let command = format!("yes {} | head -c {}", "x".repeat(127), a.bytes);
    let mut off = Samples::new("Exec, mirror off");
    let mut on = Samples::new("Exec, mirror on");
    let before = ingest.requests();
    let before_bytes = ingest.data_bytes();
    let before_gaps = ingest.gap_markers();
    for round in 0..a.rounds {
        eprintln!("mirror round {}/{}", round + 1, a.rounds);
        let t = Instant::now();
        let r = exec(&mut plain_client, mirrored_request(&command), false).await?;
        off.push(gbps(r.bytes(), t.elapsed()));
        let t = Instant::now();
        let r = exec(&mut mirror_client, mirrored_request(&command), false).await?;
        on.push(gbps(r.bytes(), t.elapsed()));
    }
    // Let the sink finish delivering.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let requests = ingest.requests() - before;
    let mirrored_bytes = ingest.data_bytes() - before_bytes;
    let gaps = ingest.gap_markers() - before_gaps;

    let lag_cmd = format!(
        "for i in $(seq {}); do echo T$(date +%s%N); sleep 0.005; done",
        a.lines
    );
    exec(&mut mirror_client, mirrored_request(&lag_cmd), false).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut lag = Samples::new("write → receipt lag");
    lag.values = ingest.lags_ms();

    println!("| variant | median | min..max | ratio | |\n|---|---|---|---|---|");
    off.rate_row(None, None);
    on.rate_row(Some(&off), None);
    let produced = a.bytes * a.rounds as u64;
    let mirrored_mib = mirrored_bytes as f64 / 1048576.0;
    println!(
        "\nRequests: {requests} for {:.0} MiB written ({mirrored_mib:.0} MiB mirrored): {:.2} \
         requests per MiB written, {:.1} per MiB mirrored ({gaps} of them gap markers; \
         {:.1} output records per MiB mirrored).",
        produced as f64 / 1048576.0,
        requests as f64 / (produced as f64 / 1048576.0),
        requests as f64 / mirrored_mib,
        (requests - gaps) as f64 / mirrored_mib,
    );
    println!(
        "Lag over {} of {} lines: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms.\n",
        lag.values.len(),
        a.lines,
        lag.median(),
        lag.pct(99.0),
        lag.pct(100.0)
    );
    plain.stop().await;
    mirrored.stop().await;
    Ok(())
}
