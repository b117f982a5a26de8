//! A job's stdin: what any attached client writes, in order, one whole message at a time.
//!
//! Nothing is buffered here: a write waits until the process has taken its bytes (its pipe had
//! room), so a process that does not read pushes back on the writer, and through HTTP/2 on the
//! client. Every byte accepted is counted; a write may say at which offset of the input it
//! starts, so a client that lost its connection mid-write resends from its last known offset
//! and each byte is applied once (bytes below the accepted end are skipped; a write past it is
//! refused with the offset expected).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

/// Where a job's stdin goes: the write end of its pipe, say. Dropping it closes the input (the
/// process reads EOF).
#[async_trait]
pub trait InputSink: Send {
    /// Writes some of `data` (at least one byte of a non-empty slice), waiting while the
    /// process has no room for it. Cancel-safe: a cancelled write wrote nothing.
    async fn write(&mut self, data: &[u8]) -> std::io::Result<usize>;

    /// Tells the process there is no more input, where dropping the sink is not how (a
    /// terminal's end-of-file character, say); it is dropped right after.
    async fn close(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    /// Whether `close` gives the process end of input. A backend whose stdin has no end (one
    /// that only appends lines, say) says no: closing is then refused and the input stays open.
    fn has_eof(&self) -> bool {
        true
    }
}

/// A write a sink did not make, returned by [`InputSink::write`] inside an `io::Error`: the
/// write is refused and the input stays open (unlike any other error, which closes it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputRefused {
    /// Bytes the backend's stdin cannot carry as given; nothing was sent. The caller's to change.
    #[error("{0}")]
    Unfaithful(String),
    /// The backend did not confirm the write (it failed on the way): it may or may not have
    /// reached the process.
    #[error("{0}")]
    Unconfirmed(String),
}

impl From<InputRefused> for std::io::Error {
    fn from(refused: InputRefused) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, refused)
    }
}

/// Why a job takes no more input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputClosed {
    /// The job was started without `stdin`: its stdin is /dev/null.
    NotRequested,
    /// A client closed it.
    ByClient,
    /// The process closed its end (EPIPE): nothing reads it any more.
    ByProcess,
    /// The job has finished.
    JobEnded,
}

impl std::fmt::Display for InputClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InputClosed::NotRequested => {
                "was started without stdin (set `stdin` in the ExecRequest to keep it open)"
            }
            InputClosed::ByClient => "has its stdin closed (a client closed it)",
            InputClosed::ByProcess => "no longer reads its stdin (the process closed it)",
            InputClosed::JobEnded => "has finished",
        })
    }
}

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// The input is closed; nothing was written.
    #[error("the job {0}")]
    Closed(InputClosed),
    /// The write starts past the input accepted so far: bytes in between are missing.
    #[error(
        "stdin write at offset {offset}, but {accepted} bytes were accepted: resend from offset {accepted}"
    )]
    OffsetAhead { offset: u64, accepted: u64 },
    /// The job's backend cannot deliver this input as given; nothing was written and the input
    /// is still open.
    #[error("stdin write refused: {0}")]
    Refused(InputRefused),
    /// The job's backend cannot give its process end of input; the input is still open.
    #[error(
        "its backend cannot send stdin EOF (see Capabilities.stdin_eof): its stdin stays open \
         until the job ends"
    )]
    NoEof,
}

/// A job's stdin, shared by every client of the job.
pub struct JobInput {
    /// Held for the length of a write, so messages from several clients never interleave.
    sink: tokio::sync::Mutex<Sink>,
    /// Bytes accepted so far (the process has them), readable without waiting for a write.
    accepted: AtomicU64,
    open: AtomicBool,
    /// The job has finished: a write under way gives up (a process that escaped the job may
    /// still hold the pipe without reading it) so that `end` never waits on a client.
    ended: CancellationToken,
}

struct Sink {
    to: Option<Box<dyn InputSink>>,
    closed: InputClosed,
}

impl JobInput {
    /// The stdin of a job started with it open.
    pub fn open(sink: Box<dyn InputSink>) -> Self {
        Self::with(Some(sink))
    }

    /// The stdin of a job started without it.
    pub fn none() -> Self {
        Self::with(None)
    }

    fn with(to: Option<Box<dyn InputSink>>) -> Self {
        JobInput {
            open: AtomicBool::new(to.is_some()),
            // Why writes are refused, once `to` is gone; until it is closed, for a job that
            // never had stdin.
            sink: tokio::sync::Mutex::new(Sink {
                to,
                closed: InputClosed::NotRequested,
            }),
            accepted: AtomicU64::new(0),
            ended: CancellationToken::new(),
        }
    }

    /// Bytes the process has been given so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Acquire)
    }

    /// Whether writes are still taken.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Gives `data` to the process, all of it, after any write under way. With `offset`, bytes
    /// below what was accepted already are skipped (a resend). Returns the bytes accepted in all.
    /// Cancelled (the client went away), it keeps what the process took: a resend from the
    /// accepted offset completes it.
    pub async fn write(&self, data: Bytes, offset: Option<u64>) -> Result<u64, InputError> {
        let mut sink = self.sink.lock().await;
        let accepted = self.accepted();
        let mut data = match offset {
            Some(offset) if offset > accepted => {
                return Err(InputError::OffsetAhead { offset, accepted });
            }
            Some(offset) => {
                let already = (accepted - offset).min(data.len() as u64) as usize;
                data.slice(already..)
            }
            None => data,
        };
        if data.is_empty() {
            // A resend of what the process has already (its answer was lost): done, whatever
            // happened to the input since.
            return Ok(accepted);
        }
        let closed = sink.closed;
        let Some(to) = sink.to.as_mut() else {
            return Err(InputError::Closed(closed));
        };
        while !data.is_empty() {
            let written = tokio::select! {
                written = to.write(&data) => written,
                _ = self.ended.cancelled() => {
                    self.close_locked(&mut sink, InputClosed::JobEnded);
                    return Err(InputError::Closed(InputClosed::JobEnded));
                }
            };
            match written {
                Ok(written) => {
                    self.accepted.fetch_add(written as u64, Ordering::AcqRel);
                    metrics::counter!("sandbox_job_stdin_bytes_total").increment(written as u64);
                    data = data.slice(written..);
                }
                Err(e) => {
                    if let Some(refused) =
                        e.get_ref().and_then(|e| e.downcast_ref::<InputRefused>())
                    {
                        return Err(InputError::Refused(refused.clone()));
                    }
                    tracing::debug!(error = %e, "a job's stdin stopped taking input");
                    self.close_locked(&mut sink, InputClosed::ByProcess);
                    return Err(InputError::Closed(InputClosed::ByProcess));
                }
            }
        }
        Ok(self.accepted())
    }

    /// Closes the input after any write under way: the process reads EOF. Closing input that
    /// is closed already is not an error, unless the job never had any.
    pub async fn close(&self) -> Result<u64, InputError> {
        let mut sink = self.sink.lock().await;
        if sink.to.is_none() && sink.closed == InputClosed::NotRequested {
            return Err(InputError::Closed(InputClosed::NotRequested));
        }
        if let Some(to) = sink.to.as_mut() {
            if !to.has_eof() {
                return Err(InputError::NoEof);
            }
            tokio::select! {
                closed = to.close() => if let Err(e) = closed {
                    tracing::debug!(error = %e, "telling a job its input ended failed");
                },
                _ = self.ended.cancelled() => {}
            }
        }
        self.close_locked(&mut sink, InputClosed::ByClient);
        Ok(self.accepted())
    }

    /// The job has finished: no more input (a write under way is given up first).
    pub async fn end(&self) {
        self.ended.cancel();
        let mut sink = self.sink.lock().await;
        self.close_locked(&mut sink, InputClosed::JobEnded);
    }

    fn close_locked(&self, sink: &mut Sink, why: InputClosed) {
        if sink.to.take().is_some() {
            sink.closed = why;
        } else if sink.closed != InputClosed::NotRequested {
            // Keep the first reason, except that a job's end is news to everyone.
            if why == InputClosed::JobEnded {
                sink.closed = why;
            }
        }
        self.open.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A sink that takes at most `room` bytes per write and records what it got.
    struct Recorder {
        got: Arc<Mutex<Vec<u8>>>,
        room: usize,
        broken: Arc<AtomicBool>,
    }

    #[async_trait]
    impl InputSink for Recorder {
        async fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            if self.broken.load(Ordering::Acquire) {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            let n = data.len().min(self.room);
            self.got.lock().unwrap().extend_from_slice(&data[..n]);
            Ok(n)
        }
    }

    fn input(room: usize) -> (JobInput, Arc<Mutex<Vec<u8>>>, Arc<AtomicBool>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let broken = Arc::new(AtomicBool::new(false));
        let sink = Recorder {
            got: Arc::clone(&got),
            room,
            broken: Arc::clone(&broken),
        };
        (JobInput::open(Box::new(sink)), got, broken)
    }

    #[tokio::test]
    async fn resent_writes_are_applied_once_and_writes_past_the_end_are_refused() {
        let (input, got, _) = input(3);
        assert_eq!(
            input.write(Bytes::from_static(b"abc"), Some(0)).await,
            Ok(3)
        );
        // A resend of the same bytes and more: only the new bytes are applied.
        assert_eq!(
            input.write(Bytes::from_static(b"abcdef"), Some(0)).await,
            Ok(6)
        );
        assert_eq!(
            input.write(Bytes::from_static(b"def"), Some(3)).await,
            Ok(6)
        );
        assert_eq!(
            input.write(Bytes::from_static(b"xyz"), Some(10)).await,
            Err(InputError::OffsetAhead {
                offset: 10,
                accepted: 6
            })
        );
        // Without an offset: appended.
        assert_eq!(input.write(Bytes::from_static(b"gh"), None).await, Ok(8));
        assert_eq!(*got.lock().unwrap(), b"abcdefgh");
        assert_eq!(input.accepted(), 8);
        // Once closed, a resend of what was accepted still succeeds; new bytes do not.
        input.close().await.unwrap();
        assert_eq!(
            input.write(Bytes::from_static(b"fgh"), Some(5)).await,
            Ok(8)
        );
        assert_eq!(
            input.write(Bytes::from_static(b"ghi"), Some(6)).await,
            Err(InputError::Closed(InputClosed::ByClient))
        );
    }

    #[tokio::test]
    async fn closed_input_refuses_writes_and_says_why() {
        let (input, _, _) = input(64);
        assert_eq!(input.close().await, Ok(0));
        assert_eq!(input.close().await, Ok(0), "closing twice is fine");
        assert_eq!(
            input.write(Bytes::from_static(b"x"), None).await,
            Err(InputError::Closed(InputClosed::ByClient))
        );
        assert!(!input.is_open());

        let (broken_pipe, _, broken) = self::input(64);
        broken.store(true, Ordering::Release);
        assert_eq!(
            broken_pipe.write(Bytes::from_static(b"x"), None).await,
            Err(InputError::Closed(InputClosed::ByProcess))
        );

        let (input, _, _) = self::input(64);
        input.end().await;
        assert_eq!(
            input.write(Bytes::from_static(b"x"), None).await,
            Err(InputError::Closed(InputClosed::JobEnded))
        );

        let none = JobInput::none();
        assert_eq!(
            none.write(Bytes::from_static(b"x"), None).await,
            Err(InputError::Closed(InputClosed::NotRequested))
        );
        assert_eq!(
            none.close().await,
            Err(InputError::Closed(InputClosed::NotRequested))
        );
    }

    /// A sink like Daytona's session input: whole lines only, and no end of input.
    struct LinesOnly(Arc<Mutex<Vec<u8>>>);

    #[async_trait]
    impl InputSink for LinesOnly {
        async fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            if data.last() != Some(&b'\n') {
                return Err(InputRefused::Unfaithful("end it with a newline".into()).into());
            }
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }

        fn has_eof(&self) -> bool {
            false
        }
    }

    #[tokio::test]
    async fn a_refused_write_or_close_leaves_the_input_open() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let input = JobInput::open(Box::new(LinesOnly(Arc::clone(&got))));
        assert_eq!(
            input.write(Bytes::from_static(b"partial"), None).await,
            Err(InputError::Refused(InputRefused::Unfaithful(
                "end it with a newline".into()
            )))
        );
        assert_eq!(input.close().await, Err(InputError::NoEof));
        assert!(input.is_open());
        assert_eq!(
            input.write(Bytes::from_static(b"line\n"), None).await,
            Ok(5)
        );
        assert_eq!(*got.lock().unwrap(), b"line\n");
    }

    /// A process that never reads.
    struct Stuck;

    #[async_trait]
    impl InputSink for Stuck {
        async fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn the_end_of_the_job_gives_up_a_write_that_never_completes() {
        let input = Arc::new(JobInput::open(Box::new(Stuck)));
        let writer = tokio::spawn({
            let input = Arc::clone(&input);
            async move { input.write(Bytes::from_static(b"never read"), None).await }
        });
        tokio::task::yield_now().await;
        input.end().await;
        assert_eq!(
            writer.await.unwrap(),
            Err(InputError::Closed(InputClosed::JobEnded))
        );
        assert!(!input.is_open());
    }

    #[tokio::test]
    async fn writes_of_several_clients_never_interleave() {
        let (input, got, _) = input(1);
        let input = Arc::new(input);
        let writers: Vec<_> = [b"aaaa", b"bbbb", b"cccc"]
            .into_iter()
            .map(|msg| {
                let input = Arc::clone(&input);
                tokio::spawn(async move { input.write(Bytes::from_static(msg), None).await })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap().unwrap();
        }
        let got = got.lock().unwrap().clone();
        assert_eq!(got.len(), 12);
        for chunk in got.chunks(4) {
            assert!(chunk.iter().all(|&b| b == chunk[0]), "{got:?}");
        }
    }
}
