//! `/metrics` against what the gateway logged: a real gateway (real eBPF
//! redirect, TLS interception, a real HTTPS upstream) serves jobs in its
//! cgroup that make allowed requests, requests carrying a hard-coded key
//! (blocked), a request the policy denies, one held for approval (and
//! approved) and a connection speaking a protocol the gateway does not
//! inspect (refused). curl scrapes
//! `/metrics` on the public listener, the Prometheus client library's own
//! OpenMetrics parser (Python `prometheus_client`, strict about the format)
//! reads it, and every counter is compared with the connection, finding and
//! policy events of the gateway's JSON log and with `gateway status`.
//!
//! Also: the example alert rules (`deploy/prometheus/alerts.yml`) pass
//! `promtool check rules`.

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use gateway_tests::{
    keys, unique_port,
    upstream::{TestPki, Upstream},
    wait_for, GatewayOptions, TestGateway,
};
use serde_json::Value;

const HOST: &str = "metrics.test.internal";
const UPSTREAM_IP: &str = "127.0.0.61";

const POLICY: &str = r#"version: 1
rules:
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
  static_keys: block
"#;

/// Parses OpenMetrics text from stdin with `prometheus_client`'s parser
/// and prints every sample as JSON: `[name, labels, value]`.
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"family": family.name, "type": family.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// One parsed sample.
#[derive(Debug, Clone)]
struct Sample {
    family: String,
    kind: String,
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parsed samples, looked up by name and labels.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
}

impl Scrape {
    /// The value of the sample `name` with exactly `labels`; panics if absent.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
            .unwrap_or_else(|| panic!("no sample {name}{want:?} in the scrape:\n{}", self.text))
    }

    /// Every sample named `name`.
    fn all(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

/// Scrapes `/metrics` with curl (outside the intercepted cgroup) and
/// parses it with the Python client's OpenMetrics parser.
fn scrape(gw: &TestGateway) -> Scrape {
    let url = format!("http://127.0.0.1:{}/metrics", gw.api_port);
    let out = Command::new("curl").args(["-sS", "--fail", "-D", "-", &url]).output().expect("run curl");
    assert!(out.status.success(), "curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    let response = String::from_utf8(out.stdout).expect("metrics are UTF-8");
    let (head, text) = response.split_once("\r\n\r\n").expect("an HTTP head");
    let content_type = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type:").map(|v| v.trim().to_owned()))
        .expect("a content type");
    assert!(content_type.starts_with("application/openmetrics-text"), "content type {content_type}");
    let mut python = Command::new("python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    python.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write to python");
    let parsed = python.wait_with_output().expect("python");
    assert!(
        parsed.status.success(),
        "the OpenMetrics parser rejected /metrics (is prometheus-client installed? `cargo xtask setup`): {}\n{text}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let json: Vec<Value> = serde_json::from_slice(&parsed.stdout).expect("parser output");
    let samples = json
        .iter()
        .map(|s| Sample {
            family: s["family"].as_str().expect("family").to_owned(),
            kind: s["type"].as_str().expect("type").to_owned(),
            name: s["name"].as_str().expect("name").to_owned(),
            labels: serde_json::from_value(s["labels"].clone()).expect("labels"),
            value: s["value"].as_f64().expect("value"),
        })
        .collect();
    Scrape { text: text.to_owned(), samples }
}

/// Events of `target` in the gateway's JSON log.
fn events(gw: &TestGateway, target: &str) -> Vec<Value> {
    gw.log().lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|v| v["target"] == target).collect()
}

fn curl(gw: &TestGateway, ca: &Path, port: u16, args: &[&str]) -> u16 {
    let out = gw
        .command_in_cgroup("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--resolve", &format!("{HOST}:{port}:{UPSTREAM_IP}")])
        .arg("--cacert")
        .arg(ca)
        .args(args)
        .output()
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
}

#[test]
fn metrics_parse_and_match_the_events() {
    let pki_dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(pki_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let pki = TestPki::new(pki_dir.path(), &[HOST]);
    let port = unique_port();
    let _upstream = Upstream::start(format!("{UPSTREAM_IP}:{port}").parse().expect("addr"), &pki);
    let policy = pki_dir.path().join("policy.yaml");
    std::fs::write(&policy, POLICY).expect("write policy");
    let mut opts = GatewayOptions::new("metrics", &[&format!("{{cidr: {UPSTREAM_IP}/32, ports: [{port}]}}")]);
    opts.proxy_yaml = "  client_first_timeout: 30s\n".into();
    opts.extra_yaml = format!(
        "tls:\n  intercept: ['*.test.internal']\n  extra_upstream_cas: [{ca}]\n\
         policy:\n  file: {policy}\n  watch: false\n\
         approvals:\n  groups: {{ release: [alice] }}\n\
         record:\n  flush_interval: 50ms\n",
        ca = pki.ca_path.display(),
        policy = policy.display(),
    );
    let gw = TestGateway::start(opts);
    let ca: PathBuf = gw.dir.path().join("gateway-ca.pem");
    let out = gw.cli(&["ca", "export", "--out", ca.to_str().expect("utf8")]);
    assert!(out.status.success(), "ca export: {}", String::from_utf8_lossy(&out.stderr));

    // Before any traffic: every bounded series is there, at zero.
    let before = scrape(&gw);
    assert_eq!(before.get("gateway_connections_total", &[("protocol", "https"), ("outcome", "closed")]), 0.0);
    assert_eq!(before.get("gateway_approvals_pending", &[]), 0.0);

    let url = |path: &str| format!("https://{HOST}:{port}{path}");
    const ALLOWED: usize = 3;
    for i in 0..ALLOWED {
        assert_eq!(curl(&gw, &ca, port, &[&url(&format!("/ok/{i}"))]), 200, "allowed request {i}");
    }
    let keys = [keys::github_token(), keys::openai_key()];
    for key in &keys {
        let header = format!("Authorization: Bearer {key}");
        assert_eq!(curl(&gw, &ca, port, &["-H", &header, &url("/with-key")]), 403, "a hard-coded key is blocked");
    }
    assert_eq!(curl(&gw, &ca, port, &[&url("/deny/x")]), 403, "denied by policy");
    // A protocol the gateway does not inspect, to a protected destination.
    let refused = gw
        .command_in_cgroup("python3")
        .args([
            "-c",
            "import socket,sys\ns=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)\n\
             s.sendall(b'HELLO not a protocol\\r\\n')\n\
             try:\n    print(len(s.recv(100)))\nexcept ConnectionResetError:\n    print(0)",
            UPSTREAM_IP,
            &port.to_string(),
        ])
        .output()
        .expect("python3");
    assert!(refused.status.success(), "raw client: {}", String::from_utf8_lossy(&refused.stderr));
    assert_eq!(String::from_utf8_lossy(&refused.stdout).trim(), "0", "the gateway closes what it cannot inspect");

    // Held for approval: the pending gauge shows it while it waits.
    let mut held = gw
        .command_in_cgroup("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--resolve", &format!("{HOST}:{port}:{UPSTREAM_IP}")])
        .arg("--cacert")
        .arg(&ca)
        .arg(url("/approve/deploy"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    wait_for("the held request shows in gateway_approvals_pending", || {
        let pending = scrape(&gw).get("gateway_approvals_pending", &[]);
        if pending == 1.0 {
            Ok(())
        } else {
            Err(format!("pending {pending}; gateway errors:\n{}", gw.log_errors()))
        }
    });
    let list = gw.cli(&["approvals", "list", "--json"]);
    let list: Value = serde_json::from_slice(&list.stdout).expect("approvals list --json");
    let id = list.as_array().into_iter().flatten().find(|a| a["state"] == "pending").expect("a pending approval")["id"]
        .as_str()
        .expect("approval id")
        .to_owned();
    let approved = gw.cli(&["approvals", "approve", &id, "--by", "alice"]);
    assert!(approved.status.success(), "approve: {}", String::from_utf8_lossy(&approved.stderr));
    let mut status = String::new();
    std::io::Read::read_to_string(&mut held.stdout.take().expect("stdout"), &mut status).expect("curl output");
    assert!(held.wait().expect("curl").success());
    assert_eq!(status.trim(), "200", "the approved request went through");
    const FORWARDED: usize = ALLOWED + 1;

    let connections = FORWARDED + keys.len() + 2;
    let conns = gw.wait_events(connections);
    assert_eq!(conns.len(), connections, "one event per connection:\n{}", gw.log_errors());
    // The status is read after the last connection: nothing connects between it and the scrape.
    let status = gw.status();
    let m = scrape(&gw);

    // Connections by protocol and outcome: exactly the events' counts.
    let mut by_pair: BTreeMap<(String, String), f64> = BTreeMap::new();
    for e in &conns {
        let protocol = e["protocol"].as_str().unwrap_or("none").to_owned();
        let outcome = e["outcome"].as_str().expect("outcome").to_owned();
        *by_pair.entry((protocol, outcome)).or_default() += 1.0;
    }
    for s in m.all("gateway_connections_total") {
        let key = (s.labels["protocol"].clone(), s.labels["outcome"].clone());
        assert_eq!(s.value, by_pair.get(&key).copied().unwrap_or(0.0), "connections {key:?}; events {by_pair:?}");
    }
    assert_eq!(by_pair.get(&("https".into(), "closed".into())), Some(&(FORWARDED as f64)), "{by_pair:?}");
    assert_eq!(by_pair.get(&("https".into(), "blocked".into())), Some(&3.0), "{by_pair:?}");
    assert_eq!(by_pair.get(&("tcp".into(), "blocked".into())), Some(&1.0), "{by_pair:?}");
    let family = m.samples.iter().find(|s| s.name == "gateway_connections_total").expect("connections");
    assert_eq!((family.family.as_str(), family.kind.as_str()), ("gateway_connections", "counter"));

    // Requests by decision: the policy's, for every request the events count.
    let http_requests: f64 = conns.iter().filter_map(|e| e["requests"].as_f64()).sum();
    let decided: f64 =
        m.all("gateway_requests_total").iter().filter(|s| s.labels["kind"] == "http").map(|s| s.value).sum();
    assert_eq!(decided, http_requests, "every HTTP request the events count is decided once");
    assert_eq!(
        m.get("gateway_requests_total", &[("kind", "http"), ("decision", "allow")]),
        (ALLOWED + keys.len()) as f64
    );
    assert_eq!(m.get("gateway_requests_total", &[("kind", "http"), ("decision", "deny")]), 1.0);
    assert_eq!(m.get("gateway_requests_total", &[("kind", "http"), ("decision", "require_approval")]), 1.0);
    assert_eq!(m.get("gateway_policy_evaluation_duration_seconds_count", &[("kind", "http")]), http_requests);

    // Refusals by reason: the policy log's, plus the keys' blocks.
    let policy_refusals = events(&gw, "gateway::policy");
    let refused_with = |code: &str| policy_refusals.iter().filter(|e| e["reason"] == code).count() as f64;
    assert_eq!(m.get("gateway_refusals_total", &[("reason", "denied_by_policy")]), refused_with("denied_by_policy"));
    assert_eq!(m.get("gateway_refusals_total", &[("reason", "denied_by_policy")]), 1.0);
    assert_eq!(m.get("gateway_refusals_total", &[("reason", "uninspectable")]), refused_with("uninspectable"));
    assert_eq!(m.get("gateway_refusals_total", &[("reason", "uninspectable")]), 1.0);
    assert_eq!(m.get("gateway_refusals_total", &[("reason", "static_credential_blocked")]), keys.len() as f64);
    assert_eq!(m.get("gateway_refusals_total", &[("reason", "limit")]), 0.0);

    // Findings by rule and action: the finding events'.
    let findings: Vec<Value> =
        events(&gw, "gateway::finding").into_iter().filter(|e| e["message"] == "static credential").collect();
    assert_eq!(findings.len(), keys.len(), "one finding per key:\n{}", gw.log_errors());
    let mut by_rule: BTreeMap<(String, String), f64> = BTreeMap::new();
    for f in &findings {
        let key = (f["rule"].as_str().expect("rule").to_owned(), f["action"].as_str().expect("action").to_owned());
        *by_rule.entry(key).or_default() += 1.0;
    }
    let exported: BTreeMap<(String, String), f64> = m
        .all("gateway_findings_total")
        .iter()
        .map(|s| ((s.labels["rule"].clone(), s.labels["action"].clone()), s.value))
        .collect();
    assert_eq!(exported, by_rule, "findings by rule and action");

    // eBPF counters, read at the scrape: what `gateway status` reads.
    for (name, value) in status["stats"].as_object().expect("status stats") {
        assert_eq!(
            m.get("gateway_ebpf_events_total", &[("event", name)]),
            value.as_f64().expect("stat"),
            "eBPF counter {name}"
        );
    }
    assert!(m.get("gateway_ebpf_events_total", &[("event", "redirected")]) >= connections as f64);

    // Attestation: every attributed connection looked up the cache once.
    let attested = |how: &str| conns.iter().filter(|e| e["attestation"] == how).count() as f64;
    let lookups = m.get("gateway_attestation_cache_lookups_total", &[("result", "hit")])
        + m.get("gateway_attestation_cache_lookups_total", &[("result", "miss")]);
    assert_eq!(lookups, conns.iter().filter(|e| e["attestation"].is_string()).count() as f64);
    assert_eq!(m.get("gateway_attestation_cache_lookups_total", &[("result", "hit")]), attested("cached"));
    assert_eq!(m.get("gateway_attestation_duration_seconds_count", &[]), attested("fresh") + attested("unattested"),);

    // Upstream: one connect and one response per allowed request (curl
    // opens a connection per run; blocked and denied ones never leave).
    assert_eq!(m.get("gateway_upstream_connect_duration_seconds_count", &[]), FORWARDED as f64);
    assert_eq!(m.get("gateway_upstream_response_duration_seconds_count", &[]), FORWARDED as f64);
    assert!(m.get("gateway_upstream_response_duration_seconds_sum", &[]) > 0.0);

    // Approvals: the one asked was approved; none is held now.
    assert_eq!(m.get("gateway_approvals_pending", &[]), 0.0);
    assert_eq!(m.get("gateway_approvals_decided_total", &[("outcome", "approved")]), 1.0);
    assert_eq!(m.all("gateway_approvals_decided_total").iter().map(|s| s.value).sum::<f64>(), 1.0);
    // The recorder's queue is exported (recording is on by default).
    wait_for("the recorder's queue drains", || {
        let q = scrape(&gw).get("gateway_recorder_queue_records", &[]);
        if q == 0.0 {
            Ok(())
        } else {
            Err(format!("{q} records queued"))
        }
    });

    // Nothing identifying in a label: no key, fingerprint, host or identity.
    for key in &keys {
        assert!(!m.text.contains(key.as_str()), "a key in /metrics");
    }
    for f in &findings {
        let fingerprint = f["fingerprint"].as_str().expect("fingerprint");
        assert!(!m.text.contains(fingerprint), "a fingerprint in /metrics");
    }
    for word in [HOST, UPSTREAM_IP, "identity", "/ok/"] {
        assert!(!m.text.contains(word), "`{word}` in /metrics:\n{}", m.text);
    }

    // The metrics do not keep the interceptor: a clean stop still leaves
    // the programs refusing (deny mode), as without metrics.
    let mut gw = gw;
    gw.stop(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(gw.status()["mode"], "deny", "clean shutdown:\n{}", gw.log_errors());
}

/// The example alert rules are valid Prometheus rules (`promtool`, from
/// Debian's `prometheus` package, installed by `cargo xtask setup`).
#[test]
fn the_example_alert_rules_pass_promtool() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yml");
    assert!(rules.exists(), "{} is missing", rules.display());
    let out = Command::new("promtool").args(["check", "rules"]).arg(&rules).output().unwrap_or_else(|e| {
        panic!("cannot run promtool ({e}): install Debian's `prometheus` package (`cargo xtask setup` does)")
    });
    assert!(
        out.status.success(),
        "promtool check rules {}:\n{}{}",
        rules.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every metric an alert uses is one the gateway exports (docs/metrics.md).
    let text = std::fs::read_to_string(&rules).expect("read rules");
    let docs = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md"))
        .expect("read docs/metrics.md");
    let mut used = 0;
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if let Some(family) = word.strip_prefix("gateway_") {
            let base =
                ["_total", "_bucket", "_count", "_sum"].iter().find_map(|s| family.strip_suffix(s)).unwrap_or(family);
            assert!(
                docs.contains(&format!("gateway_{base}")),
                "alerts.yml uses gateway_{family}, not in docs/metrics.md"
            );
            used += 1;
        }
    }
    assert!(used >= 5, "alerts.yml uses only {used} gateway metrics");
}
