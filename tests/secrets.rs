//! Secrets never on the command line, and rotated without a restart: a secret given as a flag
//! stops the binary (exit 64); secrets come from files the binary re-reads on SIGHUP and when
//! they change; a job can find no secret in the server's /proc/<pid>/cmdline nor its own
//! environment. Loopback only; every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::{JobState, SecretFile, shell};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use sandbox_runner::{
    proto::{self as pb, sandbox_service_client::SandboxServiceClient},
    testing::{convex_ingest::FakeIngest, daytona::FakeDaytona},
};
use tokio::process::Command;
use tonic::{Code, Request, transport::Channel};

const BIN: &str = env!("CARGO_BIN_EXE_sandbox-runner");
/// Upper bound of every wait for a rotation.
const PATIENCE: Duration = Duration::from_secs(30);
/// Every variable the binary reads a secret (or a secret's file) from.
const SECRET_VARS: &[&str] = &[
    "SANDBOX_RUNNER_TOKEN",
    "SANDBOX_RUNNER_TOKEN_FILE",
    "JOB_ID_SIGNING_KEY",
    "JOB_ID_SIGNING_KEY_FILE",
    "CONVEX_INGEST_SECRET",
    "CONVEX_INGEST_SECRET_FILE",
    "DAYTONA_API_KEY",
    "DAYTONA_API_KEY_FILE",
];

/// SandboxService.Health with this bearer token (or none): Ok, or the refusal's code.
async fn health(
    client: &mut SandboxServiceClient<Channel>,
    token: Option<&str>,
) -> Result<(), Code> {
    let mut request = Request::new(pb::HealthRequest {});
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    client
        .health(request)
        .await
        .map(|_| ())
        .map_err(|s| s.code())
}

/// Waits (bounded) until `old` is refused and `new` accepted.
async fn wait_rotated(client: &mut SandboxServiceClient<Channel>, old: &str, new: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let old_refused = health(client, Some(old)).await == Err(Code::Unauthenticated);
        if old_refused && health(client, Some(new)).await == Ok(()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tokens not rotated from {old} to {new}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_secret_given_as_a_flag_exits_64_naming_the_variable_and_the_file_flag() {
    let key = "k".repeat(40);
    let cases: &[(&[&str], &str, &str)] = &[
        (
            &["--auth-tokens", "s3cr3t-flag"],
            "SANDBOX_RUNNER_TOKEN",
            "--auth-tokens-file",
        ),
        (
            &["--job-id-signing-key", &key],
            "JOB_ID_SIGNING_KEY",
            "--job-id-signing-key-file",
        ),
        (
            &[
                "--convex-site-url",
                "http://127.0.0.1:9",
                "--convex-ingest-secret",
                "s3cr3t-flag",
            ],
            "CONVEX_INGEST_SECRET",
            "--convex-ingest-secret-file",
        ),
        (
            &["--backend", "daytona", "--daytona-api-key", "s3cr3t-flag"],
            "DAYTONA_API_KEY",
            "--daytona-api-key-file",
        ),
    ];
    for (args, var, file_flag) in cases {
        let mut command = Command::new(BIN);
        command.args(*args).arg("--check-config");
        for name in SECRET_VARS {
            command.env_remove(name);
        }
        let output = command.output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains("refused"), "{args:?}: {stderr}");
        assert!(
            stderr.contains(var) && stderr.contains(file_flag),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("s3cr3t-flag") && !stderr.contains(&key),
            "{stderr}"
        );
    }

    // The same secrets in the environment are accepted.
    let output = Command::new(BIN)
        .args(["--check-config", "--convex-site-url", "http://127.0.0.1:9"])
        .env("SANDBOX_RUNNER_TOKEN", "tok")
        .env("JOB_ID_SIGNING_KEY", &key)
        .env("CONVEX_INGEST_SECRET", "s")
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn a_rewritten_tokens_file_rotates_the_tokens_and_a_bad_one_keeps_them() {
    let tokens = SecretFile::new("# the first token\nold-token\n");
    let mut server = common::start_binary(
        &[
            "--auth-tokens-file",
            tokens.path(),
            "--secret-poll-interval",
            "100ms",
        ],
        &[],
    )
    .await;
    let mut client = SandboxServiceClient::new(server.channel().await.unwrap());
    assert_eq!(health(&mut client, Some("old-token")).await, Ok(()));
    assert_eq!(health(&mut client, None).await, Err(Code::Unauthenticated));
    assert_eq!(
        health(&mut client, Some("nope")).await,
        Err(Code::Unauthenticated)
    );

    // Both during the switch-over, then the new one alone.
    tokens.write("old-token\nnew-token\n");
    wait_rotated(&mut client, "nope", "new-token").await;
    assert_eq!(health(&mut client, Some("old-token")).await, Ok(()));
    tokens.write("new-token\n");
    wait_rotated(&mut client, "old-token", "new-token").await;

    // Emptied, then only comments, then gone: each is logged and the tokens in use stay.
    for (bad, why) in [
        (Some(""), "it is empty"),
        (Some("# none yet\n"), "it holds no token"),
        (None, "cannot read it"),
    ] {
        match bad {
            Some(content) => tokens.write(content),
            None => std::fs::remove_file(&tokens.0).unwrap(),
        }
        let line = server
            .wait_log("cannot reload a secret file; keeping the value in use")
            .await
            .unwrap();
        assert!(
            line["fields"]["error"].as_str().unwrap().contains(why),
            "{line}"
        );
        assert_eq!(health(&mut client, Some("new-token")).await, Ok(()));
        assert_eq!(health(&mut client, None).await, Err(Code::Unauthenticated));
    }
    tokens.write("third-token");
    wait_rotated(&mut client, "new-token", "third-token").await;

    server.sigterm().unwrap();
    let (status, logs) = server.exit().await.unwrap();
    assert!(status.success(), "{status}");
    assert!(logs.contains("secret reloaded"), "{logs}");
    for token in ["old-token", "new-token", "third-token"] {
        assert!(!logs.contains(token), "{token} in the log:\n{logs}");
    }
}

#[tokio::test]
async fn sighup_rereads_the_secret_files_at_once() {
    let tokens = SecretFile::new("old-token\n");
    let key = SecretFile::new(&format!("{}\n", "a".repeat(32)));
    // No polling: whatever changes, changes because of SIGHUP.
    let mut server = common::start_binary(
        &[
            "--auth-tokens-file",
            tokens.path(),
            "--job-id-signing-key-file",
            key.path(),
            "--secret-poll-interval",
            "0s",
        ],
        &[],
    )
    .await;
    let mut client = SandboxServiceClient::new(server.channel().await.unwrap());
    assert_eq!(health(&mut client, Some("old-token")).await, Ok(()));

    tokens.write("new-token\n");
    key.write(&"b".repeat(32));
    kill(Pid::from_raw(server.pid as i32), Signal::SIGHUP).unwrap();
    server
        .wait_log("re-reading secret files (SIGHUP)")
        .await
        .unwrap();
    wait_rotated(&mut client, "old-token", "new-token").await;
    // The signing key is not swapped under running ids; the change is announced.
    let line = server
        .wait_log("secret file changed; it takes effect at the next restart")
        .await
        .unwrap();
    assert_eq!(line["fields"]["file"], "JOB_ID_SIGNING_KEY_FILE", "{line}");

    // A second SIGHUP with nothing changed changes nothing, and the server goes on.
    kill(Pid::from_raw(server.pid as i32), Signal::SIGHUP).unwrap();
    server
        .wait_log("re-reading secret files (SIGHUP)")
        .await
        .unwrap();
    assert_eq!(health(&mut client, Some("new-token")).await, Ok(()));
    server.stop().await;
}

#[tokio::test]
async fn no_secret_in_the_servers_cmdline_nor_in_a_jobs_environment() {
    let token = "cmdline-token-0123456789";
    let signing_key = "cmdline-signing-key-0123456789abcdef";
    let tokens = SecretFile::new(token);
    let key = SecretFile::new(signing_key);
    let server = common::start_binary(
        &["--auth-tokens-file", tokens.path()],
        &[("JOB_ID_SIGNING_KEY_FILE", key.path())],
    )
    .await;

    let cmdline = std::fs::read(format!("/proc/{}/cmdline", server.pid)).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains(tokens.path()), "{cmdline}");
    assert!(
        !cmdline.contains(token) && !cmdline.contains(signing_key),
        "{cmdline}"
    );

    // What a job sees: the server's command line, and its own environment.
    let mut client = SandboxServiceClient::new(server.channel().await.unwrap());
    let mut request = Request::new(shell(
        "cat /proc/$PPID/cmdline; echo; env | grep -c -e ^SANDBOX_RUNNER_TOKEN -e ^JOB_ID_SIGNING_KEY || true",
    ));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let stream = client.exec(request).await.unwrap().into_inner();
    let run = common::Job::from_stream(stream).await.finish().await;
    assert_eq!(run.state(), JobState::Succeeded, "{:?}", run.exited);
    let seen = String::from_utf8_lossy(&run.stdout);
    assert!(
        seen.contains("--auth-tokens-file"),
        "the job read another process: {seen}"
    );
    assert!(
        !seen.contains(token) && !seen.contains(signing_key),
        "{seen}"
    );
    // Nor the *_FILE variables: a job is not told where the secrets live.
    assert!(seen.ends_with("\n0\n"), "{seen}");
    server.stop().await;
}

#[tokio::test]
async fn a_rotated_daytona_key_is_used_from_the_next_request_on() {
    let fake = FakeDaytona::start(common::DAYTONA_KEY).await;
    fake.add_sandbox("sbx-1", "started");
    let key = SecretFile::new("revoked-key\n");
    let server = common::start(&[
        "--backend",
        "daytona",
        "--daytona-api-key-file",
        key.path(),
        "--daytona-api-url",
        &fake.api_url,
        "--daytona-poll-interval",
        "50ms",
        "--secret-poll-interval",
        "100ms",
    ])
    .await;
    let mut client = server.client().await;
    let request = || pb::ExecRequest {
        sandbox_id: "sbx-1".into(),
        ..shell("echo rotated")
    };
    let err = client.exec(request()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    key.write(&format!("{}\n", common::DAYTONA_KEY));
    let deadline = Instant::now() + PATIENCE;
    let stream = loop {
        match client.exec(request()).await {
            Ok(stream) => break stream.into_inner(),
            Err(e) => assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}"),
        }
        assert!(Instant::now() < deadline, "the new key was never used");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let run = common::Job::from_stream(stream).await.finish().await;
    assert_eq!(run.stdout, b"rotated\n");
    server.stop().await;
}

#[tokio::test]
async fn a_rotated_convex_secret_is_sent_from_the_next_record_on() {
    const SECRET: &str = "convex-ingest-secret-0123456789";
    let fake = FakeIngest::start(SECRET).await;
    let secret = SecretFile::new("stale-secret\n");
    let site = fake.site_url();
    let server = common::start(&[
        "--convex-site-url",
        &site,
        "--convex-ingest-secret-file",
        secret.path(),
        "--secret-poll-interval",
        "100ms",
    ])
    .await;
    let mut client = server.client().await;
    let deadline = Instant::now() + PATIENCE;
    let mut rotated = false;
    for attempt in 0.. {
        let session = format!("session-{attempt}");
        let request = pb::ExecRequest {
            task_id: "task-1".into(),
            session_id: session.clone(),
            ..shell("echo mirrored")
        };
        let run = common::run(&mut client, request).await;
        // The job's mirror ends delivered, or refused (401) with the stale secret.
        loop {
            let mirror = common::status(&mut client, &run.job_id)
                .await
                .mirror
                .unwrap();
            if mirror.complete {
                break;
            }
            assert!(Instant::now() < deadline, "mirror never completed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !fake.session(&session).is_empty() {
            break;
        }
        assert!(fake.refused().contains(&401), "{:?}", fake.refused());
        if !rotated {
            secret.write(SECRET);
            rotated = true;
        }
        assert!(Instant::now() < deadline, "the new secret was never sent");
    }
    server.stop().await;
}
