//! How a job's first process is made: a vfork-style `clone` followed by `execve`, the way
//! glibc's `posix_spawn` does it, with the job's own steps in between. The crate's one piece of
//! unsafe code, kept to this file.
//!
//! Why not `std`/tokio's `Command`: the job's first process must make itself a session leader,
//! join the job's cgroup before the program can fork, change to the job user and drop every
//! privilege, and arm a parent-death signal after the credential change (which clears it) but
//! before the program runs. `Command` can do that only through `pre_exec`, and a `pre_exec` hook
//! makes std `fork()` instead of using `posix_spawn`. `fork` copies the server's page tables,
//! so its cost grows with the server's memory: with 256 stalled Exec streams (RSS ~177 MiB) a
//! `clone(SIGCHLD)` took 2.0 ms instead of 0.25 ms on an idle server, and a new client's
//! `echo hi` took 2.3x as long as on an idle server (7.7x with 1,000 streams, issue 11).
//!
//! So the child is made with `clone(CLONE_VM | CLONE_VFORK | CLONE_FILES | SIGCHLD)` on a stack
//! allocated here: it shares the server's memory (no page table is copied, whatever the server
//! holds) and its descriptor table (nor is that, until the child takes a small one of its own)
//! and the calling thread is suspended until the child has called `execve` or exited. With 256
//! streams held, that whole call (the child's setup included) took 0.17 ms at p50 against the
//! fork's 2.0 ms, and the held `echo hi` went from 2.3x to 1.4x of the idle one (BENCHMARKS.md,
//! issue 11). The alternatives were an external wrapper (`setpriv --pdeathsig`, not on
//! every image, and "program not found" would become the wrapper's exit code) or re-executing
//! this binary as a shim (a second exec per job, and the job's pid would be the shim's).
//!
//! The child runs on the server's memory and on the calling thread's thread-local storage, so it
//! must not disturb either (see [`run_child`]): everything it needs is prepared before the
//! clone; it allocates nothing, takes no lock, cannot panic, touches no Rust thread-local, and
//! changes credentials with raw system calls (glibc's `setuid` and friends would make the
//! server's threads change theirs). All signals are blocked in the calling thread across the
//! clone, so none of the server's signal handlers runs in the child, which sets every
//! disposition back to default before it unblocks them. A failure before `execve` is written
//! into memory the parent reads once the clone returns; the parent then reaps the child.

use std::{
    collections::BTreeMap,
    ffi::{CString, OsStr, OsString},
    fs::File,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::{OsStrExt, OsStringExt},
    },
    path::Path,
    ptr,
    sync::atomic::{AtomicI32, AtomicU8, Ordering},
};

use super::terminal::open_pty;
use crate::job::TerminalSize;

use nix::{
    errno::Errno,
    fcntl::OFlag,
    libc,
    sched::{CloneFlags, clone},
    sys::wait::waitpid,
    unistd::{Pid, pipe2},
};
use tokio::io::{Interest, unix::AsyncFd};

/// The child's stack. It makes a few plain library calls and system calls on prepared data;
/// a guard page below it turns an overflow into a fault instead of a write into the heap.
const STACK_BYTES: usize = 64 * 1024;

/// Where execvp looks when there is no PATH (glibc's default).
const DEFAULT_PATH: &[u8] = b"/bin:/usr/bin";

/// Exit code of a child that failed before `execve` (as `posix_spawn`'s); the parent reaps it
/// and reports the error instead.
const SPAWN_FAILED: i32 = 127;

/// A job's program, prepared for [`spawn`](JobCommand::spawn): every string the child passes to
/// the kernel, as C strings.
pub(super) struct JobCommand {
    /// Paths to try with `execve`, in order: the program itself when its name has a '/', else
    /// each directory of PATH joined with it (execvp's search).
    candidates: Vec<CString>,
    argv: Vec<CString>,
    /// `NAME=value`, sorted by name.
    envp: Vec<CString>,
    cwd: Option<CString>,
    /// `(uid, gid)` of the job user, when jobs do not run as the server's user.
    identity: Option<(u32, u32)>,
    /// `cgroup.procs` of the job's cgroup (close-on-exec, so the program never holds it).
    cgroup_procs: Option<File>,
    /// The server's pid. The parent-death signal only fires for a parent that dies after it was
    /// armed, so the child checks its parent is still the server once it is armed.
    server_pid: i32,
    /// stdin on a new pipe, not /dev/null.
    stdin: bool,
    /// On a new terminal of this size instead of pipes (and the terminal's owner, with a job
    /// user).
    tty: Option<TerminalSize>,
    /// The job's nice value (0 to 19).
    nice: i32,
    /// The same value as text, for the job's session scheduling group (`/proc/self/autogroup`),
    /// where the kernel makes one of each session.
    autogroup_nice: Option<CString>,
}

/// What [`JobCommand::spawn`] started: the process and the server's ends of its stdio.
pub(super) struct Spawned {
    pub pid: u32,
    pub stdio: SpawnedStdio,
}

/// The server's ends of a job's stdin, stdout and stderr.
pub(super) enum SpawnedStdio {
    /// The read ends of its output pipes, and the write end of its stdin pipe (when it has
    /// one).
    Pipes {
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
    /// The master side of the terminal the job's stdin, stdout and stderr are on (close-on-exec,
    /// blocking).
    Terminal { master: OwnedFd },
}

/// The job's settings that [`JobCommand::new`] prepares.
pub(super) struct JobSetup<'a> {
    /// The program (`argv[0]`, looked up in PATH when it has no '/') and its arguments.
    pub argv: Vec<OsString>,
    /// The job's whole environment; its PATH, if any, is where the program is looked up.
    pub env: BTreeMap<OsString, OsString>,
    pub cwd: Option<&'a Path>,
    /// `(uid, gid)` to switch to: no supplementary groups, no capabilities, no_new_privs.
    pub identity: Option<(u32, u32)>,
    pub cgroup_procs: Option<File>,
    pub server_pid: u32,
    /// Give the job a pipe for stdin (its write end is returned), rather than /dev/null.
    pub stdin: bool,
    /// Run the job on a new terminal of this size (its controlling terminal, and its stdin,
    /// stdout and stderr), rather than on pipes; `stdin` is then ignored.
    pub tty: Option<TerminalSize>,
    /// How the job yields the CPU to the server.
    pub priority: JobPriority,
}

#[cfg(test)]
impl JobSetup<'_> {
    /// `argv` with no environment, in the server's directory, as the server's user, on pipes
    /// with stdin on /dev/null, at the server's priority: for tests to change what they need.
    pub fn plain(argv: &[&str]) -> Self {
        JobSetup {
            argv: argv.iter().map(OsString::from).collect(),
            env: BTreeMap::new(),
            cwd: None,
            identity: None,
            cgroup_procs: None,
            server_pid: std::process::id(),
            stdin: false,
            tty: None,
            priority: JobPriority {
                nice: 0,
                session_groups: false,
            },
        }
    }
}

/// How a job yields the CPU to the server, whose nice value is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobPriority {
    /// The nice value the job starts with, 0 to 19 (higher yields more). A job running as the
    /// server's user, or as root, may lower it again; a job user cannot.
    pub nice: u8,
    /// The kernel gives each session a scheduling group of its own (autogroup: enabled, and
    /// the server outside any cpu cgroup), so a job's nice value only ranks the processes
    /// of its own session: its session's group gets the same nice value.
    pub session_groups: bool,
}

impl JobPriority {
    /// `nice`, with `session_groups` as this kernel has it: `kernel.sched_autogroup_enabled`
    /// (only in effect for processes outside a cpu cgroup, which is cheap to set anyway).
    pub fn with_nice(nice: u8) -> JobPriority {
        let session_groups = std::fs::read_to_string("/proc/sys/kernel/sched_autogroup_enabled")
            .is_ok_and(|v| v.trim() == "1");
        JobPriority {
            nice,
            session_groups,
        }
    }
}

impl JobCommand {
    /// Converts the settings to C strings; fails (`InvalidInput`) on a NUL byte.
    pub fn new(setup: JobSetup<'_>) -> io::Result<JobCommand> {
        let JobSetup {
            argv,
            env,
            cwd,
            identity,
            cgroup_procs,
            server_pid,
            stdin,
            tty,
            priority,
        } = setup;
        let nice = priority.nice.min(19);
        let program = argv
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
        let path = env.get(OsStr::new("PATH")).map(|p| p.as_bytes());
        let candidates = candidates(program.as_bytes(), path)
            .into_iter()
            .map(c_string)
            .collect::<io::Result<_>>()?;
        let argv = argv
            .into_iter()
            .map(|arg| c_string(arg.into_vec()))
            .collect::<io::Result<_>>()?;
        let envp = env
            .into_iter()
            .map(|(name, value)| {
                let mut entry = name.into_vec();
                entry.push(b'=');
                entry.extend_from_slice(value.as_bytes());
                c_string(entry)
            })
            .collect::<io::Result<_>>()?;
        let cwd = cwd
            .map(|dir| c_string(dir.as_os_str().as_bytes().to_vec()))
            .transpose()?;
        Ok(JobCommand {
            candidates,
            argv,
            envp,
            cwd,
            identity,
            cgroup_procs,
            server_pid: server_pid as i32,
            stdin,
            tty,
            nice: i32::from(nice),
            autogroup_nice: (priority.session_groups && nice > 0)
                .then(|| c_string(nice.to_string().into_bytes()))
                .transpose()?,
        })
    }

    /// Starts the job's first process: leader of a new session (and process group), in the
    /// job's cgroup, without privileges (with a job user), SIGKILLed when the server dies, with
    /// stdin on /dev/null (or a new pipe) and stdout/stderr on new pipes, or all three on a new
    /// terminal that is its controlling terminal, running the program.
    ///
    /// The parent-death signal follows the *thread* that spawned, not the process: jobs are
    /// spawned from the job-spawner thread, which lives as long as the server (`spawner.rs`).
    ///
    /// Fails with the errno of the step that failed (ENOENT for a program not found), after
    /// reaping the child. The caller holds the gate that keeps the orphan reaper off a pid
    /// that is not registered as a leader yet.
    #[allow(unsafe_code)]
    pub fn spawn(&self) -> io::Result<Spawned> {
        // The child's ends (sources of 0, 1 and 2) and the server's.
        let (child_ends, server_ends) = match self.tty {
            Some(size) => {
                let (master, terminal) = open_terminal(size, self.identity)?;
                let ends = [terminal.try_clone()?, terminal.try_clone()?, terminal];
                (ends, SpawnedStdio::Terminal { master })
            }
            None => {
                let (stdout, stdout_w) = pipe2(OFlag::O_CLOEXEC)?;
                let (stderr, stderr_w) = pipe2(OFlag::O_CLOEXEC)?;
                let (stdin_r, stdin) = if self.stdin {
                    let (read, write) = pipe2(OFlag::O_CLOEXEC)?;
                    (read, Some(write))
                } else {
                    (OwnedFd::from(File::open("/dev/null")?), None)
                };
                let ends = [stdin_r, stdout_w, stderr_w];
                let stdio = SpawnedStdio::Pipes {
                    stdin,
                    stdout,
                    stderr,
                };
                (ends, stdio)
            }
        };

        // Null-terminated pointer arrays into the C strings above, which outlive the child's
        // use of them (the clone returns only after execve or exit).
        let argv = pointers(&self.argv);
        let envp = pointers(&self.envp);
        let candidates: Vec<*const libc::c_char> =
            self.candidates.iter().map(|c| c.as_ptr()).collect();
        // For a program the kernel cannot execute (ENOEXEC: a script without `#!`), execvp
        // runs `/bin/sh <program> <args...>`; slot 1 is filled in by the child.
        let mut script_argv = Vec::with_capacity(self.argv.len() + 2);
        script_argv.push(SHELL.as_ptr());
        script_argv.push(SHELL.as_ptr());
        script_argv.extend(self.argv.iter().skip(1).map(|a| a.as_ptr()));
        script_argv.push(ptr::null());
        let mut plan = Plan {
            candidates: &candidates,
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            script_argv: &mut script_argv,
            cwd: self.cwd.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            identity: self.identity,
            cgroup_procs: self.cgroup_procs.as_ref().map(AsRawFd::as_raw_fd),
            server_pid: self.server_pid,
            stdio: [0; 3],
            keep_below: 0,
            controlling_terminal: self.tty.is_some(),
            nice: self.nice,
            autogroup_nice: self.autogroup_nice.as_ref().map(|n| n.as_bytes()),
        };
        // The child's ends go into the stdio slots: low descriptors, so that the child's
        // private descriptor table need hold nothing above them (see `run_child`).
        let slots = StdioSlots::fill(&child_ends)?;
        (plan.stdio, plan.keep_below) = slots.numbers();
        let failure = Failure {
            errno: AtomicI32::new(0),
            step: AtomicU8::new(0),
            autogroup_errno: AtomicI32::new(0),
        };
        let mut stack = Stack::new(STACK_BYTES)?;
        let cloned = {
            let _blocked = BlockedSignals::block_all();
            let child = Box::new(|| -> isize { run_child(&mut plan, &failure) });
            // SAFETY: the child shares this process's memory and runs on `stack` (with a
            // guard page) while this thread is suspended (CLONE_VFORK), until it called
            // execve or exited; everything it uses (`plan`, `failure`, the strings and arrays
            // they point to, the fds) lives in this frame until then. It follows the rules of
            // `run_child`. Signals are blocked in this thread, so the child starts with all
            // of them blocked and runs none of the server's handlers.
            unsafe {
                clone(
                    child,
                    stack.as_mut_slice(),
                    CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK | CloneFlags::CLONE_FILES,
                    Some(libc::SIGCHLD),
                )
            }
        };
        drop(stack);
        drop(slots);
        let pid = cloned?;
        // The child is gone from this memory: it exec'd or it exited. Its ends are closed here,
        // so the job holds the only copies (a terminal's master then reads EIO once the job's
        // last process has closed it).
        drop(child_ends);
        warn_autogroup_failure(failure.autogroup_errno.load(Ordering::Acquire));
        let errno = failure.errno.load(Ordering::Acquire);
        if errno != 0 {
            reap(pid);
            let error = io::Error::from_raw_os_error(errno);
            return Err(match Step::from_u8(failure.step.load(Ordering::Acquire)) {
                Step::Exec => error,
                step => io::Error::new(error.kind(), format!("{}: {error}", step.describe())),
            });
        }
        Ok(Spawned {
            pid: pid.as_raw() as u32,
            stdio: server_ends,
        })
    }
}

/// Three descriptors reserved early in the server's life (so their numbers are low), through
/// which a spawn hands the child its stdin, stdout and stderr. One spawn at a time uses them.
struct StdioSlots {
    slots: [OwnedFd; 3],
    /// What the slots hold between spawns, so that the server keeps no copy of a job's pipe.
    null: OwnedFd,
}

static STDIO_SLOTS: std::sync::Mutex<Option<StdioSlots>> = std::sync::Mutex::new(None);

/// Reserves the stdio slots now, while the server's descriptors are few (their numbers bound
/// what each spawn copies). Later spawns reserve them if this was not called.
pub(super) fn reserve_stdio_slots() -> io::Result<()> {
    let mut slots = STDIO_SLOTS.lock().unwrap_or_else(|e| e.into_inner());
    if slots.is_none() {
        *slots = Some(StdioSlots::open()?);
    }
    Ok(())
}

impl StdioSlots {
    fn open() -> io::Result<StdioSlots> {
        let null = OwnedFd::from(File::open("/dev/null")?);
        let slot = || rustix::io::fcntl_dupfd_cloexec(&null, 3).map_err(io::Error::from);
        Ok(StdioSlots {
            slots: [slot()?, slot()?, slot()?],
            null,
        })
    }

    /// The slots, holding `ends` (close-on-exec) until the guard is dropped.
    fn fill(ends: &[OwnedFd; 3]) -> io::Result<FilledSlots> {
        let mut guard = STDIO_SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(StdioSlots::open()?);
        }
        let mut filled = FilledSlots(guard);
        let slots = filled.0.as_mut().expect("opened above");
        for (slot, end) in slots.slots.iter_mut().zip(ends) {
            rustix::io::dup3(end, slot, rustix::io::DupFlags::CLOEXEC)?;
        }
        Ok(filled)
    }
}

/// The stdio slots while a spawn uses them; back to /dev/null when dropped.
struct FilledSlots(std::sync::MutexGuard<'static, Option<StdioSlots>>);

impl FilledSlots {
    /// The slots' numbers, and one past the highest.
    fn numbers(&self) -> ([RawFd; 3], RawFd) {
        let slots = self.0.as_ref().expect("filled");
        let numbers = slots.slots.each_ref().map(AsRawFd::as_raw_fd);
        (numbers, numbers.into_iter().max().unwrap_or(2) + 1)
    }
}

impl Drop for FilledSlots {
    fn drop(&mut self) {
        if let Some(slots) = self.0.as_mut() {
            for slot in &mut slots.slots {
                if let Err(e) = rustix::io::dup3(&slots.null, slot, rustix::io::DupFlags::CLOEXEC) {
                    // Not expected (dup3 onto an open descriptor of ours). Holding a job's
                    // pipe end here would keep its output open: close the slot instead, and
                    // let the next spawn reserve new ones.
                    tracing::error!(error = %e, "could not clear a stdio slot");
                    *self.0 = None;
                    return;
                }
            }
        }
    }
}

/// A new terminal of `size` for a job (see [`open_pty`]). With a job user, the terminal is
/// given to that user where the server may (as `login` does), so that programs that reopen it
/// by name can.
fn open_terminal(size: TerminalSize, owner: Option<(u32, u32)>) -> io::Result<(OwnedFd, OwnedFd)> {
    let (master, terminal) = open_pty(size)?;
    if let Some((uid, gid)) = owner {
        let owner = (
            rustix::fs::Uid::from_raw(uid),
            rustix::fs::Gid::from_raw(gid),
        );
        if let Err(e) = rustix::fs::fchown(&terminal, Some(owner.0), Some(owner.1)) {
            // Without CAP_CHOWN: the job still has the terminal open on 0, 1 and 2.
            tracing::debug!(error = %e, "could not give the job's terminal to the job user");
        }
    }
    Ok((master, terminal))
}

const SHELL: &std::ffi::CStr = c"/bin/sh";

/// The paths execvp would try for `program`: itself when it has a '/', otherwise
/// `<dir>/<program>` for each directory of `path` (an empty entry is the working directory).
fn candidates(program: &[u8], path: Option<&[u8]>) -> Vec<Vec<u8>> {
    if program.contains(&b'/') || program.is_empty() {
        return vec![program.to_vec()];
    }
    path.unwrap_or(DEFAULT_PATH)
        .split(|&b| b == b':')
        .map(|dir| {
            if dir.is_empty() {
                return program.to_vec();
            }
            let mut candidate = dir.to_vec();
            if !dir.ends_with(b"/") {
                candidate.push(b'/');
            }
            candidate.extend_from_slice(program);
            candidate
        })
        .collect()
}

fn c_string(bytes: Vec<u8>) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "nul byte found in provided data",
        )
    })
}

fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect()
}

/// Waits for a child that exited before exec, so that it leaves no zombie.
fn reap(pid: Pid) {
    while waitpid(pid, None) == Err(Errno::EINTR) {}
}

/// A pidfd for `pid`, registered with the runtime: readable once the process exited. `pid`
/// must be a child of this process not yet reaped (so the pid cannot have been reused).
/// ENOSYS before Linux 5.3.
pub(super) fn watch_exit(pid: u32) -> io::Result<AsyncFd<OwnedFd>> {
    register(pidfd_open(pid)?, Interest::READABLE)
}

/// `fd`, registered with the runtime for `interest`.
#[allow(unsafe_code)]
pub(super) fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor, which stays open and the same until it is
    // dropped (OwnedFd::as_raw_fd always returns it).
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

#[allow(unsafe_code)]
fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: a system call with integer arguments; on success it returns a new descriptor
    // (close-on-exec) that nothing else owns.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_pidfd_open,
            libc::c_long::from(pid),
            0 as libc::c_long,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// What the child uses, prepared by the parent: raw values and pointers only.
struct Plan<'a> {
    /// Pointers into `JobCommand::candidates`.
    candidates: &'a [*const libc::c_char],
    /// Null-terminated.
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// `/bin/sh`, a free slot, the program's arguments, null.
    script_argv: &'a mut [*const libc::c_char],
    /// Null: stay in the server's working directory.
    cwd: *const libc::c_char,
    identity: Option<(u32, u32)>,
    cgroup_procs: Option<RawFd>,
    server_pid: i32,
    /// Sources of fds 0, 1 and 2 (the stdio slots), all above 2.
    stdio: [RawFd; 3],
    /// The child's own descriptor table keeps only descriptors below this (the slots among
    /// them).
    keep_below: RawFd,
    /// fd 0 is a terminal to make the job's controlling terminal.
    controlling_terminal: bool,
    nice: i32,
    /// Written to `/proc/self/autogroup` once the child leads its session.
    autogroup_nice: Option<&'a [u8]>,
}

/// Where a child that failed before exec leaves its errno and step for the parent.
struct Failure {
    errno: AtomicI32,
    step: AtomicU8,
    /// Not a failure of the spawn: why the session's group kept nice 0 (see
    /// [`warn_autogroup_failure`]).
    autogroup_errno: AtomicI32,
}

/// Warns, once per server, that a job's session scheduling group could not be given the job's
/// nice value (`errno`, 0: it was). Without CAP_SYS_ADMIN the kernel allows that change ten
/// times a second for the whole machine (EAGAIN); the job then competes with the server as
/// an equal whenever both want the CPU.
fn warn_autogroup_failure(errno: i32) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if errno != 0 && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            error = %io::Error::from_raw_os_error(errno),
            "could not lower the CPU priority of a job's session group (the kernel groups each \
             session for scheduling, kernel.sched_autogroup_enabled): such jobs compete with the \
             server for CPU as equals; run the server with CAP_SYS_ADMIN, in a cpu cgroup, or \
             with autogroup disabled (warned once)"
        );
    }
}

/// The child's steps that can fail, for the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Step {
    Setsid = 1,
    Nice,
    Setgroups,
    Setgid,
    Setuid,
    ClearAmbientCaps,
    NoNewPrivs,
    ParentDeathSignal,
    ServerGone,
    Stdio,
    ControllingTerminal,
    Chdir,
    Exec,
}

impl Step {
    fn from_u8(value: u8) -> Step {
        [
            Step::Setsid,
            Step::Nice,
            Step::Setgroups,
            Step::Setgid,
            Step::Setuid,
            Step::ClearAmbientCaps,
            Step::NoNewPrivs,
            Step::ParentDeathSignal,
            Step::ServerGone,
            Step::Stdio,
            Step::ControllingTerminal,
            Step::Chdir,
        ]
        .into_iter()
        .find(|step| *step as u8 == value)
        .unwrap_or(Step::Exec)
    }

    fn describe(self) -> &'static str {
        match self {
            Step::Setsid => "starting a session",
            Step::Nice => "lowering the CPU priority",
            Step::Setgroups => "dropping supplementary groups",
            Step::Setgid => "changing to the job group",
            Step::Setuid => "changing to the job user",
            Step::ClearAmbientCaps => "clearing ambient capabilities",
            Step::NoNewPrivs => "setting no_new_privs",
            Step::ParentDeathSignal => "arming the parent-death signal",
            Step::ServerGone => "the server exited",
            Step::Stdio => "setting up stdin, stdout and stderr",
            Step::ControllingTerminal => "making the terminal the job's controlling terminal",
            Step::Chdir => "changing to the working directory",
            Step::Exec => "executing the program",
        }
    }
}

/// The child, between clone and exec. It shares the server's memory and the thread-local
/// storage of the suspended parent thread, so it only makes system calls (directly or through
/// libc's thin wrappers: no allocation, no lock, no Rust thread-local, no panic), on values
/// prepared by the parent, and ends in `execve` or `_exit`. libc's wrappers may set `errno`,
/// which is the parent thread's: the parent reads nothing from it after a successful clone.
///
/// In order: new session; the job's nice value (and its session group's, see [`JobPriority`]);
/// join the job's cgroup (not fatal: the server checks and moves the process itself, or follows
/// the job through /proc); with a job user, no supplementary groups, its gid and uid (raw
/// system calls: glibc's wrappers signal every thread of the process to change theirs too,
/// which would act on the server's threads), no ambient capabilities, no_new_privs; SIGKILL on
/// the parent's death and a check that the parent is still the server; a descriptor table of
/// its own with only stdin, stdout and stderr (and, on a terminal, that terminal as the
/// session's controlling terminal); the working directory (as the job user); every signal back
/// to its default disposition, then an empty signal mask; execve of each candidate.
#[allow(unsafe_code)]
fn run_child(plan: &mut Plan<'_>, failure: &Failure) -> isize {
    // SAFETY: glibc's errno of the calling thread (C, not Rust, thread-local storage).
    let errno = || unsafe { *libc::__errno_location() };

    // SAFETY (every call below): system calls and libc's async-signal-safe wrappers, with
    // integer arguments or pointers to data the parent keeps alive until the child exec'd or
    // exited (see `JobCommand::spawn`).
    unsafe {
        // Its own session: job control (`set -m`) and `setpgid` cannot leave it, and the job
        // has no controlling terminal of the server's.
        if libc::setsid() == -1 {
            child_failed(failure, Step::Setsid, errno());
        }
        // Below the server, so that Health, streaming and starting jobs keep answering while
        // jobs use every core. Raising a nice value needs no privilege.
        if plan.nice != 0 && libc::setpriority(libc::PRIO_PROCESS, 0, plan.nice) == -1 {
            child_failed(failure, Step::Nice, errno());
        }
        // setsid made a new scheduling group where the kernel groups sessions (autogroup),
        // at nice 0 whatever the job's own value: given the job's. Before the credential
        // change, after which the file is no longer the job's to write. Not fatal (see
        // `warn_autogroup_failure`). The descriptor is briefly in the server's table
        // (CLONE_FILES), close-on-exec.
        if let Some(text) = plan.autogroup_nice {
            let fd = libc::open(
                c"/proc/self/autogroup".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            let written = fd >= 0 && libc::write(fd, text.as_ptr().cast(), text.len()) >= 0;
            if !written {
                failure
                    .autogroup_errno
                    .store(errno().max(1), Ordering::Release);
            }
            if fd >= 0 {
                libc::close(fd);
            }
        }
        if let Some(procs) = plan.cgroup_procs {
            // "0" moves the writer; done before the credential change, while the writer may
            // still write to the cgroup.
            let _ = libc::write(procs, b"0".as_ptr().cast(), 1);
        }
        if let Some((uid, gid)) = plan.identity {
            if libc::syscall(
                libc::SYS_setgroups,
                0 as libc::c_long,
                ptr::null::<libc::gid_t>(),
            ) == -1
            {
                child_failed(failure, Step::Setgroups, errno());
            }
            if libc::syscall(libc::SYS_setgid, libc::c_long::from(gid)) == -1 {
                child_failed(failure, Step::Setgid, errno());
            }
            if libc::syscall(libc::SYS_setuid, libc::c_long::from(uid)) == -1 {
                child_failed(failure, Step::Setuid, errno());
            }
            // The job must keep none of the server's capabilities and gain none by exec.
            // Ambient capabilities (how systemd and `setpriv` give a non-root server
            // CAP_SETUID and friends) survive a change between non-root uids and exec, so they
            // are cleared; EINVAL is a kernel before 4.3, which has none to clear.
            let cleared = libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            );
            if cleared == -1 && errno() != libc::EINVAL {
                child_failed(failure, Step::ClearAmbientCaps, errno());
            }
            // Stops set-user-ID programs and file capabilities, which would otherwise hand the
            // job back the power to signal the server.
            if libc::prctl(
                libc::PR_SET_NO_NEW_PRIVS,
                1 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) == -1
            {
                child_failed(failure, Step::NoNewPrivs, errno());
            }
        }
        // After the credential change, which clears it.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        ) == -1
        {
            child_failed(failure, Step::ParentDeathSignal, errno());
        }
        if libc::getppid() != plan.server_pid {
            // The server died before the signal was armed: do not start an orphan job.
            child_failed(failure, Step::ServerGone, libc::ESRCH);
        }
        // Until now the child shared the server's descriptor table (CLONE_FILES) and changed
        // nothing in it. It gets a table of its own holding only the server's first few
        // descriptors, the stdio slots among them: copying the whole table (what a clone
        // without CLONE_FILES, or the exec of a shared table, does) takes time in proportion
        // to the server's descriptors, and with a thousand streams held there are thousands
        // (a spawn took 1.6x as long: issue 11). CLOSE_RANGE_UNSHARE copies only what lies
        // below the range it closes (Linux 5.9); before it, the whole table is copied.
        let unshared = libc::syscall(
            libc::SYS_close_range,
            libc::c_long::from(plan.keep_below),
            libc::c_long::from(u32::MAX),
            libc::c_long::from(libc::CLOSE_RANGE_UNSHARE),
        );
        if unshared == -1 && libc::unshare(libc::CLONE_FILES) == -1 {
            child_failed(failure, Step::Stdio, errno());
        }
        for (target, source) in (0..).zip(plan.stdio) {
            // The sources are close-on-exec and above 2; the copies are not close-on-exec.
            while libc::dup2(source, target) == -1 {
                if errno() != libc::EINTR {
                    child_failed(failure, Step::Stdio, errno());
                }
            }
        }
        // The session leader takes the terminal (new, so no other session has it): the job's
        // foreground group then gets the terminal's signals (Ctrl-C as SIGINT).
        if plan.controlling_terminal && libc::ioctl(0, libc::TIOCSCTTY, 0 as libc::c_int) == -1 {
            child_failed(failure, Step::ControllingTerminal, errno());
        }
        // Nothing but 0, 1 and 2 for the program: the server's own descriptors are
        // close-on-exec, but not always what the server inherited (its parent's leaks). The
        // table is the child's own, so they are closed (Linux 5.9; older kernels keep
        // inherited descriptors, as std's spawn does).
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_long,
            libc::c_long::from(u32::MAX),
            0 as libc::c_long,
        );
        if !plan.cwd.is_null() && libc::chdir(plan.cwd) == -1 {
            child_failed(failure, Step::Chdir, errno());
        }
        // Handlers are the server's code: none may run here once signals are unblocked, and
        // the job starts with default dispositions (an ignored signal stays ignored across
        // exec: the server ignores SIGPIPE, and its parent may have it ignore more). SIGKILL
        // and SIGSTOP cannot be changed. Raw system calls: glibc's wrapper refuses its two
        // internal signals (32 and 33), which may be ignored too. The child has its own copy
        // of the table (no CLONE_SIGHAND): the server's is untouched.
        let mut current = KernelSigaction::default();
        let to_default = KernelSigaction::default();
        for signal in 1..NSIG {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            let queried = libc::syscall(
                libc::SYS_rt_sigaction,
                libc::c_long::from(signal),
                ptr::null::<KernelSigaction>(),
                &mut current as *mut KernelSigaction,
                KERNEL_SIGSET_BYTES,
            );
            if queried == 0 && current.handler != libc::SIG_DFL {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    libc::c_long::from(signal),
                    &to_default as *const KernelSigaction,
                    ptr::null_mut::<KernelSigaction>(),
                    KERNEL_SIGSET_BYTES,
                );
            }
        }
        // Empty signal mask, as std gives children; the kernel's mask is 64 bits.
        let empty: u64 = 0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as libc::c_long,
            &empty as *const u64,
            ptr::null_mut::<u64>(),
            KERNEL_SIGSET_BYTES,
        );

        // execvp's search: go on past a directory without the program (or not searchable),
        // report EACCES if some candidate had it and none ran, else the last error.
        let mut denied = false;
        let mut last = libc::ENOENT;
        for &candidate in plan.candidates {
            libc::execve(candidate, plan.argv, plan.envp);
            last = errno();
            match last {
                libc::ENOEXEC => {
                    if let Some(slot) = plan.script_argv.get_mut(1) {
                        *slot = candidate;
                    }
                    libc::execve(SHELL.as_ptr(), plan.script_argv.as_ptr(), plan.envp);
                    child_failed(failure, Step::Exec, libc::ENOEXEC);
                }
                libc::EACCES => denied = true,
                libc::ENOENT
                | libc::ENOTDIR
                | libc::ESTALE
                | libc::ENODEV
                | libc::ETIMEDOUT
                | libc::ELOOP
                | libc::ENAMETOOLONG => {}
                _ => child_failed(failure, Step::Exec, last),
            }
        }
        child_failed(
            failure,
            Step::Exec,
            if denied { libc::EACCES } else { last },
        )
    }
}

/// Leaves `errno` and `step` for the parent and ends the child.
#[allow(unsafe_code)]
fn child_failed(failure: &Failure, step: Step, errno: i32) -> ! {
    // A zero errno would read as success.
    failure.errno.store(errno.max(1), Ordering::Release);
    failure.step.store(step as u8, Ordering::Release);
    // SAFETY: ends the child without running anything of the server's (no atexit handlers, no
    // stdio flush: _exit is the system call).
    unsafe { libc::_exit(SPAWN_FAILED) }
}

/// The kernel's `struct sigaction` (`rt_sigaction`'s), as on x86_64 and aarch64.
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Signals 1..=64.
const NSIG: i32 = 65;
/// The size of the kernel's signal set (`rt_sigprocmask`'s last argument).
const KERNEL_SIGSET_BYTES: libc::c_long = 8;

/// Every signal blocked in the calling thread until dropped, including glibc's internal ones
/// (as `posix_spawn` does).
struct BlockedSignals {
    previous: u64,
}

impl BlockedSignals {
    #[allow(unsafe_code)]
    fn block_all() -> BlockedSignals {
        let all: u64 = !0;
        let mut previous: u64 = 0;
        // SAFETY: rt_sigprocmask with pointers to two live u64s (the kernel's set size).
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK as libc::c_long,
                &all as *const u64,
                &mut previous as *mut u64,
                KERNEL_SIGSET_BYTES,
            );
        }
        BlockedSignals { previous }
    }
}

impl Drop for BlockedSignals {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK as libc::c_long,
                &self.previous as *const u64,
                ptr::null_mut::<u64>(),
                KERNEL_SIGSET_BYTES,
            );
        }
    }
}

/// An anonymous mapping for the child's stack, with an inaccessible guard page at its low end
/// (stacks grow down).
struct Stack {
    base: *mut libc::c_void,
    len: usize,
    guard: usize,
}

impl Stack {
    #[allow(unsafe_code)]
    fn new(size: usize) -> io::Result<Stack> {
        // SAFETY: sysconf has no memory arguments.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|&p| p > 0)
            .unwrap_or(4096);
        let len = size.div_ceil(page) * page + page;
        // SAFETY: a new private anonymous mapping, owned by the returned value.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Stack {
            base,
            len,
            guard: page,
        };
        // SAFETY: the first page of the mapping just made.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    #[allow(unsafe_code)]
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping above the guard page is readable, writable, and owned by self.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base.cast::<u8>().add(self.guard),
                self.len - self.guard,
            )
        }
    }
}

impl Drop for Stack {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used (the child exec'd or exited).
        unsafe {
            libc::munmap(self.base, self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(program: &str, path: Option<&str>) -> Vec<String> {
        candidates(program.as_bytes(), path.map(str::as_bytes))
            .into_iter()
            .map(|c| String::from_utf8(c).unwrap())
            .collect()
    }

    #[test]
    fn programs_are_looked_up_like_execvp() {
        assert_eq!(paths("/bin/ls", Some("/usr/bin")), ["/bin/ls"]);
        assert_eq!(paths("./run", None), ["./run"]);
        assert_eq!(paths("a/b", Some("/x")), ["a/b"]);
        assert_eq!(paths("ls", None), ["/bin/ls", "/usr/bin/ls"]);
        // An empty entry is the working directory; a trailing '/' is not doubled.
        assert_eq!(
            paths("ls", Some("/opt/bin/::/usr/bin")),
            ["/opt/bin/ls", "ls", "/usr/bin/ls"]
        );
        assert_eq!(paths("", Some("/bin")), [""]);
    }

    #[test]
    fn failed_steps_round_trip() {
        for step in [Step::Setsid, Step::Setuid, Step::Chdir, Step::Exec] {
            assert_eq!(Step::from_u8(step as u8), step);
        }
    }
}
