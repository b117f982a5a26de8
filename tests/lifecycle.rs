//! Job lifecycle over real gRPC: cancel, client disconnect, timeout, leftovers, Status, limits,
//! backpressure.

mod common;

use std::time::Duration;

use common::{Job, JobState, argv, assert_group_gone, cancel, shell, status, wait_finished};
use sandbox_runner::proto as pb;
use tonic::Code;

const TREE: &str = "sleep 1000 & sleep 1000; wait";

#[tokio::test]
async fn cancel_stops_the_whole_process_group() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let job = Job::start(&mut client, shell(TREE)).await;
    let pgid = job.pid;
    // Both sleeps are up before we cancel.
    for _ in 0..100 {
        if common::group_members(pgid).len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(common::group_members(pgid).len() >= 3, "tree did not start");

    let job_id = job.job_id.clone();
    assert_eq!(cancel(&mut client, &job_id).await.job_id, job_id);
    let run = job.finish().await;
    assert_eq!(run.state(), JobState::Cancelled);
    assert_eq!(run.exited.signal, Some(15), "{:?}", run.exited);
    assert!(
        run.exited.message.contains("cancelled"),
        "{}",
        run.exited.message
    );
    assert_group_gone(pgid).await;

    // Cancelling again is harmless and reports the final state.
    let reply = cancel(&mut client, &job_id).await;
    assert_eq!(reply.state, JobState::Cancelled as i32);
    server.stop().await;
}

#[tokio::test]
async fn a_group_that_ignores_sigterm_is_killed_after_the_grace() {
    let server = common::start(&["--cancel-grace", "300ms"]).await;
    let mut client = server.client().await;
    let mut job = Job::start(
        &mut client,
        shell("trap '' TERM; sleep 1000 & echo ready; wait; wait"),
    )
    .await;
    job.read_stdout(6).await;
    cancel(&mut client, &job.job_id).await;
    let run = job.finish().await;
    assert_eq!(run.state(), JobState::Cancelled);
    assert_eq!(run.exited.signal, Some(9));
    assert_group_gone(run.pid).await;
    server.stop().await;
}

#[tokio::test]
async fn dropping_the_stream_cancels_the_job() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let (job_id, pgid) = Job::start(&mut client, shell(TREE)).await.disconnect();
    let status = wait_finished(&mut client, &job_id).await;
    assert_eq!(status.state, JobState::Cancelled as i32);
    assert!(status.message.contains("client"), "{}", status.message);
    assert_group_gone(pgid).await;
    server.stop().await;
}

#[tokio::test]
async fn timeout_ends_timed_out() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let req = common::with_timeout(shell(TREE), Duration::from_millis(300));
    let run = common::run(&mut client, req).await;
    assert_eq!(run.state(), JobState::TimedOut);
    assert!(
        run.exited.message.contains("timed out after 300ms"),
        "{}",
        run.exited.message
    );
    assert_group_gone(run.pid).await;
    server.stop().await;
}

#[tokio::test]
async fn default_timeout_applies_when_the_request_sets_none() {
    let server = common::start(&["--default-timeout", "200ms"]).await;
    let mut client = server.client().await;
    let run = common::run(&mut client, shell("sleep 1000")).await;
    assert_eq!(run.state(), JobState::TimedOut);
    server.stop().await;
}

#[tokio::test]
async fn background_child_holding_the_pipes_cannot_keep_the_job_open() {
    let server = common::start(&["--cancel-grace", "300ms"]).await;
    let mut client = server.client().await;
    // The main process exits at once; its child keeps stdout open and prints first.
    let run = common::run(
        &mut client,
        shell("(echo from-child; sleep 1000) & echo from-main; exit 3"),
    )
    .await;
    assert_eq!(run.exited.exit_code, Some(3));
    assert_eq!(run.state(), JobState::Failed);
    let text = String::from_utf8(run.stdout.clone()).unwrap();
    assert!(
        text.contains("from-main") && text.contains("from-child"),
        "{text}"
    );
    assert_group_gone(run.pid).await;
    server.stop().await;
}

#[tokio::test]
async fn daemonised_leftovers_are_cleaned_up_too() {
    let server = common::start(&["--cancel-grace", "300ms"]).await;
    let mut client = server.client().await;
    let run = common::run(&mut client, shell("sleep 1000 >/dev/null 2>&1 & echo done")).await;
    assert_eq!(run.state(), JobState::Succeeded);
    assert_group_gone(run.pid).await;
    server.stop().await;
}

#[tokio::test]
async fn status_while_running_and_after_exit() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let mut req = shell("echo partial; sleep 1000");
    req.task_id = "task-1".into();
    req.session_id = "sess-1".into();
    req.sandbox_id = "sbx-1".into();
    let mut job = Job::start(&mut client, req).await;
    job.read_stdout(8).await;

    let running = status(&mut client, &job.job_id).await;
    assert_eq!(running.state, JobState::Running as i32);
    assert_eq!(
        (
            running.task_id.as_str(),
            running.session_id.as_str(),
            running.sandbox_id.as_str()
        ),
        ("task-1", "sess-1", "sbx-1")
    );
    assert_eq!(running.backend, "local");
    assert!(running.started_at.is_some() && running.running_for.is_some());
    assert!(running.finished_at.is_none() && running.exit_code.is_none());
    assert_eq!(running.stdout_bytes, 8);

    cancel(&mut client, &job.job_id).await;
    let run = job.finish().await;
    let finished = status(&mut client, &run.job_id).await;
    assert_eq!(finished.state, run.exited.state);
    assert!(finished.finished_at.is_some() && finished.running_for.is_none());
    assert_eq!(finished.signal, run.exited.signal);
    assert_eq!(finished.stdout_bytes, 8);
    assert!(
        finished.message.contains("cancelled by request"),
        "{}",
        finished.message
    );

    let failed = common::run(&mut client, shell("exit 7")).await;
    let finished = status(&mut client, &failed.job_id).await;
    assert_eq!(finished.exit_code, Some(7));
    assert_eq!(finished.state, JobState::Failed as i32);
    server.stop().await;
}

#[tokio::test]
async fn unknown_jobs_are_not_found_and_empty_ids_invalid() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let err = client
        .status(pb::StatusRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("nope"));
    let err = client
        .cancel(pb::CancelRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .status(pb::StatusRequest {
            job_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn finished_jobs_are_forgotten_beyond_the_retention_bound() {
    let server = common::start(&["--finished-job-capacity", "2"]).await;
    let mut client = server.client().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(common::run(&mut client, shell("true")).await.job_id);
    }
    // Retirement happens just after Exited is sent.
    for _ in 0..100 {
        let first = client
            .status(pb::StatusRequest {
                job_id: ids[0].clone(),
            })
            .await;
        if first.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = client
        .status(pb::StatusRequest {
            job_id: ids[0].clone(),
        })
        .await;
    assert_eq!(first.unwrap_err().code(), Code::NotFound);
    for id in &ids[1..] {
        status(&mut client, id).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn concurrency_limit_returns_resource_exhausted_and_recovers() {
    let server = common::start(&["--max-concurrent-jobs", "2"]).await;
    let mut client = server.client().await;
    let a = Job::start(&mut client, shell("sleep 1000")).await;
    let b = Job::start(&mut client, shell("sleep 1000")).await;
    let err = client.exec(shell("true")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("limit 2"), "{}", err.message());

    let health = common::health(&mut client).await;
    assert_eq!(health.active_jobs, 2);

    cancel(&mut client, &a.job_id).await;
    a.finish().await;
    let run = common::run(&mut client, shell("echo again")).await;
    assert_eq!(run.stdout, b"again\n");
    cancel(&mut client, &b.job_id).await;
    b.finish().await;
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_cannot_keep_a_timed_out_job_alive() {
    let server = common::start(&[
        "--job-log-events",
        "16",
        "--job-log-bytes",
        "65536",
        "--cancel-grace",
        "300ms",
    ])
    .await;
    let mut client = server.client().await;
    let req = common::with_timeout(argv(&["cat", "/dev/zero"]), Duration::from_millis(300));
    let mut stream = client.exec(req).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    // Connected but reading nothing more: the job still ends, and its slot is freed.
    let status = wait_finished(&mut client, &first.job_id).await;
    assert_eq!(status.state, JobState::TimedOut as i32);
    assert_group_gone(status_pid(&first)).await;
    let health = common::health(&mut client).await;
    assert_eq!(health.active_jobs, 0);
    // Reading now: a gap that says what it missed (never a silent one), then the end of the
    // output and Exited.
    let mut gaps = Vec::new();
    let exited = loop {
        match stream.message().await.expect("the stream goes on") {
            Some(event) => match event.kind {
                Some(pb::exec_event::Kind::Gap(gap)) => gaps.push(gap),
                Some(pb::exec_event::Kind::Exited(exited)) => break exited,
                _ => {}
            },
            None => panic!("stream ended without Exited"),
        }
    };
    assert_eq!(exited.state, JobState::TimedOut as i32);
    assert!(!gaps.is_empty(), "the reader lost output and was told");
    assert!(
        gaps.iter()
            .all(|gap| gap.lost_stdout_bytes > 0 && gap.exact),
        "{gaps:?}"
    );
    server.stop().await;
}

fn status_pid(started: &pb::ExecEvent) -> u32 {
    match &started.kind {
        Some(pb::exec_event::Kind::Started(s)) => s.pid,
        other => panic!("not Started: {other:?}"),
    }
}

#[tokio::test]
async fn a_slow_reader_pauses_the_process_instead_of_buffering() {
    let server = common::start(&["--job-log-bytes", "2097152"]).await;
    let mut client = server.client().await;
    let job = Job::start(&mut client, argv(&["cat", "/dev/zero"])).await;
    // Not reading: the job may only get as far as the bounded buffers allow.
    let mut emitted = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = status(&mut client, &job.job_id).await.stdout_bytes;
        if now == emitted && now > 0 {
            break;
        }
        emitted = now;
    }
    // The log (2 MiB) + HTTP/2 windows and socket buffers; far below what cat could write.
    assert!(
        emitted < 64 << 20,
        "{emitted} bytes emitted to a client that reads nothing"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        status(&mut client, &job.job_id).await.stdout_bytes,
        emitted,
        "the job kept producing while nobody read"
    );
    cancel(&mut client, &job.job_id).await;
    let run = job.finish().await;
    assert_eq!(run.state(), JobState::Cancelled);
    assert!(run.stdout.iter().all(|&b| b == 0));
    server.stop().await;
}
