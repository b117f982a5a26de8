//! The single path every event of a job takes: numbering, offsets, byte counts, the sinks and
//! the caller's bounded stream.

use std::{sync::Arc, time::SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{EventKind, JobEvent, StreamKind, record::JobRecord};
use crate::sink::JobSink;

/// Hands a job's events, in order, to its sinks and to the Exec caller.
///
/// Backends call [`JobOutput::output`]; the lifecycle emits `Started` and `Exited`. Sending
/// waits while the caller's buffer is full, which is what pushes back on the process.
pub struct JobOutput {
    record: Arc<JobRecord>,
    next_seq: u64,
    stdout_offset: u64,
    stderr_offset: u64,
    /// `None` once the caller has gone; events then still reach the sinks and the counters.
    client: Option<mpsc::Sender<JobEvent>>,
    sinks: Vec<Box<dyn JobSink>>,
}

impl JobOutput {
    pub(crate) fn new(
        record: Arc<JobRecord>,
        client: mpsc::Sender<JobEvent>,
        sinks: Vec<Box<dyn JobSink>>,
    ) -> Self {
        JobOutput {
            record,
            next_seq: 0,
            stdout_offset: 0,
            stderr_offset: 0,
            client: Some(client),
            sinks,
        }
    }

    /// Emits a chunk of output. Empty chunks are dropped.
    pub async fn output(&mut self, stream: StreamKind, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let len = data.len() as u64;
        let offset_slot = match stream {
            StreamKind::Stdout => &mut self.stdout_offset,
            StreamKind::Stderr => &mut self.stderr_offset,
        };
        let offset = *offset_slot;
        *offset_slot += len;
        self.record.add_output(stream, len);
        self.emit(EventKind::Output {
            stream,
            offset,
            data,
        })
        .await;
    }

    /// True while the Exec caller still reads the stream.
    pub fn client_connected(&self) -> bool {
        self.client.as_ref().is_some_and(|c| !c.is_closed())
    }

    pub(crate) async fn emit(&mut self, kind: EventKind) {
        let event = JobEvent {
            seq: self.next_seq,
            time: SystemTime::now(),
            kind,
        };
        self.next_seq += 1;
        for sink in &mut self.sinks {
            sink.event(&event);
        }
        if let Some(client) = &self.client
            && client.send(event).await.is_err()
        {
            self.client = None;
        }
    }
}
