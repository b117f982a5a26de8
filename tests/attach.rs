//! Jobs outlive their connection: detach, Attach with exact replay by seq or by offsets, gaps
//! that say what was lost, idempotent Exec, ListJobs, keepalives. Real server, real client.

mod common;

use std::time::Duration;

use common::{Job, JobState, attach, sha256, shell, wait_finished};
use sandbox_runner::{
    proto::{self as pb, GapPolicy, exec_event::Kind, resume_from::Position},
    testing::contract::attach_open,
};
use tonic::Code;

fn detached(command: &str) -> pb::ExecRequest {
    pb::ExecRequest {
        on_disconnect: pb::DisconnectPolicy::Detach as i32,
        ..shell(command)
    }
}

/// 40 numbered lines on each stream, a little apart.
const CHATTY: &str = "for i in $(seq 1 40); do echo out $i; echo err $i >&2; sleep 0.005; done";

fn chatty_text(stream: &str) -> Vec<u8> {
    (1..=40)
        .map(|i| format!("{stream} {i}\n"))
        .collect::<String>()
        .into_bytes()
}

#[tokio::test]
async fn a_detached_job_resumed_by_seq_or_by_offsets_gets_exactly_what_was_missed() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let mut first = Job::start(&mut client, detached(CHATTY)).await;
    first.read_stdout(20).await;
    let (after, received) = (first.last_seq(), first.received());
    let (seen_out, seen_err) = first.kept();
    let (id, _) = first.disconnect();
    let status = wait_finished(&mut client, &id).await;
    assert_eq!(
        status.state,
        JobState::Succeeded as i32,
        "not cancelled by the drop"
    );

    // By seq: exactly the rest, no gap, no duplicate.
    let stream = attach(
        &mut client,
        &id,
        Some(Position::AfterSeq(after)),
        GapPolicy::Fail,
        true,
    )
    .await
    .unwrap();
    let rest = Job::resume(stream, Some(after), received)
        .await
        .finish()
        .await;
    assert!(rest.gaps.is_empty());
    assert_eq!([seen_out.clone(), rest.stdout].concat(), chatty_text("out"));
    assert_eq!([seen_err.clone(), rest.stderr].concat(), chatty_text("err"));

    // By offsets: the same bytes, cut exactly where the client was.
    let offsets = pb::StreamOffsets {
        stdout: received[0],
        stderr: received[1],
    };
    let stream = attach(
        &mut client,
        &id,
        Some(Position::Offsets(offsets)),
        GapPolicy::Fail,
        true,
    )
    .await
    .unwrap();
    let rest = Job::resume(stream, None, received).await.finish().await;
    assert_eq!([seen_out, rest.stdout].concat(), chatty_text("out"));
    assert_eq!([seen_err, rest.stderr].concat(), chatty_text("err"));

    // Two watchers from the start see identical streams: same seqs, same chunks.
    let a = attach(&mut client, &id, None, GapPolicy::Report, true)
        .await
        .unwrap();
    let b = attach(&mut client, &id, None, GapPolicy::Report, true)
        .await
        .unwrap();
    let (a, b) = tokio::join!(async { Job::from_stream(a).await.finish().await }, async {
        Job::from_stream(b).await.finish().await
    });
    assert_eq!(a.chunks, b.chunks);
    assert_eq!(a.stdout, chatty_text("out"));
    server.stop().await;
}

#[tokio::test]
async fn watchers_of_a_running_job_see_identical_events() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let exec = Job::start(&mut client, shell(CHATTY)).await;
    let id = exec.job_id.clone();
    let a = attach(&mut client, &id, None, GapPolicy::Fail, true)
        .await
        .unwrap();
    let b = attach(&mut client, &id, None, GapPolicy::Fail, true)
        .await
        .unwrap();
    let (exec, a, b) = tokio::join!(
        exec.finish(),
        async { Job::from_stream(a).await.finish().await },
        async { Job::from_stream(b).await.finish().await }
    );
    assert_eq!(exec.chunks, a.chunks);
    assert_eq!(exec.chunks, b.chunks);
    assert_eq!(exec.stdout, chatty_text("out"));
    server.stop().await;
}

#[tokio::test]
async fn output_evicted_while_nobody_watched_is_reported_as_a_gap_or_refused() {
    let server = common::start(&["--job-log-bytes", "65536"]).await;
    let mut client = server.client().await;
    let job = Job::start(
        &mut client,
        detached("head -c 1000000 /dev/zero; echo end >&2"),
    )
    .await;
    let (id, _) = job.disconnect();
    let status = wait_finished(&mut client, &id).await;
    let log = status.log.unwrap();
    assert_eq!(
        status.stdout_bytes, 1_000_000,
        "never paused with nobody attached"
    );
    assert!(log.held_bytes <= 65536 && log.stdout_from > 0, "{log:?}");

    let stream = attach(&mut client, &id, None, GapPolicy::Report, true)
        .await
        .unwrap();
    let run = Job::resume(stream, None, [0, 0]).await.finish().await;
    assert_eq!(run.gaps.len(), 1);
    let gap = run.gaps[0];
    assert_eq!(
        (
            gap.lost_stdout_bytes,
            gap.resumed_stdout_offset,
            gap.lost_stderr_bytes,
            gap.exact
        ),
        (log.stdout_from, log.stdout_from, 0, true)
    );
    assert_eq!(gap.resumed_seq, log.first_seq);
    assert_eq!(gap.lost_events, log.first_seq);
    assert_eq!(run.stdout.len() as u64, 1_000_000 - log.stdout_from);
    assert_eq!(run.stderr, b"end\n");

    // The fail policy refuses instead.
    let refused = attach(
        &mut client,
        &id,
        Some(Position::AfterSeq(0)),
        GapPolicy::Fail,
        true,
    )
    .await;
    let refused = match refused {
        Err(status) => status,
        Ok(mut stream) => stream.message().await.unwrap_err(),
    };
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    server.stop().await;
}

#[tokio::test]
async fn attach_refuses_what_it_cannot_serve_with_the_right_codes() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let job = Job::start(&mut client, detached("echo hi")).await;
    let (id, _) = job.disconnect();
    wait_finished(&mut client, &id).await;
    let code = |r: Result<tonic::Streaming<pb::ExecEvent>, tonic::Status>| match r {
        Err(status) => status.code(),
        Ok(_) => Code::Ok,
    };
    assert_eq!(
        code(
            attach(
                &mut client,
                &id,
                Some(Position::AfterSeq(99)),
                GapPolicy::Report,
                true,
            )
            .await
        ),
        Code::OutOfRange
    );
    let beyond = pb::StreamOffsets {
        stdout: 4,
        stderr: 0,
    };
    assert_eq!(
        code(
            attach(
                &mut client,
                &id,
                Some(Position::Offsets(beyond)),
                GapPolicy::Report,
                true,
            )
            .await
        ),
        Code::OutOfRange
    );
    assert_eq!(
        code(attach(&mut client, "nope", None, GapPolicy::Report, true).await),
        Code::NotFound
    );
    // A stream whose first request is not `open`.
    let not_open = client
        .attach(tokio_stream::iter([pb::AttachRequest { kind: None }]))
        .await
        .map(tonic::Response::into_inner);
    assert_eq!(code(not_open), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn unknown_attach_requests_are_unimplemented_a_half_close_ends_nothing_and_idle_streams_get_keepalives()
 {
    let server = common::start(&["--stream-keepalive", "200ms"]).await;
    let mut client = server.client().await;
    let job = Job::start(&mut client, detached("sleep 0.8; echo late")).await;
    let (id, _) = job.disconnect();

    // Half-closed after `open`: events keep coming, with keepalives while the job is quiet.
    let stream = attach(
        &mut client,
        &id,
        Some(Position::AfterSeq(0)),
        GapPolicy::Report,
        true,
    )
    .await
    .unwrap();
    let mut stream = stream;
    let mut keepalives = 0;
    let exited = loop {
        let event = stream.message().await.unwrap().expect("Exited comes");
        match event.kind {
            Some(Kind::Keepalive(_)) => {
                assert_eq!(event.seq, 0, "stands after Started");
                keepalives += 1;
            }
            Some(Kind::Exited(exited)) => break exited,
            _ => {}
        }
    };
    assert_eq!(exited.state, JobState::Succeeded as i32);
    assert!(keepalives >= 2, "{keepalives} keepalives in 0.8 s");

    // After its last event, a finished job's stream ends at once: it has nothing more.
    let mut after_end = attach(
        &mut client,
        &id,
        Some(Position::NewOnly(pb::NewOnly {})),
        GapPolicy::Report,
        false,
    )
    .await
    .unwrap();
    assert!(after_end.message().await.unwrap().is_none());

    // A request this server does not know (empty here; a request of a newer client):
    // UNIMPLEMENTED.
    let running = Job::start(&mut client, detached("sleep 30")).await;
    let (running, _) = running.disconnect();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(attach_open(
        &running,
        Some(Position::NewOnly(pb::NewOnly {})),
        GapPolicy::Report,
        false,
    ))
    .await
    .unwrap();
    let mut stream = client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(pb::AttachRequest { kind: None }).await.unwrap();
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    common::cancel(&mut client, &running).await;
    server.stop().await;
}

#[tokio::test]
async fn a_retried_idempotent_exec_does_not_run_twice() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let dir = std::env::temp_dir().join(format!("sr-idem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("runs");
    let request = pb::ExecRequest {
        idempotency_key: "deploy-42".into(),
        ..detached(&format!("echo ran >> {}; echo done", file.display()))
    };
    let first = Job::start(&mut client, request.clone()).await;
    let (id, _) = first.disconnect();
    // The retry (say, after a dropped connection) gets the first job, from the start.
    let retry = Job::start(&mut client, request.clone()).await;
    assert_eq!(retry.job_id, id);
    let run = retry.finish().await;
    assert_eq!(run.stdout, b"done\n");
    let again = common::run(&mut client, request.clone()).await;
    assert_eq!(again.job_id, id);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "ran\n", "ran once");

    // The same key with another request.
    let other = pb::ExecRequest {
        idempotency_key: "deploy-42".into(),
        ..detached("echo other")
    };
    let refused = client.exec(other).await.unwrap_err();
    assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
    std::fs::remove_dir_all(&dir).unwrap();
    server.stop().await;
}

#[tokio::test]
async fn list_jobs_filters_and_pages() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let request = pb::ExecRequest {
            task_id: if i % 2 == 0 { "even" } else { "odd" }.into(),
            session_id: "s".into(),
            ..detached(if i == 4 { "true" } else { "sleep 30" })
        };
        let job = Job::start(&mut client, request).await;
        ids.push(job.disconnect().0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_finished(&mut client, &ids[4]).await;

    let list = |req: pb::ListJobsRequest| {
        let mut client = client.clone();
        async move { client.list_jobs(req).await.map(|r| r.into_inner()) }
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..5 {
        let page = list(pb::ListJobsRequest {
            page_size: 2,
            page_token: token.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        seen.extend(page.jobs.into_iter().map(|j| j.job_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let newest_first: Vec<_> = ids.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);

    let running_even = list(pb::ListJobsRequest {
        task_id: "even".into(),
        state: JobState::Running as i32,
        ..Default::default()
    })
    .await
    .unwrap();
    let got: Vec<_> = running_even.jobs.iter().map(|j| j.job_id.clone()).collect();
    assert_eq!(got, [ids[2].clone(), ids[0].clone()]);
    assert!(
        running_even
            .jobs
            .iter()
            .all(|j| j.on_disconnect == pb::DisconnectPolicy::Detach as i32)
    );

    let bad = list(pb::ListJobsRequest {
        page_token: "not a token".into(),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    for id in &ids {
        common::cancel(&mut client, id).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn the_grace_policy_cancels_a_job_nobody_watches() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let request = pb::ExecRequest {
        on_disconnect: pb::DisconnectPolicy::CancelAfterGrace as i32,
        disconnect_grace: Some(prost_types::Duration {
            seconds: 0,
            nanos: 300_000_000,
        }),
        ..shell("sleep 30")
    };
    let job = Job::start(&mut client, request).await;
    let (id, pid) = job.disconnect();
    let status = wait_finished(&mut client, &id).await;
    assert_eq!(status.state, JobState::Cancelled as i32);
    assert_eq!(status.message, "cancelled: no client attached for 300ms");
    assert_eq!(
        status.on_disconnect,
        pb::DisconnectPolicy::CancelAfterGrace as i32
    );
    common::assert_group_gone(pid).await;

    // Without a grace the policy is refused.
    let refused = client
        .exec(pb::ExecRequest {
            on_disconnect: pb::DisconnectPolicy::CancelAfterGrace as i32,
            ..shell("true")
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    server.stop().await;
}

/// 50 MiB of random bytes, read through a bounded number of random disconnects, each resumed
/// by seq or by offsets: the reassembled stream is the job's, byte for byte.
#[tokio::test]
async fn random_disconnects_and_resumes_never_lose_or_duplicate_a_byte() {
    const SIZE: u64 = 50 << 20;
    // A log that holds the whole output: detached, the job is never paused, and nothing is
    // evicted while the client reconnects. The event bound counts too: a reader that keeps up
    // sees chunks as small as the writer's 4-8 KiB writes, so 50 MiB can be 12,800 events. And
    // the budget: a chunk holds the credit of the buffer it was read into (up to 4x its bytes:
    // see `OutputReader::next`), so 50 MiB may hold 200 MiB of it; past the budget, history
    // nobody is attached to is given up. And the job may well finish while the client is
    // between connections (under load: CI lost 1-2 MiB so): a finished job's log keeps at most
    // --retained-output-bytes (16 MiB by default) for late readers, so that is raised too.
    let server = common::start(&[
        "--retained-output-bytes",
        "134217728",
        "--job-log-bytes",
        "67108864",
        "--job-log-events",
        "131072",
        "--output-budget-bytes",
        "536870912",
    ])
    .await;
    let mut client = server.client().await;
    let dir = std::env::temp_dir().join(format!("sr-resume-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("out");
    let command = format!("head -c {SIZE} /dev/urandom | tee {}", copy.display());
    let mut rng = fastrand::Rng::with_seed(0x5eed);

    let mut job = Job::start(&mut client, detached(&command)).await;
    let id = job.job_id.clone();
    let mut stdout = Vec::new();
    let mut reconnects = 0;
    loop {
        // Read a random amount (whole events), then drop the connection's stream.
        let target = job.received()[0] + rng.u64((256 << 10)..(4 << 20));
        if target >= SIZE || reconnects == 100 {
            break;
        }
        job.read_stdout(target as usize).await;
        let (after, received) = (job.last_seq(), job.received());
        stdout.extend(job.kept().0);
        drop(job);
        reconnects += 1;
        let by_seq = rng.bool();
        let from = if by_seq {
            Position::AfterSeq(after)
        } else {
            Position::Offsets(pb::StreamOffsets {
                stdout: received[0],
                stderr: received[1],
            })
        };
        let stream = attach(&mut client, &id, Some(from), GapPolicy::Fail, true)
            .await
            .unwrap();
        job = Job::resume(stream, by_seq.then_some(after), received).await;
    }
    let gaps = job.gaps();
    let run = job.finish().await;
    assert_eq!(run.state(), JobState::Succeeded);
    stdout.extend(run.stdout);
    assert!(gaps.is_empty(), "{gaps:?}");
    assert_eq!(stdout.len() as u64, SIZE);
    let written = std::fs::read(&copy).unwrap();
    assert_eq!(sha256(&stdout), sha256(&written));
    eprintln!("{reconnects} reconnects");
    assert!(reconnects >= 10, "only {reconnects} reconnects");
    std::fs::remove_dir_all(&dir).unwrap();
    server.stop().await;
}
