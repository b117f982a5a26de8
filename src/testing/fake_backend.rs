//! An in-memory [`Backend`] and a recording [`Sink`], for tests of the job core without
//! processes, sandboxes or real time.
//!
//! Each job follows a [`Script`]: output chunks on stdout/stderr, waits, and how it ends (an
//! [`Outcome`], or running until stopped), plus what a stop does (take some time, emit more
//! output, end with an outcome) and, instead of all that, a start that fails. Waits use tokio's
//! clock, so tests run under paused time (`#[tokio::test(start_paused = true)]`).
//!
//! [`FakeBackend`] picks a job's script by the job's command text ([`FakeBackend::script_for`]),
//! else takes the next queued one ([`FakeBackend::push`]); a job with neither fails to start
//! with `BackendError::InvalidRequest`. It records every start, and per run when the stop was
//! seen, how long the run took and its outcome ([`FakeBackend::runs`]). [`RecordingSink`] keeps
//! every event each job sends it.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::job::{
    Backend, BackendError, EventKind, Execution, ExitSummary, JobEvent, JobId, JobOutput, JobSink,
    JobSpec, Outcome, Program, Sink, StreamKind,
};

/// The name the fake backend reports (events, Status).
pub const FAKE_BACKEND: &str = "fake";

/// The name the recording sink reports.
pub const RECORDING_SINK: &str = "recording";

/// Makes the error of a start that fails (a `BackendError` is not `Clone`).
type MakeError = Arc<dyn Fn() -> BackendError + Send + Sync>;

/// What one fake job does. Built with the methods below; by default it starts at once, prints
/// nothing and exits with code 0, and a stop ends it at once as if killed by SIGTERM.
#[derive(Clone)]
pub struct Script {
    start_delay: Duration,
    start_error: Option<MakeError>,
    pid: Option<u32>,
    handle: Option<String>,
    steps: Vec<Step>,
    end: End,
    on_stop: OnStop,
}

/// One step of a script, played in order until the job is stopped.
#[derive(Debug, Clone)]
pub enum Step {
    Output(StreamKind, Bytes),
    /// Passes time; a stop ends the wait at once.
    Wait(Duration),
}

#[derive(Debug, Clone)]
enum End {
    Outcome(Outcome),
    UntilStopped,
}

/// What a stop does: waits `after`, emits `output`, then ends with `outcome`.
#[derive(Debug, Clone)]
struct OnStop {
    after: Duration,
    output: Vec<(StreamKind, Bytes)>,
    outcome: Outcome,
}

const SIGTERM: i32 = 15;

impl Default for Script {
    fn default() -> Self {
        Script {
            start_delay: Duration::ZERO,
            start_error: None,
            pid: None,
            handle: None,
            steps: Vec::new(),
            end: End::Outcome(Outcome::Exited {
                code: Some(0),
                signal: None,
            }),
            on_stop: OnStop {
                after: Duration::ZERO,
                output: Vec::new(),
                outcome: Outcome::Exited {
                    code: None,
                    signal: Some(SIGTERM),
                },
            },
        }
    }
}

impl Script {
    pub fn new() -> Self {
        Script::default()
    }

    /// Emits `data` on stdout.
    pub fn stdout(self, data: impl Into<Bytes>) -> Self {
        self.step(Step::Output(StreamKind::Stdout, data.into()))
    }

    /// Emits `data` on stderr.
    pub fn stderr(self, data: impl Into<Bytes>) -> Self {
        self.step(Step::Output(StreamKind::Stderr, data.into()))
    }

    /// Passes `time` (tokio's clock); a stop ends the wait.
    pub fn wait(self, time: Duration) -> Self {
        self.step(Step::Wait(time))
    }

    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// After the steps, the program exits with `code`.
    pub fn exit(self, code: i32) -> Self {
        self.outcome(Outcome::Exited {
            code: Some(code),
            signal: None,
        })
    }

    /// After the steps, the program is killed by `signal`.
    pub fn killed(self, signal: i32) -> Self {
        self.outcome(Outcome::Exited {
            code: None,
            signal: Some(signal),
        })
    }

    /// After the steps, the run ends with `outcome`.
    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.end = End::Outcome(outcome);
        self
    }

    /// After the steps, the program runs until it is stopped.
    pub fn until_stopped(mut self) -> Self {
        self.end = End::UntilStopped;
        self
    }

    /// A stop takes `time` before the run ends (a graceful stop, a slow API).
    pub fn stop_takes(mut self, time: Duration) -> Self {
        self.on_stop.after = time;
        self
    }

    /// A stop emits `data` on `stream` (after `stop_takes`, before the run returns).
    pub fn stop_output(mut self, stream: StreamKind, data: impl Into<Bytes>) -> Self {
        self.on_stop.output.push((stream, data.into()));
        self
    }

    /// How a stopped run ends (default: killed by SIGTERM).
    pub fn stop_outcome(mut self, outcome: Outcome) -> Self {
        self.on_stop.outcome = outcome;
        self
    }

    /// The start fails with the error `make` returns (after `start_delay`).
    pub fn fail_start(mut self, make: impl Fn() -> BackendError + Send + Sync + 'static) -> Self {
        self.start_error = Some(Arc::new(make));
        self
    }

    /// The start takes `time` (tokio's clock) before it succeeds or fails.
    pub fn start_delay(mut self, time: Duration) -> Self {
        self.start_delay = time;
        self
    }

    /// The pid the execution reports.
    pub fn pid(mut self, pid: u32) -> Self {
        self.pid = Some(pid);
        self
    }

    /// The handle the execution reports (for job ids that other replicas can reach).
    pub fn handle(mut self, handle: impl Into<String>) -> Self {
        self.handle = Some(handle.into());
        self
    }
}

/// What happened to one run (one successfully started job), in the order runs began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    /// The job's command text (see [`command_text`]).
    pub command: String,
    /// When `Execution::run` was called.
    pub began: Instant,
    /// How long after `began` the run noticed its stop; `None` if it ended on its own.
    pub stop_seen: Option<Duration>,
    /// How long `Execution::run` took; `None` while it runs.
    pub ran_for: Option<Duration>,
    /// What the run returned; `None` while it runs.
    pub outcome: Option<Outcome>,
}

/// Everything the fake backend saw.
#[derive(Debug, Default)]
struct BackendLog {
    /// Every call of `start`, successful or not, in order.
    starts: Vec<JobSpec>,
    runs: Vec<RunRecord>,
    cleanups: usize,
}

/// A log behind a lock, and a counter bumped on every change so tests can wait for one.
struct Recorder<T> {
    log: Mutex<T>,
    changed: watch::Sender<u64>,
}

impl<T: Default> Recorder<T> {
    fn new() -> Arc<Self> {
        Arc::new(Recorder {
            log: Mutex::new(T::default()),
            changed: watch::Sender::new(0),
        })
    }
}

impl<T> Recorder<T> {
    fn read(&self) -> MutexGuard<'_, T> {
        self.log.lock().expect("fake log poisoned")
    }

    fn write<R>(&self, change: impl FnOnce(&mut T) -> R) -> R {
        let result = change(&mut self.read());
        self.changed.send_modify(|n| *n += 1);
        result
    }

    /// Waits until `check` returns something.
    async fn until<R>(&self, mut check: impl FnMut(&T) -> Option<R>) -> R {
        // Subscribing first: a change after the check still wakes us.
        let mut changes = self.changed.subscribe();
        loop {
            if let Some(found) = check(&self.read()) {
                return found;
            }
            changes
                .changed()
                .await
                .expect("the recorder outlives its waiters");
        }
    }
}

/// An in-memory backend playing [`Script`]s. See the module documentation.
pub struct FakeBackend {
    stop_time: Duration,
    scripts: Mutex<HashMap<String, Script>>,
    queue: Mutex<VecDeque<Script>>,
    recorder: Arc<Recorder<BackendLog>>,
}

impl Default for FakeBackend {
    fn default() -> Self {
        FakeBackend::new(Duration::from_secs(10))
    }
}

impl FakeBackend {
    /// A backend with no scripts whose [`Backend::stop_time`] is `stop_time`.
    pub fn new(stop_time: Duration) -> Self {
        FakeBackend {
            stop_time,
            scripts: Mutex::new(HashMap::new()),
            queue: Mutex::new(VecDeque::new()),
            recorder: Recorder::new(),
        }
    }

    /// Every job whose command text is `command` plays `script`.
    pub fn script_for(&self, command: &str, script: Script) {
        self.scripts
            .lock()
            .expect("scripts poisoned")
            .insert(command.to_owned(), script);
    }

    /// The next job without a script of its own plays `script` (first pushed, first played).
    pub fn push(&self, script: Script) {
        self.queue.lock().expect("queue poisoned").push_back(script);
    }

    /// The spec of every `start` call, failed ones included, in order.
    pub fn starts(&self) -> Vec<JobSpec> {
        self.recorder.read().starts.clone()
    }

    /// Every run, in the order they began.
    pub fn runs(&self) -> Vec<RunRecord> {
        self.recorder.read().runs.clone()
    }

    /// How many times `finish_cleanups` was called.
    pub fn cleanups(&self) -> usize {
        self.recorder.read().cleanups
    }

    /// Waits until `n` runs have begun.
    pub async fn runs_began(&self, n: usize) {
        self.recorder
            .until(|log| (log.runs.len() >= n).then_some(()))
            .await
    }

    /// Waits until `n` runs have ended (returned their outcome).
    pub async fn runs_ended(&self, n: usize) {
        self.recorder
            .until(|log| {
                let ended = log.runs.iter().filter(|r| r.outcome.is_some()).count();
                (ended >= n).then_some(())
            })
            .await
    }
}

/// The text a job's script is chosen by: a shell command as is, an argv joined by spaces.
pub fn command_text(program: &Program) -> String {
    match program {
        Program::Shell(command) => command.clone(),
        Program::Argv(argv) => argv.join(" "),
    }
}

#[async_trait]
impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        FAKE_BACKEND
    }

    async fn start(&self, spec: &JobSpec) -> Result<Box<dyn Execution>, BackendError> {
        self.recorder.write(|log| log.starts.push(spec.clone()));
        let command = command_text(&spec.program);
        let scripted = self
            .scripts
            .lock()
            .expect("scripts poisoned")
            .get(&command)
            .cloned();
        let script = scripted
            .or_else(|| self.queue.lock().expect("queue poisoned").pop_front())
            .ok_or_else(|| {
                BackendError::InvalidRequest(format!("fake backend: no script for {command:?}"))
            })?;
        if !script.start_delay.is_zero() {
            tokio::time::sleep(script.start_delay).await;
        }
        if let Some(make) = &script.start_error {
            return Err(make());
        }
        Ok(Box::new(FakeExecution {
            command,
            script,
            recorder: Arc::clone(&self.recorder),
        }))
    }

    fn stop_time(&self) -> Duration {
        self.stop_time
    }

    async fn finish_cleanups(&self) {
        self.recorder.write(|log| log.cleanups += 1);
    }
}

struct FakeExecution {
    command: String,
    script: Script,
    recorder: Arc<Recorder<BackendLog>>,
}

#[async_trait]
impl Execution for FakeExecution {
    fn pid(&self) -> Option<u32> {
        self.script.pid
    }

    fn handle(&self) -> Option<String> {
        self.script.handle.clone()
    }

    async fn run(
        self: Box<Self>,
        out: &mut JobOutput,
        stop: CancellationToken,
        leave: CancellationToken,
    ) -> Outcome {
        let began = Instant::now();
        let index = self.recorder.write(|log| {
            log.runs.push(RunRecord {
                command: self.command.clone(),
                began,
                stop_seen: None,
                ran_for: None,
                outcome: None,
            });
            log.runs.len() - 1
        });
        // A job with a handle outlives this process, like a Daytona job: it can be left.
        let left = async {
            match self.script.handle {
                Some(_) => leave.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let played = tokio::select! {
            played = play(&self.script, out, &stop) => Some(played),
            _ = left => None,
        };
        let outcome = match played {
            None => Outcome::Left,
            Some(Some(outcome)) => outcome,
            Some(None) => {
                let seen = began.elapsed();
                self.recorder
                    .write(|log| log.runs[index].stop_seen = Some(seen));
                let on_stop = &self.script.on_stop;
                tokio::time::sleep(on_stop.after).await;
                for (stream, data) in &on_stop.output {
                    out.output(*stream, data.clone()).await;
                }
                on_stop.outcome.clone()
            }
        };
        let ran_for = began.elapsed();
        self.recorder.write(|log| {
            let run = &mut log.runs[index];
            run.ran_for = Some(ran_for);
            run.outcome = Some(outcome.clone());
        });
        outcome
    }
}

/// Plays the steps; `None` when stopped before the end.
async fn play(script: &Script, out: &mut JobOutput, stop: &CancellationToken) -> Option<Outcome> {
    for step in &script.steps {
        if stop.is_cancelled() {
            return None;
        }
        match step {
            // Waits for room in the client's buffer like a real backend; `JobOutput` bounds
            // that wait once the job is stopped.
            Step::Output(stream, data) => out.output(*stream, data.clone()).await,
            Step::Wait(time) => {
                tokio::select! {
                    _ = tokio::time::sleep(*time) => {}
                    _ = stop.cancelled() => return None,
                }
            }
        }
    }
    match &script.end {
        _ if stop.is_cancelled() => None,
        End::Outcome(outcome) => Some(outcome.clone()),
        End::UntilStopped => {
            stop.cancelled().await;
            None
        }
    }
}

/// What the recording sink received.
#[derive(Debug, Default)]
struct SinkLog {
    /// Jobs the sink was opened for, in order.
    opened: Vec<JobId>,
    /// Every event received, in order, with its job.
    events: Vec<(JobId, JobEvent)>,
    /// The deadline of every `flush` call.
    flushes: Vec<Duration>,
}

/// A [`Sink`] that takes every job and keeps every event it receives.
pub struct RecordingSink {
    recorder: Arc<Recorder<SinkLog>>,
}

impl Default for RecordingSink {
    fn default() -> Self {
        RecordingSink::new()
    }
}

impl RecordingSink {
    pub fn new() -> Self {
        RecordingSink {
            recorder: Recorder::new(),
        }
    }

    /// The jobs the sink was opened for, in order.
    pub fn opened(&self) -> Vec<JobId> {
        self.recorder.read().opened.clone()
    }

    /// The events of job `id`, in the order received.
    pub fn events(&self, id: &JobId) -> Vec<JobEvent> {
        self.recorder
            .read()
            .events
            .iter()
            .filter(|(job, _)| job == id)
            .map(|(_, event)| event.clone())
            .collect()
    }

    /// Every event received, with its job, in the order received.
    pub fn all_events(&self) -> Vec<(JobId, JobEvent)> {
        self.recorder.read().events.clone()
    }

    /// The deadline of every `flush` call.
    pub fn flushes(&self) -> Vec<Duration> {
        self.recorder.read().flushes.clone()
    }

    /// The `Exited` summary of job `id`, if received.
    pub fn exit(&self, id: &JobId) -> Option<ExitSummary> {
        exit_of(&self.recorder.read(), id)
    }

    /// Waits for the `Exited` event of job `id` and returns its summary.
    pub async fn exited(&self, id: &JobId) -> ExitSummary {
        self.recorder.until(|log| exit_of(log, id)).await
    }
}

fn exit_of(log: &SinkLog, id: &JobId) -> Option<ExitSummary> {
    log.events
        .iter()
        .find_map(|(job, event)| match &event.kind {
            EventKind::Exited(summary) if job == id => Some(summary.clone()),
            _ => None,
        })
}

#[async_trait]
impl Sink for RecordingSink {
    fn name(&self) -> &'static str {
        RECORDING_SINK
    }

    fn open(&self, job_id: &JobId, _spec: &JobSpec) -> Option<Box<dyn JobSink>> {
        self.recorder.write(|log| log.opened.push(job_id.clone()));
        Some(Box::new(RecordingJobSink {
            job_id: job_id.clone(),
            recorder: Arc::clone(&self.recorder),
        }))
    }

    async fn flush(&self, deadline: Duration) {
        self.recorder.write(|log| log.flushes.push(deadline));
    }
}

struct RecordingJobSink {
    job_id: JobId,
    recorder: Arc<Recorder<SinkLog>>,
}

impl JobSink for RecordingJobSink {
    fn event(&mut self, event: &JobEvent) {
        self.recorder
            .write(|log| log.events.push((self.job_id.clone(), event.clone())));
    }
}
