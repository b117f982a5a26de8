//! The service's secrets (bearer tokens, the job-id signing key, the Convex ingest secret, the
//! Daytona API key): taken from the environment or from files, never from the command line
//! (any process can read `/proc/<pid>/cmdline`), and re-read from their files at run time, on
//! SIGHUP and when a poll sees a file change, so they can be rotated without a restart.
//!
//! Holders keep a secret in a [`Live`] cell that the [`Watcher`] swaps; a read is a pointer copy
//! under an uncontended read lock, cheap next to the request it serves.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

use reqwest::header::HeaderValue;
use tokio::sync::Notify;
use tokio_util::task::AbortOnDropHandle;
use tracing::{error, info, warn};

/// A secret value: shown as `[redacted]` by `Debug`, so it cannot reach logs through a derive.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A value that can be replaced while others use it: clones share it, readers get the current
/// value, [`Live::set`] swaps it for every holder. `Debug` never shows it (it holds secrets).
pub struct Live<T>(Arc<RwLock<Arc<T>>>);

impl<T> Live<T> {
    pub fn new(value: T) -> Self {
        Live(Arc::new(RwLock::new(Arc::new(value))))
    }

    /// The current value (readers in flight keep the one they took).
    pub fn get(&self) -> Arc<T> {
        // A panicking writer cannot leave a half-written Arc, so a poisoned lock is still sound.
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(value);
    }
}

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Live(Arc::clone(&self.0))
    }
}

impl<T> fmt::Debug for Live<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// An HTTP header value made of a prefix and a secret (`Bearer <key>`, or the bare secret),
/// marked sensitive, swappable when the secret is rotated.
#[derive(Clone, Debug)]
pub struct SecretHeader {
    prefix: &'static str,
    value: Live<HeaderValue>,
}

/// The secret contains bytes an HTTP header cannot carry (e.g. a newline or a control byte).
#[derive(Debug, thiserror::Error)]
#[error("contains characters not allowed in an HTTP header")]
pub struct NotAHeader;

impl SecretHeader {
    pub fn new(prefix: &'static str, secret: &Secret) -> Result<Self, NotAHeader> {
        Ok(SecretHeader {
            prefix,
            value: Live::new(header_value(prefix, secret)?),
        })
    }

    /// The value to send now.
    pub fn get(&self) -> HeaderValue {
        (*self.value.get()).clone()
    }

    /// Sends `secret` from the next request on; an unusable one changes nothing.
    pub fn set(&self, secret: &Secret) -> Result<(), NotAHeader> {
        self.value.set(header_value(self.prefix, secret)?);
        Ok(())
    }
}

fn header_value(prefix: &str, secret: &Secret) -> Result<HeaderValue, NotAHeader> {
    let mut value =
        HeaderValue::from_str(&format!("{prefix}{}", secret.expose())).map_err(|_| NotAHeader)?;
    // Keeps it out of any Debug output of a request.
    value.set_sensitive(true);
    Ok(value)
}

/// A secret that cannot be used. Messages name the variable and file, never the content.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{var} and {file_var} are both set: set one")]
    Both {
        var: &'static str,
        file_var: &'static str,
    },
    #[error("{var} ({path}): cannot read it: {error}")]
    Read {
        var: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{var} ({path}): it is not UTF-8 text")]
    NotUtf8 { var: &'static str, path: PathBuf },
    #[error("{var} ({path}): it is empty")]
    Empty { var: &'static str, path: PathBuf },
    #[error("{var} ({path}): {reason}")]
    Invalid {
        var: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// Where one secret comes from: the value of its environment variable (as clap read it), or the
/// file named by its `*_FILE` variable or `--*-file` flag.
#[derive(Debug, Clone, Copy)]
pub struct SecretSource<'a> {
    /// The value's variable, e.g. `SANDBOX_RUNNER_TOKEN`.
    pub var: &'static str,
    /// The file's variable, e.g. `SANDBOX_RUNNER_TOKEN_FILE`.
    pub file_var: &'static str,
    pub value: Option<&'a str>,
    pub file: Option<&'a Path>,
}

impl SecretSource<'_> {
    /// The value now: the variable's, or the file's; `None` when neither is set (an empty
    /// variable counts as unset).
    pub fn read(&self) -> Result<Option<Secret>, SecretError> {
        let value = self.value.filter(|v| !v.is_empty());
        match (value, self.file) {
            (Some(_), Some(_)) => Err(SecretError::Both {
                var: self.var,
                file_var: self.file_var,
            }),
            (Some(v), None) => Ok(Some(Secret(v.to_owned()))),
            (None, Some(path)) => read_file(self.file_var, path).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// True when the variable or the file is set.
    pub fn is_set(&self) -> bool {
        self.value.is_some_and(|v| !v.is_empty()) || self.file.is_some()
    }
}

/// A secret file's value: its text without the trailing newline(s) an editor or `echo` adds.
/// `var` is the file's environment variable (e.g. `SANDBOX_RUNNER_TOKEN_FILE`), for messages.
pub fn read_file(var: &'static str, path: &Path) -> Result<Secret, SecretError> {
    let bytes = std::fs::read(path).map_err(|error| SecretError::Read {
        var,
        path: path.to_owned(),
        error,
    })?;
    parse_file(var, path, bytes)
}

fn parse_file(var: &'static str, path: &Path, bytes: Vec<u8>) -> Result<Secret, SecretError> {
    let mut text = String::from_utf8(bytes).map_err(|_| SecretError::NotUtf8 {
        var,
        path: path.to_owned(),
    })?;
    let kept = text.trim_end_matches(['\n', '\r']).len();
    text.truncate(kept);
    if text.trim().is_empty() {
        return Err(SecretError::Empty {
            var,
            path: path.to_owned(),
        });
    }
    Ok(Secret(text))
}

/// The tokens of a tokens file: one per line or comma-separated; blank lines, empty items and
/// lines starting with `#` are ignored; each token is trimmed.
pub fn parse_tokens(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .flat_map(|line| line.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
        .map(str::to_owned)
        .collect()
}

/// What became of a changed secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// In use from now on.
    Now,
    /// Its holder cannot swap it safely; it takes effect at the next start.
    AtRestart,
}

type Apply = Box<dyn Fn(&Secret) -> Result<Applied, String> + Send + Sync>;

struct Entry {
    var: &'static str,
    path: PathBuf,
    /// The value last applied.
    last: Secret,
    /// The current problem with the file, reported once until it changes.
    problem: Option<String>,
    apply: Apply,
}

/// Re-reads secret files on request (SIGHUP) and every poll interval, and hands changed values
/// to their holders. A file that cannot be read, is empty, or holds a value its holder refuses
/// keeps the value in use and is logged (never its content).
///
/// Polling reads the files rather than watching them with inotify: a few small reads every few
/// seconds cost nothing, and Kubernetes rotates a mounted Secret by swapping a symlink to a new
/// directory, which content comparison follows with no special case.
#[derive(Default)]
pub struct Watcher {
    entries: Vec<Entry>,
}

impl Watcher {
    /// Reads `path` (`var` names it in messages) and hands its value to `apply` now, which makes
    /// the holder agree with the watcher even if the file changed since the holder was built;
    /// then hands it each later, changed value. Fails when the file or its value is unusable.
    pub fn watch(
        &mut self,
        var: &'static str,
        path: &Path,
        apply: impl Fn(&Secret) -> Result<Applied, String> + Send + Sync + 'static,
    ) -> Result<(), SecretError> {
        let value = read_file(var, path)?;
        let applied = apply(&value).map_err(|reason| SecretError::Invalid {
            var,
            path: path.to_owned(),
            reason,
        })?;
        if applied == Applied::AtRestart {
            warn!(file = var, path = %path.display(),
                  "secret file changed since start; it takes effect at the next restart");
        }
        self.entries.push(Entry {
            var,
            path: path.to_owned(),
            last: value,
            problem: None,
            apply: Box::new(apply),
        });
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Re-reads every file once and applies what changed.
    pub async fn check(&mut self) {
        for entry in &mut self.entries {
            let read = match tokio::fs::read(&entry.path).await {
                Ok(bytes) => parse_file(entry.var, &entry.path, bytes),
                Err(error) => Err(SecretError::Read {
                    var: entry.var,
                    path: entry.path.clone(),
                    error,
                }),
            };
            let outcome = match read {
                Err(e) => Err(e.to_string()),
                Ok(value) if value == entry.last => Ok(None),
                // A refused value is offered again at each check (refusing has no effect) and
                // reported once, as its problem does not change.
                Ok(value) => match (entry.apply)(&value) {
                    Ok(applied) => {
                        entry.last = value;
                        Ok(Some(applied))
                    }
                    Err(reason) => Err(SecretError::Invalid {
                        var: entry.var,
                        path: entry.path.clone(),
                        reason,
                    }
                    .to_string()),
                },
            };
            let path = entry.path.display().to_string();
            match outcome {
                Err(problem) => {
                    if entry.problem.as_ref() != Some(&problem) {
                        error!(file = entry.var, %path, error = %problem,
                               "cannot reload a secret file; keeping the value in use");
                        entry.problem = Some(problem);
                    }
                }
                Ok(applied) => {
                    if entry.problem.take().is_some() && applied.is_none() {
                        info!(file = entry.var, %path, "secret file usable again, unchanged");
                    }
                    match applied {
                        None => {}
                        Some(Applied::Now) => {
                            info!(file = entry.var, %path, "secret reloaded")
                        }
                        Some(Applied::AtRestart) => warn!(
                            file = entry.var, %path,
                            "secret file changed; it takes effect at the next restart"
                        ),
                    }
                }
            }
        }
    }

    /// Runs until the handle is dropped: checks every `poll` (`None`: only on `reload`) and on
    /// each `reload` notification.
    pub fn spawn(mut self, poll: Option<Duration>, reload: Arc<Notify>) -> AbortOnDropHandle<()> {
        AbortOnDropHandle::new(tokio::spawn(async move {
            let mut ticks = poll.map(|every| {
                let mut ticks = tokio::time::interval(every);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticks
            });
            loop {
                tokio::select! {
                    _ = reload.notified() => {
                        info!(files = self.entries.len(), "re-reading secret files (SIGHUP)");
                    }
                    _ = async {
                        match ticks.as_mut() {
                            Some(ticks) => { ticks.tick().await; }
                            None => std::future::pending().await,
                        }
                    } => {}
                }
                self.check().await;
            }
        }))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A file under the temp dir, removed on drop.
    pub(crate) struct TempFile(pub PathBuf);

    impl TempFile {
        pub(crate) fn new(content: &str) -> TempFile {
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "sandbox-runner-secret-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, content).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn files_lose_their_trailing_newlines_only() {
        let p = Path::new("/x");
        let parse = |s: &str| parse_file("X_FILE", p, s.as_bytes().to_vec());
        assert_eq!(parse("key\n").unwrap().expose(), "key");
        assert_eq!(parse("key\r\n\n").unwrap().expose(), "key");
        assert_eq!(
            parse(" key with spaces ").unwrap().expose(),
            " key with spaces "
        );
        for empty in ["", "\n", "  \n"] {
            let err = parse(empty).unwrap_err().to_string();
            assert!(err.contains("X_FILE (/x): it is empty"), "{err}");
        }
        let err = parse_file("X_FILE", p, vec![0xff, 0xfe]).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
        let err = read_file("X_FILE", Path::new("/definitely/missing")).unwrap_err();
        assert!(err.to_string().contains("cannot read it"), "{err}");
    }

    #[test]
    fn token_files_take_lines_commas_and_comments() {
        let text = "# rotated 2024-05-01\nold-token\n\n  new-token  \nthird,fourth,\n#gone\n";
        assert_eq!(
            parse_tokens(text),
            ["old-token", "new-token", "third", "fourth"]
        );
        assert!(parse_tokens("# only a comment\n\n").is_empty());
    }

    #[test]
    fn nothing_secret_shows_in_debug() {
        let secret = Secret::from("hunter2".to_owned());
        let header = SecretHeader::new("Bearer ", &secret).unwrap();
        let shown = format!("{secret:?} {header:?} {:?}", Live::new("hunter2"));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(SecretHeader::new("", &Secret::from("a\nb".to_owned())).is_err());
    }

    #[tokio::test]
    async fn the_watcher_applies_changes_and_keeps_the_value_when_a_file_goes_bad() {
        let file = TempFile::new("one\n");
        let held = Live::new(String::from("one"));
        let mut watcher = Watcher::default();
        let target = held.clone();
        watcher
            .watch("X_FILE", &file.0, move |s| {
                if s.expose() == "refused" {
                    return Err("refused by its holder".into());
                }
                target.set(s.expose().to_owned());
                Ok(Applied::Now)
            })
            .unwrap();
        let step = |content: Option<&str>| {
            match content {
                Some(c) => std::fs::write(&file.0, c).unwrap(),
                None => std::fs::remove_file(&file.0).unwrap(),
            };
        };
        watcher.check().await;
        assert_eq!(*held.get(), "one");
        step(Some("two\n"));
        watcher.check().await;
        assert_eq!(*held.get(), "two");
        // Empty, missing, refused: the value in use stays.
        for bad in [Some(""), None, Some("refused")] {
            step(bad);
            watcher.check().await;
            assert_eq!(*held.get(), "two", "{bad:?}");
        }
        step(Some("three"));
        watcher.check().await;
        assert_eq!(*held.get(), "three");
    }

    #[test]
    fn watching_an_unusable_file_fails() {
        let mut watcher = Watcher::default();
        let err = watcher
            .watch("X_FILE", Path::new("/definitely/missing"), |_| {
                Ok(Applied::Now)
            })
            .unwrap_err();
        assert!(
            err.to_string().starts_with("X_FILE (/definitely/missing)"),
            "{err}"
        );
        let file = TempFile::new("value");
        let err = watcher
            .watch("X_FILE", &file.0, |_| Err("too short".into()))
            .unwrap_err();
        assert!(err.to_string().ends_with(": too short"), "{err}");
        assert!(watcher.is_empty());
    }

    #[tokio::test]
    async fn a_reload_request_is_served_without_polling() {
        let file = TempFile::new("one");
        let held = Live::new(String::new());
        let mut watcher = Watcher::default();
        let target = held.clone();
        watcher
            .watch("X_FILE", &file.0, move |s| {
                target.set(s.expose().to_owned());
                Ok(Applied::Now)
            })
            .unwrap();
        assert_eq!(*held.get(), "one", "applied when watching starts");
        let reload = Arc::new(Notify::new());
        let _task = watcher.spawn(None, Arc::clone(&reload));
        std::fs::write(&file.0, "two").unwrap();
        reload.notify_one();
        for _ in 0..500 {
            if *held.get() == "two" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not reloaded");
    }
}
