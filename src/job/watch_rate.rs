//! The bandwidth all watchers share (readers with `Pace::Watch`).
//!
//! A watcher never holds a job back in its log, but sending it output still costs the CPU and
//! the network the job and its lossless readers need: 100 watchers of one job writing flat out
//! took 97% of a 2-core machine, and the job ran at 0.03x of its speed with one reader. So
//! all watchers together are served at most a set number of bytes per second, in the order
//! they asked (a token bucket behind a fair lock). A watcher paid for what it took before it
//! takes more, so a client that stops reading pays nothing and blocks no other watcher; one
//! that falls a log behind gets a gap, as any watcher does.
//!
//! Hand-written rather than `governor`: its async waiters sleep independently and retry, so a
//! watcher asking for a 1 MiB chunk can be overtaken forever by ones asking for 100 bytes.

use std::time::Duration;

use tokio::{sync::Mutex, time::Instant};

/// Bytes per second for all watchers together.
#[derive(Debug)]
pub struct WatchRate {
    bytes_per_sec: f64,
    /// What an idle period lets watchers take at once: at least one output chunk, so that
    /// every chunk can be paid for.
    burst: f64,
    /// Tokio's mutex queues its waiters in order: the first to ask is the first served.
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl WatchRate {
    /// All watchers together at most `bytes_per_sec`, with bursts of `burst` bytes.
    pub fn new(bytes_per_sec: u64, burst: usize) -> Self {
        let burst = burst.max(1) as f64;
        WatchRate {
            bytes_per_sec: bytes_per_sec.max(1) as f64,
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                refilled: Instant::now(),
            }),
        }
    }

    /// Waits until `bytes` may be sent (or were, and are paid for now). Cancel-safe: a
    /// cancelled wait takes nothing.
    pub async fn pay(&self, bytes: usize) {
        let bytes = (bytes as f64).min(self.burst);
        let mut bucket = self.bucket.lock().await;
        self.refill(&mut bucket);
        if bucket.tokens < bytes {
            let short = (bytes - bucket.tokens) / self.bytes_per_sec;
            tokio::time::sleep(Duration::from_secs_f64(short)).await;
            self.refill(&mut bucket);
        }
        // A rounding error's worth short at most: the next payer makes up for it.
        bucket.tokens -= bytes;
    }

    fn refill(&self, bucket: &mut Bucket) {
        let now = Instant::now();
        let earned = now.duration_since(bucket.refilled).as_secs_f64() * self.bytes_per_sec;
        bucket.tokens = (bucket.tokens + earned).min(self.burst);
        bucket.refilled = now;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn watchers_together_get_the_rate_after_one_burst() {
        let rate = Arc::new(WatchRate::new(1_000_000, 100_000));
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..10 {
            let rate = Arc::clone(&rate);
            tasks.spawn(async move {
                for _ in 0..100 {
                    rate.pay(10_000).await;
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        // 10 MB at 1 MB/s, of which the first 100 KB were the burst.
        let took = start.elapsed().as_secs_f64();
        assert!((9.85..=9.95).contains(&took), "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_to_ask_is_served_first_however_large() {
        let rate = Arc::new(WatchRate::new(1_000, 1_000));
        rate.pay(1_000).await;
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let large = {
            let (rate, order) = (Arc::clone(&rate), Arc::clone(&order));
            tokio::spawn(async move {
                rate.pay(1_000).await;
                order.lock().unwrap().push("large");
            })
        };
        tokio::task::yield_now().await;
        let small = {
            let (rate, order) = (Arc::clone(&rate), Arc::clone(&order));
            tokio::spawn(async move {
                rate.pay(1).await;
                order.lock().unwrap().push("small");
            })
        };
        large.await.unwrap();
        small.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["large", "small"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_wait_takes_nothing_and_a_chunk_over_the_burst_still_passes() {
        let rate = WatchRate::new(1_000, 500);
        rate.pay(500).await;
        // Cancelled halfway through its wait: the tokens it waited for stay in the bucket.
        let cancelled = tokio::time::timeout(Duration::from_millis(250), rate.pay(500)).await;
        assert!(cancelled.is_err());
        let start = Instant::now();
        // Larger than the burst: charged the burst, not refused.
        rate.pay(10_000).await;
        let took = start.elapsed().as_secs_f64();
        assert!((0.24..=0.26).contains(&took), "{took}");
    }
}
