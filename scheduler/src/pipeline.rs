//! The named steps of the placement pipeline, the reasons a node is filtered out, and
//! the scheduler's configuration (score weights, load policy, seed).

use std::fmt;

use crate::model::{NodeId, NodeStatus, Tier};

/// A filter step: a yes/no question about a node, asked in this order (cheap first).
///
/// A node that fails a step is not considered further and gets a [`Rejection`] naming
/// the step and the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FilterStep {
    /// The node is ready (not draining, not lost).
    NodeReady,
    /// The node's `tier` label matches the function's required tier.
    Tier,
    /// The node does not already hold a replica of the function.
    DistinctNode,
    /// Every label selector of the function holds on the node.
    Labels,
    /// The node has an accelerator, when the function requires one.
    Accelerator,
    /// The node offers the wasi-nn backend of every model the function needs.
    NnBackend,
    /// The node has the CPU and memory for a replica (and for the models, when they run
    /// on the CPU and are not resident yet).
    Resources,
    /// One of the node's accelerators has the memory for the models that are not
    /// resident yet, when the function requires an accelerator.
    AcceleratorMemory,
}

impl FilterStep {
    /// Every filter step, in the order the pipeline runs them.
    pub const ALL: [FilterStep; 8] = [
        FilterStep::NodeReady,
        FilterStep::Tier,
        FilterStep::DistinctNode,
        FilterStep::Labels,
        FilterStep::Accelerator,
        FilterStep::NnBackend,
        FilterStep::Resources,
        FilterStep::AcceleratorMemory,
    ];

    /// The step's name, as shown in reports.
    pub const fn name(self) -> &'static str {
        match self {
            FilterStep::NodeReady => "node-ready",
            FilterStep::Tier => "tier",
            FilterStep::DistinctNode => "distinct-node",
            FilterStep::Labels => "labels",
            FilterStep::Accelerator => "accelerator",
            FilterStep::NnBackend => "nn-backend",
            FilterStep::Resources => "resources",
            FilterStep::AcceleratorMemory => "accelerator-memory",
        }
    }
}

impl fmt::Display for FilterStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a node cannot take a replica of a function.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The node is draining or lost.
    NodeNotReady {
        /// Its status.
        status: NodeStatus,
    },
    /// The node's tier is not the required one.
    TierMismatch {
        /// The tier the function requires.
        required: Tier,
        /// The node's tier, if its `tier` label names one.
        actual: Option<Tier>,
    },
    /// The node already holds a replica of the function.
    AlreadyOnNode,
    /// A label selector does not hold.
    LabelMismatch {
        /// The selector's key.
        key: String,
    },
    /// The function requires an accelerator and the node has none.
    NoAccelerator,
    /// The node does not offer a wasi-nn backend a model needs.
    MissingBackend {
        /// The backend.
        backend: String,
    },
    /// Not enough free CPU.
    InsufficientCpu {
        /// Millicores needed.
        requested: u64,
        /// Millicores free.
        free: u64,
    },
    /// Not enough free memory.
    InsufficientMemory {
        /// Bytes needed (the request plus models loaded in host memory).
        requested: u64,
        /// Bytes free.
        free: u64,
    },
    /// No accelerator has the memory for the models that are not resident yet.
    InsufficientAcceleratorMemory {
        /// Bytes needed.
        requested: u64,
        /// The most free bytes on any one accelerator of the node.
        largest_free: u64,
    },
}

impl Rejection {
    /// The step that rejected the node.
    pub const fn step(&self) -> FilterStep {
        match self {
            Rejection::NodeNotReady { .. } => FilterStep::NodeReady,
            Rejection::TierMismatch { .. } => FilterStep::Tier,
            Rejection::AlreadyOnNode => FilterStep::DistinctNode,
            Rejection::LabelMismatch { .. } => FilterStep::Labels,
            Rejection::NoAccelerator => FilterStep::Accelerator,
            Rejection::MissingBackend { .. } => FilterStep::NnBackend,
            Rejection::InsufficientCpu { .. } | Rejection::InsufficientMemory { .. } => {
                FilterStep::Resources
            }
            Rejection::InsufficientAcceleratorMemory { .. } => FilterStep::AcceleratorMemory,
        }
    }

    /// The reason as a short kebab-case word, for example `insufficient-memory`.
    pub const fn reason(&self) -> &'static str {
        match self {
            Rejection::NodeNotReady {
                status: NodeStatus::Lost,
            } => "node-lost",
            Rejection::NodeNotReady {
                status: NodeStatus::Draining,
            } => "node-draining",
            Rejection::NodeNotReady {
                status: NodeStatus::Ready,
            } => "node-not-ready",
            Rejection::TierMismatch { .. } => "tier-mismatch",
            Rejection::AlreadyOnNode => "already-on-node",
            Rejection::LabelMismatch { .. } => "label-mismatch",
            Rejection::NoAccelerator => "no-accelerator",
            Rejection::MissingBackend { .. } => "missing-nn-backend",
            Rejection::InsufficientCpu { .. } => "insufficient-cpu",
            Rejection::InsufficientMemory { .. } => "insufficient-memory",
            Rejection::InsufficientAcceleratorMemory { .. } => "insufficient-accelerator-memory",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "filtered by: {}", self.reason())?;
        match self {
            Rejection::NodeNotReady { .. }
            | Rejection::AlreadyOnNode
            | Rejection::NoAccelerator => Ok(()),
            Rejection::TierMismatch { required, actual } => {
                let actual = actual.map_or("none", Tier::as_str);
                write!(f, " (requires `{}`, node is `{actual}`)", required.as_str())
            }
            Rejection::LabelMismatch { key } => write!(f, " (selector on `{key}`)"),
            Rejection::MissingBackend { backend } => write!(f, " (`{backend}`)"),
            Rejection::InsufficientCpu { requested, free } => {
                write!(f, " (requested {requested}m, {free}m free)")
            }
            Rejection::InsufficientMemory { requested, free } => {
                write!(f, " (requested {requested} bytes, {free} free)")
            }
            Rejection::InsufficientAcceleratorMemory {
                requested,
                largest_free,
            } => {
                write!(
                    f,
                    " (requested {requested} bytes, at most {largest_free} free)"
                )
            }
        }
    }
}

/// A node and why it was filtered out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeRejection {
    /// The node.
    pub node: NodeId,
    /// Why.
    pub rejection: Rejection,
}

impl fmt::Display for NodeRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node `{}`: {}", self.node, self.rejection)
    }
}

/// A score step: a preference among the nodes that passed the filters.
///
/// Each step gives a node a normalised score in `0.0..=1.0`; the node's total is the sum
/// of the scores times their weights ([`SchedulerConfig::with_weight`]). The highest
/// total wins; ties are broken by the seeded RNG.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScoreStep {
    /// The share of the function's models already resident on the node.
    ModelResident,
    /// How loaded the node would be, under the [`LoadPolicy`]: the mean free share of
    /// CPU and memory after placement (least-loaded) or one minus it (bin-pack).
    Load,
    /// `1 / (1 + n)` where `n` counts the function's replicas whose node has the same
    /// value of the spread key; 0 when the function has no spread key.
    Spread,
    /// 1 when the function prefers an accelerator and the models fit on one of the node's.
    AcceleratorPreferred,
    /// For a function with a region to be near: 1 for an edge node in that region, 0.75
    /// for another node there, else 0.
    EdgeProximity,
}

impl ScoreStep {
    /// Every score step.
    pub const ALL: [ScoreStep; 5] = [
        ScoreStep::ModelResident,
        ScoreStep::Load,
        ScoreStep::Spread,
        ScoreStep::AcceleratorPreferred,
        ScoreStep::EdgeProximity,
    ];

    /// The step's name, as shown in reports.
    pub const fn name(self) -> &'static str {
        match self {
            ScoreStep::ModelResident => "model-resident",
            ScoreStep::Load => "load",
            ScoreStep::Spread => "spread",
            ScoreStep::AcceleratorPreferred => "accelerator-preferred",
            ScoreStep::EdgeProximity => "edge-proximity",
        }
    }

    pub(crate) const fn index(self) -> usize {
        match self {
            ScoreStep::ModelResident => 0,
            ScoreStep::Load => 1,
            ScoreStep::Spread => 2,
            ScoreStep::AcceleratorPreferred => 3,
            ScoreStep::EdgeProximity => 4,
        }
    }
}

impl fmt::Display for ScoreStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the [`ScoreStep::Load`] step ranks nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LoadPolicy {
    /// Prefer the emptiest node: spreads load, leaves headroom for bursts.
    #[default]
    LeastLoaded,
    /// Prefer the fullest node that fits: packs replicas, leaves whole nodes free.
    BinPack,
}

/// Default weight of [`ScoreStep::ModelResident`]: a resident model saves a load that
/// costs seconds, so it outweighs everything else.
pub const DEFAULT_MODEL_RESIDENT_WEIGHT: f64 = 4.0;
/// Default weight of [`ScoreStep::Load`].
pub const DEFAULT_LOAD_WEIGHT: f64 = 1.0;
/// Default weight of [`ScoreStep::Spread`]: availability across failure domains.
pub const DEFAULT_SPREAD_WEIGHT: f64 = 2.0;
/// Default weight of [`ScoreStep::AcceleratorPreferred`].
pub const DEFAULT_ACCELERATOR_PREFERRED_WEIGHT: f64 = 2.0;
/// Default weight of [`ScoreStep::EdgeProximity`].
pub const DEFAULT_EDGE_PROXIMITY_WEIGHT: f64 = 2.0;
/// Default seed of the tie-breaking RNG.
pub const DEFAULT_SEED: u64 = 0x1ee7_0c0d_e5ee_d5ed;

/// The scheduler's configuration: score weights, load policy and the RNG seed.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerConfig {
    pub(crate) weights: [f64; 5],
    pub(crate) load_policy: LoadPolicy,
    pub(crate) seed: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            weights: [
                DEFAULT_MODEL_RESIDENT_WEIGHT,
                DEFAULT_LOAD_WEIGHT,
                DEFAULT_SPREAD_WEIGHT,
                DEFAULT_ACCELERATOR_PREFERRED_WEIGHT,
                DEFAULT_EDGE_PROXIMITY_WEIGHT,
            ],
            load_policy: LoadPolicy::default(),
            seed: DEFAULT_SEED,
        }
    }
}

impl SchedulerConfig {
    /// Sets a step's weight; a negative or non-finite weight counts as 0 (step off).
    #[must_use]
    pub fn with_weight(mut self, step: ScoreStep, weight: f64) -> Self {
        self.weights[step.index()] = if weight.is_finite() && weight > 0.0 {
            weight
        } else {
            0.0
        };
        self
    }

    /// Sets the load policy.
    #[must_use]
    pub fn with_load_policy(mut self, policy: LoadPolicy) -> Self {
        self.load_policy = policy;
        self
    }

    /// Sets the seed of the tie-breaking RNG: the same snapshot, desired state and seed
    /// give the same plan.
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// A step's weight.
    pub fn weight(&self, step: ScoreStep) -> f64 {
        self.weights[step.index()]
    }

    /// The load policy.
    pub fn load_policy(&self) -> LoadPolicy {
        self.load_policy
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_text_names_step_reason_and_values() {
        let r = Rejection::InsufficientMemory {
            requested: 512,
            free: 128,
        };
        assert_eq!(r.step(), FilterStep::Resources);
        assert_eq!(
            r.to_string(),
            "filtered by: insufficient-memory (requested 512 bytes, 128 free)"
        );
        let r = Rejection::NodeNotReady {
            status: NodeStatus::Lost,
        };
        assert_eq!(r.to_string(), "filtered by: node-lost");
    }

    #[test]
    fn bad_weights_turn_a_step_off() {
        let c = SchedulerConfig::default()
            .with_weight(ScoreStep::Spread, f64::NAN)
            .with_weight(ScoreStep::Load, -1.0);
        assert_eq!(c.weight(ScoreStep::Spread), 0.0);
        assert_eq!(c.weight(ScoreStep::Load), 0.0);
        assert_eq!(
            c.weight(ScoreStep::ModelResident),
            DEFAULT_MODEL_RESIDENT_WEIGHT
        );
    }
}
