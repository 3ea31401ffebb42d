//! `static_keys: redact` end to end: a real eBPF redirect, a real gateway
//! terminating TLS, real clients in the intercepted cgroup (curl, Python's
//! `http.client` sending chunks, the `openai` SDK streaming and not) and a
//! real HTTPS upstream that records what it received. A key in a prompt
//! body reaches upstream only as `[REDACTED:<rule>:<fingerprint prefix>]`,
//! with the body's encoding and length corrected; a key presented in an
//! auth header is still blocked. Keys are compared by presence only,
//! never printed.

use std::{io::Write as _, path::PathBuf, process::Output};

use gateway_tests::{
    keys, unique_port,
    upstream::{Received, TestPki, Upstream},
    GatewayOptions, TestGateway,
};
use serde_json::Value;

const HOST: &str = "api.test.internal";
const UPSTREAM_IP: &str = "127.0.0.9";

const POLICY: &str = r#"version: 1
rules:
  - name: prompts
    match: { request: { path: "/v1/**" } }
    action: allow
    static_keys: redact
defaults:
  action: allow
  record: full
  static_keys: block
"#;

struct Scene {
    gw: TestGateway,
    upstream: Upstream,
    port: u16,
    gateway_ca: PathBuf,
    dir: tempfile::TempDir,
}

impl Scene {
    fn start() -> Scene {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let pki = TestPki::new(dir.path(), &[HOST]);
        let port = unique_port();
        let upstream = Upstream::start(format!("{UPSTREAM_IP}:{port}").parse().expect("addr"), &pki);
        let mut opts = GatewayOptions::new("redact", &[&format!("{{cidr: {UPSTREAM_IP}/32, ports: [{port}]}}")]);
        opts.proxy_yaml = "  client_first_timeout: 30s\n".to_owned();
        opts.policy_yaml = Some(POLICY.to_owned());
        opts.extra_yaml =
            format!("tls:\n  intercept: ['*.test.internal']\n  extra_upstream_cas: [{}]\n", pki.ca_path.display());
        let gw = TestGateway::start(opts);
        let gateway_ca = gw.dir.path().join("gateway-ca.pem");
        let out = gw.cli(&["ca", "export", "--out", gateway_ca.to_str().expect("utf8")]);
        assert!(out.status.success(), "ca export: {}", String::from_utf8_lossy(&out.stderr));
        Scene { gw, upstream, port, gateway_ca, dir }
    }

    fn ca(&self) -> &str {
        self.gateway_ca.to_str().expect("utf8")
    }

    /// A Python program in the intercepted cgroup with `HOST` resolving to
    /// the upstream.
    fn python(&self, program: &str) -> (bool, String) {
        let prelude = format!(
            "import socket\n_gai = socket.getaddrinfo\n\
             def _resolve(host, *a, **k):\n    return _gai('{UPSTREAM_IP}' if host == '{HOST}' else host, *a, **k)\n\
             socket.getaddrinfo = _resolve\n"
        );
        let out =
            self.gw.command_in_cgroup("python3").arg("-c").arg(format!("{prelude}{program}")).output().expect("python");
        output(&out)
    }

    /// curl in the intercepted cgroup: (status, body).
    fn curl(&self, args: &[&str], path: &str) -> (u16, String) {
        let out = self
            .gw
            .command_in_cgroup("curl")
            .args(["-sS", "-o", "-", "-w", "\n%{http_code}", "--cacert", self.ca()])
            .args(["--resolve", &format!("{HOST}:{}:{UPSTREAM_IP}", self.port)])
            .args(args)
            .arg(format!("https://{HOST}:{}{path}", self.port))
            .output()
            .expect("curl");
        gateway_tests::curl_reply(&out.stdout)
    }

    fn findings(&self) -> Vec<Value> {
        let out = self.gw.cli(&["findings", "list", "--json"]);
        assert!(out.status.success(), "findings list: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).expect("findings json").as_array().cloned().unwrap_or_default()
    }

    /// The one request upstream received at `path`.
    fn received(&self, path: &str) -> Received {
        let got: Vec<Received> = self.upstream.requests().into_iter().filter(|r| r.target == path).collect();
        assert_eq!(got.len(), 1, "upstream received {} requests at {path}", got.len());
        got.into_iter().next().expect("one")
    }
}

fn output(out: &Output) -> (bool, String) {
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn header<'a>(r: &'a Received, name: &str) -> Option<&'a str> {
    r.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// Upstream got the body with `key` replaced by the placeholder of a
/// finding that says `redact`; a declared length matches what came.
fn assert_redacted(scene: &Scene, r: &Received, body: &[u8], key: &str, what: &str) {
    assert!(!contains(body, key), "{what}: upstream received the key");
    assert!(!r.headers.iter().any(|(_, v)| v.contains(key)), "{what}: the key is in a header upstream saw");
    let text = String::from_utf8_lossy(body);
    let placeholder_at =
        text.find("[REDACTED:aws-access-key-id:").unwrap_or_else(|| panic!("{what}: no placeholder in {text}"));
    let prefix = &text[placeholder_at + "[REDACTED:aws-access-key-id:".len()..];
    let prefix = &prefix[..prefix.find(']').expect("placeholder ends")];
    if let Some(len) = header(r, "content-length") {
        assert_eq!(len.parse::<usize>().expect("length"), r.body.len(), "{what}: the declared length is the body's");
    }
    let findings = scene.findings();
    let f = findings
        .iter()
        .find(|f| f["fingerprint"].as_str().is_some_and(|fp| fp.trim_start_matches("hmac-sha256:").starts_with(prefix)))
        .unwrap_or_else(|| panic!("{what}: no finding with fingerprint {prefix}…"));
    assert_eq!(f["rule_id"], "aws-access-key-id", "{what}");
    assert_eq!(f["action"], "redact", "{what}: the finding records the redaction");
}

#[test]
fn keys_in_prompt_bodies_reach_upstream_redacted() {
    gateway_tests::require_root();
    let scene = Scene::start();
    let mut sent: Vec<(String, String)> = Vec::new();

    // 1. A JSON prompt, with a declared length.
    let key = keys::aws_access_key_id();
    let prompt = serde_json::json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": format!("why does this fail?\nexport AWS_ACCESS_KEY_ID={key}\n")}],
    })
    .to_string();
    let (status, body) = scene.curl(&["-H", "content-type: application/json", "--data-binary", &prompt], "/v1/json");
    assert_eq!(status, 200, "the redacted request is forwarded: {}", body.replace(&key, "<key>"));
    let r = scene.received("/v1/json");
    assert_redacted(&scene, &r, &r.body, &key, "json");
    sent.push(("json".into(), key.clone()));
    let doc: Value = serde_json::from_slice(&r.body).expect("still JSON");
    assert_eq!(doc["model"], "gpt-4o", "the rest of the prompt is untouched");

    // 2. A gzip body: redacted inside, still gzip.
    let key = keys::aws_access_key_id();
    let gz_file = scene.dir.path().join("prompt.json.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(format!("{{\"prompt\": \"deploy with {key} please\"}}").as_bytes()).expect("gzip");
    std::fs::write(&gz_file, gz.finish().expect("gzip")).expect("write");
    let data = format!("@{}", gz_file.display());
    let (status, _) = scene.curl(
        &["-H", "content-type: application/json", "-H", "content-encoding: gzip", "--data-binary", &data],
        "/v1/gzip",
    );
    assert_eq!(status, 200, "gzip");
    let r = scene.received("/v1/gzip");
    assert_eq!(header(&r, "content-encoding"), Some("gzip"));
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(&r.body[..]), &mut plain).expect("still gzip");
    assert_redacted(&scene, &r, &plain, &key, "gzip");
    sent.push(("gzip".into(), key.clone()));

    // 3. Chunked, the key split across two chunks sent apart.
    let key = keys::aws_access_key_id();
    let (a, b) = key.split_at(9);
    let ca = scene.ca();
    let port = scene.port;
    let (ok, text) = scene.python(&format!(
        "import http.client, ssl, time\n\
         ctx = ssl.create_default_context(cafile='{ca}')\n\
         def body():\n    yield b'{{\"text\": \"key {a}'\n    time.sleep(0.3)\n    yield b'{b} end\"}}'\n\
         c = http.client.HTTPSConnection('{HOST}', {port}, context=ctx)\n\
         c.request('POST', '/v1/chunked', body=body(), headers={{'content-type': 'application/json'}}, encode_chunked=True)\n\
         print('status', c.getresponse().status)\n"
    ));
    assert!(ok && text.contains("status 200"), "chunked: {}", text.replace(&key, "<key>"));
    let r = scene.received("/v1/chunked");
    assert_redacted(&scene, &r, &r.body, &key, "chunked");
    sent.push(("chunked".into(), key.clone()));

    // 4. The openai SDK, streamed and not: the key in a message.
    for stream in [false, true] {
        let key = keys::aws_access_key_id();
        let py_stream = if stream { "True" } else { "False" };
        let path = if stream { "/v1/sdk-stream/chat/completions" } else { "/v1/sdk/chat/completions" };
        let base = path.trim_end_matches("/chat/completions");
        let (ok, text) = scene.python(&format!(
            "import openai\n\
             c = openai.OpenAI(api_key='not-a-key', base_url='https://{HOST}:{port}{base}', max_retries=0, http_client=openai.DefaultHttpxClient(verify='{ca}'))\n\
             try:\n    r = c.chat.completions.create(model='gpt-4o', stream={py_stream}, messages=[{{'role': 'user', 'content': 'my config: AWS_ACCESS_KEY_ID={key}'}}])\n    list(r) if {py_stream} else r\n    print('sent')\n\
             except openai.APIStatusError as e:\n    print('refused', e.status_code)\n\
             except Exception as e:\n    print('sent; the reply is not a completion:', type(e).__name__)\n"
        ));
        assert!(ok && text.contains("sent"), "openai stream={stream}: {}", text.replace(&key, "<key>"));
        let r = scene.received(path);
        assert_redacted(&scene, &r, &r.body, &key, &format!("openai stream={stream}"));
        sent.push((format!("openai stream={stream}"), key.clone()));
        let doc: Value = serde_json::from_slice(&r.body).expect("the SDK's JSON");
        assert_eq!(doc["stream"].as_bool().unwrap_or(false), stream, "the SDK's own request");
    }

    // 5. A key where credentials go is still blocked: nothing reaches upstream.
    let key = keys::aws_access_key_id();
    let auth = format!("authorization: Bearer {key}");
    let (status, body) = scene.curl(&["-H", &auth, "--data-binary", "{}"], "/v1/auth");
    assert_eq!(status, 403, "a key in an auth header is blocked: {}", body.replace(&key, "<key>"));
    assert!(!body.contains(&key));
    assert!(scene.upstream.requests().iter().all(|r| r.target != "/v1/auth"), "nothing reached upstream");
    sent.push(("auth header".into(), key.clone()));

    // The gateway's log holds none of the keys.
    let log = scene.gw.log();
    for (what, key) in &sent {
        assert!(!log.contains(key.as_str()), "the log holds the {what} key");
    }
}
