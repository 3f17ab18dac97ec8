//! Property tests of the autoscaler: always within bounds, never down in panic.

use std::time::Duration;

use proptest::prelude::*;

use lepton_scheduler::{Autoscaler, Sample, SampleWindow, ScaleBounds, ScaleMode, ScaleState};

proptest! {
    #[test]
    fn decisions_stay_in_bounds_and_panic_never_scales_down(
        loads in prop::collection::vec(0.0f64..500.0, 1..300),
        min in 0u32..3,
        extra in 0u32..40,
    ) {
        let bounds = ScaleBounds::new(min, min + extra);
        let autoscaler = Autoscaler::default();
        let mut window = SampleWindow::new();
        let mut state = ScaleState::default();
        let mut current = min;
        for (t, load) in loads.into_iter().enumerate() {
            let now = Duration::from_secs(t as u64);
            window.record(Sample::new(now, load), autoscaler.config().stable_window());
            let d = autoscaler.decide(bounds, current, window.samples(), &state, now);
            prop_assert!(d.replicas >= bounds.min && d.replicas <= bounds.max, "{d:?}");
            if d.mode == ScaleMode::Panic {
                prop_assert!(d.replicas >= current.min(bounds.max), "scaled down in panic: {current} -> {d:?}");
            }
            state = d.state;
            current = d.replicas;
        }
    }
}
