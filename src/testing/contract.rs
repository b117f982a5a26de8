//! The event-stream contract of `Exec`, checked on every event of a job as it is read: `seq`
//! starts at 0 and has no gaps, `Started` comes first and once, `Exited` last and once, every
//! event carries the job id and a time, output chunks are non-empty with contiguous offsets per
//! stream, and `Exited`'s byte totals match what arrived. Tests read every job through it,
//! keeping the output; the benchmark too, counting it only.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tonic::{Streaming, transport::Channel};

use crate::proto::{
    self as pb, JobState, OutputStream, exec_event::Kind,
    sandbox_service_client::SandboxServiceClient,
};

/// An Attach stream's `open` request: follow `job_id` from `from` (`None`: the start), holding
/// the job back (`lossless`) or as a watcher.
pub fn attach_open(
    job_id: &str,
    from: Option<pb::resume_from::Position>,
    on_gap: pb::GapPolicy,
    lossless: bool,
) -> pb::AttachRequest {
    pb::AttachRequest {
        kind: Some(pb::attach_request::Kind::Open(pb::AttachOpen {
            job_id: job_id.into(),
            from: from.map(|position| pb::ResumeFrom {
                position: Some(position),
            }),
            on_gap: on_gap as i32,
            lossless,
            ..Default::default()
        })),
    }
}

/// What a [`Job`] keeps of the output it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Every byte: per stream, and as chunks in arrival order.
    Keep,
    /// Only the byte counts, for bulk runs.
    Count,
}

/// Everything a finished job sent, checked against the contract.
#[derive(Debug)]
pub struct Run {
    pub job_id: String,
    pub pid: u32,
    /// Empty unless the output was kept.
    pub stdout: Vec<u8>,
    /// Empty unless the output was kept.
    pub stderr: Vec<u8>,
    /// (stream, data) in arrival order; empty unless the output was kept.
    pub chunks: Vec<(OutputStream, Vec<u8>)>,
    /// Which of those came as `text` (the rest as `data`).
    pub text_chunks: Vec<bool>,
    pub exited: pb::Exited,
    /// From the request (or from reading a stream handed over) to the first `Output`.
    pub first_output: Option<Duration>,
    /// From the request (or from reading a stream handed over) to `Exited`.
    pub exited_after: Duration,
    /// Gaps the stream reported (none for a reader that kept up).
    pub gaps: Vec<pb::Gap>,
    /// Screens of a `tty` job the stream sent in place of output.
    pub snapshots: Vec<pb::Snapshot>,
}

impl Run {
    pub fn state(&self) -> JobState {
        JobState::try_from(self.exited.state).unwrap()
    }

    /// Bytes of output on both streams.
    pub fn bytes(&self) -> u64 {
        self.exited.stdout_bytes + self.exited.stderr_bytes
    }
}

async fn first_event(stream: &mut Streaming<pb::ExecEvent>) -> anyhow::Result<pb::ExecEvent> {
    stream
        .message()
        .await
        .context("the event stream failed")?
        .context("the stream ended before its first event")
}

/// A job being read, its `Started` event already checked.
pub struct Job {
    stream: Streaming<pb::ExecEvent>,
    pub job_id: String,
    pub pid: u32,
    output: Output,
    t0: Instant,
    next_seq: u64,
    /// Bytes received on stdout and stderr: the offset each expects next.
    received: [u64; 2],
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    chunks: Vec<(OutputStream, Vec<u8>)>,
    text_chunks: Vec<bool>,
    first_output: Option<Duration>,
    exited: Option<(pb::Exited, Duration)>,
    gaps: Vec<pb::Gap>,
    snapshots: Vec<pb::Snapshot>,
}

impl Job {
    /// Starts a job and reads its `Started` event.
    pub async fn start(
        client: &mut SandboxServiceClient<Channel>,
        req: pb::ExecRequest,
        output: Output,
    ) -> anyhow::Result<Job> {
        let t0 = Instant::now();
        let stream = client.exec(req).await.context("Exec refused")?.into_inner();
        Job::read_started(stream, output, t0).await
    }

    /// Reads the `Started` event of an Exec stream the caller opened.
    pub async fn from_stream(
        stream: Streaming<pb::ExecEvent>,
        output: Output,
    ) -> anyhow::Result<Job> {
        Job::read_started(stream, output, Instant::now()).await
    }

    async fn read_started(
        mut stream: Streaming<pb::ExecEvent>,
        output: Output,
        t0: Instant,
    ) -> anyhow::Result<Job> {
        let event = first_event(&mut stream).await?;
        ensure!(event.seq == 0, "first seq is {}, not 0", event.seq);
        let pid = match event.kind {
            Some(Kind::Started(s)) => s.pid,
            other => bail!("first event is not Started: {other:?}"),
        };
        let mut job = Job::reading(stream, event.job_id, output, t0, 1, [0; 2]);
        job.pid = pid;
        Ok(job)
    }

    /// A reader at `next_seq`, with `received` bytes of each stream had, nothing read yet.
    fn reading(
        stream: Streaming<pb::ExecEvent>,
        job_id: String,
        output: Output,
        t0: Instant,
        next_seq: u64,
        received: [u64; 2],
    ) -> Job {
        Job {
            stream,
            job_id,
            pid: 0,
            output,
            t0,
            next_seq,
            received,
            stdout: Vec::new(),
            stderr: Vec::new(),
            chunks: Vec::new(),
            text_chunks: Vec::new(),
            first_output: None,
            exited: None,
            gaps: Vec::new(),
            snapshots: Vec::new(),
        }
    }

    /// Follows an Attach stream that starts after seq `after` (`None`: wherever its first event
    /// says, as when resuming by offsets) with `received` bytes of stdout and stderr already
    /// had. `pid` is 0: `Started` is not read (use [`Job::from_stream`] from the start).
    pub async fn resume(
        mut stream: Streaming<pb::ExecEvent>,
        output: Output,
        after: Option<u64>,
        received: [u64; 2],
    ) -> anyhow::Result<Job> {
        // The job id comes with the first event.
        let first = first_event(&mut stream).await?;
        let next_seq = match (after, &first.kind) {
            (Some(after), _) => after + 1,
            // A gap or a keepalive names the seq before the next event.
            (None, Some(Kind::Gap(_) | Kind::Keepalive(_))) => first.seq + 1,
            (None, _) => first.seq,
        };
        let job_id = first.job_id.clone();
        let mut job = Job::reading(stream, job_id, output, Instant::now(), next_seq, received);
        match (&first.kind, after) {
            // From the start after all: a watcher that found the start still held.
            (Some(Kind::Started(started)), None) => {
                ensure!(first.seq == 0, "Started with seq {}", first.seq);
                job.pid = started.pid;
                job.next_seq = 1;
            }
            _ => job.check(first)?,
        }
        Ok(job)
    }

    /// Gaps met so far.
    pub fn gaps(&self) -> &[pb::Gap] {
        &self.gaps
    }

    /// Screen snapshots met so far.
    pub fn snapshots(&self) -> &[pb::Snapshot] {
        &self.snapshots
    }

    /// The seq of the last event read (a gap counts as its last lost seq).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Bytes of stdout and stderr received (or accounted for by gaps).
    pub fn received(&self) -> [u64; 2] {
        self.received
    }

    /// Whether `Exited` was read.
    pub fn has_exited(&self) -> bool {
        self.exited.is_some()
    }

    /// The output kept so far (stdout, stderr).
    pub fn kept(&self) -> (&[u8], &[u8]) {
        (&self.stdout, &self.stderr)
    }

    /// Reads one event; false at the end of the stream.
    pub async fn step(&mut self) -> anyhow::Result<bool> {
        let Some(event) = self
            .stream
            .message()
            .await
            .context("the event stream failed")?
        else {
            return Ok(false);
        };
        self.check(event)?;
        Ok(true)
    }

    fn check(&mut self, event: pb::ExecEvent) -> anyhow::Result<()> {
        ensure!(self.exited.is_none(), "event after Exited: {event:?}");
        if let Some(Kind::Keepalive(_)) = event.kind {
            // Not a log event: it repeats the last seq sent.
            ensure!(
                event.seq + 1 == self.next_seq,
                "keepalive with seq {} after seq {}",
                event.seq,
                self.next_seq - 1
            );
            return Ok(());
        }
        if let Some(Kind::Gap(gap)) = &event.kind {
            // Never silent: it says where the stream goes on, and what was lost.
            ensure!(
                gap.resumed_seq >= self.next_seq && event.seq + 1 == gap.resumed_seq,
                "gap to seq {} (event seq {}) where {} was due",
                gap.resumed_seq,
                event.seq,
                self.next_seq
            );
            ensure!(
                gap.resumed_stdout_offset == self.received[0] + gap.lost_stdout_bytes
                    && gap.resumed_stderr_offset == self.received[1] + gap.lost_stderr_bytes,
                "gap offsets do not add up after {:?} bytes: {gap:?}",
                self.received
            );
            self.next_seq = gap.resumed_seq;
            self.received = [gap.resumed_stdout_offset, gap.resumed_stderr_offset];
            self.gaps.push(*gap);
            return Ok(());
        }
        if let Some(Kind::Snapshot(snapshot)) = event.kind {
            // Not a log event: the screen after its seq, which the stream goes on from; it
            // stands for the output up to its offset, never for output sent already.
            ensure!(
                event.seq + 1 >= self.next_seq && snapshot.stdout_offset >= self.received[0],
                "snapshot at seq {} (stdout offset {}) after seq {} and {} stdout bytes",
                event.seq,
                snapshot.stdout_offset,
                self.next_seq - 1,
                self.received[0]
            );
            self.next_seq = event.seq + 1;
            self.received[0] = snapshot.stdout_offset;
            self.snapshots.push(snapshot);
            return Ok(());
        }
        ensure!(
            event.seq == self.next_seq,
            "seq gap: {} where {} was due",
            event.seq,
            self.next_seq
        );
        ensure!(
            event.job_id == self.job_id,
            "job id {:?} in the stream of {:?}",
            event.job_id,
            self.job_id
        );
        ensure!(event.time.is_some(), "event without a time: {event:?}");
        self.next_seq += 1;
        match event.kind.context("event without a kind")? {
            Kind::Started(_) => bail!("second Started"),
            Kind::Output(out) => {
                self.first_output.get_or_insert_with(|| self.t0.elapsed());
                let stream = OutputStream::try_from(out.stream).context("unknown stream")?;
                let (received, kept) = match stream {
                    OutputStream::Stdout => (&mut self.received[0], &mut self.stdout),
                    OutputStream::Stderr => (&mut self.received[1], &mut self.stderr),
                    OutputStream::Unspecified => bail!("unspecified stream"),
                };
                ensure!(
                    out.offset == *received,
                    "offset mismatch on {stream:?}: {} after {} bytes",
                    out.offset,
                    *received
                );
                // Text (where the stream asked for it) is the same bytes.
                let as_text = !out.text.is_empty();
                let data = match (out.data.is_empty(), out.text.is_empty()) {
                    (false, true) => out.data,
                    (true, false) => bytes::Bytes::from(out.text.into_bytes()),
                    (true, true) => bail!("empty output chunk"),
                    (false, false) => bail!("output with both data and text"),
                };
                *received += data.len() as u64;
                if self.output == Output::Keep {
                    kept.extend_from_slice(&data);
                    self.chunks.push((stream, data.to_vec()));
                    self.text_chunks.push(as_text);
                }
            }
            Kind::Exited(e) => self.exited = Some((e, self.t0.elapsed())),
            Kind::Gap(_) | Kind::Keepalive(_) | Kind::Snapshot(_) => {
                unreachable!("handled above")
            }
        }
        Ok(())
    }

    /// Reads until at least `n` bytes of stdout arrived.
    pub async fn read_stdout(&mut self, n: usize) -> anyhow::Result<()> {
        while self.received[0] < n as u64 {
            ensure!(self.step().await?, "stream ended before {n} stdout bytes");
        }
        Ok(())
    }

    /// Drops the stream, as a client that goes away does.
    pub fn disconnect(self) -> (String, u32) {
        (self.job_id, self.pid)
    }

    /// Reads to the end.
    pub async fn finish(mut self) -> anyhow::Result<Run> {
        while self.step().await? {}
        let (exited, exited_after) = self.exited.context("stream ended without Exited")?;
        let [stdout_bytes, stderr_bytes] = self.received;
        ensure!(
            exited.stdout_bytes == stdout_bytes,
            "Exited says {} stdout bytes, {stdout_bytes} arrived",
            exited.stdout_bytes
        );
        ensure!(
            exited.stderr_bytes == stderr_bytes,
            "Exited says {} stderr bytes, {stderr_bytes} arrived",
            exited.stderr_bytes
        );
        Ok(Run {
            job_id: self.job_id,
            pid: self.pid,
            stdout: self.stdout,
            stderr: self.stderr,
            chunks: self.chunks,
            text_chunks: self.text_chunks,
            exited,
            first_output: self.first_output,
            exited_after,
            gaps: self.gaps,
            snapshots: self.snapshots,
        })
    }
}
