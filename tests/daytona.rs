//! The Daytona backend against a faithful fake Daytona API (real HTTP + WebSocket on loopback,
//! really running the commands): streams, exit codes, bulk output, quoting, cancel, timeout,
//! client disconnect, every fault switch, and 100 concurrent jobs.

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::{Job, JobState, TestServer, argv, cancel, sha256, shell, wait_finished};
use sandbox_runner::{proto as pb, testing::daytona::FakeDaytona};
use tonic::Code;

const KEY: &str = common::DAYTONA_KEY;
const SANDBOX: &str = "sbx-1";

async fn setup(extra: &[&str]) -> (FakeDaytona, TestServer) {
    let fake = FakeDaytona::start(KEY).await;
    fake.add_sandbox(SANDBOX, "started");
    let server = common::start_daytona(&fake, extra).await;
    (fake, server)
}

fn in_sandbox(mut req: pb::ExecRequest) -> pb::ExecRequest {
    req.sandbox_id = SANDBOX.into();
    req
}

/// Every session the runner created is deleted (bounded wait).
async fn assert_sessions_cleaned(fake: &FakeDaytona) {
    for _ in 0..200 {
        if fake.live_sessions() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(fake.live_sessions(), 0, "sessions leaked");
    let mut created = fake.created_sessions();
    let mut deleted = fake.deleted_sessions();
    created.sort();
    deleted.sort();
    assert_eq!(created, deleted);
}

#[tokio::test]
async fn output_streams_and_exit_codes() {
    let (fake, server) = setup(&[]).await;
    let mut client = server.client().await;
    let run = common::run(
        &mut client,
        in_sandbox(shell(
            "echo out1; echo err1 >&2; sleep 0.1; echo out2; printf 'no newline' >&2",
        )),
    )
    .await;
    assert_eq!(run.stdout, b"out1\nout2\n");
    // Daytona's line framing adds the missing final newline.
    assert_eq!(run.stderr, b"err1\nno newline\n");
    assert_eq!(run.state(), JobState::Succeeded);
    assert_eq!(run.pid, 0);

    for (command, code, state) in [
        ("true", 0, JobState::Succeeded),
        ("exit 1", 1, JobState::Failed),
        ("exit 42", 42, JobState::Failed),
    ] {
        let run = common::run(&mut client, in_sandbox(shell(command))).await;
        assert_eq!(run.exited.exit_code, Some(code), "{command}");
        assert_eq!(run.state(), state, "{command}");
    }
    let run = common::run(&mut client, in_sandbox(shell("kill -9 $$"))).await;
    assert_eq!((run.exited.exit_code, run.exited.signal), (None, Some(9)));
    assert_eq!(run.state(), JobState::Failed);

    let run = common::run(
        &mut client,
        in_sandbox(argv(&["printf", "[%s]", "a b", "it's", "$HOME"])),
    )
    .await;
    assert_eq!(run.stdout, b"[a b][it's][$HOME]\n");

    let status = common::status(&mut client, &run.job_id).await;
    assert_eq!(status.backend, "daytona");
    assert_eq!(status.sandbox_id, SANDBOX);
    assert_sessions_cleaned(&fake).await;
    server.stop().await;
}

#[tokio::test]
async fn ten_mib_of_text_arrive_identical() {
    let (fake, server) = setup(&[]).await;
    let mut client = server.client().await;
    // 10 MiB of numbered lines (awk is fast and deterministic).
    let command = "awk 'BEGIN { for (i = 0; i < 163840; i++) printf \"%063d\\n\", i }'";
    let expected: Vec<u8> = (0..163840)
        .flat_map(|i| format!("{i:063}\n").into_bytes())
        .collect();
    assert_eq!(expected.len(), 10 << 20);
    let run = common::run(&mut client, in_sandbox(shell(command))).await;
    assert_eq!(run.stdout.len(), expected.len());
    assert_eq!(sha256(&run.stdout), sha256(&expected));
    assert_eq!(run.state(), JobState::Succeeded);
    assert_sessions_cleaned(&fake).await;
    server.stop().await;
}

#[tokio::test]
async fn hostile_cwd_and_env_are_applied_exactly_and_inject_nothing() {
    let (fake, server) = setup(&[]).await;
    let mut client = server.client().await;
    let base = std::env::temp_dir().join(format!("sr-daytona-{}", std::process::id()));
    let dir = base.join("dir with 'quotes' $HOME and\nnewline");
    std::fs::create_dir_all(&dir).unwrap();
    let marker = base.join("pwned");
    let hostile = format!(
        "a'b \"c\" $HOME `x` $(touch {m}) ; touch {m}\nsecond line",
        m = marker.display()
    );

    let mut req = in_sandbox(shell("printf '%s|' \"$(pwd)\" \"$HOSTILE\" \"$SPACE\""));
    req.cwd = dir.to_string_lossy().into_owned();
    req.env.insert("HOSTILE".into(), hostile.clone());
    req.env.insert("SPACE".into(), " x ".into());
    let run = common::run(&mut client, req).await;
    let canonical = dir.canonicalize().unwrap();
    assert_eq!(
        String::from_utf8(run.stdout).unwrap(),
        // The printf output has no final newline; Daytona's framing adds one.
        format!("{}|{hostile}| x |\n", canonical.display())
    );
    assert!(!marker.exists(), "the env value ran as a command");

    let run = common::run(
        &mut client,
        in_sandbox(argv(&[
            "printf",
            "%s",
            &format!("$(touch {})", marker.display()),
        ])),
    )
    .await;
    assert_eq!(run.state(), JobState::Succeeded);
    assert!(!marker.exists(), "an argv word ran as a command");
    std::fs::remove_dir_all(&base).unwrap();
    assert_sessions_cleaned(&fake).await;
    server.stop().await;
}

#[tokio::test]
async fn cancel_disconnect_and_timeout_delete_the_session() {
    let (fake, server) = setup(&[]).await;
    let mut client = server.client().await;

    let mut job = Job::start(&mut client, in_sandbox(shell("echo up; sleep 1000"))).await;
    job.read_stdout(3).await;
    cancel(&mut client, &job.job_id).await;
    let run = job.finish().await;
    assert_eq!(run.state(), JobState::Cancelled);
    assert!(
        run.exited.message.contains("cancelled by request"),
        "{}",
        run.exited.message
    );
    assert_eq!(fake.deleted_sessions().len(), 1);

    let mut job = Job::start(&mut client, in_sandbox(shell("echo up; sleep 1000"))).await;
    job.read_stdout(3).await;
    let (job_id, _) = job.disconnect();
    let status = wait_finished(&mut client, &job_id).await;
    assert_eq!(status.state, JobState::Cancelled as i32);

    let req = common::with_timeout(in_sandbox(shell("sleep 1000")), Duration::from_millis(300));
    let run = common::run(&mut client, req).await;
    assert_eq!(run.state(), JobState::TimedOut);
    assert!(
        run.exited.message.contains("no exit code"),
        "{}",
        run.exited.message
    );
    assert_sessions_cleaned(&fake).await;
    assert_eq!(fake.deleted_sessions().len(), 3);
    server.stop().await;
}

#[tokio::test]
async fn request_and_sandbox_errors_map_to_codes() {
    let (fake, server) = setup(&[]).await;
    let mut client = server.client().await;

    let err = client.exec(shell("true")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("sandbox_id"), "{}", err.message());

    let mut req = shell("true");
    req.sandbox_id = "missing-sandbox".into();
    let err = client.exec(req).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("missing-sandbox"),
        "{}",
        err.message()
    );

    fake.add_sandbox("stopped-one", "stopped");
    let mut req = shell("true");
    req.sandbox_id = "stopped-one".into();
    let err = client.exec(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("stopped"), "{}", err.message());

    fake.faults().unauthorized.store(true, Ordering::SeqCst);
    let err = client.exec(in_sandbox(shell("true"))).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "never the caller's UNAUTHENTICATED"
    );
    assert!(
        err.message().contains("DAYTONA_API_KEY"),
        "{}",
        err.message()
    );
    fake.faults().unauthorized.store(false, Ordering::SeqCst);

    // Transient 503s on GETs are retried.
    fake.faults()
        .transient_get_failures
        .store(2, Ordering::SeqCst);
    let run = common::run(&mut client, in_sandbox(shell("echo after-retries"))).await;
    assert_eq!(run.stdout, b"after-retries\n");

    // A slow API is slow, not broken.
    fake.faults().api_delay_ms.store(150, Ordering::SeqCst);
    let run = common::run(&mut client, in_sandbox(shell("echo slow"))).await;
    assert_eq!(run.stdout, b"slow\n");
    fake.faults().api_delay_ms.store(0, Ordering::SeqCst);
    assert_sessions_cleaned(&fake).await;
    server.stop().await;
}

#[tokio::test]
async fn older_apis_without_toolbox_proxy_url_in_the_dto_still_work() {
    let (fake, server) = setup(&[]).await;
    fake.faults()
        .legacy_sandbox_dto
        .store(true, Ordering::SeqCst);
    let mut client = server.client().await;
    let run = common::run(&mut client, in_sandbox(shell("echo via-fallback"))).await;
    assert_eq!(run.stdout, b"via-fallback\n");
    assert_sessions_cleaned(&fake).await;
    server.stop().await;
}

#[tokio::test]
async fn shutdown_deletes_the_sessions_of_running_jobs() {
    let (fake, server) = setup(&["--drain-grace", "100ms"]).await;
    let mut client = server.client().await;
    let mut job = Job::start(&mut client, in_sandbox(shell("echo up; sleep 1000"))).await;
    job.read_stdout(3).await;
    let stop = tokio::spawn(server.stop());
    let run = job.finish().await;
    assert_eq!(run.state(), JobState::Cancelled);
    assert!(
        run.exited.message.contains("shutting down"),
        "{}",
        run.exited.message
    );
    stop.await.unwrap();
    assert_sessions_cleaned(&fake).await;
}

#[tokio::test]
async fn stopped_sandboxes_start_when_auto_start_is_on() {
    let (fake, server) = setup(&["--daytona-auto-start"]).await;
    fake.add_sandbox(SANDBOX, "stopped");
    let mut client = server.client().await;
    let run = common::run(&mut client, in_sandbox(shell("echo started"))).await;
    assert_eq!(run.stdout, b"started\n");
    assert_eq!(fake.sandbox_state(SANDBOX).as_deref(), Some("started"));
    server.stop().await;
}

#[tokio::test]
async fn log_stream_faults_lose_no_output() {
    let (fake, server) = setup(&[]).await;
    let mut client = server.client().await;
    let command =
        "for i in $(seq 1 300); do echo \"out $i\"; echo \"err $i\" >&2; done; printf tail";
    let expect = |tag: &str, last: &str| -> Vec<u8> {
        let mut v: Vec<u8> = (1..=300)
            .flat_map(|i| format!("{tag} {i}\n").into_bytes())
            .collect();
        v.extend_from_slice(last.as_bytes());
        v
    };
    for fault in [
        &fake.faults().refuse_log_stream,
        &fake.faults().lose_log_tail,
        &fake.faults().split_frames,
    ] {
        fault.store(true, Ordering::SeqCst);
        let run = common::run(&mut client, in_sandbox(shell(command))).await;
        fault.store(false, Ordering::SeqCst);
        assert_eq!(run.stdout, expect("out", "tail\n"));
        assert_eq!(run.stderr, expect("err", ""));
        assert_eq!(run.state(), JobState::Succeeded);
    }
    assert_sessions_cleaned(&fake).await;
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_survives_tail_reconciliation_byte_for_byte() {
    let (fake, server) = setup(&[]).await;
    let mut client = server.client().await;
    // Invalid UTF-8 and a multi-byte character; the tail is what reconciliation must supply.
    let command = r"printf 'head\377\376 mid \342\202\254\n'; printf 'tail \377 end\n' >&2";
    for fault in [
        &fake.faults().lose_log_tail,
        &fake.faults().refuse_log_stream,
    ] {
        fault.store(true, Ordering::SeqCst);
        let run = common::run(&mut client, in_sandbox(shell(command))).await;
        fault.store(false, Ordering::SeqCst);
        assert_eq!(run.stdout, b"head\xff\xfe mid \xe2\x82\xac\n");
        assert_eq!(run.stderr, b"tail \xff end\n");
    }
    assert_sessions_cleaned(&fake).await;
    server.stop().await;
}

#[tokio::test]
async fn a_dead_session_shell_ends_by_timeout_with_a_clear_message() {
    let (fake, server) = setup(&[]).await;
    let mut client = server.client().await;
    fake.faults().dead_shell.store(true, Ordering::SeqCst);
    let req = common::with_timeout(
        in_sandbox(shell("echo never runs")),
        Duration::from_millis(500),
    );
    let run = common::run(&mut client, req).await;
    assert_eq!(run.state(), JobState::TimedOut);
    assert!(
        run.exited.message.contains("no exit code"),
        "{}",
        run.exited.message
    );
    fake.faults().dead_shell.store(false, Ordering::SeqCst);
    let run = common::run(&mut client, in_sandbox(shell("echo alive"))).await;
    assert_eq!(run.stdout, b"alive\n");
    assert_sessions_cleaned(&fake).await;
    server.stop().await;
}

#[tokio::test]
async fn an_unreachable_api_is_unavailable() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/api");
    let server = common::start(&[
        "--backend",
        "daytona",
        "--daytona-api-key",
        KEY,
        "--daytona-api-url",
        &url,
    ])
    .await;
    let mut client = server.client().await;
    let err = client.exec(in_sandbox(shell("true"))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let health = common::health(&mut client).await;
    assert!(health.daytona_configured);
    assert_eq!(health.backend, "daytona");
    server.stop().await;
}

#[tokio::test]
async fn a_hundred_concurrent_jobs_all_complete() {
    let (fake, server) = setup(&[]).await;
    let client = server.client().await;
    let mut jobs = tokio::task::JoinSet::new();
    for i in 0..100 {
        let mut client = client.clone();
        jobs.spawn(async move {
            let run = common::run(
                &mut client,
                in_sandbox(shell(&format!(
                    "echo out-{i}; echo err-{i} >&2; exit {}",
                    i % 3
                ))),
            )
            .await;
            assert_eq!(run.stdout, format!("out-{i}\n").into_bytes());
            assert_eq!(run.stderr, format!("err-{i}\n").into_bytes());
            assert_eq!(run.exited.exit_code, Some(i % 3));
        });
    }
    while let Some(result) = jobs.join_next().await {
        result.unwrap();
    }
    assert_eq!(fake.created_sessions().len(), 100);
    assert_sessions_cleaned(&fake).await;
    server.stop().await;
}
