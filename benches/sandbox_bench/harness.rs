//! The harness: the environment (fd limit, the server binary, the machine), the server under
//! test as a child process and a sampler of its peaks, clients, jobs run with the stream
//! contract checked, the pipe baseline, and the Daytona fake the Daytona measurements share.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant, SystemTime},
};

use sandbox_runner::{
    proto::{self as pb, sandbox_service_client::SandboxServiceClient},
    testing::{
        contract::{Job, Output, Run},
        daytona::FakeDaytona,
        procfs,
        server_process::ServerProcess,
    },
};
use tokio::{io::AsyncReadExt, process::Command};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

// ---------------------------------------------------------------------------------------------
// Environment: fd limit, the server binary, the machine.

/// 5,000 Daytona jobs need ~3 fds each in the fake (in this process) and ~2 in the server;
/// the soft limit is raised to the hard one here and inherited by the server.
pub(crate) fn raise_fd_limit() {
    let _ = sandbox_runner::connection::raise_open_file_limit();
}

/// Raises this process's `RLIMIT_NOFILE` (soft and hard) to at least `want`, for a server
/// started from it to inherit: raising the hard limit needs root (CAP_SYS_RESOURCE), and the
/// kernel caps it at `fs.nr_open`. Returns the soft limit in force afterwards.
pub(crate) fn raise_fd_limit_to(want: u64) -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < want {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(u64::MAX);
        let target = want.min(nr_open).max(hard);
        setrlimit(Resource::RLIMIT_NOFILE, target, target)?;
    }
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?.0)
}

/// The 1, 5 and 15 minute load averages.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn server_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("SANDBOX_RUNNER_BIN") {
        return PathBuf::from(path);
    }
    std::env::current_exe()
        .expect("own path")
        .with_file_name("sandbox-runner")
}

/// Under `cargo run`, builds the server binary with the same profile and features.
pub(crate) fn ensure_server_built() -> anyhow::Result<()> {
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

pub(crate) fn machine_header() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = procfs::meminfo_kib("MemTotal").unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "\nsandbox-bench {}: {cores} cores ({model}), {:.1} GiB memory, Linux {}, {}\n",
        std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        mem as f64 / (1 << 20) as f64,
        kernel.trim(),
        humantime::format_rfc3339_seconds(SystemTime::now()),
    );
}

// ---------------------------------------------------------------------------------------------
// The server under test, as a child process.

/// The server binary under test, started as deployed (default log level) with its warnings
/// echoed, and what the measurements read of it.
pub(crate) struct Server(ServerProcess);

impl Server {
    pub(crate) async fn spawn(extra: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Server> {
        Server::spawn_bin(&server_bin(), extra, env).await
    }

    pub(crate) async fn spawn_bin(
        bin: &std::path::Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Server> {
        let mut command = ServerProcess::command(bin);
        command
            .args(extra)
            .envs(env.iter().copied())
            // The default log level (info), as deployed: two lines per job.
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        let mut server = ServerProcess::spawn(command).await?;
        // A long run would pile up its log: show only warnings.
        server.echo_warnings();
        Ok(Server(server))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.0.pid
    }

    /// `http://127.0.0.1:PORT`, for clients with their own `Endpoint` settings.
    pub(crate) fn url(&self) -> String {
        self.0.url()
    }

    /// (VmRSS, VmHWM) in KiB.
    pub(crate) fn memory(&self) -> (u64, u64) {
        procfs::memory_kib(self.0.pid)
    }

    /// CPU seconds (user, system) the server has used so far.
    pub(crate) fn cpu(&self) -> (f64, f64) {
        procfs::cpu_seconds(self.0.pid)
    }

    pub(crate) fn fds(&self) -> usize {
        procfs::fd_count(self.0.pid)
    }

    pub(crate) fn threads(&self) -> u64 {
        procfs::thread_count(self.0.pid)
    }

    pub(crate) async fn client(
        &self,
        tuned: bool,
    ) -> anyhow::Result<SandboxServiceClient<Channel>> {
        connect(&self.0.url(), tuned).await
    }

    pub(crate) async fn stop(self) {
        self.0.stop().await;
    }
}

/// What the background sampler saw of the server, the machine and this process.
#[derive(Default)]
pub(crate) struct Peaks {
    pub(crate) rss: u64,
    pub(crate) fds: usize,
    pub(crate) threads: u64,
    /// The machine's lowest MemAvailable (KiB).
    pub(crate) min_available: u64,
    /// This process (the clients) at its largest.
    pub(crate) bench_rss: u64,
}

/// Samples the server's RSS, fds and threads, the machine's MemAvailable and this process's
/// RSS every `every` until `stop`.
pub(crate) async fn sample(pid: u32, every: Duration, stop: CancellationToken) -> Peaks {
    let mut peaks = Peaks {
        min_available: u64::MAX,
        ..Peaks::default()
    };
    loop {
        peaks.rss = peaks.rss.max(procfs::memory_kib(pid).0);
        peaks.fds = peaks.fds.max(procfs::fd_count(pid));
        peaks.threads = peaks.threads.max(procfs::thread_count(pid));
        peaks.bench_rss = peaks
            .bench_rss
            .max(procfs::memory_kib(std::process::id()).0);
        if let Some(available) = procfs::meminfo_kib("MemAvailable") {
            peaks.min_available = peaks.min_available.min(available);
        }
        tokio::select! {
            _ = stop.cancelled() => return peaks,
            _ = tokio::time::sleep(every) => {}
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

pub(crate) fn request(command: &str, sandbox: Option<&str>) -> pb::ExecRequest {
    pb::ExecRequest {
        command: command.into(),
        sandbox_id: sandbox.unwrap_or_default().into(),
        ..Default::default()
    }
}

/// Runs a job to its end through the stream-contract reader, keeping its output only if
/// `keep`, and checks exit code 0.
pub(crate) async fn exec(
    client: &mut SandboxServiceClient<Channel>,
    req: pb::ExecRequest,
    keep: bool,
) -> anyhow::Result<Run> {
    let output = if keep { Output::Keep } else { Output::Count };
    let run = Job::start(client, req, output).await?.finish().await?;
    anyhow::ensure!(
        run.exited.exit_code == Some(0),
        "bad exit: {:?} after {} bytes",
        run.exited,
        run.bytes()
    );
    Ok(run)
}

/// The same command through a pipe into this process, read in 1 MiB reads: the physical
/// baseline. Returns bytes and time to the first byte.
pub(crate) async fn pipe_run(command: &str) -> anyhow::Result<(u64, Duration)> {
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
// The Daytona fake, for the throughput, latency and concurrency measurements.

pub(crate) const SANDBOX: &str = "bench-sandbox";
const DAYTONA_KEY: &str = "bench-key";

pub(crate) async fn fake_daytona() -> FakeDaytona {
    let fake = FakeDaytona::start(DAYTONA_KEY).await;
    fake.add_sandbox(SANDBOX, "started");
    fake
}

pub(crate) async fn daytona_server(fake: &FakeDaytona, extra: &[&str]) -> anyhow::Result<Server> {
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
