//! Interactive jobs on the Daytona backend against the fake Daytona (real HTTP + WebSocket on
//! loopback, commands really run; terminal sessions on real pseudo-terminals): stdin through
//! the session command's `/input` (whole lines, no echo, no EOF, 410 once completed), and `tty`
//! jobs on Daytona's terminal sessions (size, resize, input, EOF, exit status, the exit message
//! that overtakes output, the slow-consumer close, the session deleted).

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::{Job, JobState, TestServer, shell};
use sandbox_runner::{proto as pb, testing::daytona::FakeDaytona};
use tonic::Code;

const SANDBOX: &str = "sbx-1";

async fn setup(extra: &[&str]) -> (FakeDaytona, TestServer) {
    let fake = FakeDaytona::start(common::DAYTONA_KEY).await;
    fake.add_sandbox(SANDBOX, "started");
    let server = common::start_daytona(&fake, extra).await;
    (fake, server)
}

fn with_stdin(command: &str) -> pb::ExecRequest {
    pb::ExecRequest {
        sandbox_id: SANDBOX.into(),
        stdin: true,
        ..shell(command)
    }
}

fn on_tty(command: &str, rows: u32, cols: u32) -> pb::ExecRequest {
    pb::ExecRequest {
        sandbox_id: SANDBOX.into(),
        tty: Some(pb::TtyOptions {
            rows,
            cols,
            term: String::new(),
        }),
        ..shell(command)
    }
}

/// Waits (bounded) until the sandbox has no terminal session left.
async fn assert_ptys_deleted(fake: &FakeDaytona) {
    for _ in 0..200 {
        if fake.pty_ids(SANDBOX).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        fake.pty_ids(SANDBOX),
        Vec::<String>::new(),
        "terminal sessions leaked"
    );
    assert!(
        !fake.pty_deletes().is_empty(),
        "the runner deleted its session"
    );
}

#[tokio::test]
async fn a_read_prompt_is_answered_through_send_input_without_echo() {
    let (fake, server) = setup(&[]).await;
    let mut client = server.client().await;
    let mut job = Job::start(
        &mut client,
        with_stdin("echo 'name?'; read -r name; echo \"hello $name\""),
    )
    .await;
    job.read_until(0, "name?\n").await;
    assert_eq!(
        common::send_input(&mut client, &job.job_id, b"ada\n", None)
            .await
            .unwrap(),
        4
    );
    let run = job.finish().await;
    // `suppressInputEcho`: what was typed is input, not output.
    assert_eq!(run.stdout, b"name?\nhello ada\n");
    assert_eq!(run.state(), JobState::Succeeded);
    server.stop().await;
    drop(fake);
}

#[tokio::test]
async fn partial_lines_and_close_input_are_refused_and_stdin_stays_open() {
    let (_fake, server) = setup(&[]).await;
    let mut client = server.client().await;
    let mut job = Job::start(
        &mut client,
        with_stdin("echo ready; read -r a; echo \"got $a\""),
    )
    .await;
    job.read_until(0, "ready\n").await;
    let partial = common::send_input(&mut client, &job.job_id, b"par", None)
        .await
        .unwrap_err();
    assert_eq!(partial.code(), Code::InvalidArgument, "{partial:?}");
    assert!(partial.message().contains("whole lines"), "{partial:?}");
    let binary = common::send_input(&mut client, &job.job_id, b"\xff\n", None)
        .await
        .unwrap_err();
    assert_eq!(binary.code(), Code::InvalidArgument, "{binary:?}");
    let eof = common::close_input(&mut client, &job.job_id)
        .await
        .unwrap_err();
    assert_eq!(eof.code(), Code::FailedPrecondition, "{eof:?}");
    assert!(eof.message().contains("stdin EOF"), "{eof:?}");
    // Nothing of the refused writes was sent, and stdin is still open.
    assert_eq!(
        common::send_input(&mut client, &job.job_id, b"x y\n", None)
            .await
            .unwrap(),
        4
    );
    let run = job.finish().await;
    assert_eq!(run.stdout, b"ready\ngot x y\n");
    assert_eq!(run.state(), JobState::Succeeded);
    server.stop().await;
}

/// Polling slowly (and without the log stream), the job outlives its command for a while:
/// a write then meets Daytona's 410 and is refused like a write to a closed pipe.
#[tokio::test]
async fn a_write_after_the_command_completed_is_refused() {
    let (fake, server) = setup(&["--daytona-poll-interval", "2s"]).await;
    fake.faults()
        .refuse_log_stream
        .store(true, Ordering::Relaxed);
    let mut client = server.client().await;
    let job = Job::start(&mut client, with_stdin("read -r a; echo \"got $a\"")).await;
    common::send_input(&mut client, &job.job_id, b"one\n", None)
        .await
        .unwrap();
    let mut refused = None;
    for _ in 0..100 {
        match common::send_input(&mut client, &job.job_id, b"more\n", None).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let refused = refused.expect("a write after the command completed is refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("no longer reads its stdin"),
        "{refused:?}"
    );
    let run = job.finish().await;
    assert_eq!(run.stdout, b"got one\n");
    assert_eq!(run.state(), JobState::Succeeded);
    // And once the job has finished, as on any backend.
    let ended = common::send_input(&mut client, &run.job_id, b"late\n", None)
        .await
        .unwrap_err();
    assert_eq!(ended.code(), Code::FailedPrecondition, "{ended:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_tty_job_sees_its_size_a_resize_and_its_input_and_exits_with_its_status() {
    let (fake, server) = setup(&[]).await;
    let mut client = server.client().await;
    let mut job = Job::start(
        &mut client,
        on_tty(
            "test -t 0 -a -t 1 -a -t 2 && echo on-a-tty; echo \"TERM=$TERM\"; stty size; \
             echo ready; read -r line; stty size; echo \"got $line\"; exit 3",
            30,
            100,
        ),
    )
    .await;
    let ready = job.read_until(0, "ready\r\n").await;
    let (stdout, stderr) = job.kept();
    // The shell's prompt and the echo of the typed command line are not the job's output.
    assert_eq!(
        String::from_utf8_lossy(&stdout[..ready]),
        "on-a-tty\r\nTERM=xterm-256color\r\n30 100\r\nready\r\n"
    );
    assert!(stderr.is_empty(), "a terminal has one output stream");

    common::resize(&mut client, &job.job_id, 40, 120)
        .await
        .unwrap();
    // Typed after the resize: the program reads it at the new size.
    common::send_input(&mut client, &job.job_id, b"hello\n", None)
        .await
        .unwrap();
    job.read_until(ready, "hello\r\n40 120\r\ngot hello\r\n")
        .await;
    let run = job.finish().await;
    assert_eq!(run.exited.exit_code, Some(3));
    assert_eq!(run.state(), JobState::Failed);
    let refused = common::resize(&mut client, &run.job_id, 10, 10)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_ptys_deleted(&fake).await;
    server.stop().await;
}

#[tokio::test]
async fn cat_on_a_daytona_tty_ends_when_input_is_closed() {
    let (fake, server) = setup(&[]).await;
    let mut client = server.client().await;
    let mut job = Job::start(&mut client, on_tty("cat", 0, 0)).await;
    // Typed before the job has printed anything: it waits for the job to start, so its echo is
    // the job's output, not the login shell's.
    common::send_input(&mut client, &job.job_id, b"hi\n", None)
        .await
        .unwrap();
    // Once echoed by the terminal, once printed by cat.
    job.read_until(0, "hi\r\nhi\r\n").await;
    common::close_input(&mut client, &job.job_id).await.unwrap();
    let run = job.finish().await;
    assert_eq!(run.state(), JobState::Succeeded);
    assert_eq!(run.stdout, b"hi\r\nhi\r\n");
    assert_ptys_deleted(&fake).await;
    server.stop().await;
}

#[tokio::test]
async fn output_queued_behind_the_exit_message_is_still_delivered() {
    let (fake, server) = setup(&[]).await;
    fake.faults()
        .pty_exit_message_first
        .store(true, Ordering::Relaxed);
    let mut client = server.client().await;
    let run = common::run(
        &mut client,
        on_tty("for i in 1 2 3; do echo line$i; done; exit 5", 0, 0),
    )
    .await;
    assert_eq!(run.stdout, b"line1\r\nline2\r\nline3\r\n");
    assert_eq!(run.exited.exit_code, Some(5));
    assert_ptys_deleted(&fake).await;
    server.stop().await;
}

#[tokio::test]
async fn a_slow_consumer_close_ends_the_job_saying_output_was_lost() {
    let (fake, server) = setup(&[]).await;
    fake.faults()
        .pty_slow_consumer_after_bytes
        .store(4096, Ordering::Relaxed);
    let mut client = server.client().await;
    // It would run on for a long time: the job must end at the 1008, not wait for it.
    let run = common::run(
        &mut client,
        on_tty("head -c 100000 /dev/zero | tr '\\0' x; sleep 300", 0, 0),
    )
    .await;
    assert_eq!(run.state(), JobState::Failed);
    assert!(
        run.exited.message.contains("slow consumer") && run.exited.message.contains("lost"),
        "{:?}",
        run.exited.message
    );
    assert!(run.stdout.len() < 100_000, "output after the close is lost");
    assert_ptys_deleted(&fake).await;
    server.stop().await;
}

#[tokio::test]
async fn a_cancelled_tty_job_has_its_terminal_session_deleted() {
    let (fake, server) = setup(&[]).await;
    let mut client = server.client().await;
    let mut job = Job::start(&mut client, on_tty("echo started; sleep 300", 0, 0)).await;
    job.read_until(0, "started\r\n").await;
    common::cancel(&mut client, &job.job_id).await;
    let run = job.finish().await;
    assert_eq!(run.state(), JobState::Cancelled);
    assert_ptys_deleted(&fake).await;
    server.stop().await;
}
