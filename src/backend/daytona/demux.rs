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
}
