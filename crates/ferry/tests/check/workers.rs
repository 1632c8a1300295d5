//! Worker processes: the test binary re-executed with `--worker KIND`, so
//! each worker is a process of its own (its descriptors, mappings and
//! SQLite locks die with it, as a real program's would) and can be stopped,
//! resumed and killed at any moment.
//!
//! [`Workers`] kills and reaps every worker when dropped, so a failing
//! trial leaves none behind; each worker also ends by itself after
//! [`WorkerArgs::limit`] and dies with the checker (`PR_SET_PDEATHSIG`).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::support::{poll_until, wait_bounded};

/// What a worker process is told.
#[derive(Clone, Debug)]
pub struct WorkerArgs {
    /// `fs`, `db` or `chaos`.
    pub kind: String,
    /// Its subtree is `w{id}`; also names its journal.
    pub id: usize,
    pub seed: u64,
    pub mount: PathBuf,
    /// The reference directory (fs workers only).
    pub reference: PathBuf,
    /// The directory of journals (and the shared lock).
    pub journals: PathBuf,
    /// It stops by itself after this long.
    pub limit: Duration,
}

/// Exit code of a worker that found the mount and the reference disagree
/// (the journal has an `X` record).
pub const EXIT_DIVERGED: i32 = 2;

impl WorkerArgs {
    /// The worker's name: its journal is `NAME.log`, its stderr `NAME.err`.
    pub fn name(&self) -> String {
        format!("{}{}", self.kind, self.id)
    }

    /// Its journal.
    pub fn journal(&self) -> PathBuf {
        self.journals.join(format!("{}.log", self.name()))
    }

    /// The command-line form, parsed back by `args::parse`.
    fn to_args(&self) -> Vec<String> {
        vec![
            "--worker".into(),
            self.kind.clone(),
            "--id".into(),
            self.id.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--mount".into(),
            self.mount.display().to_string(),
            "--reference".into(),
            self.reference.display().to_string(),
            "--journals".into(),
            self.journals.display().to_string(),
            "--limit".into(),
            self.limit.as_secs().to_string(),
        ]
    }
}

struct Proc {
    name: String,
    child: Child,
    stderr: PathBuf,
}

/// Running workers; killed and reaped on drop.
#[derive(Default)]
pub struct Workers {
    procs: Vec<Proc>,
}

/// The last lines of a file, for reports.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `/proc/PID/stat`'s state letter.
fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; the state follows
    // the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Sends `sig` to `pid` (a worker of ours).
fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions; pid is our child.
    unsafe { libc::kill(pid as i32, sig) };
}

impl Workers {
    /// Starts a worker (this binary, re-executed).
    pub fn spawn(&mut self, args: &WorkerArgs) -> io::Result<()> {
        let stderr = args.journals.join(format!("{}.err", args.name()));
        // The running binary even if cargo has rebuilt (replaced) it since.
        let child = Command::new("/proc/self/exe")
            .args(args.to_args())
            .stdin(Stdio::null())
            .stdout(File::create(&stderr)?)
            .stderr(File::options().append(true).open(&stderr)?)
            .spawn()?;
        self.procs.push(Proc {
            name: args.name(),
            child,
            stderr,
        });
        Ok(())
    }

    /// SIGSTOPs every worker and waits (10 s at most) until none runs, so
    /// the tree holds still with their files still open.
    pub fn stop(&self) -> Result<(), String> {
        for p in &self.procs {
            signal(p.child.id(), libc::SIGSTOP);
        }
        for p in &self.procs {
            let pid = p.child.id();
            let stopped = poll_until(Duration::from_secs(10), || {
                matches!(proc_state(pid), Some('T' | 't' | 'Z' | 'X') | None)
            });
            if !stopped {
                return Err(format!(
                    "worker {} still {:?} 10 s after SIGSTOP (stuck in a request?)",
                    p.name,
                    proc_state(pid)
                ));
            }
        }
        Ok(())
    }

    /// SIGCONTs every worker.
    pub fn resume(&self) {
        for p in &self.procs {
            signal(p.child.id(), libc::SIGCONT);
        }
    }

    /// SIGKILLs and reaps every worker; returns what is wrong with how they
    /// ended: a worker that exited by itself with a code other than 0
    /// (the mount went away, or its time was up) or [`EXIT_DIVERGED`]
    /// (reported from its journal), or one that could not be reaped.
    pub fn kill(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for mut p in self.procs.drain(..) {
            let _ = p.child.kill();
            match wait_bounded(&mut p.child, Duration::from_secs(10)) {
                Some(status) => {
                    if let Some(why) = bad_exit(status) {
                        problems.push(format!(
                            "worker {} {why}; its stderr:\n{}",
                            p.name,
                            tail(&p.stderr, 20)
                        ));
                    }
                }
                None => problems.push(format!("worker {} not reaped 10 s after SIGKILL", p.name)),
            }
        }
        problems
    }
}

/// Why a worker's exit is a problem, if it is.
fn bad_exit(status: ExitStatus) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0 | EXIT_DIVERGED), _) => None,
        (Some(code), _) => Some(format!("exited with {code}")),
        // Ours; or a SIGBUS from a mapping whose file system died under
        // it, which is a crash effect, not a finding.
        (None, Some(libc::SIGKILL | libc::SIGBUS)) => None,
        (None, sig) => Some(format!("died of signal {sig:?}")),
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // SIGKILL ends stopped workers too.
        let _ = self.kill();
    }
}

/// A worker process's main: dies with the checker, then runs its kind's
/// loop; returns the exit code.
pub fn main(args: &WorkerArgs) -> i32 {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number, nothing else.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    crate::support::init_process();
    match args.kind.as_str() {
        "fs" => super::workload::run(args),
        "db" => super::sqlite::run(args),
        "chaos" => super::chaos::run(args),
        other => {
            eprintln!("unknown worker kind {other:?}");
            1
        }
    }
}
