//! A check of the store's SQLite write-ahead log before SQLite sees it.
//!
//! SQLite replays the WAL up to the first frame whose salt or checksum is
//! wrong and silently drops everything after it: a torn tail after a power
//! cut is dropped as it should be, but so is every committed transaction
//! behind a damaged frame in the middle. A store that opens "fine" with
//! its newest commits gone would then ship an older state and reuse ids,
//! so ferry looks first.
//!
//! A frame written in the current generation of the WAL carries the
//! header's salts; frames of earlier generations (left behind a checkpoint
//! that restarted the log) carry other salts. So: if a frame fails its
//! checksum and a *later* frame still carries the current salts, that
//! later frame was written after the bad one in the same generation — the
//! bad frame is damage, not a torn tail, and the store is refused.
//!
//! Format: <https://www.sqlite.org/fileformat2.html#walformat>.

use std::io::Read;
use std::path::Path;

const HEADER: usize = 32;
const FRAME_HEADER: usize = 24;

/// What the check found wrong, for one line of error.
#[derive(Debug, PartialEq, Eq)]
pub struct Damage {
    /// The first frame (1-based) that fails its checksum.
    pub frame: u64,
    /// Frames of the same generation after it, which SQLite would drop.
    pub dropped: u64,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "its write-ahead log is damaged at frame {}, and {} later frame(s) of committed \
             changes would be silently dropped",
            self.frame, self.dropped
        )
    }
}

/// Checks the WAL at `path` (absent or empty is fine).
pub fn check(path: &Path) -> std::io::Result<Result<(), Damage>> {
    let mut wal = Vec::new();
    match std::fs::File::open(path) {
        Ok(mut f) => f.read_to_end(&mut wal)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ok(())),
        Err(e) => return Err(e),
    };
    Ok(scan(&wal))
}

/// The check on the WAL's bytes.
fn scan(wal: &[u8]) -> Result<(), Damage> {
    if wal.len() < HEADER {
        return Ok(()); // never written past its creation: nothing to replay
    }
    let be = |b: &[u8]| u32::from_be_bytes(b[..4].try_into().expect("4 bytes"));
    let magic = be(&wal[0..]);
    if magic & !1 != 0x377f_0682 {
        // Not a WAL SQLite would replay at all: it ignores it, losing
        // nothing that a checkpoint did not already hold.
        return Ok(());
    }
    let big_endian = magic & 1 == 1;
    let page_size = match be(&wal[8..]) {
        1 => 65536,
        n => n as usize,
    };
    let salts = &wal[16..24];
    let header_sum = checksum(big_endian, (0, 0), &wal[..24]);
    if header_sum != (be(&wal[24..]), be(&wal[28..])) {
        return Ok(()); // SQLite treats a bad header as an empty WAL
    }
    let frame_len = FRAME_HEADER + page_size;
    let frames = wal[HEADER..].chunks_exact(frame_len);
    let mut sum = header_sum;
    let mut bad: Option<u64> = None;
    let mut dropped = 0;
    for (i, frame) in frames.enumerate() {
        let current = &frame[8..16] == salts;
        match bad {
            None => {
                sum = checksum(big_endian, sum, &frame[..8]);
                sum = checksum(big_endian, sum, &frame[FRAME_HEADER..]);
                if !current || sum != (be(&frame[16..]), be(&frame[20..])) {
                    if !current {
                        return Ok(()); // the end of this generation
                    }
                    bad = Some(i as u64 + 1);
                }
            }
            Some(_) if current => dropped += 1,
            Some(_) => {}
        }
    }
    match bad {
        Some(frame) if dropped > 0 => Err(Damage { frame, dropped }),
        _ => Ok(()),
    }
}

/// SQLite's WAL checksum over `data` (a multiple of 8 bytes), continuing
/// from `(s0, s1)`.
fn checksum(big_endian: bool, (mut s0, mut s1): (u32, u32), data: &[u8]) -> (u32, u32) {
    for pair in data.chunks_exact(8) {
        let word = |b: &[u8]| {
            let b: [u8; 4] = b.try_into().expect("4 bytes");
            if big_endian {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        };
        s0 = s0.wrapping_add(word(&pair[..4])).wrapping_add(s1);
        s1 = s1.wrapping_add(word(&pair[4..])).wrapping_add(s0);
    }
    (s0, s1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real WAL: a database written by SQLite in WAL mode, with the
    /// checkpoint that would empty the WAL prevented.
    fn real_wal() -> Vec<u8> {
        static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("ferry-wal-test-{}-{call}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("t.db");
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.execute_batch("CREATE TABLE t(x)").unwrap();
        for i in 0..20 {
            conn.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
        }
        let wal = std::fs::read(dir.join("t.db-wal")).unwrap();
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
        wal
    }

    #[test]
    fn an_intact_wal_passes_and_a_torn_tail_is_not_damage() {
        let wal = real_wal();
        assert!(wal.len() > HEADER + 4 * (FRAME_HEADER + 4096));
        assert_eq!(scan(&wal), Ok(()));
        // A tail cut mid-frame (a power cut while appending) is legal.
        assert_eq!(scan(&wal[..wal.len() - 1000]), Ok(()));
        // So is a corrupt *last* frame: nothing follows it.
        let mut last = wal.clone();
        let n = last.len();
        last[n - 10] ^= 0xff;
        assert_eq!(scan(&last), Ok(()));
    }

    #[test]
    fn a_damaged_frame_with_frames_after_it_is_refused() {
        let mut wal = real_wal();
        // Flip 4 bytes in the page data of frame 2.
        let at = HEADER + (FRAME_HEADER + 4096) + FRAME_HEADER + 100;
        for b in &mut wal[at..at + 4] {
            *b ^= 0x5a;
        }
        let damage = scan(&wal).unwrap_err();
        assert_eq!(damage.frame, 2);
        assert!(damage.dropped > 0, "{damage:?}");
    }

    #[test]
    fn garbage_never_panics() {
        let wal = real_wal();
        for cut in [0, 7, 31, 32, 33, 100, 4000] {
            let _ = scan(&wal[..cut.min(wal.len())]);
        }
        let _ = scan(&[0xffu8; 5000]);
    }
}
