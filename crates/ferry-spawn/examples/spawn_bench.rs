//! Spawn /bin/true from parents of growing RSS, every way side by side.
//!
//! `spawn_bench [N [MB,MB,...]] [--go PATH] [--python PATH]` grows this
//! process's touched memory to each size in turn (MADV_POPULATE_WRITE on
//! 4 KiB pages, like a real heap) and times N spawn+wait rounds of every
//! method, interleaved so machine noise hits all of them alike. fork-based
//! methods stop early once they used their time budget. Go and Python
//! references are separate programs that allocate the same RSS themselves.
//! Prints per-spawn medians and ratios against posix_spawn, and the spawn
//! server's throughput from 8 threads.

use std::ffi::{c_char, CString};
use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_spawn::{Command, Resource, Server};

/// Wall time each fork-based method may use per RSS level.
const FORK_BUDGET: Duration = Duration::from_secs(6);

/// Positions in [`methods`] of the rows the ratios are taken against.
const FORK: usize = 0;
const POSIX_SPAWN: usize = 2;
const FERRY_ALL_OPTIONS: usize = 5;

/// One way of spawning /bin/true and waiting for it.
struct Method {
    name: &'static str,
    forks: bool,
    run: Box<dyn FnMut()>,
}

/// The options of the "all options" rows.
fn all_options(cmd: &mut Command) {
    cmd.setsid(true)
        .uid(65534)
        .gid(65534)
        .rlimit(Resource::Nofile, 1024, 1024)
        .parent_death_signal(libc::SIGKILL);
}

fn wait_pid(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waits for our own child.
    let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        ret == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed"
    );
}

fn methods(server: Arc<Server>) -> Vec<Method> {
    let path = CString::new("/bin/true").unwrap();
    let argv_strings = [path.clone()];
    let argv: Vec<*const c_char> = argv_strings
        .iter()
        .map(|s| s.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let (fork_path, fork_argv) = (path.clone(), argv.clone());
    vec![
        Method {
            name: "libc fork+exec",
            forks: true,
            run: Box::new(move || {
                // SAFETY: the child only calls async-signal-safe execv and _exit.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    // SAFETY: as above.
                    unsafe {
                        libc::execv(fork_path.as_ptr(), fork_argv.as_ptr());
                        libc::_exit(127);
                    }
                }
                wait_pid(pid);
            }),
        },
        Method {
            name: "std Command + no-op pre_exec (fork)",
            forks: true,
            run: Box::new(|| {
                let mut cmd = std::process::Command::new("/bin/true");
                // SAFETY: the hook does nothing.
                unsafe { cmd.pre_exec(|| Ok(())) };
                assert!(cmd.status().unwrap().success());
            }),
        },
        Method {
            name: "libc posix_spawn",
            forks: false,
            run: Box::new(move || {
                let mut pid = 0;
                extern "C" {
                    static environ: *const *const c_char;
                }
                // SAFETY: valid path, NULL-terminated argv, the process environment.
                let ret = unsafe {
                    libc::posix_spawn(
                        &mut pid,
                        path.as_ptr(),
                        std::ptr::null(),
                        std::ptr::null(),
                        argv.as_ptr() as *const *mut c_char,
                        environ as *const *mut c_char,
                    )
                };
                assert_eq!(ret, 0);
                wait_pid(pid);
            }),
        },
        Method {
            name: "std Command (posix_spawn path)",
            forks: false,
            run: Box::new(|| {
                assert!(std::process::Command::new("/bin/true")
                    .status()
                    .unwrap()
                    .success())
            }),
        },
        Method {
            name: "ferry-spawn",
            forks: false,
            run: Box::new(|| assert!(Command::new("/bin/true").status().unwrap().success())),
        },
        Method {
            name: "ferry-spawn setsid+uid+rlimit+pdeathsig",
            forks: false,
            run: Box::new(move || {
                let mut cmd = Command::new("/bin/true");
                all_options(&mut cmd);
                assert!(cmd.status().unwrap().success());
            }),
        },
        Method {
            name: "ferry-spawn server, all options",
            forks: false,
            run: Box::new(move || {
                let mut cmd = Command::new("/bin/true");
                all_options(&mut cmd);
                assert!(cmd.spawn_via(&server).unwrap().wait().unwrap().success());
            }),
        },
    ]
}

/// Touched anonymous memory, grown in steps and never freed.
struct Ballast {
    len: usize,
}

impl Ballast {
    fn grow_to(&mut self, len: usize) {
        if len <= self.len {
            return;
        }
        let extra = len - self.len;
        // SAFETY: a fresh private anonymous mapping we populate and keep.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                extra,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            // 4 KiB pages, as a malloc heap mostly has: fork copies their page tables.
            libc::madvise(addr, extra, libc::MADV_NOHUGEPAGE);
            assert_eq!(libc::madvise(addr, extra, libc::MADV_POPULATE_WRITE), 0);
        }
        self.len = len;
    }
}

fn rss_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Runs an outside reference (`PROGRAM RSS_BYTES N BUDGET_SECS`), which
/// prints `median_ns count`.
fn outside(program: &[String], rss: usize, n: usize) -> Option<(Duration, usize)> {
    let out = std::process::Command::new(&program[0])
        .args(&program[1..])
        .args([
            rss.to_string(),
            n.to_string(),
            FORK_BUDGET.as_secs().to_string(),
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace();
    let ns: u64 = fields.next()?.parse().ok()?;
    Some((Duration::from_nanos(ns), fields.next()?.parse().ok()?))
}

/// Spawns/s of /bin/true with all options from 8 threads, through the
/// server if one is given, else from this process.
fn throughput(server: Option<&Arc<Server>>, total: usize) -> f64 {
    let started = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let server = server.cloned();
            std::thread::spawn(move || {
                for _ in 0..total / 8 {
                    let mut cmd = Command::new("/bin/true");
                    all_options(&mut cmd);
                    let mut child = match &server {
                        Some(server) => cmd.spawn_via(server).unwrap(),
                        None => cmd.spawn().unwrap(),
                    };
                    assert!(child.wait().unwrap().success());
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    (total / 8 * 8) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    ferry_spawn::server::main_if_server();

    let mut args = std::env::args().skip(1);
    let mut n = 1000;
    let mut sizes_mb = vec![0, 100, 1000, 8000];
    let (mut go, mut python) = (None, None);
    let mut seen_n = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--go" => go = args.next().map(|p| vec![p]),
            "--python" => python = args.next().map(|p| vec!["python3".to_owned(), p]),
            // Positional: N first, then the sizes in MB.
            a if !seen_n => {
                n = a.parse().expect("N");
                seen_n = true;
            }
            a => {
                sizes_mb = a
                    .split(',')
                    .map(|s| s.parse().expect("MB,MB,..."))
                    .collect()
            }
        }
    }

    let server = Arc::new(Server::start().expect("spawn server"));
    let mut methods = methods(Arc::clone(&server));
    let mut ballast = Ballast { len: 0 };
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut throughputs = Vec::new();
    let mut fork_speedup = Vec::new();
    for &mb in &sizes_mb {
        let rss = mb << 20;
        // Outside references first, while this process is still at the previous size.
        let mut extra = Vec::new();
        for (name, program) in [("Go os/exec", &go), ("Python subprocess", &python)] {
            if let Some(program) = program {
                extra.push((name, outside(program, rss, n)));
            }
        }

        ballast.grow_to(rss);
        eprintln!("RSS {} MB: {n} rounds...", rss_mb());
        let mut times: Vec<Vec<Duration>> = methods.iter().map(|_| Vec::with_capacity(n)).collect();
        let mut spent = vec![Duration::ZERO; methods.len()];
        for _ in 0..n {
            for (i, method) in methods.iter_mut().enumerate() {
                if method.forks && spent[i] > FORK_BUDGET {
                    continue;
                }
                let start = Instant::now();
                (method.run)();
                let took = start.elapsed();
                spent[i] += took;
                times[i].push(took);
            }
        }
        let posix = median(times[POSIX_SPAWN].clone());
        let mut cells: Vec<(String, Duration, usize)> = methods
            .iter()
            .zip(&times)
            .map(|(m, t)| (m.name.to_owned(), median(t.clone()), t.len()))
            .collect();
        for (name, result) in extra {
            if let Some((med, count)) = result {
                cells.push((name.to_owned(), med, count));
            }
        }
        // The headline: how much faster than fork+exec, all options on.
        let speedup = cells[FORK].1.as_secs_f64() / cells[FERRY_ALL_OPTIONS].1.as_secs_f64();
        fork_speedup.push(format!("{speedup:.0}×"));
        for (name, med, count) in cells {
            let cell = format!(
                "{:.3} ms ({:.2}×){}",
                med.as_secs_f64() * 1e3,
                med.as_secs_f64() / posix.as_secs_f64(),
                if count < n {
                    format!(" n={count}")
                } else {
                    String::new()
                }
            );
            match rows.iter_mut().find(|(row, _)| *row == name) {
                Some((_, row)) => row.push(cell),
                None => rows.push((name, vec![cell])),
            }
        }
        if mb == sizes_mb[0] || mb == *sizes_mb.last().unwrap() {
            let (via_server, local) = (throughput(Some(&server), 4000), throughput(None, 4000));
            eprintln!(
                "  8 threads: server {via_server:.0} spawns/s, in-process {local:.0} spawns/s"
            );
            throughputs.push((rss_mb(), via_server, local));
        }
    }

    println!("Per-spawn median of spawn + wait of /bin/true, N = {n}; (×) = ratio to libc posix_spawn at the same RSS.");
    println!("n=K: a fork-based method stopped after its {FORK_BUDGET:?} budget, K spawns.\n");
    print!("| method |");
    for mb in &sizes_mb {
        print!(" parent RSS {mb} MB |");
    }
    println!("\n|---|{}", "---|".repeat(sizes_mb.len()));
    for (name, cells) in &rows {
        println!("| {name} | {} |", cells.join(" | "));
    }
    println!(
        "| **fork+exec time ÷ ferry-spawn all options** | {} |",
        fork_speedup.join(" | ")
    );
    println!();
    for (rss, via_server, local) in throughputs {
        println!(
            "8 threads spawning /bin/true with all options, parent RSS {rss} MB: \
             spawn server {via_server:.0} spawns/s; in-process ferry-spawn {local:.0} spawns/s (for scale)"
        );
    }
}
