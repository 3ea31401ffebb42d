//! A reviewer works a finding end to end: a real gateway (eBPF redirect on
//! a test cgroup, TLS interception, a real HTTPS upstream) blocks curl's
//! planted key with a 403 naming the finding; the finding's timeline names
//! the process, its masked command line and the recorded session, and the
//! session links back; the reviewer allows the key for that destination
//! with a short expiry and the next identical request passes, then blocks
//! again once the entry expires; a false positive likewise stops blocking
//! until it is reopened. Placeholders in Authorization are not blocked as
//! keys while an unknown real-looking credential still is.

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gateway_tests::{
    gateway_bin, keys, run_as, unique_port,
    upstream::{TestPki, Upstream},
    wait_for, GatewayOptions, TestGateway,
};
use serde_json::Value;

const HOST: &str = "api.test.internal";
const UPSTREAM_IP: &str = "127.0.0.9";

const POLICY: &str = "version: 1\nrules: []\ndefaults:\n  action: allow\n  record: metadata\n";

struct Scene {
    gw: TestGateway,
    upstream: Upstream,
    port: u16,
    gateway_ca: PathBuf,
    _pki_dir: tempfile::TempDir,
}

impl Scene {
    fn start(name: &str) -> Scene {
        Scene::start_with(name, "")
    }

    fn start_with(name: &str, findings_yaml: &str) -> Scene {
        let pki_dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(pki_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let pki = TestPki::new(pki_dir.path(), &[HOST]);
        let port = unique_port();
        let upstream = Upstream::start(format!("{UPSTREAM_IP}:{port}").parse().expect("addr"), &pki);
        let mut opts = GatewayOptions::new(name, &[&format!("{{cidr: {UPSTREAM_IP}/32, ports: [{port}]}}")]);
        opts.proxy_yaml = "  client_first_timeout: 30s\n".into();
        opts.policy_yaml = Some(POLICY.into());
        opts.extra_yaml = format!(
            "tls:\n  intercept: ['*.test.internal']\n  extra_upstream_cas: [{ca}]\nrecord:\n  flush_interval: 50ms\n{findings_yaml}",
            ca = pki.ca_path.display(),
        );
        let gw = TestGateway::start(opts);
        let gateway_ca = gw.dir.path().join("gateway-ca.pem");
        let out = gw.cli(&["ca", "export", "--out", gateway_ca.to_str().expect("utf8")]);
        assert!(out.status.success(), "ca export: {}", String::from_utf8_lossy(&out.stderr));
        Scene { gw, upstream, port, gateway_ca, _pki_dir: pki_dir }
    }

    /// curl in the intercepted cgroup sending `authorization`: (status, body).
    fn curl(&self, authorization: &str) -> (u16, String) {
        let out = self
            .gw
            .command_in_cgroup("curl")
            .args(["-sS", "--resolve", &format!("{HOST}:{}:{UPSTREAM_IP}", self.port), "--cacert"])
            .arg(&self.gateway_ca)
            .args(gateway_tests::CURL_STATUS)
            .args(["-H", &format!("Authorization: {authorization}")])
            .arg(format!("https://{HOST}:{}/v1/models", self.port))
            .output()
            .expect("curl");
        gateway_tests::curl_reply(&out.stdout)
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.gw.cli(args);
        assert!(out.status.success(), "gateway {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli_ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("gateway {args:?}: not JSON ({e}): {out}"))
    }

    /// Waits until a request with `authorization` gets `status` (the gateway
    /// picks up a CLI decision within its one-second refresh).
    fn until_status(&self, authorization: &str, status: u16, what: &str) -> (u16, String) {
        wait_for(what, || {
            let (code, body) = self.curl(authorization);
            if code == status {
                Ok((code, body))
            } else {
                Err(format!("got {code}: {body}"))
            }
        })
    }
}

fn finding_id_in(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("403 body is not JSON ({e}): {body}"));
    v["findings"][0]["id"].as_str().unwrap_or_else(|| panic!("no finding id in {body}")).to_owned()
}

#[test]
fn a_reviewer_allows_a_key_for_a_destination_until_it_expires_and_false_positives_unblock() {
    let scene = Scene::start("review-allow");
    let key = keys::openai_key();
    let bearer = format!("Bearer {key}");

    // Blocked, naming the finding.
    let (code, body) = scene.curl(&bearer);
    assert_eq!(code, 403, "{body}");
    let id = finding_id_in(&body);
    assert!(!body.contains(&key), "the 403 must not echo the key");
    assert_eq!(scene.upstream.requests().len(), 0, "the blocked request reached the upstream");

    // The timeline: process, masked command line, session; the session links back.
    let shown = scene.cli_json(&["findings", "show", &id, "--json"]);
    let sightings = shown["sightings"].as_array().expect("sightings");
    assert_eq!(sightings.len(), 1, "{shown:#}");
    let s = &sightings[0];
    assert_eq!(s["action"], "block");
    assert_eq!(s["dest_host"], HOST);
    assert!(s["process"]["exe"].as_str().is_some_and(|e| e.ends_with("curl")), "{s:#}");
    let command = s["command"].as_str().expect("command line");
    assert!(command.contains("curl") && command.contains("Authorization: Bearer [REDACTED]"), "{command}");
    assert!(!shown.to_string().contains(&key), "the key is in the finding: {shown:#}");
    let session = s["session_id"].as_str().expect("a session id").to_owned();
    let ids = |args: &[&str]| -> Vec<String> {
        let listed = scene.cli_json(args);
        listed.as_array().expect("array").iter().filter_map(|s| s["id"].as_str().map(str::to_owned)).collect()
    };
    // The session row is written by the recorder's flush, shortly after.
    wait_for("sessions list --finding names the finding's session", || {
        let linked = ids(&["sessions", "list", "--finding", &id, "--json"]);
        if linked == [session.clone()] {
            Ok(())
        } else {
            Err(format!("{linked:?}"))
        }
    });
    wait_for("the blocked session is listed by outcome and host", || {
        let blocked = ids(&["sessions", "list", "--outcome", "blocked", "--host", "*.test.internal", "--json"]);
        if blocked.contains(&session) {
            Ok(())
        } else {
            Err(format!("{blocked:?}"))
        }
    });
    let text = scene.cli_ok(&["findings", "show", &id]);
    assert!(text.contains("sightings (1):") && text.contains(&session), "{text}");

    // Allowed elsewhere only: still blocked here.
    scene.cli_ok(&[
        "findings",
        "allow",
        &id,
        "--scope",
        "destination=elsewhere.test.internal",
        "--expires",
        "1h",
        "--reason",
        "other host",
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(scene.curl(&bearer).0, 403, "an entry for another destination must not waive this one");

    // Allowed for this destination, briefly: passes, then blocks again.
    let expires = 8;
    let out = scene.cli_ok(&[
        "findings",
        "allow",
        &id,
        "--scope",
        &format!("destination={HOST}"),
        "--expires",
        &format!("{expires}s"),
        "--reason",
        "vendor sandbox key, rotation ticket SEC-1",
    ]);
    let allowed_at = Instant::now();
    let entry = out.split(':').next().expect("entry id").trim().to_owned();
    assert!(entry.starts_with("A-"), "{out}");
    scene.until_status(&bearer, 200, "the allowed key passes");
    assert!(allowed_at.elapsed() < Duration::from_secs(expires - 2), "took too long to take effect");
    assert!(
        scene.upstream.requests().iter().any(|r| r.headers.iter().any(|(n, v)| n == "authorization" && *v == bearer)),
        "the allowed request reached the upstream unchanged"
    );
    let list = scene.cli_json(&["findings", "allowlist", "--json"]);
    assert!(list.as_array().expect("array").iter().any(|e| e["id"] == entry.as_str()), "{list:#}");
    std::thread::sleep(Duration::from_secs(expires).saturating_sub(allowed_at.elapsed()) + Duration::from_millis(200));
    let (code, body) = scene.curl(&bearer);
    assert_eq!(code, 403, "expiry restores blocking: {body}");
    assert_eq!(finding_id_in(&body), id, "the same finding");

    // The decision is audited and the passing sighting names it.
    let shown = scene.cli_json(&["findings", "show", &id, "--json"]);
    let history = shown["history"].as_array().expect("history");
    let me = nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten().map(|u| u.name).expect("user name");
    assert!(
        history.iter().any(|h| h["comment"].as_str().is_some_and(|c| c.contains(&entry)) && h["by"] == me.as_str()),
        "{history:#?}"
    );
    assert!(
        shown["sightings"].as_array().expect("sightings").iter().any(|s| s["allowed_by"] == entry.as_str()),
        "{shown:#}"
    );

    // False positive: unblocks everywhere until reopened.
    scene.cli_ok(&["findings", "false-positive", &id, "--comment", "documentation example"]);
    scene.until_status(&bearer, 200, "a false positive passes");
    scene.cli_ok(&["findings", "reopen", &id, "--comment", "it is real after all"]);
    let (_, body) = scene.until_status(&bearer, 403, "a reopened finding blocks again");
    assert_eq!(finding_id_in(&body), id);
    let log = scene.gw.log();
    assert!(!log.contains(&key), "the key is in the gateway's log");
}

/// A webhook endpoint that keeps the JSON bodies it receives.
struct Webhook {
    port: u16,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Webhook {
    fn start() -> Webhook {
        let port = unique_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("bind webhook");
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                let mut data = Vec::new();
                let mut buf = [0u8; 16 * 1024];
                let body_at = loop {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => data.extend_from_slice(&buf[..n]),
                    }
                    if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                        break Some(i + 4);
                    }
                };
                let Some(body_at) = body_at else { continue };
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
                let body = serde_json::from_slice(&data[body_at..]).unwrap_or(Value::Null);
                kept.lock().expect("bodies").push(body);
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            }
        });
        Webhook { port, bodies }
    }

    /// Waits for an event named `event` about finding `id`.
    fn wait_event(&self, event: &str, id: &str) -> Value {
        wait_for(&format!("webhook event {event} for {id}"), || {
            let bodies = self.bodies.lock().expect("bodies").clone();
            bodies
                .iter()
                .find(|b| b["event"] == event && b["finding"]["id"] == id)
                .cloned()
                .ok_or_else(|| format!("{bodies:?}"))
        })
    }
}

/// A unix group and users created for a test, removed at drop.
struct Accounts {
    group: String,
    users: Vec<String>,
}

impl Accounts {
    fn new(group: &str) -> Accounts {
        let _ = std::process::Command::new("groupdel").arg(group).stderr(std::process::Stdio::null()).status();
        let ok = std::process::Command::new("groupadd").arg(group).status().expect("groupadd");
        assert!(ok.success(), "groupadd {group}");
        Accounts { group: group.to_owned(), users: Vec::new() }
    }

    /// Creates `name` (primary group `group`); its (uid, gid).
    fn user(&mut self, name: &str, group: &str) -> (u32, u32) {
        let _ = std::process::Command::new("userdel").arg(name).stderr(std::process::Stdio::null()).status();
        let ok = std::process::Command::new("useradd")
            .args(["-M", "-N", "-g", group, "-s", "/usr/sbin/nologin", name])
            .status()
            .expect("useradd");
        assert!(ok.success(), "useradd {name}");
        self.users.push(name.to_owned());
        let user = nix::unistd::User::from_name(name).expect("getpwnam").expect("the new user");
        (user.uid.as_raw(), user.gid.as_raw())
    }
}

impl Drop for Accounts {
    fn drop(&mut self) {
        for u in &self.users {
            let _ = std::process::Command::new("userdel").arg(u).status();
        }
        let _ = std::process::Command::new("groupdel").arg(&self.group).status();
    }
}

#[test]
fn reviewers_act_through_the_socket_as_the_kernel_vouched_user_without_root() {
    let tag = std::process::id() % 100_000;
    let group = format!("gwrev{tag}");
    let mut accounts = Accounts::new(&group);
    let reviewer = format!("gwrevr{tag}");
    let (uid, gid) = accounts.user(&reviewer, &group);
    let (out_uid, out_gid) = accounts.user(&format!("gwrevo{tag}"), "nogroup");

    let socket_dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(socket_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let socket = socket_dir.path().join("review.sock");
    let hook = Webhook::start();
    let scene = Scene::start_with(
        "review-socket",
        &format!(
            "findings:\n  review_socket: {}\n  reviewers_group: {group}\n  webhook: {{ url: 'http://127.0.0.1:{}/hook' }}\n",
            socket.display(),
            hook.port
        ),
    );
    let as_user = |uid: u32, gid: u32, args: &[&str]| {
        let mut cmd = std::process::Command::new(gateway_bin());
        cmd.arg("--config").arg(&scene.gw.config_path).args(args);
        run_as(&mut cmd, uid, gid);
        cmd.output().expect("gateway cli")
    };

    let key = keys::openai_key();
    let bearer = format!("Bearer {key}");
    let (code, body) = scene.curl(&bearer);
    assert_eq!(code, 403, "{body}");
    let id = finding_id_in(&body);
    let new = hook.wait_event("finding.new", &id);
    assert!(new["finding"]["rule_id"].as_str().is_some_and(|r| r.starts_with("openai")), "{new:#}");
    assert_eq!(new["finding"]["action"], "block", "{new:#}");
    assert!(new["finding"]["session_id"].is_string(), "{new:#}");

    // The reviewer reads without root.
    let out = as_user(uid, gid, &["findings", "show", &id, "--json"]);
    assert!(out.status.success(), "reviewer show: {}", String::from_utf8_lossy(&out.stderr));
    let shown: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(shown["id"], id.as_str());
    // Somebody outside the group cannot even connect.
    let out = as_user(out_uid, out_gid, &["findings", "list"]);
    assert!(!out.status.success(), "an outsider listed findings: {}", String::from_utf8_lossy(&out.stdout));
    // Nor may the reviewer decide under another name.
    let out = as_user(uid, gid, &["findings", "ack", &id, "--comment", "x", "--by", "root"]);
    assert_eq!(out.status.code(), Some(1), "--by another name: {}", String::from_utf8_lossy(&out.stderr));

    // The decision is recorded under the reviewer's name and applies at once.
    let out = as_user(uid, gid, &["findings", "false-positive", &id, "--comment", "vendor docs example"]);
    assert!(out.status.success(), "reviewer false-positive: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(scene.curl(&bearer).0, 200, "a false positive passes at once");
    let shown = scene.cli_json(&["findings", "show", &id, "--json"]);
    let last = shown["history"].as_array().and_then(|h| h.last()).cloned().expect("history");
    assert_eq!((last["by"].as_str(), last["to"].as_str()), (Some(reviewer.as_str()), Some("false_positive")));

    let out = as_user(uid, gid, &["findings", "reopen", &id, "--comment", "real after all"]);
    assert!(out.status.success(), "reviewer reopen: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(scene.curl(&bearer).0, 403, "reopened: blocked at once");
    let out = as_user(
        uid,
        gid,
        &["findings", "allow", &id, "--scope", "everywhere", "--expires", "1h", "--reason", "migration window"],
    );
    assert!(out.status.success(), "reviewer allow: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(scene.curl(&bearer).0, 200, "allowed: passes at once");
    let list = as_user(uid, gid, &["findings", "allowlist", "--json"]);
    let list: Value = serde_json::from_slice(&list.stdout).expect("allowlist json");
    assert_eq!(list[0]["created_by"], reviewer.as_str());

    // Each decision reached the webhook, under the reviewer's name; the key never did.
    let status = hook.wait_event("finding.status", &id);
    assert_eq!(status["decision"]["by"], reviewer.as_str(), "{status:#}");
    let allowed = hook.wait_event("finding.allowed", &id);
    assert_eq!(
        (allowed["decision"]["scope"].as_str(), allowed["decision"]["created_by"].as_str()),
        (Some("everywhere"), Some(reviewer.as_str()))
    );
    let all = format!("{:?}", hook.bodies.lock().expect("bodies"));
    assert!(!all.contains(&key), "the key reached the webhook");
    drop(accounts);
}

#[test]
fn placeholders_in_authorization_pass_while_unknown_real_credentials_are_blocked() {
    let scene = Scene::start("review-placeholders");
    for placeholder in ["none", "null", "xxx", "<token>", "changeme", "abc123", "aaaaaaaaaaaaaaaaaaaaaaaaaaaa"] {
        let (code, body) = scene.curl(&format!("Bearer {placeholder}"));
        assert_eq!(code, 200, "Bearer {placeholder} was refused: {body}");
    }
    let (code, body) = scene.curl("Basic Og==");
    assert_eq!(code, 200, "an empty Basic credential was refused: {body}");
    let passed = scene.upstream.requests().len();
    assert_eq!(passed, 8, "every placeholder request reached the upstream");
    let findings = scene.cli_json(&["findings", "list", "--json"]);
    assert_eq!(findings.as_array().map(Vec::len), Some(0), "placeholders became findings: {findings:#}");

    // A real-looking credential in no known format is still a key.
    let opaque = keys::random(40);
    let (code, body) = scene.curl(&format!("Bearer {opaque}"));
    assert_eq!(code, 403, "an unknown real credential passed: {body}");
    let id = finding_id_in(&body);
    let shown = scene.cli_json(&["findings", "show", &id, "--json"]);
    assert_eq!(shown["rule_id"], "unknown-auth-credential");
    assert_eq!(shown["confidence"], "medium");
    assert_eq!(scene.upstream.requests().len(), passed, "the blocked request reached the upstream");

    // Short-lived by construction: a JWT expiring within the hour passes and
    // is reported as such; one living a month is a static key.
    let jwt = |lifetime: u64| {
        use base64::Engine as _;
        let enc = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
        let claims = serde_json::json!({"sub": "job", "exp": now + lifetime, "nonce": keys::random(24)});
        format!("{}.{}.{}", enc(serde_json::json!({"alg": "RS256"})), enc(claims), keys::random(43))
    };
    let (code, body) = scene.curl(&format!("Bearer {}", jwt(300)));
    assert_eq!(code, 200, "a JWT expiring in 5 minutes was refused: {body}");
    wait_for("a log line reporting the short-lived token", || {
        let lines = scene.gw.log_messages("short-lived credential sent by a job (not a static key)");
        lines.first().cloned().ok_or("none yet")
    });
    let (code, body) = scene.curl(&format!("Bearer {}", jwt(30 * 86_400)));
    assert_eq!(code, 403, "a month-long JWT passed: {body}");
}
