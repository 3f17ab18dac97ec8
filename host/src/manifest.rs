//! The `lepton.toml` manifest, parsed in two stages.
//!
//! [`RawManifest`] mirrors the TOML exactly (typed serde, unknown keys rejected);
//! [`Deployment::load`] validates it and resolves it into a [`Deployment`]: paths made
//! absolute against the manifest's directory, sizes and durations parsed, components
//! addressed by sha256 digest. The runtime consumes only the [`Deployment`].
//!
//! ```toml
//! manifest_version = 1
//!
//! [function.hello]
//! component = "target/guests/wasm32-wasip2/release/hello.wasm"
//! route = "/hello"                # exact path; "/hello/..." matches the prefix
//! timeout = "5s"                  # default 30s
//! memory_limit = "64MiB"          # default 128MiB
//! max_concurrency = 64            # default 64 in-flight requests
//! max_queue = 256                 # default 256 waiting requests, then 503
//! max_body_size = "10MiB"         # default 10MiB, then 413
//! environment = { GREETING = "hi" }
//! files = [{ source = "static", destination = "/static" }]   # read-only
//! allowed_outbound_hosts = ["http://127.0.0.1:8080"]
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// The only manifest version this host understands.
pub const MANIFEST_VERSION: u32 = 1;
/// Default wall-clock limit of one request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default cap on one instance's linear memory.
pub const DEFAULT_MEMORY_LIMIT: u64 = 128 << 20;
/// Default number of requests a function runs at once.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 64;
/// Default number of requests that wait for a free slot before new ones get 503.
pub const DEFAULT_MAX_QUEUE: u32 = 256;
/// Default cap on a request body.
pub const DEFAULT_MAX_BODY_SIZE: u64 = 10 << 20;
/// A wasm32 linear memory cannot grow past 4 GiB.
pub const MAX_MEMORY_LIMIT: u64 = 4 << 30;
/// Longest accepted `timeout` (a request is not a batch job).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default cap on a model a guest loads from bytes (`allow_model_upload`).
pub const DEFAULT_MAX_MODEL_UPLOAD_SIZE: u64 = 64 << 20;
/// Paths under this prefix belong to the host (health, metrics).
pub const RESERVED_ROUTE_PREFIX: &str = "/.well-known/lepton";

/// A manifest that could not be loaded; the message names the file, the function and the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The manifest file could not be read.
    #[error("cannot read manifest `{path}`: {source}")]
    Read {
        /// The manifest's path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML did not parse into the manifest's shape (syntax, unknown key, wrong type).
    #[error("invalid manifest `{path}`: {message}")]
    Parse {
        /// The manifest's path.
        path: PathBuf,
        /// What the TOML parser said, with the line.
        message: String,
    },
    /// A value is not acceptable.
    #[error("invalid manifest `{path}`: {message}")]
    Invalid {
        /// The manifest's path.
        path: PathBuf,
        /// What is wrong, naming the function and the key.
        message: String,
    },
}

/// The manifest exactly as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManifest {
    /// Must be [`MANIFEST_VERSION`].
    pub manifest_version: u32,
    /// `[function.NAME]` tables.
    #[serde(default)]
    pub function: BTreeMap<String, RawFunction>,
    /// `[model.NAME]` tables.
    #[serde(default)]
    pub model: BTreeMap<String, RawModel>,
    /// `[trainer.NAME]` tables.
    #[serde(default)]
    pub trainer: BTreeMap<String, RawTrainer>,
}

/// One `[trainer.NAME]` table as written.
///
/// ```toml
/// [trainer.digits]
/// init = "models/digits-mlp.onnx"        # ONNX graph; its float initializers are the weights
/// loss = "cross-entropy"                 # or "mse"
/// optimizer = { kind = "adamw", lr = 1e-3 }   # or { kind = "sgd", lr = 0.1, momentum = 0.9 }
/// target = "cpu"                         # "gpu": CUDA when built with it, else CPU (logged)
/// checkpoint_every = "30s"
/// publishes = "digits"                   # the [model.*] that publish() may replace
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrainer {
    /// Initial ONNX graph, relative to the manifest.
    pub init: String,
    /// `"cross-entropy"` or `"mse"`.
    pub loss: String,
    /// The optimizer.
    pub optimizer: RawOptimizer,
    /// `"cpu"` (default) or `"gpu"`.
    pub target: Option<String>,
    /// How often a changed trainer is checkpointed (default 30s).
    pub checkpoint_every: Option<String>,
    /// The model name `publish()` may replace.
    pub publishes: Option<String>,
}

/// `optimizer = { kind = "adamw", lr = 1e-3 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOptimizer {
    /// `"adamw"` or `"sgd"`.
    pub kind: String,
    /// Learning rate.
    pub lr: f64,
    /// SGD momentum (default 0).
    pub momentum: Option<f64>,
    /// AdamW weight decay (default 0.01).
    pub weight_decay: Option<f64>,
}

/// One `[model.NAME]` table as written.
///
/// ```toml
/// [model.magika]
/// path = "models/magika.onnx"          # ONNX file, relative to the manifest
/// target = "cpu"                       # or "gpu": CUDA where it registers, else CPU (logged)
/// batch = { max_size = 16, max_wait = "2ms" }   # optional dynamic batching along dim 0
/// sessions = 2                         # parallel ONNX Runtime sessions (default: CPU cores)
/// threads = 1                          # intra-op threads per session (default 1)
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// Path of the ONNX file, relative to the manifest.
    pub path: String,
    /// `"cpu"` (default) or `"gpu"`.
    pub target: Option<String>,
    /// Dynamic batching.
    pub batch: Option<RawBatch>,
    /// Sessions run in parallel.
    pub sessions: Option<u32>,
    /// Intra-op threads per session.
    pub threads: Option<u32>,
}

/// `batch = { max_size = 16, max_wait = "2ms" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatch {
    /// Most rows (dim 0) in one batched run.
    pub max_size: u32,
    /// Longest a request waits for others to join its batch.
    pub max_wait: String,
}

/// One `[function.NAME]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFunction {
    /// Path of the `.wasm` component, relative to the manifest.
    pub component: String,
    /// The HTTP route, e.g. `"/hello"`.
    pub route: String,
    /// e.g. `"5s"`, `"250ms"`.
    pub timeout: Option<String>,
    /// e.g. `"64MiB"`.
    pub memory_limit: Option<String>,
    /// In-flight requests.
    pub max_concurrency: Option<u32>,
    /// Requests waiting for a slot.
    pub max_queue: Option<u32>,
    /// e.g. `"10MiB"`.
    pub max_body_size: Option<String>,
    /// Environment variables the guest sees.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Host directories preopened read-only.
    #[serde(default)]
    pub files: Vec<RawFileMount>,
    /// `scheme://host:port` the guest may send HTTP requests to.
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
    /// Names of `[model.*]` tables this function may load by name.
    #[serde(default)]
    pub models: Vec<String>,
    /// Whether wasi-nn `load` from bytes is allowed.
    #[serde(default)]
    pub allow_model_upload: bool,
    /// Cap on a model loaded from bytes, e.g. `"64MiB"`.
    pub max_model_upload_size: Option<String>,
    /// Names of `[trainer.*]` tables this function may open.
    #[serde(default)]
    pub trainers: Vec<String>,
}

/// One entry of `files`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFileMount {
    /// Host directory, relative to the manifest.
    pub source: String,
    /// Absolute path the guest sees it at.
    pub destination: String,
}

/// A validated, resolved manifest: what the runtime consumes.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// Where the manifest was read from.
    pub manifest_path: PathBuf,
    /// Functions, ordered by name.
    pub functions: Vec<FunctionSpec>,
    /// Models, ordered by name.
    pub models: Vec<ModelSpec>,
    /// Trainers, ordered by name.
    pub trainers: Vec<TrainerSpec>,
}

/// The loss a trainer minimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Softmax cross-entropy of logits `[N, C]` against class indices `[N]`.
    CrossEntropy,
    /// Mean squared error against targets shaped like the output.
    Mse,
}

/// A trainer's optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    /// AdamW (betas 0.9, 0.999; eps 1e-8).
    AdamW {
        /// Learning rate.
        lr: f64,
        /// Decoupled weight decay.
        weight_decay: f64,
    },
    /// Stochastic gradient descent with momentum.
    Sgd {
        /// Learning rate.
        lr: f64,
        /// Momentum (0: plain SGD).
        momentum: f64,
    },
}

/// A validated trainer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TrainerSpec {
    /// Validated name.
    pub name: String,
    /// Absolute path of the initial ONNX graph.
    pub init: PathBuf,
    /// sha256 of that file, lowercase hex.
    pub init_digest: String,
    /// The loss.
    pub loss: Loss,
    /// The optimizer.
    pub optimizer: Optimizer,
    /// Requested target.
    pub target: Target,
    /// Checkpoint period.
    pub checkpoint_every: Duration,
    /// The model `publish()` may replace.
    pub publishes: Option<String>,
}

/// Where a model should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The CPU.
    Cpu,
    /// A CUDA GPU where one registers; the CPU otherwise (logged).
    Gpu,
}

/// A validated model.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ModelSpec {
    /// Validated name.
    pub name: String,
    /// Absolute path of the ONNX file.
    pub path: PathBuf,
    /// sha256 of the file, lowercase hex.
    pub digest: String,
    /// Requested target.
    pub target: Target,
    /// Dynamic batching, if configured.
    pub batch: Option<BatchSpec>,
    /// Sessions run in parallel.
    pub sessions: u32,
    /// Intra-op threads per session.
    pub threads: u32,
}

/// Dynamic batching settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSpec {
    /// Most rows in one run.
    pub max_size: u32,
    /// Longest wait for a batch to fill.
    pub max_wait: Duration,
}

/// A validated function.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FunctionSpec {
    /// Validated name.
    pub name: String,
    /// Absolute path of the component.
    pub component_path: PathBuf,
    /// sha256 of the component's bytes, lowercase hex.
    pub component_digest: String,
    /// Route: `/hello` serves `/hello` and `/hello/...`.
    pub route: String,
    /// Wall-clock limit of one request.
    pub timeout: Duration,
    /// Linear memory cap of one instance, in bytes.
    pub memory_limit: u64,
    /// Requests run at once.
    pub max_concurrency: u32,
    /// Requests waiting for a slot before new ones get 503.
    pub max_queue: u32,
    /// Request body cap, in bytes.
    pub max_body_size: u64,
    /// Environment variables granted to the guest.
    pub environment: Vec<(String, String)>,
    /// Read-only directories granted to the guest.
    pub files: Vec<FileMount>,
    /// Outbound HTTP destinations granted to the guest.
    pub allowed_outbound_hosts: Vec<OutboundHost>,
    /// Models the guest may load by name.
    pub models: Vec<String>,
    /// Whether the guest may load models from bytes.
    pub allow_model_upload: bool,
    /// Cap on a model loaded from bytes.
    pub max_model_upload_size: u64,
    /// Trainers the guest may open.
    pub trainers: Vec<String>,
}

/// A host directory preopened read-only in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMount {
    /// Absolute host path (a directory).
    pub source: PathBuf,
    /// Guest path.
    pub destination: String,
}

/// An exact `scheme://host:port` a guest may send requests to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundHost {
    /// `http` or `https`.
    pub scheme: String,
    /// Host name or IP address, lowercase.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl fmt::Display for OutboundHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

impl OutboundHost {
    /// Parses `scheme://host:port`; the port may be left out for the scheme's default.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let (scheme, rest) = pattern
            .split_once("://")
            .ok_or_else(|| format!("{pattern:?} is not of the form scheme://host:port"))?;
        let default_port = match scheme {
            "http" => 80,
            "https" => 443,
            _ => return Err(format!("{pattern:?} has scheme {scheme:?}; expected \"http\" or \"https\"")),
        };
        if rest.is_empty() || rest.contains(['/', '?', '#', '@', '*']) {
            return Err(format!(
                "{pattern:?} must be exactly scheme://host:port (no path, user or wildcard)"
            ));
        }
        let parse_port = |port: &str| port.parse::<u16>().map_err(|_| format!("{pattern:?} has an invalid port {port:?}"));
        let (host, port) = if rest.starts_with('[') {
            // An IPv6 literal: `[::1]` or `[::1]:8080`.
            let end = rest.find(']').ok_or_else(|| format!("{pattern:?} has an unclosed `[`"))?;
            match &rest[end + 1..] {
                "" => (&rest[..=end], default_port),
                after => match after.strip_prefix(':') {
                    Some(port) => (&rest[..=end], parse_port(port)?),
                    None => return Err(format!("{pattern:?} has text after the host")),
                },
            }
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, parse_port(port)?),
                None => (rest, default_port),
            }
        };
        if host.is_empty() {
            return Err(format!("{pattern:?} has no host"));
        }
        Ok(Self { scheme: scheme.to_owned(), host: host.to_ascii_lowercase(), port })
    }

    /// Whether a request to `scheme`, `host` and `port` is allowed by this entry.
    pub fn matches(&self, scheme: &str, host: &str, port: u16) -> bool {
        self.scheme == scheme && self.port == port && self.host.eq_ignore_ascii_case(host)
    }
}

impl Deployment {
    /// Reads, validates and resolves the manifest at `path`.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ManifestError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text, path)
    }

    /// Validates and resolves manifest text; relative paths resolve against `path`'s directory.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ManifestError> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| ManifestError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |message: String| ManifestError::Invalid { path: path.to_owned(), message };
        if raw.manifest_version != MANIFEST_VERSION {
            return Err(invalid(format!(
                "`manifest_version` is {}, this host supports only {MANIFEST_VERSION}",
                raw.manifest_version
            )));
        }
        let base = path.parent().map(Path::to_owned).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        let mut models = Vec::with_capacity(raw.model.len());
        for (name, model) in raw.model {
            let spec = resolve_model(&name, model, &base).map_err(|message| invalid(format!("model `{name}`: {message}")))?;
            models.push(spec);
        }
        let mut trainers = Vec::with_capacity(raw.trainer.len());
        for (name, trainer) in raw.trainer {
            let spec =
                resolve_trainer(&name, trainer, &base).map_err(|message| invalid(format!("trainer `{name}`: {message}")))?;
            if let Some(model) = &spec.publishes
                && !models.iter().any(|m| &m.name == model)
            {
                return Err(invalid(format!(
                    "trainer `{name}`: `publishes`: no model named {model:?} (declare it as [model.{model}])"
                )));
            }
            trainers.push(spec);
        }
        let mut functions = Vec::with_capacity(raw.function.len());
        for (name, function) in raw.function {
            let spec = resolve_function(&name, function, &base)
                .map_err(|message| invalid(format!("function `{name}`: {message}")))?;
            if let Some(missing) = spec.models.iter().find(|m| !models.iter().any(|model| &model.name == *m)) {
                return Err(invalid(format!(
                    "function `{name}`: `models`: no model named {missing:?} (declare it as [model.{missing}])"
                )));
            }
            if let Some(missing) = spec.trainers.iter().find(|t| !trainers.iter().any(|trainer| &trainer.name == *t)) {
                return Err(invalid(format!(
                    "function `{name}`: `trainers`: no trainer named {missing:?} (declare it as [trainer.{missing}])"
                )));
            }
            functions.push(spec);
        }
        for (i, a) in functions.iter().enumerate() {
            if let Some(b) = functions[i + 1..].iter().find(|b| b.route == a.route) {
                return Err(invalid(format!(
                    "functions `{}` and `{}` both claim route {:?}",
                    a.name, b.name, a.route
                )));
            }
        }
        Ok(Self { manifest_path: path.to_owned(), functions, models, trainers })
    }
}

fn resolve_function(name: &str, raw: RawFunction, base: &Path) -> Result<FunctionSpec, String> {
    validate_name(name)?;
    let component_path = base.join(&raw.component);
    let component_digest = file_digest(&component_path).map_err(|e| format!("`component`: {e}"))?;
    let route = validate_route(&raw.route).map_err(|e| format!("`route`: {e}"))?;

    let timeout = match raw.timeout {
        Some(text) => parse_duration(&text).map_err(|e| format!("`timeout`: {e}"))?,
        None => DEFAULT_TIMEOUT,
    };
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        return Err(format!("`timeout`: must be more than 0s and at most {}s", MAX_TIMEOUT.as_secs()));
    }
    let memory_limit = match raw.memory_limit {
        Some(text) => parse_size(&text).map_err(|e| format!("`memory_limit`: {e}"))?,
        None => DEFAULT_MEMORY_LIMIT,
    };
    if !(64 << 10..=MAX_MEMORY_LIMIT).contains(&memory_limit) {
        return Err("`memory_limit`: must be between 64KiB (one page) and 4GiB".to_owned());
    }
    let max_body_size = match raw.max_body_size {
        Some(text) => parse_size(&text).map_err(|e| format!("`max_body_size`: {e}"))?,
        None => DEFAULT_MAX_BODY_SIZE,
    };
    let max_concurrency = raw.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY);
    if max_concurrency == 0 {
        return Err("`max_concurrency`: must be at least 1".to_owned());
    }
    let max_queue = raw.max_queue.unwrap_or(DEFAULT_MAX_QUEUE);

    let mut environment = Vec::with_capacity(raw.environment.len());
    for (key, value) in raw.environment {
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return Err(format!("`environment`: invalid variable {key:?}"));
        }
        environment.push((key, value));
    }

    let mut files = Vec::with_capacity(raw.files.len());
    for mount in raw.files {
        let source = base.join(&mount.source);
        if !source.is_dir() {
            return Err(format!(
                "`files`: source {:?} is not a directory",
                source.display().to_string()
            ));
        }
        if !mount.destination.starts_with('/') {
            return Err(format!("`files`: destination {:?} must be an absolute path", mount.destination));
        }
        files.push(FileMount { source, destination: mount.destination });
    }

    let allowed_outbound_hosts = raw
        .allowed_outbound_hosts
        .iter()
        .map(|pattern| OutboundHost::parse(pattern))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`allowed_outbound_hosts`: {e}"))?;

    for model in &raw.models {
        validate_name(model).map_err(|e| format!("`models`: {model:?}: {e}"))?;
    }
    let max_model_upload_size = match raw.max_model_upload_size {
        Some(text) => parse_size(&text).map_err(|e| format!("`max_model_upload_size`: {e}"))?,
        None => DEFAULT_MAX_MODEL_UPLOAD_SIZE,
    };

    for trainer in &raw.trainers {
        validate_name(trainer).map_err(|e| format!("`trainers`: {trainer:?}: {e}"))?;
    }
    Ok(FunctionSpec {
        trainers: raw.trainers,
        models: raw.models,
        allow_model_upload: raw.allow_model_upload,
        max_model_upload_size,
        name: name.to_owned(),
        component_path,
        component_digest,
        route,
        timeout,
        memory_limit,
        max_concurrency,
        max_queue,
        max_body_size,
        environment,
        files,
        allowed_outbound_hosts,
    })
}

/// The sha256 (lowercase hex) of the file at `path`.
fn file_digest(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {:?}: {e}", path.display().to_string()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// `target = "cpu" | "gpu"`, `cpu` when absent.
fn parse_target(target: Option<&str>) -> Result<Target, String> {
    match target {
        None | Some("cpu") => Ok(Target::Cpu),
        Some("gpu") => Ok(Target::Gpu),
        Some(other) => Err(format!("`target`: {other:?} is not \"cpu\" or \"gpu\"")),
    }
}

fn resolve_trainer(name: &str, raw: RawTrainer, base: &Path) -> Result<TrainerSpec, String> {
    validate_name(name)?;
    let init = base.join(&raw.init);
    let init_digest = file_digest(&init).map_err(|e| format!("`init`: {e}"))?;
    let loss = match raw.loss.as_str() {
        "cross-entropy" => Loss::CrossEntropy,
        "mse" => Loss::Mse,
        other => return Err(format!("`loss`: {other:?} is not \"cross-entropy\" or \"mse\"")),
    };
    let lr = raw.optimizer.lr;
    if !(lr.is_finite() && lr > 0.0) {
        return Err(format!("`optimizer.lr`: {lr} must be a positive number"));
    }
    let optimizer = match raw.optimizer.kind.as_str() {
        "adamw" => {
            if raw.optimizer.momentum.is_some() {
                return Err("`optimizer.momentum` applies to \"sgd\" only".to_owned());
            }
            Optimizer::AdamW { lr, weight_decay: raw.optimizer.weight_decay.unwrap_or(0.01) }
        }
        "sgd" => {
            if raw.optimizer.weight_decay.is_some() {
                return Err("`optimizer.weight_decay` applies to \"adamw\" only".to_owned());
            }
            let momentum = raw.optimizer.momentum.unwrap_or(0.0);
            if !(0.0..1.0).contains(&momentum) {
                return Err(format!("`optimizer.momentum`: {momentum} must be in [0, 1)"));
            }
            Optimizer::Sgd { lr, momentum }
        }
        other => return Err(format!("`optimizer.kind`: {other:?} is not \"adamw\" or \"sgd\"")),
    };
    let target = parse_target(raw.target.as_deref())?;
    let checkpoint_every = match raw.checkpoint_every {
        Some(text) => parse_duration(&text).map_err(|e| format!("`checkpoint_every`: {e}"))?,
        None => Duration::from_secs(30),
    };
    if checkpoint_every.is_zero() {
        return Err("`checkpoint_every`: must be more than 0s".to_owned());
    }
    Ok(TrainerSpec { name: name.to_owned(), init, init_digest, loss, optimizer, target, checkpoint_every, publishes: raw.publishes })
}

fn resolve_model(name: &str, raw: RawModel, base: &Path) -> Result<ModelSpec, String> {
    validate_name(name)?;
    let path = base.join(&raw.path);
    let digest = file_digest(&path).map_err(|e| format!("`path`: {e}"))?;
    let target = parse_target(raw.target.as_deref())?;
    let batch = match raw.batch {
        Some(batch) => {
            let max_wait = parse_duration(&batch.max_wait).map_err(|e| format!("`batch.max_wait`: {e}"))?;
            if batch.max_size < 1 || max_wait > Duration::from_secs(1) {
                return Err("`batch`: `max_size` must be at least 1 and `max_wait` at most 1s".to_owned());
            }
            Some(BatchSpec { max_size: batch.max_size, max_wait })
        }
        None => None,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let sessions = raw.sessions.unwrap_or(cores);
    let threads = raw.threads.unwrap_or(1);
    if !(1..=256).contains(&sessions) || !(1..=256).contains(&threads) {
        return Err("`sessions` and `threads` must be between 1 and 256".to_owned());
    }
    Ok(ModelSpec { name: name.to_owned(), path, digest, target, batch, sessions, threads })
}

/// Names: 1 to 64 characters of `a-z`, `0-9`, `-` and `_`, starting with a letter.
fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err("invalid name: use 1 to 64 of a-z, 0-9, '-' and '_', starting with a letter".to_owned())
    }
}

fn validate_route(route: &str) -> Result<String, String> {
    if !route.starts_with('/') {
        return Err(format!("{route:?} must start with '/'"));
    }
    if route.contains(['?', '#', '*', ' ']) || route.contains("//") {
        return Err(format!("{route:?} must be a plain path (no query, fragment, wildcard or empty segment)"));
    }
    let route = if route.len() > 1 { route.trim_end_matches('/') } else { route };
    if route == RESERVED_ROUTE_PREFIX || route.starts_with(&format!("{RESERVED_ROUTE_PREFIX}/")) {
        return Err(format!("{route:?} is reserved for the host"));
    }
    Ok(route.to_owned())
}

/// Parses `"250ms"`, `"5s"`, `"2m"`, `"1h"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let error = || format!("invalid duration {text:?} (expected a whole number with ms, s, m or h, e.g. \"5s\")");
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let number: u64 = digits.parse().map_err(|_| error())?;
    let millis = match &text[digits.len()..] {
        "ms" => Some(number),
        "s" => number.checked_mul(1000),
        "m" => number.checked_mul(60_000),
        "h" => number.checked_mul(3_600_000),
        _ => None,
    };
    millis.map(Duration::from_millis).ok_or_else(error)
}

/// Parses `"512KiB"`, `"64MiB"`, `"1GiB"` (also `B`, `KB`, `MB`, `GB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let error = || format!("invalid size {text:?} (expected a whole number with B, KiB, MiB or GiB, e.g. \"64MiB\")");
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let number: u64 = digits.parse().map_err(|_| error())?;
    let unit: u64 = match &text[digits.len()..] {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(error()),
    };
    number.checked_mul(unit).ok_or_else(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("five s").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("10KB"), Ok(10_000));
        assert!(parse_size("64 MiB").is_err());
        assert!(parse_size("99999999999GiB").is_err());
    }

    #[test]
    fn outbound_hosts() {
        let host = OutboundHost::parse("http://127.0.0.1:8080").expect("valid");
        assert!(host.matches("http", "127.0.0.1", 8080));
        assert!(!host.matches("https", "127.0.0.1", 8080));
        assert!(!host.matches("http", "127.0.0.1", 8081));
        assert_eq!(OutboundHost::parse("https://Example.com").expect("valid").to_string(), "https://example.com:443");
        assert!(OutboundHost::parse("ftp://x:1").is_err());
        assert!(OutboundHost::parse("http://x:1/path").is_err());
        assert!(OutboundHost::parse("http://*:1").is_err());
        assert!(OutboundHost::parse("127.0.0.1:80").is_err());
        assert_eq!(OutboundHost::parse("http://[::1]").expect("valid").to_string(), "http://[::1]:80");
        assert!(OutboundHost::parse("http://[::1]:8080").expect("valid").matches("http", "[::1]", 8080));
    }

    #[test]
    fn routes() {
        assert_eq!(validate_route("/hello/"), Ok("/hello".to_owned()));
        assert_eq!(validate_route("/"), Ok("/".to_owned()));
        assert!(validate_route("hello").is_err());
        assert!(validate_route("/.well-known/lepton/health").is_err());
        assert!(validate_route("/a?b").is_err());
    }
}
