//! How a run that ended is summarised into `Exited`, and the shape of a job's events.

use super::*;
use crate::job::{
    JobState::{Cancelled, Failed, Succeeded},
    Outcome,
    StreamKind::{Stderr, Stdout},
};

/// Runs `script` to its end, reading its stream; returns the events and the `Exited` summary.
async fn run_to_end(script: Script) -> (Vec<JobEvent>, ExitSummary) {
    let h = Harness::new(config());
    let events = read_all(h.run("job", script).await).await;
    let summary = check_events(&events);
    (events, summary)
}

#[tokio::test(start_paused = true)]
async fn exit_zero_succeeds_and_everyone_sees_the_same_events() {
    let h = Harness::new(config());
    let script = Script::new()
        .pid(4242)
        .stdout("hello\n")
        .stderr("warning: x\n")
        .wait(secs(1))
        .stdout("")
        .stdout("bye\n")
        .exit(0);
    let stream = h.run("hello", script).await;
    let id = stream.job_id.clone();
    let events = read_all(stream).await;

    assert_eq!(
        events[0].kind,
        EventKind::Started {
            backend: "fake",
            pid: Some(4242),
            capabilities: Default::default(),
            tty: None,
        }
    );
    // The empty chunk is dropped without taking a seq.
    assert_eq!(
        outputs(&events),
        [
            (Stdout, 0, "hello\n".into()),
            (Stderr, 0, "warning: x\n".into()),
            (Stdout, 6, "bye\n".into()),
        ]
    );
    assert_eq!(events.len(), 5);
    let exit = check_events(&events);
    assert_eq!(
        ending(&exit),
        (Succeeded, Some(0), None, "exited with code 0")
    );
    assert_eq!((exit.stdout_bytes, exit.stderr_bytes), (10, 11));

    assert_eq!(h.sink.opened(), std::slice::from_ref(&id));
    assert_eq!(
        h.sink.events(&id),
        events,
        "the sink saw what the client saw"
    );
    let status = h.jobs.status(&id).await.expect("finished job is kept");
    assert_eq!(status.state, Succeeded);
    assert_eq!(status.exit, Some(exit));
    assert_eq!((status.stdout_bytes, status.stderr_bytes), (10, 11));
    assert_eq!(status.running_for, None);
    let run = &h.backend.runs()[0];
    assert_eq!((run.stop_seen, run.ran_for), (None, Some(secs(1))));
}

#[tokio::test(start_paused = true)]
async fn non_zero_exit_fails_with_its_code() {
    let (_, exit) = run_to_end(Script::new().stderr("boom\n").exit(3)).await;
    assert_eq!(ending(&exit), (Failed, Some(3), None, "exited with code 3"));
    assert_eq!((exit.stdout_bytes, exit.stderr_bytes), (0, 5));
}

#[tokio::test(start_paused = true)]
async fn killed_by_signal_fails_with_the_signal_named() {
    let (_, exit) = run_to_end(Script::new().stdout("partial").killed(9)).await;
    assert_eq!(
        ending(&exit),
        (Failed, None, Some(9), "killed by signal 9 (SIGKILL)")
    );
}

#[tokio::test(start_paused = true)]
async fn exit_without_code_or_signal_fails() {
    let (_, exit) = run_to_end(Script::new().outcome(Outcome::Exited {
        code: None,
        signal: None,
    }))
    .await;
    assert_eq!(ending(&exit), (Failed, None, None, "exited"));
}

#[tokio::test(start_paused = true)]
async fn backend_failure_fails_with_its_message() {
    let script = Script::new()
        .stdout("a")
        .outcome(Outcome::Failed("lost the sandbox".into()));
    let (events, exit) = run_to_end(script).await;
    assert_eq!(ending(&exit), (Failed, None, None, "lost the sandbox"));
    assert_eq!(outputs(&events), [(Stdout, 0, "a".into())]);
}

#[tokio::test(start_paused = true)]
async fn backend_failure_while_stopping_keeps_the_reason_and_the_failure() {
    let h = Harness::new(config());
    let script = Script::new()
        .until_stopped()
        .stop_outcome(Outcome::Failed("the session vanished".into()));
    let stream = h.run("job", script).await;
    within(h.backend.runs_began(1)).await;
    h.jobs.cancel(&stream.job_id).await.expect("cancel");
    let exit = check_events(&read_all(stream).await);
    assert_eq!(
        ending(&exit),
        (
            Cancelled,
            None,
            None,
            "cancelled by request; the session vanished"
        )
    );
}

#[tokio::test(start_paused = true)]
async fn cancelled_elsewhere_is_cancelled_with_the_backends_message() {
    let script = Script::new()
        .wait(secs(3))
        .outcome(Outcome::Cancelled("cancelled on replica b".into()));
    let (_, exit) = run_to_end(script).await;
    assert_eq!(
        ending(&exit),
        (Cancelled, None, None, "cancelled on replica b")
    );
}

#[tokio::test(start_paused = true)]
async fn many_chunks_keep_seq_and_offsets_exact() {
    let mut script = Script::new();
    let (mut stdout, mut stderr) = (0u64, 0u64);
    for i in 0..200u64 {
        let text = "x".repeat((i % 7 + 1) as usize);
        if i % 3 == 0 {
            stderr += text.len() as u64;
            script = script.stderr(text);
        } else {
            stdout += text.len() as u64;
            script = script.stdout(text);
        }
    }
    let (events, exit) = run_to_end(script.exit(0)).await;
    assert_eq!(events.len(), 202);
    assert_eq!((exit.stdout_bytes, exit.stderr_bytes), (stdout, stderr));
    assert_eq!((stdout, stderr), (527, 267));
}
