//! HTTP client for the Daytona API and a sandbox's toolbox (research/daytona-api.md).
//!
//! One pooled `reqwest` client with a timeout on every call. Idempotent requests (GET, DELETE)
//! retry transient failures (connect errors, timeouts, 502/503/504) with jittered exponential
//! backoff. A POST is retried only when its connection failed before the request was sent,
//! since a repeated POST could run a command twice.

use std::time::{Duration, Instant};

use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use reqwest::{Method, StatusCode, header};
use serde::{Deserialize, de::DeserializeOwned};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, client::IntoClientRequest},
};
use tracing::debug;

use crate::secrets::SecretHeader;

/// Version sent in `X-Daytona-SDK-Version`. Daemons switch behaviour on it: from 0.167.0 log
/// markers are kept and plain log GETs answer JSON, which is what the demultiplexer expects.
pub const SDK_VERSION: &str = "0.190.0";
/// Sent on plain log GETs only: daemons below 0.167.0 answer those with the raw log bytes
/// (markers kept) instead of JSON text, which would turn invalid UTF-8 into U+FFFD and so
/// break the byte offsets the follower's bytes are reconciled with.
const RAW_LOG_SDK_VERSION: &str = "0.166.0";
const SOURCE: &str = "sandbox-runner";
/// Attempts of an idempotent request (GET, DELETE) before a transient failure is final.
const GET_ATTEMPTS: u32 = 4;
const BACKOFF_BASE: Duration = Duration::from_millis(200);

/// Characters escaped in a path segment, so ids can never add segments or queries.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\');

fn segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// The Daytona client cannot be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    #[error("cannot build the Daytona HTTP client: {0}")]
    Http(#[source] reqwest::Error),
}

/// What went wrong talking to Daytona.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Daytona rejected our credentials (HTTP {0}); check DAYTONA_API_KEY")]
    Unauthorized(StatusCode),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("Daytona is unreachable or failing: {0}")]
    Unavailable(String),
    #[error("Daytona is unreachable: {0}")]
    /// The connection failed before any request was sent, so even a POST may be retried.
    Unreachable(String),
    /// The command or terminal has ended (HTTP 410).
    #[error("gone: {0}")]
    Gone(String),
    #[error("Daytona answered HTTP {status}: {message}")]
    Unexpected { status: StatusCode, message: String },
}

/// The parts of a SandboxDto we use.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    pub id: String,
    pub state: String,
    #[serde(default)]
    pub toolbox_proxy_url: Option<String>,
}

/// The parts of a session (`GET /process/session`) we use.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    pub session_id: String,
    /// Absent or null for a session that has run nothing.
    #[serde(default)]
    pub commands: Option<Vec<CommandInfo>>,
}

/// The parts of a command (`GET …/command/{id}`, or in a session) we use.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandInfo {
    #[serde(default)]
    pub id: String,
    /// Absent while the command runs.
    #[serde(default)]
    pub exit_code: Option<i32>,
}

/// The body of `POST /process/pty`.
#[derive(Debug, serde::Serialize)]
pub struct PtyRequest<'a> {
    pub id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<&'a str>,
    pub envs: &'a std::collections::BTreeMap<String, String>,
    pub cols: u16,
    pub rows: u16,
}

/// A sandbox's toolbox base URL: `{toolboxProxyUrl}/{sandboxId}`.
#[derive(Debug, Clone)]
pub struct Toolbox(String);

impl Toolbox {
    pub fn new(proxy_url: &str, sandbox_id: &str) -> Self {
        Toolbox(format!(
            "{}/{}",
            proxy_url.trim_end_matches('/'),
            segment(sandbox_id)
        ))
    }

    fn session(&self, session_id: &str) -> String {
        format!("{}/process/session/{}", self.0, segment(session_id))
    }

    fn pty(&self, pty_id: &str) -> String {
        format!("{}/process/pty/{}", self.0, segment(pty_id))
    }

    fn command(&self, session_id: &str, command_id: &str) -> String {
        format!(
            "{}/command/{}",
            self.session(session_id),
            segment(command_id)
        )
    }
}

/// What a request to Daytona does: the `operation` label of its metrics (a fixed list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    GetSandbox,
    ListSandboxes,
    StartSandbox,
    ToolboxUrl,
    ListSessions,
    CreateSession,
    Exec,
    Input,
    Status,
    Logs,
    FollowLogs,
    DeleteSession,
    PtyCreate,
    PtyConnect,
    PtyResize,
    PtyDelete,
}

impl Operation {
    #[cfg(test)]
    const ALL: [Operation; 16] = [
        Operation::GetSandbox,
        Operation::ListSandboxes,
        Operation::StartSandbox,
        Operation::ToolboxUrl,
        Operation::ListSessions,
        Operation::CreateSession,
        Operation::Exec,
        Operation::Input,
        Operation::Status,
        Operation::Logs,
        Operation::FollowLogs,
        Operation::DeleteSession,
        Operation::PtyCreate,
        Operation::PtyConnect,
        Operation::PtyResize,
        Operation::PtyDelete,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Operation::GetSandbox => "get_sandbox",
            Operation::ListSandboxes => "list_sandboxes",
            Operation::StartSandbox => "start_sandbox",
            Operation::ToolboxUrl => "toolbox_url",
            Operation::ListSessions => "list_sessions",
            Operation::CreateSession => "create_session",
            Operation::Exec => "exec",
            Operation::Input => "input",
            Operation::Status => "status",
            Operation::Logs => "logs",
            Operation::FollowLogs => "follow_logs",
            Operation::DeleteSession => "delete_session",
            Operation::PtyCreate => "pty_create",
            Operation::PtyConnect => "pty_connect",
            Operation::PtyResize => "pty_resize",
            Operation::PtyDelete => "pty_delete",
        }
    }
}

/// The `outcome` label of a request Daytona answered with `status`. Not found and gone stand
/// apart from other client errors: the runner expects them (a session already deleted, input
/// after the command ended).
fn status_outcome(status: StatusCode) -> &'static str {
    match status {
        s if s.is_success() => "ok",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::GONE => "gone",
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "unauthorized",
        StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        s if s.is_server_error() => "server_error",
        _ => "client_error",
    }
}

/// The `outcome` label of a request that got no answer.
fn transport_outcome(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else {
        "transport_error"
    }
}

/// One request to Daytona (one attempt: a retried request is one per attempt), from its start
/// to [`Call::end`]: counted and timed, and a span (a child of the job's, when made for a job).
struct Call {
    operation: Operation,
    started: Instant,
    span: tracing::Span,
}

impl Call {
    fn start(operation: Operation) -> Call {
        let span = tracing::info_span!(
            "daytona.request",
            otel.name = %format_args!("daytona {}", operation.as_str()),
            otel.kind = "client",
            operation = operation.as_str(),
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        Call {
            operation,
            started: Instant::now(),
            span,
        }
    }

    fn end(self, outcome: &'static str) {
        let operation = self.operation.as_str();
        metrics::counter!("sandbox_daytona_requests_total",
            "operation" => operation, "outcome" => outcome)
        .increment(1);
        metrics::histogram!("sandbox_daytona_request_duration_seconds", "operation" => operation)
            .record(self.started.elapsed().as_secs_f64());
        self.span.record("outcome", outcome);
        // Expected answers (a session already gone) are not errors of the call.
        if !matches!(outcome, "ok" | "not_found" | "gone") {
            self.span.record("otel.status_code", "ERROR");
        }
    }
}

/// Log follower over WebSocket.
pub type LogSocket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Client of one Daytona API.
pub struct DaytonaClient {
    http: reqwest::Client,
    api_url: String,
    /// Sent on every request, the log WebSocket's included.
    headers: header::HeaderMap,
    /// `Authorization`, read per request so a rotated key is used from the next request on.
    auth: SecretHeader,
    request_timeout: Duration,
}

impl DaytonaClient {
    pub fn new(
        api_url: &str,
        auth: &SecretHeader,
        request_timeout: Duration,
    ) -> Result<Self, ClientSetupError> {
        crate::tls::install_crypto_provider();
        let mut headers = header::HeaderMap::new();
        headers.insert(
            "x-daytona-sdk-version",
            header::HeaderValue::from_static(SDK_VERSION),
        );
        headers.insert("x-daytona-source", header::HeaderValue::from_static(SOURCE));
        let http = reqwest::Client::builder()
            .default_headers(headers.clone())
            .user_agent(concat!("sandbox-runner/", env!("CARGO_PKG_VERSION")))
            .timeout(request_timeout)
            .connect_timeout(request_timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(ClientSetupError::Http)?;
        Ok(DaytonaClient {
            http,
            api_url: api_url.trim_end_matches('/').to_owned(),
            headers,
            auth: auth.clone(),
            request_timeout,
        })
    }

    pub async fn sandbox(&self, id: &str) -> Result<Sandbox, ApiError> {
        self.get_json(
            Operation::GetSandbox,
            &format!("{}/sandbox/{}", self.api_url, segment(id)),
        )
        .await
    }

    /// Every sandbox of the organisation (`GET /api/sandbox`: an array of SandboxDto).
    pub async fn sandboxes(&self) -> Result<Vec<Sandbox>, ApiError> {
        self.get_json(
            Operation::ListSandboxes,
            &format!("{}/sandbox", self.api_url),
        )
        .await
    }

    /// The sessions of a sandbox, with their commands.
    pub async fn sessions(&self, toolbox: &Toolbox) -> Result<Vec<SessionInfo>, ApiError> {
        self.get_json(
            Operation::ListSessions,
            &format!("{}/process/session", toolbox.0),
        )
        .await
    }

    pub async fn start_sandbox(&self, id: &str) -> Result<Sandbox, ApiError> {
        let url = format!("{}/sandbox/{}/start", self.api_url, segment(id));
        let response = self
            .posting(Operation::StartSandbox, || self.http.post(&url))
            .await?;
        json(response).await
    }

    /// For APIs whose SandboxDto predates `toolboxProxyUrl`.
    pub async fn toolbox_proxy_url(&self, id: &str) -> Result<String, ApiError> {
        #[derive(Deserialize)]
        struct Url {
            url: String,
        }
        let url = format!("{}/sandbox/{}/toolbox-proxy-url", self.api_url, segment(id));
        Ok(self.get_json::<Url>(Operation::ToolboxUrl, &url).await?.url)
    }

    pub async fn create_session(
        &self,
        toolbox: &Toolbox,
        session_id: &str,
    ) -> Result<(), ApiError> {
        let url = format!("{}/process/session", toolbox.0);
        let body = serde_json::json!({ "sessionId": session_id });
        self.posting(Operation::CreateSession, || {
            self.http.post(&url).json(&body)
        })
        .await?;
        Ok(())
    }

    /// Starts `command` asynchronously in the session; returns the command id. With
    /// `suppress_input_echo`, what `/input` sends is not copied into the command's log.
    pub async fn exec_async(
        &self,
        toolbox: &Toolbox,
        session_id: &str,
        command: &str,
        suppress_input_echo: bool,
    ) -> Result<String, ApiError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Started {
            cmd_id: String,
        }
        let url = format!("{}/exec", toolbox.session(session_id));
        let mut body = serde_json::json!({ "command": command, "runAsync": true });
        if suppress_input_echo {
            body["suppressInputEcho"] = true.into();
        }
        let response = self
            .posting(Operation::Exec, || self.http.post(&url).json(&body))
            .await?;
        Ok(json::<Started>(response).await?.cmd_id)
    }

    /// Writes `data` to the running command's stdin (`POST …/input`; Daytona appends a newline
    /// when `data` has none). [`ApiError::Gone`] once the command has completed.
    pub async fn send_input(
        &self,
        toolbox: &Toolbox,
        session_id: &str,
        command_id: &str,
        data: &str,
    ) -> Result<(), ApiError> {
        let url = format!("{}/input", toolbox.command(session_id, command_id));
        let body = serde_json::json!({ "data": data });
        self.posting(Operation::Input, || self.http.post(&url).json(&body))
            .await?;
        Ok(())
    }

    /// Creates a terminal session running the sandbox's login shell (`POST /process/pty`).
    pub async fn create_pty(
        &self,
        toolbox: &Toolbox,
        pty: &PtyRequest<'_>,
    ) -> Result<(), ApiError> {
        let url = format!("{}/process/pty", toolbox.0);
        self.posting(Operation::PtyCreate, || self.http.post(&url).json(pty))
            .await?;
        Ok(())
    }

    /// Sets the size of a terminal session; [`ApiError::Gone`] once it has exited.
    pub async fn resize_pty(
        &self,
        toolbox: &Toolbox,
        pty_id: &str,
        cols: u16,
        rows: u16,
    ) -> Result<(), ApiError> {
        let url = format!("{}/resize", toolbox.pty(pty_id));
        let body = serde_json::json!({ "cols": cols, "rows": rows });
        // Setting a size twice is harmless, so transient failures are retried.
        self.retrying(Operation::PtyResize, || self.http.post(&url).json(&body))
            .await?;
        Ok(())
    }

    /// Deletes a terminal session, killing everything on it. One already gone is not an error.
    pub async fn delete_pty(&self, toolbox: &Toolbox, pty_id: &str) -> Result<(), ApiError> {
        let url = toolbox.pty(pty_id);
        match self
            .retrying(Operation::PtyDelete, || {
                self.http.request(Method::DELETE, &url)
            })
            .await
        {
            Ok(_) | Err(ApiError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Opens the WebSocket of a terminal session: its output, and input to it.
    pub async fn connect_pty(
        &self,
        toolbox: &Toolbox,
        pty_id: &str,
    ) -> Result<LogSocket, ApiError> {
        let url = format!("{}/connect", toolbox.pty(pty_id));
        self.websocket(Operation::PtyConnect, url, "terminal stream")
            .await
    }

    /// The command's exit code, or `None` while it runs (Daytona omits the field until then).
    pub async fn exit_code(
        &self,
        toolbox: &Toolbox,
        session_id: &str,
        command_id: &str,
    ) -> Result<Option<i32>, ApiError> {
        let url = toolbox.command(session_id, command_id);
        Ok(self
            .get_json::<CommandInfo>(Operation::Status, &url)
            .await?
            .exit_code)
    }

    /// The command's whole log so far, markers included.
    pub async fn logs(
        &self,
        toolbox: &Toolbox,
        session_id: &str,
        command_id: &str,
    ) -> Result<Vec<u8>, ApiError> {
        #[derive(Deserialize)]
        struct Logs {
            output: Option<String>,
        }
        let url = format!("{}/logs", toolbox.command(session_id, command_id));
        let response = self
            .retrying(Operation::Logs, || {
                self.http
                    .get(&url)
                    .header("x-daytona-sdk-version", RAW_LOG_SDK_VERSION)
            })
            .await?;
        let is_json = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let body = response.bytes().await.map_err(transport)?;
        if is_json {
            let logs: Logs = serde_json::from_slice(&body).map_err(|e| ApiError::Unexpected {
                status: StatusCode::OK,
                message: format!("unreadable log JSON: {e}"),
            })?;
            Ok(logs.output.unwrap_or_default().into_bytes())
        } else {
            Ok(body.to_vec())
        }
    }

    /// Opens the WebSocket that replays the command's log from the start and then follows it.
    pub async fn follow_logs(
        &self,
        toolbox: &Toolbox,
        session_id: &str,
        command_id: &str,
    ) -> Result<LogSocket, ApiError> {
        let url = format!(
            "{}/logs?follow=true",
            toolbox.command(session_id, command_id)
        );
        self.websocket(Operation::FollowLogs, url, "log stream")
            .await
    }

    /// Opens a WebSocket to `url` (http or https) with this client's headers.
    async fn websocket(
        &self,
        operation: Operation,
        url: String,
        what: &str,
    ) -> Result<LogSocket, ApiError> {
        let ws_url = if let Some(rest) = url.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = url.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            url
        };
        let mut request = ws_url
            .into_client_request()
            .map_err(|e| ApiError::Unexpected {
                status: StatusCode::BAD_REQUEST,
                message: format!("bad {what} URL: {e}"),
            })?;
        request.headers_mut().extend(self.headers.clone());
        request
            .headers_mut()
            .insert(header::AUTHORIZATION, self.auth.get());
        let call = Call::start(operation);
        let connect =
            tokio_tungstenite::connect_async_with_config(request, Some(ws_config()), true);
        let (outcome, result) = match tokio::time::timeout(self.request_timeout, connect).await {
            Err(_) => (
                "timeout",
                Err(ApiError::Unavailable(format!(
                    "timed out opening the {what}"
                ))),
            ),
            Ok(Ok((socket, _))) => ("ok", Ok(socket)),
            Ok(Err(tungstenite::Error::Http(response))) => {
                let status = StatusCode::from_u16(response.status().as_u16())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                (
                    status_outcome(status),
                    Err(status_error(status, what.into())),
                )
            }
            Ok(Err(e)) => (
                "transport_error",
                Err(ApiError::Unavailable(format!("{what}: {e}"))),
            ),
        };
        call.end(outcome);
        result
    }

    /// Deletes the session, which kills every process it started. Deleting a session that is
    /// already gone is not an error.
    pub async fn delete_session(
        &self,
        toolbox: &Toolbox,
        session_id: &str,
    ) -> Result<(), ApiError> {
        let url = toolbox.session(session_id);
        // DELETE is idempotent, so transient failures are retried like GETs.
        match self
            .retrying(Operation::DeleteSession, || {
                self.http.request(Method::DELETE, &url)
            })
            .await
        {
            Ok(_) | Err(ApiError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        operation: Operation,
        url: &str,
    ) -> Result<T, ApiError> {
        json(self.retrying(operation, || self.http.get(url)).await?).await
    }

    /// Sends an idempotent request, retrying transient failures with jittered backoff.
    async fn retrying(
        &self,
        operation: Operation,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ApiError> {
        self.with_retries(operation, request, true).await
    }

    /// Sends a request that must not run twice, retrying only when it never left this host.
    async fn posting(
        &self,
        operation: Operation,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ApiError> {
        self.with_retries(operation, request, false).await
    }

    async fn with_retries(
        &self,
        operation: Operation,
        request: impl Fn() -> reqwest::RequestBuilder,
        idempotent: bool,
    ) -> Result<reqwest::Response, ApiError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.send(operation, request()).await {
                Err(e) if attempt < GET_ATTEMPTS && retryable(&e, idempotent) => {
                    let backoff = BACKOFF_BASE * 2u32.pow(attempt - 1);
                    let jittered = backoff.mul_f64(0.5 + fastrand::f64());
                    debug!(attempt, error = %e, ?jittered, "transient Daytona error; retrying");
                    tokio::time::sleep(jittered).await;
                }
                other => return other,
            }
        }
    }

    /// Every HTTP request to Daytona goes out here (WebSockets open in `websocket`), which is
    /// where they are counted and timed: to the response's head, or the end of an error's body.
    async fn send(
        &self,
        operation: Operation,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ApiError> {
        let call = Call::start(operation);
        let response = match request
            .header(header::AUTHORIZATION, self.auth.get())
            .send()
            .await
        {
            Ok(response) => response,
            Err(e) => {
                call.end(transport_outcome(&e));
                return Err(transport(e));
            }
        };
        let status = response.status();
        if status.is_success() {
            call.end("ok");
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        call.end(status_outcome(status));
        Err(status_error(status, error_message(&body)))
    }
}

fn status_error(status: StatusCode, message: String) -> ApiError {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ApiError::Unauthorized(status),
        StatusCode::NOT_FOUND => ApiError::NotFound(message),
        StatusCode::GONE => ApiError::Gone(message),
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => ApiError::Unavailable(format!("HTTP {status}: {message}")),
        _ => ApiError::Unexpected { status, message },
    }
}

/// A failed connection can always be retried; other transient failures only for idempotent
/// requests, since the first attempt may have taken effect.
fn retryable(e: &ApiError, idempotent: bool) -> bool {
    match e {
        ApiError::Unreachable(_) => true,
        ApiError::Unavailable(_) => idempotent,
        _ => false,
    }
}

fn transport(e: reqwest::Error) -> ApiError {
    let connect = e.is_connect();
    // Never include the URL's credentials: reqwest errors carry the URL, which has none here.
    let message = e.without_url().to_string();
    if connect {
        ApiError::Unreachable(message)
    } else {
        ApiError::Unavailable(message)
    }
}

/// The `message` of Daytona's error bodies, else the body itself (truncated).
fn error_message(body: &str) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        message: serde_json::Value,
    }
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(ErrorBody {
            message: serde_json::Value::String(m),
        }) => m,
        Ok(ErrorBody { message }) => message.to_string(),
        Err(_) => body.chars().take(300).collect(),
    }
}

async fn json<T: DeserializeOwned>(response: reqwest::Response) -> Result<T, ApiError> {
    let status = response.status();
    let body = response.bytes().await.map_err(transport)?;
    serde_json::from_slice(&body).map_err(|e| ApiError::Unexpected {
        status,
        message: format!("unreadable response: {e}"),
    })
}

/// Settings of the log follower's WebSocket. tungstenite's default 128 KiB read buffer is
/// zero-filled up front, which made each running job cost ~160 KiB of server memory; Daytona's
/// log frames are small, so 16 KiB reads lose nothing. We only ever send control frames.
fn ws_config() -> tungstenite::protocol::WebSocketConfig {
    tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cannot_escape_their_path_segment() {
        let tb = Toolbox::new("http://proxy/toolbox/", "../x?y#z");
        assert_eq!(tb.0, "http://proxy/toolbox/..%2Fx%3Fy%23z");
        assert_eq!(
            tb.session("a/b"),
            "http://proxy/toolbox/..%2Fx%3Fy%23z/process/session/a%2Fb"
        );
    }

    #[test]
    fn metric_labels_are_a_fixed_set() {
        let names: std::collections::HashSet<_> =
            Operation::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(
            names.len(),
            Operation::ALL.len(),
            "operations share a label"
        );
        assert!(
            names
                .iter()
                .all(|n| n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        );
        let outcomes: Vec<_> = [200, 204, 400, 401, 403, 404, 409, 410, 429, 500, 502, 503]
            .map(|code| status_outcome(StatusCode::from_u16(code).unwrap()))
            .to_vec();
        assert_eq!(
            outcomes,
            [
                "ok",
                "ok",
                "client_error",
                "unauthorized",
                "unauthorized",
                "not_found",
                "client_error",
                "gone",
                "rate_limited",
                "server_error",
                "server_error",
                "server_error"
            ]
        );
    }

    #[test]
    fn error_bodies_are_summarised() {
        assert_eq!(
            error_message(r#"{"statusCode":404,"message":"Sandbox with ID or name x not found"}"#),
            "Sandbox with ID or name x not found"
        );
        assert_eq!(error_message("plain text"), "plain text");
    }
}
