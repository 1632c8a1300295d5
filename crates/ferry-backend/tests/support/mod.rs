//! What the backend's test binaries share: a [`Volume`] of either
//! implementation with backdoors to its storage, `conformance!` to run a
//! property against both, and builders for ops.
//!
//! Each test binary uses part of this module, hence `dead_code` is allowed.
#![allow(dead_code)]

use std::time::Duration;

use ferry_backend::testing::PgServer;
use ferry_backend::{Backend, ChunkHash, Entry, InodeState, ObjectId, Op, Outcome};

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A not-yet-initialized volume location of one implementation, plus the
/// backdoors tests need to damage it.
pub struct Volume {
    pub url: String,
    kind: Kind,
    /// Keeps a dir volume's temp directory alive.
    _tmp: Option<tempfile::TempDir>,
}

pub enum Kind {
    Dir(std::path::PathBuf),
    Pg { db: String },
}

impl Volume {
    pub fn dir(_name: &str) -> Volume {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("volume");
        Volume {
            url: format!("dir:{}", path.display()),
            kind: Kind::Dir(path),
            _tmp: Some(tmp),
        }
    }

    pub fn pg(name: &str) -> Volume {
        let db = format!("t_{name}");
        Volume {
            url: PgServer::shared().create_database(&db),
            kind: Kind::Pg { db },
            _tmp: None,
        }
    }

    /// Another fresh location of the same implementation.
    pub fn sibling(&self, name: &str) -> Volume {
        match &self.kind {
            Kind::Dir(_) => Volume::dir(name),
            Kind::Pg { db } => Volume::pg(&format!("{db}_{name}")),
        }
    }

    /// Initializes the volume and opens it.
    pub fn init_open(&self) -> Box<dyn Backend> {
        ferry_backend::init(&self.url, "test").unwrap();
        self.open()
    }

    pub fn open(&self) -> Box<dyn Backend> {
        ferry_backend::open(&self.url, TIMEOUT).unwrap()
    }

    /// Table name as this implementation spells it.
    pub fn table(&self, name: &str) -> String {
        match self.kind {
            Kind::Dir(_) => name.to_owned(),
            Kind::Pg { .. } => format!("ferry_{name}"),
        }
    }

    /// A blob literal from hex.
    pub fn blob(&self, hex: &str) -> String {
        match self.kind {
            Kind::Dir(_) => format!("X'{hex}'"),
            Kind::Pg { .. } => format!("'\\x{hex}'::bytea"),
        }
    }

    /// Runs SQL directly in the volume's database, behind the backend's back.
    pub fn exec(&self, sql: &str) {
        match &self.kind {
            Kind::Dir(path) => {
                let conn = rusqlite::Connection::open(path.join("ferry.db")).unwrap();
                conn.busy_timeout(TIMEOUT).unwrap();
                conn.execute_batch(sql).unwrap();
            }
            Kind::Pg { db } => {
                PgServer::shared().psql(db, sql);
            }
        }
    }

    /// The password in the URL (PostgreSQL), to check it is never shown.
    pub fn password(&self) -> Option<String> {
        match self.kind {
            Kind::Dir(_) => None,
            Kind::Pg { .. } => Some(PgServer::shared().password()),
        }
    }

    /// SQL for the bytes of the text expression `expr`.
    pub fn text_blob(&self, expr: &str) -> String {
        match self.kind {
            Kind::Dir(_) => format!("CAST({expr} AS BLOB)"),
            Kind::Pg { .. } => format!("convert_to({expr}, 'UTF8')"),
        }
    }

    pub fn set_schema_version(&self, version: u32) {
        match self.kind {
            Kind::Dir(_) => self.exec(&format!("PRAGMA user_version = {version}")),
            Kind::Pg { .. } => self.exec(&format!(
                "UPDATE ferry_volume SET schema_version = {version}"
            )),
        }
    }

    /// Truncates the stored copy of a chunk to its first 3 bytes.
    pub fn truncate_chunk(&self, hash: &ChunkHash) {
        match &self.kind {
            Kind::Dir(path) => {
                let hex = hash.to_hex();
                let file = path.join("chunks").join(&hex[..2]).join(&hex[2..]);
                let data = std::fs::read(&file).unwrap();
                std::fs::write(&file, &data[..3]).unwrap();
            }
            Kind::Pg { .. } => self.exec(&format!(
                "UPDATE ferry_chunks SET data = substring(data from 1 for 3) WHERE hash = {}",
                self.blob(&hash.to_hex())
            )),
        }
    }

    /// Replaces the stored chunk with different bytes of the same length.
    pub fn flip_chunk(&self, hash: &ChunkHash, len: usize) {
        let other = "ab".repeat(len);
        match &self.kind {
            Kind::Dir(path) => {
                let hex = hash.to_hex();
                let file = path.join("chunks").join(&hex[..2]).join(&hex[2..]);
                std::fs::write(&file, vec![0xab; len]).unwrap();
            }
            Kind::Pg { .. } => self.exec(&format!(
                "UPDATE ferry_chunks SET data = {} WHERE hash = {}",
                self.blob(&other),
                self.blob(&hash.to_hex())
            )),
        }
    }
}

/// Generates `dir::NAME` and `pg::NAME` tests for each property `NAME`.
#[allow(unused_macros)]
macro_rules! conformance {
    ($($prop:ident),* $(,)?) => {
        mod dir {
            $( #[test] fn $prop() { super::$prop(&$crate::support::Volume::dir(stringify!($prop))) } )*
        }
        mod pg {
            $( #[test] fn $prop() { super::$prop(&$crate::support::Volume::pg(stringify!($prop))) } )*
        }
    };
}

pub fn file(host: u32, counter: u64) -> InodeState {
    let mut inode = InodeState::new(ObjectId { host, counter }, 0o100644);
    inode.uid = 1000;
    inode.gid = 100;
    inode.mtime_ns = 1_700_000_000_123_456_789;
    inode.xattrs = vec![(b"user.k".to_vec(), b"v\0binary".to_vec())];
    inode
}

pub fn put(state: InodeState, base: Option<u64>) -> Op {
    Op::PutInode { state, base }
}

pub fn applied(version: u64) -> Outcome {
    Outcome::Applied { version }
}

pub fn conflict(current: Option<u64>) -> Outcome {
    Outcome::Conflict { current }
}

pub fn last_seq(b: &dyn Backend) -> u64 {
    b.snapshot_each(&mut |_| Ok(())).unwrap()
}

/// A directory inode (mode 0o40755).
pub fn dir(host: u32, counter: u64) -> InodeState {
    InodeState::new(ObjectId { host, counter }, 0o40755)
}

/// PutEntry `parent/name` → `child` on `base`.
pub fn link(parent: ObjectId, name: &str, child: ObjectId, base: Option<u64>) -> Op {
    Op::PutEntry {
        parent,
        name: name.as_bytes().to_vec(),
        child,
        base,
    }
}

/// DeleteEntry `parent/name` on `base`.
pub fn unlink(parent: ObjectId, name: &str, base: u64) -> Op {
    Op::DeleteEntry {
        parent,
        name: name.as_bytes().to_vec(),
        base,
    }
}

/// The two ops of a create: the new inode, then its name `parent/name`.
pub fn create(inode: &InodeState, parent: ObjectId, name: &str) -> [Op; 2] {
    [put(inode.clone(), None), link(parent, name, inode.id, None)]
}

/// Asserts the backend is whole: `check` finds nothing, and every entry of
/// the snapshot names a parent and a child that are in it (what a restore
/// needs).
pub fn assert_whole(b: &dyn Backend, context: &str) {
    let violations = ferry_backend::check(b).unwrap();
    let lines: Vec<String> = violations.iter().map(ToString::to_string).collect();
    assert!(violations.is_empty(), "{context}: {lines:#?}");
    let (_, inodes, entries) = b.snapshot().unwrap();
    let ids: std::collections::HashSet<ObjectId> = inodes.iter().map(|i| i.id).collect();
    for Entry { parent, child, .. } in &entries {
        assert!(
            ids.contains(parent) && ids.contains(child),
            "{context}: {entries:?}"
        );
    }
}
