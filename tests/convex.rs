//! The Convex mirror against a fake of the deployed ingest route (real HTTP on loopback): records
//! equal the output, in order, once; text decoding; batching; retries; a refused secret; a stalled
//! server with a small queue; SIGTERM on the real binary flushing the last records; an ingest at
//! a closed port (Status, Health, recovery, and a shutdown that does not wait for it).
//!
//! No assertion depends on wall-clock timing; waits are bounded only so a bug cannot hang CI.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{JobState, TestServer};
use sandbox_runner::{
    proto::{self as pb, sandbox_service_client::SandboxServiceClient},
    testing::convex_ingest::{FakeIngest, Fault, rows},
};
use serde_json::Value;
use tonic::transport::Channel;

const SECRET: &str = "test-ingest-secret-0123456789";
/// Upper bound of any wait in these tests.
const PATIENCE: Duration = Duration::from_secs(60);

async fn server(fake: &FakeIngest, secret: &str, extra: &[&str]) -> TestServer {
    server_at(&fake.site_url(), secret, extra).await
}

/// A server mirroring to `site_url`; `extra` may set its own `--convex-request-timeout`.
async fn server_at(site_url: &str, secret: &str, extra: &[&str]) -> TestServer {
    let mut args = vec![
        "--convex-site-url",
        site_url,
        "--convex-ingest-secret",
        secret,
        "--convex-retry-for",
        "60s",
    ];
    if !extra.contains(&"--convex-request-timeout") {
        args.extend_from_slice(&["--convex-request-timeout", "500ms"]);
    }
    args.extend_from_slice(extra);
    common::start(&args).await
}

/// A loopback address where nothing listens (connections are refused), free to listen on later.
async fn closed_addr() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Polls Status until `done(mirror status)` holds.
async fn wait_mirror(
    client: &mut SandboxServiceClient<Channel>,
    job_id: &str,
    done: impl Fn(&pb::MirrorStatus) -> bool,
) -> pb::MirrorStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mirror = common::status(client, job_id)
            .await
            .mirror
            .expect("mirrored");
        if done(&mirror) {
            return mirror;
        }
        assert!(Instant::now() < deadline, "condition never met: {mirror:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn mirrored(mut req: pb::ExecRequest, session: &str) -> pb::ExecRequest {
    req.task_id = "task-1".into();
    req.session_id = session.into();
    req.sandbox_id = "sandbox-1".into();
    req
}

/// Polls Status until the job's mirror completed.
async fn mirror_done(client: &mut SandboxServiceClient<Channel>, job_id: &str) -> pb::MirrorStatus {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = common::status(client, job_id).await;
        assert!(status.mirrored, "job {job_id} is not mirrored");
        let mirror = status.mirror.expect("mirror status");
        if mirror.complete {
            return mirror;
        }
        assert!(
            Instant::now() < deadline,
            "mirror of {job_id} never completed: {mirror:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_final(r: &Value) -> bool {
    r["stream"] == "meta" && r["done"] == true
}

/// (stream, text) runs: adjacent pieces of the same stream joined.
fn runs<'a>(pieces: impl IntoIterator<Item = (&'a str, String)>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (stream, text) in pieces {
        match out.last_mut() {
            Some((s, t)) if s == stream => t.push_str(&text),
            _ => out.push((stream.to_owned(), text)),
        }
    }
    out
}

/// Checks one job's records: the echo first, then output equal to what the gRPC caller got
/// (per stream and in stream-switch order), then exactly one final record; returns it.
fn check_records(records: &[Value], run: &common::Run, echo: &str) -> Value {
    assert!(records.len() >= 2, "{records:?}");
    assert_eq!(records[0]["stream"], "stdout");
    assert_eq!(records[0]["data"], echo);
    for r in records {
        assert_eq!(r["taskId"], "task-1");
        assert_eq!(r["sandboxId"], "sandbox-1");
        assert!(r["ts"].as_u64().unwrap() > 1_600_000_000_000, "{r}");
    }
    let ts: Vec<u64> = records.iter().map(|r| r["ts"].as_u64().unwrap()).collect();
    assert!(
        ts.windows(2).all(|w| w[0] <= w[1]),
        "timestamps go back: {ts:?}"
    );
    let finals = records.iter().filter(|r| is_final(r)).count();
    assert_eq!(finals, 1, "{records:?}");
    let last = records.last().unwrap().clone();
    assert!(is_final(&last), "final record is not last: {last}");
    assert_eq!(last["data"], "");

    let output = &records[1..records.len() - 1];
    let mirrored = runs(output.iter().map(|r| {
        (
            r["stream"].as_str().unwrap(),
            r["data"].as_str().unwrap().to_owned(),
        )
    }));
    let streamed = runs(run.chunks.iter().map(|(stream, data)| {
        let name = match stream {
            common::OutputStream::Stderr => "stderr",
            _ => "stdout",
        };
        (name, String::from_utf8_lossy(data).into_owned())
    }));
    assert_eq!(mirrored, streamed, "stream order or content differs");
    last
}

#[tokio::test]
async fn records_equal_the_output_with_the_echo_first_and_one_final_record() {
    let fake = FakeIngest::start(SECRET).await;
    let server = server(&fake, SECRET, &[]).await;
    let mut client = server.client().await;

    // Exit codes 0 and 3, both streams interleaved, output without a final newline.
    let script = "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.05; done; printf tail";
    let ok = common::run(&mut client, mirrored(common::shell(script), "s-ok")).await;
    assert_eq!(ok.state(), JobState::Succeeded);
    let failed = common::run(
        &mut client,
        mirrored(
            common::argv(&["sh", "-c", "echo bad >&2; exit 3"]),
            "s-fail",
        ),
    )
    .await;
    assert_eq!(failed.exited.exit_code, Some(3));

    // Cancelled and timed out.
    let mut job = common::Job::start(
        &mut client,
        mirrored(common::shell("echo started; exec sleep 30"), "s-cancel"),
    )
    .await;
    job.read_stdout(8).await;
    common::cancel(&mut client, &job.job_id).await;
    let cancelled = job.finish().await;
    assert_eq!(cancelled.state(), JobState::Cancelled);
    let req = common::with_timeout(
        mirrored(common::shell("exec sleep 30"), "s-timeout"),
        Duration::from_millis(1000),
    );
    let timed_out = common::run(&mut client, req).await;
    assert_eq!(timed_out.state(), JobState::TimedOut);

    // Not mirrored: no session id.
    let mut req = common::shell("echo private");
    req.task_id = "task-1".into();
    let private = common::run(&mut client, req).await;
    let status = common::status(&mut client, &private.job_id).await;
    assert!(!status.mirrored && status.mirror.is_none());

    for (run, session, echo) in [
        (&ok, "s-ok", format!("$ {script}")),
        (
            &failed,
            "s-fail",
            "$ sh -c 'echo bad >&2; exit 3'".to_owned(),
        ),
        (
            &cancelled,
            "s-cancel",
            "$ echo started; exec sleep 30".to_owned(),
        ),
        (&timed_out, "s-timeout", "$ exec sleep 30".to_owned()),
    ] {
        let mirror = mirror_done(&mut client, &run.job_id).await;
        assert_eq!(mirror.bytes_dropped, 0);
        assert_eq!(mirror.bytes_pending, 0);
        assert!(mirror.last_error.is_empty(), "{}", mirror.last_error);
        let records = fake.session(session);
        assert_eq!(mirror.records_delivered as usize, records.len());
        let last = check_records(&records, run, &echo);
        match session {
            "s-ok" => assert_eq!(last["exitCode"], 0),
            "s-fail" => assert_eq!(last["exitCode"], 3),
            "s-cancel" => {
                assert!(last.get("exitCode").is_none());
                assert_eq!(last["error"], "cancelled by request");
            }
            _ => {
                assert!(last.get("exitCode").is_none());
                assert_eq!(last["error"], "timed out after 1s");
            }
        }
    }
    // The rows the deployed server makes of them, as the web terminal shows them.
    let shown = rows(&fake.session("s-fail"));
    assert_eq!(
        shown,
        [
            ("stdout", "$ sh -c 'echo bad >&2; exit 3'"),
            ("stderr", "bad\n"),
            ("stdout", "\n[DONE] Exit code: 3")
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    assert!(fake.records().iter().all(|r| r["data"] != "private\n"));
    assert!(fake.refused().is_empty(), "{:?}", fake.refused());
    server.stop().await;
}

#[tokio::test]
async fn split_characters_arrive_whole_and_invalid_bytes_become_replacement_characters() {
    let fake = FakeIngest::start(SECRET).await;
    let server = server(&fake, SECRET, &[]).await;
    let mut client = server.client().await;
    // dash's printf takes octal escapes: \342\202\254 is the euro sign, \377 is never valid.
    let script = r"printf '\342\202'; sleep 0.2; printf '\254 x\377y\n'; printf '\360\237' >&2";
    let run = common::run(&mut client, mirrored(common::shell(script), "s-utf8")).await;
    assert_eq!(run.stdout, b"\xe2\x82\xac x\xffy\n");
    assert!(
        run.chunks.len() >= 2,
        "the euro sign was not split: {:?}",
        run.chunks
    );
    let mirror = mirror_done(&mut client, &run.job_id).await;
    let records = fake.session("s-utf8");
    let text = |stream: &str| -> String {
        records[1..]
            .iter()
            .filter(|r| r["stream"] == stream)
            .map(|r| r["data"].as_str().unwrap())
            .collect()
    };
    assert_eq!(text("stdout"), "€ x\u{FFFD}y\n");
    // A sequence cut off by the end of the stream is invalid too.
    assert_eq!(text("stderr"), "\u{FFFD}");
    assert_eq!(mirror.invalid_bytes, 3);
    server.stop().await;
}

#[tokio::test]
async fn twenty_mib_costs_about_one_request_per_64_kib_and_every_byte_arrives() {
    let fake = FakeIngest::start(SECRET).await;
    // The burst is produced far faster than one request at a time can carry it, so the queue
    // must hold all of it for every byte to arrive (the default 8 MiB would drop the oldest).
    let server = server(&fake, SECRET, &["--convex-queue-bytes", "25165824"]).await;
    let mut client = server.client().await;
    const TOTAL: usize = 20 << 20;
    let script = format!("yes 'a line of output, 0123456789 ünïcödé' | head -c {TOTAL}");
    let started = Instant::now();
    let run = common::run(&mut client, mirrored(common::shell(&script), "s-big")).await;
    let exec_done = started.elapsed();
    assert_eq!(run.stdout.len(), TOTAL);
    let mirror = mirror_done(&mut client, &run.job_id).await;
    let caught_up = started.elapsed();
    let records = fake.session("s-big");
    let stdout: String = records[1..]
        .iter()
        .filter(|r| r["stream"] == "stdout")
        .map(|r| r["data"].as_str().unwrap())
        .collect();
    // `head -c` may cut a character in two at the very end: that one byte pair is invalid.
    let expected = String::from_utf8_lossy(&run.stdout);
    assert_eq!(stdout.len(), expected.len());
    assert!(
        stdout == expected,
        "mirrored stdout differs from the output"
    );
    let requests = fake.requests();
    let output_records = records.len() - 2;
    eprintln!(
        "20 MiB: {} requests ({output_records} output records, {} expected at 64 KiB each); \
         Exec done in {exec_done:?}, mirror caught up at {caught_up:?}; retries {}",
        requests,
        TOTAL.div_ceil(64 << 10),
        mirror.retries
    );
    assert!(
        output_records <= TOTAL.div_ceil(64 << 10) + 2,
        "{output_records} output records"
    );
    assert_eq!(requests as usize, records.len());
    server.stop().await;
}

#[tokio::test]
async fn failing_then_hanging_ingest_recovers_with_every_record_once_in_order() {
    let fake = FakeIngest::start(SECRET).await;
    let server = server(&fake, SECRET, &[]).await;
    let mut client = server.client().await;

    fake.set_fault(Fault::Status(500));
    let script = "for i in $(seq 1 20); do echo out$i; echo err$i >&2; sleep 0.02; done; echo end";
    let started = Instant::now();
    let run = common::run(&mut client, mirrored(common::shell(script), "s-faults")).await;
    let exec_done = started.elapsed();
    assert_eq!(run.state(), JobState::Succeeded);
    // The Exec stream ended while the mirror had not even delivered the echo.
    let status = common::status(&mut client, &run.job_id).await;
    let mirror = status.mirror.unwrap();
    assert!(!mirror.complete, "{mirror:?}");
    assert!(fake.session("s-faults").is_empty());

    fake.wait_faulted(3, PATIENCE).await;
    // Then requests hang past the client's timeout (nothing stored), then the flag is off.
    let seen = fake.faulted();
    fake.set_fault(Fault::Hang { record: false });
    fake.wait_faulted(seen + 2, PATIENCE).await;
    fake.set_enabled(false);
    fake.set_fault(Fault::None);
    let deadline = Instant::now() + PATIENCE;
    while !fake.refused().contains(&503) {
        assert!(
            Instant::now() < deadline,
            "no request while the flag was off"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fake.set_enabled(true);

    let mirror = mirror_done(&mut client, &run.job_id).await;
    let caught_up = started.elapsed();
    let records = fake.session("s-faults");
    let last = check_records(&records, &run, &format!("$ {script}"));
    assert_eq!(last["exitCode"], 0);
    let duplicates = records.windows(2).filter(|w| w[0] == w[1]).count();
    eprintln!(
        "faults: Exec done in {exec_done:?}, mirror caught up at {caught_up:?}; {} records, \
         {} retries ({} ambiguous), {duplicates} duplicate rows",
        records.len(),
        mirror.retries,
        mirror.ambiguous_retries
    );
    assert_eq!(duplicates, 0);
    assert!(mirror.retries >= 5, "{mirror:?}");
    assert_eq!(mirror.bytes_dropped, 0);
    server.stop().await;
}

#[tokio::test]
async fn a_timeout_after_the_row_was_stored_duplicates_it_and_nothing_else() {
    let fake = FakeIngest::start(SECRET).await;
    let server = server(&fake, SECRET, &[]).await;
    let mut client = server.client().await;
    fake.set_fault(Fault::Hang { record: true });
    let run = common::run(&mut client, mirrored(common::shell("echo once"), "s-dup")).await;
    fake.wait_faulted(3, PATIENCE).await;
    fake.set_fault(Fault::None);
    let mirror = mirror_done(&mut client, &run.job_id).await;
    let records = fake.session("s-dup");
    let mut unique = records.clone();
    unique.dedup();
    let duplicates = records.len() - unique.len();
    eprintln!(
        "ambiguous timeouts: {} ambiguous retries, {duplicates} duplicate rows of {} records",
        mirror.ambiguous_retries,
        records.len()
    );
    // The echo was stored on every timed-out attempt; the rest arrived once.
    assert!(duplicates >= 2, "{records:?}");
    assert!(mirror.ambiguous_retries >= duplicates as u64);
    check_records(&unique, &run, "$ echo once");
    server.stop().await;
}

#[tokio::test]
async fn a_refused_secret_marks_the_sink_unhealthy_and_the_job_still_succeeds() {
    let fake = FakeIngest::start(SECRET).await;
    let wrong = "not-the-secret-value";
    let server = server(&fake, wrong, &[]).await;
    let mut client = server.client().await;
    let health = common::health(&mut client).await;
    assert!(
        health.convex_configured && health.convex_healthy,
        "{health:?}"
    );
    assert_eq!(health.sinks, ["convex"]);

    let run = common::run(
        &mut client,
        mirrored(common::shell("echo fine; echo more"), "s-401"),
    )
    .await;
    assert_eq!(run.state(), JobState::Succeeded);
    assert_eq!(run.stdout, b"fine\nmore\n");
    let mirror = mirror_done(&mut client, &run.job_id).await;
    assert!(mirror.last_error.contains("401"), "{mirror:?}");
    assert!(
        mirror.last_error.contains("CONVEX_INGEST_SECRET"),
        "{mirror:?}"
    );
    assert!(mirror.bytes_dropped > 0);
    // Not retried, and the rest of the job not sent: one refused request.
    assert_eq!(fake.refused(), [401]);
    assert!(fake.records().is_empty());

    let health = common::health(&mut client).await;
    assert!(
        health.convex_configured && !health.convex_healthy,
        "{health:?}"
    );
    assert!(
        health.convex_error.contains("401"),
        "{}",
        health.convex_error
    );
    let status = common::status(&mut client, &run.job_id).await;
    for text in [format!("{health:?}"), format!("{status:?}")] {
        assert!(!text.contains(wrong) && !text.contains(SECRET), "{text}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_refused_url_ends_the_jobs_mirror_with_nothing_left_pending() {
    let fake = FakeIngest::start(SECRET).await;
    // Requests are held (not timed out) until the fault changes.
    let server = server(&fake, SECRET, &["--convex-request-timeout", "30s"]).await;
    let mut client = server.client().await;
    // The echo is held while the job writes: its output waits, then is taken as one batch of
    // ten records, the first of which is refused for good.
    fake.set_fault(Fault::Hang { record: true });
    const TOTAL: u64 = 600_000;
    let script = format!("head -c {TOTAL} /dev/zero | tr '\\0' x");
    let run = common::run(&mut client, mirrored(common::shell(&script), "s-404")).await;
    assert_eq!(run.stdout.len() as u64, TOTAL);
    fake.wait_faulted(1, PATIENCE).await;
    fake.set_fault(Fault::Status(404));

    let mirror = mirror_done(&mut client, &run.job_id).await;
    assert!(mirror.last_error.contains("404"), "{mirror:?}");
    assert_eq!(mirror.records_delivered, 1, "{mirror:?}");
    // Every output byte is dropped, and none is still counted as pending.
    assert_eq!(mirror.bytes_dropped, TOTAL, "{mirror:?}");
    assert_eq!(mirror.bytes_pending, 0, "{mirror:?}");
    // The echo, and one refused request: the rest of the job was not sent.
    assert_eq!(fake.session("s-404").len(), 1);
    assert_eq!(fake.faulted(), 2);
    server.stop().await;
}

#[tokio::test]
async fn a_closed_port_shows_in_last_error_and_health_until_the_ingest_comes_back() {
    let addr = closed_addr().await;
    let server = server_at(&format!("http://{addr}"), SECRET, &[]).await;
    let mut client = server.client().await;
    assert!(common::health(&mut client).await.convex_healthy);

    let run = common::run(
        &mut client,
        mirrored(common::shell("echo waiting"), "s-closed"),
    )
    .await;
    // Each retry says why while the record is still being retried.
    let mirror = wait_mirror(&mut client, &run.job_id, |m| m.retries >= 1).await;
    assert!(!mirror.complete);
    assert!(
        mirror.last_error.to_lowercase().contains("connect"),
        "{mirror:?}"
    );
    // Every recent attempt failed: Health says so long before a record is given up (60 s).
    let deadline = Instant::now() + PATIENCE;
    let unhealthy = loop {
        let health = common::health(&mut client).await;
        if !health.convex_healthy {
            break health;
        }
        assert!(Instant::now() < deadline, "still healthy: {health:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(unhealthy.convex_configured);
    assert!(
        unhealthy.convex_error.to_lowercase().contains("connect"),
        "{unhealthy:?}"
    );
    let mirror = common::status(&mut client, &run.job_id)
        .await
        .mirror
        .unwrap();
    assert!(!mirror.complete && mirror.bytes_dropped == 0, "{mirror:?}");

    // The ingest comes back on the same port: the queued records arrive, Health recovers.
    let fake = FakeIngest::start_at(addr, SECRET).await;
    let mirror = mirror_done(&mut client, &run.job_id).await;
    assert_eq!(mirror.bytes_dropped, 0, "{mirror:?}");
    let records = fake.session("s-closed");
    assert_eq!(
        check_records(&records, &run, "$ echo waiting")["exitCode"],
        0
    );
    let health = common::health(&mut client).await;
    assert!(health.convex_healthy, "{health:?}");
    assert!(health.convex_error.is_empty(), "{health:?}");
    let status = format!("{:?}", common::status(&mut client, &run.job_id).await);
    assert!(!status.contains(SECRET), "{status}");
    server.stop().await;
}

#[tokio::test]
async fn sigterm_with_an_unreachable_ingest_does_not_wait_out_the_drain_grace() {
    // Once with SIGTERM as soon as the job ended (the sink turns unhealthy while flushing), once
    // after Health said unhealthy (retries are backing off for seconds when the flush starts).
    for wait_unhealthy in [false, true] {
        let addr = closed_addr().await;
        let site_url = format!("http://{addr}");
        let mut server = common::start_binary(
            &["--drain-grace", "60s", "--convex-request-timeout", "500ms"],
            &[
                ("CONVEX_SITE_URL", &site_url),
                ("CONVEX_INGEST_SECRET", SECRET),
            ],
        )
        .await;
        let mut client = SandboxServiceClient::new(server.channel().await.unwrap());
        let run = common::run(
            &mut client,
            mirrored(common::shell("echo never mirrored; exit 4"), "s-gone"),
        )
        .await;
        assert_eq!(run.exited.exit_code, Some(4));
        wait_mirror(&mut client, &run.job_id, |m| m.retries >= 1).await;
        if wait_unhealthy {
            let deadline = Instant::now() + PATIENCE;
            while common::health(&mut client).await.convex_healthy {
                assert!(Instant::now() < deadline, "never unhealthy");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        let sigterm = Instant::now();
        server.sigterm().unwrap();
        let lost = server
            .wait_log(
                "stopped flushing to Convex; the pending output of these jobs is not mirrored",
            )
            .await
            .unwrap();
        let (status, all_logs) = server.exit().await.unwrap();
        let took = sigterm.elapsed();
        eprintln!(
            "unreachable ingest (wait_unhealthy={wait_unhealthy}): exited {took:?} after SIGTERM"
        );
        assert!(status.success(), "{status}");
        // The drain grace is 60 s; giving up takes one failed attempt per job, well under 1 s
        // here. A wide margin: this bounds the wait, it does not time it.
        assert!(took < Duration::from_secs(20), "{took:?}:\n{all_logs}");
        let fields = &lost["fields"];
        assert_eq!(fields["jobs"], 1, "{lost}");
        // The echo and the output line were pending.
        let echo = "$ echo never mirrored; exit 4".len() as u64;
        assert_eq!(fields["bytes"].as_u64(), Some(echo + 15), "{lost}");
        assert!(
            fields["reason"]
                .as_str()
                .unwrap()
                .contains("cannot be reached"),
            "{lost}"
        );
        assert!(!all_logs.contains(SECRET), "secret in logs:\n{all_logs}");
    }
}

#[tokio::test]
async fn without_convex_health_says_so_and_jobs_are_not_mirrored() {
    let server = common::start(&[]).await;
    let mut client = server.client().await;
    let health = common::health(&mut client).await;
    assert!(!health.convex_configured && !health.convex_healthy);
    assert!(health.sinks.is_empty());
    let run = common::run(&mut client, mirrored(common::shell("echo hi"), "s-off")).await;
    let status = common::status(&mut client, &run.job_id).await;
    assert!(!status.mirrored);
    server.stop().await;
}

#[tokio::test]
async fn a_stalled_ingest_with_a_small_queue_stays_bounded_and_marks_the_gap() {
    let fake = FakeIngest::start(SECRET).await;
    const QUEUE: u64 = 128 << 10;
    let queue = QUEUE.to_string();
    let server = server(&fake, SECRET, &["--convex-queue-bytes", &queue]).await;
    let mut client = server.client().await;
    fake.set_fault(Fault::Hang { record: false });

    const TOTAL: u64 = 4 << 20;
    let script = format!("yes 0123456789abcdef | head -c {TOTAL}");
    let mut job =
        common::Job::start(&mut client, mirrored(common::shell(&script), "s-stall")).await;
    let mut peak = 0;
    while job.step().await {
        let mirror = common::status(&mut client, &job.job_id)
            .await
            .mirror
            .unwrap();
        peak = peak.max(mirror.bytes_pending);
    }
    let run = job.finish().await;
    assert_eq!(run.stdout.len() as u64, TOTAL);
    let stalled = common::status(&mut client, &run.job_id)
        .await
        .mirror
        .unwrap();
    // Queue bound plus the one record in flight (the echo, held by the stalled server).
    assert!(peak <= QUEUE + 64 * 1024, "pending peaked at {peak}");
    assert!(
        stalled.bytes_dropped >= TOTAL - QUEUE - 64 * 1024,
        "{stalled:?}"
    );
    assert!(!stalled.complete);

    fake.set_fault(Fault::None);
    let mirror = mirror_done(&mut client, &run.job_id).await;
    let records = fake.session("s-stall");
    let markers: Vec<u64> = records
        .iter()
        .filter_map(|r| {
            let data = r["data"].as_str()?;
            let n = data
                .strip_prefix("\n[... ")?
                .strip_suffix(" bytes not mirrored ...]\n")?;
            assert_eq!(r["stream"], "stderr");
            n.parse().ok()
        })
        .collect();
    assert_eq!(markers.len(), 1, "{markers:?}");
    assert_eq!(markers[0], mirror.bytes_dropped);
    assert!(is_final(records.last().unwrap()));
    assert_eq!(records.last().unwrap()["exitCode"], 0);
    // What arrived is the echo, the marker, then the newest output, whole.
    let kept: String = records
        .iter()
        .skip(2)
        .filter(|r| r["stream"] == "stdout")
        .map(|r| r["data"].as_str().unwrap())
        .collect();
    assert_eq!(kept.len() as u64 + markers[0], TOTAL);
    assert!(run.stdout.ends_with(kept.as_bytes()));
    eprintln!(
        "stall: peak pending {peak} bytes (bound {QUEUE}), dropped {}, kept {}",
        markers[0],
        kept.len()
    );
    server.stop().await;
}

#[tokio::test]
async fn sigterm_on_the_binary_flushes_a_finished_jobs_last_records() {
    let fake = FakeIngest::start(SECRET).await;
    let site_url = fake.site_url();
    // Long enough that the held requests do not time out often enough to make the sink unhealthy
    // before the fault is lifted (an unhealthy sink at shutdown gives up at the next failure).
    let mut server = common::start_binary(
        &["--drain-grace", "20s", "--convex-request-timeout", "2s"],
        &[
            ("CONVEX_SITE_URL", &site_url),
            ("CONVEX_INGEST_SECRET", SECRET),
        ],
    )
    .await;
    let mut client = SandboxServiceClient::new(server.channel().await.unwrap());

    // Convex stalls, the job finishes: its records are queued when SIGTERM arrives.
    fake.set_fault(Fault::Hang { record: false });
    let run = common::run(
        &mut client,
        mirrored(common::shell("echo last words; exit 7"), "s-term"),
    )
    .await;
    assert_eq!(run.exited.exit_code, Some(7));
    assert!(fake.session("s-term").is_empty());
    server.sigterm().unwrap();
    server
        .wait_log("flushing job output to Convex")
        .await
        .unwrap();
    fake.set_fault(Fault::None);

    let (status, all_logs) = server.exit().await.unwrap();
    assert!(status.success(), "{status}");
    let records = fake.session("s-term");
    let last = check_records(&records, &run, "$ echo last words; exit 7");
    assert_eq!(last["exitCode"], 7);
    assert!(
        all_logs.contains("Convex mirror of the job finished"),
        "{all_logs}"
    );
    assert!(!all_logs.contains(SECRET), "secret in logs:\n{all_logs}");
}

#[tokio::test]
async fn the_binary_refuses_half_a_convex_configuration_and_hides_the_secret() {
    let bin = env!("CARGO_BIN_EXE_sandbox-runner");
    for (name, value, needle) in [
        (
            "CONVEX_SITE_URL",
            "https://x.convex.site",
            "CONVEX_INGEST_SECRET is not",
        ),
        (
            "CONVEX_INGEST_SECRET",
            SECRET,
            "CONVEX_SITE_URL (--convex-site-url) is not",
        ),
    ] {
        let output = tokio::process::Command::new(bin)
            .env_remove("CONVEX_SITE_URL")
            .env_remove("CONVEX_INGEST_SECRET")
            .env(name, value)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{name}: {stderr}");
        assert!(stderr.contains(needle), "{name}: {stderr}");
        assert!(!stderr.contains(SECRET), "{stderr}");
    }
    let help = tokio::process::Command::new(bin)
        .arg("--help")
        .env("CONVEX_INGEST_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("CONVEX_INGEST_SECRET"), "{text}");
    assert!(!text.contains(SECRET), "{text}");
}

/// A job started over REST (the Node runner's route) is mirrored as the Node runner's were, so
/// the web terminal shows it: the command line, its output, its real exit code.
#[tokio::test]
async fn a_rest_exec_is_mirrored_like_the_node_runners() {
    sandbox_runner::tls::install_crypto_provider();
    let fake = FakeIngest::start(SECRET).await;
    let server = server(&fake, SECRET, &[]).await;
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/exec", server.addr))
        .json(&serde_json::json!({
            "taskId": "task-1",
            "sessionId": "s-rest",
            "sandboxId": "sandbox-1",
            "command": "echo \"from $PLACE\"; exit 2",
            "env": { "PLACE": "rest" }
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::OK);
    let started: Value = response.json().await.unwrap();
    let job_id = started["jobId"].as_str().unwrap();
    let mut client = server.client().await;
    mirror_done(&mut client, job_id).await;
    assert_eq!(
        rows(&fake.session("s-rest")),
        [
            ("stdout", "$ echo \"from $PLACE\"; exit 2"),
            ("stdout", "from rest\n"),
            ("stdout", "\n[DONE] Exit code: 2")
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    server.stop().await;
}
