//! Reading `/metrics`: scrapes of a server's metrics port, sums of the samples of one metric with
//! given labels, the names and types a scrape declares, and bounded polls for a condition.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

/// A port free on loopback now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One scrape of `/metrics`.
#[derive(Debug, Clone)]
pub struct Scrape(pub String);

impl Scrape {
    /// Scrapes `127.0.0.1:port/metrics`, checking the status and the content type.
    pub async fn get(port: u16) -> Scrape {
        // reqwest is built without a TLS provider of its own.
        sandbox_runner::tls::install_crypto_provider();
        let url = format!("http://127.0.0.1:{port}/metrics");
        // The server binds its metrics port as it starts, after the test's first calls may go.
        let mut tries = 0;
        let response = loop {
            match reqwest::get(&url).await {
                Ok(response) => break response,
                Err(e) if e.is_connect() && tries < 500 => tries += 1,
                Err(e) => panic!("the metrics port does not answer: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        Scrape(response.text().await.unwrap())
    }

    /// The sample lines (not comments) of `name` that have every one of `labels`
    /// (`key="value"`).
    pub fn lines(&self, name: &str, labels: &[&str]) -> Vec<&str> {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .filter(|l| labels.iter().all(|label| l.contains(label)))
            .collect()
    }

    /// The sum of those samples' values (0 when there are none).
    pub fn sum(&self, name: &str, labels: &[&str]) -> f64 {
        self.lines(name, labels).iter().map(|l| value(l)).sum()
    }

    /// The value of the one sample of `name` with `labels`; fails when there is not exactly one.
    pub fn one(&self, name: &str, labels: &[&str]) -> f64 {
        let lines = self.lines(name, labels);
        assert_eq!(lines.len(), 1, "{name} {labels:?}: {lines:?}");
        value(lines[0])
    }

    /// The names of the samples (a histogram's `_bucket`, `_sum` and `_count`).
    pub fn sample_names(&self) -> HashSet<&str> {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split(['{', ' ']).next().unwrap())
            .collect()
    }

    /// The type each metric is declared with (`# TYPE name kind`).
    pub fn types(&self) -> HashMap<&str, &str> {
        self.0
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .collect()
    }
}

fn value(line: &str) -> f64 {
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// Scrapes until `done` holds (bounded: a bug cannot hang the test, and the bound is no
/// assertion on time); returns that scrape.
pub async fn wait_for(port: u16, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    for _ in 0..1500 {
        let scrape = Scrape::get(port).await;
        if done(&scrape) {
            return scrape;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "{what}: not seen in /metrics:\n{}",
        Scrape::get(port).await.0
    );
}
