//! Several replicas behind one Service: job ids carry where the job lives, signed with a shared
//! key, so Status and Cancel work on whichever replica a call lands on.

mod common;

use common::{Job, JobState, TestServer, cancel, shell, status};
use sandbox_runner::{proto as pb, testing::daytona::FakeDaytona};
use tonic::Code;

const KEY: &str = common::DAYTONA_KEY;
const SIGNING_KEY: &str = "0123456789abcdef0123456789abcdef-shared";

async fn daytona_replica(fake: &FakeDaytona, name: &str, signing_key: &str) -> TestServer {
    common::start_daytona(
        fake,
        &["--replica-name", name, "--job-id-signing-key", signing_key],
    )
    .await
}

#[tokio::test]
async fn exec_on_one_replica_status_and_cancel_on_another() {
    let fake = FakeDaytona::start(KEY).await;
    fake.add_sandbox("sbx", "started");
    let a = daytona_replica(&fake, "replica-a", SIGNING_KEY).await;
    let b = daytona_replica(&fake, "replica-b", SIGNING_KEY).await;
    let mut client_a = a.client().await;
    let mut client_b = b.client().await;

    let mut req = shell("echo up; sleep 1000");
    req.sandbox_id = "sbx".into();
    req.task_id = "task-7".into();
    req.session_id = "term-7".into();
    let mut job = Job::start(&mut client_a, req).await;
    job.read_stdout(3).await;

    let seen_by_b = status(&mut client_b, &job.job_id).await;
    assert_eq!(seen_by_b.state, JobState::Running as i32);
    assert_eq!(seen_by_b.job_id, job.job_id);
    assert_eq!(
        (
            seen_by_b.task_id.as_str(),
            seen_by_b.session_id.as_str(),
            seen_by_b.sandbox_id.as_str()
        ),
        ("task-7", "term-7", "sbx")
    );
    assert_eq!(seen_by_b.backend, "daytona");
    assert!(seen_by_b.started_at.is_some() && seen_by_b.running_for.is_some());

    let reply = cancel(&mut client_b, &job.job_id).await;
    assert_eq!(reply.state, JobState::Running as i32, "being stopped");
    let run = job.finish().await;
    assert_eq!(run.state(), JobState::Cancelled);
    assert!(
        run.exited.message.contains("another replica"),
        "{}",
        run.exited.message
    );
    assert_eq!(fake.live_sessions(), 0);

    // The owner keeps the final record; B says where to ask.
    let owner = status(&mut client_a, &run.job_id).await;
    assert_eq!(owner.state, JobState::Cancelled as i32);
    let err = client_b
        .status(pb::StatusRequest {
            job_id: run.job_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("replica-a"), "{}", err.message());

    // A forged id is refused outright.
    let forged = format!("{}x", &run.job_id[..run.job_id.len() - 1]);
    let err = client_b
        .status(pb::StatusRequest { job_id: forged })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn replicas_with_different_keys_do_not_trust_each_other() {
    let fake = FakeDaytona::start(KEY).await;
    fake.add_sandbox("sbx", "started");
    let a = daytona_replica(&fake, "replica-a", SIGNING_KEY).await;
    let b = daytona_replica(&fake, "replica-b", "another-key-another-key-another-key").await;
    let mut client_a = a.client().await;
    let mut client_b = b.client().await;
    let mut req = shell("sleep 1000");
    req.sandbox_id = "sbx".into();
    let job = Job::start(&mut client_a, req).await;
    let err = client_b
        .cancel(pb::CancelRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("signature"), "{}", err.message());
    // B refused, so the job still runs on A.
    assert_eq!(
        status(&mut client_a, &job.job_id).await.state,
        JobState::Running as i32
    );
    cancel(&mut client_a, &job.job_id).await;
    job.finish().await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn local_jobs_name_their_replica() {
    let a = common::start(&[
        "--replica-name",
        "node-a",
        "--job-id-signing-key",
        SIGNING_KEY,
    ])
    .await;
    let b = common::start(&[
        "--replica-name",
        "node-b",
        "--job-id-signing-key",
        SIGNING_KEY,
    ])
    .await;
    let mut client_a = a.client().await;
    let mut client_b = b.client().await;
    let job = Job::start(&mut client_a, shell("sleep 1000")).await;
    for err in [
        client_b
            .status(pb::StatusRequest {
                job_id: job.job_id.clone(),
            })
            .await
            .unwrap_err(),
        client_b
            .cancel(pb::CancelRequest {
                job_id: job.job_id.clone(),
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.message().contains("node-a"), "{}", err.message());
    }
    cancel(&mut client_a, &job.job_id).await;
    assert_eq!(job.finish().await.state(), JobState::Cancelled);
    a.stop().await;
    b.stop().await;
}
