//! HAProxy as the second peer proxy (issue 13: the gateway is judged against
//! the two TLS reverse proxies operators already run).
//!
//! Configured like the nginx proxy of [`super::proxy_server`]: TLS
//! termination with its own leaf, re-encryption to the origin verified
//! against the test CA (`verify required`, `verifyhost` the origin's DNS
//! name, which is also sent as SNI), HTTP/1.1 keep-alive on both sides and
//! a pool of idle origin connections shared by the client connections
//! (`http-reuse always`), kept as long as nginx keeps its own (300 s). No
//! logging, as nginx's `access_log off`.
//!
//! HAProxy runs in the foreground as one process (`-db`, no master-worker):
//! with [`Threads::Auto`] it starts one thread per CPU it may run on (its
//! default when `nbthread` is absent), the same CPU budget as the gateway's
//! runtime and nginx's `worker_processes auto`; with [`Threads::One`] one
//! thread does all the work, so that callgrind sees all of it, as nginx's
//! `master_process off`.
//!
//! With [`Relay::Tcp`] the same HAProxy is the benchmark's floor instead: a
//! relay in `mode tcp` that passes the client's TLS to the origin unread.

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};

use super::{launched, term_with_parent, wait_exit, wait_listening, Launcher, Pki, ORIGIN_IP, ORIGIN_NAME, PROXY_IP};

/// What HAProxy does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    /// A TLS reverse proxy configured like nginx's (the peer row).
    Http,
    /// `mode tcp`: the client's bytes, TLS included, relayed unread to the
    /// origin over one new connection each. It inspects nothing and
    /// terminates no TLS, so it is the floor: what putting any process
    /// between the client and the origin costs on this host.
    Tcp,
}

/// How many threads HAProxy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// HAProxy's default: one per CPU the process may run on.
    Auto,
    /// `nbthread 1`.
    One,
}

/// A running HAProxy (one process, in its own process group); stopped on
/// drop.
pub struct Haproxy {
    pub child: Child,
    /// Its configuration, combined certificate, log and callgrind dumps.
    pub dir: PathBuf,
}

impl Haproxy {
    /// Writes `haproxy.cfg` under `dir` for a proxy listening on
    /// [`PROXY_IP`]`:port` in front of the origin on `origin_port`, checks
    /// it (`haproxy -c`), starts HAProxy (under `launcher` if there is one)
    /// and waits until it accepts.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        haproxy: &Path,
        dir: PathBuf,
        relay: Relay,
        threads: Threads,
        pki: &Pki,
        port: u16,
        origin_port: u16,
        launcher: Option<&Launcher>,
    ) -> Result<Haproxy> {
        std::fs::create_dir_all(&dir)?;
        // HAProxy wants the leaf and its key in one PEM file.
        let pem = dir.join("proxy.pem");
        let leaf = std::fs::read_to_string(&pki.proxy.0)?;
        let key = std::fs::read_to_string(&pki.proxy.1)?;
        std::fs::write(&pem, format!("{leaf}{key}"))?;
        let nbthread = match threads {
            Threads::Auto => "",
            Threads::One => "    nbthread 1\n",
        };
        let http = format!(
            r#"# Written by benches/benches/https/haproxy.rs.
global
{nbthread}    # Enough for the benchmark; also keeps the descriptor limit HAProxy
    # derives from it low enough for valgrind (which keeps some for itself).
    maxconn 4096
    ssl-server-verify required
    # No `log` line: nothing is logged, as nginx's `access_log off`.

defaults
    mode http
    timeout connect 5s
    # nginx's keepalive_timeout 300s on both sides.
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    timeout http-request 30s

frontend proxy
    bind {PROXY_IP}:{port} ssl crt {pem} ssl-min-ver TLSv1.2
    default_backend origin

backend origin
    # Idle origin connections are shared by every client connection (nginx's
    # `keepalive 32` pool); `safe` would keep a client's first request off
    # another client's connection.
    http-reuse always
    # Verified like nginx's proxy_ssl_verify: the chain against the test CA
    # and the origin's DNS name (also sent as SNI). Idle connections are
    # purged after 300 s (default 5 s), as nginx's upstream keepalive_timeout.
    server origin {ORIGIN_IP}:{origin_port} ssl verify required ca-file {ca} verifyhost {ORIGIN_NAME} sni str({ORIGIN_NAME}) pool-purge-delay 300s
"#,
            pem = pem.display(),
            ca = pki.ca.display(),
        );
        // The floor: no TLS termination, no HTTP, no pool (one origin
        // connection per client connection, made when the client connects).
        let tcp = format!(
            r#"# Written by benches/benches/https/haproxy.rs (the TCP relay).
global
{nbthread}    maxconn 4096

defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s

frontend relay
    bind {PROXY_IP}:{port}
    default_backend origin

backend origin
    server origin {ORIGIN_IP}:{origin_port}
"#
        );
        let conf = match relay {
            Relay::Http => http,
            Relay::Tcp => tcp,
        };
        let conf_path = dir.join("haproxy.cfg");
        std::fs::write(&conf_path, conf)?;
        let out = Command::new(haproxy)
            .arg("-c")
            .arg("-q")
            .arg("-f")
            .arg(&conf_path)
            .output()
            .context("running haproxy -c")?;
        ensure!(
            out.status.success(),
            "haproxy rejected {}:\n{}{}",
            conf_path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let log = dir.join("haproxy.log");
        let stderr = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = launched(launcher, haproxy);
        // -db: foreground, one process. -q: no start-up notices on stderr.
        cmd.arg("-db").arg("-q").arg("-f").arg(&conf_path);
        // Own process group, as nginx: its CPU time is read by group.
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).process_group(0);
        term_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("starting {}", haproxy.display()))?;
        let mut proxy = Haproxy { child, dir };
        let listen = SocketAddr::new(PROXY_IP.parse()?, port);
        wait_listening(listen, "haproxy", launcher.map_or(30, |_| 300), || {
            Ok(proxy.child.try_wait()?.map(|s| format!("{s}\n{}", std::fs::read_to_string(&log).unwrap_or_default())))
        })?;
        Ok(proxy)
    }

    /// Its process group (its own pid).
    pub fn pgid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Threads of the running process, from /proc.
    pub fn threads(&self) -> Result<usize> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let n = status.lines().find_map(|l| l.strip_prefix("Threads:")).context("no Threads line")?;
        Ok(n.trim().parse()?)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // SIGTERM is HAProxy's hard stop: it closes everything and exits.
        let _ = killpg(self.pgid(), Signal::SIGTERM);
        if !wait_exit(&mut self.child, Duration::from_secs(5)) {
            let _ = killpg(self.pgid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}
