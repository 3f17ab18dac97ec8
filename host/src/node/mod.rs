//! The long-lived node: engine, linker, ONNX Runtime, blob store, model and trainer
//! registries, the app store, and the function table that requests are routed through.
//!
//! A deploy builds the new version completely off the request path (components
//! compiled or loaded from the cache, models loaded or shared, trainers kept or
//! started, grants resolved), writes it durably, and only then swaps the table
//! atomically; a request already routed keeps its `Arc<Function>` and finishes on the
//! old version. A version that fails to build is rejected and the active one keeps
//! serving.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use lepton_host::manifest::Manifest;
//! use lepton_host::node::{Node, NodeConfig};
//!
//! let node = Node::open(NodeConfig::new(".lepton".into())).await?;
//! let manifest = Manifest::load("lepton.toml".as_ref())?;
//! let deployed = node.deploy_manifest(&manifest, "local").await?;
//! println!("{} version {}", deployed.app, deployed.version);
//! # Ok(()) }
//! ```

pub mod audit;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use serde::Serialize;
use wasmtime::component::Linker;

use self::audit::{AuditLog, AuditRecord};
use self::store::{AppStore, DEFAULT_KEEP_VERSIONS, StoredVersion};
use crate::blobs::BlobStore;
use crate::caps::{Grants, InstanceState};
use crate::engine::Runtime;
use crate::http::Function;
use crate::locked::{Digest, LockedApp, ModelSpec, Name, SpecError};
use crate::manifest::{BlobSource, Manifest};
use crate::nn::{ModelRegistry, ModelSlot, OnnxRuntime, Source};
use crate::train::{Publisher, TrainCtx, TrainerRegistry};

/// How a node is set up.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeConfig {
    /// Where blobs, versions, caches, checkpoints and the audit log are kept.
    pub state_dir: PathBuf,
    /// Component instances that may run at once (all functions together).
    pub max_instances: u32,
    /// Versions kept per app.
    pub keep_versions: usize,
    /// Directories searched for ONNX Runtime before the defaults (see [`OnnxRuntime::search_path`]).
    pub ort_search: Vec<PathBuf>,
    /// Whether [`Node::open`] serves the apps that were active in the state dir.
    pub restore: bool,
    /// Bytes of request bodies held at once, all functions together.
    pub body_budget: u64,
}

impl NodeConfig {
    /// Defaults, with state under `state_dir`.
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            ort_search: vec![state_dir.join("onnxruntime")],
            state_dir,
            max_instances: crate::engine::DEFAULT_POOL_INSTANCES,
            keep_versions: DEFAULT_KEEP_VERSIONS,
            restore: true,
            body_budget: crate::http::DEFAULT_BODY_BUDGET,
        }
    }

    /// Sets the node-wide budget for request bodies held at once.
    #[must_use]
    pub fn body_budget(mut self, bytes: u64) -> Self {
        self.body_budget = bytes;
        self
    }

    /// Sets whether the apps active in the state dir are served at open (`lepton check`: no).
    #[must_use]
    pub fn restore(mut self, restore: bool) -> Self {
        self.restore = restore;
        self
    }

    /// Sets the instance pool's size.
    #[must_use]
    pub fn max_instances(mut self, instances: u32) -> Self {
        self.max_instances = instances;
        self
    }

    /// Sets how many versions of each app are kept.
    #[must_use]
    pub fn keep_versions(mut self, keep: usize) -> Self {
        self.keep_versions = keep;
        self
    }

    /// Searches `dir` for ONNX Runtime too (before the defaults).
    #[must_use]
    pub fn ort_dir(mut self, dir: PathBuf) -> Self {
        self.ort_search.push(dir);
        self
    }
}

/// Why a deploy, rollback or removal did not happen. Nothing changed on the node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeployError {
    /// The app is not acceptable (validation, or it failed to load); 400.
    #[error("{0}")]
    Invalid(SpecError),
    /// Blobs the app names are not in the node's store; 400.
    #[error("missing blobs: {}", .0.iter().map(Digest::as_str).collect::<Vec<_>>().join(", "))]
    MissingBlobs(Vec<Digest>),
    /// A route is already served by another app; 409.
    #[error(
        "route \"{route}\" of function `{function}` in app `{app}` is already served by function `{other_function}` of app `{other_app}`"
    )]
    RouteConflict {
        /// The route.
        route: String,
        /// The app deployed.
        app: String,
        /// Its function claiming the route.
        function: String,
        /// The app that has it.
        other_app: String,
        /// Its function.
        other_function: String,
    },
    /// A model served over the Open Inference Protocol has a name another app serves
    /// that way; 409.
    #[error(
        "model `{model}` of app `{app}` is already served under /v2/models/{model} by app `{other_app}`"
    )]
    ModelConflict {
        /// The model.
        model: String,
        /// The app deployed.
        app: String,
        /// The app that serves a model by that name.
        other_app: String,
    },
    /// No such app or version; 404.
    #[error("{0}")]
    NotFound(String),
    /// The node could not do it (disk); 500.
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

impl DeployError {
    /// The error as `{scope, key, reason}` (the API's JSON and the CLI's text say the same).
    pub fn spec_error(&self) -> SpecError {
        match self {
            Self::Invalid(error) => error.clone(),
            Self::RouteConflict { app, .. } => {
                SpecError::new(format!("app `{app}`"), Some("route"), self.to_string())
            }
            Self::ModelConflict { model, .. } => SpecError::new(
                format!("model `{model}`"),
                Some("protocol"),
                self.to_string(),
            ),
            other => SpecError::new("", None, other.to_string()),
        }
    }
}

/// What a deploy or rollback came to.
#[derive(Debug, Clone, Serialize)]
pub struct Deployed {
    /// The app.
    pub app: Name,
    /// The version serving now.
    pub version: u64,
    /// Whether the content was already active (nothing changed).
    pub unchanged: bool,
    /// The routes it serves, `(function, route)`.
    pub routes: Vec<(String, String)>,
}

/// The active version of one app, built.
pub struct ActiveApp {
    name: Name,
    version: u64,
    digest: Digest,
    /// Every blob the version references.
    blobs: Vec<Digest>,
    functions: Vec<Arc<Function>>,
    models: Arc<AppModels>,
    alerts: Vec<crate::locked::AlertSpec>,
    /// Its models served over the Open Inference Protocol.
    endpoints: Vec<Arc<crate::infer::Endpoint>>,
    /// The app's versions kept on the node when this one was made active.
    kept: Vec<u64>,
}

impl ActiveApp {
    /// The version serving.
    pub fn version(&self) -> u64 {
        self.version
    }
}

/// Every active app, and the routes of their functions, most specific first.
#[derive(Default)]
pub struct FunctionTable {
    apps: BTreeMap<Name, Arc<ActiveApp>>,
    routes: Vec<Arc<Function>>,
    /// Models served over the Open Inference Protocol, by name, and their app.
    endpoints: BTreeMap<String, (Arc<ActiveApp>, Arc<crate::infer::Endpoint>)>,
}

impl FunctionTable {
    fn with(&self, app: Option<Arc<ActiveApp>>, without: &Name) -> Self {
        let mut apps = self.apps.clone();
        apps.remove(without);
        if let Some(app) = app {
            apps.insert(app.name.clone(), app);
        }
        let mut routes: Vec<Arc<Function>> = apps
            .values()
            .flat_map(|a| a.functions.iter().cloned())
            .collect();
        routes.sort_by_key(|f| std::cmp::Reverse(f.spec().route.specificity()));
        let mut endpoints = BTreeMap::new();
        for app in apps.values() {
            for endpoint in &app.endpoints {
                // Deploys refuse a second app's model by the same name; an import
                // (cluster) does not check: the first app by name keeps it.
                endpoints
                    .entry(endpoint.name().to_string())
                    .or_insert_with(|| (Arc::clone(app), Arc::clone(endpoint)));
            }
        }
        Self {
            apps,
            routes,
            endpoints,
        }
    }

    /// The model served over the Open Inference Protocol as `name`: the version of its
    /// app that serves, the app's kept versions, and the endpoint.
    pub fn endpoint(&self, name: &str) -> Option<(u64, Vec<u64>, Arc<crate::infer::Endpoint>)> {
        self.endpoints
            .get(name)
            .map(|(app, endpoint)| (app.version, app.kept.clone(), Arc::clone(endpoint)))
    }

    /// The digest of the version of `app` that serves, if any.
    pub fn app_digest(&self, app: &Name) -> Option<&Digest> {
        self.apps.get(app).map(|a| &a.digest)
    }

    /// Function `function` of app `app`, if it serves here.
    pub fn function(&self, app: &Name, function: &Name) -> Option<&Arc<Function>> {
        self.apps
            .get(app)?
            .functions
            .iter()
            .find(|f| &f.spec().name == function)
    }

    /// The function serving `path` (normalized), if any.
    pub fn route(&self, path: &str) -> Option<&Arc<Function>> {
        self.routes.iter().find(|f| f.spec().route.matches(path))
    }

    /// Every function, most specific route first.
    pub fn functions(&self) -> &[Arc<Function>] {
        &self.routes
    }
}

/// A callback told what a build loads (see [`Node::set_progress`]).
pub type Progress = Arc<dyn Fn(&str) + Send + Sync>;

/// The long-lived node.
pub struct Node {
    runtime: Runtime,
    linker: Linker<InstanceState>,
    large_linker: Linker<InstanceState>,
    config: NodeConfig,
    blobs: BlobStore,
    models: Mutex<Option<Arc<ModelRegistry>>>,
    trainers: TrainerRegistry,
    /// The apps' `wasi:keyvalue` stores, opened on first grant.
    kv: Mutex<Option<Arc<crate::kv::Stores>>>,
    /// Set while [`Node::open`] rebuilds stored versions: checks added since they were
    /// stored warn instead of refusing (an upgrade never drops a serving app).
    restoring: std::sync::atomic::AtomicBool,
    table: ArcSwap<FunctionTable>,
    /// The app store; holding it is the deploy lock (one change at a time).
    store: tokio::sync::Mutex<AppStore>,
    audit: AuditLog,
    /// Metrics handles, logs and statistics of every function, by name.
    ops: crate::ops::Ops,
    /// Told of each model, trainer and function a build loads (for a progress bar).
    progress: std::sync::RwLock<Option<Progress>>,
    /// Apps swapped out of the table, while requests may still hold them: their blobs
    /// (mounts opened per request) are not collected.
    retired: Mutex<Vec<std::sync::Weak<ActiveApp>>>,
    /// An exclusive lock on `<state-dir>/lock`: one process per state dir.
    _lock: std::fs::File,
}

/// Everything a guest may import, linked for `engine`.
fn new_linker(engine: &wasmtime::Engine) -> anyhow::Result<Linker<InstanceState>> {
    let mut linker = Linker::<InstanceState>::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)
        .map_err(anyhow::Error::from)
        .context("linking WASI")?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
        .map_err(anyhow::Error::from)
        .context("linking wasi:http")?;
    crate::nn::add_to_linker(&mut linker, InstanceState::nn)
        .map_err(anyhow::Error::from)
        .context("linking wasi:nn")?;
    crate::train::add_to_linker(&mut linker, InstanceState::train)
        .map_err(anyhow::Error::from)
        .context("linking lepton:nn/training")?;
    crate::kv::add_to_linker(&mut linker, InstanceState::kv)
        .map_err(anyhow::Error::from)
        .context("linking wasi:keyvalue")?;
    wasmtime_wasi_config::add_to_linker(&mut linker, InstanceState::config)
        .map_err(anyhow::Error::from)
        .context("linking wasi:config")?;
    Ok(linker)
}

impl Node {
    /// Opens the node on its state dir and serves every app that was active there
    /// (an app that no longer loads is skipped with an error in the log; the node
    /// starts anyway). Call it inside a multi-threaded tokio runtime.
    pub async fn open(config: NodeConfig) -> anyhow::Result<Arc<Self>> {
        let state_dir = &config.state_dir;
        crate::fsutil::private_dir(state_dir)?;
        let runtime = Runtime::with_limits(config.max_instances, config.body_budget)?;
        let linker = new_linker(runtime.engine())?;
        let large_linker = new_linker(runtime.large_engine())?;
        let lock_path = state_dir.join("lock");
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening `{}`", lock_path.display()))?;
        if lock.try_lock().is_err() {
            let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
            let holder = holder
                .trim()
                .parse::<u32>()
                .map(|pid| format!(" (pid {pid})"))
                .unwrap_or_default();
            anyhow::bail!(
                "the state dir `{}` is in use by another lepton process{holder}",
                state_dir.display()
            );
        }
        // The holder's pid, for the next one's error message.
        {
            use std::io::Write as _;
            let mut file = &lock;
            let _ = file
                .set_len(0)
                .and_then(|()| writeln!(file, "{}", std::process::id()));
        }
        // Ours now: what a killed predecessor left half-written goes.
        let removed = crate::fsutil::remove_temporaries(state_dir);
        if removed > 0 {
            tracing::info!("removed {removed} temporary files left by an earlier process");
        }
        let store = AppStore::open(state_dir, config.keep_versions)?;
        let node = Arc::new(Self {
            retired: Mutex::new(Vec::new()),
            _lock: lock,
            blobs: BlobStore::new(state_dir)?,
            trainers: TrainerRegistry::new(state_dir),
            kv: Mutex::new(None),
            restoring: std::sync::atomic::AtomicBool::new(true),
            audit: AuditLog::open(state_dir)?,
            ops: crate::ops::Ops::default(),
            progress: std::sync::RwLock::new(None),
            runtime,
            linker,
            large_linker,
            config,
            models: Mutex::new(None),
            table: ArcSwap::from_pointee(FunctionTable::default()),
            store: tokio::sync::Mutex::new(store),
        });
        let store = node.store.lock().await;
        for name in store.apps().keys().filter(|_| node.config.restore) {
            let Some(active) = store.active(name) else {
                continue;
            };
            match node.build(active, None).await {
                Ok(mut app) => {
                    app.kept = kept_versions(&store, name);
                    let table = node.table.load().with(Some(Arc::new(app)), name);
                    node.table.store(Arc::new(table));
                }
                Err(error) => {
                    tracing::error!(app = %name, version = active.version, "not serving: {error}");
                }
            }
        }
        drop(store);
        node.restoring
            .store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(node)
    }

    /// Keeps the apps' key-value stores in the cluster's JetStream (one bucket per
    /// app and store) instead of the state dir: call it before any app is built.
    pub fn use_cluster_kv(&self, js: async_nats::jetstream::Context) {
        let stores = crate::kv::Stores::cluster(js, crate::kv::Limits::default());
        *self
            .kv
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(stores));
    }

    /// The node's key-value stores (`<state-dir>/kv.redb`), opened the first time
    /// an app is granted one.
    fn kv_stores(&self) -> anyhow::Result<Arc<crate::kv::Stores>> {
        let mut kv = self
            .kv
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(stores) = &*kv {
            return Ok(Arc::clone(stores));
        }
        // Opening may repair the file after a kill: blocking work, which is why both
        // callers (a build, a removal) run inside `block_in_place`.
        let stores = Arc::new(crate::kv::Stores::open(
            &self.config.state_dir.join("kv.redb"),
            crate::kv::Limits::default(),
        )?);
        *kv = Some(Arc::clone(&stores));
        Ok(stores)
    }

    /// The table requests are routed through now.
    pub fn table(&self) -> Arc<FunctionTable> {
        self.table.load_full()
    }

    /// The node-wide budget for request bodies held at once.
    pub fn body_budget(&self) -> crate::http::BodyBudget {
        self.runtime.body_budget().clone()
    }

    /// Every app's kept versions and its active one, oldest version first.
    pub async fn records(&self) -> Vec<(Name, Vec<StoredVersion>, Option<u64>)> {
        let store = self.store.lock().await;
        store
            .apps()
            .iter()
            .map(|(name, record)| {
                (
                    name.clone(),
                    record.versions.values().cloned().collect(),
                    record.active,
                )
            })
            .collect()
    }

    /// Makes the node's record of app `name` what the cluster says: these versions
    /// (with their numbers) and `active` serving, built as a deploy would. What the node
    /// had of the app and the cluster has not is dropped.
    pub async fn import(
        &self,
        name: &Name,
        versions: &[StoredVersion],
        active: u64,
    ) -> Result<(), DeployError> {
        let mut store = self.store.lock().await;
        let target = versions
            .iter()
            .find(|v| v.version == active)
            .ok_or_else(|| {
                DeployError::NotFound(format!("app `{name}` has no version {active}"))
            })?;
        let serving = self.table.load().apps.get(name).map(|a| a.digest.clone());
        let local = store.app(name);
        let same = local.is_some_and(|r| {
            r.active == Some(active)
                && r.versions.len() == versions.len()
                && versions.iter().all(|v| {
                    r.versions
                        .get(&v.version)
                        .is_some_and(|l| l.digest == v.digest)
                })
        });
        if same && serving.as_ref() == Some(&target.digest) {
            return Ok(());
        }
        target.app.validate().map_err(DeployError::Invalid)?;
        let missing = self.blobs.missing(&target.app.blobs());
        if !missing.is_empty() {
            return Err(DeployError::MissingBlobs(missing));
        }
        let previous = self.table.load().apps.get(name).cloned();
        let mut built = self.build(target, previous.as_deref()).await?;
        tokio::task::block_in_place(|| -> anyhow::Result<()> {
            if store.app(name).is_some() {
                store.remove(name)?;
            }
            for version in versions {
                store.put_version(version.clone())?;
            }
            store.set_active(name, active)
        })
        .map_err(DeployError::Internal)?;
        built.kept = kept_versions(&store, name);
        self.swap(Some(built), name);
        self.collect_garbage(&store);
        Ok(())
    }

    /// The blob store.
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.config.state_dir
    }

    /// The model registry, loading ONNX Runtime on first use.
    pub fn models(&self) -> anyhow::Result<Arc<ModelRegistry>> {
        let mut models = self
            .models
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(registry) = models.as_ref() {
            return Ok(Arc::clone(registry));
        }
        let library = OnnxRuntime::locate(&self.config.ort_search)?;
        let runtime = OnnxRuntime::load(&library)?;
        tracing::info!(library = %library.display(), "ONNX Runtime loaded");
        let registry = Arc::new(ModelRegistry::new(runtime));
        *models = Some(Arc::clone(&registry));
        Ok(registry)
    }

    /// Stores the manifest's blobs and deploys it as its app (a no-op when that content
    /// is already active): what `lepton up MANIFEST` does at start.
    pub async fn deploy_manifest(
        &self,
        manifest: &Manifest,
        peer: &str,
    ) -> Result<Deployed, DeployError> {
        self.store_blobs(manifest).await?;
        self.deploy(manifest.app.clone(), peer).await
    }

    /// Loads every component, model and trainer of `manifest` as a deploy would,
    /// without serving it: what `lepton check` prints, one line each.
    pub async fn check(&self, manifest: &Manifest) -> Result<Vec<String>, DeployError> {
        self.store_blobs(manifest).await?;
        let app = manifest.app.clone();
        app.validate().map_err(DeployError::Invalid)?;
        let stored = StoredVersion {
            version: 0,
            created_ms: 0,
            digest: app.digest(),
            app,
        };
        let built = self.build(&stored, None).await?;
        let describe = |ios: &[crate::nn::Io]| {
            ios.iter()
                .map(|io| format!("{} {} {:?}", io.name, io.ty, io.shape))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut lines = Vec::new();
        for spec in &stored.app.models {
            if let Some(slot) = built.models.slots.get(&spec.name) {
                let model = slot.current();
                let onnx = model.onnx();
                lines.push(format!(
                    "model `{}` on {:?}: inputs [{}] outputs [{}]",
                    spec.name,
                    onnx.target(),
                    describe(onnx.inputs()),
                    describe(onnx.outputs())
                ));
            }
        }
        for (app, trainer) in self.trainers.running() {
            if app == stored.app.name {
                lines.push(format!(
                    "trainer `{}` at step {}",
                    trainer.name(),
                    trainer.steps()
                ));
            }
        }
        for function in &stored.app.functions {
            lines.push(format!(
                "function `{}` serves {}",
                function.name, function.route
            ));
        }
        Ok(lines)
    }

    async fn store_blobs(&self, manifest: &Manifest) -> Result<(), DeployError> {
        let blobs = self.blobs.clone();
        let sources = manifest.blobs.clone();
        tokio::task::spawn_blocking(move || {
            for (digest, source) in &sources {
                match source {
                    BlobSource::File(path) => blobs.put_file(digest, path),
                    BlobSource::Bytes(bytes) => blobs.put_bytes(digest, bytes),
                }
                .with_context(|| format!("storing blob {digest}"))?;
            }
            anyhow::Ok(())
        })
        .await
        .map_err(|e| DeployError::Internal(e.into()))?
        .map_err(DeployError::Internal)
    }

    /// Deploys `app` as the next version of its app, once it is fully loaded.
    pub async fn deploy(&self, app: LockedApp, peer: &str) -> Result<Deployed, DeployError> {
        let digests = std::iter::once(app.digest())
            .chain(app.blobs())
            .map(String::from)
            .collect();
        let name = app.name.clone();
        let result = self.deploy_inner(app).await;
        self.record("deploy", &name, &result, digests, peer);
        result
    }

    async fn deploy_inner(&self, app: LockedApp) -> Result<Deployed, DeployError> {
        app.validate().map_err(DeployError::Invalid)?;
        // What new versions may no longer say (stored ones still load).
        for function in &app.functions {
            function.route.check_new().map_err(|reason| {
                DeployError::Invalid(crate::locked::SpecError::new(
                    format!("function `{}`", function.name),
                    Some("route"),
                    reason,
                ))
            })?;
        }
        let mut store = self.store.lock().await;
        // Under the deploy lock: garbage collection (which runs under it) cannot take a
        // blob between this check and the build.
        let missing = self.blobs.missing(&app.blobs());
        if !missing.is_empty() {
            return Err(DeployError::MissingBlobs(missing));
        }
        let digest = app.digest();
        // Unchanged only when that content is what serves: an active version that
        // failed to load at start is built again.
        let serving = self
            .table
            .load()
            .apps
            .get(&app.name)
            .map(|a| a.digest.clone());
        if let Some(active) = store.active(&app.name)
            && active.digest == digest
            && serving.as_ref() == Some(&digest)
        {
            return Ok(self.deployed(&active.app, active.version, true));
        }
        self.check_routes(&app)?;
        // Built as version "next" in memory; its number is fixed once it is written.
        let next = store
            .app(&app.name)
            .and_then(|r| r.versions.keys().next_back())
            .map_or(1, |v| v + 1);
        let preview = StoredVersion {
            version: next,
            created_ms: store::now_ms(),
            digest,
            app,
        };
        let previous = self.table.load().apps.get(&preview.app.name).cloned();
        let mut built = self.build(&preview, previous.as_deref()).await?;
        let stored = tokio::task::block_in_place(|| store.add_version(preview.app))
            .map_err(DeployError::Internal)?;
        debug_assert_eq!(stored.version, next);
        tokio::task::block_in_place(|| store.set_active(&stored.app.name, stored.version))
            .map_err(DeployError::Internal)?;
        built.kept = kept_versions(&store, &stored.app.name);
        self.swap(Some(built), &stored.app.name);
        self.collect_garbage(&store);
        Ok(self.deployed(&stored.app, stored.version, false))
    }

    /// Makes `version` (default: the newest one before the active one) of `app` active again.
    pub async fn rollback(
        &self,
        app: &Name,
        version: Option<u64>,
        peer: &str,
    ) -> Result<Deployed, DeployError> {
        let result = self.rollback_inner(app, version).await;
        self.record("rollback", app, &result, Vec::new(), peer);
        result
    }

    async fn rollback_inner(
        &self,
        name: &Name,
        version: Option<u64>,
    ) -> Result<Deployed, DeployError> {
        let mut store = self.store.lock().await;
        let record = store
            .app(name)
            .ok_or_else(|| DeployError::NotFound(format!("no app named {:?}", name.as_str())))?;
        let target = match version {
            Some(v) => v,
            None => {
                let active = record.active.unwrap_or(u64::MAX);
                *record
                    .versions
                    .range(..active)
                    .next_back()
                    .map(|(v, _)| v)
                    .ok_or_else(|| {
                        DeployError::NotFound(format!(
                            "app `{name}` has no version before {active} to roll back to"
                        ))
                    })?
            }
        };
        let stored = record.versions.get(&target).cloned().ok_or_else(|| {
            DeployError::NotFound(format!(
                "app `{name}` has no version {target} (kept: {:?})",
                record.versions.keys().collect::<Vec<_>>()
            ))
        })?;
        let serving = self.table.load().apps.get(name).map(|a| a.version);
        if record.active == Some(target) && serving == Some(target) {
            return Ok(self.deployed(&stored.app, target, true));
        }
        self.check_routes(&stored.app)?;
        let previous = self.table.load().apps.get(name).cloned();
        let mut built = self.build(&stored, previous.as_deref()).await?;
        tokio::task::block_in_place(|| store.set_active(name, target))
            .map_err(DeployError::Internal)?;
        built.kept = kept_versions(&store, name);
        self.swap(Some(built), name);
        Ok(self.deployed(&stored.app, target, false))
    }

    /// Stops serving `app` and forgets its versions.
    pub async fn remove(&self, app: &Name, peer: &str) -> Result<(), DeployError> {
        let result = async {
            let mut store = self.store.lock().await;
            if store.app(app).is_none() {
                return Err(DeployError::NotFound(format!(
                    "no app named {:?}",
                    app.as_str()
                )));
            }
            tokio::task::block_in_place(|| store.remove(app)).map_err(DeployError::Internal)?;
            self.swap(None, app);
            // Its key-value stores go with it (a later app of the same name starts
            // empty).
            if self.config.state_dir.join("kv.redb").exists()
                && let Err(error) = tokio::task::block_in_place(|| {
                    self.kv_stores().and_then(|stores| stores.remove_app(app))
                })
            {
                tracing::error!(app = %app, "removing the app's key-value stores: {error:#}");
            }
            self.collect_garbage(&store);
            Ok(())
        }
        .await;
        let outcome = match &result {
            Ok(()) => "ok".to_owned(),
            Err(error) => error.to_string(),
        };
        self.audit_record("remove", app, None, outcome, Vec::new(), peer);
        result
    }

    /// Every app, its versions and what is active: for `GET /v1/apps[/APP]`.
    pub async fn apps(&self) -> Vec<AppInfo> {
        let store = self.store.lock().await;
        store
            .apps()
            .iter()
            .map(|(name, record)| AppInfo {
                name: name.clone(),
                active: record.active,
                versions: record
                    .versions
                    .values()
                    .map(|v| VersionInfo {
                        version: v.version,
                        created_ms: v.created_ms,
                        digest: v.digest.clone(),
                    })
                    .collect(),
                routes: record
                    .active
                    .and_then(|v| record.versions.get(&v))
                    .map(|v| {
                        v.app
                            .functions
                            .iter()
                            .map(|f| (f.name.to_string(), f.route.to_string()))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// What runs on the node now: for `GET /v1/status`.
    pub fn status(&self) -> NodeStatus {
        let table = self.table();
        let functions = table
            .apps
            .values()
            .flat_map(|app| app.functions.iter())
            .map(|f| FunctionStatus {
                app: f.app().to_string(),
                version: f.version(),
                function: f.spec().name.to_string(),
                route: f.spec().route.to_string(),
                in_flight: f.in_flight(),
                served: f.served(),
            })
            .collect();
        let registry = self
            .models
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut models: Vec<ModelStatus> = table
            .apps
            .values()
            .flat_map(|app| {
                app.models
                    .slots
                    .iter()
                    .map(move |(name, slot)| (app, name, slot))
            })
            .map(|(app, name, slot)| {
                let model = slot.current();
                ModelStatus {
                    app: app.name.to_string(),
                    model: name.to_string(),
                    digest: slot.spec().file.to_string(),
                    target: slot.spec().target,
                    device: model.onnx().target(),
                    sessions: slot.spec().sessions(),
                    requests: slot.requests(),
                }
            })
            .collect();
        models.sort_by(|a, b| (&a.app, &a.model).cmp(&(&b.app, &b.model)));
        let trainers = self
            .trainers
            .running()
            .into_iter()
            .map(|(app, t)| TrainerStatus {
                app: app.to_string(),
                trainer: t.name().to_owned(),
                steps: t.steps(),
                last_checkpoint_ms: t.last_checkpoint_ms(),
            })
            .collect();
        let resident_models = registry.map_or(0, |r| r.resident().len());
        NodeStatus {
            functions,
            models,
            resident_models,
            trainers,
            alerts: self.alerts(),
        }
    }

    /// The metrics page (OpenMetrics text), for `/.well-known/lepton/metrics`.
    pub fn metrics(&self) -> String {
        let m = crate::ops::metrics::metrics();
        let budget = self.runtime.body_budget();
        m.body_bytes_held
            .set(i64::try_from(budget.held()).unwrap_or(i64::MAX));
        m.body_bytes_budget
            .set(i64::try_from(budget.total()).unwrap_or(i64::MAX));
        let registry = self.models.lock().ok().and_then(|r| r.clone());
        if let Some(registry) = registry {
            let resident = registry.resident();
            m.models_resident
                .set(i64::try_from(resident.len()).unwrap_or(i64::MAX));
            let mut labels = Vec::with_capacity(resident.len());
            for model in &resident {
                let label = crate::ops::metrics::ModelLabels {
                    model: model.spec().name.to_string(),
                };
                m.model_bytes
                    .get_or_create(&label)
                    .set(i64::try_from(model.onnx().file_bytes()).unwrap_or(i64::MAX));
                labels.push(label);
            }
            crate::ops::metrics::retain_models(&labels);
        }
        m.encode()
    }

    /// What the status page charts (`GET /v1/stats`): each function's last minutes
    /// (`points` points of `step` seconds), each model's device, bytes, runs and mean
    /// batch, each trainer's loss curve.
    pub fn stats(&self, points: usize, step: u64) -> serde_json::Value {
        let table = self.table();
        let mut functions = Vec::new();
        for app in table.apps.values() {
            for function in &app.functions {
                let spec = function.spec();
                let observed = self.ops.get(app.name.as_str(), spec.name.as_str());
                let (summary, series) = observed.map_or_else(Default::default, |o| {
                    (
                        o.window.summary(std::time::Duration::from_secs(60)),
                        o.window.series(points, step),
                    )
                });
                functions.push(serde_json::json!({
                    "app": app.name,
                    "version": app.version,
                    "function": spec.name,
                    "route": spec.route.to_string(),
                    "in_flight": function.in_flight(),
                    "served": function.served(),
                    "last_minute": summary,
                    "error_rate": summary.error_rate(),
                    "series": series,
                }));
            }
        }
        let mut models = Vec::new();
        for app in table.apps.values() {
            for (name, slot) in &app.models.slots {
                let model = slot.current();
                let (requests, runs) = (slot.requests(), slot.runs());
                models.push(serde_json::json!({
                    "app": app.name,
                    "model": name,
                    "target": slot.spec().target,
                    "device": model.onnx().target(),
                    "bytes": model.onnx().file_bytes(),
                    "sessions": slot.spec().sessions(),
                    "batching": slot.spec().batch.is_some(),
                    "requests": requests,
                    "runs": runs,
                    "mean_batch": if runs == 0 { None } else { Some(requests as f64 / runs as f64) },
                }));
            }
        }
        let trainers: Vec<_> = self
            .trainers
            .running()
            .into_iter()
            .map(|(app, t)| {
                serde_json::json!({
                    "app": app,
                    "trainer": t.name(),
                    "steps": t.steps(),
                    "last_checkpoint_ms": t.last_checkpoint_ms(),
                    "loss": t.loss_curve(),
                })
            })
            .collect();
        serde_json::json!({
            "time_ms": store::now_ms(),
            "step_seconds": step,
            "rss_bytes": crate::ops::metrics::resident_bytes(),
            "functions": functions,
            "models": models,
            "trainers": trainers,
            "alerts": self.alerts(),
        })
    }

    /// Calls `progress` with each model, trainer and function a build loads from now
    /// on (`None`: no more).
    pub fn set_progress(&self, progress: Option<Progress>) {
        *self
            .progress
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = progress;
    }

    fn report(&self, what: &str) {
        if let Some(progress) = self
            .progress
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
        {
            progress(what);
        }
    }

    /// What operators see of each function: metrics handles, logs, statistics.
    pub fn ops(&self) -> &crate::ops::Ops {
        &self.ops
    }

    /// At shutdown, once requests drained: checkpoints every trainer that changed.
    pub async fn shutdown(&self) {
        self.trainers.checkpoint_all().await;
    }

    fn deployed(&self, app: &LockedApp, version: u64, unchanged: bool) -> Deployed {
        let routes = app
            .functions
            .iter()
            .map(|f| (f.name.to_string(), f.route.to_string()))
            .collect();
        Deployed {
            app: app.name.clone(),
            version,
            unchanged,
            routes,
        }
    }

    fn check_routes(&self, app: &LockedApp) -> Result<(), DeployError> {
        let table = self.table.load();
        for function in &app.functions {
            let taken = table.routes.iter().find(|other| {
                other.app() != &app.name && other.spec().route.same_as(&function.route)
            });
            if let Some(other) = taken {
                return Err(DeployError::RouteConflict {
                    route: function.route.to_string(),
                    app: app.name.to_string(),
                    function: function.name.to_string(),
                    other_app: other.app().to_string(),
                    other_function: other.spec().name.to_string(),
                });
            }
        }
        for model in app.models.iter().filter(|m| m.protocol.is_some()) {
            if let Some((other, _)) = table.endpoints.get(model.name.as_str())
                && other.name != app.name
            {
                return Err(DeployError::ModelConflict {
                    model: model.name.to_string(),
                    app: app.name.to_string(),
                    other_app: other.name.to_string(),
                });
            }
        }
        Ok(())
    }

    fn swap(&self, app: Option<ActiveApp>, name: &Name) {
        let old = self.table.load_full();
        if let Some(previous) = old.apps.get(name) {
            let mut retired = self
                .retired
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            retired.retain(|weak| weak.strong_count() > 0);
            retired.push(Arc::downgrade(previous));
        }
        let keep: Vec<String> = app
            .as_ref()
            .map(|a| {
                a.functions
                    .iter()
                    .map(|f| f.spec().name.to_string())
                    .collect()
            })
            .unwrap_or_default();
        self.table
            .store(Arc::new(old.with(app.map(Arc::new), name)));
        let keep: Vec<&str> = keep.iter().map(String::as_str).collect();
        self.ops.retain(name.as_str(), &keep);
        if keep.is_empty() {
            let changes = self.ops.alerts.forget(name.as_str());
            self.audit_alerts(changes, None);
        }
    }

    fn audit_alerts(&self, changes: Vec<crate::ops::alerts::AlertEvent>, version: Option<u64>) {
        for change in changes {
            let outcome = format!(
                "{}: {} (value {}, {} requests)",
                change.alert,
                change.when,
                change
                    .value
                    .map_or_else(|| "none".to_owned(), |v| format!("{v:.4}")),
                change.requests
            );
            let record = AuditRecord {
                time_ms: change.time_ms,
                action: format!("alert-{}", change.state),
                app: Some(change.app.clone()),
                version,
                digests: Vec::new(),
                peer: "alerts".to_owned(),
                outcome,
            };
            // An fsync: off the async workers' hands where the runtime allows it.
            let multi_thread = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            let written = if multi_thread {
                tokio::task::block_in_place(|| self.audit.append(&record))
            } else {
                self.audit.append(&record)
            };
            if let Err(error) = written {
                tracing::error!("cannot write the audit log: {error:#}");
            }
        }
    }

    /// Judges every alert rule of the apps serving now; each change goes to the audit
    /// log (`alert-firing`, `alert-resolved`).
    pub fn judge_alerts(&self) {
        let table = self.table();
        for app in table.apps.values() {
            let changes = self
                .ops
                .alerts
                .judge(app.name.as_str(), &app.alerts, |rule| {
                    self.ops
                        .get(app.name.as_str(), rule.function.as_str())
                        .map(|o| o.window.summary(rule.over))
                        .unwrap_or_default()
                });
            self.audit_alerts(changes, Some(app.version));
            // Removed meanwhile: what this pass wrote for it goes (resolving).
            if !self.table().apps.contains_key(&app.name) {
                let changes = self.ops.alerts.forget(app.name.as_str());
                self.audit_alerts(changes, None);
            }
        }
    }

    /// Every alert rule of the apps serving now, with its state.
    pub fn alerts(&self) -> Vec<crate::ops::alerts::AlertStatus> {
        let table = self.table();
        let mut all: Vec<_> = table
            .apps
            .values()
            .flat_map(|app| self.ops.alerts.status_of(app.name.as_str(), &app.alerts))
            .collect();
        all.sort_by(|a, b| (&a.app, &a.alert).cmp(&(&b.app, &b.alert)));
        all
    }

    /// Judges the alert rules every [`crate::ops::alerts::EVALUATE_EVERY`] until the
    /// node is dropped.
    pub fn spawn_alerts(self: &Arc<Self>) {
        let node = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::ops::alerts::EVALUATE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(node) = node.upgrade() else { break };
                node.judge_alerts();
            }
        });
    }

    fn collect_garbage(&self, store: &AppStore) {
        let mut keep = store.referenced_blobs();
        // Versions that no longer serve but whose requests may still run.
        let retired = self
            .retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        keep.extend(
            retired
                .iter()
                .filter_map(std::sync::Weak::upgrade)
                .flat_map(|app| app.blobs.clone()),
        );
        let removed = tokio::task::block_in_place(|| self.blobs.collect_garbage(&keep));
        if removed > 0 {
            tracing::info!(removed, "deleted blobs no kept version uses");
        }
    }

    fn record(
        &self,
        action: &str,
        app: &Name,
        result: &Result<Deployed, DeployError>,
        digests: Vec<String>,
        peer: &str,
    ) {
        let (version, outcome) = match result {
            Ok(d) if d.unchanged => (Some(d.version), "unchanged".to_owned()),
            Ok(d) => (Some(d.version), "ok".to_owned()),
            Err(error) => (None, error.to_string()),
        };
        self.audit_record(action, app, version, outcome, digests, peer);
    }

    fn audit_record(
        &self,
        action: &str,
        app: &Name,
        version: Option<u64>,
        outcome: String,
        digests: Vec<String>,
        peer: &str,
    ) {
        let record = AuditRecord {
            time_ms: store::now_ms(),
            action: action.to_owned(),
            app: Some(app.to_string()),
            version,
            digests,
            peer: peer.to_owned(),
            outcome,
        };
        if let Err(error) = tokio::task::block_in_place(|| self.audit.append(&record)) {
            tracing::error!("cannot write the audit log: {error:#}");
        }
    }

    /// Builds `stored` into a servable app, reusing `previous`'s models and the
    /// running trainers where nothing changed.
    async fn build(
        &self,
        stored: &StoredVersion,
        previous: Option<&ActiveApp>,
    ) -> Result<ActiveApp, DeployError> {
        // Compiling and loading models are CPU-bound and synchronous: off the async
        // workers' hands, but inside the runtime (a batching model spawns a task).
        let built = tokio::task::block_in_place(|| self.build_blocking(stored, previous));
        if built.is_err() {
            // What this build made for functions that do not serve goes again.
            let table = self.table();
            let serving: Vec<&str> = table
                .apps
                .get(&stored.app.name)
                .map(|app| {
                    app.functions
                        .iter()
                        .map(|f| f.spec().name.as_str())
                        .collect()
                })
                .unwrap_or_default();
            self.ops.retain(stored.app.name.as_str(), &serving);
        }
        built
    }

    fn build_blocking(
        &self,
        stored: &StoredVersion,
        previous: Option<&ActiveApp>,
    ) -> Result<ActiveApp, DeployError> {
        let app = &stored.app;
        let rejected = |scope: String, key: Option<&str>, error: &anyhow::Error| {
            DeployError::Invalid(SpecError::new(scope, key, format!("{error:#}")))
        };
        let needs_onnx =
            !app.models.is_empty() || app.functions.iter().any(|f| f.allow_model_upload);
        let registry = if needs_onnx {
            Some(
                self.models()
                    .map_err(|e| rejected(format!("app `{}`", app.name), Some("models"), &e))?,
            )
        } else {
            None
        };
        let published_dir = self.config.state_dir.join("models").join(app.name.as_str());
        let mut slots = HashMap::new();
        for spec in &app.models {
            let reuse = previous
                .and_then(|p| p.models.slots.get(&spec.name))
                .filter(|slot| slot.spec() == spec);
            let slot = match (reuse, &registry) {
                (Some(slot), _) => Arc::clone(slot),
                (None, Some(registry)) => {
                    self.report(&format!("loading model {}", spec.name));
                    let model = load_model(registry, spec, &published_dir, &self.blobs)
                        .map_err(|e| rejected(format!("model `{}`", spec.name), None, &e))?;
                    Arc::new(ModelSlot::new(spec.clone(), model))
                }
                (None, None) => {
                    return Err(DeployError::Internal(anyhow::anyhow!(
                        "no model registry for model `{}`",
                        spec.name
                    )));
                }
            };
            slots.insert(spec.name.clone(), slot);
        }
        let models = Arc::new(AppModels {
            slots,
            registry: registry.clone(),
            published_dir,
            publishing: Mutex::new(()),
        });
        let mut trainers = HashMap::new();
        for spec in &app.trainers {
            self.report(&format!("starting trainer {}", spec.name));
            let handle = self
                .trainers
                .get_or_start(&app.name, spec, &self.blobs.path(&spec.init))
                .map_err(|e| rejected(format!("trainer `{}`", spec.name), None, &e))?;
            trainers.insert(spec.name.clone(), handle);
        }
        let mut endpoints = Vec::new();
        for spec in app.models.iter().filter(|m| m.protocol.is_some()) {
            let slot = models.slots.get(&spec.name).ok_or_else(|| {
                DeployError::Internal(anyhow::anyhow!("model `{}` was not loaded", spec.name))
            })?;
            let endpoint = crate::infer::Endpoint::new(spec, Arc::clone(slot))
                .map_err(|e| rejected(format!("model `{}`", spec.name), None, &e))?;
            endpoints.push(Arc::new(endpoint));
        }
        let publisher: Arc<dyn Publisher> = Arc::clone(&models) as Arc<dyn Publisher>;
        let cache_dir = self.config.state_dir.join("components");
        let mut functions = Vec::with_capacity(app.functions.len());
        for spec in &app.functions {
            let scope = || format!("function `{}`", spec.name);
            let mounts = spec
                .files
                .iter()
                .map(|m| self.blobs.unpacked(&m.source))
                .collect::<anyhow::Result<Vec<_>>>()
                .map_err(|e| rejected(scope(), Some("files"), &e))?;
            if spec.route.shadowed() {
                tracing::warn!(
                    app = %app.name,
                    function = %spec.name,
                    route = %spec.route,
                    "this stored route lies under /v2, which the host answers (the Open Inference Protocol); no request reaches it"
                );
            }
            let granted_models = spec
                .models
                .iter()
                .filter_map(|m| Some((m.to_string(), Arc::clone(models.slots.get(m)?))))
                .collect::<HashMap<_, _>>();
            for (name, slot) in &granted_models {
                let model = slot.current();
                let onnx = model.onnx();
                let untyped = onnx
                    .inputs()
                    .iter()
                    .map(|io| ("input", io))
                    .chain(onnx.outputs().iter().map(|io| ("output", io)))
                    .find(|(_, io)| io.ty.wasi().is_none());
                if let Some((kind, io)) = untyped {
                    let error = anyhow::anyhow!(
                        "model `{name}` has {kind} `{}` of type {}, which wasi-nn cannot carry; serve it over the Open Inference Protocol (protocol = \"v2\") without granting it to a function",
                        io.name,
                        io.ty
                    );
                    if self.restoring.load(std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(app = %app.name, function = %spec.name, "{error} (a stored version: served, but its calls to this model fail)");
                    } else {
                        return Err(rejected(scope(), Some("models"), &error));
                    }
                }
            }
            let granted_trainers: HashMap<String, _> = spec
                .trainers
                .iter()
                .filter_map(|t| Some((t.to_string(), Arc::clone(trainers.get(t)?))))
                .collect();
            let train = TrainCtx::new(Arc::new(granted_trainers), Some(Arc::clone(&publisher)));
            self.report(&format!("compiling function {}", spec.name));
            let observed = self.ops.function(app.name.as_str(), spec.name.as_str());
            let config = resolve_config(spec).map_err(|e| rejected(scope(), Some("config"), &e))?;
            let kv = if spec.key_value_stores.is_empty() {
                crate::kv::KvCtx::default()
            } else {
                let stores = self
                    .kv_stores()
                    .map_err(|e| rejected(scope(), Some("key_value_stores"), &e))?;
                crate::kv::KvCtx::new(stores, app.name.clone(), spec.key_value_stores.clone())
            };
            let grants = Grants::new(
                spec,
                mounts,
                granted_models,
                registry.clone(),
                train,
                Arc::clone(&observed.logs),
            )
            .with_config(config)
            .with_kv(kv);
            let function = Function::load(
                &self.runtime,
                (&self.linker, &self.large_linker),
                (&app.name, stored.version),
                spec,
                &self.blobs.path(&spec.component),
                &cache_dir,
                (grants, observed),
            )
            .map_err(|e| rejected(scope(), Some("component"), &e))?;
            functions.push(Arc::new(function));
        }
        let slots: u64 = app
            .functions
            .iter()
            .map(|f| u64::from(f.max_concurrency))
            .sum();
        if slots > u64::from(self.runtime.instances()) {
            tracing::warn!(
                app = %app.name,
                "the functions' max_concurrency adds up to {slots}, more than the {} instance slots of the pool: \
                 requests past that get 503",
                self.runtime.instances()
            );
        }
        Ok(ActiveApp {
            name: app.name.clone(),
            version: stored.version,
            digest: stored.digest.clone(),
            blobs: app.blobs(),
            functions,
            models,
            alerts: app.alerts.clone(),
            endpoints,
            kept: Vec::new(),
        })
    }
}

/// A function's `wasi:config` values, environment references read from the node's
/// environment now.
fn resolve_config(spec: &crate::locked::FunctionSpec) -> anyhow::Result<Vec<(String, String)>> {
    spec.config
        .iter()
        .map(|(key, value)| {
            let value = match value {
                crate::locked::ConfigValue::Value(text) => text.clone(),
                crate::locked::ConfigValue::Env(variable) => {
                    std::env::var(variable).map_err(|_| {
                        anyhow::anyhow!(
                            "{key:?}: the environment variable `{variable}` is not set (or not UTF-8) on this node"
                        )
                    })?
                }
            };
            Ok((key.clone(), value))
        })
        .collect()
}

/// The versions `store` keeps of `app`.
fn kept_versions(store: &AppStore, app: &Name) -> Vec<u64> {
    store
        .app(app)
        .map(|record| record.versions.keys().copied().collect())
        .unwrap_or_default()
}

impl ActiveApp {
    /// The digest of the locked app serving.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }
}

/// The weights a trainer last published for `spec` in this app, if they load; else
/// the model file (shared by digest with every app that names the same bytes).
fn load_model(
    registry: &ModelRegistry,
    spec: &ModelSpec,
    published_dir: &Path,
    blobs: &BlobStore,
) -> anyhow::Result<Arc<crate::nn::Model>> {
    let published = published_path(published_dir, spec);
    if published.is_file() {
        match registry.load(spec, &Source::File(&published)) {
            Ok(model) => {
                tracing::info!(model = %spec.name, "serving the weights last published for it");
                return Ok(model);
            }
            Err(error) => {
                tracing::warn!(model = %spec.name, path = %published.display(), "ignoring published weights: {error:#}");
            }
        }
    }
    registry.get_or_load(spec, &blobs.path(&spec.file))
}

/// Published weights of `spec`, named after the file they replace: a new file starts afresh.
fn published_path(dir: &Path, spec: &ModelSpec) -> PathBuf {
    dir.join(format!(
        "{}-{}.published.onnx",
        spec.name,
        &spec.file.hex()[..16]
    ))
}

/// The models of one app version, by name; where its trainers publish.
pub struct AppModels {
    slots: HashMap<Name, Arc<ModelSlot>>,
    registry: Option<Arc<ModelRegistry>>,
    published_dir: PathBuf,
    /// One publish at a time: each swaps the model and then writes its file.
    publishing: Mutex<()>,
}

impl Publisher for AppModels {
    fn publish(&self, model: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let slot = Name::new(model)
            .ok()
            .and_then(|n| self.slots.get(&n))
            .with_context(|| format!("no model named {model:?}"))?;
        let registry = self
            .registry
            .as_ref()
            .context("this node has no inference backend")?;
        let _one_at_a_time = self
            .publishing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let loaded = registry.load(slot.spec(), &Source::Bytes(bytes))?;
        slot.replace(loaded);
        crate::fsutil::write_atomically(&published_path(&self.published_dir, slot.spec()), bytes)
    }
}

/// One app as `GET /v1/apps` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct AppInfo {
    /// The app.
    pub name: Name,
    /// The version serving, if any.
    pub active: Option<u64>,
    /// Kept versions, oldest first.
    pub versions: Vec<VersionInfo>,
    /// `(function, route)` of the active version.
    pub routes: Vec<(String, String)>,
}

/// One kept version.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    /// Its number.
    pub version: u64,
    /// When it was deployed (Unix ms).
    pub created_ms: u64,
    /// The locked app's digest.
    pub digest: Digest,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Functions serving.
    pub functions: Vec<FunctionStatus>,
    /// Models of the active versions.
    pub models: Vec<ModelStatus>,
    /// Distinct models loaded from files (shared by digest).
    pub resident_models: usize,
    /// Running trainers.
    pub trainers: Vec<TrainerStatus>,
    /// Alert rules and their state.
    pub alerts: Vec<crate::ops::alerts::AlertStatus>,
}

/// One function in [`NodeStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct FunctionStatus {
    /// Its app.
    pub app: String,
    /// The app version.
    pub version: u64,
    /// The function.
    pub function: String,
    /// Its route.
    pub route: String,
    /// Requests running now.
    pub in_flight: usize,
    /// Requests served.
    pub served: u64,
}

/// One model in [`NodeStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct ModelStatus {
    /// Its app.
    pub app: String,
    /// Its name in the app.
    pub model: String,
    /// The ONNX file's digest.
    pub digest: String,
    /// The target asked for.
    pub target: crate::locked::Target,
    /// The device it runs on (after any GPU fallback).
    pub device: crate::locked::Target,
    /// Sessions.
    pub sessions: u32,
    /// Inference requests.
    pub requests: u64,
}

/// One trainer in [`NodeStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct TrainerStatus {
    /// Its app.
    pub app: String,
    /// The trainer.
    pub trainer: String,
    /// Steps taken.
    pub steps: u64,
    /// Unix ms of its last checkpoint.
    pub last_checkpoint_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(dir: &Path, greeting: &str, route: &str) -> Manifest {
        let path = dir.join("lepton.toml");
        let text = format!(
            "manifest_version = 1\nname = \"shop\"\n[function.hello]\ncomponent = {:?}\nroute = {route:?}\n\
             environment = {{ GREETING = {greeting:?} }}\n",
            lepton_test_artifacts::HELLO
        );
        std::fs::write(&path, &text).expect("write manifest");
        Manifest::load(&path).expect("valid manifest")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn deploy_replace_remove_and_reopen_in_process() {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = Node::open(NodeConfig::new(dir.path().join("state")))
            .await
            .expect("node");
        assert!(
            node.table().route("/hello").is_none(),
            "an empty node serves nothing"
        );

        let first = node
            .deploy_manifest(&hello(dir.path(), "one", "/hello"), "test")
            .await
            .expect("deploy");
        assert_eq!((first.version, first.unchanged), (1, false));
        // A request routed now keeps this function, whatever happens to the table.
        let in_flight = Arc::clone(node.table().route("/hello").expect("routed"));

        let again = node
            .deploy_manifest(&hello(dir.path(), "one", "/hello"), "test")
            .await
            .expect("no-op");
        assert_eq!((again.version, again.unchanged), (1, true));
        let second = node
            .deploy_manifest(&hello(dir.path(), "two", "/hello/..."), "test")
            .await
            .expect("replace");
        assert_eq!(second.version, 2);
        let table = node.table();
        let current = table.route("/hello/x").expect("the new route");
        assert_eq!((current.version(), in_flight.version()), (2, 1));
        assert_eq!(
            in_flight.spec().environment,
            [("GREETING".to_owned(), "one".to_owned())]
        );

        let back = node
            .rollback(&Name::new("shop").expect("name"), None, "test")
            .await
            .expect("rollback");
        assert_eq!(back.version, 1);
        assert!(node.table().route("/hello/x").is_none() && node.table().route("/hello").is_some());
        drop(node);

        // Reopened on the same state dir: the active version serves again.
        let node = Node::open(NodeConfig::new(dir.path().join("state")))
            .await
            .expect("reopen");
        assert_eq!(node.table().route("/hello").expect("restored").version(), 1);
        node.remove(&Name::new("shop").expect("name"), "test")
            .await
            .expect("remove");
        assert!(node.table().route("/hello").is_none());
        assert!(matches!(
            node.rollback(&Name::new("shop").expect("name"), None, "test")
                .await,
            Err(DeployError::NotFound(_))
        ));
        node.shutdown().await;
        let audit = node.audit().read(100).expect("audit");
        let actions: Vec<&str> = audit.iter().map(|r| r.action.as_str()).collect();
        assert_eq!(
            actions,
            [
                "deploy", "deploy", "deploy", "rollback", "remove", "rollback"
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_route_of_another_app_is_a_conflict_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let node = Node::open(NodeConfig::new(dir.path().join("state")))
            .await
            .expect("node");
        node.deploy_manifest(&hello(dir.path(), "one", "/hello"), "test")
            .await
            .expect("deploy");
        let mut other = hello(dir.path(), "two", "/hello");
        other.app.name = Name::new("other").expect("name");
        let error = node
            .deploy_manifest(&other, "test")
            .await
            .expect_err("conflict");
        assert!(
            matches!(error, DeployError::RouteConflict { .. }),
            "{error}"
        );
        assert_eq!(
            node.table()
                .route("/hello")
                .expect("still served")
                .app()
                .as_str(),
            "shop"
        );
        assert!(node.apps().await.iter().all(|a| a.name.as_str() == "shop"));
    }
}
