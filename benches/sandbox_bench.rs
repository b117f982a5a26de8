//! sandbox-bench: measures the service against its physical baselines.
//!
//! `cargo run --release --bin sandbox-bench -- throughput [--bytes N] [--rounds R]`
//!
//! Each comparison runs interleaved (baseline, service, baseline, service, ...) in one process so
//! a noisy machine affects both alike; results are medians with min..max, and ratios to the
//! baseline.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use sandbox_runner::{
    Config,
    proto::{self as pb, exec_event::Kind, sandbox_service_client::SandboxServiceClient},
};
use tokio::{io::AsyncReadExt, net::TcpListener, process::Command};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
#[command(about = "Benchmarks for sandbox-runner")]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Bytes of /dev/zero through Exec to a discarding client, against a plain pipe.
    Throughput {
        /// Bytes per run.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// Runs of each variant.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().bench {
        Bench::Throughput { bytes, rounds } => throughput(bytes, rounds).await,
    }
}

async fn start_server(extra: &[&str]) -> anyhow::Result<String> {
    let mut argv = vec!["sandbox-runner", "--host", "127.0.0.1"];
    argv.extend_from_slice(extra);
    let config = Config::try_parse_from(argv)?;
    config.validate()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(sandbox_runner::run(
        listener,
        config,
        std::future::pending(),
    ));
    Ok(format!("http://{addr}"))
}

/// A client as users get it by default, and one tuned for bulk streaming (large frames and
/// windows; see research/tonic-throughput.md).
async fn connect(addr: &str, tuned: bool) -> anyhow::Result<SandboxServiceClient<Channel>> {
    let mut endpoint = Endpoint::from_shared(addr.to_owned())?;
    if tuned {
        endpoint = endpoint
            .initial_stream_window_size(16 << 20)
            .initial_connection_window_size(32 << 20)
            .max_frame_size(1 << 20);
    }
    Ok(SandboxServiceClient::new(endpoint.connect().await?).max_decoding_message_size(8 << 20))
}

/// Runs `command` through Exec and returns the output bytes received (discarded).
async fn exec_count(
    client: &mut SandboxServiceClient<Channel>,
    command: &str,
) -> anyhow::Result<u64> {
    let mut stream = client
        .exec(pb::ExecRequest {
            command: command.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut received = 0;
    while let Some(event) = stream.message().await? {
        match event.kind {
            Some(Kind::Output(out)) => received += out.data.len() as u64,
            Some(Kind::Exited(exited)) => anyhow::ensure!(
                exited.stdout_bytes + exited.stderr_bytes == received
                    && exited.exit_code == Some(0),
                "bad exit: {exited:?}"
            ),
            _ => {}
        }
    }
    Ok(received)
}

/// The same bytes through a pipe into this process, read in 1 MiB reads: the physical baseline.
async fn pipe_count(command: &str) -> anyhow::Result<u64> {
    let mut child = Command::new("/bin/sh")
        .args(["-c", command])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut buf = vec![0u8; 1 << 20];
    let mut received = 0;
    loop {
        let n = stdout.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        received += n as u64;
    }
    anyhow::ensure!(child.wait().await?.success());
    Ok(received)
}

struct Samples {
    name: String,
    gbps: Vec<f64>,
}

impl Samples {
    fn new(name: &str) -> Self {
        Samples {
            name: name.into(),
            gbps: Vec::new(),
        }
    }

    fn push(&mut self, bytes: u64, took: Duration) {
        self.gbps.push(bytes as f64 / took.as_secs_f64() / 1e9);
    }

    fn median(&self) -> f64 {
        let mut sorted = self.gbps.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }

    fn report(&self, baseline: Option<&Samples>) {
        let min = self.gbps.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.gbps.iter().copied().fold(0.0, f64::max);
        let ratio = baseline.map_or(String::from("baseline"), |b| {
            format!("{:.2}x baseline", self.median() / b.median())
        });
        println!(
            "| {:<40} | {:>6.2} GB/s | {:.2}..{:.2} | {} |",
            self.name,
            self.median(),
            min,
            max,
            ratio
        );
    }
}

async fn throughput(bytes: u64, rounds: usize) -> anyhow::Result<()> {
    let addr = start_server(&[]).await?;
    let mut default_client = connect(&addr, false).await?;
    let mut tuned_client = connect(&addr, true).await?;
    let command = format!("head -c {bytes} /dev/zero");
    let interleaved = format!(
        "head -c {half} /dev/zero & head -c {half} /dev/zero >&2; wait",
        half = bytes / 2
    );

    let mut pipe = Samples::new("pipe: head | reader (no service)");
    let mut exec_default = Samples::new("Exec, default tonic client");
    let mut exec_tuned = Samples::new("Exec, tuned client (1 MiB frames)");
    let mut exec_mixed = Samples::new("Exec, stdout+stderr interleaved, tuned");
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        let t = Instant::now();
        let n = pipe_count(&command).await?;
        pipe.push(n, t.elapsed());

        let t = Instant::now();
        let n = exec_count(&mut default_client, &command).await?;
        exec_default.push(n, t.elapsed());

        let t = Instant::now();
        let n = exec_count(&mut tuned_client, &command).await?;
        exec_tuned.push(n, t.elapsed());

        let t = Instant::now();
        let n = exec_count(&mut tuned_client, &interleaved).await?;
        exec_mixed.push(n, t.elapsed());
    }
    println!("\nthroughput: {bytes} bytes per run, {rounds} rounds, median and min..max\n");
    println!("| variant | median | range | ratio |\n|---|---|---|---|");
    pipe.report(None);
    for s in [&exec_default, &exec_tuned, &exec_mixed] {
        s.report(Some(&pipe));
    }
    Ok(())
}
