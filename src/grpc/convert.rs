//! Request validation and every conversion between protobuf messages and domain types. The job
//! core never sees a protobuf type; handlers never build one by hand.

use std::time::{Duration, SystemTime};

use crate::{
    error::Error,
    job::{
        Capabilities, Delivered, DeliveryProgress, DisconnectPolicy, EventKind, ExitSummary,
        GapPolicy, JobEvent, JobFilter, JobId, JobMeta, JobSignal, JobSnapshot, JobSpec, JobState,
        ListCursor, MAX_TERMINAL_CELLS, Pace, Position, Program, ScreenSnapshot, SinkHealth,
        StreamKind, TerminalSize, TtySpec,
    },
    proto as pb,
};

/// Longest task, session or sandbox id.
const MAX_ID_BYTES: usize = 256;
/// Longest single argument (Linux refuses longer ones: MAX_ARG_STRLEN).
const MAX_ARG_BYTES: usize = 128 * 1024;
const MAX_ARGV_LEN: usize = 4096;
const MAX_ENV_VARS: usize = 1024;
const MAX_PATH_BYTES: usize = 4096;
/// Longest job id: a signed id carries the caller's labels and the backend's handle.
const MAX_JOB_ID_BYTES: usize = 4096;

/// Validates an Exec request and turns it into a job spec.
pub fn job_spec(req: pb::ExecRequest) -> Result<JobSpec, Error> {
    let meta = JobMeta {
        task_id: label("task_id", req.task_id)?,
        session_id: label("session_id", req.session_id)?,
        sandbox_id: label("sandbox_id", req.sandbox_id)?,
    };
    let program = match (req.command.is_empty(), req.argv.is_empty()) {
        (false, false) => return invalid("set exactly one of command and argv, not both"),
        (true, true) => {
            return invalid("set exactly one of command (a shell command line) or argv");
        }
        (false, true) => {
            if req.command.trim().is_empty() {
                return invalid("command is blank");
            }
            text("command", &req.command, MAX_ARG_BYTES)?;
            Program::Shell(req.command)
        }
        (true, false) => {
            if req.argv.len() > MAX_ARGV_LEN {
                return invalid(format!(
                    "argv has {} entries; at most {MAX_ARGV_LEN}",
                    req.argv.len()
                ));
            }
            if req.argv[0].is_empty() {
                return invalid("argv[0] (the program) is empty");
            }
            for (i, arg) in req.argv.iter().enumerate() {
                text(&format!("argv[{i}]"), arg, MAX_ARG_BYTES)?;
            }
            Program::Argv(req.argv)
        }
    };
    let cwd = if req.cwd.is_empty() {
        None
    } else {
        text("cwd", &req.cwd, MAX_PATH_BYTES)?;
        Some(req.cwd)
    };
    if req.env.len() > MAX_ENV_VARS {
        return invalid(format!(
            "env has {} variables; at most {MAX_ENV_VARS}",
            req.env.len()
        ));
    }
    for (name, value) in &req.env {
        if name.is_empty() {
            return invalid("env has a variable with an empty name");
        }
        if name.contains('=') {
            return invalid(format!("env name {name:?} contains '='"));
        }
        text("env name", name, MAX_ARG_BYTES)?;
        // The value itself is never echoed: it may be a secret.
        if value.contains('\0') {
            return invalid(format!("env value of {name:?} contains a NUL byte"));
        }
        if value.len() > MAX_ARG_BYTES {
            return invalid(format!(
                "env value of {name:?} is longer than {MAX_ARG_BYTES} bytes"
            ));
        }
    }
    let timeout = positive_duration("timeout", req.timeout)?;
    let grace = positive_duration("disconnect_grace", req.disconnect_grace)?;
    let on_disconnect = match (pb::DisconnectPolicy::try_from(req.on_disconnect), grace) {
        (Ok(pb::DisconnectPolicy::CancelAfterGrace), Some(grace)) => {
            DisconnectPolicy::CancelAfter(grace)
        }
        (Ok(pb::DisconnectPolicy::CancelAfterGrace), None) => {
            return invalid("on_disconnect CANCEL_AFTER_GRACE needs a disconnect_grace");
        }
        (Ok(_), Some(_)) => {
            return invalid("disconnect_grace is only for on_disconnect CANCEL_AFTER_GRACE");
        }
        (Ok(pb::DisconnectPolicy::Detach), None) => DisconnectPolicy::Detach,
        (Ok(pb::DisconnectPolicy::Unspecified | pb::DisconnectPolicy::Cancel), None) => {
            DisconnectPolicy::Cancel
        }
        (Err(_), _) => {
            return invalid(format!(
                "on_disconnect {} is not a DisconnectPolicy",
                req.on_disconnect
            ));
        }
    };
    let idempotency_key = if req.idempotency_key.is_empty() {
        None
    } else {
        Some(label("idempotency_key", req.idempotency_key)?)
    };
    Ok(JobSpec {
        meta,
        program,
        cwd,
        env: req.env.into_iter().collect(),
        timeout,
        on_disconnect,
        idempotency_key,
        stdin: req.stdin,
        tty: req.tty.map(tty_spec).transpose()?,
        text_output: req.text,
    })
}

/// TERM when a `tty` request names none.
const DEFAULT_TERM: &str = "xterm-256color";
const MAX_TERM_BYTES: usize = 64;

/// Validates a request's terminal: a size of at most `MAX_TERMINAL_CELLS` cells (0 for the
/// default) and a TERM that names a terminfo entry.
fn tty_spec(tty: pb::TtyOptions) -> Result<TtySpec, Error> {
    let rows = if tty.rows == 0 { 24 } else { tty.rows };
    let cols = if tty.cols == 0 { 80 } else { tty.cols };
    let term = if tty.term.is_empty() {
        DEFAULT_TERM.to_owned()
    } else if tty.term.len() > MAX_TERM_BYTES
        || !tty
            .term
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
    {
        return invalid(format!(
            "tty.term {:?} is not a terminal type (letters, digits, '-', '_', '.', '+'; at most \
             {MAX_TERM_BYTES} bytes)",
            tty.term
        ));
    } else {
        tty.term
    };
    Ok(TtySpec {
        size: terminal_size("tty", rows, cols)?,
        term,
    })
}

/// Validates a terminal size: each side at least 1, at most `MAX_TERMINAL_CELLS` cells.
pub fn terminal_size(field: &str, rows: u32, cols: u32) -> Result<TerminalSize, Error> {
    let cells = u64::from(rows) * u64::from(cols);
    if rows == 0 || cols == 0 || cells > u64::from(MAX_TERMINAL_CELLS) {
        return invalid(format!(
            "{field} size {rows}x{cols} is out of bounds: rows and cols at least 1, and at most \
             {MAX_TERMINAL_CELLS} cells (rows x cols)"
        ));
    }
    // Both fit in u16: each is at most MAX_TERMINAL_CELLS / 1.
    Ok(TerminalSize {
        rows: u16::try_from(rows).unwrap_or(u16::MAX),
        cols: u16::try_from(cols).unwrap_or(u16::MAX),
    })
}

fn tty_options(tty: TtySpec) -> pb::TtyOptions {
    pb::TtyOptions {
        rows: tty.size.rows.into(),
        cols: tty.size.cols.into(),
        term: tty.term,
    }
}

/// A positive protobuf Duration, checked field by field.
fn positive_duration(
    field: &str,
    value: Option<prost_types::Duration>,
) -> Result<Option<Duration>, Error> {
    match value {
        None => Ok(None),
        // A Duration's nanos lie within ±999,999,999 with the sign of its seconds; prost would
        // otherwise normalise {1s, 2e9 ns} into 3s rather than refuse it.
        Some(t) if !(0..1_000_000_000).contains(&t.nanos) => invalid(format!(
            "{field} is not a valid Duration: nanos {} is outside 0..=999999999",
            t.nanos
        )),
        // Checked here rather than by prost's conversion, which negates the seconds of a
        // negative Duration: i64::MIN overflows (a panic in debug builds).
        Some(t) if t.seconds < 0 || (t.seconds, t.nanos) == (0, 0) => {
            invalid(format!("{field} must be positive"))
        }
        Some(t) => Ok(Some(Duration::new(t.seconds as u64, t.nanos as u32))),
    }
}

/// Where an Attach starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachFrom {
    /// A position in the job's log.
    Log(Position),
    /// A `tty` job's screen as it is now (`snapshot`).
    Screen,
}

/// What an Attach stream's `open` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachOptions {
    pub id: JobId,
    pub from: AttachFrom,
    pub on_gap: GapPolicy,
    pub pace: Pace,
    /// Output as text where it is UTF-8.
    pub as_text: bool,
}

/// Validates an Attach stream's first request.
pub fn attach_open(req: Option<pb::AttachRequest>) -> Result<AttachOptions, Error> {
    let open = match req.and_then(|r| r.kind) {
        Some(pb::attach_request::Kind::Open(open)) => open,
        _ => return invalid("the first Attach request must be `open`"),
    };
    let id = job_id(open.job_id)?;
    let position = match (open.snapshot, open.from) {
        (true, Some(_)) => {
            return invalid("set `snapshot` or `from`, not both: a snapshot starts from now");
        }
        (true, None) => AttachFrom::Screen,
        (false, from) => AttachFrom::Log(from.map_or(Ok(Position::Start), resume_from)?),
    };
    let on_gap = match pb::GapPolicy::try_from(open.on_gap) {
        Ok(pb::GapPolicy::Unspecified | pb::GapPolicy::Report) => GapPolicy::Report,
        Ok(pb::GapPolicy::Fail) => GapPolicy::Fail,
        Err(_) => return invalid(format!("on_gap {} is not a GapPolicy", open.on_gap)),
    };
    let pace = if open.lossless {
        Pace::Lossless
    } else {
        Pace::Watch
    };
    Ok(AttachOptions {
        id,
        from: position,
        on_gap,
        pace,
        as_text: open.text,
    })
}

/// Most stdin bytes in one write (SendInput, or an Attach `input`).
const MAX_INPUT_BYTES: usize = 1 << 20;

/// What a client asks of a job on its Attach stream after `open`.
#[derive(Debug, PartialEq, Eq)]
pub enum FollowUp {
    Input {
        data: bytes::Bytes,
        offset: Option<u64>,
    },
    CloseInput,
    Signal(JobSignal),
    Resize(TerminalSize),
    /// A request this server does not know: empty, or of a newer version of the API.
    Unknown,
}

/// Validates an Attach stream's request after `open`.
pub fn follow_up(req: pb::AttachRequest) -> Result<FollowUp, Error> {
    use pb::attach_request::Kind;
    match req.kind {
        Some(Kind::Open(_)) => invalid("`open` was already sent on this stream"),
        Some(Kind::Input(input)) => Ok(FollowUp::Input {
            data: input_data(input.data)?,
            offset: input.offset,
        }),
        Some(Kind::CloseInput(_)) => Ok(FollowUp::CloseInput),
        Some(Kind::Signal(signal)) => job_signal(signal).map(FollowUp::Signal),
        Some(Kind::Resize(size)) => {
            terminal_size("resize", size.rows, size.cols).map(FollowUp::Resize)
        }
        None => Ok(FollowUp::Unknown),
    }
}

/// Validates a signal a client asked for: one of `JobSignal`'s.
pub fn job_signal(raw: i32) -> Result<JobSignal, Error> {
    use pb::JobSignal as S;
    Ok(match S::try_from(raw) {
        Ok(S::Hup) => JobSignal::Hup,
        Ok(S::Int) => JobSignal::Int,
        Ok(S::Quit) => JobSignal::Quit,
        Ok(S::Kill) => JobSignal::Kill,
        Ok(S::Usr1) => JobSignal::Usr1,
        Ok(S::Usr2) => JobSignal::Usr2,
        Ok(S::Term) => JobSignal::Term,
        Ok(S::Cont) => JobSignal::Cont,
        Ok(S::Stop) => JobSignal::Stop,
        Ok(S::Winch) => JobSignal::Winch,
        Ok(S::Unspecified) | Err(_) => {
            return invalid(format!(
                "signal {raw} is not one a job may be sent: HUP, INT, QUIT, KILL, USR1, USR2, \
                 TERM, CONT, STOP or WINCH"
            ));
        }
    })
}

/// Validates stdin bytes of one write.
pub fn input_data(data: bytes::Bytes) -> Result<bytes::Bytes, Error> {
    if data.len() > MAX_INPUT_BYTES {
        return invalid(format!(
            "stdin data is {} bytes; at most {MAX_INPUT_BYTES} per write (split it)",
            data.len()
        ));
    }
    Ok(data)
}

fn resume_from(from: pb::ResumeFrom) -> Result<Position, Error> {
    use pb::resume_from::Position as P;
    Ok(match from.position {
        None | Some(P::FromStart(_)) => Position::Start,
        Some(P::AfterSeq(seq)) => Position::AfterSeq(seq),
        Some(P::Offsets(o)) => Position::Offsets {
            stdout: o.stdout,
            stderr: o.stderr,
        },
        Some(P::NewOnly(_)) => Position::New,
    })
}

fn position(position: Position) -> pb::ResumeFrom {
    use pb::resume_from::Position as P;
    let position = match position {
        Position::Start => P::FromStart(pb::FromStart {}),
        Position::AfterSeq(seq) => P::AfterSeq(seq),
        Position::Offsets { stdout, stderr } => P::Offsets(pb::StreamOffsets { stdout, stderr }),
        Position::New => P::NewOnly(pb::NewOnly {}),
    };
    pb::ResumeFrom {
        position: Some(position),
    }
}

/// Most jobs per ListJobs page, and the default.
const MAX_PAGE_SIZE: u32 = 500;
const DEFAULT_PAGE_SIZE: u32 = 50;

/// A validated ListJobs request: the filter, the page size and where the page starts.
pub fn list_request(
    req: pb::ListJobsRequest,
) -> Result<(JobFilter, usize, Option<ListCursor>), Error> {
    let state = match pb::JobState::try_from(req.state) {
        Ok(pb::JobState::Unspecified) => None,
        Ok(pb::JobState::Running) => Some(JobState::Running),
        Ok(pb::JobState::Succeeded) => Some(JobState::Succeeded),
        Ok(pb::JobState::Failed) => Some(JobState::Failed),
        Ok(pb::JobState::Cancelled) => Some(JobState::Cancelled),
        Ok(pb::JobState::TimedOut) => Some(JobState::TimedOut),
        Err(_) => return invalid(format!("state {} is not a JobState", req.state)),
    };
    let filter = JobFilter {
        task_id: (!req.task_id.is_empty())
            .then(|| label("task_id", req.task_id))
            .transpose()?,
        session_id: (!req.session_id.is_empty())
            .then(|| label("session_id", req.session_id))
            .transpose()?,
        state,
    };
    let size = match req.page_size {
        0 => DEFAULT_PAGE_SIZE,
        n if n > MAX_PAGE_SIZE => {
            return invalid(format!("page_size {n} is above the most, {MAX_PAGE_SIZE}"));
        }
        n => n,
    };
    let after = if req.page_token.is_empty() {
        None
    } else {
        Some(page_cursor(&req.page_token)?)
    };
    Ok((filter, size as usize, after))
}

/// A page token: the last job of the page, as `<start, ns since the epoch>.<job id>` in
/// URL-safe base64. Not secret and not signed: it only says where to go on.
pub fn page_token(cursor: &ListCursor) -> String {
    use base64::Engine;
    let nanos = cursor
        .started_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{nanos}.{}", cursor.id))
}

fn page_cursor(token: &str) -> Result<ListCursor, Error> {
    use base64::Engine;
    let bad = || Error::InvalidArgument("page_token is not one ListJobs returned".into());
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let (nanos, id) = raw.split_once('.').ok_or_else(bad)?;
    let nanos: u64 = nanos.parse().map_err(|_| bad())?;
    Ok(ListCursor {
        started_at: SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos),
        id: JobId::from_caller(id),
    })
}

/// A ListJobs page.
pub fn list_response(jobs: Vec<JobSnapshot>, next: Option<ListCursor>) -> pb::ListJobsResponse {
    pb::ListJobsResponse {
        jobs: jobs.into_iter().map(status_response).collect(),
        next_page_token: next.as_ref().map(page_token).unwrap_or_default(),
    }
}

/// Parses a job id from Cancel or Status.
pub fn job_id(raw: String) -> Result<JobId, Error> {
    if raw.is_empty() {
        return invalid("job_id is empty");
    }
    text("job_id", &raw, MAX_JOB_ID_BYTES)?;
    Ok(JobId::from_caller(raw))
}

fn label(field: &str, value: String) -> Result<String, Error> {
    text(field, &value, MAX_ID_BYTES)?;
    if value.chars().any(char::is_control) {
        return invalid(format!("{field} contains control characters"));
    }
    Ok(value)
}

fn text(field: &str, value: &str, max_bytes: usize) -> Result<(), Error> {
    if value.contains('\0') {
        return invalid(format!("{field} contains a NUL byte"));
    }
    if value.len() > max_bytes {
        return invalid(format!("{field} is longer than {max_bytes} bytes"));
    }
    Ok(())
}

fn invalid<T>(message: impl Into<String>) -> Result<T, Error> {
    Err(Error::InvalidArgument(message.into()))
}

/// What a reader receives, as sent on the Exec and Attach streams (output as text where the
/// stream asked for it and it is valid).
pub fn delivered(job_id: &JobId, delivered: Delivered, as_text: bool) -> pb::ExecEvent {
    match delivered {
        Delivered::Event(event) => exec_event(job_id, event, as_text),
        Delivered::Gap(gap) => pb::ExecEvent {
            job_id: job_id.to_string(),
            seq: gap.resumed_seq.saturating_sub(1),
            time: Some(SystemTime::now().into()),
            kind: Some(pb::exec_event::Kind::Gap(pb::Gap {
                requested: Some(position(gap.requested)),
                resumed_seq: gap.resumed_seq,
                lost_events: gap.lost_events,
                lost_stdout_bytes: gap.lost_stdout_bytes,
                lost_stderr_bytes: gap.lost_stderr_bytes,
                resumed_stdout_offset: gap.resumed_stdout_offset,
                resumed_stderr_offset: gap.resumed_stderr_offset,
                exact: gap.exact,
            })),
        },
        Delivered::Keepalive { last_seq } => pb::ExecEvent {
            job_id: job_id.to_string(),
            seq: last_seq.unwrap_or(0),
            time: Some(SystemTime::now().into()),
            kind: Some(pb::exec_event::Kind::Keepalive(pb::Keepalive {})),
        },
        Delivered::Snapshot(snapshot) => pb::ExecEvent {
            job_id: job_id.to_string(),
            seq: snapshot.seq,
            time: Some(SystemTime::now().into()),
            kind: Some(pb::exec_event::Kind::Snapshot(screen_snapshot(snapshot))),
        },
    }
}

fn screen_snapshot(snapshot: ScreenSnapshot) -> pb::Snapshot {
    pb::Snapshot {
        screen: snapshot.screen,
        rows: snapshot.size.rows.into(),
        cols: snapshot.size.cols.into(),
        cursor_row: snapshot.cursor.0.into(),
        cursor_col: snapshot.cursor.1.into(),
        stdout_offset: snapshot.stdout_offset,
        alternate_screen: snapshot.alternate_screen,
    }
}

/// A chunk of output; with `as_text`, as text when it is UTF-8.
fn output(stream: StreamKind, offset: u64, data: bytes::Bytes, as_text: bool) -> pb::Output {
    let text = as_text
        .then(|| std::str::from_utf8(&data).ok().map(str::to_owned))
        .flatten();
    pb::Output {
        stream: output_stream(stream) as i32,
        offset,
        data: if text.is_some() {
            Default::default()
        } else {
            data
        },
        text: text.unwrap_or_default(),
    }
}

/// One job event as sent on the Exec stream (output as text where asked and valid).
pub fn exec_event(job_id: &JobId, event: JobEvent, as_text: bool) -> pb::ExecEvent {
    let kind = match event.kind {
        EventKind::Started {
            backend,
            pid,
            capabilities,
            tty,
        } => pb::exec_event::Kind::Started(pb::Started {
            backend: backend.to_owned(),
            pid: pid.unwrap_or(0),
            capabilities: Some(capabilities_message(capabilities)),
            tty: tty.map(tty_options),
        }),
        EventKind::Output {
            stream,
            offset,
            data,
        } => pb::exec_event::Kind::Output(output(stream, offset, data, as_text)),
        EventKind::Exited(summary) => pb::exec_event::Kind::Exited(exited(summary)),
    };
    pb::ExecEvent {
        job_id: job_id.to_string(),
        seq: event.seq,
        time: Some(event.time.into()),
        kind: Some(kind),
    }
}

fn exited(summary: ExitSummary) -> pb::Exited {
    pb::Exited {
        state: job_state(summary.state) as i32,
        exit_code: summary.exit_code,
        signal: summary.signal,
        duration: Some(duration(summary.duration)),
        stdout_bytes: summary.stdout_bytes,
        stderr_bytes: summary.stderr_bytes,
        message: summary.message,
    }
}

fn output_stream(stream: StreamKind) -> pb::OutputStream {
    match stream {
        StreamKind::Stdout => pb::OutputStream::Stdout,
        StreamKind::Stderr => pb::OutputStream::Stderr,
    }
}

pub fn job_state(state: JobState) -> pb::JobState {
    match state {
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
        JobState::TimedOut => pb::JobState::TimedOut,
    }
}

pub fn cancel_response(job: JobSnapshot) -> pb::CancelResponse {
    pb::CancelResponse {
        job_id: job.id.to_string(),
        state: job_state(job.state) as i32,
    }
}

pub fn status_response(job: JobSnapshot) -> pb::StatusResponse {
    let exit = job.exit.as_ref();
    pb::StatusResponse {
        job_id: job.id.to_string(),
        task_id: job.meta.task_id,
        session_id: job.meta.session_id,
        sandbox_id: job.meta.sandbox_id,
        state: job_state(job.state) as i32,
        started_at: Some(job.started_at.into()),
        running_for: job.running_for.map(duration),
        finished_at: exit.map(|e| e.finished_at.into()),
        exit_code: exit.and_then(|e| e.exit_code),
        signal: exit.and_then(|e| e.signal),
        stdout_bytes: job.stdout_bytes,
        stderr_bytes: job.stderr_bytes,
        backend: job.backend.to_owned(),
        message: exit.map(|e| e.message.clone()).unwrap_or_default(),
        mirrored: job.mirror.is_some(),
        mirror: job.mirror.map(mirror_status),
        on_disconnect: match (&job.log, job.on_disconnect) {
            (None, _) => pb::DisconnectPolicy::Unspecified,
            (Some(_), DisconnectPolicy::Cancel) => pb::DisconnectPolicy::Cancel,
            (Some(_), DisconnectPolicy::Detach) => pb::DisconnectPolicy::Detach,
            (Some(_), DisconnectPolicy::CancelAfter(_)) => pb::DisconnectPolicy::CancelAfterGrace,
        } as i32,
        disconnect_grace: match job.on_disconnect {
            DisconnectPolicy::CancelAfter(grace) => Some(duration(grace)),
            _ => None,
        },
        attached_clients: job.log.map_or(0, |log| log.attached as u32),
        log: job.log.map(|log| pb::JobLog {
            first_seq: log.first_seq,
            next_seq: log.next_seq,
            stdout_from: log.stdout_from,
            stderr_from: log.stderr_from,
            held_bytes: log.held_bytes as u64,
        }),
        stdin_accepted_bytes: job.stdin.map_or(0, |s| s.accepted_bytes),
        stdin_open: job.stdin.is_some_and(|s| s.open),
        tty: job.tty.map(tty_options),
    }
}

fn mirror_status(progress: DeliveryProgress) -> pb::MirrorStatus {
    pb::MirrorStatus {
        records_delivered: progress.records_delivered,
        bytes_delivered: progress.bytes_delivered,
        bytes_dropped: progress.bytes_dropped,
        bytes_pending: progress.bytes_pending,
        invalid_bytes: progress.invalid_bytes,
        retries: progress.retries,
        ambiguous_retries: progress.ambiguous_retries,
        complete: progress.complete,
        last_error: progress.last_error.unwrap_or_default(),
    }
}

/// What Health reports, gathered by the handler.
pub struct HealthReport {
    pub draining: bool,
    pub active_jobs: usize,
    pub max_concurrent_jobs: u32,
    pub backend: &'static str,
    pub daytona_configured: bool,
    pub convex_configured: bool,
    /// Health of the Convex sink; `None` when it is not configured.
    pub convex_health: Option<SinkHealth>,
    pub sinks: Vec<&'static str>,
    pub uptime: Duration,
    pub output_budget_in_use: usize,
    pub output_budget: usize,
    pub output_retained: usize,
    pub capabilities: Capabilities,
}

fn capabilities_message(c: Capabilities) -> pb::Capabilities {
    pb::Capabilities {
        stdin: c.stdin,
        stdin_eof: c.stdin_eof,
        tty: c.tty,
        resize: c.resize,
        signals: c.signals,
    }
}

pub fn health_response(report: HealthReport) -> pb::HealthResponse {
    let status = if report.draining {
        pb::ServingStatus::Draining
    } else {
        pb::ServingStatus::Ok
    };
    pb::HealthResponse {
        status: status as i32,
        active_jobs: report.active_jobs as u32,
        max_concurrent_jobs: report.max_concurrent_jobs,
        backend: report.backend.to_owned(),
        daytona_configured: report.daytona_configured,
        convex_configured: report.convex_configured,
        convex_healthy: report.convex_health.as_ref().is_some_and(|h| h.healthy),
        convex_error: report
            .convex_health
            .and_then(|h| h.error)
            .unwrap_or_default(),
        sinks: report.sinks.into_iter().map(str::to_owned).collect(),
        output_budget_in_use_bytes: report.output_budget_in_use as u64,
        output_budget_bytes: report.output_budget as u64,
        output_retained_bytes: report.output_retained as u64,
        capabilities: Some(capabilities_message(report.capabilities)),
        time: Some(SystemTime::now().into()),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime: Some(duration(report.uptime)),
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    // Saturates instead of failing: only durations beyond ~292 billion years overflow.
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 999_999_999,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::ExecRequest {
        pb::ExecRequest {
            command: "echo hi".into(),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_plain_command_and_argv() {
        let spec = job_spec(request()).unwrap();
        assert_eq!(spec.program, Program::Shell("echo hi".into()));
        let spec = job_spec(pb::ExecRequest {
            argv: vec!["printf".into(), "%s".into(), "a b".into()],
            cwd: "/tmp".into(),
            timeout: Some(prost_types::Duration {
                seconds: 3,
                nanos: 0,
            }),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            spec.program,
            Program::Argv(vec!["printf".into(), "%s".into(), "a b".into()])
        );
        assert_eq!(spec.cwd.as_deref(), Some("/tmp"));
        assert_eq!(spec.timeout, Some(Duration::from_secs(3)));
    }

    #[test]
    fn rejects_bad_requests_saying_why() {
        type Edit = fn(&mut pb::ExecRequest);
        let cases: &[(&str, Edit)] = &[
            ("not both", |r| r.argv = vec!["ls".into()]),
            ("exactly one", |r| r.command.clear()),
            ("blank", |r| r.command = "  \n".into()),
            ("NUL", |r| r.command = "echo \0".into()),
            ("argv[0]", |r| {
                r.command.clear();
                r.argv = vec!["".into()];
            }),
            ("argv[1] contains a NUL", |r| {
                r.command.clear();
                r.argv = vec!["ls".into(), "a\0".into()];
            }),
            ("empty name", |r| {
                r.env.insert("".into(), "v".into());
            }),
            ("contains '='", |r| {
                r.env.insert("A=B".into(), "v".into());
            }),
            ("env value of \"A\" contains a NUL", |r| {
                r.env.insert("A".into(), "x\0y".into());
            }),
            ("cwd contains a NUL", |r| r.cwd = "/tmp\0".into()),
            ("timeout must be positive", |r| {
                r.timeout = Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 0,
                })
            }),
            ("timeout must be positive", |r| {
                r.timeout = Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                })
            }),
            ("timeout must be positive", |r| {
                r.timeout = Some(prost_types::Duration {
                    seconds: i64::MIN,
                    nanos: 0,
                })
            }),
            ("nanos 2000000000 is outside", |r| {
                r.timeout = Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 2_000_000_000,
                })
            }),
            ("nanos -1 is outside", |r| {
                r.timeout = Some(prost_types::Duration {
                    seconds: 5,
                    nanos: -1,
                })
            }),
            ("task_id is longer", |r| r.task_id = "x".repeat(300)),
            ("session_id contains control", |r| {
                r.session_id = "a\nb".into()
            }),
        ];
        for (needle, edit) in cases {
            let mut req = request();
            edit(&mut req);
            match job_spec(req) {
                Err(Error::InvalidArgument(msg)) => {
                    assert!(msg.contains(needle), "{needle}: {msg}")
                }
                other => panic!("{needle}: expected InvalidArgument, got {other:?}"),
            }
        }
    }

    #[test]
    fn env_values_never_appear_in_errors() {
        let mut req = request();
        req.env.insert("SECRET".into(), "hunter2\0".into());
        let msg = job_spec(req).unwrap_err().to_string();
        assert!(!msg.contains("hunter2"), "{msg}");
    }

    #[test]
    fn job_ids_must_be_present() {
        assert!(matches!(
            job_id(String::new()),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(job_id("abc".into()).unwrap().as_str(), "abc");
    }

    /// Property tests of `job_spec` (proptest, 256 cases each: enough to reach every rule and
    /// limit, quick enough for every `cargo test`).
    mod properties {
        use std::collections::HashMap;

        use proptest::{collection, prelude::*};

        use super::*;

        /// Characters that matter to the rules (NUL, `=`, controls, blanks), and any at all.
        fn a_char() -> impl Strategy<Value = char> {
            prop_oneof![
                6 => proptest::char::range('a', 'z'),
                2 => any::<char>(),
                1 => Just('\0'),
                1 => Just('='),
                1 => Just(' '),
                1 => proptest::char::range('\u{1}', '\u{1f}'),
                1 => prop_oneof![Just('\u{7f}'), Just('\u{85}'), Just('\u{2028}')],
            ]
        }

        /// `len` bytes: `s` cut on a character boundary, or padded with `x`.
        fn sized(s: String, len: usize) -> String {
            let mut s = s;
            s.truncate(s.floor_char_boundary(len));
            while s.len() < len {
                s.push('x');
            }
            s
        }

        fn short() -> impl Strategy<Value = String> {
            collection::vec(a_char(), 0..8).prop_map(String::from_iter)
        }

        /// A field: mostly harmless (so that a request gets past its first fields and the later
        /// rules are reached too), often a few hostile characters, sometimes right at the `max`
        /// bytes of the field.
        fn text(max: usize) -> impl Strategy<Value = String> {
            let harmless = collection::vec(
                prop_oneof![
                    proptest::char::range('a', 'z'),
                    any::<char>().prop_filter("not a control", |c| !c.is_control()),
                ],
                0..8,
            )
            .prop_map(String::from_iter);
            prop_oneof![
                5 => harmless,
                2 => short(),
                1 => (short(), max - 1..=max + 1).prop_map(|(s, len)| sized(s, len)),
            ]
        }

        fn argv() -> impl Strategy<Value = Vec<String>> {
            prop_oneof![
                3 => Just(Vec::new()),
                6 => collection::vec(text(MAX_ARG_BYTES), 1..4),
                1 => (MAX_ARGV_LEN..=MAX_ARGV_LEN + 1).prop_map(|n| vec!["a".to_owned(); n]),
            ]
        }

        fn env() -> impl Strategy<Value = HashMap<String, String>> {
            prop_oneof![
                8 => collection::hash_map(text(MAX_ARG_BYTES), text(MAX_ARG_BYTES), 0..4),
                1 => (MAX_ENV_VARS..=MAX_ENV_VARS + 1)
                    .prop_map(|n| (0..n).map(|i| (format!("V{i}"), String::new())).collect()),
            ]
        }

        /// Any seconds and nanos, the edges of both more often.
        fn timeout() -> impl Strategy<Value = Option<prost_types::Duration>> {
            let seconds = prop_oneof![
                any::<i64>(),
                -2i64..=2,
                prop_oneof![Just(i64::MIN), Just(i64::MAX)],
            ];
            let nanos = prop_oneof![
                any::<i32>(),
                -2i32..=2,
                999_999_998i32..=1_000_000_001,
                -1_000_000_001i32..=-999_999_998,
                prop_oneof![Just(i32::MIN), Just(i32::MAX)],
            ];
            proptest::option::of(
                (seconds, nanos)
                    .prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
            )
        }

        /// A request from its parts: (task, session, sandbox) ids and (command, argv).
        fn exec_request(
            (task_id, session_id, sandbox_id): (String, String, String),
            (command, argv): (String, Vec<String>),
            cwd: String,
            env: std::collections::HashMap<String, String>,
            timeout: Option<prost_types::Duration>,
        ) -> pb::ExecRequest {
            pb::ExecRequest {
                task_id,
                session_id,
                sandbox_id,
                command,
                argv,
                cwd,
                env,
                timeout,
                ..Default::default()
            }
        }

        fn any_request() -> impl Strategy<Value = pb::ExecRequest> {
            (
                (text(MAX_ID_BYTES), text(MAX_ID_BYTES), text(MAX_ID_BYTES)),
                prop_oneof![Just(String::new()), text(MAX_ARG_BYTES)],
                argv(),
                prop_oneof![Just(String::new()), text(MAX_PATH_BYTES)],
                env(),
                timeout(),
            )
                .prop_map(|(ids, command, argv, cwd, env, timeout)| {
                    exec_request(ids, (command, argv), cwd, env, timeout)
                })
        }

        /// The valid requests as the proto, the README and the limits above document them
        /// (whether cwd exists and the server's maximum timeout are checked later).
        fn documented_valid(r: &pb::ExecRequest) -> bool {
            let clean = |s: &str, max: usize| !s.contains('\0') && s.len() <= max;
            let id = |s: &str| s.len() <= MAX_ID_BYTES && !s.chars().any(char::is_control);
            let program = match (r.command.is_empty(), r.argv.is_empty()) {
                (false, true) => !r.command.trim().is_empty() && clean(&r.command, MAX_ARG_BYTES),
                (true, false) => {
                    r.argv.len() <= MAX_ARGV_LEN
                        && !r.argv[0].is_empty()
                        && r.argv.iter().all(|a| clean(a, MAX_ARG_BYTES))
                }
                _ => false,
            };
            let env = r.env.len() <= MAX_ENV_VARS
                && r.env.iter().all(|(name, value)| {
                    !name.is_empty()
                        && !name.contains('=')
                        && clean(name, MAX_ARG_BYTES)
                        && clean(value, MAX_ARG_BYTES)
                });
            // Positive, with nanos in 0..1e9 (the sign of positive seconds).
            let timeout = r.timeout.is_none_or(|d| {
                (0..1_000_000_000).contains(&d.nanos)
                    && d.seconds >= 0
                    && (d.seconds, d.nanos) != (0, 0)
            });
            id(&r.task_id)
                && id(&r.session_id)
                && id(&r.sandbox_id)
                && program
                && clean(&r.cwd, MAX_PATH_BYTES)
                && env
                && timeout
        }

        /// Characters valid anywhere (no NUL, no controls, no `=`), any script.
        fn clean_text(max_chars: usize) -> impl Strategy<Value = String> {
            collection::vec(
                any::<char>().prop_filter("valid anywhere", |c| {
                    !c.is_control() && *c != '=' && !c.is_whitespace()
                }),
                1..max_chars,
            )
            .prop_map(String::from_iter)
        }

        /// Requests of a few valid shapes: a shell command or an argv, ids up to exactly
        /// their limit, a cwd or none, some env, no timeout or any valid one.
        fn valid_request() -> impl Strategy<Value = pb::ExecRequest> {
            let id = prop_oneof![
                3 => clean_text(16),
                1 => clean_text(16).prop_map(|s| sized(s, MAX_ID_BYTES)),
            ];
            let program = prop_oneof![
                // Shell command lines keep their blanks and newlines inside.
                clean_text(12).prop_map(|s| (format!(" {s}\n{s} "), Vec::new())),
                (clean_text(12), collection::vec(clean_text(6), 0..4)).prop_map(
                    |(program, mut args)| {
                        args.insert(0, program);
                        args.push(String::new()); // empty arguments are fine
                        (String::new(), args)
                    }
                ),
            ];
            let timeout = proptest::option::of(
                (0i64..=i64::MAX, 0i32..1_000_000_000)
                    .prop_filter("positive", |d| *d != (0, 0))
                    .prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
            );
            (
                (id.clone(), id.clone(), id),
                program,
                prop_oneof![Just(String::new()), clean_text(20)],
                collection::hash_map(clean_text(8), clean_text(8), 0..4),
                timeout,
            )
                .prop_map(|(ids, program, cwd, env, timeout)| {
                    exec_request(ids, program, cwd, env, timeout)
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Never panics; refuses with INVALID_ARGUMENT and a message exactly what the
            /// documentation refuses.
            #[test]
            fn any_request_is_accepted_exactly_when_documented_valid(req in any_request()) {
                let expected = documented_valid(&req);
                match job_spec(req.clone()) {
                    Ok(_) => prop_assert!(expected, "accepted an invalid request: {req:?}"),
                    Err(Error::InvalidArgument(msg)) => {
                        prop_assert!(!expected, "refused a valid request ({msg}): {req:?}");
                        prop_assert!(!msg.is_empty());
                    }
                    Err(other) => prop_assert!(false, "not INVALID_ARGUMENT: {other:?}"),
                }
            }

            /// A valid request becomes the spec it says.
            #[test]
            fn valid_requests_become_the_spec_they_say(req in valid_request()) {
                prop_assert!(documented_valid(&req), "{req:?}");
                let spec = job_spec(req.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&spec.meta.task_id, &req.task_id);
                prop_assert_eq!(&spec.meta.session_id, &req.session_id);
                prop_assert_eq!(&spec.meta.sandbox_id, &req.sandbox_id);
                let program = if req.argv.is_empty() {
                    Program::Shell(req.command.clone())
                } else {
                    Program::Argv(req.argv.clone())
                };
                prop_assert_eq!(spec.program, program);
                prop_assert_eq!(spec.cwd, Some(req.cwd.clone()).filter(|c| !c.is_empty()));
                prop_assert_eq!(spec.env, req.env.clone().into_iter().collect());
                let timeout = req
                    .timeout
                    .map(|d| Duration::new(d.seconds as u64, d.nanos as u32));
                prop_assert_eq!(spec.timeout, timeout);
            }
        }
    }
}
