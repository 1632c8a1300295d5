//! Reading and writing another process's memory.
//!
//! `process_vm_readv`/`writev` first: one system call, no file descriptor,
//! and it needs only ptrace-read rights. They honour page protections, so a
//! write to a read-only page (code, RELRO) fails; `/proc/PID/mem` then takes
//! over, because the kernel serves it with `FOLL_FORCE`, the way a debugger
//! plants breakpoints.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use crate::error::{Error, Result};
use crate::sys::{self, Pid};

/// Fills `buf` from address `addr` of process `pid`.
pub fn read(pid: Pid, addr: u64, buf: &mut [u8]) -> Result<()> {
    match sys::process_vm_readv(pid, addr, buf) {
        Ok(n) if n == buf.len() => Ok(()),
        _ => OpenOptions::new()
            .read(true)
            .open(format!("/proc/{pid}/mem"))
            .and_then(|mem| mem.read_exact_at(buf, addr))
            .map_err(|source| Error::Memory { pid, addr, source }),
    }
}

/// Writes `data` at address `addr` of process `pid`, even into read-only pages.
pub fn write(pid: Pid, addr: u64, data: &[u8]) -> Result<()> {
    match sys::process_vm_writev(pid, addr, data) {
        Ok(n) if n == data.len() => Ok(()),
        _ => OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .and_then(|mem| mem.write_all_at(data, addr))
            .map_err(|source| Error::Memory { pid, addr, source }),
    }
}

/// Reads `len` bytes at `addr` of process `pid` into a new vector.
pub fn read_vec(pid: Pid, addr: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0; len];
    read(pid, addr, &mut buf)?;
    Ok(buf)
}
