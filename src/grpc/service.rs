//! `SandboxService` handlers: validate and convert, call the job core, convert back.

use std::{
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use crate::{
    error::Error,
    job::{InputClosed, InputError, JobStream, Jobs, ResizeRefused, SignalRefused},
    proto::{self as pb, sandbox_service_server::SandboxService},
};

/// How long an Attach stream may take to send its `open` request.
const ATTACH_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Facts about this instance that Health reports.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    pub started: Instant,
    pub daytona_configured: bool,
    pub convex_configured: bool,
    /// Name of the sink whose health Health reports as the Convex mirror's.
    pub convex_sink: &'static str,
}

/// The gRPC face of the job core.
pub struct SandboxApi {
    jobs: Arc<Jobs>,
    info: InstanceInfo,
}

impl SandboxApi {
    pub fn new(jobs: Arc<Jobs>, info: InstanceInfo) -> Self {
        SandboxApi { jobs, info }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ExecEvent, Status>> + Send>>;

#[tonic::async_trait]
impl SandboxService for SandboxApi {
    type ExecStream = EventStream;
    type AttachStream = EventStream;

    async fn exec(
        &self,
        request: Request<pb::ExecRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let request = request.into_inner();
        let as_text = request.text;
        let spec = convert::job_spec(request)?;
        let events = self.jobs.start(spec).await?;
        let job_id = events.job_id.clone();
        let stream = events.into_stream().map(move |event| {
            event
                .map(|event| convert::delivered(&job_id, event, as_text))
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn attach(
        &self,
        request: Request<Streaming<pb::AttachRequest>>,
    ) -> Result<Response<EventStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(ATTACH_OPEN_TIMEOUT, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no `open` request within {}s of opening the Attach stream",
                    ATTACH_OPEN_TIMEOUT.as_secs()
                ))
            })??;
        let open = convert::attach_open(first)?;
        let (id, on_gap, pace) = (&open.id, open.on_gap, open.pace);
        let events = match open.from {
            convert::AttachFrom::Log(position) => {
                self.jobs.attach(id, position, on_gap, pace).await?
            }
            convert::AttachFrom::Screen => self.jobs.attach_to_screen(id, on_gap, pace).await?,
        };
        Ok(Response::new(Box::pin(attach_stream(
            events,
            inbound,
            open.as_text,
        ))))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let (filter, limit, after) = convert::list_request(request.into_inner())?;
        let (jobs, next) = self.jobs.list(&filter, limit, after.as_ref());
        Ok(Response::new(convert::list_response(jobs, next)))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let id = convert::job_id(request.into_inner().job_id)?;
        let job = self.jobs.cancel(&id).await?;
        Ok(Response::new(convert::cancel_response(job)))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let id = convert::job_id(request.into_inner().job_id)?;
        let job = self.jobs.status(&id).await?;
        Ok(Response::new(convert::status_response(job)))
    }

    async fn send_input(
        &self,
        request: Request<pb::SendInputRequest>,
    ) -> Result<Response<pb::SendInputResponse>, Status> {
        let request = request.into_inner();
        let id = convert::job_id(request.job_id)?;
        let data = convert::input_data(request.data)?;
        let accepted_bytes = self.jobs.send_input(&id, data, request.offset).await?;
        Ok(Response::new(pb::SendInputResponse { accepted_bytes }))
    }

    async fn close_input(
        &self,
        request: Request<pb::CloseInputRequest>,
    ) -> Result<Response<pb::CloseInputResponse>, Status> {
        let id = convert::job_id(request.into_inner().job_id)?;
        let accepted_bytes = self.jobs.close_input(&id).await?;
        Ok(Response::new(pb::CloseInputResponse { accepted_bytes }))
    }

    async fn signal(
        &self,
        request: Request<pb::SignalRequest>,
    ) -> Result<Response<pb::SignalResponse>, Status> {
        let request = request.into_inner();
        let id = convert::job_id(request.job_id)?;
        let signal = convert::job_signal(request.signal)?;
        self.jobs.signal(&id, signal)?;
        Ok(Response::new(pb::SignalResponse {}))
    }

    async fn resize(
        &self,
        request: Request<pb::ResizeRequest>,
    ) -> Result<Response<pb::ResizeResponse>, Status> {
        let request = request.into_inner();
        let id = convert::job_id(request.job_id)?;
        let size = convert::terminal_size("resize", request.rows, request.cols)?;
        self.jobs.resize(&id, size)?;
        Ok(Response::new(pb::ResizeResponse {}))
    }

    async fn health(
        &self,
        _request: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let report = convert::HealthReport {
            draining: self.jobs.is_draining(),
            active_jobs: self.jobs.active(),
            max_concurrent_jobs: self.jobs.max_concurrent(),
            backend: self.jobs.backend_name(),
            daytona_configured: self.info.daytona_configured,
            convex_configured: self.info.convex_configured,
            convex_health: self.jobs.sinks().health(self.info.convex_sink),
            sinks: self.jobs.sinks().names(),
            uptime: self.info.started.elapsed(),
            output_budget_in_use: self.jobs.output_budget().shared_in_use(),
            output_budget: self.jobs.output_budget().shared_bytes(),
            output_retained: self.jobs.output_budget().retained_bytes(),
            capabilities: self.jobs.capabilities(),
        };
        Ok(Response::new(convert::health_response(report)))
    }
}

/// An Attach stream: the job's events, while taking the client's requests. A half-close ends
/// nothing; a client that goes away detaches (the stream ends, the job runs on). A stdin write
/// runs beside the events; meanwhile one more request is read (a signal is sent at once, input
/// waits its turn) and then no more until the write is done: a process that does not read its
/// stdin pushes back on the client's requests, never on the events it prints (which it may be
/// blocked on), and a client can still interrupt it.
fn attach_stream(
    events: JobStream,
    inbound: Streaming<pb::AttachRequest>,
    as_text: bool,
) -> impl Stream<Item = Result<pb::ExecEvent, Status>> + Send + 'static {
    let state = AttachState {
        events,
        as_text,
        inbound: Some(inbound),
        writing: None,
        queued: None,
        ended: false,
    };
    futures_util::stream::unfold(state, |mut state| async move {
        if state.ended {
            return None;
        }
        let item = state.next().await?;
        state.ended = item.is_err();
        Some((item, state))
    })
}

/// A stdin write (or close) of an Attach stream: the bytes accepted in all, or why not.
type InputWrite = Pin<Box<dyn Future<Output = Result<u64, Error>> + Send>>;

/// What an Attach stream holds between the events it sends.
struct AttachState {
    events: JobStream,
    /// Output as text where it is UTF-8.
    as_text: bool,
    /// `None` once the client half-closed.
    inbound: Option<Streaming<pb::AttachRequest>>,
    /// A stdin write (or close) under way.
    writing: Option<InputWrite>,
    /// The next one, read while that was under way.
    queued: Option<convert::FollowUp>,
    /// An error was sent: the stream is over.
    ended: bool,
}

impl AttachState {
    /// The next item for the client; `None` to end the stream quietly.
    async fn next(&mut self) -> Option<Result<pb::ExecEvent, Status>> {
        loop {
            let inbound = self.inbound.as_mut().filter(|_| self.queued.is_none());
            let from_client = async {
                match inbound {
                    Some(inbound) => inbound.message().await,
                    None => std::future::pending().await,
                }
            };
            let written = async {
                match self.writing.as_mut() {
                    Some(writing) => writing.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                next = self.events.next() => {
                    return Some(match next? {
                        Ok(event) => Ok(convert::delivered(&self.events.job_id, event, self.as_text)),
                        Err(e) => Err(Status::from(e)),
                    });
                }
                result = written => {
                    self.writing = None;
                    if let Some(end) = result.err().and_then(ends_attach) {
                        return Some(Err(end));
                    }
                    if let Err(e) = self.take_queued() {
                        return Some(Err(e));
                    }
                }
                message = from_client => match message {
                    // Half-closed: nothing more will come, the events go on.
                    Ok(None) => self.inbound = None,
                    // Reset or gone (often `Unknown`, not `Cancelled`): a detach.
                    Err(_) => return None,
                    Ok(Some(request)) => {
                        let follow_up = convert::follow_up(request).map_err(Status::from);
                        if let Err(e) = follow_up.and_then(|f| self.take(f)) {
                            return Some(Err(e));
                        }
                    }
                },
            }
        }
    }

    /// Acts on a request: a signal or resize at once, a write now or after the one under way.
    fn take(&mut self, follow_up: convert::FollowUp) -> Result<(), Status> {
        match follow_up {
            convert::FollowUp::Signal(signal) => match self.events.signal(signal) {
                Ok(()) => Ok(()),
                Err(e) => ends_attach(e).map_or(Ok(()), Err),
            },
            convert::FollowUp::Resize(size) => match self.events.resize(size) {
                Ok(()) => Ok(()),
                Err(e) => ends_attach(e).map_or(Ok(()), Err),
            },
            convert::FollowUp::Unknown => Err(Status::unimplemented(
                "unknown Attach request: this server takes `open`, `input`, `close_input`, \
                 `signal` and `resize`",
            )),
            write if self.writing.is_some() => {
                self.queued = Some(write);
                Ok(())
            }
            convert::FollowUp::Input { data, offset } => {
                self.writing = Some(Box::pin(self.events.write_input(data, offset)));
                Ok(())
            }
            convert::FollowUp::CloseInput => {
                self.writing = Some(Box::pin(self.events.close_input()));
                Ok(())
            }
        }
    }

    fn take_queued(&mut self) -> Result<(), Status> {
        match self.queued.take() {
            Some(follow_up) => self.take(follow_up),
            None => Ok(()),
        }
    }
}

/// Whether a refused request ends an Attach stream: a client's mistake does (a write past the
/// accepted end, to a job without stdin; a signal its backend cannot send), but not what the job
/// did meanwhile (closed its stdin, exited): that request is dropped and the events go on to
/// `Exited`. Returns the status to end with, if any.
fn ends_attach(e: Error) -> Option<Status> {
    match &e {
        Error::Input {
            source: InputError::Closed(why),
            ..
        } if *why != InputClosed::NotRequested => None,
        Error::Signal {
            source: SignalRefused::Exited | SignalRefused::Finished,
            ..
        }
        | Error::Resize {
            source: ResizeRefused::Finished,
            ..
        } => None,
        _ => Some(Status::from(e)),
    }
}
