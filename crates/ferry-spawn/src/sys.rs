//! Parent-side system calls, one thin wrapper each.
//!
//! This is the only module (besides the after-clone routine in `child`) that
//! may use `unsafe`. Each function wraps one system call, links its man page
//! and returns `io::Result`, with owned fds where the kernel hands one out.

#![allow(unsafe_code)]

use std::ffi::{c_void, CStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::ptr;

/// Turns a `-1`-on-error return into `io::Result`.
fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Takes ownership of an fd the kernel just returned.
fn owned(ret: libc::c_long) -> io::Result<OwnedFd> {
    let fd = cvt(ret)? as RawFd;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pipe2(fds, O_CLOEXEC)`—Creates a pipe, returning `(read end, write end)`.
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/pipe.2.html)
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid two-int buffer.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }.into())?;
    // SAFETY: pipe2 succeeded, so both fds are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds)`—A connected
/// pair of message sockets; message boundaries carry one request each.
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/socketpair.2.html)
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid two-int buffer.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    }
    .into())?;
    // SAFETY: socketpair succeeded, so both fds are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `open(path, flags | O_CLOEXEC)`—Opens a file.
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/open.2.html)
pub fn open(path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `path` is NUL-terminated.
    owned(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) }.into())
}

/// `fcntl(fd, F_GETFD)`—Whether `fd` is open in this process.
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/fcntl.2.html)
pub fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the fd table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// The signal set with every signal in it, in the kernel's 64-bit layout.
pub const ALL_SIGNALS: u64 = !0;

/// `rt_sigprocmask(SIG_SETMASK, mask, old, 8)`—Sets this thread's signal
/// mask, returning the previous one.
///
/// Raw, because glibc's wrapper refuses to block its two internal signals,
/// and the spawn path must block every signal around `clone`.
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/sigprocmask.2.html)
pub fn set_signal_mask(mask: u64) -> io::Result<u64> {
    let mut old: u64 = 0;
    // SAFETY: both pointers are valid 8-byte sets, matching sigsetsize 8.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &mask as *const u64,
            &mut old as *mut u64,
            8,
        )
    })?;
    Ok(old)
}

/// An anonymous private mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: *mut c_void,
    len: usize,
}

impl Mapping {
    /// `mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK | MAP_NORESERVE, -1, 0)`.
    ///
    /// # References
    /// - [Linux](https://man7.org/linux/man-pages/man2/mmap.2.html)
    pub fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh anonymous mapping aliases nothing.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { addr, len })
    }

    /// `mprotect(addr, len, PROT_NONE)` on the first `len` bytes: a guard
    /// page, so an overflowing stack faults instead of writing over memory.
    ///
    /// # References
    /// - [Linux](https://man7.org/linux/man-pages/man2/mprotect.2.html)
    pub fn protect_head(&self, len: usize) -> io::Result<()> {
        assert!(len <= self.len);
        // SAFETY: the range lies inside our own mapping, which nothing else uses.
        cvt(unsafe { libc::mprotect(self.addr, len, libc::PROT_NONE) }.into()).map(drop)
    }

    /// First byte of the mapping.
    pub fn addr(&self) -> usize {
        self.addr as usize
    }
}

impl Drop for Mapping {
    /// `munmap(addr, len)`.
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nobody uses it any more.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// The page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf only reads.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// `CLONE_INTO_CGROUP` (Linux 5.7), which libc types too narrowly for the
/// 64-bit flags of `clone3`.
pub const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` of `clone3(2)`, version 2 (with `cgroup`).
#[repr(C, align(8))]
#[derive(Default)]
pub struct CloneArgs {
    /// `CLONE_*` flags.
    pub flags: u64,
    /// Where the kernel stores the pidfd (`CLONE_PIDFD`).
    pub pidfd: u64,
    /// Unused (`CLONE_CHILD_SETTID`).
    pub child_tid: u64,
    /// Unused (`CLONE_PARENT_SETTID`).
    pub parent_tid: u64,
    /// Signal sent to the parent when the child exits.
    pub exit_signal: u64,
    /// Lowest address of the child's stack.
    pub stack: u64,
    /// Size of the child's stack.
    pub stack_size: u64,
    /// Unused (`CLONE_SETTLS`).
    pub tls: u64,
    /// Unused.
    pub set_tid: u64,
    /// Unused.
    pub set_tid_size: u64,
    /// Cgroup directory fd (`CLONE_INTO_CGROUP`).
    pub cgroup: u64,
}

/// `clone3(args, sizeof args)` with `CLONE_PIDFD`—Creates a process that
/// starts by calling `entry(arg)` on the stack described in `args`, and
/// never returns there.
///
/// Returns the child's pid and pidfd in the parent. A libc wrapper cannot do this:
/// the child wakes up on a new, empty stack, so the code right after the
/// `syscall` instruction must jump to `entry` without returning anywhere.
///
/// # Safety
/// `args.stack`/`args.stack_size` must describe a writable stack that no
/// one else uses until the child has exec'd or exited. With `CLONE_VM`,
/// `entry` runs in this address space and must only make raw system calls,
/// allocate nothing, and end in `execve` or `exit`; `arg` must stay valid
/// until then (true with `CLONE_VFORK`, which suspends this thread).
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/clone3.2.html)
pub unsafe fn clone3(
    args: &mut CloneArgs,
    entry: extern "C" fn(*mut c_void) -> !,
    arg: *mut c_void,
) -> io::Result<(u32, OwnedFd)> {
    let mut pidfd: RawFd = -1;
    args.flags |= libc::CLONE_PIDFD as u64;
    args.pidfd = &mut pidfd as *mut RawFd as u64;
    let ret: isize;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller upholds the contract above. In the child (rax == 0)
    // the kernel already switched rsp to the new stack; we align it, clear
    // the frame pointer so unwinders stop, and call `entry`, which never
    // returns (ud2 traps if it did). r12/r13 survive `syscall`.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "and rsp, -16",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 as isize => ret,
            in("rdi") args as *mut CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: as above; on arm64 `svc` preserves every register but x0, and
    // the kernel already set sp to the top of the new stack.
    unsafe {
        std::arch::asm!(
            "svc 0",
            "cbnz x0, 2f",
            "mov x29, xzr",
            "mov x30, xzr",
            "mov x0, x9",
            "blr x10",
            "brk 1",
            "2:",
            inlateout("x0") args as *mut CloneArgs => ret,
            in("x1") std::mem::size_of::<CloneArgs>(),
            in("x8") libc::SYS_clone3,
            in("x9") arg,
            in("x10") entry,
            options(nostack),
        );
    }
    if ret < 0 {
        return Err(io::Error::from_raw_os_error(-ret as i32));
    }
    // SAFETY: with CLONE_PIDFD a successful clone3 stored a fresh fd there.
    Ok((ret as u32, unsafe { OwnedFd::from_raw_fd(pidfd) }))
}

/// Turns the `siginfo_t` of a `waitid` into the status `wait(2)` would give.
fn exit_status(info: &libc::siginfo_t) -> ExitStatus {
    // SAFETY: waitid filled a CLD_* siginfo, whose status field is valid.
    let status = unsafe { info.si_status() };
    ExitStatus::from_raw(match info.si_code {
        libc::CLD_EXITED => (status & 0xff) << 8,
        libc::CLD_DUMPED => status | 0x80,
        _ => status,
    })
}

/// `waitid(P_PIDFD, pidfd, &info, WEXITED | flags)`—Reaps the process
/// behind `pidfd`; `Ok(None)` if `WNOHANG` was given and it still runs.
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/waitid.2.html)
pub fn waitid(pidfd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
    loop {
        // SAFETY: an all-zero siginfo_t is valid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid siginfo_t to fill.
        let ret = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | flags,
            )
        };
        match cvt(ret.into()) {
            // SAFETY: waitid succeeded, so si_pid is valid (0: nothing yet).
            Ok(_) if unsafe { info.si_pid() } == 0 => return Ok(None),
            Ok(_) => return Ok(Some(exit_status(&info))),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`—Signals the process behind a
/// pidfd, which cannot be a recycled pid.
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/pidfd_send_signal.2.html)
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: a null siginfo is allowed and means "as kill(2)".
    cvt(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            ptr::null::<c_void>(),
            0,
        )
    })
    .map(drop)
}

/// `poll([{fd, POLLIN}], 1, timeout_ms)`—Whether `fd` became readable in
/// time (a pidfd does when its process exits). `-1` waits forever.
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/poll.2.html)
pub fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: libc::c_int) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd.
    cvt(unsafe { libc::poll(&mut pfd, 1, timeout_ms) }.into()).map(|n| n > 0)
}

/// Most fds one message carries; matches the kernel's `SCM_MAX_FD` (253).
pub const MAX_FDS: usize = 253;

/// `sendmsg(sock, {bytes, SCM_RIGHTS fds}, MSG_NOSIGNAL)`—Sends one message
/// with fds attached; a dead peer gives `EPIPE`, not `SIGPIPE`.
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/sendmsg.2.html),
///   [unix(7)](https://man7.org/linux/man-pages/man7/unix.7.html)
pub fn send_with_fds(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::from_raw_os_error(libc::ETOOMANYREFS));
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut c_void,
        iov_len: bytes.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE is arithmetic.
    let mut control = vec![0u8; unsafe { libc::CMSG_SPACE(fd_bytes) } as usize];
    // SAFETY: an all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        // SAFETY: `control` has room for one header plus `fds`, as sized above.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes) as usize;
            ptr::copy_nonoverlapping(
                fds.as_ptr(),
                libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                fds.len(),
            );
        }
    }
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let sent =
        cvt(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) } as libc::c_long)?;
    if sent as usize != bytes.len() {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    Ok(())
}

/// `recvmsg(sock, {buf, SCM_RIGHTS}, MSG_CMSG_CLOEXEC)`—Receives one
/// message and the fds attached to it; `Ok((0, []))` means the peer is gone.
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/recvmsg.2.html),
///   [unix(7)](https://man7.org/linux/man-pages/man7/unix.7.html)
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: CMSG_SPACE is arithmetic.
    let mut control = vec![0u8; unsafe { libc::CMSG_SPACE((MAX_FDS * 4) as u32) } as usize];
    // SAFETY: an all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    let len = loop {
        // SAFETY: `msg` points at live buffers for the duration of the call.
        match cvt(
            unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) }
                as libc::c_long,
        ) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other? as usize,
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` with well-formed headers; every
    // SCM_RIGHTS payload is an array of fresh fds that now belong to us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let n = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..n {
                    fds.push(OwnedFd::from_raw_fd(ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    Ok((len, fds))
}

/// `getpid()`.
pub fn getpid() -> i32 {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

/// `getppid()`.
pub fn getppid() -> i32 {
    // SAFETY: getppid cannot fail.
    unsafe { libc::getppid() }
}

/// `geteuid()`.
pub fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Takes ownership of `fd`, an fd this process was started with, after
/// checking it is open (`fcntl(F_GETFD)`).
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/fcntl.2.html)
pub fn inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only reads the fd table.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) }.into())?;
    // SAFETY: the fd is open, and was handed to this process for it to own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A `sockaddr_un` for `path`, or `ENAMETOOLONG`.
fn unix_addr(path: &CStr) -> io::Result<libc::sockaddr_un> {
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.to_bytes_with_nul();
    if bytes.len() > addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(addr)
}

/// `socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0)`—A message socket.
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/socket.2.html)
fn seqpacket_socket() -> io::Result<OwnedFd> {
    // SAFETY: no pointers.
    owned(
        unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) }.into(),
    )
}

/// `bind(sock, path)` then `listen(sock, 128)`—A listening message socket
/// at `path`.
///
/// # References
/// - [bind](https://man7.org/linux/man-pages/man2/bind.2.html),
///   [listen](https://man7.org/linux/man-pages/man2/listen.2.html)
pub fn listen(path: &CStr) -> io::Result<OwnedFd> {
    let sock = seqpacket_socket()?;
    let addr = unix_addr(path)?;
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    cvt(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    }
    .into())?;
    // SAFETY: no pointers.
    cvt(unsafe { libc::listen(sock.as_raw_fd(), 128) }.into())?;
    Ok(sock)
}

/// `accept4(sock, NULL, NULL, SOCK_CLOEXEC)`—The next connection.
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/accept.2.html)
pub fn accept(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed.
    owned(
        unsafe {
            libc::accept4(
                sock.as_raw_fd(),
                ptr::null_mut(),
                ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        }
        .into(),
    )
}

/// `connect(sock, path)` on a new message socket.
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/connect.2.html)
pub fn connect(path: &CStr) -> io::Result<OwnedFd> {
    let sock = seqpacket_socket()?;
    let addr = unix_addr(path)?;
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    cvt(unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    }
    .into())?;
    Ok(sock)
}

/// `waitpid(-1, &status, 0)`—Reaps any child; `Ok(false)` if there is none.
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/waitpid.2.html)
pub fn reap_any() -> io::Result<bool> {
    let mut status = 0;
    // SAFETY: `status` is a valid int.
    match cvt(unsafe { libc::waitpid(-1, &mut status, 0) }.into()) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
        Err(e) => Err(e),
    }
}

/// `struct pidfd_info`, version 0 (64 bytes), of `PIDFD_GET_INFO`.
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    ids: [u32; 11],
    exit_code: i32,
}

/// `PIDFD_INFO_EXIT`: ask for (and learn of) the exit status.
const PIDFD_INFO_EXIT: u64 = 1 << 3;

/// `PIDFD_GET_INFO`: `_IOWR(0xFF, 11, struct pidfd_info)` at 64 bytes.
const PIDFD_GET_INFO: libc::c_ulong = 0xC040_FF0B;

/// `ioctl(pidfd, PIDFD_GET_INFO, {PIDFD_INFO_EXIT})`—The exit status of a
/// process that is not our child, once its parent has reaped it
/// (Linux 6.15); `Ok(None)` before that.
///
/// # References
/// - [Linux](https://man7.org/linux/man-pages/man2/ioctl_pidfd.2.html)
pub fn pidfd_exit_status(pidfd: BorrowedFd<'_>) -> io::Result<Option<ExitStatus>> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..Default::default()
    };
    // SAFETY: `info` is a 64-byte pidfd_info, as the command encodes.
    match cvt(unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO, &mut info) }.into()) {
        Ok(_) if info.mask & PIDFD_INFO_EXIT != 0 => Ok(Some(ExitStatus::from_raw(info.exit_code))),
        Ok(_) => Ok(None),
        // Still running: the kernel has no info to give about a live task's exit.
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
        Err(e) => Err(e),
    }
}
