//! `HTTPS_BENCH_MODE=idle`: memory per idle intercepted TLS connection
//! (issue 13: at most 64 KiB at 10,000 connections, reported against nginx's).
//!
//! A client process (this benchmark's own executable, re-run with
//! [`CLIENT_ENV`] set) opens N TLS connections, sends one keep-alive
//! `GET /` on each, reads the answer and leaves them all open. It runs in the
//! gateway's cgroup for the gateway path (the same URL as direct, redirected
//! by the eBPF programs) and dials the nginx proxy (`worker_processes auto`)
//! for the nginx path. Once every connection has answered, the harness waits
//! [`SETTLE`] (past the gateway's `upstream_idle_timeout`, so idle clients no
//! longer hold upstream connections, the steady state of an idle job), then
//! reads the proxy's resident memory (the gateway process, or every process
//! of that nginx instance) and reports (RSS now - RSS before) / N. Each
//! round starts fresh processes (an allocator keeps the memory a burst took,
//! so a second burst into the same process measures almost nothing) and runs
//! the two paths in turn; the table gives each round and the median.
//!
//! N is `HTTPS_BENCH_IDLE_CONNS` (default 8000): the descriptor limit a
//! process may raise itself to on this host decides the ceiling, and the
//! gateway needs two descriptors per connection while its upstream one is
//! open.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddr,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use gateway_tests::median;

use super::{check_interrupted, Mode, Route, Scene, Tools, SMALL_BODY};

/// Set in the client process: `<ip:port> <connections>`.
pub const CLIENT_ENV: &str = "HTTPS_BENCH_IDLE_CLIENT";
/// How long connections sit idle before the proxy's memory is read.
const SETTLE: Duration = Duration::from_secs(8);
/// Connections the client opens at once.
const IN_FLIGHT: usize = 64;

/// One path's reading in one round.
struct Reading {
    label: &'static str,
    conns: usize,
    before_kib: u64,
    after_kib: u64,
    /// Descriptors the gateway held once settled (`None` for nginx).
    gateway_fds: Option<usize>,
}

impl Reading {
    fn per_conn_bytes(&self) -> f64 {
        (self.after_kib.saturating_sub(self.before_kib) * 1024) as f64 / self.conns as f64
    }
}

/// The readings of every round.
pub struct IdleReport {
    conns: usize,
    rounds: Vec<Vec<Reading>>,
}

/// Runs the idle-memory rounds, each over a fresh nginx proxy and gateway.
pub fn run(tools: &Tools, rounds: usize) -> Result<IdleReport> {
    let conns = match std::env::var("HTTPS_BENCH_IDLE_CONNS") {
        Ok(v) => v.parse().with_context(|| format!("HTTPS_BENCH_IDLE_CONNS={v}"))?,
        Err(_) => 8000,
    };
    ensure!(conns >= 100, "HTTPS_BENCH_IDLE_CONNS must be at least 100");
    let exe = std::env::current_exe()?;
    let mut all = Vec::new();
    for round in 0..rounds {
        let scene = Scene::start(tools, Mode::Idle)?;
        let scene = &scene;
        let mut readings = Vec::new();
        for route in scene.routes() {
            check_interrupted()?;
            let reading =
                measure(scene, &exe, &route, conns).with_context(|| format!("round {}, {}", round + 1, route.label))?;
            eprintln!(
                "round {}: {:<28} {:>8.1} KiB per connection",
                round + 1,
                reading.label,
                reading.per_conn_bytes() / 1024.0
            );
            readings.push(reading);
        }
        all.push(readings);
    }
    Ok(IdleReport { conns, rounds: all })
}

fn measure(scene: &Scene, exe: &std::path::Path, route: &Route, conns: usize) -> Result<Reading> {
    let addr: SocketAddr = route.base.trim_start_matches("https://").parse()?;
    let before_kib = scene.proxy_rss_kib(route)?;
    let mark = scene.gateway(route).map(|gw| gw.mark()).transpose()?;
    let mut cmd = scene.command(exe, route);
    cmd.env(CLIENT_ENV, format!("{addr} {conns}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("starting the idle client")?;
    let stdout = child.stdout.take().context("client stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != format!("ready {conns}") {
        let status = child.wait()?;
        bail!("the idle client did not open its connections ({status}): {line:?}");
    }
    std::thread::sleep(SETTLE);
    let after_kib = scene.proxy_rss_kib(route)?;
    let gateway_fds = match scene.gateway(route) {
        Some(gw) => Some(std::fs::read_dir(format!("/proc/{}/fd", gw.pid()))?.count()),
        None => None,
    };
    // Closing stdin lets the client close every connection and exit.
    drop(child.stdin.take());
    let status = child.wait()?;
    ensure!(status.success(), "the idle client failed: {status}");
    if let (Some(gw), Some(mark)) = (scene.gateway(route), mark) {
        // Every connection went through the gateway, not around it.
        let redirected = gw.redirected()? - mark.redirected;
        ensure!(redirected >= conns as u64, "only {redirected} of {conns} connections were redirected");
    }
    // Let the proxy close its side before the next path or round.
    std::thread::sleep(Duration::from_secs(2));
    Ok(Reading { label: route.label, conns, before_kib, after_kib, gateway_fds })
}

impl IdleReport {
    pub fn print(&self) {
        println!(
            "\nidle TLS connections: {} opened, one GET / each, then {}s idle; RSS growth per connection",
            self.conns,
            SETTLE.as_secs()
        );
        let labels: Vec<&str> = self.rounds[0].iter().map(|r| r.label).collect();
        println!("{:<30} {:>10} {:>10} {:>12} {:>10}", "path", "RSS before", "RSS idle", "per conn", "gateway fds");
        let mut medians = Vec::new();
        for label in &labels {
            let of: Vec<&Reading> = self.rounds.iter().flatten().filter(|r| r.label == *label).collect();
            for r in &of {
                println!(
                    "{:<30} {:>7} MiB {:>6} MiB {:>8.1} KiB {:>10}",
                    r.label,
                    r.before_kib / 1024,
                    r.after_kib / 1024,
                    r.per_conn_bytes() / 1024.0,
                    r.gateway_fds.map_or("-".into(), |n| n.to_string())
                );
            }
            let m = median(&of.iter().map(|r| r.per_conn_bytes()).collect::<Vec<_>>());
            medians.push((*label, m));
        }
        println!();
        let nginx = medians.iter().find(|(l, _)| l.starts_with("nginx")).map(|(_, m)| *m);
        for (label, m) in &medians {
            let ratio = nginx.map_or(String::new(), |n| format!("  {:.2}x nginx", m / n));
            let target = if label.starts_with("gateway") {
                format!("  target <= 64 KiB: {}", if *m <= 64.0 * 1024.0 { "met" } else { "missed" })
            } else {
                String::new()
            };
            println!("median {label:<30} {:>8.1} KiB{ratio}{target}", m / 1024.0);
        }
    }
}

/// The client process: opens the connections, says `ready N`, and holds
/// them until its stdin closes.
pub fn client(spec: &str) -> Result<()> {
    let (addr, n) = spec.split_once(' ').context("expected `<addr> <connections>`")?;
    let addr: SocketAddr = addr.parse()?;
    let n: usize = n.parse()?;
    raise_nofile()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let gate = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let permit = gate.clone().acquire_owned().await?;
            let connector = connector.clone();
            tasks.spawn(async move {
                let conn = open(&connector, addr).await;
                drop(permit);
                conn
            });
        }
        let mut conns = Vec::with_capacity(n);
        while let Some(joined) = tasks.join_next().await {
            conns.push(joined??);
        }
        println!("ready {}", conns.len());
        tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await??;
        drop(conns);
        Ok(())
    })
}

type Conn = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// One connection, one request answered, left open.
async fn open(connector: &tokio_rustls::TlsConnector, addr: SocketAddr) -> Result<Conn> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let deadline = Instant::now() + Duration::from_secs(60);
    let tcp = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(t) => break t,
            // A full accept queue under the burst: try again shortly.
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e).context("connecting"),
        }
    };
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = connector.connect(name, tcp).await.context("TLS handshake")?;
    tls.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(SMALL_BODY.as_bytes()) {
        let n = tls.read(&mut buf).await?;
        ensure!(n > 0, "connection closed before the answer: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    Ok(tls)
}

/// Raises the soft descriptor limit to the hard one.
fn raise_nofile() -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}

/// Accepts any certificate: what is measured is the proxy's memory, not the
/// client's verification (wrk and curl `-k` skip it too).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
