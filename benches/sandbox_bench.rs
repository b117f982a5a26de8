//! sandbox-bench: measures the service against its physical baselines (see BENCHMARKS.md).
//!
//! ```sh
//! cargo run --release --features testing --bin sandbox-bench -- all
//! cargo run --release --features testing --bin sandbox-bench -- throughput|latency|concurrency|slow-reader|mirror
//! ```
//!
//! The server under test is the real `sandbox-runner` binary, run as a child process so its
//! memory and file descriptors are read from /proc apart from the client's. Under `cargo run` the
//! harness builds it first (same profile and features); otherwise it is expected next to this
//! executable, or at `$SANDBOX_RUNNER_BIN`.
//!
//! Each comparison runs interleaved (baseline, service, baseline, service, ...) in one process so
//! a noisy machine affects both alike; results are medians (or percentiles) with their spread, and
//! ratios to the baseline.

use std::{
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::{Parser, Subcommand};
use sandbox_runner::{
    proto::{self as pb, exec_event::Kind, sandbox_service_client::SandboxServiceClient},
    testing::daytona::FakeDaytona,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, BufReader},
    process::{Child, Command},
};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
#[command(about = "Benchmarks for sandbox-runner (see BENCHMARKS.md)")]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Every benchmark below with its defaults.
    All,
    /// Bytes of /dev/zero through Exec to a discarding client, against a plain pipe.
    Throughput(ThroughputArgs),
    /// Request→Exited for `true` and time to first output for `echo hi`, against direct spawns.
    Latency(LatencyArgs),
    /// Many concurrent `sleep 2; echo done` jobs: correctness, server memory and fds.
    Concurrency(ConcurrencyArgs),
    /// A client reading ~1 KiB/s while the job writes without limit: server RSS and throttling.
    SlowReader(SlowReaderArgs),
    /// The Convex mirror against a local ingest receiver: throughput cost, requests/MiB, lag.
    Mirror(MirrorArgs),
    /// Two server binaries (before/after a change) interleaved: latency and throughput.
    Compare(CompareArgs),
}

#[derive(clap::Args, Clone)]
struct CompareArgs {
    /// The server binary before the change.
    #[arg(long)]
    before: PathBuf,
    /// The server binary after the change (default: the current one).
    #[arg(long)]
    after: Option<PathBuf>,
    /// Extra server flags for the "after" server, as one string (e.g. to try a setting).
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    after_args: String,
    /// Extra environment of the "after" server, as `K=V K2=V2`.
    #[arg(long, default_value = "")]
    after_env: String,
    /// Sequential latency runs of each.
    #[arg(long, default_value_t = 300)]
    runs: usize,
    /// Bytes per throughput run.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(clap::Args, Clone)]
struct ThroughputArgs {
    /// Bytes per run (local backend).
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Bytes per run through the Daytona fake (it frames the log in 1 KiB WebSocket messages).
    #[arg(long, default_value_t = 64 << 20)]
    daytona_bytes: u64,
    /// Runs of each variant.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

#[derive(clap::Args, Clone)]
struct LatencyArgs {
    /// Sequential runs of each local variant.
    #[arg(long, default_value_t = 1000)]
    runs: usize,
    /// Sequential runs of each Daytona variant (each waits on the fake's polling).
    #[arg(long, default_value_t = 100)]
    daytona_runs: usize,
}

#[derive(clap::Args, Clone)]
struct ConcurrencyArgs {
    /// Concurrent jobs on the local backend.
    #[arg(long, default_value_t = 1000)]
    local: usize,
    /// Concurrent jobs through the Daytona fake.
    #[arg(long, default_value_t = 5000)]
    daytona: usize,
}

#[derive(clap::Args, Clone)]
struct SlowReaderArgs {
    /// How long the slow client reads.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

#[derive(clap::Args, Clone)]
struct MirrorArgs {
    /// Bytes per throughput run.
    #[arg(long, default_value_t = 256 << 20)]
    bytes: u64,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Timestamped lines written for the lag measurement.
    #[arg(long, default_value_t = 500)]
    lines: usize,
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
                mirror(parse_args::<MirrorArgs>()).await
            }
            Bench::Throughput(a) => throughput(a).await,
            Bench::Latency(a) => latency(a).await,
            Bench::Concurrency(a) => concurrency(a).await,
            Bench::SlowReader(a) => slow_reader(a).await,
            Bench::Mirror(a) => mirror(a).await,
            Bench::Compare(a) => compare(a).await,
        }
    })
}

/// Default arguments of one benchmark, for `all`.
fn parse_args<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults"));
    T::from_arg_matches(&cmd.get_matches_from(["defaults"])).expect("defaults parse")
}

// ---------------------------------------------------------------------------------------------
// Environment: fd limit, the server binary, the machine.

/// 5,000 Daytona jobs need ~3 fds each in the fake (in this process) and ~2 in the server;
/// the soft limit is raised to the hard one here and inherited by the server.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn server_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("SANDBOX_RUNNER_BIN") {
        return PathBuf::from(path);
    }
    std::env::current_exe()
        .expect("own path")
        .with_file_name("sandbox-runner")
}

/// Under `cargo run`, builds the server binary with the same profile and features.
fn ensure_server_built() -> anyhow::Result<()> {
    if std::env::var_os("SANDBOX_RUNNER_BIN").is_some() {
        return Ok(());
    }
    if let Some(cargo) = std::env::var_os("CARGO") {
        let mut cmd = std::process::Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "--features",
            "testing",
            "--bin",
            "sandbox-runner",
        ]);
        // `cargo run` exports these to us; passed on, some build scripts (ring's tracks
        // CARGO_MANIFEST_DIR) would see a changed environment and rebuild half the tree.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_",
            ]
            .iter()
            .any(|p| name.starts_with(p))
                || name == "OUT_DIR"
            {
                cmd.env_remove(name.as_ref());
            }
        }
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        anyhow::ensure!(cmd.status()?.success(), "building sandbox-runner failed");
    }
    anyhow::ensure!(
        server_bin().exists(),
        "{} not found: build it (cargo build --release --bin sandbox-runner) or set SANDBOX_RUNNER_BIN",
        server_bin().display()
    );
    Ok(())
}

fn machine_header() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = meminfo_kib("MemTotal").unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "\nsandbox-bench {}: {cores} cores ({model}), {:.1} GiB memory, Linux {}, {}\n",
        std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        mem as f64 / (1 << 20) as f64,
        kernel.trim(),
        humantime::format_rfc3339_seconds(SystemTime::now()),
    );
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    status_field(&text, key)
}

fn status_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// The server under test, as a child process.

struct Server {
    child: Child,
    pid: u32,
    addr: String,
}

impl Server {
    async fn spawn(extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Server> {
        Server::spawn_bin(&server_bin(), extra, env).await
    }

    async fn spawn_bin(
        bin: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Server> {
        let mut child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", "0", "--log-format", "json"])
            .args(extra)
            .envs(env.iter().copied())
            // The default log level (info), as deployed: two lines per job.
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id().expect("running");
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if entry["fields"]["message"] == "listening" {
                    return Ok(entry["fields"]["addr"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned());
                }
            }
            anyhow::bail!("server exited before listening")
        })
        .await??;
        // Keep draining its log so it never blocks on a full pipe; show warnings.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("\"WARN\"") || line.contains("\"ERROR\"") {
                    eprintln!("  server: {}", line.chars().take(300).collect::<String>());
                }
            }
        });
        Ok(Server {
            child,
            pid,
            addr: format!("http://{addr}"),
        })
    }

    /// (VmRSS, VmHWM) in KiB.
    fn memory(&self) -> (u64, u64) {
        let text =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        (
            status_field(&text, "VmRSS").unwrap_or(0),
            status_field(&text, "VmHWM").unwrap_or(0),
        )
    }

    /// CPU seconds (user, system) the server has used so far.
    fn cpu(&self) -> (f64, f64) {
        cpu_of(&format!("/proc/{}/stat", self.pid))
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid)).map_or(0, |d| d.count())
    }

    async fn client(&self, tuned: bool) -> anyhow::Result<SandboxServiceClient<Channel>> {
        connect(&self.addr, tuned).await
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A client as users get it by default, or one tuned for bulk streaming (large frames and
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

/// A request the Convex mirror takes: it keys rows by task and session.
fn mirrored_request(command: &str) -> pb::ExecRequest {
    pb::ExecRequest {
        task_id: "bench-task".into(),
        session_id: "bench-session".into(),
        ..request(command, None)
    }
}

fn request(command: &str, sandbox: Option<&str>) -> pb::ExecRequest {
    pb::ExecRequest {
        command: command.into(),
        sandbox_id: sandbox.unwrap_or_default().into(),
        ..Default::default()
    }
}

/// What one Exec delivered, with the stream contract checked.
#[derive(Default)]
struct ExecResult {
    bytes: u64,
    stdout: Vec<u8>,
    first_output: Option<Duration>,
    exited: Option<Duration>,
}

/// Runs a job to its end, discarding output (kept only if `keep`), checking seq, offsets,
/// totals and exit code 0.
async fn exec(
    client: &mut SandboxServiceClient<Channel>,
    req: pb::ExecRequest,
    keep: bool,
) -> anyhow::Result<ExecResult> {
    let t0 = Instant::now();
    let mut stream = client.exec(req).await?.into_inner();
    let mut r = ExecResult::default();
    let mut next_seq = 0;
    let mut offsets = [0u64; 3];
    while let Some(event) = stream.message().await? {
        anyhow::ensure!(event.seq == next_seq, "seq {} != {next_seq}", event.seq);
        next_seq += 1;
        match event.kind {
            Some(Kind::Output(out)) => {
                r.first_output.get_or_insert_with(|| t0.elapsed());
                let slot = &mut offsets[out.stream as usize % 3];
                anyhow::ensure!(out.offset == *slot, "offset gap");
                *slot += out.data.len() as u64;
                r.bytes += out.data.len() as u64;
                if keep {
                    r.stdout.extend_from_slice(&out.data);
                }
            }
            Some(Kind::Exited(exited)) => {
                r.exited = Some(t0.elapsed());
                anyhow::ensure!(
                    exited.stdout_bytes + exited.stderr_bytes == r.bytes
                        && exited.exit_code == Some(0),
                    "bad exit: {exited:?} after {} bytes",
                    r.bytes
                );
            }
            _ => {}
        }
    }
    anyhow::ensure!(r.exited.is_some(), "no Exited event");
    Ok(r)
}

/// The same command through a pipe into this process, read in 1 MiB reads: the physical
/// baseline. Returns bytes and time to the first byte.
async fn pipe_run(command: &str) -> anyhow::Result<(u64, Duration)> {
    let t0 = Instant::now();
    let mut child = Command::new("/bin/sh")
        .args(["-c", command])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("piped");
    // A 1 MiB pipe, as the service grows its own: the fastest a reader in this process can go.
    let _ = nix::fcntl::fcntl(&stdout, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    let mut buf = vec![0u8; 1 << 20];
    let mut received = 0;
    let mut first = None;
    loop {
        let n = stdout.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| t0.elapsed());
        received += n as u64;
    }
    anyhow::ensure!(child.wait().await?.success());
    Ok((received, first.unwrap_or_default()))
}

// ---------------------------------------------------------------------------------------------
// Statistics.

struct Samples {
    name: String,
    values: Vec<f64>,
}

impl Samples {
    fn new(name: impl Into<String>) -> Self {
        Samples {
            name: name.into(),
            values: Vec::new(),
        }
    }

    fn push(&mut self, v: f64) {
        self.values.push(v);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut s = self.values.clone();
        s.sort_by(f64::total_cmp);
        s
    }

    fn pct(&self, p: f64) -> f64 {
        let s = self.sorted();
        if s.is_empty() {
            return f64::NAN;
        }
        s[((p / 100.0) * (s.len() - 1) as f64).round() as usize]
    }

    fn median(&self) -> f64 {
        self.pct(50.0)
    }

    /// A throughput row: median, min..max, ratio of medians.
    fn rate_row(&self, baseline: Option<&Samples>, second: Option<&Samples>) {
        let s = self.sorted();
        let ratio = |b: Option<&Samples>, none: &str| {
            b.map_or(none.to_owned(), |b| {
                format!("{:.2}x", self.median() / b.median())
            })
        };
        println!(
            "| {} | {:.2} GB/s | {:.2}..{:.2} | {} | {} |",
            self.name,
            self.median(),
            s.first().unwrap_or(&f64::NAN),
            s.last().unwrap_or(&f64::NAN),
            ratio(baseline, "baseline"),
            ratio(second, "")
        );
    }

    /// A latency row in ms: p50, p99, min..max, ratio of p50s.
    fn latency_row(&self, baseline: Option<&Samples>) {
        let s = self.sorted();
        let ratio = baseline.map_or("baseline".into(), |b| {
            format!("{:.2}x", self.median() / b.median())
        });
        println!(
            "| {} | {:.2} | {:.2} | {:.2}..{:.2} | {} |",
            self.name,
            self.median(),
            self.pct(99.0),
            s.first().unwrap_or(&f64::NAN),
            s.last().unwrap_or(&f64::NAN),
            ratio
        );
    }
}

/// (user, system) CPU seconds from a /proc stat file (USER_HZ is 100 on Linux).
fn cpu_of(path: &str) -> (f64, f64) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    if f.len() < 13 {
        return (0.0, 0.0);
    }
    (f[11] / 100.0, f[12] / 100.0)
}

fn gbps(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e9
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// 1. Throughput.

const SANDBOX: &str = "bench-sandbox";
const DAYTONA_KEY: &str = "bench-key";

async fn fake_daytona() -> FakeDaytona {
    let fake = FakeDaytona::start(DAYTONA_KEY).await;
    fake.add_sandbox(SANDBOX, "started");
    fake
}

async fn daytona_server(fake: &FakeDaytona, extra: &[&str]) -> anyhow::Result<Server> {
    let mut args = vec!["--backend", "daytona"];
    args.extend_from_slice(extra);
    Server::spawn(
        &args,
        &[
            ("DAYTONA_API_KEY", DAYTONA_KEY),
            ("DAYTONA_API_URL", fake.api_url.as_str()),
        ],
    )
    .await
}

async fn throughput(a: ThroughputArgs) -> anyhow::Result<()> {
    let server = Server::spawn(&[], &[]).await?;
    let mut default_client = server.client(false).await?;
    let mut tuned_client = server.client(true).await?;
    let command = format!("head -c {} /dev/zero", a.bytes);
    let interleaved = format!(
        "head -c {half} /dev/zero & head -c {half} /dev/zero >&2; wait",
        half = a.bytes / 2
    );
    // Line-framed output for Daytona: 128-byte lines.
    let lines = format!("yes {} | head -c {}", "x".repeat(127), a.daytona_bytes);
    let fake = fake_daytona().await;
    let dserver = daytona_server(&fake, &[]).await?;
    let mut dclient = dserver.client(true).await?;

    let mut shell = Samples::new("shell pipe: `head -c N /dev/zero \\| cat >/dev/null`");
    let mut pipe = Samples::new("pipe → reader in this process (1 MiB pipe and reads)");
    let mut exec_default = Samples::new("Exec, default tonic client");
    let mut exec_tuned = Samples::new("Exec, tuned client (1 MiB frames, 16/32 MiB windows)");
    let mut exec_mixed = Samples::new("Exec, stdout+stderr interleaved, tuned client");
    let mut pipe_lines = Samples::new("pipe: 128-byte lines → reader (no service)");
    let mut daytona = Samples::new("Exec via Daytona backend + fake API, tuned client");
    // CPU seconds during the tuned runs: server user, server sys, client user, client sys.
    let mut cpu = [0f64; 4];
    for round in 0..a.rounds {
        eprintln!("throughput round {}/{}", round + 1, a.rounds);
        let t = Instant::now();
        let status = Command::new("/bin/sh")
            .args(["-c", &format!("{command} | cat >/dev/null")])
            .status()
            .await?;
        anyhow::ensure!(status.success());
        shell.push(gbps(a.bytes, t.elapsed()));

        let t = Instant::now();
        let (n, _) = pipe_run(&command).await?;
        pipe.push(gbps(n, t.elapsed()));

        let t = Instant::now();
        let r = exec(&mut default_client, request(&command, None), false).await?;
        exec_default.push(gbps(r.bytes, t.elapsed()));

        let (server0, client0) = (server.cpu(), cpu_of("/proc/self/stat"));
        let t = Instant::now();
        let r = exec(&mut tuned_client, request(&command, None), false).await?;
        anyhow::ensure!(r.bytes == a.bytes);
        exec_tuned.push(gbps(r.bytes, t.elapsed()));
        let (server1, client1) = (server.cpu(), cpu_of("/proc/self/stat"));
        cpu[0] += server1.0 - server0.0;
        cpu[1] += server1.1 - server0.1;
        cpu[2] += client1.0 - client0.0;
        cpu[3] += client1.1 - client0.1;

        let t = Instant::now();
        let r = exec(&mut tuned_client, request(&interleaved, None), false).await?;
        exec_mixed.push(gbps(r.bytes, t.elapsed()));

        let t = Instant::now();
        let (n, _) = pipe_run(&lines).await?;
        pipe_lines.push(gbps(n, t.elapsed()));

        let t = Instant::now();
        let r = exec(&mut dclient, request(&lines, Some(SANDBOX)), false).await?;
        anyhow::ensure!(
            r.bytes == a.daytona_bytes,
            "daytona lost bytes: {}",
            r.bytes
        );
        daytona.push(gbps(r.bytes, t.elapsed()));
    }
    println!(
        "### Throughput: {} MiB per local run, {} MiB per Daytona run, {} rounds interleaved\n",
        a.bytes >> 20,
        a.daytona_bytes >> 20,
        a.rounds
    );
    println!(
        "| variant | median | min..max | ratio to the shell pipe | ratio to the 1 MiB pipe reader |\n|---|---|---|---|---|"
    );
    shell.rate_row(None, None);
    pipe.rate_row(Some(&shell), None);
    for s in [&exec_default, &exec_tuned, &exec_mixed] {
        s.rate_row(Some(&shell), Some(&pipe));
    }
    pipe_lines.rate_row(None, None);
    daytona.rate_row(Some(&pipe_lines), None);
    let gib = (a.bytes * a.rounds as u64) as f64 / (1u64 << 30) as f64;
    println!(
        "\nCPU per GiB in the tuned runs: server {:.2} s user + {:.2} s sys, client {:.2} s user + \
         {:.2} s sys (the job's `head` and the kernel's pipe/TCP work for it are not included).",
        cpu[0] / gib,
        cpu[1] / gib,
        cpu[2] / gib,
        cpu[3] / gib
    );
    println!();
    server.stop().await;
    dserver.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Latency.

async fn latency(a: LatencyArgs) -> anyhow::Result<()> {
    let server = Server::spawn(&[], &[]).await?;
    let mut client = server.client(false).await?;
    let fake = fake_daytona().await;
    let dserver = daytona_server(&fake, &[]).await?;
    let mut dclient = dserver.client(false).await?;

    let mut spawn_true = Samples::new("spawn `sh -c true` directly, to exit");
    let mut exec_true = Samples::new("Exec `true`, request → Exited");
    let mut spawn_echo = Samples::new("spawn `sh -c 'echo hi'` directly, to first byte");
    let mut exec_echo = Samples::new("Exec `echo hi`, request → first Output");
    // Warm up connections and caches.
    for _ in 0..10 {
        exec(&mut client, request("true", None), false).await?;
    }
    for i in 0..a.runs {
        if i % 250 == 0 {
            eprintln!("latency local {i}/{}", a.runs);
        }
        let t = Instant::now();
        let status = Command::new("/bin/sh")
            .args(["-c", "true"])
            .stdin(Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(status.success());
        spawn_true.push(ms(t.elapsed()));

        let r = exec(&mut client, request("true", None), false).await?;
        exec_true.push(ms(r.exited.expect("checked")));

        let (_, first) = pipe_run("echo hi").await?;
        spawn_echo.push(ms(first));

        let r = exec(&mut client, request("echo hi", None), false).await?;
        exec_echo.push(ms(r.first_output.expect("echo writes")));
    }

    let mut d_true = Samples::new("Daytona fake: Exec `true`, request → Exited");
    let mut d_echo = Samples::new("Daytona fake: Exec `echo hi`, request → first Output");
    let mut d_spawn = Samples::new("spawn `sh -c true` directly (same rounds)");
    exec(&mut dclient, request("true", Some(SANDBOX)), false).await?;
    for i in 0..a.daytona_runs {
        if i % 25 == 0 {
            eprintln!("latency daytona {i}/{}", a.daytona_runs);
        }
        let t = Instant::now();
        Command::new("/bin/sh")
            .args(["-c", "true"])
            .status()
            .await?;
        d_spawn.push(ms(t.elapsed()));
        let r = exec(&mut dclient, request("true", Some(SANDBOX)), false).await?;
        d_true.push(ms(r.exited.expect("checked")));
        let r = exec(&mut dclient, request("echo hi", Some(SANDBOX)), false).await?;
        d_echo.push(ms(r.first_output.expect("echo writes")));
    }

    println!(
        "### Latency: {} sequential local runs, {} Daytona runs, interleaved (ms)\n",
        a.runs, a.daytona_runs
    );
    println!("| variant | p50 | p99 | min..max | p50 ratio |\n|---|---|---|---|---|");
    spawn_true.latency_row(None);
    exec_true.latency_row(Some(&spawn_true));
    spawn_echo.latency_row(None);
    exec_echo.latency_row(Some(&spawn_echo));
    d_spawn.latency_row(None);
    d_true.latency_row(Some(&d_spawn));
    d_echo.latency_row(Some(&d_spawn));
    println!();
    server.stop().await;
    dserver.stop().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Concurrency.

/// Peak fds of this process (client, and the Daytona fake with its jobs' pipes).
static BENCH_FDS_PEAK: AtomicU64 = AtomicU64::new(0);

/// Samples the server's RSS and fds until stopped; returns (peak RSS KiB, peak fds).
fn watch(server: &Server) -> (tokio::task::JoinHandle<(u64, usize)>, Arc<AtomicU64>) {
    let stop = Arc::new(AtomicU64::new(0));
    let pid = server.pid;
    let handle = tokio::spawn({
        let stop = Arc::clone(&stop);
        async move {
            let (mut rss, mut fds) = (0, 0);
            while stop.load(Ordering::Relaxed) == 0 {
                let own = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
                BENCH_FDS_PEAK.fetch_max(own as u64, Ordering::Relaxed);
                let text =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                rss = rss.max(status_field(&text, "VmRSS").unwrap_or(0));
                fds =
                    fds.max(std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (rss, fds)
        }
    });
    (handle, stop)
}

async fn concurrency(a: ConcurrencyArgs) -> anyhow::Result<()> {
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
        match r? {
            Ok(r) if r.stdout == b"done\n" => ok += 1,
            Ok(r) => failed.push(format!("output {:?}", String::from_utf8_lossy(&r.stdout))),
            Err(e) => failed.push(e.to_string()),
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

// ---------------------------------------------------------------------------------------------
// 4. Slow reader.

async fn slow_reader(a: SlowReaderArgs) -> anyhow::Result<()> {
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

// ---------------------------------------------------------------------------------------------
// 5. Mirror.

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

async fn mirror(a: MirrorArgs) -> anyhow::Result<()> {
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

// ---------------------------------------------------------------------------------------------
// Before/after a change, in the same run.

async fn compare(a: CompareArgs) -> anyhow::Result<()> {
    let after_bin = a.after.clone().unwrap_or_else(server_bin);
    let after_args: Vec<&str> = a.after_args.split_whitespace().collect();
    let before = Server::spawn_bin(&a.before, &[], &[]).await?;
    let after_env: Vec<(&str, &str)> = a
        .after_env
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let after = Server::spawn_bin(&after_bin, &after_args, &after_env).await?;
    let servers = [&before, &after];
    let mut clients = Vec::new();
    for s in servers {
        clients.push((s.client(false).await?, s.client(true).await?));
    }
    let names = [
        "Exec `true` → Exited, p50 ms",
        "Exec `echo hi` → first Output, p50 ms",
    ];
    let mut lat: Vec<[Samples; 2]> = names
        .iter()
        .map(|n| [Samples::new(*n), Samples::new(*n)])
        .collect();
    let mut tput_default = [Samples::new("default"), Samples::new("default")];
    let mut tput_tuned = [Samples::new("tuned"), Samples::new("tuned")];
    for (c, _) in &mut clients {
        exec(c, request("true", None), false).await?;
    }
    for i in 0..a.runs {
        if i % 100 == 0 {
            eprintln!("compare latency {i}/{}", a.runs);
        }
        for (k, (c, _)) in clients.iter_mut().enumerate() {
            let r = exec(c, request("true", None), false).await?;
            lat[0][k].push(ms(r.exited.expect("checked")));
            let r = exec(c, request("echo hi", None), false).await?;
            lat[1][k].push(ms(r.first_output.expect("echo writes")));
        }
    }
    let command = format!("head -c {} /dev/zero", a.bytes);
    for round in 0..a.rounds {
        eprintln!("compare throughput {}/{}", round + 1, a.rounds);
        for (k, (d, t)) in clients.iter_mut().enumerate() {
            let start = Instant::now();
            let r = exec(d, request(&command, None), false).await?;
            tput_default[k].push(gbps(r.bytes, start.elapsed()));
            let start = Instant::now();
            let r = exec(t, request(&command, None), false).await?;
            tput_tuned[k].push(gbps(r.bytes, start.elapsed()));
        }
    }
    println!(
        "### Before/after, interleaved: before = {}, after = {} {} {}\n",
        a.before.display(),
        after_bin.display(),
        a.after_args,
        a.after_env
    );
    println!("| measure | before | after | after/before |\n|---|---|---|---|");
    for [b, f] in &lat {
        println!(
            "| {} (p99) | {:.2} ({:.2}) | {:.2} ({:.2}) | {:.2}x |",
            b.name,
            b.median(),
            b.pct(99.0),
            f.median(),
            f.pct(99.0),
            f.median() / b.median()
        );
    }
    for ([b, f], name) in [
        (&tput_default, "throughput, default client, GB/s (min..max)"),
        (&tput_tuned, "throughput, tuned client, GB/s (min..max)"),
    ] {
        let (bs, fs) = (b.sorted(), f.sorted());
        println!(
            "| {name} | {:.2} ({:.2}..{:.2}) | {:.2} ({:.2}..{:.2}) | {:.2}x |",
            b.median(),
            bs[0],
            bs[bs.len() - 1],
            f.median(),
            fs[0],
            fs[fs.len() - 1],
            f.median() / b.median()
        );
    }
    println!();
    before.stop().await;
    after.stop().await;
    Ok(())
}
