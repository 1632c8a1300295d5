//! Newtypes for the three numbers that run through ferry-fs.
//!
//! An inode number, an open-file handle and a change-log sequence number
//! are all `u64`, and as bare integers one was easily passed where another
//! was meant (an `fh` as an `ino`, a `seq` as either) without the compiler
//! noticing. Each gets its own type; the conversions to and from the kernel's
//! numbers happen once, at the FUSE boundary ([`crate::fuse`]), and to and
//! from SQLite through [`ToSql`]/[`FromSql`], so the store binds them
//! directly.
//!
//! All three are stored as SQLite `INTEGER` (an `i64`) and cast bit for bit,
//! as the bare integers were, so the stored format is unchanged.

use std::fmt;

use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

/// Defines one `u64` newtype with `Display` and the SQLite conversions.
macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            /// The bare number, as logs and messages showed it before.
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.0 as i64))
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                i64::column_result(value).map(|v| $name(v as u64))
            }
        }
    };
}

id!(
    /// A local inode number: what FUSE sees, the `ino` column of the store.
    /// It is local to this host; other hosts know an inode by its
    /// [`ferry_backend::ObjectId`]. The FUSE root is [`Ino::ROOT`].
    Ino
);

id!(
    /// An open-file handle, as handed to the kernel by `open`/`create` and
    /// given back on every read, write and release.
    Fh
);

id!(
    /// A position in the change log (its `seq` column); 0 is before the
    /// first record.
    Seq
);

impl Ino {
    /// The root directory, whose number FUSE fixes at 1.
    pub const ROOT: Ino = Ino(1);
}

/// The kernel's inode numbers are ours: the one conversion at the FUSE
/// boundary, in each direction.
impl From<fuser::INodeNo> for Ino {
    fn from(ino: fuser::INodeNo) -> Ino {
        Ino(ino.0)
    }
}

impl From<Ino> for fuser::INodeNo {
    fn from(ino: Ino) -> fuser::INodeNo {
        fuser::INodeNo(ino.0)
    }
}

/// The kernel hands back the handle `open` gave it: the one conversion at
/// the FUSE boundary, in each direction.
impl From<fuser::FileHandle> for Fh {
    fn from(fh: fuser::FileHandle) -> Fh {
        Fh(fh.0)
    }
}

impl From<Fh> for fuser::FileHandle {
    fn from(fh: Fh) -> fuser::FileHandle {
        fuser::FileHandle(fh.0)
    }
}
