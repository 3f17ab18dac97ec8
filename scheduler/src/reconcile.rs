//! The scheduler's entry points: [`Scheduler::reconcile`] turns a snapshot and the
//! desired state into a [`Plan`] that converges; [`Scheduler::explain`] shows how every
//! node fares for one function.

use std::collections::{HashMap, HashSet};

use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::error::Error;
use crate::model::{
    ClusterSnapshot, DesiredFunction, FunctionSpec, NodeId, NodeStatus, ReplicaState,
};
use crate::pipeline::{NodeRejection, Rejection, SchedulerConfig, ScoreStep};
use crate::plan::{
    AcceleratorClaim, Action, Displacement, Placement, PlacementFailure, Plan, StopReason,
};
use crate::state::{AVOID, Chosen, Compiled, OCCUPIED, PassJob, State};

/// Places functions on nodes. Holds only configuration: every call is a pure function
/// of its arguments, so one `Scheduler` can serve any number of snapshots and threads.
#[derive(Clone, Debug, Default)]
pub struct Scheduler {
    config: SchedulerConfig,
}

/// How one node fares for one function, from [`Scheduler::explain`].
#[derive(Clone, Debug, PartialEq)]
pub struct NodeVerdict {
    /// The node.
    pub node: NodeId,
    /// Its score, or why it was filtered out.
    pub outcome: Result<NodeScore, Rejection>,
}

/// A node's score for a function, step by step.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeScore {
    /// The weighted sum.
    pub total: f64,
    /// Each step's normalised score (`0.0..=1.0`), before weighting.
    pub steps: Vec<(ScoreStep, f64)>,
}

impl NodeScore {
    /// One step's normalised score.
    pub fn step(&self, step: ScoreStep) -> f64 {
        self.steps
            .iter()
            .find(|(s, _)| *s == step)
            .map_or(0.0, |(_, v)| *v)
    }
}

/// A function's share of the work between the two phases of a reconcile.
struct Work {
    compiled: Compiled,
    /// Replicas to re-place: (index into the snapshot's replicas, why).
    moves: Vec<(usize, Displacement)>,
    fresh: usize,
    /// Nodes whose replicas of the function stay.
    staying: Vec<u32>,
    /// Nodes that hold a replica of the function now.
    occupied: Vec<u32>,
    /// Nodes where a replica of the function failed: last resort for replacements.
    avoid: Vec<u32>,
    /// Replicas phase 2 looks for, found so far, and why the last pass fell short.
    wanted: usize,
    placed: usize,
    rejections: Vec<NodeRejection>,
}

impl Scheduler {
    /// A scheduler with this configuration.
    pub fn new(config: SchedulerConfig) -> Self {
        Self { config }
    }

    /// Its configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Computes the plan that takes the cluster from `snapshot` to `desired`.
    ///
    /// - Replicas of functions that are not desired are stopped.
    /// - Replicas on lost, unknown or draining nodes, failed replicas, and replicas
    ///   whose node no longer meets the function's required constraints are moved
    ///   (re-placed elsewhere), or stopped when the function has enough without them.
    ///   A failed replica's replacement goes on its node (a restart in place) only when
    ///   no other node fits.
    /// - Each function is brought to its wanted count clamped into its
    ///   [`ScaleBounds`](crate::ScaleBounds): extra healthy replicas are stopped (pending
    ///   before running, then by node id), missing ones placed through the pipeline.
    ///
    /// Stops release their resources before anything is placed. Functions are placed in
    /// the order given, so put the most important first. A function that cannot get all
    /// its replicas is a [`PlacementFailure`] in the plan, with the reason for every
    /// node; a replica on a draining node with nowhere to go keeps running, any other
    /// displaced replica with nowhere to go is stopped.
    ///
    /// Applying the plan ([`ClusterSnapshot::apply`]) and reconciling again gives a plan
    /// with no actions. The same inputs and seed always give the same plan.
    ///
    /// # Errors
    ///
    /// Only for bad input: duplicate node ids, duplicate desired functions, two replicas
    /// of a function on one node, or scale bounds with `min > max`.
    pub fn reconcile(
        &self,
        snapshot: &ClusterSnapshot,
        desired: &[DesiredFunction],
    ) -> Result<Plan, Error> {
        validate_nodes(snapshot)?;
        validate_replicas(snapshot)?;
        let mut wanted: HashMap<&str, usize> = HashMap::with_capacity(desired.len());
        for (i, d) in desired.iter().enumerate() {
            let spec = &d.spec;
            if spec.scale.min > spec.scale.max {
                return Err(Error::InvalidScaleBounds {
                    function: spec.id.clone(),
                    min: spec.scale.min,
                    max: spec.scale.max,
                });
            }
            if wanted.insert(spec.id.as_str(), i).is_some() {
                return Err(Error::DuplicateFunction {
                    function: spec.id.clone(),
                });
            }
        }

        let mut state = State::new(snapshot);
        let mut plan = Plan::default();
        let mut replicas_of: Vec<Vec<usize>> = vec![Vec::new(); desired.len()];
        for (ri, r) in snapshot.replicas.iter().enumerate() {
            match wanted.get(r.function.as_str()) {
                Some(&d) => replicas_of[d].push(ri),
                None => {
                    plan.actions.push(Action::Stop {
                        function: r.function.clone(),
                        node: r.node.clone(),
                        reason: StopReason::FunctionRemoved,
                    });
                    if let Some(n) = state.position(r.node.as_str()) {
                        state.release(n, r.resources);
                    }
                }
            }
        }

        // Phase 1: decide what stays, what stops and what moves; release what leaves.
        let mut works = Vec::with_capacity(desired.len());
        for (d, replicas) in desired.iter().zip(&replicas_of) {
            works.push(self.settle(&mut state, d, replicas, &mut plan));
        }

        // Phase 2: place replacements and new replicas, function by function. A
        // placement can make a model resident that an earlier function needed, so the
        // functions left short go round again until a round places nothing: then each
        // has failed against the final state, and reconciling the applied plan again
        // finds nothing more to do.
        let mut rng = SmallRng::seed_from_u64(self.config.seed);
        let mut marks = vec![0u8; snapshot.nodes.len()];
        let mut round: Vec<(usize, Work)> = desired
            .iter()
            .zip(works)
            .enumerate()
            .filter(|(_, (_, w))| w.moves.len() + w.fresh > 0)
            .map(|(i, (_, w))| (i, w))
            .collect();
        let mut short = Vec::new();
        while !round.is_empty() {
            let mut progressed = false;
            for (i, mut work) in round.drain(..) {
                let placed = self.place_round(
                    &mut state,
                    &desired[i].spec,
                    &mut work,
                    &mut marks,
                    &mut rng,
                    &mut plan,
                );
                progressed |= placed > 0;
                if work.moves.len() + work.fresh > 0 {
                    short.push((i, work));
                }
            }
            if progressed {
                std::mem::swap(&mut round, &mut short);
            }
        }
        for (i, work) in short {
            let spec = &desired[i].spec;
            for (ri, reason) in work.moves {
                // A draining node's replica keeps serving until there is room elsewhere.
                if reason != Displacement::NodeDraining {
                    let replica = &snapshot.replicas[ri];
                    plan.actions.push(Action::Stop {
                        function: replica.function.clone(),
                        node: replica.node.clone(),
                        reason: StopReason::Displaced(reason),
                    });
                }
            }
            plan.failures.push(PlacementFailure {
                function: spec.id.clone(),
                wanted: count_u32(work.wanted),
                placed: count_u32(work.placed),
                rejections: work.rejections,
            });
        }
        Ok(plan)
    }

    /// Runs one placement pass for a function and records what it placed: moves
    /// first, then new replicas. Returns how many it placed.
    fn place_round(
        &self,
        state: &mut State<'_>,
        spec: &FunctionSpec,
        work: &mut Work,
        marks: &mut [u8],
        rng: &mut SmallRng,
        plan: &mut Plan,
    ) -> usize {
        let snapshot = state.snapshot();
        let want = work.moves.len() + work.fresh;
        for &n in &work.avoid {
            marks[n as usize] = AVOID;
        }
        for &n in &work.occupied {
            marks[n as usize] = OCCUPIED;
        }
        let job = PassJob {
            spec,
            compiled: &work.compiled,
            want,
            marks,
            staying: &work.staying,
        };
        let outcome = state.pass(job, &self.config, rng);
        for &n in work.occupied.iter().chain(&work.avoid) {
            marks[n as usize] = 0;
        }
        let placed = outcome.chosen.len();
        let moved = placed.min(work.moves.len());
        let mut chosen = outcome.chosen.into_iter();
        for ((ri, reason), ch) in work.moves.drain(..moved).zip(chosen.by_ref()) {
            let to = place(state, spec, &work.compiled, &ch);
            let from = snapshot.replicas[ri].node.clone();
            plan.actions.push(Action::Move { from, to, reason });
            work.occupied.push(ch.node);
            work.staying.push(ch.node);
        }
        for ch in chosen {
            plan.actions
                .push(Action::Place(place(state, spec, &work.compiled, &ch)));
            work.fresh -= 1;
            work.occupied.push(ch.node);
            work.staying.push(ch.node);
        }
        work.placed += placed;
        work.rejections = outcome.rejections;
        placed
    }

    /// Phase 1 for one function: sorts its replicas into staying, stopping and moving.
    fn settle(
        &self,
        state: &mut State<'_>,
        d: &DesiredFunction,
        replicas: &[usize],
        plan: &mut Plan,
    ) -> Work {
        let snapshot = state.snapshot();
        let compiled = state.compile(&d.spec);
        let target = d.spec.scale.clamp(d.replicas) as usize;
        let mut healthy: Vec<(usize, u32)> = Vec::new();
        let mut displaced: Vec<(usize, Displacement)> = Vec::new();
        let mut occupied = Vec::with_capacity(replicas.len());
        let mut avoid = Vec::new();
        for &ri in replicas {
            let r = &snapshot.replicas[ri];
            let Some(n) = state.position(r.node.as_str()) else {
                displaced.push((ri, Displacement::NodeUnknown));
                continue;
            };
            let status = state.nodes[n as usize].status;
            let why = if status == NodeStatus::Lost {
                Some(Displacement::NodeLost)
            } else if r.state == ReplicaState::Failed {
                Some(Displacement::ReplicaFailed)
            } else if status == NodeStatus::Draining {
                Some(Displacement::NodeDraining)
            } else if state.check_static(&compiled, n as usize).is_err() {
                Some(Displacement::ConstraintsChanged)
            } else {
                None
            };
            // A failed replica goes away first, so its node may take the replacement,
            // as a last resort.
            if why == Some(Displacement::ReplicaFailed) {
                avoid.push(n);
            } else {
                occupied.push(n);
            }
            match why {
                Some(why) => displaced.push((ri, why)),
                None => healthy.push((ri, n)),
            }
        }
        if healthy.len() > target {
            healthy.sort_by(|a, b| {
                let (ra, rb) = (&snapshot.replicas[a.0], &snapshot.replicas[b.0]);
                let pending = |s| u8::from(s == ReplicaState::Pending);
                pending(rb.state)
                    .cmp(&pending(ra.state))
                    .then_with(|| rb.node.cmp(&ra.node))
            });
            let excess = healthy.len() - target;
            for (ri, n) in healthy.drain(..excess) {
                let r = &snapshot.replicas[ri];
                plan.actions.push(Action::Stop {
                    function: r.function.clone(),
                    node: r.node.clone(),
                    reason: StopReason::ScaledDown,
                });
                state.release(n, r.resources);
            }
        }
        let need = target - healthy.len();
        let mut moves = Vec::new();
        for (k, (ri, why)) in displaced.into_iter().enumerate() {
            let r = &snapshot.replicas[ri];
            if let Some(n) = state.position(r.node.as_str()) {
                state.release(n, r.resources);
            }
            if k < need {
                moves.push((ri, why));
            } else {
                plan.actions.push(Action::Stop {
                    function: r.function.clone(),
                    node: r.node.clone(),
                    reason: StopReason::Displaced(why),
                });
            }
        }
        Work {
            compiled,
            wanted: need,
            placed: 0,
            rejections: Vec::new(),
            fresh: need - moves.len(),
            moves,
            staying: healthy.iter().map(|&(_, n)| n).collect(),
            occupied,
            avoid,
        }
    }

    /// How every node fares for `spec` in `snapshot`: its score step by step, or the
    /// reason it is filtered out. For `lepton status`, debugging and tests.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateNode`] when two nodes share an id.
    pub fn explain(
        &self,
        snapshot: &ClusterSnapshot,
        spec: &FunctionSpec,
    ) -> Result<Vec<NodeVerdict>, Error> {
        validate_nodes(snapshot)?;
        let mut state = State::new(snapshot);
        let compiled = state.compile(spec);
        let mut occupied = vec![false; snapshot.nodes.len()];
        let mut spread_counts: HashMap<Option<u32>, u32> = HashMap::new();
        for r in snapshot.replicas_of(spec.id.as_str()) {
            if let Some(n) = state.position(r.node.as_str()) {
                occupied[n as usize] = true;
                *spread_counts
                    .entry(state.spread_value(&compiled, n as usize))
                    .or_default() += 1;
            }
        }
        let weights = self.config.weights;
        let verdicts = snapshot
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let outcome = match state.check(&compiled, i, occupied[i]) {
                    Err(r) => Err(r.to_public(spec)),
                    Ok(fit) => {
                        let mut parts =
                            state.score_parts(&compiled, i, &fit, self.config.load_policy);
                        if spec.placement.spread_key.is_some() {
                            let value = state.spread_value(&compiled, i);
                            let n = spread_counts.get(&value).copied().unwrap_or(0);
                            parts[ScoreStep::Spread.index()] = 1.0 / (1.0 + f64::from(n));
                        }
                        let total = parts.iter().zip(weights.iter()).map(|(p, w)| p * w).sum();
                        let steps = ScoreStep::ALL
                            .iter()
                            .map(|s| (*s, parts[s.index()]))
                            .collect();
                        Ok(NodeScore { total, steps })
                    }
                };
                NodeVerdict {
                    node: node.id.clone(),
                    outcome,
                }
            })
            .collect();
        Ok(verdicts)
    }
}

/// Commits a chosen node and describes the placement.
fn place(state: &mut State<'_>, spec: &FunctionSpec, c: &Compiled, ch: &Chosen) -> Placement {
    let load_models = state.missing_models(spec, ch.node);
    state.commit(c, ch.node, &ch.fit);
    Placement {
        function: spec.id.clone(),
        node: state.snapshot().nodes[ch.node as usize].id.clone(),
        resources: spec.request,
        load_models,
        accelerator: ch.fit.accel.map(|(index, memory_bytes)| AcceleratorClaim {
            index,
            memory_bytes,
        }),
        host_model_bytes: ch.fit.host_model_bytes,
        score: ch.score,
    }
}

fn validate_nodes(snapshot: &ClusterSnapshot) -> Result<(), Error> {
    let mut seen = HashSet::with_capacity(snapshot.nodes.len());
    for n in &snapshot.nodes {
        if !seen.insert(n.id.as_str()) {
            return Err(Error::DuplicateNode { node: n.id.clone() });
        }
    }
    Ok(())
}

fn validate_replicas(snapshot: &ClusterSnapshot) -> Result<(), Error> {
    let mut seen = HashSet::with_capacity(snapshot.replicas.len());
    for r in &snapshot.replicas {
        if !seen.insert((r.function.as_str(), r.node.as_str())) {
            return Err(Error::DuplicateReplica {
                function: r.function.clone(),
                node: r.node.clone(),
            });
        }
    }
    Ok(())
}

fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
