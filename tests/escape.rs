//! Processes that leave their job's process group or session (`setsid`, `set -m`, a
//! double-forking daemon, `setpgid`) still belong to the job: after `Exited` nothing of the job
//! is alive, a Cancel reaches them too, and no zombie is left behind in the server. Run against
//! the binary (the child subreaper), with per-job cgroups where this host allows them and with
//! the /proc-scanning fallback.
//!
//! Every job carries a unique environment marker, so its processes are found in /proc wherever
//! they moved.

mod common;

use std::time::Duration;

use common::{JobState, ServerProcess, cancel};
use sandbox_runner::{
    proto::{self as pb, sandbox_service_client::SandboxServiceClient},
    testing::procfs,
};
use tonic::transport::Channel;

/// Ways out of the job's group or session; each keeps a `sleep 300` running.
const ESCAPES: [(&str, &str); 4] = [
    // A new session; the sleep keeps the job's pipes open.
    ("setsid", "setsid sleep 300 & echo started"),
    // Job control puts background jobs in process groups of their own.
    ("set -m", "bash -c 'set -m; sleep 300 & echo started'"),
    // The classic daemon: fork, setsid, fork again, let go of the pipes; the job's main process
    // exits at once.
    (
        "double-fork daemon",
        "(setsid sh -c 'sleep 300 & exit 0' </dev/null >/dev/null 2>&1 &); echo started",
    ),
    // A bare setpgid(0, 0).
    (
        "setpgid",
        "perl -e 'setpgrp(0, 0); exec \"sleep\", \"300\"' & echo started",
    ),
];

/// `NAME=value` for the job's environment, unique to this job.
fn marker(name: &str) -> String {
    format!("ESCAPE_TEST_MARK={name}-{}", uuid::Uuid::new_v4())
}

fn marked(command: &str, mark: &str) -> pb::ExecRequest {
    let (name, value) = mark.split_once('=').unwrap();
    let mut req = common::shell(command);
    req.env.insert(name.into(), value.into());
    req
}

/// Whether this host lets the server make per-job cgroups (cgroup v2, writable).
fn cgroups_here() -> bool {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    cgroup.lines().any(|l| l.starts_with("0::")) && nix::unistd::geteuid().is_root()
}

async fn server(cgroups: &str) -> ServerProcess {
    common::start_binary(
        &[
            "--cancel-grace",
            "1s",
            "--drain-grace",
            "1s",
            "--job-cgroups",
            cgroups,
        ],
        &[],
    )
    .await
}

async fn client(server: &ServerProcess) -> SandboxServiceClient<Channel> {
    SandboxServiceClient::new(server.channel().await.unwrap())
}

/// Waits (bounded) until the server has no zombie child; panics naming them.
async fn assert_no_zombies(server: &ServerProcess) {
    for _ in 0..100 {
        if procfs::zombie_children(server.pid).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "zombie children of the server: {:?}",
        procfs::zombie_children(server.pid)
    );
}

/// Runs one escape to its end and checks that nothing of it is left; returns how many of its
/// processes were still alive after `Exited` (zero, or the assertion fails).
async fn run_escape(client: &mut SandboxServiceClient<Channel>, name: &str, command: &str) {
    let mark = marker(name);
    let run = tokio::time::timeout(
        Duration::from_secs(60),
        common::run(client, marked(command, &mark)),
    )
    .await
    .unwrap_or_else(|_| panic!("{name}: no Exited within 60 s"));
    let left = procfs::with_env(&mark);
    eprintln!(
        "{name}: {:?}, {} process(es) alive after Exited",
        run.state(),
        left.len()
    );
    assert_eq!(run.stdout, b"started\n", "{name}");
    assert_eq!(run.state(), JobState::Succeeded, "{name}");
    assert!(
        left.is_empty(),
        "{name}: still alive after Exited: {left:?}"
    );
}

#[tokio::test]
async fn escaped_processes_end_with_their_job_in_a_cgroup() {
    if !cgroups_here() {
        eprintln!("SKIP: no writable cgroup v2 here (needs root and a cgroup2 mount)");
        return;
    }
    let server = server("auto").await;
    // At once: a cgroup attributes every process exactly, however many jobs run.
    let runs = ESCAPES.map(|(name, command)| {
        let server = &server;
        async move { run_escape(&mut client(server).await, name, command).await }
    });
    futures_util::future::join_all(runs).await;
    assert_no_zombies(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn escaped_processes_end_with_their_job_without_cgroups() {
    let server = server("off").await;
    let mut client = client(&server).await;
    // One at a time: without a cgroup, an orphan nobody saw being born is attributed to the
    // jobs running when it was found (exactly one here).
    for (name, command) in ESCAPES {
        run_escape(&mut client, name, command).await;
    }
    assert_no_zombies(&server).await;
    server.stop().await;
}

/// Cancel reaches processes that left the job's group, in both modes.
#[tokio::test]
async fn cancel_kills_escaped_processes() {
    for mode in ["auto", "off"] {
        let server = server(mode).await;
        let mut client = client(&server).await;
        let mark = marker("cancel");
        let job = common::Job::start(
            &mut client,
            marked(
                "setsid sleep 300 & bash -c 'set -m; sleep 300 & wait' & sleep 300",
                &mark,
            ),
        )
        .await;
        // sh, the setsid sleep, bash, its sleep and the foreground sleep (which a shell may
        // run in its own place).
        for _ in 0..200 {
            if procfs::with_env(&mark).len() >= 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = procfs::with_env(&mark).len();
        assert!(started >= 4, "{mode}: the job did not start ({started})");
        cancel(&mut client, &job.job_id).await;
        let run = job.finish().await;
        assert_eq!(run.state(), JobState::Cancelled, "{mode}");
        let left = procfs::with_env(&mark);
        assert!(left.is_empty(), "{mode}: alive after Exited: {left:?}");
        assert_no_zombies(&server).await;
        server.stop().await;
    }
}

/// Orphans that exit on their own are reaped, and reaping them never takes the exit status of a
/// job's main process, which the server waits for itself.
#[tokio::test]
async fn orphans_are_reaped_without_stealing_exit_statuses() {
    let server = server("auto").await;
    let runs = (0..24).map(|i| {
        let server = &server;
        async move {
            let mut client = client(server).await;
            // Each job leaves short-lived orphans behind, some in their own session.
            let command = format!(
                "for n in 1 2 3 4; do (sleep 0.0$n &); (setsid sleep 0.0$n &); done; exit {i}"
            );
            let run = common::run(&mut client, common::shell(&command)).await;
            assert_eq!(run.exited.exit_code, Some(i), "{}", run.exited.message);
        }
    });
    futures_util::future::join_all(runs).await;
    assert_no_zombies(&server).await;
    server.stop().await;
}

/// A SIGKILLed server cannot stop its jobs itself: the job's main process has a parent-death
/// signal, and a new server cleans up the cgroups of a dead one (escaped processes included).
#[tokio::test]
async fn jobs_do_not_outlive_a_killed_server() {
    let mut server = server("auto").await;
    let mut client = client(&server).await;
    let mark = marker("pdeathsig");
    let job = common::Job::start(
        &mut client,
        marked("setsid sleep 300 & exec sleep 300", &mark),
    )
    .await;
    for _ in 0..200 {
        if procfs::with_env(&mark).len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let found = procfs::with_env(&mark);
    if found.len() != 2 {
        // Which of the two is missing, and what the job says (seen once under load).
        let seen: Vec<String> = found
            .iter()
            .map(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                format!(
                    "{pid}: {}",
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                )
            })
            .collect();
        let status = common::status(&mut client, &job.job_id).await;
        panic!(
            "the job did not start both processes: {seen:?}; leader {}; {status:?}",
            job.pid
        );
    }
    let leader = job.pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    server.exit().await.unwrap();
    drop(job);
    let mut alive = procfs::with_env(&mark);
    for _ in 0..100 {
        alive = procfs::with_env(&mark);
        if !alive.contains(&leader) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !alive.contains(&leader),
        "the job's main process outlived the server"
    );
    if !cgroups_here() {
        eprintln!("SKIP the cgroup part: no writable cgroup v2 here");
        return;
    }
    // The escaped sleep is still there (no parent-death signal reaches it) until a new server
    // on this host clears what the dead one left.
    eprintln!("after SIGKILL of the server: {} escaped alive", alive.len());
    let next = self::server("auto").await;
    let left = procfs::with_env(&mark);
    assert!(
        left.is_empty(),
        "alive after a new server started: {left:?}"
    );
    next.stop().await;
}
