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

    /// A backend could not start or reach the job; the variant says why.
    #[error(transparent)]
    Backend(#[from] crate::job::BackendError),

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

    /// A job started elsewhere was asked for after a seq: seqs are per replica, and this one
    /// numbers its copy of the job's events its own way.
    #[error(
        "job {job_id:?} was started by another replica (or an earlier run of this one) and is \
         followed here, with seqs of this replica's own: resume it here by offsets (or from the \
         start, or new only), not after a seq"
    )]
    SeqOfAnotherReplica { job_id: String },

    /// This replica stopped following a job that has not ended (it is shutting down, or nobody
    /// followed the job here for a while).
    #[error(
        "job {job_id:?} is still running, but this server stopped following it (server shutting \
         down, or nobody attached here for a while); resume on another replica by offsets"
    )]
    JobLeft { job_id: String },

    /// A reader's position is not in the job's log: beyond its end, or no longer held (with
    /// the fail gap policy).
    #[error("job {job_id:?}: {source}")]
    Position {
        job_id: String,
        source: crate::job::PositionError,
    },

    /// A write to a job's stdin was refused: it is closed (or was never open), or it starts
    /// past the input accepted so far.
    #[error("job {job_id:?}: {source}")]
    Input {
        job_id: String,
        source: crate::job::InputError,
    },

    /// A signal was not sent: the job's main process is gone, or its backend cannot.
    #[error("job {job_id:?}: no signal sent: {source}")]
    Signal {
        job_id: String,
        source: crate::job::SignalRefused,
    },

    /// A job's terminal was not resized.
    #[error("job {job_id:?}: terminal not resized: {source}")]
    Resize {
        job_id: String,
        source: crate::job::ResizeRefused,
    },

    /// A `tty` job's screen does not fit in the server's output budget now.
    #[error("{0}; retry when running jobs have drained their output")]
    NoRoomForScreen(#[from] crate::job::NoRoomForScreen),

    /// The request needs something this server's backend cannot do.
    #[error("the {backend} backend cannot run jobs with {capability}")]
    Unsupported {
        backend: &'static str,
        capability: &'static str,
    },

    /// An Exec reused an idempotency key with a different request.
    #[error("idempotency key {0:?} was used for a different request; use a new key for a new job")]
    IdempotencyKeyReused(String),

    /// The caller presented no valid credentials.
    #[error("missing or invalid bearer token")]
    Unauthenticated,
}
