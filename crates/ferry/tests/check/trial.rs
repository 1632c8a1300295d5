//! Trials: set up a volume, run workers, check the invariants, report.
//!
//! A one-host trial, on a fresh backend and mount:
//! 1. workers run for a seeded while, then (mostly) a while in steady mode
//!    (writes through open descriptors only, so replication catches up and
//!    ships files still open); then they are SIGSTOPped with their files
//!    still open and mapped, and I1 is checked: the tree as it stands,
//!    `ferry sync`, a fresh store restored from the backend, compared, and
//!    the restore's databases hold every committed row;
//! 2. they run on likewise, and the daemon is killed (-9) with operations
//!    in flight; the workers are killed; the volume is remounted and
//!    checked against the model (I2, [`super::model`]);
//! 3. I1 again on the recovered volume, with the restore's databases
//!    checked against every row committed before the kill (I2), then the
//!    local databases ([`super::sqlite`]); then `ferry fsck` of the store,
//!    and of the backend where the CLI has `fsck --backend` (I3).
//!
//! A two-host trial writes a small tree on one host and syncs it, mounts a
//! second host on the same backend (which restores that tree), runs chaos
//! workers on both (one host killed and remounted half the time, and each
//! pulling the other's changes all along), syncs both twice, and checks
//! that a restore loads, reads and hangs together (I3); with `--converge`,
//! also that every sync succeeded (conflicts are resolved, not held) and
//! that every host converges to exactly what the restore shows.
//!
//! Every check runs even when an earlier one failed; a panic (a mount that
//! does not come up, say) ends the trial as a failure, with every mount,
//! worker and temp dir cleaned up on the way out.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use ferry_backend::testing::PgServer;

use super::args::{Backends, Hosts, Options};
use super::journal::{self, Log};
use super::model;
use super::sqlite;
use super::workers::{WorkerArgs, Workers};
use super::workload::{SHARED, STEADY};
use crate::support::cli::{dir_backend, init};
use crate::support::fsimage::{diff, Compare, Difference, Image};
use crate::support::{describe, ferry_bin, run_bounded, Mount, Rng, TempDir};

/// fs workers per one-host trial (plus one database worker).
const FS_WORKERS: usize = 3;
/// chaos workers per host in a two-host trial.
const CHAOS_PER_HOST: usize = 3;
/// A worker stops by itself after this long (it is killed much sooner).
const WORKER_LIMIT: Duration = Duration::from_secs(90);
/// `ferry sync --timeout`.
const SYNC_SECS: u64 = 60;
/// How many differences a failure shows unless `--verbose`.
const SHOWN: usize = 10;
/// How long hosts may take to show what a restore shows, once all synced.
const CONVERGE: Duration = Duration::from_secs(30);
/// How long reading a whole tree (or checking the databases) on a mount
/// may take. A daemon that hangs fails the check, not the run: the reading
/// thread is left behind, and freed when the mount's drop kills the daemon.
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Which backend a trial uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    Dir,
    Postgres,
}

impl BackendKind {
    fn name(self) -> &'static str {
        match self {
            BackendKind::Dir => "dir",
            BackendKind::Postgres => "postgres",
        }
    }
}

/// Everything that determines a trial (apart from timing).
#[derive(Clone, Copy, Debug)]
pub struct Trial {
    pub index: u64,
    pub seed: u64,
    pub backend: BackendKind,
    pub hosts: u32,
    /// Two-host trials also check that every sync succeeds and every host
    /// converges to a restore (`--converge`).
    pub converge: bool,
}

impl Trial {
    /// The `index`th trial of a run; `seeds` draws the trial seeds.
    pub fn nth(opts: &Options, index: u64, seeds: &mut Rng) -> Trial {
        let seed = if opts.trials == 1 {
            opts.seed
        } else {
            seeds.next_u64()
        };
        let backend = match opts.backends {
            Backends::Dir => BackendKind::Dir,
            Backends::Postgres => BackendKind::Postgres,
            Backends::Both if index.is_multiple_of(2) => BackendKind::Dir,
            Backends::Both => BackendKind::Postgres,
        };
        let hosts = match opts.hosts {
            Hosts::One => 1,
            Hosts::Two => 2,
            Hosts::Mixed if index % 5 == 4 => 2,
            Hosts::Mixed => 1,
        };
        Trial {
            index,
            seed,
            backend,
            hosts,
            converge: opts.converge,
        }
    }

    /// The command that runs this trial alone.
    pub fn replay(&self) -> String {
        format!(
            "cargo test --release -p ferry --test fs_check -- --trials 1 --seed {} --backend {} --hosts {}{}",
            self.seed,
            self.backend.name(),
            self.hosts,
            if self.converge { " --converge" } else { "" }
        )
    }
}

/// One failed check: its name and what went wrong, first difference first.
#[derive(Debug)]
pub struct Failure {
    pub check: String,
    pub lines: Vec<String>,
}

/// What a trial found.
#[derive(Debug, Default)]
pub struct Report {
    pub failures: Vec<Failure>,
    /// Things worth saying that are not failures.
    pub notes: Vec<String>,
    verbose: bool,
}

impl Report {
    /// Records a failure of `check`; unless verbose, only its first lines.
    fn fail(&mut self, check: &str, mut lines: Vec<String>) {
        let keep = 2 + SHOWN;
        if !self.verbose && lines.len() > keep + 1 {
            let more = lines.len() - keep;
            lines.truncate(keep);
            lines.push(format!("… and {more} more lines"));
        }
        self.push(check, lines);
    }

    fn push(&mut self, check: &str, lines: Vec<String>) {
        self.failures.push(Failure {
            check: check.to_string(),
            lines,
        });
    }

    /// Records `diffs` (sorted by path) as a failure of `check`, if any:
    /// the first difference, a count per aspect, the next few, and then
    /// `context`'s lines.
    fn diffs(&mut self, check: &str, diffs: &[Difference], context: impl FnOnce() -> Vec<String>) {
        let Some(first) = diffs.first() else {
            return;
        };
        let mut counts = std::collections::BTreeMap::<&str, usize>::new();
        for d in diffs {
            *counts.entry(d.aspect).or_default() += 1;
        }
        let mut lines = vec![
            format!("first difference: {first}"),
            format!("{} differences by aspect: {counts:?}", diffs.len()),
        ];
        let shown = if self.verbose { diffs.len() } else { SHOWN };
        lines.extend(diffs.iter().skip(1).take(shown).map(|d| format!("  {d}")));
        if diffs.len() > shown + 1 {
            lines.push(format!("  … and {} more", diffs.len() - shown - 1));
        }
        lines.extend(context());
        self.push(check, lines);
    }
}

/// The message of the last panic, kept by the hook [`install_panic_hook`]
/// sets, for [`guarded`] to report.
static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Makes panics quiet: their message goes into the trial's report instead
/// of interleaving with it on stderr.
pub fn install_panic_hook() {
    panic::set_hook(Box::new(|info| {
        *LAST_PANIC.lock().unwrap_or_else(|p| p.into_inner()) = Some(info.to_string());
    }));
}

/// Runs `f`, turning a panic into its message.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    panic::catch_unwind(AssertUnwindSafe(f)).map_err(|_| {
        LAST_PANIC
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| "panicked".to_string())
    })
}

/// Runs `f` on a thread of its own for at most [`READ_TIMEOUT`].
fn within<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(READ_TIMEOUT).map_err(|e| match e {
        mpsc::RecvTimeoutError::Timeout => {
            format!("{what}: no answer in {READ_TIMEOUT:?} (a hung daemon?)")
        }
        mpsc::RecvTimeoutError::Disconnected => {
            let panic = LAST_PANIC.lock().unwrap_or_else(|p| p.into_inner()).take();
            format!("{what}: {}", panic.unwrap_or_else(|| "panicked".into()))
        }
    })
}

/// Captures the tree under `root`, bounded.
fn capture(root: &Path) -> Result<Image, String> {
    let root = root.to_path_buf();
    let what = format!("reading {}", root.display());
    within(&what, move || {
        Image::capture(&root).map_err(|e| e.to_string())
    })?
}

/// Captures a restore whose tree holds still: with two hosts, the restored
/// host goes on pulling what the others still ship after their last sync
/// (what down-sync rescued to `/lost+found`, say), and a walk across a
/// pull would see half of it (a new hard link, with the link count from
/// before). A tree two walks in a row agree on is a state the backend had;
/// a backend in a state no restore can load shows it in every walk.
fn settled_capture(root: &Path) -> Result<Image, String> {
    let cmp = Compare {
        mtimes: true,
        holes: true,
        ignore: &|_: &str| false,
    };
    let mut last = capture(root)?;
    // Bounded: a backend that still moves after this many walks is
    // checked as the last walk saw it.
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(200));
        let now = capture(root)?;
        let still = diff(&last, &now, &cmp, ("a walk", "the next")).is_empty();
        last = now;
        if still {
            break;
        }
    }
    Ok(last)
}

/// Checks the databases under `mount` against `log`, bounded.
/// The database directory of `mount`, copied to a new temp dir.
fn copy_dbs(mount: &Path) -> std::io::Result<TempDir> {
    let copy = TempDir::new("ferry-check-dbs");
    fs::create_dir(copy.path().join(sqlite::DIR))?;
    for entry in fs::read_dir(mount.join(sqlite::DIR))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            fs::copy(
                entry.path(),
                copy.path().join(sqlite::DIR).join(entry.file_name()),
            )?;
        }
    }
    Ok(copy)
}

fn check_dbs(mount: &Path, log: &Log) -> Vec<String> {
    let (mount, log) = (mount.to_path_buf(), log.clone());
    within("checking the databases", move || {
        sqlite::check(&mount, &log)
    })
    .unwrap_or_else(|e| vec![e])
}

/// Runs `ferry ARGS` bounded by `timeout`: stdout, or what went wrong:
/// the exit status and stderr, then stdout's first lines (where `ferry
/// fsck` puts one violation per line).
fn ferry(args: &[&str], timeout: Duration) -> Result<String, Vec<String>> {
    let out = run_bounded(Command::new(ferry_bin()).args(args), timeout);
    match &out {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => {
            let stdout = String::from_utf8_lossy(&o.stdout);
            let lines: Vec<&str> = stdout.lines().collect();
            let mut msg = vec![format!(
                "ferry {}: {}; stderr: {}",
                args[0],
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )];
            msg.extend(lines.iter().take(SHOWN).map(|l| format!("  {l}")));
            if lines.len() > SHOWN {
                msg.push(format!("  … and {} more lines", lines.len() - SHOWN));
            }
            Err(msg)
        }
        Err(_) => Err(vec![describe(&out)]),
    }
}

/// `ferry sync` of `m`.
fn sync(m: &Mount) -> Result<(), Vec<String>> {
    let mnt = m.path().to_str().expect("utf-8 temp path");
    let secs = SYNC_SECS.to_string();
    ferry(
        &["sync", mnt, "--timeout", &secs],
        Duration::from_secs(SYNC_SECS + 30),
    )
    .map(drop)
}

/// Whether this `ferry` has `fsck --backend` (asked once).
pub fn backend_fsck_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        ferry(&["fsck", "--help"], Duration::from_secs(30)).is_ok_and(|h| h.contains("--backend"))
    })
}

/// A backend for one trial, removed (dir) or left to the cluster's own
/// cleanup (postgres) afterwards.
struct Backend {
    url: String,
    _dir: Option<TempDir>,
}

impl Backend {
    fn create(t: &Trial) -> Backend {
        match t.backend {
            BackendKind::Dir => {
                let (dir, _, url) = dir_backend();
                Backend {
                    url,
                    _dir: Some(dir),
                }
            }
            BackendKind::Postgres => {
                let name = format!("ferry_check_{:016x}_{}", t.seed, t.index);
                let url = PgServer::shared().create_database(&name);
                init(&url);
                Backend { url, _dir: None }
            }
        }
    }
}

/// Sleeps a seeded time in `[lo, hi)` ms: the moment the next event
/// (stop, kill) happens.
fn pause(rng: &mut Rng, lo: u64, hi: u64) {
    thread::sleep(Duration::from_millis(lo + rng.below(hi - lo)));
}

/// Runs one trial.
pub fn run(t: &Trial, verbose: bool) -> Report {
    let mut report = Report {
        verbose,
        ..Report::default()
    };
    let mut rng = Rng::new(t.seed);
    let outcome = guarded(|| match t.hosts {
        1 => one_host(t, &mut rng, &mut report),
        _ => two_hosts(t, &mut rng, &mut report),
    });
    if let Err(msg) = outcome {
        report.fail("trial aborted", vec![msg]);
    }
    report
}

/// I1: captures `m` as it stands, syncs, restores the backend into a new
/// store and compares everything, mtimes included; with the database
/// worker's journal, also checks the restore's databases hold every
/// committed row.
fn sync_and_restore(m: &Mount, url: &str, check: &str, rows: Option<&Log>, report: &mut Report) {
    let before = match capture(m.path()) {
        Ok(img) => img,
        Err(e) => return report.fail(check, vec![format!("reading the mount: {e}")]),
    };
    // A failed sync still gets its restore compared: what is missing says
    // more than the exit status.
    let synced = sync(m);
    let status = ferry(
        &[
            "status",
            "--json",
            m.path().to_str().expect("utf-8 temp path"),
        ],
        Duration::from_secs(30),
    );
    let fresh = match guarded(|| Mount::with_backend(url)) {
        Ok(fresh) => fresh,
        Err(msg) => {
            let mut lines = synced.err().unwrap_or_default();
            lines.push(format!("a fresh restore did not mount: {msg}"));
            return report.fail(check, lines);
        }
    };
    match capture(fresh.path()) {
        Ok(after) => {
            let cmp = Compare {
                mtimes: true,
                holes: true,
                ignore: &|_| false,
            };
            let d = diff(&before, &after, &cmp, ("the mount", "the restore"));
            if let (true, Err(e)) = (d.is_empty(), &synced) {
                report.fail(check, e.clone());
            }
            report.diffs(check, &d, || {
                let shown = status.map_or_else(|e| e.join(" "), |s| s.trim().to_string());
                let mut lines = vec![format!("  status after sync: {shown}")];
                lines.extend(synced.err().into_iter().flatten().map(|l| format!("  {l}")));
                lines
            });
        }
        Err(e) => {
            let mut lines = synced.err().unwrap_or_default();
            lines.push(format!("reading the restore: {e}"));
            report.fail(check, lines);
        }
    }
    if let Some(log) = rows {
        // Checked on a copy: opening a database writes to it (journal
        // mode, a hot journal's rollback), and the restored host would
        // ship that to the backend the checked host shares.
        let problems = match copy_dbs(fresh.path()) {
            Ok(copy) => check_dbs(copy.path(), log),
            Err(e) => vec![format!("copying the restored databases: {e}")],
        };
        if !problems.is_empty() {
            report.fail(&format!("{check}: the restore's databases"), problems);
        }
    }
}

/// I3 by `ferry fsck --backend`, where the CLI has it.
fn fsck_backend(url: &str, report: &mut Report) {
    if backend_fsck_supported() {
        if let Err(e) = ferry(&["fsck", "--backend", url], Duration::from_secs(120)) {
            report.fail("I3 (ferry fsck --backend)", e);
        }
    }
}

/// Reads every worker's journal; a journal that cannot be read is a
/// failure of the checker itself.
fn read_logs(specs: &[WorkerArgs], report: &mut Report) -> Vec<(String, Log)> {
    let mut logs = Vec::new();
    for s in specs {
        match journal::read(&s.journal()) {
            Ok(log) => logs.push((s.name(), log)),
            Err(e) => report.fail("journal", vec![e]),
        }
    }
    logs
}

fn one_host(t: &Trial, rng: &mut Rng, report: &mut Report) {
    let backend = Backend::create(t);
    let mut m = Mount::with_backend(&backend.url);
    let reference = m.scratch().join("reference");
    let journals = m.scratch().join("journals");
    for dir in [&reference, &journals] {
        fs::create_dir(dir).expect("create reference/journal dir");
    }
    let tops: Vec<String> = (0..FS_WORKERS)
        .map(|i| format!("w{i}"))
        .chain([SHARED.to_string()])
        .collect();
    for top in &tops {
        fs::create_dir(m.join(top)).expect("mkdir on the mount");
        fs::create_dir(reference.join(top)).expect("mkdir in the reference");
    }
    sqlite::create(m.path()).expect("create the databases");
    let worker = |kind: &str, id: usize, seed: u64| WorkerArgs {
        kind: kind.to_string(),
        id,
        seed,
        mount: m.path().to_path_buf(),
        reference: reference.clone(),
        journals: journals.clone(),
        limit: WORKER_LIMIT,
    };
    let mut specs: Vec<WorkerArgs> = (0..FS_WORKERS)
        .map(|id| worker("fs", id, rng.next_u64()))
        .collect();
    specs.push(worker("db", 0, rng.next_u64()));
    let mut workers = Workers::default();
    for s in &specs {
        workers.spawn(s).expect("spawn a worker");
    }

    let steady = journals.join(STEADY);

    // I1 with files open for writing (and mapped, and a database mid-way),
    // some of them already shipped while open.
    run_phase(rng, &steady);
    match workers.stop() {
        Ok(()) => {
            let db = read_logs(&specs[FS_WORKERS..], report).pop();
            let rows = db.as_ref().map(|(_, log)| log);
            let check = "I1 (sync with open writers)";
            sync_and_restore(&m, &backend.url, check, rows, report);
        }
        Err(e) => report.fail("workers", vec![e]),
    }
    workers.resume();

    // The crash.
    run_phase(rng, &steady);
    m.kill9();
    for problem in workers.kill() {
        report.fail("worker", vec![problem]);
    }
    let logs = read_logs(&specs, report);
    m.remount();
    check_model(&reference, &m, &logs, report);

    // I1 on the recovered volume, and I2's "nor the restore": before the
    // databases are opened, so nothing reopens a file the crash left
    // unshipped.
    let rows = logs.iter().find(|(n, _)| n == "db0").map(|(_, l)| l);
    sync_and_restore(
        &m,
        &backend.url,
        "I1+I2 (sync after the crash)",
        rows,
        report,
    );
    if let Some(log) = rows {
        let problems = check_dbs(m.path(), log);
        if !problems.is_empty() {
            report.fail("I2 (SQLite commits survive locally)", problems);
        }
    }

    keep_logs(t, std::slice::from_ref(&m), report);
    // The store and the backend.
    m.unmount();
    let store = m.store().to_str().expect("utf-8 temp path");
    if let Err(e) = ferry(&["fsck", "--store", store], Duration::from_secs(120)) {
        report.fail("store fsck after the crash", e);
    }
    fsck_backend(&backend.url, report);
}

/// I2 against the model, on the tree as the crash left it (read-only:
/// opening a file for writing is itself a change the daemon logs); and
/// every disagreement a worker saw while the mount was alive.
fn check_model(reference: &Path, m: &Mount, logs: &[(String, Log)], report: &mut Report) {
    for (name, log) in logs {
        for (rec, why) in &log.diverged {
            report.fail(
                "mount and reference disagree (live mount)",
                vec![format!("{name} op {}: {}: {why}", rec.n, rec.what)],
            );
        }
    }
    let acked: Vec<String> = logs
        .iter()
        .map(|(name, l)| format!("{name} {}", l.done.len()))
        .collect();
    let in_flight: Vec<journal::Record> = logs
        .iter()
        .flat_map(|(_, l)| l.in_flight.iter().cloned())
        .collect();
    match (capture(reference), capture(m.path())) {
        (Ok(r), Ok(mnt)) => {
            report.notes.push(format!(
                "acknowledged ops before the kill: {}; {} paths after it, {} of them left \
                 out for {} ops in flight",
                acked.join(", "),
                mnt.nodes.len(),
                model::uncertain(&r, &mnt, &in_flight).len(),
                in_flight.len()
            ));
            let d = model::check(&r, &mnt, &in_flight);
            report.diffs("I2 (crash loses nothing)", &d, || {
                in_flight
                    .iter()
                    .map(|r| format!("  in flight: {}", r.what))
                    .collect()
            });
        }
        (Err(e), _) => report.fail("reference", vec![e]),
        (_, Err(e)) => report.fail(
            "I2 (crash loses nothing)",
            vec![format!("reading the remounted tree: {e}")],
        ),
    }
}

/// Lets the workers run a seeded while in mixed mode, then (two times in
/// three) a seeded while in steady mode, long enough for replication to
/// catch up and read the files still open (it waits two seconds for
/// writers to close).
fn run_phase(rng: &mut Rng, steady: &Path) {
    pause(rng, 300, 2000);
    if rng.below(3) > 0 {
        fs::write(steady, b"").expect("enter steady mode");
        pause(rng, 1500, 4500);
        fs::remove_file(steady).expect("leave steady mode");
    }
}

/// A past both hosts share: directories and files on the names the chaos
/// workers use, so each host moves and deletes what the other changes.
fn base_tree(root: &Path) -> std::io::Result<()> {
    for d in ["a", "b", "c", "a/a", "a/b", "b/a", "b/c", "c/a"] {
        fs::create_dir(root.join(d))?;
    }
    for (i, f) in ["d", "e", "a/d", "a/e", "b/d", "c/e"].iter().enumerate() {
        fs::write(root.join(f), vec![i as u8; 1000 * (i + 1)])?;
    }
    Ok(())
}

fn two_hosts(t: &Trial, rng: &mut Rng, report: &mut Report) {
    let backend = Backend::create(t);
    let first = Mount::with_backend(&backend.url);
    base_tree(first.path()).expect("write the base tree");
    if let Err(e) = sync(&first) {
        return report.fail("setup: sync of the base tree", e);
    }
    let mut hosts = [first, Mount::with_backend(&backend.url)];
    let journals: PathBuf = hosts[0].scratch().join("journals");
    fs::create_dir(&journals).expect("create journal dir");
    let mut workers = Workers::default();
    let mut next_id = 0;
    let mut spawn = |workers: &mut Workers, host: &Mount, rng: &mut Rng| {
        for _ in 0..CHAOS_PER_HOST {
            let args = WorkerArgs {
                kind: "chaos".to_string(),
                id: next_id,
                seed: rng.next_u64(),
                mount: host.path().to_path_buf(),
                reference: PathBuf::new(),
                journals: journals.clone(),
                limit: WORKER_LIMIT,
            };
            next_id += 1;
            workers.spawn(&args).expect("spawn a worker");
        }
    };
    for h in &hosts {
        spawn(&mut workers, h, rng);
    }
    pause(rng, 800, 2500);
    if rng.chance(50) {
        // Its workers stop once the mount is gone; new ones take over.
        hosts[0].kill9();
        hosts[0].remount();
        spawn(&mut workers, &hosts[0], rng);
        report
            .notes
            .push("host 0 was killed (-9) and remounted".into());
    }
    pause(rng, 500, 1500);
    for problem in workers.kill() {
        report.fail("worker", vec![problem]);
    }
    // Twice: the second round ships what resolving the first one's
    // conflicts made. With `--converge`, every sync must succeed:
    // conflicts are resolved, never left holding changes back.
    for round in 0..2 {
        for (i, h) in hosts.iter().enumerate() {
            match sync(h) {
                Err(e) if t.converge => {
                    report.fail(&format!("sync of host {i} (round {round})"), e)
                }
                Err(e) => report.notes.push(format!("host {i}: {}", e.join(" "))),
                Ok(()) => {}
            }
        }
    }
    fsck_backend(&backend.url, report);
    let fresh = match guarded(|| Mount::with_backend(&backend.url)) {
        Ok(fresh) => fresh,
        Err(msg) => return report.fail("I3 (a restore loads)", vec![msg]),
    };
    let restored = match settled_capture(fresh.path()) {
        Ok(img) => img,
        Err(e) => return report.fail("I3 (every file of a restore reads)", vec![e]),
    };
    let problems = model::structure(&restored);
    if !problems.is_empty() {
        report.fail("I3 (the restored tree hangs together)", problems);
    }
    drop(fresh);
    if t.converge {
        converged(&backend.url, &hosts, restored, report);
    }
    keep_logs(t, &hosts, report);
}

/// After a failed trial, the daemons' logs and their stores' metadata
/// outlive its temp dirs, for the post-mortem. The metadata tells a host
/// whose own state differs from the backend from one whose kernel only
/// shows it wrong (a directory it marked dead lists empty whatever the
/// store holds).
fn keep_logs(t: &Trial, hosts: &[Mount], report: &mut Report) {
    if report.failures.is_empty() {
        return;
    }
    for (i, h) in hosts.iter().enumerate() {
        // Named by run and trial, so a later failure of the run does not
        // overwrite an earlier one's.
        let kept = std::env::temp_dir().join(format!(
            "ferry-check-{}-{}-host{i}",
            std::process::id(),
            t.index
        ));
        let log = kept.with_extension("log");
        report.notes.push(match fs::write(&log, h.daemon_log()) {
            Ok(()) => format!("host {i}'s daemon log is kept at {}", log.display()),
            Err(e) => format!("host {i}'s daemon log could not be kept: {e}"),
        });
        let store = kept.with_extension("store");
        report.notes.push(match keep_store(h, &store) {
            Ok(()) => format!("host {i}'s store metadata is kept in {}", store.display()),
            Err(e) => format!("host {i}'s store metadata could not be kept: {e}"),
        });
    }
}

/// A copy of `host`'s store metadata in `to` (a directory): the database,
/// its write-ahead log and the journal, copied as bytes, because the
/// daemon, still running, holds the database in exclusive mode. It is
/// quiet by now (converged, or given up on), so the copy holds together;
/// `ferry fsck --store` on it replays the journal's last writes.
fn keep_store(host: &Mount, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for name in ["meta.db", "meta.db-wal", "journal"] {
        fs::copy(host.store().join(name), to.join(name))?;
    }
    Ok(())
}

/// Convergence: once every host synced, each host shows the tree a fresh
/// restore shows, byte for byte, within [`CONVERGE`]. The restore is
/// taken again while a host differs from it: down-sync still applies the
/// others' last changes, and what it does may itself ship (what a pulled
/// deletion rescues to `/lost+found`, say), so the backend can move on
/// after the last sync and the first restore. The hosts must end equal to
/// one restore of the backend as it then is.
fn converged(url: &str, hosts: &[Mount], restored: Image, report: &mut Report) {
    let cmp = Compare {
        mtimes: false,
        holes: false,
        ignore: &|_: &str| false,
    };
    let deadline = Instant::now() + CONVERGE;
    let mut restored = restored;
    // Bounded by the deadline; each pass reads every tree once.
    let last = loop {
        let mut diffs = Vec::new();
        for (i, h) in hosts.iter().enumerate() {
            match capture(h.path()) {
                Ok(img) => diffs.extend(
                    diff(&restored, &img, &cmp, ("the restore", "the host"))
                        .into_iter()
                        .map(|d| (i, d)),
                ),
                Err(e) => return report.fail(&format!("convergence (host {i} reads)"), vec![e]),
            }
        }
        if diffs.is_empty() || Instant::now() >= deadline {
            break diffs;
        }
        std::thread::sleep(Duration::from_millis(200));
        match guarded(|| Mount::with_backend(url)).and_then(|fresh| capture(fresh.path())) {
            Ok(img) => restored = img,
            Err(e) => return report.fail("convergence (a later restore)", vec![e]),
        }
    };
    for (i, _) in hosts.iter().enumerate() {
        let own: Vec<_> = last
            .iter()
            .filter(|(h, _)| *h == i)
            .map(|(_, d)| d.clone())
            .collect();
        report.diffs(
            &format!("convergence (host {i} equals a restore)"),
            &own,
            || vec![format!("host {i} did not converge within {CONVERGE:?}")],
        );
    }
}

/// Runs the trials `opts` asks for within its budget; prints each trial's
/// outcome and a summary; returns the process exit code.
/// Set by SIGINT or SIGTERM (see [`stop_on_signals`]).
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn ask_to_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM end the run after the trial under way instead
/// of killing the checker on the spot, which left that trial's mounts,
/// namespaces and temp dirs behind: its guards now tear them down as at
/// any other end. (Ctrl-C also reaches the trial's own processes, so that
/// trial ends early; it is reported as interrupted, not as a failure.)
fn stop_on_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; glibc's signal() restarts interrupted calls.
        unsafe { libc::signal(sig, ask_to_stop as *const () as libc::sighandler_t) };
    }
}

pub fn run_all(opts: &Options) -> i32 {
    install_panic_hook();
    stop_on_signals();
    println!(
        "fs_check: {} trials, seed {}, backend {:?}, hosts {:?}, budget {:?}",
        opts.trials, opts.seed, opts.backends, opts.hosts, opts.budget
    );
    if !backend_fsck_supported() {
        println!("fs_check: `ferry fsck` has no --backend; I3 is checked by restores alone");
    }
    let started = Instant::now();
    let mut seeds = Rng::new(opts.seed);
    let mut failed = Vec::new();
    let mut ran = 0;
    for index in 0..opts.trials {
        if !opts.budget.is_zero() && started.elapsed() > opts.budget {
            println!(
                "fs_check: budget of {:?} used up after {ran} trials",
                opts.budget
            );
            break;
        }
        let t = Trial::nth(opts, index, &mut seeds);
        let trial_started = Instant::now();
        let report = run(&t, opts.verbose);
        let secs = trial_started.elapsed().as_secs_f64();
        let what = format!(
            "trial {index}: seed {} backend {} hosts {}",
            t.seed,
            t.backend.name(),
            t.hosts
        );
        if STOP.load(Ordering::SeqCst) {
            println!("{what}: interrupted ({secs:.1} s), cleaned up; not counted");
            println!(
                "fs_check: interrupted after {ran} trials, {} failed",
                failed.len()
            );
            return 130;
        }
        ran += 1;
        for note in &report.notes {
            println!("{what}: note: {note}");
        }
        if report.failures.is_empty() {
            println!("{what}: ok ({secs:.1} s)");
            continue;
        }
        println!("{what}: FAILED ({secs:.1} s)");
        for f in &report.failures {
            println!("  {}:", f.check);
            for l in f.lines.iter().flat_map(|l| l.lines()) {
                println!("    {l}");
            }
        }
        println!("  replay: {}", t.replay());
        failed.push(t);
    }
    println!(
        "fs_check: {ran} trials in {:.0} s, {} failed",
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    for t in &failed {
        println!("  failed: {}", t.replay());
    }
    i32::from(!failed.is_empty())
}
