//! `dir:PATH` — the embedded backend: no server, just a directory.
//!
//! Layout:
//! - `PATH/ferry.db` — SQLite (WAL) with the volume row, inodes, chunk lists,
//!   entries, the change feed and the host marks. The schema version is
//!   SQLite's `user_version`.
//! - `PATH/chunks/ab/cdef…` — one file per chunk, named by its BLAKE3 hex,
//!   written to a temp name, fsync'd and renamed, so a reader sees a whole
//!   chunk or none; every read is verified against the name.
//! - `PATH/feed-signal` — a one-byte file every commit that appends to the
//!   feed writes to *after* it committed. `wait_feed` watches it with
//!   inotify, so another process's commit wakes a waiter at once instead of
//!   at its next poll; the poll stays as the fallback (a network file
//!   system shows no other client's writes to inotify).
//!
//! Several processes (several local daemons) may open the same directory:
//! SQLite's normal file locking with a busy timeout serializes writers, and
//! `commit` runs in one `BEGIN IMMEDIATE` transaction, so it is atomic and
//! takes the write lock before its version checks (no lost updates) and
//! before the I3 rules look at the state.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};

use crate::integrity::{self, CommitTx, KeyRow, Step};
use crate::{
    check_schema, clamp, decode_feed_row, decode_xattrs, encode_xattrs, new_volume_id, now_ns,
    root_inode, stored, verify_stored, verify_upload, Backend, BackendError, Changes, ChunkHash,
    Entry, FeedChange, FeedItem, HostMark, InitPlan, InodeState, ObjectId, Op, Outcome,
    SnapshotItem, VolumeInfo, SCHEMA_VERSION,
};

/// Database file inside the volume directory.
const DB_FILE: &str = "ferry.db";
/// Chunk directory inside the volume directory.
const CHUNK_DIR: &str = "chunks";
/// The change signal inside the volume directory (see the module docs).
const SIGNAL_FILE: &str = "feed-signal";
/// How long a statement waits for another process's lock before the call
/// fails with a transient error.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval of `wait_feed` when the change signal cannot be watched
/// (no inotify instance to be had): a `SELECT max(seq)` is cheap.
const FEED_POLL: Duration = Duration::from_millis(20);
/// Poll interval of `wait_feed` while it watches the change signal: only a
/// fallback for commits the signal does not show (another client of a
/// network file system), so it can be rare.
const SIGNAL_FALLBACK_POLL: Duration = Duration::from_millis(500);

/// `MIGRATIONS[i]` upgrades schema version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE volume (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        name TEXT NOT NULL,
        volume_id TEXT NOT NULL,
        created_ns INTEGER NOT NULL
    );
    -- Deleted inodes stay as tombstones (deleted = 1) so versions never repeat.
    CREATE TABLE inodes (
        host INTEGER NOT NULL,
        counter INTEGER NOT NULL,
        version INTEGER NOT NULL,
        deleted INTEGER NOT NULL,
        mode INTEGER NOT NULL,
        uid INTEGER NOT NULL,
        gid INTEGER NOT NULL,
        rdev INTEGER NOT NULL,
        size INTEGER NOT NULL,
        atime_ns INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        ctime_ns INTEGER NOT NULL,
        target BLOB,
        xattrs BLOB NOT NULL,
        origin INTEGER NOT NULL,
        PRIMARY KEY (host, counter)
    );
    -- A table rather than a blob so chunk garbage collection can find
    -- unreferenced chunks with one query.
    CREATE TABLE inode_chunks (
        host INTEGER NOT NULL,
        counter INTEGER NOT NULL,
        idx INTEGER NOT NULL,
        hash BLOB NOT NULL,
        len INTEGER NOT NULL,
        PRIMARY KEY (host, counter, idx)
    );
    CREATE INDEX inode_chunks_hash ON inode_chunks (hash);
    CREATE TABLE entries (
        parent_host INTEGER NOT NULL,
        parent_counter INTEGER NOT NULL,
        name BLOB NOT NULL,
        child_host INTEGER NOT NULL,
        child_counter INTEGER NOT NULL,
        version INTEGER NOT NULL,
        deleted INTEGER NOT NULL,
        PRIMARY KEY (parent_host, parent_counter, name)
    );
    -- kind 0: inode (host, counter); kind 1: entry (parent host, counter, name).
    CREATE TABLE feed (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        origin INTEGER NOT NULL,
        kind INTEGER NOT NULL,
        host INTEGER NOT NULL,
        counter INTEGER NOT NULL,
        name BLOB
    );
",
    "
    -- What the backend knows of each host (HostMark).
    CREATE TABLE hosts (
        host INTEGER PRIMARY KEY,
        shipped_seq INTEGER NOT NULL
    );
    -- The names of an inode, for the I3 rules; live entries only.
    CREATE INDEX entries_child ON entries (child_host, child_counter) WHERE deleted = 0;
    -- Which host changed an entry last (Entry::origin).
    ALTER TABLE entries ADD COLUMN origin INTEGER NOT NULL DEFAULT 0;
",
    "
    -- The commit that appended the item, so `changes` never cuts one: the
    -- first seq the commit could take (above every seq before it), shared
    -- by all its items. Items from before version 3 have -seq: their
    -- commits are unknown, so each stands alone.
    ALTER TABLE feed ADD COLUMN txn INTEGER;
    UPDATE feed SET txn = -seq;
",
];
// One migration per schema version.
const _: () = assert!(MIGRATIONS.len() == SCHEMA_VERSION as usize);

/// The `dir:` backend. Holds a small pool of SQLite connections so readers
/// in different threads do not queue behind each other.
pub(crate) struct DirBackend {
    db: PathBuf,
    chunks: PathBuf,
    location: String,
    pool: Mutex<Vec<Connection>>,
    signal_path: PathBuf,
    /// The change signal, open for writing; `None` if it could not be
    /// opened (then waiters in other processes fall back to polling).
    signal: Option<File>,
    /// Inotify instances watching the change signal, kept for the next
    /// `wait_feed`: closing one costs the closing thread a kernel grace
    /// period (10–20 ms), which every wake-up would otherwise pay.
    watches: Mutex<Vec<Inotify>>,
}

impl std::fmt::Debug for DirBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirBackend")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// Creates (or migrates) the volume in `path`.
pub(crate) fn init(path: &Path, volume_name: &str) -> Result<VolumeInfo, BackendError> {
    let location = format!("dir:{}", path.display());
    let info = create(path, volume_name, &location).map_err(|e| locate(e, &location))?;
    tracing::info!(%location, volume = %info.name, "initialized dir backend");
    Ok(info)
}

/// The body of [`init`].
fn create(path: &Path, volume_name: &str, location: &str) -> Result<VolumeInfo, BackendError> {
    fs::create_dir_all(path.join(CHUNK_DIR))
        .map_err(|e| io_error(e, &format!("creating {}", path.display())))?;
    open_signal(&path.join(SIGNAL_FILE))
        .map_err(|e| io_error(e, &format!("creating {}", path.join(SIGNAL_FILE).display())))?;
    let mut conn = connect(&path.join(DB_FILE), OpenFlags::SQLITE_OPEN_CREATE)?;
    let sql = |e| map_sql(e, "init");
    // WAL is persistent in the file, so setting it once here covers every open.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sql)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql)?;
    let found: u32 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql)?;
    let plan = InitPlan::decide(found, location, || {
        read_info(&tx, found).map_or_else(|e| format!("<{e}>"), |i| i.name)
    })?;
    for migration in &MIGRATIONS[plan.first_migration()..] {
        tx.execute_batch(migration).map_err(sql)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(sql)?;
    if plan == InitPlan::Create {
        let now = now_ns();
        tx.execute(
            "INSERT INTO volume (id, name, volume_id, created_ns) VALUES (1, ?1, ?2, ?3)",
            params![volume_name, new_volume_id(volume_name), now],
        )
        .map_err(sql)?;
        let root = Op::PutInode {
            state: root_inode(now),
            base: None,
        };
        apply(&tx, 0, next_txn(&tx)?, &root, false)?;
    }
    let info = read_info(&tx, SCHEMA_VERSION)?;
    tx.commit().map_err(sql)?;
    Ok(info)
}

impl DirBackend {
    /// Opens an initialized volume directory.
    pub(crate) fn open(path: &Path) -> Result<DirBackend, BackendError> {
        let location = format!("dir:{}", path.display());
        let db = path.join(DB_FILE);
        if !db.exists() {
            return Err(BackendError::NotInitialized { location });
        }
        let conn = connect(&db, OpenFlags::empty()).map_err(|e| locate(e, &location))?;
        let found: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| map_sql(e, "reading schema version"))?;
        check_schema(found, &location)?;
        let signal_path = path.join(SIGNAL_FILE);
        let signal = open_signal(&signal_path)
            .inspect_err(|e| {
                tracing::warn!(%location, "cannot open the change signal: {e}; other processes poll")
            })
            .ok();
        Ok(DirBackend {
            db,
            chunks: path.join(CHUNK_DIR),
            location,
            pool: Mutex::new(vec![conn]),
            signal_path,
            signal,
            watches: Mutex::new(Vec::new()),
        })
    }

    /// Runs `f` on a pooled connection. A connection whose call failed is
    /// dropped rather than returned, in case it is in a bad state.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let pooled = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = match pooled {
            Some(conn) => conn,
            None => connect(&self.db, OpenFlags::empty()).map_err(|e| locate(e, &self.location))?,
        };
        let value = f(&mut conn).map_err(|e| locate(e, &self.location))?;
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
        Ok(value)
    }

    /// `chunks/ab/cdef…`: two-level fan-out keeps directories small.
    fn chunk_path(&self, hash: &ChunkHash) -> PathBuf {
        let hex = hash.to_hex();
        self.chunks.join(&hex[..2]).join(&hex[2..])
    }

    fn max_seq(&self) -> Result<u64, BackendError> {
        self.with_conn(|c| max_seq(c))
    }

    /// Tells waiters in any process that the feed grew. Only a hint (they
    /// re-read the feed), so a failure is logged, not returned: the commit
    /// has happened.
    fn signal_commit(&self) {
        if let Some(file) = &self.signal {
            if let Err(e) = file.write_at(&[1], 0) {
                tracing::debug!(location = %self.location, "writing the change signal: {e}");
            }
        }
    }

    /// An inotify instance watching the change signal for writes, with no
    /// event pending: taken before the caller's first feed check, so a
    /// commit after that check wakes it. A kept one (its old events
    /// drained) or a new one; `None` if none can be had (the caller polls).
    fn watch_signal(&self) -> Option<Inotify> {
        let kept = self.watches.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some(inotify) = kept {
            drain(&inotify);
            return Some(inotify);
        }
        let watch = || {
            let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)?;
            inotify.add_watch(
                &self.signal_path,
                AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_ATTRIB,
            )?;
            Ok::<_, nix::Error>(inotify)
        };
        watch()
            .inspect_err(
                |e| tracing::debug!(location = %self.location, "watching the change signal: {e}"),
            )
            .ok()
    }
}

/// Opens (creating it if needed) the change signal for writing.
fn open_signal(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// Blocks until the change signal was written or `nap` passed, then drains
/// the events (what they say does not matter: the caller re-reads the feed).
fn wait_signal(inotify: &Inotify, nap: Duration) {
    let ms = nap.as_micros().div_ceil(1000);
    let timeout =
        PollTimeout::try_from(ms.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
    let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
    // An error (EINTR) just ends this nap early; the caller loops.
    if nix::poll::poll(&mut fds, timeout).is_ok_and(|ready| ready > 0) {
        drain(inotify);
    }
}

/// Reads every pending event (the instance is non-blocking).
fn drain(inotify: &Inotify) {
    while inotify.read_events().is_ok_and(|events| !events.is_empty()) {}
}

impl Backend for DirBackend {
    fn info(&self) -> Result<VolumeInfo, BackendError> {
        self.with_conn(|c| read_info(c, SCHEMA_VERSION))
    }

    fn missing_chunks(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, BackendError> {
        Ok(hashes
            .iter()
            .filter(|h| !self.chunk_path(h).exists())
            .copied()
            .collect())
    }

    fn put_chunk(&self, hash: &ChunkHash, data: &[u8]) -> Result<(), BackendError> {
        verify_upload(hash, data)?;
        let path = self.chunk_path(hash);
        // Same name = same content, so an existing file of the right size is
        // this chunk (a wrong size means a damaged file: overwrite it).
        if fs::metadata(&path).is_ok_and(|m| m.len() == data.len() as u64) {
            return Ok(());
        }
        let dir = path.parent().expect("chunk path has a parent");
        let ctx = |what: &str| format!("{what} chunk {}", hash.to_hex());
        fs::create_dir_all(dir).map_err(|e| io_error(e, &ctx("creating directory for")))?;
        static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);
        let tmp = dir.join(format!(
            ".tmp-{}-{}-{}",
            hash.to_hex(),
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&tmp)?;
            file.write_all(data)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            // The rename is durable only once the directory is synced.
            File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_error(e, &ctx("writing"))
        })
    }

    fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, BackendError> {
        let data = fs::read(self.chunk_path(hash)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => BackendError::NotFound {
                what: format!("chunk {}", hash.to_hex()),
            },
            _ => io_error(e, &format!("reading chunk {}", hash.to_hex())),
        })?;
        verify_stored(hash, data)
    }

    fn commit(&self, origin: u32, ops: &[Op]) -> Result<Vec<Outcome>, BackendError> {
        let outcomes = self.with_conn(|c| {
            // IMMEDIATE takes the write lock before the version checks, so
            // two writers cannot both pass a check on the same version.
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| map_sql(e, "begin commit"))?;
            let txn = next_txn(&tx)?;
            let outcomes = run_ready(integrity::commit(
                &SqliteCommit {
                    tx: &tx,
                    origin,
                    txn,
                },
                ops,
            ))?;
            tx.commit().map_err(|e| map_sql(e, "commit"))?;
            Ok(outcomes)
        })?;
        if outcomes
            .iter()
            .any(|o| matches!(o, Outcome::Applied { .. }))
        {
            self.signal_commit();
        }
        Ok(outcomes)
    }

    fn inode(&self, id: &ObjectId) -> Result<Option<InodeState>, BackendError> {
        self.with_conn(|c| {
            // One read transaction, so the row and its chunk list come from
            // the same commit.
            let tx = c.transaction().map_err(|e| map_sql(e, "inode"))?;
            live_inode(&tx, id)
        })
    }

    fn entries(&self, parent: &ObjectId) -> Result<Vec<Entry>, BackendError> {
        self.with_conn(|c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM entries
                     WHERE parent_host = ?1 AND parent_counter = ?2 AND deleted = 0 ORDER BY name"
                ))
                .map_err(|e| map_sql(e, "entries"))?;
            let rows = stmt
                .query_map(params![parent.host, parent.counter as i64], read_entry)
                .map_err(|e| map_sql(e, &format!("entries of {parent}")))?;
            collect_rows(rows, &format!("entries of {parent}"))
        })
    }

    fn snapshot_each(
        &self,
        sink: &mut dyn FnMut(SnapshotItem) -> Result<(), BackendError>,
    ) -> Result<u64, BackendError> {
        self.with_conn(|c| {
            // One read transaction: WAL gives it a single consistent view.
            // Rows are stepped one at a time, so memory stays bounded.
            let tx = c.transaction().map_err(|e| map_sql(e, "snapshot"))?;
            let seq = max_seq(&tx)?;
            let sql = |e| map_sql(e, "snapshot inodes");
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT {INODE_COLUMNS} FROM inodes WHERE deleted = 0 ORDER BY host, counter"
                ))
                .map_err(sql)?;
            let mut rows = stmt.query([]).map_err(sql)?;
            while let Some(row) = rows.next().map_err(sql)? {
                let mut inode = read_inode(row).map_err(sql)??;
                inode.chunks = read_chunk_list(&tx, &inode.id)?;
                sink(SnapshotItem::Inode(inode))?;
            }
            let sql = |e| map_sql(e, "snapshot entries");
            let mut stmt = tx
                .prepare(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM entries WHERE deleted = 0
                     ORDER BY parent_host, parent_counter, name"
                ))
                .map_err(sql)?;
            let mut rows = stmt.query([]).map_err(sql)?;
            while let Some(row) = rows.next().map_err(sql)? {
                sink(SnapshotItem::Entry(read_entry(row).map_err(sql)??))?;
            }
            Ok(seq)
        })
    }

    fn feed(&self, after_seq: u64, limit: usize) -> Result<Vec<FeedItem>, BackendError> {
        self.with_conn(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT seq, origin, kind, host, counter, name FROM feed
                     WHERE seq > ?1 ORDER BY seq LIMIT ?2",
                )
                .map_err(|e| map_sql(e, "feed"))?;
            let rows = stmt
                .query_map(params![clamp(after_seq), clamp(limit as u64)], |r| {
                    Ok(decode_feed_row(
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })
                .map_err(|e| map_sql(e, "feed"))?;
            collect_rows(rows, "feed")
        })
    }

    fn changes(&self, after_seq: u64, limit: usize) -> Result<Changes, BackendError> {
        self.with_conn(|c| {
            // One read transaction: WAL gives it one consistent view, so the
            // items and the states come from the same commits.
            let tx = c.transaction().map_err(|e| map_sql(e, "changes"))?;
            let (items, more) = covered_items(&tx, after_seq, limit)?;
            let mut inode_ids = BTreeSet::new();
            let mut entry_keys = BTreeSet::new();
            for item in &items {
                match &item.change {
                    FeedChange::Inode(id) => inode_ids.insert(*id),
                    FeedChange::Entry { parent, name } => {
                        entry_keys.insert((*parent, name.clone()))
                    }
                };
            }
            let mut entries = Vec::with_capacity(entry_keys.len());
            for (parent, name) in entry_keys {
                let entry = live_entry(&tx, &parent, &name)?;
                if let Some(entry) = &entry {
                    inode_ids.insert(entry.child);
                }
                entries.push((parent, name, entry));
            }
            let inodes = inode_ids
                .into_iter()
                .map(|id| Ok((id, live_inode(&tx, &id)?)))
                .collect::<Result<_, BackendError>>()?;
            Ok(Changes {
                seq: items.last().map_or(after_seq, |i| i.seq),
                more,
                inodes,
                entries,
            })
        })
    }

    fn wait_feed(&self, after_seq: u64, timeout: Duration) -> Result<bool, BackendError> {
        let deadline = Instant::now() + timeout;
        let signal = self.watch_signal();
        let waited = (|| loop {
            if self.max_seq()? > after_seq {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            match &signal {
                Some(inotify) => wait_signal(inotify, SIGNAL_FALLBACK_POLL.min(deadline - now)),
                None => std::thread::sleep(FEED_POLL.min(deadline - now)),
            }
        })();
        if let Some(inotify) = signal {
            self.watches
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(inotify);
        }
        waited
    }

    fn host_mark(&self, host: u32) -> Result<HostMark, BackendError> {
        self.with_conn(|c| {
            let what = || format!("mark of host {host}");
            let (max_counter, shipped_seq): (i64, i64) = c
                .prepare_cached(
                    "SELECT (SELECT COALESCE(MAX(counter), 0) FROM inodes WHERE host = ?1),
                            (SELECT COALESCE(MAX(shipped_seq), 0) FROM hosts WHERE host = ?1)",
                )
                .and_then(|mut st| st.query_row([host], |r| Ok((r.get(0)?, r.get(1)?))))
                .map_err(|e| map_sql(e, &what()))?;
            Ok(HostMark {
                max_counter: max_counter as u64,
                shipped_seq: stored(shipped_seq, &what)?,
            })
        })
    }

    fn set_shipped(&self, host: u32, seq: u64) -> Result<(), BackendError> {
        self.with_conn(|c| {
            c.prepare_cached(
                "INSERT INTO hosts (host, shipped_seq) VALUES (?1, ?2)
                 ON CONFLICT (host) DO UPDATE SET shipped_seq = max(shipped_seq, excluded.shipped_seq)",
            )
            .and_then(|mut st| st.execute(params![host, clamp(seq)]))
            .map_err(|e| map_sql(e, &format!("set_shipped of host {host}")))?;
            Ok(())
        })
    }
}

/// A commit transaction, as the I3 rules see it. SQLite is synchronous, so
/// every future here is ready on its first poll ([`run_ready`]).
struct SqliteCommit<'a> {
    tx: &'a Transaction<'a>,
    origin: u32,
    /// The commit's id in the feed ([`next_txn`]).
    txn: i64,
}

impl CommitTx for SqliteCommit<'_> {
    async fn savepoint(&self) -> Result<(), BackendError> {
        self.tx
            .execute_batch("SAVEPOINT ferry_i3")
            .map_err(|e| map_sql(e, "commit savepoint"))
    }

    async fn rollback_to_savepoint(&self) -> Result<(), BackendError> {
        self.tx
            .execute_batch("ROLLBACK TO ferry_i3")
            .map_err(|e| map_sql(e, "commit rollback"))
    }

    async fn apply(&self, ops: &[Op], refused: &[bool]) -> Result<Vec<Step>, BackendError> {
        ops.iter()
            .zip(refused)
            .map(|(op, &refused)| apply(self.tx, self.origin, self.txn, op, refused))
            .collect()
    }

    async fn live_modes(&self, ids: &[ObjectId]) -> Result<HashMap<ObjectId, u32>, BackendError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT mode FROM inodes WHERE host = ?1 AND counter = ?2 AND deleted = 0",
            )
            .map_err(|e| map_sql(e, "commit: modes"))?;
        let mut modes = HashMap::new();
        for id in ids {
            let mode: Option<i64> = stmt
                .query_row(params![id.host, id.counter as i64], |r| r.get(0))
                .optional()
                .map_err(|e| map_sql(e, &format!("commit: mode of {id}")))?;
            if let Some(mode) = mode {
                modes.insert(*id, stored(mode, &|| format!("mode of inode {id}"))?);
            }
        }
        Ok(modes)
    }

    async fn name_parents(
        &self,
        ids: &[ObjectId],
    ) -> Result<HashMap<ObjectId, Vec<ObjectId>>, BackendError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT parent_host, parent_counter FROM entries
                 WHERE child_host = ?1 AND child_counter = ?2 AND deleted = 0 LIMIT 2",
            )
            .map_err(|e| map_sql(e, "commit: names"))?;
        let mut names = HashMap::new();
        for id in ids {
            let what = || format!("commit: names of {id}");
            let parents = stmt
                .query_map(params![id.host, id.counter as i64], |r| {
                    Ok(ObjectId {
                        host: r.get(0)?,
                        counter: r.get::<_, i64>(1)? as u64,
                    })
                })
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                .map_err(|e| map_sql(e, &what()))?;
            if !parents.is_empty() {
                names.insert(*id, parents);
            }
        }
        Ok(names)
    }

    async fn with_entries(&self, dirs: &[ObjectId]) -> Result<HashSet<ObjectId>, BackendError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM entries
                 WHERE parent_host = ?1 AND parent_counter = ?2 AND deleted = 0)",
            )
            .map_err(|e| map_sql(e, "commit: entries"))?;
        let mut nonempty = HashSet::new();
        for dir in dirs {
            let any: bool = stmt
                .query_row(params![dir.host, dir.counter as i64], |r| r.get(0))
                .map_err(|e| map_sql(e, &format!("commit: entries of {dir}")))?;
            if any {
                nonempty.insert(*dir);
            }
        }
        Ok(nonempty)
    }
}

/// Runs a future that cannot wait (one of [`SqliteCommit`]'s) to its end.
fn run_ready<T>(f: impl Future<Output = Result<T, BackendError>>) -> Result<T, BackendError> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(result) => result,
        std::task::Poll::Pending => Err(BackendError::other("commit: a SQLite step waited")),
    }
}

/// Opens a connection with the locking and durability settings every
/// connection needs (extra `flags`: CREATE for init only).
fn connect(db: &Path, flags: OpenFlags) -> Result<Connection, BackendError> {
    let flags = flags | OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(db, flags)
        .map_err(|e| map_sql(e, &format!("opening {}", db.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .and_then(|()| conn.pragma_update(None, "synchronous", "FULL"))
        .map_err(|e| map_sql(e, "configuring connection"))?;
    Ok(conn)
}

/// Reads the volume row (schema version from the caller, who read it already).
fn read_info(c: &Connection, schema_version: u32) -> Result<VolumeInfo, BackendError> {
    c.query_row(
        "SELECT name, volume_id, created_ns FROM volume WHERE id = 1",
        [],
        |r| {
            Ok(VolumeInfo {
                name: r.get(0)?,
                volume_id: r.get(1)?,
                schema_version,
                created_ns: r.get(2)?,
            })
        },
    )
    .map_err(|e| map_sql(e, "volume info"))
}

fn max_seq(c: &Connection) -> Result<u64, BackendError> {
    let seq: i64 = c
        .query_row("SELECT COALESCE(MAX(seq), 0) FROM feed", [], |r| r.get(0))
        .map_err(|e| map_sql(e, "feed position"))?;
    stored(seq, &|| "feed seq".into())
}

/// The id of a commit that starts now, under the write lock: above every
/// seq so far, so no earlier commit has it, and no later one (their ids
/// are above this commit's seqs).
fn next_txn(tx: &Transaction<'_>) -> Result<i64, BackendError> {
    tx.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM feed", [], |r| {
        r.get(0)
    })
    .map_err(|e| map_sql(e, "commit: feed position"))
}

/// The feed items [`Backend::changes`] covers: up to `limit` after
/// `after_seq`, then on to the end of the last one's commit (items of one
/// commit are adjacent: commits hold the write lock). Also whether more
/// items follow. Rows are stepped one at a time, so the work is bounded by
/// what is returned.
fn covered_items(
    c: &Connection,
    after_seq: u64,
    limit: usize,
) -> Result<(Vec<FeedItem>, bool), BackendError> {
    let sql = |e| map_sql(e, "changes: feed");
    let mut stmt = c
        .prepare_cached(
            "SELECT seq, origin, kind, host, counter, name, txn FROM feed
             WHERE seq > ?1 ORDER BY seq",
        )
        .map_err(sql)?;
    let mut rows = stmt.query([clamp(after_seq)]).map_err(sql)?;
    let (mut items, mut last_txn) = (Vec::new(), None);
    while let Some(r) = rows.next().map_err(sql)? {
        let txn: i64 = r.get(6).map_err(sql)?;
        if items.len() >= limit && last_txn != Some(txn) {
            return Ok((items, true));
        }
        let item = (|| {
            Ok::<_, rusqlite::Error>(decode_feed_row(
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })()
        .map_err(sql)??;
        items.push(item);
        last_txn = Some(txn);
    }
    Ok((items, false))
}

/// An inode's live state with its chunk list; call it inside a read
/// transaction, so the row and the list come from the same commit.
fn live_inode(c: &Connection, id: &ObjectId) -> Result<Option<InodeState>, BackendError> {
    let row = c
        .prepare_cached(&format!(
            "SELECT {INODE_COLUMNS} FROM inodes WHERE host = ?1 AND counter = ?2 AND deleted = 0"
        ))
        .and_then(|mut stmt| {
            stmt.query_row(params![id.host, id.counter as i64], read_inode)
                .optional()
        })
        .map_err(|e| map_sql(e, &format!("inode {id}")))?;
    let Some(inode) = row else {
        return Ok(None);
    };
    let mut inode = inode?;
    inode.chunks = read_chunk_list(c, id)?;
    Ok(Some(inode))
}

/// The live entry `parent/name`, if any.
fn live_entry(
    c: &Connection,
    parent: &ObjectId,
    name: &[u8],
) -> Result<Option<Entry>, BackendError> {
    let what = || format!("entry {parent}/{}", String::from_utf8_lossy(name));
    c.prepare_cached(&format!(
        "SELECT {ENTRY_COLUMNS} FROM entries
         WHERE parent_host = ?1 AND parent_counter = ?2 AND name = ?3 AND deleted = 0"
    ))
    .and_then(|mut stmt| {
        stmt.query_row(
            params![parent.host, parent.counter as i64, name],
            read_entry,
        )
        .optional()
    })
    .map_err(|e| map_sql(e, &what()))?
    .transpose()
}

/// The stored row of a key (tombstones included). `sql` selects version,
/// deleted, mode (inodes) and child host and counter (entries).
fn key_row(
    tx: &Transaction<'_>,
    sql: &str,
    key: impl rusqlite::Params,
    what: &dyn Fn() -> String,
) -> Result<Option<KeyRow>, BackendError> {
    type Raw = (i64, bool, Option<i64>, Option<u32>, Option<i64>);
    let row: Option<Raw> = tx
        .prepare_cached(sql)
        .and_then(|mut s| {
            s.query_row(key, |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()
        })
        .map_err(|e| map_sql(e, &what()))?;
    let Some((version, deleted, mode, child_host, child_counter)) = row else {
        return Ok(None);
    };
    Ok(Some(KeyRow {
        version: stored(version, what)?,
        deleted,
        mode: mode.map(|m| stored(m, what)).transpose()?,
        child: child_host
            .zip(child_counter)
            .map(|(host, counter)| ObjectId {
                host,
                counter: counter as u64,
            }),
    }))
}

/// Applies one op inside `tx` as [`Step::decide`] says: writes it and
/// appends it to the feed, or reports it refused.
fn apply(
    tx: &Transaction<'_>,
    origin: u32,
    txn: i64,
    op: &Op,
    refused: bool,
) -> Result<Step, BackendError> {
    let sql = |e| map_sql(e, "commit");
    let change = op.target();
    let row = match &change {
        FeedChange::Inode(id) => inode_row(tx, id)?,
        FeedChange::Entry { parent, name } => entry_row(tx, parent, name)?,
    };
    let step = Step::decide(op, refused, row);
    let Some(version) = step.version() else {
        return Ok(step);
    };
    let version = version as i64;
    match op {
        Op::PutInode { state: s, .. } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO inodes (host, counter, version, deleted, mode, uid, gid, rdev,
                    size, atime_ns, mtime_ns, ctime_ns, target, xattrs, origin)
                 VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    s.id.host,
                    s.id.counter as i64,
                    version,
                    s.mode,
                    s.uid,
                    s.gid,
                    s.rdev,
                    s.size as i64,
                    s.atime_ns,
                    s.mtime_ns,
                    s.ctime_ns,
                    s.target,
                    encode_xattrs(&s.xattrs),
                    origin
                ])
            })
            .map_err(sql)?;
            replace_chunk_list(tx, &s.id, &s.chunks)?;
        }
        Op::DeleteInode { id, .. } => {
            tx.execute(
                "UPDATE inodes SET version = ?3, deleted = 1, origin = ?4 WHERE host = ?1 AND counter = ?2",
                params![id.host, id.counter as i64, version, origin],
            )
            .map_err(sql)?;
            replace_chunk_list(tx, id, &[])?;
        }
        Op::PutEntry {
            parent,
            name,
            child,
            ..
        } => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO entries (parent_host, parent_counter, name, child_host,
                    child_counter, version, deleted, origin) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, ?7)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    parent.host,
                    parent.counter as i64,
                    name,
                    child.host,
                    child.counter as i64,
                    version,
                    origin
                ])
            })
            .map_err(sql)?;
        }
        Op::DeleteEntry { parent, name, .. } => {
            tx.execute(
                "UPDATE entries SET version = ?4, deleted = 1, origin = ?5
                 WHERE parent_host = ?1 AND parent_counter = ?2 AND name = ?3",
                params![parent.host, parent.counter as i64, name, version, origin],
            )
            .map_err(sql)?;
        }
    }
    let (kind, id, name) = change.encode();
    tx.prepare_cached(
        "INSERT INTO feed (origin, kind, host, counter, name, txn) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut st| st.execute(params![origin, kind, id.host, id.counter as i64, name, txn]))
    .map_err(sql)?;
    Ok(step)
}

fn inode_row(tx: &Transaction<'_>, id: &ObjectId) -> Result<Option<KeyRow>, BackendError> {
    key_row(
        tx,
        "SELECT version, deleted, mode, NULL, NULL FROM inodes WHERE host = ?1 AND counter = ?2",
        params![id.host, id.counter as i64],
        &|| format!("inode {id}"),
    )
}

fn entry_row(
    tx: &Transaction<'_>,
    parent: &ObjectId,
    name: &[u8],
) -> Result<Option<KeyRow>, BackendError> {
    key_row(
        tx,
        "SELECT version, deleted, NULL, child_host, child_counter FROM entries
         WHERE parent_host = ?1 AND parent_counter = ?2 AND name = ?3",
        params![parent.host, parent.counter as i64, name],
        &|| format!("entry {parent}/{}", String::from_utf8_lossy(name)),
    )
}

fn replace_chunk_list(
    tx: &Transaction<'_>,
    id: &ObjectId,
    chunks: &[(ChunkHash, u32)],
) -> Result<(), BackendError> {
    let sql = |e| map_sql(e, "commit chunk list");
    tx.prepare_cached("DELETE FROM inode_chunks WHERE host = ?1 AND counter = ?2")
        .and_then(|mut st| st.execute(params![id.host, id.counter as i64]))
        .map_err(sql)?;
    let mut insert = tx
        .prepare_cached(
            "INSERT INTO inode_chunks (host, counter, idx, hash, len) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(sql)?;
    for (idx, (hash, len)) in chunks.iter().enumerate() {
        insert
            .execute(params![
                id.host,
                id.counter as i64,
                idx as i64,
                &hash.0[..],
                len
            ])
            .map_err(sql)?;
    }
    Ok(())
}

fn read_chunk_list(c: &Connection, id: &ObjectId) -> Result<Vec<(ChunkHash, u32)>, BackendError> {
    let what = format!("chunk list of inode {id}");
    let mut stmt = c
        .prepare_cached(
            "SELECT hash, len FROM inode_chunks WHERE host = ?1 AND counter = ?2 ORDER BY idx",
        )
        .map_err(|e| map_sql(e, &what))?;
    let rows = stmt
        .query_map(params![id.host, id.counter as i64], |r| {
            let hash: Vec<u8> = r.get(0)?;
            let len: i64 = r.get(1)?;
            Ok(ChunkHash::from_stored(&hash, &what)
                .and_then(|h| Ok((h, stored(len, &|| what.clone())?))))
        })
        .map_err(|e| map_sql(e, &what))?;
    collect_rows(rows, &what)
}

/// Columns [`read_inode`] expects, in order.
const INODE_COLUMNS: &str =
    "host, counter, version, mode, uid, gid, rdev, size, atime_ns, mtime_ns,
    ctime_ns, target, xattrs, origin";

/// Decodes an inode row (without its chunk list). SQLite-level type errors
/// surface through the outer `Result`, range/format errors through the inner.
fn read_inode(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<InodeState, BackendError>> {
    let id = ObjectId {
        host: r.get(0)?,
        counter: r.get::<_, i64>(1)? as u64,
    };
    let what = || format!("inode {id}");
    let (version, size): (i64, i64) = (r.get(2)?, r.get(7)?);
    let xattrs: Vec<u8> = r.get(12)?;
    let (mode, uid, gid, rdev) = (r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?);
    let (atime_ns, mtime_ns, ctime_ns) = (r.get(8)?, r.get(9)?, r.get(10)?);
    let (target, origin) = (r.get(11)?, r.get(13)?);
    Ok((|| {
        Ok(InodeState {
            id,
            version: stored(version, &what)?,
            mode,
            uid,
            gid,
            rdev,
            size: stored(size, &what)?,
            atime_ns,
            mtime_ns,
            ctime_ns,
            target,
            xattrs: decode_xattrs(&xattrs, &id)?,
            chunks: Vec::new(),
            origin,
        })
    })())
}

/// Columns [`read_entry`] expects, in order.
const ENTRY_COLUMNS: &str =
    "parent_host, parent_counter, name, child_host, child_counter, version, origin";

fn read_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Entry, BackendError>> {
    let version: i64 = r.get(5)?;
    let origin: u32 = r.get(6)?;
    let entry = Entry {
        parent: ObjectId {
            host: r.get(0)?,
            counter: r.get::<_, i64>(1)? as u64,
        },
        name: r.get(2)?,
        child: ObjectId {
            host: r.get(3)?,
            counter: r.get::<_, i64>(4)? as u64,
        },
        version: 0,
        origin,
    };
    Ok(stored(version, &|| format!("entry {}", entry.parent))
        .map(|version| Entry { version, ..entry }))
}

/// Collects rows decoded as `rusqlite::Result<Result<T>>`, mapping both layers.
fn collect_rows<T>(
    rows: impl Iterator<Item = rusqlite::Result<Result<T, BackendError>>>,
    what: &str,
) -> Result<Vec<T>, BackendError> {
    rows.map(|row| row.map_err(|e| map_sql(e, what))?).collect()
}

/// Maps SQLite errors: lock timeouts and I/O on the volume (an unplugged
/// disk or network mount) are transient; type mismatches and a damaged
/// file are corruption.
fn map_sql(e: rusqlite::Error, what: &str) -> BackendError {
    use rusqlite::ffi::ErrorCode;
    match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen => BackendError::Unreachable {
                // Filled in by `locate`, by callers that know it.
                location: String::new(),
                detail: format!("{what}: {e}"),
            },
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                BackendError::corrupt(format!("{what}: {e}"))
            }
            _ => BackendError::other(format!("{what}: {e}")),
        },
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::Utf8Error(..) => BackendError::corrupt(format!("{what}: {e}")),
        _ => BackendError::other(format!("{what}: {e}")),
    }
}

/// Puts the volume's location into an `Unreachable` error from [`map_sql`]
/// (one that has none yet: an error from a snapshot's sink passes as is).
fn locate(e: BackendError, location: &str) -> BackendError {
    match e {
        BackendError::Unreachable {
            detail,
            location: l,
        } if l.is_empty() => BackendError::Unreachable {
            location: location.to_owned(),
            detail,
        },
        e => e,
    }
}

fn io_error(e: std::io::Error, what: &str) -> BackendError {
    BackendError::other(format!("{what}: {e}"))
}
