//! One wasmtime [`Engine`] per process, and the on-disk cache of compiled components.
//!
//! Components are compiled once per node: the machine code is cached under
//! `<state-dir>/components/<sha256 hex>-<engine hash>.cwasm`, so a second start loads it
//! in well under a millisecond instead of compiling again.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::Semaphore;
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::http::{BodyBudget, DEFAULT_BODY_BUDGET};
use crate::locked::Digest;

/// How often the engine's epoch advances; the granularity of request timeouts.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Slots the pooling allocator decommits at once.
pub const DECOMMIT_BATCH: usize = 64;

/// Bytes of each table reset with `memset` rather than returned to the kernel.
pub const TABLE_KEEP_RESIDENT: usize = 64 << 10;

/// Component instances the pooling allocator keeps slots for (all functions together):
/// the most requests that run at once on a node.
pub const DEFAULT_POOL_INSTANCES: u32 = 1000;

/// Core instances, tables and memories per component instance the pool makes room for.
/// A Rust `wasm32-wasip2` component has 3 core modules, 2 tables and 1 memory.
pub const POOL_SLOTS_PER_INSTANCE: u32 = 4;

/// Epoch ticks a request's guest may run (each counted only if the guest ran for at
/// least half a tick since it last got a thread) before it counts as long-running and
/// must take turns in the [`Runtime::long_lane`] (about 20–30 ms of guest code).
pub const LONG_RUNNING_TICKS: u32 = 3;

/// The process-wide engine, with its epoch ticker.
#[derive(Clone)]
pub struct Runtime {
    engine: Engine,
    /// The same engine settings with memory allocated on demand: for functions whose
    /// guests grow large, so that their memory goes back to the kernel when a request
    /// ends instead of waiting in the pool's decommit batch.
    large: Engine,
    instances: u32,
    long_lane: Arc<Semaphore>,
    body_budget: BodyBudget,
}

impl Runtime {
    /// Builds the engine: async, epoch interruption, pooling allocator with
    /// [`DEFAULT_POOL_INSTANCES`] slots, [`DEFAULT_BODY_BUDGET`] for request bodies.
    pub fn new() -> anyhow::Result<Self> {
        Self::with_limits(DEFAULT_POOL_INSTANCES, DEFAULT_BODY_BUDGET)
    }

    /// As [`Runtime::new`], with room for `instances` component instances at once
    /// (requests past that answer 503) and `body_budget` bytes of request bodies held
    /// at once (bodies past that answer 503 too).
    pub fn with_limits(instances: u32, body_budget: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(instances > 0, "the pool needs at least one instance slot");
        let base = || {
            let mut config = Config::new();
            config.epoch_interruption(true);
            config.wasm_component_model(true);
            config
        };
        let large = Engine::new(&base())
            .map_err(anyhow::Error::from)
            .context("creating the wasmtime engine")?;
        let mut config = base();
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(instances);
        pool.total_core_instances(instances.saturating_mul(POOL_SLOTS_PER_INSTANCE));
        pool.total_memories(instances.saturating_mul(2));
        pool.total_tables(instances.saturating_mul(POOL_SLOTS_PER_INSTANCE));
        // Per-function caps are enforced by each store's limiter; the pool only
        // needs room for the largest memory any function may grow to.
        pool.max_memory_size(
            usize::try_from(crate::locked::MAX_MEMORY_LIMIT).unwrap_or(usize::MAX),
        );
        // Returning a slot's pages with `madvise` flushes every core's TLB (an IPI
        // each); batching the decommits makes that one flush per batch. Measured with
        // `cargo bench --bench http` on the hello function (docs/benchmarks.md).
        pool.decommit_batch_size(DECOMMIT_BATCH);
        pool.table_keep_resident(TABLE_KEEP_RESIDENT);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .context("creating the wasmtime engine")?;

        // One compiled artifact serves both (the allocator is not part of the code).
        anyhow::ensure!(
            compatibility(&engine) == compatibility(&large),
            "the pooled and the on-demand engine would need code compiled twice"
        );
        // The ticker holds the engines weakly: it stops once the last one is gone.
        let tickers = [engine.weak(), large.weak()];
        std::thread::Builder::new()
            .name("lepton-epoch".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(EPOCH_TICK);
                    let mut alive = false;
                    for ticker in &tickers {
                        if let Some(engine) = ticker.upgrade() {
                            engine.increment_epoch();
                            alive = true;
                        }
                    }
                    if !alive {
                        break;
                    }
                }
            })
            .context("spawning the epoch ticker")?;
        // Long-running guests take turns on all cores but one, so a fresh request (and
        // the gateway's own work) always finds a worker thread that no guest loop holds.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let long_lane = Arc::new(Semaphore::new(cores.saturating_sub(1).max(1)));
        Ok(Self {
            engine,
            large,
            instances,
            long_lane,
            body_budget: BodyBudget::new(body_budget),
        })
    }

    /// The node-wide budget for request bodies.
    pub fn body_budget(&self) -> &BodyBudget {
        &self.body_budget
    }

    /// The turns that long-running guests share: a guest that has run for
    /// [`LONG_RUNNING_TICKS`] holds one of these for each further slice of guest code,
    /// and waits in line (first come, first served) for the next.
    pub fn long_lane(&self) -> &Arc<Semaphore> {
        &self.long_lane
    }

    /// Component instances the pool has room for.
    pub fn instances(&self) -> u32 {
        self.instances
    }

    /// The engine (pooled instances).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine for functions with large guests (memory allocated on demand).
    pub fn large_engine(&self) -> &Engine {
        &self.large
    }

    /// A short hex fingerprint of everything that makes compiled code compatible.
    pub fn fingerprint(&self) -> String {
        format!("{:016x}", compatibility(&self.engine))
    }

    /// Loads the component at `path`, from the compile cache in `cache_dir` when it
    /// is there. `digest` is the digest of its bytes; bytes that do not match it are
    /// refused (a blob store file changed behind the node's back).
    ///
    /// A cached artifact is used only if a record written beside it says it was compiled
    /// from `digest` and the artifact's own digest is the one recorded when it was
    /// written; it must be a regular file that only its owner can write. Anything else
    /// is recompiled, with a warning: native code is never loaded on trust.
    pub fn load_component(
        &self,
        path: &Path,
        digest: &Digest,
        cache_dir: &Path,
    ) -> anyhow::Result<LoadedComponent> {
        let stem = format!("{}-{}", digest.hex(), self.fingerprint());
        let cached = cache_dir.join(format!("{stem}.cwasm"));
        let record_path = cache_dir.join(format!("{stem}.record.json"));
        let started = Instant::now();
        match self.load_cached(&cached, &record_path, digest) {
            Ok(Some((component, large))) => {
                return Ok(LoadedComponent {
                    component,
                    large,
                    from_cache: true,
                    elapsed: started.elapsed(),
                    cached,
                });
            }
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(path = %cached.display(), "recompiling: the cached component is not usable: {error:#}");
            }
        }
        let bytes = crate::fsutil::read_regular_file(path, MAX_COMPONENT_SIZE)
            .with_context(|| format!("reading component `{}`", path.display()))?;
        let read = Digest::of(&bytes);
        anyhow::ensure!(
            &read == digest,
            "component `{}` holds {read}, not {digest}",
            path.display()
        );
        let compiled = self
            .engine
            .precompile_component(&bytes)
            .map_err(anyhow::Error::from)
            .context("not a valid WebAssembly component")?;
        let record = CacheRecord {
            source: digest.clone(),
            artifact: Digest::of(&compiled),
        };
        crate::fsutil::write_atomically(&cached, &compiled)?;
        crate::fsutil::write_atomically(&record_path, &serde_json::to_vec(&record)?)?;
        let (component, large) = self.deserialize(&compiled)?;
        Ok(LoadedComponent {
            component,
            large,
            from_cache: false,
            elapsed: started.elapsed(),
            cached,
        })
    }

    /// The cached artifact, if there is one and it checks out; `Err` says why not.
    fn load_cached(
        &self,
        cached: &Path,
        record_path: &Path,
        digest: &Digest,
    ) -> anyhow::Result<Option<(Component, Component)>> {
        let meta = match std::fs::symlink_metadata(cached) {
            Ok(meta) => meta,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        anyhow::ensure!(meta.is_file(), "it is not a regular file");
        anyhow::ensure!(
            !crate::fsutil::writable_by_others(&meta),
            "its group or others may write it"
        );
        let record: CacheRecord = serde_json::from_slice(
            &crate::fsutil::read_regular_file(record_path, 4096)
                .context("its record is missing or unreadable")?,
        )
        .context("its record is malformed")?;
        anyhow::ensure!(
            &record.source == digest,
            "its record says it was compiled from {}, not {digest}",
            record.source
        );
        let bytes =
            crate::fsutil::read_regular_file(cached, MAX_ARTIFACT_SIZE).context("reading it")?;
        let actual = Digest::of(&bytes);
        anyhow::ensure!(
            actual == record.artifact,
            "it holds {actual}, not the {} recorded when it was written",
            record.artifact
        );
        self.deserialize(&bytes).map(Some)
    }

    #[expect(
        unsafe_code,
        reason = "loading precompiled machine code is unsafe by nature"
    )]
    fn deserialize(&self, compiled: &[u8]) -> anyhow::Result<(Component, Component)> {
        // SAFETY: these bytes were produced by `Engine::precompile_component` of an
        // engine with the same compatibility hash (it is in the cache name): either just
        // now, or read back from the state dir, which is as trusted as this binary, and
        // checked against the digest recorded when this host wrote them. wasmtime
        // checks the header and the engine settings again before using them.
        let load = |engine: &Engine| unsafe { Component::deserialize(engine, compiled) };
        let pooled = load(&self.engine).map_err(anyhow::Error::from);
        let large = load(&self.large).map_err(anyhow::Error::from);
        Ok((
            pooled.context("loading a compiled component")?,
            large.context("loading a compiled component")?,
        ))
    }
}

/// The largest component file a node reads.
pub const MAX_COMPONENT_SIZE: u64 = 512 << 20;

/// The largest compiled artifact a node reads back from its cache.
const MAX_ARTIFACT_SIZE: u64 = 2 << 30;

/// Written beside each cached artifact: what it was compiled from, and its own digest.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheRecord {
    source: Digest,
    artifact: Digest,
}

/// A hash of everything that makes code compiled by `engine` loadable.
fn compatibility(engine: &Engine) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hasher.finish()
}

/// A component ready to be pre-instantiated.
pub struct LoadedComponent {
    /// The component, for the pooled engine.
    pub component: Component,
    /// The same code, for the on-demand engine.
    pub large: Component,
    /// Whether it came from the compile cache.
    pub from_cache: bool,
    /// How long loading (or compiling) took.
    pub elapsed: Duration,
    /// Where its compiled form is cached.
    pub cached: PathBuf,
}
