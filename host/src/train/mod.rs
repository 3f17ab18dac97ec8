//! `lepton:nn/training`: training steps on host-held models.
//!
//! Each trainer of the manifest lives on a thread of its own that takes commands
//! from a bounded queue: steps on one trainer run one at a time in arrival order
//! (a queue, not a lock held across await points), different trainers run in
//! parallel, and an async request only waits for its reply. A trainer that changed
//! is checkpointed every `checkpoint_every` (and on `checkpoint()`, and when the host
//! stops), atomically, under `<state-dir>/trainers/NAME/`; `lepton up` on the same
//! state dir resumes from there.

mod backend;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::Instant;

use anyhow::Context as _;
use tokio::sync::oneshot;

pub use self::backend::Trainer;
use crate::bindings::wasi::nn::errors::ErrorCode;
use crate::manifest::{Deployment, TrainerSpec};
use crate::nn::{ModelRegistry, NnError, Tensor};

/// Commands waiting for one trainer, past which new ones are refused.
pub const MAX_QUEUED_COMMANDS: usize = 1024;

type Reply<T> = oneshot::Sender<Result<T, NnError>>;

enum Command {
    Step { inputs: Vec<(String, Tensor)>, targets: Tensor, reply: Reply<f32> },
    Evaluate { inputs: Vec<(String, Tensor)>, targets: Tensor, reply: Reply<f32> },
    Export { reply: Reply<Vec<u8>> },
    /// `only_if_changed`: skip the write when nothing changed since the last one.
    Checkpoint { reply: Reply<()>, only_if_changed: bool },
}

/// How long shutdown waits for each trainer's last checkpoint (behind its queued steps).
pub const SHUTDOWN_CHECKPOINT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A guest's `trainer` resource: a shared handle.
pub struct TrainerResource(pub(crate) Arc<TrainerHandle>);

/// The handle of one trainer's thread.
pub struct TrainerHandle {
    name: String,
    publishes: Option<String>,
    sender: SyncSender<Command>,
    steps: Arc<AtomicU64>,
}

impl TrainerHandle {
    fn start(spec: &TrainerSpec, state_dir: &Path) -> anyhow::Result<Self> {
        let started = Instant::now();
        let trainer = Trainer::load(spec, state_dir).with_context(|| format!("trainer `{}`", spec.name))?;
        tracing::info!(trainer = %spec.name, steps = trainer.steps(), "loaded in {:.1?}", started.elapsed());
        let steps = Arc::new(AtomicU64::new(trainer.steps()));
        let (sender, receiver) = sync_channel(MAX_QUEUED_COMMANDS);
        let every = spec.checkpoint_every;
        let counter = Arc::clone(&steps);
        std::thread::Builder::new()
            .name(format!("trainer-{}", spec.name))
            .spawn(move || serve(trainer, &receiver, every, &counter))
            .context("spawning the trainer thread")?;
        Ok(Self { name: spec.name.clone(), publishes: spec.publishes.clone(), sender, steps })
    }

    /// The trainer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps.load(Ordering::SeqCst)
    }

    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, NnError> {
        let (reply, answer) = oneshot::channel();
        match self.sender.try_send(command(reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(NnError::new(ErrorCode::Timeout, format!("trainer `{}` has too many queued commands", self.name)));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(NnError::new(ErrorCode::RuntimeError, format!("trainer `{}` stopped", self.name)));
            }
        }
        answer
            .await
            .unwrap_or_else(|_| Err(NnError::new(ErrorCode::RuntimeError, format!("trainer `{}` stopped", self.name))))
    }

    /// One step on `inputs` and `targets`.
    pub async fn step(&self, inputs: Vec<(String, Tensor)>, targets: Tensor) -> Result<f32, NnError> {
        self.ask(|reply| Command::Step { inputs, targets, reply }).await
    }

    /// The loss, without an update.
    pub async fn evaluate(&self, inputs: Vec<(String, Tensor)>, targets: Tensor) -> Result<f32, NnError> {
        self.ask(|reply| Command::Evaluate { inputs, targets, reply }).await
    }

    /// The trained model as ONNX bytes.
    pub async fn export(&self) -> Result<Vec<u8>, NnError> {
        self.ask(|reply| Command::Export { reply }).await
    }

    /// Writes a checkpoint now.
    pub async fn checkpoint(&self) -> Result<(), NnError> {
        self.ask(|reply| Command::Checkpoint { reply, only_if_changed: false }).await
    }

    /// At shutdown: checkpoints if anything changed, waiting for a place in the queue
    /// (a full queue must not lose the last steps), for at most
    /// [`SHUTDOWN_CHECKPOINT_TIMEOUT`].
    async fn flush(&self) -> Result<(), NnError> {
        let (reply, answer) = oneshot::channel();
        let sender = self.sender.clone();
        let command = Command::Checkpoint { reply, only_if_changed: true };
        let sent = tokio::task::spawn_blocking(move || sender.send(command).is_ok());
        let stopped = || NnError::new(ErrorCode::RuntimeError, format!("trainer `{}` stopped", self.name));
        let timed_out = || NnError::new(ErrorCode::Timeout, format!("trainer `{}` did not checkpoint in time", self.name));
        tokio::time::timeout(SHUTDOWN_CHECKPOINT_TIMEOUT, async {
            if !sent.await.unwrap_or(false) {
                return Err(stopped());
            }
            answer.await.unwrap_or_else(|_| Err(stopped()))
        })
        .await
        .unwrap_or_else(|_| Err(timed_out()))
    }

    /// Replaces inference model `model` with the current weights.
    pub async fn publish(&self, model: &str, models: Option<&Arc<ModelRegistry>>) -> Result<(), NnError> {
        if self.publishes.as_deref() != Some(model) {
            return Err(NnError::new(
                ErrorCode::Security,
                format!("trainer `{}` may not publish {model:?} (its `publishes` is {:?})", self.name, self.publishes),
            ));
        }
        let models = models.ok_or_else(|| NnError::new(ErrorCode::RuntimeError, "this node has no inference backend".into()))?;
        let bytes = self.export().await?;
        let models = Arc::clone(models);
        let name = model.to_owned();
        let steps = self.steps();
        tokio::task::spawn_blocking(move || models.replace(&name, &bytes))
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
        Err(NnError::new(ErrorCode::RuntimeError, format!("the training backend failed: {message}")))
    })
}

fn serve(mut trainer: Trainer, receiver: &Receiver<Command>, every: std::time::Duration, steps: &AtomicU64) {
    let name = trainer.name().to_owned();
    let mut saved_steps = trainer.steps();
    let mut next_checkpoint = Instant::now() + every;
    loop {
        let command = receiver.recv_timeout(next_checkpoint.saturating_duration_since(Instant::now()));
        let stop = matches!(command, Err(RecvTimeoutError::Disconnected));
        match command {
            // Work for a request that went away (its deadline passed) is not done:
            // a step must not change the weights after its caller was told it failed.
            Ok(Command::Step { reply, .. } | Command::Evaluate { reply, .. }) if reply.is_closed() => {}
            Ok(Command::Export { reply }) if reply.is_closed() => {}
            Ok(Command::Step { inputs, targets, reply }) => {
                let result = guarded(&name, || trainer.step(&inputs, &targets));
                steps.store(trainer.steps(), Ordering::SeqCst);
                let _ = reply.send(result);
            }
            Ok(Command::Evaluate { inputs, targets, reply }) => {
                let _ = reply.send(guarded(&name, || trainer.evaluate(&inputs, &targets)));
            }
            Ok(Command::Export { reply }) => {
                let _ = reply.send(guarded(&name, || trainer.export()));
            }
            Ok(Command::Checkpoint { reply, only_if_changed }) => {
                let result = if only_if_changed && trainer.steps() == saved_steps {
                    Ok(())
                } else {
                    guarded(&name, || trainer.checkpoint())
                };
                if result.is_ok() {
                    saved_steps = trainer.steps();
                }
                let _ = reply.send(result);
            }
            Err(_) => {}
        }
        if (Instant::now() >= next_checkpoint || stop) && trainer.steps() != saved_steps {
            match guarded(&name, || trainer.checkpoint()) {
                Ok(()) => saved_steps = trainer.steps(),
                Err(error) => tracing::error!(trainer = %name, "checkpoint failed: {}", error.message),
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
#[expect(unsafe_code, reason = "setting the environment is unsafe once other threads run")]
pub unsafe fn pin_candle_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        // SAFETY: the caller guarantees no other thread runs yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", cores.to_string()) };
    }
}

/// Writes `bytes` to `path` through a temporary file that is synced and renamed
/// into place, so a crash leaves either the old file or the new one.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let temp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = std::fs::File::create(&temp).with_context(|| format!("creating `{}`", temp.display()))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).with_context(|| format!("writing `{}`", temp.display()))?;
    std::fs::rename(&temp, path).with_context(|| format!("renaming into `{}`", path.display()))
}

/// Every trainer of the node, by name.
pub struct TrainerRegistry {
    trainers: Vec<Arc<TrainerHandle>>,
}

impl TrainerRegistry {
    /// Loads every trainer of `deployment`, resuming from checkpoints under `state_dir`.
    pub fn load(deployment: &Deployment, state_dir: &Path) -> anyhow::Result<Self> {
        let trainers = deployment
            .trainers
            .iter()
            .map(|spec| TrainerHandle::start(spec, state_dir).map(Arc::new))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { trainers })
    }

    /// The trainer named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<TrainerHandle>> {
        self.trainers.iter().find(|t| t.name == name).cloned()
    }

    /// Writes a checkpoint of every trainer that changed (at shutdown).
    pub async fn checkpoint_all(&self) {
        for trainer in &self.trainers {
            if let Err(error) = trainer.flush().await {
                tracing::error!(trainer = %trainer.name, "checkpoint failed: {}", error.message);
            }
        }
    }

    /// Appends each trainer's step count in the Prometheus text format.
    pub fn write_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        for trainer in &self.trainers {
            let _ = writeln!(out, "lepton_trainer_steps_total{{trainer=\"{}\"}} {}", trainer.name, trainer.steps());
        }
    }
}
