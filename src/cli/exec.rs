//! `exec` and `attach`: a job's output to this process's stdout and stderr, byte for byte, as
//! it arrives, until the job exits; then this process exits with the job's code.
//!
//! - Ctrl-C cancels the job and waits for its end; a second Ctrl-C leaves at once (130). With
//!   `-t` the local terminal is raw, so Ctrl-C is a byte for the job's terminal instead.
//! - A closed stdout (`| head -1`) cancels the job and exits quietly (141).
//! - A connection lost while the job runs is resumed after the last event received (by seq, or
//!   by byte offsets on another replica) for as long as the job waits for its client
//!   ([`RESUME_GRACE`]): the output has neither a gap nor a duplicate.
//! - stdin (`-i`, and with `-t`) goes to the job by SendInput, each write at its offset (so a
//!   resent write after a lost connection is applied once), on a task of its own so that a job
//!   that does not read never holds up its output; EOF closes the job's stdin.

use std::{process::ExitCode, time::Duration};

use base64::Engine;
use clap::Args;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    signal::unix::{SignalKind, signal},
};
use tonic::{Code, Status, Streaming};

use super::{Client, exit, print_json, print_line, report, terminal};
use crate::proto::{self as pb, exec_event::Kind, resume_from::Position};

/// How long the job waits for this client after its connection is lost (the job's
/// `disconnect_grace`), and so how long the client tries to resume.
const RESUME_GRACE: Duration = Duration::from_secs(30);

/// Largest stdin read sent in one write.
const STDIN_CHUNK: usize = 64 * 1024;

#[derive(Args)]
pub(super) struct ExecArgs {
    /// Sandbox to run in (the daytona backend needs one).
    #[arg(long)]
    sandbox: Option<String>,
    /// Working directory.
    #[arg(long)]
    cwd: Option<String>,
    /// An environment variable for the job, NAME=VALUE (repeatable).
    #[arg(short = 'e', long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Wall-clock limit (e.g. 30s, 5m); the service's default otherwise.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Print the job id once it started and leave it running.
    #[arg(long, conflicts_with_all = ["interactive", "tty"])]
    detach: bool,
    /// Forward this process's stdin to the job (EOF closes the job's stdin).
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run the job on a terminal, with this terminal in raw mode (implies -i).
    #[arg(short = 't', long)]
    tty: bool,
    /// The caller's task label.
    #[arg(long)]
    task: Option<String>,
    /// The caller's session label.
    #[arg(long)]
    session: Option<String>,
    /// The program and its arguments, run without a shell (use `sh -c '...'` for one).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub(super) struct AttachArgs {
    job_id: String,
    /// From the job's first event (the default).
    #[arg(long, conflicts_with = "after_seq")]
    from_start: bool,
    /// Start after this seq (the events of a job's stream are numbered from 0).
    #[arg(long)]
    after_seq: Option<u64>,
}

fn parse_env(entry: &str) -> Result<(String, String), String> {
    entry
        .split_once('=')
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("{entry:?} is not NAME=VALUE"))
}

pub(super) async fn exec(mut client: Client, args: ExecArgs, json: bool) -> ExitCode {
    let tty = args.tty.then(|| {
        let (rows, cols) = terminal::size().unwrap_or((24, 80));
        pb::TtyOptions {
            rows: rows.into(),
            cols: cols.into(),
            term: std::env::var("TERM").unwrap_or_default(),
        }
    });
    let (on_disconnect, disconnect_grace) = if args.detach {
        (pb::DisconnectPolicy::Detach, None)
    } else {
        (
            pb::DisconnectPolicy::CancelAfterGrace,
            Some(prost_types::Duration {
                seconds: RESUME_GRACE.as_secs() as i64,
                nanos: 0,
            }),
        )
    };
    let request = pb::ExecRequest {
        task_id: args.task.unwrap_or_default(),
        session_id: args.session.unwrap_or_default(),
        sandbox_id: args.sandbox.unwrap_or_default(),
        argv: args.command,
        cwd: args.cwd.unwrap_or_default(),
        env: args.env.into_iter().collect(),
        timeout: args.timeout.map(|t| prost_types::Duration {
            seconds: t.as_secs() as i64,
            nanos: t.subsec_nanos() as i32,
        }),
        on_disconnect: on_disconnect as i32,
        disconnect_grace,
        stdin: args.interactive || args.tty,
        tty,
        ..Default::default()
    };
    let mut stream = match client.exec(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            report(&status);
            return ExitCode::from(
                if status.code() == Code::FailedPrecondition
                    && status.message().contains("cannot start")
                {
                    exit::CANNOT_START
                } else {
                    exit::SERVICE_ERROR
                },
            );
        }
    };
    let job_id = match stream.message().await {
        Ok(Some(event)) => event.job_id,
        Ok(None) => {
            eprintln!("sandbox-runner: the service ended the stream before the job started");
            return ExitCode::from(exit::SERVICE_ERROR);
        }
        Err(status) => {
            report(&status);
            return ExitCode::from(exit::SERVICE_ERROR);
        }
    };
    if args.detach {
        let printed = if json {
            print_json(&serde_json::json!({ "jobId": job_id }))
        } else {
            print_line(&job_id)
        };
        return match printed {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(exit::BROKEN_PIPE),
        };
    }
    let mut follower = Follower::new(client, job_id, json, 0);
    // Raw mode for as long as the job runs (restored when `_raw` drops, before returning).
    let _raw = args.tty.then(terminal::RawMode::enable).flatten();
    if args.interactive || args.tty {
        tokio::spawn(forward_stdin(
            follower.client.clone(),
            follower.job_id.clone(),
        ));
    }
    follower.follow(stream, args.tty).await
}

pub(super) async fn attach(mut client: Client, args: AttachArgs, json: bool) -> ExitCode {
    let from = args.after_seq.map(Position::AfterSeq);
    let stream = match client.attach(open(&args.job_id, from)).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            report(&status);
            return ExitCode::from(exit::SERVICE_ERROR);
        }
    };
    let next_seq = args.after_seq.map_or(0, |seq| seq + 1);
    Follower::new(client, args.job_id, json, next_seq)
        .follow(stream, false)
        .await
}

/// An Attach stream's requests: `open` only (lossless: this client is the job's reader).
fn open(
    job_id: &str,
    from: Option<Position>,
) -> impl tonic::IntoStreamingRequest<Message = pb::AttachRequest> {
    tokio_stream::iter([pb::AttachRequest {
        kind: Some(pb::attach_request::Kind::Open(pb::AttachOpen {
            job_id: job_id.to_owned(),
            from: from.map(|position| pb::ResumeFrom {
                position: Some(position),
            }),
            lossless: true,
            ..Default::default()
        })),
    }])
}

/// Where a job's stream stands for this client, to resume it exactly.
struct Follower {
    client: Client,
    job_id: String,
    json: bool,
    /// The seq of the next event due.
    next_seq: u64,
    /// Bytes of stdout and stderr received.
    received: [u64; 2],
    cancelled: bool,
}

impl Follower {
    fn new(client: Client, job_id: String, json: bool, next_seq: u64) -> Self {
        Follower {
            client,
            job_id,
            json,
            next_seq,
            received: [0; 2],
            cancelled: false,
        }
    }

    /// Writes the job's events out until it exits; returns the exit code for this process.
    async fn follow(&mut self, mut stream: Streaming<pb::ExecEvent>, tty: bool) -> ExitCode {
        let (Ok(mut interrupts), Ok(mut window_changes)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::window_change()),
        ) else {
            eprintln!("sandbox-runner: cannot install signal handlers");
            return ExitCode::from(exit::SERVICE_ERROR);
        };
        let mut stdout = tokio::io::stdout();
        let mut stderr = tokio::io::stderr();
        loop {
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(event)) => {
                        match self.take(event, &mut stdout, &mut stderr).await {
                            Step::Next => {}
                            Step::Exit(code) => return ExitCode::from(code),
                            Step::StdoutClosed => {
                                self.cancel().await;
                                return ExitCode::from(exit::BROKEN_PIPE);
                            }
                        }
                    }
                    // The stream ended without `exited` (the server went away) or failed on
                    // the way: resume it, for as long as the job waits for us.
                    Ok(None) => match self.resume().await {
                        Ok(resumed) => stream = resumed,
                        Err(code) => return code,
                    },
                    Err(status) if is_transport(&status) => match self.resume().await {
                        Ok(resumed) => stream = resumed,
                        Err(code) => return code,
                    },
                    Err(status) => {
                        report(&status);
                        return ExitCode::from(exit::SERVICE_ERROR);
                    }
                },
                _ = interrupts.recv() => {
                    if self.cancelled {
                        return ExitCode::from(exit::CANCELLED);
                    }
                    eprintln!("sandbox-runner: cancelling the job (Ctrl-C again to leave now)");
                    self.cancel().await;
                }
                _ = window_changes.recv(), if tty => {
                    if let Some((rows, cols)) = terminal::size() {
                        let resize = pb::ResizeRequest {
                            job_id: self.job_id.clone(),
                            rows: rows.into(),
                            cols: cols.into(),
                        };
                        // The job may have ended meanwhile: its `exited` says so.
                        let _ = self.client.resize(resize).await;
                    }
                }
            }
        }
    }

    async fn take(
        &mut self,
        event: pb::ExecEvent,
        stdout: &mut tokio::io::Stdout,
        stderr: &mut tokio::io::Stderr,
    ) -> Step {
        let Some(kind) = event.kind else {
            return Step::Next;
        };
        match kind {
            Kind::Keepalive(_) => return Step::Next,
            Kind::Gap(gap) => {
                eprintln!(
                    "sandbox-runner: output lost (no longer held): {} stdout and {} stderr bytes",
                    gap.lost_stdout_bytes, gap.lost_stderr_bytes
                );
                self.next_seq = gap.resumed_seq;
                self.received = [gap.resumed_stdout_offset, gap.resumed_stderr_offset];
                return Step::Next;
            }
            Kind::Snapshot(snapshot) => {
                self.next_seq = event.seq + 1;
                self.received[0] = snapshot.stdout_offset;
                if !self.json && write(stdout, &snapshot.screen).await.is_err() {
                    return Step::StdoutClosed;
                }
                return Step::Next;
            }
            _ => {}
        }
        if event.seq < self.next_seq {
            // Already had (a resumed stream never repeats one; kept as a guard).
            return Step::Next;
        }
        self.next_seq = event.seq + 1;
        match kind {
            Kind::Output(output) => {
                let data = if output.text.is_empty() {
                    output.data
                } else {
                    output.text.into_bytes().into()
                };
                let on_stderr = output.stream == pb::OutputStream::Stderr as i32;
                self.received[usize::from(on_stderr)] = output.offset + data.len() as u64;
                if self.json {
                    let line = print_json(&serde_json::json!({
                        "seq": event.seq,
                        "stream": if on_stderr { "stderr" } else { "stdout" },
                        "offset": output.offset,
                        "data": base64::engine::general_purpose::STANDARD.encode(&data),
                    }));
                    if line.is_err() {
                        return Step::StdoutClosed;
                    }
                } else if on_stderr {
                    // A closed stderr is no reason to stop the job.
                    let _ = write(stderr, &data).await;
                } else if write(stdout, &data).await.is_err() {
                    return Step::StdoutClosed;
                }
                Step::Next
            }
            Kind::Exited(exited) => {
                if self.json {
                    // The job has ended: a closed stdout changes nothing now.
                    let _ = print_json(&serde_json::json!({
                        "seq": event.seq,
                        "state": super::state_name(exited.state),
                        "exitCode": exited.exit_code,
                        "signal": exited.signal,
                        "message": exited.message,
                    }));
                }
                Step::Exit(exit_code(&exited))
            }
            Kind::Started(_) | Kind::Gap(_) | Kind::Snapshot(_) | Kind::Keepalive(_) => Step::Next,
        }
    }

    async fn cancel(&mut self) {
        self.cancelled = true;
        let cancel = pb::CancelRequest {
            job_id: self.job_id.clone(),
        };
        if let Err(status) = self.client.cancel(cancel).await {
            report(&status);
        }
    }

    /// Reopens the job's stream after the last event received, retrying with backoff for as
    /// long as the job waits for its client.
    async fn resume(&mut self) -> Result<Streaming<pb::ExecEvent>, ExitCode> {
        let deadline = tokio::time::Instant::now() + RESUME_GRACE;
        let mut backoff = Duration::from_millis(100);
        let mut by_offsets = false;
        loop {
            let from = if by_offsets {
                Position::Offsets(pb::StreamOffsets {
                    stdout: self.received[0],
                    stderr: self.received[1],
                })
            } else if self.next_seq == 0 {
                Position::FromStart(pb::FromStart {})
            } else {
                Position::AfterSeq(self.next_seq - 1)
            };
            match self.client.attach(open(&self.job_id, Some(from))).await {
                Ok(response) => return Ok(response.into_inner()),
                // Seqs are per replica: on another one, resume by the bytes received.
                Err(status) if status.code() == Code::FailedPrecondition && !by_offsets => {
                    by_offsets = true;
                    continue;
                }
                Err(status) if is_transport(&status) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(status) => {
                    report(&status);
                    return Err(ExitCode::from(exit::SERVICE_ERROR));
                }
            }
        }
    }
}

/// What to do after an event.
enum Step {
    Next,
    Exit(u8),
    StdoutClosed,
}

/// Writes and flushes (so that output appears as the job writes it).
async fn write(out: &mut (impl AsyncWriteExt + Unpin), data: &[u8]) -> std::io::Result<()> {
    out.write_all(data).await?;
    out.flush().await
}

/// Errors that mean the connection, not the request, failed: worth resuming.
fn is_transport(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
    )
}

/// This process's exit code for how the job ended: its own code, 128+N for signal N (as a
/// shell reports it), or one of [`exit`]'s.
fn exit_code(exited: &pb::Exited) -> u8 {
    match pb::JobState::try_from(exited.state) {
        Ok(pb::JobState::TimedOut) => exit::TIMED_OUT,
        Ok(pb::JobState::Cancelled) => exit::CANCELLED,
        _ => match (exited.exit_code, exited.signal) {
            (Some(code), _) => (code & 0xff) as u8,
            (None, Some(signal)) => 128u8.saturating_add(signal as u8),
            // The backend lost the job.
            (None, None) => exit::SERVICE_ERROR,
        },
    }
}

/// Copies this process's stdin to the job's, each write at its offset, then closes it.
async fn forward_stdin(mut client: Client, job_id: String) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; STDIN_CHUNK];
    let mut sent: u64 = 0;
    loop {
        let n = match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let data = bytes::Bytes::copy_from_slice(&buf[..n]);
        // Resent (at the same offset) while the connection is being re-established.
        let mut attempts = 0;
        loop {
            let write = pb::SendInputRequest {
                job_id: job_id.clone(),
                data: data.clone(),
                offset: Some(sent),
            };
            match client.send_input(write).await {
                Ok(_) => break,
                Err(status) if is_transport(&status) && attempts < 20 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                // The job ended or closed its stdin: nothing more to send.
                Err(_) => return,
            }
        }
        sent += n as u64;
    }
    let close = pb::CloseInputRequest { job_id };
    let _ = client.close_input(close).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(state: pb::JobState, code: Option<i32>, signal: Option<i32>) -> pb::Exited {
        pb::Exited {
            state: state as i32,
            exit_code: code,
            signal,
            ..Default::default()
        }
    }

    #[test]
    fn exit_codes_follow_the_shells() {
        use pb::JobState::*;
        assert_eq!(exit_code(&exited(Succeeded, Some(0), None)), 0);
        assert_eq!(exit_code(&exited(Failed, Some(3), None)), 3);
        assert_eq!(exit_code(&exited(Failed, Some(256 + 7), None)), 7);
        assert_eq!(exit_code(&exited(Failed, None, Some(9))), 137);
        assert_eq!(
            exit_code(&exited(TimedOut, None, Some(15))),
            exit::TIMED_OUT
        );
        assert_eq!(
            exit_code(&exited(Cancelled, None, Some(15))),
            exit::CANCELLED
        );
        assert_eq!(exit_code(&exited(Failed, None, None)), exit::SERVICE_ERROR);
    }
}
