//! Many hosts, one namespace (issue 9), measured: several ferry mounts of
//! one volume, each with its own store, as separate hosts would have. Not a
//! timed test: it prints markdown tables for docs/benchmarks.md, each a
//! side-by-side comparison made in this one run. Four parts:
//!
//! 1. **visibility**: how long a change made on host A takes to show on
//!    host B, over N changes, alternating a new file (B reads it by name)
//!    and a rewrite of a file B holds open and reads again. The moment the
//!    change reached the backend is taken by an observer that follows the
//!    feed over a direct connection (no delay proxy), so "commit → B
//!    shows it" is the issue's measure. A ships in the background, or,
//!    with `FERRY_MULTI_VIS_SYNC=1`, runs `ferry sync` after each write
//!    (timed too).
//! 2. **convergence**: a tree of many small files written on A, then from
//!    the start of `ferry sync` on A until B lists every name and reads
//!    every file with the right contents.
//! 3. **fresh-read**: a real tree (support/crates.rs, plus a few large
//!    files) written on A; then a *fresh* host B mounts the volume through
//!    the slow link (the restore) and reads every file once in `find`
//!    order; next to sshfs and `rclone mount` reading the same tree from an
//!    sshd behind the same link, sequentially and with 8 readers.
//! 4. **restore**: a volume of 100,000 and 1,000,000 files, made directly
//!    through the ferry_backend API, restored by `ferry mount` on an empty
//!    store: time until mounted and the daemon's peak RSS (VmHWM).
//!
//! Parts 1 and 2 run on a `dir:` volume, on PostgreSQL at 0 ms and on
//! PostgreSQL behind the delay proxy of support/wan.rs (both hosts through
//! it). Every wait is bounded; a peer past its budget is stopped and shown
//! as "> budget" with the files it had done.
//!
//! Env (defaults in brackets): `FERRY_MULTI_PARTS`
//! [visibility,convergence,fresh-read,restore], `FERRY_MULTI_BACKENDS`
//! [dir,pg,pg-wan], `FERRY_MULTI_ONE_WAY_MS` [25], `FERRY_MULTI_CHANGES`
//! [1000], `FERRY_MULTI_VIS_SYNC` [0], `FERRY_MULTI_TREE_FILES` [10000], `FERRY_MULTI_COPIES` [2],
//! `FERRY_MULTI_CONV_READ_EARLY` [1: B reads files as their names
//! appear; 0: once every name is there], `FERRY_MULTI_BIG_FILES` [20] (of 4 MiB), `FERRY_MULTI_BUDGET_S` [300],
//! `FERRY_MULTI_READ_TARGETS`
//! [ferry-none,ferry-default,ferry-all,sshfs-8,sshfs,rclone],
//! `FERRY_MULTI_RESTORE_FILES` [100000,1000000],
//! `FERRY_MULTI_RESTORE_BACKENDS` [dir,pg], `FERRY_MULTI_RESTORE_BUDGET_S`
//! [900] (per mount).
//! Run with `scripts/bench-multi.sh` (installs the peers, release build).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ferry_backend::testing::PgServer;
use ferry_backend::{ChunkHash, InodeState, ObjectId, Op, Outcome};
use support::cli::{dir_backend, ferry_within, init, sync_within};
use support::crates::unpack;
use support::peers::{Daemon, PeerMount, Sshd};
use support::wan::{url_addr, url_via, Wan};
use support::{
    ferry_bin, fnv64, is_mounted, poll_until, run_bounded, wait_bounded, Mount, Rng, TempDir,
    DEFAULT_OPTIONS,
};

/// How long one change may take to show on the other host before it
/// counts as missed.
const VISIBLE_LIMIT: Duration = Duration::from_secs(30);
/// Bound on one `ferry sync` of a single change.
const SYNC_LIMIT_S: u64 = 60;
/// Bytes of each large file added to the real tree.
const BIG_FILE: usize = 4 << 20;

// ---------------------------------------------------------------------------
// Volumes shared by the hosts

/// The servers and the slow link, made once and shared by every part.
struct Servers {
    one_way: Duration,
    pg: Option<PgServer>,
    wan: Option<Wan>,
    /// The proxy in front of PostgreSQL, once made.
    pg_via: Option<std::net::SocketAddr>,
    databases: u32,
    /// `dir:` volumes, kept until the end.
    dirs: Vec<TempDir>,
}

impl Servers {
    fn new(one_way: Duration) -> Servers {
        Servers {
            one_way,
            pg: None,
            wan: None,
            pg_via: None,
            databases: 0,
            dirs: Vec::new(),
        }
    }

    /// The link's label in tables.
    fn label(&self, kind: &str) -> String {
        match kind {
            "dir" => "`dir:`, 0 ms".into(),
            "pg" => "PostgreSQL, 0 ms".into(),
            "pg-wan" => format!("PostgreSQL, {} ms RTT", 2 * self.one_way.as_millis()),
            other => panic!("unknown backend {other:?}: expected dir, pg or pg-wan"),
        }
    }

    fn wan(&mut self) -> &mut Wan {
        let one_way = self.one_way;
        self.wan.get_or_insert_with(|| Wan::new(one_way))
    }

    /// A new, initialised volume of `kind`: its URL as the hosts reach it,
    /// and as an observer on this machine reaches it with no delay.
    fn volume(&mut self, kind: &str) -> Volume {
        if kind == "dir" {
            let (guard, _, url) = dir_backend();
            self.dirs.push(guard);
            return Volume {
                direct: url.clone(),
                url,
            };
        }
        self.databases += 1;
        let name = format!("multi_bench_{}", self.databases);
        let direct = self
            .pg
            .get_or_insert_with(PgServer::start)
            .create_database(&name);
        let url = match kind {
            "pg" => direct.clone(),
            "pg-wan" => {
                let via = match self.pg_via {
                    Some(v) => v,
                    None => {
                        let v = self.wan().expose(url_addr(&direct));
                        self.pg_via = Some(v);
                        v
                    }
                };
                url_via(&direct, via)
            }
            other => panic!("unknown backend {other:?}: expected dir, pg or pg-wan"),
        };
        init(&url);
        Volume { url, direct }
    }
}

/// A volume made by [`Servers::volume`].
struct Volume {
    /// How the hosts reach it (through the delay proxy for `pg-wan`).
    url: String,
    /// How [`Observer`] reaches it: directly.
    direct: String,
}

/// Watches a volume's change feed over a direct connection and records
/// when each new commit appeared: the moment a change reached the backend,
/// to within the observer's own latency (a notification and one query on
/// this machine, about a millisecond), however long the writing host
/// takes to learn it committed.
struct Observer {
    commits: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Observer {
    fn start(direct: &str) -> Observer {
        let backend = ferry_backend::open(direct, Duration::from_secs(10)).expect("observer");
        let mut pos = 0;
        loop {
            let items = backend.feed(pos, 10_000).expect("observer: feed");
            match items.last() {
                Some(last) => pos = last.seq,
                None => break,
            }
        }
        let commits = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, st) = (commits.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                if !backend
                    .wait_feed(pos, Duration::from_millis(200))
                    .unwrap_or(false)
                {
                    continue;
                }
                let at = Instant::now();
                let items = backend.feed(pos, 10_000).expect("observer: feed");
                if let Some(last) = items.last() {
                    pos = last.seq;
                    c.lock().unwrap().push(at);
                }
            }
        });
        Observer {
            commits,
            stop,
            thread: Some(thread),
        }
    }

    /// The last commit seen in `(after, until]`.
    fn last_commit(&self, after: Instant, until: Instant) -> Option<Instant> {
        let commits = self.commits.lock().unwrap();
        commits
            .iter()
            .rev()
            .find(|&&t| t > after && t <= until)
            .copied()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Small helpers

/// `ferry sync MNT` started now; [`SyncRun::finish`] gives the moment it
/// exited, measured by a thread blocked in `wait`, not by polling.
struct SyncRun {
    pid: i32,
    done: mpsc::Receiver<(bool, Instant)>,
}

impl SyncRun {
    fn start(m: &Mount, timeout_s: u64) -> SyncRun {
        let mut child = Command::new(ferry_bin())
            .arg("sync")
            .arg(m.path())
            .args(["--timeout", &timeout_s.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ferry sync");
        let pid = child.id() as i32;
        let (tx, done) = mpsc::channel();
        thread::spawn(move || {
            let ok = child.wait().is_ok_and(|s| s.success());
            let _ = tx.send((ok, Instant::now()));
        });
        SyncRun { pid, done }
    }

    /// When it exited, if it succeeded; bounded by its own timeout plus a
    /// margin, then killed.
    fn finish(self, timeout_s: u64) -> Option<Instant> {
        let limit = Duration::from_secs(timeout_s + 30);
        let (ok, at) = self.done.recv_timeout(limit).unwrap_or_else(|_| {
            // SAFETY: signalling our own child, which has not been reaped
            // (its waiter thread has not returned).
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            self.done.recv().expect("sync waiter")
        });
        ok.then_some(at)
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn secs(d: Option<Duration>, budget: Duration) -> String {
    d.map_or(format!("> {} s (budget)", budget.as_secs()), |d| {
        format!("{:.1} s", d.as_secs_f64())
    })
}

/// Median and p99 of `v` ("—" when empty).
fn median_p99(mut v: Vec<Duration>) -> (String, String) {
    if v.is_empty() {
        return ("—".into(), "—".into());
    }
    v.sort();
    (ms(percentile(&v, 50.0)), ms(percentile(&v, 99.0)))
}

/// The load average, for the record of how busy the machine was.
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A line of `/proc/PID/status`, in kB (`VmHWM`, `VmRSS`).
fn proc_kb(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The daemon's restore line, as "restored N objects in X s".
fn restore_line(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("restored "))?;
    let rest = &line[line.find("restored ")?..];
    let count = rest.split(' ').nth(1)?;
    let took = rest.rsplit(" in ").next()?;
    Some(format!("restored {count} objects in {took}"))
}

// ---------------------------------------------------------------------------
// Part 1: visibility of single changes

#[derive(Clone, Copy, PartialEq)]
enum Change {
    /// A new file, which B reads by name.
    Create,
    /// A rewrite of a file that B holds open and reads again (pread).
    Rewrite,
}

/// One change, timed from its write on A.
struct Sample {
    kind: Change,
    /// Until B showed it.
    seen: Option<Duration>,
    /// Until the commit that B then showed appeared in the feed.
    commit: Option<Duration>,
    /// Until `ferry sync` on A returned (when run).
    sync: Option<Duration>,
}

/// N changes on `a`, each polled for on `b` until it shows, with
/// `ferry sync` on `a` run after each write when `with_sync`.
fn visibility(a: &Mount, b: &Mount, observer: &Observer, n: usize, with_sync: bool) -> Vec<Sample> {
    let dir = "vis";
    fs::create_dir(a.join(dir)).unwrap();
    fs::write(a.join("vis/hot"), b"hot 0\n").unwrap();
    sync_within(a, 120);
    let hot = b.join("vis/hot");
    assert!(
        poll_until(VISIBLE_LIMIT, || fs::read(&hot)
            .is_ok_and(|c| c == b"hot 0\n")),
        "B never saw vis/hot; B's log:\n{}",
        b.daemon_log()
    );
    let held = fs::File::open(&hot).unwrap();
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let kind = if i % 2 == 0 {
            Change::Create
        } else {
            Change::Rewrite
        };
        let content = format!("change {i}\n").into_bytes();
        let name = match kind {
            Change::Create => format!("{dir}/c{i}"),
            Change::Rewrite => format!("{dir}/hot"),
        };
        let start = Instant::now();
        fs::write(a.join(&name), &content).unwrap();
        let sync = with_sync.then(|| SyncRun::start(a, SYNC_LIMIT_S));
        let there = b.join(&name);
        let mut buf = [0u8; 64];
        let shows = || match kind {
            Change::Create => fs::read(&there).is_ok_and(|c| c == content),
            Change::Rewrite => held
                .read_at(&mut buf, 0)
                .is_ok_and(|len| buf[..len] == content[..]),
        };
        let mut shows = shows;
        let seen_at = poll_until(VISIBLE_LIMIT, &mut shows).then(Instant::now);
        if seen_at.is_none() {
            // Missed. Does it show once the kernel's cached entry (60 s
            // TTL) expires? Then B's kernel kept a stale negative entry.
            let late = poll_until(Duration::from_secs(65), &mut shows);
            eprintln!(
                "  change {i} ({name}) not shown on B within {VISIBLE_LIMIT:?}; {}",
                if late {
                    format!(
                        "it showed {:.1} s after the write",
                        start.elapsed().as_secs_f64()
                    )
                } else {
                    "nor 65 s later".into()
                }
            );
        }
        let synced_at = sync.and_then(|s| s.finish(SYNC_LIMIT_S));
        // The observer may trail B by a moment: give it one.
        thread::sleep(Duration::from_millis(5));
        let commit_at = seen_at.and_then(|t| observer.last_commit(start, t));
        samples.push(Sample {
            kind,
            seen: seen_at.map(|t| t - start),
            commit: commit_at.map(|t| t - start),
            sync: synced_at.map(|t| t - start),
        });
        if (i + 1) % 100 == 0 {
            eprintln!("  {} changes, load {}", i + 1, loadavg());
        }
    }
    samples
}

fn print_visibility(rows: &[(String, Vec<Sample>)], with_sync: bool) {
    println!(
        "| backend | change | n | commit at the backend → B shows it: median | p99 | \
         write on A → B shows it: median | p99 | write on A → commit: median | p99 | \
         `ferry sync` on A: median | p99 | missed (> {} s) |",
        VISIBLE_LIMIT.as_secs()
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (label, samples) in rows {
        let kinds: [(&str, Option<Change>); 3] = [
            ("new file, read by name", Some(Change::Create)),
            ("rewrite, re-read through an open fd", Some(Change::Rewrite)),
            ("all", None),
        ];
        for (what, kind) in kinds {
            let of: Vec<&Sample> = samples
                .iter()
                .filter(|s| kind.is_none_or(|k| s.kind == k))
                .collect();
            let after_commit = of
                .iter()
                .filter_map(|s| Some(s.seen? - s.commit?))
                .collect();
            let (after_m, after_p) = median_p99(after_commit);
            let (seen_m, seen_p) = median_p99(of.iter().filter_map(|s| s.seen).collect());
            let (commit_m, commit_p) = median_p99(of.iter().filter_map(|s| s.commit).collect());
            let (sync_m, sync_p) = if with_sync {
                median_p99(of.iter().filter_map(|s| s.sync).collect())
            } else {
                ("not run".into(), "—".into())
            };
            let missed = of.iter().filter(|s| s.seen.is_none()).count();
            let unobserved = of
                .iter()
                .filter(|s| s.seen.is_some() && s.commit.is_none())
                .count();
            let failed = of.iter().filter(|s| with_sync && s.sync.is_none()).count();
            let mut missed = missed.to_string();
            if unobserved > 0 {
                missed += &format!(" (commit not observed {unobserved}×)");
            }
            if failed > 0 {
                missed += &format!(" (sync failed {failed}×)");
            }
            println!(
                "| {label} | {what} | {} | {after_m} | {after_p} | {seen_m} | {seen_p} | {commit_m} | {commit_p} | {sync_m} | {sync_p} | {missed} |",
                of.len()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Part 2: convergence of a tree

/// Files per directory of the convergence tree.
const PER_DIR: usize = 100;

/// The contents of file `j` of the convergence tree (64 B to 8 KiB).
fn tree_content(j: usize) -> Vec<u8> {
    let mut rng = Rng::new(0xC0_4E5E ^ j as u64);
    let len = 64 + rng.below(8129 - 64) as usize;
    rng.bytes(len)
}

/// The rounds of down-sync in a daemon's log: how many, how many changes,
/// and the time stamps of the first and the last.
fn downsync_summary(log: &str) -> String {
    let rounds: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("down-sync: applied"))
        .collect();
    let changes: u64 = rounds
        .iter()
        .filter_map(|l| {
            l.split("applied ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    let stamp = |l: Option<&&str>| {
        l.and_then(|l| l.split(' ').next())
            .unwrap_or("-")
            .to_string()
    };
    format!(
        "{} rounds applied {changes} changes, first at {}, last at {}",
        rounds.len(),
        stamp(rounds.first()),
        stamp(rounds.last())
    )
}

fn tree_path(j: usize) -> String {
    format!("conv/d{}/f{j}", j / PER_DIR)
}

struct Convergence {
    write: Duration,
    sync: Option<Duration>,
    names: Option<Duration>,
    contents: Option<Duration>,
    verified: usize,
}

/// Writes `files` files on `a`; from the start of `ferry sync` on `a`,
/// polls `b` until every name is there (one thread, listing only) and
/// every file reads right (another, reading each by its path, from the
/// start or once every name is there).
fn convergence(
    a: &Mount,
    b: &Mount,
    files: usize,
    read_early: bool,
    budget: Duration,
) -> Convergence {
    let dirs = files.div_ceil(PER_DIR);
    let started = Instant::now();
    for d in 0..dirs {
        fs::create_dir_all(a.join(&format!("conv/d{d}"))).unwrap();
    }
    for j in 0..files {
        fs::write(a.join(&tree_path(j)), tree_content(j)).unwrap();
    }
    let write = started.elapsed();
    let start = Instant::now();
    let sync = SyncRun::start(a, budget.as_secs());
    let root = b.path().to_path_buf();
    let lister = thread::spawn(move || {
        let count = || -> usize {
            (0..dirs)
                .map(|d| fs::read_dir(root.join(format!("conv/d{d}"))).map_or(0, |l| l.count()))
                .sum()
        };
        poll_until(budget, || count() == files).then(|| start.elapsed())
    });
    // Reading a file whose contents are not here yet fetches it, on B's
    // one backend connection: with `read_early` off, the reader starts
    // only once every name is there, to tell the two apart.
    let (mut lister, mut names) = (Some(lister), None);
    if !read_early {
        names = lister.take().and_then(|l| l.join().expect("lister"));
    }
    let mut verified = vec![false; files];
    let mut n_verified = 0;
    let mut contents = None;
    while start.elapsed() < budget {
        for (j, done) in verified.iter_mut().enumerate() {
            if !*done && fs::read(b.join(&tree_path(j))).is_ok_and(|c| c == tree_content(j)) {
                *done = true;
                n_verified += 1;
            }
        }
        if n_verified == files {
            contents = Some(start.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    if let Some(l) = lister {
        names = l.join().expect("lister");
    }
    let log = b.daemon_log();
    eprintln!("  B's down-sync: {}", downsync_summary(&log));
    for warning in log.lines().filter(|l| l.contains("WARN")).take(10) {
        eprintln!("  B: {warning}");
    }
    let synced = sync.finish(budget.as_secs()).map(|t| t - start);
    Convergence {
        write,
        sync: synced,
        names,
        contents,
        verified: n_verified,
    }
}

// ---------------------------------------------------------------------------
// Part 3: a fresh host reads a real tree

/// Length and checksum of every file of the tree, by relative path.
type Expected = HashMap<PathBuf, (u64, u64)>;

/// Regular files under `dir` in `find`'s order: each directory's entries
/// in readdir order, descending into a directory where it is met. `visit`
/// returns false to stop.
fn walk(dir: &Path, visit: &mut dyn FnMut(PathBuf) -> bool) -> bool {
    let Ok(list) = fs::read_dir(dir) else {
        return true;
    };
    for e in list.flatten() {
        let Ok(t) = e.file_type() else { continue };
        let go_on = if t.is_dir() {
            walk(&e.path(), visit)
        } else if t.is_file() {
            visit(e.path())
        } else {
            true
        };
        if !go_on {
            return false;
        }
    }
    true
}

fn expected_of(root: &Path) -> Expected {
    let mut out = Expected::new();
    walk(root, &mut |p| {
        let data = fs::read(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        out.insert(rel, (data.len() as u64, fnv64(&data)));
        true
    });
    out
}

/// What reading a tree achieved.
#[derive(Default)]
struct Progress {
    files: AtomicUsize,
    bytes: AtomicU64,
    wrong: AtomicUsize,
    stop: AtomicBool,
}

impl Progress {
    /// Reads `path` whole and checks it against `expected`.
    fn read(&self, root: &Path, path: &Path, expected: &Expected) {
        let rel = path.strip_prefix(root).unwrap_or(path);
        match fs::read(path) {
            Ok(data) if expected.get(rel) == Some(&(data.len() as u64, fnv64(&data))) => {
                self.files.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            other => {
                if self.wrong.fetch_add(1, Ordering::Relaxed) < 3 {
                    let what = other.map(|d| format!("{} bytes, not as written", d.len()));
                    eprintln!("  {}: {what:?}", path.display());
                }
            }
        }
    }
}

struct ReadOutcome {
    elapsed: Option<Duration>,
    files: usize,
    bytes: u64,
    wrong: usize,
}

/// Reads every regular file under `root` once, in `find` order: in the
/// walking thread itself with one reader (`find -exec cat`), else walked
/// by one thread and read by `readers` (`find | xargs -P`). Stopped at
/// `budget`.
fn read_tree(
    root: &Path,
    readers: usize,
    budget: Duration,
    expected: &Arc<Expected>,
) -> ReadOutcome {
    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let root = root.to_path_buf();
    if readers == 1 {
        let (p, e) = (progress.clone(), expected.clone());
        threads.push(thread::spawn(move || {
            walk(&root, &mut |f| {
                p.read(&root, &f, &e);
                !p.stop.load(Ordering::Relaxed)
            });
        }));
    } else {
        let (tx, rx) = mpsc::sync_channel::<PathBuf>(4096);
        let rx = Arc::new(Mutex::new(rx));
        let (p, walk_root) = (progress.clone(), root.clone());
        threads.push(thread::spawn(move || {
            walk(&walk_root, &mut |f| {
                tx.send(f).is_ok() && !p.stop.load(Ordering::Relaxed)
            });
        }));
        for _ in 0..readers {
            let (p, e, rx, root) = (progress.clone(), expected.clone(), rx.clone(), root.clone());
            threads.push(thread::spawn(move || loop {
                let next = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                match next {
                    Ok(f) if !p.stop.load(Ordering::Relaxed) => p.read(&root, &f, &e),
                    _ => return,
                }
            }));
        }
    }
    let finished = poll_until(budget, || threads.iter().all(|t| t.is_finished()));
    let elapsed = finished.then(|| start.elapsed());
    progress.stop.store(true, Ordering::Relaxed);
    // A read in progress finishes; one stuck for good is left behind.
    poll_until(Duration::from_secs(30), || {
        threads.iter().all(|t| t.is_finished())
    });
    ReadOutcome {
        elapsed,
        files: progress.files.load(Ordering::Relaxed),
        bytes: progress.bytes.load(Ordering::Relaxed),
        wrong: progress.wrong.load(Ordering::Relaxed),
    }
}

struct ReadRow {
    target: String,
    mount: Duration,
    read: ReadOutcome,
    note: String,
}

/// The tree: `copies` of the crates tree plus `big` files of 4 MiB.
fn make_tree(dest: &Path, copies: usize, big: usize) {
    unpack(dest, copies);
    fs::create_dir(dest.join("big")).unwrap();
    for i in 0..big {
        let data = Rng::new(0xB16 + i as u64).bytes(BIG_FILE);
        fs::write(dest.join(format!("big/blob-{i}.bin")), data).unwrap();
    }
}

/// A fresh ferry host on `url` reads `tree` (the volume's `/tree`).
fn ferry_read(
    url: &str,
    prefetch: Option<&str>,
    budget: Duration,
    expected: &Arc<Expected>,
) -> ReadRow {
    let mut args = vec!["--backend", url];
    if let Some(p) = prefetch {
        args.extend(["--prefetch", p]);
    }
    let start = Instant::now();
    let b = Mount::with_args(&args);
    let mount = start.elapsed();
    let read = read_tree(&b.join("tree"), 1, budget, expected);
    let mnt = b.path().to_str().unwrap();
    let status = ferry_within(&["status", "--json", mnt], Duration::from_secs(30));
    let status: serde_json::Value = serde_json::from_str(status.trim()).unwrap_or_default();
    let log = b.daemon_log();
    let restored = restore_line(&log).unwrap_or_else(|| "no restore line".into());
    eprintln!(
        "  daemon: {restored}\n  prefetch at the end: {}",
        status["prefetch"]
    );
    let p = &status["prefetch"];
    ReadRow {
        target: match prefetch {
            None => "ferry, fresh host, default prefetch (small, ≤ 1 MiB)".into(),
            Some(p) => format!("ferry, fresh host, `--prefetch {p}`"),
        },
        mount,
        read,
        note: if p.is_null() {
            "prefetch: none ran".into()
        } else {
            format!(
                "prefetch when the read ended: {} of {} files",
                p["files_done"], p["files_total"]
            )
        },
    }
}

/// A peer mount of `tree` through `via`, read by `readers`.
fn peer_read(
    target: &str,
    sshd: &Sshd,
    via: std::net::SocketAddr,
    tree: &Path,
    budget: Duration,
    expected: &Arc<Expected>,
) -> ReadRow {
    let scratch = TempDir::new("ferry-multi-peer");
    let (mnt, cache) = (scratch.path().join("mnt"), scratch.path().join("cache"));
    fs::create_dir(&mnt).unwrap();
    fs::create_dir(&cache).unwrap();
    let log = scratch.path().join("peer.log");
    let (readers, rclone) = match target {
        "sshfs" => (1, false),
        "sshfs-8" => (8, false),
        "rclone" => (1, true),
        "rclone-8" => (8, true),
        other => panic!("unknown read target {other:?}"),
    };
    let start = Instant::now();
    let _m = if rclone {
        let cache = cache.to_str().unwrap();
        PeerMount::rclone(
            sshd,
            via,
            tree,
            &mnt,
            &["--vfs-cache-mode", "writes", "--cache-dir", cache],
            &log,
        )
    } else {
        PeerMount::sshfs(sshd, via, tree, &mnt, &log)
    };
    let mount = start.elapsed();
    let read = read_tree(&mnt, readers, budget, expected);
    let client = if rclone {
        "rclone mount (sftp, `--vfs-cache-mode writes`)"
    } else {
        "sshfs"
    };
    ReadRow {
        target: if readers == 1 {
            format!("{client}, sequential")
        } else {
            format!("{client}, {readers} parallel readers")
        },
        mount,
        read,
        note: String::new(),
    }
}

fn fresh_read(servers: &mut Servers, targets: &str, copies: usize, big: usize, budget: Duration) {
    let stage = TempDir::new("ferry-multi-tree");
    let tree = stage.path().join("tree");
    make_tree(&tree, copies, big);
    let expected = Arc::new(expected_of(&tree));
    let (files, bytes) = (expected.len(), expected.values().map(|v| v.0).sum::<u64>());
    eprintln!("fresh-read tree: {files} files, {bytes} bytes");
    let url = servers.volume("pg-wan").url;
    let link = servers.label("pg-wan");
    let mut rows = Vec::new();
    let mut host_a = None;
    let mut sshd = None;
    for t in targets.split(',').map(str::trim) {
        eprintln!("fresh-read: {t}, load {}", loadavg());
        let row = match t {
            "ferry-none" | "ferry-default" | "ferry-small" | "ferry-all" => {
                host_a.get_or_insert_with(|| {
                    let a = Mount::with_backend(&url);
                    let start = Instant::now();
                    let cp = run_bounded(
                        Command::new("cp").arg("-a").arg(&tree).arg(a.join("tree")),
                        Duration::from_secs(600),
                    );
                    assert!(
                        matches!(&cp, Ok(o) if o.status.success()),
                        "cp onto A failed"
                    );
                    let copied = start.elapsed();
                    sync_within(&a, 600);
                    eprintln!(
                        "  host A: cp -a {:.1} s, then synced at {:.1} s",
                        copied.as_secs_f64(),
                        start.elapsed().as_secs_f64()
                    );
                    a
                });
                let prefetch = match t {
                    "ferry-none" => Some("none"),
                    "ferry-small" => Some("small"),
                    "ferry-all" => Some("all"),
                    _ => None,
                };
                ferry_read(&url, prefetch, budget, &expected)
            }
            peer => {
                let sshd = sshd.get_or_insert_with(Sshd::start);
                let via = servers.wan().expose(sshd.addr());
                peer_read(peer, sshd, via, &tree, budget, &expected)
            }
        };
        eprintln!(
            "  {}: mount {:.2} s, read {}, {} files, {} wrong",
            row.target,
            row.mount.as_secs_f64(),
            secs(row.read.elapsed, budget),
            row.read.files,
            row.read.wrong
        );
        rows.push(row);
    }
    println!(
        "\nA fresh host reads every file once, {link} (PostgreSQL for ferry, sshd for the peers, \
         both behind the same delay proxy): {files} files, {bytes} bytes ({copies} copies of the crates \
         {}, plus {big} files of 4 MiB); budget {} s per target; load at the end {}\n",
        support::crates::TREE_CRATES.join(", "),
        budget.as_secs(),
        loadavg()
    );
    println!("| target | mount (ferry: restore) | read every file once | files read right | MB read | wrong | notes |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.2} s | {} | {} of {files} | {:.1} | {} | {} |",
            r.target,
            r.mount.as_secs_f64(),
            secs(r.read.elapsed, budget),
            r.read.files,
            r.read.bytes as f64 / 1e6,
            r.read.wrong,
            r.note
        );
    }
}

// ---------------------------------------------------------------------------
// Part 4: restore at scale

/// Files per directory of the restore volumes.
const RESTORE_PER_DIR: u64 = 1000;
/// Files committed to the backend per call while filling it.
const FILL_BATCH: u64 = 10_000;
/// The host id the filled volume's objects carry.
const FILL_HOST: u32 = 0x5CA1E;

/// The identity of directory `d` and of file `k` in it.
fn fill_ids(d: u64, k: Option<u64>) -> ObjectId {
    let base = 2 + d * (RESTORE_PER_DIR + 1);
    ObjectId {
        host: FILL_HOST,
        counter: base + k.map_or(0, |k| k + 1),
    }
}

/// Adds files `from..to` to the volume at `url` through the backend API,
/// each 100 bytes with one (shared) chunk, 1,000 to a directory.
fn fill(url: &str, from: u64, to: u64) -> Duration {
    let start = Instant::now();
    let backend = ferry_backend::open(url, Duration::from_secs(10)).expect("open backend");
    let data = [b'x'; 100];
    let hash = ChunkHash::of(&data);
    backend.put_chunk(&hash, &data).expect("put chunk");
    let mut f = from;
    while f < to {
        let end = (f + FILL_BATCH).min(to);
        let mut ops = Vec::new();
        for i in f..end {
            let (d, k) = (i / RESTORE_PER_DIR, i % RESTORE_PER_DIR);
            if k == 0 {
                let id = fill_ids(d, None);
                ops.push(Op::PutInode {
                    state: InodeState::new(id, 0o40755),
                    base: None,
                });
                ops.push(Op::PutEntry {
                    parent: ObjectId::ROOT,
                    name: format!("d{d}").into_bytes(),
                    child: id,
                    base: None,
                });
            }
            let id = fill_ids(d, Some(k));
            let mut state = InodeState::new(id, 0o100644);
            state.size = data.len() as u64;
            state.mtime_ns = 1_700_000_000_000_000_000 + i as i64;
            state.chunks = vec![(hash, data.len() as u32)];
            ops.push(Op::PutInode { state, base: None });
            ops.push(Op::PutEntry {
                parent: fill_ids(d, None),
                name: format!("f{k}").into_bytes(),
                child: id,
                base: None,
            });
        }
        let outcomes = backend.commit(FILL_HOST, &ops).expect("commit");
        let refused = outcomes
            .iter()
            .filter(|o| !matches!(o, Outcome::Applied { .. }))
            .count();
        assert_eq!(refused, 0, "the fill's commit refused {refused} ops");
        f = end;
        if f.is_multiple_of(100_000) {
            eprintln!(
                "  filled {f} files in {:.0} s",
                start.elapsed().as_secs_f64()
            );
        }
    }
    start.elapsed()
}

struct RestoreRow {
    backend: String,
    files: u64,
    fill: Duration,
    mount: Option<Duration>,
    logged: String,
    hwm_kb: Option<u64>,
    rss_kb: Option<u64>,
    unmount: Option<Duration>,
}

/// `ferry mount --foreground --prefetch none` of `url` on an empty store:
/// until mounted, the daemon's peak RSS then, a check of the namespace,
/// and the clean unmount.
fn restore_once(
    backend: &str,
    url: &str,
    files: u64,
    fill: Duration,
    budget: Duration,
) -> RestoreRow {
    let dir = TempDir::new("ferry-multi-restore");
    let (store, mnt, log) = (
        dir.path().join("store"),
        dir.path().join("mnt"),
        dir.path().join("daemon.log"),
    );
    fs::create_dir(&mnt).unwrap();
    let out = fs::File::create(&log).unwrap();
    let start = Instant::now();
    let child = Command::new(ferry_bin())
        .args(["mount", "--store"])
        .arg(&store)
        .args([
            "-o",
            DEFAULT_OPTIONS,
            "--backend",
            url,
            "--prefetch",
            "none",
        ])
        .arg("--foreground")
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn ferry mount");
    let mut daemon = Daemon(child);
    let pid = daemon.0.id();
    let mounted = poll_until(budget, || {
        is_mounted(&mnt) || daemon.0.try_wait().ok().flatten().is_some()
    }) && is_mounted(&mnt);
    let mount = mounted.then(|| start.elapsed());
    let (hwm_kb, rss_kb) = (proc_kb(pid, "VmHWM:"), proc_kb(pid, "VmRSS:"));
    let logged = restore_line(&fs::read_to_string(&log).unwrap_or_default())
        .unwrap_or_else(|| "no restore line".into());
    let mut unmount = None;
    if mounted {
        let dirs = fs::read_dir(&mnt).map(|l| l.count()).unwrap_or(0) as u64;
        let last = fs::read_dir(mnt.join(format!("d{}", (files - 1) / RESTORE_PER_DIR)))
            .map(|l| l.count())
            .unwrap_or(0) as u64;
        assert_eq!(
            dirs,
            files.div_ceil(RESTORE_PER_DIR),
            "directories restored"
        );
        assert_eq!(
            last,
            (files - 1) % RESTORE_PER_DIR + 1,
            "files in the last directory"
        );
        let t = Instant::now();
        let r = run_bounded(
            Command::new(ferry_bin()).arg("umount").arg(&mnt),
            Duration::from_secs(300),
        );
        let exited = wait_bounded(&mut daemon.0, Duration::from_secs(300)).is_some();
        unmount = (matches!(&r, Ok(o) if o.status.success()) && exited).then(|| t.elapsed());
    } else {
        eprintln!(
            "  not mounted; log:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        let _ = run_bounded(
            Command::new("umount").arg("-l").arg(&mnt),
            Duration::from_secs(10),
        );
    }
    drop(daemon);
    RestoreRow {
        backend: backend.into(),
        files,
        fill,
        mount,
        logged,
        hwm_kb,
        rss_kb,
        unmount,
    }
}

fn restore_scale(servers: &mut Servers, kinds: &str, sizes: &[u64], budget: Duration) {
    let mut rows = Vec::new();
    for kind in kinds.split(',').map(str::trim) {
        let url = servers.volume(kind).url;
        let label = servers.label(kind);
        let mut filled = 0;
        let mut fill_time = Duration::ZERO;
        for &files in sizes {
            eprintln!(
                "restore: {label}, filling to {files} files, load {}",
                loadavg()
            );
            fill_time += fill(&url, filled, files);
            filled = files;
            eprintln!("restore: {label}, {files} files, load {}", loadavg());
            let row = restore_once(&label, &url, files, fill_time, budget);
            eprintln!(
                "  mount {}, VmHWM {:?} kB; {}",
                secs(row.mount, budget),
                row.hwm_kb,
                row.logged
            );
            rows.push(row);
        }
    }
    println!(
        "\nRestore of a volume made through the backend API (1,000 files of 100 bytes per directory, \
         one shared chunk), by `ferry mount --prefetch none` on an empty store; budget {} s; load at the end {}\n",
        budget.as_secs(),
        loadavg()
    );
    println!("| backend | files | mount until live | the daemon's log | daemon peak RSS (VmHWM) | RSS when live | clean unmount | filling the backend (cumulative) |");
    println!("|---|---|---|---|---|---|---|---|");
    let mb = |kb: Option<u64>| kb.map_or("?".into(), |k| format!("{:.0} MB", k as f64 / 1024.0));
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} s |",
            r.backend,
            r.files,
            secs(r.mount, budget),
            r.logged,
            mb(r.hwm_kb),
            mb(r.rss_kb),
            r.unmount
                .map_or("failed".into(), |d| format!("{:.1} s", d.as_secs_f64())),
            r.fill.as_secs_f64()
        );
    }
}

// ---------------------------------------------------------------------------

fn machine() -> String {
    let first = |path: &str, key: &str| {
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let date = run_bounded(
        Command::new("date").args(["-u", "+%F %R UTC"]),
        Duration::from_secs(5),
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    .unwrap_or_default();
    format!(
        "Machine: {} CPUs ({}), {}, kernel {}; {date}; load average at the start {}",
        thread::available_parallelism().map_or(0, |n| n.get()),
        first("/proc/cpuinfo", "model name"),
        first("/proc/meminfo", "MemTotal"),
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        loadavg()
    )
}

fn main() {
    let parts = std::env::var("FERRY_MULTI_PARTS")
        .unwrap_or_else(|_| "visibility,convergence,fresh-read,restore".into());
    let backends = std::env::var("FERRY_MULTI_BACKENDS").unwrap_or_else(|_| "dir,pg,pg-wan".into());
    let one_way = Duration::from_millis(support::env_u64("FERRY_MULTI_ONE_WAY_MS", 25));
    let changes = support::env_u64("FERRY_MULTI_CHANGES", 1000) as usize;
    let with_sync = support::env_u64("FERRY_MULTI_VIS_SYNC", 0) == 1;
    let tree_files = support::env_u64("FERRY_MULTI_TREE_FILES", 10_000) as usize;
    let read_early = support::env_u64("FERRY_MULTI_CONV_READ_EARLY", 1) == 1;
    let copies = support::env_u64("FERRY_MULTI_COPIES", 2) as usize;
    let big = support::env_u64("FERRY_MULTI_BIG_FILES", 20) as usize;
    let budget = Duration::from_secs(support::env_u64("FERRY_MULTI_BUDGET_S", 300));
    let targets = std::env::var("FERRY_MULTI_READ_TARGETS")
        .unwrap_or_else(|_| "ferry-none,ferry-default,ferry-all,sshfs-8,sshfs,rclone".into());
    let restore_sizes: Vec<u64> = std::env::var("FERRY_MULTI_RESTORE_FILES")
        .unwrap_or_else(|_| "100000,1000000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("FERRY_MULTI_RESTORE_FILES: numbers")
        })
        .collect();
    let restore_backends =
        std::env::var("FERRY_MULTI_RESTORE_BACKENDS").unwrap_or_else(|_| "dir,pg".into());
    support::init_process();
    println!("{}\n", machine());
    let mut servers = Servers::new(one_way);
    let parts: Vec<&str> = parts.split(',').map(str::trim).collect();

    if parts.contains(&"visibility") {
        let mut rows = Vec::new();
        for kind in backends.split(',').map(str::trim) {
            let vol = servers.volume(kind);
            let label = servers.label(kind);
            eprintln!("visibility: {label}, {changes} changes, load {}", loadavg());
            let (a, b) = (Mount::with_backend(&vol.url), Mount::with_backend(&vol.url));
            let observer = Observer::start(&vol.direct);
            rows.push((label, visibility(&a, &b, &observer, changes, with_sync)));
        }
        let how = if with_sync {
            "each followed by `ferry sync` on A"
        } else {
            "shipped by A in the background (no `ferry sync`)"
        };
        println!(
            "Change visibility: {changes} changes on host A, alternating the two kinds, {how}, while \
             host B polls every 2 ms; the commit is when an observer following the feed over a direct \
             connection saw it; load at the end {}\n",
            loadavg()
        );
        print_visibility(&rows, with_sync);
    }

    if parts.contains(&"convergence") {
        let mut rows = Vec::new();
        for kind in backends.split(',').map(str::trim) {
            let url = servers.volume(kind).url;
            let label = servers.label(kind);
            eprintln!(
                "convergence: {label}, {tree_files} files, load {}",
                loadavg()
            );
            let (a, b) = (Mount::with_backend(&url), Mount::with_backend(&url));
            let c = convergence(&a, &b, tree_files, read_early, budget);
            eprintln!(
                "  names {}, contents {}, {} verified",
                secs(c.names, budget),
                secs(c.contents, budget),
                c.verified
            );
            rows.push((label, c));
        }
        println!(
            "\nConvergence: {tree_files} files (64 B to 8 KiB, {PER_DIR} to a directory) written on A; \
             times from the start of `ferry sync` on A; B reads the files {}; budget {} s; load at the end {}\n",
            if read_early { "as their names appear" } else { "once every name is there" },
            budget.as_secs(),
            loadavg()
        );
        println!("| backend | writing on A | `ferry sync` on A | B lists every name | B reads every file right | files right on B |");
        println!("|---|---|---|---|---|---|");
        for (label, c) in &rows {
            println!(
                "| {label} | {:.1} s | {} | {} | {} | {} of {tree_files} |",
                c.write.as_secs_f64(),
                secs(c.sync, budget),
                secs(c.names, budget),
                secs(c.contents, budget),
                c.verified
            );
        }
    }

    if parts.contains(&"fresh-read") {
        fresh_read(&mut servers, &targets, copies, big, budget);
    }

    if parts.contains(&"restore") {
        let restore_budget =
            Duration::from_secs(support::env_u64("FERRY_MULTI_RESTORE_BUDGET_S", 900));
        restore_scale(
            &mut servers,
            &restore_backends,
            &restore_sizes,
            restore_budget,
        );
    }
}
