//! Shared test support: a real server on 127.0.0.1:0, a real tonic client, and helpers that check
//! the event-stream contract on every run.

#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use sandbox_runner::{
    Config,
    proto::{self as pb, exec_event::Kind, sandbox_service_client::SandboxServiceClient},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{Streaming, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

pub use pb::{JobState, OutputStream};
pub use sandbox_runner::testing::{procfs::group_members, server_process::ServerProcess};

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

/// Everything a finished job sent, checked against the stream contract.
#[derive(Debug)]
pub struct Run {
    pub job_id: String,
    pub pid: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// (stream, data) in arrival order.
    pub chunks: Vec<(OutputStream, Vec<u8>)>,
    pub exited: pb::Exited,
}

impl Run {
    pub fn state(&self) -> JobState {
        JobState::try_from(self.exited.state).unwrap()
    }
}

/// A job being read, checking the stream contract on every event: seq starts at 0 and has no
/// gaps, Started first, Exited last and once, offsets contiguous per stream, totals match.
pub struct Job {
    stream: Streaming<pb::ExecEvent>,
    pub job_id: String,
    pub pid: u32,
    next_seq: u64,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    chunks: Vec<(OutputStream, Vec<u8>)>,
    exited: Option<pb::Exited>,
}

impl Job {
    /// Starts a job and reads its `Started` event.
    pub async fn start(client: &mut SandboxServiceClient<Channel>, req: pb::ExecRequest) -> Job {
        let stream = client.exec(req).await.expect("Exec accepted").into_inner();
        Job::from_stream(stream).await
    }

    pub async fn from_stream(mut stream: Streaming<pb::ExecEvent>) -> Job {
        let event = stream.message().await.unwrap().expect("a first event");
        assert_eq!(event.seq, 0);
        let pid = match event.kind {
            Some(Kind::Started(s)) => s.pid,
            other => panic!("first event is not Started: {other:?}"),
        };
        Job {
            stream,
            job_id: event.job_id,
            pid,
            next_seq: 1,
            stdout: Vec::new(),
            stderr: Vec::new(),
            chunks: Vec::new(),
            exited: None,
        }
    }

    /// Reads one event; false at the end of the stream.
    pub async fn step(&mut self) -> bool {
        let Some(event) = self.stream.message().await.expect("stream ends cleanly") else {
            return false;
        };
        assert!(self.exited.is_none(), "event after Exited: {event:?}");
        assert_eq!(event.seq, self.next_seq, "seq gap");
        assert_eq!(event.job_id, self.job_id);
        assert!(event.time.is_some());
        self.next_seq += 1;
        match event.kind.expect("event has a kind") {
            Kind::Started(_) => panic!("second Started"),
            Kind::Output(out) => {
                let stream = OutputStream::try_from(out.stream).unwrap();
                let buf = match stream {
                    OutputStream::Stdout => &mut self.stdout,
                    OutputStream::Stderr => &mut self.stderr,
                    OutputStream::Unspecified => panic!("unspecified stream"),
                };
                assert_eq!(
                    out.offset,
                    buf.len() as u64,
                    "offset mismatch on {stream:?}"
                );
                assert!(!out.data.is_empty(), "empty output chunk");
                buf.extend_from_slice(&out.data);
                self.chunks.push((stream, out.data.to_vec()));
            }
            Kind::Exited(e) => self.exited = Some(e),
        }
        true
    }

    /// Reads until at least `n` bytes of stdout arrived.
    pub async fn read_stdout(&mut self, n: usize) {
        while self.stdout.len() < n {
            assert!(self.step().await, "stream ended before {n} stdout bytes");
        }
    }

    /// Drops the stream, as a client that goes away does.
    pub fn disconnect(self) -> (String, u32) {
        (self.job_id, self.pid)
    }

    /// Reads to the end.
    pub async fn finish(mut self) -> Run {
        while self.step().await {}
        let exited = self.exited.expect("stream ended without Exited");
        assert_eq!(exited.stdout_bytes, self.stdout.len() as u64);
        assert_eq!(exited.stderr_bytes, self.stderr.len() as u64);
        Run {
            job_id: self.job_id,
            pid: self.pid,
            stdout: self.stdout,
            stderr: self.stderr,
            chunks: self.chunks,
            exited,
        }
    }
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
