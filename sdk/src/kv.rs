//! Key-value stores through the standard `wasi:keyvalue` interfaces
//! (`store`, `atomics`, `batch` @0.2.0-draft).
//!
//! A function opens only the stores its manifest grants
//! (`key_value_stores = ["default"]`); any other name is [`Error::AccessDenied`].
//! Every function of an app granted a store sees the same data.
//!
//! ```no_run
//! let store = lepton_sdk::kv::Store::open("default")?;
//! store.set("greeting", b"hello")?;
//! let visits = store.increment("visits", 1)?;
//! assert_eq!(store.get("greeting")?.as_deref(), Some(&b"hello"[..]));
//! # let _ = visits;
//! # Ok::<(), lepton_sdk::kv::Error>(())
//! ```

use crate::bindings::wasi::keyvalue::{atomics, batch, store};

/// Why a store call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The host has no store by that name.
    NoSuchStore,
    /// The store is not granted to this function.
    AccessDenied,
    /// A limit (key, value or store size), or the store failed: the host's message.
    Other(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoSuchStore => f.write_str("no such store"),
            Self::AccessDenied => f.write_str("the store is not granted to this function"),
            Self::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {}

impl From<store::Error> for Error {
    fn from(error: store::Error) -> Self {
        match error {
            store::Error::NoSuchStore => Self::NoSuchStore,
            store::Error::AccessDenied => Self::AccessDenied,
            store::Error::Other(message) => Self::Other(message),
        }
    }
}

/// An open store.
pub struct Store(store::Bucket);

impl Store {
    /// Opens the store `name` (granted in the manifest).
    pub fn open(name: &str) -> Result<Self, Error> {
        Ok(Self(store::open(name)?))
    }

    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.0.get(key)?)
    }

    /// Sets `key` to `value`.
    pub fn set(&self, key: &str, value: impl AsRef<[u8]>) -> Result<(), Error> {
        Ok(self.0.set(key, value.as_ref())?)
    }

    /// Removes `key` (nothing happens if it is not set).
    pub fn delete(&self, key: &str) -> Result<(), Error> {
        Ok(self.0.delete(key)?)
    }

    /// Whether `key` is set.
    pub fn exists(&self, key: &str) -> Result<bool, Error> {
        Ok(self.0.exists(key)?)
    }

    /// Every key, page by page as the host returns them.
    pub fn keys(&self) -> Result<Vec<String>, Error> {
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.0.list_keys(cursor)?;
            keys.extend(page.keys);
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(keys),
            }
        }
    }

    /// Adds `delta` to the decimal number stored at `key` (0 when unset) atomically,
    /// and returns the new value.
    pub fn increment(&self, key: &str, delta: u64) -> Result<u64, Error> {
        Ok(atomics::increment(&self.0, key, delta)?)
    }

    /// The values of `keys`, in order (`None` where unset).
    pub fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, Error> {
        Ok(batch::get_many(&self.0, keys)?
            .into_iter()
            .map(|found| found.map(|(_, value)| value))
            .collect())
    }

    /// Sets every pair: all or none on a node; key by key in a cluster.
    pub fn set_many(&self, pairs: &[(String, Vec<u8>)]) -> Result<(), Error> {
        Ok(batch::set_many(&self.0, pairs)?)
    }

    /// Removes every key in `keys`: all or none on a node; key by key in a cluster.
    pub fn delete_many(&self, keys: &[String]) -> Result<(), Error> {
        Ok(batch::delete_many(&self.0, keys)?)
    }
}
