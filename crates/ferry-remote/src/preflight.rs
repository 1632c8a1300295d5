//! Before attaching: say plainly why injection cannot work, if it cannot.
//!
//! `PTRACE_SEIZE` itself answers only `EPERM` or `ESRCH`. The kernel's
//! reasons are more specific, and all of them are visible from procfs
//! without touching the target, so preflight reads them first:
//! `/proc/PID/status` (state, uids, `TracerPid`, `Seccomp`), our own
//! capabilities, and Yama's `/proc/sys/kernel/yama/ptrace_scope`. Gathering
//! ([`Facts::gather`]) is separate from judging ([`Facts::judge`]) so the
//! rules are unit-tested against every combination, including Yama scopes
//! this machine does not have.

use std::fmt;
use std::fs;

use crate::error::{Error, Result};
use crate::sys::Pid;

/// `CAP_SYS_PTRACE`, bit 19 of the capability sets in `/proc/PID/status`.
const CAP_SYS_PTRACE: u32 = 19;

/// Why an injection into a process cannot (or should not) be attempted.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// There is no such process.
    NoSuchProcess,
    /// The process has exited and waits to be reaped; it has no memory left.
    Zombie,
    /// A process cannot trace itself; use the agent or map directly.
    OwnProcess,
    /// The target belongs to another user and we lack `CAP_SYS_PTRACE`.
    DifferentUser {
        /// The target's real, effective and saved uids.
        target_uids: [u32; 3],
        /// Our real uid.
        our_uid: u32,
    },
    /// Yama's `ptrace_scope` forbids the attach.
    Yama {
        /// The value of `/proc/sys/kernel/yama/ptrace_scope`.
        scope: u8,
    },
    /// Another tracer (a debugger, strace, CRIU) is attached already.
    AlreadyTraced {
        /// Its thread id, as `TracerPid:` shows it.
        tracer: Pid,
    },
    /// The target runs under seccomp strict mode: only read, write, exit and
    /// sigreturn are allowed, so an injected mmap would kill it.
    SeccompStrict,
    /// The target runs under seccomp filters that may kill it for an injected
    /// call; proceed only if you know the filter allows it.
    SeccompFilter {
        /// How many filters are installed.
        filters: u32,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoSuchProcess => write!(f, "no such process"),
            Refusal::Zombie => write!(f, "it is a zombie (exited, not yet reaped)"),
            Refusal::OwnProcess => write!(f, "a process cannot ptrace itself; use the agent"),
            Refusal::DifferentUser { target_uids, our_uid } => write!(
                f,
                "it runs as uid {target_uids:?} and we are uid {our_uid} without CAP_SYS_PTRACE"
            ),
            Refusal::Yama { scope: 1 } => write!(
                f,
                "Yama ptrace_scope is 1: only ancestors (or a tracer named by PR_SET_PTRACER) may \
                 attach, and it is not our descendant; run as root, or start its agent"
            ),
            Refusal::Yama { scope: 2 } => {
                write!(f, "Yama ptrace_scope is 2: only CAP_SYS_PTRACE may attach")
            }
            Refusal::Yama { scope } => write!(f, "Yama ptrace_scope is {scope}: ptrace is disabled"),
            Refusal::AlreadyTraced { tracer } => {
                write!(f, "it is already traced by process {tracer}")
            }
            Refusal::SeccompStrict => write!(
                f,
                "it runs in seccomp strict mode, which kills it for any injected mmap"
            ),
            Refusal::SeccompFilter { filters } => write!(
                f,
                "it runs under {filters} seccomp filter(s), which may kill it for an injected call; \
                 allow seccomp explicitly if the filter permits the call"
            ),
        }
    }
}

impl std::error::Error for Refusal {}

/// What preflight learned about the target and about us.
#[derive(Clone, Debug, Default)]
pub struct Facts {
    /// Whether `/proc/PID/status` existed.
    pub exists: bool,
    /// The state letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// The target's real, effective and saved uids.
    pub uids: [u32; 3],
    /// `TracerPid:`.
    pub tracer: Pid,
    /// `Seccomp:` (0 off, 1 strict, 2 filter).
    pub seccomp: u8,
    /// `Seccomp_filters:`.
    pub seccomp_filters: u32,
    /// Whether the target is us.
    pub is_self: bool,
    /// Whether the target descends from us (Yama scope 1 allows that).
    pub is_descendant: bool,
    /// Our real uid.
    pub our_uid: u32,
    /// Whether we hold `CAP_SYS_PTRACE` in our effective set.
    pub our_cap_ptrace: bool,
    /// Yama's scope, if Yama is built in.
    pub yama: Option<u8>,
}

/// Fields of one `/proc/PID/status` file, by name.
fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

fn parse_uids(field: Option<&str>) -> [u32; 3] {
    let mut uids = [u32::MAX; 3];
    for (slot, value) in uids.iter_mut().zip(field.unwrap_or("").split_whitespace()) {
        *slot = value.parse().unwrap_or(u32::MAX);
    }
    uids
}

fn parent_of(pid: Pid) -> Option<Pid> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field(&status, "PPid")?.parse().ok()
}

impl Facts {
    /// Reads the facts from procfs; never touches the target.
    pub fn gather(pid: Pid) -> Facts {
        let me = std::process::id() as Pid;
        let ours = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let our_caps = status_field(&ours, "CapEff")
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .unwrap_or(0);
        let mut facts = Facts {
            our_uid: parse_uids(status_field(&ours, "Uid"))[0],
            our_cap_ptrace: our_caps & (1 << CAP_SYS_PTRACE) != 0,
            yama: fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
                .ok()
                .and_then(|s| s.trim().parse().ok()),
            is_self: pid == me,
            ..Facts::default()
        };
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            return facts;
        };
        facts.exists = true;
        facts.state = status_field(&status, "State")
            .and_then(|s| s.chars().next())
            .unwrap_or('?');
        facts.uids = parse_uids(status_field(&status, "Uid"));
        facts.tracer = status_field(&status, "TracerPid")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        facts.seccomp = status_field(&status, "Seccomp")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        facts.seccomp_filters = status_field(&status, "Seccomp_filters")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        // Walk up from the target; bounded because pid 1 is its own root.
        let mut cursor = pid;
        for _ in 0..4096 {
            match parent_of(cursor) {
                Some(parent) if parent == me => {
                    facts.is_descendant = true;
                    break;
                }
                Some(parent) if parent > 1 => cursor = parent,
                _ => break,
            }
        }
        facts
    }

    /// Applies the kernel's rules (ptrace_may_access, Yama, seccomp) to the facts.
    pub fn judge(&self, allow_seccomp_filter: bool) -> std::result::Result<(), Refusal> {
        if !self.exists {
            return Err(Refusal::NoSuchProcess);
        }
        if matches!(self.state, 'Z' | 'X') {
            return Err(Refusal::Zombie);
        }
        if self.is_self {
            return Err(Refusal::OwnProcess);
        }
        if self.tracer != 0 {
            return Err(Refusal::AlreadyTraced {
                tracer: self.tracer,
            });
        }
        if !self.our_cap_ptrace && self.uids.iter().any(|&uid| uid != self.our_uid) {
            return Err(Refusal::DifferentUser {
                target_uids: self.uids,
                our_uid: self.our_uid,
            });
        }
        match self.yama {
            Some(scope @ 3..) => return Err(Refusal::Yama { scope }),
            Some(2) if !self.our_cap_ptrace => return Err(Refusal::Yama { scope: 2 }),
            Some(1) if !self.our_cap_ptrace && !self.is_descendant => {
                return Err(Refusal::Yama { scope: 1 })
            }
            _ => {}
        }
        match self.seccomp {
            1 => Err(Refusal::SeccompStrict),
            2 if !allow_seccomp_filter => Err(Refusal::SeccompFilter {
                filters: self.seccomp_filters,
            }),
            _ => Ok(()),
        }
    }
}

/// Checks that injecting into `pid` can work, and explains why not otherwise.
///
/// `allow_seccomp_filter` lets a target with seccomp filters through, for
/// callers who know the filter permits the calls they inject.
pub fn check(pid: Pid, allow_seccomp_filter: bool) -> Result<()> {
    Facts::gather(pid)
        .judge(allow_seccomp_filter)
        .map_err(|reason| Error::Refused { pid, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_facts() -> Facts {
        Facts {
            exists: true,
            state: 'S',
            uids: [1000; 3],
            our_uid: 1000,
            ..Facts::default()
        }
    }

    #[test]
    fn plain_same_user_target_passes() {
        assert_eq!(ok_facts().judge(false), Ok(()));
    }

    #[test]
    fn every_refusal_is_reported() {
        let cases: Vec<(Facts, Refusal)> = vec![
            (
                Facts {
                    exists: false,
                    ..ok_facts()
                },
                Refusal::NoSuchProcess,
            ),
            (
                Facts {
                    state: 'Z',
                    ..ok_facts()
                },
                Refusal::Zombie,
            ),
            (
                Facts {
                    is_self: true,
                    ..ok_facts()
                },
                Refusal::OwnProcess,
            ),
            (
                Facts {
                    tracer: 42,
                    ..ok_facts()
                },
                Refusal::AlreadyTraced { tracer: 42 },
            ),
            (
                Facts {
                    uids: [1000, 0, 0],
                    ..ok_facts()
                },
                Refusal::DifferentUser {
                    target_uids: [1000, 0, 0],
                    our_uid: 1000,
                },
            ),
            (
                Facts {
                    yama: Some(1),
                    ..ok_facts()
                },
                Refusal::Yama { scope: 1 },
            ),
            (
                Facts {
                    yama: Some(2),
                    ..ok_facts()
                },
                Refusal::Yama { scope: 2 },
            ),
            (
                Facts {
                    yama: Some(3),
                    our_cap_ptrace: true,
                    ..ok_facts()
                },
                Refusal::Yama { scope: 3 },
            ),
            (
                Facts {
                    seccomp: 1,
                    ..ok_facts()
                },
                Refusal::SeccompStrict,
            ),
            (
                Facts {
                    seccomp: 2,
                    seccomp_filters: 1,
                    ..ok_facts()
                },
                Refusal::SeccompFilter { filters: 1 },
            ),
        ];
        for (facts, want) in cases {
            assert_eq!(facts.judge(false), Err(want.clone()), "{facts:?}");
            assert!(!want.to_string().is_empty());
        }
    }

    #[test]
    fn privileges_and_ancestry_lift_the_rules_they_should() {
        let root = Facts {
            uids: [0; 3],
            our_cap_ptrace: true,
            ..ok_facts()
        };
        assert_eq!(root.judge(false), Ok(()));
        assert_eq!(
            Facts {
                yama: Some(1),
                is_descendant: true,
                ..ok_facts()
            }
            .judge(false),
            Ok(())
        );
        assert_eq!(
            Facts {
                yama: Some(2),
                our_cap_ptrace: true,
                ..ok_facts()
            }
            .judge(false),
            Ok(())
        );
        assert_eq!(
            Facts {
                seccomp: 2,
                ..ok_facts()
            }
            .judge(true),
            Ok(())
        );
        assert_eq!(
            Facts {
                seccomp: 1,
                ..ok_facts()
            }
            .judge(true),
            Err(Refusal::SeccompStrict)
        );
    }
}
