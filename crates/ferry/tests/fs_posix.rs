//! POSIX conformance of a mounted ferry-fs, organised like pjdfstest's
//! categories (one module each), plus the Linux extras ferry must get right
//! (renameat2, xattrs, fallocate, copy_file_range, SEEK_DATA/HOLE, locks,
//! mmap coherence, statfs, readdir under churn) and bad input.
//!
//! Every test mounts its own file system (`support::Mount`), so tests run in
//! parallel. Errnos are checked exactly. Permission checks drop to
//! nobody/nogroup or daemon/daemon in a forked child (`support::as_user`),
//! because root bypasses them. Run as root:
//! `cargo test -p ferry --test fs_posix` (ferry) or with
//! `FERRY_TEST_TARGET=raw` (plain ext4 directory, to validate the suite).

mod support;

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use support::{as_user, clock_past, errno, sys, Mount, DAEMON, NOBODY};

/// lstat that panics with the path on failure.
fn lstat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

/// Permission and special bits of `p` (not following symlinks).
fn mode(p: &Path) -> u32 {
    lstat(p).mode() & 0o7777
}

/// Creates (or truncates) a regular file with `data` and mode 0644.
fn touch(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

/// `m`'s file `f` with `data`, owned by nobody:nogroup (mode 0644).
fn nobodys_file(m: &Mount, data: &[u8]) -> PathBuf {
    let f = m.join("f");
    touch(&f, data);
    sys::chown(&f, Some(NOBODY.0), Some(NOBODY.1)).unwrap();
    f
}

/// (mtime, ctime) of `p` with nanoseconds, for "was it updated" checks.
fn stamps(p: &Path) -> ((i64, i64), (i64, i64)) {
    let m = lstat(p);
    ((m.mtime(), m.mtime_nsec()), (m.ctime(), m.ctime_nsec()))
}

/// Waits (bounded) until the clock is past every timestamp of `paths`, so
/// an update done next is visible as a strictly later stamp.
fn tick(paths: &[&Path]) {
    let latest = paths
        .iter()
        .map(|p| stamps(p))
        .map(|(m, c)| m.max(c))
        .max()
        .unwrap();
    clock_past(latest.0, latest.1);
}

/// Asserts that `op` moved mtime and/or ctime of `p` forward.
fn assert_updates(p: &Path, mtime: bool, ctime: bool, op: impl FnOnce()) {
    tick(&[p]);
    let (m0, c0) = stamps(p);
    op();
    let (m1, c1) = stamps(p);
    if mtime {
        assert!(
            m1 > m0,
            "mtime of {} not updated: {m0:?} -> {m1:?}",
            p.display()
        );
    }
    if ctime {
        assert!(
            c1 > c0,
            "ctime of {} not updated: {c0:?} -> {c1:?}",
            p.display()
        );
    }
}

/// A directory every uid may write in (mode 0777), for unprivileged ops.
fn open_dir(m: &Mount, name: &str) -> std::path::PathBuf {
    let d = m.join(name);
    sys::mkdir(&d, 0o777).unwrap();
    sys::chmod(&d, 0o777).unwrap();
    d
}

/// A name of `len` bytes.
fn long_name(len: usize) -> String {
    "n".repeat(len)
}

mod chmod {
    use super::*;

    #[test]
    fn changes_mode_and_ctime_not_mtime() {
        let m = Mount::new();
        let f = m.join("f");
        touch(&f, b"x");
        tick(&[&f]);
        let (m0, c0) = stamps(&f);
        sys::chmod(&f, 0o4751).unwrap();
        assert_eq!(mode(&f), 0o4751);
        let (m1, c1) = stamps(&f);
        assert!(c1 > c0, "ctime not updated");
        assert_eq!(m1, m0, "chmod must not change mtime");
        sys::mkdir(&m.join("d"), 0o755).unwrap();
        sys::chmod(&m.join("d"), 0o1700).unwrap();
        assert_eq!(mode(&m.join("d")), 0o1700);
    }

    #[test]
    fn follows_symlink() {
        let m = Mount::new();
        touch(&m.join("f"), b"");
        symlink("f", m.join("l")).unwrap();
        sys::chmod(&m.join("l"), 0o600).unwrap();
        assert_eq!(mode(&m.join("f")), 0o600);
        assert!(lstat(&m.join("l")).file_type().is_symlink());
    }

    #[test]
    fn errors() {
        let m = Mount::new();
        touch(&m.join("f"), b"");
        assert_eq!(errno(sys::chmod(&m.join("nope"), 0o644)), libc::ENOENT);
        assert_eq!(errno(sys::chmod(&m.join("f/x"), 0o644)), libc::ENOTDIR);
        let f = m.join("f");
        assert_eq!(
            as_user(Some(NOBODY), || sys::chmod(&f, 0o777)),
            Err(libc::EPERM)
        );
        assert_eq!(mode(&f), 0o644);
    }

    #[test]
    fn unprivileged_owner_cannot_set_sgid_for_foreign_group() {
        let m = Mount::new();
        let f = m.join("f");
        touch(&f, b"");
        sys::chown(&f, Some(NOBODY.0), Some(DAEMON.1)).unwrap();
        as_user(Some(NOBODY), || sys::chmod(&f, 0o2755)).unwrap();
        assert_eq!(mode(&f), 0o755, "S_ISGID must be cleared silently");
        as_user(Some(NOBODY), || sys::chmod(&f, 0o4755)).unwrap();
        assert_eq!(mode(&f), 0o4755, "owner may set S_ISUID");
    }
}

mod chown {
    use super::*;

    #[test]
    fn root_changes_owner_and_ctime() {
        let m = Mount::new();
        let f = m.join("f");
        touch(&f, b"");
        assert_updates(&f, false, true, || {
            sys::chown(&f, Some(NOBODY.0), Some(DAEMON.1)).unwrap()
        });
        assert_eq!((lstat(&f).uid(), lstat(&f).gid()), (NOBODY.0, DAEMON.1));
        sys::chown(&f, None, Some(0)).unwrap();
        assert_eq!((lstat(&f).uid(), lstat(&f).gid()), (NOBODY.0, 0));
    }

    #[test]
    fn unprivileged_rules() {
        let m = Mount::new();
        let f = m.join("f");
        touch(&f, b"");
        sys::chown(&f, Some(NOBODY.0), Some(0)).unwrap();
        // Giving a file away, or to a group one is not in, is EPERM.
        assert_eq!(
            as_user(Some(NOBODY), || sys::chown(&f, Some(DAEMON.0), None)),
            Err(libc::EPERM)
        );
        assert_eq!(
            as_user(Some(NOBODY), || sys::chown(&f, None, Some(DAEMON.1))),
            Err(libc::EPERM)
        );
        // To one's own group is fine.
        as_user(Some(NOBODY), || sys::chown(&f, None, Some(NOBODY.1))).unwrap();
        assert_eq!(lstat(&f).gid(), NOBODY.1);
        // A non-owner may not chown at all.
        assert_eq!(
            as_user(Some(DAEMON), || sys::chown(&f, None, Some(DAEMON.1))),
            Err(libc::EPERM)
        );
    }

    #[test]
    fn clears_setid_bits_by_unprivileged_owner() {
        let m = Mount::new();
        let f = nobodys_file(&m, b"#!/bin/sh\n");
        sys::chmod(&f, 0o6755).unwrap();
        as_user(Some(NOBODY), || sys::chown(&f, None, Some(NOBODY.1))).unwrap();
        assert_eq!(mode(&f), 0o755, "S_ISUID/S_ISGID must be cleared by chown");
    }

    #[test]
    fn lchown_does_not_follow() {
        let m = Mount::new();
        touch(&m.join("f"), b"");
        symlink("f", m.join("l")).unwrap();
        sys::lchown(&m.join("l"), Some(DAEMON.0), Some(DAEMON.1)).unwrap();
        assert_eq!(lstat(&m.join("l")).uid(), DAEMON.0);
        assert_eq!(lstat(&m.join("f")).uid(), 0);
        sys::chown(&m.join("l"), Some(NOBODY.0), None).unwrap();
        assert_eq!(lstat(&m.join("f")).uid(), NOBODY.0);
        assert_eq!(lstat(&m.join("l")).uid(), DAEMON.0);
    }
}

mod link {
    use super::*;

    #[test]
    fn shares_inode_counts_links_updates_times() {
        let m = Mount::new();
        let (a, b) = (m.join("a"), m.join("b"));
        touch(&a, b"data");
        tick(&[&a, m.path()]);
        let (dm0, _) = stamps(m.path());
        let (_, ac0) = stamps(&a);
        fs::hard_link(&a, &b).unwrap();
        assert_eq!(lstat(&a).ino(), lstat(&b).ino());
        assert_eq!(lstat(&a).nlink(), 2);
        assert!(stamps(&a).1 > ac0, "link must update the file's ctime");
        assert!(
            stamps(m.path()).0 > dm0,
            "link must update the parent's mtime"
        );
        fs::write(&b, b"other").unwrap();
        assert_eq!(fs::read(&a).unwrap(), b"other");
        fs::remove_file(&a).unwrap();
        assert_eq!(lstat(&b).nlink(), 1);
        assert_eq!(fs::read(&b).unwrap(), b"other");
    }

    #[test]
    fn errors() {
        let m = Mount::new();
        touch(&m.join("a"), b"");
        touch(&m.join("b"), b"");
        sys::mkdir(&m.join("d"), 0o755).unwrap();
        assert_eq!(errno(fs::hard_link(m.join("a"), m.join("b"))), libc::EEXIST);
        assert_eq!(
            errno(fs::hard_link(m.join("nope"), m.join("c"))),
            libc::ENOENT
        );
        assert_eq!(
            errno(fs::hard_link(m.join("a"), m.join("nope/c"))),
            libc::ENOENT
        );
        assert_eq!(
            errno(fs::hard_link(m.join("a"), m.join("b/c"))),
            libc::ENOTDIR
        );
        assert_eq!(errno(fs::hard_link(m.join("d"), m.join("d2"))), libc::EPERM);
        // nobody owns the file (so protected_hardlinks allows it) but may not
        // write the root-owned 0755 directory.
        let (a, c) = (m.join("a"), m.join("c"));
        sys::chown(&a, Some(NOBODY.0), None).unwrap();
        assert_eq!(
            as_user(Some(NOBODY), || fs::hard_link(&a, &c)),
            Err(libc::EACCES)
        );
    }
}

mod mkdir {
    use super::*;

    #[test]
    fn mode_owner_links_and_times() {
        let m = Mount::new();
        let root = m.path();
        let n0 = lstat(root).nlink();
        assert_updates(root, true, true, || {
            sys::mkdir(&m.join("d"), 0o755).unwrap()
        });
        let d = lstat(&m.join("d"));
        assert!(d.is_dir());
        assert_eq!(d.mode() & 0o7777, 0o755);
        assert_eq!(d.nlink(), 2);
        assert_eq!(lstat(root).nlink(), n0 + 1, "parent nlink = 2 + subdirs");
        sys::mkdir(&m.join("d/e"), 0o700).unwrap();
        sys::mkdir(&m.join("d/f"), 0o777).unwrap();
        assert_eq!(lstat(&m.join("d")).nlink(), 4);
        assert_eq!(mode(&m.join("d/f")), 0o755, "umask 022 applies");
        let dir = open_dir(&m, "open");
        let sub = dir.join("mine");
        as_user(Some(NOBODY), || sys::mkdir(&sub, 0o755)).unwrap();
        assert_eq!((lstat(&sub).uid(), lstat(&sub).gid()), NOBODY);
    }

    #[test]
    fn errors() {
        let m = Mount::new();
        touch(&m.join("f"), b"");
        sys::mkdir(&m.join("d"), 0o755).unwrap();
        symlink("dangling", m.join("l")).unwrap();
        for existing in ["f", "d", "l"] {
            assert_eq!(
                errno(sys::mkdir(&m.join(existing), 0o755)),
                libc::EEXIST,
                "{existing}"
            );
        }
        assert_eq!(errno(sys::mkdir(&m.join("nope/x"), 0o755)), libc::ENOENT);
        assert_eq!(errno(sys::mkdir(&m.join("f/x"), 0o755)), libc::ENOTDIR);
        let d = m.join("d/x");
        assert_eq!(
            as_user(Some(NOBODY), || sys::mkdir(&d, 0o755)),
            Err(libc::EACCES)
        );
    }
}

mod mknod {
    use super::*;

    #[test]
    fn fifo_socket_and_devices() {
        let m = Mount::new();
        sys::mkfifo(&m.join("fifo"), 0o644).unwrap();
        assert!(lstat(&m.join("fifo")).file_type().is_fifo());
        assert_eq!(mode(&m.join("fifo")), 0o644);
        sys::mknod(&m.join("sock"), libc::S_IFSOCK | 0o600, 0).unwrap();
        assert!(lstat(&m.join("sock")).file_type().is_socket());
        let dev = libc::makedev(1, 3);
        sys::mknod(&m.join("null"), libc::S_IFCHR | 0o666, dev).unwrap();
        let md = lstat(&m.join("null"));
        assert!(md.file_type().is_char_device());
        assert_eq!(md.rdev(), dev);
        sys::mknod(&m.join("blk"), libc::S_IFBLK | 0o600, libc::makedev(7, 0)).unwrap();
        assert!(lstat(&m.join("blk")).file_type().is_block_device());
        assert_eq!(lstat(&m.join("blk")).rdev(), libc::makedev(7, 0));
        assert_eq!(errno(sys::mkfifo(&m.join("fifo"), 0o644)), libc::EEXIST);
        assert_eq!(errno(sys::mkfifo(&m.join("nope/f"), 0o644)), libc::ENOENT);
    }

    #[test]
    fn fifo_carries_data() {
        let m = Mount::new();
        let p = m.join("fifo");
        sys::mkfifo(&p, 0o600).unwrap();
        // O_RDWR on a fifo never blocks on Linux, so one fd can do both ends.
        let mut f = sys::open(&p, libc::O_RDWR, 0).unwrap();
        f.write_all(b"through the pipe").unwrap();
        let mut buf = [0u8; 16];
        f.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"through the pipe");
        assert_eq!(lstat(&p).len(), 0);
    }

    #[test]
    fn device_node_needs_privilege() {
        let m = Mount::new();
        let d = open_dir(&m, "open");
        let (c, fifo) = (d.join("c"), d.join("fifo"));
        let r = as_user(Some(NOBODY), || {
            sys::mknod(&c, libc::S_IFCHR | 0o600, libc::makedev(1, 3))
        });
        assert_eq!(r, Err(libc::EPERM));
        as_user(Some(NOBODY), || sys::mkfifo(&fifo, 0o600)).unwrap();
        assert_eq!(lstat(&fifo).uid(), NOBODY.0);
    }
}

mod open {
    use super::*;

    #[test]
    fn create_excl_and_modes() {
        let m = Mount::new();
        let f = m.join("f");
        let flags = libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY;
        assert_updates(m.path(), true, true, || {
            drop(sys::open(&f, flags, 0o640).unwrap())
        });
        assert_eq!(mode(&f), 0o640);
        assert_eq!(lstat(&f).len(), 0);
        assert_eq!(errno(sys::open(&f, flags, 0o640)), libc::EEXIST);
        symlink("dangling", m.join("l")).unwrap();
        assert_eq!(errno(sys::open(&m.join("l"), flags, 0o640)), libc::EEXIST);
        assert!(
            !m.join("dangling").exists(),
            "O_EXCL must not follow the symlink"
        );
        // Without O_EXCL, O_CREAT through a dangling symlink creates the target.
        drop(sys::open(&m.join("l"), libc::O_CREAT | libc::O_WRONLY, 0o600).unwrap());
        assert!(lstat(&m.join("dangling")).is_file());
    }

    #[test]
    fn trunc_and_append() {
        let m = Mount::new();
        let f = m.join("f");
        touch(&f, b"0123456789");
        assert_updates(&f, true, true, || {
            drop(sys::open(&f, libc::O_WRONLY | libc::O_TRUNC, 0).unwrap())
        });
        assert_eq!(lstat(&f).len(), 0);
        touch(&f, b"head");
        let mut a = sys::open(&f, libc::O_WRONLY | libc::O_APPEND, 0).unwrap();
        a.seek(SeekFrom::Start(0)).unwrap();
        a.write_all(b"-tail").unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"head-tail");
        assert_eq!(
            a.stream_position().unwrap(),
            9,
            "O_APPEND moves the offset to the end"
        );
    }

    #[test]
    fn errors() {
        let m = Mount::new();
        touch(&m.join("f"), b"");
        symlink("f", m.join("l")).unwrap();
        sys::mkdir(&m.join("d"), 0o755).unwrap();
        assert_eq!(
            errno(sys::open(&m.join("nope"), libc::O_RDONLY, 0)),
            libc::ENOENT
        );
        assert_eq!(
            errno(sys::open(&m.join("f/x"), libc::O_RDONLY, 0)),
            libc::ENOTDIR
        );
        assert_eq!(
            errno(sys::open(
                &m.join("f"),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0
            )),
            libc::ENOTDIR
        );
        assert_eq!(
            errno(sys::open(&m.join("d"), libc::O_WRONLY, 0)),
            libc::EISDIR
        );
        assert_eq!(
            errno(sys::open(&m.join("d"), libc::O_RDWR, 0)),
            libc::EISDIR
        );
        assert_eq!(
            errno(sys::open(
                &m.join("l"),
                libc::O_RDONLY | libc::O_NOFOLLOW,
                0
            )),
            libc::ELOOP
        );
        assert_eq!(
            errno(sys::open(
                &m.join("nope/x"),
                libc::O_CREAT | libc::O_WRONLY,
                0o644
            )),
            libc::ENOENT
        );
    }

    #[test]
    fn permissions() {
        let m = Mount::new();
        let f = m.join("f");
        touch(&f, b"secret");
        sys::chmod(&f, 0o600).unwrap();
        assert_eq!(
            as_user(Some(NOBODY), || sys::open(&f, libc::O_RDONLY, 0).map(drop)),
            Err(libc::EACCES)
        );
        sys::chmod(&f, 0o604).unwrap();
        as_user(Some(NOBODY), || sys::open(&f, libc::O_RDONLY, 0).map(drop)).unwrap();
        assert_eq!(
            as_user(Some(NOBODY), || sys::open(&f, libc::O_WRONLY, 0).map(drop)),
            Err(libc::EACCES)
        );
        let g = m.join("g");
        let r = as_user(Some(NOBODY), || {
            sys::open(&g, libc::O_CREAT | libc::O_WRONLY, 0o644).map(drop)
        });
        assert_eq!(
            r,
            Err(libc::EACCES),
            "root-owned 0755 dir is not writable by nobody"
        );
        let d = open_dir(&m, "open");
        let n = d.join("n");
        as_user(Some(NOBODY), || {
            sys::open(&n, libc::O_CREAT | libc::O_WRONLY, 0o644).map(drop)
        })
        .unwrap();
        assert_eq!((lstat(&n).uid(), lstat(&n).gid()), NOBODY);
    }

    #[test]
    fn read_only_mount_gives_erofs() {
        if support::skip_unless_ferry("mount -o ro") {
            return;
        }
        let mut m = Mount::new();
        touch(&m.join("f"), b"kept");
        m.unmount();
        m.remount_with(&format!("{},ro", support::DEFAULT_OPTIONS));
        assert_eq!(fs::read(m.join("f")).unwrap(), b"kept");
        assert_eq!(
            errno(sys::open(
                &m.join("g"),
                libc::O_CREAT | libc::O_WRONLY,
                0o644
            )),
            libc::EROFS
        );
        assert_eq!(
            errno(sys::open(&m.join("f"), libc::O_WRONLY, 0)),
            libc::EROFS
        );
        assert_eq!(errno(sys::mkdir(&m.join("d"), 0o755)), libc::EROFS);
        assert_eq!(errno(fs::remove_file(m.join("f"))), libc::EROFS);
        assert_eq!(
            errno(sys::setxattr(&m.join("f"), "user.a", b"1", 0)),
            libc::EROFS
        );
        assert_eq!(errno(sys::chmod(&m.join("f"), 0o600)), libc::EROFS);
    }
}

mod rename {
    use super::*;

    #[test]
    fn moves_file_and_updates_times() {
        let m = Mount::new();
        sys::mkdir(&m.join("src"), 0o755).unwrap();
        sys::mkdir(&m.join("dst"), 0o755).unwrap();
        let (a, b) = (m.join("src/a"), m.join("dst/b"));
        touch(&a, b"payload");
        let ino = lstat(&a).ino();
        tick(&[&a, &m.join("src"), &m.join("dst")]);
        let (s0, d0, f0) = (stamps(&m.join("src")), stamps(&m.join("dst")), stamps(&a));
        fs::rename(&a, &b).unwrap();
        assert_eq!(errno(fs::symlink_metadata(&a)), libc::ENOENT);
        assert_eq!(lstat(&b).ino(), ino);
        assert_eq!(fs::read(&b).unwrap(), b"payload");
        let (s1, d1, f1) = (stamps(&m.join("src")), stamps(&m.join("dst")), stamps(&b));
        assert!(s1.0 > s0.0 && s1.1 > s0.1, "source dir mtime/ctime");
        assert!(d1.0 > d0.0 && d1.1 > d0.1, "target dir mtime/ctime");
        assert!(f1.1 > f0.1, "Linux updates the moved inode's ctime");
        assert_eq!(f1.0, f0.0, "rename must not touch the file's mtime");
    }

    #[test]
    fn replaces_existing_and_drops_its_link() {
        let m = Mount::new();
        let (a, b, c) = (m.join("a"), m.join("b"), m.join("c"));
        touch(&a, b"new");
        touch(&b, b"old");
        fs::hard_link(&b, &c).unwrap();
        assert_updates(&c, false, true, || fs::rename(&a, &b).unwrap());
        assert_eq!(fs::read(&b).unwrap(), b"new");
        assert_eq!(lstat(&c).nlink(), 1);
        assert_eq!(fs::read(&c).unwrap(), b"old");
        // Renaming one hard link onto another of the same inode is a no-op.
        fs::hard_link(&b, &a).unwrap();
        fs::rename(&a, &b).unwrap();
        assert!(a.exists() && b.exists());
        assert_eq!(lstat(&b).nlink(), 2);
    }

    #[test]
    fn directories_fix_links_and_dotdot() {
        let m = Mount::new();
        for d in [
            "p1",
            "p2",
            "p1/sub",
            "p1/sub/deep",
            "empty",
            "full",
            "full/x",
        ] {
            sys::mkdir(&m.join(d), 0o755).unwrap();
        }
        fs::rename(m.join("p1/sub"), m.join("p2/sub")).unwrap();
        assert_eq!(lstat(&m.join("p1")).nlink(), 2);
        assert_eq!(lstat(&m.join("p2")).nlink(), 3);
        assert_eq!(
            lstat(&m.join("p2/sub/..")).ino(),
            lstat(&m.join("p2")).ino()
        );
        assert!(lstat(&m.join("p2/sub/deep")).is_dir());
        // Over an empty dir: allowed; over a non-empty one: ENOTEMPTY.
        fs::rename(m.join("p2/sub"), m.join("empty")).unwrap();
        assert!(lstat(&m.join("empty/deep")).is_dir());
        assert_eq!(
            errno(fs::rename(m.join("empty"), m.join("full"))),
            libc::ENOTEMPTY
        );
    }

    #[test]
    fn errors() {
        let m = Mount::new();
        for d in ["d", "d/sub", "e"] {
            sys::mkdir(&m.join(d), 0o755).unwrap();
        }
        touch(&m.join("f"), b"");
        assert_eq!(
            errno(fs::rename(m.join("d"), m.join("d/sub/x"))),
            libc::EINVAL
        );
        assert_eq!(errno(fs::rename(m.join("d"), m.join("d/x"))), libc::EINVAL);
        assert_eq!(errno(fs::rename(m.join("d"), m.join("f"))), libc::ENOTDIR);
        assert_eq!(errno(fs::rename(m.join("f"), m.join("e"))), libc::EISDIR);
        assert_eq!(errno(fs::rename(m.join("nope"), m.join("x"))), libc::ENOENT);
        assert_eq!(
            errno(fs::rename(m.join("f"), m.join("nope/x"))),
            libc::ENOENT
        );
        assert_eq!(errno(fs::rename(m.join("f"), m.join("f/x"))), libc::ENOTDIR);
        let (f, g) = (m.join("f"), m.join("g"));
        assert_eq!(
            as_user(Some(NOBODY), || fs::rename(&f, &g)),
            Err(libc::EACCES)
        );
    }

    #[test]
    fn noreplace_and_exchange() {
        let m = Mount::new();
        let (f, d, x) = (m.join("f"), m.join("d"), m.join("x"));
        touch(&f, b"file");
        sys::mkdir(&d, 0o755).unwrap();
        touch(&m.join("d/inner"), b"");
        assert_eq!(
            errno(sys::renameat2(&f, &d, libc::RENAME_NOREPLACE)),
            libc::EEXIST
        );
        sys::renameat2(&f, &x, libc::RENAME_NOREPLACE).unwrap();
        assert_eq!(fs::read(&x).unwrap(), b"file");
        let (fi, di) = (lstat(&x).ino(), lstat(&d).ino());
        let n0 = lstat(m.path()).nlink();
        sys::renameat2(&x, &d, libc::RENAME_EXCHANGE).unwrap();
        assert_eq!((lstat(&x).ino(), lstat(&d).ino()), (di, fi));
        assert!(lstat(&m.join("x/inner")).is_file());
        assert_eq!(fs::read(&d).unwrap(), b"file");
        assert_eq!(lstat(m.path()).nlink(), n0);
        assert_eq!(
            errno(sys::renameat2(&x, &m.join("nope"), libc::RENAME_EXCHANGE)),
            libc::ENOENT
        );
        let flags = libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE;
        assert_eq!(errno(sys::renameat2(&x, &d, flags)), libc::EINVAL);
    }
}

mod rmdir {
    use super::*;

    #[test]
    fn removes_and_updates_parent() {
        let m = Mount::new();
        sys::mkdir(&m.join("d"), 0o755).unwrap();
        let n0 = lstat(m.path()).nlink();
        assert_updates(m.path(), true, true, || {
            fs::remove_dir(m.join("d")).unwrap()
        });
        assert_eq!(errno(fs::symlink_metadata(m.join("d"))), libc::ENOENT);
        assert_eq!(lstat(m.path()).nlink(), n0 - 1);
    }

    #[test]
    fn errors() {
        let m = Mount::new();
        sys::mkdir(&m.join("d"), 0o755).unwrap();
        touch(&m.join("d/f"), b"");
        sys::mkdir(&m.join("e"), 0o755).unwrap();
        assert_eq!(errno(fs::remove_dir(m.join("d"))), libc::ENOTEMPTY);
        assert_eq!(errno(fs::remove_dir(m.join("d/f"))), libc::ENOTDIR);
        assert_eq!(errno(fs::remove_dir(m.join("nope"))), libc::ENOENT);
        assert_eq!(errno(fs::remove_dir(m.join("e/."))), libc::EINVAL);
        let e = m.join("e");
        assert_eq!(
            as_user(Some(NOBODY), || fs::remove_dir(&e)),
            Err(libc::EACCES)
        );
    }
}

mod symlink {
    use super::*;

    #[test]
    fn create_read_and_follow() {
        let m = Mount::new();
        touch(&m.join("f"), b"target data");
        assert_updates(m.path(), true, true, || symlink("f", m.join("l")).unwrap());
        let md = lstat(&m.join("l"));
        assert!(md.file_type().is_symlink());
        assert_eq!(md.len(), 1, "a symlink's size is its target's length");
        assert_eq!(fs::read_link(m.join("l")).unwrap(), Path::new("f"));
        assert_eq!(fs::read(m.join("l")).unwrap(), b"target data");
        symlink("does/not/exist", m.join("dangling")).unwrap();
        assert_eq!(errno(fs::metadata(m.join("dangling"))), libc::ENOENT);
        let long = "x/".repeat(2047) + "y";
        symlink(&long, m.join("long")).unwrap();
        assert_eq!(fs::read_link(m.join("long")).unwrap(), Path::new(&long));
    }

    #[test]
    fn errors() {
        let m = Mount::new();
        touch(&m.join("f"), b"");
        assert_eq!(errno(symlink("x", m.join("f"))), libc::EEXIST);
        assert_eq!(errno(symlink("x", m.join("nope/l"))), libc::ENOENT);
        symlink("b", m.join("a")).unwrap();
        symlink("a", m.join("b")).unwrap();
        assert_eq!(errno(fs::metadata(m.join("a"))), libc::ELOOP);
        assert_eq!(
            errno(sys::open(&m.join("a"), libc::O_RDONLY, 0)),
            libc::ELOOP
        );
        assert_eq!(
            errno(symlink("y".repeat(4096), m.join("toolong"))),
            libc::ENAMETOOLONG
        );
        assert_eq!(errno(fs::read_link(m.join("f"))), libc::EINVAL);
    }
}

mod truncate {
    use super::*;

    #[test]
    fn extends_with_zeros_and_shrinks() {
        let m = Mount::new();
        let f = m.join("f");
        touch(&f, b"abcdef");
        assert_updates(&f, true, true, || sys::truncate(&f, 3).unwrap());
        assert_eq!(fs::read(&f).unwrap(), b"abc");
        sys::truncate(&f, 10).unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"abc\0\0\0\0\0\0\0");
        let file = sys::open(&f, libc::O_RDWR, 0).unwrap();
        sys::ftruncate(&file, 1 << 20).unwrap();
        assert_eq!(lstat(&f).len(), 1 << 20);
        assert!(fs::read(&f).unwrap()[3..].iter().all(|&b| b == 0));
        sys::ftruncate(&file, 0).unwrap();
        assert_eq!(lstat(&f).len(), 0);
    }

    #[test]
    fn errors() {
        let m = Mount::new();
        let f = m.join("f");
        touch(&f, b"");
        sys::mkdir(&m.join("d"), 0o755).unwrap();
        assert_eq!(errno(sys::truncate(&m.join("d"), 0)), libc::EISDIR);
        assert_eq!(errno(sys::truncate(&f, -1)), libc::EINVAL);
        assert_eq!(errno(sys::truncate(&m.join("nope"), 0)), libc::ENOENT);
        assert_eq!(errno(sys::truncate(&f, 1 << 62)), libc::EFBIG);
        let ro = sys::open(&f, libc::O_RDONLY, 0).unwrap();
        assert_eq!(errno(sys::ftruncate(&ro, 0)), libc::EINVAL);
        assert_eq!(
            as_user(Some(NOBODY), || sys::truncate(&f, 0)),
            Err(libc::EACCES)
        );
    }
}

mod unlink {
    use super::*;

    #[test]
    fn removes_name_keeps_other_links() {
        let m = Mount::new();
        let (a, b) = (m.join("a"), m.join("b"));
        touch(&a, b"x");
        fs::hard_link(&a, &b).unwrap();
        tick(&[&b, m.path()]);
        let (dir0, b0) = (stamps(m.path()), stamps(&b));
        fs::remove_file(&a).unwrap();
        assert_eq!(errno(fs::symlink_metadata(&a)), libc::ENOENT);
        assert_eq!(lstat(&b).nlink(), 1);
        assert!(stamps(m.path()).0 > dir0.0 && stamps(m.path()).1 > dir0.1);
        assert!(
            stamps(&b).1 > b0.1,
            "unlink updates the remaining link's ctime"
        );
        assert!(!fs::read_dir(m.path())
            .unwrap()
            .any(|e| e.unwrap().file_name() == "a"));
    }

    #[test]
    fn open_file_outlives_its_name() {
        let m = Mount::new();
        let f = m.join("f");
        let mut file = sys::open(&f, libc::O_CREAT | libc::O_RDWR, 0o644).unwrap();
        file.write_all(b"before").unwrap();
        fs::remove_file(&f).unwrap();
        assert_eq!(errno(fs::symlink_metadata(&f)), libc::ENOENT);
        file.write_all(b"-after").unwrap();
        assert_eq!(file.metadata().unwrap().nlink(), 0);
        let mut back = String::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_string(&mut back).unwrap();
        assert_eq!(back, "before-after");
        // A new file under the same name is a different file.
        touch(&f, b"new");
        assert_eq!(fs::read(&f).unwrap(), b"new");
    }

    #[test]
    fn errors() {
        let m = Mount::new();
        sys::mkdir(&m.join("d"), 0o755).unwrap();
        touch(&m.join("f"), b"");
        assert_eq!(errno(fs::remove_file(m.join("d"))), libc::EISDIR);
        assert_eq!(errno(fs::remove_file(m.join("nope"))), libc::ENOENT);
        assert_eq!(errno(fs::remove_file(m.join("f/x"))), libc::ENOTDIR);
        let f = m.join("f");
        assert_eq!(
            as_user(Some(NOBODY), || fs::remove_file(&f)),
            Err(libc::EACCES)
        );
    }
}

mod utimensat {
    use super::*;
    use sys::ts;

    #[test]
    fn explicit_now_and_omit() {
        let m = Mount::new();
        let f = m.join("f");
        touch(&f, b"");
        sys::utimensat(
            &f,
            Some([
                ts(1_000_000_000, 123_456_789),
                ts(1_500_000_000, 987_654_321),
            ]),
            0,
        )
        .unwrap();
        let md = lstat(&f);
        assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 123_456_789));
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_500_000_000, 987_654_321));
        // UTIME_OMIT keeps atime; UTIME_NOW sets mtime to about now; ctime moves.
        tick(&[&f]);
        let c0 = stamps(&f).1;
        sys::utimensat(
            &f,
            Some([ts(0, libc::UTIME_OMIT), ts(0, libc::UTIME_NOW)]),
            0,
        )
        .unwrap();
        let md = lstat(&f);
        assert_eq!((md.atime(), md.atime_nsec()), (1_000_000_000, 123_456_789));
        assert!(md.mtime() > 1_600_000_000);
        assert!(stamps(&f).1 > c0, "ctime updated");
        // Both omitted: nothing changes, not even ctime may go backwards.
        sys::utimensat(
            &f,
            Some([ts(0, libc::UTIME_OMIT), ts(0, libc::UTIME_OMIT)]),
            0,
        )
        .unwrap();
        assert_eq!(lstat(&f).mtime(), md.mtime());
        // Times before 1970 round-trip too.
        sys::utimensat(&f, Some([ts(-1000, 0), ts(-2000, 5)]), 0).unwrap();
        assert_eq!((lstat(&f).mtime(), lstat(&f).mtime_nsec()), (-2000, 5));
    }

    #[test]
    fn symlink_nofollow() {
        let m = Mount::new();
        touch(&m.join("f"), b"");
        symlink("f", m.join("l")).unwrap();
        let t = Some([ts(42, 0), ts(43, 0)]);
        sys::utimensat(&m.join("l"), t, libc::AT_SYMLINK_NOFOLLOW).unwrap();
        assert_eq!(lstat(&m.join("l")).mtime(), 43);
        assert_ne!(lstat(&m.join("f")).mtime(), 43);
    }

    #[test]
    fn permissions() {
        let m = Mount::new();
        let f = m.join("f");
        touch(&f, b"");
        sys::chmod(&f, 0o666).unwrap();
        // A writer who is not the owner may set "now" but not explicit times.
        as_user(Some(NOBODY), || sys::utimensat(&f, None, 0)).unwrap();
        let explicit = Some([ts(5, 0), ts(5, 0)]);
        assert_eq!(
            as_user(Some(NOBODY), || sys::utimensat(&f, explicit, 0)),
            Err(libc::EPERM)
        );
        sys::chmod(&f, 0o644).unwrap();
        assert_eq!(
            as_user(Some(NOBODY), || sys::utimensat(&f, None, 0)),
            Err(libc::EACCES)
        );
        sys::chown(&f, Some(NOBODY.0), None).unwrap();
        as_user(Some(NOBODY), || sys::utimensat(&f, explicit, 0)).unwrap();
        assert_eq!(lstat(&f).mtime(), 5);
    }
}

mod xattr {
    use super::*;

    #[test]
    fn set_get_list_remove() {
        let m = Mount::new();
        let f = m.join("f");
        touch(&f, b"");
        let binary: Vec<u8> = (0..=255u8).collect();
        assert_updates(&f, false, true, || {
            sys::setxattr(&f, "user.bin", &binary, 0).unwrap()
        });
        sys::setxattr(&f, "user.empty", b"", 0).unwrap();
        sys::setxattr(&f, "user.text", b"hello", 0).unwrap();
        assert_eq!(sys::getxattr(&f, "user.bin", 1024).unwrap(), binary);
        assert_eq!(sys::getxattr(&f, "user.empty", 16).unwrap(), b"");
        assert_eq!(
            sys::getxattr(&f, "user.text", 0).unwrap().len(),
            5,
            "size query"
        );
        let mut names = sys::listxattr(&f, 4096).unwrap();
        names.retain(|n| n.starts_with("user."));
        names.sort();
        assert_eq!(names, ["user.bin", "user.empty", "user.text"]);
        sys::setxattr(&f, "user.text", b"replaced", libc::XATTR_REPLACE).unwrap();
        assert_eq!(sys::getxattr(&f, "user.text", 64).unwrap(), b"replaced");
        sys::removexattr(&f, "user.text").unwrap();
        assert_eq!(errno(sys::getxattr(&f, "user.text", 64)), libc::ENODATA);
        sys::mkdir(&m.join("d"), 0o755).unwrap();
        sys::setxattr(&m.join("d"), "user.dir", b"v", 0).unwrap();
        assert_eq!(sys::getxattr(&m.join("d"), "user.dir", 8).unwrap(), b"v");
    }

    #[test]
    fn flags_and_buffer_errors() {
        let m = Mount::new();
        let f = m.join("f");
        touch(&f, b"");
        sys::setxattr(&f, "user.a", b"0123456789", 0).unwrap();
        assert_eq!(
            errno(sys::setxattr(&f, "user.a", b"x", libc::XATTR_CREATE)),
            libc::EEXIST
        );
        assert_eq!(
            errno(sys::setxattr(&f, "user.b", b"x", libc::XATTR_REPLACE)),
            libc::ENODATA
        );
        assert_eq!(errno(sys::getxattr(&f, "user.b", 64)), libc::ENODATA);
        assert_eq!(errno(sys::removexattr(&f, "user.b")), libc::ENODATA);
        assert_eq!(errno(sys::getxattr(&f, "user.a", 4)), libc::ERANGE);
        let need = sys::listxattr_size(&f).unwrap();
        assert!(need >= "user.a\0".len());
        assert_eq!(errno(sys::listxattr(&f, need - 1)), libc::ERANGE);
        assert_eq!(
            errno(sys::getxattr(&m.join("nope"), "user.a", 64)),
            libc::ENOENT
        );
    }

    #[test]
    fn symlinks_and_permissions() {
        let m = Mount::new();
        let f = m.join("f");
        touch(&f, b"");
        symlink("f", m.join("l")).unwrap();
        // Path calls follow the link; user.* on a symlink itself is EPERM.
        sys::setxattr(&m.join("l"), "user.via", b"1", 0).unwrap();
        assert_eq!(sys::getxattr(&f, "user.via", 8).unwrap(), b"1");
        assert_eq!(
            errno(sys::lsetxattr(&m.join("l"), "user.x", b"1", 0)),
            libc::EPERM
        );
        sys::setxattr(&f, "user.r", b"1", 0).unwrap();
        let r = as_user(Some(NOBODY), || sys::setxattr(&f, "user.n", b"1", 0));
        assert_eq!(r, Err(libc::EACCES), "0644 file: others may not set xattrs");
        as_user(Some(NOBODY), || sys::getxattr(&f, "user.r", 8).map(drop)).unwrap();
        sys::chmod(&f, 0o600).unwrap();
        assert_eq!(
            as_user(Some(NOBODY), || sys::getxattr(&f, "user.r", 8).map(drop)),
            Err(libc::EACCES)
        );
    }
}

/// Sticky directories, setgid directories, set-id bits cleared on write.
mod special_bits {
    use super::*;

    /// Appends `data` to `f` through a write(2): the set-ID bits' fate
    /// depends on who writes.
    fn append(f: &Path, data: &[u8]) -> io::Result<()> {
        sys::open(f, libc::O_WRONLY | libc::O_APPEND, 0)?.write_all(data)
    }

    #[test]
    fn sticky_dir_protects_others_entries() {
        let m = Mount::new();
        let d = m.join("tmp");
        sys::mkdir(&d, 0o755).unwrap();
        sys::chmod(&d, 0o1777).unwrap();
        let (theirs, mine) = (d.join("theirs"), d.join("mine"));
        as_user(Some(DAEMON), || fs::write(&theirs, b"d")).unwrap();
        as_user(Some(NOBODY), || fs::write(&mine, b"n")).unwrap();
        let other = d.join("other");
        assert_eq!(
            as_user(Some(NOBODY), || fs::remove_file(&theirs)),
            Err(libc::EPERM)
        );
        assert_eq!(
            as_user(Some(NOBODY), || fs::rename(&theirs, &other)),
            Err(libc::EPERM)
        );
        as_user(Some(NOBODY), || fs::rename(&mine, &other)).unwrap();
        as_user(Some(NOBODY), || fs::remove_file(&other)).unwrap();
        fs::remove_file(&theirs).unwrap();
    }

    #[test]
    fn setgid_dir_passes_group_and_bit() {
        let m = Mount::new();
        let d = m.join("shared");
        sys::mkdir(&d, 0o755).unwrap();
        sys::chown(&d, None, Some(DAEMON.1)).unwrap();
        sys::chmod(&d, 0o2777).unwrap();
        touch(&d.join("f"), b"");
        assert_eq!(lstat(&d.join("f")).gid(), DAEMON.1);
        sys::mkdir(&d.join("sub"), 0o755).unwrap();
        let sub = lstat(&d.join("sub"));
        assert_eq!(sub.gid(), DAEMON.1);
        assert_eq!(sub.mode() & 0o2000, 0o2000, "subdirs inherit S_ISGID");
        let n = d.join("n");
        as_user(Some(NOBODY), || fs::write(&n, b"")).unwrap();
        assert_eq!((lstat(&n).uid(), lstat(&n).gid()), (NOBODY.0, DAEMON.1));
    }

    #[test]
    fn write_by_other_user_clears_setid() {
        let m = Mount::new();
        let f = nobodys_file(&m, b"#!/bin/sh\n");
        sys::chmod(&f, 0o6777).unwrap();
        as_user(Some(DAEMON), || append(&f, b"echo hi\n")).unwrap();
        assert_eq!(
            mode(&f),
            0o777,
            "an unprivileged write clears S_ISUID and S_ISGID"
        );
        assert_eq!(fs::read(&f).unwrap(), b"#!/bin/sh\necho hi\n");
    }

    /// ferry asks the kernel for FUSE_HANDLE_KILLPRIV_V2 (so that writes
    /// stop costing a `security.capability` round trip each), which makes
    /// clearing set-ID bits the file system's job everywhere the kernel
    /// used to do it. The expected modes are ext4's on this kernel.
    #[test]
    fn every_kind_of_kill_clears_setid_as_on_ext4() {
        let m = Mount::new();
        let f = nobodys_file(&m, b"0123456789");

        sys::chmod(&f, 0o6777).unwrap();
        as_user(Some(DAEMON), || sys::truncate(&f, 4)).unwrap();
        assert_eq!(mode(&f), 0o777, "a truncate by another user");
        assert_eq!(lstat(&f).len(), 4);

        sys::chmod(&f, 0o6777).unwrap();
        sys::chown(&f, None, None).unwrap();
        assert_eq!(mode(&f), 0o777, "chown(-1, -1) of a file, even by root");

        sys::chmod(&f, 0o6777).unwrap();
        sys::chown(&f, Some(NOBODY.0), None).unwrap();
        assert_eq!(mode(&f), 0o777, "chown of a file to its own owner, by root");

        sys::chmod(&f, 0o6777).unwrap();
        sys::truncate(&f, 2).unwrap();
        append(&f, b"by root").unwrap();
        assert_eq!(mode(&f), 0o6777, "root's writes and truncates keep them");
        assert_eq!(fs::read(&f).unwrap(), b"01by root");

        sys::chmod(&f, 0o2767).unwrap();
        as_user(Some(NOBODY), || sys::truncate(&f, 0)).unwrap();
        assert_eq!(mode(&f), 0o2767, "set-group-ID without group execute stays");

        let d = m.join("d");
        sys::mkdir(&d, 0o755).unwrap();
        sys::chmod(&d, 0o6777).unwrap();
        sys::chown(&d, None, None).unwrap();
        sys::chown(&d, Some(NOBODY.0), None).unwrap();
        assert_eq!(mode(&d), 0o6777, "a directory's chown keeps them");
    }

    /// Set-group-ID without group execute (it may mark mandatory locking)
    /// goes on a write or truncate only by a caller outside the file's
    /// group; a supplementary group counts. The expected modes are ext4's
    /// on this kernel; ferry is checked on both write paths (passthrough,
    /// where the bits go at open, and through the daemon).
    #[test]
    fn set_group_id_without_group_execute_goes_only_for_non_members() {
        let target = support::Target::from_env();
        let mut mounts = vec![Mount::new()];
        if target == support::Target::Ferry {
            let options = format!("{},nopassthrough", support::DEFAULT_OPTIONS);
            mounts.push(Mount::with(target, &options));
        }
        for m in &mounts {
            let f = nobodys_file(m, b"0123456789");

            sys::chmod(&f, 0o2767).unwrap();
            as_user(Some(DAEMON), || sys::truncate(&f, 8)).unwrap();
            assert_eq!(mode(&f), 0o767, "a truncate by a non-member");

            sys::chmod(&f, 0o2767).unwrap();
            as_user(Some(DAEMON), || append(&f, b"a")).unwrap();
            assert_eq!(mode(&f), 0o767, "a write by a non-member");

            sys::chmod(&f, 0o6767).unwrap();
            as_user(None, || {
                support::drop_to(DAEMON, &[DAEMON.1, NOBODY.1])?;
                append(&f, b"b")
            })
            .unwrap();
            assert_eq!(
                mode(&f),
                0o2767,
                "a write by a member through a supplementary group: only set-user-ID goes"
            );
            assert_eq!(fs::read(&f).unwrap(), b"01234567ab");
        }
    }
}

/// fallocate, copy_file_range, SEEK_DATA/SEEK_HOLE.
mod data {
    use super::*;

    #[test]
    fn fallocate_modes() {
        let m = Mount::new();
        let f = m.join("f");
        let file = sys::open(&f, libc::O_CREAT | libc::O_RDWR, 0o644).unwrap();
        sys::fallocate(&file, 0, 0, 8192).unwrap();
        assert_eq!(lstat(&f).len(), 8192);
        assert!(fs::read(&f).unwrap().iter().all(|&b| b == 0));
        sys::fallocate(&file, libc::FALLOC_FL_KEEP_SIZE, 8192, 1 << 20).unwrap();
        assert_eq!(lstat(&f).len(), 8192, "KEEP_SIZE must not change the size");
        sys::pwrite(&file, &[0xAB; 12288], 0).unwrap();
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        sys::fallocate(&file, punch, 4096, 4096).unwrap();
        let data = fs::read(&f).unwrap();
        assert_eq!(data.len(), 12288);
        assert!(data[..4096].iter().all(|&b| b == 0xAB));
        assert!(
            data[4096..8192].iter().all(|&b| b == 0),
            "punched range reads as zeros"
        );
        assert!(data[8192..].iter().all(|&b| b == 0xAB));
        assert_eq!(
            errno(sys::fallocate(&file, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096)),
            libc::EOPNOTSUPP
        );
        assert_eq!(errno(sys::fallocate(&file, 0, 0, 0)), libc::EINVAL);
        assert_eq!(errno(sys::fallocate(&file, 0, -1, 10)), libc::EINVAL);
    }

    #[test]
    fn copy_file_range_copies_at_offsets() {
        let m = Mount::new();
        let src_data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        touch(&m.join("src"), &src_data);
        let src = sys::open(&m.join("src"), libc::O_RDONLY, 0).unwrap();
        let dst = sys::open(&m.join("dst"), libc::O_CREAT | libc::O_RDWR, 0o644).unwrap();
        let mut copied = 0;
        while copied < 50_000 {
            let n = sys::copy_file_range(
                &src,
                1000 + copied as i64,
                &dst,
                10 + copied as i64,
                50_000 - copied,
            )
            .unwrap();
            assert!(n > 0, "copy_file_range made no progress");
            copied += n;
        }
        let out = fs::read(m.join("dst")).unwrap();
        assert_eq!(out.len(), 50_010);
        assert_eq!(&out[..10], &[0; 10]);
        assert_eq!(&out[10..], &src_data[1000..51_000]);
        assert_eq!(
            sys::copy_file_range(&src, 200_000, &dst, 0, 10).unwrap(),
            0,
            "at EOF"
        );
    }

    #[test]
    fn seek_data_and_hole() {
        let m = Mount::new();
        let f = sys::open(&m.join("sparse"), libc::O_CREAT | libc::O_RDWR, 0o644).unwrap();
        const MIB: i64 = 1 << 20;
        sys::pwrite(&f, &[1; 4096], 0).unwrap();
        sys::pwrite(&f, &[2; 4096], 4 * MIB).unwrap();
        let size = 4 * MIB + 4096;
        // Whether holes are reported is the file system's choice (reporting
        // all of it as data is conformant); the answers must be consistent.
        assert_eq!(sys::lseek(&f, 0, libc::SEEK_DATA).unwrap(), 0);
        let hole = sys::lseek(&f, 0, libc::SEEK_HOLE).unwrap();
        assert!(hole >= 4096 && hole <= size, "SEEK_HOLE from 0 gave {hole}");
        let data = sys::lseek(&f, 2 * MIB, libc::SEEK_DATA).unwrap();
        assert!(
            (2 * MIB..=4 * MIB).contains(&data),
            "SEEK_DATA in the hole gave {data}"
        );
        assert_eq!(sys::lseek(&f, 4 * MIB + 10, libc::SEEK_HOLE).unwrap(), size);
        assert_eq!(errno(sys::lseek(&f, size, libc::SEEK_DATA)), libc::ENXIO);
        assert_eq!(
            errno(sys::lseek(&f, size + 1, libc::SEEK_HOLE)),
            libc::ENXIO
        );
        assert_eq!(errno(sys::lseek(&f, -1, libc::SEEK_SET)), libc::EINVAL);
    }
}

/// POSIX record locks across processes, flock across open file descriptions.
mod locks {
    use super::*;

    #[test]
    fn fcntl_locks_conflict_across_processes() {
        let m = Mount::new();
        let p = m.join("f");
        touch(&p, &[0; 100]);
        let f = sys::open(&p, libc::O_RDWR, 0).unwrap();
        sys::fcntl_lock(&f, libc::F_SETLK, libc::F_WRLCK, 0, 10).unwrap();
        let me = std::process::id() as i32;
        let r = as_user(None, || {
            let g = sys::open(&p, libc::O_RDWR, 0)?;
            let conflict = sys::fcntl_lock(&g, libc::F_SETLK, libc::F_WRLCK, 5, 10);
            assert_eq!(errno(conflict), libc::EAGAIN, "overlapping write lock");
            assert_eq!(
                errno(sys::fcntl_lock(&g, libc::F_SETLK, libc::F_RDLCK, 0, 1)),
                libc::EAGAIN
            );
            let probe = sys::fcntl_lock(&g, libc::F_GETLK, libc::F_WRLCK, 0, 100)?;
            assert_eq!(probe.l_type, libc::F_WRLCK as i16);
            assert_eq!(probe.l_pid, me, "F_GETLK names the holder");
            sys::fcntl_lock(&g, libc::F_SETLK, libc::F_WRLCK, 10, 10).map(drop)
        });
        assert_eq!(r, Ok(()));
        sys::fcntl_lock(&f, libc::F_SETLK, libc::F_UNLCK, 0, 10).unwrap();
        as_user(None, || {
            let g = sys::open(&p, libc::O_RDWR, 0)?;
            sys::fcntl_lock(&g, libc::F_SETLK, libc::F_WRLCK, 0, 100).map(drop)
        })
        .unwrap();
    }

    #[test]
    fn flock_conflicts_between_open_files() {
        let m = Mount::new();
        let p = m.join("f");
        touch(&p, b"");
        let a = sys::open(&p, libc::O_RDONLY, 0).unwrap();
        let b = sys::open(&p, libc::O_RDONLY, 0).unwrap();
        sys::flock(&a, libc::LOCK_EX).unwrap();
        assert_eq!(
            errno(sys::flock(&b, libc::LOCK_SH | libc::LOCK_NB)),
            libc::EWOULDBLOCK
        );
        sys::flock(&a, libc::LOCK_UN).unwrap();
        sys::flock(&a, libc::LOCK_SH).unwrap();
        sys::flock(&b, libc::LOCK_SH | libc::LOCK_NB).unwrap();
        assert_eq!(
            errno(sys::flock(&b, libc::LOCK_EX | libc::LOCK_NB)),
            libc::EWOULDBLOCK
        );
        drop(a);
        sys::flock(&b, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    }
}

mod mmap {
    use super::*;

    #[test]
    fn shared_mapping_is_coherent_with_read_and_write() {
        let m = Mount::new();
        let p = m.join("f");
        touch(&p, &[b'.'; 8192]);
        let f = sys::open(&p, libc::O_RDWR, 0).unwrap();
        let mut map = sys::Mapping::shared(&f, 8192, 0).unwrap();
        map.bytes()[100..105].copy_from_slice(b"mmap!");
        assert_eq!(
            sys::pread(&f, 5, 100).unwrap(),
            b"mmap!",
            "read() sees mmap store"
        );
        sys::pwrite(&f, b"write", 5000).unwrap();
        assert_eq!(&map.bytes()[5000..5005], b"write", "mmap sees write()");
        map.sync().unwrap();
        drop(map);
        drop(f);
        let back = fs::read(&p).unwrap();
        assert_eq!(&back[100..105], b"mmap!");
        assert_eq!(back.len(), 8192);
    }

    #[test]
    fn msync_data_survives_remount() {
        let mut m = Mount::new();
        let p = m.join("f");
        touch(&p, &[0; 4096]);
        {
            let f = sys::open(&p, libc::O_RDWR, 0).unwrap();
            let mut map = sys::Mapping::shared(&f, 4096, 0).unwrap();
            map.bytes()[..7].copy_from_slice(b"durable");
            map.sync().unwrap();
        }
        m.unmount();
        m.remount();
        assert_eq!(&fs::read(&p).unwrap()[..7], b"durable");
    }
}

/// statfs and readdir.
mod dir {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn statfs_is_sane() {
        let m = Mount::new();
        let st = sys::statfs(m.path()).unwrap();
        assert!(st.f_bsize > 0);
        assert!(
            st.f_blocks >= st.f_bfree && st.f_bfree >= st.f_bavail,
            "{st:?}"
        );
        assert!(st.f_blocks > 0);
        assert_eq!(st.f_namelen, 255);
    }

    #[test]
    fn readdir_lists_every_entry_once() {
        let m = Mount::new();
        sys::mkdir(&m.join("d"), 0o755).unwrap();
        touch(&m.join("f"), b"");
        symlink("f", m.join("l")).unwrap();
        let mut names: Vec<_> = fs::read_dir(m.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["d", "f", "l"]);
        let types: HashMap<_, _> = fs::read_dir(m.path())
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().into_string().unwrap(), e.file_type().unwrap())
            })
            .collect();
        assert!(types["d"].is_dir() && types["f"].is_file() && types["l"].is_symlink());
    }

    #[test]
    fn readdir_stable_under_concurrent_changes() {
        let m = Mount::new();
        let d = m.join("d");
        sys::mkdir(&d, 0o755).unwrap();
        let stable: Vec<String> = (0..300).map(|i| format!("stable-{i:03}")).collect();
        for n in &stable {
            touch(&d.join(n), b"");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let (d, stop) = (d.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) && i < 200_000 {
                    let name = d.join(format!("churn-{}", i % 50));
                    if i & 1 == 0 {
                        touch(&name, b"");
                    } else {
                        let _ = fs::remove_file(&name);
                    }
                    i += 1;
                }
            })
        };
        for pass in 0..20 {
            let mut seen: HashMap<String, u32> = HashMap::new();
            for e in fs::read_dir(&d).unwrap() {
                *seen
                    .entry(e.unwrap().file_name().into_string().unwrap())
                    .or_default() += 1;
            }
            let dups: Vec<_> = seen.iter().filter(|(_, &c)| c > 1).collect();
            assert!(dups.is_empty(), "pass {pass}: duplicates {dups:?}");
            for n in &stable {
                assert_eq!(seen.get(n), Some(&1), "pass {pass}: {n} missing");
            }
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
    }
}

/// Names, offsets and sizes beyond the limits, and stores ferry must refuse.
mod bad_input {
    use super::*;
    use std::process::Command;
    use std::time::Duration;

    #[test]
    fn names_over_255_bytes() {
        let m = Mount::new();
        let (ok, bad) = (m.join(&long_name(255)), m.join(&long_name(256)));
        touch(&ok, b"");
        assert_eq!(
            errno(sys::open(&bad, libc::O_CREAT | libc::O_WRONLY, 0o644)),
            libc::ENAMETOOLONG
        );
        assert_eq!(errno(sys::mkdir(&bad, 0o755)), libc::ENAMETOOLONG);
        assert_eq!(errno(symlink("x", &bad)), libc::ENAMETOOLONG);
        assert_eq!(errno(fs::hard_link(&ok, &bad)), libc::ENAMETOOLONG);
        assert_eq!(errno(fs::rename(&ok, &bad)), libc::ENAMETOOLONG);
        assert_eq!(errno(sys::mkfifo(&bad, 0o644)), libc::ENAMETOOLONG);
        assert_eq!(errno(fs::symlink_metadata(&bad)), libc::ENAMETOOLONG);
        let deep = m.join(&"a/".repeat(2100));
        assert_eq!(
            errno(fs::symlink_metadata(&deep)),
            libc::ENAMETOOLONG,
            "path > PATH_MAX"
        );
        assert!(lstat(&ok).is_file());
    }

    #[test]
    fn offsets_out_of_range() {
        let m = Mount::new();
        let f = sys::open(&m.join("f"), libc::O_CREAT | libc::O_RDWR, 0o644).unwrap();
        assert_eq!(errno(sys::pwrite(&f, b"x", -1)), libc::EINVAL);
        assert_eq!(errno(sys::pread(&f, 1, -1)), libc::EINVAL);
        // offset + length overflowing loff_t: the kernel's EINVAL, on any fs.
        assert_eq!(errno(sys::pwrite(&f, b"x", i64::MAX)), libc::EINVAL);
        // Beyond the file system's maximum file size (ext4: 16 TiB; FUSE's
        // s_maxbytes is i64::MAX, so ferry must enforce its own): EFBIG.
        assert_eq!(errno(sys::pwrite(&f, b"x", 1 << 62)), libc::EFBIG);
        assert_eq!(errno(sys::ftruncate(&f, 1 << 62)), libc::EFBIG);
        assert_eq!(errno(sys::ftruncate(&f, -5)), libc::EINVAL);
        assert_eq!(errno(sys::lseek(&f, -1, libc::SEEK_CUR)), libc::EINVAL);
        assert_eq!(
            sys::pread(&f, 10, 1 << 40).unwrap(),
            b"",
            "read past EOF is empty"
        );
        assert_eq!(
            f.metadata().unwrap().len(),
            0,
            "failed writes left no trace"
        );
    }

    #[test]
    fn xattrs_over_limits() {
        let m = Mount::new();
        let f = m.join("f");
        touch(&f, b"");
        assert_eq!(
            errno(sys::setxattr(&f, "user.big", &vec![0; 65537], 0)),
            libc::E2BIG
        );
        let long = format!("user.{}", "n".repeat(251));
        assert_eq!(errno(sys::setxattr(&f, &long, b"v", 0)), libc::ERANGE);
        assert_eq!(errno(sys::getxattr(&f, &long, 8)), libc::ERANGE);
        assert_eq!(errno(sys::setxattr(&f, "user.", b"v", 0)), libc::EINVAL);
        assert_eq!(
            errno(sys::setxattr(&f, "nonamespace", b"v", 0)),
            libc::EOPNOTSUPP
        );
    }

    /// Runs `ferry ARGS…` bounded; returns (status ok, trimmed stderr).
    fn ferry(args: &[&std::ffi::OsStr]) -> (bool, String) {
        let out = support::run_bounded(
            Command::new(support::ferry_bin()).args(args),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("ferry {args:?}: {e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    }

    #[test]
    fn daemonized_mount_is_live_when_it_returns() {
        if support::skip_unless_ferry("ferry mount without --foreground") {
            return;
        }
        let dir = support::TempDir::new("ferry-test");
        let (store, mnt) = (dir.path().join("store"), dir.path().join("mnt"));
        sys::mkdir(&store, 0o755).unwrap();
        sys::mkdir(&mnt, 0o755).unwrap();
        let args = [
            "mount".as_ref(),
            "--store".as_ref(),
            store.as_os_str(),
            mnt.as_os_str(),
        ];
        let (ok, err) = ferry(&args);
        assert!(ok, "ferry mount failed: {err}");
        // No polling: the contract is that the mount is live on return.
        assert!(
            support::is_mounted(&mnt),
            "ferry mount returned before the mount was live"
        );
        touch(&mnt.join("f"), b"daemonized");
        let (ok, err) = ferry(&["umount".as_ref(), mnt.as_os_str()]);
        assert!(ok, "ferry umount failed: {err}");
        assert!(!support::is_mounted(&mnt));
        let (ok, err) = ferry(&args);
        assert!(ok, "second ferry mount failed: {err}");
        assert_eq!(fs::read(mnt.join("f")).unwrap(), b"daemonized");
        let (ok, err) = ferry(&["umount".as_ref(), mnt.as_os_str()]);
        assert!(ok, "ferry umount failed: {err}");
    }

    /// mount(8) and fstab run `mount.fuse.ferry SOURCE MOUNTPOINT -o OPTS`;
    /// the ferry binary under that name must mount, ignoring fstab-only
    /// options, and an unknown option must be refused in one line.
    #[test]
    fn mount_helper_mounts_like_mount_t_fuse_ferry() {
        if support::skip_unless_ferry("mount.fuse.ferry") {
            return;
        }
        let dir = support::TempDir::new("ferry-test");
        let (store, mnt) = (dir.path().join("store"), dir.path().join("mnt"));
        sys::mkdir(&mnt, 0o755).unwrap();
        let helper = dir.path().join("mount.fuse.ferry");
        std::os::unix::fs::symlink(support::ferry_bin(), &helper).unwrap();
        let run = |opts: &str| {
            support::run_bounded(
                Command::new(&helper)
                    .arg(&store)
                    .arg(&mnt)
                    .arg("-o")
                    .arg(opts),
                Duration::from_secs(20),
            )
            .unwrap()
        };
        let bad = run("rw,frobnicate");
        assert!(!bad.status.success() && !support::is_mounted(&mnt));
        assert_eq!(String::from_utf8_lossy(&bad.stderr).lines().count(), 1);
        let out = run("rw,allow_other,_netdev,nofail");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(support::is_mounted(&mnt));
        touch(&mnt.join("via-helper"), b"x");
        let (ok, err) = ferry(&["umount".as_ref(), mnt.as_os_str()]);
        assert!(ok, "ferry umount failed: {err}");
        assert!(store.join("meta.db").exists(), "the source is the store");
    }

    #[test]
    fn fsck_accepts_a_clean_store() {
        if support::skip_unless_ferry("ferry fsck") {
            return;
        }
        let mut m = Mount::new();
        touch(&m.join("f"), b"some data");
        sys::mkdir(&m.join("d"), 0o755).unwrap();
        m.unmount();
        let out = support::run_bounded(
            Command::new(support::ferry_bin())
                .arg("fsck")
                .arg("--store")
                .arg(m.store()),
            Duration::from_secs(60),
        );
        assert!(
            matches!(&out, Ok(o) if o.status.success() && !(o.stdout.is_empty() && o.stderr.is_empty())),
            "{}",
            support::describe(&out)
        );
    }

    #[test]
    fn corrupted_store_is_refused() {
        if support::skip_unless_ferry("store corruption") {
            return;
        }
        let mut m = Mount::new();
        touch(&m.join("f"), b"some data");
        m.unmount();
        // Overwrite the head of every file in the store with garbage: whatever
        // the DB file is called, it is among them.
        let mut corrupted = 0;
        let mut stack = vec![m.store().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                let md = lstat(&p);
                if md.is_dir() {
                    stack.push(p);
                } else if md.is_file() && md.len() > 0 {
                    let f = sys::open(&p, libc::O_WRONLY, 0).unwrap();
                    sys::pwrite(
                        &f,
                        &support::Rng::new(7).bytes(md.len().min(8192) as usize),
                        0,
                    )
                    .unwrap();
                    corrupted += 1;
                }
            }
        }
        assert!(corrupted > 0, "store has no files to corrupt");
        let (ok, err) = ferry(&["fsck".as_ref(), "--store".as_ref(), m.store().as_os_str()]);
        assert!(!ok, "fsck accepted a corrupted store");
        assert_eq!(
            err.lines().count(),
            1,
            "fsck reason must be one line: {err:?}"
        );
        // Foreground mount of a bad store must exit (not serve) with one line.
        let mnt = m.scratch().join("mnt2");
        sys::mkdir(&mnt, 0o755).unwrap();
        let (ok, err) = ferry(&[
            "mount".as_ref(),
            "--store".as_ref(),
            m.store().as_os_str(),
            "--foreground".as_ref(),
            mnt.as_os_str(),
        ]);
        assert!(!ok, "mount of a corrupted store succeeded");
        assert!(!support::is_mounted(&mnt));
        assert_eq!(err.lines().count(), 1, "refusal must be one line: {err:?}");
        // A directory that is not a ferry store (but not empty) is refused too.
        let foreign = m.scratch().join("foreign");
        sys::mkdir(&foreign, 0o755).unwrap();
        touch(
            &foreign.join("data.db"),
            b"SQLite format 3\0 this is someone else's file",
        );
        let (ok, err) = ferry(&[
            "mount".as_ref(),
            "--store".as_ref(),
            foreign.as_os_str(),
            mnt.as_os_str(),
        ]);
        assert!(!ok && !support::is_mounted(&mnt), "foreign store mounted");
        assert_eq!(err.lines().count(), 1, "refusal must be one line: {err:?}");
    }
}

/// The same permission matrix with and without `default_permissions`:
/// without it the kernel leaves every check to ferry itself, so ferry's vfs
/// must give the same answers.
mod permissions {
    use super::*;

    /// Runs the unprivileged checks that matter most on `m`.
    fn matrix(m: &Mount) {
        let (secret, public, dir) = (m.join("secret"), m.join("public"), m.join("private"));
        touch(&secret, b"s");
        sys::chmod(&secret, 0o600).unwrap();
        touch(&public, b"p");
        sys::mkdir(&dir, 0o700).unwrap();
        touch(&dir.join("inner"), b"");
        let nobody = |f: &dyn Fn() -> std::io::Result<()>| as_user(Some(NOBODY), f);
        let read = |p: &Path| sys::open(p, libc::O_RDONLY, 0).map(drop);
        let write = |p: &Path| sys::open(p, libc::O_WRONLY, 0).map(drop);
        assert_eq!(nobody(&|| read(&secret)), Err(libc::EACCES), "read 0600");
        assert_eq!(nobody(&|| read(&public)), Ok(()), "read 0644");
        assert_eq!(nobody(&|| write(&public)), Err(libc::EACCES), "write 0644");
        assert_eq!(
            nobody(&|| fs::read_dir(&dir).map(drop)),
            Err(libc::EACCES),
            "list 0700 dir"
        );
        assert_eq!(
            nobody(&|| fs::metadata(dir.join("inner")).map(drop)),
            Err(libc::EACCES),
            "search 0700 dir"
        );
        let created = m.join("created");
        assert_eq!(
            nobody(&|| write_new(&created)),
            Err(libc::EACCES),
            "create in 0755 dir"
        );
        assert_eq!(
            nobody(&|| fs::remove_file(&public)),
            Err(libc::EACCES),
            "unlink in 0755 dir"
        );
        assert_eq!(
            nobody(&|| sys::mkdir(&m.join("d"), 0o755)),
            Err(libc::EACCES),
            "mkdir in 0755 dir"
        );
        assert_eq!(
            nobody(&|| sys::chmod(&public, 0o666)),
            Err(libc::EPERM),
            "chmod by non-owner"
        );
        assert_eq!(
            nobody(&|| sys::chown(&public, Some(NOBODY.0), None)),
            Err(libc::EPERM),
            "chown"
        );
        assert_eq!(
            nobody(&|| sys::setxattr(&public, "user.x", b"1", 0)),
            Err(libc::EACCES),
            "setxattr"
        );
        let t = Some([sys::ts(1, 0), sys::ts(1, 0)]);
        assert_eq!(
            nobody(&|| sys::utimensat(&public, t, 0)),
            Err(libc::EPERM),
            "utimes by non-owner"
        );
        assert_eq!(
            nobody(&|| sys::truncate(&public, 0)),
            Err(libc::EACCES),
            "truncate 0644"
        );
        // Nothing changed underneath.
        assert_eq!(fs::read(&public).unwrap(), b"p");
        assert!(!created.exists());
        assert_eq!(mode(&public), 0o644);
    }

    fn write_new(p: &Path) -> std::io::Result<()> {
        sys::open(p, libc::O_CREAT | libc::O_WRONLY, 0o644).map(drop)
    }

    #[test]
    fn enforced_with_default_permissions() {
        matrix(&Mount::new());
    }

    #[test]
    fn enforced_by_ferry_without_default_permissions() {
        matrix(&Mount::with(support::Target::from_env(), "allow_other"));
    }
}
