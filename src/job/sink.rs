//! What the job core needs from destinations of job events: the traits `crate::sink::*`
//! implements, kept beside the code that calls them (`output`, `registry`).
//!
//! Sinks receive a copy of every job's events, next to the Exec caller (e.g. a mirror into
//! Convex). A sink must never slow a job down: `JobSink::event` is called on the output path and
//! must return at once, queueing any slow work on tasks of its own.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;

use super::{JobEvent, JobId, JobSpec};

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

    /// Whether deliveries currently succeed, for Health.
    fn health(&self) -> SinkHealth {
        SinkHealth::default()
    }

    /// Output bytes of all jobs together queued or in flight here now, for `metrics`; `None`
    /// when the sink queues nothing.
    fn pending_bytes(&self) -> Option<u64> {
        None
    }
}

/// One job's connection to one sink.
pub trait JobSink: Send {
    /// Receives each event of the job in `seq` order. Must not block.
    fn event(&mut self, event: &JobEvent);

    /// A live view of how far this job's delivery got, for Status; `None` when the sink does
    /// not track it.
    fn progress(&self) -> Option<Arc<dyn DeliveryReport>> {
        None
    }
}

/// Reads a job's delivery progress (cheap, lock-light: Status calls it).
pub trait DeliveryReport: Send + Sync {
    fn report(&self) -> DeliveryProgress;
}

/// How far one job's copy got in a sink. Byte counts are of the text sent (UTF-8).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryProgress {
    /// Records the destination accepted.
    pub records_delivered: u64,
    /// Output bytes in accepted records.
    pub bytes_delivered: u64,
    /// Output bytes that will never be delivered (queue overflow, rejected, retries exhausted).
    pub bytes_dropped: u64,
    /// Output bytes queued or in flight.
    pub bytes_pending: u64,
    /// Invalid UTF-8 bytes that were replaced by U+FFFD.
    pub invalid_bytes: u64,
    /// Requests that were retried.
    pub retries: u64,
    /// Retries after a timeout, where the destination may have stored the record already.
    pub ambiguous_retries: u64,
    /// True once delivery of the job ended: its final record was sent, or delivery gave up.
    pub complete: bool,
    /// The last delivery error of this job, for humans (never contains secrets).
    pub last_error: Option<String>,
}

/// Health of a sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkHealth {
    pub healthy: bool,
    /// Why it is unhealthy (never contains secrets).
    pub error: Option<String>,
}

impl Default for SinkHealth {
    fn default() -> Self {
        SinkHealth {
            healthy: true,
            error: None,
        }
    }
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

    /// The configured sinks.
    pub fn iter(&self) -> impl Iterator<Item = &dyn Sink> {
        self.0.iter().map(|s| s.as_ref())
    }

    /// Health of the sink called `name`, if it is configured.
    pub fn health(&self, name: &str) -> Option<SinkHealth> {
        self.0.iter().find(|s| s.name() == name).map(|s| s.health())
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
