//! The cluster model: nodes, function specs, replicas and the snapshot that holds them.
//!
//! Everything here is plain data. The cluster layer fills it from heartbeats and the
//! desired-state store; the scheduler only reads it.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

/// The label that names a node's tier (`cloud` or `edge`).
pub const TIER_LABEL: &str = "tier";
/// The label that names a node's region, used by edge proximity.
pub const REGION_LABEL: &str = "region";

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        ///
        /// Cheap to clone (a shared string), ordered and hashable.
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Makes an id from a string.
            pub fn new(id: impl Into<Arc<str>>) -> Self {
                Self(id.into())
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                Self(id.into())
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> Self {
                Self(id.into())
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// The id of a node, unique in a cluster.
    NodeId
);
id_type!(
    /// The id of a function, unique in a deployment.
    FunctionId
);
id_type!(
    /// The name of a model (a wasi-nn graph) as the resolved spec names it.
    ModelId
);

/// CPU and memory, as a capacity, a free amount or a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Resources {
    /// CPU in millicores (1000 = one core).
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

impl Resources {
    /// Makes a resource amount.
    pub const fn new(cpu_millis: u64, memory_bytes: u64) -> Self {
        Self {
            cpu_millis,
            memory_bytes,
        }
    }

    /// Whether `request` fits in `self`, read as a free amount.
    pub const fn fits(&self, request: &Resources) -> bool {
        request.cpu_millis <= self.cpu_millis && request.memory_bytes <= self.memory_bytes
    }
}

/// One accelerator of a node and its memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accelerator {
    /// The kind, for example `nvidia-h200`.
    pub kind: String,
    /// Total accelerator memory in bytes.
    pub memory_bytes: u64,
    /// Free accelerator memory in bytes.
    pub free_memory_bytes: u64,
}

impl Accelerator {
    /// An accelerator with all its memory free.
    pub fn new(kind: impl Into<String>, memory_bytes: u64) -> Self {
        Self {
            kind: kind.into(),
            memory_bytes,
            free_memory_bytes: memory_bytes,
        }
    }
}

/// A wasi-nn execution target (`wasi:nn/graph.execution-target`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExecutionTarget {
    /// The CPU.
    Cpu,
    /// A GPU.
    Gpu,
    /// A TPU.
    Tpu,
}

/// Where a node runs: in the cloud or at the edge (the `tier` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    /// A cloud node, usually with accelerators.
    Cloud,
    /// An edge node, usually CPU only and close to clients.
    Edge,
}

impl Tier {
    /// The label value: `cloud` or `edge`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Tier::Cloud => "cloud",
            Tier::Edge => "edge",
        }
    }

    /// Parses a label value; anything but `cloud` and `edge` is no tier.
    pub fn from_label(value: &str) -> Option<Self> {
        match value {
            "cloud" => Some(Tier::Cloud),
            "edge" => Some(Tier::Edge),
            _ => None,
        }
    }
}

/// The health of a node as the cluster last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeStatus {
    /// Heartbeating and accepting replicas.
    Ready,
    /// Heartbeating but being emptied: its replicas move elsewhere, it receives none.
    Draining,
    /// Stopped heartbeating: its replicas are re-placed, it receives none.
    Lost,
}

impl NodeStatus {
    /// The status as a word: `ready`, `draining` or `lost`.
    pub const fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Draining => "draining",
            NodeStatus::Lost => "lost",
        }
    }
}

/// A node as advertised in its heartbeat.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Its id.
    pub id: NodeId,
    /// Ready, draining or lost.
    pub status: NodeStatus,
    /// Labels, such as `tier=edge` and `region=eu-west`.
    pub labels: BTreeMap<String, String>,
    /// What the node has in all.
    pub capacity: Resources,
    /// What is free now.
    pub free: Resources,
    /// Its accelerators, in the order the node numbers them.
    pub accelerators: Vec<Accelerator>,
    /// The wasi-nn backends it offers, for example `onnx`.
    pub backends: BTreeSet<String>,
    /// The wasi-nn execution targets it offers.
    pub targets: BTreeSet<ExecutionTarget>,
    /// Models loaded in its registry, shared by every replica on it.
    pub resident_models: BTreeSet<ModelId>,
}

impl Node {
    /// A ready node with no labels, accelerators or models, with all of `capacity` free
    /// and the `cpu` execution target.
    pub fn new(id: impl Into<NodeId>, capacity: Resources) -> Self {
        Self {
            id: id.into(),
            status: NodeStatus::Ready,
            labels: BTreeMap::new(),
            capacity,
            free: capacity,
            accelerators: Vec::new(),
            backends: BTreeSet::new(),
            targets: BTreeSet::from([ExecutionTarget::Cpu]),
            resident_models: BTreeSet::new(),
        }
    }

    /// Sets a label.
    #[must_use]
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets the `tier` label.
    #[must_use]
    pub fn with_tier(self, tier: Tier) -> Self {
        self.with_label(TIER_LABEL, tier.as_str())
    }

    /// Sets the `region` label.
    #[must_use]
    pub fn with_region(self, region: impl Into<String>) -> Self {
        self.with_label(REGION_LABEL, region)
    }

    /// Sets the status.
    #[must_use]
    pub fn with_status(mut self, status: NodeStatus) -> Self {
        self.status = status;
        self
    }

    /// Adds an accelerator and the `gpu` execution target.
    #[must_use]
    pub fn with_accelerator(mut self, accelerator: Accelerator) -> Self {
        self.accelerators.push(accelerator);
        self.targets.insert(ExecutionTarget::Gpu);
        self
    }

    /// Adds a wasi-nn backend.
    #[must_use]
    pub fn with_backend(mut self, backend: impl Into<String>) -> Self {
        self.backends.insert(backend.into());
        self
    }

    /// Marks a model as resident.
    #[must_use]
    pub fn with_resident_model(mut self, model: impl Into<ModelId>) -> Self {
        self.resident_models.insert(model.into());
        self
    }

    /// Sets the free amount (the default is all of the capacity).
    #[must_use]
    pub fn with_free(mut self, free: Resources) -> Self {
        self.free = free;
        self
    }

    /// The tier from the `tier` label, if it names one.
    pub fn tier(&self) -> Option<Tier> {
        self.labels
            .get(TIER_LABEL)
            .and_then(|v| Tier::from_label(v))
    }

    /// The `region` label.
    pub fn region(&self) -> Option<&str> {
        self.labels.get(REGION_LABEL).map(String::as_str)
    }
}

/// A model a function needs, with what it costs to hold it on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRequirement {
    /// The model.
    pub id: ModelId,
    /// The wasi-nn backend that runs it, for example `onnx`.
    pub backend: String,
    /// Bytes it takes once loaded (on an accelerator or in host memory).
    pub memory_bytes: u64,
}

impl ModelRequirement {
    /// Makes a model requirement.
    pub fn new(id: impl Into<ModelId>, backend: impl Into<String>, memory_bytes: u64) -> Self {
        Self {
            id: id.into(),
            backend: backend.into(),
            memory_bytes,
        }
    }
}

/// How a function uses accelerators.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AcceleratorPolicy {
    /// Only nodes with an accelerator (and room on it for the models) qualify.
    Required,
    /// Nodes with an accelerator that fits the models score higher; others qualify,
    /// running the models on the CPU.
    Preferred,
    /// Never use an accelerator; models run on the CPU.
    #[default]
    None,
}

/// The operator of a [`LabelSelector`], as in Kubernetes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SelectorOp {
    /// The label is set to one of these values.
    In(Vec<String>),
    /// The label is unset or set to none of these values.
    NotIn(Vec<String>),
    /// The label is set.
    Exists,
    /// The label is unset.
    DoesNotExist,
}

/// A required condition on a node label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelSelector {
    /// The label key.
    pub key: String,
    /// The condition.
    pub op: SelectorOp,
}

impl LabelSelector {
    /// `key` is one of `values`.
    pub fn is_in<V: Into<String>>(
        key: impl Into<String>,
        values: impl IntoIterator<Item = V>,
    ) -> Self {
        Self {
            key: key.into(),
            op: SelectorOp::In(values.into_iter().map(Into::into).collect()),
        }
    }

    /// `key` is unset or none of `values`.
    pub fn not_in<V: Into<String>>(
        key: impl Into<String>,
        values: impl IntoIterator<Item = V>,
    ) -> Self {
        Self {
            key: key.into(),
            op: SelectorOp::NotIn(values.into_iter().map(Into::into).collect()),
        }
    }

    /// `key` is set.
    pub fn exists(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            op: SelectorOp::Exists,
        }
    }

    /// `key` is unset.
    pub fn does_not_exist(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            op: SelectorOp::DoesNotExist,
        }
    }

    /// Whether a label value (or its absence) satisfies the selector.
    pub fn matches(&self, value: Option<&str>) -> bool {
        match (&self.op, value) {
            (SelectorOp::In(values), Some(v)) => values.iter().any(|x| x == v),
            (SelectorOp::In(_), None) => false,
            (SelectorOp::NotIn(values), Some(v)) => !values.iter().any(|x| x == v),
            (SelectorOp::NotIn(_), None) => true,
            (SelectorOp::Exists, v) => v.is_some(),
            (SelectorOp::DoesNotExist, v) => v.is_none(),
        }
    }
}

/// Where a function may and would rather run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlacementConstraints {
    /// Required tier; `None` is any tier.
    pub tier: Option<Tier>,
    /// Required label conditions, all of which must hold.
    pub selectors: Vec<LabelSelector>,
    /// Accelerator use.
    pub accelerator: AcceleratorPolicy,
    /// A label key to spread replicas across (for example `region`); nodes without the
    /// label form one group of their own.
    pub spread_key: Option<String>,
    /// A region the function's clients are in: edge nodes there score highest, cloud
    /// nodes there next.
    pub near_region: Option<String>,
}

/// The bounds on a function's replica count. `min == 0` allows scale to zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ScaleBounds {
    /// Fewest replicas; 0 lets the function scale to zero.
    pub min: u32,
    /// Most replicas.
    pub max: u32,
}

impl ScaleBounds {
    /// Makes bounds; [`Scheduler::reconcile`](crate::Scheduler::reconcile) rejects
    /// `min > max`.
    pub const fn new(min: u32, max: u32) -> Self {
        Self { min, max }
    }

    /// `n` clamped into the bounds.
    pub fn clamp(&self, n: u32) -> u32 {
        n.max(self.min).min(self.max.max(self.min))
    }
}

impl Default for ScaleBounds {
    /// One to 100 replicas, with no scale to zero.
    fn default() -> Self {
        Self { min: 1, max: 100 }
    }
}

/// A function as the resolved deployment spec describes it to the scheduler.
#[derive(Clone, Debug, PartialEq)]
pub struct FunctionSpec {
    /// Its id.
    pub id: FunctionId,
    /// The sha256 digest of its component.
    pub digest: String,
    /// What each replica requests (models are accounted apart, once per node).
    pub request: Resources,
    /// The models it needs.
    pub models: Vec<ModelRequirement>,
    /// Its placement constraints and preferences.
    pub placement: PlacementConstraints,
    /// Bounds on its replica count.
    pub scale: ScaleBounds,
}

impl FunctionSpec {
    /// A function with no models, no constraints and the default bounds.
    pub fn new(id: impl Into<FunctionId>, request: Resources) -> Self {
        Self {
            id: id.into(),
            digest: String::new(),
            request,
            models: Vec::new(),
            placement: PlacementConstraints::default(),
            scale: ScaleBounds::default(),
        }
    }

    /// Sets the component digest.
    #[must_use]
    pub fn with_digest(mut self, digest: impl Into<String>) -> Self {
        self.digest = digest.into();
        self
    }

    /// Adds a model.
    #[must_use]
    pub fn with_model(mut self, model: ModelRequirement) -> Self {
        self.models.push(model);
        self
    }

    /// Sets the required tier.
    #[must_use]
    pub fn with_tier(mut self, tier: Tier) -> Self {
        self.placement.tier = Some(tier);
        self
    }

    /// Adds a required label condition.
    #[must_use]
    pub fn with_selector(mut self, selector: LabelSelector) -> Self {
        self.placement.selectors.push(selector);
        self
    }

    /// Sets the accelerator policy.
    #[must_use]
    pub fn with_accelerator(mut self, policy: AcceleratorPolicy) -> Self {
        self.placement.accelerator = policy;
        self
    }

    /// Sets the spread key.
    #[must_use]
    pub fn with_spread_key(mut self, key: impl Into<String>) -> Self {
        self.placement.spread_key = Some(key.into());
        self
    }

    /// Sets the region the clients are near.
    #[must_use]
    pub fn with_near_region(mut self, region: impl Into<String>) -> Self {
        self.placement.near_region = Some(region.into());
        self
    }

    /// Sets the scale bounds.
    #[must_use]
    pub fn with_scale(mut self, scale: ScaleBounds) -> Self {
        self.scale = scale;
        self
    }
}

/// The state of a replica as its node reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReplicaState {
    /// Placed, not yet serving.
    Pending,
    /// Serving.
    Running,
    /// Crashed or failed to start: it is replaced on another node.
    Failed,
}

/// A replica: one function's instance pool on one node.
///
/// A node holds at most one replica of a function (more concurrency on a node is the
/// pool's business, not the scheduler's), so `(function, node)` identifies a replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replica {
    /// The function.
    pub function: FunctionId,
    /// The node it is on.
    pub node: NodeId,
    /// Its state.
    pub state: ReplicaState,
    /// What it holds on the node (released when it stops).
    pub resources: Resources,
}

impl Replica {
    /// Makes a replica.
    pub fn new(
        function: impl Into<FunctionId>,
        node: impl Into<NodeId>,
        state: ReplicaState,
        resources: Resources,
    ) -> Self {
        Self {
            function: function.into(),
            node: node.into(),
            state,
            resources,
        }
    }
}

/// An immutable view of the cluster: the nodes and the replicas on them.
///
/// The scheduler reads a snapshot and returns a [`Plan`](crate::Plan); it never changes
/// the snapshot. [`ClusterSnapshot::apply`] plays a plan onto a snapshot, the way the
/// cluster's state will look once the plan has been carried out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterSnapshot {
    /// The nodes.
    pub nodes: Vec<Node>,
    /// The replicas.
    pub replicas: Vec<Replica>,
}

impl ClusterSnapshot {
    /// A snapshot of nodes with no replicas.
    pub fn new(nodes: Vec<Node>) -> Self {
        Self {
            nodes,
            replicas: Vec::new(),
        }
    }

    /// The node with this id.
    pub fn node(&self, id: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.id.as_str() == id)
    }

    /// The replicas of a function.
    pub fn replicas_of<'a>(&'a self, function: &'a str) -> impl Iterator<Item = &'a Replica> + 'a {
        self.replicas
            .iter()
            .filter(move |r| r.function.as_str() == function)
    }
}

/// A function and how many replicas of it are wanted (clamped into its bounds).
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredFunction {
    /// The function.
    pub spec: FunctionSpec,
    /// Replicas wanted, usually the autoscaler's answer.
    pub replicas: u32,
}

impl DesiredFunction {
    /// Makes a desired function.
    pub fn new(spec: FunctionSpec, replicas: u32) -> Self {
        Self { spec, replicas }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_match_like_kubernetes() {
        assert!(LabelSelector::is_in("zone", ["a", "b"]).matches(Some("b")));
        assert!(!LabelSelector::is_in("zone", ["a"]).matches(None));
        assert!(LabelSelector::not_in("zone", ["a"]).matches(None));
        assert!(!LabelSelector::not_in("zone", ["a"]).matches(Some("a")));
        assert!(LabelSelector::exists("gpu").matches(Some("")));
        assert!(LabelSelector::does_not_exist("gpu").matches(None));
    }

    #[test]
    fn node_builder_sets_tier_region_and_gpu_target() {
        let node = Node::new("n1", Resources::new(1000, 1 << 30))
            .with_tier(Tier::Edge)
            .with_region("eu-west")
            .with_accelerator(Accelerator::new("nvidia-l4", 24 << 30));
        assert_eq!(node.tier(), Some(Tier::Edge));
        assert_eq!(node.region(), Some("eu-west"));
        assert!(node.targets.contains(&ExecutionTarget::Gpu));
        assert_eq!(node.free, node.capacity);
    }

    #[test]
    fn scale_bounds_clamp() {
        let b = ScaleBounds::new(2, 5);
        assert_eq!(b.clamp(0), 2);
        assert_eq!(b.clamp(9), 5);
        assert_eq!(b.clamp(3), 3);
    }
}
