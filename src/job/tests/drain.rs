//! Draining for shutdown: no new jobs, a grace for running ones, then cancel and a bounded wait.

use tokio::time::Instant;

use super::*;
use crate::error::Error;
use crate::job::{
    DisconnectPolicy,
    JobState::{Cancelled, Succeeded},
    Outcome,
    StreamKind::Stdout,
};

const SHUTTING_DOWN: &str = "cancelled: the server is shutting down";

/// Starts `drain(grace)` on a task and returns once it began; the task returns how long the
/// drain took.
async fn start_drain(h: &Harness, grace: Duration) -> tokio::task::JoinHandle<Duration> {
    let jobs = Arc::clone(&h.jobs);
    let t0 = Instant::now();
    let drain = tokio::spawn(async move {
        jobs.drain(grace).await;
        t0.elapsed()
    });
    while !h.jobs.is_draining() {
        tokio::task::yield_now().await;
    }
    drain
}

#[tokio::test(start_paused = true)]
async fn a_draining_server_refuses_new_jobs_and_cancels_the_rest_as_shutting_down() {
    let h = Harness::new(config());
    let stream = h
        .run("sleep", Script::new().until_stopped().stop_takes(secs(1)))
        .await;
    let reader = tokio::spawn(read_all(stream));
    let drain = start_drain(&h, secs(30)).await;

    match h.jobs.start(spec("sleep")).await {
        Err(Error::ShuttingDown) => {}
        other => panic!("expected ShuttingDown, got {:?}", other.map(|s| s.job_id)),
    }
    assert_eq!(
        h.backend.starts().len(),
        1,
        "a refused job never reaches the backend"
    );

    assert_eq!(drain.await.unwrap(), secs(31), "grace, then the 1s stop");
    let exit = check_events(&reader.await.unwrap());
    assert_eq!(ending(&exit), (Cancelled, None, Some(15), SHUTTING_DOWN));
    assert_eq!(h.backend.runs()[0].stop_seen, Some(secs(30)));
    assert_eq!(h.backend.cleanups(), 1);
}

#[tokio::test(start_paused = true)]
async fn running_jobs_may_finish_within_the_grace() {
    let h = Harness::new(config());
    let stream = h
        .run("work", Script::new().wait(secs(3)).stdout("done\n").exit(0))
        .await;
    let id = stream.job_id.clone();
    let t0 = Instant::now();
    h.jobs.drain(secs(10)).await;
    assert_eq!(
        t0.elapsed(),
        secs(3),
        "returns as soon as the last job ended"
    );
    let exit = check_events(&read_all(stream).await);
    assert_eq!(
        ending(&exit),
        (Succeeded, Some(0), None, "exited with code 0")
    );
    assert_eq!(h.sink.exit(&id), Some(exit));
    assert_eq!(h.backend.runs()[0].stop_seen, None);
    assert_eq!(h.backend.cleanups(), 1);
}

#[tokio::test(start_paused = true)]
async fn after_the_grace_the_rest_are_cancelled_and_drain_waits_for_their_exited() {
    let h = Harness::new(config());
    let quick = h.run("quick", Script::new().wait(secs(2)).exit(0)).await;
    let slow = h
        .run(
            "slow",
            Script::new()
                .until_stopped()
                .stop_takes(secs(1))
                .stop_output(Stdout, "bye"),
        )
        .await;
    let (quick_id, slow_id) = (quick.job_id.clone(), slow.job_id.clone());

    let t0 = Instant::now();
    h.jobs.drain(secs(10)).await;
    assert_eq!(t0.elapsed(), secs(11), "the 10s grace, then the 1s stop");
    // Both jobs had sent `Exited` when drain returned.
    assert_eq!(h.sink.exit(&quick_id).map(|e| e.state), Some(Succeeded));
    let exit = h.sink.exit(&slow_id).expect("slow job sent Exited");
    assert_eq!(ending(&exit), (Cancelled, None, Some(15), SHUTTING_DOWN));
    assert_eq!(h.backend.runs()[1].stop_seen, Some(secs(10)));
    assert_eq!(h.backend.cleanups(), 1);

    // The clients' streams hold everything, the output of the stop included.
    assert_eq!(check_events(&read_all(quick).await).state, Succeeded);
    let events = read_all(slow).await;
    assert_eq!(outputs(&events), [(Stdout, 0, "bye".into())]);
    assert_eq!(check_events(&events), exit);
}

#[tokio::test(start_paused = true)]
async fn drain_gives_up_on_a_stop_slower_than_the_backend_promised() {
    let h = Harness::with_backend(config(), FakeBackend::new(secs(3)));
    let stream = h
        .run("stuck", Script::new().until_stopped().stop_takes(secs(60)))
        .await;
    let id = stream.job_id.clone();
    let t0 = Instant::now();
    h.jobs.drain(secs(10)).await;
    // grace + the backend's stop time + a stuck client's 2s grace + the drain's 5s slack.
    assert_eq!(t0.elapsed(), secs(10 + 3 + 2 + 5));
    assert_eq!(h.sink.exit(&id), None, "the job is still stopping");
    assert_eq!(h.backend.cleanups(), 0, "cleanups are not waited for");

    // It is not abandoned: it still ends, as shut down.
    let exit = within(h.sink.exited(&id)).await;
    assert_eq!(t0.elapsed(), secs(70));
    assert_eq!(ending(&exit), (Cancelled, None, Some(15), SHUTTING_DOWN));
    drop(stream);
}

#[tokio::test(start_paused = true)]
async fn drain_waits_for_a_job_still_starting_and_stops_it() {
    let h = Harness::new(config());
    h.backend.script_for(
        "slow start",
        Script::new().start_delay(secs(5)).until_stopped(),
    );
    let start = tokio::spawn({
        let jobs = Arc::clone(&h.jobs);
        async move { jobs.start(spec("slow start")).await }
    });
    while h.backend.starts().is_empty() {
        tokio::task::yield_now().await;
    }
    assert_eq!(h.jobs.active(), 1, "a starting job holds a slot");

    let t0 = Instant::now();
    h.jobs.drain(secs(2)).await;
    assert_eq!(
        t0.elapsed(),
        secs(5),
        "until the start finished and the job stopped"
    );
    let stream = start
        .await
        .unwrap()
        .expect("the start began before the drain");
    let exit = check_events(&read_all(stream).await);
    assert_eq!(ending(&exit), (Cancelled, None, Some(15), SHUTTING_DOWN));
    assert_eq!(h.backend.runs()[0].stop_seen, Some(Duration::ZERO));
}

#[tokio::test(start_paused = true)]
async fn after_the_grace_detached_jobs_that_outlive_the_server_are_left_the_rest_cancelled() {
    let h = Harness::new(config());
    let outlives = || Script::new().stdout("up\n").until_stopped().handle("h");
    h.backend.script_for("detached", outlives());
    let detached = h
        .jobs
        .start(JobSpec {
            on_disconnect: DisconnectPolicy::Detach,
            ..spec("detached")
        })
        .await
        .unwrap();
    // Same backend, the default policy: cancelled as before.
    let cancelled = h.run("attached", outlives()).await;
    // Detached, but node-local (no handle): cancelled too.
    h.backend.script_for("local", Script::new().until_stopped());
    let local = h
        .jobs
        .start(JobSpec {
            on_disconnect: DisconnectPolicy::Detach,
            ..spec("local")
        })
        .await
        .unwrap();
    let id = detached.job_id.clone();
    h.jobs.drain(secs(5)).await;

    // The left job's reader gets what was produced, then UNAVAILABLE, never a made-up exit.
    let mut detached = detached;
    let mut seen = Vec::new();
    let ended = within(async {
        loop {
            match detached.event().await {
                Some(Ok(event)) => seen.push(event),
                Some(Err(e)) => return e,
                None => panic!("the left job's stream ended without an error"),
            }
        }
    })
    .await;
    assert!(matches!(ended, Error::JobLeft { .. }), "{ended}");
    assert!(
        !seen.iter().any(|e| matches!(e.kind, EventKind::Exited(_))),
        "{seen:?}"
    );
    assert_eq!(h.backend.runs()[0].outcome, Some(Outcome::Left));
    // Forgotten here: the backend reaches it from now on.
    assert!(
        h.jobs
            .list(&Default::default(), 10, None)
            .0
            .iter()
            .all(|j| j.id != id)
    );
    for stream in [cancelled, local] {
        let exit = check_events(&read_all(stream).await);
        assert_eq!(exit.state, Cancelled);
    }
}
