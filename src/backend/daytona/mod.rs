//! The Daytona backend: each job runs in its own process session inside a Daytona sandbox.
//!
//! Flow: resolve the sandbox (optionally start it), create a session, run the command in it
//! asynchronously, follow its log over a WebSocket and demultiplex stdout/stderr, then read the
//! exit code and reconcile the log tail with one plain GET (the follower can close early and
//! lose the last bytes), and delete the session. Stopping a job deletes its session, which
//! kills everything the command started. Every way a job ends deletes its session.

mod client;
mod config;
mod demux;
mod script;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

pub use client::{ApiError, ClientSetupError, DaytonaClient, SDK_VERSION, Toolbox};
pub use config::{DEFAULT_DAYTONA_API_URL, DaytonaArgs, DaytonaConfigError};
use demux::Demux;

use crate::job::{
    Backend, BackendError, Execution, JobOutput, JobSpec, Outcome, RemoteState, StreamKind,
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

/// Runs jobs in Daytona sandboxes.
pub struct DaytonaBackend {
    client: Arc<DaytonaClient>,
    config: DaytonaConfig,
    /// Deletions of sessions whose job ended without deleting them (see [`Session`]'s drop),
    /// so shutdown can wait for them.
    cleanups: TaskTracker,
}

impl DaytonaBackend {
    pub fn new(config: DaytonaConfig) -> Result<Self, ClientSetupError> {
        let client = DaytonaClient::new(&config.api_url, &config.api_key, config.request_timeout)?;
        Ok(DaytonaBackend {
            client: Arc::new(client),
            config,
            cleanups: TaskTracker::new(),
        })
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
        let session_id = format!("sandbox-runner-{}", uuid::Uuid::new_v4());
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
            .exec_async(&session.toolbox, &session.id, &script::command_line(spec))
            .await
            .map_err(|e| api_error(e, &format!("session in sandbox {sandbox_id:?}")))?;
        info!(sandbox_id, session_id = %session.id, command_id, "command started in Daytona");
        let handle = Handle {
            sandbox_id: sandbox_id.to_owned(),
            session_id: session.id.clone(),
            command_id: command_id.clone(),
        };
        Ok(Box::new(DaytonaExecution {
            handle,
            client: Arc::clone(&self.client),
            session,
            command_id,
            poll_interval: self.config.poll_interval,
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
        ApiError::Unexpected { .. } => BackendError::Failed {
            context: what.to_owned(),
            source: e.into(),
        },
    }
}

/// A Daytona session owned by one job; deleted on drop if the job did not delete it.
struct Session {
    client: Arc<DaytonaClient>,
    toolbox: Toolbox,
    id: String,
    deleted: bool,
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
            cleanups,
        }
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
        if self.deleted {
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

    async fn run(mut self: Box<Self>, out: &mut JobOutput, stop: CancellationToken) -> Outcome {
        let mut reader = LogReader {
            demux: Demux::new(),
            consumed: 0,
        };
        let log_stream_ended = self.follow(&mut reader, out, &stop).await;
        let followed = if stop.is_cancelled() {
            Followed::Stopped
        } else {
            self.poll_until_exit(&mut reader, out, &stop).await
        };
        // Deleting the session kills whatever the command left running (or all of it, when
        // stopping), and frees the sandbox's memory of it.
        self.session.delete().await;
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
            Followed::Vanished => Outcome::Cancelled(
                "cancelled: the Daytona session was deleted outside this replica (a Cancel \
                 on another replica, or the sandbox stopped)"
                    .into(),
            ),
        }
    }
}

impl DaytonaExecution {
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
