//! Offline consistency check: does the change log describe exactly the
//! store?
//!
//! The log is replayed from an empty volume into a model of the namespace,
//! which must equal the directory entries in the store; every inode's
//! version must be one more than its number of records; link counts must
//! match the entries; every regular file must have its data file. Run with
//! the daemon stopped (opening the store takes its lock).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use crate::error::StoreError;
use crate::log::{Change, LogRecord};
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
    /// Data files with no inode: left by a crash between creating the file
    /// and committing its inode, harmless, removed by the next mount.
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
        let mut live: HashSet<u64> = HashSet::from([ROOT_INO]);
        let mut records: HashMap<u64, u64> = HashMap::new();
        let mut replayed = 0u64;
        let mut after = 0;
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
                Ok((
                    (r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?),
                    r.get::<_, i64>(2)? as u64,
                ))
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
        let inos: HashSet<u64> = stmt
            .query_map([], |r| r.get::<_, i64>(0).map(|v| v as u64))
            .map_err(db)?
            .collect::<Result<_, _>>()
            .map_err(db)?;
        if inos != live {
            let diff: Vec<_> = inos.symmetric_difference(&live).take(5).collect();
            return Err(corrupt(format!(
                "inode set differs from its log at {diff:?}"
            )));
        }
        let mut links: HashMap<u64, u32> = HashMap::new();
        let mut subdirs: HashMap<u64, u32> = HashMap::new();
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
        let mut stray = 0;
        let data = store.dir().join("data");
        for entry in std::fs::read_dir(&data).map_err(|e| StoreError::io(&data, e))? {
            let entry = entry.map_err(|e| StoreError::io(&data, e))?;
            let ino = entry
                .file_name()
                .to_str()
                .and_then(|n| u64::from_str_radix(n, 16).ok());
            if !ino.is_some_and(|i| inos.contains(&i)) {
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
type Names = BTreeMap<(u64, Vec<u8>), u64>;

/// Applies one log record to the model; the error is the inconsistency.
fn replay(
    rec: &LogRecord,
    names: &mut Names,
    live: &mut HashSet<u64>,
    records: &mut HashMap<u64, u64>,
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
        Change::SetAttr { .. } | Change::Content { .. } | Change::Xattr { .. } => {
            if !live.contains(&ino) {
                return Err(bad("change to a dead inode"));
            }
        }
    }
    *records.entry(ino).or_default() += 1;
    Ok(())
}
