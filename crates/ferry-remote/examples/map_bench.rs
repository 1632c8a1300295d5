//! Maps 1 MiB into a running process three ways, side by side in one run:
//! gdb's `call mmap`, ferry injection, and the ferry agent.
//!
//! ```text
//! cargo run --release -p ferry-remote --example map_bench -- [--ferry target/release/ferry] [--gdb-runs 10] [--runs 300]
//! ```
//!
//! The target is this same program re-run with `--target`: it starts an
//! agent and then blocks in `read(0)`, like an idle server. Each mapping is
//! unmapped (untimed) before the next, so the target's map never grows.
//! Prints medians and the ratios the goals are stated in (docs/benchmarks.md).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_remote::{Mmap, Options, Remote, Target};

const MIB: u64 = 1 << 20;
const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--target") {
        ferry_remote::agent::start().expect("start agent");
        println!("ready");
        std::io::stdout().flush().unwrap();
        let _ = std::io::stdin().read(&mut [0u8; 1]);
        return;
    }
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].clone())
    };
    let runs: usize = flag("--runs").map_or(300, |v| v.parse().unwrap());
    let gdb_runs: usize = flag("--gdb-runs").map_or(10, |v| v.parse().unwrap());
    let ferry_bin = flag("--ferry");

    let mut target = spawn_target();
    let pid = target.id() as i32;
    let anon = Mmap::anonymous(MIB, RW);

    // gdb, the way people do it by hand. Each run gets its own target,
    // because a failed gdb call can leave the target dead.
    let mut gdb_ok = 0;
    let gdb = sample(gdb_runs, || {
        let mut victim = spawn_target();
        let pid = victim.id() as i32;
        let start = Instant::now();
        let out = Command::new("gdb")
            .args([
                "-p",
                &pid.to_string(),
                "-batch",
                "-ex",
                "call (long)mmap(0,1048576,3,34,-1,0)",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run gdb");
        let took = start.elapsed();
        // gdb 13 fails the call on some kernels ("Couldn't write extended
        // state status: Bad address"); count successes rather than abort.
        let stdout = String::from_utf8_lossy(&out.stdout);
        if let Some(addr) = stdout.lines().find_map(|l| l.strip_prefix("$1 = ")) {
            gdb_ok += 1;
            unmap_with_agent(pid, addr.trim().parse().unwrap());
        }
        let _ = victim.kill();
        let _ = victim.wait();
        took
    });

    // ferry CLI, a fresh process per mapping like gdb.
    let cli = ferry_bin.as_ref().map(|bin| {
        sample(gdb_runs.max(30), || {
            let start = Instant::now();
            let out = Command::new(bin)
                .args([
                    "map",
                    "--pid",
                    &pid.to_string(),
                    "--len",
                    "1M",
                    "--via",
                    "inject",
                ])
                .output()
                .expect("run ferry");
            let took = start.elapsed();
            let text = String::from_utf8_lossy(&out.stdout);
            let addr = u64::from_str_radix(text.trim().trim_start_matches("0x"), 16)
                .unwrap_or_else(|_| {
                    panic!("ferry map failed: {}", String::from_utf8_lossy(&out.stderr))
                });
            unmap_with_agent(pid, addr);
            took
        })
    });

    // What a fresh ferry process costs before it does anything.
    let startup = ferry_bin.as_ref().map(|bin| {
        sample(gdb_runs.max(30), || {
            let start = Instant::now();
            let status = Command::new(bin)
                .arg("--version")
                .stdout(Stdio::null())
                .status();
            assert!(status.unwrap().success());
            start.elapsed()
        })
    });

    // Injection, end to end in-process: preflight, find the syscall
    // instruction, attach, stop, mmap, restore, detach.
    let mut stops = Vec::new();
    let cold = sample(runs, || {
        let start = Instant::now();
        let mut remote = Remote::injection(pid, &Options::default()).unwrap();
        let addr = remote.mmap(&anon).unwrap();
        let took = start.elapsed();
        stops.push(remote.last_stop());
        unmap_with_agent(pid, addr);
        took
    });
    // Injection with a prepared Target (preflight and the instruction search done once).
    let prepared = Target::new(pid).unwrap();
    let mut warm_stops = Vec::new();
    let warm = sample(runs, || {
        let start = Instant::now();
        let mut stopped = prepared.seize().unwrap();
        let (nr, args) = ferry_remote::Op::Mmap(anon).syscall(None);
        let addr = stopped.syscall(nr, args).unwrap();
        warm_stops.push(stopped.resume().unwrap());
        let took = start.elapsed();
        unmap_with_agent(pid, addr);
        took
    });
    // Agent round trip on an open connection.
    let mut agent = Remote::agent(pid).unwrap();
    let agent_rt = sample(runs * 10, || {
        let start = Instant::now();
        let addr = agent.mmap(&anon).unwrap();
        let took = start.elapsed();
        agent.munmap(addr, MIB).unwrap();
        took
    });

    stops.sort();
    warm_stops.sort();
    let med = |v: &[Duration]| v[v.len() / 2];
    let p99 = |v: &[Duration]| v[v.len() * 99 / 100];
    let gdb_median = med(&gdb);
    let row = |name: &str, v: &[Duration]| {
        let ratio = gdb_median.as_secs_f64() / med(v).as_secs_f64();
        println!("| {name} | {} | {} | {ratio:.0}× |", v.len(), show(med(v)));
    };
    println!("| method | runs | median | gdb median / this |");
    println!("|---|---|---|---|");
    row(
        "gdb -p PID -batch -ex 'call (long)mmap(0,1048576,3,34,-1,0)'",
        &gdb,
    );
    if let (Some(cli), Some(startup)) = (&cli, &startup) {
        row(
            "ferry map --len 1M --via inject (a new process each time)",
            cli,
        );
        row(
            "ferry --version (process startup alone, for reference)",
            startup,
        );
    }
    row(
        "ferry injection end to end: Remote::injection + mmap",
        &cold,
    );
    row(
        "ferry injection, prepared Target: seize + mmap + resume",
        &warm,
    );
    row(
        "ferry agent round trip: mmap on an open connection",
        &agent_rt,
    );
    println!();
    println!("gdb completed the call in {gdb_ok} of {} runs.", gdb.len());
    println!(
        "Target stopped per injection: end to end median {} (p99 {}); prepared median {} (p99 {}).",
        show(med(&stops)),
        show(p99(&stops)),
        show(med(&warm_stops)),
        show(p99(&warm_stops))
    );
    let goal = |met: bool| if met { "met" } else { "MISSED" };
    println!(
        "Goals: injection end to end <= 1 ms: {}; >= 300x faster than gdb: {}; stopped <= 100 us: {}; agent <= 50 us: {}.",
        goal(med(&cold) <= Duration::from_millis(1)),
        goal(gdb_median.as_secs_f64() / med(&cold).as_secs_f64() >= 300.0),
        goal(med(&stops) <= Duration::from_micros(100)),
        goal(med(&agent_rt) <= Duration::from_micros(50)),
    );
    let _ = target.kill();
    let _ = target.wait();
}

/// Starts this program as a target (agent running, blocked in read) and waits until it is ready.
fn spawn_target() -> Child {
    let mut target = Command::new(std::env::current_exe().unwrap())
        .arg("--target")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn target");
    let mut line = String::new();
    BufReader::new(target.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    std::thread::sleep(Duration::from_millis(20)); // let it block in read
    target
}

/// Runs `f` `n` times and returns the sorted durations.
fn sample(n: usize, mut f: impl FnMut() -> Duration) -> Vec<Duration> {
    let mut v: Vec<Duration> = (0..n).map(|_| f()).collect();
    v.sort();
    v
}

/// Untimed cleanup through the agent, which stops nothing.
fn unmap_with_agent(pid: i32, addr: u64) {
    Remote::agent(pid).unwrap().munmap(addr, MIB).unwrap();
}

fn show(d: Duration) -> String {
    if d >= Duration::from_millis(10) {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    }
}
