//! The client subcommands, as a user runs them: the real binary as a subprocess against a real
//! server: byte-exact streams, exit codes, `| head -1`, SIGINT, stdin, a job on a terminal
//! driven through a pseudo-terminal, and the short commands.

mod common;

use std::{
    io::{Read, Write},
    process::Stdio,
    time::Duration,
};

use tokio::{io::AsyncReadExt, process::Command};

const BIN: &str = env!("CARGO_BIN_EXE_sandbox-runner");

fn cli(server: &common::TestServer, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env("SANDBOX_RUNNER_ADDR", format!("http://{}", server.addr))
        .env_remove("SANDBOX_RUNNER_TOKEN")
        .kill_on_drop(true);
    command
}

/// Runs the client to its end (bounded): exit code, stdout, stderr.
async fn run(server: &common::TestServer, args: &[&str], stdin: &[u8]) -> (i32, Vec<u8>, String) {
    let mut child = cli(server, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = input.write_all(&stdin).await;
    });
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the client ends")
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        output.stdout,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn exec_streams_both_outputs_byte_for_byte_and_exits_with_the_jobs_code() {
    let server = common::start(&[]).await;
    let (code, stdout, stderr) = run(
        &server,
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "printf 'out\\000\\377'; printf err >&2; exit 3",
        ],
        b"",
    )
    .await;
    assert_eq!(
        (code, stdout.as_slice(), stderr.as_str()),
        (3, &b"out\0\xff"[..], "err")
    );

    let cases: [(&[&str], i32); 4] = [
        (&["exec", "--", "sh", "-c", "kill -9 $$"], 128 + 9),
        (&["exec", "--timeout", "1s", "--", "sleep", "30"], 124),
        (&["exec", "--", "/no/such/program"], 126),
        (&["exec", "--addr", "http://127.0.0.1:1", "--", "true"], 125),
    ];
    for (args, expected) in cases {
        let (code, _, stderr) = run(&server, args, b"").await;
        assert_eq!(code, expected, "{args:?}: {stderr}");
    }
    // Environment, working directory.
    let (code, stdout, _) = run(
        &server,
        &[
            "exec",
            "-e",
            "GREETING=hi there",
            "--cwd",
            "/tmp",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING\" $(pwd)",
        ],
        b"",
    )
    .await;
    assert_eq!((code, stdout.as_slice()), (0, &b"hi there /tmp\n"[..]));
    server.stop().await;
}

#[tokio::test]
async fn stdin_is_forwarded_with_i_and_its_end_closes_the_jobs() {
    let server = common::start(&[]).await;
    let input: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let (code, stdout, stderr) = run(&server, &["exec", "-i", "--", "cat"], &input).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout, input);
    server.stop().await;
}

/// The running jobs of the server, by a gRPC client.
async fn running_jobs(server: &common::TestServer) -> usize {
    let mut client = server.client().await;
    let jobs = client
        .list_jobs(sandbox_runner::proto::ListJobsRequest {
            state: sandbox_runner::proto::JobState::Running as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    jobs.len()
}

async fn wait_no_running_jobs(server: &common::TestServer) {
    for _ in 0..250 {
        if running_jobs(server).await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the job is still running");
}

#[tokio::test]
async fn a_closed_stdout_and_ctrl_c_cancel_the_job() {
    let server = common::start(&[]).await;
    // `| head -1`: the client reads a line's worth, then its stdout is closed.
    let mut child = cli(&server, &["exec", "--", "yes"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 2];
    stdout.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"y\n");
    drop(stdout);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(141));
    wait_no_running_jobs(&server).await;

    // Ctrl-C (SIGINT to the client): the job is cancelled, the client waits for its end.
    let mut child = cli(
        &server,
        &["exec", "--", "sh", "-c", "echo started; sleep 30"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut started = [0u8; 8];
    stdout.read_exact(&mut started).await.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output.status.code(), Some(130));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cancelling"));
    assert_eq!(
        running_jobs(&server).await,
        0,
        "cancelled before the client left"
    );

    // A job that ignores SIGTERM takes the cancel grace (2 s here) to end: a second Ctrl-C
    // leaves at once, without waiting for it.
    let mut child = cli(
        &server,
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "trap '' TERM; echo started; sleep 30",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdout.read_exact(&mut started).await.unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    // Once the first has been taken (it says so; the job is then in its grace).
    let mut stderr = child.stderr.take().unwrap();
    let mut said = Vec::new();
    while !String::from_utf8_lossy(&said).contains("cancelling") {
        let mut buf = [0u8; 256];
        let n = stderr.read(&mut buf).await.unwrap();
        assert!(n > 0, "the client said nothing of the cancel");
        said.extend_from_slice(&buf[..n]);
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(130));
    assert_eq!(
        running_jobs(&server).await,
        1,
        "left without waiting for the job's end"
    );
    wait_no_running_jobs(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn detach_status_cancel_ls_and_health() {
    let server = common::start(&[]).await;
    let (code, stdout, _) = run(
        &server,
        &["exec", "--detach", "--task", "t-1", "--", "sleep", "30"],
        b"",
    )
    .await;
    assert_eq!(code, 0);
    let job_id = String::from_utf8(stdout).unwrap().trim().to_owned();
    assert!(job_id.starts_with("j1."), "{job_id}");

    let (code, stdout, _) = run(&server, &["status", "--json", &job_id], b"").await;
    let status: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!((code, status["state"].as_str()), (0, Some("running")));
    let (_, stdout, _) = run(&server, &["ls", "--task", "t-1"], b"").await;
    let listed = String::from_utf8(stdout).unwrap();
    assert!(listed.starts_with(&format!("{job_id} running")), "{listed}");
    let (code, stdout, _) = run(&server, &["cancel", &job_id], b"").await;
    assert_eq!(code, 0);
    assert!(String::from_utf8(stdout).unwrap().ends_with("cancelling\n"));
    let (code, stdout, _) = run(&server, &["health"], b"").await;
    assert_eq!(code, 0);
    assert!(String::from_utf8(stdout).unwrap().starts_with("ok: "));
    let (code, _, stderr) = run(&server, &["status", "j1.unknown.job"], b"").await;
    assert_eq!(code, 125, "{stderr}");
    assert!(stderr.contains("NotFound"), "{stderr}");
    server.stop().await;
}

/// `-t` from a real terminal: the client's stdin and stdout are a pseudo-terminal this test
/// holds the other side of, as a terminal emulator would.
#[tokio::test]
async fn exec_t_runs_the_job_on_a_terminal_of_the_local_ones_size_in_raw_mode() {
    let server = common::start(&[]).await;
    let (master, terminal) =
        sandbox_runner::backend::local::open_pty(sandbox_runner::job::TerminalSize {
            rows: 33,
            cols: 101,
        })
        .unwrap();
    let mut child = cli(
        &server,
        &[
            "exec",
            "-t",
            "--",
            "sh",
            "-c",
            "stty size; read -r line; echo \"got $line\"; exit 4",
        ],
    )
    .stdin(Stdio::from(terminal.try_clone().unwrap()))
    .stdout(Stdio::from(terminal.try_clone().unwrap()))
    .stderr(Stdio::from(terminal))
    .spawn()
    .unwrap();
    let master = std::fs::File::from(master);
    let mut reader = master.try_clone().unwrap();
    let seen = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Until the job's answer (bounded by the test's own timeout below).
        while !String::from_utf8_lossy(&seen).contains("got hello") {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&seen).contains("33 101") && !seen.ends_with(b"\x00") {
                // The job has its size: type a line (raw mode: Enter is a carriage return,
                // which the job's terminal turns into a newline).
                let mut writer = &master;
                let _ = writer.write_all(b"hello\r");
                seen.push(0);
            }
        }
        seen
    });
    let seen = tokio::time::timeout(Duration::from_secs(30), seen)
        .await
        .expect("the job answers")
        .unwrap();
    let text = String::from_utf8_lossy(&seen);
    assert!(
        text.contains("33 101"),
        "the job's terminal has the local size: {text:?}"
    );
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(4), "{text:?}");
    server.stop().await;
}

/// A TCP proxy to `target` that cuts its first connection once `cut_after` bytes went from the
/// server to the client (a dropped connection); later connections are left alone.
async fn cutting_proxy(
    target: std::net::SocketAddr,
    cut_after: usize,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&connections);
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((client, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Ok(server) = TcpStream::connect(target).await else {
                continue;
            };
            let cut = std::mem::take(&mut first).then_some(cut_after);
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let upstream = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut sent = 0;
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n;
                    if cut.is_some_and(|cut| sent >= cut) {
                        break;
                    }
                }
                // Both directions go: the connection is dropped.
                upstream.abort();
            });
        }
    });
    (addr, connections)
}

#[tokio::test]
async fn a_dropped_connection_is_resumed_with_nothing_lost_or_repeated() {
    let server = common::start(&[]).await;
    let (proxy, connections) = cutting_proxy(server.addr, 64 * 1024).await;
    // About 1 MiB of numbered lines, written over a second or so.
    let script = "i=0; while [ $i -lt 40 ]; do seq $((i*1000)) $((i*1000+999)); i=$((i+1)); \
                  sleep 0.02; done";
    let output = cli(&server, &["exec", "--", "sh", "-c", script])
        .env("SANDBOX_RUNNER_ADDR", format!("http://{proxy}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("the client ends")
        .unwrap();
    let expected: String = (0..40_000).map(|n| format!("{n}\n")).collect();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.stdout.len(), expected.len());
    assert!(output.stdout == expected.as_bytes(), "the output differs");
    assert!(
        connections.load(std::sync::atomic::Ordering::Relaxed) >= 2,
        "the first connection was cut, and the stream resumed on another"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_token_comes_from_the_environment_a_file_or_the_flag() {
    let tokens = common::SecretFile::new("s3cret\n");
    let server = common::start(&["--auth-tokens-file", tokens.path()]).await;
    let (code, _, stderr) = run(&server, &["health"], b"").await;
    assert_eq!(code, 125);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    let (code, _, stderr) = run(&server, &["health", "--token-file", tokens.path()], b"").await;
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = run(&server, &["health", "--token", "s3cret"], b"").await;
    assert_eq!(code, 0, "{stderr}");
    let output = cli(&server, &["exec", "--", "echo", "ok"])
        .env("SANDBOX_RUNNER_TOKEN", "s3cret")
        .output()
        .await
        .unwrap();
    assert_eq!(
        (output.status.code(), output.stdout.as_slice()),
        (Some(0), &b"ok\n"[..])
    );
    server.stop().await;
}
