//! What `ferry status` shows of replication.

use serde::{Deserialize, Serialize};

use crate::log::Outbox;
use crate::store::{Queries, Store};

/// How many resolved conflicts `ferry status` lists (all are counted).
const RESOLVED_SHOWN: usize = 50;

/// What `ferry status` shows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    /// The backend, with any password removed.
    pub backend: String,
    /// Log records not yet committed at the backend.
    pub pending_ops: u64,
    /// Bytes of file contents those records may need to upload.
    pub pending_bytes: u64,
    /// Age in seconds of the oldest pending record.
    pub oldest_pending_age_s: Option<f64>,
    /// Unix time of the last successful backend call.
    pub last_contact: Option<f64>,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
    /// Errors since the daemon started.
    pub errors: u64,
    /// Conflicts kept, waiting to be resolved (a file still open for
    /// writing here is resolved once it is closed).
    pub conflicts: u64,
    /// Last log record committed at the backend.
    pub shipped_seq: u64,
    /// Newest log record.
    pub head_seq: u64,
    /// Chunks uploaded and bytes sent since the daemon started.
    pub chunks_uploaded: u64,
    /// Bytes uploaded since the daemon started.
    pub bytes_uploaded: u64,
    /// Whether this run of the daemon has checked that the backend is this
    /// store's volume (nothing ships before, and no sync is done before).
    #[serde(default)]
    pub verified: bool,
    /// The backend feed position this host has applied (down-sync).
    #[serde(default)]
    pub feed_seq: u64,
    /// Remote changes applied to this store since the daemon started.
    #[serde(default)]
    pub applied: u64,
    /// Conflicts resolved on this host, newest last (the most recent
    /// ones; every one is also in the daemon's log).
    #[serde(default)]
    pub resolved: Vec<Resolution>,
    /// Whether the shipper is between recording a batch's conflicts and
    /// resolving them: a sync waits that out rather than report them.
    #[serde(default)]
    pub resolving: bool,
    /// How many conflicts this host has resolved in all.
    #[serde(default)]
    pub resolved_total: u64,
    /// Background prefetch of file contents, while one runs or after.
    #[serde(default)]
    pub prefetch: Option<PrefetchProgress>,
}

/// One conflict and how it was resolved, for `ferry status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Resolution {
    /// Unix time of the resolution.
    pub at: f64,
    /// The path the conflict was on (as it was on this host).
    pub path: String,
    /// What was done, in words ("kept this host's version as …").
    pub how: String,
}

/// Progress of a background prefetch.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PrefetchProgress {
    /// Files fetched so far, of `files_total` chosen by the policy.
    pub files_done: u64,
    /// Files the policy chose.
    pub files_total: u64,
    /// Bytes fetched so far.
    pub bytes_done: u64,
    /// Bytes the policy chose.
    pub bytes_total: u64,
}

/// Fills the log positions, counts and resolved conflicts of `s` from the
/// store.
pub(super) fn count_pending(store: &Store, s: &mut Status) -> rusqlite::Result<()> {
    store.read(|r| {
        let shipped = Outbox::cursor(r)?;
        let (pending, oldest) = r.pending(shipped)?;
        let now = crate::store::now();
        s.shipped_seq = shipped.0;
        s.pending_ops = pending;
        s.oldest_pending_age_s = oldest.map(|t| (now - t).max(0) as f64 / 1e9);
        s.head_seq = r.log_head()?.0;
        s.conflicts = r.conflicts()?.len() as u64;
        let (resolved, total) = r.resolved(RESOLVED_SHOWN)?;
        s.resolved_total = total;
        s.resolved = resolved
            .into_iter()
            .map(|(at, path, how)| Resolution {
                at: at as f64 / 1e9,
                path,
                how,
            })
            .collect();
        s.feed_seq = r.meta_int("feed_seq")?.unwrap_or(0) as u64;
        Ok(())
    })
}
