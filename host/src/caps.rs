//! Capabilities: what one request of one function may reach, built from its manifest entry.
//!
//! Everything is denied unless granted: the WASI context gets only the granted
//! environment variables and read-only directories, no sockets and no name lookup;
//! outgoing HTTP is checked against `allowed_outbound_hosts`; the guest's stdout
//! and stderr go to the host log, tagged with the function and the request id.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use wasmtime::component::ResourceTable;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::locked::{FunctionSpec, OutboundHost};
use crate::nn::{ModelRegistry, ModelSlot, NnCtx, NnView};
use crate::train::{TrainCtx, TrainView};

/// Longest line of guest output kept in one log record.
pub const MAX_LOG_LINE: usize = 4096;

/// Guest output (stdout and stderr together) logged per request; the rest is dropped
/// with one record saying so.
pub const MAX_LOG_BYTES: usize = 1 << 20;

/// What a function may reach, worked out once at deploy: per request only the
/// contexts are made from it ([`Grants::instance`]).
pub struct Grants {
    function: Arc<str>,
    environment: Vec<(String, String)>,
    /// Host directory (an unpacked mount blob) and guest path.
    mounts: Vec<(PathBuf, String)>,
    outbound: Arc<[OutboundHost]>,
    /// The function's open outbound requests, [`crate::egress::DEFAULT_MAX_OUTBOUND`] at most.
    outbound_slots: Arc<tokio::sync::Semaphore>,
    memory_limit: usize,
    models: Arc<HashMap<String, Arc<ModelSlot>>>,
    upload: Option<(Arc<ModelRegistry>, u64)>,
    tensor_budget: u64,
    train: TrainCtx,
    logs: Arc<crate::ops::logs::LogRing>,
    kv: crate::kv::KvCtx,
    config: Arc<wasmtime_wasi_config::WasiConfigVariables>,
}

impl Grants {
    /// Grants `kv`'s stores.
    #[must_use]
    pub fn with_kv(mut self, kv: crate::kv::KvCtx) -> Self {
        self.kv = kv;
        self
    }

    /// Grants the `wasi:config` values `config` (already resolved).
    #[must_use]
    pub fn with_config(mut self, config: impl IntoIterator<Item = (String, String)>) -> Self {
        self.config = Arc::new(config.into_iter().collect());
        self
    }

    /// The grants of `spec`: its mounts already unpacked at `mounts` (in `spec.files`
    /// order), the models and trainers it names already resolved.
    pub fn new(
        spec: &FunctionSpec,
        mounts: Vec<PathBuf>,
        models: HashMap<String, Arc<ModelSlot>>,
        upload: Option<Arc<ModelRegistry>>,
        train: TrainCtx,
        logs: Arc<crate::ops::logs::LogRing>,
    ) -> Self {
        Self {
            function: Arc::from(spec.name.as_str()),
            environment: spec.environment.clone(),
            mounts: mounts
                .into_iter()
                .zip(spec.files.iter().map(|m| m.destination.clone()))
                .collect(),
            outbound: Arc::from(spec.allowed_outbound_hosts.as_slice()),
            outbound_slots: Arc::new(tokio::sync::Semaphore::new(
                crate::egress::DEFAULT_MAX_OUTBOUND,
            )),
            memory_limit: usize::try_from(spec.memory_limit).unwrap_or(usize::MAX),
            models: Arc::new(models),
            upload: upload
                .filter(|_| spec.allow_model_upload)
                .map(|r| (r, spec.max_model_upload_size)),
            tensor_budget: spec.memory_limit,
            train,
            logs,
            kv: crate::kv::KvCtx::default(),
            config: Arc::new(wasmtime_wasi_config::WasiConfigVariables::new()),
        }
    }

    /// The state of one request's store; its guest's outbound requests carry `trace`
    /// as their parent (`traceparent`).
    pub fn instance(
        &self,
        request_id: &str,
        trace: Option<&crate::ops::trace::TraceContext>,
    ) -> anyhow::Result<InstanceState> {
        let request_id: Arc<str> = Arc::from(request_id);
        let budget = Arc::new(AtomicUsize::new(MAX_LOG_BYTES));
        let mut wasi = WasiCtxBuilder::new();
        wasi.allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .stdout(GuestLog::new(
                "stdout",
                &self.function,
                &request_id,
                &budget,
                &self.logs,
            ))
            .stderr(GuestLog::new(
                "stderr",
                &self.function,
                &request_id,
                &budget,
                &self.logs,
            ));
        for (key, value) in &self.environment {
            wasi.env(key, value);
        }
        for (source, destination) in &self.mounts {
            wasi.preopened_dir(source, destination, FsPerms::ReadOnly)
                .map_err(|e| anyhow::anyhow!("opening `{}`: {e}", source.display()))?;
        }
        Ok(InstanceState {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limits: GuestLimits {
                inner: StoreLimitsBuilder::new()
                    .memory_size(self.memory_limit)
                    .trap_on_grow_failure(false)
                    .build(),
                peak: Arc::default(),
            },
            outbound: OutboundPolicy {
                function: Arc::clone(&self.function),
                request_id,
                allowed: Arc::clone(&self.outbound),
                slots: Arc::clone(&self.outbound_slots),
                traceparent: trace.and_then(|t| http::HeaderValue::from_str(&t.traceparent()).ok()),
            },
            nn: NnCtx::new(Arc::clone(&self.models), self.upload.clone())
                .with_tensor_budget(self.tensor_budget)
                .with_trace(trace.copied()),
            train: self.train.clone().with_trace(trace.copied()),
            kv: self.kv.clone(),
            config: Arc::clone(&self.config),
        })
    }
}

/// The function's `memory_limit`, and the largest memory the guest grew to.
pub(crate) struct GuestLimits {
    inner: StoreLimits,
    /// Bytes of the largest linear memory so far (shared: read after the store is gone).
    pub(crate) peak: Arc<std::sync::atomic::AtomicUsize>,
}

impl wasmtime::ResourceLimiter for GuestLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.inner.memory_growing(current, desired, maximum)?;
        if allowed {
            self.peak.fetch_max(desired, Ordering::Relaxed);
        }
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.memory_grow_failed(error)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// The `T` of each request's `Store<T>`.
pub struct InstanceState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    pub(crate) limits: GuestLimits,
    outbound: OutboundPolicy,
    nn: NnCtx,
    train: TrainCtx,
    kv: crate::kv::KvCtx,
    config: Arc<wasmtime_wasi_config::WasiConfigVariables>,
}

impl InstanceState {
    /// The `wasi:keyvalue` view of this instance.
    pub fn kv(&mut self) -> crate::kv::KvView<'_> {
        crate::kv::KvView::new(&self.kv, &mut self.table)
    }

    /// The `wasi:config` view of this instance.
    pub fn config(&mut self) -> wasmtime_wasi_config::WasiConfig<'_> {
        wasmtime_wasi_config::WasiConfig::from(&*self.config)
    }

    /// The `wasi:nn` view of this instance.
    pub fn nn(&mut self) -> NnView<'_> {
        NnView::new(&self.nn, &mut self.table)
    }

    /// The `lepton:nn/training` view of this instance.
    pub fn train(&mut self) -> TrainView<'_> {
        TrainView::new(&self.train, &mut self.table)
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for InstanceState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outbound,
        }
    }
}

/// Decides each outgoing request against the function's `allowed_outbound_hosts`.
struct OutboundPolicy {
    function: Arc<str>,
    request_id: Arc<str>,
    allowed: Arc<[OutboundHost]>,
    slots: Arc<tokio::sync::Semaphore>,
    /// Set on outbound requests that carry none of their own.
    traceparent: Option<http::HeaderValue>,
}

impl OutboundPolicy {
    /// The allow-list entry `uri` matches, if any.
    fn allows(&self, uri: &http::Uri) -> Option<&OutboundHost> {
        let scheme = uri.scheme_str().unwrap_or("http");
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        let host = uri.host().unwrap_or_default();
        self.allowed
            .iter()
            .find(|allowed| allowed.matches(scheme, host, port))
    }
}

impl WasiHttpHooks for OutboundPolicy {
    fn send_request(
        &mut self,
        mut request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<dyn Future<Output = crate::egress::Sent> + Send> {
        let Some(allowed) = self.allows(request.uri()) else {
            tracing::warn!(
                function = %self.function,
                request_id = %self.request_id,
                "denied outbound request to {} (not in `allowed_outbound_hosts`)",
                request.uri()
            );
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        };
        // An address the entry names literally may be internal (a local service the
        // operator means to grant); a name must resolve to public addresses only.
        let literal = allowed
            .host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok();
        let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() else {
            tracing::warn!(
                function = %self.function,
                request_id = %self.request_id,
                "outbound request to {} refused: {} already open",
                request.uri(),
                crate::egress::DEFAULT_MAX_OUTBOUND
            );
            return Box::new(async { Err(wasmtime_wasi_http::Error::ConnectionLimitReached) });
        };
        let _ = fut;
        if let Some(traceparent) = &self.traceparent
            && !request
                .headers()
                .contains_key(crate::ops::trace::TRACEPARENT)
        {
            request
                .headers_mut()
                .insert(crate::ops::trace::TRACEPARENT, traceparent.clone());
        }
        Box::new(crate::egress::send(request, options, literal, permit))
    }
}

/// Guest stdout or stderr: each line becomes a log record tagged with the
/// function and the request id.
///
/// One partial line is kept per stream and request, shared by every output stream
/// the guest opens (`get-stdout()` returns a new one each call), so a line written in
/// pieces is one record; what is left without a newline is logged when the instance
/// goes.
#[derive(Clone)]
struct GuestLog {
    pending: Arc<std::sync::Mutex<PendingLine>>,
}

struct PendingLine {
    stream: &'static str,
    function: Arc<str>,
    request_id: Arc<str>,
    /// Bytes left to log for this request, shared by stdout and stderr.
    budget: Arc<AtomicUsize>,
    /// The function's log ring.
    ring: Arc<crate::ops::logs::LogRing>,
    line: Vec<u8>,
}

impl GuestLog {
    fn new(
        stream: &'static str,
        function: &Arc<str>,
        request_id: &Arc<str>,
        budget: &Arc<AtomicUsize>,
        ring: &Arc<crate::ops::logs::LogRing>,
    ) -> Self {
        Self {
            pending: Arc::new(std::sync::Mutex::new(PendingLine {
                stream,
                function: Arc::clone(function),
                request_id: Arc::clone(request_id),
                budget: Arc::clone(budget),
                ring: Arc::clone(ring),
                line: Vec::new(),
            })),
        }
    }
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(GuestLogWriter {
            pending: Arc::clone(&self.pending),
        })
    }
}

struct GuestLogWriter {
    pending: Arc<std::sync::Mutex<PendingLine>>,
}

impl PendingLine {
    /// Logs the line held (an empty one too: the guest wrote a bare newline).
    fn emit(&mut self) {
        let len = self.line.len() + 1;
        // The closure always returns `Some`, so this is the budget before this line.
        let left = self
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                Some(left.saturating_sub(len))
            })
            .unwrap_or(0);
        if left < len {
            if left > 0 {
                tracing::warn!(
                    target: "lepton::guest",
                    function = %self.function,
                    request_id = %self.request_id,
                    "guest output past {MAX_LOG_BYTES} bytes is dropped"
                );
            }
            self.line.clear();
            return;
        }
        if !crate::logging::take_guest_budget(len) {
            self.line.clear();
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        tracing::info!(
            target: "lepton::guest",
            function = %self.function,
            request_id = %self.request_id,
            stream = self.stream,
            "{text}",
        );
        self.ring
            .line(self.stream, &self.request_id, text.to_owned());
        self.line.clear();
    }

    fn write(&mut self, buf: &[u8]) {
        for &byte in buf {
            if byte == b'\n' {
                self.emit();
            } else if self.line.len() < MAX_LOG_LINE {
                self.line.push(byte);
            }
        }
    }
}

impl Drop for PendingLine {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}

impl tokio::io::AsyncWrite for GuestLogWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    #[tokio::test]
    async fn pieces_through_several_streams_are_one_record() {
        let ring = Arc::new(crate::ops::logs::LogRing::default());
        let log = GuestLog::new(
            "stderr",
            &Arc::from("f"),
            &Arc::from("r1"),
            &Arc::new(AtomicUsize::new(MAX_LOG_BYTES)),
            &ring,
        );
        for piece in [&b"one"[..], b" two", b"\n\n", b"tail"] {
            let mut stream = Box::into_pin(log.async_stream());
            stream.write_all(piece).await.expect("write");
            drop(stream);
        }
        drop(log);
        let lines: Vec<String> = ring
            .read(0, 0)
            .into_iter()
            .filter_map(|record| record.message)
            .collect();
        assert_eq!(lines, ["one two", "", "tail"]);
    }
}
