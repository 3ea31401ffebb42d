//! Limits that hold against a hostile job, end to end: a real gateway
//! process, real cgroups (one per job, below the intercepted one), real
//! Python clients opening hundreds of connections, and the gateway's own
//! memory read from /proc.

use std::{
    convert::Infallible,
    io::BufReader,
    net::SocketAddr,
    process::{Child, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use gateway_tests::{unique_port, wait_for, ChildCgroup, GatewayOptions, TestGateway};
use http_body_util::{BodyExt as _, Full};
use serde_json::Value;

const UPSTREAM_IP: &str = "127.0.0.9";

/// A plain HTTP/1.1 and h2c upstream: reads each request's body and answers
/// `{"ok":true}`; connections that say nothing are kept open.
struct PlainUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    _runtime: tokio::runtime::Runtime,
}

impl PlainUpstream {
    fn start() -> PlainUpstream {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let addr: SocketAddr = format!("{UPSTREAM_IP}:{}", unique_port()).parse().expect("addr");
        let listener = runtime.block_on(tokio::net::TcpListener::bind(addr)).expect("bind upstream");
        let requests = Arc::new(AtomicU64::new(0));
        let counted = requests.clone();
        runtime.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let counted = counted.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let counted = counted.clone();
                        async move {
                            let _ = req.into_body().collect().await;
                            counted.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}"))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        PlainUpstream { addr, requests, _runtime: runtime }
    }
}

/// The hostile job: `h1` HTTP/1.1 connections each sending half of a
/// 1 MiB body and stalling, `h2` h2c connections each opening 4 streams of
/// 64 KiB without END_STREAM, `silent` connections that never speak. Prints
/// `{"ready": opened}` once all are open, holds them for `hold` seconds,
/// then prints what each kind saw (statuses, closes) and exits.
const HOSTILE: &str = r#"
import asyncio, json, struct, sys
host, port = sys.argv[1], int(sys.argv[2])
n_h1, n_h2, n_silent, hold = (int(a) for a in sys.argv[3:7])
seen = {"opened": 0, "connect_failed": 0, "h1_status": {}, "closed_by_gateway": 0}
def frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload
def lit(name, value):
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value
HEADERS = lit(b":method", b"POST") + lit(b":scheme", b"http") + lit(b":path", b"/hold") + lit(b":authority", b"hostile")
async def watch(reader, kind):
    try:
        data = await asyncio.wait_for(reader.read(4096), hold)
    except asyncio.TimeoutError:
        return
    except OSError:
        data = b""
    if kind == "h1" and data.startswith(b"HTTP/1.1 "):
        status = data[9:12].decode()
        seen["h1_status"][status] = seen["h1_status"].get(status, 0) + 1
    elif not data:
        seen["closed_by_gateway"] += 1
async def one(kind, ready):
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        seen["connect_failed"] += 1
        ready.release()
        return
    seen["opened"] += 1
    if kind == "h1":
        writer.write(b"POST /hold HTTP/1.1\r\nHost: hostile\r\nContent-Length: 1048576\r\n\r\n" + b"a" * (512 * 1024))
    elif kind == "h2":
        out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"")
        for stream in (1, 3, 5, 7):
            out += frame(1, 4, stream, HEADERS)
            for _ in range(4):
                out += frame(0, 0, stream, b"b" * 16384)
        writer.write(out)
    ready.release()
    await watch(reader, kind)
    writer.close()
async def main():
    ready = asyncio.Semaphore(0)
    kinds = ["silent"] * n_silent + ["h1"] * n_h1 + ["h2"] * n_h2
    tasks = [asyncio.create_task(one(k, ready)) for k in kinds]
    for _ in kinds:
        await ready.acquire()
    print(json.dumps({"ready": seen["opened"], "connect_failed": seen["connect_failed"]}), flush=True)
    await asyncio.gather(*tasks)
    print(json.dumps(seen), flush=True)
asyncio.run(main())
"#;

/// The well-behaved job: small JSON POSTs, one connection each, for
/// `seconds`; prints `{"ok": n, "failed": n, "max_ms": ms, "errors": {...}}`.
const STEADY: &str = r#"
import http.client, json, sys, time
host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ok = failed = 0
max_ms = 0.0
errors = {}
end = time.monotonic() + seconds
while time.monotonic() < end:
    started = time.monotonic()
    try:
        c = http.client.HTTPConnection(host, port, timeout=30)
        c.request("POST", "/steady", body=json.dumps({"n": ok + failed}), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        body = r.read()
        c.close()
        if r.status == 200 and body == b'{"ok":true}':
            ok += 1
        else:
            failed += 1
            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
    except Exception as e:
        failed += 1
        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
    max_ms = max(max_ms, (time.monotonic() - started) * 1000)
    time.sleep(0.02)
print(json.dumps({"ok": ok, "failed": failed, "max_ms": round(max_ms), "errors": errors}), flush=True)
"#;

fn gateway(name: &str, upstream: &PlainUpstream, limits_yaml: &str, nofile: Option<u64>) -> TestGateway {
    let mut opts =
        GatewayOptions::new(name, &[&format!("{{cidr: {UPSTREAM_IP}/32, ports: [{}]}}", upstream.addr.port())]);
    // Every client here speaks first; a loaded machine must not make the
    // gateway take a slow one for a server-speaks-first protocol.
    opts.proxy_yaml = format!("  client_first_timeout: 30s\n  limits:\n{limits_yaml}");
    opts.nofile = nofile;
    TestGateway::start(opts)
}

fn python(job: &ChildCgroup, script: &str, args: &[String]) -> Child {
    job.command("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3")
}

/// Reads the next JSON line a client printed.
fn next_line(out: &mut impl std::io::BufRead, who: &str) -> Value {
    let mut line = String::new();
    out.read_line(&mut line).unwrap_or_else(|e| panic!("{who}: {e}"));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{who} printed {line:?}: {e}"))
}

fn refused_events(gw: &TestGateway, limit: &str) -> usize {
    gw.connection_events().iter().filter(|e| e["outcome"] == "refused" && e["limit"] == limit).count()
}

/// One job holds 1,000 connections open (request bodies stalled half-way
/// over HTTP/1.1 and HTTP/2, and connections that never speak) while a
/// second job keeps making requests. The gateway's memory stays within its
/// body budget plus a per-connection baseline, the second job's requests
/// succeed, and the memory comes back down once the hostile job is gone.
#[test]
fn a_hostile_job_holding_1000_connections_neither_starves_another_job_nor_grows_memory() {
    const H1: usize = 300;
    const H2: usize = 300;
    const SILENT: usize = 400;
    const HOLD_SECS: u64 = 20;
    const BUFFERED_TOTAL_MIB: u64 = 64;
    // Measured per held connection on top of the bodies (task, hyper and
    // h2 state, read buffers, each request's body scanner with its
    // decoders), since the scanners
    // decode JSON, protobuf, gRPC and multipart bodies as they stream.
    // Measured 118-154 KiB on this suite's 2-core machines (was under 96
    // before those decoders): a bound with headroom, not a target.
    const PER_CONNECTION_KIB: u64 = 192;
    let upstream = PlainUpstream::start();
    let gw = gateway(
        "hostile",
        &upstream,
        &format!(
            "    max_connections_per_cgroup: 1100\n    max_buffered_per_cgroup_bytes: {}\n    max_buffered_total_bytes: {}\n    buffer_wait: 2s\n",
            32 << 20,
            BUFFERED_TOTAL_MIB << 20
        ),
        None,
    );
    let hostile_job = gw.child_cgroup("hostile");
    let steady_job = gw.child_cgroup("steady");
    // A few requests first, so the idle figure includes warmed-up pools.
    let mut warm = python(&steady_job, STEADY, &[UPSTREAM_IP.into(), upstream.addr.port().to_string(), "1".into()]);
    let warmed = next_line(&mut BufReader::new(warm.stdout.take().expect("stdout")), "warm-up");
    assert!(warmed["ok"].as_u64().unwrap_or(0) > 0, "warm-up requests failed: {warmed}");
    warm.wait().expect("warm-up");
    let idle_kib = gw.rss_kib();

    let port = upstream.addr.port().to_string();
    let hostile_args =
        [UPSTREAM_IP.into(), port.clone(), H1.to_string(), H2.to_string(), SILENT.to_string(), HOLD_SECS.to_string()];
    let started = Instant::now();
    let mut hostile = python(&hostile_job, HOSTILE, &hostile_args);
    let mut hostile_out = BufReader::new(hostile.stdout.take().expect("stdout"));
    let ready = next_line(&mut hostile_out, "hostile job");
    assert_eq!(ready["ready"], (H1 + H2 + SILENT) as u64, "every hostile connection was accepted: {ready}");
    let ramp = started.elapsed();

    // The second job works while the hostile one holds everything.
    let steady_secs = HOLD_SECS.saturating_sub(ramp.as_secs() + 4).max(5);
    let mut steady = python(&steady_job, STEADY, &[UPSTREAM_IP.into(), port, steady_secs.to_string()]);
    let mut peak_kib = gw.rss_kib();
    while steady.try_wait().expect("steady job").is_none() {
        peak_kib = peak_kib.max(gw.rss_kib());
        std::thread::sleep(Duration::from_millis(100));
    }
    let steady_result = next_line(&mut BufReader::new(steady.stdout.take().expect("stdout")), "steady job");
    let hostile_result = next_line(&mut hostile_out, "hostile job");
    hostile.wait().expect("hostile job");
    let held_for = started.elapsed();

    let ok = steady_result["ok"].as_u64().unwrap_or(0);
    let failed = steady_result["failed"].as_u64().unwrap_or(0);
    let rate = ok as f64 / (ok + failed).max(1) as f64;
    // Memory returns once the hostile job's connections are gone.
    let after_kib = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = gw.rss_kib();
            if now <= idle_kib + 32 * 1024 || Instant::now() > deadline {
                break now;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let baseline_kib = (H1 + H2 + SILENT) as u64 * PER_CONNECTION_KIB;
    let bound_kib = idle_kib + (BUFFERED_TOTAL_MIB << 10) + baseline_kib;
    eprintln!(
        "limits load: {} hostile connections opened in {ramp:?}, held {held_for:?}; gateway RSS idle {} MiB, peak {} MiB \
         (bound {} MiB = idle + {BUFFERED_TOTAL_MIB} MiB bodies + {} x {PER_CONNECTION_KIB} KiB), after {} MiB; \
         second job: {ok} ok, {failed} failed ({:.1}% success), slowest {} ms; hostile saw {hostile_result}",
        H1 + H2 + SILENT,
        idle_kib >> 10,
        peak_kib >> 10,
        bound_kib >> 10,
        H1 + H2 + SILENT,
        after_kib >> 10,
        rate * 100.0,
        steady_result["max_ms"],
    );
    assert!(ok >= 20, "the second job made too few requests: {steady_result}");
    assert_eq!(failed, 0, "the second job's requests failed: {steady_result}");
    assert!(peak_kib <= bound_kib, "peak RSS {peak_kib} KiB beyond the bound {bound_kib} KiB");
    assert!(after_kib <= idle_kib + 32 * 1024, "RSS stayed at {after_kib} KiB after the load (idle {idle_kib} KiB)");
    // The hostile job's stalled requests were refused, not forwarded.
    let refused = hostile_result["h1_status"]["503"].as_u64().unwrap_or(0)
        + hostile_result["h1_status"]["429"].as_u64().unwrap_or(0);
    assert!(refused > 0, "past the cgroup's pool, stalled HTTP/1.1 bodies are refused: {hostile_result}");
    assert_eq!(
        upstream.requests.load(Ordering::SeqCst),
        ok + warmed["ok"].as_u64().unwrap_or(0),
        "only the second job's requests reached upstream"
    );
    drop((hostile_job, steady_job));
}

/// With a small descriptor table, one job's silent connections take at
/// most its share; the rest are refused at once with an event naming the
/// limit, another job's connections are still served, and accept errors
/// (if any) are logged at a bounded rate.
#[test]
fn one_job_cannot_take_the_descriptor_table_from_another() {
    const NOFILE: u64 = 512;
    const HOSTILE: usize = 400;
    let upstream = PlainUpstream::start();
    let gw = gateway("fds", &upstream, "    fd_reserve: 64\n    cgroup_fd_share_percent: 50\n", Some(NOFILE));
    let admission = wait_for("the admission figures are logged", || {
        gw.log_messages("connection admission").into_iter().next().ok_or("not yet")
    });
    let per_cgroup = admission["per_cgroup"].as_u64().expect("per_cgroup");
    assert!(per_cgroup > 0 && per_cgroup < HOSTILE as u64 / 2, "a share well below the hostile count: {admission}");
    let hostile_job = gw.child_cgroup("hostile");
    let steady_job = gw.child_cgroup("steady");
    let port = upstream.addr.port().to_string();
    let mut hostile =
        python(&hostile_job, HOSTILE_SILENT, &[UPSTREAM_IP.into(), port.clone(), HOSTILE.to_string(), "15".into()]);
    let mut hostile_out = BufReader::new(hostile.stdout.take().expect("stdout"));
    let ready = next_line(&mut hostile_out, "hostile job");
    eprintln!("hostile job: {ready}");
    wait_for("the hostile connections beyond the share are refused", || {
        let refused = refused_events(&gw, "connections_per_cgroup");
        if refused as u64 >= HOSTILE as u64 - per_cgroup {
            Ok(refused)
        } else {
            Err(format!("{refused} refused so far"))
        }
    });
    let mut steady = python(&steady_job, STEADY, &[UPSTREAM_IP.into(), port, "3".into()]);
    let steady_result = next_line(&mut BufReader::new(steady.stdout.take().expect("stdout")), "steady job");
    steady.wait().expect("steady job");
    eprintln!("second job while the first holds its share: {steady_result}");
    assert!(steady_result["ok"].as_u64().unwrap_or(0) > 0, "{steady_result}");
    assert_eq!(steady_result["failed"], 0, "{steady_result}");
    let event =
        gw.connection_events().into_iter().find(|e| e["outcome"] == "refused").expect("a refused connection event");
    assert_eq!(event["reason"], "limit");
    assert_eq!(event["limit_max"], per_cgroup);
    assert!(event["cgroup"].as_str().unwrap_or_default().ends_with("/hostile"), "{event}");
    let accept_errors = gw.log_messages("accept failed").len();
    assert!(accept_errors <= 3, "accept errors are throttled: {accept_errors} lines");
    hostile.kill().expect("kill hostile job");
    hostile.wait().expect("hostile job");
    drop((hostile_job, steady_job));
}

/// Opens `n` connections that never speak, prints how many opened and how
/// many the gateway closed at once, and holds the rest for `hold` seconds.
const HOSTILE_SILENT: &str = r#"
import json, socket, sys, time
host, port, n, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socks, failed = [], 0
for _ in range(n):
    s = socket.socket()
    try:
        s.connect((host, port))
        socks.append(s)
    except OSError:
        failed += 1
print(json.dumps({"opened": len(socks), "connect_failed": failed}), flush=True)
time.sleep(hold)
"#;
