//! The fd map: arbitrary remaps with overlaps, closing the rest, and no
//! leaks on either side. Alone in its binary because one test opens a
//! non-close-on-exec fd, which would leak into other tests' children.

mod common;

use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use common::{child_fds, sh, sleeper, stdout};
use ferry_spawn::{Command, Stdio};

/// Serialises this binary's tests: they count and number fds process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `dup2(fd, at)`: puts an fd at a chosen number in this process.
fn place(fd: &OwnedFd, at: RawFd) -> OwnedFd {
    // SAFETY: `at` is a number this test reserves; dup2 returns it as a new fd we own.
    unsafe {
        assert_eq!(libc::dup2(fd.as_raw_fd(), at), at);
        libc::fcntl(at, libc::F_SETFD, libc::FD_CLOEXEC);
        OwnedFd::from_raw_fd(at)
    }
}

fn inode(fd: &OwnedFd) -> u64 {
    fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap()
        .ino()
}

/// Fds of this process without close-on-exec.
fn inheritable_fds() -> Vec<i32> {
    let fds = fs::read_dir("/proc/self/fd")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap());
    // SAFETY: F_GETFD only reads the fd table.
    fds.filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } == 0)
        .collect()
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let (r, w) = std::io::pipe().unwrap();
    (r.into(), w.into())
}

#[test]
fn swapped_and_chained_fds_land_where_asked() {
    let _serial = serial();
    // fd 40 -> child 41 and 41 -> 40 (a swap), 42 -> 43 -> 44 (a chain).
    let pipes: Vec<_> = (0..4).map(|_| pipe()).collect();
    let a = place(&pipes[0].0, 40);
    let b = place(&pipes[1].0, 41);
    let c = place(&pipes[2].0, 42);
    let d = place(&pipes[3].0, 43);
    let (ia, ib, ic, id) = (inode(&a), inode(&b), inode(&c), inode(&d));
    let out = stdout(
        sh("for n in 40 41 43 44; do readlink /proc/$$/fd/$n; done")
            .fd(41, a)
            .fd(40, b)
            .fd(43, c)
            .fd(44, d),
    );
    let want: Vec<String> = [ib, ia, ic, id]
        .iter()
        .map(|i| format!("pipe:[{i}]"))
        .collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), want);
}

#[test]
fn an_fd_mapped_onto_its_own_number_loses_close_on_exec() {
    let _serial = serial();
    let (r, _w) = pipe();
    let r = place(&r, 50);
    let ino = inode(&r);
    assert_eq!(
        stdout(sh("readlink /proc/$$/fd/50").fd(50, r)),
        format!("pipe:[{ino}]\n")
    );
}

#[test]
fn close_other_fds_keeps_only_the_map_and_std_streams() {
    let _serial = serial();
    // A non-close-on-exec fd, as a careless library might leave behind.
    let (r, _w) = pipe();
    let leaky = place(&r, 60);
    // SAFETY: clears FD_CLOEXEC on an fd we own.
    unsafe { libc::fcntl(leaky.as_raw_fd(), libc::F_SETFD, 0) };
    let (keep, _w2) = pipe();

    let inherited = child_fds(&mut sleeper());
    assert!(
        inherited.contains(&60),
        "without close_other_fds it leaks: {inherited:?}"
    );

    assert_eq!(
        child_fds(sleeper().fd(7, keep).close_other_fds(true)),
        [0, 1, 2, 7]
    );
}

#[test]
fn no_fd_leaks_in_parent_or_child() {
    let _serial = serial();
    let before = common::open_fd_count();
    for _ in 0..50 {
        let fds = child_fds(
            sleeper()
                .stdin(Stdio::Piped)
                .stdout(Stdio::Piped)
                .stderr(Stdio::Null),
        );
        // Only 0-2, plus what this process holds without close-on-exec (fds
        // our own parent passed down, and the one another test makes).
        let inheritable = inheritable_fds();
        assert!(
            fds.iter().all(|fd| *fd <= 2 || inheritable.contains(fd)),
            "child got {fds:?}, inheritable {inheritable:?}"
        );
    }
    let mut failing = Command::new("/nonexistent");
    for _ in 0..20 {
        assert!(failing.stdout(Stdio::Piped).spawn().is_err());
    }
    assert_eq!(
        common::open_fd_count(),
        before,
        "parent fds before and after"
    );
}
