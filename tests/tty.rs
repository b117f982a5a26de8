//! Jobs on a terminal (`tty`): what the program sees (a terminal of the requested size, resized
//! with SIGWINCH), input through the line discipline (echo, Ctrl-C for the foreground job, EOF
//! on close), signals to the foreground group, every byte written before exit delivered, and a
//! screen snapshot for a client that attaches after a gap. Real server, real client.

mod common;

use std::time::Duration;

use common::{Job, JobState, shell};
use sandbox_runner::proto::{self as pb, resume_from::Position};
use tonic::Code;

fn on_tty(command: &str, rows: u32, cols: u32) -> pb::ExecRequest {
    pb::ExecRequest {
        tty: Some(pb::TtyOptions {
            rows,
            cols,
            term: String::new(),
        }),
        ..shell(command)
    }
}

#[tokio::test]
async fn a_tty_job_sees_a_terminal_of_its_size_and_a_resize_reaches_it() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let mut job = Job::start(
        &mut client,
        on_tty(
            "test -t 0 -a -t 1 -a -t 2 && echo on-a-tty; echo \"TERM=$TERM\"; stty size; \
             trap 'echo winched; stty size' WINCH; echo ready; \
             while :; do read -r line; [ \"$line\" = done ] && exit 3; done",
            30,
            100,
        ),
    )
    .await;
    let ready = job.read_until(0, "ready\r\n").await;
    let (stdout, stderr) = job.kept();
    let text = String::from_utf8_lossy(&stdout[..ready]);
    assert!(
        text.contains("on-a-tty\r\n") && text.contains("TERM=xterm-256color\r\n"),
        "{text:?}"
    );
    assert!(text.contains("30 100\r\n"), "initial size: {text:?}");
    assert!(stderr.is_empty(), "a terminal has one output stream");

    common::resize(&mut client, &job.job_id, 40, 120)
        .await
        .unwrap();
    let winched = job.read_until(ready, "winched\r\n40 120\r\n").await;
    let status = common::status(&mut client, &job.job_id).await;
    assert_eq!(
        status.tty,
        Some(pb::TtyOptions {
            rows: 40,
            cols: 120,
            term: "xterm-256color".into()
        })
    );
    common::send_input(&mut client, &job.job_id, b"done\n", None)
        .await
        .unwrap();
    // The line discipline echoes what is typed.
    job.read_until(winched, "done\r\n").await;
    let run = job.finish().await;
    assert_eq!(run.exited.exit_code, Some(3));
    // A finished job's terminal is gone.
    let refused = common::resize(&mut client, &run.job_id, 10, 10)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    server.stop().await;
}

#[tokio::test]
async fn cat_on_a_tty_echoes_input_and_ends_when_input_is_closed() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let mut job = Job::start(&mut client, on_tty("cat", 0, 0)).await;
    common::send_input(&mut client, &job.job_id, b"hello\n", None)
        .await
        .unwrap();
    // Once echoed by the terminal, once printed by cat.
    job.read_until(0, "hello\r\nhello\r\n").await;
    client
        .close_input(pb::CloseInputRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap();
    let run = job.finish().await;
    assert_eq!(run.state(), JobState::Succeeded);
    assert_eq!(run.stdout, b"hello\r\nhello\r\n");
    server.stop().await;
}

/// Waits until the job's terminal has a `sleep` of `shell` in the foreground (so that Ctrl-C
/// reaches it rather than the shell reading its line): /proc's tpgid is the terminal's
/// foreground group.
async fn wait_for_foreground_sleep(shell: u32) -> u32 {
    for _ in 0..500 {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((comm, rest)) = stat.split_once(") ") else {
                continue;
            };
            let fields: Vec<&str> = rest.split(' ').collect();
            // state ppid pgrp session tty_nr tpgid
            if comm.ends_with("(sleep") && fields[1] == shell.to_string() && fields[2] == fields[5]
            {
                return fields[2].parse().unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no sleep of shell {shell} in the foreground");
}

#[tokio::test]
async fn ctrl_c_and_signal_int_interrupt_the_foreground_job_and_the_shell_survives() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let mut job = Job::start(
        &mut client,
        pb::ExecRequest {
            env: [("PS1".to_owned(), "$ ".to_owned())].into(),
            ..on_tty("exec sh -i", 0, 0)
        },
    )
    .await;
    let shell = job.pid;
    common::send_input(&mut client, &job.job_id, b"sleep 100\n", None)
        .await
        .unwrap();
    let group = wait_for_foreground_sleep(shell).await;
    assert_ne!(
        group, shell,
        "the interactive shell runs sleep in a group of its own"
    );
    // Ctrl-C, typed: the line discipline makes it SIGINT for the foreground group. (The
    // shell abandons the rest of a command line whose job was interrupted: the status is
    // asked for on a line of its own.)
    common::send_input(&mut client, &job.job_id, b"\x03", None)
        .await
        .unwrap();
    let at = job.read_until(0, "^C").await;
    common::send_input(&mut client, &job.job_id, b"echo rc=$?\n", None)
        .await
        .unwrap();
    let at = job.read_until(at, "rc=130\r\n").await;

    // The same through Signal: to the foreground group, not the shell's.
    common::send_input(&mut client, &job.job_id, b"sleep 100\n", None)
        .await
        .unwrap();
    wait_for_foreground_sleep(shell).await;
    client
        .signal(pb::SignalRequest {
            job_id: job.job_id.clone(),
            signal: pb::JobSignal::Int as i32,
        })
        .await
        .unwrap();
    common::send_input(&mut client, &job.job_id, b"echo rc=$?\n", None)
        .await
        .unwrap();
    let at = job.read_until(at, "rc=130\r\n").await;
    common::send_input(&mut client, &job.job_id, b"echo still-$((20+22))\n", None)
        .await
        .unwrap();
    let at = job.read_until(at, "still-42\r\n").await;
    common::send_input(&mut client, &job.job_id, b"exit 5\n", None)
        .await
        .unwrap();
    job.read_until(at, "exit 5").await;
    let run = job.finish().await;
    assert_eq!(run.exited.exit_code, Some(5), "the shell survived both");
    server.stop().await;
}

#[tokio::test]
async fn output_written_just_before_exit_is_all_delivered() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let runs = (0..12).map(|_| {
        let mut client = client.clone();
        async move {
            common::run(
                &mut client,
                on_tty("head -c 1048576 /dev/zero | tr '\\0' x; exit 0", 0, 0),
            )
            .await
        }
    });
    for run in futures_util::future::join_all(runs).await {
        assert_eq!(run.state(), JobState::Succeeded);
        assert_eq!(run.stdout.len(), 1 << 20, "every byte before the exit");
        assert!(run.stdout.iter().all(|&b| b == b'x'));
    }
    let run = common::run(&mut client, on_tty("printf last", 0, 0)).await;
    assert_eq!(run.stdout, b"last");
    server.stop().await;
}

/// A screen drawn with escape sequences, and where a terminal shows it.
const SCREEN: &str = "\\033[2J\\033[H\\033[1;31mTOP\\033[0m plain\\033[5;10HMIDDLE";

fn shown(snapshot: &pb::Snapshot) -> vt100::Parser {
    let size = |n: u32| std::num::NonZeroU16::new(n as u16).unwrap();
    let mut terminal = vt100::Parser::new(size(snapshot.rows), size(snapshot.cols), 0);
    terminal.process(b"what the client's terminal showed before");
    terminal.process(&snapshot.screen);
    terminal
}

fn assert_is_the_drawn_screen(snapshot: &pb::Snapshot) {
    let terminal = shown(snapshot);
    let screen = terminal.screen();
    assert_eq!(screen.contents_between(0, 0, 0, 9), "TOP plain");
    assert!(screen.cell(0, 0).unwrap().bold());
    assert_eq!(screen.cell(0, 0).unwrap().fgcolor(), vt100::Color::Idx(1));
    assert!(!screen.cell(0, 5).unwrap().bold());
    assert_eq!(screen.contents_between(4, 9, 4, 15), "MIDDLE");
    assert_eq!(screen.cursor_position(), (4, 15));
    assert_eq!(
        (
            snapshot.cursor_row,
            snapshot.cursor_col,
            snapshot.rows,
            snapshot.cols
        ),
        (4, 15, 8, 40)
    );
    // Everything else is blank: the flood before it was cleared.
    assert_eq!(
        screen.contents().trim_end(),
        "TOP plain\n\n\n\n         MIDDLE"
    );
}

#[tokio::test]
async fn an_attach_after_a_gap_gets_a_snapshot_of_the_screen_then_live_output() {
    let server = common::start(&["--job-log-bytes", "65536", "--job-log-events", "16"]).await;
    let mut client = server.client().await;
    let mut job = Job::start(
        &mut client,
        pb::ExecRequest {
            on_disconnect: pb::DisconnectPolicy::Detach as i32,
            ..on_tty(
                &format!(
                    "yes flood | head -c 1000000; printf '{SCREEN}'; read -r x; echo \"got $x\""
                ),
                8,
                40,
            )
        },
    )
    .await;
    job.step().await;
    let (id, _) = job.disconnect();
    // Until everything is drawn (the flood is 1,000,000 bytes, with \r added to each line).
    let mut drawn = 0;
    for _ in 0..500 {
        drawn = common::status(&mut client, &id).await.stdout_bytes;
        if drawn >= 1_125_000 + 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let drawn_now = common::status(&mut client, &id).await.stdout_bytes;
    assert_eq!(drawn, drawn_now, "the job has drawn its screen and waits");

    // From the start, long evicted: a gap, then the screen, then what comes next.
    let stream = common::attach(&mut client, &id, None, pb::GapPolicy::Report, false)
        .await
        .unwrap();
    let mut attached = Job::resume(stream, None, [0, 0]).await;
    while attached.snapshots().is_empty() {
        assert!(attached.step().await, "no snapshot");
    }
    assert_eq!(attached.gaps().len(), 1, "the gap is reported first");
    let snapshot = &attached.snapshots()[0];
    assert_eq!(snapshot.stdout_offset, drawn);
    assert_is_the_drawn_screen(snapshot);

    // A web terminal opening: the screen first, whatever the log holds.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::AttachRequest {
        kind: Some(pb::attach_request::Kind::Open(pb::AttachOpen {
            job_id: id.clone(),
            snapshot: true,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let stream = client
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut opened = Job::resume(stream, None, [0, 0]).await;
    opened.step().await;
    assert!(opened.gaps().is_empty());
    assert_eq!(opened.snapshots().len(), 1, "the screen comes first");
    assert_is_the_drawn_screen(&opened.snapshots()[0]);

    // Live output follows both, contiguous from the snapshot's offset.
    tx.send(pb::AttachRequest {
        kind: Some(pb::attach_request::Kind::Input(pb::StdinData {
            data: b"yes\n".to_vec().into(),
            offset: None,
        })),
    })
    .await
    .unwrap();
    for reader in [attached, opened] {
        let run = reader.finish().await;
        assert_eq!(run.state(), JobState::Succeeded);
        assert_eq!(run.stdout, b"yes\r\ngot yes\r\n");
    }
    server.stop().await;
}

#[tokio::test]
async fn terminal_requests_that_cannot_be_served_are_refused_with_their_codes() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    for (rows, cols, term) in [(300, 300, ""), (24, 80, "xterm; rm -rf /"), (1, 65_537, "")] {
        let refused = client
            .exec(pb::ExecRequest {
                tty: Some(pb::TtyOptions {
                    rows,
                    cols,
                    term: term.into(),
                }),
                ..shell("true")
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    }
    // Resizing a job without a terminal, or to no size at all.
    let mut piped = Job::start(&mut client, shell("sleep 30")).await;
    let refused = common::resize(&mut client, &piped.job_id, 24, 80)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("no terminal"), "{refused:?}");
    let mut tty = Job::start(&mut client, on_tty("sleep 30", 0, 0)).await;
    let refused = common::resize(&mut client, &tty.job_id, 0, 80)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    // `snapshot` starts from now: with `from` it is a contradiction.
    let open = pb::AttachRequest {
        kind: Some(pb::attach_request::Kind::Open(pb::AttachOpen {
            job_id: tty.job_id.clone(),
            from: Some(pb::ResumeFrom {
                position: Some(Position::AfterSeq(0)),
            }),
            snapshot: true,
            ..Default::default()
        })),
    };
    let refused = client.attach(tokio_stream::iter([open])).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    for job in [&mut piped, &mut tty] {
        common::cancel(&mut client, &job.job_id).await;
    }
    piped.finish().await;
    tty.finish().await;
    server.stop().await;
}

#[tokio::test]
async fn a_screen_that_does_not_fit_the_output_budget_is_refused() {
    // 1 MiB shared: a 65,536-cell screen needs 4 MiB.
    let server = common::start(&["--output-budget-bytes", "1048576"]).await;
    let mut client = server.client().await;
    let refused = client.exec(on_tty("true", 256, 256)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // A small one fits, and its screen's memory goes back when the job ends: twelve in turn
    // (120 KiB each) would not fit together.
    for _ in 0..12 {
        let run = common::run(&mut client, on_tty("echo fits", 24, 80)).await;
        assert_eq!(run.stdout, b"fits\r\n");
    }
    server.stop().await;
}
