//! `wasi:keyvalue@0.2.0-draft` (`store`, `atomics`, `batch`), as wasmtime 48 ships the
//! interfaces, on stores granted per function (`key_value_stores = [...]`).
//!
//! A store belongs to its app: every function of the app granted `cache` sees the
//! same `cache`, and no other app can name it. On a node the stores live in one
//! [redb](https://docs.rs/redb) database in the state dir (`kv.redb`); every change is
//! a committed, fsynced transaction before the guest's call returns, so it survives a
//! restart and `kill -9`. Each write is one write transaction, and redb runs one at a
//! time, so `increment` and the batch calls are atomic under concurrent requests. On a
//! cluster node they are JetStream KV buckets: `increment` is compare-and-set on the
//! key's revision, and batch calls run key by key (not atomic).
//!
//! Limits ([`Limits`]) answer the guest with the interface's `other` error, never a
//! host failure.

use std::path::Path;
use std::sync::Arc;

use redb::{
    ReadableDatabase as _, ReadableTable as _, TableDefinition, TableError, TableHandle as _,
};
use wasmtime::component::{HasData, Resource, ResourceTable};

use crate::locked::Name;

mod generated {
    wasmtime::component::bindgen!({
        path: "../wit/deps/keyvalue",
        world: "wasi:keyvalue/imports",
        imports: { default: async | trappable },
        with: {
            "wasi:keyvalue/store.bucket": super::Bucket,
        },
        trappable_error_type: {
            "wasi:keyvalue/store.error" => super::KvError,
        },
        require_store_data_send: true,
    });
}

use generated::wasi::keyvalue::{atomics, batch, store};

/// What a node's stores may hold, by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest key, in bytes.
    pub key_bytes: usize,
    /// Largest value, in bytes.
    pub value_bytes: usize,
    /// Keys in one store.
    pub keys: u64,
    /// Bytes of keys and values in one store.
    pub store_bytes: u64,
    /// Keys one `list-keys` call returns (its cursor gives the next page).
    pub page: usize,
    /// Keys one batch call takes.
    pub batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            key_bytes: 1024,
            value_bytes: 1 << 20,
            keys: 100_000,
            store_bytes: 64 << 20,
            page: 1000,
            batch: 1000,
        }
    }
}

/// What a guest's call gets back when it fails (mapped to the interface's error).
#[derive(Debug)]
pub enum KvError {
    /// The store is not granted to this function.
    AccessDenied,
    /// A limit, or the store failed.
    Other(String),
    /// A host failure: the call traps.
    Trap(wasmtime::Error),
}

fn other(message: impl Into<String>) -> KvError {
    KvError::Other(message.into())
}

/// A guest's open store.
pub struct Bucket {
    app: Name,
    store: Name,
}

/// `(keys, bytes)` of each store, kept with its data in the same transactions.
const META: TableDefinition<'static, &str, (u64, u64)> = TableDefinition::new("lepton.meta");

fn table_name(app: &Name, store: &Name) -> String {
    format!("kv/{app}/{store}")
}

/// The node's key-value stores: in the state dir (`lepton up`), or in JetStream (a
/// cluster node, so that every replica sees the same data).
pub struct Stores {
    backend: Backend,
    limits: Limits,
}

enum Backend {
    Local(Local),
    Cluster(Box<Cluster>),
}

impl Stores {
    /// Opens (or creates) the stores' database at `path`.
    pub fn open(path: &Path, limits: Limits) -> anyhow::Result<Self> {
        Ok(Self {
            backend: Backend::Local(Local::open(path, limits)?),
            limits,
        })
    }

    /// Stores kept in JetStream KV buckets, one per app and store
    /// (`lepton_kv_<len>_<app>_<store>`), created on first use.
    pub fn cluster(js: async_nats::jetstream::Context, limits: Limits) -> Self {
        Self {
            backend: Backend::Cluster(Box::new(Cluster {
                js,
                limits,
                buckets: tokio::sync::Mutex::new(std::collections::HashMap::new()),
            })),
            limits,
        }
    }

    /// The limits every store has.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Removes every store of `app` (the app was removed from the node).
    pub fn remove_app(&self, app: &Name) -> anyhow::Result<()> {
        match &self.backend {
            Backend::Local(local) => local.remove_app(app),
            // A cluster's stores outlive any one node: the control plane's removal
            // is what ends them (left to the operator: `nats kv del`).
            Backend::Cluster(_) => Ok(()),
        }
    }

    fn check_batch(&self, len: usize) -> Result<(), KvError> {
        if len > self.limits.batch {
            return Err(other(format!(
                "a batch takes at most {} keys",
                self.limits.batch
            )));
        }
        Ok(())
    }

    async fn get(
        self: Arc<Self>,
        bucket: (Name, Name),
        key: String,
    ) -> Result<Option<Vec<u8>>, KvError> {
        check_key(&key, &self.limits)?;
        match &self.backend {
            Backend::Local(_) => {
                blocking(move || self.local().get(&table_name(&bucket.0, &bucket.1), &key)).await
            }
            Backend::Cluster(cluster) => cluster.get(&bucket, &key).await,
        }
    }

    async fn set(
        self: Arc<Self>,
        bucket: (Name, Name),
        key: String,
        value: Vec<u8>,
    ) -> Result<(), KvError> {
        match &self.backend {
            Backend::Local(_) => self.local_write(bucket, move |w| w.set(&key, &value)).await,
            Backend::Cluster(cluster) => cluster.set(&bucket, &key, value).await,
        }
    }

    async fn delete(self: Arc<Self>, bucket: (Name, Name), key: String) -> Result<(), KvError> {
        match &self.backend {
            Backend::Local(_) => self.local_write(bucket, move |w| w.delete(&key)).await,
            Backend::Cluster(cluster) => cluster.delete(&bucket, &key).await,
        }
    }

    async fn list(
        self: Arc<Self>,
        bucket: (Name, Name),
        cursor: u64,
    ) -> Result<(Vec<String>, Option<u64>), KvError> {
        match &self.backend {
            Backend::Local(_) => {
                blocking(move || self.local().list(&table_name(&bucket.0, &bucket.1), cursor)).await
            }
            Backend::Cluster(cluster) => cluster.list(&bucket, cursor).await,
        }
    }

    async fn increment(
        self: Arc<Self>,
        bucket: (Name, Name),
        key: String,
        delta: u64,
    ) -> Result<u64, KvError> {
        match &self.backend {
            Backend::Local(_) => {
                self.local_write(bucket, move |w| {
                    let next = add(&key, w.get(&key)?.as_deref(), delta)?;
                    w.set(&key, next.to_string().as_bytes())?;
                    Ok(next)
                })
                .await
            }
            Backend::Cluster(cluster) => cluster.increment(&bucket, &key, delta).await,
        }
    }

    async fn set_many(
        self: Arc<Self>,
        bucket: (Name, Name),
        pairs: Vec<(String, Vec<u8>)>,
    ) -> Result<(), KvError> {
        self.check_batch(pairs.len())?;
        match &self.backend {
            Backend::Local(_) => {
                self.local_write(bucket, move |w| {
                    pairs.iter().try_for_each(|(key, value)| w.set(key, value))
                })
                .await
            }
            Backend::Cluster(cluster) => {
                for (key, value) in pairs {
                    cluster.set(&bucket, &key, value).await?;
                }
                Ok(())
            }
        }
    }

    async fn delete_many(
        self: Arc<Self>,
        bucket: (Name, Name),
        keys: Vec<String>,
    ) -> Result<(), KvError> {
        self.check_batch(keys.len())?;
        match &self.backend {
            Backend::Local(_) => {
                self.local_write(bucket, move |w| {
                    keys.iter().try_for_each(|key| w.delete(key))
                })
                .await
            }
            Backend::Cluster(cluster) => {
                for key in keys {
                    cluster.delete(&bucket, &key).await?;
                }
                Ok(())
            }
        }
    }

    /// Runs `change` on the local store of `bucket` in one write transaction, off the
    /// async workers.
    async fn local_write<R: Send + 'static>(
        self: Arc<Self>,
        bucket: (Name, Name),
        change: impl FnOnce(&mut Writer<'_, '_>) -> Result<R, KvError> + Send + 'static,
    ) -> Result<R, KvError> {
        blocking(move || {
            self.local()
                .write(&table_name(&bucket.0, &bucket.1), change)
        })
        .await
    }

    fn local(&self) -> &Local {
        match &self.backend {
            Backend::Local(local) => local,
            Backend::Cluster(_) => unreachable!("called on the local backend only"),
        }
    }
}

/// `delta` added to the decimal number `current` holds (0 when unset).
fn add(key: &str, current: Option<&[u8]>, delta: u64) -> Result<u64, KvError> {
    let current = match current {
        None => 0,
        Some(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or_else(|| {
                other(format!(
                    "the value of {key:?} is not a decimal number to increment"
                ))
            })?,
    };
    current
        .checked_add(delta)
        .ok_or_else(|| other(format!("incrementing {key:?} overflows u64")))
}

/// The stores of a node on its own: one redb database.
struct Local {
    db: redb::Database,
    limits: Limits,
}

impl Local {
    fn open(path: &Path, limits: Limits) -> anyhow::Result<Self> {
        let db = redb::Database::create(path).map_err(|e| {
            anyhow::anyhow!("opening the key-value database `{}`: {e}", path.display())
        })?;
        Ok(Self { db, limits })
    }

    fn get(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = match txn.open_table(TableDefinition::<&str, &[u8]>::new(table)) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(storage(e)),
        };
        Ok(table
            .get(key)
            .map_err(storage)?
            .map(|value| value.value().to_vec()))
    }

    fn list(&self, table: &str, cursor: u64) -> Result<(Vec<String>, Option<u64>), KvError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = match txn.open_table(TableDefinition::<&str, &[u8]>::new(table)) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok((Vec::new(), None)),
            Err(e) => return Err(storage(e)),
        };
        let skip = usize::try_from(cursor).unwrap_or(usize::MAX);
        let mut keys = Vec::new();
        let mut more = false;
        for entry in table.iter().map_err(storage)?.skip(skip) {
            if keys.len() == self.limits.page {
                more = true;
                break;
            }
            let (key, _) = entry.map_err(storage)?;
            keys.push(key.value().to_owned());
        }
        let next = more.then(|| cursor + keys.len() as u64);
        Ok((keys, next))
    }

    /// Runs `change` on `table` in one write transaction, keeping its counts and
    /// checking its limits; nothing is written when it fails.
    fn write<R>(
        &self,
        table: &str,
        change: impl FnOnce(&mut Writer<'_, '_>) -> Result<R, KvError>,
    ) -> Result<R, KvError> {
        let txn = self.db.begin_write().map_err(storage)?;
        let result = {
            let mut meta = txn.open_table(META).map_err(storage)?;
            let (keys, bytes) = meta
                .get(table)
                .map_err(storage)?
                .map(|v| v.value())
                .unwrap_or((0, 0));
            let mut data = txn
                .open_table(TableDefinition::<&str, &[u8]>::new(table))
                .map_err(storage)?;
            let mut writer = Writer {
                data: &mut data,
                keys,
                bytes,
                limits: self.limits,
            };
            let result = change(&mut writer)?;
            let counts = (writer.keys, writer.bytes);
            meta.insert(table, counts).map_err(storage)?;
            result
        };
        txn.commit().map_err(storage)?;
        Ok(result)
    }

    fn remove_app(&self, app: &Name) -> anyhow::Result<()> {
        let prefix = format!("kv/{app}/");
        let txn = self.db.begin_write()?;
        let names: Vec<String> = txn
            .list_tables()?
            .map(|t| t.name().to_owned())
            .filter(|name| name.starts_with(&prefix))
            .collect();
        {
            let mut meta = txn.open_table(META)?;
            for name in &names {
                txn.delete_table(TableDefinition::<&str, &[u8]>::new(name))?;
                meta.remove(&**name)?;
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// The stores of a cluster node: JetStream KV buckets, shared by every node.
struct Cluster {
    js: async_nats::jetstream::Context,
    limits: Limits,
    buckets:
        tokio::sync::Mutex<std::collections::HashMap<String, async_nats::jetstream::kv::Store>>,
}

/// JetStream's own deadline is per request; this bounds one call of ours.
const CLUSTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Rounds of compare-and-set an `increment` tries before it gives up.
const MAX_CAS_ROUNDS: usize = 1000;

/// A guest's key as a JetStream KV key: hex, which the key alphabet
/// (`[-/_=.a-zA-Z0-9]`) holds whatever the guest's key is.
fn encode_key(key: &str) -> String {
    hex::encode(key)
}

fn decode_key(key: &str) -> Option<String> {
    String::from_utf8(hex::decode(key).ok()?).ok()
}

/// The bucket of `app`'s store `store`: the app name's length keeps `a_b`+`c`
/// apart from `a`+`b_c`.
pub fn bucket_name(app: &Name, store: &Name) -> String {
    format!("lepton_kv_{}_{app}_{store}", app.as_str().len())
}

async fn bounded<T, E: std::fmt::Display>(
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, KvError> {
    match tokio::time::timeout(CLUSTER_TIMEOUT, call).await {
        Ok(result) => result.map_err(storage),
        Err(_) => Err(other("the cluster's store did not answer in time")),
    }
}

impl Cluster {
    async fn bucket(
        &self,
        (app, store): &(Name, Name),
    ) -> Result<async_nats::jetstream::kv::Store, KvError> {
        let name = bucket_name(app, store);
        let mut buckets = self.buckets.lock().await;
        if let Some(bucket) = buckets.get(&name) {
            return Ok(bucket.clone());
        }
        let bucket = match bounded(self.js.get_key_value(&name)).await {
            Ok(bucket) => bucket,
            Err(_) => {
                bounded(
                    self.js.create_key_value(async_nats::jetstream::kv::Config {
                        bucket: name.clone(),
                        description: format!("wasi:keyvalue store `{store}` of app `{app}`"),
                        history: 1,
                        max_value_size: i32::try_from(
                            self.limits.value_bytes + self.limits.key_bytes * 2,
                        )
                        .unwrap_or(i32::MAX),
                        max_bytes: i64::try_from(self.limits.store_bytes).unwrap_or(i64::MAX),
                        storage: async_nats::jetstream::stream::StorageType::File,
                        ..Default::default()
                    }),
                )
                .await?
            }
        };
        buckets.insert(name, bucket.clone());
        Ok(bucket)
    }

    async fn get(&self, bucket: &(Name, Name), key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let store = self.bucket(bucket).await?;
        Ok(bounded(store.get(encode_key(key)))
            .await?
            .map(|v| v.to_vec()))
    }

    /// Checks what a write must satisfy before it is sent, the key count too when the
    /// key is new.
    async fn check_write(
        &self,
        store: &async_nats::jetstream::kv::Store,
        key: &str,
        value: &[u8],
    ) -> Result<(), KvError> {
        check_entry(key, value, &self.limits)?;
        if bounded(store.get(encode_key(key))).await?.is_none() {
            // Fresh, not the snapshot the bucket was opened with. It counts deletion
            // markers too, so the limit is reached early, never late.
            let mut stream = store.stream.clone();
            let messages = bounded(stream.info()).await?.state.messages;
            if messages >= self.limits.keys {
                return Err(other(format!(
                    "a store holds at most {} keys",
                    self.limits.keys
                )));
            }
        }
        Ok(())
    }

    async fn set(&self, bucket: &(Name, Name), key: &str, value: Vec<u8>) -> Result<(), KvError> {
        let store = self.bucket(bucket).await?;
        self.check_write(&store, key, &value).await?;
        match tokio::time::timeout(CLUSTER_TIMEOUT, store.put(encode_key(key), value.into())).await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => {
                tracing::warn!("key-value put: {error}");
                Err(other(format!(
                    "the store refused the value (it holds at most {} bytes of keys and values)",
                    self.limits.store_bytes
                )))
            }
            Err(_) => Err(other("the cluster's store did not answer in time")),
        }
    }

    async fn delete(&self, bucket: &(Name, Name), key: &str) -> Result<(), KvError> {
        check_key(key, &self.limits)?;
        let store = self.bucket(bucket).await?;
        // Purge, not delete: the value's bytes go, not only its visibility.
        bounded(store.purge(encode_key(key))).await
    }

    async fn list(
        &self,
        bucket: &(Name, Name),
        cursor: u64,
    ) -> Result<(Vec<String>, Option<u64>), KvError> {
        use futures::StreamExt as _;
        let store = self.bucket(bucket).await?;
        let mut keys = Vec::new();
        let mut stream = bounded(store.keys()).await?;
        while let Some(key) = tokio::time::timeout(CLUSTER_TIMEOUT, stream.next())
            .await
            .map_err(|_| other("the cluster's store did not answer in time"))?
        {
            if let Some(key) = decode_key(&key.map_err(storage)?) {
                keys.push(key);
            }
        }
        // The same order on every call, so that a cursor means the same thing.
        keys.sort();
        let skip = usize::try_from(cursor)
            .unwrap_or(usize::MAX)
            .min(keys.len());
        let page: Vec<String> = keys[skip..]
            .iter()
            .take(self.limits.page)
            .cloned()
            .collect();
        let next = (skip + page.len() < keys.len()).then(|| (skip + page.len()) as u64);
        Ok((page, next))
    }

    /// Compare-and-set on the key's revision, retried while other writers win.
    async fn increment(
        &self,
        bucket: &(Name, Name),
        key: &str,
        delta: u64,
    ) -> Result<u64, KvError> {
        use async_nats::jetstream::kv::{CreateErrorKind, Operation, UpdateErrorKind};
        check_key(key, &self.limits)?;
        let store = self.bucket(bucket).await?;
        let encoded = encode_key(key);
        for _ in 0..MAX_CAS_ROUNDS {
            let entry = bounded(store.entry(encoded.clone())).await?;
            let live = entry.as_ref().filter(|e| e.operation == Operation::Put);
            let next = add(key, live.map(|e| &e.value[..]), delta)?;
            let bytes = bytes::Bytes::from(next.to_string());
            if live.is_none() {
                self.check_write(&store, key, b"").await?;
            }
            let written = match &entry {
                Some(e) if e.operation == Operation::Put => {
                    match tokio::time::timeout(
                        CLUSTER_TIMEOUT,
                        store.update(&encoded, bytes, e.revision),
                    )
                    .await
                    {
                        Ok(Ok(_)) => true,
                        Ok(Err(error)) if error.kind() == UpdateErrorKind::WrongLastRevision => {
                            false
                        }
                        Ok(Err(error)) => return Err(storage(error)),
                        Err(_) => return Err(other("the cluster's store did not answer in time")),
                    }
                }
                _ => match tokio::time::timeout(CLUSTER_TIMEOUT, store.create(&encoded, bytes))
                    .await
                {
                    Ok(Ok(_)) => true,
                    Ok(Err(error)) if error.kind() == CreateErrorKind::AlreadyExists => false,
                    Ok(Err(error)) => return Err(storage(error)),
                    Err(_) => return Err(other("the cluster's store did not answer in time")),
                },
            };
            if written {
                return Ok(next);
            }
        }
        Err(other(format!(
            "{key:?} changed {MAX_CAS_ROUNDS} times while it was incremented; retry"
        )))
    }
}

fn storage(error: impl std::fmt::Display) -> KvError {
    tracing::warn!("key-value store: {error}");
    KvError::Other("the store failed; see the node's log".into())
}

/// One store's data inside a write transaction, with its counts.
struct Writer<'t, 'd> {
    data: &'d mut redb::Table<'t, &'static str, &'static [u8]>,
    keys: u64,
    bytes: u64,
    limits: Limits,
}

impl Writer<'_, '_> {
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), KvError> {
        check_entry(key, value, &self.limits)?;
        let old = self
            .data
            .get(key)
            .map_err(storage)?
            .map(|v| v.value().len() as u64);
        let keys = self.keys + u64::from(old.is_none());
        let bytes = self
            .bytes
            .checked_sub(old.map_or(0, |len| len + key.len() as u64))
            .ok_or_else(|| storage("the store's byte count is below its contents"))?
            + (key.len() + value.len()) as u64;
        if keys > self.limits.keys {
            return Err(other(format!(
                "a store holds at most {} keys",
                self.limits.keys
            )));
        }
        if bytes > self.limits.store_bytes {
            return Err(other(format!(
                "a store holds at most {} bytes of keys and values",
                self.limits.store_bytes
            )));
        }
        self.data.insert(key, value).map_err(storage)?;
        (self.keys, self.bytes) = (keys, bytes);
        Ok(())
    }

    fn delete(&mut self, key: &str) -> Result<(), KvError> {
        check_key(key, &self.limits)?;
        if let Some(old) = self.data.remove(key).map_err(storage)? {
            let drift = || storage("the store's counts are below its contents");
            self.keys = self.keys.checked_sub(1).ok_or_else(drift)?;
            self.bytes = self
                .bytes
                .checked_sub((key.len() + old.value().len()) as u64)
                .ok_or_else(drift)?;
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self
            .data
            .get(key)
            .map_err(storage)?
            .map(|v| v.value().to_vec()))
    }
}

/// Checks a key and the value to be written under it against `limits`.
fn check_entry(key: &str, value: &[u8], limits: &Limits) -> Result<(), KvError> {
    check_key(key, limits)?;
    if value.len() > limits.value_bytes {
        return Err(other(format!(
            "values are at most {} bytes; this one is {}",
            limits.value_bytes,
            value.len()
        )));
    }
    Ok(())
}

fn check_key(key: &str, limits: &Limits) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(other("keys are at least 1 byte"));
    }
    if key.len() > limits.key_bytes {
        return Err(other(format!(
            "keys are at most {} bytes; this one is {}",
            limits.key_bytes,
            key.len()
        )));
    }
    Ok(())
}

/// What one instance may open: its app's stores that its function is granted.
#[derive(Clone, Default)]
pub struct KvCtx {
    inner: Option<Arc<Granted>>,
}

struct Granted {
    stores: Arc<Stores>,
    app: Name,
    names: Vec<Name>,
}

impl KvCtx {
    /// The stores `names` of `app`.
    pub fn new(stores: Arc<Stores>, app: Name, names: Vec<Name>) -> Self {
        Self {
            inner: Some(Arc::new(Granted { stores, app, names })),
        }
    }
}

/// The `wasi:keyvalue` view of an instance.
pub struct KvView<'a> {
    ctx: &'a KvCtx,
    table: &'a mut ResourceTable,
}

impl<'a> KvView<'a> {
    /// A view over `ctx` and the instance's resource table.
    pub fn new(ctx: &'a KvCtx, table: &'a mut ResourceTable) -> Self {
        Self { ctx, table }
    }

    /// The stores and the app and store names of `bucket`.
    fn open_bucket(
        &self,
        bucket: &Resource<Bucket>,
    ) -> Result<(Arc<Stores>, (Name, Name)), KvError> {
        let stores = self
            .ctx
            .inner
            .as_ref()
            .map(|g| Arc::clone(&g.stores))
            .ok_or(KvError::AccessDenied)?;
        let bucket = self
            .table
            .get(bucket)
            .map_err(|e| KvError::Trap(e.into()))?;
        Ok((stores, (bucket.app.clone(), bucket.store.clone())))
    }
}

/// Runs blocking store work off the async worker threads.
async fn blocking<R: Send + 'static>(
    work: impl FnOnce() -> Result<R, KvError> + Send + 'static,
) -> Result<R, KvError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| KvError::Trap(wasmtime::Error::msg(format!("key-value work failed: {e}"))))?
}

impl store::Host for KvView<'_> {
    async fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, KvError> {
        let Some(granted) = &self.ctx.inner else {
            return Err(KvError::AccessDenied);
        };
        let Some(name) = granted.names.iter().find(|n| n.as_str() == identifier) else {
            return Err(KvError::AccessDenied);
        };
        let bucket = Bucket {
            app: granted.app.clone(),
            store: name.clone(),
        };
        self.table.push(bucket).map_err(|e| KvError::Trap(e.into()))
    }

    fn convert_error(&mut self, error: KvError) -> wasmtime::Result<store::Error> {
        match error {
            KvError::AccessDenied => Ok(store::Error::AccessDenied),
            KvError::Other(message) => Ok(store::Error::Other(message)),
            KvError::Trap(error) => Err(error),
        }
    }
}

impl store::HostBucket for KvView<'_> {
    async fn get(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> Result<Option<Vec<u8>>, KvError> {
        let (stores, bucket) = self.open_bucket(&bucket)?;
        stores.get(bucket, key).await
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), KvError> {
        let (stores, bucket) = self.open_bucket(&bucket)?;
        stores.set(bucket, key, value).await
    }

    async fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), KvError> {
        let (stores, bucket) = self.open_bucket(&bucket)?;
        stores.delete(bucket, key).await
    }

    async fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, KvError> {
        let (stores, bucket) = self.open_bucket(&bucket)?;
        Ok(stores.get(bucket, key).await?.is_some())
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<u64>,
    ) -> Result<store::KeyResponse, KvError> {
        let (stores, bucket) = self.open_bucket(&bucket)?;
        let (keys, cursor) = stores.list(bucket, cursor.unwrap_or(0)).await?;
        Ok(store::KeyResponse { keys, cursor })
    }

    async fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for KvView<'_> {
    /// Adds `delta` to the key's value, read as a decimal `u64` (0 when absent), and
    /// writes it back as decimal text, atomically.
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: u64,
    ) -> Result<u64, KvError> {
        let (stores, bucket) = self.open_bucket(&bucket)?;
        stores.increment(bucket, key, delta).await
    }
}

impl batch::Host for KvView<'_> {
    async fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<Option<(String, Vec<u8>)>>, KvError> {
        let (stores, bucket) = self.open_bucket(&bucket)?;
        stores.check_batch(keys.len())?;
        let mut found = Vec::with_capacity(keys.len());
        for key in keys {
            let value = Arc::clone(&stores).get(bucket.clone(), key.clone()).await?;
            found.push(value.map(|value| (key, value)));
        }
        Ok(found)
    }

    async fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> Result<(), KvError> {
        let (stores, bucket) = self.open_bucket(&bucket)?;
        stores.set_many(bucket, key_values).await
    }

    async fn delete_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<(), KvError> {
        let (stores, bucket) = self.open_bucket(&bucket)?;
        stores.delete_many(bucket, keys).await
    }
}

struct HasKv;

impl HasData for HasKv {
    type Data<'a> = KvView<'a>;
}

/// Links `wasi:keyvalue/{store,atomics,batch}@0.2.0-draft`.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut wasmtime::component::Linker<T>,
    view: fn(&mut T) -> KvView<'_>,
) -> wasmtime::Result<()> {
    store::add_to_linker::<T, HasKv>(linker, view)?;
    atomics::add_to_linker::<T, HasKv>(linker, view)?;
    batch::add_to_linker::<T, HasKv>(linker, view)?;
    Ok(())
}

/// Whether a component imports any `wasi:keyvalue` interface.
pub fn imports_keyvalue<'a>(mut imports: impl Iterator<Item = &'a str>) -> bool {
    imports.any(|name| name.starts_with("wasi:keyvalue/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stores(limits: Limits) -> (tempfile::TempDir, Local) {
        let dir = tempfile::tempdir().expect("temp dir");
        let stores = Local::open(&dir.path().join("kv.redb"), limits).expect("open");
        (dir, stores)
    }

    #[test]
    fn limits_refuse_and_leave_the_store_as_it_was() {
        let limits = Limits {
            keys: 2,
            store_bytes: 16,
            key_bytes: 4,
            value_bytes: 8,
            ..Limits::default()
        };
        let (_dir, stores) = stores(limits);
        let t = "kv/a/s";
        stores.write(t, |w| w.set("a", b"1")).expect("set");
        stores.write(t, |w| w.set("b", b"2")).expect("set");
        assert!(
            matches!(stores.write(t, |w| w.set("c", b"3")), Err(KvError::Other(m)) if m.contains("at most 2 keys"))
        );
        assert!(
            matches!(stores.write(t, |w| w.set("toolong", b"3")), Err(KvError::Other(m)) if m.contains("keys are at most 4 bytes"))
        );
        assert!(
            matches!(stores.write(t, |w| w.set("a", b"123456789")), Err(KvError::Other(m)) if m.contains("values are at most 8"))
        );
        // A batch that fails part way writes nothing.
        assert!(
            stores
                .write(t, |w| {
                    w.set("a", b"changed")?;
                    w.set("c", b"3")
                })
                .is_err()
        );
        assert_eq!(stores.get(t, "a").ok().flatten(), Some(b"1".to_vec()));
        // Replacing a value counts its bytes once.
        stores
            .write(t, |w| w.set("a", b"12345678"))
            .expect("replace");
        assert!(
            matches!(stores.write(t, |w| w.set("b", b"12345678")), Err(KvError::Other(m)) if m.contains("bytes of keys and values"))
        );
        stores.write(t, |w| w.delete("b")).expect("delete");
        stores.write(t, |w| w.set("c", b"3")).expect("room again");
    }

    #[test]
    fn keys_page_with_a_cursor_and_apps_are_removed() {
        let (_dir, stores) = stores(Limits {
            page: 3,
            ..Limits::default()
        });
        let app = Name::new("shop").expect("name");
        let t = table_name(&app, &Name::new("cache").expect("name"));
        for i in 0..7 {
            stores
                .write(&t, |w| w.set(&format!("k{i}"), b"v"))
                .expect("set");
        }
        let mut seen = Vec::new();
        let mut cursor = 0;
        loop {
            let (keys, next) = stores.list(&t, cursor).expect("list");
            seen.extend(keys);
            match next {
                Some(next) => cursor = next,
                None => break,
            }
        }
        assert_eq!(seen.len(), 7);
        assert_eq!(
            stores.list(&t, u64::MAX).expect("past the end"),
            (vec![], None)
        );
        stores.remove_app(&app).expect("remove");
        assert_eq!(stores.list(&t, 0).expect("gone"), (vec![], None));
        assert_eq!(stores.get(&t, "k1").ok().flatten(), None);
    }
}
