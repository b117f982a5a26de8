//! One job from `Started` to its single `Exited`: runs the backend's execution, enforces the
//! timeout, and decides the final state from how the program ended and why it was stopped.

use std::{sync::Arc, time::Duration};

use tokio::sync::OwnedSemaphorePermit;
use tracing::info;

use super::{DisconnectPolicy, Execution, Outcome};
use super::{
    EventKind, ExitSummary, JobOutput, JobState,
    record::{JobRecord, StopReason},
};

/// Runs a started (or followed) job to the end. `permit` holds the job's slot in the
/// concurrency limit; it is released as soon as the program is gone, before `Exited` is
/// delivered. Returns false when the job was left running instead (see
/// `Execution::run`): its log is abandoned, with no `Exited`.
///
/// `on_disconnect` applies to the readers of this replica: for a followed job,
/// `CancelAfter(grace)` means *stop following* once nobody has been attached for the grace,
/// never cancelling the job.
pub(super) async fn drive(
    job: Arc<JobRecord>,
    execution: Box<dyn Execution>,
    mut out: JobOutput,
    timeout: Duration,
    on_disconnect: DisconnectPolicy,
    permit: Option<OwnedSemaphorePermit>,
) -> bool {
    out.emit(EventKind::Started {
        backend: job.backend,
        pid: execution.pid(),
        capabilities: job.capabilities,
        tty: job.tty.clone(),
    })
    .await;
    metrics::counter!("sandbox_jobs_started_total", "backend" => job.backend).increment(1);

    let timer = tokio::spawn({
        let job = Arc::clone(&job);
        async move {
            tokio::select! {
                _ = tokio::time::sleep(timeout) => job.request_stop(StopReason::TimedOut(timeout)),
                grace = unattached_for(&job, on_disconnect) => {
                    if job.followed {
                        info!(idle = ?grace, "nobody attached to the followed job; no longer following it");
                        job.leave.cancel();
                    } else {
                        job.request_stop(StopReason::NoClient(grace));
                    }
                }
                _ = job.stop.cancelled() => {}
            }
        }
    });
    let outcome = execution
        .run(&mut out, job.stop.clone(), job.leave.clone())
        .await;
    timer.abort();
    job.input.end().await;
    drop(permit);
    if outcome == Outcome::Left {
        info!("left the job running; its readers are told to resume elsewhere");
        job.log.abandon();
        return false;
    }

    // The output is complete: what was held back of a split character goes out first.
    out.flush_split_chars().await;
    let summary = summarize(&job, outcome);
    info!(
        state = ?summary.state,
        exit_code = summary.exit_code,
        signal = summary.signal,
        stdout_bytes = summary.stdout_bytes,
        stderr_bytes = summary.stderr_bytes,
        duration_ms = summary.duration.as_millis() as u64,
        "job finished: {}",
        summary.message
    );
    // The job's span (see `Jobs::start`) ends with the job: its outcome, for traces.
    let span = tracing::Span::current();
    span.record("state", summary.state.as_str());
    if let Some(code) = summary.exit_code {
        span.record("exit_code", code);
    }
    if matches!(summary.state, JobState::Failed | JobState::TimedOut) {
        span.record("otel.status_code", "ERROR");
    }
    // Recorded before the event goes out, so a Status call made on seeing `Exited` agrees.
    metrics::counter!(
        "sandbox_jobs_finished_total",
        "backend" => job.backend, "state" => summary.state.as_str()
    )
    .increment(1);
    metrics::histogram!("sandbox_job_duration_seconds", "backend" => job.backend)
        .record(summary.duration.as_secs_f64());
    job.finish(summary.clone());
    out.emit(EventKind::Exited(summary)).await;
    true
}

/// Completes (with the grace) once no client has been attached for the grace of a
/// `CancelAfter` policy; never for the other policies.
async fn unattached_for(job: &JobRecord, policy: DisconnectPolicy) -> Duration {
    let DisconnectPolicy::CancelAfter(grace) = policy else {
        return std::future::pending().await;
    };
    let mut attached = job.log.attached();
    loop {
        // Wait until nobody is attached...
        if attached.wait_for(|&n| n == 0).await.is_err() {
            return std::future::pending().await;
        }
        // ...and stays so for the grace.
        let reattached = async { attached.wait_for(|&n| n > 0).await.is_ok() };
        tokio::select! {
            _ = tokio::time::sleep(grace) => return grace,
            ok = reattached => {
                if !ok {
                    return std::future::pending().await;
                }
            }
        }
    }
}

fn summarize(job: &JobRecord, outcome: Outcome) -> ExitSummary {
    use JobState::{Cancelled, Failed, Succeeded};
    let (state, exit_code, signal, message) = match (outcome, job.stop_reason()) {
        (Outcome::Exited { code, signal }, None) => {
            let state = if code == Some(0) { Succeeded } else { Failed };
            (state, code, signal, exit_message(code, signal))
        }
        // Stopped by us: the stop reason explains the exit better than its status does.
        (Outcome::Exited { code, signal }, Some(reason)) => {
            (reason.final_state(), code, signal, reason.describe())
        }
        (Outcome::Failed(message), None) => (Failed, None, None, message),
        // A backend failure says something the stop reason does not; keep both.
        (Outcome::Failed(message), Some(reason)) => (
            reason.final_state(),
            None,
            None,
            format!("{}; {message}", reason.describe()),
        ),
        (Outcome::Cancelled(message), reason) => (
            reason.map_or(Cancelled, StopReason::final_state),
            None,
            None,
            message,
        ),
        (Outcome::Left, _) => unreachable!("a left job is not summarised"),
    };
    ExitSummary {
        state,
        exit_code,
        signal,
        duration: job.started.elapsed(),
        finished_at: std::time::SystemTime::now(),
        stdout_bytes: job.output_bytes(super::StreamKind::Stdout),
        stderr_bytes: job.output_bytes(super::StreamKind::Stderr),
        message,
    }
}

fn exit_message(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("killed by signal {}", signal_name(signal)),
        (None, None) => "exited".to_owned(),
    }
}

fn signal_name(signal: i32) -> String {
    match nix::sys::signal::Signal::try_from(signal) {
        Ok(sig) => format!("{signal} ({})", sig.as_str()),
        Err(_) => signal.to_string(),
    }
}
