//! The database worker and its check: two SQLite databases on the mount,
//! one in rollback-journal mode and one in WAL mode, both
//! `synchronous=FULL`, each filled by transactions of inserted rows.
//!
//! In steady mode ([`super::workload::STEADY`]) only the WAL database is
//! written: a WAL commit writes to files that stay open, so the change log
//! goes quiet, as it does for a database server between schema changes.
//!
//! A transaction is journaled as begun (`r:DB:LO:HI`, its row ids) before
//! BEGIN and as acknowledged once COMMIT returned. After a crash each
//! database must pass `integrity_check`, hold every acknowledged row with
//! its exact payload, and hold nothing else but the rows of the one
//! transaction in flight.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use rusqlite::Connection;

use super::journal::{Journal, Log, Token};
use super::workers::{WorkerArgs, EXIT_DIVERGED};
use super::workload::{mount_alive, STEADY};
use crate::support::Rng;

/// The databases' directory, at the mount root.
pub const DIR: &str = "db";
/// Each database and its journal mode.
const DBS: [(&str, &str); 2] = [("rollback.db", "DELETE"), ("wal.db", "WAL")];
/// The WAL database's index in [`DBS`].
const WAL: usize = 1;

/// Opens `name` under `mount` with its journal mode and full sync.
fn open(mount: &Path, name: &str, mode: &str) -> Result<Connection, String> {
    let e = |e: rusqlite::Error| format!("{name}: {e}");
    let conn = Connection::open(mount.join(DIR).join(name)).map_err(e)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(e)?;
    let got: String = conn
        .query_row(&format!("PRAGMA journal_mode={mode}"), [], |r| r.get(0))
        .map_err(e)?;
    if !got.eq_ignore_ascii_case(mode) {
        return Err(format!("{name}: journal_mode {got}, wanted {mode}"));
    }
    conn.pragma_update(None, "synchronous", "FULL").map_err(e)?;
    Ok(conn)
}

/// The payload of row `id` of database `db`: its length and bytes follow
/// from the id, so a torn or misplaced row shows.
fn payload(db: usize, id: u64) -> Vec<u8> {
    let mut rng = Rng::new(id.wrapping_mul(0x9E37_79B9) ^ db as u64);
    let len = 16 + rng.below(3000) as usize;
    rng.bytes(len)
}

/// Creates the directory and both (empty) databases, before any worker.
pub fn create(mount: &Path) -> Result<(), String> {
    let dir = mount.join(DIR);
    std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    for (name, mode) in DBS {
        open(mount, name, mode)?
            .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
            .map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

/// The worker's main loop; returns the process exit code.
pub fn run(args: &WorkerArgs) -> i32 {
    let mut journal = match Journal::open(&args.journal()) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("db worker: journal: {e}");
            return 1;
        }
    };
    let mut conns = Vec::new();
    for (name, mode) in DBS {
        match open(&args.mount, name, mode) {
            Ok(c) => conns.push(c),
            Err(e) => {
                eprintln!("db worker: open {name}: {e}");
                return if mount_alive(&args.mount) { 1 } else { 0 };
            }
        }
    }
    let mut rng = Rng::new(args.seed);
    let mut next = [1u64; 2];
    let steady = args.journals.join(STEADY);
    let started = Instant::now();
    while started.elapsed() < args.limit {
        let k = if steady.exists() {
            WAL
        } else {
            rng.below(2) as usize
        };
        let (lo, hi) = (next[k], next[k] + rng.below(20));
        let rows = Token::Rows {
            db: DBS[k].0.to_string(),
            lo,
            hi,
        };
        let n = match journal.begin(&[rows], &format!("insert {lo}..={hi} into {}", DBS[k].0)) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("db worker: journal: {e}");
                return 1;
            }
        };
        let committed = (|| {
            let tx = conns[k].transaction()?;
            for id in lo..=hi {
                tx.execute(
                    "INSERT INTO t (id, payload) VALUES (?1, ?2)",
                    (id as i64, payload(k, id)),
                )?;
            }
            tx.commit()
        })();
        let recorded = match committed {
            Ok(()) => journal.done(n),
            Err(_) if !mount_alive(&args.mount) => return 0,
            Err(e) => {
                let _ = journal.diverged(n, &format!("SQLite on a live mount: {e}"));
                return EXIT_DIVERGED;
            }
        };
        if let Err(e) = recorded {
            eprintln!("db worker: journal: {e}");
            return 1;
        }
        next[k] = hi + 1;
    }
    0
}

/// Row ids of `db` in `records`.
fn rows<'a>(records: impl Iterator<Item = &'a super::journal::Record>, db: &str) -> BTreeSet<u64> {
    records
        .flat_map(|r| &r.tokens)
        .filter_map(|t| match t {
            Token::Rows { db: d, lo, hi } if d == db => Some(*lo..=*hi),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Checks both databases on `mount` against the worker's journal; returns
/// what is wrong, one line per problem.
pub fn check(mount: &Path, log: &Log) -> Vec<String> {
    let mut problems = Vec::new();
    for (k, (name, mode)) in DBS.iter().enumerate() {
        let acked = rows(log.done.iter(), name);
        let maybe = rows(log.in_flight.iter(), name);
        let conn = match open(mount, name, mode) {
            Ok(c) => c,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let result = (|| -> rusqlite::Result<Vec<String>> {
            let mut out = Vec::new();
            let integrity: Vec<String> = conn
                .prepare("PRAGMA integrity_check")?
                .query_map([], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            if integrity != ["ok"] {
                out.push(format!("{name}: integrity_check: {}", integrity.join("; ")));
            }
            let mut present = BTreeSet::new();
            let mut stmt = conn.prepare("SELECT id, payload FROM t ORDER BY id")?;
            let mut q = stmt.query([])?;
            while let Some(row) = q.next()? {
                let (id, data): (i64, Vec<u8>) = (row.get(0)?, row.get(1)?);
                let id = id as u64;
                if data != payload(k, id) {
                    out.push(format!(
                        "{name}: row {id} has a wrong payload ({} bytes)",
                        data.len()
                    ));
                }
                if !acked.contains(&id) && !maybe.contains(&id) {
                    out.push(format!("{name}: row {id} was never inserted"));
                }
                present.insert(id);
            }
            let missing: Vec<u64> = acked.difference(&present).copied().collect();
            if let (Some(first), Some(last)) = (missing.first(), missing.last()) {
                out.push(format!(
                    "{name} ({mode} journal): {} acknowledged rows missing, ids {first}..={last} \
                     ({} rows present, {} acknowledged)",
                    missing.len(),
                    present.len(),
                    acked.len()
                ));
            }
            Ok(out)
        })();
        match result {
            Ok(p) => problems.extend(p),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    problems
}
