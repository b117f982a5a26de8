//! Mirror: the Convex mirror against a local ingest receiver: throughput cost, requests
//! per MiB, lag.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use sandbox_runner::proto as pb;

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

/// A loopback stand-in for the Convex `/daytona-ingest` route: counts requests and bytes, and
/// measures lag from `T<unix nanos>` tokens that jobs write.
#[derive(Default)]
struct Ingest {
    requests: AtomicU64,
    /// Requests that carried a `[... N bytes not mirrored ...]` gap marker.
    gap_markers: AtomicU64,
    data_bytes: AtomicU64,
    lags_ms: Mutex<Vec<f64>>,
}

async fn ingest_receiver() -> anyhow::Result<(String, Arc<Ingest>)> {
    use axum::{Json, Router, extract::State, routing::post};
    let state = Arc::new(Ingest::default());
    async fn ingest(
        State(state): State<Arc<Ingest>>,
        Json(body): Json<serde_json::Value>,
    ) -> Json<serde_json::Value> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        state.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(data) = body["data"].as_str() {
            if data.starts_with("\n[... ") && data.ends_with(" bytes not mirrored ...]\n") {
                state.gap_markers.fetch_add(1, Ordering::Relaxed);
                return Json(serde_json::json!({ "success": true }));
            }
            state
                .data_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            // Bulk text has no tokens: skip the per-byte split (the receiver stands in for a
            // remote Convex; its CPU here would be charged to the mirror).
            if !data.contains('T') {
                return Json(serde_json::json!({ "success": true }));
            }
            let mut lags = state.lags_ms.lock().unwrap();
            for token in data.split_whitespace() {
                if let Some(ns) = token.strip_prefix('T').and_then(|t| t.parse::<u128>().ok()) {
                    lags.push((now.as_nanos().saturating_sub(ns)) as f64 / 1e6);
                }
            }
        }
        Json(serde_json::json!({ "success": true }))
    }
    let app = Router::new()
        .route("/daytona-ingest", post(ingest))
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}"), state))
}

/// A request the Convex mirror takes: it keys rows by task and session.
fn mirrored_request(command: &str) -> pb::ExecRequest {
    pb::ExecRequest {
        task_id: "bench-task".into(),
        session_id: "bench-session".into(),
        ..request(command, None)
    }
}

pub(crate) async fn mirror(a: MirrorArgs) -> anyhow::Result<()> {
    let (url, ingest) = ingest_receiver().await?;
    let plain = Server::spawn(&[], &[]).await?;
    let mirrored = Server::spawn(
        &[],
        &[
            ("CONVEX_SITE_URL", url.as_str()),
            ("CONVEX_INGEST_SECRET", "bench-secret"),
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
    let before = ingest.requests.load(Ordering::Relaxed);
    let before_bytes = ingest.data_bytes.load(Ordering::Relaxed);
    let before_gaps = ingest.gap_markers.load(Ordering::Relaxed);
    for round in 0..a.rounds {
        eprintln!("mirror round {}/{}", round + 1, a.rounds);
        let t = Instant::now();
        let r = exec(&mut plain_client, mirrored_request(&command), false).await?;
        off.push(gbps(r.bytes, t.elapsed()));
        let t = Instant::now();
        let r = exec(&mut mirror_client, mirrored_request(&command), false).await?;
        on.push(gbps(r.bytes, t.elapsed()));
    }
    // Let the sink finish delivering.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let requests = ingest.requests.load(Ordering::Relaxed) - before;
    let mirrored_bytes = ingest.data_bytes.load(Ordering::Relaxed) - before_bytes;
    let gaps = ingest.gap_markers.load(Ordering::Relaxed) - before_gaps;

    let lag_cmd = format!(
        "for i in $(seq {}); do echo T$(date +%s%N); sleep 0.005; done",
        a.lines
    );
    exec(&mut mirror_client, mirrored_request(&lag_cmd), false).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut lag = Samples::new("write → receipt lag");
    lag.values = ingest.lags_ms.lock().unwrap().clone();

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
