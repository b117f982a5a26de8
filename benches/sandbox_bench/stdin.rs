//! stdin throughput (issue 13): bytes written to a job's stdin, `wc -c` reading them, through
//! an Attach stream's `input` requests and through unary SendInput calls, against the same
//! bytes written straight into a local `wc -c`'s pipe.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::Instant,
};

use sandbox_runner::{
    proto::{self as pb, resume_from::Position},
    testing::contract::{Job, Output, attach_open},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    harness::{Server, request},
    stats::{Samples, gbps},
};

#[derive(clap::Args, Clone)]
pub(crate) struct StdinArgs {
    /// MiB written per run.
    #[arg(long, default_value_t = 256)]
    mib: u64,
    /// Bytes per write (per Attach request or SendInput call); at most 1 MiB.
    #[arg(long, default_value_t = 256 << 10)]
    write_bytes: usize,
    /// Runs of each variant, interleaved.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// The job, with stdin, that counts what it reads.
fn counting_job() -> pb::ExecRequest {
    pb::ExecRequest {
        stdin: true,
        ..request("wc -c", None)
    }
}

/// Runs `wc -c` with `bytes` written into its stdin, through the service (by Attach or by
/// SendInput), and checks it counted them all. Returns the time from the first write to
/// `Exited`.
async fn through_service(
    server: &Server,
    bytes: u64,
    write_bytes: usize,
    by_attach: bool,
) -> anyhow::Result<std::time::Duration> {
    let mut client = server.client(true).await?;
    let job = Job::start(&mut client, counting_job(), Output::Keep).await?;
    let id = job.job_id.clone();
    let chunk = bytes::Bytes::from(vec![b'x'; write_bytes]);
    let writes = bytes.div_ceil(write_bytes as u64);
    let t0 = Instant::now();
    if by_attach {
        let (tx, rx) = mpsc::channel(4);
        let open = attach_open(
            &id,
            Some(Position::NewOnly(pb::NewOnly {})),
            pb::GapPolicy::Report,
            false,
        );
        tx.send(open).await?;
        let mut stream = client.attach(ReceiverStream::new(rx)).await?.into_inner();
        let drain = tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
        for _ in 0..writes {
            let input = pb::StdinData {
                data: chunk.clone(),
                offset: None,
            };
            tx.send(pb::AttachRequest {
                kind: Some(pb::attach_request::Kind::Input(input)),
            })
            .await?;
        }
        tx.send(pb::AttachRequest {
            kind: Some(pb::attach_request::Kind::CloseInput(pb::StdinClose {})),
        })
        .await?;
        let run = job.finish().await?;
        drain.abort();
        check_count(&run.stdout, writes * write_bytes as u64)?;
    } else {
        for _ in 0..writes {
            client
                .send_input(pb::SendInputRequest {
                    job_id: id.clone(),
                    data: chunk.clone(),
                    offset: None,
                })
                .await?;
        }
        client
            .close_input(pb::CloseInputRequest { job_id: id })
            .await?;
        let run = job.finish().await?;
        check_count(&run.stdout, writes * write_bytes as u64)?;
    }
    Ok(t0.elapsed())
}

fn check_count(stdout: &[u8], expected: u64) -> anyhow::Result<()> {
    let counted: u64 = String::from_utf8_lossy(stdout).trim().parse()?;
    anyhow::ensure!(counted == expected, "wc -c counted {counted} of {expected}");
    Ok(())
}

/// The floor: the same bytes written into a local `wc -c`'s pipe.
fn raw_pipe(bytes: u64, write_bytes: usize) -> anyhow::Result<std::time::Duration> {
    let chunk = vec![b'x'; write_bytes];
    let writes = bytes.div_ceil(write_bytes as u64);
    let t0 = Instant::now();
    let mut child = Command::new("wc")
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    for _ in 0..writes {
        stdin.write_all(&chunk)?;
    }
    drop(stdin);
    let out = child.wait_with_output()?;
    check_count(&out.stdout, writes * write_bytes as u64)?;
    Ok(t0.elapsed())
}

pub(crate) async fn stdin(a: StdinArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.write_bytes > 0 && a.write_bytes <= 1 << 20,
        "--write-bytes is 1..=1 MiB"
    );
    let bytes = a.mib << 20;
    let server = Server::spawn(&[], &[]).await?;
    let mut raw = Samples::new("a local pipe into `wc -c`");
    let mut attach = Samples::new("Attach `input` requests");
    let mut unary = Samples::new("SendInput calls");
    for round in 0..a.rounds {
        eprintln!("stdin round {}/{}", round + 1, a.rounds);
        let took = tokio::task::spawn_blocking(move || raw_pipe(bytes, a.write_bytes)).await??;
        raw.push(gbps(bytes, took));
        attach.push(gbps(
            bytes,
            through_service(&server, bytes, a.write_bytes, true).await?,
        ));
        unary.push(gbps(
            bytes,
            through_service(&server, bytes, a.write_bytes, false).await?,
        ));
    }
    server.stop().await;
    println!(
        "### stdin: {} MiB into `wc -c` per run, {} KiB per write, {} rounds interleaved\n",
        a.mib,
        a.write_bytes >> 10,
        a.rounds
    );
    println!("| path | median | min..max | ratio |\n|---|---|---|---|");
    attach.rate_row(Some(&raw), None);
    unary.rate_row(Some(&raw), None);
    raw.rate_row(None, None);
    println!();
    Ok(())
}
