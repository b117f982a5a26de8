//! Throughput: bytes of /dev/zero through Exec to a discarding client, against a plain pipe.

use std::time::Instant;

use sandbox_runner::testing::procfs;
use tokio::process::Command;

use crate::{
    harness::{SANDBOX, Server, daytona_server, exec, fake_daytona, pipe_run, request},
    stats::{Samples, gbps},
};

#[derive(clap::Args, Clone)]
pub(crate) struct ThroughputArgs {
    /// Bytes per run (local backend).
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Bytes per run through the Daytona fake (it frames the log in 1 KiB WebSocket messages).
    #[arg(long, default_value_t = 64 << 20)]
    daytona_bytes: u64,
    /// Runs of each variant.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

pub(crate) async fn throughput(a: ThroughputArgs) -> anyhow::Result<()> {
    let server = Server::spawn(&[], &[]).await?;
    let mut default_client = server.client(false).await?;
    let mut tuned_client = server.client(true).await?;
    let command = format!("head -c {} /dev/zero", a.bytes);
    let interleaved = format!(
        "head -c {half} /dev/zero & head -c {half} /dev/zero >&2; wait",
        half = a.bytes / 2
    );
    // Line-framed output for Daytona: 128-byte lines.
    let lines = format!("yes {} | head -c {}", "x".repeat(127), a.daytona_bytes);
    let fake = fake_daytona().await;
    let dserver = daytona_server(&fake, &[]).await?;
    let mut dclient = dserver.client(true).await?;

    let mut shell = Samples::new("shell pipe: `head -c N /dev/zero \\| cat >/dev/null`");
    let mut pipe = Samples::new("pipe → reader in this process (1 MiB pipe and reads)");
    let mut exec_default = Samples::new("Exec, default tonic client");
    let mut exec_tuned = Samples::new("Exec, tuned client (1 MiB frames, 16/32 MiB windows)");
    let mut exec_mixed = Samples::new("Exec, stdout+stderr interleaved, tuned client");
    let mut pipe_lines = Samples::new("pipe: 128-byte lines → reader (no service)");
    let mut daytona = Samples::new("Exec via Daytona backend + fake API, tuned client");
    // CPU seconds during the tuned runs: server user, server sys, client user, client sys.
    let mut cpu = [0f64; 4];
    for round in 0..a.rounds {
        eprintln!("throughput round {}/{}", round + 1, a.rounds);
        let t = Instant::now();
        let status = Command::new("/bin/sh")
            .args(["-c", &format!("{command} | cat >/dev/null")])
            .status()
            .await?;
        anyhow::ensure!(status.success());
        shell.push(gbps(a.bytes, t.elapsed()));

        let t = Instant::now();
        let (n, _) = pipe_run(&command).await?;
        pipe.push(gbps(n, t.elapsed()));

        let t = Instant::now();
        let r = exec(&mut default_client, request(&command, None), false).await?;
        exec_default.push(gbps(r.bytes(), t.elapsed()));

        let (server0, client0) = (server.cpu(), procfs::cpu_seconds(std::process::id()));
        let t = Instant::now();
        let r = exec(&mut tuned_client, request(&command, None), false).await?;
        anyhow::ensure!(r.bytes() == a.bytes);
        exec_tuned.push(gbps(r.bytes(), t.elapsed()));
        let (server1, client1) = (server.cpu(), procfs::cpu_seconds(std::process::id()));
        cpu[0] += server1.0 - server0.0;
        cpu[1] += server1.1 - server0.1;
        cpu[2] += client1.0 - client0.0;
        cpu[3] += client1.1 - client0.1;

        let t = Instant::now();
        let r = exec(&mut tuned_client, request(&interleaved, None), false).await?;
        exec_mixed.push(gbps(r.bytes(), t.elapsed()));

        let t = Instant::now();
        let (n, _) = pipe_run(&lines).await?;
        pipe_lines.push(gbps(n, t.elapsed()));

        let t = Instant::now();
        let r = exec(&mut dclient, request(&lines, Some(SANDBOX)), false).await?;
        anyhow::ensure!(
            r.bytes() == a.daytona_bytes,
            "daytona lost bytes: {}",
            r.bytes()
        );
        daytona.push(gbps(r.bytes(), t.elapsed()));
    }
    println!(
        "### Throughput: {} MiB per local run, {} MiB per Daytona run, {} rounds interleaved\n",
        a.bytes >> 20,
        a.daytona_bytes >> 20,
        a.rounds
    );
    println!(
        "| variant | median | min..max | ratio to the shell pipe | ratio to the 1 MiB pipe reader |\n|---|---|---|---|---|"
    );
    shell.rate_row(None, None);
    pipe.rate_row(Some(&shell), None);
    for s in [&exec_default, &exec_tuned, &exec_mixed] {
        s.rate_row(Some(&shell), Some(&pipe));
    }
    pipe_lines.rate_row(None, None);
    daytona.rate_row(Some(&pipe_lines), None);
    let gib = (a.bytes * a.rounds as u64) as f64 / (1u64 << 30) as f64;
    println!(
        "\nCPU per GiB in the tuned runs: server {:.2} s user + {:.2} s sys, client {:.2} s user + \
         {:.2} s sys (the job's `head` and the kernel's pipe/TCP work for it are not included).",
        cpu[0] / gib,
        cpu[1] / gib,
        cpu[2] / gib,
        cpu[3] / gib
    );
    println!();
    server.stop().await;
    dserver.stop().await;
    Ok(())
}
