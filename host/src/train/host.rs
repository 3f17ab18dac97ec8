//! The guest side of `lepton:nn/training`: ctx, view, host traits, `add_to_linker`.

use std::collections::HashMap;
use std::sync::Arc;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use super::{Publisher, TrainerHandle, TrainerResource};
use crate::bindings::lepton::nn::training;
use crate::nn::{ErrorCode, NnError, Tensor, tensors_from_table};

/// What one instance may reach through `lepton:nn/training`: the trainers its
/// function is granted (by name) and where their `publish` goes.
#[derive(Clone, Default)]
pub struct TrainCtx {
    trainers: Arc<HashMap<String, Arc<TrainerHandle>>>,
    publisher: Option<Arc<dyn Publisher>>,
    /// The guest's span, when spans are exported.
    trace: Option<crate::ops::trace::TraceContext>,
}

impl TrainCtx {
    /// Grants exactly `trainers`; `publish` goes to `publisher`.
    pub fn new(
        trainers: Arc<HashMap<String, Arc<TrainerHandle>>>,
        publisher: Option<Arc<dyn Publisher>>,
    ) -> Self {
        Self {
            trace: None,
            trainers,
            publisher,
        }
    }

    /// Records each training step inside `trace`.
    #[must_use]
    pub fn with_trace(mut self, trace: Option<crate::ops::trace::TraceContext>) -> Self {
        self.trace = trace.filter(|_| crate::ops::trace::exporting());
        self
    }
}

/// A borrowed view of an instance's training state; the host traits are implemented on it.
pub struct TrainView<'a> {
    ctx: &'a TrainCtx,
    table: &'a mut ResourceTable,
}

impl<'a> TrainView<'a> {
    /// A view over `ctx` and the store's resource table.
    pub fn new(ctx: &'a TrainCtx, table: &'a mut ResourceTable) -> Self {
        Self { ctx, table }
    }

    fn answer<T>(
        &mut self,
        result: Result<T, NnError>,
    ) -> wasmtime::Result<Result<T, Resource<NnError>>> {
        match result {
            Ok(value) => Ok(Ok(value)),
            Err(error) => {
                tracing::debug!(code = ?error.code, "training error: {}", error.message);
                Ok(Err(self.table.push(error)?))
            }
        }
    }

    fn handle(&self, trainer: &Resource<TrainerResource>) -> wasmtime::Result<Arc<TrainerHandle>> {
        Ok(Arc::clone(&self.table.get(trainer)?.0))
    }

    /// A training step (`update`) or an evaluation, on tensors copied out of the table.
    async fn loss(
        &mut self,
        trainer: Resource<TrainerResource>,
        inputs: Vec<(String, Resource<Tensor>)>,
        targets: Resource<Tensor>,
        update: bool,
    ) -> wasmtime::Result<Result<f32, Resource<NnError>>> {
        let handle = self.handle(&trainer)?;
        let inputs = tensors_from_table(self.table, inputs)?;
        let targets = self.table.get(&targets)?.clone();
        let result = if update {
            let started = std::time::Instant::now();
            let result = handle.step(inputs, targets).await;
            if let Some(trace) = &self.ctx.trace {
                crate::ops::trace::record_child(
                    trace,
                    "training step",
                    started,
                    vec![opentelemetry::KeyValue::new(
                        "lepton.trainer",
                        handle.name().to_owned(),
                    )],
                );
            }
            result
        } else {
            handle.evaluate(inputs, targets).await
        };
        self.answer(result)
    }
}

struct HasTraining;

impl HasData for HasTraining {
    type Data<'a> = TrainView<'a>;
}

/// Adds `lepton:nn/training` to `linker`; `view` hands out each store's [`TrainView`].
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> TrainView<'_>,
) -> wasmtime::Result<()> {
    training::add_to_linker::<T, HasTraining>(linker, view)
}

impl training::Host for TrainView<'_> {
    fn open(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<Resource<TrainerResource>, Resource<NnError>>> {
        // Ungranted and unknown names answer alike.
        match self.ctx.trainers.get(&name) {
            Some(trainer) => Ok(Ok(self.table.push(TrainerResource(Arc::clone(trainer)))?)),
            None => self.answer(Err(NnError::new(
                ErrorCode::NotFound,
                format!("no trainer named {name:?}"),
            ))),
        }
    }
}

impl training::HostTrainer for TrainView<'_> {
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
        Ok(self.handle(&trainer)?.steps())
    }

    async fn export(
        &mut self,
        trainer: Resource<TrainerResource>,
    ) -> wasmtime::Result<Result<Vec<u8>, Resource<NnError>>> {
        let result = self.handle(&trainer)?.export().await;
        self.answer(result)
    }

    async fn publish(
        &mut self,
        trainer: Resource<TrainerResource>,
        model: String,
    ) -> wasmtime::Result<Result<(), Resource<NnError>>> {
        let handle = self.handle(&trainer)?;
        let publisher = self.ctx.publisher.clone();
        let result = handle.publish(&model, publisher.as_ref()).await;
        self.answer(result)
    }

    async fn checkpoint(
        &mut self,
        trainer: Resource<TrainerResource>,
    ) -> wasmtime::Result<Result<(), Resource<NnError>>> {
        let result = self.handle(&trainer)?.checkpoint().await;
        self.answer(result)
    }

    fn drop(&mut self, trainer: Resource<TrainerResource>) -> wasmtime::Result<()> {
        self.table.delete(trainer)?;
        Ok(())
    }
}
