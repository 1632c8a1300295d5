//! ferry-spawn: create processes at vfork speed from huge, multi-threaded
//! parents, with every option a supervisor needs.
//!
//! [`Command`] is a builder shaped like [`std::process::Command`]. Its
//! [`spawn`](Command::spawn) always clones with `CLONE_VM | CLONE_VFORK` on
//! a child stack of its own, so the cost is that of `posix_spawn` whatever
//! the parent's size, even with set*id, rlimits, namespaces, a cgroup or a
//! parent-death signal asked for (where std falls back to `fork`). The
//! child runs one linear list of steps made only of raw system calls; the
//! first step that fails comes back as [`SpawnError::Child`] naming the
//! [`Step`] and errno.
//!
//! A spawn returns a [`Child`], held by its pidfd: `wait`, `try_wait`,
//! `wait_timeout` and `kill` can never hit a recycled pid; with the `tokio`
//! feature, `wait_async` polls the pidfd.
//!
//! A [`Server`] is a small helper process (this binary re-executed, see
//! [`server::main_if_server`]) that clones on the caller's behalf; the same
//! builder targets it with [`Command::spawn_via`]. The children are still
//! the caller's.
//!
//! ```
//! use ferry_spawn::{Command, Resource, Stdio};
//!
//! let mut child = Command::new("sh")
//!     .args(["-c", "ulimit -n; echo $GREETING"])
//!     .env("GREETING", "hello")
//!     .rlimit(Resource::Nofile, 64, 64)
//!     .setsid(true)
//!     .stdout(Stdio::Piped)
//!     .spawn()?;
//! let mut out = String::new();
//! std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out)?;
//! assert_eq!(out, "64\nhello\n");
//! assert!(child.wait()?.success());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]
#![deny(unsafe_code)]

mod child;
mod command;
mod error;
mod process;
pub mod server;
mod sys;
mod wire;

pub use command::{Command, Namespace, Resource, Stdio};
pub use error::{SpawnError, Step};
pub use process::Child;
pub use server::Server;
