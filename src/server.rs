//! Assembles the service and serves it until shutdown: `run` is the one entry point shared by
//! `main` and the tests.

use std::{future::Future, sync::Arc, time::Duration, time::Instant};

use tokio::{net::TcpListener, sync::Notify};
use tonic::server::NamedService;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::{
    backend::{
        daytona::{ClientSetupError, DaytonaBackend},
        local::{JobPriority, LocalBackend, LocalConfig},
    },
    config::{BackendKind, Config, ConfigError, tokens_of_file},
    connection::{ConnInfo, ConnectionLimits, Incoming, StreamCountLayer},
    grpc::{
        auth::BearerAuth,
        service::{InstanceInfo, SandboxApi},
    },
    job::{Backend, JobIdCodec, Jobs, JobsConfig, LogLimits},
    proto::{self as pb, sandbox_service_server::SandboxServiceServer},
    secrets::{Applied, SecretError, Watcher},
    sink::convex::SinkSetupError,
    tls::{Accepted, ServerTls, TlsError},
};

/// Serves `/metrics` on `port` (see `metrics`); `None` when the process has another recorder.
async fn serve_metrics(
    host: std::net::IpAddr,
    port: u16,
    jobs: &Arc<Jobs>,
) -> Result<Option<tokio_util::task::AbortOnDropHandle<std::io::Result<()>>>, ServerError> {
    let Some(handle) = crate::metrics::recorder() else {
        warn!("another metrics recorder is installed in this process: no /metrics");
        return Ok(None);
    };
    let listener = TcpListener::bind((host, port))
        .await
        .map_err(|source| ServerError::Metrics { port, source })?;
    info!(addr = %listener.local_addr().map_err(ServerError::Listener)?, "serving /metrics");
    let served = crate::metrics::serve(listener, handle, Arc::clone(jobs), std::future::pending());
    Ok(Some(tokio_util::task::AbortOnDropHandle::new(
        tokio::spawn(served),
    )))
}

/// How long connections may take to close once every job has ended, before the server returns
/// anyway (e.g. a client that stopped reading its stream).
const CONNECTION_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Client→server HTTP/2 connection window; see its use.
const CONNECTION_WINDOW: u32 = 16 << 20;

/// Ways serving can fail.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot read the listener's address: {0}")]
    Listener(#[source] std::io::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("cannot set up the Convex mirror: {0}")]
    Sink(#[from] crate::sink::convex::SinkSetupError),
    #[error("cannot listen for metrics on port {port}: {source}")]
    Metrics {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot set up the Daytona backend: {0}")]
    Daytona(#[from] ClientSetupError),
    #[error("invalid local backend configuration: {0}")]
    Local(#[from] crate::backend::local::LocalConfigError),
    #[error("no OS randomness for the job-id signing key: {0}")]
    Randomness(String),
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot set up TLS: {0}")]
    Tls(#[from] TlsError),
}

impl From<SecretError> for ServerError {
    fn from(e: SecretError) -> Self {
        ServerError::Config(e.into())
    }
}

/// Serves on `listener` until `shutdown` completes, then drains: health turns NOT_SERVING, new
/// jobs are refused, running jobs get `config.drain_grace` and are then cancelled, sinks flush,
/// connections close. Secret files are re-read every `--secret-poll-interval`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_with_reload(listener, config, shutdown, Arc::new(Notify::new())).await
}

/// [`run`], also re-reading the secret files whenever `reload` is notified (`main` does on
/// SIGHUP).
pub async fn run_with_reload(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reload: Arc<Notify>,
) -> Result<(), ServerError> {
    let addr = listener.local_addr().map_err(ServerError::Listener)?;
    let mut secret_files = Watcher::default();
    let auth = auth(&config, &mut secret_files)?;
    if !auth.is_enabled() && !addr.ip().is_loopback() {
        warn!(
            %addr,
            "NO AUTHENTICATION: anyone who can reach {addr} can run arbitrary commands on this \
             host. Set SANDBOX_RUNNER_TOKEN, or listen on 127.0.0.1 (--host)."
        );
    }

    let tls = server_tls(&config, &mut secret_files)?;
    let backend = backend(&config, &mut secret_files)?;
    let convex = config.convex.settings().map_err(SinkSetupError::from)?;
    if let (Some(settings), Some(path)) = (&convex, config.convex.secret_source().file) {
        let header = settings.secret.clone();
        secret_files.watch("CONVEX_INGEST_SECRET_FILE", path, move |secret| {
            header.set(secret).map_err(|e| e.to_string())?;
            Ok(Applied::Now)
        })?;
    }
    let sinks = crate::sink::convex::sinks(convex.as_ref())?;
    let replica = config.replica();
    let signing_key = match config.signing_key()? {
        Some(key) => {
            if let Some(path) = config.signing_key_source().file {
                // Ids issued with the old key would stop verifying (NOT_FOUND), here and on
                // every replica not yet rotated: the key changes at a restart only.
                let in_use = key.clone();
                secret_files.watch("JOB_ID_SIGNING_KEY_FILE", path, move |secret| {
                    Ok(if *secret == in_use {
                        Applied::Now
                    } else {
                        Applied::AtRestart
                    })
                })?;
            }
            key.expose().as_bytes().to_vec()
        }
        None => {
            info!(
                "JOB_ID_SIGNING_KEY is unset: job ids are signed with a random key and only this \
                 process can serve them; set the same key on every replica"
            );
            let mut key = vec![0u8; 32];
            getrandom::fill(&mut key).map_err(|e| ServerError::Randomness(e.to_string()))?;
            key
        }
    };
    let jobs = Jobs::new(
        backend,
        JobIdCodec::new(&signing_key, &replica),
        sinks.clone(),
        JobsConfig {
            max_concurrent: config.max_concurrent_jobs,
            default_timeout: config.default_timeout,
            max_timeout: config.max_timeout,
            log_limits: LogLimits {
                max_bytes: config.job_log_bytes as usize,
                max_events: config.job_log_events as usize,
            },
            keepalive: config.stream_keepalive,
            finished_ttl: config.finished_job_ttl,
            finished_capacity: config.finished_job_capacity,
            stopped_client_grace: config.cancel_grace,
            output_budget_bytes: config.output_budget_bytes as usize,
            output_reserve_bytes: config.output_reserve_bytes as usize,
            retained_output_bytes: config.retained_output_bytes as usize,
            follow_idle: config.follow_idle,
            watchers_bytes_per_sec: (config.watchers_bytes_per_sec > 0)
                .then_some(config.watchers_bytes_per_sec),
        },
    );
    // Ended until shutdown; the sweep only ever deletes what ended jobs left behind.
    let sweeper = (!config.session_sweep_interval.is_zero()).then(|| {
        let jobs = Arc::clone(&jobs);
        let interval = config.session_sweep_interval;
        tokio::spawn(async move { jobs.sweep_every(interval).await })
    });
    let info = InstanceInfo {
        started: Instant::now(),
        daytona_configured: config.daytona.is_configured(),
        convex_configured: config.convex.is_configured(),
        convex_sink: crate::sink::convex::NAME,
    };
    let rest = crate::rest::router(crate::rest::RestState {
        jobs: Arc::clone(&jobs),
        info: info.clone(),
        auth: auth.clone(),
    });
    let api = SandboxApi::new(Arc::clone(&jobs), info);

    let service_name = <SandboxServiceServer<SandboxApi> as NamedService>::NAME;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_service_status(service_name, ServingStatus::Serving)
        .await;

    // Both reflection versions: grpcurl 1.8 asks v1alpha, newer clients v1.
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    // Served until `run` returns (the guard aborts it).
    let _metrics = match config.metrics_port {
        Some(port) => serve_metrics(config.host, port, &jobs).await?,
        None => None,
    };
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let drain_grace = config.drain_grace;
    let drain = async move {
        shutdown.await;
        info!("shutdown requested: refusing new jobs and reporting NOT_SERVING");
        health
            .set_service_status(service_name, ServingStatus::NotServing)
            .await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        if let Some(sweeper) = &sweeper {
            sweeper.abort();
        }
        jobs.drain(drain_grace).await;
        sinks.flush(drain_grace).await;
        info!("drained; closing connections");
        let _ = drained_tx.send(());
    };

    // Polls only when there is something to poll; SIGHUP is always answered (and logged).
    let poll = (!secret_files.is_empty() && !config.secret_poll_interval.is_zero())
        .then_some(config.secret_poll_interval);
    let _secret_watch = secret_files.spawn(poll, reload);

    let connection_limits = connection_limits(&config);
    info!(%addr, backend = config.backend.as_str(), auth = auth.is_enabled(),
          tls = tls.is_some(), mtls = config.tls_client_ca_file.is_some(), %replica, "listening");
    let accepted = Accepted::new(
        Incoming::new(listener, connection_limits),
        tls,
        config.handshake_timeout,
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(age) = config.max_connection_age {
        // Streams still open when the age is reached get this long to finish.
        builder = builder
            .max_connection_age(age)
            .max_connection_age_grace(config.max_timeout);
    }
    let server = builder
        // Detects clients that vanished without closing the connection, so their jobs stop.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // h2 closes a connection (GOAWAY ENHANCE_YOUR_CALM "too_many_data_frames") once unread
        // small DATA frames exceed half the connection window: with hyper's 1 MiB, ~2,400 Exec
        // requests started at once on one connection. Requests are tiny, so a larger window
        // costs nothing; 16 MiB allows ~38,000.
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        // Each request's log lines carry what it was and, over mTLS, who asked; with traces
        // on, it is the request's span, continuing the caller's trace.
        .trace_fn(request_span)
        .layer(tower::util::MapResponseLayer::new(
            crate::grpc::codec::oversize_as_resource_exhausted,
        ))
        .layer(StreamCountLayer::default())
        .layer(crate::metrics::RpcMetricsLayer::default())
        // REST (the Node runner's API, Server-Sent Events) on the same port: HTTP/1.1 too.
        .accept_http1(true)
        // The REST routes first, with a JSON 404 for unknown paths (see `rest`); the gRPC
        // services are added to them.
        .add_routes(
            tonic::service::Routes::from(rest.fallback(crate::rest::not_found))
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .add_service(SandboxServiceServer::with_interceptor(api, auth)),
        )
        .serve_with_incoming_shutdown(accepted, drain);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result?,
        _ = async {
            if drained_rx.await.is_ok() {
                tokio::time::sleep(CONNECTION_CLOSE_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => warn!("connections still open {CONNECTION_CLOSE_GRACE:?} after draining; closing them"),
    }
    info!("server stopped");
    Ok(())
}

/// The span of one request (gRPC or REST), named and attributed as OpenTelemetry's semantic
/// conventions say (`rpc.*` for gRPC, `http.*` for REST; REST spans are named by method only, as
/// paths carry job ids).
fn request_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let caller = request
        .extensions()
        .get::<ConnInfo>()
        .and_then(|info| info.client.clone());
    let path = request.uri().path();
    let is_grpc = request
        .headers()
        .get(tonic::codegen::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let span = match (is_grpc, path.trim_start_matches('/').split_once('/')) {
        (true, Some((service, method))) => tracing::info_span!(
            "request",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            path,
            caller = caller.as_deref(),
        ),
        _ => tracing::info_span!(
            "request",
            otel.name = %request.method(),
            otel.kind = "server",
            http.request.method = %request.method(),
            url.path = path,
            path,
            caller = caller.as_deref(),
        ),
    };
    crate::telemetry::continue_trace(&span, request.headers());
    span
}

/// Reflection over this service and the health service.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Descriptors kept free for the server itself (listener, log, HTTP clients).
const RESERVED_FDS: u64 = 64;
/// Descriptors a running local job holds in the server (stdout and stderr pipes, the child).
const FDS_PER_JOB: u64 = 4;
/// The cap is never lowered below this, so a tiny fd limit still serves someone.
const MIN_CONNECTIONS: u64 = 16;

/// The open-file limit's soft value (the server raised it to the hard limit at start).
fn fd_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(u64::MAX, |(soft, _)| soft)
}

/// How `fd_limit` descriptors are shared between connections and running local jobs (4 each),
/// beside the server's own: as configured when they fit; otherwise connections keep what
/// they asked for up to a quarter of what is left (at least `MIN_CONNECTIONS`), and jobs run
/// at once as many as the rest holds (at least one; the others wait to be spawned).
fn descriptor_shares(fd_limit: u64, wanted_connections: u64, max_jobs: u32) -> (u64, u64) {
    let max_jobs = u64::from(max_jobs);
    let available = fd_limit.saturating_sub(RESERVED_FDS);
    if wanted_connections + FDS_PER_JOB * max_jobs <= available {
        return (wanted_connections, max_jobs);
    }
    let connections = wanted_connections.min((available / 4).max(MIN_CONNECTIONS));
    let jobs = (available.saturating_sub(connections) / FDS_PER_JOB).clamp(1, max_jobs.max(1));
    (connections, jobs)
}

/// The connection bounds: `--max-connections`, lowered when the open-file limit could not
/// hold that many connections beside the jobs (accepting past it would fail with EMFILE).
fn connection_limits(config: &Config) -> ConnectionLimits {
    let wanted = u64::from(config.max_connections);
    let fd_limit = fd_limit();
    let (room, _) = descriptor_shares(fd_limit, wanted, config.max_concurrent_jobs);
    if room < wanted {
        warn!(
            max_connections = wanted,
            fd_limit,
            lowered_to = room,
            "the open-file limit cannot hold --max-connections beside the jobs; lowering it"
        );
    }
    ConnectionLimits {
        max_connections: room as usize,
        handshake_timeout: config.handshake_timeout,
        idle_timeout: (!config.idle_connection_timeout.is_zero())
            .then_some(config.idle_connection_timeout),
    }
}

/// Local jobs that may run at once when the open-file limit cannot hold
/// `--max-concurrent-jobs` of them beside the server and its connections: jobs admitted
/// beyond wait for one to end (a spawn would otherwise fail with EMFILE).
fn running_slots(config: &Config) -> Option<usize> {
    let fd_limit = fd_limit();
    let (_, slots) = descriptor_shares(
        fd_limit,
        u64::from(config.max_connections),
        config.max_concurrent_jobs,
    );
    if slots >= u64::from(config.max_concurrent_jobs) {
        return None;
    }
    warn!(
        max_concurrent_jobs = config.max_concurrent_jobs,
        fd_limit,
        running_at_once = slots,
        "the open-file limit cannot hold --max-concurrent-jobs running jobs; jobs beyond wait \
         to be spawned"
    );
    Some(slots as usize)
}

/// The server's TLS, when configured; its files are watched so a rotation reaches new
/// connections.
fn server_tls(
    config: &Config,
    secret_files: &mut Watcher,
) -> Result<Option<ServerTls>, ServerError> {
    let Some(files) = config.tls_files() else {
        return Ok(None);
    };
    let tls = ServerTls::load(files.clone())?;
    let watched = [("TLS_CERT_FILE", files.cert), ("TLS_KEY_FILE", files.key)]
        .into_iter()
        .chain(files.client_ca.map(|ca| ("TLS_CLIENT_CA_FILE", ca)));
    for (var, path) in watched {
        let tls = tls.clone();
        // Whichever file changed, all are read again: a certificate and its key change together.
        secret_files.watch(var, &path, move |_| {
            tls.reload().map_err(|e| e.to_string())?;
            Ok(Applied::Now)
        })?;
    }
    Ok(Some(tls))
}

/// Bearer authentication with the configured tokens; a tokens file is watched for rotation.
fn auth(config: &Config, secret_files: &mut Watcher) -> Result<BearerAuth, ServerError> {
    let auth = BearerAuth::new(&config.auth_tokens()?);
    if let Some(path) = config.auth_tokens_source().file {
        let holder = auth.clone();
        secret_files.watch("SANDBOX_RUNNER_TOKEN_FILE", path, move |text| {
            holder.set_tokens(&tokens_of_file(text)?)?;
            Ok(Applied::Now)
        })?;
    }
    Ok(auth)
}

fn backend(config: &Config, secret_files: &mut Watcher) -> Result<Arc<dyn Backend>, ServerError> {
    Ok(match config.backend {
        BackendKind::Local => Arc::new(LocalBackend::new(LocalConfig {
            default_cwd: config.local.default_cwd.clone(),
            grace: config.cancel_grace,
            chunk_bytes: config.local.output_chunk_bytes as usize,
            withheld_env: Config::secret_env_names(),
            identity: config.local.job_identity()?,
            cgroups: config.local.job_cgroups,
            subreaper: config.local.subreaper,
            max_running: running_slots(config),
            priority: JobPriority::with_nice(config.local.job_nice),
        })),
        BackendKind::Daytona => {
            let settings = config.daytona.settings().map_err(ConfigError::from)?;
            if let Some(path) = config.daytona.key_source().file {
                let header = settings.api_key.clone();
                secret_files.watch("DAYTONA_API_KEY_FILE", path, move |key| {
                    header.set(key).map_err(|e| e.to_string())?;
                    Ok(Applied::Now)
                })?;
            }
            Arc::new(DaytonaBackend::new(settings)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_and_running_jobs_share_the_descriptors() {
        // Room for all: as configured.
        assert_eq!(descriptor_shares(1 << 20, 4096, 256), (4096, 256));
        assert_eq!(descriptor_shares(256, 8, 8), (8, 8));
        // nofile=256: connections at most a quarter of the 192 left, jobs the rest.
        assert_eq!(descriptor_shares(256, 4096, 256), (48, 36));
        // The load bench here: 20,000 descriptors, 164 connections, 10,064 jobs admitted.
        assert_eq!(descriptor_shares(20_000, 164, 10_064), (164, 4_943));
        // A limit too small for anything still serves a few connections and one job.
        assert_eq!(descriptor_shares(64, 4096, 256), (MIN_CONNECTIONS, 1));
    }
}
