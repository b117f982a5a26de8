//! Starting jobs: the concurrency limit, timeouts, failed starts; finished-job retention.

use super::*;
use crate::error::Error;
use crate::job::{
    BackendError, JobId, JobState,
    JobState::{Failed, Running, Succeeded, TimedOut},
};

#[tokio::test(start_paused = true)]
async fn the_concurrency_limit_frees_a_slot_when_a_program_ends() {
    // Nobody reading: the quick job's events wait in its log for its client, but its slot is
    // free as soon as its program ended.
    let h = Harness::new(JobsConfig {
        max_concurrent: 2,
        ..config()
    });
    let mut quick = h.run("quick", Script::new().wait(secs(1)).exit(0)).await;
    let _slow = h.run("slow", Script::new().until_stopped()).await;
    assert_eq!(h.jobs.active(), 2);
    match h.jobs.start(spec("third")).await {
        Err(Error::TooManyJobs { limit }) => assert_eq!(limit, 2),
        other => panic!("expected TooManyJobs, got {:?}", other.map(|s| s.job_id)),
    }
    assert_eq!(
        h.backend.starts().len(),
        2,
        "a refused job never reaches the backend"
    );

    within(h.backend.runs_ended(1)).await;
    assert_eq!(h.jobs.active(), 1);
    let third = h.run("third", Script::new().until_stopped()).await;
    assert_eq!(h.jobs.active(), 2);
    assert!(matches!(
        h.jobs.start(spec("fourth")).await,
        Err(Error::TooManyJobs { limit: 2 })
    ));

    // The quick job's client still gets all of it.
    assert!(matches!(
        quick.event().await.unwrap().unwrap().kind,
        EventKind::Started { .. }
    ));
    let Some(Ok(JobEvent {
        kind: EventKind::Exited(exit),
        ..
    })) = quick.event().await
    else {
        panic!("Exited follows");
    };
    assert_eq!(exit.state, Succeeded);
    drop(third);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_above_the_maximum_is_refused() {
    let h = Harness::new(config());
    h.backend.script_for("sleep", Script::new().until_stopped());
    match h.jobs.start(spec_with_timeout("sleep", secs(601))).await {
        Err(Error::TimeoutTooLong { requested, max }) => {
            assert_eq!((requested, max), (secs(601), secs(600)))
        }
        other => panic!("expected TimeoutTooLong, got {:?}", other.map(|s| s.job_id)),
    }
    assert!(h.backend.starts().is_empty());
    assert_eq!(h.jobs.active(), 0);

    // The maximum itself is allowed.
    let stream = h
        .jobs
        .start(spec_with_timeout("sleep", secs(600)))
        .await
        .unwrap();
    let exit = check_events(&read_all(stream).await);
    assert_eq!(
        (exit.state, exit.message.as_str()),
        (TimedOut, "timed out after 10m")
    );
    assert_eq!(h.backend.runs()[0].stop_seen, Some(secs(600)));
}

#[tokio::test(start_paused = true)]
async fn the_default_timeout_applies_when_none_is_requested() {
    let h = Harness::new(config());
    let exit = check_events(&read_all(h.run("sleep", Script::new().until_stopped()).await).await);
    assert_eq!(
        (exit.state, exit.message.as_str()),
        (TimedOut, "timed out after 1m")
    );
    assert_eq!(h.backend.runs()[0].stop_seen, Some(secs(60)));
}

#[tokio::test(start_paused = true)]
async fn a_failed_start_returns_the_backend_error_and_takes_no_slot() {
    let h = Harness::new(JobsConfig {
        max_concurrent: 1,
        ..config()
    });
    h.backend.script_for(
        "down",
        Script::new()
            .start_delay(secs(3))
            .fail_start(|| BackendError::Unavailable("connection refused".into())),
    );
    let error = match h.jobs.start(spec("down")).await {
        Err(e @ Error::Backend(BackendError::Unavailable(_))) => e,
        other => panic!("expected Unavailable, got {:?}", other.map(|s| s.job_id)),
    };
    assert_eq!(
        error.to_string(),
        "the backend is unavailable: connection refused"
    );
    assert_eq!(h.jobs.active(), 0);
    assert!(h.backend.runs().is_empty());

    // The sinks see exactly one event: a FAILED Exited with the reason.
    let opened = h.sink.opened();
    assert_eq!(opened.len(), 1);
    let events = h.sink.events(&opened[0]);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].seq, 0);
    let EventKind::Exited(exit) = &events[0].kind else {
        panic!("not Exited: {events:?}");
    };
    assert_eq!(
        ending(exit),
        (
            Failed,
            None,
            None,
            "the backend is unavailable: connection refused"
        )
    );
    assert_eq!(
        (exit.duration, exit.stdout_bytes, exit.stderr_bytes),
        (Duration::ZERO, 0, 0)
    );

    // The one slot is free.
    let exit = check_events(&read_all(h.run("up", Script::new().exit(0)).await).await);
    assert_eq!(exit.state, Succeeded);
}

#[tokio::test(start_paused = true)]
async fn a_job_without_a_script_does_not_start() {
    let h = Harness::new(config());
    match h.jobs.start(spec("unscripted")).await {
        Err(Error::Backend(BackendError::InvalidRequest(message))) => {
            assert_eq!(message, "fake backend: no script for \"unscripted\"")
        }
        other => panic!("expected InvalidRequest, got {:?}", other.map(|s| s.job_id)),
    }
}

async fn state(h: &Harness, id: &JobId) -> Result<JobState, String> {
    match h.jobs.status(id).await {
        Ok(snapshot) => Ok(snapshot.state),
        Err(Error::JobNotFound(missing)) => {
            assert_eq!(missing, id.to_string());
            Err("not found".into())
        }
        Err(other) => panic!("unexpected {other}"),
    }
}

/// Runs one job that exits 0 to its end; returns its id.
async fn finish_one(h: &Harness, command: &str) -> JobId {
    let stream = h.run(command, Script::new().exit(0)).await;
    let id = stream.job_id.clone();
    assert_eq!(check_events(&read_all(stream).await).state, Succeeded);
    id
}

#[tokio::test(start_paused = true)]
async fn a_finished_job_is_kept_for_the_ttl() {
    let h = Harness::new(JobsConfig {
        finished_ttl: secs(60),
        ..config()
    });
    let id = finish_one(&h, "true").await;
    assert_eq!(state(&h, &id).await, Ok(Succeeded));
    tokio::time::sleep(secs(59)).await;
    assert_eq!(state(&h, &id).await, Ok(Succeeded));
    tokio::time::sleep(secs(1)).await;
    assert_eq!(state(&h, &id).await, Err("not found".into()));
    assert!(matches!(
        h.jobs.cancel(&id).await,
        Err(Error::JobNotFound(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn only_the_newest_finished_jobs_are_kept() {
    let h = Harness::new(JobsConfig {
        finished_capacity: 2,
        ..config()
    });
    // A running job is not a finished one: it is kept however many finish meanwhile.
    let running = h.run("sleep", Script::new().until_stopped()).await;
    let running_id = running.job_id.clone();
    let first = finish_one(&h, "first").await;
    let second = finish_one(&h, "second").await;
    let third = finish_one(&h, "third").await;
    assert_eq!(state(&h, &first).await, Err("not found".into()));
    assert_eq!(state(&h, &second).await, Ok(Succeeded));
    assert_eq!(state(&h, &third).await, Ok(Succeeded));
    assert_eq!(state(&h, &running_id).await, Ok(Running));

    // Once it finishes, it is the newest, and the oldest kept one goes.
    drop(running);
    within(h.sink.exited(&running_id)).await;
    // The job is retired once `Exited` went out, right after the sink saw it.
    tokio::task::yield_now().await;
    assert_eq!(state(&h, &second).await, Err("not found".into()));
    assert_eq!(state(&h, &third).await, Ok(Succeeded));
    assert_eq!(
        state(&h, &running_id).await,
        Ok(JobState::Cancelled),
        "kept as the newest"
    );
}

#[tokio::test(start_paused = true)]
async fn unknown_and_forged_ids_are_told_apart() {
    let h = Harness::new(config());
    let (unknown, _) = JobIdCodec::new(b"test key", "replica-test").issue(
        &spec("x").meta,
        "fake",
        None,
        (std::time::Duration::from_secs(1), Default::default()),
    );
    assert_eq!(state(&h, &unknown).await, Err("not found".into()));
    let forged = JobId::from_caller("j1.e30.AAAA");
    assert!(matches!(
        h.jobs.status(&forged).await,
        Err(Error::InvalidJobId { .. })
    ));
}
