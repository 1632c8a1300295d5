//! The model-based crash checker for ferry-fs replication: seeded random
//! workloads from several processes on a mount with a backend, kill -9 of
//! the daemon at a seeded moment, and after each trial a check of the
//! replication invariants (DESIGN.md) against what each process knows was
//! acknowledged:
//!
//! - I1, sync is honest: with the workers stopped and their files still
//!   open (some shipped while open), and again after the crash, `ferry
//!   sync` and then a fresh store restored from the backend equals the
//!   mount: names, types, sizes, modes, owners, mtimes (directories too),
//!   symlinks, hard links, xattrs, holes (the restore keeps every hole) and
//!   contents, and its SQLite databases hold every committed row;
//! - I2, crashes lose nothing: after kill -9 and remount, the mount equals
//!   a reference directory the workers kept on the root file system, except
//!   what the operations in flight at the kill touched; SQLite databases
//!   (rollback journal and WAL) pass integrity_check and hold every row
//!   committed before the kill, locally and in a restore after sync;
//! - I3, the backend stays whole: with two hosts writing the same names,
//!   a restore loads, every file reads, and the tree hangs together (and
//!   `ferry fsck --backend` passes, where the CLI has it).
//!
//! A failing trial prints its seed, its backend, the first difference and
//! the command that replays it. Runs are deterministic apart from timing.
//!
//! ```sh
//! cargo test --release -p ferry --test fs_check                     # 10 trials, ~2 min
//! cargo test --release -p ferry --test fs_check -- --trials 1 --seed S --backend dir --hosts 1
//! cargo test --release -p ferry --test fs_check -- --trials 300 --budget 0   # soak
//! ```
//! Options (and their environment variables): `--trials N`
//! (`FERRY_CHECK_TRIALS`, default 10), `--seed S` (`FERRY_CHECK_SEED`,
//! default from the clock, printed), `--backend dir|postgres|both`
//! (`FERRY_CHECK_BACKEND`, default both, alternating), `--hosts 1|2|mixed`
//! (`FERRY_CHECK_HOSTS`, default mixed: every fifth trial has two hosts),
//! `--budget SECS` (`FERRY_CHECK_BUDGET`, default 170: no trial starts
//! after it; 0 for none), `--verbose` (`FERRY_CHECK_VERBOSE`: every
//! difference). `--worker KIND …` is how the checker starts its workers.

mod check;
mod support;

use check::args::{parse, Invocation, TEST_NAME};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match parse(&args) {
        Err(e) => {
            eprintln!("fs_check: {e}");
            2
        }
        Ok(Invocation::Worker(w)) => check::workers::main(&w),
        Ok(Invocation::List) => {
            println!("{TEST_NAME}: test");
            0
        }
        Ok(Invocation::Nothing) => 0,
        Ok(Invocation::Check(opts)) => match check::selftest::run() {
            Err(e) => {
                eprintln!("fs_check: self-test failed, the checker cannot be trusted: {e}");
                1
            }
            Ok(n) => {
                println!("fs_check: self-test: {n} checks of the checker passed");
                if support::skip_unless_ferry("the model checker") {
                    0
                } else {
                    check::trial::run_all(&opts)
                }
            }
        },
    };
    std::process::exit(code);
}
