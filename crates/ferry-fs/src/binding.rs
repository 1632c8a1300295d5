//! Which volume a store belongs to, and whether it is still the store that
//! volume knows (invariant I4, "no mix-ups").
//!
//! Two things go wrong without this check:
//!
//! - **A store attached to another volume.** A store restored from volume b
//!   and mounted with the backend of volume c would ship b's objects into c.
//!   So every store is *bound* to one volume id (`volume_id` in its meta
//!   table) at its first contact with a backend — at the restore of a new
//!   host, or the first mount of a local-only store with a backend — and a
//!   backend of any other volume is refused.
//! - **A store that went back in time.** A store restored from a backup or a
//!   VM snapshot, or whose WAL lost commits, hands out again the inode
//!   counters (`host:counter` ids) and log positions it had already shipped:
//!   a new file would take the id of an older one at the backend. The backend
//!   remembers, per host, the largest counter it holds and the largest log
//!   position the host reported shipped ([`HostMark`]); a store whose own
//!   high-water marks ([`Queries::sequence`]) are below them is refused.
//!
//! [`verify`] runs both checks with two backend calls. A mount runs
//! [`verify_within`], which gives up quietly when the backend does not
//! answer in time (the mount must work offline); the replicator runs
//! [`verify`] before its first ship, so an offline mount is checked as soon
//! as the backend answers. By then the store may have made more files than
//! the backend has seen, so the marks compared are the ones the store had
//! when the mount skipped the check.

use std::fmt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use ferry_backend::{Backend, BackendError, HostMark, Location, ObjectId, VolumeInfo};
use tracing::{info, warn};

use crate::store::{Queries, Store, ROOT_INO};

/// Meta key of the id of the volume a store belongs to.
const VOLUME_ID: &str = "volume_id";
/// Meta key of that volume's name, kept only to name it in messages.
const VOLUME_NAME: &str = "volume_name";
/// Meta key of the backend the store last replicated to, password removed:
/// kept to say which backend a mount without one has forgotten.
const BACKEND: &str = "backend";
/// Meta key of the store's high-water marks (`COUNTER LOG_SEQ`) as they
/// were when it was mounted without the check, before it wrote anything;
/// empty once the check passed (see [`verify_within`]).
const UNCHECKED: &str = "unchecked_marks";
/// Objects of another host a store bound before this check existed is asked
/// about (see [`Local::probes`]).
const PROBES: usize = 3;

/// Why a store may not replicate to a backend; each `Display` is one line.
#[derive(Debug)]
#[non_exhaustive]
pub enum BindingError {
    /// The store belongs to another volume.
    OtherVolume {
        /// The store directory.
        store: PathBuf,
        /// Id of the volume the store belongs to.
        bound_id: String,
        /// Its name, if the store knows it.
        bound_name: Option<String>,
        /// The backend (password removed).
        url: String,
        /// The volume at that backend.
        volume: Box<VolumeInfo>,
    },
    /// The backend holds more from this store's host than the store has
    /// ever made: the store was rolled back or lost commits.
    RolledBack {
        /// The store directory.
        store: PathBuf,
        /// The volume's name.
        volume: String,
        /// What the backend has from the store's host.
        backend: HostMark,
        /// The largest inode counter the store ever handed out.
        counter: u64,
        /// The largest log position the store ever wrote.
        log_seq: u64,
    },
    /// A store replicated before stores were bound to volumes, whose objects
    /// this volume does not have: most likely another volume's store.
    Unproven {
        /// The store directory.
        store: PathBuf,
        /// The backend (password removed).
        url: String,
        /// The volume at that backend.
        volume: Box<VolumeInfo>,
        /// How many of the store's objects were looked for.
        probed: usize,
    },
    /// The backend could not answer.
    Backend {
        /// The backend (password removed).
        url: String,
        /// What failed.
        source: BackendError,
    },
    /// The store could not be read or written.
    Store {
        /// The store directory.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
}

impl BindingError {
    /// Whether asking again later may succeed (the backend was unreachable);
    /// every other error is a verdict or needs a person.
    pub fn is_transient(&self) -> bool {
        matches!(self, BindingError::Backend { source, .. } if source.is_transient())
    }
}

impl fmt::Display for BindingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindingError::OtherVolume {
                store,
                bound_id,
                bound_name,
                url,
                volume,
            } => {
                let bound = bound_name.as_deref().unwrap_or("?");
                write!(
                    f,
                    "store {} belongs to volume {bound} ({bound_id}), not to the volume at \
                     {url} ({}, {}); refusing it",
                    store.display(),
                    volume.name,
                    volume.volume_id
                )
            }
            BindingError::RolledBack {
                store,
                volume,
                backend,
                counter,
                log_seq,
            } => write!(
                f,
                "store {} is older than what volume {volume} already has from it (backend has \
                 counter {} / log seq {}, store has counter {counter} / log seq {log_seq}): it \
                 was rolled back or lost commits; refusing it — restore a fresh store instead",
                store.display(),
                backend.max_counter,
                backend.shipped_seq
            ),
            BindingError::Unproven {
                store,
                url,
                volume,
                probed,
            } => write!(
                f,
                "store {} was replicated before ferry recorded volumes, and volume {} at {url} \
                 holds none of the {probed} restored objects looked up; refusing it — mount it \
                 with its own volume's backend once, or restore a fresh store",
                store.display(),
                volume.name
            ),
            BindingError::Backend { url, source } => {
                write!(f, "checking which volume {url} holds: {source}")
            }
            BindingError::Store { path, source } => {
                write!(
                    f,
                    "reading the binding of store {}: {source}",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for BindingError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BindingError::Backend { source, .. } => Some(source),
            BindingError::Store { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Checks that `store` may replicate to `backend` (at `location`), binding
/// an unbound store to the backend's volume. Two backend calls (three to
/// five for a store replicated before bindings existed, once).
pub fn verify(
    store: &Store,
    backend: &dyn Backend,
    location: &Location,
) -> Result<(), BindingError> {
    let url = &location.url();
    let local = Local::read(store)?;
    let remote = Remote::read(backend, &local).map_err(|source| BindingError::Backend {
        url: ferry_backend::redact(url),
        source,
    })?;
    settle(store, &local, &remote, url)
}

/// [`verify`] for a mount: connects to `location` itself and gives up after
/// `within` if the backend does not answer, so an unreachable backend
/// delays a mount by at most that and never fails it. Returns whether the
/// check ran; a refusal is an error.
///
/// When it gives up, the store's marks as they are now, before the mount
/// writes anything, are kept for the [`verify`] that follows: a store that
/// went back in time cannot then pass it by making new files offline.
pub fn verify_within(
    store: &Store,
    location: &Location,
    within: Duration,
) -> Result<bool, BindingError> {
    let url = &location.url();
    let local = Local::read(store)?;
    let (tx, rx) = mpsc::channel();
    let ask = {
        let (location, local) = (location.clone(), local.clone());
        move || {
            let remote = location
                .open(within)
                .and_then(|backend| Remote::read(&*backend, &local));
            let _ = tx.send(remote);
        }
    };
    // Left to finish on its own after a timeout: it holds nothing of the
    // store, and the backend's own timeouts end it.
    let asked = std::thread::Builder::new()
        .name("ferry-binding".into())
        .spawn(ask);
    let answer = match asked {
        Ok(_) => match rx.recv_timeout(within) {
            Ok(remote) => remote.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {within:?}")),
        },
        Err(e) => Err(e.to_string()),
    };
    let remote = match answer {
        Ok(remote) => remote,
        Err(why) => {
            warn!(
                "not checking now which volume store {} belongs to ({}: {why}); \
                 replication checks before it ships",
                local.dir.display(),
                ferry_backend::redact(url)
            );
            if local.unchecked.is_none() {
                let marks = format!("{} {}", local.counter, local.log_seq);
                store
                    .write(|tx| tx.set_meta_text(UNCHECKED, &marks))
                    .map_err(|source| BindingError::Store {
                        path: local.dir.clone(),
                        source,
                    })?;
            }
            return Ok(false);
        }
    };
    settle(store, &local, &remote, url).map(|()| true)
}

/// The volume a store belongs to, as the store remembers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    /// The volume's id.
    pub volume_id: String,
    /// Its name, if the store knows it.
    pub volume_name: Option<String>,
    /// The backend the store last replicated to, password removed; stores
    /// bound before ferry remembered it do not know.
    pub backend: Option<String>,
}

impl Bound {
    /// `NAME (ID)`, or the id alone.
    pub fn describe(&self) -> String {
        match &self.volume_name {
            Some(name) => format!("{name} ({})", self.volume_id),
            None => self.volume_id.clone(),
        }
    }
}

/// The volume `store` belongs to, if it was ever bound to one: such a
/// store must not be mounted without its backend by accident (its changes
/// would only pile up in its log).
pub fn bound(store: &Store) -> Result<Option<Bound>, BindingError> {
    let local = Local::read(store)?;
    Ok(local.bound.map(|(volume_id, volume_name)| Bound {
        volume_id,
        volume_name,
        backend: local.backend,
    }))
}

/// What the store says about itself.
#[derive(Clone, Debug)]
struct Local {
    dir: PathBuf,
    host: u32,
    /// The volume id and name the store is bound to.
    bound: Option<(String, Option<String>)>,
    /// The backend it last replicated to (password removed).
    backend: Option<String>,
    /// Whether the store ever replicated (shipped, or was restored).
    replicated: bool,
    /// High-water marks: the largest inode number (this host's counters
    /// are its inode numbers) and log position ever handed out.
    counter: u64,
    log_seq: u64,
    /// The marks kept by a mount that skipped the check (see [`UNCHECKED`]).
    unchecked: Option<(u64, u64)>,
    /// For an unbound store that replicated: a few objects of other hosts
    /// it restored, to ask the backend about.
    probes: Vec<ObjectId>,
}

impl Local {
    fn read(store: &Store) -> Result<Local, BindingError> {
        let db = |source| BindingError::Store {
            path: store.dir().to_path_buf(),
            source,
        };
        store
            .read(|r| -> rusqlite::Result<Local> {
                let bound = match r.meta_text(VOLUME_ID)? {
                    Some(id) => Some((id, r.meta_text(VOLUME_NAME)?)),
                    None => None,
                };
                let replicated = r.meta_int("shipped_seq")?.is_some();
                let probes = if bound.is_none() && replicated {
                    foreign_objects(r, store.host())?
                } else {
                    Vec::new()
                };
                let unchecked = r.meta_text(UNCHECKED)?.and_then(|m| {
                    let (counter, log_seq) = m.split_once(' ')?;
                    Some((counter.parse().ok()?, log_seq.parse().ok()?))
                });
                Ok(Local {
                    dir: store.dir().to_path_buf(),
                    host: store.host(),
                    bound,
                    backend: r.meta_text(BACKEND)?.filter(|b| !b.is_empty()),
                    replicated,
                    counter: r.sequence("inode")?,
                    log_seq: r.sequence("log")?,
                    unchecked,
                    probes,
                })
            })
            .map_err(db)
    }
}

/// Up to [`PROBES`] inodes of other hosts in the store: only a restore
/// brings them in, so the volume they came from has them.
fn foreign_objects(r: &impl Queries, host: u32) -> rusqlite::Result<Vec<ObjectId>> {
    let mut stmt = r.conn().prepare(
        "SELECT host, counter FROM inode WHERE ino != ?1 AND host != ?2 AND host != 0
         ORDER BY ino DESC LIMIT ?3",
    )?;
    let rows = stmt.query_map(rusqlite::params![ROOT_INO, host, PROBES as i64], |row| {
        Ok(ObjectId {
            host: row.get(0)?,
            counter: row.get::<_, i64>(1)? as u64,
        })
    })?;
    rows.collect()
}

/// What the backend says about its volume and the store's host.
#[derive(Debug)]
struct Remote {
    info: VolumeInfo,
    mark: HostMark,
    /// Whether the backend has anything from the store's host.
    knows_host: bool,
    /// Whether the backend holds any of [`Local::probes`].
    holds_probe: bool,
}

impl Remote {
    fn read(backend: &dyn Backend, local: &Local) -> Result<Remote, BackendError> {
        let info = backend.info()?;
        let mark = backend.host_mark(local.host)?;
        let knows_host = mark.max_counter > 0 || mark.shipped_seq > 0;
        let mut holds_probe = false;
        if !knows_host {
            for id in &local.probes {
                if backend.inode(id)?.is_some() {
                    holds_probe = true;
                    break;
                }
            }
        }
        Ok(Remote {
            info,
            mark,
            knows_host,
            holds_probe,
        })
    }
}

/// Judges the two sides, and binds an unbound store that passes.
fn settle(store: &Store, local: &Local, remote: &Remote, url: &str) -> Result<(), BindingError> {
    let volume = &remote.info;
    if let Some((bound_id, bound_name)) = &local.bound {
        if *bound_id != volume.volume_id {
            return Err(BindingError::OtherVolume {
                store: local.dir.clone(),
                bound_id: bound_id.clone(),
                bound_name: bound_name.clone(),
                url: ferry_backend::redact(url),
                volume: Box::new(volume.clone()),
            });
        }
    }
    let mark = remote.mark;
    let (counter, log_seq) = local.unchecked.unwrap_or((local.counter, local.log_seq));
    if mark.max_counter > counter || mark.shipped_seq > log_seq {
        return Err(BindingError::RolledBack {
            store: local.dir.clone(),
            volume: volume.name.clone(),
            backend: mark,
            counter,
            log_seq,
        });
    }
    // An unbound store that never replicated joins this volume now. One
    // that did (made before bindings existed) must show it is this
    // volume's: the backend knows its host, or holds what it restored.
    let unbound = local.bound.is_none();
    if unbound
        && local.replicated
        && !remote.knows_host
        && !local.probes.is_empty()
        && !remote.holds_probe
    {
        return Err(BindingError::Unproven {
            store: local.dir.clone(),
            url: ferry_backend::redact(url),
            volume: Box::new(volume.clone()),
            probed: local.probes.len(),
        });
    }
    let shown = ferry_backend::redact(url);
    let new_backend = local.backend.as_deref() != Some(shown.as_str());
    if !unbound && local.unchecked.is_none() && !new_backend {
        return Ok(());
    }
    store
        .write(|tx| -> rusqlite::Result<()> {
            if unbound {
                tx.set_meta_text(VOLUME_ID, &volume.volume_id)?;
                tx.set_meta_text(VOLUME_NAME, &volume.name)?;
            }
            tx.set_meta_text(BACKEND, &shown)?;
            tx.set_meta_text(UNCHECKED, "")
        })
        .map_err(|source| BindingError::Store {
            path: local.dir.clone(),
            source,
        })?;
    if unbound {
        info!(
            "store {} now belongs to volume {} ({})",
            local.dir.display(),
            volume.name,
            volume.volume_id
        );
    }
    Ok(())
}
