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
/// evicted seq is told exactly how many bytes of each stream it lost (4 bytes each: 32 KiB per
/// job at most, which every running job may hold).
const EVICTED_INDEX_LEN: usize = 8192;

/// As many for a finished job: thousands are remembered (--finished-job-capacity), and 32 KiB
/// each was most of what 1,000 finished jobs kept resident (4 KiB each).
const RETIRED_EVICTED_INDEX_LEN: usize = 1024;

/// Below this many entries' room, a log's queue is not shrunk (see `State::evict_front`).
const MIN_QUEUE_ROOM: usize = 64;

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

/// Whether a reader holds the job back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pace {
    /// The job waits for this reader rather than evict what it has not read (the Exec caller;
    /// a client resuming its own job): it never gets a gap once attached, unless it stops
    /// reading a stopped job for the stopped-client grace.
    #[default]
    Lossless,
    /// Never slows the job: when it falls behind by more than the log holds, it gets a gap.
    Watch,
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
    /// The screen of a `tty` job after the event `seq` (not from the log: its stream sends it
    /// in place of replayed terminal output; see `JobStream`).
    Snapshot(super::ScreenSnapshot),
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
    /// The log was abandoned: this replica stopped following a job that runs on elsewhere.
    #[error("this replica stopped following the job, which has not ended")]
    Abandoned,
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
    /// Holds the bytes in the output budget until the entry is evicted: at least `len`, more
    /// when the chunk was read into a larger buffer it still occupies.
    credit: Credit,
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
        // The oldest goes first, so the queue never grows past its bound (doubling its room).
        if self.sizes.len() >= EVICTED_INDEX_LEN {
            self.forget_oldest();
        }
        self.sizes.push_back(size);
    }

    fn forget_oldest(&mut self) {
        if let Some(oldest) = self.sizes.pop_front() {
            self.floor[usize::from(oldest & STDERR_BIT != 0)] += u64::from(oldest & !STDERR_BIT);
            self.first_seq += 1;
        }
    }

    /// Keeps the sizes of the newest `len` evicted events only.
    fn shrink_to(&mut self, len: usize) {
        while self.sizes.len() > len {
            self.forget_oldest();
        }
        self.sizes.shrink_to_fit();
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
    /// Output bytes held (what the log's bound counts).
    bytes: usize,
    /// Output budget those hold (the memory they occupy: see `Entry::credit`).
    credited: usize,
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
    /// Nothing more will be appended, and no `Exited` comes: the job runs on, unfollowed.
    abandoned: bool,
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

    /// Evicts the oldest entry; returns the credit it gave back.
    fn evict_front(&mut self) -> usize {
        let Some(entry) = self.entries.pop_front() else {
            return 0;
        };
        if let EventKind::Output { stream, offset, .. } = &entry.event.kind {
            self.held_from[stream.index()] = offset + entry.len as u64;
        }
        self.bytes -= entry.len;
        self.credited -= entry.credit.bytes();
        self.first_seq = self.entries.front().map_or(self.next_seq, Entry::seq);
        self.evicted.push(&entry);
        // A burst of small events can grow the queue to thousands of entries (~130 bytes each);
        // without this it keeps that room for the job's life, which across 1,000 stalled jobs
        // was ~60 MiB.
        let room = self.entries.capacity();
        if room > MIN_QUEUE_ROOM && self.entries.len() < room / 4 {
            self.entries.shrink_to(self.entries.len() * 2);
        }
        entry.credit.bytes()
    }

    /// Moves the output held into one buffer, each event's data a slice of it, each credit cut
    /// to its bytes. The chunks were read into buffers of the burst that wrote them, scattered
    /// through the allocator's pages: a finished log kept for late readers would pin those
    /// pages long after the rest of the burst is freed (1,000 stalled jobs ending left ~50 MiB
    /// resident for 16 MiB retained). One allocation is freed whole. Trimming a compacted log
    /// frees its buffer only with its last slice: at most one log is trimmed part way (the
    /// oldest, see `Retired::free`).
    fn compact(&mut self) {
        let total: usize = self.entries.iter().map(|e| e.len).sum();
        if total == 0 {
            return;
        }
        let mut buffer = bytes::BytesMut::with_capacity(total);
        for entry in &self.entries {
            if let EventKind::Output { data, .. } = &entry.event.kind {
                buffer.extend_from_slice(data);
            }
        }
        let buffer = buffer.freeze();
        let mut at = 0;
        let mut credited = 0;
        for entry in &mut self.entries {
            if let EventKind::Output { data, .. } = &mut entry.event.kind {
                *data = buffer.slice(at..at + data.len());
                at += data.len();
            }
            entry.credit.shrink_to(entry.len);
            credited += entry.credit.bytes();
        }
        self.credited = credited;
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
                self.ends[stream.index()] = offset + data.len() as u64;
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
        self.credited += credit.bytes();
        self.entries.push_back(Entry { event, len, credit });
    }

    /// Offsets of each stream before `seq`, which may be evicted, held or next.
    fn offsets_before(&self, seq: u64) -> ([u64; 2], bool) {
        if seq < self.first_seq {
            return self.evicted.offsets_before(seq);
        }
        let mut offsets = self.held_from;
        for entry in self.entries.iter().take_while(|e| e.seq() < seq) {
            if let EventKind::Output { stream, .. } = &entry.event.kind {
                offsets[stream.index()] += entry.len as u64;
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
    /// The log of a job followed from elsewhere, which catches up with output the job produced
    /// before: offsets beyond its end are not refused when a reader opens, only when the job
    /// ends short of them.
    catches_up: bool,
}

impl EventLog {
    pub fn new(limits: LogLimits) -> Arc<Self> {
        Self::with(limits, false)
    }

    /// The log of a job this replica follows from elsewhere (see `catches_up`).
    pub fn following(limits: LogLimits) -> Arc<Self> {
        Self::with(limits, true)
    }

    fn with(limits: LogLimits, catches_up: bool) -> Arc<Self> {
        Arc::new(EventLog {
            state: Mutex::new(State {
                entries: VecDeque::new(),
                first_seq: 0,
                next_seq: 0,
                bytes: 0,
                credited: 0,
                held_from: [0; 2],
                ends: [0; 2],
                evicted: EvictedIndex::default(),
                readers: HashMap::new(),
                next_reader: 0,
                ended: false,
                abandoned: false,
            }),
            limits,
            appended: Notify::new(),
            progressed: Notify::new(),
            attached: watch::Sender::new(0),
            catches_up,
        })
    }

    /// Ends the log without an `Exited`: its readers, once they have read what it holds, get
    /// [`PositionError::Abandoned`].
    pub(crate) fn abandon(&self) {
        self.lock().abandoned = true;
        self.appended.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn summary(&self) -> LogSummary {
        self.lock().summary()
    }

    /// The output budget this log holds: its bytes, and the room of the buffers they were
    /// read into.
    pub(crate) fn credited_bytes(&self) -> usize {
        self.lock().credited
    }

    /// The job has finished: what the log keeps only for exact gap reports shrinks (see
    /// `RETIRED_EVICTED_INDEX_LEN`), and its output moves into one buffer of its exact size.
    pub(crate) fn retire(&self) {
        let mut state = self.lock();
        state.evicted.shrink_to(RETIRED_EVICTED_INDEX_LEN);
        state.compact();
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
        pace: Pace,
    ) -> Result<LogReader, PositionError> {
        let mut state = self.lock();
        let last = state.next_seq.checked_sub(1);
        let (cursor, (delivered_ends, ends_exact), skip_below) = match position {
            Position::Start => (0, ([0; 2], true), [0; 2]),
            Position::New => (state.next_seq, (state.ends, true), [0; 2]),
            Position::AfterSeq(after) => {
                if after >= state.next_seq {
                    return Err(PositionError::SeqBeyondEnd { after, last });
                }
                let cursor = after + 1;
                (cursor, state.offsets_before(cursor), [0; 2])
            }
            Position::Offsets { stdout, stderr } => {
                if !self.catches_up {
                    check_offsets(&state, [stdout, stderr])?;
                }
                // From the oldest event held, skipping bytes the reader has; `Started` (seq 0)
                // is skipped too: a client resuming by offsets has seen it.
                (
                    state.first_seq.max(1).min(state.next_seq),
                    ([stdout, stderr], true),
                    [stdout, stderr],
                )
            }
        };
        // The gap (if any) is known now; with the fail policy the open itself fails.
        if on_gap == GapPolicy::Fail
            && let Some(gap) = gap_at(&state, position, cursor, delivered_ends, ends_exact)
        {
            return Err(PositionError::Lost(Box::new(gap)));
        }
        let id = state.next_reader;
        state.next_reader += 1;
        let holds = pace == Pace::Lossless;
        state.readers.insert(id, holds.then_some(cursor));
        self.attached.send_replace(state.readers.len());
        drop(state);
        Ok(LogReader {
            log: Arc::clone(self),
            id,
            holds,
            pinned: holds.then_some(cursor),
            cursor,
            requested: position,
            on_gap,
            delivered_ends,
            ends_exact,
            skip_below,
            skip_started: position != Position::Start,
            last_seq: cursor.checked_sub(1),
            done: false,
        })
    }
}

/// Refuses offsets beyond what the job has written.
fn check_offsets(state: &State, requested: [u64; 2]) -> Result<(), PositionError> {
    for (stream, i) in [("stdout", 0), ("stderr", 1)] {
        if requested[i] > state.ends[i] {
            return Err(PositionError::OffsetBeyondEnd {
                stream,
                requested: requested[i],
                produced: state.ends[i],
            });
        }
    }
    Ok(())
}

/// The gap between a reader's position and the oldest event held, if there is one. `had`:
/// the offsets the reader has, exact or not (see `LogReader::ends_exact`).
fn gap_at(
    state: &State,
    requested: Position,
    cursor: u64,
    had: [u64; 2],
    had_exact: bool,
) -> Option<Gap> {
    let by_offsets = matches!(requested, Position::Offsets { .. });
    let (had, exact) = if by_offsets {
        // A reader resuming by offsets says what it has; the seqs it missed do not matter.
        (had, true)
    } else if cursor < state.first_seq {
        if had_exact {
            (had, true)
        } else {
            state.offsets_before(cursor)
        }
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
    /// Its cursor holds the job back (`Pace::Lossless`).
    holds: bool,
    /// What it last registered as needed (see `try_next`).
    pinned: Option<u64>,
    /// The next seq this reader needs.
    cursor: u64,
    requested: Position,
    on_gap: GapPolicy,
    /// Offsets after the bytes delivered (or, before anything was, that the reader has).
    delivered_ends: [u64; 2],
    /// Those are exact: false only for a reader opened after a seq older than the sizes the
    /// log remembers, until it is sent something. A reader that falls behind later is told
    /// exactly what it lost however much was evicted meanwhile.
    ends_exact: bool,
    /// Bytes below these offsets are not delivered (resuming by offsets).
    skip_below: [u64; 2],
    /// `Started` is not delivered (a reader resuming anywhere but the start has seen it).
    skip_started: bool,
    last_seq: Option<u64>,
    /// `Exited` was delivered.
    done: bool,
}

impl LogReader {
    /// Whether this reader holds the job back (`Pace::Lossless`).
    pub fn holds_job(&self) -> bool {
        self.holds
    }

    /// Moves the reader on to `seq` (nothing before it is delivered): for a reader that was
    /// given a snapshot of the screen the events before `seq` drew. Never moves it back.
    pub fn skip_to(&mut self, seq: u64) {
        if seq <= self.cursor {
            return;
        }
        let log = Arc::clone(&self.log);
        let state = log.lock();
        let (ends, exact) = state.offsets_before(seq);
        self.cursor = seq;
        self.delivered_ends = ends;
        self.ends_exact = exact;
        self.skip_below = ends;
        self.requested = Position::AfterSeq(seq - 1);
        self.last_seq = Some(seq - 1);
        self.pin(state, seq);
    }

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
            if self.done {
                return None;
            }
            tokio::select! {
                _ = appended => {}
                _ = tokio::time::sleep(keepalive) => {
                    return Some(Ok(Delivered::Keepalive { last_seq: self.last_seq }));
                }
            }
        }
    }

    /// Registers `needed` as the oldest seq this reader still needs (if it holds the job
    /// back), and wakes a writer waiting for room when that moved.
    fn pin(&mut self, mut state: std::sync::MutexGuard<'_, State>, needed: u64) {
        let pin = self.holds.then_some(needed);
        state.readers.insert(self.id, pin);
        drop(state);
        if pin != self.pinned {
            self.pinned = pin;
            // What was taken or skipped is consumed: a writer waiting for room looks again.
            self.log.progressed.notify_waiters();
        }
    }

    fn try_next(&mut self) -> Option<Result<Delivered, PositionError>> {
        let log = Arc::clone(&self.log);
        let state = log.lock();
        if let Some(gap) = gap_at(
            &state,
            self.requested,
            self.cursor,
            self.delivered_ends,
            self.ends_exact,
        ) {
            self.cursor = gap.resumed_seq;
            self.delivered_ends = [gap.resumed_stdout_offset, gap.resumed_stderr_offset];
            self.ends_exact = true;
            self.skip_below = self.delivered_ends;
            // From here on the reader follows by seq.
            self.requested = Position::AfterSeq(gap.resumed_seq.saturating_sub(1));
            self.pin(state, self.cursor);
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
                    let slot = stream.index();
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
                    self.ends_exact = true;
                }
                EventKind::Exited(_) => {
                    self.done = true;
                    // A log that caught up with a job followed from elsewhere learns only now
                    // that offsets it was opened at are beyond the job's output.
                    if let Err(e) = check_offsets(&state, self.skip_below) {
                        return Some(Err(e));
                    }
                }
                EventKind::Started { .. } => {}
            }
            self.last_seq = Some(event.seq);
            delivered = Some(event);
            break;
        }
        let abandoned = delivered.is_none() && state.abandoned;
        // Opened after the job's last event (`Exited`): it has everything already.
        if delivered.is_none() && state.ended && self.cursor >= state.next_seq {
            self.done = true;
        }
        // The event handed out stays pinned (and its bytes counted in the budget) until the
        // reader asks again: until then it sits in the transport's buffers, waiting for the
        // client's flow-control window. A reader that had stopped holding the job back (see
        // `demote_blocking_readers`) holds it again once it reads.
        let needed = if delivered.is_some() {
            self.cursor - 1
        } else {
            self.cursor
        };
        self.pin(state, needed);
        if abandoned {
            self.done = true;
            return Some(Err(PositionError::Abandoned));
        }
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

/// Logs of finished jobs, oldest first, and the output they hold, bounded in total
/// (`--retained-output-bytes`): past the bound the oldest give up their history (all but what a
/// reader still needs, and `Exited`, which holds no output). When a running job needs credit and
/// the shared pool has none, they give theirs up before anyone waits.
#[derive(Debug)]
pub struct RetiredLogs {
    state: Mutex<Retired>,
}

#[derive(Debug)]
struct Retired {
    /// Each log with the output budget it held when last looked at (see `EventLog::credited_bytes`).
    logs: VecDeque<(Weak<EventLog>, usize)>,
    /// Their sum.
    held: usize,
    limit: usize,
}

impl RetiredLogs {
    /// Finished logs holding at most `limit` of the output budget together.
    pub fn new(limit: usize) -> Self {
        RetiredLogs {
            state: Mutex::new(Retired {
                logs: VecDeque::new(),
                held: 0,
                limit,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Retired> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes in a finished job's log, then trims the oldest to the bound.
    pub fn retire(&self, log: &Arc<EventLog>) {
        log.retire();
        let bytes = log.credited_bytes();
        let mut retired = self.lock();
        retired.forget_gone();
        retired.logs.push_back((Arc::downgrade(log), bytes));
        retired.held += bytes;
        let excess = retired.held.saturating_sub(retired.limit);
        if excess > 0 {
            retired.free(excess);
        }
    }

    /// Output budget the retired logs hold.
    pub fn held_bytes(&self) -> usize {
        let mut retired = self.lock();
        retired.forget_gone();
        retired.held
    }

    /// Frees up to `want` bytes from the oldest retired logs. Returns the bytes freed.
    pub fn reclaim(&self, want: usize) -> usize {
        self.lock().free(want)
    }
}

impl Retired {
    /// Drops the oldest entries whose logs are gone (forgotten and unread), which are the
    /// first to go.
    fn forget_gone(&mut self) {
        while let Some((log, bytes)) = self.logs.front() {
            if log.strong_count() > 0 {
                break;
            }
            self.held -= bytes;
            self.logs.pop_front();
        }
    }

    /// Frees up to `want` bytes, oldest logs first, each looked at once: one whose readers still
    /// need what it holds goes to the back.
    fn free(&mut self, want: usize) -> usize {
        let mut freed = 0;
        for _ in 0..self.logs.len() {
            if freed >= want {
                break;
            }
            let Some((weak, counted)) = self.logs.pop_front() else {
                break;
            };
            self.held -= counted;
            let Some(log) = weak.upgrade() else {
                continue;
            };
            freed += log.release_history(want - freed);
            let left = log.credited_bytes();
            if left == 0 {
                continue;
            }
            self.held += left;
            if freed >= want {
                // Done, and still the oldest.
                self.logs.push_front((weak, left));
            } else {
                // It gave all it could (readers still need the rest).
                self.logs.push_back((weak, left));
            }
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use bytes::Bytes;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::job::{ExitSummary, JobState, budget::OutputBudget};

    const KEEPALIVE: Duration = Duration::from_secs(15);

    /// A log and a writer for it, numbering events like `JobOutput`.
    struct Writer {
        log: Arc<EventLog>,
        budget: JobBudget,
        stop: CancellationToken,
        seq: u64,
        ends: [u64; 2],
    }

    impl Writer {
        fn new(max_bytes: usize, max_events: usize) -> Writer {
            let log = EventLog::new(LogLimits {
                max_bytes,
                max_events,
            });
            let stop = CancellationToken::new();
            let budget = OutputBudget::new(64 << 20, 64 << 10).for_job(
                stop.clone(),
                Duration::from_secs(2),
                Arc::clone(&log),
            );
            Writer {
                log,
                budget,
                stop,
                seq: 0,
                ends: [0; 2],
            }
        }

        fn event(&mut self, kind: EventKind) -> JobEvent {
            let event = JobEvent {
                seq: self.seq,
                time: SystemTime::UNIX_EPOCH,
                kind,
            };
            self.seq += 1;
            event
        }

        async fn started(&mut self) {
            let event = self.event(EventKind::Started {
                backend: "test",
                pid: None,
                capabilities: Default::default(),
                tty: None,
            });
            self.log.push(event, Credit::default(), &self.budget).await;
        }

        async fn output(&mut self, stream: StreamKind, data: &str) {
            let slot = stream.index();
            let offset = self.ends[slot];
            self.ends[slot] += data.len() as u64;
            let event = self.event(EventKind::Output {
                stream,
                offset,
                data: Bytes::copy_from_slice(data.as_bytes()),
            });
            let credit = self.budget.acquire(data.len()).await;
            assert_eq!(credit.bytes(), data.len());
            self.log.push(event, credit, &self.budget).await;
        }

        async fn exited(&mut self) {
            let event = self.event(EventKind::Exited(ExitSummary {
                state: JobState::Succeeded,
                exit_code: Some(0),
                signal: None,
                duration: Duration::ZERO,
                finished_at: SystemTime::UNIX_EPOCH,
                stdout_bytes: self.ends[0],
                stderr_bytes: self.ends[1],
                message: String::new(),
            }));
            self.log.push(event, Credit::default(), &self.budget).await;
        }
    }

    use StreamKind::{Stderr, Stdout};

    /// Everything a reader gets until `Exited`, as short strings: `S0` (Started, seq 0),
    /// `o3:12@5` (stdout, seq 3, "12" at offset 5), `e4:..`, `X9`, `gap(...)`.
    async fn drain(reader: &mut LogReader) -> Vec<String> {
        let mut seen = Vec::new();
        while let Some(next) = tokio::time::timeout(KEEPALIVE, reader.next(KEEPALIVE))
            .await
            .expect("not stuck")
        {
            seen.push(match next.expect("no error") {
                Delivered::Event(e) => describe(&e),
                Delivered::Gap(g) => format!(
                    "gap(seq {}, {} events, lost {}+{}, at {}+{}, exact {})",
                    g.resumed_seq,
                    g.lost_events,
                    g.lost_stdout_bytes,
                    g.lost_stderr_bytes,
                    g.resumed_stdout_offset,
                    g.resumed_stderr_offset,
                    g.exact
                ),
                Delivered::Keepalive { .. } => break,
                Delivered::Snapshot(s) => format!("snapshot(seq {})", s.seq),
            });
        }
        seen
    }

    fn describe(event: &JobEvent) -> String {
        match &event.kind {
            EventKind::Started { .. } => format!("S{}", event.seq),
            EventKind::Output {
                stream,
                offset,
                data,
            } => format!(
                "{}{}:{}@{offset}",
                if *stream == Stdout { 'o' } else { 'e' },
                event.seq,
                String::from_utf8_lossy(data)
            ),
            EventKind::Exited(_) => format!("X{}", event.seq),
        }
    }

    /// Started, "ab" on stdout, "cd" on stderr, "ef" on stdout, Exited.
    async fn short_job(w: &mut Writer) {
        w.started().await;
        w.output(Stdout, "ab").await;
        w.output(Stderr, "cd").await;
        w.output(Stdout, "ef").await;
        w.exited().await;
    }

    #[tokio::test(start_paused = true)]
    async fn readers_get_the_same_events_from_wherever_they_start() {
        let mut w = Writer::new(1 << 20, 100);
        short_job(&mut w).await;
        let all = ["S0", "o1:ab@0", "e2:cd@0", "o3:ef@2", "X4"];
        let from = |p| w.log.reader(p, GapPolicy::Report, Pace::Lossless).unwrap();
        assert_eq!(drain(&mut from(Position::Start)).await, all);
        assert_eq!(drain(&mut from(Position::Start)).await, all);
        assert_eq!(drain(&mut from(Position::AfterSeq(1))).await, all[2..]);
        assert_eq!(drain(&mut from(Position::AfterSeq(3))).await, ["X4"]);
        // After `Exited`: the stream ends at once (no keepalives for a reader with everything).
        assert_eq!(from(Position::AfterSeq(4)).next(KEEPALIVE).await, None);
        // By offsets: mid-chunk positions are trimmed, Started is not sent again.
        assert_eq!(
            drain(&mut from(Position::Offsets {
                stdout: 1,
                stderr: 2
            }))
            .await,
            ["o1:b@1", "o3:ef@2", "X4"]
        );
        assert_eq!(
            drain(&mut from(Position::Offsets {
                stdout: 4,
                stderr: 0
            }))
            .await,
            ["e2:cd@0", "X4"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn positions_beyond_the_end_are_refused() {
        let mut w = Writer::new(1 << 20, 100);
        w.started().await;
        w.output(Stdout, "ab").await;
        assert_eq!(
            w.log
                .reader(Position::AfterSeq(2), GapPolicy::Report, Pace::Lossless)
                .err(),
            Some(PositionError::SeqBeyondEnd {
                after: 2,
                last: Some(1)
            })
        );
        assert!(matches!(
            w.log.reader(
                Position::Offsets {
                    stdout: 3,
                    stderr: 0
                },
                GapPolicy::Report,
                Pace::Lossless
            ),
            Err(PositionError::OffsetBeyondEnd {
                stream: "stdout",
                requested: 3,
                produced: 2
            })
        ));
        // After the last event so far is fine: the reader waits for the next.
        let mut reader = w
            .log
            .reader(Position::AfterSeq(1), GapPolicy::Report, Pace::Lossless)
            .unwrap();
        w.output(Stderr, "x").await;
        assert!(matches!(
            reader.next(KEEPALIVE).await,
            Some(Ok(Delivered::Event(JobEvent { seq: 2, .. })))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn with_nobody_attached_the_newest_events_are_kept_and_late_readers_told_what_they_lost()
    {
        // 4 bytes: the log holds two 2-byte chunks at most.
        let mut w = Writer::new(4, 100);
        short_job(&mut w).await;
        // Started and "ab" were evicted.
        let summary = w.log.summary();
        assert_eq!(
            (summary.first_seq, summary.stdout_from, summary.stderr_from),
            (2, 2, 0)
        );
        let from = |p, policy| w.log.reader(p, policy, Pace::Watch);
        assert_eq!(
            drain(&mut from(Position::Start, GapPolicy::Report).unwrap()).await,
            [
                "gap(seq 2, 2 events, lost 2+0, at 2+0, exact true)",
                "e2:cd@0",
                "o3:ef@2",
                "X4"
            ]
        );
        assert_eq!(
            drain(&mut from(Position::AfterSeq(0), GapPolicy::Report).unwrap()).await[0],
            "gap(seq 2, 1 events, lost 2+0, at 2+0, exact true)"
        );
        // By offsets: only what the reader lacks counts.
        assert_eq!(
            drain(
                &mut from(
                    Position::Offsets {
                        stdout: 1,
                        stderr: 0
                    },
                    GapPolicy::Report
                )
                .unwrap()
            )
            .await,
            [
                "gap(seq 2, 0 events, lost 1+0, at 2+0, exact true)",
                "e2:cd@0",
                "o3:ef@2",
                "X4"
            ]
        );
        assert_eq!(
            drain(
                &mut from(
                    Position::Offsets {
                        stdout: 2,
                        stderr: 0
                    },
                    GapPolicy::Report
                )
                .unwrap()
            )
            .await,
            ["e2:cd@0", "o3:ef@2", "X4"],
            "nothing it lacks was evicted: no gap"
        );
        // The fail policy refuses instead.
        match from(Position::Start, GapPolicy::Fail) {
            Err(PositionError::Lost(gap)) => assert_eq!(gap.lost_stdout_bytes, 2),
            other => panic!("expected Lost, got {:?}", other.err()),
        }
        assert!(from(Position::AfterSeq(1), GapPolicy::Fail).is_ok());
    }

    /// A log of 4 bytes holding Started, "ab" and "cd", none of it read by its lossless reader.
    async fn full_log_with_a_reader() -> (Writer, LogReader) {
        let mut w = Writer::new(4, 100);
        let reader = w
            .log
            .reader(Position::Start, GapPolicy::Report, Pace::Lossless)
            .unwrap();
        w.started().await;
        w.output(Stdout, "ab").await;
        w.output(Stdout, "cd").await;
        (w, reader)
    }

    #[tokio::test(start_paused = true)]
    async fn an_attached_reader_holds_the_writer_back_until_it_reads() {
        let (mut w, mut reader) = full_log_with_a_reader().await;
        // Full of what the reader still needs: the next write waits.
        let log = Arc::clone(&w.log);
        let blocked = tokio::spawn(async move {
            w.output(Stdout, "ef").await;
            w
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!blocked.is_finished(), "the writer waits for the reader");
        assert_eq!(log.summary().next_seq, 3);
        // Taking Started frees nothing (it holds no bytes). Taking "ab" does not either: an
        // event handed out stays counted until the reader asks again (it is in the transport,
        // waiting for the client's window). Asking for "cd" frees "ab".
        assert_eq!(describe(&event(reader.next(KEEPALIVE).await)), "S0");
        assert_eq!(describe(&event(reader.next(KEEPALIVE).await)), "o1:ab@0");
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished());
        assert_eq!(describe(&event(reader.next(KEEPALIVE).await)), "o2:cd@2");
        let mut w = blocked.await.unwrap();
        w.exited().await;
        assert_eq!(drain(&mut reader).await, ["o3:ef@4", "X4"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_never_holds_the_writer_back_and_is_told_what_it_missed() {
        let mut w = Writer::new(4, 100);
        let mut watcher = w
            .log
            .reader(Position::Start, GapPolicy::Report, Pace::Watch)
            .unwrap();
        let t0 = tokio::time::Instant::now();
        short_job(&mut w).await;
        assert_eq!(t0.elapsed(), Duration::ZERO, "no wait for the watcher");
        assert_eq!(
            drain(&mut watcher).await,
            [
                "gap(seq 2, 2 events, lost 2+0, at 2+0, exact true)",
                "e2:cd@0",
                "o3:ef@2",
                "X4"
            ]
        );
    }

    fn event(next: Option<Result<Delivered, PositionError>>) -> JobEvent {
        match next {
            Some(Ok(Delivered::Event(event))) => event,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_does_not_read_a_stopped_job_stops_holding_it_after_the_grace() {
        let (mut w, mut stuck) = full_log_with_a_reader().await;
        w.stop.cancel();
        let t0 = tokio::time::Instant::now();
        w.output(Stdout, "ef").await;
        assert_eq!(t0.elapsed(), Duration::from_secs(2), "one grace");
        // Demoted: later writes do not wait for it again.
        w.output(Stdout, "gh").await;
        w.exited().await;
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
        assert_eq!(
            drain(&mut stuck).await,
            [
                "gap(seq 3, 3 events, lost 4+0, at 4+0, exact true)",
                "o3:ef@4",
                "o4:gh@6",
                "X5"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_attached_count_follows_readers() {
        let w = Writer::new(4, 100);
        let attached = w.log.attached();
        let a = w
            .log
            .reader(Position::Start, GapPolicy::Report, Pace::Lossless)
            .unwrap();
        let b = w
            .log
            .reader(Position::New, GapPolicy::Report, Pace::Watch)
            .unwrap();
        assert_eq!((*attached.borrow(), w.log.summary().attached), (2, 2));
        drop(a);
        assert_eq!(*attached.borrow(), 1);
        drop(b);
        assert_eq!(*attached.borrow(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_reader_gets_keepalives() {
        let mut w = Writer::new(1 << 20, 100);
        w.started().await;
        let mut reader = w
            .log
            .reader(Position::Start, GapPolicy::Report, Pace::Lossless)
            .unwrap();
        assert!(matches!(
            reader.next(KEEPALIVE).await,
            Some(Ok(Delivered::Event(_)))
        ));
        let t0 = tokio::time::Instant::now();
        assert_eq!(
            reader.next(KEEPALIVE).await,
            Some(Ok(Delivered::Keepalive { last_seq: Some(0) }))
        );
        assert_eq!(t0.elapsed(), KEEPALIVE);
    }

    #[tokio::test(start_paused = true)]
    async fn history_is_given_up_for_credit_but_never_what_a_reader_needs_or_the_end() {
        let mut w = Writer::new(1 << 20, 100);
        let mut reader = w
            .log
            .reader(Position::Start, GapPolicy::Report, Pace::Lossless)
            .unwrap();
        short_job(&mut w).await;
        assert_eq!(w.log.release_history(100), 0, "the reader needs it all");
        for _ in 0..3 {
            reader.next(KEEPALIVE).await;
        }
        assert_eq!(
            w.log.release_history(100),
            2,
            "Started and \"ab\" were read (\"cd\", handed out last, is still in the transport)"
        );
        drain(&mut reader).await;
        assert_eq!(w.log.release_history(100), 4);
        let summary = w.log.summary();
        assert_eq!(
            (summary.first_seq, summary.held_bytes),
            (4, 0),
            "Exited stays"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn finished_logs_keep_at_most_their_bound_together_oldest_first() {
        let retired = RetiredLogs::new(10);
        let mut logs = Vec::new();
        for _ in 0..3 {
            let mut w = Writer::new(1 << 20, 100);
            short_job(&mut w).await;
            retired.retire(&w.log);
            logs.push(w.log);
        }
        let held: Vec<_> = logs.iter().map(|l| l.summary().held_bytes).collect();
        assert_eq!(held, [0, 4, 6], "6 bytes each, 10 together");
        assert_eq!(retired.held_bytes(), 10);
        // A late reader of the oldest still gets the end, and is told what it lost.
        let mut late = logs[0]
            .reader(Position::Start, GapPolicy::Report, Pace::Watch)
            .unwrap();
        assert_eq!(
            drain(&mut late).await,
            ["gap(seq 4, 4 events, lost 4+2, at 4+2, exact true)", "X4"]
        );
        // Running jobs in need take the rest, oldest first.
        assert_eq!(retired.reclaim(5), 6);
        assert_eq!(
            retired.held_bytes(),
            4,
            "the newest log's \"cd\" and \"ef\""
        );
        drop(logs.pop());
        assert_eq!(retired.held_bytes(), 0, "a log that is gone is forgotten");
        assert_eq!(retired.reclaim(100), 0);
    }

    #[tokio::test]
    async fn a_finished_log_holds_its_output_in_one_buffer_of_its_exact_size() {
        // Chunks read into larger buffers (2 bytes in 64, as the local backend keeps a buffer
        // at least a quarter full) hold those buffers' credit while the job runs; once it has
        // finished its output is one buffer holding exactly its bytes.
        let mut w = Writer::new(1 << 20, 100);
        w.started().await;
        for (offset, data) in [(0, &b"ab"[..]), (2, &b"cde"[..])] {
            let event = w.event(EventKind::Output {
                stream: Stdout,
                offset,
                data: Bytes::copy_from_slice(data),
            });
            let credit = w.budget.acquire(64).await;
            w.log.push(event, credit, &w.budget).await;
        }
        w.ends[0] = 5;
        w.exited().await;
        assert_eq!(w.log.credited_bytes(), 128);
        let retired = RetiredLogs::new(1 << 20);
        retired.retire(&w.log);
        assert_eq!((w.log.summary().held_bytes, retired.held_bytes()), (5, 5));

        // The same events, their data side by side in one allocation.
        let mut reader = w
            .log
            .reader(Position::AfterSeq(0), GapPolicy::Report, Pace::Lossless)
            .unwrap();
        let mut chunks = Vec::new();
        for _ in 0..2 {
            match reader.next(KEEPALIVE).await {
                Some(Ok(Delivered::Event(JobEvent {
                    kind: EventKind::Output { data, .. },
                    ..
                }))) => chunks.push(data),
                other => panic!("expected output, got {other:?}"),
            }
        }
        assert_eq!((&chunks[0][..], &chunks[1][..]), (&b"ab"[..], &b"cde"[..]));
        assert_eq!(chunks[0].as_ptr().wrapping_add(2), chunks[1].as_ptr());
        drop((chunks, reader));
        assert_eq!(
            retired.reclaim(5),
            5,
            "evicting the chunks frees their credit"
        );
        assert_eq!(retired.held_bytes(), 0);
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_past_the_size_index_is_told_exactly_what_it_lost() {
        let mut w = Writer::new(1 << 20, 16);
        w.started().await;
        w.output(Stdout, "ab").await;
        let mut watcher = w
            .log
            .reader(Position::Start, GapPolicy::Report, Pace::Watch)
            .unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            let Some(Ok(Delivered::Event(event))) = watcher.next(KEEPALIVE).await else {
                panic!("an event");
            };
            seen.push(describe(&event));
        }
        assert_eq!(seen, ["S0", "o1:ab@0"]);
        // More evicted since than the log remembers the sizes of.
        for i in 0..EVICTED_INDEX_LEN + 100 {
            w.output(if i % 3 == 0 { Stderr } else { Stdout }, "xyz")
                .await;
        }
        w.exited().await;
        let [out, err] = w.ends;
        let held = w.log.summary();
        let lost = [held.stdout_from - 2, held.stderr_from];
        assert_eq!(
            drain(&mut watcher).await[0],
            format!(
                "gap(seq {}, {} events, lost {}+{}, at {}+{}, exact true)",
                held.first_seq,
                held.first_seq - 2,
                lost[0],
                lost[1],
                held.stdout_from,
                held.stderr_from
            )
        );
        assert!(lost[0] + lost[1] > 0 && out > held.stdout_from && err > held.stderr_from);
    }

    #[test]
    fn sizes_of_evicted_events_are_remembered_up_to_a_bound() {
        let mut index = EvictedIndex::default();
        let chunk = |stream, len| Entry {
            event: JobEvent {
                seq: 0,
                time: SystemTime::UNIX_EPOCH,
                kind: EventKind::Output {
                    stream,
                    offset: 0,
                    data: Bytes::from(vec![0; len]),
                },
            },
            len,
            credit: Credit::default(),
        };
        index.push(&chunk(Stdout, 3));
        index.push(&chunk(Stderr, 5));
        index.push(&chunk(Stdout, 7));
        assert_eq!(index.offsets_before(0), ([0, 0], true));
        assert_eq!(index.offsets_before(2), ([3, 5], true));
        assert_eq!(index.offsets_before(3), ([10, 5], true));
        for _ in 0..EVICTED_INDEX_LEN {
            index.push(&chunk(Stdout, 1));
        }
        assert_eq!(index.first_seq, 3);
        assert_eq!(index.offsets_before(1), ([10, 5], false), "a lower bound");
        assert_eq!(index.offsets_before(3), ([10, 5], true));
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_log_keeps_the_sizes_of_fewer_evicted_events() {
        let mut w = Writer::new(1 << 20, 16);
        w.started().await;
        for _ in 0..3000 {
            w.output(Stdout, "ab").await;
        }
        w.exited().await;
        let gap_from = |log: &Arc<EventLog>, after| {
            let mut reader = log
                .reader(Position::AfterSeq(after), GapPolicy::Report, Pace::Watch)
                .unwrap();
            match reader.try_next() {
                Some(Ok(Delivered::Gap(gap))) => (gap.lost_stdout_bytes, gap.exact),
                other => panic!("{other:?}"),
            }
        };
        // Running (or just ended): 8,192 sizes would be kept, all ~2,985 evicted here are.
        let (all, exact) = gap_from(&w.log, 1);
        assert!(exact && all > 2 * 2900, "{all}");
        w.log.retire();
        // Finished: only the newest 1,024 evicted sizes; older resumes get lower bounds.
        assert_eq!(gap_from(&w.log, 2000), (all - 2 * 1999, true));
        let (lost, exact) = gap_from(&w.log, 1);
        assert!(!exact && lost < all, "{lost} {exact}");
    }
}
