//! App versions on disk: `<state-dir>/apps/APP/versions/N.json` and the active pointer
//! `<state-dir>/apps/APP/active`, each written atomically (temp file, fsync, rename,
//! fsync of the directory). A version file is durable before the pointer names it, so
//! after a crash at any moment the pointer names a complete version; a file that does
//! not parse (torn by something else) is ignored with a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::locked::{Digest, LockedApp, Name};

/// Versions kept per app by default (older ones and the blobs only they use go).
pub const DEFAULT_KEEP_VERSIONS: usize = 10;

/// Largest version file read back (a locked app is small; anything bigger is not ours).
const MAX_VERSION_FILE: u64 = 16 << 20;

/// One stored version: the locked app and when it was deployed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredVersion {
    /// The version number, from 1.
    pub version: u64,
    /// Unix time of the deploy, in milliseconds.
    pub created_ms: u64,
    /// [`LockedApp::digest`] of `app`.
    pub digest: Digest,
    /// The app.
    pub app: LockedApp,
}

/// What the store knows of one app.
#[derive(Debug, Clone, Default)]
pub struct AppRecord {
    /// Every kept version, by number.
    pub versions: BTreeMap<u64, StoredVersion>,
    /// The version serving, if any.
    pub active: Option<u64>,
}

/// Every app's versions, in memory and on disk.
#[derive(Debug)]
pub struct AppStore {
    dir: PathBuf,
    apps: BTreeMap<Name, AppRecord>,
    keep: usize,
}

impl AppStore {
    /// Reads the store under `state_dir`, skipping (with a warning) whatever does not parse.
    pub fn open(state_dir: &Path, keep: usize) -> anyhow::Result<Self> {
        let dir = state_dir.join("apps");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating `{}`", dir.display()))?;
        let mut apps = BTreeMap::new();
        for entry in std::fs::read_dir(&dir)
            .with_context(|| format!("reading `{}`", dir.display()))?
            .flatten()
        {
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().and_then(|n| Name::new(n).ok()) else {
                if !fsutil::is_temp(&path) {
                    tracing::warn!(path = %path.display(), "ignoring: not an app directory");
                }
                continue;
            };
            let record = read_app(&path, &name);
            if !record.versions.is_empty() {
                apps.insert(name, record);
            }
        }
        Ok(Self {
            dir,
            apps,
            keep: keep.max(1),
        })
    }

    /// Every app, by name.
    pub fn apps(&self) -> &BTreeMap<Name, AppRecord> {
        &self.apps
    }

    /// App `name`, if it is stored.
    pub fn app(&self, name: &Name) -> Option<&AppRecord> {
        self.apps.get(name)
    }

    /// The active version of `name`, if it has one.
    pub fn active(&self, name: &Name) -> Option<&StoredVersion> {
        let record = self.apps.get(name)?;
        record.versions.get(&record.active?)
    }

    /// Writes `app` as the next version of its app (durably) and returns it; not yet active.
    pub fn add_version(&mut self, app: LockedApp) -> anyhow::Result<StoredVersion> {
        let record = self.apps.get(&app.name);
        let version = record
            .and_then(|r| r.versions.keys().next_back())
            .map_or(1, |last| last + 1);
        let stored = StoredVersion {
            version,
            created_ms: now_ms(),
            digest: app.digest(),
            app,
        };
        self.put_version(stored.clone())?;
        Ok(stored)
    }

    /// Writes `stored` as it is, keeping its number (a version the cluster already
    /// numbered); not yet active.
    pub fn put_version(&mut self, stored: StoredVersion) -> anyhow::Result<()> {
        let path = self.version_path(&stored.app.name, stored.version);
        fsutil::write_atomically(
            &path,
            &serde_json::to_vec_pretty(&stored).context("encoding the version")?,
        )?;
        self.apps
            .entry(stored.app.name.clone())
            .or_default()
            .versions
            .insert(stored.version, stored);
        Ok(())
    }

    /// Makes `version` of `name` the active one (durably), then drops versions past
    /// the newest `keep` (never the active one).
    pub fn set_active(&mut self, name: &Name, version: u64) -> anyhow::Result<()> {
        let app_dir = self.dir.join(name.as_str());
        fsutil::write_atomically(&app_dir.join("active"), format!("{version}\n").as_bytes())?;
        let keep = self.keep;
        let record = self.apps.entry(name.clone()).or_default();
        record.active = Some(version);
        let old: Vec<u64> = record
            .versions
            .keys()
            .rev()
            .skip(keep)
            .copied()
            .filter(|&v| v != version)
            .collect();
        for v in old {
            record.versions.remove(&v);
            let path = app_dir.join("versions").join(format!("{v}.json"));
            if let Err(error) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), "cannot remove an old version: {error}");
            }
        }
        Ok(())
    }

    /// Removes app `name`: its pointer first (durably: it no longer serves after a
    /// crash), then its versions.
    pub fn remove(&mut self, name: &Name) -> anyhow::Result<()> {
        let app_dir = self.dir.join(name.as_str());
        let active = app_dir.join("active");
        if active.exists() {
            std::fs::remove_file(&active)
                .with_context(|| format!("removing `{}`", active.display()))?;
            fsutil::sync_dir(&app_dir)?;
        }
        self.apps.remove(name);
        std::fs::remove_dir_all(&app_dir)
            .with_context(|| format!("removing `{}`", app_dir.display()))?;
        fsutil::sync_dir(&self.dir)
    }

    /// Every blob a kept version of any app references.
    pub fn referenced_blobs(&self) -> BTreeSet<Digest> {
        self.apps
            .values()
            .flat_map(|r| r.versions.values())
            .flat_map(|v| v.app.blobs())
            .collect()
    }

    fn version_path(&self, name: &Name, version: u64) -> PathBuf {
        self.dir
            .join(name.as_str())
            .join("versions")
            .join(format!("{version}.json"))
    }
}

fn read_app(dir: &Path, name: &Name) -> AppRecord {
    let mut record = AppRecord::default();
    let versions = dir.join("versions");
    for entry in std::fs::read_dir(&versions).into_iter().flatten().flatten() {
        let path = entry.path();
        if fsutil::is_temp(&path) {
            let _ = std::fs::remove_file(&path); // A write a crash interrupted.
            continue;
        }
        let number = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok());
        let parsed = number
            .ok_or_else(|| "not a version file".to_owned())
            .and_then(|number| {
                let size = std::fs::metadata(&path).map_err(|e| e.to_string())?.len();
                if size > MAX_VERSION_FILE {
                    return Err(format!("larger than {MAX_VERSION_FILE} bytes"));
                }
                let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
                let stored: StoredVersion =
                    serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
                stored.app.validate().map_err(|e| e.to_string())?;
                if stored.version != number
                    || &stored.app.name != name
                    || stored.digest != stored.app.digest()
                {
                    return Err("its contents do not match its name".to_owned());
                }
                Ok(stored)
            });
        match parsed {
            Ok(stored) => {
                record.versions.insert(stored.version, stored);
            }
            Err(error) => tracing::warn!(path = %path.display(), "ignoring version file: {error}"),
        }
    }
    let pointer = dir.join("active");
    match std::fs::read_to_string(&pointer) {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(v) if record.versions.contains_key(&v) => record.active = Some(v),
            _ => {
                tracing::warn!(app = %name, "ignoring active pointer {:?}: no such version", text.trim());
            }
        },
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(app = %name, "ignoring unreadable active pointer: {error}"),
    }
    record
}

/// Unix time now, in milliseconds.
pub fn now_ms() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str, route: &str) -> LockedApp {
        serde_json::from_value(serde_json::json!({
            "lock_version": 1, "name": name,
            "functions": [{"name": "f", "component": format!("sha256:{}", "0".repeat(64)), "route": route,
                "timeout": 1000, "memory_limit": 65536, "max_concurrency": 1, "max_queue": 1, "max_body_size": 1,
                "environment": [], "files": [], "allowed_outbound_hosts": [], "models": [],
                "allow_model_upload": false, "max_model_upload_size": 0, "trainers": []}]
        }))
        .expect("valid app")
    }

    #[test]
    fn versions_survive_a_reopen_and_old_ones_go() {
        let dir = tempfile::tempdir().expect("temp dir");
        let name = Name::new("shop").expect("name");
        let mut store = AppStore::open(dir.path(), 2).expect("open");
        for i in 0..3 {
            let stored = store
                // `/v2` became a host prefix after such versions could be stored:
                // they still load (the route is shadowed, not the app lost).
                .add_version(app("shop", &format!("/v{i}")))
                .expect("add");
            store.set_active(&name, stored.version).expect("activate");
        }
        let store = AppStore::open(dir.path(), 2).expect("reopen");
        let record = store.app(&name).expect("app kept");
        assert_eq!(record.versions.keys().copied().collect::<Vec<_>>(), [2, 3]);
        assert_eq!(
            store.active(&name).expect("active").app.functions[0]
                .route
                .to_string(),
            "/v2"
        );
    }

    #[test]
    fn torn_and_foreign_files_are_ignored() {
        let dir = tempfile::tempdir().expect("temp dir");
        let name = Name::new("shop").expect("name");
        let mut store = AppStore::open(dir.path(), 10).expect("open");
        let first = store.add_version(app("shop", "/a")).expect("add");
        store.set_active(&name, first.version).expect("activate");
        let versions = dir.path().join("apps/shop/versions");
        std::fs::write(versions.join("2.json"), b"{\"version\": 2, \"crea").expect("torn");
        std::fs::write(dir.path().join("apps/shop/active"), b"2\n")
            .expect("pointer to the torn one");
        std::fs::write(dir.path().join("apps/NOT A NAME"), b"x").expect("junk");
        let store = AppStore::open(dir.path(), 10).expect("reopen never fails");
        let record = store.app(&name).expect("app kept");
        assert_eq!(record.versions.keys().copied().collect::<Vec<_>>(), [1]);
        assert_eq!(
            record.active, None,
            "a pointer to a torn version serves nothing"
        );
    }
}
