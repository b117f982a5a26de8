//! What the mirror sends: one job's records, in order, before they are encoded as JSON
//! (`ingest::encode`). Made by the assembler, counted and marked by the queue when lost.

use crate::job::StreamKind;

/// Largest `data` of one output record, in UTF-8 bytes. Far under Convex's 1 MiB document limit
/// even if JSON escaping inflates it, and large enough that 20 MiB costs ~320 requests.
pub(crate) const MAX_RECORD_BYTES: usize = 64 * 1024;

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

    /// Epoch milliseconds of the output (or end) the record stands for.
    pub(crate) fn ts(&self) -> u64 {
        match self {
            Item::Text { ts, .. } | Item::Gap { ts, .. } | Item::Final { ts, .. } => *ts,
        }
    }
}
