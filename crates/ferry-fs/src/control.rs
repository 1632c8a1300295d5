//! The daemon's control socket, `STORE/control.sock`: how `ferry status`
//! and `ferry sync` reach a running daemon, whose store nobody else may open.
//!
//! The protocol is one request line answered by JSON lines: `status` gets
//! one [`Report`]; `sync` gets a report every 200 ms until everything
//! logged before the request is committed at the backend, then a last one
//! with `done: true` (the client bounds the wait); `pause-down-sync` and
//! `resume-down-sync` stop and restart following the other hosts (a
//! `reads=fresh` open still looks), and get one report.
//!
//! `sync` is where invariant I1 is kept (see [`crate::replicate`]): files
//! open for writing are logged first, so their current bytes are waited
//! for too, and it is done only once this daemon run has checked the
//! backend is the store's volume. Conflicts kept along the way are in the
//! report; a client must not call a sync with conflicts a success.
//!
//! A mount may also serve Prometheus metrics over HTTP ([`serve_metrics`],
//! opt-in with `-o metrics=ADDR`): the replication numbers of
//! [`Shared::status`], read at each scrape, next to what the FUSE layer and
//! the cache count as they go. The exposition is the `prometheus` crate's;
//! the listener answers `GET /metrics`, one request per connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Gauge, Opts, Registry};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::replicate::{Shared, Status};
use crate::store::Queries;
use crate::vfs::Vfs;

/// What one answer line carries.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// The store directory.
    pub store: String,
    /// Whether the volume has no backend (nothing is ever pending).
    pub local_only: bool,
    /// The replicator's view.
    #[serde(flatten)]
    pub status: Status,
    /// For `sync`: the record it waits for.
    pub target_seq: Option<u64>,
    /// For `sync`: the last line, everything up to `target_seq` is committed.
    pub done: bool,
    /// The processes whose context is not the mount's default.
    #[serde(default)]
    pub processes: Vec<crate::context::ProcessInfo>,
    /// How the mount serves the kernel: transport, threads, passthrough
    /// (absent from a daemon older than this field, or not yet mounted).
    #[serde(default)]
    pub serving: Option<String>,
}

/// What the control socket answers about.
pub struct Daemon {
    /// The mount's file system.
    pub vfs: Arc<Vfs>,
    /// Its replicator, if it has a backend.
    pub replication: Option<Arc<Shared>>,
    /// How it serves the kernel, set once the session is up.
    pub serving: OnceLock<String>,
}

/// The socket path of a store.
pub fn socket_path(store: &Path) -> PathBuf {
    store.join("control.sock")
}

/// Serves the control socket of the daemon's store on a thread, for the
/// life of the daemon.
pub fn serve(daemon: Arc<Daemon>) -> std::io::Result<()> {
    let path = socket_path(daemon.vfs.store().dir());
    // A socket file left by a killed daemon: the store lock proves no live
    // daemon owns it, so it is safe to replace.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::thread::Builder::new()
        .name("ferry-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let daemon = daemon.clone();
                let spawned = std::thread::Builder::new()
                    .name("ferry-control-conn".into())
                    .spawn(move || {
                        match answer(conn, &daemon) {
                            // A client that stopped listening (a sync that
                            // timed out): nothing went wrong here.
                            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                                debug!("control client left: {e}")
                            }
                            Err(e) => warn!("control request: {e}"),
                            Ok(()) => {}
                        }
                    });
                if let Err(e) = spawned {
                    warn!("control: {e}");
                }
            }
        })?;
    Ok(())
}

fn report(daemon: &Daemon) -> Report {
    let vfs = &daemon.vfs;
    let status = match daemon.replication.as_deref() {
        Some(r) => r.status(vfs.store()),
        None => {
            let head = vfs.store().read(|r| r.log_head()).map_or(0, |s| s.0);
            Status {
                shipped_seq: head,
                head_seq: head,
                ..Status::default()
            }
        }
    };
    Report {
        store: vfs.store().dir().display().to_string(),
        local_only: daemon.replication.is_none(),
        status,
        processes: vfs.processes().list(),
        serving: daemon.serving.get().cloned(),
        ..Report::default()
    }
}

fn answer(conn: UnixStream, daemon: &Daemon) -> std::io::Result<()> {
    let (vfs, replication) = (&daemon.vfs, daemon.replication.as_deref());
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let mut out = &conn;
    let send = |out: &mut &UnixStream, r: &Report| -> std::io::Result<()> {
        let mut json = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        json.push(b'\n');
        out.write_all(&json)
    };
    match line.trim() {
        "status" => send(&mut out, &report(daemon)),
        "sync" => {
            let _urgent = replication.map(Shared::urgent);
            vfs.log_open_writers()
                .map_err(|e| std::io::Error::from_raw_os_error(e.code()))?;
            // Everything logged so far is durable locally first.
            vfs.store().sync()?;
            let target = vfs
                .store()
                .read(|r| r.log_head())
                .map_err(std::io::Error::other)?
                .0;
            // Bounded by the client: when it gives up and closes, the
            // next write fails and this loop ends.
            loop {
                let mut r = report(daemon);
                r.target_seq = Some(target);
                r.done = r.local_only
                    || (r.status.verified && r.status.shipped_seq >= target && !r.status.resolving);
                send(&mut out, &r)?;
                if r.done {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        // For operators and tests: hold this host's view of the others
        // still (a fresh open still looks), then let it follow again.
        request @ ("pause-down-sync" | "resume-down-sync") => {
            if let Some(shared) = replication {
                shared.pause_down_sync(request == "pause-down-sync");
            }
            send(&mut out, &report(daemon))
        }
        other => Err(std::io::Error::other(format!("unknown request {other:?}"))),
    }
}

/// How long a client waits for each answer line: the daemon sends one at
/// once, or every 200 ms while a sync runs, so silence this long means the
/// daemon is stuck.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Client side: sends `request` to the daemon of `store` and returns the
/// answer lines as they come, each within [`ANSWER_TIMEOUT`].
pub fn request(
    store: &Path,
    request: &str,
) -> std::io::Result<impl Iterator<Item = std::io::Result<Report>>> {
    let conn = UnixStream::connect(socket_path(store))?;
    conn.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    (&conn).write_all(format!("{request}\n").as_bytes())?;
    Ok(BufReader::new(conn)
        .lines()
        .map(|line| serde_json::from_str(&line?).map_err(std::io::Error::other)))
}

/// The registry of one mount's metrics; every name starts with `ferry_`.
pub fn registry() -> Registry {
    Registry::new_custom(Some("ferry".into()), None)
        .unwrap_or_else(|e| unreachable!("\"ferry\" is a valid metric prefix: {e}"))
}

/// Serves `registry` (plus, with replication, the replication numbers) on
/// `listener`, on a thread for the life of the daemon. Requests are
/// answered one at a time, each bounded by [`SCRAPE_TIMEOUT`].
pub fn serve_metrics(
    listener: TcpListener,
    registry: Registry,
    vfs: Arc<Vfs>,
    replication: Option<Arc<Shared>>,
) -> std::io::Result<()> {
    if let Some(shared) = replication {
        let collector = ReplicationMetrics::new(vfs, shared).map_err(std::io::Error::other)?;
        registry
            .register(Box::new(collector))
            .map_err(std::io::Error::other)?;
    }
    std::thread::Builder::new()
        .name("ferry-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if let Err(e) = answer_scrape(conn, &registry) {
                    debug!("metrics request: {e}");
                }
            }
        })?;
    Ok(())
}

/// How long one metrics request may take to arrive or to be sent.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read.
const MAX_REQUEST_HEAD: u64 = 8 << 10;

fn answer_scrape(conn: TcpStream, registry: &Registry) -> std::io::Result<()> {
    conn.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    conn.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    let mut head = BufReader::new((&conn).take(MAX_REQUEST_HEAD));
    let mut request_line = String::new();
    head.read_line(&mut request_line)?;
    // The rest of the head is read so the client sees no reset; its
    // contents do not matter.
    let mut line = String::new();
    while head.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut words = request_line.split_whitespace();
    let (status, content_type, body) = match (words.next(), words.next()) {
        (Some("GET"), Some("/metrics" | "/")) => {
            let text = prometheus::TextEncoder::new()
                .encode_to_string(&registry.gather())
                .map_err(std::io::Error::other)?;
            ("200 OK", prometheus::TEXT_FORMAT, text)
        }
        (Some("GET"), _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "ferry serves its metrics at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics is served\n".to_string(),
        ),
    };
    let mut out = &conn;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

/// How a replication number is read from the status.
type Reader = fn(&Status) -> f64;
/// A replication number: its name, its help, and how it is read.
type Reading = (&'static str, &'static str, Reader);

/// Replication numbers that go up and down.
const GAUGES: &[Reading] = &[
    (
        "pending_changes",
        "Log records not yet committed at the backend.",
        |s| s.pending_ops as f64,
    ),
    (
        "pending_bytes",
        "Bytes of file contents the pending records may upload.",
        |s| s.pending_bytes as f64,
    ),
    (
        "oldest_pending_seconds",
        "Age of the oldest pending record (0: none).",
        |s| s.oldest_pending_age_s.unwrap_or(0.0),
    ),
    (
        "conflicts",
        "Conflicts held back, waiting to be resolved.",
        |s| s.conflicts as f64,
    ),
    (
        "resolved_conflicts",
        "Conflicts resolved on this host that ferry status lists.",
        |s| s.resolved.len() as f64,
    ),
    (
        "last_contact_timestamp_seconds",
        "Unix time of the last successful backend call (0: none yet).",
        |s| s.last_contact.unwrap_or(0.0),
    ),
    (
        "backend_verified",
        "1 once this run checked the backend is the store's volume.",
        |s| f64::from(u8::from(s.verified)),
    ),
    (
        "shipped_seq",
        "Last log record committed at the backend.",
        |s| s.shipped_seq as f64,
    ),
    ("head_seq", "Newest log record.", |s| s.head_seq as f64),
    ("feed_seq", "Backend feed position applied here.", |s| {
        s.feed_seq as f64
    }),
    (
        "prefetch_files_done",
        "Files the background prefetch has fetched.",
        |s| s.prefetch.as_ref().map_or(0.0, |p| p.files_done as f64),
    ),
    (
        "prefetch_files_total",
        "Files the prefetch policy chose.",
        |s| s.prefetch.as_ref().map_or(0.0, |p| p.files_total as f64),
    ),
    (
        "prefetch_bytes_done",
        "Bytes the background prefetch has fetched.",
        |s| s.prefetch.as_ref().map_or(0.0, |p| p.bytes_done as f64),
    ),
    (
        "prefetch_bytes_total",
        "Bytes the prefetch policy chose.",
        |s| s.prefetch.as_ref().map_or(0.0, |p| p.bytes_total as f64),
    ),
];

/// Replication numbers that only grow while the daemon runs.
const COUNTERS: &[Reading] = &[
    (
        "shipped_bytes_total",
        "Bytes of chunks uploaded to the backend.",
        |s| s.bytes_uploaded as f64,
    ),
    (
        "shipped_chunks_total",
        "Chunks uploaded to the backend.",
        |s| s.chunks_uploaded as f64,
    ),
    (
        "replication_errors_total",
        "Failed replication attempts (each retried).",
        |s| s.errors as f64,
    ),
    (
        "applied_changes_total",
        "Changes of other hosts applied to this store.",
        |s| s.applied as f64,
    ),
];

/// The replication numbers, read from [`Shared::status`] at each scrape.
struct ReplicationMetrics {
    vfs: Arc<Vfs>,
    shared: Arc<Shared>,
    gauges: Vec<(Gauge, Reader)>,
    counters: Vec<(Counter, Reader)>,
}

impl ReplicationMetrics {
    fn new(vfs: Arc<Vfs>, shared: Arc<Shared>) -> prometheus::Result<ReplicationMetrics> {
        let gauges = GAUGES
            .iter()
            .map(|&(name, help, read)| Ok((Gauge::with_opts(Opts::new(name, help))?, read)))
            .collect::<prometheus::Result<_>>()?;
        let counters = COUNTERS
            .iter()
            .map(|&(name, help, read)| Ok((Counter::with_opts(Opts::new(name, help))?, read)))
            .collect::<prometheus::Result<_>>()?;
        Ok(ReplicationMetrics {
            vfs,
            shared,
            gauges,
            counters,
        })
    }
}

impl Collector for ReplicationMetrics {
    fn desc(&self) -> Vec<&Desc> {
        let gauges = self.gauges.iter().flat_map(|(g, _)| g.desc());
        gauges
            .chain(self.counters.iter().flat_map(|(c, _)| c.desc()))
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let status = self.shared.status(self.vfs.store());
        for (gauge, read) in &self.gauges {
            gauge.set(read(&status));
        }
        for (counter, read) in &self.counters {
            // The status counts since the daemon started, as the counter does.
            counter.inc_by((read(&status) - counter.get()).max(0.0));
        }
        let gauges = self.gauges.iter().flat_map(|(g, _)| g.collect());
        gauges
            .chain(self.counters.iter().flat_map(|(c, _)| c.collect()))
            .collect()
    }
}
