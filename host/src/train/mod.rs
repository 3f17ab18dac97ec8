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
    Checkpoint { reply: Reply<()> },
}

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
        self.ask(|reply| Command::Checkpoint { reply }).await
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

fn serve(mut trainer: Trainer, receiver: &Receiver<Command>, every: std::time::Duration, steps: &AtomicU64) {
    let mut saved_steps = trainer.steps();
    let mut next_checkpoint = Instant::now() + every;
    loop {
        let command = receiver.recv_timeout(next_checkpoint.saturating_duration_since(Instant::now()));
        let stop = matches!(command, Err(RecvTimeoutError::Disconnected));
        match command {
            Ok(Command::Step { inputs, targets, reply }) => {
                let result = trainer.step(&inputs, &targets);
                steps.store(trainer.steps(), Ordering::SeqCst);
                let _ = reply.send(result);
            }
            Ok(Command::Evaluate { inputs, targets, reply }) => {
                let _ = reply.send(trainer.evaluate(&inputs, &targets));
            }
            Ok(Command::Export { reply }) => {
                let _ = reply.send(trainer.export());
            }
            Ok(Command::Checkpoint { reply }) => {
                let result = trainer.checkpoint();
                if result.is_ok() {
                    saved_steps = trainer.steps();
                }
                let _ = reply.send(result);
            }
            Err(_) => {}
        }
        if (Instant::now() >= next_checkpoint || stop) && trainer.steps() != saved_steps {
            match trainer.checkpoint() {
                Ok(()) => saved_steps = trainer.steps(),
                Err(error) => tracing::error!(trainer = trainer.name(), "checkpoint failed: {}", error.message),
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
            if let Err(error) = trainer.checkpoint().await {
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
