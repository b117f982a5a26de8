//! Traces over OTLP: the binary, given the standard OpenTelemetry variables, exports a span per
//! request and per job to an in-process OTLP/HTTP receiver; a caller's W3C `traceparent`
//! (gRPC metadata or a REST header) is continued; jobs' spans carry their ids and final state.
//! Loopback only; every wait is bounded.

mod common;

use std::time::{Duration, Instant};

use common::{JobState, shell};
use sandbox_runner::{
    proto::sandbox_service_client::SandboxServiceClient,
    testing::{
        otlp::{OtlpReceiver, ReceivedSpan},
        server_process::ServerProcess,
    },
};
use tonic::Request;

const BIN: &str = env!("CARGO_BIN_EXE_sandbox-runner");
/// Upper bound of the wait for spans to arrive.
const PATIENCE: Duration = Duration::from_secs(30);

/// The binary exporting to `receiver`, batching for 100 ms.
async fn traced_server(receiver: &OtlpReceiver, extra_env: &[(&str, &str)]) -> ServerProcess {
    let mut envs = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    envs.extend_from_slice(extra_env);
    ServerProcess::start(BIN, &[], &envs).await.unwrap()
}

/// Waits (bounded) until `found` picks what it needs from the spans received.
async fn wait_for<T>(
    receiver: &OtlpReceiver,
    mut found: impl FnMut(&[ReceivedSpan]) -> Option<T>,
) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(result) = found(&receiver.spans()) {
            return result;
        }
        assert!(
            Instant::now() < deadline,
            "spans never arrived; received: {:#?}",
            receiver
                .spans()
                .iter()
                .map(|s| (&s.span.name, s.trace_id()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn named<'a>(spans: &'a [ReceivedSpan], trace: &str, name: &str) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.trace_id() == trace && s.span.name == name)
}

/// Runs `request` through Exec with a `traceparent` of `trace` (parent span `parent`), to its
/// end.
async fn traced_exec(
    client: &mut SandboxServiceClient<tonic::transport::Channel>,
    trace: &str,
    parent: &str,
    request: sandbox_runner::proto::ExecRequest,
) -> common::Run {
    let mut request = Request::new(request);
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{parent}-01").parse().unwrap(),
    );
    let stream = client.exec(request).await.unwrap().into_inner();
    let run = common::Job::from_stream(stream).await.finish().await;
    assert_eq!(run.state(), JobState::Succeeded);
    run
}

const SPAN_KIND_SERVER: i32 = 2;
const STATUS_CODE_ERROR: i32 = 2;

#[tokio::test]
async fn requests_and_jobs_are_spans_continuing_the_callers_trace() {
    let receiver = OtlpReceiver::start().await.unwrap();
    let server = traced_server(&receiver, &[]).await;
    let mut client = SandboxServiceClient::new(server.channel().await.unwrap());

    // gRPC: Exec with the caller's trace context in its metadata.
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let run = traced_exec(&mut client, trace, parent, shell("echo traced")).await;

    let (rpc, job) = wait_for(&receiver, |spans| {
        let rpc = named(spans, trace, "sandbox.v1.SandboxService/Exec")?;
        let job = named(spans, trace, "job")?;
        Some((rpc.clone(), job.clone()))
    })
    .await;
    assert_eq!(
        rpc.parent_span_id(),
        parent,
        "the RPC continues the caller's span"
    );
    assert_eq!(rpc.span.kind, SPAN_KIND_SERVER);
    assert_eq!(rpc.attribute("rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        rpc.attribute("rpc.service").as_deref(),
        Some("sandbox.v1.SandboxService")
    );
    assert_eq!(rpc.attribute("rpc.method").as_deref(), Some("Exec"));
    assert_eq!(rpc.service, "sandbox-runner");
    assert_eq!(
        job.parent_span_id(),
        rpc.span_id(),
        "the job is the RPC's child"
    );
    assert_eq!(job.attribute("id").as_deref(), Some(run.job_id.as_str()));
    assert_eq!(job.attribute("backend").as_deref(), Some("local"));
    assert_eq!(job.attribute("state").as_deref(), Some("succeeded"));
    assert_eq!(job.attribute("exit_code").as_deref(), Some("0"));
    for key in ["task_id", "session_id", "sandbox_id"] {
        assert!(job.attribute(key).is_some(), "job span without {key}");
    }
    // The job's span lasts as long as the job (it started before and ended after its output).
    assert!(job.span.end_time_unix_nano > job.span.start_time_unix_nano);

    // REST: a detached job with the trace context in the header; a failed job is an error span.
    let rest_trace = "0af7651916cd43dd8448eb211c80319c";
    sandbox_runner::tls::install_crypto_provider();
    let http = reqwest::Client::new();
    let started: serde_json::Value = http
        .post(format!("{}/v1/exec", server.url()))
        .header(
            "traceparent",
            format!("00-{rest_trace}-b7ad6b7169203331-01"),
        )
        .json(&serde_json::json!({"command": "exit 3", "sandboxId": "local"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job_id = started["jobId"].as_str().unwrap().to_owned();
    let (rest, rest_job) = wait_for(&receiver, |spans| {
        let rest = named(spans, rest_trace, "POST")?;
        let job = spans.iter().find(|s| {
            s.trace_id() == rest_trace && s.span.name == "job" && s.attribute("state").is_some()
        })?;
        Some((rest.clone(), job.clone()))
    })
    .await;
    assert_eq!(rest.parent_span_id(), "b7ad6b7169203331");
    assert_eq!(rest.attribute("url.path").as_deref(), Some("/v1/exec"));
    assert_eq!(rest_job.attribute("id").as_deref(), Some(job_id.as_str()));
    assert_eq!(rest_job.attribute("state").as_deref(), Some("failed"));
    assert_eq!(rest_job.attribute("exit_code").as_deref(), Some("3"));
    assert_eq!(
        rest_job.span.status.as_ref().map(|s| s.code),
        Some(STATUS_CODE_ERROR)
    );

    // Without a traceparent, a request starts a trace of its own.
    client
        .health(sandbox_runner::proto::HealthRequest {})
        .await
        .unwrap();
    let health = wait_for(&receiver, |spans| {
        spans
            .iter()
            .find(|s| s.span.name == "sandbox.v1.SandboxService/Health")
            .cloned()
    })
    .await;
    assert_eq!(health.parent_span_id(), "", "a root span");
    assert_ne!(health.trace_id(), trace);
}

#[tokio::test]
async fn an_unreachable_or_refusing_collector_costs_the_service_nothing() {
    let receiver = OtlpReceiver::start().await.unwrap();
    receiver.refuse_next(u64::MAX);
    let server = traced_server(&receiver, &[]).await;
    let mut client = SandboxServiceClient::new(server.channel().await.unwrap());
    for _ in 0..3 {
        let run = common::run(&mut client, shell("echo still-served")).await;
        assert_eq!(run.stdout, b"still-served\n");
    }
    // The exporter did try (and was refused).
    let deadline = Instant::now() + PATIENCE;
    while receiver.requests() == 0 {
        assert!(Instant::now() < deadline, "no export was attempted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(receiver.spans().is_empty());

    // Pointed at a closed port, the service runs as well.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let server = ServerProcess::start(BIN, &[], &[("OTEL_EXPORTER_OTLP_ENDPOINT", &closed)])
        .await
        .unwrap();
    let mut client = SandboxServiceClient::new(server.channel().await.unwrap());
    let run = common::run(&mut client, shell("echo no-collector")).await;
    assert_eq!(run.stdout, b"no-collector\n");
}

#[tokio::test]
async fn no_otel_variables_no_export() {
    let receiver = OtlpReceiver::start().await.unwrap();
    // The endpoint is set but the SDK is disabled, the way the specification says.
    let server = traced_server(&receiver, &[("OTEL_SDK_DISABLED", "true")]).await;
    let mut client = SandboxServiceClient::new(server.channel().await.unwrap());
    let run = common::run(&mut client, shell("echo untraced")).await;
    assert_eq!(run.state(), JobState::Succeeded);
    // Longer than the batch delay (100 ms) many times over.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.requests(), 0);
}

/// The chain of parents from `span` up, by name (the span's own name first).
fn ancestry(spans: &[ReceivedSpan], span: &ReceivedSpan) -> Vec<String> {
    let mut names = vec![span.span.name.clone()];
    let mut parent = span.parent_span_id();
    // Bounded: a trace is not deeper than the spans received.
    for _ in 0..spans.len() {
        let Some(next) = spans.iter().find(|s| s.span_id() == parent) else {
            break;
        };
        names.push(next.span.name.clone());
        parent = next.parent_span_id();
    }
    names
}

#[tokio::test]
async fn mirror_deliveries_are_children_of_their_job() {
    use sandbox_runner::testing::convex_ingest::FakeIngest;
    let receiver = OtlpReceiver::start().await.unwrap();
    let ingest = FakeIngest::start("ingest-secret").await;
    let site_url = ingest.site_url();
    let server = traced_server(
        &receiver,
        &[
            ("CONVEX_SITE_URL", &site_url),
            ("CONVEX_INGEST_SECRET", "ingest-secret"),
        ],
    )
    .await;
    let mut client = SandboxServiceClient::new(server.channel().await.unwrap());
    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let request = sandbox_runner::proto::ExecRequest {
        task_id: "task-traced".into(),
        session_id: "session-traced".into(),
        ..shell("echo mirrored")
    };
    traced_exec(&mut client, trace, "00f067aa0ba902b7", request).await;

    // The echo line, the output and the final record: each a delivery span under the job.
    let deliveries = wait_for(&receiver, |spans| {
        let deliveries: Vec<_> = spans
            .iter()
            .filter(|s| s.trace_id() == trace && s.span.name == "convex.deliver")
            .cloned()
            .collect();
        (deliveries.len() >= 3).then_some(deliveries)
    })
    .await;
    let spans = receiver.spans();
    for delivery in &deliveries {
        assert_eq!(delivery.attribute("outcome").as_deref(), Some("delivered"));
        assert_eq!(delivery.attribute("retries").as_deref(), Some("0"));
        let chain = ancestry(&spans, delivery);
        assert_eq!(
            chain,
            [
                "convex.deliver",
                "convex_mirror",
                "job",
                "sandbox.v1.SandboxService/Exec"
            ]
        );
    }
}

#[tokio::test]
async fn daytona_api_calls_are_children_of_their_job() {
    use sandbox_runner::testing::daytona::FakeDaytona;
    let receiver = OtlpReceiver::start().await.unwrap();
    let daytona = FakeDaytona::start(common::DAYTONA_KEY).await;
    daytona.add_sandbox("sbx-traced", "started");
    let server = traced_server(
        &receiver,
        &[
            ("SANDBOX_BACKEND", "daytona"),
            ("DAYTONA_API_KEY", common::DAYTONA_KEY),
            ("DAYTONA_API_URL", &daytona.api_url),
            ("DAYTONA_POLL_INTERVAL", "50ms"),
        ],
    )
    .await;
    let mut client = SandboxServiceClient::new(server.channel().await.unwrap());
    let trace = "6bf92f3577b34da6a3ce929d0e0e4736";
    let request = sandbox_runner::proto::ExecRequest {
        sandbox_id: "sbx-traced".into(),
        ..shell("echo in-daytona")
    };
    let run = traced_exec(&mut client, trace, "00f067aa0ba902b7", request).await;
    assert_eq!(run.stdout, b"in-daytona\n");

    // Creating the session and running the command happen under the job's span; so does the
    // session's deletion at the end.
    let calls = wait_for(&receiver, |spans| {
        let job = named(spans, trace, "job")?;
        job.attribute("state")?;
        let calls: Vec<_> = spans
            .iter()
            .filter(|s| s.trace_id() == trace && s.span.name.starts_with("daytona "))
            .cloned()
            .collect();
        let has = |op: &str| calls.iter().any(|c| c.span.name == format!("daytona {op}"));
        (has("create_session") && has("exec") && has("delete_session")).then_some(calls)
    })
    .await;
    let spans = receiver.spans();
    let job = named(&spans, trace, "job").unwrap();
    assert_eq!(job.attribute("backend").as_deref(), Some("daytona"));
    assert_eq!(job.attribute("sandbox_id").as_deref(), Some("sbx-traced"));
    for call in &calls {
        assert!(
            ancestry(&spans, call).contains(&"job".to_owned()),
            "{} is not under the job",
            call.span.name
        );
        assert_eq!(call.span.kind, 3, "{}: a client span", call.span.name);
        assert!(call.attribute("outcome").is_some());
    }
}
