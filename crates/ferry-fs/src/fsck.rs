//! Offline consistency check: does the change log describe exactly the
//! store?
//!
//! The log is replayed from an empty volume into a model of the namespace,
//! which must equal the directory entries in the store; every inode's
//! version must be one more than its number of records; link counts must
//! match the entries; every regular file must have its data file. Run with
//! the daemon stopped (opening the store takes its lock).
//!
//! [`verify`] goes further and reads file contents: every cached file whose
//! bytes were shipped and not changed since has a chunk list (BLAKE3 per
//! chunk, and [`HOLE`] runs that must read as zeros) that its data file must
//! still match, so bit rot in the store's file system is found before it is
//! served or shipped again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ferry_backend::ChunkHash;
use rusqlite::OptionalExtension;

use crate::error::StoreError;
use crate::ids::{Ino, Seq};
use crate::log::{Change, LogRecord};
use crate::replicate::HOLE;
use crate::store::{Kind, Queries, Store, ROOT_INO};

/// What a clean check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Inodes in the store.
    pub inodes: u64,
    /// Directory entries.
    pub entries: u64,
    /// Log records replayed.
    pub records: u64,
    /// Data files with no inode that are neither listed spares nor at
    /// reserved numbers: left by a crash between creating the file and
    /// committing its inode, harmless.
    pub stray_data_files: u64,
}

/// Checks the store in `dir`; an error names the first inconsistency.
pub fn check(dir: &Path) -> Result<Report, StoreError> {
    let store = Store::open_existing(dir)?;
    let corrupt = |detail: String| StoreError::Corrupt {
        path: dir.to_path_buf(),
        detail,
    };
    let db = |e| StoreError::db(dir, e);
    store.read(|r| -> Result<Report, StoreError> {
        let conn = r.conn();
        // Replay.
        let mut names: Names = BTreeMap::new();
        let mut live: HashSet<Ino> = HashSet::from([ROOT_INO]);
        let mut records: HashMap<Ino, u64> = HashMap::new();
        let mut replayed = 0u64;
        let mut after = Seq(0);
        // Bounded by the log's length: each page moves `after` forward.
        loop {
            let page = r.log_after(after, 4096).map_err(db)?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for rec in &page {
                replay(rec, &mut names, &mut live, &mut records).map_err(corrupt)?;
                replayed += 1;
            }
        }

        // Compare the replayed namespace with the store's entries.
        let mut stmt = conn
            .prepare("SELECT parent, name, ino FROM dentry")
            .map_err(db)?;
        let stored: Names = stmt
            .query_map([], |r| {
                Ok(((r.get(0)?, r.get::<_, Vec<u8>>(1)?), r.get(2)?))
            })
            .map_err(db)?
            .collect::<Result<_, _>>()
            .map_err(db)?;
        if stored != names {
            let missing = names.iter().find(|(k, v)| stored.get(*k) != Some(v));
            let extra = stored.iter().find(|(k, v)| names.get(*k) != Some(v));
            return Err(corrupt(format!(
                "namespace differs from its log: log has {missing:?}, store has {extra:?}"
            )));
        }

        // Inodes: the live set, versions, link counts, data files.
        let mut stmt = conn.prepare("SELECT ino FROM inode").map_err(db)?;
        let inos: HashSet<Ino> = stmt
            .query_map([], |r| r.get(0))
            .map_err(db)?
            .collect::<Result<_, _>>()
            .map_err(db)?;
        if inos != live {
            let diff: Vec<_> = inos.symmetric_difference(&live).take(5).collect();
            return Err(corrupt(format!(
                "inode set differs from its log at {diff:?}"
            )));
        }
        let mut links: HashMap<Ino, u32> = HashMap::new();
        let mut subdirs: HashMap<Ino, u32> = HashMap::new();
        for ((parent, _), ino) in &stored {
            *links.entry(*ino).or_default() += 1;
            let kind = r.inode(*ino).map_err(db)?.map(|i| i.kind());
            if kind == Some(Kind::Dir) {
                *subdirs.entry(*parent).or_default() += 1;
            }
        }
        for &ino in &inos {
            let inode = r
                .inode(ino)
                .map_err(db)?
                .ok_or_else(|| corrupt(format!("inode {ino} vanished")))?;
            let expected_version = 1 + records.get(&ino).copied().unwrap_or(0);
            if inode.version != expected_version {
                return Err(corrupt(format!(
                    "inode {ino} is at version {} but its log has {} records",
                    inode.version,
                    expected_version - 1
                )));
            }
            let expected_nlink = match inode.kind() {
                Kind::Dir if inode.nlink == 0 => 0,
                Kind::Dir => 2 + subdirs.get(&ino).copied().unwrap_or(0),
                _ => links.get(&ino).copied().unwrap_or(0),
            };
            if inode.nlink != expected_nlink {
                return Err(corrupt(format!(
                    "inode {ino} has nlink {} but {expected_nlink} entries",
                    inode.nlink
                )));
            }
            if inode.kind() == Kind::File && inode.cached && !store.data_path(ino).exists() {
                return Err(corrupt(format!("regular file {ino} has no data file")));
            }
        }
        let spares: HashSet<Ino> = r.spares().map_err(db)?.into_iter().collect();
        if let Some(ino) = spares.intersection(&inos).next() {
            return Err(corrupt(format!(
                "the data file of live inode {ino} is listed as a spare"
            )));
        }
        let reserved: HashSet<Ino> = r.reserved().map_err(db)?.into_iter().collect();
        if let Some(ino) = reserved.intersection(&inos).next() {
            return Err(corrupt(format!("live inode {ino} has a reserved number")));
        }
        let sequence = r.sequence("inode").map_err(db)?;
        if let Some(ino) = reserved.iter().find(|i| i.0 > sequence) {
            return Err(corrupt(format!(
                "reserved number {ino} is past the inode sequence ({sequence}), which would hand it out"
            )));
        }
        let known = |i: Ino| inos.contains(&i) || spares.contains(&i) || reserved.contains(&i);
        let mut stray = 0;
        let data = store.dir().join("data");
        for entry in std::fs::read_dir(&data).map_err(|e| StoreError::io(&data, e))? {
            let entry = entry.map_err(|e| StoreError::io(&data, e))?;
            let ino = entry
                .file_name()
                .to_str()
                .and_then(|n| u64::from_str_radix(n, 16).ok().map(Ino));
            if !ino.is_some_and(known) {
                stray += 1;
            }
        }
        Ok(Report {
            inodes: inos.len() as u64,
            entries: stored.len() as u64,
            records: replayed,
            stray_data_files: stray,
        })
    })
}

/// The namespace model the log replays into: `(directory, name) -> inode`.
type Names = BTreeMap<(Ino, Vec<u8>), Ino>;

/// Applies one log record to the model; the error is the inconsistency.
fn replay(
    rec: &LogRecord,
    names: &mut Names,
    live: &mut HashSet<Ino>,
    records: &mut HashMap<Ino, u64>,
) -> Result<(), String> {
    let (seq, op, ino) = (rec.seq, rec.op.as_str(), rec.ino);
    let change = rec
        .change()
        .ok_or_else(|| format!("log record {seq}: undecodable {op:?}"))?;
    let bad = |what: &str| format!("log record {seq} ({op} of inode {ino}): {what}");
    match change {
        Change::Create { parent, name, .. } => {
            if !live.insert(ino) {
                return Err(bad("inode created twice"));
            }
            if names.insert((parent, name.to_vec()), ino).is_some() {
                return Err(bad("name already taken"));
            }
        }
        Change::Link { parent, name, .. } => {
            if !live.contains(&ino) {
                return Err(bad("link to a dead inode"));
            }
            if names.insert((parent, name.to_vec()), ino).is_some() {
                return Err(bad("name already taken"));
            }
        }
        Change::Unlink { parent, name, .. } => {
            if names.remove(&(parent, name.to_vec())) != Some(ino) {
                return Err(bad("unlinked name did not name this inode"));
            }
        }
        Change::Rename {
            parent,
            name,
            newparent,
            newname,
            ..
        } => {
            if names.remove(&(parent, name.to_vec())) != Some(ino) {
                return Err(bad("renamed name did not name this inode"));
            }
            if names.insert((newparent, newname.to_vec()), ino).is_some() {
                return Err(bad("rename target still taken"));
            }
        }
        Change::Exchange {
            parent,
            name,
            newparent,
            newname,
            ..
        } => {
            let a = (parent, name.to_vec());
            let b = (newparent, newname.to_vec());
            let (Some(&ia), Some(&ib)) = (names.get(&a), names.get(&b)) else {
                return Err(bad("exchange of a missing name"));
            };
            if ia != ino {
                return Err(bad("exchanged name did not name this inode"));
            }
            names.insert(a, ib);
            names.insert(b, ia);
        }
        Change::Import { .. } => {
            // The root is imported over the one every store has.
            live.insert(ino);
        }
        Change::Delete { .. } => {
            if !live.remove(&ino) {
                return Err(bad("delete of a dead inode"));
            }
        }
        Change::SetAttr { .. }
        | Change::Content { .. }
        | Change::Xattr { .. }
        | Change::Revive { .. } => {
            if !live.contains(&ino) {
                return Err(bad("change to a dead inode"));
            }
        }
    }
    *records.entry(ino).or_default() += 1;
    Ok(())
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    /// Files whose bytes were compared with their chunk lists.
    pub files: u64,
    /// Bytes of data hashed doing so (holes are not counted).
    pub bytes: u64,
    /// Cached regular files with nothing to compare with: changed since
    /// they were last shipped (or shipped while open for writing), never
    /// shipped, or empty.
    pub skipped: u64,
    /// Every mismatch, in inode order.
    pub damaged: Vec<Damage>,
}

/// One place where a data file does not hold what its chunk list says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The inode.
    pub ino: Ino,
    /// A path to it from the root, if it has a name.
    pub path: Option<String>,
    /// What is wrong.
    pub what: Mismatch,
}

/// How a data file differs from its chunk list.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mismatch {
    /// Chunk `index` (of `count`, covering bytes `start..end`) hashes to
    /// something else, or, for a hole, holds bytes that are not zero.
    Chunk {
        /// Chunk number, from 0.
        index: usize,
        /// Chunks in the list.
        count: usize,
        /// First byte of the chunk.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// Whether the chunk stands for a hole ([`HOLE`]).
        hole: bool,
    },
    /// The file ends at byte `len`, inside chunk `index` of `count`.
    Short {
        /// Where the file ends.
        len: u64,
        /// The chunk it ends in.
        index: usize,
        /// Chunks in the list.
        count: usize,
    },
    /// The file has bytes past the `expected` its chunks add up to.
    Long {
        /// The chunks' total.
        expected: u64,
    },
    /// The data file could not be read.
    Unreadable(String),
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "inode {}", self.ino)?;
        if let Some(p) = &self.path {
            write!(f, " ({p})")?;
        }
        match &self.what {
            Mismatch::Chunk {
                index,
                count,
                start,
                end,
                hole: false,
            } => write!(
                f,
                ": chunk {index} of {count} (bytes {start}..{end}) does not match its hash"
            ),
            Mismatch::Chunk {
                index,
                count,
                start,
                end,
                hole: true,
            } => write!(
                f,
                ": chunk {index} of {count} (bytes {start}..{end}) is a hole but holds data"
            ),
            Mismatch::Short { len, index, count } => write!(
                f,
                ": data file ends at byte {len}, inside chunk {index} of {count}"
            ),
            Mismatch::Long { expected } => write!(
                f,
                ": data file is longer than the {expected} bytes of its chunks"
            ),
            Mismatch::Unreadable(e) => write!(f, ": data file unreadable: {e}"),
        }
    }
}

/// Rehashes the store's clean cached files against their chunk lists (see
/// the module docs); run offline, like [`check`]. Damage is reported, not
/// an error; an error means the store itself could not be read.
pub fn verify(dir: &Path) -> Result<Verification, StoreError> {
    let store = Store::open_existing(dir)?;
    let db = |e| StoreError::db(dir, e);
    let (clean, cached) = store
        .read(|r| -> rusqlite::Result<_> {
            let shipped = crate::log::Outbox::cursor(r)?;
            let cached: i64 = r.conn().query_row(
                &format!(
                    "SELECT count(*) FROM inode WHERE cached=1 AND mode & {} = {}",
                    libc::S_IFMT,
                    libc::S_IFREG
                ),
                [],
                |row| row.get(0),
            )?;
            // Shipped while open for writing: later writes may not be
            // logged yet (the next mount logs them), so not comparable.
            let writing: HashSet<Ino> = r.writing()?.into_iter().collect();
            let mut clean = r.clean_cached_files(shipped)?;
            clean.retain(|ino| !writing.contains(ino));
            Ok((clean, cached as u64))
        })
        .map_err(db)?;
    let mut report = Verification {
        files: 0,
        bytes: 0,
        skipped: cached.saturating_sub(clean.len() as u64),
        damaged: Vec::new(),
    };
    let mut buf = Vec::with_capacity(ferry_backend::MAX_CHUNK);
    for ino in clean {
        let chunks = store.read(|r| r.chunks(ino)).map_err(db)?;
        let mismatches = rehash(&store.data_path(ino), &chunks, &mut buf, &mut report.bytes);
        report.files += 1;
        if !mismatches.is_empty() {
            let path = store.read(|r| path_of(r, ino)).map_err(db)?;
            report
                .damaged
                .extend(mismatches.into_iter().map(|what| Damage {
                    ino,
                    path: path.clone(),
                    what,
                }));
        }
    }
    Ok(report)
}

/// Compares the data file at `path` with `chunks`, chunk by chunk; adds
/// the data bytes it hashed to `bytes`.
fn rehash(
    path: &Path,
    chunks: &[(ChunkHash, u32)],
    buf: &mut Vec<u8>,
    bytes: &mut u64,
) -> Vec<Mismatch> {
    let unreadable = |e: std::io::Error| vec![Mismatch::Unreadable(e.to_string())];
    let (file, size) = match File::open(path).and_then(|f| {
        let size = f.metadata()?.len();
        Ok((f, size))
    }) {
        Ok(opened) => opened,
        Err(e) => return unreadable(e),
    };
    let count = chunks.len();
    let mut found = Vec::new();
    let mut start = 0u64;
    for (index, (hash, len)) in chunks.iter().enumerate() {
        let end = start + u64::from(*len);
        if end > size {
            found.push(Mismatch::Short {
                len: size,
                index,
                count,
            });
            return found;
        }
        let hole = *hash == HOLE;
        let intact = if hole {
            all_zero(&file, start, end, buf)
        } else {
            buf.resize(*len as usize, 0);
            *bytes += u64::from(*len);
            file.read_exact_at(buf, start)
                .map(|()| ChunkHash::of(buf) == *hash)
        };
        match intact {
            Ok(true) => {}
            Ok(false) => found.push(Mismatch::Chunk {
                index,
                count,
                start,
                end,
                hole,
            }),
            Err(e) => return unreadable(e),
        }
        start = end;
    }
    if size > start {
        found.push(Mismatch::Long { expected: start });
    }
    found
}

/// Whether bytes `start..end` of `file` are all zero, reading only what
/// the store's file system holds as data there (its holes are zeros).
fn all_zero(file: &File, start: u64, end: u64, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut at = start;
    // Bounded: every pass moves `at` forward or returns.
    while at < end {
        at = match nix::unistd::lseek(file, at as i64, nix::unistd::Whence::SeekData) {
            Ok(data) => data as u64,
            // No data after `at`: the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => return Ok(true),
            // No SEEK_DATA here: read everything.
            Err(nix::errno::Errno::EINVAL) => at,
            Err(e) => return Err(e.into()),
        };
        if at >= end {
            return Ok(true);
        }
        let want = (end - at).min(ferry_backend::MAX_CHUNK as u64) as usize;
        buf.resize(want, 0);
        file.read_exact_at(buf, at)?;
        if buf.iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += want as u64;
    }
    Ok(true)
}

/// A path from the root to `ino` through one of its names, if it has one.
fn path_of(r: &impl Queries, ino: Ino) -> rusqlite::Result<Option<String>> {
    /// Deeper than any real tree; bounds the walk should the entries loop.
    const MAX_DEPTH: usize = 4096;
    let mut stmt = r
        .conn()
        .prepare_cached("SELECT parent, name FROM dentry WHERE ino=?1 LIMIT 1")?;
    let mut names = Vec::new();
    let mut at = ino;
    while at != ROOT_INO && names.len() < MAX_DEPTH {
        let Some((parent, name)) = stmt
            .query_row([at], |row| Ok((row.get(0)?, row.get::<_, Vec<u8>>(1)?)))
            .optional()?
        else {
            return Ok(None);
        };
        names.push(String::from_utf8_lossy(&name).into_owned());
        at = parent;
    }
    names.reverse();
    Ok(Some(format!("/{}", names.join("/"))))
}
