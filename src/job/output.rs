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
    /// For a job whose chunks end on character boundaries (`JobSpec::text_output`): the
    /// incomplete last character of each stream's last chunk, sent with the next.
    split_chars: Option<[Vec<u8>; 2]>,
}

impl JobOutput {
    pub(crate) fn new(
        record: Arc<JobRecord>,
        sinks: Vec<Box<dyn JobSink>>,
        budget: JobBudget,
        on_char_boundaries: bool,
    ) -> Self {
        JobOutput {
            log: Arc::clone(&record.log),
            record,
            next_seq: 0,
            stdout_offset: 0,
            stderr_offset: 0,
            sinks,
            budget,
            split_chars: on_char_boundaries.then(Default::default),
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
    pub async fn output_within(&mut self, stream: StreamKind, mut data: Bytes, credit: Credit) {
        if let Some(split) = self.split_chars.as_mut() {
            let carried = &mut split[stream.index()];
            let mut completed = None;
            if !carried.is_empty() {
                let needs = utf8_char_len(carried[0]).saturating_sub(carried.len());
                let continues = data.iter().take(needs).all(|&b| is_continuation(b));
                if continues && data.len() < needs {
                    // Still not the whole character.
                    carried.extend_from_slice(&data);
                    return;
                }
                let mut joined = std::mem::take(carried);
                if continues {
                    joined.extend_from_slice(&data.split_to(needs));
                }
                // (Otherwise the carried bytes were no character: they go as they are.)
                completed = Some(Bytes::from(joined));
            }
            let tail = incomplete_tail(&data);
            carried.extend_from_slice(&data.split_off(data.len() - tail));
            if let Some(completed) = completed {
                // At most 4 bytes, outside any credit.
                self.emit_output(stream, completed, Credit::default()).await;
            }
        }
        self.emit_output(stream, data, credit).await;
    }

    /// Sends what is carried of each stream's last character: the job's output is complete.
    pub(crate) async fn flush_split_chars(&mut self) {
        let Some(split) = self.split_chars.as_mut() else {
            return;
        };
        let carried = [StreamKind::Stdout, StreamKind::Stderr]
            .map(|stream| (stream, std::mem::take(&mut split[stream.index()])));
        for (stream, bytes) in carried {
            self.emit_output(stream, Bytes::from(bytes), Credit::default())
                .await;
        }
    }

    async fn emit_output(&mut self, stream: StreamKind, data: Bytes, credit: Credit) {
        if data.is_empty() {
            return;
        }
        if self.stdout_offset + self.stderr_offset == 0 {
            metrics::histogram!("sandbox_job_first_output_seconds", "backend" => self.record.backend)
                .record(self.record.started.elapsed().as_secs_f64());
        }
        metrics::counter!("sandbox_job_output_bytes_total", "stream" => stream.as_str())
            .increment(data.len() as u64);
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

fn is_continuation(byte: u8) -> bool {
    byte & 0xC0 == 0x80
}

/// The length of the UTF-8 character `lead` starts (1 for a byte that starts none).
fn utf8_char_len(lead: u8) -> usize {
    match lead {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 1,
    }
}

/// How many bytes at the end of `data` are the start of a character that is not complete yet
/// (valid so far): 0 to 3.
fn incomplete_tail(data: &[u8]) -> usize {
    for len in 1..=data.len().min(3) {
        let start = data.len() - len;
        if is_continuation(data[start]) {
            continue;
        }
        let valid_so_far =
            matches!(std::str::from_utf8(&data[start..]), Err(e) if e.error_len().is_none());
        return if utf8_char_len(data[start]) > len && valid_so_far {
            len
        } else {
            0
        };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_incomplete_last_character_is_held_back() {
        let e_acute = "é".as_bytes(); // C3 A9
        let euro = "€".as_bytes(); // E2 82 AC
        let smile = "😀".as_bytes(); // F0 9F 98 80
        assert_eq!(incomplete_tail(b"plain"), 0);
        assert_eq!(incomplete_tail(b""), 0);
        assert_eq!(incomplete_tail("caf\u{e9}".as_bytes()), 0);
        assert_eq!(incomplete_tail(&[b'x', e_acute[0]]), 1);
        assert_eq!(incomplete_tail(&euro[..2]), 2);
        assert_eq!(incomplete_tail(&smile[..3]), 3);
        assert_eq!(incomplete_tail(&smile[..1]), 1);
        // Not a character's start: sent as it is (it is not text anyway).
        assert_eq!(incomplete_tail(&[b'x', 0xFF]), 0);
        assert_eq!(incomplete_tail(&[0xA9]), 0);
        assert_eq!(
            incomplete_tail(&[0xE0, 0x80]),
            0,
            "overlong: invalid already"
        );
    }
}
