//! Latency: request → Exited for `true` and time to first output for `echo hi`,
//! against direct spawns.

use std::{process::Stdio, time::Instant};

use tokio::process::Command;

use crate::{
    harness::{SANDBOX, Server, daytona_server, exec, fake_daytona, pipe_run, request},
    stats::{Samples, ms},
};

#[derive(clap::Args, Clone)]
pub(crate) struct LatencyArgs {
    /// Sequential runs of each local variant.
    #[arg(long, default_value_t = 1000)]
    runs: usize,
    /// Sequential runs of each Daytona variant (each waits on the fake's polling).
    #[arg(long, default_value_t = 100)]
    daytona_runs: usize,
}

pub(crate) async fn latency(a: LatencyArgs) -> anyhow::Result<()> {
    let server = Server::spawn(&[], &[]).await?;
    let mut client = server.client(false).await?;
    let fake = fake_daytona().await;
    let dserver = daytona_server(&fake, &[]).await?;
    let mut dclient = dserver.client(false).await?;

    let mut spawn_true = Samples::new("spawn `sh -c true` directly, to exit");
    let mut exec_true = Samples::new("Exec `true`, request → Exited");
    let mut spawn_echo = Samples::new("spawn `sh -c 'echo hi'` directly, to first byte");
    let mut exec_echo = Samples::new("Exec `echo hi`, request → first Output");
    // Warm up connections and caches.
    for _ in 0..10 {
        exec(&mut client, request("true", None), false).await?;
    }
    for i in 0..a.runs {
        if i % 250 == 0 {
            eprintln!("latency local {i}/{}", a.runs);
        }
        let t = Instant::now();
        let status = Command::new("/bin/sh")
            .args(["-c", "true"])
            .stdin(Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(status.success());
        spawn_true.push(ms(t.elapsed()));

        let r = exec(&mut client, request("true", None), false).await?;
        exec_true.push(ms(r.exited_after));

        let (_, first) = pipe_run("echo hi").await?;
        spawn_echo.push(ms(first));

        let r = exec(&mut client, request("echo hi", None), false).await?;
        exec_echo.push(ms(r.first_output.expect("echo writes")));
    }

    let mut d_true = Samples::new("Daytona fake: Exec `true`, request → Exited");
    let mut d_echo = Samples::new("Daytona fake: Exec `echo hi`, request → first Output");
    let mut d_spawn = Samples::new("spawn `sh -c true` directly (same rounds)");
    exec(&mut dclient, request("true", Some(SANDBOX)), false).await?;
    for i in 0..a.daytona_runs {
        if i % 25 == 0 {
            eprintln!("latency daytona {i}/{}", a.daytona_runs);
        }
        let t = Instant::now();
        Command::new("/bin/sh")
            .args(["-c", "true"])
            .status()
            .await?;
        d_spawn.push(ms(t.elapsed()));
        let r = exec(&mut dclient, request("true", Some(SANDBOX)), false).await?;
        d_true.push(ms(r.exited_after));
        let r = exec(&mut dclient, request("echo hi", Some(SANDBOX)), false).await?;
        d_echo.push(ms(r.first_output.expect("echo writes")));
    }

    println!(
        "### Latency: {} sequential local runs, {} Daytona runs, interleaved (ms)\n",
        a.runs, a.daytona_runs
    );
    println!("| variant | p50 | p99 | min..max | p50 ratio |\n|---|---|---|---|---|");
    spawn_true.latency_row(None);
    exec_true.latency_row(Some(&spawn_true));
    spawn_echo.latency_row(None);
    exec_echo.latency_row(Some(&spawn_echo));
    d_spawn.latency_row(None);
    d_true.latency_row(Some(&d_spawn));
    d_echo.latency_row(Some(&d_spawn));
    println!();
    server.stop().await;
    dserver.stop().await;
    Ok(())
}
