//! Alert rules (`[alert.NAME]` in a manifest), judged every second on each function's
//! rolling statistics. A rule fires when its condition holds over its window and
//! resolves when it no longer does; each change is written to the audit log, kept for
//! `GET /v1/alerts`, and POSTed to the webhook when one is set.
//!
//! The webhook is called from its own thread through a bounded queue: a slow or dead
//! receiver delays notifications (retried with back-off), never a request.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use serde::Serialize;

use super::window::Summary;
use crate::locked::{AlertMetric, AlertSpec};

/// How often rules are judged.
pub const EVALUATE_EVERY: Duration = Duration::from_secs(1);

/// Changes kept for `GET /v1/alerts`.
pub const MAX_EVENTS: usize = 200;

/// Notifications waiting for the webhook; past that new ones are dropped (and counted).
pub const WEBHOOK_QUEUE: usize = 256;

/// Tries per notification, with back-off doubling from [`WEBHOOK_FIRST_BACKOFF`].
pub const WEBHOOK_TRIES: u32 = 5;

/// The first wait before retrying a notification.
pub const WEBHOOK_FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// How long one webhook call may take.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// One rule's state now.
#[derive(Debug, Clone, Serialize)]
pub struct AlertStatus {
    /// The app.
    pub app: String,
    /// The rule.
    pub alert: String,
    /// The function it watches.
    pub function: String,
    /// Its condition, as written.
    pub when: String,
    /// Its window, in milliseconds.
    pub over_ms: u64,
    /// `firing` or `ok`.
    pub state: &'static str,
    /// The value last judged (a ratio, or seconds for a latency).
    pub value: Option<f64>,
    /// Requests in the window when last judged.
    pub requests: u64,
    /// Unix ms of the last change (or of when the rule was first judged).
    pub since_ms: u64,
}

impl AlertStatus {
    /// `rule` of `app` not judged yet (`ok`, no value), as of `now`.
    fn new(app: &str, rule: &AlertSpec, now: u64) -> Self {
        Self {
            app: app.to_owned(),
            alert: rule.name.to_string(),
            function: rule.function.to_string(),
            when: rule.when(),
            over_ms: over_ms(rule),
            state: "ok",
            value: None,
            requests: 0,
            since_ms: now,
        }
    }

    /// Whether this state was judged for `rule` as it is now (not an earlier version).
    fn is_of(&self, rule: &AlertSpec) -> bool {
        self.when == rule.when()
            && self.function == rule.function.as_str()
            && self.over_ms == over_ms(rule)
    }
}

fn over_ms(rule: &AlertSpec) -> u64 {
    u64::try_from(rule.over.as_millis()).unwrap_or(u64::MAX)
}

/// One change of a rule's state: what the webhook receives.
#[derive(Debug, Clone, Serialize)]
pub struct AlertEvent {
    /// The app.
    pub app: String,
    /// The rule.
    pub alert: String,
    /// The function.
    pub function: String,
    /// `firing` or `resolved`.
    pub state: &'static str,
    /// The condition.
    pub when: String,
    /// The value that changed it.
    pub value: Option<f64>,
    /// Requests in the window.
    pub requests: u64,
    /// Unix ms.
    pub time_ms: u64,
}

/// The node's alert rules and what they last judged.
pub struct Alerts {
    state: Mutex<HashMap<(String, String), AlertStatus>>,
    events: Mutex<VecDeque<AlertEvent>>,
    webhook: Mutex<Option<SyncSender<AlertEvent>>>,
}

impl Default for Alerts {
    fn default() -> Self {
        Self {
            state: Mutex::new(HashMap::new()),
            events: Mutex::new(VecDeque::new()),
            webhook: Mutex::new(None),
        }
    }
}

/// The value `metric` takes on `summary`; `None` for a latency without requests.
pub fn value_of(metric: AlertMetric, summary: &Summary) -> Option<f64> {
    match metric {
        AlertMetric::ErrorRate => Some(summary.error_rate()),
        AlertMetric::RejectedRate => Some(summary.rejected_rate()),
        AlertMetric::P50Latency => summary.p50,
        AlertMetric::P99Latency => summary.p99,
    }
}

/// Whether `rule` holds for `value`. A window without requests holds no rule: a
/// function nobody calls is not failing (nor fast).
pub fn holds(rule: &AlertSpec, value: Option<f64>, requests: u64) -> bool {
    match value {
        Some(v) if requests > 0 => {
            if rule.above {
                v > rule.threshold
            } else {
                v < rule.threshold
            }
        }
        _ => false,
    }
}

impl Alerts {
    /// Sends every change to `url` (an `http://` URL) from now on.
    pub fn set_webhook(&self, url: String) {
        let (sender, receiver) = sync_channel(WEBHOOK_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("alert-webhook".into())
            .spawn(move || deliver(&url, &receiver));
        match spawned {
            Ok(_) => *lock(&self.webhook) = Some(sender),
            Err(error) => tracing::error!("cannot start the alert webhook thread: {error}"),
        }
    }

    /// Judges `rules` of `app` on the summaries `summary_of` gives; returns the changes.
    pub fn judge(
        &self,
        app: &str,
        rules: &[AlertSpec],
        summary_of: impl Fn(&AlertSpec) -> Summary,
    ) -> Vec<AlertEvent> {
        let now = crate::node::store::now_ms();
        let mut changes = Vec::new();
        let mut state = lock(&self.state);
        // A firing rule that a deploy removed resolves.
        state.retain(|(a, name), entry| {
            let kept = a != app || rules.iter().any(|r| r.name.as_str() == name);
            if !kept && entry.state == "firing" {
                changes.push(resolved(entry, now));
            }
            kept
        });
        for rule in rules {
            let summary = summary_of(rule);
            let value = value_of(rule.metric, &summary);
            let firing = holds(rule, value, summary.requests);
            let key = (app.to_owned(), rule.name.to_string());
            let entry = state
                .entry(key)
                .or_insert_with(|| AlertStatus::new(app, rule, now));
            // A rule changed by a deploy starts again from `ok` (resolving first).
            if !entry.is_of(rule) {
                if entry.state == "firing" {
                    changes.push(resolved(entry, now));
                }
                *entry = AlertStatus::new(app, rule, now);
            }
            entry.value = value;
            entry.requests = summary.requests;
            let was_firing = entry.state == "firing";
            if firing != was_firing {
                entry.state = if firing { "firing" } else { "ok" };
                entry.since_ms = now;
                changes.push(AlertEvent {
                    app: app.to_owned(),
                    alert: rule.name.to_string(),
                    function: rule.function.to_string(),
                    state: if firing { "firing" } else { "resolved" },
                    when: entry.when.clone(),
                    value,
                    requests: summary.requests,
                    time_ms: now,
                });
            }
        }
        drop(state);
        for event in &changes {
            self.record(event.clone());
        }
        changes
    }

    /// Forgets the rules of `app` (removed): those firing resolve (the changes are
    /// returned, and recorded like any other).
    pub fn forget(&self, app: &str) -> Vec<AlertEvent> {
        let now = crate::node::store::now_ms();
        let mut changes = Vec::new();
        lock(&self.state).retain(|(a, _), entry| {
            if a == app && entry.state == "firing" {
                changes.push(resolved(entry, now));
            }
            a != app
        });
        for event in &changes {
            self.record(event.clone());
        }
        changes
    }

    fn record(&self, event: AlertEvent) {
        match &event.value {
            Some(value) => tracing::warn!(
                app = %event.app, alert = %event.alert, function = %event.function,
                "alert {}: {} (now {value:.4}, {} requests)", event.state, event.when, event.requests
            ),
            None => {
                tracing::warn!(app = %event.app, alert = %event.alert, "alert {}: {}", event.state, event.when);
            }
        }
        if let Some(sender) = lock(&self.webhook).as_ref() {
            match sender.try_send(event.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    super::metrics::metrics().alert_webhook_failures.inc();
                    tracing::warn!("the alert webhook is behind: a notification is dropped");
                }
                Err(TrySendError::Disconnected(_)) => {
                    super::metrics::metrics().alert_webhook_failures.inc();
                }
            }
        }
        let mut events = lock(&self.events);
        events.push_back(event);
        while events.len() > MAX_EVENTS {
            events.pop_front();
        }
    }

    /// The state of `rules` of `app`; a rule not judged yet is `ok` without a value.
    pub fn status_of(&self, app: &str, rules: &[AlertSpec]) -> Vec<AlertStatus> {
        let state = lock(&self.state);
        rules
            .iter()
            .map(|rule| {
                state
                    .get(&(app.to_owned(), rule.name.to_string()))
                    .filter(|s| s.is_of(rule))
                    .cloned()
                    .unwrap_or_else(|| AlertStatus::new(app, rule, crate::node::store::now_ms()))
            })
            .collect()
    }

    /// The last changes, oldest first.
    pub fn events(&self) -> Vec<AlertEvent> {
        lock(&self.events).iter().cloned().collect()
    }
}

/// The event of `entry` (firing) resolving because its rule went or changed.
fn resolved(entry: &AlertStatus, now: u64) -> AlertEvent {
    AlertEvent {
        app: entry.app.clone(),
        alert: entry.alert.clone(),
        function: entry.function.clone(),
        state: "resolved",
        when: entry.when.clone(),
        value: None,
        requests: 0,
        time_ms: now,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The webhook thread: each notification POSTed as JSON, retried with back-off.
fn deliver(url: &str, receiver: &Receiver<AlertEvent>) {
    let agent = ureq::AgentBuilder::new()
        .timeout(WEBHOOK_TIMEOUT)
        .redirects(0)
        .build();
    while let Ok(event) = receiver.recv() {
        let body = serde_json::to_string(&event).unwrap_or_default();
        let mut backoff = WEBHOOK_FIRST_BACKOFF;
        let mut delivered = false;
        for attempt in 1..=WEBHOOK_TRIES {
            match agent
                .post(url)
                .set("content-type", "application/json")
                .send_string(&body)
            {
                Ok(_) => {
                    delivered = true;
                    break;
                }
                Err(error) => {
                    // Not the error's text: it holds the URL, which may hold a secret.
                    let why = match &error {
                        ureq::Error::Status(status, _) => format!("it answered {status}"),
                        ureq::Error::Transport(t) => format!("{:?}", t.kind()),
                    };
                    tracing::warn!(attempt, "the alert webhook failed: {why}");
                    if attempt < WEBHOOK_TRIES {
                        std::thread::sleep(backoff);
                        backoff *= 2;
                    }
                }
            }
        }
        if !delivered {
            super::metrics::metrics().alert_webhook_failures.inc();
            tracing::error!(alert = %event.alert, "alert notification not delivered after {WEBHOOK_TRIES} tries");
        }
    }
}

/// Checks a webhook URL given on the command line.
pub fn check_webhook(url: &str) -> anyhow::Result<()> {
    let parsed: http::Uri = url
        .parse()
        .map_err(|e| anyhow::anyhow!("--alert-webhook {url:?} is not a URL: {e}"))?;
    anyhow::ensure!(
        parsed.scheme_str() == Some("http") && parsed.host().is_some(),
        "--alert-webhook must be an http:// URL (this build sends webhooks without TLS; \
         point it at a local relay for https)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::locked::Name;

    fn rule(when: &str) -> AlertSpec {
        let (metric, above, threshold) = AlertSpec::parse_when(when).expect("valid");
        AlertSpec {
            name: Name::new("errors").expect("name"),
            function: Name::new("detect").expect("name"),
            metric,
            above,
            threshold,
            over: Duration::from_secs(60),
        }
    }

    fn summary(requests: u64, errors: u64) -> Summary {
        Summary {
            requests,
            errors,
            rejected: 0,
            p50: Some(0.001),
            p99: Some(0.3),
        }
    }

    #[test]
    fn fires_and_resolves_once_each() {
        let alerts = Alerts::default();
        let rules = [rule("error_rate > 0.05")];
        assert!(alerts.judge("a", &rules, |_| summary(100, 1)).is_empty());
        let fired = alerts.judge("a", &rules, |_| summary(100, 10));
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].state, "firing");
        assert!(alerts.judge("a", &rules, |_| summary(100, 10)).is_empty());
        assert_eq!(alerts.status_of("a", &rules)[0].state, "firing");
        let resolved = alerts.judge("a", &rules, |_| summary(0, 0));
        assert_eq!(resolved[0].state, "resolved");
        assert_eq!(alerts.events().len(), 2);
        // A rule that is gone is forgotten; one firing resolves as it goes.
        assert_eq!(alerts.judge("a", &rules, |_| summary(100, 10)).len(), 1);
        let gone = alerts.judge("a", &[], |_| summary(0, 0));
        assert_eq!(
            gone.iter().map(|e| e.state).collect::<Vec<_>>(),
            ["resolved"]
        );
        assert!(lock(&alerts.state).is_empty());
        // A changed rule resolves before it is judged afresh; a removed app's too.
        assert_eq!(alerts.judge("a", &rules, |_| summary(100, 10)).len(), 1);
        let changed = [rule("error_rate > 0.06")];
        let events = alerts.judge("a", &changed, |_| summary(100, 10));
        assert_eq!(
            events.iter().map(|e| e.state).collect::<Vec<_>>(),
            ["resolved", "firing"]
        );
        assert_eq!(alerts.forget("a").len(), 1);
        assert!(alerts.forget("a").is_empty());
    }

    #[test]
    fn conditions_parse_and_print() {
        let r = rule("p99_latency > 250ms");
        assert_eq!(r.when(), "p99_latency > 250ms");
        assert!(holds(&r, Some(0.3), 5));
        assert!(!holds(&r, Some(0.3), 0));
        assert!(!holds(&rule("rejected_rate > 0.01"), Some(0.0), 5));
        assert!(holds(&rule("p50_latency < 1s"), Some(0.001), 5));
        for bad in [
            "error_rate",
            "error_rate >= 0.1",
            "loss > 1",
            "error_rate > 2",
            "p99_latency > 5",
        ] {
            assert!(AlertSpec::parse_when(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn webhook_urls() {
        assert!(check_webhook("http://127.0.0.1:9/hook").is_ok());
        assert!(check_webhook("https://example.com/hook").is_err());
        assert!(check_webhook("not a url").is_err());
    }
}
