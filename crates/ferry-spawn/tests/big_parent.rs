//! A parent with 4 GiB of touched memory spawns as fast as a small one.
//!
//! The big parent is this same test binary re-run as a subprocess (so the
//! 4 GiB never sit in the process running the other tests), filtered down
//! to the ignored `big_parent_child` test, with an env marker.

mod common;

use std::time::{Duration, Instant};

use ferry_spawn::{Command, Stdio};

const MARKER: &str = "FERRY_SPAWN_BIG_PARENT";
const SIZE: usize = 4 << 30;

#[test]
fn a_four_gib_parent_spawns_at_small_parent_speed() {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "big_parent_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(MARKER, "1")
        .stdout(Stdio::Piped)
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(&mut out).unwrap());
    let status = match child.wait_timeout(Duration::from_secs(120)).unwrap() {
        Some(status) => status,
        None => {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("big parent timed out");
        }
    };
    let out = reader.join().unwrap();
    println!("{out}");
    assert!(status.success(), "{status:?}");
    assert!(out.contains("big parent ok"), "{out}");
}

fn median_spawn(n: usize) -> Duration {
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let start = Instant::now();
            let mut child = Command::new("/bin/true").setsid(true).spawn().unwrap();
            assert!(common::wait(&mut child).success());
            start.elapsed()
        })
        .collect();
    times.sort();
    times[n / 2]
}

#[test]
#[ignore = "run by a_four_gib_parent_spawns_at_small_parent_speed as a subprocess"]
fn big_parent_child() {
    if std::env::var_os(MARKER).is_none() {
        return;
    }
    let small = median_spawn(30);
    // SAFETY: a fresh private anonymous mapping, populated and then left alone.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(addr, libc::MAP_FAILED);
        libc::madvise(addr, SIZE, libc::MADV_HUGEPAGE);
        assert_eq!(
            libc::madvise(addr, SIZE, libc::MADV_POPULATE_WRITE),
            0,
            "{}",
            std::io::Error::last_os_error()
        );
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let rss_kb: usize = common::field(&status, "VmRSS")
        .trim_end_matches(" kB")
        .parse()
        .unwrap();
    assert!(rss_kb >= SIZE / 1024, "RSS {rss_kb} kB");
    let big = median_spawn(30);
    println!(
        "median spawn: {small:?} small, {big:?} with {} MiB RSS",
        rss_kb / 1024
    );
    // vfork does not copy page tables: the big parent must not be much slower.
    assert!(
        big < small * 3 + Duration::from_millis(1),
        "{big:?} vs {small:?}"
    );
    println!("big parent ok");
}
