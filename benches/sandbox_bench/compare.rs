//! Before/after a change, in the same run: two server binaries interleaved, latency and
//! throughput.

use std::{path::PathBuf, time::Instant};

use crate::{
    harness::{Server, exec, request, server_bin},
    stats::{Samples, gbps, ms},
};

#[derive(clap::Args, Clone)]
pub(crate) struct CompareArgs {
    /// The server binary before the change.
    #[arg(long)]
    before: PathBuf,
    /// The server binary after the change (default: the current one).
    #[arg(long)]
    after: Option<PathBuf>,
    /// Extra server flags for the "after" server, as one string (e.g. to try a setting).
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    after_args: String,
    /// Extra environment of the "after" server, as `K=V K2=V2`.
    #[arg(long, default_value = "")]
    after_env: String,
    /// Sequential latency runs of each.
    #[arg(long, default_value_t = 300)]
    runs: usize,
    /// Bytes per throughput run.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

pub(crate) async fn compare(a: CompareArgs) -> anyhow::Result<()> {
    let after_bin = a.after.clone().unwrap_or_else(server_bin);
    let after_args: Vec<&str> = a.after_args.split_whitespace().collect();
    let before = Server::spawn_bin(&a.before, &[], &[]).await?;
    let after_env: Vec<(&str, &str)> = a
        .after_env
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let after = Server::spawn_bin(&after_bin, &after_args, &after_env).await?;
    let servers = [&before, &after];
    let mut clients = Vec::new();
    for s in servers {
        clients.push((s.client(false).await?, s.client(true).await?));
    }
    let names = [
        "Exec `true` → Exited, p50 ms",
        "Exec `echo hi` → first Output, p50 ms",
    ];
    let mut lat: Vec<[Samples; 2]> = names
        .iter()
        .map(|n| [Samples::new(*n), Samples::new(*n)])
        .collect();
    let mut tput_default = [Samples::new("default"), Samples::new("default")];
    let mut tput_tuned = [Samples::new("tuned"), Samples::new("tuned")];
    for (c, _) in &mut clients {
        exec(c, request("true", None), false).await?;
    }
    for i in 0..a.runs {
        if i % 100 == 0 {
            eprintln!("compare latency {i}/{}", a.runs);
        }
        for (k, (c, _)) in clients.iter_mut().enumerate() {
            let r = exec(c, request("true", None), false).await?;
            lat[0][k].push(ms(r.exited_after));
            let r = exec(c, request("echo hi", None), false).await?;
            lat[1][k].push(ms(r.first_output.expect("echo writes")));
        }
    }
    let command = format!("head -c {} /dev/zero", a.bytes);
    for round in 0..a.rounds {
        eprintln!("compare throughput {}/{}", round + 1, a.rounds);
        for (k, (d, t)) in clients.iter_mut().enumerate() {
            let start = Instant::now();
            let r = exec(d, request(&command, None), false).await?;
            tput_default[k].push(gbps(r.bytes(), start.elapsed()));
            let start = Instant::now();
            let r = exec(t, request(&command, None), false).await?;
            tput_tuned[k].push(gbps(r.bytes(), start.elapsed()));
        }
    }
    println!(
        "### Before/after, interleaved: before = {}, after = {} {} {}\n",
        a.before.display(),
        after_bin.display(),
        a.after_args,
        a.after_env
    );
    println!("| measure | before | after | after/before |\n|---|---|---|---|");
    for [b, f] in &lat {
        println!(
            "| {} (p99) | {:.2} ({:.2}) | {:.2} ({:.2}) | {:.2}x |",
            b.name,
            b.median(),
            b.pct(99.0),
            f.median(),
            f.pct(99.0),
            f.median() / b.median()
        );
    }
    for ([b, f], name) in [
        (&tput_default, "throughput, default client, GB/s (min..max)"),
        (&tput_tuned, "throughput, tuned client, GB/s (min..max)"),
    ] {
        let (bs, fs) = (b.sorted(), f.sorted());
        println!(
            "| {name} | {:.2} ({:.2}..{:.2}) | {:.2} ({:.2}..{:.2}) | {:.2}x |",
            b.median(),
            bs[0],
            bs[bs.len() - 1],
            f.median(),
            fs[0],
            fs[fs.len() - 1],
            f.median() / b.median()
        );
    }
    println!();
    before.stop().await;
    after.stop().await;
    Ok(())
}
