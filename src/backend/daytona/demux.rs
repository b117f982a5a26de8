//! Splits a Daytona command log into stdout and stderr.
//!
//! Daytona's session wrapper writes every stdout line as `01 01 01` + line + `0A` and every
//! stderr line as `02 02 02` + line + `0A`. Bytes up to the next marker belong to the stream of
//! the last marker; bytes before the first marker are dropped. Frames may split a marker, so up
//! to two trailing marker bytes are held back until the next frame (or the end).

use crate::job::StreamKind;

const STDOUT_MARKER: [u8; 3] = [1, 1, 1];
const STDERR_MARKER: [u8; 3] = [2, 2, 2];

/// Incremental demultiplexer of one command's log.
#[derive(Debug, Default)]
pub struct Demux {
    current: Option<StreamKind>,
    /// Trailing bytes of the previous frame that may start a marker.
    held: Vec<u8>,
}

impl Demux {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds raw log bytes; returns the demultiplexed pieces in order, adjacent pieces of the
    /// same stream merged.
    pub fn feed(&mut self, frame: &[u8]) -> Vec<(StreamKind, Vec<u8>)> {
        let mut data = std::mem::take(&mut self.held);
        data.extend_from_slice(frame);
        let mut pieces: Vec<(StreamKind, Vec<u8>)> = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i + 3 <= data.len() {
            let marker = match &data[i..i + 3] {
                m if m == STDOUT_MARKER => Some(StreamKind::Stdout),
                m if m == STDERR_MARKER => Some(StreamKind::Stderr),
                _ => None,
            };
            if let Some(stream) = marker {
                self.emit(&data[start..i], &mut pieces);
                self.current = Some(stream);
                i += 3;
                start = i;
            } else {
                i += 1;
            }
        }
        // Hold back a tail that could be the start of a marker split across frames.
        let tail = &data[start..];
        let hold = held_suffix(tail);
        self.emit(&tail[..tail.len() - hold], &mut pieces);
        self.held = tail[tail.len() - hold..].to_vec();
        pieces
    }

    /// Ends the log: releases held bytes to the current stream.
    pub fn finish(&mut self) -> Vec<(StreamKind, Vec<u8>)> {
        let held = std::mem::take(&mut self.held);
        let mut pieces = Vec::new();
        self.emit(&held, &mut pieces);
        pieces
    }

    fn emit(&self, bytes: &[u8], pieces: &mut Vec<(StreamKind, Vec<u8>)>) {
        let Some(stream) = self.current else {
            return; // before the first marker: not command output
        };
        if bytes.is_empty() {
            return;
        }
        match pieces.last_mut() {
            Some((last, buf)) if *last == stream => buf.extend_from_slice(bytes),
            _ => pieces.push((stream, bytes.to_vec())),
        }
    }
}

/// How many trailing bytes (0..=2) could begin a marker: one or two equal bytes of 0x01 or 0x02.
fn held_suffix(tail: &[u8]) -> usize {
    match tail {
        [.., a, b] if (*a == 1 || *a == 2) && a == b => 2,
        [.., b] if *b == 1 || *b == 2 => 1,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StreamKind::{Stderr, Stdout};

    fn framed(lines: &[(StreamKind, &str)]) -> Vec<u8> {
        let mut log = b"shell noise before the first marker".to_vec();
        for (stream, line) in lines {
            log.extend_from_slice(match stream {
                Stdout => &STDOUT_MARKER,
                Stderr => &STDERR_MARKER,
            });
            log.extend_from_slice(line.as_bytes());
            log.push(b'\n');
        }
        log
    }

    fn concat(pieces: &[(StreamKind, Vec<u8>)], want: StreamKind) -> String {
        let bytes: Vec<u8> = pieces
            .iter()
            .filter(|(s, _)| *s == want)
            .flat_map(|(_, b)| b.clone())
            .collect();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn every_split_point_gives_the_same_streams() {
        let lines = [
            (Stdout, "out 1"),
            (Stderr, "err 1"),
            (Stdout, ""),
            (Stdout, "out \u{1}2"),
            (Stderr, "e"),
        ];
        let log = framed(&lines);
        for frame in 1..=log.len() {
            let mut demux = Demux::new();
            let mut pieces = Vec::new();
            for chunk in log.chunks(frame) {
                pieces.extend(demux.feed(chunk));
            }
            pieces.extend(demux.finish());
            assert_eq!(
                concat(&pieces, Stdout),
                "out 1\n\nout \u{1}2\n",
                "frame size {frame}"
            );
            assert_eq!(concat(&pieces, Stderr), "err 1\ne\n", "frame size {frame}");
        }
    }

    #[test]
    fn order_across_streams_is_kept_and_same_stream_pieces_merge() {
        let log = framed(&[(Stdout, "a"), (Stdout, "b"), (Stderr, "c"), (Stdout, "d")]);
        let pieces = Demux::new().feed(&log);
        let expect: Vec<(StreamKind, Vec<u8>)> = vec![
            (Stdout, b"a\nb\n".to_vec()),
            (Stderr, b"c\n".to_vec()),
            (Stdout, b"d\n".to_vec()),
        ];
        assert_eq!(pieces, expect);
    }

    #[test]
    fn trailing_marker_bytes_are_released_at_the_end() {
        let mut demux = Demux::new();
        let mut pieces = demux.feed(b"\x01\x01\x01data\x01");
        assert_eq!(pieces, vec![(Stdout, b"data".to_vec())]);
        pieces = demux.finish();
        assert_eq!(pieces, vec![(Stdout, b"\x01".to_vec())]);
    }

    /// Property tests (proptest, 256 cases each, well under a second).
    mod properties {
        use proptest::{collection, prelude::*, sample::Index};

        use super::*;

        /// `data` cut at the given points (any of them, in any order; empty pieces included).
        fn split<'a>(data: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
            crate::testing::cut_at(data, cuts.iter().map(|i| i.index(data.len() + 1)))
        }

        fn contains_marker(bytes: &[u8]) -> bool {
            bytes
                .windows(3)
                .any(|w| w == STDOUT_MARKER || w == STDERR_MARKER)
        }

        /// Any bytes, marker bytes and newlines often; never a whole marker, which a line
        /// cannot carry (the framing has no escape).
        fn line() -> impl Strategy<Value = Vec<u8>> {
            collection::vec(
                prop_oneof![3 => any::<u8>(), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(b'\n')],
                0..12,
            )
            .prop_filter("no whole marker", |l| !contains_marker(l))
        }

        fn stream() -> impl Strategy<Value = StreamKind> {
            prop_oneof![Just(Stdout), Just(Stderr)]
        }

        /// Adjacent pieces of one stream joined: what is left to compare once chunking is gone.
        fn merged(
            pieces: impl IntoIterator<Item = (StreamKind, Vec<u8>)>,
        ) -> Vec<(StreamKind, Vec<u8>)> {
            let mut out: Vec<(StreamKind, Vec<u8>)> = Vec::new();
            for (stream, bytes) in pieces {
                match out.last_mut() {
                    Some((last, buf)) if *last == stream => buf.extend_from_slice(&bytes),
                    _ if bytes.is_empty() => {}
                    _ => out.push((stream, bytes)),
                }
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Lines framed as Daytona frames them (shell noise first, the last line perhaps
            /// cut short of its newline), split into chunks anywhere: demultiplexed, each stream
            /// gets exactly its lines, in order.
            #[test]
            fn any_chunking_of_a_framed_log_gives_each_stream_its_bytes(
                noise in collection::vec(any::<u8>().prop_filter("not a marker byte", |b| !matches!(b, 1 | 2)), 0..8),
                lines in collection::vec((stream(), line()), 0..16),
                last_newline in any::<bool>(),
                cuts in collection::vec(any::<Index>(), 0..12),
            ) {
                let mut log = noise;
                let mut expected = Vec::new();
                for (i, (stream, line)) in lines.iter().enumerate() {
                    log.extend_from_slice(match stream {
                        Stdout => &STDOUT_MARKER,
                        Stderr => &STDERR_MARKER,
                    });
                    let mut text = line.clone();
                    if last_newline || i + 1 < lines.len() {
                        text.push(b'\n');
                    }
                    log.extend_from_slice(&text);
                    expected.push((*stream, text));
                }
                let mut demux = Demux::new();
                let mut pieces = Vec::new();
                for chunk in split(&log, &cuts) {
                    let out = demux.feed(chunk);
                    // Within one feed, adjacent pieces are already merged, and none is empty.
                    prop_assert!(out.windows(2).all(|w| w[0].0 != w[1].0), "{out:?}");
                    prop_assert!(out.iter().all(|(_, b)| !b.is_empty()));
                    pieces.extend(out);
                }
                pieces.extend(demux.finish());
                prop_assert_eq!(merged(pieces), merged(expected));
            }
        }
    }
}
