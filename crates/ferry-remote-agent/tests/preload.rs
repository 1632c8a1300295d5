//! The preloaded library turns an unmodified program (`sleep`) into an agent host.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_remote::{maps, Mmap, Mode, Options, Remote};

/// The .so cargo built for this test: in target/<profile>/deps, beside the
/// test binary, or one level up when it was built as a top-level artifact.
fn library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [deps, deps.parent().unwrap()]
        .iter()
        .map(|dir| dir.join("libferry_remote_agent.so"))
        .find(|lib| lib.exists())
        .expect("libferry_remote_agent.so is built before its tests")
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn preloaded_sleep_serves_mappings_without_ptrace() {
    let child = Command::new("sleep")
        .arg("30")
        .env("LD_PRELOAD", library())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let sleeper = Killed(child);
    let pid = sleeper.0.id() as i32;

    // The constructor runs before main; give the loader a moment.
    let mut remote = None;
    for _ in 0..500 {
        if let Ok(r) = Remote::agent(pid) {
            remote = Some(r);
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut remote = remote.expect("the preloaded agent answers");
    assert_eq!(
        Remote::connect(pid, &Options::default()).unwrap().mode(),
        Mode::Agent
    );

    let addr = remote
        .mmap(&Mmap::anonymous(
            1 << 20,
            libc::PROT_READ | libc::PROT_WRITE,
        ))
        .unwrap();
    let m = maps::read(pid)
        .unwrap()
        .into_iter()
        .find(|m| m.contains(addr))
        .unwrap();
    assert_eq!(m.perms, "rw-p");
    let region = remote
        .share(4096, libc::PROT_READ | libc::PROT_WRITE, None)
        .unwrap();
    ferry_remote::mem::write(pid, region.remote_addr(), b"via preload").unwrap();
    // SAFETY: local_addr is our live 4 KiB shared mapping.
    let seen = unsafe { std::slice::from_raw_parts(region.local_addr() as *const u8, 11) };
    assert_eq!(seen, b"via preload");

    // sleep itself is unaffected: still asleep, not traced.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status.contains("TracerPid:\t0") && status.contains("State:\tS"),
        "{status}"
    );
}
