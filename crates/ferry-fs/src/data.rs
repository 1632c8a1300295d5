//! Data files: the bytes of each regular inode, one plain file per inode
//! under `STORE/data/` (see [`crate::store::Store::data_path`]).
//!
//! Freed data files are recycled: truncated and parked in `STORE/spare/`,
//! then renamed into place for the next new file. On an ext4 without a
//! journal (the machines ferry is built on), allocating an inode scans the
//! block group past every recently deleted inode (`recently_deleted`); after
//! a burst of deletes that scan costs more than all the rest of a create,
//! while a rename costs one directory update.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Spare files kept at most; beyond that, freed files are deleted.
const MAX_SPARES: usize = 65536;

/// The pool of spare data files of one store.
pub struct DataFiles {
    spare_dir: PathBuf,
    spares: Mutex<Vec<PathBuf>>,
    next: AtomicU64,
}

impl DataFiles {
    /// The pool of the store in `store_dir`, with the spares a previous run
    /// left (a crash may leave one half-recycled: it is truncated again on use).
    pub fn open(store_dir: &Path) -> io::Result<DataFiles> {
        let spare_dir = store_dir.join("spare");
        std::fs::create_dir_all(&spare_dir)?;
        let mut spares = Vec::new();
        let mut next = 0;
        for entry in std::fs::read_dir(&spare_dir)? {
            let entry = entry?;
            if let Some(n) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            {
                next = next.max(n + 1);
            }
            spares.push(entry.path());
        }
        Ok(DataFiles {
            spare_dir,
            spares: Mutex::new(spares),
            next: AtomicU64::new(next),
        })
    }

    /// Makes an empty data file at `path`, recycling a spare when there is
    /// one. Its times are now, as a new file's are.
    pub fn create(&self, path: &Path) -> io::Result<()> {
        let spare = self.spares.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(spare) = spare {
            if std::fs::rename(&spare, path).is_ok() {
                let file = OpenOptions::new().write(true).truncate(true).open(path)?;
                let now = std::time::SystemTime::now();
                return file.set_times(
                    std::fs::FileTimes::new()
                        .set_accessed(now)
                        .set_modified(now),
                );
            }
        }
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map(drop)
    }

    /// Frees the data file at `path` (absent is fine): truncated into the
    /// spare pool, or deleted when the pool is full.
    pub fn free(&self, path: &Path) -> io::Result<()> {
        let parked = {
            let spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
            spares.len() < MAX_SPARES
        };
        let result = if parked {
            let spare = self
                .spare_dir
                .join(self.next.fetch_add(1, Ordering::Relaxed).to_string());
            OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(path)
                .and_then(|_| std::fs::rename(path, &spare))
                .map(|()| {
                    self.spares
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(spare)
                })
        } else {
            std::fs::remove_file(path)
        };
        match result {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}
