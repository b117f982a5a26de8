//! The one mapping from the service's errors to gRPC status codes.

use tonic::{Code, Status};

use crate::error::Error;

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let code = match &err {
            Error::InvalidArgument(_) | Error::TimeoutTooLong { .. } => Code::InvalidArgument,
            Error::JobNotFound(_) => Code::NotFound,
            Error::TooManyJobs { .. } => Code::ResourceExhausted,
            Error::ShuttingDown => Code::Unavailable,
            Error::Spawn { .. } => Code::FailedPrecondition,
            Error::SandboxNotFound(_) => Code::NotFound,
            Error::SandboxNotReady { .. } => Code::FailedPrecondition,
            // The caller's credentials are fine; this service's are not.
            Error::BackendMisconfigured(_) => Code::FailedPrecondition,
            Error::BackendUnavailable(_) => Code::Unavailable,
            Error::BackendFailed(_) => Code::Internal,
            // Like any unknown id: forged and malformed ids name no job.
            Error::InvalidJobId { .. } => Code::NotFound,
            Error::JobElsewhere { .. } => Code::FailedPrecondition,
            // Output the caller did not read is gone.
            Error::StreamAbandoned(_) => Code::DataLoss,
            Error::Unauthenticated => Code::Unauthenticated,
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
            (
                Error::Spawn {
                    program: "p".into(),
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                },
                Code::FailedPrecondition,
            ),
            (Error::Unauthenticated, Code::Unauthenticated),
            (Error::StreamAbandoned("j".into()), Code::DataLoss),
            (Error::SandboxNotFound("s".into()), Code::NotFound),
            (
                Error::SandboxNotReady {
                    sandbox_id: "s".into(),
                    state: "stopped".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                Error::BackendMisconfigured("401".into()),
                Code::FailedPrecondition,
            ),
            (Error::BackendUnavailable("down".into()), Code::Unavailable),
            (Error::BackendFailed("odd".into()), Code::Internal),
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
