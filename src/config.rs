//! Service configuration: CLI flags with environment fallbacks, parsed and checked once at start
//! and then passed down (never global).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

/// Which backend runs the jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Processes on this host, one process group per job (needs nothing else).
    Local,
}

impl BackendKind {
    /// Name used in events, Health and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Local => "local",
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
    #[arg(long, env = "DEFAULT_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub default_timeout: Duration,

    /// Largest timeout a request may ask for.
    #[arg(long, env = "MAX_TIMEOUT", default_value = "24h", value_parser = parse_duration)]
    pub max_timeout: Duration,

    /// Time between SIGTERM and SIGKILL when a job is stopped, and how long processes a job's
    /// main process left behind may keep its output open after it exits.
    #[arg(long, env = "CANCEL_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub cancel_grace: Duration,

    /// On SIGTERM/SIGINT, how long running jobs may go on before they are cancelled.
    #[arg(long, env = "DRAIN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub drain_grace: Duration,

    /// How long finished jobs stay queryable by Status.
    #[arg(long, env = "FINISHED_JOB_TTL", default_value = "15m", value_parser = parse_duration)]
    pub finished_job_ttl: Duration,

    /// How many finished jobs stay queryable by Status (oldest are forgotten first).
    #[arg(long, env = "FINISHED_JOB_CAPACITY", default_value_t = 10_000)]
    pub finished_job_capacity: usize,

    /// Events buffered per job between the process and a slow client; when full, the process is
    /// paused by pipe backpressure rather than buffered in memory.
    #[arg(long, env = "STREAM_BUFFER_EVENTS", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub stream_buffer_events: u32,

    /// Largest output chunk read from a process in one go, in bytes.
    #[arg(long, env = "OUTPUT_CHUNK_BYTES", default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u32).range(4096..=(2 << 20)))]
    pub output_chunk_bytes: u32,

    /// The Convex mirror sink (off unless CONVEX_SITE_URL and CONVEX_INGEST_SECRET are set).
    #[command(flatten)]
    pub convex: crate::sink::convex::ConvexArgs,

    /// Working directory of jobs whose request sets none (default: the service's own).
    #[arg(long, env = "DEFAULT_CWD")]
    pub default_cwd: Option<PathBuf>,

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
}

/// A configuration that parsed but makes no sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--default-timeout ({default:?}) must not exceed --max-timeout ({max:?})")]
    DefaultAboveMax { default: Duration, max: Duration },
    #[error("{flag} must be greater than zero")]
    Zero { flag: &'static str },
    #[error(transparent)]
    Convex(#[from] crate::sink::convex::ConvexConfigError),
    #[error("--default-cwd {0} is not a directory")]
    DefaultCwd(PathBuf),
    #[error("SANDBOX_RUNNER_TOKEN contains an empty token (check for stray commas)")]
    EmptyToken,
}

impl Config {
    /// Checks what clap cannot: relations between flags and the state of the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (flag, value) in [
            ("--default-timeout", self.default_timeout),
            ("--max-timeout", self.max_timeout),
            ("--cancel-grace", self.cancel_grace),
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
        if let Some(cwd) = &self.default_cwd
            && !cwd.is_dir()
        {
            return Err(ConfigError::DefaultCwd(cwd.clone()));
        }
        self.convex.settings()?;
        if self.auth_tokens.iter().any(|t| t.trim().is_empty()) {
            return Err(ConfigError::EmptyToken);
        }
        Ok(())
    }

    /// Address to bind.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }
}

fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            (
                &["--convex-site-url", "https://x.convex.site"],
                "CONVEX_INGEST_SECRET is not",
            ),
        ];
        for (args, needle) in cases {
            let err = parse(args).expect_err(&format!("{args:?} should fail"));
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn tokens_split_on_commas() {
        let cfg = parse(&["--auth-tokens", "old,new"]).unwrap();
        assert_eq!(cfg.auth_tokens, ["old", "new"]);
    }
}
