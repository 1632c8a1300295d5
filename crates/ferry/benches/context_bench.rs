//! Per-process file-system context (issue 10), measured. Not a timed test:
//! it prints markdown tables for docs/benchmarks.md, each a side-by-side
//! comparison made in this one run. Two parts:
//!
//! 1. **fsync**: what `durability=remote` costs. Two writer processes on one
//!    mount replicating to PostgreSQL, started by `ferry run --durability
//!    local` and `ferry run --durability remote` (each re-executes this
//!    program as a worker), take turns: each rewrites 4 KiB at offset 0 of
//!    its own file and fsyncs, N times; then each creates a new file,
//!    writes 4 KiB and closes it, N times. The fsync (or the close) alone is
//!    timed. PostgreSQL is on the loopback (0 ms) or behind the delay proxy
//!    of support/wan.rs (the kernel has no sch_netem).
//! 2. **lookup**: what looking the caller's context up on every open,
//!    create, flush and fsync costs: the create + 4 KiB write + close loop
//!    of fs_bench.rs (one process, one directory), on three mounts that
//!    each replicate to a `dir:` volume (without a backend no lookup
//!    happens). On the first the process table stays empty (a lookup is one
//!    atomic load). On the other two, unrelated processes hold non-default
//!    contexts; on the second this process has also set `durability=local
//!    reads=cached` explicitly (every lookup finds its entry and polls its
//!    pidfd), on the third it has no entry (every lookup looks in /proc for
//!    an ancestor with one). Runs rotate over the mounts, each followed by
//!    an untimed `ferry sync` so no run inherits another's shipping. Also
//!    the daemon's CPU time per create (user + system of the whole daemon,
//!    from /proc/PID/stat, from the start of a run to the end of its sync:
//!    shipping the files included), and `ProcessTable::lookup` timed in
//!    process, without FUSE, for each kind of table.
//!
//! Env (defaults in brackets): `FERRY_CONTEXT_PARTS` [fsync,lookup],
//! `FERRY_CONTEXT_RTTS_MS` [0,50], `FERRY_CONTEXT_FSYNCS` [200: per mode
//! and operation at 0 ms], `FERRY_CONTEXT_WAN_FSYNCS` [50: the same above
//! 0 ms], `FERRY_CONTEXT_FILES` [5000: creates per run],
//! `FERRY_CONTEXT_REPS` [7: runs per mount], `FERRY_CONTEXT_OTHERS` [4:
//! unrelated processes with a context].
//! Run with `scripts/bench-context.sh` (release build; needs root for the
//! mounts and the network namespace).

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use ferry_backend::testing::PgServer;
use ferry_fs::context::{
    Context, ContextUpdate, Durability, ProcessTable, RawContext, Reads, FERRY_IOC_GET_CONTEXT,
    FERRY_IOC_SET_CONTEXT, RAW_SIZE,
};
use support::cli::{dir_backend, init, sync};
use support::wan::{url_addr, url_via, Wan};
use support::{env_u64, ferry_bin, Mount};

/// The argument that makes this program a writer worker (see [`worker`]).
const WORKER: &str = "--context-worker";
/// Bound on one worker operation, one `ferry run` start, one process.
const STEP: Duration = Duration::from_secs(150);
/// A remote fsync or close may wait this long (the worker's `--timeout`):
/// longer than [`STEP`] would be pointless, shorter would turn a slow
/// backend into EIO instead of a number.
const REMOTE_TIMEOUT: &str = "120";
/// The block every write writes.
const BLOCK: usize = 4096;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(WORKER) {
        if let Err(e) = worker(Path::new(&args[2])) {
            eprintln!("context worker: {e}");
            std::process::exit(1);
        }
        return;
    }
    // Otherwise `cargo bench` passes `--bench`; nothing else to parse.
    support::init_process();
    let parts = std::env::var("FERRY_CONTEXT_PARTS").unwrap_or_else(|_| "fsync,lookup".into());
    println!("{}\n", machine());
    for part in parts.split(',') {
        match part.trim() {
            "fsync" => fsync_part(),
            "lookup" => lookup_part(),
            other => panic!("unknown part {other:?} in FERRY_CONTEXT_PARTS"),
        }
    }
}

// ----- the worker -------------------------------------------------------------

/// The ioctl on `file` with a [`RawContext`] in and out.
fn context_ioctl(file: &File, cmd: u32, raw: &RawContext) -> io::Result<RawContext> {
    let mut bytes = raw.to_bytes();
    // SAFETY: both context commands encode a RAW_SIZE-byte argument, and
    // `bytes` is one, alive for the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), cmd as libc::Ioctl, bytes.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    RawContext::from_bytes(&bytes[..RAW_SIZE]).map_err(io::Error::other)
}

/// A writer in `dir` (inside a ferry mount), started by `ferry run`: says
/// its effective context ("ready DURABILITY READS"), then for each line on
/// stdin does one operation and answers the nanoseconds it was timed for:
/// - `fsync I`: rewrites 4 KiB at offset 0 of `dir/fsync`, times fsync;
/// - `close I`: creates `dir/close-I`, writes 4 KiB, times close.
///
/// Ends at EOF.
fn worker(dir: &Path) -> io::Result<()> {
    let ctx = context_ioctl(
        &File::open(dir)?,
        FERRY_IOC_GET_CONTEXT,
        &RawContext::default(),
    )?
    .context()
    .map_err(io::Error::other)?;
    let mut out = io::stdout().lock();
    writeln!(out, "ready {} {}", ctx.durability, ctx.reads)?;
    out.flush()?;
    let log = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("fsync"))?;
    for line in io::stdin().lock().lines() {
        let line = line?;
        let (op, i) = line.split_once(' ').unwrap_or((&line, "0"));
        let i: u64 = i.parse().map_err(io::Error::other)?;
        // A different block each time, so every write is a real change.
        let block = vec![(i % 251) as u8; BLOCK];
        let took = match op {
            "fsync" => {
                log.write_all_at(&block, 0)?;
                let t = Instant::now();
                log.sync_all()?;
                t.elapsed()
            }
            "close" => {
                let mut f = File::create(dir.join(format!("close-{i:05}")))?;
                f.write_all(&block)?;
                let t = Instant::now();
                close(f)?;
                t.elapsed()
            }
            _ => return Err(io::Error::other(format!("unknown request {line:?}"))),
        };
        writeln!(out, "{}", took.as_nanos())?;
        out.flush()?;
    }
    Ok(())
}

/// Closes `f`, reporting close's error (drop would ignore it).
fn close(f: File) -> io::Result<()> {
    use std::os::fd::IntoRawFd;
    // SAFETY: closes the descriptor `f` gave up, once.
    if unsafe { libc::close(f.into_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A worker process, from the bench's side: killed and reaped on drop.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    mode: Durability,
}

impl Worker {
    /// `ferry run --mount M --durability MODE -- THIS --context-worker DIR`,
    /// checked to have the context asked for.
    fn start(m: &Mount, mode: Durability) -> Worker {
        let dir = m.join(&format!("worker-{mode}"));
        fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new(ferry_bin())
            .arg("run")
            .arg("--mount")
            .arg(m.path())
            .args(["--durability", mode.as_str(), "--timeout", REMOTE_TIMEOUT])
            .arg("--")
            .arg(std::env::current_exe().unwrap())
            .arg(WORKER)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("ferry run: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        // Read in a thread so every answer can be waited for with a bound.
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut w = Worker {
            child,
            stdin,
            lines,
            mode,
        };
        let ready = w.answer(m);
        assert_eq!(
            ready,
            format!("ready {mode} cached"),
            "the {mode} worker's context"
        );
        w
    }

    /// The next line the worker prints, bounded by [`STEP`].
    fn answer(&mut self, m: &Mount) -> String {
        self.lines.recv_timeout(STEP).unwrap_or_else(|e| {
            panic!(
                "the {} worker: no answer ({e}); daemon log:\n{}",
                self.mode,
                m.daemon_log()
            )
        })
    }

    /// One timed operation (`fsync` or `close`), the `i`th.
    fn time(&mut self, m: &Mount, op: &str, i: usize) -> Duration {
        writeln!(self.stdin, "{op} {i}").unwrap();
        self.stdin.flush().unwrap();
        let ns = self.answer(m);
        Duration::from_nanos(ns.parse().unwrap_or_else(|_| panic!("{op}: {ns:?}")))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ----- part 1: fsync and close latency ------------------------------------------

/// Nearest-rank percentile `p` (0–100) of `v`, in ms.
fn percentile_ms(v: &[Duration], p: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// A latency in ms for a table.
fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One table row: samples of both modes for one RTT and operation.
struct Latency {
    rtt_ms: u64,
    op: &'static str,
    local: Vec<Duration>,
    remote: Vec<Duration>,
}

/// Both workers do `op` `n` times, taking turns (who goes first
/// alternates), after `warmup` untimed turns each.
fn take_turns(
    m: &Mount,
    workers: &mut [Worker; 2],
    op: &'static str,
    n: usize,
) -> [Vec<Duration>; 2] {
    let warmup = 3;
    let mut samples = [Vec::new(), Vec::new()];
    for i in 0..warmup + n {
        for k in [i % 2, 1 - i % 2] {
            let took = workers[k].time(m, op, i);
            if i >= warmup {
                samples[k].push(took);
            }
        }
    }
    samples
}

fn fsync_part() {
    let rtts: Vec<u64> = std::env::var("FERRY_CONTEXT_RTTS_MS")
        .unwrap_or_else(|_| "0,50".into())
        .split(',')
        .map(|r| r.trim().parse().expect("FERRY_CONTEXT_RTTS_MS: numbers"))
        .collect();
    let lan_n = env_u64("FERRY_CONTEXT_FSYNCS", 200) as usize;
    let wan_n = env_u64("FERRY_CONTEXT_WAN_FSYNCS", 50) as usize;
    let pg = PgServer::start();
    let mut rows = Vec::new();
    for &rtt in &rtts {
        let n = if rtt == 0 { lan_n } else { wan_n };
        let direct = pg.create_database(&format!("context_bench_{rtt}"));
        init(&direct);
        // At 0 ms the daemon talks to PostgreSQL directly, not through an
        // idle proxy; `wan` lives as long as the mount.
        let mut wan = Wan::new(Duration::from_micros(rtt * 500));
        let url = if rtt == 0 {
            direct.clone()
        } else {
            url_via(&direct, wan.expose(url_addr(&direct)))
        };
        let m = Mount::with_backend(&url);
        // Connected and verified before anything is timed.
        sync(&m);
        let mut workers = [
            Worker::start(&m, Durability::Local),
            Worker::start(&m, Durability::Remote),
        ];
        for op in ["fsync", "close"] {
            eprintln!("fsync part: {rtt} ms RTT, {op} × {n} per mode");
            let [local, remote] = take_turns(&m, &mut workers, op, n);
            rows.push(Latency {
                rtt_ms: rtt,
                op,
                local,
                remote,
            });
        }
    }

    println!("## Per-process context: fsync and close with durability local vs remote\n");
    println!(
        "Two writer processes on one mount replicating to PostgreSQL (a local server; at 50 ms through the user-space delay proxy of support/wan.rs, half the RTT each way), one started by `ferry run --durability local`, the other by `ferry run --durability remote`, taking turns. fsync: rewrite 4 KiB at offset 0 of the process's own file, then `fsync` (timed). close: create a new file, write 4 KiB, `close` (timed). 3 untimed turns first. Milliseconds.\n"
    );
    println!("| RTT to PostgreSQL | operation | samples per mode | local: median | local: p99 | remote: median | remote: p99 | remote/local (medians) | remote median in RTTs |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let (lm, rm) = (
            percentile_ms(&r.local, 50.0),
            percentile_ms(&r.remote, 50.0),
        );
        let rtts = if r.rtt_ms > 0 {
            format!("{:.1}", rm / r.rtt_ms as f64)
        } else {
            "—".into()
        };
        println!(
            "| {} ms | {} | {} | {} | {} | {} | {} | {:.0}× | {rtts} |",
            r.rtt_ms,
            r.op,
            r.local.len(),
            ms(lm),
            ms(percentile_ms(&r.local, 99.0)),
            ms(rm),
            ms(percentile_ms(&r.remote, 99.0)),
            rm / lm,
        );
    }
    println!(
        "\np99 is nearest-rank: with 50 samples, the largest. A local close sends nothing to the daemon (FOPEN_NOFLUSH); a remote one waits for the backend.\n"
    );
    println!(
        "Command: `FERRY_CONTEXT_PARTS=fsync FERRY_CONTEXT_RTTS_MS={} FERRY_CONTEXT_FSYNCS={lan_n} FERRY_CONTEXT_WAN_FSYNCS={wan_n} scripts/bench-context.sh`\n",
        rtts.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
    );
}

// ----- part 2: the cost of the lookup -----------------------------------------

/// The pid of the daemon serving `m`: the `ferry mount` whose command line
/// names its store.
fn daemon_pid(m: &Mount) -> u32 {
    let store = m.store().as_os_str().as_encoded_bytes().to_vec();
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.contains(&b"mount".as_slice()) && args.contains(&store.as_slice())
        })
        .unwrap_or_else(|| panic!("no daemon for {}", m.store().display()))
}

/// CPU time (user + system) of process `pid` so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields 14 and 15, counted after the command name's last ')'.
    let after = stat.rsplit_once(')').unwrap().1;
    let f: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    f[0] + f[1]
}

fn clock_ticks_per_s() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).unwrap_or(100)
}

/// Nanoseconds per `ProcessTable::lookup`, in process (no FUSE, no
/// daemon), of this process: on an empty table; once the processes `others`
/// hold `remote/fresh` and this one `local/cached` explicitly; with only
/// `others` in the table (this process has no entry and no ancestor with
/// one, so each lookup looks for one in /proc). Last, on that table, of a
/// child started after the entries (its walk goes one generation further).
fn lookup_ns(others: &[u32]) -> [f64; 4] {
    const LOOKUPS: u32 = 100_000;
    let me = std::process::id();
    let time = |table: &ProcessTable, pid: u32| {
        let t = Instant::now();
        for _ in 0..LOOKUPS {
            std::hint::black_box(table.lookup(std::hint::black_box(pid)));
        }
        t.elapsed().as_nanos() as f64 / f64::from(LOOKUPS)
    };
    let set = |table: &ProcessTable, pid: u32, durability, reads| {
        let update = ContextUpdate {
            durability: Some(durability),
            reads: Some(reads),
            timeout: None,
        };
        table
            .set(pid, &update)
            .expect("setting a context in process");
    };
    let table = |own: bool| {
        let t = ProcessTable::new(Context::default());
        for &pid in others {
            set(&t, pid, Durability::Remote, Reads::Fresh);
        }
        if own {
            set(&t, me, Durability::Local, Reads::Cached);
        }
        t
    };
    let empty = time(&ProcessTable::new(Context::default()), me);
    let own = time(&table(true), me);
    let without = table(false);
    let none = time(&without, me);
    // Start times have clock-tick resolution: make sure the child's is
    // later than every entry's.
    thread::sleep(Duration::from_millis(30));
    let child = Background(Command::new("sleep").arg("3600").spawn().unwrap());
    let later = time(&without, child.0.id());
    [empty, own, none, later]
}

/// `n` × (create + 4 KiB write + close) in a new directory `dir`, as
/// fs_bench.rs does it: creates/s.
fn creates(dir: &Path, n: usize) -> f64 {
    fs::create_dir(dir).unwrap();
    let block = vec![0x5Au8; BLOCK];
    let names: Vec<_> = (0..n).map(|i| dir.join(format!("f{i:05}"))).collect();
    let t = Instant::now();
    for p in &names {
        File::create(p).unwrap().write_all(&block).unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// One mount of the comparison and its samples.
struct Arm {
    name: &'static str,
    mount: Mount,
    daemon: u32,
    rates: Vec<f64>,
    ticks: u64,
}

impl Arm {
    fn new(name: &'static str, url: &str) -> Arm {
        let mount = Mount::with_backend(url);
        sync(&mount);
        Arm {
            name,
            daemon: daemon_pid(&mount),
            mount,
            rates: Vec::new(),
            ticks: 0,
        }
    }

    fn run(&mut self, rep: usize, n: usize) {
        let before = cpu_ticks(self.daemon);
        self.rates
            .push(creates(&self.mount.join(&format!("small-{rep}")), n));
        // The CPU window ends after the sync, so it holds all the shipping
        // of these files, not whatever part of it overlapped the loop.
        sync(&self.mount);
        self.ticks += cpu_ticks(self.daemon) - before;
        eprintln!(
            "lookup part, run {}: {}: {:.0} creates/s",
            rep + 1,
            self.name,
            self.rates.last().unwrap()
        );
    }

    fn mnt(&self) -> &str {
        self.mount.path().to_str().unwrap()
    }

    /// How many processes `ferry status --processes` lists here.
    fn listed(&self) -> usize {
        let out = support::cli::ferry(&["status", "--processes", "--json", self.mnt()]);
        out.lines().count()
    }
}

/// A process that is killed and reaped however the bench ends.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn lookup_part() {
    let n = env_u64("FERRY_CONTEXT_FILES", 5000) as usize;
    let reps = env_u64("FERRY_CONTEXT_REPS", 7) as usize;
    let others = env_u64("FERRY_CONTEXT_OTHERS", 4) as usize;
    let volumes = [dir_backend(), dir_backend(), dir_backend()];
    let mut arms = [
        Arm::new("empty table", &volumes[0].2),
        Arm::new("populated, own entry", &volumes[1].2),
        Arm::new("populated, no entry of its own", &volumes[2].2),
    ];

    // This process, on the second mount: the mount's default values, but
    // set explicitly, so it has an entry of its own.
    let root = File::open(arms[1].mount.path()).unwrap();
    let explicit = RawContext::from_update(&ContextUpdate {
        durability: Some(Durability::Local),
        reads: Some(Reads::Cached),
        timeout: None,
    });
    context_ioctl(&root, FERRY_IOC_SET_CONTEXT, &explicit).expect("setting this process's context");
    let others_running: Vec<Background> = (0..others)
        .map(|_| {
            Background(
                Command::new(ferry_bin())
                    .args(["run", "--mount", arms[1].mnt(), "--mount", arms[2].mnt()])
                    .args(["--durability", "remote", "--reads", "fresh"])
                    .args(["--", "sleep", "3600"])
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let listed = support::poll_until(STEP, || arms[1..].iter().all(|a| a.listed() >= others));
    assert!(listed, "the unrelated processes' contexts are not listed");
    let in_process = lookup_ns(&others_running.iter().map(|b| b.0.id()).collect::<Vec<_>>());

    for rep in 0..reps {
        for k in 0..arms.len() {
            // Each arm goes first, second and third in turn.
            arms[(k + rep) % arms.len()].run(rep, n);
        }
    }
    // The tables must still be populated: nothing above may have emptied
    // them.
    for a in &arms[1..] {
        assert!(a.listed() >= others, "{}: the table emptied", a.name);
    }

    let hz = clock_ticks_per_s() as f64;
    let per_create = |arm: &Arm| arm.ticks as f64 / hz * 1e6 / (arm.rates.len() * n) as f64;
    let empty = &arms[0];
    // Runs of one rep made back to back, as ratios: less exposed to drift
    // in the machine's speed than the ratio of medians.
    let pairs = |arm: &Arm| {
        let r: Vec<f64> = empty
            .rates
            .iter()
            .zip(&arm.rates)
            .map(|(x, y)| y / x)
            .collect();
        median(&r)
    };
    println!("## Per-process context: the cost of the lookup on every request\n");
    println!(
        "create + 4 KiB write + close, {n} files in a new directory, one process, as fs_bench.rs does it, on three mounts that each replicate to their own `dir:` volume (so every open, create, flush and fsync looks the caller's context up). Empty table: nobody set a context on that mount, a lookup is one atomic load. Populated, own entry: this process set `durability=local reads=cached` explicitly (the defaults, so the same requests and flags) and {others} unrelated processes hold `durability=remote reads=fresh`, so each lookup reads the table and polls this process's pidfd. Populated, no entry of its own: only the {others} unrelated processes have a context, so each lookup of this process reads /proc/PID/status and /proc/PID/stat to look for an ancestor with one (and finds none). {reps} runs per mount, rotating the order, each followed by an untimed `ferry sync`. Daemon CPU: user + system of the whole daemon from the start of each run to the end of its sync (so shipping the files included), from /proc/PID/stat, summed over all runs. In process: `ProcessTable::lookup` called directly, 10⁵ times, no FUSE.\n"
    );
    let [a, b, c] = &arms;
    println!(
        "| | {} | {} | {} | own entry / empty | no entry / empty |",
        a.name, b.name, c.name
    );
    println!("|---|---|---|---|---|---|");
    let row = |what: &str, v: [f64; 3], digits: usize| {
        println!(
            "| {what} | {:.digits$} | {:.digits$} | {:.digits$} | {:.3}× | {:.3}× |",
            v[0],
            v[1],
            v[2],
            v[1] / v[0],
            v[2] / v[0]
        );
    };
    row(
        "creates/s, median (higher is better)",
        [median(&a.rates), median(&b.rates), median(&c.rates)],
        0,
    );
    println!(
        "| creates/s, median of the per-rep ratios to the empty table | | | | {:.3}× | {:.3}× |",
        pairs(b),
        pairs(c)
    );
    row(
        "daemon CPU per create, µs (lower is better)",
        [per_create(a), per_create(b), per_create(c)],
        1,
    );
    row(
        "one lookup of this process, in process, ns",
        [in_process[0], in_process[1], in_process[2]],
        0,
    );
    let per_create_ns = 1e9 / median(&a.rates);
    println!(
        "| that lookup's added cost, as a share of one create's wall time (one lookup per create) | | {:.2}% | {:.2}% | | |",
        (in_process[1] - in_process[0]) / per_create_ns * 100.0,
        (in_process[2] - in_process[0]) / per_create_ns * 100.0
    );
    let runs = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "\nIn process, a child started after the entries (no entry; its walk reads one more /proc/PID/stat): {:.0} ns per lookup.\n",
        in_process[3]
    );
    println!("All runs, creates/s:\n");
    for arm in &arms {
        println!("- {}: {}", arm.name, runs(&arm.rates));
    }
    println!(
        "\nCommand: `FERRY_CONTEXT_PARTS=lookup FERRY_CONTEXT_FILES={n} FERRY_CONTEXT_REPS={reps} FERRY_CONTEXT_OTHERS={others} scripts/bench-context.sh`\n"
    );
}

/// Where this ran, for the tables.
fn machine() -> String {
    let sh = |cmd: &str| {
        Command::new("sh")
            .args(["-c", cmd])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "Machine: {} cores, kernel {}, {} on {} ({}, load average {}). {} UTC. ferry: `{}`.",
        sh("nproc"),
        sh("uname -r"),
        sh("df -T /tmp | awk 'NR==2{print $2}'"),
        sh("df /tmp | awk 'NR==2{print $1}'"),
        sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'"),
        sh("cut -d' ' -f1-3 /proc/loadavg"),
        sh("date -u '+%Y-%m-%d %H:%M'"),
        ferry_bin(),
    )
}
