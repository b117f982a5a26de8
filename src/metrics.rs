//! Prometheus metrics on a port of their own (`--metrics-port`, off by default): `/metrics` in
//! the Prometheus text format. Every metric, with its labels (each from a fixed list):
//!
//! - Per RPC, under the names gRPC dashboards already query (go-grpc-prometheus), labelled
//!   `grpc_service`, `grpc_method`, `grpc_type`: `grpc_server_started_total`,
//!   `grpc_server_handled_total` (also `grpc_code`) and `grpc_server_handling_seconds` (to the
//!   end of the response: for a stream, to its last event). REST: `http_requests_total`
//!   (`route` template, `method`, `status`) and `http_request_duration_seconds`.
//! - Jobs (`backend`): `sandbox_jobs_started_total`, `sandbox_jobs_start_failed_total`,
//!   `sandbox_jobs_finished_total` (also `state`), `sandbox_job_start_seconds` (the backend's
//!   start), `sandbox_job_duration_seconds`, `sandbox_job_first_output_seconds`;
//!   `sandbox_job_output_bytes_total` (`stream`), `sandbox_job_stdin_bytes_total`,
//!   `sandbox_gaps_total` and `sandbox_gap_lost_bytes_total` (served to readers). Gauges:
//!   `sandbox_jobs_running`, `sandbox_jobs_max_concurrent`, `sandbox_attached_clients`
//!   (`kind`: `exec` callers, `attach` streams).
//! - Output budget: gauges `sandbox_output_budget_bytes`, `sandbox_output_budget_in_use_bytes`,
//!   `sandbox_output_retained_bytes`; by `waiter` (a `job`'s read, a `watcher`'s next event),
//!   `sandbox_output_budget_waits_total` (as each wait begins) and
//!   `sandbox_output_budget_wait_seconds` (as it ends).
//! - Connections: gauge `sandbox_connections_open`; `sandbox_connections_refused_total`
//!   (`reason`: `limit`, `evicted`, `handshake_timeout`, `idle`, `tls`).
//! - Mirror (`sink`): `sandbox_mirror_records_delivered_total`,
//!   `sandbox_mirror_delivered_bytes_total`, `sandbox_mirror_retries_total` (`ambiguous`:
//!   whether the ingest may have stored the record already), `sandbox_mirror_records_failed_total`
//!   (`reason`: `rejected`, `gave_up`), `sandbox_mirror_dropped_bytes_total`,
//!   `sandbox_mirror_delivery_lag_seconds` (output to accepted record); gauges
//!   `sandbox_mirror_queue_bytes` (queued or in flight) and `sandbox_mirror_healthy`.
//! - Daytona API: `sandbox_daytona_requests_total` (`operation`, `outcome`) and
//!   `sandbox_daytona_request_duration_seconds` (`operation`), per attempt.
//!
//! Gauges are read from the server when scraped, except `sandbox_connections_open`. Label
//! values never come from job ids, tasks, sandboxes or commands. The recorder is the
//! process's: servers started in one process (the tests) share it.

use std::{
    future::Future,
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::Instant,
};

use bytes::Bytes;
use http_body::Frame;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tonic::codegen::http;

use crate::{
    job::Jobs,
    response_watch::{ResponseWatch, WatchLayer, WatchRequests},
};

/// Buckets of every duration histogram, in seconds: a millisecond (a unary call) to an hour
/// (a long job or stream).
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Held from sampling a server's gauges to rendering them (see `serve`).
static SCRAPE_TURN: Mutex<()> = Mutex::new(());

/// The process's recorder, installed on first use (`None` if another recorder was installed
/// first, by an embedding program).
pub fn recorder() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

/// The `# HELP` of each counter (a metric shows once it has a value).
#[rustfmt::skip] // One metric a line.
const COUNTERS: &[(&str, &str)] = &[
    ("grpc_server_started_total", "RPCs started."),
    ("grpc_server_handled_total", "RPCs completed, by gRPC status code."),
    ("http_requests_total", "REST requests, by route template and status."),
    ("sandbox_jobs_started_total", "Jobs started."),
    ("sandbox_jobs_start_failed_total", "Jobs the backend could not start."),
    ("sandbox_jobs_finished_total", "Jobs finished, by final state."),
    ("sandbox_job_output_bytes_total", "Output bytes read from jobs."),
    ("sandbox_job_stdin_bytes_total", "Bytes written to jobs' stdin."),
    ("sandbox_gaps_total", "Gaps served to readers that fell behind."),
    ("sandbox_gap_lost_bytes_total", "Output bytes the served gaps skipped."),
    ("sandbox_output_budget_waits_total", "Waits for output budget begun."),
    ("sandbox_connections_refused_total", "Connections refused or closed by the server."),
    ("sandbox_mirror_records_delivered_total", "Records the mirror delivered."),
    ("sandbox_mirror_delivered_bytes_total", "Output bytes in delivered records."),
    ("sandbox_mirror_retries_total", "Record deliveries retried."),
    ("sandbox_mirror_records_failed_total", "Records refused or given up on."),
    ("sandbox_mirror_dropped_bytes_total", "Output bytes never to be mirrored."),
    ("sandbox_daytona_requests_total", "Daytona API requests, by outcome."),
];

#[rustfmt::skip]
const GAUGES: &[(&str, &str)] = &[
    ("sandbox_jobs_running", "Jobs whose program runs."),
    ("sandbox_jobs_max_concurrent", "Most jobs that may run at once."),
    ("sandbox_attached_clients", "Streams following jobs (Exec callers, Attach)."),
    ("sandbox_output_budget_bytes", "Shared output budget."),
    ("sandbox_output_budget_in_use_bytes", "Shared output budget in use."),
    ("sandbox_output_retained_bytes", "Output finished jobs keep, within the budget."),
    ("sandbox_connections_open", "Client connections open."),
    ("sandbox_mirror_queue_bytes", "Output bytes queued or in flight to the mirror."),
    ("sandbox_mirror_healthy", "1 while the mirror's deliveries succeed."),
];

#[rustfmt::skip]
const HISTOGRAMS: &[(&str, &str)] = &[
    ("grpc_server_handling_seconds", "RPC time to the end of the response."),
    ("http_request_duration_seconds", "REST time to the end of the response."),
    ("sandbox_job_start_seconds", "Time the backend took to start a job."),
    ("sandbox_job_duration_seconds", "Job run time."),
    ("sandbox_job_first_output_seconds", "Time from start to first output."),
    ("sandbox_output_budget_wait_seconds", "Waits for output budget ended."),
    ("sandbox_mirror_delivery_lag_seconds", "Time from output to delivered record."),
    ("sandbox_daytona_request_duration_seconds", "Daytona API request time."),
];

fn describe() {
    for &(name, help) in COUNTERS {
        metrics::describe_counter!(name, help);
    }
    for &(name, help) in GAUGES {
        metrics::describe_gauge!(name, help);
    }
    for &(name, help) in HISTOGRAMS {
        metrics::describe_histogram!(name, help);
    }
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    handle: PrometheusHandle,
    jobs: Arc<Jobs>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (handle, jobs) = (handle.clone(), Arc::clone(&jobs));
            async move {
                // The gauges are the process's: servers sharing it (the tests, an embedding
                // program) take turns, so each scrape shows its own server's values.
                let text = {
                    let _turn = SCRAPE_TURN.lock().unwrap_or_else(PoisonError::into_inner);
                    sample(&jobs);
                    handle.run_upkeep();
                    handle.render()
                };
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Gauges read from the server when scraped.
fn sample(jobs: &Jobs) {
    metrics::gauge!("sandbox_jobs_running").set(jobs.active() as f64);
    metrics::gauge!("sandbox_jobs_max_concurrent").set(f64::from(jobs.max_concurrent()));
    let budget = jobs.output_budget();
    metrics::gauge!("sandbox_output_budget_in_use_bytes").set(budget.shared_in_use() as f64);
    metrics::gauge!("sandbox_output_budget_bytes").set(budget.shared_bytes() as f64);
    metrics::gauge!("sandbox_output_retained_bytes").set(budget.retained_bytes() as f64);
    let attached = jobs.attached();
    metrics::gauge!("sandbox_attached_clients", "kind" => "exec").set(attached.exec as f64);
    metrics::gauge!("sandbox_attached_clients", "kind" => "attach").set(attached.attach as f64);
    for sink in jobs.sinks().iter() {
        let healthy = if sink.health().healthy { 1.0 } else { 0.0 };
        metrics::gauge!("sandbox_mirror_healthy", "sink" => sink.name()).set(healthy);
        if let Some(bytes) = sink.pending_bytes() {
            metrics::gauge!("sandbox_mirror_queue_bytes", "sink" => sink.name()).set(bytes as f64);
        }
    }
}

/// gRPC methods by service, the only values their labels take.
const GRPC_METHODS: &[(&str, &[(&str, &str)])] = &[
    (
        "sandbox.v1.SandboxService",
        &[
            ("Exec", "server_stream"),
            ("Attach", "bidi_stream"),
            ("SendInput", "unary"),
            ("CloseInput", "unary"),
            ("Signal", "unary"),
            ("Resize", "unary"),
            ("ListJobs", "unary"),
            ("Cancel", "unary"),
            ("Status", "unary"),
            ("Health", "unary"),
        ],
    ),
    (
        "grpc.health.v1.Health",
        &[("Check", "unary"), ("Watch", "server_stream")],
    ),
    (
        "grpc.reflection.v1.ServerReflection",
        &[("ServerReflectionInfo", "bidi_stream")],
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        &[("ServerReflectionInfo", "bidi_stream")],
    ),
];

/// REST route templates (`rest`), the only values of `route`.
const REST_ROUTES: &[&str] = &[
    "/v1/exec",
    "/v1/cancel",
    "/v1/status/{job_id}",
    "/v1/jobs/{job_id}/events",
    "/health",
];

/// What a request is, for its labels.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Grpc {
        service: &'static str,
        method: &'static str,
        kind: &'static str,
    },
    Http {
        route: &'static str,
        method: &'static str,
    },
}

fn classify<B>(request: &http::Request<B>) -> Call {
    let path = request.uri().path();
    let is_grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if is_grpc {
        let known = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .and_then(|(service, method)| {
                let (service, methods) = GRPC_METHODS.iter().find(|(s, _)| *s == service)?;
                let (method, kind) = methods.iter().find(|(m, _)| *m == method)?;
                Some((*service, *method, *kind))
            });
        let (service, method, kind) = known.unwrap_or(("unknown", "unknown", "unknown"));
        return Call::Grpc {
            service,
            method,
            kind,
        };
    }
    let route = REST_ROUTES
        .iter()
        .find(|template| route_matches(template, path))
        .copied()
        .unwrap_or("unknown");
    let method = match *request.method() {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::HEAD => "HEAD",
        _ => "other",
    };
    Call::Http { route, method }
}

/// Whether `path` is an instance of `template` (`{name}` matches one segment).
fn route_matches(template: &str, path: &str) -> bool {
    let (mut t, mut p) = (template.split('/'), path.split('/'));
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(t), Some(p)) if t.starts_with('{') && !p.is_empty() => {}
            (Some(t), Some(p)) if t == p => {}
            _ => return false,
        }
    }
}

/// Records every request's metrics (see the module).
pub type RpcMetricsLayer = WatchLayer<Metering>;

/// Starts each call's metrics; its [`CallEnd`] records the rest.
#[derive(Debug, Clone, Copy, Default)]
pub struct Metering;

impl WatchRequests for Metering {
    type Watch = CallEnd;

    fn watch<B>(&self, request: &http::Request<B>) -> CallEnd {
        let call = classify(request);
        if let Call::Grpc {
            service,
            method,
            kind,
        } = &call
        {
            metrics::counter!(
                "grpc_server_started_total",
                "grpc_service" => *service, "grpc_method" => *method, "grpc_type" => *kind
            )
            .increment(1);
        }
        CallEnd {
            call,
            started: Instant::now(),
            status: 0,
            grpc_code: None,
        }
    }
}

/// What a call's end records: when the response ends (or is dropped: the client went away).
pub struct CallEnd {
    call: Call,
    started: Instant,
    status: u16,
    grpc_code: Option<i32>,
}

/// The `grpc-status` of a header map (response headers, or trailers).
fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

impl ResponseWatch for CallEnd {
    fn head(&mut self, status: http::StatusCode, headers: &http::HeaderMap) {
        self.status = status.as_u16();
        // A trailers-only answer (an error before any message) has it in its headers.
        self.grpc_code = grpc_status(headers);
    }

    fn frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
            self.grpc_code = Some(code);
        }
    }

    fn end(&mut self) {
        let seconds = self.started.elapsed().as_secs_f64();
        match &self.call {
            Call::Grpc {
                service,
                method,
                kind,
            } => {
                // No grpc-status at all: the stream was cut short (the client left).
                let code = self
                    .grpc_code
                    .map_or(tonic::Code::Cancelled, tonic::Code::from_i32);
                metrics::counter!(
                    "grpc_server_handled_total",
                    "grpc_service" => *service, "grpc_method" => *method, "grpc_type" => *kind,
                    "grpc_code" => code_name(code)
                )
                .increment(1);
                metrics::histogram!(
                    "grpc_server_handling_seconds",
                    "grpc_service" => *service, "grpc_method" => *method, "grpc_type" => *kind
                )
                .record(seconds);
            }
            Call::Http { route, method } => {
                let status = match self.status {
                    200 => "200",
                    204 => "204",
                    400 => "400",
                    401 => "401",
                    404 => "404",
                    405 => "405",
                    503 => "503",
                    s if s < 500 => "4xx",
                    _ => "5xx",
                };
                metrics::counter!(
                    "http_requests_total",
                    "route" => *route, "method" => *method, "status" => status
                )
                .increment(1);
                metrics::histogram!(
                    "http_request_duration_seconds",
                    "route" => *route, "method" => *method
                )
                .record(seconds);
            }
        }
    }
}

/// go-grpc-prometheus's spelling of the codes.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_doc_lists_every_metric() {
        let doc: String = include_str!("metrics.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//!"))
            .collect();
        for (name, _) in COUNTERS.iter().chain(GAUGES).chain(HISTOGRAMS) {
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} is not in the doc"
            );
        }
    }

    fn request(path: &str, grpc: bool) -> http::Request<()> {
        let mut builder = http::Request::builder().uri(path).method("POST");
        if grpc {
            builder = builder.header("content-type", "application/grpc");
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn labels_come_from_fixed_lists() {
        assert_eq!(
            classify(&request("/sandbox.v1.SandboxService/Exec", true)),
            Call::Grpc {
                service: "sandbox.v1.SandboxService",
                method: "Exec",
                kind: "server_stream"
            }
        );
        // A made-up path does not make a label value of its own.
        assert_eq!(
            classify(&request("/sandbox.v1.SandboxService/Nope123", true)),
            Call::Grpc {
                service: "unknown",
                method: "unknown",
                kind: "unknown"
            }
        );
        assert_eq!(
            classify(&request("/v1/status/j1.abc.def", false)),
            Call::Http {
                route: "/v1/status/{job_id}",
                method: "POST"
            }
        );
        assert_eq!(
            classify(&request("/v1/status/", false)),
            Call::Http {
                route: "unknown",
                method: "POST"
            }
        );
        assert_eq!(
            classify(&request("/random/path/42", false)),
            Call::Http {
                route: "unknown",
                method: "POST"
            }
        );
    }
}
