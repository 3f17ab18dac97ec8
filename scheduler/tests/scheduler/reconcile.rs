//! The reconciler: new functions, count changes, lost and draining nodes, failed
//! replicas, constraint changes, and applying plans.

use lepton_scheduler::{
    Action, ClusterSnapshot, DesiredFunction, Displacement, Error, NodeStatus, Plan, Replica,
    ReplicaState, Resources, ScaleBounds, Scheduler, StopReason, Tier,
};

use crate::{GIB, function, node};

fn cluster(n: usize) -> ClusterSnapshot {
    ClusterSnapshot::new((0..n).map(|i| node(&format!("n{i}"))).collect())
}

fn reconcile(snapshot: &ClusterSnapshot, desired: &[DesiredFunction]) -> Plan {
    Scheduler::default().reconcile(snapshot, desired).unwrap()
}

/// Reconciles, applies, and checks that a second reconcile has nothing to do.
fn converge(snapshot: &mut ClusterSnapshot, desired: &[DesiredFunction]) -> Plan {
    let plan = reconcile(snapshot, desired);
    snapshot.apply(&plan).unwrap();
    assert!(
        reconcile(snapshot, desired).is_empty(),
        "reconcile is idempotent"
    );
    plan
}

fn count(snapshot: &ClusterSnapshot, f: &str) -> usize {
    snapshot.replicas_of(f).count()
}

#[test]
fn a_new_function_gets_its_replicas_on_distinct_nodes() {
    let mut s = cluster(5);
    let plan = converge(&mut s, &[DesiredFunction::new(function("f"), 3)]);
    assert_eq!(plan.actions.len(), 3);
    assert!(plan.actions.iter().all(|a| matches!(a, Action::Place(_))));
    let mut nodes: Vec<_> = s.replicas.iter().map(|r| r.node.clone()).collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 3);
    assert!(s.replicas.iter().all(|r| r.state == ReplicaState::Pending));
    // Each node's free capacity went down by the request.
    let used: Vec<_> = s.nodes.iter().filter(|n| n.free != n.capacity).collect();
    assert_eq!(used.len(), 3);
    assert_eq!(used[0].free.cpu_millis, 4_000 - 500);
}

#[test]
fn scaling_up_and_down_adds_and_stops_replicas() {
    let mut s = cluster(5);
    converge(&mut s, &[DesiredFunction::new(function("f"), 2)]);
    let up = converge(&mut s, &[DesiredFunction::new(function("f"), 4)]);
    assert_eq!(up.actions.len(), 2);
    assert_eq!(count(&s, "f"), 4);
    let down = converge(&mut s, &[DesiredFunction::new(function("f"), 1)]);
    assert!(down.actions.iter().all(|a| matches!(
        a,
        Action::Stop {
            reason: StopReason::ScaledDown,
            ..
        }
    )));
    assert_eq!(count(&s, "f"), 1);
    assert!(s.nodes.iter().filter(|n| n.free == n.capacity).count() == 4);
}

#[test]
fn scaling_down_stops_pending_replicas_before_running_ones() {
    let mut s = cluster(3);
    converge(&mut s, &[DesiredFunction::new(function("f"), 3)]);
    for r in &mut s.replicas {
        r.state = ReplicaState::Running;
    }
    let running_node = s.replicas[1].node.clone();
    s.replicas[0].state = ReplicaState::Pending;
    s.replicas[2].state = ReplicaState::Pending;
    converge(&mut s, &[DesiredFunction::new(function("f"), 1)]);
    assert_eq!(s.replicas.len(), 1);
    assert_eq!(s.replicas[0].node, running_node);
}

#[test]
fn the_count_is_clamped_into_the_bounds() {
    let mut s = cluster(6);
    let f = function("f").with_scale(ScaleBounds::new(2, 4));
    converge(&mut s, &[DesiredFunction::new(f.clone(), 0)]);
    assert_eq!(count(&s, "f"), 2);
    converge(&mut s, &[DesiredFunction::new(f, 9)]);
    assert_eq!(count(&s, "f"), 4);
    let zero = function("f").with_scale(ScaleBounds::new(0, 4));
    converge(&mut s, &[DesiredFunction::new(zero, 0)]);
    assert_eq!(count(&s, "f"), 0);
}

#[test]
fn a_removed_function_is_stopped_and_its_resources_freed() {
    let mut s = cluster(2);
    converge(
        &mut s,
        &[
            DesiredFunction::new(function("f"), 2),
            DesiredFunction::new(function("g"), 1),
        ],
    );
    let plan = converge(&mut s, &[DesiredFunction::new(function("g"), 1)]);
    assert_eq!(plan.actions.len(), 2);
    assert!(plan.actions.iter().all(|a| matches!(
        a,
        Action::Stop {
            reason: StopReason::FunctionRemoved,
            ..
        }
    )));
    assert_eq!(count(&s, "f"), 0);
    assert_eq!(count(&s, "g"), 1);
}

#[test]
fn replicas_on_a_lost_node_move_elsewhere() {
    let mut s = cluster(3);
    converge(&mut s, &[DesiredFunction::new(function("f"), 2)]);
    let lost = s.replicas[0].node.clone();
    s.nodes.iter_mut().find(|n| n.id == lost).unwrap().status = NodeStatus::Lost;
    let plan = converge(&mut s, &[DesiredFunction::new(function("f"), 2)]);
    match &plan.actions[..] {
        [
            Action::Move {
                from,
                to,
                reason: Displacement::NodeLost,
            },
        ] => {
            assert_eq!(from, &lost);
            assert_ne!(to.node, lost);
        }
        other => panic!("expected one move, got {other:?}"),
    }
    assert!(s.replicas.iter().all(|r| r.node != lost));
    assert_eq!(count(&s, "f"), 2);
}

#[test]
fn replicas_on_an_unknown_node_move_elsewhere() {
    let mut s = cluster(2);
    s.replicas.push(Replica::new(
        "f",
        "gone",
        ReplicaState::Running,
        function("f").request,
    ));
    let plan = converge(&mut s, &[DesiredFunction::new(function("f"), 1)]);
    assert!(matches!(
        &plan.actions[..],
        [Action::Move {
            reason: Displacement::NodeUnknown,
            ..
        }]
    ));
}

#[test]
fn a_draining_node_is_emptied_when_there_is_room_and_kept_when_not() {
    let mut s = cluster(2);
    converge(&mut s, &[DesiredFunction::new(function("f"), 1)]);
    let draining = s.replicas[0].node.clone();
    s.nodes
        .iter_mut()
        .find(|n| n.id == draining)
        .unwrap()
        .status = NodeStatus::Draining;
    let plan = converge(&mut s, &[DesiredFunction::new(function("f"), 1)]);
    assert!(matches!(
        &plan.actions[..],
        [Action::Move {
            reason: Displacement::NodeDraining,
            ..
        }]
    ));
    // Now drain the other node too: nowhere to go, so the replica keeps serving.
    for n in &mut s.nodes {
        n.status = NodeStatus::Draining;
    }
    let plan = reconcile(&s, &[DesiredFunction::new(function("f"), 1)]);
    assert!(plan.is_empty());
    assert_eq!(plan.failures.len(), 1);
    assert_eq!(
        plan.failures[0].rejections[0].rejection.reason(),
        "node-draining"
    );
}

#[test]
fn a_failed_replica_is_replaced_on_another_node() {
    let mut s = cluster(2);
    converge(&mut s, &[DesiredFunction::new(function("f"), 1)]);
    let failed = s.replicas[0].node.clone();
    s.replicas[0].state = ReplicaState::Failed;
    let plan = converge(&mut s, &[DesiredFunction::new(function("f"), 1)]);
    match &plan.actions[..] {
        [
            Action::Move {
                from,
                to,
                reason: Displacement::ReplicaFailed,
            },
        ] => {
            assert_eq!(from, &failed);
            assert_ne!(to.node, failed);
        }
        other => panic!("expected one move, got {other:?}"),
    }
}

#[test]
fn a_constraint_change_moves_replicas_that_no_longer_qualify() {
    let mut s = ClusterSnapshot::new(vec![
        node("c1").with_tier(Tier::Cloud),
        node("c2").with_tier(Tier::Cloud),
        node("e1").with_tier(Tier::Edge),
        node("e2").with_tier(Tier::Edge),
    ]);
    converge(
        &mut s,
        &[DesiredFunction::new(
            function("f").with_tier(Tier::Cloud),
            2,
        )],
    );
    let plan = converge(
        &mut s,
        &[DesiredFunction::new(function("f").with_tier(Tier::Edge), 2)],
    );
    assert_eq!(plan.actions.len(), 2);
    assert!(plan.actions.iter().all(|a| matches!(
        a,
        Action::Move {
            reason: Displacement::ConstraintsChanged,
            ..
        }
    )));
    assert!(s.replicas.iter().all(|r| r.node.as_str().starts_with('e')));
    // Required constraints no node meets: the replicas stop, with the reasons reported.
    let plan = reconcile(
        &s,
        &[DesiredFunction::new(
            function("f").with_accelerator(lepton_scheduler::AcceleratorPolicy::Required),
            2,
        )],
    );
    assert_eq!(plan.actions.len(), 2);
    assert!(plan.actions.iter().all(|a| matches!(
        a,
        Action::Stop {
            reason: StopReason::Displaced(Displacement::ConstraintsChanged),
            ..
        }
    )));
    assert_eq!(plan.failures[0].rejections.len(), 4);
}

#[test]
fn displaced_replicas_beyond_the_count_are_stopped_not_moved() {
    let mut s = cluster(4);
    converge(&mut s, &[DesiredFunction::new(function("f"), 3)]);
    let lost = s.replicas[0].node.clone();
    s.nodes.iter_mut().find(|n| n.id == lost).unwrap().status = NodeStatus::Lost;
    let plan = converge(&mut s, &[DesiredFunction::new(function("f"), 2)]);
    assert!(matches!(
        &plan.actions[..],
        [Action::Stop {
            reason: StopReason::Displaced(Displacement::NodeLost),
            ..
        }]
    ));
}

#[test]
fn stops_free_room_for_placements_in_the_same_plan() {
    // One node, room for one replica: swapping functions must stop before it places.
    let mut s = ClusterSnapshot::new(vec![lepton_scheduler::Node::new(
        "n",
        Resources::new(500, GIB),
    )]);
    converge(&mut s, &[DesiredFunction::new(function("old"), 1)]);
    let plan = converge(&mut s, &[DesiredFunction::new(function("new"), 1)]);
    assert_eq!(plan.actions.len(), 2);
    assert!(plan.failures.is_empty());
    assert_eq!(count(&s, "new"), 1);
}

#[test]
fn the_same_inputs_give_the_same_plan() {
    let s = cluster(20);
    let desired: Vec<_> = (0..10)
        .map(|i| DesiredFunction::new(function(&format!("f{i}")), 3))
        .collect();
    assert_eq!(reconcile(&s, &desired), reconcile(&s, &desired));
}

#[test]
fn apply_rejects_a_plan_that_does_not_fit() {
    let mut s = cluster(1);
    let plan = reconcile(&s, &[DesiredFunction::new(function("f"), 1)]);
    let mut bigger = plan.clone();
    if let Action::Place(p) = &mut bigger.actions[0] {
        p.resources.memory_bytes = 100 * GIB;
    }
    let before = s.clone();
    let err = s.apply(&bigger).unwrap_err();
    assert_eq!(
        err,
        Error::OverCapacity {
            node: "n0".into(),
            resource: "memory"
        }
    );
    assert_eq!(s, before, "a failed apply changes nothing");
    s.apply(&plan).unwrap();
    assert!(matches!(s.apply(&plan), Err(Error::ReplicaExists { .. })));
}
