//! The Daytona backend: each job runs in its own process session inside a Daytona sandbox.
//!
//! Flow: resolve the sandbox (optionally start it), create a session, run the command in it
//! asynchronously, follow its log over a WebSocket and demultiplex stdout/stderr, then read the
//! exit code and reconcile the log tail with one plain GET (the follower can close early and
//! lose the last bytes), and delete the session. Stopping a job deletes its session, which
//! kills everything the command started. Every way a job ends here deletes its session.
//!
//! Jobs outlive this process: any replica can follow a job from its handle (the same reading,
//! replayed from byte 0, without owning the session), and a replica that shuts down leaves its
//! detached jobs running. Sessions nobody deletes that way (a job that ended with nobody
//! following it) are swept: see [`DaytonaBackend::sweep`].

mod client;
mod config;
mod demux;
mod input;
mod pty;
mod script;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use reqwest::StatusCode;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

pub use client::{ApiError, ClientSetupError, DaytonaClient, SDK_VERSION, Toolbox};
pub use config::{DEFAULT_DAYTONA_API_URL, DaytonaArgs, DaytonaConfigError};
use demux::Demux;

use crate::job::{
    Backend, BackendError, Capabilities, Execution, InputSink, JobOutput, JobSpec, Outcome,
    RemoteState, StreamKind,
};

/// Settings of the Daytona backend.
#[derive(Debug, Clone)]
pub struct DaytonaConfig {
    pub api_url: String,
    /// `Bearer <key>`, swapped when the key file changes.
    pub api_key: crate::secrets::SecretHeader,
    /// Start stopped sandboxes instead of refusing the job.
    pub auto_start: bool,
    /// How long to wait for a sandbox to reach `started`.
    pub start_timeout: Duration,
    /// Timeout of each HTTP call.
    pub request_timeout: Duration,
    /// Interval of log/exit-code polling when the follower is unavailable or has ended.
    pub poll_interval: Duration,
}

/// How often a follower that delivers nothing checks that the command is still running.
const LIVENESS_CHECK: Duration = Duration::from_secs(5);

/// Most log bytes gathered into one output event.
const MAX_EVENT_BYTES: usize = 256 * 1024;

/// Every session this service creates is named with this prefix; the sweep touches no other.
const SESSION_PREFIX: &str = "sandbox-runner-";

/// Sweep leases are sessions named this prefix and a window number (see `sweep_sandbox`).
const LEASE_PREFIX: &str = "sandbox-runner-lease-";

/// Length of a sweep lease's window.
const LEASE_WINDOW: Duration = Duration::from_secs(60);

/// Runs jobs in Daytona sandboxes.
pub struct DaytonaBackend {
    client: Arc<DaytonaClient>,
    config: DaytonaConfig,
    /// Deletions of sessions whose job ended without deleting them (see [`Session`]'s drop),
    /// so shutdown can wait for them.
    cleanups: TaskTracker,
    /// When the sweep first saw each ended session of ours, by (sandbox, session). In memory
    /// only: after a restart, deletion waits a retention from the first sweep that sees it.
    ended_since: Mutex<HashMap<(String, String), Instant>>,
}

impl DaytonaBackend {
    pub fn new(config: DaytonaConfig) -> Result<Self, ClientSetupError> {
        let client = DaytonaClient::new(&config.api_url, &config.api_key, config.request_timeout)?;
        Ok(DaytonaBackend {
            client: Arc::new(client),
            config,
            cleanups: TaskTracker::new(),
            ended_since: Mutex::new(HashMap::new()),
        })
    }

    /// Sweeps one started sandbox: deletes the sessions of ours that are due, under the
    /// sandbox's lease.
    ///
    /// The lease is a session named `sandbox-runner-lease-<window>`, `<window>` the current
    /// [`LEASE_WINDOW`] since the epoch. Creating a session is atomic in Daytona (a duplicate
    /// is 409), needs nothing but the API every replica already uses, and lives where the
    /// swept sessions live, so replicas sweeping at once cannot both delete: the one whose
    /// create succeeds sweeps, the others skip the sandbox until their next sweep. The winner
    /// deletes its lease when done; the window in the name keeps a lease left by a replica that
    /// died mid-sweep from blocking later windows, and a later sweep deletes it.
    async fn sweep_sandbox(
        &self,
        sandbox: client::Sandbox,
        retention: Duration,
        held: &HashSet<(String, String)>,
        seen: &mut HashSet<(String, String)>,
    ) -> Result<usize, BackendError> {
        let sandbox_id = sandbox.id.clone();
        let on_sandbox = |e| api_error(e, &format!("sandbox {sandbox_id:?}"));
        let toolbox = self.toolbox_of(sandbox).await?;
        if self
            .due_sessions(&toolbox, &sandbox_id, retention, held, seen)
            .await?
            .is_empty()
        {
            return Ok(0);
        }
        let lease = format!("{LEASE_PREFIX}{}", lease_window());
        match self.client.create_session(&toolbox, &lease).await {
            Ok(()) => {}
            Err(ApiError::Unexpected {
                status: StatusCode::CONFLICT,
                ..
            }) => {
                debug!(sandbox_id, "another replica is sweeping the sandbox");
                return Ok(0);
            }
            Err(e) => return Err(on_sandbox(e)),
        }
        // Looked at again under the lease: a sweep that just ended may have deleted some.
        let swept = async {
            let due = self
                .due_sessions(&toolbox, &sandbox_id, retention, held, seen)
                .await?;
            for session in &due {
                self.client
                    .delete_session(&toolbox, session)
                    .await
                    .map_err(on_sandbox)?;
                info!(sandbox_id, session_id = %session, "swept the session of an ended job");
            }
            Ok(due.len())
        }
        .await;
        if let Err(e) = self.client.delete_session(&toolbox, &lease).await {
            warn!(sandbox_id, error = %e, "could not release the sweep lease; a later sweep deletes it");
        }
        swept
    }

    /// Sessions of the sandbox to delete now: ours, not `held`, whose every command has an
    /// exit code and which the sweep first saw so at least `retention` ago; and leases of
    /// past windows. A session still starting (no command yet) or running is never due.
    async fn due_sessions(
        &self,
        toolbox: &Toolbox,
        sandbox_id: &str,
        retention: Duration,
        held: &HashSet<(String, String)>,
        seen: &mut HashSet<(String, String)>,
    ) -> Result<Vec<String>, BackendError> {
        let sessions = self
            .client
            .sessions(toolbox)
            .await
            .map_err(|e| api_error(e, &format!("sandbox {sandbox_id:?}")))?;
        let now = Instant::now();
        let window = lease_window();
        let mut ended_since = self.ended_since.lock().expect("sweep state poisoned");
        let mut due = Vec::new();
        for session in sessions {
            let id = session.session_id;
            if let Some(lease) = id.strip_prefix(LEASE_PREFIX) {
                if lease.parse::<u64>().is_ok_and(|w| w + 1 < window) {
                    due.push(id);
                }
                continue;
            }
            let key = (sandbox_id.to_owned(), id);
            let commands = session.commands.unwrap_or_default();
            let ended = !commands.is_empty() && commands.iter().all(|c| c.exit_code.is_some());
            if !key.1.starts_with(SESSION_PREFIX) || held.contains(&key) || !ended {
                continue;
            }
            let first_seen = *ended_since.entry(key.clone()).or_insert(now);
            if now.duration_since(first_seen) >= retention {
                due.push(key.1.clone());
            }
            seen.insert(key);
        }
        Ok(due)
    }

    /// The toolbox of a sandbox that is started now, without starting it.
    async fn toolbox_if_started(&self, sandbox_id: &str) -> Result<Option<Toolbox>, BackendError> {
        let on_sandbox = |e| api_error(e, &format!("sandbox {sandbox_id:?}"));
        let sandbox = match self.client.sandbox(sandbox_id).await {
            Ok(sandbox) if sandbox.state == "started" => sandbox,
            Ok(_) | Err(ApiError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(on_sandbox(e)),
        };
        self.toolbox_of(sandbox).await.map(Some)
    }

    /// The sandbox's toolbox, once the sandbox is `started`.
    async fn toolbox(&self, sandbox_id: &str) -> Result<Toolbox, BackendError> {
        let on_sandbox = |e| api_error(e, &format!("sandbox {sandbox_id:?}"));
        let mut sandbox = self.client.sandbox(sandbox_id).await.map_err(on_sandbox)?;
        if sandbox.state != "started" {
            if !self.config.auto_start {
                return Err(BackendError::SandboxNotReady {
                    sandbox_id: sandbox_id.to_owned(),
                    state: sandbox.state,
                });
            }
            let deadline = Instant::now() + self.config.start_timeout;
            // Only a resting sandbox is started; one already changing state (starting,
            // restoring, ...) is waited for, as a second start would be refused with 409.
            if matches!(sandbox.state.as_str(), "stopped" | "archived" | "paused") {
                info!(sandbox_id, state = %sandbox.state, "starting the sandbox");
                sandbox = self
                    .client
                    .start_sandbox(sandbox_id)
                    .await
                    .map_err(on_sandbox)?;
            }
            while sandbox.state != "started" {
                if Instant::now() >= deadline {
                    return Err(BackendError::SandboxNotReady {
                        sandbox_id: sandbox_id.to_owned(),
                        state: format!(
                            "{} after waiting {:?} for it to start",
                            sandbox.state, self.config.start_timeout
                        ),
                    });
                }
                tokio::time::sleep(self.config.poll_interval).await;
                sandbox = self.client.sandbox(sandbox_id).await.map_err(on_sandbox)?;
            }
        }
        self.toolbox_of(sandbox).await
    }

    /// The toolbox URL from the sandbox DTO, or from the older dedicated endpoint.
    async fn toolbox_of(&self, sandbox: client::Sandbox) -> Result<Toolbox, BackendError> {
        let proxy = match sandbox.toolbox_proxy_url {
            Some(url) if !url.is_empty() => url,
            _ => self
                .client
                .toolbox_proxy_url(&sandbox.id)
                .await
                .map_err(|e| api_error(e, &format!("sandbox {:?}", sandbox.id)))?,
        };
        Ok(Toolbox::new(&proxy, &sandbox.id))
    }
}

#[async_trait]
impl Backend for DaytonaBackend {
    fn name(&self) -> &'static str {
        "daytona"
    }

    /// Stdin through the session command's `/input` (whole lines, no EOF: see [`input`]), and
    /// terminals through Daytona's PTY sessions (see [`pty`]). Daytona has no way to signal
    /// one command.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            stdin: true,
            stdin_eof: false,
            tty: true,
            resize: true,
            signals: false,
        }
    }

    /// A stopped job's stop is one call: the session DELETE, which kills the command.
    fn stop_time(&self) -> Duration {
        self.config.request_timeout
    }

    async fn finish_cleanups(&self) {
        self.cleanups.close();
        self.cleanups.wait().await;
    }

    async fn remote_state(&self, handle: &str) -> Result<RemoteState, BackendError> {
        let handle = Handle::parse(handle)?;
        let toolbox = match self.toolbox_if_started(&handle.sandbox_id).await? {
            Some(toolbox) => toolbox,
            // A stopped sandbox has no sessions left.
            None => return Ok(RemoteState::Gone),
        };
        match self
            .client
            .exit_code(&toolbox, &handle.session_id, &handle.command_id)
            .await
        {
            Ok(None) => Ok(RemoteState::Running),
            Ok(Some(status)) => {
                let (code, signal) = split_status(status);
                Ok(RemoteState::Exited { code, signal })
            }
            Err(ApiError::NotFound(_)) => Ok(RemoteState::Gone),
            Err(e) => Err(api_error(e, &format!("sandbox {:?}", handle.sandbox_id))),
        }
    }

    async fn remote_cancel(&self, handle: &str) -> Result<(), BackendError> {
        let handle = Handle::parse(handle)?;
        if let Some(toolbox) = self.toolbox_if_started(&handle.sandbox_id).await? {
            self.client
                .delete_session(&toolbox, &handle.session_id)
                .await
                .map_err(|e| api_error(e, &format!("sandbox {:?}", handle.sandbox_id)))?;
        }
        Ok(())
    }

    async fn follow(&self, handle: &str) -> Result<Box<dyn Execution>, BackendError> {
        let handle = Handle::parse(handle)?;
        let toolbox = self
            .toolbox_if_started(&handle.sandbox_id)
            .await?
            .ok_or_else(|| BackendError::SandboxNotReady {
                sandbox_id: handle.sandbox_id.clone(),
                state: "no longer started (the job's session went with it)".into(),
            })?;
        let session = Session::followed(
            Arc::clone(&self.client),
            toolbox,
            handle.session_id.clone(),
            self.cleanups.clone(),
        );
        Ok(Box::new(DaytonaExecution {
            command_id: handle.command_id.clone(),
            handle,
            client: Arc::clone(&self.client),
            session,
            poll_interval: self.config.poll_interval,
            // Its stdin belongs to the replica that started it.
            input: None,
        }))
    }

    /// Lists the sandboxes, then the sessions of each started one, and deletes the sessions
    /// of ours that are due (see `due_sessions`), one sandbox at a time under its lease (see
    /// `sweep_sandbox`). A sandbox that fails is logged and skipped.
    async fn sweep(
        &self,
        retention: Duration,
        held: &HashSet<String>,
    ) -> Result<usize, BackendError> {
        let held: HashSet<(String, String)> = held
            .iter()
            .filter_map(|raw| Handle::parse(raw).ok())
            .map(|h| (h.sandbox_id, h.session_id))
            .collect();
        let sandboxes = self
            .client
            .sandboxes()
            .await
            .map_err(|e| api_error(e, "the sandbox list"))?;
        let mut seen = HashSet::new();
        let mut deleted = 0;
        for sandbox in sandboxes {
            // A stopped sandbox has no sessions left.
            if sandbox.state != "started" {
                continue;
            }
            let sandbox_id = sandbox.id.clone();
            match self
                .sweep_sandbox(sandbox, retention, &held, &mut seen)
                .await
            {
                Ok(n) => deleted += n,
                Err(e) => warn!(sandbox_id, error = %e, "could not sweep the sandbox's sessions"),
            }
        }
        // Forget sessions no longer seen ended: deleted, or gone with their sandbox.
        self.ended_since
            .lock()
            .expect("sweep state poisoned")
            .retain(|key, _| seen.contains(key));
        Ok(deleted)
    }

    async fn start(&self, spec: &JobSpec) -> Result<Box<dyn Execution>, BackendError> {
        let sandbox_id = spec.meta.sandbox_id.as_str();
        if sandbox_id == "." || sandbox_id == ".." {
            return Err(BackendError::InvalidRequest(format!(
                "sandbox_id {sandbox_id:?} is not a sandbox id"
            )));
        }
        if sandbox_id.is_empty() {
            return Err(BackendError::InvalidRequest(
                "sandbox_id is required with the daytona backend".into(),
            ));
        }
        let toolbox = self.toolbox(sandbox_id).await?;
        if let Some(tty) = &spec.tty {
            let execution = pty::TerminalExecution::start(
                Arc::clone(&self.client),
                toolbox,
                spec,
                tty,
                self.cleanups.clone(),
                self.config.request_timeout,
            )
            .await?;
            return Ok(Box::new(execution));
        }
        let session_id = format!("{SESSION_PREFIX}{}", uuid::Uuid::new_v4());
        // The guard exists before the session does: if this future is dropped while the
        // create call is in flight, or the call times out after Daytona made the session, the
        // guard still deletes it (deleting a session that does not exist is not an error).
        let session = Session::new(
            Arc::clone(&self.client),
            toolbox,
            session_id,
            self.cleanups.clone(),
        );
        self.client
            .create_session(&session.toolbox, &session.id)
            .await
            .map_err(|e| api_error(e, &format!("sandbox {sandbox_id:?}")))?;
        let command_id = self
            .client
            .exec_async(
                &session.toolbox,
                &session.id,
                &script::command_line(spec),
                // What clients write is the job's input, not its output.
                spec.stdin,
            )
            .await
            .map_err(|e| api_error(e, &format!("session in sandbox {sandbox_id:?}")))?;
        info!(sandbox_id, session_id = %session.id, command_id, "command started in Daytona");
        let handle = Handle {
            sandbox_id: sandbox_id.to_owned(),
            session_id: session.id.clone(),
            command_id: command_id.clone(),
        };
        let input = spec.stdin.then(|| {
            input::CommandInput::new(
                Arc::clone(&self.client),
                session.toolbox.clone(),
                session.id.clone(),
                command_id.clone(),
            )
        });
        Ok(Box::new(DaytonaExecution {
            handle,
            client: Arc::clone(&self.client),
            session,
            command_id,
            poll_interval: self.config.poll_interval,
            input,
        }))
    }
}

/// The one mapping from Daytona API errors to the core's backend errors; `what` names the
/// sandbox or session the call was about.
fn api_error(e: ApiError, what: &str) -> BackendError {
    match e {
        ApiError::NotFound(detail) => BackendError::SandboxNotFound {
            what: what.to_owned(),
            detail,
        },
        ApiError::Unauthorized(_) => BackendError::Misconfigured(e.into()),
        ApiError::Unavailable(_) | ApiError::Unreachable(_) => BackendError::Unavailable(e.into()),
        ApiError::Unexpected { .. } | ApiError::Gone(_) => BackendError::Failed {
            context: what.to_owned(),
            source: e.into(),
        },
    }
}

/// A job's Daytona session. One the job owns (it created it) is deleted on drop if the job did
/// not delete it; a followed one (another replica's, or left) never is.
struct Session {
    client: Arc<DaytonaClient>,
    toolbox: Toolbox,
    id: String,
    deleted: bool,
    owned: bool,
    /// Where the deletion on drop runs, tracked by the backend.
    cleanups: TaskTracker,
}

impl Session {
    fn new(
        client: Arc<DaytonaClient>,
        toolbox: Toolbox,
        id: String,
        cleanups: TaskTracker,
    ) -> Self {
        Session {
            client,
            toolbox,
            id,
            deleted: false,
            owned: true,
            cleanups,
        }
    }

    /// A session another replica (or an earlier run of this one) created.
    fn followed(
        client: Arc<DaytonaClient>,
        toolbox: Toolbox,
        id: String,
        cleanups: TaskTracker,
    ) -> Self {
        let mut session = Session::new(client, toolbox, id, cleanups);
        session.owned = false;
        session
    }

    async fn delete(&mut self) {
        match self.client.delete_session(&self.toolbox, &self.id).await {
            Ok(()) => self.deleted = true,
            // Not marked deleted: dropping the guard tries once more in the background.
            Err(e) => {
                warn!(session_id = %self.id, error = %e, "could not delete the Daytona session")
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.deleted || !self.owned {
            return;
        }
        let (client, toolbox, id) = (
            Arc::clone(&self.client),
            self.toolbox.clone(),
            self.id.clone(),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // Tracked even after `close`: a job dropped during shutdown still cleans up, and
            // the backend's `finish_cleanups` waits for it.
            runtime.spawn(self.cleanups.track_future(async move {
                if let Err(e) = client.delete_session(&toolbox, &id).await {
                    warn!(session_id = %id, error = %e, "could not delete an abandoned Daytona session");
                }
            }));
        }
    }
}

/// What any replica needs to reach a job: carried, signed, in its job id.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Handle {
    #[serde(rename = "sandbox")]
    sandbox_id: String,
    #[serde(rename = "session")]
    session_id: String,
    #[serde(rename = "command")]
    command_id: String,
}

impl Handle {
    fn parse(raw: &str) -> Result<Handle, BackendError> {
        // Only reachable with a verified id, so a bad handle is our bug, not the caller's.
        serde_json::from_str(raw).map_err(|e| BackendError::Failed {
            context: "unreadable Daytona job handle".into(),
            source: e.into(),
        })
    }
}

struct DaytonaExecution {
    handle: Handle,
    client: Arc<DaytonaClient>,
    session: Session,
    command_id: String,
    poll_interval: Duration,
    /// The command's stdin, for a job started with it.
    input: Option<input::CommandInput>,
}

/// Where reading the log got to.
struct LogReader {
    demux: Demux,
    /// Raw log bytes consumed so far (markers included): the follower replays from byte 0, so
    /// a plain GET's bytes past this offset are the ones still missing.
    consumed: usize,
}

impl LogReader {
    async fn feed(&mut self, raw: &[u8], out: &mut JobOutput) {
        self.consumed += raw.len();
        emit(self.demux.feed(raw), out).await;
    }

    /// Feeds whatever part of a full log snapshot has not been seen yet.
    async fn catch_up(&mut self, log: &[u8], out: &mut JobOutput) {
        if log.len() > self.consumed {
            let fresh = log[self.consumed..].to_vec();
            self.feed(&fresh, out).await;
        }
    }
}

async fn emit(pieces: Vec<(StreamKind, Vec<u8>)>, out: &mut JobOutput) {
    for (stream, data) in pieces {
        out.output(stream, Bytes::from(data)).await;
    }
}

/// How following the command ended.
enum Followed {
    /// The command finished with this exit status (as `$?` in the session shell).
    Exit(i32),
    /// The job was told to stop.
    Stopped,
    /// Daytona failed in a way that loses track of the command.
    Lost(String),
    /// The session disappeared under the job: deleted by a Cancel on another replica, or the
    /// sandbox stopped.
    Vanished,
}

#[async_trait]
impl Execution for DaytonaExecution {
    fn pid(&self) -> Option<u32> {
        None
    }

    fn handle(&self) -> Option<String> {
        Some(serde_json::to_string(&self.handle).expect("handle serialises"))
    }

    fn take_input(&mut self) -> Option<Box<dyn InputSink>> {
        self.input
            .take()
            .map(|input| Box::new(input) as Box<dyn InputSink>)
    }

    async fn run(
        mut self: Box<Self>,
        out: &mut JobOutput,
        stop: CancellationToken,
        leave: CancellationToken,
    ) -> Outcome {
        let mut reader = LogReader {
            demux: Demux::new(),
            consumed: 0,
        };
        // Following another replica's job (not leaving one of ours: that is decided below).
        let follower = !self.session.owned;
        let followed = tokio::select! {
            followed = self.follow_to_end(&mut reader, out, &stop) => Some(followed),
            _ = leave.cancelled() => None,
        };
        let Some((followed, log_stream_ended)) = followed else {
            // The command runs on in its session, which whoever follows it next reads from
            // byte 0: nothing is deleted, and the unfinished line in the demultiplexer is
            // theirs to read whole.
            self.session.owned = false;
            info!(session_id = %self.session.id, "left the Daytona session running");
            return Outcome::Left;
        };
        // Deleting the session kills whatever the command left running (or all of it, when
        // stopping), and frees the sandbox's memory of it. A follower deletes it only to stop
        // the job; an ended job's session it leaves to the sweep, after the retention.
        if self.session.owned || matches!(followed, Followed::Stopped) {
            self.session.delete().await;
        }
        emit(reader.demux.finish(), out).await;

        match followed {
            Followed::Exit(status) => {
                let (code, signal) = split_status(status);
                Outcome::Exited { code, signal }
            }
            // Said either way: a command that never gets an exit code (its session shell died,
            // a known Daytona bug) only ends by timeout or cancel, and this is the clue.
            Followed::Stopped if log_stream_ended => Outcome::Failed(
                "Daytona reported no exit code although the command's log had ended \
                 (its session shell may have died)"
                    .into(),
            ),
            Followed::Stopped => Outcome::Failed(
                "Daytona had reported no exit code when the job was stopped; its session \
                 was deleted, which kills the command"
                    .into(),
            ),
            Followed::Lost(reason) => Outcome::Failed(reason),
            // The owner deletes the session as soon as the command ends (that kills what it
            // left running), so a follower may find it gone before it read the exit code.
            Followed::Vanished if follower => Outcome::Failed(
                "the Daytona session was deleted by the replica that runs the job (it ended or \
                 was cancelled there) before this replica could read its exit code; the output \
                 above is complete up to that point, and that replica's Status has the exit"
                    .into(),
            ),
            Followed::Vanished => Outcome::Cancelled(
                "cancelled: the Daytona session was deleted outside this replica (a Cancel \
                 on another replica, or the sandbox stopped)"
                    .into(),
            ),
        }
    }
}

impl DaytonaExecution {
    /// Follows the command until it ends or the job is stopped; also says whether the log
    /// stream ended on Daytona's side.
    async fn follow_to_end(
        &self,
        reader: &mut LogReader,
        out: &mut JobOutput,
        stop: &CancellationToken,
    ) -> (Followed, bool) {
        let log_stream_ended = self.follow(reader, out, stop).await;
        let followed = if stop.is_cancelled() {
            Followed::Stopped
        } else {
            self.poll_until_exit(reader, out, stop).await
        };
        (followed, log_stream_ended)
    }

    /// Streams the log over the WebSocket until it closes, fails or the job is stopped.
    /// Returns true when the stream ended on Daytona's side.
    async fn follow(
        &self,
        reader: &mut LogReader,
        out: &mut JobOutput,
        stop: &CancellationToken,
    ) -> bool {
        let toolbox = &self.session.toolbox;
        let opened = tokio::select! {
            opened = self.client.follow_logs(toolbox, &self.session.id, &self.command_id) => opened,
            _ = stop.cancelled() => return false,
        };
        let mut socket = match opened {
            Ok(socket) => socket,
            Err(e) => {
                warn!(error = %e, "Daytona refused the log stream; polling the log instead");
                return false;
            }
        };
        // A silently dead connection would otherwise wait for the job's timeout: now and then,
        // check whether the command has exited; if it has and the follower still has not
        // closed a check later, stop following and let polling take the tail.
        let mut liveness =
            tokio::time::interval_at(Instant::now() + LIVENESS_CHECK, LIVENESS_CHECK);
        let mut exit_seen = false;
        loop {
            let message = tokio::select! {
                message = socket.next() => message,
                _ = stop.cancelled() => return false,
                _ = liveness.tick() => {
                    let exited = matches!(
                        self.client.exit_code(toolbox, &self.session.id, &self.command_id).await,
                        Ok(Some(_)) | Err(ApiError::NotFound(_))
                    );
                    if exited && exit_seen {
                        warn!("the log stream stayed open after the command exited; polling the log instead");
                        return true;
                    }
                    exit_seen = exited;
                    continue;
                }
            };
            let mut batch = match message {
                Some(Ok(Message::Binary(data))) => data.to_vec(),
                Some(Ok(Message::Text(text))) => text.as_bytes().to_vec(),
                Some(Ok(Message::Close(_))) | None => return true,
                Some(Ok(_)) => continue, // ping/pong: tungstenite answers pings itself
                Some(Err(e)) => {
                    warn!(error = %e, "the log stream failed; polling the log instead");
                    return false;
                }
            };
            // Frames carry at most 1 KiB: gather those already here into one event.
            let mut closed = false;
            while batch.len() < MAX_EVENT_BYTES {
                match socket.next().now_or_never() {
                    Some(Some(Ok(Message::Binary(data)))) => batch.extend_from_slice(&data),
                    Some(Some(Ok(Message::Text(text)))) => batch.extend_from_slice(text.as_bytes()),
                    Some(Some(Ok(Message::Close(_)))) | Some(None) | Some(Some(Err(_))) => {
                        closed = true;
                        break;
                    }
                    Some(Some(Ok(_))) => {}
                    None => break,
                }
            }
            reader.feed(&batch, out).await;
            if closed {
                return true;
            }
        }
    }

    /// Polls the exit code, and the log for anything the follower missed, until the command
    /// has exited; then takes the log once more so the tail is complete.
    async fn poll_until_exit(
        &self,
        reader: &mut LogReader,
        out: &mut JobOutput,
        stop: &CancellationToken,
    ) -> Followed {
        let (toolbox, session, command) =
            (&self.session.toolbox, &self.session.id, &self.command_id);
        loop {
            // Exit code first, then the log: a log read after the exit is complete.
            let exit = tokio::select! {
                exit = self.client.exit_code(toolbox, session, command) => exit,
                _ = stop.cancelled() => return Followed::Stopped,
            };
            let exit = match exit {
                Ok(exit) => exit,
                Err(ApiError::NotFound(_)) => return Followed::Vanished,
                Err(e) => return Followed::Lost(format!("lost track of the command: {e}")),
            };
            let log = tokio::select! {
                log = self.client.logs(toolbox, session, command) => log,
                _ = stop.cancelled() => return Followed::Stopped,
            };
            match log {
                Ok(log) => reader.catch_up(&log, out).await,
                Err(ApiError::NotFound(_)) => return Followed::Vanished,
                Err(e) => return Followed::Lost(format!("cannot read the command's log: {e}")),
            }
            if let Some(status) = exit {
                return Followed::Exit(status);
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll_interval) => {}
                _ = stop.cancelled() => return Followed::Stopped,
            }
        }
    }
}

/// The number of the current sweep lease window (see `sweep_sandbox`).
fn lease_window() -> u64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    since_epoch.as_secs() / LEASE_WINDOW.as_secs()
}

/// Daytona reports `$?` of the session shell, where a process killed by signal N shows as
/// 128+N. Statuses 129..=159 are therefore reported as that signal. A program that *exits* with
/// such a status on purpose is indistinguishable and is reported the same way.
/// Returns (exit code, signal).
fn split_status(status: i32) -> (Option<i32>, Option<i32>) {
    match status {
        129..=159 => (None, Some(status - 128)),
        code => (Some(code), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_statuses_above_128_are_signals() {
        assert_eq!(split_status(0), (Some(0), None));
        assert_eq!(split_status(42), (Some(42), None));
        assert_eq!(split_status(137), (None, Some(9)));
        assert_eq!(split_status(143), (None, Some(15)));
        assert_eq!(split_status(128), (Some(128), None));
        assert_eq!(split_status(-1), (Some(-1), None));
    }
}
