//! The peers ferry is compared with over a slow link: an sshd of our own on
//! the host's loopback, and `sshfs` or `rclone mount` (sftp) clients of it,
//! each a FUSE mount that is unmounted and killed on drop.
//!
//! The client reaches the sshd through whatever address it is given: a
//! [`super::wan::Wan`] proxy for a delayed link, or the sshd's own port.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{is_mounted, poll_until, run_bounded, wait_bounded, TempDir};

/// A process killed (and reaped) on drop.
pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free loopback port (bound, then released for a server to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// An sshd on the host's loopback with a throwaway host key and a client
/// key allowed to log in as root into the file system.
pub struct Sshd {
    dir: TempDir,
    port: u16,
    _daemon: Daemon,
}

impl Sshd {
    /// Makes the keys and starts the daemon; panics if it does not listen
    /// within 10 s.
    pub fn start() -> Sshd {
        let dir = TempDir::new("ferry-sshd");
        let d = dir.path();
        for key in ["host", "client"] {
            let r = run_bounded(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(d.join(key)),
                Duration::from_secs(30),
            );
            assert!(
                matches!(&r, Ok(o) if o.status.success()),
                "ssh-keygen: {}",
                super::describe(&r)
            );
        }
        fs::copy(d.join("client.pub"), d.join("authorized_keys")).unwrap();
        let port = free_port();
        fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nPermitRootLogin prohibit-password\n\
                 PasswordAuthentication no\nStrictModes no\nUsePAM no\nPidFile none\n\
                 Subsystem sftp internal-sftp\n",
                dir = d.display()
            ),
        )
        .unwrap();
        // Privilege separation needs it; Debian makes it only for the service.
        fs::create_dir_all("/run/sshd").unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .expect("sshd");
        let daemon = Daemon(child);
        let up = poll_until(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(up, "sshd did not start: see {}/sshd.log", d.display());
        Sshd {
            dir,
            port,
            _daemon: daemon,
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The private key the clients log in with.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client")
    }
}

/// A FUSE mount by a peer, unmounted and killed on drop.
pub struct PeerMount {
    mnt: PathBuf,
    daemon: Daemon,
}

impl PeerMount {
    /// Runs `cmd` (a client staying in the foreground, logging to `log`)
    /// and waits, at most 30 s, until `mnt` is mounted.
    pub fn start(mut cmd: Command, mnt: &Path, log: &Path) -> PeerMount {
        let log = fs::File::create(log).expect("peer log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let m = PeerMount {
            mnt: mnt.to_path_buf(),
            daemon: Daemon(child),
        };
        assert!(
            poll_until(Duration::from_secs(30), || is_mounted(mnt)),
            "{cmd:?} did not mount {}",
            mnt.display()
        );
        m
    }

    /// `sshfs -f root@VIA:REMOTE MNT`, logging to `log`.
    pub fn sshfs(sshd: &Sshd, via: SocketAddr, remote: &Path, mnt: &Path, log: &Path) -> Self {
        let mut cmd = Command::new("sshfs");
        cmd.arg("-f")
            .arg(format!("root@{}:{}", via.ip(), remote.display()))
            .arg(mnt)
            .arg("-o")
            .arg(format!(
                "port={},IdentityFile={},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null",
                via.port(),
                sshd.client_key().display()
            ));
        PeerMount::start(cmd, mnt, log)
    }

    /// `rclone mount wan:REMOTE MNT` on an sftp remote reaching `sshd`
    /// through `via`, configured entirely through the environment, with
    /// `args` added (cache mode, rc, …).
    pub fn rclone(
        sshd: &Sshd,
        via: SocketAddr,
        remote: &Path,
        mnt: &Path,
        args: &[&str],
        log: &Path,
    ) -> Self {
        let mut cmd = Command::new("rclone");
        cmd.env("RCLONE_CONFIG", "/dev/null")
            .env("RCLONE_CONFIG_WAN_TYPE", "sftp")
            .env("RCLONE_CONFIG_WAN_HOST", via.ip().to_string())
            .env("RCLONE_CONFIG_WAN_PORT", via.port().to_string())
            .env("RCLONE_CONFIG_WAN_USER", "root")
            .env("RCLONE_CONFIG_WAN_KEY_FILE", sshd.client_key())
            .env("RCLONE_CONFIG_WAN_SHELL_TYPE", "unix")
            .arg("mount")
            .arg(format!("wan:{}", remote.display()))
            .arg(mnt)
            .args(args);
        PeerMount::start(cmd, mnt, log)
    }
}

impl Drop for PeerMount {
    fn drop(&mut self) {
        let _ = run_bounded(
            Command::new("umount").arg("-l").arg(&self.mnt),
            Duration::from_secs(10),
        );
        let _ = wait_bounded(&mut self.daemon.0, Duration::from_secs(10));
    }
}
