//! A minimal Pingora TLS reverse proxy as the third peer (issue 13), opt-in:
//! `benches/pingora-proxy` is its own workspace (Pingora's ~200 crates stay
//! out of the project's builds), built with
//! `OPENSSL_NO_VENDOR=1 cargo build --release --manifest-path benches/pingora-proxy/Cargo.toml`
//! (system OpenSSL, as nginx and HAProxy use; cmake for zlib-ng), and run
//! when `HTTPS_BENCH_PINGORA` names the binary.
//!
//! It does what the nginx and HAProxy peers do: terminates TLS with the
//! proxy leaf, re-encrypts to the origin verified against the test CA and
//! the origin's DNS name (sent as SNI), and keeps a pool of upstream
//! connections (Pingora's default, 128). One process; its `threads` setting
//! is the number of cores in the `proxies` mode and 1 under callgrind.

use std::{
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};
use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};

use super::{launched, term_with_parent, wait_exit, wait_listening, Launcher, Pki, ORIGIN_IP, ORIGIN_NAME, PROXY_IP};

/// The environment variable naming the built proxy.
pub const ENV: &str = "HTTPS_BENCH_PINGORA";

/// A running Pingora proxy (in its own process group); stopped on drop.
pub struct Pingora {
    pub child: Child,
    /// Its pid file, upgrade socket, log and callgrind dumps.
    pub dir: PathBuf,
}

impl Pingora {
    /// Starts `bin` listening on [`PROXY_IP`]`:port` in front of the origin
    /// on `origin_port` with `threads` worker threads (under `launcher` if
    /// there is one) and waits until it accepts.
    pub fn start(
        bin: &Path,
        dir: PathBuf,
        threads: usize,
        pki: &Pki,
        port: u16,
        origin_port: u16,
        launcher: Option<&Launcher>,
    ) -> Result<Pingora> {
        std::fs::create_dir_all(&dir)?;
        let log = dir.join("pingora.log");
        let stderr = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = launched(launcher, bin);
        cmd.arg(format!("{PROXY_IP}:{port}"))
            .arg(&pki.proxy.0)
            .arg(&pki.proxy.1)
            .arg(format!("{ORIGIN_IP}:{origin_port}"))
            .arg(ORIGIN_NAME)
            .arg(&pki.ca)
            .arg(threads.to_string())
            .arg(&dir);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).process_group(0);
        term_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let mut proxy = Pingora { child, dir };
        let listen = SocketAddr::new(PROXY_IP.parse()?, port);
        wait_listening(listen, "pingora", launcher.map_or(30, |_| 300), || {
            Ok(proxy.child.try_wait()?.map(|s| format!("{s}\n{}", std::fs::read_to_string(&log).unwrap_or_default())))
        })?;
        Ok(proxy)
    }

    /// Its process group (its own pid).
    pub fn pgid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }
}

impl Drop for Pingora {
    fn drop(&mut self) {
        // SIGINT is Pingora's fast shutdown.
        let _ = killpg(self.pgid(), Signal::SIGINT);
        if !wait_exit(&mut self.child, Duration::from_secs(5)) {
            let _ = killpg(self.pgid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}
