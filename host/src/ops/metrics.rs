//! The node's metrics, in the OpenMetrics text format (which Prometheus scrapes), made
//! by `prometheus-client`: every family has its HELP and TYPE.
//!
//! Families are keyed by names (app and function, model, trainer), not by the objects
//! that serve them, so a counter keeps counting across deploys and publishes.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The labels of a function's families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FunctionLabels {
    /// The app.
    pub app: String,
    /// The function.
    pub function: String,
}

/// A response's status class.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum StatusClass {
    /// 1xx.
    Informational,
    /// 2xx.
    Success,
    /// 3xx.
    Redirection,
    /// 4xx.
    ClientError,
    /// 5xx.
    ServerError,
}

impl StatusClass {
    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Informational => "1xx",
            Self::Success => "2xx",
            Self::Redirection => "3xx",
            Self::ClientError => "4xx",
            Self::ServerError => "5xx",
        }
    }

    /// Every class, in order.
    pub const ALL: [Self; 5] = [
        Self::Informational,
        Self::Success,
        Self::Redirection,
        Self::ClientError,
        Self::ServerError,
    ];

    /// The class of `status`.
    pub fn of(status: u16) -> Self {
        match status {
            ..200 => Self::Informational,
            200..300 => Self::Success,
            300..400 => Self::Redirection,
            400..500 => Self::ClientError,
            _ => Self::ServerError,
        }
    }
}

/// Request latency by function and status class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// The app.
    pub app: String,
    /// The function.
    pub function: String,
    /// The status class.
    pub class: StatusClass,
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum FailureKind {
    /// The guest trapped, failed or answered with an error (500).
    Trap,
    /// It did not answer within its timeout (504), or its body did not arrive (408).
    Timeout,
    /// Turned away: the function at capacity, or the node's body budget spent (503).
    Rejected,
    /// Its body was over `max_body_size` (413).
    TooLarge,
}

impl FailureKind {
    /// Its label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trap => "trap",
            Self::Timeout => "timeout",
            Self::Rejected => "rejected",
            Self::TooLarge => "too_large",
        }
    }

    /// Every kind.
    pub const ALL: [Self; 4] = [Self::Trap, Self::Timeout, Self::Rejected, Self::TooLarge];
}

impl EncodeLabelValue for StatusClass {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

impl EncodeLabelValue for FailureKind {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// Failures by function and kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// The app.
    pub app: String,
    /// The function.
    pub function: String,
    /// Why.
    pub kind: FailureKind,
}

/// A model's families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    /// The model's name in its manifest.
    pub model: String,
}

/// Open Inference Protocol requests by model and status class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InferLabels {
    /// The model's name in its manifest.
    pub model: String,
    /// The status class.
    pub class: StatusClass,
}

/// A trainer's families.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrainerLabels {
    /// The app.
    pub app: String,
    /// The trainer.
    pub trainer: String,
}

type Hist<L> = Family<L, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Every family the node exposes.
pub struct Metrics {
    registry: Registry,
    /// Requests routed to a function, whatever their outcome.
    pub requests: Family<FunctionLabels, Counter>,
    /// Seconds from a request's arrival to its response head, by status class.
    pub request_seconds: Hist<ClassLabels>,
    /// Requests that failed, by kind.
    pub failures: Family<FailureLabels, Counter>,
    /// Seconds a request waited for a free slot of its function.
    pub queue_seconds: Hist<FunctionLabels>,
    /// Seconds instantiating the component for a request.
    pub instantiate_seconds: Hist<FunctionLabels>,
    /// Requests running now.
    pub in_flight: Family<FunctionLabels, Gauge>,
    /// Requests waiting for a slot now.
    pub queued: Family<FunctionLabels, Gauge>,
    /// Component instances alive now, all functions together.
    pub instances_in_use: Gauge,
    /// Inference requests (`compute` calls) by model.
    pub model_requests: Family<ModelLabels, Counter>,
    /// Backend runs by model (a batch is one run).
    pub model_runs: Family<ModelLabels, Counter>,
    /// Seconds an inference waited for a session or a batch.
    pub model_queue_seconds: Hist<ModelLabels>,
    /// Seconds of the backend run.
    pub model_run_seconds: Hist<ModelLabels>,
    /// Requests per backend run.
    pub model_batch_size: Hist<ModelLabels>,
    /// Bytes of each resident model's file.
    pub model_bytes: Family<ModelLabels, Gauge>,
    /// Open Inference Protocol inference requests, by model and status class.
    pub infer_requests: Family<InferLabels, Counter>,
    /// Seconds from an inference request's arrival to its answer.
    pub infer_request_seconds: Hist<InferLabels>,
    /// Distinct models loaded.
    pub models_resident: Gauge,
    /// Training steps taken.
    pub trainer_steps: Family<TrainerLabels, Counter>,
    /// Seconds per training step.
    pub trainer_step_seconds: Hist<TrainerLabels>,
    /// The loss of the last step.
    pub trainer_loss: Family<TrainerLabels, FloatGauge>,
    /// Resident memory of the process.
    pub process_resident_memory_bytes: Gauge,
    /// Request bodies held now, all functions together.
    pub body_bytes_held: Gauge,
    /// The node's budget for request bodies held at once.
    pub body_bytes_budget: Gauge,
    /// Host log records that could not be written.
    pub log_records_dropped: Counter,
    /// Guest output dropped past the node's rate budget.
    pub guest_log_bytes_dropped: Counter,
    /// Alert webhook deliveries that failed after every retry.
    pub alert_webhook_failures: Counter,
    /// Spans dropped because the OTLP export queue was full.
    pub spans_dropped: Counter,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~52 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

fn latency<L: Clone + std::hash::Hash + Eq>() -> Hist<L> {
    Family::new_with_constructor(latency_histogram as fn() -> Histogram)
}

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        macro_rules! family {
            ($name:literal, $help:literal, $value:expr) => {{
                let metric = $value;
                registry.register($name, $help, metric.clone());
                metric
            }};
        }
        Self {
            requests: family!(
                "lepton_requests",
                "Requests routed to a function, whatever their outcome",
                Family::default()
            ),
            request_seconds: family!(
                "lepton_request_duration_seconds",
                "Seconds from a request's arrival to its response head, by status class",
                latency()
            ),
            failures: family!(
                "lepton_request_failures",
                "Requests that failed: trap (500), timeout (504, 408), rejected (503), too_large (413)",
                Family::default()
            ),
            queue_seconds: family!(
                "lepton_request_queue_wait_seconds",
                "Seconds a request waited for a free slot of its function",
                latency()
            ),
            instantiate_seconds: family!(
                "lepton_instantiation_seconds",
                "Seconds instantiating a function's component for one request",
                latency()
            ),
            in_flight: family!(
                "lepton_requests_in_flight",
                "Requests a function runs now",
                Family::default()
            ),
            queued: family!(
                "lepton_requests_queued",
                "Requests waiting for a slot of a function now",
                Family::default()
            ),
            instances_in_use: family!(
                "lepton_instances_in_use",
                "Component instances alive now, all functions together",
                Gauge::default()
            ),
            model_requests: family!(
                "lepton_model_requests",
                "Inference requests (wasi:nn compute calls) by model",
                Family::default()
            ),
            model_runs: family!(
                "lepton_model_runs",
                "Backend runs by model (a batch is one run)",
                Family::default()
            ),
            model_queue_seconds: family!(
                "lepton_model_queue_seconds",
                "Seconds an inference waited for a session or a batch",
                latency()
            ),
            model_run_seconds: family!(
                "lepton_model_run_seconds",
                "Seconds of one backend run",
                latency()
            ),
            model_batch_size: family!(
                "lepton_model_batch_size",
                "Requests per backend run",
                Family::new_with_constructor(batch_histogram as fn() -> Histogram)
            ),
            model_bytes: family!(
                "lepton_model_bytes",
                "Bytes of the ONNX file of each resident model",
                Family::default()
            ),
            infer_requests: family!(
                "lepton_infer_requests",
                "Open Inference Protocol (/v2) inference requests, by model and status class",
                Family::default()
            ),
            infer_request_seconds: family!(
                "lepton_infer_request_duration_seconds",
                "Seconds from an Open Inference Protocol request's arrival to its answer",
                latency()
            ),
            models_resident: family!(
                "lepton_models_resident",
                "Distinct models loaded (shared by digest)",
                Gauge::default()
            ),
            trainer_steps: family!(
                "lepton_trainer_steps",
                "Training steps taken",
                Family::default()
            ),
            trainer_step_seconds: family!(
                "lepton_trainer_step_seconds",
                "Seconds per training step, queue included",
                latency()
            ),
            trainer_loss: family!(
                "lepton_trainer_loss",
                "The loss of a trainer's last step",
                Family::default()
            ),
            process_resident_memory_bytes: family!(
                "process_resident_memory_bytes",
                "Resident memory of the process",
                Gauge::default()
            ),
            body_bytes_held: family!(
                "lepton_request_body_bytes_held",
                "Bytes of request bodies held now, all functions together",
                Gauge::default()
            ),
            body_bytes_budget: family!(
                "lepton_request_body_bytes_budget",
                "The node's budget of request body bytes held at once",
                Gauge::default()
            ),
            log_records_dropped: family!(
                "lepton_log_records_dropped",
                "Host log records that could not be written",
                Counter::default()
            ),
            guest_log_bytes_dropped: family!(
                "lepton_guest_log_bytes_dropped",
                "Bytes of guest output dropped past the node's rate budget",
                Counter::default()
            ),
            alert_webhook_failures: family!(
                "lepton_alert_webhook_failures",
                "Alert notifications not delivered after every retry",
                Counter::default()
            ),
            spans_dropped: family!(
                "lepton_spans_dropped",
                "Spans dropped because the OTLP export queue was full",
                Counter::default()
            ),
            registry,
        }
    }

    /// The page, with the process gauges read now.
    pub fn encode(&self) -> String {
        if let Some(rss) = resident_bytes() {
            self.process_resident_memory_bytes
                .set(i64::try_from(rss).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("encoding the metrics failed: {error}");
        }
        out
    }
}

/// The Content-Type of [`Metrics::encode`]'s page.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// The resident set size of this process, from `/proc/self/status`.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// Drops the `lepton_model_bytes` series of models not in `resident`.
pub fn retain_models(resident: &[ModelLabels]) {
    // A family lists no keys: the stale ones are those a fresh family would not have.
    static KNOWN: std::sync::Mutex<Vec<ModelLabels>> = std::sync::Mutex::new(Vec::new());
    let mut known = KNOWN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for old in known.iter().filter(|l| !resident.contains(l)) {
        metrics().model_bytes.remove(old);
    }
    *known = resident.to_vec();
}

/// A function's handles, made once when it loads.
#[derive(Clone)]
pub struct FunctionMetrics {
    /// Requests routed to it.
    pub requests: Counter,
    /// Latency by status class, in [`StatusClass::ALL`] order, made at the first
    /// answer of each class (most functions never answer 1xx or 3xx).
    latency: Arc<[OnceLock<Histogram>; 5]>,
    labels: FunctionLabels,
    /// Set when the function is forgotten: no series is made for it again.
    removed: Arc<std::sync::atomic::AtomicBool>,
    /// Failures by kind, in [`FailureKind::ALL`] order.
    pub failures: [Counter; 4],
    /// Time waiting for a slot.
    pub queue: Histogram,
    /// Time instantiating.
    pub instantiate: Histogram,
    /// Running now.
    pub in_flight: Gauge,
    /// Waiting now.
    pub queued: Gauge,
}

impl FunctionMetrics {
    /// The handles of `function` of `app` (shared with every version of it).
    pub fn of(app: &str, function: &str) -> Self {
        let m = metrics();
        let labels = FunctionLabels {
            app: app.to_owned(),
            function: function.to_owned(),
        };
        let failures = FailureKind::ALL.map(|kind| {
            m.failures.get_or_create_owned(&FailureLabels {
                app: app.to_owned(),
                function: function.to_owned(),
                kind,
            })
        });
        Self {
            requests: m.requests.get_or_create_owned(&labels),
            latency: Arc::default(),
            failures,
            queue: m.queue_seconds.get_or_create_owned(&labels),
            instantiate: m.instantiate_seconds.get_or_create_owned(&labels),
            in_flight: m.in_flight.get_or_create_owned(&labels),
            queued: m.queued.get_or_create_owned(&labels),
            labels,
            removed: Arc::default(),
        }
    }

    /// Counts one failure of `kind`.
    pub fn failed(&self, kind: FailureKind) {
        let index = FailureKind::ALL
            .iter()
            .position(|k| *k == kind)
            .unwrap_or_default();
        self.failures[index].inc();
    }

    /// Records an answer of `status` after `seconds`.
    pub fn answered(&self, status: u16, seconds: f64) {
        let class = StatusClass::of(status);
        let index = StatusClass::ALL
            .iter()
            .position(|c| *c == class)
            .unwrap_or_default();
        if self.latency[index].get().is_none()
            && self.removed.load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        self.latency[index]
            .get_or_init(|| {
                metrics().request_seconds.get_or_create_owned(&ClassLabels {
                    app: self.labels.app.clone(),
                    function: self.labels.function.clone(),
                    class,
                })
            })
            .observe(seconds);
    }

    /// The function's name.
    pub fn function(&self) -> &str {
        &self.labels.function
    }

    /// Forgets these handles' function: its series go, and none is made again.
    pub fn forget(&self) {
        self.removed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Self::remove(&self.labels.app, &self.labels.function);
    }

    /// Forgets `function` of `app` (the app was removed).
    fn remove(app: &str, function: &str) {
        let m = metrics();
        let labels = FunctionLabels {
            app: app.to_owned(),
            function: function.to_owned(),
        };
        m.requests.remove(&labels);
        for family in [&m.in_flight, &m.queued] {
            family.remove(&labels);
        }
        for family in [&m.queue_seconds, &m.instantiate_seconds] {
            family.remove(&labels);
        }
        for class in StatusClass::ALL {
            m.request_seconds.remove(&ClassLabels {
                app: app.to_owned(),
                function: function.to_owned(),
                class,
            });
        }
        for kind in FailureKind::ALL {
            m.failures.remove(&FailureLabels {
                app: app.to_owned(),
                function: function.to_owned(),
                kind,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_has_help_and_type() {
        let f = FunctionMetrics::of("shop", "hello");
        f.requests.inc();
        f.answered(200, 0.002);
        f.failed(FailureKind::Timeout);
        let page = metrics().encode();
        assert!(page.ends_with("# EOF\n"), "{page}");
        let mut typed = std::collections::HashSet::new();
        let mut helped = std::collections::HashSet::new();
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap_or_default().to_owned());
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                helped.insert(rest.split(' ').next().unwrap_or_default().to_owned());
            }
        }
        assert_eq!(typed, helped);
        assert!(typed.contains("lepton_request_duration_seconds"));
        assert!(page.contains(
            "lepton_request_duration_seconds_count{app=\"shop\",function=\"hello\",class=\"2xx\"} 1"
        ));
        assert!(page.contains(
            "lepton_request_failures_total{app=\"shop\",function=\"hello\",kind=\"timeout\"} 1"
        ));
        assert!(page.contains(
            "lepton_request_failures_total{app=\"shop\",function=\"hello\",kind=\"trap\"} 0"
        ));
    }

    #[test]
    fn status_classes() {
        assert_eq!(StatusClass::of(101), StatusClass::Informational);
        assert_eq!(StatusClass::of(204), StatusClass::Success);
        assert_eq!(StatusClass::of(404), StatusClass::ClientError);
        assert_eq!(StatusClass::of(599), StatusClass::ServerError);
    }
}
