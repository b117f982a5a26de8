//! `GET /v1/jobs/:jobId/events`: a job's events as Server-Sent Events, for browsers.
//!
//! Each event has `id: <seq>` and a JSON body; output carries its bytes as base64 (`data`) and,
//! when they are valid UTF-8, as `text` too. A browser's `EventSource` that reconnects sends
//! `Last-Event-ID` and the stream goes on exactly after it; what the log no longer holds is a
//! `gap` event (never silence). The stream ends after `exited`; a reconnect after that is
//! answered 204, which tells `EventSource` to stop. Keepalive comments (`--stream-keepalive`)
//! keep idle connections open through proxies. Readers here are watchers: they never slow the
//! job (see `AttachOpen.lossless`).

use std::convert::Infallible;

use axum::{
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{
        IntoResponse, Response,
        sse::{Event, Sse},
    },
};
use base64::Engine;
use futures_util::StreamExt;
use serde_json::json;

use super::{RestError, RestState, epoch_ms, header_text};
use crate::{
    error::Error,
    grpc::convert,
    job::{Delivered, EventKind, GapPolicy, JobEvent, Pace, Position},
};

pub(super) async fn events(
    State(state): State<RestState>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, RestError> {
    let id = convert::job_id(job_id)?;
    let position = match header_text(&headers, "last-event-id") {
        None => Position::Start,
        Some(last) => {
            let seq = last.trim().parse::<u64>().map_err(|_| {
                Error::InvalidArgument(format!("Last-Event-ID {last:?} is not an event's seq"))
            })?;
            Position::AfterSeq(seq)
        }
    };
    if let Position::AfterSeq(seq) = position {
        let job = state.jobs.status(&id).await?;
        let ended_at = job.log.map(|log| log.next_seq.saturating_sub(1));
        if job.exit.is_some() && ended_at.is_some_and(|last| seq >= last) {
            // The client has everything, `exited` included: no more reconnects.
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
    let stream = state
        .jobs
        .attach(&id, position, GapPolicy::Report, Pace::Watch)
        .await?;
    let events = stream
        .into_stream()
        .map(|delivered| Ok::<_, Infallible>(sse_event(delivered)));
    Ok(Sse::new(events).into_response())
}

fn sse_event(delivered: Result<Delivered, Error>) -> Event {
    let (name, seq, body) = match delivered {
        Ok(Delivered::Event(event)) => job_event(event),
        Ok(Delivered::Gap(gap)) => (
            "gap",
            gap.resumed_seq.saturating_sub(1),
            json!({
                "resumedSeq": gap.resumed_seq,
                "lostEvents": gap.lost_events,
                "lostStdoutBytes": gap.lost_stdout_bytes,
                "lostStderrBytes": gap.lost_stderr_bytes,
                "resumedStdoutOffset": gap.resumed_stdout_offset,
                "resumedStderrOffset": gap.resumed_stderr_offset,
                "exact": gap.exact,
            }),
        ),
        Ok(Delivered::Snapshot(snapshot)) => (
            "snapshot",
            snapshot.seq,
            json!({
                "seq": snapshot.seq,
                "screen": base64(&snapshot.screen),
                "rows": snapshot.size.rows,
                "cols": snapshot.size.cols,
                "cursorRow": snapshot.cursor.0,
                "cursorCol": snapshot.cursor.1,
                "stdoutOffset": snapshot.stdout_offset,
                "alternateScreen": snapshot.alternate_screen,
            }),
        ),
        Ok(Delivered::Keepalive { .. }) => return Event::default().comment("keepalive"),
        Err(e) => {
            let status = tonic::Status::from(e);
            return Event::default()
                .event("error")
                .json_data(
                    json!({ "error": status.message(), "code": format!("{:?}", status.code()) }),
                )
                .unwrap_or_default();
        }
    };
    Event::default()
        .event(name)
        .id(seq.to_string())
        .json_data(body)
        .unwrap_or_default()
}

fn job_event(event: JobEvent) -> (&'static str, u64, serde_json::Value) {
    let seq = event.seq;
    match event.kind {
        EventKind::Started {
            backend, pid, tty, ..
        } => (
            "started",
            seq,
            json!({
                "seq": seq,
                "backend": backend,
                "pid": pid,
                "tty": tty.map(|t| json!({ "rows": t.size.rows, "cols": t.size.cols, "term": t.term })),
            }),
        ),
        EventKind::Output {
            stream,
            offset,
            data,
        } => (
            "output",
            seq,
            json!({
                "seq": seq,
                "stream": stream.as_str(),
                "offset": offset,
                "data": base64(&data),
                "text": std::str::from_utf8(&data).ok(),
            }),
        ),
        EventKind::Exited(exit) => (
            "exited",
            seq,
            json!({
                "seq": seq,
                "status": exit.state.as_str(),
                "exitCode": exit.exit_code,
                "signal": exit.signal,
                "durationMs": exit.duration.as_millis() as u64,
                "finishedAt": epoch_ms(exit.finished_at),
                "stdoutBytes": exit.stdout_bytes,
                "stderrBytes": exit.stderr_bytes,
                "message": exit.message,
            }),
        ),
    }
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
