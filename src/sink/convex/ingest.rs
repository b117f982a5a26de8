//! HTTP delivery to the deployed `/daytona-ingest` route: the record's JSON shape, one POST per
//! record, and the retry policy. The server is not ours to change: one record per POST, no
//! sequence numbers, no dedupe (see research/convex-ingest.md section 1).

use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::{
    StatusCode, Url,
    header::{CONTENT_TYPE, RETRY_AFTER},
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    config::ConvexSettings,
    record::{End, Item},
};
use crate::{
    job::{JobMeta, StreamKind},
    secrets::SecretHeader,
};

/// First retry delay; doubled per attempt up to [`BACKOFF_MAX`], with jitter.
const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Most a `Retry-After` header may make us wait.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest error text from the server kept for logs and Status.
const MAX_REASON: usize = 200;
/// Requests in flight to Convex at once, over all jobs: Convex runs at most 64 HTTP actions and
/// 16 mutations at once on its smaller plans, and each request here is one of each.
const MAX_IN_FLIGHT: usize = 16;

/// One record exactly as the ingest route reads it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Record<'a> {
    pub task_id: &'a str,
    pub session_id: &'a str,
    pub sandbox_id: &'a str,
    pub stream: &'static str,
    pub data: &'a str,
    /// Epoch milliseconds; Convex orders a task's rows by it.
    pub ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub done: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

/// Text of the marker that stands where output was dropped.
pub(crate) fn gap_marker(bytes: u64) -> String {
    format!("\n[... {bytes} bytes not mirrored ...]\n")
}

/// The JSON body for one queued item.
pub(crate) fn encode(meta: &JobMeta, item: &Item) -> Bytes {
    let marker;
    let mut record = Record {
        task_id: &meta.task_id,
        session_id: &meta.session_id,
        sandbox_id: &meta.sandbox_id,
        stream: "meta",
        data: "",
        ts: 0,
        done: None,
        exit_code: None,
        error: None,
    };
    match item {
        Item::Text {
            stream, text, ts, ..
        } => {
            record.stream = stream.as_str();
            record.data = text;
            record.ts = *ts;
        }
        // Diagnostic, so on stderr: the web terminal shows it, and stdout stays the program's.
        Item::Gap { bytes, ts } => {
            marker = gap_marker(*bytes);
            record.stream = StreamKind::Stderr.as_str();
            record.data = &marker;
            record.ts = *ts;
        }
        Item::Final { end, ts } => {
            record.done = Some(true);
            record.ts = *ts;
            match end {
                End::ExitCode(code) => record.exit_code = Some(*code),
                End::Error(message) => record.error = Some(message),
            }
        }
    }
    Bytes::from(serde_json::to_vec(&record).expect("a record always serializes"))
}

/// How sending one record ended.
#[derive(Debug)]
pub(crate) enum SendOutcome {
    Delivered,
    /// The server refused it (400, 401, ...); sending it again would not help.
    Rejected {
        status: u16,
        reason: String,
    },
    /// Still failing when the retry time ran out.
    GaveUp {
        reason: String,
    },
}

/// The ingest route and how to reach it.
pub(crate) struct Ingest {
    http: reqwest::Client,
    url: Url,
    /// Read per request: a rotated secret is sent from the next request on.
    secret: SecretHeader,
    retry_for: Duration,
    in_flight: tokio::sync::Semaphore,
}

/// The HTTP client cannot be built (e.g. no usable TLS roots).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client for Convex: {0}")]
pub struct ClientError(String);

impl Ingest {
    pub(crate) fn new(settings: &ConvexSettings) -> Result<Self, ClientError> {
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .user_agent(concat!("sandbox-runner/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(settings.request_timeout)
            .build()
            .map_err(|e| ClientError(error_chain(&e)))?;
        Ok(Ingest {
            http,
            url: settings.ingest_url.clone(),
            secret: settings.secret.clone(),
            retry_for: settings.retry_for,
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
        })
    }

    /// POSTs one record, retrying transient failures with jittered exponential backoff for up
    /// to the retry time. `on_retry(ambiguous, reason)` is called before each retry; `ambiguous`
    /// means the server may have stored the record already (a timeout or a broken response), so
    /// the retry can duplicate its row. Once `retry_now` is cancelled, the next backoff ends at
    /// once (one per record, so a struggling ingest is not hammered).
    pub(crate) async fn send(
        &self,
        body: Bytes,
        retry_now: &CancellationToken,
        mut on_retry: impl FnMut(bool, &str),
    ) -> SendOutcome {
        // One span per record, its retries included (a child of the job's mirror span).
        let span = tracing::info_span!(
            "convex.deliver",
            otel.kind = "client",
            bytes = body.len(),
            retries = tracing::field::Empty,
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let mut retries = 0u32;
        let outcome = self
            .send_with_retries(body, retry_now, |ambiguous, reason| {
                retries += 1;
                on_retry(ambiguous, reason);
            })
            .instrument(span.clone())
            .await;
        span.record("retries", retries);
        let name = match &outcome {
            SendOutcome::Delivered => "delivered",
            SendOutcome::Rejected { .. } => "rejected",
            SendOutcome::GaveUp { .. } => "gave_up",
        };
        span.record("outcome", name);
        if name != "delivered" {
            span.record("otel.status_code", "ERROR");
        }
        outcome
    }

    async fn send_with_retries(
        &self,
        body: Bytes,
        retry_now: &CancellationToken,
        mut on_retry: impl FnMut(bool, &str),
    ) -> SendOutcome {
        let started = Instant::now();
        let mut backoff = BACKOFF_START;
        let mut hurried = false;
        loop {
            let (reason, ambiguous, retry_after) = match self.post(body.clone()).await {
                Attempt::Done => return SendOutcome::Delivered,
                Attempt::Refused { status, reason } => {
                    return SendOutcome::Rejected { status, reason };
                }
                Attempt::Retry {
                    reason,
                    ambiguous,
                    retry_after,
                } => (reason, ambiguous, retry_after),
            };
            // Full jitter over the upper half, so many jobs retrying at once spread out.
            let jittered = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
            let delay = retry_after.map_or(jittered, |ra| ra.min(RETRY_AFTER_MAX).max(jittered));
            if started.elapsed() + delay > self.retry_for {
                return SendOutcome::GaveUp {
                    reason: format!(
                        "still failing after {}: {reason}",
                        humantime::format_duration(round_ms(started.elapsed()))
                    ),
                };
            }
            on_retry(ambiguous, &reason);
            if hurried {
                tokio::time::sleep(delay).await;
            } else {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = retry_now.cancelled() => hurried = true,
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn post(&self, body: Bytes) -> Attempt {
        let _permit = self.in_flight.acquire().await.expect("never closed");
        let response = self
            .http
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("x-ingest-secret", self.secret.get())
            .body(body)
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                return Attempt::Retry {
                    // A connect error means nothing reached the server: safe to resend.
                    ambiguous: !e.is_connect(),
                    reason: error_chain(&e),
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Read the body so the connection can be reused, and to explain failures.
        let text = response.text().await.unwrap_or_default();
        if status.is_success() {
            return Attempt::Done;
        }
        let reason = describe(status, &text);
        match status {
            StatusCode::REQUEST_TIMEOUT
            | StatusCode::TOO_MANY_REQUESTS
            | StatusCode::INTERNAL_SERVER_ERROR
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => Attempt::Retry {
                reason,
                // A 500 can come from a mutation that failed after another one succeeded; the
                // deployed route writes one row per request, so a 500 means it did not write.
                ambiguous: false,
                retry_after,
            },
            _ => Attempt::Refused {
                status: status.as_u16(),
                reason,
            },
        }
    }
}

enum Attempt {
    Done,
    Refused {
        status: u16,
        reason: String,
    },
    Retry {
        reason: String,
        ambiguous: bool,
        retry_after: Option<Duration>,
    },
}

/// "HTTP 401 Unauthorized: <the server's error message>", short.
fn describe(status: StatusCode, body: &str) -> String {
    let detail = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let error = v.get("error")?.as_str()?.to_owned();
            Some(match v.get("details").and_then(|d| d.as_str()) {
                Some(details) => format!("{error} ({details})"),
                None => error,
            })
        })
        .unwrap_or_else(|| body.trim().to_owned());
    let mut reason = format!("HTTP {status}");
    if status == StatusCode::UNAUTHORIZED {
        reason.push_str(" (check CONVEX_INGEST_SECRET)");
    } else if status == StatusCode::SERVICE_UNAVAILABLE {
        reason.push_str(" (is ENABLE_DAYTONA_TERMINAL on in the Convex deployment?)");
    }
    if !detail.is_empty() {
        reason.push_str(": ");
        reason.push_str(&detail[..detail.floor_char_boundary(MAX_REASON)]);
    }
    reason
}

/// An error with its causes, e.g. "error sending request: connection refused".
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> JobMeta {
        JobMeta {
            task_id: "t1".into(),
            session_id: "s1".into(),
            sandbox_id: String::new(),
        }
    }

    fn json(item: &Item) -> serde_json::Value {
        serde_json::from_slice(&encode(&meta(), item)).unwrap()
    }

    #[test]
    fn records_have_the_deployed_shape() {
        let text = Item::Text {
            stream: StreamKind::Stderr,
            text: "oops\n".into(),
            ts: 1700000000123,
        };
        assert_eq!(
            json(&text),
            serde_json::json!({"taskId":"t1","sessionId":"s1","sandboxId":"","stream":"stderr",
                               "data":"oops\n","ts":1700000000123u64})
        );
        let done = Item::Final {
            end: End::ExitCode(3),
            ts: 5,
        };
        assert_eq!(
            json(&done),
            serde_json::json!({"taskId":"t1","sessionId":"s1","sandboxId":"","stream":"meta",
                               "data":"","ts":5,"done":true,"exitCode":3})
        );
        let failed = Item::Final {
            end: End::Error("timed out after 1s".into()),
            ts: 5,
        };
        assert_eq!(json(&failed)["error"], "timed out after 1s");
        assert!(json(&failed).get("exitCode").is_none());
        let gap = json(&Item::Gap { bytes: 42, ts: 7 });
        assert_eq!(gap["stream"], "stderr");
        assert_eq!(gap["data"], "\n[... 42 bytes not mirrored ...]\n");
    }

    #[tokio::test]
    async fn an_https_client_builds_with_the_ring_provider() {
        let settings = ConvexSettings {
            ingest_url: Url::parse("https://example.convex.site/daytona-ingest").unwrap(),
            secret: SecretHeader::new("", &String::from("k").into()).unwrap(),
            queue_bytes: 1 << 20,
            queue_total_bytes: 1 << 20,
            request_timeout: Duration::from_secs(1),
            retry_for: Duration::from_secs(1),
        };
        assert!(Ingest::new(&settings).is_ok());
    }

    #[tokio::test]
    async fn retry_now_ends_one_backoff_of_a_record_early() {
        use crate::testing::convex_ingest::{FakeIngest, Fault};
        let fake = FakeIngest::start("k").await;
        // Rate limited for 30 s: without `retry_now` the next attempt is 30 s away.
        fake.set_fault(Fault::Busy { retry_after: 30 });
        // Parsed as the server parses its flags, so this test does not depend on how the
        // settings hold the secret.
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            convex: crate::sink::convex::ConvexArgs,
        }
        let site_url = fake.site_url();
        let cli = <Cli as clap::Parser>::try_parse_from([
            "x",
            "--convex-site-url",
            &site_url,
            "--convex-ingest-secret",
            "k",
            "--convex-request-timeout",
            "5s",
            "--convex-retry-for",
            "10m",
        ])
        .unwrap();
        let settings = cli.convex.settings().unwrap().unwrap();
        let ingest = Ingest::new(&settings).unwrap();
        let retry_now = CancellationToken::new();
        let token = retry_now.clone();
        let send = tokio::spawn(async move {
            ingest
                .send(Bytes::from_static(b"{}"), &token, |_, _| {})
                .await
        });
        let patience = Duration::from_secs(20);
        fake.wait_faulted(1, patience).await;
        retry_now.cancel();
        fake.wait_faulted(2, patience).await;
        // Only one backoff is cut short: the next attempt waits out its Retry-After again.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(fake.faulted(), 2);
        assert!(!send.is_finished());
        send.abort();
    }

    #[test]
    fn failures_are_described_without_noise() {
        let r = describe(StatusCode::UNAUTHORIZED, r#"{"error":"Unauthorized"}"#);
        assert_eq!(
            r,
            "HTTP 401 Unauthorized (check CONVEX_INGEST_SECRET): Unauthorized"
        );
        let r = describe(
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"error":"Internal error","details":"bad id"}"#,
        );
        assert!(r.ends_with("Internal error (bad id)"), "{r}");
        assert!(describe(StatusCode::BAD_GATEWAY, &"x".repeat(5000)).len() < 300);
    }
}
