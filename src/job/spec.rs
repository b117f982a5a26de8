//! What a caller asked to run, already validated by the gRPC layer.

use std::{collections::BTreeMap, fmt, time::Duration};

/// Opaque, unique id of a job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

impl JobId {
    /// Wraps an id string (issued by [`super::JobIdCodec`], or received from a caller).
    pub fn from_caller(id: impl Into<String>) -> Self {
        JobId(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The program to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Program {
    /// A command line for `/bin/sh -c`.
    Shell(String),
    /// An exact argument vector, never non-empty, run without a shell.
    Argv(Vec<String>),
}

impl Program {
    /// Short human description, for errors and logs (never includes env values).
    pub fn display_name(&self) -> &str {
        match self {
            Program::Shell(_) => "/bin/sh",
            Program::Argv(argv) => argv.first().map(String::as_str).unwrap_or(""),
        }
    }
}

/// The caller's labels for a job, echoed in Status and used by sinks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobMeta {
    pub task_id: String,
    pub session_id: String,
    pub sandbox_id: String,
}

/// What happens to a job when its clients go away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DisconnectPolicy {
    /// Cancel it when the Exec caller's stream drops (Attach streams never cancel).
    #[default]
    Cancel,
    /// Let it run on (to its timeout) with nobody attached.
    Detach,
    /// Cancel it once no client (Exec or Attach) has been attached for this long.
    CancelAfter(Duration),
}

/// A validated request to run something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    pub meta: JobMeta,
    pub program: Program,
    /// Working directory; `None` means the backend's default.
    pub cwd: Option<String>,
    /// Variables to add to the backend's base environment.
    pub env: BTreeMap<String, String>,
    /// Requested timeout; `None` means the server default.
    pub timeout: Option<Duration>,
    pub on_disconnect: DisconnectPolicy,
    /// A retried Exec with the same key (and the same request) attaches to the job the first
    /// call started instead of starting another.
    pub idempotency_key: Option<String>,
    /// Keep the job's stdin open for clients to write to (see `input`); otherwise it reads
    /// /dev/null.
    pub stdin: bool,
    /// Run the job on a terminal (stdin, stdout and stderr all on it; stdin always open)
    /// rather than on pipes.
    pub tty: Option<TtySpec>,
    /// Cut the job's output chunks on UTF-8 character boundaries (see `JobOutput`), so that
    /// readers may carry each chunk as text.
    pub text_output: bool,
}

/// A terminal's size, in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TerminalSize {
    pub rows: u16,
    pub cols: u16,
}

/// The terminal a job runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtySpec {
    /// Its size when the program starts.
    pub size: TerminalSize,
    /// The job's TERM.
    pub term: String,
}

impl JobSpec {
    /// A job running `program`, with every option at its default.
    pub fn new(program: Program) -> Self {
        JobSpec {
            meta: JobMeta::default(),
            program,
            cwd: None,
            env: BTreeMap::new(),
            timeout: None,
            on_disconnect: DisconnectPolicy::default(),
            idempotency_key: None,
            stdin: false,
            tty: None,
            text_output: false,
        }
    }
}
