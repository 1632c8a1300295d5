//! The local cache of a replicated volume: when the bytes cached in the
//! store pass `--cache-size`, clean files are evicted, least recently
//! opened first, down to 90% of the limit.
//!
//! Clean means the backend has exactly these bytes: the file shipped (its
//! chunk list is recorded) and no log record after the last shipped one
//! names it. An evicted file keeps its name and attributes; its bytes come
//! back from the backend on the next open. Dirty or open files are never
//! evicted, so the cache can exceed the limit while the backend is away.
//!
//! With metrics on, each pass reports the bytes cached and what it evicted
//! (`ferry_cache_bytes`, `ferry_cache_evictions_total`,
//! `ferry_cache_evicted_bytes_total`); hits and misses are counted where
//! files are opened ([`crate::fuse`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge, Registry};
use tracing::{info, warn};

use crate::ids::Ino;
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

/// What the evictor reports to the metrics endpoint.
struct CacheMetrics {
    cached: IntGauge,
    evictions: IntCounter,
    evicted_bytes: IntCounter,
}

impl CacheMetrics {
    fn register(registry: &Registry, limit: u64) -> prometheus::Result<CacheMetrics> {
        let limit_gauge = IntGauge::new("cache_limit_bytes", "The cache size limit (cache_size).")?;
        limit_gauge.set(i64::try_from(limit).unwrap_or(i64::MAX));
        let m = CacheMetrics {
            cached: IntGauge::new(
                "cache_bytes",
                "Bytes of file contents cached, as last measured.",
            )?,
            evictions: IntCounter::new("cache_evictions_total", "Files evicted from the cache.")?,
            evicted_bytes: IntCounter::new(
                "cache_evicted_bytes_total",
                "Bytes of file contents evicted from the cache.",
            )?,
        };
        registry.register(Box::new(limit_gauge))?;
        registry.register(Box::new(m.cached.clone()))?;
        registry.register(Box::new(m.evictions.clone()))?;
        registry.register(Box::new(m.evicted_bytes.clone()))?;
        Ok(m)
    }
}

impl Evictor {
    /// Keeps `vfs`'s cached bytes under `limit`, reporting to `metrics` if
    /// given.
    pub fn start(
        vfs: Arc<Vfs>,
        limit: u64,
        metrics: Option<&Registry>,
    ) -> std::io::Result<Evictor> {
        let metrics = metrics
            .map(|r| CacheMetrics::register(r, limit))
            .transpose()
            .map_err(std::io::Error::other)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ferry-evict".into())
                .spawn(move || run(&vfs, limit, &stop, metrics.as_ref()))?
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

fn run(vfs: &Vfs, limit: u64, stop: &AtomicBool, metrics: Option<&CacheMetrics>) {
    while !stop.load(Ordering::SeqCst) {
        if let Err(e) = pass(vfs, limit, metrics) {
            warn!("cache eviction: {e}");
        }
        let next = Instant::now() + PERIOD;
        while !stop.load(Ordering::SeqCst) && Instant::now() < next {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One check: measure, and evict if over the limit.
fn pass(vfs: &Vfs, limit: u64, metrics: Option<&CacheMetrics>) -> Result<(), String> {
    let data = vfs.store().dir().join("data");
    let cached: u64 = std::fs::read_dir(&data)
        .map_err(|e| format!("{}: {e}", data.display()))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    if let Some(m) = metrics {
        m.cached.set(i64::try_from(cached).unwrap_or(i64::MAX));
    }
    if cached <= limit {
        return Ok(());
    }
    let candidates = vfs
        .store()
        .read(|r| {
            let shipped = crate::log::Outbox::cursor(r)?;
            r.clean_cached_files(shipped)
        })
        .map_err(|e| e.to_string())?;
    let resident = |ino: &&Ino| vfs.store().data_path(**ino).exists();
    let before: Vec<Ino> = candidates.iter().filter(resident).copied().collect();
    let left = vfs
        .evict(&candidates, cached, limit / 10 * 9)
        .map_err(|e| format!("{e:?}"))?;
    let files = before.iter().filter(|i| !resident(i)).count() as u64;
    let bytes = cached.saturating_sub(left);
    if files > 0 {
        info!("cache over {limit} bytes: evicted {files} files, {bytes} bytes");
    }
    if let Some(m) = metrics {
        m.evictions.inc_by(files);
        m.evicted_bytes.inc_by(bytes);
        m.cached.set(i64::try_from(left).unwrap_or(i64::MAX));
    }
    Ok(())
}
