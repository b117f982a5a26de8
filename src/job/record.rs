//! Shared state of one job: read by Status, written by the job's lifecycle task.

use std::{
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio_util::sync::CancellationToken;

use super::{
    Capabilities, DisconnectPolicy, ExitSummary, JobId, JobMeta, JobSignal, JobSignaller, JobSpec,
    JobState, JobTerminal, ResizeRefused, SignalRefused, StreamKind, TerminalSize, TtySpec,
    input::JobInput,
    log::{EventLog, LogSummary},
    screen::Screen,
};
use super::{DeliveryProgress, DeliveryReport};

/// Why a job was asked to stop before it ended on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// A Cancel call.
    Cancelled,
    /// The Exec stream's client went away.
    ClientGone,
    /// The job's timeout elapsed.
    TimedOut(Duration),
    /// The server is shutting down.
    Shutdown,
    /// No client was attached for this long (the `CancelAfter` disconnect policy).
    NoClient(Duration),
}

impl StopReason {
    pub(crate) fn final_state(self) -> JobState {
        match self {
            StopReason::TimedOut(_) => JobState::TimedOut,
            StopReason::Cancelled
            | StopReason::ClientGone
            | StopReason::Shutdown
            | StopReason::NoClient(_) => JobState::Cancelled,
        }
    }

    pub(crate) fn describe(self) -> String {
        match self {
            StopReason::Cancelled => "cancelled by request".into(),
            StopReason::ClientGone => "cancelled: the client closed the stream".into(),
            StopReason::TimedOut(after) => {
                format!("timed out after {}", humantime::format_duration(after))
            }
            StopReason::Shutdown => "cancelled: the server is shutting down".into(),
            StopReason::NoClient(after) => format!(
                "cancelled: no client attached for {}",
                humantime::format_duration(after)
            ),
        }
    }
}

/// Point-in-time view of a job, for Status and Cancel.
#[derive(Debug, Clone)]
pub struct JobSnapshot {
    pub id: JobId,
    pub meta: JobMeta,
    pub backend: &'static str,
    pub state: JobState,
    pub started_at: SystemTime,
    /// Set while running.
    pub running_for: Option<Duration>,
    /// Set once finished.
    pub exit: Option<ExitSummary>,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// Delivery of the job's copy to the mirror sink; `None` when the job is not mirrored.
    pub mirror: Option<DeliveryProgress>,
    pub on_disconnect: DisconnectPolicy,
    /// What the job's log holds and who reads it; `None` for a job of another replica.
    pub log: Option<LogSummary>,
    /// The job's stdin; `None` for a job of another replica.
    pub stdin: Option<StdinSummary>,
    /// The job's terminal now (its last size), for a `tty` job.
    pub tty: Option<TtySpec>,
}

/// A job's stdin, for Status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StdinSummary {
    /// Bytes the process has been given.
    pub accepted_bytes: u64,
    /// Whether it still takes input.
    pub open: bool,
}

pub(crate) struct JobRecord {
    pub(crate) id: JobId,
    pub(crate) meta: JobMeta,
    pub(crate) backend: &'static str,
    /// What the backend's jobs can do (for `Started`).
    pub(crate) capabilities: Capabilities,
    pub(crate) started_at: SystemTime,
    pub(crate) started: Instant,
    /// Cancelled to stop the job; a child of the server's root token.
    pub(crate) stop: CancellationToken,
    stop_reason: Mutex<Option<StopReason>>,
    stdout_bytes: AtomicU64,
    stderr_bytes: AtomicU64,
    exit: OnceLock<ExitSummary>,
    mirror: Option<Arc<dyn DeliveryReport>>,
    pub(crate) on_disconnect: DisconnectPolicy,
    /// Every event of the job, for its readers.
    pub(crate) log: Arc<EventLog>,
    /// What clients write to the job.
    pub(crate) input: Arc<JobInput>,
    /// What sends the job signals; `None` where its backend cannot, and once it has finished
    /// (what it holds, a terminal say, goes with the job).
    signaller: Mutex<Option<Box<dyn JobSignaller>>>,
    /// The job's terminal as it started, for a `tty` job.
    pub(crate) tty: Option<TtySpec>,
    /// Resizes its terminal, for a running `tty` job.
    terminal: Mutex<Option<Box<dyn JobTerminal>>>,
    /// Its screen, drawn from its output, for a `tty` job.
    pub(crate) screen: Option<Screen>,
    /// The Exec request's idempotency key, forgotten with the job.
    pub(crate) idempotency_key: Option<String>,
    /// The backend's handle of the job, when any replica can reach it.
    pub(crate) handle: Option<String>,
    /// Cancelled to stop following the job and leave it running (see `Execution::run`); only
    /// acted on for jobs with a handle.
    pub(crate) leave: CancellationToken,
    /// Started elsewhere (another replica, or an earlier run of this one) and followed here:
    /// this replica's seqs are its own, and it never owns the job.
    pub(crate) followed: bool,
}

/// What clients reach a running job through, beside its output.
pub(crate) struct JobControls {
    pub(crate) input: JobInput,
    pub(crate) signaller: Option<Box<dyn JobSignaller>>,
    pub(crate) terminal: Option<Box<dyn JobTerminal>>,
    /// With the terminal's settings as the job started.
    pub(crate) screen: Option<(Screen, TtySpec)>,
}

/// How a job's record starts: what a started job takes from its request, what a followed job
/// takes from its id.
pub(crate) struct RecordInit {
    pub(crate) meta: JobMeta,
    pub(crate) started_at: SystemTime,
    pub(crate) on_disconnect: DisconnectPolicy,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) handle: Option<String>,
    pub(crate) followed: bool,
    /// Its output chunks end on character boundaries (`JobSpec::text_output`).
    pub(crate) text_output: bool,
}

impl RecordInit {
    /// A job this replica starts now from `spec`.
    pub(crate) fn started(spec: &JobSpec, handle: Option<String>) -> Self {
        RecordInit {
            meta: spec.meta.clone(),
            started_at: SystemTime::now(),
            on_disconnect: spec.on_disconnect,
            idempotency_key: spec.idempotency_key.clone(),
            handle,
            followed: false,
            text_output: spec.text_output,
        }
    }

    /// Whether the job is left running, not stopped, when this replica shuts down: a job any
    /// replica can reach (one that outlives this process) that is followed here or was
    /// started detached.
    pub(crate) fn leaves_on_shutdown(&self) -> bool {
        self.handle.is_some() && (self.followed || self.on_disconnect == DisconnectPolicy::Detach)
    }
}

impl JobRecord {
    pub(crate) fn new(
        id: JobId,
        init: RecordInit,
        (backend, capabilities): (&'static str, Capabilities),
        (stop, leave): (CancellationToken, CancellationToken),
        mirror: Option<Arc<dyn DeliveryReport>>,
        log: Arc<EventLog>,
        controls: JobControls,
    ) -> Self {
        let JobControls {
            input,
            signaller,
            terminal,
            screen,
        } = controls;
        let (screen, tty) = screen.unzip();
        // The monotonic start, as far back as the wall-clock one says (a followed job started
        // before this replica saw it).
        let age = SystemTime::now()
            .duration_since(init.started_at)
            .unwrap_or_default();
        let now = Instant::now();
        JobRecord {
            id,
            meta: init.meta,
            backend,
            capabilities,
            started_at: init.started_at,
            started: now.checked_sub(age).unwrap_or(now),
            stop,
            stop_reason: Mutex::new(None),
            stdout_bytes: AtomicU64::new(0),
            stderr_bytes: AtomicU64::new(0),
            exit: OnceLock::new(),
            mirror,
            on_disconnect: init.on_disconnect,
            log,
            input: Arc::new(input),
            signaller: Mutex::new(signaller),
            tty,
            terminal: Mutex::new(terminal),
            screen,
            idempotency_key: init.idempotency_key,
            handle: init.handle,
            leave,
            followed: init.followed,
        }
    }

    /// Asks the job to stop. The first reason wins; later ones are ignored.
    pub(crate) fn request_stop(&self, reason: StopReason) {
        if self.is_finished() {
            return;
        }
        let mut slot = self.stop_reason.lock().expect("stop reason lock poisoned");
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        self.stop.cancel();
    }

    /// Why the job was stopped, if it was. A token cancelled with no recorded reason was
    /// cancelled through the server's root token, i.e. by shutdown.
    pub(crate) fn stop_reason(&self) -> Option<StopReason> {
        let recorded = *self.stop_reason.lock().expect("stop reason lock poisoned");
        recorded.or_else(|| self.stop.is_cancelled().then_some(StopReason::Shutdown))
    }

    pub(crate) fn add_output(&self, stream: StreamKind, len: u64) {
        self.counter(stream).fetch_add(len, Ordering::Relaxed);
    }

    pub(crate) fn output_bytes(&self, stream: StreamKind) -> u64 {
        self.counter(stream).load(Ordering::Relaxed)
    }

    fn counter(&self, stream: StreamKind) -> &AtomicU64 {
        match stream {
            StreamKind::Stdout => &self.stdout_bytes,
            StreamKind::Stderr => &self.stderr_bytes,
        }
    }

    /// Sends the job `signal` (to its process group).
    pub(crate) fn signal(&self, signal: JobSignal) -> Result<(), SignalRefused> {
        if self.is_finished() {
            return Err(SignalRefused::Finished);
        }
        let signaller = self.signaller.lock().unwrap_or_else(|e| e.into_inner());
        match signaller.as_ref() {
            Some(signaller) => signaller.signal(signal),
            // Finished meanwhile (it is dropped then), or never had one.
            None if self.is_finished() => Err(SignalRefused::Finished),
            None => Err(SignalRefused::Unsupported(self.backend)),
        }
    }

    /// Sets the size of the job's terminal (and of its screen).
    pub(crate) fn resize(&self, size: TerminalSize) -> Result<(), ResizeRefused> {
        if self.is_finished() {
            return Err(ResizeRefused::Finished);
        }
        let terminal = self.terminal.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(terminal), Some(screen)) = (terminal.as_ref(), &self.screen) else {
            return Err(if self.is_finished() {
                ResizeRefused::Finished
            } else {
                ResizeRefused::NoTerminal
            });
        };
        let before = screen.size();
        screen.resize(size)?;
        terminal.resize(size).map_err(|e| {
            // Keep the screen the terminal's size; shrinking back always fits the budget.
            let _ = screen.resize(before);
            ResizeRefused::Failed(e.to_string())
        })
    }

    pub(crate) fn finish(&self, summary: ExitSummary) {
        // Only the lifecycle task finishes a job, once.
        let _ = self.exit.set(summary);
        // A finished job is remembered for a while; what it used to run is not kept with it
        // (a terminal, its screen's memory).
        drop(
            self.signaller
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        drop(
            self.terminal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        if let Some(screen) = &self.screen {
            screen.close();
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.exit.get().is_some()
    }

    pub(crate) fn snapshot(&self) -> JobSnapshot {
        let exit = self.exit.get().cloned();
        JobSnapshot {
            id: self.id.clone(),
            meta: self.meta.clone(),
            backend: self.backend,
            state: exit.as_ref().map_or(JobState::Running, |e| e.state),
            started_at: self.started_at,
            running_for: exit.is_none().then(|| self.started.elapsed()),
            stdout_bytes: self.output_bytes(StreamKind::Stdout),
            stderr_bytes: self.output_bytes(StreamKind::Stderr),
            exit,
            mirror: self.mirror.as_ref().map(|m| m.report()),
            on_disconnect: self.on_disconnect,
            log: Some(self.log.summary()),
            stdin: Some(StdinSummary {
                accepted_bytes: self.input.accepted(),
                open: self.input.is_open(),
            }),
            tty: self.tty.as_ref().map(|tty| TtySpec {
                size: self.screen.as_ref().map_or(tty.size, Screen::size),
                term: tty.term.clone(),
            }),
        }
    }
}
