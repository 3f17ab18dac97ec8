//! What operators see: metrics ([`metrics`]), each function's log ring ([`logs`]), its
//! rolling statistics ([`window`]), alert rules judged on them ([`alerts`]) and the
//! status page ([`page`]).
//!
//! All of it is keyed by app and function name, so it outlives the versions that
//! serve: a deploy keeps a function's counters, log and charts.

pub mod alerts;
pub mod logs;
pub mod metrics;
pub mod page;
pub mod trace;
pub mod window;

use std::sync::Arc;

use dashmap::DashMap;

use self::logs::LogRing;
use self::metrics::FunctionMetrics;
use self::window::Window;

/// What a function reports to, shared by every version of it.
#[derive(Clone)]
pub struct Observed {
    /// Its metric handles.
    pub metrics: FunctionMetrics,
    /// Its last minutes.
    pub window: Arc<Window>,
    /// Its log.
    pub logs: Arc<LogRing>,
}

/// The node's observations of its functions.
pub struct Ops {
    functions: DashMap<(String, String), Observed>,
    /// Alert rules' state.
    pub alerts: alerts::Alerts,
    closing: tokio::sync::watch::Sender<bool>,
}

impl Default for Ops {
    fn default() -> Self {
        Self {
            functions: DashMap::new(),
            alerts: alerts::Alerts::default(),
            closing: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Ops {
    /// The node is shutting down: log streams that follow end.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Whether [`Ops::close`] was called.
    pub fn is_closed(&self) -> bool {
        *self.closing.borrow()
    }

    /// Resolves once [`Ops::close`] was called.
    pub fn closed(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut closing = self.closing.subscribe();
        async move {
            let _ = closing.wait_for(|&c| c).await;
        }
    }

    /// What `function` of `app` reports to (made on first use).
    pub fn function(&self, app: &str, function: &str) -> Observed {
        self.functions
            .entry((app.to_owned(), function.to_owned()))
            .or_insert_with(|| Observed {
                metrics: FunctionMetrics::of(app, function),
                window: Arc::default(),
                logs: Arc::default(),
            })
            .clone()
    }

    /// The observations of `function` of `app`, if it ever served here.
    pub fn get(&self, app: &str, function: &str) -> Option<Observed> {
        self.functions
            .get(&(app.to_owned(), function.to_owned()))
            .map(|o| o.clone())
    }

    /// The apps that have a function named `function`.
    pub fn apps_with(&self, function: &str) -> Vec<String> {
        let mut apps: Vec<String> = self
            .functions
            .iter()
            .filter(|e| e.key().1 == function)
            .map(|e| e.key().0.clone())
            .collect();
        apps.sort();
        apps
    }

    /// Forgets every function of `app` but those in `keep` (after a deploy or a removal).
    pub fn retain(&self, app: &str, keep: &[&str]) {
        self.functions.retain(|(a, f), observed| {
            let kept = a != app || keep.contains(&f.as_str());
            if !kept {
                observed.metrics.forget();
            }
            kept
        });
    }
}
