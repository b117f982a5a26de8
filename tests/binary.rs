//! The real `sandbox-runner` binary: configuration errors, secrets kept from jobs, and graceful
//! shutdown on SIGTERM with no process left behind.

mod common;

use common::{JobState, ServerProcess, shell};
use sandbox_runner::proto::sandbox_service_client::SandboxServiceClient;
use tokio::process::Command;
use tonic::Request;

const BIN: &str = env!("CARGO_BIN_EXE_sandbox-runner");
const TOKEN: &str = "binary-test-token";

async fn spawn_server(extra: &[&str]) -> ServerProcess {
    common::start_binary(extra, &[("SANDBOX_RUNNER_TOKEN", TOKEN)]).await
}

fn authorized<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    request
}

#[tokio::test]
async fn sigterm_drains_then_exits_cleanly_leaving_no_processes() {
    let mut server = spawn_server(&["--drain-grace", "1s", "--cancel-grace", "500ms"]).await;
    let channel = server.channel().await.unwrap();
    let mut client = SandboxServiceClient::new(channel.clone());

    // The service's own secrets never reach jobs.
    let stream = client
        .exec(authorized(shell(
            "printf '%s' \"${SANDBOX_RUNNER_TOKEN-unset}\"",
        )))
        .await
        .unwrap()
        .into_inner();
    let run = common::Job::from_stream(stream).await.finish().await;
    assert_eq!(run.stdout, b"unset");

    let stream = client
        .exec(authorized(shell("sleep 1000 & sleep 1000; wait")))
        .await
        .unwrap()
        .into_inner();
    let job = common::Job::from_stream(stream).await;
    let pgid = job.pid;

    server.sigterm().unwrap();
    common::wait_not_serving(&channel).await;

    let run = job.finish().await;
    assert_eq!(run.state(), JobState::Cancelled);
    let (status, logs) = server.exit().await.unwrap();
    assert!(status.success(), "exit status {status}");
    common::assert_group_gone(pgid).await;
    assert!(logs.contains("server stopped"), "{logs}");
    assert!(!logs.contains(TOKEN), "token leaked into logs:\n{logs}");
}

/// A rollout: on SIGTERM readiness turns NOT_SERVING while the listener still answers, new jobs
/// are refused, and a stream in flight runs to its natural end within the drain grace.
#[tokio::test]
async fn sigterm_lets_in_flight_streams_finish_within_the_grace() {
    let mut server = spawn_server(&["--drain-grace", "30s"]).await;
    let channel = server.channel().await.unwrap();
    let mut client = SandboxServiceClient::new(channel.clone());
    // The job ends when the test says so (bounded: 30 s), so it is surely still running while
    // the test checks the draining server, however loaded the machine.
    let marker = std::env::temp_dir().join(format!("drain-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let command = format!(
        "echo begin; i=0; while [ ! -e '{}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; echo end",
        marker.display()
    );
    let stream = client
        .exec(authorized(shell(&command)))
        .await
        .unwrap()
        .into_inner();
    let mut job = common::Job::from_stream(stream).await;
    job.read_stdout(6).await;

    server.sigterm().unwrap();
    common::wait_not_serving(&channel).await;
    let refused = client.exec(authorized(shell("true"))).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    std::fs::write(&marker, b"").unwrap();

    let run = job.finish().await;
    assert_eq!(run.state(), JobState::Succeeded, "{:?}", run.exited);
    assert_eq!(run.stdout, b"begin\nend\n");
    let (status, _) = server.exit().await.unwrap();
    assert!(status.success(), "exit status {status}");
    let _ = std::fs::remove_file(&marker);
}

#[tokio::test]
async fn bad_configuration_fails_fast_with_a_reason() {
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--default-timeout", "2h", "--max-timeout", "1h"],
            64,
            "must not exceed",
        ),
        (
            &["--default-cwd", "/definitely/missing"],
            64,
            "not a directory",
        ),
        (&["--port", "not-a-port"], 2, "not-a-port"),
        (&["--backend", "nowhere"], 2, "nowhere"),
    ];
    for (args, code, needle) in cases {
        let output = Command::new(BIN).args(*args).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(*code), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
