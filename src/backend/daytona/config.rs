//! The Daytona backend's flags (flattened into the service's `Config`) and their checks.

use std::{path::PathBuf, time::Duration};

use tracing::warn;

use super::DaytonaConfig;
use crate::secrets::{Secret, SecretError, SecretHeader, SecretSource};

/// Default Daytona API, as in Daytona's SDKs.
pub const DEFAULT_DAYTONA_API_URL: &str = "https://app.daytona.io/api";

/// Flags of the Daytona backend (`--backend daytona`).
#[derive(Debug, Clone, clap::Args)]
pub struct DaytonaArgs {
    /// Daytona API key, from the environment only (the flag is refused, see
    /// `Config::load_from`). Never logged.
    #[arg(
        long = "daytona-api-key",
        env = "DAYTONA_API_KEY",
        hide = true,
        hide_env_values = true
    )]
    pub api_key: Option<String>,

    /// File of the Daytona API key (or set DAYTONA_API_KEY); one of them is required by
    /// `--backend daytona`. Re-read on SIGHUP and when it changes.
    #[arg(
        id = "daytona_api_key_file",
        long = "daytona-api-key-file",
        env = "DAYTONA_API_KEY_FILE",
        value_name = "PATH",
        hide_env_values = true
    )]
    pub api_key_file: Option<PathBuf>,

    /// Daytona API base URL [default: https://app.daytona.io/api].
    #[arg(
        id = "daytona_api_url",
        long = "daytona-api-url",
        env = "DAYTONA_API_URL"
    )]
    pub api_url: Option<String>,

    /// Deprecated name of DAYTONA_API_URL, used only when that is unset.
    #[arg(
        id = "daytona_server_url",
        long = "daytona-server-url",
        env = "DAYTONA_SERVER_URL",
        hide = true
    )]
    pub server_url: Option<String>,

    /// Start a stopped sandbox instead of failing the job with FAILED_PRECONDITION.
    #[arg(
        id = "daytona_auto_start",
        long = "daytona-auto-start",
        env = "DAYTONA_AUTO_START"
    )]
    pub auto_start: bool,

    /// How long to wait for a sandbox being started to reach `started`.
    #[arg(id = "daytona_start_timeout", long = "daytona-start-timeout",
          env = "DAYTONA_START_TIMEOUT",
          default_value = "60s", value_parser = humantime::parse_duration)]
    pub start_timeout: Duration,

    /// Timeout of each call to the Daytona API.
    #[arg(id = "daytona_request_timeout", long = "daytona-request-timeout",
          env = "DAYTONA_REQUEST_TIMEOUT",
          default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// How often to poll a command's exit code and log when its log stream is unavailable.
    #[arg(id = "daytona_poll_interval", long = "daytona-poll-interval",
          env = "DAYTONA_POLL_INTERVAL",
          default_value = "250ms", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,
}

/// A Daytona configuration that cannot work. Messages name the variables, never the key.
#[derive(Debug, thiserror::Error)]
pub enum DaytonaConfigError {
    #[error(
        "--backend daytona needs DAYTONA_API_KEY or DAYTONA_API_KEY_FILE (--daytona-api-key-file)"
    )]
    MissingKey,
    #[error("DAYTONA_API_KEY contains characters not allowed in a header")]
    KeyNotAHeader,
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("Daytona API URL {0:?} must start with http:// or https://")]
    Url(String),
    #[error("{flag} must be greater than zero")]
    Zero { flag: &'static str },
}

impl DaytonaArgs {
    /// True when an API key is present (in the environment, or as a file).
    pub fn is_configured(&self) -> bool {
        self.api_key
            .as_deref()
            .is_some_and(|k| !k.trim().is_empty())
            || self.api_key_file.is_some()
    }

    /// Where the API key comes from.
    pub fn key_source(&self) -> SecretSource<'_> {
        SecretSource {
            var: "DAYTONA_API_KEY",
            file_var: "DAYTONA_API_KEY_FILE",
            value: self.api_key.as_deref(),
            file: self.api_key_file.as_deref(),
        }
    }

    /// The API key now (reading its file, if any).
    fn key(&self) -> Result<Secret, DaytonaConfigError> {
        self.key_source()
            .read()?
            .filter(|k| !k.expose().trim().is_empty())
            .ok_or(DaytonaConfigError::MissingKey)
    }

    /// The `Authorization` header value of an API key.
    pub fn auth_header(key: &Secret) -> Result<SecretHeader, DaytonaConfigError> {
        SecretHeader::new("Bearer ", key).map_err(|_| DaytonaConfigError::KeyNotAHeader)
    }

    /// The API URL: DAYTONA_API_URL, else the deprecated DAYTONA_SERVER_URL, else the public
    /// API. The one place that knows about the alias.
    pub fn api_url(&self) -> &str {
        self.api_url
            .as_deref()
            .or(self.server_url.as_deref())
            .unwrap_or(DEFAULT_DAYTONA_API_URL)
    }

    /// Checks the flags; only called when the Daytona backend is selected.
    pub fn validate(&self) -> Result<(), DaytonaConfigError> {
        Self::auth_header(&self.key()?)?;
        let url = self.api_url();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(DaytonaConfigError::Url(url.to_owned()));
        }
        for (flag, value) in [
            ("--daytona-start-timeout", self.start_timeout),
            ("--daytona-request-timeout", self.request_timeout),
            ("--daytona-poll-interval", self.poll_interval),
        ] {
            if value.is_zero() {
                return Err(DaytonaConfigError::Zero { flag });
            }
        }
        Ok(())
    }

    /// The backend's settings (reading the key file, if any); warns (once, at start) when the
    /// deprecated URL name is used.
    pub fn settings(&self) -> Result<DaytonaConfig, DaytonaConfigError> {
        if self.api_url.is_none() && self.server_url.is_some() {
            warn!("DAYTONA_SERVER_URL is deprecated; set DAYTONA_API_URL instead");
        }
        Ok(DaytonaConfig {
            api_url: self.api_url().to_owned(),
            api_key: Self::auth_header(&self.key()?)?,
            auto_start: self.auto_start,
            start_timeout: self.start_timeout,
            request_timeout: self.request_timeout,
            poll_interval: self.poll_interval,
        })
    }
}
