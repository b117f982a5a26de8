//! A job's leader process as the server waits for it (what `tokio::process::Child` was before
//! the spawn became a vfork-style clone, see `spawn.rs`).
//!
//! The exit is watched through a pidfd registered with the runtime (readable once the process
//! exited), then the leader is reaped by its pid and unregistered from `Processes::leaders`
//! under the same lock (see `tree.rs`). Without pidfds (`pidfd_open` is Linux 5.3) the exit is
//! polled with `waitpid(pid, WNOHANG)`, 5 ms apart at first, doubling up to 100 ms.
//!
//! Dropped before its leader was reaped (the job never ran, or the runtime is shutting down),
//! the handle SIGKILLs the leader (the backstop `kill_on_drop` was) and has it reaped: by a task
//! that waits for its exit where a runtime is at hand, otherwise by unregistering it, so that
//! the subreaper's scan collects the zombie as it does any orphan.

use std::{
    io,
    os::{fd::OwnedFd, unix::process::ExitStatusExt},
    process::ExitStatus,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::{
        signal::{Signal, kill},
        wait::WaitStatus,
    },
    unistd::Pid,
};
use tokio::{
    io::unix::AsyncFd,
    time::{Instant, sleep_until},
};
use tracing::{info, warn};

use super::{spawn::watch_exit, tree::Leader};

/// First and longest interval between two `waitpid` polls, without pidfds.
const POLL_FIRST: Duration = Duration::from_millis(5);
const POLL_MAX: Duration = Duration::from_millis(100);

/// Whether the fallback to polling was logged (once per process).
static POLLING_LOGGED: AtomicBool = AtomicBool::new(false);

/// A job's leader, until it was reaped. Needs a runtime (its pidfd is registered with it).
pub(super) struct LeaderProcess {
    pid: u32,
    /// `None` once reaped (or handed over when dropped).
    waiter: Option<Waiter>,
    status: Option<ExitStatus>,
}

struct Waiter {
    leader: Leader,
    exit: ExitWatch,
}

/// How the leader's exit is noticed.
enum ExitWatch {
    Pidfd(AsyncFd<OwnedFd>),
    /// No pidfd (a kernel before 5.3): `waitpid(pid, WNOHANG)` at `next`, backing off.
    Poll {
        next: Instant,
        interval: Duration,
    },
}

impl LeaderProcess {
    pub fn new(leader: Leader) -> LeaderProcess {
        let pid = leader.pid();
        let exit = match watch_exit(pid) {
            Ok(fd) => ExitWatch::Pidfd(fd),
            // ENOSYS: a kernel before 5.3, without pidfds. Any other failure (EMFILE) polls
            // too rather than failing a job that is running already.
            Err(e) => {
                if !POLLING_LOGGED.swap(true, Ordering::Relaxed) {
                    if e.raw_os_error() == Some(Errno::ENOSYS as i32) {
                        info!("no pidfds on this kernel (before Linux 5.3): polling for job exits");
                    } else {
                        warn!(error = %e, "cannot watch a job's exit with a pidfd; polling for it");
                    }
                }
                ExitWatch::Poll {
                    next: Instant::now() + POLL_FIRST,
                    interval: POLL_FIRST,
                }
            }
        };
        LeaderProcess {
            pid,
            waiter: Some(Waiter { leader, exit }),
            status: None,
        }
    }

    /// Without a pidfd, as on a kernel before 5.3.
    #[cfg(test)]
    pub fn polling(leader: Leader) -> LeaderProcess {
        LeaderProcess {
            pid: leader.pid(),
            waiter: Some(Waiter {
                leader,
                exit: ExitWatch::Poll {
                    next: Instant::now() + POLL_FIRST,
                    interval: POLL_FIRST,
                },
            }),
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the leader to exit and reaps it. Cancel-safe: a wait dropped before the exit
    /// leaves the handle as it was.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let waiter = self
            .waiter
            .as_mut()
            .ok_or_else(|| io::Error::other("the job's process was handed over"))?;
        match waiter.wait().await {
            Ok(status) => {
                self.waiter = None;
                self.status = Some(status);
                Ok(status)
            }
            Err(e) => {
                if e.raw_os_error() == Some(Errno::ECHILD as i32) {
                    // Reaped by someone else: the pid is free for reuse, so it must not be
                    // signalled when this handle is dropped. Unregistered with the waiter.
                    self.waiter = None;
                }
                Err(e)
            }
        }
    }
}

impl Waiter {
    async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            match &mut self.exit {
                ExitWatch::Pidfd(fd) => {
                    let mut ready = fd.readable().await?;
                    if let Some(status) = reap(&mut self.leader)? {
                        return Ok(status);
                    }
                    ready.clear_ready();
                }
                ExitWatch::Poll { next, interval } => {
                    sleep_until(*next).await;
                    if let Some(status) = reap(&mut self.leader)? {
                        return Ok(status);
                    }
                    *interval = (*interval * 2).min(POLL_MAX);
                    *next = Instant::now() + *interval;
                }
            }
        }
    }
}

impl Drop for LeaderProcess {
    fn drop(&mut self) {
        let Some(mut waiter) = self.waiter.take() else {
            return;
        };
        // Not reaped, so the pid is still the leader's (alive or a zombie).
        match kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => warn!(pid = self.pid, error = %e, "cannot kill a job's leader"),
        }
        if matches!(waiter.leader.try_reap(), Ok(Some(_))) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let pid = self.pid;
                runtime.spawn(async move {
                    if let Err(e) = waiter.wait().await {
                        warn!(pid, error = %e, "waiting for a killed job leader failed");
                    }
                });
            }
            // Unregistered: a subreaper's scan reaps it as an orphan.
            Err(_) => drop(waiter),
        }
    }
}

/// Reaps the leader if it exited.
fn reap(leader: &mut Leader) -> io::Result<Option<ExitStatus>> {
    match leader.try_reap()? {
        None => Ok(None),
        Some(status) => exit_status(status).map(Some),
    }
}

/// The `ExitStatus` of a reaped process.
fn exit_status(status: WaitStatus) -> io::Result<ExitStatus> {
    match status {
        WaitStatus::Exited(_, code) => Ok(ExitStatus::from_raw((code & 0xff) << 8)),
        WaitStatus::Signaled(_, signal, core_dumped) => Ok(ExitStatus::from_raw(
            signal as i32 | if core_dumped { 0x80 } else { 0 },
        )),
        other => Err(io::Error::other(format!(
            "unexpected wait status {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses_become_exit_statuses() {
        let pid = Pid::from_raw(1);
        let exited = exit_status(WaitStatus::Exited(pid, 42)).unwrap();
        assert_eq!((exited.code(), exited.signal()), (Some(42), None));
        let killed = exit_status(WaitStatus::Signaled(pid, Signal::SIGKILL, false)).unwrap();
        assert_eq!((killed.code(), killed.signal()), (None, Some(9)));
        let dumped = exit_status(WaitStatus::Signaled(pid, Signal::SIGSEGV, true)).unwrap();
        assert_eq!((dumped.signal(), dumped.core_dumped()), (Some(11), true));
        assert!(exit_status(WaitStatus::StillAlive).is_err());
    }
}
