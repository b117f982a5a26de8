//! Jobs outlive their Exec stream as their disconnect policy says; Attach follows them;
//! idempotent starts run once; ListJobs filters and pages.

use super::*;
use crate::job::{
    DisconnectPolicy, GapPolicy, JobFilter, JobState,
    JobState::{Cancelled, Running, Succeeded},
    Pace, Position,
    StreamKind::Stdout,
};

fn with_policy(command: &str, on_disconnect: DisconnectPolicy) -> JobSpec {
    JobSpec {
        on_disconnect,
        ..spec(command)
    }
}

fn with_key(command: &str, key: &str) -> JobSpec {
    JobSpec {
        idempotency_key: Some(key.into()),
        on_disconnect: DisconnectPolicy::Detach,
        ..spec(command)
    }
}

async fn state_after(h: &Harness, id: &super::super::JobId, wait: Duration) -> JobState {
    tokio::time::sleep(wait).await;
    h.jobs.status(id).await.unwrap().state
}

#[tokio::test(start_paused = true)]
async fn the_cancel_policy_cancels_when_the_exec_stream_drops_but_never_for_an_attach() {
    let h = Harness::new(config());
    h.backend.script_for("sleep", Script::new().until_stopped());
    let exec = h.jobs.start(spec("sleep")).await.unwrap();
    let id = exec.job_id.clone();
    let watcher = h
        .jobs
        .attach(&id, Position::New, GapPolicy::Report, Pace::Watch)
        .await
        .unwrap();
    drop(watcher);
    assert_eq!(state_after(&h, &id, secs(10)).await, Running);
    drop(exec);
    let exit = within(h.sink.exited(&id)).await;
    assert_eq!(
        (exit.state, exit.message.as_str()),
        (Cancelled, "cancelled: the client closed the stream")
    );
}

#[tokio::test(start_paused = true)]
async fn a_detached_job_runs_on_and_a_later_attach_gets_all_of_it() {
    let h = Harness::new(config());
    h.backend.script_for(
        "work",
        Script::new()
            .stdout("one ")
            .wait(secs(30))
            .stdout("two")
            .exit(0),
    );
    let mut exec = h
        .jobs
        .start(with_policy("work", DisconnectPolicy::Detach))
        .await
        .unwrap();
    let id = exec.job_id.clone();
    let started = exec.event().await.unwrap().unwrap();
    drop(exec);
    assert_eq!(h.jobs.status(&id).await.unwrap().log.unwrap().attached, 0);
    let exit = within(h.sink.exited(&id)).await;
    assert_eq!(exit.state, Succeeded);

    // After the last seq it saw: exactly the rest, no duplicate.
    let rest = read_all(
        h.jobs
            .attach(
                &id,
                Position::AfterSeq(started.seq),
                GapPolicy::Report,
                Pace::Lossless,
            )
            .await
            .unwrap(),
    )
    .await;
    let all = h.sink.events(&id);
    assert_eq!(rest, all[1..]);
    // From the start, and by offsets, the same bytes.
    let from_start = read_all(
        h.jobs
            .attach(&id, Position::Start, GapPolicy::Report, Pace::Lossless)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(from_start, all);
    let by_offsets = read_all(
        h.jobs
            .attach(
                &id,
                Position::Offsets {
                    stdout: 2,
                    stderr: 0,
                },
                GapPolicy::Report,
                Pace::Lossless,
            )
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        outputs(&by_offsets),
        [(Stdout, 2, "e ".into()), (Stdout, 4, "two".into())]
    );
}

#[tokio::test(start_paused = true)]
async fn the_grace_policy_cancels_only_after_the_grace_with_nobody_attached() {
    let h = Harness::new(config());
    h.backend.script_for("sleep", Script::new().until_stopped());
    let exec = h
        .jobs
        .start(JobSpec {
            timeout: Some(secs(600)),
            ..with_policy("sleep", DisconnectPolicy::CancelAfter(secs(30)))
        })
        .await
        .unwrap();
    let id = exec.job_id.clone();
    drop(exec);
    // Someone attaches within the grace: the job goes on.
    assert_eq!(state_after(&h, &id, secs(20)).await, Running);
    let watcher = h
        .jobs
        .attach(&id, Position::New, GapPolicy::Report, Pace::Watch)
        .await
        .unwrap();
    assert_eq!(state_after(&h, &id, secs(120)).await, Running);
    // They leave: the grace starts again.
    drop(watcher);
    let t0 = tokio::time::Instant::now();
    let exit = within(h.sink.exited(&id)).await;
    assert_eq!(t0.elapsed(), secs(30));
    assert_eq!(
        (exit.state, exit.message.as_str()),
        (Cancelled, "cancelled: no client attached for 30s")
    );
}

#[tokio::test(start_paused = true)]
async fn a_retried_start_with_the_same_key_attaches_instead_of_running_again() {
    let h = Harness::new(config());
    h.backend.script_for(
        "once",
        Script::new().stdout("side effect").wait(secs(5)).exit(0),
    );
    let first = h.jobs.start(with_key("once", "key-1")).await.unwrap();
    let id = first.job_id.clone();
    drop(first);
    let again = h.jobs.start(with_key("once", "key-1")).await.unwrap();
    assert_eq!(again.job_id, id);
    let events = read_all(again).await;
    assert_eq!(check_events(&events).stdout_bytes, 11);
    assert_eq!(h.backend.starts().len(), 1, "ran once");
    // Still remembered once finished.
    let late = h.jobs.start(with_key("once", "key-1")).await.unwrap();
    assert_eq!(late.job_id, id);
    assert_eq!(h.backend.starts().len(), 1);

    // The same key for another request is refused.
    match h.jobs.start(with_key("other", "key-1")).await {
        Err(Error::IdempotencyKeyReused(key)) => assert_eq!(key, "key-1"),
        other => panic!(
            "expected IdempotencyKeyReused, got {:?}",
            other.map(|s| s.job_id)
        ),
    }
    // Forgotten with its job: the key starts a new one.
    tokio::time::sleep(secs(301)).await;
    let fresh = h.jobs.start(with_key("once", "key-1")).await.unwrap();
    assert_ne!(fresh.job_id, id);
    assert_eq!(h.backend.starts().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn concurrent_starts_with_one_key_run_one_job() {
    let h = Harness::new(config());
    h.backend.script_for(
        "slow start",
        Script::new().start_delay(secs(3)).stdout("x").exit(0),
    );
    let (a, b) = tokio::join!(
        h.jobs.start(with_key("slow start", "k")),
        h.jobs.start(with_key("slow start", "k"))
    );
    assert_eq!(a.unwrap().job_id, b.unwrap().job_id);
    assert_eq!(h.backend.starts().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_key_whose_start_failed_can_be_retried() {
    let h = Harness::new(config());
    h.backend
        .push(Script::new().fail_start(|| crate::job::BackendError::Unavailable("down".into())));
    assert!(h.jobs.start(with_key("flaky", "k")).await.is_err());
    h.backend.script_for("flaky", Script::new().exit(0));
    let events = read_all(h.jobs.start(with_key("flaky", "k")).await.unwrap()).await;
    assert_eq!(check_events(&events).state, Succeeded);
}

#[tokio::test(start_paused = true)]
async fn list_filters_and_pages_newest_first() {
    let h = Harness::new(JobsConfig {
        max_concurrent: 16,
        ..config()
    });
    let mut streams = Vec::new();
    for i in 0..5 {
        h.backend
            .script_for(&format!("job {i}"), Script::new().until_stopped());
        let spec = JobSpec {
            meta: JobMeta {
                task_id: if i % 2 == 0 { "even" } else { "odd" }.into(),
                ..spec("").meta
            },
            ..spec(&format!("job {i}"))
        };
        streams.push(h.jobs.start(spec).await.unwrap());
        tokio::time::sleep(secs(1)).await;
    }
    let ids: Vec<_> = streams.iter().map(|s| s.job_id.clone()).collect();
    h.jobs.cancel(&ids[4]).await.unwrap();
    within(h.sink.exited(&ids[4])).await;

    let all = JobFilter::default();
    let (page, next) = h.jobs.list(&all, 2, None);
    assert_eq!(
        page.iter().map(|j| &j.id).collect::<Vec<_>>(),
        [&ids[4], &ids[3]]
    );
    let (page2, next2) = h.jobs.list(&all, 2, next.as_ref());
    assert_eq!(
        page2.iter().map(|j| &j.id).collect::<Vec<_>>(),
        [&ids[2], &ids[1]]
    );
    let (page3, next3) = h.jobs.list(&all, 2, next2.as_ref());
    assert_eq!(page3.iter().map(|j| &j.id).collect::<Vec<_>>(), [&ids[0]]);
    assert!(next3.is_none());

    let even_running = JobFilter {
        task_id: Some("even".into()),
        state: Some(Running),
        ..JobFilter::default()
    };
    let (page, _) = h.jobs.list(&even_running, 10, None);
    assert_eq!(
        page.iter().map(|j| &j.id).collect::<Vec<_>>(),
        [&ids[2], &ids[0]]
    );
    drop(streams);
}
