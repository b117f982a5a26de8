//! Why a job was stopped decides its final state; output emitted while stopping is still
//! delivered; a client that does not read a stopped job's output is dropped after the grace.

use tokio::time::Instant;

use super::*;
use crate::error::Error;
use crate::job::{
    JobState::{Cancelled, Running, Succeeded, TimedOut},
    Outcome,
    StreamKind::{Stderr, Stdout},
};

#[tokio::test(start_paused = true)]
async fn cancel_request_cancels() {
    let h = Harness::new(config());
    let mut stream = h
        .run("sleep", Script::new().stdout("working\n").until_stopped())
        .await;
    let id = stream.job_id.clone();
    let started = stream.event().await.unwrap().unwrap();
    let working = stream.event().await.unwrap().unwrap();
    tokio::time::sleep(secs(3)).await;

    let snapshot = h.jobs.cancel(&id).await.expect("cancel");
    assert_eq!(
        snapshot.state, Running,
        "cancel returns the state as of now"
    );
    let mut events = vec![started, working];
    events.extend(read_all(stream).await);
    let exit = check_events(&events);
    // The stop reason explains the exit better than the signal; both are kept.
    assert_eq!(
        ending(&exit),
        (Cancelled, None, Some(15), "cancelled by request")
    );
    assert_eq!(exit.stdout_bytes, 8);
    assert_eq!(h.backend.runs()[0].stop_seen, Some(secs(3)));
    assert_eq!(h.jobs.status(&id).await.unwrap().state, Cancelled);
}

#[tokio::test(start_paused = true)]
async fn timeout_times_out_with_the_duration_in_the_message() {
    let h = Harness::new(config());
    h.backend
        .script_for("sleep", Script::new().stdout("zzz").until_stopped());
    let stream = h
        .jobs
        .start(spec_with_timeout("sleep", secs(5)))
        .await
        .unwrap();
    let exit = check_events(&read_all(stream).await);
    assert_eq!(
        ending(&exit),
        (TimedOut, None, Some(15), "timed out after 5s")
    );
    let run = &h.backend.runs()[0];
    assert_eq!((run.stop_seen, run.ran_for), (Some(secs(5)), Some(secs(5))));
}

#[tokio::test(start_paused = true)]
async fn dropping_the_stream_cancels_the_job() {
    let h = Harness::new(config());
    let mut stream = h.run("sleep", Script::new().until_stopped()).await;
    let id = stream.job_id.clone();
    stream.event().await.unwrap().unwrap();
    tokio::time::sleep(secs(2)).await;
    drop(stream);

    let exit = within(h.sink.exited(&id)).await;
    assert_eq!(
        ending(&exit),
        (
            Cancelled,
            None,
            Some(15),
            "cancelled: the client closed the stream"
        )
    );
    check_events(&h.sink.events(&id));
    assert_eq!(h.backend.runs()[0].stop_seen, Some(secs(2)));
}

#[tokio::test(start_paused = true)]
async fn the_first_stop_reason_wins() {
    let h = Harness::new(config());
    h.backend
        .script_for("slow", Script::new().until_stopped().stop_takes(secs(10)));
    let t0 = Instant::now();
    let stream = h
        .jobs
        .start(spec_with_timeout("slow", secs(5)))
        .await
        .unwrap();
    let id = stream.job_id.clone();
    // Timed out at 5s, still stopping: a Cancel and the client going away change nothing.
    tokio::time::sleep(secs(7)).await;
    assert_eq!(h.jobs.cancel(&id).await.unwrap().state, Running);
    tokio::time::sleep(secs(1)).await;
    drop(stream);

    let exit = within(h.sink.exited(&id)).await;
    assert_eq!(t0.elapsed(), secs(15));
    assert_eq!(
        ending(&exit),
        (TimedOut, None, Some(15), "timed out after 5s")
    );
}

#[tokio::test(start_paused = true)]
async fn cancel_after_the_end_changes_nothing() {
    let h = Harness::new(config());
    let stream = h.run("true", Script::new().exit(0)).await;
    let id = stream.job_id.clone();
    let exit = check_events(&read_all(stream).await);
    let snapshot = h.jobs.cancel(&id).await.unwrap();
    assert_eq!(snapshot.state, Succeeded);
    assert_eq!(snapshot.exit, Some(exit));
    assert_eq!(h.sink.events(&id).len(), 2, "no event after Exited");
}

#[tokio::test(start_paused = true)]
async fn a_stopped_job_reported_cancelled_takes_the_local_state() {
    // The backend reports the stop as a cancellation with its own words; the local reason
    // (timeout) decides the state, the backend's message is kept alone.
    let h = Harness::new(config());
    h.backend.script_for(
        "sleep",
        Script::new()
            .until_stopped()
            .stop_outcome(Outcome::Cancelled("session deleted".into())),
    );
    let stream = h
        .jobs
        .start(spec_with_timeout("sleep", secs(4)))
        .await
        .unwrap();
    let exit = check_events(&read_all(stream).await);
    assert_eq!(ending(&exit), (TimedOut, None, None, "session deleted"));
}

#[tokio::test(start_paused = true)]
async fn output_after_the_stop_is_delivered_before_exited() {
    let h = Harness::new(config());
    let script = Script::new()
        .stdout("a")
        .until_stopped()
        .stop_takes(secs(2))
        .stop_output(Stderr, "got SIGTERM\n")
        .stop_output(Stdout, "flushed\n")
        .stop_outcome(Outcome::Exited {
            code: Some(143),
            signal: None,
        });
    let stream = h.run("graceful", script).await;
    let id = stream.job_id.clone();
    within(h.backend.runs_began(1)).await;
    h.jobs.cancel(&id).await.unwrap();
    let events = read_all(stream).await;

    assert_eq!(
        outputs(&events),
        [
            (Stdout, 0, "a".into()),
            (Stderr, 0, "got SIGTERM\n".into()),
            (Stdout, 1, "flushed\n".into()),
        ]
    );
    let exit = check_events(&events);
    assert_eq!(
        ending(&exit),
        (Cancelled, Some(143), None, "cancelled by request")
    );
    assert_eq!((exit.stdout_bytes, exit.stderr_bytes), (9, 12));
    assert_eq!(h.sink.events(&id), events);
    assert_eq!(h.backend.runs()[0].ran_for, Some(secs(2)));
}

/// A log of one event: `Started` fills it, so the job's first output waits for the client.
fn one_slot_config() -> JobsConfig {
    JobsConfig {
        log_limits: crate::job::LogLimits {
            max_bytes: 1 << 20,
            max_events: 1,
        },
        stopped_client_grace: secs(2),
        ..config()
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_that_does_not_read_a_stopped_job_is_dropped_after_the_grace() {
    let h = Harness::new(one_slot_config());
    let script = Script::new()
        .stdout("one")
        .stdout("two")
        .until_stopped()
        .stop_output(Stdout, "bye");
    let t0 = Instant::now();
    let mut stream = h.run("chatty", script).await;
    let id = stream.job_id.clone();

    // Not stopped: an unread stream holds the job back, however long.
    tokio::time::sleep(secs(30)).await;
    assert_eq!(h.sink.events(&id).len(), 2, "Started, then \"one\" waits");
    assert_eq!(h.backend.runs()[0].stop_seen, None);

    h.jobs.cancel(&id).await.unwrap();
    let exit = within(h.sink.exited(&id)).await;
    assert_eq!(
        t0.elapsed(),
        secs(32),
        "dropped the client after the 2s grace"
    );
    // "two" was never played: the run saw its stop once "one" was taken.
    assert_eq!(
        ending(&exit),
        (Cancelled, None, Some(15), "cancelled by request")
    );
    let sunk = h.sink.events(&id);
    assert_eq!(
        outputs(&sunk),
        [(Stdout, 0, "one".into()), (Stdout, 3, "bye".into())]
    );
    check_events(&sunk);

    // What it had not read was evicted after the grace: it is told exactly what it lost
    // (Started and "one"), then gets the rest.
    match stream.next().await {
        Some(Ok(Delivered::Gap(gap))) => assert_eq!(
            (
                gap.resumed_seq,
                gap.lost_events,
                gap.lost_stdout_bytes,
                gap.resumed_stdout_offset,
                gap.exact
            ),
            (2, 2, 3, 3, true)
        ),
        other => panic!("expected a gap, got {other:?}"),
    }
    let rest = read_all(stream).await;
    assert_eq!(rest, sunk[2..]);
    assert_eq!(h.jobs.status(&id).await.unwrap().state, Cancelled);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_reads_within_the_grace_gets_everything() {
    let h = Harness::new(one_slot_config());
    let script = Script::new()
        .stdout("one")
        .until_stopped()
        .stop_output(Stdout, "two")
        .stop_output(Stdout, "three");
    let mut stream = h.run("chatty", script).await;
    let id = stream.job_id.clone();
    within(h.backend.runs_began(1)).await;
    h.jobs.cancel(&id).await.unwrap();

    // Each event gets its own grace. An event taken stays in the log (it is in the transport)
    // until the reader asks again, so room for the next comes with the second read after the
    // writer began to wait: reading one every 0.9s (twice per 2s grace) keeps the client.
    let mut events = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(900)).await;
        match stream.event().await {
            Some(item) => events.push(item.expect("not abandoned")),
            None => break,
        }
    }
    let exit = check_events(&events);
    assert_eq!(exit.stdout_bytes, 11);
    assert_eq!(events, h.sink.events(&id));
}

#[tokio::test(start_paused = true)]
async fn a_job_that_ended_by_itself_is_retired_at_once_and_its_reader_still_gets_everything() {
    let h = Harness::new(JobsConfig {
        finished_ttl: secs(60),
        ..one_slot_config()
    });
    let t0 = Instant::now();
    let stream = h.run("done", Script::new().exit(0)).await;
    let id = stream.job_id.clone();
    // The log of one holds Started; Exited never waits for a reader.
    within(h.backend.runs_ended(1)).await;
    assert_eq!(h.jobs.active(), 0, "the program is gone");
    let exit = within(h.sink.exited(&id)).await;
    assert_eq!(
        ending(&exit),
        (Succeeded, Some(0), None, "exited with code 0")
    );

    // Not held by its reader: the job retired at once, so it is forgotten once the
    // finished-job TTL has passed.
    tokio::time::sleep(secs(120)).await;
    assert!(t0.elapsed() >= secs(120));
    match h.jobs.status(&id).await {
        Err(Error::JobNotFound(_)) => {}
        other => panic!("expected the finished job to be forgotten, got {other:?}"),
    }
    // Its reader holds the log: it still gets every event.
    let events = read_all(stream).await;
    assert_eq!(check_events(&events).state, Succeeded);
    assert!(
        h.jobs
            .attach(
                &id,
                crate::job::Position::Start,
                Default::default(),
                Default::default()
            )
            .await
            .is_err()
    );
}
