//! What a job's first process does to itself between fork and exec: the crate's one piece of
//! unsafe code, kept to this file.
//!
//! Why not a safe API: a parent-death signal must be armed by the child itself, after std has
//! changed its uid/gid (a credential change clears it) and before the program runs, and std
//! offers no hook there other than `pre_exec`. The alternatives were an external wrapper
//! (`setpriv --pdeathsig`, which is not on every image and would turn "program not found" into
//! an exit code of the wrapper) or re-executing this binary as a shim (a second exec per job,
//! and the job's pid would be the shim's). The hook also joins the job's cgroup before the
//! program can fork, which doing it from the parent after the spawn cannot promise.

use std::{fs::File, io};

use nix::{
    errno::Errno,
    libc,
    sys::{prctl, signal::Signal},
    unistd,
};
use tokio::process::Command;

/// What the job's first process does before it execs the program.
pub(super) struct ChildSetup {
    /// The server's pid. The parent-death signal only fires for a parent that dies after it was
    /// armed, so the child checks its parent is still the server once it is armed.
    pub server_pid: u32,
    /// `cgroup.procs` of the job's cgroup (close-on-exec, so the program never holds it).
    pub cgroup_procs: Option<File>,
    /// The job runs as another user than the server: it must keep none of the server's
    /// capabilities and gain none by exec. Ambient capabilities (how systemd and `setpriv` give
    /// a non-root server CAP_SETUID and friends) survive a change between non-root uids and
    /// exec, so they are cleared; no_new_privs stops set-user-ID programs and file
    /// capabilities, which would otherwise hand the job back the power to signal the server.
    pub drop_privileges: bool,
}

/// Makes the job's first process: leader of a new session (and process group), in the job's
/// cgroup, without privileges (with a job user), and SIGKILLed when the server dies.
///
/// The parent-death signal follows the *thread* that forked, not the process: jobs are spawned
/// from the runtime's worker threads, which live as long as the server.
#[allow(unsafe_code)]
pub(super) fn setup_child(cmd: &mut Command, setup: ChildSetup) {
    let ChildSetup {
        server_pid,
        cgroup_procs,
        drop_privileges,
    } = setup;
    let server_pid = server_pid as i32;
    let hook = move || -> io::Result<()> {
        // Its own session: job control (`set -m`) and `setpgid` cannot leave it, and the job
        // has no controlling terminal of the server's.
        unistd::setsid().map_err(os_error)?;
        if let Some(procs) = &cgroup_procs {
            // "0" moves the writer. Not fatal: the server checks after the spawn and moves
            // the process itself, or follows the job through /proc instead.
            let _ = unistd::write(procs, b"0");
        }
        if drop_privileges {
            // SAFETY: prctl with integer arguments only, no memory passed.
            let cleared = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL,
                    0,
                    0,
                    0,
                )
            };
            // EINVAL: a kernel before 4.3, which has no ambient capabilities to clear.
            if cleared == -1 && Errno::last() != Errno::EINVAL {
                return Err(os_error(Errno::last()));
            }
            prctl::set_no_new_privs().map_err(os_error)?;
        }
        prctl::set_pdeathsig(Signal::SIGKILL).map_err(os_error)?;
        if unistd::getppid().as_raw() != server_pid {
            // The server died before the signal was armed: do not start an orphan job.
            return Err(os_error(Errno::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child, where only async-signal-safe operations are
    // allowed (another thread of the server may have held a lock at the fork). It makes plain
    // system calls only (setsid, write, prctl, getppid), allocates nothing (errors are raw OS
    // errors, which io::Error stores inline), takes no lock, and uses only values moved into it
    // before the fork.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// An `io::Error` from an errno, without allocating.
fn os_error(errno: Errno) -> io::Error {
    io::Error::from_raw_os_error(errno as i32)
}
