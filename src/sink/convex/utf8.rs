//! Streaming UTF-8 decoding of one output stream: output is queued as raw bytes and records are
//! cut at byte counts, so a character may be split across chunks and records; invalid bytes are
//! replaced, never rejected, since a job's output is whatever the program wrote.
//!
//! Pure logic, no I/O.

use bytes::Bytes;

/// The second, third or fourth byte of a multi-byte character.
pub(super) fn is_continuation(byte: u8) -> bool {
    byte & 0xC0 == 0x80
}

/// Decodes one stream's bytes as UTF-8 across chunk boundaries: an incomplete multi-byte
/// sequence at the end of a chunk is carried into the next one; invalid bytes become U+FFFD.
#[derive(Debug, Default)]
pub(crate) struct Utf8Stream {
    /// An incomplete (so far valid) sequence from the previous chunk: at most 3 bytes.
    carry: Vec<u8>,
    /// After a gap: continuation bytes at the start of what follows (the rest of a character
    /// whose first bytes were dropped) become one U+FFFD; how many were skipped so far.
    resync: Option<usize>,
}

impl Utf8Stream {
    /// Appends the decoded `input` to `out`; returns how many invalid bytes were replaced.
    pub(crate) fn decode(&mut self, mut input: &[u8], out: &mut String) -> u64 {
        let mut invalid = 0;
        if let Some(skipped) = self.resync {
            let orphans = input
                .iter()
                .take(3 - skipped)
                .take_while(|b| is_continuation(**b))
                .count();
            if orphans > 0 && skipped == 0 {
                out.push(char::REPLACEMENT_CHARACTER);
            }
            invalid += orphans as u64;
            input = &input[orphans..];
            let skipped = skipped + orphans;
            self.resync = (input.is_empty() && skipped < 3).then_some(skipped);
        }
        // The common case, valid text with no character carried in: one fast validation pass.
        if self.carry.is_empty() {
            match std::str::from_utf8(input) {
                Ok(text) => {
                    out.push_str(text);
                    return invalid;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&input[..valid]).expect("validated"));
                    input = &input[valid..];
                }
            }
        }
        // Only a chunk that follows a split character is copied.
        let joined;
        let bytes = if self.carry.is_empty() {
            input
        } else {
            joined = [std::mem::take(&mut self.carry).as_slice(), input].concat();
            &joined
        };
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

    /// Bytes held back as the start of a character not yet complete.
    pub(crate) fn carried(&self) -> usize {
        self.carry.len()
    }

    /// Bytes of this stream were dropped next: the character the carried bytes began is lost
    /// with them (returns how many, counted as not mirrored), and continuation bytes right after
    /// the gap are one U+FFFD.
    pub(crate) fn gap(&mut self) -> u64 {
        self.resync = Some(0);
        std::mem::take(&mut self.carry).len() as u64
    }
}

/// How many bytes at the end of `chunks` begin a character that is not complete yet: what a
/// decoder will carry after them (exact for valid UTF-8; a guess otherwise).
pub(super) fn incomplete_tail(chunks: &[Bytes]) -> usize {
    let mut tail = [0u8; 3];
    let mut n = 0;
    'outer: for chunk in chunks.iter().rev() {
        for &byte in chunk.iter().rev() {
            if n == 3 {
                break 'outer;
            }
            n += 1;
            tail[3 - n] = byte;
        }
    }
    let tail = &tail[3 - n..];
    for (i, &byte) in tail.iter().enumerate().rev() {
        if !is_continuation(byte) {
            let needs = match byte {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => 1,
            };
            let has = tail.len() - i;
            return if has < needs { has } else { 0 };
        }
    }
    0
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

    #[test]
    fn the_incomplete_tail_is_what_the_decoder_will_carry() {
        // The queue sizes records with incomplete_tail before the decoder sees the bytes; the
        // two must agree, or records overshoot MAX_RECORD_BYTES or come out short.
        let text = "a€😀é".as_bytes();
        for split in 0..=text.len() {
            let mut d = Utf8Stream::default();
            d.decode(&text[..split], &mut String::new());
            let chunk = Bytes::copy_from_slice(&text[..split]);
            assert_eq!(incomplete_tail(&[chunk]), d.carried(), "split at {split}");
        }
        // Counted across chunk boundaries, and never more than a character's first 3 bytes.
        let emoji = "😀".as_bytes();
        let chunks: Vec<Bytes> = emoji[..3]
            .iter()
            .map(|b| Bytes::copy_from_slice(&[*b]))
            .collect();
        assert_eq!(incomplete_tail(&chunks), 3);
        assert_eq!(incomplete_tail(&[Bytes::from_static(emoji)]), 0);
        assert_eq!(incomplete_tail(&[]), 0);
    }

    #[test]
    fn a_gap_loses_the_carried_bytes_and_turns_orphaned_continuations_into_one_replacement() {
        let mut d = Utf8Stream::default();
        let mut out = String::new();
        assert_eq!(d.decode(b"a\xe2", &mut out), 0);
        assert_eq!(d.carried(), 1);
        // The lead byte is lost with the gap: counted by the caller as not mirrored.
        assert_eq!(d.gap(), 1);
        assert_eq!(d.carried(), 0);
        // The rest of a character whose start was dropped, split over two chunks: one U+FFFD.
        assert_eq!(d.decode(b"\x82", &mut out), 1);
        assert_eq!(d.decode(b"\xacb", &mut out), 1);
        assert_eq!(out, "a\u{FFFD}b");
        assert_eq!(d.finish(&mut out), 0);

        // At most 3 bytes are a dropped character's rest; a 4th continuation byte is invalid
        // on its own.
        let mut d = Utf8Stream::default();
        let mut out = String::new();
        assert_eq!(d.gap(), 0);
        assert_eq!(d.decode(b"\x80\x80\x80\x80", &mut out), 4);
        assert_eq!(out, "\u{FFFD}\u{FFFD}");

        // Text that starts on a character after the gap ends the resync: a later stray
        // continuation byte is an ordinary invalid byte.
        let mut d = Utf8Stream::default();
        let mut out = String::new();
        d.gap();
        assert_eq!(d.decode("é".as_bytes(), &mut out), 0);
        assert_eq!(d.decode(b"\x80", &mut out), 1);
        assert_eq!(out, "é\u{FFFD}");
    }

    #[test]
    fn finishing_without_a_carried_character_adds_nothing() {
        let mut d = Utf8Stream::default();
        let mut out = String::new();
        assert_eq!(d.decode("done €".as_bytes(), &mut out), 0);
        assert_eq!(d.finish(&mut out), 0);
        assert_eq!(out, "done €");
    }

    /// Property tests (proptest, 256 cases each, well under a second).
    mod properties {
        use proptest::{collection, prelude::*, sample::Index};

        use super::*;

        /// `data` cut at the given points (any of them, in any order; empty pieces included).
        fn split<'a>(data: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
            crate::testing::cut_at(data, cuts.iter().map(|i| i.index(data.len() + 1)))
        }

        /// Bytes that exercise the decoder: ASCII, whole characters of every length, the first
        /// bytes of one (cut short), stray bytes, and sequences UTF-8 forbids (surrogates,
        /// overlong forms, past U+10FFFF).
        fn bytes() -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                2 => any::<u8>().prop_map(|b| vec![b]),
                3 => any::<char>().prop_map(|c| c.to_string().into_bytes()),
                2 => (any::<char>(), any::<Index>()).prop_map(|(c, cut)| {
                    let bytes = c.to_string().into_bytes();
                    bytes[..cut.index(bytes.len())].to_vec()
                }),
                1 => prop_oneof![
                    Just(vec![0xED, 0xA0, 0x80]),
                    Just(vec![0xC0, 0x80]),
                    Just(vec![0xE0, 0x80, 0x80]),
                    Just(vec![0xF4, 0x90, 0x80, 0x80]),
                    Just(vec![0xF8, 0x88, 0x80, 0x80, 0x80]),
                    Just(vec![0x80, 0xBF]),
                ],
            ];
            collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
        }

        /// What one pass over the whole input counts as invalid: the bytes of every maximal
        /// invalid sequence, each of which becomes one U+FFFD.
        fn invalid_bytes(data: &[u8]) -> u64 {
            data.utf8_chunks().map(|c| c.invalid().len() as u64).sum()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Decoding in chunks, wherever they are cut, gives what decoding the whole at once
            /// gives, and counts the same invalid bytes.
            #[test]
            fn any_chunking_decodes_like_the_whole(
                data in bytes(),
                cuts in collection::vec(any::<Index>(), 0..8),
            ) {
                let mut d = Utf8Stream::default();
                let mut out = String::new();
                let mut invalid = 0;
                for chunk in split(&data, &cuts) {
                    invalid += d.decode(chunk, &mut out);
                    prop_assert!(d.carried() <= 3);
                }
                invalid += d.finish(&mut out);
                prop_assert_eq!(&out, &String::from_utf8_lossy(&data));
                prop_assert_eq!(invalid, invalid_bytes(&data));
            }

            /// For valid text, what the queue reckons the decoder will carry after each chunk
            /// (`incomplete_tail`, used to size records) is what it carries.
            #[test]
            fn the_incomplete_tail_of_valid_text_is_what_is_carried(
                text in any::<String>(),
                cuts in collection::vec(any::<Index>(), 0..8),
            ) {
                let mut d = Utf8Stream::default();
                let mut taken = Vec::new();
                for chunk in split(text.as_bytes(), &cuts) {
                    d.decode(chunk, &mut String::new());
                    taken.push(Bytes::copy_from_slice(chunk));
                    prop_assert_eq!(incomplete_tail(&taken), d.carried());
                }
            }
        }
    }
}
