//! A real tree over a slow link (ANCHORS.md): `cp -a` of a real source tree
//! onto ferry with its PostgreSQL backend 50 ms RTT away, against ferry
//! with no backend, a plain directory, sshfs and `rclone mount` (sftp) to an
//! sshd behind the same link, side by side in ONE run. Not a timed test: it
//! prints a markdown table for the WAN section of docs/benchmarks.md.
//!
//! The link is support/wan.rs: a network namespace reached over a veth, and
//! a `ferry-netem` delay proxy in it (the kernel has no sch_netem) in front
//! of each server, which stay on the host's loopback.
//!
//! For each target: (a) when `cp -a` returns, (b) when everything is at the
//! server (ferry: `ferry sync` returns; sshfs: writes are synchronous, so the
//! same as (a); rclone: its upload queue, polled with `rclone rc
//! vfs/stats`, is empty). A peer still running after `FERRY_WAN_BUDGET_S`
//! is stopped and reported as "> budget" with the files it had finished.
//!
//! Env: `FERRY_WAN_COPIES` (5: copies of the tree of support/crates.rs),
//! `FERRY_WAN_ONE_WAY_MS` (25), `FERRY_WAN_BUDGET_S` (300),
//! `FERRY_WAN_TARGETS` (`dir,ferry-local,ferry-wan,sshfs,rclone`).
//! Run with `scripts/bench-wan.sh` (installs the peers, release build).

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_backend::testing::PgServer;
use support::cli::{ferry_within, init};
use support::crates::{count_files, unpack};
use support::peers::{free_port, PeerMount, Sshd};
use support::wan::{url_addr, url_via, Wan};
use support::{
    describe, ferry_bin, poll_until, run_bounded, Mount, Target, TempDir, DEFAULT_OPTIONS,
};

/// The reference row: the same copy with no network involved.
const FERRY_LOCAL: &str = "ferry, no backend";

/// One row of the table.
struct Row {
    target: String,
    /// Until `cp -a` returned, or `None` if it hit the budget.
    copied: Option<Duration>,
    /// Until everything was at the server, or `None` past the budget.
    stored: Option<Duration>,
    /// Whether there is a server at all ((b) means something).
    networked: bool,
    /// Files at the destination (or at the server) at the end.
    files_done: usize,
}

/// Runs `cmd` bounded by `budget`; whether it succeeded in time.
fn run_within(cmd: &mut Command, budget: Duration) -> bool {
    match run_bounded(cmd, budget) {
        Ok(o) if o.status.success() => true,
        Ok(o) => panic!(
            "{cmd:?}: {}",
            describe(&Ok(o)) // a failure (not slowness) is a broken setup
        ),
        Err(_) => false,
    }
}

/// `cp -a SRC DEST` bounded by `budget`: its duration, or `None`.
fn copy(src: &Path, dest: &Path, budget: Duration) -> Option<Duration> {
    let start = Instant::now();
    run_within(Command::new("cp").arg("-a").arg(src).arg(dest), budget).then(|| start.elapsed())
}

/// ferry with its backend through `wan`: (a) cp, (b) `ferry sync`.
fn ferry_wan(pg: &PgServer, wan: &mut Wan, tree: &Path, budget: Duration) -> Row {
    let direct = pg.create_database("ferry_wan_bench");
    let slow = url_via(&direct, wan.expose(url_addr(&direct)));
    init(&slow);
    let m = Mount::with_backend(&slow);
    let start = Instant::now();
    let copied = copy(tree, &m.join("tree"), budget);
    let remaining = budget.saturating_sub(start.elapsed()).as_secs().max(1);
    let mnt = m.path().to_str().unwrap();
    let synced = run_bounded(
        Command::new(ferry_bin()).args(["sync", mnt, "--timeout", &remaining.to_string()]),
        Duration::from_secs(remaining + 30),
    );
    let stored = matches!(&synced, Ok(o) if o.status.success()).then(|| start.elapsed());
    let status = ferry_within(&["status", mnt], Duration::from_secs(30));
    eprintln!("ferry at 50 ms RTT, after sync:\n{status}");
    Row {
        target: "ferry, PostgreSQL 50 ms RTT away".into(),
        copied,
        stored,
        networked: true,
        files_done: count_files(&m.join("tree")),
    }
}

/// sshfs to `sshd` through `wan`; sshfs writes through, so (b) = (a).
fn sshfs(sshd: &Sshd, wan: &mut Wan, tree: &Path, budget: Duration) -> Row {
    let via = wan.expose(sshd.addr());
    let scratch = TempDir::new("ferry-wan-sshfs");
    let (remote, mnt) = (scratch.path().join("remote"), scratch.path().join("mnt"));
    fs::create_dir(&remote).unwrap();
    fs::create_dir(&mnt).unwrap();
    let mut cmd = Command::new("sshfs");
    cmd.arg("-f")
        .arg(format!("root@{}:{}", via.ip(), remote.display()))
        .arg(&mnt)
        .arg("-o")
        .arg(format!(
            "port={},IdentityFile={},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null",
            via.port(),
            sshd.client_key().display()
        ));
    let _m = PeerMount::start(cmd, &mnt, &scratch.path().join("sshfs.log"));
    let copied = copy(tree, &mnt.join("tree"), budget);
    Row {
        target: "sshfs, sshd 50 ms RTT away".into(),
        copied,
        stored: copied,
        networked: true,
        files_done: count_files(&remote),
    }
}

/// `rclone mount --vfs-cache-mode writes` on an sftp remote to `sshd`
/// through `wan`: (a) cp, (b) its upload queue is empty.
fn rclone(sshd: &Sshd, wan: &mut Wan, tree: &Path, budget: Duration) -> Row {
    let via = wan.expose(sshd.addr());
    let scratch = TempDir::new("ferry-wan-rclone");
    let (remote, mnt, cache) = (
        scratch.path().join("remote"),
        scratch.path().join("mnt"),
        scratch.path().join("cache"),
    );
    for d in [&remote, &mnt, &cache] {
        fs::create_dir(d).unwrap();
    }
    let rc = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new("rclone");
    // The remote is configured entirely through the environment.
    cmd.env("RCLONE_CONFIG", "/dev/null")
        .env("RCLONE_CONFIG_WAN_TYPE", "sftp")
        .env("RCLONE_CONFIG_WAN_HOST", via.ip().to_string())
        .env("RCLONE_CONFIG_WAN_PORT", via.port().to_string())
        .env("RCLONE_CONFIG_WAN_USER", "root")
        .env("RCLONE_CONFIG_WAN_KEY_FILE", sshd.client_key())
        .env("RCLONE_CONFIG_WAN_SHELL_TYPE", "unix")
        .arg("mount")
        .arg(format!("wan:{}", remote.display()))
        .arg(&mnt)
        .args(["--vfs-cache-mode", "writes", "--cache-dir"])
        .arg(&cache)
        .args(["--rc", "--rc-no-auth", "--rc-addr", &rc]);
    let _m = PeerMount::start(cmd, &mnt, &scratch.path().join("rclone.log"));
    let start = Instant::now();
    let copied = copy(tree, &mnt.join("tree"), budget);
    let queue_empty = || {
        let out = run_bounded(
            Command::new("rclone").args(["rc", "--url", &rc, "vfs/stats"]),
            Duration::from_secs(30),
        );
        let Ok(o) = out else { return false };
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        let c = &v["diskCache"];
        c["uploadsInProgress"] == 0 && c["uploadsQueued"] == 0
    };
    let stored = (copied.is_some()
        && poll_until(budget.saturating_sub(start.elapsed()), || {
            std::thread::sleep(Duration::from_millis(500));
            queue_empty()
        }))
    .then(|| start.elapsed());
    Row {
        target: "rclone mount (writes cache), sftp 50 ms RTT away".into(),
        copied,
        stored,
        networked: true,
        files_done: count_files(&remote),
    }
}

/// A row for a target with no network: (a) only.
fn local(target: &str, dest: &Path, tree: &Path, budget: Duration) -> Row {
    let copied = copy(tree, dest, budget);
    Row {
        target: target.into(),
        copied,
        stored: None,
        networked: false,
        files_done: count_files(dest),
    }
}

fn secs(d: Option<Duration>, budget: Duration) -> String {
    d.map_or(format!("> {} s (budget)", budget.as_secs()), |d| {
        format!("{:.1} s", d.as_secs_f64())
    })
}

/// Column (b): "—" where there is no server.
fn stored(r: &Row, budget: Duration) -> String {
    if r.networked {
        secs(r.stored, budget)
    } else {
        "—".to_string()
    }
}

fn main() {
    let copies = support::env_u64("FERRY_WAN_COPIES", 5) as usize;
    let one_way = Duration::from_millis(support::env_u64("FERRY_WAN_ONE_WAY_MS", 25));
    let budget = Duration::from_secs(support::env_u64("FERRY_WAN_BUDGET_S", 300));
    let targets = std::env::var("FERRY_WAN_TARGETS")
        .unwrap_or_else(|_| "dir,ferry-local,ferry-wan,sshfs,rclone".into());
    let stage = TempDir::new("ferry-wan-tree");
    let files = unpack(stage.path(), copies);
    let tree = stage.path();
    let du = run_bounded(
        Command::new("du").args(["-sb"]).arg(tree),
        Duration::from_secs(60),
    )
    .map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .split('\t')
            .next()
            .unwrap_or("?")
            .to_string()
    })
    .unwrap_or_default();
    eprintln!(
        "tree: {files} files, {du} bytes, {copies} copies of {:?}",
        support::crates::TREE_CRATES
    );

    let mut rows = Vec::new();
    let mut wan = Wan::new(one_way);
    let (mut pg, mut sshd) = (None, None);
    for t in targets.split(',') {
        eprintln!("running {t}");
        let row = match t.trim() {
            "dir" => {
                let d = TempDir::new("ferry-wan-dir");
                local(
                    "local directory (ext4)",
                    &d.path().join("tree"),
                    tree,
                    budget,
                )
            }
            "ferry-local" => {
                let m = Mount::with(Target::Ferry, DEFAULT_OPTIONS);
                local(FERRY_LOCAL, &m.join("tree"), tree, budget)
            }
            "ferry-wan" => ferry_wan(
                pg.get_or_insert_with(PgServer::start),
                &mut wan,
                tree,
                budget,
            ),
            "sshfs" => sshfs(sshd.get_or_insert_with(Sshd::start), &mut wan, tree, budget),
            "rclone" => rclone(sshd.get_or_insert_with(Sshd::start), &mut wan, tree, budget),
            other => panic!("unknown target {other:?} in FERRY_WAN_TARGETS"),
        };
        eprintln!(
            "{}: cp {}, stored {}, {} files",
            row.target,
            secs(row.copied, budget),
            stored(&row, budget),
            row.files_done
        );
        rows.push(row);
    }

    let reference = rows
        .iter()
        .find(|r| r.target == FERRY_LOCAL)
        .and_then(|r| r.copied);
    println!(
        "`cp -a` of {files} files ({du} bytes; {copies} copies of the crates {}), one-way delay {} ms ({} ms RTT), budget {} s per target\n",
        support::crates::TREE_CRATES.join(", "),
        one_way.as_millis(),
        2 * one_way.as_millis(),
        budget.as_secs()
    );
    println!("| target | cp returns after | × ferry, no backend | everything at the server after (from cp start) | files at the destination |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        let ratio = match (r.copied, reference) {
            (Some(c), Some(base)) => format!("{:.2}×", c.as_secs_f64() / base.as_secs_f64()),
            _ => "—".into(),
        };
        let stored = stored(r, budget);
        println!(
            "| {} | {} | {ratio} | {stored} | {} of {files} |",
            r.target,
            secs(r.copied, budget),
            r.files_done
        );
    }
}
