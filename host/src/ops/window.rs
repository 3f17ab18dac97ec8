//! Rolling per-second statistics of one function over the last [`WINDOW_SECS`]: what
//! alerts are judged on and what the status page charts.
//!
//! Each second is a slot with its request, error and rejection counts and a latency
//! histogram; a window merges the slots it covers. Slots are reused as time goes
//! round, so memory is fixed (about 66 KiB per function). Quantiles are the upper
//! bounds of power-of-two buckets (50 µs doubling): a p99 of 205 ms reads 409.6 ms.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Seconds kept.
pub const WINDOW_SECS: usize = 600;

/// Upper bounds of the latency buckets, in microseconds: 50 µs doubling to ~105 s,
/// then the overflow bucket.
const BOUNDS_US: [u64; 22] = {
    let mut bounds = [0; 22];
    let mut i = 0;
    while i < bounds.len() {
        bounds[i] = 50 << i;
        i += 1;
    }
    bounds
};

const BUCKETS: usize = BOUNDS_US.len() + 1;

#[derive(Clone, Copy, Default)]
struct Slot {
    /// The second this slot holds (since the window's start); slots of older seconds
    /// are stale.
    second: u64,
    requests: u32,
    errors: u32,
    rejected: u32,
    latency: [u32; BUCKETS],
}

/// One function's last seconds.
pub struct Window {
    start: Instant,
    slots: Mutex<Box<[Slot; WINDOW_SECS]>>,
}

impl Default for Window {
    fn default() -> Self {
        Self::new()
    }
}

/// A window's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Requests answered.
    pub requests: u64,
    /// 5xx answers (rejections included).
    pub errors: u64,
    /// Requests turned away at capacity.
    pub rejected: u64,
    /// Median latency (an upper bound from the buckets), in seconds.
    pub p50: Option<f64>,
    /// 99th percentile latency, likewise.
    pub p99: Option<f64>,
}

impl Summary {
    /// errors / requests (0 without requests).
    pub fn error_rate(&self) -> f64 {
        ratio(self.errors, self.requests)
    }

    /// rejected / requests (0 without requests).
    pub fn rejected_rate(&self) -> f64 {
        ratio(self.rejected, self.requests)
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// One point of [`Window::series`].
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Unix seconds at the point's end.
    pub t: u64,
    /// Requests per second over the point.
    pub rps: f64,
    /// Errors per second.
    pub eps: f64,
    /// p50 in milliseconds.
    pub p50_ms: Option<f64>,
    /// p99 in milliseconds.
    pub p99_ms: Option<f64>,
}

impl Window {
    /// An empty window starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            slots: Mutex::new(Box::new([Slot::default(); WINDOW_SECS])),
        }
    }

    fn now_second(&self) -> u64 {
        self.start.elapsed().as_secs() + 1
    }

    /// Records one answer.
    pub fn record(&self, status: u16, rejected: bool, latency: Duration) {
        self.record_at(self.now_second(), status, rejected, latency);
    }

    fn record_at(&self, second: u64, status: u16, rejected: bool, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_US
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(BUCKETS - 1);
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let slot = &mut slots[(second as usize) % WINDOW_SECS];
        if slot.second != second {
            *slot = Slot {
                second,
                ..Slot::default()
            };
        }
        slot.requests = slot.requests.saturating_add(1);
        if status >= 500 {
            slot.errors = slot.errors.saturating_add(1);
        }
        if rejected {
            slot.rejected = slot.rejected.saturating_add(1);
        }
        slot.latency[bucket] = slot.latency[bucket].saturating_add(1);
    }

    /// The last `over` (whole seconds, the current one included), at most [`WINDOW_SECS`].
    pub fn summary(&self, over: Duration) -> Summary {
        let now = self.now_second();
        let seconds = (over.as_secs().max(1) as usize).min(WINDOW_SECS) as u64;
        self.merge(now.saturating_sub(seconds - 1), now)
    }

    fn merge(&self, from: u64, to: u64) -> Summary {
        let slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut merged = Slot::default();
        let mut requests = 0_u64;
        let (mut errors, mut rejected) = (0_u64, 0_u64);
        for slot in slots.iter().filter(|s| s.second >= from && s.second <= to) {
            requests += u64::from(slot.requests);
            errors += u64::from(slot.errors);
            rejected += u64::from(slot.rejected);
            for (sum, n) in merged.latency.iter_mut().zip(slot.latency) {
                *sum = sum.saturating_add(n);
            }
        }
        Summary {
            requests,
            errors,
            rejected,
            p50: quantile(&merged.latency, 0.5),
            p99: quantile(&merged.latency, 0.99),
        }
    }

    /// `points` points of `step` seconds each, oldest first, ending now.
    pub fn series(&self, points: usize, step: u64) -> Vec<Point> {
        let step = step.max(1);
        let now = self.now_second();
        let unix_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let points = points.min(WINDOW_SECS / step as usize);
        (0..points as u64)
            .rev()
            .map(|back| {
                let to = now.saturating_sub(back * step);
                let from = to.saturating_sub(step - 1);
                let s = self.merge(from.max(1), to);
                Point {
                    t: unix_now.saturating_sub(back * step),
                    rps: s.requests as f64 / step as f64,
                    eps: s.errors as f64 / step as f64,
                    p50_ms: s.p50.map(|v| v * 1e3),
                    p99_ms: s.p99.map(|v| v * 1e3),
                }
            })
            .collect()
    }
}

/// The upper bound of the bucket holding quantile `q`, in seconds.
fn quantile(buckets: &[u32; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().map(|n| u64::from(*n)).sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += u64::from(*n);
        if seen >= rank {
            let bound = BOUNDS_US
                .get(i)
                .copied()
                .unwrap_or(BOUNDS_US[BUCKETS - 2] * 2);
            return Some(bound as f64 / 1e6);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_quantiles() {
        let w = Window::new();
        for i in 0..100 {
            let status = if i < 5 { 500 } else { 200 };
            w.record_at(
                10,
                status,
                i < 2,
                Duration::from_micros(if i < 98 { 700 } else { 90_000 }),
            );
        }
        let s = w.merge(1, 10);
        assert_eq!((s.requests, s.errors, s.rejected), (100, 5, 2));
        assert!((s.error_rate() - 0.05).abs() < 1e-9);
        assert_eq!(s.p50, Some(800e-6));
        assert_eq!(s.p99, Some(102_400e-6));
    }

    #[test]
    fn old_seconds_fall_out() {
        let w = Window::new();
        w.record_at(5, 500, false, Duration::from_millis(1));
        w.record_at(5 + WINDOW_SECS as u64, 200, false, Duration::from_millis(1));
        let s = w.merge(1, 5 + WINDOW_SECS as u64);
        assert_eq!((s.requests, s.errors), (1, 0));
        assert_eq!(w.merge(1, 10).requests, 0);
    }

    #[test]
    fn empty_window() {
        let w = Window::new();
        let s = w.summary(Duration::from_secs(60));
        assert_eq!(s, Summary::default());
        assert_eq!(s.error_rate(), 0.0);
        assert_eq!(w.series(10, 6).len(), 10);
    }
}
