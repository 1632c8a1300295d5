//! The store's redo journal: how a write transaction becomes safe from a
//! crash of the daemon without a SQLite commit of its own.
//!
//! A SQLite commit writes every page the transaction dirtied to the WAL: a
//! create dirties about nine B-tree pages, so it cost 18 `pwrite`s and
//! 37 KB, about a fifth of the daemon's CPU per create (issue 12). Instead,
//! [`crate::store::Store::write`] keeps one SQLite transaction open across
//! many writes (a *batch*, committed every [`BATCH_RECORDS`] writes), and
//! each write appends one *record* here, with a single `pwrite`, before it
//! returns: the statements it executed, with their parameters and how many
//! rows each changed. Once that `pwrite` returned, the write survives a
//! `kill -9` exactly as a commit did with `synchronous=NORMAL` (both sit in
//! the page cache); [`Syncer::sync`] makes it survive power loss.
//!
//! After a crash the store is its last committed batch, and the records
//! after it are replayed in order ([`replay`]). Replaying the same
//! statements with the same parameters on the same state yields the same
//! state — the transaction's reads and decisions happened once, in Rust,
//! and what came of them is in the parameters — and each statement must
//! change as many rows as it did the first time, or the store is refused as
//! corrupt rather than silently diverging.
//!
//! The file is written from its start again (a new *epoch*) once it passes
//! [`WRAP_BYTES`], right after a batch commit that recorded the new epoch
//! and was made durable: every record older than that commit is in it.
//! Opening the store does the same after its replay, so whatever a crash
//! left beyond the last good record (a torn write, or after a power cut,
//! pages of unsynced records that did reach the disk) can never be read as
//! part of a later history.
//!
//! Records carry their epoch, a sequence number and how far the journal was
//! synced when they were written. A reader applies the records that follow
//! the store's last one in order, and stops where they end: the zeros after
//! the last, a write the crash cut short (never acknowledged), or after a
//! power cut a record that was not synced. A record missing or damaged
//! where a later one says it had been synced is corruption, and refused;
//! so is a record that fails to change, on replay, the rows it changed.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{Connection, ToSql};

/// Writes per batch: the SQLite transaction commits after this many
/// records. A batch's dirty pages are written once for all of them (the
/// same leaf pages of the inode, entry and log tables, mostly), and replay
/// after a crash never has more than this to do.
pub const BATCH_RECORDS: u32 = 256;

/// Record bytes after which the batch commits even if it holds fewer
/// records (a pull of a large tree writes big ones).
pub const BATCH_BYTES: u64 = 1 << 20;

/// Journal size at which the next batch commit starts a new epoch at
/// offset 0. The file is written full of zeros to this size when made, so
/// an append is a plain overwrite: its `fdatasync` flushes no size or
/// extent change (as SQLite's reused WAL does not), and on a full disk an
/// unlink can still be recorded, as it could be committed.
pub const WRAP_BYTES: u64 = 2 << 20;

/// The page size the journal is written in (see [`zero_fill`]).
const PAGE: usize = 4096;

/// `"FJRN"`: the start of every record.
const MAGIC: u32 = 0x464a_524e;

/// magic, payload length, epoch, sequence number, synced-through sequence
/// number, 16 bytes of BLAKE3 over the rest.
const HEADER: usize = 4 + 4 + 8 + 8 + 8 + 16;

/// The largest payload a writer makes and a reader believes.
const MAX_PAYLOAD: usize = 1 << 30;

/// The largest journal a reader reads: a full one plus one record.
const MAX_FILE: u64 = WRAP_BYTES + (HEADER + MAX_PAYLOAD) as u64;

/// Where the journal stands in the store's `meta` table, written by the
/// batch commit that covers it ([`record_position`]).
const META_EPOCH: &str = "journal_epoch";
/// The last record whose statements are in the committed store.
const META_APPLIED: &str = "journal_applied";

/// The journal file of one store. Not synchronized: the store's connection
/// lock guards it.
pub struct Journal {
    file: File,
    path: PathBuf,
    epoch: u64,
    /// Sequence number of the next record.
    next: u64,
    /// Where the next record goes.
    offset: u64,
    /// What [`Syncer`] shares.
    marks: Arc<Marks>,
}

/// The last record appended and the last one known synced.
#[derive(Default)]
struct Marks {
    appended: AtomicU64,
    synced: AtomicU64,
}

/// Makes the journal durable against power loss, from any thread, without
/// the store's lock.
pub struct Syncer {
    file: File,
    marks: Arc<Marks>,
}

impl Syncer {
    /// Syncs every record appended so far; nothing when that is done
    /// already (an fsync loop on one open file costs the journal nothing
    /// after its first write).
    pub fn sync(&self) -> io::Result<()> {
        // Read before the sync: a record after this point is not covered.
        let upto = self.marks.appended.load(Ordering::SeqCst);
        if self.marks.synced.load(Ordering::SeqCst) >= upto {
            return Ok(());
        }
        self.file.sync_data()?;
        self.marks.synced.fetch_max(upto, Ordering::SeqCst);
        Ok(())
    }
}

/// Why the journal cannot be replayed.
#[derive(Debug)]
pub enum ReplayError {
    /// Reading it failed.
    Io(io::Error),
    /// A statement failed.
    Db(rusqlite::Error),
    /// The journal does not hold together: a synced record is missing or
    /// damaged, or replay changed other rows than the first run did.
    Damaged(String),
}

impl std::fmt::Display for ReplayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplayError::Io(e) => write!(f, "reading the journal: {e}"),
            ReplayError::Db(e) => write!(f, "replaying the journal: {e}"),
            ReplayError::Damaged(what) => write!(f, "the journal is damaged: {what}"),
        }
    }
}

impl From<rusqlite::Error> for ReplayError {
    fn from(e: rusqlite::Error) -> ReplayError {
        ReplayError::Db(e)
    }
}

impl From<io::Error> for ReplayError {
    fn from(e: io::Error) -> ReplayError {
        ReplayError::Io(e)
    }
}

impl Journal {
    /// Makes an empty journal at `path` (replacing any file there, which
    /// belongs to no store: see [`crate::store`]'s version 4) and syncs it
    /// and its directory, so a store that records a journal always has one.
    pub fn create(path: &Path) -> io::Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        zero_fill(&file, 0)?;
        file.sync_all()?;
        match path.parent() {
            Some(dir) => File::open(dir)?.sync_all(),
            None => Ok(()),
        }
    }

    /// Opens the journal at `path`, which must exist. Appends start where
    /// [`replay`] says.
    pub fn open(path: &Path) -> io::Result<Journal> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        small_pages(&file)?;
        let len = file.metadata()?.len();
        zero_fill(&file, len)?;
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            epoch: 0,
            next: 1,
            offset: 0,
            marks: Arc::default(),
        })
    }

    /// What syncs this journal from other threads.
    pub fn syncer(&self) -> io::Result<Syncer> {
        Ok(Syncer {
            file: self.file.try_clone()?,
            marks: Arc::clone(&self.marks),
        })
    }

    /// Appends one record (a [`Record`]'s bytes) as the next of this epoch.
    /// On error nothing counts: the next append goes to the same place.
    pub fn append(&mut self, record: &Record) -> io::Result<()> {
        let payload = &record.0;
        if payload.len() > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a store write of {} bytes is too large to journal",
                    payload.len()
                ),
            ));
        }
        let synced = self.marks.synced.load(Ordering::SeqCst);
        let mut buf = Vec::with_capacity(HEADER + payload.len());
        buf.extend_from_slice(&MAGIC.to_le_bytes());
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&self.epoch.to_le_bytes());
        buf.extend_from_slice(&self.next.to_le_bytes());
        buf.extend_from_slice(&synced.to_le_bytes());
        buf.extend_from_slice(&digest(&buf[4..], payload));
        buf.extend_from_slice(payload);
        self.file.write_all_at(&buf, self.offset)?;
        self.offset += buf.len() as u64;
        self.marks.appended.store(self.next, Ordering::SeqCst);
        self.next += 1;
        Ok(())
    }

    /// The last record appended (0: none yet), which a batch commit
    /// records as applied.
    pub fn last(&self) -> u64 {
        self.next - 1
    }

    /// The epoch records are written in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the next batch commit should start a new epoch.
    pub fn full(&self) -> bool {
        self.offset >= WRAP_BYTES
    }

    /// Whether this epoch holds records.
    pub fn holds_records(&self) -> bool {
        self.offset > 0
    }

    /// Starts epoch `epoch` at offset 0. The caller has made the commit
    /// that recorded it durable, with every record before it applied, so
    /// every record so far is as good as synced.
    pub fn restart(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.offset = 0;
        self.marks.synced.fetch_max(self.last(), Ordering::SeqCst);
    }

    /// The journal's file, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes zeros from `from` to [`WRAP_BYTES`]: not a hole or fallocate's
/// unwritten extents, either of which would make each append's sync write
/// metadata. A reader stops at them (a zero magic is no record).
///
/// One page per `pwrite`: the page cache sizes a folio by the write that
/// makes it, and ext4 walks every block of a folio on each write into it,
/// so one 2 MiB write would make every later append of a kilobyte cost
/// 5.3 µs instead of 1.75 µs (measured here, kernel 6.18).
fn zero_fill(file: &File, from: u64) -> io::Result<()> {
    let page = [0u8; PAGE];
    let mut at = from;
    while at < WRAP_BYTES {
        let end = (at / PAGE as u64 + 1) * PAGE as u64;
        file.write_all_at(&page[..(end.min(WRAP_BYTES) - at) as usize], at)?;
        at = end;
    }
    Ok(())
}

/// Has the journal's cached pages read back in page-sized folios (see
/// [`zero_fill`]): whatever a large write or readahead made before, by an
/// older build or another process, is written back and dropped, and no
/// readahead makes large ones again. The content is unchanged: dropping
/// clean pages only means the next read comes from the disk.
fn small_pages(file: &File) -> io::Result<()> {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    file.sync_data()?;
    for advice in [
        PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        PosixFadviseAdvice::POSIX_FADV_RANDOM,
    ] {
        posix_fadvise(file, 0, 0, advice).map_err(io::Error::from)?;
    }
    Ok(())
}

/// One write's statements, encoded as they run: for each, the SQL text,
/// the rows it changed and its parameters.
#[derive(Default)]
pub struct Record(Vec<u8>);

impl Record {
    /// Whether no statement was recorded (a write that changed nothing).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes recorded so far.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Adds a statement that changed `changes` rows.
    pub fn push(&mut self, sql: &str, params: &[&dyn ToSql], changes: u64) -> rusqlite::Result<()> {
        let out = &mut self.0;
        put_bytes(out, sql.as_bytes());
        out.extend_from_slice(&changes.to_le_bytes());
        out.extend_from_slice(&(params.len() as u16).to_le_bytes());
        for p in params {
            let out_value = p.to_sql()?;
            let value = match out_value {
                ToSqlOutput::Borrowed(v) => v,
                ToSqlOutput::Owned(ref v) => ValueRef::from(v),
                _ => return Err(rusqlite::Error::InvalidParameterCount(0, params.len())),
            };
            match value {
                ValueRef::Null => out.push(0),
                ValueRef::Integer(i) => {
                    out.push(1);
                    out.extend_from_slice(&i.to_le_bytes());
                }
                ValueRef::Real(r) => {
                    out.push(2);
                    out.extend_from_slice(&r.to_bits().to_le_bytes());
                }
                ValueRef::Text(t) => {
                    out.push(3);
                    put_bytes(out, t);
                }
                ValueRef::Blob(b) => {
                    out.push(4);
                    put_bytes(out, b);
                }
            }
        }
        Ok(())
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn digest(header: &[u8], payload: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(header);
    h.update(payload);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// Records, in the transaction open on `conn`, that the store holds every
/// record through `applied`, and with `epoch` that the journal goes on in
/// that epoch: what a batch commit and a replay commit with their changes.
pub fn record_position(
    conn: &Connection,
    applied: u64,
    epoch: Option<u64>,
) -> rusqlite::Result<()> {
    let set = "UPDATE meta SET value=?2 WHERE key=?1";
    conn.prepare_cached(set)?
        .execute(rusqlite::params![META_APPLIED, applied as i64])?;
    if let Some(epoch) = epoch {
        conn.prepare_cached(set)?
            .execute(rusqlite::params![META_EPOCH, epoch as i64])?;
    }
    Ok(())
}

/// Brings the store on `conn` (no transaction open) up to the journal:
/// applies, in one transaction, every record of the store's epoch after
/// the last one it holds, and positions `journal` after the last of them.
/// Returns how many records it applied.
pub fn replay(conn: &Connection, journal: &mut Journal) -> Result<u64, ReplayError> {
    let meta = |key: &str| -> Result<u64, ReplayError> {
        let v: i64 = conn.query_row("SELECT value FROM meta WHERE key=?1", [key], |r| r.get(0))?;
        u64::try_from(v).map_err(|_| ReplayError::Damaged(format!("{key} is {v}")))
    };
    let (epoch, applied) = (meta(META_EPOCH)?, meta(META_APPLIED)?);
    let len = journal.file.metadata()?.len();
    if len > MAX_FILE {
        return Err(ReplayError::Damaged(format!("{len} bytes")));
    }
    let mut bytes = vec![0; len as usize];
    journal.file.read_exact_at(&mut bytes, 0)?;
    let (mut offset, mut last, mut todo) = (0, applied, Vec::new());
    loop {
        if let Some((rec, len)) = parse(&bytes[offset..], epoch) {
            if rec.seq > applied {
                if Some(rec.seq) != last.checked_add(1) {
                    return Err(ReplayError::Damaged(format!(
                        "record {} follows record {last}",
                        rec.seq
                    )));
                }
                todo.push(rec.payload);
            }
            last = last.max(rec.seq);
            offset += len;
            continue;
        }
        // No record here: the end, or a gap. What the records of this
        // epoch after it say decides which.
        let Some((at, next)) = next_record(&bytes, offset + 1, epoch) else {
            break;
        };
        // A damaged record the store already holds costs nothing.
        if next.seq <= applied.saturating_add(1) {
            offset = at;
            continue;
        }
        let (mut from, mut synced) = (at, 0);
        while let Some((at, rec)) = next_record(&bytes, from, epoch) {
            synced = synced.max(rec.synced);
            from = at + 1;
        }
        if synced > last {
            return Err(ReplayError::Damaged(format!(
                "record {} at byte {offset} is missing or damaged, and a later record says records up to {synced} were synced",
                last.saturating_add(1),
            )));
        }
        // A torn last write, or records a power cut kept although an
        // earlier unsynced one was lost: none was synced, so none was
        // promised.
        break;
    }
    if !todo.is_empty() {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let applying = (|| -> Result<(), ReplayError> {
            for payload in &todo {
                apply(conn, payload)?;
            }
            Ok(record_position(conn, last, None)?)
        })();
        match applying {
            Ok(()) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
    }
    journal.epoch = epoch;
    journal.next = last
        .checked_add(1)
        .ok_or_else(|| ReplayError::Damaged("record numbers run out".into()))?;
    journal.offset = offset as u64;
    journal.marks.appended.store(last, Ordering::SeqCst);
    Ok(todo.len() as u64)
}

/// A record read back.
struct Parsed<'a> {
    seq: u64,
    synced: u64,
    payload: &'a [u8],
}

/// The record at the start of `bytes` if it is a whole, intact record of
/// `epoch`, with its length on disk.
fn parse(bytes: &[u8], epoch: u64) -> Option<(Parsed<'_>, usize)> {
    let header = bytes.get(..HEADER)?;
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap());
    if u32_at(0) != MAGIC || u64_at(8) != epoch {
        return None;
    }
    let len = HEADER.checked_add(u32_at(4) as usize)?;
    let payload = bytes.get(HEADER..len)?;
    let intact = digest(&header[4..HEADER - 16], payload) == header[HEADER - 16..];
    intact.then_some((
        Parsed {
            seq: u64_at(16),
            synced: u64_at(24),
            payload,
        },
        len,
    ))
}

/// The first intact record of `epoch` at or after `from`, and where it is.
fn next_record(bytes: &[u8], from: usize, epoch: u64) -> Option<(usize, Parsed<'_>)> {
    let magic = MAGIC.to_le_bytes();
    let mut at = from;
    while let Some(found) = bytes.get(at..)?.windows(4).position(|w| w == magic) {
        at += found;
        if let Some((rec, _)) = parse(&bytes[at..], epoch) {
            return Some((at, rec));
        }
        at += 1;
    }
    None
}

/// Runs the statements of one record, checking each changes what it did.
fn apply(conn: &Connection, mut payload: &[u8]) -> Result<(), ReplayError> {
    let bad = || ReplayError::Damaged("a record does not decode".into());
    while !payload.is_empty() {
        let sql =
            std::str::from_utf8(take_bytes(&mut payload).ok_or_else(bad)?).map_err(|_| bad())?;
        let changes = u64::from_le_bytes(take_array(&mut payload).ok_or_else(bad)?);
        let n = u16::from_le_bytes(take_array(&mut payload).ok_or_else(bad)?);
        let mut params = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let [tag] = take_array(&mut payload).ok_or_else(bad)?;
            params.push(match tag {
                0 => Value::Null,
                1 => Value::Integer(i64::from_le_bytes(
                    take_array(&mut payload).ok_or_else(bad)?,
                )),
                2 => Value::Real(f64::from_bits(u64::from_le_bytes(
                    take_array(&mut payload).ok_or_else(bad)?,
                ))),
                3 => Value::Text(
                    String::from_utf8(take_bytes(&mut payload).ok_or_else(bad)?.to_vec())
                        .map_err(|_| bad())?,
                ),
                4 => Value::Blob(take_bytes(&mut payload).ok_or_else(bad)?.to_vec()),
                _ => return Err(bad()),
            });
        }
        let changed = run(conn, sql, rusqlite::params_from_iter(params.iter()))?;
        if changed != changes {
            return Err(ReplayError::Damaged(format!(
                "`{sql}` changed {changed} rows on replay, {changes} the first time"
            )));
        }
    }
    Ok(())
}

/// Runs one statement to its end (rows it returns are dropped) and counts
/// the rows it changed.
pub fn run(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<u64> {
    let before = conn.total_changes();
    {
        let mut stmt = conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params)?;
        while rows.next()?.is_some() {}
    }
    Ok(conn.total_changes() - before)
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (head, tail) = b.split_at(n);
    *b = tail;
    Some(head)
}

fn take_array<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
    take(b, N)?.try_into().ok()
}

fn take_bytes<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = u32::from_le_bytes(take_array(b)?);
    take(b, n as usize)
}

#[cfg(test)]
mod tests {
    //! The journal's promise, attacked: a write that returned survives
    //! `kill -9` at any moment (inside a batch commit, a journal wrap or the
    //! replay of an earlier crash), and a write that did not return is
    //! there whole or not at all. A child process runs a seeded sequence of
    //! writes and says which returned; the parent kills it at a random one,
    //! reopens the store and compares it with a model of the sequence.

    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use rusqlite::Connection;

    use crate::store::{NewInode, Queries, Store, ROOT_INO};

    const CHILD_DIR: &str = "FERRY_JOURNAL_CHILD_DIR";
    const CHILD_SEED: &str = "FERRY_JOURNAL_CHILD_SEED";

    /// Names the writes play with: few enough that they collide often.
    const NAMES: u64 = 48;

    fn step(x: &mut u64) -> u64 {
        // xorshift64*: the same sequence in parent and child.
        *x ^= *x >> 12;
        *x ^= *x << 25;
        *x ^= *x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Write `i` of the sequence seeded `seed`: two names it involves.
    fn op(seed: u64, i: u64) -> (u64, u64) {
        let mut x = seed ^ (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (step(&mut x) % NAMES, step(&mut x) % NAMES)
    }

    fn name(k: u64) -> Vec<u8> {
        format!("n{k}").into_bytes()
    }

    /// The model: each name, and the write that created what it names.
    type Model = BTreeMap<u64, u64>;

    /// Write `i`: `a` absent: create it (its uid records `i`); `a` there
    /// and `b` absent: rename `a` to `b`; both there: unlink `a`. And the
    /// count of writes done, in the same transaction.
    fn play(model: &mut Model, i: u64, (a, b): (u64, u64)) {
        match (model.get(&a).copied(), model.contains_key(&b)) {
            (None, _) => {
                model.insert(a, i);
            }
            (Some(tag), false) => {
                model.remove(&a);
                model.insert(b, tag);
            }
            (Some(_), true) => {
                model.remove(&a);
            }
        }
    }

    fn write(store: &Store, i: u64, (a, b): (u64, u64)) {
        store
            .write(|tx| -> rusqlite::Result<()> {
                match (
                    tx.lookup(ROOT_INO, &name(a))?,
                    tx.lookup(ROOT_INO, &name(b))?,
                ) {
                    (None, _) => {
                        let new = NewInode {
                            mode: libc::S_IFREG | 0o644,
                            uid: i as u32,
                            gid: 0,
                            rdev: 0,
                            target: None,
                        };
                        let ino = tx.create(ROOT_INO, &name(a), &new, None)?.ino;
                        if let Some(value) = tag_xattr(i) {
                            tx.set_xattr(ino, TAG, &value)?;
                        }
                    }
                    (Some(moved), None) if a != b => {
                        tx.rename(ROOT_INO, &name(a), ROOT_INO, &name(b), &moved)?;
                    }
                    (Some(victim), _) => {
                        tx.unlink(ROOT_INO, &name(a), &victim)?;
                        tx.delete(victim.ino)?;
                    }
                }
                tx.set_meta_int("test_writes", i as i64 + 1)
            })
            .expect("a write");
    }

    /// The xattr a create by write `i` sets, if it sets one: every third,
    /// so the store's index of inodes with xattrs is attacked too (a
    /// reopen, a replay).
    fn tag_xattr(i: u64) -> Option<[u8; 8]> {
        i.is_multiple_of(3).then(|| i.to_le_bytes())
    }

    const TAG: &[u8] = b"user.tag";

    /// The count of writes done and the names, after checking that each
    /// file has exactly the xattrs its create gave it.
    fn state(store: &Store) -> (u64, Model) {
        store.read(|r| {
            let done = r.meta_int("test_writes").unwrap().unwrap_or(0) as u64;
            let names = r
                .entries(ROOT_INO, 0, 1000)
                .unwrap()
                .into_iter()
                .map(|e| {
                    let k = std::str::from_utf8(&e.name[1..]).unwrap().parse().unwrap();
                    let tag = u64::from(e.inode.uid);
                    let want = tag_xattr(tag).map(Vec::from);
                    assert_eq!(r.xattr(e.inode.ino, TAG).unwrap(), want, "n{k}");
                    let names = r.xattr_names(e.inode.ino).unwrap();
                    assert_eq!(names, want.iter().map(|_| TAG.to_vec()).collect::<Vec<_>>());
                    (k, tag)
                })
                .collect();
            (done, names)
        })
    }

    /// The child: runs the sequence from where the store stands, printing
    /// the index of each write once it returned.
    #[test]
    #[ignore = "run by journal_survives_kill_9_anywhere"]
    fn journal_child() {
        let (Ok(dir), Ok(seed)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_SEED)) else {
            return;
        };
        let seed: u64 = seed.parse().unwrap();
        let store = Store::open(std::path::Path::new(&dir)).unwrap();
        let (done, _) = state(&store);
        let mut out = std::io::stdout().lock();
        for i in done..done + 1_000_000 {
            write(&store, i, op(seed, i));
            use std::io::Write;
            writeln!(out, "{i}").unwrap();
            out.flush().unwrap();
        }
    }

    /// A path for a store of this test process, with nothing there.
    fn fresh_dir(what: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-journal-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// A copy of the store files in `dir`, to check without touching what
    /// the crash left for the next child to replay.
    fn snapshot(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
        let to = dir.with_extension(name);
        let _ = std::fs::remove_dir_all(&to);
        std::fs::create_dir_all(to.join("data")).unwrap();
        for f in ["meta.db", "meta.db-wal", "journal"] {
            if dir.join(f).exists() {
                std::fs::copy(dir.join(f), to.join(f)).unwrap();
            }
        }
        to
    }

    #[test]
    fn journal_survives_kill_9_anywhere() {
        let seed = crate::store::now() as u64 | 1;
        let dir = fresh_dir(&seed.to_string());
        let mut rng = seed;
        let mut before = 0;
        for round in 0..16 {
            // Up to 20,000 writes a round: dozens of batch commits, and
            // journal wraps (one per 3,500 writes or so); one round in four
            // is killed on a timer instead, often inside the replay of the
            // last crash or the new epoch that follows it.
            let timer = step(&mut rng).is_multiple_of(4);
            let target = before + step(&mut rng) % 20_000;
            let pause = std::time::Duration::from_micros(step(&mut rng) % 20_000);
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "journal::tests::journal_child",
                    "--ignored",
                    "--nocapture",
                ])
                .env(CHILD_DIR, &dir)
                .env(CHILD_SEED, seed.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            // Every write the child said returned counts, including those
            // it said after the parent stopped listening and before the kill.
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let mut acked = None;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            let mut heard = |lines: &mut dyn Iterator<Item = std::io::Result<String>>,
                             stop: bool| {
                for line in lines {
                    // Skip the test harness's own lines.
                    if let Ok(Ok(i)) = line.map(|l| l.trim().parse::<u64>()) {
                        acked = Some(i);
                        if stop && (i >= target || std::time::Instant::now() > deadline) {
                            return;
                        }
                    }
                }
            };
            if timer {
                std::thread::sleep(pause);
            } else {
                heard(&mut lines, true);
            }
            child.kill().unwrap();
            child.wait().unwrap();
            heard(&mut lines, false);
            let copy = snapshot(&dir, "check");
            let store = Store::open(&copy).unwrap_or_else(|e| panic!("round {round}: {e}"));
            let (done, names) = state(&store);
            let acked = acked.map_or(before, |i| i + 1);
            assert!(
                done == acked || done == acked + 1,
                "seed {seed} round {round}: {acked} writes returned, the store holds {done}"
            );
            let mut model = Model::new();
            for i in 0..done {
                play(&mut model, i, op(seed, i));
            }
            assert_eq!(
                names, model,
                "seed {seed} round {round}: after {done} writes"
            );
            // The change log still describes the store: one record per
            // name change, in order, nothing missing after the crash.
            let logged: u64 = store.read(|r| {
                r.conn()
                    .query_row("SELECT count(*) FROM log", [], |row| row.get::<_, i64>(0))
                    .unwrap() as u64
            });
            assert!(
                logged >= done,
                "seed {seed} round {round}: {logged} log records for {done} writes"
            );
            drop(store);
            let _ = std::fs::remove_dir_all(&copy);
            before = done;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_lost_batch_is_replayed_from_the_journal() {
        let dir = fresh_dir("lost");
        let store = Store::open(&dir).unwrap();
        let mut model = Model::new();
        for i in 0..10 {
            write(&store, i, op(7, i));
            play(&mut model, i, op(7, i));
        }
        // What SQLite does on a full disk or an I/O error: the whole open
        // transaction rolled back under the store.
        let failed = store.write(|tx| -> rusqlite::Result<()> {
            tx.conn().execute_batch("ROLLBACK")?;
            Err(rusqlite::Error::InvalidQuery)
        });
        assert!(failed.is_err());
        assert_eq!(
            state(&store),
            (10, model.clone()),
            "reads see every write that returned"
        );
        write(&store, 10, op(7, 10));
        play(&mut model, 10, op(7, 10));
        drop(store);
        let store = Store::open(&dir).unwrap();
        assert_eq!(state(&store), (11, model));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn damage_before_valid_records_is_refused() {
        let dir = fresh_dir("damage");
        let store = Store::open(&dir).unwrap();
        for i in 0..3 {
            write(&store, i, op(9, i));
        }
        store.sync().unwrap();
        for i in 3..5 {
            write(&store, i, op(9, i));
        }
        // A crash: the batch never commits. The leaked store keeps its lock,
        // so each case opens a copy of what the crash left.
        std::mem::forget(store);
        let journal = std::fs::read(dir.join("journal")).unwrap();
        let case = |name: &str, bytes: &[u8]| {
            let to = snapshot(&dir, name);
            std::fs::write(to.join("journal"), bytes).unwrap();
            to
        };
        // Where each record starts (the file is zeros after the last).
        let mut starts = vec![0];
        while let Some((_, len)) =
            super::parse(&journal[*starts.last().unwrap()..], epoch_of(&journal))
        {
            starts.push(starts.last().unwrap() + len);
        }
        assert_eq!(starts.len(), 6, "five records and the end");
        // A torn tail is no damage: the last write is simply not there...
        // (Cut inside the SQL text: zeros would refill a cut that only
        // took zeros, and the record would be whole again.)
        let torn = case("torn", &journal[..starts[4] + super::HEADER + 8]);
        let store = Store::open(&torn).unwrap();
        assert_eq!(
            state(&store).0,
            4,
            "the torn write is dropped, the others replayed"
        );
        drop(store);
        // ...nor is the loss of a record no later one says was synced
        // (the fourth: records 4 and 5 were written after the sync of 3)...
        let mut lost = journal.clone();
        lost[starts[3] + super::HEADER + 2] ^= 0xff;
        let unsynced = case("unsynced", &lost);
        let store = Store::open(&unsynced).unwrap();
        assert_eq!(
            state(&store).0,
            3,
            "what follows an unsynced gap is not replayed"
        );
        drop(store);
        // ...and damage in a record the store already holds is harmless
        // (the torn copy's replay committed records 1 to 4).
        let mut held = std::fs::read(torn.join("journal")).unwrap();
        held[super::HEADER + 2] ^= 0xff;
        std::fs::write(torn.join("journal"), &held).unwrap();
        let store = Store::open(&torn).unwrap();
        assert_eq!(state(&store).0, 4);
        drop(store);
        // But damage in the first record, which the later ones say was
        // synced, is refused.
        let mut bytes = journal.clone();
        bytes[super::HEADER + 2] ^= 0xff;
        let damaged = case("damaged", &bytes);
        let err = Store::open(&damaged).err().expect("refused").to_string();
        assert!(err.contains("journal is damaged"), "{err}");
        for d in [&dir, &torn, &unsynced, &damaged] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    #[test]
    fn a_store_of_format_3_gets_its_journal_and_one_without_is_refused() {
        let dir = fresh_dir("v3");
        let store = Store::open(&dir).unwrap();
        write(&store, 0, op(3, 0));
        drop(store);
        // What a build of format 3 left: no journal, no journal rows (and
        // no tables of spares and reserved numbers, which formats 5 and 6
        // added).
        let conn = Connection::open(dir.join("meta.db")).unwrap();
        conn.execute_batch(
            "DELETE FROM meta WHERE key IN ('journal_epoch', 'journal_applied');
             DROP TABLE spare;
             DROP TABLE reserved;
             PRAGMA user_version=3;",
        )
        .unwrap();
        drop(conn);
        std::fs::remove_file(dir.join("journal")).unwrap();
        let store = Store::open(&dir).unwrap();
        write(&store, 1, op(3, 1));
        let mut model = Model::new();
        play(&mut model, 0, op(3, 0));
        play(&mut model, 1, op(3, 1));
        assert_eq!(state(&store), (2, model));
        drop(store);
        // A store of format 4 never lacks its journal; one that does (copied
        // without it, say) may lack writes, so it is refused.
        std::fs::remove_file(dir.join("journal")).unwrap();
        let err = Store::open(&dir).err().expect("refused").to_string();
        assert!(err.contains("journal is missing"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The epoch of the journal's first record.
    fn epoch_of(journal: &[u8]) -> u64 {
        u64::from_le_bytes(journal[8..16].try_into().unwrap())
    }
}
