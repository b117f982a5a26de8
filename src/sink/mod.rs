//! Sinks receive a copy of every job's events, next to the Exec caller (e.g. a mirror into
//! Convex). A sink must never slow a job down: `JobSink::event` is called on the output path and
//! must return at once, queueing any slow work on tasks of its own.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;

use crate::job::{JobEvent, JobId, JobSpec};

/// A destination for job events.
#[async_trait]
pub trait Sink: Send + Sync {
    /// Name shown in Health.
    fn name(&self) -> &'static str;

    /// Called once as a job starts; returns the handle that receives this job's events, or
    /// `None` when this sink does not take this job.
    fn open(&self, job_id: &JobId, spec: &JobSpec) -> Option<Box<dyn JobSink>>;

    /// Delivers whatever is still queued, giving up after `deadline`. Called at shutdown.
    async fn flush(&self, deadline: Duration);
}

/// One job's connection to one sink.
pub trait JobSink: Send {
    /// Receives each event of the job in `seq` order. Must not block.
    fn event(&mut self, event: &JobEvent);
}

/// The configured sinks; empty when none is configured, which makes mirroring a no-op.
#[derive(Clone, Default)]
pub struct Sinks(Vec<Arc<dyn Sink>>);

impl Sinks {
    pub fn new(sinks: Vec<Arc<dyn Sink>>) -> Self {
        Sinks(sinks)
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|s| s.name()).collect()
    }

    pub(crate) fn open(&self, job_id: &JobId, spec: &JobSpec) -> Vec<Box<dyn JobSink>> {
        self.0.iter().filter_map(|s| s.open(job_id, spec)).collect()
    }

    /// Flushes all sinks concurrently, each within `deadline`.
    pub async fn flush(&self, deadline: Duration) {
        let mut flushes = tokio::task::JoinSet::new();
        for sink in &self.0 {
            let sink = Arc::clone(sink);
            flushes.spawn(async move { sink.flush(deadline).await });
        }
        while flushes.join_next().await.is_some() {}
    }
}
