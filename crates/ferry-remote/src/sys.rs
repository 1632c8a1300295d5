//! Thin wrappers over the system calls ferry-remote makes in *this* process.
//!
//! This is the only module allowed to use `unsafe`. Each function wraps one
//! system call (or the one libc function that issues it), links its manual
//! page, and returns `io::Result`, with owned fds where the call creates one.
//! Everything above this module is safe code that sequences these calls.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::mem::{size_of, zeroed, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Thread or process id, as the kernel numbers it in our pid namespace.
pub type Pid = libc::pid_t;

/// The general-purpose registers of an x86-64 thread, as `PTRACE_GETREGS` returns them.
pub type Registers = libc::user_regs_struct;

/// Register sets for `PTRACE_GETREGSET`/`SETREGSET`, from `<elf.h>`.
pub mod regset {
    /// The XSAVE area (x87, SSE, AVX, AVX-512, ...), on every CPU with XSAVE.
    pub const NT_X86_XSTATE: libc::c_int = 0x202;
    /// The legacy 512-byte FXSAVE area (x87 + SSE), for CPUs without XSAVE.
    pub const NT_PRFPREG: libc::c_int = libc::NT_PRFPREG;
}

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `ptrace(PTRACE_SEIZE, tid, 0, options)`—Attaches to a thread without stopping it.
///
/// # References
/// - [ptrace(2)](https://man7.org/linux/man-pages/man2/ptrace.2.html)
pub fn ptrace_seize(tid: Pid, options: libc::c_int) -> io::Result<()> {
    // SAFETY: PTRACE_SEIZE reads no memory; options is passed by value in `data`.
    check(unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0usize, options as usize) }).map(drop)
}

/// `ptrace(PTRACE_INTERRUPT, tid, 0, 0)`—Asks a seized thread to stop.
///
/// # References
/// - [ptrace(2)](https://man7.org/linux/man-pages/man2/ptrace.2.html)
pub fn ptrace_interrupt(tid: Pid) -> io::Result<()> {
    // SAFETY: no memory is passed.
    check(unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0usize, 0usize) }).map(drop)
}

/// `ptrace(PTRACE_GETREGS, tid, 0, &regs)`—Reads the general-purpose registers of a stopped thread.
///
/// # References
/// - [ptrace(2)](https://man7.org/linux/man-pages/man2/ptrace.2.html)
pub fn ptrace_getregs(tid: Pid) -> io::Result<Registers> {
    let mut regs = MaybeUninit::<Registers>::uninit();
    // SAFETY: the kernel writes exactly one user_regs_struct into `regs`.
    check(unsafe { libc::ptrace(libc::PTRACE_GETREGS, tid, 0usize, regs.as_mut_ptr()) })?;
    // SAFETY: the call succeeded, so the kernel filled the whole struct.
    Ok(unsafe { regs.assume_init() })
}

/// `ptrace(PTRACE_SETREGS, tid, 0, &regs)`—Writes the general-purpose registers of a stopped thread.
///
/// # References
/// - [ptrace(2)](https://man7.org/linux/man-pages/man2/ptrace.2.html)
pub fn ptrace_setregs(tid: Pid, regs: &Registers) -> io::Result<()> {
    // SAFETY: the kernel only reads one user_regs_struct from `regs`.
    check(unsafe { libc::ptrace(libc::PTRACE_SETREGS, tid, 0usize, regs as *const Registers) })
        .map(drop)
}

/// `ptrace(PTRACE_GETREGSET, tid, nt, &iov)`—Reads one register set (see [`regset`]).
///
/// Returns how many bytes of `buf` the kernel filled.
///
/// # References
/// - [ptrace(2)](https://man7.org/linux/man-pages/man2/ptrace.2.html)
pub fn ptrace_getregset(tid: Pid, nt: libc::c_int, buf: &mut [u8]) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: the kernel writes at most iov_len bytes into buf and updates iov_len.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid,
            nt as usize,
            &mut iov as *mut libc::iovec,
        )
    })?;
    Ok(iov.iov_len)
}

/// `ptrace(PTRACE_SETREGSET, tid, nt, &iov)`—Writes one register set (see [`regset`]).
///
/// For `NT_X86_XSTATE` the kernel accepts only a buffer of exactly the size
/// it returned (anything else is `EFAULT`, which is what breaks gdb 13's
/// inferior calls on recent kernels), so pass back what `getregset` filled.
///
/// # References
/// - [ptrace(2)](https://man7.org/linux/man-pages/man2/ptrace.2.html)
pub fn ptrace_setregset(tid: Pid, nt: libc::c_int, buf: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the kernel only reads iov_len bytes from buf.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid,
            nt as usize,
            &mut iov as *mut libc::iovec,
        )
    })
    .map(drop)
}

/// `ptrace(PTRACE_GETSIGMASK, tid, 8, &mask)`—Reads a stopped thread's blocked-signal mask.
///
/// # References
/// - [ptrace(2)](https://man7.org/linux/man-pages/man2/ptrace.2.html)
pub fn ptrace_getsigmask(tid: Pid) -> io::Result<u64> {
    let mut mask = 0u64;
    // SAFETY: the kernel writes size_of::<u64>() bytes (the kernel sigset) into mask.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_GETSIGMASK,
            tid,
            size_of::<u64>(),
            &mut mask as *mut u64,
        )
    })?;
    Ok(mask)
}

/// `ptrace(PTRACE_SETSIGMASK, tid, 8, &mask)`—Writes a stopped thread's blocked-signal mask.
///
/// # References
/// - [ptrace(2)](https://man7.org/linux/man-pages/man2/ptrace.2.html)
pub fn ptrace_setsigmask(tid: Pid, mask: u64) -> io::Result<()> {
    // SAFETY: the kernel reads size_of::<u64>() bytes from mask.
    check(unsafe {
        libc::ptrace(
            libc::PTRACE_SETSIGMASK,
            tid,
            size_of::<u64>(),
            &mask as *const u64,
        )
    })
    .map(drop)
}

/// `ptrace(PTRACE_GETSIGINFO, tid, 0, &info)`—Reads the siginfo of the signal that stopped a thread.
///
/// # References
/// - [ptrace(2)](https://man7.org/linux/man-pages/man2/ptrace.2.html)
pub fn ptrace_getsiginfo(tid: Pid) -> io::Result<libc::siginfo_t> {
    // SAFETY: siginfo_t is plain data for which all-zero is valid.
    let mut info: libc::siginfo_t = unsafe { zeroed() };
    // SAFETY: the kernel writes one siginfo_t into info.
    check(unsafe { libc::ptrace(libc::PTRACE_GETSIGINFO, tid, 0usize, &mut info as *mut _) })?;
    Ok(info)
}

/// `ptrace(PTRACE_SETSIGINFO, tid, 0, &info)`—Replaces the siginfo of the signal a thread is stopped for.
///
/// # References
/// - [ptrace(2)](https://man7.org/linux/man-pages/man2/ptrace.2.html)
pub fn ptrace_setsiginfo(tid: Pid, info: &libc::siginfo_t) -> io::Result<()> {
    // SAFETY: the kernel reads one siginfo_t from info.
    check(unsafe { libc::ptrace(libc::PTRACE_SETSIGINFO, tid, 0usize, info as *const _) }).map(drop)
}

/// `ptrace(PTRACE_SINGLESTEP, tid, 0, sig)`—Resumes a stopped thread for one instruction.
///
/// # References
/// - [ptrace(2)](https://man7.org/linux/man-pages/man2/ptrace.2.html)
pub fn ptrace_singlestep(tid: Pid, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: no memory is passed; sig travels by value in `data`.
    check(unsafe { libc::ptrace(libc::PTRACE_SINGLESTEP, tid, 0usize, sig as usize) }).map(drop)
}

/// `ptrace(PTRACE_CONT, tid, 0, sig)`—Resumes a stopped thread, delivering `sig` if nonzero.
///
/// # References
/// - [ptrace(2)](https://man7.org/linux/man-pages/man2/ptrace.2.html)
pub fn ptrace_cont(tid: Pid, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: no memory is passed; sig travels by value in `data`.
    check(unsafe { libc::ptrace(libc::PTRACE_CONT, tid, 0usize, sig as usize) }).map(drop)
}

/// `ptrace(PTRACE_DETACH, tid, 0, sig)`—Detaches from a stopped thread and resumes it.
///
/// # References
/// - [ptrace(2)](https://man7.org/linux/man-pages/man2/ptrace.2.html)
pub fn ptrace_detach(tid: Pid, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: no memory is passed; sig travels by value in `data`.
    check(unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0usize, sig as usize) }).map(drop)
}

/// `waitpid(tid, &status, __WALL)`—Waits for a state change of a traced thread.
///
/// Retries on `EINTR`, since a caller never wants a signal to cut a ptrace
/// conversation short.
///
/// # References
/// - [waitpid(2)](https://man7.org/linux/man-pages/man2/waitpid.2.html)
pub fn waitpid_thread(tid: Pid) -> io::Result<libc::c_int> {
    loop {
        let mut status = 0;
        // SAFETY: the kernel writes one int into status.
        let ret = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        if ret != -1 {
            return Ok(status);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `process_vm_readv(pid, [buf], [addr])`—Copies memory out of another process.
///
/// # References
/// - [process_vm_readv(2)](https://man7.org/linux/man-pages/man2/process_vm_readv.2.html)
pub fn process_vm_readv(pid: Pid, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the kernel writes at most buf.len() bytes into buf; the remote
    // address is only dereferenced in the other process, and checked there.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    check(n as libc::c_long).map(|n| n as usize)
}

/// `process_vm_writev(pid, [data], [addr])`—Copies memory into another process.
///
/// # References
/// - [process_vm_writev(2)](https://man7.org/linux/man-pages/man2/process_vm_writev.2.html)
pub fn process_vm_writev(pid: Pid, addr: u64, data: &[u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: the kernel only reads data; the remote address is checked in the other process.
    let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
    check(n as libc::c_long).map(|n| n as usize)
}

/// `pidfd_open(pid, 0)`—Gets a file descriptor that refers to a process.
///
/// # References
/// - [pidfd_open(2)](https://man7.org/linux/man-pages/man2/pidfd_open.2.html)
pub fn pidfd_open(pid: Pid) -> io::Result<OwnedFd> {
    // SAFETY: no memory is passed.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_getfd(pidfd, fd, 0)`—Duplicates a file descriptor out of another process.
///
/// # References
/// - [pidfd_getfd(2)](https://man7.org/linux/man-pages/man2/pidfd_getfd.2.html)
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target_fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: no memory is passed.
    let fd =
        check(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) })?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `memfd_create(name, MFD_CLOEXEC)`—Creates an anonymous file to share memory through.
///
/// # References
/// - [memfd_create(2)](https://man7.org/linux/man-pages/man2/memfd_create.2.html)
pub fn memfd_create(name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: name is a valid NUL-terminated string for the duration of the call.
    let fd =
        check(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) } as libc::c_long)?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `mmap(0, len, prot, MAP_SHARED, fd, 0)`—Maps a file shared into this process.
///
/// Returns the address; the caller owns the mapping and must [`munmap`] it.
///
/// # References
/// - [mmap(2)](https://man7.org/linux/man-pages/man2/mmap.2.html)
pub fn mmap_shared(fd: BorrowedFd<'_>, len: usize, prot: libc::c_int) -> io::Result<usize> {
    // SAFETY: with a null hint and no MAP_FIXED the kernel picks an address
    // that overlaps nothing, so no existing Rust object is affected.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(addr as usize)
}

/// `munmap(addr, len)`—Removes a mapping this crate created with [`mmap_shared`].
///
/// # References
/// - [munmap(2)](https://man7.org/linux/man-pages/man2/munmap.2.html)
pub fn munmap(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: callers pass only mappings obtained from mmap_shared, which no
    // Rust reference points into.
    check(unsafe { libc::munmap(addr as *mut libc::c_void, len) } as libc::c_long).map(drop)
}

/// `syscall(nr, a0..a5)`—Runs one memory-management system call in this process, for the agent.
///
/// Only the agent calls this, and only with the numbers it allows (mmap,
/// munmap, mprotect, madvise); it answers requests from a peer that could
/// equally have injected them.
///
/// # References
/// - [syscall(2)](https://man7.org/linux/man-pages/man2/syscall.2.html)
pub fn memory_syscall(nr: i64, args: [u64; 6]) -> io::Result<u64> {
    debug_assert!([
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_madvise
    ]
    .contains(&nr));
    // SAFETY: these calls change this process's address space as the
    // requester asked; like a debugger's, such a request can unmap memory Rust
    // code uses, which is the contract the agent's owner accepted by starting it.
    let ret = unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) };
    check(ret).map(|v| v as u64)
}

/// `tgkill(tgid, tid, sig)`—Sends a signal to one thread.
///
/// # References
/// - [tgkill(2)](https://man7.org/linux/man-pages/man2/tgkill.2.html)
pub fn tgkill(tgid: Pid, tid: Pid, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: no memory is passed.
    check(unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, sig) }).map(drop)
}

/// `sendmsg(fd, data, SCM_RIGHTS[fd])`—Sends bytes and, optionally, one file descriptor.
///
/// # References
/// - [sendmsg(2)](https://man7.org/linux/man-pages/man2/sendmsg.2.html), [unix(7)](https://man7.org/linux/man-pages/man7/unix.7.html)
pub fn send_with_fd(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cmsg_buf = [0u64; 4]; // CMSG_SPACE(sizeof(int)) = 24 bytes, u64-aligned
                                  // SAFETY: msghdr is plain data for which all-zero is valid.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = cmsg_buf.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure size computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) } as usize;
        // SAFETY: msg_control points at a buffer of msg_controllen bytes, so
        // CMSG_FIRSTHDR returns a header inside it, and CMSG_DATA has room for one int.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as usize;
            libc::CMSG_DATA(cmsg)
                .cast::<RawFd>()
                .write_unaligned(fd.as_raw_fd());
        }
    }
    // SAFETY: msg and everything it points to live across the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    check(n as libc::c_long).map(|n| n as usize)
}

/// `recvmsg(fd, buf, SCM_RIGHTS)`—Receives bytes and at most one file descriptor (close-on-exec).
///
/// # References
/// - [recvmsg(2)](https://man7.org/linux/man-pages/man2/recvmsg.2.html), [unix(7)](https://man7.org/linux/man-pages/man7/unix.7.html)
pub fn recv_with_fd(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cmsg_buf = [0u64; 4];
    // SAFETY: msghdr is plain data for which all-zero is valid.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 4]>();
    // SAFETY: msg and its buffers live across the call; the kernel writes
    // within iov_len and msg_controllen.
    let n = check(
        unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) }
            as libc::c_long,
    )?;
    let mut received = None;
    // SAFETY: the kernel filled msg_control with well-formed headers up to
    // msg_controllen; CMSG_FIRSTHDR/NXTHDR stay inside it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let fd = libc::CMSG_DATA(cmsg).cast::<RawFd>().read_unaligned();
                // The kernel installed this fd for us; we are its only owner.
                received = Some(OwnedFd::from_raw_fd(fd));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, received))
}

/// `getsockopt(fd, SOL_SOCKET, SO_PEERCRED)`—The pid, uid and gid of a unix socket's peer.
///
/// # References
/// - [unix(7)](https://man7.org/linux/man-pages/man7/unix.7.html)
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the kernel writes at most len bytes into cred.
    check(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    } as libc::c_long)?;
    Ok(cred)
}

/// `geteuid()`—This process's effective user id.
///
/// # References
/// - [geteuid(2)](https://man7.org/linux/man-pages/man2/geteuid.2.html)
pub fn geteuid() -> libc::uid_t {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// `getcpu(&cpu, NULL)`—The CPU the calling thread is running on.
///
/// # References
/// - [getcpu(2)](https://man7.org/linux/man-pages/man2/getcpu.2.html)
pub fn current_cpu() -> io::Result<u32> {
    let mut cpu: libc::c_uint = 0;
    // SAFETY: the kernel writes one unsigned int into cpu; node is not requested.
    check(unsafe {
        libc::syscall(
            libc::SYS_getcpu,
            &mut cpu as *mut libc::c_uint,
            0usize,
            0usize,
        )
    })?;
    Ok(cpu)
}

/// `sched_setaffinity(0, {cpu})`—Pins the calling thread to one CPU.
///
/// # References
/// - [sched_setaffinity(2)](https://man7.org/linux/man-pages/man2/sched_setaffinity.2.html)
pub fn pin_to_cpu(cpu: u32) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data for which all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { zeroed() };
    if cpu as usize >= libc::CPU_SETSIZE as usize {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    // SAFETY: cpu was checked to be below CPU_SETSIZE, so the bit is inside set.
    unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    // SAFETY: set is a valid cpu_set_t of the size passed.
    check(unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) } as libc::c_long)
        .map(drop)
}
