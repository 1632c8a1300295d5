//! What can go wrong when spawning, with enough context to act on it.

use std::ffi::OsString;
use std::fmt;
use std::io;

/// One step of the child routine, in the order the child runs them.
///
/// A failing step is reported with the errno the kernel gave it, so
/// "setuid: EPERM" and "execve: ENOENT" are told apart without guessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// Resetting signal handlers to their defaults.
    ResetSignals,
    /// `setsid()`.
    Setsid,
    /// `setpgid(0, pgid)`.
    Setpgid,
    /// `chroot(path)`.
    Chroot,
    /// `setgroups(groups)`.
    Setgroups,
    /// `setresgid(gid, gid, gid)`.
    Setgid,
    /// `prctl(PR_SET_KEEPCAPS)`, so ambient capabilities survive `setuid`.
    KeepCaps,
    /// `setresuid(uid, uid, uid)`.
    Setuid,
    /// Raising the ambient capabilities (`capset`, `PR_CAP_AMBIENT_RAISE`).
    AmbientCaps,
    /// `chdir(path)` or `fchdir(fd)`.
    Chdir,
    /// `prlimit(0, resource, limit)`.
    Rlimit,
    /// `prctl(PR_SET_PDEATHSIG)` and the check that the parent still lives.
    ParentDeathSignal,
    /// `prctl(PR_SET_NO_NEW_PRIVS)`.
    NoNewPrivs,
    /// Moving an fd out of the way before the remap (`dup3`).
    FdMove,
    /// Putting an fd at its number in the child (`dup3`, `fcntl`).
    FdRemap,
    /// `close_range` of every fd not asked for.
    CloseFds,
    /// `ioctl(fd, TIOCSCTTY)`.
    ControllingTerminal,
    /// `rt_sigprocmask(SIG_SETMASK, mask)`.
    SignalMask,
    /// `execve(path, argv, envp)`.
    Exec,
}

impl Step {
    /// Every step, indexed by its wire number.
    const ALL: [Step; 19] = [
        Step::ResetSignals,
        Step::Setsid,
        Step::Setpgid,
        Step::Chroot,
        Step::Setgroups,
        Step::Setgid,
        Step::KeepCaps,
        Step::Setuid,
        Step::AmbientCaps,
        Step::Chdir,
        Step::Rlimit,
        Step::ParentDeathSignal,
        Step::NoNewPrivs,
        Step::FdMove,
        Step::FdRemap,
        Step::CloseFds,
        Step::ControllingTerminal,
        Step::SignalMask,
        Step::Exec,
    ];

    /// The number that carries this step through shared memory and the
    /// server's socket; 0 is reserved for "no failure".
    pub(crate) fn to_wire(self) -> u32 {
        Step::ALL
            .iter()
            .position(|s| *s == self)
            .map_or(0, |i| i as u32 + 1)
    }

    /// The inverse of [`Step::to_wire`].
    pub(crate) fn from_wire(n: u32) -> Option<Step> {
        Step::ALL.get((n as usize).checked_sub(1)?).copied()
    }

    /// The system call behind the step, as a user would grep for it.
    pub fn name(self) -> &'static str {
        match self {
            Step::ResetSignals => "rt_sigaction",
            Step::Setsid => "setsid",
            Step::Setpgid => "setpgid",
            Step::Chroot => "chroot",
            Step::Setgroups => "setgroups",
            Step::Setgid => "setresgid",
            Step::KeepCaps => "prctl(PR_SET_KEEPCAPS)",
            Step::Setuid => "setresuid",
            Step::AmbientCaps => "ambient capabilities",
            Step::Chdir => "chdir",
            Step::Rlimit => "prlimit",
            Step::ParentDeathSignal => "prctl(PR_SET_PDEATHSIG)",
            Step::NoNewPrivs => "prctl(PR_SET_NO_NEW_PRIVS)",
            Step::FdMove => "dup3 (move)",
            Step::FdRemap => "dup3 (remap)",
            Step::CloseFds => "close_range",
            Step::ControllingTerminal => "ioctl(TIOCSCTTY)",
            Step::SignalMask => "rt_sigprocmask",
            Step::Exec => "execve",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a spawn failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum SpawnError {
    /// A step in the child failed; the child was reaped.
    Child {
        /// The program as given to [`Command::new`](crate::Command::new).
        program: OsString,
        /// The step that failed.
        step: Step,
        /// The errno it failed with.
        errno: i32,
    },
    /// `PATH` search found no executable file of that name.
    NotFound {
        /// The program as given.
        program: OsString,
        /// The `PATH` that was searched.
        path: OsString,
    },
    /// An argument, variable or path contains a NUL byte.
    Nul {
        /// The program as given.
        program: OsString,
        /// What held the NUL ("argument", "environment", ...).
        what: &'static str,
    },
    /// A system call in the parent failed (clone, pipe, open, ...).
    Parent {
        /// The program as given.
        program: OsString,
        /// What the parent was doing.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The spawn server could not be reached, or died mid-request. The next
    /// spawn through the same [`Server`](crate::Server) restarts it.
    Server {
        /// The program as given.
        program: OsString,
        /// The error seen on the server's socket.
        source: io::Error,
    },
}

impl SpawnError {
    /// The program the failed spawn was for.
    pub fn program(&self) -> &OsString {
        match self {
            SpawnError::Child { program, .. }
            | SpawnError::NotFound { program, .. }
            | SpawnError::Nul { program, .. }
            | SpawnError::Parent { program, .. }
            | SpawnError::Server { program, .. } => program,
        }
    }

    /// The errno behind the failure, if the kernel gave one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            SpawnError::Child { errno, .. } => Some(*errno),
            SpawnError::NotFound { .. } => Some(libc::ENOENT),
            SpawnError::Nul { .. } => None,
            SpawnError::Parent { source, .. } | SpawnError::Server { source, .. } => {
                source.raw_os_error()
            }
        }
    }
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let program = self.program().to_string_lossy();
        match self {
            SpawnError::Child { step, errno, .. } => {
                write!(
                    f,
                    "spawn {program}: {step} failed in the child: {}",
                    io::Error::from_raw_os_error(*errno)
                )
            }
            SpawnError::NotFound { path, .. } => {
                write!(
                    f,
                    "spawn {program}: not found in PATH={}",
                    path.to_string_lossy()
                )
            }
            SpawnError::Nul { what, .. } => {
                write!(f, "spawn {program}: {what} contains a NUL byte")
            }
            SpawnError::Parent { op, source, .. } => write!(f, "spawn {program}: {op}: {source}"),
            SpawnError::Server { source, .. } => {
                write!(f, "spawn {program}: spawn server: {source}")
            }
        }
    }
}

impl std::error::Error for SpawnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SpawnError::Parent { source, .. } | SpawnError::Server { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<SpawnError> for io::Error {
    /// Keeps the errno, so `ErrorKind::NotFound` and friends still work for
    /// callers that only deal in `io::Error`.
    fn from(err: SpawnError) -> io::Error {
        match err.raw_os_error() {
            Some(errno) => io::Error::new(io::Error::from_raw_os_error(errno).kind(), err),
            None => io::Error::new(io::ErrorKind::InvalidInput, err),
        }
    }
}
