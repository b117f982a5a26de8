//! Unit tests of the job core on the fake backend (`crate::testing::fake_backend`), under
//! paused time: waits cost no real time and durations are exact.
//!
//! - `lifecycle`: how an ended run is summarised, and the shape of the event stream.
//! - `stop`: stop reasons, output emitted while stopping, the stopped-client grace.
//! - `registry`: limits, failed starts, finished-job retention.
//! - `drain`: shutdown.
//! - `budget`: the server-wide output budget under callers that do not read.
//! - `attach`: disconnect policies, Attach, idempotent starts, ListJobs.

mod attach;
mod budget;
mod drain;
mod lifecycle;
mod registry;
mod stop;

use std::{sync::Arc, time::Duration};

use super::{
    Delivered, EventKind, ExitSummary, JobEvent, JobIdCodec, JobMeta, JobSpec, JobStream, Jobs,
    JobsConfig, LogLimits, Program, Sinks, StreamKind,
};
use crate::error::Error;
use crate::testing::fake_backend::{FakeBackend, RecordingSink, Script};

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Limits used unless a test changes them.
fn config() -> JobsConfig {
    JobsConfig {
        max_concurrent: 4,
        default_timeout: secs(60),
        max_timeout: secs(600),
        log_limits: LogLimits {
            max_bytes: 1 << 20,
            max_events: 16,
        },
        keepalive: secs(15),
        finished_ttl: secs(300),
        finished_capacity: 8,
        stopped_client_grace: secs(2),
        output_budget_bytes: 1 << 20,
        output_reserve_bytes: 64 << 10,
        retained_output_bytes: usize::MAX,
        follow_idle: secs(30),
        watchers_bytes_per_sec: None,
    }
}

/// A job core on a fake backend, with one recording sink.
struct Harness {
    jobs: Arc<Jobs>,
    backend: Arc<FakeBackend>,
    sink: Arc<RecordingSink>,
}

impl Harness {
    fn new(config: JobsConfig) -> Self {
        Harness::with_backend(config, FakeBackend::default())
    }

    fn with_backend(config: JobsConfig, backend: FakeBackend) -> Self {
        let backend = Arc::new(backend);
        let sink = Arc::new(RecordingSink::new());
        let jobs = Jobs::new(
            Arc::clone(&backend) as _,
            JobIdCodec::new(b"test key", "replica-test"),
            Sinks::new(vec![Arc::clone(&sink) as _]),
            config,
        );
        Harness {
            jobs,
            backend,
            sink,
        }
    }

    /// Scripts `command` and starts it.
    async fn run(&self, command: &str, script: Script) -> JobStream {
        self.backend.script_for(command, script);
        self.jobs.start(spec(command)).await.expect("job starts")
    }
}

fn spec(command: &str) -> JobSpec {
    JobSpec {
        meta: JobMeta {
            task_id: "task-1".into(),
            session_id: "session-1".into(),
            sandbox_id: "sandbox-1".into(),
        },
        ..JobSpec::new(Program::Shell(command.into()))
    }
}

fn spec_with_timeout(command: &str, timeout: Duration) -> JobSpec {
    JobSpec {
        timeout: Some(timeout),
        ..spec(command)
    }
}

/// Waits for `wait`, failing the test if it is not done within a virtual hour: under paused
/// time, a wait that can never end fails at once instead of hanging.
async fn within<F: Future>(wait: F) -> F::Output {
    tokio::time::timeout(secs(3600), wait)
        .await
        .expect("still waiting after a (virtual) hour")
}

/// Reads a stream to its end; panics on an error item or a gap.
async fn read_all(mut stream: JobStream) -> Vec<JobEvent> {
    within(async {
        let mut events = Vec::new();
        while let Some(item) = stream.event().await {
            events.push(item.expect("the stream ends with Exited, not an error"));
        }
        events
    })
    .await
}

/// A reader's stream seen as job events only: keepalives are skipped, a gap fails the test.
trait EventsOnly {
    async fn event(&mut self) -> Option<Result<JobEvent, Error>>;
}

impl EventsOnly for JobStream {
    async fn event(&mut self) -> Option<Result<JobEvent, Error>> {
        loop {
            match self.next().await? {
                Ok(Delivered::Event(event)) => return Some(Ok(event)),
                Ok(Delivered::Keepalive { .. }) => {}
                Ok(Delivered::Gap(gap)) => panic!("unexpected gap: {gap:?}"),
                Ok(Delivered::Snapshot(s)) => panic!("unexpected snapshot: {s:?}"),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Checks what every job's events must be: `Started` with seq 0, seq without gaps, per-stream
/// offsets contiguous, exactly one `Exited`, last, whose byte totals are the output's. Returns
/// the `Exited` summary.
fn check_events(events: &[JobEvent]) -> ExitSummary {
    assert!(
        matches!(
            events.first().map(|e| &e.kind),
            Some(EventKind::Started { .. })
        ),
        "first event is Started: {events:?}"
    );
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (0..events.len() as u64).collect();
    assert_eq!(seqs, expected, "seq counts from 0 without gaps");
    let exits = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Exited(_)))
        .count();
    assert_eq!(exits, 1, "exactly one Exited: {events:?}");
    let (mut stdout, mut stderr) = (0, 0);
    for event in events {
        if let EventKind::Output {
            stream,
            offset,
            data,
        } = &event.kind
        {
            let total = match stream {
                StreamKind::Stdout => &mut stdout,
                StreamKind::Stderr => &mut stderr,
            };
            assert_eq!(*offset, *total, "{stream:?} offsets are contiguous");
            assert!(!data.is_empty(), "no empty output events");
            *total += data.len() as u64;
        }
    }
    let Some(EventKind::Exited(summary)) = events.last().map(|e| &e.kind) else {
        panic!("Exited is the last event: {events:?}");
    };
    assert_eq!(
        (summary.stdout_bytes, summary.stderr_bytes),
        (stdout, stderr),
        "Exited counts the bytes emitted"
    );
    summary.clone()
}

/// The output events as (stream, offset, text).
fn outputs(events: &[JobEvent]) -> Vec<(StreamKind, u64, String)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Output {
                stream,
                offset,
                data,
            } => Some((*stream, *offset, String::from_utf8_lossy(data).into_owned())),
            _ => None,
        })
        .collect()
}

/// The `Exited` summary's state, code, signal and message, for one `assert_eq!`.
fn ending(summary: &ExitSummary) -> (super::JobState, Option<i32>, Option<i32>, &str) {
    (
        summary.state,
        summary.exit_code,
        summary.signal,
        summary.message.as_str(),
    )
}
