//! The embedded default backend: each job is a process on this host, leader of its own session
//! and process group (and, where the host allows, of its own cgroup), with stdin closed and
//! stdout/stderr piped, optionally under another user (`--job-user`).
//!
//! Stopping a job signals every process of it, wherever it moved (see `tree.rs`): SIGTERM, then
//! SIGKILL after the grace period. When the leader exits, processes it left get the same grace to
//! finish writing, then the same treatment, so a backgrounded child holding the pipes cannot
//! keep a job open forever, and a job ends only once nothing of it is left.
//!
//! - `spawn.rs`: what the job's first process does before exec (the crate's one unsafe block).
//! - `tree.rs`: a job's processes (cgroup or /proc), the server's orphans, reaping.
//! - `cgroup.rs`: per-job cgroups. `identity.rs`: `--job-user`. `procfs.rs`: /proc parsing.

mod cgroup;
mod identity;
mod procfs;
mod spawn;
mod tree;

use std::{
    io,
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::{ExitStatus, Stdio},
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::{
    net::unix::pipe,
    process::{Child, Command},
    time::{Instant, sleep},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use self::identity::JobIdentity;
use self::{
    cgroup::CgroupRoot,
    spawn::{ChildSetup, setup_child},
    tree::{JobTree, Leader, Processes},
};
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

    /// Run jobs as this user (name or numeric uid), so that they cannot signal the server, nor
    /// read its /proc entries or its files. Needs root, or CAP_SETUID, CAP_SETGID and CAP_KILL;
    /// the server refuses to start without them. Unset: jobs run as the server's own user.
    #[arg(long, env = "JOB_USER")]
    pub job_user: Option<String>,

    /// Group of the jobs (name or numeric gid) [default: the job user's primary group]. Jobs
    /// have no supplementary groups.
    #[arg(long, env = "JOB_GROUP")]
    pub job_group: Option<String>,

    /// Per-job cgroups: `auto` gives each job a cgroup v2 of its own where this process's
    /// cgroup is writable (the strongest hold on its processes), `off` follows jobs through
    /// /proc only.
    #[arg(long, env = "JOB_CGROUPS", value_enum, default_value_t = JobCgroups::Auto)]
    pub job_cgroups: JobCgroups,

    /// Not a flag: set by the binary once it made itself a child subreaper, which it is the only
    /// spawner in (so every child that is not a job leader is a job's orphan).
    #[arg(skip)]
    pub subreaper: bool,
}

/// Whether jobs get cgroups of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JobCgroups {
    /// Where this process's cgroup v2 is writable.
    Auto,
    /// Never; jobs are followed through /proc.
    Off,
}

/// A local-backend configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    #[error("--default-cwd {0} is not a directory")]
    DefaultCwd(PathBuf),
    #[error("--job-group needs --job-user")]
    GroupWithoutUser,
    #[error("--job-user {0}: no such user")]
    UnknownUser(String),
    #[error("--job-group {0}: no such group")]
    UnknownGroup(String),
    #[error("cannot look up {0} in the user database: {1}")]
    UserLookup(String, String),
    #[error(
        "--job-user {0} is not in the user database, so it has no primary group: set --job-group"
    )]
    UserWithoutGroup(u32),
    #[error("--job-user must not be root: jobs would hold every privilege")]
    RootJobUser,
    #[error(
        "--job-user is the server's own user (uid {0}): jobs could signal it and read its files; \
         use a dedicated user"
    )]
    SameUser(u32),
    #[error(
        "cannot run jobs as --job-user {user}: the server lacks {missing} (run it as root, or \
         grant it CAP_SETUID, CAP_SETGID and CAP_KILL)"
    )]
    CannotSwitch { user: String, missing: String },
    #[error("cannot read this process's capabilities from /proc/self/status")]
    UnknownCapabilities,
    #[error(
        "jobs' working directory {dir} is not usable by --job-user {user}: {reason} (set \
         --default-cwd to a directory it can use)"
    )]
    DirNotUsable {
        dir: PathBuf,
        user: String,
        reason: String,
    },
}

impl LocalArgs {
    /// Checks the flags against this host; only called when the local backend is selected.
    pub fn validate(&self) -> Result<(), LocalConfigError> {
        if let Some(cwd) = &self.default_cwd
            && !cwd.is_dir()
        {
            return Err(LocalConfigError::DefaultCwd(cwd.clone()));
        }
        if let Some(identity) = self.job_identity()? {
            identity::check_can_switch(&identity)?;
            // Jobs start in --default-cwd, or else in the server's own working directory.
            let cwd = match &self.default_cwd {
                Some(cwd) => cwd.clone(),
                None => std::env::current_dir().map_err(|e| LocalConfigError::DirNotUsable {
                    dir: PathBuf::from("."),
                    user: identity.describe(),
                    reason: e.to_string(),
                })?,
            };
            identity::check_usable_dir(&cwd, &identity)?;
        }
        Ok(())
    }

    /// Who jobs run as: `None` for the server's own user.
    pub fn job_identity(&self) -> Result<Option<JobIdentity>, LocalConfigError> {
        match (&self.job_user, &self.job_group) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(LocalConfigError::GroupWithoutUser),
            (Some(user), group) => identity::resolve(user, group.as_deref()).map(Some),
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
    /// Who jobs run as (`None`: the server's user).
    pub identity: Option<JobIdentity>,
    /// Whether jobs get cgroups of their own.
    pub cgroups: JobCgroups,
    /// This process is a child subreaper that starts no children but jobs (see `LocalArgs`).
    pub subreaper: bool,
}

/// Runs jobs as local processes.
pub struct LocalBackend {
    config: LocalConfig,
    processes: Arc<Processes>,
    /// Whether moving a job into its cgroup failed before (warned once, then debug).
    cgroup_failed: AtomicBool,
}

impl LocalBackend {
    pub fn new(config: LocalConfig) -> Self {
        let cgroups = match config.cgroups {
            JobCgroups::Off => None,
            JobCgroups::Auto => match CgroupRoot::open() {
                Ok(root) => {
                    info!(cgroup = %root.dir().display(), "jobs run in cgroups of their own");
                    Some(root)
                }
                Err(reason) => {
                    info!(
                        %reason,
                        "no per-job cgroups; jobs' processes are followed through /proc"
                    );
                    None
                }
            },
        };
        match &config.identity {
            Some(identity) => info!(user = %identity.describe(), "jobs run as the job user"),
            None => warn!(
                "--job-user is unset: jobs run as the server's own user, so a job can signal \
                 the server (and every other job) and read its files; set --job-user"
            ),
        }
        LocalBackend {
            processes: Processes::new(config.subreaper, cgroups),
            config,
            cgroup_failed: AtomicBool::new(false),
        }
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
        let spawn_error = |source| BackendError::Spawn {
            program: spec.program.display_name().to_owned(),
            source,
        };
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
        if let Some(identity) = &self.config.identity {
            // std clears the supplementary groups when it changes the uid (it has CAP_SETGID).
            cmd.uid(identity.uid).gid(identity.gid);
            // The job user's own, not the server's (requests may still set them).
            if let Some(name) = &identity.name {
                cmd.env("USER", name).env("LOGNAME", name);
            }
            if let Some(home) = &identity.home {
                cmd.env("HOME", home);
            }
        }
        cmd.envs(&spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Backstop only: the job's processes are stopped explicitly, this reaches the leader.
            .kill_on_drop(true);
        if let Some(dir) = &cwd {
            cmd.current_dir(dir);
        }
        let cgroup = self.job_cgroup();
        let cgroup_procs = match &cgroup {
            Some(cgroup) => Some(cgroup.procs_file().try_clone().map_err(spawn_error)?),
            None => None,
        };
        setup_child(
            &mut cmd,
            ChildSetup {
                server_pid: std::process::id(),
                cgroup_procs,
                drop_privileges: self.config.identity.is_some(),
            },
        );

        let (mut child, leader) = self.processes.spawn_leader(&mut cmd).map_err(spawn_error)?;
        drop(cmd);
        let pid = leader.pid();
        let tree = Arc::new(self.processes.tree(pid, cgroup));
        let (stdout, stderr) = match open_pipes(&mut child) {
            Ok(pipes) => pipes,
            Err(source) => {
                // Not expected; don't leave the process running when we cannot read it.
                tree.terminate(Duration::ZERO).await;
                let _ = child.wait().await;
                return Err(spawn_error(source));
            }
        };
        Ok(Box::new(LocalExecution {
            child,
            pid,
            leader,
            tree,
            stdout,
            stderr,
            grace: self.config.grace,
            chunk_bytes: self.config.chunk_bytes,
        }))
    }
}

impl LocalBackend {
    /// A fresh cgroup for a job, when jobs get them and one can be made.
    fn job_cgroup(&self) -> Option<cgroup::JobCgroup> {
        let root = self.processes.cgroups()?;
        match root.create_job() {
            Ok(cgroup) => Some(cgroup),
            Err(e) => {
                if !self
                    .cgroup_failed
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    warn!(error = %e, "cannot create a job's cgroup; following it through /proc");
                }
                None
            }
        }
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
    /// Leader pid, which is also the session and process group id.
    pid: u32,
    /// Keeps the reaper off the leader until tokio has waited for it.
    leader: Leader,
    /// Every process of the job.
    tree: Arc<JobTree>,
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

    /// Local jobs die with this process by design: `leave` does not apply (no handle).
    async fn run(
        self: Box<Self>,
        out: &mut JobOutput,
        stop: CancellationToken,
        _leave: CancellationToken,
    ) -> Outcome {
        let LocalExecution {
            mut child,
            pid,
            leader,
            tree,
            stdout,
            stderr,
            grace,
            chunk_bytes,
        } = *self;
        let mut leader = Some(leader);

        // Signalling runs on its own task so a stop takes effect even while output waits for a
        // slow reader.
        let stop_leftovers = CancellationToken::new();
        let signaller = tokio::spawn({
            let stop = stop.clone();
            let stop_leftovers = stop_leftovers.clone();
            let tree = Arc::clone(&tree);
            async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = stop_leftovers.cancelled() => {}
                }
                tree.terminate(grace).await;
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
                    // Waited for (reaped): the reaper may now take its pid for an orphan's.
                    leader.take();
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
                            // Stopping takes `grace` and a moment after SIGKILL; allow as much again.
                            timer.as_mut().reset(Instant::now() + grace * 2 + Duration::from_secs(1));
                            next_step = Some(AfterLeaderExit::AbandonPipes);
                        }
                        Some(AfterLeaderExit::AbandonPipes) => {
                            warn!(pid, "job output still open after SIGKILL of the job's processes \
                                  (a process outside the job holds it); no longer reading it");
                            stdout = None;
                            stderr = None;
                        }
                        None => {}
                    }
                }
            }
        }

        // The pipes are closed but daemonised leftovers may live on, wherever they moved: the job
        // owns them, and it ends once they are gone.
        if tree.alive().await {
            debug!(pid, "stopping processes the job left behind");
            tree.terminate(grace).await;
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
            let mut buf = BytesMut::with_capacity(credit.allowance());
            match self.pipe.try_read_buf(&mut buf) {
                Ok(0) => return None,
                Ok(n) => {
                    // Grown only when the pipe, not the budget, was what limited this read: a
                    // full pipe read with credit to spare. A job whose caller does not read
                    // soon runs on its reserve alone and keeps its small pipe, so grown pipes
                    // (kernel memory outside the budget, charged to the pod) are bounded by the
                    // jobs the budget can feed at full speed, not by every stalled job.
                    if !self.grown && n >= DEFAULT_PIPE_BYTES && credit.allowance() > n {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cwd_must_be_an_existing_directory() {
        let backend = LocalBackend::new(LocalConfig {
            default_cwd: None,
            grace: Duration::from_secs(1),
            chunk_bytes: 1 << 16,
            withheld_env: Vec::new(),
            identity: None,
            cgroups: JobCgroups::Off,
            subreaper: false,
        });
        assert!(backend.working_dir(Some("/")).is_ok());
        let err = backend.working_dir(Some("/etc/hostname")).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        let err = backend.working_dir(Some("/no/such/dir")).unwrap_err();
        assert!(err.to_string().contains("not usable"), "{err}");
        assert_eq!(backend.working_dir(None).unwrap(), None);
    }
}
