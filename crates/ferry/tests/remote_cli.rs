//! `ferry map`, `ferry unmap` and `ferry maps` against a real `sleep`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ferry(args: &[&str]) -> Output {
    Command::new(FERRY).args(args).output().unwrap()
}

fn maps_line(pid: &str, addr: u64) -> Option<String> {
    let out = ferry(&["maps", "--pid", pid]);
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1) // the header
        .map(str::to_owned)
        .find(|line| {
            let (start, end) = line
                .split_whitespace()
                .next()
                .unwrap()
                .split_once('-')
                .unwrap();
            let (start, end) = (
                u64::from_str_radix(start, 16).unwrap(),
                u64::from_str_radix(end, 16).unwrap(),
            );
            (start..end).contains(&addr)
        })
}

fn hex(text: &str) -> u64 {
    u64::from_str_radix(text.trim().trim_start_matches("0x"), 16).unwrap()
}

#[test]
fn map_maps_unmap_and_share() {
    let sleeper = Killed(Command::new("sleep").arg("30").spawn().unwrap());
    let pid = sleeper.0.id().to_string();
    std::thread::sleep(std::time::Duration::from_millis(50));

    let out = ferry(&["map", "--pid", &pid, "--len", "1M", "--prot", "r"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let addr = hex(&String::from_utf8_lossy(&out.stdout));
    assert!(maps_line(&pid, addr).unwrap().contains(" r--p "));
    let out = ferry(&[
        "unmap",
        "--pid",
        &pid,
        "--addr",
        &format!("{addr:#x}"),
        "--len",
        "1M",
    ]);
    assert!(out.status.success());
    assert!(maps_line(&pid, addr).is_none());

    // Errors are one line naming the cause.
    let out = ferry(&["map", "--pid", "8388608", "--len", "1M"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "ferry: cannot act on process 8388608: no such process"
    );

    // --share holds our side while stdin is open; the target keeps its side after we exit.
    let mut share = Command::new(FERRY)
        .args(["map", "--pid", &pid, "--len", "64K", "--share"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(share.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let (remote, local) = line.trim().split_once(' ').unwrap();
    let (remote, local) = (hex(remote), hex(local));
    assert!(maps_line(&pid, remote).unwrap().contains(" rw-s "));
    assert!(maps_line(&share.id().to_string(), local)
        .unwrap()
        .contains("memfd:ferry-share"));
    drop(share.stdin.take());
    assert!(share.wait().unwrap().success());
    assert!(maps_line(&pid, remote)
        .unwrap()
        .contains("memfd:ferry-share"));
}
