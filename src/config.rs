//! Service configuration: CLI flags with environment fallbacks, parsed and checked once at start
//! and then passed down (never global).

use std::{ffi::OsString, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum, parser::ValueSource};

use crate::{
    backend::{
        daytona::{DaytonaArgs, DaytonaConfigError},
        local::{LocalArgs, LocalConfigError},
    },
    secrets::{Secret, SecretError, SecretSource, parse_tokens},
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
#[command(
    name = "sandbox-runner",
    version,
    about,
    args_override_self = true,
    after_help = "Client commands: sandbox-runner exec|attach|status|cancel|ls|health \
                  (each with --help)."
)]
pub struct Config {
    // LISTEN_HOST rather than HOST: zsh sets HOST to the machine name.
    /// Address to listen on.
    #[arg(long, env = "LISTEN_HOST", default_value = "0.0.0.0")]
    pub host: std::net::IpAddr,

    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "PORT", default_value_t = 5100)]
    pub port: u16,

    /// Serve Prometheus metrics at `/metrics` on this port (same address as the service).
    /// Unset: no metrics endpoint.
    #[arg(long, env = "METRICS_PORT")]
    pub metrics_port: Option<u16>,

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

    /// On SIGTERM/SIGINT, how long running jobs may go on before they are cancelled (or, for
    /// detached Daytona jobs and jobs followed from other replicas, left running).
    #[arg(long, env = "DRAIN_GRACE", default_value = "20s",
          value_parser = humantime::parse_duration)]
    pub drain_grace: Duration,

    /// How long this replica follows a job started elsewhere (an Attach to another replica's
    /// Daytona job) with nobody attached here, before it stops following (the job runs on).
    #[arg(long, env = "FOLLOW_IDLE", default_value = "30s",
          value_parser = humantime::parse_duration)]
    pub follow_idle: Duration,

    /// How often the Daytona sessions of jobs that ended at least --finished-job-ttl ago are
    /// swept (whichever replica ran them); 0 turns the sweep off.
    #[arg(long, env = "SESSION_SWEEP_INTERVAL", default_value = "60s",
          value_parser = humantime::parse_duration)]
    pub session_sweep_interval: Duration,

    /// How long finished jobs stay queryable by Status.
    #[arg(long, env = "FINISHED_JOB_TTL", default_value = "15m",
          value_parser = humantime::parse_duration)]
    pub finished_job_ttl: Duration,

    /// How many finished jobs stay queryable by Status (oldest are forgotten first).
    #[arg(long, env = "FINISHED_JOB_CAPACITY", default_value_t = 10_000)]
    pub finished_job_capacity: usize,

    /// Output bytes each job's event log holds, within the output budget. Readers resume from
    /// what it holds; with a reader attached and behind, a full log pauses the job; with none,
    /// the oldest output is evicted (a later reader is told exactly what it lost). Keep it
    /// several output chunks large: it is also how far a job may read ahead of its reader
    /// (with 1 MiB, one chunk, live throughput fell to 0.5x-0.7x).
    #[arg(long, env = "JOB_LOG_BYTES", default_value_t = 8 << 20,
          value_parser = clap::value_parser!(u64).range((64 << 10)..=(1 << 30)))]
    pub job_log_bytes: u64,

    /// Events each job's event log holds (as for `--job-log-bytes`).
    #[arg(long, env = "JOB_LOG_EVENTS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(16..=(1 << 20)))]
    pub job_log_events: u32,

    /// How long an Exec or Attach stream may be silent before it gets a keepalive event, so
    /// that proxies with idle timeouts do not cut it.
    #[arg(long, env = "STREAM_KEEPALIVE", default_value = "15s",
          value_parser = humantime::parse_duration)]
    pub stream_keepalive: Duration,

    /// Output held in memory for callers, all jobs together: what a job reads waits here
    /// until its caller takes it. When it is used up, jobs whose callers do not read stop being
    /// read (their processes block on full pipes); nothing is dropped.
    #[arg(long, env = "OUTPUT_BUDGET_BYTES", default_value_t = 64 << 20,
          value_parser = clap::value_parser!(u64).range((1 << 20)..=(64 << 30)))]
    pub output_budget_bytes: u64,

    /// Output each job may hold however much of the shared budget others use, so a new job is
    /// never starved by stalled ones. Memory for output is bounded by
    /// OUTPUT_BUDGET_BYTES + MAX_CONCURRENT_JOBS x this. A job whose caller stopped reading
    /// runs on its reserve, and each such job costs about 3.4x it in server memory (the chunk
    /// in the log, tonic's encoded copy of it, the read buffer): at 64 KiB, 1,000 stalled
    /// streams held 418 MiB; at 32 KiB, 311 MiB.
    #[arg(long, env = "OUTPUT_RESERVE_BYTES", default_value_t = 32 << 10,
          value_parser = clap::value_parser!(u64).range(4096..=(16 << 20)))]
    pub output_reserve_bytes: u64,

    /// Output the logs of finished jobs keep together, for late readers (the tail and the
    /// exit), within the output budget: past it the oldest give theirs up first. Bounds what a
    /// burst of jobs leaves in memory for --finished-job-ttl.
    #[arg(long, env = "RETAINED_OUTPUT_BYTES", default_value_t = 16 << 20,
          value_parser = clap::value_parser!(u64).range(0..=(64 << 30)))]
    pub retained_output_bytes: u64,

    /// Output sent to all watchers together (Attach with `lossless: false`), bytes per second;
    /// 0 for no bound. Watchers never hold a job back, but serving them costs the CPU, the
    /// memory and the network the jobs and their callers need: on 2 cores, 100 unbounded
    /// watchers of one job writing flat out slowed it to 0.03x; at 64 MiB/s, 0.90x and +104 MiB;
    /// at 16 MiB/s, 1.04x and +56 MiB. A watcher that falls a whole log behind gets a gap.
    /// Callers and lossless readers are never bound by it.
    #[arg(long, env = "WATCHERS_BYTES_PER_SEC", default_value_t = 16 << 20,
          value_parser = clap::value_parser!(u64).range(0..=(1 << 40)))]
    pub watchers_bytes_per_sec: u64,

    /// The Convex mirror sink (off unless CONVEX_SITE_URL and CONVEX_INGEST_SECRET are set).
    #[command(flatten, next_help_heading = "Convex mirror")]
    pub convex: ConvexArgs,

    // Secrets come from the environment or from files, never from flags (any process can read
    // a command line): `Config::load_from` refuses each secret's flag, which is hidden here; its
    // variable stays. Every variable with a hidden value is withheld from jobs
    // (`secret_env_names`), the `*_FILE` ones too: a job has no use for where secrets live.
    /// Bearer tokens callers must present (comma-separated, several allow rotation), from the
    /// environment only. Never logged.
    #[arg(
        long,
        env = "SANDBOX_RUNNER_TOKEN",
        hide = true,
        hide_env_values = true
    )]
    pub auth_tokens: Option<String>,

    /// File of the bearer tokens callers must present (one per line or comma-separated; blank
    /// lines and # comments ignored), re-read on SIGHUP and when it changes; or set
    /// SANDBOX_RUNNER_TOKEN. Neither: no authentication.
    #[arg(
        long,
        env = "SANDBOX_RUNNER_TOKEN_FILE",
        value_name = "PATH",
        hide_env_values = true
    )]
    pub auth_tokens_file: Option<PathBuf>,

    /// How often secret files are re-read to pick up a rotation (they are also re-read on
    /// SIGHUP); 0s: only on SIGHUP.
    #[arg(long, env = "SECRET_POLL_INTERVAL", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub secret_poll_interval: Duration,

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

    /// Key that signs job ids, from the environment only. Never logged.
    #[arg(long, env = "JOB_ID_SIGNING_KEY", hide = true, hide_env_values = true)]
    pub job_id_signing_key: Option<String>,

    /// File of the key that signs job ids (at least 32 bytes; or set JOB_ID_SIGNING_KEY); give
    /// every replica the same one so any replica can verify and serve ids issued by another.
    /// Read at start only. Neither: a random key, valid for this process only.
    #[arg(
        long,
        env = "JOB_ID_SIGNING_KEY_FILE",
        value_name = "PATH",
        hide_env_values = true
    )]
    pub job_id_signing_key_file: Option<PathBuf>,

    /// Most client connections open at once (further ones are closed at once, after the
    /// oldest connection that never spoke HTTP/2 is closed to make room). Lowered at start when
    /// the open-file limit cannot hold this many beside the jobs' pipes.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Serve TLS with this certificate chain (PEM, leaf first; with --tls-key-file). Re-read
    /// when it changes (and on SIGHUP): new connections get the new certificate.
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert-file.
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,

    /// Require client certificates (mTLS) that chain to these CA certificates (PEM). The
    /// certificate's subject is the caller's identity in logs.
    #[arg(long, env = "TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,

    /// How long a new connection may take to send the HTTP/2 preface (or to finish its TLS
    /// handshake) before it is closed.
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
    #[error("the job-id signing key must be at least {MIN_SIGNING_KEY_BYTES} bytes")]
    ShortSigningKey,
    #[error(
        "{flag} is refused: a command line is readable by every process on the host \
         (/proc/<pid>/cmdline). Set {var} in the environment, or put the secret in a file and \
         pass {file_flag} (or {var}_FILE)"
    )]
    SecretFlag {
        flag: String,
        var: String,
        file_flag: String,
    },
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("--replica-name must be 1 to 253 characters without whitespace")]
    ReplicaName,
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Shortest accepted job-id signing key.
pub const MIN_SIGNING_KEY_BYTES: usize = 32;

/// Why the binary refuses to start with its command line and environment.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Unparsable: clap's message, exit 2 (or `--help`, `--version`).
    #[error(transparent)]
    Usage(#[from] clap::Error),
    /// Parsed but refused: exit 64.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

impl Config {
    /// The binary's configuration: parses `args` and the environment, refuses a secret given as
    /// a flag, then validates. (In-process callers that build a `Config` with
    /// `try_parse_from` have no command line to leak and may pass secrets as flags.)
    pub fn load_from<I, T>(args: I) -> Result<Config, LoadError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut matches = Config::command().try_get_matches_from(args)?;
        refuse_secret_flags(&matches)?;
        let config = Config::from_arg_matches_mut(&mut matches)
            .map_err(|e| e.format(&mut Config::command()))?;
        config.validate()?;
        Ok(config)
    }

    /// Where the bearer tokens come from.
    pub fn auth_tokens_source(&self) -> SecretSource<'_> {
        SecretSource {
            var: "SANDBOX_RUNNER_TOKEN",
            file_var: "SANDBOX_RUNNER_TOKEN_FILE",
            value: self.auth_tokens.as_deref(),
            file: self.auth_tokens_file.as_deref(),
        }
    }

    /// The bearer tokens to accept now (empty: no authentication).
    pub fn auth_tokens(&self) -> Result<Vec<String>, ConfigError> {
        // Set but empty is a mistake (e.g. a missing Secret key), never "authentication off".
        if self.auth_tokens.as_deref() == Some("") {
            return Err(ConfigError::EmptyToken);
        }
        let source = self.auth_tokens_source();
        let Some(text) = source.read()? else {
            return Ok(Vec::new());
        };
        match source.file {
            Some(path) => tokens_of_file(&text).map_err(|reason| {
                SecretError::Invalid {
                    var: source.file_var,
                    path: path.to_owned(),
                    reason,
                }
                .into()
            }),
            None => {
                let tokens: Vec<String> = text.expose().split(',').map(str::to_owned).collect();
                if tokens.iter().any(|t| t.trim().is_empty()) {
                    return Err(ConfigError::EmptyToken);
                }
                Ok(tokens)
            }
        }
    }

    /// Where the job-id signing key comes from.
    pub fn signing_key_source(&self) -> SecretSource<'_> {
        SecretSource {
            var: "JOB_ID_SIGNING_KEY",
            file_var: "JOB_ID_SIGNING_KEY_FILE",
            value: self.job_id_signing_key.as_deref(),
            file: self.job_id_signing_key_file.as_deref(),
        }
    }

    /// The job-id signing key now, when one is set.
    pub fn signing_key(&self) -> Result<Option<Secret>, ConfigError> {
        // Set but empty is too short, as before files existed; not "use a random key".
        if self.job_id_signing_key.as_deref() == Some("") {
            return Err(ConfigError::ShortSigningKey);
        }
        let key = self.signing_key_source().read()?;
        if key
            .as_ref()
            .is_some_and(|k| k.expose().len() < MIN_SIGNING_KEY_BYTES)
        {
            return Err(ConfigError::ShortSigningKey);
        }
        Ok(key)
    }

    /// Checks what clap cannot: relations between flags and the state of the host.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (flag, value) in [
            ("--default-timeout", self.default_timeout),
            ("--max-timeout", self.max_timeout),
            ("--cancel-grace", self.cancel_grace),
            ("--handshake-timeout", self.handshake_timeout),
            ("--stream-keepalive", self.stream_keepalive),
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
        self.auth_tokens()?;
        self.signing_key()?;
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
        if let Some(files) = self.tls_files() {
            crate::tls::ServerTls::load(files)?;
        }
        Ok(())
    }

    /// Environment variables that carry the service's secrets, or the paths of their files,
    /// which jobs must never inherit: every argument whose environment value is hidden from
    /// `--help`.
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
    /// The files of the server's TLS, when it serves TLS.
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert_file.clone()?,
            key: self.tls_key_file.clone()?,
            client_ca: self.tls_client_ca_file.clone(),
        })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }
}

/// The tokens of a tokens file; one that holds none is refused (it must never turn
/// authentication off).
pub fn tokens_of_file(text: &Secret) -> Result<Vec<String>, String> {
    let tokens = parse_tokens(text.expose());
    if tokens.is_empty() {
        return Err("it holds no token (only blank lines or # comments)".into());
    }
    Ok(tokens)
}

/// Refuses a secret's value given on the command line. The secrets are the arguments whose
/// environment value is hidden, except their `--*-file` twins, which only name files.
fn refuse_secret_flags(matches: &ArgMatches) -> Result<(), ConfigError> {
    for arg in Config::command().get_arguments() {
        let (Some(long), Some(var)) = (arg.get_long(), arg.get_env()) else {
            continue;
        };
        if !arg.is_hide_env_values_set() || long.ends_with("-file") {
            continue;
        }
        if matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            return Err(ConfigError::SecretFlag {
                flag: format!("--{long}"),
                var: var.to_string_lossy().into_owned(),
                file_flag: format!("--{long}-file"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{backend::daytona::DEFAULT_DAYTONA_API_URL, secrets::tests::TempFile};

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
            (&["--auth-tokens", ""], "empty token"),
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
            (&["--job-id-signing-key", ""], "at least 32"),
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
                "CONVEX_INGEST_SECRET_FILE",
                "DAYTONA_API_KEY",
                "DAYTONA_API_KEY_FILE",
                "JOB_ID_SIGNING_KEY",
                "JOB_ID_SIGNING_KEY_FILE",
                "SANDBOX_RUNNER_TOKEN",
                "SANDBOX_RUNNER_TOKEN_FILE",
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
        assert_eq!(cfg.auth_tokens().unwrap(), ["old", "new"]);
    }

    fn load(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["sandbox-runner"];
        argv.extend_from_slice(args);
        Config::load_from(argv).map_err(|e| e.to_string())
    }

    #[test]
    fn secrets_given_as_flags_are_refused_naming_the_variable_and_the_file_flag() {
        let long_key = "k".repeat(MIN_SIGNING_KEY_BYTES);
        let cases: &[(&[&str], &str, &str)] = &[
            (
                &["--auth-tokens", "t0ken"],
                "SANDBOX_RUNNER_TOKEN",
                "--auth-tokens-file",
            ),
            (
                &["--job-id-signing-key", &long_key],
                "JOB_ID_SIGNING_KEY",
                "--job-id-signing-key-file",
            ),
            (
                &[
                    "--convex-site-url",
                    "https://a.convex.site",
                    "--convex-ingest-secret",
                    "t0ken",
                ],
                "CONVEX_INGEST_SECRET",
                "--convex-ingest-secret-file",
            ),
            (
                &["--backend", "daytona", "--daytona-api-key", "t0ken"],
                "DAYTONA_API_KEY",
                "--daytona-api-key-file",
            ),
        ];
        for (args, var, file_flag) in cases {
            let err = load(args).expect_err(&format!("{args:?} should be refused"));
            assert!(err.contains(&args[args.len() - 2].to_string()), "{err}");
            assert!(err.contains(&format!("Set {var} ")), "{err}");
            assert!(err.contains(file_flag), "{err}");
            assert!(!err.contains("t0ken") && !err.contains(&long_key), "{err}");
            let refused = Config::load_from(std::iter::once("x").chain(args.iter().copied()));
            assert!(matches!(refused, Err(LoadError::Invalid(_))), "{args:?}");
        }
        // The secret flags are not advertised.
        let help = Config::command().render_long_help().to_string();
        assert!(!help.contains("--auth-tokens "), "{help}");
        assert!(help.contains("--auth-tokens-file"), "{help}");
        // Flags that name files are fine, and unparsable input is still a usage error.
        assert!(matches!(
            Config::load_from(["x", "--port", "nope"]),
            Err(LoadError::Usage(_))
        ));
    }

    #[test]
    fn secrets_come_from_files() {
        let tokens = TempFile::new("# rotated weekly\nold-token\nnew-token,third\n\n");
        let key = TempFile::new(&format!("{}\n", "k".repeat(MIN_SIGNING_KEY_BYTES)));
        let convex = TempFile::new("ingest\n");
        let daytona = TempFile::new("dtn_key\n");
        let path = |f: &TempFile| f.0.to_str().unwrap().to_owned();
        let cfg = load(&[
            "--auth-tokens-file",
            &path(&tokens),
            "--job-id-signing-key-file",
            &path(&key),
            "--convex-site-url",
            "https://a.convex.site",
            "--convex-ingest-secret-file",
            &path(&convex),
            "--backend",
            "daytona",
            "--daytona-api-key-file",
            &path(&daytona),
        ])
        .unwrap();
        assert_eq!(
            cfg.auth_tokens().unwrap(),
            ["old-token", "new-token", "third"]
        );
        assert_eq!(
            cfg.signing_key().unwrap().unwrap().expose(),
            "k".repeat(MIN_SIGNING_KEY_BYTES)
        );
        assert!(cfg.convex.is_configured() && cfg.daytona.is_configured());
        let settings = cfg.convex.settings().unwrap().unwrap();
        assert_eq!(settings.secret.get(), "ingest");
        assert_eq!(
            cfg.daytona.settings().unwrap().api_key.get(),
            "Bearer dtn_key"
        );
    }

    #[test]
    fn unusable_secret_files_fail_naming_the_file_not_the_content() {
        let comments = TempFile::new("# nothing yet\n\n");
        let short = TempFile::new("short-key-s3cr3t\n");
        let empty = TempFile::new("\n");
        let path = |f: &TempFile| f.0.to_str().unwrap().to_owned();
        let cases: Vec<(Vec<String>, &str)> = vec![
            (
                vec!["--auth-tokens-file".into(), path(&comments)],
                "SANDBOX_RUNNER_TOKEN_FILE",
            ),
            (
                vec!["--auth-tokens-file".into(), "/definitely/missing".into()],
                "cannot read it",
            ),
            (
                vec!["--job-id-signing-key-file".into(), path(&short)],
                "at least 32",
            ),
            (
                vec![
                    "--backend".into(),
                    "daytona".into(),
                    "--daytona-api-key-file".into(),
                    path(&empty),
                ],
                "DAYTONA_API_KEY_FILE",
            ),
            (
                vec![
                    "--convex-site-url".into(),
                    "https://a.convex.site".into(),
                    "--convex-ingest-secret-file".into(),
                    path(&empty),
                ],
                "it is empty",
            ),
            // A value and a file for one secret: ambiguous.
            (
                vec![
                    "--auth-tokens".into(),
                    "a".into(),
                    "--auth-tokens-file".into(),
                    path(&comments),
                ],
                "SANDBOX_RUNNER_TOKEN and SANDBOX_RUNNER_TOKEN_FILE are both set",
            ),
        ];
        for (args, needle) in cases {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let err = parse(&args).expect_err(&format!("{args:?} should fail"));
            assert!(err.contains(needle), "{args:?}: {err}");
            assert!(!err.contains("s3cr3t"), "{err}");
        }
    }
}
