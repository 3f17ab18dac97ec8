//! Concurrency-based autoscaling in the shape of Knative's KPA.
//!
//! The cluster samples each function's in-flight requests (summed over its replicas) and
//! asks [`Autoscaler::decide`] how many replicas it should have. The answer is a pure
//! function of the samples, the current count, the state the last decision returned and
//! the clock the caller passes in: no timers, no global state.
//!
//! - **Stable mode**: `ceil(mean in-flight over the stable window / target per replica)`.
//! - **Panic mode**: entered when the panic-window mean would need `panic_threshold`
//!   times the current replicas; the count follows the panic-window mean and never goes
//!   down. It ends once a whole stable window has passed without crossing the threshold.
//! - **Scale to zero**: when the stable answer is zero and the bounds allow zero, the
//!   last replica goes only after `scale_to_zero_grace` of asking for zero.
//! - The answer is always clamped into the function's [`ScaleBounds`].

use std::time::Duration;

use crate::model::ScaleBounds;

/// Default in-flight requests one replica is meant to carry.
pub const DEFAULT_TARGET_CONCURRENCY: f64 = 10.0;
/// Default stable window (Knative's default: a minute smooths out noise).
pub const DEFAULT_STABLE_WINDOW: Duration = Duration::from_secs(60);
/// Default panic window (Knative's default: a tenth of the stable window).
pub const DEFAULT_PANIC_WINDOW: Duration = Duration::from_secs(6);
/// Default panic threshold: panic at twice the current replicas' target load.
pub const DEFAULT_PANIC_THRESHOLD: f64 = 2.0;
/// Default grace before the last replica goes (Knative's default).
pub const DEFAULT_SCALE_TO_ZERO_GRACE: Duration = Duration::from_secs(30);

/// One observation of a function's in-flight requests, summed over its replicas.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// When, on the caller's monotonic clock.
    pub at: Duration,
    /// In-flight requests (a mean over the sampling interval, hence a float).
    pub in_flight: f64,
}

impl Sample {
    /// Makes a sample.
    pub const fn new(at: Duration, in_flight: f64) -> Self {
        Self { at, in_flight }
    }
}

/// The samples of one function, oldest first, trimmed to what decisions need.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SampleWindow {
    samples: Vec<Sample>,
}

impl SampleWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a sample and drops those older than `keep` before it.
    pub fn record(&mut self, sample: Sample, keep: Duration) {
        self.samples.push(sample);
        let cutoff = sample.at.saturating_sub(keep);
        let old = self.samples.iter().take_while(|s| s.at < cutoff).count();
        self.samples.drain(..old);
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }
}

/// The autoscaler's configuration (per function, or shared).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AutoscalerConfig {
    pub(crate) target: f64,
    pub(crate) stable_window: Duration,
    pub(crate) panic_window: Duration,
    pub(crate) panic_threshold: f64,
    pub(crate) scale_to_zero_grace: Duration,
}

impl Default for AutoscalerConfig {
    fn default() -> Self {
        Self {
            target: DEFAULT_TARGET_CONCURRENCY,
            stable_window: DEFAULT_STABLE_WINDOW,
            panic_window: DEFAULT_PANIC_WINDOW,
            panic_threshold: DEFAULT_PANIC_THRESHOLD,
            scale_to_zero_grace: DEFAULT_SCALE_TO_ZERO_GRACE,
        }
    }
}

impl AutoscalerConfig {
    /// In-flight requests per replica to aim for; values below 0.01 count as 0.01.
    #[must_use]
    pub fn with_target(mut self, target: f64) -> Self {
        self.target = if target.is_finite() {
            target.max(0.01)
        } else {
            DEFAULT_TARGET_CONCURRENCY
        };
        self
    }

    /// The stable window.
    #[must_use]
    pub fn with_stable_window(mut self, window: Duration) -> Self {
        self.stable_window = window;
        self
    }

    /// The panic window (at most the stable window).
    #[must_use]
    pub fn with_panic_window(mut self, window: Duration) -> Self {
        self.panic_window = window;
        self
    }

    /// The panic threshold, as a multiple of the current replicas' target load
    /// (at least 1).
    #[must_use]
    pub fn with_panic_threshold(mut self, threshold: f64) -> Self {
        self.panic_threshold = if threshold.is_finite() {
            threshold.max(1.0)
        } else {
            DEFAULT_PANIC_THRESHOLD
        };
        self
    }

    /// The grace period before scaling to zero.
    #[must_use]
    pub fn with_scale_to_zero_grace(mut self, grace: Duration) -> Self {
        self.scale_to_zero_grace = grace;
        self
    }

    /// The stable window, which is also how long a [`SampleWindow`] must keep samples.
    pub fn stable_window(&self) -> Duration {
        self.stable_window
    }
}

/// What the autoscaler remembers between decisions; start from `ScaleState::default()`
/// and pass back the one each decision returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScaleState {
    panic_since: Option<Duration>,
    panic_replicas: u32,
    zero_since: Option<Duration>,
}

impl ScaleState {
    /// Whether the function is in panic mode.
    pub fn in_panic(&self) -> bool {
        self.panic_since.is_some()
    }
}

/// The mode a decision was taken in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScaleMode {
    /// Following the stable window.
    Stable,
    /// Following the panic window, never scaling down.
    Panic,
    /// No samples in the stable window: the count is left as it is.
    NoData,
}

/// An autoscaling decision.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaleDecision {
    /// Replicas wanted, within the bounds.
    pub replicas: u32,
    /// The mode it was taken in.
    pub mode: ScaleMode,
    /// Mean in-flight over the stable window.
    pub stable_concurrency: f64,
    /// Mean in-flight over the panic window.
    pub panic_concurrency: f64,
    /// The state to pass to the next decision.
    pub state: ScaleState,
}

/// Decides replica counts from observed concurrency.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Autoscaler {
    config: AutoscalerConfig,
}

impl Autoscaler {
    /// An autoscaler with this configuration.
    pub fn new(config: AutoscalerConfig) -> Self {
        Self { config }
    }

    /// Its configuration.
    pub fn config(&self) -> &AutoscalerConfig {
        &self.config
    }

    /// How many replicas a function should have at `now`, given its `current` count,
    /// its samples (any order; those outside the stable window are ignored) and the
    /// state the previous decision returned.
    pub fn decide(
        &self,
        bounds: ScaleBounds,
        current: u32,
        samples: &[Sample],
        state: &ScaleState,
        now: Duration,
    ) -> ScaleDecision {
        let c = &self.config;
        let (stable, stable_n) = mean_since(samples, now, c.stable_window);
        let (panic, _) = mean_since(samples, now, c.panic_window.min(c.stable_window));
        let mut st = *state;
        if stable_n == 0 {
            return ScaleDecision {
                replicas: bounds.clamp(current),
                mode: ScaleMode::NoData,
                stable_concurrency: 0.0,
                panic_concurrency: 0.0,
                state: st,
            };
        }
        let ready = f64::from(current.max(1));
        let over_threshold = panic / c.target / ready >= c.panic_threshold;
        if over_threshold {
            if st.panic_since.is_none() {
                st.panic_replicas = current;
            }
            st.panic_since = Some(now);
        } else if st
            .panic_since
            .is_some_and(|t| now >= t.saturating_add(c.stable_window))
        {
            st.panic_since = None;
            st.panic_replicas = 0;
        }
        let (mut desired, mode) = if st.panic_since.is_some() {
            let d = replicas_for(panic, c.target)
                .max(st.panic_replicas)
                .max(current);
            st.panic_replicas = d;
            (d, ScaleMode::Panic)
        } else {
            (replicas_for(stable, c.target), ScaleMode::Stable)
        };
        if desired == 0 && current > 0 {
            let since = *st.zero_since.get_or_insert(now);
            if now.saturating_sub(since) < c.scale_to_zero_grace {
                desired = 1;
            }
        } else {
            st.zero_since = None;
        }
        ScaleDecision {
            replicas: bounds.clamp(desired),
            mode,
            stable_concurrency: stable,
            panic_concurrency: panic,
            state: st,
        }
    }
}

/// The mean of the samples in `(now - window, now]`, and how many there were.
fn mean_since(samples: &[Sample], now: Duration, window: Duration) -> (f64, usize) {
    let from = now.checked_sub(window);
    let (sum, n) = samples
        .iter()
        .filter(|s| s.at <= now && from.is_none_or(|f| s.at > f))
        .fold((0.0, 0usize), |(sum, n), s| {
            (sum + s.in_flight.max(0.0), n + 1)
        });
    if n == 0 {
        (0.0, 0)
    } else {
        (sum / n as f64, n)
    }
}

/// `ceil(concurrency / target)`, saturating.
fn replicas_for(concurrency: f64, target: f64) -> u32 {
    let r = (concurrency / target).ceil();
    if r.is_nan() || r <= 0.0 {
        0
    } else if r >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        // In range and integral: the cast is exact.
        r as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// One sample a second with this load, for `from..to` seconds.
    fn steady(from: u64, to: u64, load: f64) -> Vec<Sample> {
        (from..to).map(|t| Sample::new(secs(t), load)).collect()
    }

    const BOUNDS: ScaleBounds = ScaleBounds::new(0, 50);

    #[test]
    fn stable_mode_is_ceil_of_load_over_target() {
        let a = Autoscaler::default();
        let d = a.decide(
            BOUNDS,
            3,
            &steady(0, 60, 35.0),
            &ScaleState::default(),
            secs(59),
        );
        assert_eq!(d.mode, ScaleMode::Stable);
        assert_eq!(d.replicas, 4);
    }

    #[test]
    fn bounds_clamp_the_answer() {
        let a = Autoscaler::default();
        let d = a.decide(
            ScaleBounds::new(2, 3),
            2,
            &steady(0, 60, 1000.0),
            &ScaleState::default(),
            secs(59),
        );
        assert_eq!(d.replicas, 3);
        let d = a.decide(
            ScaleBounds::new(2, 3),
            2,
            &steady(0, 60, 0.0),
            &ScaleState::default(),
            secs(59),
        );
        assert_eq!(d.replicas, 2);
    }

    #[test]
    fn a_burst_panics_and_scales_on_the_panic_window() {
        let a = Autoscaler::default();
        let mut samples = steady(0, 54, 10.0);
        samples.extend(steady(54, 60, 200.0));
        let d = a.decide(BOUNDS, 1, &samples, &ScaleState::default(), secs(59));
        assert_eq!(d.mode, ScaleMode::Panic);
        assert_eq!(d.replicas, 20);
        assert!(d.state.in_panic());
    }

    #[test]
    fn panic_never_scales_down_and_ends_after_a_stable_window() {
        let a = Autoscaler::default();
        let mut samples = steady(0, 54, 10.0);
        samples.extend(steady(54, 60, 200.0));
        let first = a.decide(BOUNDS, 1, &samples, &ScaleState::default(), secs(59));
        // The burst is over: load drops, but panic holds the count.
        samples.extend(steady(60, 80, 1.0));
        let held = a.decide(BOUNDS, first.replicas, &samples, &first.state, secs(79));
        assert_eq!(held.mode, ScaleMode::Panic);
        assert_eq!(held.replicas, 20);
        // A stable window after the last over-threshold sample, panic ends.
        samples.extend(steady(80, 130, 1.0));
        let after = a.decide(BOUNDS, held.replicas, &samples, &held.state, secs(119));
        assert_eq!(after.mode, ScaleMode::Stable);
        assert!(after.replicas < 20);
        assert!(!after.state.in_panic());
    }

    #[test]
    fn scale_to_zero_waits_for_the_grace_period() {
        let a = Autoscaler::default();
        let samples = steady(0, 200, 0.0);
        let d = a.decide(BOUNDS, 1, &samples, &ScaleState::default(), secs(100));
        assert_eq!(
            d.replicas, 1,
            "inside the grace period the last replica stays"
        );
        let d2 = a.decide(BOUNDS, 1, &samples, &d.state, secs(129));
        assert_eq!(d2.replicas, 1);
        let d3 = a.decide(BOUNDS, 1, &samples, &d2.state, secs(130));
        assert_eq!(d3.replicas, 0);
    }

    #[test]
    fn min_above_zero_forbids_scale_to_zero() {
        let a = Autoscaler::default();
        let samples = steady(0, 200, 0.0);
        let d = a.decide(
            ScaleBounds::new(1, 5),
            1,
            &samples,
            &ScaleState::default(),
            secs(199),
        );
        let d = a.decide(ScaleBounds::new(1, 5), 1, &samples, &d.state, secs(400));
        assert_eq!(d.replicas, 1);
    }

    #[test]
    fn traffic_resets_the_grace_period() {
        let a = Autoscaler::default();
        let mut samples = steady(0, 100, 0.0);
        let d = a.decide(BOUNDS, 1, &samples, &ScaleState::default(), secs(99));
        samples.extend(steady(100, 101, 5.0));
        let d = a.decide(BOUNDS, 1, &samples, &d.state, secs(100));
        assert_eq!(d.replicas, 1);
        samples.extend(steady(101, 200, 0.0));
        let d = a.decide(BOUNDS, 1, &samples, &d.state, secs(170));
        assert_eq!(
            d.replicas, 1,
            "the zero streak restarted when the window emptied"
        );
    }

    #[test]
    fn cold_start_from_zero_scales_up() {
        let a = Autoscaler::default();
        let d = a.decide(
            BOUNDS,
            0,
            &[Sample::new(secs(10), 3.0)],
            &ScaleState::default(),
            secs(10),
        );
        assert_eq!(d.replicas, 1);
    }

    #[test]
    fn no_samples_keeps_the_count() {
        let a = Autoscaler::default();
        let d = a.decide(BOUNDS, 7, &[], &ScaleState::default(), secs(10));
        assert_eq!((d.replicas, d.mode), (7, ScaleMode::NoData));
    }

    #[test]
    fn sample_window_keeps_only_the_stable_window() {
        let mut w = SampleWindow::new();
        for t in 0..100 {
            w.record(Sample::new(secs(t), 1.0), secs(60));
        }
        assert_eq!(w.samples().len(), 61);
        assert_eq!(w.samples()[0].at, secs(39));
    }
}
