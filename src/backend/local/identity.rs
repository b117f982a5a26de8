//! Who jobs run as (`--job-user`, `--job-group`): resolved and checked once at start, so a
//! server that could not switch to that identity refuses to start instead of failing every job.
//!
//! Jobs under another uid than the server's cannot signal it, ptrace it, or read its /proc
//! entries and its files. Switching needs CAP_SETUID and CAP_SETGID (root has them), and
//! signalling the jobs afterwards (Cancel, timeouts) needs CAP_KILL.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use nix::unistd::{Group, Uid, User};

use super::{
    LocalConfigError,
    procfs::{self, CAP_KILL, CAP_SETGID, CAP_SETUID},
};

/// The user and group jobs run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobIdentity {
    pub uid: u32,
    pub gid: u32,
    /// The user's name, when the user database knows the uid (for USER and LOGNAME).
    pub name: Option<String>,
    /// The user's home directory, when the user database knows the uid (for HOME).
    pub home: Option<PathBuf>,
}

impl JobIdentity {
    /// `uid` with its name in parentheses when known, for messages.
    pub fn describe(&self) -> String {
        match &self.name {
            Some(name) => format!("{name} (uid {}, gid {})", self.uid, self.gid),
            None => format!("uid {}, gid {}", self.uid, self.gid),
        }
    }
}

/// Looks up `--job-user` and `--job-group` (names or numeric ids). A numeric user that the user
/// database does not know is accepted (containers often have none) but then needs a group.
pub(super) fn resolve(user: &str, group: Option<&str>) -> Result<JobIdentity, LocalConfigError> {
    let lookup = |e: nix::Error| LocalConfigError::UserLookup(user.to_owned(), e.to_string());
    let (uid, entry) = match user.parse::<u32>() {
        Ok(uid) => (uid, User::from_uid(Uid::from_raw(uid)).map_err(lookup)?),
        Err(_) => {
            let entry = User::from_name(user)
                .map_err(lookup)?
                .ok_or_else(|| LocalConfigError::UnknownUser(user.to_owned()))?;
            (entry.uid.as_raw(), Some(entry))
        }
    };
    let gid = match (group, &entry) {
        (Some(group), _) => resolve_group(group)?,
        (None, Some(entry)) => entry.gid.as_raw(),
        (None, None) => return Err(LocalConfigError::UserWithoutGroup(uid)),
    };
    Ok(JobIdentity {
        uid,
        gid,
        name: entry.as_ref().map(|e| e.name.clone()),
        home: entry.map(|e| e.dir),
    })
}

fn resolve_group(group: &str) -> Result<u32, LocalConfigError> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    Group::from_name(group)
        .map_err(|e| LocalConfigError::UserLookup(group.to_owned(), e.to_string()))?
        .map(|g| g.gid.as_raw())
        .ok_or_else(|| LocalConfigError::UnknownGroup(group.to_owned()))
}

/// Checks that this process can start jobs as `identity` and still stop them.
pub(super) fn check_can_switch(identity: &JobIdentity) -> Result<(), LocalConfigError> {
    let own = Uid::effective().as_raw();
    if identity.uid == 0 {
        return Err(LocalConfigError::RootJobUser);
    }
    if identity.uid == own {
        return Err(LocalConfigError::SameUser(own));
    }
    // Root usually holds every capability, but a container may have dropped them: ask the
    // kernel rather than the uid.
    let missing = match procfs::own_effective_caps() {
        Some(caps) => missing_capabilities(caps),
        None => return Err(LocalConfigError::UnknownCapabilities),
    };
    if !missing.is_empty() {
        return Err(LocalConfigError::CannotSwitch {
            user: identity.describe(),
            missing: missing.join(", "),
        });
    }
    Ok(())
}

/// The capabilities of [`CAP_SETUID`], [`CAP_SETGID`] and [`CAP_KILL`] absent from an
/// effective set.
pub(super) fn missing_capabilities(effective: u64) -> Vec<&'static str> {
    [
        (CAP_SETUID, "CAP_SETUID"),
        (CAP_SETGID, "CAP_SETGID"),
        (CAP_KILL, "CAP_KILL"),
    ]
    .into_iter()
    .filter(|(cap, _)| effective & (1 << cap) == 0)
    .map(|(_, name)| name)
    .collect()
}

/// Checks that `dir` can be a job's working directory: the job user may search it and every
/// directory above it. Jobs run with no supplementary groups, so only the owner, the group and
/// the others bits count.
pub(super) fn check_usable_dir(dir: &Path, identity: &JobIdentity) -> Result<(), LocalConfigError> {
    let unusable = |reason: String| LocalConfigError::DirNotUsable {
        dir: dir.to_path_buf(),
        user: identity.describe(),
        reason,
    };
    let dir = dir
        .canonicalize()
        .map_err(|e| unusable(format!("cannot resolve it: {e}")))?;
    for ancestor in dir.ancestors() {
        let meta = std::fs::metadata(ancestor)
            .map_err(|e| unusable(format!("cannot read {}: {e}", ancestor.display())))?;
        if !may_search(meta.mode(), meta.uid(), meta.gid(), identity) {
            return Err(unusable(format!(
                "{} (mode {:o}, owner {}:{}) is not searchable by it",
                ancestor.display(),
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid()
            )));
        }
    }
    Ok(())
}

/// Whether a directory with this mode and owner grants search (execute) permission to
/// `identity`.
fn may_search(mode: u32, owner: u32, group: u32, identity: &JobIdentity) -> bool {
    let bit = if owner == identity.uid {
        0o100
    } else if group == identity.gid {
        0o010
    } else {
        0o001
    };
    mode & bit != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nobody() -> JobIdentity {
        JobIdentity {
            uid: 65534,
            gid: 65534,
            name: None,
            home: None,
        }
    }

    #[test]
    fn capability_bits_name_what_is_missing() {
        let all = (1 << CAP_SETUID) | (1 << CAP_SETGID) | (1 << CAP_KILL);
        assert!(missing_capabilities(all).is_empty());
        assert!(missing_capabilities(0x1ff_ffff_ffff).is_empty());
        assert_eq!(
            missing_capabilities(0),
            ["CAP_SETUID", "CAP_SETGID", "CAP_KILL"]
        );
        assert_eq!(
            missing_capabilities(1 << CAP_KILL),
            ["CAP_SETUID", "CAP_SETGID"]
        );
        assert_eq!(missing_capabilities(all & !(1 << CAP_KILL)), ["CAP_KILL"]);
    }

    #[test]
    fn search_permission_follows_owner_group_other() {
        let id = nobody();
        // Owner bits apply to the owner only, even when they deny what others may.
        assert!(may_search(0o700, 65534, 0, &id));
        assert!(!may_search(0o077, 65534, 65534, &id));
        assert!(may_search(0o710, 0, 65534, &id));
        assert!(!may_search(0o701, 0, 65534, &id));
        assert!(may_search(0o755, 0, 0, &id));
        assert!(!may_search(0o750, 0, 0, &id));
    }

    #[test]
    fn directories_need_search_permission_all_the_way_down() {
        let id = nobody();
        check_usable_dir(Path::new("/"), &id).unwrap();
        check_usable_dir(Path::new("/tmp"), &id).unwrap();
        let base = std::env::temp_dir().join(format!("identity-test-{}", std::process::id()));
        let inner = base.join("inner");
        std::fs::create_dir_all(&inner).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700)).unwrap();
        let owner = std::fs::metadata(&base).unwrap().uid();
        let err = check_usable_dir(&inner, &id).unwrap_err().to_string();
        if owner != id.uid {
            assert!(err.contains("not searchable"), "{err}");
        }
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o711)).unwrap();
        check_usable_dir(&inner, &id).unwrap();
        std::fs::remove_dir_all(&base).unwrap();
        let err = check_usable_dir(Path::new("/no/such/dir"), &id).unwrap_err();
        assert!(err.to_string().contains("cannot resolve"), "{err}");
    }

    #[test]
    fn users_and_groups_resolve_by_name_or_number() {
        let root = resolve("root", None).unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(root.name.as_deref(), Some("root"));
        assert_eq!(resolve("0", Some("12345")).unwrap().gid, 12345);
        assert!(matches!(
            resolve("no-such-user-here", None),
            Err(LocalConfigError::UnknownUser(_))
        ));
        assert!(matches!(
            resolve("root", Some("no-such-group-here")),
            Err(LocalConfigError::UnknownGroup(_))
        ));
        // A uid the user database does not know has no primary group to default to.
        assert!(matches!(
            resolve("4000000000", None),
            Err(LocalConfigError::UserWithoutGroup(4000000000))
        ));
        let numeric = resolve("4000000000", Some("4000000000")).unwrap();
        assert_eq!(
            (numeric.uid, numeric.gid, numeric.name),
            (4000000000, 4000000000, None)
        );
    }
}
