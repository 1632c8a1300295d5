//! The error type of every fallible call in this crate.

use std::fmt;
use std::io;

use crate::preflight::Refusal;
use crate::sys::Pid;

/// What went wrong, with the process, operation and OS error involved.
///
/// `Display` names the step; the cause (OS error or [`Refusal`]) is the
/// `source()`, so `anyhow`'s `{:#}` prints each exactly once.
///
/// The variants say *where* it failed because the remedy differs: a
/// [`Refused`](Error::Refused) target was never touched, a failed
/// [`RemoteSyscall`](Error::RemoteSyscall) ran in the target and returned an
/// errno there, and a [`Ptrace`](Error::Ptrace) failure happened while the
/// target was stopped (the guard has restored it before this error reaches you).
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// Preflight found a reason the operation cannot work; nothing was attached.
    Refused {
        /// The target process.
        pid: Pid,
        /// Why.
        reason: Refusal,
    },
    /// A ptrace or wait call on the target thread failed.
    Ptrace {
        /// The target thread.
        tid: Pid,
        /// The request that failed, e.g. `"PTRACE_SEIZE"`.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The target thread exited or was killed while we held it.
    TargetGone {
        /// The target thread.
        tid: Pid,
        /// The raw wait status.
        status: i32,
    },
    /// No `syscall` instruction was found in the target's vDSO or libc text.
    NoSyscallInstruction {
        /// The target process.
        pid: Pid,
    },
    /// The system call ran in the target (or in the agent) and failed there.
    RemoteSyscall {
        /// The target process.
        pid: Pid,
        /// The system call number.
        nr: i64,
        /// The errno it returned.
        errno: i32,
    },
    /// Reading or writing the target's memory failed.
    Memory {
        /// The target process.
        pid: Pid,
        /// The target address.
        addr: u64,
        /// The OS error.
        source: io::Error,
    },
    /// Talking to the agent, or serving as one, failed.
    Agent {
        /// The target process.
        pid: Pid,
        /// What we were doing, e.g. `"connect"`.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The agent refused us: we are neither its user nor root.
    AgentRefused {
        /// The target process.
        pid: Pid,
    },
    /// A local operation in the requester failed (procfs, memfd, mmap).
    Local {
        /// What we were doing, e.g. `"mmap the shared region"`.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

impl Error {
    /// Converts an errno returned by a remote call into an [`Error::RemoteSyscall`].
    pub(crate) fn remote(pid: Pid, nr: i64, errno: i32) -> Error {
        Error::RemoteSyscall { pid, nr, errno }
    }

    /// Wraps a failed ptrace request.
    pub(crate) fn ptrace(tid: Pid, op: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Ptrace { tid, op, source }
    }

    /// Wraps a failed local operation.
    pub(crate) fn local(op: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Local { op, source }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Refused { pid, .. } => write!(f, "cannot act on process {pid}"),
            Error::Ptrace { tid, op, .. } => write!(f, "{op} on thread {tid}"),
            Error::TargetGone { tid, status } => {
                write!(
                    f,
                    "thread {tid} exited while attached (wait status {status:#x})"
                )
            }
            Error::NoSyscallInstruction { pid } => {
                write!(
                    f,
                    "process {pid}: no syscall instruction found in its vDSO or libc"
                )
            }
            Error::RemoteSyscall { pid, nr, errno } => write!(
                f,
                "{} in process {pid} failed: {}",
                syscall_name(*nr),
                io::Error::from_raw_os_error(*errno)
            ),
            Error::Memory { pid, addr, .. } => write!(f, "memory of process {pid} at {addr:#x}"),
            Error::Agent { pid, op, .. } => write!(f, "agent of process {pid}: {op}"),
            Error::AgentRefused { pid } => write!(
                f,
                "agent of process {pid} refused us: only its own user or root may use it"
            ),
            Error::Local { op, .. } => write!(f, "{op}"),
        }
    }
}

/// The names of the calls this crate makes itself; others by number.
fn syscall_name(nr: i64) -> String {
    let name = match nr {
        libc::SYS_mmap => "mmap",
        libc::SYS_munmap => "munmap",
        libc::SYS_mprotect => "mprotect",
        libc::SYS_madvise => "madvise",
        libc::SYS_memfd_create => "memfd_create",
        libc::SYS_ftruncate => "ftruncate",
        libc::SYS_pidfd_open => "pidfd_open",
        libc::SYS_pidfd_getfd => "pidfd_getfd",
        libc::SYS_openat => "openat",
        libc::SYS_close => "close",
        _ => return format!("system call {nr}"),
    };
    name.to_owned()
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Ptrace { source, .. }
            | Error::Memory { source, .. }
            | Error::Agent { source, .. }
            | Error::Local { source, .. } => Some(source),
            Error::Refused { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, Error>;
