//! Keystroke echo latency through a `tty` job (issue 13): a client sends one byte and waits
//! until the program's echo of it arrives, as a terminal user typing into a REPL or an editor
//! would. The program is `cat` on a terminal in raw mode (`stty raw -echo`): each byte goes
//! through the terminal to the program and back. The floor is the same program on a local
//! pseudo-terminal, written and read directly.

use std::{
    fs::File,
    io::{Read, Write},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sandbox_runner::{
    proto::{self as pb, resume_from::Position},
    testing::contract::{Job, Output, attach_open},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    harness::{Server, request},
    stats::{Samples, ms},
};

#[derive(clap::Args, Clone)]
pub(crate) struct KeystrokesArgs {
    /// Keystrokes timed per path (after a warm-up of 20).
    #[arg(long, default_value_t = 1000)]
    keystrokes: usize,
}

/// What the job runs: a terminal in raw mode, echoing every byte it reads.
const ECHOING: &str = "stty raw -echo && printf ready && exec cat";
const WARM_UP: usize = 20;

/// The byte typed for keystroke `i` (printable, so no terminal processing applies).
fn key(i: usize) -> u8 {
    b'a' + (i % 26) as u8
}

/// Keystrokes into a `tty` job through the service: by Attach `input` requests, or by
/// SendInput calls. Returns each keystroke's echo latency.
async fn through_service(
    server: &Server,
    keystrokes: usize,
    by_attach: bool,
) -> anyhow::Result<Vec<Duration>> {
    let mut client = server.client(true).await?;
    let req = pb::ExecRequest {
        tty: Some(pb::TtyOptions::default()),
        ..request(ECHOING, None)
    };
    let mut job = Job::start(&mut client, req, Output::Count).await?;
    let id = job.job_id.clone();
    job.read_stdout("ready".len()).await?;
    let (tx, rx) = mpsc::channel(4);
    if by_attach {
        let open = attach_open(
            &id,
            Some(Position::NewOnly(pb::NewOnly {})),
            pb::GapPolicy::Report,
            false,
        );
        tx.send(open).await?;
        let mut stream = client.attach(ReceiverStream::new(rx)).await?.into_inner();
        tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
    }
    let mut latencies = Vec::with_capacity(keystrokes);
    for i in 0..WARM_UP + keystrokes {
        let data = bytes::Bytes::from(vec![key(i)]);
        let echoed = job.received()[0] as usize + 1;
        let t0 = Instant::now();
        if by_attach {
            let input = pb::StdinData { data, offset: None };
            tx.send(pb::AttachRequest {
                kind: Some(pb::attach_request::Kind::Input(input)),
            })
            .await?;
        } else {
            client
                .send_input(pb::SendInputRequest {
                    job_id: id.clone(),
                    data,
                    offset: None,
                })
                .await?;
        }
        job.read_stdout(echoed).await?;
        if i >= WARM_UP {
            latencies.push(t0.elapsed());
        }
    }
    client.cancel(pb::CancelRequest { job_id: id }).await?;
    let run = job.finish().await?;
    anyhow::ensure!(
        run.exited.stdout_bytes as usize == "ready".len() + WARM_UP + keystrokes,
        "every keystroke echoed once: {} bytes",
        run.exited.stdout_bytes
    );
    Ok(latencies)
}

/// The floor: the same program on a local pseudo-terminal, its master written and read
/// directly (blocking).
fn local_terminal(keystrokes: usize) -> anyhow::Result<Vec<Duration>> {
    let (master, terminal) =
        sandbox_runner::backend::local::open_pty(sandbox_runner::job::TerminalSize {
            rows: 24,
            cols: 80,
        })?;
    let mut child = Command::new("/bin/sh")
        .args(["-c", ECHOING])
        .stdin(Stdio::from(terminal.try_clone()?))
        .stdout(Stdio::from(terminal.try_clone()?))
        .stderr(Stdio::from(terminal))
        .spawn()?;
    let mut master = File::from(master);
    let mut ready = [0u8; 5];
    master.read_exact(&mut ready)?;
    anyhow::ensure!(&ready == b"ready", "unexpected start: {ready:?}");
    let mut latencies = Vec::with_capacity(keystrokes);
    let mut echo = [0u8; 1];
    for i in 0..WARM_UP + keystrokes {
        let t0 = Instant::now();
        master.write_all(&[key(i)])?;
        master.read_exact(&mut echo)?;
        anyhow::ensure!(echo[0] == key(i), "echo {:?} for {:?}", echo[0], key(i));
        if i >= WARM_UP {
            latencies.push(t0.elapsed());
        }
    }
    child.kill()?;
    child.wait()?;
    Ok(latencies)
}

pub(crate) async fn keystrokes(a: KeystrokesArgs) -> anyhow::Result<()> {
    let server = Server::spawn(&[], &[]).await?;
    let mut local = Samples::new("a local pseudo-terminal (floor)");
    let mut attach = Samples::new("Attach `input` requests");
    let mut unary = Samples::new("SendInput calls");
    let n = a.keystrokes;
    for latency in tokio::task::spawn_blocking(move || local_terminal(n)).await?? {
        local.push(ms(latency));
    }
    for latency in through_service(&server, n, true).await? {
        attach.push(ms(latency));
    }
    for latency in through_service(&server, n, false).await? {
        unary.push(ms(latency));
    }
    server.stop().await;
    println!(
        "### keystrokes: echo latency of one byte through `{ECHOING}` on a terminal, {n} \
         keystrokes per path\n"
    );
    println!("| path | p50 ms | p99 ms | min..max | ratio |\n|---|---|---|---|---|");
    attach.latency_row(Some(&local));
    unary.latency_row(Some(&local));
    local.latency_row(None);
    println!();
    Ok(())
}
