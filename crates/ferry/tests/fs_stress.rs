//! Concurrency stress: 8 threads × thousands of mixed operations, in their
//! own subdirectories (checked against a per-thread model) and on shared
//! objects (an O_APPEND log, a flock-protected counter, a pool directory
//! with creates/renames/unlinks and concurrent readdir, one xattr per
//! thread on a shared file). A watchdog fails the test if the threads do not
//! finish (deadlock); at the end no update may be lost.
//!
//! `cargo test -p ferry --test fs_stress`; `FERRY_STRESS_OPS` (per thread,
//! default 2,500), `FERRY_STRESS_SEED`, `FERRY_STRESS_TIMEOUT` (s, default 240).

mod support;

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use support::{sys, Mount, Rng};

const THREADS: usize = 8;
/// Every append to the shared log is one record of exactly this size, so a
/// torn or interleaved write shows up as a malformed record.
const RECORD: usize = 64;

/// Per-thread model of its own directory: names → inode ids → contents
/// (hard links share an id).
#[derive(Default)]
struct Model {
    names: HashMap<String, usize>,
    inodes: Vec<Vec<u8>>,
}

/// What a thread did to shared objects, for the final accounting.
#[derive(Default)]
struct Tally {
    appends: u64,
    increments: u64,
    pool: BTreeSet<String>,
    last_xattr: Option<String>,
}

fn record(t: usize, seq: u64) -> Vec<u8> {
    let mut r = format!("t{t} s{seq} ").into_bytes();
    r.resize(RECORD - 1, b'.');
    r.push(b'\n');
    r
}

/// One worker thread; panics on the first wrong answer.
fn worker(t: usize, shared: &Path, own: &Path, ops: u64, seed: u64, progress: &AtomicU64) -> Tally {
    let mut rng = Rng::new(seed);
    let mut model = Model::default();
    let mut tally = Tally::default();
    let mut log = OpenOptions::new()
        .append(true)
        .open(shared.join("log"))
        .unwrap();
    let counter = OpenOptions::new()
        .read(true)
        .write(true)
        .open(shared.join("counter"))
        .unwrap();
    let pool = shared.join("pool");
    fs::create_dir(own).unwrap();
    for i in 0..ops {
        progress.store(i, Ordering::Relaxed);
        let names: Vec<String> = model.names.keys().cloned().collect();
        let any = |rng: &mut Rng| names[rng.below(names.len() as u64) as usize].clone();
        let fresh = format!("n{}", rng.below(40));
        match rng.below(100) {
            0..=14 => {
                let len = rng.below(3000) as usize;
                let data = rng.bytes(len);
                fs::write(own.join(&fresh), &data).unwrap();
                // Writing an existing name truncates that inode (all its links).
                match model.names.get(&fresh) {
                    Some(&id) => model.inodes[id] = data,
                    None => {
                        model.inodes.push(data);
                        model.names.insert(fresh, model.inodes.len() - 1);
                    }
                }
            }
            15..=24 if !names.is_empty() => {
                let name = any(&mut rng);
                let len = 1 + rng.below(500) as usize;
                let data = rng.bytes(len);
                OpenOptions::new()
                    .append(true)
                    .open(own.join(&name))
                    .unwrap()
                    .write_all(&data)
                    .unwrap();
                model.inodes[model.names[&name]].extend_from_slice(&data);
            }
            25..=32 if !names.is_empty() => {
                let from = any(&mut rng);
                fs::rename(own.join(&from), own.join(&fresh)).unwrap();
                let id = model.names[&from];
                // Renaming onto another link of the same inode changes nothing.
                if from == fresh || model.names.get(&fresh) != Some(&id) {
                    model.names.remove(&from);
                    model.names.insert(fresh, id);
                }
            }
            33..=38 if !names.is_empty() && !model.names.contains_key(&fresh) => {
                let from = any(&mut rng);
                fs::hard_link(own.join(&from), own.join(&fresh)).unwrap();
                model.names.insert(fresh, model.names[&from]);
            }
            39..=44 if !names.is_empty() => {
                let name = any(&mut rng);
                fs::remove_file(own.join(&name)).unwrap();
                model.names.remove(&name);
            }
            45..=52 if !names.is_empty() => {
                let name = any(&mut rng);
                let id = model.names[&name];
                let got = fs::read(own.join(&name)).unwrap();
                assert!(
                    got == model.inodes[id],
                    "t{t} op {i}: {name} content differs from model ({} bytes read, {} expected)",
                    got.len(),
                    model.inodes[id].len()
                );
                let nlink = model.names.values().filter(|&&v| v == id).count() as u64;
                use std::os::unix::fs::MetadataExt;
                assert_eq!(
                    fs::metadata(own.join(&name)).unwrap().nlink(),
                    nlink,
                    "t{t} op {i}: {name} nlink"
                );
            }
            53..=56 => {
                let mut listed: Vec<String> = fs::read_dir(own)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
                listed.sort();
                let mut expect = names.clone();
                expect.sort();
                assert_eq!(listed, expect, "t{t} op {i}: readdir of own dir");
            }
            57..=71 => {
                log.write_all(&record(t, tally.appends)).unwrap();
                tally.appends += 1;
            }
            72..=79 => {
                sys::flock(&counter, libc::LOCK_EX).unwrap();
                let cur = sys::pread(&counter, 8, 0).unwrap();
                let n = u64::from_le_bytes(cur.try_into().expect("counter is 8 bytes"));
                sys::pwrite(&counter, &(n + 1).to_le_bytes(), 0).unwrap();
                sys::flock(&counter, libc::LOCK_UN).unwrap();
                tally.increments += 1;
            }
            80..=87 => {
                let tmp = pool.join(format!("tmp-{t}-{i}"));
                fs::write(&tmp, format!("{t} {i}")).unwrap();
                let name = format!("p-{t}-{i}");
                fs::rename(&tmp, pool.join(&name)).unwrap();
                tally.pool.insert(name);
                if rng.chance(40) {
                    let victim = tally
                        .pool
                        .iter()
                        .nth(rng.below(tally.pool.len() as u64) as usize)
                        .unwrap()
                        .clone();
                    fs::remove_file(pool.join(&victim)).unwrap();
                    tally.pool.remove(&victim);
                }
            }
            88..=91 => {
                let mut seen = BTreeSet::new();
                for e in fs::read_dir(&pool).unwrap() {
                    let name = e.unwrap().file_name().into_string().unwrap();
                    assert!(
                        seen.insert(name.clone()),
                        "t{t} op {i}: {name} listed twice in pool"
                    );
                }
                for mine in &tally.pool {
                    assert!(
                        seen.contains(mine),
                        "t{t} op {i}: own pool entry {mine} not listed"
                    );
                }
            }
            _ => {
                let v = format!("{t}:{i}");
                sys::setxattr(&shared.join("x"), &format!("user.t{t}"), v.as_bytes(), 0).unwrap();
                tally.last_xattr = Some(v);
            }
        }
    }
    // Final check of the private directory against the model.
    for (name, &id) in &model.names {
        assert!(
            fs::read(own.join(name)).unwrap() == model.inodes[id],
            "t{t}: final {name} differs"
        );
    }
    tally
}

/// Counts finished workers even when one panics (the guard drops then too).
struct Done(Arc<AtomicUsize>);
impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn eight_threads_lose_no_update() {
    let m = Mount::new();
    let ops = support::env_u64("FERRY_STRESS_OPS", 2500);
    let seed = support::env_u64("FERRY_STRESS_SEED", 7);
    let timeout = Duration::from_secs(support::env_u64("FERRY_STRESS_TIMEOUT", 240));
    let shared = m.join("shared");
    fs::create_dir(&shared).unwrap();
    fs::create_dir(shared.join("pool")).unwrap();
    File::create(shared.join("log")).unwrap();
    fs::write(shared.join("counter"), 0u64.to_le_bytes()).unwrap();
    File::create(shared.join("x")).unwrap();

    let done = Arc::new(AtomicUsize::new(0));
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..THREADS).map(|_| AtomicU64::new(0)).collect());
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (shared, own): (PathBuf, PathBuf) = (shared.clone(), m.join(&format!("t{t}")));
            let (done, progress) = (Done(done.clone()), progress.clone());
            thread::Builder::new()
                .name(format!("stress-{t}"))
                .spawn(move || {
                    let _done = done;
                    worker(
                        t,
                        &shared,
                        &own,
                        ops,
                        seed.wrapping_add(t as u64),
                        &progress[t],
                    )
                })
                .unwrap()
        })
        .collect();
    let finished = support::poll_until(timeout, || done.load(Ordering::SeqCst) == THREADS);
    if !finished {
        let at: Vec<u64> = progress.iter().map(|p| p.load(Ordering::Relaxed)).collect();
        // Dropping the mount (lazy unmount + kill) unblocks any stuck syscall.
        panic!(
            "watchdog: threads not done after {timeout:?} (deadlock?); op index per thread: {at:?}"
        );
    }
    let tallies: Vec<Tally> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
        .collect();

    // O_APPEND: every record present exactly once, none torn.
    let log = fs::read(shared.join("log")).unwrap();
    let appends: u64 = tallies.iter().map(|t| t.appends).sum();
    assert_eq!(
        log.len() as u64,
        appends * RECORD as u64,
        "appended bytes lost or duplicated"
    );
    let mut seen = BTreeSet::new();
    for rec in log.chunks(RECORD) {
        let text = std::str::from_utf8(rec).expect("torn record");
        let mut it = text.split(' ');
        let (t, s) = (it.next().unwrap(), it.next().unwrap());
        assert!(
            rec == record(t[1..].parse().unwrap(), s[1..].parse().unwrap()),
            "torn record {text:?}"
        );
        assert!(
            seen.insert((t.to_string(), s.to_string())),
            "record {t} {s} twice"
        );
    }
    // flock'd read-modify-write: no increment lost.
    let counter = u64::from_le_bytes(
        fs::read(shared.join("counter"))
            .unwrap()
            .try_into()
            .unwrap(),
    );
    assert_eq!(
        counter,
        tallies.iter().map(|t| t.increments).sum::<u64>(),
        "counter increments lost"
    );
    // Pool: exactly the union of what each thread left there.
    let listed: BTreeSet<String> = fs::read_dir(shared.join("pool"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let expect: BTreeSet<String> = tallies
        .iter()
        .flat_map(|t| t.pool.iter().cloned())
        .collect();
    assert_eq!(
        listed, expect,
        "pool directory differs from the union of thread actions"
    );
    // xattrs: each thread's last value.
    for (t, tally) in tallies.iter().enumerate() {
        if let Some(v) = &tally.last_xattr {
            assert_eq!(
                sys::getxattr(&shared.join("x"), &format!("user.t{t}"), 256).unwrap(),
                v.as_bytes()
            );
        }
    }
    eprintln!(
        "stress: {THREADS}×{ops} ops; {appends} appends, {counter} increments, {} pool entries",
        listed.len()
    );
}
