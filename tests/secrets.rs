//! Nothing secret in clear, in any form: one key sent in many encodings and
//! places through a real gateway (real eBPF redirect, TLS interception,
//! curl and Python clients in the intercepted cgroup, a real HTTPS
//! upstream, recording at `full`, flagging, blocking, a policy denial and a
//! just-in-time approval with its webhook), then EVERYTHING the gateway
//! wrote is searched for the key in each of its encodings: its log, the
//! `sessions`, `findings` and `approvals` commands' output, the webhook
//! payloads, and the raw bytes of every file under its state directory
//! (SQLite databases and their WAL files, while running and after a clean
//! stop). Zero hits allowed.
//!
//! The test also checks that each request did what it is meant to (flagged
//! keys produce findings, recorded exchanges exist and show the masking
//! marker), so that an empty recording cannot pass for a clean one.

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use gateway_tests::{
    unique_port,
    upstream::{TestPki, Upstream},
    wait_for, GatewayOptions, TestGateway,
};
use rand::{distr::Alphanumeric, Rng as _};
use serde_json::Value;

const HOST: &str = "api.test.internal";
const UPSTREAM_IP: &str = "127.0.0.7";

const POLICY: &str = r#"version: 1
rules:
  - name: block-keys
    match: { request: { path: "/block/**" } }
    action: allow
    static_keys: block
  - name: deny-path
    match: { request: { path: "/deny/**" } }
    action: deny
    reason: "denied for the test"
  - name: held
    match: { request: { path: "/approve/**" } }
    action: require_approval
    approval: { group: release, min_approvals: 1, timeout: 120s }
defaults:
  action: allow
  record: full
  static_keys: flag
"#;

/// A fake OpenAI project key, made up at run time, with `-` and `_` inside
/// (so that percent- and URL-safe forms differ from the raw one).
fn fake_key() -> String {
    let random = |n| rand::rng().sample_iter(&Alphanumeric).take(n).map(char::from).collect::<String>();
    format!("sk-proj-{}-{}_{}T3BlbkFJ{}-{}", random(18), random(12), random(10), random(24), random(16))
}

// ---------- the forms a key may take ----------

fn b64_std(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn b64_url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn percent_all(data: &[u8], upper: bool) -> String {
    data.iter().map(|b| if upper { format!("%{b:02X}") } else { format!("%{b:02x}") }).collect()
}

fn json_escape_all(data: &[u8], upper: bool) -> String {
    data.iter().map(|b| if upper { format!("\\u{b:04X}") } else { format!("\\u{b:04x}") }).collect()
}

/// The base64 characters that depend on `data` alone when it starts
/// `align` bytes into the encoded bytes.
fn b64_core(data: &[u8], align: usize, url: bool) -> String {
    let mut padded = vec![0u8; align];
    padded.extend_from_slice(data);
    let encoded = if url { b64_url(&padded) } else { b64_std(&padded) };
    encoded[(8 * align).div_ceil(6)..8 * (align + data.len()) / 6].to_owned()
}

/// Every form searched for: raw, every 16-byte window of it (a key cut or
/// partly encoded), fully JSON-escaped and percent-encoded in both hex
/// cases, base64 in both alphabets at each of the three alignments.
fn forms(key: &str) -> Vec<(String, Vec<u8>)> {
    let k = key.as_bytes();
    let mut out = vec![("raw".to_owned(), k.to_vec())];
    for (i, w) in k.windows(16).enumerate() {
        out.push((format!("raw window at {i}"), w.to_vec()));
    }
    for upper in [false, true] {
        out.push((format!("JSON-escaped (upper hex {upper})"), json_escape_all(k, upper).into_bytes()));
        out.push((format!("percent-encoded (upper hex {upper})"), percent_all(k, upper).into_bytes()));
    }
    for align in 0..3 {
        out.push((format!("base64 at alignment {align}"), b64_core(k, align, false).into_bytes()));
        out.push((format!("base64url at alignment {align}"), b64_core(k, align, true).into_bytes()));
    }
    out
}

/// Where `needle` occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What precedes a hit, with every run of 8 or more letters and digits cut
/// out, so a failure message can show the place without any part of a key.
fn context_before(hay: &[u8], at: usize) -> String {
    let text = String::from_utf8_lossy(&hay[at.saturating_sub(80)..at]).into_owned();
    let mut out = String::new();
    let mut run = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() {
            run.push(c);
            continue;
        }
        out.push_str(if run.len() >= 8 { "…" } else { &run });
        run.clear();
        out.push(c);
    }
    out.pop();
    out.escape_debug().to_string()
}

/// Everything the gateway wrote, by where it came from.
#[derive(Default)]
struct Written(Vec<(String, Vec<u8>)>);

impl Written {
    fn add(&mut self, what: impl Into<String>, bytes: impl Into<Vec<u8>>) {
        self.0.push((what.into(), bytes.into()));
    }

    /// Fails naming every source and form that holds the key (never the key).
    fn assert_clean(&self, key: &str) {
        let forms = forms(key);
        let mut hits = Vec::new();
        for (what, bytes) in &self.0 {
            for (form, needle) in &forms {
                if let Some(at) = find(bytes, needle) {
                    hits.push(format!("{what}: {form} at byte {at}, after {:?}", context_before(bytes, at)));
                }
            }
        }
        assert!(hits.is_empty(), "the key is stored or printed in clear:\n  {}", hits.join("\n  "));
    }
}

// ---------- the scene ----------

/// A plain HTTP server that keeps the body of every request (the approvals
/// webhook) and answers 200.
struct Webhook {
    port: u16,
    payloads: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Webhook {
    fn start() -> Webhook {
        let port = unique_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind webhook");
        let payloads = Arc::new(Mutex::new(Vec::new()));
        let kept = payloads.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let kept = kept.clone();
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut data = Vec::new();
                    let mut buf = [0u8; 16 * 1024];
                    // Head, then as much body as Content-Length says.
                    let body_at = loop {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => data.extend_from_slice(&buf[..n]),
                        }
                        if let Some(i) = find(&data, b"\r\n\r\n") {
                            break i + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&data[..body_at]).to_ascii_lowercase();
                    let length = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    while data.len() < body_at + length {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => data.extend_from_slice(&buf[..n]),
                        }
                    }
                    kept.lock().expect("payloads").push(data[body_at..].to_vec());
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                });
            }
        });
        Webhook { port, payloads }
    }

    fn payloads(&self) -> Vec<Vec<u8>> {
        self.payloads.lock().expect("payloads").clone()
    }
}

struct Scene {
    gw: TestGateway,
    upstream: Upstream,
    port: u16,
    gateway_ca: PathBuf,
    webhook: Webhook,
    _pki_dir: tempfile::TempDir,
}

impl Scene {
    fn start(name: &str) -> Scene {
        let pki_dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(pki_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let pki = TestPki::new(pki_dir.path(), &[HOST]);
        let port = unique_port();
        let upstream = Upstream::start(format!("{UPSTREAM_IP}:{port}").parse().expect("addr"), &pki);
        let policy = pki_dir.path().join("policy.yaml");
        std::fs::write(&policy, POLICY).expect("write policy");
        let webhook = Webhook::start();
        let mut opts = GatewayOptions::new(name, &[&format!("{{cidr: {UPSTREAM_IP}/32, ports: [{port}]}}")]);
        // Every client here speaks first (see tests/policy.rs).
        opts.proxy_yaml = "  client_first_timeout: 30s\n".into();
        opts.extra_yaml = format!(
            "tls:\n  intercept: ['*.test.internal']\n  extra_upstream_cas: [{ca}]\n\
             policy:\n  file: {policy}\n  watch: false\n\
             approvals:\n  groups: {{ release: [alice, bob] }}\n  webhook: {{ url: 'http://127.0.0.1:{hook}/hook' }}\n\
             record:\n  flush_interval: 50ms\n",
            ca = pki.ca_path.display(),
            policy = policy.display(),
            hook = webhook.port,
        );
        let gw = TestGateway::start(opts);
        let gateway_ca = gw.dir.path().join("gateway-ca.pem");
        let out = gw.cli(&["ca", "export", "--out", gateway_ca.to_str().expect("utf8")]);
        assert!(out.status.success(), "ca export: {}", String::from_utf8_lossy(&out.stderr));
        Scene { gw, upstream, port, gateway_ca, webhook, _pki_dir: pki_dir }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{HOST}:{}{path}", self.port)
    }

    /// curl in the intercepted cgroup: (status, body).
    fn curl(&self, args: &[&str]) -> (u16, String) {
        let out = self
            .gw
            .command_in_cgroup("curl")
            .args(["-sS", "--resolve", &format!("{HOST}:{}:{UPSTREAM_IP}", self.port), "--cacert"])
            .arg(&self.gateway_ca)
            .args(gateway_tests::CURL_STATUS)
            .args(args)
            .output()
            .expect("curl");
        gateway_tests::curl_reply(&out.stdout)
    }

    /// Python's http.client in the intercepted cgroup, started.
    fn spawn_python(&self, method: &str, path: &str, body: &str, headers: Value, gzip: bool) -> Child {
        let spec = serde_json::json!({
            "host": HOST, "port": self.port, "ip": UPSTREAM_IP,
            "cafile": self.gateway_ca.to_str().expect("utf8"),
            "method": method, "path": path, "body": body, "headers": headers, "gzip": gzip,
        });
        self.gw
            .command_in_cgroup("python3")
            .arg("-c")
            .arg(PY_HTTP)
            .arg(spec.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python")
    }

    /// Python's http.client in the intercepted cgroup: (status, body).
    fn python(&self, method: &str, path: &str, body: &str, headers: Value, gzip: bool) -> (u16, String) {
        finish_python(self.spawn_python(method, path, body, headers, gzip))
    }

    /// Runs a gateway command; its standard output (it must succeed).
    fn cli(&self, args: &[&str]) -> Vec<u8> {
        let out = self.gw.cli(args);
        assert!(out.status.success(), "gateway {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let mut all = out.stdout;
        all.extend_from_slice(&out.stderr);
        all
    }

    fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.gw.cli(args);
        assert!(out.status.success(), "gateway {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("gateway {args:?}: not JSON ({e})"))
    }

    fn session_ids(&self) -> Vec<String> {
        let sessions = self.cli_json(&["sessions", "list", "--json"]);
        sessions
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["id"].as_str().or(s["session"].as_str()).map(str::to_owned))
            .collect()
    }

    /// The data documents of every committed exchange record.
    fn exchanges(&self) -> Vec<Value> {
        self.session_ids()
            .iter()
            .flat_map(|id| {
                let out = self.gw.cli(&["sessions", "export", id]);
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .filter(|r| r["kind"] == "exchange")
                    .filter_map(|r| r["data"].as_str().and_then(|d| serde_json::from_str::<Value>(d).ok()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Every file under the state directory, raw.
    fn state_files(&self, when: &str, written: &mut Written) {
        for path in walk(&self.gw.dir.path().join("state")) {
            let bytes = std::fs::read(&path).unwrap_or_default();
            written.add(format!("{when}: {}", path.display()), bytes);
        }
    }
}

fn finish_python(child: Child) -> (u16, String) {
    let out = child.wait_with_output().expect("python");
    assert!(out.status.success(), "python client failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("python output");
    assert!(v.get("error").is_none(), "python client: {v}");
    (v["status"].as_u64().unwrap_or(0) as u16, v["body"].as_str().unwrap_or_default().to_owned())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Python client: one JSON spec argument, one JSON result line.
const PY_HTTP: &str = r#"
import gzip, http.client, json, socket, ssl, sys
spec = json.loads(sys.argv[1])
real = socket.create_connection
def create_connection(address, *a, **kw):
    return real((spec["ip"], address[1]), *a, **kw)
socket.create_connection = create_connection
ctx = ssl.create_default_context(cafile=spec["cafile"])
conn = http.client.HTTPSConnection(spec["host"], spec["port"], context=ctx, timeout=150)
headers = spec.get("headers", {})
body = spec.get("body")
if body is not None:
    body = body.encode()
    if spec.get("gzip"):
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
try:
    conn.request(spec["method"], spec["path"], body=body, headers=headers)
    resp = conn.getresponse()
    out = {"status": resp.status, "body": resp.read().decode(errors="replace")}
except Exception as e:
    out = {"error": repr(e)}
print(json.dumps(out))
"#;

#[test]
fn a_key_in_any_encoding_is_never_stored_logged_or_shown() {
    let scene = Scene::start("secrets");
    let key = fake_key();
    let k = key.as_bytes();
    *scene.upstream.leak.lock().expect("leak") = key.clone();
    let json = serde_json::json!({"Content-Type": "application/json"});
    let mut client_output = Vec::new();
    // The gateway's own answers (403s name their findings) count as
    // written by it; upstream's answers are upstream's.
    let mut expect = |(status, body): (u16, String), want: u16, what: &str| {
        assert_eq!(
            status,
            want,
            "{what}: unexpected status; body starts {:?}",
            context_before(body.as_bytes(), body.len().min(200))
        );
        if status == 403 {
            client_output.push(body);
        }
    };

    // Flagged (forwarded, recorded in full): headers, path, query, bodies.
    expect(scene.curl(&["-H", &format!("X-Custom: {key}"), &scene.url("/flag/header")]), 200, "raw header");
    expect(
        scene.curl(&[
            "--http1.1",
            "-H",
            &format!("X-Data: {}", b64_std(k)),
            "-H",
            &format!("X-Data-Url: {}", b64_url(&[b": ", k].concat())),
            &scene.url("/flag/b64-header"),
        ]),
        200,
        "base64 headers",
    );
    expect(scene.curl(&[&scene.url(&format!("/flag/path/{key}/x"))]), 200, "raw path");
    expect(scene.curl(&[&scene.url(&format!("/flag/pathpct/{}", key.replace('-', "%2D")))]), 200, "percent path");
    expect(
        scene.curl(&[&scene.url(&format!("/flag/query?note={}&x=1", percent_all(k, true)))]),
        200,
        "percent query (upper)",
    );
    expect(
        scene.curl(&[&scene.url(&format!("/flag/query2?note={}", percent_all(k, false)))]),
        200,
        "percent query (lower)",
    );
    expect(scene.curl(&[&scene.url(&format!("/flag/bare?{key}"))]), 200, "bare query parameter");
    expect(
        scene.curl(&["--data", &format!("a=1&note={}&b=2", percent_all(k, true)), &scene.url("/flag/form")]),
        200,
        "form body",
    );
    expect(
        scene.curl(&["-F", &format!("note={key}"), "-F", "other=1", &scene.url("/flag/multipart")]),
        200,
        "multipart",
    );
    let escaped = format!("{{\"note\": \"{}\", \"{key}\": \"named\"}}", json_escape_all(k, false));
    expect(scene.python("POST", "/flag/json", &escaped, json.clone(), false), 200, "JSON-escaped body");
    let first_escaped = format!("{{\"note\": \"\\u{:04x}{}\"}}", k[0], &key[1..]);
    expect(scene.python("POST", "/flag/json-first", &first_escaped, json.clone(), false), 200, "first char escaped");
    let gz = format!("{{\"note\": \"{key}\", \"pad\": \"{}\"}}", "x".repeat(3000));
    expect(scene.python("POST", "/flag/gzip", &gz, json.clone(), true), 200, "gzip body");
    let blob = format!("{{\"blob\": \"{}\", \"blob2\": \"{}\"}}", b64_std(&[b"\"", k, b"\""].concat()), b64_url(k));
    expect(scene.python("POST", "/flag/blob", &blob, json.clone(), false), 200, "base64 in a JSON body");
    // Responses hold it too: escaped (echoed back) and gzip-compressed.
    expect(scene.python("POST", "/echo/json", &escaped, json.clone(), false), 200, "echoed escaped body");
    expect(scene.curl(&["--compressed", &scene.url("/leak/gzip")]), 200, "gzip response");

    // Blocked at the head and in the body; denied by policy.
    expect(scene.curl(&[&scene.url(&format!("/block/path/{key}"))]), 403, "blocked path");
    expect(scene.python("POST", "/block/json", &escaped, json.clone(), false), 403, "blocked escaped body");
    expect(
        scene.curl(&[&scene.url(&format!("/deny/{}?k={}", key.replace('-', "%2d"), b64_url(k)))]),
        403,
        "denied request",
    );

    // Held for approval: the approvers see it, masked, then release it.
    let held_body =
        format!("{{\"release\": \"v1\", \"token\": \"{}\", \"b\": \"{}\"}}", json_escape_all(k, true), b64_std(k));
    let held = scene.spawn_python(
        "POST",
        &format!("/approve/deploy?k={}", percent_all(k, false)),
        &held_body,
        json.clone(),
        false,
    );
    let pending = wait_for("the request is held for approval", || {
        let list = scene.cli_json(&["approvals", "list", "--json"]);
        let found = list.as_array().into_iter().flatten().find(|a| a["state"] == "pending").cloned();
        found.ok_or_else(|| format!("nothing pending; gateway errors:\n{}", scene.gw.log_errors()))
    });
    let id = pending["id"].as_str().expect("approval id").to_owned();
    let preview = pending["body_preview"].as_str().unwrap_or_default().to_owned();
    assert!(!preview.is_empty(), "the approver sees a (masked) preview of the held body");

    let mut written = Written::default();
    written.add("approval body preview", preview);
    written.add("approvals list", scene.cli(&["approvals", "list"]));
    written.add("approvals list --json", scene.cli(&["approvals", "list", "--json"]));
    written.add("approvals show (pending)", scene.cli(&["approvals", "show", &id]));
    written.add("approvals show --json (pending)", scene.cli(&["approvals", "show", &id, "--json"]));
    scene.cli(&["approvals", "approve", &id, "--by", "alice", "--comment", "ok"]);
    expect(finish_python(held), 200, "approved request");
    written.add("approvals show (approved)", scene.cli(&["approvals", "show", &id]));
    written.add("approvals list --all --json", scene.cli(&["approvals", "list", "--all", "--json"]));
    let hooks = wait_for("the webhook received the request and the decision", || {
        let p = scene.webhook.payloads();
        if p.len() >= 2 {
            Ok(p)
        } else {
            Err(format!("{} payloads so far", p.len()))
        }
    });
    for (i, p) in hooks.iter().enumerate() {
        written.add(format!("webhook payload {i}"), p.clone());
    }

    // Every request is recorded (the flagged ones in full) before anything
    // is read back.
    let requests = 19;
    let exchanges: Vec<Value> = wait_for("every exchange is recorded", || {
        let e = scene.exchanges();
        if e.len() >= requests {
            Ok(e)
        } else {
            Err(format!("{} of {requests} exchanges recorded; gateway errors:\n{}", e.len(), scene.gw.log_errors()))
        }
    });
    written.add("recorded exchanges", serde_json::to_vec(&exchanges).expect("json"));
    // Read back everything the gateway wrote.
    for id in scene.session_ids() {
        written.add(format!("sessions export {id}"), scene.cli(&["sessions", "export", &id]));
        written.add(format!("sessions show {id}"), scene.cli(&["sessions", "show", &id]));
        written.add(format!("sessions show --json {id}"), scene.cli(&["sessions", "show", &id, "--json"]));
    }
    written.add("sessions list", scene.cli(&["sessions", "list"]));
    written.add("findings list", scene.cli(&["findings", "list"]));
    written.add("findings list --json", scene.cli(&["findings", "list", "--json"]));
    for format in ["json", "csv", "sarif"] {
        written.add(format!("findings export {format}"), scene.cli(&["findings", "export", "--format", format]));
    }
    for (i, body) in client_output.iter().enumerate() {
        written.add(format!("refusal {i} sent to the client"), body.as_bytes().to_vec());
    }
    scene.state_files("running", &mut written);
    let mut scene = scene;
    scene.gw.stop(nix::sys::signal::Signal::SIGTERM);
    written.add("gateway log", scene.gw.log().into_bytes());
    scene.state_files("stopped", &mut written);
    let lines = scene.gw.log();
    let _ = lines;
    written.assert_clean(&key);
}
