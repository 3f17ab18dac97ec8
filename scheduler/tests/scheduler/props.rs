//! Property tests of the scheduler's invariants over random clusters and desired states:
//! never over a node's capacity, required constraints always hold, lost and draining
//! nodes never receive replicas, and reconcile is idempotent.

use std::collections::HashMap;

use proptest::prelude::*;

use lepton_scheduler::{
    Accelerator, AcceleratorPolicy, ClusterSnapshot, DesiredFunction, FunctionSpec, LabelSelector,
    LoadPolicy, ModelRequirement, Node, NodeStatus, Plan, ReplicaState, Resources, ScaleBounds,
    Scheduler, SchedulerConfig, Tier,
};

use crate::{GIB, MIB};

const REGIONS: [&str; 3] = ["r0", "r1", "r2"];
const MODELS: [&str; 3] = ["m0", "m1", "m2"];

fn arb_node(i: usize) -> impl Strategy<Value = Node> {
    (
        any::<bool>(),
        0..REGIONS.len(),
        1_000u64..8_000,
        1u64..16,
        prop::option::of(4u64..40),
        any::<bool>(),
        prop::collection::vec(any::<bool>(), MODELS.len()),
    )
        .prop_map(
            move |(edge, region, cpu, mem_gib, accel_gib, onnx, resident)| {
                let mut n = Node::new(format!("n{i}"), Resources::new(cpu, mem_gib * GIB))
                    .with_tier(if edge { Tier::Edge } else { Tier::Cloud })
                    .with_region(REGIONS[region]);
                if let Some(g) = accel_gib {
                    n = n.with_accelerator(Accelerator::new("gpu", g * GIB));
                }
                if onnx {
                    n = n.with_backend("onnx");
                }
                for (m, r) in MODELS.iter().zip(resident) {
                    if r {
                        n = n.with_resident_model(*m);
                    }
                }
                n
            },
        )
}

fn arb_nodes() -> impl Strategy<Value = Vec<Node>> {
    (1usize..10).prop_flat_map(|n| (0..n).map(arb_node).collect::<Vec<_>>())
}

fn arb_function(i: usize) -> impl Strategy<Value = DesiredFunction> {
    (
        100u64..3_000,
        128u64..4_096,
        prop::collection::vec((0..MODELS.len(), 1u64..12), 0..3),
        prop_oneof![
            Just(AcceleratorPolicy::None),
            Just(AcceleratorPolicy::Preferred),
            Just(AcceleratorPolicy::Required)
        ],
        prop::option::of(any::<bool>()),
        prop::option::of(0..REGIONS.len()),
        any::<bool>(),
        prop::option::of(0..REGIONS.len()),
        (0u32..3, 0u32..5),
        0u32..9,
    )
        .prop_map(
            move |(
                cpu,
                mem_mib,
                models,
                accel,
                tier,
                selector,
                spread,
                near,
                (min, extra),
                replicas,
            )| {
                let mut spec =
                    FunctionSpec::new(format!("f{i}"), Resources::new(cpu, mem_mib * MIB))
                        .with_accelerator(accel)
                        .with_scale(ScaleBounds::new(min, min + extra));
                let mut seen = Vec::new();
                for (m, gib) in models {
                    if !seen.contains(&m) {
                        seen.push(m);
                        spec = spec.with_model(ModelRequirement::new(MODELS[m], "onnx", gib * GIB));
                    }
                }
                if let Some(edge) = tier {
                    spec = spec.with_tier(if edge { Tier::Edge } else { Tier::Cloud });
                }
                if let Some(r) = selector {
                    spec = spec.with_selector(LabelSelector::not_in("region", [REGIONS[r]]));
                }
                if spread {
                    spec = spec.with_spread_key("region");
                }
                if let Some(r) = near {
                    spec = spec.with_near_region(REGIONS[r]);
                }
                DesiredFunction::new(spec, replicas)
            },
        )
}

fn arb_desired() -> impl Strategy<Value = Vec<DesiredFunction>> {
    (0usize..6).prop_flat_map(|n| (0..n).map(arb_function).collect::<Vec<_>>())
}

/// What happens to the cluster between the two reconciles.
#[derive(Debug, Clone)]
struct Churn {
    statuses: Vec<u8>,
    failed: Vec<bool>,
    new_counts: Vec<Option<u32>>,
    flip_tier: Vec<bool>,
}

fn arb_churn() -> impl Strategy<Value = Churn> {
    (
        prop::collection::vec(0u8..8, 10),
        prop::collection::vec(prop::bool::weighted(0.1), 64),
        prop::collection::vec(prop::option::of(0u32..9), 6),
        prop::collection::vec(prop::bool::weighted(0.2), 6),
    )
        .prop_map(|(statuses, failed, new_counts, flip_tier)| Churn {
            statuses,
            failed,
            new_counts,
            flip_tier,
        })
}

fn churn(snapshot: &mut ClusterSnapshot, desired: &mut [DesiredFunction], c: &Churn) {
    for (n, s) in snapshot.nodes.iter_mut().zip(&c.statuses) {
        n.status = match s {
            0 => NodeStatus::Lost,
            1 => NodeStatus::Draining,
            _ => NodeStatus::Ready,
        };
    }
    for (r, f) in snapshot.replicas.iter_mut().zip(&c.failed) {
        if *f {
            r.state = ReplicaState::Failed;
        }
    }
    for (i, d) in desired.iter_mut().enumerate() {
        if let Some(Some(n)) = c.new_counts.get(i) {
            d.replicas = *n;
        }
        if c.flip_tier.get(i).copied().unwrap_or(false) {
            d.spec.placement.tier = match d.spec.placement.tier {
                Some(Tier::Edge) => Some(Tier::Cloud),
                Some(Tier::Cloud) => None,
                None => Some(Tier::Edge),
            };
        }
    }
}

/// Whether `node` meets the required constraints of `spec` (checked independently of
/// the scheduler's own filters).
fn meets_required(node: &Node, spec: &FunctionSpec) -> Result<(), String> {
    if node.status != NodeStatus::Ready {
        return Err(format!("node `{}` is {}", node.id, node.status.as_str()));
    }
    if let Some(t) = spec.placement.tier
        && node.tier() != Some(t)
    {
        return Err(format!("node `{}` is not {t:?}", node.id));
    }
    for s in &spec.placement.selectors {
        if !s.matches(node.labels.get(&s.key).map(String::as_str)) {
            return Err(format!("node `{}` fails selector on `{}`", node.id, s.key));
        }
    }
    if spec.placement.accelerator == AcceleratorPolicy::Required && node.accelerators.is_empty() {
        return Err(format!("node `{}` has no accelerator", node.id));
    }
    for m in &spec.models {
        if !node.backends.contains(&m.backend) {
            return Err(format!("node `{}` lacks backend `{}`", node.id, m.backend));
        }
    }
    Ok(())
}

/// Checks a plan against the snapshot it was computed from.
fn check_plan(
    before: &ClusterSnapshot,
    desired: &[DesiredFunction],
    plan: &Plan,
) -> Result<(), TestCaseError> {
    let specs: HashMap<_, _> = desired
        .iter()
        .map(|d| (d.spec.id.clone(), &d.spec))
        .collect();
    for p in plan.placements() {
        let node = before
            .node(p.node.as_str())
            .ok_or_else(|| TestCaseError::fail("unknown node"))?;
        prop_assert!(
            node.status != NodeStatus::Lost,
            "lost node `{}` received `{}`",
            node.id,
            p.function
        );
        let spec = specs[&p.function];
        if let Err(why) = meets_required(node, spec) {
            return Err(TestCaseError::fail(format!(
                "`{}` placed against its constraints: {why}",
                p.function
            )));
        }
    }
    Ok(())
}

/// Checks a snapshot (as applied) never has a node over its capacity.
fn check_capacity(after: &ClusterSnapshot) -> Result<(), TestCaseError> {
    for n in &after.nodes {
        let (cpu, mem) = after
            .replicas
            .iter()
            .filter(|r| r.node == n.id)
            .fold((0, 0), |(c, m), r| {
                (c + r.resources.cpu_millis, m + r.resources.memory_bytes)
            });
        prop_assert!(
            cpu <= n.capacity.cpu_millis,
            "node `{}` over cpu: {cpu} > {}",
            n.id,
            n.capacity.cpu_millis
        );
        prop_assert!(
            mem <= n.capacity.memory_bytes,
            "node `{}` over memory",
            n.id
        );
        prop_assert!(
            n.free.cpu_millis <= n.capacity.cpu_millis
                && n.free.memory_bytes <= n.capacity.memory_bytes
        );
        for a in &n.accelerators {
            prop_assert!(a.free_memory_bytes <= a.memory_bytes);
        }
    }
    Ok(())
}

fn run_round(
    scheduler: &Scheduler,
    snapshot: &mut ClusterSnapshot,
    desired: &[DesiredFunction],
) -> Result<Plan, TestCaseError> {
    let plan = scheduler
        .reconcile(snapshot, desired)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    check_plan(snapshot, desired, &plan)?;
    prop_assert_eq!(
        &plan,
        &scheduler.reconcile(snapshot, desired).expect("valid"),
        "deterministic"
    );
    snapshot
        .apply(&plan)
        .map_err(|e| TestCaseError::fail(format!("apply: {e}")))?;
    check_capacity(snapshot)?;
    // Every function has its clamped count unless the plan says it fell short.
    for d in desired {
        if !plan.failures.iter().any(|f| f.function == d.spec.id) {
            prop_assert_eq!(
                snapshot.replicas_of(d.spec.id.as_str()).count(),
                d.spec.scale.clamp(d.replicas) as usize,
                "function `{}`",
                d.spec.id
            );
        }
    }
    // Idempotent: the applied plan leaves nothing to do.
    let again = scheduler.reconcile(snapshot, desired).expect("valid");
    prop_assert!(
        again.is_empty(),
        "second reconcile not empty: {:?}",
        again.actions
    );
    Ok(plan)
}

proptest! {
    #[test]
    fn invariants_hold_through_placement_and_churn(
        nodes in arb_nodes(),
        mut desired in arb_desired(),
        c in arb_churn(),
        seed in any::<u64>(),
        bin_pack in any::<bool>(),
    ) {
        let policy = if bin_pack { LoadPolicy::BinPack } else { LoadPolicy::LeastLoaded };
        let scheduler = Scheduler::new(SchedulerConfig::default().with_seed(seed).with_load_policy(policy));
        let mut snapshot = ClusterSnapshot::new(nodes);
        run_round(&scheduler, &mut snapshot, &desired)?;
        churn(&mut snapshot, &mut desired, &c);
        run_round(&scheduler, &mut snapshot, &desired)?;
        // After the churn no replica is left on a lost node, or breaking constraints
        // (draining nodes may keep replicas that have nowhere to go).
        for r in &snapshot.replicas {
            let node = snapshot.node(r.node.as_str()).expect("replicas are on known nodes");
            prop_assert!(node.status != NodeStatus::Lost, "replica of `{}` left on lost node", r.function);
            if node.status == NodeStatus::Ready {
                let spec = &desired.iter().find(|d| d.spec.id == r.function).expect("desired").spec;
                prop_assert!(meets_required(node, spec).is_ok(), "replica of `{}` breaks constraints", r.function);
            }
        }
    }

    #[test]
    fn a_function_no_node_fits_fails_with_a_reason_per_node(nodes in arb_nodes()) {
        // Asks for more CPU than any generated node has.
        let spec = FunctionSpec::new("huge", Resources::new(9_000, GIB));
        let n = nodes.len();
        let plan = Scheduler::default()
            .reconcile(&ClusterSnapshot::new(nodes), &[DesiredFunction::new(spec, 1)])
            .expect("valid input");
        prop_assert!(plan.is_empty());
        prop_assert_eq!(plan.failures.len(), 1);
        prop_assert_eq!(plan.failures[0].rejections.len(), n);
    }
}
