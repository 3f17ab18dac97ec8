//! Dynamic batching: concurrent requests to one model stacked along dimension 0.
//!
//! The first request of a batch waits at most `max_wait` for others; a batch closes
//! at `max_size` rows, and a request larger than that runs alone. Requests join a
//! batch only when their inputs agree on everything but dimension 0; outputs are split
//! back by each request's rows. A model whose outputs do not follow dimension 0, or a
//! batched run that fails, falls back to one run per request, so one request's bad
//! input never fails the others.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::onnx::RunFor;
use super::{NnError, OnnxModel, Tensor};
use crate::bindings::wasi::nn::errors::ErrorCode;
use crate::manifest::BatchSpec;

type Reply = oneshot::Sender<Result<Vec<(String, Tensor)>, NnError>>;

struct Job {
    inputs: Vec<(String, Tensor)>,
    rows: u32,
    reply: Reply,
    arrived: std::time::Instant,
    trace: Option<crate::ops::trace::TraceContext>,
}

/// The handle of a model's batching task.
pub struct Batcher {
    sender: mpsc::Sender<Job>,
    model: Arc<OnnxModel>,
    max_size: u32,
    /// Whether every output has fixed-size elements: a stacked `BYTES` output could
    /// not be split back by row, so such models never stack.
    stackable: bool,
}

impl Batcher {
    /// Starts the batching task (on the current tokio runtime).
    pub fn spawn(model: Arc<OnnxModel>, spec: BatchSpec) -> Self {
        let (sender, receiver) = mpsc::channel(4096);
        tokio::spawn(collect(Arc::clone(&model), spec, receiver));
        let stackable = model.outputs().iter().all(|io| io.ty.size().is_some());
        Self {
            sender,
            model,
            max_size: spec.max_size,
            stackable,
        }
    }

    /// Runs validated `inputs`, batched with concurrent requests.
    pub async fn run(
        &self,
        inputs: Vec<(String, Tensor)>,
        trace: Option<crate::ops::trace::TraceContext>,
    ) -> Result<Vec<(String, Tensor)>, NnError> {
        let arrived = std::time::Instant::now();
        // BYTES elements vary in size: such requests are never stacked.
        let stackable = self.stackable && inputs.iter().all(|(_, t)| t.ty.size().is_some());
        let Some(rows) = rows_of(&inputs).filter(|&rows| stackable && rows <= self.max_size) else {
            return self.model.run_validated(inputs, RunFor::one(trace)).await;
        };
        let (reply, answer) = oneshot::channel();
        if self
            .sender
            .send(Job {
                inputs,
                rows,
                reply,
                arrived,
                trace,
            })
            .await
            .is_err()
        {
            return Err(NnError::new(
                ErrorCode::RuntimeError,
                "the batcher stopped".into(),
            ));
        }
        answer.await.unwrap_or_else(|_| {
            Err(NnError::new(
                ErrorCode::RuntimeError,
                "the batch was dropped".into(),
            ))
        })
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
        let mut rows = u64::from(first.rows);
        let mut jobs = vec![first];
        while rows < u64::from(spec.max_size) {
            tokio::select! {
                job = receiver.recv() => match job {
                    Some(job) => {
                        rows += u64::from(job.rows);
                        jobs.push(job);
                    }
                    None => break,
                },
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        // Requests whose callers went away (their deadline passed) are not run.
        jobs.retain(|job| !job.reply.is_closed());
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

async fn run_alone(model: &Arc<OnnxModel>, jobs: Vec<Job>) {
    for Job {
        inputs,
        mut reply,
        arrived,
        trace,
        ..
    } in jobs
    {
        let run_for = RunFor {
            arrived,
            requests: 1,
            traces: trace.into_iter().collect(),
        };
        // A caller that goes away stops its run (dropping it terminates it).
        let result = tokio::select! {
            result = model.run_validated(inputs, run_for) => Some(result),
            () = reply.closed() => None,
        };
        if let Some(result) = result {
            let _ = reply.send(result);
        }
    }
}

/// How often a batched run checks whether all its callers have gone.
const ABANDON_CHECK: std::time::Duration = std::time::Duration::from_millis(10);

/// Runs `inputs`, unless every caller of `jobs` goes away first: then the run is
/// dropped, which terminates it, and `None` is returned.
async fn run_unless_abandoned(
    model: &Arc<OnnxModel>,
    inputs: Vec<(String, Tensor)>,
    jobs: &[Job],
) -> Option<super::onnx::RunResult> {
    let abandoned = async {
        loop {
            tokio::time::sleep(ABANDON_CHECK).await;
            if jobs.iter().all(|job| job.reply.is_closed()) {
                break;
            }
        }
    };
    let arrived = jobs
        .iter()
        .map(|job| job.arrived)
        .min()
        .unwrap_or_else(std::time::Instant::now);
    let run_for = RunFor {
        arrived,
        requests: jobs.len(),
        traces: jobs.iter().filter_map(|job| job.trace).collect(),
    };
    tokio::select! {
        result = model.run_validated(inputs, run_for) => Some(result),
        () = abandoned => None,
    }
}

async fn run_group(model: Arc<OnnxModel>, jobs: Vec<Job>) {
    // Each job has at most `max_size` rows, and a batch closes once it reaches
    // `max_size`: the total fits comfortably in a u32 for any sane `max_size`.
    let total = jobs.iter().map(|j| u64::from(j.rows)).sum::<u64>();
    let Ok(total) = u32::try_from(total) else {
        return run_alone(&model, jobs).await;
    };
    if jobs.len() == 1 {
        return run_alone(&model, jobs).await;
    }
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
        stacked.push((
            name.clone(),
            Tensor {
                dims,
                ty: tensor.ty,
                data,
            },
        ));
    }
    let Some(result) = run_unless_abandoned(&model, stacked, &jobs).await else {
        tracing::debug!(
            model = model.name(),
            "every caller of a batch went away: its run is stopped"
        );
        return;
    };
    match result {
        Ok(outputs)
            if outputs
                .iter()
                .all(|(_, t)| t.dims.first() == Some(&total) && t.ty.size().is_some()) =>
        {
            let mut offset = 0u32;
            for job in jobs {
                let part = outputs
                    .iter()
                    .map(|(name, t)| {
                        let row = t.data.len() / total as usize;
                        let start = row * offset as usize;
                        let mut dims = t.dims.clone();
                        dims[0] = job.rows;
                        debug_assert_eq!(row % t.ty.size().unwrap_or(1), 0);
                        let data = t.data[start..start + row * job.rows as usize].to_vec();
                        (
                            name.clone(),
                            Tensor {
                                dims,
                                ty: t.ty,
                                data,
                            },
                        )
                    })
                    .collect();
                offset += job.rows;
                let _ = job.reply.send(Ok(part));
            }
        }
        Ok(_) => {
            tracing::warn!(
                model = model.name(),
                "outputs do not follow dimension 0; running requests one by one"
            );
            run_alone(&model, jobs).await;
        }
        Err(error) => {
            // Which request made the batch fail is unknown: each runs alone and gets
            // its own answer.
            tracing::debug!(
                model = model.name(),
                "a batched run failed ({}); running requests one by one",
                error.message
            );
            run_alone(&model, jobs).await;
        }
    }
}
