//! The embedded default backend: each job is a process on this host, leader of its own session
//! and process group (and, where the host allows, of its own cgroup), with stdin closed (or a
//! pipe clients write to) and stdout/stderr piped, or all three on a terminal of its own
//! (`tty` jobs), optionally under another user (`--job-user`).
//!
//! Stopping a job signals every process of it, wherever it moved (see `tree.rs`): SIGTERM, then
//! SIGKILL after the grace period. When the leader exits, processes it left get the same grace to
//! finish writing, then the same treatment, so a backgrounded child holding the pipes cannot
//! keep a job open forever, and a job ends only once nothing of it is left.
//!
//! - `spawn.rs`: how the job's first process is made, a vfork-style clone and exec (the crate's
//!   one unsafe code).
//! - `leader.rs`: waiting for the job's first process, and killing it if the job is dropped.
//! - `tree.rs`: a job's processes (cgroup or /proc), the server's orphans, reaping.
//! - `terminal.rs`: a `tty` job's terminal (output, input, resize, its foreground group).
//! - `cgroup.rs`: per-job cgroups. `identity.rs`: `--job-user`. `procfs.rs`: /proc parsing.

mod cgroup;
mod identity;
mod leader;
mod procfs;
mod spawn;
mod spawner;
mod terminal;
mod tree;

use std::{
    collections::BTreeMap,
    ffi::OsString,
    io,
    os::unix::process::ExitStatusExt,
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::{
    net::unix::pipe,
    time::{Instant, sleep},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use self::identity::JobIdentity;
pub use self::spawn::JobPriority;
pub use self::terminal::{open_pty, winsize};
use self::{
    cgroup::CgroupRoot,
    leader::LeaderProcess,
    spawn::{JobCommand, JobSetup, SpawnedStdio},
    terminal::{Terminal, TerminalControl, TerminalInput},
    tree::{JobTree, Processes},
};
use crate::job::{
    Backend, BackendError, Capabilities, Credit, Execution, InputSink, JobBudget, JobOutput,
    JobSignal, JobSignaller, JobSpec, JobTerminal, Outcome, Program, SignalRefused, StreamKind,
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

    /// Largest output chunk read from a process in one go, in bytes. Every stream that ever
    /// sent a chunk keeps a transport buffer that large for its life (tonic's encode buffer
    /// keeps its capacity): 256 KiB chunks move bulk output as fast as 1 MiB ones (1.06x and
    /// 0.98x) at a quarter of that cost per stream.
    #[arg(long, env = "OUTPUT_CHUNK_BYTES", default_value_t = 256 << 10,
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

    /// Nice value of jobs (0 to 19; the server's is 0). Above 0, under CPU contention the
    /// server's own work (Health, streaming output, starting jobs) goes first, and jobs still
    /// get every cycle it does not use; but a job that writes output flat out is slowed when
    /// the cores are all busy (BENCHMARKS.md, Load). Where the kernel schedules each session as
    /// a group (autogroup) the job's session gets the same value. 0: jobs compete with the
    /// server as equals.
    #[arg(long, env = "JOB_NICE", default_value_t = 0,
          value_parser = clap::value_parser!(u8).range(0..=19))]
    pub job_nice: u8,

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
    /// Jobs that may run at once, by the descriptors they hold (`None`: no bound here). A job
    /// beyond waits for one to end before it is spawned, rather than failing for lack of
    /// descriptors.
    pub max_running: Option<usize>,
    /// How jobs yield the CPU to the server.
    pub priority: JobPriority,
}

/// Runs jobs as local processes.
pub struct LocalBackend {
    config: LocalConfig,
    processes: Arc<Processes>,
    /// Whether moving a job into its cgroup failed before (warned once, then debug).
    cgroup_failed: AtomicBool,
    /// `LocalConfig::max_running`: a permit per running job.
    running: Option<Arc<tokio::sync::Semaphore>>,
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
        if let Err(e) = spawn::reserve_stdio_slots() {
            // Reserved at the first spawn instead (and that spawn fails if it cannot).
            warn!(error = %e, "could not reserve descriptors for spawning jobs yet");
        }
        LocalBackend {
            processes: Processes::new(config.subreaper, cgroups),
            running: config
                .max_running
                .map(|slots| Arc::new(tokio::sync::Semaphore::new(slots.max(1)))),
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

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            stdin: true,
            stdin_eof: true,
            tty: true,
            resize: true,
            signals: true,
        }
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
        // Held until the job's descriptors are closed (with its execution).
        let running = match &self.running {
            Some(slots) => Some(
                Arc::clone(slots)
                    .acquire_owned()
                    .await
                    .expect("never closed"),
            ),
            None => None,
        };
        // Nothing is prepared before the job's turn at the spawner (see `spawner::QUEUE`).
        let turn = spawner::Turn::wait().await.map_err(spawn_error)?;
        let mut env = self.job_env(&spec.env);
        if let Some(tty) = &spec.tty {
            env.insert("TERM".into(), tty.term.clone().into());
        }
        let (leader, spawned, cgroup) = self
            .spawn(turn, spec, cwd.as_deref(), env)
            .await
            .map_err(spawn_error)?;
        let pid = leader.pid();
        let mut process = LeaderProcess::new(leader);
        let tree = Arc::new(self.processes.tree(pid, cgroup));
        let stdio = match JobStdio::open(spawned.stdio) {
            Ok(stdio) => stdio,
            Err(source) => {
                // Not expected; don't leave the process running when we cannot read it.
                tree.terminate(Duration::ZERO).await;
                let _ = process.wait().await;
                return Err(spawn_error(source));
            }
        };
        let signaller = LocalSignaller {
            processes: Arc::clone(&self.processes),
            pid,
            terminal: stdio.terminal.clone(),
        };
        Ok(Box::new(LocalExecution {
            process,
            tree,
            signaller: Some(signaller),
            stdio,
            grace: self.config.grace,
            chunk_bytes: self.config.chunk_bytes,
            _running: running,
        }))
    }
}

impl LocalBackend {
    /// Makes the job's cgroup, then its first process on the job-spawner thread (see
    /// `spawner`), in `turn`.
    async fn spawn(
        &self,
        turn: spawner::Turn,
        spec: &JobSpec,
        cwd: Option<&Path>,
        env: BTreeMap<OsString, OsString>,
    ) -> io::Result<(tree::Leader, spawn::Spawned, Option<cgroup::JobCgroup>)> {
        let argv: Vec<OsString> = match &spec.program {
            Program::Shell(line) => vec!["/bin/sh".into(), "-c".into(), line.into()],
            Program::Argv(argv) => argv.iter().map(OsString::from).collect(),
        };
        let cgroup = self.job_cgroup();
        let cgroup_procs = match &cgroup {
            Some(cgroup) => Some(cgroup.procs_file().try_clone()?),
            None => None,
        };
        let command = JobCommand::new(JobSetup {
            argv,
            env,
            cwd,
            identity: self.config.identity.as_ref().map(|id| (id.uid, id.gid)),
            cgroup_procs,
            server_pid: std::process::id(),
            stdin: spec.stdin,
            tty: spec.tty.as_ref().map(|tty| tty.size),
            priority: self.config.priority,
        })?;
        self.processes.start_watcher();
        let processes = Arc::clone(&self.processes);
        let (leader, spawned) = turn
            .spawn(
                move || processes.spawn_registered(&command),
                // The caller left while its job was being spawned: nobody will run it. Killed and
                // reaped while still registered, so the reaper leaves it to this wait.
                |(leader, _spawned): (tree::Leader, spawn::Spawned)| {
                    let pid = nix::unistd::Pid::from_raw(leader.pid() as i32);
                    let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = nix::sys::wait::waitpid(pid, None);
                    drop(leader);
                },
            )
            .await?;
        Ok((leader, spawned, cgroup))
    }

    /// The job's environment: the server's, without the variables it withholds (its secrets),
    /// with the job user's USER, LOGNAME and HOME, then the request's variables over all.
    fn job_env(&self, requested: &BTreeMap<String, String>) -> BTreeMap<OsString, OsString> {
        let mut env: BTreeMap<OsString, OsString> = std::env::vars_os()
            .filter(|(name, _)| {
                !self
                    .config
                    .withheld_env
                    .iter()
                    .any(|w| name.as_os_str() == w.as_str())
            })
            .collect();
        if let Some(identity) = &self.config.identity {
            // The job user's own, not the server's (requests may still set them).
            if let Some(name) = &identity.name {
                env.insert("USER".into(), name.into());
                env.insert("LOGNAME".into(), name.into());
            }
            if let Some(home) = &identity.home {
                env.insert("HOME".into(), home.into());
            }
        }
        env.extend(
            requested
                .iter()
                .map(|(name, value)| (name.into(), value.into())),
        );
        env
    }

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

/// The server's ends of a job's stdio, registered with the runtime.
struct JobStdio {
    /// Until the core takes it.
    input: Option<Box<dyn InputSink>>,
    stdout: OutputSource,
    /// `None` on a terminal: everything arrives on stdout.
    stderr: Option<OutputSource>,
    terminal: Option<Arc<Terminal>>,
}

impl JobStdio {
    fn open(stdio: SpawnedStdio) -> io::Result<JobStdio> {
        Ok(match stdio {
            SpawnedStdio::Pipes {
                stdin,
                stdout,
                stderr,
            } => JobStdio {
                input: stdin
                    .map(pipe::Sender::from_owned_fd)
                    .transpose()?
                    .map(|pipe| Box::new(PipeInput { pipe, grown: false }) as Box<dyn InputSink>),
                stdout: OutputSource::Pipe(pipe::Receiver::from_owned_fd(stdout)?),
                stderr: Some(OutputSource::Pipe(pipe::Receiver::from_owned_fd(stderr)?)),
                terminal: None,
            },
            SpawnedStdio::Terminal { master } => {
                let terminal = Terminal::new(master)?;
                JobStdio {
                    input: Some(Box::new(TerminalInput(Arc::clone(&terminal)))),
                    stdout: OutputSource::Terminal(Arc::clone(&terminal)),
                    stderr: None,
                    terminal: Some(terminal),
                }
            }
        })
    }
}

/// Sends signals to a job's process group (the leader's pid: `setsid` at spawn) or, on a
/// terminal, to the terminal's foreground group (where Ctrl-C would go).
struct LocalSignaller {
    processes: Arc<Processes>,
    pid: u32,
    terminal: Option<Arc<Terminal>>,
}

impl JobSignaller for LocalSignaller {
    fn signal(&self, signal: JobSignal) -> Result<(), SignalRefused> {
        use nix::sys::signal::Signal;
        let signal = match signal {
            JobSignal::Hup => Signal::SIGHUP,
            JobSignal::Int => Signal::SIGINT,
            JobSignal::Quit => Signal::SIGQUIT,
            JobSignal::Kill => Signal::SIGKILL,
            JobSignal::Usr1 => Signal::SIGUSR1,
            JobSignal::Usr2 => Signal::SIGUSR2,
            JobSignal::Term => Signal::SIGTERM,
            JobSignal::Cont => Signal::SIGCONT,
            JobSignal::Stop => Signal::SIGSTOP,
            JobSignal::Winch => Signal::SIGWINCH,
        };
        let group = self
            .terminal
            .as_ref()
            .and_then(|terminal| terminal.foreground_group());
        self.processes
            .signal_group(self.pid, group.unwrap_or(self.pid), signal)
    }
}

/// A job's stdin: the write end of its pipe (non-blocking).
struct PipeInput {
    pipe: pipe::Sender,
    grown: bool,
}

#[async_trait]
impl InputSink for PipeInput {
    async fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        loop {
            self.pipe.writable().await?;
            match self.pipe.try_write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(written) => {
                    // A write larger than the pipe: bulk input, moved in larger steps (as
                    // output pipes are grown; see `OutputReader::grow_pipe`).
                    if !self.grown && written < data.len() && written >= DEFAULT_PIPE_BYTES {
                        self.grown = true;
                        grow_pipe(&self.pipe, BULK_PIPE_BYTES);
                    }
                    return Ok(written);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

struct LocalExecution {
    /// The leader, whose pid is also the session and process group id. Registered as a leader
    /// (kept from the orphan reaper) until reaped; killed if dropped before.
    process: LeaderProcess,
    /// Every process of the job.
    tree: Arc<JobTree>,
    /// Signals for the job's group, until the core takes them.
    signaller: Option<LocalSignaller>,
    stdio: JobStdio,
    grace: Duration,
    chunk_bytes: usize,
    /// This job's place among those running (see `LocalConfig::max_running`).
    _running: Option<tokio::sync::OwnedSemaphorePermit>,
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
        Some(self.process.pid())
    }

    fn take_signaller(&mut self) -> Option<Box<dyn JobSignaller>> {
        self.signaller
            .take()
            .map(|s| Box::new(s) as Box<dyn JobSignaller>)
    }

    fn take_input(&mut self) -> Option<Box<dyn InputSink>> {
        self.stdio.input.take()
    }

    fn take_terminal(&mut self) -> Option<Box<dyn JobTerminal>> {
        self.stdio
            .terminal
            .as_ref()
            .map(|terminal| Box::new(TerminalControl(Arc::clone(terminal))) as Box<dyn JobTerminal>)
    }

    /// Local jobs die with this process by design: `leave` does not apply (no handle).
    async fn run(
        self: Box<Self>,
        out: &mut JobOutput,
        stop: CancellationToken,
        _leave: CancellationToken,
    ) -> Outcome {
        let LocalExecution {
            mut process,
            tree,
            signaller: _,
            stdio,
            grace,
            chunk_bytes,
            // Held to the end of the job's run, its descriptors closed.
            _running: _running_slot,
        } = *self;
        let JobStdio { stdout, stderr, .. } = stdio;
        let pid = process.pid();

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

        let mut stdout = Some(OutputReader::new(stdout, chunk_bytes, out.budget()));
        let mut stderr = stderr.map(|stderr| OutputReader::new(stderr, chunk_bytes, out.budget()));
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
                exit = process.wait(), if status.is_none() => {
                    // Reaped and unregistered: the reaper may now take its pid for an orphan's.
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

/// Where a job's output is read from.
enum OutputSource {
    Pipe(pipe::Receiver),
    /// The job's terminal (all its output).
    Terminal(Arc<Terminal>),
}

impl OutputSource {
    async fn readable(&self) -> io::Result<()> {
        match self {
            OutputSource::Pipe(pipe) => pipe.readable().await,
            OutputSource::Terminal(terminal) => terminal.readable().await,
        }
    }

    /// Reads into the spare room of `buf` without waiting: `Ok(0)` at the end.
    fn try_read(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            OutputSource::Pipe(pipe) => pipe.try_read_buf(buf),
            OutputSource::Terminal(terminal) => terminal.try_read(buf),
        }
    }
}

/// Reads a job's output in large chunks without holding a buffer while the job is quiet, and
/// only within the credit the output budget gives: without credit the pipe (or terminal) is
/// left full and the process blocks.
struct OutputReader {
    source: OutputSource,
    chunk_bytes: usize,
    budget: JobBudget,
    grown: bool,
}

impl OutputReader {
    fn new(source: OutputSource, chunk_bytes: usize, budget: JobBudget) -> Self {
        OutputReader {
            source,
            chunk_bytes,
            budget,
            grown: false,
        }
    }

    /// The next chunk with the credit that covers it, or `None` at end of stream.
    async fn next(&mut self) -> Option<(Bytes, Credit)> {
        loop {
            if let Err(e) = self.source.readable().await {
                warn!(error = %e, "polling a job's output failed; treating it as closed");
                return None;
            }
            // Credit and buffer are taken only once data is ready, so idle jobs hold neither.
            let mut credit = self.budget.acquire(self.chunk_bytes).await;
            let mut buf = Vec::with_capacity(credit.allowance());
            match self.source.try_read(&mut buf) {
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
                        (Bytes::from(buf), credit)
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
        // A terminal's buffer is the kernel's own size.
        if let OutputSource::Pipe(pipe) = &self.source {
            grow_pipe(pipe, BULK_PIPE_BYTES.min(self.chunk_bytes as i32));
        }
    }
}

/// Grows a job's pipe to `size` bytes, for bulk data.
fn grow_pipe(pipe: &impl std::os::fd::AsFd, size: i32) {
    if let Err(e) = nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(size)) {
        // EPERM past the per-user pipe budget: keep the small pipe, it only costs speed.
        debug!(error = %e, "could not grow a job's pipe");
    }
}

async fn read_next(reader: Option<&mut OutputReader>) -> Option<(Bytes, Credit)> {
    match reader {
        Some(reader) => reader.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs::File,
        io::Read,
        os::fd::OwnedFd,
        os::unix::fs::PermissionsExt,
        path::{Path, PathBuf},
    };

    use super::*;
    use nix::libc;

    fn config() -> LocalConfig {
        crate::testing::local_config(false)
    }

    #[tokio::test]
    async fn jobs_beyond_max_running_wait_for_a_running_one_to_end() {
        let backend = LocalBackend::new(LocalConfig {
            max_running: Some(1),
            ..config()
        });
        let shell = |line: &str| JobSpec::new(Program::Shell(line.into()));
        let first = backend.start(&shell("sleep 30")).await.unwrap();
        let second_spec = shell("true");
        let second = backend.start(&second_spec);
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), &mut second)
                .await
                .is_err(),
            "a second job started while the only slot was taken"
        );
        // The first job's end (here: its execution dropped, which kills it) frees the slot.
        drop(first);
        tokio::time::timeout(Duration::from_secs(30), second)
            .await
            .expect("started once the slot was free")
            .unwrap();
    }

    #[test]
    fn cwd_must_be_an_existing_directory() {
        let backend = LocalBackend::new(config());
        assert!(backend.working_dir(Some("/")).is_ok());
        let err = backend.working_dir(Some("/etc/hostname")).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        let err = backend.working_dir(Some("/no/such/dir")).unwrap_err();
        assert!(err.to_string().contains("not usable"), "{err}");
        assert_eq!(backend.working_dir(None).unwrap(), None);
    }

    #[test]
    fn the_job_environment_is_the_servers_minus_secrets_plus_the_user_then_the_request() {
        let backend = LocalBackend::new(LocalConfig {
            withheld_env: vec!["PATH".into()],
            identity: Some(JobIdentity {
                uid: 65534,
                gid: 65534,
                name: Some("jobuser".into()),
                home: Some("/home/jobuser".into()),
            }),
            ..config()
        });
        let requested = BTreeMap::from([
            ("LOGNAME".to_owned(), "asked".to_owned()),
            ("EXTRA".to_owned(), "x=y".to_owned()),
        ]);
        let env = backend.job_env(&requested);
        let get = |name: &str| env.get(std::ffi::OsStr::new(name)).cloned();
        assert_eq!(get("PATH"), None, "withheld");
        assert_eq!(get("USER"), Some("jobuser".into()));
        assert_eq!(get("HOME"), Some("/home/jobuser".into()));
        assert_eq!(get("LOGNAME"), Some("asked".into()), "the request wins");
        assert_eq!(get("EXTRA"), Some("x=y".into()));
        // The rest of the server's environment is inherited.
        for (name, value) in std::env::vars_os() {
            if !["PATH", "USER", "HOME", "LOGNAME", "EXTRA"].contains(&name.to_str().unwrap_or(""))
            {
                assert_eq!(env.get(&name), Some(&value), "{name:?}");
            }
        }
    }

    /// A job of `argv` with this environment and working directory, as `start` prepares it.
    fn command(argv: &[&str], env: &[(&str, &str)], cwd: Option<&Path>) -> JobCommand {
        JobCommand::new(JobSetup {
            env: env
                .iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v)))
                .collect(),
            cwd,
            ..JobSetup::plain(argv)
        })
        .unwrap()
    }

    fn read_all(fd: OwnedFd) -> tokio::task::JoinHandle<String> {
        tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            File::from(fd).read_to_string(&mut text).unwrap();
            text
        })
    }

    /// Runs a job to its end: stdout, stderr, exit status.
    async fn run(command: &JobCommand) -> io::Result<(String, String, ExitStatus)> {
        let processes = Processes::new(false, None);
        let (leader, spawned) = processes.spawn_leader(command)?;
        let SpawnedStdio::Pipes { stdout, stderr, .. } = spawned.stdio else {
            unreachable!("spawned without a terminal");
        };
        let mut process = LeaderProcess::new(leader);
        let (stdout, stderr) = (read_all(stdout), read_all(stderr));
        let status = process.wait().await?;
        Ok((stdout.await.unwrap(), stderr.await.unwrap(), status))
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("local-{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_file(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Zombie children of this process whose name is `comm` (a child that failed before exec
    /// still has the name of the thread that spawned it).
    fn zombies_named(comm: &str) -> Vec<u32> {
        let me = std::process::id();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
            if &stat[open + 1..close] == comm && fields[0] == "Z" && fields[1] == me.to_string() {
                found.push(stat[..open].trim().parse().unwrap());
            }
        }
        found
    }

    #[test]
    fn failures_before_exec_are_errors_with_their_errno_and_leave_no_zombie() {
        const THREAD: &str = "spawnfail-test"; // under 16 bytes: a process name
        let dir = temp_dir("fail");
        let not_executable = dir.join("not-executable");
        write_file(&not_executable, "#!/bin/sh\necho no\n", 0o644);
        let not_executable = not_executable.to_str().unwrap().to_owned();
        let dir_path = dir.to_str().unwrap().to_owned();
        let errors = std::thread::Builder::new()
            .name(THREAD.into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let mut errors = Vec::new();
                    for command in [
                        command(&["/no/such/program"], &[], None),
                        command(
                            &["no-such-program-anywhere"],
                            &[("PATH", "/bin:/usr/bin")],
                            None,
                        ),
                        command(&[not_executable.as_str()], &[], None),
                        // Searched: not executable in the first directory, missing in the
                        // second: EACCES, as execvp reports.
                        command(
                            &["not-executable"],
                            &[("PATH", &format!("{dir_path}:/bin"))],
                            None,
                        ),
                        command(&["/bin/true"], &[], Some(Path::new("/no/such/dir"))),
                    ] {
                        errors.push(run(&command).await.unwrap_err());
                    }
                    errors
                })
            })
            .unwrap()
            .join()
            .unwrap();
        let codes: Vec<Option<i32>> = errors.iter().map(io::Error::raw_os_error).collect();
        let kinds: Vec<io::ErrorKind> = errors.iter().map(io::Error::kind).collect();
        use io::ErrorKind::{NotFound, PermissionDenied};
        assert_eq!(
            kinds,
            [
                NotFound,
                NotFound,
                PermissionDenied,
                PermissionDenied,
                NotFound
            ],
            "{errors:?}"
        );
        assert_eq!(
            codes[..4],
            [
                Some(libc::ENOENT),
                Some(libc::ENOENT),
                Some(libc::EACCES),
                Some(libc::EACCES)
            ]
        );
        assert!(
            errors[4]
                .to_string()
                .starts_with("changing to the working directory: No such file or directory"),
            "{}",
            errors[4]
        );
        // Each failed child was reaped by the spawn itself.
        assert_eq!(zombies_named(THREAD), Vec::<u32>::new());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn programs_are_found_in_the_jobs_path_and_scripts_without_a_shebang_run() {
        let dir = temp_dir("path");
        write_file(
            &dir.join("hello-vfork"),
            "#!/bin/sh\necho \"hello $1\"\n",
            0o755,
        );
        // Not executable here: skipped for the next directory's.
        let later = dir.join("later");
        std::fs::create_dir(&later).unwrap();
        write_file(&dir.join("twice"), "#!/bin/sh\necho first\n", 0o644);
        write_file(&later.join("twice"), "#!/bin/sh\necho second\n", 0o755);
        // No `#!`: execve says ENOEXEC, and execvp runs it with /bin/sh.
        write_file(&dir.join("plain"), "echo \"plain $1 $2\"\n", 0o755);
        let path = format!("/no/such/dir:{}:{}", dir.display(), later.display());
        for (argv, expected) in [
            (&["hello-vfork", "you"][..], "hello you\n"),
            (&["twice"][..], "second\n"),
            (&["plain", "a", "b c"][..], "plain a b c\n"),
        ] {
            let (stdout, stderr, status) =
                run(&command(argv, &[("PATH", &path)], None)).await.unwrap();
            assert_eq!(
                (stdout.as_str(), stderr.as_str()),
                (expected, ""),
                "{argv:?}"
            );
            assert!(status.success(), "{argv:?}");
        }
        // Without PATH in the job's environment, glibc's default /bin:/usr/bin.
        let (stdout, _, _) = run(&command(&["echo", "default"], &[], None))
            .await
            .unwrap();
        assert_eq!(stdout, "default\n");
        // A relative name with a '/' is relative to the job's working directory.
        let (stdout, _, _) = run(&command(&["./hello-vfork", "cwd"], &[], Some(&dir)))
            .await
            .unwrap();
        assert_eq!(stdout, "hello cwd\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn status_field(pid: u32, name: &str) -> String {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            .trim()
            .to_owned()
    }

    #[tokio::test]
    async fn jobs_lead_their_session_with_default_signals_and_only_stdio() {
        // The server side: SIGPIPE ignored (std does it), and a signal blocked in the spawning
        // thread; the job must have neither.
        assert_ne!(
            u64::from_str_radix(&status_field(std::process::id(), "SigIgn"), 16).unwrap()
                & (1 << (libc::SIGPIPE - 1)),
            0
        );
        let mut usr1 = nix::sys::signal::SigSet::empty();
        usr1.add(nix::sys::signal::Signal::SIGUSR1);
        nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_BLOCK,
            Some(&usr1),
            None,
        )
        .unwrap();
        let dir = temp_dir("cwd");
        let processes = Processes::new(false, None);
        let (leader, spawned) = processes
            .spawn_leader(&command(
                &["sleep", "30"],
                &[("PATH", "/bin:/usr/bin"), ("MARK", "vfork")],
                Some(&dir),
            ))
            .unwrap();
        nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
            Some(&usr1),
            None,
        )
        .unwrap();
        let pid = leader.pid();
        let mut process = LeaderProcess::new(leader);
        // The spawn returns once the child is in execve, which closes the close-on-exec
        // descriptors a moment later: wait for the program to be running.
        for _ in 0..500 {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
            if comm == "sleep\n" && status_field(pid, "State").starts_with('S') {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for field in ["SigBlk", "SigIgn", "SigCgt"] {
            assert_eq!(status_field(pid, field), "0000000000000000", "{field}");
        }
        let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        fds.sort();
        assert_eq!(fds, ["0", "1", "2"]);
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap(),
            Path::new("/dev/null")
        );
        let stat = crate::backend::local::procfs::read_stat(pid).unwrap();
        assert_eq!(
            (stat.session, stat.pgrp, stat.ppid),
            (pid, pid, std::process::id())
        );
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
            dir.canonicalize().unwrap()
        );
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert_eq!(environ, b"MARK=vfork\0PATH=/bin:/usr/bin\0");
        // The parent-death signal is armed.
        assert!(processes.is_leader(pid));

        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = process.wait().await.unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        assert!(!processes.is_leader(pid), "unregistered once reaped");
        drop(spawned);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn jobs_run_at_their_nice_value_and_so_does_their_session_group() {
        const CAP_SYS_ADMIN: u32 = 21;
        let report = |nice: u8| {
            JobCommand::new(JobSetup {
                priority: JobPriority::with_nice(nice),
                ..JobSetup::plain(&[
                    "/bin/sh",
                    "-c",
                    "cut -d' ' -f19 /proc/self/stat; cat /proc/self/autogroup",
                ])
            })
            .unwrap()
        };
        let session_groups = JobPriority::with_nice(10).session_groups;
        // Without CAP_SYS_ADMIN the kernel lets a session group's nice value change ten times a
        // second, machine-wide: another test's job may have just used the turn.
        let may_set_groups =
            procfs::own_effective_caps().is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0);
        for nice in [10, 19, 0] {
            let (stdout, stderr, status) = run(&report(nice)).await.unwrap();
            assert!(status.success(), "{stderr}");
            let mut lines = stdout.lines();
            assert_eq!(lines.next(), Some(nice.to_string().as_str()), "{stdout}");
            let group = lines.next().unwrap_or_default();
            if session_groups && may_set_groups {
                assert!(group.ends_with(&format!(" nice {nice}")), "{stdout}");
            }
        }
        // The server itself keeps its own.
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), 0);
    }

    #[tokio::test]
    async fn without_pidfds_exits_are_polled() {
        let processes = Processes::new(false, None);
        for (line, code, signal) in [("exit 3", Some(3), None), ("kill -9 $$", None, Some(9))] {
            let (leader, _pipes) = processes
                .spawn_leader(&command(&["/bin/sh", "-c", line], &[], None))
                .unwrap();
            let pid = leader.pid();
            let mut process = LeaderProcess::polling(leader);
            let status = tokio::time::timeout(Duration::from_secs(10), process.wait())
                .await
                .unwrap()
                .unwrap();
            assert_eq!((status.code(), status.signal()), (code, signal), "{line}");
            assert!(!processes.is_leader(pid));
            assert!(!Path::new(&format!("/proc/{pid}")).exists(), "reaped");
        }
    }

    #[tokio::test]
    async fn a_dropped_leader_is_killed_and_reaped() {
        let processes = Processes::new(false, None);
        let (leader, spawned) = processes
            .spawn_leader(&command(&["/bin/sleep", "300"], &[], None))
            .unwrap();
        let pid = leader.pid();
        drop(LeaderProcess::new(leader));
        for _ in 0..250 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                assert!(!processes.is_leader(pid));
                drop(spawned);
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "the leader {pid} is still there: {:?}",
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
        );
    }
}
