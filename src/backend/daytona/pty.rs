//! `tty` jobs on Daytona: each runs on a terminal session of its own (`/process/pty`).
//!
//! Daytona's terminal sessions start the sandbox's login shell and take no command, so the job's
//! command line is typed into it: a line that prints a banner and then `exec`s the job (see
//! `script::terminal_line`), so the session ends with the job's own status. Everything before
//! the banner (greeting, prompt, the echo of the typed line) is dropped; what follows is the
//! job's terminal output, delivered as stdout like the local backend's.
//!
//! - Input and end of input (the end-of-file character, Ctrl-D) go through the session's
//!   WebSocket, once the job has started (its banner seen): typed earlier, the login shell
//!   could read it, and its echo would be dropped with the shell's output. A resize is an HTTP
//!   call; a write waits for the resizes asked before it, so a program reads what is typed
//!   after a resize at the new size.
//! - Exit: close 1000 (status 0), 1011 with the JSON reason `{exitCode, exitReason}`, or the
//!   newer `{"type":"control","status":"exited","exitCode":N}` message, which may overtake
//!   output still queued: after it, reading goes on until the close (bounded by
//!   [`EXIT_CLOSE_GRACE`]) so that output is delivered too.
//! - Daytona keeps no copy of the output and closes a client that falls behind with 1008 "slow
//!   consumer" (this server falls behind when the job's log is full and a lossless reader holds
//!   it). Reconnecting would silently skip output, so the job ends instead: Failed, saying that
//!   output was lost, and its terminal session deleted.
//! - No handle: with no replay, no other replica could follow the job, so a `tty` job lives and
//!   dies with the replica that started it. Its terminal session is deleted when it ends, when
//!   it is stopped, and when it is dropped.

use std::{collections::BTreeMap, io, sync::Arc, time::Duration};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use tokio::{sync::watch, time::Instant};
use tokio_tungstenite::tungstenite::{Message, protocol::CloseFrame};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use super::{
    ApiError, DaytonaClient, SESSION_PREFIX, Toolbox, api_error,
    client::{LogSocket, PtyRequest},
    script, split_status,
};
use crate::job::{
    BackendError, Execution, InputSink, JobOutput, JobSpec, JobTerminal, Outcome, StreamKind,
    TerminalSize, TtySpec,
};

/// Printed (joined) by the typed line just before the job starts; a per-job nonce follows it.
const BANNER_PREFIX: &str = "sandbox-runner-start-";

/// Largest frame written to the terminal (Daytona reads client frames of up to 64 KiB).
const MAX_INPUT_FRAME: usize = 32 * 1024;

/// Largest typed command line: it is one client frame.
const MAX_LINE: usize = 60 * 1024;

/// Daytona's bound on a terminal's rows and columns.
const MAX_SIDE: u16 = 1000;

/// How long output may still arrive after the exit message, before the close.
const EXIT_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Sent by `close`: the end-of-file character of a terminal in its default settings (Daytona
/// gives no access to the terminal's own settings).
const CTRL_D: u8 = 0x04;

type Writer = Arc<tokio::sync::Mutex<SplitSink<LogSocket, Message>>>;

/// A running `tty` job on Daytona.
pub(super) struct TerminalExecution {
    pty: Pty,
    reader: SplitStream<LogSocket>,
    resizes: Arc<Resizes>,
    /// Subscribed at start, so a resize asked before `run` is applied too.
    wanted: watch::Receiver<(u64, TerminalSize)>,
    input: Option<Box<dyn InputSink>>,
    terminal: Option<Box<dyn JobTerminal>>,
    banner: Vec<u8>,
    request_timeout: Duration,
}

/// Terminal sizes asked for (numbered) and the number of the last one applied; and whether
/// the job has started (input waits for both).
struct Resizes {
    wanted: watch::Sender<(u64, TerminalSize)>,
    applied: watch::Sender<u64>,
    job_started: watch::Sender<bool>,
}

/// Checks a size against Daytona's bounds.
fn check_size(size: TerminalSize) -> Result<(), String> {
    if size.rows > MAX_SIDE || size.cols > MAX_SIDE {
        return Err(format!(
            "Daytona terminals have at most {MAX_SIDE} rows and {MAX_SIDE} columns, not {}x{}",
            size.rows, size.cols
        ));
    }
    Ok(())
}

impl TerminalExecution {
    /// Creates the job's terminal session, connects to it and types the job's command line.
    pub async fn start(
        client: Arc<DaytonaClient>,
        toolbox: Toolbox,
        spec: &JobSpec,
        tty: &TtySpec,
        cleanups: TaskTracker,
        request_timeout: Duration,
    ) -> Result<TerminalExecution, BackendError> {
        check_size(tty.size).map_err(|e| BackendError::InvalidRequest(format!("tty: {e}")))?;
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let mut line = script::terminal_line(spec, (BANNER_PREFIX, &nonce));
        line.push('\n');
        if line.len() > MAX_LINE {
            return Err(BackendError::InvalidRequest(format!(
                "a tty job's command line, environment and cwd are typed into a Daytona \
                 terminal in one frame of at most {MAX_LINE} bytes; this one takes {}",
                line.len()
            )));
        }
        let what = format!("terminal session in sandbox {:?}", spec.meta.sandbox_id);
        // The guard exists before the session does (see `Session` in the parent module).
        let pty = Pty {
            client: Arc::clone(&client),
            toolbox,
            id: format!("{SESSION_PREFIX}{}", uuid::Uuid::new_v4()),
            deleted: false,
            cleanups,
        };
        // TERM for the login shell too; the job's own variables are set on the typed line, after
        // the shell's profile has run.
        let envs = BTreeMap::from([("TERM".to_owned(), tty.term.clone())]);
        let request = PtyRequest {
            id: &pty.id,
            cwd: None,
            envs: &envs,
            cols: tty.size.cols,
            rows: tty.size.rows,
        };
        client
            .create_pty(&pty.toolbox, &request)
            .await
            .map_err(|e| api_error(e, &what))?;
        let socket = client
            .connect_pty(&pty.toolbox, &pty.id)
            .await
            .map_err(|e| api_error(e, &what))?;
        let (mut writer, mut reader) = socket.split();
        let first = tokio::time::timeout(request_timeout, reader.next()).await;
        let refused = |detail: String| BackendError::Failed {
            context: what.clone(),
            source: detail.into(),
        };
        match first {
            Ok(Some(Ok(Message::Text(text)))) => match control(&text) {
                Some(Control::Connected) => {}
                _ => return Err(refused(format!("the terminal stream opened with {text:?}"))),
            },
            Ok(other) => {
                return Err(refused(format!(
                    "the terminal stream did not say it connected: {other:?}"
                )));
            }
            Err(_) => {
                return Err(BackendError::Unavailable(
                    "Daytona's terminal stream did not say it connected in time".into(),
                ));
            }
        }
        writer
            .send(Message::Binary(Bytes::from(line)))
            .await
            .map_err(|e| {
                BackendError::Unavailable(format!("typing the job's command: {e}").into())
            })?;
        info!(pty_id = %pty.id, "tty job started on a Daytona terminal session");
        let (wanted_tx, wanted) = watch::channel((0, tty.size));
        let resizes = Arc::new(Resizes {
            wanted: wanted_tx,
            applied: watch::Sender::new(0),
            job_started: watch::Sender::new(false),
        });
        let writer: Writer = Arc::new(tokio::sync::Mutex::new(writer));
        let input = TerminalInput {
            writer,
            resizes: Arc::clone(&resizes),
        };
        let banner = format!("{BANNER_PREFIX}{nonce}").into_bytes();
        Ok(TerminalExecution {
            pty,
            reader,
            terminal: Some(Box::new(TerminalControl(Arc::clone(&resizes)))),
            resizes,
            wanted,
            input: Some(Box::new(input)),
            banner,
            request_timeout,
        })
    }
}

/// A control message of Daytona's terminal stream.
#[derive(Debug, PartialEq, Eq)]
enum Control {
    Connected,
    Exited(i32),
    Error(String),
    Other,
}

/// The control message in a text frame, if it is one.
fn control(text: &str) -> Option<Control> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        status: String,
        #[serde(default)]
        exit_code: Option<i32>,
        #[serde(default)]
        error: Option<String>,
    }
    let raw: Raw = serde_json::from_str(text).ok()?;
    if raw.kind != "control" {
        return None;
    }
    Some(match (raw.status.as_str(), raw.exit_code) {
        ("connected", _) => Control::Connected,
        ("exited", Some(code)) => Control::Exited(code),
        ("error", _) => Control::Error(raw.error.unwrap_or_else(|| text.to_owned())),
        _ => Control::Other,
    })
}

/// How the terminal stream ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The program exited with this status.
    Exit(i32),
    /// Daytona dropped this server for falling behind; output was lost.
    SlowConsumer,
    /// The stream ended without an exit status.
    Lost(String),
}

/// What a close frame says, given the exit status already had from a control message.
fn close_meaning(frame: Option<&CloseFrame>, exit: Option<i32>) -> Ended {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Reason {
        exit_code: i32,
    }
    let Some(frame) = frame else {
        return exit.map_or_else(
            || Ended::Lost("Daytona closed the terminal stream without a status".into()),
            Ended::Exit,
        );
    };
    let reason = serde_json::from_str::<Reason>(&frame.reason)
        .ok()
        .map(|r| r.exit_code);
    match u16::from(frame.code) {
        1008 => Ended::SlowConsumer,
        1000 => Ended::Exit(exit.or(reason).unwrap_or(0)),
        code => match exit.or(reason) {
            Some(status) => Ended::Exit(status),
            None => Ended::Lost(format!(
                "Daytona closed the terminal stream with {code} {:?} and no exit status",
                frame.reason.as_str()
            )),
        },
    }
}

/// Drops the terminal's output up to the banner and the line end after it.
struct BannerFilter {
    banner: Vec<u8>,
    state: Filtering,
}

enum Filtering {
    /// The last bytes seen (fewer than the banner), which may start it.
    Searching(Vec<u8>),
    /// Past the banner; its line end (`\r\n` from the terminal) is dropped next.
    LineEnd {
        cr_seen: bool,
    },
    Passing,
}

impl BannerFilter {
    fn new(banner: Vec<u8>) -> Self {
        BannerFilter {
            banner,
            state: Filtering::Searching(Vec::new()),
        }
    }

    fn started(&self) -> bool {
        !matches!(self.state, Filtering::Searching(_))
    }

    /// The part of `data` that is the job's output.
    fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        match &mut self.state {
            Filtering::Passing => data.to_vec(),
            Filtering::Searching(tail) => {
                tail.extend_from_slice(data);
                let found = tail
                    .windows(self.banner.len())
                    .position(|w| w == self.banner.as_slice());
                match found {
                    Some(at) => {
                        let rest = tail.split_off(at + self.banner.len());
                        self.state = Filtering::LineEnd { cr_seen: false };
                        self.feed(&rest)
                    }
                    None => {
                        // Bounded: only what could still be the start of the banner is kept.
                        let keep = tail.len().min(self.banner.len() - 1);
                        tail.drain(..tail.len() - keep);
                        Vec::new()
                    }
                }
            }
            Filtering::LineEnd { cr_seen } => {
                let mut rest = data;
                if !*cr_seen && rest.first() == Some(&b'\r') {
                    *cr_seen = true;
                    rest = &rest[1..];
                }
                if rest.is_empty() {
                    return Vec::new();
                }
                let had_cr = *cr_seen;
                self.state = Filtering::Passing;
                match rest.strip_prefix(b"\n") {
                    Some(after) => after.to_vec(),
                    // Not the line end after all: give back the carriage return held.
                    None if had_cr => [b"\r".as_slice(), rest].concat(),
                    None => rest.to_vec(),
                }
            }
        }
    }
}

#[async_trait]
impl Execution for TerminalExecution {
    fn pid(&self) -> Option<u32> {
        None
    }

    fn take_input(&mut self) -> Option<Box<dyn InputSink>> {
        self.input.take()
    }

    fn take_terminal(&mut self) -> Option<Box<dyn JobTerminal>> {
        self.terminal.take()
    }

    async fn run(
        mut self: Box<Self>,
        out: &mut JobOutput,
        stop: CancellationToken,
        _leave: CancellationToken,
    ) -> Outcome {
        let this = &mut *self;
        let resizer = apply_resizes(
            Arc::clone(&this.pty.client),
            this.pty.toolbox.clone(),
            this.pty.id.clone(),
            Arc::clone(&this.resizes),
            this.wanted.clone(),
        );
        tokio::pin!(resizer);
        let mut filter = BannerFilter::new(std::mem::take(&mut this.banner));
        let mut exit: Option<i32> = None;
        // Set once no more output is expected soon: after the exit message, or once stopped.
        let mut deadline: Option<Instant> = None;
        let mut stopped = false;
        let ended = loop {
            let message = tokio::select! {
                message = this.reader.next() => message,
                _ = stop.cancelled(), if !stopped => {
                    stopped = true;
                    // Deleting the terminal session kills the job; what it printed until then
                    // still arrives before the close.
                    this.pty.delete().await;
                    deadline = Some(Instant::now() + this.request_timeout);
                    continue;
                }
                _ = &mut resizer => continue,
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    break match exit {
                        Some(status) => Ended::Exit(status),
                        None => Ended::Lost("Daytona did not close the terminal stream".into()),
                    };
                }
            };
            let data = match message {
                Some(Ok(Message::Binary(data))) => data,
                Some(Ok(Message::Text(text))) => match control(&text) {
                    Some(Control::Exited(status)) => {
                        // Output still queued may follow: read on until the close.
                        exit = Some(status);
                        deadline.get_or_insert(Instant::now() + EXIT_CLOSE_GRACE);
                        continue;
                    }
                    Some(Control::Error(error)) => {
                        break Ended::Lost(format!("Daytona's terminal stream failed: {error}"));
                    }
                    Some(Control::Connected | Control::Other) => continue,
                    None => Bytes::from(text),
                },
                Some(Ok(Message::Close(frame))) => break close_meaning(frame.as_ref(), exit),
                Some(Ok(_)) => continue, // ping/pong: tungstenite answers pings itself
                Some(Err(e)) => {
                    break exit.map_or_else(
                        || Ended::Lost(format!("the terminal stream failed: {e}")),
                        Ended::Exit,
                    );
                }
                None => break close_meaning(None, exit),
            };
            let output = filter.feed(&data);
            if filter.started() {
                this.resizes.job_started.send_replace(true);
            }
            out.output(StreamKind::Stdout, Bytes::from(output)).await;
        };
        // The session is gone once its program exited; deleting it again is harmless, and
        // otherwise it kills whatever is left.
        this.pty.delete().await;
        match ended {
            Ended::SlowConsumer => {
                warn!(pty_id = %this.pty.id, "Daytona dropped this server as a slow consumer of a terminal");
                Outcome::Failed(
                    "Daytona closed the terminal stream because this server fell behind the \
                     job's output (1008 slow consumer; the job's log was full while a lossless \
                     reader held it). Daytona keeps no copy, so output after what was delivered \
                     is lost: the job was ended and its terminal session deleted"
                        .into(),
                )
            }
            _ if !filter.started() && !stopped => Outcome::Failed(
                "the Daytona terminal session ended before the job's command started (its \
                 shell did not run the typed command line)"
                    .into(),
            ),
            Ended::Exit(status) => {
                let (code, signal) = split_status(status);
                Outcome::Exited { code, signal }
            }
            Ended::Lost(_) if stopped => Outcome::Failed(
                "the job was stopped: its Daytona terminal session was deleted, which kills it"
                    .into(),
            ),
            Ended::Lost(reason) => Outcome::Failed(reason),
        }
    }
}

/// Applies the sizes asked for, in order, the last one winning; marks each applied (or failed)
/// so writes waiting for it go on. Never returns.
async fn apply_resizes(
    client: Arc<DaytonaClient>,
    toolbox: Toolbox,
    pty_id: String,
    resizes: Arc<Resizes>,
    mut wanted: watch::Receiver<(u64, TerminalSize)>,
) {
    while wanted.changed().await.is_ok() {
        let (number, size) = *wanted.borrow_and_update();
        match client
            .resize_pty(&toolbox, &pty_id, size.cols, size.rows)
            .await
        {
            Ok(()) => {}
            Err(ApiError::Gone(_) | ApiError::NotFound(_)) => {
                debug!(pty_id, "no resize: the terminal session has ended");
            }
            Err(e) => warn!(pty_id, error = %e, "Daytona did not resize the terminal"),
        }
        resizes.applied.send_replace(number);
    }
    std::future::pending::<()>().await;
}

/// The job's input, typed into its terminal through the WebSocket.
struct TerminalInput {
    writer: Writer,
    resizes: Arc<Resizes>,
}

impl TerminalInput {
    async fn send(&self, data: &[u8]) -> io::Result<()> {
        let mut started = self.resizes.job_started.subscribe();
        let _ = started.wait_for(|&started| started).await;
        // Typed after the resizes asked so far: the program reads it at its new size.
        let asked = self.resizes.wanted.borrow().0;
        let mut applied = self.resizes.applied.subscribe();
        let _ = applied.wait_for(|&done| done >= asked).await;
        self.writer
            .lock()
            .await
            .send(Message::Binary(Bytes::copy_from_slice(data)))
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))
    }
}

#[async_trait]
impl InputSink for TerminalInput {
    async fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let taken = data.len().min(MAX_INPUT_FRAME);
        self.send(&data[..taken]).await?;
        Ok(taken)
    }

    /// A terminal has no half-close: the end-of-file character is what a program reading it
    /// takes for the end of its input (at the start of a line).
    async fn close(&mut self) -> io::Result<()> {
        self.send(&[CTRL_D]).await
    }
}

/// Resizes the job's terminal: asked here, applied by the job's `run` (an HTTP call).
struct TerminalControl(Arc<Resizes>);

impl JobTerminal for TerminalControl {
    fn resize(&self, size: TerminalSize) -> io::Result<()> {
        check_size(size).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.0.wanted.send_modify(|(number, wanted)| {
            *number += 1;
            *wanted = size;
        });
        Ok(())
    }
}

/// A job's terminal session, deleted when the job is done with it (on drop if not before).
struct Pty {
    client: Arc<DaytonaClient>,
    toolbox: Toolbox,
    id: String,
    deleted: bool,
    cleanups: TaskTracker,
}

impl Pty {
    async fn delete(&mut self) {
        if self.deleted {
            return;
        }
        match self.client.delete_pty(&self.toolbox, &self.id).await {
            Ok(()) => self.deleted = true,
            // Not marked deleted: dropping the guard tries once more in the background.
            Err(e) => {
                warn!(pty_id = %self.id, error = %e, "could not delete the Daytona terminal session")
            }
        }
    }
}

impl Drop for Pty {
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
            runtime.spawn(self.cleanups.track_future(async move {
                if let Err(e) = client.delete_pty(&toolbox, &id).await {
                    warn!(pty_id = %id, error = %e, "could not delete an abandoned Daytona terminal session");
                }
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    use super::*;

    #[test]
    fn the_banner_and_its_line_end_are_found_across_frames() {
        let mut filter = BannerFilter::new(b"BANNER".to_vec());
        assert_eq!(filter.feed(b"$ printf 'BAN' 'NER'\r\nBA"), b"");
        assert!(!filter.started());
        assert_eq!(filter.feed(b"NNER\r"), b"");
        assert!(filter.started());
        assert_eq!(filter.feed(b"\nhello\r\n"), b"hello\r\n");
        assert_eq!(
            filter.feed(b"BANNER"),
            b"BANNER",
            "only the first one is dropped"
        );

        let mut filter = BannerFilter::new(b"BANNER".to_vec());
        assert_eq!(filter.feed(b"BANNER\r"), b"");
        assert_eq!(
            filter.feed(b"x"),
            b"\rx",
            "a lone carriage return is output"
        );
    }

    #[test]
    fn control_messages_and_close_frames_give_the_exit() {
        assert_eq!(
            control(r#"{"type":"control","status":"connected"}"#),
            Some(Control::Connected)
        );
        assert_eq!(
            control(r#"{"type":"control","status":"exited","exitCode":3}"#),
            Some(Control::Exited(3))
        );
        assert_eq!(control("plain output"), None);
        let frame = |code: u16, reason: &str| CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        };
        assert_eq!(close_meaning(Some(&frame(1000, "")), None), Ended::Exit(0));
        assert_eq!(
            close_meaning(
                Some(&frame(1011, r#"{"exitCode":7,"exitReason":"exited"}"#)),
                None
            ),
            Ended::Exit(7)
        );
        assert_eq!(
            close_meaning(Some(&frame(1000, "")), Some(4)),
            Ended::Exit(4)
        );
        assert_eq!(
            close_meaning(Some(&frame(1008, "slow consumer")), Some(0)),
            Ended::SlowConsumer
        );
        assert!(matches!(
            close_meaning(Some(&frame(1011, "read error")), None),
            Ended::Lost(_)
        ));
        assert!(matches!(close_meaning(None, None), Ended::Lost(_)));
    }

    #[test]
    fn sizes_beyond_daytonas_bound_are_refused() {
        assert!(
            check_size(TerminalSize {
                rows: 1000,
                cols: 1000
            })
            .is_ok()
        );
        assert!(
            check_size(TerminalSize {
                rows: 1001,
                cols: 10
            })
            .is_err()
        );
    }
}
