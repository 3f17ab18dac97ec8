//! The node under attack (issue 9): each test reproduces a hole found by attacking the
//! real binary, and keeps it closed. The abuse that already held is kept here too.

use std::time::{Duration, Instant};

use crate::util::{Project, manifest};

/// The `q`-quantile of `samples` (sorted in place).
fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort_unstable();
    let index = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples[index.min(samples.len() - 1)]
}

#[test]
fn twenty_spinning_guests_do_not_starve_another_function_and_time_out_as_504() {
    let project = Project::new(&manifest(
        "[function.spin]\ncomponent = \"{SPIN}\"\nroute = \"/spin\"\ntimeout = \"4s\"\nmax_concurrency = 20\n\
         [function.hello]\ncomponent = \"{HELLO}\"\nroute = \"/hello\"\n",
    ));
    let lepton = project.up();
    let spinners: Vec<_> = (0..20).map(|_| lepton.get_in_background("/spin")).collect();
    lepton.wait_for_metric("lepton_requests_in_flight", "spin", 20);
    let mut latencies = Vec::new();
    while latencies.len() < 100 && lepton.metric("lepton_requests_in_flight", "spin") == 20 {
        let started = Instant::now();
        assert_eq!(lepton.get("/hello").status, 200);
        latencies.push(started.elapsed());
    }
    assert!(latencies.len() >= 20, "only {} samples", latencies.len());
    let p50 = quantile(&mut latencies, 0.5);
    let p99 = quantile(&mut latencies, 0.99);
    // Before the long lane: p50 ≈ 550 ms on 2 cores. The bench measures the real
    // figure (≤ 10 ms); this bound leaves room for a CI machine running other tests.
    assert!(
        p50 < Duration::from_millis(50) && p99 < Duration::from_millis(250),
        "hello p50 {p50:?}, p99 {p99:?} while 20 guests spin"
    );
    for spinner in spinners {
        assert_eq!(spinner.join().expect("thread").status, 504);
    }
    // Timeouts are timeouts: counted as such, not as failures.
    assert_eq!(lepton.metric("lepton_requests_timed_out_total", "spin"), 20);
    assert_eq!(lepton.metric("lepton_requests_failed_total", "spin"), 0);
    assert!(
        !lepton.log().contains("wasm trap: interrupt"),
        "a timeout was logged as a trap"
    );
}
