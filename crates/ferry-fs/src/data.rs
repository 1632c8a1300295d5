//! Data files: the bytes of each regular inode, one plain file per inode
//! under `STORE/data/` (see [`crate::store::Store::data_path`]).
//!
//! Freed data files are recycled: truncated, kept as spares, then renamed
//! into place for the next new file. On an ext4 without a journal (the
//! machines ferry is built on), allocating an inode scans the block group
//! past every recently deleted inode (`recently_deleted`); after a burst of
//! deletes that scan costs more than all the rest of a create, while a
//! rename costs one directory update.
//!
//! The data file of a deleted inode stays where it is, under the dead
//! inode's number (never reused), and the store's `spare` table lists it in
//! the transaction that deletes the inode ([`Spare::listed`]); the create
//! that takes it unlists it in its own. That spares an unlink's rename into
//! another directory, which cost a quarter of the daemon's CPU per unlink.
//! A data file that leaves a live inode (an eviction) cannot stay under
//! that inode's name, so it goes to `STORE/spare/` under a number of its
//! own, as every spare did before.
//!
//! When there is nothing to recycle, a new data file starts as an
//! anonymous `O_TMPFILE` in `data/` and gets its name with `linkat` at the
//! create: one directory insert, where a named spare cost a create in
//! `spare/` and a rename out of it, and a crash leaves nothing behind.
//!
//! A create must not wait for any of that: a background thread keeps a few
//! files empty and open ([`Ready`]), so the request path only puts one in
//! place, sets its times and hands its descriptor over (issue 12). A file
//! is not part of any inode until then, so a crash leaves at most a spare
//! or an orphan data file, as before.

use std::collections::VecDeque;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::SystemTime;

use nix::fcntl::{AtFlags, AT_FDCWD};

use crate::ids::Ino;

/// Spare files kept at most; beyond that, freed files are deleted.
const MAX_SPARES: usize = 65536;

/// Open spares the preparer keeps ready for creates.
const READY_TARGET: usize = 64;

/// The preparer refills once fewer than this are ready.
const READY_LOW: usize = 32;

/// The pool of spare data files of one store.
pub struct DataFiles {
    pool: Arc<Pool>,
    preparer: Option<std::thread::JoinHandle<()>>,
}

/// What the request path and the preparer share.
struct Pool {
    spare_dir: PathBuf,
    data_dir: PathBuf,
    /// Whether new files start anonymous (until the file system or our
    /// privileges refuse `O_TMPFILE` or `linkat` of one).
    anonymous: AtomicBool,
    /// Parked spares (closed, truncated unless a crash interrupted that),
    /// and the next free name in `spare_dir`.
    parked: Mutex<Vec<Spare>>,
    next: AtomicU64,
    ready: Mutex<Ready>,
    /// Wakes the preparer when `ready` runs low, or to stop.
    refill: Condvar,
}

/// A spare data file.
#[derive(Debug)]
pub struct Spare {
    path: PathBuf,
    /// The deleted inode whose data file this is, which the store's
    /// `spare` table lists until a create takes it; `None` for one in
    /// `STORE/spare/`.
    pub listed: Option<Ino>,
}

impl Spare {
    /// The data file of the deleted inode `ino` at `path`, which the store
    /// lists as a spare.
    pub fn listed(ino: Ino, path: PathBuf) -> Spare {
        Spare {
            path,
            listed: Some(ino),
        }
    }

    /// A spare at `path` in `STORE/spare/`.
    fn unlisted(path: PathBuf) -> Spare {
        Spare { path, listed: None }
    }
}

/// Files opened read-write and known empty, for the next creates: parked
/// spares, or new anonymous files (`None`).
#[derive(Default)]
struct Ready {
    files: VecDeque<(Option<Spare>, File)>,
    /// The preparer is waiting on `refill` (so a create must wake it).
    idle: bool,
    stop: bool,
}

/// A new data file, already at its path: open read-write, empty, with the
/// times its inode row has; `meta` is its `fstat` after that.
pub struct NewData {
    /// The data file, for the handle of the create that made it.
    pub file: File,
    /// Its attributes, so the reply needs no `statx` by path.
    pub meta: Metadata,
    /// The listed spare it was, which the create's transaction unlists.
    pub recycled: Option<Ino>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section leaves the lists consistent at every step.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DataFiles {
    /// The pool of the store in `store_dir`, with the spares a previous run
    /// left: those in `STORE/spare/` and the `listed` ones (a crash may
    /// leave one half-recycled: the preparer truncates every parked spare
    /// again before it hands it out); starts the preparer.
    pub fn open(store_dir: &Path, listed: Vec<Spare>) -> io::Result<DataFiles> {
        let spare_dir = store_dir.join("spare");
        std::fs::create_dir_all(&spare_dir)?;
        let mut parked = listed;
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
            parked.push(Spare::unlisted(entry.path()));
        }
        let pool = Arc::new(Pool {
            spare_dir,
            data_dir: store_dir.join("data"),
            anonymous: AtomicBool::new(true),
            parked: Mutex::new(parked),
            next: AtomicU64::new(next),
            ready: Mutex::new(Ready::default()),
            refill: Condvar::new(),
        });
        let preparer = {
            let pool = pool.clone();
            std::thread::Builder::new()
                .name("ferry-spares".into())
                .spawn(move || pool.prepare_loop())?
        };
        Ok(DataFiles {
            pool,
            preparer: Some(preparer),
        })
    }

    /// Makes an empty data file at `path` whose access and modification
    /// times are `time`, recycling a spare when there is one.
    pub fn create(&self, path: &Path, time: SystemTime) -> io::Result<NewData> {
        let (spare, file) = match self.pool.take_ready() {
            Some(ready) => ready,
            // The preparer fell behind: prepare one here.
            None => self.pool.prepare()?,
        };
        let placed = match &spare {
            Some(spare) => std::fs::rename(&spare.path, path),
            None => link_new(&file, path),
        };
        let (file, recycled) = match placed {
            Ok(()) => (file, spare.and_then(|s| s.listed)),
            Err(e) => {
                match &spare {
                    Some(spare) => tracing::warn!("recycling {}: {e}", spare.path.display()),
                    None => {
                        tracing::warn!("naming a new data file: {e}; new ones get names from now");
                        self.pool.anonymous.store(false, Ordering::Relaxed);
                    }
                }
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(path)?;
                // A listed one stays listed: the next start finds out
                // whether it is still there.
                (file, None)
            }
        };
        file.set_times(
            std::fs::FileTimes::new()
                .set_accessed(time)
                .set_modified(time),
        )?;
        let meta = file.metadata()?;
        Ok(NewData {
            file,
            meta,
            recycled,
        })
    }

    /// Whether the pool keeps another spare; beyond [`MAX_SPARES`], freed
    /// data files are deleted.
    pub fn wants_spares(&self) -> bool {
        self.pool.spares() < MAX_SPARES
    }

    /// Parks the listed spare `spare`: truncated where it is (absent is
    /// fine: nothing to keep; its row goes at the next start).
    pub fn park(&self, spare: Spare) -> io::Result<()> {
        absent_is_fine(truncate(&spare.path).map(|()| lock(&self.pool.parked).push(spare)))
    }

    /// Frees the data file at `path` (absent is fine) that cannot stay
    /// where it is as a listed spare (its inode lives on, or the pool was
    /// full): truncated into `STORE/spare/`, or deleted when the pool is
    /// full.
    pub fn free(&self, path: &Path) -> io::Result<()> {
        absent_is_fine(if self.wants_spares() {
            let spare = self.pool.new_spare_path();
            truncate(path)
                .and_then(|()| std::fs::rename(path, &spare))
                .map(|()| lock(&self.pool.parked).push(Spare::unlisted(spare)))
        } else {
            std::fs::remove_file(path)
        })
    }
}

/// Empties the file at `path`, giving its blocks back.
fn truncate(path: &Path) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map(drop)
}

/// `result`, where a file that is not there was nothing to do.
fn absent_is_fine(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Names the anonymous file `file` at `path`. A file already there is a
/// stray a crash left (a create that made it and died before its record
/// was journaled; the new inode has its number again): replaced, as a
/// rename would.
fn link_new(file: &File, path: &Path) -> io::Result<()> {
    let link = || {
        nix::unistd::linkat(file, "", AT_FDCWD, path, AtFlags::AT_EMPTY_PATH)
            .map_err(io::Error::from)
    };
    match link() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            link()
        }
        other => other,
    }
}

impl Drop for DataFiles {
    fn drop(&mut self) {
        lock(&self.pool.ready).stop = true;
        self.pool.refill.notify_all();
        if let Some(preparer) = self.preparer.take() {
            let _ = preparer.join();
        }
    }
}

impl Pool {
    fn spares(&self) -> usize {
        lock(&self.parked).len() + lock(&self.ready).files.len()
    }

    fn new_spare_path(&self) -> PathBuf {
        self.spare_dir
            .join(self.next.fetch_add(1, Ordering::Relaxed).to_string())
    }

    /// A ready spare, waking the preparer when the rest run low.
    fn take_ready(&self) -> Option<(Option<Spare>, File)> {
        let mut ready = lock(&self.ready);
        let taken = ready.files.pop_front();
        if ready.files.len() < READY_LOW && ready.idle {
            // Only a sleeping preparer needs the (system call of a) wake-up.
            ready.idle = false;
            self.refill.notify_one();
        }
        taken
    }

    /// One file, open read-write and empty: a parked spare truncated again
    /// (it may be half-recycled by a crash), or else a new file, anonymous
    /// where the file system allows.
    fn prepare(&self) -> io::Result<(Option<Spare>, File)> {
        let parked = lock(&self.parked).pop();
        if let Some(spare) = parked {
            let opened = OpenOptions::new()
                .read(true)
                .write(true)
                .truncate(true)
                .open(&spare.path);
            match opened {
                Ok(file) => return Ok((Some(spare), file)),
                Err(e) => tracing::warn!("opening spare {}: {e}", spare.path.display()),
            }
        }
        if self.anonymous.load(Ordering::Relaxed) {
            let made = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_TMPFILE)
                .mode(0o600)
                .open(&self.data_dir);
            match made {
                Ok(file) => return Ok((None, file)),
                Err(e) => {
                    tracing::warn!(
                        "O_TMPFILE in {}: {e}; new data files get names",
                        self.data_dir.display()
                    );
                    self.anonymous.store(false, Ordering::Relaxed);
                }
            }
        }
        let path = self.new_spare_path();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        Ok((Some(Spare::unlisted(path)), file))
    }

    /// The preparer: keeps [`READY_TARGET`] spares ready until stopped.
    fn prepare_loop(&self) {
        loop {
            {
                let mut ready = lock(&self.ready);
                while !ready.stop && ready.files.len() >= READY_LOW {
                    ready.idle = true;
                    ready = self.refill.wait(ready).unwrap_or_else(|p| p.into_inner());
                }
                ready.idle = false;
                if ready.stop {
                    return;
                }
            }
            while lock(&self.ready).files.len() < READY_TARGET {
                match self.prepare() {
                    Ok(spare) => lock(&self.ready).files.push_back(spare),
                    Err(e) => {
                        // Creates prepare their own meanwhile; retry later.
                        tracing::warn!("preparing spare data files: {e}");
                        std::thread::sleep(std::time::Duration::from_secs(1));
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_new_data_file_replaces_a_stray_and_stays_anonymous() {
        let dir = std::env::temp_dir().join(format!(
            "ferry-data-{}-{}",
            std::process::id(),
            crate::store::now()
        ));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let files = DataFiles::open(&dir, Vec::new()).unwrap();
        for n in 0..100 {
            let path = dir.join("data").join(format!("{n:x}"));
            // Every other name holds what a crash left there.
            if n % 2 == 0 {
                std::fs::write(&path, b"a stray from before a crash").unwrap();
            }
            let made = files.create(&path, SystemTime::now()).unwrap();
            let at_path = std::fs::metadata(&path).unwrap();
            assert_eq!((at_path.ino(), at_path.len()), (made.meta.ino(), 0));
            assert_eq!(made.recycled, None);
        }
        assert!(files.pool.anonymous.load(Ordering::Relaxed));
        let spares = std::fs::read_dir(dir.join("spare")).unwrap().count();
        assert_eq!(spares, 0, "new data files got names in spare/");
        drop(files);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
