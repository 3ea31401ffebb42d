//! Soak (issue 17): mixed traffic at a steady moderate rate through one
//! gateway for a long time, sampling the gateway's resident memory, its
//! live heap and what its allocator holds (`gateway_heap_allocated_bytes`,
//! `gateway_heap_resident_bytes`), open descriptors, threads and async
//! tasks (`gateway_runtime_alive_tasks`), and reporting their slopes after
//! warm-up. RSS growing while the live heap is flat is the allocator
//! keeping freed memory; the live heap growing is a leak. At the end: no
//! session is left open and every recording verifies.
//!
//! The traffic, each kind from its own worker in the gateway's intercepted
//! cgroup, real clients against real servers:
//! * HTTP/1.1 keep-alive (curl, three requests per connection) and HTTP/2
//!   (curl, three streams per connection) to an HTTPS upstream;
//! * gRPC-framed unary calls over HTTP/2 (curl, `application/grpc+proto`);
//! * blocked requests: a hard-coded key in `Authorization` (403 expected);
//! * passthrough: TLS to a name outside `tls.intercept` (relayed untouched);
//! * WebSocket: a session of ten client messages on plain HTTP (this
//!   binary re-executed as the client, `--ws-client`);
//! * PostgreSQL: psql sessions of three statements over TLS.
//!
//! Needs root (eBPF, cgroups). Run with
//! `cargo xtask bench --bench soak` (or `cargo bench -p gateway-benches
//! --bench soak`); knobs: `SOAK_SECONDS` (1800), `SOAK_SAMPLE_SECONDS`
//! (10), `SOAK_PAUSE_MS` between a worker's rounds (200). The figures go to
//! docs/reliability.md. Everything it starts is stopped at exit: the
//! gateway (its cgroup and pins), the servers, the PostgreSQL cluster.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Output,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use gateway_tests::{
    keys,
    pg::{pki as pg_pki, PgServer},
    unique_port,
    upstream::{TestPki, Upstream},
    GatewayOptions, TestGateway,
};
use serde_json::Value;

const HOST: &str = "soak.test.internal";
const PASS_HOST: &str = "pass.soak.internal";
const UPSTREAM_IP: &str = "127.0.0.41";
const PG_IP: &str = "127.0.0.42";
const WS_IP: &str = "127.0.0.43";
/// An upstream the policy opts out of inspection (`uninspectable: pass`):
/// at a protected address, passthrough is the policy's decision.
const PASS_IP: &str = "127.0.0.44";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--ws-client") {
        return ws_client(args.get(i + 1).context("--ws-client ADDR")?);
    }
    // cargo bench passes `--bench`; nothing else is expected.
    ensure!(nix::unistd::geteuid().is_root(), "the soak needs root (eBPF programs on a cgroup it creates)");
    let seconds = knob("SOAK_SECONDS", 1800)?;
    let sample = Duration::from_secs(knob("SOAK_SAMPLE_SECONDS", 10)?);
    let pause = Duration::from_millis(knob("SOAK_PAUSE_MS", 200)?);
    let scene = Scene::start()?;
    eprintln!("soak: {seconds} s of mixed traffic, sampling every {sample:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let scene = Arc::new(scene);
    let mut workers = Vec::new();
    for kind in Kind::ALL {
        let (scene, stop) = (scene.clone(), stop.clone());
        workers.push(thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match scene.round(kind) {
                    Ok(()) => kind.counter(&scene.ok).fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        eprintln!("soak: {kind:?}: {e:#}");
                        kind.counter(&scene.failed).fetch_add(1, Ordering::Relaxed)
                    }
                };
                thread::sleep(pause);
            }
        }));
    }

    let pid = scene.gw.child.as_ref().context("the gateway is not running")?.id();
    let api = scene.gw.api_port;
    let start = Instant::now();
    let mut samples = Vec::new();
    // A failed sample stops the workers before returning, so that the
    // scene (the gateway, its cgroup and pins, the PostgreSQL cluster) is
    // dropped and cleaned up: returning with workers still holding it left
    // them running after the process exited.
    let sampled = sample_until(&scene, pid, api, start, seconds, sample, &mut samples);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    sampled?;
    samples.push(Sample::of(pid, api, start.elapsed())?);
    // Sessions end when their connections close; give the writer its flush.
    thread::sleep(Duration::from_secs(3));
    let after = Sample::of(pid, api, start.elapsed())?;

    let open = scene.open_sessions()?;
    let verify = scene.gw.cli(&["sessions", "verify", "--all"]);
    let verified = verify.status.success();

    report(&scene, &samples, &after, open, verified);
    ensure!(open == 0, "{open} sessions were left open");
    ensure!(verified, "sessions verify --all failed: {}", String::from_utf8_lossy(&verify.stdout));
    let failed: u64 = scene.failed.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    ensure!(failed == 0, "{failed} rounds failed");
    Ok(())
}

/// Samples every `sample` until `seconds` have passed since `start`.
fn sample_until(
    scene: &Scene,
    pid: u32,
    api: u16,
    start: Instant,
    seconds: u64,
    sample: Duration,
    samples: &mut Vec<Sample>,
) -> Result<()> {
    while start.elapsed() < Duration::from_secs(seconds) {
        let s = Sample::of(pid, api, start.elapsed())?;
        eprintln!(
            "soak: t={:>5.0}s rss={} KiB heap={} KiB held={} KiB fds={} threads={} tasks={} rounds ok={} failed={}",
            s.at,
            s.rss_kib,
            s.heap_kib,
            s.held_kib,
            s.fds,
            s.threads,
            s.tasks,
            scene.ok.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>(),
            scene.failed.iter().map(|c| c.load(Ordering::Relaxed)).sum::<u64>(),
        );
        samples.push(s);
        thread::sleep(sample.min(Duration::from_secs(seconds).saturating_sub(start.elapsed())));
    }
    Ok(())
}

fn knob(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

/// The kinds of traffic, one worker each.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Http1,
    Http2,
    Grpc,
    Blocked,
    Passthrough,
    WebSocket,
    Postgres,
}

impl Kind {
    const ALL: [Kind; 7] =
        [Kind::Http1, Kind::Http2, Kind::Grpc, Kind::Blocked, Kind::Passthrough, Kind::WebSocket, Kind::Postgres];

    fn counter(self, counters: &[AtomicU64; 7]) -> &AtomicU64 {
        &counters[self as usize]
    }
}

struct Scene {
    gw: TestGateway,
    _upstreams: [Upstream; 2],
    pg: PgServer,
    port: u16,
    ws: SocketAddr,
    gateway_ca: std::path::PathBuf,
    pg_password: String,
    key: String,
    ok: [AtomicU64; 7],
    failed: [AtomicU64; 7],
    _dir: tempfile::TempDir,
}

impl Scene {
    fn start() -> Result<Scene> {
        let dir = tempfile::tempdir()?;
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let pki = TestPki::new(dir.path(), &[HOST, PASS_HOST]);
        let port = unique_port();
        let upstream = Upstream::start(format!("{UPSTREAM_IP}:{port}").parse()?, &pki);
        let opaque = Upstream::start(format!("{PASS_IP}:{port}").parse()?, &pki);

        let pg_tls = pg_pki(&[PG_IP]);
        let pg_port = unique_port();
        let pg = PgServer::start(&[PG_IP], pg_port, &pg_tls);
        let pg_password = format!("soak-{}", keys::random(24));
        pg.admin_sql(&format!("CREATE ROLE soak LOGIN PASSWORD '{pg_password}';"));
        pg.admin_sql("CREATE DATABASE soak OWNER soak;");
        let pg_ca = dir.path().join("pg-ca.pem");
        std::fs::write(&pg_ca, &pg_tls.ca_pem)?;

        let ws: SocketAddr = format!("{WS_IP}:{}", unique_port()).parse()?;
        ws_server(ws)?;

        let destinations = [
            format!("{{cidr: {UPSTREAM_IP}/32, ports: [{port}]}}"),
            format!("{{cidr: {PG_IP}/32, ports: [{pg_port}]}}"),
            format!("{{cidr: {WS_IP}/32, ports: [{}]}}", ws.port()),
            format!("{{cidr: {PASS_IP}/32, ports: [{port}]}}"),
        ];
        let destinations: Vec<&str> = destinations.iter().map(String::as_str).collect();
        let mut opts = GatewayOptions::new("soak", &destinations);
        opts.proxy_yaml = "  client_first_timeout: 30s\n".into();
        opts.policy_yaml = Some(format!(
            "version: 1\nrules:\n  - name: opaque\n    match: {{ destination: {{ cidr: {PASS_IP} }} }}\n    action: allow\n    uninspectable: pass\ndefaults: {{ action: allow }}\n"
        ));
        // PostgreSQL's password is a finding (flagged, not blocked, so the
        // sessions go on); keys to the HTTPS upstream block.
        opts.extra_yaml = format!(
            "tls:\n  intercept: ['*.test.internal']\n  passthrough: ['{PASS_HOST}']\n  extra_upstream_cas: [{}, {}]\n\
             findings:\n  actions:\n    - {{host: \"{PG_IP}\", action: flag}}\n",
            pki.ca_path.display(),
            pg_ca.display()
        );
        let gw = TestGateway::start(opts);
        let gateway_ca = dir.path().join("gateway-ca.pem");
        let out = gw.cli(&["ca", "export", "--out", gateway_ca.to_str().context("utf8")?]);
        ensure!(out.status.success(), "ca export: {}", String::from_utf8_lossy(&out.stderr));
        Ok(Scene {
            gw,
            _upstreams: [upstream, opaque],
            pg,
            port,
            ws,
            gateway_ca,
            pg_password,
            key: keys::cursor_key(),
            ok: Default::default(),
            failed: Default::default(),
            _dir: dir,
        })
    }

    fn curl(&self, host: &str, args: &[&str]) -> Result<Output> {
        let ip = if host == PASS_HOST { PASS_IP } else { UPSTREAM_IP };
        let out = self
            .gw
            .command_in_cgroup("curl")
            .args(["-sS", "--max-time", "30", "--resolve", &format!("{host}:{}:{ip}", self.port)])
            .args(args)
            .output()?;
        Ok(out)
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.port)
    }

    /// One round of `kind`; an error says what was unexpected.
    fn round(&self, kind: Kind) -> Result<()> {
        let ca = self.gateway_ca.to_str().context("utf8")?;
        let codes = |out: Output, want: &str| -> Result<()> {
            let got = String::from_utf8_lossy(&out.stdout);
            ensure!(got == want, "got {got:?}, want {want:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
            Ok(())
        };
        match kind {
            Kind::Http1 | Kind::Http2 => {
                let version = if matches!(kind, Kind::Http1) { "--http1.1" } else { "--http2" };
                let mut args = vec![version, "--cacert", ca, "-w", "%{http_code}\n"];
                let urls: Vec<String> = (0..3).map(|i| self.url(HOST, &format!("/soak/{i}"))).collect();
                for u in &urls {
                    args.extend(["-o", "/dev/null", u.as_str()]);
                }
                codes(self.curl(HOST, &args)?, "200\n200\n200\n")
            }
            Kind::Grpc => {
                // One gRPC message: uncompressed, 5 bytes of protobuf (field 1, "soak").
                let body = self._dir.path().join("grpc.bin");
                if !body.exists() {
                    std::fs::write(&body, [0, 0, 0, 0, 6, 0x0a, 4, b's', b'o', b'a', b'k'])?;
                }
                let data = format!("@{}", body.display());
                let url = self.url(HOST, "/soak.Svc/Call");
                let args = [
                    "--http2",
                    "--cacert",
                    ca,
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}\n",
                    "-H",
                    "Content-Type: application/grpc+proto",
                    "-H",
                    "TE: trailers",
                    "--data-binary",
                    &data,
                    &url,
                ];
                codes(self.curl(HOST, &args)?, "200\n")
            }
            Kind::Blocked => {
                let auth = format!("Authorization: Bearer {}", self.key);
                let url = self.url(HOST, "/soak/keyed");
                codes(
                    self.curl(HOST, &["--cacert", ca, "-o", "/dev/null", "-w", "%{http_code}\n", "-H", &auth, &url])?,
                    "403\n",
                )
            }
            Kind::Passthrough => {
                // Relayed untouched: the upstream's own certificate, not trusted here.
                let url = self.url(PASS_HOST, "/soak/pass");
                codes(self.curl(PASS_HOST, &["-k", "-o", "/dev/null", "-w", "%{http_code}\n", &url])?, "200\n")
            }
            Kind::WebSocket => {
                let exe = std::env::current_exe()?;
                let out = self.gw.command_in_cgroup(exe).args(["--ws-client", &self.ws.to_string()]).output()?;
                ensure!(out.status.success(), "ws client: {}", String::from_utf8_lossy(&out.stderr).trim());
                Ok(())
            }
            Kind::Postgres => {
                let conninfo = format!(
                    "host={PG_IP} port={} user=soak dbname=soak sslmode=verify-full sslrootcert={ca} connect_timeout=30",
                    self.pg.port
                );
                let out = self
                    .gw
                    .command_in_cgroup("psql")
                    .env("PGPASSWORD", &self.pg_password)
                    .args([
                        "-X",
                        "-At",
                        &conninfo,
                        "-c",
                        "SELECT 1",
                        "-c",
                        "SELECT count(*) FROM pg_class",
                        "-c",
                        "SELECT now()",
                    ])
                    .output()?;
                ensure!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr).trim());
                Ok(())
            }
        }
    }

    /// Sessions without an end.
    fn open_sessions(&self) -> Result<usize> {
        let out = self.gw.cli(&["sessions", "list", "--json", "--limit", "1000000"]);
        ensure!(out.status.success(), "sessions list: {}", String::from_utf8_lossy(&out.stderr));
        let list: Value = serde_json::from_slice(&out.stdout)?;
        let list = list.as_array().context("sessions list is not an array")?;
        Ok(list.iter().filter(|s| s["ended"].is_null()).count())
    }
}

/// One reading of the gateway process.
struct Sample {
    at: f64,
    rss_kib: u64,
    fds: u64,
    threads: u64,
    /// Tasks alive on the gateway's async runtime.
    tasks: u64,
    /// The live heap (`gateway_heap_allocated_bytes`), KiB; 0 from a
    /// gateway without the metric (an older binary).
    heap_kib: u64,
    /// What the allocator holds, used or free (`gateway_heap_resident_bytes`), KiB.
    held_kib: u64,
}

impl Sample {
    fn of(pid: u32, api_port: u16, at: Duration) -> Result<Sample> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Result<u64> {
            let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name}"))?;
            Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
        let metrics = scrape(api_port)?;
        Ok(Sample {
            at: at.as_secs_f64(),
            rss_kib: field("VmRSS:")?,
            fds,
            threads: field("Threads:")?,
            tasks: metric(&metrics, "gateway_runtime_alive_tasks")?,
            heap_kib: metric(&metrics, "gateway_heap_allocated_bytes").unwrap_or(0) / 1024,
            held_kib: metric(&metrics, "gateway_heap_resident_bytes").unwrap_or(0) / 1024,
        })
    }
}

/// The gateway's `/metrics` text.
fn scrape(api_port: u16) -> Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", api_port)).context("connecting to the metrics endpoint")?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// The label-less sample `name` of a scrape.
fn metric(text: &str, name: &str) -> Result<u64> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .with_context(|| format!("no {name} in /metrics"))?;
    Ok(line.trim().parse::<f64>()? as u64)
}

/// Least-squares slope of `y` over `x`, per minute.
fn slope_per_minute(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx * 60.0
    }
}

fn report(scene: &Scene, samples: &[Sample], after: &Sample, open: usize, verified: bool) {
    // Warm-up: the first fifth (pools, caches, the allocator's arenas).
    let warm: Vec<&Sample> = samples.iter().skip(samples.len() / 5).collect();
    let series = |f: fn(&Sample) -> u64| -> Vec<(f64, f64)> { warm.iter().map(|s| (s.at, f(s) as f64)).collect() };
    let first = warm.first().map_or(0, |s| s.rss_kib);
    let last = warm.last().map_or(0, |s| s.rss_kib);
    println!("\nsoak: {:.0} s, {} samples ({} after warm-up)", after.at, samples.len(), warm.len());
    println!("| kind | rounds ok | failed |\n| --- | ---: | ---: |");
    for kind in Kind::ALL {
        println!(
            "| {kind:?} | {} | {} |",
            kind.counter(&scene.ok).load(Ordering::Relaxed),
            kind.counter(&scene.failed).load(Ordering::Relaxed)
        );
    }
    println!("\n| measure | after warm-up | end | slope |\n| --- | ---: | ---: | ---: |");
    println!("| RSS | {first} KiB | {last} KiB | {:+.1} KiB/min |", slope_per_minute(&series(|s| s.rss_kib)));
    println!(
        "| live heap | {} KiB | {} KiB (idle: {}) | {:+.1} KiB/min |",
        warm.first().map_or(0, |s| s.heap_kib),
        warm.last().map_or(0, |s| s.heap_kib),
        after.heap_kib,
        slope_per_minute(&series(|s| s.heap_kib))
    );
    println!(
        "| allocator holds | {} KiB | {} KiB (idle: {}) | {:+.1} KiB/min |",
        warm.first().map_or(0, |s| s.held_kib),
        warm.last().map_or(0, |s| s.held_kib),
        after.held_kib,
        slope_per_minute(&series(|s| s.held_kib))
    );
    println!(
        "| descriptors | {} | {} (idle: {}) | {:+.3}/min |",
        warm.first().map_or(0, |s| s.fds),
        warm.last().map_or(0, |s| s.fds),
        after.fds,
        slope_per_minute(&series(|s| s.fds))
    );
    println!(
        "| threads | {} | {} (idle: {}) | {:+.3}/min |",
        warm.first().map_or(0, |s| s.threads),
        warm.last().map_or(0, |s| s.threads),
        after.threads,
        slope_per_minute(&series(|s| s.threads))
    );
    println!(
        "| async tasks | {} | {} (idle: {}) | {:+.3}/min |",
        warm.first().map_or(0, |s| s.tasks),
        warm.last().map_or(0, |s| s.tasks),
        after.tasks,
        slope_per_minute(&series(|s| s.tasks))
    );
    println!("\nsessions left open: {open}; sessions verify --all: {}", if verified { "ok" } else { "FAILED" });
}

/// A WebSocket server on `addr`: answers any upgrade with 101, reads
/// client frames until the close frame, acknowledges each text frame.
fn ws_server(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let _ = serve_ws(stream);
            });
        }
    });
    Ok(())
}

fn serve_ws(mut s: TcpStream) -> Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    read_head(&mut s)?;
    s.write_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
    )?;
    loop {
        let mut h = [0u8; 2];
        s.read_exact(&mut h)?;
        let len = usize::from(h[1] & 0x7f);
        ensure!(len < 126, "the soak's frames are small");
        let mut rest = vec![0u8; 4 + len];
        s.read_exact(&mut rest)?;
        match h[0] & 0x0f {
            0x8 => {
                s.write_all(&[0x88, 0])?;
                return Ok(());
            }
            _ => s.write_all(&[0x81, 3, b'a', b'c', b'k'])?,
        }
    }
}

fn read_head(s: &mut TcpStream) -> Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte)?;
        head.push(byte[0]);
        ensure!(head.len() < 16 * 1024, "head too long");
    }
    Ok(head)
}

/// A masked client frame of `opcode`.
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// The WebSocket client (run in the intercepted cgroup): ten messages,
/// each acknowledged, then a close.
fn ws_client(addr: &str) -> Result<()> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET /soak HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )?;
    let head = read_head(&mut s)?;
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!("no upgrade: {}", String::from_utf8_lossy(&head).lines().next().unwrap_or(""));
    }
    for i in 0..10 {
        s.write_all(&ws_frame(0x1, format!("soak message {i}").as_bytes()))?;
        let mut ack = [0u8; 5];
        s.read_exact(&mut ack)?;
        ensure!(&ack == b"\x81\x03ack", "unexpected reply to message {i}");
    }
    s.write_all(&ws_frame(0x8, &[]))?;
    let mut close = [0u8; 2];
    s.read_exact(&mut close)?;
    Ok(())
}
