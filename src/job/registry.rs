//! The table of running and recently finished jobs, the concurrency limit, and draining.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
// Tokio's clock: the system's monotonic clock unless a test pauses time, so tests can age
// finished jobs without waiting.
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, info, info_span, warn};

use super::{
    Backend, Capabilities, DisconnectPolicy, EventKind, Execution, ExitSummary, JobEvent, JobId,
    JobIdCodec, JobLocation, JobMeta, JobOutput, JobSignal, JobSink, JobSpec, JobState,
    RemoteState, ResizeRefused, SignalRefused, Sinks, TerminalSize, TtySpec,
    budget::OutputBudget,
    input::{InputClosed, InputError, JobInput},
    lifecycle,
    log::{Delivered, EventLog, GapPolicy, LogLimits, LogReader, Pace, Position, PositionError},
    record::{JobControls, JobRecord, JobSnapshot, RecordInit, StopReason},
    screen::Screen,
    watch_rate::WatchRate,
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
    /// Bounds of each job's event log.
    pub log_limits: LogLimits,
    /// How long a reader's stream may be silent before it gets a keepalive.
    pub keepalive: Duration,
    /// How long finished jobs (their logs and idempotency keys) are kept.
    pub finished_ttl: Duration,
    pub finished_capacity: usize,
    /// Once a job is stopped, how long its caller may take to make room for each event before
    /// the rest of its stream is dropped (a stuck reader must not hold the job open).
    pub stopped_client_grace: Duration,
    /// Output held in memory for callers, shared by all jobs (see `budget`).
    pub output_budget_bytes: usize,
    /// Output each job may hold whatever the others do, on top of the shared budget.
    pub output_reserve_bytes: usize,
    /// Output finished jobs' logs keep together, for late readers.
    pub retained_output_bytes: usize,
    /// How long a job followed from another replica is followed with nobody attached here
    /// before this replica stops following it (the job runs on).
    pub follow_idle: Duration,
    /// Output all watchers together are sent per second (see `watch_rate`); `None`: no bound.
    pub watchers_bytes_per_sec: Option<u64>,
}

/// All jobs of this server.
pub struct Jobs {
    backend: Arc<dyn Backend>,
    ids: JobIdCodec,
    sinks: Sinks,
    config: JobsConfig,
    permits: Arc<Semaphore>,
    budget: OutputBudget,
    watch_rate: Option<Arc<WatchRate>>,
    table: Mutex<Table>,
    /// Parent of the stop token of every job that is not left at shutdown; cancelled when
    /// draining runs out of time.
    root: CancellationToken,
    /// Parent of every job's leave token; cancelled when draining runs out of time, which
    /// leaves running the jobs that outlive this server (see `RecordInit::leaves_on_shutdown`).
    leave_root: CancellationToken,
    tracker: TaskTracker,
    draining: AtomicBool,
    following: Arc<Following>,
}

/// Streams following jobs now (Exec callers and Attach streams), for `metrics`.
#[derive(Debug, Default)]
struct Following {
    exec: AtomicUsize,
    attach: AtomicUsize,
}

impl Following {
    fn count(&self, exec_caller: bool) -> &AtomicUsize {
        if exec_caller {
            &self.exec
        } else {
            &self.attach
        }
    }
}

/// Counts its stream in [`Following`] while it lives.
struct FollowGuard {
    following: Arc<Following>,
    exec_caller: bool,
}

impl FollowGuard {
    fn new(following: &Arc<Following>, exec_caller: bool) -> Self {
        following.count(exec_caller).fetch_add(1, Ordering::Relaxed);
        FollowGuard {
            following: Arc::clone(following),
            exec_caller,
        }
    }
}

impl Drop for FollowGuard {
    fn drop(&mut self) {
        self.following
            .count(self.exec_caller)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// Streams following jobs now, by who opened them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    /// Exec callers still reading their job.
    pub exec: usize,
    /// Attach streams (gRPC, or REST events).
    pub attach: usize,
}

#[derive(Default)]
struct Table {
    jobs: HashMap<JobId, Arc<JobRecord>>,
    /// Finished jobs, oldest first, for forgetting them.
    finished: VecDeque<(Instant, JobId)>,
    /// Idempotency keys of running and remembered jobs.
    keys: HashMap<String, KeyState>,
}

/// What an idempotency key stands for.
enum KeyState {
    /// A job is being started with it; the receiver's sender is dropped once that is decided.
    Starting {
        spec: Box<JobSpec>,
        decided: watch::Receiver<()>,
    },
    Started {
        spec: Box<JobSpec>,
        id: JobId,
    },
}

impl KeyState {
    fn spec(&self) -> &JobSpec {
        match self {
            KeyState::Starting { spec, .. } | KeyState::Started { spec, .. } => spec,
        }
    }
}

/// What a start with an idempotency key found.
enum Claim {
    /// The key is this call's to start a job with.
    Mine(KeyClaim),
    /// Another call is starting the job: wait for it, then look again.
    Wait(watch::Receiver<()>),
    /// The job the key started, still known.
    Existing(Arc<JobRecord>),
}

/// An idempotency key being started with; released (for a retry to start afresh) unless the
/// job started.
struct KeyClaim {
    jobs: Arc<Jobs>,
    key: String,
    _decided: watch::Sender<()>,
    started: bool,
}

impl Drop for KeyClaim {
    fn drop(&mut self) {
        if !self.started {
            let mut table = self.jobs.table.lock().expect("job table poisoned");
            if matches!(table.keys.get(&self.key), Some(KeyState::Starting { .. })) {
                table.keys.remove(&self.key);
            }
        }
    }
}

/// Which jobs ListJobs returns.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub task_id: Option<String>,
    pub session_id: Option<String>,
    pub state: Option<JobState>,
}

impl JobFilter {
    fn matches(&self, meta: &JobMeta, state: JobState) -> bool {
        self.task_id.as_ref().is_none_or(|t| *t == meta.task_id)
            && self
                .session_id
                .as_ref()
                .is_none_or(|s| *s == meta.session_id)
            && self.state.is_none_or(|s| s == state)
    }
}

/// Where a page of ListJobs ends: jobs are listed newest first, by start time then id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListCursor {
    pub started_at: SystemTime,
    pub id: JobId,
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
            budget: OutputBudget::new(config.output_budget_bytes, config.output_reserve_bytes)
                .retaining_at_most(config.retained_output_bytes),
            watch_rate: config
                .watchers_bytes_per_sec
                .map(|rate| Arc::new(WatchRate::new(rate, watch_burst(rate)))),
            config,
            table: Mutex::new(Table::default()),
            root: CancellationToken::new(),
            leave_root: CancellationToken::new(),
            tracker: TaskTracker::new(),
            draining: AtomicBool::new(false),
            following: Arc::default(),
        })
    }

    /// Starts a job and returns its event stream from the start. With the `Cancel` disconnect
    /// policy, dropping the stream cancels the job. A start with the idempotency key of a job
    /// still remembered returns that job's stream instead (from the start), when the request
    /// is the same.
    pub async fn start(self: &Arc<Self>, spec: JobSpec) -> Result<JobStream, Error> {
        let Some(key) = spec.idempotency_key.clone() else {
            return self.start_new(spec, None).await;
        };
        loop {
            match self.claim(&key, &spec)? {
                Claim::Mine(claim) => return self.start_new(spec, Some(claim)).await,
                Claim::Existing(record) => {
                    info!(job_id = %record.id, "idempotent Exec retried: attaching to its job");
                    let reader =
                        reader_for(&record, Position::Start, GapPolicy::Report, Pace::Lossless)?;
                    return Ok(self.stream(&record, reader, true));
                }
                Claim::Wait(mut decided) => {
                    // Ends (as an error) when the other start is decided either way.
                    let _ = decided.changed().await;
                }
            }
        }
    }

    fn claim(self: &Arc<Self>, key: &str, spec: &JobSpec) -> Result<Claim, Error> {
        let mut table = self.table.lock().expect("job table poisoned");
        self.forget_expired(&mut table);
        if let Some(state) = table.keys.get(key) {
            if state.spec() != spec {
                return Err(Error::IdempotencyKeyReused(key.to_owned()));
            }
            match state {
                KeyState::Starting { decided, .. } => return Ok(Claim::Wait(decided.clone())),
                KeyState::Started { id, .. } => {
                    if let Some(record) = table.jobs.get(id) {
                        return Ok(Claim::Existing(Arc::clone(record)));
                    }
                }
            }
        }
        let (decide, decided) = watch::channel(());
        table.keys.insert(
            key.to_owned(),
            KeyState::Starting {
                spec: Box::new(spec.clone()),
                decided,
            },
        );
        Ok(Claim::Mine(KeyClaim {
            jobs: Arc::clone(self),
            key: key.to_owned(),
            _decided: decide,
            started: false,
        }))
    }

    async fn start_new(
        self: &Arc<Self>,
        spec: JobSpec,
        mut claim: Option<KeyClaim>,
    ) -> Result<JobStream, Error> {
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
        if let DisconnectPolicy::CancelAfter(grace) = spec.on_disconnect
            && grace > self.config.max_timeout
        {
            return Err(Error::InvalidArgument(format!(
                "disconnect_grace {} exceeds the server maximum timeout of {}",
                humantime::format_duration(grace),
                humantime::format_duration(self.config.max_timeout)
            )));
        }
        let capabilities = self.backend.capabilities();
        for (asked, can, capability) in [
            (spec.stdin, capabilities.stdin, "stdin"),
            (spec.tty.is_some(), capabilities.tty, "tty"),
        ] {
            if asked && !can {
                return Err(Error::Unsupported {
                    backend: self.backend.name(),
                    capability,
                });
            }
        }
        // Before anything runs: a job whose screen does not fit is refused.
        let screen = match &spec.tty {
            Some(tty) => Some((Screen::new(tty.size, &self.budget)?, tty.clone())),
            None => None,
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
            state = tracing::field::Empty,
            exit_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let starting_at = Instant::now();
        let execution = match self.backend.start(&spec).instrument(span.clone()).await {
            Ok(execution) => {
                metrics::histogram!("sandbox_job_start_seconds", "backend" => self.backend.name())
                    .record(starting_at.elapsed().as_secs_f64());
                execution
            }
            Err(e) => {
                let e = Error::from(e);
                span.record("otel.status_code", "ERROR");
                span.in_scope(|| info!(error = %e, "job did not start"));
                let (id, _) = self.ids.issue(
                    &spec.meta,
                    self.backend.name(),
                    None,
                    (timeout, spec.on_disconnect),
                );
                self.report_failed_start(&id, &spec, &e);
                metrics::counter!("sandbox_jobs_start_failed_total", "backend" => self.backend.name())
                    .increment(1);
                return Err(e);
            }
        };
        let handle = execution.handle();
        let (id, _) = self.ids.issue(
            &spec.meta,
            self.backend.name(),
            handle.clone(),
            (timeout, spec.on_disconnect),
        );
        span.record("id", tracing::field::display(&id));
        span.in_scope(|| {
            // Names only: env values may be secrets.
            let env_names: Vec<&str> = spec.env.keys().map(String::as_str).collect();
            info!(pid = execution.pid(), ?env_names, cwd = ?spec.cwd, "job started");
        });

        // Inside the job's span, so the sinks' spans (a mirror's deliveries) are its children.
        let sinks = span.in_scope(|| self.sinks.open(&id, &spec));
        let (record, job) = self.prepare(
            &id,
            RecordInit::started(&spec, handle),
            (execution, screen),
            sinks,
            (timeout, spec.on_disconnect),
            Some(permit),
        );
        // Attached before the job emits anything, so the caller gets every event.
        let reader = record
            .log
            .reader(Position::Start, GapPolicy::Report, Pace::Lossless)
            .expect("the start of an empty log is held");
        let tracked = {
            let mut table = self.table.lock().expect("job table poisoned");
            table.jobs.insert(id.clone(), Arc::clone(&record));
            if let (Some(claim), Some(key)) = (claim.as_mut(), &spec.idempotency_key) {
                claim.started = true;
                table.keys.insert(
                    key.clone(),
                    KeyState::Started {
                        spec: Box::new(spec.clone()),
                        id: id.clone(),
                    },
                );
            }
            // Tracked while the lock is held so a concurrent drain cannot miss this job.
            self.track(id, job)
        };
        tokio::spawn(tracked.instrument(span));
        drop(starting);
        drop(claim);
        Ok(self.stream(&record, reader, true))
    }

    /// The record, log and lifecycle of a job that runs now, started here or followed: the
    /// lifecycle does nothing until it is polled, so readers opened on the record's log before
    /// it is spawned miss nothing.
    fn prepare(
        &self,
        id: &JobId,
        init: RecordInit,
        (mut execution, screen): (Box<dyn Execution>, Option<(Screen, TtySpec)>),
        sinks: Vec<Box<dyn JobSink>>,
        (timeout, on_disconnect): (Duration, DisconnectPolicy),
        permit: Option<OwnedSemaphorePermit>,
    ) -> (
        Arc<JobRecord>,
        impl std::future::Future<Output = bool> + Send + 'static,
    ) {
        let mirror = sinks.iter().find_map(|s| s.progress());
        let log = if init.followed {
            EventLog::following(self.config.log_limits)
        } else {
            EventLog::new(self.config.log_limits)
        };
        // Shutdown either leaves a job or stops it, never both.
        let (stop, leave) = if init.leaves_on_shutdown() {
            (CancellationToken::new(), self.leave_root.child_token())
        } else {
            (self.root.child_token(), CancellationToken::new())
        };
        let input = match execution.take_input() {
            Some(sink) => JobInput::open(sink),
            None => JobInput::none(),
        };
        let on_char_boundaries = init.text_output;
        let controls = JobControls {
            input,
            signaller: execution.take_signaller(),
            terminal: execution.take_terminal(),
            screen,
        };
        let record = Arc::new(JobRecord::new(
            id.clone(),
            init,
            (self.backend.name(), self.backend.capabilities()),
            (stop, leave),
            mirror,
            Arc::clone(&log),
            controls,
        ));
        let output = JobOutput::new(
            Arc::clone(&record),
            sinks,
            self.budget
                .for_job(record.stop.clone(), self.config.stopped_client_grace, log),
            on_char_boundaries,
        );
        let job = lifecycle::drive(
            Arc::clone(&record),
            execution,
            output,
            timeout,
            on_disconnect,
            permit,
        );
        (record, job)
    }

    /// A job's lifecycle, tracked for draining, then retired (or, if it was left running,
    /// forgotten at once). Call with the table locked, so that a concurrent drain cannot miss
    /// the job.
    fn track(
        self: &Arc<Self>,
        id: JobId,
        job: impl std::future::Future<Output = bool> + Send + 'static,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let jobs = Arc::clone(self);
        self.tracker.track_future(async move {
            if job.await {
                jobs.retire(id);
            } else {
                jobs.forget_left(&id);
            }
        })
    }

    /// A reader's stream; the Exec caller's (`exec_caller`) cancels a job with the `Cancel`
    /// policy when dropped.
    fn stream(&self, record: &Arc<JobRecord>, reader: LogReader, exec_caller: bool) -> JobStream {
        let cancel = exec_caller && record.on_disconnect == DisconnectPolicy::Cancel;
        JobStream {
            job_id: record.id.clone(),
            // A lossless reader's last event stays counted in the log (it pins it); a
            // watcher's must be counted here, or a hundred watchers hold a hundred chunks
            // beyond the budget.
            watching: (!reader.holds_job()).then(|| Watching {
                budget: self.budget.clone(),
                rate: self.watch_rate.clone(),
                unpaid: 0,
            }),
            in_transport: None,
            pending: None,
            record: Arc::clone(record),
            reader,
            snapshot_due: false,
            keepalive: self.config.keepalive,
            _cancel_on_drop: cancel.then(|| CancelOnDrop(Arc::clone(record))),
            _following: FollowGuard::new(&self.following, exec_caller),
        }
    }

    /// Follows a job from `position`, holding the job back or not (`pace`). Dropping the
    /// stream detaches; it never stops the job. A job this replica does not hold but its
    /// backend can reach (started by another replica, or by an earlier run of this one) is
    /// followed through the backend, under the same id, from its first byte: its seqs are
    /// this replica's own, so it is resumed by offsets, never after a seq.
    pub async fn attach(
        self: &Arc<Self>,
        id: &JobId,
        position: Position,
        on_gap: GapPolicy,
        pace: Pace,
    ) -> Result<JobStream, Error> {
        match self.lookup(id)? {
            Found::Here(record) => self.open_reader(&record, position, on_gap, pace),
            Found::Elsewhere(location, handle) => {
                self.follow(id, &location, handle, (position, on_gap, pace))
                    .await
            }
        }
    }

    /// Follows a `tty` job from its screen as it is now: a snapshot, then live output. A job
    /// without a terminal is followed from the start.
    pub async fn attach_to_screen(
        self: &Arc<Self>,
        id: &JobId,
        on_gap: GapPolicy,
        pace: Pace,
    ) -> Result<JobStream, Error> {
        if let Found::Here(record) = self.lookup(id)?
            && let Some(drawn) = record.screen.as_ref().and_then(Screen::drawn_seq)
        {
            // After what the screen has drawn (the log always holds that seq); the snapshot
            // sent first is taken again when the stream starts, and the reader moves on to it.
            let mut stream = self.open_reader(&record, Position::AfterSeq(drawn), on_gap, pace)?;
            stream.snapshot_due = true;
            return Ok(stream);
        }
        self.attach(id, Position::Start, on_gap, pace).await
    }

    fn open_reader(
        &self,
        record: &Arc<JobRecord>,
        position: Position,
        on_gap: GapPolicy,
        pace: Pace,
    ) -> Result<JobStream, Error> {
        let reader = reader_for(record, position, on_gap, pace)?;
        Ok(self.stream(record, reader, false))
    }

    /// Starts following a job this replica does not hold, registers it under its id, and
    /// opens the first reader on it.
    async fn follow(
        self: &Arc<Self>,
        id: &JobId,
        location: &JobLocation,
        handle: String,
        (position, on_gap, pace): (Position, GapPolicy, Pace),
    ) -> Result<JobStream, Error> {
        refuse_foreign_seq(id, position)?;
        // Counts as a running job from here, like a start (see `start_new`).
        let starting = self.tracker.token();
        if self.is_draining() {
            return Err(Error::ShuttingDown);
        }
        if self.backend.remote_state(&handle).await? == RemoteState::Gone {
            return Err(self.gone(id, location));
        }
        let span = info_span!(
            "job",
            id = %id,
            task_id = %location.task_id,
            session_id = %location.session_id,
            sandbox_id = %location.sandbox_id,
            backend = self.backend.name(),
            followed_from = %location.replica,
            state = tracing::field::Empty,
            exit_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let execution = self
            .backend
            .follow(&handle)
            .instrument(span.clone())
            .await?;
        // The deadline the job was started with, from its start (the id says both).
        let age = SystemTime::now()
            .duration_since(location.started_at())
            .unwrap_or_default();
        let timeout = location
            .timeout()
            .unwrap_or(self.config.max_timeout)
            .saturating_sub(age);
        let init = RecordInit {
            meta: location.meta(),
            started_at: location.started_at(),
            // What Status reports; this replica follows the job by its own rule (below).
            on_disconnect: location.on_disconnect().unwrap_or_default(),
            idempotency_key: None,
            handle: Some(handle),
            followed: true,
            text_output: false,
        };
        // No sinks: the replica that started the job mirrors it.
        let (record, job) = self.prepare(
            id,
            init,
            // A job's terminal is not in its id: a followed job has no screen here.
            (execution, None),
            Vec::new(),
            (
                timeout,
                DisconnectPolicy::CancelAfter(self.config.follow_idle),
            ),
            None,
        );
        let mut table = self.table.lock().expect("job table poisoned");
        if let Some(existing) = table.jobs.get(id) {
            // Another Attach started following it meanwhile: share that one. Ours never ran,
            // and a follower owns nothing of the job, so dropping it changes nothing.
            let existing = Arc::clone(existing);
            drop(table);
            return self.open_reader(&existing, position, on_gap, pace);
        }
        let stream = self.open_reader(&record, position, on_gap, pace)?;
        table.jobs.insert(id.clone(), Arc::clone(&record));
        let tracked = self.track(id.clone(), job);
        drop(table);
        span.in_scope(|| info!("following a job started elsewhere"));
        tokio::spawn(tracked.instrument(span));
        drop(starting);
        Ok(stream)
    }

    /// This replica's running and remembered jobs that match `filter`, newest first, at most
    /// `limit` after `after`; and where the next page starts when there may be one.
    pub fn list(
        &self,
        filter: &JobFilter,
        limit: usize,
        after: Option<&ListCursor>,
    ) -> (Vec<JobSnapshot>, Option<ListCursor>) {
        let mut matching: Vec<JobSnapshot> = {
            let mut table = self.table.lock().expect("job table poisoned");
            self.forget_expired(&mut table);
            table
                .jobs
                .values()
                .map(|record| record.snapshot())
                .collect()
        };
        matching.retain(|job| filter.matches(&job.meta, job.state));
        // Newest first; the id breaks ties so that pages never overlap or skip.
        let key = |job: &JobSnapshot| {
            (
                std::cmp::Reverse(job.started_at),
                std::cmp::Reverse(job.id.clone()),
            )
        };
        matching.sort_by_key(key);
        if let Some(after) = after {
            let boundary = (
                std::cmp::Reverse(after.started_at),
                std::cmp::Reverse(after.id.clone()),
            );
            matching.retain(|job| key(job) > boundary);
        }
        let more = matching.len() > limit;
        matching.truncate(limit);
        let next = more
            .then(|| matching.last())
            .flatten()
            .map(|last| ListCursor {
                started_at: last.started_at,
                id: last.id.clone(),
            });
        (matching, next)
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

    /// Writes `data` to a job's stdin (see [`JobInput::write`]); returns the bytes it has
    /// accepted in all.
    pub async fn send_input(
        &self,
        id: &JobId,
        data: bytes::Bytes,
        offset: Option<u64>,
    ) -> Result<u64, Error> {
        write_input(self.input_of(id)?, id.clone(), data, offset).await
    }

    /// Closes a job's stdin (the process reads EOF); returns the bytes it accepted in all.
    pub async fn close_input(&self, id: &JobId) -> Result<u64, Error> {
        close_input(self.input_of(id)?, id.clone()).await
    }

    /// Sends a job a signal (to its process group).
    pub fn signal(&self, id: &JobId, signal: JobSignal) -> Result<(), Error> {
        match self.lookup(id)? {
            Found::Here(record) => signal_job(&record, signal),
            Found::Elsewhere(..) => Err(Error::Signal {
                job_id: id.to_string(),
                source: SignalRefused::Unsupported(self.backend.name()),
            }),
        }
    }

    /// Sets the size of a job's terminal.
    pub fn resize(&self, id: &JobId, size: TerminalSize) -> Result<(), Error> {
        match self.lookup(id)? {
            Found::Here(record) => resize_job(&record, size),
            // Only jobs with handles are found elsewhere, and a handle carries no terminal.
            Found::Elsewhere(..) => Err(Error::Resize {
                job_id: id.to_string(),
                source: ResizeRefused::NoTerminal,
            }),
        }
    }

    fn input_of(&self, id: &JobId) -> Result<Arc<JobInput>, Error> {
        match self.lookup(id)? {
            Found::Here(record) => Ok(Arc::clone(&record.input)),
            // Only this backend's jobs with handles are found elsewhere, and none has stdin.
            Found::Elsewhere(..) => Err(input_error(
                id,
                InputError::Closed(InputClosed::NotRequested),
            )),
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
            // Not held, though this replica's: an earlier run of it (same name) started it, or
            // it was forgotten. The backend may still reach it.
            return match &location.handle {
                Some(handle) if location.backend == self.backend.name() => {
                    let handle = handle.clone();
                    Ok(Found::Elsewhere(Box::new(location), handle))
                }
                _ => Err(Error::JobNotFound(id.to_string())),
            };
        }
        let detail = match &location.handle {
            Some(handle) if location.backend == self.backend.name() => {
                let handle = handle.clone();
                return Ok(Found::Elsewhere(Box::new(location), handle));
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
            RemoteState::Gone => return Err(self.gone(id, location)),
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
            // Mirror delivery, the policy and the log, too, live with the replica that ran it.
            mirror: None,
            on_disconnect: DisconnectPolicy::default(),
            log: None,
            stdin: None,
            tty: None,
        })
    }

    /// A job the backend no longer knows: its final status is with the replica that ran it,
    /// or (for this replica's own) forgotten.
    fn gone(&self, id: &JobId, location: &JobLocation) -> Error {
        if location.replica == self.ids.replica() {
            return Error::JobNotFound(id.to_string());
        }
        Error::JobElsewhere {
            job_id: id.to_string(),
            replica: location.replica.clone(),
            detail: "has ended; its final status is kept",
        }
    }

    /// Forgets a job left running: this replica no longer follows it, and later calls reach
    /// it through the backend.
    fn forget_left(&self, id: &JobId) {
        let mut table = self.table.lock().expect("job table poisoned");
        if let Some(record) = table.jobs.remove(id)
            && let Some(key) = &record.idempotency_key
            && matches!(table.keys.get(key), Some(KeyState::Started { id: started, .. }) if started == id)
        {
            table.keys.remove(key);
        }
    }

    /// One sweep of what ended jobs left in the backend (see [`Backend::sweep`]), keeping what
    /// the jobs this replica holds use.
    pub async fn sweep(&self) -> Result<usize, Error> {
        let held: HashSet<String> = {
            let mut table = self.table.lock().expect("job table poisoned");
            self.forget_expired(&mut table);
            table
                .jobs
                .values()
                .filter_map(|record| record.handle.clone())
                .collect()
        };
        Ok(self.backend.sweep(self.config.finished_ttl, &held).await?)
    }

    /// Sweeps every `interval` (the first after one interval), until dropped.
    pub async fn sweep_every(&self, interval: Duration) {
        let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match self.sweep().await {
                Ok(0) => {}
                Ok(deleted) => info!(deleted, "swept what ended jobs left in the backend"),
                Err(e) => warn!(error = %e, "the sweep of ended jobs' leftovers failed"),
            }
        }
    }

    fn retire(&self, id: JobId) {
        let mut table = self.table.lock().expect("job table poisoned");
        if let Some(record) = table.jobs.get(&id) {
            self.budget.retired().retire(&record.log);
        }
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
            if let Some(record) = table.jobs.remove(&id)
                && let Some(key) = &record.idempotency_key
                && matches!(table.keys.get(key), Some(KeyState::Started { id: started, .. }) if *started == id)
            {
                table.keys.remove(key);
            }
        }
    }

    /// Jobs whose program is still running.
    pub fn active(&self) -> usize {
        self.config.max_concurrent as usize - self.permits.available_permits()
    }

    /// Streams following jobs now.
    pub fn attached(&self) -> Attached {
        Attached {
            exec: self.following.exec.load(Ordering::Relaxed),
            attach: self.following.attach.load(Ordering::Relaxed),
        }
    }

    /// The server's output budget (what is in use, for Health and tests).
    pub fn output_budget(&self) -> &OutputBudget {
        &self.budget
    }

    pub fn max_concurrent(&self) -> u32 {
        self.config.max_concurrent
    }

    /// What the backend's jobs can do.
    pub fn capabilities(&self) -> Capabilities {
        self.backend.capabilities()
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
                "drain grace elapsed; leaving running the jobs that outlive this server \
                 (followed, or detached on such a backend) and cancelling the rest"
            );
            self.leave_root.cancel();
            self.root.cancel();
            self.tracker.wait().await;
        }
    }
}

/// Where a looked-up job is.
enum Found {
    Here(Arc<JobRecord>),
    /// Started by another replica; reachable through the backend with this handle.
    Elsewhere(Box<JobLocation>, String),
}

/// A reader of `record`'s log at `position`. Seqs are per replica: a job followed from
/// another replica is resumed by offsets, never after a seq.
fn reader_for(
    record: &JobRecord,
    position: Position,
    on_gap: GapPolicy,
    pace: Pace,
) -> Result<LogReader, Error> {
    if record.followed {
        refuse_foreign_seq(&record.id, position)?;
    }
    record
        .log
        .reader(position, on_gap, pace)
        .map_err(|source| position_error(&record.id, source))
}

/// Sets the size of `record`'s job's terminal, or says why not.
fn resize_job(record: &JobRecord, size: TerminalSize) -> Result<(), Error> {
    record.resize(size).map_err(|source| Error::Resize {
        job_id: record.id.to_string(),
        source,
    })
}

/// Sends `record`'s job `signal`, or says why not.
fn signal_job(record: &JobRecord, signal: JobSignal) -> Result<(), Error> {
    record.signal(signal).map_err(|source| Error::Signal {
        job_id: record.id.to_string(),
        source,
    })
}

/// Writes `data` to job `id`'s stdin (see [`JobInput::write`]).
async fn write_input(
    input: Arc<JobInput>,
    id: JobId,
    data: bytes::Bytes,
    offset: Option<u64>,
) -> Result<u64, Error> {
    let written = input.write(data, offset).await;
    written.map_err(|source| input_error(&id, source))
}

/// Closes job `id`'s stdin (see [`JobInput::close`]).
async fn close_input(input: Arc<JobInput>, id: JobId) -> Result<u64, Error> {
    let closed = input.close().await;
    closed.map_err(|source| input_error(&id, source))
}

/// The service's error for a write to job `id`'s stdin.
fn input_error(id: &JobId, source: InputError) -> Error {
    Error::Input {
        job_id: id.to_string(),
        source,
    }
}

/// Seqs are per replica: a job followed from another replica is resumed by offsets, never
/// after a seq.
fn refuse_foreign_seq(id: &JobId, position: Position) -> Result<(), Error> {
    match position {
        Position::AfterSeq(_) => Err(Error::SeqOfAnotherReplica {
            job_id: id.to_string(),
        }),
        _ => Ok(()),
    }
}

/// The service's error for a reader of job `id` that cannot open or go on.
fn position_error(id: &JobId, source: PositionError) -> Error {
    match source {
        PositionError::Abandoned => Error::JobLeft {
            job_id: id.to_string(),
        },
        source => Error::Position {
            job_id: id.to_string(),
            source,
        },
    }
}

/// A job's events for one reader (the Exec caller or an Attach). Dropping it detaches; for the
/// Exec caller of a job with the `Cancel` policy it also cancels the job.
pub struct JobStream {
    pub job_id: JobId,
    reader: LogReader,
    keepalive: Duration,
    /// For a watcher: what its output costs the server.
    watching: Option<Watching>,
    /// That count, released when the reader asks for the next event (it has left by then).
    in_transport: Option<tokio::sync::OwnedSemaphorePermit>,
    /// What the log gave and the stream has not yet handed out.
    pending: Option<Result<Delivered, PositionError>>,
    /// The job, whose stdin any attached client may write to, and which it may signal.
    record: Arc<JobRecord>,
    /// A `tty` job's screen is sent next (after a gap, or first when asked for).
    snapshot_due: bool,
    _cancel_on_drop: Option<CancelOnDrop>,
    _following: FollowGuard,
}

impl JobStream {
    /// Writes to the job's stdin (see [`JobInput::write`]); the future owns what it needs, so
    /// it can run beside this stream.
    pub fn write_input(
        &self,
        data: bytes::Bytes,
        offset: Option<u64>,
    ) -> impl std::future::Future<Output = Result<u64, Error>> + Send + 'static {
        write_input(
            Arc::clone(&self.record.input),
            self.job_id.clone(),
            data,
            offset,
        )
    }

    /// Sends the job a signal (to its process group).
    pub fn signal(&self, signal: JobSignal) -> Result<(), Error> {
        signal_job(&self.record, signal)
    }

    /// Sets the size of the job's terminal.
    pub fn resize(&self, size: TerminalSize) -> Result<(), Error> {
        resize_job(&self.record, size)
    }

    /// Closes the job's stdin (see [`JobInput::close`]), as `write_input`.
    pub fn close_input(
        &self,
    ) -> impl std::future::Future<Output = Result<u64, Error>> + Send + 'static {
        close_input(Arc::clone(&self.record.input), self.job_id.clone())
    }

    /// The next event, gap or keepalive; `None` after `Exited`.
    pub async fn next(&mut self) -> Option<Result<Delivered, Error>> {
        self.in_transport = None;
        if let Some(watching) = &mut self.watching {
            // Paid after sending and before taking more: while it waits it holds nothing,
            // and when it goes on it reads from where the log is by then.
            if let (Some(rate), 1..) = (&watching.rate, watching.unpaid) {
                rate.pay(watching.unpaid).await;
            }
            watching.unpaid = 0;
        }
        if self.snapshot_due
            && let Some(screen) = &self.record.screen
        {
            self.snapshot_due = false;
            // None once the job has ended: the stream goes on with the log's tail.
            if let Some(snapshot) = screen.snapshot() {
                // The screen holds what the events up to its seq drew: the stream goes on
                // after them (should they be evicted meanwhile, a gap and a new snapshot
                // follow).
                self.reader.skip_to(snapshot.seq + 1);
                return Some(Ok(Delivered::Snapshot(snapshot)));
            }
        }
        // Kept across an await that may be cancelled (the Attach handler selects on this and
        // on the client's messages), so no event is ever lost between the log and the client.
        if self.pending.is_none() {
            self.pending = Some(self.reader.next(self.keepalive).await?);
        }
        // Terminal output replayed after a gap would start inside an escape sequence: the
        // screen is sent instead.
        if let Some(Ok(Delivered::Gap(gap))) = &self.pending {
            self.snapshot_due = self.record.screen.is_some();
            metrics::counter!("sandbox_gaps_total").increment(1);
            metrics::counter!("sandbox_gap_lost_bytes_total")
                .increment(gap.lost_stdout_bytes + gap.lost_stderr_bytes);
        }
        let watched_bytes = match &self.pending {
            Some(Ok(Delivered::Event(JobEvent {
                kind: EventKind::Output { data, .. },
                ..
            }))) => Some(data.len()),
            _ => None,
        };
        if let (Some(watching), Some(bytes)) = (&mut self.watching, watched_bytes) {
            // Waits while the budget is used up: the watcher falls behind (and gets a gap
            // later), the job does not wait for it.
            self.in_transport = Some(watching.budget.hold_shared(bytes).await);
            watching.unpaid = bytes;
        }
        let next = self.pending.take()?;
        Some(next.map_err(|source| position_error(&self.job_id, source)))
    }

    /// As a `Stream`, for the transport.
    pub fn into_stream(self) -> impl Stream<Item = Result<Delivered, Error>> + Send + 'static {
        futures_util::stream::unfold(self, |mut stream| async move {
            let next = stream.next().await?;
            Some((next, stream))
        })
    }
}

/// What a watcher's output costs: room in the output budget while it is in the transport, and
/// its share of the watchers' bandwidth.
struct Watching {
    budget: OutputBudget,
    rate: Option<Arc<WatchRate>>,
    /// Bytes sent and not yet paid for.
    unpaid: usize,
}

/// What an idle period lets watchers take at once: a tenth of a second's worth, and at least
/// the largest output chunk (`--output-chunk-bytes` goes up to 2 MiB), so that every chunk is
/// paid for in full.
fn watch_burst(bytes_per_sec: u64) -> usize {
    ((bytes_per_sec / 10) as usize).max(2 << 20)
}

/// What a dropped Exec stream of a job with the `Cancel` policy does: the caller has gone.
struct CancelOnDrop(Arc<JobRecord>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        // No-op for a job that already finished.
        self.0.request_stop(StopReason::ClientGone);
    }
}
