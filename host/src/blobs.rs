//! The node's content-addressed blob store: `<state-dir>/blobs/sha256/<hex>`.
//!
//! A blob is stored only under the digest of the bytes actually received (an upload
//! whose bytes do not match the digest it claims is refused), written to a temporary
//! file, synced and renamed into place, so a crash never leaves a torn blob under a
//! real name. `files` mounts travel as tar blobs ([`pack_dir`]) and are unpacked once
//! per node ([`BlobStore::unpacked`]).

use std::collections::BTreeSet;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

use crate::fsutil;
use crate::locked::Digest;

/// Blobs no kept version references are deleted once they are this old (a client may
/// be uploading the blobs of its next deploy while another deploy collects garbage).
pub const GC_GRACE: Duration = Duration::from_secs(600);

/// Why a blob was not stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlobError {
    /// The bytes do not hash to the digest they were sent under.
    #[error("the bytes hash to {actual}, not {expected}")]
    DigestMismatch {
        /// The digest claimed.
        expected: Digest,
        /// The digest of what arrived.
        actual: Digest,
    },
    /// More bytes than the limit.
    #[error("the blob is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: u64,
    },
    /// Reading the body or writing the file failed.
    #[error(transparent)]
    Io(#[from] anyhow::Error),
}

/// The blob store of one node.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    mounts: PathBuf,
}

impl BlobStore {
    /// The store under `state_dir`.
    pub fn new(state_dir: &Path) -> anyhow::Result<Self> {
        let dir = state_dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating `{}`", dir.display()))?;
        let mounts = state_dir.join("mounts");
        Ok(Self { dir, mounts })
    }

    /// Where blob `digest` is (or would be).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// Whether blob `digest` is stored.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Whether blob `digest` is stored, marking it as just used: a client that was told
    /// "stored" has [`GC_GRACE`] to deploy the app that references it.
    pub fn touch(&self, digest: &Digest) -> bool {
        std::fs::File::options()
            .write(true)
            .open(self.path(digest))
            .and_then(|file| file.set_modified(SystemTime::now()))
            .is_ok()
    }

    /// The digests of `wanted` that are not stored.
    pub fn missing<'a>(&self, wanted: impl IntoIterator<Item = &'a Digest>) -> Vec<Digest> {
        wanted
            .into_iter()
            .filter(|d| !self.contains(d))
            .cloned()
            .collect()
    }

    /// Stores `bytes` under their digest (which must be `expected`).
    pub fn put_bytes(&self, expected: &Digest, bytes: &[u8]) -> Result<(), BlobError> {
        let mut writer = self.writer(expected.clone(), u64::MAX)?;
        writer.write(bytes)?;
        writer.finish()
    }

    /// Stores the file at `path` under `expected` (checked while copying).
    pub fn put_file(&self, expected: &Digest, path: &Path) -> Result<(), BlobError> {
        if self.contains(expected) {
            return Ok(());
        }
        let (mut file, _) = crate::fsutil::open_regular_file(path, u64::MAX)
            .with_context(|| format!("opening `{}`", path.display()))?;
        let mut writer = self.writer(expected.clone(), u64::MAX)?;
        let mut buffer = vec![0; 1 << 20];
        loop {
            let n = file
                .read(&mut buffer)
                .with_context(|| format!("reading `{}`", path.display()))?;
            if n == 0 {
                break;
            }
            writer.write(&buffer[..n])?;
        }
        writer.finish()
    }

    /// A writer for a blob that arrives in pieces, at most `limit` bytes.
    pub fn writer(&self, expected: Digest, limit: u64) -> Result<BlobWriter, BlobError> {
        let final_path = self.path(&expected);
        let temp = fsutil::temp_path(&final_path);
        let file = crate::fsutil::create_private(&temp)
            .with_context(|| format!("creating `{}`", temp.display()))?;
        Ok(BlobWriter {
            file: Some(file),
            temp,
            final_path,
            dir: self.dir.clone(),
            hasher: Sha256::new(),
            written: 0,
            limit,
            expected,
        })
    }

    /// The directory that mount blob `digest` (a tar) unpacks to, unpacking it once.
    pub fn unpacked(&self, digest: &Digest) -> anyhow::Result<PathBuf> {
        let dir = self.mounts.join(digest.hex());
        if dir.is_dir() {
            return Ok(dir);
        }
        std::fs::create_dir_all(&self.mounts)
            .with_context(|| format!("creating `{}`", self.mounts.display()))?;
        let temp = fsutil::temp_path(&dir);
        std::fs::create_dir(&temp).with_context(|| format!("creating `{}`", temp.display()))?;
        let file = std::fs::File::open(self.path(digest))
            .with_context(|| format!("opening blob {digest}"))?;
        let result = unpack(file, &temp);
        if let Err(error) = result {
            let _ = std::fs::remove_dir_all(&temp);
            return Err(error.context(format!("unpacking blob {digest}")));
        }
        match std::fs::rename(&temp, &dir) {
            Ok(()) => {}
            // Another deploy unpacked it first.
            Err(_) if dir.is_dir() => {
                let _ = std::fs::remove_dir_all(&temp);
            }
            Err(error) => {
                return Err(error).with_context(|| format!("renaming into `{}`", dir.display()));
            }
        }
        fsutil::sync_dir(&self.mounts)?;
        Ok(dir)
    }

    /// Deletes blobs (and unpacked mounts) not in `keep` and older than [`GC_GRACE`],
    /// and temporaries left by a crash. Returns how many blobs went.
    pub fn collect_garbage(&self, keep: &BTreeSet<Digest>) -> usize {
        let keep_hex: BTreeSet<&str> = keep.iter().map(Digest::hex).collect();
        let old = |path: &Path| {
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() >= GC_GRACE)
        };
        let mut removed = 0;
        for dir in [&self.dir, &self.mounts] {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if keep_hex.contains(name.as_ref()) || !old(&path) {
                    continue;
                }
                let gone = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                match gone {
                    Ok(()) if dir == &self.dir && !fsutil::is_temp(&path) => removed += 1,
                    Ok(()) => {}
                    Err(error) => {
                        tracing::warn!(path = %path.display(), "cannot remove unused blob: {error}");
                    }
                }
            }
        }
        removed
    }
}

/// A blob being written; dropped without [`BlobWriter::finish`], it leaves nothing.
pub struct BlobWriter {
    file: Option<std::fs::File>,
    temp: PathBuf,
    final_path: PathBuf,
    dir: PathBuf,
    hasher: Sha256,
    written: u64,
    limit: u64,
    expected: Digest,
}

impl BlobWriter {
    /// Appends `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        self.written = self.written.saturating_add(bytes.len() as u64);
        if self.written > self.limit {
            return Err(BlobError::TooLarge { limit: self.limit });
        }
        self.hasher.update(bytes);
        let file = self.file.as_mut().context("blob already finished")?;
        file.write_all(bytes)
            .with_context(|| format!("writing `{}`", self.temp.display()))?;
        Ok(())
    }

    /// Checks the digest, syncs and renames the blob into place.
    pub fn finish(mut self) -> Result<(), BlobError> {
        let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
        if actual != self.expected {
            return Err(BlobError::DigestMismatch {
                expected: self.expected.clone(),
                actual,
            });
        }
        let file = self.file.take().context("blob already finished")?;
        file.sync_all()
            .with_context(|| format!("syncing `{}`", self.temp.display()))?;
        drop(file);
        std::fs::rename(&self.temp, &self.final_path)
            .with_context(|| format!("renaming into `{}`", self.final_path.display()))?;
        fsutil::sync_dir(&self.dir)?;
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() || self.temp.exists() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Packs the regular files and directories under `dir` into a tar, deterministically
/// (sorted, no owners or times), so the same contents always give the same digest.
/// Symbolic links and other special files are refused.
pub fn pack_dir(dir: &Path, limit: u64) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut total = 0u64;
    pack_into(&mut builder, dir, Path::new(""), limit, &mut total)?;
    builder.into_inner().context("finishing the tar")
}

fn pack_into(
    builder: &mut tar::Builder<Vec<u8>>,
    dir: &Path,
    relative: &Path,
    limit: u64,
    total: &mut u64,
) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading `{}`", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading `{}`", dir.display()))?;
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        let name = relative.join(entry.file_name());
        let kind = entry
            .file_type()
            .with_context(|| format!("reading `{}`", path.display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        if kind.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            builder
                .append_data(&mut header, &name, std::io::empty())
                .context("packing")?;
            pack_into(builder, &path, &name, limit, total)?;
        } else if kind.is_file() {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading `{}`", path.display()))?;
            *total += bytes.len() as u64;
            anyhow::ensure!(
                *total <= limit,
                "`{}` holds more than {limit} bytes",
                dir.display()
            );
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(bytes.len() as u64);
            builder
                .append_data(&mut header, &name, bytes.as_slice())
                .context("packing")?;
        } else {
            anyhow::bail!(
                "`{}` is a symbolic link or special file; mounts hold only files and directories",
                path.display()
            );
        }
    }
    Ok(())
}

/// Unpacks a tar of files and directories into `dest`; any other entry, or a path
/// that would leave `dest`, is refused.
fn unpack(reader: impl std::io::Read, dest: &Path) -> anyhow::Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(false);
    archive.set_preserve_mtime(false);
    archive.set_unpack_xattrs(false);
    for entry in archive.entries().context("reading the tar")? {
        let mut entry = entry.context("reading the tar")?;
        let kind = entry.header().entry_type();
        anyhow::ensure!(
            matches!(kind, tar::EntryType::Regular | tar::EntryType::Directory),
            "the tar holds an entry of type {kind:?}; only files and directories are allowed"
        );
        let path = entry
            .path()
            .context("reading an entry's path")?
            .into_owned();
        anyhow::ensure!(
            path.components()
                .all(|c| matches!(c, std::path::Component::Normal(_))),
            "the tar holds the path `{}`, which leaves its directory",
            path.display()
        );
        anyhow::ensure!(
            entry.unpack_in(dest).context("unpacking")?,
            "the tar entry `{}` was refused",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_is_stored_only_under_the_digest_of_its_bytes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = BlobStore::new(dir.path()).expect("store");
        let digest = Digest::of(b"hello");
        assert!(matches!(
            store.put_bytes(&Digest::of(b"other"), b"hello"),
            Err(BlobError::DigestMismatch { .. })
        ));
        assert!(!store.contains(&Digest::of(b"other")));
        store.put_bytes(&digest, b"hello").expect("stored");
        assert_eq!(std::fs::read(store.path(&digest)).expect("read"), b"hello");
        let mut writer = store.writer(Digest::of(b"xxxx"), 3).expect("writer");
        assert!(matches!(
            writer.write(b"xxxx"),
            Err(BlobError::TooLarge { limit: 3 })
        ));
        drop(writer);
        let left: Vec<_> = std::fs::read_dir(dir.path().join("blobs/sha256"))
            .expect("list")
            .collect();
        assert_eq!(left.len(), 1, "no temporaries are left");
    }

    #[test]
    fn mounts_pack_deterministically_and_unpack_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let source = dir.path().join("src");
        std::fs::create_dir_all(source.join("sub")).expect("mkdir");
        std::fs::write(source.join("a.txt"), b"a").expect("write");
        std::fs::write(source.join("sub/b.txt"), b"b").expect("write");
        let tar = pack_dir(&source, 1 << 20).expect("packed");
        assert_eq!(pack_dir(&source, 1 << 20).expect("packed"), tar);
        assert!(pack_dir(&source, 1).is_err());
        let store = BlobStore::new(&dir.path().join("state")).expect("store");
        let digest = Digest::of(&tar);
        store.put_bytes(&digest, &tar).expect("stored");
        let unpacked = store.unpacked(&digest).expect("unpacked");
        assert_eq!(
            std::fs::read(unpacked.join("sub/b.txt")).expect("read"),
            b"b"
        );
        assert_eq!(store.unpacked(&digest).expect("again"), unpacked);
    }

    #[test]
    fn a_tar_that_leaves_its_directory_is_refused() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        header.set_entry_type(tar::EntryType::Regular);
        // `append_data` refuses `..`, so write the name into the header directly.
        header.as_gnu_mut().expect("gnu").name[..6].copy_from_slice(b"../x\0\0");
        header.set_cksum();
        builder.append(&header, &b"x"[..]).expect("append");
        let tar = builder.into_inner().expect("tar");
        let dir = tempfile::tempdir().expect("temp dir");
        let error = unpack(tar.as_slice(), dir.path()).expect_err("refused");
        assert!(
            format!("{error:#}").contains("leaves its directory"),
            "{error:#}"
        );
        assert!(!dir.path().join("../x").exists());
    }
}
