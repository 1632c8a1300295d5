//! Thin wrappers over the syscalls std does not expose, each returning
//! `io::Result` so tests can assert on the exact errno (see `super::errno`).
//! Paths go in as `&Path`; descriptors as `&impl AsRawFd`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `path` as a C string (test paths never contain NUL).
pub fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

/// Turns a `-1`-on-error return into `io::Result`.
fn cvt<T: Copy + PartialOrd + Default>(ret: T) -> io::Result<T> {
    if ret < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `open(path, flags, mode)`—any flags, so tests can pass O_EXCL, O_NOFOLLOW,
/// O_DIRECTORY… exactly.
pub fn open(path: &Path, flags: i32, mode: u32) -> io::Result<File> {
    let p = cstr(path);
    // SAFETY: p is a valid C string; flags/mode are plain integers.
    let fd = cvt(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: fd was just returned by open and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `mknod(path, mode, dev)`—fifos, sockets, device nodes.
pub fn mknod(path: &Path, mode: u32, dev: u64) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: valid C string.
    cvt(unsafe { libc::mknod(p.as_ptr(), mode, dev) }).map(drop)
}

/// `mkfifo(path, mode)`.
pub fn mkfifo(path: &Path, mode: u32) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: valid C string.
    cvt(unsafe { libc::mkfifo(p.as_ptr(), mode) }).map(drop)
}

/// `mkdir(path, mode)` with an explicit mode (std's DirBuilder is wordier).
pub fn mkdir(path: &Path, mode: u32) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: valid C string.
    cvt(unsafe { libc::mkdir(p.as_ptr(), mode) }).map(drop)
}

/// `chmod(path, mode)`, with set-id and sticky bits passed through.
pub fn chmod(path: &Path, mode: u32) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: valid C string.
    cvt(unsafe { libc::chmod(p.as_ptr(), mode) }).map(drop)
}

/// `chown(path, uid, gid)`; `None` leaves that id unchanged (-1).
pub fn chown(path: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: valid C string.
    cvt(unsafe { libc::chown(p.as_ptr(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX)) })
        .map(drop)
}

/// `lchown(path, uid, gid)`: does not follow a final symlink.
pub fn lchown(path: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: valid C string.
    cvt(unsafe { libc::lchown(p.as_ptr(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX)) })
        .map(drop)
}

/// `truncate(path, len)`—takes a signed length so tests can pass negatives.
pub fn truncate(path: &Path, len: i64) -> io::Result<()> {
    let p = cstr(path);
    // SAFETY: valid C string.
    cvt(unsafe { libc::truncate(p.as_ptr(), len) }).map(drop)
}

/// `ftruncate(fd, len)` with a signed length.
pub fn ftruncate(fd: &impl AsRawFd, len: i64) -> io::Result<()> {
    // SAFETY: plain fd syscall.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(drop)
}

/// `renameat2(AT_FDCWD, from, AT_FDCWD, to, flags)`: RENAME_NOREPLACE,
/// RENAME_EXCHANGE.
pub fn renameat2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let (f, t) = (cstr(from), cstr(to));
    // SAFETY: valid C strings.
    cvt(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// A timespec for `utimensat`; `nsec` may be `UTIME_NOW` or `UTIME_OMIT`.
pub fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

/// `utimensat(AT_FDCWD, path, [atime, mtime], flags)`; `times: None` is NULL
/// (both now).
pub fn utimensat(path: &Path, times: Option<[libc::timespec; 2]>, flags: i32) -> io::Result<()> {
    let p = cstr(path);
    let ptr = times.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
    // SAFETY: valid C string; ptr is NULL or points to two timespecs.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), ptr, flags) }).map(drop)
}

fn xname(name: &str) -> CString {
    CString::new(name).expect("xattr name without NUL")
}

/// `setxattr(path, name, value, flags)` (follows symlinks).
pub fn setxattr(path: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (p, n) = (cstr(path), xname(name));
    // SAFETY: valid C strings; value is a live slice of the given length.
    cvt(unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// `lsetxattr(path, name, value, flags)`: on the symlink itself.
pub fn lsetxattr(path: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (p, n) = (cstr(path), xname(name));
    // SAFETY: as setxattr.
    cvt(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// `getxattr(path, name, buf, cap)`: the value, read with a buffer of `cap`
/// bytes (so tests can provoke ERANGE); `cap == 0` is the size query and
/// returns a vector of that many zero bytes.
pub fn getxattr(path: &Path, name: &str, cap: usize) -> io::Result<Vec<u8>> {
    let (p, n) = (cstr(path), xname(name));
    let mut buf = vec![0u8; cap];
    let ptr = if cap == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: valid C strings; ptr is NULL (with size 0) or a buffer of cap bytes.
    let n = cvt(unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), ptr, cap) })? as usize;
    buf.resize(n, 0);
    Ok(buf)
}

/// `listxattr(path, buf, cap)` split into names, read with a buffer of
/// `cap` bytes (so tests can provoke ERANGE); see [`listxattr_size`].
pub fn listxattr(path: &Path, cap: usize) -> io::Result<Vec<String>> {
    let p = cstr(path);
    let mut buf = vec![0u8; cap.max(1)];
    // SAFETY: valid C string and a buffer of at least cap bytes.
    let n = cvt(unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), cap) })? as usize;
    buf.truncate(n);
    Ok(buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

/// `listxattr(path, NULL, 0)`: the size the name list needs.
pub fn listxattr_size(path: &Path) -> io::Result<usize> {
    let p = cstr(path);
    // SAFETY: valid C string; NULL buffer with size 0 is the size query.
    cvt(unsafe { libc::listxattr(p.as_ptr(), std::ptr::null_mut(), 0) }).map(|n| n as usize)
}

/// `removexattr(path, name)`.
pub fn removexattr(path: &Path, name: &str) -> io::Result<()> {
    let (p, n) = (cstr(path), xname(name));
    // SAFETY: valid C strings.
    cvt(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }).map(drop)
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate(fd: &impl AsRawFd, mode: i32, offset: i64, len: i64) -> io::Result<()> {
    // SAFETY: plain fd syscall.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) }).map(drop)
}

/// `copy_file_range(in, &off_in, out, &off_out, len, 0)`: bytes copied.
pub fn copy_file_range(
    fd_in: &impl AsRawFd,
    off_in: i64,
    fd_out: &impl AsRawFd,
    off_out: i64,
    len: usize,
) -> io::Result<usize> {
    let (mut a, mut b) = (off_in, off_out);
    // SAFETY: plain fd syscall with pointers to two live i64 offsets.
    cvt(unsafe {
        libc::copy_file_range(
            fd_in.as_raw_fd(),
            &mut a,
            fd_out.as_raw_fd(),
            &mut b,
            len,
            0,
        )
    })
    .map(|n| n as usize)
}

/// `lseek(fd, offset, whence)` with SEEK_DATA / SEEK_HOLE allowed.
pub fn lseek(fd: &impl AsRawFd, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain fd syscall.
    cvt(unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) })
}

/// `pwrite(fd, buf, offset)` with a signed offset (negatives → EINVAL).
pub fn pwrite(fd: &impl AsRawFd, buf: &[u8], offset: i64) -> io::Result<usize> {
    // SAFETY: buf is a live slice of the given length.
    cvt(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset) })
        .map(|n| n as usize)
}

/// `pread(fd, buf, offset)`: up to `len` bytes at a signed offset.
pub fn pread(fd: &impl AsRawFd, len: usize, offset: i64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    // SAFETY: buf is a live buffer of len bytes.
    let n = cvt(unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len, offset) })?;
    buf.truncate(n as usize);
    Ok(buf)
}

/// `flock(fd, op)`.
pub fn flock(fd: &impl AsRawFd, op: i32) -> io::Result<()> {
    // SAFETY: plain fd syscall.
    cvt(unsafe { libc::flock(fd.as_raw_fd(), op) }).map(drop)
}

/// `fcntl(fd, cmd, &flock{type, SEEK_SET, start, len})`; returns the struct
/// as the kernel left it (F_GETLK fills in the conflicting lock).
pub fn fcntl_lock(
    fd: &impl AsRawFd,
    cmd: i32,
    ltype: i32,
    start: i64,
    len: i64,
) -> io::Result<libc::flock> {
    // SAFETY: flock is plain old data; zero is a valid bit pattern.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ltype as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    // SAFETY: fd syscall with a pointer to a live flock struct.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), cmd, &mut fl) })?;
    Ok(fl)
}

/// `statfs(path)`.
pub fn statfs(path: &Path) -> io::Result<libc::statfs> {
    let p = cstr(path);
    // SAFETY: statfs is plain old data; the kernel fills it in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    cvt(unsafe { libc::statfs(p.as_ptr(), &mut st) })?;
    Ok(st)
}

/// A `MAP_SHARED` mapping, unmapped on drop.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    /// `mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_SHARED, fd, offset)`.
    pub fn shared(fd: &impl AsRawFd, len: usize, offset: i64) -> io::Result<Mapping> {
        // SAFETY: asks the kernel for a fresh mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The mapped bytes. Callers keep accesses inside the file's size
    /// (beyond EOF is SIGBUS).
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr/len describe a live mapping owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// `msync(MS_SYNC)` over the whole mapping.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: ptr/len describe a live mapping.
        cvt(unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) }).map(drop)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mmap gave us.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
