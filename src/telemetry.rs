//! Logs and traces.
//!
//! - Logs: human-readable lines by default, JSON on request; `RUST_LOG` filters.
//! - Traces: when the standard OpenTelemetry variables ask for them
//!   (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, unless
//!   `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`), the service's `info` spans are
//!   exported over OTLP (`http/protobuf` by default, `grpc` by `OTEL_EXPORTER_OTLP_PROTOCOL`),
//!   batched: one span per request (continuing the caller's W3C `traceparent`), per job, per
//!   Daytona API call and per mirror delivery. The exporter reads the other `OTEL_*` variables
//!   itself (headers, timeout, sampler, batch sizes, resource attributes). Unset, nothing is
//!   installed: spans cost what they cost for the logs alone.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use opentelemetry::{propagation::TextMapPropagator, trace::TracerProvider as _};
use opentelemetry_http::{HeaderExtractor, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    propagation::TraceContextPropagator,
    trace::{SdkTracerProvider, SpanData, SpanExporter},
};
use tonic::codegen::http;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer, filter::Targets, fmt, layer::SubscriberExt, util::SubscriberInitExt,
};

use crate::config::LogFormat;

/// Set once traces are exported: only then is a caller's trace context read.
static TRACING: OnceLock<()> = OnceLock::new();

/// Keeps the trace exporter; [`Telemetry::shutdown`] sends what is still batched.
#[must_use = "dropping it stops nothing, but shutdown() flushes the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes and stops the trace exporter (bounded by the SDK's timeout).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // Blocking: the batch processor's thread hands its last batch to the exporter,
            // which runs on this runtime.
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// Installs the global subscriber (logs to stderr; traces when the environment asks). Call it
/// from within the Tokio runtime.
pub fn init(format: LogFormat) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Human => logs.boxed(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    let (provider, problem) = match otlp_requested() {
        false => (None, None),
        true => match tracer_provider() {
            Ok(provider) => (Some(provider), None),
            Err(e) => (None, Some(e)),
        },
    };
    // The service's own spans, whatever RUST_LOG shows.
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("sandbox-runner"))
            .with_filter(Targets::new().with_target("sandbox_runner", tracing::Level::INFO))
    });
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(traces)
        .init();
    match (&provider, problem) {
        (Some(_), _) => {
            let _ = TRACING.set(());
            tracing::info!(protocol = protocol().as_str(), "exporting traces over OTLP");
        }
        (None, Some(e)) => tracing::error!(error = %e, "cannot export traces; going on without"),
        (None, None) => {}
    }
    Telemetry { provider }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// An exporter setting for traces: `OTEL_EXPORTER_OTLP_TRACES_<name>`, else the one for every
/// signal, `OTEL_EXPORTER_OTLP_<name>` (the specification's precedence).
fn traces_setting(name: &str) -> Option<String> {
    env(&format!("OTEL_EXPORTER_OTLP_TRACES_{name}"))
        .or_else(|| env(&format!("OTEL_EXPORTER_OTLP_{name}")))
}

/// Whether the environment asks for OTLP traces.
fn otlp_requested() -> bool {
    let endpoint = traces_setting("ENDPOINT").is_some();
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let no_exporter = env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"));
    endpoint && !disabled && !no_exporter
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    HttpProtobuf,
    Grpc,
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::HttpProtobuf => "http/protobuf",
            Protocol::Grpc => "grpc",
        }
    }
}

/// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`, else the
/// specification's default, `http/protobuf`.
fn protocol() -> Protocol {
    match traces_setting("PROTOCOL").as_deref() {
        Some("grpc") => Protocol::Grpc,
        _ => Protocol::HttpProtobuf,
    }
}

/// Why traces cannot be exported.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
struct ExporterError(#[from] opentelemetry_otlp::ExporterBuildError);

fn tracer_provider() -> Result<SdkTracerProvider, ExporterError> {
    if let Some(asked) = traces_setting("PROTOCOL").filter(|p| p != "grpc" && p != "http/protobuf")
    {
        tracing::warn!(protocol = %asked, "unsupported OTLP protocol; using http/protobuf");
    }
    let runtime = tokio::runtime::Handle::current();
    let exporter = match protocol() {
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_http_client(Reqwest(otlp_http_client()))
            .build()?,
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_protocol(opentelemetry_otlp::Protocol::Grpc)
            .build()?,
    };
    let mut resource = Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("sandbox-runner");
    }
    let resource = resource
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime {
            exporter: Arc::new(exporter),
            runtime,
        })
        .with_resource(resource)
        .build())
}

fn otlp_http_client() -> reqwest::Client {
    crate::tls::install_crypto_provider();
    // The client enforces the export timeout (the exporter leaves it to the client).
    let timeout_ms = traces_setting("TIMEOUT")
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(10_000);
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(timeout_ms))
        .build()
        .unwrap_or_default()
}

/// Continues the caller's trace (W3C `traceparent`/`tracestate` in these headers) in `span`,
/// when traces are exported.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if TRACING.get().is_none() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(parent);
}

/// An exporter run on the service's Tokio runtime: the SDK's batch processor calls it from a
/// thread of its own, and the HTTP and gRPC clients need the runtime's reactor.
#[derive(Debug)]
struct OnRuntime<E> {
    exporter: Arc<E>,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let exporter = Arc::clone(&self.exporter);
        match self
            .runtime
            .spawn(async move { exporter.export(batch).await })
            .await
        {
            Ok(result) => result,
            Err(e) => Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                e.to_string(),
            )),
        }
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.exporter.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.exporter.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Called while building the provider, before any export shares the exporter.
        if let Some(exporter) = Arc::get_mut(&mut self.exporter) {
            exporter.set_resource(resource);
        }
    }
}

/// The OTLP/HTTP exporter's client: the service's reqwest (with its one TLS provider), not a
/// second HTTP stack.
struct Reqwest(reqwest::Client);

impl std::fmt::Debug for Reqwest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reqwest")
    }
}

/// Larger OTLP answers are not read (they carry at most a partial-success message).
const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[async_trait::async_trait]
impl HttpClient for Reqwest {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let mut response = self.0.execute(request).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                break;
            }
            body.extend_from_slice(&chunk);
        }
        let mut answer = http::Response::new(Bytes::from(body));
        *answer.status_mut() = status;
        *answer.headers_mut() = headers;
        Ok(answer)
    }
}
