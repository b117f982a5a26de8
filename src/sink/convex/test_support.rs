//! Test helpers shared by the queue and assembler tests: the delivery task's loop without the
//! HTTP, and a readable summary of the records it made.

use std::{collections::VecDeque, time::Instant};

use bytes::Bytes;

use super::{
    assemble::Assembler,
    queue::{Queue, Take},
    record::Item,
};
use crate::job::StreamKind;

/// The delivery task's loop without the HTTP: every record is accepted.
pub(super) struct Drain {
    pub(super) asm: Assembler,
    pub(super) invalid: u64,
}

impl Drain {
    pub(super) fn new() -> Self {
        Drain {
            asm: Assembler::default(),
            invalid: 0,
        }
    }

    pub(super) fn run(&mut self, q: &mut Queue, now: Instant) -> Vec<Item> {
        let mut out = VecDeque::new();
        while let Take::Send(batches) = q.take(now, self.asm.carried()) {
            let mut made = VecDeque::new();
            for batch in batches {
                let found = self.asm.assemble(batch, &mut made);
                q.assembled(&found);
                self.invalid += found.invalid;
            }
            for item in made {
                q.delivered(item.text_len());
                out.push_back(item);
            }
            q.settled();
        }
        out.into()
    }
}

pub(super) fn texts(q: &mut Queue, now: Instant) -> Vec<Item> {
    Drain::new().run(q, now)
}

pub(super) fn push(q: &mut Queue, stream: StreamKind, data: &[u8], ts: u64, now: Instant) {
    q.push_output(stream, &Bytes::copy_from_slice(data), ts, now);
}

pub(super) fn summary(items: &[Item]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|i| match i {
            Item::Text { stream, text, .. } => (stream.as_str().to_owned(), text.clone()),
            Item::Gap { bytes, .. } => ("gap".into(), bytes.to_string()),
            Item::Final { end, .. } => ("final".into(), format!("{end:?}")),
        })
        .collect()
}

pub(super) fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}
