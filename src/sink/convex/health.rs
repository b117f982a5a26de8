//! Whether the ingest currently takes records, for Health: judged from every delivery attempt
//! over all jobs, transient failures included, so an ingest that is down shows as down while its
//! records are still being retried (not only once one is given up, up to a minute later).
//!
//! Pure logic, no I/O.

use std::time::{Duration, Instant};

use crate::job::SinkHealth;

/// Failed attempts in a row (over all jobs, no success between them) that make the sink
/// unhealthy. One failure is routine (a 502 during a deploy); five in a row is an outage: with
/// the retry backoff, about 2 s of a closed port.
pub(crate) const FAILED_ATTEMPTS: u64 = 5;

/// How long attempts may keep failing, with no success between them, before the sink is
/// unhealthy however few they were: a hanging ingest fails one attempt per request timeout.
pub(crate) const FAILING_FOR: Duration = Duration::from_secs(10);

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// A connect error, a timeout, 429 or 5xx: the record will be sent again.
    Transient,
    /// Still failing when the record's retry time ran out: unhealthy at once.
    GaveUp,
    /// The record was refused (400, 401, ...): unhealthy at once.
    Refused,
}

impl Failure {
    /// The ingest could not be reached or did not answer in time (as opposed to answering no).
    pub(crate) fn is_unreachable(self) -> bool {
        matches!(self, Failure::Transient | Failure::GaveUp)
    }
}

/// The outcome of recent delivery attempts.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// Attempts that failed since the last success.
    failed: u64,
    /// When the first of them failed.
    failing_since: Option<Instant>,
    /// Why the sink is unhealthy; `None` while it is healthy.
    error: Option<String>,
}

/// A change of health, for the log.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Change {
    None,
    TurnedHealthy,
    TurnedUnhealthy,
}

impl Health {
    /// An attempt delivered its record: healthy again.
    pub(crate) fn succeeded(&mut self) -> Change {
        self.failed = 0;
        self.failing_since = None;
        match self.error.take() {
            Some(_) => Change::TurnedHealthy,
            None => Change::None,
        }
    }

    /// An attempt failed at `now` for `reason`.
    pub(crate) fn failed(&mut self, now: Instant, reason: &str, failure: Failure) -> Change {
        self.failed += 1;
        let since = *self.failing_since.get_or_insert(now);
        let failing_for = now.saturating_duration_since(since);
        let was_healthy = self.error.is_none();
        if !was_healthy
            || failure != Failure::Transient
            || self.failed >= FAILED_ATTEMPTS
            || failing_for >= FAILING_FOR
        {
            self.error = Some(if self.failed == 1 {
                reason.to_owned()
            } else {
                format!(
                    "the last {} delivery attempts failed (over {}); the latest: {reason}",
                    self.failed,
                    humantime::format_duration(Duration::from_secs(failing_for.as_secs()))
                )
            });
        }
        if was_healthy && self.error.is_some() {
            Change::TurnedUnhealthy
        } else {
            Change::None
        }
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.error.is_none()
    }

    pub(crate) fn report(&self) -> SinkHealth {
        SinkHealth {
            healthy: self.is_healthy(),
            error: self.error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_transient_failures_turns_it_unhealthy_and_one_success_back() {
        let t0 = Instant::now();
        let mut h = Health::default();
        for i in 1..FAILED_ATTEMPTS {
            let now = t0 + Duration::from_millis(100 * i);
            assert_eq!(
                h.failed(now, "connection refused", Failure::Transient),
                Change::None
            );
            assert!(h.is_healthy());
        }
        assert_eq!(
            h.failed(
                t0 + Duration::from_secs(2),
                "connection refused",
                Failure::Transient
            ),
            Change::TurnedUnhealthy
        );
        let report = h.report();
        assert!(!report.healthy);
        let error = report.error.unwrap();
        assert!(
            error.contains("last 5 delivery attempts failed") && error.ends_with("refused"),
            "{error}"
        );
        // Still failing: no new change, the latest reason shown.
        assert_eq!(
            h.failed(t0 + Duration::from_secs(3), "HTTP 502", Failure::Transient),
            Change::None
        );
        assert!(h.report().error.unwrap().ends_with("HTTP 502"));
        assert_eq!(h.succeeded(), Change::TurnedHealthy);
        assert_eq!(h.report(), SinkHealth::default());
        assert_eq!(h.succeeded(), Change::None);
    }

    #[test]
    fn a_success_between_failures_keeps_it_healthy() {
        let t0 = Instant::now();
        let mut h = Health::default();
        for i in 0..20 {
            let now = t0 + Duration::from_secs(i);
            h.failed(now, "HTTP 429", Failure::Transient);
            h.failed(now, "HTTP 429", Failure::Transient);
            h.succeeded();
        }
        assert!(h.is_healthy());
    }

    #[test]
    fn few_failures_over_a_long_time_turn_it_unhealthy() {
        // A hanging ingest: one attempt fails per request timeout.
        let t0 = Instant::now();
        let mut h = Health::default();
        assert_eq!(h.failed(t0, "timed out", Failure::Transient), Change::None);
        assert_eq!(
            h.failed(t0 + FAILING_FOR, "timed out", Failure::Transient),
            Change::TurnedUnhealthy
        );
    }

    #[test]
    fn a_refused_or_given_up_record_turns_it_unhealthy_at_once() {
        let mut h = Health::default();
        assert_eq!(
            h.failed(Instant::now(), "HTTP 401 Unauthorized", Failure::Refused),
            Change::TurnedUnhealthy
        );
        // The reason as it is: the first failure needs no summary.
        assert_eq!(h.report().error.as_deref(), Some("HTTP 401 Unauthorized"));
        let mut h = Health::default();
        assert_eq!(
            h.failed(Instant::now(), "still failing after 1m", Failure::GaveUp),
            Change::TurnedUnhealthy
        );
    }
}
