//! What tests and benchmarks read about processes from /proc (Linux): the members of a process
//! group, the live groups, processes carrying an environment marker, zombie children, CPU
//! time, memory, threads and open file descriptors. A process that is gone reads as nothing (no
//! members, zeros).

/// Pids of live (non-zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(fields) = stat_fields(&stat) else {
            continue;
        };
        if fields.len() > 2 && fields[2] == pgid.to_string() && fields[0] != "Z" {
            members.push(pid);
        }
    }
    members
}

/// Pids of live (non-zombie) processes whose initial environment holds `entry` (`NAME=value`)
/// exactly: how tests find every process a job started, wherever it moved. Needs the right to
/// read their `environ` (same user, or root).
pub fn with_env(entry: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry_dir in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry_dir.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if environ
            .split(|&b| b == 0)
            .any(|var| var == entry.as_bytes())
            && !is_zombie(pid)
        {
            found.push(pid);
        }
    }
    found
}

/// Pids of the zombie children of `ppid`: exited, not yet reaped by it.
pub fn zombie_children(ppid: u32) -> Vec<u32> {
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(fields) = stat_fields(&stat)
            && fields.len() > 1
            && fields[0] == "Z"
            && fields[1] == ppid.to_string()
        {
            zombies.push(pid);
        }
    }
    zombies
}

/// Whether `pid` is a zombie (or gone).
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat_fields(&stat).map(|f| f.first() == Some(&"Z")))
        .unwrap_or(true)
}

/// Process groups with at least one live (non-zombie) member, read in one pass over /proc: for
/// checking many groups at once (`group_members` reads /proc once per group).
pub fn live_groups() -> std::collections::HashSet<u32> {
    let mut groups = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if entry.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some(fields) = stat_fields(&stat)
            && fields.len() > 2
            && fields[0] != "Z"
            && let Ok(pgid) = fields[2].parse()
        {
            groups.insert(pgid);
        }
    }
    groups
}

/// (user, system) CPU seconds that process `pid` has used so far (USER_HZ is 100 on Linux).
pub fn cpu_seconds(pid: u32) -> (f64, f64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<f64> = stat_fields(&text)
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // utime and stime are the 12th and 13th fields after the command name.
    if f.len() < 13 {
        return (0.0, 0.0);
    }
    (f[11] / 100.0, f[12] / 100.0)
}

/// (VmRSS, VmHWM) of process `pid` in KiB: resident memory now and at its peak.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (
        field_kib(&text, "VmRSS").unwrap_or(0),
        field_kib(&text, "VmHWM").unwrap_or(0),
    )
}

/// Threads of process `pid`.
pub fn thread_count(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    // Not in KiB, but the same `Key: number` shape.
    field_kib(&text, "Threads").unwrap_or(0)
}

/// Open file descriptors of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A field of /proc/meminfo in KiB (e.g. `MemTotal`).
pub fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    field_kib(&text, key)
}

/// The fields of a `/proc/<pid>/stat` text after the parenthesised command name, which may hold
/// spaces: state, ppid, pgrp, ... (proc(5) fields 3 onwards).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().collect())
}

/// The number of a `Key:   value kB` line, as in /proc/<pid>/status and /proc/meminfo.
fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}
