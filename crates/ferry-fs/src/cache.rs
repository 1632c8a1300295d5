//! The local cache of a replicated volume: when the bytes cached in the
//! store pass `--cache-size`, clean files are evicted, least recently
//! opened first, down to 90% of the limit.
//!
//! Clean means the backend has exactly these bytes: the file shipped (its
//! chunk list is recorded) and no log record after the last shipped one
//! names it. An evicted file keeps its name and attributes; its bytes come
//! back from the backend on the next open. Dirty or open files are never
//! evicted, so the cache can exceed the limit while the backend is away.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::store::Queries;
use crate::vfs::Vfs;

/// How often the cache size is checked.
const PERIOD: Duration = Duration::from_secs(2);

/// The evictor thread. Dropping it stops and joins the thread; an eviction
/// interrupted by a crash leaves either the file cached or evicted, both
/// consistent (the row is updated before the data file is removed).
pub struct Evictor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Evictor {
    /// Keeps `vfs`'s cached bytes under `limit`.
    pub fn start(vfs: Arc<Vfs>, limit: u64) -> std::io::Result<Evictor> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ferry-evict".into())
                .spawn(move || run(&vfs, limit, &stop))?
        };
        Ok(Evictor {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Evictor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("the eviction thread panicked");
            }
        }
    }
}

fn run(vfs: &Vfs, limit: u64, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        if let Err(e) = pass(vfs, limit) {
            warn!("cache eviction: {e}");
        }
        let next = Instant::now() + PERIOD;
        while !stop.load(Ordering::SeqCst) && Instant::now() < next {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One check: measure, and evict if over the limit.
fn pass(vfs: &Vfs, limit: u64) -> Result<(), String> {
    let data = vfs.store().dir().join("data");
    let cached: u64 = std::fs::read_dir(&data)
        .map_err(|e| format!("{}: {e}", data.display()))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    if cached <= limit {
        return Ok(());
    }
    let candidates = vfs
        .store()
        .read(|r| {
            let shipped = r.meta_int("shipped_seq")?.unwrap_or(0) as u64;
            r.clean_cached_files(shipped)
        })
        .map_err(|e| e.to_string())?;
    vfs.evict(&candidates, cached, limit / 10 * 9)
        .map_err(|e| format!("{e:?}"))?;
    Ok(())
}
