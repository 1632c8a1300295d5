/*!
ferry-fs: a local-first file system over FUSE.

Every write, data and metadata alike, finishes on local disk. The layers, in
the order a request travels:

* [`fuse`] — [`fuse::FerryFs`] translates fuser requests and owns the cache
  policy (writeback cache, readdirplus, timeouts);
* [`vfs`] — [`vfs::Vfs`] keeps POSIX semantics: names, link counts, rename
  rules, open handles, unlinked-but-open files;
* [`store`] — [`store::Store`] is the truth for this host: metadata in
  SQLite, file bytes in plain files, and every mutation committed together
  with its record in the change log;
* [`log`] — [`log::Change`], the durable ordered outbox that replication
  ships to a backend.

[`replicate`] ships the log to a backend and restores a new host from one,
keeping the invariants I1–I4 stated in its docs; [`binding`] ties a store to
its volume and refuses one that went back in time; [`wal`] checks the
store's write-ahead log before SQLite replays it.

[`mount`] ties them to a mountpoint, and [`fsck`] checks offline that the
log describes exactly the store (and, with `--verify`, that clean files
still hash to what the backend has).

```no_run
use ferry_fs::mount::{mount, MountConfig};

let cfg = MountConfig::new("/var/lib/ferry/vol".into(), "/mnt/vol".into());
let mounted = mount(&cfg)?; // returns once the kernel has the mount
mounted.run()?;             // serves until `ferry umount /mnt/vol`
# Ok::<(), Box<dyn std::error::Error>>(())
```
*/
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod binding;
pub mod cache;
pub mod context;
pub mod control;
pub mod data;
pub mod error;
pub mod fsck;
pub mod fuse;
pub mod ids;
pub mod journal;
pub mod log;
pub mod mount;
mod offload;
pub mod replicate;
pub mod store;
mod unsettled;
pub mod vfs;
pub mod wal;

pub use error::StoreError;
