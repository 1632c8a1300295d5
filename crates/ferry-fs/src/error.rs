//! Errors that stop a store from opening or a volume from mounting.
//!
//! File-system operations answer with an errno instead (see [`crate::vfs`]);
//! these are the errors a person reads, so each names the path at fault.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Why a store could not be opened or checked.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// Another daemon holds the store.
    Locked(PathBuf),
    /// The database is not a ferry store.
    Foreign(PathBuf),
    /// The store was written by a different format version.
    Version {
        /// The database file.
        path: PathBuf,
        /// The version found.
        found: i32,
        /// The version this build understands.
        expected: i32,
    },
    /// The store failed its consistency check.
    Corrupt {
        /// The store or database at fault.
        path: PathBuf,
        /// What the check found.
        detail: String,
    },
    /// SQLite refused the database.
    Db {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// A file of the store could not be read or written.
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl StoreError {
    pub(crate) fn io(path: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// SQLite reports a file that is not a database as "not a database";
    /// that is a corrupt store, not an I/O problem, and is reported so.
    pub(crate) fn db(path: &Path, source: rusqlite::Error) -> StoreError {
        match source.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                StoreError::Corrupt {
                    path: path.to_path_buf(),
                    detail: source.to_string(),
                }
            }
            _ => StoreError::Db {
                path: path.to_path_buf(),
                source,
            },
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Locked(p) => {
                write!(f, "store {} is locked by another ferry daemon", p.display())
            }
            StoreError::Foreign(p) => write!(f, "{} is not a ferry store; refusing it", p.display()),
            StoreError::Version {
                path,
                found,
                expected,
            } => write!(
                f,
                "store {} has format version {found}, this ferry reads version {expected}; refusing it",
                path.display()
            ),
            StoreError::Corrupt { path, detail } => {
                write!(f, "store {} is corrupt ({detail}); refusing it", path.display())
            }
            StoreError::Db { path, source } => write!(f, "{}: {source}", path.display()),
            StoreError::Io { path, source } => write!(f, "{}: {source}", path.display()),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Db { source, .. } => Some(source),
            StoreError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
