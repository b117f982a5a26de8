//! Per-job cgroups (cgroup v2), the strongest hold on a job's processes: every process a job
//! starts is born in the job's cgroup and cannot leave it without write access to the cgroup
//! file system, so the cgroup lists them all, tells when the last one is gone
//! (`cgroup.events`), and `cgroup.kill` (Linux 5.14) kills them all at once, forks in flight
//! included.
//!
//! Layout: under this process's own cgroup, `sandbox-runner-<pid>/job-<n>`. A server that was
//! SIGKILLed leaves its directory behind with whatever escaped its jobs' parent-death signal;
//! the next server in the same cgroup kills those and removes the directories.

use std::{
    fs::File,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tracing::{debug, info, warn};

use super::procfs;

/// Prefix of the per-process directories.
const SERVER_DIR_PREFIX: &str = "sandbox-runner-";

/// Job directories are numbered process-wide: several backends of one process (tests) share
/// the process's directory.
static NEXT_JOB: AtomicU64 = AtomicU64::new(1);

/// This process's directory of job cgroups.
#[derive(Debug)]
pub(super) struct CgroupRoot {
    /// `<own cgroup dir>/sandbox-runner-<pid>`.
    dir: PathBuf,
    /// The same as a cgroup path (as `/proc/<pid>/cgroup` shows it), to recognise members.
    path: String,
    /// Whether `cgroup.kill` exists (Linux 5.14+); otherwise processes are killed one by one.
    has_kill: bool,
}

impl CgroupRoot {
    /// Finds this process's cgroup v2 and makes the job directory in it. Fails (with the reason)
    /// where there is no cgroup v2 or it is not writable: the caller falls back to tracking
    /// processes through /proc. Also clears what dead servers left in the same cgroup.
    pub fn open() -> Result<CgroupRoot, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let own = procfs::cgroup_v2_path(&own)
            .ok_or("this process is in no cgroup v2 (a cgroup v1 host?)")?
            .to_owned();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let own_dir = procfs::cgroup_v2_dir(&mountinfo, &own)
            .ok_or_else(|| format!("cgroup {own} is not under a mounted cgroup2 file system"))?;
        clear_dead_servers(&own_dir);
        let name = format!("{SERVER_DIR_PREFIX}{}", std::process::id());
        let dir = own_dir.join(&name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            // Another backend of this process made it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
        }
        let has_kill = dir.join("cgroup.kill").exists();
        Ok(CgroupRoot {
            path: format!("{}/{name}", own.trim_end_matches('/')),
            dir,
            has_kill,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new, empty cgroup for one job.
    pub fn create_job(&self) -> io::Result<JobCgroup> {
        let name = format!("job-{}", NEXT_JOB.fetch_add(1, Ordering::Relaxed));
        let dir = self.dir.join(&name);
        std::fs::create_dir(&dir)?;
        let procs = match File::options().write(true).open(dir.join("cgroup.procs")) {
            Ok(procs) => procs,
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
        };
        Ok(JobCgroup {
            path: format!("{}/{name}", self.path),
            dir,
            procs,
            has_kill: self.has_kill,
        })
    }

    /// Whether a `/proc/<pid>/cgroup` text puts the process in one of this process's job
    /// cgroups.
    pub fn holds(&self, proc_cgroup: &str) -> bool {
        procfs::cgroup_v2_path(proc_cgroup)
            .and_then(|path| path.strip_prefix(self.path.as_str()))
            .is_some_and(|rest| rest.starts_with('/'))
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        // Fails while another backend of this process still has jobs: it is then left for the
        // next server to clear.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// One job's cgroup. Dropping it kills what is left in it and removes it.
#[derive(Debug)]
pub(super) struct JobCgroup {
    dir: PathBuf,
    path: String,
    /// `cgroup.procs`, opened by the server (close-on-exec): the job's first process writes
    /// itself into it before it execs, so nothing it starts is born outside.
    procs: File,
    has_kill: bool,
}

impl JobCgroup {
    /// The open `cgroup.procs` of this cgroup.
    pub fn procs_file(&self) -> &File {
        &self.procs
    }

    /// Moves `pid` into the cgroup from outside (for a child that could not join by itself).
    pub fn add(&self, pid: u32) -> io::Result<()> {
        (&self.procs).write_all(pid.to_string().as_bytes())
    }

    /// Whether process `pid` is in this cgroup.
    pub fn contains(&self, pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .ok()
            .is_some_and(|text| procfs::cgroup_v2_path(&text) == Some(self.path.as_str()))
    }

    /// Whether any live process is in the cgroup (zombies are not: they leave at exit).
    pub fn populated(&self) -> bool {
        populated(&self.dir)
    }

    /// Sends `signal` to every process in the cgroup.
    pub fn signal(&self, signal: Signal) {
        for pid in pids(&self.dir) {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
    }

    /// SIGKILL to every process in the cgroup, atomically where the kernel has `cgroup.kill`.
    pub fn kill_all(&self) {
        if !self.has_kill || std::fs::write(self.dir.join("cgroup.kill"), b"1").is_err() {
            self.signal(Signal::SIGKILL);
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        if self.populated() {
            // Only when the job ended without its leftovers being stopped (not expected).
            warn!(cgroup = %self.dir.display(), "a job's cgroup still has processes; killing them");
            self.kill_all();
            wait_empty(&self.dir, Duration::from_secs(1));
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            debug!(cgroup = %self.dir.display(), error = %e, "cannot remove a job's cgroup");
        }
    }
}

fn populated(dir: &Path) -> bool {
    match std::fs::read_to_string(dir.join("cgroup.events")) {
        Ok(events) => events.lines().any(|line| line == "populated 1"),
        // Gone, or unreadable: then cgroup.procs tells.
        Err(_) => !pids(dir).is_empty(),
    }
}

fn pids(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.parse().ok()).collect())
        .unwrap_or_default()
}

/// Blocks until the cgroup is empty or `limit` passed; whether it is empty.
fn wait_empty(dir: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !populated(dir) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills and removes the job cgroups of servers that are gone (SIGKILLed, crashed): their
/// parent-death signal reached their jobs' main processes, not what escaped from them.
fn clear_dead_servers(own_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(own_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SERVER_DIR_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let server_dir = entry.path();
        let mut killed = 0;
        for job in std::fs::read_dir(&server_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            if !job.path().is_dir() {
                continue;
            }
            let dir = job.path();
            killed += pids(&dir).len();
            if std::fs::write(dir.join("cgroup.kill"), b"1").is_err() {
                for pid in pids(&dir) {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
            }
            wait_empty(&dir, Duration::from_secs(2));
            let _ = std::fs::remove_dir(&dir);
        }
        match std::fs::remove_dir(&server_dir) {
            Ok(()) => info!(
                cgroup = %server_dir.display(),
                killed, "cleared the job cgroups of a server that is gone"
            ),
            Err(e) => warn!(
                cgroup = %server_dir.display(),
                killed, error = %e, "cannot clear the job cgroups of a server that is gone"
            ),
        }
    }
}
