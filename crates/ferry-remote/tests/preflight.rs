//! Every reason an attach cannot work is reported before anything is touched,
//! and the target keeps running unchanged afterwards.

mod common;

use std::process::Command;

use common::{spy_as_nobody, Victim};
use ferry_remote::preflight::Refusal;
use ferry_remote::{Error, Mmap, Options, Remote, Target};

fn refusal(pid: i32, options: &Options) -> Refusal {
    match Target::open(pid, options) {
        Err(Error::Refused { pid: p, reason }) => {
            assert_eq!(p, pid);
            reason
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn no_such_process() {
    // Above the kernel's largest pid_max (2^22), so it cannot exist.
    assert_eq!(
        refusal(1 << 23, &Options::default()),
        Refusal::NoSuchProcess
    );
}

#[test]
fn zombie() {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    // Not reaped yet: wait until it has exited and become a zombie.
    for _ in 0..500 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        if stat
            .rsplit(')')
            .next()
            .unwrap()
            .trim_start()
            .starts_with('Z')
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert_eq!(refusal(pid, &Options::default()), Refusal::Zombie);
    child.wait().unwrap();
}

#[test]
fn own_process() {
    assert_eq!(
        refusal(std::process::id() as i32, &Options::default()),
        Refusal::OwnProcess
    );
}

#[test]
fn already_traced_and_left_running() {
    let mut victim = Victim::spawn("read", &[]);
    let first = Target::new(victim.pid).unwrap();
    let held = first.seize().unwrap();
    assert_eq!(
        refusal(victim.pid, &Options::default()),
        // TracerPid names the tracing thread: this one.
        // SAFETY: gettid has no preconditions.
        Refusal::AlreadyTraced {
            tracer: unsafe { libc::gettid() }
        }
    );
    drop(held);
    assert_eq!(victim.finish("free")["data"], "free");
}

#[test]
fn different_user_without_cap_sys_ptrace() {
    if !common::root_or_skip("different_user_without_cap_sys_ptrace") {
        return;
    }
    let mut victim = Victim::spawn("read", &[]);
    let verdict = spy_as_nobody("inject", victim.pid);
    assert!(verdict.contains("DifferentUser"), "spy said {verdict:?}");
    assert!(verdict.contains("our_uid: 65534"), "spy said {verdict:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", victim.pid)).unwrap();
    assert!(status.contains("TracerPid:\t0"));
    assert_eq!(victim.finish("untouched")["data"], "untouched");
}

#[test]
fn seccomp_filter_is_refused_unless_allowed_then_its_errno_is_reported() {
    let mut victim = Victim::spawn("seccomp", &[]);
    assert_eq!(
        refusal(victim.pid, &Options::default()),
        Refusal::SeccompFilter { filters: 1 }
    );

    // Allowed explicitly: the filter answers mmap with EPERM in the target,
    // and other calls still work.
    let options = Options {
        allow_seccomp_filter: true,
        ..Options::default()
    };
    let mut remote = Remote::injection(victim.pid, &options).unwrap();
    match remote.mmap(&Mmap::anonymous(4096, libc::PROT_READ)) {
        Err(Error::RemoteSyscall { errno, nr, .. }) => {
            assert_eq!((errno, nr), (libc::EPERM, libc::SYS_mmap))
        }
        other => panic!("expected the filter's EPERM, got {other:?}"),
    }
    assert_eq!(
        remote.syscall(libc::SYS_getpid, [0; 6]).unwrap(),
        victim.pid as u64
    );
    let done = victim.finish("filtered");
    assert_eq!(
        (done["n"].as_str(), done["data"].as_str()),
        ("8", "filtered")
    );
}

/// Yama is not built into every kernel (not into this machine's); where it
/// is, scope 1 must refuse a same-user tracer that is not an ancestor. Scope 1
/// is used because 3 cannot be undone until reboot; the original is restored.
#[test]
fn yama_scope_one_refuses_a_non_ancestor() {
    if !common::root_or_skip("yama_scope_one_refuses_a_non_ancestor") {
        return;
    }
    const SCOPE: &str = "/proc/sys/kernel/yama/ptrace_scope";
    let Ok(original) = std::fs::read_to_string(SCOPE) else {
        eprintln!(
            "Yama is not present on this kernel; its rules are covered by preflight's unit tests"
        );
        return;
    };
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write(SCOPE, self.0.trim());
        }
    }
    let _restore = Restore(original);
    std::fs::write(SCOPE, "1").expect("set ptrace_scope");
    // Victim and spy are both nobody, so only Yama stands in the way.
    let mut victim = Victim::spawn_as(common::NOBODY, "read", &[]);
    let verdict = spy_as_nobody("inject", victim.pid);
    assert!(
        verdict.contains("Yama { scope: 1 }"),
        "spy said {verdict:?}"
    );
    assert_eq!(victim.finish("yama")["data"], "yama");
}
