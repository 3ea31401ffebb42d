//! Capture-by-port benchmark (issue 10), every figure a ratio against a
//! baseline measured in the same run, rounds interleaved, medians reported
//! with the spread between rounds:
//!
//! * **passthrough bulk**: a TLS connection whose server name is not in
//!   `tls.intercept`, captured by port, relayed untouched by the gateway,
//!   against the same transfer direct;
//! * **connect latency**: `connect()` with no program, in port-capture mode,
//!   in address mode, with the program attached but the destination not
//!   captured, and through an iptables `REDIRECT` rule to the same proxy
//!   listener; plus time to the server's first byte (connect, ClientHello,
//!   one byte back) direct and through the passthrough;
//! * with `CAPTURE_BENCH_LINK_MBIT`, the same over a veth shaped to a NIC's
//!   rate, where the link rather than the CPU limits a transfer;
//! * **container job vs host job**: the same connect, first-byte and bulk
//!   figures from a container on a private dockerd's bridge (placed under the
//!   gateway's cgroup with `--cgroup-parent`) and from a host process.
//!
//! Needs root (eBPF, cgroups, network namespaces, iptables, dockerd). Run
//! with `cargo xtask bench --bench capture`; see docs/benchmarks.md. What it
//! creates: a gateway per relay mode (tests/support's `TestGateway`: its own
//! cgroup under `gateway-tests/`, its own pins, removed on drop), a network
//! namespace with a veth pair on a /29 of 10.253.0.0/16 (removed on drop), an
//! iptables nat rule matching only that namespace's address and one port
//! (removed on drop), and a private dockerd with its own bridge (removed at
//! exit). Clients are re-executions of this binary (`--client ...`), so they
//! can be placed in a cgroup, or run inside the container.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use gateway_tests::{
    docker::{docker, Container, RunSpec},
    GatewayOptions, TestGateway,
};

/// The name every benchmark ClientHello carries: not in `tls.intercept`,
/// so port capture passes it through.
const SNI: &str = "passthrough.bench.internal";

/// Run length knobs (environment variables, see docs/benchmarks.md).
struct Knobs {
    rounds: usize,
    connects: usize,
    first_bytes: usize,
    bulk_bytes: u64,
    /// `GATEWAY_RELAY` values to compare, one gateway each; empty: the
    /// gateway's own relay only. Only a build with a relay switch reads
    /// that variable (the relay-mode prototype, branch `h-relay`, which
    /// produced the comparison in docs/benchmarks.md); the shipped gateway
    /// has one relay and ignores it.
    relay_modes: Vec<String>,
    containers: bool,
    /// `CAPTURE_BENCH_LINK_MBIT`: shape the veth to this rate (a token
    /// bucket on both ends), as a runner's NIC limits what reaches a real
    /// service; 0: unshaped (memory speed, every party CPU-bound).
    link_mbit: u64,
}

impl Knobs {
    fn from_env() -> Result<Knobs> {
        let num = |name: &str, default: u64| -> Result<u64> {
            match std::env::var(name) {
                Ok(v) => v.parse().with_context(|| format!("{name}={v} is not a number")),
                Err(_) => Ok(default),
            }
        };
        let relay_modes = std::env::var("CAPTURE_BENCH_RELAY_MODES")
            .map(|v| v.split(',').filter(|m| !m.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default();
        Ok(Knobs {
            rounds: num("CAPTURE_BENCH_ROUNDS", 5)? as usize,
            connects: num("CAPTURE_BENCH_CONNECTS", 1000)? as usize,
            first_bytes: num("CAPTURE_BENCH_FIRST_BYTES", 200)? as usize,
            bulk_bytes: num("CAPTURE_BENCH_BULK_MIB", 1024)? << 20,
            relay_modes,
            containers: std::env::var("CAPTURE_BENCH_CONTAINERS").as_deref() != Ok("0"),
            link_mbit: num("CAPTURE_BENCH_LINK_MBIT", 0)?,
        })
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--client") {
        return client(&args[2..]);
    }
    // `cargo bench` passes `--bench`; nothing else is expected.
    orchestrate()
}

// ---------------------------------------------------------------------------
// Clients (run as child processes, in or out of the intercepted cgroup)
// ---------------------------------------------------------------------------

/// `connect N ADDR`: nanoseconds per `connect()`, one a line.
/// `first N ADDR`: nanoseconds from `connect()` to the server's first byte
/// (connect, send a ClientHello, read one byte), one a line.
/// `bulk ADDR`: sends a ClientHello, reads to the end; prints bytes and seconds.
fn client(args: &[String]) -> Result<()> {
    let hello = client_hello(SNI);
    match args {
        [mode, n, addr] if mode == "connect" => {
            let (n, addr): (usize, SocketAddr) = (n.parse()?, addr.parse()?);
            let mut out = String::new();
            for _ in 0..n {
                let t = Instant::now();
                let s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
                let ns = t.elapsed().as_nanos();
                // RST instead of FIN: no TIME_WAIT pile-up across thousands of connects.
                socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
                drop(s);
                out.push_str(&format!("{ns}\n"));
            }
            std::io::stdout().write_all(out.as_bytes())?;
            Ok(())
        }
        [mode, n, addr] if mode == "first" => {
            let (n, addr): (usize, SocketAddr) = (n.parse()?, addr.parse()?);
            let mut out = String::new();
            for _ in 0..n {
                let t = Instant::now();
                let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
                s.set_nodelay(true)?;
                s.write_all(&hello)?;
                let mut one = [0u8; 1];
                s.read_exact(&mut one).with_context(|| format!("first byte from {addr}"))?;
                let ns = t.elapsed().as_nanos();
                // The server closes first; wait for it so no connection
                // lingers in the gateway when the next one starts.
                let mut rest = Vec::new();
                s.read_to_end(&mut rest)?;
                out.push_str(&format!("{ns}\n"));
            }
            std::io::stdout().write_all(out.as_bytes())?;
            Ok(())
        }
        [mode, addr] if mode == "bulk" => {
            let addr: SocketAddr = addr.parse()?;
            let t = Instant::now();
            let mut s = TcpStream::connect(addr)?;
            s.write_all(&hello)?;
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            println!("{total} {}", t.elapsed().as_secs_f64());
            Ok(())
        }
        _ => bail!("usage: --client connect N ADDR | --client first N ADDR | --client bulk ADDR"),
    }
}

/// A minimal TLS 1.2-style ClientHello record naming `sni`: enough for the
/// gateway to read the server name and decide; the benchmark's servers read
/// it and answer with raw bytes (passthrough never looks further).
fn client_hello(sni: &str) -> Vec<u8> {
    let name = sni.as_bytes();
    let mut sni_ext = Vec::new();
    sni_ext.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes()); // server_name_list
    sni_ext.push(0); // host_name
    sni_ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni_ext.extend_from_slice(name);
    let mut exts = Vec::new();
    exts.extend_from_slice(&[0, 0]); // server_name
    exts.extend_from_slice(&(sni_ext.len() as u16).to_be_bytes());
    exts.extend_from_slice(&sni_ext);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// Reads one TLS record (the ClientHello) from `s`.
fn read_hello(s: &mut TcpStream) -> std::io::Result<()> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes([head[3], head[4]]))];
    s.read_exact(&mut body)
}

/// Accepts and closes.
fn serve_accept_close(l: TcpListener) {
    std::thread::spawn(move || {
        for conn in l.incoming() {
            drop(conn);
        }
    });
}

/// Reads the ClientHello, answers one byte, closes.
fn serve_first_byte(l: TcpListener) {
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.set_nodelay(true);
            if read_hello(&mut s).is_ok() {
                let _ = s.write_all(b"x");
            }
        }
    });
}

/// Reads the ClientHello, sends `bytes` bytes, closes.
fn serve_bulk(l: TcpListener, bytes: u64) {
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                if read_hello(&mut s).is_err() {
                    return;
                }
                let chunk = vec![0x5au8; 256 * 1024];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if s.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });
}

/// The three servers on `ip`: accept-and-close on each of `accept_ports`,
/// first byte on `first`, bulk on `bulk`. Bound in the calling thread's
/// network namespace.
struct Ports {
    accept: Vec<u16>,
    first: u16,
    bulk: u16,
}

fn serve_on(ip: &str, ports: &Ports, bulk_bytes: u64) -> Result<()> {
    for &p in &ports.accept {
        serve_accept_close(TcpListener::bind((ip, p)).with_context(|| format!("bind {ip}:{p}"))?);
    }
    serve_first_byte(TcpListener::bind((ip, ports.first))?);
    serve_bulk(TcpListener::bind((ip, ports.bulk))?, bulk_bytes);
    Ok(())
}

// ---------------------------------------------------------------------------
// A network namespace standing for a remote server
// ---------------------------------------------------------------------------

/// A network namespace on a veth pair; the servers listen in it, so a job
/// reaches them at a non-loopback address, as it reaches a real service.
struct Netns {
    name: String,
    host_if: String,
    ns_if: String,
    ns_ip: String,
}

impl Netns {
    fn create() -> Result<Netns> {
        let pid = std::process::id();
        let tag = pid % 100_000;
        // A /29 of 10.253.0.0/16 chosen by pid (the tests use 10.100+, the
        // intercept benchmark 10.254).
        let block = (pid % 8192) * 8;
        let octets = |k: u32| format!("10.253.{}.{}", (block + k) >> 8, (block + k) & 255);
        let ns_if = format!("gwcn{tag}");
        let ns = Netns {
            name: format!("gwcap-{tag}"),
            host_if: format!("gwch{tag}"),
            ns_if: ns_if.clone(),
            ns_ip: octets(2),
        };
        let ip = |args: &[&str]| -> Result<()> {
            let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
            ensure!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        };
        ip(&["netns", "add", &ns.name])?;
        ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &ns_if])?;
        ip(&["link", "set", &ns_if, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{}/29", octets(1)), "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ip(&["-n", &ns.name, "addr", "add", &format!("{}/29", ns.ns_ip), "dev", &ns_if])?;
        ip(&["-n", &ns.name, "link", "set", &ns_if, "up"])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Limits both directions of the veth to `mbit` with a token bucket
    /// (`tc qdisc ... tbf`), with a burst of 4 ms at that rate.
    fn shape(&self, mbit: u64) -> Result<()> {
        let burst = format!("{}b", (mbit * 1_000_000 / 8 / 250).max(64 * 1024));
        let rate = format!("{mbit}mbit");
        for (netns, dev) in [(None, &self.host_if), (Some(&self.name), &self.ns_if)] {
            let mut cmd = Command::new("tc");
            if let Some(n) = netns {
                cmd.args(["-n", n]);
            }
            cmd.args(["qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst, "latency", "20ms"]);
            let out = cmd.output().context("running tc (iproute2)")?;
            ensure!(out.status.success(), "tc on {dev}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Runs `f` in a thread that entered the namespace: sockets it binds
    /// belong to the namespace, whichever thread serves them later.
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || -> Result<T> {
            let file = std::fs::File::open(&path)?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).stderr(Stdio::null()).status();
    }
}

/// An iptables nat rule, deleted on drop.
struct IptRule(Vec<String>);

impl IptRule {
    /// `REDIRECT` of TCP to exactly `dst` (the namespace's address and a port
    /// nothing else uses) to `to_port` on loopback: matches only the
    /// benchmark's own connects.
    fn redirect(dst: SocketAddr, to_port: u16) -> Result<IptRule> {
        let spec: Vec<String> =
            ["OUTPUT", "-p", "tcp", "-d", &dst.ip().to_string(), "--dport", &dst.port().to_string()]
                .iter()
                .map(|s| (*s).to_owned())
                .chain(["-j", "REDIRECT", "--to-ports", &to_port.to_string()].iter().map(|s| (*s).to_owned()))
                .collect();
        let out = Command::new("iptables")
            .args(["-w", "-t", "nat", "-A"])
            .args(&spec)
            .output()
            .context("running iptables (package iptables)")?;
        ensure!(out.status.success(), "iptables -t nat -A {spec:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(IptRule(spec))
    }
}

impl Drop for IptRule {
    fn drop(&mut self) {
        let _ = Command::new("iptables").args(["-w", "-t", "nat", "-D"]).args(&self.0).status();
    }
}

// ---------------------------------------------------------------------------
// Orchestration
// ---------------------------------------------------------------------------

/// Where a client runs.
#[derive(Clone, Copy)]
enum Job<'a> {
    /// A host process outside every intercepted cgroup.
    Host,
    /// A host process in this gateway's intercepted cgroup.
    HostIn(&'a TestGateway),
    /// Inside this container (`docker exec`), the benchmark binary mounted
    /// at `/bench`.
    In(&'a Container),
}

fn run_client(job: Job<'_>, args: &[String]) -> Result<String> {
    let me = std::env::current_exe()?;
    let mut cmd = match job {
        Job::Host => Command::new(&me),
        Job::HostIn(gw) => gw.command_in_cgroup(&me),
        Job::In(c) => {
            let name = me.file_name().context("exe name")?.to_string_lossy().into_owned();
            let mut cmd = docker().cmd();
            cmd.args(["exec", &c.id, &format!("/bench/{name}")]);
            cmd
        }
    };
    let out = cmd.arg("--client").args(args).stderr(Stdio::inherit()).output()?;
    ensure!(out.status.success(), "client {args:?} failed ({})", out.status);
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn parse_ns(out: &str) -> Vec<f64> {
    out.lines().filter_map(|l| l.trim().parse::<f64>().ok()).collect()
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[idx.min(v.len() - 1)]
}

/// One measured path: its samples per round.
struct Series {
    name: String,
    rounds: Vec<Vec<f64>>,
    /// Bulk only: the gateway's CPU seconds per GB moved, per round.
    cpu_per_gb: Vec<f64>,
}

impl Series {
    fn new(name: impl Into<String>) -> Series {
        Series { name: name.into(), rounds: Vec::new(), cpu_per_gb: Vec::new() }
    }
    fn all(&self) -> Vec<f64> {
        self.rounds.iter().flatten().copied().collect()
    }
    /// Per round: this path's median over `base`'s median in the same round.
    fn round_ratios(&self, base: &Series) -> Vec<f64> {
        self.rounds.iter().zip(&base.rounds).map(|(a, b)| median(a) / median(b)).collect()
    }
}

/// Prints a latency table: p50, p90, p99 over every sample, the ratio of
/// medians to `rows[0]`, and the spread of that ratio over rounds.
fn latency_table(title: &str, rows: &[&Series]) {
    println!("\n{title}");
    println!("{:<52} {:>8} {:>8} {:>8} {:>9} {:>13}", "path", "p50 us", "p90 us", "p99 us", "p50 ratio", "rounds");
    let base = rows[0];
    let base_p50 = median(&base.all());
    for s in rows {
        let all = s.all();
        let ratios = s.round_ratios(base);
        let (lo, hi) = (
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        );
        println!(
            "{:<52} {:>8.1} {:>8.1} {:>8.1} {:>9.3} {:>6.2}–{:<6.2}",
            s.name,
            median(&all) / 1e3,
            percentile(&all, 90.0) / 1e3,
            percentile(&all, 99.0) / 1e3,
            median(&all) / base_p50,
            lo,
            hi
        );
    }
}

/// Prints a throughput table (GB/s per round, one sample each): median,
/// ratio of medians to `rows[0]`, spread of the per-round ratio.
fn bulk_table(title: &str, rows: &[&Series]) {
    println!("\n{title}");
    println!("{:<52} {:>9} {:>9} {:>9} {:>13} {:>14}", "path", "GB/s p50", "min", "ratio", "rounds", "gw CPU s/GB");
    let base = rows[0];
    let base_med = median(&base.all());
    for s in rows {
        let all = s.all();
        let ratios = s.round_ratios(base);
        let (lo, hi) = (
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        );
        let cpu = if s.cpu_per_gb.is_empty() { "-".to_owned() } else { format!("{:.3}", median(&s.cpu_per_gb)) };
        println!(
            "{:<52} {:>9.3} {:>9.3} {:>9.3} {:>6.2}–{:<6.2} {:>14}",
            s.name,
            median(&all),
            all.iter().copied().fold(f64::INFINITY, f64::min),
            median(&all) / base_med,
            lo,
            hi,
            cpu
        );
    }
}

/// Waits until `gw` serves a network namespace other than the host's (the
/// container's): `gateway status` lists it.
fn wait_served(gw: &TestGateway) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = gw.status();
        if status["namespaces"].as_array().is_some_and(|l| l.iter().any(|n| n["host"] == false)) {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "the gateway did not serve the container's namespace: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One bulk transfer by `job` to `to`: GB/s. Fails unless every byte came.
fn bulk_once(job: Job<'_>, to: SocketAddr, bytes: u64) -> Result<f64> {
    let out = run_client(job, &["bulk".into(), to.to_string()])?;
    let mut it = out.split_whitespace();
    let got: u64 = it.next().context("bytes")?.parse()?;
    let secs: f64 = it.next().context("secs")?.parse()?;
    ensure!(got == bytes, "bulk transfer incomplete: {got} of {bytes} bytes");
    Ok(got as f64 / secs / 1e9)
}

/// Proof that `gw` relayed `n` more passthrough transfers of `bytes`:
/// connection events with protocol `tls-passthrough`, the benchmark's name,
/// and every byte down.
fn passthrough_events(gw: &TestGateway, bytes: u64) -> usize {
    gw.connection_events()
        .iter()
        .filter(|e| e["protocol"] == "tls-passthrough" && e["sni"] == SNI && e["bytes_down"].as_u64() == Some(bytes))
        .count()
}

/// User plus system CPU time the gateway process used so far, in seconds
/// (all threads; clock-tick resolution).
fn cpu_secs(gw: &TestGateway) -> f64 {
    let Some(pid) = gw.child.as_ref().map(std::process::Child::id) else { return f64::NAN };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split(' ').skip(11).take(2).filter_map(|v| v.parse().ok()).collect();
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    f.iter().sum::<u64>() as f64 / tick
}

fn redirected(gw: &TestGateway) -> u64 {
    gw.status()["stats"]["redirected"].as_u64().unwrap_or(0)
}

fn orchestrate() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the capture benchmark attaches eBPF programs, makes a network namespace, an iptables rule and runs \
         dockerd: run it as root (`sudo cargo xtask bench --bench capture`)"
    );
    let knobs = Knobs::from_env()?;
    let uptime = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_owned();
    let load_before = uptime();

    // Ports, all distinct. Captured: connect, first, bulk (namespace and
    // bridge). In the address set: `by_addr`. Neither: `plain`. Redirected
    // by iptables: `ipt`.
    let port = gateway_tests::unique_port;
    let ns_ports = Ports { accept: vec![port(), port(), port()], first: port(), bulk: port() };
    let (captured, by_addr, plain) = (ns_ports.accept[0], ns_ports.accept[1], ns_ports.accept[2]);
    let ipt_port = port();
    let br_ports = Ports { accept: vec![port()], first: port(), bulk: port() };

    let netns = Netns::create()?;
    if knobs.link_mbit > 0 {
        netns.shape(knobs.link_mbit)?;
    }
    let ns_ip = netns.ns_ip.clone();
    let bulk_bytes = knobs.bulk_bytes;
    {
        let (ip, p) = (ns_ip.clone(), Ports { accept: ns_ports.accept.clone(), ..ns_ports });
        netns.within(move || serve_on(&ip, &p, bulk_bytes))?;
    }
    let ns_addr: std::net::IpAddr = ns_ip.parse().context("namespace address")?;
    let at = |p: u16| SocketAddr::new(ns_addr, p);

    let docker = knobs.containers.then(docker);
    let bridge_ip = docker.map(|d| d.host_ip());
    if let Some(ip) = bridge_ip {
        serve_on(&ip.to_string(), &br_ports, bulk_bytes)?;
    }

    // One gateway per relay mode; the first also serves the latency and
    // container measurements.
    let modes: Vec<Option<String>> =
        if knobs.relay_modes.is_empty() { vec![None] } else { knobs.relay_modes.iter().cloned().map(Some).collect() };
    let capture_ports = [captured, ns_ports.first, ns_ports.bulk, br_ports.accept[0], br_ports.first, br_ports.bulk];
    let mut gateways: Vec<(String, TestGateway)> = Vec::new();
    for mode in &modes {
        let label = mode.clone().unwrap_or_else(|| "built-in".into());
        let dest = format!("{{cidr: {ns_ip}/32, ports: [{by_addr}]}}");
        let mut opts = GatewayOptions::new(&format!("capbench-{label}"), &[dest.as_str()]);
        opts.intercept_yaml =
            format!("  capture_ports: [{}]\n", capture_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", "));
        // Every benchmark client speaks first, at once.
        opts.proxy_yaml = "  client_first_timeout: 10s\n".into();
        if let Some(d) = docker {
            opts.extra_yaml = format!("identity:\n  container_runtimes: [{}]\n", d.socket().display());
        }
        match mode {
            Some(m) => std::env::set_var("GATEWAY_RELAY", m),
            None => std::env::remove_var("GATEWAY_RELAY"),
        }
        gateways.push((label, TestGateway::start(opts)));
    }
    std::env::remove_var("GATEWAY_RELAY");
    let gw = &gateways[0].1;
    let _ipt = IptRule::redirect(at(ipt_port), gw.proxy_port)?;

    // Containers: one under the gateway's cgroup, one outside every
    // intercepted cgroup, both on the bridge, the benchmark binary mounted.
    let exe_dir = std::env::current_exe()?.parent().map(Path::to_path_buf).context("exe dir")?;
    let containers = match docker {
        Some(d) => {
            let spec = |name: &str, parent: String| RunSpec {
                name: format!("{name}-{}", std::process::id()),
                cgroup_parent: Some(parent),
                host_network: false,
                mounts: vec![(exe_dir.clone(), "/bench".into())],
            };
            let inside = d.run(&spec("capbench-job", gw.cgroup_path()));
            let outside = d.run(&spec("capbench-direct", format!("/gateway-bench-outside-{}", std::process::id())));
            wait_served(gw)?;
            Some((inside, outside))
        }
        None => None,
    };

    // Every path answers before anything is measured.
    for (job, to) in [(Job::Host, at(captured)), (Job::HostIn(gw), at(captured)), (Job::HostIn(gw), at(by_addr))] {
        run_client(job, &["connect".into(), "1".into(), to.to_string()])?;
    }
    for (job, to) in [(Job::Host, at(ns_ports.first)), (Job::HostIn(gw), at(ns_ports.first))] {
        run_client(job, &["first".into(), "1".into(), to.to_string()])?;
    }

    let n = knobs.connects.to_string();
    let nf = knobs.first_bytes.to_string();
    let connect = |to: SocketAddr| -> Vec<String> { vec!["connect".into(), n.clone(), to.to_string()] };
    let first = |to: SocketAddr| -> Vec<String> { vec!["first".into(), nf.clone(), to.to_string()] };

    // Latency paths: (series, job, args).
    let mut lat: Vec<(Series, Job<'_>, Vec<String>)> = vec![
        (Series::new("direct (no program)"), Job::Host, connect(at(captured))),
        (Series::new("gateway, port-capture mode"), Job::HostIn(gw), connect(at(captured))),
        (Series::new("gateway, address mode (intercept set)"), Job::HostIn(gw), connect(at(by_addr))),
        (Series::new("program attached, not captured (no redirect)"), Job::HostIn(gw), connect(at(plain))),
        (Series::new("iptables REDIRECT to the gateway's listener"), Job::Host, connect(at(ipt_port))),
        (Series::new("first byte: direct"), Job::Host, first(at(ns_ports.first))),
        (Series::new("first byte: gateway passthrough (port capture)"), Job::HostIn(gw), first(at(ns_ports.first))),
    ];
    let lat_connect = 5;
    if let (Some((inside, outside)), Some(bip)) = (&containers, bridge_ip) {
        let b = |p: u16| SocketAddr::new(bip.into(), p);
        lat.extend([
            (Series::new("host job, direct"), Job::Host, connect(b(br_ports.accept[0]))),
            (Series::new("host job, gateway (port capture)"), Job::HostIn(gw), connect(b(br_ports.accept[0]))),
            (Series::new("container job, direct"), Job::In(outside), connect(b(br_ports.accept[0]))),
            (Series::new("container job, gateway (port capture)"), Job::In(inside), connect(b(br_ports.accept[0]))),
            (Series::new("host job, direct"), Job::Host, first(b(br_ports.first))),
            (Series::new("host job, gateway passthrough"), Job::HostIn(gw), first(b(br_ports.first))),
            (Series::new("container job, direct"), Job::In(outside), first(b(br_ports.first))),
            (Series::new("container job, gateway passthrough"), Job::In(inside), first(b(br_ports.first))),
        ]);
    }
    // Bulk paths: direct, then each relay mode's gateway; container pairs.
    let mut bulk: Vec<(Series, Job<'_>, SocketAddr, Option<&TestGateway>)> =
        vec![(Series::new("direct (no program)"), Job::Host, at(ns_ports.bulk), None)];
    for (label, g) in &gateways {
        bulk.push((
            Series::new(format!("gateway passthrough, relay: {label}")),
            Job::HostIn(g),
            at(ns_ports.bulk),
            Some(g),
        ));
    }
    let bulk_main = bulk.len();
    if let (Some((inside, outside)), Some(bip)) = (&containers, bridge_ip) {
        let to = SocketAddr::new(bip.into(), br_ports.bulk);
        bulk.extend([
            (Series::new("host job, direct"), Job::Host, to, None),
            (Series::new("host job, gateway passthrough"), Job::HostIn(gw), to, Some(gw)),
            (Series::new("container job, direct"), Job::In(outside), to, None),
            (Series::new("container job, gateway passthrough"), Job::In(inside), to, Some(gw)),
        ]);
    }

    let started = Instant::now();
    for round in 0..knobs.rounds {
        // Rotate the order each round: no path always follows the same one.
        let k = lat.len();
        for i in 0..k {
            let (series, job, args) = &mut lat[(i + round) % k];
            let before = match job {
                Job::HostIn(g) => Some(redirected(g)),
                _ => None,
            };
            let samples = parse_ns(&run_client(*job, args)?);
            ensure!(samples.len() == args[1].parse::<usize>()?, "{}: missing samples", series.name);
            // One entry per round, in round order, for the per-round ratios.
            series.rounds.push(samples);
            if let (Some(b), Job::HostIn(g)) = (before, *job) {
                let rose = redirected(g) - b;
                let not_captured = series.name.starts_with("program attached");
                ensure!(
                    not_captured || rose >= args[1].parse::<u64>()?,
                    "{}: the gateway redirected only {rose} connects",
                    series.name
                );
                ensure!(!not_captured || rose == 0, "{}: {rose} connects were redirected", series.name);
            }
        }
        let k = bulk.len();
        for i in 0..k {
            let (series, job, to, via) = &mut bulk[(i + round) % k];
            let seen = via.map(|g| passthrough_events(g, bulk_bytes));
            let cpu_before = via.map(cpu_secs);
            let gbps = bulk_once(*job, *to, bulk_bytes).with_context(|| series.name.clone())?;
            if let (Some(g), Some(seen)) = (*via, seen) {
                // The event is logged when the connection closes in the gateway.
                let deadline = Instant::now() + Duration::from_secs(30);
                while passthrough_events(g, bulk_bytes) <= seen {
                    ensure!(
                        Instant::now() < deadline,
                        "{}: no tls-passthrough connection event with {bulk_bytes} bytes down\n{}",
                        series.name,
                        g.log_errors()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if let (Some(g), Some(c)) = (*via, cpu_before) {
                series.cpu_per_gb.push((cpu_secs(g) - c) / (bulk_bytes as f64 / 1e9));
            }
            series.rounds.push(vec![gbps]);
        }
        eprintln!("round {} of {} done after {:.0} s", round + 1, knobs.rounds, started.elapsed().as_secs_f64());
    }

    println!("Capture benchmark (issue 10): ratios against a baseline in the same run");
    println!(
        "{} rounds, order rotated each round; latency: {} connects / {} first-byte exchanges per path per round; bulk: {} MiB per transfer",
        knobs.rounds,
        knobs.connects,
        knobs.first_bytes,
        bulk_bytes >> 20
    );
    println!("load average before: {load_before}; after: {}", uptime());
    match knobs.link_mbit {
        0 => println!("link: the veth unshaped (memory speed: every party CPU-bound)"),
        mbit => {
            println!("link: the veth shaped to {mbit} Mbit/s each way (tbf), as a runner's NIC limits a real service")
        }
    }
    println!("'p50 ratio': median over all samples / the first row's; 'rounds': the same ratio per round, min–max");
    let rows = |r: std::ops::Range<usize>| -> Vec<&Series> { lat[r].iter().map(|(s, _, _)| s).collect() };
    latency_table("connect() latency, server in a network namespace (veth); base: direct", &rows(0..lat_connect));
    latency_table("time to first byte (connect, ClientHello, 1 byte back); base: direct", &rows(lat_connect..7));
    if lat.len() > 7 {
        latency_table("connect(), server on the docker bridge address; base: host job, direct", &rows(7..11));
        latency_table("time to first byte, server on the docker bridge address; base: host job, direct", &rows(11..15));
    }
    let brows = |r: std::ops::Range<usize>| -> Vec<&Series> { bulk[r].iter().map(|(s, _, _, _)| s).collect() };
    bulk_table(
        &format!("passthrough bulk ({} MiB, one sample per round); base: direct", bulk_bytes >> 20),
        &brows(0..bulk_main),
    );
    if bulk.len() > bulk_main {
        bulk_table("bulk, server on the docker bridge address; base: host job, direct", &brows(bulk_main..bulk.len()));
    }
    let base = median(&bulk[0].0.all());
    let first_gw = median(&bulk[1].0.all());
    let d_conn = median(&lat[0].0.all());
    let p_conn = median(&lat[1].0.all());
    let d_first = median(&lat[lat_connect].0.all());
    let p_first = median(&lat[lat_connect + 1].0.all());
    let verdict = |ok: bool| if ok { "MET" } else { "MISSED" };
    println!("\ntargets (issue 10)");
    println!("  passthrough bulk >= 0.95x direct: {:.3} {}", first_gw / base, verdict(first_gw / base >= 0.95));
    println!(
        "  connect() in port-capture mode <= 1.1x direct: {:.3} {}",
        p_conn / d_conn,
        verdict(p_conn / d_conn <= 1.1)
    );
    println!(
        "  (time to first byte through the passthrough: {:.3}x direct, +{:.0} us at p50)",
        p_first / d_first,
        (p_first - d_first) / 1e3
    );
    // Containers before their gateway, the gateway before its cgroup.
    drop(containers);
    drop(gateways);
    Ok(())
}
