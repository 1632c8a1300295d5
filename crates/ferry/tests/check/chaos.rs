//! The multi-host worker: random namespace and data operations on a small
//! set of names that every host uses, so hosts keep stepping on each other
//! (the same directory made, removed and renamed on two hosts; one file
//! written on one and deleted on the other). Results are not checked —
//! which host wins is the conflict policy's business — only what the
//! backend ends up holding is (I3).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::symlink;
use std::time::Instant;

use super::workers::WorkerArgs;
use super::workload::mount_alive;
use crate::support::{sys, Rng};

const DIRS: [&str; 3] = ["a", "b", "c"];
const FILES: [&str; 3] = ["c", "d", "e"];

/// A path of one or two components ending in `last`.
fn path(rng: &mut Rng, last: &[&str]) -> String {
    let name = rng.pick(last);
    if rng.chance(50) {
        format!("{}/{name}", rng.pick(&DIRS))
    } else {
        name.to_string()
    }
}

/// The worker's main loop; returns the process exit code.
pub fn run(args: &WorkerArgs) -> i32 {
    let mut rng = Rng::new(args.seed);
    let root = &args.mount;
    let started = Instant::now();
    while started.elapsed() < args.limit {
        let (d, f) = (path(&mut rng, &DIRS), path(&mut rng, &FILES));
        let any = if rng.chance(50) { d.clone() } else { f.clone() };
        let last: &[&str] = if rng.chance(50) { &DIRS } else { &FILES };
        let other = path(&mut rng, last);
        let result = match rng.below(11) {
            0 => fs::create_dir(root.join(&d)),
            1 => fs::remove_dir(root.join(&d)),
            2 | 3 => fs::rename(root.join(&any), root.join(&other)),
            4 | 5 => {
                let len = rng.below(100_000) as usize;
                fs::write(root.join(&f), rng.bytes(len))
            }
            6 => OpenOptions::new()
                .append(true)
                .open(root.join(&f))
                .and_then(|mut h| h.write_all(&rng.bytes(1000))),
            7 => fs::remove_file(root.join(&f)),
            8 => fs::hard_link(root.join(&f), root.join(&other)),
            9 => symlink(&other, root.join(&f)),
            _ => sys::setxattr(&root.join(&any), "user.k", &rng.bytes(20), 0),
        };
        if result.is_err() && !mount_alive(root) {
            return 0;
        }
    }
    0
}
