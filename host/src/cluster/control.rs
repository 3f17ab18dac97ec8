//! `lepton control`: the control plane.
//!
//! It holds the leader lease (a KV create, renewed by compare-and-set; a standby
//! waits for it to expire), keeps apps in its own [`Node`]'s store (so a version is
//! loaded and checked exactly as `lepton up` would before it is accepted; nothing is
//! served from here) and mirrors every change into `lepton_apps`, blobs first. At
//! takeover it makes its store what `lepton_apps` says. Every 250 ms, and at once on
//! a change, it builds a [`ClusterSnapshot`] from the heartbeats and its placements,
//! asks the autoscaler how many replicas each function wants, calls
//! [`Scheduler::reconcile`] and writes the placements that changed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt as _;
use lepton_scheduler as sched;
use serde::Serialize;
use tokio::sync::Notify;

use super::bus::{
    self, ACTIVATE_SUBJECT, AppEntry, Heartbeat, LEASE_TTL, Lease, NODE_LOST_AFTER, PlacementEntry,
    Store,
};
use crate::locked::{AcceleratorUse, Name, Scale, Target};
use crate::node::Node;
use crate::node::store::StoredVersion;

/// Memory the scheduler reserves on a node per replica (an instance's typical
/// footprint, not its cap: a pool of instances is sized by the node, not per replica).
const REPLICA_MEMORY: u64 = 64 << 20;
/// Nodes lost this long ago are no longer shown.
const FORGET_LOST_AFTER: Duration = Duration::from_secs(60);
/// How often the control plane reconciles without being asked.
const RECONCILE_EVERY: Duration = Duration::from_millis(250);
/// How long a deploy waits for its replicas to serve before it answers anyway.
const DEPLOY_WAIT: Duration = Duration::from_secs(60);

struct Seen {
    beat: Heartbeat,
    /// When this leader last received a new heartbeat from the node.
    at: Instant,
    /// The heartbeat's revision in `lepton_nodes`: one delivered again (after a
    /// watch is made anew) does not count as a sign of life.
    revision: u64,
}

#[derive(Default)]
struct Scaling {
    window: sched::SampleWindow,
    state: sched::ScaleState,
    activated: Option<Instant>,
}

#[derive(Serialize, Clone)]
struct Unplaced {
    wanted: u32,
    rejections: Vec<(String, String)>,
}

/// Holds the lease until the process ends.
#[derive(Clone)]
pub struct Leadership {
    store: kv::Store,
    holder: String,
    revision: Arc<std::sync::atomic::AtomicU64>,
    value: Bytes,
    /// When the lease was last made or renewed (when the request went out).
    renewed: Arc<Mutex<Instant>>,
    /// Times the lease was taken again after it expired.
    epoch: Arc<std::sync::atomic::AtomicU64>,
}

impl Leadership {
    /// Waits until this process holds the lease (logging who holds it meanwhile).
    pub async fn acquire(store: &Store, holder: &str, admin: &str) -> anyhow::Result<Self> {
        let value = Bytes::from(serde_json::to_vec(&Lease {
            holder: holder.to_owned(),
            admin: admin.to_owned(),
        })?);
        let mut told = None;
        loop {
            let sent = Instant::now();
            match store.leader.create("leader", value.clone()).await {
                Ok(revision) => {
                    tracing::info!(holder, "leading the cluster");
                    return Ok(Self {
                        store: store.leader.clone(),
                        holder: holder.to_owned(),
                        revision: Arc::new(revision.into()),
                        value,
                        renewed: Arc::new(Mutex::new(sent)),
                        epoch: Arc::new(0.into()),
                    });
                }
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                    let current = store
                        .leader
                        .get("leader")
                        .await
                        .ok()
                        .flatten()
                        .and_then(|v| bus::parse_record::<Lease>(bus::LEADER, "leader", &v));
                    let name = current.map(|l| format!("{} ({})", l.holder, l.admin));
                    if told != name {
                        tracing::info!(
                            "standby: the lease is held by {}; taking over when it expires",
                            name.as_deref().unwrap_or("another control plane")
                        );
                        told = name;
                    }
                }
                Err(error) => tracing::warn!("acquiring the lease: {error}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Whether the lease is held now: renewed within its lifetime. While it is not
    /// (NATS unreachable, renewals failing), the leader changes nothing.
    pub fn is_current(&self) -> bool {
        // A margin: the server counts the lease from when it got the renewal, which
        // is after this process sent it.
        lock(&self.renewed).elapsed() < LEASE_TTL.saturating_sub(Duration::from_millis(500))
    }

    /// How many times the lease was taken again after it had expired: state read
    /// before then may be stale.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Renews the lease every third of its lifetime, from the moment it is held;
    /// returns when another process holds it, and the caller must stop at once. A
    /// leader cut off from NATS pauses ([`Leadership::is_current`]) and goes on when
    /// its renewals go through again with its own revision.
    pub async fn keep(self) -> anyhow::Error {
        use std::sync::atomic::Ordering;
        let mut tick = tokio::time::interval(LEASE_TTL / 3);
        let mut paused = false;
        loop {
            tick.tick().await;
            let revision = self.revision.load(Ordering::Acquire);
            let sent = Instant::now();
            let renewal = tokio::time::timeout(
                LEASE_TTL / 3,
                self.store.update("leader", self.value.clone(), revision),
            )
            .await;
            match renewal {
                Ok(Ok(next)) => {
                    self.revision.store(next, Ordering::Release);
                    *lock(&self.renewed) = sent;
                    if std::mem::take(&mut paused) {
                        tracing::info!("the lease is renewed again: leading");
                    }
                    continue;
                }
                Ok(Err(error)) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // A renewal that went through but whose answer was lost moved the
                    // revision on: still ours if the entry names us.
                    match self.store.entry("leader").await {
                        Ok(Some(entry))
                            if entry.operation == kv::Operation::Put
                                && entry.value == self.value =>
                        {
                            // Ours: a renewal went through. Renew again at once with
                            // the revision it made, rather than count it as renewed now.
                            self.revision.store(entry.revision, Ordering::Release);
                            tick.reset_immediately();
                            continue;
                        }
                        Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                            return anyhow::anyhow!(
                                "lost the leader lease (`{}` no longer holds it)",
                                self.holder
                            );
                        }
                        // Expired while NATS was away, and nobody took it: take it again.
                        Ok(_) => match self.store.create("leader", self.value.clone()).await {
                            Ok(next) => {
                                self.revision.store(next, Ordering::Release);
                                *lock(&self.renewed) = sent;
                                self.epoch.fetch_add(1, Ordering::AcqRel);
                                paused = false;
                                tracing::info!("the lease had expired; holding it again");
                                continue;
                            }
                            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                                return anyhow::anyhow!(
                                    "lost the leader lease (`{}` no longer holds it)",
                                    self.holder
                                );
                            }
                            Err(error) => tracing::warn!("taking the lease again: {error}"),
                        },
                        Err(error) => tracing::warn!("reading the lease: {error}"),
                    }
                }
                Ok(Err(error)) => tracing::warn!("renewing the lease: {error}"),
                Err(_) => tracing::warn!("renewing the lease: no answer"),
            }
            if !self.is_current() && !paused {
                paused = true;
                tracing::warn!(
                    "could not renew the leader lease for {LEASE_TTL:?}: changing nothing until it is renewed"
                );
            }
        }
    }

    /// Gives the lease up (at shutdown), so a standby takes over at once; only if it
    /// is still ours.
    pub async fn release(&self) {
        let revision = self.revision.load(std::sync::atomic::Ordering::Acquire);
        let _ = self
            .store
            .delete_expect_revision("leader", Some(revision))
            .await;
    }
}

/// The control plane.
pub struct Control {
    node: Arc<Node>,
    leadership: Leadership,
    store: Store,
    client: async_nats::Client,
    holder: String,
    scheduler: sched::Scheduler,
    nodes: Mutex<BTreeMap<String, Seen>>,
    placements: Mutex<BTreeMap<String, PlacementEntry>>,
    unplaced: Mutex<BTreeMap<String, Unplaced>>,
    desired: Mutex<BTreeMap<String, u32>>,
    scaling: Mutex<BTreeMap<String, Scaling>>,
    started: Instant,
    kick: Notify,
    reconciled: tokio::sync::watch::Sender<u64>,
    /// Apps changed here but not yet written to the cluster (retried each pass).
    dirty: Mutex<BTreeSet<Name>>,
    /// What `lepton_apps` holds, as far as this leader knows: what it read at takeover
    /// and what it wrote since. Placements are made from this, never from a version
    /// not yet in the cluster.
    published: Mutex<BTreeMap<Name, AppEntry>>,
    /// When heartbeats resumed after a silence from every node.
    resumed: Mutex<Option<Instant>>,
    /// Held by each admin change (from the node's change to its write to the
    /// cluster), by retries of those writes, and by a re-read of the cluster's state.
    changes: Arc<tokio::sync::Mutex<()>>,
    /// The lease epoch the state here was read at (see [`Leadership::epoch`]).
    synced_epoch: std::sync::atomic::AtomicU64,
}

/// What `node` reports of its replica of `placement`'s function, and its state for
/// the placed version (`pending` until it reports that version).
fn replica_state(
    nodes: &BTreeMap<String, Seen>,
    placement: &PlacementEntry,
    node: &str,
) -> (Option<bus::ReplicaReport>, String) {
    let report = nodes.get(node).and_then(|s| {
        s.beat
            .replicas
            .iter()
            .find(|r| r.app == placement.app && r.function == placement.function)
            .cloned()
    });
    let state = match &report {
        Some(r) if r.version == placement.version => r.state.clone(),
        _ => "pending".to_owned(),
    };
    (report, state)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Control {
    /// Takes over: makes the node's store what `lepton_apps` says, reads the
    /// placements, and starts following heartbeats and activations.
    pub async fn start(
        node: Arc<Node>,
        client: async_nats::Client,
        store: Store,
        holder: String,
        leadership: Leadership,
    ) -> anyhow::Result<Arc<Self>> {
        let control = Arc::new(Self {
            node,
            leadership,
            store,
            client,
            holder,
            scheduler: sched::Scheduler::new(sched::SchedulerConfig::default()),
            nodes: Mutex::new(BTreeMap::new()),
            placements: Mutex::new(BTreeMap::new()),
            unplaced: Mutex::new(BTreeMap::new()),
            desired: Mutex::new(BTreeMap::new()),
            scaling: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
            kick: Notify::new(),
            reconciled: tokio::sync::watch::channel(0).0,
            dirty: Mutex::new(BTreeSet::new()),
            published: Mutex::new(BTreeMap::new()),
            resumed: Mutex::new(None),
            changes: Arc::new(tokio::sync::Mutex::new(())),
            synced_epoch: std::sync::atomic::AtomicU64::new(0),
        });
        control.import().await?;
        let placements: BTreeMap<String, PlacementEntry> =
            bus::read_all(&control.store.placements, bus::PLACEMENTS).await?;
        *lock(&control.placements) = placements;
        for (key, beat) in bus::read_all::<Heartbeat>(&control.store.nodes, bus::NODES).await? {
            // A heartbeat read back from the bucket may be old: it counts from now, so a
            // node that is gone is lost after the usual wait.
            lock(&control.nodes).insert(
                key,
                Seen {
                    beat,
                    at: Instant::now(),
                    revision: 0,
                },
            );
        }
        let c = Arc::clone(&control);
        tokio::spawn(async move { c.follow_heartbeats().await });
        let c = Arc::clone(&control);
        tokio::spawn(async move { c.follow_activations().await });
        // Changes this leader has but could not write to the cluster, retried apart
        // from reconciling (an upload may take long).
        let c = Arc::clone(&control);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let dirty: Vec<Name> = lock(&c.dirty).iter().cloned().collect();
                for name in dirty {
                    let _changes = c.lock_changes().await;
                    if let Err(error) = c.publish(&name).await {
                        tracing::warn!(app = %name, "writing the app to the cluster: {error:#}");
                    }
                }
            }
        });
        let c = Arc::clone(&control);
        tokio::spawn(async move {
            loop {
                // Bounded: a JetStream request that never answers must not stop
                // the control plane from reconciling for good.
                match tokio::time::timeout(Duration::from_secs(30), c.reconcile()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::warn!("reconciling: {error:#}"),
                    Err(_) => {
                        tracing::warn!("reconciling: a pass took more than 30 s; starting again");
                    }
                }
                let _ = tokio::time::timeout(RECONCILE_EVERY, c.kick.notified()).await;
            }
        });
        Ok(control)
    }

    /// Makes the node's store what the cluster's is.
    async fn import(&self) -> anyhow::Result<()> {
        let mut entries: BTreeMap<String, AppEntry> =
            bus::read_all(&self.store.apps, bus::APPS).await?;
        entries.retain(|key, entry| {
            let ok = entry.is_consistent(key);
            if !ok {
                tracing::error!(
                    key,
                    "skipping an app record whose names or digests do not match"
                );
            }
            ok
        });
        *lock(&self.published) = entries
            .values()
            .map(|e| (e.name.clone(), e.clone()))
            .collect();
        for entry in entries.values() {
            for version in &entry.versions {
                for digest in version.app.blobs() {
                    if let Err(error) = self.store.fetch_blob(self.node.blobs(), &digest).await {
                        tracing::warn!(app = %entry.name, version = version.version, "{error:#}");
                    }
                }
            }
            if let Err(error) = self
                .node
                .import(&entry.name, &entry.versions, entry.active)
                .await
            {
                tracing::error!(app = %entry.name, "cannot take over the app: {}", error.spec_error());
            }
        }
        for (name, _, _) in self.node.records().await {
            if !entries.contains_key(name.as_str()) {
                tracing::info!(app = %name, "removed: the cluster no longer has it");
                if let Err(error) = self.node.remove(&name, "cluster").await {
                    tracing::warn!(app = %name, "{error}");
                }
            }
        }
        Ok(())
    }

    /// Waits for the right to change apps (see `changes`).
    pub async fn lock_changes(&self) -> tokio::sync::OwnedMutexGuard<()> {
        Arc::clone(&self.changes).lock_owned().await
    }

    /// Writes app `name` as the node's store has it (blobs first), or deletes it.
    pub async fn publish(&self, name: &Name) -> anyhow::Result<()> {
        let result = self.write_app(name).await;
        let mut dirty = lock(&self.dirty);
        if result.is_err() {
            dirty.insert(name.clone());
        } else {
            dirty.remove(name);
        }
        result
    }

    async fn write_app(&self, name: &Name) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.leadership.is_current(),
            "this control plane cannot renew its lease (is NATS reachable?)"
        );
        let record = self
            .node
            .records()
            .await
            .into_iter()
            .find(|(n, _, _)| n == name);
        match record {
            Some((name, versions, Some(active))) => {
                for version in &versions {
                    for digest in version.app.blobs() {
                        self.store.upload_blob(self.node.blobs(), &digest).await?;
                    }
                }
                let entry = AppEntry {
                    name: name.clone(),
                    active,
                    versions,
                };
                self.store
                    .apps
                    .put(name.as_str(), Bytes::from(serde_json::to_vec(&entry)?))
                    .await?;
                lock(&self.published).insert(name, entry);
            }
            _ => {
                self.store.apps.delete(name.as_str()).await?;
                lock(&self.published).remove(name);
            }
        }
        self.kick.notify_one();
        Ok(())
    }

    /// Waits (at most [`DEPLOY_WAIT`]) until every replica placed of `name`'s active
    /// version serves it; returns the replicas as they stand.
    pub async fn wait_serving(&self, name: &Name) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + DEPLOY_WAIT;
        let mut reconciled = self.reconciled.subscribe();
        reconciled.borrow_and_update();
        // A pass that saw the change first.
        let _ = tokio::time::timeout_at(deadline, reconciled.changed()).await;
        loop {
            let (done, replicas) = self.serving(name).await;
            // Replicas no node can take now: answer with why, rather than wait.
            let prefix = format!("{name}.");
            let unplaced: BTreeMap<String, Unplaced> = lock(&self.unplaced)
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(k, u)| (k.clone(), u.clone()))
                .collect();
            if done || !unplaced.is_empty() || tokio::time::Instant::now() >= deadline {
                return serde_json::json!({
                    "serving": done, "replicas": replicas, "unplaced": unplaced,
                });
            }
            let _ = tokio::time::timeout_at(deadline, reconciled.changed()).await;
        }
    }

    async fn serving(&self, name: &Name) -> (bool, Vec<serde_json::Value>) {
        let active = lock(&self.published).get(name).map(|e| e.active);
        let Some(active) = active else {
            return (true, Vec::new());
        };
        let placements = lock(&self.placements).clone();
        let desired = lock(&self.desired).clone();
        let nodes = lock(&self.nodes);
        let mut all = true;
        let mut replicas = Vec::new();
        let mut any_desired = false;
        for (key, placement) in placements.iter().filter(|(_, p)| &p.app == name) {
            let want = desired.get(key).copied().unwrap_or(0);
            any_desired |= want > 0;
            if placement.version != active || (placement.nodes.len() as u32) < want {
                all = false;
            }
            for node in &placement.nodes {
                let (report, state) = replica_state(&nodes, placement, node);
                all &= state == "running";
                replicas.push(serde_json::json!({
                    "function": placement.function, "node": node, "state": state,
                    "error": report.and_then(|r| r.error),
                }));
            }
        }
        // Nothing placed yet for a version that wants replicas: not serving yet.
        let wanted_somewhere = desired
            .iter()
            .any(|(k, n)| *n > 0 && k.starts_with(&format!("{name}.")));
        if wanted_somewhere && !any_desired {
            all = false;
        }
        (all, replicas)
    }

    async fn follow_heartbeats(self: &Arc<Self>) {
        loop {
            let mut watch = match self.store.nodes.watch_with_history(">").await {
                Ok(watch) => watch,
                Err(error) => {
                    tracing::warn!("watching heartbeats: {error}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            while let Some(entry) = watch.next().await {
                let Ok(entry) = entry else { break };
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                let Some(beat) =
                    bus::parse_record::<Heartbeat>(bus::NODES, &entry.key, &entry.value)
                else {
                    continue;
                };
                if beat.name != entry.key {
                    tracing::warn!(
                        key = entry.key,
                        "skipping a heartbeat under another node's name"
                    );
                    continue;
                }
                let new = {
                    let mut nodes = lock(&self.nodes);
                    if nodes
                        .get(&entry.key)
                        .is_some_and(|s| s.revision >= entry.revision)
                    {
                        continue; // Delivered again: nothing new from the node.
                    }
                    // The first heartbeat after a silence from every node (this process
                    // was cut off): the others get their usual time from now.
                    if !nodes.values().any(|s| s.at.elapsed() <= NODE_LOST_AFTER) {
                        *lock(&self.resumed) = Some(Instant::now());
                    }
                    let lost_before = nodes
                        .get(&entry.key)
                        .is_none_or(|s| s.at.elapsed() > NODE_LOST_AFTER);
                    let changed = nodes.get(&entry.key).is_none_or(|s| {
                        s.beat.replicas != beat.replicas || s.beat.waiting != beat.waiting
                    });
                    nodes.insert(
                        entry.key.clone(),
                        Seen {
                            beat,
                            at: Instant::now(),
                            revision: entry.revision,
                        },
                    );
                    lost_before || changed
                };
                if new {
                    self.kick.notify_one();
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn follow_activations(self: &Arc<Self>) {
        loop {
            match self.client.subscribe(ACTIVATE_SUBJECT).await {
                Ok(mut subscriber) => {
                    while let Some(message) = subscriber.next().await {
                        #[derive(serde::Deserialize)]
                        struct Ask {
                            app: Name,
                            function: Name,
                        }
                        let Ok(ask) = serde_json::from_slice::<Ask>(&message.payload) else {
                            continue;
                        };
                        let known = lock(&self.published).get(&ask.app).is_some_and(|e| {
                            e.active_version().is_some_and(|v| {
                                v.app.functions.iter().any(|f| f.name == ask.function)
                            })
                        });
                        if !known {
                            continue;
                        }
                        let key = bus::function_key(&ask.app, &ask.function);
                        lock(&self.scaling).entry(key).or_default().activated =
                            Some(Instant::now());
                        self.kick.notify_one();
                    }
                }
                Err(error) => tracing::warn!("subscribing to activations: {error}"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// One pass: snapshot, desired counts, plan, placements written.
    async fn reconcile(&self) -> anyhow::Result<()> {
        if !self.leadership.is_current() {
            return Ok(());
        }
        // The lease was taken again after it expired: another leader may have changed
        // the cluster meanwhile. Read it again before changing anything.
        let epoch = self.leadership.epoch();
        if self.synced_epoch.load(std::sync::atomic::Ordering::Acquire) != epoch {
            let _changes = self.lock_changes().await;
            self.import().await?;
            let placements: BTreeMap<String, PlacementEntry> =
                bus::read_all(&self.store.placements, bus::PLACEMENTS).await?;
            *lock(&self.placements) = placements;
            self.synced_epoch
                .store(epoch, std::sync::atomic::Ordering::Release);
        }
        let apps: Vec<StoredVersion> = lock(&self.published)
            .values()
            .filter_map(|e| e.active_version().cloned())
            .collect();
        let now = Instant::now();
        let (snapshot, in_flight) = self.snapshot(now);
        let mut desired = Vec::new();
        let mut versions = BTreeMap::new();
        let mut counts = BTreeMap::new();
        for stored in &apps {
            let app = &stored.app;
            for f in &app.functions {
                let key = bus::function_key(&app.name, &f.name);
                let current = snapshot.replicas_of(&key).count() as u32;
                let load = in_flight.get(&key).copied().unwrap_or(0.0);
                let replicas = self.replicas_for(&key, &f.scale, current, load, now);
                let mut spec = sched::FunctionSpec::new(
                    key.as_str(),
                    sched::Resources::new(100, REPLICA_MEMORY),
                )
                .with_scale(sched::ScaleBounds::new(0, crate::locked::MAX_REPLICAS));
                let mut wants_gpu = false;
                for model in app.models.iter().filter(|m| f.models.contains(&m.name)) {
                    let size = std::fs::metadata(self.node.blobs().path(&model.file))
                        .map_or(0, |m| m.len());
                    spec = spec.with_model(sched::ModelRequirement::new(
                        model.file.as_str(),
                        "onnx",
                        size,
                    ));
                    wants_gpu |= model.target == Target::Gpu;
                }
                let placement = &f.placement;
                if let Some(tier) = placement.tier.as_deref().and_then(sched::Tier::from_label) {
                    spec = spec.with_tier(tier);
                }
                for (k, v) in &placement.labels {
                    spec =
                        spec.with_selector(sched::LabelSelector::is_in(k.as_str(), [v.as_str()]));
                }
                if let Some(region) = &placement.near_region {
                    spec = spec.with_near_region(region.as_str());
                }
                spec = spec.with_accelerator(match placement.accelerator {
                    AcceleratorUse::Required => sched::AcceleratorPolicy::Required,
                    AcceleratorUse::Preferred => sched::AcceleratorPolicy::Preferred,
                    AcceleratorUse::None if wants_gpu => sched::AcceleratorPolicy::Preferred,
                    AcceleratorUse::None => sched::AcceleratorPolicy::None,
                });
                versions.insert(
                    key.clone(),
                    (app.name.clone(), f.name.clone(), stored.version),
                );
                counts.insert(key.clone(), replicas);
                desired.push(sched::DesiredFunction::new(spec, replicas));
            }
        }
        let plan = self
            .scheduler
            .reconcile(&snapshot, &desired)
            .map_err(|e| anyhow::anyhow!("the scheduler refused the snapshot: {e}"))?;
        let mut next = snapshot.clone();
        next.apply(&plan)
            .map_err(|e| anyhow::anyhow!("applying the plan: {e}"))?;
        {
            let mut unplaced = lock(&self.unplaced);
            unplaced.clear();
            for failure in &plan.failures {
                unplaced.insert(
                    failure.function.to_string(),
                    Unplaced {
                        wanted: failure.wanted,
                        rejections: failure
                            .rejections
                            .iter()
                            .map(|r| (r.node.to_string(), r.rejection.to_string()))
                            .collect(),
                    },
                );
            }
        }
        let mut wanted: BTreeMap<String, PlacementEntry> = BTreeMap::new();
        for (key, (app, function, version)) in &versions {
            let mut nodes: Vec<String> =
                next.replicas_of(key).map(|r| r.node.to_string()).collect();
            nodes.sort();
            wanted.insert(
                key.clone(),
                PlacementEntry {
                    app: app.clone(),
                    function: function.clone(),
                    version: *version,
                    nodes,
                },
            );
        }
        // With no node ready there is nothing to judge by: leave the placements as
        // they are (they come back as nodes heartbeat).
        if !next
            .nodes
            .iter()
            .any(|n| n.status == sched::NodeStatus::Ready)
        {
            self.reconciled.send_modify(|n| *n += 1);
            return Ok(());
        }
        let current = lock(&self.placements).clone();
        for (key, entry) in &wanted {
            if current.get(key) != Some(entry) {
                self.store
                    .placements
                    .put(key.as_str(), Bytes::from(serde_json::to_vec(entry)?))
                    .await?;
                tracing::info!(function = key, version = entry.version, nodes = ?entry.nodes, "placed");
            }
        }
        for key in current.keys().filter(|k| !wanted.contains_key(*k)) {
            self.store.placements.delete(key.as_str()).await?;
        }
        *lock(&self.placements) = wanted;
        lock(&self.scaling).retain(|key, _| counts.contains_key(key));
        let previous = std::mem::replace(&mut *lock(&self.desired), counts.clone());
        for (key, n) in &counts {
            if previous.get(key) != Some(n) {
                let _ = self
                    .store
                    .desired
                    .put(key.as_str(), Bytes::from(n.to_string()))
                    .await;
            }
        }
        for key in previous.keys().filter(|k| !counts.contains_key(*k)) {
            let _ = self.store.desired.delete(key.as_str()).await;
        }
        self.reconciled.send_modify(|n| *n += 1);
        Ok(())
    }

    /// The nodes (ready, or lost) and the replicas placed on them, with in-flight
    /// requests per function (replicas and gateways holding requests together).
    fn snapshot(&self, now: Instant) -> (sched::ClusterSnapshot, BTreeMap<String, f64>) {
        let mut nodes_seen = lock(&self.nodes);
        // No heartbeat from anyone for a while: this process is cut off or starved, not
        // every node dead at once. Judge no node lost (and forget none) until heartbeats
        // arrive again, and then give each node its usual time from then.
        let judging = nodes_seen
            .values()
            .any(|s| now.duration_since(s.at) <= NODE_LOST_AFTER);
        let resumed = *lock(&self.resumed);
        let silent = |s: &Seen| {
            let since = resumed.map_or(s.at, |r| r.max(s.at));
            now.duration_since(since)
        };
        if judging {
            nodes_seen.retain(|_, s| silent(s) < FORGET_LOST_AFTER);
        }
        let placements = lock(&self.placements);
        let mut in_flight: BTreeMap<String, f64> = BTreeMap::new();
        let mut snapshot = sched::ClusterSnapshot::default();
        let mut reserved: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for placement in placements.values() {
            let key = bus::function_key(&placement.app, &placement.function);
            let unique: BTreeSet<&String> = placement.nodes.iter().collect();
            for node in unique {
                let Some(seen) = nodes_seen.get(node) else {
                    continue;
                };
                let report = seen
                    .beat
                    .replicas
                    .iter()
                    .find(|r| r.app == placement.app && r.function == placement.function);
                let state = match report {
                    Some(r) if r.version == placement.version && r.state == "running" => {
                        sched::ReplicaState::Running
                    }
                    Some(r) if r.version == placement.version && r.state == "failed" => {
                        sched::ReplicaState::Failed
                    }
                    // An older version still serving while the new one builds.
                    Some(r) if r.state == "running" => sched::ReplicaState::Running,
                    _ => sched::ReplicaState::Pending,
                };
                let memory = REPLICA_MEMORY;
                let entry = reserved.entry(node.as_str()).or_default();
                entry.0 += 100;
                entry.1 += memory;
                snapshot.replicas.push(sched::Replica::new(
                    key.as_str(),
                    node.as_str(),
                    state,
                    sched::Resources::new(100, memory),
                ));
            }
        }
        for (name, seen) in nodes_seen.iter() {
            let beat = &seen.beat;
            for report in &beat.replicas {
                *in_flight
                    .entry(bus::function_key(&report.app, &report.function))
                    .or_default() += report.in_flight as f64;
            }
            for (key, n) in &beat.waiting {
                *in_flight.entry(key.clone()).or_default() += *n as f64;
            }
            let (cpu, memory) = reserved.get(name.as_str()).copied().unwrap_or_default();
            let status = if judging && silent(seen) > NODE_LOST_AFTER {
                sched::NodeStatus::Lost
            } else {
                sched::NodeStatus::Ready
            };
            let mut node = sched::Node::new(
                name.as_str(),
                sched::Resources::new(beat.cpu_millis, beat.memory_bytes),
            )
            .with_status(status)
            .with_free(sched::Resources::new(
                beat.cpu_millis.saturating_sub(cpu),
                beat.memory_bytes.saturating_sub(memory),
            ));
            for (k, v) in &beat.labels {
                node = node.with_label(k.as_str(), v.as_str());
            }
            if beat.onnx {
                node = node.with_backend("onnx");
            }
            for (kind, memory) in &beat.accelerators {
                node = node.with_accelerator(sched::Accelerator::new(kind.as_str(), *memory));
            }
            for model in &beat.resident_models {
                node = node.with_resident_model(model.as_str());
            }
            snapshot.nodes.push(node);
        }
        // Replicas on nodes no longer known are dropped above; the plan replaces them.
        let known: BTreeSet<String> = snapshot.nodes.iter().map(|n| n.id.to_string()).collect();
        snapshot
            .replicas
            .retain(|r| known.contains(r.node.as_str()));
        (snapshot, in_flight)
    }

    fn replicas_for(&self, key: &str, scale: &Scale, current: u32, load: f64, now: Instant) -> u32 {
        let (min, max, target, after) = match *scale {
            Scale::Fixed(n) => return n,
            Scale::Auto {
                min,
                max,
                target_concurrency,
                scale_to_zero_after,
            } => (min, max, target_concurrency, scale_to_zero_after),
        };
        let window = after.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let config = sched::AutoscalerConfig::default()
            .with_target(f64::from(target))
            .with_stable_window(window)
            .with_panic_window(window / 10)
            .with_scale_to_zero_grace(after);
        let autoscaler = sched::Autoscaler::new(config);
        let mut scaling = lock(&self.scaling);
        let memory = scaling.entry(key.to_owned()).or_default();
        let at = now.duration_since(self.started);
        memory.window.record(
            sched::Sample {
                at,
                in_flight: load,
            },
            config.stable_window(),
        );
        let decision = autoscaler.decide(
            sched::ScaleBounds::new(min, max),
            current,
            memory.window.samples(),
            &memory.state,
            at,
        );
        memory.state = decision.state;
        let asked = memory
            .activated
            .is_some_and(|t| now.duration_since(t) < window.max(after));
        if (asked || load > 0.0) && decision.replicas == 0 {
            1.min(max)
        } else {
            decision.replicas
        }
    }

    /// What `GET /v1/status` answers on a cluster.
    pub fn status(&self) -> serde_json::Value {
        let now = Instant::now();
        let nodes = lock(&self.nodes);
        let placements = lock(&self.placements).clone();
        let unplaced = lock(&self.unplaced).clone();
        let desired = lock(&self.desired).clone();
        let node_rows: Vec<serde_json::Value> = nodes
            .iter()
            .map(|(name, seen)| {
                let b = &seen.beat;
                let lost = now.duration_since(seen.at) > NODE_LOST_AFTER;
                serde_json::json!({
                    "name": name,
                    "status": if lost { "lost" } else { "ready" },
                    "labels": b.labels,
                    "gateway": b.gateway,
                    "accelerators": b.accelerators.iter().map(|(k, m)| serde_json::json!({"kind": k, "memory_bytes": m})).collect::<Vec<_>>(),
                    "cpu_millis": b.cpu_millis,
                    "memory_bytes": b.memory_bytes,
                    "free_memory_bytes": b.free_memory_bytes,
                    "resident_models": b.resident_models,
                    "last_seen_ms": u64::try_from(now.duration_since(seen.at).as_millis()).unwrap_or(u64::MAX),
                })
            })
            .collect();
        let mut replica_rows = Vec::new();
        for (key, placement) in &placements {
            for node in &placement.nodes {
                let (report, state) = replica_state(&nodes, placement, node);
                replica_rows.push(serde_json::json!({
                    "app": placement.app, "function": placement.function, "key": key,
                    "version": placement.version, "node": node, "state": state,
                    "in_flight": report.as_ref().map_or(0, |r| r.in_flight),
                    "error": report.and_then(|r| r.error),
                }));
            }
        }
        let functions: Vec<serde_json::Value> = placements
            .iter()
            .map(|(key, p)| {
                serde_json::json!({
                    "app": p.app, "function": p.function, "version": p.version,
                    "desired": desired.get(key).copied().unwrap_or(0),
                    "placed": p.nodes.len(),
                    "unplaced": unplaced.get(key).map(|u| serde_json::json!({
                        "wanted": u.wanted,
                        "rejections": u.rejections.iter().map(|(n, r)| serde_json::json!({"node": n, "reason": r})).collect::<Vec<_>>(),
                    })),
                })
            })
            .collect();
        serde_json::json!({
            "cluster": { "leader": self.holder },
            "nodes": node_rows,
            "replicas": replica_rows,
            "placements": functions,
            "functions": [],
            "models": [],
            "trainers": [],
        })
    }
}
