//! Every process a job started, wherever it moved, and the server's orphans.
//!
//! A job's processes are held one of two ways ([`JobTree`]):
//! - **Cgroup**: the job's own cgroup (see `cgroup.rs`), exact and atomic.
//! - **Tracked**: without a usable cgroup, the job is followed through /proc: its session and
//!   process group (the leader starts both), every descendant of those, and what was seen of it
//!   before. A process that left the session and whose parent exited before a scan saw it
//!   cannot be traced back; as the server is a child subreaper (the binary makes itself one),
//!   such a process becomes the server's child, and is given to the jobs that were running when
//!   it was found: to the job when only one was, otherwise it is stopped once all of them ended.
//!
//! The server's children that are not job leaders are orphans re-parented to it. They are
//! reaped by pid (`waitpid(pid)`, never `waitpid(-1)`, which would take the exit status of a
//! job leader from its `LeaderProcess`, which waits for it by its pid). A spawn holds a gate
//! until its leader is registered, and the reaper decides which children are orphans only
//! through that gate, so an orphan is never mistaken for a leader that has not been registered
//! yet. Leaders are unregistered under the same lock as they are reaped, so a leader's pid is
//! never registered for a process it no longer is. That lock is never held across a spawn: a
//! spawn waits for its child to exec, which under load takes milliseconds, and the runtime's
//! workers take the lock whenever a job ends.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, Once,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::{
        signal::{Signal, kill, killpg},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};
use tokio::{
    sync::{Notify, watch},
    time::{Instant, sleep, sleep_until},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::job::SignalRefused;

use super::{
    cgroup::{CgroupRoot, JobCgroup},
    procfs::{self, ProcKey, ProcStat},
    spawn::{JobCommand, Spawned},
};

/// How often /proc is scanned while jobs are tracked without cgroups: the sooner a process is
/// seen, the sooner its parentage is known.
const TRACK_INTERVAL: Duration = Duration::from_millis(250);
/// Backstop scan for orphans when no SIGCHLD came (signals coalesce, never get lost, but cheap).
const REAP_INTERVAL: Duration = Duration::from_secs(5);
/// Least time between two scans, however many jobs ask; longer when scans are slow (a host
/// with many processes), so that scanning takes at most a tenth of a core.
const MIN_SCAN_GAP: Duration = Duration::from_millis(50);
/// How often a stopping job is checked for survivors.
const POLL: Duration = Duration::from_millis(20);
/// After SIGKILL, how long processes get to be gone before the job ends anyway (only a process
/// stuck in uninterruptible sleep takes longer).
const KILL_WAIT: Duration = Duration::from_secs(2);

/// The server's processes: job leaders, tracked jobs, orphans. Shared by the backend and its
/// executions.
pub(super) struct Processes {
    me: u32,
    /// This process is a child subreaper and starts no children but jobs: every child that is
    /// not a job leader is an orphan of some job, to reap and to stop.
    subreaper: bool,
    cgroups: Option<CgroupRoot>,
    /// Pids of job leaders not yet waited for.
    leaders: Mutex<HashSet<u32>>,
    /// Held across a spawn and the leader's registration, and by the reaper while it tells
    /// orphans from leaders (on a blocking thread, never a worker).
    spawning: Mutex<()>,
    tracked: Mutex<Tracked>,
    /// The server's children when it started, which it did not start (e.g. left by a shell
    /// that exec'd it): reaped when they exit, never stopped.
    preexisting: HashSet<ProcKey>,
    scans_requested: AtomicU64,
    scans_done: watch::Sender<u64>,
    wake: Arc<Notify>,
    watcher: Once,
    stop_watcher: CancellationToken,
}

impl Processes {
    pub fn new(subreaper: bool, cgroups: Option<CgroupRoot>) -> Arc<Processes> {
        let me = std::process::id();
        let preexisting = if subreaper {
            procfs::processes()
                .iter()
                .filter(|p| p.ppid == me)
                .map(ProcStat::key)
                .collect()
        } else {
            HashSet::new()
        };
        Arc::new(Processes {
            me,
            subreaper,
            cgroups,
            leaders: Mutex::default(),
            spawning: Mutex::default(),
            tracked: Mutex::default(),
            preexisting,
            scans_requested: AtomicU64::new(0),
            scans_done: watch::Sender::new(0),
            wake: Arc::new(Notify::new()),
            watcher: Once::new(),
            stop_watcher: CancellationToken::new(),
        })
    }

    pub fn cgroups(&self) -> Option<&CgroupRoot> {
        self.cgroups.as_ref()
    }

    /// Whether `pid` is registered as a job leader (not yet reaped).
    #[cfg(test)]
    pub fn is_leader(&self, pid: u32) -> bool {
        let leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
        leaders.contains(&pid)
    }

    /// Spawns a job's leader and registers it, through the gate the reaper takes, so that the
    /// reaper never waits for it (its `LeaderProcess` does). A child that failed before exec was
    /// reaped by the spawn, through the same gate.
    #[cfg(test)]
    pub fn spawn_leader(
        self: &Arc<Self>,
        command: &JobCommand,
    ) -> std::io::Result<(Leader, Spawned)> {
        self.start_watcher();
        self.spawn_registered(command)
    }

    /// [`Processes::spawn_leader`] once the watcher runs (it is started on the runtime; this
    /// runs on any thread, the job-spawner's).
    pub(super) fn spawn_registered(
        self: &Arc<Self>,
        command: &JobCommand,
    ) -> std::io::Result<(Leader, Spawned)> {
        let _spawning = self.spawning.lock().unwrap_or_else(|e| e.into_inner());
        let spawned = command.spawn()?;
        let mut leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
        leaders.insert(spawned.pid);
        Ok((
            Leader {
                processes: Arc::clone(self),
                pid: spawned.pid,
                registered: true,
            },
            spawned,
        ))
    }

    /// The tree of the job whose leader is `pid`: its cgroup when the leader is in it,
    /// otherwise tracked through /proc.
    pub fn tree(self: &Arc<Self>, pid: u32, cgroup: Option<JobCgroup>) -> JobTree {
        if let Some(cgroup) = cgroup {
            if cgroup.contains(pid) {
                return JobTree::Cgroup(cgroup);
            }
            // The child could not move itself (a kernel before 5.16 checks the writer's
            // credentials, which the job user lacks): move it from here, late but better
            // than not at all.
            match cgroup.add(pid) {
                Ok(()) if cgroup.contains(pid) => {
                    warn!(
                        pid,
                        "the job's process could not join its cgroup itself; the server moved it, \
                         so processes it started at once may be outside"
                    );
                    return JobTree::Cgroup(cgroup);
                }
                result => warn!(
                    pid,
                    cgroup = %cgroup.dir().display(),
                    error = ?result.err(),
                    "cannot move the job into its cgroup; following its processes through /proc"
                ),
            }
        }
        let key = {
            let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
            tracked.next += 1;
            let key = tracked.next;
            tracked.jobs.insert(
                key,
                TrackedJob {
                    leader: pid,
                    members: HashSet::new(),
                },
            );
            key
        };
        // Scan soon: children the job forks at once are best seen while their parent lives.
        self.wake.notify_one();
        JobTree::Tracked(TrackedTree {
            processes: Arc::clone(self),
            key,
        })
    }

    /// Starts the background scans (once; needs the runtime, so not in `new`).
    pub(super) fn start_watcher(self: &Arc<Self>) {
        self.watcher.call_once(|| {
            tokio::spawn(watch_processes(
                Arc::downgrade(self),
                Arc::clone(&self.wake),
                self.stop_watcher.clone(),
                self.subreaper,
            ));
        });
    }

    /// Waits for a scan of /proc that started after this call. Concurrent callers share scans.
    async fn fresh_scan(&self) {
        let wanted = self.scans_requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut done = self.scans_done.subscribe();
        self.wake.notify_one();
        // Bounded in case the watcher is gone (it is not expected to be).
        let _ = tokio::time::timeout(Duration::from_secs(5), done.wait_for(|&n| n >= wanted)).await;
    }

    /// Whether the watcher has reason to scan on its own, and how often.
    fn scan_interval(&self) -> Option<Duration> {
        let tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        if !tracked.jobs.is_empty() || !tracked.orphans.is_empty() {
            Some(TRACK_INTERVAL)
        } else if self.subreaper {
            Some(REAP_INTERVAL)
        } else {
            None
        }
    }

    /// One scan: follows tracked jobs, reaps orphans that exited, stops orphans no job owns.
    /// Blocking.
    fn scan(&self) {
        if self.subreaper && !self.tracking() && self.reap_children() {
            return;
        }
        let snapshot = procfs::processes();
        let index = Index::new(&snapshot);
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        tracked.follow(&index);
        if !self.subreaper {
            return;
        }
        let orphans = self.reap_orphans(&snapshot);
        let strays = tracked.adopt(&orphans, &index);
        drop(tracked);
        if !strays.is_empty() {
            info!(
                count = strays.len(),
                "stopping processes whose jobs have all ended (they left their job's session)"
            );
            for key in strays {
                kill_if_same(key, Signal::SIGKILL);
            }
        }
    }

    /// Sends `signal` to process group `group` of the job whose leader is `pid` (the leader's
    /// own group, or its terminal's foreground group), while the leader is registered (not yet
    /// reaped, under the lock it is reaped under): its pid, its own group's id, cannot have
    /// been reused, and its session, which the other groups belong to, is alive.
    pub(super) fn signal_group(
        &self,
        pid: u32,
        group: u32,
        signal: Signal,
    ) -> Result<(), SignalRefused> {
        let leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
        if !leaders.contains(&pid) {
            return Err(SignalRefused::Exited);
        }
        killpg(Pid::from_raw(group as i32), signal).map_err(|e| match e {
            // Every member gone (the leader a zombie, its group empty).
            Errno::ESRCH => SignalRefused::Exited,
            e => SignalRefused::Denied(e.desc().to_owned()),
        })
    }

    /// Whether any job or orphan is followed through /proc (which needs full scans).
    fn tracking(&self) -> bool {
        let tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        !tracked.jobs.is_empty() || !tracked.orphans.is_empty()
    }

    /// The scan of a subreaper whose jobs all have cgroups: only its own children are read,
    /// not all of /proc (a full scan on every SIGCHLD made each job's end cost O(processes on
    /// the host): with 256 stalled jobs, a new client's `echo hi` took 1.28x as long).
    /// Reaps orphans that exited; false when the full scan is needed (the kernel does not
    /// list children, or a live orphan is outside every job's cgroup and must be adopted).
    fn reap_children(&self) -> bool {
        let Some(pids) = procfs::own_children() else {
            return false;
        };
        // Leaders are left out before their stats are read: there may be thousands.
        let children: Vec<ProcStat> = {
            let leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
            pids.into_iter()
                .filter(|pid| !leaders.contains(pid))
                .filter_map(procfs::read_stat)
                .collect()
        };
        self.reap_orphans(&children).is_empty()
    }

    /// Reaps the server's children in `processes` that are not job leaders and have exited;
    /// returns the live ones a job must adopt (not there before the server, not in a job's
    /// cgroup: those belong to that job, which stops them when it ends).
    fn reap_orphans(&self, processes: &[ProcStat]) -> Vec<ProcStat> {
        // A child spawned when `processes` was read is registered by the time this is held;
        // none is spawned until the zombies are reaped.
        let _spawning = self.spawning.lock().unwrap_or_else(|e| e.into_inner());
        let (zombies, live): (Vec<ProcStat>, Vec<ProcStat>) = {
            let leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
            processes
                .iter()
                // A pid reaped and reused since it was listed is someone else's.
                .filter(|p| p.ppid == self.me && !leaders.contains(&p.pid))
                .partition(|p| p.is_dead())
        };
        // Not a leader, so no `LeaderProcess` waits for it; a zombie's pid cannot be reused
        // before it is reaped, so it cannot have become a leader since.
        let reaped = zombies
            .iter()
            .filter(|z| waitpid(Pid::from_raw(z.pid as i32), Some(WaitPidFlag::WNOHANG)).is_ok())
            .count();
        if reaped > 0 {
            debug!(reaped, "reaped orphaned job processes");
        }
        live.into_iter()
            .filter(|p| !self.preexisting.contains(&p.key()) && !self.in_job_cgroup(p.pid))
            .collect()
    }

    fn in_job_cgroup(&self, pid: u32) -> bool {
        self.cgroups.as_ref().is_some_and(|root| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|text| root.holds(&text))
        })
    }

    /// Whether the job is surely over, without a scan of /proc (which is rate-limited: waiting
    /// for one made every job's end take ~50 ms). True when its leader's process group is empty,
    /// no member an earlier scan saw lives, and the server has no live child but job leaders.
    /// That covers every process of the job: one still in the group is seen by `killpg`; any
    /// other lives below an ancestor whose parent is gone, and such an ancestor was re-parented
    /// to this process, a subreaper. Anything less certain says false, and the caller scans.
    fn surely_gone(&self, key: u64) -> bool {
        if !self.subreaper {
            return false;
        }
        let leader = {
            let tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
            match tracked.jobs.get(&key) {
                Some(job) => job.leader,
                None => return false,
            }
        };
        // The leader leads its session and its group (setsid at spawn).
        if killpg(Pid::from_raw(leader as i32), None) != Err(Errno::ESRCH) {
            return false;
        }
        let lives = |pid: u32, same: Option<ProcKey>| {
            procfs::read_stat(pid)
                .is_some_and(|p| !p.is_dead() && same.is_none_or(|k| k == p.key()))
        };
        if self
            .tracked_members(key)
            .into_iter()
            .any(|member| lives(member.pid, Some(member)))
        {
            return false;
        }
        let Some(children) = procfs::own_children() else {
            return false;
        };
        let leaders = self.leaders.lock().unwrap_or_else(|e| e.into_inner());
        !children
            .into_iter()
            .any(|pid| !leaders.contains(&pid) && lives(pid, None))
    }

    fn tracked_members(&self, key: u64) -> Vec<ProcKey> {
        let tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        tracked
            .jobs
            .get(&key)
            .map(|job| job.members.iter().copied().collect())
            .unwrap_or_default()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop_watcher.cancel();
    }
}

/// Scans /proc when asked, on SIGCHLD (as a subreaper), and periodically while there is
/// something to follow.
async fn watch_processes(
    processes: std::sync::Weak<Processes>,
    wake: Arc<Notify>,
    stop: CancellationToken,
    subreaper: bool,
) {
    let mut sigchld = if subreaper {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
            Ok(signal) => Some(signal),
            Err(e) => {
                warn!(error = %e, "cannot watch SIGCHLD; reaping orphans periodically only");
                None
            }
        }
    } else {
        None
    };
    loop {
        let interval = match processes.upgrade() {
            Some(p) => p.scan_interval(),
            None => return,
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wake.notified() => {}
            _ = async {
                match sigchld.as_mut() {
                    Some(signal) => { signal.recv().await; }
                    None => std::future::pending().await,
                }
            } => {}
            _ = async {
                match interval {
                    Some(interval) => sleep(interval).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        let Some(p) = processes.upgrade() else { return };
        let requested = p.scans_requested.load(Ordering::SeqCst);
        let scanner = Arc::clone(&p);
        let started = Instant::now();
        if let Err(e) = tokio::task::spawn_blocking(move || scanner.scan()).await {
            warn!(error = %e, "scanning processes failed");
        }
        p.scans_done.send_replace(requested);
        drop(p);
        sleep(MIN_SCAN_GAP.max(started.elapsed() * 9)).await;
    }
}

/// A job leader the reaper must leave to its `LeaderProcess`; unregistered once reaped, or
/// when dropped (then a subreaper's scan reaps it).
pub(super) struct Leader {
    processes: Arc<Processes>,
    pid: u32,
    /// In `Processes::leaders` (until reaped).
    registered: bool,
}

impl Leader {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Reaps the leader if it has exited (`waitpid(pid, WNOHANG)`), and then unregisters it
    /// under the same lock. `None` while it runs, and once reaped.
    pub fn try_reap(&mut self) -> nix::Result<Option<WaitStatus>> {
        if !self.registered {
            return Ok(None);
        }
        let mut leaders = self
            .processes
            .leaders
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let status = loop {
            match waitpid(Pid::from_raw(self.pid as i32), Some(WaitPidFlag::WNOHANG)) {
                Err(Errno::EINTR) => continue,
                Ok(WaitStatus::StillAlive) => return Ok(None),
                other => break other?,
            }
        };
        leaders.remove(&self.pid);
        self.registered = false;
        Ok(Some(status))
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.registered {
            return;
        }
        let mut leaders = self
            .processes
            .leaders
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        leaders.remove(&self.pid);
    }
}

/// All processes of one job.
pub(super) enum JobTree {
    Cgroup(JobCgroup),
    Tracked(TrackedTree),
}

/// A job followed through /proc; unregistered when dropped.
pub(super) struct TrackedTree {
    processes: Arc<Processes>,
    key: u64,
}

impl Drop for TrackedTree {
    fn drop(&mut self) {
        let mut tracked = self
            .processes
            .tracked
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        tracked.jobs.remove(&self.key);
    }
}

impl JobTree {
    /// Whether any process of the job is alive (zombies are not).
    pub async fn alive(&self) -> bool {
        match self {
            // cgroupfs is in memory: reading one file does not block.
            JobTree::Cgroup(cgroup) => cgroup.populated(),
            JobTree::Tracked(tree) => {
                if tree.processes.surely_gone(tree.key) {
                    return false;
                }
                tree.processes.fresh_scan().await;
                !tree.processes.tracked_members(tree.key).is_empty()
            }
        }
    }

    async fn signal(&self, signal: Signal) {
        match self {
            JobTree::Cgroup(cgroup) => cgroup.signal(signal),
            JobTree::Tracked(tree) => {
                tree.processes.fresh_scan().await;
                for key in tree.processes.tracked_members(tree.key) {
                    kill_if_same(key, signal);
                }
            }
        }
    }

    async fn kill_all(&self) {
        match self {
            JobTree::Cgroup(cgroup) => cgroup.kill_all(),
            JobTree::Tracked(_) => self.signal(Signal::SIGKILL).await,
        }
    }

    /// SIGTERM to every process of the job, up to `grace` for them to exit, then SIGKILL, and a
    /// moment for them to be gone.
    pub async fn terminate(&self, grace: Duration) {
        self.signal(Signal::SIGTERM).await;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !self.alive().await {
                return;
            }
            sleep_until((Instant::now() + POLL).min(deadline)).await;
        }
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            // Again each round: SIGKILL does not stop a fork already under way.
            self.kill_all().await;
            if !self.alive().await {
                debug!("the job's processes did not stop within the grace; SIGKILLed them");
                return;
            }
            if Instant::now() >= deadline {
                warn!(
                    "processes of a job survive SIGKILL (uninterruptible sleep?); ending the job \
                     without them"
                );
                return;
            }
            sleep(POLL).await;
        }
    }
}

/// Sends `signal` to the process `key` names, unless its pid now belongs to another process.
fn kill_if_same(key: ProcKey, signal: Signal) {
    if procfs::read_stat(key.pid).is_some_and(|p| p.start == key.start) {
        match kill(Pid::from_raw(key.pid as i32), signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => warn!(pid = key.pid, %signal, error = %e, "cannot signal a job's process"),
        }
    }
}

/// Jobs followed through /proc, and the server's orphans no job could be shown to own.
#[derive(Default)]
struct Tracked {
    next: u64,
    jobs: HashMap<u64, TrackedJob>,
    /// Orphans with the tracked jobs that were running when each was first seen: one of them
    /// started it.
    orphans: HashMap<ProcKey, Vec<u64>>,
}

struct TrackedJob {
    leader: u32,
    /// Live processes of the job at the last scan.
    members: HashSet<ProcKey>,
}

impl Tracked {
    /// Updates every job's members from a scan: what is in the leader's session or group, what
    /// was a member before, and all their descendants.
    fn follow(&mut self, index: &Index<'_>) {
        for job in self.jobs.values_mut() {
            let seeds = index
                .alive()
                .filter(|p| {
                    p.session == job.leader
                        || p.pgrp == job.leader
                        || job.members.contains(&p.key())
                })
                .map(|p| p.pid);
            job.members = index.with_descendants(seeds);
        }
    }

    /// Gives orphans of the server to the tracked jobs: an orphan no job's members include goes
    /// to the one job that was running when it was first seen; with several, it waits until
    /// only one of them remains. Returns the orphans (with their descendants) whose candidate
    /// jobs have all ended: nothing owns them any more.
    fn adopt(&mut self, orphans: &[ProcStat], index: &Index<'_>) -> Vec<ProcKey> {
        self.orphans.retain(|key, _| index.is_alive(*key));
        let running: Vec<u64> = self.jobs.keys().copied().collect();
        let mut strays = Vec::new();
        for orphan in orphans {
            let key = orphan.key();
            if self.jobs.values().any(|job| job.members.contains(&key)) {
                self.orphans.remove(&key);
                continue;
            }
            let candidates = self.orphans.entry(key).or_insert_with(|| running.clone());
            candidates.retain(|job| self.jobs.contains_key(job));
            match candidates[..] {
                [] => {
                    self.orphans.remove(&key);
                    strays.extend(index.with_descendants([orphan.pid]));
                }
                [only] => {
                    let tree = index.with_descendants([orphan.pid]);
                    if let Some(job) = self.jobs.get_mut(&only) {
                        job.members.extend(tree);
                    }
                }
                _ => {}
            }
        }
        strays
    }
}

/// A scan of /proc, indexed.
struct Index<'a> {
    by_pid: HashMap<u32, &'a ProcStat>,
    children: HashMap<u32, Vec<u32>>,
}

impl<'a> Index<'a> {
    fn new(snapshot: &'a [ProcStat]) -> Self {
        let mut by_pid = HashMap::with_capacity(snapshot.len());
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for p in snapshot.iter().filter(|p| !p.is_dead()) {
            by_pid.insert(p.pid, p);
            children.entry(p.ppid).or_default().push(p.pid);
        }
        Index { by_pid, children }
    }

    fn alive(&self) -> impl Iterator<Item = &'a ProcStat> + '_ {
        self.by_pid.values().copied()
    }

    fn is_alive(&self, key: ProcKey) -> bool {
        self.by_pid
            .get(&key.pid)
            .is_some_and(|p| p.start == key.start)
    }

    /// The live processes `pids` and all their live descendants.
    fn with_descendants(&self, pids: impl IntoIterator<Item = u32>) -> HashSet<ProcKey> {
        let mut found = HashSet::new();
        let mut todo: Vec<u32> = pids.into_iter().collect();
        while let Some(pid) = todo.pop() {
            let Some(p) = self.by_pid.get(&pid) else {
                continue;
            };
            if found.insert(p.key()) {
                todo.extend(self.children.get(&pid).into_iter().flatten());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(pid: u32, ppid: u32, pgrp: u32, session: u32) -> ProcStat {
        ProcStat {
            pid,
            state: 'S',
            ppid,
            pgrp,
            session,
            start: u64::from(pid) * 10,
        }
    }

    fn pids(keys: &HashSet<ProcKey>) -> Vec<u32> {
        let mut pids: Vec<u32> = keys.iter().map(|k| k.pid).collect();
        pids.sort();
        pids
    }

    const SERVER: u32 = 100;

    #[tokio::test]
    async fn ending_or_signalling_a_job_never_waits_for_a_spawn_in_progress() {
        let processes = Processes::new(false, None);
        let command =
            JobCommand::new(super::super::spawn::JobSetup::plain(&["/bin/sleep", "30"])).unwrap();
        let (mut leader, _stdio) = processes.spawn_leader(&command).unwrap();
        let pid = leader.pid();
        // Another spawn holds the gate (the spawner thread does, across its vfork wait) until
        // told to let go, or 20 s passed: then the calls below had to wait for it.
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn({
            let processes = Arc::clone(&processes);
            move || {
                let _gate = processes.spawning.lock().unwrap();
                held_tx.send(()).unwrap();
                release_rx.recv_timeout(Duration::from_secs(20)).is_err()
            }
        });
        held_rx.recv().unwrap();
        assert!(processes.signal_group(pid, pid, Signal::SIGKILL).is_ok());
        let mut status = None;
        for _ in 0..1000 {
            status = leader.try_reap().unwrap();
            if status.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            matches!(status, Some(WaitStatus::Signaled(_, Signal::SIGKILL, _))),
            "{status:?}"
        );
        release_tx.send(()).unwrap();
        assert!(
            !holder.join().unwrap(),
            "signalling and reaping waited for the spawn gate"
        );
    }

    #[test]
    fn a_job_is_its_session_its_group_and_their_descendants() {
        let snapshot = [
            proc(SERVER, 1, SERVER, 1),
            proc(200, SERVER, 200, 200), // leader
            proc(201, 200, 200, 200),    // plain child
            proc(202, 200, 202, 200),    // set -m: own group, same session
            proc(203, 200, 203, 203),    // setsid'd child: parent still the leader
            proc(204, 203, 203, 203),    // ... and its child
            proc(300, SERVER, 300, 300), // another job
            proc(400, 1, 400, 400),      // someone else
        ];
        let index = Index::new(&snapshot);
        let mut tracked = Tracked::default();
        tracked.jobs.insert(
            1,
            TrackedJob {
                leader: 200,
                members: HashSet::new(),
            },
        );
        tracked.follow(&index);
        assert_eq!(pids(&tracked.jobs[&1].members), [200, 201, 202, 203, 204]);

        // The leader exits and its setsid'd child is re-parented to the server: still known,
        // because it was seen before.
        let later = [
            proc(SERVER, 1, SERVER, 1),
            proc(202, SERVER, 202, 200),
            proc(203, SERVER, 203, 203),
            proc(204, 203, 203, 203),
            proc(205, 204, 203, 203), // born since
        ];
        tracked.follow(&Index::new(&later));
        assert_eq!(pids(&tracked.jobs[&1].members), [202, 203, 204, 205]);

        // A pid reused by another process is not the member it was.
        let reused = [ProcStat {
            start: 1,
            ..proc(203, 1, 203, 203)
        }];
        tracked.follow(&Index::new(&reused));
        assert!(tracked.jobs[&1].members.is_empty());
    }

    #[test]
    fn zombies_are_not_members() {
        let snapshot = [
            proc(200, SERVER, 200, 200),
            ProcStat {
                state: 'Z',
                ..proc(201, 200, 200, 200)
            },
        ];
        let mut tracked = Tracked::default();
        tracked.jobs.insert(
            1,
            TrackedJob {
                leader: 200,
                members: HashSet::new(),
            },
        );
        tracked.follow(&Index::new(&snapshot));
        assert_eq!(pids(&tracked.jobs[&1].members), [200]);
    }

    #[test]
    fn unseen_orphans_go_to_the_only_running_job_or_wait_for_their_candidates() {
        let job = |leader| TrackedJob {
            leader,
            members: HashSet::new(),
        };
        let orphan = proc(500, SERVER, 500, 500);
        let snapshot = [orphan, proc(501, 500, 500, 500)];
        let index = Index::new(&snapshot);

        // One job running: the orphan and its child are that job's.
        let mut tracked = Tracked::default();
        tracked.jobs.insert(1, job(200));
        assert!(tracked.adopt(&[orphan], &index).is_empty());
        assert_eq!(pids(&tracked.jobs[&1].members), [500, 501]);

        // Two jobs running: undecided; when one ends it is the other's; when that ends too,
        // nothing owns it and it is stopped.
        let mut tracked = Tracked::default();
        tracked.jobs.insert(1, job(200));
        tracked.jobs.insert(2, job(300));
        assert!(tracked.adopt(&[orphan], &index).is_empty());
        assert!(tracked.jobs.values().all(|j| j.members.is_empty()));
        tracked.jobs.remove(&1);
        // A job started since was not running when the orphan appeared: not a candidate.
        tracked.jobs.insert(3, job(400));
        assert!(tracked.adopt(&[orphan], &index).is_empty());
        assert_eq!(pids(&tracked.jobs[&2].members), [500, 501]);
        assert!(tracked.jobs[&3].members.is_empty());
        tracked.jobs.remove(&2);
        let mut strays: Vec<u32> = tracked
            .adopt(&[orphan], &index)
            .iter()
            .map(|k| k.pid)
            .collect();
        strays.sort();
        assert_eq!(strays, [500, 501]);
        assert!(tracked.orphans.is_empty());
    }

    #[test]
    fn orphans_that_are_members_already_are_left_alone() {
        let orphan = proc(500, SERVER, 500, 500);
        let snapshot = [orphan];
        let index = Index::new(&snapshot);
        let mut tracked = Tracked::default();
        tracked.jobs.insert(
            1,
            TrackedJob {
                leader: 200,
                members: HashSet::from([orphan.key()]),
            },
        );
        tracked.jobs.insert(
            2,
            TrackedJob {
                leader: 300,
                members: HashSet::new(),
            },
        );
        assert!(tracked.adopt(&[orphan], &index).is_empty());
        assert!(tracked.orphans.is_empty());
        assert!(tracked.jobs[&2].members.is_empty());
    }
}
