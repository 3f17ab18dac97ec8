//! The `lepton.toml` manifest, parsed in two stages.
//!
//! [`RawManifest`] mirrors the TOML exactly (typed serde, unknown keys rejected);
//! [`Manifest::load`] validates it and resolves it into a [`LockedApp`]: sizes and
//! durations parsed, names validated, and every file (component, model, trainer init,
//! `files` directory packed as a tar) replaced by the sha256 digest of its bytes. The
//! bytes themselves stay on the side, in [`Manifest::blobs`], for the node's blob store
//! (`lepton up`) or an upload (`lepton deploy`).
//!
//! ```toml
//! manifest_version = 1
//! name = "shop"                   # the app; default: the manifest directory's name
//!
//! [function.hello]
//! component = "target/guests/wasm32-wasip2/release/hello.wasm"
//! route = "/hello"                # exactly /hello; "/hello/..." also below it; "/..." all
//! timeout = "5s"                  # default 30s
//! memory_limit = "64MiB"          # default 128MiB
//! max_concurrency = 64            # default 64 in-flight requests
//! max_queue = 256                 # default 256 waiting requests, then 503
//! max_body_size = "10MiB"         # default 10MiB, then 413
//! environment = { GREETING = "hi" }
//! files = [{ source = "static", destination = "/static" }]   # read-only
//! allowed_outbound_hosts = ["http://127.0.0.1:8080"]
//! key_value_stores = ["default"]  # wasi:keyvalue stores of the app (default none)
//! config = { threshold = "0.8", api_key = { env = "API_KEY" } }   # wasi:config
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

pub use crate::locked::{
    AlertSpec, BatchSpec, Digest, FileMount, FunctionSpec, LOCK_VERSION, LockedApp, Loss,
    MAX_MEMORY_LIMIT, MAX_TIMEOUT, ModelSpec, Name, Optimizer, OutboundHost, Protocol,
    RESERVED_ROUTE_PREFIX, Route, Scale, SpecError, Target, TrainerSpec,
};

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
/// Default cap on a model a guest loads from bytes (`allow_model_upload`).
pub const DEFAULT_MAX_MODEL_UPLOAD_SIZE: u64 = 64 << 20;

/// The largest manifest file read.
pub const MAX_MANIFEST_SIZE: u64 = 1 << 20;

/// The largest component or model file a manifest may name.
pub const MAX_FILE_SIZE: u64 = 8 << 30;
/// Largest `files` directory packed into one blob (it is packed in memory).
pub const MAX_MOUNT_SIZE: u64 = 512 << 20;

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
    #[error("invalid manifest `{path}`: {error}")]
    Invalid {
        /// The manifest's path.
        path: PathBuf,
        /// What is wrong, naming the function and the key.
        error: SpecError,
    },
}

/// The manifest exactly as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawManifest {
    /// Must be [`MANIFEST_VERSION`].
    pub manifest_version: u32,
    /// The app's name (default: the manifest directory's name).
    pub name: Option<String>,
    /// `[function.NAME]` tables.
    #[serde(default)]
    pub function: BTreeMap<String, RawFunction>,
    /// `[model.NAME]` tables.
    #[serde(default)]
    pub model: BTreeMap<String, RawModel>,
    /// `[trainer.NAME]` tables.
    #[serde(default)]
    pub trainer: BTreeMap<String, RawTrainer>,
    /// `[alert.NAME]` tables.
    #[serde(default)]
    pub alert: BTreeMap<String, RawAlert>,
}

/// One `[alert.NAME]` table as written.
///
/// ```toml
/// [alert.detect-errors]
/// function = "detect"
/// when = "error_rate > 0.05"     # also rejected_rate > 0.01, p99_latency > 250ms, p50_latency
/// over = "1m"                    # the rolling window, 1s to 10m (default 1m)
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlert {
    /// The function it watches.
    pub function: String,
    /// The condition.
    pub when: String,
    /// The window (default 1m).
    pub over: Option<String>,
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
/// protocol = "v2"                      # serve it over the Open Inference Protocol (default: not exposed)
/// token_env = "MAGIKA_TOKEN"           # clients send `Authorization: Bearer $MAGIKA_TOKEN`
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
    /// `"v2"`: served to clients over the Open Inference Protocol.
    pub protocol: Option<String>,
    /// The environment variable holding the bearer token clients must send.
    pub token_env: Option<String>,
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
    /// The HTTP route: `"/hello"` (exactly), `"/hello/..."` (and below), `"/..."` (all).
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
    /// `wasi:keyvalue` stores this function may open, e.g. `["default", "cache"]`.
    #[serde(default)]
    pub key_value_stores: Vec<String>,
    /// `wasi:config` values: `{ threshold = "0.8", api_key = { env = "API_KEY" } }`.
    #[serde(default)]
    pub config: BTreeMap<String, RawConfigValue>,
    /// Replicas a cluster runs (default 1); `lepton up` runs one.
    pub replicas: Option<u32>,
    /// Autoscaling bounds, instead of `replicas`.
    pub scale: Option<RawScale>,
    /// Where a cluster may place the function (ignored by `lepton up`).
    pub placement: Option<crate::locked::PlacementSpec>,
}

/// A `config` value: a string, or `{ env = "NAME" }`.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string, or { env = \"NAME\" }")]
pub enum RawConfigValue {
    /// The value itself.
    Value(String),
    /// Taken from the node's environment when the app loads.
    Env {
        /// The variable's name.
        env: String,
    },
}

/// `scale = { min = 0, max = 8, target_concurrency = 10, scale_to_zero_after = "30s" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScale {
    /// Fewest replicas (default 0).
    #[serde(default)]
    pub min: u32,
    /// Most replicas.
    pub max: u32,
    /// In-flight requests per replica aimed at (default 10).
    pub target_concurrency: Option<u32>,
    /// Idle time before scaling to zero (default 30s).
    pub scale_to_zero_after: Option<String>,
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

/// Where the bytes of one blob of a manifest are.
#[derive(Debug, Clone)]
pub enum BlobSource {
    /// A file, read when the blob is stored or uploaded.
    File(PathBuf),
    /// Bytes made while loading (a `files` directory packed as a tar).
    Bytes(Arc<[u8]>),
}

/// A loaded manifest: the locked app and where each of its blobs' bytes are.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Where the manifest was read from.
    pub path: PathBuf,
    /// The content-addressed app.
    pub app: LockedApp,
    /// The bytes behind each digest the app names.
    pub blobs: BTreeMap<Digest, BlobSource>,
}

/// A per-item failure while resolving: the key (if one is at fault) and the reason.
type ItemError = (Option<&'static str>, String);

fn at(key: &'static str) -> impl Fn(String) -> ItemError {
    move |reason| (Some(key), reason)
}

impl Manifest {
    /// Reads, validates and resolves the manifest at `path`.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let read = |source| ManifestError::Read {
            path: path.to_owned(),
            source,
        };
        let bytes = crate::fsutil::read_regular_file(path, MAX_MANIFEST_SIZE).map_err(read)?;
        let text = String::from_utf8(bytes).map_err(|_| {
            read(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not UTF-8 text",
            ))
        })?;
        Self::from_toml(&text, path)
    }

    /// Validates and resolves manifest text; relative paths resolve against `path`'s directory.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ManifestError> {
        let raw: RawManifest = toml::from_str(text).map_err(|e| ManifestError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |error: SpecError| ManifestError::Invalid {
            path: path.to_owned(),
            error,
        };
        if raw.manifest_version != MANIFEST_VERSION {
            return Err(invalid(SpecError::new(
                "",
                None,
                format!(
                    "`manifest_version` is {}, this host supports only {MANIFEST_VERSION}",
                    raw.manifest_version
                ),
            )));
        }
        let base = path.parent().map(Path::to_owned).unwrap_or_default();
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        let name = match &raw.name {
            Some(name) => {
                Name::new(name).map_err(|e| invalid(SpecError::new("", Some("name"), e)))?
            }
            None => {
                let dir = std::fs::canonicalize(&base).unwrap_or_else(|_| base.clone());
                Name::sanitized(
                    &dir.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                )
            }
        };
        let mut blobs = BTreeMap::new();
        fn item<T>(
            path: &Path,
            kind: &str,
            name: &str,
            result: Result<T, ItemError>,
        ) -> Result<T, ManifestError> {
            result.map_err(|(key, reason)| ManifestError::Invalid {
                path: path.to_owned(),
                error: SpecError::new(format!("{kind} `{name}`"), key, reason),
            })
        }
        let mut models = Vec::with_capacity(raw.model.len());
        for (name, model) in raw.model {
            models.push(item(
                path,
                "model",
                &name,
                resolve_model(&name, model, &base, &mut blobs),
            )?);
        }
        let mut trainers = Vec::with_capacity(raw.trainer.len());
        for (name, trainer) in raw.trainer {
            trainers.push(item(
                path,
                "trainer",
                &name,
                resolve_trainer(&name, trainer, &base, &mut blobs),
            )?);
        }
        let mut functions = Vec::with_capacity(raw.function.len());
        for (name, function) in raw.function {
            functions.push(item(
                path,
                "function",
                &name,
                resolve_function(&name, function, &base, &mut blobs),
            )?);
        }
        let mut alerts = Vec::with_capacity(raw.alert.len());
        for (name, alert) in raw.alert {
            alerts.push(item(path, "alert", &name, resolve_alert(&name, &alert))?);
        }
        let app = LockedApp {
            lock_version: LOCK_VERSION,
            name,
            functions,
            models,
            trainers,
            alerts,
        };
        app.validate().map_err(invalid)?;
        Ok(Self {
            path: path.to_owned(),
            app,
            blobs,
        })
    }
}

fn resolve_alert(alert: &str, raw: &RawAlert) -> Result<AlertSpec, ItemError> {
    let (metric, above, threshold) =
        AlertSpec::parse_when(&raw.when).map_err(|e| (Some("when"), e))?;
    Ok(AlertSpec {
        name: name(alert)?,
        function: Name::new(&raw.function).map_err(|e| (Some("function"), e))?,
        metric,
        above,
        threshold,
        over: raw
            .over
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|e| (Some("over"), e))?
            .unwrap_or(Duration::from_secs(60)),
    })
}

fn name(name: &str) -> Result<Name, ItemError> {
    Name::new(name).map_err(|e| (None, e))
}

fn names(key: &'static str, list: &[String]) -> Result<Vec<Name>, ItemError> {
    list.iter()
        .map(|n| Name::new(n).map_err(|e| (Some(key), format!("{n:?}: {e}"))))
        .collect()
}

/// Digests the file at `base/relative` and records it as a blob source.
fn file_blob(
    base: &Path,
    relative: &str,
    blobs: &mut BTreeMap<Digest, BlobSource>,
) -> Result<Digest, String> {
    let path = base.join(relative);
    let bytes = crate::fsutil::read_regular_file(&path, MAX_FILE_SIZE)
        .map_err(|e| format!("cannot read {:?}: {e}", path.display().to_string()))?;
    let digest = Digest::of(&bytes);
    blobs.insert(digest.clone(), BlobSource::File(path));
    Ok(digest)
}

fn resolve_function(
    function: &str,
    raw: RawFunction,
    base: &Path,
    blobs: &mut BTreeMap<Digest, BlobSource>,
) -> Result<FunctionSpec, ItemError> {
    let name = name(function)?;
    let component = file_blob(base, &raw.component, blobs).map_err(at("component"))?;
    let route = Route::parse(&raw.route)
        .and_then(|route| route.check_new().map(|()| route))
        .map_err(at("route"))?;
    let timeout = raw
        .timeout
        .map_or(Ok(DEFAULT_TIMEOUT), |t| parse_duration(&t))
        .map_err(at("timeout"))?;
    let memory_limit = raw
        .memory_limit
        .map_or(Ok(DEFAULT_MEMORY_LIMIT), |t| parse_size(&t))
        .map_err(at("memory_limit"))?;
    let max_body_size = raw
        .max_body_size
        .map_or(Ok(DEFAULT_MAX_BODY_SIZE), |t| parse_size(&t))
        .map_err(at("max_body_size"))?;
    let max_model_upload_size = raw
        .max_model_upload_size
        .map_or(Ok(DEFAULT_MAX_MODEL_UPLOAD_SIZE), |t| parse_size(&t))
        .map_err(at("max_model_upload_size"))?;
    let mut files = Vec::with_capacity(raw.files.len());
    for mount in raw.files {
        let source = base.join(&mount.source);
        if !source.is_dir() {
            return Err((
                Some("files"),
                format!(
                    "source {:?} is not a directory",
                    source.display().to_string()
                ),
            ));
        }
        let tar = crate::blobs::pack_dir(&source, MAX_MOUNT_SIZE)
            .map_err(|e| (Some("files"), format!("{e:#}")))?;
        let digest = Digest::of(&tar);
        blobs.insert(digest.clone(), BlobSource::Bytes(Arc::from(tar)));
        files.push(FileMount {
            source: digest,
            destination: mount.destination,
        });
    }
    let scale = match (raw.replicas, &raw.scale) {
        (Some(_), Some(_)) => {
            return Err((
                Some("scale"),
                "give `replicas` or `scale`, not both".to_owned(),
            ));
        }
        (Some(n), None) => Scale::Fixed(n),
        (None, None) => Scale::default(),
        (None, Some(scale)) => Scale::Auto {
            min: scale.min,
            max: scale.max,
            target_concurrency: scale.target_concurrency.unwrap_or(10),
            scale_to_zero_after: scale
                .scale_to_zero_after
                .as_deref()
                .map_or(Ok(Duration::from_secs(30)), parse_duration)
                .map_err(at("scale"))?,
        },
    };
    let allowed_outbound_hosts = raw
        .allowed_outbound_hosts
        .iter()
        .map(|pattern| OutboundHost::parse(pattern))
        .collect::<Result<Vec<_>, _>>()
        .map_err(at("allowed_outbound_hosts"))?;
    Ok(FunctionSpec {
        name,
        component,
        route,
        timeout,
        memory_limit,
        max_concurrency: raw.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY),
        max_queue: raw.max_queue.unwrap_or(DEFAULT_MAX_QUEUE),
        max_body_size,
        environment: raw.environment.into_iter().collect(),
        files,
        allowed_outbound_hosts,
        models: names("models", &raw.models)?,
        allow_model_upload: raw.allow_model_upload,
        max_model_upload_size,
        trainers: names("trainers", &raw.trainers)?,
        key_value_stores: names("key_value_stores", &raw.key_value_stores)?,
        config: raw
            .config
            .into_iter()
            .map(|(key, value)| {
                let value = match value {
                    RawConfigValue::Value(text) => crate::locked::ConfigValue::Value(text),
                    RawConfigValue::Env { env } => crate::locked::ConfigValue::Env(env),
                };
                (key, value)
            })
            .collect(),
        scale,
        placement: raw.placement.unwrap_or_default(),
    })
}

/// `target = "cpu" | "gpu"`, `cpu` when absent.
fn parse_target(target: Option<&str>) -> Result<Target, ItemError> {
    match target {
        None | Some("cpu") => Ok(Target::Cpu),
        Some("gpu") => Ok(Target::Gpu),
        Some(other) => Err((
            Some("target"),
            format!("{other:?} is not \"cpu\" or \"gpu\""),
        )),
    }
}

fn resolve_trainer(
    trainer: &str,
    raw: RawTrainer,
    base: &Path,
    blobs: &mut BTreeMap<Digest, BlobSource>,
) -> Result<TrainerSpec, ItemError> {
    let name = name(trainer)?;
    let init = file_blob(base, &raw.init, blobs).map_err(at("init"))?;
    let loss = match raw.loss.as_str() {
        "cross-entropy" => Loss::CrossEntropy,
        "mse" => Loss::Mse,
        other => {
            return Err((
                Some("loss"),
                format!("{other:?} is not \"cross-entropy\" or \"mse\""),
            ));
        }
    };
    let lr = raw.optimizer.lr;
    let optimizer = match raw.optimizer.kind.as_str() {
        "adamw" => {
            if raw.optimizer.momentum.is_some() {
                return Err((
                    Some("optimizer.momentum"),
                    "applies to \"sgd\" only".to_owned(),
                ));
            }
            Optimizer::AdamW {
                lr,
                weight_decay: raw.optimizer.weight_decay.unwrap_or(0.01),
            }
        }
        "sgd" => {
            if raw.optimizer.weight_decay.is_some() {
                return Err((
                    Some("optimizer.weight_decay"),
                    "applies to \"adamw\" only".to_owned(),
                ));
            }
            Optimizer::Sgd {
                lr,
                momentum: raw.optimizer.momentum.unwrap_or(0.0),
            }
        }
        other => {
            return Err((
                Some("optimizer.kind"),
                format!("{other:?} is not \"adamw\" or \"sgd\""),
            ));
        }
    };
    let target = parse_target(raw.target.as_deref())?;
    let checkpoint_every = raw
        .checkpoint_every
        .map_or(Ok(Duration::from_secs(30)), |t| parse_duration(&t))
        .map_err(at("checkpoint_every"))?;
    let publishes = raw
        .publishes
        .map(|p| Name::new(&p).map_err(|e| (Some("publishes"), format!("{p:?}: {e}"))))
        .transpose()?;
    Ok(TrainerSpec {
        name,
        init,
        loss,
        optimizer,
        target,
        checkpoint_every,
        publishes,
    })
}

fn resolve_model(
    model: &str,
    raw: RawModel,
    base: &Path,
    blobs: &mut BTreeMap<Digest, BlobSource>,
) -> Result<ModelSpec, ItemError> {
    let name = name(model)?;
    let file = file_blob(base, &raw.path, blobs).map_err(at("path"))?;
    let target = parse_target(raw.target.as_deref())?;
    let batch = match raw.batch {
        Some(batch) => Some(BatchSpec {
            max_size: batch.max_size,
            max_wait: parse_duration(&batch.max_wait).map_err(at("batch.max_wait"))?,
        }),
        None => None,
    };
    Ok(ModelSpec {
        name,
        file,
        target,
        batch,
        sessions: raw.sessions,
        threads: raw.threads.unwrap_or(1),
        protocol: match raw.protocol.as_deref() {
            None => None,
            Some("v2") => Some(Protocol::V2),
            Some(other) => {
                return Err((
                    Some("protocol"),
                    format!(
                        "{other:?} is not a protocol Lepton serves (\"v2\": the Open Inference Protocol)"
                    ),
                ));
            }
        },
        token_env: raw.token_env,
    })
}

/// Parses `"250ms"`, `"5s"`, `"2m"`, `"1h"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let error = || {
        format!(
            "invalid duration {text:?} (expected a whole number with ms, s, m or h, e.g. \"5s\")"
        )
    };
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
    let error = || {
        format!(
            "invalid size {text:?} (expected a whole number with B, KiB, MiB or GiB, e.g. \"64MiB\")"
        )
    };
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
    fn a_manifest_locks_to_digests_and_its_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("f.wasm"), b"bytes").expect("write");
        std::fs::create_dir(dir.path().join("static")).expect("mkdir");
        std::fs::write(dir.path().join("static/a.txt"), b"a").expect("write");
        let text = "manifest_version = 1\nname = \"shop\"\n[function.f]\ncomponent = \"f.wasm\"\nroute = \"/f/...\"\n\
                    files = [{ source = \"static\", destination = \"/s\" }]\n";
        let path = dir.path().join("lepton.toml");
        let manifest = Manifest::from_toml(text, &path).expect("valid");
        assert_eq!(manifest.app.name.as_str(), "shop");
        let function = &manifest.app.functions[0];
        assert_eq!(function.component, Digest::of(b"bytes"));
        assert_eq!(function.route.to_string(), "/f/...");
        assert_eq!(manifest.app.blobs().len(), 2);
        // Packing is deterministic: the same directory gives the same digest.
        let again = Manifest::from_toml(text, &path).expect("valid");
        assert_eq!(again.app.digest(), manifest.app.digest());
        // Apps without cluster keys keep the digest they had before those keys existed.
        let json = serde_json::to_string(&manifest.app).expect("json");
        assert!(
            !json.contains("scale") && !json.contains("placement"),
            "{json}"
        );
        let error =
            Manifest::from_toml(&text.replace("/f/...", "/f/*"), &path).expect_err("wildcard");
        assert!(
            error.to_string().contains(
                "function `f`: `route`: \"/f/*\": wildcards are written only as a final `/...`"
            ),
            "{error}"
        );
    }

    #[test]
    fn replicas_scale_and_placement_are_checked() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("f.wasm"), b"bytes").expect("write");
        let path = dir.path().join("lepton.toml");
        let with = |keys: &str| {
            Manifest::from_toml(
                &format!(
                    "manifest_version = 1\n[function.f]\ncomponent = \"f.wasm\"\nroute = \"/f\"\n{keys}\n"
                ),
                &path,
            )
        };
        let scaled = with(
            "scale = { min = 0, max = 8, target_concurrency = 4, scale_to_zero_after = \"2s\" }\n\
             placement = { tier = \"edge\", accelerator = \"preferred\", labels = { zone = \"a\" }, near_region = \"eu-west\" }",
        )
        .expect("valid");
        let f = &scaled.app.functions[0];
        assert_eq!(
            f.scale,
            Scale::Auto {
                min: 0,
                max: 8,
                target_concurrency: 4,
                scale_to_zero_after: Duration::from_secs(2)
            }
        );
        assert_eq!(f.placement.tier.as_deref(), Some("edge"));
        assert_eq!(
            f.placement.accelerator,
            crate::locked::AcceleratorUse::Preferred
        );
        assert_eq!(
            with("replicas = 3").expect("valid").app.functions[0].scale,
            Scale::Fixed(3)
        );
        for (keys, says) in [
            ("replicas = 2\nscale = { max = 2 }", "not both"),
            ("scale = { min = 3, max = 2 }", "min <= max"),
            ("scale = { max = 0 }", "min <= max"),
            ("replicas = 100000", "at most 1000"),
            (
                "placement = { tier = \"moon\" }",
                "not \"cloud\" or \"edge\"",
            ),
            (
                "placement = { labels = { \"a b\" = \"c\" } }",
                "labels and regions",
            ),
            ("placement = { accelerator = \"maybe\" }", "maybe"),
            ("placement = { gpus = 2 }", "gpus"),
        ] {
            let error = with(keys).expect_err(keys).to_string();
            assert!(error.contains(says), "{keys}: {error}");
        }
    }
}
