//! Shared test support: a real server on 127.0.0.1:0 (in this process, or the binary), a real
//! tonic client, and helpers that check the event-stream contract on every run. What the
//! benchmark shares (the binary as a process, the contract reader, the fakes, /proc) lives in
//! `sandbox_runner::testing`; this module makes its failures fail the test.

#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use sandbox_runner::{
    Config,
    proto::{self as pb, sandbox_service_client::SandboxServiceClient},
    testing::contract::{self, Output},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Streaming, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

pub mod scrape;

// Not every test crate uses every re-export.
#[allow(unused_imports)]
pub use pb::{JobState, OutputStream};
pub use sandbox_runner::testing::{
    contract::Run, procfs::group_members, server_process::ServerProcess,
};

/// A server running in this process.
pub struct TestServer {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

/// Starts a server with the given extra flags (on top of a loopback listener and short graces).
pub async fn start(args: &[&str]) -> TestServer {
    let mut argv = vec![
        "sandbox-runner",
        "--host",
        "127.0.0.1",
        "--cancel-grace",
        "2s",
        "--drain-grace",
        "2s",
    ];
    argv.extend_from_slice(args);
    let config = Config::try_parse_from(argv).expect("test config parses");
    config.validate().expect("test config is valid");
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        sandbox_runner::run(listener, config, async {
            let _ = rx.await;
        })
        .await
        .expect("server runs");
    });
    TestServer {
        addr,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

impl TestServer {
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to test server")
    }

    pub async fn client(&self) -> SandboxServiceClient<Channel> {
        SandboxServiceClient::new(self.channel().await)
    }

    /// Triggers graceful shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(60), handle)
                .await
                .expect("server stops in time")
                .expect("server task did not panic");
        }
    }
}

pub fn shell(command: &str) -> pb::ExecRequest {
    pb::ExecRequest {
        command: command.into(),
        ..Default::default()
    }
}

pub fn argv(args: &[&str]) -> pb::ExecRequest {
    pb::ExecRequest {
        argv: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A job read through the stream-contract reader (src/testing/contract.rs), keeping its output;
/// a broken contract fails the test.
pub struct Job {
    pub job_id: String,
    pub pid: u32,
    reader: contract::Job,
}

/// The value, or a test failure naming what broke.
fn checked<T>(result: anyhow::Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("{e:#}"))
}

impl Job {
    /// Starts a job and reads its `Started` event.
    pub async fn start(client: &mut SandboxServiceClient<Channel>, req: pb::ExecRequest) -> Job {
        Job::new(checked(
            contract::Job::start(client, req, Output::Keep).await,
        ))
    }

    pub async fn from_stream(stream: Streaming<pb::ExecEvent>) -> Job {
        Job::new(checked(
            contract::Job::from_stream(stream, Output::Keep).await,
        ))
    }

    fn new(reader: contract::Job) -> Job {
        Job {
            job_id: reader.job_id.clone(),
            pid: reader.pid,
            reader,
        }
    }

    /// Reads one event; false at the end of the stream.
    pub async fn step(&mut self) -> bool {
        checked(self.reader.step().await)
    }

    /// Reads until at least `n` bytes of stdout arrived.
    pub async fn read_stdout(&mut self, n: usize) {
        checked(self.reader.read_stdout(n).await)
    }

    /// Reads until the stdout kept so far contains `needle` (after byte `from`); returns
    /// where it ends. Fails if the stream ends first.
    pub async fn read_until(&mut self, from: usize, needle: &str) -> usize {
        loop {
            let (stdout, _) = self.reader.kept();
            if let Some(at) = stdout
                .get(from..)
                .and_then(|s| s.windows(needle.len()).position(|w| w == needle.as_bytes()))
            {
                return from + at + needle.len();
            }
            let seen = String::from_utf8_lossy(stdout).into_owned();
            assert!(
                self.step().await,
                "stream ended before {needle:?} in {seen:?}"
            );
        }
    }

    /// Drops the stream, as a client that goes away does.
    pub fn disconnect(self) -> (String, u32) {
        self.reader.disconnect()
    }

    /// Reads to the end.
    pub async fn finish(self) -> Run {
        checked(self.reader.finish().await)
    }
}

/// Opens an Attach stream on `job_id` from `from` (`None`: the start), holding the job back
/// (`lossless`) or as a watcher. The request stream half-closes after `open`, which ends
/// nothing.
pub async fn attach(
    client: &mut SandboxServiceClient<Channel>,
    job_id: &str,
    from: Option<pb::resume_from::Position>,
    on_gap: pb::GapPolicy,
    lossless: bool,
) -> Result<Streaming<pb::ExecEvent>, tonic::Status> {
    let open = contract::attach_open(job_id, from, on_gap, lossless);
    client
        .attach(tokio_stream::iter([open]))
        .await
        .map(|r| r.into_inner())
}

impl Job {
    /// Follows an Attach stream that starts after seq `after` (`None`: wherever it starts) with
    /// `received` bytes of stdout and stderr already had, through the contract reader.
    pub async fn resume(
        stream: Streaming<pb::ExecEvent>,
        after: Option<u64>,
        received: [u64; 2],
    ) -> Job {
        Job::new(checked(
            contract::Job::resume(stream, Output::Keep, after, received).await,
        ))
    }

    pub fn last_seq(&self) -> u64 {
        self.reader.last_seq()
    }

    pub fn received(&self) -> [u64; 2] {
        self.reader.received()
    }

    pub fn has_exited(&self) -> bool {
        self.reader.has_exited()
    }

    /// Output kept so far (stdout, stderr).
    pub fn kept(&self) -> (Vec<u8>, Vec<u8>) {
        let (stdout, stderr) = self.reader.kept();
        (stdout.to_vec(), stderr.to_vec())
    }

    pub fn gaps(&self) -> Vec<pb::Gap> {
        self.reader.gaps().to_vec()
    }

    pub fn snapshots(&self) -> Vec<pb::Snapshot> {
        self.reader.snapshots().to_vec()
    }
}

pub async fn health(client: &mut SandboxServiceClient<Channel>) -> pb::HealthResponse {
    client
        .health(pb::HealthRequest {})
        .await
        .expect("Health succeeds")
        .into_inner()
}

pub async fn send_input(
    client: &mut SandboxServiceClient<Channel>,
    job_id: &str,
    data: &[u8],
    offset: Option<u64>,
) -> Result<u64, tonic::Status> {
    client
        .send_input(pb::SendInputRequest {
            job_id: job_id.into(),
            data: data.to_vec().into(),
            offset,
        })
        .await
        .map(|r| r.into_inner().accepted_bytes)
}

pub async fn close_input(
    client: &mut SandboxServiceClient<Channel>,
    job_id: &str,
) -> Result<u64, tonic::Status> {
    client
        .close_input(pb::CloseInputRequest {
            job_id: job_id.into(),
        })
        .await
        .map(|r| r.into_inner().accepted_bytes)
}

pub async fn resize(
    client: &mut SandboxServiceClient<Channel>,
    job_id: &str,
    rows: u32,
    cols: u32,
) -> Result<(), tonic::Status> {
    client
        .resize(pb::ResizeRequest {
            job_id: job_id.into(),
            rows,
            cols,
        })
        .await
        .map(drop)
}

pub async fn run(client: &mut SandboxServiceClient<Channel>, req: pb::ExecRequest) -> Run {
    Job::start(client, req).await.finish().await
}

pub async fn cancel(
    client: &mut SandboxServiceClient<Channel>,
    job_id: &str,
) -> pb::CancelResponse {
    client
        .cancel(pb::CancelRequest {
            job_id: job_id.into(),
        })
        .await
        .expect("Cancel succeeds")
        .into_inner()
}

pub async fn status(
    client: &mut SandboxServiceClient<Channel>,
    job_id: &str,
) -> pb::StatusResponse {
    client
        .status(pb::StatusRequest {
            job_id: job_id.into(),
        })
        .await
        .expect("Status succeeds")
        .into_inner()
}

/// Waits (bounded) until no process of group `pgid` is alive; panics naming the survivors.
pub async fn assert_group_gone(pgid: u32) {
    for _ in 0..200 {
        if group_members(pgid).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "processes of group {pgid} still alive: {:?}",
        group_members(pgid)
    );
}

/// Polls Status until the job is no longer RUNNING.
pub async fn wait_finished(
    client: &mut SandboxServiceClient<Channel>,
    job_id: &str,
) -> pb::StatusResponse {
    for _ in 0..400 {
        let status = status(client, job_id).await;
        if status.state != JobState::Running as i32 {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {job_id} still running");
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// `req` with a job timeout.
pub fn with_timeout(mut req: pb::ExecRequest, timeout: Duration) -> pb::ExecRequest {
    req.timeout = Some(timeout.try_into().expect("a representable timeout"));
    req
}

/// The service name the standard health service reports on.
pub const SERVICE: &str = "sandbox.v1.SandboxService";

/// `grpc.health.v1` status of `service`.
pub async fn serving_status(channel: &Channel, service: &str) -> ServingStatus {
    let reply = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .expect("health answers")
        .into_inner();
    ServingStatus::try_from(reply.status).expect("a known status")
}

/// Waits (bounded) until health reports NOT_SERVING for the service, as it does once draining
/// starts; the health service must keep answering meanwhile.
pub async fn wait_not_serving(channel: &Channel) {
    for _ in 0..500 {
        if serving_status(channel, SERVICE).await == ServingStatus::NotServing {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("health never reported NOT_SERVING");
}

/// The `sandbox-runner` binary of this build as a child process, with these extra flags and
/// environment.
pub async fn start_binary(args: &[&str], envs: &[(&str, &str)]) -> ServerProcess {
    ServerProcess::start(env!("CARGO_BIN_EXE_sandbox-runner"), args, envs)
        .await
        .expect("start the binary")
}

/// API key the fake Daytona of these tests accepts.
pub const DAYTONA_KEY: &str = "fake-daytona-key";

/// A server on the Daytona backend pointed at `fake`, polling fast so tests stay quick.
pub async fn start_daytona(
    fake: &sandbox_runner::testing::daytona::FakeDaytona,
    extra: &[&str],
) -> TestServer {
    let mut args = vec![
        "--backend",
        "daytona",
        "--daytona-api-key",
        DAYTONA_KEY,
        "--daytona-api-url",
        &fake.api_url,
        "--daytona-poll-interval",
        "50ms",
        "--daytona-request-timeout",
        "5s",
    ];
    args.extend_from_slice(extra);
    start(&args).await
}

/// A file under the temp dir, removed on drop.
pub struct SecretFile(pub std::path::PathBuf);

impl SecretFile {
    pub fn new(content: &str) -> SecretFile {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let file = SecretFile(std::env::temp_dir().join(format!(
            "sandbox-runner-secrets-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )));
        file.write(content);
        file
    }

    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    /// Rewrites it in place, as an editor or `echo > file` does (a poll may see it half-written:
    /// that must be harmless too).
    pub fn write(&self, content: &str) {
        std::fs::write(&self.0, content).unwrap();
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
