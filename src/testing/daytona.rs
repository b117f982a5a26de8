//! A fake Daytona API for tests and benchmarks: a real HTTP + WebSocket server on loopback that
//! follows research/daytona-api.md section 6 and really runs the commands it is given, as local
//! processes, so output, exit codes and timing are real.
//!
//! Reproduced: the `/api` and `/toolbox/{sandboxId}` surfaces with Bearer auth; sandbox states,
//! start and the sandbox list (`GET /api/sandbox`, an array of DTOs); session create (201, 409
//! duplicate, 400 `entrypoint`), list (`GET /process/session`, sessions with their commands)
//! and delete (204, kills the command's group); async exec (202 with a uuid `cmdId`); `exitCode` absent while running;
//! per-line `01 01 01`/`02 02 02` log markers with a newline added to a final partial line; a
//! JSON plain log GET; a WebSocket follower that replays from byte 0 in binary frames of at
//! most 1 KiB and closes with 1000 shortly after the exit; a command's `/input` (204, a newline
//! added when missing, echoed into the log unless the exec asked `suppressInputEcho`, 410 once
//! the command completed). Terminal sessions (`/process/pty`, research/peers-2026.md section 2)
//! run `/bin/sh -i` (the daemon runs `$SHELL -i -l`) on a real pseudo-terminal, made its
//! controlling terminal by `setsid -c`: create (201, 409 duplicate, 400 beyond 1000 rows or
//! columns), resize (410 once exited), delete (kills its process group) and the WebSocket
//! (`connected` first, binary output frames of at most 32 KiB, client frames typed into the
//! terminal, a 256-slot queue per client closed with 1008 "slow consumer" when full, no replay,
//! exit as close 1000 for status 0 or 1011 with `{exitCode, exitReason}`). Fault switches cover
//! the known failure modes.

// Handlers return ready-made error responses through `Result`; their size does not matter here.
#![allow(clippy::result_large_err)]

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::{backend::local::winsize, job::TerminalSize};
use axum::{
    Json, Router,
    extract::{
        Path, Request, State,
        ws::{
            CloseFrame, Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
        },
    },
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    net::TcpListener,
    process::Command,
};

/// Switches that make the fake misbehave the way Daytona is known to.
#[derive(Debug, Default)]
pub struct Faults {
    /// Every request gets 401 (a revoked API key).
    pub unauthorized: AtomicBool,
    /// WebSocket upgrades of the log follower get 502 (seen behind some proxies).
    pub refuse_log_stream: AtomicBool,
    /// The follower closes right after the exit without sending the last bytes of the log.
    pub lose_log_tail: AtomicBool,
    /// Log frames get odd sizes so markers are split across frames.
    pub split_frames: AtomicBool,
    /// Exec answers 202 but the session shell is dead: nothing runs, no exit code ever appears.
    pub dead_shell: AtomicBool,
    /// Extra delay before every API answer, in milliseconds.
    pub api_delay_ms: AtomicU64,
    /// The next N GETs answer 503 (transient failures that a client should retry).
    pub transient_get_failures: AtomicUsize,
    /// Sandbox DTOs lack `toolboxProxyUrl`, as from APIs older than v0.148.
    pub legacy_sandbox_dto: AtomicBool,
    /// Terminal streams send the newer `{"type":"control","status":"exited"}` message, ahead of
    /// all output still queued for the client (the overtaking research/peers-2026.md infers):
    /// output is held in the queue until the exit, then follows the message.
    pub pty_exit_message_first: AtomicBool,
    /// A terminal client whose queue took this many output bytes is treated as having filled its
    /// queue: closed with 1008 "slow consumer", the rest of the output discarded (0: off).
    pub pty_slow_consumer_after_bytes: AtomicUsize,
}

/// A running fake.
pub struct FakeDaytona {
    /// Base URL of the API, as `DAYTONA_API_URL` (`http://127.0.0.1:PORT/api`).
    pub api_url: String,
    pub api_key: String,
    state: Arc<Fake>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeDaytona {
    fn drop(&mut self) {
        self.server.abort();
    }
}

struct Fake {
    api_key: String,
    base: String,
    faults: Faults,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
    created_sessions: Mutex<Vec<String>>,
    deleted_sessions: Mutex<Vec<String>>,
    /// Every session DELETE, answered 204 or 404.
    delete_requests: Mutex<Vec<String>>,
    /// Session creates refused as duplicates (409).
    conflicts: Mutex<Vec<String>>,
    /// Every terminal session DELETE received.
    pty_deletes: Mutex<Vec<String>>,
}

#[derive(Default)]
struct Sandbox {
    state: String,
    sessions: HashMap<String, HashMap<String, Arc<CommandRun>>>,
    /// Terminal sessions, until deleted (an exited one stays, answering 410).
    ptys: HashMap<String, Arc<PtyRun>>,
}

struct CommandRun {
    command: String,
    log: Mutex<Vec<u8>>,
    exit: Mutex<Option<i32>>,
    pgid: Mutex<Option<u32>>,
    /// Set when its session is deleted: followers close.
    gone: AtomicBool,
    /// Its stdin, open for `/input` while it runs (the daemon's FIFO).
    stdin: tokio::sync::Mutex<Option<tokio::process::ChildStdin>>,
    /// `/input` is not copied into the log.
    suppress_input_echo: bool,
}

impl FakeDaytona {
    /// Starts the fake on 127.0.0.1:0 with one API key.
    pub async fn start(api_key: &str) -> FakeDaytona {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake Daytona");
        let addr: SocketAddr = listener.local_addr().unwrap();
        let state = Arc::new(Fake {
            api_key: api_key.to_owned(),
            base: format!("http://{addr}"),
            faults: Faults::default(),
            sandboxes: Mutex::new(HashMap::new()),
            created_sessions: Mutex::new(Vec::new()),
            deleted_sessions: Mutex::new(Vec::new()),
            delete_requests: Mutex::new(Vec::new()),
            conflicts: Mutex::new(Vec::new()),
            pty_deletes: Mutex::new(Vec::new()),
        });
        let pty = "/toolbox/{sandbox}/process/pty";
        let toolbox = "/toolbox/{sandbox}/process/session";
        let app = Router::new()
            .route("/api/sandbox", get(list_sandboxes))
            .route("/api/sandbox/{sandbox}", get(get_sandbox))
            .route("/api/sandbox/{sandbox}/start", post(start_sandbox))
            .route(
                "/api/sandbox/{sandbox}/toolbox-proxy-url",
                get(toolbox_proxy_url),
            )
            .route(toolbox, post(create_session).get(list_sessions))
            .route(
                &format!("{toolbox}/{{session}}"),
                get(get_session).delete(delete_session),
            )
            .route(&format!("{toolbox}/{{session}}/exec"), post(exec))
            .route(
                &format!("{toolbox}/{{session}}/command/{{command}}"),
                get(get_command),
            )
            .route(
                &format!("{toolbox}/{{session}}/command/{{command}}/logs"),
                get(logs),
            )
            .route(
                &format!("{toolbox}/{{session}}/command/{{command}}/input"),
                post(input),
            )
            .route(pty, post(create_pty))
            .route(&format!("{pty}/{{id}}"), axum::routing::delete(delete_pty))
            .route(&format!("{pty}/{{id}}/resize"), post(resize_pty))
            .route(&format!("{pty}/{{id}}/connect"), get(connect_pty))
            .layer(middleware::from_fn_with_state(
                Arc::clone(&state),
                auth_and_faults,
            ))
            .with_state(Arc::clone(&state));
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("fake Daytona serves");
        });
        FakeDaytona {
            api_url: format!("http://{addr}/api"),
            api_key: api_key.to_owned(),
            state,
            server,
        }
    }

    /// Adds (or resets) a sandbox in `state` ("started", "stopped", ...).
    pub fn add_sandbox(&self, id: &str, state: &str) {
        self.state.sandboxes.lock().unwrap().insert(
            id.to_owned(),
            Sandbox {
                state: state.to_owned(),
                sessions: HashMap::new(),
                ptys: HashMap::new(),
            },
        );
    }

    pub fn sandbox_state(&self, id: &str) -> Option<String> {
        self.state
            .sandboxes
            .lock()
            .unwrap()
            .get(id)
            .map(|s| s.state.clone())
    }

    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// Session ids created so far, in order.
    pub fn created_sessions(&self) -> Vec<String> {
        self.state.created_sessions.lock().unwrap().clone()
    }

    /// Session ids deleted so far, in order.
    pub fn deleted_sessions(&self) -> Vec<String> {
        self.state.deleted_sessions.lock().unwrap().clone()
    }

    /// Every session DELETE received (answered 204 or 404), in order.
    pub fn delete_requests(&self) -> Vec<String> {
        self.state.delete_requests.lock().unwrap().clone()
    }

    /// Session creates refused as duplicates (409), in order.
    pub fn conflicts(&self) -> Vec<String> {
        self.state.conflicts.lock().unwrap().clone()
    }

    /// Ids of the sessions that exist now in `sandbox`, sorted.
    pub fn session_ids(&self, sandbox: &str) -> Vec<String> {
        let sandboxes = self.state.sandboxes.lock().unwrap();
        let mut ids: Vec<String> = sandboxes
            .get(sandbox)
            .map(|s| s.sessions.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Puts a session with one command that runs nothing into `sandbox`, as if some client had
    /// made it: ended with `exit_code`, or running forever (`None`).
    pub fn plant_session(&self, sandbox: &str, session_id: &str, exit_code: Option<i32>) {
        let run = Arc::new(CommandRun {
            command: "planted".into(),
            log: Mutex::new(Vec::new()),
            exit: Mutex::new(exit_code),
            pgid: Mutex::new(None),
            gone: AtomicBool::new(false),
            stdin: tokio::sync::Mutex::new(None),
            suppress_input_echo: false,
        });
        let mut sandboxes = self.state.sandboxes.lock().unwrap();
        let sessions = &mut sandboxes.get_mut(sandbox).expect("sandbox exists").sessions;
        sessions.insert(
            session_id.to_owned(),
            HashMap::from([(uuid::Uuid::new_v4().to_string(), run)]),
        );
    }

    /// Sessions that exist now, across sandboxes.
    pub fn live_sessions(&self) -> usize {
        self.state
            .sandboxes
            .lock()
            .unwrap()
            .values()
            .map(|s| s.sessions.len())
            .sum()
    }

    /// Ids of the terminal sessions that exist now in `sandbox` (exited or not), sorted.
    pub fn pty_ids(&self, sandbox: &str) -> Vec<String> {
        let sandboxes = self.state.sandboxes.lock().unwrap();
        let mut ids: Vec<String> = sandboxes
            .get(sandbox)
            .map(|s| s.ptys.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Every terminal session DELETE received, in order.
    pub fn pty_deletes(&self) -> Vec<String> {
        self.state.pty_deletes.lock().unwrap().clone()
    }

    /// Commands the fake was asked to run, in no particular order.
    pub fn commands(&self) -> Vec<String> {
        let sandboxes = self.state.sandboxes.lock().unwrap();
        sandboxes
            .values()
            .flat_map(|s| s.sessions.values())
            .flat_map(|cmds| cmds.values().map(|c| c.command.clone()))
            .collect()
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = json!({ "statusCode": status.as_u16(), "message": message, "error": status.canonical_reason() });
    (status, Json(body)).into_response()
}

async fn auth_and_faults(State(fake): State<Arc<Fake>>, request: Request, next: Next) -> Response {
    let delay = fake.faults.api_delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let expected = format!("Bearer {}", fake.api_key);
    let authorized = request
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == expected.as_bytes());
    if !authorized || fake.faults.unauthorized.load(Ordering::Relaxed) {
        return error(StatusCode::UNAUTHORIZED, "Unauthorized");
    }
    if request.method() == axum::http::Method::GET
        && fake
            .faults
            .transient_get_failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        return error(StatusCode::SERVICE_UNAVAILABLE, "try again");
    }
    next.run(request).await
}

fn sandbox_dto(fake: &Fake, id: &str, state: &str) -> Value {
    let mut dto = json!({
        "id": id, "name": id, "organizationId": "org", "state": state, "desiredState": "started",
    });
    if !fake.faults.legacy_sandbox_dto.load(Ordering::Relaxed) {
        dto["toolboxProxyUrl"] = json!(format!("{}/toolbox", fake.base));
    }
    dto
}

async fn list_sandboxes(State(fake): State<Arc<Fake>>) -> Response {
    let sandboxes = fake.sandboxes.lock().unwrap();
    let dtos: Vec<Value> = sandboxes
        .iter()
        .map(|(id, s)| sandbox_dto(&fake, id, &s.state))
        .collect();
    Json(dtos).into_response()
}

async fn get_sandbox(State(fake): State<Arc<Fake>>, Path(id): Path<String>) -> Response {
    match fake.sandboxes.lock().unwrap().get(&id) {
        Some(s) => Json(sandbox_dto(&fake, &id, &s.state)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            &format!("Sandbox with ID or name {id} not found"),
        ),
    }
}

async fn start_sandbox(State(fake): State<Arc<Fake>>, Path(id): Path<String>) -> Response {
    let mut sandboxes = fake.sandboxes.lock().unwrap();
    let Some(sandbox) = sandboxes.get_mut(&id) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!("Sandbox with ID or name {id} not found"),
        );
    };
    if sandbox.state != "started" {
        // Starting takes a moment; sessions do not survive a stop/start.
        sandbox.state = "starting".into();
        sandbox.sessions.clear();
        let fake = Arc::clone(&fake);
        let id = id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(s) = fake.sandboxes.lock().unwrap().get_mut(&id) {
                s.state = "started".into();
            }
        });
    }
    Json(sandbox_dto(&fake, &id, &sandbox.state)).into_response()
}

async fn toolbox_proxy_url(State(fake): State<Arc<Fake>>, Path(id): Path<String>) -> Response {
    if !fake.sandboxes.lock().unwrap().contains_key(&id) {
        return error(
            StatusCode::NOT_FOUND,
            &format!("Sandbox with ID or name {id} not found"),
        );
    }
    Json(json!({ "url": format!("{}/toolbox", fake.base) })).into_response()
}

/// Runs `f` on a started sandbox, or answers like Daytona's runner does for others.
fn with_sandbox<T>(
    fake: &Fake,
    id: &str,
    f: impl FnOnce(&mut Sandbox) -> Result<T, Response>,
) -> Result<T, Response> {
    let mut sandboxes = fake.sandboxes.lock().unwrap();
    let Some(sandbox) = sandboxes.get_mut(id) else {
        return Err(error(StatusCode::NOT_FOUND, "sandbox not found"));
    };
    if sandbox.state != "started" {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad request: Is the Sandbox started?",
        ));
    }
    f(sandbox)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateSession {
    session_id: String,
}

async fn create_session(
    State(fake): State<Arc<Fake>>,
    Path(sandbox): Path<String>,
    Json(body): Json<CreateSession>,
) -> Response {
    let result = with_sandbox(&fake, &sandbox, |s| {
        if body.session_id == "entrypoint" {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad request: session ID 'entrypoint' is reserved",
            ));
        }
        if s.sessions.contains_key(&body.session_id) {
            fake.conflicts.lock().unwrap().push(body.session_id.clone());
            return Err(error(
                StatusCode::CONFLICT,
                "conflict: session already exists",
            ));
        }
        s.sessions.insert(body.session_id.clone(), HashMap::new());
        Ok(())
    });
    match result {
        Ok(()) => {
            fake.created_sessions.lock().unwrap().push(body.session_id);
            StatusCode::CREATED.into_response()
        }
        Err(response) => response,
    }
}

async fn list_sessions(State(fake): State<Arc<Fake>>, Path(sandbox): Path<String>) -> Response {
    let result = with_sandbox(&fake, &sandbox, |s| {
        Ok(s.sessions
            .iter()
            .map(|(id, commands)| session_dto(id, commands))
            .collect::<Vec<_>>())
    });
    match result {
        Ok(sessions) => Json(sessions).into_response(),
        Err(response) => response,
    }
}

fn session_dto(id: &str, commands: &HashMap<String, Arc<CommandRun>>) -> Value {
    let commands: Vec<Value> = commands.iter().map(|(id, c)| command_dto(id, c)).collect();
    json!({ "sessionId": id, "commands": commands })
}

async fn get_session(
    State(fake): State<Arc<Fake>>,
    Path((sandbox, session)): Path<(String, String)>,
) -> Response {
    let result = with_sandbox(&fake, &sandbox, |s| {
        let commands = s
            .sessions
            .get(&session)
            .ok_or_else(|| error(StatusCode::NOT_FOUND, "not found: session not found"))?;
        Ok(session_dto(&session, commands))
    });
    match result {
        Ok(dto) => Json(dto).into_response(),
        Err(response) => response,
    }
}

async fn delete_session(
    State(fake): State<Arc<Fake>>,
    Path((sandbox, session)): Path<(String, String)>,
) -> Response {
    fake.delete_requests.lock().unwrap().push(session.clone());
    let result = with_sandbox(&fake, &sandbox, |s| {
        s.sessions
            .remove(&session)
            .ok_or_else(|| error(StatusCode::NOT_FOUND, "not found: session not found"))
    });
    match result {
        Ok(commands) => {
            for command in commands.values() {
                command.gone.store(true, Ordering::SeqCst);
                if let Some(pgid) = *command.pgid.lock().unwrap() {
                    kill_group(pgid);
                }
            }
            fake.deleted_sessions.lock().unwrap().push(session);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(response) => response,
    }
}

/// SIGTERM to the group, SIGKILL a second later, like the daemon's termination grace.
fn kill_group(pgid: u32) {
    use nix::sys::signal::{Signal, killpg};
    let group = nix::unistd::Pid::from_raw(pgid as i32);
    let _ = killpg(group, Signal::SIGTERM);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = killpg(group, Signal::SIGKILL);
    });
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Exec {
    command: String,
    #[serde(default)]
    run_async: bool,
    #[serde(default, rename = "async")]
    legacy_async: bool,
    #[serde(default)]
    suppress_input_echo: bool,
}

async fn exec(
    State(fake): State<Arc<Fake>>,
    Path((sandbox, session)): Path<(String, String)>,
    Json(body): Json<Exec>,
) -> Response {
    if body.command.trim().is_empty() {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let command_id = uuid::Uuid::new_v4().to_string();
    let run = Arc::new(CommandRun {
        command: body.command.clone(),
        log: Mutex::new(Vec::new()),
        exit: Mutex::new(None),
        pgid: Mutex::new(None),
        gone: AtomicBool::new(false),
        stdin: tokio::sync::Mutex::new(None),
        suppress_input_echo: body.suppress_input_echo,
    });
    let registered = with_sandbox(&fake, &sandbox, |s| match s.sessions.get_mut(&session) {
        Some(commands) => {
            commands.insert(command_id.clone(), Arc::clone(&run));
            Ok(())
        }
        // Daemons of the researched version wrap "session not found" into a 500.
        None => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "failed to execute command: not found: session not found",
        )),
    });
    if let Err(response) = registered {
        return response;
    }
    if !fake.faults.dead_shell.load(Ordering::Relaxed) {
        let runner = tokio::spawn(run_command(Arc::clone(&run)));
        if !(body.run_async || body.legacy_async) {
            let _ = runner.await;
            let log = run.log.lock().unwrap().clone();
            let exit = *run.exit.lock().unwrap();
            return Json(json!({
                "cmdId": command_id, "output": String::from_utf8_lossy(&log),
                "stdout": null, "stderr": null, "exitCode": exit,
            }))
            .into_response();
        }
    }
    let body = json!({ "cmdId": command_id, "output": null, "stdout": null, "stderr": null, "exitCode": null });
    (StatusCode::ACCEPTED, Json(body)).into_response()
}

/// Runs the command as the session shell would, logging each line with its stream's marker.
async fn run_command(run: Arc<CommandRun>) {
    let spawned = Command::new("/bin/sh")
        .arg("-c")
        .arg(&run.command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(_) => {
            *run.exit.lock().unwrap() = Some(127);
            return;
        }
    };
    *run.pgid.lock().unwrap() = child.id();
    *run.stdin.lock().await = child.stdin.take();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out = tokio::spawn(copy_lines(stdout, [1, 1, 1], Arc::clone(&run)));
    let err = tokio::spawn(copy_lines(stderr, [2, 2, 2], Arc::clone(&run)));
    let status = child.wait().await;
    let _ = tokio::join!(out, err);
    // The daemon's FIFO goes with the command.
    run.stdin.lock().await.take();
    use std::os::unix::process::ExitStatusExt;
    let code = match status {
        Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
        Err(_) => 1,
    };
    *run.exit.lock().unwrap() = Some(code);
}

async fn copy_lines(pipe: impl AsyncRead + Unpin, marker: [u8; 3], run: Arc<CommandRun>) {
    let mut reader = BufReader::with_capacity(64 * 1024, pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if line.last() != Some(&b'\n') {
                    line.push(b'\n');
                }
                let mut log = run.log.lock().unwrap();
                log.extend_from_slice(&marker);
                log.extend_from_slice(&line);
            }
        }
    }
}

fn command_dto(id: &str, run: &CommandRun) -> Value {
    let mut dto = json!({ "id": id, "command": run.command });
    if let Some(code) = *run.exit.lock().unwrap() {
        dto["exitCode"] = json!(code);
    }
    dto
}

fn find_command(
    fake: &Fake,
    sandbox: &str,
    session: &str,
    command: &str,
) -> Result<Arc<CommandRun>, Response> {
    with_sandbox(fake, sandbox, |s| {
        let commands = s
            .sessions
            .get(session)
            .ok_or_else(|| error(StatusCode::NOT_FOUND, "not found: session not found"))?;
        commands
            .get(command)
            .cloned()
            .ok_or_else(|| error(StatusCode::NOT_FOUND, "not found: command not found"))
    })
}

async fn get_command(
    State(fake): State<Arc<Fake>>,
    Path((sandbox, session, command)): Path<(String, String, String)>,
) -> Response {
    match find_command(&fake, &sandbox, &session, &command) {
        Ok(run) => Json(command_dto(&command, &run)).into_response(),
        Err(response) => response,
    }
}

async fn logs(
    State(fake): State<Arc<Fake>>,
    Path((sandbox, session, command)): Path<(String, String, String)>,
    headers: axum::http::HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let run = match find_command(&fake, &sandbox, &session, &command) {
        Ok(run) => run,
        Err(response) => return response,
    };
    match upgrade {
        Ok(_) if fake.faults.refuse_log_stream.load(Ordering::Relaxed) => {
            error(StatusCode::BAD_GATEWAY, "Bad Gateway")
        }
        Ok(upgrade) => upgrade.on_upgrade(move |socket| follow(socket, run, fake)),
        Err(_) => {
            let log = run.log.lock().unwrap().clone();
            let version = headers
                .get("x-daytona-sdk-version")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            match log_format(version) {
                // JSON text: invalid UTF-8 turns into U+FFFD, as Go's encoder does.
                LogFormat::Json => Json(json!({
                    "output": String::from_utf8_lossy(&log), "stdout": "", "stderr": "",
                }))
                .into_response(),
                LogFormat::Raw => ([(header::CONTENT_TYPE, "text/plain")], log).into_response(),
                LogFormat::Stripped => {
                    let stripped: Vec<u8> = log
                        .split_inclusive(|&b| b == b'\n')
                        .flat_map(|line| line.get(3..).unwrap_or_default().iter().copied())
                        .collect();
                    ([(header::CONTENT_TYPE, "text/plain")], stripped).into_response()
                }
            }
        }
    }
}

enum LogFormat {
    Json,
    Raw,
    Stripped,
}

/// The daemon's switch on `X-Daytona-SDK-Version` (research section 3.0): from 0.167.0 (or any
/// `dev` build) JSON, from 0.27.0 raw text with markers, below or absent the markers stripped.
fn log_format(version: &str) -> LogFormat {
    if version.contains("dev") {
        return LogFormat::Json;
    }
    let parts: Vec<u64> = version.split('.').map_while(|p| p.parse().ok()).collect();
    match parts.as_slice() {
        [major, minor, ..] if (*major, *minor) >= (0, 167) => LogFormat::Json,
        [major, minor, ..] if (*major, *minor) >= (0, 27) => LogFormat::Raw,
        [] if !version.is_empty() => LogFormat::Raw, // unparsable: kept, like the daemon
        _ => LogFormat::Stripped,
    }
}

/// Replays the log from byte 0, then tails it; closes 1000 after the exit (or deletion).
async fn follow(mut socket: WebSocket, run: Arc<CommandRun>, fake: Arc<Fake>) {
    let mut sent = 0;
    let mut frame_no = 0usize;
    loop {
        let (pending, exited) = {
            let log = run.log.lock().unwrap();
            (log[sent..].to_vec(), run.exit.lock().unwrap().is_some())
        };
        let gone = run.gone.load(Ordering::SeqCst);
        let lose_tail = exited && fake.faults.lose_log_tail.load(Ordering::Relaxed);
        // The closer/writer race of the real daemon: the last bytes never go out.
        let sendable = if lose_tail {
            pending.len().saturating_sub(64)
        } else {
            pending.len()
        };
        let mut offset = 0;
        while offset < sendable {
            let size = if fake.faults.split_frames.load(Ordering::Relaxed) {
                1 + (frame_no * 7) % 13
            } else {
                1024
            };
            frame_no += 1;
            let end = (offset + size).min(sendable);
            if socket
                .send(Message::Binary(Bytes::copy_from_slice(
                    &pending[offset..end],
                )))
                .await
                .is_err()
            {
                return;
            }
            offset = end;
        }
        sent += sendable;
        if gone || (exited && (sent == run.log.lock().unwrap().len() || lose_tail)) {
            if !gone {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = socket
                .send(Message::Close(Some(CloseFrame {
                    code: 1000,
                    reason: "".into(),
                })))
                .await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Deserialize)]
struct Input {
    data: String,
}

/// `POST …/input`: the data, with a newline added when missing, to the command's stdin, and
/// into its log as stdout unless the exec said `suppressInputEcho`; 410 once it completed.
async fn input(
    State(fake): State<Arc<Fake>>,
    Path((sandbox, session, command)): Path<(String, String, String)>,
    Json(body): Json<Input>,
) -> Response {
    let run = match find_command(&fake, &sandbox, &session, &command) {
        Ok(run) => run,
        Err(response) => return response,
    };
    let completed = |code: i32| {
        error(
            StatusCode::GONE,
            &format!("gone: command has already completed with exit code {code}"),
        )
    };
    if let Some(code) = *run.exit.lock().unwrap() {
        return completed(code);
    }
    let mut line = body.data.into_bytes();
    if line.last() != Some(&b'\n') {
        line.push(b'\n');
    }
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = run.stdin.lock().await;
        if let Some(pipe) = stdin.as_mut()
            && pipe.write_all(&line).await.is_err()
        {
            // The program closed its stdin: the daemon's FIFO write fails the same way.
            stdin.take();
        }
    }
    if let Some(code) = *run.exit.lock().unwrap() {
        return completed(code);
    }
    if !run.suppress_input_echo {
        let mut log = run.log.lock().unwrap();
        log.extend_from_slice(&[1, 1, 1]);
        log.extend_from_slice(&line);
    }
    StatusCode::NO_CONTENT.into_response()
}

/// What a terminal client's queue carries.
enum PtyOut {
    Output(Bytes),
    Exited(i32),
}

/// One client of a terminal session.
struct PtyClient {
    queue: tokio::sync::mpsc::Sender<PtyOut>,
    /// Output bytes queued for it so far (for the slow-consumer fault).
    queued: usize,
    /// Set when it fell behind: its WebSocket closes with 1008.
    slow: Arc<tokio::sync::Notify>,
}

/// Slots of each terminal client's queue, as the daemon's.
const PTY_QUEUE_SLOTS: usize = 256;
/// Largest output frame of a terminal stream.
const PTY_FRAME: usize = 32 * 1024;

/// A terminal session: a shell on a pseudo-terminal.
struct PtyRun {
    /// The terminal's master, for input and resizes.
    master: std::os::fd::OwnedFd,
    pid: u32,
    clients: Mutex<Vec<PtyClient>>,
    exit: Mutex<Option<i32>>,
}

#[derive(Deserialize)]
struct CreatePty {
    id: String,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    envs: HashMap<String, String>,
    #[serde(default)]
    cols: Option<u16>,
    #[serde(default)]
    rows: Option<u16>,
}

#[derive(Deserialize)]
struct PtySize {
    cols: u16,
    rows: u16,
}

/// Starts `/bin/sh -i` on a new terminal of its own (`setsid -c` makes it the controlling
/// terminal without code in the child), with a thread that reads the terminal's output into
/// the clients' queues and, at the end, the exit status.
fn spawn_pty(body: &CreatePty, fake: Arc<Fake>) -> std::io::Result<Arc<PtyRun>> {
    let (master, terminal) = crate::backend::local::open_pty(TerminalSize {
        rows: body.rows.unwrap_or(24),
        cols: body.cols.unwrap_or(80),
    })?;
    let mut command = std::process::Command::new("/usr/bin/setsid");
    command
        .args(["-c", "/bin/sh", "-i"])
        .env("TERM", "xterm-256color")
        .envs(&body.envs)
        .stdin(Stdio::from(terminal.try_clone()?))
        .stdout(Stdio::from(terminal.try_clone()?))
        .stderr(Stdio::from(terminal));
    if let Some(cwd) = &body.cwd {
        command.current_dir(cwd);
    }
    let mut child = command.spawn()?;
    // The terminal's other side is now only the shell's: reads end (EIO) when it is gone.
    drop(command);
    let run = Arc::new(PtyRun {
        master: master.try_clone()?,
        pid: child.id(),
        clients: Mutex::new(Vec::new()),
        exit: Mutex::new(None),
    });
    let reading = Arc::clone(&run);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut master = std::fs::File::from(master);
        let mut buf = vec![0; PTY_FRAME];
        // EIO once every process closed the terminal: the end of its output.
        while let Ok(n @ 1..) = master.read(&mut buf) {
            let chunk = Bytes::copy_from_slice(&buf[..n]);
            let slow_after = fake
                .faults
                .pty_slow_consumer_after_bytes
                .load(Ordering::Relaxed);
            // No replay: with no client, output is discarded.
            reading.clients.lock().unwrap().retain_mut(|client| {
                client.queued += n;
                let full = slow_after > 0 && client.queued > slow_after;
                if full
                    || client
                        .queue
                        .try_send(PtyOut::Output(chunk.clone()))
                        .is_err()
                {
                    client.slow.notify_one();
                    return false;
                }
                true
            });
        }
        use std::os::unix::process::ExitStatusExt;
        let code = match child.wait() {
            Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
            Err(_) => -1,
        };
        *reading.exit.lock().unwrap() = Some(code);
        for client in reading.clients.lock().unwrap().drain(..) {
            if client.queue.try_send(PtyOut::Exited(code)).is_err() {
                client.slow.notify_one();
            }
        }
    });
    Ok(run)
}

async fn create_pty(
    State(fake): State<Arc<Fake>>,
    Path(sandbox): Path<String>,
    Json(body): Json<CreatePty>,
) -> Response {
    if body.rows.unwrap_or(24) > 1000 || body.cols.unwrap_or(80) > 1000 {
        return error(
            StatusCode::BAD_REQUEST,
            "bad request: rows and cols must be at most 1000",
        );
    }
    let exists = with_sandbox(&fake, &sandbox, |s| Ok(s.ptys.contains_key(&body.id)));
    match exists {
        Err(response) => return response,
        Ok(true) => return error(StatusCode::CONFLICT, "conflict: PTY session already exists"),
        Ok(false) => {}
    }
    let run = match spawn_pty(&body, Arc::clone(&fake)) {
        Ok(run) => run,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("failed to start PTY session: {e}"),
            );
        }
    };
    let inserted = with_sandbox(&fake, &sandbox, |s| {
        s.ptys.insert(body.id.clone(), run);
        Ok(())
    });
    match inserted {
        Ok(()) => (StatusCode::CREATED, Json(json!({ "sessionId": body.id }))).into_response(),
        Err(response) => response,
    }
}

fn find_pty(fake: &Fake, sandbox: &str, id: &str) -> Result<Arc<PtyRun>, Response> {
    with_sandbox(fake, sandbox, |s| {
        s.ptys
            .get(id)
            .cloned()
            .ok_or_else(|| error(StatusCode::NOT_FOUND, "not found: PTY session not found"))
    })
}

async fn delete_pty(
    State(fake): State<Arc<Fake>>,
    Path((sandbox, id)): Path<(String, String)>,
) -> Response {
    fake.pty_deletes.lock().unwrap().push(id.clone());
    let removed = with_sandbox(&fake, &sandbox, |s| {
        s.ptys
            .remove(&id)
            .ok_or_else(|| error(StatusCode::NOT_FOUND, "not found: PTY session not found"))
    });
    match removed {
        Ok(run) => {
            if run.exit.lock().unwrap().is_none() {
                use nix::sys::signal::{Signal, killpg};
                let _ = killpg(nix::unistd::Pid::from_raw(run.pid as i32), Signal::SIGKILL);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        Err(response) => response,
    }
}

async fn resize_pty(
    State(fake): State<Arc<Fake>>,
    Path((sandbox, id)): Path<(String, String)>,
    Json(size): Json<PtySize>,
) -> Response {
    let run = match find_pty(&fake, &sandbox, &id) {
        Ok(run) => run,
        Err(response) => return response,
    };
    if run.exit.lock().unwrap().is_some() {
        return error(StatusCode::GONE, "gone: PTY session has exited");
    }
    if size.rows == 0 || size.cols == 0 || size.rows > 1000 || size.cols > 1000 {
        return error(
            StatusCode::BAD_REQUEST,
            "bad request: rows and cols must be 1 to 1000",
        );
    }
    // The kernel sends SIGWINCH to the terminal's foreground group.
    let size = TerminalSize {
        rows: size.rows,
        cols: size.cols,
    };
    if let Err(e) = rustix::termios::tcsetwinsize(&run.master, winsize(size)) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
    }
    Json(json!({ "id": id, "cols": size.cols, "rows": size.rows, "active": true })).into_response()
}

async fn connect_pty(
    State(fake): State<Arc<Fake>>,
    Path((sandbox, id)): Path<(String, String)>,
    upgrade: WebSocketUpgrade,
) -> Response {
    match find_pty(&fake, &sandbox, &id) {
        Ok(run) => upgrade.on_upgrade(move |socket| pty_client(socket, run, fake)),
        Err(response) => response,
    }
}

/// One client's WebSocket: `connected`, then its queue's output, and what it sends typed into
/// the terminal; at the exit, the status (see the module doc).
async fn pty_client(mut socket: WebSocket, run: Arc<PtyRun>, fake: Arc<Fake>) {
    let (queue, mut queued) = tokio::sync::mpsc::channel(PTY_QUEUE_SLOTS);
    let slow = Arc::new(tokio::sync::Notify::new());
    let exited_before = *run.exit.lock().unwrap();
    if exited_before.is_none() {
        run.clients.lock().unwrap().push(PtyClient {
            queue,
            queued: 0,
            slow: Arc::clone(&slow),
        });
    }
    let connected = json!({ "type": "control", "status": "connected" }).to_string();
    if socket.send(Message::Text(connected.into())).await.is_err() {
        return;
    }
    let exit_first = fake.faults.pty_exit_message_first.load(Ordering::Relaxed);
    // Output held back (exit_first) until the exit is known; then sent after the message.
    let mut held: Vec<Bytes> = Vec::new();
    let code = match exited_before {
        Some(code) => code,
        None => loop {
            tokio::select! {
                biased;
                _ = slow.notified() => {
                    let _ = socket.send(Message::Close(Some(CloseFrame {
                        code: 1008,
                        reason: "slow consumer".into(),
                    }))).await;
                    return;
                }
                out = queued.recv() => match out {
                    Some(PtyOut::Output(data)) if exit_first => held.push(data),
                    Some(PtyOut::Output(data)) => {
                        if socket.send(Message::Binary(data)).await.is_err() {
                            return;
                        }
                    }
                    Some(PtyOut::Exited(code)) => break code,
                    // Dropped from the clients without a slow mark: cannot happen; end.
                    None => return,
                },
                typed = socket.recv() => match typed {
                    Some(Ok(Message::Binary(data))) => type_into(&run, data.to_vec()).await,
                    Some(Ok(Message::Text(text))) => type_into(&run, text.as_bytes().to_vec()).await,
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                },
            }
        },
    };
    if exit_first {
        let exited = json!({ "type": "control", "status": "exited", "exitCode": code });
        if socket
            .send(Message::Text(exited.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
        for data in held {
            if socket.send(Message::Binary(data)).await.is_err() {
                return;
            }
        }
    }
    let close = if code == 0 {
        CloseFrame {
            code: 1000,
            reason: "".into(),
        }
    } else {
        let reason = json!({ "exitCode": code, "exitReason": "exited" }).to_string();
        CloseFrame {
            code: 1011,
            reason: reason.into(),
        }
    };
    let _ = socket.send(Message::Close(Some(close))).await;
}

/// Writes what a client typed into the terminal (a blocking write: the terminal's input
/// buffer may be full until the program reads).
async fn type_into(run: &Arc<PtyRun>, data: Vec<u8>) {
    let Ok(master) = run.master.try_clone() else {
        return;
    };
    let _ = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        std::fs::File::from(master).write_all(&data)
    })
    .await;
}
