//! Placement of Lepton functions on cloud and edge nodes.
//!
//! `lepton-scheduler` is pure decision logic, in the shape of Nomad's `scheduler/` and
//! the Kubernetes scheduling framework: it reads an immutable [`ClusterSnapshot`] and the
//! desired state, and returns a [`Plan`]. No I/O, no clocks, no global state: the
//! cluster layer gathers the snapshot, calls [`Scheduler::reconcile`], carries the plan
//! out and calls again.
//!
//! # The placement pipeline
//!
//! For each function that needs replicas, every node goes through the named
//! [`FilterStep`]s, cheap first; the first step a node fails gives it a [`Rejection`]
//! (`filtered by: insufficient-memory (...)`). The nodes left are ranked by the named
//! [`ScoreStep`]s, each normalised to `0.0..=1.0` and weighted
//! ([`SchedulerConfig::with_weight`]); the best node takes the replica, ties broken by a
//! seeded RNG so the same input always gives the same plan. A node holds at most one
//! replica of a function.
//!
//! ```text
//! nodes ─▶ node-ready ─▶ tier ─▶ distinct-node ─▶ labels ─▶ accelerator ─▶ nn-backend
//!            ─▶ resources ─▶ accelerator-memory ─▶ score: model-resident, load,
//!               spread, accelerator-preferred, edge-proximity ─▶ best node
//!                 (each rejected node: its reason)
//! ```
//!
//! When no node fits, the plan carries a [`PlacementFailure`] with every node's reason;
//! that is a result, not an [`Error`]. Errors are for bad input only.
//!
//! # Reconciling
//!
//! [`Scheduler::reconcile`] compares the desired functions with the replicas in the
//! snapshot and plans places, stops and moves: new functions, changed counts, replicas
//! on lost or draining nodes, failed replicas and constraint changes. Applying the plan
//! ([`ClusterSnapshot::apply`]) and reconciling again gives an empty plan.
//!
//! # Autoscaling
//!
//! [`Autoscaler::decide`] turns observed in-flight requests into a replica count, in the
//! shape of Knative's KPA (stable and panic windows, scale to zero after a grace
//! period); the count feeds [`DesiredFunction::replicas`].
//!
//! # Example
//!
//! ```
//! use lepton_scheduler::{
//!     Accelerator, AcceleratorPolicy, Action, ClusterSnapshot, DesiredFunction, FunctionSpec,
//!     ModelRequirement, Node, NodeStatus, Resources, Scheduler, SchedulerConfig, Tier,
//! };
//!
//! const GIB: u64 = 1 << 30;
//! let nodes = vec![
//!     Node::new("gpu-1", Resources::new(16_000, 64 * GIB))
//!         .with_tier(Tier::Cloud)
//!         .with_region("eu-west")
//!         .with_backend("onnx")
//!         .with_accelerator(Accelerator::new("nvidia-h200", 141 * GIB)),
//!     Node::new("edge-1", Resources::new(4_000, 8 * GIB))
//!         .with_tier(Tier::Edge)
//!         .with_region("eu-west")
//!         .with_backend("onnx"),
//!     Node::new("edge-2", Resources::new(4_000, 8 * GIB))
//!         .with_tier(Tier::Edge)
//!         .with_region("us-east")
//!         .with_backend("onnx"),
//! ];
//! let mut cluster = ClusterSnapshot::new(nodes);
//!
//! // A function that must run on a GPU, and one that wants the edge near its clients.
//! let classify = FunctionSpec::new("classify", Resources::new(500, GIB))
//!     .with_model(ModelRequirement::new("digits", "onnx", 2 * GIB))
//!     .with_accelerator(AcceleratorPolicy::Required);
//! let hello = FunctionSpec::new("hello", Resources::new(100, 128 << 20))
//!     .with_near_region("eu-west");
//! let desired = vec![DesiredFunction::new(classify, 1), DesiredFunction::new(hello, 1)];
//!
//! let scheduler = Scheduler::new(SchedulerConfig::default().with_seed(7));
//! let plan = scheduler.reconcile(&cluster, &desired)?;
//! let placed: Vec<_> =
//!     plan.placements().map(|p| (p.function.as_str(), p.node.as_str())).collect();
//! assert_eq!(placed, [("classify", "gpu-1"), ("hello", "edge-1")]);
//! assert!(plan.failures.is_empty());
//!
//! // The cluster carries the plan out; reconciling again has nothing to do.
//! cluster.apply(&plan)?;
//! assert!(scheduler.reconcile(&cluster, &desired)?.is_empty());
//!
//! // The GPU node is lost: its replica moves, and with no other GPU it cannot.
//! cluster.nodes[0].status = NodeStatus::Lost;
//! let plan = scheduler.reconcile(&cluster, &desired)?;
//! assert!(matches!(&plan.actions[..], [Action::Stop { .. }]));
//! let failure = &plan.failures[0];
//! assert_eq!(failure.function.as_str(), "classify");
//! assert_eq!(failure.rejections[0].rejection.to_string(), "filtered by: node-lost");
//! assert_eq!(failure.rejections[1].rejection.to_string(), "filtered by: no-accelerator");
//! # Ok::<(), lepton_scheduler::Error>(())
//! ```
#![deny(missing_docs)]

mod autoscale;
mod error;
mod model;
mod pipeline;
mod plan;
mod reconcile;
mod state;

pub use autoscale::{
    Autoscaler, AutoscalerConfig, DEFAULT_PANIC_THRESHOLD, DEFAULT_PANIC_WINDOW,
    DEFAULT_SCALE_TO_ZERO_GRACE, DEFAULT_STABLE_WINDOW, DEFAULT_TARGET_CONCURRENCY, Sample,
    SampleWindow, ScaleDecision, ScaleMode, ScaleState,
};
pub use error::Error;
pub use model::{
    Accelerator, AcceleratorPolicy, ClusterSnapshot, DesiredFunction, ExecutionTarget, FunctionId,
    FunctionSpec, LabelSelector, ModelId, ModelRequirement, Node, NodeId, NodeStatus,
    PlacementConstraints, REGION_LABEL, Replica, ReplicaState, Resources, ScaleBounds, SelectorOp,
    TIER_LABEL, Tier,
};
pub use pipeline::{
    DEFAULT_ACCELERATOR_PREFERRED_WEIGHT, DEFAULT_EDGE_PROXIMITY_WEIGHT, DEFAULT_LOAD_WEIGHT,
    DEFAULT_MODEL_RESIDENT_WEIGHT, DEFAULT_SEED, DEFAULT_SPREAD_WEIGHT, FilterStep, LoadPolicy,
    NodeRejection, Rejection, SchedulerConfig, ScoreStep,
};
pub use plan::{
    AcceleratorClaim, Action, Displacement, Placement, PlacementFailure, Plan, StopReason,
};
pub use reconcile::{NodeScore, NodeVerdict, Scheduler};
