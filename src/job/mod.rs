//! The job core: what a job is (`spec`), the events it emits (`event`), how its output is
//! sequenced and fanned out (`output`), how one job runs from start to its single `Exited`
//! event (`lifecycle`), and the table of running and recently finished jobs (`registry`).
//!
//! Nothing here knows about protobuf, gRPC or local processes: the gRPC layer converts at the
//! edge, and backends run the commands behind the `Backend` trait.

mod event;
mod id;
mod lifecycle;
mod output;
mod record;
mod registry;
mod spec;

pub use event::{EventKind, ExitSummary, JobEvent, JobState, StreamKind};
pub use id::{JobIdCodec, JobIdError, JobLocation};
pub use output::JobOutput;
pub use record::JobSnapshot;
pub use registry::{JobStream, Jobs, JobsConfig};
pub use spec::{JobId, JobMeta, JobSpec, Program};
