//! What the job core needs from wherever commands run: the traits `crate::backend::*`
//! implements, kept beside the code that calls them (`registry`, `lifecycle`).
//!
//! A backend is two small traits: [`Backend::start`] launches (errors here mean nothing ran),
//! and [`Execution::run`] streams output until the program and everything it started are gone,
//! stopping it when told to.

use std::{collections::HashSet, time::Duration};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{InputSink, JobOutput, JobSpec, TerminalSize};

/// Somewhere jobs run.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Name shown in events, Status and Health.
    fn name(&self) -> &'static str;

    /// What its jobs can do beyond running; a request for something it cannot do is refused
    /// before anything runs.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Launches the job. An error means nothing is running and no event was emitted.
    async fn start(&self, spec: &JobSpec) -> Result<Box<dyn Execution>, BackendError>;

    /// Longest a stopped job takes to be gone (every stage of its stop, the last output
    /// delivered); bounds how long a drain waits after it cancelled the remaining jobs.
    fn stop_time(&self) -> Duration;

    /// Waits for cleanup work the backend does in the background for jobs that have ended
    /// (deleting what they left behind). Called once at shutdown, after the last job ended.
    async fn finish_cleanups(&self) {}

    /// State of a job another replica started, from its [`Execution::handle`].
    async fn remote_state(&self, handle: &str) -> Result<RemoteState, BackendError> {
        let _ = handle;
        Err(BackendError::NodeLocal)
    }

    /// Stops a job another replica started, from its [`Execution::handle`].
    async fn remote_cancel(&self, handle: &str) -> Result<(), BackendError> {
        let _ = handle;
        Err(BackendError::NodeLocal)
    }

    /// Follows a job another replica (or an earlier run of this one) started, from its
    /// [`Execution::handle`]: an execution that replays the job's output from its first byte and
    /// ends with its exit. It does not own the job: dropping it or leaving (`leave` in
    /// [`Execution::run`]) leaves the job as it is; only `stop` stops the job.
    async fn follow(&self, handle: &str) -> Result<Box<dyn Execution>, BackendError> {
        let _ = handle;
        Err(BackendError::NodeLocal)
    }

    /// Deletes what jobs that ended long enough ago (`retention`) left behind in the backend,
    /// whichever replica ran them, except what the jobs whose handles are in `held` use.
    /// Returns how much it deleted. Backends whose jobs die with their process have nothing
    /// to sweep.
    async fn sweep(
        &self,
        retention: Duration,
        held: &HashSet<String>,
    ) -> Result<usize, BackendError> {
        let _ = (retention, held);
        Ok(0)
    }
}

/// What a backend can tell about a job from its handle alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteState {
    Running,
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// The backend no longer knows the job: it ended and was cleaned up.
    Gone,
}

/// A launched job.
#[async_trait]
pub trait Execution: Send {
    /// Local process id of the job's leader, where there is one.
    fn pid(&self) -> Option<u32>;

    /// A handle from which any replica can reach the job through [`Backend::remote_state`],
    /// [`Backend::remote_cancel`] and [`Backend::follow`]; `None` for jobs only this replica
    /// can reach. A job with a handle outlives this process: it can be left running.
    fn handle(&self) -> Option<String> {
        None
    }

    /// The job's stdin, for a job started with [`JobSpec::stdin`] (taken once, before `run`).
    fn take_input(&mut self) -> Option<Box<dyn InputSink>> {
        None
    }

    /// What sends the job signals, where the backend can (taken once, before `run`).
    fn take_signaller(&mut self) -> Option<Box<dyn JobSignaller>> {
        None
    }

    /// The terminal of a job started with [`JobSpec::tty`] (taken once, before `run`).
    fn take_terminal(&mut self) -> Option<Box<dyn JobTerminal>> {
        None
    }

    /// Streams all output into `out` and returns how the job ended. When `stop` is cancelled,
    /// the backend stops the job (gracefully, then forcibly) and still delivers the output
    /// produced until then. Returns only once nothing of the job is left running, except when
    /// `leave` is cancelled: then a job with a [`handle`](Execution::handle) is left running
    /// as it is (nothing stopped, nothing deleted) and `run` returns [`Outcome::Left`] at once.
    /// Jobs without a handle ignore `leave`.
    async fn run(
        self: Box<Self>,
        out: &mut JobOutput,
        stop: CancellationToken,
        leave: CancellationToken,
    ) -> Outcome;
}

/// What a backend's jobs can do, as Health and `Started` report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Jobs may be started with stdin open ([`JobSpec::stdin`]).
    pub stdin: bool,
    /// Closing stdin gives the process EOF.
    pub stdin_eof: bool,
    /// Jobs may run on a terminal.
    pub tty: bool,
    /// A job's terminal may be resized.
    pub resize: bool,
    /// Jobs may be sent signals.
    pub signals: bool,
}

/// The signals a client may send a job; anything else is refused before it reaches a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobSignal {
    Hup,
    Int,
    Quit,
    Kill,
    Usr1,
    Usr2,
    Term,
    Cont,
    Stop,
    Winch,
}

/// Sends signals to a running job's process group.
pub trait JobSignaller: Send + Sync {
    /// Fails once the job's main process has exited (its group may be gone, and its id reused).
    fn signal(&self, signal: JobSignal) -> Result<(), SignalRefused>;
}

/// The terminal a job runs on, for what is not its input or output.
pub trait JobTerminal: Send + Sync {
    /// Sets its size; the job's foreground process group gets SIGWINCH.
    fn resize(&self, size: TerminalSize) -> std::io::Result<()>;
}

/// Why a job's terminal was not resized.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResizeRefused {
    #[error("it has no terminal (start it with `tty`)")]
    NoTerminal,
    #[error("it has finished")]
    Finished,
    #[error("{0}")]
    NoRoom(#[from] super::screen::NoRoomForScreen),
    /// The system refused (the terminal is gone).
    #[error("the system refused: {0}")]
    Failed(String),
}

/// Why a signal was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalRefused {
    #[error("its main process has exited")]
    Exited,
    #[error("it has finished")]
    Finished,
    #[error("its backend ({0}) cannot signal it")]
    Unsupported(&'static str),
    /// The system refused (a member of the group runs as a user the server may not signal).
    #[error("the system refused: {0}")]
    Denied(String),
}

/// How a job's program ended, as the backend saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The program ended: with an exit code, or killed by a signal.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// The backend lost track of the job; the message says why.
    Failed(String),
    /// The job was stopped from outside this replica (e.g. Cancel on another replica).
    Cancelled(String),
    /// This replica stopped following the job, which runs on (see `leave` in
    /// [`Execution::run`]): it has not ended, so there is no exit to report.
    Left,
}

/// The error of a backend's underlying client (an HTTP API's, say), kept as the source.
pub type BackendCause = Box<dyn std::error::Error + Send + Sync>;

/// Why a backend could not start or reach a job. Each variant says who can fix it: the caller
/// (`InvalidRequest`, `Spawn`, `SandboxNotFound`, `SandboxNotReady`), the operator
/// (`Misconfigured`), time (`Unavailable`), or us (`Failed`, `NodeLocal`).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request cannot run on this backend as asked; the message names the field.
    #[error("{0}")]
    InvalidRequest(String),

    /// The program could not be started (not found, not executable, ...).
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },

    /// The sandbox named by the request does not exist.
    #[error("{what}: {detail}")]
    SandboxNotFound { what: String, detail: String },

    /// The sandbox exists but cannot run commands now.
    #[error(
        "sandbox {sandbox_id:?} is {state}, not started (enable --daytona-auto-start to start it)"
    )]
    SandboxNotReady { sandbox_id: String, state: String },

    /// The backend refuses this service's own credentials: an operator must fix the config.
    #[error("the backend rejected this service's configuration: {0}")]
    Misconfigured(#[source] BackendCause),

    /// The backend cannot be reached or keeps failing; retrying later may work.
    #[error("the backend is unavailable: {0}")]
    Unavailable(#[source] BackendCause),

    /// The backend answered something unexpected.
    #[error("the backend failed: {context}: {source}")]
    Failed {
        context: String,
        #[source]
        source: BackendCause,
    },

    /// A job of another replica was looked up on a backend whose jobs only their own replica
    /// can reach (the job id says which backend, so this is our bug, not the caller's).
    #[error("the backend failed: this backend's jobs are node-local")]
    NodeLocal,
}
