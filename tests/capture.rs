//! Capturing every job wherever it runs, end to end: jobs in their own
//! network namespace (`ip netns` + veth, `unshare -n`), port capture of
//! addresses outside the intercept set, UDP (QUIC) refusal with the TCP
//! fallback captured, a root job that sets the gateway's upstream mark,
//! fail-closed behaviour for namespace jobs, and cleanup of listeners.
//!
//! Every namespace, veth pair and server here is created by the test and
//! removed when it ends; traffic goes only to them and to loopback.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use gateway_tests::{cgroup2_mount, unique_port, wait_for, EchoServer, GatewayOptions, TestGateway};
use nix::sys::signal::Signal;
use serde_json::Value;

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// A network namespace joined to the host by a veth pair, with a /29:
/// `host_ip` on the host side, `ns_ip` and `ns_ip2` inside.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
    ns_ip2: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip must be installed (iproute2)");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    fn create() -> Netns {
        gateway_tests::require_root();
        let n = NEXT_NET.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let block = ((pid % 4000) * 32 + n % 32) * 8;
        let octets =
            |k: u32| format!("10.{}.{}.{}", 100 + ((block + k) >> 16), ((block + k) >> 8) & 255, (block + k) & 255);
        let tag = format!("{}{n}", pid % 100_000);
        let ns = Netns {
            name: format!("gwt-{tag}"),
            host_if: format!("gwh{tag}"),
            host_ip: octets(1),
            ns_ip: octets(2),
            ns_ip2: octets(3),
        };
        let ns_if = format!("gwn{tag}");
        ip(&["netns", "add", &ns.name]);
        ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &ns_if]);
        ip(&["link", "set", &ns_if, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{}/29", ns.host_ip), "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        for (addr, dev) in [(&ns.ns_ip, &ns_if), (&ns.ns_ip2, &ns_if)] {
            ip(&["-n", &ns.name, "addr", "add", &format!("{addr}/29"), "dev", dev]);
        }
        ip(&["-n", &ns.name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        // The addresses are usable once duplicate address detection (IPv4:
        // none) and the link are up; probe by binding one.
        ns
    }

    /// `ip netns exec NAME program`.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// The same, placed in the gateway's intercepted cgroup.
    fn command_in_cgroup(&self, gw: &TestGateway, program: &str) -> Command {
        let mut cmd = gw.command_in_cgroup("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Whether something listens on `port` inside the namespace.
    fn listens_on(&self, port: u16) -> bool {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "ss", "-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("ss");
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and so the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).stderr(Stdio::null()).status();
    }
}

/// A minimal HTTP/1.1 server that records every request head it gets and
/// answers `200 ok`.
struct HttpServer {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl HttpServer {
    /// Listens on `addr` in the test's own namespace.
    fn start(addr: SocketAddr) -> HttpServer {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        HttpServer::serve(listener)
    }

    /// Listens on `addr` inside the named namespace (a socket stays in the
    /// namespace it was created in; accepting works from any thread).
    fn start_in(netns: &str, addr: SocketAddr) -> HttpServer {
        let path = format!("/var/run/netns/{netns}");
        let listener = std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("netns file");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr} in {path}: {e}"))
        })
        .join()
        .expect("netns thread");
        HttpServer::serve(listener)
    }

    fn serve(listener: TcpListener) -> HttpServer {
        let addr = listener.local_addr().expect("addr");
        let heads = Arc::new(Mutex::new(Vec::new()));
        let h = heads.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let h = h.clone();
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    h.lock().expect("heads").push(String::from_utf8_lossy(&buf).into_owned());
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
                });
            }
        });
        HttpServer { addr, heads }
    }

    fn saw(&self, needle: &str) -> usize {
        self.heads.lock().expect("heads").iter().filter(|h| h.contains(needle)).count()
    }
}

/// curl's status code and body for `url` (plain HTTP).
fn curl(mut cmd: Command, url: &str, headers: &[String]) -> (u16, String) {
    cmd.args(["-sS", "-m", "60"]).args(gateway_tests::CURL_STATUS);
    for h in headers {
        cmd.arg("-H").arg(h);
    }
    let out = cmd.arg(url).output().expect("curl");
    let (code, body) = gateway_tests::curl_reply(&out.stdout);
    (code, format!("{body}{}", String::from_utf8_lossy(&out.stderr)))
}

fn namespaces(gw: &TestGateway) -> Vec<Value> {
    gw.status()["namespaces"].as_array().cloned().unwrap_or_default()
}

/// Waits until the gateway serves the namespace of `pid`; returns its cookie.
fn wait_served(gw: &TestGateway, pid: u32) -> u64 {
    wait_for("the gateway serves the job's namespace", || {
        let list = namespaces(gw);
        list.iter()
            .find(|n| n["pid"].as_u64() == Some(u64::from(pid)) && n["host"] == false)
            .and_then(|n| n["cookie"].as_u64())
            .ok_or_else(|| format!("{list:?}"))
    })
}

/// A process that sits in the namespace (and the cgroup) until killed.
struct Holder(Child);

impl Holder {
    /// Runs `sleep 600` at the end of `cmd` (`ip netns exec NAME`, which
    /// execs it: the pid is the sleeping process's).
    fn start(mut cmd: Command) -> Holder {
        cmd.args(["sleep", "600"]).stdout(Stdio::null()).stderr(Stdio::null());
        Holder(cmd.spawn().expect("holder"))
    }

    /// The pid of the process inside the namespace (`ip netns exec` execs it).
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A container-like job: an `ip netns` namespace on a veth pair whose
/// process was in the intercepted cgroup before the gateway started. Its
/// connections are served inside its namespace, attributed with it, and
/// inspected like a host job's; when it goes away, so does the listener.
#[test]
fn ip_netns_job_is_served_attributed_and_inspected() {
    let ns = Netns::create();
    let port = unique_port();
    let server = HttpServer::start(format!("{}:{port}", ns.host_ip).parse().expect("addr"));
    let name = "netnsjob";
    let cgroup_dir = cgroup2_mount().join(format!("gateway-tests/{name}-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup_dir).expect("cgroup");
    // Started before the gateway, like a container that was already running.
    let mut holder_cmd = Command::new("ip");
    holder_cmd.args(["netns", "exec", &ns.name]);
    gateway_tests::in_cgroup_pre_exec(&mut holder_cmd, &cgroup_dir);
    let holder = Holder::start(holder_cmd);

    let gw = TestGateway::start(GatewayOptions::new(name, &[&format!("{{cidr: {}/32, ports: [{port}]}}", ns.host_ip)]));
    let cookie = wait_served(&gw, holder.pid());
    assert!(ns.listens_on(gw.proxy_port), "the proxy listens inside the namespace");

    // A clean request: through the proxy, attributed with the namespace.
    let url = format!("http://{}:{port}/clean", ns.host_ip);
    let curl_cmd = ns.command_in_cgroup(&gw, "curl");
    let (status, body) = curl(curl_cmd, &url, &[]);
    assert_eq!(status, 200, "{body}\n{}", gw.log_errors());
    assert_eq!(server.saw("GET /clean"), 1);
    let events = wait_for("an event for the namespace job", || {
        let ev: Vec<Value> =
            gw.connection_events().into_iter().filter(|e| e["netns"].as_u64() == Some(cookie)).collect();
        if ev.is_empty() {
            Err("none yet")
        } else {
            Ok(ev)
        }
    });
    let e = &events[0];
    assert_eq!(e["orig_dst"], format!("{}:{port}", ns.host_ip));
    assert_eq!(e["comm"], "curl");
    assert_eq!(e["capture"], "destination");
    assert!(e["cgroup"].as_str().unwrap_or_default().ends_with(&format!("{name}-{}", std::process::id())), "{e}");

    // A hard-coded key: blocked, never forwarded.
    let key = gateway_tests::keys::cursor_key();
    let (status, body) = curl(
        ns.command_in_cgroup(&gw, "curl"),
        &format!("http://{}:{port}/keyed", ns.host_ip),
        &[format!("Authorization: Bearer {key}")],
    );
    assert_eq!(status, 403, "the key must be blocked");
    assert!(body.contains("static_credential_blocked"), "{}", body.replace(&key, "<key>"));
    assert_eq!(server.saw(&key), 0, "the upstream never receives the key");
    assert!(!gw.log().contains(&key), "no key in clear in the log");

    // The job goes away: the listener closes (it would keep the namespace
    // alive) and the namespace leaves the served map.
    drop(holder);
    wait_for("the namespace is released", || {
        let list = namespaces(&gw);
        if list.iter().any(|n| n["cookie"].as_u64() == Some(cookie)) {
            Err(format!("{list:?}"))
        } else {
            Ok(())
        }
    });
    assert!(!ns.listens_on(gw.proxy_port), "no listener is left in the namespace");
    assert_eq!(gw.intercept_events("netns_released").len(), 1);
}

/// Python client for `unshare -n`: retries its first connect (a namespace
/// created after the gateway's last look is refused once, then served),
/// then sends a clean request and one carrying a key.
const UNSHARE_CLIENT: &str = r#"
import json, socket, sys, time
host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = {"errnos": []}
def connect():
    deadline = time.time() + 60
    while True:
        s = socket.socket()
        try:
            s.connect((host, port))
            return s
        except OSError as e:
            out["errnos"].append(e.errno)
            s.close()
            if time.time() > deadline:
                raise
            time.sleep(0.05)
def req(s, extra):
    s.sendall(f"GET /ns HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode())
    data = b""
    while True:
        c = s.recv(4096)
        if not c:
            break
        data += c
    return data.decode(errors="replace").split("\r\n")[0]
out["clean"] = req(connect(), "")
out["keyed"] = req(connect(), f"Authorization: Bearer {key}\r\n")
print(json.dumps(out))
"#;

/// `unshare -n`: a namespace with nothing but a loopback that is down. The
/// gateway serves it (brings the loopback up, listens there) as soon as it
/// learns of it: from the kernel's report of the `unshare` (or of the
/// process entering the cgroup), usually before the client connects, else
/// from the first connect, which is then refused (EPERM) and reported, and
/// the retry goes through the proxy. Either way nothing goes around the
/// gateway.
#[test]
fn unshare_namespace_is_served_after_its_first_refused_connect() {
    let port = unique_port();
    let server = HttpServer::start(format!("127.0.0.2:{port}").parse().expect("addr"));
    let mut opts = GatewayOptions::new("unshare", &[&format!("{{cidr: 127.0.0.2/32, ports: [{port}]}}")]);
    // Only the kernel (its reports of the unshare and of a refused connect)
    // can tell the gateway about this namespace: no scan.
    opts.intercept_yaml = "  netns_scan_interval: 1h\n".into();
    let gw = TestGateway::start(opts);
    let key = gateway_tests::keys::cursor_key();
    let out = gw
        .command_in_cgroup("unshare")
        .args(["-n", "python3", "-c", UNSHARE_CLIENT, "127.0.0.2", &port.to_string(), &key])
        .output()
        .expect("unshare");
    assert!(out.status.success(), "client failed: {}\n{}", String::from_utf8_lossy(&out.stderr), gw.log_errors());
    let r: Value = serde_json::from_slice(&out.stdout).expect("client output");
    let refused_first = r["errnos"] == serde_json::json!([libc::EPERM]);
    assert!(refused_first || r["errnos"] == serde_json::json!([]), "at most the first connect is refused: {r}");
    assert!(r["clean"].as_str().unwrap_or_default().contains(" 200 "), "{r}");
    assert!(r["keyed"].as_str().unwrap_or_default().contains(" 403 "), "{r}");
    assert_eq!(server.saw("GET /ns"), 1, "only the clean request reached the upstream");
    assert_eq!(server.saw(&key), 0);

    let refused = gw.intercept_events("refused_unserved_netns");
    assert_eq!(refused.len(), usize::from(refused_first), "a refusal is reported once: {refused:?}");
    let served = gw.intercept_events("netns_served");
    assert_eq!(served.len(), 1, "{served:?}");
    assert_eq!(served[0]["brought_up_loopback"], true, "{served:?}");
    let cookie = served[0]["netns"].as_u64().expect("cookie");
    if let Some(first) = refused.first() {
        assert_eq!(first["netns"].as_u64(), Some(cookie));
    }
    let events = gw.wait_events(2);
    assert!(events.iter().all(|e| e["netns"].as_u64() == Some(cookie)), "{events:#?}");
    assert_eq!(gw.status()["stats"]["denied_netns"], u64::from(refused_first));
}

/// With `bring_up_loopback: false`, the refusal says why.
#[test]
fn a_namespace_with_its_loopback_down_gets_a_clear_reason() {
    let port = unique_port();
    let mut opts = GatewayOptions::new("lodown", &[&format!("{{cidr: 127.0.0.2/32, ports: [{port}]}}")]);
    opts.intercept_yaml = "  netns_scan_interval: 1h\n  bring_up_loopback: false\n".into();
    let gw = TestGateway::start(opts);
    let out = gw
        .command_in_cgroup("unshare")
        .args(["-n", "python3", "-c"])
        .arg(format!(
            "import socket, time\nfor i in range(2):\n  s = socket.socket()\n  try: s.connect(('127.0.0.2', {port}))\n  except OSError as e: print(e.errno)\n  time.sleep(1)"
        ))
        .output()
        .expect("unshare");
    let errnos = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(errnos.lines().collect::<Vec<_>>(), ["1", "1"], "refused, not sent anywhere: {errnos}");
    let reason =
        wait_for("the reason is logged", || gw.intercept_events("netns_unserved").first().cloned().ok_or("not yet"));
    let text = reason["reason"].as_str().unwrap_or_default();
    assert!(text.contains("loopback") && text.contains("bring_up_loopback"), "{reason}");
}

/// Port capture: a connect to any address on a captured port goes to the
/// proxy (`capture: port`); the same port on an intercept-set address is
/// `destination`; other ports and loopback are left alone.
#[test]
fn port_capture_takes_any_address_on_captured_ports() {
    let ns = Netns::create();
    let port = unique_port();
    let other = unique_port();
    let by_port = HttpServer::start_in(&ns.name, format!("{}:{port}", ns.ns_ip).parse().expect("addr"));
    let by_dst = HttpServer::start_in(&ns.name, format!("{}:{port}", ns.ns_ip2).parse().expect("addr"));
    let direct = HttpServer::start_in(&ns.name, format!("{}:{other}", ns.ns_ip).parse().expect("addr"));
    let local = HttpServer::start(format!("127.0.0.9:{port}").parse().expect("addr"));
    let mut opts = GatewayOptions::new("byport", &[&format!("{{cidr: {}/32, ports: [{port}]}}", ns.ns_ip2)]);
    opts.intercept_yaml = format!("  capture_ports: [{port}]\n");
    let gw = TestGateway::start(opts);
    assert_eq!(gw.status()["capture_ports"], serde_json::json!([port]));

    for (server, path) in [(&by_port, "/by-port"), (&by_dst, "/by-dst"), (&direct, "/direct"), (&local, "/local")] {
        let (status, body) = curl(gw.command_in_cgroup("curl"), &format!("http://{}{path}", server.addr), &[]);
        assert_eq!(status, 200, "{path}: {body}\n{}", gw.log_errors());
        assert_eq!(server.saw(path), 1);
    }
    let events = gw.wait_events(2);
    let mut seen: Vec<(String, String)> = events
        .iter()
        .map(|e| (e["orig_dst"].as_str().unwrap_or("?").to_owned(), e["capture"].as_str().unwrap_or("?").to_owned()))
        .collect();
    seen.sort();
    let mut want =
        vec![(by_port.addr.to_string(), "port".to_owned()), (by_dst.addr.to_string(), "destination".to_owned())];
    want.sort();
    assert_eq!(seen, want, "only the captured port went to the proxy: {events:#?}");
    let stats = &gw.status()["stats"];
    assert_eq!(stats["redirected_port"], 1, "{stats}");
    assert_eq!(stats["redirected"], 2, "{stats}");
}

/// Where only the port is captured, the name a request gives decides
/// whether it is inspected, so the name must be one a job cannot blur: a
/// protected name at another address is inspected, a request naming no host
/// is inspected as protected, and a `Host` servers could read another way
/// (userinfo) is refused, never judged by a guess.
#[test]
fn a_port_captured_request_cannot_blur_its_host_to_skip_inspection() {
    let ns = Netns::create();
    let port = unique_port();
    let server = HttpServer::start_in(&ns.name, format!("{}:{port}", ns.ns_ip).parse().expect("addr"));
    let mut opts = GatewayOptions::new("blurhost", &["{cidr: 127.0.0.2/32, ports: [9]}"]);
    opts.intercept_yaml = format!("  capture_ports: [{port}]\n");
    opts.extra_yaml = "tls:\n  intercept: ['*.test.internal']\n".into();
    let gw = TestGateway::start(opts);
    let key = gateway_tests::keys::cursor_key();
    let auth = format!("Authorization: Bearer {key}");
    let url = format!("http://{}/blur", server.addr);
    let send = |headers: &[String], extra: &[&str]| {
        let mut cmd = gw.command_in_cgroup("curl");
        cmd.args(extra);
        curl(cmd, &url, headers)
    };
    // A protected name at an address only its port brought: inspected.
    let (status, body) = send(&["Host: api.test.internal".into(), auth.clone()], &[]);
    assert_eq!(status, 403, "a protected name is inspected at any address: {body}");
    let (status, body) = send(&["Host: api.test.internal".into()], &[]);
    assert_eq!(status, 200, "the same request without the key passes: {body}");
    // Userinfo in Host: servers disagree on which part is the host.
    let (status, body) = send(&["Host: x@api.test.internal".into(), auth.clone()], &[]);
    assert_eq!(status, 400, "an ambiguous host is refused: {body}");
    assert!(body.contains("host_refused"), "{body}");
    // HTTP/1.0 without a Host: no name, so inspected as protected.
    let (status, body) = send(&["Host:".into(), auth.clone()], &["--http1.0"]);
    assert_eq!(status, 403, "a request naming no host is inspected: {body}");
    assert_eq!(server.saw(&key), 0, "no key reached the server");
    assert_eq!(server.saw("/blur"), 1, "only the clean request did");
}

/// A QUIC server (aioquic) answering the handshake, and a client that tries
/// QUIC first and falls back to TCP, like browsers and HTTP/3 clients do.
const QUIC_SERVER: &str = r#"
import asyncio, sys
from aioquic.asyncio import serve
from aioquic.quic.configuration import QuicConfiguration
host, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
async def main():
    cfg = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
    cfg.load_cert_chain(cert, key)
    await serve(host, port, configuration=cfg)
    print("ready", flush=True)
    await asyncio.Future()
asyncio.run(main())
"#;

const QUIC_CLIENT: &str = r#"
import asyncio, json, socket, ssl, sys
from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration
host, port = sys.argv[1], int(sys.argv[2])
out = {}
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"probe", (host, port)); out["sendto"] = "sent"
except OSError as e:
    out["sendto"] = e.errno
try:
    u.sendto(b"dns?", (host, 53)); out["dns"] = "sent"
except OSError as e:
    out["dns"] = e.errno
async def quic():
    cfg = QuicConfiguration(is_client=True, alpn_protocols=["h3"], verify_mode=ssl.CERT_NONE)
    async with connect(host, port, configuration=cfg) as c:
        await c.ping()
try:
    asyncio.run(asyncio.wait_for(quic(), float(sys.argv[3])))
    out["quic"] = "ok"
except BaseException as e:
    out["quic"] = type(e).__name__
if out["quic"] != "ok":
    s = socket.create_connection((host, port), timeout=60)
    s.sendall(f"GET /fallback HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        c = s.recv(4096)
        if not c:
            break
        data += c
    out["tcp"] = data.decode(errors="replace").split("\r\n")[0]
print(json.dumps(out))
"#;

/// UDP to a captured destination is refused (so HTTP/3 cannot get around
/// the gateway); the client's TCP fallback is captured; DNS is untouched.
#[test]
fn quic_to_a_captured_port_is_refused_and_the_tcp_fallback_is_captured() {
    let aioquic = Command::new("python3").args(["-c", "import aioquic"]).status().expect("python3");
    assert!(aioquic.success(), "aioquic is missing: run `cargo xtask setup` (it installs it)");
    let ns = Netns::create();
    let port = unique_port();
    let tcp = HttpServer::start_in(&ns.name, format!("{}:{port}", ns.ns_ip).parse().expect("addr"));
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = rcgen::generate_simple_self_signed(vec!["quic.test".to_owned()]).expect("cert");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("key");
    let mut server = ns
        .command("python3")
        .args(["-c", QUIC_SERVER, &ns.ns_ip, &port.to_string()])
        .arg(&cert_path)
        .arg(&key_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("quic server");
    let _server_guard = KillOnDrop(server.id());
    let mut ready = [0u8; 5];
    server.stdout.as_mut().expect("stdout").read_exact(&mut ready).expect("quic server ready");
    // Reaped when the test ends (killed by the guard first).
    let _reaper = std::thread::spawn(move || server.wait());

    let mut opts = GatewayOptions::new("quic", &["{cidr: 127.0.0.2/32, ports: [9]}"]);
    opts.intercept_yaml = format!("  capture_ports: [{port}]\n");
    let gw = TestGateway::start(opts);
    let run = |mut cmd: Command, quic_timeout: &str| -> Value {
        let out = cmd.args(["-c", QUIC_CLIENT, &ns.ns_ip, &port.to_string(), quic_timeout]).output().expect("client");
        assert!(out.status.success(), "client: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("client json")
    };
    // Outside the intercepted cgroup, QUIC works: the refusal below is the
    // gateway's, not a broken setup.
    let control = run(Command::new("python3"), "30");
    assert_eq!(control["quic"], "ok", "{control}");

    let r = run(gw.command_in_cgroup("python3"), "3");
    assert_eq!(r["sendto"], libc::EPERM, "UDP to the captured port is refused: {r}");
    assert_eq!(r["dns"], "sent", "DNS is untouched: {r}");
    assert_ne!(r["quic"], "ok", "QUIC must not get through: {r}");
    assert!(r["tcp"].as_str().unwrap_or_default().contains(" 200 "), "the TCP fallback works: {r}");
    assert_eq!(tcp.saw("GET /fallback"), 1);
    let events = gw.wait_events(1);
    assert_eq!(events[0]["capture"], "port", "{events:#?}");
    assert_eq!(events[0]["orig_dst"], format!("{}:{port}", ns.ns_ip));
    let stats = &gw.status()["stats"];
    assert!(stats["denied_udp"].as_u64().unwrap_or(0) >= 2, "the probe and the QUIC handshake: {stats}");
    let reported =
        wait_for("the refusal is reported", || gw.intercept_events("refused_udp").first().cloned().ok_or("not yet"));
    assert_eq!(reported["orig_dst"], format!("{}:{port}", ns.ns_ip));
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0 as i32), Signal::SIGKILL);
    }
}

/// A root job that sets the gateway's real upstream mark on its socket is
/// still redirected, and reported; a restart picks a new mark.
#[test]
fn a_job_that_sets_the_upstream_mark_is_still_redirected() {
    let port = unique_port();
    let server = EchoServer::start(format!("127.0.0.2:{port}").parse().expect("addr")).expect("server");
    let mut gw =
        TestGateway::start(GatewayOptions::opaque("mark", &[&format!("{{cidr: 127.0.0.2/32, ports: [{port}]}}")]));
    let mark = gw.status()["upstream_mark"].as_u64().expect("mark");
    assert_ne!(mark, 0);
    let script = format!(
        // As bytes: a mark above 2^31 does not fit Python's C int.
        "import json, socket, struct\ns = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, struct.pack('I', {mark}))\n\
         s.connect(('127.0.0.2', {port}))\nlocal = s.getsockname()[1]\ns.sendall(b'hello')\n\
         print(json.dumps({{'local': local, 'reply': json.loads(s.makefile().readline())}}))"
    );
    let out = gw.command_in_cgroup("python3").args(["-c", &script]).output().expect("python");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_slice(&out.stdout).expect("json");
    let saw: SocketAddr = r["reply"]["peer"].as_str().unwrap_or_default().parse().expect("peer");
    assert_ne!(u64::from(saw.port()), r["local"].as_u64().unwrap_or(0), "the marked socket was redirected: {r}");
    assert_eq!(gw.wait_events(1).len(), 1);
    assert!(gw.status()["stats"]["spoofed_mark"].as_u64().unwrap_or(0) >= 1);
    let reported =
        wait_for("the mark is reported", || gw.intercept_events("spoofed_mark").first().cloned().ok_or("not yet"));
    assert_eq!(reported["orig_dst"], server.addr.to_string());

    gw.stop(Signal::SIGTERM);
    gw.spawn(false);
    assert_ne!(gw.status()["upstream_mark"].as_u64(), Some(mark), "a new mark at every start");
}

/// A namespace job fails closed while the gateway is stopped or crashed, its
/// listener goes with the gateway, and a new gateway serves it again.
#[test]
fn namespace_jobs_fail_closed_while_the_gateway_is_down() {
    let ns = Netns::create();
    let port = unique_port();
    let server = HttpServer::start(format!("{}:{port}", ns.host_ip).parse().expect("addr"));
    let mut gw = TestGateway::start(GatewayOptions::new(
        "nsclosed",
        &[&format!("{{cidr: {}/32, ports: [{port}]}}", ns.host_ip)],
    ));
    let mut holder_cmd = gw.command_in_cgroup("ip");
    holder_cmd.args(["netns", "exec", &ns.name]);
    let holder = Holder::start(holder_cmd);
    wait_served(&gw, holder.pid());
    let url = format!("http://{}:{port}/", ns.host_ip);
    assert_eq!(curl(ns.command_in_cgroup(&gw, "curl"), &url, &[]).0, 200);

    let connect_errno = |gw: &TestGateway| -> String {
        let script = format!(
            "import socket\ns = socket.socket()\ntry:\n  s.connect(('{}', {port})); print('connected')\nexcept OSError as e: print(e.errno)",
            ns.host_ip
        );
        let out = ns.command_in_cgroup(gw, "python3").args(["-c", &script]).output().expect("python");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    gw.stop(Signal::SIGTERM);
    assert_eq!(connect_errno(&gw), libc::EPERM.to_string(), "refused while stopped");
    assert!(!ns.listens_on(gw.proxy_port), "no listener left behind by the gateway");

    gw.spawn(false);
    wait_served(&gw, holder.pid());
    assert_eq!(curl(ns.command_in_cgroup(&gw, "curl"), &url, &[]).0, 200);
    gw.stop(Signal::SIGKILL);
    assert_eq!(connect_errno(&gw), libc::ECONNREFUSED.to_string(), "a crashed gateway's namespace refuses too");
    assert!(!ns.listens_on(gw.proxy_port));
    assert_eq!(server.saw("GET / "), 2, "only the proxied requests reached the server");
}

/// A job process that moves itself out of the intercepted cgroups (only a
/// privileged job can) is reported.
#[test]
fn a_job_leaving_the_intercepted_cgroup_is_reported() {
    let gw = TestGateway::start(GatewayOptions::new("leave", &["{cidr: 127.0.0.2/32, ports: [9]}"]));
    let outside_rel = format!("gateway-tests/outside-{}", std::process::id());
    let outside = cgroup2_mount().join(&outside_rel);
    std::fs::create_dir_all(&outside).expect("cgroup");
    let out = gw
        .command_in_cgroup("sh")
        .arg("-c")
        // It stays a moment where it moved to, as a job escaping to connect
        // would: a process gone before the gateway reads the alert cannot
        // be placed (see docs/threat-model.md).
        .arg(format!("sleep 0.5; echo $$ > {}/cgroup.procs; echo $$; sleep 2", outside.display()))
        .output()
        .expect("sh");
    // The process has exited; the kernel drops it from the cgroup shortly after.
    wait_for("the outside cgroup is removed", || std::fs::remove_dir(&outside));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pid: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().expect("pid");
    let reported = wait_for("the move is reported", || {
        gw.intercept_events("left_intercepted_cgroup")
            .first()
            .cloned()
            .ok_or_else(|| format!("not yet; gateway warnings and errors:\n{}", gw.log_errors()))
    });
    assert_eq!(reported["pid"].as_u64(), Some(pid), "{reported}");
    assert_eq!(reported["cgroup"], format!("/{outside_rel}"));
}
