//! Service configuration: CLI flags with environment fallbacks, parsed and checked once at start
//! and then passed down (never global).

use std::{net::SocketAddr, time::Duration};

use clap::{CommandFactory, Parser, ValueEnum};

use crate::{
    backend::{
        daytona::{DaytonaArgs, DaytonaConfigError},
        local::{LocalArgs, LocalConfigError},
    },
    sink::convex::{ConvexArgs, ConvexConfigError},
};

/// Which backend runs the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Processes on this host, one process group per job (needs nothing else).
    Local,
    /// Process sessions in Daytona sandboxes (needs DAYTONA_API_KEY; requests name the sandbox).
    Daytona,
}

impl BackendKind {
    /// Name used in events, Health and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Local => "local",
            BackendKind::Daytona => "daytona",
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Everything the service can be told at start.
#[derive(Debug, Clone, Parser)]
#[command(name = "sandbox-runner", version, about, args_override_self = true)]
pub struct Config {
    // LISTEN_HOST rather than HOST: zsh sets HOST to the machine name.
    /// Address to listen on.
    #[arg(long, env = "LISTEN_HOST", default_value = "0.0.0.0")]
    pub host: std::net::IpAddr,

    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "PORT", default_value_t = 5100)]
    pub port: u16,

    /// Backend that runs jobs.
    #[arg(long, env = "SANDBOX_BACKEND", value_enum, default_value_t = BackendKind::Local)]
    pub backend: BackendKind,

    /// Most jobs running at once; further Exec calls get RESOURCE_EXHAUSTED.
    #[arg(long, env = "MAX_CONCURRENT_JOBS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_concurrent_jobs: u32,

    /// Timeout of a job whose request sets none (e.g. 30s, 10m, 1h).
    #[arg(long, env = "DEFAULT_TIMEOUT", default_value = "1h",
          value_parser = humantime::parse_duration)]
    pub default_timeout: Duration,

    /// Largest timeout a request may ask for.
    #[arg(long, env = "MAX_TIMEOUT", default_value = "24h",
          value_parser = humantime::parse_duration)]
    pub max_timeout: Duration,

    /// Time between SIGTERM and SIGKILL when a job is stopped, and how long processes a job's
    /// main process left behind may keep its output open after it exits.
    #[arg(long, env = "CANCEL_GRACE", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub cancel_grace: Duration,

    /// On SIGTERM/SIGINT, how long running jobs may go on before they are cancelled.
    #[arg(long, env = "DRAIN_GRACE", default_value = "20s",
          value_parser = humantime::parse_duration)]
    pub drain_grace: Duration,

    /// How long finished jobs stay queryable by Status.
    #[arg(long, env = "FINISHED_JOB_TTL", default_value = "15m",
          value_parser = humantime::parse_duration)]
    pub finished_job_ttl: Duration,

    /// How many finished jobs stay queryable by Status (oldest are forgotten first).
    #[arg(long, env = "FINISHED_JOB_CAPACITY", default_value_t = 10_000)]
    pub finished_job_capacity: usize,

    /// Events buffered per job between the process and a slow client; when full, the process is
    /// paused by pipe backpressure rather than buffered in memory.
    #[arg(long, env = "STREAM_BUFFER_EVENTS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub stream_buffer_events: u32,

    /// The Convex mirror sink (off unless CONVEX_SITE_URL and CONVEX_INGEST_SECRET are set).
    #[command(flatten, next_help_heading = "Convex mirror")]
    pub convex: ConvexArgs,

    /// Bearer tokens callers must present (comma-separated, several allow rotation). Unset: no
    /// authentication. Never logged.
    #[arg(
        long,
        env = "SANDBOX_RUNNER_TOKEN",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub auth_tokens: Vec<String>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    /// Check the configuration (flags and environment), print a summary and exit without
    /// serving: exit 0 when valid, 64 when not.
    #[arg(long)]
    pub check_config: bool,

    /// Name of this replica, written into the job ids it issues [default: the hostname, which is
    /// the pod name on Kubernetes].
    #[arg(long, env = "REPLICA_NAME")]
    pub replica_name: Option<String>,

    /// Key that signs job ids; give every replica the same one so any replica can verify and
    /// serve ids issued by another. Unset: a random key, valid for this process only. Never
    /// logged.
    #[arg(long, env = "JOB_ID_SIGNING_KEY", hide_env_values = true)]
    pub job_id_signing_key: Option<String>,

    /// Most client connections open at once (further ones are closed at once, after the
    /// oldest connection that never spoke HTTP/2 is closed to make room). Lowered at start when
    /// the open-file limit cannot hold this many beside the jobs' pipes.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// How long a new connection may take to send the HTTP/2 preface before it is closed.
    #[arg(long, env = "HANDSHAKE_TIMEOUT", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Close a connection that has had no open stream for this long (0s: never).
    #[arg(long, env = "IDLE_CONNECTION_TIMEOUT", default_value = "10m",
          value_parser = humantime::parse_duration)]
    pub idle_connection_timeout: Duration,

    /// Close client connections gracefully after this age so load rebalances across replicas
    /// (streams in flight finish first; clients reconnect). Unset: connections live on.
    #[arg(long, env = "MAX_CONNECTION_AGE", value_parser = humantime::parse_duration)]
    pub max_connection_age: Option<Duration>,

    /// The local backend (`--backend local`).
    #[command(flatten, next_help_heading = "Local backend")]
    pub local: LocalArgs,

    /// The Daytona backend (`--backend daytona`).
    #[command(flatten, next_help_heading = "Daytona backend")]
    pub daytona: DaytonaArgs,
}

/// A configuration that parsed but makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--default-timeout ({default:?}) must not exceed --max-timeout ({max:?})")]
    DefaultAboveMax { default: Duration, max: Duration },
    #[error("{flag} must be greater than zero")]
    Zero { flag: &'static str },
    #[error(transparent)]
    Convex(#[from] ConvexConfigError),
    #[error(transparent)]
    Local(#[from] LocalConfigError),
    #[error(transparent)]
    Daytona(#[from] DaytonaConfigError),
    #[error("SANDBOX_RUNNER_TOKEN contains an empty token (check for stray commas)")]
    EmptyToken,
    #[error("JOB_ID_SIGNING_KEY must be at least {MIN_SIGNING_KEY_BYTES} bytes")]
    ShortSigningKey,
    #[error("--replica-name must be 1 to 253 characters without whitespace")]
    ReplicaName,
}

/// Shortest accepted job-id signing key.
pub const MIN_SIGNING_KEY_BYTES: usize = 32;

impl Config {
    /// Checks what clap cannot: relations between flags and the state of the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (flag, value) in [
            ("--default-timeout", self.default_timeout),
            ("--max-timeout", self.max_timeout),
            ("--cancel-grace", self.cancel_grace),
            ("--handshake-timeout", self.handshake_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Zero { flag });
            }
        }
        if self.default_timeout > self.max_timeout {
            return Err(ConfigError::DefaultAboveMax {
                default: self.default_timeout,
                max: self.max_timeout,
            });
        }
        // Each backend's flags are checked only when it is the one selected.
        match self.backend {
            BackendKind::Local => self.local.validate()?,
            BackendKind::Daytona => self.daytona.validate()?,
        }
        self.convex.settings()?;
        if self.auth_tokens.iter().any(|t| t.trim().is_empty()) {
            return Err(ConfigError::EmptyToken);
        }
        if self
            .job_id_signing_key
            .as_ref()
            .is_some_and(|k| k.len() < MIN_SIGNING_KEY_BYTES)
        {
            return Err(ConfigError::ShortSigningKey);
        }
        if let Some(name) = &self.replica_name
            && (name.is_empty()
                || name.len() > 253
                || name.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(ConfigError::ReplicaName);
        }
        if self.max_connection_age.is_some_and(|d| d.is_zero()) {
            return Err(ConfigError::Zero {
                flag: "--max-connection-age",
            });
        }
        Ok(())
    }

    /// Environment variables that carry the service's secrets, which jobs must never inherit:
    /// every flag whose environment value is hidden from `--help`.
    pub fn secret_env_names() -> Vec<String> {
        Config::command()
            .get_arguments()
            .filter(|arg| arg.is_hide_env_values_set())
            .filter_map(|arg| arg.get_env())
            .map(|name| name.to_string_lossy().into_owned())
            .collect()
    }

    /// This replica's name: `--replica-name`, else the hostname.
    pub fn replica(&self) -> String {
        self.replica_name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "sandbox-runner".to_owned())
        })
    }

    /// Address to bind.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::daytona::DEFAULT_DAYTONA_API_URL;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["sandbox-runner"];
        argv.extend_from_slice(args);
        let cfg = Config::try_parse_from(argv).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    #[test]
    fn defaults_match_the_seed_runner() {
        let cfg = parse(&[]).unwrap();
        assert_eq!(cfg.port, 5100);
        assert_eq!(cfg.backend, BackendKind::Local);
    }

    #[test]
    fn bad_values_fail_with_a_reason() {
        let cases: &[(&[&str], &str)] = &[
            (&["--port", "70000"], "70000"),
            (&["--default-timeout", "soon"], "soon"),
            (&["--max-concurrent-jobs", "0"], "0"),
            (&["--cancel-grace", "0s"], "--cancel-grace"),
            (
                &["--default-timeout", "2h", "--max-timeout", "1h"],
                "must not exceed",
            ),
            (
                &["--default-cwd", "/definitely/not/here"],
                "not a directory",
            ),
            (&["--auth-tokens", "a,,b"], "empty token"),
            (&["--backend", "cloud"], "cloud"),
            (&["--backend", "daytona"], "DAYTONA_API_KEY"),
            (
                &[
                    "--backend",
                    "daytona",
                    "--daytona-api-key",
                    "k",
                    "--daytona-api-url",
                    "ftp://x",
                ],
                "http",
            ),
            (&["--job-id-signing-key", "short"], "at least 32"),
            (&["--replica-name", "has space"], "replica-name"),
            (&["--max-connection-age", "0s"], "--max-connection-age"),
            (
                &["--convex-site-url", "https://x.convex.site"],
                "CONVEX_INGEST_SECRET is not",
            ),
            (
                &["--job-user", "no-such-user-here"],
                "--job-user no-such-user-here: no such user",
            ),
            (&["--job-group", "nogroup"], "--job-group needs --job-user"),
            (&["--job-cgroups", "maybe"], "maybe"),
        ];
        for (args, needle) in cases {
            let err = parse(args).expect_err(&format!("{args:?} should fail"));
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn daytona_url_prefers_the_current_name() {
        let cfg = parse(&["--backend", "daytona", "--daytona-api-key", "k"]).unwrap();
        assert_eq!(cfg.daytona.api_url(), DEFAULT_DAYTONA_API_URL);
        let cfg = parse(&["--daytona-server-url", "http://old"]).unwrap();
        assert_eq!(cfg.daytona.api_url(), "http://old");
        let cfg = parse(&[
            "--daytona-server-url",
            "http://old",
            "--daytona-api-url",
            "http://new",
        ])
        .unwrap();
        assert_eq!(cfg.daytona.api_url(), "http://new");
    }

    #[test]
    fn backend_flags_are_checked_only_for_the_selected_backend() {
        // The local backend does not care about a Daytona URL, nor Daytona about a local cwd.
        parse(&["--daytona-api-url", "ftp://x"]).unwrap();
        parse(&[
            "--backend",
            "daytona",
            "--daytona-api-key",
            "k",
            "--default-cwd",
            "/definitely/not/here",
        ])
        .unwrap();
    }

    #[test]
    fn secret_env_names_are_every_hidden_env_value() {
        let mut names = Config::secret_env_names();
        names.sort();
        assert_eq!(
            names,
            [
                "CONVEX_INGEST_SECRET",
                "DAYTONA_API_KEY",
                "JOB_ID_SIGNING_KEY",
                "SANDBOX_RUNNER_TOKEN",
            ]
        );
    }

    #[test]
    fn job_user_flags_are_checked_only_for_the_local_backend() {
        parse(&[
            "--backend",
            "daytona",
            "--daytona-api-key",
            "k",
            "--job-user",
            "no-such-user-here",
        ])
        .unwrap();
    }

    #[test]
    fn tokens_split_on_commas() {
        let cfg = parse(&["--auth-tokens", "old,new"]).unwrap();
        assert_eq!(cfg.auth_tokens, ["old", "new"]);
    }
}
