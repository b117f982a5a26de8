//! Backends run a job's program somewhere and stream its output into the job core.
//!
//! A backend is two small traits: [`Backend::start`] launches (errors here mean nothing ran),
//! and [`Execution::run`] streams output until the program and everything it started are gone,
//! stopping it when told to.

pub mod daytona;
pub mod local;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::{
    error::Error,
    job::{JobOutput, JobSpec},
};

/// Somewhere jobs run.
#[async_trait]
pub trait Backend: Send + Sync {
    /// Name shown in events, Status and Health.
    fn name(&self) -> &'static str;

    /// Launches the job. An error means nothing is running and no event was emitted.
    async fn start(&self, spec: &JobSpec) -> Result<Box<dyn Execution>, Error>;

    /// State of a job another replica started, from its [`Execution::handle`].
    async fn remote_state(&self, handle: &str) -> Result<RemoteState, Error> {
        let _ = handle;
        Err(Error::BackendFailed(
            "this backend's jobs are node-local".into(),
        ))
    }

    /// Stops a job another replica started, from its [`Execution::handle`].
    async fn remote_cancel(&self, handle: &str) -> Result<(), Error> {
        let _ = handle;
        Err(Error::BackendFailed(
            "this backend's jobs are node-local".into(),
        ))
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

    /// A handle from which any replica can reach the job through [`Backend::remote_state`]
    /// and [`Backend::remote_cancel`]; `None` for jobs only this replica can reach.
    fn handle(&self) -> Option<String> {
        None
    }

    /// Streams all output into `out` and returns how the job ended. When `stop` is cancelled,
    /// the backend stops the job (gracefully, then forcibly) and still delivers the output
    /// produced until then. Returns only once nothing of the job is left running.
    async fn run(self: Box<Self>, out: &mut JobOutput, stop: CancellationToken) -> Outcome;
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
}
