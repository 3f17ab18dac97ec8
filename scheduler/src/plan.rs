//! The plan: what to place, stop and move, and what could not be placed and why.

use std::collections::HashMap;
use std::fmt;

use crate::error::Error;
use crate::model::{
    ClusterSnapshot, FunctionId, ModelId, Node, NodeId, Replica, ReplicaState, Resources,
};
use crate::pipeline::NodeRejection;

/// Where a new replica goes and what it takes there.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// The function.
    pub function: FunctionId,
    /// The node.
    pub node: NodeId,
    /// What the replica holds (the function's request).
    pub resources: Resources,
    /// Models the node must load first (those not resident yet), in spec order.
    pub load_models: Vec<ModelId>,
    /// Where those models go when on an accelerator.
    pub accelerator: Option<AcceleratorClaim>,
    /// Bytes of host memory those models take when they run on the CPU.
    pub host_model_bytes: u64,
    /// The node's total score when it was chosen.
    pub score: f64,
}

/// Accelerator memory claimed for a placement's models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceleratorClaim {
    /// The accelerator's index in [`Node::accelerators`](crate::Node::accelerators).
    pub index: usize,
    /// Bytes claimed on it.
    pub memory_bytes: u64,
}

/// Why a replica cannot stay where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Displacement {
    /// Its node stopped heartbeating.
    NodeLost,
    /// Its node is not in the snapshot at all.
    NodeUnknown,
    /// Its node is being drained.
    NodeDraining,
    /// It failed.
    ReplicaFailed,
    /// Its node no longer meets the function's required constraints.
    ConstraintsChanged,
}

impl Displacement {
    /// The reason as a kebab-case word.
    pub const fn as_str(self) -> &'static str {
        match self {
            Displacement::NodeLost => "node-lost",
            Displacement::NodeUnknown => "node-unknown",
            Displacement::NodeDraining => "node-draining",
            Displacement::ReplicaFailed => "replica-failed",
            Displacement::ConstraintsChanged => "constraints-changed",
        }
    }
}

/// Why a replica is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StopReason {
    /// The function is no longer desired.
    FunctionRemoved,
    /// The function has more replicas than it wants.
    ScaledDown,
    /// The replica cannot stay and is not (or cannot be) replaced elsewhere.
    Displaced(Displacement),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::FunctionRemoved => f.write_str("function-removed"),
            StopReason::ScaledDown => f.write_str("scaled-down"),
            StopReason::Displaced(d) => f.write_str(d.as_str()),
        }
    }
}

/// One step of a plan.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Start a new replica.
    Place(Placement),
    /// Stop a replica.
    Stop {
        /// The function.
        function: FunctionId,
        /// The node it is on.
        node: NodeId,
        /// Why.
        reason: StopReason,
    },
    /// Start a replacement on `to`, then stop the replica on `from` (make before break;
    /// on a lost node there is nothing left to stop).
    Move {
        /// The node the replica leaves.
        from: NodeId,
        /// Its replacement.
        to: Placement,
        /// Why it moves.
        reason: Displacement,
    },
}

impl Action {
    /// The function the action is about.
    pub fn function(&self) -> &FunctionId {
        match self {
            Action::Place(p) | Action::Move { to: p, .. } => &p.function,
            Action::Stop { function, .. } => function,
        }
    }

    /// The new replica this action starts, if any.
    pub fn placement(&self) -> Option<&Placement> {
        match self {
            Action::Place(p) | Action::Move { to: p, .. } => Some(p),
            Action::Stop { .. } => None,
        }
    }
}

/// Not every replica a function wants could be placed: "no node fits", with the reason
/// for every node that was filtered out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacementFailure {
    /// The function.
    pub function: FunctionId,
    /// Replicas the pass looked for (new ones and replacements).
    pub wanted: u32,
    /// Replicas it found a node for.
    pub placed: u32,
    /// Every node that was filtered out, and why.
    pub rejections: Vec<NodeRejection>,
}

impl fmt::Display for PlacementFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "function `{}`: placed {} of {} replicas",
            self.function, self.placed, self.wanted
        )?;
        for r in &self.rejections {
            write!(f, "\n  {r}")?;
        }
        Ok(())
    }
}

/// What the scheduler decided: actions to carry out, and the functions it could not
/// fully place.
///
/// Stops (and the `from` side of moves) release resources before any placement takes
/// them; a cluster that carries a plan out must stop before it starts, or accept that
/// a node is briefly over its free capacity.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The actions: stops first (removed functions, scale-downs, displaced replicas
    /// not needed), then moves and placements in desired-state order, then stops of
    /// displaced replicas that found no other node.
    pub actions: Vec<Action>,
    /// Functions left short of replicas, with the reasons.
    pub failures: Vec<PlacementFailure>,
}

impl Plan {
    /// Whether there is nothing to do (failures are not actions).
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }

    /// The new replicas of this plan (placements and move targets).
    pub fn placements(&self) -> impl Iterator<Item = &Placement> {
        self.actions.iter().filter_map(Action::placement)
    }
}

impl ClusterSnapshot {
    /// Plays a plan onto the snapshot: stops (and move sources) first, then placements,
    /// which become [`ReplicaState::Pending`] replicas. Checks every step, so a plan
    /// that does not fit is an error and leaves the snapshot unchanged.
    ///
    /// This is how the cluster state will look once the plan is carried out, and what
    /// the cluster layer can use as its optimistic view until heartbeats confirm it.
    pub fn apply(&mut self, plan: &Plan) -> Result<(), Error> {
        let mut next = self.clone();
        let node_at: HashMap<NodeId, usize> = next
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.id.clone(), i))
            .collect();
        let mut replica_at: HashMap<(FunctionId, NodeId), usize> = next
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| ((r.function.clone(), r.node.clone()), i))
            .collect();
        let mut removed = vec![false; next.replicas.len()];
        for action in &plan.actions {
            let (function, node) = match action {
                Action::Stop { function, node, .. } => (function, node),
                Action::Move { from, to, .. } => (&to.function, from),
                Action::Place(_) => continue,
            };
            let at = replica_at
                .remove(&(function.clone(), node.clone()))
                .ok_or_else(|| Error::UnknownReplica {
                    function: function.clone(),
                    node: node.clone(),
                })?;
            removed[at] = true;
            let resources = next.replicas[at].resources;
            if let Some(&n) = node_at.get(node) {
                let free = &mut next.nodes[n].free;
                free.cpu_millis = free.cpu_millis.saturating_add(resources.cpu_millis);
                free.memory_bytes = free.memory_bytes.saturating_add(resources.memory_bytes);
            }
        }
        let mut i = 0;
        next.replicas.retain(|_| {
            i += 1;
            !removed[i - 1]
        });
        for p in plan.placements() {
            if replica_at
                .insert((p.function.clone(), p.node.clone()), usize::MAX)
                .is_some()
            {
                return Err(Error::ReplicaExists {
                    function: p.function.clone(),
                    node: p.node.clone(),
                });
            }
            let n = *node_at.get(&p.node).ok_or_else(|| Error::UnknownNode {
                node: p.node.clone(),
            })?;
            take(&mut next.nodes[n], p)?;
            next.replicas.push(Replica {
                function: p.function.clone(),
                node: p.node.clone(),
                state: ReplicaState::Pending,
                resources: p.resources,
            });
        }
        *self = next;
        Ok(())
    }
}

/// Takes a placement's resources out of a node.
fn take(n: &mut Node, p: &Placement) -> Result<(), Error> {
    let over = |resource| Error::OverCapacity {
        node: p.node.clone(),
        resource,
    };
    n.free.cpu_millis = n
        .free
        .cpu_millis
        .checked_sub(p.resources.cpu_millis)
        .ok_or_else(|| over("cpu"))?;
    let memory = p.resources.memory_bytes.saturating_add(p.host_model_bytes);
    n.free.memory_bytes = n
        .free
        .memory_bytes
        .checked_sub(memory)
        .ok_or_else(|| over("memory"))?;
    if let Some(claim) = p.accelerator {
        let a = n
            .accelerators
            .get_mut(claim.index)
            .ok_or_else(|| Error::UnknownAccelerator {
                node: p.node.clone(),
                index: claim.index,
            })?;
        a.free_memory_bytes = a
            .free_memory_bytes
            .checked_sub(claim.memory_bytes)
            .ok_or_else(|| over("accelerator-memory"))?;
    }
    n.resident_models.extend(p.load_models.iter().cloned());
    Ok(())
}
