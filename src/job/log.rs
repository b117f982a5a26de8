//! A job's event log: every event of the job in order, bounded in bytes and in count, read by
//! any number of attached clients, each from its own position.
//!
//! - **Attached readers are lossless.** Each reader has a cursor (the next seq it needs); an
//!   event a cursor still needs is never evicted, so a full log makes the job wait (and its pipe
//!   fill, and the process block), exactly as a slow Exec caller did before there was a log.
//! - **With nobody attached the job is never paused**: the oldest events are evicted to make
//!   room, and a later reader is told exactly what it missed with a [`Gap`].
//! - **Memory is the output budget's.** Every output event holds the [`Credit`] its bytes were
//!   read with until it is evicted. Events no reader needs any more ("history") are given up
//!   when the job needs credit and the budget has none, and the logs of finished jobs give up
//!   theirs when running jobs need it (see [`RetiredLogs`]).
//! - **A stuck reader cannot hold a stopped job**: once the job is stopped and the
//!   stopped-client grace has passed, events are evicted whatever readers need; such a reader
//!   gets a `Gap` (never silence) when it reads again.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::sync::{Notify, watch};

use super::{
    EventKind, JobEvent, StreamKind,
    budget::{Credit, JobBudget},
};

/// How many evicted events the log remembers the size of, so that a reader resuming after an
/// evicted seq is told exactly how many bytes of each stream it lost (4 bytes each).
const EVICTED_INDEX_LEN: usize = 1 << 16;

/// Bounds of one job's log.
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    /// Output bytes held (the `Exited` event is always kept, whatever the bound).
    pub max_bytes: usize,
    /// Events held.
    pub max_events: usize,
}

/// Where a reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The first event (`Started`, seq 0).
    Start,
    /// The event after this seq (exclusive, like Redis XREAD).
    AfterSeq(u64),
    /// The first bytes past these per-stream offsets (what a client that has `stdout` bytes
    /// of stdout and `stderr` bytes of stderr needs next), and `Exited`.
    Offsets { stdout: u64, stderr: u64 },
    /// Only events appended from now on.
    New,
}

/// What a reader does when its position is no longer held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GapPolicy {
    /// Report a [`Gap`] and go on from the oldest event held.
    #[default]
    Report,
    /// Fail (OUT_OF_RANGE) instead.
    Fail,
}

/// What a reader missed: events evicted before it could read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// Where the reader asked to be (for a reader that fell behind while attached: after the
    /// last seq it was given).
    pub requested: Position,
    /// The seq of the next event delivered.
    pub resumed_seq: u64,
    /// Events missed, when known (resuming by seq; 0 when resuming by offsets).
    pub lost_events: u64,
    /// Bytes missed, per stream.
    pub lost_stdout_bytes: u64,
    pub lost_stderr_bytes: u64,
    /// Offsets the next delivered bytes of each stream start at.
    pub resumed_stdout_offset: u64,
    pub resumed_stderr_offset: u64,
    /// False only when resuming after a seq so old that the log no longer knows the sizes of
    /// the events after it: the lost byte counts are then lower bounds.
    pub exact: bool,
}

/// What a reader receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    Event(JobEvent),
    Gap(Gap),
    /// Nothing happened for a while; sent so that idle connections stay open through proxies.
    /// Carries the seq the reader stands after (the last delivered, or the one before where it
    /// started; `None` at the very start).
    Keepalive {
        last_seq: Option<u64>,
    },
}

/// Why a reader cannot be opened, or cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PositionError {
    #[error("seq {after} is beyond the job's last event (seq {last:?})")]
    SeqBeyondEnd { after: u64, last: Option<u64> },
    #[error(
        "offset {requested} of {stream} is beyond the {produced} bytes the job has written to it"
    )]
    OffsetBeyondEnd {
        stream: &'static str,
        requested: u64,
        produced: u64,
    },
    #[error(
        "the requested position is no longer held (resuming at seq {}: {} stdout and {} stderr \
         bytes lost)", .0.resumed_seq, .0.lost_stdout_bytes, .0.lost_stderr_bytes
    )]
    Lost(Box<Gap>),
}

/// What the log holds now, for Status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogSummary {
    /// Seq of the oldest event held (equal to `next_seq` when the log is empty).
    pub first_seq: u64,
    pub next_seq: u64,
    /// Offsets of the oldest bytes held, per stream.
    pub stdout_from: u64,
    pub stderr_from: u64,
    /// Bytes written to each stream so far.
    pub stdout_end: u64,
    pub stderr_end: u64,
    pub held_bytes: usize,
    pub attached: usize,
}

struct Entry {
    event: JobEvent,
    /// Output bytes (0 for `Started` and `Exited`).
    len: usize,
    /// Holds the bytes in the output budget until the entry is evicted.
    _credit: Credit,
}

impl Entry {
    fn seq(&self) -> u64 {
        self.event.seq
    }
}

/// Sizes of evicted events, oldest first: `len | STDERR_BIT` per seq.
#[derive(Default)]
struct EvictedIndex {
    /// Seq of `sizes[0]`.
    first_seq: u64,
    sizes: VecDeque<u32>,
    /// Offsets of each stream before `first_seq`.
    floor: [u64; 2],
}

const STDERR_BIT: u32 = 1 << 31;

fn stream_index(stream: StreamKind) -> usize {
    match stream {
        StreamKind::Stdout => 0,
        StreamKind::Stderr => 1,
    }
}

impl EvictedIndex {
    fn push(&mut self, entry: &Entry) {
        let size = match &entry.event.kind {
            EventKind::Output { stream, .. } => {
                let bit = if *stream == StreamKind::Stderr {
                    STDERR_BIT
                } else {
                    0
                };
                // Chunks are far below 2 GiB (the budget grants at most its size at once).
                (entry.len as u32 & !STDERR_BIT) | bit
            }
            _ => 0,
        };
        self.sizes.push_back(size);
        if self.sizes.len() > EVICTED_INDEX_LEN {
            let oldest = self.sizes.pop_front().unwrap_or_default();
            self.floor[usize::from(oldest & STDERR_BIT != 0)] += u64::from(oldest & !STDERR_BIT);
            self.first_seq += 1;
        }
    }

    /// Offsets of each stream before `seq` (an evicted seq, or the first held one), and
    /// whether they are exact.
    fn offsets_before(&self, seq: u64) -> ([u64; 2], bool) {
        let mut offsets = self.floor;
        if seq < self.first_seq {
            return (offsets, false);
        }
        for size in self.sizes.iter().take((seq - self.first_seq) as usize) {
            offsets[usize::from(size & STDERR_BIT != 0)] += u64::from(size & !STDERR_BIT);
        }
        (offsets, true)
    }
}

struct State {
    entries: VecDeque<Entry>,
    /// Seq of the oldest entry, or `next_seq` when there is none.
    first_seq: u64,
    next_seq: u64,
    bytes: usize,
    /// Offsets of the oldest bytes held, per stream.
    held_from: [u64; 2],
    /// Bytes written per stream.
    ends: [u64; 2],
    evicted: EvictedIndex,
    /// Attached readers' cursors: the next seq each needs; `None` for a reader that did not
    /// take a stopped job's events within the grace, which holds nothing back until it reads
    /// again (it gets a gap then).
    readers: HashMap<u64, Option<u64>>,
    next_reader: u64,
    /// `Exited` is in the log: nothing comes after it.
    ended: bool,
}

impl State {
    /// Whether an attached reader still needs the oldest entry.
    fn front_needed(&self) -> bool {
        self.readers
            .values()
            .any(|cursor| cursor.is_some_and(|cursor| cursor <= self.first_seq))
    }

    /// Stops the readers that hold the oldest entry from holding anything back.
    fn demote_blocking_readers(&mut self) {
        let first_seq = self.first_seq;
        for cursor in self.readers.values_mut() {
            if cursor.is_some_and(|c| c <= first_seq) {
                *cursor = None;
            }
        }
    }

    fn evict_front(&mut self) -> usize {
        let Some(entry) = self.entries.pop_front() else {
            return 0;
        };
        if let EventKind::Output { stream, offset, .. } = &entry.event.kind {
            self.held_from[stream_index(*stream)] = offset + entry.len as u64;
        }
        self.bytes -= entry.len;
        self.first_seq = self.entries.front().map_or(self.next_seq, Entry::seq);
        self.evicted.push(&entry);
        entry.len
    }

    fn fits(&self, len: usize, limits: &LogLimits) -> bool {
        self.entries.is_empty()
            || (self.bytes + len <= limits.max_bytes && self.entries.len() < limits.max_events)
    }

    /// Evicts what no reader needs until `len` more bytes fit; false if a reader needs what
    /// would have to go.
    fn make_room(&mut self, len: usize, limits: &LogLimits) -> bool {
        while !self.fits(len, limits) {
            if self.front_needed() {
                return false;
            }
            self.evict_front();
        }
        true
    }

    fn append(&mut self, event: JobEvent, credit: Credit) {
        let len = match &event.kind {
            EventKind::Output {
                stream,
                offset,
                data,
            } => {
                self.ends[stream_index(*stream)] = offset + data.len() as u64;
                data.len()
            }
            EventKind::Exited(_) => {
                self.ended = true;
                0
            }
            EventKind::Started { .. } => 0,
        };
        if self.entries.is_empty() {
            self.first_seq = event.seq;
        }
        self.next_seq = event.seq + 1;
        self.bytes += len;
        self.entries.push_back(Entry {
            event,
            len,
            _credit: credit,
        });
    }

    /// Offsets of each stream before `seq`, which may be evicted, held or next.
    fn offsets_before(&self, seq: u64) -> ([u64; 2], bool) {
        if seq < self.first_seq {
            return self.evicted.offsets_before(seq);
        }
        let mut offsets = self.held_from;
        for entry in self.entries.iter().take_while(|e| e.seq() < seq) {
            if let EventKind::Output { stream, .. } = &entry.event.kind {
                offsets[stream_index(*stream)] += entry.len as u64;
            }
        }
        (offsets, true)
    }

    fn summary(&self) -> LogSummary {
        LogSummary {
            first_seq: self.first_seq,
            next_seq: self.next_seq,
            stdout_from: self.held_from[0],
            stderr_from: self.held_from[1],
            stdout_end: self.ends[0],
            stderr_end: self.ends[1],
            held_bytes: self.bytes,
            attached: self.readers.len(),
        }
    }
}

/// One job's log. Shared by the job's output path (the writer), its readers, its record (for
/// Status) and, once the job has finished, the budget's [`RetiredLogs`].
pub struct EventLog {
    state: Mutex<State>,
    limits: LogLimits,
    /// An event was appended: readers waiting for one look again.
    appended: Notify,
    /// A reader moved on or left: a writer waiting for room (or for credit) looks again.
    progressed: Notify,
    /// Readers attached now; the disconnect policy watches it.
    attached: watch::Sender<usize>,
}

impl EventLog {
    pub fn new(limits: LogLimits) -> Arc<Self> {
        Arc::new(EventLog {
            state: Mutex::new(State {
                entries: VecDeque::new(),
                first_seq: 0,
                next_seq: 0,
                bytes: 0,
                held_from: [0; 2],
                ends: [0; 2],
                evicted: EvictedIndex::default(),
                readers: HashMap::new(),
                next_reader: 0,
                ended: false,
            }),
            limits,
            appended: Notify::new(),
            progressed: Notify::new(),
            attached: watch::Sender::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn summary(&self) -> LogSummary {
        self.lock().summary()
    }

    /// Readers attached now, as a watch (for the disconnect policy).
    pub fn attached(&self) -> watch::Receiver<usize> {
        self.attached.subscribe()
    }

    /// Appends `event`, holding `credit` with it. Waits while the log is full of events an
    /// attached reader still needs (backpressure). Once the job is stopped, that wait lasts at
    /// most the stopped-client grace (per event): then those events are evicted anyway, and
    /// the reader that did not take them gets a gap. `Exited` is always appended at once.
    pub(crate) async fn push(&self, event: JobEvent, credit: Credit, budget: &JobBudget) {
        let len = match &event.kind {
            EventKind::Output { data, .. } => data.len(),
            _ => 0,
        };
        let always = matches!(event.kind, EventKind::Exited(_));
        let mut deadline = None;
        loop {
            let progressed = self.progressed.notified();
            tokio::pin!(progressed);
            progressed.as_mut().enable();
            {
                let mut state = self.lock();
                if always || state.make_room(len, &self.limits) {
                    state.append(event, credit);
                    drop(state);
                    self.appended.notify_waiters();
                    return;
                }
            }
            let stop = budget.stop();
            if stop.is_cancelled() {
                deadline.get_or_insert_with(|| tokio::time::Instant::now() + budget.grace());
            }
            tokio::select! {
                biased;
                _ = progressed => {}
                _ = stop.cancelled(), if deadline.is_none() => {}
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)),
                    if deadline.is_some() =>
                {
                    tracing::warn!(
                        grace = ?budget.grace(),
                        "a reader did not take the stopped job's output in time; evicting what \
                         it had not read (it gets a gap)"
                    );
                    self.lock().demote_blocking_readers();
                    // Whoever holds the log back next gets a grace of its own.
                    deadline = None;
                }
            }
        }
    }

    /// Gives up, oldest first, events no attached reader needs, until `want` bytes of credit
    /// are freed or nothing more may go. Returns the bytes freed.
    pub(crate) fn release_history(&self, want: usize) -> usize {
        let mut state = self.lock();
        let mut freed = 0;
        while freed < want && !state.entries.is_empty() && !state.front_needed() {
            // The final event is kept: it is what a late reader most needs, and holds nothing.
            if state.entries.len() == 1 && state.ended {
                break;
            }
            freed += state.evict_front();
        }
        drop(state);
        freed
    }

    /// A future that completes when a reader moves on or leaves (register it before checking
    /// what it waits for).
    pub(crate) fn progressed(&self) -> tokio::sync::futures::Notified<'_> {
        self.progressed.notified()
    }

    /// Opens a reader at `position`.
    pub fn reader(
        self: &Arc<Self>,
        position: Position,
        on_gap: GapPolicy,
    ) -> Result<LogReader, PositionError> {
        let mut state = self.lock();
        let last = state.next_seq.checked_sub(1);
        let (cursor, delivered_ends, skip_below) = match position {
            Position::Start => (0, [0; 2], [0; 2]),
            Position::New => (state.next_seq, state.ends, [0; 2]),
            Position::AfterSeq(after) => {
                if after >= state.next_seq {
                    return Err(PositionError::SeqBeyondEnd { after, last });
                }
                let cursor = after + 1;
                (cursor, state.offsets_before(cursor).0, [0; 2])
            }
            Position::Offsets { stdout, stderr } => {
                for (stream, requested, produced) in [
                    ("stdout", stdout, state.ends[0]),
                    ("stderr", stderr, state.ends[1]),
                ] {
                    if requested > produced {
                        return Err(PositionError::OffsetBeyondEnd {
                            stream,
                            requested,
                            produced,
                        });
                    }
                }
                // From the oldest event held, skipping bytes the reader has; `Started` (seq 0)
                // is skipped too: a client resuming by offsets has seen it.
                (
                    state.first_seq.max(1).min(state.next_seq),
                    [stdout, stderr],
                    [stdout, stderr],
                )
            }
        };
        // The gap (if any) is known now; with the fail policy the open itself fails.
        if on_gap == GapPolicy::Fail
            && let Some(gap) = gap_at(&state, position, cursor, delivered_ends)
        {
            return Err(PositionError::Lost(Box::new(gap)));
        }
        let id = state.next_reader;
        state.next_reader += 1;
        state.readers.insert(id, Some(cursor));
        self.attached.send_replace(state.readers.len());
        drop(state);
        Ok(LogReader {
            log: Arc::clone(self),
            id,
            cursor,
            requested: position,
            on_gap,
            delivered_ends,
            skip_below,
            skip_started: position != Position::Start,
            last_seq: cursor.checked_sub(1),
            done: false,
        })
    }
}

/// The gap between a reader's position and the oldest event held, if there is one.
fn gap_at(state: &State, requested: Position, cursor: u64, had: [u64; 2]) -> Option<Gap> {
    let by_offsets = matches!(requested, Position::Offsets { .. });
    let (had, exact) = if by_offsets {
        // A reader resuming by offsets says what it has; the seqs it missed do not matter.
        (had, true)
    } else if cursor < state.first_seq {
        state.offsets_before(cursor)
    } else {
        return None;
    };
    let lost = [
        state.held_from[0].saturating_sub(had[0]),
        state.held_from[1].saturating_sub(had[1]),
    ];
    if by_offsets && lost == [0, 0] {
        return None;
    }
    Some(Gap {
        requested,
        resumed_seq: state.first_seq.max(cursor),
        lost_events: if by_offsets {
            0
        } else {
            state.first_seq - cursor
        },
        lost_stdout_bytes: lost[0],
        lost_stderr_bytes: lost[1],
        resumed_stdout_offset: state.held_from[0].max(had[0]),
        resumed_stderr_offset: state.held_from[1].max(had[1]),
        exact,
    })
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("limits", &self.limits)
            .field("summary", &self.summary())
            .finish_non_exhaustive()
    }
}

/// A reader's place in a log; detaches when dropped.
pub struct LogReader {
    log: Arc<EventLog>,
    id: u64,
    /// The next seq this reader needs.
    cursor: u64,
    requested: Position,
    on_gap: GapPolicy,
    /// Offsets after the bytes delivered (or, before anything was, that the reader has).
    delivered_ends: [u64; 2],
    /// Bytes below these offsets are not delivered (resuming by offsets).
    skip_below: [u64; 2],
    /// `Started` is not delivered (a reader resuming anywhere but the start has seen it).
    skip_started: bool,
    last_seq: Option<u64>,
    /// `Exited` was delivered.
    done: bool,
}

impl LogReader {
    /// The next thing to deliver: an event, a gap, or (after `keepalive` with nothing) a
    /// keepalive; `None` after `Exited`.
    pub async fn next(&mut self, keepalive: Duration) -> Option<Result<Delivered, PositionError>> {
        if self.done {
            return None;
        }
        let log = Arc::clone(&self.log);
        loop {
            let appended = log.appended.notified();
            tokio::pin!(appended);
            appended.as_mut().enable();
            if let Some(next) = self.try_next() {
                return Some(next);
            }
            tokio::select! {
                _ = appended => {}
                _ = tokio::time::sleep(keepalive) => {
                    return Some(Ok(Delivered::Keepalive { last_seq: self.last_seq }));
                }
            }
        }
    }

    fn try_next(&mut self) -> Option<Result<Delivered, PositionError>> {
        let log = Arc::clone(&self.log);
        let mut state = log.lock();
        if let Some(gap) = gap_at(&state, self.requested, self.cursor, self.delivered_ends) {
            self.cursor = gap.resumed_seq;
            self.delivered_ends = [gap.resumed_stdout_offset, gap.resumed_stderr_offset];
            self.skip_below = self.delivered_ends;
            // From here on the reader follows by seq.
            self.requested = Position::AfterSeq(gap.resumed_seq.saturating_sub(1));
            state.readers.insert(self.id, Some(self.cursor));
            drop(state);
            return Some(match self.on_gap {
                GapPolicy::Report => Ok(Delivered::Gap(gap)),
                GapPolicy::Fail => {
                    self.done = true;
                    Err(PositionError::Lost(Box::new(gap)))
                }
            });
        }
        // Resuming by offsets, what was evicted held nothing this reader lacks.
        self.cursor = self.cursor.max(state.first_seq);
        let mut delivered = None;
        while self.cursor < state.next_seq {
            let index = (self.cursor - state.first_seq) as usize;
            let Some(entry) = state.entries.get(index) else {
                break;
            };
            let mut event = entry.event.clone();
            self.cursor += 1;
            match &mut event.kind {
                EventKind::Started { .. } if self.skip_started => continue,
                EventKind::Output {
                    stream,
                    offset,
                    data,
                } => {
                    let slot = stream_index(*stream);
                    let end = *offset + data.len() as u64;
                    if end <= self.skip_below[slot] {
                        continue;
                    }
                    if *offset < self.skip_below[slot] {
                        let skip = (self.skip_below[slot] - *offset) as usize;
                        *data = data.slice(skip..);
                        *offset += skip as u64;
                    }
                    self.delivered_ends[slot] = end;
                }
                EventKind::Exited(_) => self.done = true,
                EventKind::Started { .. } => {}
            }
            self.last_seq = Some(event.seq);
            delivered = Some(event);
            break;
        }
        state.readers.insert(self.id, Some(self.cursor));
        drop(state);
        // What was delivered or skipped is consumed: a writer waiting for room looks again.
        self.log.progressed.notify_waiters();
        delivered.map(|event| Ok(Delivered::Event(event)))
    }
}

impl Drop for LogReader {
    fn drop(&mut self) {
        let mut state = self.log.lock();
        state.readers.remove(&self.id);
        self.log.attached.send_replace(state.readers.len());
        drop(state);
        self.log.progressed.notify_waiters();
    }
}

/// Logs of finished jobs, oldest first. When a running job needs credit and the shared pool has
/// none, these give up their history (all but `Exited`) before anyone waits.
#[derive(Default, Debug)]
pub struct RetiredLogs {
    logs: Mutex<VecDeque<Weak<EventLog>>>,
}

impl RetiredLogs {
    pub fn retire(&self, log: &Arc<EventLog>) {
        self.logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(Arc::downgrade(log));
    }

    /// Output bytes the retired logs hold.
    pub fn held_bytes(&self) -> usize {
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.iter()
            .filter_map(Weak::upgrade)
            .map(|log| log.lock().bytes)
            .sum()
    }

    /// Frees up to `want` bytes from the oldest retired logs. Returns the bytes freed.
    pub fn reclaim(&self, want: usize) -> usize {
        let mut freed = 0;
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        // Each log once: one whose readers still need its events goes to the back.
        for _ in 0..logs.len() {
            if freed >= want {
                break;
            }
            let Some(log) = logs.pop_front().and_then(|weak| weak.upgrade()) else {
                continue;
            };
            freed += log.release_history(want - freed);
            if log.summary().held_bytes > 0 {
                logs.push_back(Arc::downgrade(&log));
            }
        }
        freed
    }
}
