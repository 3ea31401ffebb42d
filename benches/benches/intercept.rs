//! Interception benchmarks, all in one run on the same machine:
//!
//! * connect() latency: direct (no program), redirected by the gateway's
//!   eBPF programs in address mode (intercept set) and in port-capture mode
//!   (an address outside the set, on a captured port), and redirected by an
//!   iptables `REDIRECT` rule to the same listener, as ratios against direct;
//!   and a job in its own network namespace (served by a listener the
//!   gateway opened there) against a host job.
//! * bulk throughput through the gateway's passthrough proxy against direct.
//!
//! Needs root (eBPF, cgroups, iptables). Run with `cargo xtask bench`, or
//! `cargo bench -p gateway-benches --bench intercept` with the gateway built.
//! Clients run as child processes (re-executions of this binary) so they can
//! be placed in the intercepted cgroup.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

const CONNECTS: usize = 3000;
const BULK_BYTES: u64 = 2 << 30;
const ROUNDS: usize = 3;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--client") {
        return client(&args[2..]);
    }
    orchestrate()
}

/// Client mode: `connect N ADDR` prints per-connect nanoseconds; `bulk ADDR`
/// prints bytes received and seconds. The bulk server speaks first, so the
/// gateway is configured with a 5 ms `client_first_timeout`: the figure is the
/// relay's throughput, not the protocol sniffing delay.
fn client(args: &[String]) -> Result<()> {
    match args {
        [mode, n, addr] if mode == "connect" => {
            let n: usize = n.parse()?;
            let addr: SocketAddr = addr.parse()?;
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
        [mode, addr] if mode == "bulk" => {
            let addr: SocketAddr = addr.parse()?;
            let t = Instant::now();
            let mut s = TcpStream::connect(addr)?;
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
        _ => bail!("usage: --client connect N ADDR | --client bulk ADDR"),
    }
}

struct Setup {
    gateway: std::process::Child,
    config: PathBuf,
    cgroup: PathBuf,
    iptables_rule: Option<Vec<String>>,
    netns: Netns,
    holder: std::process::Child,
    _dir: tempfile::TempDir,
}

/// A network namespace on a veth pair: the port-capture server lives in it,
/// and the namespace job runs in it.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
}

impl Netns {
    fn create() -> Result<Netns> {
        let tag = std::process::id() % 100_000;
        let ns = Netns {
            name: format!("gwbench-{tag}"),
            host_if: format!("gwbh{tag}"),
            host_ip: "10.254.0.1".into(),
            ns_ip: "10.254.0.2".into(),
        };
        let ns_if = format!("gwbn{tag}");
        let ip = |args: &[&str]| -> Result<()> {
            let st = Command::new("ip").args(args).status()?;
            if !st.success() {
                bail!("ip {args:?} failed");
            }
            Ok(())
        };
        ip(&["netns", "add", &ns.name])?;
        ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &ns_if])?;
        ip(&["link", "set", &ns_if, "netns", &ns.name])?;
        ip(&["addr", "add", &format!("{}/30", ns.host_ip), "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ip(&["-n", &ns.name, "addr", "add", &format!("{}/30", ns.ns_ip), "dev", &ns_if])?;
        ip(&["-n", &ns.name, "link", "set", &ns_if, "up"])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// An accept-and-close server on `addr` inside the namespace.
    fn accept_server(&self, addr: SocketAddr) -> Result<()> {
        let path = format!("/var/run/netns/{}", self.name);
        let listener = std::thread::spawn(move || -> Result<TcpListener> {
            let file = std::fs::File::open(&path)?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(TcpListener::bind(addr)?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))??;
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                drop(conn);
            }
        });
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).stderr(Stdio::null()).status();
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let _ = self.gateway.kill();
        let _ = self.gateway.wait();
        let _ = Command::new(gateway_bin()).arg("--config").arg(&self.config).arg("detach").output();
        if let Some(rule) = &self.iptables_rule {
            let mut del = rule.clone();
            if let Some(a) = del.iter_mut().find(|a| *a == "-A") {
                *a = "-D".into();
            }
            let _ = Command::new("iptables").args(&del).status();
        }
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

fn gateway_bin() -> PathBuf {
    std::env::var_os("GATEWAY_BIN").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap_or_default();
        exe.parent().and_then(|p| p.parent()).map(|d| d.join("gateway")).unwrap_or_default()
    })
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn orchestrate() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the interception benchmark attaches eBPF programs and iptables rules: run it as root");
    }
    let bin = gateway_bin();
    if !bin.is_file() {
        bail!("gateway binary not found at {} (run `cargo xtask bench`)", bin.display());
    }
    let port = free_port()?;
    let proxy_port = free_port()?;
    let bulk_port = free_port()?;
    let capture_port = free_port()?;
    let netns = Netns::create()?;

    // Accept-and-close servers for connects; a bulk sender for throughput.
    let target: SocketAddr = format!("127.0.0.5:{port}").parse()?;
    let by_port: SocketAddr = format!("{}:{capture_port}", netns.ns_ip).parse()?;
    let host_side: SocketAddr = format!("{}:{port}", netns.host_ip).parse()?;
    netns.accept_server(by_port)?;
    for addr in [target, host_side] {
        let accept = TcpListener::bind(addr)?;
        std::thread::spawn(move || {
            for conn in accept.incoming() {
                drop(conn);
            }
        });
    }
    let bulk_target: SocketAddr = format!("127.0.0.5:{bulk_port}").parse()?;
    let bulk = TcpListener::bind(bulk_target)?;
    std::thread::spawn(move || {
        let chunk = vec![0x5au8; 256 * 1024];
        for conn in bulk.incoming() {
            let Ok(mut conn) = conn else { continue };
            let chunk = chunk.clone();
            std::thread::spawn(move || {
                let mut left = BULK_BYTES;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if conn.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n as u64;
                }
            });
        }
    });

    let dir = tempfile::tempdir()?;
    let mount = gateway::intercept::cgroup::cgroup2_mount()?;
    let cgroup_rel = format!("gateway-bench-{}", std::process::id());
    let cgroup = mount.join(&cgroup_rel);
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            "state_dir: {}\nintercept:\n  cgroups: [{{path: {cgroup_rel}, create: true}}]\n  bpffs_dir: /sys/fs/bpf/gateway-bench-{}\n  on_shutdown: detach\n  capture_ports: [{capture_port}]\n  destinations:\n    - {{cidr: 127.0.0.5/32}}\n    - {{cidr: {}/32}}\nproxy:\n  port: {proxy_port}\n  client_first_timeout: 5ms\napi:\n  listen: null\n  admin_socket: {}\nlog:\n  level: warn\n",
            dir.path().join("state").display(),
            std::process::id(),
            netns.host_ip,
            dir.path().join("admin.sock").display(),
        ),
    )?;
    let mut gateway = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("gateway.log"))?)
        .spawn()?;
    // Ready when the proxy accepts.
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", proxy_port)).is_err() {
        if Instant::now() > deadline || gateway.try_wait()?.is_some() {
            bail!("the gateway did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let rule: Vec<String> = ["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "127.0.0.6", "--dport"]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([port.to_string(), "-j".into(), "REDIRECT".into(), "--to-ports".into(), proxy_port.to_string()])
        .collect();
    let iptables_ok = Command::new("iptables").args(&rule).status().map(|s| s.success()).unwrap_or(false);
    // A process of the intercepted cgroup in the namespace, so the gateway
    // serves it before the namespace job's first connect.
    let mut holder_cmd = Command::new("ip");
    holder_cmd.args(["netns", "exec", &netns.name, "sleep", "600"]);
    let procs = cgroup.join("cgroup.procs");
    // SAFETY: only a write(2) between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut holder_cmd, move || std::fs::write(&procs, b"0"));
    }
    let holder = holder_cmd.spawn()?;
    let setup = Setup {
        gateway,
        config,
        cgroup: cgroup.clone(),
        iptables_rule: iptables_ok.then_some(rule),
        netns,
        holder,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(&bin).arg("--config").arg(&setup.config).args(["status", "--json"]).output()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let served = status["namespaces"].as_array().is_some_and(|l| l.iter().any(|n| n["host"] == false));
        if served {
            break;
        }
        if Instant::now() > deadline {
            bail!("the gateway did not serve the benchmark's namespace: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let me = std::env::current_exe()?;
    let netns_name = setup.netns.name.clone();
    let run_client_in = |in_cgroup: bool, in_netns: bool, args: &[String]| -> Result<String> {
        let mut cmd = if in_netns {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &netns_name]).arg(&me);
            c
        } else {
            Command::new(&me)
        };
        cmd.arg("--client").args(args).stdout(Stdio::piped()).stderr(Stdio::inherit());
        if in_cgroup {
            let procs = cgroup.join("cgroup.procs");
            // SAFETY: only a write(2) between fork and exec.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || std::fs::write(&procs, b"0"));
            }
        }
        let out = cmd.output()?;
        if !out.status.success() {
            bail!("client {args:?} failed");
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let run_client = |in_cgroup: bool, args: &[String]| run_client_in(in_cgroup, false, args);

    // connect() latency, every path interleaved per round.
    let mut direct = Vec::new();
    let mut ebpf = Vec::new();
    let mut ipt = Vec::new();
    let mut direct_veth = Vec::new();
    let mut by_port_v = Vec::new();
    let mut host_job = Vec::new();
    let mut ns_direct = Vec::new();
    let mut ns_job = Vec::new();
    let iptables_target: SocketAddr = format!("127.0.0.6:{port}").parse()?;
    let n = CONNECTS.to_string();
    let connect = |to: SocketAddr| -> Vec<String> { vec!["connect".into(), n.clone(), to.to_string()] };
    for _ in 0..ROUNDS {
        direct.extend(parse_ns(&run_client(false, &connect(target))?));
        ebpf.extend(parse_ns(&run_client(true, &connect(target))?));
        if iptables_ok {
            ipt.extend(parse_ns(&run_client(false, &connect(iptables_target))?));
        }
        direct_veth.extend(parse_ns(&run_client(false, &connect(by_port))?));
        by_port_v.extend(parse_ns(&run_client(true, &connect(by_port))?));
        host_job.extend(parse_ns(&run_client(true, &connect(host_side))?));
        ns_direct.extend(parse_ns(&run_client_in(false, true, &connect(host_side))?));
        ns_job.extend(parse_ns(&run_client_in(true, true, &connect(host_side))?));
    }
    println!("connect() latency over {} connects per path (microseconds)", CONNECTS * ROUNDS);
    println!("{:<44} {:>8} {:>8} {:>8} {:>10}", "path", "p50", "p99", "mean", "p50/base");
    let report = |name: &str, v: &mut Vec<f64>, base: f64| {
        if v.is_empty() {
            println!("{name:<44} (unavailable: iptables nat rule could not be added)");
            return;
        }
        let p50 = percentile(v, 50.0);
        let p99 = percentile(v, 99.0);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        println!("{name:<44} {:>8.1} {:>8.1} {:>8.1} {:>10.2}", p50 / 1e3, p99 / 1e3, mean / 1e3, p50 / base);
    };
    let base = percentile(&mut direct.clone(), 50.0);
    println!("-- loopback destination; base: direct");
    report("direct (no program)", &mut direct, base);
    report("gateway, address mode (intercept set)", &mut ebpf, base);
    report("iptables REDIRECT", &mut ipt, base);
    let base = percentile(&mut direct_veth.clone(), 50.0);
    println!("-- address outside the set, on a captured port (veth); base: direct");
    report("direct (no program)", &mut direct_veth, base);
    report("gateway, port-capture mode", &mut by_port_v, base);
    let base = percentile(&mut host_job.clone(), 50.0);
    println!("-- intercept-set address on the host's veth; base: host job through the gateway");
    report("host job through the gateway", &mut host_job, base);
    report("namespace job, direct (not intercepted)", &mut ns_direct, base);
    report("namespace job through the gateway", &mut ns_job, base);

    // Bulk throughput, interleaved rounds, best of each.
    let mut direct_bw: Vec<f64> = Vec::new();
    let mut proxied_bw: Vec<f64> = Vec::new();
    for _ in 0..ROUNDS {
        for (in_cgroup, acc) in [(false, &mut direct_bw), (true, &mut proxied_bw)] {
            let out = run_client(in_cgroup, &["bulk".into(), bulk_target.to_string()]).map_err(|e| {
                let log = std::fs::read_to_string(setup._dir.path().join("gateway.log")).unwrap_or_default();
                e.context(format!("bulk client (through the gateway: {in_cgroup}); gateway log:\n{log}"))
            })?;
            let mut it = out.split_whitespace();
            let bytes: f64 = it.next().context("bytes")?.parse()?;
            let secs: f64 = it.next().context("secs")?.parse()?;
            if bytes as u64 != BULK_BYTES {
                bail!("bulk transfer incomplete: {bytes} of {BULK_BYTES} bytes");
            }
            acc.push(bytes / secs / 1e9);
        }
    }
    let med = |v: &mut Vec<f64>| percentile(v, 50.0);
    let (d, p) = (med(&mut direct_bw), med(&mut proxied_bw));
    println!("\nbulk transfer of {} MiB, median of {ROUNDS} rounds", BULK_BYTES >> 20);
    println!("direct:             {d:.2} GB/s");
    println!("through the gateway: {p:.2} GB/s  (ratio {:.2}, target >= 0.90)", p / d);
    drop(setup);
    Ok(())
}

fn parse_ns(out: &str) -> Vec<f64> {
    out.lines().filter_map(|l| l.trim().parse::<f64>().ok()).collect()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[idx.min(v.len() - 1)]
}
