//! The cluster's bus and store: one NATS connection, its JetStream KV buckets and the
//! blob object store, and the records kept in them.
//!
//! | bucket | key | value |
//! | --- | --- | --- |
//! | `lepton_apps` | app | [`AppEntry`]: every kept version (locked apps) and the active one |
//! | `lepton_desired` | `app.function` | desired replicas (what the autoscaler decided) |
//! | `lepton_placements` | `app.function` | [`PlacementEntry`]: the nodes that run it |
//! | `lepton_nodes` | node | [`Heartbeat`]; every key expires [`HEARTBEAT_TTL`] after its last write |
//! | `lepton_leader` | `leader` | [`Lease`]; expires [`LEASE_TTL`] after the leader's last renewal |
//! | object store `lepton_blobs` | `sha256:<hex>` | the blob |
//!
//! Every value read back is checked: a record that does not parse is skipped with a
//! warning, and a blob is stored only when its bytes hash to the digest it was asked by.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv, object_store};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;

use crate::blobs::BlobStore;
use crate::locked::{Digest, Name};
use crate::node::store::StoredVersion;

/// Apps and their versions.
pub const APPS: &str = "lepton_apps";
/// Desired replicas per function.
pub const DESIRED: &str = "lepton_desired";
/// Where each function runs.
pub const PLACEMENTS: &str = "lepton_placements";
/// Node heartbeats.
pub const NODES: &str = "lepton_nodes";
/// The control plane's leader lease.
pub const LEADER: &str = "lepton_leader";
/// Blobs by digest.
pub const BLOBS: &str = "lepton_blobs";

/// How often a node heartbeats.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
/// A node not heard from for this long is lost.
pub const NODE_LOST_AFTER: Duration = Duration::from_millis(1500);
/// How long a heartbeat stays in its bucket.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(10);
/// How long a leader's lease lasts without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(3);

/// Requests (and responses) forwarded between gateways are at most this large by
/// default; the NATS server's `max_payload` must be at least this plus
/// [`FORWARD_OVERHEAD`].
pub const DEFAULT_FORWARD_MAX_BODY: u64 = 8 << 20;
/// Room kept in a NATS message for the request line and headers.
pub const FORWARD_OVERHEAD: u64 = 64 << 10;
/// Largest blob accepted from the object store.
pub const MAX_BLOB: u64 = 8 << 30;
/// Largest record read from a KV bucket.
const MAX_RECORD: usize = 16 << 20;

/// Every kept version of one app and the active one (the control plane's app store,
/// mirrored).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppEntry {
    /// The app.
    pub name: Name,
    /// The version serving.
    pub active: u64,
    /// Every kept version, oldest first.
    pub versions: Vec<StoredVersion>,
}

impl AppEntry {
    /// The active version.
    pub fn active_version(&self) -> Option<&StoredVersion> {
        self.versions.iter().find(|v| v.version == self.active)
    }

    /// Whether the record is what its key says: the same app name in the record and in
    /// every version, each version's digest its app's, and the active version kept.
    pub fn is_consistent(&self, key: &str) -> bool {
        self.name.as_str() == key
            && self.active_version().is_some()
            && self
                .versions
                .iter()
                .all(|v| v.app.name == self.name && v.digest == v.app.digest())
    }

    /// Version `version`, if kept.
    pub fn version(&self, version: u64) -> Option<&StoredVersion> {
        self.versions.iter().find(|v| v.version == version)
    }
}

/// Where one function runs: the nodes, and the version they run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementEntry {
    /// The app.
    pub app: Name,
    /// The function.
    pub function: Name,
    /// The app version to run.
    pub version: u64,
    /// The nodes, by name.
    pub nodes: Vec<String>,
}

/// One replica as its node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaReport {
    /// The app.
    pub app: Name,
    /// The function.
    pub function: Name,
    /// The version it serves (or failed to start).
    pub version: u64,
    /// `running` or `failed`.
    pub state: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Requests in flight on it now.
    pub in_flight: u64,
}

/// A node's heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The node's name.
    pub name: String,
    /// Its labels (`tier`, `region`, ...).
    pub labels: BTreeMap<String, String>,
    /// Cores × 1000.
    pub cpu_millis: u64,
    /// Memory, in bytes.
    pub memory_bytes: u64,
    /// Free memory, in bytes.
    pub free_memory_bytes: u64,
    /// Accelerators: kind and memory in bytes.
    pub accelerators: Vec<(String, u64)>,
    /// Whether it can run ONNX models.
    pub onnx: bool,
    /// Models resident on it, by digest.
    pub resident_models: Vec<Digest>,
    /// Its replicas.
    pub replicas: Vec<ReplicaReport>,
    /// Its gateway's address.
    pub gateway: String,
    /// Requests its gateway holds for a function with no replica (activation).
    #[serde(default)]
    pub waiting: BTreeMap<String, u64>,
    /// Unix time of the heartbeat, in milliseconds.
    pub time_ms: u64,
}

/// The control plane's leader lease.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// Who holds it (a name unique per process).
    pub holder: String,
    /// Its admin API.
    pub admin: String,
}

/// The key of a function in `lepton_desired` and `lepton_placements`.
pub fn function_key(app: &Name, function: &Name) -> String {
    format!("{app}.{function}")
}

/// The subject forwarded requests for a function are sent to.
pub fn function_subject(app: &Name, function: &Name) -> String {
    format!("lepton.fn.{app}.{function}")
}

/// The subject a gateway asks for a replica of a function with none on.
pub const ACTIVATE_SUBJECT: &str = "lepton.activate";

/// How a process reaches NATS: `--nats URL[,URL...]` (credentials as
/// `nats://user:password@host:port` or `nats://token@host:port`) and `--nats-creds FILE`.
pub async fn connect(
    urls: &str,
    creds: Option<&Path>,
    name: &str,
) -> anyhow::Result<async_nats::Client> {
    let addresses = urls
        .split(',')
        .map(|url| {
            async_nats::ServerAddr::from_str(url.trim())
                .with_context(|| format!("`--nats {url}` is not a NATS URL"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let first = addresses.first().context("`--nats` names no server")?;
    let mut options = match creds {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .with_context(|| format!("reading NATS credentials `{}`", path.display()))?,
        None => async_nats::ConnectOptions::new(),
    };
    match (first.username(), first.password()) {
        (Some(user), Some(password)) => {
            options = options.user_and_password(user.to_owned(), password.to_owned());
        }
        (Some(token), None) => options = options.token(token.to_owned()),
        _ => {}
    }
    let shown: Vec<String> = addresses
        .iter()
        .map(|a| format!("{}:{}", a.host(), a.port()))
        .collect();
    options
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("NATS: connected"),
                async_nats::Event::Disconnected => tracing::warn!("NATS: disconnected"),
                other => tracing::debug!("NATS: {other}"),
            }
        })
        .connect(addresses)
        .await
        .with_context(|| format!("connecting to NATS at {}", shown.join(",")))
}

/// The buckets and the object store, created when missing.
#[derive(Clone)]
pub struct Store {
    /// The JetStream context.
    pub js: jetstream::Context,
    /// `lepton_apps`.
    pub apps: kv::Store,
    /// `lepton_desired`.
    pub desired: kv::Store,
    /// `lepton_placements`.
    pub placements: kv::Store,
    /// `lepton_nodes`.
    pub nodes: kv::Store,
    /// `lepton_leader`.
    pub leader: kv::Store,
    /// `lepton_blobs`.
    pub blobs: object_store::ObjectStore,
}

impl Store {
    /// Opens (creating what is missing) every bucket; `domain` is the hub's JetStream
    /// domain, for a process connected to a leaf server.
    pub async fn open(client: &async_nats::Client, domain: Option<&str>) -> anyhow::Result<Self> {
        let js = match domain {
            Some(domain) => jetstream::with_domain(client.clone(), domain),
            None => jetstream::new(client.clone()),
        };
        let bucket = |name: &'static str, history: i64, max_age: Duration| {
            let js = js.clone();
            async move {
                if let Ok(store) = js.get_key_value(name).await {
                    return Ok(store);
                }
                js.create_key_value(kv::Config {
                    bucket: name.to_owned(),
                    history,
                    max_age,
                    max_value_size: i32::try_from(MAX_RECORD).unwrap_or(i32::MAX),
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating the JetStream KV bucket `{name}`"))
            }
        };
        let apps = bucket(APPS, 5, Duration::ZERO).await?;
        let desired = bucket(DESIRED, 1, Duration::ZERO).await?;
        let placements = bucket(PLACEMENTS, 1, Duration::ZERO).await?;
        let nodes = bucket(NODES, 1, HEARTBEAT_TTL).await?;
        let leader = bucket(LEADER, 1, LEASE_TTL).await?;
        let blobs = match js.get_object_store(BLOBS).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: BLOBS.to_owned(),
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("creating the JetStream object store `{BLOBS}`"))?,
        };
        Ok(Self {
            js,
            apps,
            desired,
            placements,
            nodes,
            leader,
            blobs,
        })
    }

    /// Uploads the blob `digest` from `local` unless the object store has it.
    pub async fn upload_blob(&self, local: &BlobStore, digest: &Digest) -> anyhow::Result<()> {
        let info = tokio::time::timeout(STORE_REQUEST_TIMEOUT, self.blobs.info(digest.as_str()))
            .await
            .with_context(|| format!("asking the object store for blob {digest}: no answer"))?;
        if info.is_ok() {
            return Ok(());
        }
        let path = local.path(digest);
        let mut file = tokio::fs::File::open(&path)
            .await
            .with_context(|| format!("opening blob `{}`", path.display()))?;
        self.blobs
            .put(digest.as_str(), &mut file)
            .await
            .with_context(|| format!("uploading blob {digest} to the object store"))?;
        Ok(())
    }

    /// Fetches the blob `digest` into `local`, refusing bytes that do not hash to it.
    pub async fn fetch_blob(&self, local: &BlobStore, digest: &Digest) -> anyhow::Result<()> {
        if local.touch(digest) {
            return Ok(());
        }
        let mut object =
            tokio::time::timeout(STORE_REQUEST_TIMEOUT, self.blobs.get(digest.as_str()))
                .await
                .with_context(|| format!("asking the object store for blob {digest}: no answer"))?
                .with_context(|| format!("blob {digest} is not in the object store"))?;
        let mut writer = local
            .writer(digest.clone(), MAX_BLOB)
            .with_context(|| format!("storing blob {digest}"))?;
        let mut buffer = vec![0u8; 256 << 10];
        loop {
            let n = tokio::time::timeout(STORE_REQUEST_TIMEOUT, object.read(&mut buffer))
                .await
                .with_context(|| format!("reading blob {digest} from the object store: stalled"))?
                .with_context(|| format!("reading blob {digest} from the object store"))?;
            if n == 0 {
                break;
            }
            let chunk = buffer.get(..n).unwrap_or_default();
            tokio::task::block_in_place(|| writer.write(chunk))
                .with_context(|| format!("storing blob {digest}"))?;
        }
        tokio::task::spawn_blocking(move || writer.finish())
            .await
            .context("storing a blob")?
            .with_context(|| format!("blob {digest} from the object store"))?;
        Ok(())
    }
}

/// Parses a record read from a bucket; `None` (with a warning) when it does not parse.
pub fn parse_record<T: serde::de::DeserializeOwned>(
    bucket: &str,
    key: &str,
    value: &Bytes,
) -> Option<T> {
    if value.len() > MAX_RECORD {
        tracing::warn!(bucket, key, "skipping a record of {} bytes", value.len());
        return None;
    }
    match serde_json::from_slice(value) {
        Ok(record) => Some(record),
        Err(error) => {
            tracing::warn!(
                bucket,
                key,
                "skipping a record that does not parse: {error}"
            );
            None
        }
    }
}

/// Reads every record of `store` that parses.
pub async fn read_all<T: serde::de::DeserializeOwned>(
    store: &kv::Store,
    bucket: &str,
) -> anyhow::Result<BTreeMap<String, T>> {
    tokio::time::timeout(READ_ALL_TIMEOUT, read_all_inner(store, bucket))
        .await
        .map_err(|_| anyhow::anyhow!("reading `{bucket}` took more than {READ_ALL_TIMEOUT:?}"))?
}

/// How long one request to JetStream (or one chunk of a blob) may take.
const STORE_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long reading a whole bucket may take before it is tried again.
const READ_ALL_TIMEOUT: Duration = Duration::from_secs(5);

async fn read_all_inner<T: serde::de::DeserializeOwned>(
    store: &kv::Store,
    bucket: &str,
) -> anyhow::Result<BTreeMap<String, T>> {
    use futures::StreamExt as _;
    let mut out = BTreeMap::new();
    let mut keys = store
        .keys()
        .await
        .with_context(|| format!("listing `{bucket}`"))?;
    let mut names = Vec::new();
    while let Some(key) = keys.next().await {
        names.push(key.with_context(|| format!("listing `{bucket}`"))?);
    }
    for key in names {
        if let Some(value) = store
            .get(key.as_str())
            .await
            .with_context(|| format!("reading `{bucket}/{key}`"))?
            && let Some(record) = parse_record(bucket, &key, &value)
        {
            out.insert(key, record);
        }
    }
    Ok(out)
}
