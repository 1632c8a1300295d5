//! `ferry-netem`: the delay proxy of this crate as a command, for scripts.
//!
//! ```text
//! ferry-netem --listen ADDR --target ADDR --delay-ms N [--netns NAME] [--lifetime-s S]
//! ```
//!
//! Prints the listening address on stdout once it accepts. The partition
//! switch is a signal, so a script needs nothing but `kill`: SIGUSR1 cuts
//! (live connections shut down, new ones closed), SIGUSR2 restores. SIGTERM,
//! SIGINT or the end of `--lifetime-s` (default one hour, so a forgotten
//! proxy cannot live on) stop it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use ferry_netem::{Config, Proxy};

const USAGE: &str =
    "usage: ferry-netem --listen ADDR --target ADDR --delay-ms N [--netns NAME] [--lifetime-s S]";

/// The last control signal received (0: none pending).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

fn parse() -> Result<(Config, Duration), String> {
    let mut args = std::env::args().skip(1);
    let (mut listen, mut target, mut delay, mut netns) = (None, None, None, None);
    let mut lifetime = Duration::from_secs(3600);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--listen" => listen = Some(value.parse::<SocketAddr>().map_err(|e| bad(&e))?),
            "--target" => target = Some(value.parse::<SocketAddr>().map_err(|e| bad(&e))?),
            "--delay-ms" => {
                delay = Some(Duration::from_millis(value.parse().map_err(|e| bad(&e))?))
            }
            "--netns" => netns = Some(PathBuf::from("/run/netns").join(&value)),
            "--lifetime-s" => lifetime = Duration::from_secs(value.parse().map_err(|e| bad(&e))?),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    let cfg = Config {
        listen: listen.ok_or("--listen is required")?,
        target: target.ok_or("--target is required")?,
        delay: delay.ok_or("--delay-ms is required")?,
        listen_netns: netns,
    };
    Ok((cfg, lifetime))
}

fn main() -> ExitCode {
    let (cfg, lifetime) = match parse() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("ferry-netem: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    for sig in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let proxy = match Proxy::start(cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ferry-netem: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", proxy.addr());
    let end = Instant::now() + lifetime;
    while Instant::now() < end {
        match SIGNAL.swap(0, Ordering::SeqCst) {
            libc::SIGUSR1 => proxy.set_partitioned(true),
            libc::SIGUSR2 => proxy.set_partitioned(false),
            libc::SIGTERM | libc::SIGINT => break,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    ExitCode::SUCCESS
}
