//! The change log (outbox): a durable, ordered record of every mutation.
//!
//! Records are appended by [`crate::store::Tx`] in the same transaction as
//! the mutation they describe, so the log and the store can never disagree.
//! A record names *what* changed (an inode, a name), not the new bytes:
//! replication reads the current state when it ships, which is what lets it
//! coalesce many writes to one file into one upload.
//!
//! Each record carries the inode's version after the change. Versions start
//! at 1 and every record bumps by one, so for every inode
//! `version == 1 + number of its records` — the invariant [`crate::fsck`]
//! checks after a crash.

/// The (directory, name) places a change touches: `(parent, name,
/// parent2, name2)`, as the log's columns store them.
pub type Places<'a> = (Option<u64>, Option<&'a [u8]>, Option<u64>, Option<&'a [u8]>);

/// One logged change. Names are raw bytes, as the kernel gave them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// `ino` was created as `parent/name`.
    Create {
        /// The new inode.
        ino: u64,
        /// Its directory.
        parent: u64,
        /// Its name.
        name: &'a [u8],
    },
    /// `ino` got the extra name `parent/name`.
    Link {
        /// The linked inode.
        ino: u64,
        /// The new name's directory.
        parent: u64,
        /// The new name.
        name: &'a [u8],
    },
    /// The name `parent/name` of `ino` was removed.
    Unlink {
        /// The inode that lost a name.
        ino: u64,
        /// The directory.
        parent: u64,
        /// The removed name.
        name: &'a [u8],
    },
    /// `parent/name` (inode `ino`) moved to `newparent/newname`.
    Rename {
        /// The moved inode.
        ino: u64,
        /// Old directory.
        parent: u64,
        /// Old name.
        name: &'a [u8],
        /// New directory.
        newparent: u64,
        /// New name.
        newname: &'a [u8],
    },
    /// `parent/name` (inode `ino`) and `newparent/newname` swapped inodes.
    Exchange {
        /// The inode that was at `parent/name`.
        ino: u64,
        /// First directory.
        parent: u64,
        /// First name.
        name: &'a [u8],
        /// Second directory.
        newparent: u64,
        /// Second name.
        newname: &'a [u8],
    },
    /// Attributes of `ino` changed (mode, owner, size, times).
    SetAttr {
        /// The inode.
        ino: u64,
    },
    /// The contents of `ino` changed.
    Content {
        /// The inode.
        ino: u64,
    },
    /// The xattrs of `ino` changed.
    Xattr {
        /// The inode.
        ino: u64,
    },
    /// `ino` is gone: no names and no open handles left.
    Delete {
        /// The inode.
        ino: u64,
    },
    /// `ino` came from the backend (a restore); its names follow as `Link`
    /// records. Already at the backend, so never shipped.
    Import {
        /// The inode.
        ino: u64,
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
        }
    }

    /// The inode whose version the change bumps.
    pub fn ino(&self) -> u64 {
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
            | Change::Import { ino } => ino,
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
            | Change::Import { .. } => (None, None, None, None),
        }
    }

    /// Decodes a record from its columns; `None` for a record this build
    /// does not understand (a corrupt or newer log).
    pub fn decode<'a>(op: &str, ino: u64, places: Places<'a>) -> Option<Change<'a>> {
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
            _ => return None,
        })
    }
}

/// A log record as stored, owning its names.
#[derive(Clone, Debug)]
pub struct LogRecord {
    /// Position in the log.
    pub seq: u64,
    /// The `op` column.
    pub op: String,
    /// The inode whose version the change bumped.
    pub ino: u64,
    /// First directory.
    pub parent: Option<u64>,
    /// First name.
    pub name: Option<Vec<u8>>,
    /// Second directory (rename, exchange).
    pub parent2: Option<u64>,
    /// Second name (rename, exchange).
    pub name2: Option<Vec<u8>>,
    /// When it was logged.
    pub at: crate::store::Nanos,
    /// The inode's creating host (its global identity, with `counter`).
    pub host: u32,
    /// The inode's per-host counter.
    pub counter: u64,
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
