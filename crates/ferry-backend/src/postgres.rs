//! `postgres://…` — the shared backend for many hosts.
//!
//! The trait is synchronous (the replicator runs in plain threads), so the
//! backend owns a private tokio runtime with one worker that drives the
//! connections; each call `block_on`s its query with a timeout. Do not call
//! it from inside another tokio runtime (use `spawn_blocking` there).
//!
//! Connections live in a pool. A call takes one for itself (connecting a
//! new one when all are busy), so calls from several threads run
//! concurrently rather than queueing behind one connection; a connection
//! goes back to the pool when its call is done. A connection that failed or
//! timed out is dropped, and the next call connects anew, so a server
//! restart needs no new backend object. `wait_feed` keeps one extra
//! connection that `LISTEN`s on `ferry_feed`; `commit` sends `NOTIFY` in
//! its transaction.
//!
//! Round trips are what a remote backend costs, so the reads a replicator
//! repeats are one round trip each: statements are sent with their
//! parameter types (`query_typed`: no separate prepare), and `changes`
//! pipelines its whole transaction (BEGIN, three reads, COMMIT).
//!
//! Chunks are `bytea` rows (≤ 4 MiB, TOASTed out of line) rather than large
//! objects: they commit in the same transactions as everything else, need no
//! `lo_unlink` bookkeeping when they are garbage-collected, and survive
//! `pg_dump` without extra flags.
//!
//! TLS is not supported yet (`NoTls`): use it on a trusted network or
//! through a tunnel.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::ops::Range;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{try_join, try_join3, try_join_all};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, Config, GenericClient, NoTls, Portal, Transaction};

use crate::integrity::{self, CommitTx, KeyRow, Step};
use crate::{
    check_schema, clamp, decode_feed_row, decode_xattrs, encode_xattrs, new_volume_id, now_ns,
    redact, root_inode, stored, verify_stored, verify_upload, Backend, BackendError, Changes,
    ChunkHash, Entry, FeedChange, FeedItem, HostMark, InitPlan, InodeState, ObjectId, Op, Outcome,
    SnapshotItem, VolumeInfo, SCHEMA_VERSION,
};

/// Bound on any one call after connecting (a query, a commit, a chunk
/// transfer). Generous for 4 MiB chunks on a slow link; a dead server is
/// usually noticed much sooner (connection reset or refused).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Advisory lock key taken by every `commit` (and `init`). It makes the
/// feed's seq order equal to commit order: without it, a transaction that
/// took seq 10 could commit after one that took seq 11, and a reader that
/// already passed 11 would never see 10.
const COMMIT_LOCK: i64 = 0x6665_7272_7900; // "ferry\0"

/// The savepoint a commit returns to between its I3 rounds.
const SAVEPOINT: &str = "ferry_i3";

/// How often `commit` retries itself after a deadlock or serialization
/// failure (possible only with writers that bypass `COMMIT_LOCK`).
const COMMIT_ATTEMPTS: usize = 3;

/// Rows `snapshot_each` fetches at a time: what it holds in memory.
const SNAPSHOT_PAGE: i32 = 1000;

/// `MIGRATIONS[i]` upgrades schema version `i` to `i + 1`. All integers are
/// `bigint`: PostgreSQL has no unsigned types and u32 fields must round-trip.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE ferry_volume (
        id int PRIMARY KEY CHECK (id = 1),
        name text NOT NULL,
        volume_id text NOT NULL,
        schema_version int NOT NULL,
        created_ns bigint NOT NULL
    );
    -- Deleted inodes stay as tombstones (deleted) so versions never repeat.
    CREATE TABLE ferry_inodes (
        host bigint NOT NULL,
        counter bigint NOT NULL,
        version bigint NOT NULL,
        deleted boolean NOT NULL,
        mode bigint NOT NULL,
        uid bigint NOT NULL,
        gid bigint NOT NULL,
        rdev bigint NOT NULL,
        size bigint NOT NULL,
        atime_ns bigint NOT NULL,
        mtime_ns bigint NOT NULL,
        ctime_ns bigint NOT NULL,
        target bytea,
        xattrs bytea NOT NULL,
        origin bigint NOT NULL,
        PRIMARY KEY (host, counter)
    );
    -- A table so chunk garbage collection can find unreferenced chunks.
    CREATE TABLE ferry_inode_chunks (
        host bigint NOT NULL,
        counter bigint NOT NULL,
        idx int NOT NULL,
        hash bytea NOT NULL,
        len bigint NOT NULL,
        PRIMARY KEY (host, counter, idx)
    );
    CREATE INDEX ferry_inode_chunks_hash ON ferry_inode_chunks (hash);
    CREATE TABLE ferry_entries (
        parent_host bigint NOT NULL,
        parent_counter bigint NOT NULL,
        name bytea NOT NULL,
        child_host bigint NOT NULL,
        child_counter bigint NOT NULL,
        version bigint NOT NULL,
        deleted boolean NOT NULL,
        PRIMARY KEY (parent_host, parent_counter, name)
    );
    CREATE TABLE ferry_chunks (
        hash bytea PRIMARY KEY,
        data bytea NOT NULL
    );
    -- kind 0: inode (host, counter); kind 1: entry (parent host, counter, name).
    CREATE TABLE ferry_feed (
        seq bigserial PRIMARY KEY,
        origin bigint NOT NULL,
        kind smallint NOT NULL,
        host bigint NOT NULL,
        counter bigint NOT NULL,
        name bytea
    );
",
    "
    -- What the backend knows of each host (HostMark).
    CREATE TABLE ferry_hosts (
        host bigint PRIMARY KEY,
        shipped_seq bigint NOT NULL
    );
    -- The names of an inode, for the I3 rules; live entries only.
    CREATE INDEX ferry_entries_child ON ferry_entries (child_host, child_counter) WHERE NOT deleted;
    -- Which host changed an entry last (Entry::origin).
    ALTER TABLE ferry_entries ADD COLUMN origin bigint NOT NULL DEFAULT 0;
",
    "
    -- The commit (top-level transaction) that appended the item, so
    -- `changes` never cuts one; a default, so every insert gets it. Items
    -- from before version 3 have -seq: their commits are unknown, so each
    -- stands alone.
    ALTER TABLE ferry_feed ADD COLUMN txn bigint;
    UPDATE ferry_feed SET txn = -seq;
    ALTER TABLE ferry_feed ALTER COLUMN txn SET NOT NULL,
        ALTER COLUMN txn SET DEFAULT txid_current();
",
];
// One migration per schema version.
const _: () = assert!(MIGRATIONS.len() == SCHEMA_VERSION as usize);

/// The `postgres://` backend.
pub(crate) struct PgBackend {
    rt: Runtime,
    config: Config,
    location: String,
    pool: Mutex<Vec<Client>>,
    listener: Mutex<Option<Listener>>,
}

/// The LISTEN connection: its client (kept so the connection stays open)
/// and a counter bumped on every notification.
struct Listener {
    _client: Client,
    notified: watch::Receiver<u64>,
}

impl std::fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBackend")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// Creates (or migrates) the volume in the database at `url`.
pub(crate) fn init(
    url: &str,
    volume_name: &str,
    connect_timeout: Duration,
) -> Result<VolumeInfo, BackendError> {
    let backend = PgBackend::new(url, connect_timeout)?;
    let begun = Cell::new(false);
    let info = backend.call_retrying(
        "init",
        Some(CALL_TIMEOUT),
        || !begun.get(),
        async |client, loc| {
            let err = pg_error(loc, "init");
            let tx = client.transaction().await.map_err(err)?;
            begun.set(true);
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&COMMIT_LOCK])
                .await
                .map_err(err)?;
            let found = schema_version(&tx, loc).await?;
            let existing = match found {
                0 => String::new(),
                _ => read_info(&tx, loc)
                    .await
                    .map_or_else(|e| format!("<{e}>"), |i| i.name),
            };
            let plan = InitPlan::decide(found, loc, || existing)?;
            for migration in &MIGRATIONS[plan.first_migration()..] {
                tx.batch_execute(migration).await.map_err(err)?;
            }
            let version = SCHEMA_VERSION as i32;
            if plan == InitPlan::Create {
                let now = now_ns();
                tx.execute(
                    "INSERT INTO ferry_volume (id, name, volume_id, schema_version, created_ns)
                 VALUES (1, $1, $2, $3, $4)",
                    &[&volume_name, &new_volume_id(volume_name), &version, &now],
                )
                .await
                .map_err(err)?;
                let root = Op::PutInode {
                    state: root_inode(now),
                    base: None,
                };
                apply_pipelined(&tx, loc, 0, &[root], &[false]).await?;
            } else {
                tx.execute("UPDATE ferry_volume SET schema_version = $1", &[&version])
                    .await
                    .map_err(err)?;
            }
            let info = read_info(&tx, loc).await?;
            tx.commit().await.map_err(err)?;
            Ok(info)
        },
    )?;
    tracing::info!(location = %backend.location, volume = %info.name, "initialized postgres backend");
    Ok(info)
}

impl PgBackend {
    /// Opens an initialized volume, checking its schema version.
    pub(crate) fn open(url: &str, connect_timeout: Duration) -> Result<PgBackend, BackendError> {
        let backend = PgBackend::new(url, connect_timeout)?;
        let found = backend.call("open", async |client, loc| {
            schema_version(client, loc).await
        })?;
        check_schema(found, url)?;
        Ok(backend)
    }

    /// Parses the URL and fills in credentials; connects lazily.
    fn new(url: &str, connect_timeout: Duration) -> Result<PgBackend, BackendError> {
        let location = redact(url);
        let mut config: Config = url.parse().map_err(|e| BackendError::Invalid {
            detail: format!("bad postgres URL {location}: {e}"),
        })?;
        config.connect_timeout(connect_timeout);
        config.application_name("ferry");
        fill_credentials(&mut config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ferry-pg")
            .enable_all()
            .build()
            .map_err(|e| BackendError::other(format!("starting postgres runtime: {e}")))?;
        Ok(PgBackend {
            rt,
            config,
            location,
            pool: Mutex::new(Vec::new()),
            listener: Mutex::new(None),
        })
    }

    /// Connects, bounded by the connect timeout (tokio-postgres applies it
    /// per address; this bounds the whole attempt).
    async fn connect(
        config: &Config,
        location: &str,
    ) -> Result<
        (
            Client,
            tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
        ),
        BackendError,
    > {
        let limit = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(CALL_TIMEOUT);
        match tokio::time::timeout(limit, config.connect(NoTls)).await {
            Ok(result) => result.map_err(pg_error(location, "connect")),
            Err(_) => Err(BackendError::Unreachable {
                location: location.to_owned(),
                detail: format!("connect timed out after {limit:?}"),
            }),
        }
    }

    /// Runs an idempotent call under [`CALL_TIMEOUT`]; see
    /// [`PgBackend::call_retrying`].
    fn call<T>(
        &self,
        what: &str,
        f: impl AsyncFn(&mut Client, &str) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        self.call_retrying(what, Some(CALL_TIMEOUT), || true, f)
    }

    /// Runs `f` on a pooled (or new) connection. If a pooled connection
    /// turns out dead (the server restarted since it was last used) and
    /// `may_retry()` says so, the call is retried once on a fresh
    /// connection, so a restart nobody noticed costs no error.
    ///
    /// `commit` and `init` may retry only while their transaction had not
    /// begun: after that, a lost connection leaves the outcome unknown, and
    /// the error goes to the caller (the replicator resolves it through
    /// base versions).
    ///
    /// `limit` bounds the whole call; `None` is for a call that bounds each
    /// of its steps itself (a snapshot streams for as long as it takes).
    fn call_retrying<T>(
        &self,
        what: &str,
        limit: Option<Duration>,
        may_retry: impl Fn() -> bool,
        f: impl AsyncFn(&mut Client, &str) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let pooled = self.pooled();
        let was_pooled = pooled.is_some();
        match self.attempt(what, pooled, limit, &f) {
            Err(e) if was_pooled && e.is_transient() && may_retry() => {
                tracing::debug!("{what}: retrying on a fresh connection after {e}");
                self.attempt(what, None, limit, &f)
            }
            result => result,
        }
    }

    /// A pooled connection that is not known to be closed.
    fn pooled(&self) -> Option<Client> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.retain(|c| !c.is_closed());
        pool.pop()
    }

    /// Runs `f` on `client` (or a new connection) within `limit`. The
    /// connection goes back to the pool only if it is still healthy.
    fn attempt<T>(
        &self,
        what: &str,
        client: Option<Client>,
        limit: Option<Duration>,
        f: impl AsyncFnOnce(&mut Client, &str) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let location = self.location.as_str();
        let result = self.rt.block_on(async {
            let mut client = match client {
                Some(client) => client,
                None => {
                    let (client, connection) = Self::connect(&self.config, location).await?;
                    tokio::spawn(async move {
                        if let Err(e) = connection.await {
                            tracing::debug!("postgres connection ended: {e}");
                        }
                    });
                    client
                }
            };
            let result = match limit {
                Some(limit) => tokio::time::timeout(limit, f(&mut client, location))
                    .await
                    .map_err(|_| BackendError::Unreachable {
                        location: location.to_owned(),
                        detail: format!("{what} timed out after {limit:?}"),
                    })?,
                None => f(&mut client, location).await,
            };
            Ok((result, client))
        });
        let (result, client) = result?;
        if !client.is_closed() && !matches!(result, Err(BackendError::Unreachable { .. })) {
            self.pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(client);
        }
        result
    }

    /// The LISTEN connection's notification counter, connecting it if it is
    /// not there or has died.
    fn notifications(&self) -> Result<watch::Receiver<u64>, BackendError> {
        let mut listener = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = listener.as_ref() {
            if l.notified.has_changed().is_ok() {
                return Ok(l.notified.clone());
            }
        }
        *listener = None;
        let location = self.location.as_str();
        let new = self.rt.block_on(async {
            let (client, mut connection) = Self::connect(&self.config, location).await?;
            let (tx, rx) = watch::channel(0u64);
            tokio::spawn(async move {
                // Driving the connection delivers notifications; when it
                // ends, dropping `tx` tells waiters to reconnect.
                while let Some(message) =
                    std::future::poll_fn(|cx| connection.poll_message(cx)).await
                {
                    match message {
                        Ok(AsyncMessage::Notification(_)) => tx.send_modify(|n| *n += 1),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!("postgres LISTEN connection ended: {e}");
                            break;
                        }
                    }
                }
            });
            with_timeout(
                location,
                "LISTEN",
                client.batch_execute("LISTEN ferry_feed"),
            )
            .await?;
            Ok::<_, BackendError>(Listener {
                _client: client,
                notified: rx,
            })
        })?;
        let rx = new.notified.clone();
        *listener = Some(new);
        Ok(rx)
    }

    fn max_seq(&self) -> Result<u64, BackendError> {
        self.call("feed position", async |c, loc| max_seq(c, loc).await)
    }
}

impl Backend for PgBackend {
    fn info(&self) -> Result<VolumeInfo, BackendError> {
        self.call("info", async |c, loc| read_info(c, loc).await)
    }

    fn missing_chunks(&self, hashes: &[ChunkHash]) -> Result<Vec<ChunkHash>, BackendError> {
        let keys: Vec<&[u8]> = hashes.iter().map(|h| &h.0[..]).collect();
        let present = self.call("missing_chunks", async |c, loc| {
            let rows = c
                .query_typed(
                    "SELECT hash FROM ferry_chunks WHERE hash = ANY($1)",
                    &[(&keys, Type::BYTEA_ARRAY)],
                )
                .await
                .map_err(pg_error(loc, "missing_chunks"))?;
            rows.iter()
                .map(|r| {
                    ChunkHash::from_stored(
                        &get::<Vec<u8>>(r, 0, &|| "chunk key".into())?,
                        "chunk key",
                    )
                })
                .collect::<Result<std::collections::HashSet<_>, _>>()
        })?;
        Ok(hashes
            .iter()
            .filter(|h| !present.contains(h))
            .copied()
            .collect())
    }

    fn put_chunk(&self, hash: &ChunkHash, data: &[u8]) -> Result<(), BackendError> {
        self.put_chunks(&[(*hash, data)])
    }

    fn put_chunks(&self, chunks: &[(ChunkHash, &[u8])]) -> Result<(), BackendError> {
        for (hash, data) in chunks {
            verify_upload(hash, data)?;
        }
        self.call("put_chunk", async |c, loc| {
            // Same hash = same content; only a damaged row (wrong length) is rewritten.
            // Pipelined: every insert is sent before the first answer is back.
            let c = &*c;
            try_join_all(chunks.iter().map(|(hash, data)| async move {
                let hash = &hash.0[..];
                let params: [Param<'_>; 2] = [(&hash, Type::BYTEA), (data, Type::BYTEA)];
                c.execute_typed(
                    "INSERT INTO ferry_chunks (hash, data) VALUES ($1, $2)
                     ON CONFLICT (hash) DO UPDATE SET data = EXCLUDED.data
                     WHERE length(ferry_chunks.data) <> length(EXCLUDED.data)",
                    &params,
                )
                .await
            }))
            .await
            .map_err(pg_error(loc, "put_chunk"))?;
            Ok(())
        })
    }

    fn get_chunk(&self, hash: &ChunkHash) -> Result<Vec<u8>, BackendError> {
        let mut data = self.get_chunks(std::slice::from_ref(hash))?;
        Ok(data.pop().expect("one answer per hash"))
    }

    fn get_chunks(&self, hashes: &[ChunkHash]) -> Result<Vec<Vec<u8>>, BackendError> {
        if hashes.is_empty() {
            return Ok(Vec::new());
        }
        // How often each hash was asked for: the last answer takes the
        // fetched bytes, earlier ones a copy; each is fetched once.
        let mut left: HashMap<ChunkHash, usize> = HashMap::new();
        for hash in hashes {
            *left.entry(*hash).or_default() += 1;
        }
        let keys: Vec<&[u8]> = left.keys().map(|h| &h.0[..]).collect();
        let rows = self.call("get_chunks", async |c, loc| {
            c.query_typed(
                "SELECT hash, data FROM ferry_chunks WHERE hash = ANY($1)",
                &[(&keys, Type::BYTEA_ARRAY)],
            )
            .await
            .map_err(pg_error(loc, "get_chunks"))
        })?;
        let mut found = HashMap::with_capacity(rows.len());
        for r in &rows {
            let what = || "chunk key".to_owned();
            let hash = ChunkHash::from_stored(&get::<Vec<u8>>(r, 0, &what)?, "chunk key")?;
            found.insert(hash, get::<Vec<u8>>(r, 1, &what)?);
        }
        drop(rows);
        hashes
            .iter()
            .map(|hash| {
                let n = left.get_mut(hash).expect("every hash is counted");
                *n -= 1;
                let data = match n {
                    0 => found.remove(hash),
                    _ => found.get(hash).cloned(),
                };
                let data = data.ok_or_else(|| BackendError::NotFound {
                    what: format!("chunk {}", hash.to_hex()),
                })?;
                verify_stored(hash, data)
            })
            .collect()
    }

    fn commit(&self, origin: u32, ops: &[Op]) -> Result<Vec<Outcome>, BackendError> {
        let begun = Cell::new(false);
        self.call_retrying(
            "commit",
            Some(CALL_TIMEOUT),
            || !begun.get(),
            async |c, loc| {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match commit_once(c, loc, origin, ops, &begun).await {
                        Err(CommitError::Retry(e)) if attempt < COMMIT_ATTEMPTS => {
                            tracing::debug!("commit retry after {e}");
                        }
                        Err(CommitError::Retry(e)) => return Err(pg_error(loc, "commit")(e)),
                        Err(CommitError::Fatal(e)) => return Err(e),
                        Ok(outcomes) => return Ok(outcomes),
                    }
                }
            },
        )
    }

    fn inode(&self, id: &ObjectId) -> Result<Option<InodeState>, BackendError> {
        let key = (i64::from(id.host), id.counter as i64);
        self.call("inode", async |c, loc| {
            // One statement, one snapshot: the row and its chunk list come
            // from the same commit.
            let rows = c
                .query_typed(
                    &format!(
                        "SELECT {INODE_COLUMNS} FROM ferry_inodes i {INODE_CHUNKS}
                         WHERE i.host = $1 AND i.counter = $2 AND NOT i.deleted"
                    ),
                    &[(&key.0, Type::INT8), (&key.1, Type::INT8)],
                )
                .await
                .map_err(pg_error(loc, "inode"))?;
            rows.first().map(read_inode).transpose()
        })
    }

    fn entries(&self, parent: &ObjectId) -> Result<Vec<Entry>, BackendError> {
        self.call("entries", async |c, loc| {
            let rows = c
                .query(
                    &format!(
                        "SELECT {ENTRY_COLUMNS} FROM ferry_entries e
                         WHERE parent_host = $1 AND parent_counter = $2 AND NOT deleted ORDER BY name"
                    ),
                    &[&i64::from(parent.host), &(parent.counter as i64)],
                )
                .await
                .map_err(pg_error(loc, "entries"))?;
            rows.iter().map(read_entry).collect()
        })
    }

    fn snapshot_each(
        &self,
        sink: &mut dyn FnMut(SnapshotItem) -> Result<(), BackendError>,
    ) -> Result<u64, BackendError> {
        // Once an item went out, a retry would send it twice.
        let streamed = Cell::new(false);
        let mut send = |item| {
            streamed.set(true);
            sink(item)
        };
        // The call's closure may run twice (a retry), so it cannot own `send`.
        let send = RefCell::new(&mut send);
        // No limit on the whole call: each step has its own.
        self.call_retrying(
            "snapshot",
            None,
            || !streamed.get(),
            async |c, loc| {
                let err = pg_error(loc, "snapshot");
                // REPEATABLE READ: every query sees the same snapshot; with
                // COMMIT_LOCK, a visible max(seq) means all lower seqs are
                // visible too. Portals fetch the rows a page at a time.
                let (tx, seq, inodes) = bounded(loc, "snapshot", async {
                    let tx = read_transaction(c).await.map_err(err)?;
                    let seq = max_seq(&tx, loc).await?;
                    let sql = format!(
                        "SELECT {INODE_COLUMNS} FROM ferry_inodes i {INODE_CHUNKS}
                     WHERE NOT i.deleted ORDER BY i.host, i.counter"
                    );
                    let inodes = tx.bind(sql.as_str(), &[]).await.map_err(err)?;
                    Ok((tx, seq, inodes))
                })
                .await?;
                stream_portal(&tx, loc, &inodes, |r| {
                    (send.borrow_mut())(SnapshotItem::Inode(read_inode(r)?))
                })
                .await?;
                let sql = format!(
                    "SELECT {ENTRY_COLUMNS} FROM ferry_entries e WHERE NOT e.deleted
                 ORDER BY e.parent_host, e.parent_counter, e.name"
                );
                let entries = with_timeout(loc, "snapshot", tx.bind(sql.as_str(), &[])).await?;
                stream_portal(&tx, loc, &entries, |r| {
                    (send.borrow_mut())(SnapshotItem::Entry(read_entry(r)?))
                })
                .await?;
                with_timeout(loc, "snapshot", tx.commit()).await?;
                Ok(seq)
            },
        )
    }

    fn feed(&self, after_seq: u64, limit: usize) -> Result<Vec<FeedItem>, BackendError> {
        self.call("feed", async |c, loc| {
            let rows = c
                .query(
                    "SELECT seq, origin, kind, host, counter, name FROM ferry_feed
                     WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&clamp(after_seq), &clamp(limit as u64)],
                )
                .await
                .map_err(pg_error(loc, "feed"))?;
            rows.iter()
                .map(|r| {
                    let kind: i16 = r.get(2);
                    decode_feed_row(
                        r.get(0),
                        r.get(1),
                        kind.into(),
                        r.get(3),
                        r.get(4),
                        r.get(5),
                    )
                })
                .collect()
        })
    }

    fn changes(&self, after_seq: u64, limit: usize) -> Result<Changes, BackendError> {
        let (after, limit) = (clamp(after_seq), clamp(limit as u64));
        let params: [(&(dyn ToSql + Sync), Type); 2] = [(&after, Type::INT8), (&limit, Type::INT8)];
        let [cursor, inodes, entries] = &*CHANGES_SQL;
        let (cursor, inodes, entries) = self.call("changes", async |c, loc| {
            pipelined_read(
                c,
                try_join3(
                    c.query_typed(cursor, &params),
                    c.query_typed(inodes, &params),
                    c.query_typed(entries, &params),
                ),
            )
            .await
            .map_err(pg_error(loc, "changes"))
        })?;
        let what = || "changes".to_owned();
        let [cursor] = &cursor[..] else {
            return Err(BackendError::corrupt("changes: no cursor row"));
        };
        if let Some(seq) = get::<Option<i64>>(cursor, 2, &what)? {
            return Err(BackendError::corrupt(format!(
                "feed item {seq}: unknown kind"
            )));
        }
        let last: Option<i64> = get(cursor, 0, &what)?;
        let inodes = inodes
            .iter()
            .map(|r| {
                let id = object_id(r, INODE_KEY, "changed inode")?;
                let live = get::<Option<i64>>(r, 0, &what)?.is_some();
                Ok((id, live.then(|| read_inode(r)).transpose()?))
            })
            .collect::<Result<_, BackendError>>()?;
        let entries = entries
            .iter()
            .map(|r| {
                let parent = object_id(r, ENTRY_KEY, "changed entry")?;
                let name = get(r, ENTRY_KEY + 2, &what)?;
                let live = get::<Option<i64>>(r, 0, &what)?.is_some();
                Ok((parent, name, live.then(|| read_entry(r)).transpose()?))
            })
            .collect::<Result<_, BackendError>>()?;
        Ok(Changes {
            seq: last.map_or(Ok(after_seq), |seq| stored(seq, &what))?,
            more: get(cursor, 1, &what)?,
            inodes,
            entries,
        })
    }

    fn wait_feed(&self, after_seq: u64, timeout: Duration) -> Result<bool, BackendError> {
        let deadline = Instant::now() + timeout;
        loop {
            // Subscribe before checking, so a commit between the check and
            // the wait still wakes us.
            let mut notified = self.notifications()?;
            notified.borrow_and_update();
            if self.max_seq()? > after_seq {
                return Ok(true);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(false);
            }
            // A closed channel (LISTEN connection lost) also ends the wait;
            // the next round reconnects.
            if self
                .rt
                .block_on(async { tokio::time::timeout(remaining, notified.changed()).await })
                .is_err()
            {
                return Ok(self.max_seq()? > after_seq);
            }
        }
    }

    fn host_mark(&self, host: u32) -> Result<HostMark, BackendError> {
        let host = i64::from(host);
        self.call("host_mark", async |c, loc| {
            let row = c
                .query_one(
                    "SELECT (SELECT COALESCE(MAX(counter), 0) FROM ferry_inodes WHERE host = $1),
                            (SELECT COALESCE(MAX(shipped_seq), 0) FROM ferry_hosts WHERE host = $1)",
                    &[&host],
                )
                .await
                .map_err(pg_error(loc, "host_mark"))?;
            let what = || format!("mark of host {host}");
            Ok(HostMark {
                max_counter: get::<i64>(&row, 0, &what)? as u64,
                shipped_seq: stored(get(&row, 1, &what)?, &what)?,
            })
        })
    }

    fn set_shipped(&self, host: u32, seq: u64) -> Result<(), BackendError> {
        self.call("set_shipped", async |c, loc| {
            c.execute_typed(
                "INSERT INTO ferry_hosts (host, shipped_seq) VALUES ($1, $2)
                 ON CONFLICT (host) DO UPDATE
                    SET shipped_seq = GREATEST(ferry_hosts.shipped_seq, EXCLUDED.shipped_seq)",
                &[(&i64::from(host), Type::INT8), (&clamp(seq), Type::INT8)],
            )
            .await
            .map_err(pg_error(loc, "set_shipped"))?;
            Ok(())
        })
    }
}

/// A read-only transaction whose queries all see one snapshot.
async fn read_transaction(c: &mut Client) -> Result<Transaction<'_>, tokio_postgres::Error> {
    c.build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
}

/// Runs `reads` in one REPEATABLE READ, READ ONLY transaction in one round
/// trip: BEGIN, the reads and COMMIT are pipelined, so the reads see one
/// snapshot without first waiting for BEGIN's answer. `reads` must send
/// its statements on `c` when first polled (tokio-postgres queries do).
/// A failed read aborts the transaction, and the COMMIT already sent ends
/// it, so the connection is left idle either way.
async fn pipelined_read<T>(
    c: &Client,
    reads: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    let (_, value, _) = try_join3(
        c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
        reads,
        c.batch_execute("COMMIT"),
    )
    .await?;
    Ok(value)
}

/// The feed items `changes` covers, as the CTE `covered` that each of its
/// statements starts with ($1 = after_seq, $2 = limit): the first `$2`
/// items after `$1`, then on to the end of the last one's commit. Items of
/// one commit are adjacent (commits hold COMMIT_LOCK), so the commit ends
/// before `bound`, the first later item of another commit. Index range
/// scans only: the work is bounded by what is covered.
const COVERED: &str = "
    WITH page AS (
        SELECT seq, txn FROM ferry_feed WHERE seq > $1 ORDER BY seq LIMIT $2
    ), edge AS (
        SELECT seq, txn FROM page ORDER BY seq DESC LIMIT 1
    ), bound AS (
        SELECT COALESCE(
            (SELECT n.seq FROM edge CROSS JOIN LATERAL (
                SELECT seq FROM ferry_feed WHERE seq > edge.seq AND txn <> edge.txn
                ORDER BY seq LIMIT 1) n),
            (SELECT 9223372036854775807 FROM edge),
            $1) AS seq
    ), covered AS (
        SELECT seq, kind, host, counter, name FROM ferry_feed
        WHERE seq > $1 AND seq < (SELECT seq FROM bound)
    )";

/// The three statements of `changes`, each after [`COVERED`]:
/// 1. the cursor: the last covered seq (NULL if none), whether items follow
///    it, and the first covered item of an unknown kind (NULL if none);
/// 2. every inode a covered item names, plus the child of every live entry
///    a covered item names: [`INODE_COLUMNS`] (NULL: not live), then the
///    key at [`INODE_KEY`];
/// 3. every entry a covered item names: [`ENTRY_COLUMNS`] (NULL: not
///    live), then the key (parent host, counter, name) at [`ENTRY_KEY`].
static CHANGES_SQL: LazyLock<[String; 3]> = LazyLock::new(|| {
    [
        format!(
            "{COVERED}
            SELECT (SELECT max(seq) FROM covered),
                COALESCE((SELECT max(seq) FROM ferry_feed), 0)
                    > COALESCE((SELECT max(seq) FROM covered), $1),
                (SELECT min(seq) FROM covered
                    WHERE NOT ((kind = 0 AND name IS NULL) OR (kind = 1 AND name IS NOT NULL)))"
        ),
        format!(
            "{COVERED}, keys AS (
                SELECT host, counter FROM covered WHERE kind = 0
                UNION
                SELECT e.child_host, e.child_counter FROM covered k JOIN ferry_entries e
                    ON e.parent_host = k.host AND e.parent_counter = k.counter AND e.name = k.name
                WHERE k.kind = 1 AND NOT e.deleted
            )
            SELECT {INODE_COLUMNS}, k.host, k.counter FROM keys k
                LEFT JOIN ferry_inodes i
                    ON i.host = k.host AND i.counter = k.counter AND NOT i.deleted
                {INODE_CHUNKS}
            ORDER BY k.host, k.counter"
        ),
        format!(
            "{COVERED}, keys AS (SELECT DISTINCT host, counter, name FROM covered WHERE kind = 1)
            SELECT {ENTRY_COLUMNS}, k.host, k.counter, k.name FROM keys k
                LEFT JOIN ferry_entries e ON e.parent_host = k.host
                    AND e.parent_counter = k.counter AND e.name = k.name AND NOT e.deleted
            ORDER BY k.host, k.counter, k.name"
        ),
    ]
});

/// Column of the key (host, counter) in a row of the second statement of
/// [`CHANGES_SQL`].
const INODE_KEY: usize = 16;

/// Column of the key (parent host, counter, name) in a row of the third
/// statement of [`CHANGES_SQL`].
const ENTRY_KEY: usize = 7;

/// Feeds every row of `portal` to `each`, fetched [`SNAPSHOT_PAGE`] rows
/// at a time, each page under [`CALL_TIMEOUT`].
async fn stream_portal(
    tx: &Transaction<'_>,
    loc: &str,
    portal: &Portal,
    mut each: impl FnMut(&tokio_postgres::Row) -> Result<(), BackendError>,
) -> Result<(), BackendError> {
    loop {
        let rows = with_timeout(loc, "snapshot", tx.query_portal(portal, SNAPSHOT_PAGE)).await?;
        rows.iter().try_for_each(&mut each)?;
        if rows.len() < SNAPSHOT_PAGE as usize {
            return Ok(());
        }
    }
}

/// Why one commit attempt failed: worth retrying in a fresh transaction
/// (deadlock, serialization failure) or not.
enum CommitError {
    Retry(tokio_postgres::Error),
    Fatal(BackendError),
}

async fn commit_once(
    c: &mut Client,
    loc: &str,
    origin: u32,
    ops: &[Op],
    begun: &Cell<bool>,
) -> Result<Vec<Outcome>, CommitError> {
    let classify = |e: tokio_postgres::Error| match e.code() {
        Some(code)
            if *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::T_R_SERIALIZATION_FAILURE =>
        {
            CommitError::Retry(e)
        }
        _ => CommitError::Fatal(pg_error(loc, "commit")(e)),
    };
    let tx = c.transaction().await.map_err(classify)?;
    begun.set(true);
    // The lock and the savepoint of the I3 rounds in one round trip.
    tx.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock({COMMIT_LOCK}); SAVEPOINT {SAVEPOINT}"
    ))
    .await
    .map_err(classify)?;
    let outcomes = integrity::commit(
        &PgCommit {
            tx: &tx,
            loc,
            origin,
        },
        ops,
    )
    .await
    .map_err(CommitError::Fatal)?;
    tx.commit().await.map_err(classify)?;
    Ok(outcomes)
}

/// A commit transaction, as the I3 rules see it: every query of a rule
/// check is one statement over arrays of ids, so a check costs one round
/// trip however many ops the commit has.
struct PgCommit<'t, 'c> {
    tx: &'t Transaction<'c>,
    loc: &'t str,
    origin: u32,
}

impl CommitTx for PgCommit<'_, '_> {
    /// Already taken: `commit_once` sends it with the commit lock, which
    /// saves a round trip per commit.
    async fn savepoint(&self) -> Result<(), BackendError> {
        Ok(())
    }

    async fn rollback_to_savepoint(&self) -> Result<(), BackendError> {
        self.tx
            .batch_execute(&format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}"))
            .await
            .map_err(pg_error(self.loc, "commit rollback"))
    }

    async fn apply(&self, ops: &[Op], refused: &[bool]) -> Result<Vec<Step>, BackendError> {
        let mut steps = Vec::with_capacity(ops.len());
        for run in distinct_key_runs(ops) {
            steps.extend(
                apply_pipelined(
                    self.tx,
                    self.loc,
                    self.origin,
                    &ops[run.clone()],
                    &refused[run],
                )
                .await?,
            );
        }
        Ok(steps)
    }

    async fn live_modes(&self, ids: &[ObjectId]) -> Result<HashMap<ObjectId, u32>, BackendError> {
        let rows = self
            .query_ids(
                "SELECT i.host, i.counter, i.mode FROM unnest($1::bigint[], $2::bigint[]) AS k(host, counter)
                 JOIN ferry_inodes i ON i.host = k.host AND i.counter = k.counter
                 WHERE NOT i.deleted",
                ids,
            )
            .await?;
        rows.iter()
            .map(|r| {
                let id = object_id(r, 0, "inode")?;
                let what = || format!("mode of inode {id}");
                Ok((id, stored(get(r, 2, &what)?, &what)?))
            })
            .collect()
    }

    async fn name_parents(
        &self,
        ids: &[ObjectId],
    ) -> Result<HashMap<ObjectId, Vec<ObjectId>>, BackendError> {
        let rows = self
            .query_ids(
                "SELECT k.host, k.counter, e.parent_host, e.parent_counter
                 FROM unnest($1::bigint[], $2::bigint[]) AS k(host, counter)
                 CROSS JOIN LATERAL (SELECT parent_host, parent_counter FROM ferry_entries
                    WHERE child_host = k.host AND child_counter = k.counter AND NOT deleted
                    LIMIT 2) e",
                ids,
            )
            .await?;
        let mut names: HashMap<ObjectId, Vec<ObjectId>> = HashMap::new();
        for r in &rows {
            let child = object_id(r, 0, "entry child")?;
            names
                .entry(child)
                .or_default()
                .push(object_id(r, 2, "entry parent")?);
        }
        Ok(names)
    }

    async fn with_entries(&self, dirs: &[ObjectId]) -> Result<HashSet<ObjectId>, BackendError> {
        let rows = self
            .query_ids(
                "SELECT k.host, k.counter FROM unnest($1::bigint[], $2::bigint[]) AS k(host, counter)
                 WHERE EXISTS (SELECT 1 FROM ferry_entries
                    WHERE parent_host = k.host AND parent_counter = k.counter AND NOT deleted)",
                dirs,
            )
            .await?;
        rows.iter().map(|r| object_id(r, 0, "directory")).collect()
    }
}

impl PgCommit<'_, '_> {
    /// Runs `sql` with the ids as two arrays, hosts ($1) and counters ($2).
    async fn query_ids(
        &self,
        sql: &str,
        ids: &[ObjectId],
    ) -> Result<Vec<tokio_postgres::Row>, BackendError> {
        let hosts: Vec<i64> = ids.iter().map(|id| i64::from(id.host)).collect();
        let counters: Vec<i64> = ids.iter().map(|id| id.counter as i64).collect();
        self.tx
            .query_typed(
                sql,
                &[(&hosts, Type::INT8_ARRAY), (&counters, Type::INT8_ARRAY)],
            )
            .await
            .map_err(pg_error(self.loc, "commit: I3 check"))
    }
}

/// Splits `ops` into consecutive runs (index ranges) in which no key
/// repeats. Within a run the ops are independent, so [`apply_pipelined`]
/// may send their statements without waiting for each other's results; a
/// repeated key starts a new run, so a later op still sees the earlier
/// one's version.
fn distinct_key_runs(ops: &[Op]) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let (mut start, mut keys) = (0, HashSet::new());
    for (i, op) in ops.iter().enumerate() {
        if !keys.insert(op.target()) {
            runs.push(start..i);
            start = i;
            keys.clear();
            keys.insert(op.target());
        }
    }
    runs.push(start..ops.len());
    runs
}

/// Applies ops on distinct keys inside `tx` (each as [`Step::decide`] says,
/// given its refused flag) with the same result as one by one, in a handful of round trips instead of several per op: all base
/// checks (`FOR UPDATE`) are pipelined, then all writes, then all feed
/// rows. A connection executes pipelined statements in the order they were
/// sent, and each phase sends in op order, so rows and feed seqs are
/// written in op order, as before.
async fn apply_pipelined(
    tx: &Transaction<'_>,
    loc: &str,
    origin: u32,
    ops: &[Op],
    refused: &[bool],
) -> Result<Vec<Step>, BackendError> {
    let err = pg_error(loc, "commit");
    let rows = try_join_all(ops.iter().map(|op| lock_row(tx, op)))
        .await
        .map_err(err)?;
    let mut steps = Vec::with_capacity(ops.len());
    for ((op, row), &refused) in ops.iter().zip(rows).zip(refused) {
        let row = row.map(|r| key_row(&r, op)).transpose()?;
        steps.push(Step::decide(op, refused, row));
    }
    let applied: Vec<(&Op, i64)> = ops
        .iter()
        .zip(&steps)
        .filter_map(|(op, step)| step.version().map(|v| (op, v as i64)))
        .collect();
    let origin = i64::from(origin);
    try_join_all(
        applied
            .iter()
            .map(|&(op, version)| write(tx, loc, origin, op, version)),
    )
    .await?;
    if applied.is_empty() {
        return Ok(steps);
    }
    let feed_rows = try_join_all(applied.iter().map(|&(op, _)| {
        let change = op.target();
        async move {
            let (kind, id, name) = change.encode();
            tx.execute_typed(
                "INSERT INTO ferry_feed (origin, kind, host, counter, name) VALUES ($1, $2, $3, $4, $5)",
                &[
                    (&origin, Type::INT8),
                    (&kind, Type::INT2),
                    (&i64::from(id.host), Type::INT8),
                    (&(id.counter as i64), Type::INT8),
                    (&name, Type::BYTEA),
                ],
            )
            .await
        }
    }));
    // Delivered to listeners when (and only if) the transaction commits; a
    // rollback to the I3 savepoint takes it back with the rows. Sent in the
    // same pipeline as the feed rows, so it costs no round trip of its own.
    let notify = tx.execute_typed("SELECT pg_notify('ferry_feed', '')", &[]);
    try_join(feed_rows, notify).await.map_err(err)?;
    Ok(steps)
}

/// The row of `op`'s key, locked for this transaction: version, deleted,
/// then mode (inodes) or child host and counter (entries).
async fn lock_row(
    tx: &Transaction<'_>,
    op: &Op,
) -> Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
    match op.target() {
        FeedChange::Inode(id) => {
            tx.query_typed_opt(
                "SELECT version, deleted, mode, NULL::bigint, NULL::bigint FROM ferry_inodes
                 WHERE host = $1 AND counter = $2 FOR UPDATE",
                &[
                    (&i64::from(id.host), Type::INT8),
                    (&(id.counter as i64), Type::INT8),
                ],
            )
            .await
        }
        FeedChange::Entry { parent, name } => {
            tx.query_typed_opt(
                "SELECT version, deleted, NULL::bigint, child_host, child_counter FROM ferry_entries
                 WHERE parent_host = $1 AND parent_counter = $2 AND name = $3 FOR UPDATE",
                &[
                    (&i64::from(parent.host), Type::INT8),
                    (&(parent.counter as i64), Type::INT8),
                    (&name, Type::BYTEA),
                ],
            )
            .await
        }
    }
}

/// Decodes a row from [`lock_row`].
fn key_row(r: &tokio_postgres::Row, op: &Op) -> Result<KeyRow, BackendError> {
    let what = || format!("row of {:?}", op.target());
    let mode: Option<i64> = get(r, 2, &what)?;
    let child_host: Option<i64> = get(r, 3, &what)?;
    let child_counter: Option<i64> = get(r, 4, &what)?;
    Ok(KeyRow {
        version: stored(get(r, 0, &what)?, &what)?,
        deleted: get(r, 1, &what)?,
        mode: mode.map(|m| stored(m, &what)).transpose()?,
        child: match (child_host, child_counter) {
            (Some(host), Some(counter)) => Some(ObjectId {
                host: stored(host, &what)?,
                counter: counter as u64,
            }),
            _ => None,
        },
    })
}

/// A statement parameter with its type, for the `*_typed` calls: with the
/// types given, the server needs no prepare round trip before the statement.
type Param<'a> = (&'a (dyn ToSql + Sync), Type);

/// Writes `op` at `version` (its base check passed). The statements of one
/// op are pipelined (sent in order without waiting), and carry their
/// parameter types, so the server needs no separate prepare round trip.
async fn write(
    tx: &Transaction<'_>,
    loc: &str,
    origin: i64,
    op: &Op,
    version: i64,
) -> Result<(), BackendError> {
    let err = pg_error(loc, "commit");
    match op {
        Op::PutInode { state: s, .. } => {
            let (host, counter) = (i64::from(s.id.host), s.id.counter as i64);
            let ids = [s.mode, s.uid, s.gid, s.rdev].map(i64::from);
            let size = s.size as i64;
            let xattrs = encode_xattrs(&s.xattrs);
            let params: [Param<'_>; 14] = [
                (&host, Type::INT8),
                (&counter, Type::INT8),
                (&version, Type::INT8),
                (&ids[0], Type::INT8),
                (&ids[1], Type::INT8),
                (&ids[2], Type::INT8),
                (&ids[3], Type::INT8),
                (&size, Type::INT8),
                (&s.atime_ns, Type::INT8),
                (&s.mtime_ns, Type::INT8),
                (&s.ctime_ns, Type::INT8),
                (&s.target, Type::BYTEA),
                (&xattrs, Type::BYTEA),
                (&origin, Type::INT8),
            ];
            let put = tx.execute_typed(
                "INSERT INTO ferry_inodes (host, counter, version, deleted, mode, uid, gid, rdev, size,
                    atime_ns, mtime_ns, ctime_ns, target, xattrs, origin)
                 VALUES ($1, $2, $3, false, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                 ON CONFLICT (host, counter) DO UPDATE SET version = EXCLUDED.version, deleted = false,
                    mode = EXCLUDED.mode, uid = EXCLUDED.uid, gid = EXCLUDED.gid, rdev = EXCLUDED.rdev,
                    size = EXCLUDED.size, atime_ns = EXCLUDED.atime_ns, mtime_ns = EXCLUDED.mtime_ns,
                    ctime_ns = EXCLUDED.ctime_ns, target = EXCLUDED.target, xattrs = EXCLUDED.xattrs,
                    origin = EXCLUDED.origin",
                &params,
            );
            let (_, ()) = try_join(put, replace_chunk_list(tx, &s.id, &s.chunks))
                .await
                .map_err(err)?;
        }
        Op::DeleteInode { id, .. } => {
            let (host, counter) = (i64::from(id.host), id.counter as i64);
            let params: [Param<'_>; 4] = [
                (&host, Type::INT8),
                (&counter, Type::INT8),
                (&version, Type::INT8),
                (&origin, Type::INT8),
            ];
            let tombstone = tx.execute_typed(
                "UPDATE ferry_inodes SET version = $3, deleted = true, origin = $4
                 WHERE host = $1 AND counter = $2",
                &params,
            );
            let (_, ()) = try_join(tombstone, replace_chunk_list(tx, id, &[]))
                .await
                .map_err(err)?;
        }
        Op::PutEntry {
            parent,
            name,
            child,
            ..
        } => {
            tx.execute_typed(
                "INSERT INTO ferry_entries (parent_host, parent_counter, name, child_host, child_counter,
                    version, deleted, origin) VALUES ($1, $2, $3, $4, $5, $6, false, $7)
                 ON CONFLICT (parent_host, parent_counter, name) DO UPDATE SET
                    child_host = EXCLUDED.child_host, child_counter = EXCLUDED.child_counter,
                    version = EXCLUDED.version, deleted = false, origin = EXCLUDED.origin",
                &[
                    (&i64::from(parent.host), Type::INT8),
                    (&(parent.counter as i64), Type::INT8),
                    (name, Type::BYTEA),
                    (&i64::from(child.host), Type::INT8),
                    (&(child.counter as i64), Type::INT8),
                    (&version, Type::INT8),
                    (&origin, Type::INT8),
                ],
            )
            .await
            .map_err(err)?;
        }
        Op::DeleteEntry { parent, name, .. } => {
            tx.execute_typed(
                "UPDATE ferry_entries SET version = $4, deleted = true, origin = $5
                 WHERE parent_host = $1 AND parent_counter = $2 AND name = $3",
                &[
                    (&i64::from(parent.host), Type::INT8),
                    (&(parent.counter as i64), Type::INT8),
                    (name, Type::BYTEA),
                    (&version, Type::INT8),
                    (&origin, Type::INT8),
                ],
            )
            .await
            .map_err(err)?;
        }
    }
    Ok(())
}

/// Replaces the chunk list of inode `id`: the old rows go, then the new
/// ones come in one statement (arrays unnested WITH ORDINALITY give the
/// index). Both are sent at once; the connection runs them in order.
async fn replace_chunk_list(
    tx: &Transaction<'_>,
    id: &ObjectId,
    chunks: &[(ChunkHash, u32)],
) -> Result<(), tokio_postgres::Error> {
    let (host, counter) = (i64::from(id.host), id.counter as i64);
    let key: [Param<'_>; 2] = [(&host, Type::INT8), (&counter, Type::INT8)];
    let delete = tx.execute_typed(
        "DELETE FROM ferry_inode_chunks WHERE host = $1 AND counter = $2",
        &key,
    );
    if chunks.is_empty() {
        return delete.await.map(drop);
    }
    let hashes: Vec<&[u8]> = chunks.iter().map(|(h, _)| &h.0[..]).collect();
    let lens: Vec<i64> = chunks.iter().map(|(_, l)| i64::from(*l)).collect();
    let rows: [Param<'_>; 4] = [
        (&host, Type::INT8),
        (&counter, Type::INT8),
        (&hashes, Type::BYTEA_ARRAY),
        (&lens, Type::INT8_ARRAY),
    ];
    let insert = tx.execute_typed(
        "INSERT INTO ferry_inode_chunks (host, counter, idx, hash, len)
         SELECT $1, $2, (c.i - 1)::int, c.hash, c.len FROM unnest($3::bytea[], $4::bigint[])
            WITH ORDINALITY AS c(hash, len, i)",
        &rows,
    );
    try_join(delete, insert).await.map(drop)
}

/// Schema version stored at the location; 0 if there is no volume table.
async fn schema_version(c: &impl GenericClient, loc: &str) -> Result<u32, BackendError> {
    let err = pg_error(loc, "reading schema version");
    let exists: bool = c
        .query_one("SELECT to_regclass('ferry_volume') IS NOT NULL", &[])
        .await
        .map_err(err)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let row = c
        .query_opt("SELECT schema_version FROM ferry_volume WHERE id = 1", &[])
        .await
        .map_err(err)?;
    row.map_or(Ok(0), |r| {
        stored(i64::from(r.get::<_, i32>(0)), &|| "schema version".into())
    })
}

async fn read_info(c: &impl GenericClient, loc: &str) -> Result<VolumeInfo, BackendError> {
    let row = c
        .query_one(
            "SELECT name, volume_id, schema_version, created_ns FROM ferry_volume WHERE id = 1",
            &[],
        )
        .await
        .map_err(pg_error(loc, "volume info"))?;
    Ok(VolumeInfo {
        name: row.get(0),
        volume_id: row.get(1),
        schema_version: stored(i64::from(row.get::<_, i32>(2)), &|| "schema version".into())?,
        created_ns: row.get(3),
    })
}

async fn max_seq(c: &impl GenericClient, loc: &str) -> Result<u64, BackendError> {
    let seq: i64 = c
        .query_one("SELECT COALESCE(MAX(seq), 0) FROM ferry_feed", &[])
        .await
        .map_err(pg_error(loc, "feed position"))?
        .get(0);
    stored(seq, &|| "feed seq".into())
}

/// Columns [`read_inode`] expects, in order: the row of `ferry_inodes i`,
/// then its chunk list as two arrays (hashes, lengths) that
/// [`INODE_CHUNKS`] joins in, so one row is a whole inode.
const INODE_COLUMNS: &str = "i.host, i.counter, i.version, i.mode, i.uid, i.gid, i.rdev, i.size,
    i.atime_ns, i.mtime_ns, i.ctime_ns, i.target, i.xattrs, i.origin, ch.hashes, ch.lens";

/// The join that gives [`INODE_COLUMNS`] their chunk list (NULL arrays for
/// none).
const INODE_CHUNKS: &str = "CROSS JOIN LATERAL (
    SELECT array_agg(hash ORDER BY idx) AS hashes, array_agg(len ORDER BY idx) AS lens
    FROM ferry_inode_chunks WHERE host = i.host AND counter = i.counter) ch";

/// Decodes an inode row with its chunk list. Every value is range-checked:
/// a garbage row is `Corrupt`, never a panic.
fn read_inode(r: &tokio_postgres::Row) -> Result<InodeState, BackendError> {
    let id = object_id(r, 0, "inode")?;
    let what = || format!("inode {id}");
    let field = |i: usize| -> Result<i64, BackendError> { get(r, i, &what) };
    let xattrs: Vec<u8> = get(r, 12, &what)?;
    let hashes: Vec<Vec<u8>> = get::<Option<_>>(r, 14, &what)?.unwrap_or_default();
    let lens: Vec<i64> = get::<Option<_>>(r, 15, &what)?.unwrap_or_default();
    if hashes.len() != lens.len() {
        return Err(BackendError::corrupt(format!("chunk list of {}", what())));
    }
    let chunks = hashes
        .iter()
        .zip(lens)
        .map(|(hash, len)| {
            let what = || format!("chunk list of inode {id}");
            Ok((ChunkHash::from_stored(hash, &what())?, stored(len, &what)?))
        })
        .collect::<Result<_, BackendError>>()?;
    Ok(InodeState {
        id,
        version: stored(field(2)?, &what)?,
        mode: stored(field(3)?, &what)?,
        uid: stored(field(4)?, &what)?,
        gid: stored(field(5)?, &what)?,
        rdev: stored(field(6)?, &what)?,
        size: stored(field(7)?, &what)?,
        atime_ns: field(8)?,
        mtime_ns: field(9)?,
        ctime_ns: field(10)?,
        target: get(r, 11, &what)?,
        xattrs: decode_xattrs(&xattrs, &id)?,
        chunks,
        origin: stored(field(13)?, &what)?,
    })
}

/// Columns [`read_entry`] expects, in order, from `ferry_entries e`.
const ENTRY_COLUMNS: &str =
    "e.parent_host, e.parent_counter, e.name, e.child_host, e.child_counter, e.version, e.origin";

fn read_entry(r: &tokio_postgres::Row) -> Result<Entry, BackendError> {
    let parent = object_id(r, 0, "entry")?;
    let what = || format!("entry in {parent}");
    Ok(Entry {
        parent,
        name: get(r, 2, &what)?,
        child: object_id(r, 3, "entry child")?,
        version: stored(get(r, 5, &what)?, &what)?,
        origin: stored(get(r, 6, &what)?, &what)?,
    })
}

/// Reads an id from columns `i` (host) and `i + 1` (counter).
fn object_id(r: &tokio_postgres::Row, i: usize, what: &str) -> Result<ObjectId, BackendError> {
    let what = || what.to_owned();
    Ok(ObjectId {
        host: stored(get(r, i, &what)?, &what)?,
        counter: get::<i64>(r, i + 1, &what)? as u64,
    })
}

/// Typed column access that reports a type mismatch as corruption.
fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    r: &'a tokio_postgres::Row,
    i: usize,
    what: &dyn Fn() -> String,
) -> Result<T, BackendError> {
    r.try_get(i)
        .map_err(|e| BackendError::corrupt(format!("{}: column {i}: {e}", what())))
}

/// Runs steps of a call that has no overall limit under [`CALL_TIMEOUT`].
async fn bounded<T>(
    loc: &str,
    what: &str,
    f: impl Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| {
            Err(BackendError::Unreachable {
                location: loc.to_owned(),
                detail: format!("{what} timed out after {CALL_TIMEOUT:?}"),
            })
        })
}

/// Runs a future on a connection under [`CALL_TIMEOUT`].
async fn with_timeout<T>(
    loc: &str,
    what: &str,
    f: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(result) => result.map_err(pg_error(loc, what)),
        Err(_) => Err(BackendError::Unreachable {
            location: loc.to_owned(),
            detail: format!("{what} timed out after {CALL_TIMEOUT:?}"),
        }),
    }
}

/// Maps a tokio-postgres error for call `what` at (redacted) `loc`:
/// connection trouble and server shutdown are transient; class 28 is Auth.
fn pg_error<'a>(
    loc: &'a str,
    what: &'a str,
) -> impl Fn(tokio_postgres::Error) -> BackendError + Copy + 'a {
    move |e| {
        let location = loc.to_owned();
        if let Some(db) = e.as_db_error() {
            let code = db.code().code();
            let detail = format!("{what}: {} ({code})", db.message());
            return match &code[..2] {
                "28" => BackendError::Auth { location, detail },
                // connection exception, insufficient resources (too many
                // connections), operator intervention (shutdown, restart).
                "08" | "53" | "57" => BackendError::Unreachable { location, detail },
                _ => BackendError::other(format!("{location}: {detail}")),
            };
        }
        // tokio-postgres hides the cause of configuration errors in `source`.
        let cause = std::error::Error::source(&e).map(|s| s.to_string());
        let detail = match &cause {
            Some(cause) => format!("{what}: {e}: {cause}"),
            None => format!("{what}: {e}"),
        };
        if cause.as_deref() == Some("password missing") {
            BackendError::Auth { location, detail }
        } else if e.is_closed()
            || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
        {
            BackendError::Unreachable { location, detail }
        } else {
            BackendError::other(format!("{location}: {detail}"))
        }
    }
}

/// Fills in what the URL left out the way libpq would: user from `PGUSER`
/// or `USER`, password from `PGPASSWORD` or the password file (`PGPASSFILE`,
/// default `~/.pgpass`). tokio-postgres reads none of these itself.
fn fill_credentials(config: &mut Config) {
    if config.get_user().is_none() {
        if let Ok(user) = std::env::var("PGUSER").or_else(|_| std::env::var("USER")) {
            config.user(user);
        }
    }
    if config.get_password().is_some() {
        return;
    }
    if let Ok(password) = std::env::var("PGPASSWORD") {
        config.password(password);
        return;
    }
    let file = std::env::var_os("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".pgpass")));
    let Some(contents) = file.and_then(|f| std::fs::read_to_string(f).ok()) else {
        return;
    };
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_owned(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or_default().to_owned();
    let dbname = config.get_dbname().unwrap_or(&user).to_owned();
    if let Some(password) = pgpass_lookup(&contents, [&host, &port, &dbname, &user]) {
        config.password(password);
    }
}

/// Finds the password for (host, port, dbname, user) in `.pgpass` text:
/// lines `host:port:db:user:password`, `*` matches anything, `\` escapes.
fn pgpass_lookup(contents: &str, want: [&str; 4]) -> Option<String> {
    contents.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let mut fields = vec![String::new()];
        let mut chars = line.chars();
        while let Some(ch) = chars.next() {
            match ch {
                '\\' => fields.last_mut()?.push(chars.next()?),
                ':' if fields.len() < 5 => fields.push(String::new()),
                _ => fields.last_mut()?.push(ch),
            }
        }
        let [host, port, db, user, password] = <[String; 5]>::try_from(fields).ok()?;
        let matches = [host, port, db, user]
            .iter()
            .zip(want)
            .all(|(pattern, value)| pattern == "*" || pattern == value);
        matches.then_some(password)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgpass_matches_wildcards_and_escapes() {
        let file = "# comment\n\
                    db.example:5432:ferry:alice:first\n\
                    *:*:*:bob:b\\:ob\\\\pw\n\
                    short:line\n";
        assert_eq!(
            pgpass_lookup(file, ["db.example", "5432", "ferry", "alice"]).as_deref(),
            Some("first")
        );
        assert_eq!(
            pgpass_lookup(file, ["other", "1", "x", "bob"]).as_deref(),
            Some("b:ob\\pw")
        );
        assert_eq!(
            pgpass_lookup(file, ["db.example", "5433", "ferry", "alice"]),
            None
        );
    }
}
