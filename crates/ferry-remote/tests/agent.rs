//! Agent mode: the same operations, served by a thread inside the target.

mod common;

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use common::{mapping_at, spy_as_nobody, Victim};
use ferry_remote::{agent, mem, Error, Mmap, Mode, Options, Remote};

const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

fn agent_of(victim: &Victim) -> Remote {
    let remote = Remote::connect(victim.pid, &Options::default()).unwrap();
    assert_eq!(
        remote.mode(),
        Mode::Agent,
        "connect must prefer an answering agent"
    );
    remote
}

#[test]
fn operations_show_in_maps() {
    let mut victim = Victim::spawn("agent", &[]);
    let mut remote = agent_of(&victim);
    let addr = remote.mmap(&Mmap::anonymous(1 << 20, RW)).unwrap();
    let m = mapping_at(victim.pid, addr).unwrap();
    assert!(
        m.start <= addr && m.end >= addr + (1 << 20) && m.perms == "rw-p",
        "{m:?}"
    );
    remote.mprotect(addr, 1 << 20, libc::PROT_READ).unwrap();
    assert_eq!(mapping_at(victim.pid, addr).unwrap().perms, "r--p");
    remote.madvise(addr, 1 << 20, libc::MADV_DONTNEED).unwrap();
    remote.munmap(addr, 1 << 20).unwrap();
    assert!(mapping_at(victim.pid, addr).is_none());
    match remote.munmap(addr + 1, 4096) {
        Err(Error::RemoteSyscall { errno, .. }) => assert_eq!(errno, libc::EINVAL),
        other => panic!("expected EINVAL, got {other:?}"),
    }
    // The agent does not run arbitrary calls.
    match remote.syscall(libc::SYS_getpid, [0; 6]) {
        Err(Error::RemoteSyscall { errno, .. }) => assert_eq!(errno, libc::ENOSYS),
        other => panic!("expected ENOSYS, got {other:?}"),
    }
    // Nothing was traced meanwhile.
    let status = std::fs::read_to_string(format!("/proc/{}/status", victim.pid)).unwrap();
    assert!(status.contains("TracerPid:\t0"));
    assert_eq!(victim.finish("a")["data"], "a");
}

#[test]
fn shared_region_and_file_mapping() {
    let mut victim = Victim::spawn("agent", &[]);
    let mut remote = agent_of(&victim);
    let fds = victim.fd_count();
    let region = remote.share(1 << 16, RW, None).unwrap();
    assert_eq!(
        mapping_at(victim.pid, region.remote_addr()).unwrap().perms,
        "rw-s"
    );
    let memfd = std::fs::File::from(region.memfd().try_clone_to_owned().unwrap());
    memfd.write_all_at(b"ping", 0).unwrap();
    assert_eq!(
        mem::read_vec(victim.pid, region.remote_addr(), 4).unwrap(),
        b"ping"
    );
    mem::write(victim.pid, region.remote_addr() + 4096, b"pong").unwrap();
    let mut back = [0u8; 4];
    memfd.read_exact_at(&mut back, 4096).unwrap();
    assert_eq!(&back, b"pong");

    let path = std::env::temp_dir().join(format!("ferry-remote-agent-{}", std::process::id()));
    std::fs::write(&path, b"mapped by the agent").unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let addr = remote
        .mmap(&Mmap {
            fd: Some(file.as_fd()),
            ..Mmap::anonymous(4096, libc::PROT_READ)
        })
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        mem::read_vec(victim.pid, addr, 19).unwrap(),
        b"mapped by the agent"
    );
    assert_eq!(
        victim.fd_count(),
        fds,
        "the agent leaked a received descriptor"
    );
    assert_eq!(victim.finish("b")["data"], "b");
}

#[test]
fn another_user_is_refused() {
    if !common::root_or_skip("another_user_is_refused") {
        return;
    }
    let mut victim = Victim::spawn("agent", &[]);
    let verdict = spy_as_nobody("agent", victim.pid);
    assert!(verdict.contains("AgentRefused"), "spy said {verdict:?}");
    // And connect does not silently fall back to injection after a refusal.
    assert_eq!(victim.finish("c")["data"], "c");
}

#[test]
fn eight_concurrent_clients() {
    let mut victim = Victim::spawn("agent", &[]);
    let pid = victim.pid;
    let clients: Vec<_> = (0..8)
        .map(|i| {
            std::thread::spawn(move || {
                let mut remote = Remote::agent(pid).unwrap();
                let mut mine = Vec::new();
                for round in 0..50u64 {
                    let len = 4096 * (1 + (i + round) % 4);
                    let addr = remote.mmap(&Mmap::anonymous(len, RW)).unwrap();
                    let tag = (i * 1000 + round).to_le_bytes();
                    mem::write(pid, addr, &tag).unwrap();
                    mine.push((addr, len, tag));
                }
                // Everyone's regions are intact: no reply went to the wrong client.
                for (addr, len, tag) in mine {
                    assert_eq!(mem::read_vec(pid, addr, 8).unwrap(), tag);
                    remote.munmap(addr, len).unwrap();
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(victim.finish("d")["data"], "d");
}

#[test]
fn no_agent_means_injection_and_starting_twice_fails() {
    let mut victim = Victim::spawn("read", &[]);
    let remote = Remote::connect(victim.pid, &Options::default()).unwrap();
    assert_eq!(remote.mode(), Mode::Injection);
    assert!(matches!(
        Remote::agent(victim.pid),
        Err(Error::Agent { op: "connect", .. })
    ));
    drop(remote);
    assert_eq!(victim.finish("e")["data"], "e");

    // In this process: the first start binds the name, the second cannot.
    let agent = agent::start().unwrap();
    assert_eq!(agent.name(), agent::socket_name(std::process::id() as i32));
    assert!(matches!(
        agent::start(),
        Err(Error::Agent { op: "bind", .. })
    ));
}

/// An agent in another pid namespace that shares our network namespace owns
/// a name that, read with our pids, points at a different process. The
/// client must notice (SO_PEERCRED pids are translated) instead of mapping
/// into the wrong process.
#[test]
fn agent_names_are_checked_across_pid_namespaces() {
    if !common::root_or_skip("agent_names_are_checked_across_pid_namespaces") {
        return;
    }
    let mut victim = Victim::spawn_in_pid_namespace("agent");
    assert_eq!(victim.tid(), 1, "victim is pid 1 of its namespace");
    let host_pid = victim.host_pid();
    assert_ne!(host_pid, 1);
    // "ferry-remote-agent-1" is the victim's, not our init's.
    match Remote::agent(1) {
        Err(Error::Agent {
            op: "connect",
            source,
            ..
        }) => {
            assert!(
                source
                    .to_string()
                    .contains(&format!("belongs to process {host_pid}")),
                "{source}"
            )
        }
        other => panic!("expected a wrong-owner error, got {other:?}"),
    }
    // By its real pid there is no agent name, so connect injects; a
    // descriptor cannot be pushed across namespaces, a shared region can.
    let mut remote = Remote::connect(host_pid, &Options::default()).unwrap();
    assert_eq!(remote.mode(), Mode::Injection);
    let file = std::fs::File::open("/proc/self/exe").unwrap();
    let request = Mmap {
        fd: Some(file.as_fd()),
        ..Mmap::anonymous(4096, libc::PROT_READ)
    };
    assert!(matches!(remote.mmap(&request), Err(Error::Local { .. })));
    let region = remote.share(4096, RW, None).unwrap();
    mem::write(host_pid, region.remote_addr(), b"ns").unwrap();
    let mut back = [0u8; 2];
    std::fs::File::from(region.memfd().try_clone_to_owned().unwrap())
        .read_exact_at(&mut back, 0)
        .unwrap();
    assert_eq!(&back, b"ns");
    assert_eq!(victim.finish("f")["data"], "f");
}
