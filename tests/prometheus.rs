//! `/metrics` on its own port: per-RPC metrics under the go-grpc-prometheus names (with their
//! codes, streams timed to their end), REST requests, job outcomes and bytes, gauges read when
//! scraped, histograms with buckets, and no unbounded label values. Real server, real clients.

mod common;

use common::shell;

/// A port free on loopback now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The metric lines (not comments) of a scrape whose name is `name` and that have every one
/// of `labels`.
fn lines<'a>(scrape: &'a str, name: &str, labels: &[&str]) -> Vec<&'a str> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .collect()
}

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
    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut scrape = String::new();
    for _ in 0..100 {
        let response = http.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        scrape = response.text().await.unwrap();
        let exec = ["grpc_method=\"Exec\"", "grpc_code=\"OK\""];
        if !lines(&scrape, "grpc_server_handled_total", &exec).is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let exec = [
        "grpc_service=\"sandbox.v1.SandboxService\"",
        "grpc_method=\"Exec\"",
        "grpc_type=\"server_stream\"",
    ];
    let started = lines(&scrape, "grpc_server_started_total", &exec);
    assert_eq!(started.len(), 1, "{scrape}");
    assert!(
        value(started[0]) >= 2.0,
        "both Execs started: {}",
        started[0]
    );
    for code in ["grpc_code=\"OK\"", "grpc_code=\"InvalidArgument\""] {
        let handled = lines(&scrape, "grpc_server_handled_total", &[exec[1], code]);
        assert_eq!(handled.len(), 1, "{code}: {scrape}");
    }
    assert!(
        !lines(
            &scrape,
            "grpc_server_handled_total",
            &["grpc_method=\"Status\""]
        )
        .is_empty()
    );
    // Histograms, with buckets (not summaries).
    assert!(
        !lines(
            &scrape,
            "grpc_server_handling_seconds_bucket",
            &[exec[1], "le=\"0.001\""]
        )
        .is_empty(),
        "{scrape}"
    );
    assert!(
        !lines(
            &scrape,
            "sandbox_job_duration_seconds_bucket",
            &["backend=\"local\""]
        )
        .is_empty()
    );
    assert!(!lines(&scrape, "sandbox_job_first_output_seconds_bucket", &[]).is_empty());
    // REST, by route template.
    let rest = lines(
        &scrape,
        "http_requests_total",
        &["route=\"/health\"", "method=\"GET\"", "status=\"200\""],
    );
    assert_eq!(rest.len(), 1, "{scrape}");
    // Jobs and bytes.
    let failed = lines(
        &scrape,
        "sandbox_jobs_finished_total",
        &["backend=\"local\"", "state=\"failed\""],
    );
    assert!(value(failed[0]) >= 1.0, "{scrape}");
    let stdout = lines(
        &scrape,
        "sandbox_job_output_bytes_total",
        &["stream=\"stdout\""],
    );
    assert!(value(stdout[0]) >= 5.0, "{scrape}");
    assert!(!lines(&scrape, "sandbox_jobs_running", &[]).is_empty());
    assert!(!lines(&scrape, "sandbox_output_budget_bytes", &[]).is_empty());
    // No job id, task or command in any label.
    assert!(!scrape.contains("j1."), "a job id in a label");
    assert!(!scrape.contains("printf"), "a command in a label");
    server.stop().await;
}
