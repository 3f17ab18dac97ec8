//! Training on host-held models through Lepton's `lepton:nn/training` interface
//! (`wit/training.wit`), the extension beside `wasi:nn`, which covers inference only.
//!
//! A trainer is declared in the manifest (`[trainer.digits]`: the initial ONNX graph,
//! the loss, the optimizer, the model it publishes) and granted per function
//! (`trainers = ["digits"]`); [`Trainer::open`] opens one and any other name fails with
//! [`ErrorCode::NotFound`](crate::nn::ErrorCode::NotFound). The host keeps the weights,
//! runs the steps of all requests one after another and checkpoints them, so a
//! trainer outlives the request that opened it. Inputs and targets are the same
//! [`Tensor`]s as [`crate::nn`]'s, and failures the same [`Error`]:
//!
//! ```no_run
//! use lepton_sdk::nn::{Error, Tensor};
//! use lepton_sdk::train::Trainer;
//!
//! /// One step on a batch of 8x8 images (pixels 0..=16) and their digits.
//! fn learn(images: &[[u8; 64]], labels: &[i64]) -> Result<f32, Error> {
//!     let pixels: Vec<f32> = images.iter().flatten().map(|&p| f32::from(p) / 16.0).collect();
//!     let rows = images.len() as u32;
//!     let images = Tensor::from_f32(&[rows, 64], &pixels)?;
//!     // Cross-entropy takes class indices, one per row.
//!     let labels = Tensor::from_i64(&[rows], labels)?;
//!     let trainer = Trainer::open("digits")?;
//!     let loss = trainer.step(&[("images", &images)], &labels)?;
//!     if trainer.steps() % 100 == 0 {
//!         // From now on `Graph::load_by_name("digits")` runs the new weights.
//!         trainer.publish("digits")?;
//!     }
//!     Ok(loss)
//! }
//! # fn main() {}
//! ```

use crate::bindings::lepton::nn::training;
use crate::nn::{Error, Tensor};

/// A trainer the host holds (`lepton:nn/training.trainer`).
#[derive(Debug)]
pub struct Trainer(training::Trainer);

impl Trainer {
    /// Opens the trainer that the function's manifest grants under `name`.
    ///
    /// Fails with [`ErrorCode::NotFound`](crate::nn::ErrorCode::NotFound) for a
    /// trainer that is not granted.
    pub fn open(name: &str) -> Result<Self, Error> {
        Ok(Self(training::open(name)?))
    }

    /// One optimizer step: the forward pass on the named `inputs`, the loss against
    /// `targets`, the backward pass and the update. Returns the loss before the update.
    ///
    /// For a cross-entropy trainer `targets` holds one class index per row (an
    /// [`I64`](crate::nn::TensorType::I64) or [`I32`](crate::nn::TensorType::I32)
    /// tensor of dimensions `[N]`); for mean squared error, values shaped like the
    /// output. Inputs that do not match the graph's declared inputs, or class indices
    /// out of range, fail with
    /// [`ErrorCode::InvalidArgument`](crate::nn::ErrorCode::InvalidArgument).
    pub fn step(&self, inputs: &[(&str, &Tensor)], targets: &Tensor) -> Result<f32, Error> {
        Ok(self
            .0
            .step(Tensor::named_to_wit(inputs), targets.to_wit())?)
    }

    /// The loss on `inputs` and `targets`, as [`Trainer::step`] computes it, without
    /// updating anything.
    pub fn evaluate(&self, inputs: &[(&str, &Tensor)], targets: &Tensor) -> Result<f32, Error> {
        Ok(self
            .0
            .evaluate(Tensor::named_to_wit(inputs), targets.to_wit())?)
    }

    /// How many steps the trainer has taken since it was created (checkpoints keep
    /// the count across restarts).
    pub fn steps(&self) -> u64 {
        self.0.steps()
    }

    /// The trained model: the initial ONNX graph with the current weights.
    pub fn export(&self) -> Result<Vec<u8>, Error> {
        Ok(self.0.export()?)
    }

    /// Replaces the inference model `model` with the current weights, so that
    /// [`Graph::load_by_name`](crate::nn::Graph::load_by_name) returns them for new
    /// requests. Only the model the trainer's manifest entry `publishes` is allowed.
    pub fn publish(&self, model: &str) -> Result<(), Error> {
        Ok(self.0.publish(model)?)
    }

    /// Writes a checkpoint (weights and step count) now, rather than at the
    /// manifest's `checkpoint_every`.
    pub fn checkpoint(&self) -> Result<(), Error> {
        Ok(self.0.checkpoint()?)
    }
}
