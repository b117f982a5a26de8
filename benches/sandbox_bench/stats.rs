//! Statistics: samples summarised as medians and percentiles with their spread, as table rows;
//! units.

use std::time::Duration;

pub(crate) struct Samples {
    pub(crate) name: String,
    pub(crate) values: Vec<f64>,
}

impl Samples {
    pub(crate) fn new(name: impl Into<String>) -> Self {
        Samples {
            name: name.into(),
            values: Vec::new(),
        }
    }

    pub(crate) fn push(&mut self, v: f64) {
        self.values.push(v);
    }

    pub(crate) fn sorted(&self) -> Vec<f64> {
        let mut s = self.values.clone();
        s.sort_by(f64::total_cmp);
        s
    }

    pub(crate) fn pct(&self, p: f64) -> f64 {
        let s = self.sorted();
        if s.is_empty() {
            return f64::NAN;
        }
        s[((p / 100.0) * (s.len() - 1) as f64).round() as usize]
    }

    pub(crate) fn median(&self) -> f64 {
        self.pct(50.0)
    }

    /// A throughput row: median, min..max, ratio of medians.
    pub(crate) fn rate_row(&self, baseline: Option<&Samples>, second: Option<&Samples>) {
        self.rate_row_in("GB/s", 2, baseline, second);
    }

    /// A rate row in `unit` with `decimals`: median, min..max, ratio of medians.
    pub(crate) fn rate_row_in(
        &self,
        unit: &str,
        decimals: usize,
        baseline: Option<&Samples>,
        second: Option<&Samples>,
    ) {
        let s = self.sorted();
        let ratio = |b: Option<&Samples>, none: &str| {
            b.map_or(none.to_owned(), |b| {
                format!("{:.2}x", self.median() / b.median())
            })
        };
        println!(
            "| {} | {:.d$} {unit} | {:.d$}..{:.d$} | {} | {} |",
            self.name,
            self.median(),
            s.first().unwrap_or(&f64::NAN),
            s.last().unwrap_or(&f64::NAN),
            ratio(baseline, "baseline"),
            ratio(second, ""),
            d = decimals
        );
    }

    /// A latency row in ms: p50, p99, min..max, ratio of p50s.
    pub(crate) fn latency_row(&self, baseline: Option<&Samples>) {
        let s = self.sorted();
        let ratio = baseline.map_or("baseline".into(), |b| {
            format!("{:.2}x", self.median() / b.median())
        });
        println!(
            "| {} | {:.2} | {:.2} | {:.2}..{:.2} | {} |",
            self.name,
            self.median(),
            self.pct(99.0),
            s.first().unwrap_or(&f64::NAN),
            s.last().unwrap_or(&f64::NAN),
            ratio
        );
    }
}

pub(crate) fn gbps(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e9
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
