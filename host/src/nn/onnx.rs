//! The ONNX Runtime backend: each model has a pool of sessions, each session on an
//! inference thread of its own, fed from one queue.
//!
//! A session always runs on the same thread (ONNX Runtime's per-thread scratch stays
//! warm: measured ~15% faster per run than handing sessions to tokio's blocking pool),
//! and no async worker ever waits on a run.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use ort::session::{RunOptions, Session};
use ort::value::{DynValue, TensorElementType, ValueType};
use tokio::sync::{mpsc, oneshot};

use super::{ElementType, NnError, Tensor};
use crate::bindings::wasi::nn::errors::ErrorCode;
use crate::manifest::Target;

/// The file name the setup step installs ONNX Runtime under, in `.cache/onnxruntime/`.
pub const ORT_LIBRARY: &str = "libonnxruntime.so";

/// The loaded ONNX Runtime library and its environment.
pub struct OnnxRuntime {
    env: ort::environment::Environment,
    library: PathBuf,
}

impl OnnxRuntime {
    /// Where ONNX Runtime is: `$ORT_DYLIB_PATH` when set, else the first of
    /// [`OnnxRuntime::search_path`]`(extra)` that exists.
    pub fn locate(extra: &[PathBuf]) -> anyhow::Result<PathBuf> {
        if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
            let path = PathBuf::from(path);
            anyhow::ensure!(
                path.is_file(),
                "ORT_DYLIB_PATH is `{}`, which is not a file",
                path.display()
            );
            return Ok(path);
        }
        let candidates = Self::search_path(extra);
        candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
            anyhow::anyhow!(
                "ONNX Runtime not found (looked in {}); run ./setup.sh, or set ORT_DYLIB_PATH to a libonnxruntime.so \
                 (from the `onnxruntime` wheel on PyPI: onnxruntime/capi/)",
                candidates.iter().map(|p| format!("`{}`", p.display())).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// Where ONNX Runtime is looked for, in order: `ORT_LIBRARY` in each of `extra`
    /// (the node passes its state dir's `onnxruntime/`), beside the `lepton` binary, in
    /// `.cache/onnxruntime/` of the checkout the binary was built in (`target/*/lepton`:
    /// where `./setup.sh` puts it, so a user who ran the setup never sets a variable),
    /// and in `.cache/onnxruntime/` of the working directory.
    pub fn search_path(extra: &[PathBuf]) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = extra.to_vec();
        if let Some(bin) = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_owned))
        {
            dirs.push(bin.clone());
            if let Some(checkout) = bin.parent().and_then(Path::parent) {
                dirs.push(checkout.join(".cache/onnxruntime"));
            }
        }
        dirs.push(PathBuf::from(".cache/onnxruntime"));
        let mut candidates: Vec<PathBuf> = Vec::new();
        for dir in dirs {
            let candidate = dir.join(ORT_LIBRARY);
            if !candidates.contains(&candidate) {
                candidates.push(candidate);
            }
        }
        candidates
    }

    /// Whether this ONNX Runtime was built with the CUDA execution provider
    /// (`onnxruntime-gpu`); whether a session can use it is known only when one tries.
    pub fn has_cuda(&self) -> bool {
        <ort::ep::CUDA as ort::ep::ExecutionProvider>::is_available().unwrap_or(false)
    }

    /// Loads the library at `path` and creates the environment.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let env = ort::init_from(path)
            .with_context(|| format!("loading ONNX Runtime from `{}`", path.display()))?
            .with_name("lepton")
            .build()
            .map_err(|e| anyhow::anyhow!("creating the ONNX Runtime environment: {e}"))?;
        register_upload_arena(&env, UPLOAD_ARENA_BYTES)
            .context("creating the arena for uploaded models")?;
        Ok(Self {
            env,
            library: path.to_owned(),
        })
    }

    /// The library file in use.
    pub fn library(&self) -> &Path {
        &self.library
    }
}

/// What all models loaded from bytes (`wasi:nn` `load`) may allocate together while
/// they run: their sessions share one ONNX Runtime arena of this size, and a run that
/// would need more fails (`runtime-error`) instead of taking the host's memory.
pub const UPLOAD_ARENA_BYTES: usize = 256 << 20;

/// Registers the CPU arena that sessions of uploaded models use
/// (`session.use_env_allocators`), capped at `max_mem` bytes.
#[expect(
    unsafe_code,
    reason = "ONNX Runtime's shared allocators are reachable only through its C API"
)]
fn register_upload_arena(
    env: &ort::environment::Environment,
    max_mem: usize,
) -> anyhow::Result<()> {
    use ort::AsPointer as _;
    use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
    let api = ort::api();
    let check = |status: ort::sys::OrtStatusPtr| -> anyhow::Result<()> {
        if status.0.is_null() {
            return Ok(());
        }
        // SAFETY: a non-null status from the C API, read then released once.
        let message = unsafe {
            let text = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0))
                .to_string_lossy()
                .into_owned();
            (api.ReleaseStatus)(status.0);
            text
        };
        anyhow::bail!("{message}")
    };
    let info = MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Arena,
        MemoryType::Default,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let keys = [c"max_mem".as_ptr(), c"arena_extend_strategy".as_ptr()];
    // Extend by what is requested (1), not by doubling: the cap is then exact.
    let values = [max_mem, 1];
    let mut config = std::ptr::null_mut();
    // SAFETY: two valid C strings and two values, as the call documents.
    check(unsafe {
        (api.CreateArenaCfgV2)(keys.as_ptr(), values.as_ptr(), keys.len(), &mut config)
    })?;
    // SAFETY: the environment and memory info are live; the config was just made and
    // is released right after (the allocator copies what it needs).
    let registered =
        unsafe { (api.CreateAndRegisterAllocator)(env.ptr().cast_mut(), info.ptr(), config) };
    // SAFETY: made above, not used after.
    unsafe { (api.ReleaseArenaCfg)(config) };
    check(registered)
}

/// A model input or output as the graph declares it.
#[derive(Debug, Clone)]
pub struct Io {
    /// Name.
    pub name: String,
    /// Element type.
    pub ty: ElementType,
    /// Dimensions; `-1` where any size goes.
    pub shape: Vec<i64>,
}

/// Runs waiting for a free session, past which callers wait to enqueue.
pub const MAX_QUEUED_RUNS: usize = 1024;

pub(crate) type RunResult = Result<Vec<(String, Tensor)>, NnError>;

struct Job {
    inputs: Vec<(String, Tensor)>,
    reply: oneshot::Sender<RunResult>,
    options: Arc<RunOptions>,
    /// When its first request arrived (the queue time ends when a session takes it).
    arrived: std::time::Instant,
    /// The `compute` spans of its requests (when spans are exported).
    traces: Vec<crate::ops::trace::TraceContext>,
}

/// Who one backend run is for.
pub(crate) struct RunFor {
    /// When its first request arrived.
    pub(crate) arrived: std::time::Instant,
    /// How many requests it serves (a batch: more than one).
    pub(crate) requests: usize,
    /// Their `compute` spans, when spans are exported.
    pub(crate) traces: Vec<crate::ops::trace::TraceContext>,
}

impl RunFor {
    /// One request, arriving now, inside `trace`.
    pub(crate) fn one(trace: Option<crate::ops::trace::TraceContext>) -> Self {
        Self {
            arrived: std::time::Instant::now(),
            requests: 1,
            traces: trace.into_iter().collect(),
        }
    }
}

/// Terminates the run it guards when dropped before the run answered: a request
/// dropped at its deadline stops its inference instead of leaving a core busy.
struct TerminateOnDrop(Option<Arc<RunOptions>>);

impl Drop for TerminateOnDrop {
    fn drop(&mut self) {
        if let Some(options) = self.0.take()
            && let Err(error) = options.terminate()
        {
            tracing::debug!("terminating an abandoned run failed: {error}");
        }
    }
}

/// An ONNX model with a pool of sessions.
pub struct OnnxModel {
    name: String,
    inputs: Vec<Io>,
    outputs: Vec<Io>,
    jobs: mpsc::Sender<Job>,
    target: Target,
    runs: std::sync::atomic::AtomicU64,
    file_bytes: u64,
    metrics: ModelMetrics,
}

/// A model's metric handles (`lepton_model_*{model=...}`).
#[derive(Clone)]
pub(crate) struct ModelMetrics {
    pub(crate) requests: prometheus_client::metrics::counter::Counter,
    runs: prometheus_client::metrics::counter::Counter,
    queue: prometheus_client::metrics::histogram::Histogram,
    run: prometheus_client::metrics::histogram::Histogram,
    batch: prometheus_client::metrics::histogram::Histogram,
}

impl ModelMetrics {
    fn of(model: &str) -> Self {
        let m = crate::ops::metrics::metrics();
        let labels = crate::ops::metrics::ModelLabels {
            model: model.to_owned(),
        };
        Self {
            requests: m.model_requests.get_or_create_owned(&labels),
            runs: m.model_runs.get_or_create_owned(&labels),
            queue: m.model_queue_seconds.get_or_create_owned(&labels),
            run: m.model_run_seconds.get_or_create_owned(&labels),
            batch: m.model_batch_size.get_or_create_owned(&labels),
        }
    }
}

/// Where the bytes of a model come from.
pub enum Source<'a> {
    /// A file.
    File(&'a Path),
    /// Bytes in memory (`wasi:nn` `load`).
    Bytes(&'a [u8]),
}

impl OnnxModel {
    /// Creates `sessions` sessions of `threads` intra-op threads each. A `Gpu` target
    /// uses CUDA where it registers and the CPU otherwise, with a warning.
    pub fn load(
        runtime: &OnnxRuntime,
        name: &str,
        source: &Source<'_>,
        target: Target,
        sessions: u32,
        threads: u32,
    ) -> anyhow::Result<Self> {
        // Checked here, on the bytes ONNX Runtime would read, for every model.
        // Read once: checked here, before ONNX Runtime sees it, and every session is
        // made from these same bytes.
        let read;
        let (bytes, uploaded): (&[u8], bool) = match source {
            Source::File(path) => {
                read = crate::fsutil::read_regular_file(path, crate::manifest::MAX_FILE_SIZE)
                    .with_context(|| format!("reading model `{name}`"))?;
                (&read, false)
            }
            Source::Bytes(bytes) => (bytes, true),
        };
        super::inspect::check(bytes, uploaded)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("model `{name}` is refused"))?;
        let mut pool = Vec::with_capacity(sessions as usize);
        let mut effective = target;
        for _ in 0..sessions.max(1) {
            let (session, used) = new_session(runtime, name, bytes, uploaded, effective, threads)?;
            effective = used;
            pool.push(session);
        }
        let first = pool.first().context("no session")?;
        let inputs = describe(first.inputs()).with_context(|| format!("model `{name}` inputs"))?;
        let outputs =
            describe(first.outputs()).with_context(|| format!("model `{name}` outputs"))?;
        let (jobs, queue) = mpsc::channel(MAX_QUEUED_RUNS);
        let queue = Arc::new(Mutex::new(queue));
        for (i, session) in pool.into_iter().enumerate() {
            let queue = Arc::clone(&queue);
            let model = name.to_owned();
            let metrics = ModelMetrics::of(name);
            std::thread::Builder::new()
                .name(format!("nn-{name}-{i}"))
                .spawn(move || serve_session(&model, session, &queue, &metrics))
                .context("spawning an inference thread")?;
        }
        Ok(Self {
            name: name.to_owned(),
            inputs,
            outputs,
            jobs,
            target: effective,
            runs: std::sync::atomic::AtomicU64::new(0),
            file_bytes: bytes.len() as u64,
            metrics: ModelMetrics::of(name),
        })
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Declared inputs.
    pub fn inputs(&self) -> &[Io] {
        &self.inputs
    }

    /// Declared outputs.
    pub fn outputs(&self) -> &[Io] {
        &self.outputs
    }

    /// Where it runs (after any GPU fallback).
    pub fn target(&self) -> Target {
        self.target
    }

    /// Bytes of the ONNX file it was loaded from.
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    pub(crate) fn metrics(&self) -> &ModelMetrics {
        &self.metrics
    }

    /// Backend runs so far (a batch is one run).
    pub fn runs(&self) -> u64 {
        self.runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Checks inputs against the graph's declaration: names, types, shapes, byte lengths.
    pub fn validate(&self, inputs: &[(String, Tensor)]) -> Result<(), NnError> {
        let invalid = |message: String| NnError::new(ErrorCode::InvalidArgument, message);
        let mut seen = std::collections::HashSet::with_capacity(inputs.len());
        for (name, _) in inputs {
            if !seen.insert(name.as_str()) {
                return Err(invalid(format!("input `{name}` is given more than once")));
            }
            if !self.inputs.iter().any(|io| &io.name == name) {
                return Err(invalid(format!(
                    "unknown input `{name}`; model `{}` takes {}",
                    self.name,
                    self.inputs
                        .iter()
                        .map(|io| format!("`{}`", io.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        for io in &self.inputs {
            let Some((_, tensor)) = inputs.iter().find(|(name, _)| name == &io.name) else {
                return Err(invalid(format!("missing input `{}`", io.name)));
            };
            if tensor.ty != io.ty {
                return Err(invalid(format!(
                    "input `{}` is {}, the model takes {}",
                    io.name, tensor.ty, io.ty
                )));
            }
            let fits = tensor.dims.len() == io.shape.len()
                && tensor
                    .dims
                    .iter()
                    .zip(&io.shape)
                    .all(|(&d, &s)| s < 0 || i64::from(d) == s);
            if !fits {
                return Err(invalid(format!(
                    "input `{}` has dimensions {:?}, the model takes {:?} (-1: any)",
                    io.name, tensor.dims, io.shape
                )));
            }
            tensor
                .check_length()
                .map_err(|e| invalid(format!("input `{}`: {e}", io.name)))?;
        }
        Ok(())
    }

    /// Validates and runs one inference on a pooled session (its queue and run spans
    /// inside `trace`, when spans are exported).
    pub async fn run(
        self: &Arc<Self>,
        inputs: Vec<(String, Tensor)>,
        trace: Option<crate::ops::trace::TraceContext>,
    ) -> RunResult {
        let run_for = RunFor::one(trace);
        self.validate(&inputs)?;
        self.run_validated(inputs, run_for).await
    }

    /// Runs inputs already validated, on the first free session: one run for the
    /// requests of `run_for` (stacked by the batcher when more than one).
    pub(crate) async fn run_validated(
        self: &Arc<Self>,
        inputs: Vec<(String, Tensor)>,
        run_for: RunFor,
    ) -> RunResult {
        self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.runs.inc();
        self.metrics.batch.observe(run_for.requests as f64);
        let stopped = || {
            NnError::new(
                ErrorCode::RuntimeError,
                format!("model `{}` stopped", self.name),
            )
        };
        let options = Arc::new(
            RunOptions::new()
                .map_err(|e| NnError::new(ErrorCode::RuntimeError, format!("run options: {e}")))?,
        );
        let mut guard = TerminateOnDrop(Some(Arc::clone(&options)));
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                inputs,
                reply,
                options,
                arrived: run_for.arrived,
                traces: run_for.traces,
            })
            .await
            .map_err(|_| stopped())?;
        let result = answer.await.unwrap_or_else(|_| Err(stopped()));
        guard.0 = None; // Answered: nothing to stop.
        result
    }
}

/// An inference thread: takes jobs until the model is dropped.
fn serve_session(
    model: &str,
    mut session: Session,
    queue: &Mutex<mpsc::Receiver<Job>>,
    metrics: &ModelMetrics,
) {
    loop {
        // The lock is held only while waiting for the next job, never during a run.
        let job = queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .blocking_recv();
        let Some(job) = job else { break };
        if job.reply.is_closed() {
            continue; // The request went away (its deadline passed) while queued.
        }
        let started = std::time::Instant::now();
        metrics
            .queue
            .observe(started.saturating_duration_since(job.arrived).as_secs_f64());
        let result = run_session(&mut session, job.inputs, &job.options);
        let ended = std::time::Instant::now();
        let ran = ended.duration_since(started);
        metrics.run.observe(ran.as_secs_f64());
        for trace in &job.traces {
            let batch = i64::try_from(job.traces.len()).unwrap_or(i64::MAX);
            crate::ops::trace::record_span(
                trace.child(),
                "queue",
                job.arrived,
                started,
                Vec::new(),
            );
            crate::ops::trace::record_span(
                trace.child(),
                "run",
                started,
                ended,
                vec![
                    opentelemetry::KeyValue::new("lepton.model", model.to_owned()),
                    opentelemetry::KeyValue::new("lepton.batch_size", batch),
                ],
            );
        }
        tracing::trace!(model, "ran in {ran:.2?}");
        let _ = job.reply.send(result);
    }
}

fn new_session(
    runtime: &OnnxRuntime,
    name: &str,
    bytes: &[u8],
    uploaded: bool,
    target: Target,
    threads: u32,
) -> anyhow::Result<(Session, Target)> {
    let error = |e: ort::Error<ort::session::builder::SessionBuilder>| anyhow::anyhow!("{e}");
    let mut builder = Session::builder(&runtime.env)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_intra_threads(threads as usize)
        .map_err(error)?
        .with_inter_threads(1)
        .map_err(error)?;
    let mut used = Target::Cpu;
    if target == Target::Gpu {
        let cuda = ort::ep::CUDA::default().build().error_on_failure();
        match builder.with_execution_providers([cuda]) {
            Ok(with_cuda) => {
                builder = with_cuda;
                used = Target::Gpu;
            }
            Err(e) => {
                tracing::warn!(
                    model = name,
                    "target \"gpu\": CUDA is not available ({e}); running on the CPU"
                );
                builder = e.recover();
            }
        }
    }
    if uploaded {
        // The capped arena shared by every uploaded model (`UPLOAD_ARENA_BYTES`).
        builder = builder
            .with_config_entry("session.use_env_allocators", "1")
            .map_err(error)?;
    }
    let session = builder
        .commit_from_memory(bytes)
        .map_err(|e| anyhow::anyhow!("ONNX Runtime rejected model `{name}`: {e}"))?;
    Ok((session, used))
}

fn describe(outlets: &[ort::value::Outlet]) -> anyhow::Result<Vec<Io>> {
    outlets
        .iter()
        .map(|outlet| match outlet.dtype() {
            ValueType::Tensor { ty, shape, .. } => Ok(Io {
                name: outlet.name().to_owned(),
                ty: from_element_type(*ty).ok_or_else(|| {
                    anyhow::anyhow!(
                        "`{}` has element type {ty:?}, which Lepton does not carry",
                        outlet.name()
                    )
                })?,
                shape: shape.iter().copied().collect(),
            }),
            other => anyhow::bail!("`{}` is a {other:?}, not a tensor", outlet.name()),
        })
        .collect()
}

fn from_element_type(ty: TensorElementType) -> Option<ElementType> {
    Some(match ty {
        TensorElementType::Bool => ElementType::Bool,
        TensorElementType::Uint8 => ElementType::U8,
        TensorElementType::Uint16 => ElementType::U16,
        TensorElementType::Uint32 => ElementType::U32,
        TensorElementType::Uint64 => ElementType::U64,
        TensorElementType::Int8 => ElementType::I8,
        TensorElementType::Int16 => ElementType::I16,
        TensorElementType::Int32 => ElementType::I32,
        TensorElementType::Int64 => ElementType::I64,
        TensorElementType::Float16 => ElementType::Fp16,
        TensorElementType::Bfloat16 => ElementType::Bf16,
        TensorElementType::Float32 => ElementType::Fp32,
        TensorElementType::Float64 => ElementType::Fp64,
        TensorElementType::String => ElementType::Bytes,
        _ => return None,
    })
}

/// Little-endian elements of `N` bytes, decoded (the length was checked before).
fn decode<T, const N: usize>(bytes: &[u8], from: fn([u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| from(c.try_into().unwrap_or([0; N])))
        .collect()
}

fn to_value(tensor: Tensor) -> Result<DynValue, String> {
    use ort::value::Tensor as T;
    let Tensor { dims, ty, data } = tensor;
    let shape: Vec<i64> = dims.iter().map(|&d| i64::from(d)).collect();
    let value = match ty {
        ElementType::Bool => {
            T::from_array((shape, data.iter().map(|&b| b != 0).collect::<Vec<bool>>()))
                .map(T::into_dyn)
        }
        ElementType::U8 => T::from_array((shape, data)).map(T::into_dyn),
        ElementType::I8 => {
            T::from_array((shape, decode(&data, i8::from_le_bytes))).map(T::into_dyn)
        }
        ElementType::U16 => {
            T::from_array((shape, decode(&data, u16::from_le_bytes))).map(T::into_dyn)
        }
        ElementType::I16 => {
            T::from_array((shape, decode(&data, i16::from_le_bytes))).map(T::into_dyn)
        }
        ElementType::U32 => {
            T::from_array((shape, decode(&data, u32::from_le_bytes))).map(T::into_dyn)
        }
        ElementType::I32 => {
            T::from_array((shape, decode(&data, i32::from_le_bytes))).map(T::into_dyn)
        }
        ElementType::U64 => {
            T::from_array((shape, decode(&data, u64::from_le_bytes))).map(T::into_dyn)
        }
        ElementType::I64 => {
            T::from_array((shape, decode(&data, i64::from_le_bytes))).map(T::into_dyn)
        }
        ElementType::Fp16 => {
            T::from_array((shape, decode(&data, half::f16::from_le_bytes))).map(T::into_dyn)
        }
        ElementType::Bf16 => {
            T::from_array((shape, decode(&data, half::bf16::from_le_bytes))).map(T::into_dyn)
        }
        ElementType::Fp32 => {
            T::from_array((shape, decode(&data, f32::from_le_bytes))).map(T::into_dyn)
        }
        ElementType::Fp64 => {
            T::from_array((shape, decode(&data, f64::from_le_bytes))).map(T::into_dyn)
        }
        ElementType::Bytes => {
            // ONNX Runtime copies strings in as C strings: UTF-8 without NUL.
            let mut strings = Vec::new();
            for (i, element) in super::tensor::byte_elements(&data).enumerate() {
                let element = element?;
                let text = std::str::from_utf8(element).map_err(|_| {
                    format!("BYTES element {i} is not UTF-8, which ONNX string tensors need")
                })?;
                if text.contains('\0') {
                    return Err(format!(
                        "BYTES element {i} contains a NUL byte, which ONNX string tensors cannot hold"
                    ));
                }
                strings.push(text.to_owned());
            }
            T::from_string_array((shape, &strings[..])).map(T::into_dyn)
        }
    };
    value.map_err(|e| e.to_string())
}

/// The little-endian bytes of `values`.
fn encode<T: Copy, const N: usize>(values: &[T], to: fn(T) -> [u8; N]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(values.len() * N);
    for &value in values {
        bytes.extend_from_slice(&to(value));
    }
    bytes
}

fn from_value(value: &DynValue) -> Result<Tensor, NnError> {
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(NnError::new(
            ErrorCode::UnsupportedOperation,
            "output is not a tensor".into(),
        ));
    };
    let element = *ty;
    let Some(ty) = from_element_type(element) else {
        return Err(NnError::new(
            ErrorCode::UnsupportedOperation,
            format!("output element type {element:?} is not supported"),
        ));
    };
    let extract = || -> ort::Result<(Vec<i64>, Vec<u8>)> {
        macro_rules! bytes_of {
            ($t:ty, $to:expr) => {{
                let (shape, values) = value.try_extract_tensor::<$t>()?;
                (shape.to_vec(), encode(values, $to))
            }};
        }
        Ok(match ty {
            ElementType::Bool => {
                let (shape, values) = value.try_extract_tensor::<bool>()?;
                (
                    shape.to_vec(),
                    values.iter().map(|&b| u8::from(b)).collect(),
                )
            }
            ElementType::U8 => {
                let (shape, values) = value.try_extract_tensor::<u8>()?;
                (shape.to_vec(), values.to_vec())
            }
            ElementType::I8 => bytes_of!(i8, i8::to_le_bytes),
            ElementType::U16 => bytes_of!(u16, u16::to_le_bytes),
            ElementType::I16 => bytes_of!(i16, i16::to_le_bytes),
            ElementType::U32 => bytes_of!(u32, u32::to_le_bytes),
            ElementType::I32 => bytes_of!(i32, i32::to_le_bytes),
            ElementType::U64 => bytes_of!(u64, u64::to_le_bytes),
            ElementType::I64 => bytes_of!(i64, i64::to_le_bytes),
            ElementType::Fp16 => bytes_of!(half::f16, half::f16::to_le_bytes),
            ElementType::Bf16 => bytes_of!(half::bf16, half::bf16::to_le_bytes),
            ElementType::Fp32 => bytes_of!(f32, f32::to_le_bytes),
            ElementType::Fp64 => bytes_of!(f64, f64::to_le_bytes),
            ElementType::Bytes => {
                let (shape, strings) = value.try_extract_strings()?;
                let mut data = Vec::new();
                for string in &strings {
                    let length = u32::try_from(string.len()).unwrap_or(u32::MAX);
                    data.extend_from_slice(&length.to_le_bytes());
                    data.extend_from_slice(string.as_bytes());
                }
                (shape.to_vec(), data)
            }
        })
    };
    let (shape, data) =
        extract().map_err(|e| NnError::new(ErrorCode::RuntimeError, e.to_string()))?;
    let dims = shape
        .iter()
        .map(|&d| u32::try_from(d))
        .collect::<Result<Vec<u32>, _>>()
        .map_err(|_| {
            NnError::new(
                ErrorCode::RuntimeError,
                format!("output dimensions {shape:?} do not fit in u32"),
            )
        })?;
    Ok(Tensor { dims, ty, data })
}

fn run_session(
    session: &mut Session,
    inputs: Vec<(String, Tensor)>,
    options: &RunOptions,
) -> Result<Vec<(String, Tensor)>, NnError> {
    let values = inputs
        .into_iter()
        .map(|(name, tensor)| {
            let value = to_value(tensor).map_err(|e| {
                NnError::new(ErrorCode::InvalidArgument, format!("input `{name}`: {e}"))
            })?;
            Ok((name, value))
        })
        .collect::<Result<Vec<(String, DynValue)>, NnError>>()?;
    let outputs = session
        .run_with_options(values, options)
        .map_err(|e| NnError::new(ErrorCode::RuntimeError, e.to_string()))?;
    outputs
        .iter()
        .map(|(name, value)| Ok((name.to_owned(), from_value(&value)?)))
        .collect()
}
