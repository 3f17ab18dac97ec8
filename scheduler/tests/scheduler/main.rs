//! Tests of `lepton-scheduler` through its public API, one module per area.
#![expect(
    clippy::unwrap_used,
    reason = "tests fail loudly on unexpected `None`/`Err`"
)]

mod autoscale_props;
mod filters;
mod props;
mod reconcile;
mod scores;

use lepton_scheduler::{
    ClusterSnapshot, FunctionSpec, Node, NodeVerdict, Rejection, Resources, Scheduler, ScoreStep,
};

pub const GIB: u64 = 1 << 30;
pub const MIB: u64 = 1 << 20;

/// A ready node with 4 cores and 8 GiB, the `onnx` backend and no labels.
pub fn node(id: &str) -> Node {
    Node::new(id, Resources::new(4_000, 8 * GIB)).with_backend("onnx")
}

/// A function asking for half a core and 256 MiB.
pub fn function(id: &str) -> FunctionSpec {
    FunctionSpec::new(id, Resources::new(500, 256 * MIB))
}

/// How every node fares for `spec`, with the default configuration.
pub fn explain(nodes: Vec<Node>, spec: &FunctionSpec) -> Vec<NodeVerdict> {
    Scheduler::default()
        .explain(&ClusterSnapshot::new(nodes), spec)
        .unwrap()
}

/// The rejection of the only node, or a panic if it passes.
pub fn rejection(node: Node, spec: &FunctionSpec) -> Rejection {
    let verdict = explain(vec![node], spec).pop().unwrap();
    match verdict.outcome {
        Err(r) => r,
        Ok(score) => panic!("node `{}` passed with {score:?}", verdict.node),
    }
}

/// One step's score of the only node, or a panic if it is filtered.
pub fn step_score(node: Node, spec: &FunctionSpec, step: ScoreStep) -> f64 {
    let verdict = explain(vec![node], spec).pop().unwrap();
    match verdict.outcome {
        Ok(score) => score.step(step),
        Err(r) => panic!("node `{}` was {r}", verdict.node),
    }
}
