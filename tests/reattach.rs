//! Daytona jobs outlive their replica: Attach on any replica follows the job's session itself
//! (resumed by offsets, byte-exact, with the real exit code), a replica restarted under the same
//! name finds its jobs by their handle, SIGTERM leaves detached jobs running, idle followers
//! stop following without cancelling, and the sweep deletes the sessions of ended jobs once
//! (never running ones, never others'). Real servers, the fake Daytona over loopback.

mod common;

use std::time::Duration;

use common::{Job, JobState, TestServer, attach, shell, status};
use sandbox_runner::{
    proto::{
        self as pb, GapPolicy, exec_event::Kind, resume_from::Position,
        sandbox_service_client::SandboxServiceClient,
    },
    testing::daytona::FakeDaytona,
};
use tonic::{Code, Streaming, transport::Channel};

const KEY: &str = common::DAYTONA_KEY;
const SIGNING_KEY: &str = "0123456789abcdef0123456789abcdef-reattach";
const SANDBOX: &str = "sbx";

async fn replica(fake: &FakeDaytona, name: &str, extra: &[&str]) -> TestServer {
    let mut args = vec!["--replica-name", name, "--job-id-signing-key", SIGNING_KEY];
    args.extend_from_slice(extra);
    common::start_daytona(fake, &args).await
}

async fn fake() -> FakeDaytona {
    let fake = FakeDaytona::start(KEY).await;
    fake.add_sandbox(SANDBOX, "started");
    fake
}

fn detached(command: &str) -> pb::ExecRequest {
    pb::ExecRequest {
        sandbox_id: SANDBOX.into(),
        on_disconnect: pb::DisconnectPolicy::Detach as i32,
        ..shell(command)
    }
}

/// `n` numbered lines on each stream, a little apart, then `exit 7`.
fn chatty(n: u32, pause: &str) -> String {
    format!("for i in $(seq 1 {n}); do echo out $i; echo err $i >&2; sleep {pause}; done; exit 7")
}

fn chatty_text(n: u32, stream: &str) -> Vec<u8> {
    (1..=n)
        .map(|i| format!("{stream} {i}\n"))
        .collect::<String>()
        .into_bytes()
}

fn offsets(received: [u64; 2]) -> Option<Position> {
    Some(Position::Offsets(pb::StreamOffsets {
        stdout: received[0],
        stderr: received[1],
    }))
}

/// Polls until `done` (bounded: 15 s).
async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..300 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} did not happen");
}

/// Reads an Exec stream, keeping each stream's bytes (checking offsets), until it fails; the
/// status it failed with.
async fn read_until_error(
    stream: &mut Streaming<pb::ExecEvent>,
    kept: &mut [Vec<u8>; 2],
) -> tonic::Status {
    loop {
        match stream.message().await {
            Ok(Some(event)) => match event.kind {
                Some(Kind::Output(out)) => {
                    let slot =
                        &mut kept[usize::from(out.stream == pb::OutputStream::Stderr as i32)];
                    assert_eq!(out.offset, slot.len() as u64, "offsets add up");
                    slot.extend_from_slice(&out.data);
                }
                Some(Kind::Exited(exited)) => panic!("a made-up exit: {exited:?}"),
                _ => {}
            },
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => return status,
        }
    }
}

async fn list_ids(client: &mut SandboxServiceClient<Channel>) -> Vec<String> {
    let jobs = client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("ListJobs")
        .into_inner()
        .jobs;
    jobs.into_iter().map(|job| job.job_id).collect()
}

#[tokio::test]
async fn a_detached_job_outlives_its_replica_and_is_resumed_on_another_by_offsets() {
    let fake = fake().await;
    let a = replica(&fake, "replica-a", &["--drain-grace", "200ms"]).await;
    let b = replica(
        &fake,
        "replica-b",
        &[
            "--finished-job-ttl",
            "300ms",
            "--session-sweep-interval",
            "100ms",
        ],
    )
    .await;
    let mut client_a = a.client().await;
    let mut client_b = b.client().await;

    let mut stream = client_a
        .exec(detached(&chatty(40, "0.05")))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let id = first.job_id.clone();
    let mut kept = [Vec::new(), Vec::new()];
    // SIGTERM while the Exec stream still reads: after the drain grace the job is left, and
    // the stream says so instead of making up an exit.
    let stop = tokio::spawn(a.stop());
    let ended = read_until_error(&mut stream, &mut kept).await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(
        ended
            .message()
            .contains("resume on another replica by offsets"),
        "{}",
        ended.message()
    );
    stop.await.unwrap();
    assert!(!kept[0].is_empty(), "some output came before the drain");
    assert!(
        kept[0].len() < chatty_text(40, "out").len(),
        "the job had not ended"
    );
    assert_eq!(fake.live_sessions(), 1, "the session was left running");

    // B: the rest, byte-exact, and the real exit code.
    let received = [kept[0].len() as u64, kept[1].len() as u64];
    let stream = attach(&mut client_b, &id, offsets(received), GapPolicy::Fail, true)
        .await
        .unwrap();
    let rest = Job::resume(stream, None, received).await.finish().await;
    assert!(rest.gaps.is_empty());
    assert_eq!(
        [&kept[0][..], &rest.stdout].concat(),
        chatty_text(40, "out")
    );
    assert_eq!(
        [&kept[1][..], &rest.stderr].concat(),
        chatty_text(40, "err")
    );
    assert_eq!(rest.exited.exit_code, Some(7));
    assert_eq!(rest.state(), JobState::Failed);
    assert_eq!(
        status(&mut client_b, &id).await.state,
        JobState::Failed as i32
    );

    // Nobody deletes the ended job's session but the sweep, once the retention has passed.
    eventually("the sweep of the ended session", async || {
        fake.live_sessions() == 0
    })
    .await;
    b.stop().await;
}

#[tokio::test]
async fn another_replica_follows_a_running_job_byte_for_byte_and_refuses_its_seqs() {
    let fake = fake().await;
    let a = replica(&fake, "replica-a", &[]).await;
    let b = replica(&fake, "replica-b", &[]).await;
    let mut client_a = a.client().await;
    let mut client_b = b.client().await;

    let mut job = Job::start(&mut client_a, detached(&chatty(30, "0.03"))).await;
    job.read_stdout(20).await;
    let received = job.received();
    let (seen_out, seen_err) = job.kept();

    let err = attach(
        &mut client_b,
        &job.job_id,
        Some(Position::AfterSeq(job.last_seq())),
        GapPolicy::Report,
        true,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("by offsets"), "{}", err.message());

    let by_offsets = attach(
        &mut client_b,
        &job.job_id,
        offsets(received),
        GapPolicy::Fail,
        true,
    )
    .await
    .unwrap();
    let from_start = attach(&mut client_b, &job.job_id, None, GapPolicy::Fail, true)
        .await
        .unwrap();
    // The follower reports the policy the job was started with (the id carries it).
    let on_b = status(&mut client_b, &job.job_id).await;
    assert_eq!(on_b.on_disconnect, pb::DisconnectPolicy::Detach as i32);
    let (on_a, rest, whole) = tokio::join!(
        job.finish(),
        async { Job::resume(by_offsets, None, received).await.finish().await },
        async { Job::from_stream(from_start).await.finish().await }
    );
    // A's Exec reader kept everything from the start.
    let (on_a_stdout, on_a_stderr) = (on_a.stdout, on_a.stderr);
    assert_eq!(on_a_stdout, chatty_text(30, "out"));
    assert_eq!([seen_out, rest.stdout].concat(), on_a_stdout);
    assert_eq!([seen_err, rest.stderr].concat(), on_a_stderr);
    assert_eq!(whole.stdout, on_a_stdout);
    assert_eq!(whole.stderr, on_a_stderr);
    assert_eq!(on_a.exited.exit_code, Some(7));
    // B reads the exit code unless A, which deletes the session as soon as the command ends,
    // was first: then B says so rather than guess.
    for exited in [&rest.exited, &whole.exited] {
        assert!(
            exited.exit_code == Some(7)
                || (exited.exit_code.is_none()
                    && exited.message.contains("deleted by the replica")),
            "{exited:?}"
        );
    }
    // B follows, A owns: the session went with A's end of the job.
    eventually("the owner's delete", async || fake.live_sessions() == 0).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_replica_restarted_under_its_name_follows_its_earlier_jobs_by_handle() {
    let fake = fake().await;
    let first = replica(&fake, "r1", &["--drain-grace", "100ms"]).await;
    let mut client = first.client().await;
    let job = Job::start(&mut client, detached("echo before; sleep 2; echo after")).await;
    let (id, _) = job.disconnect();
    first.stop().await;

    let again = replica(&fake, "r1", &[]).await;
    let mut client = again.client().await;
    // Not NOT_FOUND: the backend still knows the job.
    let state = status(&mut client, &id).await.state;
    assert!(
        [JobState::Running as i32, JobState::Succeeded as i32].contains(&state),
        "{state}"
    );
    let stream = attach(&mut client, &id, None, GapPolicy::Fail, true)
        .await
        .unwrap();
    let run = Job::from_stream(stream).await.finish().await;
    assert_eq!(run.stdout, b"before\nafter\n");
    assert_eq!(run.state(), JobState::Succeeded);
    again.stop().await;

    // A local job's id names no handle: after a restart it is simply unknown.
    let local = common::start(&["--replica-name", "r1", "--job-id-signing-key", SIGNING_KEY]).await;
    let mut client = local.client().await;
    let job = Job::start(&mut client, shell("true")).await;
    let (id, _) = job.disconnect();
    local.stop().await;
    let local = common::start(&["--replica-name", "r1", "--job-id-signing-key", SIGNING_KEY]).await;
    let mut client = local.client().await;
    let err = client
        .status(pb::StatusRequest { job_id: id })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    local.stop().await;
}

#[tokio::test]
async fn a_follower_nobody_watches_stops_following_without_cancelling() {
    let fake = fake().await;
    let a = replica(&fake, "replica-a", &[]).await;
    let b = replica(&fake, "replica-b", &["--follow-idle", "200ms"]).await;
    let mut client_a = a.client().await;
    let mut client_b = b.client().await;
    let job = Job::start(&mut client_a, detached("echo up; sleep 1000")).await;
    let (id, _) = job.disconnect();

    let stream = attach(&mut client_b, &id, None, GapPolicy::Report, false)
        .await
        .unwrap();
    let mut watcher = Job::from_stream(stream).await;
    watcher.read_stdout(3).await;
    assert!(list_ids(&mut client_b).await.contains(&id));
    drop(watcher);

    eventually("the follower's leaving", async || {
        !list_ids(&mut client_b).await.contains(&id)
    })
    .await;
    assert_eq!(
        status(&mut client_a, &id).await.state,
        JobState::Running as i32
    );
    // B answers from the backend again.
    assert_eq!(
        status(&mut client_b, &id).await.state,
        JobState::Running as i32
    );
    assert_eq!(fake.live_sessions(), 1);

    common::cancel(&mut client_b, &id).await;
    eventually("the cancel", async || fake.live_sessions() == 0).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn the_sweep_deletes_ended_sessions_of_ours_once_and_nothing_else() {
    let fake = fake().await;
    let ours_ended = ["sandbox-runner-ended-0", "sandbox-runner-ended-1"];
    fake.plant_session(SANDBOX, ours_ended[0], Some(0));
    fake.plant_session(SANDBOX, ours_ended[1], Some(137));
    fake.plant_session(SANDBOX, "sandbox-runner-running", None);
    fake.plant_session(SANDBOX, "someone-elses-ended", Some(0));
    // Every request a little slow, so the two replicas' sweeps overlap.
    fake.faults()
        .api_delay_ms
        .store(20, std::sync::atomic::Ordering::Relaxed);
    let sweeping = [
        "--finished-job-ttl",
        "200ms",
        "--session-sweep-interval",
        "50ms",
    ];
    let b = replica(&fake, "replica-b", &sweeping).await;
    let c = replica(&fake, "replica-c", &sweeping).await;

    eventually("the sweep", async || {
        fake.session_ids(SANDBOX) == ["sandbox-runner-running", "someone-elses-ended"]
    })
    .await;
    // Give racing sweeps time to do any harm, then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let deletes = fake.delete_requests();
    for session in ours_ended {
        let n = deletes.iter().filter(|d| *d == session).count();
        assert_eq!(n, 1, "{session} deleted once, not {n} times: {deletes:?}");
    }
    // Leases were taken and given back.
    assert_eq!(
        fake.session_ids(SANDBOX),
        ["sandbox-runner-running", "someone-elses-ended"]
    );
    b.stop().await;
    c.stop().await;
}
