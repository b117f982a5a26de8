//! `SandboxService` handlers: validate and convert, call the job core, convert back.

use std::{pin::Pin, sync::Arc, time::Instant};

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::convert;
use crate::{
    job::Jobs,
    proto::{self as pb, sandbox_service_server::SandboxService},
};

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

    async fn exec(
        &self,
        request: Request<pb::ExecRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let spec = convert::job_spec(request.into_inner())?;
        let events = self.jobs.start(spec).await?;
        let job_id = events.job_id.clone();
        let stream = events.map(move |event| {
            event
                .map(|event| convert::exec_event(&job_id, event))
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
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
        };
        Ok(Response::new(convert::health_response(report)))
    }
}
