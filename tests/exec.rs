//! Exec over real gRPC: output streams, exit codes, argv, env, cwd, bulk bytes, bad input.

mod common;

use common::{JobState, OutputStream, argv, run, sha256, shell};
use sandbox_runner::proto as pb;
use tonic::Code;

#[tokio::test]
async fn stdout_and_stderr_arrive_on_their_streams_in_order() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let run = run(
        &mut client,
        shell("echo out1; echo err1 >&2; sleep 0.2; echo out2; echo err2 >&2"),
    )
    .await;
    assert_eq!(run.stdout, b"out1\nout2\n");
    assert_eq!(run.stderr, b"err1\nerr2\n");
    assert_eq!(run.state(), JobState::Succeeded);
    assert_eq!(run.exited.exit_code, Some(0));
    assert_eq!(run.exited.signal, None);
    // The sleep separates the two halves, so the first half arrives before the second.
    let order: Vec<_> = run.chunks.iter().map(|(s, d)| (*s, d.clone())).collect();
    let pos = |stream, text: &[u8]| {
        order
            .iter()
            .position(|(s, d)| *s == stream && d.windows(text.len()).any(|w| w == text))
            .unwrap()
    };
    assert!(pos(OutputStream::Stdout, b"out1") < pos(OutputStream::Stdout, b"out2"));
    assert!(pos(OutputStream::Stderr, b"err1") < pos(OutputStream::Stdout, b"out2"));
    assert!(run.pid > 0);
    server.stop().await;
}

#[tokio::test]
async fn exit_codes_and_signals_are_reported() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    for (command, code, state) in [
        ("true", 0, JobState::Succeeded),
        ("exit 1", 1, JobState::Failed),
        ("exit 42", 42, JobState::Failed),
    ] {
        let run = run(&mut client, shell(command)).await;
        assert_eq!(run.exited.exit_code, Some(code), "{command}");
        assert_eq!(run.state(), state, "{command}");
        assert!(
            run.exited.message.contains(&code.to_string()),
            "{:?}",
            run.exited.message
        );
    }
    let run = run(&mut client, shell("kill -9 $$")).await;
    assert_eq!(run.exited.exit_code, None);
    assert_eq!(run.exited.signal, Some(9));
    assert_eq!(run.state(), JobState::Failed);
    assert!(
        run.exited.message.contains("SIGKILL"),
        "{}",
        run.exited.message
    );
    server.stop().await;
}

#[tokio::test]
async fn argv_runs_without_a_shell() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let tricky = [
        "a b",
        "'quoted'",
        "\"dq\"",
        "$HOME",
        "`id`",
        "; echo injected",
        "",
    ];
    let mut args = vec!["printf", "[%s]\\n"];
    args.extend(tricky);
    let run = run(&mut client, argv(&args)).await;
    let expected: String = tricky.iter().map(|a| format!("[{a}]\n")).collect();
    assert_eq!(String::from_utf8(run.stdout.clone()).unwrap(), expected);
    assert_eq!(run.state(), JobState::Succeeded);
    server.stop().await;
}

#[tokio::test]
async fn env_and_cwd_are_applied_exactly() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let dir = std::env::temp_dir().join(format!("sr-cwd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut req = argv(&[
        "sh",
        "-c",
        "pwd; printf '%s|' \"$GREETING\" \"$EMPTY\" \"${SANDBOX_RUNNER_TOKEN-unset}\"",
    ]);
    req.cwd = dir.to_string_lossy().into_owned();
    req.env
        .insert("GREETING".into(), "hello 'world' $x\nline2".into());
    req.env.insert("EMPTY".into(), "".into());
    let run = run(&mut client, req).await;
    let canonical = dir.canonicalize().unwrap();
    assert_eq!(
        String::from_utf8(run.stdout).unwrap(),
        format!("{}\nhello 'world' $x\nline2||unset|", canonical.display())
    );
    std::fs::remove_dir_all(&dir).unwrap();
    server.stop().await;
}

#[tokio::test]
async fn fifty_mib_of_random_bytes_arrive_identical() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    // Deterministic pseudo-random bytes (xorshift), including NULs and invalid UTF-8.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..50 * 1024 * 1024 / 8)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()
        })
        .collect();
    let path = std::env::temp_dir().join(format!("sr-random-{}", std::process::id()));
    std::fs::write(&path, &data).unwrap();
    let run = run(&mut client, argv(&["cat", path.to_str().unwrap()])).await;
    std::fs::remove_file(&path).unwrap();
    assert_eq!(run.stdout.len(), data.len());
    assert_eq!(sha256(&run.stdout), sha256(&data));
    assert!(run.stderr.is_empty());
    assert_eq!(run.state(), JobState::Succeeded);
    // Large chunks, not one event per line or per 4 KiB.
    assert!(
        run.chunks.len() < 50 * 1024 / 16,
        "{} chunks",
        run.chunks.len()
    );
    server.stop().await;
}

#[tokio::test]
async fn interleaved_bulk_output_keeps_both_streams_whole() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let run = run(
        &mut client,
        shell("for i in $(seq 1 20000); do echo \"out $i\"; echo \"err $i\" >&2; done"),
    )
    .await;
    let expect = |tag: &str| -> Vec<u8> {
        (1..=20000)
            .flat_map(|i| format!("{tag} {i}\n").into_bytes())
            .collect()
    };
    assert_eq!(run.stdout, expect("out"));
    assert_eq!(run.stderr, expect("err"));
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_get_invalid_argument_with_a_reason() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let with = |edit: fn(&mut pb::ExecRequest)| {
        let mut req = shell("true");
        edit(&mut req);
        req
    };
    let cases: Vec<(pb::ExecRequest, &str)> = vec![
        (shell(""), "exactly one"),
        (shell("   "), "blank"),
        (with(|r| r.argv = vec!["ls".into()]), "not both"),
        (shell("echo \0"), "NUL"),
        (
            with(|r| {
                r.env.insert("A=B".into(), "x".into());
            }),
            "'='",
        ),
        (
            with(|r| {
                r.env.insert("".into(), "x".into());
            }),
            "empty name",
        ),
        (
            with(|r| r.cwd = "/definitely/missing".into()),
            "/definitely/missing",
        ),
        (with(|r| r.cwd = "/etc/hostname".into()), "not a directory"),
        (
            with(|r| {
                r.timeout = Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0,
                })
            }),
            "positive",
        ),
        (
            with(|r| {
                r.timeout = Some(prost_types::Duration {
                    seconds: 10_000_000,
                    nanos: 0,
                })
            }),
            "maximum",
        ),
    ];
    for (req, needle) in cases {
        let err = client.exec(req.clone()).await.expect_err(needle);
        assert_eq!(err.code(), Code::InvalidArgument, "{needle}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{needle}: {}",
            err.message()
        );
    }
    // A program that does not exist is a clear error, not a hang.
    let err = client.exec(argv(&["/no/such/program"])).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("/no/such/program"),
        "{}",
        err.message()
    );
    // The server still works.
    let run = run(&mut client, shell("echo ok")).await;
    assert_eq!(run.stdout, b"ok\n");
    server.stop().await;
}

#[tokio::test]
async fn jobs_start_clean_in_their_own_session() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    // The shell's own signal state and session, and the fds of a program it execs (ls opens
    // the directory it lists: 3).
    let run = run(
        &mut client,
        shell(
            "grep -E '^Sig(Blk|Ign)' /proc/self/status; echo \"$$ $(cut -d' ' -f6 /proc/$$/stat)\"; \
             exec ls /proc/self/fd",
        ),
    )
    .await;
    let stdout = String::from_utf8(run.stdout.clone()).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..2],
        ["SigBlk:\t0000000000000000", "SigIgn:\t0000000000000000"],
        "no blocked or ignored signal (the server ignores SIGPIPE): {stdout}"
    );
    // Session leader: its session id is its pid, the job's pid.
    assert_eq!(lines[2], format!("{} {}", run.pid, run.pid), "{stdout}");
    assert_eq!(lines[3..], ["0", "1", "2", "3"], "{stdout}");
    assert_eq!(run.state(), JobState::Succeeded);
    server.stop().await;
}

#[tokio::test]
async fn programs_are_looked_up_in_the_jobs_path_and_must_be_executable() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let dir = std::env::temp_dir().join(format!("sr-path-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("sr-greet");
    std::fs::write(&script, "#!/bin/sh\necho \"greetings $1\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    // Found through the PATH the request sets (and the other tools still through it).
    let mut req = argv(&["sr-greet", "you"]);
    req.env.insert(
        "PATH".into(),
        format!("{}:/usr/bin:/bin", dir.to_str().unwrap()),
    );
    let done = run(&mut client, req.clone()).await;
    assert_eq!(done.stdout, b"greetings you\n");
    assert_eq!(done.state(), JobState::Succeeded);

    // Not in the server's PATH.
    let err = client.exec(argv(&["sr-greet"])).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("No such file"), "{}", err.message());

    // Not executable: EACCES, the same code as a missing program.
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = client.exec(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("sr-greet") && err.message().contains("Permission denied"),
        "{}",
        err.message()
    );
    std::fs::remove_dir_all(&dir).unwrap();
    server.stop().await;
}

/// `text`: UTF-8 output comes as text, cut on character boundaries even when the program
/// writes a character in two pieces; what is not UTF-8 comes as bytes; nothing is altered.
#[tokio::test]
async fn text_output_is_cut_on_character_boundaries_and_bytes_stay_bytes() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    // "é" (C3 A9) written in two pieces, then a byte that is no UTF-8, then a 4-byte character
    // split 1 + 3, then the stream ends inside a character.
    let command = "printf 'caf\\303'; sleep 0.2; printf '\\251 ok\\n'; sleep 0.1; \
                   printf '\\377\\n'; sleep 0.1; printf '\\360'; sleep 0.1; \
                   printf '\\237\\230\\200!'; sleep 0.1; printf '\\342\\202'";
    let expected = b"caf\xc3\xa9 ok\n\xff\n\xf0\x9f\x98\x80!\xe2\x82";
    let run = common::run(
        &mut client,
        pb::ExecRequest {
            text: true,
            ..shell(command)
        },
    )
    .await;
    assert_eq!(run.stdout, expected);
    // However the reads fell: no chunk starts inside a character, a chunk is text exactly
    // when it is UTF-8, and the stream's unfinished last character comes last, as bytes.
    for ((_, bytes), &text) in run.chunks.iter().zip(&run.text_chunks) {
        assert!(
            bytes[0] & 0xC0 != 0x80,
            "a chunk starts inside a character: {bytes:?}"
        );
        assert_eq!(text, std::str::from_utf8(bytes).is_ok(), "{bytes:?}");
    }
    let text_chunks = run.text_chunks.iter().filter(|&&text| text).count();
    assert!(text_chunks >= 2, "{:?}", run.chunks);
    assert_eq!(
        (
            run.chunks.last().unwrap().1.as_slice(),
            run.text_chunks.last()
        ),
        (&b"\xe2\x82"[..], Some(&false))
    );

    // Without `text` the same job's output is bytes, as read.
    let run = common::run(&mut client, shell(command)).await;
    assert_eq!(run.stdout, expected);
    assert!(run.text_chunks.iter().all(|text| !text));
    server.stop().await;
}
