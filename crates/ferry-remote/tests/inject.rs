//! Injection mode against real victim processes.
//!
//! Each test pairs a victim blocked in a known system call with checks made
//! before and after, like CRIU's compel spy/victim tests: the mapping shows up
//! in /proc/PID/maps, the victim's call completes with the data and duration
//! it would have had, and a second stop finds the very registers, XSAVE area
//! and signal mask the first one saw.

mod common;

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use common::{mapping_at, regs, Victim};
use ferry_remote::{mem, Error, Mmap, Mode, Options, Remote, Target};

const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
const MIB: u64 = 1 << 20;
const ERESTARTSYS: u64 = -512i64 as u64;
const ERESTART_RESTARTBLOCK: u64 = -516i64 as u64;

fn injection(victim: &Victim) -> Remote {
    let remote = Remote::injection(victim.pid, &Options::default()).unwrap();
    assert_eq!(remote.mode(), Mode::Injection);
    remote
}

#[test]
fn mmap_mprotect_madvise_munmap_show_in_maps() {
    let mut victim = Victim::spawn("read", &[]);
    let mut remote = injection(&victim);

    let addr = remote.mmap(&Mmap::anonymous(MIB, RW)).unwrap();
    // The kernel may merge it with a neighbour; it must cover the range with the right prot.
    let m = mapping_at(victim.pid, addr).expect("mapping appears");
    assert!(m.start <= addr && m.end >= addr + MIB, "{m:?}");
    assert_eq!(m.perms, "rw-p");

    remote.mprotect(addr, MIB, libc::PROT_READ).unwrap();
    assert_eq!(mapping_at(victim.pid, addr).unwrap().perms, "r--p");
    remote.madvise(addr, MIB, libc::MADV_DONTNEED).unwrap();
    remote.munmap(addr, MIB).unwrap();
    assert!(mapping_at(victim.pid, addr).is_none());

    // A fixed address never replaces what is there.
    let fixed = Mmap {
        addr: Some(addr),
        ..Mmap::anonymous(MIB, libc::PROT_READ | libc::PROT_EXEC)
    };
    assert_eq!(remote.mmap(&fixed).unwrap(), addr);
    assert_eq!(mapping_at(victim.pid, addr).unwrap().perms, "r-xp");
    match remote.mmap(&fixed) {
        Err(Error::RemoteSyscall { errno, .. }) => assert_eq!(errno, libc::EEXIST),
        other => panic!("expected EEXIST, got {other:?}"),
    }

    let done = victim.finish("hello");
    assert_eq!((done["n"].as_str(), done["data"].as_str()), ("5", "hello"));
    victim.assert_mask_unchanged(&done);
}

#[test]
fn blocked_read_resumes_with_registers_xstate_and_mask_intact() {
    let mut victim = Victim::spawn("read", &[]);
    let target = Target::new(victim.pid).unwrap();

    let stopped = target.seize().unwrap();
    let (before, xstate, mask) = (
        regs(stopped.registers()),
        stopped.xstate().to_vec(),
        stopped.sigmask(),
    );
    // Stopped inside read(2), which the kernel will restart.
    assert_eq!(stopped.registers().orig_rax, libc::SYS_read as u64);
    assert_eq!(stopped.registers().rax, ERESTARTSYS);
    assert_eq!(mask, victim.ready_mask());
    let mut stopped = stopped;
    assert_eq!(
        stopped.syscall(libc::SYS_getpid, [0; 6]).unwrap(),
        victim.pid as u64
    );
    let addr = stopped
        .syscall(libc::SYS_mmap, [0, 4096, 3, 0x22, u64::MAX, 0])
        .unwrap();
    let stopped_for = stopped.resume().unwrap();
    assert!(
        stopped_for < Duration::from_millis(100),
        "stopped for {stopped_for:?}"
    );

    // The spy's second look finds exactly what the first one saw.
    let again = target.seize().unwrap();
    assert_eq!(regs(again.registers()), before);
    assert_eq!(again.xstate(), &xstate[..]);
    assert_eq!(again.sigmask(), mask);
    drop(again);

    assert!(mapping_at(victim.pid, addr).is_some());
    let done = victim.finish("after");
    assert_eq!((done["n"].as_str(), done["data"].as_str()), ("5", "after"));
    victim.assert_mask_unchanged(&done);
}

#[test]
fn nanosleep_still_sleeps_its_full_duration() {
    let mut victim = Victim::spawn("nanosleep", &["400"]);
    let target = Target::new(victim.pid).unwrap();
    // Inject only well inside the 400 ms, however slow the machine is.
    let started = Instant::now();
    let mut injections = 0;
    while injections < 20 && started.elapsed() < Duration::from_millis(250) {
        injections += 1;
        let mut stopped = target.seize().unwrap();
        // The first stop finds nanosleep itself; once restarted through the
        // restart block, later stops find restart_syscall.
        let nr = stopped.registers().orig_rax;
        assert!(
            nr == libc::SYS_nanosleep as u64 || nr == libc::SYS_restart_syscall as u64,
            "{nr}"
        );
        assert_eq!(stopped.registers().rax, ERESTART_RESTARTBLOCK);
        let addr = stopped
            .syscall(libc::SYS_mmap, [0, 4096, 3, 0x22, u64::MAX, 0])
            .unwrap();
        stopped
            .syscall(libc::SYS_munmap, [addr, 4096, 0, 0, 0, 0])
            .unwrap();
        stopped.resume().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        injections >= 3,
        "only {injections} injections fit in the sleep"
    );
    let done = common::fields(&victim.line());
    assert_eq!(done["ret"], "0", "nanosleep was cut short: {done:?}");
    let slept: u64 = done["elapsed_ms"].parse().unwrap();
    assert!((400..1000).contains(&slept), "slept {slept} ms");
}

#[test]
fn futex_wait_continues_after_injection_into_its_thread() {
    let mut victim = Victim::spawn("futex", &[]);
    let options = Options {
        thread: Some(victim.tid()),
        ..Options::default()
    };
    assert_ne!(victim.tid(), victim.pid);
    let target = Target::open(victim.pid, &options).unwrap();
    let mut stopped = target.seize().unwrap();
    assert_eq!(stopped.registers().orig_rax, libc::SYS_futex as u64);
    assert_eq!(
        stopped.syscall(libc::SYS_gettid, [0; 6]).unwrap(),
        victim.tid() as u64
    );
    stopped.resume().unwrap();
    // Wake it only once it waits again: a wake sent before the restarted
    // FUTEX_WAIT re-checks the word would (rightly) make it return EAGAIN.
    victim.wait_blocked();
    let done = victim.finish("wake");
    assert_eq!((done["ret"].as_str(), done["word"].as_str()), ("0", "1"));
    victim.assert_mask_unchanged(&done);
}

#[test]
fn epoll_wait_continues_after_injection() {
    let mut victim = Victim::spawn("epoll", &[]);
    let mut remote = injection(&victim);
    for _ in 0..10 {
        let addr = remote.mmap(&Mmap::anonymous(MIB, RW)).unwrap();
        remote.munmap(addr, MIB).unwrap();
    }
    let done = victim.finish("x");
    assert_eq!(
        (
            done["ret"].as_str(),
            done["event"].as_str(),
            done["data"].as_str()
        ),
        ("1", "1234", "x")
    );
    // epoll_wait is the one call here the kernel does not restart after a
    // stop: each stop costs the loop at most one EINTR, as under gdb or strace.
    let eintr: u32 = done["eintr"].parse().unwrap();
    assert!(
        (1..=20).contains(&eintr),
        "{eintr} EINTRs for 20 injected calls"
    );
    victim.assert_mask_unchanged(&done);
}

/// ppoll runs with a temporary mask and the kernel restores the saved one
/// when it returns; the injection must not make the temporary one permanent.
#[test]
fn ppoll_gets_its_saved_signal_mask_back() {
    let mut victim = Victim::spawn("ppoll", &[]);
    let target = Target::new(victim.pid).unwrap();
    let mut stopped = target.seize().unwrap();
    assert_eq!(stopped.registers().orig_rax, libc::SYS_ppoll as u64);
    // With TIF_RESTORE_SIGMASK set, GETSIGMASK reports the real mask, not
    // ppoll's temporary (empty) one; that is what gets restored.
    assert_eq!(stopped.sigmask(), victim.ready_mask());
    stopped
        .syscall(libc::SYS_mmap, [0, MIB, 3, 0x22, u64::MAX, 0])
        .unwrap();
    stopped.resume().unwrap();
    let done = victim.finish("y");
    assert_eq!((done["ret"].as_str(), done["revents"].as_str()), ("1", "1"));
    victim.assert_mask_unchanged(&done);
    assert_eq!(victim.ready_mask(), 1 << (libc::SIGUSR2 - 1));
}

#[test]
fn other_threads_keep_running_while_one_is_stopped() {
    let mut victim = Victim::spawn("threads", &[]);
    let counters = u64::from_str_radix(&victim.ready["counters"], 16).unwrap();
    let workers: Vec<i32> = victim.ready["workers"]
        .split(',')
        .map(|t| t.parse().unwrap())
        .collect();
    let read_counters = || {
        let bytes = mem::read_vec(victim.pid, counters, 24).unwrap();
        let word = |i: usize| u64::from_ne_bytes(bytes[8 * i..8 * i + 8].try_into().unwrap());
        [word(0), word(1), word(2)]
    };

    // Stop worker 0 and hold it: the others advance, it does not.
    let target = Target::open(
        victim.pid,
        &Options {
            thread: Some(workers[0]),
            ..Options::default()
        },
    )
    .unwrap();
    let mut stopped = target.seize().unwrap();
    assert_eq!(
        stopped.syscall(libc::SYS_gettid, [0; 6]).unwrap(),
        workers[0] as u64
    );
    let before = read_counters();
    std::thread::sleep(Duration::from_millis(50));
    let during = read_counters();
    assert_eq!(during[0], before[0], "the stopped thread ran");
    assert!(
        during[1] > before[1] && during[2] > before[2],
        "{before:?} -> {during:?}"
    );
    stopped.resume().unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(read_counters()[0] > during[0], "the thread did not resume");

    // Map into the main thread repeatedly while the workers count.
    let mut remote = injection(&victim);
    let start = read_counters();
    let mut addrs = Vec::new();
    for _ in 0..30 {
        addrs.push(remote.mmap(&Mmap::anonymous(64 * 1024, RW)).unwrap());
    }
    std::thread::sleep(Duration::from_millis(10));
    let end = read_counters();
    assert!((0..3).all(|i| end[i] > start[i]), "{start:?} -> {end:?}");
    assert!(addrs.iter().all(|&a| mapping_at(victim.pid, a).is_some()));
    let done = victim.finish("t");
    assert_eq!(done["data"], "t");
}

#[test]
fn signals_sent_during_injections_are_delivered_afterwards() {
    const N: u64 = 300;
    let mut victim = Victim::spawn("signals", &[]);
    let pid = victim.pid;
    let mut remote = injection(&victim);
    let sender = std::thread::spawn(move || {
        for i in 1..=N {
            let value = libc::sigval {
                sival_ptr: i as *mut libc::c_void,
            };
            // SAFETY: sigqueue reads only its arguments.
            let ret = unsafe { libc::sigqueue(pid, libc::SIGRTMIN(), value) };
            assert_eq!(ret, 0, "sigqueue: {}", std::io::Error::last_os_error());
            if i % 10 == 0 {
                std::thread::sleep(Duration::from_micros(300));
            }
        }
    });
    let mut injections = 0;
    while !sender.is_finished() || injections < 50 {
        let addr = remote.mmap(&Mmap::anonymous(4096, RW)).unwrap();
        remote.munmap(addr, 4096).unwrap();
        injections += 1;
    }
    sender.join().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let done = victim.finish("s");
    assert_eq!(
        done["signals"],
        N.to_string(),
        "after {injections} injections"
    );
    assert_eq!(done["sum"], (N * (N + 1) / 2).to_string());
    assert_eq!(done["data"], "s");
}

#[test]
fn shared_region_is_seen_on_both_sides() {
    let mut victim = Victim::spawn("read", &[]);
    let mut remote = injection(&victim);
    let fds_before = victim.fd_count();
    let region = remote.share(64 * 1024, RW, None).unwrap();
    assert_eq!(
        victim.fd_count(),
        fds_before,
        "the target's memfd descriptor was not closed"
    );
    let m = mapping_at(victim.pid, region.remote_addr()).unwrap();
    assert_eq!((m.perms.as_str(), m.end - m.start), ("rw-s", 64 * 1024));
    assert!(m.path.contains("memfd:ferry-share"), "{m:?}");

    // Caller writes, target reads.
    let memfd = std::fs::File::from(region.memfd().try_clone_to_owned().unwrap());
    memfd.write_all_at(b"from the caller", 100).unwrap();
    assert_eq!(
        mem::read_vec(victim.pid, region.remote_addr() + 100, 15).unwrap(),
        b"from the caller"
    );
    // Target writes, caller reads through its own mapping.
    mem::write(victim.pid, region.remote_addr() + 8192, b"from the target").unwrap();
    let local = region.local_addr() as *const u8;
    // SAFETY: local is our live shared mapping of 64 KiB; offset 8192 + 15 is inside it.
    let seen = unsafe { std::slice::from_raw_parts(local.add(8192), 15) }.to_vec();
    assert_eq!(seen, b"from the target");

    // At a fixed address too.
    let fixed = region.remote_addr() + 16 * MIB;
    let at = remote.share(4096, RW, Some(fixed)).unwrap();
    assert_eq!(at.remote_addr(), fixed);
    assert_eq!(victim.finish("z")["data"], "z");
}

#[test]
fn file_mapping_imports_the_descriptor_and_closes_it() {
    let mut victim = Victim::spawn("read", &[]);
    let dir = std::env::temp_dir().join(format!("ferry-remote-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("data");
    std::fs::write(&path, b"file contents for the target").unwrap();
    let file = std::fs::File::open(&path).unwrap();

    let mut remote = injection(&victim);
    let fds_before = victim.fd_count();
    let request = Mmap {
        fd: Some(file.as_fd()),
        ..Mmap::anonymous(4096, libc::PROT_READ)
    };
    let addr = remote.mmap(&request).unwrap();
    assert_eq!(victim.fd_count(), fds_before);
    let m = mapping_at(victim.pid, addr).unwrap();
    assert_eq!(m.perms, "r--p");
    assert!(m.path.ends_with("/data"), "{m:?}");
    assert_eq!(
        mem::read_vec(victim.pid, addr, 28).unwrap(),
        b"file contents for the target"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(victim.finish("f")["data"], "f");
}

#[test]
fn errors_and_panics_leave_the_target_running_unchanged() {
    let mut victim = Victim::spawn("read", &[]);
    let target = Target::new(victim.pid).unwrap();
    let before = regs(target.seize().unwrap().registers());

    // A failing call is an error with the errno, and changes nothing.
    let mut stopped = target.seize().unwrap();
    match stopped.syscall(libc::SYS_mmap, [0, 0, 3, 0x22, u64::MAX, 0]) {
        Err(Error::RemoteSyscall { errno, nr, .. }) => {
            assert_eq!((errno, nr), (libc::EINVAL, libc::SYS_mmap))
        }
        other => panic!("expected EINVAL, got {other:?}"),
    }
    drop(stopped);

    // A panic while stopped unwinds through the guard, which restores.
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut stopped = target.seize().unwrap();
        stopped.syscall(libc::SYS_getpid, [0; 6]).unwrap();
        panic!("boom");
    }));
    assert!(panicked.is_err());

    assert_eq!(regs(target.seize().unwrap().registers()), before);
    let done = victim.finish("still");
    assert_eq!((done["n"].as_str(), done["data"].as_str()), ("5", "still"));
}

#[test]
fn memory_writes_reach_read_only_pages() {
    let mut victim = Victim::spawn("read", &[]);
    let mut remote = injection(&victim);
    let addr = remote
        .mmap(&Mmap::anonymous(4096, libc::PROT_READ))
        .unwrap();
    mem::write(victim.pid, addr + 10, b"forced").unwrap();
    assert_eq!(mem::read_vec(victim.pid, addr + 10, 6).unwrap(), b"forced");
    assert_eq!(victim.finish("r")["data"], "r");
}

#[test]
fn a_thread_computing_in_registers_is_not_disturbed() {
    let mut victim = Victim::spawn("spin", &[]);
    let target = Target::new(victim.pid).unwrap();
    for _ in 0..50 {
        let mut stopped = target.seize().unwrap();
        // Stopped in user code, not in a system call.
        assert_eq!(stopped.registers().orig_rax, u64::MAX);
        let addr = stopped
            .syscall(libc::SYS_mmap, [0, 4096, 3, 0x22, u64::MAX, 0])
            .unwrap();
        stopped
            .syscall(libc::SYS_munmap, [addr, 4096, 0, 0, 0, 0])
            .unwrap();
        stopped.resume().unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let done = victim.finish("stop");
    assert_eq!(done["ok"], "true", "registers were corrupted: {done:?}");
    assert!(done["steps"].parse::<u64>().unwrap() > 1000);
}

#[test]
fn generic_syscall_runs_in_the_target_context() {
    let mut victim = Victim::spawn("read", &[]);
    let insn = ferry_remote::find_syscall_instruction(victim.pid).unwrap();
    assert_eq!(mapping_at(victim.pid, insn).unwrap().path, "[vdso]");
    assert_eq!(mem::read_vec(victim.pid, insn, 2).unwrap(), [0x0f, 0x05]);
    let mut remote = injection(&victim);
    assert_eq!(
        remote.syscall(libc::SYS_getpid, [0; 6]).unwrap(),
        victim.pid as u64
    );
    assert_eq!(
        remote.syscall(libc::SYS_getppid, [0; 6]).unwrap(),
        std::process::id() as u64
    );
    assert!(remote.last_stop() > Duration::ZERO);
    assert_eq!(victim.finish("g")["data"], "g");
}
