//! Per-process file-system context (issue 10), end to end: real mounts,
//! real process trees, a real backend.
//!
//! What is promised, and checked here:
//! - a context belongs to a process (pid and start time); children inherit
//!   it as it stood when they were forked, grandchildren too, through fork
//!   and exec; a parent's later change reaches only children forked after
//!   it; a reused pid gets nothing stale;
//! - `durability=remote`: when fsync returns, the file is committed at the
//!   backend (the daemon is killed right after, and a fresh host has it);
//!   with the backend unreachable, fsync and close block for the timeout,
//!   then fail with EIO, and the data replicates once the link is back;
//! - `reads=fresh`: an open returns another host's newest committed
//!   version, which a cached reader on the same host does not see yet (its
//!   down-sync paused through the control socket);
//! - processes with different modes work on the same files at once, and
//!   `ferry status --processes` lists who has which;
//! - bad input (unknown values, a path outside ferry, a malformed ioctl)
//!   gives one clear error and changes nothing, and other ioctls still get
//!   ENOTTY.
//!
//! The ioctl ABI is spelled out here as a C program would see it
//! (`_IOW('F', 0x10, 24 bytes)`), independently of ferry-fs's definitions.

mod support;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry_backend::testing::PgServer;
use serde_json::Value;
use support::cli::{dir_backend, ferry, init, sync};
use support::wan::{url_addr, url_via, Wan};
use support::{ferry_bin, poll_until, run_bounded, skip_unless_ferry, Forked, Mount};

/// Bound on one command or forked process tree.
const STEP: Duration = Duration::from_secs(60);

/// `_IOW('F', 0x10, struct { u32 version, durability, reads, reserved;
/// u64 timeout_ms; })`.
const SET: libc::Ioctl = libc::_IOW::<[u8; 24]>(b'F' as u32, 0x10);
/// `_IOR('F', 0x11, …)`, the same struct.
const GET: libc::Ioctl = libc::_IOR::<[u8; 24]>(b'F' as u32, 0x11);

/// The ioctl argument: version 1; durability 0 keep, 1 local, 2 remote;
/// reads 0 keep, 1 cached, 2 fresh; reserved 0; timeout in ms, 0 keep.
fn raw(version: u32, durability: u32, reads: u32, reserved: u32, timeout_ms: u64) -> [u8; 24] {
    let mut b = [0u8; 24];
    for (i, v) in [version, durability, reads, reserved]
        .into_iter()
        .enumerate()
    {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    b[16..].copy_from_slice(&timeout_ms.to_ne_bytes());
    b
}

fn ioctl(file: &File, cmd: libc::Ioctl, arg: &mut [u8; 24]) -> io::Result<()> {
    // SAFETY: both commands encode a 24-byte argument, and `arg` is one.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), cmd, arg.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the calling process's context on the mount `root` is in.
fn set_context(root: &File, durability: u32, reads: u32, timeout_ms: u64) -> io::Result<()> {
    ioctl(root, SET, &mut raw(1, durability, reads, 0, timeout_ms))
}

/// The calling process's effective context: "DURABILITY READS TIMEOUT_MS".
fn get_context(root: &File) -> io::Result<String> {
    let mut b = [0u8; 24];
    ioctl(root, GET, &mut b)?;
    let word = |at: usize, words: [&str; 2]| {
        let code = u32::from_ne_bytes(b[at..at + 4].try_into().unwrap());
        match code {
            1 | 2 => words[code as usize - 1].to_string(),
            n => format!("?{n}"),
        }
    };
    let timeout = u64::from_ne_bytes(b[16..24].try_into().unwrap());
    Ok(format!(
        "{} {} {timeout}",
        word(4, ["local", "remote"]),
        word(8, ["cached", "fresh"])
    ))
}

/// `ferry run --mount M ARGS -- sh -c SCRIPT`, bounded, with `$FERRY` and
/// `$M` set for the script.
fn ferry_run(m: &Mount, args: &[&str], script: &str) -> Output {
    let mut cmd = Command::new(ferry_bin());
    cmd.arg("run")
        .arg("--mount")
        .arg(m.path())
        .args(args)
        .args(["--", "sh", "-c", script])
        .env("FERRY", ferry_bin())
        .env("M", m.path());
    run_bounded(&mut cmd, STEP).unwrap_or_else(|e| panic!("ferry run {args:?}: {e}"))
}

/// Like [`ferry_run`], and it must succeed; returns stdout.
fn ferry_run_ok(m: &Mount, args: &[&str], script: &str) -> String {
    let out = ferry_run(m, args, script);
    assert!(
        out.status.success(),
        "ferry run {args:?} -- {script}: {}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.daemon_log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The JSON lines of `ferry context --json` output, as (durability, reads).
fn contexts(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            (
                v["durability"].as_str().unwrap().to_string(),
                v["reads"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pair(d: &str, r: &str) -> (String, String) {
    (d.to_string(), r.to_string())
}

/// Waits for a forked child's closure; panics on failure or timeout.
fn done(f: Forked, what: &str) {
    match f.wait(STEP) {
        Some(Ok(())) => {}
        Some(Err(errno)) => panic!("{what}: {}", io::Error::from_raw_os_error(errno)),
        None => panic!("{what}: no answer within {STEP:?}"),
    }
}

/// The same, inside a forked process: an error instead of a panic.
fn done_in_child(f: Forked) -> io::Result<()> {
    match f.wait(STEP) {
        Some(Ok(())) => Ok(()),
        Some(Err(errno)) => Err(io::Error::from_raw_os_error(errno)),
        None => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
    }
}

#[test]
fn children_inherit_through_fork_and_exec() {
    if skip_unless_ferry("process contexts") {
        return;
    }
    let m = Mount::new();
    // Exec chains: ferry run execs sh, which forks ferry context (a child)
    // and another sh that forks it again (a grandchild).
    let out = ferry_run_ok(
        &m,
        &["--durability", "remote", "--reads", "fresh"],
        r#""$FERRY" context --mount "$M" --json; sh -c '"$FERRY" context --mount "$M" --json'"#,
    );
    assert_eq!(
        contexts(&out),
        vec![pair("remote", "fresh"), pair("remote", "fresh")]
    );
    // A knob left out keeps the inherited value; an inner run changes only
    // its own subtree.
    let out = ferry_run_ok(
        &m,
        &["--durability", "remote"],
        r#""$FERRY" run --mount "$M" --reads fresh -- "$FERRY" context --mount "$M" --json;
           "$FERRY" context --mount "$M" --json"#,
    );
    assert_eq!(
        contexts(&out),
        vec![pair("remote", "fresh"), pair("remote", "cached")]
    );
    // Outside any ferry run: the default.
    let out = ferry(&["context", "--mount", m.path().to_str().unwrap(), "--json"]);
    assert_eq!(contexts(&out), vec![pair("local", "cached")]);
}

/// P forks C1, then changes its context, then forks C2; C1 and C2 each
/// fork a child after that. C1's line keeps P's old value, C2's gets the
/// new one.
#[test]
fn a_change_after_fork_reaches_only_children_forked_later() {
    if skip_unless_ferry("process contexts") {
        return;
    }
    let m = Mount::new();
    let root = File::open(m.path()).unwrap();
    let out = m.scratch().join("seen");
    fs::create_dir(&out).unwrap();
    let record = |name: &str| -> io::Result<()> { fs::write(out.join(name), get_context(&root)?) };
    let p = Forked::spawn(None, || {
        let (gate, mut open_gate) = UnixStream::pair()?;
        gate.set_read_timeout(Some(STEP))?;
        let c1 = Forked::spawn(None, || {
            let mut byte = [0u8; 1];
            (&gate).read_exact(&mut byte)?;
            record("c1")?;
            done_in_child(Forked::spawn(None, || record("g1")))
        });
        set_context(&root, 2, 2, 0)?;
        let c2 = Forked::spawn(None, || {
            record("c2")?;
            done_in_child(Forked::spawn(None, || record("g2")))
        });
        open_gate.write_all(b"go")?;
        done_in_child(c1)?;
        done_in_child(c2)?;
        record("p")
    });
    done(p, "the process tree");
    let seen = |name: &str| fs::read_to_string(out.join(name)).unwrap();
    let old = "local cached 30000";
    let new = "remote fresh 30000";
    assert_eq!(seen("p"), new, "P itself");
    assert_eq!(seen("c1"), old, "a child forked before the change");
    assert_eq!(seen("g1"), old, "its child, forked after the change");
    assert_eq!(seen("c2"), new, "a child forked after the change");
    assert_eq!(seen("g2"), new, "its child");
    // The test process itself never set anything.
    assert_eq!(get_context(&root).unwrap(), old);
}

/// Makes the next pid of this namespace likely `pid`; false without the
/// privilege.
fn aim_next_pid(pid: u32) -> bool {
    fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).is_ok()
}

#[test]
fn a_reused_pid_gets_no_stale_context() {
    if skip_unless_ferry("process contexts") {
        return;
    }
    let m = Mount::new();
    let mnt = m.path().to_str().unwrap();
    // A process that sets a context and exits: `true` keeps ferry run's pid.
    let mut first = Command::new(ferry_bin())
        .args([
            "run",
            "--durability",
            "remote",
            "--mount",
            mnt,
            "--",
            "true",
        ])
        .spawn()
        .unwrap();
    let dead = first.id();
    assert!(first.wait().unwrap().success());
    for _ in 0..50 {
        if !aim_next_pid(dead) {
            eprintln!("SKIP: cannot write /proc/sys/kernel/ns_last_pid (not root?)");
            return;
        }
        let child = Command::new(ferry_bin())
            .args(["context", "--mount", mnt, "--json"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = wait_output(child);
        if pid == dead {
            assert!(out.status.success());
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                contexts(&stdout),
                vec![pair("local", "cached")],
                "pid {pid} reused"
            );
            return;
        }
    }
    panic!("pid {dead} was not reused in 50 tries");
}

/// The output of a child, bounded by [`STEP`] (killed after it).
fn wait_output(mut child: Child) -> Output {
    let exited = poll_until(STEP, || child.try_wait().ok().flatten().is_some());
    if !exited {
        let _ = child.kill();
    }
    child.wait_with_output().unwrap()
}

/// A process that is killed and reaped however the test ends.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn processes_with_different_modes_share_files_and_are_listed() {
    if skip_unless_ferry("process contexts") {
        return;
    }
    let (_guard, _, url) = dir_backend();
    let m = Mount::with_backend(&url);
    let mnt = m.path().to_str().unwrap().to_string();
    let run = |args: &[&str], cmd: &[&str]| {
        let mut c = Command::new(ferry_bin());
        c.args(["run", "--mount", &mnt])
            .args(args)
            .arg("--")
            .args(cmd);
        c
    };
    // Two long-lived processes for the listing: only the non-default one
    // is shown, under its own pid (exec kept it) and command line.
    let listed = Background(
        run(
            &["--durability", "remote", "--reads", "fresh"],
            &["sleep", "60"],
        )
        .spawn()
        .unwrap(),
    );
    let _default = Background(
        run(&["--durability", "local"], &["sleep", "61"])
            .spawn()
            .unwrap(),
    );
    // Four writers append to one file and rewrite their own, two with
    // remote durability (each close waits for the backend), two local.
    let writers: Vec<(String, Background)> = (0..4)
        .map(|i| {
            let mode = if i % 2 == 0 { "remote" } else { "local" };
            let tag = format!("{mode}{i}");
            let script = r#"i=0; while [ $i -lt 30 ]; do i=$((i+1));
                echo "$0 $i" >> "$M/shared"; echo "$0 $i" > "$M/own-$0"; done"#;
            let child = run(&["--durability", mode], &["sh", "-c", script, &tag])
                .env("M", &mnt)
                .spawn()
                .unwrap();
            (tag, Background(child))
        })
        .collect();
    let mut status = String::new();
    let mut rows: Vec<Value> = Vec::new();
    let shown = poll_until(STEP, || {
        status = ferry(&["status", "--processes", "--json", &mnt]);
        rows = status
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // Listed once `ferry run` has set the context, and under its own
        // command line once it has exec'd `sleep`: wait for both.
        rows.iter()
            .any(|r| r["pid"] == listed.0.id() && r["command"] == "sleep 60")
    });
    assert!(
        shown,
        "the remote sleeper is not listed as sleep 60: {status}"
    );
    let sleeper = rows.iter().find(|r| r["pid"] == listed.0.id()).unwrap();
    assert_eq!(sleeper["durability"], "remote");
    assert_eq!(sleeper["reads"], "fresh");
    assert_eq!(sleeper["timeout_ms"], 30000);
    assert_eq!(sleeper["mount"], mnt.as_str());
    assert!(
        rows.iter().all(|r| r["command"] != "sleep 61"),
        "a process at the default is listed: {status}"
    );
    for (tag, mut w) in writers {
        let ok = poll_until(STEP, || w.0.try_wait().ok().flatten().is_some());
        assert!(ok, "writer {tag} did not finish in {STEP:?}");
        assert!(w.0.wait().unwrap().success(), "writer {tag} failed");
        assert_eq!(
            fs::read_to_string(m.join(&format!("own-{tag}"))).unwrap(),
            format!("{tag} 30\n")
        );
    }
    let shared = fs::read_to_string(m.join("shared")).unwrap();
    for i in 0..4 {
        let tag = format!("{}{i}", if i % 2 == 0 { "remote" } else { "local" });
        let mine: Vec<&str> = shared
            .lines()
            .filter(|l| l.split(' ').next() == Some(&tag))
            .collect();
        let want: Vec<String> = (1..=30).map(|n| format!("{tag} {n}")).collect();
        assert_eq!(mine, want, "{tag}'s appends");
    }
    assert_eq!(shared.lines().count(), 120);
    sync(&m);
    support::cli::assert_restores_identically(&url, &m);
}

/// What a forked writer reports: errno of fsync and of close (0: success)
/// and how long fsync took.
struct Report {
    fsync: i32,
    fsync_ms: u64,
    close: i32,
}

/// A forked process that has set its context and written a file, and
/// fsyncs and closes it when told to ([`fsync_report`], [`close_report`]).
struct Writer {
    child: Forked,
    /// Orders and reports, one line each.
    talk: UnixStream,
    pid: u32,
}

/// Forks a [`Writer`] that sets `ctx` (durability, timeout ms) and writes
/// `data` to `path`; returns once it has.
fn forked_writer(root: &File, ctx: (u32, u64), path: &Path, data: &[u8]) -> Writer {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(STEP)).unwrap();
    let child = Forked::spawn(None, || {
        let mut theirs = theirs;
        let mut byte = [0u8; 1];
        set_context(root, ctx.0, 0, ctx.1)?;
        let mut f = File::create(path)?;
        f.write_all(data)?;
        theirs.write_all(format!("{}\n", std::process::id()).as_bytes())?;
        let _ = theirs.read(&mut byte);
        let start = Instant::now();
        let fsync = errno_of(f.sync_all());
        let ms = start.elapsed().as_millis() as u64;
        theirs.write_all(format!("{fsync} {ms}\n").as_bytes())?;
        let _ = theirs.read(&mut byte);
        // SAFETY: closes the descriptor `f` gave up, once.
        let close = match unsafe { libc::close(f.into_raw_fd()) } {
            0 => 0,
            _ => errno_of(Err(io::Error::last_os_error())),
        };
        theirs.write_all(format!("{close}\n").as_bytes())
    });
    let mut talk = ours;
    let pid = line(&mut talk).parse().expect("the forked writer's pid");
    Writer { child, talk, pid }
}

fn errno_of(r: io::Result<()>) -> i32 {
    r.err().map_or(0, |e| e.raw_os_error().unwrap_or(-1))
}

/// Reads one line from a forked writer.
fn line(from: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    while from.read(&mut byte).expect("the forked writer's report") == 1 && byte[0] != b'\n' {
        out.push(byte[0]);
    }
    String::from_utf8(out).unwrap()
}

/// Tells a forked writer to go on: to fsync, then to close.
fn tell(w: &mut Writer) {
    w.talk.write_all(b"x").unwrap();
}

/// Lets a forked writer fsync its file; returns the report.
fn fsync_report(w: &mut Writer) -> Report {
    tell(w);
    fsync_result(w)
}

/// The report of a fsync already told to start.
fn fsync_result(w: &mut Writer) -> Report {
    let l = line(&mut w.talk);
    let mut words = l.split(' ').map(|w| w.parse::<i64>().unwrap());
    Report {
        fsync: words.next().unwrap() as i32,
        fsync_ms: words.next().unwrap() as u64,
        close: 0,
    }
}

/// Lets a forked writer close its file; returns close's errno.
fn close_report(w: &mut Writer) -> i32 {
    tell(w);
    close_result(w)
}

/// The errno of a close already told to start.
fn close_result(w: &mut Writer) -> i32 {
    line(&mut w.talk).parse().unwrap()
}

#[test]
fn remote_durability_fsync_returns_once_postgres_has_it() {
    if skip_unless_ferry("replication") {
        return;
    }
    let pg = PgServer::shared();
    let direct = pg.create_database("context_remote_fsync");
    init(&direct);
    // 100 ms each way: the background shipper cannot have committed within
    // the moment between fsync's return and the kill, so only a fsync that
    // waited for the backend passes.
    let mut wan = Wan::new(Duration::from_millis(100));
    let via = url_via(&direct, wan.expose(url_addr(&direct)));
    let mut a = Mount::with_backend(&via);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let root = File::open(a.path()).unwrap();
    let mut writer = forked_writer(&root, (2, 0), &a.join("f"), &data);
    let r = fsync_report(&mut writer);
    a.kill9();
    assert_eq!(r.fsync, 0, "fsync failed");
    assert!(
        r.fsync_ms >= 200,
        "a remote fsync returned in {} ms, under one round trip",
        r.fsync_ms
    );
    drop(writer);
    drop(root);
    let fresh = Mount::with_backend(&direct);
    assert_eq!(
        fs::read(fresh.join("f")).unwrap_or_default(),
        data,
        "the backend lacks what fsync acknowledged"
    );
}

/// A new PostgreSQL volume `name`: its URL, a link to it that can be cut,
/// and the URL through that link.
fn volume_behind_wan(name: &str) -> (String, Wan, String) {
    let direct = PgServer::shared().create_database(name);
    init(&direct);
    let mut wan = Wan::new(Duration::ZERO);
    let via = url_via(&direct, wan.expose(url_addr(&direct)));
    (direct, wan, via)
}

#[test]
fn remote_durability_without_the_backend_fails_after_the_timeout_and_replicates_later() {
    if skip_unless_ferry("replication") {
        return;
    }
    let (direct, wan, via) = volume_behind_wan("context_remote_offline");
    let a = Mount::with_backend(&via);
    let root = File::open(a.path()).unwrap();
    wan.partition();
    // A local writer is not held up by the partition.
    let mut local = forked_writer(&root, (1, 0), &a.join("local"), b"local");
    let r = fsync_report(&mut local);
    assert_eq!((r.fsync, close_report(&mut local)), (0, 0));
    assert!(r.fsync_ms < 1000, "a local fsync took {} ms", r.fsync_ms);
    done(local.child, "the local writer");
    // A remote one waits for its timeout, then fails with EIO; so does its
    // close.
    let mut remote = forked_writer(&root, (2, 2000), &a.join("remote"), b"kept locally");
    let mut r = fsync_report(&mut remote);
    r.close = close_report(&mut remote);
    done(remote.child, "the remote writer");
    assert_eq!(r.fsync, libc::EIO, "fsync with the backend unreachable");
    assert!(
        (2000..7000).contains(&r.fsync_ms),
        "fsync failed after {} ms, the timeout is 2000",
        r.fsync_ms
    );
    assert_eq!(r.close, libc::EIO, "close with the backend unreachable");
    // The data is safe here, and replicates once the link is back.
    assert_eq!(fs::read(a.join("remote")).unwrap(), b"kept locally");
    wan.heal();
    sync(&a);
    let fresh = Mount::with_backend(&direct);
    assert_eq!(fs::read(fresh.join("remote")).unwrap(), b"kept locally");
    assert_eq!(fs::read(fresh.join("local")).unwrap(), b"local");
}

/// How long a round of [`assert_responsive`] may take: far less than the
/// blocked writers' timeout, far more than 100 small operations need.
const PROBE: Duration = Duration::from_secs(2);

/// Whether process `pid` is blocked in system call `nr`, as
/// `/proc/PID/syscall` shows it.
fn in_syscall(pid: u32, nr: libc::c_long) -> bool {
    fs::read_to_string(format!("/proc/{pid}/syscall"))
        .is_ok_and(|s| s.split(' ').next() == Some(nr.to_string().as_str()))
}

/// Waits until each of `writers` is blocked in system call `nr`.
fn wait_in_syscall(writers: &[&Writer], nr: libc::c_long, what: &str) {
    let all = poll_until(STEP, || writers.iter().all(|w| in_syscall(w.pid, nr)));
    assert!(all, "the writers never all sat in {what}");
}

/// Creates, stats, reads back, lists and unlinks 20 files in `dir` in a
/// forked process; panics unless that is done within [`PROBE`].
fn assert_responsive(dir: &Path, when: &str) {
    let probe = Forked::spawn(None, || {
        for i in 0..20 {
            let path = dir.join(format!("probe-{i}"));
            let data = format!("{when} {i}");
            fs::write(&path, &data)?;
            let seen = fs::metadata(&path)?.len() == data.len() as u64
                && fs::read(&path)? == data.as_bytes()
                && fs::read_dir(dir)?.count() > 0;
            if !seen {
                return Err(io::Error::from_raw_os_error(libc::EBADMSG));
            }
            fs::remove_file(&path)?;
        }
        Ok(())
    });
    match probe.wait(PROBE) {
        Some(Ok(())) => {}
        Some(Err(errno)) => panic!("{when}: {}", io::Error::from_raw_os_error(errno)),
        None => panic!("{when}: the mount stalled: 20 creates did not finish in {PROBE:?}"),
    }
}

/// More processes than the mount has FUSE threads wait for an unreachable
/// backend (`durability=remote` fsyncs, then closes); meanwhile another
/// process creates, stats, reads and unlinks files on the same mount as
/// fast as ever. The waits still end as promised: EIO at their timeout, or
/// success once the link is back.
#[test]
fn waits_for_the_backend_do_not_stall_a_mount_with_two_threads() {
    if skip_unless_ferry("replication") {
        return;
    }
    let (direct, wan, via) = volume_behind_wan("context_responsive");
    let a = Mount::with_args(&["--backend", &via, "-o", "threads=2"]);
    let root = File::open(a.path()).unwrap();
    // Two writers give up after 4 s, two wait long enough for the heal.
    const SHORT: u64 = 4000;
    let mut writers: Vec<Writer> = (0..4)
        .map(|i| {
            let timeout = if i < 2 { SHORT } else { 45_000 };
            let data = format!("writer {i}").repeat(1000);
            forked_writer(
                &root,
                (2, timeout),
                &a.join(&format!("w{i}")),
                data.as_bytes(),
            )
        })
        .collect();
    wan.partition();
    writers.iter_mut().for_each(tell);
    wait_in_syscall(
        &writers.iter().collect::<Vec<_>>(),
        libc::SYS_fsync,
        "fsync",
    );
    assert_responsive(a.path(), "four fsyncs waiting");

    let (short, long) = writers.split_at_mut(2);
    for w in short.iter_mut() {
        let r = fsync_result(w);
        assert_eq!(r.fsync, libc::EIO, "fsync with the backend unreachable");
        assert!(
            (SHORT..SHORT + 3000).contains(&r.fsync_ms),
            "fsync failed after {} ms, the timeout is {SHORT}",
            r.fsync_ms
        );
        tell(w);
    }
    let waiting: Vec<&Writer> = short.iter().chain(long.iter()).collect();
    wait_in_syscall(&waiting[..2], libc::SYS_close, "close");
    wait_in_syscall(&waiting[2..], libc::SYS_fsync, "fsync");
    assert_responsive(a.path(), "two closes and two fsyncs waiting");
    for w in short.iter_mut() {
        assert_eq!(
            close_result(w),
            libc::EIO,
            "close with the backend unreachable"
        );
    }

    wan.heal();
    for w in long.iter_mut() {
        assert_eq!(fsync_result(w).fsync, 0, "fsync after the heal");
        assert_eq!(close_report(w), 0, "close after the heal");
    }
    for (i, w) in writers.into_iter().enumerate() {
        done(w.child, &format!("writer {i}"));
    }
    sync(&a);
    support::cli::assert_restores_identically(&direct, &a);
}

/// Pauses or resumes a mount's down-sync through its control socket (the
/// requests `pause-down-sync` and `resume-down-sync`, answered by one
/// report), so a change of another host stays unseen here by a cached
/// reader.
fn down_sync(m: &Mount, on: bool) {
    let request = if on {
        "resume-down-sync"
    } else {
        "pause-down-sync"
    };
    let answer = ferry_fs::control::request(m.store(), request).and_then(|mut lines| {
        lines
            .next()
            .unwrap_or_else(|| Err(io::ErrorKind::UnexpectedEof.into()))
    });
    if let Err(e) = answer {
        panic!("{request}: {e}; daemon log:\n{}", m.daemon_log());
    }
}

#[test]
fn fresh_reads_see_another_hosts_change_that_cached_reads_do_not_yet() {
    if skip_unless_ferry("multi-host") {
        return;
    }
    let (direct, wan_b, via_b) = volume_behind_wan("context_fresh");
    let a = Mount::with_backend(&direct);
    let b = Mount::with_backend(&via_b);
    fs::write(a.join("f"), b"version 1").unwrap();
    sync(&a);
    let seen = poll_until(STEP, || {
        fs::read(b.join("f")).is_ok_and(|d| d == b"version 1")
    });
    assert!(seen, "B never saw version 1");

    down_sync(&b, false);
    fs::write(a.join("f"), b"version 2, longer").unwrap();
    sync(&a);
    let cat = r#"cat "$M/f""#;
    assert_eq!(ferry_run_ok(&b, &["--reads", "cached"], cat), "version 1");
    assert_eq!(
        ferry_run_ok(&b, &["--reads", "fresh"], cat),
        "version 2, longer"
    );
    // The fresh open brought it here, for everyone.
    assert_eq!(
        ferry_run_ok(&b, &["--reads", "cached"], cat),
        "version 2, longer"
    );

    // Offline, a fresh open falls back to the cached version and says so.
    fs::write(a.join("f"), b"version 3").unwrap();
    sync(&a);
    wan_b.partition();
    let start = Instant::now();
    assert_eq!(
        ferry_run_ok(&b, &["--reads", "fresh"], cat),
        "version 2, longer"
    );
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    assert!(
        b.daemon_log().contains("using the cached version"),
        "no log line for the offline fresh read:\n{}",
        b.daemon_log()
    );
    wan_b.heal();
    down_sync(&b, true);
    let caught_up = poll_until(STEP, || {
        fs::read(b.join("f")).is_ok_and(|d| d == b"version 3")
    });
    assert!(caught_up, "B's down-sync did not resume");
}

#[test]
fn bad_input_gives_one_clear_error_and_changes_nothing() {
    if skip_unless_ferry("process contexts") {
        return;
    }
    let m = Mount::new();
    let outside = m.scratch().to_str().unwrap().to_string();
    let marker = m.scratch().join("ran");
    let touch = format!("touch {}", marker.display());

    // Unknown values: the command line is refused (exit 2), nothing runs.
    for (args, says) in [
        (
            ["--durability", "bogus"],
            r#"unknown durability "bogus" (expected local or remote)"#,
        ),
        (
            ["--reads", "stale"],
            r#"unknown reads mode "stale" (expected cached or fresh)"#,
        ),
        (["--timeout", "0"], "the timeout must be at least 1ms"),
        (["--timeout", "2d"], "is too long (at most 86400 s)"),
    ] {
        let out = ferry_run(&m, &args, &touch);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        let first = stderr.lines().next().unwrap_or("");
        assert!(first.contains(says), "{args:?}: {stderr}");
    }
    // A path that is not on a ferry mount: one line, exit 1, nothing runs,
    // even with a good mount named too.
    let out = run_bounded(
        Command::new(ferry_bin())
            .args(["run", "--durability", "remote", "--mount"])
            .arg(m.path())
            .args(["--mount", &outside, "--", "sh", "-c", &touch]),
        STEP,
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("ferry: {outside} is not in a ferry mount\n")
    );
    assert!(!marker.exists(), "the command ran");
    let out = run_bounded(
        Command::new(ferry_bin()).args(["context", "--mount", &outside]),
        STEP,
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(1));

    // Malformed ioctls: EINVAL, and the context is unchanged.
    let root = File::open(m.path()).unwrap();
    for (bad, what) in [
        (raw(2, 2, 0, 0, 0), "version 2"),
        (raw(1, 3, 0, 0, 0), "durability 3"),
        (raw(1, 0, 9, 0, 0), "reads 9"),
        (raw(1, 2, 0, 1, 0), "reserved 1"),
        (raw(1, 2, 0, 0, u64::MAX), "a timeout of 584 million years"),
    ] {
        let mut arg = bad;
        let err = ioctl(&root, SET, &mut arg).expect_err(what);
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{what}");
    }
    assert_eq!(get_context(&root).unwrap(), "local cached 30000");
    let status = ferry(&[
        "status",
        "--processes",
        "--json",
        m.path().to_str().unwrap(),
    ]);
    assert_eq!(status, "", "nothing may be listed");
    // Other ioctls keep ENOTTY: a different size is a different command,
    // and a terminal probe on a file is "not a terminal".
    let wrong_size = libc::_IOW::<[u8; 16]>(b'F' as u32, 0x10);
    // SAFETY: a 16-byte buffer for a command that encodes 16 bytes.
    let rc = unsafe { libc::ioctl(root.as_raw_fd(), wrong_size, [0u8; 16].as_mut_ptr()) };
    assert_eq!(rc, -1);
    assert_eq!(
        io::Error::last_os_error().raw_os_error(),
        Some(libc::ENOTTY)
    );
    fs::write(m.join("file"), b"x").unwrap();
    let file = File::open(m.join("file")).unwrap();
    // SAFETY: isatty takes a descriptor only.
    assert_eq!(unsafe { libc::isatty(file.as_raw_fd()) }, 0);
    assert_eq!(
        io::Error::last_os_error().raw_os_error(),
        Some(libc::ENOTTY)
    );
}
