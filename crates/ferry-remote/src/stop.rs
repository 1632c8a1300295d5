//! Stopping a target thread, saving its state, and putting it all back.
//!
//! [`Target`] names one thread of a process and knows where a `syscall`
//! instruction lives in it; [`Target::seize`] attaches with `PTRACE_SEIZE`,
//! stops the thread with `PTRACE_INTERRUPT`, and returns a [`Stopped`] guard
//! holding everything the injection may disturb: general registers, the
//! XSAVE area (x87/SSE/AVX/...), and the blocked-signal mask. The guard puts
//! them back and detaches on [`Stopped::resume`], on drop, and so on every
//! error path and during a panic's unwinding.
//!
//! # Why the target resumes exactly as the kernel would have resumed it
//!
//! `PTRACE_INTERRUPT` stops a thread inside `get_signal()` on its way back to
//! user mode. If it was blocked in a system call, the call has already
//! returned `-ERESTARTSYS` (-512), `-ERESTARTNOINTR` (-513),
//! `-ERESTARTNOHAND` (-514) or `-ERESTART_RESTARTBLOCK` (-516) in `rax`, with
//! the call number in `orig_rax` and `rip` just past the `syscall`
//! instruction. The restart decision has *not* been made yet: it is made
//! after `get_signal()` returns, on whatever registers the thread has then.
//!
//! Injection (see [`crate::remote`]) sets `orig_rax = -1` ("not in a system
//! call") so that this pending restart logic leaves the injected registers
//! alone; `rax` then carries the injected number into the `syscall`
//! instruction. `PTRACE_SINGLESTEP` over it ends in a `SIGTRAP`
//! signal-delivery-stop, which is again inside `get_signal()`. The guard
//! restores the original registers *there*, so when it detaches, the
//! kernel's restart logic runs on the original `rax`/`orig_rax`/`rip` and
//! re-issues the interrupted call (or `restart_syscall` for
//! `-ERESTART_RESTARTBLOCK`, whose restart block an injected mmap does not
//! touch), exactly as if the thread had only been stopped.
//!
//! # Signals
//!
//! While stopped, the thread's mask blocks every signal except `SIGTRAP`, so
//! signals sent meanwhile stay queued, with their siginfo, and are delivered
//! after the original mask is back. `SIGTRAP` stays unblocked because the
//! kernel, when it forces the single-step `SIGTRAP` on a thread that blocks
//! it, also resets a user handler for it to `SIG_DFL`.
//!
//! Threads inside `rt_sigsuspend`, `ppoll`, `pselect6` or `epoll_pwait` run
//! with a temporary mask and keep their real one aside
//! (`TIF_RESTORE_SIGMASK`). `PTRACE_GETSIGMASK` reports the real one in that
//! case and `PTRACE_SETSIGMASK` clears the flag, so restoring what we read
//! leaves the real mask in place and the restarted call installs its
//! temporary mask again, as on its first entry.
//!
//! A signal that still reaches a signal-delivery-stop during injection
//! (`SIGSTOP`, a `SIGTRAP` sent by someone else) is recorded, suppressed, and
//! handed back at detach with `PTRACE_SETSIGINFO` + `PTRACE_DETACH(sig)`, so it
//! is delivered with its original siginfo onto the restored registers.

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::preflight;
use crate::remote;
use crate::sys::{self, regset, Pid, Registers};

/// Every signal except `SIGTRAP` (the kernel drops `SIGKILL` and `SIGSTOP` itself).
const BLOCK_ALL_BUT_SIGTRAP: u64 = !(1 << (libc::SIGTRAP - 1));

/// Upper bound of the XSAVE area; the kernel reports the real size (about
/// 2.7 KiB with AVX-512, 11 KiB with AMX tiles).
const XSTATE_MAX: usize = 16 * 1024;

/// Options for [`Target::open`].
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// The thread to stop; the main thread (tid = pid) if `None`. Other
    /// threads keep running either way.
    pub thread: Option<Pid>,
    /// Inject even though the target runs under seccomp filters (see
    /// [`preflight::Refusal::SeccompFilter`]).
    pub allow_seccomp_filter: bool,
}

/// One thread of a process that system calls can be injected into.
///
/// Creating it runs [preflight](crate::preflight) and finds a `syscall`
/// instruction, both without stopping anything; [`seize`](Target::seize)
/// then stops the thread for as short a time as possible.
#[derive(Debug)]
pub struct Target {
    pid: Pid,
    tid: Pid,
    syscall_insn: u64,
}

impl Target {
    /// Prepares to inject into the main thread of `pid`.
    pub fn new(pid: Pid) -> Result<Target> {
        Target::open(pid, &Options::default())
    }

    /// Prepares to inject into a thread of `pid`, with options.
    pub fn open(pid: Pid, options: &Options) -> Result<Target> {
        preflight::check(pid, options.allow_seccomp_filter)?;
        let tid = options.thread.unwrap_or(pid);
        if std::fs::metadata(format!("/proc/{pid}/task/{tid}")).is_err() {
            return Err(Error::Refused {
                pid,
                reason: preflight::Refusal::NoSuchProcess,
            });
        }
        let syscall_insn = remote::find_syscall_instruction(pid)?;
        Ok(Target {
            pid,
            tid,
            syscall_insn,
        })
    }

    /// The process id.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The thread id that [`seize`](Target::seize) stops.
    pub fn tid(&self) -> Pid {
        self.tid
    }

    /// Address of the `syscall` instruction (`0f 05`) injection reuses.
    pub fn syscall_instruction(&self) -> u64 {
        self.syscall_insn
    }

    /// Attaches to and stops the thread, saving its state.
    ///
    /// Must be followed by calls on the returned guard from this same thread:
    /// the kernel binds a tracee to the tracing *thread*, which is why
    /// [`Stopped`] is not `Send`.
    pub fn seize(&self) -> Result<Stopped<'_>> {
        let tid = self.tid;
        sys::ptrace_seize(tid, 0).map_err(Error::ptrace(tid, "PTRACE_SEIZE"))?;
        let since = Instant::now();
        let mut stopped = Stopped {
            target: self,
            saved: None,
            deferred: Vec::new(),
            at_signal_stop: false,
            released: false,
            since,
            _tracer_thread: PhantomData,
        };
        // From here the guard detaches on every early return.
        sys::ptrace_interrupt(tid).map_err(Error::ptrace(tid, "PTRACE_INTERRUPT"))?;
        stopped.wait_for_interrupt()?;
        stopped.save()?;
        Ok(stopped)
    }
}

/// What the injection may change, as it was when the thread stopped.
#[derive(Clone)]
struct Saved {
    regs: Registers,
    /// `NT_X86_XSTATE`, or `NT_PRFPREG` on a CPU without XSAVE.
    fpu_regset: libc::c_int,
    xstate: Vec<u8>,
    sigmask: u64,
}

/// A stopped thread with its saved state; dropping it restores and resumes.
///
/// Created by [`Target::seize`]. [`Stopped::syscall`] injects a call; the
/// fd helpers (`import_fd`, `create_memfd`, `export_fd`, `close`) build on it.
pub struct Stopped<'t> {
    pub(crate) target: &'t Target,
    saved: Option<Saved>,
    /// Signals that arrived while we held the thread, suppressed to be re-sent.
    deferred: Vec<libc::siginfo_t>,
    /// Whether the thread sits in a signal-delivery-stop, where detach can deliver a signal.
    at_signal_stop: bool,
    released: bool,
    since: Instant,
    /// ptrace requests must come from the thread that attached.
    _tracer_thread: PhantomData<*const ()>,
}

impl Stopped<'_> {
    /// The registers as they were when the thread stopped.
    pub fn registers(&self) -> &Registers {
        &self
            .saved
            .as_ref()
            .expect("state is saved before a guard is returned")
            .regs
    }

    /// The XSAVE area (or FXSAVE, without XSAVE) as it was when the thread stopped.
    pub fn xstate(&self) -> &[u8] {
        &self
            .saved
            .as_ref()
            .expect("state is saved before a guard is returned")
            .xstate
    }

    /// The blocked-signal mask as it was when the thread stopped.
    pub fn sigmask(&self) -> u64 {
        self.saved
            .as_ref()
            .expect("state is saved before a guard is returned")
            .sigmask
    }

    /// Restores the thread's state, detaches, and reports how long it was stopped.
    pub fn resume(mut self) -> Result<Duration> {
        self.release()
    }

    fn tid(&self) -> Pid {
        self.target.tid
    }

    /// Waits for the `PTRACE_EVENT_STOP` our interrupt asked for.
    fn wait_for_interrupt(&mut self) -> Result<()> {
        loop {
            let status = self.wait()?;
            if status >> 16 == libc::PTRACE_EVENT_STOP {
                return Ok(());
            }
            // A signal was being delivered when we attached: let it go on as
            // if we were not there, then take our stop.
            let sig = libc::WSTOPSIG(status);
            sys::ptrace_cont(self.tid(), sig).map_err(Error::ptrace(self.tid(), "PTRACE_CONT"))?;
        }
    }

    /// Waits for the thread's next stop; fails if it died instead.
    pub(crate) fn wait(&mut self) -> Result<i32> {
        let tid = self.tid();
        let status = sys::waitpid_thread(tid).map_err(Error::ptrace(tid, "waitpid"))?;
        if !libc::WIFSTOPPED(status) {
            self.released = true; // nothing left to restore or detach
            return Err(Error::TargetGone { tid, status });
        }
        Ok(status)
    }

    fn save(&mut self) -> Result<()> {
        let tid = self.tid();
        let regs = sys::ptrace_getregs(tid).map_err(Error::ptrace(tid, "PTRACE_GETREGS"))?;
        // XSAVE where the CPU has it, else the legacy FXSAVE area.
        let mut xstate = vec![0; XSTATE_MAX];
        let (fpu_regset, len) = sys::ptrace_getregset(tid, regset::NT_X86_XSTATE, &mut xstate)
            .map(|len| (regset::NT_X86_XSTATE, len))
            .or_else(|_| {
                sys::ptrace_getregset(tid, regset::NT_PRFPREG, &mut xstate)
                    .map(|len| (regset::NT_PRFPREG, len))
            })
            .map_err(Error::ptrace(
                tid,
                "PTRACE_GETREGSET NT_X86_XSTATE/NT_PRFPREG",
            ))?;
        xstate.truncate(len);
        let sigmask =
            sys::ptrace_getsigmask(tid).map_err(Error::ptrace(tid, "PTRACE_GETSIGMASK"))?;
        self.saved = Some(Saved {
            regs,
            fpu_regset,
            xstate,
            sigmask,
        });
        sys::ptrace_setsigmask(tid, BLOCK_ALL_BUT_SIGTRAP)
            .map_err(Error::ptrace(tid, "PTRACE_SETSIGMASK"))?;
        Ok(())
    }

    /// Records a signal-delivery-stop that is not ours, so it can be handed back at detach.
    pub(crate) fn defer_signal(&mut self, info: libc::siginfo_t) {
        self.deferred.push(info);
    }

    /// Notes whether the thread now sits in a signal-delivery-stop.
    pub(crate) fn set_at_signal_stop(&mut self, at: bool) {
        self.at_signal_stop = at;
    }

    /// The registers injection starts from: the saved ones.
    pub(crate) fn saved_registers(&self) -> Registers {
        *self.registers()
    }

    /// Puts everything back and detaches; idempotent.
    fn release(&mut self) -> Result<Duration> {
        if self.released {
            return Ok(self.since.elapsed());
        }
        self.released = true;
        let tid = self.tid();
        // Try every restore step even if one fails, then report the first failure.
        let mut first_error = None;
        let mut note = |r: std::io::Result<()>, op| {
            if let Err(e) = r {
                first_error.get_or_insert(Error::Ptrace { tid, op, source: e });
            }
        };
        if let Some(saved) = &self.saved {
            note(sys::ptrace_setregs(tid, &saved.regs), "PTRACE_SETREGS");
            note(
                sys::ptrace_setregset(tid, saved.fpu_regset, &saved.xstate),
                "PTRACE_SETREGSET",
            );
            note(
                sys::ptrace_setsigmask(tid, saved.sigmask),
                "PTRACE_SETSIGMASK",
            );
        }
        // A signal-delivery-stop can hand one deferred signal back with its
        // exact siginfo; any others are re-sent, which keeps the signal but
        // not its sender fields.
        let mut deferred = self.deferred.drain(..);
        let mut sig = 0;
        if self.at_signal_stop {
            if let Some(info) = deferred.next() {
                note(sys::ptrace_setsiginfo(tid, &info), "PTRACE_SETSIGINFO");
                sig = info.si_signo;
            }
        }
        note(sys::ptrace_detach(tid, sig), "PTRACE_DETACH");
        let stopped_for = self.since.elapsed();
        for info in deferred {
            note(sys::tgkill(self.target.pid, tid, info.si_signo), "tgkill");
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(stopped_for),
        }
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        // Errors cannot be reported from drop; resume() is the path that reports them.
        let _ = self.release();
    }
}
