//! The spawn server's messages: a [`Prepared`] spawn one way, the outcome
//! the other, as flat little-endian fields; fds travel beside the bytes as
//! `SCM_RIGHTS` and are named in the bytes by their index.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::child::{Cwd, Options, Prepared, Rlimit, Spawned};
use crate::error::Step;
use crate::process::Fault;

/// Bumped whenever a field changes; client and server are the same binary
/// or the same crate version, so a mismatch is a bug worth naming.
const VERSION: u32 = 1;

/// A message being built: bytes, and the fds to attach.
#[derive(Default)]
pub(crate) struct Encoder {
    pub bytes: Vec<u8>,
    pub fds: Vec<RawFd>,
}

impl Encoder {
    fn u32(&mut self, v: u32) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.u32(v as u32);
    }
    fn bool(&mut self, v: bool) {
        self.u32(v.into());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.bytes.extend_from_slice(v);
    }
    fn fd(&mut self, fd: RawFd) {
        self.u32(self.fds.len() as u32);
        self.fds.push(fd);
    }
    fn option<T>(&mut self, v: Option<T>, put: impl FnOnce(&mut Encoder, T)) {
        self.bool(v.is_some());
        if let Some(v) = v {
            put(self, v);
        }
    }
    fn list<T>(&mut self, items: &[T], mut put: impl FnMut(&mut Encoder, &T)) {
        self.u32(items.len() as u32);
        for item in items {
            put(self, item);
        }
    }
}

/// A message being read; every getter fails cleanly on short input.
pub(crate) struct Decoder<'a> {
    bytes: &'a [u8],
    fds: &'a [OwnedFd],
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("spawn server message: bad {what}"),
    )
}

impl<'a> Decoder<'a> {
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(invalid("length"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("took 4 bytes"),
        ))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("took 8 bytes"),
        ))
    }
    fn i32(&mut self) -> io::Result<i32> {
        Ok(self.u32()? as i32)
    }
    fn bool(&mut self) -> io::Result<bool> {
        Ok(self.u32()? != 0)
    }
    fn bytes(&mut self) -> io::Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn cstring(&mut self) -> io::Result<CString> {
        CString::new(self.bytes()?).map_err(|_| invalid("string"))
    }
    fn fd(&mut self) -> io::Result<RawFd> {
        let i = self.u32()? as usize;
        self.fds
            .get(i)
            .map(AsRawFd::as_raw_fd)
            .ok_or_else(|| invalid("fd index"))
    }
    fn option<T>(&mut self, get: impl FnOnce(&mut Self) -> io::Result<T>) -> io::Result<Option<T>> {
        if self.bool()? {
            get(self).map(Some)
        } else {
            Ok(None)
        }
    }
    fn list<T>(&mut self, mut get: impl FnMut(&mut Self) -> io::Result<T>) -> io::Result<Vec<T>> {
        let n = self.u32()? as usize;
        // Bounded by the message: every item takes at least 4 bytes.
        if n > self.bytes.len() / 4 {
            return Err(invalid("count"));
        }
        (0..n).map(|_| get(self)).collect()
    }
}

/// Encodes a spawn request. The fds it names are the caller's; the message
/// carries duplicates.
pub(crate) fn encode_request(p: &Prepared) -> Encoder {
    let mut e = Encoder::default();
    e.u32(VERSION);
    e.bytes(p.path.as_bytes());
    e.list(&p.argv, |e, a| e.bytes(a.as_bytes()));
    e.list(&p.envp, |e, v| e.bytes(v.as_bytes()));
    match &p.cwd {
        None => e.u32(0),
        Some(Cwd::Path(dir)) => {
            e.u32(1);
            e.bytes(dir.as_bytes());
        }
        Some(Cwd::Fd(fd)) => {
            e.u32(2);
            e.fd(*fd);
        }
    }
    e.option(p.chroot.as_ref(), |e, dir| e.bytes(dir.as_bytes()));
    e.list(&p.fds, |e, &(from, to)| {
        e.fd(from);
        e.i32(to);
    });
    e.option(p.cgroup, Encoder::fd);
    let o = &p.opts;
    e.bool(o.setsid);
    e.option(o.pgroup, Encoder::i32);
    e.option(o.ctty, Encoder::i32);
    e.option(o.uid, Encoder::u32);
    e.option(o.gid, Encoder::u32);
    e.option(o.groups.as_ref(), |e, g| e.list(g, |e, &g| e.u32(g)));
    e.option(o.umask, Encoder::u32);
    e.list(&o.rlimits, |e, r| {
        e.u32(r.resource);
        e.u64(r.soft);
        e.u64(r.hard);
    });
    e.option(o.pdeathsig, Encoder::i32);
    e.bool(o.no_new_privs);
    e.list(&o.ambient_caps, |e, &c| e.u32(c));
    e.u64(o.namespaces);
    e.u64(o.signal_mask);
    e.u64(o.signal_default);
    e.bool(o.close_other_fds);
    e
}

/// Decodes a spawn request; the received `fds` end up owned by the result.
pub(crate) fn decode_request(bytes: &[u8], fds: Vec<OwnedFd>) -> io::Result<Prepared> {
    let mut d = Decoder { bytes, fds: &fds };
    if d.u32()? != VERSION {
        return Err(invalid("version"));
    }
    let path = d.cstring()?;
    let argv = d.list(Decoder::cstring)?;
    let envp = d.list(Decoder::cstring)?;
    let cwd = match d.u32()? {
        0 => None,
        1 => Some(Cwd::Path(d.cstring()?)),
        2 => Some(Cwd::Fd(d.fd()?)),
        _ => return Err(invalid("cwd")),
    };
    let chroot = d.option(Decoder::cstring)?;
    let fd_map = d.list(|d| Ok((d.fd()?, d.i32()?)))?;
    let cgroup = d.option(Decoder::fd)?;
    let opts = Options {
        setsid: d.bool()?,
        pgroup: d.option(Decoder::i32)?,
        ctty: d.option(Decoder::i32)?,
        uid: d.option(Decoder::u32)?,
        gid: d.option(Decoder::u32)?,
        groups: d.option(|d| d.list(Decoder::u32))?,
        umask: d.option(Decoder::u32)?,
        rlimits: d.list(|d| {
            Ok(Rlimit {
                resource: d.u32()?,
                soft: d.u64()?,
                hard: d.u64()?,
            })
        })?,
        pdeathsig: d.option(Decoder::i32)?,
        no_new_privs: d.bool()?,
        ambient_caps: d.list(Decoder::u32)?,
        namespaces: d.u64()?,
        signal_mask: d.u64()?,
        signal_default: d.u64()?,
        close_other_fds: d.bool()?,
    };
    Ok(Prepared {
        path,
        argv,
        envp,
        cwd,
        chroot,
        fds: fd_map,
        cgroup,
        opts,
        owned: fds,
    })
}

/// Encodes the server's answer: the child (pidfd attached) and whether a
/// step failed, or the errno of a failed clone.
pub(crate) fn encode_reply(outcome: &io::Result<Spawned>) -> Encoder {
    let mut e = Encoder::default();
    match outcome {
        Ok(spawned) => {
            e.u32(0);
            e.u32(spawned.pid);
            e.fd(spawned.pidfd.as_raw_fd());
            let (step, errno) = spawned
                .failure
                .map_or((0, 0), |(step, errno)| (step.to_wire(), errno));
            e.u32(step);
            e.i32(errno);
        }
        Err(err) => {
            e.u32(1);
            e.i32(err.raw_os_error().unwrap_or(libc::EIO));
        }
    }
    e
}

/// Decodes the server's answer.
pub(crate) fn decode_reply(
    bytes: &[u8],
    mut fds: Vec<OwnedFd>,
) -> io::Result<Result<Spawned, Fault>> {
    let mut d = Decoder { bytes, fds: &fds };
    match d.u32()? {
        0 => {
            let pid = d.u32()?;
            d.fd()?;
            let failure = match (d.u32()?, d.i32()?) {
                (0, _) => None,
                (step, errno) => {
                    Some((Step::from_wire(step).ok_or_else(|| invalid("step"))?, errno))
                }
            };
            Ok(Ok(Spawned {
                pid,
                pidfd: fds.swap_remove(0),
                failure,
            }))
        }
        1 => Ok(Err(Fault::Clone(io::Error::from_raw_os_error(d.i32()?)))),
        _ => Err(invalid("reply")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::child::Options;

    fn sample() -> Prepared {
        Prepared {
            path: CString::new("/bin/echo").unwrap(),
            argv: vec![CString::new("echo").unwrap(), CString::new("hi").unwrap()],
            envp: vec![CString::new("A=1").unwrap()],
            cwd: Some(Cwd::Path(CString::new("/tmp").unwrap())),
            chroot: None,
            fds: vec![(0, 1)],
            cgroup: None,
            opts: Options {
                setsid: true,
                uid: Some(65534),
                groups: Some(vec![1, 2]),
                rlimits: vec![Rlimit {
                    resource: 7,
                    soft: 64,
                    hard: 128,
                }],
                signal_mask: 1 << 9,
                ..Options::default()
            },
            owned: Vec::new(),
        }
    }

    #[test]
    fn a_request_survives_the_round_trip() {
        let request = encode_request(&sample());
        // Stand-ins for the fds SCM_RIGHTS would deliver.
        let received: Vec<OwnedFd> = request
            .fds
            .iter()
            .map(|_| std::fs::File::open("/dev/null").unwrap().into())
            .collect();
        let raw = received[0].as_raw_fd();
        let decoded = decode_request(&request.bytes, received).unwrap();
        assert_eq!(decoded.argv, sample().argv);
        assert_eq!(decoded.envp, sample().envp);
        assert!(matches!(decoded.cwd, Some(Cwd::Path(ref p)) if p.as_bytes() == b"/tmp"));
        assert_eq!(decoded.fds, [(raw, 1)]);
        assert_eq!(decoded.opts.uid, Some(65534));
        assert_eq!(decoded.opts.groups, Some(vec![1, 2]));
        assert_eq!(decoded.opts.rlimits[0].hard, 128);
        assert_eq!(decoded.opts.signal_mask, 1 << 9);
        assert!(decoded.opts.setsid);
    }

    #[test]
    fn truncated_or_foreign_messages_are_errors_not_panics() {
        let request = encode_request(&sample());
        for len in 0..request.bytes.len() {
            assert!(
                decode_request(&request.bytes[..len], Vec::new()).is_err(),
                "prefix of {len} bytes"
            );
        }
        assert!(decode_reply(&[9, 0, 0, 0], Vec::new()).is_err());
    }
}
