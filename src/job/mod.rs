//! The job core: what a job is (`spec`), the events it emits (`event`), how its output is
//! sequenced (`output`) and kept for any number of readers (`log`), what watchers may take
//! (`watch_rate`), what clients write to a job (`input`), a `tty` job's screen (`screen`), how
//! one job runs from start to its single `Exited`
//! event (`lifecycle`), and the table of running and recently finished jobs (`registry`).
//!
//! The core owns the traits of what it drives: [`Backend`]/[`Execution`] (`backend`: where
//! commands run) and [`Sink`]/[`JobSink`] (`sink`: where copies of events go). The modules
//! `crate::backend` and `crate::sink` implement them; nothing here imports those, nor protobuf
//! or gRPC: the gRPC layer converts at the edge.

mod backend;
mod budget;
mod event;
mod id;
mod input;
mod lifecycle;
mod log;
mod output;
mod record;
mod registry;
mod screen;
mod sink;
mod spec;
#[cfg(test)]
mod tests;
mod watch_rate;

pub use backend::{
    Backend, BackendCause, BackendError, Capabilities, Execution, JobSignal, JobSignaller,
    JobTerminal, Outcome, RemoteState, ResizeRefused, SignalRefused,
};
pub use budget::{Credit, JobBudget, OutputBudget};
pub use event::{EventKind, ExitSummary, JobEvent, JobState, StreamKind};
pub use id::{JobIdCodec, JobIdError, JobLocation};
pub use input::{InputClosed, InputError, InputRefused, InputSink, JobInput};
pub use log::{
    Delivered, EventLog, Gap, GapPolicy, LogLimits, LogReader, LogSummary, Pace, Position,
    PositionError,
};
pub use output::JobOutput;
pub use record::JobSnapshot;
pub use registry::{Attached, JobFilter, JobStream, Jobs, JobsConfig, ListCursor};
pub use screen::{MAX_TERMINAL_CELLS, NoRoomForScreen, ScreenSnapshot};
pub use sink::{DeliveryProgress, DeliveryReport, JobSink, Sink, SinkHealth, Sinks};
pub use spec::{DisconnectPolicy, JobId, JobMeta, JobSpec, Program, TerminalSize, TtySpec};
