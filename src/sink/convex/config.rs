//! The Convex mirror's flags (flattened into the service's `Config`) and their checks.

use std::{path::PathBuf, time::Duration};

use reqwest::Url;

pub use crate::secrets::Secret;
use crate::secrets::{SecretError, SecretHeader, SecretSource};

/// The route the deployed Convex app serves for runner output.
const INGEST_PATH: &str = "daytona-ingest";

/// Flags of the Convex mirror sink. It is on when both the site URL and the secret are set.
#[derive(Debug, Clone, clap::Args)]
pub struct ConvexArgs {
    /// Base URL of the Convex deployment's HTTP actions (https://<deployment>.convex.site). With
    /// CONVEX_INGEST_SECRET, mirrors the output of every job that has a task_id and session_id
    /// to its /daytona-ingest route. Empty counts as unset.
    #[arg(long = "convex-site-url", env = "CONVEX_SITE_URL")]
    pub site_url: Option<String>,

    /// Shared secret sent as the x-ingest-secret header, from the environment only (the flag is
    /// refused, see `Config::load_from`). Never logged. Empty counts as unset.
    #[arg(
        long = "convex-ingest-secret",
        env = "CONVEX_INGEST_SECRET",
        hide = true,
        hide_env_values = true
    )]
    pub ingest_secret: Option<Secret>,

    /// File of the shared secret sent as the x-ingest-secret header (or set
    /// CONVEX_INGEST_SECRET), re-read on SIGHUP and when it changes.
    #[arg(
        long = "convex-ingest-secret-file",
        env = "CONVEX_INGEST_SECRET_FILE",
        value_name = "PATH",
        hide_env_values = true
    )]
    pub ingest_secret_file: Option<PathBuf>,

    /// Most output bytes queued per job for Convex; past it the oldest undelivered output is
    /// dropped and a visible gap marker takes its place.
    #[arg(long = "convex-queue-bytes", env = "CONVEX_QUEUE_BYTES", default_value_t = 8 << 20,
          value_parser = clap::value_parser!(u64).range(65_536..=(1 << 30)))]
    pub queue_bytes: u64,

    /// Most output bytes queued for Convex by all jobs together, beyond one record (64 KiB)
    /// each job may always queue: the mirror's server-wide memory bound. A job that needs more
    /// when it is used up drops its own oldest undelivered output, with a gap marker.
    #[arg(long = "convex-queue-total-bytes", env = "CONVEX_QUEUE_TOTAL_BYTES",
          default_value_t = 64 << 20,
          value_parser = clap::value_parser!(u64).range((1 << 20)..=(64 << 30)))]
    pub queue_total_bytes: u64,

    /// Time limit of one request to the ingest route.
    #[arg(long = "convex-request-timeout", env = "CONVEX_REQUEST_TIMEOUT", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// How long one record is retried (connect errors, timeouts, 429, 5xx) before it is given up
    /// and marked as a gap.
    #[arg(long = "convex-retry-for", env = "CONVEX_RETRY_FOR", default_value = "60s",
          value_parser = humantime::parse_duration)]
    pub retry_for: Duration,
}

/// The mirror's settings once checked.
#[derive(Debug, Clone)]
pub struct ConvexSettings {
    /// `{site}/daytona-ingest`.
    pub ingest_url: Url,
    /// The `x-ingest-secret` value, swapped when the secret file changes.
    pub secret: SecretHeader,
    pub queue_bytes: usize,
    pub queue_total_bytes: usize,
    pub request_timeout: Duration,
    pub retry_for: Duration,
}

/// A Convex configuration that cannot work. Messages name the variables, never the secret.
#[derive(Debug, thiserror::Error)]
pub enum ConvexConfigError {
    #[error(
        "CONVEX_SITE_URL (--convex-site-url) is set but CONVEX_INGEST_SECRET is not (nor \
         CONVEX_INGEST_SECRET_FILE): set both to mirror job output to Convex, or neither"
    )]
    MissingSecret,
    #[error(
        "CONVEX_INGEST_SECRET is set but CONVEX_SITE_URL (--convex-site-url) is not: set both to \
         mirror job output to Convex, or neither"
    )]
    MissingUrl,
    #[error("CONVEX_INGEST_SECRET is not a valid HTTP header value")]
    SecretNotAHeader,
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("CONVEX_SITE_URL {url:?} is not a usable http(s) URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{flag} must be greater than zero")]
    Zero { flag: &'static str },
}

impl ConvexArgs {
    /// True when both variables are set (the sink is on).
    pub fn is_configured(&self) -> bool {
        self.site_url().is_some() && self.secret_source().is_set()
    }

    /// Where the ingest secret comes from.
    pub fn secret_source(&self) -> SecretSource<'_> {
        SecretSource {
            var: "CONVEX_INGEST_SECRET",
            file_var: "CONVEX_INGEST_SECRET_FILE",
            value: self.ingest_secret.as_ref().map(Secret::expose),
            file: self.ingest_secret_file.as_deref(),
        }
    }

    fn site_url(&self) -> Option<&str> {
        self.site_url
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    /// Checks the flags (reading the secret file, if any); `None` when the mirror is off.
    pub fn settings(&self) -> Result<Option<ConvexSettings>, ConvexConfigError> {
        let (site, secret) = match (self.site_url(), self.secret_source().read()?) {
            (None, None) => return Ok(None),
            (Some(_), None) => return Err(ConvexConfigError::MissingSecret),
            (None, Some(_)) => return Err(ConvexConfigError::MissingUrl),
            (Some(site), Some(secret)) => (site, secret),
        };
        let bad = |reason: String| ConvexConfigError::BadUrl {
            url: site.to_owned(),
            reason,
        };
        let base = Url::parse(site).map_err(|e| bad(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(bad(format!(
                "scheme {:?} is not http or https",
                base.scheme()
            )));
        }
        if base.host_str().is_none_or(str::is_empty) {
            return Err(bad("it has no host".into()));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(bad("it must not carry credentials".into()));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(bad("it must not have a query or fragment".into()));
        }
        let ingest_url = Url::parse(&format!(
            "{}/{INGEST_PATH}",
            base.as_str().trim_end_matches('/')
        ))
        .map_err(|e| bad(e.to_string()))?;
        for (flag, value) in [
            ("--convex-request-timeout", self.request_timeout),
            ("--convex-retry-for", self.retry_for),
        ] {
            if value.is_zero() {
                return Err(ConvexConfigError::Zero { flag });
            }
        }
        Ok(Some(ConvexSettings {
            ingest_url,
            secret: SecretHeader::new("", &secret)
                .map_err(|_| ConvexConfigError::SecretNotAHeader)?,
            queue_bytes: usize::try_from(self.queue_bytes).unwrap_or(usize::MAX),
            queue_total_bytes: usize::try_from(self.queue_total_bytes).unwrap_or(usize::MAX),
            request_timeout: self.request_timeout,
            retry_for: self.retry_for,
        }))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        convex: ConvexArgs,
    }

    fn parse(args: &[&str]) -> Result<Option<ConvexSettings>, String> {
        let mut argv = vec!["x"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.convex.settings().map_err(|e| e.to_string())
    }

    #[test]
    fn both_or_neither() {
        assert!(parse(&[]).unwrap().is_none());
        assert!(
            parse(&["--convex-site-url", "", "--convex-ingest-secret", ""])
                .unwrap()
                .is_none()
        );
        let err = parse(&["--convex-site-url", "https://a.convex.site"]).unwrap_err();
        assert!(err.contains("CONVEX_INGEST_SECRET is not"), "{err}");
        let err = parse(&["--convex-ingest-secret", "s3cr3t-value"]).unwrap_err();
        assert!(
            err.contains("CONVEX_SITE_URL (--convex-site-url) is not"),
            "{err}"
        );
        assert!(!err.contains("s3cr3t-value"));
    }

    #[test]
    fn builds_the_ingest_url() {
        for site in ["https://a.convex.site", "https://a.convex.site/"] {
            let s = parse(&["--convex-site-url", site, "--convex-ingest-secret", "k"])
                .unwrap()
                .unwrap();
            assert_eq!(
                s.ingest_url.as_str(),
                "https://a.convex.site/daytona-ingest"
            );
            assert_eq!(s.queue_bytes, 8 << 20);
            assert_eq!(s.queue_total_bytes, 64 << 20);
        }
        for bad in [
            "ftp://x",
            "not a url",
            "https://u:p@x.site",
            "http://x/?a=b",
        ] {
            let err =
                parse(&["--convex-site-url", bad, "--convex-ingest-secret", "k"]).unwrap_err();
            assert!(err.contains("not a usable"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_secret_is_never_shown() {
        let cli = Cli::try_parse_from(["x", "--convex-ingest-secret", "hunter2"]).unwrap();
        assert!(!format!("{:?}", cli.convex).contains("hunter2"));
    }
}
