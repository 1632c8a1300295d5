//! Data files: the bytes of each regular inode, one plain file per inode
//! under `STORE/data/` ([`path_in`]).
//!
//! A create finds its data file already made: a background thread (the
//! preparer) reserves inode numbers in the store ahead of the creates and
//! makes `data/<number>` for each, so the create takes the number and the
//! open file and does no directory operation at all. A new file's name cost
//! two ext4 directory-leaf scans (the negative lookup and the insert) on
//! the request path, the largest single cost left in a create (issue 12).
//!
//! Freed data files are recycled: truncated, kept as spares, then renamed
//! by the preparer to a reserved number. On an ext4 without a journal (the
//! machines ferry is built on), allocating an inode scans the block group
//! past every recently deleted inode (`recently_deleted`); after a burst of
//! deletes that scan costs more than all the rest of a create, while a
//! rename costs one directory update.
//!
//! The data file of a deleted inode stays where it is, under the dead
//! inode's number (never reused), and the store's `spare` table lists it in
//! the transaction that deletes the inode ([`Spare::listed`]); the preparer
//! unlists it once it has renamed it to a reserved number. A data file that
//! leaves a live inode (an eviction) cannot stay under that inode's name,
//! so it goes to `STORE/spare/` under a number of its own.
//!
//! Crashes: a number is reserved (committed) before its file is made, so a
//! file in `data/` is always a live inode's, a listed spare's or a reserved
//! number's; the next start unreserves and unlists numbers whose files a
//! crash took (see `crate::vfs`). A reserved number that loses its file is
//! never handed out: the sequence is past it.

use std::collections::VecDeque;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::ids::Ino;

/// Spare files kept at most; beyond that, freed files are deleted.
const MAX_SPARES: usize = 65536;

/// Data files the preparer keeps made for creates.
const READY_TARGET: usize = 64;

/// The preparer refills once fewer than this are ready.
const READY_LOW: usize = 32;

/// The data file of inode `ino` in the data directory `data_dir`.
pub fn path_in(data_dir: &Path, ino: Ino) -> PathBuf {
    data_dir.join(format!("{:x}", ino.0))
}

/// The store's side of the pool: the numbers of new data files, and the
/// rows of the spares it renamed.
pub trait Ledger: Send + Sync {
    /// Reserves the next `count` inode numbers, durably.
    fn reserve(&self, count: usize) -> io::Result<Vec<Ino>>;
    /// Unlists the listed spares `renamed` (their files now sit at reserved
    /// numbers) and unreserves `unused` (no file could be made for them).
    fn settle(&self, renamed: &[Ino], unused: &[Ino]) -> io::Result<()>;
}

/// The pool of data files of one store.
pub struct DataFiles {
    pool: Arc<Pool>,
    preparer: Option<std::thread::JoinHandle<()>>,
}

/// What the request path and the preparer share.
struct Pool {
    spare_dir: PathBuf,
    data_dir: PathBuf,
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
    /// `spare` table lists until the preparer renames it; `None` for one
    /// in `STORE/spare/`.
    listed: Option<Ino>,
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

/// A data file made ahead of its create: at the path of its reserved
/// number, empty, open read-write.
pub struct Prepared {
    /// The reserved number, which the create's inode takes.
    pub ino: Ino,
    file: File,
}

impl Prepared {
    /// Gives the file the times of its new inode; its attributes after.
    pub fn stamp(&self, time: SystemTime) -> io::Result<Metadata> {
        stamp(&self.file, time)
    }

    /// The file, for the handle of the create that took it.
    pub fn into_file(self) -> File {
        self.file
    }
}

/// Files made for the next creates.
#[derive(Default)]
struct Ready {
    files: VecDeque<Prepared>,
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
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section leaves the lists consistent at every step.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DataFiles {
    /// The pool of the store in `store_dir`, with the spares a previous run
    /// left (those in `STORE/spare/` and the `listed` ones) and the data
    /// files of its `reserved` numbers. With a `ledger`, starts the
    /// preparer; without (a read-only store), creates make their own.
    pub fn open(
        store_dir: &Path,
        listed: Vec<Spare>,
        reserved: Vec<Ino>,
        ledger: Option<Arc<dyn Ledger>>,
    ) -> io::Result<DataFiles> {
        let spare_dir = store_dir.join("spare");
        std::fs::create_dir_all(&spare_dir)?;
        let data_dir = store_dir.join("data");
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
        let mut ready = Ready::default();
        for ino in reserved {
            // Emptied again: a crash may have left one half-recycled. One
            // that cannot be opened stays reserved until the next start.
            match open_empty(&path_in(&data_dir, ino), false) {
                Ok(file) => ready.files.push_back(Prepared { ino, file }),
                Err(e) => tracing::warn!("reserved data file {ino}: {e}"),
            }
        }
        let pool = Arc::new(Pool {
            spare_dir,
            data_dir,
            parked: Mutex::new(parked),
            next: AtomicU64::new(next),
            ready: Mutex::new(ready),
            refill: Condvar::new(),
        });
        let preparer = match ledger {
            Some(ledger) => {
                let pool = pool.clone();
                Some(
                    std::thread::Builder::new()
                        .name("ferry-spares".into())
                        .spawn(move || pool.prepare_loop(ledger.as_ref()))?,
                )
            }
            None => None,
        };
        Ok(DataFiles { pool, preparer })
    }

    /// A data file made ahead, if one is ready (wakes the preparer when the
    /// rest run low). Its create gives it back if it fails.
    pub fn take(&self) -> Option<Prepared> {
        let mut ready = lock(&self.pool.ready);
        let taken = ready.files.pop_front();
        if ready.files.len() < READY_LOW && ready.idle {
            // Only a sleeping preparer needs the (system call of a) wake-up.
            ready.idle = false;
            self.pool.refill.notify_one();
        }
        taken
    }

    /// Returns `prepared`, untouched by a create that failed.
    pub fn give_back(&self, prepared: Prepared) {
        lock(&self.pool.ready).files.push_front(prepared);
    }

    /// Makes an empty data file at `path` whose access and modification
    /// times are `time`, here and now: when none was ready.
    pub fn create_at(&self, path: &Path, time: SystemTime) -> io::Result<NewData> {
        let file = open_empty(path, true)?;
        let meta = stamp(&file, time)?;
        Ok(NewData { file, meta })
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

/// Opens the file at `path` read-write and empties it; with `create`, makes
/// it if it is not there (private to the daemon).
fn open_empty(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Sets the access and modification times of `file` to `time`; returns
/// its attributes after.
fn stamp(file: &File, time: SystemTime) -> io::Result<Metadata> {
    file.set_times(
        std::fs::FileTimes::new()
            .set_accessed(time)
            .set_modified(time),
    )?;
    file.metadata()
}

/// Empties the file at `path`, giving its blocks back.
fn truncate(path: &Path) -> io::Result<()> {
    open_empty(path, false).map(drop)
}

/// `result`, where a file that is not there was nothing to do.
fn absent_is_fine(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
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
        lock(&self.parked).len()
    }

    fn new_spare_path(&self) -> PathBuf {
        self.spare_dir
            .join(self.next.fetch_add(1, Ordering::Relaxed).to_string())
    }

    /// The preparer: keeps [`READY_TARGET`] files ready until stopped.
    fn prepare_loop(&self, ledger: &dyn Ledger) {
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
            if let Err(e) = self.refill(ledger) {
                // Creates make their own meanwhile; retry later.
                tracing::warn!("preparing data files: {e}");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }

    /// Reserves numbers up to [`READY_TARGET`] ready files and makes their
    /// files; each is ready as soon as it is made.
    fn refill(&self, ledger: &dyn Ledger) -> io::Result<()> {
        let wanted = READY_TARGET.saturating_sub(lock(&self.ready).files.len());
        if wanted == 0 {
            return Ok(());
        }
        let (mut renamed, mut unused, mut failed) = (Vec::new(), Vec::new(), None);
        for ino in ledger.reserve(wanted)? {
            if failed.is_some() {
                unused.push(ino);
                continue;
            }
            match self.make(ino, &mut renamed) {
                Ok(file) => lock(&self.ready).files.push_back(Prepared { ino, file }),
                Err(e) => {
                    unused.push(ino);
                    failed = Some(e);
                }
            }
        }
        if !renamed.is_empty() || !unused.is_empty() {
            ledger.settle(&renamed, &unused)?;
        }
        failed.map_or(Ok(()), Err)
    }

    /// Makes the data file of the reserved number `ino`, empty and open: a
    /// parked spare renamed to it (whose listed number joins `renamed`), or
    /// else a new file.
    fn make(&self, ino: Ino, renamed: &mut Vec<Ino>) -> io::Result<File> {
        let path = path_in(&self.data_dir, ino);
        loop {
            let Some(spare) = lock(&self.parked).pop() else {
                return open_empty(&path, true);
            };
            match std::fs::rename(&spare.path, &path) {
                Ok(()) => {
                    renamed.extend(spare.listed);
                    // Emptied again: a crash may have left it half-recycled.
                    // One that will not open goes, as its number will.
                    return open_empty(&path, false).inspect_err(|_| {
                        let _ = std::fs::remove_file(&path);
                    });
                }
                // A listed one stays listed: the next start finds out
                // whether it is still there.
                Err(e) => tracing::warn!("recycling {}: {e}", spare.path.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;

    /// Numbers from 0x100 on; what was settled.
    #[derive(Default)]
    struct TestLedger {
        next: Mutex<u64>,
        renamed: Mutex<Vec<Ino>>,
        unused: Mutex<Vec<Ino>>,
    }

    impl Ledger for TestLedger {
        fn reserve(&self, count: usize) -> io::Result<Vec<Ino>> {
            let mut next = lock(&self.next);
            let first = (*next).max(0x100);
            *next = first + count as u64;
            Ok((first..*next).map(Ino).collect())
        }

        fn settle(&self, renamed: &[Ino], unused: &[Ino]) -> io::Result<()> {
            lock(&self.renamed).extend_from_slice(renamed);
            lock(&self.unused).extend_from_slice(unused);
            Ok(())
        }
    }

    /// The next prepared file, waiting for the preparer (bounded).
    fn next_prepared(files: &DataFiles) -> Prepared {
        for _ in 0..500 {
            if let Some(p) = files.take() {
                return p;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the preparer made no data file in 5 s");
    }

    #[test]
    fn prepared_files_sit_empty_at_reserved_numbers_and_recycle_spares() {
        let scratch = tempfile::Builder::new()
            .prefix("ferry-data-")
            .tempdir()
            .unwrap();
        let dir = scratch.path();
        let data = dir.join("data");
        std::fs::create_dir_all(&data).unwrap();
        // What a crash left at numbers the ledger hands out: strays.
        for n in 0x100..0x140 {
            std::fs::write(path_in(&data, Ino(n)), b"a stray").unwrap();
        }
        // Deleted inodes' data files, listed, with their bytes.
        let spares: Vec<Ino> = (5..15).map(Ino).collect();
        let mut spare_inodes = HashSet::new();
        for &ino in &spares {
            std::fs::write(path_in(&data, ino), b"old bytes").unwrap();
            spare_inodes.insert(std::fs::metadata(path_in(&data, ino)).unwrap().ino());
        }
        let ledger = Arc::new(TestLedger::default());
        let files = DataFiles::open(
            dir,
            spares
                .iter()
                .map(|&i| Spare::listed(i, path_in(&data, i)))
                .collect(),
            Vec::new(),
            Some(ledger.clone()),
        )
        .unwrap();
        let (mut seen, mut recycled) = (HashSet::new(), 0);
        for round in 0..200 {
            let p = next_prepared(&files);
            assert!(seen.insert(p.ino), "number {} handed out twice", p.ino);
            let at_path = std::fs::metadata(path_in(&data, p.ino)).unwrap();
            let meta = p.stamp(SystemTime::UNIX_EPOCH).unwrap();
            assert_eq!((at_path.ino(), at_path.len()), (meta.ino(), 0), "{}", p.ino);
            assert_eq!(meta.modified().unwrap(), SystemTime::UNIX_EPOCH);
            recycled += usize::from(spare_inodes.contains(&meta.ino()));
            if round % 50 == 0 {
                // A failed create gives its file back; it comes again.
                let ino = p.ino;
                files.give_back(p);
                assert_eq!(next_prepared(&files).ino, ino);
            }
        }
        assert_eq!(recycled, spares.len(), "every spare was recycled");
        let mut renamed = lock(&ledger.renamed).clone();
        renamed.sort();
        assert_eq!(renamed, spares, "every renamed spare was unlisted");
        assert!(spares.iter().all(|&i| !path_in(&data, i).exists()));
        assert!(lock(&ledger.unused).is_empty());
    }
}
