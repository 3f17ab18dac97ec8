//! `lepton node`: the agent that runs what the control plane placed here, and the
//! gateway that answers every route of the cluster.
//!
//! The agent watches `lepton_apps` and `lepton_placements`. For every app with a
//! function placed here, it fetches the blobs it lacks from the object store (each
//! verified against its digest) and deploys the app to the local [`Node`] with only
//! those functions, so a version change is built in full before it swaps in (new
//! serves before old stops). Each local function is subscribed on its subject in the
//! queue group `lepton`, so any gateway's forwarded request reaches one of its replicas.
//!
//! The gateway routes on the cluster's table: a local replica first, else forwarded
//! over NATS request-reply with the request id, the time left and the body (up to the
//! forwarding cap). With no replica anywhere it holds the request, asks the control
//! plane for one (the activator) and answers when one serves, or 503 at the function's
//! timeout.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::BodyExt as _;
use tokio::sync::Notify;

use super::bus::{
    self, ACTIVATE_SUBJECT, AppEntry, HEARTBEAT_EVERY, Heartbeat, PlacementEntry, ReplicaReport,
    Store,
};
use super::wire;
use crate::http::{Body, Handler, full, text};
use crate::locked::{LockedApp, Name, Route};
use crate::node::Node;
use crate::node::store::now_ms;

/// How a node joins.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The node's name (unique in the cluster).
    pub name: Name,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its accelerators: kind and memory in bytes.
    pub accelerators: Vec<(String, u64)>,
    /// Whether ONNX Runtime loads here.
    pub onnx: bool,
    /// Its gateway's address, as heartbeated.
    pub gateway: String,
    /// The largest request or response body forwarded.
    pub forward_max_body: u64,
}

/// One route of the cluster.
struct ClusterRoute {
    route: Route,
    app: Name,
    function: Name,
    timeout: Duration,
    max_body_size: u64,
}

/// What the agent knows of the cluster.
#[derive(Default)]
struct View {
    apps: BTreeMap<String, AppEntry>,
    placements: BTreeMap<String, PlacementEntry>,
}

/// A function's subscription on its subject.
struct Subscription {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<()>,
}

/// The agent of one node.
pub struct Agent {
    config: AgentConfig,
    node: Arc<Node>,
    client: async_nats::Client,
    store: Store,
    view: Mutex<View>,
    routes: ArcSwap<Vec<ClusterRoute>>,
    changed: Notify,
    reports: Mutex<BTreeMap<String, ReplicaReport>>,
    subscriptions: Mutex<HashMap<String, Subscription>>,
    /// Requests held per function waiting for a replica.
    waiting: Mutex<BTreeMap<String, u64>>,
    /// When a failed deploy of an app (version digest) may be tried again.
    retry_after: Mutex<HashMap<String, tokio::time::Instant>>,
    /// Set once a heartbeat went out after the first sync.
    joined: tokio::sync::watch::Sender<bool>,
    synced: std::sync::atomic::AtomicBool,
    /// Buckets read in full at least once (apps, placements).
    read: std::sync::atomic::AtomicU8,
    /// Set at shutdown: no subscription is made any more.
    leaving: std::sync::atomic::AtomicBool,
}

impl Agent {
    /// Starts the agent's loops: watching, syncing, heartbeating.
    pub fn start(
        config: AgentConfig,
        node: Arc<Node>,
        client: async_nats::Client,
        store: Store,
    ) -> Arc<Self> {
        let agent = Arc::new(Self {
            config,
            node,
            client,
            store,
            view: Mutex::new(View::default()),
            routes: ArcSwap::from_pointee(Vec::new()),
            changed: Notify::new(),
            reports: Mutex::new(BTreeMap::new()),
            subscriptions: Mutex::new(HashMap::new()),
            waiting: Mutex::new(BTreeMap::new()),
            retry_after: Mutex::new(HashMap::new()),
            joined: tokio::sync::watch::channel(false).0,
            synced: std::sync::atomic::AtomicBool::new(false),
            read: std::sync::atomic::AtomicU8::new(0),
            leaving: std::sync::atomic::AtomicBool::new(false),
        });
        let a = Arc::clone(&agent);
        tokio::spawn(async move {
            a.watch(bus::APPS, |view, key, value| match value {
                Some(v) => match bus::parse_record::<AppEntry>(bus::APPS, key, v) {
                    Some(entry) if entry.is_consistent(key) => {
                        view.apps.insert(key.to_owned(), entry);
                    }
                    Some(_) => {
                        tracing::warn!(
                            key,
                            "skipping an app record whose names or digests do not match its key"
                        );
                    }
                    None => {}
                },
                None => {
                    view.apps.remove(key);
                }
            })
            .await;
        });
        let a = Arc::clone(&agent);
        tokio::spawn(async move {
            a.watch(bus::PLACEMENTS, |view, key, value| match value {
                Some(v) => {
                    if let Some(entry) =
                        bus::parse_record::<PlacementEntry>(bus::PLACEMENTS, key, v)
                    {
                        view.placements.insert(key.to_owned(), entry);
                    }
                }
                None => {
                    view.placements.remove(key);
                }
            })
            .await;
        });
        let a = Arc::clone(&agent);
        tokio::spawn(async move { a.sync_loop().await });
        let a = Arc::clone(&agent);
        tokio::spawn(async move { a.heartbeat_loop().await });
        agent
    }

    /// Waits until the node has read the cluster's state, run what is placed on it and
    /// heartbeated once.
    pub async fn joined(&self) {
        let mut joined = self.joined.subscribe();
        let _ = joined.wait_for(|&j| j).await;
    }

    fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        mutex
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bucket(&self, name: &str) -> kv::Store {
        match name {
            bus::APPS => self.store.apps.clone(),
            _ => self.store.placements.clone(),
        }
    }

    /// Follows one bucket into the view; every few seconds (and after a broken watch)
    /// the whole bucket is read again, so a deletion missed while disconnected is seen.
    async fn watch(
        self: &Arc<Self>,
        bucket: &'static str,
        apply: impl Fn(&mut View, &str, Option<&Bytes>),
    ) {
        let store = self.bucket(bucket);
        let mut first = true;
        loop {
            // The watch first, then the full read: nothing written in between is missed
            // (an update seen twice is applied twice, to the same end).
            let mut watch = match store.watch(">").await {
                Ok(watch) => watch,
                Err(error) => {
                    tracing::warn!("watching `{bucket}`: {error}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            match bus::read_all::<serde_json::Value>(&store, bucket).await {
                Ok(all) => {
                    let mut view = Self::lock(&self.view);
                    match bucket {
                        bus::APPS => view.apps.clear(),
                        _ => view.placements.clear(),
                    }
                    for (key, value) in all {
                        let bytes = Bytes::from(serde_json::to_vec(&value).unwrap_or_default());
                        apply(&mut view, &key, Some(&bytes));
                    }
                    drop(view);
                    if std::mem::take(&mut first) {
                        self.read.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    }
                    self.changed.notify_one();
                }
                Err(error) => {
                    tracing::warn!("reading `{bucket}`: {error:#}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
            let resync = tokio::time::sleep(Duration::from_secs(5));
            tokio::pin!(resync);
            loop {
                tokio::select! {
                    () = &mut resync => break,
                    entry = watch.next() => match entry {
                        Some(Ok(entry)) => {
                            let value = match entry.operation {
                                kv::Operation::Put => Some(&entry.value),
                                kv::Operation::Delete | kv::Operation::Purge => None,
                            };
                            apply(&mut Self::lock(&self.view), &entry.key, value);
                            self.changed.notify_one();
                        }
                        Some(Err(error)) => {
                            tracing::warn!("watching `{bucket}`: {error}");
                            break;
                        }
                        None => break,
                    }
                }
            }
        }
    }

    async fn sync_loop(self: &Arc<Self>) {
        loop {
            self.sync().await;
            let _ = tokio::time::timeout(Duration::from_secs(1), self.changed.notified()).await;
        }
    }

    /// Makes the local node run what is placed on it.
    async fn sync(self: &Arc<Self>) {
        let me = self.config.name.as_str();
        // app -> (version, functions placed here)
        let mut wanted: BTreeMap<Name, (AppEntry, u64, BTreeSet<Name>)> = BTreeMap::new();
        let mut unsettled: BTreeSet<Name> = BTreeSet::new();
        let mut routes = Vec::new();
        {
            let view = Self::lock(&self.view);
            for entry in view.apps.values() {
                if let Some(active) = entry.active_version() {
                    for f in &active.app.functions {
                        routes.push(ClusterRoute {
                            route: f.route.clone(),
                            app: entry.name.clone(),
                            function: f.name.clone(),
                            timeout: f.timeout,
                            max_body_size: f.max_body_size,
                        });
                    }
                }
            }
            for placement in view.placements.values() {
                if !placement.nodes.iter().any(|n| n == me) {
                    continue;
                }
                // A placement may arrive before the app record it was made from (two
                // buckets, two watches): the app stays as it is until both agree.
                let Some(entry) = view.apps.get(placement.app.as_str()) else {
                    unsettled.insert(placement.app.clone());
                    continue;
                };
                if entry.version(placement.version).is_none() {
                    unsettled.insert(placement.app.clone());
                    continue;
                }
                wanted
                    .entry(placement.app.clone())
                    .or_insert_with(|| (entry.clone(), placement.version, BTreeSet::new()))
                    .2
                    .insert(placement.function.clone());
            }
        }
        for app in &unsettled {
            wanted.remove(app);
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.route.specificity()));
        self.routes.store(Arc::new(routes));

        for (app, (entry, version, functions)) in &wanted {
            let Some(stored) = entry.version(*version) else {
                continue;
            };
            let subset = only_functions(&stored.app, functions);
            let digest = subset.digest();
            // What the table serves, not what the store on disk says: a node restarted
            // on its state dir starts with an empty table.
            let serving = self.node.table().app_digest(app).cloned();
            let key = format!("{app}@{digest}");
            Self::lock(&self.retry_after).retain(|_, t| *t > tokio::time::Instant::now());
            let failed_recently = Self::lock(&self.retry_after)
                .get(&key)
                .is_some_and(|t| *t > tokio::time::Instant::now());
            if serving.as_ref() == Some(&digest) {
                // The same functions of a newer version: nothing to build, but the
                // replicas now serve that version.
                let mut reports = Self::lock(&self.reports);
                for function in functions {
                    if let Some(report) = reports.get_mut(&bus::function_key(app, function))
                        && report.state == "running"
                    {
                        report.version = *version;
                    }
                }
            }
            if serving.as_ref() != Some(&digest) && !failed_recently {
                let outcome = self.deploy(&subset).await;
                let mut reports = Self::lock(&self.reports);
                reports.retain(|_, r| &r.app != app);
                for function in functions {
                    let (state, error) = match &outcome {
                        Ok(()) => ("running", None),
                        Err(e) => ("failed", Some(e.clone())),
                    };
                    reports.insert(
                        bus::function_key(app, function),
                        ReplicaReport {
                            app: app.clone(),
                            function: function.clone(),
                            version: *version,
                            state: state.to_owned(),
                            error,
                            in_flight: 0,
                        },
                    );
                }
                if let Err(error) = &outcome {
                    tracing::error!(%app, version, "cannot run what is placed here: {error}");
                    Self::lock(&self.retry_after)
                        .insert(key, tokio::time::Instant::now() + Duration::from_secs(5));
                }
            }
        }
        // What is no longer placed here goes: its subscriptions first (drained), then
        // the app.
        let keep: BTreeSet<String> = wanted
            .iter()
            .flat_map(|(app, (_, _, functions))| {
                functions.iter().map(move |f| bus::function_subject(app, f))
            })
            .collect();
        let keep: BTreeSet<String> = keep
            .into_iter()
            .chain(
                self.node
                    .table()
                    .functions()
                    .iter()
                    .filter(|f| unsettled.contains(f.app()))
                    .map(|f| bus::function_subject(f.app(), &f.spec().name)),
            )
            .collect();
        self.resubscribe(&keep).await;
        for (name, _, _) in self.node.records().await {
            if !wanted.contains_key(&name) && !unsettled.contains(&name) {
                if let Err(error) = self.node.remove(&name, "cluster").await {
                    tracing::warn!(app = %name, "removing: {error}");
                }
                Self::lock(&self.reports).retain(|_, r| r.app != name);
            }
        }
        if self.read.load(std::sync::atomic::Ordering::Acquire) >= 2 {
            self.synced
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Fetches what `app` lacks and deploys it locally.
    async fn deploy(&self, app: &LockedApp) -> Result<(), String> {
        for digest in self.node.blobs().missing(&app.blobs()) {
            self.store
                .fetch_blob(self.node.blobs(), &digest)
                .await
                .map_err(|e| format!("{e:#}"))?;
        }
        let deployed = self
            .node
            .deploy(app.clone(), "cluster")
            .await
            .map_err(|e| e.spec_error().to_string())?;
        tracing::info!(app = %deployed.app, functions = app.functions.len(), "serving what is placed here");
        Ok(())
    }

    /// Subscribes every local function on its subject, and unsubscribes the others.
    /// Subscribes every local function in `keep`; the other subscriptions end, and
    /// what NATS had delivered to them already is still answered.
    async fn resubscribe(self: &Arc<Self>, keep: &BTreeSet<String>) {
        let table = self.node.table();
        let local: BTreeSet<String> = table
            .functions()
            .iter()
            .map(|f| bus::function_subject(f.app(), &f.spec().name))
            .filter(|s| keep.contains(s))
            .filter(|_| !self.leaving.load(std::sync::atomic::Ordering::Acquire))
            .collect();
        let ending: Vec<Subscription> = {
            let mut subscriptions = Self::lock(&self.subscriptions);
            let gone: Vec<String> = subscriptions
                .iter()
                .filter(|(subject, sub)| !local.contains(*subject) || sub.task.is_finished())
                .map(|(subject, _)| subject.clone())
                .collect();
            gone.iter()
                .filter_map(|subject| subscriptions.remove(subject))
                .collect()
        };
        for subscription in ending {
            let _ = subscription.stop.send(());
            let mut task = subscription.task;
            if tokio::time::timeout(Duration::from_secs(2), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        let mut subscriptions = Self::lock(&self.subscriptions);
        for function in table.functions() {
            let subject = bus::function_subject(function.app(), &function.spec().name);
            if subscriptions.contains_key(&subject) || !local.contains(&subject) {
                continue;
            }
            let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
            let agent = Arc::clone(self);
            let (app, name) = (function.app().clone(), function.spec().name.clone());
            let s = subject.clone();
            let task = tokio::spawn(async move {
                let mut subscriber = match agent
                    .client
                    .queue_subscribe(s.clone(), "lepton".to_owned())
                    .await
                {
                    Ok(subscriber) => subscriber,
                    Err(error) => {
                        tracing::warn!(subject = s, "cannot subscribe: {error}");
                        return;
                    }
                };
                let serve = |message: async_nats::Message| {
                    let agent = Arc::clone(&agent);
                    let (app, name) = (app.clone(), name.clone());
                    tokio::spawn(async move { agent.serve_forwarded(&app, &name, message).await });
                };
                loop {
                    tokio::select! {
                        message = subscriber.next() => match message {
                            Some(message) => serve(message),
                            None => return,
                        },
                        _ = &mut stopped => break,
                    }
                }
                // Ended: NATS drains the subscription (an unsubscribe, then a ping
                // round trip), so every request it routed here before it stopped is
                // still delivered, and answered; then the stream ends.
                let _ = subscriber.drain().await;
                while let Some(message) = subscriber.next().await {
                    serve(message);
                }
            });
            subscriptions.insert(subject, Subscription { task, stop });
        }
    }

    /// Answers a request another gateway forwarded.
    async fn serve_forwarded(&self, app: &Name, function: &Name, message: async_nats::Message) {
        let Some(reply) = message.reply.clone() else {
            return;
        };
        let response = match wire::decode_request(&message.payload) {
            Err(error) => {
                tracing::warn!("refused a forwarded request: {error}");
                answer(http::StatusCode::BAD_REQUEST, &error.to_string(), None)
            }
            Ok(forwarded) => match self.node.table().function(app, function) {
                None => {
                    let mut headers = http::HeaderMap::new();
                    headers.insert(NOT_HERE, http::HeaderValue::from_static("1"));
                    wire::encode_response(
                        http::StatusCode::SERVICE_UNAVAILABLE,
                        &headers,
                        b"the function no longer runs on this node; retry\n",
                    )
                }
                Some(f) => {
                    let deadline = tokio::time::Instant::now() + forwarded.left;
                    let (parts, body) = forwarded.request.into_parts();
                    let request = hyper::Request::from_parts(
                        parts,
                        http_body_util::Full::new(body)
                            .map_err(|never: std::convert::Infallible| match never {}),
                    );
                    let response = Arc::clone(f)
                        .handle_as(request, Some(forwarded.id.clone()), Some(deadline))
                        .await;
                    let (parts, body) = response.into_parts();
                    let cap = self.forward_cap();
                    let limit = usize::try_from(cap).unwrap_or(usize::MAX);
                    match http_body_util::Limited::new(body, limit).collect().await {
                        Ok(collected) => wire::encode_response(
                            parts.status,
                            &parts.headers,
                            &collected.to_bytes(),
                        ),
                        Err(_) => answer(
                            http::StatusCode::BAD_GATEWAY,
                            &format!(
                                "the response is larger than the forwarding cap of {cap} bytes\n"
                            ),
                            Some(&forwarded.id),
                        ),
                    }
                }
            },
        };
        if let Err(error) = self.client.publish(reply.clone(), response).await {
            tracing::warn!("cannot answer a forwarded request: {error}");
            let _ = self
                .client
                .publish(
                    reply,
                    answer(
                        http::StatusCode::BAD_GATEWAY,
                        "the answer could not be sent back\n",
                        None,
                    ),
                )
                .await;
        }
    }

    async fn heartbeat_loop(self: &Arc<Self>) {
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            let synced = self.synced.load(std::sync::atomic::Ordering::Acquire);
            let beat = self.heartbeat();
            let bytes = Bytes::from(serde_json::to_vec(&beat).unwrap_or_default());
            match self.store.nodes.put(self.config.name.as_str(), bytes).await {
                Ok(_) => {
                    if failing {
                        tracing::info!("heartbeats reach the cluster again");
                        failing = false;
                    }
                    if synced {
                        self.joined
                            .send_if_modified(|j| !std::mem::replace(j, true));
                    }
                }
                Err(error) if !failing => {
                    tracing::warn!("cannot heartbeat: {error}");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }

    fn heartbeat(&self) -> Heartbeat {
        let (memory, free) = memory();
        let table = self.node.table();
        let mut replicas: Vec<ReplicaReport> =
            Self::lock(&self.reports).values().cloned().collect();
        for report in &mut replicas {
            if let Some(f) = table.function(&report.app, &report.function) {
                report.in_flight = f.in_flight() as u64;
            }
        }
        let status = self.node.status();
        Heartbeat {
            name: self.config.name.to_string(),
            labels: self.config.labels.clone(),
            cpu_millis: std::thread::available_parallelism().map_or(1, |n| n.get() as u64) * 1000,
            memory_bytes: memory,
            free_memory_bytes: free,
            accelerators: self.config.accelerators.clone(),
            onnx: self.config.onnx,
            resident_models: status
                .models
                .iter()
                .filter_map(|m| crate::locked::Digest::parse(&m.digest).ok())
                .collect(),
            replicas,
            gateway: self.config.gateway.clone(),
            waiting: Self::lock(&self.waiting).clone(),
            time_ms: now_ms(),
        }
    }

    /// At shutdown: ends every subscription (answering what NATS delivered already),
    /// so other gateways stop sending here while local requests drain.
    pub async fn leave(self: &Arc<Self>) {
        self.leaving
            .store(true, std::sync::atomic::Ordering::Release);
        self.resubscribe(&BTreeSet::new()).await;
    }

    /// The gateway's handler: every route of the cluster.
    pub fn handler(self: &Arc<Self>) -> Handler {
        let agent = Arc::clone(self);
        Arc::new(move |request, _peer| {
            let agent = Arc::clone(&agent);
            Box::pin(async move { agent.dispatch(request).await })
        })
    }

    async fn dispatch(
        &self,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<Body> {
        let path = request.uri().path();
        if crate::http::has_dot_segment(path) || crate::http::is_host_path(path) {
            return crate::http::dispatch(&self.node, request).await;
        }
        let routes = self.routes.load();
        let Some(route) = routes.iter().find(|r| r.route.matches(path)) else {
            // Host paths, bad paths and unknown routes: as a single node answers them.
            return crate::http::dispatch(&self.node, request).await;
        };
        if let Some(function) = self.node.table().function(&route.app, &route.function) {
            return Arc::clone(function).handle(request).await;
        }
        self.forward(route, request).await
    }

    async fn forward(
        &self,
        route: &ClusterRoute,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<Body> {
        let id = crate::http::next_request_id();
        let deadline = tokio::time::Instant::now() + route.timeout;
        let (parts, body) = request.into_parts();
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let cap = self.forward_cap();
        let limit = route.max_body_size.min(cap);
        if declared.is_some_and(|n| n > limit) {
            return too_large(route.max_body_size, cap, &id);
        }
        let budget = self.node.body_budget();
        let read = crate::http::read_body(body, declared, limit, &budget);
        let held = match tokio::time::timeout_at(deadline, read).await {
            Err(_) => {
                return answer_response(
                    http::StatusCode::REQUEST_TIMEOUT,
                    "the request body did not arrive in time\n",
                    &id,
                );
            }
            Ok(Ok(held)) => held,
            Ok(Err(crate::http::BodyError::TooLarge)) => {
                return too_large(route.max_body_size, cap, &id);
            }
            Ok(Err(crate::http::BodyError::OverBudget)) => {
                return answer_response(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "the node holds as many request bodies as it may; retry later\n",
                    &id,
                );
            }
            Ok(Err(crate::http::BodyError::Read(_))) => {
                return answer_response(
                    http::StatusCode::BAD_REQUEST,
                    "could not read the request body\n",
                    &id,
                );
            }
        };
        let subject = bus::function_subject(&route.app, &route.function);
        let key = bus::function_key(&route.app, &route.function);
        let mut held_for_activation: Option<Waiting<'_>> = None;
        let mut asked_at: Option<tokio::time::Instant> = None;
        let result = loop {
            let now = tokio::time::Instant::now();
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                break Err(None);
            }
            let payload = wire::encode_request(&parts, &held.bytes, &id, left);
            let request = async_nats::Request::new()
                .payload(payload)
                .timeout(Some(left + Duration::from_millis(250)));
            match self.client.send_request(subject.clone(), request).await {
                Ok(message) => match wire::decode_response(&message.payload) {
                    // A node that stopped running it since: another may have it.
                    Ok(response) if not_here(&response) => {
                        tokio::time::sleep(Duration::from_millis(20).min(left)).await;
                    }
                    decoded => break Ok(decoded),
                },
                Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => {
                    // No replica anywhere: hold the request and ask for one.
                    if held_for_activation.is_none() {
                        held_for_activation = Some(Waiting::new(&self.waiting, &key));
                    }
                    if asked_at.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                        asked_at = Some(now);
                        let ask =
                            serde_json::json!({ "app": route.app, "function": route.function });
                        let _ = self
                            .client
                            .publish(ACTIVATE_SUBJECT, Bytes::from(ask.to_string()))
                            .await;
                    }
                    tokio::time::sleep(Duration::from_millis(50).min(left)).await;
                }
                Err(error) if error.kind() == async_nats::RequestErrorKind::TimedOut => {
                    break Err(None);
                }
                Err(error) => break Err(Some(error.to_string())),
            }
        };
        let held_for_activation = held_for_activation.is_some();
        match result {
            Ok(decoded) => match decoded {
                Ok(response) => {
                    let (parts, body) = response.into_parts();
                    let mut response = hyper::Response::from_parts(parts, full(body));
                    if let Ok(value) = http::HeaderValue::from_str(&id) {
                        response
                            .headers_mut()
                            .entry(crate::http::REQUEST_ID_HEADER)
                            .or_insert(value);
                    }
                    response
                }
                Err(error) => {
                    tracing::warn!(
                        request_id = id,
                        "a node answered a forwarded request badly: {error}"
                    );
                    answer_response(
                        http::StatusCode::BAD_GATEWAY,
                        "bad answer from the node that ran it\n",
                        &id,
                    )
                }
            },
            Err(None) if held_for_activation => answer_response(
                http::StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "no replica of function `{}` came up within its timeout of {:?}\n",
                    route.function, route.timeout
                ),
                &id,
            ),
            Err(None) => answer_response(
                http::StatusCode::GATEWAY_TIMEOUT,
                "the function did not answer in time\n",
                &id,
            ),
            Err(Some(error)) => {
                tracing::warn!(request_id = id, "forwarding failed: {error}");
                answer_response(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "the cluster bus is unavailable; retry\n",
                    &id,
                )
            }
        }
    }

    /// The largest body forwarded: `--forward-max-body`, and what the server's
    /// `max_payload` leaves room for.
    fn forward_cap(&self) -> u64 {
        let server = self.client.server_info().max_payload as u64;
        self.config
            .forward_max_body
            .min(server.saturating_sub(bus::FORWARD_OVERHEAD))
    }
}

/// Marks a forwarded answer that means "not here any more: try another replica".
const NOT_HERE: &str = "x-lepton-not-here";

fn not_here(response: &http::Response<Bytes>) -> bool {
    response.status() == http::StatusCode::SERVICE_UNAVAILABLE
        && response.headers().contains_key(NOT_HERE)
}

/// One request held for a function with no replica: counted in the heartbeat while it
/// waits, however the wait ends (an answer, the timeout, the client going away).
struct Waiting<'a> {
    counts: &'a Mutex<BTreeMap<String, u64>>,
    key: String,
}

impl<'a> Waiting<'a> {
    fn new(counts: &'a Mutex<BTreeMap<String, u64>>, key: &str) -> Self {
        *Agent::lock(counts).entry(key.to_owned()).or_default() += 1;
        Self {
            counts,
            key: key.to_owned(),
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut counts = Agent::lock(self.counts);
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

fn too_large(function_cap: u64, forward_cap: u64, id: &str) -> hyper::Response<Body> {
    let message = if function_cap <= forward_cap {
        format!(
            "the request body is larger than the function's max_body_size of {function_cap} bytes\n"
        )
    } else {
        format!(
            "the request body is larger than {forward_cap} bytes, the most a gateway forwards to another node (`--forward-max-body`, and the NATS server's max_payload)\n"
        )
    };
    answer_response(http::StatusCode::PAYLOAD_TOO_LARGE, &message, id)
}

fn answer_response(status: http::StatusCode, message: &str, id: &str) -> hyper::Response<Body> {
    let mut response = text(status, message);
    if let Ok(value) = http::HeaderValue::from_str(id) {
        response
            .headers_mut()
            .insert(crate::http::REQUEST_ID_HEADER, value);
    }
    response
}

/// A forwarded answer the host makes itself.
fn answer(status: http::StatusCode, message: &str, id: Option<&str>) -> Bytes {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(value) = id.and_then(|id| http::HeaderValue::from_str(id).ok()) {
        headers.insert(crate::http::REQUEST_ID_HEADER, value);
    }
    wire::encode_response(status, &headers, message.as_bytes())
}

/// `app` with only `functions`, and the models and trainers they use.
pub fn only_functions(app: &LockedApp, functions: &BTreeSet<Name>) -> LockedApp {
    let mut subset = app.clone();
    subset.functions.retain(|f| functions.contains(&f.name));
    let trainers: BTreeSet<&Name> = subset.functions.iter().flat_map(|f| &f.trainers).collect();
    subset.trainers.retain(|t| trainers.contains(&t.name));
    let models: BTreeSet<Name> = subset
        .functions
        .iter()
        .flat_map(|f| f.models.iter().cloned())
        .chain(subset.trainers.iter().filter_map(|t| t.publishes.clone()))
        .collect();
    subset.models.retain(|m| models.contains(&m.name));
    subset.alerts.retain(|a| functions.contains(&a.function));
    subset
}

/// CUDA devices, where ONNX Runtime was built with CUDA: names and memory from
/// `nvidia-smi` when it is there.
pub fn detect_accelerators(models: &crate::nn::ModelRegistry) -> Vec<(String, u64)> {
    if !models.runtime().has_cuda() {
        return Vec::new();
    }
    let listed = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut found: Vec<(String, u64)> = listed
        .lines()
        .filter_map(|line| {
            let (name, mib) = line.rsplit_once(',')?;
            let kind = name.trim().to_lowercase().replace(' ', "-");
            Some((kind, mib.trim().parse::<u64>().ok()? << 20))
        })
        .collect();
    if found.is_empty() {
        found.push(("cuda".to_owned(), 0));
    }
    tracing::info!(
        ?found,
        "accelerators detected through ONNX Runtime's CUDA provider"
    );
    found
}

/// Total and available memory, from `/proc/meminfo`.
fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}
