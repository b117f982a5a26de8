//! The table of running and recently finished jobs, the concurrency limit, and draining.

use std::{
    collections::{HashMap, VecDeque},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use tokio::sync::{Semaphore, mpsc};
// Tokio's clock: the system's monotonic clock unless a test pauses time, so tests can age
// finished jobs without waiting.
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, info, info_span, warn};

use super::{
    Backend, EventKind, ExitSummary, JobEvent, JobId, JobIdCodec, JobLocation, JobOutput, JobSpec,
    JobState, RemoteState, Sinks,
    budget::{Credit, OutputBudget},
    lifecycle,
    output::{ClientQueue, Delivery, free_unread},
    record::{JobRecord, JobSnapshot, StopReason},
};
use crate::error::Error;

/// Beyond the backend's stop time and a stuck client's grace, how long a drain waits for the
/// last events to go out.
const DRAIN_SLACK: Duration = Duration::from_secs(5);

/// Limits of the job core.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    pub max_concurrent: u32,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    /// Events buffered between a job and its Exec caller.
    pub stream_buffer: usize,
    pub finished_ttl: Duration,
    pub finished_capacity: usize,
    /// Once a job is stopped, how long its caller may take to make room for each event before
    /// the rest of its stream is dropped (a stuck reader must not hold the job open).
    pub stopped_client_grace: Duration,
    /// Output held in memory for callers, shared by all jobs (see `budget`).
    pub output_budget_bytes: usize,
    /// Output each job may hold whatever the others do, on top of the shared budget.
    pub output_reserve_bytes: usize,
}

/// All jobs of this server.
pub struct Jobs {
    backend: Arc<dyn Backend>,
    ids: JobIdCodec,
    sinks: Sinks,
    config: JobsConfig,
    permits: Arc<Semaphore>,
    budget: OutputBudget,
    table: Mutex<Table>,
    /// Parent of every job's stop token; cancelled when draining runs out of time.
    root: CancellationToken,
    tracker: TaskTracker,
    draining: AtomicBool,
}

#[derive(Default)]
struct Table {
    jobs: HashMap<JobId, Arc<JobRecord>>,
    /// Finished jobs, oldest first, for forgetting them.
    finished: VecDeque<(Instant, JobId)>,
}

impl Jobs {
    pub fn new(
        backend: Arc<dyn Backend>,
        ids: JobIdCodec,
        sinks: Sinks,
        config: JobsConfig,
    ) -> Arc<Self> {
        Arc::new(Jobs {
            backend,
            ids,
            sinks,
            permits: Arc::new(Semaphore::new(config.max_concurrent as usize)),
            budget: OutputBudget::new(config.output_budget_bytes, config.output_reserve_bytes),
            config,
            table: Mutex::new(Table::default()),
            root: CancellationToken::new(),
            tracker: TaskTracker::new(),
            draining: AtomicBool::new(false),
        })
    }

    /// Starts a job and returns its event stream. Dropping the stream cancels the job.
    pub async fn start(self: &Arc<Self>, spec: JobSpec) -> Result<JobStream, Error> {
        // Counts as a running job from before the draining check until it is registered (the
        // backend's start may take seconds), so a drain that begins meanwhile either is seen
        // here or waits for this job and cancels it; it never misses it.
        let starting = self.tracker.token();
        if self.is_draining() {
            return Err(Error::ShuttingDown);
        }
        let timeout = match spec.timeout {
            Some(t) if t > self.config.max_timeout => {
                return Err(Error::TimeoutTooLong {
                    requested: t,
                    max: self.config.max_timeout,
                });
            }
            Some(t) => t,
            None => self.config.default_timeout,
        };
        let permit =
            Arc::clone(&self.permits)
                .try_acquire_owned()
                .map_err(|_| Error::TooManyJobs {
                    limit: self.config.max_concurrent,
                })?;

        let span = info_span!(
            "job",
            id = tracing::field::Empty,
            task_id = %spec.meta.task_id,
            session_id = %spec.meta.session_id,
            sandbox_id = %spec.meta.sandbox_id,
            backend = self.backend.name(),
        );
        let execution = match self.backend.start(&spec).instrument(span.clone()).await {
            Ok(execution) => execution,
            Err(e) => {
                let e = Error::from(e);
                span.in_scope(|| info!(error = %e, "job did not start"));
                let (id, _) = self.ids.issue(&spec.meta, self.backend.name(), None);
                self.report_failed_start(&id, &spec, &e);
                return Err(e);
            }
        };
        let (id, _) = self
            .ids
            .issue(&spec.meta, self.backend.name(), execution.handle());
        span.record("id", tracing::field::display(&id));
        span.in_scope(|| {
            // Names only: env values may be secrets.
            let env_names: Vec<&str> = spec.env.keys().map(String::as_str).collect();
            info!(pid = execution.pid(), ?env_names, cwd = ?spec.cwd, "job started");
        });

        let sinks = self.sinks.open(&id, &spec);
        let mirror = sinks.iter().find_map(|s| s.progress());
        let record = Arc::new(JobRecord::new(
            id.clone(),
            spec.meta.clone(),
            self.backend.name(),
            self.root.child_token(),
            mirror,
        ));
        let (tx, rx) = mpsc::channel(self.config.stream_buffer);
        let queue: ClientQueue = Arc::new(Mutex::new(rx));
        let output = JobOutput::new(
            Arc::clone(&record),
            (tx, Arc::clone(&queue)),
            sinks,
            self.budget
                .for_job(record.stop.clone(), self.config.stopped_client_grace),
            self.config.stopped_client_grace,
        );
        let job = lifecycle::drive(Arc::clone(&record), execution, output, timeout, permit);
        let jobs = Arc::clone(self);
        let finished_id = id.clone();
        let tracked = {
            let mut table = self.table.lock().expect("job table poisoned");
            table.jobs.insert(id.clone(), Arc::clone(&record));
            // Tracked while the lock is held so a concurrent drain cannot miss this job.
            self.tracker.track_future(async move {
                job.await;
                jobs.retire(finished_id);
            })
        };
        tokio::spawn(tracked.instrument(span));
        drop(starting);
        Ok(JobStream {
            job_id: id,
            events: Arc::clone(&queue),
            in_transport: None,
            exited: false,
            _stop_on_drop: StopOnDrop(record, queue),
        })
    }

    /// A job that could not start still ends its copy in the sinks: they see one `Exited`
    /// (FAILED, with the reason) and nothing else. The Exec caller gets the error itself.
    fn report_failed_start(&self, id: &JobId, spec: &JobSpec, error: &Error) {
        let now = SystemTime::now();
        let event = JobEvent {
            seq: 0,
            time: now,
            kind: EventKind::Exited(ExitSummary {
                state: JobState::Failed,
                exit_code: None,
                signal: None,
                duration: Duration::ZERO,
                finished_at: now,
                stdout_bytes: 0,
                stderr_bytes: 0,
                message: error.to_string(),
            }),
        };
        for mut sink in self.sinks.open(id, spec) {
            sink.event(&event);
        }
    }

    /// Asks a job to stop; returns its state as of now. Jobs started by other replicas are
    /// stopped through the backend when it can reach them.
    pub async fn cancel(&self, id: &JobId) -> Result<JobSnapshot, Error> {
        match self.lookup(id)? {
            Found::Here(record) => {
                record.request_stop(StopReason::Cancelled);
                Ok(record.snapshot())
            }
            Found::Elsewhere(location, handle) => {
                let snapshot = self.remote_snapshot(id, &location, &handle).await?;
                if snapshot.state == JobState::Running {
                    info!(job_id = %id, replica = %location.replica, "cancelling a job of another replica");
                    self.backend.remote_cancel(&handle).await?;
                }
                Ok(snapshot)
            }
        }
    }

    /// Reports a running or recently finished job, here or (where the backend can reach it)
    /// on another replica.
    pub async fn status(&self, id: &JobId) -> Result<JobSnapshot, Error> {
        match self.lookup(id)? {
            Found::Here(record) => Ok(record.snapshot()),
            Found::Elsewhere(location, handle) => {
                self.remote_snapshot(id, &location, &handle).await
            }
        }
    }

    fn lookup(&self, id: &JobId) -> Result<Found, Error> {
        {
            let mut table = self.table.lock().expect("job table poisoned");
            self.forget_expired(&mut table);
            if let Some(record) = table.jobs.get(id) {
                return Ok(Found::Here(Arc::clone(record)));
            }
        }
        let location = self.ids.verify(id).map_err(|reason| Error::InvalidJobId {
            id: id.to_string(),
            reason,
        })?;
        if location.replica == self.ids.replica() {
            return Err(Error::JobNotFound(id.to_string()));
        }
        let detail = match &location.handle {
            Some(handle) if location.backend == self.backend.name() => {
                let handle = handle.clone();
                return Ok(Found::Elsewhere(location, handle));
            }
            Some(_) => "runs on another backend",
            None => "runs on a node-local backend",
        };
        Err(Error::JobElsewhere {
            job_id: id.to_string(),
            replica: location.replica,
            detail,
        })
    }

    async fn remote_snapshot(
        &self,
        id: &JobId,
        location: &JobLocation,
        handle: &str,
    ) -> Result<JobSnapshot, Error> {
        let (state, exit) = match self.backend.remote_state(handle).await? {
            RemoteState::Running => (JobState::Running, None),
            RemoteState::Exited { code, signal } => {
                let state = if code == Some(0) {
                    JobState::Succeeded
                } else {
                    JobState::Failed
                };
                (state, Some((code, signal)))
            }
            RemoteState::Gone => {
                return Err(Error::JobElsewhere {
                    job_id: id.to_string(),
                    replica: location.replica.clone(),
                    detail: "has ended; its final status is kept",
                });
            }
        };
        let started_at = location.started_at();
        let now = std::time::SystemTime::now();
        let age = now.duration_since(started_at).unwrap_or_default();
        Ok(JobSnapshot {
            id: id.clone(),
            meta: location.meta(),
            backend: self.backend.name(),
            state,
            started_at,
            running_for: exit.is_none().then_some(age),
            exit: exit.map(|(exit_code, signal)| ExitSummary {
                state,
                exit_code,
                signal,
                duration: age,
                finished_at: now,
                // Byte counts live with the replica that streamed the output.
                stdout_bytes: 0,
                stderr_bytes: 0,
                message: format!(
                    "reported by the backend; the job ran on replica {}",
                    location.replica
                ),
            }),
            stdout_bytes: 0,
            stderr_bytes: 0,
            // Mirror delivery, too, is tracked by the replica that ran the job.
            mirror: None,
        })
    }

    fn retire(&self, id: JobId) {
        let mut table = self.table.lock().expect("job table poisoned");
        table.finished.push_back((Instant::now(), id));
        self.forget_expired(&mut table);
    }

    fn forget_expired(&self, table: &mut Table) {
        while let Some((finished_at, _)) = table.finished.front() {
            let too_many = table.finished.len() > self.config.finished_capacity;
            if !too_many && finished_at.elapsed() < self.config.finished_ttl {
                break;
            }
            let (_, id) = table.finished.pop_front().expect("front exists");
            table.jobs.remove(&id);
        }
    }

    /// Jobs whose program is still running.
    pub fn active(&self) -> usize {
        self.config.max_concurrent as usize - self.permits.available_permits()
    }

    /// The server's output budget (what is in use, for Health and tests).
    pub fn output_budget(&self) -> &OutputBudget {
        &self.budget
    }

    pub fn max_concurrent(&self) -> u32 {
        self.config.max_concurrent
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn sinks(&self) -> &Sinks {
        &self.sinks
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Stops taking jobs, lets running ones go on for up to `grace`, then cancels the rest and
    /// waits until every job has sent its `Exited` event and the backend's cleanups are done,
    /// or until the backend's stop time (plus a little for the last events to go out) has
    /// passed since the cancel.
    pub async fn drain(&self, grace: Duration) {
        // Bounds the wait even if a client never reads its final events: each gets the
        // stopped-client grace before it is dropped.
        let stop_limit = self.backend.stop_time() + self.config.stopped_client_grace + DRAIN_SLACK;
        let drained = async {
            self.stop_taking_jobs_and_wait(grace).await;
            self.backend.finish_cleanups().await;
        };
        if tokio::time::timeout(grace + stop_limit, drained)
            .await
            .is_err()
        {
            warn!(
                running = self.tracker.len(),
                "jobs did not finish draining in time; exiting anyway"
            );
        }
    }

    async fn stop_taking_jobs_and_wait(&self, grace: Duration) {
        self.draining.store(true, Ordering::SeqCst);
        {
            // Taking the lock orders this after any start() that is registering a job.
            let _table = self.table.lock().expect("job table poisoned");
            self.tracker.close();
        }
        let running = self.tracker.len();
        if running > 0 {
            info!(running, grace = ?grace, "draining: waiting for running jobs");
        }
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            info!(
                running = self.tracker.len(),
                "drain grace elapsed; cancelling the remaining jobs"
            );
            self.root.cancel();
            self.tracker.wait().await;
        }
    }
}

/// Where a looked-up job is.
enum Found {
    Here(Arc<JobRecord>),
    /// Started by another replica; reachable through the backend with this handle.
    Elsewhere(JobLocation, String),
}

/// A job's events for its Exec caller. Dropping it before `Exited` cancels the job.
pub struct JobStream {
    pub job_id: JobId,
    events: ClientQueue,
    /// Credit of the event the transport took last: its bytes sit in the transport's buffers
    /// until the caller's flow-control window lets them out, which is when it asks for more.
    in_transport: Option<Credit>,
    /// Whether `Exited` came through; a stream that ends without it ends with an error.
    exited: bool,
    _stop_on_drop: StopOnDrop,
}

impl Stream for JobStream {
    type Item = Result<JobEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        // Asked again: what was taken last has left (see `in_transport`).
        self.in_transport = None;
        let next = self
            .events
            .lock()
            .expect("client queue poisoned")
            .poll_recv(cx);
        match next {
            Poll::Ready(Some(Delivery { event, credit })) => {
                self.in_transport = Some(credit);
                self.exited |= matches!(event.kind, super::EventKind::Exited(_));
                Poll::Ready(Some(Ok(event)))
            }
            Poll::Ready(None) if !self.exited => {
                self.exited = true; // report once, then end
                Poll::Ready(Some(Err(Error::StreamAbandoned(self.job_id.to_string()))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What a dropped [`JobStream`] does: the caller has gone.
struct StopOnDrop(Arc<JobRecord>, ClientQueue);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        // Close its queue so the job stops sending to it, and free what it left unread (and
        // the credit that holds) now, rather than when the job notices.
        free_unread(&self.1);
        // No-op for a job that already finished.
        self.0.request_stop(StopReason::ClientGone);
    }
}
