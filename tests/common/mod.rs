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

pub use pb::{JobState, OutputStream};

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

/// Reads the first event, which must be `Started`; returns the job id and pid.
pub async fn started(stream: &mut Streaming<pb::ExecEvent>) -> (String, u32) {
    let event = stream.message().await.unwrap().expect("a first event");
    assert_eq!(event.seq, 0);
    match event.kind {
        Some(Kind::Started(s)) => (event.job_id, s.pid),
        other => panic!("first event is not Started: {other:?}"),
    }
}

/// Reads a stream to its end, checking: seq starts at 0 and has no gaps, Started first, Exited
/// last and once, offsets contiguous per stream, byte totals match.
pub async fn collect(mut stream: Streaming<pb::ExecEvent>) -> Run {
    let (job_id, pid) = started(&mut stream).await;
    collect_rest(stream, job_id, pid).await
}

pub async fn collect_rest(mut stream: Streaming<pb::ExecEvent>, job_id: String, pid: u32) -> Run {
    let mut next_seq = 1;
    let (mut stdout, mut stderr, mut chunks) = (Vec::new(), Vec::new(), Vec::new());
    let mut exited = None;
    while let Some(event) = stream.message().await.expect("stream ends cleanly") {
        assert!(exited.is_none(), "event after Exited: {event:?}");
        assert_eq!(event.seq, next_seq, "seq gap");
        assert_eq!(event.job_id, job_id);
        assert!(event.time.is_some());
        next_seq += 1;
        match event.kind.expect("event has a kind") {
            Kind::Started(_) => panic!("second Started"),
            Kind::Output(out) => {
                let stream = OutputStream::try_from(out.stream).unwrap();
                let buf = match stream {
                    OutputStream::Stdout => &mut stdout,
                    OutputStream::Stderr => &mut stderr,
                    OutputStream::Unspecified => panic!("unspecified stream"),
                };
                assert_eq!(out.offset, buf.len() as u64, "offset mismatch on {stream:?}");
                assert!(!out.data.is_empty(), "empty output chunk");
                buf.extend_from_slice(&out.data);
                chunks.push((stream, out.data.to_vec()));
            }
            Kind::Exited(e) => exited = Some(e),
        }
    }
    let exited = exited.expect("stream ended without Exited");
    assert_eq!(exited.stdout_bytes, stdout.len() as u64);
    assert_eq!(exited.stderr_bytes, stderr.len() as u64);
    Run {
        job_id,
        pid,
        stdout,
        stderr,
        chunks,
        exited,
    }
}

pub async fn run(client: &mut SandboxServiceClient<Channel>, req: pb::ExecRequest) -> Run {
    let stream = client.exec(req).await.expect("Exec accepted").into_inner();
    collect(stream).await
}

/// Pids of live (non-zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state, ppid, pgrp, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[2] == pgid.to_string() && fields[0] != "Z" {
            members.push(pid);
        }
    }
    members
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
        let status = client
            .status(pb::StatusRequest {
                job_id: job_id.into(),
            })
            .await
            .unwrap()
            .into_inner();
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
