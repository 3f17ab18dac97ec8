//! `learn`: trains a digit classifier on the host through `lepton:nn/training` and
//! serves it through `wasi:nn`. One component, mounted twice by the manifest
//! (`/learn` with the trainer `digits`, `/classify` with the model `digits` only).
//!
//! A batch is `{"images": [[64 numbers 0..=16], ...], "labels": [0..=9, ...]}`:
//! scikit-learn's 8x8 digits (see `make_digits.py`). The guest divides the pixels by
//! 16 and sends them as the model's input `images` (FP32 `[N, 64]`), the labels as
//! class indices (I64 `[N]`). Every route takes `POST`:
//!
//! - `/learn`: one training step on the batch → `{"loss": 2.31, "steps": 1}` (the loss
//!   before the update; the trainer's step count after it).
//! - `/learn/evaluate`: the trainer's loss on the batch, no update → `{"loss": 0.42}`.
//! - `/learn/publish`: the current weights become the model `digits`
//!   → `{"published": "digits", "steps": 300}`.
//! - `/learn/checkpoint`: a checkpoint now → `{"steps": 300}`.
//! - `/classify`: the published model (`wasi:nn` `load-by-name("digits")`) on the
//!   images → `{"labels": [3, 7]}`; when the batch has labels, also `"loss"`: the mean
//!   softmax cross-entropy of the logits, computed here, comparable with
//!   `/learn/evaluate`.
//!
//! A bad body answers 400 with a plain message. A `wasi:nn` or training error answers
//! `<code>: <message>` (e.g. `not-found: ...`) with 400 for `invalid-argument`, 404
//! for `not-found` and 500 otherwise.

mod digits;

use lepton_sdk::http::{Method, StatusCode};
use lepton_sdk::nn::{self, ErrorCode, Graph, Tensor};
use lepton_sdk::train::Trainer;
use lepton_sdk::{Request, Response, json_response, method_not_allowed, text_response as text};
use serde::Serialize;
use serde_json::json;

use crate::digits::{Batch, PIXELS};

/// The trainer the manifest grants to `/learn`.
const TRAINER: &str = "digits";
/// The model the trainer publishes and `/classify` runs.
const MODEL: &str = "digits";
/// The model's input and output names.
const INPUT: &str = "images";
const OUTPUT: &str = "logits";

/// Why a request failed.
enum Failure {
    /// The client's fault, said in plain words.
    BadRequest(String),
    /// A `wasi:nn` or `lepton:nn/training` call failed.
    Nn(nn::Error),
    /// The model answered something this guest cannot read.
    Internal(String),
}

impl From<nn::Error> for Failure {
    fn from(error: nn::Error) -> Self {
        Self::Nn(error)
    }
}

fn learn(request: Request) -> Response {
    if request.method() != Method::POST {
        return method_not_allowed("POST", "use POST with a JSON batch as the body\n");
    }
    let body = request.body();
    let answer = match request.uri().path() {
        "/learn" => step(body),
        "/learn/evaluate" => evaluate(body),
        "/learn/publish" => publish(),
        "/learn/checkpoint" => checkpoint(),
        "/classify" => classify(body),
        path => {
            return text(
                StatusCode::NOT_FOUND,
                format!(
                    "no route {path:?}; use /learn, /learn/evaluate, /learn/publish, \
                     /learn/checkpoint or /classify\n"
                ),
            );
        }
    };
    match answer {
        Ok(value) => json_answer(&value),
        Err(Failure::BadRequest(message)) => text(StatusCode::BAD_REQUEST, format!("{message}\n")),
        Err(Failure::Nn(error)) => {
            let status = match error.code {
                ErrorCode::InvalidArgument => StatusCode::BAD_REQUEST,
                ErrorCode::NotFound => StatusCode::NOT_FOUND,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            text(status, format!("{error}\n"))
        }
        Err(Failure::Internal(message)) => {
            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{message}\n"))
        }
    }
}

/// A batch whose labels are required.
fn labelled(body: &[u8]) -> Result<(Tensor, Tensor), Failure> {
    let batch = Batch::parse(body).map_err(Failure::BadRequest)?;
    let Some(labels) = &batch.labels else {
        return Err(Failure::BadRequest("`labels` is required".to_owned()));
    };
    Ok((images(&batch)?, Tensor::from_i64(&[batch.rows], labels)?))
}

fn images(batch: &Batch) -> Result<Tensor, nn::Error> {
    Tensor::from_f32(&[batch.rows, PIXELS as u32], &batch.scaled)
}

fn step(body: &[u8]) -> Result<serde_json::Value, Failure> {
    let (images, labels) = labelled(body)?;
    let trainer = Trainer::open(TRAINER)?;
    let loss = trainer.step(&[(INPUT, &images)], &labels)?;
    Ok(json!({ "loss": loss, "steps": trainer.steps() }))
}

fn evaluate(body: &[u8]) -> Result<serde_json::Value, Failure> {
    let (images, labels) = labelled(body)?;
    let loss = Trainer::open(TRAINER)?.evaluate(&[(INPUT, &images)], &labels)?;
    Ok(json!({ "loss": loss }))
}

fn publish() -> Result<serde_json::Value, Failure> {
    let trainer = Trainer::open(TRAINER)?;
    trainer.publish(MODEL)?;
    Ok(json!({ "published": MODEL, "steps": trainer.steps() }))
}

fn checkpoint() -> Result<serde_json::Value, Failure> {
    let trainer = Trainer::open(TRAINER)?;
    trainer.checkpoint()?;
    Ok(json!({ "steps": trainer.steps() }))
}

fn classify(body: &[u8]) -> Result<serde_json::Value, Failure> {
    let batch = Batch::parse(body).map_err(Failure::BadRequest)?;
    let outputs = Graph::load_by_name(MODEL)?.compute(&[(INPUT, &images(&batch)?)])?;
    let logits = outputs.require(OUTPUT)?;
    let classes = match logits.dims() {
        &[rows, classes] if rows == batch.rows && classes > 0 => classes as usize,
        dims => {
            return Err(Failure::Internal(format!(
                "the model's `{OUTPUT}` has dimensions {dims:?}, not [{}, classes]",
                batch.rows
            )));
        }
    };
    let logits = logits.to_f32()?;
    let labels = digits::argmax(&logits, classes).map_err(Failure::Internal)?;
    Ok(match &batch.labels {
        None => json!({ "labels": labels }),
        Some(targets) => {
            let loss =
                digits::cross_entropy(&logits, classes, targets).map_err(Failure::BadRequest)?;
            json!({ "labels": labels, "loss": loss })
        }
    })
}

fn json_answer(value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => json_response(body),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding the answer: {e}\n")),
    }
}

lepton_sdk::http_handler!(learn);
