//! One test per score step, plus weights and seeded tie-breaking.

use std::collections::BTreeSet;

use lepton_scheduler::{
    Accelerator, AcceleratorPolicy, ClusterSnapshot, DesiredFunction, LoadPolicy, ModelRequirement,
    Plan, Resources, Scheduler, SchedulerConfig, ScoreStep, Tier,
};

use crate::{GIB, function, node, step_score};

fn place(
    nodes: Vec<lepton_scheduler::Node>,
    desired: &[DesiredFunction],
    config: SchedulerConfig,
) -> Plan {
    Scheduler::new(config)
        .reconcile(&ClusterSnapshot::new(nodes), desired)
        .unwrap()
}

fn nodes_of(plan: &Plan) -> Vec<&str> {
    plan.placements().map(|p| p.node.as_str()).collect()
}

#[test]
fn model_resident_prefers_the_node_that_has_the_model() {
    let f = function("f").with_model(ModelRequirement::new("digits", "onnx", GIB));
    assert_eq!(
        step_score(
            node("n").with_resident_model("digits"),
            &f,
            ScoreStep::ModelResident
        ),
        1.0
    );
    assert_eq!(step_score(node("n"), &f, ScoreStep::ModelResident), 0.0);
    // It beats an emptier node.
    let nodes = vec![
        node("empty"),
        node("warm")
            .with_resident_model("digits")
            .with_free(Resources::new(1_000, 2 * GIB)),
    ];
    let plan = place(
        nodes,
        &[DesiredFunction::new(f, 1)],
        SchedulerConfig::default(),
    );
    assert_eq!(nodes_of(&plan), ["warm"]);
    assert!(plan.placements().next().unwrap().load_models.is_empty());
}

#[test]
fn load_policy_least_loaded_spreads_and_bin_pack_packs() {
    let nodes = || {
        vec![
            node("busy").with_free(Resources::new(1_000, 2 * GIB)),
            node("idle"),
        ]
    };
    let f = || [DesiredFunction::new(function("f"), 1)];
    let least = place(nodes(), &f(), SchedulerConfig::default());
    assert_eq!(nodes_of(&least), ["idle"]);
    let packed = place(
        nodes(),
        &f(),
        SchedulerConfig::default().with_load_policy(LoadPolicy::BinPack),
    );
    assert_eq!(nodes_of(&packed), ["busy"]);
    let s = step_score(node("n"), &function("f"), ScoreStep::Load);
    assert!((0.0..=1.0).contains(&s) && s > 0.8, "{s}");
}

#[test]
fn spread_puts_one_replica_in_each_group_first() {
    // Region a has the two emptiest nodes; spread still sends one replica to each region.
    let nodes = vec![
        node("a1").with_region("a"),
        node("a2").with_region("a"),
        node("b1")
            .with_region("b")
            .with_free(Resources::new(1_000, 2 * GIB)),
        node("c1")
            .with_region("c")
            .with_free(Resources::new(1_000, 2 * GIB)),
    ];
    let f = function("f").with_spread_key("region");
    let plan = place(
        nodes.clone(),
        &[DesiredFunction::new(f, 3)],
        SchedulerConfig::default(),
    );
    let got: BTreeSet<_> = nodes_of(&plan).into_iter().map(|n| &n[..1]).collect();
    assert_eq!(got, BTreeSet::from(["a", "b", "c"]));
    // Without a spread key, load wins: both emptiest nodes in region a are taken.
    let plan = place(
        nodes,
        &[DesiredFunction::new(function("f"), 2)],
        SchedulerConfig::default(),
    );
    let mut got = nodes_of(&plan);
    got.sort_unstable();
    assert_eq!(got, ["a1", "a2"]);
}

#[test]
fn spread_counts_replicas_that_already_run() {
    let nodes = vec![
        node("a1").with_region("a"),
        node("a2").with_region("a"),
        node("b1").with_region("b"),
    ];
    let mut snapshot = ClusterSnapshot::new(nodes);
    let f = function("f").with_spread_key("region");
    let first = Scheduler::default()
        .reconcile(&snapshot, &[DesiredFunction::new(f.clone(), 1)])
        .unwrap();
    snapshot.apply(&first).unwrap();
    let second = Scheduler::default()
        .reconcile(&snapshot, &[DesiredFunction::new(f.clone(), 2)])
        .unwrap();
    let regions: BTreeSet<_> = first
        .placements()
        .chain(second.placements())
        .map(|p| &p.node.as_str()[..1])
        .collect();
    assert_eq!(
        regions.len(),
        2,
        "the second replica goes to the other region"
    );
    // explain shows the spread score of a node whose region already has one.
    snapshot.apply(&second).unwrap();
    let verdicts = Scheduler::default().explain(&snapshot, &f).unwrap();
    let free = verdicts.iter().find(|v| v.outcome.is_ok()).unwrap();
    assert_eq!(free.outcome.as_ref().unwrap().step(ScoreStep::Spread), 0.5);
}

#[test]
fn accelerator_preferred_prefers_a_node_where_the_models_fit_on_an_accelerator() {
    let f = function("f")
        .with_model(ModelRequirement::new("m", "onnx", 2 * GIB))
        .with_accelerator(AcceleratorPolicy::Preferred);
    let gpu = node("gpu")
        .with_accelerator(Accelerator::new("nvidia-l4", 24 * GIB))
        .with_free(Resources::new(1_000, 4 * GIB));
    assert_eq!(
        step_score(gpu.clone(), &f, ScoreStep::AcceleratorPreferred),
        1.0
    );
    assert_eq!(
        step_score(node("cpu"), &f, ScoreStep::AcceleratorPreferred),
        0.0
    );
    let plan = place(
        vec![node("cpu"), gpu.clone()],
        &[DesiredFunction::new(f.clone(), 1)],
        SchedulerConfig::default(),
    );
    assert_eq!(nodes_of(&plan), ["gpu"]);
    let p = plan.placements().next().unwrap();
    assert_eq!(p.accelerator.map(|a| a.memory_bytes), Some(2 * GIB));
    assert_eq!(p.host_model_bytes, 0);
    // A full accelerator does not count.
    let mut full = gpu;
    full.accelerators[0].free_memory_bytes = GIB;
    assert_eq!(step_score(full, &f, ScoreStep::AcceleratorPreferred), 0.0);
    // With no accelerator use, the GPU node gets nothing for it.
    let none = f.with_accelerator(AcceleratorPolicy::None);
    let gpu = node("gpu").with_accelerator(Accelerator::new("nvidia-l4", 24 * GIB));
    assert_eq!(step_score(gpu, &none, ScoreStep::AcceleratorPreferred), 0.0);
}

#[test]
fn edge_proximity_ranks_edge_in_region_then_cloud_in_region() {
    let f = function("f").with_near_region("eu-west");
    let edge = node("e").with_tier(Tier::Edge).with_region("eu-west");
    let cloud = node("c").with_tier(Tier::Cloud).with_region("eu-west");
    let far = node("f").with_tier(Tier::Edge).with_region("us-east");
    assert_eq!(step_score(edge.clone(), &f, ScoreStep::EdgeProximity), 1.0);
    assert_eq!(
        step_score(cloud.clone(), &f, ScoreStep::EdgeProximity),
        0.75
    );
    assert_eq!(step_score(far.clone(), &f, ScoreStep::EdgeProximity), 0.0);
    let plan = place(
        vec![far, cloud, edge],
        &[DesiredFunction::new(f, 2)],
        SchedulerConfig::default(),
    );
    assert_eq!(nodes_of(&plan), ["e", "c"]);
}

#[test]
fn every_step_score_is_normalised_and_the_total_is_weighted() {
    let f = function("f")
        .with_model(ModelRequirement::new("m", "onnx", GIB))
        .with_accelerator(AcceleratorPolicy::Preferred)
        .with_near_region("r")
        .with_spread_key("region");
    let n = node("n")
        .with_tier(Tier::Edge)
        .with_region("r")
        .with_resident_model("m")
        .with_accelerator(Accelerator::new("a", 8 * GIB));
    let config = SchedulerConfig::default();
    let verdict = Scheduler::new(config.clone())
        .explain(&ClusterSnapshot::new(vec![n]), &f)
        .unwrap()
        .pop()
        .unwrap();
    let score = verdict.outcome.unwrap();
    let mut total = 0.0;
    for (step, value) in &score.steps {
        assert!((0.0..=1.0).contains(value), "{step}: {value}");
        total += value * config.weight(*step);
    }
    assert!((total - score.total).abs() < 1e-9);
    assert_eq!(score.steps.len(), ScoreStep::ALL.len());
}

#[test]
fn a_zero_weight_turns_a_step_off() {
    let nodes = vec![
        node("busy").with_free(Resources::new(1_000, 2 * GIB)),
        node("idle"),
    ];
    let f = function("f").with_model(ModelRequirement::new("m", "onnx", GIB));
    let mut nodes = nodes;
    nodes[0].resident_models.insert("m".into());
    let off = SchedulerConfig::default().with_weight(ScoreStep::ModelResident, 0.0);
    assert_eq!(
        nodes_of(&place(
            nodes.clone(),
            &[DesiredFunction::new(f.clone(), 1)],
            off
        )),
        ["idle"]
    );
    assert_eq!(
        nodes_of(&place(
            nodes,
            &[DesiredFunction::new(f, 1)],
            SchedulerConfig::default()
        )),
        ["busy"]
    );
}

#[test]
fn ties_are_broken_by_the_seed_deterministically() {
    let nodes: Vec<_> = (0..8).map(|i| node(&format!("n{i}"))).collect();
    let desired = [DesiredFunction::new(function("f"), 1)];
    let pick = |seed| {
        nodes_of(&place(
            nodes.clone(),
            &desired,
            SchedulerConfig::default().with_seed(seed),
        ))[0]
            .to_owned()
    };
    assert_eq!(pick(1), pick(1), "same seed, same node");
    let picks: BTreeSet<_> = (0..32).map(pick).collect();
    assert!(picks.len() > 1, "different seeds spread ties: {picks:?}");
}
