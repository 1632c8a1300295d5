//! Signals and threads: a handler installed in the parent never runs in a
//! child (which shares the parent's memory until exec), and spawning from
//! 16 threads at once works while other threads allocate and take signals.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use common::{sh, stdout};
use ferry_spawn::{Command, Resource, Stdio};

/// Our pid, for the handler to tell parent from child.
static PARENT: AtomicI32 = AtomicI32::new(0);
/// Handler runs in the parent.
static IN_PARENT: AtomicUsize = AtomicUsize::new(0);
/// Handler runs anywhere else: with CLONE_VM a child would write here too.
static IN_CHILD: AtomicUsize = AtomicUsize::new(0);
/// One test at a time: both count handler runs and fds process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

extern "C" fn on_usr1(_: libc::c_int) {
    // SAFETY: getpid is async-signal-safe.
    if unsafe { libc::getpid() } == PARENT.load(Ordering::Relaxed) {
        IN_PARENT.fetch_add(1, Ordering::Relaxed);
    } else {
        IN_CHILD.fetch_add(1, Ordering::Relaxed);
    }
}

fn install_handler() {
    PARENT.store(std::process::id() as i32, Ordering::Relaxed);
    // SAFETY: installs an async-signal-safe handler for SIGUSR1.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_usr1 as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        assert_eq!(
            libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()),
            0
        );
    }
}

/// Sends SIGUSR1 to `target` (a pid, or a negative process group) every
/// 100 µs until stopped.
fn signaller(target: i32, stop: Arc<AtomicBool>) -> thread::JoinHandle<usize> {
    thread::spawn(move || {
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: kill only sends a signal.
            unsafe { libc::kill(target, libc::SIGUSR1) };
            sent += 1;
            thread::sleep(Duration::from_micros(100));
        }
        sent
    })
}

#[test]
fn a_parent_handler_never_runs_in_the_child() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    install_handler();
    // The children join a group we bombard with SIGUSR1; its leader ignores it.
    let mut leader = sh("trap '' USR1; sleep 20")
        .process_group(0)
        .spawn()
        .unwrap();
    let group = leader.id() as i32;
    let stop = Arc::new(AtomicBool::new(false));
    let at_group = signaller(-group, Arc::clone(&stop));
    let at_us = signaller(std::process::id() as i32, Arc::clone(&stop));

    let mut killed_by_usr1 = 0;
    for _ in 0..300 {
        let mut child = Command::new("true")
            .process_group(group)
            .rlimit(Resource::Nofile, 256, 256)
            .stdout(Stdio::Null)
            .spawn()
            .unwrap();
        let status = common::wait(&mut child);
        // Hit after its mask was lifted: SIGUSR1's default action, fine.
        if std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGUSR1) {
            killed_by_usr1 += 1;
        } else {
            assert!(status.success(), "{status:?}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent = at_group.join().unwrap() + at_us.join().unwrap();
    leader.kill().unwrap();
    common::wait(&mut leader);

    println!("signals sent: {sent}, children killed by SIGUSR1: {killed_by_usr1}");
    assert!(
        IN_PARENT.load(Ordering::Relaxed) > 0,
        "the handler does run in the parent"
    );
    assert_eq!(
        IN_CHILD.load(Ordering::Relaxed),
        0,
        "the handler ran in a child"
    );
    // And after exec the child catches nothing.
    let caught = common::field(
        &stdout(Command::new("cat").arg("/proc/self/status")),
        "SigCgt",
    );
    assert_eq!(caught, "0000000000000000");
}

#[test]
fn sixteen_threads_spawn_while_others_allocate_and_take_signals() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    install_handler();
    let fds_before = common::open_fd_count();
    let stop = Arc::new(AtomicBool::new(false));
    let signals = signaller(std::process::id() as i32, Arc::clone(&stop));
    let allocators: Vec<_> = (0..2)
        .map(|i| {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut rounds = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let v: Vec<Vec<u8>> = (0..64).map(|n| vec![i as u8; 1 << (n % 16)]).collect();
                    rounds += v.len();
                }
                rounds
            })
        })
        .collect();

    let started = Instant::now();
    let spawners: Vec<_> = (0..16)
        .map(|t| {
            thread::spawn(move || {
                for i in 0..30 {
                    let token = format!("{t}-{i}");
                    let mut cmd = sh("echo $TOKEN $$");
                    cmd.env("TOKEN", &token)
                        .setsid(true)
                        .rlimit(Resource::Nofile, 128, 128);
                    cmd.parent_death_signal(libc::SIGKILL);
                    let child = cmd.stdout(Stdio::Piped).spawn().unwrap();
                    let pid = child.id();
                    let out = child.wait_with_output().unwrap();
                    assert!(out.status.success());
                    assert_eq!(
                        String::from_utf8(out.stdout).unwrap(),
                        format!("{token} {pid}\n")
                    );
                }
            })
        })
        .collect();
    for spawner in spawners {
        spawner.join().unwrap();
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    signals.join().unwrap();
    let allocated: usize = allocators.into_iter().map(|a| a.join().unwrap()).sum();

    println!("480 spawns from 16 threads in {elapsed:?}; {allocated} allocations meanwhile");
    assert!(allocated > 0);
    assert!(IN_PARENT.load(Ordering::Relaxed) > 0);
    assert_eq!(IN_CHILD.load(Ordering::Relaxed), 0);
    assert_eq!(common::open_fd_count(), fds_before, "no fd leaked");
}
