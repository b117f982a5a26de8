//! The one mapping from the service's errors to gRPC status codes.

use tonic::{Code, Status};

use crate::{
    error::Error,
    job::{BackendError, InputError, InputRefused, ResizeRefused},
};

/// Whether a spawn failed for lack of a resource the server or the host shares among jobs
/// (EMFILE, ENFILE, EAGAIN from fork, ENOMEM), not for anything in the request.
fn out_of_resources(error: &std::io::Error) -> bool {
    crate::connection::is_out_of_descriptors(error)
        || matches!(
            error.raw_os_error(),
            Some(nix::libc::EAGAIN | nix::libc::ENOMEM)
        )
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let code = match &err {
            Error::InvalidArgument(_) | Error::TimeoutTooLong { .. } => Code::InvalidArgument,
            Error::JobNotFound(_) => Code::NotFound,
            Error::TooManyJobs { .. } => Code::ResourceExhausted,
            Error::ShuttingDown | Error::JobLeft { .. } => Code::Unavailable,
            Error::Backend(e) => match e {
                BackendError::InvalidRequest(_) => Code::InvalidArgument,
                // The machine ran out (descriptors, processes, memory): back off and retry.
                BackendError::Spawn { source, .. } if out_of_resources(source) => {
                    Code::ResourceExhausted
                }
                BackendError::Spawn { .. } => Code::FailedPrecondition,
                BackendError::SandboxNotFound { .. } => Code::NotFound,
                BackendError::SandboxNotReady { .. } => Code::FailedPrecondition,
                // The caller's credentials are fine; this service's are not.
                BackendError::Misconfigured(_) => Code::FailedPrecondition,
                BackendError::Unavailable(_) => Code::Unavailable,
                BackendError::Failed { .. } | BackendError::NodeLocal => Code::Internal,
            },
            // Like any unknown id: forged and malformed ids name no job.
            Error::InvalidJobId { .. } => Code::NotFound,
            Error::JobElsewhere { .. } | Error::SeqOfAnotherReplica { .. } => {
                Code::FailedPrecondition
            }
            // Like Kafka's offset reset `none`: the position is outside what the log holds.
            Error::Position { .. } => Code::OutOfRange,
            Error::IdempotencyKeyReused(_) => Code::AlreadyExists,
            Error::Unauthenticated => Code::Unauthenticated,
            // The job is in a state where it takes no input, or its backend has no end of input;
            // the caller should not retry as is.
            Error::Input {
                source: InputError::Closed(_) | InputError::NoEof,
                ..
            } => Code::FailedPrecondition,
            // Bytes the job's backend cannot carry (a Daytona write that is not whole lines).
            Error::Input {
                source: InputError::Refused(InputRefused::Unfaithful(_)),
                ..
            } => Code::InvalidArgument,
            // The backend failed on the way; the client may check `stdin_accepted_bytes`.
            Error::Input {
                source: InputError::Refused(InputRefused::Unconfirmed(_)),
                ..
            } => Code::Unavailable,
            // As for a position beyond the end of the log: the message gives the offset due.
            Error::Input {
                source: InputError::OffsetAhead { .. },
                ..
            } => Code::OutOfRange,
            Error::Unsupported { .. } | Error::Signal { .. } => Code::FailedPrecondition,
            // Room frees as running jobs' readers take their output.
            Error::NoRoomForScreen(_)
            | Error::Resize {
                source: ResizeRefused::NoRoom(_),
                ..
            } => Code::ResourceExhausted,
            Error::Resize { .. } => Code::FailedPrecondition,
        };
        Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn every_error_has_its_code() {
        let no_room = crate::job::NoRoomForScreen {
            rows: 24,
            cols: 80,
            bytes: 122_880,
        };
        let cases = [
            (Error::InvalidArgument("x".into()), Code::InvalidArgument),
            (
                Error::TimeoutTooLong {
                    requested: Duration::from_secs(2),
                    max: Duration::from_secs(1),
                },
                Code::InvalidArgument,
            ),
            (Error::JobNotFound("j".into()), Code::NotFound),
            (Error::TooManyJobs { limit: 1 }, Code::ResourceExhausted),
            (Error::ShuttingDown, Code::Unavailable),
            (Error::JobLeft { job_id: "j".into() }, Code::Unavailable),
            (
                Error::SeqOfAnotherReplica { job_id: "j".into() },
                Code::FailedPrecondition,
            ),
            (
                BackendError::InvalidRequest("cwd".into()).into(),
                Code::InvalidArgument,
            ),
            (
                BackendError::Spawn {
                    program: "p".into(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (
                BackendError::Spawn {
                    program: "p".into(),
                    source: std::io::Error::from_raw_os_error(nix::libc::EMFILE),
                }
                .into(),
                Code::ResourceExhausted,
            ),
            (
                BackendError::Spawn {
                    program: "p".into(),
                    source: std::io::Error::from_raw_os_error(nix::libc::EAGAIN),
                }
                .into(),
                Code::ResourceExhausted,
            ),
            (Error::Unauthenticated, Code::Unauthenticated),
            (
                Error::Position {
                    job_id: "j".into(),
                    source: crate::job::PositionError::SeqBeyondEnd {
                        after: 9,
                        last: Some(3),
                    },
                },
                Code::OutOfRange,
            ),
            (Error::IdempotencyKeyReused("k".into()), Code::AlreadyExists),
            (
                Error::Input {
                    job_id: "j".into(),
                    source: InputError::Closed(crate::job::InputClosed::ByClient),
                },
                Code::FailedPrecondition,
            ),
            (
                Error::Input {
                    job_id: "j".into(),
                    source: InputError::OffsetAhead {
                        offset: 9,
                        accepted: 3,
                    },
                },
                Code::OutOfRange,
            ),
            (
                Error::Input {
                    job_id: "j".into(),
                    source: InputError::NoEof,
                },
                Code::FailedPrecondition,
            ),
            (
                Error::Input {
                    job_id: "j".into(),
                    source: InputError::Refused(InputRefused::Unfaithful("partial line".into())),
                },
                Code::InvalidArgument,
            ),
            (
                Error::Input {
                    job_id: "j".into(),
                    source: InputError::Refused(InputRefused::Unconfirmed("503".into())),
                },
                Code::Unavailable,
            ),
            (
                Error::Unsupported {
                    backend: "daytona",
                    capability: "stdin",
                },
                Code::FailedPrecondition,
            ),
            (
                Error::Signal {
                    job_id: "j".into(),
                    source: crate::job::SignalRefused::Exited,
                },
                Code::FailedPrecondition,
            ),
            (
                Error::Resize {
                    job_id: "j".into(),
                    source: ResizeRefused::NoTerminal,
                },
                Code::FailedPrecondition,
            ),
            (
                Error::Resize {
                    job_id: "j".into(),
                    source: ResizeRefused::Finished,
                },
                Code::FailedPrecondition,
            ),
            (
                Error::Resize {
                    job_id: "j".into(),
                    source: ResizeRefused::Failed("EIO".into()),
                },
                Code::FailedPrecondition,
            ),
            (
                Error::Resize {
                    job_id: "j".into(),
                    source: ResizeRefused::NoRoom(no_room.clone()),
                },
                Code::ResourceExhausted,
            ),
            (Error::NoRoomForScreen(no_room), Code::ResourceExhausted),
            (
                BackendError::SandboxNotFound {
                    what: "sandbox \"s\"".into(),
                    detail: "no such sandbox".into(),
                }
                .into(),
                Code::NotFound,
            ),
            (
                BackendError::SandboxNotReady {
                    sandbox_id: "s".into(),
                    state: "stopped".into(),
                }
                .into(),
                Code::FailedPrecondition,
            ),
            (
                BackendError::Misconfigured("401".into()).into(),
                Code::FailedPrecondition,
            ),
            (
                BackendError::Unavailable("down".into()).into(),
                Code::Unavailable,
            ),
            (
                BackendError::Failed {
                    context: "sandbox".into(),
                    source: "odd".into(),
                }
                .into(),
                Code::Internal,
            ),
            (BackendError::NodeLocal.into(), Code::Internal),
            (
                Error::InvalidJobId {
                    id: "x".into(),
                    reason: crate::job::JobIdError::Signature,
                },
                Code::NotFound,
            ),
            (
                Error::JobElsewhere {
                    job_id: "j".into(),
                    replica: "r".into(),
                    detail: "runs",
                },
                Code::FailedPrecondition,
            ),
        ];
        for (err, code) in cases {
            let message = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
    }
}
