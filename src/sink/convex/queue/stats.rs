//! The queue's delivery bookkeeping, apart from what goes in and out of it: what became of the
//! output the delivery task took (delivered, lost, decoded) and the counters Status reads.

use std::collections::VecDeque;

use super::Queue;
use crate::sink::convex::{assemble::Assembled, record::Item};

/// Counters of one job's delivery, read by Status.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stats {
    pub(crate) records_delivered: u64,
    pub(crate) bytes_delivered: u64,
    pub(crate) bytes_dropped: u64,
    pub(crate) in_flight_bytes: u64,
    pub(crate) invalid_bytes: u64,
    pub(crate) retries: u64,
    pub(crate) ambiguous_retries: u64,
    pub(crate) complete: bool,
    pub(crate) last_error: Option<String>,
}

impl Queue {
    /// Bytes queued or in flight.
    pub(crate) fn pending_bytes(&self) -> u64 {
        self.queued_bytes as u64 + self.stats.in_flight_bytes
    }

    /// Counts output that will never be delivered, here for Status and in `metrics` for the
    /// whole server.
    pub(super) fn count_dropped(&mut self, bytes: u64) {
        self.stats.bytes_dropped += bytes;
        metrics::counter!("sandbox_mirror_dropped_bytes_total", "sink" => crate::sink::convex::NAME)
            .increment(bytes);
    }

    /// A record taken was accepted.
    pub(crate) fn delivered(&mut self, text_bytes: usize) {
        self.stats.in_flight_bytes = self.stats.in_flight_bytes.saturating_sub(text_bytes as u64);
        self.stats.records_delivered += 1;
        self.stats.bytes_delivered += text_bytes as u64;
    }

    /// A record taken will never be delivered: it is counted and marked as a gap, in front of
    /// the records still `ready` (taken with it), else in front of the queue.
    pub(crate) fn lost(&mut self, item: &Item, ready: &mut VecDeque<Item>) {
        let Item::Text { text, ts, .. } = item else {
            return;
        };
        let bytes = text.len() as u64;
        self.stats.in_flight_bytes = self.stats.in_flight_bytes.saturating_sub(bytes);
        if ready.is_empty() {
            self.record_gap(bytes, *ts, None);
            return;
        }
        self.count_dropped(bytes);
        match ready.front_mut() {
            Some(Item::Gap { bytes: total, .. }) => *total += bytes,
            _ => ready.push_front(Item::Gap { bytes, ts: *ts }),
        }
    }

    /// The delivery task holds nothing taken any more.
    pub(crate) fn settled(&mut self) {
        self.stats.in_flight_bytes = 0;
    }

    /// What the delivery task found while making records of the last batch.
    pub(crate) fn assembled(&mut self, made: &Assembled) {
        self.stats.invalid_bytes += made.invalid;
        self.count_dropped(made.dropped);
    }

    /// A record is about to be sent again after `reason`; `ambiguous` when the server may have
    /// stored it already, so the retry can duplicate its row.
    pub(crate) fn record_retry(&mut self, ambiguous: bool, reason: &str) {
        self.stats.retries += 1;
        self.stats.ambiguous_retries += u64::from(ambiguous);
        self.record_error(reason);
    }

    /// Why the latest record was not delivered, for Status.
    pub(crate) fn record_error(&mut self, reason: &str) {
        self.stats.last_error = Some(reason.to_owned());
    }

    /// Records taken that will never be sent (delivery was abandoned): their text counts as
    /// dropped. Gap markers among them add nothing; their bytes were counted when dropped.
    pub(crate) fn drop_unsent(&mut self, unsent: impl IntoIterator<Item = Item>) {
        for item in unsent {
            self.count_dropped(item.text_len() as u64);
        }
    }

    /// Delivery of the job ends here: the record being sent (`item`), the records taken with it
    /// (`ready`) and everything queued or still to come are dropped and counted. Returns the
    /// bytes that were pending.
    pub(crate) fn abandon(&mut self, item: Option<&Item>, ready: &mut VecDeque<Item>) -> u64 {
        let pending = self.pending_bytes();
        if let Some(item) = item {
            self.lost(item, ready);
        }
        self.drop_unsent(ready.drain(..));
        self.close();
        pending
    }

    /// The delivery task has finished: nothing more will be delivered.
    pub(crate) fn mark_complete(&mut self) {
        self.stats.complete = true;
    }

    /// The counters so far, for Status and the closing log line.
    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::{
        job::StreamKind,
        sink::convex::{
            queue::{LINGER, Take},
            record::{End, MAX_RECORD_BYTES},
            test_support::{Drain, pairs, push, summary},
        },
    };

    /// A queue whose three full stdout records were taken by delivery, and those records.
    fn three_records_taken(now: Instant) -> (Queue, VecDeque<Item>) {
        let mut q = Queue::new(8 << 20);
        let mut drain = Drain::new();
        push(
            &mut q,
            StreamKind::Stdout,
            &vec![b'x'; 3 * MAX_RECORD_BYTES],
            1,
            now,
        );
        let Take::Send(batches) = q.take(now, [0, 0]) else {
            panic!("full records are ready")
        };
        let mut ready = VecDeque::new();
        for batch in batches {
            drain.asm.assemble(batch, &mut ready);
        }
        assert_eq!(ready.len(), 3);
        (q, ready)
    }

    #[test]
    fn a_record_lost_inside_a_run_is_marked_where_it_was() {
        let now = Instant::now();
        let (mut q, mut ready) = three_records_taken(now);
        let first = ready.pop_front().unwrap();
        q.delivered(first.text_len());
        let second = ready.pop_front().unwrap();
        q.lost(&second, &mut ready);
        assert_eq!(
            summary(ready.make_contiguous()),
            pairs(&[
                ("gap", &MAX_RECORD_BYTES.to_string()),
                ("stdout", &"x".repeat(MAX_RECORD_BYTES))
            ])
        );
        assert_eq!(q.stats.bytes_dropped, MAX_RECORD_BYTES as u64);
    }

    #[test]
    fn taken_output_stays_pending_until_delivered_or_settled() {
        let now = Instant::now();
        let mut q = Queue::new(1 << 20);
        push(&mut q, StreamKind::Stdout, b"abc", 1, now);
        push(&mut q, StreamKind::Stderr, b"de", 2, now);
        assert!(matches!(q.take(now + LINGER, [0, 0]), Take::Send(b) if b.len() == 2));
        assert_eq!(q.pending_bytes(), 5);
        q.delivered(3);
        assert_eq!(q.pending_bytes(), 2);
        assert_eq!(
            (q.stats().records_delivered, q.stats().bytes_delivered),
            (1, 3)
        );
        q.settled();
        assert_eq!(q.pending_bytes(), 0);
    }

    #[test]
    fn what_the_assembler_found_is_counted() {
        let mut q = Queue::new(1 << 20);
        q.assembled(&Assembled {
            records: 2,
            invalid: 4,
            dropped: 1,
        });
        q.assembled(&Assembled {
            records: 1,
            invalid: 1,
            dropped: 0,
        });
        assert_eq!((q.stats().invalid_bytes, q.stats().bytes_dropped), (5, 1));
    }

    #[test]
    fn retries_and_the_latest_error_are_kept_for_status() {
        let mut q = Queue::new(1 << 20);
        assert_eq!(q.stats().last_error, None);
        q.record_retry(false, "connection refused");
        assert_eq!(q.stats().last_error.as_deref(), Some("connection refused"));
        q.record_retry(true, "timed out");
        q.record_retry(true, "HTTP 502");
        assert_eq!(q.stats().last_error.as_deref(), Some("HTTP 502"));
        q.record_error("HTTP 400: bad record");
        let stats = q.stats();
        assert_eq!((stats.retries, stats.ambiguous_retries), (3, 2));
        assert_eq!(stats.last_error.as_deref(), Some("HTTP 400: bad record"));
    }

    #[test]
    fn abandoning_drops_what_was_taken_and_queued_and_leaves_nothing_pending() {
        let now = Instant::now();
        let total = 3 * MAX_RECORD_BYTES;
        let (mut q, mut ready) = three_records_taken(now);
        push(&mut q, StreamKind::Stderr, b"queued", 2, now);
        q.push_end(End::ExitCode(0), 3);
        // The first record is refused for good (e.g. 401): the job's mirror ends with it.
        let first = ready.pop_front().unwrap();
        assert_eq!(q.abandon(Some(&first), &mut ready), total as u64 + 6);
        assert!(ready.is_empty());
        assert_eq!(q.pending_bytes(), 0);
        assert_eq!(q.stats().bytes_dropped, total as u64 + 6);
        assert_eq!(q.take(now, [0, 0]), Take::Done);
    }

    #[test]
    fn unsent_records_count_as_dropped_except_gap_markers() {
        let mut q = Queue::new(1 << 20);
        q.drop_unsent([
            Item::Text {
                stream: StreamKind::Stdout,
                text: "abc".into(),
                ts: 1,
            },
            // Its bytes were counted when they were dropped.
            Item::Gap { bytes: 100, ts: 2 },
            Item::Final {
                end: End::ExitCode(0),
                ts: 3,
            },
        ]);
        assert_eq!(q.stats().bytes_dropped, 3);
    }

    #[test]
    fn the_mirror_is_complete_only_once_marked() {
        let mut q = Queue::new(1 << 20);
        q.push_end(End::ExitCode(0), 1);
        assert!(!q.stats().complete);
        q.mark_complete();
        assert!(q.stats().complete);
    }
}
