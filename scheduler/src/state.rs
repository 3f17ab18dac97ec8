//! The working state of one scheduling run: the snapshot's nodes indexed and interned
//! (labels, models and backends become integers), free capacity that placements use
//! up, and the placement pass that runs the filter and score steps.
//!
//! A pass places all the replicas one function needs. At most one replica of a function
//! goes on a node, so placing one only changes the chosen node (which then drops out) and
//! the spread count of its group: the other nodes' scores stay put. The pass therefore
//! filters and scores each node once, keeps the candidates in a max-heap per spread
//! group, and picks the best group head as often as it needs replicas. That is the same
//! answer as re-scoring every node for every replica, at a fraction of the cost.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use rand::RngCore;
use rand::rngs::SmallRng;

use crate::model::{
    AcceleratorPolicy, ClusterSnapshot, ExecutionTarget, FunctionSpec, ModelId, NodeStatus,
    Resources, SelectorOp, Tier,
};
use crate::pipeline::{LoadPolicy, NodeRejection, Rejection, SchedulerConfig, ScoreStep};

/// An interned label value that is not set.
const UNSET: u32 = u32::MAX;
/// A pass mark: the node holds a replica of the function.
pub(crate) const OCCUPIED: u8 = 1;
/// A pass mark: the node is a last resort for the function (its replica failed there).
pub(crate) const AVOID: u8 = 2;

/// A node as the run sees it.
pub(crate) struct NodeState {
    pub(crate) status: NodeStatus,
    tier: Option<Tier>,
    region: u32,
    pub(crate) free: Resources,
    capacity: Resources,
    accel_free: Vec<u64>,
    gpu: bool,
    backends: Vec<u32>,
    /// Sorted interned model ids.
    resident: Vec<u32>,
}

/// How a replica would sit on a node that passed the filters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Fit {
    /// The accelerator the models go on, and the bytes they take there.
    pub(crate) accel: Option<(usize, u64)>,
    /// Bytes of models loaded into host memory.
    pub(crate) host_model_bytes: u64,
    /// Models already resident.
    resident_models: u32,
}

/// A rejection with integers instead of strings, cheap to record for every node.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reject {
    NotReady(NodeStatus),
    Tier(Tier, Option<Tier>),
    AlreadyOnNode,
    Label(usize),
    NoAccelerator,
    Backend(usize),
    Cpu(u64, u64),
    Memory(u64, u64),
    AccelMemory(u64, u64),
}

impl Reject {
    pub(crate) fn to_public(self, spec: &FunctionSpec) -> Rejection {
        match self {
            Reject::NotReady(status) => Rejection::NodeNotReady { status },
            Reject::Tier(required, actual) => Rejection::TierMismatch { required, actual },
            Reject::AlreadyOnNode => Rejection::AlreadyOnNode,
            Reject::Label(i) => Rejection::LabelMismatch {
                key: spec
                    .placement
                    .selectors
                    .get(i)
                    .map(|s| s.key.clone())
                    .unwrap_or_default(),
            },
            Reject::NoAccelerator => Rejection::NoAccelerator,
            Reject::Backend(i) => Rejection::MissingBackend {
                backend: spec
                    .models
                    .get(i)
                    .map(|m| m.backend.clone())
                    .unwrap_or_default(),
            },
            Reject::Cpu(requested, free) => Rejection::InsufficientCpu { requested, free },
            Reject::Memory(requested, free) => Rejection::InsufficientMemory { requested, free },
            Reject::AccelMemory(requested, largest_free) => {
                Rejection::InsufficientAcceleratorMemory {
                    requested,
                    largest_free,
                }
            }
        }
    }
}

enum CompiledOp {
    In(Vec<u32>),
    NotIn(Vec<u32>),
    Exists,
    DoesNotExist,
}

/// A function spec with its strings interned against the run's tables.
pub(crate) struct Compiled {
    tier: Option<Tier>,
    selectors: Vec<(usize, CompiledOp)>,
    /// (model, backend, bytes)
    models: Vec<(u32, u32, u64)>,
    policy: AcceleratorPolicy,
    request: Resources,
    spread_col: Option<usize>,
    near_region: Option<u32>,
}

/// A candidate node in a pass.
#[derive(Clone, Copy)]
struct Cand {
    base: f64,
    tiebreak: u64,
    node: u32,
    fit: Fit,
}

impl PartialEq for Cand {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Cand {
    fn cmp(&self, other: &Self) -> Ordering {
        self.base
            .total_cmp(&other.base)
            .then(self.tiebreak.cmp(&other.tiebreak))
    }
}

/// A spread group's best candidate, keyed by its total score.
#[derive(Clone, Copy)]
struct GroupHead {
    total: f64,
    tiebreak: u64,
    group: usize,
}

impl PartialEq for GroupHead {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for GroupHead {}
impl PartialOrd for GroupHead {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for GroupHead {
    fn cmp(&self, other: &Self) -> Ordering {
        self.total
            .total_cmp(&other.total)
            .then(self.tiebreak.cmp(&other.tiebreak))
    }
}

/// A node a pass chose.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chosen {
    pub(crate) node: u32,
    pub(crate) fit: Fit,
    pub(crate) score: f64,
}

/// What a pass is asked to place.
#[derive(Clone, Copy)]
pub(crate) struct PassJob<'a> {
    pub(crate) spec: &'a FunctionSpec,
    pub(crate) compiled: &'a Compiled,
    pub(crate) want: usize,
    /// Per node: 0, [`OCCUPIED`] or [`AVOID`].
    pub(crate) marks: &'a [u8],
    /// Nodes whose replicas of the function stay (for spread).
    pub(crate) staying: &'a [u32],
}

/// What a pass found.
pub(crate) struct PassOutcome {
    pub(crate) chosen: Vec<Chosen>,
    /// Every filtered node and why; filled only when the pass fell short.
    pub(crate) rejections: Vec<NodeRejection>,
}

/// The working state of one run over a snapshot.
pub(crate) struct State<'s> {
    snap: &'s ClusterSnapshot,
    pub(crate) nodes: Vec<NodeState>,
    pos: HashMap<&'s str, u32>,
    strings: HashMap<Box<str>, u32>,
    columns: Vec<Vec<u32>>,
    column_of: HashMap<Box<str>, usize>,
    /// Scratch: a group index per interned value (plus one for unset), `usize::MAX` if none.
    group_of_value: Vec<usize>,
    /// Scratch: filtered nodes of the current pass.
    rejects: Vec<(u32, Reject)>,
}

impl<'s> State<'s> {
    /// Indexes a snapshot. Callers check ids for duplicates first.
    pub(crate) fn new(snap: &'s ClusterSnapshot) -> Self {
        let mut state = State {
            snap,
            nodes: Vec::with_capacity(snap.nodes.len()),
            pos: HashMap::with_capacity(snap.nodes.len()),
            strings: HashMap::new(),
            columns: Vec::new(),
            column_of: HashMap::new(),
            group_of_value: Vec::new(),
            rejects: Vec::new(),
        };
        for (i, node) in snap.nodes.iter().enumerate() {
            state.pos.insert(node.id.as_str(), index_u32(i));
            let backends = node.backends.iter().map(|b| state.intern(b)).collect();
            let mut resident: Vec<u32> = node
                .resident_models
                .iter()
                .map(|m| state.intern(m.as_str()))
                .collect();
            resident.sort_unstable();
            let region = node.region().map_or(UNSET, |r| state.intern(r));
            state.nodes.push(NodeState {
                status: node.status,
                tier: node.tier(),
                region,
                free: node.free,
                capacity: node.capacity,
                accel_free: node
                    .accelerators
                    .iter()
                    .map(|a| a.free_memory_bytes)
                    .collect(),
                gpu: !node.accelerators.is_empty() && node.targets.contains(&ExecutionTarget::Gpu),
                backends,
                resident,
            });
        }
        state
    }

    pub(crate) fn snapshot(&self) -> &'s ClusterSnapshot {
        self.snap
    }

    /// The index of a node by id.
    pub(crate) fn position(&self, id: &str) -> Option<u32> {
        self.pos.get(id).copied()
    }

    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.strings.get(s) {
            return id;
        }
        let id = index_u32(self.strings.len());
        self.strings.insert(s.into(), id);
        id
    }

    /// The interned values of one label key on every node, built on first use.
    fn column(&mut self, key: &str) -> usize {
        if let Some(&c) = self.column_of.get(key) {
            return c;
        }
        let snap = self.snap;
        let col = snap
            .nodes
            .iter()
            .map(|n| n.labels.get(key).map_or(UNSET, |v| self.intern(v)))
            .collect();
        self.columns.push(col);
        let c = self.columns.len() - 1;
        self.column_of.insert(key.into(), c);
        c
    }

    pub(crate) fn compile(&mut self, spec: &FunctionSpec) -> Compiled {
        let mut selectors = Vec::with_capacity(spec.placement.selectors.len());
        for sel in &spec.placement.selectors {
            let col = self.column(&sel.key);
            let op = match &sel.op {
                SelectorOp::In(vs) => CompiledOp::In(vs.iter().map(|v| self.intern(v)).collect()),
                SelectorOp::NotIn(vs) => {
                    CompiledOp::NotIn(vs.iter().map(|v| self.intern(v)).collect())
                }
                SelectorOp::Exists => CompiledOp::Exists,
                SelectorOp::DoesNotExist => CompiledOp::DoesNotExist,
            };
            selectors.push((col, op));
        }
        let models = spec
            .models
            .iter()
            .map(|m| {
                (
                    self.intern(m.id.as_str()),
                    self.intern(&m.backend),
                    m.memory_bytes,
                )
            })
            .collect();
        let spread_col = spec.placement.spread_key.as_deref().map(|k| self.column(k));
        let near_region = spec
            .placement
            .near_region
            .as_deref()
            .map(|r| self.intern(r));
        Compiled {
            tier: spec.placement.tier,
            selectors,
            models,
            policy: spec.placement.accelerator,
            request: spec.request,
            spread_col,
            near_region,
        }
    }

    /// The filters that do not depend on free capacity or on where the function
    /// already is: what a running replica must keep satisfying.
    pub(crate) fn check_static(&self, c: &Compiled, i: usize) -> Result<(), Reject> {
        let n = &self.nodes[i];
        if n.status != NodeStatus::Ready {
            return Err(Reject::NotReady(n.status));
        }
        if let Some(t) = c.tier
            && n.tier != Some(t)
        {
            return Err(Reject::Tier(t, n.tier));
        }
        self.check_labels_and_devices(c, i)
    }

    fn check_labels_and_devices(&self, c: &Compiled, i: usize) -> Result<(), Reject> {
        let n = &self.nodes[i];
        for (s, (col, op)) in c.selectors.iter().enumerate() {
            let v = self.columns[*col][i];
            let ok = match op {
                CompiledOp::In(vs) => v != UNSET && vs.contains(&v),
                CompiledOp::NotIn(vs) => v == UNSET || !vs.contains(&v),
                CompiledOp::Exists => v != UNSET,
                CompiledOp::DoesNotExist => v == UNSET,
            };
            if !ok {
                return Err(Reject::Label(s));
            }
        }
        if c.policy == AcceleratorPolicy::Required && !n.gpu {
            return Err(Reject::NoAccelerator);
        }
        for (m, (_, backend, _)) in c.models.iter().enumerate() {
            if !n.backends.contains(backend) {
                return Err(Reject::Backend(m));
            }
        }
        Ok(())
    }

    /// Every filter step, in order.
    pub(crate) fn check(&self, c: &Compiled, i: usize, occupied: bool) -> Result<Fit, Reject> {
        let n = &self.nodes[i];
        if n.status != NodeStatus::Ready {
            return Err(Reject::NotReady(n.status));
        }
        if let Some(t) = c.tier
            && n.tier != Some(t)
        {
            return Err(Reject::Tier(t, n.tier));
        }
        if occupied {
            return Err(Reject::AlreadyOnNode);
        }
        self.check_labels_and_devices(c, i)?;
        let mut missing_bytes = 0u64;
        let mut resident_models = 0u32;
        for &(model, _, bytes) in &c.models {
            if n.resident.binary_search(&model).is_ok() {
                resident_models += 1;
            } else {
                missing_bytes = missing_bytes.saturating_add(bytes);
            }
        }
        // Best fit: the accelerator with the least free memory that holds the models.
        let accel = if c.policy == AcceleratorPolicy::None || !n.gpu {
            None
        } else {
            n.accel_free
                .iter()
                .enumerate()
                .filter(|(_, free)| **free >= missing_bytes)
                .min_by_key(|(_, free)| **free)
                .map(|(a, _)| (a, missing_bytes))
        };
        let host_model_bytes = if accel.is_some() || c.policy == AcceleratorPolicy::Required {
            0
        } else {
            missing_bytes
        };
        if c.request.cpu_millis > n.free.cpu_millis {
            return Err(Reject::Cpu(c.request.cpu_millis, n.free.cpu_millis));
        }
        let memory = c.request.memory_bytes.saturating_add(host_model_bytes);
        if memory > n.free.memory_bytes {
            return Err(Reject::Memory(memory, n.free.memory_bytes));
        }
        if c.policy == AcceleratorPolicy::Required && accel.is_none() {
            let largest = n.accel_free.iter().copied().max().unwrap_or(0);
            return Err(Reject::AccelMemory(missing_bytes, largest));
        }
        Ok(Fit {
            accel,
            host_model_bytes,
            resident_models,
        })
    }

    /// The normalised score of every step but spread, indexed by [`ScoreStep::index`].
    pub(crate) fn score_parts(
        &self,
        c: &Compiled,
        i: usize,
        fit: &Fit,
        policy: LoadPolicy,
    ) -> [f64; 5] {
        let n = &self.nodes[i];
        let mut parts = [0.0; 5];
        if !c.models.is_empty() {
            parts[ScoreStep::ModelResident.index()] =
                f64::from(fit.resident_models) / c.models.len() as f64;
        }
        let share = |free: u64, used: u64, cap: u64| {
            if cap == 0 {
                0.0
            } else {
                free.saturating_sub(used) as f64 / cap as f64
            }
        };
        let free_share = (share(
            n.free.cpu_millis,
            c.request.cpu_millis,
            n.capacity.cpu_millis,
        ) + share(
            n.free.memory_bytes,
            c.request.memory_bytes.saturating_add(fit.host_model_bytes),
            n.capacity.memory_bytes,
        )) / 2.0;
        let free_share = free_share.clamp(0.0, 1.0);
        parts[ScoreStep::Load.index()] = match policy {
            LoadPolicy::LeastLoaded => free_share,
            LoadPolicy::BinPack => 1.0 - free_share,
        };
        if c.policy == AcceleratorPolicy::Preferred && fit.accel.is_some() {
            parts[ScoreStep::AcceleratorPreferred.index()] = 1.0;
        }
        if let Some(region) = c.near_region
            && n.region == region
        {
            parts[ScoreStep::EdgeProximity.index()] = if n.tier == Some(Tier::Edge) {
                1.0
            } else {
                0.75
            };
        }
        parts
    }

    /// The spread group value of a node (its spread-key label, interned).
    pub(crate) fn spread_value(&self, c: &Compiled, i: usize) -> Option<u32> {
        c.spread_col.map(|col| self.columns[col][i])
    }

    /// Places up to `job.want` replicas of a function. `job.marks[i]` says node `i` holds
    /// one ([`OCCUPIED`]) or is a last resort ([`AVOID`]: a failed replica's node);
    /// `job.staying` lists the nodes whose replicas of it stay (for spread). Changes
    /// nothing: the caller commits what it keeps.
    pub(crate) fn pass(
        &mut self,
        job: PassJob<'_>,
        config: &SchedulerConfig,
        rng: &mut SmallRng,
    ) -> PassOutcome {
        let PassJob {
            spec,
            compiled: c,
            want,
            marks,
            staying,
        } = job;
        let weights = config.weights;
        // Below any node that is not avoided, whatever the weights.
        let avoid_penalty = weights.iter().sum::<f64>() + 1.0;
        let spread_w = if c.spread_col.is_some() {
            weights[ScoreStep::Spread.index()]
        } else {
            0.0
        };
        let values = self.strings.len() + 1;
        if self.group_of_value.len() < values {
            self.group_of_value.resize(values, usize::MAX);
        }
        let mut rejects = std::mem::take(&mut self.rejects);
        rejects.clear();
        let mut groups: Vec<Vec<Cand>> = Vec::new();
        let mut group_values: Vec<usize> = Vec::new();
        for (i, &mark) in marks.iter().enumerate().take(self.nodes.len()) {
            match self.check(c, i, mark == OCCUPIED) {
                Err(r) => rejects.push((index_u32(i), r)),
                Ok(fit) => {
                    let parts = self.score_parts(c, i, &fit, config.load_policy);
                    let mut base: f64 = parts
                        .iter()
                        .zip(weights.iter())
                        .enumerate()
                        .filter(|(k, _)| *k != ScoreStep::Spread.index())
                        .map(|(_, (p, w))| p * w)
                        .sum();
                    if mark == AVOID {
                        base -= avoid_penalty;
                    }
                    let cand = Cand {
                        base,
                        tiebreak: rng.next_u64(),
                        node: index_u32(i),
                        fit,
                    };
                    let slot = self.spread_value(c, i).map_or(0, value_slot);
                    let g = &mut self.group_of_value[slot];
                    if *g == usize::MAX {
                        *g = groups.len();
                        groups.push(Vec::new());
                        group_values.push(slot);
                    }
                    groups[*g].push(cand);
                }
            }
        }
        let mut counts = vec![0u32; groups.len()];
        if c.spread_col.is_some() {
            for &node in staying {
                if let Some(v) = self.spread_value(c, node as usize) {
                    let g = self.group_of_value[value_slot(v)];
                    if g != usize::MAX {
                        counts[g] += 1;
                    }
                }
            }
        }
        for &slot in &group_values {
            self.group_of_value[slot] = usize::MAX;
        }
        let mut heaps: Vec<BinaryHeap<Cand>> = groups.into_iter().map(BinaryHeap::from).collect();
        let head = |heap: &BinaryHeap<Cand>, group: usize, count: u32| {
            heap.peek().map(|top| GroupHead {
                total: top.base + spread_w / (1.0 + f64::from(count)),
                tiebreak: top.tiebreak,
                group,
            })
        };
        let mut outer: BinaryHeap<GroupHead> = heaps
            .iter()
            .enumerate()
            .filter_map(|(g, h)| head(h, g, counts[g]))
            .collect();
        let mut chosen = Vec::with_capacity(want.min(self.nodes.len()));
        while chosen.len() < want {
            let Some(top) = outer.pop() else { break };
            let g = top.group;
            let Some(cand) = heaps[g].pop() else { continue };
            chosen.push(Chosen {
                node: cand.node,
                fit: cand.fit,
                score: top.total,
            });
            counts[g] += 1;
            if let Some(h) = head(&heaps[g], g, counts[g]) {
                outer.push(h);
            }
        }
        let rejections = if chosen.len() < want {
            rejects
                .iter()
                .map(|&(i, r)| NodeRejection {
                    node: self.snap.nodes[i as usize].id.clone(),
                    rejection: r.to_public(spec),
                })
                .collect()
        } else {
            Vec::new()
        };
        self.rejects = rejects;
        PassOutcome { chosen, rejections }
    }

    /// Takes a chosen placement out of the node's free capacity and makes the
    /// function's models resident there.
    pub(crate) fn commit(&mut self, c: &Compiled, node: u32, fit: &Fit) {
        let n = &mut self.nodes[node as usize];
        n.free.cpu_millis = n.free.cpu_millis.saturating_sub(c.request.cpu_millis);
        n.free.memory_bytes = n
            .free
            .memory_bytes
            .saturating_sub(c.request.memory_bytes.saturating_add(fit.host_model_bytes));
        if let Some((a, bytes)) = fit.accel {
            n.accel_free[a] = n.accel_free[a].saturating_sub(bytes);
        }
        for &(model, _, _) in &c.models {
            if let Err(at) = n.resident.binary_search(&model) {
                n.resident.insert(at, model);
            }
        }
    }

    /// The models of `spec` not yet resident on a node, in spec order.
    pub(crate) fn missing_models(&self, spec: &FunctionSpec, node: u32) -> Vec<ModelId> {
        let n = &self.nodes[node as usize];
        spec.models
            .iter()
            .filter(|m| {
                self.strings
                    .get(m.id.as_str())
                    .is_none_or(|id| n.resident.binary_search(id).is_err())
            })
            .map(|m| m.id.clone())
            .collect()
    }

    /// Gives a stopped replica's resources back to its node.
    pub(crate) fn release(&mut self, node: u32, resources: Resources) {
        let n = &mut self.nodes[node as usize];
        n.free.cpu_millis = n.free.cpu_millis.saturating_add(resources.cpu_millis);
        n.free.memory_bytes = n.free.memory_bytes.saturating_add(resources.memory_bytes);
    }
}

fn value_slot(v: u32) -> usize {
    if v == UNSET { 0 } else { v as usize + 1 }
}

fn index_u32(i: usize) -> u32 {
    u32::try_from(i).expect("a snapshot holds fewer than 2^32 nodes and strings")
}
