//! Progress of long work on the command line (uploads, compiles, model loads): an
//! `indicatif` bar on a terminal, one log line per step otherwise (a CI log, a pipe).

use std::io::IsTerminal as _;

/// Counted steps of one piece of work.
pub struct Steps {
    label: &'static str,
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: u64,
}

impl Steps {
    /// `total` steps of `label` (e.g. "deploy"); a bar when stderr is a terminal.
    pub fn new(label: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total).with_prefix(label);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} {wide_msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            bar
        });
        Self {
            label,
            bar,
            total,
            done: 0,
        }
    }

    /// Starts the next step, `what`.
    pub fn step(&mut self, what: &str) {
        self.done += 1;
        match &self.bar {
            Some(bar) => {
                bar.set_position(self.done.saturating_sub(1));
                bar.set_message(what.to_owned());
            }
            // A line of the log (in its format: text or JSON).
            None => tracing::info!(
                target: "lepton::progress",
                "{}: {what} ({}/{})",
                self.label,
                self.done,
                self.total.max(self.done)
            ),
        }
    }

    /// The work is over: the bar goes.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        self.finish();
    }
}
