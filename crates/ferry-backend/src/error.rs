//! The error type every backend call returns.
//!
//! Variants carry enough context (what, where) to act on without a log.
//! The replicator only needs one decision from an error — retry later or
//! not — which [`BackendError::is_transient`] answers.
//!
//! No variant ever carries a password: locations are always passed through
//! [`crate::redact`] before they are stored in an error.

use std::fmt;

/// Everything that can go wrong talking to a backend.
#[derive(Debug)]
#[non_exhaustive]
pub enum BackendError {
    /// The backend could not be reached: connection refused, reset, or a
    /// call timed out. Transient: retry with backoff.
    Unreachable {
        /// The backend (redacted URL).
        location: String,
        /// What failed.
        detail: String,
    },
    /// Data read from the backend is wrong: a chunk whose bytes do not hash
    /// to its name, a truncated chunk, a row that cannot be decoded. Never
    /// returned as data.
    Corrupt {
        /// What is corrupt (e.g. `chunk 3fa1…`, `inode 2:17`).
        what: String,
    },
    /// The volume's schema version is not the one this build supports.
    SchemaVersion {
        /// Version stored in the volume.
        found: u32,
        /// Version this build reads and writes.
        supported: u32,
    },
    /// The location holds no ferry volume; run `ferry init`.
    NotInitialized {
        /// The backend (redacted URL).
        location: String,
    },
    /// `init` found a volume already there (at the current schema version).
    AlreadyInitialized {
        /// The backend (redacted URL).
        location: String,
        /// Name of the existing volume.
        volume: String,
    },
    /// The server rejected the credentials. Not transient: a retry cannot fix it.
    Auth {
        /// The backend (redacted URL).
        location: String,
        /// The server's reason (never contains the password).
        detail: String,
    },
    /// A chunk that is not stored in the backend was asked for.
    NotFound {
        /// What was missing.
        what: String,
    },
    /// The caller passed something invalid (bad URL, oversize chunk, hash
    /// mismatch on upload).
    Invalid {
        /// What was wrong.
        detail: String,
    },
    /// Anything else (local I/O errors, unexpected server errors).
    Other {
        /// What failed.
        detail: String,
    },
}

impl BackendError {
    /// Whether retrying the same call later may succeed. Only connectivity
    /// problems are transient; corruption, auth and schema errors need a human.
    pub fn is_transient(&self) -> bool {
        matches!(self, BackendError::Unreachable { .. })
    }

    /// Shorthand for [`BackendError::Corrupt`].
    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        BackendError::Corrupt { what: what.into() }
    }

    /// Shorthand for [`BackendError::Other`].
    pub(crate) fn other(detail: impl fmt::Display) -> Self {
        BackendError::Other {
            detail: detail.to_string(),
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Unreachable { location, detail } => {
                write!(f, "backend {location} unreachable: {detail}")
            }
            BackendError::Corrupt { what } => write!(f, "corrupt data in backend: {what}"),
            BackendError::SchemaVersion { found, supported } => write!(
                f,
                "backend schema version {found} is not supported (this build supports {supported}; \
                 an older volume is upgraded by `ferry init`, a newer one needs a newer ferry)"
            ),
            BackendError::NotInitialized { location } => {
                write!(f, "no ferry volume at {location}; run `ferry init` first")
            }
            BackendError::AlreadyInitialized { location, volume } => write!(
                f,
                "{location} already holds ferry volume {volume:?}; refusing to initialize it again"
            ),
            BackendError::Auth { location, detail } => {
                write!(f, "authentication to {location} failed: {detail}")
            }
            BackendError::NotFound { what } => write!(f, "not found in backend: {what}"),
            BackendError::Invalid { detail } => write!(f, "invalid request: {detail}"),
            BackendError::Other { detail } => write!(f, "backend error: {detail}"),
        }
    }
}

impl std::error::Error for BackendError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unreachable_is_transient() {
        let unreachable = BackendError::Unreachable {
            location: "x".into(),
            detail: "refused".into(),
        };
        assert!(unreachable.is_transient());
        assert!(!BackendError::corrupt("chunk").is_transient());
        assert!(!BackendError::Auth {
            location: "x".into(),
            detail: "bad".into()
        }
        .is_transient());
    }
}
