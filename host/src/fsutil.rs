//! Durable file writes, shared by every part of the host that keeps state on disk.

use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;

/// Writes `bytes` to `path` through a temporary file in the same directory that is
/// synced, renamed into place, and followed by a sync of the directory: after a crash
/// at any moment the path holds either the old file or the new one, never a torn one,
/// and once this returns the new one survives a power cut.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_dir_all_durably(dir)?;
    let temp = temp_path(path);
    let mut file =
        std::fs::File::create(&temp).with_context(|| format!("creating `{}`", temp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing `{}`", temp.display()))?;
    drop(file);
    std::fs::rename(&temp, path).with_context(|| format!("renaming into `{}`", path.display()))?;
    sync_dir(dir)
}

/// `create_dir_all`, then a sync of the parent of every directory it made, so the new
/// directories themselves survive a power cut (not only the files inside them).
pub fn create_dir_all_durably(dir: &Path) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    let mut probe = Some(dir);
    while let Some(d) = probe.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d.to_owned());
        probe = d.parent();
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating `{}`", dir.display()))?;
    for made in missing {
        if let Some(parent) = made.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// A temporary name beside `path`, unique to this process and call.
pub fn temp_path(path: &Path) -> std::path::PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Whether `path` is a temporary file left by [`write_atomically`] (a crash mid-write).
pub fn is_temp(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.') && n.contains(".tmp-"))
}

/// Makes a rename or removal inside `dir` durable.
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing `{}`", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_replace_whole_files_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("a/b.json");
        write_atomically(&path, b"one").expect("write");
        write_atomically(&path, b"two").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("a"))
            .expect("list")
            .map(|e| e.expect("entry").path())
            .collect();
        assert_eq!(names, std::slice::from_ref(&path));
        assert!(is_temp(&temp_path(&path)) && !is_temp(&path));
    }
}
