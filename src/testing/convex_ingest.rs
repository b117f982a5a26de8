//! A fake of the deployed Convex `POST /daytona-ingest` route (research/convex-ingest.md section
//! 1), served over real HTTP on 127.0.0.1:0, with fault injection. It records every request it
//! accepts, so tests can compare what reached "Convex" with what the job printed; or, for a
//! benchmark's bulk output, only counts them, and measures the lag of `T<unix nanos>` tokens that
//! jobs write.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinHandle};

/// What the fake does to requests that pass the flag and secret checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Behave like the deployed server.
    None,
    /// Answer with this status without storing anything (e.g. 500: the mutation failed).
    Status(u16),
    /// Answer 429 with `Retry-After: <retry_after>` (seconds), storing nothing: rate limited.
    Busy { retry_after: u64 },
    /// Hold the response until the fault is changed. With `record`, the row is stored first
    /// (the client cannot tell, and a retry duplicates it); without, nothing is stored and the
    /// held request finally gets a 503.
    Hang { record: bool },
}

/// What the fake keeps of the requests it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Every body, for comparing with what the job printed.
    Records,
    /// Only the counts and lags: a benchmark's bulk output would not fit in memory.
    Counts,
}

#[derive(Default)]
struct Log {
    /// Bodies of accepted requests, in arrival order (with [`Keep::Records`]).
    records: Vec<Value>,
    /// Bytes of `data` in accepted requests, gap markers aside.
    data_bytes: u64,
    /// Accepted requests whose `data` is a gap marker (`[... N bytes not mirrored ...]`).
    gap_markers: u64,
    /// Write → receipt lag of each `T<unix nanos>` token in accepted `data`, in milliseconds.
    lags_ms: Vec<f64>,
    /// Every request seen, including refused ones.
    requests: u64,
    /// Requests answered by a fault (a status or a hang).
    faulted: u64,
    /// Status codes answered by the contract checks (401, 400, 503).
    refused: Vec<u16>,
}

struct Shared {
    secret: String,
    keep: Keep,
    enabled: Mutex<bool>,
    fault: watch::Sender<Fault>,
    log: Mutex<Log>,
}

/// A running fake ingest server. Dropping it stops it.
pub struct FakeIngest {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for FakeIngest {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeIngest {
    /// Starts a fake that accepts `secret`, with `ENABLE_DAYTONA_TERMINAL` on, keeping every
    /// record.
    pub async fn start(secret: &str) -> FakeIngest {
        FakeIngest::start_keeping(secret, Keep::Records).await
    }

    /// Starts a fake that accepts `secret` on `addr`, e.g. a port that was closed until now (an
    /// ingest coming back), keeping every record.
    pub async fn start_at(addr: SocketAddr, secret: &str) -> FakeIngest {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        FakeIngest::serve(listener, secret, Keep::Records)
    }

    /// Starts a fake that accepts `secret`, with `ENABLE_DAYTONA_TERMINAL` on.
    pub async fn start_keeping(secret: &str, keep: Keep) -> FakeIngest {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        FakeIngest::serve(listener, secret, keep)
    }

    fn serve(listener: tokio::net::TcpListener, secret: &str, keep: Keep) -> FakeIngest {
        let shared = Arc::new(Shared {
            secret: secret.to_owned(),
            keep,
            enabled: Mutex::new(true),
            fault: watch::Sender::new(Fault::None),
            log: Mutex::new(Log::default()),
        });
        let app = Router::new()
            .route("/daytona-ingest", post(ingest))
            .with_state(Arc::clone(&shared));
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeIngest { addr, shared, task }
    }

    /// The value for CONVEX_SITE_URL.
    pub fn site_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_fault(&self, fault: Fault) {
        self.shared.fault.send_replace(fault);
    }

    /// The deployment's ENABLE_DAYTONA_TERMINAL flag.
    pub fn set_enabled(&self, enabled: bool) {
        *self.shared.enabled.lock().unwrap() = enabled;
    }

    /// Accepted records, in arrival order.
    pub fn records(&self) -> Vec<Value> {
        self.shared.log.lock().unwrap().records.clone()
    }

    /// Accepted records of one session (the runner's job), in arrival order.
    pub fn session(&self, session_id: &str) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["sessionId"] == session_id)
            .collect()
    }

    pub fn requests(&self) -> u64 {
        self.shared.log.lock().unwrap().requests
    }

    pub fn faulted(&self) -> u64 {
        self.shared.log.lock().unwrap().faulted
    }

    pub fn refused(&self) -> Vec<u16> {
        self.shared.log.lock().unwrap().refused.clone()
    }

    /// Bytes of `data` accepted, gap markers aside.
    pub fn data_bytes(&self) -> u64 {
        self.shared.log.lock().unwrap().data_bytes
    }

    /// Accepted gap markers.
    pub fn gap_markers(&self) -> u64 {
        self.shared.log.lock().unwrap().gap_markers
    }

    /// Write → receipt lags of the `T<unix nanos>` tokens accepted so far, in milliseconds.
    pub fn lags_ms(&self) -> Vec<f64> {
        self.shared.log.lock().unwrap().lags_ms.clone()
    }

    /// Polls until `done(records of the session)` holds; panics after `limit` (a bound against
    /// hanging, not a timing assertion).
    pub async fn wait_session(
        &self,
        session_id: &str,
        limit: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let records = self.session(session_id);
            if done(&records) {
                return records;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "session {session_id}: condition not met within {limit:?}; have {} records",
                records.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until the fake answered at least `n` requests with a fault.
    pub async fn wait_faulted(&self, n: u64, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.faulted() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} faulted requests within {limit:?}",
                self.faulted()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn reply(status: StatusCode, body: Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The deployed handler's checks, in its order: flag (before auth), secret, JSON, fields.
async fn ingest(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let refuse = |status: StatusCode, error: &str| {
        shared.log.lock().unwrap().refused.push(status.as_u16());
        reply(status, json!({ "error": error }))
    };
    shared.log.lock().unwrap().requests += 1;
    if !*shared.enabled.lock().unwrap() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "Daytona terminal is disabled",
        );
    }
    let provided = headers.get("x-ingest-secret").and_then(|v| v.to_str().ok());
    if shared.secret.is_empty() || provided != Some(shared.secret.as_str()) {
        return refuse(StatusCode::UNAUTHORIZED, "Unauthorized");
    }

    let fault = shared.fault.borrow().clone();
    match fault {
        Fault::None => {}
        Fault::Status(code) => {
            shared.log.lock().unwrap().faulted += 1;
            let status = StatusCode::from_u16(code).unwrap();
            return reply(
                status,
                json!({ "error": "Internal error", "details": "injected" }),
            );
        }
        Fault::Busy { retry_after } => {
            shared.log.lock().unwrap().faulted += 1;
            let mut response = reply(
                StatusCode::TOO_MANY_REQUESTS,
                json!({ "error": "Too many requests" }),
            );
            response
                .headers_mut()
                .insert("retry-after", retry_after.into());
            return response;
        }
        Fault::Hang { record } => {
            shared.log.lock().unwrap().faulted += 1;
            if record && let Some(payload) = parse(&body) {
                accept(&shared, payload);
            }
            let mut changes = shared.fault.subscribe();
            let _ = changes.wait_for(|f| !matches!(f, Fault::Hang { .. })).await;
            return if record {
                reply(StatusCode::OK, json!({ "success": true, "timestamp": 0 }))
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, json!({ "error": "held" }))
            };
        }
    }

    let Ok(payload) = serde_json::from_slice::<Value>(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "Invalid JSON body");
    };
    if !valid(&payload) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Missing required fields: taskId, sessionId, stream, data",
        );
    }
    let timestamp = payload["ts"].as_u64().unwrap_or(0);
    accept(&shared, payload);
    reply(
        StatusCode::OK,
        json!({ "success": true, "timestamp": timestamp }),
    )
}

/// Counts an accepted body and keeps it (with [`Keep::Records`]).
fn accept(shared: &Shared, payload: Value) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut log = shared.log.lock().unwrap();
    if let Some(data) = payload["data"].as_str() {
        if data.starts_with("\n[... ") && data.ends_with(" bytes not mirrored ...]\n") {
            log.gap_markers += 1;
        } else {
            log.data_bytes += data.len() as u64;
            // Bulk text has no tokens: skip the per-byte split (the fake stands in for a remote
            // Convex; its CPU in a benchmark would be charged to the mirror).
            if data.contains('T') {
                for token in data.split_whitespace() {
                    if let Some(ns) = token.strip_prefix('T').and_then(|t| t.parse::<u128>().ok()) {
                        log.lags_ms
                            .push((now.as_nanos().saturating_sub(ns)) as f64 / 1e6);
                    }
                }
            }
        }
    }
    if shared.keep == Keep::Records {
        log.records.push(payload);
    }
}

/// The body when it passes the deployed validation.
fn parse(body: &[u8]) -> Option<Value> {
    serde_json::from_slice(body).ok().filter(valid)
}

/// The deployed validation: truthy taskId, sessionId and stream, and a `data` member.
fn valid(payload: &Value) -> bool {
    let truthy = |v: &Value| match v {
        Value::Null | Value::Bool(false) => false,
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
        _ => true,
    };
    ["taskId", "sessionId", "stream"]
        .iter()
        .all(|k| payload.get(*k).is_some_and(truthy))
        && payload.get("data").is_some()
}

/// The rows the deployed handler writes for these records: output with non-empty data as is,
/// a `meta` record with `done` as the stdout row `\n[DONE] Exit code: N` or `\n[ERROR] msg`,
/// anything else nothing. `(streamType, content)`.
pub fn rows(records: &[Value]) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    for r in records {
        let stream = r["stream"].as_str().unwrap_or_default();
        if stream == "meta" {
            if r["done"] == true {
                let content = match r["error"].as_str() {
                    Some(error) => format!("\n[ERROR] {error}"),
                    None => format!(
                        "\n[DONE] Exit code: {}",
                        r["exitCode"].as_i64().unwrap_or(0)
                    ),
                };
                rows.push(("stdout".to_owned(), content));
            }
        } else if let Some(data) = r["data"].as_str().filter(|d| !d.is_empty()) {
            let stream = if stream == "stderr" {
                "stderr"
            } else {
                "stdout"
            };
            rows.push((stream.to_owned(), data.to_owned()));
        }
    }
    rows
}
