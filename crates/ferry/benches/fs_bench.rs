//! ferry-fs benchmark: ferry vs the raw directory vs bindfs (a libfuse
//! passthrough peer), measured side by side in ONE run, because these
//! machines are noisy. Not a timed test: it prints a markdown table to paste
//! into docs/benchmarks.md.
//!
//! Workloads, each repeated `FERRY_BENCH_REPS` times (default 5), targets
//! interleaved within each repetition; medians are reported:
//! - small files: `FERRY_BENCH_FILES` (5,000) × (create + 4 KiB write +
//!   close), then stat all, then unlink all: ops/s;
//! - sequential: `FERRY_BENCH_SEQ_MIB` (1,024) MiB in 1 MiB writes, timed
//!   before fsync (page cache) and including the final fsync; then a cold
//!   sequential read in 1 MiB reads after `echo 3 > drop_caches`: MiB/s;
//! - small writes: `FERRY_BENCH_SMALL_MIB` (64) MiB in 4 KiB writes to one
//!   file, as logs and databases write: MiB/s;
//! - commits: `FERRY_BENCH_COMMITS` (200) × (4 KiB write + fdatasync) on
//!   one open file, a database's commit loop: commits/s;
//! - untar: `tar xzf` of the largest `.crate` in ~/.cargo/registry/cache
//!   (or `FERRY_BENCH_TARBALL`): seconds.
//!
//! `FERRY_BENCH_TARGETS=raw,bindfs,ferry` (default) selects targets; add
//! `ferry-uring` for ferry over FUSE's io_uring transport (`-o io_uring`:
//! the kernel's `enable_uring` must be on, which `scripts/bench-fs.sh` sees
//! to; the mount must say it serves through the rings, or the run stops).
//! Run with `scripts/bench-fs.sh` (installs bindfs, release build).

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Mount, Target, DEFAULT_OPTIONS};

/// One row of the final table: what, unit, whether higher is better, and
/// the samples per target (in target order).
struct Metric {
    name: String,
    unit: &'static str,
    higher_is_better: bool,
    samples: Vec<Vec<f64>>,
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    Some(s[s.len() / 2])
}

fn rate(count: f64, took: Duration) -> f64 {
    count / took.as_secs_f64()
}

/// Drops the page cache (needs root); returns whether it worked, so the
/// table can say "cold" or "warm" honestly.
fn drop_caches() -> bool {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    fs::write("/proc/sys/vm/drop_caches", b"3\n").is_ok()
}

/// Passes over the missing names in [`small_files`].
const MISS_PASSES: usize = 4;

/// create+write+close, stat, stat of missing names, unlink of `n` 4 KiB
/// files: ops/s each.
fn small_files(dir: &Path, n: usize) -> [f64; 4] {
    fs::create_dir(dir).unwrap();
    let block = vec![0x5Au8; 4096];
    let names: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("f{i:05}"))).collect();
    let t = Instant::now();
    for p in &names {
        File::create(p).unwrap().write_all(&block).unwrap();
    }
    let create = rate(n as f64, t.elapsed());
    let t = Instant::now();
    for p in &names {
        assert_eq!(fs::metadata(p).unwrap().len(), 4096);
    }
    let stat = rate(n as f64, t.elapsed());
    // What a compiler's include path, `$PATH` or Python's imports do: the
    // same misses, again and again.
    let missing: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("g{i:05}"))).collect();
    let t = Instant::now();
    for _ in 0..MISS_PASSES {
        for p in &missing {
            let err = fs::symlink_metadata(p).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        }
    }
    let miss = rate((n * MISS_PASSES) as f64, t.elapsed());
    let t = Instant::now();
    for p in &names {
        fs::remove_file(p).unwrap();
    }
    let unlink = rate(n as f64, t.elapsed());
    fs::remove_dir(dir).unwrap();
    [create, stat, miss, unlink]
}

/// `mib` MiB written to one file in 4 KiB writes: MiB/s. Each write that
/// costs a FUSE request shows here (it did: see FUSE_HANDLE_KILLPRIV_V2 in
/// ferry-fs's fuse.rs).
fn small_writes(file: &Path, mib: usize) -> f64 {
    let block = [0xA5u8; 4096];
    let t = Instant::now();
    let mut f = File::create(file).unwrap();
    for _ in 0..mib * 256 {
        f.write_all(&block).unwrap();
    }
    drop(f);
    let took = t.elapsed();
    assert_eq!(fs::metadata(file).unwrap().len(), (mib << 20) as u64);
    fs::remove_file(file).unwrap();
    rate(mib as f64, took)
}

/// `n` × (4 KiB appended + `fdatasync`) on one open file: commits/s. An
/// fsync that flushes more than the file shows here.
fn commits(file: &Path, n: usize) -> f64 {
    let block = [0x3Cu8; 4096];
    let mut f = File::create(file).unwrap();
    let t = Instant::now();
    for _ in 0..n {
        f.write_all(&block).unwrap();
        f.sync_data().unwrap();
    }
    let took = t.elapsed();
    drop(f);
    fs::remove_file(file).unwrap();
    rate(n as f64, took)
}

/// Sequential write of `mib` MiB (MiB/s before fsync, MiB/s including
/// fsync), then cold sequential read (MiB/s).
fn sequential(file: &Path, mib: usize) -> [f64; 3] {
    let block: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let t = Instant::now();
    let mut f = File::create(file).unwrap();
    for _ in 0..mib {
        f.write_all(&block).unwrap();
    }
    let written = t.elapsed();
    f.sync_all().unwrap();
    let synced = t.elapsed();
    drop(f);
    drop_caches();
    let mut buf = vec![0u8; 1 << 20];
    let mut f = File::open(file).unwrap();
    let t = Instant::now();
    let mut total = 0usize;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    let read = t.elapsed();
    assert_eq!(total, mib << 20, "read back a different size");
    fs::remove_file(file).unwrap();
    [
        rate(mib as f64, written),
        rate(mib as f64, synced),
        rate(mib as f64, read),
    ]
}

/// Seconds for `tar xzf tarball -C dir`; the tree is removed afterwards.
fn untar(tarball: &Path, dir: &Path) -> f64 {
    fs::create_dir(dir).unwrap();
    let t = Instant::now();
    let out = support::run_bounded(
        Command::new("tar")
            .arg("xzf")
            .arg(tarball)
            .arg("-C")
            .arg(dir),
        Duration::from_secs(600),
    )
    .expect("tar");
    let took = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "tar failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::remove_dir_all(dir).unwrap();
    took
}

/// The largest `.crate` in the cargo registry cache (or FERRY_BENCH_TARBALL).
fn pick_tarball() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("FERRY_BENCH_TARBALL") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var("CARGO_HOME")
        .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap()));
    let mut best: Option<(u64, PathBuf)> = None;
    for reg in fs::read_dir(Path::new(&home).join("registry/cache"))
        .ok()?
        .flatten()
    {
        for e in fs::read_dir(reg.path()).ok()?.flatten() {
            let p = e.path();
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            if p.extension().is_some_and(|x| x == "crate")
                && best.as_ref().is_none_or(|(l, _)| len > *l)
            {
                best = Some((len, p));
            }
        }
    }
    best.map(|(_, p)| p)
}

fn shell(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// One column of the table: a target and how it is mounted.
#[derive(Clone, Copy, PartialEq)]
enum Column {
    Raw,
    Bindfs,
    Ferry,
    /// ferry with `-o io_uring`.
    FerryUring,
}

impl Column {
    fn parse(name: &str) -> Column {
        match name.trim() {
            "raw" => Column::Raw,
            "bindfs" => Column::Bindfs,
            "ferry" => Column::Ferry,
            "ferry-uring" => Column::FerryUring,
            other => panic!("unknown target {other:?} in FERRY_BENCH_TARGETS"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Column::FerryUring => "ferry-uring",
            Column::Raw => Target::Raw.name(),
            Column::Bindfs => Target::Bindfs.name(),
            Column::Ferry => Target::Ferry.name(),
        }
    }

    fn mount(self) -> Mount {
        let target = match self {
            Column::Raw => Target::Raw,
            Column::Bindfs => Target::Bindfs,
            Column::Ferry | Column::FerryUring => Target::Ferry,
        };
        if self != Column::FerryUring {
            return Mount::with(target, DEFAULT_OPTIONS);
        }
        let m = Mount::with(target, &format!("{DEFAULT_OPTIONS},io_uring"));
        // The daemon logs its transport just after the mount appears.
        let rings = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            m.daemon_log().contains("transport io_uring")
        });
        assert!(
            rings,
            "ferry-uring mounted without the rings:\n{}",
            m.daemon_log()
        );
        m
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let targets: Vec<Column> = std::env::var("FERRY_BENCH_TARGETS")
        .unwrap_or_else(|_| "raw,bindfs,ferry".into())
        .split(',')
        .map(Column::parse)
        .collect();
    let reps = support::env_u64("FERRY_BENCH_REPS", 5) as usize;
    let files = support::env_u64("FERRY_BENCH_FILES", 5000) as usize;
    let mib = support::env_u64("FERRY_BENCH_SEQ_MIB", 1024) as usize;
    let small_mib = support::env_u64("FERRY_BENCH_SMALL_MIB", 64) as usize;
    let n_commits = support::env_u64("FERRY_BENCH_COMMITS", 200) as usize;
    let tarball = pick_tarball();
    let cold = drop_caches();

    eprintln!(
        "mounting {:?}",
        targets.iter().map(|t| t.name()).collect::<Vec<_>>()
    );
    let mounts: Vec<Mount> = targets.iter().map(|t| t.mount()).collect();
    let read_kind = if cold {
        "cold, after drop_caches"
    } else {
        "WARM: drop_caches failed"
    };
    let mut metrics: Vec<Metric> = [
        (
            format!("create + 4 KiB write + close ({files} files)"),
            "ops/s",
            true,
        ),
        ("stat".into(), "ops/s", true),
        (
            format!("stat of a missing name ({MISS_PASSES} passes over {files})"),
            "ops/s",
            true,
        ),
        ("unlink".into(), "ops/s", true),
        (
            format!("seq write {mib} MiB, 1 MiB writes, no fsync"),
            "MiB/s",
            true,
        ),
        (format!("seq write {mib} MiB + final fsync"), "MiB/s", true),
        (
            format!("seq read {mib} MiB, 1 MiB reads ({read_kind})"),
            "MiB/s",
            true,
        ),
        (
            format!("write {small_mib} MiB in 4 KiB writes"),
            "MiB/s",
            true,
        ),
        (
            format!("{n_commits} × (4 KiB write + fdatasync), one open file"),
            "commits/s",
            true,
        ),
    ]
    .into_iter()
    .map(|(name, unit, hi)| Metric {
        name,
        unit,
        higher_is_better: hi,
        samples: vec![Vec::new(); targets.len()],
    })
    .collect();
    if let Some(t) = &tarball {
        let name = t.file_name().unwrap().to_string_lossy().into_owned();
        metrics.push(Metric {
            name: format!("untar {name} (tar xzf)"),
            unit: "s",
            higher_is_better: false,
            samples: vec![Vec::new(); targets.len()],
        });
    }

    for rep in 0..reps {
        for (i, m) in mounts.iter().enumerate() {
            eprintln!("rep {}/{reps}: {}", rep + 1, targets[i].name());
            let small = small_files(&m.join(&format!("small-{rep}")), files);
            let seq = sequential(&m.join(&format!("seq-{rep}")), mib);
            let writes = small_writes(&m.join(&format!("writes-{rep}")), small_mib);
            let synced = commits(&m.join(&format!("commits-{rep}")), n_commits);
            let all = small.into_iter().chain(seq).chain([writes, synced]);
            for (k, v) in all.enumerate() {
                metrics[k].samples[i].push(v);
            }
            if let Some(t) = &tarball {
                // The untar row is the last one.
                let row = metrics.len() - 1;
                metrics[row].samples[i].push(untar(t, &m.join(&format!("untar-{rep}"))));
            }
        }
    }
    drop(mounts);

    let col = |t: Column| targets.iter().position(|&x| x == t);
    let ratio = |m: &Metric, a: Option<usize>, b: Option<usize>| match (a, b) {
        (Some(a), Some(b)) => match (median(&m.samples[a]), median(&m.samples[b])) {
            (Some(x), Some(y)) if y > 0.0 => format!("{:.2}×", x / y),
            _ => "—".into(),
        },
        _ => "—".into(),
    };
    let fmt = |v: Option<f64>| match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
        None => "—".into(),
    };
    println!("## ferry-fs vs raw directory vs bindfs\n");
    println!(
        "Machine: {} cores, kernel {}, {} on {} ({}), scratch under {}. {} UTC. Medians of {reps} runs, targets interleaved.",
        shell("nproc"),
        shell("uname -r"),
        shell("df -T \"${TMPDIR:-/tmp}\" | awk 'NR==2{print $2}'"),
        shell("df \"${TMPDIR:-/tmp}\" | awk 'NR==2{print $1}'"),
        shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'"),
        shell("echo \"${TMPDIR:-/tmp}\""),
        shell("date -u '+%Y-%m-%d %H:%M'"),
    );
    println!(
        "All mounts: `-o {DEFAULT_OPTIONS}`; ferry io_uring adds `io_uring`. bindfs: `bindfs -f -o {DEFAULT_OPTIONS} SRC MNT`, SRC on the same disk.\n"
    );
    // The io_uring columns only when that target ran.
    let rings = col(Column::FerryUring).is_some();
    let (head, rule) = if rings {
        (
            " ferry io_uring | ferry/raw | ferry/bindfs | io_uring/bindfs | io_uring/ferry |",
            "---|---|---|---|---|",
        )
    } else {
        (" ferry/raw | ferry/bindfs |", "---|---|")
    };
    println!("| workload | unit | raw | bindfs | ferry |{head}");
    println!("|---|---|---|---|---|{rule}");
    for m in &metrics {
        let cell = |t: Column| fmt(col(t).and_then(|i| median(&m.samples[i])));
        let better = if m.higher_is_better {
            "higher is better"
        } else {
            "lower is better"
        };
        let ferry = col(Column::Ferry);
        let mut row = format!(
            "| {} | {} ({better}) | {} | {} | {} |",
            m.name,
            m.unit,
            cell(Column::Raw),
            cell(Column::Bindfs),
            cell(Column::Ferry),
        );
        if rings {
            row += &format!(" {} |", cell(Column::FerryUring));
        }
        row += &format!(
            " {} | {} |",
            ratio(m, ferry, col(Column::Raw)),
            ratio(m, ferry, col(Column::Bindfs))
        );
        if rings {
            let uring = col(Column::FerryUring);
            row += &format!(
                " {} | {} |",
                ratio(m, uring, col(Column::Bindfs)),
                ratio(m, uring, ferry)
            );
        }
        println!("{row}");
    }
    let names: Vec<&str> = targets.iter().map(|t| t.name()).collect();
    println!(
        "\nCommand: `FERRY_BENCH_TARGETS={} FERRY_BENCH_REPS={reps} FERRY_BENCH_FILES={files} FERRY_BENCH_SEQ_MIB={mib} FERRY_BENCH_SMALL_MIB={small_mib} FERRY_BENCH_COMMITS={n_commits} scripts/bench-fs.sh`",
        names.join(",")
    );
}
