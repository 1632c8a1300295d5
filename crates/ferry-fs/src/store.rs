//! The local store: the truth for this host.
//!
//! Metadata (inodes, directory entries, xattrs) lives in one SQLite database
//! in WAL mode; file contents live in plain files under `data/`, one per
//! regular inode, so reads and writes never pass through the database.
//!
//! Every mutation runs in one [`Tx`] that also appends its record to the
//! change log (see [`crate::log`]), so after any crash the log describes
//! exactly the changes that are in the store: both commit or neither does.
//!
//! Durability: a write is durable against a crash of the daemon once its
//! record is in the journal ([`crate::journal`]: one `pwrite`, before
//! [`Store::write`] returns); its SQLite transaction commits later, with a
//! batch of others, and a crash before that is repaired by replaying the
//! journal when the store opens. Neither survives a power cut on its own:
//! [`Store::sync`] fsyncs the journal, which makes every earlier write
//! durable; `fsync` and `fsyncdir` call it, so once they return the change
//! survives power loss too. Batches commit with `synchronous=NORMAL`. The
//! WAL is checked before SQLite replays it ([`crate::wal`]), kept small
//! (`journal_size_limit`), and emptied into the database when the store
//! closes, after the open batch commits.
//!
//! A full disk must not wedge the volume: the store keeps a small reserve
//! file, given up by operations that free space ([`Store::make_room`]) so
//! an unlink can still commit, and taken back once there is room again.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, MutexGuard};

use ferry_backend::ChunkHash;
use rusqlite::{params, Connection, OptionalExtension, ToSql};

use crate::error::StoreError;
use crate::ids::{Ino, Seq};
use crate::journal::{self, Journal, Record};
use crate::log::{Change, LogRecord};

/// `PRAGMA application_id` of a ferry store ("FRRY"): tells a ferry store
/// apart from any other SQLite file before its tables are read.
const APPLICATION_ID: i32 = 0x4652_5259;

/// The version of an inode once its `Create` record is logged: versions
/// start at 1 and every logged change bumps them, creation included.
const CREATED_VERSION: i64 = 2;

/// The store layout version this build reads and writes (`PRAGMA user_version`).
pub const FORMAT_VERSION: i32 = 6;

/// What a store of each older format version needs to reach the next:
/// `MIGRATIONS[v - 1]` takes version `v` to `v + 1`.
const MIGRATIONS: &[&str] = &[VERSION_2, VERSION_3, VERSION_4, VERSION_5, VERSION_6];

/// Files whose contents were shipped while a writer still had them open
/// (version 2). Writes after that point are not visible to the daemon
/// (passthrough, mmap), so until the last writer closes and the file is
/// logged again, this row is the durable memory that the file may have
/// changed: a daemon killed in between logs every such file at its next
/// start. See [`crate::vfs`].
///
/// And the backend keys of the batch being committed (`inflight`): if the
/// daemon dies after the backend committed a batch but before this store
/// recorded it, these are the keys whose backend versions it must learn
/// again before it ships on top of them.
const VERSION_2: &str = "CREATE TABLE writing(ino INTEGER PRIMARY KEY);
CREATE TABLE inflight(key BLOB PRIMARY KEY, deleting INTEGER NOT NULL) WITHOUT ROWID;";

/// Down-sync (version 3). Records of changes pulled from the backend are
/// `pulled`: they keep the log a faithful replay of the store, but the
/// shipper skips them, because the backend already holds what they
/// describe (shipping them back would echo every change between hosts).
/// `recheck` holds the backend keys whose remote state down-sync could not
/// apply yet (a local change to the same object was pending): they are
/// fetched and tried again until they apply, so no remote change is lost
/// to a skipped feed item.
///
/// `resolved` lists every conflict this host resolved, with the path and
/// how, for `ferry status` (the table `conflict` keeps only what waits).
const VERSION_3: &str = "ALTER TABLE log ADD COLUMN pulled INTEGER NOT NULL DEFAULT 0;
CREATE TABLE recheck(key BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE resolved(id INTEGER PRIMARY KEY, at INTEGER NOT NULL, path TEXT NOT NULL,
    how TEXT NOT NULL);";

/// The journal (version 4, see [`crate::journal`]): its epoch, random so a
/// journal file left from another store never matches, and the last record
/// the committed store holds. A store of version 3 has no journal, and a
/// build that knows none refuses version 4, so none ignores one.
const VERSION_4: &str = "INSERT INTO meta(key, value) VALUES
    ('journal_epoch', abs(random() >> 1)), ('journal_applied', 0);";

/// Spare data files (version 5, see [`crate::data`]): deleted inodes whose
/// data files stay in `data/`, truncated, until a create renames one into
/// place. Listed by the transaction that deletes the inode, unlisted by the
/// one that takes the file.
const VERSION_5: &str = "CREATE TABLE spare(ino INTEGER PRIMARY KEY);";

/// Reserved inode numbers (version 6, see [`crate::data`]): taken from the
/// inode sequence ahead of the creates that will use them, each with its
/// data file made in `data/` off the request path. The create that takes
/// one gets that number and unreserves it in its transaction. No inode has
/// a reserved number and the sequence is past all of them, so none is
/// ever handed out twice.
const VERSION_6: &str = "CREATE TABLE reserved(ino INTEGER PRIMARY KEY);";

/// Bytes kept in reserve for operations that free space on a full disk.
const RESERVE_BYTES: u64 = 8 << 20;

/// Free space above which [`Store::make_room`] trusts its last look for
/// [`ROOM_RECHECK`].
const PLENTY_BYTES: u64 = 16 * RESERVE_BYTES;

/// How long [`Store::make_room`] trusts a look that found plenty of room.
const ROOM_RECHECK: std::time::Duration = std::time::Duration::from_millis(10);

/// One resolved conflict as the store keeps it: (when, path, how).
pub type Resolved = (Nanos, String, String);

/// Inode number of the root directory, fixed by FUSE.
pub const ROOT_INO: Ino = Ino::ROOT;

const SCHEMA: &str = "
CREATE TABLE meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
-- ino is the local number FUSE sees; (host, counter) is the identity that is
-- unique across hosts. AUTOINCREMENT: a number is never reused, so a stale
-- kernel handle can never reach a different file.
CREATE TABLE inode(
    ino INTEGER PRIMARY KEY AUTOINCREMENT,
    host INTEGER NOT NULL,
    counter INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    size INTEGER NOT NULL,
    atime INTEGER NOT NULL,
    mtime INTEGER NOT NULL,
    ctime INTEGER NOT NULL,
    crtime INTEGER NOT NULL,
    rdev INTEGER NOT NULL,
    target BLOB,
    version INTEGER NOT NULL,
    -- 1: the data file holds the bytes; 0: only the backend does (a
    -- restored or evicted file, fetched on first open).
    cached INTEGER NOT NULL DEFAULT 1,
    UNIQUE(host, counter));
-- id doubles as the readdir cookie: new entries get a larger one, so a
-- listing resumed at an offset sees every entry that existed throughout
-- exactly once.
CREATE TABLE dentry(
    id INTEGER PRIMARY KEY,
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    ino INTEGER NOT NULL,
    UNIQUE(parent, name));
CREATE INDEX dentry_by_ino ON dentry(ino);
CREATE TABLE xattr(ino INTEGER NOT NULL, name BLOB NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY(ino, name)) WITHOUT ROWID;
-- Replication bookkeeping: the backend version each shipped object is at
-- (keys: see replicate::Key), the chunk list of each shipped or restored
-- file, and conflicts kept for a person (or part 3's resolver) to settle.
CREATE TABLE remote(key BLOB PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE chunk(ino INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
    len INTEGER NOT NULL, PRIMARY KEY(ino, idx)) WITHOUT ROWID;
CREATE TABLE conflict(key BLOB PRIMARY KEY, at INTEGER NOT NULL, object TEXT NOT NULL,
    detail TEXT NOT NULL) WITHOUT ROWID;
-- host and counter: the inode's global identity, kept so a record still
-- names its object after the inode row is gone (a delete).
CREATE TABLE log(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    ino INTEGER NOT NULL,
    host INTEGER NOT NULL,
    counter INTEGER NOT NULL,
    version INTEGER NOT NULL,
    parent INTEGER,
    name BLOB,
    parent2 INTEGER,
    name2 BLOB,
    at INTEGER NOT NULL,
    pulled INTEGER NOT NULL DEFAULT 0);
CREATE TABLE writing(ino INTEGER PRIMARY KEY);
CREATE TABLE inflight(key BLOB PRIMARY KEY, deleting INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE recheck(key BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE resolved(id INTEGER PRIMARY KEY, at INTEGER NOT NULL, path TEXT NOT NULL,
    how TEXT NOT NULL);
";

/// File type bits of `mode`, as stored (the `S_IFMT` part).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A regular file, whose bytes live in `data/`.
    File,
    /// A directory.
    Dir,
    /// A symbolic link; its target is in the row.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A unix socket.
    Socket,
    /// A character device.
    CharDev,
    /// A block device.
    BlockDev,
}

impl Kind {
    /// The kind encoded in a full `st_mode`, if it is a valid one.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// Nanoseconds since the Unix epoch, the store's one time unit.
pub type Nanos = i64;

/// The current time in [`Nanos`].
pub fn now() -> Nanos {
    nanos_of(std::time::SystemTime::now())
}

/// `t` in [`Nanos`], before 1970 too.
pub fn nanos_of(t: std::time::SystemTime) -> Nanos {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as Nanos,
        Err(e) => -(e.duration().as_nanos() as Nanos),
    }
}

/// One inode row.
#[derive(Clone, Debug)]
pub struct Inode {
    /// Local inode number.
    pub ino: Ino,
    /// Host that created it (half of the global identity).
    pub host: u32,
    /// Per-host counter (the other half).
    pub counter: u64,
    /// Full `st_mode`: type and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Link count (for directories: 2 + subdirectories).
    pub nlink: u32,
    /// Size for everything but regular files, whose size is their data file's.
    pub size: u64,
    /// Access time.
    pub atime: Nanos,
    /// Modification time (regular files: see [`crate::vfs`], the data file's wins).
    pub mtime: Nanos,
    /// Status change time.
    pub ctime: Nanos,
    /// Creation time.
    pub crtime: Nanos,
    /// Device number for device nodes.
    pub rdev: u32,
    /// Version, bumped by every logged change to this inode.
    pub version: u64,
    /// Whether the data file holds the bytes (regular files).
    pub cached: bool,
}

impl Inode {
    /// The file type.
    pub fn kind(&self) -> Kind {
        Kind::from_mode(self.mode).unwrap_or(Kind::File)
    }

    /// The global identity, `host:counter`, as other hosts will know it.
    pub fn global_id(&self) -> String {
        format!("{:08x}:{:x}", self.host, self.counter)
    }
}

/// A directory entry as listed by readdir.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Cookie: readdir resumes after it.
    pub cookie: u64,
    /// Entry name.
    pub name: Vec<u8>,
    /// Target inode.
    pub inode: Inode,
}

/// The local store: one database connection, the data directory, the WAL,
/// the journal.
pub struct Store {
    db: Mutex<Db>,
    /// Syncs the journal for [`Store::sync`] without the lock.
    syncer: journal::Syncer,
    dir: PathBuf,
    host: u32,
    /// Held for the life of the store: a second daemon on the same store
    /// would corrupt it, so the `flock` on `lock` refuses it.
    _lock: nix::fcntl::Flock<File>,
    /// Counts commits that appended to the log; the replicator waits on it
    /// instead of polling.
    log_generation: (Mutex<LogGeneration>, std::sync::Condvar),
    /// When [`Store::make_room`] last looked at the free space, and what it
    /// found.
    room: Mutex<Option<(std::time::Instant, u64)>>,
}

/// What the store's lock guards: the connection, with the batch open on
/// it, and the journal that makes the batch's writes durable (see
/// [`crate::journal`]).
struct Db {
    conn: Connection,
    journal: Journal,
    /// The store directory (its WAL is synced before a new epoch starts).
    dir: PathBuf,
    /// Whether a batch (a SQLite transaction spanning writes) is open.
    open: bool,
    /// Writes and record bytes in it.
    writes: u32,
    bytes: u64,
    /// SQLite rolled an open batch back (an I/O error, a full disk): the
    /// connection lacks journaled writes until the journal is replayed.
    lost: bool,
    /// The next journal epoch is committed and waits for its commit to be
    /// durable before the journal starts again at offset 0 (overwriting
    /// records that only the commit covers). No write is journaled
    /// meanwhile.
    epoch_pending: bool,
    /// Which inodes may have xattrs (see [`XattrOwners`]).
    xattr_owners: RefCell<XattrOwners>,
}

/// The inodes that may have extended attributes, so that asking one that
/// has none costs no query: the kernel asks `security.capability` before
/// the first write into an inode after its attributes were fetched (a
/// create, a `stat`), and `ls -l` asks for the ACLs of every file.
///
/// Loaded from the table when the store opens and grown by every statement
/// that inserts an xattr, under the store's lock like the query it spares;
/// never shrunk while the store is open. An inode wrongly in it costs a
/// query; one wrongly missing would hide its xattrs, so every insert goes
/// through [`Tx::set_xattr`] or [`Tx::import_xattrs`] (the journal's replay
/// re-runs only statements those made, and at open comes before the load).
/// Inode numbers are never reused, so a deleted inode left in it is only
/// a few bytes.
#[derive(Debug, Default)]
pub struct XattrOwners {
    inos: HashSet<Ino>,
    /// Past [`XATTR_OWNERS_MAX`] inodes, every inode may have xattrs.
    all: bool,
}

/// Inodes [`XattrOwners`] tracks one by one (about 32 MiB at most).
const XATTR_OWNERS_MAX: usize = 1 << 20;

impl XattrOwners {
    fn load(conn: &Connection) -> rusqlite::Result<XattrOwners> {
        let mut owners = XattrOwners::default();
        let mut stmt = conn.prepare("SELECT DISTINCT ino FROM xattr LIMIT ?1")?;
        for ino in stmt.query_map([XATTR_OWNERS_MAX as i64 + 1], |r| r.get(0))? {
            owners.add(ino?);
        }
        Ok(owners)
    }

    fn add(&mut self, ino: Ino) {
        if !self.all && self.inos.insert(ino) && self.inos.len() > XATTR_OWNERS_MAX {
            self.all = true;
            self.inos = HashSet::new();
        }
    }

    fn may_have(&self, ino: Ino) -> bool {
        self.all || self.inos.contains(&ino)
    }
}

/// What [`Store::wait_for_log`] waits on.
#[derive(Default)]
struct LogGeneration {
    /// Commits that appended to the log so far.
    generation: u64,
    /// Threads waiting for the next one.
    waiters: u32,
}

/// Undoes one write inside the batch when dropped: [`Store::write`]
/// forgets it once the write is journaled, so it acts on errors and panics
/// only. If SQLite already rolled the whole batch back, `ROLLBACK TO` fails,
/// and [`Db::heal`] sees it next.
struct Undo<'a>(&'a Connection);

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        let _ = exec_cached(self.0, "ROLLBACK TO write");
        let _ = exec_cached(self.0, "RELEASE write");
    }
}

/// Runs a statement without parameters, cached (`BEGIN`, `SAVEPOINT`…:
/// parsing them anew each time cost about a tenth of a create's CPU).
fn exec_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

impl Db {
    /// Starts one write: replays the journal if the batch was lost, opens a
    /// batch if none is, and sets the savepoint the write rolls back to.
    fn begin(&mut self) -> rusqlite::Result<()> {
        self.heal()?;
        if !self.open {
            exec_cached(&self.conn, "BEGIN IMMEDIATE")?;
            self.open = true;
            self.writes = 0;
            self.bytes = 0;
        }
        exec_cached(&self.conn, "SAVEPOINT write")
    }

    /// Brings the connection back to every journaled write if SQLite rolled
    /// the batch back behind the store's back, and finishes a new epoch
    /// whose commit could not be made durable before.
    fn heal(&mut self) -> rusqlite::Result<()> {
        if self.open && self.conn.is_autocommit() {
            self.open = false;
            self.lost = true;
        }
        self.finish_epoch()?;
        if self.lost {
            tracing::warn!("the store's open batch was rolled back; replaying the journal");
            journal::replay(&self.conn, &mut self.journal).map_err(replay_failed)?;
            self.lost = false;
        }
        Ok(())
    }

    /// Commits the open batch, recording how far the journal is applied
    /// and, once the journal is full or `new_epoch` asks, a new epoch.
    fn commit(&mut self, new_epoch: bool) -> rusqlite::Result<()> {
        self.heal()?;
        if !self.open {
            return Ok(());
        }
        let wrap = new_epoch || self.journal.full();
        self.set_journal_meta(wrap)?;
        if let Err(e) = exec_cached(&self.conn, "COMMIT") {
            // Still open: it commits with the next batch. Rolled back:
            // healed from the journal.
            self.heal()?;
            return Err(e);
        }
        self.open = false;
        if wrap {
            self.epoch_pending = true;
            self.finish_epoch()?;
        }
        Ok(())
    }

    /// Starts a new epoch outside any batch (after a replay).
    fn new_epoch(&mut self) -> rusqlite::Result<()> {
        exec_cached(&self.conn, "BEGIN IMMEDIATE")?;
        self.open = true;
        self.commit(true)
    }

    /// Records, in the open batch, the last journaled write as applied and,
    /// with `new_epoch`, the next epoch.
    fn set_journal_meta(&self, new_epoch: bool) -> rusqlite::Result<()> {
        let next = new_epoch.then(|| self.next_epoch());
        journal::record_position(&self.conn, self.journal.last(), next)
    }

    fn next_epoch(&self) -> u64 {
        self.journal.epoch().wrapping_add(1)
    }

    /// Starts the committed new epoch once its commit is durable.
    fn finish_epoch(&mut self) -> rusqlite::Result<()> {
        if self.epoch_pending {
            sync_wal(&self.dir).map_err(|e| {
                store_error(
                    rusqlite::ffi::SQLITE_IOERR,
                    format!("syncing the store's WAL: {e}"),
                )
            })?;
            self.journal.restart(self.next_epoch());
            self.epoch_pending = false;
        }
        Ok(())
    }
}

/// A store error of SQLite's kind `code` (so the vfs maps it to an errno
/// as it does SQLite's own), saying `what`.
fn store_error(code: std::ffi::c_int, what: impl Into<String>) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), Some(what.into()))
}

/// The error of a statement run after SQLite rolled the batch back.
fn batch_lost() -> rusqlite::Error {
    store_error(
        rusqlite::ffi::SQLITE_ABORT,
        "the store's batch was rolled back",
    )
}

/// Whether a SQLite error is the disk's (full, failing, read-only), not the
/// data's.
fn is_io_error(code: rusqlite::ErrorCode) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        code,
        DiskFull | SystemIoFailure | ReadOnly | PermissionDenied | CannotOpen | OutOfMemory
    )
}

/// The error a failed replay of the journal becomes inside the store.
fn replay_failed(e: journal::ReplayError) -> rusqlite::Error {
    store_error(rusqlite::ffi::SQLITE_IOERR, e.to_string())
}

/// Syncs the store's WAL (or nothing: without one, everything is in the
/// synced database).
fn sync_wal(dir: &Path) -> io::Result<()> {
    match File::open(dir.join("meta.db-wal")) {
        Ok(f) => f.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl Store {
    /// Opens the store in `dir`, creating a fresh one when `dir` holds none.
    ///
    /// A store that exists is checked: it must be a ferry store of this
    /// format version and pass SQLite's `quick_check`. Anything else is
    /// refused, never repaired, so a damaged store is left as evidence.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, true)
    }

    /// Opens an existing store; a directory without one is an error, not
    /// a new store (what a checker wants).
    pub fn open_existing(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(dir, false)
    }

    fn open_with(dir: &Path, create: bool) -> Result<Store, StoreError> {
        let db_path = dir.join("meta.db");
        if !create && !db_path.exists() {
            return Err(StoreError::Foreign(dir.to_path_buf()));
        }
        let fresh = !db_path.exists();
        if fresh && dir.exists() && !holds_only_ferry_files(dir)? {
            // Never take over a directory that holds someone else's files.
            return Err(StoreError::Foreign(dir.to_path_buf()));
        }
        std::fs::create_dir_all(dir.join("data")).map_err(|e| StoreError::io(dir, e))?;
        let lock = lock_store(dir)?;
        let journal_path = dir.join("journal");
        let io = |e| StoreError::io(&journal_path, e);
        if fresh {
            // The journal first: a store never lacks the one it records.
            Journal::create(&journal_path).map_err(io)?;
            create_db(dir)?;
        }
        let wal_path = dir.join("meta.db-wal");
        match crate::wal::check(&wal_path) {
            Ok(Ok(())) => {}
            Ok(Err(damage)) => {
                return Err(StoreError::Corrupt {
                    path: dir.to_path_buf(),
                    detail: damage.to_string(),
                })
            }
            Err(e) => return Err(StoreError::io(&wal_path, e)),
        }
        let conn = Connection::open(&db_path).map_err(|e| StoreError::db(&db_path, e))?;
        let bad = |e| StoreError::db(&db_path, e);
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(bad)?;
        // One connection, one process (the store lock guarantees it): an
        // exclusive lock spares the fcntl calls of every transaction and
        // keeps the WAL index in memory. It must precede the first read.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(bad)?;
        let version = check_store(&conn, &db_path)?;
        if version < 4 {
            // Before the store records a journal, so it never lacks one.
            Journal::create(&journal_path).map_err(io)?;
        }
        migrate(&conn, version).map_err(bad)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(bad)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(bad)?;
        // Checkpoint every ~16 MiB of WAL rather than 4 MiB: fewer fsyncs
        // under a create storm, still a short replay after a crash.
        conn.pragma_update(None, "wal_autocheckpoint", 4096)
            .map_err(bad)?;
        // A checkpoint restarts the WAL from its start but keeps the file;
        // this bounds what a burst leaves behind on disk.
        conn.pragma_update(None, "journal_size_limit", 32 << 20)
            .map_err(bad)?;
        // Each write runs under a savepoint inside the open batch (see
        // `Db::begin`), and SQLite keeps the savepoint's page images in a
        // statement journal that spills to a temporary file past 64 KiB:
        // one `pwrite` per page an unlink touches. It only ever serves a
        // rollback of this process, so memory is the right place for it.
        conn.pragma_update(None, "temp_store", "MEMORY")
            .map_err(bad)?;
        let host: i64 = conn
            .query_row("SELECT value FROM meta WHERE key='host'", [], |r| r.get(0))
            .map_err(bad)?;
        let journal = match Journal::open(&journal_path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::Corrupt {
                    path: dir.to_path_buf(),
                    detail: "its journal is missing".into(),
                })
            }
            opened => opened.map_err(io)?,
        };
        let syncer = journal.syncer().map_err(io)?;
        let store = Store {
            db: Mutex::new(Db {
                conn,
                journal,
                dir: dir.to_path_buf(),
                open: false,
                writes: 0,
                bytes: 0,
                lost: false,
                epoch_pending: false,
                xattr_owners: RefCell::default(),
            }),
            syncer,
            dir: dir.to_path_buf(),
            host: host as u32,
            _lock: lock,
            log_generation: (Mutex::default(), std::sync::Condvar::new()),
            room: Mutex::new(None),
        };
        // Room first: replay writes to the database.
        store.make_room();
        store.catch_up(&db_path, &journal_path)?;
        Ok(store)
    }

    /// Replays the journal into the store after a crash, then starts a
    /// new epoch, so nothing a crash left in the journal past its last good
    /// record is ever read again.
    fn catch_up(&self, db_path: &Path, journal_path: &Path) -> Result<(), StoreError> {
        let mut guard = self.lock();
        let db = &mut *guard;
        let replayed = journal::replay(&db.conn, &mut db.journal).map_err(|e| match e {
            journal::ReplayError::Io(e) => StoreError::io(journal_path, e),
            // The disk, not the journal: full, failing, read-only.
            journal::ReplayError::Db(e) if e.sqlite_error_code().is_some_and(is_io_error) => {
                StoreError::db(db_path, e)
            }
            e => StoreError::Corrupt {
                path: self.dir.clone(),
                detail: e.to_string(),
            },
        })?;
        if replayed > 0 {
            tracing::info!("replayed {replayed} journaled writes into the store");
        }
        if db.journal.holds_records() {
            db.new_epoch().map_err(|e| StoreError::db(db_path, e))?;
        }
        // After the replay, which may have inserted some.
        let owners = XattrOwners::load(&db.conn).map_err(|e| StoreError::db(db_path, e))?;
        db.xattr_owners = RefCell::new(owners);
        Ok(())
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This host's id, the first half of every global identity it creates.
    pub fn host(&self) -> u32 {
        self.host
    }

    /// Path of the data file of regular inode `ino`.
    pub fn data_path(&self, ino: Ino) -> PathBuf {
        crate::data::path_in(&self.dir.join("data"), ino)
    }

    /// Runs `f` as one atomic write: all its changes or none, durable
    /// against a crash of the daemon once this returns `Ok`.
    ///
    /// The write runs inside the open batch, under a savepoint that an
    /// error from `f`, a failed append or a panic rolls back ([`Undo`]); it
    /// is durable once its record is in the journal, and the batch commits
    /// every [`journal::BATCH_RECORDS`] writes (see [`crate::journal`]).
    pub fn write<T, E: From<rusqlite::Error>>(
        &self,
        f: impl FnOnce(&Tx<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut guard = self.lock();
        let db = &mut *guard;
        db.begin()?;
        let undo = Undo(&db.conn);
        let before = db.conn.total_changes();
        let tx = Tx {
            txn: &db.conn,
            xattr_owners: &db.xattr_owners,
            host: self.host,
            logged: std::cell::Cell::new(false),
            at: now(),
            pulled: std::cell::Cell::new(false),
            record: Default::default(),
            changes: std::cell::Cell::new(0),
        };
        let out = f(&tx)?;
        let (logged, record, changes) = (tx.logged.get(), tx.record.take(), tx.changes.get());
        drop(tx);
        if db.conn.is_autocommit() {
            // SQLite rolled the batch back under `f`, which went on: what it
            // did is not in the batch. The next write replays the journal.
            return Err(batch_lost().into());
        }
        if db.conn.total_changes() - before != changes {
            // A change the journal would not replay: a bug, refused.
            return Err(store_error(
                rusqlite::ffi::SQLITE_MISUSE,
                "a store write changed rows outside its journal record",
            )
            .into());
        }
        if !record.is_empty() {
            db.journal.append(&record).map_err(|e| {
                tracing::error!("appending to {}: {e}", db.journal.path().display());
                let code = match e.raw_os_error() {
                    Some(libc::ENOSPC) => rusqlite::ffi::SQLITE_FULL,
                    _ => rusqlite::ffi::SQLITE_IOERR,
                };
                store_error(code, e.to_string())
            })?;
        }
        std::mem::forget(undo);
        // The write is journaled, so it happened: a savepoint left on the
        // stack only nests the next ones, and the batch commit takes all.
        if let Err(e) = exec_cached(&db.conn, "RELEASE write") {
            tracing::warn!("releasing a store write's savepoint: {e}");
        }
        if !record.is_empty() {
            db.writes += 1;
            db.bytes += record.len() as u64;
            if db.writes >= journal::BATCH_RECORDS
                || db.bytes >= journal::BATCH_BYTES
                || db.journal.full()
            {
                self.commit_batch(db);
            }
        }
        if logged {
            let mut log = self
                .log_generation
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            log.generation += 1;
            // Condvar::notify_all always makes a system call; most commits
            // have no one waiting (no backend attached, or the shipper busy).
            if log.waiters > 0 {
                self.log_generation.1.notify_all();
            }
        }
        Ok(out)
    }

    /// Runs `f` on a read view: the writer's connection, so it sees every
    /// write that returned, committed in a batch or only journaled.
    pub fn read<T>(&self, f: impl FnOnce(&Reader<'_>) -> T) -> T {
        let mut db = self.lock();
        if let Err(e) = db.heal() {
            tracing::error!("the store is behind its journal: {e}");
        }
        f(&Reader {
            conn: &db.conn,
            xattr_owners: &db.xattr_owners,
        })
    }

    /// Commits the open batch; a failure is logged, not returned, because
    /// every write in it is already journaled: the batch stays open (or is
    /// replayed) and commits later.
    fn commit_batch(&self, db: &mut Db) {
        if let Err(e) = db.commit(false) {
            tracing::warn!("committing the store's batch: {e}");
        }
    }

    /// Waits up to `timeout` for a commit that appends to the log after
    /// generation `seen`; returns the current generation.
    pub fn wait_for_log(&self, seen: u64, timeout: std::time::Duration) -> u64 {
        let (lock, cond) = &self.log_generation;
        let mut log = lock.lock().unwrap_or_else(|p| p.into_inner());
        log.waiters += 1;
        let (mut log, _) = cond
            .wait_timeout_while(log, timeout, |l| l.generation == seen)
            .unwrap_or_else(|p| p.into_inner());
        log.waiters -= 1;
        log.generation
    }

    /// Wakes every [`Store::wait_for_log`] caller (used to stop them).
    pub fn wake_log_waiters(&self) {
        let (lock, cond) = &self.log_generation;
        lock.lock().unwrap_or_else(|p| p.into_inner()).generation += 1;
        cond.notify_all();
    }

    /// Makes every write that returned durable against power loss.
    pub fn sync(&self) -> io::Result<()> {
        self.syncer.sync()
    }

    /// Moves everything in the WAL into the database and empties the WAL:
    /// what a clean unmount (and closing the store) does, so a store at rest
    /// is one file with nothing left to replay.
    pub fn checkpoint(&self) {
        let mut db = self.lock();
        self.commit_batch(&mut db);
        if let Err(e) = db
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        {
            tracing::warn!("checkpointing the store: {e}");
        }
    }

    /// Keeps the reserve right for the space left on the store's file
    /// system: given up when less than it is free, so the operation about to
    /// run (an unlink, a truncate: one that frees space) can commit its
    /// transaction; taken back once there is room for it twice over. Every
    /// operation that frees space calls it first, so it is kept cheap: while
    /// the last look found [`PLENTY_BYTES`] free less than [`ROOM_RECHECK`]
    /// ago, it does not look again (filling that much in that time would
    /// take writes at over 10 GB/s).
    pub fn make_room(&self) {
        let mut last = self.room.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|(at, free)| free >= PLENTY_BYTES && at.elapsed() < ROOM_RECHECK) {
            return;
        }
        let path = self.dir.join("reserve");
        let Ok(fs) = nix::sys::statvfs::statvfs(&self.dir) else {
            *last = None;
            return;
        };
        let free = fs.blocks_available() * fs.fragment_size();
        *last = Some((std::time::Instant::now(), free));
        let held = std::fs::metadata(&path).map_or(0, |m| m.len());
        if held > 0 && free < RESERVE_BYTES {
            tracing::warn!("the store's file system is full; releasing its reserve");
            let _ = std::fs::remove_file(&path);
        } else if held == 0 && free > 2 * RESERVE_BYTES {
            let made = File::create(&path).and_then(|f| {
                nix::fcntl::posix_fallocate(&f, 0, RESERVE_BYTES as i64).map_err(io::Error::from)
            });
            if made.is_err() {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Whether the last look of [`Store::make_room`] found less than
    /// [`PLENTY_BYTES`] free (or could not look).
    pub fn short_of_room(&self) -> bool {
        let last = self.room.lock().unwrap_or_else(|p| p.into_inner());
        last.is_none_or(|(_, free)| free < PLENTY_BYTES)
    }

    fn lock(&self) -> MutexGuard<'_, Db> {
        // A panic while holding the lock leaves no half write behind (it
        // rolls back to its savepoint on drop), so the poisoned store is
        // still sound.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.checkpoint();
    }
}

/// Whether `dir` holds nothing but what ferry itself puts in a store
/// before its database exists (the lock, the log, empty data directories).
fn holds_only_ferry_files(dir: &Path) -> Result<bool, StoreError> {
    for entry in std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
        let entry = entry.map_err(|e| StoreError::io(dir, e))?;
        let name = entry.file_name();
        let ours = match name.to_str() {
            Some("lock" | "ferry.log" | "reserve" | "journal") => true,
            // What a crash while creating the store can leave.
            Some(name) if name.starts_with(NEW_DB) => true,
            Some("data" | "spare") => std::fs::read_dir(entry.path())
                .map(|mut d| d.next().is_none())
                .unwrap_or(false),
            _ => false,
        };
        if !ours {
            return Ok(false);
        }
    }
    Ok(true)
}

fn lock_store(dir: &Path) -> Result<nix::fcntl::Flock<File>, StoreError> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| StoreError::io(&path, e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        if e == nix::errno::Errno::EWOULDBLOCK {
            StoreError::Locked(dir.to_path_buf())
        } else {
            StoreError::io(&path, e.into())
        }
    })
}

/// Makes `dir/meta.db`, a fresh store, whole under another name and then
/// renamed into place: a daemon killed while it creates a store leaves no
/// half-made database that the next start would refuse, only a leftover
/// the next creation replaces.
fn create_db(dir: &Path) -> Result<(), StoreError> {
    let new = dir.join(NEW_DB);
    let io = |e| StoreError::io(&new, e);
    for leftover in [new.clone(), dir.join(format!("{NEW_DB}-journal"))] {
        match std::fs::remove_file(&leftover) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
    }
    let conn = Connection::open(&new).map_err(|e| StoreError::db(&new, e))?;
    init_schema(&conn).map_err(|e| StoreError::db(&new, e))?;
    conn.close().map_err(|(_, e)| StoreError::db(&new, e))?;
    File::open(&new).and_then(|f| f.sync_all()).map_err(io)?;
    std::fs::rename(&new, dir.join("meta.db")).map_err(io)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// What [`create_db`] builds a store in.
const NEW_DB: &str = "meta.db.new";

fn init_schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "application_id", APPLICATION_ID)?;
    conn.execute_batch(&format!(
        "BEGIN; {SCHEMA} {VERSION_4} {VERSION_5} {VERSION_6} PRAGMA user_version={FORMAT_VERSION};"
    ))?;
    let host = random_host_id()?;
    let t = now();
    conn.execute(
        "INSERT INTO meta(key, value) VALUES ('format', 'ferry-store'), ('host', ?1), ('created', ?2)",
        params![host, t],
    )?;
    conn.execute(
        "INSERT INTO inode(ino, host, counter, mode, uid, gid, nlink, size, atime, mtime, ctime, crtime, rdev, version)
         VALUES (?1, 0, ?1, ?2, ?3, ?4, 2, 0, ?5, ?5, ?5, ?5, 0, 1)",
        params![
            ROOT_INO,
            libc::S_IFDIR | 0o755,
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
            t
        ],
    )?;
    conn.execute_batch("COMMIT;")
}

/// Checks an existing store and returns its format version.
fn check_store(conn: &Connection, path: &Path) -> Result<i32, StoreError> {
    let bad = |e| StoreError::db(path, e);
    let app: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(bad)?;
    if app != APPLICATION_ID {
        return Err(StoreError::Foreign(path.to_path_buf()));
    }
    let version: i32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(bad)?;
    if !(1..=FORMAT_VERSION).contains(&version) {
        return Err(StoreError::Version {
            path: path.to_path_buf(),
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    let verdict: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(bad)?;
    if verdict != "ok" {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: verdict,
        });
    }
    Ok(version)
}

/// Brings a checked store of format `version` to [`FORMAT_VERSION`], in
/// one transaction.
fn migrate(conn: &Connection, version: i32) -> rusqlite::Result<()> {
    if version < FORMAT_VERSION {
        let steps = MIGRATIONS[version as usize - 1..].join("\n");
        conn.execute_batch(&format!(
            "BEGIN; {steps} PRAGMA user_version={FORMAT_VERSION}; COMMIT;"
        ))?;
    }
    Ok(())
}

/// A host id that is unique with overwhelming probability: 32 random bits
/// from the kernel. Zero is reserved for the root, which every host shares.
fn random_host_id() -> rusqlite::Result<u32> {
    use std::io::Read;
    let mut buf = [0u8; 4];
    for _ in 0..16 {
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut buf))
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        let id = u32::from_ne_bytes(buf);
        if id != 0 {
            return Ok(id);
        }
    }
    Err(rusqlite::Error::InvalidQuery)
}

const INODE_COLUMNS: &str =
    "ino, host, counter, mode, uid, gid, nlink, size, atime, mtime, ctime, crtime, rdev, version, cached";

/// The statements of the hottest reads (every lookup, getattr and
/// readdir), built once: formatting them at each call was 3.6% of the
/// daemon's CPU per create.
static INODE_BY_INO: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {INODE_COLUMNS} FROM inode WHERE ino=?1"));
static INODE_BY_NAME: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM dentry d JOIN inode i ON i.ino=d.ino WHERE d.parent=?1 AND d.name=?2",
        prefixed("i.")
    )
});
static ENTRIES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT d.id, d.name, {} FROM dentry d JOIN inode i ON i.ino=d.ino
         WHERE d.parent=?1 AND d.id>?2 ORDER BY d.id LIMIT ?3",
        prefixed("i.")
    )
});

fn inode_from_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Inode> {
    Ok(Inode {
        ino: r.get(at)?,
        host: r.get::<_, i64>(at + 1)? as u32,
        counter: r.get::<_, i64>(at + 2)? as u64,
        mode: r.get(at + 3)?,
        uid: r.get(at + 4)?,
        gid: r.get(at + 5)?,
        nlink: r.get(at + 6)?,
        size: r.get::<_, i64>(at + 7)? as u64,
        atime: r.get(at + 8)?,
        mtime: r.get(at + 9)?,
        ctime: r.get(at + 10)?,
        crtime: r.get(at + 11)?,
        rdev: r.get(at + 12)?,
        version: r.get::<_, i64>(at + 13)? as u64,
        cached: r.get(at + 14)?,
    })
}

/// Read-only queries, shared by [`Reader`] and [`Tx`].
pub trait Queries {
    /// The connection the queries run on.
    fn conn(&self) -> &Connection;

    /// Which inodes may have xattrs.
    fn xattr_owners(&self) -> &RefCell<XattrOwners>;

    /// The inode `ino`, if it exists.
    fn inode(&self, ino: Ino) -> rusqlite::Result<Option<Inode>> {
        self.conn()
            .prepare_cached(&INODE_BY_INO)?
            .query_row([ino], |r| inode_from_row(r, 0))
            .optional()
    }

    /// The inode named `name` in directory `parent`.
    fn lookup(&self, parent: Ino, name: &[u8]) -> rusqlite::Result<Option<Inode>> {
        self.conn()
            .prepare_cached(&INODE_BY_NAME)?
            .query_row(params![parent, name], |r| inode_from_row(r, 0))
            .optional()
    }

    /// Up to `limit` entries of `dir` with a cookie above `after`, in cookie order.
    fn entries(&self, dir: Ino, after: u64, limit: usize) -> rusqlite::Result<Vec<Entry>> {
        let mut stmt = self.conn().prepare_cached(&ENTRIES)?;
        let rows = stmt.query_map(params![dir, after as i64, limit as i64], |r| {
            Ok(Entry {
                cookie: r.get::<_, i64>(0)? as u64,
                name: r.get(1)?,
                inode: inode_from_row(r, 2)?,
            })
        })?;
        rows.collect()
    }

    /// Whether directory `dir` has any entry.
    fn has_entries(&self, dir: Ino) -> rusqlite::Result<bool> {
        self.conn()
            .prepare_cached("SELECT 1 FROM dentry WHERE parent=?1 LIMIT 1")?
            .exists([dir])
    }

    /// The parent directory of directory `dir` (directories have one name).
    fn parent_of(&self, dir: Ino) -> rusqlite::Result<Option<Ino>> {
        self.conn()
            .prepare_cached("SELECT parent FROM dentry WHERE ino=?1 LIMIT 1")?
            .query_row([dir], |r| r.get(0))
            .optional()
    }

    /// Whether directory `dir` is `at` or one of its ancestors: naming
    /// `dir` inside `at` would make a cycle cut off from the root. Bounded:
    /// a walk still going after a million steps answers yes, the answer
    /// that refuses the move.
    fn encloses(&self, dir: Ino, mut at: Ino) -> rusqlite::Result<bool> {
        for _ in 0..1 << 20 {
            if at == dir {
                return Ok(true);
            }
            match self.parent_of(at)? {
                Some(p) => at = p,
                None => return Ok(false), // the root, or a nameless directory
            }
        }
        Ok(true)
    }

    /// Every name of `ino`: (directory, name) pairs.
    fn names_of(&self, ino: Ino) -> rusqlite::Result<Vec<(Ino, Vec<u8>)>> {
        let mut stmt = self
            .conn()
            .prepare_cached("SELECT parent, name FROM dentry WHERE ino=?1")?;
        let rows = stmt.query_map([ino], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    /// A symlink's target.
    fn symlink_target(&self, ino: Ino) -> rusqlite::Result<Option<Vec<u8>>> {
        self.conn()
            .prepare_cached("SELECT target FROM inode WHERE ino=?1")?
            .query_row([ino], |r| r.get(0))
            .optional()
            .map(Option::flatten)
    }

    /// The value of xattr `name` of `ino`.
    fn xattr(&self, ino: Ino, name: &[u8]) -> rusqlite::Result<Option<Vec<u8>>> {
        if !self.xattr_owners().borrow().may_have(ino) {
            return Ok(None);
        }
        self.conn()
            .prepare_cached("SELECT value FROM xattr WHERE ino=?1 AND name=?2")?
            .query_row(params![ino, name], |r| r.get(0))
            .optional()
    }

    /// The xattr names of `ino`, in a stable order.
    fn xattr_names(&self, ino: Ino) -> rusqlite::Result<Vec<Vec<u8>>> {
        if !self.xattr_owners().borrow().may_have(ino) {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .conn()
            .prepare_cached("SELECT name FROM xattr WHERE ino=?1 ORDER BY name")?;
        let names = stmt.query_map([ino], |r| r.get(0))?;
        names.collect()
    }

    /// Number of inodes and the sum of directory/symlink sizes, for statfs.
    fn inode_count(&self) -> rusqlite::Result<u64> {
        self.conn()
            .query_row("SELECT count(*) FROM inode", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
    }

    /// The local inode of global identity `host:counter`.
    fn ino_of(&self, host: u32, counter: u64) -> rusqlite::Result<Option<Ino>> {
        self.conn()
            .prepare_cached("SELECT ino FROM inode WHERE host=?1 AND counter=?2")?
            .query_row(params![host, counter as i64], |r| r.get(0))
            .optional()
    }

    /// The global identity of `ino` as its last log record names it: the
    /// way to name an inode whose row is already gone.
    fn logged_identity(&self, ino: Ino) -> rusqlite::Result<Option<(u32, u64)>> {
        self.conn()
            .prepare_cached("SELECT host, counter FROM log WHERE ino=?1 ORDER BY seq DESC LIMIT 1")?
            .query_row([ino], |r| {
                Ok((r.get::<_, i64>(0)? as u32, r.get::<_, i64>(1)? as u64))
            })
            .optional()
    }

    /// Up to `limit` log records after `seq`, in order.
    fn log_after(&self, seq: Seq, limit: usize) -> rusqlite::Result<Vec<LogRecord>> {
        let mut stmt = self.conn().prepare_cached(
            "SELECT seq, op, ino, parent, name, parent2, name2, at, host, counter, pulled FROM log
             WHERE seq>?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![seq, limit as i64], |r| {
            Ok(LogRecord {
                seq: r.get(0)?,
                op: r.get(1)?,
                ino: r.get(2)?,
                parent: r.get(3)?,
                name: r.get(4)?,
                parent2: r.get(5)?,
                name2: r.get(6)?,
                at: r.get(7)?,
                host: r.get::<_, i64>(8)? as u32,
                counter: r.get::<_, i64>(9)? as u64,
                pulled: r.get(10)?,
            })
        })?;
        rows.collect()
    }

    /// The newest log sequence number (0 for an empty log).
    fn log_head(&self) -> rusqlite::Result<Seq> {
        self.conn()
            .query_row("SELECT coalesce(max(seq), 0) FROM log", [], |r| r.get(0))
    }

    /// An integer from the `meta` table.
    fn meta_int(&self, key: &str) -> rusqlite::Result<Option<i64>> {
        self.conn()
            .prepare_cached("SELECT value FROM meta WHERE key=?1")?
            .query_row([key], |r| r.get(0))
            .optional()
    }

    /// The largest number AUTOINCREMENT ever handed out in `table` (`inode`
    /// or `log`), deleted rows included: a store's high-water marks, which
    /// only a store rolled back in time (a backup, a VM snapshot) can lower.
    fn sequence(&self, table: &str) -> rusqlite::Result<u64> {
        self.conn()
            .prepare_cached("SELECT seq FROM sqlite_sequence WHERE name=?1")?
            .query_row([table], |r| r.get::<_, i64>(0))
            .optional()
            .map(|o| o.unwrap_or(0) as u64)
    }

    /// The spare data files the store lists (see [`VERSION_5`]).
    fn spares(&self) -> rusqlite::Result<Vec<Ino>> {
        let mut stmt = self.conn().prepare_cached("SELECT ino FROM spare")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect()
    }

    /// The reserved inode numbers (see [`VERSION_6`]).
    fn reserved(&self) -> rusqlite::Result<Vec<Ino>> {
        let mut stmt = self.conn().prepare_cached("SELECT ino FROM reserved")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect()
    }

    /// Files shipped while a writer had them open, not yet logged again
    /// (see [`VERSION_2`]).
    fn writing(&self) -> rusqlite::Result<Vec<Ino>> {
        let mut stmt = self.conn().prepare_cached("SELECT ino FROM writing")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect()
    }

    /// Backend keys of a batch that may have been committed at the backend
    /// without this store recording it (see [`VERSION_2`]), each with
    /// whether the batch deleted it.
    fn inflight(&self) -> rusqlite::Result<Vec<(Vec<u8>, bool)>> {
        let mut stmt = self
            .conn()
            .prepare_cached("SELECT key, deleting FROM inflight")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    /// A text value from the `meta` table.
    fn meta_text(&self, key: &str) -> rusqlite::Result<Option<String>> {
        self.conn()
            .prepare_cached("SELECT value FROM meta WHERE key=?1")?
            .query_row([key], |r| r.get(0))
            .optional()
    }

    /// The backend version a replicated object is at, if it was shipped.
    fn remote_version(&self, key: &[u8]) -> rusqlite::Result<Option<u64>> {
        self.conn()
            .prepare_cached("SELECT version FROM remote WHERE key=?1")?
            .query_row([key], |r| r.get::<_, i64>(0))
            .optional()
            .map(|o| o.map(|v| v as u64))
    }

    /// Whether an unresolved conflict holds the object back.
    fn in_conflict(&self, key: &[u8]) -> rusqlite::Result<bool> {
        self.conn()
            .prepare_cached("SELECT 1 FROM conflict WHERE key=?1")?
            .exists([key])
    }

    /// Backend keys down-sync must try again (see [`VERSION_3`]), at most
    /// `limit`.
    fn rechecks(&self, limit: usize) -> rusqlite::Result<Vec<Vec<u8>>> {
        let mut stmt = self
            .conn()
            .prepare_cached("SELECT key FROM recheck LIMIT ?1")?;
        let rows = stmt.query_map([limit as i64], |r| r.get(0))?;
        rows.collect()
    }

    /// The last `limit` resolved conflicts, oldest first: (when, path,
    /// how), and how many there are in all.
    fn resolved(&self, limit: usize) -> rusqlite::Result<(Vec<Resolved>, u64)> {
        let mut stmt = self.conn().prepare_cached(
            "SELECT at, path, how FROM (SELECT * FROM resolved ORDER BY id DESC LIMIT ?1)
             ORDER BY id",
        )?;
        let rows = stmt.query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        let list = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        let total = self
            .conn()
            .query_row("SELECT count(*) FROM resolved", [], |r| r.get::<_, i64>(0))?;
        Ok((list, total as u64))
    }

    /// The keys of the conflicts waiting to be resolved.
    fn conflict_keys(&self) -> rusqlite::Result<Vec<Vec<u8>>> {
        let mut stmt = self.conn().prepare_cached("SELECT key FROM conflict")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect()
    }

    /// The recorded conflicts: (object, detail, when).
    fn conflicts(&self) -> rusqlite::Result<Vec<(String, String, Nanos)>> {
        let mut stmt = self
            .conn()
            .prepare_cached("SELECT object, detail, at FROM conflict ORDER BY at")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect()
    }

    /// The chunk list of a file: (BLAKE3 hash, length) in order.
    /// A stored hash that is not 32 bytes is an error, not a short hash.
    fn chunks(&self, ino: Ino) -> rusqlite::Result<Vec<(ChunkHash, u32)>> {
        let mut stmt = self
            .conn()
            .prepare_cached("SELECT hash, len FROM chunk WHERE ino=?1 ORDER BY idx")?;
        let rows = stmt.query_map([ino], |r| Ok((ChunkHash(r.get(0)?), r.get(1)?)))?;
        rows.collect()
    }

    /// The inodes named by records after `seq` whose bytes may need shipping.
    fn pending_content(&self, seq: Seq) -> rusqlite::Result<Vec<Ino>> {
        let mut stmt = self.conn().prepare_cached(
            "SELECT DISTINCT ino FROM log
             WHERE seq>?1 AND NOT pulled AND op IN ('create', 'content', 'setattr')",
        )?;
        let rows = stmt.query_map([seq], |r| r.get(0))?;
        rows.collect()
    }

    /// Cached regular files that are clean: shipped (their chunk list is
    /// the backend's) and with no record after `seq`. Eviction candidates.
    fn clean_cached_files(&self, seq: Seq) -> rusqlite::Result<Vec<Ino>> {
        let mut stmt = self.conn().prepare_cached(&format!(
            "SELECT i.ino FROM inode i WHERE i.cached=1 AND i.mode & {} = {}
               AND EXISTS (SELECT 1 FROM chunk c WHERE c.ino = i.ino)
               AND NOT EXISTS (SELECT 1 FROM log l WHERE l.ino = i.ino AND l.seq > ?1
                               AND NOT l.pulled)",
            libc::S_IFMT,
            libc::S_IFREG
        ))?;
        let rows = stmt.query_map([seq], |r| r.get(0))?;
        rows.collect()
    }

    /// Regular files whose bytes only the backend has, up to `max_size`
    /// bytes each: `limit` of them after inode `after`, as (ino, size).
    fn uncached_files(
        &self,
        after: Ino,
        max_size: u64,
        limit: usize,
    ) -> rusqlite::Result<Vec<(Ino, u64)>> {
        let mut stmt = self.conn().prepare_cached(&format!(
            "SELECT ino, size FROM inode WHERE ino > ?1 AND cached = 0 AND size <= ?2
               AND mode & {} = {} ORDER BY ino LIMIT ?3",
            libc::S_IFMT,
            libc::S_IFREG
        ))?;
        let rows = stmt.query_map(
            params![after, max_size.min(i64::MAX as u64) as i64, limit as i64],
            |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)),
        )?;
        rows.collect()
    }

    /// How many such files there are, and their bytes.
    fn uncached_total(&self, max_size: u64) -> rusqlite::Result<(u64, u64)> {
        self.conn()
            .prepare_cached(&format!(
                "SELECT count(*), coalesce(sum(size), 0) FROM inode WHERE cached = 0
                   AND size <= ?1 AND mode & {} = {}",
                libc::S_IFMT,
                libc::S_IFREG
            ))?
            .query_row([max_size.min(i64::MAX as u64) as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
    }

    /// Up to `limit` uncached regular files of at most `max_size` bytes
    /// named in directory `dir`, in directory order.
    fn uncached_in(&self, dir: Ino, max_size: u64, limit: usize) -> rusqlite::Result<Vec<Ino>> {
        let mut stmt = self.conn().prepare_cached(&format!(
            "SELECT i.ino FROM dentry d JOIN inode i ON i.ino = d.ino
             WHERE d.parent = ?1 AND i.cached = 0 AND i.size <= ?2 AND i.mode & {} = {}
             ORDER BY d.id LIMIT ?3",
            libc::S_IFMT,
            libc::S_IFREG
        ))?;
        let rows = stmt.query_map(
            params![dir, max_size.min(i64::MAX as u64) as i64, limit as i64],
            |r| r.get(0),
        )?;
        rows.collect()
    }

    /// Count and oldest time of the records after `seq` that are this
    /// host's own changes (pulled ones have nothing to ship).
    fn pending(&self, seq: Seq) -> rusqlite::Result<(u64, Option<Nanos>)> {
        self.conn()
            .prepare_cached("SELECT count(*), min(at) FROM log WHERE seq>?1 AND NOT pulled")?
            .query_row([seq], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
    }
}

fn prefixed(prefix: &str) -> String {
    INODE_COLUMNS
        .split(", ")
        .map(|c| format!("{prefix}{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A read-only view of the store.
pub struct Reader<'a> {
    conn: &'a Connection,
    xattr_owners: &'a RefCell<XattrOwners>,
}

impl Queries for Reader<'_> {
    fn conn(&self) -> &Connection {
        self.conn
    }

    fn xattr_owners(&self) -> &RefCell<XattrOwners> {
        self.xattr_owners
    }
}

/// One write transaction. Every mutating method bumps the inode's version
/// and appends the matching [`Change`] to the log, in this transaction.
pub struct Tx<'a> {
    txn: &'a Connection,
    xattr_owners: &'a RefCell<XattrOwners>,
    host: u32,
    /// Whether this transaction appended to the log (so, once committed,
    /// the replicator has work).
    logged: std::cell::Cell<bool>,
    /// When it began: the time of every record it logs, which is how a
    /// reader of the log tells where a transaction's records end.
    at: Nanos,
    /// Whether the records it logs are pulled from the backend (see
    /// [`VERSION_3`]); set by [`Tx::pulling`].
    pulled: std::cell::Cell<bool>,
    /// Its statements so far, for the journal.
    record: std::cell::RefCell<Record>,
    /// Rows they changed, which must be every row the transaction changed.
    changes: std::cell::Cell<u64>,
}

impl Queries for Tx<'_> {
    fn conn(&self) -> &Connection {
        self.txn
    }

    fn xattr_owners(&self) -> &RefCell<XattrOwners> {
        self.xattr_owners
    }
}

/// What a new inode starts as.
pub struct NewInode<'a> {
    /// Full mode, type included.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Device number (device nodes only).
    pub rdev: u32,
    /// Symlink target (symlinks only).
    pub target: Option<&'a [u8]>,
}

impl Tx<'_> {
    /// Runs one mutating statement and records it for the journal; returns
    /// the rows it changed. Every change goes through here: [`Store::write`]
    /// refuses a transaction that changed rows its record does not account
    /// for.
    fn exec(&self, sql: &str, params: &[&dyn ToSql]) -> rusqlite::Result<u64> {
        self.in_batch()?;
        let changes = journal::run(self.txn, sql, params)?;
        self.note(sql, params, changes)?;
        Ok(changes)
    }

    /// Refuses to run a statement once SQLite rolled the batch back (a full
    /// disk, an I/O error): it would commit on its own, outside the batch
    /// the journal replays into.
    fn in_batch(&self) -> rusqlite::Result<()> {
        if self.txn.is_autocommit() {
            return Err(batch_lost());
        }
        Ok(())
    }

    fn note(&self, sql: &str, params: &[&dyn ToSql], changes: u64) -> rusqlite::Result<()> {
        self.changes.set(self.changes.get() + changes);
        self.record.borrow_mut().push(sql, params, changes)
    }

    /// Creates an inode and links it as `parent/name`; logs `Create`. The
    /// inode gets the `reserved` number (unreserved here), or else the next
    /// one of the sequence.
    pub fn create(
        &self,
        parent: Ino,
        name: &[u8],
        new: &NewInode<'_>,
        reserved: Option<Ino>,
    ) -> rusqlite::Result<Inode> {
        let t = now();
        let is_dir = new.mode & libc::S_IFMT == libc::S_IFDIR;
        let nlink = if is_dir { 2 } else { 1 };
        let size = new.target.map_or(0, |t| t.len() as u64);
        // A host's counter is its local inode number: unique on this host,
        // never reused, and so known before the row exists, which spares an
        // UPDATE of the row and of its (host, counter) index.
        let ino = match reserved {
            Some(ino) => {
                if self.exec("DELETE FROM reserved WHERE ino=?1", params![ino])? != 1 {
                    return Err(rusqlite::Error::QueryReturnedNoRows);
                }
                ino
            }
            // The number AUTOINCREMENT would pick (it never goes below the
            // sequence, and this transaction holds the write lock).
            None => Ino(self.sequence("inode")? + 1),
        };
        // Born at the version its `Create` record carries: the row and the
        // record in two statements, where bumping a version 1 as every
        // other change does would take a third.
        let version = CREATED_VERSION;
        self.exec("INSERT INTO inode(ino, host, counter, mode, uid, gid, nlink, size, atime, mtime, ctime, crtime, rdev, target, version)
                 VALUES (?1, ?2, ?1, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?8, ?8, ?9, ?10, ?11)", params![
                ino,
                self.host,
                new.mode,
                new.uid,
                new.gid,
                nlink,
                size as i64,
                t,
                new.rdev,
                new.target,
                version
            ])?;
        self.insert_dentry(parent, name, ino)?;
        if is_dir {
            self.add_nlink(parent, 1)?;
        }
        self.touch_dir(parent, t)?;
        let change = Change::Create { ino, parent, name };
        self.append_log(&change, version, self.host.into(), ino.0 as i64)?;
        Ok(Inode {
            ino,
            host: self.host,
            counter: ino.0,
            mode: new.mode,
            uid: new.uid,
            gid: new.gid,
            nlink,
            size,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            rdev: new.rdev,
            version: version as u64,
            cached: true,
        })
    }

    /// Adds the name `parent/name` for the existing `ino`; logs `Link`.
    pub fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> rusqlite::Result<()> {
        let t = now();
        self.insert_dentry(parent, name, ino)?;
        self.exec(
            "UPDATE inode SET nlink=nlink+1, ctime=?2 WHERE ino=?1",
            params![ino, t],
        )?;
        self.touch_dir(parent, t)?;
        self.log(&Change::Link { ino, parent, name })
    }

    /// Removes the name `parent/name` of `victim` (as read in this
    /// transaction: its link count and version are taken from it); logs
    /// `Unlink`. Returns the victim's remaining link count (a directory's
    /// is 0).
    pub fn unlink(&self, parent: Ino, name: &[u8], victim: &Inode) -> rusqlite::Result<u32> {
        let t = now();
        self.exec(
            "DELETE FROM dentry WHERE parent=?1 AND name=?2",
            params![parent, name],
        )?;
        let nlink = if victim.kind() == Kind::Dir {
            self.add_nlink(parent, -1)?;
            0
        } else {
            victim.nlink.saturating_sub(1)
        };
        // The version bump rides on the row's own UPDATE: `victim` was read
        // in this transaction, so its version is the current one.
        let version = victim.version as i64 + 1;
        self.exec(
            "UPDATE inode SET nlink=?2, ctime=?3, version=?4 WHERE ino=?1",
            params![victim.ino, nlink, t, version],
        )?;
        self.touch_dir(parent, t)?;
        let change = Change::Unlink {
            ino: victim.ino,
            parent,
            name,
        };
        self.append_log(&change, version, victim.host.into(), victim.counter as i64)?;
        Ok(nlink)
    }

    /// Deletes inode `ino` and its xattrs for good (its last name and last
    /// open handle are gone); logs `Delete`.
    pub fn delete(&self, ino: Ino) -> rusqlite::Result<()> {
        // No version bump: the row goes; the record carries the version.
        let (version, host, counter) = self.next_version(ino)?;
        self.append_log(&Change::Delete { ino }, version, host, counter)?;
        self.clear_writing(ino)?;
        self.exec("DELETE FROM xattr WHERE ino=?1", params![ino])?;
        self.exec("DELETE FROM inode WHERE ino=?1", params![ino])?;
        Ok(())
    }

    /// Moves `parent/name` (inode `moved`) to `newparent/newname`, which the
    /// caller has already cleared; logs `Rename`.
    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        newparent: Ino,
        newname: &[u8],
        moved: &Inode,
    ) -> rusqlite::Result<()> {
        let t = now();
        self.exec(
            "DELETE FROM dentry WHERE parent=?1 AND name=?2",
            params![parent, name],
        )?;
        self.insert_dentry(newparent, newname, moved.ino)?;
        if moved.kind() == Kind::Dir && parent != newparent {
            self.add_nlink(parent, -1)?;
            self.add_nlink(newparent, 1)?;
        }
        self.touch_ctime(moved.ino, t)?;
        self.touch_dir(parent, t)?;
        self.touch_dir(newparent, t)?;
        self.log(&Change::Rename {
            ino: moved.ino,
            parent,
            name,
            newparent,
            newname,
        })
    }

    /// Swaps the inodes behind two names (RENAME_EXCHANGE); logs `Exchange`.
    pub fn exchange(
        &self,
        (parent, name, a): (Ino, &[u8], &Inode),
        (newparent, newname, b): (Ino, &[u8], &Inode),
    ) -> rusqlite::Result<()> {
        let t = now();
        let set = |p: Ino, n: &[u8], ino: Ino| -> rusqlite::Result<u64> {
            self.exec(
                "UPDATE dentry SET ino=?3 WHERE parent=?1 AND name=?2",
                params![p, n, ino],
            )
        };
        set(parent, name, b.ino)?;
        set(newparent, newname, a.ino)?;
        if parent != newparent {
            let dirs = |i: &Inode| i64::from(i.kind() == Kind::Dir);
            let delta = dirs(b) - dirs(a);
            self.add_nlink(parent, delta)?;
            self.add_nlink(newparent, -delta)?;
        }
        for ino in [a.ino, b.ino] {
            self.touch_ctime(ino, t)?;
        }
        self.touch_dir(parent, t)?;
        self.touch_dir(newparent, t)?;
        self.log(&Change::Exchange {
            ino: a.ino,
            parent,
            name,
            newparent,
            newname,
        })
    }

    /// Writes back the attributes of `inode` (mode, owner, size, times) and
    /// logs `SetAttr`. The caller computed the new values.
    pub fn set_attr(&self, inode: &Inode) -> rusqlite::Result<()> {
        self.exec("UPDATE inode SET mode=?2, uid=?3, gid=?4, size=?5, atime=?6, mtime=?7, ctime=?8 WHERE ino=?1", params![
                inode.ino,
                inode.mode,
                inode.uid,
                inode.gid,
                inode.size as i64,
                inode.atime,
                inode.mtime,
                inode.ctime
            ])?;
        self.log(&Change::SetAttr { ino: inode.ino })
    }

    /// Records that the contents of `ino` are about to change; logs `Content`.
    ///
    /// Called *before* the data file is written: if the daemon dies between
    /// the two, the log claims a change that did not happen, which is
    /// harmless (replication re-reads the file), whereas the other order
    /// could lose a change.
    pub fn content(&self, ino: Ino) -> rusqlite::Result<()> {
        self.touch_ctime(ino, now())?;
        self.log(&Change::Content { ino })
    }

    /// Sets xattr `name` of `ino`; logs `Xattr`.
    pub fn set_xattr(&self, ino: Ino, name: &[u8], value: &[u8]) -> rusqlite::Result<()> {
        self.xattr_owners.borrow_mut().add(ino);
        self.exec(
            "INSERT OR REPLACE INTO xattr(ino, name, value) VALUES (?1, ?2, ?3)",
            params![ino, name, value],
        )?;
        self.xattr_changed(ino)
    }

    /// Removes xattr `name` of `ino`; returns whether it existed. Logs `Xattr`.
    pub fn remove_xattr(&self, ino: Ino, name: &[u8]) -> rusqlite::Result<bool> {
        let n = self.exec(
            "DELETE FROM xattr WHERE ino=?1 AND name=?2",
            params![ino, name],
        )?;
        if n > 0 {
            self.xattr_changed(ino)?;
        }
        Ok(n > 0)
    }

    fn xattr_changed(&self, ino: Ino) -> rusqlite::Result<()> {
        self.touch_ctime(ino, now())?;
        self.log(&Change::Xattr { ino })
    }

    // ----- replication bookkeeping: never logged, it is not a change ------

    /// Sets an integer in the `meta` table.
    pub fn set_meta_int(&self, key: &str, value: i64) -> rusqlite::Result<()> {
        self.exec(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
        Ok(())
    }

    /// Sets a text value in the `meta` table.
    pub fn set_meta_text(&self, key: &str, value: &str) -> rusqlite::Result<()> {
        self.exec(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
        Ok(())
    }

    /// Replaces the keys of the batch in flight, each with whether the
    /// batch deletes it (none: the batch is recorded).
    pub fn set_inflight<'k>(
        &self,
        keys: impl IntoIterator<Item = (&'k [u8], bool)>,
    ) -> rusqlite::Result<()> {
        self.exec("DELETE FROM inflight", params![])?;
        for (key, deleting) in keys {
            self.exec(
                "INSERT OR REPLACE INTO inflight(key, deleting) VALUES (?1, ?2)",
                params![key, deleting],
            )?;
        }
        Ok(())
    }

    /// Remembers that `ino` was shipped while open for writing.
    pub fn mark_writing(&self, ino: Ino) -> rusqlite::Result<()> {
        self.exec(
            "INSERT OR IGNORE INTO writing(ino) VALUES (?1)",
            params![ino],
        )?;
        Ok(())
    }

    /// Lists the data file of the deleted inode `ino` as a spare.
    pub fn list_spare(&self, ino: Ino) -> rusqlite::Result<()> {
        self.exec("INSERT INTO spare(ino) VALUES (?1)", params![ino])?;
        Ok(())
    }

    /// The spare data file of `ino` became a reserved one, or it is gone.
    pub fn unlist_spare(&self, ino: Ino) -> rusqlite::Result<()> {
        self.exec("DELETE FROM spare WHERE ino=?1", params![ino])?;
        Ok(())
    }

    /// Takes the next `count` numbers of the inode sequence and reserves
    /// them (see [`VERSION_6`]).
    pub fn reserve(&self, count: u64) -> rusqlite::Result<Vec<Ino>> {
        let last = self.sequence("inode")?;
        // The root's insert made the sequence's row, in every store.
        if self.exec(
            "UPDATE sqlite_sequence SET seq=?1 WHERE name='inode'",
            params![(last + count) as i64],
        )? != 1
        {
            return Err(rusqlite::Error::QueryReturnedNoRows);
        }
        (last + 1..=last + count)
            .map(|n| {
                self.exec("INSERT INTO reserved(ino) VALUES (?1)", params![n as i64])?;
                Ok(Ino(n))
            })
            .collect()
    }

    /// Gives up the reservation of `ino` (its data file could not be made,
    /// or a crash took it); the number is never handed out.
    pub fn unreserve(&self, ino: Ino) -> rusqlite::Result<()> {
        self.exec("DELETE FROM reserved WHERE ino=?1", params![ino])?;
        Ok(())
    }

    /// `ino` is logged again (or gone): forget [`Tx::mark_writing`].
    pub fn clear_writing(&self, ino: Ino) -> rusqlite::Result<()> {
        self.exec("DELETE FROM writing WHERE ino=?1", params![ino])?;
        Ok(())
    }

    /// Records the backend version of a replicated object (`None`: it is
    /// gone from the backend).
    pub fn set_remote_version(&self, key: &[u8], version: Option<u64>) -> rusqlite::Result<()> {
        match version {
            Some(v) => self.exec(
                "INSERT OR REPLACE INTO remote(key, version) VALUES (?1, ?2)",
                params![key, v as i64],
            )?,
            None => self.exec("DELETE FROM remote WHERE key=?1", params![key])?,
        };
        Ok(())
    }

    /// Keeps a conflict; the object is not shipped again until it is settled.
    pub fn add_conflict(&self, key: &[u8], object: &str, detail: &str) -> rusqlite::Result<()> {
        self.exec(
            "INSERT OR REPLACE INTO conflict(key, at, object, detail) VALUES (?1, ?2, ?3, ?4)",
            params![key, now(), object, detail],
        )?;
        Ok(())
    }

    /// A conflict is settled: the object ships again.
    pub fn clear_conflict(&self, key: &[u8]) -> rusqlite::Result<()> {
        self.exec("DELETE FROM conflict WHERE key=?1", params![key])?;
        Ok(())
    }

    /// Records how a conflict on `path` was resolved, for `ferry status`.
    pub fn add_resolved(&self, path: &str, how: &str) -> rusqlite::Result<()> {
        self.exec(
            "INSERT INTO resolved(at, path, how) VALUES (?1, ?2, ?3)",
            params![now(), path, how],
        )?;
        Ok(())
    }

    /// Down-sync must fetch and try `key` again (see [`VERSION_3`]).
    pub fn add_recheck(&self, key: &[u8]) -> rusqlite::Result<()> {
        self.exec(
            "INSERT OR IGNORE INTO recheck(key) VALUES (?1)",
            params![key],
        )?;
        Ok(())
    }

    /// `key` applied (or needs nothing more).
    pub fn remove_recheck(&self, key: &[u8]) -> rusqlite::Result<()> {
        self.exec("DELETE FROM recheck WHERE key=?1", params![key])?;
        Ok(())
    }

    /// This store's host id.
    pub fn host(&self) -> u32 {
        self.host
    }

    /// From now on, the records this transaction logs are (`true`) or are
    /// not changes pulled from the backend (see [`VERSION_3`]); returns
    /// what they were, for the caller to restore.
    pub fn pulling(&self, pulled: bool) -> bool {
        self.pulled.replace(pulled)
    }

    /// Removes the name `parent/name` of `ino` as the backend did; logs
    /// `Unlink`. Times are the backend's and links are recounted by the
    /// caller ([`Tx::recount`]).
    pub fn drop_entry(&self, parent: Ino, name: &[u8], ino: Ino) -> rusqlite::Result<()> {
        self.exec(
            "DELETE FROM dentry WHERE parent=?1 AND name=?2",
            params![parent, name],
        )?;
        self.log(&Change::Unlink { ino, parent, name })
    }

    /// Sets the link count of `ino` from its entries: names for a
    /// non-directory, 2 plus subdirectories for a directory (whose single
    /// name is not counted, as everywhere in this store).
    pub fn recount(&self, ino: Ino) -> rusqlite::Result<()> {
        self.exec(
            &format!(
                "UPDATE inode SET nlink = CASE WHEN mode & {ifmt} = {ifdir}
                     THEN 2 + (SELECT count(*) FROM dentry d JOIN inode c ON c.ino = d.ino
                               WHERE d.parent = inode.ino AND c.mode & {ifmt} = {ifdir})
                     ELSE (SELECT count(*) FROM dentry d WHERE d.ino = inode.ino) END
                 WHERE ino = ?1",
                ifmt = libc::S_IFMT,
                ifdir = libc::S_IFDIR
            ),
            params![ino],
        )?;
        Ok(())
    }

    /// Gives `ino` a new global identity, one no host has ever used; logs
    /// `Revive`, so it ships with all its names (whose backend versions the
    /// caller clears). What conflict resolution
    /// does to this host's version of an object the backend resolved the
    /// other way (replaced, or deleted while it was changed here): that
    /// version lives on as a new object instead of being lost.
    pub fn reidentify(&self, ino: Ino) -> rusqlite::Result<(u32, u64)> {
        // A counter from the inode sequence: larger than every local inode
        // number so far, so no inode of this host ever had it, and it keeps
        // the store's high-water mark honest (see `crate::binding`).
        self.exec("INSERT INTO inode(host, counter, mode, uid, gid, nlink, size, atime, mtime, ctime, crtime, rdev, version)
                 VALUES (?1, -1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1)", params![self.host])?;
        let counter = self.txn.last_insert_rowid();
        self.exec("DELETE FROM inode WHERE ino=?1", params![counter])?;
        self.exec(
            "UPDATE inode SET host=?2, counter=?3 WHERE ino=?1",
            params![ino, self.host, counter],
        )?;
        self.relog(ino)?;
        Ok((self.host, counter as u64))
    }

    /// Logs `Revive` for `ino`: it and all its names ship again, whole (an
    /// object refused by the backend for its directory's sake, say, after
    /// that directory was settled).
    pub fn relog(&self, ino: Ino) -> rusqlite::Result<()> {
        self.log(&Change::Revive { ino })
    }

    /// Replaces the chunk list of a file.
    pub fn set_chunks(&self, ino: Ino, chunks: &[(ChunkHash, u32)]) -> rusqlite::Result<()> {
        self.exec("DELETE FROM chunk WHERE ino=?1", params![ino])?;
        for (idx, (hash, len)) in chunks.iter().enumerate() {
            self.exec(
                "INSERT INTO chunk(ino, idx, hash, len) VALUES (?1, ?2, ?3, ?4)",
                params![ino, idx as i64, &hash.0[..], len],
            )?;
        }
        Ok(())
    }

    /// Records that a file's bytes now live only at the backend: the row
    /// takes over the size and mtime its data file held. Not logged: the
    /// file did not change.
    pub fn set_evicted(&self, ino: Ino, size: u64, mtime: Nanos) -> rusqlite::Result<()> {
        self.exec(
            "UPDATE inode SET cached=0, size=?2, mtime=?3 WHERE ino=?1",
            params![ino, size as i64, mtime],
        )?;
        Ok(())
    }

    /// Marks whether a file's data file holds its bytes.
    pub fn set_cached(&self, ino: Ino, cached: bool) -> rusqlite::Result<()> {
        self.exec(
            "UPDATE inode SET cached=?2 WHERE ino=?1",
            params![ino, cached],
        )?;
        Ok(())
    }

    /// Inserts or overwrites an inode that came from the backend, keyed by
    /// its global identity; returns its local number. Regular files arrive
    /// uncached. Logged as `Import`, so the log still replays to the store.
    pub fn import_inode(&self, inode: &Inode, target: Option<&[u8]>) -> rusqlite::Result<Ino> {
        let existing = self.ino_of(inode.host, inode.counter)?;
        let ino = match existing {
            Some(ino) => ino,
            None => {
                self.exec("INSERT INTO inode(host, counter, mode, uid, gid, nlink, size, atime, mtime, ctime, crtime, rdev, version)
                         VALUES (?1, ?2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1)", params![inode.host, inode.counter as i64])?;
                Ino(self.txn.last_insert_rowid() as u64)
            }
        };
        self.exec(
            "UPDATE inode SET mode=?2, uid=?3, gid=?4, size=?5, atime=?6, mtime=?7, ctime=?8,
                 crtime=?8, rdev=?9, target=?10, cached=?11 WHERE ino=?1",
            params![
                ino,
                inode.mode,
                inode.uid,
                inode.gid,
                inode.size as i64,
                inode.atime,
                inode.mtime,
                inode.ctime,
                inode.rdev,
                target,
                inode.cached
            ],
        )?;
        self.log(&Change::Import { ino })?;
        Ok(ino)
    }

    /// Replaces the xattrs of an imported inode.
    pub fn import_xattrs(&self, ino: Ino, xattrs: &[(Vec<u8>, Vec<u8>)]) -> rusqlite::Result<()> {
        self.exec("DELETE FROM xattr WHERE ino=?1", params![ino])?;
        if !xattrs.is_empty() {
            self.xattr_owners.borrow_mut().add(ino);
        }
        for (name, value) in xattrs {
            self.exec(
                "INSERT INTO xattr(ino, name, value) VALUES (?1, ?2, ?3)",
                params![ino, name, value],
            )?;
        }
        Ok(())
    }

    /// Inserts an entry that came from the backend, logged as `Link`.
    pub fn import_entry(&self, parent: Ino, name: &[u8], ino: Ino) -> rusqlite::Result<()> {
        self.insert_dentry(parent, name, ino)?;
        self.log(&Change::Link { ino, parent, name })
    }

    /// Recomputes every link count from the entries, after an import.
    pub fn recount_links(&self) -> rusqlite::Result<()> {
        self.exec(
            &format!(
                "UPDATE inode SET nlink = (SELECT count(*) FROM dentry d WHERE d.ino = inode.ino)
                     WHERE mode & {ifmt} != {ifdir}",
                ifmt = libc::S_IFMT,
                ifdir = libc::S_IFDIR
            ),
            params![],
        )?;
        self.exec(
            &format!(
                "UPDATE inode SET nlink = 2 + (SELECT count(*) FROM dentry d JOIN inode c ON c.ino = d.ino
                     WHERE d.parent = inode.ino AND c.mode & {ifmt} = {ifdir})
                     WHERE mode & {ifmt} = {ifdir}",
                ifmt = libc::S_IFMT,
                ifdir = libc::S_IFDIR
            ),
            params![],
        )?;
        Ok(())
    }

    fn insert_dentry(&self, parent: Ino, name: &[u8], ino: Ino) -> rusqlite::Result<()> {
        self.exec(
            "INSERT INTO dentry(parent, name, ino) VALUES (?1, ?2, ?3)",
            params![parent, name, ino],
        )?;
        Ok(())
    }

    fn add_nlink(&self, dir: Ino, delta: i64) -> rusqlite::Result<()> {
        if delta != 0 {
            self.exec(
                "UPDATE inode SET nlink=nlink+?2 WHERE ino=?1",
                params![dir, delta],
            )?;
        }
        Ok(())
    }

    /// Sets the ctime of `ino`: its status changed at `t`.
    fn touch_ctime(&self, ino: Ino, t: Nanos) -> rusqlite::Result<()> {
        self.exec("UPDATE inode SET ctime=?2 WHERE ino=?1", params![ino, t])?;
        Ok(())
    }

    /// A directory's mtime and ctime change with its entries. The directory
    /// itself is not versioned for this: its entries are logged on their own.
    fn touch_dir(&self, dir: Ino, t: Nanos) -> rusqlite::Result<()> {
        self.exec(
            "UPDATE inode SET mtime=?2, ctime=?2 WHERE ino=?1",
            params![dir, t],
        )?;
        Ok(())
    }

    /// Bumps the version of the change's inode and appends the record.
    fn log(&self, change: &Change<'_>) -> rusqlite::Result<()> {
        let (version, host, counter) = self.next_version(change.ino())?;
        self.exec(
            "UPDATE inode SET version=?2 WHERE ino=?1",
            params![change.ino(), version],
        )?;
        self.append_log(change, version, host, counter)
    }

    /// The version the next change of `ino` gets, and its identity (host,
    /// counter). A read apart from the UPDATE, not `UPDATE … RETURNING`:
    /// SQLite builds a temporary table for every RETURNING, which cost more
    /// than the rest of an unlink's statements together.
    fn next_version(&self, ino: Ino) -> rusqlite::Result<(i64, i64, i64)> {
        self.txn
            .prepare_cached("SELECT version + 1, host, counter FROM inode WHERE ino=?1")?
            .query_row([ino], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
    }

    /// Appends the log record of `change` for its inode at `version`,
    /// whose identity is (`host`, `counter`).
    fn append_log(
        &self,
        change: &Change<'_>,
        version: i64,
        host: i64,
        counter: i64,
    ) -> rusqlite::Result<()> {
        let ino = change.ino();
        let (parent, name, parent2, name2) = change.places();
        self.exec("INSERT INTO log(op, ino, host, counter, version, parent, name, parent2, name2, at, pulled)
                 VALUES (?1, ?2, ?9, ?10, ?3, ?4, ?5, ?6, ?7, ?8, ?11)", params![
                change.op(),
                ino,
                version,
                parent,
                name,
                parent2,
                name2,
                self.at,
                host,
                counter,
                self.pulled.get()
            ])?;
        self.logged.set(true);
        Ok(())
    }
}
