//! Output held for callers stays within the server's budget however many do not read, a new
//! job is never starved by stalled ones, and a caller that reads gets every byte.

use bytes::Bytes;
use tokio::time::Instant;

use super::*;
use crate::job::{JobState, StreamKind::Stdout};

const MIB: usize = 1 << 20;

fn budget_config(shared: usize, reserve: usize) -> JobsConfig {
    JobsConfig {
        max_concurrent: 64,
        output_budget_bytes: shared,
        output_reserve_bytes: reserve,
        ..config()
    }
}

/// A job that writes `chunks` chunks of 256 KiB, then exits.
fn writer(chunks: usize) -> Script {
    (0..chunks).fold(Script::new(), |script, _| {
        script.stdout(Bytes::from(vec![b'x'; 256 << 10]))
    })
}

#[tokio::test(start_paused = true)]
async fn stalled_callers_hold_no_more_than_the_budget_and_a_new_job_still_runs() {
    let h = Harness::new(budget_config(4 * MIB, 64 << 10));
    // 32 jobs each want to hold 8 MiB for callers that never read.
    let mut stalled = Vec::new();
    for i in 0..32 {
        stalled.push(h.run(&format!("stalled {i}"), writer(32).exit(0)).await);
    }
    tokio::time::sleep(secs(60)).await;
    let budget = h.jobs.output_budget();
    assert_eq!(
        budget.shared_in_use(),
        4 * MIB,
        "the shared pool is used up, not exceeded"
    );
    // Output the sinks saw is output that was read: it is bounded by the budget too.
    let read: usize = stalled
        .iter()
        .map(|s| {
            outputs(&h.sink.events(&s.job_id))
                .iter()
                .map(|(_, _, text)| text.len())
                .sum::<usize>()
        })
        .sum();
    assert!(
        read <= 4 * MIB + 32 * (64 << 10),
        "{read} bytes read for callers that do not read"
    );

    // A new job is not starved: its reserve carries its output to a caller that reads.
    let fresh = h.run("fresh", writer(4).exit(0)).await;
    let events = read_all(fresh).await;
    let exit = check_events(&events);
    assert_eq!(exit.stdout_bytes, 4 * (256 << 10));
    drop(stalled);
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_reads_gets_every_byte_with_only_the_reserve() {
    // No shared pool at all: 4 KiB at a time, and nothing may deadlock.
    let h = Harness::new(budget_config(MIB, 4096));
    let hog = h
        .run(
            "hog",
            Script::new()
                .stdout(Bytes::from(vec![b'h'; 2 * MIB]))
                .until_stopped(),
        )
        .await;
    tokio::time::sleep(secs(1)).await;
    assert_eq!(
        h.jobs.output_budget().shared_in_use(),
        MIB,
        "the hog took the pool"
    );

    let data: Vec<u8> = (0..(3 * MIB)).map(|i| (i % 251) as u8).collect();
    let stream = h
        .run("reader", Script::new().stdout(data.clone()).exit(0))
        .await;
    let events = read_all(stream).await;
    check_events(&events);
    let received: Vec<u8> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Output { data, .. } => Some(data.to_vec()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(received, data, "every byte, in order");
    assert!(
        events.len() > 3 * MIB / 4096,
        "small credits make small events ({} events)",
        events.len()
    );
    drop(hog);
}

#[tokio::test(start_paused = true)]
async fn a_finished_jobs_log_gives_its_credit_to_running_jobs_and_back_when_forgotten() {
    let h = Harness::new(budget_config(2 * MIB, 64 << 10));
    let stream = h.run("stalled", writer(32).until_stopped()).await;
    let id = stream.job_id.clone();
    tokio::time::sleep(secs(10)).await;
    let held = h.jobs.output_budget().shared_in_use();
    assert!(
        held > MIB,
        "the unread output holds {held} bytes of the pool"
    );

    // Stopped, its reader gets the grace, then the job ends; its log keeps the newest output
    // (within its 1 MiB bound) for late readers.
    h.jobs.cancel(&id).await.unwrap();
    within(h.sink.exited(&id)).await;
    let retained = h.jobs.output_budget().shared_in_use();
    assert!(retained <= MIB, "the finished log holds {retained} bytes");

    // Running jobs that need credit take it from the finished job's log.
    let hog = h.run("hog", writer(32).until_stopped()).await;
    let hog2 = h.run("hog 2", writer(32).until_stopped()).await;
    tokio::time::sleep(secs(10)).await;
    let log = h.jobs.status(&id).await.unwrap().log.unwrap();
    assert_eq!(log.held_bytes, 0, "history given up: {log:?}");
    assert_eq!(h.jobs.output_budget().shared_in_use(), 2 * MIB);
    // Its end is still there for a late reader.
    let mut late = h
        .jobs
        .attach(
            &id,
            crate::job::Position::AfterSeq(log.next_seq - 2),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    match late.next().await {
        Some(Ok(Delivered::Event(JobEvent {
            kind: EventKind::Exited(exit),
            ..
        }))) => assert_eq!(exit.state, JobState::Cancelled),
        other => panic!("expected Exited, got {other:?}"),
    }
    drop((late, hog, hog2));

    // Forgotten after the TTL, with its reader gone: nothing of it is held.
    drop(stream);
    tokio::time::sleep(secs(301)).await;
    assert!(h.jobs.status(&id).await.is_err());
    assert_eq!(h.jobs.output_budget().shared_in_use(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_stopped_job_whose_caller_holds_all_its_credit_still_ends() {
    // No shared pool and a 4 KiB reserve: the unread first piece holds all the job's credit.
    let h = Harness::new(budget_config(0, 4096));
    let script = Script::new()
        .stdout(Bytes::from(vec![b'a'; MIB]))
        .until_stopped()
        .stop_output(Stdout, "bye");
    let t0 = Instant::now();
    let stream = h.run("stuck", script).await;
    let id = stream.job_id.clone();
    tokio::time::sleep(secs(30)).await;
    assert_eq!(
        h.backend.runs()[0].stop_seen,
        None,
        "waiting for credit, not stopped"
    );

    h.jobs.cancel(&id).await.unwrap();
    let exit = within(h.sink.exited(&id)).await;
    // The wait for credit gets the 2s grace, then reads overdraw; the caller, who never reads,
    // is dropped after the grace for the first event it did not take: about twice the grace.
    let took = t0.elapsed() - secs(30);
    assert!(took <= secs(5), "the stopped job took {took:?} to end");
    assert_eq!(exit.state, JobState::Cancelled);
    // Every byte still reached the sinks, in order.
    let sunk = h.sink.events(&id);
    check_events(&sunk);
    assert_eq!(exit.stdout_bytes, MIB as u64 + 3);
    assert_eq!(h.jobs.output_budget().shared_in_use(), 0);
    drop(stream);
}

#[tokio::test(start_paused = true)]
async fn watchers_that_stop_reading_hold_no_more_than_the_budget_and_never_the_job() {
    let h = Harness::new(budget_config(MIB, 64 << 10));
    let caller = h.run("watched", writer(64).exit(0)).await;
    let id = caller.job_id.clone();
    // Eight watchers each take one event into their transport and stop reading: each would
    // hold a 256 KiB chunk there, 2 MiB together, against a 1 MiB budget.
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut watcher = h
            .jobs
            .attach(
                &id,
                crate::job::Position::Start,
                Default::default(),
                crate::job::Pace::Watch,
            )
            .await
            .unwrap();
        let first = tokio::spawn(async move {
            loop {
                match watcher.next().await {
                    Some(Ok(Delivered::Event(JobEvent {
                        kind: EventKind::Output { .. },
                        ..
                    }))) => return watcher,
                    Some(_) => {}
                    None => panic!("ended before any output"),
                }
            }
        });
        stalled.push(first);
    }
    // The caller reads everything; the job is never held back by the watchers.
    let events = read_all(caller).await;
    assert_eq!(check_events(&events).stdout_bytes, 64 * (256 << 10));
    let budget = h.jobs.output_budget();
    assert!(
        budget.shared_in_use() <= budget.shared_bytes(),
        "{} in use",
        budget.shared_in_use()
    );
    // What the watchers hold in their transports is counted: at most four 256 KiB chunks
    // fit in the 1 MiB budget, the other watchers wait for room.
    tokio::time::sleep(secs(60)).await;
    let holding = stalled.iter().filter(|w| w.is_finished()).count();
    assert!(
        (1..=4).contains(&holding),
        "{holding} watchers hold a chunk"
    );
    let mut holders = Vec::new();
    for watcher in std::mem::take(&mut stalled) {
        if watcher.is_finished() {
            holders.push(watcher.await.unwrap());
        } else {
            stalled.push(watcher);
        }
    }
    // When they let go, the others get theirs.
    drop(holders);
    tokio::time::sleep(secs(60)).await;
    assert!(stalled.iter().any(|w| w.is_finished()));
}
