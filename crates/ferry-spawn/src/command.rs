//! The builder: what to run and how, resolved into a [`Prepared`] spawn.
//!
//! Everything that needs memory or a decision (PATH search, C strings,
//! pipes, the environment) happens here, in the parent, before the clone.

use std::collections::BTreeMap;
use std::env;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::child::{self, sigbit, Cwd, Options, Prepared, Rlimit};
use crate::error::SpawnError;
use crate::process::{Child, Fault, ParentEnds};
use crate::server::Server;
use crate::sys;

/// Where one of the child's fds comes from.
#[derive(Debug)]
pub enum Stdio {
    /// The child keeps the parent's fd of that number (the default).
    Inherit,
    /// `/dev/null`, opened read-write.
    Null,
    /// A new pipe; the parent's end lands in [`Child::stdin`] and friends.
    Piped,
    /// This fd. The command keeps it, so it can spawn again.
    Fd(OwnedFd),
}

/// An rlimit resource, numbered as the kernel numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
#[allow(missing_docs)] // The names are the RLIMIT_* constants of getrlimit(2).
pub enum Resource {
    Cpu = 0,
    Fsize = 1,
    Data = 2,
    Stack = 3,
    Core = 4,
    Rss = 5,
    Nproc = 6,
    Nofile = 7,
    Memlock = 8,
    As = 9,
    Locks = 10,
    Sigpending = 11,
    Msgqueue = 12,
    Nice = 13,
    Rtprio = 14,
    Rttime = 15,
}

/// A namespace the child gets a new instance of (a `CLONE_NEW*` flag).
///
/// All of them combine with `CLONE_VM | CLONE_VFORK`; see `docs/spawn.md`
/// for what each one means while the parent is suspended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
#[allow(missing_docs)] // The names are the CLONE_NEW* flags of clone(2).
pub enum Namespace {
    Mount,
    Uts,
    Ipc,
    Net,
    Pid,
    User,
    Cgroup,
    Time,
}

impl Namespace {
    fn flag(self) -> u64 {
        (match self {
            Namespace::Mount => libc::CLONE_NEWNS,
            Namespace::Uts => libc::CLONE_NEWUTS,
            Namespace::Ipc => libc::CLONE_NEWIPC,
            Namespace::Net => libc::CLONE_NEWNET,
            Namespace::Pid => libc::CLONE_NEWPID,
            Namespace::User => libc::CLONE_NEWUSER,
            Namespace::Cgroup => libc::CLONE_NEWCGROUP,
            Namespace::Time => libc::CLONE_NEWTIME,
        }) as u64
    }
}

/// Where the child starts.
#[derive(Debug)]
enum Dir {
    Path(PathBuf),
    Fd(OwnedFd),
}

/// A process to spawn, configured like [`std::process::Command`] plus every
/// option a supervisor needs. [`Command::spawn`] clones with
/// `CLONE_VM | CLONE_VFORK`, so its cost does not grow with the parent.
#[derive(Debug)]
pub struct Command {
    program: OsString,
    args: Vec<OsString>,
    env_clear: bool,
    env: BTreeMap<OsString, Option<OsString>>,
    cwd: Option<Dir>,
    fds: BTreeMap<RawFd, Stdio>,
    chroot: Option<PathBuf>,
    cgroup: Option<OwnedFd>,
    opts: Options,
}

impl Command {
    /// A command running `program` (searched in `PATH` unless it contains
    /// a `/`) with `argv[0]` set to `program`.
    pub fn new(program: impl AsRef<OsStr>) -> Command {
        let program = program.as_ref().to_owned();
        Command {
            args: vec![program.clone()],
            program,
            env_clear: false,
            env: BTreeMap::new(),
            cwd: None,
            fds: BTreeMap::new(),
            chroot: None,
            cgroup: None,
            // As std does: a Rust parent ignores SIGPIPE, its children should not.
            opts: Options {
                signal_default: sigbit(libc::SIGPIPE),
                ..Options::default()
            },
        }
    }

    /// Sets `argv[0]`, which is `program` by default.
    pub fn arg0(&mut self, arg0: impl AsRef<OsStr>) -> &mut Command {
        self.args[0] = arg0.as_ref().to_owned();
        self
    }

    /// Appends one argument.
    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Command {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets one environment variable of the child.
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Command {
        self.env
            .insert(key.as_ref().to_owned(), Some(value.as_ref().to_owned()));
        self
    }

    /// Sets several environment variables.
    pub fn envs<I, K, V>(&mut self, vars: I) -> &mut Command
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (k, v) in vars {
            self.env(k, v);
        }
        self
    }

    /// Removes one variable from the child's environment.
    pub fn env_remove(&mut self, key: impl AsRef<OsStr>) -> &mut Command {
        self.env.insert(key.as_ref().to_owned(), None);
        self
    }

    /// Starts the child's environment empty instead of from the parent's.
    pub fn env_clear(&mut self) -> &mut Command {
        self.env_clear = true;
        self.env.clear();
        self
    }

    /// The child's working directory (`chdir`, after `chroot`).
    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Command {
        self.cwd = Some(Dir::Path(dir.as_ref().to_owned()));
        self
    }

    /// The child's working directory as an open directory (`fchdir`), which
    /// cannot be renamed away between now and the spawn.
    pub fn current_dir_fd(&mut self, dir: impl Into<OwnedFd>) -> &mut Command {
        self.cwd = Some(Dir::Fd(dir.into()));
        self
    }

    /// The child's fd 0.
    pub fn stdin(&mut self, stdio: Stdio) -> &mut Command {
        self.set_fd(0, stdio)
    }

    /// The child's fd 1.
    pub fn stdout(&mut self, stdio: Stdio) -> &mut Command {
        self.set_fd(1, stdio)
    }

    /// The child's fd 2.
    pub fn stderr(&mut self, stdio: Stdio) -> &mut Command {
        self.set_fd(2, stdio)
    }

    /// Puts `fd` at number `child_fd` in the child, whatever numbers either
    /// has now: overlapping maps such as swapping 3 and 4 work.
    pub fn fd(&mut self, child_fd: RawFd, fd: impl Into<OwnedFd>) -> &mut Command {
        self.set_fd(child_fd, Stdio::Fd(fd.into()))
    }

    fn set_fd(&mut self, child_fd: RawFd, stdio: Stdio) -> &mut Command {
        match stdio {
            Stdio::Inherit => self.fds.remove(&child_fd),
            other => self.fds.insert(child_fd, other),
        };
        self
    }

    /// Closes every fd in the child except the ones given with [`fd`],
    /// the std streams, and inherited 0–2 (`close_range`). Without it, only
    /// close-on-exec fds are closed, as with std.
    ///
    /// [`fd`]: Command::fd
    pub fn close_other_fds(&mut self, on: bool) -> &mut Command {
        self.opts.close_other_fds = on;
        self
    }

    /// Makes the child a session leader (`setsid`), detached from the
    /// parent's controlling terminal.
    pub fn setsid(&mut self, on: bool) -> &mut Command {
        self.opts.setsid = on;
        self
    }

    /// Moves the child into process group `pgid` (`setpgid(0, pgid)`);
    /// 0 makes a new group led by the child.
    pub fn process_group(&mut self, pgid: i32) -> &mut Command {
        self.opts.pgroup = Some(pgid);
        self
    }

    /// Makes the terminal at fd `child_fd` (a number in the child, after the
    /// remap) the child's controlling terminal (`TIOCSCTTY`). Needs
    /// [`setsid`](Command::setsid).
    pub fn controlling_terminal(&mut self, child_fd: RawFd) -> &mut Command {
        self.opts.ctty = Some(child_fd);
        self
    }

    /// The child's real, effective and saved user id (raw `setresuid`).
    /// Unless [`groups`](Command::groups) is given, a root parent also
    /// drops the supplementary groups, as std does.
    pub fn uid(&mut self, uid: u32) -> &mut Command {
        self.opts.uid = Some(uid);
        self
    }

    /// The child's real, effective and saved group id (raw `setresgid`).
    pub fn gid(&mut self, gid: u32) -> &mut Command {
        self.opts.gid = Some(gid);
        self
    }

    /// The child's supplementary groups (raw `setgroups`).
    pub fn groups(&mut self, groups: &[u32]) -> &mut Command {
        self.opts.groups = Some(groups.to_vec());
        self
    }

    /// Changes the child's root directory (`chroot`); the working directory
    /// and a relative program path are then taken inside it.
    pub fn chroot(&mut self, dir: impl AsRef<Path>) -> &mut Command {
        self.chroot = Some(dir.as_ref().to_owned());
        self
    }

    /// The child's file mode creation mask.
    pub fn umask(&mut self, mask: u32) -> &mut Command {
        self.opts.umask = Some(mask);
        self
    }

    /// Sets a resource limit in the child (`prlimit`).
    pub fn rlimit(&mut self, resource: Resource, soft: u64, hard: u64) -> &mut Command {
        self.opts.rlimits.retain(|r| r.resource != resource as u32);
        self.opts.rlimits.push(Rlimit {
            resource: resource as u32,
            soft,
            hard,
        });
        self
    }

    /// Signal the child gets when its parent *thread* exits
    /// (`PR_SET_PDEATHSIG`). If the parent is already gone by then, the
    /// child signals itself at once.
    pub fn parent_death_signal(&mut self, sig: i32) -> &mut Command {
        self.opts.pdeathsig = Some(sig);
        self
    }

    /// Sets `no_new_privs`, so the child and its descendants cannot gain
    /// privileges through set-id binaries or file capabilities.
    pub fn no_new_privs(&mut self, on: bool) -> &mut Command {
        self.opts.no_new_privs = on;
        self
    }

    /// Raises capability `cap` (a `CAP_*` number, e.g. 10 for
    /// `CAP_NET_BIND_SERVICE`) in the child's ambient set, so it survives
    /// the [`uid`](Command::uid) change and the exec. The parent must hold it.
    pub fn ambient_capability(&mut self, cap: u32) -> &mut Command {
        self.opts.ambient_caps.push(cap);
        self
    }

    /// Gives the child a new namespace of this kind.
    pub fn namespace(&mut self, ns: Namespace) -> &mut Command {
        self.opts.namespaces |= ns.flag();
        self
    }

    /// Starts the child in the cgroup v2 directory `dir` from its very first
    /// instruction (`clone3` with `CLONE_INTO_CGROUP`).
    pub fn cgroup(&mut self, dir: impl Into<OwnedFd>) -> &mut Command {
        self.cgroup = Some(dir.into());
        self
    }

    /// The signals blocked in the child (by default none).
    pub fn signal_mask(&mut self, signals: &[i32]) -> &mut Command {
        self.opts.signal_mask = signals.iter().fold(0, |m, &s| m | sigbit(s));
        self
    }

    /// Resets `sig` to its default action in the child even if the parent
    /// ignores it. SIGPIPE is reset unless [`keep_ignored_signals`] is used;
    /// caught signals are always reset, since handlers cannot survive exec.
    ///
    /// [`keep_ignored_signals`]: Command::keep_ignored_signals
    pub fn reset_signal(&mut self, sig: i32) -> &mut Command {
        self.opts.signal_default |= sigbit(sig);
        self
    }

    /// Lets the child inherit every signal the parent ignores, SIGPIPE too.
    pub fn keep_ignored_signals(&mut self) -> &mut Command {
        self.opts.signal_default = 0;
        self
    }

    /// Spawns the child from this process.
    pub fn spawn(&mut self) -> Result<Child, SpawnError> {
        let (prepared, ends) = self.prepare(false)?;
        let spawned = child::spawn(&prepared, false).map_err(Fault::Clone);
        Child::finish(&self.program, spawned, ends)
    }

    /// Spawns the child through a spawn server: same options, but the clone
    /// happens in the small server process, and the child is still ours
    /// (its parent is this process, so `wait` works as usual).
    pub fn spawn_via(&mut self, server: &Server) -> Result<Child, SpawnError> {
        let (prepared, ends) = self.prepare(true)?;
        let spawned = server.spawn(&prepared);
        Child::finish(&self.program, spawned, ends)
    }

    /// Spawns and waits for the child.
    pub fn status(&mut self) -> Result<ExitStatus, SpawnError> {
        let mut child = self.spawn()?;
        child.wait().map_err(|source| SpawnError::Parent {
            program: self.program.clone(),
            op: "wait",
            source,
        })
    }

    /// Resolves the command into what the child needs: C strings, a found
    /// program path, and the fd map. `for_server` passes inherited stdio on
    /// explicitly, since the server's own stdio is not ours.
    fn prepare(&self, for_server: bool) -> Result<(Prepared, ParentEnds), SpawnError> {
        let program = &self.program;
        let nul = |what| SpawnError::Nul {
            program: program.clone(),
            what,
        };
        let parent = |op| {
            move |source| SpawnError::Parent {
                program: program.clone(),
                op,
                source,
            }
        };

        let env = self.environment();
        let path = self.resolve(&env)?;
        let mut prepared = Prepared {
            path: cstring(path.into_os_string()).ok_or_else(|| nul("program path"))?,
            argv: self
                .args
                .iter()
                .map(|a| cstring(a.clone()))
                .collect::<Option<_>>()
                .ok_or_else(|| nul("argument"))?,
            envp: env
                .into_iter()
                .map(|(mut k, v)| {
                    k.push("=");
                    k.push(v);
                    cstring(k)
                })
                .collect::<Option<_>>()
                .ok_or_else(|| nul("environment"))?,
            cwd: match &self.cwd {
                None => None,
                Some(Dir::Path(p)) => Some(Cwd::Path(
                    cstring(p.clone().into_os_string()).ok_or_else(|| nul("directory"))?,
                )),
                Some(Dir::Fd(fd)) => Some(Cwd::Fd(fd.as_raw_fd())),
            },
            chroot: match &self.chroot {
                None => None,
                Some(dir) => {
                    Some(cstring(dir.clone().into_os_string()).ok_or_else(|| nul("chroot"))?)
                }
            },
            fds: Vec::with_capacity(self.fds.len() + 3),
            cgroup: self.cgroup.as_ref().map(AsRawFd::as_raw_fd),
            opts: self.opts.clone(),
            owned: Vec::new(),
        };

        let mut ends = ParentEnds::default();
        for (&child_fd, stdio) in &self.fds {
            let fd = match stdio {
                Stdio::Inherit => continue,
                Stdio::Fd(fd) => fd.as_raw_fd(),
                Stdio::Null => {
                    let null =
                        sys::open(c"/dev/null", libc::O_RDWR).map_err(parent("open /dev/null"))?;
                    prepared.own(null)
                }
                Stdio::Piped => {
                    let (read, write) = sys::pipe().map_err(parent("pipe"))?;
                    let (theirs, ours) = if child_fd == 0 {
                        (read, write)
                    } else {
                        (write, read)
                    };
                    ends.put(child_fd, File::from(ours));
                    prepared.own(theirs)
                }
            };
            prepared.fds.push((fd, child_fd));
        }
        if for_server {
            for std_fd in 0..3 {
                if !self.fds.contains_key(&std_fd) && sys::is_open(std_fd) {
                    prepared.fds.push((std_fd, std_fd));
                }
            }
        }
        Ok((prepared, ends))
    }

    /// The child's environment: the parent's (unless cleared) with the
    /// changes applied, sorted.
    fn environment(&self) -> BTreeMap<OsString, OsString> {
        let mut vars: BTreeMap<OsString, OsString> = if self.env_clear {
            BTreeMap::new()
        } else {
            env::vars_os().collect()
        };
        for (k, v) in &self.env {
            match v {
                Some(v) => vars.insert(k.clone(), v.clone()),
                None => vars.remove(k),
            };
        }
        vars
    }

    /// Finds the program in the child's `PATH` (done here, in the parent,
    /// so the child only execs once). Names with a `/` are used as given.
    fn resolve(&self, env: &BTreeMap<OsString, OsString>) -> Result<PathBuf, SpawnError> {
        if self.program.as_bytes().contains(&b'/') {
            return Ok(PathBuf::from(&self.program));
        }
        let search = env
            .get(OsStr::new("PATH"))
            .cloned()
            .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        let executable = |p: &Path| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        };
        env::split_paths(&search)
            .filter(|_| !self.program.is_empty())
            .map(|dir| dir.join(&self.program))
            .find(|p| executable(p))
            .ok_or_else(|| SpawnError::NotFound {
                program: self.program.clone(),
                path: search,
            })
    }
}

/// A C string, or `None` if `s` holds a NUL byte.
fn cstring(s: OsString) -> Option<CString> {
    CString::new(s.into_vec()).ok()
}
