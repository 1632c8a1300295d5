//! [`Child`]: a running process, held by its pidfd.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::process::{ExitStatus, Output};
use std::time::{Duration, Instant};

use crate::child::Spawned;
use crate::error::SpawnError;
use crate::sys;

/// How a spawn went wrong before there was a child to report on.
#[derive(Debug)]
pub(crate) enum Fault {
    /// The clone (or preparing its stack) failed in the spawning process.
    Clone(io::Error),
    /// The spawn server did not answer.
    Server(io::Error),
}

/// The parent's ends of piped std streams.
#[derive(Debug, Default)]
pub(crate) struct ParentEnds {
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
}

impl ParentEnds {
    /// Files the parent's end of a pipe to child fd `child_fd`. Pipes are
    /// only made for the std streams.
    pub fn put(&mut self, child_fd: RawFd, end: File) {
        match child_fd {
            0 => self.stdin = Some(end),
            1 => self.stdout = Some(end),
            _ => self.stderr = Some(end),
        }
    }
}

/// A spawned process. Waiting and signalling go through its pidfd, so they
/// can never hit another process that reused the pid.
///
/// Dropping a `Child` neither kills nor reaps it, as with std.
#[derive(Debug)]
pub struct Child {
    pid: u32,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
    /// The parent's end of the child's stdin, if piped.
    pub stdin: Option<File>,
    /// The parent's end of the child's stdout, if piped.
    pub stdout: Option<File>,
    /// The parent's end of the child's stderr, if piped.
    pub stderr: Option<File>,
}

impl Child {
    /// Turns the outcome of a clone into a `Child` or an error; a child
    /// whose setup failed is reaped first, so no zombie is left.
    pub(crate) fn finish(
        program: &OsStr,
        spawned: Result<Spawned, Fault>,
        ends: ParentEnds,
    ) -> Result<Child, SpawnError> {
        let spawned = spawned.map_err(|fault| match fault {
            Fault::Clone(source) => SpawnError::Parent {
                program: program.to_owned(),
                op: "clone3",
                source,
            },
            Fault::Server(source) => SpawnError::Server {
                program: program.to_owned(),
                source,
            },
        })?;
        if let Some((step, errno)) = spawned.failure {
            // The child has exited (it only ever exits after reporting), so
            // this does not block; an error here would change nothing.
            let _ = sys::waitid(spawned.pidfd.as_fd(), 0);
            return Err(SpawnError::Child {
                program: program.to_owned(),
                step,
                errno,
            });
        }
        Ok(Child {
            pid: spawned.pid,
            pidfd: spawned.pidfd,
            status: None,
            stdin: ends.stdin,
            stdout: ends.stdout,
            stderr: ends.stderr,
        })
    }

    /// The child's pid (in our PID namespace).
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// The child's pidfd, e.g. to poll for its exit.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// Sends `sig` (`pidfd_send_signal`). Does nothing once the child has
    /// been reaped.
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        sys::pidfd_send_signal(self.pidfd.as_fd(), sig)
    }

    /// Sends SIGKILL.
    pub fn kill(&mut self) -> io::Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// Waits for the child to exit and reaps it (`waitid(P_PIDFD)`). Closes
    /// our end of a piped stdin first, so a child reading it can finish.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        drop(self.stdin.take());
        match self.status {
            Some(status) => Ok(status),
            None => self
                .reap(0)?
                .ok_or_else(|| io::Error::other("waitid without WNOHANG found no exit")),
        }
    }

    /// Reaps the child if it has exited, without blocking.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        match self.status {
            Some(status) => Ok(Some(status)),
            None => self.reap(libc::WNOHANG),
        }
    }

    /// Waits up to `timeout` for the child to exit (polling its pidfd);
    /// `Ok(None)` if it still runs.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match sys::poll_readable(
                self.pidfd.as_fd(),
                left.as_millis().clamp(1, i32::MAX as u128) as i32,
            ) {
                Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
                _ => {}
            }
        }
    }

    /// Reads piped stdout and stderr to the end, then waits.
    pub fn wait_with_output(mut self) -> io::Result<Output> {
        drop(self.stdin.take());
        let stderr = self.stderr.take().map(|mut err| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                err.read_to_end(&mut buf).map(|_| buf)
            })
        });
        let mut stdout = Vec::new();
        if let Some(out) = self.stdout.as_mut() {
            out.read_to_end(&mut stdout)?;
        }
        let stderr = match stderr {
            Some(reader) => reader
                .join()
                .map_err(|_| io::Error::other("stderr reader panicked"))??,
            None => Vec::new(),
        };
        Ok(Output {
            status: self.wait()?,
            stdout,
            stderr,
        })
    }

    /// Waits for the child without blocking a thread: the pidfd becomes
    /// readable when the child exits.
    #[cfg(feature = "tokio")]
    pub async fn wait_async(&mut self) -> io::Result<ExitStatus> {
        use tokio::io::{unix::AsyncFd, Interest};

        drop(self.stdin.take());
        // tokio deprecated this for raw-fd types that may close under it;
        // here the AsyncFd owns its own duplicate of the pidfd.
        #[allow(deprecated)]
        let pidfd = AsyncFd::with_interest(self.pidfd.try_clone()?, Interest::READABLE)?;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            let mut ready = pidfd.readable().await?;
            if sys::poll_readable(self.pidfd.as_fd(), 0)? {
                // Exited but not reaped yet by its parent (a server's child):
                // stay ready and look again after other tasks ran.
                drop(ready);
                tokio::task::yield_now().await;
            } else {
                ready.clear_ready();
            }
        }
    }

    fn reap(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        let status = match sys::waitid(self.pidfd.as_fd(), flags) {
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => self.foreign_exit(flags)?,
            other => other?,
        };
        self.status = status;
        Ok(status)
    }

    /// The exit status of a process that is not our child (spawned by a
    /// server we connected to by path): its parent reaps it, then the
    /// kernel keeps the status behind the pidfd (Linux 6.15).
    fn foreign_exit(&self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = sys::pidfd_exit_status(self.pidfd.as_fd())? {
                return Ok(Some(status));
            }
            if flags & libc::WNOHANG != 0 {
                return Ok(None);
            }
            // Wait for the exit, then give its parent a moment to reap it.
            sys::poll_readable(self.pidfd.as_fd(), -1)?;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
