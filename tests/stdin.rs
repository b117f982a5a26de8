//! Talking to a running job: stdin through Attach and through SendInput/CloseInput, resendable
//! writes by offset, EOF, refusals, backpressure from a process that does not read, and signals
//! to the job's process group. Real server, real client.

mod common;

use std::time::Duration;

use common::{Job, JobState, shell};
use sandbox_runner::{
    proto::{self as pb, resume_from::Position},
    testing::contract::attach_open,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, transport::Channel};

type Client = pb::sandbox_service_client::SandboxServiceClient<Channel>;

fn with_stdin(command: &str) -> pb::ExecRequest {
    pb::ExecRequest {
        stdin: true,
        ..shell(command)
    }
}

/// An Attach stream whose requests the test sends after `open` (new events only, watching).
async fn attach_for_input(
    client: &mut Client,
    id: &str,
) -> (
    mpsc::Sender<pb::AttachRequest>,
    tonic::Streaming<pb::ExecEvent>,
) {
    let (tx, rx) = mpsc::channel(1);
    tx.send(attach_open(
        id,
        Some(Position::NewOnly(pb::NewOnly {})),
        pb::GapPolicy::Report,
        false,
    ))
    .await
    .unwrap();
    let stream = client
        .attach(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

fn input(data: &[u8], offset: Option<u64>) -> pb::AttachRequest {
    pb::AttachRequest {
        kind: Some(pb::attach_request::Kind::Input(pb::StdinData {
            data: data.to_vec().into(),
            offset,
        })),
    }
}

fn close_input() -> pb::AttachRequest {
    pb::AttachRequest {
        kind: Some(pb::attach_request::Kind::CloseInput(pb::StdinClose {})),
    }
}

#[tokio::test]
async fn cat_echoes_what_an_attached_client_writes_and_ends_when_it_closes_stdin() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let job = Job::start(&mut client, with_stdin("cat")).await;
    let (tx, mut attached) = attach_for_input(&mut client, &job.job_id).await;
    tx.send(input(b"hello\n", None)).await.unwrap();
    tx.send(input(b"world\n", Some(6))).await.unwrap();
    tx.send(close_input()).await.unwrap();
    let run = job.finish().await;
    assert_eq!(run.state(), JobState::Succeeded);
    assert_eq!(run.stdout, b"hello\nworld\n");
    // The writer's stream saw the same job end.
    let mut exited = None;
    while let Some(event) = attached.message().await.unwrap() {
        if let Some(pb::exec_event::Kind::Exited(e)) = event.kind {
            exited = Some(e);
        }
    }
    assert_eq!(exited.unwrap().stdout_bytes, 12);
    server.stop().await;
}

#[tokio::test]
async fn a_read_prompt_is_answered_through_send_input() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let mut job = Job::start(
        &mut client,
        with_stdin("printf 'name? '; read -r name; echo \"hello $name\""),
    )
    .await;
    job.read_stdout(6).await;
    assert_eq!(
        common::send_input(&mut client, &job.job_id, b"ada\n", None)
            .await
            .unwrap(),
        4
    );
    let run = job.finish().await;
    assert_eq!(run.stdout, b"name? hello ada\n");
    assert_eq!(run.state(), JobState::Succeeded);
    server.stop().await;
}

#[tokio::test]
async fn a_resent_write_is_applied_once_and_a_write_past_the_end_is_refused() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let job = Job::start(&mut client, with_stdin("cat")).await;
    let id = job.job_id.clone();
    assert_eq!(
        common::send_input(&mut client, &id, b"abc", Some(0))
            .await
            .unwrap(),
        3
    );
    // A client that lost the answer resends from where it started, with more.
    assert_eq!(
        common::send_input(&mut client, &id, b"abcdef", Some(0))
            .await
            .unwrap(),
        6
    );
    assert_eq!(
        common::send_input(&mut client, &id, b"def", Some(3))
            .await
            .unwrap(),
        6
    );
    let ahead = common::send_input(&mut client, &id, b"zz", Some(9))
        .await
        .unwrap_err();
    assert_eq!(ahead.code(), Code::OutOfRange, "{ahead:?}");
    assert!(
        ahead.message().contains("resend from offset 6"),
        "{ahead:?}"
    );
    let status = common::status(&mut client, &id).await;
    assert_eq!((status.stdin_accepted_bytes, status.stdin_open), (6, true));

    assert_eq!(common::close_input(&mut client, &id).await.unwrap(), 6);
    assert_eq!(
        common::close_input(&mut client, &id).await.unwrap(),
        6,
        "closing again is fine"
    );
    let closed = common::send_input(&mut client, &id, b"late", None)
        .await
        .unwrap_err();
    assert_eq!(closed.code(), Code::FailedPrecondition, "{closed:?}");
    let run = job.finish().await;
    assert_eq!(run.stdout, b"abcdef");
    let status = common::status(&mut client, &id).await;
    assert_eq!((status.stdin_accepted_bytes, status.stdin_open), (6, false));
    let ended = common::send_input(&mut client, &id, b"x", None)
        .await
        .unwrap_err();
    assert_eq!(ended.code(), Code::FailedPrecondition);
    assert!(ended.message().contains("finished"), "{ended:?}");
    server.stop().await;
}

#[tokio::test]
async fn without_stdin_the_job_reads_dev_null_and_writes_are_refused() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let run = common::run(&mut client, shell("cat; echo eof")).await;
    assert_eq!(run.stdout, b"eof\n");

    let job = Job::start(&mut client, shell("sleep 30")).await;
    for refused in [
        common::send_input(&mut client, &job.job_id, b"x", None)
            .await
            .unwrap_err(),
        common::close_input(&mut client, &job.job_id)
            .await
            .unwrap_err(),
    ] {
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("without stdin"), "{refused:?}");
    }
    let too_big = common::send_input(&mut client, &job.job_id, &vec![b'x'; (1 << 20) + 1], None)
        .await
        .unwrap_err();
    assert_eq!(too_big.code(), Code::InvalidArgument);
    let missing = common::send_input(&mut client, "no-such-job", b"x", None)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    common::cancel(&mut client, &job.job_id).await;
    server.stop().await;
}

/// A process that never reads its stdin pushes back on the writer: the server holds no more
/// than the message under way, the client's writes stop being taken, and the job's output
/// still flows meanwhile.
#[tokio::test]
async fn a_process_that_does_not_read_pushes_back_on_the_writer() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let mut job = Job::start(
        &mut client,
        with_stdin("while :; do echo tick; sleep 0.05; done"),
    )
    .await;
    let id = job.job_id.clone();

    // Unary: the pipe takes what fits (grown to 1 MiB once a write fills it), then each call
    // waits (the client gives up).
    let mut waited = 0;
    let mib = vec![b'u'; 1 << 20];
    for _ in 0..4 {
        let call = common::send_input(&mut client, &id, &mib, None);
        if tokio::time::timeout(Duration::from_millis(300), call)
            .await
            .is_err()
        {
            waited += 1;
        }
    }
    assert!(waited >= 3, "only {waited} of 4 1 MiB writes waited");
    let taken = common::status(&mut client, &id).await.stdin_accepted_bytes;
    assert!(
        taken > 0 && taken <= 1 << 20,
        "{taken} bytes taken by a pipe nobody reads"
    );

    // Through Attach: 64 MiB offered; the stream stops taking requests, its events go on.
    let (tx, mut attached) = attach_for_input(&mut client, &id).await;
    let offered = tokio::spawn(async move {
        let mut sent = 0u64;
        for _ in 0..64 {
            if tx.send(input(&vec![b'a'; 1 << 20], None)).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let mut ticks = 0;
    while ticks < 10 {
        let event = attached.message().await.unwrap().unwrap();
        if let Some(pb::exec_event::Kind::Output(_)) = event.kind {
            ticks += 1;
        }
    }
    job.read_stdout(40).await;
    assert!(
        !offered.is_finished(),
        "64 MiB went into a process that reads nothing"
    );
    assert_eq!(
        common::status(&mut client, &id).await.stdin_accepted_bytes,
        taken,
        "nothing more was taken"
    );
    // Cancel: the write under way is given up, the stream ends, the writer is released.
    common::cancel(&mut client, &id).await;
    let run = job.finish().await;
    assert_eq!(run.state(), JobState::Cancelled);
    // To its end: `Exited`, or the error of the write the job's end gave up.
    while let Ok(Some(_)) = attached.message().await {}
    drop(attached);
    let sent = tokio::time::timeout(Duration::from_secs(10), offered)
        .await
        .expect("the writer is released")
        .unwrap();
    assert!(sent < 64, "{sent} MiB offered");
    server.stop().await;
}

#[tokio::test]
async fn the_daytona_backend_refuses_signals_by_name_and_terminals_beyond_its_bounds() {
    let fake = sandbox_runner::testing::daytona::FakeDaytona::start(common::DAYTONA_KEY).await;
    fake.add_sandbox("sbx-1", "started");
    let server = common::start_daytona(&fake, &[]).await;
    let mut client = server.client().await;
    // Daytona's terminals have at most 1000 rows: refused before anything is made.
    let refused = client
        .exec(pb::ExecRequest {
            sandbox_id: "sbx-1".into(),
            tty: Some(pb::TtyOptions {
                rows: 2000,
                cols: 10,
                term: String::new(),
            }),
            ..shell("cat")
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("1000 rows"), "{refused:?}");
    assert_eq!(
        fake.pty_ids("sbx-1").len(),
        0,
        "no terminal session was made"
    );

    // Nor can it signal its jobs: refused by name, the job untouched.
    let job = Job::start(
        &mut client,
        pb::ExecRequest {
            sandbox_id: "sbx-1".into(),
            ..shell("sleep 30")
        },
    )
    .await;
    let refused = signal(&mut client, &job.job_id, pb::JobSignal::Int)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("daytona"), "{refused:?}");
    common::cancel(&mut client, &job.job_id).await;
    assert_eq!(job.finish().await.state(), JobState::Cancelled);
    server.stop().await;
}

async fn signal(client: &mut Client, id: &str, signal: pb::JobSignal) -> Result<(), tonic::Status> {
    client
        .signal(pb::SignalRequest {
            job_id: id.into(),
            signal: signal as i32,
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn int_reaches_the_jobs_process_group_and_its_trap_runs() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    // The shell and its foreground `sleep` share the group: both get INT, as from Ctrl-C.
    let mut job = Job::start(
        &mut client,
        shell("trap 'echo got INT; exit 3' INT; echo ready; while :; do sleep 0.05; done"),
    )
    .await;
    job.read_stdout(6).await;
    signal(&mut client, &job.job_id, pb::JobSignal::Int)
        .await
        .unwrap();
    let run = job.finish().await;
    assert_eq!(run.stdout, b"ready\ngot INT\n");
    assert_eq!(run.exited.exit_code, Some(3));

    // After the job: FAILED_PRECONDITION, naming why.
    let late = signal(&mut client, &run.job_id, pb::JobSignal::Int)
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    server.stop().await;
}

#[tokio::test]
async fn signals_through_attach_and_the_ones_refused() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let job = Job::start(&mut client, shell("sleep 30")).await;
    let id = job.job_id.clone();
    for refused in [pb::JobSignal::Unspecified as i32, 7, 64] {
        let status = client
            .signal(pb::SignalRequest {
                job_id: id.clone(),
                signal: refused,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    // STOP, then CONT, then TERM, through one Attach stream: the job ends by TERM.
    let (tx, mut attached) = attach_for_input(&mut client, &id).await;
    for sig in [
        pb::JobSignal::Stop,
        pb::JobSignal::Cont,
        pb::JobSignal::Term,
    ] {
        tx.send(pb::AttachRequest {
            kind: Some(pb::attach_request::Kind::Signal(sig as i32)),
        })
        .await
        .unwrap();
    }
    let run = job.finish().await;
    assert_eq!(run.exited.signal, Some(15), "{:?}", run.exited);
    assert_eq!(
        run.state(),
        JobState::Failed,
        "a signal the server did not send itself"
    );
    while let Ok(Some(_)) = attached.message().await {}
    server.stop().await;
}

#[tokio::test]
async fn health_and_started_say_what_each_backend_can_do() {
    let local = pb::Capabilities {
        stdin: true,
        stdin_eof: true,
        tty: true,
        resize: true,
        signals: true,
    };
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let health = common::health(&mut client).await;
    assert_eq!(health.capabilities, Some(local));
    let mut stream = client.exec(shell("true")).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let Some(pb::exec_event::Kind::Started(started)) = first.kind else {
        panic!("{first:?}");
    };
    assert_eq!(started.capabilities, Some(local));
    server.stop().await;

    let fake = sandbox_runner::testing::daytona::FakeDaytona::start(common::DAYTONA_KEY).await;
    let server = common::start_daytona(&fake, &[]).await;
    let health = common::health(&mut server.client().await).await;
    // Stdin in whole lines without EOF, and terminals, but no signals (see the README).
    let daytona = pb::Capabilities {
        stdin: true,
        stdin_eof: false,
        tty: true,
        resize: true,
        signals: false,
    };
    assert_eq!(health.capabilities, Some(daytona));
    server.stop().await;
}

/// What the job does to its stdin meanwhile (it stops reading, it ends) never cuts an Attach
/// stream short: the write is dropped and the events go on to `Exited`.
#[tokio::test]
async fn a_process_that_closes_its_stdin_does_not_end_the_writers_stream() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let job = Job::start(
        &mut client,
        pb::ExecRequest {
            stdin: true,
            ..common::argv(&["head", "-c", "5"])
        },
    )
    .await;
    let (tx, mut attached) = attach_for_input(&mut client, &job.job_id).await;
    for _ in 0..4 {
        // The first reaches `head`, which exits after 5 bytes; the rest meet a closed pipe.
        if tx.send(input(&[b'x'; 64 << 10], None)).await.is_err() {
            break;
        }
    }
    let run = job.finish().await;
    assert_eq!(run.stdout, b"xxxxx");
    let mut exited = None;
    loop {
        match attached.message().await {
            Ok(Some(event)) => {
                if let Some(pb::exec_event::Kind::Exited(e)) = event.kind {
                    exited = Some(e);
                }
            }
            Ok(None) => break,
            Err(status) => panic!("the stream ended with {status:?}"),
        }
    }
    assert_eq!(exited.unwrap().stdout_bytes, 5);
    server.stop().await;
}

/// A client whose process does not read what it writes can still interrupt it.
#[tokio::test]
async fn a_signal_goes_through_while_a_write_waits() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let mut job = Job::start(
        &mut client,
        with_stdin("trap 'echo got INT; exit 3' INT; echo ready; while :; do sleep 0.05; done"),
    )
    .await;
    job.read_stdout(6).await;
    let (tx, mut attached) = attach_for_input(&mut client, &job.job_id).await;
    // More than the pipe takes: this write waits for a reader that never comes.
    tx.send(input(&vec![b'x'; 1 << 20], None)).await.unwrap();
    tx.send(input(&vec![b'y'; 1 << 20], None)).await.unwrap();
    tx.send(pb::AttachRequest {
        kind: Some(pb::attach_request::Kind::Signal(pb::JobSignal::Int as i32)),
    })
    .await
    .unwrap();
    let run = tokio::time::timeout(Duration::from_secs(20), job.finish())
        .await
        .expect("INT, sent while a write waited, ended the job");
    assert_eq!(run.stdout, b"ready\ngot INT\n");
    assert_eq!(run.exited.exit_code, Some(3));
    while let Ok(Some(_)) = attached.message().await {}
    server.stop().await;
}
