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
    let mut file = create_private(&temp)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing `{}`", temp.display()))?;
    drop(file);
    std::fs::rename(&temp, path).with_context(|| format!("renaming into `{}`", path.display()))?;
    sync_dir(dir)
}

/// Creates `path` (truncating it) readable and writable by its owner only, whatever
/// the umask: nothing in the state dir is for other users to write.
pub fn create_private(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating `{}`", path.display()))
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

/// Whether `path` is a temporary file left by [`write_atomically`] (a crash mid-write):
/// `.{name}.tmp-{pid}-{n}`.
pub fn is_temp(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let Some((stem, tail)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-")) else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    !stem.is_empty()
        && tail
            .split_once('-')
            .is_some_and(|(pid, n)| digits(pid) && digits(n))
}

/// Creates `dir` (and its missing parents) as `0700`, or checks the one that is there:
/// a state dir that group or others can write is refused, as ssh refuses such keys,
/// because whoever can write it can make the node run their code.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating `{}`", dir.display()))?;
    }
    let meta = std::fs::metadata(dir).with_context(|| format!("reading `{}`", dir.display()))?;
    anyhow::ensure!(meta.is_dir(), "`{}` is not a directory", dir.display());
    let mode = meta.permissions().mode() & 0o7777;
    anyhow::ensure!(
        owned_by_us(&meta),
        "state dir `{}` belongs to another user (uid {}); whoever owns it can run code in this node",
        dir.display(),
        std::os::unix::fs::MetadataExt::uid(&meta)
    );
    anyhow::ensure!(
        mode & 0o022 == 0,
        "state dir `{}` is writable by its group or by others (mode {mode:04o}); whoever can \
         write it can run code in this node: `chmod go-w` it (lepton makes new ones 0700)",
        dir.display()
    );
    Ok(())
}

/// Opens `path` for reading if it is a regular file of at most `limit` bytes: not a
/// FIFO (opened without blocking, so one cannot hang the reader), a device such as
/// `/dev/zero`, or a directory. Returns the file and its length.
pub fn open_regular_file(path: &Path, limit: u64) -> std::io::Result<(std::fs::File, u64)> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} bytes; the limit is {limit}", meta.len()),
        ));
    }
    Ok((file, meta.len()))
}

/// Reads `path` whole if it is a regular file of at most `limit` bytes
/// (see [`open_regular_file`]).
pub fn read_regular_file(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let (file, len) = open_regular_file(path, limit)?;
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("grew past {limit} bytes while it was read"),
        ));
    }
    Ok(bytes)
}

/// Whether someone other than this process's user may write the file `meta`
/// describes: another owner, or write bits for group or others.
pub fn writable_by_others(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    !owned_by_us(meta) || meta.permissions().mode() & 0o022 != 0
}

/// Whether the file `meta` describes belongs to this process's effective user
/// (`/proc/self` belongs to it).
fn owned_by_us(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|me| me.uid() == meta.uid())
}

/// Removes the temporary files [`write_atomically`] (or a blob upload) left behind when
/// a process was killed mid-write, anywhere under `root` (symlinks are not followed).
/// Call it only while holding the state dir's lock. Returns how many it removed.
pub fn remove_temporaries(root: &Path) -> usize {
    let mut removed = 0;
    let mut pending = vec![(root.to_owned(), 0_u32)];
    while let Some((dir, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            // Unpacked `files` trees are the operator's files, not ours to clean.
            if kind.is_dir() && depth < 8 && !(depth == 0 && entry.file_name() == "mounts") {
                pending.push((path, depth + 1));
            } else if kind.is_file() && is_temp(&path) && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
    }
    removed
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

    #[test]
    fn state_dirs_are_made_private_and_shared_ones_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().join("a/state");
        private_dir(&state).expect("made");
        let mode = std::fs::metadata(&state)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o775)).expect("chmod");
        let error = private_dir(&state).expect_err("refused").to_string();
        assert!(error.contains("mode 0775"), "{error}");
    }

    #[test]
    fn temporaries_left_by_a_kill_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().expect("temp dir");
        let kept = dir.path().join("x/y/kept.json");
        write_atomically(&kept, b"1").expect("write");
        let left = temp_path(&kept);
        std::fs::write(&left, b"half").expect("write");
        assert_eq!(remove_temporaries(dir.path()), 1);
        assert!(kept.exists() && !left.exists());
    }
}
