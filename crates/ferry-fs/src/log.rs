//! The change log (outbox): a durable, ordered record of every mutation.
//!
//! Records are appended by [`crate::store::Tx`] in the same transaction as
//! the mutation they describe, so the log and the store can never disagree.
//! A record names *what* changed (an inode, a name), not the new bytes:
//! replication reads the current state when it ships, which is what lets it
//! coalesce many writes to one file into one upload.
//!
//! The records after the outbox's cursor ([`Outbox`]) are what this host
//! still has to ship; [`Touched`] says which objects they concern.
//!
//! Each record carries the inode's version after the change. Versions start
//! at 1 and every record bumps by one, so for every inode
//! `version == 1 + number of its records` — the invariant [`crate::fsck`]
//! checks after a crash.

use std::collections::{BTreeSet, HashSet};

use crate::ids::{Ino, Seq};
use crate::store::{Queries, Tx};

/// The (directory, name) places a change touches: `(parent, name,
/// parent2, name2)`, as the log's columns store them.
pub type Places<'a> = (Option<Ino>, Option<&'a [u8]>, Option<Ino>, Option<&'a [u8]>);

/// One logged change. Names are raw bytes, as the kernel gave them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// `ino` was created as `parent/name`.
    Create {
        /// The new inode.
        ino: Ino,
        /// Its directory.
        parent: Ino,
        /// Its name.
        name: &'a [u8],
    },
    /// `ino` got the extra name `parent/name`.
    Link {
        /// The linked inode.
        ino: Ino,
        /// The new name's directory.
        parent: Ino,
        /// The new name.
        name: &'a [u8],
    },
    /// The name `parent/name` of `ino` was removed.
    Unlink {
        /// The inode that lost a name.
        ino: Ino,
        /// The directory.
        parent: Ino,
        /// The removed name.
        name: &'a [u8],
    },
    /// `parent/name` (inode `ino`) moved to `newparent/newname`.
    Rename {
        /// The moved inode.
        ino: Ino,
        /// Old directory.
        parent: Ino,
        /// Old name.
        name: &'a [u8],
        /// New directory.
        newparent: Ino,
        /// New name.
        newname: &'a [u8],
    },
    /// `parent/name` (inode `ino`) and `newparent/newname` swapped inodes.
    Exchange {
        /// The inode that was at `parent/name`.
        ino: Ino,
        /// First directory.
        parent: Ino,
        /// First name.
        name: &'a [u8],
        /// Second directory.
        newparent: Ino,
        /// Second name.
        newname: &'a [u8],
    },
    /// Attributes of `ino` changed (mode, owner, size, times).
    SetAttr {
        /// The inode.
        ino: Ino,
    },
    /// The contents of `ino` changed.
    Content {
        /// The inode.
        ino: Ino,
    },
    /// The xattrs of `ino` changed.
    Xattr {
        /// The inode.
        ino: Ino,
    },
    /// `ino` is gone: no names and no open handles left.
    Delete {
        /// The inode.
        ino: Ino,
    },
    /// `ino` came from the backend (a restore or down-sync); its names
    /// follow as `Link` records. Already at the backend, so never shipped.
    Import {
        /// The inode.
        ino: Ino,
    },
    /// `ino` ships again whole, with all its names (conflict resolution:
    /// it got a new global identity, or was refused for another object's
    /// sake).
    Revive {
        /// The inode.
        ino: Ino,
    },
}

impl Change<'_> {
    /// The record's `op` column.
    pub fn op(&self) -> &'static str {
        match self {
            Change::Create { .. } => "create",
            Change::Link { .. } => "link",
            Change::Unlink { .. } => "unlink",
            Change::Rename { .. } => "rename",
            Change::Exchange { .. } => "exchange",
            Change::SetAttr { .. } => "setattr",
            Change::Content { .. } => "content",
            Change::Xattr { .. } => "xattr",
            Change::Delete { .. } => "delete",
            Change::Import { .. } => "import",
            Change::Revive { .. } => "revive",
        }
    }

    /// The inode whose version the change bumps.
    pub fn ino(&self) -> Ino {
        match *self {
            Change::Create { ino, .. }
            | Change::Link { ino, .. }
            | Change::Unlink { ino, .. }
            | Change::Rename { ino, .. }
            | Change::Exchange { ino, .. }
            | Change::SetAttr { ino }
            | Change::Content { ino }
            | Change::Xattr { ino }
            | Change::Delete { ino }
            | Change::Import { ino }
            | Change::Revive { ino } => ino,
        }
    }

    /// The (directory, name) places the change touches: `(parent, name,
    /// parent2, name2)`, as stored in the log's columns.
    pub fn places(&self) -> Places<'_> {
        match *self {
            Change::Create { parent, name, .. }
            | Change::Link { parent, name, .. }
            | Change::Unlink { parent, name, .. } => (Some(parent), Some(name), None, None),
            Change::Rename {
                parent,
                name,
                newparent,
                newname,
                ..
            }
            | Change::Exchange {
                parent,
                name,
                newparent,
                newname,
                ..
            } => (Some(parent), Some(name), Some(newparent), Some(newname)),
            Change::SetAttr { .. }
            | Change::Content { .. }
            | Change::Xattr { .. }
            | Change::Delete { .. }
            | Change::Import { .. }
            | Change::Revive { .. } => (None, None, None, None),
        }
    }

    /// Decodes a record from its columns; `None` for a record this build
    /// does not understand (a corrupt or newer log).
    pub fn decode<'a>(op: &str, ino: Ino, places: Places<'a>) -> Option<Change<'a>> {
        Some(match (op, places) {
            ("create", (Some(parent), Some(name), None, None)) => {
                Change::Create { ino, parent, name }
            }
            ("link", (Some(parent), Some(name), None, None)) => Change::Link { ino, parent, name },
            ("unlink", (Some(parent), Some(name), None, None)) => {
                Change::Unlink { ino, parent, name }
            }
            ("rename", (Some(parent), Some(name), Some(newparent), Some(newname))) => {
                Change::Rename {
                    ino,
                    parent,
                    name,
                    newparent,
                    newname,
                }
            }
            ("exchange", (Some(parent), Some(name), Some(newparent), Some(newname))) => {
                Change::Exchange {
                    ino,
                    parent,
                    name,
                    newparent,
                    newname,
                }
            }
            ("setattr", (None, None, None, None)) => Change::SetAttr { ino },
            ("content", (None, None, None, None)) => Change::Content { ino },
            ("xattr", (None, None, None, None)) => Change::Xattr { ino },
            ("delete", (None, None, None, None)) => Change::Delete { ino },
            ("import", (None, None, None, None)) => Change::Import { ino },
            ("revive", (None, None, None, None)) => Change::Revive { ino },
            _ => return None,
        })
    }
}

/// A log record as stored, owning its names.
#[derive(Clone, Debug)]
pub struct LogRecord {
    /// Position in the log.
    pub seq: Seq,
    /// The `op` column.
    pub op: String,
    /// The inode whose version the change bumped.
    pub ino: Ino,
    /// First directory.
    pub parent: Option<Ino>,
    /// First name.
    pub name: Option<Vec<u8>>,
    /// Second directory (rename, exchange).
    pub parent2: Option<Ino>,
    /// Second name (rename, exchange).
    pub name2: Option<Vec<u8>>,
    /// When it was logged.
    pub at: crate::store::Nanos,
    /// The inode's creating host (its global identity, with `counter`).
    pub host: u32,
    /// The inode's per-host counter.
    pub counter: u64,
    /// Pulled from the backend by down-sync (or a restore): already there,
    /// so never shipped.
    pub pulled: bool,
}

impl LogRecord {
    /// The change this record describes; `None` if it is undecodable.
    pub fn change(&self) -> Option<Change<'_>> {
        Change::decode(
            &self.op,
            self.ino,
            (
                self.parent,
                self.name.as_deref(),
                self.parent2,
                self.name2.as_deref(),
            ),
        )
    }
}

/// What a run of this host's own records touched: the objects whose
/// current state ships (or that down-sync must leave alone, because they
/// have changes of this host's still to ship). Pulled records touch
/// nothing: the backend has what they describe.
#[derive(Debug, Default)]
pub struct Touched {
    /// Inodes whose state ships: changed ones, and the directories whose
    /// entries changed (their mtime and ctime travel with the entries).
    pub inodes: BTreeSet<Ino>,
    /// Inodes whose bytes may have changed (a `Create`, `Content` or
    /// `Revive`): only their data files are read.
    pub rewritten: HashSet<Ino>,
    /// Names (directory, name) whose target ships.
    pub names: BTreeSet<(Ino, Vec<u8>)>,
    /// Global identities (host, counter) of inodes deleted here.
    pub deleted: BTreeSet<(u32, u64)>,
    /// Inodes with a new identity: all their names ship too.
    pub revived: BTreeSet<Ino>,
}

impl Touched {
    /// Collects `records`; the seq of the first one this build cannot
    /// decode is the error.
    pub fn of<'a>(records: impl IntoIterator<Item = &'a LogRecord>) -> Result<Touched, Seq> {
        let mut t = Touched::default();
        for rec in records.into_iter().filter(|r| !r.pulled) {
            let change = rec.change().ok_or(rec.seq)?;
            match change {
                Change::Delete { .. } => {
                    t.deleted.insert((rec.host, rec.counter));
                }
                Change::Content { ino } => {
                    t.inodes.insert(ino);
                    t.rewritten.insert(ino);
                }
                Change::Revive { ino } => {
                    t.inodes.insert(ino);
                    t.rewritten.insert(ino);
                    t.revived.insert(ino);
                }
                Change::SetAttr { ino } | Change::Xattr { ino } => {
                    t.inodes.insert(ino);
                }
                // Restored from the backend: already there.
                Change::Import { .. } => {}
                other => {
                    t.inodes.insert(other.ino());
                    if matches!(other, Change::Create { .. }) {
                        t.rewritten.insert(other.ino());
                    }
                    let (p, n, p2, n2) = other.places();
                    for (p, n) in [(p, n), (p2, n2)] {
                        if let (Some(p), Some(n)) = (p, n) {
                            t.names.insert((p, n.to_vec()));
                            t.inodes.insert(p);
                        }
                    }
                }
            }
        }
        Ok(t)
    }

    /// Adds what the revived inodes ship with: every name each has now,
    /// and the directories those names are in. Both the shipper (what a
    /// batch ships) and down-sync (what it must leave alone) call this, so
    /// the two sets stay one: a directory a batch ships only for a revived
    /// entry, pulled between the batch's read and its commit, would be
    /// overwritten at the backend by the state the batch read, while this
    /// host kept the pulled one and recorded the new version as its own.
    pub fn add_revived_names(&mut self, r: &impl Queries) -> rusqlite::Result<()> {
        for &ino in &self.revived {
            for (p, n) in r.names_of(ino)? {
                self.inodes.insert(p);
                self.names.insert((p, n));
            }
        }
        Ok(())
    }
}

/// The outbox: the log seen from replication. Its cursor is the last record
/// committed at the backend (recorded in the same store transaction as the
/// backend versions that commit produced); what follows it is pending.
pub struct Outbox;

impl Outbox {
    /// The `meta` key of the cursor.
    const CURSOR: &'static str = "shipped_seq";

    /// The last record shipped (0: none).
    pub fn cursor(r: &impl Queries) -> rusqlite::Result<Seq> {
        Ok(Seq(r.meta_int(Self::CURSOR)?.unwrap_or(0) as u64))
    }

    /// Records everything up to `seq` as shipped.
    pub fn advance(tx: &Tx<'_>, seq: Seq) -> rusqlite::Result<()> {
        tx.set_meta_int(Self::CURSOR, seq.0 as i64)
    }

    /// The pending records: up to `limit` after the cursor, extended to the
    /// end of the transaction the last one belongs to (its records share
    /// their time). A batch that ended inside one (between the unlink of a
    /// rename's target and the rename) would describe a state that never
    /// existed.
    pub fn pending(r: &impl Queries, limit: usize) -> rusqlite::Result<Vec<LogRecord>> {
        let mut batch = r.log_after(Self::cursor(r)?, limit)?;
        if let Some(last) = batch.last().filter(|_| batch.len() == limit) {
            let (seq, at) = (last.seq, last.at);
            let rest = r.log_after(seq, limit)?;
            batch.extend(rest.into_iter().take_while(|rec| rec.at == at));
        }
        Ok(batch)
    }
}
