//! A trainer's state and arithmetic: an ONNX graph whose float initializers are
//! candle `Var`s; forward through `candle-onnx`, loss, backward, optimizer update.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use candle_core::{DType, Device, Tensor as CTensor, Var};
use candle_nn::optim::{AdamW, Optimizer as _, ParamsAdamW};
use candle_onnx::onnx::{
    ModelProto, StringStringEntryProto, TensorProto, tensor_proto::DataType, type_proto,
};
use prost::Message as _;

use crate::bindings::wasi::nn::errors::ErrorCode;
use crate::manifest::{Loss, Optimizer, Target, TrainerSpec};
use crate::nn::ElementType;
use crate::nn::{NnError, Tensor};

/// Ops a trainer refuses at start, with the reason given to the operator.
fn unsupported(op: &str) -> Option<&'static str> {
    Some(match op {
        "LSTM" | "GRU" | "RNN" => "recurrent ops stop gradients in candle-onnx",
        "BatchNormalization" => "training-mode batch normalization is not supported",
        "MaxPool" | "AveragePool" | "GlobalMaxPool" | "GlobalAveragePool" | "LpPool"
        | "GlobalLpPool" | "MaxRoiPool" | "MaxUnpool" => "pooling is not supported for training",
        "Dropout" => "dropout has no training mode here",
        _ => return None,
    })
}

const STEPS_KEY: &str = "lepton.steps";

/// Most steps a checkpoint may claim: 2^53, what a JSON client reads exactly (no real
/// trainer gets near it; a checkpoint past it is not ours).
pub const MAX_STEPS: u64 = 1 << 53;
/// The trainer's fingerprint ([`TrainerSpec::fingerprint`]) a checkpoint was written by.
const INIT_KEY: &str = "lepton.init_digest";

/// A declared graph input: name and dimensions (`None`: any size).
struct Input {
    name: String,
    dims: Vec<Option<usize>>,
}

enum OptimizerState {
    AdamW(AdamW),
    Sgd {
        lr: f64,
        momentum: f64,
        velocity: Vec<Option<CTensor>>,
    },
}

/// A trainer: the graph, its weights, the optimizer, the step count.
pub struct Trainer {
    name: String,
    /// The graph with its float initializers taken out (they live in `weights`).
    graph: ModelProto,
    weights: Vec<(TensorProto, Var)>,
    inputs: Vec<Input>,
    output: String,
    loss: Loss,
    optimizer: OptimizerState,
    steps: u64,
    device: Device,
    init_digest: String,
    checkpoint: PathBuf,
}

/// Checkpoints kept per trainer (the newest); older ones are removed as new ones land.
pub const KEEP_CHECKPOINTS: usize = 3;

/// Where a trainer's checkpoints are, inside its directory.
const CHECKPOINTS_DIR: &str = "checkpoints";

/// The largest checkpoint file read.
const MAX_CHECKPOINT_SIZE: u64 = 4 << 30;

/// A trainer's checkpoints in `dir`, newest (most steps) first: `checkpoints/step-N.onnx`,
/// then the single `checkpoint.onnx` older hosts wrote.
fn checkpoints(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut found: Vec<(PathBuf, u64)> = std::fs::read_dir(dir.join(CHECKPOINTS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let steps = path
                .file_name()?
                .to_str()?
                .strip_prefix("step-")?
                .strip_suffix(".onnx")?
                .parse()
                .ok()?;
            Some((path, steps))
        })
        .collect();
    found.sort_by_key(|c| std::cmp::Reverse(c.1));
    let legacy = dir.join("checkpoint.onnx");
    if legacy.exists() {
        found.push((legacy, 0));
    }
    found
}

/// Moves the unusable checkpoint at `path` into `dir/bad/` under a name of its own.
fn move_aside(dir: &Path, path: &Path) -> PathBuf {
    let bad = dir.join("bad");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let name = path
        .file_name()
        .map_or_else(|| "checkpoint".into(), |n| n.to_string_lossy().into_owned());
    let target = bad.join(format!("{name}.{stamp}"));
    let moved = std::fs::create_dir_all(&bad).and_then(|()| std::fs::rename(path, &target));
    if let Err(error) = moved {
        tracing::warn!("moving `{}` aside: {error}", path.display());
    }
    target
}

/// The initial graph with the weights of the checkpoint at `path`, and its steps;
/// `Err` if the checkpoint is unreadable, another trainer's, or does not fit the graph.
fn resume_from(
    initial: &ModelProto,
    path: &Path,
    fingerprint: &str,
) -> anyhow::Result<(ModelProto, u64)> {
    let bytes = crate::fsutil::read_regular_file(path, MAX_CHECKPOINT_SIZE)?;
    let saved = ModelProto::decode(bytes.as_slice()).context("not an ONNX model")?;
    let meta = |key: &str| {
        saved
            .metadata_props
            .iter()
            .find(|p| p.key == key)
            .map(|p| p.value.as_str())
    };
    anyhow::ensure!(
        meta(INIT_KEY) == Some(fingerprint),
        "it was written by a trainer of another initial graph or settings"
    );
    let steps = meta(STEPS_KEY)
        .and_then(|s| s.parse::<u64>().ok())
        .context("it does not say how many steps it holds")?;
    anyhow::ensure!(
        steps <= MAX_STEPS,
        "it claims {steps} steps (at most {MAX_STEPS})"
    );
    // Only the weights come from the checkpoint; the graph is the initial one.
    let saved_weights: HashMap<&str, &TensorProto> = saved
        .graph
        .as_ref()
        .map(|g| g.initializer.iter().map(|t| (t.name.as_str(), t)).collect())
        .unwrap_or_default();
    let mut model = initial.clone();
    let graph = model
        .graph
        .as_mut()
        .context("the initial graph has no graph")?;
    for init in &mut graph.initializer {
        if init.data_type != DataType::Float as i32 {
            continue;
        }
        let saved = saved_weights
            .get(init.name.as_str())
            .with_context(|| format!("it has no weight `{}`", init.name))?;
        anyhow::ensure!(
            saved.data_type == init.data_type && saved.dims == init.dims,
            "weight `{}` has type {} and dimensions {:?}; the graph's has {} and {:?}",
            init.name,
            saved.data_type,
            saved.dims,
            init.data_type,
            init.dims
        );
        let elements: usize = init
            .dims
            .iter()
            .map(|&d| usize::try_from(d).unwrap_or(0))
            .product();
        let values: Vec<f32> = if saved.raw_data.is_empty() {
            saved.float_data.clone()
        } else {
            saved
                .raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        anyhow::ensure!(
            values.len() == elements,
            "weight `{}` holds {} values, not {elements}",
            init.name,
            values.len()
        );
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            anyhow::bail!("weight `{}` holds {bad}", init.name);
        }
        init.float_data.clear();
        init.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    }
    model
        .metadata_props
        .retain(|p| p.key != STEPS_KEY && p.key != INIT_KEY);
    Ok((model, steps))
}

/// Whether every element of `tensor` is finite.
fn all_finite(tensor: &CTensor) -> Result<bool, NnError> {
    let values = tensor
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(runtime)?;
    Ok(values.iter().all(|v| v.is_finite()))
}

/// Little-endian f32 elements (the length was checked against the dimensions).
fn f32s(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn invalid(message: String) -> NnError {
    NnError::new(ErrorCode::InvalidArgument, message)
}

fn runtime(error: impl std::fmt::Display) -> NnError {
    NnError::new(ErrorCode::RuntimeError, error.to_string())
}

impl Trainer {
    /// Loads `spec` from its initial graph at `init`, resuming from the newest good
    /// checkpoint in `dir` (one written by a trainer of the same fingerprint: same
    /// initial graph and settings), and checks that it can be trained. A checkpoint
    /// that cannot be read or does not fit the graph is moved aside into `dir/bad/`
    /// (never overwritten or deleted) and the next older one is tried; with none left,
    /// training starts from `init` at step 0.
    pub fn load(spec: &TrainerSpec, init: &Path, dir: &Path) -> anyhow::Result<Self> {
        let fingerprint = spec.fingerprint().to_string();
        let initial = candle_onnx::read_file(init)
            .map_err(|e| anyhow::anyhow!("reading `{}`: {e}", init.display()))?;
        for (path, _) in checkpoints(dir) {
            let error = match resume_from(&initial, &path, &fingerprint) {
                Err(error) => error,
                Ok((model, steps)) => match Self::build(spec, model, steps, dir, &fingerprint) {
                    Ok(trainer) => {
                        tracing::info!(trainer = %spec.name, steps, path = %path.display(), "resuming from checkpoint");
                        return Ok(trainer);
                    }
                    Err(error) => {
                        // The checkpoint is at fault only if the initial graph builds.
                        Self::build(spec, initial.clone(), 0, dir, &fingerprint)?;
                        error
                    }
                },
            };
            let aside = move_aside(dir, &path);
            tracing::error!(
                trainer = %spec.name,
                "checkpoint `{}` is not usable, moved to `{}`: {error:#}",
                path.display(),
                aside.display()
            );
        }
        Self::build(spec, initial, 0, dir, &fingerprint)
    }

    fn build(
        spec: &TrainerSpec,
        mut model: ModelProto,
        steps: u64,
        dir: &Path,
        fingerprint: &str,
    ) -> anyhow::Result<Self> {
        let checkpoint = dir.join(CHECKPOINTS_DIR);
        let fingerprint = fingerprint.to_owned();
        model
            .metadata_props
            .retain(|p| p.key != STEPS_KEY && p.key != INIT_KEY);

        let device = device(spec.target, spec.name.as_str());
        let graph_proto = model.graph.as_mut().context("the ONNX file has no graph")?;
        for node in &graph_proto.node {
            if let Some(reason) = unsupported(&node.op_type) {
                anyhow::bail!(
                    "node `{}` (op `{}`) cannot be trained: {reason}",
                    node.name,
                    node.op_type
                );
            }
            if matches!(node.op_type.as_str(), "Softmax" | "LogSoftmax")
                && !node.attribute.iter().any(|a| a.name == "axis")
            {
                anyhow::bail!(
                    "node `{}` (op `{}`) has no `axis`: gradients stop there in candle-onnx; set the axis",
                    node.name,
                    node.op_type
                );
            }
        }
        let mut weights = Vec::new();
        let mut kept = Vec::new();
        for init in std::mem::take(&mut graph_proto.initializer) {
            if init.data_type == DataType::Float as i32 {
                let tensor = candle_onnx::eval::get_tensor(&init, &init.name)
                    .and_then(|t| t.to_device(&device))
                    .map_err(|e| anyhow::anyhow!("initializer `{}`: {e}", init.name))?;
                let var = Var::from_tensor(&tensor)
                    .map_err(|e| anyhow::anyhow!("initializer `{}`: {e}", init.name))?;
                weights.push((init, var));
            } else {
                kept.push(init);
            }
        }
        graph_proto.initializer = kept;
        anyhow::ensure!(
            !weights.is_empty(),
            "the graph has no float initializers to train"
        );
        // Older exporters list the initializers among the inputs too: those are weights.
        let initializer_names: std::collections::HashSet<String> = weights
            .iter()
            .map(|(init, _)| init.name.clone())
            .chain(graph_proto.initializer.iter().map(|init| init.name.clone()))
            .collect();
        let inputs = graph_proto
            .input
            .iter()
            .filter(|input| !initializer_names.contains(&input.name))
            .map(|input| {
                let Some(type_proto::Value::TensorType(tensor)) = input.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
                    anyhow::bail!("input `{}` is not a tensor", input.name);
                };
                anyhow::ensure!(
                    tensor.elem_type == DataType::Float as i32,
                    "input `{}` must be FLOAT to be trained on",
                    input.name
                );
                let dims = tensor
                    .shape
                    .as_ref()
                    .map(|s| {
                        s.dim
                            .iter()
                            .map(|d| match d.value {
                                Some(candle_onnx::onnx::tensor_shape_proto::dimension::Value::DimValue(v)) => {
                                    usize::try_from(v).ok()
                                }
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(Input { name: input.name.clone(), dims })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let output = graph_proto
            .output
            .first()
            .context("the graph has no output")?
            .name
            .clone();
        let optimizer = match spec.optimizer {
            Optimizer::AdamW { lr, weight_decay } => OptimizerState::AdamW(
                AdamW::new(
                    weights.iter().map(|(_, v)| v.clone()).collect(),
                    ParamsAdamW {
                        lr,
                        weight_decay,
                        ..ParamsAdamW::default()
                    },
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            ),
            Optimizer::Sgd { lr, momentum } => OptimizerState::Sgd {
                lr,
                momentum,
                velocity: vec![None; weights.len()],
            },
        };
        let trainer = Self {
            name: spec.name.to_string(),
            graph: model,
            weights,
            inputs,
            output,
            loss: spec.loss,
            optimizer,
            steps,
            device,
            init_digest: fingerprint,
            checkpoint,
        };
        trainer.check_gradients()?;
        Ok(trainer)
    }

    /// A forward and backward pass on zeros: every weight must get a gradient.
    fn check_gradients(&self) -> anyhow::Result<()> {
        let mut values = HashMap::new();
        for input in &self.inputs {
            let dims: Vec<usize> = input.dims.iter().map(|d| d.unwrap_or(2)).collect();
            values.insert(
                input.name.clone(),
                CTensor::zeros(dims, DType::F32, &self.device)?,
            );
        }
        let output = self
            .forward(values)
            .map_err(|e| anyhow::anyhow!("a trial forward pass failed: {}", e.message))?;
        let grads = output.sum_all()?.backward()?;
        for (init, var) in &self.weights {
            anyhow::ensure!(
                grads.get(var.as_tensor()).is_some(),
                "gradients do not reach initializer `{}`: an op between it and the output does not propagate them",
                init.name
            );
        }
        Ok(())
    }

    /// The trainer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    fn forward(&self, mut values: HashMap<String, CTensor>) -> Result<CTensor, NnError> {
        for (init, var) in &self.weights {
            values.insert(init.name.clone(), var.as_tensor().clone());
        }
        let mut outputs = candle_onnx::simple_eval(&self.graph, values).map_err(runtime)?;
        outputs
            .remove(&self.output)
            .ok_or_else(|| runtime(format!("the graph did not produce `{}`", self.output)))
    }

    /// Validates the inputs against the graph and makes them candle tensors.
    fn inputs(
        &self,
        inputs: &[(String, Tensor)],
    ) -> Result<(HashMap<String, CTensor>, usize), NnError> {
        let mut values = HashMap::new();
        let mut rows = None;
        for (name, _) in inputs {
            if !self.inputs.iter().any(|i| &i.name == name) {
                return Err(invalid(format!("unknown input `{name}`")));
            }
        }
        for input in &self.inputs {
            let (_, tensor) = inputs
                .iter()
                .find(|(name, _)| name == &input.name)
                .ok_or_else(|| invalid(format!("missing input `{}`", input.name)))?;
            if tensor.ty != ElementType::Fp32 {
                return Err(invalid(format!(
                    "input `{}` is {}, the graph takes FP32",
                    input.name, tensor.ty
                )));
            }
            let dims: Vec<usize> = tensor.dims.iter().map(|&d| d as usize).collect();
            let fits = dims.len() == input.dims.len()
                && dims
                    .iter()
                    .zip(&input.dims)
                    .all(|(d, want)| want.is_none_or(|w| w == *d));
            if !fits || dims.first().is_none_or(|&n| n == 0) {
                return Err(invalid(format!(
                    "input `{}` has dimensions {:?}, the graph takes {:?} (None: any)",
                    input.name, tensor.dims, input.dims
                )));
            }
            tensor
                .check_length()
                .map_err(|e| invalid(format!("input `{}`: {e}", input.name)))?;
            if rows.is_some_and(|r| r != dims[0]) {
                return Err(invalid("inputs disagree on dimension 0 (the batch)".into()));
            }
            rows = Some(dims[0]);
            let data = f32s(&tensor.data);
            if let Some(bad) = data.iter().find(|v| !v.is_finite()) {
                return Err(invalid(format!(
                    "input `{}` holds {bad}: values must be finite",
                    input.name
                )));
            }
            values.insert(
                input.name.clone(),
                CTensor::from_vec(data, dims, &self.device).map_err(runtime)?,
            );
        }
        Ok((values, rows.unwrap_or(0)))
    }

    fn loss(&self, inputs: &[(String, Tensor)], targets: &Tensor) -> Result<CTensor, NnError> {
        let (values, rows) = self.inputs(inputs)?;
        targets
            .check_length()
            .map_err(|e| invalid(format!("targets: {e}")))?;
        let output = self.forward(values)?;
        match self.loss {
            Loss::CrossEntropy => {
                let classes = match output.dims() {
                    [n, c] if *n == rows => *c,
                    dims => {
                        return Err(runtime(format!(
                            "cross-entropy needs an output [N, classes], got {dims:?}"
                        )));
                    }
                };
                if targets.dims != [rows as u32] {
                    return Err(invalid(format!(
                        "targets have dimensions {:?}, expected [{rows}]",
                        targets.dims
                    )));
                }
                let labels: Vec<i64> = match targets.ty {
                    ElementType::I64 => targets
                        .data
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                        .collect(),
                    ElementType::I32 => targets
                        .data
                        .chunks_exact(4)
                        .map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap_or([0; 4]))))
                        .collect(),
                    other => {
                        return Err(invalid(format!(
                            "cross-entropy targets are class indices (INT64 or INT32), got {other}"
                        )));
                    }
                };
                if let Some(bad) = labels.iter().find(|&&l| l < 0 || l >= classes as i64) {
                    return Err(invalid(format!(
                        "label {bad} is out of range [0, {classes})"
                    )));
                }
                let labels: Vec<u32> = labels.into_iter().map(|l| l as u32).collect();
                let labels = CTensor::from_vec(labels, rows, &self.device).map_err(runtime)?;
                candle_nn::loss::cross_entropy(&output, &labels).map_err(runtime)
            }
            Loss::Mse => {
                if targets.ty != ElementType::Fp32 {
                    return Err(invalid(format!("mse targets are FP32, got {}", targets.ty)));
                }
                let dims: Vec<usize> = targets.dims.iter().map(|&d| d as usize).collect();
                if dims != output.dims() {
                    return Err(invalid(format!(
                        "targets have dimensions {:?}, the output has {:?}",
                        targets.dims,
                        output.dims()
                    )));
                }
                let data = f32s(&targets.data);
                if let Some(bad) = data.iter().find(|v| !v.is_finite()) {
                    return Err(invalid(format!(
                        "targets hold {bad}: values must be finite"
                    )));
                }
                let targets = CTensor::from_vec(data, dims, &self.device).map_err(runtime)?;
                candle_nn::loss::mse(&output, &targets).map_err(runtime)
            }
        }
    }

    /// One optimizer step; returns the loss before the update.
    pub fn step(&mut self, inputs: &[(String, Tensor)], targets: &Tensor) -> Result<f32, NnError> {
        let loss = self.loss(inputs, targets)?;
        let value = loss.to_scalar::<f32>().map_err(runtime)?;
        if !value.is_finite() {
            return Err(runtime(format!(
                "the loss is {value}; the step was not applied"
            )));
        }
        let grads = loss.backward().map_err(runtime)?;
        // A step whose gradients or new weights are not finite is not applied: one bad
        // batch must not poison the weights (which would then be checkpointed and published).
        for (init, var) in &self.weights {
            if let Some(grad) = grads.get(var.as_tensor())
                && !all_finite(grad)?
            {
                return Err(runtime(format!(
                    "the gradient of `{}` is not finite; the step was not applied",
                    init.name
                )));
            }
        }
        let before: Vec<CTensor> = self
            .weights
            .iter()
            .map(|(_, var)| var.as_tensor().copy())
            .collect::<Result<_, _>>()
            .map_err(runtime)?;
        match &mut self.optimizer {
            OptimizerState::AdamW(adamw) => adamw.step(&grads).map_err(runtime)?,
            OptimizerState::Sgd {
                lr,
                momentum,
                velocity,
            } => {
                for ((_, var), v) in self.weights.iter().zip(velocity.iter_mut()) {
                    let Some(grad) = grads.get(var.as_tensor()) else {
                        continue;
                    };
                    let next = match v.take() {
                        Some(previous) => {
                            ((previous * *momentum).map_err(runtime)? + grad).map_err(runtime)?
                        }
                        None => grad.clone(),
                    };
                    let updated =
                        (var.as_tensor() - (&next * *lr).map_err(runtime)?).map_err(runtime)?;
                    var.set(&updated).map_err(runtime)?;
                    *v = Some(next);
                }
            }
        }
        for ((init, var), _) in self.weights.iter().zip(&before) {
            if !all_finite(var.as_tensor())? {
                for ((_, var), old) in self.weights.iter().zip(&before) {
                    var.set(old).map_err(runtime)?;
                }
                return Err(runtime(format!(
                    "the step made `{}` non-finite; it was not applied",
                    init.name
                )));
            }
        }
        self.steps = self.steps.saturating_add(1);
        Ok(value)
    }

    /// The loss without an update.
    pub fn evaluate(&self, inputs: &[(String, Tensor)], targets: &Tensor) -> Result<f32, NnError> {
        self.loss(inputs, targets)?
            .to_scalar::<f32>()
            .map_err(runtime)
    }

    /// The graph with the current weights written back into its initializers.
    pub fn export(&self) -> Result<Vec<u8>, NnError> {
        Ok(self.with_weights()?.encode_to_vec())
    }

    fn with_weights(&self) -> Result<ModelProto, NnError> {
        let mut model = self.graph.clone();
        let graph = model.graph.as_mut().ok_or_else(|| runtime("no graph"))?;
        for (init, var) in &self.weights {
            let values = var
                .as_tensor()
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(runtime)?;
            let mut init = init.clone();
            init.float_data.clear();
            init.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            graph.initializer.push(init);
        }
        Ok(model)
    }

    /// Writes a checkpoint as a new file (atomically: a temporary file renamed into
    /// place), then removes all but the newest [`KEEP_CHECKPOINTS`].
    pub fn checkpoint(&self) -> Result<(), NnError> {
        let mut model = self.with_weights()?;
        model.metadata_props.push(StringStringEntryProto {
            key: STEPS_KEY.into(),
            value: self.steps.to_string(),
        });
        model.metadata_props.push(StringStringEntryProto {
            key: INIT_KEY.into(),
            value: self.init_digest.clone(),
        });
        let path = self
            .checkpoint
            .join(format!("step-{:020}.onnx", self.steps));
        crate::fsutil::write_atomically(&path, &model.encode_to_vec())
            .map_err(|e| runtime(format!("{e:#}")))?;
        tracing::info!(trainer = %self.name, steps = self.steps, "checkpoint written");
        if let Some(dir) = self.checkpoint.parent() {
            for (old, _) in checkpoints(dir).into_iter().skip(KEEP_CHECKPOINTS) {
                if let Err(error) = std::fs::remove_file(&old) {
                    tracing::warn!(trainer = %self.name, "removing old checkpoint `{}`: {error}", old.display());
                }
            }
        }
        Ok(())
    }
}

fn device(target: Target, name: &str) -> Device {
    if target == Target::Gpu {
        #[cfg(feature = "cuda")]
        match Device::new_cuda(0) {
            Ok(device) => return device,
            Err(e) => tracing::warn!(
                trainer = name,
                "target \"gpu\": no CUDA device ({e}); training on the CPU"
            ),
        }
        #[cfg(not(feature = "cuda"))]
        tracing::warn!(
            trainer = name,
            "target \"gpu\": this host was built without the `cuda` feature; training on the CPU"
        );
    }
    Device::Cpu
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_claiming_too_many_steps_is_ignored() {
        let init =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/digits/digits-mlp.onnx");
        assert!(
            init.is_file(),
            "run ./setup.sh first: {} is missing",
            init.display()
        );
        let spec: TrainerSpec = serde_json::from_value(serde_json::json!({
            "name": "digits", "init": crate::locked::Digest::of(b"init"), "loss": "cross-entropy",
            "optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 0.0}, "target": "cpu",
            "checkpoint_every": 1000, "publishes": null
        }))
        .expect("spec");
        let dir = tempfile::tempdir().expect("temp dir");
        let mut trainer = Trainer::load(&spec, &init, dir.path()).expect("trainer");
        trainer.steps = u64::MAX;
        trainer.checkpoint().expect("checkpoint");
        let reloaded = Trainer::load(&spec, &init, dir.path())
            .expect("a bad checkpoint never stops a trainer");
        assert_eq!(reloaded.steps(), 0, "the checkpoint is not trusted");
        trainer.steps = MAX_STEPS;
        trainer.checkpoint().expect("checkpoint");
        assert_eq!(
            Trainer::load(&spec, &init, dir.path())
                .expect("trainer")
                .steps(),
            MAX_STEPS
        );
    }

    fn digits_spec() -> (TrainerSpec, PathBuf) {
        let init =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/digits/digits-mlp.onnx");
        let spec: TrainerSpec = serde_json::from_value(serde_json::json!({
            "name": "digits", "init": crate::locked::Digest::of(b"init"), "loss": "cross-entropy",
            "optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 0.0}, "target": "cpu",
            "checkpoint_every": 1000, "publishes": null
        }))
        .expect("spec");
        (spec, init)
    }

    #[test]
    fn bad_checkpoints_are_moved_aside_and_the_newest_good_one_is_used() {
        let (spec, init) = digits_spec();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut trainer = Trainer::load(&spec, &init, dir.path()).expect("trainer");
        for steps in [10, 20, 30, 40, 50] {
            trainer.steps = steps;
            trainer.checkpoint().expect("checkpoint");
        }
        let kept: Vec<u64> = checkpoints(dir.path()).iter().map(|c| c.1).collect();
        assert_eq!(kept, [50, 40, 30], "the newest {KEEP_CHECKPOINTS} are kept");
        // The newest truncated, the next one random bytes: the third is used.
        let files = checkpoints(dir.path());
        let newest = std::fs::read(&files[0].0).expect("read");
        std::fs::write(&files[0].0, &newest[..newest.len() / 2]).expect("truncate");
        std::fs::write(&files[1].0, b"\x08\x96\x01 not onnx").expect("garble");
        let resumed = Trainer::load(&spec, &init, dir.path()).expect("trainer");
        assert_eq!(resumed.steps(), 30);
        let bad: Vec<_> = std::fs::read_dir(dir.path().join("bad"))
            .expect("bad dir")
            .collect();
        assert_eq!(bad.len(), 2, "both bad checkpoints are kept aside");
        // One whose weights do not fit the graph (a weight missing) goes aside too.
        let mut model = resumed.with_weights().expect("weights");
        model.graph.as_mut().expect("graph").initializer.pop();
        model.metadata_props = trainer.with_weights().expect("w").metadata_props;
        model.metadata_props.push(StringStringEntryProto {
            key: STEPS_KEY.into(),
            value: "99".into(),
        });
        model.metadata_props.push(StringStringEntryProto {
            key: INIT_KEY.into(),
            value: spec.fingerprint().to_string(),
        });
        std::fs::write(
            dir.path()
                .join("checkpoints/step-00000000000000000099.onnx"),
            model.encode_to_vec(),
        )
        .expect("write");
        assert_eq!(
            Trainer::load(&spec, &init, dir.path())
                .expect("trainer")
                .steps(),
            30
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("bad"))
                .expect("bad")
                .count(),
            3
        );
    }
}
