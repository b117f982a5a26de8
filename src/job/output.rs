//! The single path every event of a job takes: numbering, offsets, byte counts, the sinks and
//! the job's log, with each output event's [`Credit`] in the output budget.

use std::{sync::Arc, time::SystemTime};

use bytes::Bytes;

use super::{
    EventKind, JobEvent, JobSink, StreamKind,
    budget::{Credit, JobBudget},
    log::EventLog,
    record::JobRecord,
};

/// Hands a job's events, in order, to its sinks and to its log (which its readers follow).
///
/// Backends call [`JobOutput::output`] (or read within a credit from [`JobOutput::budget`] and
/// call [`JobOutput::output_within`]); the lifecycle emits `Started` and `Exited`. Output waits
/// for credit in the server's output budget and for room in the log that attached readers still
/// need, which is what pushes back on the process.
pub struct JobOutput {
    record: Arc<JobRecord>,
    log: Arc<EventLog>,
    next_seq: u64,
    stdout_offset: u64,
    stderr_offset: u64,
    sinks: Vec<Box<dyn JobSink>>,
    budget: JobBudget,
}

impl JobOutput {
    pub(crate) fn new(
        record: Arc<JobRecord>,
        sinks: Vec<Box<dyn JobSink>>,
        budget: JobBudget,
    ) -> Self {
        JobOutput {
            log: Arc::clone(&record.log),
            record,
            next_seq: 0,
            stdout_offset: 0,
            stderr_offset: 0,
            sinks,
            budget,
        }
    }

    /// The job's access to the output budget, for backends that take credit before they read
    /// (so unread output stays in the process's pipe, not in memory).
    pub fn budget(&self) -> JobBudget {
        self.budget.clone()
    }

    /// Emits output already in memory. It is sent in pieces as large as the budget allows at
    /// once, each waiting for its credit. Empty chunks are dropped.
    pub async fn output(&mut self, stream: StreamKind, mut data: Bytes) {
        while !data.is_empty() {
            let credit = self.budget.acquire(data.len()).await;
            let piece = data.split_to(credit.allowance().min(data.len()));
            self.output_within(stream, piece, credit).await;
        }
    }

    /// Emits a chunk read within `credit` (from [`JobOutput::budget`]), which the log holds with
    /// it. Empty chunks are dropped.
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
        // Drawn once in the log, so that the screen is never ahead of the log: a reader that
        // starts from a snapshot goes on from events the log has.
        let drawn = match (&self.record.screen, &event.kind) {
            (Some(_), EventKind::Output { data, .. }) => Some((event.seq, data.clone())),
            _ => None,
        };
        self.log.push(event, credit, &self.budget).await;
        if let (Some(screen), Some((seq, data))) = (&self.record.screen, drawn) {
            screen.draw(seq, &data);
        }
    }
}
