//! One job's queue of records for the ingest endpoint: UTF-8 decoding per stream, coalescing of
//! adjacent same-stream output, the byte bound with drop-oldest and gap markers, and the linger
//! rule that decides when the front record is ready to send. Pure logic, no I/O: the job's
//! output path pushes, the job's delivery task takes.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use crate::job::StreamKind;

/// Largest `data` of one output record, in UTF-8 bytes. Far under Convex's 1 MiB document limit
/// even if JSON escaping inflates it, and large enough that 20 MiB costs ~320 requests.
pub(crate) const MAX_RECORD_BYTES: usize = 64 * 1024;

/// How long the first byte of a record may wait for more output of the same stream before the
/// record is sent anyway: long enough to coalesce a burst of small writes, short enough to feel
/// live in a terminal.
pub(crate) const LINGER: Duration = Duration::from_millis(100);

/// How a job ended, as the final record says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// The program exited by itself with this code.
    ExitCode(i32),
    /// Anything else: cancelled, timed out, killed by a signal, failed to start.
    Error(String),
}

/// One record to send, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item {
    Text {
        stream: StreamKind,
        text: String,
        /// Epoch milliseconds of the record's first byte (never below an earlier record's).
        ts: u64,
        /// When its first byte was queued, for the linger.
        first_at: Instant,
        /// No more output may be appended (the `$ command` echo stays a row of its own).
        sealed: bool,
    },
    /// Output that will never be mirrored; sent as a visible marker where it would have been.
    Gap { bytes: u64, ts: u64 },
    /// The one last record.
    Final { end: End, ts: u64 },
}

impl Item {
    pub(crate) fn text_len(&self) -> usize {
        match self {
            Item::Text { text, .. } => text.len(),
            _ => 0,
        }
    }
}

/// What the delivery task should do next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// Send this.
    Send(Item),
    /// Nothing ready: wait for more output, or until this instant (the front record's linger).
    Wait(Option<Instant>),
    /// The final record was taken (or delivery was abandoned) and nothing remains.
    Done,
}

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

/// Decodes one stream's bytes as UTF-8 across chunk boundaries: an incomplete multi-byte
/// sequence at the end of a chunk is carried into the next one; invalid bytes become U+FFFD.
#[derive(Debug, Default)]
pub(crate) struct Utf8Stream {
    /// An incomplete (so far valid) sequence from the previous chunk: at most 3 bytes.
    carry: Vec<u8>,
}

impl Utf8Stream {
    /// Appends the decoded `input` to `out`; returns how many invalid bytes were replaced.
    pub(crate) fn decode(&mut self, input: &[u8], out: &mut String) -> u64 {
        // Only a chunk that follows a split character is copied.
        let joined;
        let bytes = if self.carry.is_empty() {
            input
        } else {
            joined = [std::mem::take(&mut self.carry).as_slice(), input].concat();
            &joined
        };
        let mut invalid = 0;
        let mut chunks = bytes.utf8_chunks().peekable();
        while let Some(chunk) = chunks.next() {
            out.push_str(chunk.valid());
            let bad = chunk.invalid();
            if bad.is_empty() {
                continue;
            }
            let at_end = chunks.peek().is_none();
            // `error_len() == None` means "valid so far, input ended": the rest may follow.
            let incomplete = matches!(std::str::from_utf8(bad), Err(e) if e.error_len().is_none());
            if at_end && incomplete {
                self.carry.extend_from_slice(bad);
            } else {
                out.push(char::REPLACEMENT_CHARACTER);
                invalid += bad.len() as u64;
            }
        }
        invalid
    }

    /// Ends the stream: a sequence still incomplete is invalid.
    pub(crate) fn finish(&mut self, out: &mut String) -> u64 {
        if self.carry.is_empty() {
            return 0;
        }
        out.push(char::REPLACEMENT_CHARACTER);
        std::mem::take(&mut self.carry).len() as u64
    }
}

/// The records of one job not yet handed to the delivery task, bounded in bytes.
#[derive(Debug)]
pub(crate) struct Queue {
    items: VecDeque<Item>,
    /// Text bytes in `items`.
    queued_bytes: usize,
    limit: usize,
    stdout: Utf8Stream,
    stderr: Utf8Stream,
    /// Largest `ts` handed out, so rows keep their order in Convex (it sorts by timestamp).
    last_ts: u64,
    /// The final record was queued; nothing more is accepted.
    finished: bool,
    /// Delivery was abandoned; everything is counted as dropped.
    closed: bool,
    pub(crate) stats: Stats,
}

impl Queue {
    /// `limit` is the most text bytes queued at once; at least [`MAX_RECORD_BYTES`].
    pub(crate) fn new(limit: usize) -> Self {
        Queue {
            items: VecDeque::new(),
            queued_bytes: 0,
            limit: limit.max(MAX_RECORD_BYTES),
            stdout: Utf8Stream::default(),
            stderr: Utf8Stream::default(),
            last_ts: 0,
            finished: false,
            closed: false,
            stats: Stats::default(),
        }
    }

    /// Text bytes queued or in flight.
    pub(crate) fn pending_bytes(&self) -> u64 {
        self.queued_bytes as u64 + self.stats.in_flight_bytes
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    fn stamp(&mut self, ts: u64) -> u64 {
        self.last_ts = self.last_ts.max(ts);
        self.last_ts
    }

    /// Queues the `$ command` echo: a stdout row of its own.
    pub(crate) fn push_echo(&mut self, line: String, ts: u64, now: Instant) {
        let ts = self.stamp(ts);
        self.queued_bytes += line.len();
        self.items.push_back(Item::Text {
            stream: StreamKind::Stdout,
            text: line,
            ts,
            first_at: now,
            sealed: true,
        });
        self.enforce_bound();
    }

    /// Decodes and queues a chunk of output, appending to the last record when it is of the
    /// same stream and has room.
    pub(crate) fn push_output(&mut self, stream: StreamKind, data: &[u8], ts: u64, now: Instant) {
        if self.finished {
            return;
        }
        if self.closed {
            self.stats.bytes_dropped += data.len() as u64;
            return;
        }
        let mut text = String::with_capacity(data.len());
        let decoder = match stream {
            StreamKind::Stdout => &mut self.stdout,
            StreamKind::Stderr => &mut self.stderr,
        };
        self.stats.invalid_bytes += decoder.decode(data, &mut text);
        self.push_text(stream, text, ts, now);
    }

    fn push_text(&mut self, stream: StreamKind, text: String, ts: u64, now: Instant) {
        if text.is_empty() {
            return;
        }
        let ts = self.stamp(ts);
        self.queued_bytes += text.len();
        let mut rest = text.as_str();
        if let Some(Item::Text {
            stream: last_stream,
            text: last,
            sealed: false,
            ..
        }) = self.items.back_mut()
            && *last_stream == stream
        {
            let cut = rest.floor_char_boundary(MAX_RECORD_BYTES.saturating_sub(last.len()));
            last.push_str(&rest[..cut]);
            rest = &rest[cut..];
        }
        while !rest.is_empty() {
            let cut = rest.floor_char_boundary(MAX_RECORD_BYTES);
            self.items.push_back(Item::Text {
                stream,
                text: rest[..cut].to_owned(),
                ts,
                first_at: now,
                sealed: false,
            });
            rest = &rest[cut..];
        }
        self.enforce_bound();
    }

    /// Drops the oldest queued output, whole records at a time, until the queue fits its bound;
    /// a gap marker at the front says how much went missing there.
    fn enforce_bound(&mut self) {
        while self.queued_bytes > self.limit {
            let index = usize::from(matches!(self.items.front(), Some(Item::Gap { .. })));
            let Some(Item::Text { text, ts, .. }) = self.items.get(index) else {
                break;
            };
            let (bytes, ts) = (text.len(), *ts);
            self.items.remove(index);
            self.queued_bytes -= bytes;
            self.record_gap(bytes as u64, ts);
        }
    }

    /// Counts `bytes` of output as lost just before the queued records and marks the spot.
    pub(crate) fn record_gap(&mut self, bytes: u64, ts: u64) {
        self.stats.bytes_dropped += bytes;
        if self.closed {
            return;
        }
        match self.items.front_mut() {
            Some(Item::Gap { bytes: total, .. }) => *total += bytes,
            _ => self.items.push_front(Item::Gap { bytes, ts }),
        }
    }

    /// Queues the final record, after whatever is left of a split character.
    pub(crate) fn push_end(&mut self, end: End, ts: u64, now: Instant) {
        if self.finished {
            return;
        }
        for stream in [StreamKind::Stdout, StreamKind::Stderr] {
            let mut tail = String::new();
            let decoder = match stream {
                StreamKind::Stdout => &mut self.stdout,
                StreamKind::Stderr => &mut self.stderr,
            };
            self.stats.invalid_bytes += decoder.finish(&mut tail);
            if !self.closed {
                self.push_text(stream, tail, ts, now);
            }
        }
        self.finished = true;
        if self.closed {
            return;
        }
        let ts = self.stamp(ts);
        self.items.push_back(Item::Final { end, ts });
    }

    /// Hands the front record to the delivery task when it is ready: a record is ready once
    /// something follows it (a stream switch, or the end), it is full, or it lingered long
    /// enough.
    pub(crate) fn take(&mut self, now: Instant) -> Take {
        let Some(front) = self.items.front() else {
            return if self.finished || self.closed {
                Take::Done
            } else {
                Take::Wait(None)
            };
        };
        if let Item::Text {
            text,
            first_at,
            sealed: false,
            ..
        } = front
            && self.items.len() == 1
            && text.len() < MAX_RECORD_BYTES
        {
            let due = *first_at + LINGER;
            if now < due {
                return Take::Wait(Some(due));
            }
        }
        let item = self.items.pop_front().expect("front exists");
        let bytes = item.text_len();
        self.queued_bytes -= bytes;
        self.stats.in_flight_bytes = bytes as u64;
        Take::Send(item)
    }

    /// The record taken last was accepted.
    pub(crate) fn delivered(&mut self, text_bytes: usize) {
        self.stats.in_flight_bytes = 0;
        self.stats.records_delivered += 1;
        self.stats.bytes_delivered += text_bytes as u64;
    }

    /// The record taken last will never be delivered.
    pub(crate) fn lost(&mut self, item: &Item) {
        self.stats.in_flight_bytes = 0;
        if let Item::Text { text, ts, .. } = item {
            self.record_gap(text.len() as u64, *ts);
        }
    }

    /// Gives up on the job: every queued and future record is dropped (counted).
    pub(crate) fn close(&mut self) {
        self.closed = true;
        self.stats.bytes_dropped += self.queued_bytes as u64;
        self.queued_bytes = 0;
        self.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(chunks: &[&[u8]]) -> (String, u64) {
        let mut d = Utf8Stream::default();
        let mut out = String::new();
        let mut invalid = 0;
        for c in chunks {
            invalid += d.decode(c, &mut out);
        }
        invalid += d.finish(&mut out);
        (out, invalid)
    }

    #[test]
    fn characters_split_across_chunks_arrive_whole() {
        let euro = "€".as_bytes(); // e2 82 ac
        assert_eq!(decode_all(&[&euro[..2], &euro[2..]]), ("€".into(), 0));
        assert_eq!(
            decode_all(&[&euro[..1], &euro[1..2], &euro[2..]]),
            ("€".into(), 0)
        );
        let emoji = "a😀b".as_bytes();
        for split in 0..emoji.len() {
            assert_eq!(
                decode_all(&[&emoji[..split], &emoji[split..]]),
                ("a😀b".into(), 0),
                "split at {split}"
            );
        }
    }

    #[test]
    fn invalid_bytes_become_replacement_characters_and_are_counted() {
        assert_eq!(decode_all(&[b"a\xffb"]), ("a\u{FFFD}b".into(), 1));
        // A lead byte followed by a non-continuation byte: the lead alone is invalid.
        assert_eq!(decode_all(&[b"\xe2", b"x"]), ("\u{FFFD}x".into(), 1));
        // A sequence still incomplete at the end of the stream.
        assert_eq!(decode_all(&[b"ok\xe2\x82"]), ("ok\u{FFFD}".into(), 2));
        // Surrogates encoded in UTF-8 (CESU) are not valid Unicode scalar values.
        let (text, invalid) = decode_all(&[b"\xed\xa0\x80"]);
        assert!(text.chars().all(|c| c == '\u{FFFD}'), "{text:?}");
        assert_eq!(invalid, 3);
    }

    fn texts(q: &mut Queue, now: Instant) -> Vec<Item> {
        let mut out = Vec::new();
        while let Take::Send(item) = q.take(now) {
            if let Item::Text { text, .. } = &item {
                q.delivered(text.len());
            }
            out.push(item);
        }
        out
    }

    fn summary(items: &[Item]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|i| match i {
                Item::Text { stream, text, .. } => (stream.as_str().to_owned(), text.clone()),
                Item::Gap { bytes, .. } => ("gap".into(), bytes.to_string()),
                Item::Final { end, .. } => ("final".into(), format!("{end:?}")),
            })
            .collect()
    }

    #[test]
    fn coalesces_same_stream_and_keeps_stream_order() {
        let now = Instant::now();
        let mut q = Queue::new(1 << 20);
        q.push_echo("$ cmd".into(), 1, now);
        q.push_output(StreamKind::Stdout, b"a", 2, now);
        q.push_output(StreamKind::Stdout, b"b", 3, now);
        q.push_output(StreamKind::Stderr, b"c", 4, now);
        q.push_output(StreamKind::Stdout, b"d", 5, now);
        q.push_end(End::ExitCode(3), 6, now);
        let items = texts(&mut q, now);
        assert_eq!(
            summary(&items),
            [
                ("stdout", "$ cmd"),
                ("stdout", "ab"),
                ("stderr", "c"),
                ("stdout", "d"),
                ("final", "ExitCode(3)")
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        assert_eq!(q.take(now), Take::Done);
        assert_eq!(q.stats.records_delivered, 4);
    }

    #[test]
    fn the_last_record_lingers_unless_full() {
        let now = Instant::now();
        let mut q = Queue::new(1 << 20);
        q.push_output(StreamKind::Stdout, b"x", 1, now);
        assert_eq!(q.take(now), Take::Wait(Some(now + LINGER)));
        assert!(matches!(q.take(now + LINGER), Take::Send(_)));
        q.delivered(1);
        assert_eq!(q.take(now), Take::Wait(None));
        // A full record goes at once.
        q.push_output(StreamKind::Stdout, &vec![b'y'; MAX_RECORD_BYTES], 2, now);
        assert!(matches!(q.take(now), Take::Send(_)));
    }

    #[test]
    fn records_are_capped_at_64k_on_character_boundaries() {
        let now = Instant::now();
        let mut q = Queue::new(8 << 20);
        let text = "é".repeat(100_000); // 200_000 bytes of two-byte characters
        q.push_output(StreamKind::Stdout, text.as_bytes(), 1, now);
        q.push_end(End::ExitCode(0), 2, now);
        let items = texts(&mut q, now);
        let mut joined = String::new();
        let texts = &items[..items.len() - 1];
        for (i, item) in texts.iter().enumerate() {
            let len = item.text_len();
            assert!(len <= MAX_RECORD_BYTES, "{len}");
            if i + 1 < texts.len() {
                assert!(len > MAX_RECORD_BYTES - 4, "record {i} not full: {len}");
            }
            if let Item::Text { text, .. } = item {
                joined.push_str(text);
            }
        }
        assert!(items.len() - 1 <= 200_000 / MAX_RECORD_BYTES + 1);
        assert_eq!(joined, text);
    }

    #[test]
    fn overflow_drops_the_oldest_output_and_marks_the_gap() {
        let now = Instant::now();
        let limit = MAX_RECORD_BYTES * 2;
        let mut q = Queue::new(limit);
        q.push_echo("$ cmd".into(), 1, now);
        // The echo is in flight; a stalled destination leaves everything else queued.
        assert!(matches!(q.take(now), Take::Send(_)));
        for i in 0..10u8 {
            q.push_output(
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
        q.push_end(End::ExitCode(0), 3, now);
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
    fn timestamps_never_go_backwards() {
        let now = Instant::now();
        let mut q = Queue::new(1 << 20);
        q.push_output(StreamKind::Stdout, b"a", 10, now);
        q.push_output(StreamKind::Stderr, b"b", 5, now); // clock stepped back
        q.push_end(End::Error("cancelled".into()), 7, now);
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
        q.push_output(StreamKind::Stdout, b"abc", 1, now);
        q.close();
        q.push_output(StreamKind::Stdout, b"de", 2, now);
        q.push_end(End::ExitCode(0), 3, now);
        assert_eq!(q.take(now), Take::Done);
        assert_eq!(q.stats.bytes_dropped, 5);
    }
}
