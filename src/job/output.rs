//! The single path every event of a job takes: numbering, offsets, byte counts, the sinks and
//! the caller's bounded stream.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::JobSink;
use super::{EventKind, JobEvent, StreamKind, record::JobRecord};

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
    /// The job's stop token: once stopped, a client that does not make room within
    /// `stopped_client_grace` is dropped, so a stuck reader cannot hold the job open.
    stop: CancellationToken,
    stopped_client_grace: Duration,
    /// Set once the program is gone: only `Exited` is left to send, and a client that does
    /// not make room for it within the grace must not hold the job (and its buffers) forever.
    ending: bool,
}

impl JobOutput {
    pub(crate) fn new(
        record: Arc<JobRecord>,
        client: mpsc::Sender<JobEvent>,
        sinks: Vec<Box<dyn JobSink>>,
        stopped_client_grace: Duration,
    ) -> Self {
        JobOutput {
            stop: record.stop.clone(),
            stopped_client_grace,
            record,
            next_seq: 0,
            stdout_offset: 0,
            stderr_offset: 0,
            client: Some(client),
            sinks,
            ending: false,
        }
    }

    /// The program is gone: from now on the caller gets `stopped_client_grace` per event, as
    /// for a stopped job.
    pub(crate) fn program_ended(&mut self) {
        self.ending = true;
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
        let Some(client) = &self.client else {
            return;
        };
        let bounded = self.ending;
        if !send_to_client(
            client,
            event,
            &self.stop,
            bounded,
            self.stopped_client_grace,
        )
        .await
        {
            self.client = None;
        }
    }
}

/// Sends `event` to the caller, waiting for room; false when the caller is gone or, once the
/// job is stopped (or `bounded`: its program has ended), did not make room within `grace`.
async fn send_to_client(
    client: &mpsc::Sender<JobEvent>,
    event: JobEvent,
    stop: &CancellationToken,
    bounded: bool,
    grace: Duration,
) -> bool {
    let within_grace = async {
        tokio::time::timeout(grace, client.reserve())
            .await
            .ok()
            .and_then(Result::ok)
    };
    // Waiting for room is what pushes back on the process; a stop bounds the wait.
    let permit = if bounded {
        within_grace.await
    } else {
        tokio::select! {
            biased;
            permit = client.reserve() => permit.ok(),
            _ = stop.cancelled() => within_grace.await,
        }
    };
    match permit {
        Some(permit) => {
            permit.send(event);
            true
        }
        None => {
            if !client.is_closed() {
                warn!(
                    ?grace,
                    "the client did not read the stopped job's output in time; \
                     dropping the rest of its stream"
                );
            }
            false
        }
    }
}
