//! The clone, and the child's life between `clone` and `execve`.
//!
//! [`spawn`] clones with `CLONE_VM | CLONE_VFORK` onto a stack of our own:
//! the child shares this address space, so nothing is copied and the cost
//! does not grow with the parent's memory; the calling thread sleeps until
//! the child has exec'd or exited. Because the memory is shared, the child
//! ([`run`]) must not allocate, take locks or touch libc state: it reads
//! what [`Prepared`] holds and makes raw system calls, one commented block
//! per step, in the order of Go's `forkAndExecInChild1`. The first failing
//! step writes itself and its errno to a [`Report`] the parent reads.

#![allow(unsafe_code)]

use std::cell::Cell;
use std::convert::Infallible;
use std::ffi::{c_char, c_void, CString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use crate::error::Step;
use crate::sys;

/// Plain-data options, the part of a command that crosses to the spawn
/// server as is.
#[derive(Debug, Clone, Default)]
pub(crate) struct Options {
    pub setsid: bool,
    pub pgroup: Option<i32>,
    pub ctty: Option<RawFd>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub groups: Option<Vec<u32>>,
    pub umask: Option<u32>,
    pub rlimits: Vec<Rlimit>,
    pub pdeathsig: Option<i32>,
    pub no_new_privs: bool,
    pub ambient_caps: Vec<u32>,
    /// `CLONE_NEW*` flags.
    pub namespaces: u64,
    /// Signals blocked in the child (bit `sig - 1`).
    pub signal_mask: u64,
    /// Ignored signals to reset to `SIG_DFL` (bit `sig - 1`).
    pub signal_default: u64,
    pub close_other_fds: bool,
}

/// One `prlimit` to apply.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// The child's working directory.
#[derive(Debug)]
pub(crate) enum Cwd {
    Path(CString),
    Fd(RawFd),
}

/// A command resolved for one spawn: everything the child reads, allocated.
///
/// Fds are raw numbers that stay valid while the `Command` (or, in the
/// server, the request) that produced this lives; `owned` holds the ones
/// made just for this spawn, closed in the parent when it is dropped.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub path: CString,
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    pub cwd: Option<Cwd>,
    pub chroot: Option<CString>,
    /// `(fd now, fd number in the child)`.
    pub fds: Vec<(RawFd, RawFd)>,
    pub cgroup: Option<RawFd>,
    pub opts: Options,
    pub owned: Vec<OwnedFd>,
}

impl Prepared {
    /// Keeps `fd` open until the spawn is done, and returns its number.
    pub fn own(&mut self, fd: OwnedFd) -> RawFd {
        let raw = fd.as_raw_fd();
        self.owned.push(fd);
        raw
    }
}

/// The signal-set bit of `sig`, or 0 for a number that is not a signal.
pub(crate) fn sigbit(sig: i32) -> u64 {
    if (1..=64).contains(&sig) {
        1 << (sig - 1)
    } else {
        0
    }
}

/// A child that was cloned, and whether its setup failed.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub pid: u32,
    pub pidfd: OwnedFd,
    /// The step that failed and its errno; the child then exited with 127
    /// and still needs reaping.
    pub failure: Option<(Step, i32)>,
}

/// The fd shuffle, planned in the parent so the child only replays it.
#[derive(Debug, Default)]
struct FdPlan {
    /// Pass 1: `dup3(from, to, O_CLOEXEC)` for sources that a later `dup3`
    /// would overwrite, to numbers above every fd in the map.
    moves: Vec<(RawFd, RawFd)>,
    /// Pass 2: `dup3(from, to, 0)`, or clearing close-on-exec if equal.
    places: Vec<(RawFd, RawFd)>,
    /// Pass 3: `close_range(lo, hi)` over the gaps between kept fds.
    closes: Vec<(u32, u32)>,
}

impl FdPlan {
    fn new(prepared: &Prepared) -> FdPlan {
        let fds = &prepared.fds;
        let mut next = fds
            .iter()
            .flat_map(|&(from, to)| [from, to])
            .max()
            .unwrap_or(2)
            + 1;
        let mut plan = FdPlan::default();
        for (i, &(from, to)) in fds.iter().enumerate() {
            let clobbered = fds
                .iter()
                .enumerate()
                .any(|(j, &(_, other))| j != i && other == from);
            let from = if clobbered {
                plan.moves.push((from, next));
                next += 1;
                next - 1
            } else {
                from
            };
            plan.places.push((from, to));
        }
        if prepared.opts.close_other_fds {
            // Kept: every mapped number, and 0-2, which are inherited if unmapped.
            let mut keep: Vec<u32> = fds.iter().map(|&(_, to)| to as u32).chain(0..3).collect();
            keep.sort_unstable();
            keep.dedup();
            let mut lo = 0;
            for fd in keep {
                if fd > lo {
                    plan.closes.push((lo, fd - 1));
                }
                lo = fd + 1;
            }
            plan.closes.push((lo, u32::MAX));
        }
        plan
    }
}

/// Where the child reports its failure: shared memory, since `CLONE_VM`
/// shares it and `CLONE_VFORK` orders the child's writes before the
/// parent's reads.
#[derive(Default)]
struct Report {
    /// `Step::to_wire`, or 0 while nothing failed.
    step: AtomicU32,
    errno: AtomicI32,
}

/// All the child reads, built by the parent before the clone.
struct ChildArgs<'a> {
    prepared: &'a Prepared,
    plan: &'a FdPlan,
    argv: *const *const c_char,
    envp: *const *const c_char,
    /// The pid `getppid()` must return in the child, or 0 to skip the check.
    ppid: i32,
    /// Drop supplementary groups (a root parent changing uid, groups unset).
    drop_groups: bool,
    report: &'a Report,
}

/// The child's stack size; the child's frames are small and fixed.
const STACK_SIZE: usize = 64 * 1024;

thread_local! {
    /// One stack per thread, reused: with `CLONE_VFORK` it is free again
    /// as soon as `clone3` returns.
    static STACK: Cell<Option<sys::Mapping>> = const { Cell::new(None) };
}

/// A fresh child stack with a guard page below it.
fn new_stack() -> io::Result<sys::Mapping> {
    let page = sys::page_size();
    let stack = sys::Mapping::new(STACK_SIZE + page)?;
    stack.protect_head(page)?;
    Ok(stack)
}

/// Clones a child that runs the steps for `prepared` and execs.
///
/// `as_sibling` (the spawn server) adds `CLONE_PARENT`, making the child a
/// child of our parent, so the process that asked for it can wait for it.
pub(crate) fn spawn(prepared: &Prepared, as_sibling: bool) -> io::Result<Spawned> {
    let plan = FdPlan::new(prepared);
    let pointers = |strings: &[CString]| -> Vec<*const c_char> {
        strings
            .iter()
            .map(|s| s.as_ptr())
            .chain([ptr::null()])
            .collect()
    };
    let (argv, envp) = (pointers(&prepared.argv), pointers(&prepared.envp));
    let opts = &prepared.opts;
    let report = Report::default();
    let in_new_pid_ns = opts.namespaces & libc::CLONE_NEWPID as u64 != 0;
    let args = ChildArgs {
        prepared,
        plan: &plan,
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        ppid: match (in_new_pid_ns, as_sibling) {
            (true, _) => 0,
            (false, true) => sys::getppid(),
            (false, false) => sys::getpid(),
        },
        drop_groups: opts.uid.is_some() && opts.groups.is_none() && sys::geteuid() == 0,
        report: &report,
    };

    let mut clone_args = sys::CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64 | opts.namespaces,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    if as_sibling {
        // clone3 refuses an exit signal here: the child inherits ours (SIGCHLD).
        clone_args.flags |= libc::CLONE_PARENT as u64;
        clone_args.exit_signal = 0;
    }
    if let Some(cgroup) = prepared.cgroup {
        clone_args.flags |= sys::CLONE_INTO_CGROUP;
        clone_args.cgroup = cgroup as u64;
    }

    let stack = match STACK.take() {
        Some(stack) => stack,
        None => new_stack()?,
    };
    clone_args.stack = (stack.addr() + sys::page_size()) as u64;
    clone_args.stack_size = STACK_SIZE as u64;
    // No handler of ours may run in the child, and none may run here while
    // the child borrows this thread's stack frames: block everything.
    let old_mask = sys::set_signal_mask(sys::ALL_SIGNALS)?;
    // SAFETY: the stack is ours alone until clone3 returns (CLONE_VFORK);
    // `child_entry` follows the rules of the child (see module docs), and
    // `args` lives on this frame, which waits for the child.
    let cloned = unsafe {
        sys::clone3(
            &mut clone_args,
            child_entry,
            &args as *const ChildArgs as *mut c_void,
        )
    };
    // Restoring a mask we just read cannot fail; if it did, the thread
    // would silently keep every signal blocked, so say so loudly.
    sys::set_signal_mask(old_mask).expect("rt_sigprocmask restoring the old mask");
    STACK.set(Some(stack));

    let (pid, pidfd) = cloned?;
    let failure = match report.step.load(Ordering::Acquire) {
        0 => None,
        step => Some((
            Step::from_wire(step).unwrap_or(Step::Exec),
            report.errno.load(Ordering::Relaxed),
        )),
    };
    Ok(Spawned {
        pid,
        pidfd,
        failure,
    })
}

/// A step failed with this errno.
struct Failure {
    step: Step,
    errno: i32,
}

/// One raw system call in the child: `libc::syscall` is a bare trap with
/// no locks or allocation; its errno goes to the suspended parent thread's
/// errno slot (shared TLS), which we read back at once.
macro_rules! sys {
    ($step:expr, $nr:expr $(, $arg:expr)* $(,)?) => {{
        let ret = libc::syscall($nr $(, $arg)*);
        if ret == -1 {
            Err(Failure { step: $step, errno: *libc::__errno_location() })
        } else {
            Ok(ret)
        }
    }};
}

/// The child's first frame, on the new stack; never inlined, so nothing of
/// it can land in the parent's frames.
#[inline(never)]
extern "C" fn child_entry(arg: *mut c_void) -> ! {
    // SAFETY: `arg` is the `ChildArgs` in `spawn`'s frame, which stays put
    // while the parent thread is suspended by CLONE_VFORK.
    let args = unsafe { &*(arg as *const ChildArgs) };
    let failure = match run(args) {
        Ok(never) => match never {},
        Err(failure) => failure,
    };
    // The one error exit: report the step and errno, then leave.
    args.report.errno.store(failure.errno, Ordering::Relaxed);
    args.report
        .step
        .store(failure.step.to_wire(), Ordering::Release);
    loop {
        // SAFETY: exit ends this process; it touches no memory.
        unsafe { libc::syscall(libc::SYS_exit, 127) };
    }
}

/// The kernel's `struct sigaction` (not libc's, whose mask is 128 bytes).
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`; version 3 uses two of them.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// The steps between clone and exec. Returns only on failure.
#[rustfmt::skip] // One line per system call reads like the list of steps it is.
fn run(a: &ChildArgs) -> Result<Infallible, Failure> {
    let p = a.prepared;
    let o = &p.opts;

    // Signal handlers. The parent's handlers are the parent's code and must
    // never run here; all signals are blocked since before the clone. Reset
    // every caught signal, and the ignored ones the caller listed, to
    // SIG_DFL (other ignored signals stay ignored across exec, per POSIX).
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        let mut old = KernelSigaction::default();
        // SAFETY: a null new action only reads the old one into `old`.
        unsafe { sys!(Step::ResetSignals, libc::SYS_rt_sigaction, sig, ptr::null::<c_void>(), &mut old, 8) }?;
        let caught = old.handler != libc::SIG_DFL && old.handler != libc::SIG_IGN;
        if caught || (old.handler == libc::SIG_IGN && o.signal_default & sigbit(sig) != 0) {
            let default = KernelSigaction::default();
            // SAFETY: `default` is a valid SIG_DFL action.
            unsafe { sys!(Step::ResetSignals, libc::SYS_rt_sigaction, sig, &default, ptr::null_mut::<c_void>(), 8) }?;
        }
    }

    // Session and process group.
    if o.setsid {
        // SAFETY: no pointers.
        unsafe { sys!(Step::Setsid, libc::SYS_setsid) }?;
    }
    if let Some(pgid) = o.pgroup {
        // SAFETY: no pointers.
        unsafe { sys!(Step::Setpgid, libc::SYS_setpgid, 0, pgid) }?;
    }

    // Root directory, while we still have the privilege.
    if let Some(dir) = &p.chroot {
        // SAFETY: `dir` is NUL-terminated.
        unsafe { sys!(Step::Chroot, libc::SYS_chroot, dir.as_ptr()) }?;
    }

    // Credentials: groups, then gid, then uid (after which we could not).
    // Raw syscalls change this one task, which here is the whole process;
    // libc's set*id would signal every thread of the parent.
    if let Some(groups) = &o.groups {
        // SAFETY: `groups` holds `len` gids.
        unsafe { sys!(Step::Setgroups, libc::SYS_setgroups, groups.len(), groups.as_ptr()) }?;
    } else if a.drop_groups {
        // SAFETY: an empty list needs no pointer.
        unsafe { sys!(Step::Setgroups, libc::SYS_setgroups, 0, ptr::null::<u32>()) }?;
    }
    if let Some(gid) = o.gid {
        // SAFETY: no pointers.
        unsafe { sys!(Step::Setgid, libc::SYS_setresgid, gid, gid, gid) }?;
    }
    if !o.ambient_caps.is_empty() {
        // SAFETY: no pointers.
        unsafe { sys!(Step::KeepCaps, libc::SYS_prctl, libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) }?;
    }
    if let Some(uid) = o.uid {
        // SAFETY: no pointers.
        unsafe { sys!(Step::Setuid, libc::SYS_setresuid, uid, uid, uid) }?;
    }

    // Ambient capabilities: KEEPCAPS kept them permitted through setuid;
    // make them inheritable and effective, then raise them as ambient.
    if !o.ambient_caps.is_empty() {
        let header = CapHeader { version: CAP_VERSION_3, pid: 0 };
        let mut data = [CapData::default(); 2];
        // SAFETY: version 3 reads one header and fills two data structs.
        unsafe { sys!(Step::AmbientCaps, libc::SYS_capget, &header, data.as_mut_ptr()) }?;
        for &cap in &o.ambient_caps {
            if let Some(d) = data.get_mut((cap / 32) as usize) {
                d.inheritable |= 1 << (cap % 32);
                d.effective |= d.permitted & 1 << (cap % 32);
            }
        }
        // SAFETY: as for capget; both structs are initialized.
        unsafe { sys!(Step::AmbientCaps, libc::SYS_capset, &header, data.as_ptr()) }?;
        for &cap in &o.ambient_caps {
            // SAFETY: no pointers.
            unsafe { sys!(Step::AmbientCaps, libc::SYS_prctl, libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, cap, 0, 0) }?;
        }
    }

    // Working directory, before the fd shuffle can reuse a directory fd's number.
    match &p.cwd {
        // SAFETY: `dir` is NUL-terminated.
        Some(Cwd::Path(dir)) => unsafe { sys!(Step::Chdir, libc::SYS_chdir, dir.as_ptr()) }?,
        // SAFETY: no pointers.
        Some(Cwd::Fd(fd)) => unsafe { sys!(Step::Chdir, libc::SYS_fchdir, *fd) }?,
        None => 0,
    };

    // File mode creation mask; umask cannot fail.
    if let Some(mask) = o.umask {
        // SAFETY: no pointers.
        unsafe { libc::syscall(libc::SYS_umask, mask) };
    }

    // Parent-death signal. If the parent died before the prctl, the signal
    // will never come, so check and send it ourselves. (In a new PID
    // namespace getppid() is 0 and there is nothing to check.)
    if let Some(sig) = o.pdeathsig {
        // SAFETY: no pointers.
        unsafe { sys!(Step::ParentDeathSignal, libc::SYS_prctl, libc::PR_SET_PDEATHSIG, sig, 0, 0, 0) }?;
        // SAFETY: no pointers.
        let ppid = unsafe { sys!(Step::ParentDeathSignal, libc::SYS_getppid) }?;
        if a.ppid != 0 && ppid != a.ppid.into() {
            // SAFETY: no pointers.
            let pid = unsafe { sys!(Step::ParentDeathSignal, libc::SYS_getpid) }?;
            // SAFETY: no pointers; signals ourselves.
            unsafe { sys!(Step::ParentDeathSignal, libc::SYS_kill, pid, sig) }?;
        }
    }

    // Fd shuffle, as planned by the parent: move sources out of the way,
    // put each fd at its number (without close-on-exec), close the rest.
    for &(from, to) in &a.plan.moves {
        // SAFETY: no pointers.
        unsafe { sys!(Step::FdMove, libc::SYS_dup3, from, to, libc::O_CLOEXEC) }?;
    }
    for &(from, to) in &a.plan.places {
        if from == to {
            // SAFETY: no pointers.
            unsafe { sys!(Step::FdRemap, libc::SYS_fcntl, from, libc::F_SETFD, 0) }?;
        } else {
            // SAFETY: no pointers.
            unsafe { sys!(Step::FdRemap, libc::SYS_dup3, from, to, 0) }?;
        }
    }
    for &(lo, hi) in &a.plan.closes {
        // SAFETY: no pointers.
        unsafe { sys!(Step::CloseFds, libc::SYS_close_range, lo, hi, 0) }?;
    }

    // Controlling terminal, by its number after the shuffle (needs setsid).
    if let Some(fd) = o.ctty {
        // SAFETY: TIOCSCTTY takes an integer argument, no pointer.
        unsafe { sys!(Step::ControllingTerminal, libc::SYS_ioctl, fd, libc::TIOCSCTTY, 0) }?;
    }

    // Resource limits, after the shuffle: a low RLIMIT_NOFILE must not stop
    // the dup3s above.
    for limit in &o.rlimits {
        let new = libc::rlimit64 { rlim_cur: limit.soft, rlim_max: limit.hard };
        // SAFETY: `new` is a valid rlimit64; no old value is asked for.
        unsafe { sys!(Step::Rlimit, libc::SYS_prlimit64, 0, limit.resource, &new, ptr::null_mut::<c_void>()) }?;
    }

    // no_new_privs, last before exec so it cannot block the steps above.
    if o.no_new_privs {
        // SAFETY: no pointers.
        unsafe { sys!(Step::NoNewPrivs, libc::SYS_prctl, libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }?;
    }

    // Signal mask the program starts with.
    // SAFETY: `signal_mask` is an 8-byte set, as sigsetsize says.
    unsafe { sys!(Step::SignalMask, libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &o.signal_mask, ptr::null_mut::<u64>(), 8) }?;

    // Exec. It returns only on failure.
    // SAFETY: path is NUL-terminated; argv and envp are NULL-terminated
    // arrays of NUL-terminated strings, all owned by the waiting parent.
    unsafe { sys!(Step::Exec, libc::SYS_execve, p.path.as_ptr(), a.argv, a.envp) }?;
    Err(Failure { step: Step::Exec, errno: libc::EINVAL })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(fds: &[(RawFd, RawFd)], close_other_fds: bool) -> Prepared {
        Prepared {
            path: CString::new("/bin/true").unwrap(),
            argv: Vec::new(),
            envp: Vec::new(),
            cwd: None,
            chroot: None,
            fds: fds.to_vec(),
            cgroup: None,
            opts: Options {
                close_other_fds,
                ..Options::default()
            },
            owned: Vec::new(),
        }
    }

    #[test]
    fn a_swap_moves_both_sources_above_every_number() {
        let plan = FdPlan::new(&prepared(&[(3, 4), (4, 3)], false));
        assert_eq!(plan.moves, [(3, 5), (4, 6)]);
        assert_eq!(plan.places, [(5, 4), (6, 3)]);
        assert!(plan.closes.is_empty());
    }

    #[test]
    fn unclobbered_sources_stay_and_identity_maps_stay_put() {
        let plan = FdPlan::new(&prepared(&[(10, 0), (7, 7)], false));
        assert!(plan.moves.is_empty());
        assert_eq!(plan.places, [(10, 0), (7, 7)]);
    }

    #[test]
    fn close_ranges_cover_every_gap_between_kept_fds() {
        let plan = FdPlan::new(&prepared(&[(20, 5), (21, 9)], true));
        assert_eq!(plan.closes, [(3, 4), (6, 8), (10, u32::MAX)]);
    }
}
