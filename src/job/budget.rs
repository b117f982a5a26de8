//! The server-wide budget for job output held in memory, counted in bytes.
//!
//! Output is counted from the moment a backend reads it until the job's event log lets it go
//! (see `log`): no lossless reader still needs it, or has it in its transport (the last event
//! a reader took sits in the transport's buffers until the client's flow-control window lets
//! it out, so it stays counted until the reader asks for the next). Before reading, a backend asks for a
//! [`Credit`]: first from the job's own small reserve, which no other job can take, then from
//! the pool all jobs share. When neither has room, the backend waits without reading, so the
//! job's pipe fills and the process blocks: backpressure, never unbounded memory, never lost
//! bytes. Memory for output is therefore bounded by `shared + jobs x reserve`, however many
//! clients stop reading.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use super::log::{EventLog, RetiredLogs};

/// Smallest credit worth waiting for: smaller reads cost more than they save.
const MIN_GRANT: usize = 4096;

/// What a stopped job may read with no credit once the stopped-client grace has passed (see
/// [`JobBudget::acquire`]).
pub const OVERDRAFT_BYTES: usize = 64 * 1024;

/// The whole server's output budget.
#[derive(Debug, Clone)]
pub struct OutputBudget {
    shared: Arc<Semaphore>,
    shared_bytes: usize,
    reserve_bytes: usize,
    /// Finished jobs' logs, which give up their history when running jobs need credit.
    retired: Arc<RetiredLogs>,
}

impl OutputBudget {
    /// `shared_bytes` for all jobs together, plus `reserve_bytes` guaranteed to each job.
    pub fn new(shared_bytes: usize, reserve_bytes: usize) -> Self {
        OutputBudget {
            shared: Arc::new(Semaphore::new(shared_bytes)),
            shared_bytes,
            reserve_bytes: reserve_bytes.max(1),
            retired: Arc::new(RetiredLogs::new(usize::MAX)),
        }
    }

    /// The same budget, with finished jobs' logs holding at most `bytes` of it together.
    pub fn retaining_at_most(self, bytes: usize) -> Self {
        OutputBudget {
            retired: Arc::new(RetiredLogs::new(bytes)),
            ..self
        }
    }

    /// Where finished jobs' logs go (see [`RetiredLogs`]).
    pub fn retired(&self) -> &RetiredLogs {
        &self.retired
    }

    /// A new job's share: its own reserve and access to the shared pool. `stop` is the job's
    /// stop token and `grace` the stopped-client grace (see [`JobBudget::acquire`]); `log` is
    /// the job's log, whose history is given up when the job needs credit and none is free.
    pub fn for_job(
        &self,
        stop: CancellationToken,
        grace: Duration,
        log: Arc<EventLog>,
    ) -> JobBudget {
        JobBudget {
            log,
            retired: Arc::clone(&self.retired),
            shared: Arc::clone(&self.shared),
            reserve: Arc::new(Semaphore::new(self.reserve_bytes)),
            reserve_bytes: self.reserve_bytes,
            stop,
            grace,
            stop_seen: Arc::new(OnceLock::new()),
        }
    }

    /// Counts `bytes` in the shared pool (at most all of it), waiting until they are free: for
    /// output a watcher has in its transport, which no job's credit covers.
    pub async fn hold_shared(&self, bytes: usize) -> OwnedSemaphorePermit {
        let bytes = bytes.min(self.shared_bytes) as u32;
        if let Ok(permit) = Arc::clone(&self.shared).try_acquire_many_owned(bytes) {
            return permit;
        }
        let _wait = BudgetWait::start(Waiter::Watcher);
        Arc::clone(&self.shared)
            .acquire_many_owned(bytes)
            .await
            .expect("the output budget's semaphore is never closed")
    }

    /// Counts `bytes` in the shared pool if they are free now: for memory a job holds for its
    /// whole life (a terminal's screen), which must not wait for output to drain.
    pub fn try_hold_shared(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let bytes = u32::try_from(bytes).ok()?;
        Arc::clone(&self.shared).try_acquire_many_owned(bytes).ok()
    }

    /// Bytes of the shared pool in use now.
    pub fn shared_in_use(&self) -> usize {
        self.shared_bytes - self.shared.available_permits()
    }

    pub fn shared_bytes(&self) -> usize {
        self.shared_bytes
    }

    /// Output held by finished jobs' logs for late readers: in use, but given back to running
    /// jobs as soon as they need it.
    pub fn retained_bytes(&self) -> usize {
        self.retired.held_bytes()
    }
}

/// One job's access to the budget; cheap to clone (one per output pipe).
#[derive(Debug, Clone)]
pub struct JobBudget {
    log: Arc<EventLog>,
    retired: Arc<RetiredLogs>,
    shared: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    reserve_bytes: usize,
    stop: CancellationToken,
    grace: Duration,
    /// When a wait for credit first saw the job stopped: the grace runs from then, once, not
    /// again for every read.
    stop_seen: Arc<OnceLock<Instant>>,
}

impl JobBudget {
    /// Up to `want` bytes of credit, waiting until at least `min(want, 4 KiB, reserve)` is
    /// free. Takes the job's reserve first, then whatever the shared pool has, without waiting
    /// for more than that least amount.
    ///
    /// Once the job is stopped, the wait lasts at most the stopped-client grace: then an empty
    /// credit is returned and the caller reads up to [`Credit::allowance`] anyway. The caller
    /// that holds the credit up is the one not reading; the output then goes to the sinks and
    /// waits for that caller, which is dropped after the same grace, freeing what it held. A
    /// stopped job therefore ends in bounded time however its caller behaves, overdrawing by
    /// at most one read.
    pub async fn acquire(&self, want: usize) -> Credit {
        tokio::select! {
            biased;
            credit = self.acquire_within_budget(want) => credit,
            _ = self.stopped_past_grace() => Credit::default(),
        }
    }

    /// Completes once the job is stopped and the stopped-client grace has passed since that
    /// was first seen (by any wait of this job: the grace runs once).
    async fn stopped_past_grace(&self) {
        self.stop.cancelled().await;
        let since = *self.stop_seen.get_or_init(Instant::now);
        tokio::time::sleep_until(since + self.grace).await;
    }

    /// The job's stop token.
    pub(crate) fn stop(&self) -> &CancellationToken {
        &self.stop
    }

    /// How long a reader of a stopped job may take to make room for each event.
    pub(crate) fn grace(&self) -> Duration {
        self.grace
    }

    async fn acquire_within_budget(&self, want: usize) -> Credit {
        if want == 0 {
            return Credit::default();
        }
        // Never more than the reserve alone can give, so the wait below always ends.
        let least = want.min(MIN_GRANT).min(self.reserve_bytes);
        // One wait per call however often it wakes up; recorded when the call ends, or is
        // dropped (a stopped job past its grace).
        let mut wait = None;
        loop {
            // Registered before looking, so a reader moving on meanwhile is not missed.
            let progressed = self.log.progressed();
            tokio::pin!(progressed);
            progressed.as_mut().enable();
            let mut credit = self.try_acquire(want);
            // Running jobs come before finished jobs' history.
            if credit.bytes() < want && self.retired.reclaim(want - credit.bytes()) > 0 {
                credit.merge(self.try_acquire(want - credit.bytes()));
            }
            if credit.bytes() >= least {
                return credit;
            }
            drop(credit);
            // Before waiting, this job's own history (what no reader needs) gives way.
            if self.log.release_history(want) > 0 {
                continue;
            }
            wait.get_or_insert_with(|| BudgetWait::start(Waiter::Job));
            let mut credit = tokio::select! {
                permit = Arc::clone(&self.reserve).acquire_many_owned(least as u32) => {
                    Credit { reserve: permit.ok(), shared: None }
                }
                permit = Arc::clone(&self.shared).acquire_many_owned(least as u32) => {
                    Credit { reserve: None, shared: permit.ok() }
                }
                // A reader took events: this job's history may now be given up.
                _ = progressed => continue,
            };
            credit.merge(self.try_acquire(want - credit.bytes()));
            return credit;
        }
    }

    /// Whatever of `want` is free right now, possibly nothing.
    fn try_acquire(&self, want: usize) -> Credit {
        let mut credit = Credit::default();
        if want == 0 {
            return credit;
        }
        let own = self.reserve.available_permits().min(want);
        if own > 0 {
            credit.reserve = Arc::clone(&self.reserve)
                .try_acquire_many_owned(own as u32)
                .ok();
        }
        let rest = (want - credit.bytes()).min(self.shared.available_permits());
        if rest > 0 {
            credit.shared = Arc::clone(&self.shared)
                .try_acquire_many_owned(rest as u32)
                .ok();
        }
        credit
    }
}

/// Who waits for output budget: a job's read (its process blocks meanwhile), or a watcher's
/// next event (it falls behind).
#[derive(Debug, Clone, Copy)]
enum Waiter {
    Job,
    Watcher,
}

impl Waiter {
    fn as_str(self) -> &'static str {
        match self {
            Waiter::Job => "job",
            Waiter::Watcher => "watcher",
        }
    }
}

/// One wait for output budget: counted as it starts (a job blocked for good by a caller that
/// never reads still shows), and observed with its length as it ends.
struct BudgetWait {
    waiter: Waiter,
    since: Instant,
}

impl BudgetWait {
    fn start(waiter: Waiter) -> Self {
        metrics::counter!("sandbox_output_budget_waits_total", "waiter" => waiter.as_str())
            .increment(1);
        BudgetWait {
            waiter,
            since: Instant::now(),
        }
    }
}

impl Drop for BudgetWait {
    fn drop(&mut self) {
        metrics::histogram!("sandbox_output_budget_wait_seconds", "waiter" => self.waiter.as_str())
            .record(self.since.elapsed().as_secs_f64());
    }
}

/// Bytes of output a job may hold in memory; given back when dropped.
#[derive(Debug, Default)]
pub struct Credit {
    reserve: Option<OwnedSemaphorePermit>,
    shared: Option<OwnedSemaphorePermit>,
}

impl Credit {
    /// How much may be read with this credit: its bytes, or the overdraft of a stopped job
    /// whose credit did not come in time (an empty credit).
    pub fn allowance(&self) -> usize {
        match self.bytes() {
            0 => OVERDRAFT_BYTES,
            bytes => bytes,
        }
    }

    pub fn bytes(&self) -> usize {
        self.reserve.as_ref().map_or(0, |p| p.num_permits())
            + self.shared.as_ref().map_or(0, |p| p.num_permits())
    }

    /// Gives back all but `bytes` (the shared pool's first, as it is what others wait for).
    pub fn shrink_to(&mut self, bytes: usize) {
        let mut excess = self.bytes().saturating_sub(bytes);
        for slot in [&mut self.shared, &mut self.reserve] {
            let Some(permit) = slot else { continue };
            let give = excess.min(permit.num_permits());
            if give == permit.num_permits() {
                *slot = None;
            } else if give > 0 {
                drop(permit.split(give));
            }
            excess -= give;
        }
    }

    fn merge(&mut self, other: Credit) {
        for (into, from) in [
            (&mut self.reserve, other.reserve),
            (&mut self.shared, other.shared),
        ] {
            match (into.as_mut(), from) {
                (Some(permit), Some(more)) => permit.merge(more),
                (None, Some(more)) => *into = Some(more),
                (_, None) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::job::log::LogLimits;

    fn log() -> Arc<EventLog> {
        EventLog::new(LogLimits {
            max_bytes: 1 << 20,
            max_events: 1024,
        })
    }

    fn for_job(budget: &OutputBudget, stop: CancellationToken) -> JobBudget {
        budget.for_job(stop, Duration::from_secs(5), log())
    }

    #[tokio::test]
    async fn the_reserve_comes_first_then_the_shared_pool() {
        let budget = OutputBudget::new(100_000, 10_000);
        let job = for_job(&budget, CancellationToken::new());
        let credit = job.acquire(30_000).await;
        assert_eq!(credit.bytes(), 30_000);
        assert_eq!(credit.reserve.as_ref().unwrap().num_permits(), 10_000);
        assert_eq!(budget.shared_in_use(), 20_000);
        drop(credit);
        assert_eq!(budget.shared_in_use(), 0);
    }

    #[tokio::test]
    async fn a_job_gets_what_is_free_without_waiting_for_all_it_asked() {
        let budget = OutputBudget::new(50_000, 10_000);
        let hog = for_job(&budget, CancellationToken::new());
        let _held = hog.acquire(60_000).await;
        assert_eq!(
            budget.shared_in_use(),
            50_000,
            "the hog took the whole pool"
        );
        // Another job still gets its own reserve at once.
        let other = for_job(&budget, CancellationToken::new());
        let credit = tokio::time::timeout(Duration::from_secs(5), other.acquire(1 << 20))
            .await
            .expect("the reserve is guaranteed");
        assert_eq!(credit.bytes(), 10_000);
    }

    #[tokio::test(start_paused = true)]
    async fn with_nothing_free_a_job_waits_until_output_is_taken() {
        let budget = OutputBudget::new(0, 8192);
        let job = for_job(&budget, CancellationToken::new());
        let first = job.acquire(8192).await;
        assert_eq!(first.bytes(), 8192);
        let waiting = tokio::spawn({
            let job = job.clone();
            async move { job.acquire(8192).await.bytes() }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!waiting.is_finished(), "no credit while the first is held");
        drop(first);
        assert_eq!(waiting.await.unwrap(), 8192);
    }

    #[tokio::test]
    async fn small_requests_are_granted_in_full_and_large_ones_at_least_4_kib() {
        let budget = OutputBudget::new(0, 6000);
        let job = for_job(&budget, CancellationToken::new());
        let small = job.acquire(100).await;
        assert_eq!(small.bytes(), 100);
        let large = job.acquire(1 << 20).await;
        assert_eq!(large.bytes(), 5900, "all that is left, being over 4 KiB");
    }

    #[tokio::test]
    async fn shrinking_gives_back_the_shared_pool_first() {
        let budget = OutputBudget::new(100_000, 10_000);
        let job = for_job(&budget, CancellationToken::new());
        let mut credit = job.acquire(50_000).await;
        credit.shrink_to(12_000);
        assert_eq!(credit.bytes(), 12_000);
        assert_eq!(budget.shared_in_use(), 2_000);
        credit.shrink_to(3_000);
        assert_eq!(credit.bytes(), 3_000);
        assert_eq!(budget.shared_in_use(), 0);
        assert_eq!(job.reserve.available_permits(), 7_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopped_job_waits_for_credit_only_for_the_grace() {
        let budget = OutputBudget::new(0, 8192);
        let stop = CancellationToken::new();
        let job = budget.for_job(stop.clone(), Duration::from_secs(2), log());
        let _held = job.acquire(8192).await;
        let waiting = tokio::spawn({
            let job = job.clone();
            async move {
                let credit = job.acquire(8192).await;
                (credit.bytes(), credit.allowance())
            }
        });
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            !waiting.is_finished(),
            "a running job waits as long as it takes"
        );
        stop.cancel();
        tokio::time::sleep(Duration::from_millis(1999)).await;
        assert!(
            !waiting.is_finished(),
            "a stopped job still waits for the grace"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(waiting.await.unwrap(), (0, OVERDRAFT_BYTES));
        // The grace was spent: later reads without credit do not wait for it again.
        let credit = tokio::time::timeout(Duration::from_millis(1), job.acquire(8192))
            .await
            .expect("no second grace");
        assert_eq!(credit.allowance(), OVERDRAFT_BYTES);
    }
}
