//! The Convex mirror: copies each job's output to the deployed `POST /daytona-ingest` route that
//! fills the `terminalOutput` table, so the existing web terminal keeps working.
//!
//! Per job: the output path only enqueues the raw chunks (`queue`), bounded in bytes; one
//! delivery task per job decodes them into records (`assemble`, with `utf8`; `record`) and
//! sends those one at a time, in order (`ingest`). A slow or broken Convex therefore never
//! slows a job; past the bound the oldest output is dropped and marked.

mod assemble;
mod config;
mod health;
mod ingest;
mod queue;
mod record;
#[cfg(test)]
mod test_support;
mod utf8;

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, info, info_span, warn};

use self::{
    assemble::{Assembled, Assembler},
    health::{Change, Failure, Health},
    ingest::{Ingest, SendOutcome},
    queue::{Batch, Queue, SharedBound, Take},
    record::{End, Item},
};
pub use self::{
    config::{ConvexArgs, ConvexConfigError, ConvexSettings, Secret},
    ingest::ClientError,
};
use crate::job::{
    DeliveryProgress, DeliveryReport, EventKind, ExitSummary, JobEvent, JobId, JobMeta, JobSink,
    JobSpec, JobState, Program, Sink, SinkHealth, Sinks,
};

/// The sink's name in Health.
pub const NAME: &str = "convex";

/// Mirrors jobs that carry a task_id and a session_id into Convex.
pub struct ConvexSink {
    inner: Arc<Inner>,
}

struct Inner {
    ingest: Ingest,
    queue_bytes: usize,
    /// The bound of all jobs' queues together.
    queue_total: Arc<SharedBound>,
    /// Delivery tasks, so shutdown can wait for them.
    tasks: TaskTracker,
    health: Mutex<Health>,
    shutdown: Shutdown,
    /// Jobs whose delivery task runs, by a key of their own, for the bytes pending in all.
    live: Mutex<HashMap<u64, Arc<JobShared>>>,
    next_key: AtomicU64,
}

/// What `flush` and the delivery tasks share at shutdown.
#[derive(Default)]
struct Shutdown {
    /// `flush` started: from now on a failure while unhealthy ends every job's delivery.
    flushing: AtomicBool,
    /// Cancelled when `flush` starts with the sink unhealthy: retries waiting out a backoff (up
    /// to 30 s with `Retry-After`) make their one more attempt now.
    retry_now: CancellationToken,
    /// Cancelled when nothing more can be delivered (or the deadline passed): every delivery
    /// task drops what it has, counts it, and ends.
    give_up: CancellationToken,
    /// Why, for the log.
    reason: Mutex<Option<String>>,
    lost: Mutex<Lost>,
}

/// What giving up at shutdown cost.
#[derive(Debug, Default, Clone, Copy)]
struct Lost {
    jobs: u64,
    /// Output bytes that were pending (queued or in flight).
    bytes: u64,
}

impl Inner {
    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().expect("sink lock poisoned")
    }

    fn live(&self) -> MutexGuard<'_, HashMap<u64, Arc<JobShared>>> {
        self.live.lock().expect("sink lock poisoned")
    }

    /// A record was accepted.
    fn delivered(&self) {
        if self.health().succeeded() == Change::TurnedHealthy {
            info!("Convex ingest accepts records again");
        }
    }

    /// An attempt failed. At shutdown, failing to reach the ingest while every recent attempt
    /// failed means waiting out the drain grace would deliver nothing: every job's delivery ends
    /// now. A refused record (400, 401) says nothing of the others' and ends no other job.
    fn attempt_failed(&self, reason: &str, failure: Failure) {
        let (change, healthy) = {
            let mut health = self.health();
            let change = health.failed(Instant::now(), reason, failure);
            (change, health.is_healthy())
        };
        if change == Change::TurnedUnhealthy && failure == Failure::Transient {
            warn!(%reason, "Convex ingest failing: every recent delivery attempt failed");
        }
        if !healthy && failure.is_unreachable() && self.shutdown.flushing.load(Ordering::SeqCst) {
            self.give_up(format!("the Convex ingest cannot be reached ({reason})"));
        }
    }

    /// Ends every job's delivery (the first reason is kept).
    fn give_up(&self, reason: String) {
        self.shutdown
            .reason
            .lock()
            .expect("sink lock poisoned")
            .get_or_insert(reason);
        self.shutdown.give_up.cancel();
    }

    /// Ends one job's delivery after [`give_up`](Self::give_up): drops what it has (`item`
    /// being sent, `ready` taken with it, what is queued) and counts it for the log.
    fn abandon_at_shutdown(
        &self,
        job: &JobShared,
        item: Option<&Item>,
        ready: &mut VecDeque<Item>,
    ) {
        let reason = self
            .shutdown
            .reason
            .lock()
            .expect("sink lock poisoned")
            .clone();
        let bytes = {
            let mut q = job.lock();
            q.record_error(&format!(
                "not mirrored at shutdown: {}",
                reason.as_deref().unwrap_or("gave up")
            ));
            q.abandon(item, ready)
        };
        let mut lost = self.shutdown.lost.lock().expect("sink lock poisoned");
        lost.jobs += 1;
        lost.bytes += bytes;
    }
}

impl ConvexSink {
    pub fn new(settings: &ConvexSettings) -> Result<Self, ClientError> {
        info!(
            url = %settings.ingest_url,
            queue_bytes = settings.queue_bytes,
            queue_total_bytes = settings.queue_total_bytes,
            "mirroring jobs to Convex"
        );
        Ok(ConvexSink {
            inner: Arc::new(Inner {
                ingest: Ingest::new(settings)?,
                queue_bytes: settings.queue_bytes,
                queue_total: SharedBound::new(settings.queue_total_bytes),
                tasks: TaskTracker::new(),
                health: Mutex::new(Health::default()),
                shutdown: Shutdown::default(),
                live: Mutex::default(),
                next_key: AtomicU64::new(0),
            }),
        })
    }
}

#[async_trait]
impl Sink for ConvexSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn open(&self, job_id: &JobId, spec: &JobSpec) -> Option<Box<dyn JobSink>> {
        // Rows are keyed by task and session in Convex; without them there is nowhere to write.
        if spec.meta.task_id.is_empty() || spec.meta.session_id.is_empty() {
            return None;
        }
        let mut queue = Queue::sharing(self.inner.queue_bytes, Arc::clone(&self.inner.queue_total));
        queue.push_echo(echo_line(&spec.program), epoch_ms(SystemTime::now()));
        let job = Arc::new(JobShared {
            queue: Mutex::new(queue),
            wake: Notify::new(),
        });
        let span = info_span!("convex_mirror", job_id = %job_id, task_id = %spec.meta.task_id,
                              session_id = %spec.meta.session_id);
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
        self.inner.live().insert(key, Arc::clone(&job));
        let inner = Arc::clone(&self.inner);
        let deliver = deliver_job(Arc::clone(&inner), Arc::clone(&job), spec.meta.clone());
        self.inner.tasks.spawn(
            async move {
                deliver.await;
                // Nothing is pending once delivery ended (delivered, or dropped and counted).
                inner.live().remove(&key);
            }
            .instrument(span),
        );
        Some(Box::new(ConvexJobSink { job }))
    }

    /// Waits for every job's records to be delivered, up to `deadline`, or until nothing more
    /// can be: when the ingest is failing (unhealthy) at shutdown, the next failed attempt ends
    /// every job's delivery, rather than retrying into an unreachable ingest for the whole grace.
    async fn flush(&self, deadline: Duration) {
        let inner = &self.inner;
        inner.tasks.close();
        if inner.tasks.is_empty() {
            return;
        }
        info!(jobs = inner.tasks.len(), "flushing job output to Convex");
        inner.shutdown.flushing.store(true, Ordering::SeqCst);
        if !inner.health().is_healthy() {
            inner.shutdown.retry_now.cancel();
        }
        if tokio::time::timeout(deadline, inner.tasks.wait())
            .await
            .is_err()
        {
            inner.give_up(format!(
                "not flushed within the drain grace ({})",
                humantime::format_duration(deadline)
            ));
            // Giving up takes no I/O: the tasks only count what they drop. Bounded all the same.
            let _ = tokio::time::timeout(Duration::from_secs(1), inner.tasks.wait()).await;
        }
        let Lost { jobs, bytes } = *inner.shutdown.lost.lock().expect("sink lock poisoned");
        if jobs > 0 {
            let reason = inner
                .shutdown
                .reason
                .lock()
                .expect("sink lock poisoned")
                .clone();
            warn!(
                jobs,
                bytes,
                reason = reason.as_deref().unwrap_or_default(),
                "stopped flushing to Convex; the pending output of these jobs is not mirrored"
            );
        }
    }

    fn health(&self) -> SinkHealth {
        self.inner.health().report()
    }

    fn pending_bytes(&self) -> Option<u64> {
        // One short lock per job with a delivery task: read when scraped, not per event.
        let live: Vec<Arc<JobShared>> = self.inner.live().values().cloned().collect();
        Some(live.iter().map(|job| job.lock().pending_bytes()).sum())
    }
}

/// State shared by a job's output path and its delivery task.
struct JobShared {
    queue: Mutex<Queue>,
    /// Wakes the delivery task when something was queued.
    wake: Notify,
}

impl JobShared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().expect("mirror queue poisoned")
    }
}

impl DeliveryReport for JobShared {
    fn report(&self) -> DeliveryProgress {
        let q = self.lock();
        let stats = q.stats();
        DeliveryProgress {
            records_delivered: stats.records_delivered,
            bytes_delivered: stats.bytes_delivered,
            bytes_dropped: stats.bytes_dropped,
            bytes_pending: q.pending_bytes(),
            invalid_bytes: stats.invalid_bytes,
            retries: stats.retries,
            ambiguous_retries: stats.ambiguous_retries,
            complete: stats.complete,
            last_error: stats.last_error.clone(),
        }
    }
}

/// The job's end of the mirror: enqueues, never waits (the lock guards in-memory work only: a
/// reference to the output chunk is queued, decoding happens on the delivery task).
struct ConvexJobSink {
    job: Arc<JobShared>,
}

impl JobSink for ConvexJobSink {
    fn event(&mut self, event: &JobEvent) {
        let ts = epoch_ms(event.time);
        let now = Instant::now();
        match &event.kind {
            EventKind::Started { .. } => return,
            EventKind::Output { stream, data, .. } => {
                self.job.lock().push_output(*stream, data, ts, now)
            }
            EventKind::Exited(summary) => self.job.lock().push_end(end_of(summary), ts),
        }
        self.job.wake.notify_one();
    }

    fn progress(&self) -> Option<Arc<dyn DeliveryReport>> {
        Some(Arc::clone(&self.job) as Arc<dyn DeliveryReport>)
    }
}

impl Drop for ConvexJobSink {
    fn drop(&mut self) {
        // The job core always sends Exited; should it not, the record still ends the mirror.
        let mut queue = self.job.lock();
        if !queue.is_finished() {
            queue.push_end(
                End::Error("the runner lost track of this job".into()),
                epoch_ms(SystemTime::now()),
            );
            drop(queue);
            self.job.wake.notify_one();
        }
    }
}

/// What the final record says: the real exit code when the program ended by itself, else why
/// it did not (the UI shows `[ERROR] <message>`).
fn end_of(summary: &ExitSummary) -> End {
    match (summary.state, summary.exit_code) {
        (JobState::Succeeded | JobState::Failed, Some(code)) => End::ExitCode(code),
        _ => End::Error(summary.message.clone()),
    }
}

/// The line the old runner sent first: `$ <command>` (argv shell-quoted), no newline.
fn echo_line(program: &Program) -> String {
    match program {
        Program::Shell(command) => format!("$ {command}"),
        Program::Argv(argv) => {
            let joined =
                shlex::try_join(argv.iter().map(String::as_str)).unwrap_or_else(|_| argv.join(" "));
            format!("$ {joined}")
        }
    }
}

fn epoch_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One job's delivery task: sends its records one at a time, in order, until the final one.
async fn deliver_job(sink: Arc<Inner>, job: Arc<JobShared>, meta: JobMeta) {
    let mut complained = false;
    let mut ended_at: Option<Instant> = None;
    // Decoding happens here, at send time, so output the queue drops is never decoded.
    let mut assembler = Assembler::default();
    let mut ready = VecDeque::new();
    let give_up = &sink.shutdown.give_up;
    loop {
        let Some(item) = ready.pop_front() else {
            let batches = tokio::select! {
                biased;
                () = give_up.cancelled() => {
                    sink.abandon_at_shutdown(&job, None, &mut ready);
                    break;
                }
                batches = next_batches(&job, &assembler) => batches,
            };
            let Some(batches) = batches else {
                break;
            };
            let mut found = Assembled::default();
            for batch in batches {
                found.add(assembler.assemble(batch, &mut ready));
            }
            if found.invalid > 0 || found.dropped > 0 || ready.is_empty() {
                let mut q = job.lock();
                q.assembled(&found);
                if ready.is_empty() {
                    q.settled();
                }
            }
            continue;
        };
        let is_final = matches!(item, Item::Final { .. });
        if is_final {
            ended_at = Some(Instant::now());
        }
        let body = ingest::encode(&meta, &item);
        let send = sink
            .ingest
            .send(body, &sink.shutdown.retry_now, |ambiguous, reason| {
                job.lock().record_retry(ambiguous, reason);
                metrics::counter!("sandbox_mirror_retries_total",
                    "sink" => NAME, "ambiguous" => if ambiguous { "true" } else { "false" })
                .increment(1);
                sink.attempt_failed(reason, Failure::Transient);
            });
        let outcome = tokio::select! {
            biased;
            () = give_up.cancelled() => {
                sink.abandon_at_shutdown(&job, Some(&item), &mut ready);
                break;
            }
            outcome = send => outcome,
        };
        match outcome {
            SendOutcome::Delivered => {
                record_delivered(&item);
                let mut q = job.lock();
                q.delivered(item.text_len());
                if ready.is_empty() {
                    q.settled();
                }
                drop(q);
                sink.delivered();
            }
            SendOutcome::Rejected { status, reason } => {
                metrics::counter!("sandbox_mirror_records_failed_total",
                    "sink" => NAME, "reason" => "rejected")
                .increment(1);
                sink.attempt_failed(&reason, Failure::Refused);
                let mut q = job.lock();
                q.record_error(&reason);
                // A bad secret, a wrong URL: every later record would be refused the same way.
                let hopeless = matches!(status, 401 | 403 | 404 | 405);
                if hopeless {
                    q.abandon(Some(&item), &mut ready);
                } else {
                    q.lost(&item, &mut ready);
                }
                drop(q);
                if !complained {
                    warn!(status, %reason, "Convex ingest refused a record; not retrying it{}",
                          if hopeless { " nor sending the rest of this job" } else { "" });
                    complained = true;
                }
                if hopeless {
                    break;
                }
            }
            SendOutcome::GaveUp { reason } => {
                metrics::counter!("sandbox_mirror_records_failed_total",
                    "sink" => NAME, "reason" => "gave_up")
                .increment(1);
                sink.attempt_failed(&reason, Failure::GaveUp);
                let mut q = job.lock();
                q.lost(&item, &mut ready);
                q.record_error(&reason);
                drop(q);
                if !complained {
                    warn!(%reason, "giving up on a record for Convex; it is marked as a gap");
                    complained = true;
                }
            }
        }
        if is_final {
            break;
        }
    }
    let report = {
        let mut q = job.lock();
        q.mark_complete();
        q.stats().clone()
    };
    info!(
        records = report.records_delivered,
        bytes = report.bytes_delivered,
        dropped_bytes = report.bytes_dropped,
        invalid_bytes = report.invalid_bytes,
        retries = report.retries,
        ambiguous_retries = report.ambiguous_retries,
        final_record_ms = ended_at.map(|t| t.elapsed().as_millis() as u64),
        "Convex mirror of the job finished"
    );
}

/// Counts a record the ingest accepted, and how long after its output it got there: the
/// record's time is the wall clock's, as Convex stores it, so a clock step skews one lag (never
/// below zero).
fn record_delivered(item: &Item) {
    metrics::counter!("sandbox_mirror_records_delivered_total", "sink" => NAME).increment(1);
    metrics::counter!("sandbox_mirror_delivered_bytes_total", "sink" => NAME)
        .increment(item.text_len() as u64);
    let lag_ms = epoch_ms(SystemTime::now()).saturating_sub(item.ts());
    metrics::histogram!("sandbox_mirror_delivery_lag_seconds", "sink" => NAME)
        .record(lag_ms as f64 / 1000.0);
}

/// Waits for the next output that is ready to send; `None` once the job's mirror is done.
async fn next_batches(job: &JobShared, assembler: &Assembler) -> Option<Vec<Batch>> {
    loop {
        // Registered before looking, so a push between the look and the wait is not missed.
        let notified = job.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let take = job.lock().take(Instant::now(), assembler.carried());
        match take {
            Take::Send(batches) => return Some(batches),
            Take::Done => return None,
            Take::Wait(None) => notified.await,
            Take::Wait(Some(due)) => {
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep_until(due.into()) => {}
                }
            }
        }
    }
}

/// The sinks the configuration asks for (`ConvexArgs::settings`, `None` when the mirror is off).
pub fn sinks(settings: Option<&ConvexSettings>) -> Result<Sinks, SinkSetupError> {
    let mut sinks: Vec<Arc<dyn Sink>> = Vec::new();
    if let Some(settings) = settings {
        sinks.push(Arc::new(ConvexSink::new(settings)?));
    }
    Ok(Sinks::new(sinks))
}

/// The configured sinks cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SinkSetupError {
    #[error(transparent)]
    Config(#[from] ConvexConfigError),
    #[error(transparent)]
    Client(#[from] ClientError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_echo_matches_the_old_runner() {
        assert_eq!(
            echo_line(&Program::Shell("ls -l | wc".into())),
            "$ ls -l | wc"
        );
        assert_eq!(
            echo_line(&Program::Argv(vec![
                "printf".into(),
                "%s\n".into(),
                "a b".into()
            ])),
            "$ printf '%s\n' 'a b'"
        );
    }

    fn summary(state: JobState, exit_code: Option<i32>, message: &str) -> ExitSummary {
        ExitSummary {
            state,
            exit_code,
            signal: None,
            duration: Duration::ZERO,
            finished_at: SystemTime::now(),
            stdout_bytes: 0,
            stderr_bytes: 0,
            message: message.into(),
        }
    }

    #[test]
    fn the_final_record_carries_the_real_exit_code_or_why() {
        assert_eq!(
            end_of(&summary(JobState::Succeeded, Some(0), "")),
            End::ExitCode(0)
        );
        assert_eq!(
            end_of(&summary(JobState::Failed, Some(3), "")),
            End::ExitCode(3)
        );
        assert_eq!(
            end_of(&summary(
                JobState::Cancelled,
                Some(143),
                "cancelled by request"
            )),
            End::Error("cancelled by request".into())
        );
        assert_eq!(
            end_of(&summary(JobState::TimedOut, None, "timed out after 1s")),
            End::Error("timed out after 1s".into())
        );
        assert_eq!(
            end_of(&summary(
                JobState::Failed,
                None,
                "killed by signal 9 (SIGKILL)"
            )),
            End::Error("killed by signal 9 (SIGKILL)".into())
        );
    }
}
