//! The single path every event of a job takes: numbering, offsets, byte counts, the sinks and
//! the caller's bounded stream, with each output event's [`Credit`] in the output budget.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{
    EventKind, JobEvent, JobSink, StreamKind,
    budget::{Credit, JobBudget},
    record::JobRecord,
};

/// An event on its way to the caller, with the credit for the bytes it holds.
pub(crate) struct Delivery {
    pub(crate) event: JobEvent,
    pub(crate) credit: Credit,
}

/// The receiving end of a job's events, shared with [`JobOutput`] so that giving up on a
/// caller also frees what it left unread (and its credit), not only what comes after.
pub(crate) type ClientQueue = Arc<Mutex<mpsc::Receiver<Delivery>>>;

/// Closes a caller's queue and drops what it left unread, freeing the credit that holds.
pub(crate) fn free_unread(queue: &ClientQueue) {
    let mut unread = queue.lock().expect("client queue poisoned");
    unread.close();
    while unread.try_recv().is_ok() {}
}

/// Hands a job's events, in order, to its sinks and to the Exec caller.
///
/// Backends call [`JobOutput::output`] (or read within a credit from [`JobOutput::budget`] and
/// call [`JobOutput::output_within`]); the lifecycle emits `Started` and `Exited`. Output waits
/// for credit in the server's output budget and for room in the caller's buffer, which is what
/// pushes back on the process.
pub struct JobOutput {
    record: Arc<JobRecord>,
    next_seq: u64,
    stdout_offset: u64,
    stderr_offset: u64,
    /// `None` once the caller has gone; events then still reach the sinks and the counters.
    client: Option<(mpsc::Sender<Delivery>, ClientQueue)>,
    sinks: Vec<Box<dyn JobSink>>,
    budget: JobBudget,
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
        client: (mpsc::Sender<Delivery>, ClientQueue),
        sinks: Vec<Box<dyn JobSink>>,
        budget: JobBudget,
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
            budget,
            ending: false,
        }
    }

    /// The job's access to the output budget, for backends that take credit before they read
    /// (so unread output stays in the process's pipe, not in memory).
    pub fn budget(&self) -> JobBudget {
        self.budget.clone()
    }

    /// The program is gone: from now on the caller gets `stopped_client_grace` per event, as
    /// for a stopped job.
    pub(crate) fn program_ended(&mut self) {
        self.ending = true;
    }

    /// Emits output already in memory. It is sent in pieces as large as the budget allows at
    /// once, each waiting for its credit. Empty chunks are dropped.
    pub async fn output(&mut self, stream: StreamKind, mut data: Bytes) {
        while !data.is_empty() {
            if self.client.is_none() {
                // Nothing is held for a caller that has gone: one piece, no credit.
                self.output_within(stream, data, Credit::default()).await;
                return;
            }
            let credit = self.budget.acquire(data.len()).await;
            let piece = data.split_to(credit.allowance().min(data.len()));
            self.output_within(stream, piece, credit).await;
        }
    }

    /// Emits a chunk read within `credit` (from [`JobOutput::budget`]), which goes with it to
    /// the caller. Empty chunks are dropped.
    pub async fn output_within(&mut self, stream: StreamKind, data: Bytes, credit: Credit) {
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
        self.emit_with(
            EventKind::Output {
                stream,
                offset,
                data,
            },
            credit,
        )
        .await;
    }

    pub(crate) async fn emit(&mut self, kind: EventKind) {
        self.emit_with(kind, Credit::default()).await;
    }

    async fn emit_with(&mut self, kind: EventKind, credit: Credit) {
        let event = JobEvent {
            seq: self.next_seq,
            time: SystemTime::now(),
            kind,
        };
        self.next_seq += 1;
        for sink in &mut self.sinks {
            sink.event(&event);
        }
        let Some((client, _)) = &self.client else {
            return;
        };
        let bounded = self.ending;
        let delivery = Delivery { event, credit };
        if !send_to_client(
            client,
            delivery,
            &self.stop,
            bounded,
            self.stopped_client_grace,
        )
        .await
        {
            self.drop_client();
        }
    }

    /// Stops sending to the caller, and frees what it left unread: its stream then ends
    /// without `Exited` (DATA_LOSS), which is what it gets for not reading.
    fn drop_client(&mut self) {
        if let Some((_sender, queue)) = self.client.take() {
            free_unread(&queue);
        }
    }
}

/// Sends `delivery` to the caller, waiting for room; false when the caller is gone or, once the
/// job is stopped (or `bounded`: its program has ended), did not make room within `grace`.
async fn send_to_client(
    client: &mpsc::Sender<Delivery>,
    delivery: Delivery,
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
            permit.send(delivery);
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
