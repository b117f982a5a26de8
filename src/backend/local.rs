//! The embedded default backend: each job is a process on this host, leader of its own process
//! group, with stdin closed and stdout/stderr piped.
//!
//! Stopping a job signals the whole group: SIGTERM, then SIGKILL after the grace period. When the
//! leader exits, processes it left in its group get the same grace to finish writing, then the
//! same treatment, so a backgrounded child holding the pipes cannot keep a job open forever.

use std::{
    io,
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use nix::{
    errno::Errno,
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use tokio::{
    net::unix::pipe,
    process::{Child, Command},
    time::{Instant, sleep, sleep_until},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::job::{
    Backend, BackendError, Credit, Execution, JobBudget, JobOutput, JobSpec, Outcome, Program,
    StreamKind,
};

/// Pipes start at the kernel default (64 KiB); one that fills up is grown to this so bulk
/// output moves in large reads, while quiet jobs keep small pipes (pipe memory is per-user
/// limited by `pipe-user-pages-soft`).
const BULK_PIPE_BYTES: i32 = 1 << 20;
const DEFAULT_PIPE_BYTES: usize = 64 * 1024;

/// Flags of the local backend (flattened into the service's `Config`).
#[derive(Debug, Clone, clap::Args)]
pub struct LocalArgs {
    /// Working directory of jobs whose request sets none (default: the service's own).
    #[arg(long, env = "DEFAULT_CWD")]
    pub default_cwd: Option<PathBuf>,

    /// Largest output chunk read from a process in one go, in bytes.
    #[arg(long, env = "OUTPUT_CHUNK_BYTES", default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u32).range(4096..=(2 << 20)))]
    pub output_chunk_bytes: u32,
}

/// A local-backend configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    #[error("--default-cwd {0} is not a directory")]
    DefaultCwd(PathBuf),
}

impl LocalArgs {
    /// Checks the flags against this host; only called when the local backend is selected.
    pub fn validate(&self) -> Result<(), LocalConfigError> {
        match &self.default_cwd {
            Some(cwd) if !cwd.is_dir() => Err(LocalConfigError::DefaultCwd(cwd.clone())),
            _ => Ok(()),
        }
    }
}

/// Settings of the local backend.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Working directory when a request names none.
    pub default_cwd: Option<PathBuf>,
    /// SIGTERM → SIGKILL delay, and how long leftovers may hold the pipes after the leader exits.
    pub grace: Duration,
    /// Largest chunk read at once.
    pub chunk_bytes: usize,
    /// Variables of the service's own environment that jobs never inherit: its secrets.
    pub withheld_env: Vec<String>,
}

/// Runs jobs as local process groups.
pub struct LocalBackend {
    config: LocalConfig,
}

impl LocalBackend {
    pub fn new(config: LocalConfig) -> Self {
        LocalBackend { config }
    }

    fn working_dir(&self, requested: Option<&str>) -> Result<Option<PathBuf>, BackendError> {
        let Some(dir) = requested
            .map(PathBuf::from)
            .or_else(|| self.config.default_cwd.clone())
        else {
            return Ok(None);
        };
        match std::fs::metadata(&dir) {
            Ok(meta) if meta.is_dir() => Ok(Some(dir)),
            Ok(_) => Err(BackendError::InvalidRequest(format!(
                "cwd {} is not a directory",
                dir.display()
            ))),
            Err(e) => Err(BackendError::InvalidRequest(format!(
                "cwd {} is not usable: {e}",
                dir.display()
            ))),
        }
    }
}

#[async_trait]
impl Backend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    /// TERM then KILL after a grace; then as long again for leftovers holding the pipes, and
    /// once more for their own TERM -> KILL.
    fn stop_time(&self) -> Duration {
        self.config.grace * 3
    }

    async fn start(&self, spec: &JobSpec) -> Result<Box<dyn Execution>, BackendError> {
        let cwd = self.working_dir(spec.cwd.as_deref())?;
        let mut cmd = match &spec.program {
            Program::Shell(line) => {
                let mut cmd = Command::new("/bin/sh");
                cmd.arg("-c").arg(line);
                cmd
            }
            Program::Argv(argv) => {
                let mut cmd = Command::new(&argv[0]);
                cmd.args(&argv[1..]);
                cmd
            }
        };
        for name in &self.config.withheld_env {
            cmd.env_remove(name);
        }
        cmd.envs(&spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            // Backstop only: the group is signalled explicitly, this reaches just the leader.
            .kill_on_drop(true);
        if let Some(dir) = &cwd {
            cmd.current_dir(dir);
        }

        let mut child = cmd.spawn().map_err(|source| BackendError::Spawn {
            program: spec.program.display_name().to_owned(),
            source,
        })?;
        let pid = child.id().expect("a just-spawned child has a pid");
        let (stdout, stderr) = match open_pipes(&mut child) {
            Ok(pipes) => pipes,
            Err(source) => {
                // Not expected; don't leave the process running when we cannot read it.
                terminate_group(pid, Duration::ZERO).await;
                let _ = child.wait().await;
                return Err(BackendError::Spawn {
                    program: spec.program.display_name().to_owned(),
                    source,
                });
            }
        };
        Ok(Box::new(LocalExecution {
            child,
            pid,
            stdout,
            stderr,
            grace: self.config.grace,
            chunk_bytes: self.config.chunk_bytes,
        }))
    }
}

fn open_pipes(child: &mut Child) -> io::Result<(pipe::Receiver, pipe::Receiver)> {
    let missing = || io::Error::other("child output pipe missing");
    let stdout = child.stdout.take().ok_or_else(missing)?.into_owned_fd()?;
    let stderr = child.stderr.take().ok_or_else(missing)?.into_owned_fd()?;
    Ok((
        pipe::Receiver::from_owned_fd(stdout)?,
        pipe::Receiver::from_owned_fd(stderr)?,
    ))
}

struct LocalExecution {
    child: Child,
    /// Leader pid, which is also the process group id.
    pid: u32,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
    grace: Duration,
    chunk_bytes: usize,
}

/// What to do when the timer fires after the leader exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterLeaderExit {
    /// Leftovers still hold the pipes: stop the group.
    StopLeftovers,
    /// Even SIGKILL did not close the pipes (a process escaped the group): stop reading.
    AbandonPipes,
}

#[async_trait]
impl Execution for LocalExecution {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    async fn run(self: Box<Self>, out: &mut JobOutput, stop: CancellationToken) -> Outcome {
        let LocalExecution {
            mut child,
            pid,
            stdout,
            stderr,
            grace,
            chunk_bytes,
        } = *self;

        // Signalling runs on its own task so a stop takes effect even while output waits for a
        // slow reader.
        let stop_leftovers = CancellationToken::new();
        let signaller = tokio::spawn({
            let stop = stop.clone();
            let stop_leftovers = stop_leftovers.clone();
            async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = stop_leftovers.cancelled() => {}
                }
                terminate_group(pid, grace).await;
            }
        });

        let mut stdout = Some(PipeReader::new(stdout, chunk_bytes, out.budget()));
        let mut stderr = Some(PipeReader::new(stderr, chunk_bytes, out.budget()));
        let mut status: Option<ExitStatus> = None;
        let mut wait_error: Option<String> = None;
        let timer = sleep(Duration::MAX / 4);
        tokio::pin!(timer);
        let mut next_step = Some(AfterLeaderExit::StopLeftovers);

        while status.is_none() || stdout.is_some() || stderr.is_some() {
            tokio::select! {
                chunk = read_next(stdout.as_mut()) => match chunk {
                    Some((data, credit)) => out.output_within(StreamKind::Stdout, data, credit).await,
                    None => stdout = None,
                },
                chunk = read_next(stderr.as_mut()) => match chunk {
                    Some((data, credit)) => out.output_within(StreamKind::Stderr, data, credit).await,
                    None => stderr = None,
                },
                exit = child.wait(), if status.is_none() => {
                    status = Some(match exit {
                        Ok(s) => s,
                        Err(e) => {
                            // Not expected; still wait for the pipes, then report the failure.
                            warn!(error = %e, "waiting for the job's process failed");
                            wait_error = Some(e.to_string());
                            ExitStatus::from_raw(0)
                        }
                    });
                    timer.as_mut().reset(Instant::now() + grace);
                }
                _ = &mut timer, if status.is_some() && next_step.is_some() => {
                    match next_step.take() {
                        Some(AfterLeaderExit::StopLeftovers) => {
                            debug!(pid, "processes left by the job still hold its output; stopping them");
                            stop_leftovers.cancel();
                            // terminate_group takes at most `grace`; then allow as much again.
                            timer.as_mut().reset(Instant::now() + grace * 2 + Duration::from_secs(1));
                            next_step = Some(AfterLeaderExit::AbandonPipes);
                        }
                        Some(AfterLeaderExit::AbandonPipes) => {
                            warn!(pid, "job output still open after SIGKILL of its group \
                                  (a process left the group); no longer reading it");
                            stdout = None;
                            stderr = None;
                        }
                        None => {}
                    }
                }
            }
        }

        // The pipes are closed but daemonised leftovers may live on: the job owns them.
        if group_alive(pid).await {
            debug!(pid, "stopping processes left in the job's group");
            terminate_group(pid, grace).await;
        }
        signaller.abort();

        if let Some(error) = wait_error {
            return Outcome::Failed(format!("lost the job's process: {error}"));
        }
        let status = status.expect("loop ends only after the leader exited");
        Outcome::Exited {
            code: status.code(),
            signal: status.signal(),
        }
    }
}

/// Reads a pipe in large chunks without holding a buffer while the pipe is idle, and only
/// within the credit the output budget gives: without credit the pipe is left full and the
/// process blocks.
struct PipeReader {
    pipe: pipe::Receiver,
    chunk_bytes: usize,
    budget: JobBudget,
    grown: bool,
}

impl PipeReader {
    fn new(pipe: pipe::Receiver, chunk_bytes: usize, budget: JobBudget) -> Self {
        PipeReader {
            pipe,
            chunk_bytes,
            budget,
            grown: false,
        }
    }

    /// The next chunk with the credit that covers it, or `None` at end of stream.
    async fn next(&mut self) -> Option<(Bytes, Credit)> {
        loop {
            if let Err(e) = self.pipe.readable().await {
                warn!(error = %e, "polling a job's output pipe failed; treating it as closed");
                return None;
            }
            // Credit and buffer are taken only once data is ready, so idle jobs hold neither.
            let mut credit = self.budget.acquire(self.chunk_bytes).await;
            let mut buf = BytesMut::with_capacity(credit.bytes());
            match self.pipe.try_read_buf(&mut buf) {
                Ok(0) => return None,
                Ok(n) => {
                    if !self.grown && n >= DEFAULT_PIPE_BYTES {
                        self.grow_pipe();
                    }
                    // Small reads are copied out so the large buffer is freed at once, and the
                    // credit shrinks to what is kept.
                    return Some(if n < buf.capacity() / 4 {
                        credit.shrink_to(n);
                        (Bytes::copy_from_slice(&buf), credit)
                    } else {
                        (buf.freeze(), credit)
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(error = %e, "reading a job's output failed; treating it as closed");
                    return None;
                }
            }
        }
    }

    fn grow_pipe(&mut self) {
        self.grown = true;
        let size = BULK_PIPE_BYTES.min(self.chunk_bytes as i32);
        if let Err(e) = nix::fcntl::fcntl(&self.pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(size)) {
            // EPERM past the per-user pipe budget: keep the small pipe, it only costs speed.
            debug!(error = %e, "could not grow a job's output pipe");
        }
    }
}

async fn read_next(reader: Option<&mut PipeReader>) -> Option<(Bytes, Credit)> {
    match reader {
        Some(reader) => reader.next().await,
        None => std::future::pending().await,
    }
}

/// Whether any process of the group still runs. Zombies do not count: once a job's leader
/// dies, its orphans are reaped by init, which may take a while (and a zombie holds no pipe).
async fn group_alive(pgid: u32) -> bool {
    // Signal 0 checks for existence cheaply; EPERM would mean someone else's process, not ours.
    if killpg(Pid::from_raw(pgid as i32), None).is_err() {
        return false;
    }
    // Reading /proc blocks; keep it off the async workers.
    tokio::task::spawn_blocking(move || has_live_member(pgid))
        .await
        .unwrap_or(true)
}

fn has_live_member(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true; // cannot tell zombies apart; assume alive
    };
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            return false;
        };
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .is_some_and(|stat| is_live_member(&stat, pgid))
    })
}

/// Parses `/proc/<pid>/stat`: fields after the parenthesised command are state, ppid, pgrp.
fn is_live_member(stat: &str, pgid: u32) -> bool {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let mut fields = rest.split_whitespace();
    let state = fields.next();
    let pgrp = fields.nth(1).and_then(|g| g.parse::<u32>().ok());
    pgrp == Some(pgid) && state != Some("Z") && state != Some("X")
}

/// SIGTERM to the whole group, up to `grace` for it to empty, then SIGKILL.
pub(crate) async fn terminate_group(pgid: u32, grace: Duration) {
    let group = Pid::from_raw(pgid as i32);
    match killpg(group, Signal::SIGTERM) {
        Ok(()) => {}
        Err(Errno::ESRCH) => return,
        Err(e) => warn!(pgid, error = %e, "SIGTERM to the job's process group failed"),
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !group_alive(pgid).await {
            return;
        }
        sleep_until((Instant::now() + Duration::from_millis(20)).min(deadline)).await;
    }
    match killpg(group, Signal::SIGKILL) {
        Ok(()) => debug!(
            pgid,
            "process group did not stop within the grace; sent SIGKILL"
        ),
        Err(Errno::ESRCH) => {}
        Err(e) => warn!(pgid, error = %e, "SIGKILL to the job's process group failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zombies_are_not_live_group_members() {
        let stat = |state: &str| format!("123 (sleep (x) 1) {state} 1 4242 4242 0 -1 4194560");
        assert!(is_live_member(&stat("S"), 4242));
        assert!(!is_live_member(&stat("Z"), 4242));
        assert!(!is_live_member(&stat("S"), 4243));
        assert!(!is_live_member("garbage", 4242));
    }

    #[test]
    fn cwd_must_be_an_existing_directory() {
        let backend = LocalBackend::new(LocalConfig {
            default_cwd: None,
            grace: Duration::from_secs(1),
            chunk_bytes: 1 << 16,
            withheld_env: Vec::new(),
        });
        assert!(backend.working_dir(Some("/")).is_ok());
        let err = backend.working_dir(Some("/etc/hostname")).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        let err = backend.working_dir(Some("/no/such/dir")).unwrap_err();
        assert!(err.to_string().contains("not usable"), "{err}");
        assert_eq!(backend.working_dir(None).unwrap(), None);
    }
}
