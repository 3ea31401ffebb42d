//! TLS interception, HTTP/1.1 and HTTP/2 proxying and static-key blocking,
//! end to end: real eBPF redirect, real gateway, real curl / Python / git
//! clients in the intercepted cgroup, a real HTTPS upstream that trusts
//! nothing but its own CA, and the findings database read back.

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Output},
    time::{Duration, Instant},
};

use gateway_tests::{
    keys::{self, random},
    unique_port,
    upstream::{TestPki, Upstream},
    wait_for, GatewayOptions, TestGateway,
};
use serde_json::Value;

const HOST: &str = "api.test.internal";
const PASS_HOST: &str = "pass.test.internal";
const UPSTREAM_IP: &str = "127.0.0.7";

/// Fresh, realistic fake keys for one test.
struct Keys {
    cursor: String,
    openai: String,
    github: String,
}

impl Keys {
    fn new() -> Keys {
        Keys { cursor: keys::cursor_key(), openai: keys::openai_key(), github: keys::github_token() }
    }

    fn all(&self) -> [&str; 3] {
        [&self.cursor, &self.openai, &self.github]
    }
}

struct Scene {
    gw: TestGateway,
    upstream: Upstream,
    port: u16,
    gateway_ca: PathBuf,
    upstream_ca: PathBuf,
    pki_dir: tempfile::TempDir,
}

impl Scene {
    fn start(name: &str) -> Scene {
        Scene::start_with(name, |_| String::new())
    }

    /// A scene whose gateway configuration gets extra YAML, built from the
    /// scene's directory (for files the configuration points at).
    fn start_with(name: &str, extra: impl FnOnce(&std::path::Path) -> String) -> Scene {
        // Every client here speaks first (TLS or HTTP). One that the loaded
        // machine holds up for longer than the default 500 ms would make
        // the gateway dial upstream to see who speaks first: still
        // inspected, but tests counting upstream connections would see it.
        Scene::start_full(name, Duration::from_secs(30), extra)
    }

    fn start_full(name: &str, client_first_timeout: Duration, extra: impl FnOnce(&std::path::Path) -> String) -> Scene {
        let pki_dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(pki_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let pki = TestPki::new(pki_dir.path(), &[HOST, PASS_HOST]);
        let port = unique_port();
        let upstream = Upstream::start(format!("{UPSTREAM_IP}:{port}").parse().expect("addr"), &pki);
        let mut opts = GatewayOptions::new(name, &[&format!("{{cidr: {UPSTREAM_IP}/32, ports: [{port}]}}")]);
        opts.proxy_yaml = format!("  client_first_timeout: {}ms\n", client_first_timeout.as_millis());
        opts.extra_yaml = format!(
            "tls:\n  intercept: ['*.test.internal']\n  passthrough: ['{PASS_HOST}']\n  extra_upstream_cas: [{}]\n{}",
            pki.ca_path.display(),
            extra(pki_dir.path())
        );
        let gw = TestGateway::start(opts);
        let gateway_ca = gw.dir.path().join("gateway-ca.pem");
        let out = gw.cli(&["ca", "export", "--out", gateway_ca.to_str().expect("utf8")]);
        assert!(out.status.success(), "ca export: {}", String::from_utf8_lossy(&out.stderr));
        Scene { gw, upstream, port, gateway_ca, upstream_ca: pki.ca_path.clone(), pki_dir }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{HOST}:{}{path}", self.port)
    }

    fn resolve(&self, host: &str) -> String {
        format!("{host}:{}:{UPSTREAM_IP}", self.port)
    }

    /// curl in the intercepted cgroup, trusting only the gateway CA.
    fn curl(&self, version: &str, args: &[&str]) -> (u16, String) {
        let out = self
            .gw
            .command_in_cgroup("curl")
            .args(["-sS", version, "--resolve", &self.resolve(HOST), "--cacert"])
            .arg(&self.gateway_ca)
            .args(gateway_tests::CURL_STATUS)
            .args(args)
            .output()
            .expect("curl");
        gateway_tests::curl_reply(&out.stdout)
    }

    /// Python's standard library client in the intercepted cgroup.
    fn python(&self, spec: Value) -> Value {
        let out =
            self.gw.command_in_cgroup("python3").arg("-c").arg(PY_HTTP).arg(spec.to_string()).output().expect("python");
        assert!(out.status.success(), "python client failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("python output")
    }

    fn findings(&self) -> Vec<Value> {
        let out = self.gw.cli(&["findings", "list", "--json"]);
        assert!(out.status.success(), "findings list: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("findings json");
        v.as_array().cloned().unwrap_or_default()
    }

    /// Every place a key could leak to: the gateway's log, its state
    /// directory (database, WAL), and whatever the test printed.
    fn assert_no_key_in_clear(&self, keys: &[&str], extra: &[&str]) {
        let log = self.gw.log();
        let mut state = Vec::new();
        for entry in walk(&self.gw.dir.path().join("state")) {
            state.push((entry.clone(), std::fs::read(&entry).unwrap_or_default()));
        }
        for key in keys {
            // Compare by presence only; never print the key itself.
            assert!(!log.contains(key), "a key appears in clear in the gateway log");
            for (path, bytes) in &state {
                assert!(
                    !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
                    "a key appears in clear in {}",
                    path.display()
                );
            }
            for text in extra {
                assert!(!text.contains(key), "a key appears in clear in test output");
            }
        }
    }

    fn received_with(&self, needle: &str) -> usize {
        self.upstream
            .requests()
            .iter()
            .filter(|r| {
                r.target.contains(needle)
                    || r.headers.iter().any(|(_, v)| v.contains(needle))
                    || String::from_utf8_lossy(&r.body).contains(needle)
            })
            .count()
    }
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Python client: one JSON spec argument, one JSON result line.
const PY_HTTP: &str = r#"
import gzip, http.client, json, socket, ssl, sys, time
spec = json.loads(sys.argv[1])
real = socket.create_connection
def create_connection(address, *a, **kw):
    host, port = address
    s = real((spec["ip"], port), *a, **kw)
    # A client that says nothing for a while before its TLS hello.
    time.sleep(spec.get("pause_after_connect", 0))
    return s
socket.create_connection = create_connection
ctx = ssl.create_default_context(cafile=spec["cafile"])
conn = http.client.HTTPSConnection(spec["host"], spec["port"], context=ctx, timeout=30)
headers = spec.get("headers", {})
body = spec.get("body")
if body is not None:
    body = body.encode()
    if spec.get("gzip"):
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
chunks = spec.get("chunks")
out = {}
try:
    if chunks is not None:
        def gen():
            for c in chunks:
                yield c.encode()
                time.sleep(0.2)
        conn.request(spec.get("method", "POST"), spec["path"], body=gen(), headers=headers, encode_chunked=True)
    else:
        conn.request(spec.get("method", "GET"), spec["path"], body=body, headers=headers)
    resp = conn.getresponse()
    t0 = time.time()
    arrivals = []
    data = b""
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        arrivals.append(time.time() - t0)
        data += chunk
    out = {"status": resp.status, "body": data.decode(errors="replace"), "arrivals": arrivals, "t0": t0}
except Exception as e:
    out = {"error": repr(e)}
print(json.dumps(out))
"#;

fn py_spec(scene: &Scene, extra: Value) -> Value {
    let mut spec = serde_json::json!({
        "host": HOST, "port": scene.port, "ip": UPSTREAM_IP,
        "cafile": scene.gateway_ca.to_str().expect("utf8"),
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    spec
}

fn assert_blocked(status: u16, body: &str, rule: &str) -> String {
    assert_eq!(status, 403, "expected a block, got {status}: {body}");
    let v: Value = serde_json::from_str(body).expect("403 body is JSON");
    assert_eq!(v["error"], "static_credential_blocked");
    let finding = &v["findings"][0];
    assert_eq!(finding["rule"], rule, "{v}");
    let id = finding["id"].as_str().expect("finding id in the response").to_owned();
    assert!(id.starts_with("F-"), "{id}");
    id
}

#[test]
fn curl_http1_and_http2_block_keys_in_headers_basic_auth_and_query() {
    let scene = Scene::start("curl");
    let keys = Keys::new();
    let mut outputs = Vec::new();
    for version in ["--http1.1", "--http2"] {
        let (status, body) =
            scene.curl(version, &["-H", &format!("Authorization: Bearer {}", keys.cursor), &scene.url("/v1/chat")]);
        assert_blocked(status, &body, "cursor-api-key");
        outputs.push(body);
        // Cursor's APIs take the key as the Basic user name.
        let (status, body) = scene.curl(version, &["-u", &format!("{}:", keys.cursor), &scene.url("/v1/models")]);
        assert_blocked(status, &body, "cursor-api-key");
        outputs.push(body);
        let (status, body) = scene.curl(version, &[&scene.url(&format!("/v1/search?api_key={}", keys.openai))]);
        assert_blocked(status, &body, "openai-project-key");
        outputs.push(body);
    }
    for key in keys.all() {
        assert_eq!(scene.received_with(key), 0, "the upstream must never receive a blocked request");
    }
    assert!(scene.upstream.requests().is_empty(), "nothing at all reached upstream");

    // A clean request goes through unchanged, on both protocols.
    for (version, want) in [("--http1.1", "HTTP/1.1"), ("--http2", "HTTP/2.0")] {
        let (status, body) = scene.curl(
            version,
            &[
                "-X",
                "PUT",
                "-H",
                "X-Test: clean",
                "-H",
                "Content-Type: text/plain",
                "--data-binary",
                "hello upstream",
                &scene.url("/clean?x=1"),
            ],
        );
        assert_eq!(status, 200, "{body}");
        let received = scene.upstream.requests();
        let r = received.last().expect("the clean request arrived");
        assert_eq!(r.method, "PUT");
        assert_eq!(r.target, "/clean?x=1");
        assert_eq!(r.body, b"hello upstream");
        assert_eq!(r.version, want, "the upstream protocol mirrors the client's ALPN");
        assert!(r.headers.contains(&("x-test".into(), "clean".into())), "{:?}", r.headers);
        assert!(r.headers.contains(&("content-type".into(), "text/plain".into())));
    }

    let findings = scene.findings();
    let cursor: Vec<&Value> = findings.iter().filter(|f| f["rule_id"] == "cursor-api-key").collect();
    assert!(!cursor.is_empty(), "findings recorded: {findings:#?}");
    let f = cursor[0];
    assert_eq!(f["dest_host"], HOST);
    assert_eq!(f["dest_port"], scene.port);
    assert_eq!(f["action"], "block");
    assert_eq!(f["status"], "open");
    assert!(f["process"]["exe"].as_str().unwrap_or_default().ends_with("curl"), "{f}");
    assert!(f["count"].as_u64().unwrap_or(0) >= 2, "deduplicated with a count: {f}");
    assert!(f["fingerprint"].as_str().unwrap_or_default().starts_with("hmac-sha256:"));
    let preview = f["preview"].as_str().unwrap_or_default();
    assert!(preview.len() < 16 && preview.starts_with("key_"), "redacted preview only");
    let refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
    scene.assert_no_key_in_clear(&keys.all(), &refs);
}

#[test]
fn python_client_blocks_keys_in_json_gzip_and_split_chunked_bodies() {
    let scene = Scene::start("python");
    let keys = Keys::new();
    let json_body = format!("{{\"model\": \"x\", \"auth\": {{\"token\": \"{}\"}}}}", keys.github);
    let r = scene.python(py_spec(&scene, serde_json::json!({"method": "POST", "path": "/v1/json", "body": json_body, "headers": {"Content-Type": "application/json"}})));
    assert_blocked(r["status"].as_u64().unwrap_or(0) as u16, r["body"].as_str().unwrap_or(""), "github-pat");

    let r = scene.python(py_spec(&scene, serde_json::json!({"method": "POST", "path": "/v1/gz", "gzip": true, "body": format!("config:\n  openai_key: {}\n", keys.openai), "headers": {"Content-Type": "text/plain"}})));
    assert_blocked(r["status"].as_u64().unwrap_or(0) as u16, r["body"].as_str().unwrap_or(""), "openai-project-key");

    // The key straddles two chunks sent 200 ms apart.
    let (a, b) = keys.cursor.split_at(30);
    let r = scene.python(py_spec(&scene, serde_json::json!({"method": "POST", "path": "/v1/split", "chunks": [format!("prefix {a}"), format!("{b} suffix")]})));
    assert_blocked(r["status"].as_u64().unwrap_or(0) as u16, r["body"].as_str().unwrap_or(""), "cursor-api-key");

    for key in keys.all() {
        assert_eq!(scene.received_with(key), 0);
    }
    assert!(scene.upstream.requests().is_empty(), "no blocked request reached upstream");

    // And a clean POST with a body passes.
    let r =
        scene.python(py_spec(&scene, serde_json::json!({"method": "POST", "path": "/v1/ok", "body": "{\"q\": 1}"})));
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(scene.upstream.requests().len(), 1);
    let findings = scene.findings();
    assert!(
        findings
            .iter()
            .any(|f| f["rule_id"] == "github-pat" && f["location"].as_str().unwrap_or("").starts_with("body")),
        "{findings:#?}"
    );
    scene.assert_no_key_in_clear(&keys.all(), &[&r.to_string()]);
}

#[test]
fn a_client_that_pauses_before_its_hello_is_still_inspected() {
    // Longer than client_first_timeout: the gateway dials upstream to see
    // who speaks first, the client does, and it is intercepted.
    let scene = Scene::start_full("pause", Duration::from_millis(300), |_| String::new());
    let keys = Keys::new();
    let spec = serde_json::json!({"method": "GET", "path": "/v1/paused", "pause_after_connect": 1.5,
        "headers": {"Authorization": format!("Bearer {}", keys.cursor)}});
    let r = scene.python(py_spec(&scene, spec));
    assert_blocked(r["status"].as_u64().unwrap_or(0) as u16, r["body"].as_str().unwrap_or(""), "cursor-api-key");
    assert!(scene.upstream.requests().is_empty(), "the blocked request never reached upstream");
    let events = scene.gw.wait_events(1);
    assert!(events.iter().any(|e| e["protocol"] == "https" && e["outcome"] == "blocked"), "{events:#?}");
    // And a clean request after the same pause goes through.
    let spec = serde_json::json!({"method": "GET", "path": "/v1/paused-ok", "pause_after_connect": 1.5});
    let r = scene.python(py_spec(&scene, spec));
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(scene.upstream.requests().len(), 1);
    scene.assert_no_key_in_clear(&keys.all(), &[&r.to_string()]);
}

#[test]
fn git_over_https_with_a_hard_coded_key_is_blocked() {
    let scene = Scene::start("git");
    let keys = Keys::new();
    let url = format!("https://{}@{HOST}:{}/git/repo.git", keys.cursor, scene.port);
    let out: Output = scene
        .gw
        .command_in_cgroup("git")
        .args(["-c", &format!("http.curloptResolve={}", scene.resolve(HOST)), "ls-remote", &url])
        .env("GIT_SSL_CAINFO", &scene.gateway_ca)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("HOME", scene.gw.dir.path())
        .output()
        .expect("git");
    assert!(!out.status.success(), "git must fail: the key is blocked");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("403"), "git reports the 403: {stderr}\n{}", scene.gw.log());
    // git first asks without credentials (401), then retries with them: only the first reached upstream.
    let received = scene.upstream.requests();
    assert!(
        received.iter().all(|r| !r.headers.iter().any(|(k, _)| k == "authorization")),
        "no authenticated request reached upstream"
    );
    assert!(!received.is_empty(), "the unauthenticated probe went through");
    let findings = scene.findings();
    let f = findings.iter().find(|f| f["rule_id"] == "cursor-api-key").expect("finding for the git key");
    assert!(f["process"]["comm"].as_str().unwrap_or("").contains("git"), "{f}");
    scene.assert_no_key_in_clear(&[&keys.cursor], &[&stderr]);
}

#[test]
fn streamed_responses_arrive_chunk_by_chunk() {
    let scene = Scene::start("stream");
    let r = scene.python(py_spec(&scene, serde_json::json!({"method": "GET", "path": "/stream"})));
    assert_eq!(r["status"], 200, "{r}");
    assert_eq!(r["body"], "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n");
    let arrivals: Vec<f64> = r["arrivals"].as_array().expect("arrivals").iter().filter_map(Value::as_f64).collect();
    assert!(arrivals.len() >= 3, "chunks arrive separately: {arrivals:?}");
    // Causal rather than timed: the client had the first chunk before the
    // upstream even produced the last one (a gateway that buffered the
    // response could only deliver it after the end, 300 ms after the last
    // chunk). Both clocks are this host's wall clock.
    let t0 = r["t0"].as_f64().expect("t0");
    let first_arrived = t0 + arrivals[0];
    let sent = scene.upstream.stream_sent.lock().expect("stream_sent").clone();
    assert_eq!(sent.len(), 5, "the upstream sent five chunks");
    let last_sent = sent[4].duration_since(std::time::UNIX_EPOCH).expect("wall clock").as_secs_f64();
    assert!(
        first_arrived < last_sent,
        "the first chunk reached the client {:.3}s after the upstream sent the last one: {arrivals:?}",
        first_arrived - last_sent
    );
}

/// A passthrough name is not the job's way around inspection: at a
/// protected destination the gateway refuses the handshake (TLS alert)
/// unless the policy opts the destination out; opted out, the client sees
/// the real server end to end.
#[test]
fn passthrough_hosts_keep_end_to_end_tls() {
    let curl_pass = |scene: &Scene| {
        scene
            .gw
            .command_in_cgroup("curl")
            .args(["-sS", "--resolve", &scene.resolve(PASS_HOST), "--cacert"])
            .arg(&scene.upstream_ca)
            .arg(format!("https://{PASS_HOST}:{}/hello", scene.port))
            .output()
            .expect("curl")
    };
    let protected = Scene::start("pass-refused");
    let out = curl_pass(&protected);
    assert!(!out.status.success(), "a passthrough name at a protected destination is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("access denied"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(protected.upstream.requests().is_empty(), "nothing reached the server");
    drop(protected);

    let scene = Scene::start_with("pass", |dir| {
        let policy = dir.join("policy.yaml");
        std::fs::write(&policy, format!("version: 1\nrules:\n  - name: opaque-ok\n    match: {{ destination: {{ cidr: {UPSTREAM_IP}/32 }} }}\n    action: allow\n    uninspectable: pass\ndefaults:\n  action: allow\n")).expect("policy");
        format!("policy:\n  file: {}\n  watch: false\n", policy.display())
    });
    // Trusting only the upstream's own CA works for the passthrough host:
    // the client sees the real server certificate.
    let out = curl_pass(&scene);
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    // The same CA does not validate the intercepted host: the gateway's leaf is there.
    let out = scene
        .gw
        .command_in_cgroup("curl")
        .args(["-sS", "--resolve", &scene.resolve(HOST), "--cacert"])
        .arg(&scene.upstream_ca)
        .arg(scene.url("/hello"))
        .output()
        .expect("curl");
    assert!(!out.status.success(), "the intercepted host presents the gateway's certificate");
    let events = scene.gw.wait_events(2);
    assert!(events.iter().any(|e| e["protocol"] == "tls-passthrough" && e["sni"] == PASS_HOST), "{events:#?}");
}

#[test]
fn malformed_input_is_an_event_not_a_crash() {
    let scene = Scene::start("malformed");
    let target: SocketAddr = format!("{UPSTREAM_IP}:{}", scene.port).parse().expect("addr");
    let py = |code: &str| {
        let status = scene.gw.command_in_cgroup("python3").arg("-c").arg(code).status().expect("python");
        assert!(status.success());
    };
    // A ClientHello with absurd lengths.
    py(&format!(
        "import socket; s=socket.create_connection(('{}', {})); s.sendall(bytes([0x16,3,1,0,40,1,0xff,0xff,0xff]) + b'x'*36); s.settimeout(5)\ntry: s.recv(10)\nexcept Exception: pass",
        target.ip(), target.port()
    ));
    // A valid TLS handshake followed by garbage instead of HTTP.
    py(&format!(
        "import socket, ssl; c=ssl.create_default_context(cafile='{ca}'); s=c.wrap_socket(socket.create_connection(('{ip}', {port})), server_hostname='{HOST}'); s.sendall(b'\\x00\\x01garbage\\r\\n\\r\\n'); s.settimeout(5)\ntry: s.recv(100)\nexcept Exception: pass",
        ca = scene.gateway_ca.display(), ip = target.ip(), port = target.port()
    ));
    // A truncated HTTP/2 preface over h2.
    py(&format!(
        "import socket, ssl; c=ssl.create_default_context(cafile='{ca}'); c.set_alpn_protocols(['h2']); s=c.wrap_socket(socket.create_connection(('{ip}', {port})), server_hostname='{HOST}'); s.sendall(b'PRI * HTTP/2.0\\r\\n'); s.close()",
        ca = scene.gateway_ca.display(), ip = target.ip(), port = target.port()
    ));
    let events = scene.gw.wait_events(3);
    assert!(
        events.iter().any(|e| e["error"].as_str().unwrap_or("").contains("malformed TLS ClientHello")),
        "{events:#?}"
    );
    assert!(events.iter().filter(|e| e["outcome"] == "error").count() >= 2, "{events:#?}");
    // Still serving.
    let (status, _) = scene.curl("--http2", &[&scene.url("/after")]);
    assert_eq!(status, 200);
}

/// A body beyond the decoding limit (64 MiB) is not forwarded unscanned:
/// by default it is refused; where the policy says `scan_raw` the rest
/// streams on, scanned raw, in bounded memory.
#[test]
fn a_one_gib_body_streams_with_bounded_memory() {
    let scene = Scene::start_with("big", |dir| {
        let policy = dir.join("policy.yaml");
        std::fs::write(&policy, format!("version: 1\nrules:\n  - name: bulk-upload\n    match: {{ destination: {{ cidr: {UPSTREAM_IP}/32 }} }}\n    action: allow\n    uninspectable: scan_raw\ndefaults:\n  action: allow\n")).expect("policy");
        format!("policy:\n  file: {}\n  watch: false\n", policy.display())
    });
    let pid = scene.gw.child.as_ref().expect("gateway").id();
    let started = Instant::now();
    let mut child = scene
        .gw
        .command_in_cgroup("curl")
        .args(["-sS", "--http1.1", "--resolve", &scene.resolve(HOST), "--cacert"])
        .arg(&scene.gateway_ca)
        .args(["-H", "Content-Type: application/octet-stream", "-T", "-", &scene.url("/big")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        let block = vec![b'a'; 1 << 20];
        for _ in 0..1024 {
            stdin.write_all(&block).expect("write body");
        }
    }
    let out = child.wait_with_output().expect("curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains(&format!("\"received\":{}", 1u64 << 30)), "the upstream got the whole GiB: {body}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("gateway status");
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    assert!(hwm_kib < 256 * 1024, "gateway peak RSS {hwm_kib} KiB for a 1 GiB body: memory must stay bounded");
    eprintln!("1 GiB through the gateway in {:?}, peak RSS {} MiB", started.elapsed(), hwm_kib / 1024);
}

#[test]
fn swap_replaces_the_static_key_with_the_credential_the_gateway_holds() {
    let held = format!("held-{}", random(40));
    let held_for_closure = held.clone();
    let scene = Scene::start_with("swap", move |dir| {
        let file = dir.join("cursor-credential");
        std::fs::write(&file, format!("{held_for_closure}\n")).expect("write credential");
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
        format!(
            "findings:\n  actions:\n    - {{host: '{HOST}', action: swap}}\ncredentials:\n  credentials:\n    - identity: '**'\n      host: '{HOST}'\n      source: {{file: {}}}\n      inject: {{bearer: '{{credential}}'}}\n",
            file.display()
        )
    });
    let keys = Keys::new();
    for version in ["--http1.1", "--http2"] {
        let (status, body) =
            scene.curl(version, &["-H", &format!("Authorization: Bearer {}", keys.cursor), &scene.url("/v1/swap")]);
        assert_eq!(status, 200, "the job's request succeeds: {body}");
    }
    let received = scene.upstream.requests();
    assert_eq!(received.len(), 2);
    for r in &received {
        let auth: Vec<&String> = r.headers.iter().filter(|(k, _)| k == "authorization").map(|(_, v)| v).collect();
        assert_eq!(auth, vec![&format!("Bearer {held}")], "upstream receives the held credential, once");
    }
    assert_eq!(scene.received_with(&keys.cursor), 0, "upstream never receives the hard-coded key");
    let findings = scene.findings();
    let f = findings.iter().find(|f| f["rule_id"] == "cursor-api-key").expect("finding recorded");
    assert_eq!(f["action"], "swap");
    assert_eq!(f["identity"], "spiffe://ci-gateway.local/unmapped");
    scene.assert_no_key_in_clear(&[&keys.cursor, &held], &[]);
}

#[test]
fn identities_from_mappings_reach_events_and_findings() {
    let scene = Scene::start_with("identity", |dir| {
        let mappings = dir.join("mappings.yaml");
        std::fs::write(
            &mappings,
            "rules:\n  - name: nobody\n    match:\n      uid: 65534\n    identity: 'spiffe://ci.example/user/nobody'\n  - name: repo\n    match:\n      uid: 0\n      env:\n        GITHUB_REPOSITORY: 'acme/*'\n    identity: 'spiffe://ci.example/repo/{env.GITHUB_REPOSITORY}'\n",
        )
        .expect("write mappings");
        format!("identity:\n  mappings: {}\n", mappings.display())
    });
    let keys = Keys::new();
    // A job as uid 65534.
    let mut cmd = scene.gw.command_in_cgroup("curl");
    gateway_tests::run_as(&mut cmd, 65534, 65534);
    let out = cmd
        .args(["-sS", "--resolve", &scene.resolve(HOST), "--cacert"])
        .arg(&scene.gateway_ca)
        .args(["-H", &format!("Authorization: Bearer {}", keys.cursor), &scene.url("/as-nobody")])
        .output()
        .expect("curl");
    assert!(String::from_utf8_lossy(&out.stdout).contains("static_credential_blocked"));
    // A job as root with the repository in its environment.
    let out = scene
        .gw
        .command_in_cgroup("curl")
        .env("GITHUB_REPOSITORY", "acme/api")
        .env("GITHUB_RUN_ID", "4242")
        .args(["-sS", "--resolve", &scene.resolve(HOST), "--cacert"])
        .arg(&scene.gateway_ca)
        .args(["-H", &format!("Authorization: Bearer {}", keys.openai), &scene.url("/as-repo")])
        .output()
        .expect("curl");
    assert!(String::from_utf8_lossy(&out.stdout).contains("static_credential_blocked"));
    // A job that matches no rule.
    let (status, _) = scene.curl("--http1.1", &[&scene.url("/unmapped")]);
    assert_eq!(status, 200);

    let findings = scene.findings();
    let nobody = findings.iter().find(|f| f["rule_id"] == "cursor-api-key").expect("nobody's finding");
    assert_eq!(nobody["identity"], "spiffe://ci.example/user/nobody");
    assert_eq!(nobody["process"]["uid"], 65534);
    let repo = findings.iter().find(|f| f["rule_id"] == "openai-project-key").expect("repo's finding");
    // Job-controlled values are one path segment each: the `/` is encoded, so
    // a job cannot add segments to its identity.
    assert_eq!(repo["identity"], "spiffe://ci.example/repo/acme%2Fapi");
    assert_eq!(repo["process"]["job"]["GITHUB_RUN_ID"], "4242", "CI job variables are recorded: {repo}");
    let events = scene.gw.wait_events(3);
    let identities: Vec<&str> = events.iter().filter_map(|e| e["identity"].as_str()).collect();
    assert!(identities.contains(&"spiffe://ci-gateway.local/unmapped"), "{identities:?}");
    assert!(identities.contains(&"spiffe://ci.example/user/nobody"), "{identities:?}");
    assert!(identities.contains(&"spiffe://ci.example/repo/acme%2Fapi"), "{identities:?}");

    // A broken mapping file on reload is reported and the old mappings stay.
    let mappings = scene.pki_dir.path().join("mappings.yaml");
    std::fs::write(
        &mappings,
        "rules:\n  - name: broken\n    match:\n      exe: '[unclosed'\n    identity: 'spiffe://x/y'\n",
    )
    .expect("write");
    let pid = nix::unistd::Pid::from_raw(scene.gw.child.as_ref().expect("gateway").id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    wait_for("the rejected reload is reported", || {
        if scene.gw.log().contains("identity mappings rejected") {
            Ok(())
        } else {
            Err("no `identity mappings rejected` in the log")
        }
    });
    assert!(scene.gw.log().contains("mappings.yaml:4:"), "the error names file and line");
    let mut cmd = scene.gw.command_in_cgroup("curl");
    gateway_tests::run_as(&mut cmd, 65534, 65534);
    let out = cmd
        .args(["-sS", "--resolve", &scene.resolve(HOST), "--cacert"])
        .arg(&scene.gateway_ca)
        .arg(scene.url("/after-reload"))
        .output()
        .expect("curl");
    assert!(out.status.success());
    let events = scene.gw.wait_events(4);
    let last = events.last().expect("event");
    assert_eq!(last["identity"], "spiffe://ci.example/user/nobody", "the old mappings are still in force: {last}");
}

#[test]
fn minted_jwts_replace_static_keys_and_verify_against_the_served_jwks() {
    let scene = Scene::start_with("jwt", |_| {
        format!(
            "findings:\n  actions:\n    - {{host: '{HOST}', action: swap}}\ncredentials:\n  jwt:\n    issuer: https://gateway.test\n  credentials:\n    - identity: '**'\n      host: '{HOST}'\n      inject: {{bearer: '{{jwt}}'}}\n"
        )
    });
    let keys = Keys::new();
    let (status, body) =
        scene.curl("--http1.1", &["-H", &format!("Authorization: Bearer {}", keys.cursor), &scene.url("/v1/jwt")]);
    assert_eq!(status, 200, "{body}");
    let received = scene.upstream.requests();
    let auth =
        received[0].headers.iter().find(|(k, _)| k == "authorization").map(|(_, v)| v.clone()).expect("authorization");
    let token = auth.strip_prefix("Bearer ").expect("bearer").to_owned();

    // Verify with a standard library against the JWKS the gateway serves.
    let out = Command::new("curl")
        .args(["-sS", &format!("http://127.0.0.1:{}/.well-known/jwks.json", scene.gw.api_port)])
        .output()
        .expect("fetch jwks");
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&out.stdout).expect("jwks json");
    let header = jsonwebtoken::decode_header(&token).expect("jwt header");
    let kid = header.kid.expect("kid");
    let jwk = jwks.find(&kid).expect("the signing key is published");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).expect("decoding key");
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.set_audience(&[HOST]);
    validation.set_issuer(&["https://gateway.test"]);
    let claims = jsonwebtoken::decode::<Value>(&token, &key, &validation).expect("the minted token verifies");
    assert_eq!(claims.claims["sub"], "spiffe://ci-gateway.local/unmapped");
    let lifetime = claims.claims["exp"].as_u64().unwrap_or(0) - claims.claims["iat"].as_u64().unwrap_or(0);
    assert_eq!(lifetime, 15 * 60, "15 minutes by default");

    // A wrong audience is refused by the same library.
    let mut wrong = jsonwebtoken::Validation::new(header.alg);
    wrong.set_audience(&["other.internal"]);
    assert!(jsonwebtoken::decode::<Value>(&token, &key, &wrong).is_err());
    assert_eq!(scene.received_with(&keys.cursor), 0);
}

/// A local OIDC issuer: an ES256 key, its JWKS in a file, and a minting function.
struct Issuer {
    key: jsonwebtoken::EncodingKey,
    kid: String,
}

impl Issuer {
    fn new(dir: &std::path::Path, kid: &str) -> (Issuer, PathBuf) {
        use base64::Engine as _;
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("issuer key");
        let raw = pair.public_key_raw();
        // Uncompressed point: 0x04 || x || y.
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64.encode(&raw[1..33]), "y": b64.encode(&raw[33..65]),
        }]});
        let path = dir.join(format!("jwks-{kid}.json"));
        std::fs::write(&path, jwks.to_string()).expect("write jwks");
        let key = jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der());
        (Issuer { key, kid: kid.to_owned() }, path)
    }

    fn token(&self, audience: &str, exp_offset: i64) -> String {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs() as i64;
        let claims = serde_json::json!({
            "iss": "https://ci.test", "sub": "repo:acme/api:ref:refs/heads/main", "aud": audience,
            "iat": now - 10, "exp": now + exp_offset, "repository": "acme/api", "run_id": "777",
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign")
    }
}

#[test]
fn oidc_tokens_presented_by_jobs_are_verified_or_refused() {
    let keys_dir = tempfile::tempdir().expect("tempdir");
    let (issuer, jwks) = Issuer::new(keys_dir.path(), "ci-key-1");
    let (impostor, _) = Issuer::new(keys_dir.path(), "ci-key-1-impostor");
    let jwks_path = jwks.display().to_string();
    let scene = Scene::start_with("oidc", move |_| {
        format!(
            "findings:\n  actions:\n    - {{host: '{HOST}', action: flag}}\ncredentials:\n  oidc:\n    - issuer: https://ci.test\n      audiences: [ci-gateway]\n      jwks_file: {jwks_path}\n      claims: {{repository: repository, run_id: run_id}}\n"
        )
    });
    let header = |token: &str| format!("X-CI-OIDC-Token: {token}");

    // Valid: forwarded, and the token itself never reaches upstream.
    let valid = issuer.token("ci-gateway", 600);
    let (status, body) = scene.curl("--http1.1", &["-H", &header(&valid), &scene.url("/with-token")]);
    assert_eq!(status, 200, "{body}");
    let received = scene.upstream.requests();
    assert_eq!(received.len(), 1);
    assert!(
        !received[0].headers.iter().any(|(k, _)| k == "x-ci-oidc-token"),
        "the ID token is consumed by the gateway"
    );

    // Tampered payload, expired, wrong audience, foreign signature: 401 each, nothing forwarded.
    let mut parts: Vec<&str> = valid.split('.').collect();
    use base64::Engine as _;
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
        serde_json::json!({"iss": "https://ci.test", "sub": "attacker", "aud": "ci-gateway", "exp": 4_000_000_000u64, "iat": 1}).to_string(),
    );
    parts[1] = &forged;
    let tampered = parts.join(".");
    let mut foreign_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    foreign_header.kid = Some("ci-key-1".into());
    let foreign_claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(valid.split('.').nth(1).expect("payload"))
            .expect("b64"),
    )
    .expect("claims");
    let foreign = jsonwebtoken::encode(&foreign_header, &foreign_claims, &impostor.key).expect("sign");
    for (token, code) in [
        (tampered, "bad_signature"),
        (issuer.token("ci-gateway", -3600), "expired"),
        (issuer.token("someone-else", 600), "wrong_audience"),
        (foreign, "bad_signature"),
    ] {
        let (status, body) = scene.curl("--http2", &["-H", &header(&token), &scene.url("/with-bad-token")]);
        assert_eq!(status, 401, "{body}");
        let v: Value = serde_json::from_str(&body).expect("401 body is JSON");
        assert_eq!(v["error"], "invalid_oidc_token");
        assert_eq!(v["code"], code, "{v}");
    }
    assert_eq!(scene.upstream.requests().len(), 1, "no request with a bad token reached upstream");
    assert!(scene.gw.log().contains("ID token rejected"), "each rejection is an event");

    // Verified claims are bound to what the gateway records.
    let keys = Keys::new();
    let (status, _) = scene.curl(
        "--http1.1",
        &[
            "-H",
            &header(&issuer.token("ci-gateway", 600)),
            "-H",
            &format!("x-api-key: {}", keys.openai),
            &scene.url("/flagged"),
        ],
    );
    assert_eq!(status, 200, "flag forwards");
    let findings = scene.findings();
    let f = findings.iter().find(|f| f["rule_id"] == "openai-project-key").expect("finding");
    assert_eq!(f["process"]["job"]["oidc.repository"], "acme/api", "{f}");
    assert_eq!(f["process"]["job"]["oidc.run_id"], "777", "{f}");
}

#[test]
fn the_jwks_listener_serves_backends_elsewhere_over_tls_and_picks_up_a_renewed_certificate() {
    const NAME: &str = "jwks.test.internal";
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_at = |sub: &str| {
        let d = dir.path().join(sub);
        std::fs::create_dir(&d).expect("mkdir");
        let pki = TestPki::new(&d, &[NAME]);
        let (cert, key) = pki.write_leaf(&d);
        // The key gets the checks of a credential file: root's, 0600.
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
        (pki.ca_path.clone(), cert, key)
    };
    let (ca, cert, key) = pki_at("first");
    let port = unique_port();
    let issuer = format!("https://{NAME}:{port}");
    let mut opts = GatewayOptions::new("jwks-listener", &["{cidr: 127.0.0.99/32, ports: [9]}"]);
    opts.api_yaml = format!(
        "  jwks:\n    listen: 127.0.0.1:{port}\n    cert_file: {}\n    key_file: {}\n",
        cert.display(),
        key.display()
    );
    opts.extra_yaml = format!("credentials:\n  jwt:\n    issuer: {issuer}\n");
    let gw = TestGateway::start(opts);
    let fetch = |path: &str, ca: &std::path::Path| {
        let out = Command::new("curl")
            .args(["-sS", "--resolve", &format!("{NAME}:{port}:127.0.0.1"), "--cacert"])
            .arg(ca)
            .args(gateway_tests::CURL_STATUS)
            .arg(format!("{issuer}{path}"))
            .output()
            .expect("curl");
        assert!(out.status.success(), "{path}: {}", String::from_utf8_lossy(&out.stderr));
        gateway_tests::curl_reply(&out.stdout)
    };

    // Discovery where OIDC expects it, advertising this listener's JWKS.
    let (status, body) = fetch("/.well-known/openid-configuration", &ca);
    assert_eq!(status, 200, "{body}");
    let discovery: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(discovery["issuer"], issuer.as_str());
    assert_eq!(discovery["jwks_uri"], format!("{issuer}/.well-known/jwks.json"));
    // The same keys as the loopback API's.
    let (status, remote) = fetch("/.well-known/jwks.json", &ca);
    assert_eq!(status, 200, "{remote}");
    let remote: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&remote).expect("jwks");
    let out = Command::new("curl")
        .args(["-sS", &format!("http://127.0.0.1:{}/.well-known/jwks.json", gw.api_port)])
        .output()
        .expect("curl");
    let local: jsonwebtoken::jwk::JwkSet = serde_json::from_slice(&out.stdout).expect("jwks");
    assert!(!remote.keys.is_empty());
    assert_eq!(
        remote.keys.iter().map(|k| k.common.key_id.clone()).collect::<Vec<_>>(),
        local.keys.iter().map(|k| k.common.key_id.clone()).collect::<Vec<_>>()
    );
    // Only the documents: the metrics stay on loopback.
    let (status, _) = fetch("/metrics", &ca);
    assert_eq!(status, 404);
    // TLS only: a plain HTTP request gets no document.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", &format!("http://127.0.0.1:{port}/.well-known/jwks.json")])
        .output()
        .expect("curl");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("\"keys\""), "no JWKS in clear");

    // A renewed certificate (another CA here) is served without a restart.
    let (new_ca, new_cert, new_key) = pki_at("renewed");
    std::fs::copy(&new_key, &key).expect("renew key");
    std::fs::copy(&new_cert, &cert).expect("renew cert");
    wait_for("the renewed certificate is served", || {
        let out = Command::new("curl")
            .args(["-sS", "--resolve", &format!("{NAME}:{port}:127.0.0.1"), "--cacert"])
            .arg(&new_ca)
            .arg(format!("{issuer}/healthz"))
            .output()
            .expect("curl");
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    assert!(gw.log().contains("certificate reloaded"));
}
