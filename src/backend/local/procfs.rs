//! What the local backend reads from /proc: the status of every process (to follow a job's
//! processes wherever they move, and to reap orphans), effective capabilities, and where this
//! process's cgroup v2 lives. The parsers are pure functions of the files' text.

use std::path::PathBuf;

/// A process as `/proc/<pid>/stat` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProcStat {
    pub pid: u32,
    /// `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
    pub session: u32,
    /// Start time in clock ticks after boot: with the pid, names one process for good (pids are
    /// reused, this pair is not).
    pub start: u64,
}

/// One process for good: its pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct ProcKey {
    pub pid: u32,
    pub start: u64,
}

impl ProcStat {
    pub fn key(&self) -> ProcKey {
        ProcKey {
            pid: self.pid,
            start: self.start,
        }
    }

    /// Exited, whether or not reaped yet: holds no resources a job could use.
    pub fn is_dead(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses `/proc/<pid>/stat`. The command name is in parentheses and may hold anything,
/// parentheses and spaces included, so fields are counted from the last `)`.
pub(super) fn parse_stat(text: &str) -> Option<ProcStat> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_once(" (")?.0.trim().parse().ok()?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // proc(5): state is field 3, ppid 4, pgrp 5, session 6, starttime 22.
    let field = |n: usize| fields.get(n - 3).copied();
    Some(ProcStat {
        pid,
        state: field(3)?.chars().next()?,
        ppid: field(4)?.parse().ok()?,
        pgrp: field(5)?.parse().ok()?,
        session: field(6)?.parse().ok()?,
        start: field(22)?.parse().ok()?,
    })
}

/// The process `pid` now, if it exists.
pub(super) fn read_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Pids of this process's children (every thread's: a child belongs to the thread that forked
/// it), zombies included; `None` when the kernel does not list them (CONFIG_PROC_CHILDREN).
pub(super) fn own_children() -> Option<Vec<u32>> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        match std::fs::read_to_string(task.path().join("children")) {
            Ok(text) => pids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            ),
            // A thread that ended since the directory was read.
            Err(_) if !task.path().exists() => {}
            Err(_) => return None,
        }
    }
    Some(pids)
}

/// Every process of this host (of this pid namespace) now. Blocking: call it off the async
/// workers. Processes that exit while it reads are skipped.
pub(super) fn processes() -> Vec<ProcStat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(read_stat)
        .collect()
}

/// Capability numbers (linux/capability.h) the backend needs to run jobs as another user.
pub(super) const CAP_KILL: u32 = 5;
pub(super) const CAP_SETGID: u32 = 6;
pub(super) const CAP_SETUID: u32 = 7;

/// The effective capability set from `/proc/<pid>/status` (`CapEff:` in hex).
pub(super) fn effective_caps(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

/// This process's effective capabilities, or `None` when /proc cannot tell.
pub(super) fn own_effective_caps() -> Option<u64> {
    effective_caps(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// The cgroup v2 path in a `/proc/<pid>/cgroup` text: the `0::<path>` line. `None` on a host
/// without cgroup v2, or for a path outside this cgroup namespace (`/..`).
pub(super) fn cgroup_v2_path(proc_cgroup: &str) -> Option<&str> {
    let path = proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))?
        .trim_end();
    (path.starts_with('/') && !path.split('/').any(|part| part == "..")).then_some(path)
}

/// Where a cgroup v2 path is in the file system, from `/proc/self/mountinfo`: under a cgroup2
/// mount whose root holds it (usually `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid
/// hosts).
pub(super) fn cgroup_v2_dir(mountinfo: &str, path: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = left.split_whitespace();
        let root = unescape(fields.nth(3)?);
        let mount_point = unescape(fields.next()?);
        let below = if root == "/" {
            path.strip_prefix('/')?
        } else {
            path.strip_prefix(root.as_str())?
                .strip_prefix('/')
                .or_else(|| {
                    // The mount's root itself.
                    (path == root).then_some("")
                })?
        };
        Some(PathBuf::from(mount_point).join(below))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal {
            Some(digits) => {
                out.push(
                    digits
                        .iter()
                        .fold(0u8, |n, d| n.wrapping_mul(8) + (d - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_whatever_the_command_name() {
        let line = "4242 (a (weird) name) S 17 4242 4242 0 -1 4194560 100 0 0 0 3 1 0 0 20 0 1 0 \
                    987654 1000 100 18446744073709551615";
        let stat = parse_stat(line).unwrap();
        assert_eq!(
            stat,
            ProcStat {
                pid: 4242,
                state: 'S',
                ppid: 17,
                pgrp: 4242,
                session: 4242,
                start: 987654,
            }
        );
        assert!(!stat.is_dead());
        let zombie = parse_stat(&line.replace(") S ", ") Z ")).unwrap();
        assert!(zombie.is_dead());
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("12 (short) S 1 2"), None);
    }

    #[test]
    fn this_process_parses() {
        let me = read_stat(std::process::id()).unwrap();
        assert_eq!(me.pid, std::process::id());
        assert_eq!(me.ppid, nix::unistd::getppid().as_raw() as u32);
        assert!(processes().iter().any(|p| p.pid == me.pid));
    }

    #[test]
    fn effective_capabilities_come_from_cap_eff() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapPrm:\t00000000000000e0\n\
                      CapEff:\t00000000000000e0\nCapBnd:\t000001ffffffffff\n";
        let caps = effective_caps(status).unwrap();
        for cap in [CAP_KILL, CAP_SETGID, CAP_SETUID] {
            assert_ne!(caps & (1 << cap), 0, "capability {cap}");
        }
        assert_eq!(caps & 1, 0);
        assert_eq!(effective_caps("Name:\tx\n"), None);
        assert!(own_effective_caps().is_some());
    }

    #[test]
    fn cgroup_paths_and_their_directories() {
        assert_eq!(cgroup_v2_path("0::/\n"), Some("/"));
        assert_eq!(
            cgroup_v2_path("12:pids:/x\n1:name=systemd:/y\n0::/system.slice/a.service\n"),
            Some("/system.slice/a.service")
        );
        assert_eq!(cgroup_v2_path("4:memory:/x\n"), None);
        assert_eq!(cgroup_v2_path("0::/../../elsewhere\n"), None);

        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_v2_dir(hybrid, "/"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup_v2_dir(hybrid, "/a/b"),
            Some(PathBuf::from("/sys/fs/cgroup/unified/a/b"))
        );
        // A mount of a subtree (as in some containers): paths are relative to its root.
        let sub = "50 40 0:30 /kubepods/pod1 /sys/fs/cgroup rw shared:1 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_v2_dir(sub, "/kubepods/pod1/c1"),
            Some(PathBuf::from("/sys/fs/cgroup/c1"))
        );
        assert_eq!(
            cgroup_v2_dir(sub, "/kubepods/pod1"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup_v2_dir(sub, "/kubepods/pod10"), None);
        assert_eq!(cgroup_v2_dir(hybrid.lines().next().unwrap(), "/"), None);
        let spaced = "41 31 0:38 / /mnt/cg\\0402 rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup_v2_dir(spaced, "/x"),
            Some(PathBuf::from("/mnt/cg 2/x"))
        );
    }
}
