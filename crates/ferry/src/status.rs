//! `ferry status`: what each mount is doing, for one mount or a hundred.
//!
//! Every mount is asked at once, each answer bounded by the control
//! socket's timeout, so a hung daemon delays the table by seconds, not
//! forever, and a dead one (its socket refuses) is marked dead while the
//! others are still shown. A user sees the mounts they made; root sees all.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::bail;
use ferry_fs::control::{self, Report};
use ferry_fs::mount::{self, MountEntry};
use indicatif::HumanBytes;
use serde_json::{json, Value};

/// One mount's line of the answer.
struct Row {
    mount: PathBuf,
    store: PathBuf,
    answer: Answer,
}

enum Answer {
    Report(Box<Report>),
    /// The daemon is gone: its mount is dead.
    Dead(String),
    /// It could not be asked.
    Error(String),
}

impl Row {
    fn state(&self) -> &'static str {
        match &self.answer {
            Answer::Report(r) if r.local_only => "local",
            Answer::Report(r) if r.status.last_error.is_some() => "retrying",
            Answer::Report(_) => "live",
            Answer::Dead(_) => "dead",
            Answer::Error(_) => "unknown",
        }
    }

    fn json(&self) -> Value {
        let mut v = match &self.answer {
            Answer::Report(r) => serde_json::to_value(r).unwrap_or(Value::Null),
            Answer::Dead(e) | Answer::Error(e) => json!({
                "store": self.store.display().to_string(),
                "error": e,
            }),
        };
        if let Value::Object(map) = &mut v {
            map.insert("mount".into(), json!(self.mount.display().to_string()));
            map.insert("state".into(), json!(self.state()));
        }
        v
    }
}

/// Runs `ferry status [MOUNT…] [--json]`.
pub fn run(paths: &[PathBuf], as_json: bool) -> anyhow::Result<()> {
    if !as_json {
        // A path that is no ferry mount is a mistake to hear about at once;
        // JSON readers get it as a row like any other.
        for path in paths {
            mount_of(path)?;
        }
    }
    let (mounts, mut rows) = select(paths);
    if mounts.is_empty() && rows.is_empty() {
        if !as_json {
            println!("no ferry volume is mounted");
        }
        return Ok(());
    }
    rows.extend(ask_all(&mounts));
    rows.sort_by(|a, b| a.mount.cmp(&b.mount));
    if as_json {
        for row in &rows {
            println!("{}", row.json());
        }
    } else if paths.is_empty() {
        print_table(&rows);
    } else {
        for (i, row) in rows.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print_details(row);
        }
    }
    let failed = rows
        .iter()
        .filter(|r| !matches!(r.answer, Answer::Report(_)))
        .count();
    if failed > 0 {
        bail!(
            "{failed} of {} mounts could not be asked (a dead one is cleared by `ferry umount`)",
            rows.len()
        );
    }
    Ok(())
}

/// Runs `ferry status --processes [MOUNT…] [--json]`: the processes whose
/// file-system context differs from their mount's default, as each daemon
/// reports them.
pub fn run_processes(paths: &[PathBuf], as_json: bool) -> anyhow::Result<()> {
    if !as_json {
        for path in paths {
            mount_of(path)?;
        }
    }
    let (mounts, mut rows) = select(paths);
    rows.extend(ask_all(&mounts));
    rows.sort_by(|a, b| a.mount.cmp(&b.mount));
    if as_json {
        for row in &rows {
            match &row.answer {
                Answer::Report(r) => {
                    for p in &r.processes {
                        let mut v = serde_json::to_value(p)?;
                        v["mount"] = json!(row.mount.display().to_string());
                        println!("{v}");
                    }
                }
                Answer::Dead(_) | Answer::Error(_) => println!("{}", row.json()),
            }
        }
    } else {
        print_processes(&rows);
    }
    let failed: Vec<String> = rows
        .iter()
        .filter_map(|r| match &r.answer {
            Answer::Dead(e) | Answer::Error(e) => Some(format!("{}: {e}", r.mount.display())),
            Answer::Report(_) => None,
        })
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} mounts could not be asked ({})",
            failed.len(),
            rows.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

/// The table of `ferry status --processes`: one row per process and mount.
fn print_processes(rows: &[Row]) {
    let header = ["MOUNT", "PID", "DURABILITY", "READS", "TIMEOUT", "COMMAND"];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .filter_map(|row| match &row.answer {
            Answer::Report(r) => Some((row, r)),
            _ => None,
        })
        .flat_map(|(row, r)| {
            r.processes.iter().map(move |p| {
                vec![
                    row.mount.display().to_string(),
                    p.pid.to_string(),
                    p.context.durability.to_string(),
                    p.context.reads.to_string(),
                    format!("{}s", p.context.timeout.as_secs_f64()),
                    p.command.clone(),
                ]
            })
        })
        .collect();
    if cells.is_empty() {
        println!("no process has a file-system context other than its mount's default");
        return;
    }
    print_columns(&header.map(String::from), &cells);
}

/// Prints `header` and `cells` in columns as wide as their widest cell;
/// the last column is not padded.
fn print_columns(header: &[String], cells: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header);
    for row in cells {
        line(row);
    }
}

/// The mounts to ask, and rows already answered for paths that are not
/// ferry mounts.
fn select(paths: &[PathBuf]) -> (Vec<MountEntry>, Vec<Row>) {
    if paths.is_empty() {
        let me = nix::unistd::getuid().as_raw();
        let mounts = mount::ferry_mounts()
            .into_iter()
            .filter(|m| visible(m, me))
            .collect();
        return (mounts, Vec::new());
    }
    let mut mounts = Vec::new();
    let mut rows = Vec::new();
    for path in paths {
        match mount::ferry_mount_containing(path) {
            Some(m) if !mounts.contains(&m) => mounts.push(m),
            Some(_) => {}
            None => rows.push(Row {
                mount: path.clone(),
                store: PathBuf::new(),
                answer: Answer::Error(format!("{} is not in a ferry mount", path.display())),
            }),
        }
    }
    (mounts, rows)
}

/// Whether user `uid` is shown mount `m`: root sees every mount, a user
/// the mounts they made (whose daemons are theirs to ask).
fn visible(m: &MountEntry, uid: u32) -> bool {
    uid == 0 || m.owner == Some(uid)
}

/// Asks every mount at once.
fn ask_all(mounts: &[MountEntry]) -> Vec<Row> {
    std::thread::scope(|s| {
        let asks: Vec<_> = mounts.iter().map(|m| s.spawn(|| ask(m))).collect();
        asks.into_iter()
            .zip(mounts)
            .map(|(ask, m)| {
                ask.join().unwrap_or_else(|_| Row {
                    mount: m.mountpoint.clone(),
                    store: m.store(),
                    answer: Answer::Error("asking it failed".into()),
                })
            })
            .collect()
    })
}

fn ask(m: &MountEntry) -> Row {
    let store = m.store();
    let dead_mount = mount::is_dead(&m.mountpoint);
    let answer = match control::request(&store, "status").and_then(|mut lines| {
        lines
            .next()
            .unwrap_or_else(|| Err(std::io::ErrorKind::UnexpectedEof.into()))
    }) {
        Ok(report) if !dead_mount => Answer::Report(Box::new(report)),
        Ok(_) => Answer::Dead("the mount is dead, though its store's daemon answers".into()),
        Err(e) => match e.kind() {
            _ if dead_mount || died_while_asked(&m.mountpoint, e.kind()) => Answer::Dead(format!(
                "its daemon is gone; clear it with `ferry umount {}`",
                m.mountpoint.display()
            )),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound => {
                Answer::Dead(format!("its daemon does not answer ({e})"))
            }
            std::io::ErrorKind::PermissionDenied => {
                Answer::Error(format!("may not ask its daemon: {e}"))
            }
            _ => Answer::Error(format!("asking its daemon: {e}")),
        },
    };
    Row {
        mount: m.mountpoint.clone(),
        store,
        answer,
    }
}

/// Whether a daemon that hung up on the question was dying: a daemon
/// killed while asked (or just before: a killed process's threads close its
/// sockets and its FUSE connection only as the last of them exits) resets
/// the connection, and its mount reads as dead a moment later.
fn died_while_asked(mountpoint: &Path, error: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);
    matches!(error, ConnectionReset | BrokenPipe | UnexpectedEof)
        && crate::fs_cmd::wait_until(SETTLE, || mount::is_dead(mountpoint))
}

/// `1.2s ago`, or `never`.
fn ago(unix: Option<f64>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    unix.map_or("never".into(), |t| {
        format!("{:.1}s ago", (now - t).max(0.0))
    })
}

/// The table of `ferry status` without arguments: one row per mount.
fn print_table(rows: &[Row]) {
    let header = [
        "MOUNT",
        "STATE",
        "PENDING",
        "CONTACT",
        "CONFLICTS",
        "BACKEND",
        "STORE",
        "NOTE",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let (pending, contact, conflicts, backend, note) = match &row.answer {
                Answer::Report(r) if r.local_only => (
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "none".into(),
                    String::new(),
                ),
                Answer::Report(r) => {
                    let s = &r.status;
                    (
                        format!("{} ({})", s.pending_ops, HumanBytes(s.pending_bytes)),
                        ago(s.last_contact),
                        s.conflicts.to_string(),
                        s.backend.clone(),
                        s.last_error.clone().unwrap_or_default(),
                    )
                }
                Answer::Dead(e) | Answer::Error(e) => {
                    ("-".into(), "-".into(), "-".into(), "-".into(), e.clone())
                }
            };
            vec![
                row.mount.display().to_string(),
                row.state().into(),
                pending,
                contact,
                conflicts,
                backend,
                row.store.display().to_string(),
                note,
            ]
        })
        .collect();
    print_columns(&header.map(String::from), &cells);
}

/// The details of one mount (`ferry status MOUNT`).
fn print_details(row: &Row) {
    println!("mount:     {}", row.mount.display());
    println!("store:     {}", row.store.display());
    println!("state:     {}", row.state());
    let r = match &row.answer {
        Answer::Report(r) => r,
        Answer::Dead(e) | Answer::Error(e) => {
            println!("error:     {e}");
            return;
        }
    };
    if let Some(serving) = &r.serving {
        println!("serving:   {serving}");
    }
    if r.local_only {
        println!("backend:   none (local only)");
        return;
    }
    let s = &r.status;
    let verified = if s.verified {
        "store verified as its volume's"
    } else {
        "not yet verified as the store's volume"
    };
    println!("backend:   {} ({verified})", s.backend);
    let age = s
        .oldest_pending_age_s
        .map_or(String::new(), |a| format!(", oldest {a:.1}s old"));
    println!(
        "pending:   {} changes, {}{age}",
        s.pending_ops,
        HumanBytes(s.pending_bytes)
    );
    println!(
        "shipped:   log {} of {}; {} in {} chunks since the daemon started",
        s.shipped_seq,
        s.head_seq,
        HumanBytes(s.bytes_uploaded),
        s.chunks_uploaded
    );
    println!("contact:   {}", ago(s.last_contact));
    println!(
        "down-sync: feed at {}, {} changes applied",
        s.feed_seq, s.applied
    );
    if let Some(p) = &s.prefetch {
        println!(
            "prefetch:  {} of {} files, {} of {}",
            p.files_done,
            p.files_total,
            HumanBytes(p.bytes_done),
            HumanBytes(p.bytes_total)
        );
    }
    println!(
        "errors:    {}{}",
        s.errors,
        s.last_error
            .as_ref()
            .map_or(String::new(), |e| format!(" (last: {e})"))
    );
    println!("conflicts: {} held back", s.conflicts);
    if !s.resolved.is_empty() {
        println!("resolved:  {} conflicts on this host:", s.resolved.len());
        for c in &s.resolved {
            println!("  {}  {}: {}", ago(Some(c.at)), c.path, c.how);
        }
    }
}

/// The ferry mount `path` is in, for commands that act on a whole volume.
pub fn mount_of(path: &Path) -> anyhow::Result<MountEntry> {
    match mount::ferry_mount_containing(path) {
        Some(m) => Ok(m),
        None => match mount::mount_at(path) {
            Some(other) => bail!(
                "{} is not a ferry mount (it is a {} mount)",
                path.display(),
                other.fstype
            ),
            None => bail!("{} is not in a ferry mount", path.display()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_see_their_own_mounts_and_root_all() {
        let mount = |owner| MountEntry {
            mountpoint: "/m".into(),
            source: "/s".into(),
            fstype: "fuse.ferry".into(),
            owner,
        };
        assert!(visible(&mount(Some(1000)), 1000));
        assert!(!visible(&mount(Some(0)), 1000));
        assert!(!visible(&mount(None), 1000));
        assert!(visible(&mount(Some(1000)), 0) && visible(&mount(None), 0));
    }
}
