//! POSIX semantics over the store: names, link counts, rename rules, open
//! handles, the life of unlinked-but-open files, and which changes are logged.
//!
//! Every operation returns `Result<_, Errno>` so the FUSE layer only
//! translates. Permission bits are enforced by the kernel (ferry always
//! mounts with `default_permissions`, see [`crate::mount`]); this layer keeps
//! the rules the kernel leaves to the file system: set-group-ID directories,
//! name limits, xattr limits, and rename's type and emptiness rules.
//!
//! Regular files: the data file under the store is the truth for the bytes,
//! the size, and the modification time, so a write touches no database row.
//! The first write after a file is opened logs one `Content` record; later
//! writes through the same open are coalesced into it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, TimeOrNow};
use tracing::{error, warn};

use crate::data::{DataFiles, NewData, Prepared, Spare};
use crate::error::StoreError;
use crate::ids::{Fh, Ino};
use crate::store::{self, Inode, Kind, Nanos, NewInode, Queries, Store, Tx, ROOT_INO};
use crate::unsettled::{Unsettled, Unsettling};

/// Longest name accepted, as on every Linux file system.
pub const NAME_MAX: usize = 255;
/// Longest xattr name (the kernel's XATTR_NAME_MAX).
pub const XATTR_NAME_MAX: usize = 255;
/// Largest xattr value (the kernel's XATTR_SIZE_MAX).
pub const XATTR_SIZE_MAX: usize = 65536;

/// Where the bytes of files that are not cached here come from (the
/// backend, through replication's fetcher).
pub trait ContentSource: Send + Sync {
    /// Makes the data file of `ino` hold the bytes of its chunk list and
    /// marks it cached in `store`; the error is a one-line reason.
    fn fetch(&self, store: &Store, ino: Ino) -> Result<(), String>;
}

/// Who is asking: the kernel's view of the calling process.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    /// Effective (fs) uid.
    pub uid: u32,
    /// Effective (fs) gid.
    pub gid: u32,
    /// The calling thread, whose supplementary groups decide what the
    /// fs gid does not (see [`Caller::in_group`]).
    pub pid: u32,
}

impl Caller {
    /// Whether the caller is in group `gid`, as the kernel's
    /// `in_group_or_capable` asks: root counts as in every group. The
    /// supplementary groups are read from `/proc` only here, where the
    /// answer matters (a set-group-ID file without group execute); if the
    /// thread is gone, the answer is no, so the bit is cleared, never kept
    /// by mistake.
    fn in_group(&self, gid: u32) -> bool {
        if self.uid == 0 || self.gid == gid {
            return true;
        }
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid));
        status.is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Groups:"))
                .is_some_and(|g| g.split_whitespace().any(|g| g.parse() == Ok(gid)))
        })
    }
}

/// What `setattr` asks to change.
#[derive(Default, Debug)]
pub struct SetAttr {
    /// New permission bits (type bits are ignored).
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (regular files).
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<TimeOrNow>,
    /// New modification time.
    pub mtime: Option<TimeOrNow>,
    /// New change time (sent by the kernel's writeback cache).
    pub ctime: Option<SystemTime>,
    /// Strip the set-ID bits this caller's change clears (see
    /// [`killed_setid`]), unless `mode` is given: what a chown, or a
    /// truncate by a caller without CAP_FSETID, does to a non-directory.
    /// Under FUSE_HANDLE_KILLPRIV_V2 the kernel leaves this to the file
    /// system.
    pub kill_setid: Option<Caller>,
}

/// An open regular file.
pub struct Handle {
    /// The inode it belongs to.
    pub ino: Ino,
    /// The data file, always opened read-write so the kernel's writeback
    /// cache may write through any handle.
    pub file: File,
    writable: bool,
}

impl Handle {
    /// Whether it was opened for writing.
    pub fn writable(&self) -> bool {
        self.writable
    }
}

/// Per-inode bookkeeping for open files.
#[derive(Default)]
struct OpenState {
    /// Writable handles open on the inode.
    writers: u32,
    /// Whether the current run of writes already logged its `Content` record.
    logged: bool,
    /// Replication read the file while writers had it open: writes it could
    /// not see (passthrough writes never reach the daemon) are logged again
    /// when the last writer closes.
    shipped_mid_run: bool,
    /// An fsync made the data file's name in `data/` durable. It stays so
    /// while the file is open (the name never changes), so later fsyncs
    /// flush only the file: a database's commit loop pays one flush.
    name_synced: bool,
}

/// The file system, minus the FUSE protocol.
pub struct Vfs {
    store: Arc<Store>,
    data: Arc<DataFiles>,
    read_only: bool,
    /// FUSE lookup counts: an inode with no names lives until the kernel
    /// forgets it, because open files and cwds still reach it.
    lookups: Arc<Mutex<HashMap<Ino, u64>>>,
    handles: Mutex<HashMap<Fh, Arc<Handle>>>,
    open: Mutex<HashMap<Ino, OpenState>>,
    next_fh: AtomicU64,
    /// Files replication has read ([`Vfs::begin_ship`]), counted so that
    /// [`Vfs::create`] can tell whether one was read before its writer was
    /// registered.
    ship_reads: AtomicU64,
    /// Fetches uncached files; set when the volume has a backend.
    source: std::sync::OnceLock<Arc<dyn ContentSource>>,
    /// The replicator's backlog gauge, for backpressure.
    replication: std::sync::OnceLock<Arc<crate::replicate::Shared>>,
    /// Opening a data file holds this shared; evicting one holds it
    /// exclusive, so a file is never evicted between check and open.
    residency: std::sync::RwLock<()>,
    /// When each file was last opened, for least-recently-used eviction
    /// (kept only with a backend; entries leave with their inode).
    last_open: Arc<Mutex<HashMap<Ino, std::time::Instant>>>,
    /// The contexts of the processes that use this mount.
    processes: crate::context::ProcessTable,
    /// Deletes forgotten inodes in the background.
    reaper: Reaper,
    /// Names replication changed that the kernel may still map to what
    /// they named before: not to be removed or replaced through it yet.
    unsettled: Unsettled,
}

/// Deletes the inodes the kernel forgot after their last name went, off
/// the FUSE threads and many per transaction (issue 12): a FORGET needs no
/// reply, but its own transaction held the store lock that the next
/// request then waited for. A crash before the reaper got to an inode
/// leaves it with no names, and [`Vfs::new`] deletes it at the next start,
/// exactly as after a crash between UNLINK and FORGET.
struct Reaper {
    work: Arc<Reaping>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long the reaper lets deletions gather before it runs them.
const REAP_GATHER: Duration = Duration::from_millis(5);

/// What the reaper thread shares with the [`Vfs`].
struct Reaping {
    store: Arc<Store>,
    /// [`Vfs::lookups`]: an inode the kernel looked up again since it was
    /// queued (through a name it had then) is not the reaper's any more.
    lookups: Arc<Mutex<HashMap<Ino, u64>>>,
    data: Arc<DataFiles>,
    last_open: Arc<Mutex<HashMap<Ino, std::time::Instant>>>,
    queue: Mutex<ReapQueue>,
    wake: std::sync::Condvar,
    /// Held while a batch is deleted: [`Reaping::flush`] returns only once
    /// the batch the thread may have taken is done too.
    busy: Mutex<()>,
}

#[derive(Default)]
struct ReapQueue {
    inos: Vec<Ino>,
    stop: bool,
}

impl Reaper {
    fn start(work: Reaping) -> std::io::Result<Reaper> {
        let work = Arc::new(work);
        let thread = {
            let work = work.clone();
            std::thread::Builder::new()
                .name("ferry-reaper".into())
                .spawn(move || work.run())?
        };
        Ok(Reaper {
            work,
            thread: Some(thread),
        })
    }

    /// Deletes `ino` soon, if it has no names by then.
    fn queue(&self, ino: Ino) {
        let mut queue = lock(&self.work.queue);
        queue.inos.push(ino);
        if queue.inos.len() == 1 {
            self.work.wake.notify_one();
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // The thread deletes what is queued before it stops.
        lock(&self.work.queue).stop = true;
        self.work.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Reaping {
    fn run(&self) {
        loop {
            {
                let mut queue = lock(&self.queue);
                while queue.inos.is_empty() && !queue.stop {
                    queue = self.wake.wait(queue).unwrap_or_else(|p| p.into_inner());
                }
                if queue.inos.is_empty() {
                    return;
                }
                if !queue.stop {
                    // Let the FORGETs of an `rm -r` gather: one transaction
                    // for all of them instead of one each.
                    drop(queue);
                    std::thread::sleep(REAP_GATHER);
                }
            }
            self.flush();
        }
    }

    /// Deletes everything queued, on the calling thread.
    fn flush(&self) {
        let _busy = lock(&self.busy);
        let inos = std::mem::take(&mut lock(&self.queue).inos);
        if let Err(e) = self.delete_unlinked(inos) {
            warn!("deleting forgotten inodes: {e}");
        }
    }

    /// Deletes those of `inos` that have no names left and that the kernel
    /// does not hold, in one transaction, then frees their data files. The
    /// transaction holds the store lock, so no name can come back meanwhile.
    fn delete_unlinked(&self, inos: Vec<Ino>) -> rusqlite::Result<()> {
        if inos.is_empty() {
            return Ok(());
        }
        self.store.make_room();
        let (spared, deleted) = self.store.write(|tx| -> rusqlite::Result<_> {
            let (mut spared, mut deleted) = (Vec::new(), Vec::new());
            for ino in inos {
                let Some(inode) = tx.inode(ino)? else {
                    continue;
                };
                if inode.nlink != 0 || lock(&self.lookups).contains_key(&ino) {
                    continue;
                }
                tx.delete(ino)?;
                // Its data file stays where it is as a spare (see
                // `crate::data`), listed in this same transaction.
                if inode.kind() == Kind::File && inode.cached && self.data.wants_spares() {
                    tx.list_spare(ino)?;
                    spared.push(ino);
                } else {
                    deleted.push(ino);
                }
            }
            Ok((spared, deleted))
        })?;
        for ino in spared {
            lock(&self.last_open).remove(&ino);
            let path = self.store.data_path(ino);
            if let Err(e) = self.data.park(Spare::listed(ino, path)) {
                warn!("recycling the data file of inode {ino}: {e}");
            }
        }
        for ino in deleted {
            lock(&self.last_open).remove(&ino);
            free_data(&self.store, &self.data, ino);
        }
        Ok(())
    }
}

/// The listed spares and the reserved numbers whose data files are there,
/// for [`DataFiles`]; the rows of any a crash took (the preparer renamed a
/// spare and died before it unlisted it, or reserved a number and died
/// before it made its file) are dropped. A read-only mount takes none.
fn left_files(store: &Store, read_only: bool) -> Result<(Vec<Spare>, Vec<Ino>), StoreError> {
    if read_only {
        return Ok((Vec::new(), Vec::new()));
    }
    let db = |e| StoreError::db(store.dir(), e);
    let (listed, reserved) = store
        .read(|r| Ok((r.spares()?, r.reserved()?)))
        .map_err(db)?;
    let there = |ino: &Ino| store.data_path(*ino).exists();
    let (listed, unlisted): (Vec<Ino>, Vec<Ino>) = listed.into_iter().partition(there);
    let (reserved, unreserved): (Vec<Ino>, Vec<Ino>) = reserved.into_iter().partition(there);
    if !unlisted.is_empty() || !unreserved.is_empty() {
        drop_file_rows(store, &unlisted, &unreserved).map_err(db)?;
    }
    let listed = listed
        .into_iter()
        .map(|ino| Spare::listed(ino, store.data_path(ino)))
        .collect();
    Ok((listed, reserved))
}

/// Unlists the spares `unlisted` and unreserves the numbers `unreserved`,
/// in one transaction: files that moved or never came to be.
fn drop_file_rows(store: &Store, unlisted: &[Ino], unreserved: &[Ino]) -> rusqlite::Result<()> {
    store.write(|tx| -> rusqlite::Result<()> {
        unlisted.iter().try_for_each(|&ino| tx.unlist_spare(ino))?;
        unreserved.iter().try_for_each(|&ino| tx.unreserve(ino))
    })
}

/// The store's side of the data file pool (see [`crate::data::Ledger`]).
struct StoreLedger(Arc<Store>);

impl crate::data::Ledger for StoreLedger {
    fn reserve(&self, count: usize) -> std::io::Result<Vec<Ino>> {
        self.0
            .write(|tx| tx.reserve(count as u64))
            .map_err(std::io::Error::other)
    }

    fn settle(&self, renamed: &[Ino], unused: &[Ino]) -> std::io::Result<()> {
        drop_file_rows(&self.0, renamed, unused).map_err(std::io::Error::other)
    }
}

/// Frees the data file of `ino` (see [`DataFiles::free`]).
fn free_data(store: &Store, data: &DataFiles, ino: Ino) {
    let path = store.data_path(ino);
    if let Err(e) = data.free(&path) {
        warn!("freeing {}: {e}", path.display());
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves the maps consistent at each step,
    // so a panic elsewhere does not make them unusable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Maps a database error to an errno, logging it: a full disk is ENOSPC,
/// which tells the caller to free space (and unlink can: see
/// [`Store::make_room`]); anything else is EIO.
fn db_err(e: rusqlite::Error) -> Errno {
    error!("store: {e}");
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => Errno::ENOSPC,
        _ => Errno::EIO,
    }
}

/// An `Errno` from an I/O error, EIO if it carries none.
fn io_err(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

/// The same errno, from nix's type to fuser's.
fn nix_err(e: nix::errno::Errno) -> Errno {
    Errno::from_i32(e as i32)
}

/// Errors inside a store transaction: an errno decided by POSIX rules, or
/// a database failure. Either way the transaction rolls back.
enum TxError {
    Errno(Errno),
    Db(rusqlite::Error),
}

impl From<rusqlite::Error> for TxError {
    fn from(e: rusqlite::Error) -> TxError {
        TxError::Db(e)
    }
}

impl From<Errno> for TxError {
    fn from(e: Errno) -> TxError {
        TxError::Errno(e)
    }
}

impl From<TxError> for Errno {
    fn from(e: TxError) -> Errno {
        match e {
            TxError::Errno(e) => e,
            TxError::Db(e) => db_err(e),
        }
    }
}

fn check_name(name: &[u8]) -> Result<(), Errno> {
    if name.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

pub(crate) fn to_system_time(t: Nanos) -> SystemTime {
    if t >= 0 {
        UNIX_EPOCH + Duration::from_nanos(t as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(t.unsigned_abs())
    }
}

/// The attributes of a cached regular file: its data file (`meta`) supplies
/// size, blocks and mtime, and its ctime moves the inode's ctime forward (a
/// write or truncate changes both).
fn file_attr(inode: &Inode, meta: &std::fs::Metadata) -> FileAttr {
    let data_ctime = meta.ctime() * 1_000_000_000 + meta.ctime_nsec();
    let mtime = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
    attr_of(
        inode,
        meta.len(),
        meta.blocks(),
        mtime,
        inode.ctime.max(data_ctime),
    )
}

/// The attributes of `inode`, with the size, blocks and times given.
fn attr_of(inode: &Inode, size: u64, blocks: u64, mtime: Nanos, ctime: Nanos) -> FileAttr {
    FileAttr {
        ino: inode.ino.into(),
        size,
        blocks,
        atime: to_system_time(inode.atime),
        mtime: to_system_time(mtime),
        ctime: to_system_time(ctime),
        crtime: to_system_time(inode.crtime),
        kind: file_type(inode.kind()),
        perm: (inode.mode & 0o7777) as u16,
        nlink: inode.nlink,
        uid: inode.uid,
        gid: inode.gid,
        rdev: inode.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// The set-ID bits that writing, truncating or chowning a file with `mode`
/// and group `gid` by `by` clears, as the kernel's `should_remove_suid` and
/// `setattr_should_drop_sgid` decide: set-user-ID; set-group-ID if the
/// group may execute, or else if `by` is not in the file's group (without
/// group execute the bit may mark mandatory locking, which only a member
/// keeps).
fn killed_setid(mode: u32, gid: u32, by: &Caller) -> u32 {
    let mut bits = mode & libc::S_ISUID;
    if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || !by.in_group(gid)) {
        bits |= libc::S_ISGID;
    }
    bits
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

impl Vfs {
    /// Wraps an opened store, first finishing any deletion a crash
    /// interrupted: inodes with no names cannot be open after a restart.
    pub fn new(store: Store, read_only: bool) -> Result<Vfs, StoreError> {
        let (spares, reserved) = left_files(&store, read_only)?;
        let store = Arc::new(store);
        let ledger = (!read_only)
            .then(|| Arc::new(StoreLedger(store.clone())) as Arc<dyn crate::data::Ledger>);
        let data = DataFiles::open(store.dir(), spares, reserved, ledger)
            .map_err(|e| StoreError::io(store.dir(), e))?;
        let data = Arc::new(data);
        let last_open = Arc::new(Mutex::new(HashMap::new()));
        let lookups = Arc::new(Mutex::new(HashMap::new()));
        let reaper = Reaper::start(Reaping {
            store: store.clone(),
            lookups: lookups.clone(),
            data: data.clone(),
            last_open: last_open.clone(),
            queue: Mutex::default(),
            wake: std::sync::Condvar::new(),
            busy: Mutex::new(()),
        })
        .map_err(|e| StoreError::io(store.dir(), e))?;
        let vfs = Vfs {
            store,
            data,
            read_only,
            lookups,
            handles: Mutex::new(HashMap::new()),
            open: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            ship_reads: AtomicU64::new(0),
            source: std::sync::OnceLock::new(),
            replication: std::sync::OnceLock::new(),
            residency: std::sync::RwLock::new(()),
            last_open,
            processes: crate::context::ProcessTable::new(crate::context::Context::default()),
            reaper,
            unsettled: Unsettled::default(),
        };
        if !read_only {
            vfs.reap_orphans()
                .and_then(|()| vfs.relog_interrupted_writers())
                .map_err(|e| StoreError::db(vfs.store.dir(), e))?;
        }
        Ok(vfs)
    }

    /// The per-process contexts.
    pub fn processes(&self) -> &crate::context::ProcessTable {
        &self.processes
    }

    /// The context of the calling thread `tid`, where it can matter: only a
    /// volume with a backend has something to wait for or revalidate
    /// with, so a local one answers `None` without looking.
    pub fn context_of(&self, tid: u32) -> Option<crate::context::Context> {
        self.replication.get()?;
        Some(self.processes.lookup(tid))
    }

    /// `durability=remote`: returns once everything logged here so far,
    /// this file's latest writes included, is committed at the backend;
    /// EIO at `deadline` (the change stays logged and ships later).
    pub fn wait_remote(&self, ino: Ino, deadline: std::time::Instant) -> Result<(), Errno> {
        let Some(shared) = self.replication.get() else {
            return Ok(());
        };
        // Writes since replication last read the file (passthrough writes
        // never reach the daemon) get their record first, as for a sync.
        let unlogged = lock(&self.open)
            .get(&ino)
            .is_some_and(|s| s.writers > 0 && !s.logged);
        if unlogged {
            self.will_modify(ino)?;
        }
        self.store.sync().map_err(io_err)?;
        let target = self.store.read(|r| r.log_head()).map_err(db_err)?;
        if shared.wait_committed(&self.store, target, deadline) {
            Ok(())
        } else {
            warn!(
                "durability=remote: log record {target} (inode {ino}) not committed at the \
                 backend in time; it is safe here and ships later"
            );
            Err(Errno::EIO)
        }
    }

    /// `reads=fresh`: brings the store up to the backend's newest
    /// committed state before an open, by `deadline`; offline (or too
    /// slow), the open goes on with what is here, and says so.
    pub fn refresh(&self, ino: Ino, deadline: std::time::Instant) {
        let Some(shared) = self.replication.get() else {
            return;
        };
        if let Err(e) = shared.fresh(deadline) {
            warn!("reads=fresh open of inode {ino}: {e}; using the cached version");
        }
    }

    /// The store underneath.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Connects the volume's backend: where uncached files come from, and
    /// the backlog that slows writers down.
    pub fn attach_backend(
        &self,
        source: Arc<dyn ContentSource>,
        replication: Arc<crate::replicate::Shared>,
    ) {
        let _ = self.source.set(source);
        let _ = self.replication.set(replication);
    }

    /// Whether an operation that adds to the replication backlog would wait
    /// for it now ([`Vfs::throttle`]); the FUSE layer then serves it off its
    /// request threads.
    pub fn throttled(&self) -> bool {
        self.replication.get().is_some_and(|r| r.over_backlog())
    }

    /// Whether opening or truncating `ino` must first fetch its contents
    /// from the backend: a regular file whose data file is not here. Cheap
    /// for a file that is here (one `stat`), free for a local volume.
    pub fn must_fetch(&self, ino: Ino) -> bool {
        self.source.get().is_some()
            && !self.store.data_path(ino).exists()
            && self
                .inode(ino)
                .is_ok_and(|i| i.kind() == Kind::File && !i.cached)
    }

    /// Backpressure: while the replication backlog is over its limit, each
    /// operation that adds to it waits up to 200 ms for it to drain. Writers
    /// slow down; they never fail, and with the backend offline they still
    /// make progress.
    fn throttle(&self) {
        let Some(r) = self.replication.get() else {
            return;
        };
        for _ in 0..20 {
            if !r.over_backlog() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Makes sure the data file of `inode` holds its bytes, fetching them
    /// from the backend if this host never had them (or evicted them). The
    /// row must have been read under `residency`, so no eviction came since.
    fn ensure_cached(&self, inode: &Inode) -> Result<(), Errno> {
        let ino = inode.ino;
        if inode.cached {
            return Ok(());
        }
        let Some(source) = self.source.get() else {
            error!(
                "inode {} ({}) is not cached and no backend is attached",
                ino,
                inode.global_id()
            );
            return Err(Errno::EIO);
        };
        source.fetch(&self.store, ino).map_err(|e| {
            error!(
                "fetching inode {} ({}) from the backend: {e}",
                ino,
                inode.global_id()
            );
            Errno::EIO
        })
    }

    /// Files that were open for writing when the last daemon died, after
    /// replication had shipped them: their later writes never reached the
    /// log (passthrough and mmap writes bypass the daemon, and the last
    /// close that would have logged them never came), so each is logged as
    /// changed now and ships again.
    fn relog_interrupted_writers(&self) -> rusqlite::Result<()> {
        self.store.write(|tx| {
            for ino in tx.writing()? {
                if tx.inode(ino)?.is_some() {
                    tx.content(ino)?;
                }
                tx.clear_writing(ino)?;
            }
            Ok(())
        })
    }

    fn reap_orphans(&self) -> rusqlite::Result<()> {
        let orphans: Vec<Ino> = self.store.read(|r| {
            let mut stmt = r
                .conn()
                .prepare("SELECT ino FROM inode WHERE nlink=0 AND ino!=?1")?;
            let rows = stmt.query_map([ROOT_INO], |row| row.get(0))?;
            rows.collect::<rusqlite::Result<Vec<Ino>>>()
        })?;
        self.reaper.work.delete_unlinked(orphans)
    }

    fn writable(&self) -> Result<(), Errno> {
        if self.read_only {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    // ----- attributes -----------------------------------------------------

    /// The attributes of `inode` as the kernel sees them. For regular files
    /// the data file supplies size, blocks and mtime, and its ctime moves the
    /// inode's ctime forward (a write or truncate changes both).
    pub fn attr(&self, inode: &Inode) -> Result<FileAttr, Errno> {
        let kind = inode.kind();
        let (size, blocks, mtime, ctime) = if kind == Kind::File && !inode.cached {
            // Only the backend has the bytes; the row has what they add up to.
            (
                inode.size,
                inode.size.div_ceil(512),
                inode.mtime,
                inode.ctime,
            )
        } else if kind == Kind::File {
            let meta = match std::fs::metadata(self.store.data_path(inode.ino)) {
                Ok(meta) => meta,
                // Evicted since the row was read: the row now has it all.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let now = self.inode(inode.ino)?;
                    if !now.cached {
                        return self.attr(&now);
                    }
                    error!(
                        "data file of inode {} ({}): {e}",
                        inode.ino,
                        inode.global_id()
                    );
                    return Err(Errno::EIO);
                }
                Err(e) => {
                    error!(
                        "data file of inode {} ({}): {e}",
                        inode.ino,
                        inode.global_id()
                    );
                    return Err(Errno::EIO);
                }
            };
            return Ok(file_attr(inode, &meta));
        } else if kind == Kind::Dir {
            // What ext4 shows for a directory of one block: tools that treat
            // a zero size as "empty" or "special" see what they expect.
            (4096, 8, inode.mtime, inode.ctime)
        } else {
            (
                inode.size,
                inode.size.div_ceil(512),
                inode.mtime,
                inode.ctime,
            )
        };
        Ok(attr_of(inode, size, blocks, mtime, ctime))
    }

    fn inode(&self, ino: Ino) -> Result<Inode, Errno> {
        self.store
            .read(|r| r.inode(ino))
            .map_err(db_err)?
            .ok_or(Errno::ENOENT)
    }

    /// `getattr`.
    pub fn getattr(&self, ino: Ino) -> Result<FileAttr, Errno> {
        self.attr(&self.inode(ino)?)
    }

    /// `setattr`: chmod, chown, truncate and utimensat in one request.
    pub fn setattr(&self, ino: Ino, set: &SetAttr, fh: Option<Fh>) -> Result<FileAttr, Errno> {
        self.writable()?;
        let now = store::now();
        let nanos = |t: &TimeOrNow| match t {
            TimeOrNow::Now => now,
            TimeOrNow::SpecificTime(t) => store::nanos_of(*t),
        };
        let kind = self.inode(ino)?.kind();
        let is_file = kind == Kind::File;
        let _resident = self.residency.read().unwrap_or_else(|p| p.into_inner());
        if is_file && (set.size.is_some() || set.mtime.is_some()) {
            self.ensure_cached(&self.inode(ino)?)?;
        }
        let only_times = set.mode.is_none()
            && set.uid.is_none()
            && set.gid.is_none()
            && set.size.is_none()
            && set.atime.is_none()
            && set.kill_setid.is_none();
        if is_file && only_times && self.in_logged_run(ino) {
            // The writeback cache reporting the mtime of data it just wrote:
            // part of the run of writes already logged, and a regular file's
            // mtime lives in its data file, so no transaction is needed.
            if let Some(t) = &set.mtime {
                let file = self.data_file(ino, fh)?;
                file.set_modified(to_system_time(nanos(t)))
                    .map_err(io_err)?;
            }
            return self.getattr(ino);
        }
        if let Some(size) = set.size {
            self.store.make_room();
            match kind {
                Kind::File => {}
                Kind::Dir => return Err(Errno::EISDIR),
                _ => return Err(Errno::EINVAL),
            }
            // Like every write: logged first, then the data file changes.
            self.will_modify(ino)?;
            self.data_file(ino, fh)?.set_len(size).map_err(io_err)?;
        }
        let inode = self.store.write(|tx| -> Result<Inode, TxError> {
            let mut inode = tx.inode(ino)?.ok_or(Errno::ENOENT)?;
            // Decided on the group before a chown changes it, as the kernel
            // does.
            let killed = match &set.kill_setid {
                Some(by) if set.mode.is_none() && inode.kind() != Kind::Dir => {
                    killed_setid(inode.mode, inode.gid, by)
                }
                _ => 0,
            };
            inode.mode &= !killed;
            if let Some(mode) = set.mode {
                inode.mode = (inode.mode & libc::S_IFMT) | (mode & 0o7777);
            }
            if let Some(uid) = set.uid {
                inode.uid = uid;
            }
            if let Some(gid) = set.gid {
                inode.gid = gid;
            }
            if let Some(t) = &set.atime {
                inode.atime = nanos(t);
            }
            if let Some(t) = &set.mtime {
                inode.mtime = nanos(t);
            }
            inode.ctime = set.ctime.map_or(now, store::nanos_of);
            tx.set_attr(&inode)?;
            Ok(inode)
        })?;
        if is_file && set.mtime.is_some() {
            // After the commit, so the log never misses it; the data file
            // is where a regular file's mtime lives.
            let file = self.data_file(ino, fh)?;
            file.set_modified(to_system_time(inode.mtime))
                .map_err(io_err)?;
        }
        self.attr(&inode)
    }

    /// The data file of `ino`: the open handle's when there is one.
    fn data_file(&self, ino: Ino, fh: Option<Fh>) -> Result<FileRef, Errno> {
        if let Some(h) = fh.and_then(|fh| lock(&self.handles).get(&fh).cloned()) {
            if h.ino == ino {
                return Ok(FileRef::Handle(h));
            }
        }
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.store.data_path(ino))
            .map(FileRef::Owned)
            .map_err(io_err)
    }

    // ----- names ----------------------------------------------------------

    /// `lookup`: counts a kernel reference on success.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<FileAttr, Errno> {
        check_name(name)?;
        let inode = self
            .store
            .read(|r| r.lookup(parent, name))
            .map_err(db_err)?
            .ok_or(Errno::ENOENT)?;
        let attr = self.attr(&inode)?;
        self.remember(inode.ino);
        Ok(attr)
    }

    fn remember(&self, ino: Ino) {
        *lock(&self.lookups).entry(ino).or_default() += 1;
    }

    /// `forget`: drops `n` kernel references; the last one of an inode
    /// with no names has the reaper delete it.
    pub fn forget(&self, ino: Ino, n: u64) {
        let gone = {
            let mut lookups = lock(&self.lookups);
            match lookups.get_mut(&ino) {
                Some(count) if *count > n => {
                    *count -= n;
                    false
                }
                Some(_) => {
                    lookups.remove(&ino);
                    true
                }
                None => false,
            }
        };
        if gone && ino != ROOT_INO && !self.read_only {
            self.reaper.queue(ino);
        }
    }

    fn delete_if_unlinked(&self, ino: Ino) -> Result<(), Errno> {
        self.reaper.work.delete_unlinked(vec![ino]).map_err(db_err)
    }

    /// Has the reaper's queue deleted now when the store's file system is
    /// short of space, so what an unlink frees is free for what follows.
    fn reap_if_short(&self) {
        if self.store.short_of_room() {
            self.reaper.work.flush();
        }
    }

    /// Creates any kind of inode as `parent/name`.
    ///
    /// Ownership follows POSIX with BSD group semantics on set-group-ID
    /// directories: the new inode takes the directory's group, and a new
    /// directory inherits the set-group-ID bit.
    pub fn make(
        &self,
        caller: Caller,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> Result<FileAttr, Errno> {
        self.throttle();
        let (inode, data) = self.make_inode(caller, parent, name, mode, rdev, target)?;
        let attr = match &data {
            Some(data) => file_attr(&inode, &data.meta),
            None => self.attr(&inode)?,
        };
        self.remember(inode.ino);
        Ok(attr)
    }

    /// `create`: makes the regular file `parent/name` and opens it, with
    /// the data file [`Vfs::make`] made (no second open, no `statx`).
    pub fn create(
        &self,
        caller: Caller,
        parent: Ino,
        name: &[u8],
        mode: u32,
        flags: i32,
    ) -> Result<(FileAttr, Fh), Errno> {
        if Kind::from_mode(mode) != Some(Kind::File) {
            return Err(Errno::EINVAL);
        }
        self.throttle();
        // Held from the data file's creation to its handle, as an open holds
        // it, so no eviction comes in between.
        let _resident = self.residency.read().unwrap_or_else(|p| p.into_inner());
        let reads = self.ship_reads.load(Ordering::SeqCst);
        let (inode, data) = self.make_inode(caller, parent, name, mode, 0, None)?;
        let data = data.expect("a regular file has a data file");
        let attr = file_attr(&inode, &data.meta);
        self.remember(inode.ino);
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        if writable {
            self.count_writer(inode.ino, true);
        }
        let fh = self.add_handle(inode.ino, data.file, writable);
        // The `Create` record stands for the first run of writes, unless
        // replication read a file between its commit and the writer's
        // registration: it may have read this one, empty, with no run for
        // `begin_ship` to end, and the writes that follow would never be
        // logged. Then the run starts again with a `Content` record, as a
        // plain open's does (rare: the window is microseconds).
        if writable && self.ship_reads.load(Ordering::SeqCst) != reads {
            if let Some(state) = lock(&self.open).get_mut(&inode.ino) {
                state.logged = false;
            }
            if let Err(e) = self.will_modify(inode.ino) {
                self.release(fh);
                return Err(e);
            }
        }
        Ok((attr, fh))
    }

    /// The transaction of [`Vfs::make`] and [`Vfs::create`]; for a regular
    /// file, also its new data file.
    fn make_inode(
        &self,
        caller: Caller,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
        target: Option<&[u8]>,
    ) -> Result<(Inode, Option<NewData>), Errno> {
        self.writable()?;
        check_name(name)?;
        let kind = Kind::from_mode(mode).ok_or(Errno::EINVAL)?;
        self.reap_if_short();
        let prepared = match kind {
            Kind::File => self.data.take(),
            _ => None,
        };
        let made = self.store.write(|tx| -> Result<_, TxError> {
            let dir = tx.inode(parent)?.ok_or(Errno::ENOENT)?;
            if dir.kind() != Kind::Dir {
                return Err(Errno::ENOTDIR.into());
            }
            if dir.nlink == 0 {
                // Creating in a removed directory (a process's cwd).
                return Err(Errno::ENOENT.into());
            }
            if tx.lookup(parent, name)?.is_some() {
                return Err(Errno::EEXIST.into());
            }
            let mut mode = mode;
            let mut gid = caller.gid;
            if dir.mode & libc::S_ISGID != 0 {
                gid = dir.gid;
                if kind == Kind::Dir {
                    mode |= libc::S_ISGID;
                }
            }
            let new = NewInode {
                mode,
                uid: caller.uid,
                gid,
                rdev,
                target,
            };
            let inode = tx.create(parent, name, &new, prepared.as_ref().map(|p| p.ino))?;
            if kind != Kind::File {
                return Ok((inode, None));
            }
            // The data file is made (or stamped) inside the transaction: a
            // crash leaves either both or a file no inode has yet, never an
            // inode without data.
            let time = to_system_time(inode.mtime);
            let path = self.store.data_path(inode.ino);
            let data = match &prepared {
                Some(p) => p.stamp(time).map(|meta| (meta, None)),
                None => self
                    .data
                    .create_at(&path, time)
                    .map(|d| (d.meta, Some(d.file))),
            };
            let data = data.map_err(|e| {
                error!("creating {}: {e}", path.display());
                io_err(e)
            })?;
            Ok((inode, Some(data)))
        });
        let (inode, data) = match made {
            Ok(made) => made,
            Err(e) => {
                // The transaction left the reservation as it was (refused
                // with EEXIST, or failed on a full disk): the file serves the
                // next create. One whose reservation is gone (`Tx::create`
                // says so) is left for the next start to sort out.
                let gone = matches!(e, TxError::Db(rusqlite::Error::QueryReturnedNoRows));
                if let Some(prepared) = prepared.filter(|_| !gone) {
                    self.data.give_back(prepared);
                }
                return Err(e.into());
            }
        };
        // A file made here comes with its descriptor; a prepared one's is
        // the prepared file's.
        let data = data.map(|(meta, made_here)| NewData {
            file: made_here
                .or_else(|| prepared.map(Prepared::into_file))
                .expect("a created file has a data file"),
            meta,
        });
        Ok((inode, data))
    }

    /// `readlink`.
    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>, Errno> {
        self.store
            .read(|r| r.symlink_target(ino))
            .map_err(db_err)?
            .ok_or(Errno::EINVAL)
    }

    /// `link`: a new name for an existing non-directory.
    pub fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> Result<FileAttr, Errno> {
        self.writable()?;
        check_name(name)?;
        let inode = self.store.write(|tx| -> Result<Inode, TxError> {
            let inode = tx.inode(ino)?.ok_or(Errno::ENOENT)?;
            if inode.kind() == Kind::Dir {
                return Err(Errno::EPERM.into());
            }
            if inode.nlink == 0 {
                return Err(Errno::ENOENT.into());
            }
            let dir = tx.inode(parent)?.ok_or(Errno::ENOENT)?;
            if dir.kind() != Kind::Dir {
                return Err(Errno::ENOTDIR.into());
            }
            if tx.lookup(parent, name)?.is_some() {
                return Err(Errno::EEXIST.into());
            }
            tx.link(ino, parent, name)?;
            Ok(tx.inode(ino)?.expect("linked inode exists"))
        })?;
        let attr = self.attr(&inode)?;
        self.remember(ino);
        Ok(attr)
    }

    /// `unlink` (`dir == false`) and `rmdir` (`dir == true`).
    pub fn remove(&self, parent: Ino, name: &[u8], dir: bool) -> Result<(), Errno> {
        self.writable()?;
        check_name(name)?;
        self.store.make_room();
        let victim = self.store.write(|tx| -> Result<Inode, TxError> {
            self.settled(parent, name)?;
            let victim = tx.lookup(parent, name)?.ok_or(Errno::ENOENT)?;
            check_removable(tx, &victim, dir)?;
            tx.unlink(parent, name, &victim)?;
            Ok(victim)
        })?;
        self.delete_if_forgotten(victim.ino);
        Ok(())
    }

    /// ENOENT for a name replication changed that the kernel may still map
    /// to what it named before (see [`crate::unsettled`]).
    fn settled(&self, parent: Ino, name: &[u8]) -> Result<(), Errno> {
        match self.unsettled.refuses(parent, name) {
            true => Err(Errno::ENOENT),
            false => Ok(()),
        }
    }

    /// A round of changes replication makes to names under the kernel:
    /// see [`crate::unsettled`].
    pub(crate) fn unsettling(&self) -> Unsettling<'_> {
        self.unsettled.round()
    }

    /// Deletes an inode that just lost its last name, unless the kernel
    /// still holds it (it is open, or a cwd): then `forget` deletes it.
    pub(crate) fn delete_if_forgotten(&self, ino: Ino) {
        if !lock(&self.lookups).contains_key(&ino) {
            if let Err(e) = self.delete_if_unlinked(ino) {
                warn!("delete {ino}: {e:?}");
            }
        }
    }

    /// `rename`, with RENAME_NOREPLACE and RENAME_EXCHANGE.
    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        flags: u32,
    ) -> Result<(), Errno> {
        self.writable()?;
        check_name(name)?;
        check_name(newname)?;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 || (noreplace && exchange)
        {
            return Err(Errno::EINVAL);
        }
        self.store.make_room();
        let replaced = self.store.write(|tx| -> Result<Option<Inode>, TxError> {
            self.settled(parent, name)?;
            self.settled(newparent, newname)?;
            let moved = tx.lookup(parent, name)?.ok_or(Errno::ENOENT)?;
            let newdir = tx.inode(newparent)?.ok_or(Errno::ENOENT)?;
            if newdir.kind() != Kind::Dir {
                return Err(Errno::ENOTDIR.into());
            }
            let target = tx.lookup(newparent, newname)?;
            if let Some(t) = &target {
                if t.ino == moved.ino {
                    // Two names of one inode: POSIX says do nothing.
                    return Ok(None);
                }
            }
            // A directory moved under itself.
            if moved.kind() == Kind::Dir && tx.encloses(moved.ino, newparent)? {
                return Err(Errno::EINVAL.into());
            }
            if exchange {
                let other = target.ok_or(Errno::ENOENT)?;
                if other.kind() == Kind::Dir && tx.encloses(other.ino, parent)? {
                    return Err(Errno::EINVAL.into());
                }
                tx.exchange((parent, name, &moved), (newparent, newname, &other))?;
                return Ok(None);
            }
            if let Some(t) = &target {
                if noreplace {
                    return Err(Errno::EEXIST.into());
                }
                match (moved.kind() == Kind::Dir, t.kind() == Kind::Dir) {
                    (true, false) => return Err(Errno::ENOTDIR.into()),
                    (false, true) => return Err(Errno::EISDIR.into()),
                    _ => {}
                }
                check_removable(tx, t, t.kind() == Kind::Dir)?;
                tx.unlink(newparent, newname, t)?;
            }
            tx.rename(parent, name, newparent, newname, &moved)?;
            Ok(target)
        })?;
        if let Some(t) = replaced {
            self.delete_if_forgotten(t.ino);
        }
        Ok(())
    }

    // ----- directories ----------------------------------------------------

    /// Lists `dir` from readdir offset `offset`, calling `emit` with each
    /// entry's next offset until it returns `false` (the reply is full).
    ///
    /// Offsets 1 and 2 are `.` and `..`; an entry's offset is its cookie + 2.
    /// With `plus`, every emitted entry except `.` and `..` counts a kernel
    /// reference, as readdirplus replies do.
    pub fn readdir(
        &self,
        dir: Ino,
        offset: u64,
        plus: bool,
        mut emit: impl FnMut(u64, &[u8], &FileAttr) -> bool,
    ) -> Result<(), Errno> {
        let me = self.inode(dir)?;
        if me.kind() != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        if offset < 1 && !emit(1, b".", &self.attr(&me)?) {
            return Ok(());
        }
        if offset < 2 {
            let parent = self
                .store
                .read(|r| r.parent_of(dir))
                .map_err(db_err)?
                .unwrap_or(dir);
            let up = self.inode(parent).unwrap_or_else(|_| me.clone());
            if !emit(2, b"..", &self.attr(&up)?) {
                return Ok(());
            }
        }
        let mut after = offset.saturating_sub(2);
        // Bounded by the directory's size: each batch advances the cookie.
        loop {
            let batch = self
                .store
                .read(|r| r.entries(dir, after, 128))
                .map_err(db_err)?;
            if batch.is_empty() {
                return Ok(());
            }
            for entry in &batch {
                let attr = match self.attr(&entry.inode) {
                    Ok(a) => a,
                    // Deleted between the query and now: skip, as if
                    // the listing had started a moment later.
                    Err(_) => continue,
                };
                if !emit(entry.cookie + 2, &entry.name, &attr) {
                    return Ok(());
                }
                if plus {
                    self.remember(entry.inode.ino);
                }
                after = entry.cookie;
            }
        }
    }

    // ----- files ----------------------------------------------------------

    /// Opens the data file of `ino` and returns a handle number.
    pub fn open(&self, ino: Ino, flags: i32) -> Result<Fh, Errno> {
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        if writable {
            self.writable()?;
            // Counted before the row is read: a pull committed after this
            // sees the writer and leaves the file alone (changed here), and
            // one committed before shows in the row, whose bytes the fetch
            // below brings. Counted after the fetch, a pull in between would
            // mark the file not cached under this handle: its writes would
            // go into the old bytes, and the backend's version would replace
            // them with no conflict copy.
            self.count_writer(ino, false);
        }
        let file = {
            let _resident = self.residency.read().unwrap_or_else(|p| p.into_inner());
            self.inode(ino).and_then(|inode| {
                if inode.kind() != Kind::File {
                    return Err(Errno::EINVAL);
                }
                self.ensure_cached(&inode)?;
                OpenOptions::new()
                    .read(true)
                    .write(!self.read_only)
                    .open(self.store.data_path(ino))
                    .map_err(|e| {
                        error!("open data file of inode {ino}: {e}");
                        Errno::EIO
                    })
            })
        };
        match file {
            Ok(file) => Ok(self.add_handle(ino, file, writable)),
            Err(e) => {
                if writable {
                    self.end_writer(ino);
                }
                Err(e)
            }
        }
    }

    /// Counts a writer of `ino`, before its handle exists (see
    /// [`Vfs::open`]). `created`: the inode was just created by this open,
    /// so its `Create` record already stands for its first contents and the
    /// writes that follow need no `Content` record of their own.
    fn count_writer(&self, ino: Ino, created: bool) {
        let mut open = lock(&self.open);
        let state = open.entry(ino).or_default();
        state.writers += 1;
        state.logged |= created;
    }

    /// Registers an open of `ino` on `file` (see [`Vfs::open`]); a writable
    /// one was counted with [`Vfs::count_writer`] already.
    fn add_handle(&self, ino: Ino, file: File, writable: bool) -> Fh {
        // Only a volume with a backend evicts, so only it needs the order.
        if self.source.get().is_some() {
            lock(&self.last_open).insert(ino, std::time::Instant::now());
        }
        let fh = Fh(self.next_fh.fetch_add(1, Ordering::Relaxed));
        lock(&self.handles).insert(
            fh,
            Arc::new(Handle {
                ino,
                file,
                writable,
            }),
        );
        fh
    }

    /// The handle `fh`.
    pub fn handle(&self, fh: Fh) -> Result<Arc<Handle>, Errno> {
        lock(&self.handles).get(&fh).cloned().ok_or(Errno::EBADF)
    }

    /// `read`.
    pub fn read(&self, fh: Fh, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let h = self.handle(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut done = 0;
        while done < buf.len() {
            match h.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    fn in_logged_run(&self, ino: Ino) -> bool {
        lock(&self.open).get(&ino).is_some_and(|s| s.logged)
    }

    /// Logs the first change of a run of writes to `ino` (see module docs).
    pub fn will_modify(&self, ino: Ino) -> Result<(), Errno> {
        self.writable()?;
        if self.in_logged_run(ino) {
            return Ok(());
        }
        self.throttle();
        self.store.write(|tx| tx.content(ino)).map_err(db_err)?;
        // Only a run inside an open is coalesced; without writers (a
        // truncate by path, say) every change is logged on its own.
        if let Some(state) = lock(&self.open).get_mut(&ino) {
            state.logged = state.writers > 0;
        }
        Ok(())
    }

    /// Clears the set-ID bits a write by `by`, who lacks CAP_FSETID, clears
    /// (see [`killed_setid`]); whether there were any.
    pub fn clear_setid(&self, ino: Ino, by: Caller) -> Result<bool, Errno> {
        let inode = self.inode(ino)?;
        if killed_setid(inode.mode, inode.gid, &by) == 0 {
            return Ok(false);
        }
        let set = SetAttr {
            kill_setid: Some(by),
            ..SetAttr::default()
        };
        self.setattr(ino, &set, None).map(|_| true)
    }

    /// `write`.
    pub fn write(&self, fh: Fh, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let h = self.handle(fh)?;
        self.will_modify(h.ino)?;
        h.file.write_all_at(data, offset).map_err(io_err)?;
        Ok(data.len() as u32)
    }

    /// `release`: closes the handle; the last writer ends the run of writes.
    pub fn release(&self, fh: Fh) {
        let Some(h) = lock(&self.handles).remove(&fh) else {
            return;
        };
        if h.writable {
            self.end_writer(h.ino);
        }
    }

    /// Uncounts a writer of `ino`; the last one logs the writes that
    /// replication could not see.
    fn end_writer(&self, ino: Ino) {
        let mut open = lock(&self.open);
        let mut relog = false;
        if let Some(state) = open.get_mut(&ino) {
            state.writers = state.writers.saturating_sub(1);
            if state.writers == 0 {
                relog = state.shipped_mid_run;
                open.remove(&ino);
            }
        }
        drop(open);
        if relog {
            // The writes since replication last read the file: logged
            // now, and the durable reminder of them goes in the same
            // commit (see `relog_interrupted_writers`).
            let logged = self.store.write(|tx| {
                tx.content(ino)?;
                tx.clear_writing(ino)
            });
            if let Err(e) = logged {
                warn!("logging the last writes to inode {ino}: {e}");
            }
        }
    }

    /// Evicts the clean files among `candidates` (least recently opened
    /// first) until the cached bytes are at most `target`; returns the
    /// bytes still cached. Files with open handles stay.
    pub fn evict(&self, candidates: &[Ino], cached: u64, target: u64) -> Result<u64, Errno> {
        let mut order: Vec<(Option<std::time::Instant>, Ino)> = {
            let last = lock(&self.last_open);
            candidates
                .iter()
                .map(|i| (last.get(i).copied(), *i))
                .collect()
        };
        order.sort();
        let mut cached = cached;
        for (_, ino) in order {
            if cached <= target {
                break;
            }
            // Never wait: opens hold this shared across a fetch, and a
            // waiting writer would stall every later open behind it.
            let Ok(_exclusive) = self.residency.try_write() else {
                break;
            };
            if lock(&self.handles).values().any(|h| h.ino == ino) {
                continue;
            }
            let path = self.store.data_path(ino);
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let mtime = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
            self.store
                .write(|tx| tx.set_evicted(ino, meta.len(), mtime))
                .map_err(db_err)?;
            free_data(&self.store, &self.data, ino);
            lock(&self.last_open).remove(&ino);
            cached = cached.saturating_sub(meta.len());
        }
        Ok(cached)
    }

    /// Whether any handle has `ino` open.
    pub fn is_open(&self, ino: Ino) -> bool {
        lock(&self.handles).values().any(|h| h.ino == ino)
    }

    /// Whether `ino` is open for writing.
    pub fn has_writers(&self, ino: Ino) -> bool {
        lock(&self.open).get(&ino).is_some_and(|s| s.writers > 0)
    }

    /// Called by replication before it reads the bytes of `ino`: ends the
    /// current run of writes, so every write after this point is logged
    /// again and shipped later, never lost between two reads. The shipper
    /// makes that promise durable with [`Tx::mark_writing`] in the commit
    /// that records the shipped state, if the file still has writers then:
    /// it calls this again there, and the answer (whether writers have the
    /// file open, as seen under the same lock that ended their run) says
    /// whether to.
    pub fn begin_ship(&self, ino: Ino) -> bool {
        self.ship_reads.fetch_add(1, Ordering::SeqCst);
        match lock(&self.open).get_mut(&ino) {
            Some(state) if state.writers > 0 => {
                state.logged = false;
                state.shipped_mid_run = true;
                true
            }
            _ => false,
        }
    }

    /// What `ferry sync` needs first: every file open for writing whose
    /// latest writes no log record covers yet (replication read it since
    /// its run began, and passthrough or mmap writes may have followed) is
    /// logged now, so the sync waits for its current contents too.
    pub fn log_open_writers(&self) -> Result<(), Errno> {
        let unlogged: Vec<Ino> = lock(&self.open)
            .iter()
            .filter(|(_, s)| s.writers > 0 && !s.logged)
            .map(|(ino, _)| *ino)
            .collect();
        for ino in unlogged {
            match self.will_modify(ino) {
                // Closed and deleted in the meantime: nothing to ship.
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `fsync`: the file's bytes, then every committed metadata change.
    ///
    /// The data directory is synced too: a new file's data file got its name
    /// there (a create or a recycled spare's rename), and after a power cut
    /// the inode committed in the WAL must find it.
    pub fn fsync(&self, fh: Option<Fh>, datasync: bool) -> Result<(), Errno> {
        if let Some(fh) = fh {
            let h = self.handle(fh)?;
            if datasync {
                h.file.sync_data().map_err(io_err)?;
            } else {
                h.file.sync_all().map_err(io_err)?;
            }
            let name_synced = lock(&self.open).get(&h.ino).is_some_and(|s| s.name_synced);
            if !name_synced {
                File::open(self.store.dir().join("data"))
                    .and_then(|d| d.sync_all())
                    .map_err(io_err)?;
                if let Some(state) = lock(&self.open).get_mut(&h.ino) {
                    state.name_synced = true;
                }
            }
        }
        self.store.sync().map_err(io_err)
    }

    /// `fallocate`, any mode the data file's file system supports.
    pub fn fallocate(&self, fh: Fh, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        let h = self.handle(fh)?;
        let (offset, length) = (
            i64::try_from(offset).map_err(|_| Errno::EFBIG)?,
            i64::try_from(length).map_err(|_| Errno::EFBIG)?,
        );
        self.will_modify(h.ino)?;
        let mode = nix::fcntl::FallocateFlags::from_bits_retain(mode);
        nix::fcntl::fallocate(h.file.as_fd(), mode, offset, length).map_err(nix_err)
    }

    /// `lseek` for SEEK_DATA and SEEK_HOLE (others never reach the daemon).
    pub fn lseek(&self, fh: Fh, offset: i64, whence: i32) -> Result<i64, Errno> {
        let h = self.handle(fh)?;
        let whence = match whence {
            libc::SEEK_DATA => nix::unistd::Whence::SeekData,
            libc::SEEK_HOLE => nix::unistd::Whence::SeekHole,
            libc::SEEK_SET => nix::unistd::Whence::SeekSet,
            libc::SEEK_END => nix::unistd::Whence::SeekEnd,
            _ => return Err(Errno::EINVAL),
        };
        nix::unistd::lseek(h.file.as_fd(), offset, whence).map_err(nix_err)
    }

    /// `copy_file_range` between two open files, done by the kernel on the
    /// data files (a reflink where the store's file system can).
    pub fn copy_file_range(
        &self,
        (fh_in, off_in): (Fh, u64),
        (fh_out, off_out): (Fh, u64),
        len: u64,
    ) -> Result<u32, Errno> {
        let (src, dst) = (self.handle(fh_in)?, self.handle(fh_out)?);
        self.will_modify(dst.ino)?;
        let mut off_in = i64::try_from(off_in).map_err(|_| Errno::EINVAL)?;
        let mut off_out = i64::try_from(off_out).map_err(|_| Errno::EINVAL)?;
        // The reply carries a u32 count; the kernel loops for the rest.
        let len = len.min(1 << 30) as usize;
        let n = nix::fcntl::copy_file_range(
            src.file.as_fd(),
            Some(&mut off_in),
            dst.file.as_fd(),
            Some(&mut off_out),
            len,
        )
        .map_err(nix_err)?;
        Ok(n as u32)
    }

    // ----- xattrs ---------------------------------------------------------

    /// `setxattr` with XATTR_CREATE / XATTR_REPLACE.
    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> Result<(), Errno> {
        self.writable()?;
        check_xattr_name(name)?;
        if value.len() > XATTR_SIZE_MAX {
            return Err(Errno::E2BIG);
        }
        self.store.write(|tx| -> Result<(), TxError> {
            tx.inode(ino)?.ok_or(Errno::ENOENT)?;
            let exists = tx.xattr(ino, name)?.is_some();
            if flags & libc::XATTR_CREATE != 0 && exists {
                return Err(Errno::EEXIST.into());
            }
            if flags & libc::XATTR_REPLACE != 0 && !exists {
                return Err(Errno::ENODATA.into());
            }
            tx.set_xattr(ino, name, value)?;
            Ok(())
        })?;
        Ok(())
    }

    /// `getxattr`.
    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>, Errno> {
        check_xattr_name(name)?;
        self.store
            .read(|r| r.xattr(ino, name))
            .map_err(db_err)?
            .ok_or(Errno::ENODATA)
    }

    /// `listxattr`: the names, each NUL-terminated.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<u8>, Errno> {
        let names = self.store.read(|r| r.xattr_names(ino)).map_err(db_err)?;
        let mut out = Vec::new();
        for n in names {
            out.extend_from_slice(&n);
            out.push(0);
        }
        Ok(out)
    }

    /// `removexattr`.
    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> Result<(), Errno> {
        self.writable()?;
        check_xattr_name(name)?;
        let existed = self
            .store
            .write(|tx| tx.remove_xattr(ino, name))
            .map_err(db_err)?;
        if existed {
            Ok(())
        } else {
            Err(Errno::ENODATA)
        }
    }

    /// `statfs`: the store's file system, with ferry's inode count.
    pub fn statfs(&self) -> Result<nix::sys::statvfs::Statvfs, Errno> {
        // What was unlinked before is free in the answer.
        self.reaper.work.flush();
        nix::sys::statvfs::statvfs(self.store.dir()).map_err(nix_err)
    }

    /// Number of inodes in use, for statfs.
    pub fn inode_count(&self) -> Result<u64, Errno> {
        self.store.read(|r| r.inode_count()).map_err(db_err)
    }
}

/// Either an open handle's data file or one opened for a single request.
enum FileRef {
    Handle(Arc<Handle>),
    Owned(File),
}

impl std::ops::Deref for FileRef {
    type Target = File;
    fn deref(&self) -> &File {
        match self {
            FileRef::Handle(h) => &h.file,
            FileRef::Owned(f) => f,
        }
    }
}

/// The rules Linux file systems apply to xattr names. The kernel leaves
/// them to FUSE file systems, which see every name.
fn check_xattr_name(name: &[u8]) -> Result<(), Errno> {
    if name.len() > XATTR_NAME_MAX {
        return Err(Errno::ERANGE);
    }
    // POSIX ACLs (system.*) would need the kernel to trust them
    // (FUSE_POSIX_ACL); refusing them keeps mode bits the only permission
    // source. Names outside a namespace are not supported anywhere.
    let suffix = [&b"user."[..], b"trusted.", b"security."]
        .iter()
        .find_map(|ns| name.strip_prefix(*ns))
        .ok_or(Errno::EOPNOTSUPP)?;
    if suffix.is_empty() {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// POSIX rules for removing `victim` by unlink (`dir == false`) or rmdir.
fn check_removable(tx: &Tx<'_>, victim: &Inode, dir: bool) -> Result<(), TxError> {
    match (dir, victim.kind() == Kind::Dir) {
        (true, false) => Err(Errno::ENOTDIR.into()),
        (false, true) => Err(Errno::EISDIR.into()),
        (true, true) if tx.has_entries(victim.ino)? => Err(Errno::ENOTEMPTY.into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;

    const ROOT: Caller = Caller {
        uid: 0,
        gid: 0,
        pid: 0,
    };

    /// What must hold of the data files at rest (no preparer running)
    /// after any sequence of creates, unlinks, restarts and crashes that
    /// take a spare's or a reserved number's file: no live inode is listed
    /// or reserved, the sequence is past every reserved number, every
    /// listed spare's and reserved number's data file is there and empty,
    /// and every live file's data file holds what was written to it.
    /// Returns the (file system) inode numbers of the pool's files.
    fn check_files(dir: &std::path::Path, live: &HashMap<Vec<u8>, Vec<u8>>) -> HashSet<u64> {
        let store = Store::open(dir).unwrap();
        let mut files = HashSet::new();
        let sequence = store.read(|r| r.sequence("inode")).unwrap();
        let reserved = store.read(|r| r.reserved()).unwrap();
        for &ino in &reserved {
            assert!(ino.0 <= sequence, "reserved {ino} past the sequence");
        }
        for ino in store
            .read(|r| r.spares())
            .unwrap()
            .into_iter()
            .chain(reserved)
        {
            assert!(
                store.read(|r| r.inode(ino)).unwrap().is_none(),
                "live {ino} listed or reserved"
            );
            let meta = std::fs::metadata(store.data_path(ino))
                .unwrap_or_else(|e| panic!("spare or reserved {ino}: {e}"));
            assert_eq!(meta.len(), 0, "spare or reserved {ino}");
            files.insert(meta.ino());
        }
        for (name, bytes) in live {
            let inode = store.read(|r| r.lookup(ROOT_INO, name)).unwrap().unwrap();
            let data = std::fs::read(store.data_path(inode.ino)).unwrap();
            assert_eq!(&data, bytes, "{}", String::from_utf8_lossy(name));
        }
        files
    }

    /// The store at `dir` passes fsck with no stray data file.
    fn fsck_clean(dir: &std::path::Path) {
        let report = crate::fsck::check(dir).unwrap();
        assert_eq!(report.stray_data_files, 0);
    }

    #[test]
    fn data_files_are_recycled_and_prepared_and_never_shared() {
        let scratch = tempfile::Builder::new()
            .prefix("ferry-spares-")
            .tempdir()
            .unwrap();
        let dir = scratch.path().join("store");
        let open = || Some(Vfs::new(Store::open(&dir).unwrap(), false).unwrap());
        let mut vfs = open();
        let mut live: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        let (mut pool, mut recycled, mut numbers) = (HashSet::new(), 0, HashSet::new());
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for step in 0..600u64 {
            let v = vfs.as_ref().unwrap();
            match next() % 16 {
                // Create and write: a data file of its own, whatever spare
                // or reserved file it was, at a number never seen before.
                0..=7 => {
                    let name = format!("f{step}").into_bytes();
                    let flags = libc::O_WRONLY | libc::O_CREAT;
                    // A create refused takes a prepared file and gives it
                    // back, untouched, with its number unused.
                    if let Some(taken) = live.keys().next().filter(|_| step % 3 == 0) {
                        let refused = v.create(ROOT, ROOT_INO, taken, libc::S_IFREG | 0o644, flags);
                        assert_eq!(refused.err(), Some(Errno::EEXIST));
                    }
                    let (attr, fh) = v
                        .create(ROOT, ROOT_INO, &name, libc::S_IFREG | 0o644, flags)
                        .unwrap();
                    assert!(numbers.insert(attr.ino), "number {} twice", attr.ino.0);
                    let path = v.store().data_path(attr.ino.into());
                    let meta = std::fs::metadata(&path).unwrap();
                    assert_eq!(meta.len(), 0, "a new file's data file is empty");
                    recycled += usize::from(pool.contains(&meta.ino()));
                    let bytes = step.to_le_bytes().repeat(1 + (next() % 600) as usize);
                    std::fs::write(path, &bytes).unwrap();
                    v.release(fh);
                    live.insert(name, bytes);
                }
                // Unlink, and the kernel forgets it: the reaper lists it.
                8..=13 => {
                    let Some(name) = live
                        .keys()
                        .nth(next() as usize % live.len().max(1))
                        .cloned()
                    else {
                        continue;
                    };
                    let ino = v
                        .store()
                        .read(|r| r.lookup(ROOT_INO, &name))
                        .unwrap()
                        .unwrap()
                        .ino;
                    v.remove(ROOT_INO, &name, false).unwrap();
                    v.forget(ino, 1);
                    v.reaper.work.flush();
                    live.remove(&name);
                }
                // A restart.
                14 => {
                    drop(vfs.take());
                    pool.extend(check_files(&dir, &live));
                    fsck_clean(&dir);
                    vfs = open();
                }
                // A crash took a listed spare's file and a reserved
                // number's (the preparer renamed or made them and died
                // before it recorded that): the next start drops both rows.
                _ => {
                    drop(vfs.take());
                    pool.extend(check_files(&dir, &live));
                    let store = Store::open(&dir).unwrap();
                    let spare = store.read(|r| r.spares()).unwrap().first().copied();
                    let reserved = store.read(|r| r.reserved()).unwrap().first().copied();
                    for ino in spare.into_iter().chain(reserved) {
                        let path = store.data_path(ino);
                        // Its file system inode may be reused: not the pool's.
                        pool.remove(&std::fs::metadata(&path).unwrap().ino());
                        std::fs::remove_file(path).unwrap();
                    }
                    drop(store);
                    vfs = open();
                }
            }
        }
        assert!(
            recycled > 10,
            "{recycled} creates took a spare or reserved file"
        );
        drop(vfs);
        check_files(&dir, &live);
        fsck_clean(&dir);
    }
}
