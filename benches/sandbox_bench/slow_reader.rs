//! Slow reader: a client reading ~1 KiB/s while the job writes without limit: server
//! RSS and throttling.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use sandbox_runner::proto::{
    self as pb, exec_event::Kind, sandbox_service_client::SandboxServiceClient,
};
use tonic::transport::Channel;

use crate::{
    harness::{Server, exec, request},
    stats::mib,
};

#[derive(clap::Args, Clone)]
pub(crate) struct SlowReaderArgs {
    /// How long the slow client reads.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

pub(crate) async fn slow_reader(a: SlowReaderArgs) -> anyhow::Result<()> {
    let server = Server::spawn(&[], &[]).await?;
    let mut client = server.client(false).await?;
    let mut status_client = server.client(false).await?;
    exec(&mut client, request("true", None), false).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (idle_rss, _) = server.memory();
    eprintln!("slow reader: {} s", a.seconds);

    let t0 = Instant::now();
    let mut stream = client
        .exec(request("cat /dev/zero", None))
        .await?
        .into_inner();
    let Some(pb::ExecEvent {
        job_id,
        kind: Some(Kind::Started(_)),
        ..
    }) = stream.message().await?
    else {
        anyhow::bail!("no Started event");
    };
    let deadline = t0 + Duration::from_secs(a.seconds);
    let received = Arc::new(AtomicU64::new(0));
    // Reads at ~1 KiB/s on average: after each message of n bytes, pauses n/1024 seconds.
    let reader = tokio::spawn({
        let received = Arc::clone(&received);
        async move {
            while let Ok(Some(event)) = stream.message().await {
                if let Some(Kind::Output(out)) = event.kind {
                    received.fetch_add(out.data.len() as u64, Ordering::Relaxed);
                    let pause = Duration::from_secs_f64(out.data.len() as f64 / 1024.0);
                    tokio::time::sleep(pause).await;
                }
            }
        }
    });
    let status = |job_id: String, mut c: SandboxServiceClient<Channel>| async move {
        let s = c.status(pb::StatusRequest { job_id }).await?.into_inner();
        anyhow::Ok(s.stdout_bytes)
    };
    let mut samples = Vec::new(); // (seconds, rss KiB, stdout_bytes)
    let mut peak = 0;
    for second in [1u64, 5, 10, 20, 30, 40, 50, 60, 90, 120, 300] {
        if second > a.seconds {
            break;
        }
        tokio::time::sleep_until((t0 + Duration::from_secs(second)).into()).await;
        let (rss, _) = server.memory();
        peak = peak.max(rss);
        let produced = status(job_id.clone(), status_client.clone()).await?;
        samples.push((second, rss, produced));
    }
    tokio::time::sleep_until(deadline.into()).await;
    let (end_rss, hwm) = server.memory();
    samples.retain(|(s, ..)| *s < a.seconds);
    let produced_end = status(job_id.clone(), status_client.clone()).await?;
    reader.abort();
    let got = received.load(Ordering::Relaxed);
    let _ = status_client.cancel(pb::CancelRequest { job_id }).await;

    println!(
        "### Slow reader: `cat /dev/zero`, client reading ~1 KiB/s for {} s\n",
        a.seconds
    );
    println!("| t | server RSS | job's stdout_bytes (Status) |\n|---|---|---|");
    println!("| idle | {:.1} MiB | - |", mib(idle_rss));
    for (s, rss, produced) in &samples {
        println!(
            "| {s} s | {:.1} MiB | {:.2} MiB |",
            mib(*rss),
            *produced as f64 / 1048576.0
        );
    }
    println!(
        "| {} s | {:.1} MiB | {:.2} MiB |",
        a.seconds,
        mib(end_rss),
        produced_end as f64 / 1048576.0
    );
    println!(
        "\nRSS growth over the run: {:.1} MiB (idle → end), peak sampled {:.1} MiB, VmHWM {:.1} MiB; \
         the client received {:.2} MiB; the job produced {:.2} MiB in total (a free-running \
         `cat /dev/zero` writes GB/s).\n",
        mib(end_rss.saturating_sub(idle_rss)),
        mib(peak.max(end_rss)),
        mib(hwm),
        got as f64 / 1048576.0,
        produced_end as f64 / 1048576.0
    );
    server.stop().await;
    Ok(())
}
