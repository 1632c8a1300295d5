//! Shared test support: victim processes that report their state, and checks.
//!
//! A [`Victim`] is a `ferry-remote-testproc victim MODE` child. It is killed
//! and reaped when dropped, whatever the test's outcome, and every wait for
//! one of its lines has a timeout, so a broken injection fails a test instead
//! of hanging it. The victim also arms a 60 s alarm of its own.
#![allow(dead_code)] // each test file uses a different part

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use ferry_remote::maps::{self, Mapping};
use ferry_remote::Registers;

pub const TESTPROC: &str = env!("CARGO_BIN_EXE_ferry-remote-testproc");
const LINE_TIMEOUT: Duration = Duration::from_secs(15);

/// The uid/gid Debian gives `nobody`, for tests that must not be root.
pub const NOBODY: u32 = 65534;

pub struct Victim {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pub pid: i32,
    /// Fields of the `ready` line.
    pub ready: HashMap<String, String>,
}

/// Splits `key=value` words of a report line.
pub fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

impl Victim {
    pub fn spawn(mode: &str, args: &[&str]) -> Victim {
        Victim::start(Command::new(TESTPROC).arg("victim").arg(mode).args(args))
    }

    /// Like [`Victim::spawn`], as pid 1 of a new pid namespace (via
    /// `unshare`); [`Victim::pid`] is then `unshare`'s pid, and
    /// [`Victim::host_pid`] the victim's own in our namespace.
    pub fn spawn_in_pid_namespace(mode: &str) -> Victim {
        Victim::start(Command::new("unshare").args([
            "--pid",
            "--fork",
            "--kill-child",
            TESTPROC,
            "victim",
            mode,
        ]))
    }

    /// The victim's pid in our namespace: itself, or the only child of `unshare`.
    pub fn host_pid(&self) -> i32 {
        let children = format!("/proc/{0}/task/{0}/children", self.pid);
        match std::fs::read_to_string(children)
            .unwrap_or_default()
            .split_whitespace()
            .next()
        {
            Some(child) if self.tid() == 1 => child.parse().unwrap(),
            _ => self.pid,
        }
    }

    /// Like [`Victim::spawn`], running as `uid` (and the same gid).
    pub fn spawn_as(uid: u32, mode: &str, args: &[&str]) -> Victim {
        use std::os::unix::process::CommandExt;
        Victim::start(
            Command::new(TESTPROC)
                .arg("victim")
                .arg(mode)
                .args(args)
                .uid(uid)
                .gid(uid),
        )
    }

    fn start(command: &mut Command) -> Victim {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn victim");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let pid = child.id() as i32;
        let mut victim = Victim {
            child,
            stdin,
            lines,
            pid,
            ready: HashMap::new(),
        };
        let ready = victim.line();
        assert!(ready.starts_with("ready"), "victim said {ready:?}");
        victim.ready = fields(&ready);
        // The report is printed just before the blocking call: give the
        // thread time to get into it, so tests really inject into a blocked call.
        victim.wait_blocked();
        victim
    }

    /// The thread that blocks, from the ready line.
    pub fn tid(&self) -> i32 {
        self.ready["tid"].parse().unwrap()
    }

    pub fn ready_mask(&self) -> u64 {
        u64::from_str_radix(&self.ready["mask"], 16).unwrap()
    }

    /// Waits until the reporting thread sleeps in the kernel (state S);
    /// a spinning victim never does, so it only gets a moment to start.
    pub fn wait_blocked(&self) {
        if self.tid() == 1 {
            // In its own pid namespace; our /proc knows it by another number.
            std::thread::sleep(Duration::from_millis(20));
            return;
        }
        if self.ready.contains_key("spins") {
            std::thread::sleep(Duration::from_millis(20));
            return;
        }
        let path = format!("/proc/{}/task/{}/stat", self.pid, self.tid());
        for _ in 0..2500 {
            let stat = std::fs::read_to_string(&path).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            if state == Some("S") {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("victim thread never blocked");
    }

    pub fn line(&mut self) -> String {
        self.lines
            .recv_timeout(LINE_TIMEOUT)
            .expect("victim line within timeout")
    }

    pub fn send(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Sends `text`, waits for the `done` report, and returns its fields.
    pub fn finish(&mut self, text: &str) -> HashMap<String, String> {
        self.send(text);
        let done = self.line();
        assert!(done.starts_with("done"), "victim said {done:?}");
        fields(&done)
    }

    /// Asserts the signal mask in a `done` report is the one the victim had
    /// when it was ready: injection left it unchanged.
    pub fn assert_mask_unchanged(&self, done: &HashMap<String, String>) {
        assert_eq!(
            u64::from_str_radix(&done["mask"], 16).unwrap(),
            self.ready_mask(),
            "signal mask changed"
        );
    }

    /// The number of open descriptors of the victim.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .unwrap()
            .count()
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The mapping of `pid` that contains `addr`.
pub fn mapping_at(pid: i32, addr: u64) -> Option<Mapping> {
    maps::read(pid)
        .unwrap()
        .into_iter()
        .find(|m| m.contains(addr))
}

/// Every register of a saved set, for comparison (libc's struct has no `PartialEq`).
pub fn regs(r: &Registers) -> [u64; 27] {
    [
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ]
}

/// Runs `testproc spy HOW PID` as `nobody` and returns its one-line verdict.
pub fn spy_as_nobody(how: &str, pid: i32) -> String {
    use std::os::unix::process::CommandExt;
    let out = Command::new(TESTPROC)
        .args(["spy", how, &pid.to_string()])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .expect("run spy");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Whether we run as root, which tests that switch users or namespaces need
/// (CI runs as root); others print why they skip.
pub fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("{test}: needs root to switch uid or pid namespace; skipped");
    }
    root
}
