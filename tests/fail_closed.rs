//! The one promise, end to end: nothing a job sends to a protected
//! destination gets there uninspected. Each way a key once slipped past the
//! gateway is tried here through the running gateway with real clients
//! (curl, Python sockets) against real servers, and each must be refused or
//! blocked, with nothing reaching the server; a clean request of the same
//! shape must still go through, so a gateway that refuses everything fails
//! this suite too.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use gateway_tests::{
    keys::{cursor_key, github_token, openai_key},
    unique_port,
    upstream::{TestPki, Upstream},
    wait_for, GatewayOptions, TestGateway,
};
use serde_json::{json, Value};

const HOST: &str = "api.test.internal";
/// The HTTPS server, a protected destination.
const TLS_IP: &str = "127.0.0.21";
/// A plain-HTTP server, a protected destination.
const PLAIN_IP: &str = "127.0.0.22";
/// A TLS server the policy opts out of inspection (`uninspectable: pass`).
const OPTED_OUT_IP: &str = "127.0.0.23";

const POLICY: &str = r#"version: 1
rules:
  - name: legacy-opaque
    match: { destination: { cidr: 127.0.0.23/32 } }
    action: allow
    uninspectable: pass
defaults:
  action: allow
  record: full
"#;

/// A plain HTTP/1.1 server that keeps every byte it was sent and answers
/// each request `200 ok` (bodies by `Content-Length` or chunked).
struct RawServer {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
    connections: Arc<AtomicUsize>,
}

impl RawServer {
    fn start(addr: SocketAddr) -> RawServer {
        let listener = TcpListener::bind(addr).expect("bind raw server");
        let received = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (log, count) = (received.clone(), connections.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let log = log.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 16384];
                    loop {
                        let n = match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        log.lock().expect("log").extend_from_slice(&chunk[..n]);
                        while let Some(len) = complete_request(&buf) {
                            buf.drain(..len);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok";
                            if stream.write_all(answer).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        RawServer { addr, received, connections }
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().expect("log")).into_owned()
    }
}

/// The length of the first complete request in `buf`, if there is one.
fn complete_request(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if head.contains("transfer-encoding: chunked") {
        let body = &buf[head_end..];
        // The last chunk, then trailers (possibly none), then CRLF.
        let end = body.windows(5).position(|w| w == b"0\r\n\r\n").map(|p| p + 5).or_else(|| {
            let last = body.windows(3).position(|w| w == b"\n0\r")?;
            body[last..].windows(4).position(|w| w == b"\r\n\r\n").map(|p| last + p + 4)
        })?;
        return Some(head_end + end);
    }
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()))
        .unwrap_or(0);
    (buf.len() >= head_end + length).then_some(head_end + length)
}

struct Scene {
    gw: TestGateway,
    tls: Upstream,
    tls_port: u16,
    plain: RawServer,
    opted_out: Upstream,
    opted_out_port: u16,
    gateway_ca: PathBuf,
    upstream_ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl Scene {
    fn start(name: &str) -> Scene {
        Scene::start_waiting(name, "30s")
    }

    /// A scene whose gateway waits `client_first` for a client's first
    /// bytes (then `client_silence_timeout`, 2 s, for anyone's).
    fn start_waiting(name: &str, client_first: &str) -> Scene {
        Scene::start_full(name, client_first, POLICY)
    }

    /// A scene under `policy` (its file's content).
    fn start_full(name: &str, client_first: &str, policy_yaml: &str) -> Scene {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let pki = TestPki::new(dir.path(), &[HOST]);
        let tls_port = unique_port();
        let tls = Upstream::start(format!("{TLS_IP}:{tls_port}").parse().expect("addr"), &pki);
        let plain_port = unique_port();
        let plain = RawServer::start(format!("{PLAIN_IP}:{plain_port}").parse().expect("addr"));
        let opted_out_port = unique_port();
        let opted_out = Upstream::start(format!("{OPTED_OUT_IP}:{opted_out_port}").parse().expect("addr"), &pki);
        let policy = dir.path().join("policy.yaml");
        std::fs::write(&policy, policy_yaml).expect("policy");
        let dests = [
            format!("{{cidr: {TLS_IP}/32, ports: [{tls_port}]}}"),
            format!("{{cidr: {PLAIN_IP}/32, ports: [{plain_port}]}}"),
            format!("{{cidr: {OPTED_OUT_IP}/32, ports: [{opted_out_port}]}}"),
        ];
        let dests: Vec<&str> = dests.iter().map(String::as_str).collect();
        let mut opts = GatewayOptions::new(name, &dests);
        opts.proxy_yaml = format!("  client_first_timeout: {client_first}\n  client_silence_timeout: 2s\n");
        opts.extra_yaml = format!(
            "tls:\n  intercept: ['*.test.internal']\n  extra_upstream_cas: [{ca}]\n\
             policy:\n  file: {policy}\n  watch: false\n",
            ca = pki.ca_path.display(),
            policy = policy.display(),
        );
        let gw = TestGateway::start(opts);
        let gateway_ca = gw.dir.path().join("gateway-ca.pem");
        let out = gw.cli(&["ca", "export", "--out", gateway_ca.to_str().expect("utf8")]);
        assert!(out.status.success(), "ca export: {}", String::from_utf8_lossy(&out.stderr));
        Scene {
            gw,
            tls,
            tls_port,
            plain,
            opted_out,
            opted_out_port,
            gateway_ca,
            upstream_ca: pki.ca_path.clone(),
            _dir: dir,
        }
    }

    /// curl in the intercepted cgroup to the HTTPS server, trusting only
    /// the gateway CA: `(status, body)`.
    fn curl(&self, args: &[&str]) -> (u16, Value) {
        let out = self
            .gw
            .command_in_cgroup("curl")
            .args(["-sS", "--resolve", &format!("{HOST}:{}:{TLS_IP}", self.tls_port), "--cacert"])
            .arg(&self.gateway_ca)
            .args(gateway_tests::CURL_STATUS)
            .args(args)
            .output()
            .expect("curl");
        let (code, body) = gateway_tests::curl_reply(&out.stdout);
        (code, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    fn url(&self, path: &str) -> String {
        format!("https://{HOST}:{}{path}", self.tls_port)
    }

    /// Sends raw bytes from the intercepted cgroup (over TLS with the given
    /// SNI when `tls` is set) and returns what came back or the error.
    fn raw(&self, spec: Value) -> Value {
        let out =
            self.gw.command_in_cgroup("python3").arg("-c").arg(PY_RAW).arg(spec.to_string()).output().expect("py");
        assert!(out.status.success(), "python raw client: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("python output")
    }

    fn plain_raw(&self, request: &[u8]) -> Value {
        self.raw(json!({ "host": PLAIN_IP, "port": self.plain.addr.port(), "data": b64(request) }))
    }

    fn findings(&self) -> Vec<Value> {
        let out = self.gw.cli(&["findings", "list", "--json"]);
        assert!(out.status.success(), "findings list: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).expect("findings").as_array().cloned().unwrap_or_default()
    }

    fn tls_received(&self, path: &str) -> usize {
        self.tls.requests().iter().filter(|r| r.target.starts_with(path)).count()
    }
}

fn b64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// `{"host", "port", "data": base64, "tls": {"sni": str|null, "cafile"}?,
/// "silent": secs?}` → `{"ok", "response", "error", "closed_after"}`.
const PY_RAW: &str = r#"
import base64, json, socket, ssl, sys, time
spec = json.loads(sys.argv[1])
out = {"ok": False, "response": "", "error": None, "closed_after": None}
try:
    s = socket.create_connection((spec["host"], spec["port"]), timeout=30)
    t = spec.get("tls")
    if t is not None:
        ctx = ssl.create_default_context(cafile=t["cafile"])
        ctx.check_hostname = False
        s = ctx.wrap_socket(s, server_hostname=t.get("sni"))
    start = time.monotonic()
    if spec.get("data"):
        s.sendall(base64.b64decode(spec["data"]))
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
        if spec.get("one_response") and b"\r\n\r\n" in got:
            head, _, body = got.partition(b"\r\n\r\n")
            n = [int(l.split(b":")[1]) for l in head.lower().split(b"\r\n") if l.startswith(b"content-length:")]
            if n and len(body) >= n[0]:
                break
    out["closed_after"] = time.monotonic() - start
    out["ok"] = True
    out["response"] = got.decode("latin-1")
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"#;

fn status_of(response: &Value) -> u16 {
    let text = response["response"].as_str().unwrap_or("");
    text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// Body encodings: an unknown or broken content coding is refused (415)
/// whether or not it hides a key; a key under gzip or next to a word
/// character, or inside a protobuf field, is found; clean bodies of each
/// shape go through.
#[test]
fn bodies_the_gateway_cannot_decode_are_refused_and_keys_in_every_shape_are_found() {
    gateway_tests::require_root();
    let scene = Scene::start("fc-bodies");
    let dir = tempfile::tempdir().expect("tempdir");
    let key = cursor_key();
    let file = |name: &str, data: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, data).expect("write");
        format!("@{}", p.display())
    };
    let gzip = |data: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).expect("gzip");
        e.finish().expect("gzip")
    };
    let post = |path: &str, headers: &[&str], body: &str| {
        let mut args = vec!["-X", "POST", "--data-binary", body];
        for h in headers {
            args.extend(["-H", h]);
        }
        let url = scene.url(path);
        args.push(&url);
        scene.curl(&args)
    };

    // Unknown coding, with and without a key: refused, never forwarded.
    let clean = file("clean.json", br#"{"ok": true}"#);
    let keyed = file("keyed.json", format!(r#"{{"token": "{key}"}}"#).as_bytes());
    for (body, what) in [(&keyed, "a key"), (&clean, "nothing")] {
        let (code, json) = post("/enc/foo", &["Content-Encoding: foo", "Content-Type: application/json"], body);
        assert_eq!(code, 415, "Content-Encoding: foo with {what}: {json}");
        assert_eq!(json["error"], "uninspectable", "{json}");
    }
    // `gzip` over bytes that are not gzip, and a gzip member followed by raw bytes.
    let not_gzip = file("notgzip", format!(r#"{{"token": "{key}"}}"#).as_bytes());
    let (code, json) = post("/enc/notgzip", &["Content-Encoding: gzip"], &not_gzip);
    assert_eq!(code, 415, "gzip header over plain bytes: {json}");
    let mut trailing = gzip(br#"{"a": 1}"#);
    trailing.extend_from_slice(format!(r#" {{"token": "{key}"}}"#).as_bytes());
    let trailing = file("trailing", &trailing);
    let (code, json) = post("/enc/trailing", &["Content-Encoding: gzip"], &trailing);
    assert!(code == 415 || code == 403, "gzip then raw bytes must not pass: {code} {json}");
    assert_eq!(scene.tls_received("/enc/"), 0, "nothing undecodable reached the server");

    // A key inside gzip, and the same shape clean.
    let gz_keyed = file("gz-keyed", &gzip(format!(r#"{{"token": "{key}"}}"#).as_bytes()));
    let (code, json) = post("/gz/keyed", &["Content-Encoding: gzip", "Content-Type: application/json"], &gz_keyed);
    assert_eq!(code, 403, "a key under gzip: {json}");
    let gz_clean = file("gz-clean", &gzip(br#"{"ok": true}"#));
    let (code, json) = post("/gz/clean", &["Content-Encoding: gzip", "Content-Type: application/json"], &gz_clean);
    assert_eq!(code, 200, "a clean gzip body passes: {json}");

    // Next to a word character, in text/plain.
    let glued = file("glued", format!("x{key}A").as_bytes());
    let (code, json) = post("/glued", &["Content-Type: text/plain"], &glued);
    assert_eq!(code, 403, "a key between word characters: {json}");

    // In a protobuf string field (length byte 0x44 = `D`), gRPC-framed.
    let mut message = vec![0x0a, key.len() as u8];
    message.extend_from_slice(key.as_bytes());
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let proto = file("proto", &frame);
    // Refused as gRPC clients read it: trailers-only, PERMISSION_DENIED.
    let out = scene
        .gw
        .command_in_cgroup("curl")
        .args(["-sS", "--http2", "--resolve", &format!("{HOST}:{}:{TLS_IP}", scene.tls_port), "--cacert"])
        .arg(&scene.gateway_ca)
        .args(["-D", "-", "-o", "/dev/null", "-X", "POST", "--data-binary", &proto])
        .args(["-H", "Content-Type: application/grpc+proto", "-H", "TE: trailers", &scene.url("/pkg.Svc/Call")])
        .output()
        .expect("curl");
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(head.contains("grpc-status: 7"), "a key in a gRPC message must not pass: {head}");
    assert!(head.contains("grpc-message: ") && head.contains("f-"), "grpc-message names the finding: {head}");
    assert_eq!(scene.tls_received("/pkg.Svc/Call"), 0, "the keyed gRPC call never reached the server");
    let mut clean_msg = vec![0x0a, 5];
    clean_msg.extend_from_slice(b"hello");
    let mut clean_frame = vec![0u8];
    clean_frame.extend_from_slice(&(clean_msg.len() as u32).to_be_bytes());
    clean_frame.extend_from_slice(&clean_msg);
    let clean_proto = file("clean-proto", &clean_frame);
    let (code, _) = post("/pkg.Svc/Clean", &["Content-Type: application/grpc+proto", "TE: trailers"], &clean_proto);
    assert_eq!(code, 200, "a clean gRPC message passes");

    assert!(!scene.tls.requests().iter().any(|r| String::from_utf8_lossy(&r.body).contains(&key)));
    assert!(!scene.gw.log().contains(&key), "the key is never logged in clear");
}

/// Every key of a refused request becomes a finding, not only the first,
/// and the refusal names them all (fingerprints and previews, never keys).
#[test]
fn every_key_of_a_blocked_request_is_recorded() {
    gateway_tests::require_root();
    let scene = Scene::start("fc-allkeys");
    let keys = [cursor_key(), openai_key(), github_token()];
    let body = format!(r#"{{"a": "{}", "b": "{}", "c": "{}"}}"#, keys[0], keys[1], keys[2]);
    let (code, json) = scene.curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &body,
        &scene.url("/three"),
    ]);
    assert_eq!(code, 403, "{json}");
    let listed = json["findings"].as_array().map_or(0, Vec::len);
    assert_eq!(listed, 3, "the refusal names every key: {json}");
    let findings = wait_for("three findings are stored", || {
        let f = scene.findings();
        if f.len() >= 3 {
            Ok(f)
        } else {
            Err(format!("{} findings so far", f.len()))
        }
    });
    let text = serde_json::to_string(&findings).expect("json");
    for key in &keys {
        assert!(!text.contains(key.as_str()), "no key in clear in findings");
        assert!(!json.to_string().contains(key.as_str()), "no key in clear in the refusal");
    }
    assert_eq!(scene.tls_received("/three"), 0);
    // The same shape, clean, passes.
    let (code, _) = scene.curl(&[
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        r#"{"a": 1}"#,
        &scene.url("/three-clean"),
    ]);
    assert_eq!(code, 200);
}

/// Plain HTTP in any form a server accepts is parsed and inspected: custom
/// and lower-case methods, a leading CRLF, request trailers. Upgrades the
/// gateway cannot follow are refused; h2c is declined (the request goes on
/// as HTTP/1.1, inspected).
#[test]
fn plain_http_in_every_form_is_inspected_and_unfollowable_upgrades_are_refused() {
    gateway_tests::require_root();
    let scene = Scene::start("fc-plain");
    let key = cursor_key();
    let host = format!("Host: {PLAIN_IP}:{}\r\n", scene.plain.addr.port());
    let req = |start: &str, extra: &str| format!("{start}{host}{extra}Connection: close\r\n\r\n").into_bytes();

    for (what, start) in [
        ("PROPFIND", "PROPFIND /dav HTTP/1.1\r\n"),
        ("FOOBAR", "FOOBAR /custom HTTP/1.1\r\n"),
        ("lower-case get", "get /lower HTTP/1.1\r\n"),
        ("a leading CRLF", "\r\nGET /crlf HTTP/1.1\r\n"),
    ] {
        let keyed = scene.plain_raw(&req(start, &format!("Authorization: Bearer {key}\r\n")));
        assert_eq!(status_of(&keyed), 403, "{what} with a key: {keyed}");
        let clean = scene.plain_raw(&req(start, ""));
        assert_eq!(status_of(&clean), 200, "{what} without a key goes through: {clean}");
    }
    assert!(scene.plain.received().contains("PROPFIND /dav"), "the clean custom method reached the server");

    // Request trailers are inspected.
    let chunked = |trailer: &str| {
        format!(
            "POST /trailers HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\nTrailer: X-Checksum\r\nConnection: close\r\n\r\n\
             5\r\nhello\r\n0\r\nX-Checksum: {trailer}\r\n\r\n"
        )
        .into_bytes()
    };
    let keyed = scene.plain_raw(&chunked(&key));
    assert_eq!(status_of(&keyed), 403, "a key in a request trailer: {keyed}");
    let clean = scene.plain_raw(&chunked("nothing-secret"));
    assert_eq!(status_of(&clean), 200, "a clean trailer passes: {clean}");

    // A custom upgrade is refused; h2c is declined and the request inspected.
    let custom = scene.plain_raw(&req("GET /up HTTP/1.1\r\n", "Upgrade: foo/1\r\nConnection: upgrade\r\n"));
    assert_eq!(status_of(&custom), 403, "an upgrade to an unknown protocol: {custom}");
    assert!(!scene.plain.received().contains("GET /up "), "the refused upgrade never reached the server");
    let h2c = req(
        "GET /h2c HTTP/1.1\r\n",
        "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings\r\n",
    );
    let declined = scene.plain_raw(&h2c);
    assert_eq!(status_of(&declined), 200, "h2c is declined, the request served as HTTP/1.1: {declined}");
    let seen = scene.plain.received().to_ascii_lowercase();
    let h2c_request = &seen[seen.find("get /h2c").expect("h2c request forwarded")..];
    let h2c_head = &h2c_request[..h2c_request.find("\r\n\r\n").expect("head")];
    assert!(!h2c_head.contains("upgrade: h2c"), "the upgrade was not forwarded: {h2c_head}");

    assert!(!scene.plain.received().contains(&key), "no key reached the server");
    assert!(!scene.gw.log().contains(&key), "no key in the log");
}

/// TLS the gateway would not terminate (no SNI, an unknown name) is
/// refused at a protected destination, with a TLS alert; the same
/// handshake to a destination the policy opts out passes end to end.
#[test]
fn tls_without_an_interceptable_name_is_refused_unless_opted_out() {
    gateway_tests::require_root();
    let scene = Scene::start("fc-tls");
    let upstream_ca = scene.upstream_ca.to_str().expect("utf8").to_owned();
    let gateway_ca = scene.gateway_ca.to_str().expect("utf8").to_owned();
    let get = |ip: &str, port: u16, sni: Value, ca: &str| {
        let data = b64(format!("GET /tls HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes());
        scene.raw(json!({ "host": ip, "port": port, "data": data, "tls": { "sni": sni, "cafile": ca } }))
    };
    for sni in [Value::Null, json!("unknown.example.org")] {
        let refused = get(TLS_IP, scene.tls_port, sni.clone(), &upstream_ca);
        let error = refused["error"].as_str().unwrap_or("");
        assert!(
            !refused["ok"].as_bool().unwrap_or(false),
            "TLS with SNI {sni} passed a protected destination: {refused}"
        );
        assert!(error.contains("ACCESS_DENIED") || error.contains("access denied"), "refused with an alert: {refused}");
        let opted_out = get(OPTED_OUT_IP, scene.opted_out_port, sni.clone(), &upstream_ca);
        assert_eq!(status_of(&opted_out), 200, "SNI {sni} to an opted-out destination passes end to end: {opted_out}");
    }
    assert_eq!(scene.tls_received("/tls"), 0, "nothing reached the protected server");
    assert!(scene.opted_out.requests().iter().any(|r| r.target == "/tls"));
    // The interceptable name still works through the gateway.
    let intercepted = get(TLS_IP, scene.tls_port, json!(HOST), &gateway_ca);
    assert_eq!(status_of(&intercepted), 200, "{intercepted}");
    let refusals: Vec<Value> = scene.gw.connection_events().into_iter().filter(|e| e["outcome"] == "blocked").collect();
    assert!(refusals.len() >= 2, "each refusal is an event: {refusals:?}");
}

/// A client that never speaks is not given an upstream connection and is
/// closed after `client_silence_timeout`.
#[test]
fn a_silent_client_never_makes_the_gateway_dial_upstream() {
    gateway_tests::require_root();
    let scene = Scene::start_waiting("fc-silent", "1s");
    let before = scene.plain.connections.load(Ordering::SeqCst);
    let started = Instant::now();
    let silent = scene.raw(json!({ "host": PLAIN_IP, "port": scene.plain.addr.port() }));
    assert!(silent["ok"].as_bool().unwrap_or(false), "the gateway closes the connection: {silent}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(20),
        "closed after the 1s + 2s timeouts: {waited:?}"
    );
    assert_eq!(scene.plain.connections.load(Ordering::SeqCst), before, "no upstream connection for a silent client");
    let clean = scene.plain_raw(b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(status_of(&clean), 200, "a client that speaks is served: {clean}");
}

/// A WebSocket server: answers any upgrade with 101, keeps the unmasked
/// payload of every client frame, and acknowledges each with a text frame.
struct WsServer {
    addr: SocketAddr,
    payloads: Arc<Mutex<Vec<String>>>,
}

impl WsServer {
    fn start(addr: SocketAddr) -> WsServer {
        let listener = TcpListener::bind(addr).expect("bind ws server");
        let payloads = Arc::new(Mutex::new(Vec::new()));
        let log = payloads.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let log = log.clone();
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read_exact(&mut byte).is_err() {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let answer = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
                    if s.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                    loop {
                        let mut h = [0u8; 2];
                        if s.read_exact(&mut h).is_err() {
                            return;
                        }
                        let len = match h[1] & 0x7f {
                            126 => {
                                let mut l = [0u8; 2];
                                if s.read_exact(&mut l).is_err() {
                                    return;
                                }
                                usize::from(u16::from_be_bytes(l))
                            }
                            127 => return,
                            n => usize::from(n),
                        };
                        let mut mask = [0u8; 4];
                        let mut payload = vec![0u8; len];
                        if s.read_exact(&mut mask).is_err() || s.read_exact(&mut payload).is_err() {
                            return;
                        }
                        let plain: Vec<u8> = payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect();
                        log.lock().expect("log").push(String::from_utf8_lossy(&plain).into_owned());
                        if s.write_all(&[0x81, 3, b'a', b'c', b'k']).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        WsServer { addr, payloads }
    }
}

/// A masked client text frame.
fn ws_text(text: &str) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut f = vec![0x81];
    match text.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// WebSocket sessions are followed: each client message is decoded and
/// scanned before it goes on. A clean session works; a message with a key
/// ends the session with a close frame and never reaches the server.
#[test]
fn websocket_messages_are_inspected_and_a_keyed_one_closes_the_session() {
    gateway_tests::require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let port = unique_port();
    let server = WsServer::start(format!("127.0.0.24:{port}").parse().expect("addr"));
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "version: 1\nrules: []\ndefaults:\n  action: allow\n").expect("policy");
    let mut opts = GatewayOptions::new("fc-ws", &[&format!("{{cidr: 127.0.0.24/32, ports: [{port}]}}")]);
    opts.proxy_yaml = "  client_first_timeout: 30s\n".into();
    opts.extra_yaml = format!("policy:\n  file: {}\n  watch: false\n", policy.display());
    let gw = TestGateway::start(opts);
    let handshake = format!(
        "GET /socket HTTP/1.1\r\nHost: 127.0.0.24:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let session = |messages: &[String]| {
        let mut data = handshake.clone().into_bytes();
        for m in messages {
            data.extend(ws_text(m));
        }
        let spec = json!({ "host": "127.0.0.24", "port": server.addr.port(), "data": b64(&data) });
        // On stdin: a large message does not fit an argument list.
        let mut child = gw
            .command_in_cgroup("python3")
            .args(["-c", PY_WS])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("py");
        child.stdin.take().expect("stdin").write_all(spec.to_string().as_bytes()).expect("spec");
        let out = child.wait_with_output().expect("py");
        assert!(out.status.success(), "python ws client: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).expect("python output")
    };
    let clean = session(&["hello".into(), "world".into()]);
    assert!(clean["response"].as_str().unwrap_or("").starts_with("HTTP/1.1 101"), "{clean}");
    assert_eq!(clean["acks"], 2, "both clean messages reached the server: {clean}");
    let key = cursor_key();
    let keyed = session(&["first".into(), format!(r#"{{"token": "x{key}"}}"#), "after".into()]);
    assert_eq!(keyed["closed_by_gateway"], true, "a close frame ends the session: {keyed}");
    let payloads = server.payloads.lock().expect("payloads").clone();
    // "first" may or may not have gone on: it can share a read with the
    // keyed message, and a refusal releases nothing of what it saw.
    assert!(!payloads.iter().any(|p| p.contains(&key) || p == "after"), "nothing from the key on: {payloads:?}");
    assert!(!gw.log().contains(&key), "no key in the log");
    // A message larger than the gateway holds to judge whole (1 MiB by
    // default) is not forwarded unjudged: the session is closed.
    let big = session(&["x".repeat(2 << 20)]);
    assert_eq!(big["closed_by_gateway"], true, "an oversize message closes the session: {big}");
    assert!(server.payloads.lock().expect("payloads").iter().all(|p| p.len() < 1 << 20), "it never reached the server");
}

/// Sends the handshake and frames, reads until the connection closes:
/// `{"response": head, "acks": n, "closed_by_gateway": bool}`.
const PY_WS: &str = r#"
import base64, json, socket, sys
spec = json.loads(sys.stdin.read())
s = socket.create_connection((spec["host"], spec["port"]), timeout=15)
s.sendall(base64.b64decode(spec["data"]))
got = b""
try:
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
        if got.count(b"\x81\x03ack") >= 2 and b"\x88" not in got.partition(b"\r\n\r\n")[2]:
            break
except socket.timeout:
    pass
head, _, frames = got.partition(b"\r\n\r\n")
print(json.dumps({
    "response": head.decode("latin-1"),
    "acks": frames.count(b"\x81\x03ack"),
    "closed_by_gateway": b"\x88" in frames and b"\x03\xf0" in frames,
}))
"#;

/// `uninspectable: scan_raw` lets a body the decoders give up on through
/// only as raw bytes scanned with every rule, from its first undecodable
/// byte on: a key right there is still found.
#[test]
fn scan_raw_scans_the_very_bytes_the_decoders_gave_up_on() {
    gateway_tests::require_root();
    let policy = format!(
        "version: 1\nrules:\n  - name: raw-ok\n    match: {{ destination: {{ cidr: {TLS_IP}/32 }} }}\n    \
         action: allow\n    uninspectable: scan_raw\ndefaults:\n  action: allow\n"
    );
    let scene = Scene::start_full("fc-scanraw", "30s", &policy);
    let key = cursor_key();
    let post = |path: &str, body: &str| {
        let url = scene.url(path);
        scene.curl(&["-X", "POST", "-H", "Content-Encoding: gzip", "--data-binary", body, &url])
    };
    let (code, json) = post("/raw/keyed", &format!(r#"{{"token": "{key}"}}"#));
    assert_eq!(code, 403, "a key in bytes that are not gzip is found raw: {json}");
    let (code, json) = post("/raw/clean", r#"{"ok": true}"#);
    assert_eq!(code, 200, "clean undecodable bytes pass where the policy says scan_raw: {json}");
    assert_eq!(scene.tls_received("/raw/keyed"), 0);
    assert_eq!(scene.tls_received("/raw/clean"), 1);
}
