//! Every builder option, checked from the child's side: the child reports
//! its own /proc/self/{status,stat,limits,ns,cgroup} and we parse them.

mod common;

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::time::Duration;

use common::{field, sh, stat_fields, stdout};
use ferry_spawn::{Command, Namespace, Resource, Stdio};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-spawn-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn program_is_found_in_path_and_gets_its_args() {
    let out = stdout(sh("echo \"$0|$1\"").args(["zero", "one"]));
    assert_eq!(out, "zero|one\n");
}

#[test]
fn arg0_is_what_the_child_sees() {
    let out = stdout(
        Command::new("/bin/sh")
            .arg0("custom-name")
            .args(["-c", "tr '\\0' ' ' < /proc/$$/cmdline"]),
    );
    assert!(out.starts_with("custom-name -c "), "{out}");
}

#[test]
fn env_clear_set_and_remove() {
    let out = stdout(
        sh("env")
            .env_clear()
            .env("A", "1")
            .env("B", "2")
            .env_remove("B")
            .env("PATH", "/usr/bin:/bin"),
    );
    let vars: Vec<&str> = out.lines().filter(|l| !l.starts_with("PWD=")).collect();
    assert_eq!(vars, ["A=1", "PATH=/usr/bin:/bin"]);

    std::env::set_var("FERRY_SPAWN_INHERITED", "yes");
    let out = stdout(sh("echo $FERRY_SPAWN_INHERITED:$HOME").env_remove("HOME"));
    assert_eq!(out, "yes:\n");
}

#[test]
fn current_dir_by_path_and_by_fd() {
    assert_eq!(stdout(sh("pwd").current_dir("/usr/share")), "/usr/share\n");
    let dir: OwnedFd = fs::File::open("/usr/lib").unwrap().into();
    assert_eq!(stdout(sh("pwd -P").current_dir_fd(dir)), "/usr/lib\n");
}

#[test]
fn stdin_piped_and_null() {
    let mut child = Command::new("cat")
        .stdin(Stdio::Piped)
        .stdout(Stdio::Piped)
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"through the pipe").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.stdout, b"through the pipe");
    assert!(out.status.success());

    assert_eq!(stdout(Command::new("cat").stdin(Stdio::Null)), "");
}

#[test]
fn stderr_to_a_given_fd() {
    let path = temp_dir("stderr").join("err.txt");
    let file = fs::File::create(&path).unwrap();
    let status = common::wait(
        &mut sh("echo oops >&2")
            .stderr(Stdio::Fd(file.into()))
            .spawn()
            .unwrap(),
    );
    assert!(status.success());
    assert_eq!(fs::read_to_string(&path).unwrap(), "oops\n");
    fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

fn session_of(cmd: &mut Command) -> (i64, Vec<i64>) {
    let child = cmd
        .arg("cat /proc/$$/stat")
        .stdout(Stdio::Piped)
        .spawn()
        .unwrap();
    let pid = child.id() as i64;
    let out = String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap();
    (pid, stat_fields(&out))
}

#[test]
fn setsid_makes_a_session_leader() {
    let (pid, stat) = session_of(Command::new("sh").arg("-c").setsid(true));
    assert_eq!(
        (stat[2], stat[3], stat[4]),
        (pid, pid, 0),
        "pgrp, session, tty"
    );
}

#[test]
fn process_group_zero_makes_a_new_group() {
    let (pid, stat) = session_of(Command::new("sh").arg("-c").process_group(0));
    // SAFETY: getsid only reads.
    let our_session = unsafe { libc::getsid(0) } as i64;
    assert_eq!((stat[2], stat[3]), (pid, our_session), "pgrp, session");
}

#[test]
fn controlling_terminal_is_set() {
    // SAFETY: plain libc pty calls on fds we own.
    let (master, slave) = unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(master >= 0);
        assert_eq!(libc::grantpt(master), 0);
        assert_eq!(libc::unlockpt(master), 0);
        let name = std::ffi::CStr::from_ptr(libc::ptsname(master)).to_owned();
        let slave = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        assert!(slave >= 0);
        (master, slave)
    };
    let rdev = fs::metadata(format!("/proc/self/fd/{slave}"))
        .unwrap()
        .rdev() as i64;
    // SAFETY: we own `slave`.
    let slave_fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(slave) };
    let (pid, stat) = session_of(
        Command::new("sh")
            .arg("-c")
            .setsid(true)
            .stdin(Stdio::Fd(slave_fd))
            .controlling_terminal(0),
    );
    assert_eq!(stat[3], pid);
    assert_eq!(stat[4], rdev, "tty_nr is the pty");
    // SAFETY: we own `master`.
    unsafe { libc::close(master) };
}

#[test]
fn uid_gid_groups() {
    let status = stdout(
        sh("cat /proc/self/status")
            .uid(65534)
            .gid(65534)
            .groups(&[65534, 100]),
    );
    assert_eq!(field(&status, "Uid"), "65534 65534 65534 65534");
    assert_eq!(field(&status, "Gid"), "65534 65534 65534 65534");
    assert_eq!(field(&status, "Groups"), "100 65534");
}

#[test]
fn uid_alone_drops_supplementary_groups() {
    let status = stdout(sh("cat /proc/self/status").uid(65534).gid(65534));
    assert_eq!(field(&status, "Uid"), "65534 65534 65534 65534");
    assert!(
        status.contains("Groups:\t\n") || field(&status, "Groups").is_empty(),
        "{status}"
    );
}

#[test]
fn chroot_changes_the_root() {
    // A static binary is the only kind that runs in an empty root.
    let root = temp_dir("chroot");
    // A hard link, not a copy: a copy's write fd, cloned into another
    // test's child before it execs, would make our exec fail with ETXTBSY.
    let target = root.join("static");
    if fs::hard_link("/sbin/ldconfig", &target).is_err() {
        fs::copy("/sbin/ldconfig", &target).unwrap();
        std::thread::sleep(Duration::from_millis(200)); // Let such children exec.
    }
    let out = stdout(
        Command::new("/static")
            .arg("--version")
            .chroot(&root)
            .current_dir("/"),
    );
    assert!(out.contains("ldconfig"), "{out}");
    // Outside paths are gone inside.
    let err = Command::new("/bin/sh").chroot(&root).spawn().unwrap_err();
    assert!(matches!(
        err,
        ferry_spawn::SpawnError::Child {
            step: ferry_spawn::Step::Exec,
            errno: libc::ENOENT,
            ..
        }
    ));
    fs::remove_dir_all(&root).unwrap();
}

#[test]
fn umask() {
    assert_eq!(stdout(sh("umask").umask(0o027)), "0027\n");
}

#[test]
fn rlimits() {
    let limits = stdout(
        sh("cat /proc/self/limits")
            .rlimit(Resource::Nofile, 64, 128)
            .rlimit(Resource::Core, 0, 0)
            .rlimit(Resource::Nproc, 1000, 2000),
    );
    let line = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .split_whitespace()
            .rev()
            .skip(1)
            .take(2)
            .collect::<Vec<_>>()
    };
    assert_eq!(line("Max open files"), ["128", "64"]);
    assert_eq!(line("Max core file size"), ["0", "0"]);
    assert_eq!(line("Max processes"), ["2000", "1000"]);
}

#[test]
fn no_new_privs() {
    assert_eq!(
        field(
            &stdout(sh("cat /proc/self/status").no_new_privs(true)),
            "NoNewPrivs"
        ),
        "1"
    );
    assert_eq!(
        field(&stdout(sh("cat /proc/self/status")), "NoNewPrivs"),
        "0"
    );
}

#[test]
fn ambient_capability_survives_uid_change() {
    const CAP_NET_BIND_SERVICE: u32 = 10;
    let status = stdout(
        sh("cat /proc/self/status")
            .uid(65534)
            .gid(65534)
            .ambient_capability(CAP_NET_BIND_SERVICE),
    );
    assert_eq!(field(&status, "Uid"), "65534 65534 65534 65534");
    assert_eq!(field(&status, "CapAmb"), "0000000000000400");
    assert_eq!(field(&status, "CapEff"), "0000000000000400");
}

#[test]
fn parent_death_signal_fires_when_the_spawning_thread_exits() {
    // PR_SET_PDEATHSIG follows the parent *thread*: spawn from a thread
    // that then ends, and the child must get the signal.
    let spawn_from_thread = |pdeathsig: bool| {
        std::thread::spawn(move || {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            if pdeathsig {
                cmd.parent_death_signal(libc::SIGKILL);
            }
            cmd.spawn().unwrap()
        })
        .join()
        .unwrap()
    };
    let mut with = spawn_from_thread(true);
    let status = common::wait(&mut with);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );

    let mut without = spawn_from_thread(false);
    assert!(
        without
            .wait_timeout(Duration::from_millis(300))
            .unwrap()
            .is_none(),
        "survives without pdeathsig"
    );
    without.kill().unwrap();
    without.wait().unwrap();
}

#[test]
fn signal_mask_is_what_was_asked() {
    // This thread blocks SIGUSR2; the child must not inherit that.
    // SAFETY: sigset manipulation on locals, then this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    // cat, not sh: dash clears its own mask at startup.
    let cat_status = || {
        let mut cmd = Command::new("cat");
        cmd.arg("/proc/self/status");
        cmd
    };
    assert_eq!(field(&stdout(cat_status()), "SigBlk"), "0000000000000000");
    let status = stdout(cat_status().signal_mask(&[libc::SIGUSR1, libc::SIGTERM]));
    assert_eq!(
        field(&status, "SigBlk"),
        format!("{:016x}", (1u64 << 9) | (1 << 14))
    );
}

#[test]
fn ignored_sigpipe_is_reset_unless_kept() {
    // The Rust runtime ignores SIGPIPE in this process.
    let ign = |cmd: &mut Command| u64::from_str_radix(&field(&stdout(cmd), "SigIgn"), 16).unwrap();
    let sigpipe = 1u64 << (libc::SIGPIPE - 1);
    assert_eq!(ign(&mut sh("cat /proc/self/status")) & sigpipe, 0);
    assert_eq!(
        ign(sh("cat /proc/self/status").keep_ignored_signals()) & sigpipe,
        sigpipe
    );
}

#[test]
fn pidfd_kill_and_try_wait() {
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    assert!(child.try_wait().unwrap().is_none());
    child.kill().unwrap();
    let status = common::wait(&mut child);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert_eq!(child.try_wait().unwrap(), Some(status));
    child.kill().unwrap(); // Reaped: a no-op, never a stray signal.
}

#[test]
fn exit_code_is_reported() {
    assert_eq!(
        common::wait(&mut sh("exit 7").spawn().unwrap()).code(),
        Some(7)
    );
}

fn ns_link(pid: &str, ns: &str) -> String {
    fs::read_link(format!("/proc/{pid}/ns/{ns}"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn namespaces_combine_with_clone_vm() {
    for (ns, name) in [
        (Namespace::Mount, "mnt"),
        (Namespace::Uts, "uts"),
        (Namespace::Ipc, "ipc"),
        (Namespace::Net, "net"),
        (Namespace::Pid, "pid_for_children"),
        (Namespace::Cgroup, "cgroup"),
        (Namespace::User, "user"),
        (Namespace::Time, "time_for_children"),
    ] {
        let inside = stdout(sh(&format!("readlink /proc/self/ns/{name}")).namespace(ns));
        assert_ne!(inside.trim(), ns_link("self", name), "{ns:?} is new");
        let outside = stdout(sh(&format!("readlink /proc/self/ns/{name}")));
        assert_eq!(
            outside.trim(),
            ns_link("self", name),
            "{ns:?} unchanged without the flag"
        );
    }
    // In a new PID namespace the child is pid 1.
    assert_eq!(stdout(sh("echo $$").namespace(Namespace::Pid)), "1\n");
    // In a new user namespace without maps we are the overflow uid.
    assert_eq!(
        field(
            &stdout(sh("cat /proc/self/status").namespace(Namespace::User)),
            "Uid"
        ),
        "65534 65534 65534 65534"
    );
}

/// The writable cgroup2 mount, if there is one.
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    let root = mounts
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[2] == "cgroup2" && f[3].starts_with("rw"))?[1]
        .to_owned();
    Some(PathBuf::from(root))
}

#[test]
fn cgroup_placement_from_the_first_instruction() {
    let Some(root) = cgroup2_root() else {
        println!("SKIP: no writable cgroup2 mount");
        return;
    };
    let name = format!("ferry-spawn-test-{}", std::process::id());
    let dir = root.join(&name);
    fs::create_dir(&dir).unwrap();
    let result = std::panic::catch_unwind(|| {
        let fd: OwnedFd = fs::File::open(&dir).unwrap().into();
        let out = stdout(sh("cat /proc/self/cgroup").cgroup(fd));
        assert!(out.lines().any(|l| l == format!("0::/{name}")), "{out}");
    });
    // The child has exited, so the cgroup is empty and can go.
    fs::remove_dir(&dir).unwrap();
    result.unwrap();
}

#[test]
fn exec_errors_name_the_step() {
    use ferry_spawn::{SpawnError, Step};
    let dir = temp_dir("exec-errors");
    let not_exec = dir.join("not-executable");
    fs::write(&not_exec, "#!/bin/sh\necho hi\n").unwrap();
    let garbage = dir.join("garbage");
    fs::write(&garbage, [0u8, 1, 2, 3, 4, 5, 6, 7]).unwrap();
    fs::set_permissions(&garbage, fs::Permissions::from_mode(0o755)).unwrap();

    // ETXTBSY means a concurrent test's child had not yet exec'd while it
    // held a copy of our write fd to `garbage`; that passes, so retry.
    let step_errno = |cmd: &mut Command| loop {
        match cmd.spawn() {
            Err(SpawnError::Child {
                errno: libc::ETXTBSY,
                ..
            }) => std::thread::sleep(Duration::from_millis(10)),
            Err(SpawnError::Child { step, errno, .. }) => break (step, errno),
            other => panic!("expected a child failure, got {other:?}"),
        }
    };
    assert_eq!(
        step_errno(&mut Command::new(dir.join("missing"))),
        (Step::Exec, libc::ENOENT)
    );
    assert_eq!(
        step_errno(&mut Command::new(&not_exec)),
        (Step::Exec, libc::EACCES)
    );
    assert_eq!(
        step_errno(&mut Command::new(&garbage)),
        (Step::Exec, libc::ENOEXEC)
    );
    assert_eq!(
        step_errno(Command::new("true").current_dir(dir.join("missing"))),
        (Step::Chdir, libc::ENOENT)
    );
    assert_eq!(
        step_errno(Command::new("true").parent_death_signal(99)),
        (Step::ParentDeathSignal, libc::EINVAL)
    );
    assert_eq!(
        step_errno(
            Command::new("true")
                .uid(65534)
                .controlling_terminal(0)
                .setsid(false)
        )
        .0,
        Step::ControllingTerminal
    );
    assert!(matches!(
        Command::new("no-such-program-anywhere").spawn(),
        Err(SpawnError::NotFound { .. })
    ));
    let err = Command::new(dir.join("missing")).spawn().unwrap_err();
    assert!(
        err.to_string().contains("execve failed in the child"),
        "{err}"
    );
    assert_eq!(
        std::io::Error::from(err).kind(),
        std::io::ErrorKind::NotFound
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn failed_spawns_leave_no_zombie() {
    // SAFETY: reading our own children list through /proc only.
    let children = || {
        fs::read_to_string(format!("/proc/self/task/{}/children", unsafe {
            libc::gettid()
        }))
        .unwrap()
    };
    for _ in 0..20 {
        assert!(Command::new("/nonexistent").spawn().is_err());
    }
    assert_eq!(children().trim(), "", "no child of this thread remains");
}

#[test]
fn spawn_returns_a_usable_fd_for_the_pidfd() {
    let mut child = Command::new("true").spawn().unwrap();
    assert!(child.pidfd().as_raw_fd() > 2);
    assert!(common::wait(&mut child).success());
}

#[tokio::test(flavor = "current_thread")]
async fn wait_async_polls_the_pidfd() {
    let mut child = sh("sleep 0.2; exit 3").spawn().unwrap();
    let started = std::time::Instant::now();
    // Other tasks keep running while the child does.
    let ticker = tokio::spawn(async {
        let mut ticks = 0;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            ticks += 1;
        }
        ticks
    });
    let status = tokio::time::timeout(common::TIMEOUT, child.wait_async())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(3));
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(ticker.await.unwrap(), 5);
}
