//! The service's one error type. Each variant says what went wrong in words a caller can act on;
//! `grpc::error` maps every variant to a gRPC code in one place.

use std::time::Duration;

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; the message names the field and the problem.
    #[error("{0}")]
    InvalidArgument(String),

    /// No job with this id is known (never existed, or finished and was forgotten).
    #[error("job {0:?} not found (unknown, or finished longer ago than this server remembers)")]
    JobNotFound(String),

    /// The concurrent-job limit is reached.
    #[error("too many running jobs (limit {limit}); retry when some finish")]
    TooManyJobs { limit: u32 },

    /// The requested timeout is above the server's maximum.
    #[error("timeout {requested:?} exceeds the server maximum of {max:?}")]
    TimeoutTooLong { requested: Duration, max: Duration },

    /// The server is draining for shutdown.
    #[error("server is shutting down and accepts no new jobs; retry on another instance")]
    ShuttingDown,

    /// The program could not be started (not found, not executable, ...).
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },

    /// The sandbox named by the request does not exist.
    #[error("{0}")]
    SandboxNotFound(String),

    /// The sandbox exists but cannot run commands now.
    #[error(
        "sandbox {sandbox_id:?} is {state}, not started (enable --daytona-auto-start to start it)"
    )]
    SandboxNotReady { sandbox_id: String, state: String },

    /// The backend refuses this service's own credentials: an operator must fix the config.
    #[error("the backend rejected this service's configuration: {0}")]
    BackendMisconfigured(String),

    /// The backend cannot be reached or keeps failing; retrying later may work.
    #[error("the backend is unavailable: {0}")]
    BackendUnavailable(String),

    /// The backend answered something unexpected.
    #[error("the backend failed: {0}")]
    BackendFailed(String),

    /// The job id is not one this service issued.
    #[error("job {id:?} not found: {reason}")]
    InvalidJobId {
        id: String,
        reason: crate::job::JobIdError,
    },

    /// The job belongs to another replica and cannot be reached from this one.
    #[error("job {job_id:?} {detail} on replica {replica:?}; call that replica")]
    JobElsewhere {
        job_id: String,
        replica: String,
        detail: &'static str,
    },

    /// The job's stream ended without its `Exited` event: the caller did not read the stopped
    /// job's output in time, or the server stopped first.
    #[error(
        "the stream of job {0:?} was cut before its end (the client did not read the stopped job's output in time, or the server stopped); its final state is in Status"
    )]
    StreamAbandoned(String),

    /// The caller presented no valid credentials.
    #[error("missing or invalid bearer token")]
    Unauthenticated,
}
