//! The audit log: `<state-dir>/audit.jsonl`, one JSON record a line, append-only,
//! synced before the action it records is answered.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Most records [`AuditLog::read`] returns (the newest).
pub const MAX_READ: usize = 10_000;

/// One audited action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Unix time, in milliseconds.
    pub time_ms: u64,
    /// `deploy`, `rollback`, `remove` or `auth-failure`.
    pub action: String,
    /// The app acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// The version that serves after the action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The digests of the app and of the blobs it references.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub digests: Vec<String>,
    /// Who asked (`ip:port`, or `local` for `lepton up`'s own deploy).
    pub peer: String,
    /// `ok`, `unchanged`, or the error.
    pub outcome: String,
}

/// The append-only log.
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl AuditLog {
    /// Opens (or creates) the log under `state_dir`.
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join("audit.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening `{}`", path.display()))?;
        Ok(Self {
            path,
            file: Mutex::new(file),
        })
    }

    /// Appends `record` and syncs it to disk.
    pub fn append(&self, record: &AuditRecord) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(record).context("encoding an audit record")?;
        line.push(b'\n');
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        file.write_all(&line)
            .and_then(|()| file.sync_data())
            .with_context(|| format!("writing `{}`", self.path.display()))
    }

    /// The newest `limit` records (at most [`MAX_READ`]), oldest first; lines that do
    /// not parse (a torn last line after a crash) are skipped.
    pub fn read(&self, limit: usize) -> anyhow::Result<Vec<AuditRecord>> {
        let file = std::fs::File::open(&self.path)
            .with_context(|| format!("opening `{}`", self.path.display()))?;
        let limit = limit.min(MAX_READ);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut records = std::collections::VecDeque::with_capacity(limit.min(1024));
        for line in std::io::BufReader::new(file).split(b'\n') {
            let line = line.with_context(|| format!("reading `{}`", self.path.display()))?;
            if let Ok(record) = serde_json::from_slice::<AuditRecord>(&line) {
                if records.len() == limit {
                    records.pop_front();
                }
                records.push_back(record);
            }
        }
        Ok(records.into())
    }
}
