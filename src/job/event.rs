//! Events a job emits, in order: `Started`, any number of `Output`, one `Exited`.

use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{Capabilities, TtySpec};

/// Which output stream bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Stdout,
    Stderr,
}

impl StreamKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Stdout => "stdout",
            StreamKind::Stderr => "stderr",
        }
    }

    /// 0 for stdout, 1 for stderr: its slot in per-stream arrays.
    pub fn index(self) -> usize {
        match self {
            StreamKind::Stdout => 0,
            StreamKind::Stderr => 1,
        }
    }
}

/// Lifecycle state of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl JobState {
    /// Its name in logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
        }
    }
}

/// How a job ended; carried by the `Exited` event and kept for Status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitSummary {
    pub state: JobState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration: Duration,
    pub finished_at: SystemTime,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// Why it ended, for humans.
    pub message: String,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Started {
        backend: &'static str,
        pid: Option<u32>,
        /// What the backend's jobs can do.
        capabilities: Capabilities,
        /// The job's terminal as it started, for a `tty` job.
        tty: Option<TtySpec>,
    },
    Output {
        stream: StreamKind,
        /// Byte offset of `data` within its stream.
        offset: u64,
        data: Bytes,
    },
    Exited(ExitSummary),
}

/// One event of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    /// 0 for `Started`, then +1 per event with no gaps.
    pub seq: u64,
    pub time: SystemTime,
    pub kind: EventKind,
}
