//! Fetching file contents from the backend: at the link's bandwidth, not
//! at its round-trip time.
//!
//! A file this host does not have the bytes of (restored, pulled by
//! down-sync, or evicted) is fetched when it is opened. One file at a time,
//! in series, a far backend costs a round trip per file (at 50 ms, a tree
//! of 3,600 files took 347 s). So:
//!
//! - chunks travel many to one call ([`Backend::get_chunks`]), files a
//!   group at a time;
//! - an open that must fetch also queues the other uncached files of its
//!   directory (read-ahead: a directory being read is read whole);
//! - background workers, several at once, fetch what is queued and, by
//!   the prefetch policy ([`Prefetch`]), every small (or every) file after
//!   a restore or a down-sync, as Coda hoards;
//! - an open waits only for its own file: if a worker has it in flight,
//!   the open waits for that instead of fetching it twice.
//!
//! Bytes are written straight into the data file: a file whose row says
//! "not cached" has no bytes anyone trusts, so a half-written one is never
//! read. After a group is written, one `syncfs` makes it durable, and one
//! store transaction marks each file cached, if its chunk list is still
//! the one fetched (down-sync may have changed it meanwhile; then the
//! bytes are simply not trusted, and fetched again when needed). An open
//! file whose contents changed at another host is rewritten the same way,
//! in place, so a reader holding it open sees the new bytes.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_backend::{Backend, ChunkHash};
use tracing::{debug, info, warn};

use super::{ChunkList, Link, Prefetch, PrefetchProgress, Shared, HOLE};
use crate::ids::Ino;
use crate::store::{Kind, Queries, Store};
use crate::vfs::{ContentSource, Vfs};

/// Background fetch workers: enough to keep a far link busy (each has
/// one group in flight).
const WORKERS: usize = 4;
/// Bytes asked for in one backend call, at most.
const CALL_BYTES: u64 = 16 << 20;
/// Files fetched as one group, at most.
const GROUP_FILES: usize = 256;
/// Files of a directory queued by one open's read-ahead, at most.
const READAHEAD_FILES: usize = 1024;

/// Where one distinct chunk goes: its length, and (file index, offset)
/// for each place it fills.
type Places = (u32, Vec<(usize, u64)>);

/// Fetches the contents of uncached files from the backend.
pub(crate) struct Fetcher {
    link: Arc<Link>,
    shared: Arc<Shared>,
    policy: Prefetch,
    max_file: u64,
    /// Files being fetched now; an open of one waits on `landed`.
    inflight: Mutex<HashSet<Ino>>,
    landed: Condvar,
    /// Files queued for the workers (read-ahead, down-sync), and whether
    /// the policy's scan of the whole store is due.
    queue: Mutex<Queue>,
    work: Condvar,
}

#[derive(Default)]
struct Queue {
    files: VecDeque<Ino>,
    queued: HashSet<Ino>,
    /// The prefetch scan: next inode number to look at, if one is due.
    scan: Option<Ino>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Fetcher {
    /// A fetcher over the mount's shared backend handle.
    pub(crate) fn new(
        link: Arc<Link>,
        shared: Arc<Shared>,
        policy: Prefetch,
        max_file: u64,
    ) -> Fetcher {
        Fetcher {
            link,
            shared,
            policy,
            max_file,
            inflight: Mutex::new(HashSet::new()),
            landed: Condvar::new(),
            queue: Mutex::new(Queue {
                // A mount starts with a scan: a restore, or files another
                // run left uncached.
                scan: (policy != Prefetch::None).then_some(Ino(0)),
                ..Queue::default()
            }),
            work: Condvar::new(),
        }
    }

    /// Starts the background workers, which stop with replication.
    pub(crate) fn start(self: &Arc<Self>, vfs: &Arc<Vfs>) -> std::io::Result<Vec<JoinHandle<()>>> {
        (0..WORKERS)
            .map(|i| {
                let (me, vfs) = (self.clone(), vfs.clone());
                std::thread::Builder::new()
                    .name(format!("ferry-fetch-{i}"))
                    .spawn(move || me.work(&vfs))
            })
            .collect()
    }

    /// Wakes the workers so they see replication stopping.
    pub(crate) fn wake_all(&self) {
        let _q = lock(&self.queue);
        self.work.notify_all();
    }

    /// Queues files that down-sync brought or changed, as the policy says.
    pub(crate) fn prefetch(&self, vfs: &Vfs, inos: &std::collections::BTreeSet<Ino>) {
        if self.policy == Prefetch::None || inos.is_empty() {
            return;
        }
        let limit = self.size_limit();
        let chosen: Vec<Ino> = vfs.store().read(|r| {
            inos.iter()
                .copied()
                .filter(|&ino| {
                    r.inode(ino)
                        .ok()
                        .flatten()
                        .is_some_and(|i| !i.cached && i.size <= limit)
                })
                .collect()
        });
        self.enqueue(chosen);
    }

    fn size_limit(&self) -> u64 {
        match self.policy {
            Prefetch::All => u64::MAX,
            _ => self.max_file,
        }
    }

    fn enqueue(&self, inos: impl IntoIterator<Item = Ino>) {
        let mut q = lock(&self.queue);
        let mut added = 0u64;
        for ino in inos {
            if q.queued.insert(ino) {
                q.files.push_back(ino);
                added += 1;
            }
        }
        if added > 0 {
            self.work.notify_all();
        }
    }

    /// A worker: fetches queued groups until replication stops.
    fn work(&self, vfs: &Vfs) {
        let store = vfs.store();
        while !self.shared.stop.load(Ordering::SeqCst) {
            let group = self.next_group(store);
            if group.is_empty() {
                let q = lock(&self.queue);
                if q.files.is_empty() && q.scan.is_none() {
                    let _ = self.work.wait_timeout(q, Duration::from_secs(1));
                }
                continue;
            }
            let claimed = self.claim(&group);
            if claimed.is_empty() {
                continue;
            }
            let result = self.fetch_group(store, &claimed);
            self.release(&claimed);
            match result {
                Ok((files, bytes)) => self.shared.update(|s| {
                    if let Some(p) = &mut s.prefetch {
                        p.files_done += files;
                        p.bytes_done += bytes;
                    }
                }),
                Err(e) => {
                    warn!("prefetch: {e}; trying again later");
                    // Put them back, after a pause for the backend.
                    {
                        let mut q = lock(&self.queue);
                        for &ino in &claimed {
                            if q.queued.insert(ino) {
                                q.files.push_back(ino);
                            }
                        }
                    }
                    self.shared.pause(Duration::from_secs(2));
                }
            }
        }
    }

    /// The next group: queued files first, then the policy's scan.
    fn next_group(&self, store: &Store) -> Vec<Ino> {
        let mut q = lock(&self.queue);
        let mut group = Vec::new();
        while group.len() < GROUP_FILES {
            let Some(ino) = q.files.pop_front() else {
                break;
            };
            q.queued.remove(&ino);
            group.push(ino);
        }
        if !group.is_empty() {
            return group;
        }
        let Some(after) = q.scan else {
            return group;
        };
        let limit = self.size_limit();
        let page = store.read(|r| r.uncached_files(after, limit, GROUP_FILES));
        match page {
            Ok(page) if !page.is_empty() => {
                if after == Ino(0) {
                    let total = store.read(|r| r.uncached_total(limit)).unwrap_or((0, 0));
                    info!(
                        "prefetch: {} file(s), {} bytes to fetch in the background",
                        total.0, total.1
                    );
                    self.shared.update(|s| {
                        s.prefetch = Some(PrefetchProgress {
                            files_total: total.0,
                            bytes_total: total.1,
                            ..PrefetchProgress::default()
                        })
                    });
                }
                q.scan = page.last().map(|&(ino, _)| ino);
                page.into_iter().map(|(ino, _)| ino).collect()
            }
            Ok(_) => {
                q.scan = None;
                group
            }
            Err(e) => {
                warn!("prefetch: reading the store: {e}");
                q.scan = None;
                group
            }
        }
    }

    /// Marks the files of `group` that no one else is fetching as in
    /// flight; returns them.
    fn claim(&self, group: &[Ino]) -> Vec<Ino> {
        let mut inflight = lock(&self.inflight);
        group
            .iter()
            .copied()
            .filter(|&ino| inflight.insert(ino))
            .collect()
    }

    fn release(&self, group: &[Ino]) {
        let mut inflight = lock(&self.inflight);
        for ino in group {
            inflight.remove(ino);
        }
        self.landed.notify_all();
    }

    /// Fetches the uncached files among `inos` in as few backend calls as
    /// their sizes allow; returns the files and bytes that landed.
    fn fetch_group(&self, store: &Store, inos: &[Ino]) -> Result<(u64, u64), String> {
        // What each file needs, read once.
        let mut wanted: Vec<(Ino, ChunkList, i64)> = Vec::new();
        store
            .read(|r| -> rusqlite::Result<()> {
                for &ino in inos {
                    let Some(inode) = r.inode(ino)? else { continue };
                    if inode.cached || inode.kind() != Kind::File {
                        continue;
                    }
                    let chunks = r.chunks(ino)?;
                    let total: u64 = chunks.iter().map(|(_, len)| u64::from(*len)).sum();
                    if total != inode.size {
                        // Garbage from the backend: never served.
                        warn!(
                            "inode {ino} ({}): its chunks add up to {total} bytes, its size is {}",
                            inode.global_id(),
                            inode.size
                        );
                        continue;
                    }
                    wanted.push((ino, chunks, inode.mtime));
                }
                Ok(())
            })
            .map_err(|e| format!("local store: {e}"))?;
        if wanted.is_empty() {
            return Ok((0, 0));
        }
        let backend = self.link.get().map_err(|e| e.to_string())?;
        let result = self.write_files(store, &*backend, &wanted);
        if result.is_err() {
            // The connection may be what failed; reconnect next time.
            self.link.reset();
        }
        let bytes = result?;
        // Durable before the store trusts them.
        let dir = std::fs::File::open(store.dir().join("data")).map_err(|e| e.to_string())?;
        nix::unistd::syncfs(&dir).map_err(|e| format!("syncfs: {e}"))?;
        let landed = store
            .write(|tx| -> rusqlite::Result<u64> {
                let mut n = 0;
                for (ino, chunks, _) in &wanted {
                    let same = tx
                        .inode(*ino)?
                        .is_some_and(|i| !i.cached && i.kind() == Kind::File)
                        && tx.chunks(*ino)? == *chunks;
                    if same {
                        tx.set_cached(*ino, true)?;
                        n += 1;
                    }
                }
                Ok(n)
            })
            .map_err(|e| format!("local store: {e}"))?;
        debug!("fetched {landed} file(s), {bytes} bytes");
        Ok((landed, bytes))
    }

    /// Writes the bytes of `wanted` into their data files: each distinct
    /// chunk is asked for once, [`CALL_BYTES`] a call. Returns the bytes
    /// written.
    fn write_files(
        &self,
        store: &Store,
        backend: &dyn Backend,
        wanted: &[(Ino, ChunkList, i64)],
    ) -> Result<u64, String> {
        // Every distinct chunk and where it goes.
        let mut places: BTreeMap<ChunkHash, Places> = BTreeMap::new();
        let mut files = Vec::with_capacity(wanted.len());
        for (i, (ino, chunks, _)) in wanted.iter().enumerate() {
            let path = store.data_path(*ino);
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let total: u64 = chunks.iter().map(|(_, len)| u64::from(*len)).sum();
            // Old bytes go; holes stay holes.
            file.set_len(0)
                .and_then(|()| file.set_len(total))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            files.push(file);
            let mut at = 0;
            for (hash, len) in chunks {
                if *hash != HOLE {
                    places
                        .entry(*hash)
                        .or_insert((*len, Vec::new()))
                        .1
                        .push((i, at));
                }
                at += u64::from(*len);
            }
        }
        let mut written = 0u64;
        let mut call: Vec<ChunkHash> = Vec::new();
        let mut call_bytes = 0u64;
        let hashes: Vec<(ChunkHash, u32)> = places.iter().map(|(h, (len, _))| (*h, *len)).collect();
        for (idx, (hash, len)) in hashes.iter().enumerate() {
            call.push(*hash);
            call_bytes += u64::from(*len);
            let last = idx + 1 == hashes.len();
            if call_bytes < CALL_BYTES && !last {
                continue;
            }
            let got = backend.get_chunks(&call).map_err(|e| e.to_string())?;
            if got.len() != call.len() {
                return Err(format!(
                    "asked for {} chunks, got {}",
                    call.len(),
                    got.len()
                ));
            }
            for (h, data) in call.iter().zip(got) {
                let (len, at) = &places[h];
                if data.len() != *len as usize {
                    return Err(format!(
                        "chunk {} has {} bytes, expected {len}",
                        h.to_hex(),
                        data.len()
                    ));
                }
                for &(i, offset) in at {
                    files[i]
                        .write_all_at(&data, offset)
                        .map_err(|e| format!("writing inode {}: {e}", wanted[i].0))?;
                    written += data.len() as u64;
                }
            }
            call.clear();
            call_bytes = 0;
        }
        // The data file stands for a file's mtime; the backend's it is.
        for (file, (_, _, mtime)) in files.iter().zip(wanted) {
            let _ = file.set_modified(crate::vfs::to_system_time(*mtime));
        }
        Ok(written)
    }

    /// Fetches the new contents of `ino`, which a reader holds open, now.
    pub(crate) fn refresh(&self, vfs: &Vfs, ino: Ino) -> Result<(), String> {
        self.fetch_one(vfs.store(), ino)
    }

    /// Fetches `ino` for an open, waiting for a worker that already has
    /// it in flight instead of fetching it twice.
    fn fetch_one(&self, store: &Store, ino: Ino) -> Result<(), String> {
        {
            let mut inflight = lock(&self.inflight);
            // Bounded: each wake is a group landing; the file is either
            // fetched by then or free to claim.
            while inflight.contains(&ino) {
                inflight = self
                    .landed
                    .wait_timeout(inflight, Duration::from_secs(1))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            inflight.insert(ino);
        }
        let result = self.fetch_group(store, &[ino]);
        self.release(&[ino]);
        let cached = store
            .read(|r| r.inode(ino))
            .map_err(|e| e.to_string())?
            .is_none_or(|i| i.cached);
        match result {
            Ok(_) if cached => Ok(()),
            Ok(_) => Err("its contents changed while they were fetched; try again".into()),
            Err(e) => Err(e),
        }
    }

    /// Queues the other uncached files of `ino`'s directory: what is read
    /// next, most likely.
    fn read_ahead(&self, store: &Store, ino: Ino) {
        let limit = self.size_limit().max(self.max_file);
        let siblings = store.read(|r| -> rusqlite::Result<Vec<Ino>> {
            let Some((dir, _)) = r.names_of(ino)?.into_iter().next() else {
                return Ok(Vec::new());
            };
            r.uncached_in(dir, limit, READAHEAD_FILES)
        });
        match siblings {
            Ok(s) => self.enqueue(s.into_iter().filter(|&s| s != ino)),
            Err(e) => debug!("read-ahead of inode {ino}: {e}"),
        }
    }
}

impl ContentSource for Fetcher {
    fn fetch(&self, store: &Store, ino: Ino) -> Result<(), String> {
        self.read_ahead(store, ino);
        self.fetch_one(store, ino)
    }
}
