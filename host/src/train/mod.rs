//! `lepton:nn/training`: training steps on host-held models.
//!
//! Each trainer lives on a thread of its own that takes commands from a bounded
//! queue: steps on one trainer run one at a time in arrival order (a queue, not a lock
//! held across await points), different trainers run in parallel, and an async request
//! only waits for its reply. A trainer that changed is checkpointed every
//! `checkpoint_every` (and on `checkpoint()`, and when the node stops), atomically,
//! under `<state-dir>/trainers/APP/NAME-FINGERPRINT/`; a node on the same state dir
//! resumes from there. A trainer is kept (weights, steps, checkpoints) across versions
//! of its app that keep its fingerprint (initial graph and settings).
//!
//! The capability is wired like every wasmtime one: a [`TrainCtx`] per instance (the
//! granted trainers and where `publish` goes), a [`TrainView`] over it and the store's
//! resource table, and [`add_to_linker`]. It uses `wasi:nn`'s tensor and error types
//! and nothing else of [`crate::nn`]; publishing goes through the [`Publisher`] trait.

mod backend;
mod host;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use anyhow::Context as _;
use tokio::sync::oneshot;

pub use self::backend::Trainer;
pub use self::host::{TrainCtx, TrainView, add_to_linker};
use crate::bindings::wasi::nn::errors::ErrorCode;
use crate::locked::{Digest, Name, TrainerSpec};
use crate::nn::{NnError, Tensor};

/// Where a trainer's `publish` puts the weights: the app's inference models.
pub trait Publisher: Send + Sync {
    /// Makes the ONNX graph `bytes` the model `model` (and keeps it for the next start).
    fn publish(&self, model: &str, bytes: &[u8]) -> anyhow::Result<()>;
}

/// Commands waiting for one trainer, past which new ones are refused.
pub const MAX_QUEUED_COMMANDS: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T, NnError>>;

enum Command {
    Step {
        inputs: Vec<(String, Tensor)>,
        targets: Tensor,
        reply: Reply<f32>,
    },
    Evaluate {
        inputs: Vec<(String, Tensor)>,
        targets: Tensor,
        reply: Reply<f32>,
    },
    Export {
        reply: Reply<Vec<u8>>,
    },
    /// `only_if_changed`: skip the write when nothing changed since the last one.
    Checkpoint {
        reply: Reply<()>,
        only_if_changed: bool,
    },
}

/// How long shutdown waits for each trainer's last checkpoint (behind its queued steps).
pub const SHUTDOWN_CHECKPOINT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A guest's `trainer` resource: a shared handle.
pub struct TrainerResource(pub(crate) Arc<TrainerHandle>);

/// The handle of one trainer's thread.
pub struct TrainerHandle {
    name: String,
    publishes: Option<Name>,
    sender: SyncSender<Command>,
    stats: Arc<Stats>,
    metrics: TrainerMetrics,
    losses: Mutex<LossCurve>,
}

/// A trainer's metric handles.
struct TrainerMetrics {
    steps: prometheus_client::metrics::counter::Counter,
    seconds: prometheus_client::metrics::histogram::Histogram,
    loss: prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// Points of a loss curve kept per trainer.
pub const LOSS_POINTS: usize = 512;

/// A trainer's loss over its steps, in at most [`LOSS_POINTS`] points: when full,
/// every other point goes and the stride between kept steps doubles, so the curve
/// always spans every step since the trainer started.
#[derive(Default)]
pub struct LossCurve {
    points: Vec<(u64, f32)>,
    stride: u64,
    seen: u64,
}

impl LossCurve {
    /// Adds the loss of `step`.
    pub fn push(&mut self, step: u64, loss: f32) {
        self.stride = self.stride.max(1);
        self.seen += 1;
        if !(self.seen - 1).is_multiple_of(self.stride) {
            return;
        }
        self.points.push((step, loss));
        if self.points.len() >= LOSS_POINTS {
            let mut i = 0;
            self.points.retain(|_| {
                i += 1;
                i % 2 == 1
            });
            self.stride *= 2;
        }
    }

    /// `(step, loss)`, oldest first.
    pub fn points(&self) -> &[(u64, f32)] {
        &self.points
    }
}

/// Counters the trainer thread keeps up to date.
#[derive(Default)]
struct Stats {
    steps: AtomicU64,
    /// Unix time in milliseconds of the last checkpoint written (0: none yet).
    last_checkpoint_ms: AtomicU64,
}

impl TrainerHandle {
    /// Starts trainer `spec` from the initial graph at `init`, with its checkpoints in `dir`.
    pub fn start(app: &Name, spec: &TrainerSpec, init: &Path, dir: &Path) -> anyhow::Result<Self> {
        let started = Instant::now();
        let trainer = Trainer::load(spec, init, dir)?;
        tracing::info!(trainer = %spec.name, steps = trainer.steps(), "loaded in {:.1?}", started.elapsed());
        let stats = Arc::new(Stats {
            steps: AtomicU64::new(trainer.steps()),
            last_checkpoint_ms: AtomicU64::new(0),
        });
        let (sender, receiver) = sync_channel(MAX_QUEUED_COMMANDS);
        let every = spec.checkpoint_every;
        let counters = Arc::clone(&stats);
        std::thread::Builder::new()
            .name(format!("trainer-{}", spec.name))
            .spawn(move || serve(trainer, &receiver, every, &counters))
            .context("spawning the trainer thread")?;
        let m = crate::ops::metrics::metrics();
        let labels = crate::ops::metrics::TrainerLabels {
            app: app.to_string(),
            trainer: spec.name.to_string(),
        };
        Ok(Self {
            name: spec.name.to_string(),
            publishes: spec.publishes.clone(),
            sender,
            stats,
            metrics: TrainerMetrics {
                steps: m.trainer_steps.get_or_create_owned(&labels),
                seconds: m.trainer_step_seconds.get_or_create_owned(&labels),
                loss: m.trainer_loss.get_or_create_owned(&labels),
            },
            losses: Mutex::new(LossCurve::default()),
        })
    }

    /// The trainer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.stats.steps.load(Ordering::SeqCst)
    }

    /// Unix time in milliseconds of the last checkpoint this trainer wrote, if any.
    pub fn last_checkpoint_ms(&self) -> Option<u64> {
        Some(self.stats.last_checkpoint_ms.load(Ordering::SeqCst)).filter(|&t| t > 0)
    }

    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, NnError> {
        let (reply, answer) = oneshot::channel();
        match self.sender.try_send(command(reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(NnError::new(
                    ErrorCode::Timeout,
                    format!("trainer `{}` has too many queued commands", self.name),
                ));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(NnError::new(
                    ErrorCode::RuntimeError,
                    format!("trainer `{}` stopped", self.name),
                ));
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(NnError::new(
                ErrorCode::RuntimeError,
                format!("trainer `{}` stopped", self.name),
            ))
        })
    }

    /// One step on `inputs` and `targets`.
    pub async fn step(
        &self,
        inputs: Vec<(String, Tensor)>,
        targets: Tensor,
    ) -> Result<f32, NnError> {
        let started = Instant::now();
        let loss = self
            .ask(|reply| Command::Step {
                inputs,
                targets,
                reply,
            })
            .await?;
        self.metrics
            .seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.steps.inc();
        self.metrics.loss.set(f64::from(loss));
        let step = self.steps();
        self.losses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(step, loss);
        Ok(loss)
    }

    /// Its loss over the steps taken since it started here.
    pub fn loss_curve(&self) -> Vec<(u64, f32)> {
        self.losses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .points()
            .to_vec()
    }

    /// The loss, without an update.
    pub async fn evaluate(
        &self,
        inputs: Vec<(String, Tensor)>,
        targets: Tensor,
    ) -> Result<f32, NnError> {
        self.ask(|reply| Command::Evaluate {
            inputs,
            targets,
            reply,
        })
        .await
    }

    /// The trained model as ONNX bytes.
    pub async fn export(&self) -> Result<Vec<u8>, NnError> {
        self.ask(|reply| Command::Export { reply }).await
    }

    /// Writes a checkpoint now.
    pub async fn checkpoint(&self) -> Result<(), NnError> {
        self.ask(|reply| Command::Checkpoint {
            reply,
            only_if_changed: false,
        })
        .await
    }

    /// At shutdown: checkpoints if anything changed, waiting for a place in the queue
    /// (a full queue must not lose the last steps), for at most
    /// [`SHUTDOWN_CHECKPOINT_TIMEOUT`].
    async fn flush(&self) -> Result<(), NnError> {
        let (reply, answer) = oneshot::channel();
        let sender = self.sender.clone();
        let command = Command::Checkpoint {
            reply,
            only_if_changed: true,
        };
        let sent = tokio::task::spawn_blocking(move || sender.send(command).is_ok());
        let stopped = || {
            NnError::new(
                ErrorCode::RuntimeError,
                format!("trainer `{}` stopped", self.name),
            )
        };
        let timed_out = || {
            NnError::new(
                ErrorCode::Timeout,
                format!("trainer `{}` did not checkpoint in time", self.name),
            )
        };
        tokio::time::timeout(SHUTDOWN_CHECKPOINT_TIMEOUT, async {
            if !sent.await.unwrap_or(false) {
                return Err(stopped());
            }
            answer.await.unwrap_or_else(|_| Err(stopped()))
        })
        .await
        .unwrap_or_else(|_| Err(timed_out()))
    }

    /// Replaces inference model `model` with the current weights, through `publisher`.
    pub async fn publish(
        &self,
        model: &str,
        publisher: Option<&Arc<dyn Publisher>>,
    ) -> Result<(), NnError> {
        if self.publishes.as_ref().is_none_or(|p| p.as_str() != model) {
            return Err(NnError::new(
                ErrorCode::Security,
                format!(
                    "trainer `{}` may not publish {model:?} (its `publishes` is {:?})",
                    self.name,
                    self.publishes.as_ref().map(Name::as_str)
                ),
            ));
        }
        let publisher = publisher.cloned().ok_or_else(|| {
            NnError::new(
                ErrorCode::RuntimeError,
                "this node has no inference backend".into(),
            )
        })?;
        let bytes = self.export().await?;
        let name = model.to_owned();
        let steps = self.steps();
        tokio::task::spawn_blocking(move || publisher.publish(&name, &bytes))
            .await
            .map_err(|e| NnError::new(ErrorCode::RuntimeError, e.to_string()))?
            .map_err(|e| NnError::new(ErrorCode::RuntimeError, format!("{e:#}")))?;
        tracing::info!(trainer = %self.name, model, steps, "published");
        Ok(())
    }
}

/// Runs one command's work, turning a panic in candle into an error for the caller.
fn guarded<T>(trainer: &str, work: impl FnOnce() -> Result<T, NnError>) -> Result<T, NnError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        tracing::error!(trainer, "the training backend panicked: {message}");
        Err(NnError::new(
            ErrorCode::RuntimeError,
            format!("the training backend failed: {message}"),
        ))
    })
}

fn serve(
    mut trainer: Trainer,
    receiver: &Receiver<Command>,
    every: std::time::Duration,
    stats: &Stats,
) {
    let name = trainer.name().to_owned();
    let mut saved_steps = trainer.steps();
    let mut next_checkpoint = Instant::now() + every;
    loop {
        let command =
            receiver.recv_timeout(next_checkpoint.saturating_duration_since(Instant::now()));
        let stop = matches!(command, Err(RecvTimeoutError::Disconnected));
        match command {
            // Work for a request that went away (its deadline passed) is not done:
            // a step must not change the weights after its caller was told it failed.
            Ok(Command::Step { reply, .. } | Command::Evaluate { reply, .. })
                if reply.is_closed() => {}
            Ok(Command::Export { reply }) if reply.is_closed() => {}
            Ok(Command::Step {
                inputs,
                targets,
                reply,
            }) => {
                let result = guarded(&name, || trainer.step(&inputs, &targets));
                stats.steps.store(trainer.steps(), Ordering::SeqCst);
                let _ = reply.send(result);
            }
            Ok(Command::Evaluate {
                inputs,
                targets,
                reply,
            }) => {
                let _ = reply.send(guarded(&name, || trainer.evaluate(&inputs, &targets)));
            }
            Ok(Command::Export { reply }) => {
                let _ = reply.send(guarded(&name, || trainer.export()));
            }
            Ok(Command::Checkpoint {
                reply,
                only_if_changed,
            }) => {
                let result = if only_if_changed && trainer.steps() == saved_steps {
                    Ok(())
                } else {
                    guarded(&name, || trainer.checkpoint())
                };
                if result.is_ok() {
                    saved_steps = trainer.steps();
                    stats.checkpointed();
                }
                let _ = reply.send(result);
            }
            Err(_) => {}
        }
        if (Instant::now() >= next_checkpoint || stop) && trainer.steps() != saved_steps {
            match guarded(&name, || trainer.checkpoint()) {
                Ok(()) => {
                    saved_steps = trainer.steps();
                    stats.checkpointed();
                }
                Err(error) => {
                    tracing::error!(trainer = %name, "checkpoint failed: {}", error.message);
                }
            }
        }
        if Instant::now() >= next_checkpoint {
            next_checkpoint = Instant::now() + every;
        }
        if stop {
            break;
        }
    }
}

/// Answers candle's thread-count question once for the whole process.
///
/// candle (the training backend) asks how many threads to use on every matrix
/// product, and unless `RAYON_NUM_THREADS` is set it works that out by reading
/// `/proc/cpuinfo`: that made a small training step 3.6x slower (260 against 72 us,
/// `cargo bench --bench train`). This sets it to the number of cores unless it is set.
///
/// # Safety
///
/// It sets an environment variable: call it before any other thread exists (first
/// thing in `main`).
#[expect(
    unsafe_code,
    reason = "setting the environment is unsafe once other threads run"
)]
pub unsafe fn pin_candle_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        // SAFETY: the caller guarantees no other thread runs yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", cores.to_string()) };
    }
}

impl Stats {
    fn checkpointed(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_checkpoint_ms.store(
            u64::try_from(now.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }
}

/// The node's trainers, by app and name: started at a deploy, kept across versions
/// that keep a trainer's fingerprint, stopped once no active version uses them (and
/// their last request ended; the thread checkpoints as it stops).
pub struct TrainerRegistry {
    dir: std::path::PathBuf,
    /// By app, name and fingerprint: a trainer of another fingerprint is another
    /// trainer (its own checkpoint directory), and a live one is never replaced.
    live: Mutex<HashMap<(Name, Name, Digest), Weak<TrainerHandle>>>,
}

impl TrainerRegistry {
    /// A registry keeping checkpoints under `<state_dir>/trainers/`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("trainers"),
            live: Mutex::new(HashMap::new()),
        }
    }

    /// Trainer `spec` of `app`: the running one of the same fingerprint, else a new one
    /// started from `init` (resuming from its own checkpoint if it has one).
    pub fn get_or_start(
        &self,
        app: &Name,
        spec: &TrainerSpec,
        init: &Path,
    ) -> anyhow::Result<Arc<TrainerHandle>> {
        let fingerprint = spec.fingerprint();
        let key = (app.clone(), spec.name.clone(), fingerprint.clone());
        if let Some(running) = self.lock().get(&key).and_then(Weak::upgrade) {
            return Ok(running);
        }
        let dir =
            self.dir
                .join(app.as_str())
                .join(format!("{}-{}", spec.name, fingerprint.short()));
        let handle = Arc::new(TrainerHandle::start(app, spec, init, &dir)?);
        let mut live = self.lock();
        // Another deploy may have started the same trainer meanwhile: keep that one.
        if let Some(running) = live.get(&key).and_then(Weak::upgrade) {
            return Ok(running);
        }
        live.insert(key, Arc::downgrade(&handle));
        Ok(handle)
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(Name, Name, Digest), Weak<TrainerHandle>>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every running trainer, with its app.
    pub fn running(&self) -> Vec<(Name, Arc<TrainerHandle>)> {
        let mut live = self.lock();
        live.retain(|_, weak| weak.strong_count() > 0);
        let mut running: Vec<_> = live
            .iter()
            .filter_map(|((app, _, _), weak)| Some((app.clone(), weak.upgrade()?)))
            .collect();
        running.sort_by(|a, b| (&a.0, a.1.name()).cmp(&(&b.0, b.1.name())));
        running
    }

    /// Writes a checkpoint of every running trainer that changed (at shutdown).
    pub async fn checkpoint_all(&self) {
        for (app, trainer) in self.running() {
            if let Err(error) = trainer.flush().await {
                tracing::error!(app = %app, trainer = %trainer.name, "checkpoint failed: {}", error.message);
            }
        }
    }
}
