//! The REST face of the job core, on the gRPC port (HTTP/1.1 and h2c): the Node runner's API
//! unchanged for its callers (`POST /v1/exec`, `POST /v1/cancel`, `GET /v1/status/:jobId`,
//! `GET /health`), and a job's events as Server-Sent Events for browsers (`events`).
//!
//! Thin, like the gRPC handlers: requests are turned into the gRPC layer's messages and
//! validated by its `convert` (one set of rules), errors are mapped to HTTP from the one gRPC
//! status mapping, and the same `Jobs` serves both: a job started here is visible to gRPC
//! Status, Attach and ListJobs, and the reverse.

mod events;

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tonic::Code;

use crate::{
    error::Error,
    grpc::{auth::BearerAuth, convert, service::InstanceInfo},
    job::{JobSnapshot, JobState, Jobs},
    proto as pb,
};

/// What the REST handlers share.
#[derive(Clone)]
pub struct RestState {
    pub jobs: Arc<Jobs>,
    pub info: InstanceInfo,
    pub auth: BearerAuth,
}

/// The REST routes, with a JSON 404 for any other path and a JSON 405 for a wrong method.
/// Without a fallback of its own for unknown methods or paths beyond these, so that it merges
/// with the gRPC routes (see `server`).
pub fn router(state: RestState) -> Router {
    let authorized = Router::new()
        .route("/v1/exec", post(exec))
        .route("/v1/cancel", post(cancel))
        .route("/v1/status/{job_id}", get(status))
        .route("/v1/jobs/{job_id}/events", get(events::events))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        // Open, as gRPC health is: probes carry no token.
        .route("/health", get(health))
        .merge(authorized)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// The answer to a path nobody serves: a JSON 404 (tonic's own fallback would answer a gRPC
/// status with HTTP 200).
pub async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "no such route")
}

async fn method_not_allowed() -> Response {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

async fn authorize(State(state): State<RestState>, request: Request, next: Next) -> Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match state.auth.authorize(header) {
        Ok(()) => next.run(request).await,
        Err(e) => RestError(e).into_response(),
    }
}

/// An error of the core, answered as `{error}` with the HTTP status of its gRPC code.
struct RestError(Error);

impl From<Error> for RestError {
    fn from(e: Error) -> Self {
        RestError(e)
    }
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let status = tonic::Status::from(self.0);
        error_response(http_status(status.code()), status.message())
    }
}

/// The HTTP status for a gRPC code (as gRPC-gateway maps them), except that being over a limit
/// is 503, as the Node runner answered.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted | Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// A JSON body, or the caller's error naming what is wrong with it.
fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, RestError> {
    serde_json::from_slice(body)
        .map_err(|e| RestError(Error::InvalidArgument(format!("request body: {e}"))))
}

/// `POST /v1/exec`, as the Node runner took it.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecBody {
    #[serde(default)]
    task_id: String,
    #[serde(default)]
    session_id: String,
    #[serde(default)]
    sandbox_id: String,
    command: String,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    env: Option<HashMap<String, String>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExecReply {
    job_id: String,
    session_id: String,
    status: &'static str,
}

/// Starts a job that does not depend on this request: it runs detached (to its timeout, or a
/// Cancel), mirrored where the mirror is configured, as the Node runner's jobs were.
async fn exec(State(state): State<RestState>, body: Bytes) -> Result<Json<ExecReply>, RestError> {
    let body: ExecBody = parse(&body)?;
    let request = pb::ExecRequest {
        task_id: body.task_id,
        session_id: body.session_id.clone(),
        sandbox_id: body.sandbox_id,
        command: body.command,
        cwd: body.cwd.unwrap_or_default(),
        env: body.env.unwrap_or_default(),
        on_disconnect: pb::DisconnectPolicy::Detach as i32,
        ..Default::default()
    };
    let spec = convert::job_spec(request)?;
    // Its stream is this request's, which ends here: the job runs on.
    let started = state.jobs.start(spec).await?;
    Ok(Json(ExecReply {
        job_id: started.job_id.to_string(),
        session_id: body.session_id,
        status: "running",
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CancelBody {
    job_id: String,
}

/// `POST /v1/cancel`: `status` is `cancelled` for a job that was running (it is being stopped),
/// or the state a finished job ended in.
async fn cancel(State(state): State<RestState>, body: Bytes) -> Result<Response, RestError> {
    let body: CancelBody = parse(&body)?;
    let id = convert::job_id(body.job_id)?;
    let job = state.jobs.cancel(&id).await?;
    let status = match job.state {
        JobState::Running => "cancelled",
        finished => finished.as_str(),
    };
    Ok(Json(json!({ "jobId": job.id.to_string(), "status": status })).into_response())
}

/// `GET /v1/status/:jobId`.
async fn status(
    State(state): State<RestState>,
    Path(job_id): Path<String>,
) -> Result<Response, RestError> {
    let id = convert::job_id(job_id)?;
    let job = state.jobs.status(&id).await?;
    Ok(Json(status_reply(job)).into_response())
}

fn status_reply(job: JobSnapshot) -> serde_json::Value {
    let exit = job.exit.as_ref();
    json!({
        "jobId": job.id.to_string(),
        "taskId": job.meta.task_id,
        "sessionId": job.meta.session_id,
        "sandboxId": job.meta.sandbox_id,
        "status": job.state.as_str(),
        "startedAt": epoch_ms(job.started_at),
        "runningFor": job
            .running_for
            .or(exit.map(|e| e.duration))
            .map_or(0, |d| d.as_millis() as u64),
        "finishedAt": exit.map(|e| epoch_ms(e.finished_at)),
        "exitCode": exit.and_then(|e| e.exit_code),
        "signal": exit.and_then(|e| e.signal),
        "message": exit.map(|e| e.message.clone()),
        "stdoutBytes": job.stdout_bytes,
        "stderrBytes": job.stderr_bytes,
        "backend": job.backend,
    })
}

/// `GET /health`: 200 while serving, 503 while draining (so load balancers stop sending).
async fn health(State(state): State<RestState>) -> Response {
    let draining = state.jobs.is_draining();
    let body = json!({
        "status": if draining { "draining" } else { "ok" },
        "activeJobs": state.jobs.active(),
        "maxConcurrentJobs": state.jobs.max_concurrent(),
        "backend": state.jobs.backend_name(),
        "daytonaConfigured": state.info.daytona_configured,
        "convexConfigured": state.info.convex_configured,
        "timestamp": epoch_ms(SystemTime::now()),
        "uptimeMs": state.info.started.elapsed().as_millis() as u64,
    });
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

fn epoch_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as u64
}

/// The value of a header, if it is text.
fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_grpc_code_has_an_http_status() {
        let cases = [
            (Code::InvalidArgument, 400),
            (Code::OutOfRange, 400),
            (Code::FailedPrecondition, 400),
            (Code::NotFound, 404),
            (Code::AlreadyExists, 409),
            (Code::Unauthenticated, 401),
            (Code::ResourceExhausted, 503),
            (Code::Unavailable, 503),
            (Code::Internal, 500),
            (Code::Unimplemented, 501),
            (Code::DeadlineExceeded, 504),
        ];
        for (code, http) in cases {
            assert_eq!(http_status(code).as_u16(), http, "{code:?}");
        }
    }
}
