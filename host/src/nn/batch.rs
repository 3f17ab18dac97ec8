//! Dynamic batching: concurrent requests to one model stacked along dimension 0.
//!
//! The first request of a batch waits at most `max_wait` for others; a batch closes
//! at `max_size` rows. Requests join a batch only when their inputs agree on
//! everything but dimension 0; outputs are split back by each request's rows. A
//! model whose outputs do not follow dimension 0 falls back to one run per request.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{NnError, OnnxModel, Tensor, element_size};
use crate::bindings::wasi::nn::errors::ErrorCode;
use crate::manifest::BatchSpec;

type Reply = oneshot::Sender<Result<Vec<(String, Tensor)>, NnError>>;

struct Job {
    inputs: Vec<(String, Tensor)>,
    rows: u32,
    reply: Reply,
}

/// The handle of a model's batching task.
pub struct Batcher {
    sender: mpsc::Sender<Job>,
    model: Arc<OnnxModel>,
}

impl Batcher {
    /// Starts the batching task (on the current tokio runtime).
    pub fn spawn(model: Arc<OnnxModel>, spec: BatchSpec) -> Self {
        let (sender, receiver) = mpsc::channel(4096);
        tokio::spawn(collect(Arc::clone(&model), spec, receiver));
        Self { sender, model }
    }

    /// Runs validated `inputs`, batched with concurrent requests.
    pub async fn run(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, NnError> {
        let Some(rows) = rows_of(&inputs) else {
            return self.model.run_validated(inputs).await;
        };
        let (reply, answer) = oneshot::channel();
        if self.sender.send(Job { inputs, rows, reply }).await.is_err() {
            return Err(NnError::new(ErrorCode::RuntimeError, "the batcher stopped".into()));
        }
        answer
            .await
            .unwrap_or_else(|_| Err(NnError::new(ErrorCode::RuntimeError, "the batch was dropped".into())))
    }
}

/// Dimension 0 shared by every input, if they share one and it is not zero.
fn rows_of(inputs: &[(String, Tensor)]) -> Option<u32> {
    let rows = *inputs.first()?.1.dims.first()?;
    (rows > 0 && inputs.iter().all(|(_, t)| t.dims.first() == Some(&rows))).then_some(rows)
}

/// What must agree for two requests to share a batch: names, types, dims past 0.
type BatchKey = Vec<(String, String, Vec<u32>)>;

fn key(inputs: &[(String, Tensor)]) -> BatchKey {
    let mut key: Vec<_> = inputs
        .iter()
        .map(|(name, t)| (name.clone(), format!("{:?}", t.ty), t.dims[1..].to_vec()))
        .collect();
    key.sort();
    key
}

async fn collect(model: Arc<OnnxModel>, spec: BatchSpec, mut receiver: mpsc::Receiver<Job>) {
    while let Some(first) = receiver.recv().await {
        let deadline = tokio::time::Instant::now() + spec.max_wait;
        let mut rows = first.rows;
        let mut jobs = vec![first];
        while rows < spec.max_size {
            tokio::select! {
                job = receiver.recv() => match job {
                    Some(job) => {
                        rows += job.rows;
                        jobs.push(job);
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        // Group the jobs that can share a run; each group runs on its own task so
        // the next batch can form meanwhile.
        let mut groups: Vec<(BatchKey, Vec<Job>)> = Vec::new();
        for job in jobs {
            let k = key(&job.inputs);
            match groups.iter_mut().find(|(g, _)| *g == k) {
                Some((_, members)) => members.push(job),
                None => groups.push((k, vec![job])),
            }
        }
        for (_, group) in groups {
            tokio::spawn(run_group(Arc::clone(&model), group));
        }
    }
}

async fn run_group(model: Arc<OnnxModel>, mut jobs: Vec<Job>) {
    if jobs.len() == 1 {
        let job = jobs.remove(0);
        let _ = job.reply.send(model.run_validated(job.inputs).await);
        return;
    }
    let total: u32 = jobs.iter().map(|j| j.rows).sum();
    let mut stacked: Vec<(String, Tensor)> = Vec::new();
    for (name, tensor) in &jobs[0].inputs {
        let mut data = Vec::with_capacity(tensor.data.len() * jobs.len());
        for job in &jobs {
            if let Some((_, t)) = job.inputs.iter().find(|(n, _)| n == name) {
                data.extend_from_slice(&t.data);
            }
        }
        let mut dims = tensor.dims.clone();
        dims[0] = total;
        stacked.push((name.clone(), Tensor { dims, ty: tensor.ty, data }));
    }
    match model.run_validated(stacked).await {
        Ok(outputs) if outputs.iter().all(|(_, t)| t.dims.first() == Some(&total)) => {
            let mut offset = 0u32;
            for job in jobs {
                let part = outputs
                    .iter()
                    .map(|(name, t)| {
                        let row = t.data.len() / total as usize;
                        let start = row * offset as usize;
                        let mut dims = t.dims.clone();
                        dims[0] = job.rows;
                        debug_assert_eq!(row % element_size(t.ty), 0);
                        let data = t.data[start..start + row * job.rows as usize].to_vec();
                        (name.clone(), Tensor { dims, ty: t.ty, data })
                    })
                    .collect();
                offset += job.rows;
                let _ = job.reply.send(Ok(part));
            }
        }
        Ok(_) => {
            tracing::warn!(model = model.name(), "outputs do not follow dimension 0; running requests one by one");
            for job in jobs {
                let _ = job.reply.send(model.run_validated(job.inputs).await);
            }
        }
        Err(error) => {
            for job in jobs {
                let _ = job.reply.send(Err(error.clone()));
            }
        }
    }
}
