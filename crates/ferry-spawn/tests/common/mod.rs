//! Helpers shared by the integration tests: run a child with a timeout and
//! read what it says about itself.

#![allow(dead_code)] // Each test binary uses its own subset.

use std::borrow::BorrowMut;
use std::io::Read;
use std::process::ExitStatus;
use std::thread;
use std::time::Duration;

use ferry_spawn::{Child, Command, Stdio};

/// Longest any test child may run.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// `sh -c script`.
pub fn sh(script: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    cmd
}

/// Waits for `child` with the timeout, killing and reaping it on expiry.
pub fn wait(child: &mut Child) -> ExitStatus {
    match child.wait_timeout(TIMEOUT).expect("wait") {
        Some(status) => status,
        None => {
            child.kill().expect("kill");
            child.wait().expect("reap");
            panic!("child {} timed out", child.id());
        }
    }
}

/// Spawns `cmd` with stdout piped; returns its status and stdout.
pub fn output(mut cmd: impl BorrowMut<Command>) -> (ExitStatus, String) {
    let mut child = cmd
        .borrow_mut()
        .stdout(Stdio::Piped)
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("piped stdout");
    let reader = thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).expect("read stdout");
        s
    });
    let status = wait(&mut child);
    (status, reader.join().expect("reader"))
}

/// Stdout of a child that must succeed.
pub fn stdout(cmd: impl BorrowMut<Command>) -> String {
    let (status, out) = output(cmd);
    assert!(status.success(), "child failed: {status:?}, stdout: {out}");
    out
}

/// The value of `key:` in `/proc/PID/status`-style text, whitespace-normalised.
pub fn field(text: &str, key: &str) -> String {
    let prefix = format!("{key}:");
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {key} in {text}"));
    line[prefix.len()..]
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fields of `/proc/PID/stat` after the command name: index 0 is the state,
/// 1 ppid, 2 pgrp, 3 session, 4 tty_nr.
pub fn stat_fields(stat: &str) -> Vec<i64> {
    let rest = &stat[stat.rfind(')').expect("stat has a comm") + 2..];
    rest.split_whitespace()
        .map(|f| f.parse().unwrap_or(-1))
        .collect()
}

/// A `sleep` to inspect from outside with [`child_fds`].
pub fn sleeper() -> Command {
    let mut cmd = Command::new("sleep");
    cmd.arg("20");
    cmd
}

/// The fds open in the process `cmd` starts, read from /proc/PID/fd by us,
/// so no listing tool adds fds of its own. Spawn returns right after the
/// exec, while the dynamic loader still has libraries open: wait until the
/// program sits in its sleep (`clock_nanosleep`, x86-64 syscall 230).
pub fn child_fds(cmd: &mut Command) -> Vec<i32> {
    let mut child = cmd.spawn().expect("spawn");
    let deadline = std::time::Instant::now() + TIMEOUT;
    let syscall = format!("/proc/{}/syscall", child.id());
    while !std::fs::read_to_string(&syscall)
        .is_ok_and(|s| s.starts_with("230 ") || s.starts_with("35 "))
    {
        assert!(std::time::Instant::now() < deadline, "child never slept");
        thread::sleep(Duration::from_millis(1));
    }
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{}/fd", child.id()))
        .expect("child's /proc/PID/fd")
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    child.kill().expect("kill");
    child.wait().expect("reap");
    fds.sort_unstable();
    fds
}

/// Number of fds open in this process.
pub fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}
