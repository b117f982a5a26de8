//! The client, as subcommands of the same binary: `sandbox-runner exec|attach|status|cancel|
//! ls|health`, a `kubectl exec`-like way to use the service without writing a client.
//!
//! - `exec` (`exec.rs`) streams a job's stdout and stderr byte for byte to its own, forwards
//!   stdin (`-i`) or runs the job on a terminal with the local one in raw mode (`-t`), cancels
//!   the job on Ctrl-C, and exits with the job's code (see [`exit`]).
//! - The other commands print short human output, or JSON with `--json`.

mod exec;
mod terminal;

use std::{ffi::OsString, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::proto::{self as pb, sandbox_service_client::SandboxServiceClient};

/// The first arguments that make the binary a client rather than the server.
pub const SUBCOMMANDS: [&str; 6] = ["exec", "attach", "status", "cancel", "ls", "health"];

/// Exit codes of the client beyond the job's own (0-255, or 128+N for a job killed by signal
/// N), as shells and `timeout(1)` use them.
pub mod exit {
    /// `health`: the service answered but is not serving (draining), as a probe wants.
    pub const NOT_SERVING: u8 = 1;
    /// The job reached its timeout (as `timeout(1)`).
    pub const TIMED_OUT: u8 = 124;
    /// The service could not be reached or failed the request (as `docker run`'s 125).
    pub const SERVICE_ERROR: u8 = 125;
    /// The program could not be started (not found, not executable; as a shell's 126).
    pub const CANNOT_START: u8 = 126;
    /// The job was cancelled (by this client's Ctrl-C or by anyone), or a second Ctrl-C left
    /// without waiting (128 + SIGINT).
    pub const CANCELLED: u8 = 130;
    /// Standard output was closed (`| head -1`): the job was cancelled (128 + SIGPIPE).
    pub const BROKEN_PIPE: u8 = 141;
}

#[derive(Parser)]
#[command(
    name = "sandbox-runner",
    about = "Client of a sandbox-runner service (run `sandbox-runner --help` for the server)"
)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Connection {
    /// The service.
    #[arg(
        long,
        env = "SANDBOX_RUNNER_ADDR",
        default_value = "http://127.0.0.1:5100",
        global = true
    )]
    addr: String,
    /// The bearer token, when the service wants one (visible to other local users in the
    /// process list: prefer the environment variable or --token-file).
    #[arg(
        long,
        env = "SANDBOX_RUNNER_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// A file holding the bearer token.
    #[arg(long, global = true, conflicts_with = "token")]
    token_file: Option<std::path::PathBuf>,
    /// CA certificates (PEM) to trust for an https:// address, instead of the system's.
    #[arg(long, env = "SANDBOX_RUNNER_CA_FILE", global = true)]
    ca_file: Option<std::path::PathBuf>,
    /// A client certificate (PEM) for a service that requires one (mTLS; with --key-file).
    #[arg(long, env = "SANDBOX_RUNNER_CERT_FILE", global = true)]
    cert_file: Option<std::path::PathBuf>,
    /// The private key (PEM) of --cert-file.
    #[arg(long, env = "SANDBOX_RUNNER_KEY_FILE", global = true)]
    key_file: Option<std::path::PathBuf>,
    /// The name the server's certificate must carry, when not the address's host.
    #[arg(long, env = "SANDBOX_RUNNER_TLS_SERVER_NAME", global = true)]
    tls_server_name: Option<String>,
    /// Machine-readable output: JSON (JSON lines for streams).
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a command and streams its output; exits with its exit code.
    Exec(exec::ExecArgs),
    /// Follows a job's output from its start (or after a seq) to its end.
    Attach(exec::AttachArgs),
    /// Reports a job.
    Status { job_id: String },
    /// Cancels a job.
    Cancel { job_id: String },
    /// Lists the service's jobs, newest first.
    Ls(LsArgs),
    /// Reports the service.
    Health,
}

#[derive(Args)]
struct LsArgs {
    /// Only this task's jobs.
    #[arg(long)]
    task: Option<String>,
    /// Only this session's jobs.
    #[arg(long)]
    session: Option<String>,
    /// Only jobs in this state (running, succeeded, failed, cancelled, timed-out).
    #[arg(long)]
    state: Option<String>,
}

/// Runs the client with `args` (the binary's name first); returns the exit code.
pub async fn run(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let client = match connect(&cli.connection).await {
        Ok(client) => client,
        Err(e) => {
            eprintln!("sandbox-runner: {e}");
            return ExitCode::from(exit::SERVICE_ERROR);
        }
    };
    let json = cli.connection.json;
    let result = match cli.command {
        Command::Exec(args) => return exec::exec(client, args, json).await,
        Command::Attach(args) => return exec::attach(client, args, json).await,
        Command::Status { job_id } => status(client, job_id, json).await,
        Command::Cancel { job_id } => cancel(client, job_id, json).await,
        Command::Ls(args) => ls(client, args, json).await,
        Command::Health => health(client, json).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failed::Service(status)) => {
            report(&status);
            ExitCode::from(exit::SERVICE_ERROR)
        }
        Err(Failed::StdoutClosed) => ExitCode::from(exit::BROKEN_PIPE),
        Err(Failed::NotServing) => ExitCode::from(exit::NOT_SERVING),
    }
}

/// Why a command did not complete.
enum Failed {
    Service(Status),
    /// Standard output was closed (`| head`): a quiet end.
    StdoutClosed,
    /// `health` found the service draining.
    NotServing,
}

impl From<Status> for Failed {
    fn from(status: Status) -> Self {
        Failed::Service(status)
    }
}

impl From<std::io::Error> for Failed {
    fn from(_: std::io::Error) -> Self {
        Failed::StdoutClosed
    }
}

/// One line on stdout; an error when stdout is closed (Rust ignores SIGPIPE, so `println!`
/// would panic).
fn print_line(line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()
}

/// A client with the token (if any) on every call.
type Client = SandboxServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Clone)]
struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

async fn connect(connection: &Connection) -> Result<Client, String> {
    let token = match &connection.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        ),
        None => connection.token.clone(),
    };
    let token = token
        .map(|t| format!("Bearer {}", t.trim()).parse())
        .transpose()
        .map_err(|_| "the token is not a valid header value".to_owned())?;
    let endpoint = Endpoint::from_shared(connection.addr.clone())
        .map_err(|e| format!("--addr {:?}: {e}", connection.addr))?;
    let endpoint = match tls_config(connection, endpoint.uri())? {
        Some(tls) => endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS settings: {e}"))?,
        None => endpoint,
    };
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot reach {}: {e}", connection.addr))?;
    Ok(SandboxServiceClient::with_interceptor(
        channel,
        Bearer(token),
    ))
}

/// The TLS settings for an https:// address (`None` for http://).
fn tls_config(
    connection: &Connection,
    uri: &tonic::codegen::http::Uri,
) -> Result<Option<ClientTlsConfig>, String> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    if uri.scheme_str() != Some("https") {
        let tls_flags = connection.ca_file.is_some()
            || connection.cert_file.is_some()
            || connection.key_file.is_some()
            || connection.tls_server_name.is_some();
        return match tls_flags {
            true => Err(format!(
                "TLS settings were given but --addr {:?} is not https://",
                connection.addr
            )),
            false => Ok(None),
        };
    }
    let mut tls = ClientTlsConfig::new();
    tls = match &connection.ca_file {
        Some(path) => tls.ca_certificate(Certificate::from_pem(read(path)?)),
        None => tls.with_native_roots(),
    };
    match (&connection.cert_file, &connection.key_file) {
        (Some(cert), Some(key)) => tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?)),
        (None, None) => {}
        _ => return Err("--cert-file and --key-file go together".to_owned()),
    }
    if let Some(name) = &connection.tls_server_name {
        tls = tls.domain_name(name);
    }
    Ok(Some(tls))
}

fn report(status: &Status) {
    eprintln!("sandbox-runner: {:?}: {}", status.code(), status.message());
}

fn print_json(value: &impl serde::Serialize) -> std::io::Result<()> {
    print_line(&serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")))
}

async fn status(mut client: Client, job_id: String, json: bool) -> Result<(), Failed> {
    let job = client
        .status(pb::StatusRequest { job_id })
        .await?
        .into_inner();
    if json {
        print_json(&job_json(&job))?;
    } else {
        print_line(&job_line(&job))?;
    }
    Ok(())
}

async fn cancel(mut client: Client, job_id: String, json: bool) -> Result<(), Failed> {
    let reply = client
        .cancel(pb::CancelRequest { job_id })
        .await?
        .into_inner();
    // A running job is being stopped (SIGTERM, then SIGKILL after the grace).
    let state = match state_name(reply.state) {
        "running" => "cancelling",
        finished => finished,
    };
    if json {
        print_json(&serde_json::json!({ "jobId": reply.job_id, "state": state }))?;
    } else {
        print_line(&format!("{} {state}", reply.job_id))?;
    }
    Ok(())
}

async fn ls(mut client: Client, args: LsArgs, json: bool) -> Result<(), Failed> {
    let state = match args.state.as_deref() {
        None => pb::JobState::Unspecified,
        Some(name) => parse_state(name)
            .ok_or_else(|| Status::invalid_argument(format!("--state {name:?} is not a state")))?,
    };
    let mut page_token = String::new();
    // Bounded: the service remembers a bounded number of jobs, 500 a page.
    for _ in 0..1000 {
        let page = client
            .list_jobs(pb::ListJobsRequest {
                task_id: args.task.clone().unwrap_or_default(),
                session_id: args.session.clone().unwrap_or_default(),
                state: state as i32,
                page_size: 500,
                page_token,
            })
            .await?
            .into_inner();
        for job in &page.jobs {
            if json {
                print_json(&job_json(job))?;
            } else {
                print_line(&job_line(job))?;
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(())
}

async fn health(mut client: Client, json: bool) -> Result<(), Failed> {
    let health = client.health(pb::HealthRequest {}).await?.into_inner();
    let status = match pb::ServingStatus::try_from(health.status) {
        Ok(pb::ServingStatus::Ok) => "ok",
        Ok(pb::ServingStatus::Draining) => "draining",
        _ => "unknown",
    };
    if json {
        print_json(&serde_json::json!({
            "status": status,
            "activeJobs": health.active_jobs,
            "maxConcurrentJobs": health.max_concurrent_jobs,
            "backend": health.backend,
        }))?;
    } else {
        print_line(&format!(
            "{status}: {} of {} jobs running, backend {}",
            health.active_jobs, health.max_concurrent_jobs, health.backend
        ))?;
    }
    match status {
        "ok" => Ok(()),
        _ => Err(Failed::NotServing),
    }
}

fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Succeeded) => "succeeded",
        Ok(pb::JobState::Failed) => "failed",
        Ok(pb::JobState::Cancelled) => "cancelled",
        Ok(pb::JobState::TimedOut) => "timed-out",
        _ => "unknown",
    }
}

fn parse_state(name: &str) -> Option<pb::JobState> {
    Some(match name {
        "running" => pb::JobState::Running,
        "succeeded" => pb::JobState::Succeeded,
        "failed" => pb::JobState::Failed,
        "cancelled" => pb::JobState::Cancelled,
        "timed-out" | "timed_out" => pb::JobState::TimedOut,
        _ => return None,
    })
}

/// One line per job: id, state, exit, task and session.
fn job_line(job: &pb::StatusResponse) -> String {
    let exit = match (job.exit_code, job.signal) {
        (Some(code), _) => format!(" exit {code}"),
        (None, Some(signal)) => format!(" signal {signal}"),
        _ => String::new(),
    };
    format!(
        "{} {}{exit} task={:?} session={:?} stdout={}B stderr={}B",
        job.job_id,
        state_name(job.state),
        job.task_id,
        job.session_id,
        job.stdout_bytes,
        job.stderr_bytes
    )
}

fn job_json(job: &pb::StatusResponse) -> serde_json::Value {
    serde_json::json!({
        "jobId": job.job_id,
        "state": state_name(job.state),
        "exitCode": job.exit_code,
        "signal": job.signal,
        "taskId": job.task_id,
        "sessionId": job.session_id,
        "sandboxId": job.sandbox_id,
        "stdoutBytes": job.stdout_bytes,
        "stderrBytes": job.stderr_bytes,
        "message": job.message,
    })
}
