//! `wasi:nn` for guests: models loaded once per node, shared by every instance.
//!
//! A function reaches only the models its manifest grants (`models = [...]`):
//! `load-by-name` of any other name fails with `not-found`, whether or not the node
//! has such a model. `load` from bytes is denied unless the function sets
//! `allow_model_upload = true`, and is capped by `max_model_upload_size`.
//!
//! `compute` validates its inputs against the graph (names, types, shapes, byte
//! lengths: `invalid-argument` otherwise), then runs on a pooled ONNX Runtime session
//! on a blocking thread, so a long inference never holds an async worker and
//! requests to one model run in parallel, up to its `sessions`. With `batch` set,
//! concurrent requests are stacked along dimension 0 into one run and split back.

mod batch;
mod inspect;
mod onnx;
mod tensor;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use arc_swap::ArcSwap;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

pub use self::inspect::{UPLOAD_OPERATORS, check as inspect_model};
pub use self::onnx::{Io, ORT_LIBRARY, OnnxModel, OnnxRuntime, Source};
pub use self::tensor::{
    ElementType, MAX_BYTES_ELEMENTS, Tensor, byte_element_count, byte_elements,
};
pub use crate::bindings::wasi::nn::errors::ErrorCode;
pub use crate::bindings::wasi::nn::tensor::TensorType;
use crate::bindings::wasi::nn::{errors, graph, inference, tensor as wit_tensor};
use crate::locked::{Digest, ModelSpec, Name, Target};
use graph::{ExecutionTarget, GraphEncoding};

/// A guest-visible `wasi:nn` error: a code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NnError {
    /// The `wasi:nn` error code.
    pub code: ErrorCode,
    /// What went wrong.
    pub message: String,
}

impl NnError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: String) -> Self {
        Self { code, message }
    }
}

/// A model in the registry: the ONNX model, and its batcher when batching is on.
pub struct Model {
    onnx: Arc<OnnxModel>,
    batcher: Option<batch::Batcher>,
    requests: std::sync::atomic::AtomicU64,
    spec: ModelSpec,
}

impl Model {
    /// The spec it was loaded with (for an uploaded model: a CPU placeholder).
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Inference requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The ONNX model.
    pub fn onnx(&self) -> &Arc<OnnxModel> {
        &self.onnx
    }

    /// Runs one inference (batched with concurrent ones when configured).
    pub async fn compute(
        &self,
        inputs: Vec<(String, Tensor)>,
        trace: Option<crate::ops::trace::TraceContext>,
    ) -> Result<Vec<(String, Tensor)>, NnError> {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.onnx.metrics().requests.inc();
        match &self.batcher {
            Some(batcher) => {
                self.onnx.validate(&inputs)?;
                batcher.run(inputs, trace).await
            }
            None => self.onnx.run(inputs, trace).await,
        }
    }
}

/// What shares one loaded model: the same bytes run with the same settings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ModelKey {
    file: Digest,
    target: Target,
    batch: Option<crate::locked::BatchSpec>,
    sessions: u32,
    threads: u32,
}

impl ModelKey {
    fn of(spec: &ModelSpec) -> Self {
        Self {
            file: spec.file.clone(),
            target: spec.target,
            batch: spec.batch,
            sessions: spec.sessions(),
            threads: spec.threads,
        }
    }
}

/// The node's loaded models, shared by content digest: two apps (or two versions)
/// naming the same ONNX file with the same settings share one loaded model. The
/// registry holds models weakly: a model no active version and no request holds any
/// more is unloaded (its sessions' threads end).
pub struct ModelRegistry {
    runtime: OnnxRuntime,
    loaded: std::sync::Mutex<HashMap<ModelKey, Weak<Model>>>,
}

impl ModelRegistry {
    /// A registry on `runtime`, with nothing loaded yet.
    pub fn new(runtime: OnnxRuntime) -> Self {
        Self {
            runtime,
            loaded: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The loaded model for `spec`, loading it from `path` unless one with the same
    /// bytes and settings is resident. Call it inside a tokio runtime when it batches.
    pub fn get_or_load(&self, spec: &ModelSpec, path: &Path) -> anyhow::Result<Arc<Model>> {
        let key = ModelKey::of(spec);
        if let Some(model) = self.lock().get(&key).and_then(Weak::upgrade) {
            return Ok(model);
        }
        let model = self.load(spec, &Source::File(path))?;
        self.lock().insert(key, Arc::downgrade(&model));
        Ok(model)
    }

    /// Loads `spec`'s settings on `source`, not shared with anything.
    pub fn load(&self, spec: &ModelSpec, source: &Source<'_>) -> anyhow::Result<Arc<Model>> {
        let started = Instant::now();
        let onnx = OnnxModel::load(
            &self.runtime,
            spec.name.as_str(),
            source,
            spec.target,
            spec.sessions(),
            spec.threads,
        )?;
        let onnx = Arc::new(onnx);
        tracing::info!(
            model = %spec.name,
            digest = %spec.file.short(),
            target = ?onnx.target(),
            sessions = spec.sessions(),
            batch = ?spec.batch,
            "loaded in {:.1?}",
            started.elapsed()
        );
        let batcher = spec
            .batch
            .map(|b| batch::Batcher::spawn(Arc::clone(&onnx), b));
        Ok(Arc::new(Model {
            onnx,
            batcher,
            requests: 0.into(),
            spec: spec.clone(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ModelKey, Weak<Model>>> {
        self.loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every model resident now (loaded from a file and still used).
    pub fn resident(&self) -> Vec<Arc<Model>> {
        let mut loaded = self.lock();
        loaded.retain(|_, weak| weak.strong_count() > 0);
        loaded.values().filter_map(Weak::upgrade).collect()
    }

    /// The ONNX Runtime in use.
    pub fn runtime(&self) -> &OnnxRuntime {
        &self.runtime
    }
}

/// A model name of one app version: the model it serves now. A trainer's `publish`
/// swaps what the slot holds; requests that hold the old model finish on it.
pub struct ModelSlot {
    spec: ModelSpec,
    current: ArcSwap<Model>,
    /// Requests and runs of the models this slot served before the current one, so
    /// its counters never go backwards when a publish replaces the model.
    retired: std::sync::Mutex<(u64, u64)>,
}

impl ModelSlot {
    /// A slot serving `model`.
    pub fn new(spec: ModelSpec, model: Arc<Model>) -> Self {
        Self {
            spec,
            current: ArcSwap::new(model),
            retired: std::sync::Mutex::new((0, 0)),
        }
    }

    /// Inference requests served through this slot, whichever model served them.
    pub fn requests(&self) -> u64 {
        let retired = self
            .retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        retired.0 + self.current().requests()
    }

    /// Backend runs through this slot (a batch is one run).
    pub fn runs(&self) -> u64 {
        let retired = self
            .retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        retired.1 + self.current().onnx().runs()
    }

    /// The model served now.
    pub fn current(&self) -> Arc<Model> {
        self.current.load_full()
    }

    /// Serves `model` from now on.
    pub fn replace(&self, model: Arc<Model>) {
        // Under the lock, so that a reader sees old + retired or new + retired, never
        // a count that went down.
        let mut retired = self
            .retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = self.current.swap(model);
        retired.0 += old.requests();
        retired.1 += old.onnx().runs();
    }

    /// The spec the slot was made for.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }
}

/// A `wasi:nn` graph resource.
pub struct Graph {
    model: Arc<Model>,
}

/// A `wasi:nn` graph-execution-context resource.
pub struct ExecutionContext {
    model: Arc<Model>,
}

/// What one instance may reach through `wasi:nn`.
pub struct NnCtx {
    /// The granted models, by name: nothing else is loadable by name.
    granted: Arc<HashMap<String, Arc<ModelSlot>>>,
    /// Where `load` from bytes goes and its size cap, when the function allows it.
    upload: Option<(Arc<ModelRegistry>, u64)>,
    /// Bytes of tensor data this instance may hold on the host at once.
    max_tensor_bytes: u64,
    tensor_bytes: AtomicU64,
    uploads: AtomicU64,
    /// The guest's span, when spans are exported.
    trace: Option<crate::ops::trace::TraceContext>,
}

/// Models one request may load from bytes (each is a full ONNX Runtime session).
pub const MAX_UPLOADS_PER_REQUEST: u64 = 2;

/// Default cap on the tensor data an instance holds on the host (see [`NnCtx::with_tensor_budget`]).
pub const DEFAULT_TENSOR_BUDGET: u64 = 128 << 20;

impl NnCtx {
    /// Grants exactly the models in `granted`; `load` from bytes through `upload`'s
    /// registry, up to its size, when given.
    pub fn new(
        granted: Arc<HashMap<String, Arc<ModelSlot>>>,
        upload: Option<(Arc<ModelRegistry>, u64)>,
    ) -> Self {
        Self {
            granted,
            upload,
            max_tensor_bytes: DEFAULT_TENSOR_BUDGET,
            tensor_bytes: AtomicU64::new(0),
            uploads: AtomicU64::new(0),
            trace: None,
        }
    }

    /// Records each `compute` (and its queue and run) inside `trace`.
    #[must_use]
    pub fn with_trace(mut self, trace: Option<crate::ops::trace::TraceContext>) -> Self {
        self.trace = trace.filter(|_| crate::ops::trace::exporting());
        self
    }

    /// Caps the tensor data the instance holds on the host at `bytes` (the function's
    /// `memory_limit`: a guest cannot make the host hold more than it could itself).
    #[must_use]
    pub fn with_tensor_budget(mut self, bytes: u64) -> Self {
        self.max_tensor_bytes = bytes;
        self
    }

    /// Takes `bytes` from the tensor budget, or says how it would be exceeded.
    fn charge(&self, bytes: usize) -> Result<(), String> {
        let bytes = bytes as u64;
        self.tensor_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.max_tensor_bytes)
            })
            .map(drop)
            .map_err(|used| {
                format!(
                    "tensors held on the host would exceed {} bytes ({used} in use, {bytes} more asked); drop some first",
                    self.max_tensor_bytes
                )
            })
    }

    fn refund(&self, bytes: usize) {
        let _ = self
            .tensor_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(bytes as u64))
            });
    }
}

/// A borrowed view of an instance's `wasi:nn` state; the host traits are implemented on it.
pub struct NnView<'a> {
    ctx: &'a NnCtx,
    table: &'a mut ResourceTable,
}

impl<'a> NnView<'a> {
    /// A view over `ctx` and the store's resource table.
    pub fn new(ctx: &'a NnCtx, table: &'a mut ResourceTable) -> Self {
        Self { ctx, table }
    }

    fn fail<T>(
        &mut self,
        code: ErrorCode,
        message: String,
    ) -> wasmtime::Result<Result<T, Resource<NnError>>> {
        tracing::debug!(?code, "wasi-nn error: {message}");
        Ok(Err(self.table.push(NnError::new(code, message))?))
    }
}

struct HasNn;

impl HasData for HasNn {
    type Data<'a> = NnView<'a>;
}

/// Adds `wasi:nn` to `linker`; `view` hands out each store's [`NnView`].
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> NnView<'_>,
) -> wasmtime::Result<()> {
    graph::add_to_linker::<T, HasNn>(linker, view)?;
    wit_tensor::add_to_linker::<T, HasNn>(linker, view)?;
    inference::add_to_linker::<T, HasNn>(linker, view)?;
    errors::add_to_linker::<T, HasNn>(linker, view)?;
    Ok(())
}

impl graph::Host for NnView<'_> {
    async fn load(
        &mut self,
        builders: Vec<graph::GraphBuilder>,
        encoding: GraphEncoding,
        target: ExecutionTarget,
    ) -> wasmtime::Result<Result<Resource<Graph>, Resource<NnError>>> {
        let Some((registry, max_upload)) = self.ctx.upload.clone() else {
            return self.fail(
                ErrorCode::Security,
                "loading a model from bytes is not allowed for this function (`allow_model_upload`)".into(),
            );
        };
        if !matches!(encoding, GraphEncoding::Onnx | GraphEncoding::Autodetect) {
            return self.fail(
                ErrorCode::InvalidEncoding,
                format!("{encoding:?} is not supported; use onnx"),
            );
        }
        let count = builders.len();
        let mut builders = builders.into_iter();
        let (Some(bytes), None) = (builders.next(), builders.next()) else {
            return self.fail(
                ErrorCode::InvalidArgument,
                format!("an ONNX graph is one builder, got {count}"),
            );
        };
        if bytes.len() as u64 > max_upload {
            return self.fail(
                ErrorCode::TooLarge,
                format!(
                    "model is {} bytes; the limit is {max_upload} (`max_model_upload_size`)",
                    bytes.len()
                ),
            );
        }
        if self.ctx.uploads.fetch_add(1, Ordering::Relaxed) >= MAX_UPLOADS_PER_REQUEST {
            return self.fail(
                ErrorCode::TooLarge,
                format!(
                    "at most {MAX_UPLOADS_PER_REQUEST} models may be loaded from bytes per request"
                ),
            );
        }
        let target = if matches!(target, ExecutionTarget::Gpu) {
            Target::Gpu
        } else {
            Target::Cpu
        };
        let spec = ModelSpec {
            name: Name::new("uploaded").map_err(wasmtime::Error::msg)?,
            file: Digest::of(&bytes),
            target,
            batch: None,
            sessions: Some(1),
            threads: 1,
            protocol: None,
            token_env: None,
        };
        let loaded =
            tokio::task::spawn_blocking(move || registry.load(&spec, &Source::Bytes(&bytes))).await;
        match loaded {
            Ok(Ok(model)) => Ok(Ok(self.table.push(Graph { model })?)),
            Ok(Err(error)) => self.fail(ErrorCode::InvalidEncoding, format!("{error:#}")),
            Err(error) => self.fail(ErrorCode::RuntimeError, error.to_string()),
        }
    }

    fn load_by_name(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<Resource<Graph>, Resource<NnError>>> {
        // Ungranted and unknown names answer alike, with no hint that something by
        // that name exists on the node.
        match self.ctx.granted.get(&name).map(|slot| slot.current()) {
            Some(model) => Ok(Ok(self.table.push(Graph { model })?)),
            None => self.fail(ErrorCode::NotFound, format!("no model named {name:?}")),
        }
    }
}

impl graph::HostGraph for NnView<'_> {
    fn init_execution_context(
        &mut self,
        graph: Resource<Graph>,
    ) -> wasmtime::Result<Result<Resource<ExecutionContext>, Resource<NnError>>> {
        let model = Arc::clone(&self.table.get(&graph)?.model);
        Ok(Ok(self.table.push(ExecutionContext { model })?))
    }

    fn drop(&mut self, graph: Resource<Graph>) -> wasmtime::Result<()> {
        self.table.delete(graph)?;
        Ok(())
    }
}

impl inference::Host for NnView<'_> {}

impl inference::HostGraphExecutionContext for NnView<'_> {
    async fn compute(
        &mut self,
        context: Resource<ExecutionContext>,
        inputs: Vec<(String, Resource<Tensor>)>,
    ) -> wasmtime::Result<Result<Vec<(String, Resource<Tensor>)>, Resource<NnError>>> {
        let model = Arc::clone(&self.table.get(&context)?.model);
        let tensors = tensors_from_table(self.table, inputs)?;
        let span = self
            .ctx
            .trace
            .map(|t| (t.child(), std::time::Instant::now()));
        let computed = model.compute(tensors, span.map(|s| s.0)).await;
        if let Some((span, started)) = span {
            crate::ops::trace::record_span(
                span,
                "wasi-nn compute",
                started,
                std::time::Instant::now(),
                vec![opentelemetry::KeyValue::new(
                    "lepton.model",
                    model.spec().name.to_string(),
                )],
            );
        }
        match computed {
            Ok(outputs) => {
                if let Some((name, tensor)) = outputs.iter().find(|(_, t)| t.ty.wasi().is_none()) {
                    return self.fail(
                        ErrorCode::UnsupportedOperation,
                        format!(
                            "output `{name}` is {}, which wasi-nn has no tensor type for",
                            tensor.ty
                        ),
                    );
                }
                let bytes = outputs.iter().map(|(_, t)| t.data.len()).sum();
                if let Err(message) = self.ctx.charge(bytes) {
                    return self.fail(ErrorCode::TooLarge, message);
                }
                let mut resources = Vec::with_capacity(outputs.len());
                for (name, tensor) in outputs {
                    resources.push((name, self.table.push(tensor)?));
                }
                Ok(Ok(resources))
            }
            Err(error) => self.fail(error.code, error.message),
        }
    }

    fn drop(&mut self, context: Resource<ExecutionContext>) -> wasmtime::Result<()> {
        self.table.delete(context)?;
        Ok(())
    }
}

impl wit_tensor::Host for NnView<'_> {}

impl wit_tensor::HostTensor for NnView<'_> {
    fn new(
        &mut self,
        dims: Vec<u32>,
        ty: TensorType,
        data: Vec<u8>,
    ) -> wasmtime::Result<Resource<Tensor>> {
        // A length that does not match the dimensions is reported by `compute`.
        // Constructors cannot fail in WIT: past the budget the guest traps (500).
        self.ctx.charge(data.len()).map_err(wasmtime::Error::msg)?;
        Ok(self.table.push(Tensor {
            dims,
            ty: ty.into(),
            data,
        })?)
    }

    fn dimensions(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&tensor)?.dims.clone())
    }

    fn ty(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<TensorType> {
        // Tensors a guest holds are its own or outputs checked by `compute`.
        let ty = self.table.get(&tensor)?.ty;
        ty.wasi()
            .ok_or_else(|| wasmtime::Error::msg(format!("{ty} is not a wasi-nn type")))
    }

    fn data(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&tensor)?.data.clone())
    }

    fn drop(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<()> {
        let tensor = self.table.delete(tensor)?;
        self.ctx.refund(tensor.data.len());
        Ok(())
    }
}

impl errors::Host for NnView<'_> {}

impl errors::HostError for NnView<'_> {
    fn code(&mut self, error: Resource<NnError>) -> wasmtime::Result<ErrorCode> {
        Ok(self.table.get(&error)?.code)
    }

    fn data(&mut self, error: Resource<NnError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&error)?.message.clone())
    }

    fn drop(&mut self, error: Resource<NnError>) -> wasmtime::Result<()> {
        self.table.delete(error)?;
        Ok(())
    }
}

/// Copies the tensors named by `inputs` out of `table` (for a run or a training step).
pub(crate) fn tensors_from_table(
    table: &ResourceTable,
    inputs: Vec<(String, Resource<Tensor>)>,
) -> wasmtime::Result<Vec<(String, Tensor)>> {
    inputs
        .into_iter()
        .map(|(name, t)| Ok((name, table.get(&t)?.clone())))
        .collect()
}
