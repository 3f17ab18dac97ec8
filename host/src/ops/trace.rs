//! W3C Trace Context (`traceparent`): a request keeps the trace its client started
//! (or starts one), gets a span id of its own, and its guest's outbound requests carry
//! `traceparent` with the guest's span as their parent.
//!
//! With `--otlp URL`, finished spans (the request, instantiation, the guest, each
//! wasi:nn compute with its queue and run, each training step) are exported over
//! OTLP/HTTP (JSON) by `opentelemetry-otlp`, from a thread of their own: a bounded
//! queue, batches of up to [`EXPORT_BATCH`] or every [`EXPORT_EVERY`]; when the
//! collector is slow the queue fills and spans are dropped (and counted), never a
//! request held.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};

/// The header's name.
pub const TRACEPARENT: &str = "traceparent";

/// One request's place in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace.
    pub trace_id: [u8; 16],
    /// This request's span.
    pub span_id: [u8; 8],
    /// The client's span, when it sent one.
    pub parent_id: Option<[u8; 8]>,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceContext {
    /// The context of a request that carried `header` (a `traceparent` value): the
    /// same trace with a new span, or a new trace when the header is absent or invalid.
    pub fn for_request(header: Option<&str>) -> Self {
        match header.and_then(parse) {
            Some((trace_id, parent, flags)) => Self {
                trace_id,
                span_id: span_id(),
                parent_id: Some(parent),
                flags,
            },
            None => {
                let mut trace_id = [0; 16];
                trace_id[..8].copy_from_slice(&random().to_be_bytes());
                trace_id[8..].copy_from_slice(&random().to_be_bytes());
                Self {
                    trace_id,
                    span_id: span_id(),
                    parent_id: None,
                    flags: 1,
                }
            }
        }
    }

    /// A span inside this one: the same trace, a new span id, this span its parent.
    pub fn child(&self) -> Self {
        Self {
            trace_id: self.trace_id,
            span_id: span_id(),
            parent_id: Some(self.span_id),
            flags: self.flags,
        }
    }

    /// The trace id in hex.
    pub fn trace_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The `traceparent` of a request made on behalf of this one (its parent: this span).
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            // Only the sampled bit: version 00 sends no flag it does not know.
            self.flags & 1
        )
    }

    /// The context a request passes on when spans are not exported: its client's
    /// `traceparent` as it came (no span of ours would be reported), or, for a trace
    /// this host started, this span.
    pub fn passed_on(&self) -> Self {
        match self.parent_id {
            Some(parent) => Self {
                span_id: parent,
                parent_id: None,
                ..*self
            },
            None => *self,
        }
    }
}

/// `(trace id, parent span id, flags)` of a valid `traceparent` value: version `00`
/// (or a later version's first four fields), lowercase hex, ids not all zeros.
pub fn parse(value: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let value = value.trim();
    let mut parts = value.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let lower_hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(version, 2) || version == "ff" || !lower_hex(trace, 32) || !lower_hex(parent, 16)
    {
        return None;
    }
    // Version 00 has exactly four fields; a later one may add more.
    if version == "00" && parts.next().is_some() {
        return None;
    }
    if !lower_hex(flags, 2) {
        return None;
    }
    let mut trace_id = [0; 16];
    let mut parent_id = [0; 8];
    hex::decode_to_slice(trace, &mut trace_id).ok()?;
    hex::decode_to_slice(parent, &mut parent_id).ok()?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace_id, parent_id, flags))
}

/// Spans waiting for the exporter; past that new ones are dropped.
pub const EXPORT_QUEUE: usize = 8192;

/// Spans per export request.
pub const EXPORT_BATCH: usize = 512;

/// How long a span waits for its batch to fill.
pub const EXPORT_EVERY: Duration = Duration::from_millis(500);

/// How long one export request may take.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

static EXPORT: OnceLock<SyncSender<SpanData>> = OnceLock::new();

/// Whether spans are exported (`--otlp` was given).
pub fn exporting() -> bool {
    EXPORT.get().is_some()
}

/// The OTLP/HTTP traces endpoint for `--otlp URL`: `URL/v1/traces` unless it names it.
pub fn traces_endpoint(url: &str) -> anyhow::Result<String> {
    let parsed: http::Uri = url
        .parse()
        .map_err(|e| anyhow::anyhow!("--otlp {url:?} is not a URL: {e}"))?;
    anyhow::ensure!(
        parsed.scheme_str() == Some("http")
            && parsed.host().is_some()
            && parsed.query().is_none()
            && !url.contains('#'),
        "--otlp must be an http:// URL of an OTLP/HTTP collector (e.g. http://127.0.0.1:4318); \
         this build sends no TLS"
    );
    let url = url.trim_end_matches('/');
    Ok(if url.ends_with("/v1/traces") {
        url.to_owned()
    } else {
        format!("{url}/v1/traces")
    })
}

/// Starts exporting spans to the collector at `url` (see [`traces_endpoint`]).
pub fn export_to(url: &str, service: &str) -> anyhow::Result<()> {
    use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
    let endpoint = traces_endpoint(url)?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(UreqClient(
            ureq::AgentBuilder::new()
                .timeout(EXPORT_TIMEOUT)
                .redirects(0)
                .build(),
        ))
        .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
        .with_endpoint(endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| anyhow::anyhow!("the OTLP exporter for {endpoint}: {e}"))?;
    exporter.set_resource(
        &opentelemetry_sdk::Resource::builder_empty()
            .with_attribute(KeyValue::new("service.name", service.to_owned()))
            .build(),
    );
    let (sender, receiver) = sync_channel(EXPORT_QUEUE);
    std::thread::Builder::new()
        .name("otlp-export".into())
        .spawn(move || export_loop(&exporter, &receiver))
        .map_err(|e| anyhow::anyhow!("starting the OTLP export thread: {e}"))?;
    EXPORT
        .set(sender)
        .map_err(|_| anyhow::anyhow!("spans are already exported"))?;
    tracing::info!("exporting spans over OTLP to {endpoint}");
    Ok(())
}

fn export_loop(exporter: &opentelemetry_otlp::SpanExporter, receiver: &Receiver<SpanData>) {
    loop {
        let Ok(first) = receiver.recv() else { return };
        let mut batch = vec![first];
        let until = Instant::now() + EXPORT_EVERY;
        while batch.len() < EXPORT_BATCH {
            match receiver.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(span) => batch.push(span),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let spans = batch.len();
        if let Err(error) = futures::executor::block_on(exporter.export(batch)) {
            tracing::warn!(spans, "exporting spans failed: {error}");
        }
    }
}

/// One finished span of a request.
pub struct Finished {
    /// Its ids.
    pub context: TraceContext,
    /// Its name.
    pub name: &'static str,
    /// `true` for the request's own span (kind server).
    pub server: bool,
    /// When it began and ended.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// Its attributes.
    pub attributes: Vec<KeyValue>,
    /// Whether it failed.
    pub error: bool,
}

/// Hands `span` to the exporter, when spans are exported.
pub fn record(span: Finished) {
    let Some(sender) = EXPORT.get() else { return };
    let flags = TraceFlags::new(span.context.flags & 1);
    let data = SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(span.context.trace_id),
            SpanId::from_bytes(span.context.span_id),
            flags,
            false,
            TraceState::default(),
        ),
        parent_span_id: span
            .context
            .parent_id
            .map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: span.server && span.context.parent_id.is_some(),
        span_kind: if span.server {
            SpanKind::Server
        } else {
            SpanKind::Internal
        },
        name: Cow::Borrowed(span.name),
        start_time: span.start,
        end_time: span.end,
        attributes: span.attributes,
        dropped_attributes_count: 0,
        events: opentelemetry_sdk::trace::SpanEvents::default(),
        links: opentelemetry_sdk::trace::SpanLinks::default(),
        status: if span.error {
            Status::error("")
        } else {
            Status::Unset
        },
        instrumentation_scope: scope().clone(),
    };
    match sender.try_send(data) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
            super::metrics::metrics().spans_dropped.inc();
        }
    }
}

/// Records a span of `name` inside `parent` that began at `start` (a monotonic
/// instant, converted) and ends now; returns its context.
pub fn record_child(
    parent: &TraceContext,
    name: &'static str,
    start: Instant,
    attributes: Vec<KeyValue>,
) -> TraceContext {
    if !exporting() {
        return *parent;
    }
    let context = parent.child();
    record_span(context, name, start, Instant::now(), attributes);
    context
}

/// Records span `context` from `start` to `end` (monotonic instants).
pub fn record_span(
    context: TraceContext,
    name: &'static str,
    start: Instant,
    end: Instant,
    attributes: Vec<KeyValue>,
) {
    if !exporting() {
        return;
    }
    let (start, end) = wall(start, end);
    record(Finished {
        context,
        name,
        server: false,
        start,
        end,
        attributes,
        error: false,
    });
}

/// Wall-clock times of two monotonic instants, measured back from now.
pub fn wall(start: Instant, end: Instant) -> (SystemTime, SystemTime) {
    let (now, wall_now) = (Instant::now(), SystemTime::now());
    let at = |i: Instant| wall_now - now.saturating_duration_since(i);
    (at(start), at(end))
}

fn scope() -> &'static opentelemetry::InstrumentationScope {
    static SCOPE: OnceLock<opentelemetry::InstrumentationScope> = OnceLock::new();
    SCOPE.get_or_init(|| {
        opentelemetry::InstrumentationScope::builder("lepton")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build()
    })
}

/// The exporter's HTTP client: ureq, on the export thread (which blocks on it).
#[derive(Debug)]
struct UreqClient(ureq::Agent);

impl opentelemetry_http::HttpClient for UreqClient {
    fn send_bytes<'life0, 'async_trait>(
        &'life0 self,
        request: http::Request<bytes::Bytes>,
    ) -> std::pin::Pin<
        Box<
            dyn Future<Output = Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError>>
                + Send
                + 'async_trait,
        >,
    >
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let mut call = self
                .0
                .request(parts.method.as_str(), &parts.uri.to_string());
            for (name, value) in &parts.headers {
                if let Ok(value) = value.to_str() {
                    call = call.set(name.as_str(), value);
                }
            }
            let response = match call.send_bytes(&body) {
                Ok(response) => response,
                // Not the body: a broken collector's answer is no log line.
                Err(ureq::Error::Status(status, _)) => {
                    return Err(format!("the collector answered {status}").into());
                }
                Err(ureq::Error::Transport(error)) => {
                    return Err(format!("{:?}", error.kind()).into());
                }
            };
            let status = response.status();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(
                &mut std::io::Read::take(response.into_reader(), 1 << 20),
                &mut bytes,
            )?;
            Ok(http::Response::builder()
                .status(status)
                .body(bytes::Bytes::from(bytes))?)
        })
    }
}

fn span_id() -> [u8; 8] {
    loop {
        let id = random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// A 64-bit value no other request of this process gets (SplitMix64 over a counter
/// seeded per process): ids, not secrets.
fn random() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        use std::hash::{BuildHasher as _, Hasher as _};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        hasher.write_u32(std::process::id());
        hasher.finish()
    });
    let mut z = seed.wrapping_add(
        STATE
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_trace_is_kept_with_a_new_span() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceContext::for_request(Some(header));
        assert_eq!(t.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            t.parent_id.map(hex::encode).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_ne!(hex::encode(t.span_id), "00f067aa0ba902b7");
        let child = t.traceparent();
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(child.ends_with("-01"));
        assert_eq!(parse(&child).map(|p| p.1), Some(t.span_id));
    }

    #[test]
    fn invalid_headers_start_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
            let t = TraceContext::for_request(Some(bad));
            assert_eq!(t.parent_id, None);
        }
        // A later version may carry more fields.
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more").is_some());
        let (a, b) = (
            TraceContext::for_request(None),
            TraceContext::for_request(None),
        );
        assert_ne!(a.trace_id, b.trace_id);
    }
}
