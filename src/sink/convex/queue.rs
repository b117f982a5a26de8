//! One job's queue for the ingest endpoint. [`Queue`], shared with the job's output path under a
//! mutex, holds the **raw** output chunks (`Bytes` shared with the gRPC stream, not copied; small
//! chunks are appended to a small buffer of their own), bounded in bytes: past the bound the
//! oldest bytes are dropped and a gap marker stands where they were. Pushing is O(1) apart from
//! what the bound drops. The delivery task's [`Assembler`](super::assemble::Assembler) turns what
//! it takes into records at send time, so output that is dropped is never decoded.
//!
//! Pure logic, no I/O.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes, BytesMut};

use super::{
    record::{End, MAX_RECORD_BYTES},
    utf8::{incomplete_tail, is_continuation},
};
use crate::job::StreamKind;

mod stats;

use self::stats::Stats;

/// How long the first byte of a record may wait for more output of the same stream before the
/// record is sent anyway: long enough to coalesce a burst of small writes, short enough to feel
/// live in a terminal.
pub(crate) const LINGER: Duration = Duration::from_millis(100);

/// Chunks shorter than this are copied into a buffer of their own, appended to the previous
/// small chunk of the same stream, so a chatty job does not queue one entry per write.
const SMALL_CHUNK: usize = 8 * 1024;

/// What the delivery task takes from the queue: raw, to be made into records by
/// [`Assembler`](super::assemble::Assembler).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Batch {
    /// The `$ command` echo: a stdout record of its own.
    Echo {
        text: String,
        ts: u64,
    },
    /// The next bytes of one stream, at most one record's worth.
    Output {
        stream: StreamKind,
        chunks: Vec<Bytes>,
        ts: u64,
        /// The job ended and no more output of this stream follows.
        last: bool,
    },
    /// `bytes` were dropped here; `cut` says which streams lost bytes (their decoders resync).
    Gap {
        bytes: u64,
        ts: u64,
        cut: [bool; 2],
    },
    Final {
        end: End,
        ts: u64,
    },
}

/// What the delivery task should do next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// Make records of these and send them, in order.
    Send(Vec<Batch>),
    /// Nothing ready: wait for more output, or until this instant (the front record's linger).
    Wait(Option<Instant>),
    /// The final record was taken (or delivery was abandoned) and nothing remains.
    Done,
}

pub(super) fn index(stream: StreamKind) -> usize {
    match stream {
        StreamKind::Stdout => 0,
        StreamKind::Stderr => 1,
    }
}

/// Queued output bytes: shared with the gRPC stream, or small chunks copied together.
#[derive(Debug)]
enum Payload {
    Shared(Bytes),
    Small(BytesMut),
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::Shared(b) => b.len(),
            Payload::Small(b) => b.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Shared(b) => b,
            Payload::Small(b) => b,
        }
    }

    fn advance(&mut self, n: usize) {
        match self {
            Payload::Shared(b) => b.advance(n),
            Payload::Small(b) => b.advance(n),
        }
    }

    fn split_to(&mut self, n: usize) -> Bytes {
        match self {
            Payload::Shared(b) => b.split_to(n),
            Payload::Small(b) => b.split_to(n).freeze(),
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Payload::Shared(b) => b,
            Payload::Small(b) => b.freeze(),
        }
    }
}

#[derive(Debug)]
enum Entry {
    Echo {
        text: String,
        ts: u64,
    },
    Output {
        stream: StreamKind,
        data: Payload,
        /// Epoch milliseconds of the first byte.
        ts: u64,
        /// When its first byte was queued, for the linger.
        first_at: Instant,
    },
    Gap {
        bytes: u64,
        ts: u64,
        cut: [bool; 2],
    },
    Final {
        end: End,
        ts: u64,
    },
}

/// Output queued for Convex by all jobs together beyond what each job may always queue (one
/// record, [`MAX_RECORD_BYTES`]): the server-wide bound of the mirror's memory. A job whose
/// queue needs more than its own record and finds the shared bound used up drops its own oldest
/// output (with a gap marker), as it does at its per-job bound.
#[derive(Debug)]
pub(crate) struct SharedBound {
    used: AtomicUsize,
    limit: usize,
}

impl SharedBound {
    pub(crate) fn new(limit: usize) -> Arc<Self> {
        Arc::new(SharedBound {
            used: AtomicUsize::new(0),
            limit,
        })
    }

    /// Bytes of the shared bound held by queues now.
    #[cfg(test)]
    fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Takes up to `want` bytes of what is free; returns what it took.
    fn take_up_to(&self, want: usize) -> usize {
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            let got = want.min(self.limit.saturating_sub(used));
            if got == 0 {
                return 0;
            }
            match self.used.compare_exchange_weak(
                used,
                used + got,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return got,
                Err(now) => used = now,
            }
        }
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// The output of one job not yet handed to the delivery task, bounded in bytes: by its own
/// limit, and by what it holds of the [`SharedBound`] of all jobs.
#[derive(Debug)]
pub(crate) struct Queue {
    items: VecDeque<Entry>,
    /// Output (and echo) bytes in `items`.
    queued_bytes: usize,
    /// Output entries per stream in `items`.
    entries: [usize; 2],
    limit: usize,
    /// Largest `ts` handed out, so rows keep their order in Convex (it sorts by timestamp).
    last_ts: u64,
    /// The final record was queued; nothing more is accepted.
    finished: bool,
    /// Delivery was abandoned; everything is counted as dropped.
    closed: bool,
    /// Changed only by the queue's own methods, so the counters stay consistent with it.
    stats: Stats,
    shared: Arc<SharedBound>,
    /// Bytes of `shared` this queue holds: what it queues beyond its own record.
    charged: usize,
}

impl Queue {
    /// A queue of its own: `limit` is the most output bytes queued at once; at least
    /// [`MAX_RECORD_BYTES`].
    #[cfg(test)]
    pub(crate) fn new(limit: usize) -> Self {
        Queue::sharing(limit, SharedBound::new(usize::MAX))
    }

    /// A queue bounded by `limit` and by what it can take of `shared`.
    pub(crate) fn sharing(limit: usize, shared: Arc<SharedBound>) -> Self {
        Queue {
            items: VecDeque::new(),
            queued_bytes: 0,
            entries: [0; 2],
            limit: limit.max(MAX_RECORD_BYTES),
            last_ts: 0,
            finished: false,
            closed: false,
            stats: Stats::default(),
            shared,
            charged: 0,
        }
    }

    /// Bytes this queue may hold now: its own record plus its share of the shared bound,
    /// within its limit.
    fn room(&self) -> usize {
        (MAX_RECORD_BYTES + self.charged).min(self.limit)
    }

    /// Holds as much of the shared bound as the queued bytes need (and no more).
    fn settle_charge(&mut self) {
        let want = self
            .queued_bytes
            .min(self.limit)
            .saturating_sub(MAX_RECORD_BYTES);
        if want > self.charged {
            self.charged += self.shared.take_up_to(want - self.charged);
        } else if want < self.charged {
            self.shared.give_back(self.charged - want);
            self.charged = want;
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    fn stamp(&mut self, ts: u64) -> u64 {
        self.last_ts = self.last_ts.max(ts);
        self.last_ts
    }

    /// Queues the `$ command` echo: a stdout row of its own.
    pub(crate) fn push_echo(&mut self, text: String, ts: u64) {
        let ts = self.stamp(ts);
        self.queued_bytes += text.len();
        self.items.push_back(Entry::Echo { text, ts });
        self.enforce_bound();
    }

    /// Queues a chunk of output as it is (a reference, not a copy, unless it is small).
    pub(crate) fn push_output(&mut self, stream: StreamKind, data: &Bytes, ts: u64, now: Instant) {
        if self.finished || data.is_empty() {
            return;
        }
        if self.closed {
            self.count_dropped(data.len() as u64);
            return;
        }
        self.queued_bytes += data.len();
        let small = data.len() < SMALL_CHUNK;
        if small
            && let Some(Entry::Output {
                stream: last_stream,
                data: Payload::Small(buf),
                ..
            }) = self.items.back_mut()
            && *last_stream == stream
            && buf.len() + data.len() <= MAX_RECORD_BYTES
        {
            buf.extend_from_slice(data);
        } else {
            let ts = self.stamp(ts);
            let data = if small {
                Payload::Small(BytesMut::from(&data[..]))
            } else {
                Payload::Shared(data.clone())
            };
            self.entries[index(stream)] += 1;
            self.items.push_back(Entry::Output {
                stream,
                data,
                ts,
                first_at: now,
            });
        }
        self.enforce_bound();
    }

    /// Drops the oldest queued output until the queue fits its bound; a gap marker at the front
    /// says how much went missing there. A chunk is cut at the next character start (at most 3
    /// bytes further), so what is kept does not begin inside a character.
    fn enforce_bound(&mut self) {
        self.settle_charge();
        while self.queued_bytes > self.room() {
            let excess = self.queued_bytes - self.room();
            let at = usize::from(matches!(self.items.front(), Some(Entry::Gap { .. })));
            let (bytes, ts, stream) = match self.items.get_mut(at) {
                Some(Entry::Output {
                    stream, data, ts, ..
                }) if excess < data.len() => {
                    let bytes = data.bytes();
                    let mut cut = excess;
                    while cut < bytes.len() && cut - excess < 3 && is_continuation(bytes[cut]) {
                        cut += 1;
                    }
                    let (len, ts, stream) = (bytes.len(), *ts, *stream);
                    if cut < len {
                        data.advance(cut);
                        self.queued_bytes -= cut;
                        self.record_gap(cut as u64, ts, Some(stream));
                        continue;
                    }
                    (len, ts, Some(stream))
                }
                Some(Entry::Output {
                    stream, data, ts, ..
                }) => (data.len(), *ts, Some(*stream)),
                Some(Entry::Echo { text, ts }) => (text.len(), *ts, None),
                _ => break,
            };
            self.items.remove(at);
            if let Some(stream) = stream {
                self.entries[index(stream)] -= 1;
            }
            self.queued_bytes -= bytes;
            self.record_gap(bytes as u64, ts, stream);
        }
        // Drops may leave more of the shared bound held than is needed.
        self.settle_charge();
    }

    /// Counts `bytes` of output as lost just before the queued records and marks the spot.
    pub(crate) fn record_gap(&mut self, bytes: u64, ts: u64, stream: Option<StreamKind>) {
        self.count_dropped(bytes);
        if self.closed {
            return;
        }
        match self.items.front_mut() {
            Some(Entry::Gap {
                bytes: total, cut, ..
            }) => {
                *total += bytes;
                if let Some(s) = stream {
                    cut[index(s)] = true;
                }
            }
            _ => {
                let mut cut = [false; 2];
                if let Some(s) = stream {
                    cut[index(s)] = true;
                }
                self.items.push_front(Entry::Gap { bytes, ts, cut });
            }
        }
    }

    /// Queues the final record.
    pub(crate) fn push_end(&mut self, end: End, ts: u64) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.closed {
            return;
        }
        let ts = self.stamp(ts);
        self.items.push_back(Entry::Final { end, ts });
    }

    /// Hands the front of the queue to the delivery task when it is ready: the echo, the final
    /// record, or output records. Output is ready once something else follows it (a stream
    /// switch, the end), it fills a record, or it lingered long enough; a record is at most
    /// [`MAX_RECORD_BYTES`] including what the decoder carries (`carried`, per stream: stdout,
    /// stderr). As many ready records are taken at once as fit in the reserve (1 MiB, or an
    /// eighth of the bound), and a gap marker is taken with the records after it: output the
    /// delivery task holds is not dropped, so a saturated mirror sends long runs of full records
    /// between gap markers, not one marker per record.
    pub(crate) fn take(&mut self, now: Instant, carried: [usize; 2]) -> Take {
        let mut batches = Vec::new();
        if let Some(Entry::Gap { bytes, ts, cut }) = self.items.front() {
            batches.push(Batch::Gap {
                bytes: *bytes,
                ts: *ts,
                cut: *cut,
            });
            self.items.pop_front();
        }
        let mut carried = carried;
        let mut taken = 0;
        let mut due = None;
        while taken < self.reserve() {
            match self.items.front() {
                Some(Entry::Output { .. }) => match self.take_record(now, carried) {
                    Ok((batch, bytes, stream, tail)) => {
                        taken += bytes;
                        carried[index(stream)] = tail;
                        batches.push(batch);
                    }
                    Err(lingers) => {
                        due = Some(lingers);
                        break;
                    }
                },
                Some(Entry::Echo { .. } | Entry::Final { .. }) if batches.is_empty() => {
                    match self.items.pop_front() {
                        Some(Entry::Echo { text, ts }) => {
                            self.queued_bytes -= text.len();
                            taken += text.len();
                            batches.push(Batch::Echo { text, ts });
                        }
                        Some(Entry::Final { end, ts }) => batches.push(Batch::Final { end, ts }),
                        _ => unreachable!("matched above"),
                    }
                    break;
                }
                _ => break,
            }
        }
        if batches.is_empty() {
            return if let Some(due) = due {
                Take::Wait(Some(due))
            } else if self.items.is_empty() && (self.finished || self.closed) {
                Take::Done
            } else {
                Take::Wait(None)
            };
        }
        self.stats.in_flight_bytes = taken as u64;
        self.settle_charge();
        Take::Send(batches)
    }

    /// Output bytes the delivery task may hold at once.
    fn reserve(&self) -> usize {
        (self.limit / 8).clamp(MAX_RECORD_BYTES, 1 << 20)
    }

    /// Takes one record of the stream at the front, or says until when it lingers. Returns the
    /// batch, its bytes, its stream and what the decoder will carry after it.
    #[allow(clippy::type_complexity)]
    fn take_record(
        &mut self,
        now: Instant,
        carried: [usize; 2],
    ) -> Result<(Batch, usize, StreamKind, usize), Instant> {
        let Some(Entry::Output {
            stream, first_at, ..
        }) = self.items.front()
        else {
            unreachable!("the caller checked");
        };
        let (stream, first_at) = (*stream, *first_at);
        let budget = MAX_RECORD_BYTES.saturating_sub(carried[index(stream)]);
        // The run of this stream's output at the front, up to one record.
        let mut run = 0;
        let mut followed = false;
        for entry in &self.items {
            match entry {
                Entry::Output {
                    stream: s, data, ..
                } if *s == stream => {
                    run += data.len();
                    if run >= budget {
                        break;
                    }
                }
                _ => {
                    followed = true;
                    break;
                }
            }
        }
        if !followed && run < budget {
            let due = first_at + LINGER;
            if now < due {
                return Err(due);
            }
        }
        let mut chunks = Vec::new();
        let mut taken = 0;
        let mut ts = None;
        while taken < budget {
            let Some(Entry::Output {
                stream: s,
                data,
                ts: entry_ts,
                ..
            }) = self.items.front_mut()
            else {
                break;
            };
            if *s != stream {
                break;
            }
            ts.get_or_insert(*entry_ts);
            let want = budget - taken;
            if data.len() > want {
                chunks.push(data.split_to(want));
                taken += want;
                break;
            }
            taken += data.len();
            let Some(Entry::Output { data, .. }) = self.items.pop_front() else {
                unreachable!("front is output");
            };
            self.entries[index(stream)] -= 1;
            chunks.push(data.into_bytes());
        }
        self.queued_bytes -= taken;
        let tail = incomplete_tail(&chunks);
        let batch = Batch::Output {
            stream,
            chunks,
            ts: ts.expect("took output"),
            last: self.finished && self.entries[index(stream)] == 0,
        };
        Ok((batch, taken, stream, tail))
    }

    /// Gives up on the job: every queued and future record is dropped (counted). The delivery
    /// task drops what it took too (see [`abandon`](Self::abandon)), so nothing is in flight.
    pub(crate) fn close(&mut self) {
        self.closed = true;
        self.stats.in_flight_bytes = 0;
        self.count_dropped(self.queued_bytes as u64);
        self.queued_bytes = 0;
        self.entries = [0; 2];
        self.items.clear();
        self.settle_charge();
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.shared.give_back(self.charged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::convex::{
        record::Item,
        test_support::{Drain, pairs, push, summary, texts},
    };

    #[test]
    fn coalesces_same_stream_and_keeps_stream_order() {
        let now = Instant::now();
        let mut q = Queue::new(1 << 20);
        q.push_echo("$ cmd".into(), 1);
        push(&mut q, StreamKind::Stdout, b"a", 2, now);
        push(&mut q, StreamKind::Stdout, b"b", 3, now);
        push(&mut q, StreamKind::Stderr, b"c", 4, now);
        push(&mut q, StreamKind::Stdout, b"d", 5, now);
        q.push_end(End::ExitCode(3), 6);
        let items = texts(&mut q, now);
        assert_eq!(
            summary(&items),
            pairs(&[
                ("stdout", "$ cmd"),
                ("stdout", "ab"),
                ("stderr", "c"),
                ("stdout", "d"),
                ("final", "ExitCode(3)")
            ])
        );
        assert_eq!(q.take(now, [0, 0]), Take::Done);
        assert_eq!(q.stats.records_delivered, 5);
        assert_eq!(q.pending_bytes(), 0);
    }

    #[test]
    fn large_chunks_are_queued_by_reference_and_joined_into_full_records() {
        let now = Instant::now();
        let mut q = Queue::new(1 << 20);
        let big = Bytes::from(vec![b'x'; 40 * 1024]);
        for i in 0..3 {
            q.push_output(StreamKind::Stdout, &big, i, now);
        }
        let Take::Send(mut batches) = q.take(now, [0, 0]) else {
            panic!("a full record is ready")
        };
        assert_eq!(batches.len(), 1);
        let Some(Batch::Output { chunks, ts, .. }) = batches.pop() else {
            panic!("{batches:?}")
        };
        // Two chunks make the record; both point into the pushed buffer (no copy).
        assert_eq!(ts, 0);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].as_ptr(), big.as_ptr());
        assert_eq!(chunks[1].as_ptr(), big.as_ptr());
        assert_eq!(
            chunks.iter().map(Bytes::len).sum::<usize>(),
            MAX_RECORD_BYTES
        );
        // The rest (56 KiB) is not full: it lingers.
        assert_eq!(q.take(now, [0, 0]), Take::Wait(Some(now + LINGER)));
        assert_eq!(q.pending_bytes(), 120 * 1024);
    }

    #[test]
    fn the_last_record_lingers_unless_full() {
        let now = Instant::now();
        let mut q = Queue::new(1 << 20);
        push(&mut q, StreamKind::Stdout, b"x", 1, now);
        assert_eq!(q.take(now, [0, 0]), Take::Wait(Some(now + LINGER)));
        assert!(matches!(q.take(now + LINGER, [0, 0]), Take::Send(_)));
        q.delivered(1);
        assert_eq!(q.take(now, [0, 0]), Take::Wait(None));
        // A full record goes at once.
        push(
            &mut q,
            StreamKind::Stdout,
            &[b'y'; MAX_RECORD_BYTES],
            2,
            now,
        );
        assert!(matches!(q.take(now, [0, 0]), Take::Send(_)));
        // Bytes the decoder carries count toward the record.
        push(
            &mut q,
            StreamKind::Stdout,
            &[b'z'; MAX_RECORD_BYTES - 2],
            3,
            now,
        );
        assert!(matches!(q.take(now, [0, 0]), Take::Wait(Some(_))));
        assert!(matches!(q.take(now, [2, 0]), Take::Send(_)));
    }

    #[test]
    fn overflow_drops_the_oldest_output_and_marks_the_gap() {
        let now = Instant::now();
        let limit = MAX_RECORD_BYTES * 2;
        let mut q = Queue::new(limit);
        q.push_echo("$ cmd".into(), 1);
        // The echo is in flight; a stalled destination leaves everything else queued.
        assert!(matches!(q.take(now, [0, 0]), Take::Send(_)));
        for i in 0..10u8 {
            push(
                &mut q,
                StreamKind::Stdout,
                &vec![b'a' + i; MAX_RECORD_BYTES],
                2,
                now,
            );
            assert!(
                q.pending_bytes() as usize <= limit + 5,
                "{}",
                q.pending_bytes()
            );
        }
        q.push_end(End::ExitCode(0), 3);
        q.delivered(5);
        let items = texts(&mut q, now);
        assert_eq!(
            summary(&items)
                .iter()
                .map(|(s, t)| format!("{s}:{}", &t[..t.len().min(1)]))
                .collect::<Vec<_>>(),
            ["gap:5", "stdout:i", "stdout:j", "final:E"]
        );
        assert_eq!(
            items[0],
            Item::Gap {
                bytes: 8 * MAX_RECORD_BYTES as u64,
                ts: 2
            }
        );
        assert_eq!(q.stats.bytes_dropped, 8 * MAX_RECORD_BYTES as u64);
    }

    #[test]
    fn a_saturated_queue_sends_runs_of_full_records_between_single_gap_markers() {
        let now = Instant::now();
        const MIB: usize = 1 << 20;
        let mut q = Queue::new(8 * MIB);
        let mut drain = Drain::new();
        let mut kinds = String::new();
        let mut next = 0u8;
        let mut delivered_bytes = 0;
        // A producer far faster than delivery: 3 MiB arrive per take.
        for _ in 0..20 {
            for _ in 0..3 {
                push(
                    &mut q,
                    StreamKind::Stdout,
                    &vec![b'a' + next % 26; MIB],
                    1,
                    now,
                );
                next += 1;
            }
            let Take::Send(batches) = q.take(now, drain.asm.carried()) else {
                panic!("output is ready")
            };
            let mut made = VecDeque::new();
            for batch in batches {
                q.assembled(&drain.asm.assemble(batch, &mut made));
            }
            // While the delivery task holds them, more output overflows the queue again.
            push(&mut q, StreamKind::Stdout, &vec![b'#'; MIB], 1, now);
            let mut run = String::new();
            for item in made {
                match &item {
                    Item::Gap { .. } => kinds.push('G'),
                    Item::Text { text, .. } => {
                        assert_eq!(text.len(), MAX_RECORD_BYTES);
                        kinds.push('T');
                        run.push_str(text);
                    }
                    Item::Final { .. } => unreachable!(),
                }
                q.delivered(item.text_len());
                delivered_bytes += item.text_len();
            }
            q.settled();
            // A run is contiguous output: one or two chunks' bytes, never cut by a gap.
            assert_eq!(run.len(), MIB);
            assert!(q.pending_bytes() <= 8 * MIB as u64);
        }
        // The queue fills in two rounds; then one marker per 1 MiB run (16 full records), never
        // two markers in a row.
        let saturated = ("G".to_owned() + &"T".repeat(16)).repeat(18);
        assert_eq!(kinds, "T".repeat(32) + &saturated);
        assert_eq!(
            q.stats.bytes_dropped + q.pending_bytes() + delivered_bytes as u64,
            80 * MIB as u64
        );
    }

    #[test]
    fn dropping_part_of_a_chunk_keeps_the_newest_bytes_exactly() {
        let now = Instant::now();
        let limit = MAX_RECORD_BYTES;
        let mut q = Queue::new(limit);
        let data: Vec<u8> = (0..3 * MAX_RECORD_BYTES / 2)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        push(&mut q, StreamKind::Stdout, &data, 1, now);
        assert_eq!(q.pending_bytes(), limit as u64);
        q.push_end(End::ExitCode(0), 2);
        let items = texts(&mut q, now);
        let dropped = data.len() - limit;
        assert_eq!(
            items[0],
            Item::Gap {
                bytes: dropped as u64,
                ts: 1
            }
        );
        assert_eq!(items[1].text_len(), limit);
        assert_eq!(summary(&items[1..2])[0].1.as_bytes(), &data[dropped..]);
        assert_eq!(q.stats.bytes_dropped, dropped as u64);
    }

    #[test]
    fn a_drop_inside_a_character_moves_to_the_next_character() {
        let now = Instant::now();
        let limit = MAX_RECORD_BYTES;
        let mut q = Queue::new(limit);
        // "€" is 3 bytes: a limit of 64 KiB with 1 byte over cuts the first kept character
        // after its lead byte; the cut moves past its 2 continuation bytes instead.
        let text = "€".repeat(MAX_RECORD_BYTES / 3 + 1); // 65_538 bytes: 2 over
        push(&mut q, StreamKind::Stdout, text.as_bytes(), 1, now);
        q.push_end(End::ExitCode(0), 2);
        let mut drain = Drain::new();
        let items = drain.run(&mut q, now);
        assert_eq!(items[0], Item::Gap { bytes: 3, ts: 1 });
        let Item::Text { text: kept, .. } = &items[1] else {
            panic!("{items:?}")
        };
        assert_eq!(kept.len(), text.len() - 3);
        assert!(kept.chars().all(|c| c == '€'));
        assert_eq!(drain.invalid, 0);
        assert_eq!(q.stats.bytes_dropped, 3);
    }

    #[test]
    fn small_chunks_share_one_buffer_and_large_ones_are_not_copied() {
        let now = Instant::now();
        let mut q = Queue::new(1 << 20);
        for _ in 0..1000 {
            push(&mut q, StreamKind::Stdout, b"0123456789abcdef\n", 1, now);
        }
        // 17_000 bytes in one entry, not 1000.
        assert_eq!(q.items.len(), 1);
        assert_eq!(q.entries, [1, 0]);
        q.push_end(End::ExitCode(0), 2);
        let items = texts(&mut q, now);
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].text_len(), 17_000);
    }

    #[test]
    fn timestamps_never_go_backwards() {
        let now = Instant::now();
        let mut q = Queue::new(1 << 20);
        push(&mut q, StreamKind::Stdout, b"a", 10, now);
        push(&mut q, StreamKind::Stderr, b"b", 5, now); // clock stepped back
        q.push_end(End::Error("cancelled".into()), 7);
        let ts: Vec<u64> = texts(&mut q, now)
            .iter()
            .map(|i| match i {
                Item::Text { ts, .. } | Item::Gap { ts, .. } | Item::Final { ts, .. } => *ts,
            })
            .collect();
        assert_eq!(ts, [10, 10, 10]);
    }

    #[test]
    fn a_closed_queue_counts_everything_as_dropped() {
        let now = Instant::now();
        let mut q = Queue::new(1 << 20);
        push(&mut q, StreamKind::Stdout, b"abc", 1, now);
        q.close();
        push(&mut q, StreamKind::Stdout, b"de", 2, now);
        q.push_end(End::ExitCode(0), 3);
        assert_eq!(q.take(now, [0, 0]), Take::Done);
        assert_eq!(q.stats.bytes_dropped, 5);
    }

    #[test]
    fn queues_share_one_bound_beyond_their_own_record_and_give_it_back() {
        let shared = SharedBound::new(3 * MAX_RECORD_BYTES);
        let chunk = Bytes::from(vec![b'x'; MAX_RECORD_BYTES]);
        let now = Instant::now();
        let mut hog = Queue::sharing(8 << 20, Arc::clone(&shared));
        for ts in 0..6 {
            hog.push_output(StreamKind::Stdout, &chunk, ts, now);
        }
        // Its own record plus the whole shared bound; the oldest output went, with a marker.
        assert_eq!(hog.queued_bytes, 4 * MAX_RECORD_BYTES);
        assert_eq!(shared.used(), 3 * MAX_RECORD_BYTES);
        assert_eq!(hog.stats.bytes_dropped, 2 * MAX_RECORD_BYTES as u64);
        // Another job still queues its own record, and no more while the bound is used up.
        let mut other = Queue::sharing(8 << 20, Arc::clone(&shared));
        other.push_output(StreamKind::Stdout, &chunk, 0, now);
        other.push_output(StreamKind::Stdout, &chunk, 1, now);
        assert_eq!(other.queued_bytes, MAX_RECORD_BYTES);
        assert_eq!(other.stats.bytes_dropped, MAX_RECORD_BYTES as u64);
        // What a queue hands to delivery, and a dropped queue, give the bound back.
        let Take::Send(_) = hog.take(now + LINGER, [0, 0]) else {
            panic!("full records are ready")
        };
        assert!(shared.used() < 3 * MAX_RECORD_BYTES);
        drop(hog);
        assert_eq!(shared.used(), 0);
        other.push_output(StreamKind::Stdout, &chunk, 2, now);
        assert_eq!(other.queued_bytes, 2 * MAX_RECORD_BYTES);
        assert_eq!(shared.used(), MAX_RECORD_BYTES);
    }

    #[test]
    fn the_echo_is_dropped_like_output_when_over_the_bound() {
        let now = Instant::now();
        let mut q = Queue::new(MAX_RECORD_BYTES);
        q.push_echo("$ cmd".into(), 1);
        push(
            &mut q,
            StreamKind::Stdout,
            &[b'x'; MAX_RECORD_BYTES],
            2,
            now,
        );
        let Take::Send(batches) = q.take(now, [0, 0]) else {
            panic!("a full record is ready")
        };
        // Not output of either stream: no decoder has to resync after it.
        assert_eq!(
            batches[0],
            Batch::Gap {
                bytes: 5,
                ts: 1,
                cut: [false, false]
            }
        );
        assert!(matches!(&batches[1..], [Batch::Output { ts: 2, .. }]));
        assert_eq!(q.stats.bytes_dropped, 5);
    }
}
