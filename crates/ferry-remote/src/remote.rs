//! Running system calls inside a stopped thread, without writing code.
//!
//! A `syscall` instruction (`0f 05`) already exists in every x86-64
//! process: the vDSO's fallback paths contain one, and libc's text has
//! hundreds. [`find_syscall_instruction`] reads the target's maps, copies the
//! vDSO (or else libc's executable text) out with `process_vm_readv`, and
//! finds the byte pair; any `0f 05` decodes as `syscall` when `rip` points at
//! it, whatever instruction it was part of. Injection then only sets
//! registers: `rip` to that address, `rax` to the number, arguments in `rdi,
//! rsi, rdx, r10, r8, r9`, `orig_rax = -1` (see [`crate::stop`] for why),
//! and single-steps once. The result is in `rax`.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use crate::error::{Error, Result};
use crate::maps;
use crate::mem;
use crate::stop::Stopped;
use crate::sys::{self, Pid};

/// The x86-64 `syscall` instruction.
const SYSCALL_INSN: [u8; 2] = [0x0f, 0x05];

/// The System V ABI lets leaf code use 128 bytes below `rsp`; scratch data
/// goes below that, where the kernel itself would build a signal frame.
const RED_ZONE: u64 = 128;

/// Finds a `syscall` instruction in the vDSO, else in libc's text, else in any executable text.
pub fn find_syscall_instruction(pid: Pid) -> Result<u64> {
    let mappings = maps::read(pid)?;
    let vdso = mappings.iter().filter(|m| m.path == "[vdso]");
    let text = |m: &&maps::Mapping| m.perms.starts_with("r-x") && m.path.starts_with('/');
    let libc_text = mappings
        .iter()
        .filter(|m| text(m) && m.path.contains("libc"));
    // A static binary, or a kernel booted with vdso=0: any executable file text.
    let any_text = mappings.iter().filter(text);
    for m in vdso.chain(libc_text).chain(any_text) {
        let Ok(text) = mem::read_vec(pid, m.start, (m.end - m.start) as usize) else {
            continue;
        };
        if let Some(offset) = text.windows(2).position(|w| w == SYSCALL_INSN) {
            return Ok(m.start + offset as u64);
        }
    }
    Err(Error::NoSyscallInstruction { pid })
}

/// A file descriptor in the target's table, which [`Stopped::close`] closes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteFd(pub i32);

impl Stopped<'_> {
    /// Runs system call `nr` with `args` in the stopped thread and returns its result.
    ///
    /// A result in -4095..=-1 becomes [`Error::RemoteSyscall`] with the errno.
    /// The thread's own registers are restored when the guard is released,
    /// not after each call, so calls can be chained cheaply.
    pub fn syscall(&mut self, nr: i64, args: [u64; 6]) -> Result<u64> {
        let tid = self.target.tid();
        let insn = self.target.syscall_instruction();
        let mut regs = self.saved_registers();
        regs.rip = insn;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX; // "not in a system call": no restart logic on our registers
        [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9] = args;
        sys::ptrace_setregs(tid, &regs).map_err(Error::ptrace(tid, "PTRACE_SETREGS"))?;
        self.set_at_signal_stop(false);
        loop {
            sys::ptrace_singlestep(tid, 0).map_err(Error::ptrace(tid, "PTRACE_SINGLESTEP"))?;
            let status = self.wait()?;
            if status >> 16 != 0 {
                continue; // a group-stop or interrupt: not a signal, nothing to keep
            }
            // A signal-delivery-stop: ours (the kernel's single-step SIGTRAP
            // after the syscall) or a signal that got past the mask.
            let info =
                sys::ptrace_getsiginfo(tid).map_err(Error::ptrace(tid, "PTRACE_GETSIGINFO"))?;
            self.set_at_signal_stop(true);
            if info.si_signo == libc::SIGTRAP && info.si_code > 0 {
                let after =
                    sys::ptrace_getregs(tid).map_err(Error::ptrace(tid, "PTRACE_GETREGS"))?;
                if after.rip == insn + SYSCALL_INSN.len() as u64 {
                    let ret = after.rax as i64;
                    return match ret {
                        -4095..=-1 => Err(Error::remote(self.target.pid(), nr, -ret as i32)),
                        _ => Ok(ret as u64),
                    };
                }
            }
            // Suppressed now (resumed with signal 0), handed back at detach.
            self.defer_signal(info);
        }
    }

    /// Copies `data` into the thread's stack below the red zone and returns its address.
    ///
    /// That memory is free for the kernel's own signal frames at any moment,
    /// so no code may rely on it and nothing needs restoring.
    pub fn write_scratch(&mut self, data: &[u8]) -> Result<u64> {
        let addr = (self.registers().rsp - RED_ZONE - data.len() as u64) & !15;
        mem::write(self.target.pid(), addr, data)?;
        Ok(addr)
    }

    /// Closes a descriptor in the target.
    pub fn close(&mut self, fd: RemoteFd) -> Result<()> {
        self.syscall(libc::SYS_close, [fd.0 as u64, 0, 0, 0, 0, 0])
            .map(drop)
    }

    /// Gives the target a duplicate of one of our file descriptors.
    ///
    /// The target fetches it itself: `pidfd_open(us)` + `pidfd_getfd`, or, if
    /// that is refused or unavailable, `open("/proc/US/fd/N")`. Both need the
    /// target to hold ptrace-read rights over us, which holds for a target of
    /// our own user; a target of another user cannot take a root caller's fd
    /// (for sharing memory, [`Stopped::create_memfd`] goes the other way).
    pub fn import_fd(&mut self, fd: BorrowedFd<'_>) -> Result<RemoteFd> {
        // Both routes name us by our pid, which means another process (or
        // none) inside a different pid namespace.
        let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
        if ns("self") != ns(&self.target.pid().to_string()) {
            let msg = "the target is in another pid namespace, where our pid means something else";
            return Err(Error::Local {
                op: "give the target a descriptor",
                source: std::io::Error::new(std::io::ErrorKind::Unsupported, msg),
            });
        }
        let me = std::process::id() as u64;
        let by_pidfd = self
            .syscall(libc::SYS_pidfd_open, [me, 0, 0, 0, 0, 0])
            .and_then(|pidfd| {
                let got = self.syscall(
                    libc::SYS_pidfd_getfd,
                    [pidfd, fd.as_raw_fd() as u64, 0, 0, 0, 0],
                );
                self.close(RemoteFd(pidfd as i32))?;
                got
            });
        if let Ok(remote) = by_pidfd {
            return Ok(RemoteFd(remote as RawFd));
        }
        let flags = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
            .ok()
            .and_then(|info| {
                let line = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
                i32::from_str_radix(line.trim(), 8).ok()
            })
            .unwrap_or(libc::O_RDONLY);
        let path = format!("/proc/{me}/fd/{}\0", fd.as_raw_fd());
        let path_addr = self.write_scratch(path.as_bytes())?;
        let open_flags = (flags & libc::O_ACCMODE) | libc::O_CLOEXEC;
        let remote = self.syscall(
            libc::SYS_openat,
            [libc::AT_FDCWD as u64, path_addr, open_flags as u64, 0, 0, 0],
        )?;
        Ok(RemoteFd(remote as RawFd))
    }

    /// Creates a memfd of `len` bytes in the target, for sharing with us.
    pub fn create_memfd(&mut self, name: &CStr, len: u64) -> Result<RemoteFd> {
        let name_addr = self.write_scratch(name.to_bytes_with_nul())?;
        let fd = RemoteFd(self.syscall(
            libc::SYS_memfd_create,
            [name_addr, libc::MFD_CLOEXEC as u64, 0, 0, 0, 0],
        )? as RawFd);
        if let Err(e) = self.syscall(libc::SYS_ftruncate, [fd.0 as u64, len, 0, 0, 0, 0]) {
            self.close(fd)?;
            return Err(e);
        }
        Ok(fd)
    }

    /// Duplicates a descriptor out of the target into this process.
    pub fn export_fd(&self, fd: RemoteFd) -> Result<std::os::fd::OwnedFd> {
        let pidfd =
            sys::pidfd_open(self.target.pid()).map_err(Error::local("pidfd_open on the target"))?;
        sys::pidfd_getfd(std::os::fd::AsFd::as_fd(&pidfd), fd.0)
            .map_err(Error::local("pidfd_getfd from the target"))
    }
}
