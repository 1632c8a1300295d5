//! Map memory into another process, and run other system calls in its context.
//!
//! Two ways in, behind one API ([`Remote`]):
//!
//! - **Injection** (an unmodified target; needs ptrace rights): [`Target`]
//!   names a thread and finds a `syscall` instruction already present in the
//!   target (vDSO or libc). [`Target::seize`] stops the thread and returns a
//!   [`Stopped`] guard holding its registers, FPU/SIMD state and signal mask;
//!   [`Stopped::syscall`] points `rip` at the instruction, loads the
//!   arguments, and single-steps; dropping or [resuming](Stopped::resume) the
//!   guard restores everything and detaches, so a thread stopped inside a
//!   blocking call (read, nanosleep, futex, epoll_wait) continues exactly as
//!   after any other stop: restartable calls restart, `restart_syscall`
//!   keeps nanosleep's deadline, and epoll_wait reports `EINTR` as it does
//!   under gdb (signal(7)). [`preflight`] explains beforehand why an attach
//!   cannot work (no such process, zombie, other user, Yama, seccomp, already
//!   traced).
//! - **Agent** (a cooperative target; no ptrace): [`agent::start`] (or the
//!   `ferry-remote-agent` LD_PRELOAD library) runs a thread in the target that
//!   serves the same operations over a unix socket, fds by `SCM_RIGHTS`,
//!   after checking the peer's uid.
//!
//! Data flow of one operation: [`Op`] → `(nr, args)` → either the stopped
//! thread's registers (injection) or a 64-byte request on the agent's socket
//! → the system call runs in the target → its result comes back as `u64` or
//! [`Error::RemoteSyscall`] with the errno.
//!
//! ```no_run
//! use ferry_remote::{Mmap, Options, Remote};
//!
//! # fn main() -> Result<(), ferry_remote::Error> {
//! let pid = 4242;
//! // Agent if the target runs one, injection otherwise.
//! let mut remote = Remote::connect(pid, &Options::default())?;
//! let addr = remote.mmap(&Mmap::anonymous(1 << 20, libc::PROT_READ | libc::PROT_WRITE))?;
//! println!("mapped at {addr:#x} in {pid} ({:?} mode)", remote.mode());
//!
//! // Shared memory, visible in both processes.
//! let region = remote.share(4096, libc::PROT_READ | libc::PROT_WRITE, None)?;
//! println!("here {:#x}, there {:#x}", region.local_addr(), region.remote_addr());
//! remote.munmap(addr, 1 << 20)?;
//! # Ok(())
//! # }
//! ```
//!
//! Injection is x86-64 only; `docs/remote.md` says what aarch64 would need.
#![deny(missing_docs)]
#![deny(unsafe_code)]

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
compile_error!("ferry-remote supports Linux on x86-64 only (see docs/remote.md for aarch64)");

pub mod agent;
mod client;
mod error;
pub mod maps;
pub mod mem;
mod op;
pub mod preflight;
mod remote;
mod stop;
mod sys;

pub use client::{Mode, Remote, SharedRegion};
pub use error::{Error, Result};
pub use op::{parse_prot, Mmap, Op};
pub use remote::{find_syscall_instruction, RemoteFd};
pub use stop::{Options, Stopped, Target};
pub use sys::{Pid, Registers};
