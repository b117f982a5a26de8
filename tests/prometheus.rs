//! `/metrics` on its own port: per-RPC metrics under the go-grpc-prometheus names (with their
//! codes, streams timed to their end), REST requests, job outcomes and bytes, gauges read when
//! scraped, histograms with buckets, and no unbounded label values; attached clients, output
//! budget waits, connections open and refused by reason, the Convex mirror against its fake
//! (deliveries, plain and ambiguous retries, refused records, dropped bytes, queue, lag) and
//! Daytona API calls against its fake (by operation and outcome). Real servers, real clients.
//!
//! The tests of this file share one process, hence one recorder: counters are compared with
//! what they were before the test acted, and gauges read when scraped are the scraped server's.

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::{
    Job,
    scrape::{Scrape, free_port, wait_for},
    shell,
};
use sandbox_runner::{
    proto as pb,
    testing::{
        convex_ingest::{FakeIngest, Fault},
        daytona::FakeDaytona,
    },
};
use tokio::io::AsyncReadExt;

fn value(line: &str) -> f64 {
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn metrics_count_rpcs_jobs_and_requests_with_bounded_labels() {
    sandbox_runner::tls::install_crypto_provider();
    let port = free_port();
    let server = common::start(&["--metrics-port", &port.to_string()]).await;
    let mut client = server.client().await;
    let run = common::run(&mut client, shell("printf hello; exit 3")).await;
    assert_eq!(run.exited.exit_code, Some(3));
    let refused = client.exec(shell("")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    common::status(&mut client, &run.job_id).await;
    let http = reqwest::Client::new();
    let health = http
        .get(format!("http://{}/health", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // The stream's end is recorded when its response ends: poll (bounded) until it is.
    let scraped = wait_for(port, "the Exec's end", |s| {
        let exec = ["grpc_method=\"Exec\"", "grpc_code=\"OK\""];
        !s.lines("grpc_server_handled_total", &exec).is_empty()
    })
    .await;
    let scrape = &scraped.0;
    let exec = [
        "grpc_service=\"sandbox.v1.SandboxService\"",
        "grpc_method=\"Exec\"",
        "grpc_type=\"server_stream\"",
    ];
    let started = scraped.lines("grpc_server_started_total", &exec);
    assert_eq!(started.len(), 1, "{scrape}");
    assert!(
        value(started[0]) >= 2.0,
        "both Execs started: {}",
        started[0]
    );
    for code in ["grpc_code=\"OK\"", "grpc_code=\"InvalidArgument\""] {
        let handled = scraped.lines("grpc_server_handled_total", &[exec[1], code]);
        assert_eq!(handled.len(), 1, "{code}: {scrape}");
    }
    assert!(
        !scraped
            .lines("grpc_server_handled_total", &["grpc_method=\"Status\""])
            .is_empty()
    );
    // Histograms, with buckets (not summaries).
    assert!(
        !scraped
            .lines(
                "grpc_server_handling_seconds_bucket",
                &[exec[1], "le=\"0.001\""]
            )
            .is_empty(),
        "{scrape}"
    );
    assert!(
        !scraped
            .lines(
                "sandbox_job_duration_seconds_bucket",
                &["backend=\"local\""]
            )
            .is_empty()
    );
    assert!(
        !scraped
            .lines("sandbox_job_first_output_seconds_bucket", &[])
            .is_empty()
    );
    // REST, by route template.
    let rest = scraped.lines(
        "http_requests_total",
        &["route=\"/health\"", "method=\"GET\"", "status=\"200\""],
    );
    assert_eq!(rest.len(), 1, "{scrape}");
    // Jobs and bytes.
    let failed = scraped.lines(
        "sandbox_jobs_finished_total",
        &["backend=\"local\"", "state=\"failed\""],
    );
    assert!(value(failed[0]) >= 1.0, "{scrape}");
    let stdout = scraped.lines("sandbox_job_output_bytes_total", &["stream=\"stdout\""]);
    assert!(value(stdout[0]) >= 5.0, "{scrape}");
    assert!(!scraped.lines("sandbox_jobs_running", &[]).is_empty());
    assert!(!scraped.lines("sandbox_output_budget_bytes", &[]).is_empty());
    // No job id, task or command in any label.
    assert!(!scrape.contains("j1."), "a job id in a label");
    assert!(!scrape.contains("printf"), "a command in a label");
    server.stop().await;
}

/// A server on the local backend with metrics on a port of its own; returns that port.
async fn with_metrics(extra: &[&str]) -> (common::TestServer, u16) {
    let port = free_port();
    let port_arg = port.to_string();
    let mut args = vec!["--metrics-port", port_arg.as_str()];
    args.extend_from_slice(extra);
    (common::start(&args).await, port)
}

#[tokio::test]
async fn attached_clients_budget_waits_and_start_times_are_measured() {
    // The smallest budget: 1 MiB shared, 4 KiB per job.
    let (server, port) = with_metrics(&[
        "--output-budget-bytes",
        "1048576",
        "--output-reserve-bytes",
        "4096",
    ])
    .await;
    let mut client = server.client().await;
    let before = Scrape::get(port).await;

    // An Exec caller and an Attach stream follow a job; each is counted while it is open.
    let job = Job::start(&mut client, shell("sleep 60")).await;
    let attach = common::attach(&mut client, &job.job_id, None, pb::GapPolicy::Report, false)
        .await
        .unwrap();
    let scrape = Scrape::get(port).await;
    assert_eq!(
        scrape.one("sandbox_attached_clients", &["kind=\"exec\""]),
        1.0
    );
    assert_eq!(
        scrape.one("sandbox_attached_clients", &["kind=\"attach\""]),
        1.0
    );
    drop(attach);
    wait_for(port, "the Attach stream closed", |s| {
        s.one("sandbox_attached_clients", &["kind=\"attach\""]) == 0.0
    })
    .await;
    common::cancel(&mut client, &job.job_id).await;
    job.finish().await;
    wait_for(port, "the Exec stream closed", |s| {
        s.one("sandbox_attached_clients", &["kind=\"exec\""]) == 0.0
    })
    .await;

    // A caller that reads nothing of 8 MB: once the budget is used up the job waits (counted
    // as the wait starts), and when the caller reads, the wait ends (observed with its length).
    let waits = |s: &Scrape| s.sum("sandbox_output_budget_waits_total", &["waiter=\"job\""]);
    let ended = |s: &Scrape| {
        s.sum(
            "sandbox_output_budget_wait_seconds_count",
            &["waiter=\"job\""],
        )
    };
    let job = Job::start(&mut client, shell("head -c 8000000 /dev/zero")).await;
    // A wait is counted as it begins, which may be a scrape before the last chunk of the
    // shared budget is taken: wait (bounded) for both.
    wait_for(
        port,
        "a job waiting for output budget, the budget used up",
        |s| {
            waits(s) > waits(&before)
                && s.one("sandbox_output_budget_in_use_bytes", &[])
                    == s.one("sandbox_output_budget_bytes", &[])
        },
    )
    .await;
    let run = job.finish().await;
    assert_eq!(run.stdout.len(), 8_000_000);
    let after = wait_for(port, "the wait's end", |s| ended(s) > ended(&before)).await;
    assert!(
        after.sum(
            "sandbox_output_budget_wait_seconds_sum",
            &["waiter=\"job\""]
        ) > 0.0,
        "the job waited for some time"
    );

    // Every start was timed.
    let starts = |s: &Scrape| s.sum("sandbox_job_start_seconds_count", &["backend=\"local\""]);
    assert!(starts(&after) >= starts(&before) + 2.0);
    server.stop().await;
}

/// Waits (bounded) until the server closes `stream`: a read ends or fails.
async fn closed_by_server(stream: &mut tokio::net::TcpStream, what: &str) {
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // What the server may write before closing (an HTTP/2 GOAWAY): read on.
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(read.is_ok(), "{what}: the server kept the connection open");
}

async fn connect(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(addr).await.unwrap()
}

#[tokio::test]
async fn connections_are_counted_open_and_refused_by_reason() {
    let refused = |s: &Scrape, reason: &str| s.sum("sandbox_connections_refused_total", &[reason]);
    let (evicted, limit) = ("reason=\"evicted\"", "reason=\"limit\"");
    let (handshake, idle) = ("reason=\"handshake_timeout\"", "reason=\"idle\"");

    // Two connections at most: silent ones make room for new ones; speaking ones do not.
    let (server, port) = with_metrics(&["--max-connections", "2"]).await;
    let before = Scrape::get(port).await;
    let mut a = server.client().await;
    common::health(&mut a).await;
    let mut silent = connect(server.addr).await;
    let mut newer = connect(server.addr).await;
    closed_by_server(&mut silent, "the older silent connection").await;
    let mut b = server.client().await;
    common::health(&mut b).await;
    closed_by_server(&mut newer, "the newer silent connection").await;
    let mut third = connect(server.addr).await;
    closed_by_server(&mut third, "a connection past the limit").await;
    let scrape = wait_for(port, "the refusals", |s| {
        refused(s, evicted) >= refused(&before, evicted) + 2.0
            && refused(s, limit) > refused(&before, limit)
    })
    .await;
    // This process's servers share the gauge: this one's two clients at least.
    assert!(scrape.one("sandbox_connections_open", &[]) >= 2.0);
    server.stop().await;

    // Too slow to speak, then idle for too long.
    let (server, port) = with_metrics(&[
        "--handshake-timeout",
        "200ms",
        "--idle-connection-timeout",
        "300ms",
    ])
    .await;
    let before = Scrape::get(port).await;
    let mut mute = connect(server.addr).await;
    closed_by_server(&mut mute, "a connection that never spoke").await;
    let mut c = server.client().await;
    common::health(&mut c).await;
    wait_for(port, "the timeouts", |s| {
        refused(s, handshake) > refused(&before, handshake)
            && refused(s, idle) > refused(&before, idle)
    })
    .await;
    server.stop().await;
}

const SECRET: &str = "test-ingest-secret-0123456789";

fn mirrored(command: &str, session: &str) -> pb::ExecRequest {
    let mut req = shell(command);
    req.task_id = "task-1".into();
    req.session_id = session.into();
    req.sandbox_id = "sandbox-1".into();
    req
}

/// Waits (bounded) until the job's mirror completed: every record delivered or given up.
async fn mirror_complete(
    client: &mut pb::sandbox_service_client::SandboxServiceClient<tonic::transport::Channel>,
    job_id: &str,
) -> pb::MirrorStatus {
    for _ in 0..3000 {
        let mirror = common::status(client, job_id)
            .await
            .mirror
            .expect("mirrored");
        if mirror.complete {
            return mirror;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the mirror of {job_id} never completed");
}

/// Runs a mirrored job to its end and waits until its mirror completed.
async fn run_mirrored(
    client: &mut pb::sandbox_service_client::SandboxServiceClient<tonic::transport::Channel>,
    command: &str,
    session: &str,
) -> pb::MirrorStatus {
    let run = common::run(client, mirrored(command, session)).await;
    mirror_complete(client, &run.job_id).await
}

#[tokio::test]
async fn mirror_deliveries_retries_refusals_and_queue_are_measured() {
    let fake = FakeIngest::start(SECRET).await;
    let site_url = fake.site_url();
    let (server, port) = with_metrics(&[
        "--convex-site-url",
        &site_url,
        "--convex-ingest-secret",
        SECRET,
        "--convex-request-timeout",
        "500ms",
        "--convex-retry-for",
        "60s",
    ])
    .await;
    let mut client = server.client().await;
    let sink = "sink=\"convex\"";
    let delivered = |s: &Scrape| s.sum("sandbox_mirror_records_delivered_total", &[sink]);
    let retries =
        |s: &Scrape, ambiguous: &str| s.sum("sandbox_mirror_retries_total", &[sink, ambiguous]);
    let (plain, ambiguous) = ("ambiguous=\"false\"", "ambiguous=\"true\"");
    let before = Scrape::get(port).await;

    // Delivered: the echo, the output and the final record, each with its lag.
    let mirror = run_mirrored(&mut client, "printf hello", "s-ok").await;
    assert_eq!(mirror.records_delivered, 3);
    let scrape = Scrape::get(port).await;
    assert_eq!(delivered(&scrape), delivered(&before) + 3.0);
    let bytes = |s: &Scrape| s.sum("sandbox_mirror_delivered_bytes_total", &[sink]);
    assert_eq!(
        bytes(&scrape),
        bytes(&before) + ("$ printf hello".len() + "hello".len()) as f64
    );
    let lags = |s: &Scrape| s.sum("sandbox_mirror_delivery_lag_seconds_count", &[sink]);
    assert_eq!(lags(&scrape), lags(&before) + 3.0);
    assert_eq!(scrape.one("sandbox_mirror_healthy", &[sink]), 1.0);
    assert_eq!(scrape.one("sandbox_mirror_queue_bytes", &[sink]), 0.0);

    // A 500 is retried as a record the ingest did not store.
    fake.set_fault(Fault::Status(500));
    let job = Job::start(&mut client, mirrored("printf retried", "s-500")).await;
    fake.wait_faulted(1, Duration::from_secs(60)).await;
    wait_for(port, "a plain retry", |s| {
        retries(s, plain) > retries(&before, plain)
    })
    .await;
    fake.set_fault(Fault::None);
    let run = job.finish().await;
    mirror_complete(&mut client, &run.job_id).await;

    // A request that times out may have been stored: its retry is ambiguous. Meanwhile the
    // output waits in the queue.
    let faulted = fake.faulted();
    fake.set_fault(Fault::Hang { record: true });
    let job = Job::start(&mut client, mirrored("printf held", "s-hang")).await;
    fake.wait_faulted(faulted + 1, Duration::from_secs(60))
        .await;
    wait_for(port, "an ambiguous retry with output queued", |s| {
        retries(s, ambiguous) > retries(&before, ambiguous)
            && s.one("sandbox_mirror_queue_bytes", &[sink]) > 0.0
    })
    .await;
    fake.set_fault(Fault::None);
    let run = job.finish().await;
    mirror_complete(&mut client, &run.job_id).await;

    // A refused record is not retried; its output is dropped.
    fake.set_fault(Fault::Status(400));
    let mirror = run_mirrored(&mut client, "printf refused-output", "s-400").await;
    fake.set_fault(Fault::None);
    assert_eq!(mirror.records_delivered, 0);
    let scrape = Scrape::get(port).await;
    let failed = |s: &Scrape| {
        s.sum(
            "sandbox_mirror_records_failed_total",
            &[sink, "reason=\"rejected\""],
        )
    };
    // The echo, the output and the final record, and the gap markers sent for the first two.
    assert!(failed(&scrape) >= failed(&before) + 3.0, "{}", scrape.0);
    let dropped = |s: &Scrape| s.sum("sandbox_mirror_dropped_bytes_total", &[sink]);
    assert!(
        dropped(&scrape) >= dropped(&before) + "refused-output".len() as f64,
        "{}",
        scrape.0
    );
    // All delivered or dropped by now: nothing is queued, and the ingest answers again.
    run_mirrored(&mut client, "true", "s-after").await;
    let scrape = Scrape::get(port).await;
    assert_eq!(scrape.one("sandbox_mirror_queue_bytes", &[sink]), 0.0);
    assert_eq!(scrape.one("sandbox_mirror_healthy", &[sink]), 1.0);
    server.stop().await;
}

#[tokio::test]
async fn daytona_requests_are_counted_by_operation_and_outcome() {
    const SANDBOX: &str = "sbx-metrics-1";
    let fake = FakeDaytona::start(common::DAYTONA_KEY).await;
    fake.add_sandbox(SANDBOX, "started");
    let port = free_port();
    let server = common::start_daytona(&fake, &["--metrics-port", &port.to_string()]).await;
    let mut client = server.client().await;
    let requests = |s: &Scrape, operation: &str, outcome: &str| {
        s.sum(
            "sandbox_daytona_requests_total",
            &[
                &format!("operation=\"{operation}\""),
                &format!("outcome=\"{outcome}\""),
            ],
        )
    };
    let in_sandbox = |sandbox: &str, command: &str| {
        let mut req = shell(command);
        req.sandbox_id = sandbox.into();
        req
    };
    let before = Scrape::get(port).await;

    let run = common::run(&mut client, in_sandbox(SANDBOX, "echo hi")).await;
    assert_eq!(run.stdout, b"hi\n");
    // The session is deleted once the job has ended.
    let scrape = wait_for(port, "the session deleted", |s| {
        requests(s, "delete_session", "ok") > requests(&before, "delete_session", "ok")
    })
    .await;
    for operation in ["get_sandbox", "create_session", "exec"] {
        assert!(
            requests(&scrape, operation, "ok") > requests(&before, operation, "ok"),
            "{operation}: {}",
            scrape.0
        );
    }
    let timed = |s: &Scrape| {
        s.sum(
            "sandbox_daytona_request_duration_seconds_count",
            &["operation=\"exec\""],
        )
    };
    assert!(timed(&scrape) > timed(&before));

    // A sandbox that does not exist: the job does not start.
    let err = client
        .exec(in_sandbox("sbx-missing", "true"))
        .await
        .unwrap_err();
    assert_ne!(err.code(), tonic::Code::Ok);
    // A 503 on a GET (retried), and a revoked key.
    fake.faults()
        .transient_get_failures
        .store(1, Ordering::SeqCst);
    common::run(&mut client, in_sandbox(SANDBOX, "true")).await;
    fake.faults().unauthorized.store(true, Ordering::SeqCst);
    client
        .exec(in_sandbox(SANDBOX, "true"))
        .await
        .expect_err("Daytona refuses the key");
    fake.faults().unauthorized.store(false, Ordering::SeqCst);
    let scrape = Scrape::get(port).await;
    let outcome = |s: &Scrape, outcome: &str| {
        s.sum(
            "sandbox_daytona_requests_total",
            &[&format!("outcome=\"{outcome}\"")],
        )
    };
    for expected in ["not_found", "server_error", "unauthorized"] {
        assert!(
            outcome(&scrape, expected) > outcome(&before, expected),
            "{expected}: {}",
            scrape.0
        );
    }
    let failed = |s: &Scrape| s.sum("sandbox_jobs_start_failed_total", &["backend=\"daytona\""]);
    assert!(failed(&scrape) >= failed(&before) + 2.0);
    // Operations and outcomes come from fixed lists: no sandbox or session id in a label.
    assert!(!scrape.0.contains("sbx-"), "{}", scrape.0);
    server.stop().await;
}
