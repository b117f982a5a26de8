//! A job leader whose execution is dropped before it ended (the job never ran, or the runtime
//! is shutting down) is SIGKILLed and reaped: by a task of the runtime where there is one,
//! otherwise by the subreaper's scan, which reaps every child of the server that is not a
//! registered leader. Its own test binary: a subreaper scan reaps any child of this process
//! that is not one of its backend's leaders, so no other test may start processes here.

use std::{path::Path, time::Duration};

use sandbox_runner::{
    backend::local::LocalBackend,
    job::{Backend, JobSpec, Program},
    testing::local_config,
};

fn backend(subreaper: bool) -> LocalBackend {
    LocalBackend::new(local_config(subreaper))
}

fn sleep_job() -> JobSpec {
    JobSpec::new(Program::Argv(vec!["sleep".into(), "300".into()]))
}

/// Waits (bounded) until `pid` is gone from /proc: dead *and* reaped (a zombie still shows).
async fn assert_reaped(pid: u32, how: &str) {
    for _ in 0..500 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{how}: leader {pid} not reaped: {:?}",
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_execution_kills_its_leader_and_the_leader_is_reaped() {
    // Dropped on the runtime: a task waits for the killed leader and reaps it (no subreaper
    // needed, as for a library user).
    let plain = backend(false);
    let execution = plain.start(&sleep_job()).await.unwrap();
    let pid = execution.pid().unwrap();
    drop(execution);
    assert_reaped(pid, "dropped on the runtime").await;

    // Dropped off the runtime: unregistered, so the subreaper's scan (on SIGCHLD) reaps it.
    let subreaper = backend(true);
    let execution = subreaper.start(&sleep_job()).await.unwrap();
    let pid = execution.pid().unwrap();
    std::thread::spawn(move || drop(execution)).join().unwrap();
    assert_reaped(pid, "dropped off the runtime, subreaper").await;
}
