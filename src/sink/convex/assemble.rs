//! The delivery task's half of a job's mirror: [`Assembler`] makes records of what it takes from
//! the [`Queue`](super::queue::Queue), at send time: streaming UTF-8 decoding per stream, records
//! of at most [`MAX_RECORD_BYTES`]. So output the queue drops is never decoded.
//!
//! Pure logic, no I/O.

use std::collections::VecDeque;

use bytes::Bytes;

use super::{
    queue::{Batch, index},
    record::{Item, MAX_RECORD_BYTES},
    utf8::Utf8Stream,
};
use crate::job::StreamKind;

const STREAMS: [StreamKind; 2] = [StreamKind::Stdout, StreamKind::Stderr];

/// What making records of one batch found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Assembled {
    /// Records made.
    pub(crate) records: usize,
    /// Invalid bytes replaced by U+FFFD.
    pub(crate) invalid: u64,
    /// Carried bytes of characters cut by a gap, added to its count.
    pub(crate) dropped: u64,
}

impl Assembled {
    pub(crate) fn add(&mut self, other: Assembled) {
        self.records += other.records;
        self.invalid += other.invalid;
        self.dropped += other.dropped;
    }
}

/// The delivery task's half: makes records of what it takes from the queue, at send time.
#[derive(Debug, Default)]
pub(crate) struct Assembler {
    streams: [Utf8Stream; 2],
}

impl Assembler {
    /// Bytes each stream's decoder holds back (stdout, stderr), for
    /// [`Queue::take`](super::queue::Queue::take).
    pub(crate) fn carried(&self) -> [usize; 2] {
        [self.streams[0].carried(), self.streams[1].carried()]
    }

    /// Appends the records of `batch` to `out` (usually one; none when all of it is carried).
    pub(crate) fn assemble(&mut self, batch: Batch, out: &mut VecDeque<Item>) -> Assembled {
        let mut made = Assembled::default();
        let before = out.len();
        match batch {
            Batch::Echo { text, ts } => out.push_back(Item::Text {
                stream: StreamKind::Stdout,
                text,
                ts,
            }),
            Batch::Output {
                stream,
                chunks,
                ts,
                last,
            } => {
                let decoder = &mut self.streams[index(stream)];
                let len: usize = chunks.iter().map(Bytes::len).sum();
                let mut text = String::with_capacity(len + decoder.carried() + 3);
                for chunk in &chunks {
                    made.invalid += decoder.decode(chunk, &mut text);
                }
                if last {
                    made.invalid += decoder.finish(&mut text);
                }
                push_text(out, stream, text, ts);
            }
            Batch::Gap { bytes, ts, cut } => {
                for (i, decoder) in self.streams.iter_mut().enumerate() {
                    if cut[i] {
                        made.dropped += decoder.gap();
                    }
                }
                out.push_back(Item::Gap {
                    bytes: bytes + made.dropped,
                    ts,
                });
            }
            Batch::Final { end, ts } => {
                // A character still incomplete when the job ended.
                for stream in STREAMS {
                    let mut text = String::new();
                    made.invalid += self.streams[index(stream)].finish(&mut text);
                    push_text(out, stream, text, ts);
                }
                out.push_back(Item::Final { end, ts });
            }
        }
        made.records = out.len() - before;
        made
    }
}

/// Queues `text` as records of at most [`MAX_RECORD_BYTES`] (more than one only when invalid
/// bytes, each replaced by a 3-byte U+FFFD, made it longer than the raw bytes taken).
fn push_text(out: &mut VecDeque<Item>, stream: StreamKind, text: String, ts: u64) {
    if text.len() <= MAX_RECORD_BYTES {
        if !text.is_empty() {
            out.push_back(Item::Text { stream, text, ts });
        }
        return;
    }
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let cut = rest.floor_char_boundary(MAX_RECORD_BYTES);
        out.push_back(Item::Text {
            stream,
            text: rest[..cut].to_owned(),
            ts,
        });
        rest = &rest[cut..];
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::sink::convex::{
        queue::{LINGER, Queue},
        record::End,
        test_support::{Drain, pairs, push, summary},
    };

    fn output(stream: StreamKind, data: &[u8], ts: u64, last: bool) -> Batch {
        Batch::Output {
            stream,
            chunks: vec![Bytes::copy_from_slice(data)],
            ts,
            last,
        }
    }

    fn found(records: usize, invalid: u64, dropped: u64) -> Assembled {
        Assembled {
            records,
            invalid,
            dropped,
        }
    }

    fn text(stream: StreamKind, text: &str, ts: u64) -> Item {
        Item::Text {
            stream,
            text: text.into(),
            ts,
        }
    }

    #[test]
    fn the_echo_is_a_stdout_record_of_its_own() {
        let mut asm = Assembler::default();
        let mut out = VecDeque::new();
        let batch = Batch::Echo {
            text: "$ ls".into(),
            ts: 7,
        };
        let made = asm.assemble(batch, &mut out);
        assert_eq!(made, found(1, 0, 0));
        assert_eq!(out, [text(StreamKind::Stdout, "$ ls", 7)]);
    }

    #[test]
    fn each_stream_carries_its_own_split_character_to_its_next_batch() {
        let mut asm = Assembler::default();
        let mut out = VecDeque::new();
        let euro = "€".as_bytes();
        let made = asm.assemble(
            output(StreamKind::Stdout, &[b"a", &euro[..2]].concat(), 1, false),
            &mut out,
        );
        assert_eq!(made.records, 1);
        // All of this batch is the start of a character: no record yet.
        let made = asm.assemble(output(StreamKind::Stderr, &euro[..1], 2, false), &mut out);
        assert_eq!(made, Assembled::default());
        assert_eq!(asm.carried(), [2, 1]);
        asm.assemble(
            output(StreamKind::Stderr, &[&euro[1..], b"e"].concat(), 3, false),
            &mut out,
        );
        asm.assemble(
            output(StreamKind::Stdout, &[&euro[2..], b"o"].concat(), 4, false),
            &mut out,
        );
        assert_eq!(asm.carried(), [0, 0]);
        assert_eq!(
            out,
            [
                text(StreamKind::Stdout, "a", 1),
                text(StreamKind::Stderr, "€e", 3),
                text(StreamKind::Stdout, "€o", 4),
            ]
        );
    }

    #[test]
    fn the_last_batch_of_a_stream_ends_its_incomplete_character() {
        let mut asm = Assembler::default();
        let mut out = VecDeque::new();
        let made = asm.assemble(output(StreamKind::Stdout, b"ok\xe2\x82", 1, true), &mut out);
        assert_eq!(made, found(1, 2, 0));
        assert_eq!(out, [text(StreamKind::Stdout, "ok\u{FFFD}", 1)]);
        assert_eq!(asm.carried(), [0, 0]);
    }

    #[test]
    fn a_gap_adds_the_carried_bytes_of_the_streams_it_cut() {
        let mut asm = Assembler::default();
        let mut out = VecDeque::new();
        let euro = "€".as_bytes();
        asm.assemble(output(StreamKind::Stdout, &euro[..2], 1, false), &mut out);
        asm.assemble(output(StreamKind::Stderr, &euro[..1], 2, false), &mut out);
        let gap = Batch::Gap {
            bytes: 10,
            ts: 3,
            cut: [true, false],
        };
        let made = asm.assemble(gap, &mut out);
        assert_eq!(made, found(1, 0, 2));
        assert_eq!(out, [Item::Gap { bytes: 12, ts: 3 }]);
        // Stdout lost its character's start: the rest is one U+FFFD. Stderr was not cut.
        assert_eq!(asm.carried(), [0, 1]);
        out.clear();
        let made = asm.assemble(
            output(StreamKind::Stdout, &[&euro[2..], b"!"].concat(), 4, false),
            &mut out,
        );
        assert_eq!(made.invalid, 1);
        asm.assemble(output(StreamKind::Stderr, &euro[1..], 5, false), &mut out);
        assert_eq!(
            out,
            [
                text(StreamKind::Stdout, "\u{FFFD}!", 4),
                text(StreamKind::Stderr, "€", 5),
            ]
        );
    }

    #[test]
    fn the_final_batch_ends_both_streams_before_the_final_record() {
        let mut asm = Assembler::default();
        let mut out = VecDeque::new();
        asm.assemble(output(StreamKind::Stdout, b"\xe2", 1, false), &mut out);
        asm.assemble(output(StreamKind::Stderr, b"\xf0\x9f", 2, false), &mut out);
        assert!(out.is_empty());
        let end = Batch::Final {
            end: End::ExitCode(1),
            ts: 3,
        };
        let made = asm.assemble(end, &mut out);
        assert_eq!(made, found(3, 3, 0));
        assert_eq!(
            out,
            [
                text(StreamKind::Stdout, "\u{FFFD}", 3),
                text(StreamKind::Stderr, "\u{FFFD}", 3),
                Item::Final {
                    end: End::ExitCode(1),
                    ts: 3
                },
            ]
        );
    }

    #[test]
    fn text_grown_past_a_record_by_replacements_is_split_on_character_boundaries() {
        // Each invalid byte becomes a 3-byte U+FFFD: one record's worth of raw bytes decodes to
        // three records' worth of text.
        let mut asm = Assembler::default();
        let mut out = VecDeque::new();
        let raw = [b"ok".as_slice(), &[0xff; MAX_RECORD_BYTES - 2]].concat();
        let made = asm.assemble(output(StreamKind::Stderr, &raw, 9, false), &mut out);
        assert_eq!(made.invalid, MAX_RECORD_BYTES as u64 - 2);
        assert_eq!(made.records, out.len());
        let expected = "ok".to_owned() + &"\u{FFFD}".repeat(MAX_RECORD_BYTES - 2);
        let mut joined = String::new();
        for (i, item) in out.iter().enumerate() {
            let Item::Text {
                stream: StreamKind::Stderr,
                text,
                ts: 9,
            } = item
            else {
                panic!("{item:?}")
            };
            assert!(text.len() <= MAX_RECORD_BYTES, "record {i}: {}", text.len());
            if i + 1 < out.len() {
                assert!(
                    text.len() > MAX_RECORD_BYTES - 3,
                    "record {i} not full: {}",
                    text.len()
                );
            }
            joined.push_str(text);
        }
        // 196_604 bytes of text: 65_534 ("ok" and whole characters), 65_535, 65_535.
        assert_eq!(out.len(), 3);
        assert_eq!(joined, expected);
    }

    #[test]
    fn text_of_exactly_one_record_is_not_split() {
        let mut out = VecDeque::new();
        push_text(
            &mut out,
            StreamKind::Stdout,
            "x".repeat(MAX_RECORD_BYTES),
            1,
        );
        push_text(&mut out, StreamKind::Stdout, String::new(), 2);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].text_len(), MAX_RECORD_BYTES);
    }

    #[test]
    fn records_are_capped_at_64k_on_character_boundaries() {
        let now = Instant::now();
        let mut q = Queue::new(8 << 20);
        let text = "é".repeat(100_000) + "€"; // 200_003 bytes of multi-byte characters
        // Odd chunk sizes, so records end inside characters and the decoder carries.
        for chunk in text.as_bytes().chunks(10_001) {
            push(&mut q, StreamKind::Stdout, chunk, 1, now);
        }
        q.push_end(End::ExitCode(0), 2);
        let mut drain = Drain::new();
        let items = drain.run(&mut q, now);
        assert_eq!(drain.invalid, 0);
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
        assert!(texts.len() <= text.len() / MAX_RECORD_BYTES + 1);
        assert_eq!(joined, text);
    }

    #[test]
    fn characters_split_across_chunks_and_records_arrive_whole_through_the_queue() {
        let now = Instant::now();
        let mut q = Queue::new(1 << 20);
        let euro = "€".as_bytes();
        push(&mut q, StreamKind::Stdout, &euro[..1], 1, now);
        // Sent before the rest arrives (linger over): the lead byte stays with the decoder.
        let mut drain = Drain::new();
        assert!(drain.run(&mut q, now + LINGER).is_empty());
        assert_eq!(drain.asm.carried(), [1, 0]);
        assert_eq!(q.pending_bytes(), 0);
        push(&mut q, StreamKind::Stdout, &euro[1..], 2, now);
        push(&mut q, StreamKind::Stderr, &euro[..2], 3, now);
        q.push_end(End::ExitCode(0), 4);
        let items = drain.run(&mut q, now);
        assert_eq!(
            summary(&items),
            pairs(&[
                ("stdout", "€"),
                ("stderr", "\u{FFFD}"),
                ("final", "ExitCode(0)")
            ])
        );
        assert_eq!(drain.invalid, 2);
    }

    #[test]
    fn interleaved_streams_keep_their_order_and_split_characters() {
        let now = Instant::now();
        let mut q = Queue::new(1 << 20);
        let (a, b) = ("ü".as_bytes(), "😀".as_bytes());
        push(
            &mut q,
            StreamKind::Stdout,
            &[b"1", &a[..1]].concat(),
            1,
            now,
        );
        push(
            &mut q,
            StreamKind::Stderr,
            &[b"2", &b[..3]].concat(),
            2,
            now,
        );
        push(
            &mut q,
            StreamKind::Stdout,
            &[&a[1..], b"3"].concat(),
            3,
            now,
        );
        push(
            &mut q,
            StreamKind::Stderr,
            &[&b[3..], b"4"].concat(),
            4,
            now,
        );
        push(&mut q, StreamKind::Stdout, b"5", 5, now);
        q.push_end(End::ExitCode(0), 6);
        let mut drain = Drain::new();
        let items = drain.run(&mut q, now);
        // A character completes in the record of the chunk that completes it.
        assert_eq!(
            summary(&items),
            pairs(&[
                ("stdout", "1"),
                ("stderr", "2"),
                ("stdout", "ü3"),
                ("stderr", "😀4"),
                ("stdout", "5"),
                ("final", "ExitCode(0)")
            ])
        );
        assert_eq!(drain.invalid, 0);
        let ts: Vec<u64> = items
            .iter()
            .map(|i| match i {
                Item::Text { ts, .. } | Item::Gap { ts, .. } | Item::Final { ts, .. } => *ts,
            })
            .collect();
        assert_eq!(ts, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_gap_after_a_carried_lead_byte_leaves_at_most_one_replacement_character() {
        let now = Instant::now();
        const MAX: usize = MAX_RECORD_BYTES;
        let mut q = Queue::new(MAX);
        let mut drain = Drain::new();
        // The first record ends in the lead byte of "€": the decoder carries it.
        push(&mut q, StreamKind::Stdout, b"aaaa\xe2", 1, now);
        let sent = drain.run(&mut q, now + LINGER);
        assert_eq!(summary(&sent), pairs(&[("stdout", "aaaa")]));
        assert_eq!(drain.asm.carried(), [1, 0]);
        // The rest of that character is in a chunk the bound drops whole, which itself ends in
        // the lead byte of a character whose continuation bytes start the chunk that is kept.
        let mut second = vec![0x82, 0xac];
        second.extend_from_slice(&[b'b'; MAX - 3]);
        second.push(0xe2);
        push(&mut q, StreamKind::Stdout, &second, 2, now);
        let mut third = vec![0x82, 0xac];
        third.extend_from_slice(&[b'c'; MAX - 2]);
        push(&mut q, StreamKind::Stdout, &third, 3, now);
        assert_eq!(q.pending_bytes(), MAX as u64);
        q.push_end(End::ExitCode(0), 4);
        let items = drain.run(&mut q, now);
        // The carried lead byte counts as not mirrored, with the chunk dropped after it.
        assert_eq!(
            items[0],
            Item::Gap {
                bytes: MAX as u64 + 1,
                ts: 2
            }
        );
        assert_eq!(q.stats().bytes_dropped, MAX as u64 + 1);
        // The orphaned continuation bytes are one U+FFFD (counted invalid), then the text.
        let kept: String = items[1..items.len() - 1]
            .iter()
            .map(|i| match i {
                Item::Text {
                    stream: StreamKind::Stdout,
                    text,
                    ..
                } => text.as_str(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(kept, format!("\u{FFFD}{}", "c".repeat(MAX - 2)));
        assert!(
            items[1..items.len() - 1]
                .iter()
                .all(|i| i.text_len() <= MAX)
        );
        assert_eq!(drain.invalid, 2);
        assert_eq!(
            summary(&items[items.len() - 1..]),
            pairs(&[("final", "ExitCode(0)")])
        );
    }
}
