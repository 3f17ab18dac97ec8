//! One function behind a route: its pre-instantiated component, its limits and counters.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::Linker;
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi_http::WasiHttpView as _;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;

use super::body::{BodyBudget, BodyError};
use super::{Body, text, text_with};
use crate::caps::{Grants, InstanceState};
use crate::engine::Runtime;
use crate::locked::{FunctionSpec, Name};
use crate::ops::Observed;
use crate::ops::logs::RequestRecord;
use crate::ops::metrics::{FailureKind, metrics};

/// Header carrying the request id on every response of a function.
pub const REQUEST_ID_HEADER: &str = "x-lepton-request-id";

/// A function ready to serve: the component pre-instantiated once, a fresh store per request.
pub struct Function {
    app: Name,
    version: u64,
    spec: FunctionSpec,
    pre: ProxyPre<InstanceState>,
    /// The same, on the on-demand engine: used once a request's guest grew past
    /// [`LARGE_GUEST`], so large memories are returned when each request ends.
    large_pre: ProxyPre<InstanceState>,
    large: std::sync::atomic::AtomicBool,
    grants: Grants,
    engine: wasmtime::Engine,
    large_engine: wasmtime::Engine,
    long_lane: Arc<Semaphore>,
    body_budget: BodyBudget,
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
    requests: AtomicU64,
    observed: Observed,
}

/// Marks a response the function turned away (at capacity, or the node's body budget
/// spent): counted as a rejection in its statistics.
#[derive(Clone, Copy)]
struct Rejected;

enum Outcome {
    Finished(anyhow::Result<()>),
    TimedOut,
}

impl Function {
    /// Compiles (or loads from `cache_dir`) and pre-instantiates `spec`'s component,
    /// whose bytes are at `component`, as version `version` of app `app`.
    pub fn load(
        runtime: &Runtime,
        (linker, large_linker): (&Linker<InstanceState>, &Linker<InstanceState>),
        (app, version): (&Name, u64),
        spec: &FunctionSpec,
        component: &Path,
        cache_dir: &Path,
        (grants, observed): (Grants, Observed),
    ) -> anyhow::Result<Self> {
        let loaded = runtime.load_component(component, &spec.component, cache_dir)?;
        let instance_pre = linker
            .instantiate_pre(&loaded.component)
            .map_err(anyhow::Error::from)
            .context("the component imports something this host does not provide")?;
        let pre = ProxyPre::new(instance_pre)
            .map_err(anyhow::Error::from)
            .context("the component does not export `wasi:http/incoming-handler` (the wasi:http proxy world)")?;
        let large_pre = large_linker
            .instantiate_pre(&loaded.large)
            .and_then(ProxyPre::new)
            .map_err(anyhow::Error::from)
            .context("the component does not link on the on-demand engine")?;
        tracing::info!(
            app = %app,
            version,
            function = %spec.name,
            route = %spec.route,
            digest = %spec.component.short(),
            cached = loaded.from_cache,
            "loaded in {:.1?}",
            loaded.elapsed
        );
        Ok(Self {
            app: app.clone(),
            version,
            spec: spec.clone(),
            pre,
            large_pre,
            large: std::sync::atomic::AtomicBool::new(false),
            grants,
            engine: runtime.engine().clone(),
            large_engine: runtime.large_engine().clone(),
            long_lane: Arc::clone(runtime.long_lane()),
            body_budget: runtime.body_budget().clone(),
            slots: Arc::new(Semaphore::new(spec.max_concurrency as usize)),
            queued: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            observed,
        })
    }

    /// The function's resolved manifest entry.
    pub fn spec(&self) -> &FunctionSpec {
        &self.spec
    }

    /// The app it belongs to.
    pub fn app(&self) -> &Name {
        &self.app
    }

    /// The app version it belongs to.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Requests served so far (whatever their outcome).
    pub fn served(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests running now.
    pub fn in_flight(&self) -> usize {
        self.spec.max_concurrency as usize - self.slots.available_permits()
    }

    /// Runs one request through the guest, enforcing the function's limits.
    pub(crate) async fn handle(
        self: Arc<Self>,
        request: hyper::Request<Incoming>,
    ) -> hyper::Response<Body> {
        self.handle_as(request, None, None).await
    }

    /// [`Function::handle`] for a request that already has an id and a deadline (one
    /// forwarded by another node's gateway): it keeps both, and every limit applies.
    pub(crate) async fn handle_as<B>(
        self: Arc<Self>,
        request: hyper::Request<B>,
        request_id: Option<String>,
        deadline: Option<tokio::time::Instant>,
    ) -> hyper::Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::fmt::Display,
    {
        let started = Instant::now();
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.observed.metrics.requests.inc();
        let request_id = request_id.unwrap_or_else(next_request_id);
        let method = request.method().to_string();
        let path = request.uri().path().to_owned();
        let trace = crate::ops::trace::TraceContext::for_request(
            request
                .headers()
                .get(crate::ops::trace::TRACEPARENT)
                .and_then(|v| v.to_str().ok()),
        );
        let bytes_in = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        let mut accounting = Accounting {
            observed: &self.observed,
            started,
            trace,
            app: self.app.as_str(),
            record: Some(RequestRecord {
                method,
                path,
                status: CLIENT_CLOSED,
                latency_ms: 0.0,
                bytes_in,
                bytes_out: None,
                trace_id: trace.trace_hex(),
            }),
            request_id: &request_id,
        };
        let mut response = self
            .handle_inner(request, &request_id, &trace, deadline)
            .await;
        accounting.answered(
            response.status().as_u16(),
            response.extensions().get::<Rejected>().is_some(),
            hyper::body::Body::size_hint(response.body()).exact(),
        );
        if let Ok(value) = http::HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        response
    }

    async fn handle_inner<B>(
        self: &Arc<Self>,
        request: hyper::Request<B>,
        request_id: &str,
        trace: &crate::ops::trace::TraceContext,
        deadline: Option<tokio::time::Instant>,
    ) -> hyper::Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: std::fmt::Display,
    {
        let started = Instant::now();
        let own = tokio::time::Instant::now() + self.spec.timeout;
        let deadline = deadline.map_or(own, |d| d.min(own));
        let (mut parts, body) = request.into_parts();

        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.spec.max_body_size) {
            return self.too_large();
        }
        // The guest is handed the Host header as the request's authority: one that is
        // not a valid authority is the client's error (found by the raw HTTP fuzzer).
        if let Some(host) = parts.headers.get(http::header::HOST)
            && host
                .to_str()
                .ok()
                .and_then(|h| h.parse::<http::uri::Authority>().ok())
                .is_none()
        {
            return text(http::StatusCode::BAD_REQUEST, "invalid Host header\n");
        }
        // Admission comes first: a request that finds the function at capacity is
        // turned away before its body is read, and one admitted reads its body on its
        // slot, so at most `max_concurrency` bodies of a function are in memory.
        let permit = match self.acquire_slot(deadline).await {
            Slot::Free(permit) => permit,
            Slot::QueueFull => return self.at_capacity(),
            Slot::TimedOut => return self.timed_out(request_id),
        };
        // The body must arrive within the function's timeout too: a client that
        // trickles it in gets 408, not a connection held open forever.
        let read = super::body::read(body, declared, self.spec.max_body_size, &self.body_budget);
        let held = match tokio::time::timeout_at(deadline, read).await {
            Err(_elapsed) => {
                self.observed.metrics.failed(FailureKind::Timeout);
                return text(
                    http::StatusCode::REQUEST_TIMEOUT,
                    "the request body did not arrive in time\n",
                );
            }
            Ok(Ok(held)) => held,
            Ok(Err(BodyError::TooLarge)) => return self.too_large(),
            Ok(Err(BodyError::OverBudget)) => {
                self.observed.metrics.failed(FailureKind::Rejected);
                tracing::warn!(function = %self.spec.name, request_id, "request body refused: the node holds its budget of request bodies");
                let mut response = text_with(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "the node holds as many request bodies as it may; retry later\n",
                    (http::header::RETRY_AFTER, "1"),
                );
                response.extensions_mut().insert(Rejected);
                return response;
            }
            Ok(Err(BodyError::Read(error))) => {
                tracing::debug!(function = %self.spec.name, request_id, "reading the request body failed: {error}");
                return text(
                    http::StatusCode::BAD_REQUEST,
                    "could not read the request body\n",
                );
            }
        };
        let reservation = held.reservation;

        if !parts.headers.contains_key(http::header::HOST) {
            parts.headers.insert(
                http::header::HOST,
                http::HeaderValue::from_static("localhost"),
            );
        }
        let request = hyper::Request::from_parts(
            parts,
            Full::new(held.bytes)
                .map_err(|never: Infallible| -> wasmtime_wasi_http::Error { match never {} }),
        );

        let (sender, receiver) = tokio::sync::oneshot::channel();
        let this = Arc::clone(self);
        let id = request_id.to_owned();
        let trace = *trace;
        let task = tokio::spawn(async move {
            let _permit: Running = permit;
            let _reservation = reservation;
            match tokio::time::timeout_at(
                deadline,
                this.run_guest(request, sender, (&id, &trace), deadline),
            )
            .await
            {
                Ok(result) => Outcome::Finished(result),
                Err(_elapsed) => Outcome::TimedOut,
            }
        });

        match receiver.await {
            Ok(Ok(response)) => {
                tracing::debug!(function = %self.spec.name, request_id, status = %response.status(), "answered in {:.1?}", started.elapsed());
                return response.map(|body| body.boxed_unsync());
            }
            Ok(Err(code)) => {
                tracing::warn!(function = %self.spec.name, request_id, "the guest answered with an error: {code:?}");
                return self.internal_error(request_id);
            }
            Err(_) => {} // The guest ended without answering: the task says why.
        }
        match task.await {
            Ok(Outcome::TimedOut) => self.timed_out(request_id),
            // The epoch interrupt at the hard deadline: a timeout like any other.
            Ok(Outcome::Finished(Err(error))) if is_interrupt(&error) => self.timed_out(request_id),
            Ok(Outcome::Finished(Err(error))) if is_pool_exhausted(&error) => {
                tracing::warn!(function = %self.spec.name, request_id, "no free instance slot in the pool");
                self.at_capacity()
            }
            Ok(Outcome::Finished(Err(error))) => {
                tracing::error!(function = %self.spec.name, request_id, "guest failed: {error:?}");
                self.internal_error(request_id)
            }
            Ok(Outcome::Finished(Ok(()))) => {
                tracing::error!(function = %self.spec.name, request_id, "guest returned without setting a response");
                self.internal_error(request_id)
            }
            Err(join_error) => {
                tracing::error!(function = %self.spec.name, request_id, "request task failed: {join_error}");
                self.internal_error(request_id)
            }
        }
    }

    async fn run_guest(
        &self,
        request: hyper::Request<
            impl hyper::body::Body<Data = Bytes, Error = wasmtime_wasi_http::Error> + Send + 'static,
        >,
        sender: tokio::sync::oneshot::Sender<
            Result<
                hyper::Response<wasmtime_wasi_http::p2::body::HyperOutgoingBody>,
                wasmtime_wasi_http::p2::bindings::http::types::ErrorCode,
            >,
        >,
        (request_id, trace): (&str, &crate::ops::trace::TraceContext),
        deadline: tokio::time::Instant,
    ) -> anyhow::Result<()> {
        // The guest's span: its outbound requests, computes and steps are inside it.
        let guest = trace.child();
        let outbound = if crate::ops::trace::exporting() {
            guest
        } else {
            trace.passed_on()
        };
        let state = self.grants.instance(request_id, Some(&outbound))?;
        let peak = Arc::clone(&state.limits.peak);
        let _note = NotePeak(self, peak);
        let (engine, pre) = if self.large.load(Ordering::Relaxed) {
            (&self.large_engine, &self.large_pre)
        } else {
            (&self.engine, &self.pre)
        };
        let mut store = Store::new(engine, state);
        let _instance = InUse::new();
        store.limiter(|state| &mut state.limits);
        // Every epoch tick the guest yields to the executor, so a busy guest never
        // holds a worker thread for long. Once it has run for a few ticks since it was
        // last resumed (time spent waiting for a thread does not count) it is
        // long-running for the rest of the request: each further slice needs a turn in
        // the long lane, which leaves a core to fresh requests and the gateway however
        // many guests spin. Past the deadline it is interrupted (a trap, answered as a
        // timeout); the request's own timer normally fires first and drops the guest.
        let hard_deadline = deadline.into_std() + crate::engine::EPOCH_TICK * 5;
        let lane = Arc::clone(&self.long_lane);
        // The slice number and the lane turn it runs on.
        let turn: Arc<std::sync::Mutex<(u64, Option<OwnedSemaphorePermit>)>> = Arc::default();
        let base = Instant::now();
        // When the guest last got a thread back, in nanoseconds after `base`.
        let resumed = Arc::new(AtomicU64::new(0));
        let mut running_ticks = 0_u32;
        store.epoch_deadline_callback(move |_| {
            let now = Instant::now();
            if now >= hard_deadline {
                return Ok(UpdateDeadline::Interrupt);
            }
            let since = Duration::from_nanos(resumed.load(Ordering::Relaxed));
            if now.saturating_duration_since(base + since) >= crate::engine::EPOCH_TICK / 2 {
                running_ticks = running_ticks.saturating_add(1);
            }
            let resumed = Arc::clone(&resumed);
            let mark = move || {
                let at = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
                resumed.store(at, Ordering::Relaxed);
            };
            if running_ticks < crate::engine::LONG_RUNNING_TICKS {
                return Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(async move {
                        tokio::task::yield_now().await;
                        mark();
                    }),
                ));
            }
            // Give back the turn this slice ran on, and wait in line for the next.
            if let Ok(mut held) = turn.lock() {
                held.1.take();
            }
            let (lane, turn) = (Arc::clone(&lane), Arc::clone(&turn));
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    if let Ok(permit) = lane.acquire_owned().await {
                        let slice = turn.lock().map(|mut held| {
                            held.0 += 1;
                            held.1 = Some(permit);
                            held.0
                        });
                        // A slice that goes into a host call (inference, outbound HTTP,
                        // a sleep) reaches no epoch check to give its turn back: it
                        // lapses after two ticks.
                        if let Ok(slice) = slice {
                            let turn = Arc::downgrade(&turn);
                            tokio::spawn(async move {
                                tokio::time::sleep(crate::engine::EPOCH_TICK * 2).await;
                                if let Some(turn) = turn.upgrade()
                                    && let Ok(mut held) = turn.lock()
                                    && held.0 == slice
                                {
                                    held.1.take();
                                }
                            });
                        }
                    }
                    mark();
                }),
            ))
        });
        store.set_epoch_deadline(1);
        let request = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)?;
        let out = store.data_mut().http().new_response_outparam(sender)?;
        let instantiating = Instant::now();
        let proxy = pre.instantiate_async(&mut store).await?;
        self.observed
            .metrics
            .instantiate
            .observe(instantiating.elapsed().as_secs_f64());
        crate::ops::trace::record_child(trace, "instantiate", instantiating, Vec::new());
        // Recorded when the guest returns, or is dropped at its deadline.
        let _guest_span = SpanUntilDrop(guest, Instant::now());
        proxy
            .wasi_http_incoming_handler()
            .call_handle(&mut store, request, out)
            .await?;
        Ok(())
    }

    async fn acquire_slot(&self, deadline: tokio::time::Instant) -> Slot {
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            self.observed.metrics.queue.observe(0.0);
            return Slot::Free(self.running(permit));
        }
        let waiting = self.queued.fetch_add(1, Ordering::SeqCst);
        let _leave = QueueSlot(&self.queued, &self.observed.metrics.queued);
        self.observed.metrics.queued.inc();
        if waiting >= self.spec.max_queue as usize {
            return Slot::QueueFull;
        }
        let started = Instant::now();
        let slot = match tokio::time::timeout_at(deadline, Arc::clone(&self.slots).acquire_owned())
            .await
        {
            Ok(Ok(permit)) => Slot::Free(self.running(permit)),
            Ok(Err(_closed)) => Slot::QueueFull,
            Err(_elapsed) => Slot::TimedOut,
        };
        self.observed
            .metrics
            .queue
            .observe(started.elapsed().as_secs_f64());
        slot
    }

    fn running(&self, permit: OwnedSemaphorePermit) -> Running {
        self.observed.metrics.in_flight.inc();
        Running {
            _permit: permit,
            gauge: self.observed.metrics.in_flight.clone(),
        }
    }

    fn at_capacity(&self) -> hyper::Response<Body> {
        self.observed.metrics.failed(FailureKind::Rejected);
        let mut response = text_with(
            http::StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "function `{}` is at capacity; retry later\n",
                self.spec.name
            ),
            (http::header::RETRY_AFTER, "1"),
        );
        response.extensions_mut().insert(Rejected);
        response
    }

    fn too_large(&self) -> hyper::Response<Body> {
        self.observed.metrics.failed(FailureKind::TooLarge);
        text(
            http::StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "request body is larger than {} bytes\n",
                self.spec.max_body_size
            ),
        )
    }

    fn timed_out(&self, request_id: &str) -> hyper::Response<Body> {
        self.observed.metrics.failed(FailureKind::Timeout);
        tracing::warn!(function = %self.spec.name, request_id, "timed out after {:?}", self.spec.timeout);
        text(
            http::StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "function `{}` did not answer within {:?} (request id {request_id})\n",
                self.spec.name, self.spec.timeout
            ),
        )
    }

    fn internal_error(&self, request_id: &str) -> hyper::Response<Body> {
        self.observed.metrics.failed(FailureKind::Trap);
        text(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            &format!(
                "function `{}` failed; see the host log for request id {request_id}\n",
                self.spec.name
            ),
        )
    }
}

/// What waiting for a slot came to.
enum Slot {
    Free(Running),
    QueueFull,
    TimedOut,
}

/// Whether instantiation failed because the pooling allocator ran out of slots.
fn is_pool_exhausted(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.is::<wasmtime::PoolConcurrencyLimitError>())
}

/// A guest memory past which the function's later requests run on the on-demand
/// engine. Freed pool slots wait for a decommit batch of [`crate::engine::DECOMMIT_BATCH`],
/// so at most that many × this stays resident between requests.
pub const LARGE_GUEST: usize = 16 << 20;

/// When a request ends (also dropped at its deadline): a guest that grew past
/// [`LARGE_GUEST`] moves its function to the on-demand engine.
struct NotePeak<'a>(&'a Function, Arc<AtomicUsize>);

impl Drop for NotePeak<'_> {
    fn drop(&mut self) {
        let peak = self.1.load(Ordering::Relaxed);
        if peak > LARGE_GUEST && !self.0.large.swap(true, Ordering::Relaxed) {
            tracing::info!(
                function = %self.0.spec.name,
                "a request grew guest memory to {} MiB: later requests allocate memory on demand, returning it when they end",
                peak >> 20
            );
        }
    }
}

/// Whether the guest was stopped by the epoch interrupt (its hard deadline).
fn is_interrupt(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt))
}

struct QueueSlot<'a>(
    &'a AtomicUsize,
    &'a prometheus_client::metrics::gauge::Gauge,
);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        self.1.dec();
    }
}

/// A request's slot of its function, counted in `lepton_requests_in_flight` while held.
struct Running {
    _permit: OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// `text` cut to 256 bytes (a span attribute from a client).
fn cut(text: &str) -> String {
    let mut end = text.len().min(256);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// A span that ends when this is dropped.
struct SpanUntilDrop(crate::ops::trace::TraceContext, Instant);

impl Drop for SpanUntilDrop {
    fn drop(&mut self) {
        crate::ops::trace::record_span(self.0, "guest", self.1, Instant::now(), Vec::new());
    }
}

/// The status a request is recorded with when its client went away before the
/// answer (nginx's "client closed request").
pub const CLIENT_CLOSED: u16 = 499;

/// A request's statistics and log record, written once: at its answer, or with
/// [`CLIENT_CLOSED`] when the client goes away first (the future is dropped).
struct Accounting<'a> {
    observed: &'a Observed,
    started: Instant,
    trace: crate::ops::trace::TraceContext,
    app: &'a str,
    record: Option<RequestRecord>,
    request_id: &'a str,
}

impl Accounting<'_> {
    fn answered(&mut self, status: u16, rejected: bool, bytes_out: Option<u64>) {
        if let Some(record) = &mut self.record {
            record.status = status;
            record.bytes_out = bytes_out;
        }
        self.write(rejected);
    }

    fn write(&mut self, rejected: bool) {
        let Some(mut record) = self.record.take() else {
            return;
        };
        let elapsed = self.started.elapsed();
        record.latency_ms = elapsed.as_secs_f64() * 1e3;
        self.observed
            .metrics
            .answered(record.status, elapsed.as_secs_f64());
        self.observed
            .window
            .record(record.status, rejected, elapsed);
        if crate::ops::trace::exporting() {
            use opentelemetry::KeyValue;
            let (start, end) = crate::ops::trace::wall(self.started, Instant::now());
            crate::ops::trace::record(crate::ops::trace::Finished {
                context: self.trace,
                name: "request",
                server: true,
                start,
                end,
                attributes: vec![
                    KeyValue::new("http.request.method", cut(&record.method)),
                    KeyValue::new("url.path", cut(&record.path)),
                    KeyValue::new("http.response.status_code", i64::from(record.status)),
                    KeyValue::new("lepton.app", self.app.to_owned()),
                    KeyValue::new(
                        "lepton.function",
                        self.observed.metrics.function().to_owned(),
                    ),
                    KeyValue::new("lepton.request_id", self.request_id.to_owned()),
                ],
                error: record.status >= 500,
            });
        }
        self.observed.logs.request(self.request_id, record);
    }
}

impl Drop for Accounting<'_> {
    fn drop(&mut self) {
        self.write(false);
    }
}

/// One live component instance, counted in `lepton_instances_in_use`.
struct InUse;

impl InUse {
    fn new() -> Self {
        metrics().instances_in_use.inc();
        Self
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        metrics().instances_in_use.dec();
    }
}

/// A process-unique request id: a per-process prefix and a counter.
pub(crate) fn next_request_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let prefix = *PREFIX.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        nanos ^ std::process::id().rotate_left(16)
    });
    format!(
        "{prefix:08x}-{:08x}",
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}
