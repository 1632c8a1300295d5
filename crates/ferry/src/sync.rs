//! `ferry sync`: wait until the backend has everything written before the
//! call, and show how it goes.
//!
//! Progress is in bytes: what was pending when the sync began is the total,
//! and the daemon's count of bytes uploaded since then is the part done
//! (chunks the backend already had are skipped, so a sync may finish
//! before the bar does). On a terminal it is an indicatif bar with rate and
//! ETA; otherwise a line every `--interval`. A summary closes a sync that
//! succeeded; one that timed out says why, from the daemon's own status.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_fs::control::{self, Report};
use ferry_fs::replicate::Status;
use indicatif::{HumanBytes, HumanDuration, ProgressBar, ProgressStyle};

/// Runs `ferry sync PATH`.
pub fn run(path: &Path, timeout: Duration, interval: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let deadline = started.checked_add(timeout);
    let entry = crate::status::mount_of(path)?;
    let (mountpoint, store) = (entry.mountpoint.clone(), entry.store());
    if ferry_fs::mount::is_dead(&mountpoint) {
        bail!(
            "{} is a dead ferry mount (its daemon is gone): nothing can sync it; clear it with \
             `ferry umount {}` and mount it again",
            mountpoint.display(),
            mountpoint.display()
        );
    }
    // Dirty pages the kernel still holds for the mount (its writeback
    // cache, when files are not passed through) reach the daemon first, so
    // the sync covers them too.
    let root = std::fs::File::open(&mountpoint)
        .with_context(|| format!("opening {}", mountpoint.display()))?;
    nix::unistd::syncfs(&root).with_context(|| format!("syncfs {}", mountpoint.display()))?;
    let (tx, rx) = mpsc::channel();
    // The reader thread ends when the daemon finishes or the socket closes;
    // we stop listening at the deadline either way.
    std::thread::spawn(move || match control::request(&store, "sync") {
        Ok(lines) => {
            for line in lines {
                if tx.send(line).is_err() {
                    break;
                }
            }
        }
        Err(e) => {
            let _ = tx.send(Err(e));
        }
    });
    let mut progress: Option<Progress> = None;
    loop {
        let left = deadline.map_or(Duration::MAX, |d| {
            d.saturating_duration_since(Instant::now())
        });
        let report = match rx.recv_timeout(left) {
            Ok(r) => r.with_context(|| format!("asking the daemon of {}", mountpoint.display()))?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(p) = &progress {
                    p.abandon();
                }
                bail!(
                    "sync {}: not everything is at the backend after {}: {}",
                    mountpoint.display(),
                    HumanDuration(timeout),
                    progress.map_or("the daemon sent nothing".into(), |p| p.why_not_done())
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!(
                    "sync {}: the daemon closed the connection before it was done",
                    mountpoint.display()
                )
            }
        };
        if report.local_only {
            bail!(
                "{} has no backend (it is mounted local only): there is nothing to sync to; mount \
                 it with --backend URL to replicate it",
                mountpoint.display()
            );
        }
        let p = progress.get_or_insert_with(|| Progress::start(&mountpoint, &report, interval));
        p.update(&report);
        if report.done {
            p.finish();
            // Held back, so not at the backend: a restore would differ.
            let held = report.status.conflicts;
            if held > 0 {
                bail!(
                    "sync: {held} change(s) are held back by conflicts and are not at the \
                     backend; see `ferry status`"
                );
            }
            println!("{}", p.summary(started.elapsed()));
            return Ok(());
        }
    }
}

/// The progress of one sync, shown as it goes.
struct Progress {
    mount: String,
    /// The first report and the latest.
    first: Status,
    last: Status,
    target_seq: u64,
    /// Bytes to ship: what was pending at the start, or more if more went.
    total: u64,
    display: Display,
}

enum Display {
    Bar(ProgressBar),
    Lines { every: Duration, next: Instant },
}

impl Progress {
    fn start(mount: &Path, first: &Report, interval: Duration) -> Progress {
        let total = first.status.pending_bytes;
        let display = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} sync {prefix}: [{bar:30}] {bytes}/{total_bytes} \
                     {bytes_per_sec}, ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(mount.display().to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            Display::Bar(bar)
        } else {
            eprintln!(
                "ferry: sync {}: {}, {} to ship",
                mount.display(),
                changes(pending_changes(first)),
                HumanBytes(total)
            );
            Display::Lines {
                every: interval,
                next: Instant::now() + interval,
            }
        };
        Progress {
            mount: mount.display().to_string(),
            first: first.status.clone(),
            last: first.status.clone(),
            target_seq: first.target_seq.unwrap_or(first.status.head_seq),
            total,
            display,
        }
    }

    fn done_bytes(&self) -> u64 {
        self.last
            .bytes_uploaded
            .saturating_sub(self.first.bytes_uploaded)
    }

    fn changes_done(&self) -> (u64, u64) {
        let from = self.first.shipped_seq;
        let target = self.target_seq.max(from);
        (
            self.last.shipped_seq.min(target).saturating_sub(from),
            target - from,
        )
    }

    fn update(&mut self, report: &Report) {
        self.last = report.status.clone();
        self.total = self.total.max(self.done_bytes());
        let done = self.done_bytes();
        let (changes, of) = self.changes_done();
        match &mut self.display {
            Display::Bar(bar) => {
                bar.set_length(self.total);
                bar.set_position(done);
                let error = self
                    .last
                    .last_error
                    .as_deref()
                    .map_or(String::new(), |e| format!("; retrying: {e}"));
                bar.set_message(format!("({changes}/{of} changes{error})"));
            }
            Display::Lines { every, next } => {
                if Instant::now() >= *next {
                    *next = Instant::now() + *every;
                    eprintln!(
                        "ferry: sync {}: {} of {} shipped, {changes} of {of} changes committed{}",
                        self.mount,
                        HumanBytes(done),
                        HumanBytes(self.total),
                        self.last
                            .last_error
                            .as_deref()
                            .map_or(String::new(), |e| format!("; retrying: {e}"))
                    );
                }
            }
        }
    }

    fn finish(&self) {
        if let Display::Bar(bar) = &self.display {
            bar.finish_and_clear();
        }
    }

    fn abandon(&self) {
        if let Display::Bar(bar) = &self.display {
            bar.abandon();
        }
    }

    /// The closing line of a sync that succeeded.
    fn summary(&self, took: Duration) -> String {
        let (_, count) = self.changes_done();
        let bytes = self.done_bytes();
        match (count, bytes) {
            (0, 0) => format!(
                "synced {}: everything was already at the backend",
                self.mount
            ),
            (_, 0) => format!(
                "synced {}: {} committed in {:.1}s, no new data to upload",
                self.mount,
                changes(count),
                took.as_secs_f64()
            ),
            _ => format!(
                "synced {}: {}, {} uploaded in {:.1}s ({}/s)",
                self.mount,
                changes(count),
                HumanBytes(bytes),
                took.as_secs_f64(),
                HumanBytes((bytes as f64 / took.as_secs_f64().max(1e-3)) as u64)
            ),
        }
    }

    /// Why a sync that timed out was not done, from the daemon's status.
    fn why_not_done(&self) -> String {
        let s = &self.last;
        let left = format!(
            "{} ({}) still pending",
            changes(s.pending_ops),
            HumanBytes(s.pending_bytes)
        );
        match (&s.last_error, s.last_contact) {
            (Some(e), _) => format!("{left}; the last attempt failed: {e}"),
            (None, None) => format!("{left}; the backend has not answered yet"),
            (None, Some(_)) if !s.verified => {
                format!("{left}; the backend has not yet confirmed that this store is its volume's")
            }
            (None, Some(_)) => format!(
                "{left}; still shipping ({} so far)",
                HumanBytes(self.done_bytes())
            ),
        }
    }
}

/// `1 change`, `2 changes`.
fn changes(n: u64) -> String {
    format!("{n} change{}", if n == 1 { "" } else { "s" })
}

/// Changes the sync waits for, at its start.
fn pending_changes(r: &Report) -> u64 {
    r.target_seq
        .unwrap_or(r.status.head_seq)
        .saturating_sub(r.status.shipped_seq)
}
