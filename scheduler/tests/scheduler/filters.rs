//! One test per filter step, plus the order of the steps and "no node fits".

use lepton_scheduler::{
    Accelerator, AcceleratorPolicy, ClusterSnapshot, DesiredFunction, Error, FilterStep,
    LabelSelector, ModelRequirement, Node, NodeStatus, Rejection, Replica, ReplicaState, Resources,
    Scheduler, Tier,
};

use crate::{GIB, MIB, explain, function, node, rejection};

#[test]
fn node_ready_filters_draining_and_lost_nodes() {
    let f = function("f");
    let r = rejection(node("n").with_status(NodeStatus::Draining), &f);
    assert_eq!(
        (r.step(), r.reason()),
        (FilterStep::NodeReady, "node-draining")
    );
    let r = rejection(node("n").with_status(NodeStatus::Lost), &f);
    assert_eq!(r.to_string(), "filtered by: node-lost");
}

#[test]
fn tier_filters_other_tiers_and_untiered_nodes() {
    let f = function("f").with_tier(Tier::Edge);
    let r = rejection(node("n").with_tier(Tier::Cloud), &f);
    assert_eq!(
        r,
        Rejection::TierMismatch {
            required: Tier::Edge,
            actual: Some(Tier::Cloud)
        }
    );
    assert_eq!(
        r.to_string(),
        "filtered by: tier-mismatch (requires `edge`, node is `cloud`)"
    );
    let r = rejection(node("n"), &f);
    assert_eq!(
        r,
        Rejection::TierMismatch {
            required: Tier::Edge,
            actual: None
        }
    );
    assert!(
        explain(vec![node("n").with_tier(Tier::Edge)], &f)[0]
            .outcome
            .is_ok()
    );
}

#[test]
fn distinct_node_filters_a_node_that_already_has_the_function() {
    let f = function("f");
    let mut snapshot = ClusterSnapshot::new(vec![node("a"), node("b")]);
    snapshot
        .replicas
        .push(Replica::new("f", "a", ReplicaState::Running, f.request));
    let verdicts = Scheduler::default().explain(&snapshot, &f).unwrap();
    assert_eq!(verdicts[0].outcome, Err(Rejection::AlreadyOnNode));
    assert!(verdicts[1].outcome.is_ok());
}

#[test]
fn labels_filter_on_every_selector() {
    let n = node("n").with_label("zone", "a").with_label("disk", "ssd");
    let ok = |s: LabelSelector| {
        explain(vec![n.clone()], &function("f").with_selector(s))[0]
            .outcome
            .is_ok()
    };
    assert!(ok(LabelSelector::is_in("zone", ["a", "b"])));
    assert!(!ok(LabelSelector::is_in("zone", ["b"])));
    assert!(ok(LabelSelector::not_in("zone", ["b"])));
    assert!(!ok(LabelSelector::not_in("disk", ["ssd"])));
    assert!(ok(LabelSelector::exists("disk")));
    assert!(!ok(LabelSelector::exists("gpu")));
    assert!(ok(LabelSelector::does_not_exist("gpu")));
    let f = function("f")
        .with_selector(LabelSelector::exists("zone"))
        .with_selector(LabelSelector::is_in("disk", ["hdd"]));
    let r = rejection(n, &f);
    assert_eq!(r, Rejection::LabelMismatch { key: "disk".into() });
    assert_eq!(
        r.to_string(),
        "filtered by: label-mismatch (selector on `disk`)"
    );
}

#[test]
fn accelerator_required_filters_cpu_nodes() {
    let f = function("f").with_accelerator(AcceleratorPolicy::Required);
    assert_eq!(rejection(node("cpu"), &f), Rejection::NoAccelerator);
    let gpu = node("gpu").with_accelerator(Accelerator::new("nvidia-l4", 24 * GIB));
    assert!(explain(vec![gpu], &f)[0].outcome.is_ok());
    // Preferred and none never filter on it.
    let f = function("f").with_accelerator(AcceleratorPolicy::Preferred);
    assert!(explain(vec![node("cpu")], &f)[0].outcome.is_ok());
}

#[test]
fn nn_backend_filters_nodes_without_a_models_backend() {
    let f = function("f").with_model(ModelRequirement::new("llm", "ggml", GIB));
    let r = rejection(node("n"), &f);
    assert_eq!(
        r,
        Rejection::MissingBackend {
            backend: "ggml".into()
        }
    );
    assert_eq!(r.to_string(), "filtered by: missing-nn-backend (`ggml`)");
    assert!(
        explain(vec![node("n").with_backend("ggml")], &f)[0]
            .outcome
            .is_ok()
    );
}

#[test]
fn resources_filter_insufficient_cpu_and_memory() {
    let big_cpu = lepton_scheduler::FunctionSpec::new("f", Resources::new(5_000, MIB));
    assert_eq!(
        rejection(node("n"), &big_cpu),
        Rejection::InsufficientCpu {
            requested: 5_000,
            free: 4_000
        }
    );
    let big_mem = lepton_scheduler::FunctionSpec::new("f", Resources::new(100, 9 * GIB));
    let r = rejection(node("n"), &big_mem);
    assert_eq!(
        r,
        Rejection::InsufficientMemory {
            requested: 9 * GIB,
            free: 8 * GIB
        }
    );
    assert_eq!(
        r.to_string(),
        format!(
            "filtered by: insufficient-memory (requested {} bytes, {} free)",
            9 * GIB,
            8 * GIB
        )
    );
    // The free amount counts, not the capacity.
    let busy = node("n").with_free(Resources::new(4_000, 100 * MIB));
    assert_eq!(
        rejection(busy, &function("f")).reason(),
        "insufficient-memory"
    );
}

#[test]
fn models_on_the_cpu_need_host_memory_unless_resident() {
    // 256 MiB request + 8 GiB model does not fit in 8 GiB of host memory...
    let f = function("f").with_model(ModelRequirement::new("llm", "onnx", 8 * GIB));
    assert_eq!(rejection(node("n"), &f).reason(), "insufficient-memory");
    // ...unless the model is already resident (loaded once per node, shared).
    assert!(
        explain(vec![node("n").with_resident_model("llm")], &f)[0]
            .outcome
            .is_ok()
    );
    // With an accelerator preferred and room on it, the model goes there instead.
    let f = f.with_accelerator(AcceleratorPolicy::Preferred);
    let gpu = node("n").with_accelerator(Accelerator::new("nvidia-l4", 24 * GIB));
    assert!(explain(vec![gpu], &f)[0].outcome.is_ok());
}

#[test]
fn accelerator_memory_filters_when_models_do_not_fit_on_any_accelerator() {
    let f = function("f")
        .with_model(ModelRequirement::new("llm", "onnx", 30 * GIB))
        .with_accelerator(AcceleratorPolicy::Required);
    let n = node("n")
        .with_accelerator(Accelerator::new("nvidia-l4", 24 * GIB))
        .with_accelerator(Accelerator::new("nvidia-t4", 16 * GIB));
    let r = rejection(n.clone(), &f);
    assert_eq!(
        r,
        Rejection::InsufficientAcceleratorMemory {
            requested: 30 * GIB,
            largest_free: 24 * GIB
        }
    );
    assert_eq!(r.step(), FilterStep::AcceleratorMemory);
    assert!(
        explain(vec![n.with_resident_model("llm")], &f)[0]
            .outcome
            .is_ok()
    );
}

#[test]
fn the_cheapest_failing_step_is_the_one_recorded() {
    let f = lepton_scheduler::FunctionSpec::new("f", Resources::new(50_000, 50 * GIB))
        .with_tier(Tier::Cloud);
    let n = node("n")
        .with_tier(Tier::Edge)
        .with_status(NodeStatus::Lost);
    assert_eq!(rejection(n.clone(), &f).step(), FilterStep::NodeReady);
    assert_eq!(
        rejection(n.with_status(NodeStatus::Ready), &f).step(),
        FilterStep::Tier
    );
    let steps: Vec<_> = FilterStep::ALL.iter().map(|s| s.name()).collect();
    assert_eq!(
        steps,
        [
            "node-ready",
            "tier",
            "distinct-node",
            "labels",
            "accelerator",
            "nn-backend",
            "resources",
            "accelerator-memory"
        ]
    );
}

#[test]
fn no_node_fits_is_a_failure_with_every_reason_not_an_error() {
    let nodes = vec![
        node("small").with_free(Resources::new(100, GIB)),
        node("gone").with_status(NodeStatus::Lost),
        node("cloud").with_tier(Tier::Cloud),
    ];
    let f = function("f").with_tier(Tier::Edge);
    let plan = Scheduler::default()
        .reconcile(&ClusterSnapshot::new(nodes), &[DesiredFunction::new(f, 2)])
        .unwrap();
    assert!(plan.is_empty());
    let failure = &plan.failures[0];
    assert_eq!((failure.wanted, failure.placed), (2, 0));
    let text = failure.to_string();
    assert_eq!(
        text,
        "function `f`: placed 0 of 2 replicas\n  \
         node `small`: filtered by: tier-mismatch (requires `edge`, node is `none`)\n  \
         node `gone`: filtered by: node-lost\n  \
         node `cloud`: filtered by: tier-mismatch (requires `edge`, node is `cloud`)"
    );
}

#[test]
fn bad_input_is_an_error() {
    let s = Scheduler::default();
    let dup_nodes = ClusterSnapshot::new(vec![node("a"), node("a")]);
    assert_eq!(
        s.reconcile(&dup_nodes, &[]),
        Err(Error::DuplicateNode { node: "a".into() })
    );
    let ok = ClusterSnapshot::new(vec![node("a")]);
    let twice = [
        DesiredFunction::new(function("f"), 1),
        DesiredFunction::new(function("f"), 1),
    ];
    assert_eq!(
        s.reconcile(&ok, &twice),
        Err(Error::DuplicateFunction {
            function: "f".into()
        })
    );
    let bad = function("f").with_scale(lepton_scheduler::ScaleBounds::new(3, 1));
    let err = s
        .reconcile(&ok, &[DesiredFunction::new(bad, 1)])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "function `f` has min replicas 3 above max 1"
    );
    let mut dup_replica = ok;
    let r = Replica::new("f", "a", ReplicaState::Running, Resources::default());
    dup_replica.replicas = vec![r.clone(), r];
    assert!(matches!(
        s.reconcile(&dup_replica, &[]),
        Err(Error::DuplicateReplica { .. })
    ));
}

#[test]
fn a_lost_node_is_never_a_candidate_even_when_it_is_the_emptiest() {
    let nodes: Vec<Node> = vec![
        node("full").with_free(Resources::new(600, GIB)),
        Node::new("huge", Resources::new(64_000, 512 * GIB)).with_status(NodeStatus::Lost),
    ];
    let plan = Scheduler::default()
        .reconcile(
            &ClusterSnapshot::new(nodes),
            &[DesiredFunction::new(function("f"), 2)],
        )
        .unwrap();
    let placed: Vec<_> = plan.placements().map(|p| p.node.as_str()).collect();
    assert_eq!(placed, ["full"]);
    assert_eq!(plan.failures[0].placed, 1);
}
