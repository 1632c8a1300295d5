//! Test helper for ferry-remote's integration tests; not for installation.
//!
//! As a **victim** (`testproc victim MODE [ARG]`) it blocks SIGUSR2 (a mask
//! the tests can recognise), arms a 60 s alarm so it can never outlive a
//! test, prints `ready tid=<blocking thread> mask=<hex> ...`, blocks in the
//! call MODE names, and once that returns prints `done ... mask=<hex>` and
//! exits. Tests inject while it is blocked, then check that the call
//! finished exactly as it would have without them.
//!
//! As a **spy** (`testproc spy inject|agent PID`), run by the tests under
//! another uid, it tries to act on PID and prints `ok` or `error: <cause>`.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Instant;

static COUNTERS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
static SIG_COUNT: AtomicU64 = AtomicU64::new(0);
static SIG_SUM: AtomicU64 = AtomicU64::new(0);
static FUTEX_WORD: AtomicI32 = AtomicI32::new(0);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["victim", mode, rest @ ..] => victim(mode, rest),
        ["spy", how, pid] => spy(how, pid.parse().expect("pid")),
        _ => {
            eprintln!("usage: testproc victim MODE [ARG] | testproc spy inject|agent PID");
            std::process::exit(2);
        }
    }
}

fn tid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// The calling thread's blocked-signal mask (the first 64 signals).
fn mask() -> u64 {
    // SAFETY: sigset_t is plain data; pthread_sigmask with a null new set only reads the mask into old.
    unsafe {
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut old);
        std::ptr::read_unaligned((&old as *const libc::sigset_t).cast::<u64>())
    }
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

fn read_stdin() -> String {
    let mut buf = [0u8; 64];
    let n = std::io::stdin().lock().read(&mut buf).expect("read stdin");
    String::from_utf8_lossy(&buf[..n]).trim().to_owned()
}

fn victim(mode: &str, rest: &[&str]) {
    // SAFETY: plain libc calls on a fresh, initialised sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::alarm(60);
    }
    match mode {
        "read" | "agent" | "seccomp" | "signals" => {
            match mode {
                "agent" => drop(ferry_remote::agent::start().expect("start agent")),
                "seccomp" => install_seccomp_filter(),
                "signals" => install_counting_handler(),
                _ => {}
            }
            say(format!("ready tid={} mask={:x}", tid(), mask()));
            // A raw read(2), so the thread blocks in exactly that call.
            let mut buf = [0u8; 64];
            // SAFETY: buf is valid for 64 bytes.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            let data = String::from_utf8_lossy(&buf[..n.max(0) as usize])
                .trim()
                .to_owned();
            let (count, sum) = (
                SIG_COUNT.load(Ordering::SeqCst),
                SIG_SUM.load(Ordering::SeqCst),
            );
            say(format!(
                "done n={n} data={data} signals={count} sum={sum} mask={:x}",
                mask()
            ));
        }
        "nanosleep" => {
            let ms: u64 = rest[0].parse().expect("milliseconds");
            say(format!("ready tid={} mask={:x}", tid(), mask()));
            let ts = libc::timespec {
                tv_sec: (ms / 1000) as i64,
                tv_nsec: ((ms % 1000) * 1_000_000) as i64,
            };
            let start = Instant::now();
            // SAFETY: ts is valid; no remainder is requested.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_nanosleep,
                    &ts,
                    std::ptr::null_mut::<libc::timespec>(),
                )
            };
            let elapsed = start.elapsed().as_millis();
            say(format!(
                "done ret={ret} elapsed_ms={elapsed} mask={:x}",
                mask()
            ));
        }
        "futex" => {
            let waiter = std::thread::spawn(|| {
                say(format!("ready tid={} mask={:x}", tid(), mask()));
                // SAFETY: FUTEX_WORD is a live, aligned i32 for the whole program.
                let ret = unsafe {
                    libc::syscall(
                        libc::SYS_futex,
                        FUTEX_WORD.as_ptr(),
                        libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                        0,
                        std::ptr::null::<libc::timespec>(),
                    )
                };
                let word = FUTEX_WORD.load(Ordering::SeqCst);
                say(format!("done ret={ret} word={word} mask={:x}", mask()));
            });
            read_stdin();
            FUTEX_WORD.store(1, Ordering::SeqCst);
            // SAFETY: as above.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    FUTEX_WORD.as_ptr(),
                    libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                    1,
                )
            };
            waiter.join().unwrap();
        }
        "epoll" | "ppoll" => {
            let ready = format!("ready tid={} mask={:x}", tid(), mask());
            let (ret, detail) = if mode == "epoll" {
                // SAFETY: plain calls on fds we own; ev and out are valid.
                unsafe {
                    let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
                    let mut ev = libc::epoll_event {
                        events: libc::EPOLLIN as u32,
                        u64: 0x1234,
                    };
                    libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, 0, &mut ev);
                    say(ready);
                    let mut out = [libc::epoll_event { events: 0, u64: 0 }; 4];
                    // Like every event loop: epoll_wait fails with EINTR after
                    // any stop, even a ptrace one (signal(7)), and is retried.
                    let mut eintr = 0;
                    let n = loop {
                        let n = libc::epoll_wait(ep, out.as_mut_ptr(), 4, -1);
                        if n != -1
                            || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)
                        {
                            break n;
                        }
                        eintr += 1;
                    };
                    let data = out[0].u64;
                    (n, format!("event={data:x} eintr={eintr}"))
                }
            } else {
                // ppoll with an empty temporary mask: the kernel keeps the
                // SIGUSR2 mask aside and must put it back when ppoll returns.
                // SAFETY: fds and the empty set are valid for the call.
                unsafe {
                    let mut fds = [libc::pollfd {
                        fd: 0,
                        events: libc::POLLIN,
                        revents: 0,
                    }];
                    let mut empty: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut empty);
                    say(ready);
                    let n = libc::ppoll(fds.as_mut_ptr(), 1, std::ptr::null(), &empty);
                    (n, format!("revents={:x}", fds[0].revents))
                }
            };
            let data = read_stdin();
            say(format!(
                "done ret={ret} {detail} data={data} mask={:x}",
                mask()
            ));
        }
        "threads" => {
            let mut tids = Vec::new();
            let (tx, rx) = std::sync::mpsc::channel();
            for counter in &COUNTERS {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    tx.send(tid()).unwrap();
                    loop {
                        counter.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                });
                tids.push(rx.recv().unwrap());
            }
            let workers: Vec<String> = tids.iter().map(i32::to_string).collect();
            say(format!(
                "ready tid={} mask={:x} workers={} counters={:x}",
                tid(),
                mask(),
                workers.join(","),
                COUNTERS.as_ptr() as usize
            ));
            let data = read_stdin();
            say(format!("done data={data} mask={:x}", mask()));
        }
        "spin" => {
            // Pure computation in registers (integer and SSE), no system
            // calls: the stop lands in user code, and any register the
            // injection failed to restore breaks the recomputation check.
            static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            std::thread::spawn(|| {
                read_stdin();
                STOP.store(true, Ordering::SeqCst);
            });
            say(format!("ready tid={} mask={:x} spins=1", tid(), mask()));
            let step = |(x, f): (u64, f64)| {
                (
                    x.wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407),
                    f * 1.000_000_1 + 0.5,
                )
            };
            let (mut state, mut n) = ((1u64, 1.0f64), 0u64);
            while !STOP.load(Ordering::Relaxed) {
                state = step(state);
                n += 1;
            }
            let again = (0..n).fold((1u64, 1.0f64), |s, _| step(s));
            let ok = again.0 == state.0 && again.1.to_bits() == state.1.to_bits();
            say(format!("done ok={ok} steps={n} mask={:x}", mask()));
        }
        other => panic!("unknown victim mode {other}"),
    }
}

/// Makes every `mmap` fail with EPERM; everything else is allowed.
fn install_seccomp_filter() {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    // SAFETY: BPF_STMT/BPF_JUMP only build structs.
    let filter = unsafe {
        [
            libc::BPF_STMT((libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, 4), // arch
            libc::BPF_JUMP(
                (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                AUDIT_ARCH_X86_64,
                1,
                0,
            ),
            libc::BPF_STMT(
                (libc::BPF_RET | libc::BPF_K) as u16,
                libc::SECCOMP_RET_ALLOW,
            ),
            libc::BPF_STMT((libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, 0), // nr
            libc::BPF_JUMP(
                (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                libc::SYS_mmap as u32,
                0,
                1,
            ),
            libc::BPF_STMT(
                (libc::BPF_RET | libc::BPF_K) as u16,
                libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
            ),
            libc::BPF_STMT(
                (libc::BPF_RET | libc::BPF_K) as u16,
                libc::SECCOMP_RET_ALLOW,
            ),
        ]
    };
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut _,
    };
    // SAFETY: prog points at a valid filter for the duration of the calls.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog),
            0
        );
    }
}

extern "C" fn count_signal(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let value = unsafe { (*info).si_value().sival_ptr } as u64;
    SIG_COUNT.fetch_add(1, Ordering::SeqCst);
    SIG_SUM.fetch_add(value, Ordering::SeqCst);
}

fn install_counting_handler() {
    // SAFETY: sigaction is plain data; the handler is async-signal-safe (atomics only).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = count_signal as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGRTMIN(), &sa, std::ptr::null_mut()),
            0
        );
    }
}

fn spy(how: &str, pid: i32) {
    let result = match how {
        "inject" => ferry_remote::Remote::injection(pid, &ferry_remote::Options::default())
            .and_then(|mut r| {
                r.mmap(&ferry_remote::Mmap::anonymous(4096, libc::PROT_READ))
                    .map(drop)
            }),
        "agent" => ferry_remote::Remote::agent(pid).map(drop),
        other => panic!("unknown spy action {other}"),
    };
    match result {
        Ok(()) => say("ok".into()),
        Err(e) => say(format!("error: {e:?}")),
    }
}
