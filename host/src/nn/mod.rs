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
mod onnx;
mod tensor;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use dashmap::DashMap;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

pub use self::onnx::{Io, ORT_LIBRARY, OnnxModel, OnnxRuntime, Source};
pub use self::tensor::{Tensor, element_size};
pub use crate::bindings::wasi::nn::errors::ErrorCode;
pub use crate::bindings::wasi::nn::tensor::TensorType;
use crate::bindings::lepton::nn::training;
use crate::bindings::wasi::nn::{errors, graph, inference, tensor as wit_tensor};
use crate::manifest::{Deployment, ModelSpec, Target};
use crate::train::{TrainerRegistry, TrainerResource};
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
}

impl Model {
    /// The ONNX model.
    pub fn onnx(&self) -> &Arc<OnnxModel> {
        &self.onnx
    }

    /// Runs one inference (batched with concurrent ones when configured).
    pub async fn compute(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, NnError> {
        self.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &self.batcher {
            Some(batcher) => {
                self.onnx.validate(&inputs)?;
                batcher.run(inputs).await
            }
            None => self.onnx.run(inputs).await,
        }
    }
}

/// Every model of the node, by name; loaded once, shared by all instances.
pub struct ModelRegistry {
    runtime: OnnxRuntime,
    models: DashMap<String, Arc<Model>>,
    specs: Vec<ModelSpec>,
    /// Where published weights are kept, so they outlive a restart.
    published_dir: PathBuf,
    /// One publish at a time: each swaps the model and then writes its file.
    publishing: std::sync::Mutex<()>,
}

impl ModelRegistry {
    /// Loads ONNX Runtime (see [`OnnxRuntime::locate`]) and every model of `deployment`:
    /// the weights a trainer last published for it (kept under `state_dir`) when the
    /// manifest still names the same file, else the file. Must run inside a tokio
    /// runtime when a model batches.
    pub fn load(deployment: &Deployment, state_dir: &Path) -> anyhow::Result<Self> {
        let manifest_dir = deployment.manifest_path.parent().unwrap_or(Path::new("."));
        let library = OnnxRuntime::locate(manifest_dir)?;
        let runtime = OnnxRuntime::load(&library)?;
        tracing::info!(library = %library.display(), "ONNX Runtime loaded");
        let registry = Self {
            runtime,
            models: DashMap::new(),
            specs: deployment.models.clone(),
            published_dir: state_dir.join("models"),
            publishing: std::sync::Mutex::new(()),
        };
        for spec in &deployment.models {
            let published = registry.published_path(spec);
            let restored = published.is_file()
                && match registry.insert(spec, &Source::File(&published)) {
                    Ok(()) => {
                        tracing::info!(model = %spec.name, "serving the weights last published for it");
                        true
                    }
                    Err(error) => {
                        tracing::warn!(model = %spec.name, path = %published.display(), "ignoring published weights: {error:#}");
                        false
                    }
                };
            if !restored {
                registry.insert(spec, &Source::File(&spec.path))?;
            }
        }
        Ok(registry)
    }

    /// Published weights of `spec`, named after the file they replace: a new file in
    /// the manifest starts afresh.
    fn published_path(&self, spec: &ModelSpec) -> PathBuf {
        self.published_dir.join(format!("{}-{}.published.onnx", spec.name, &spec.digest[..16]))
    }

    /// Replaces model `name` with the ONNX graph `bytes` (loaded with the model's
    /// settings) and keeps them for the next start; requests that already hold the old
    /// one finish on it. Call it inside a tokio runtime when the model batches.
    pub fn replace(&self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let spec = self.specs.iter().find(|s| s.name == name).with_context(|| format!("no model named {name:?}"))?;
        let _one_at_a_time = self.publishing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        self.insert(spec, &Source::Bytes(bytes))?;
        let path = self.published_path(spec);
        std::fs::create_dir_all(&self.published_dir)
            .with_context(|| format!("creating `{}`", self.published_dir.display()))?;
        crate::train::write_atomically(&path, bytes)
    }

    fn insert(&self, spec: &ModelSpec, source: &Source<'_>) -> anyhow::Result<()> {
        let started = Instant::now();
        let onnx = OnnxModel::load(&self.runtime, &spec.name, source, spec.target, spec.sessions, spec.threads)
            .with_context(|| format!("model `{}`", spec.name))?;
        let onnx = Arc::new(onnx);
        tracing::info!(
            model = %spec.name,
            digest = %&spec.digest[..12],
            target = ?onnx.target(),
            sessions = spec.sessions,
            batch = ?spec.batch,
            "loaded in {:.1?}",
            started.elapsed()
        );
        let batcher = spec.batch.map(|b| batch::Batcher::spawn(Arc::clone(&onnx), b));
        self.models.insert(spec.name.clone(), Arc::new(Model { onnx, batcher, requests: 0.into() }));
        Ok(())
    }

    /// The model named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Model>> {
        self.models.get(name).map(|m| Arc::clone(m.value()))
    }

    /// Appends each model's counters in the Prometheus text format.
    pub fn write_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let mut names: Vec<String> = self.models.iter().map(|m| m.key().clone()).collect();
        names.sort();
        for name in names {
            if let Some(model) = self.get(&name) {
                let requests = model.requests.load(std::sync::atomic::Ordering::Relaxed);
                let _ = writeln!(out, "lepton_model_requests_total{{model=\"{name}\"}} {requests}");
                let _ = writeln!(out, "lepton_model_runs_total{{model=\"{name}\"}} {}", model.onnx.runs());
            }
        }
    }

    /// The ONNX Runtime in use.
    pub fn runtime(&self) -> &OnnxRuntime {
        &self.runtime
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
    registry: Option<Arc<ModelRegistry>>,
    granted: Arc<[String]>,
    allow_upload: bool,
    max_upload: u64,
    trainers: Option<Arc<TrainerRegistry>>,
    granted_trainers: Arc<[String]>,
    /// Bytes of tensor data this instance may hold on the host at once.
    max_tensor_bytes: u64,
    tensor_bytes: AtomicU64,
    uploads: AtomicU64,
}

/// Models one request may load from bytes (each is a full ONNX Runtime session).
pub const MAX_UPLOADS_PER_REQUEST: u64 = 2;

/// Default cap on the tensor data an instance holds on the host (see [`NnCtx::with_tensor_budget`]).
pub const DEFAULT_TENSOR_BUDGET: u64 = 128 << 20;

impl NnCtx {
    /// Grants `granted` models of `registry`; uploads when `allow_upload`, up to `max_upload` bytes.
    pub fn new(registry: Option<Arc<ModelRegistry>>, granted: Arc<[String]>, allow_upload: bool, max_upload: u64) -> Self {
        Self {
            registry,
            granted,
            allow_upload,
            max_upload,
            trainers: None,
            granted_trainers: Arc::from([]),
            max_tensor_bytes: DEFAULT_TENSOR_BUDGET,
            tensor_bytes: AtomicU64::new(0),
            uploads: AtomicU64::new(0),
        }
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
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| Some(used.saturating_sub(bytes as u64)));
    }

    /// Also grants `granted` trainers of `trainers`.
    #[must_use]
    pub fn with_trainers(mut self, trainers: Option<Arc<TrainerRegistry>>, granted: Arc<[String]>) -> Self {
        self.trainers = trainers;
        self.granted_trainers = granted;
        self
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

    fn fail<T>(&mut self, code: ErrorCode, message: String) -> wasmtime::Result<Result<T, Resource<NnError>>> {
        tracing::debug!(?code, "wasi-nn error: {message}");
        Ok(Err(self.table.push(NnError::new(code, message))?))
    }
}

/// `lookup()` when `name` is granted, else `None`: ungranted and unknown names answer
/// alike, with no hint that something by that name exists on the node.
fn granted<T>(grants: &[String], name: &str, lookup: impl FnOnce() -> Option<T>) -> Option<T> {
    grants.iter().any(|granted| granted == name).then(lookup).flatten()
}

struct HasNn;

impl HasData for HasNn {
    type Data<'a> = NnView<'a>;
}

/// Adds `wasi:nn` to `linker`; `view` hands out each store's [`NnView`].
pub fn add_to_linker<T: Send + 'static>(linker: &mut Linker<T>, view: fn(&mut T) -> NnView<'_>) -> wasmtime::Result<()> {
    graph::add_to_linker::<T, HasNn>(linker, view)?;
    wit_tensor::add_to_linker::<T, HasNn>(linker, view)?;
    inference::add_to_linker::<T, HasNn>(linker, view)?;
    errors::add_to_linker::<T, HasNn>(linker, view)?;
    training::add_to_linker::<T, HasNn>(linker, view)?;
    Ok(())
}

impl graph::Host for NnView<'_> {
    async fn load(
        &mut self,
        builders: Vec<graph::GraphBuilder>,
        encoding: GraphEncoding,
        target: ExecutionTarget,
    ) -> wasmtime::Result<Result<Resource<Graph>, Resource<NnError>>> {
        if !self.ctx.allow_upload {
            return self.fail(
                ErrorCode::Security,
                "loading a model from bytes is not allowed for this function (`allow_model_upload`)".into(),
            );
        }
        let Some(registry) = self.ctx.registry.clone() else {
            return self.fail(ErrorCode::UnsupportedOperation, "this node has no inference backend".into());
        };
        if !matches!(encoding, GraphEncoding::Onnx | GraphEncoding::Autodetect) {
            return self.fail(ErrorCode::InvalidEncoding, format!("{encoding:?} is not supported; use onnx"));
        }
        let count = builders.len();
        let mut builders = builders.into_iter();
        let (Some(bytes), None) = (builders.next(), builders.next()) else {
            return self.fail(ErrorCode::InvalidArgument, format!("an ONNX graph is one builder, got {count}"));
        };
        if bytes.len() as u64 > self.ctx.max_upload {
            return self.fail(
                ErrorCode::TooLarge,
                format!("model is {} bytes; the limit is {} (`max_model_upload_size`)", bytes.len(), self.ctx.max_upload),
            );
        }
        if self.ctx.uploads.fetch_add(1, Ordering::Relaxed) >= MAX_UPLOADS_PER_REQUEST {
            return self.fail(
                ErrorCode::TooLarge,
                format!("at most {MAX_UPLOADS_PER_REQUEST} models may be loaded from bytes per request"),
            );
        }
        let target = if matches!(target, ExecutionTarget::Gpu) { Target::Gpu } else { Target::Cpu };
        let loaded = tokio::task::spawn_blocking(move || {
            OnnxModel::load(registry.runtime(), "uploaded", &Source::Bytes(&bytes), target, 1, 1)
        })
        .await;
        match loaded {
            Ok(Ok(onnx)) => {
                let model = Arc::new(Model { onnx: Arc::new(onnx), batcher: None, requests: 0.into() });
                Ok(Ok(self.table.push(Graph { model })?))
            }
            Ok(Err(error)) => self.fail(ErrorCode::InvalidEncoding, format!("{error:#}")),
            Err(error) => self.fail(ErrorCode::RuntimeError, error.to_string()),
        }
    }

    fn load_by_name(&mut self, name: String) -> wasmtime::Result<Result<Resource<Graph>, Resource<NnError>>> {
        let model = granted(&self.ctx.granted, &name, || self.ctx.registry.as_ref().and_then(|r| r.get(&name)));
        match model {
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
        let tensors = self.tensors(inputs)?;
        match model.compute(tensors).await {
            Ok(outputs) => {
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
    fn new(&mut self, dims: Vec<u32>, ty: TensorType, data: Vec<u8>) -> wasmtime::Result<Resource<Tensor>> {
        // A length that does not match the dimensions is reported by `compute`.
        // Constructors cannot fail in WIT: past the budget the guest traps (500).
        self.ctx.charge(data.len()).map_err(wasmtime::Error::msg)?;
        Ok(self.table.push(Tensor { dims, ty, data })?)
    }

    fn dimensions(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&tensor)?.dims.clone())
    }

    fn ty(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<TensorType> {
        Ok(self.table.get(&tensor)?.ty)
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

impl NnView<'_> {
    fn tensors(&self, inputs: Vec<(String, Resource<Tensor>)>) -> wasmtime::Result<Vec<(String, Tensor)>> {
        inputs.into_iter().map(|(name, t)| Ok((name, self.table.get(&t)?.clone()))).collect()
    }

    /// A training step (`update`) or an evaluation, on tensors copied out of the table.
    async fn loss(
        &mut self,
        trainer: Resource<TrainerResource>,
        inputs: Vec<(String, Resource<Tensor>)>,
        targets: Resource<Tensor>,
        update: bool,
    ) -> wasmtime::Result<Result<f32, Resource<NnError>>> {
        let handle = Arc::clone(&self.table.get(&trainer)?.0);
        let inputs = self.tensors(inputs)?;
        let targets = self.table.get(&targets)?.clone();
        let result = if update { handle.step(inputs, targets).await } else { handle.evaluate(inputs, targets).await };
        self.answer(result)
    }

    fn answer<T>(&mut self, result: Result<T, NnError>) -> wasmtime::Result<Result<T, Resource<NnError>>> {
        match result {
            Ok(value) => Ok(Ok(value)),
            Err(error) => self.fail(error.code, error.message),
        }
    }
}

impl training::Host for NnView<'_> {
    fn open(&mut self, name: String) -> wasmtime::Result<Result<Resource<TrainerResource>, Resource<NnError>>> {
        let trainer = granted(&self.ctx.granted_trainers, &name, || self.ctx.trainers.as_ref().and_then(|t| t.get(&name)));
        match trainer {
            Some(trainer) => Ok(Ok(self.table.push(TrainerResource(trainer))?)),
            None => self.fail(ErrorCode::NotFound, format!("no trainer named {name:?}")),
        }
    }
}

impl training::HostTrainer for NnView<'_> {
    async fn step(
        &mut self,
        trainer: Resource<TrainerResource>,
        inputs: Vec<(String, Resource<Tensor>)>,
        targets: Resource<Tensor>,
    ) -> wasmtime::Result<Result<f32, Resource<NnError>>> {
        self.loss(trainer, inputs, targets, true).await
    }

    async fn evaluate(
        &mut self,
        trainer: Resource<TrainerResource>,
        inputs: Vec<(String, Resource<Tensor>)>,
        targets: Resource<Tensor>,
    ) -> wasmtime::Result<Result<f32, Resource<NnError>>> {
        self.loss(trainer, inputs, targets, false).await
    }

    fn steps(&mut self, trainer: Resource<TrainerResource>) -> wasmtime::Result<u64> {
        Ok(Arc::clone(&self.table.get(&trainer)?.0).steps())
    }

    async fn export(&mut self, trainer: Resource<TrainerResource>) -> wasmtime::Result<Result<Vec<u8>, Resource<NnError>>> {
        let handle = Arc::clone(&self.table.get(&trainer)?.0);
        let result = handle.export().await;
        self.answer(result)
    }

    async fn publish(
        &mut self,
        trainer: Resource<TrainerResource>,
        model: String,
    ) -> wasmtime::Result<Result<(), Resource<NnError>>> {
        let handle = Arc::clone(&self.table.get(&trainer)?.0);
        let registry = self.ctx.registry.clone();
        let result = handle.publish(&model, registry.as_ref()).await;
        self.answer(result)
    }

    async fn checkpoint(&mut self, trainer: Resource<TrainerResource>) -> wasmtime::Result<Result<(), Resource<NnError>>> {
        let handle = Arc::clone(&self.table.get(&trainer)?.0);
        let result = handle.checkpoint().await;
        self.answer(result)
    }

    fn drop(&mut self, trainer: Resource<TrainerResource>) -> wasmtime::Result<()> {
        self.table.delete(trainer)?;
        Ok(())
    }
}
