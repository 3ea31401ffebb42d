//! Policy, just-in-time approval, response masking and session recording,
//! end to end: real eBPF redirect, a real gateway with a policy file, curl
//! and Python clients in the intercepted cgroup, a real HTTPS upstream, the
//! `gateway approvals` and `gateway sessions` commands as second processes,
//! and the SQLite session database read back (and tampered with).

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use gateway_tests::{
    keys::github_token,
    unique_port,
    upstream::{TestPki, Upstream},
    wait_for, GatewayOptions, TestGateway, PATIENCE,
};
use serde_json::Value;

const HOST: &str = "api.test.internal";
const UPSTREAM_IP: &str = "127.0.0.7";

const POLICY: &str = r#"version: 1
rules:
  - name: deny-admin
    match: { request: { path: "/admin/**" } }
    action: deny
    reason: "admin endpoints are off limits for CI"
  - name: deploy-needs-approval
    match: { request: { method: [POST], path: "/deploy/**" } }
    action: require_approval
    approval: { group: release, min_approvals: 1, timeout: 60s }
  - name: prod-needs-two
    match: { request: { path: "/prod/**" } }
    action: require_approval
    approval: { group: release, min_approvals: 2, timeout: 60s }
  - name: quick-approval
    match: { request: { path: "/quick/**" } }
    action: require_approval
    approval: { group: release, min_approvals: 1, timeout: 2s }
  - name: mask-leaks
    match: { request: { path: "/leak/**" } }
    action: allow
    mask: { rules: all, json_fields: [password] }
  - name: quiet
    match: { request: { path: "/quiet/**" } }
    action: allow
    record: metadata
  - name: no-raw-tcp
    match: { destination: { protocol: tcp } }
    action: deny
    reason: "raw TCP to internal hosts is not allowed"
defaults:
  action: allow
  record: full
"#;

struct Scene {
    gw: TestGateway,
    upstream: Upstream,
    port: u16,
    gateway_ca: PathBuf,
    policy: PathBuf,
    _pki_dir: tempfile::TempDir,
}

impl Scene {
    fn start(name: &str) -> Scene {
        Scene::start_with(name, &[])
    }

    /// A scene that also intercepts `extra` destinations (YAML list items).
    fn start_with(name: &str, extra: &[&str]) -> Scene {
        let pki_dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(pki_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let pki = TestPki::new(pki_dir.path(), &[HOST]);
        let port = unique_port();
        let upstream = Upstream::start(format!("{UPSTREAM_IP}:{port}").parse().expect("addr"), &pki);
        let policy = pki_dir.path().join("policy.yaml");
        std::fs::write(&policy, POLICY).expect("write policy");
        let upstream_dest = format!("{{cidr: {UPSTREAM_IP}/32, ports: [{port}]}}");
        let mut destinations = vec![upstream_dest.as_str()];
        destinations.extend_from_slice(extra);
        let mut opts = GatewayOptions::new(name, &destinations);
        // Every client here speaks first. One that the loaded machine holds
        // up for longer than the default 500 ms would make the gateway dial
        // upstream to see who speaks first (still inspected), and the tcp
        // test asserts that a denied connection never reaches its server.
        opts.proxy_yaml = "  client_first_timeout: 30s\n".into();
        opts.extra_yaml = format!(
            "tls:\n  intercept: ['*.test.internal']\n  extra_upstream_cas: [{ca}]\n\
             policy:\n  file: {policy}\n  watch: false\n\
             approvals:\n  groups: {{ release: [alice, bob] }}\n\
             record:\n  flush_interval: 50ms\n",
            ca = pki.ca_path.display(),
            policy = policy.display(),
        );
        let gw = TestGateway::start(opts);
        let gateway_ca = gw.dir.path().join("gateway-ca.pem");
        let out = gw.cli(&["ca", "export", "--out", gateway_ca.to_str().expect("utf8")]);
        assert!(out.status.success(), "ca export: {}", String::from_utf8_lossy(&out.stderr));
        Scene { gw, upstream, port, gateway_ca, policy, _pki_dir: pki_dir }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{HOST}:{}{path}", self.port)
    }

    /// curl in the intercepted cgroup, trusting only the gateway CA.
    fn curl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = self.gw.command_in_cgroup("curl");
        cmd.args(["-sS", "--resolve", &format!("{HOST}:{}:{UPSTREAM_IP}", self.port), "--cacert"])
            .arg(&self.gateway_ca)
            .args(gateway_tests::CURL_STATUS)
            .args(args);
        cmd
    }

    fn curl(&self, args: &[&str]) -> (u16, String) {
        gateway_tests::curl_reply(&self.curl_cmd(args).output().expect("curl").stdout)
    }

    fn spawn_curl(&self, args: &[&str]) -> Child {
        self.curl_cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("curl")
    }

    fn received(&self, path: &str) -> usize {
        self.upstream.requests().iter().filter(|r| r.target.starts_with(path)).count()
    }

    fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.gw.cli(args);
        assert!(out.status.success(), "gateway {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("gateway {args:?}: not JSON ({e})"))
    }

    /// Waits for the pending approval of a request to `path`.
    fn pending(&self, path: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let list = self.cli_json(&["approvals", "list", "--json"]);
            let found = list
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["state"] == "pending" && a["url"].as_str().is_some_and(|u| u.starts_with(path)));
            if let Some(a) = found {
                return a.clone();
            }
            assert!(Instant::now() < deadline, "no pending approval for {path}: {list:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn decide(&self, id: &str, verb: &str, by: &str) -> std::process::Output {
        self.gw.cli(&["approvals", verb, id, "--by", by, "--comment", "e2e"])
    }

    fn sessions(&self) -> Vec<Value> {
        self.cli_json(&["sessions", "list", "--json"]).as_array().cloned().unwrap_or_default()
    }

    /// The exchanges (their `data` documents) committed so far, all sessions.
    fn recorded_exchanges(&self) -> Vec<Value> {
        self.sessions()
            .iter()
            .flat_map(|s| {
                let out = self.gw.cli(&["sessions", "export", &session_id(s)]);
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .filter_map(|r| r["data"].as_str().and_then(|d| serde_json::from_str::<Value>(d).ok()))
                    .filter(|d| d.get("url").is_some())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Waits until the recorder committed an exchange for each of `urls`.
    /// Records are committed by a background writer every flush interval,
    /// so a response the client already has may not be in the database yet.
    fn wait_recorded(&self, urls: &[&str]) -> Vec<Value> {
        wait_for("the exchanges are recorded", || {
            let data = self.recorded_exchanges();
            let missing: Vec<&&str> = urls.iter().filter(|u| !data.iter().any(|d| d["url"] == **u)).collect();
            if missing.is_empty() {
                Ok(data)
            } else {
                Err(format!("not yet recorded: {missing:?}; gateway errors:\n{}", self.gw.log_errors()))
            }
        })
    }

    fn database(&self) -> PathBuf {
        self.gw.dir.path().join("state").join("sessions.db")
    }
}

fn session_id(s: &Value) -> String {
    s["session"].as_str().or(s["id"].as_str()).expect("session id").to_owned()
}

fn finish(child: Child) -> (u16, String) {
    let out = child.wait_with_output().expect("curl");
    gateway_tests::curl_reply(&out.stdout)
}

fn still_waiting(child: &mut Child) -> bool {
    child.try_wait().expect("try_wait").is_none()
}

#[test]
fn allow_and_deny_with_the_reason_shown_to_the_client() {
    let scene = Scene::start("pol-deny");
    let (status, _) = scene.curl(&[&scene.url("/hello")]);
    assert_eq!(status, 200);
    let (status, body) = scene.curl(&[&scene.url("/admin/users")]);
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["error"], "denied_by_policy");
    assert_eq!(v["rule"], "deny-admin");
    assert_eq!(v["reason"], "admin endpoints are off limits for CI");
    assert_eq!(scene.received("/admin"), 0, "a denied request never reaches upstream");
    assert_eq!(scene.received("/hello"), 1);
    // A hard-coded key in a denied request still becomes a finding.
    let token = github_token();
    let (status, _) = scene.curl(&["-H", &format!("X-Api-Token: {token}"), &scene.url("/admin/keys")]);
    assert_eq!(status, 403);
    let findings = scene.cli_json(&["findings", "list", "--json"]);
    let found =
        findings.as_array().into_iter().flatten().any(|f| f["rule_id"].as_str().is_some_and(|r| r.contains("github")));
    assert!(found, "no finding for the key in the denied request: {findings:#}");
    assert!(!findings.to_string().contains(&token), "findings never hold the key");
}

#[test]
fn approval_granted_by_a_second_process_releases_the_waiting_request() {
    let scene = Scene::start("pol-approve");
    let mut client = scene.spawn_curl(&["-X", "POST", "-d", "{\"release\": \"v1.2\"}", &scene.url("/deploy/app")]);
    let pending = scene.pending("/deploy/app");
    let id = pending["id"].as_str().expect("id").to_owned();
    assert_eq!(pending["rule"], "deploy-needs-approval");
    assert!(pending["body_preview"].as_str().unwrap_or_default().contains("v1.2"), "{pending:#}");
    assert!(pending["identity"].as_str().unwrap_or_default().starts_with("spiffe://"), "{pending:#}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(still_waiting(&mut client), "the client must wait for the decision");
    assert_eq!(scene.received("/deploy"), 0, "nothing reaches upstream before approval");

    // A non-member of the group cannot approve.
    let out = scene.decide(&id, "approve", "mallory");
    assert!(!out.status.success(), "mallory is not in the release group");
    let out = scene.decide(&id, "approve", "alice");
    assert!(out.status.success(), "approve: {}", String::from_utf8_lossy(&out.stderr));
    let (status, body) = finish(client);
    assert_eq!(status, 200, "{body}");
    assert_eq!(scene.received("/deploy/app"), 1);
    let shown = scene.cli_json(&["approvals", "show", &id, "--json"]);
    assert_eq!(shown["state"], "approved", "{shown:#}");

    // The decision is recorded beside the session (committed by the
    // recorder's writer within its flush interval).
    wait_for("the approval is recorded beside the session", || {
        let session = scene.sessions().into_iter().find(|s| s["host"] == HOST).ok_or("no session yet".to_owned())?;
        let shown = scene.gw.cli(&["sessions", "show", &session_id(&session), "--json"]);
        let text = String::from_utf8_lossy(&shown.stdout).into_owned();
        if text.contains("approval_requested") && text.contains("approval_decided") {
            Ok(())
        } else {
            Err(text)
        }
    });
}

#[test]
fn approval_denied_timed_out_and_self_approval_refused() {
    let scene = Scene::start("pol-refuse");
    // Denied.
    let client = scene.spawn_curl(&["-X", "POST", &scene.url("/deploy/denied")]);
    let id = scene.pending("/deploy/denied")["id"].as_str().expect("id").to_owned();
    let out = scene.decide(&id, "deny", "bob");
    assert!(out.status.success(), "deny: {}", String::from_utf8_lossy(&out.stderr));
    let (status, body) = finish(client);
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["error"], "approval_denied", "{body}");
    assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "the rule's reason is shown: {body}");

    // Self-approval: the approving process runs in the job's cgroup, so it
    // has the identity that asked.
    let client = scene.spawn_curl(&["-X", "POST", &scene.url("/deploy/self")]);
    let id = scene.pending("/deploy/self")["id"].as_str().expect("id").to_owned();
    let out = scene
        .gw
        .command_in_cgroup(gateway_tests::gateway_bin())
        .args(["--config", scene.gw.config_path.to_str().expect("utf8"), "approvals", "approve", &id, "--by", "alice"])
        .output()
        .expect("approve from the job");
    assert!(!out.status.success(), "a job must not approve its own request");
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("own") || err.contains("self") || err.contains("identity"), "{err}");
    let out = scene.decide(&id, "deny", "alice");
    assert!(out.status.success());
    assert_eq!(finish(client).0, 403);

    // Timed out (2 s): denied with a clear response.
    let started = Instant::now();
    let (status, body) = scene.curl(&[&scene.url("/quick/x")]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("approval_timed_out"), "{body}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(scene.received("/deploy") + scene.received("/quick"), 0);
}

#[test]
fn two_approver_rule_needs_two_distinct_approvers() {
    let scene = Scene::start("pol-two");
    let mut client = scene.spawn_curl(&[&scene.url("/prod/rollout")]);
    let id = scene.pending("/prod/rollout")["id"].as_str().expect("id").to_owned();
    assert!(scene.decide(&id, "approve", "alice").status.success());
    std::thread::sleep(Duration::from_millis(300));
    assert!(still_waiting(&mut client), "one approval of two must not release the request");
    let again = scene.decide(&id, "approve", "alice");
    assert!(!again.status.success(), "the same approver twice does not count twice");
    assert!(still_waiting(&mut client));
    assert!(scene.decide(&id, "approve", "bob").status.success());
    assert_eq!(finish(client).0, 200);
    assert_eq!(scene.received("/prod/rollout"), 1);
}

#[test]
fn secrets_in_streamed_and_gzip_responses_are_masked_for_the_client() {
    let scene = Scene::start("pol-mask");
    let token = github_token();
    *scene.upstream.leak.lock().expect("leak") = token.clone();
    // Streamed, the token split across two chunks 200 ms apart, HTTP/1.1 and HTTP/2.
    for version in ["--http1.1", "--http2"] {
        let (status, body) = scene.curl(&[version, &scene.url("/leak/stream")]);
        assert_eq!(status, 200);
        assert!(!body.contains(&token), "the token reached the client ({version})");
        assert!(body.contains("[MASKED:"), "{version}: {body}");
        assert!(body.ends_with("\"n\": 1}\n"), "the rest of the stream arrives: {body}");
    }
    // gzip: curl decodes; the token and the password field are masked.
    let (status, body) = scene.curl(&["--compressed", &scene.url("/leak/gzip")]);
    assert_eq!(status, 200);
    assert!(!body.contains(&token) && !body.contains("hunter2-letmein"), "secrets reached the client");
    assert!(body.contains("\"user\": \"ci\""), "the rest of the document is intact: {body}");
    assert_eq!(body.matches("[MASKED:").count(), 2, "{body}");
    // Upstream did send them in clear: the masking is the gateway's doing.
    assert_eq!(scene.received("/leak"), 3);
    // Nothing in clear in the recordings (once they are committed: the
    // database file and its write-ahead log) or the log either.
    let recorded = scene.wait_recorded(&["/leak/stream", "/leak/gzip"]);
    assert!(!Value::from(recorded).to_string().contains(&token), "the token is in a recorded exchange");
    for file in [scene.database(), scene.database().with_extension("db-wal")] {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(!bytes.windows(token.len()).any(|w| w == token.as_bytes()), "the token is in {}", file.display());
    }
    assert!(!scene.gw.log().contains(&token), "the token is in the log");
}

#[test]
fn sessions_read_back_verify_and_detect_tampering() {
    let scene = Scene::start("pol-record");
    for path in ["/one", "/two?x=1", "/quiet/three"] {
        assert_eq!(scene.curl(&[&scene.url(path)]).0, 200);
    }
    scene.wait_recorded(&["/one", "/two?x=1", "/quiet/three"]);
    let sessions = scene.sessions();
    assert_eq!(sessions.len(), 3, "one session per connection: {sessions:#?}");
    let id_of = session_id;
    for s in &sessions {
        assert_eq!(s["identity"].as_str().map(|i| i.starts_with("spiffe://")), Some(true), "{s:#}");
        let out = scene.gw.cli(&["sessions", "verify", &id_of(s)]);
        assert!(out.status.success(), "verify: {}", String::from_utf8_lossy(&out.stdout));
    }
    let exported: Vec<Value> = sessions
        .iter()
        .flat_map(|s| {
            let out = scene.gw.cli(&["sessions", "export", &id_of(s)]);
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).expect("json line"))
                .collect::<Vec<_>>()
        })
        .collect();
    let data: Vec<Value> =
        exported.iter().filter_map(|r| r["data"].as_str().and_then(|d| serde_json::from_str(d).ok())).collect();
    let two = data.iter().find(|d| d["url"] == "/two?x=1").unwrap_or_else(|| panic!("no /two exchange: {data:#?}"));
    assert_eq!((two["status"].as_u64(), two["method"].as_str()), (Some(200), Some("GET")), "{two:#}");
    assert!(two["response"]["body"]["content"].as_str().is_some_and(|b| b.contains("ok")), "bodies recorded: {two:#}");
    let quiet = data.iter().find(|d| d["url"] == "/quiet/three").expect("quiet exchange");
    assert!(quiet["request"].get("headers").is_none(), "metadata level keeps no headers: {quiet:#}");
    assert!(data.iter().any(|d| d["tls"]["version"] == "TLSv1_3"), "TLS parameters are recorded");
    let replay = scene.gw.cli(&["sessions", "replay", &id_of(&sessions[0])]);
    assert!(replay.status.success(), "replay: {}", String::from_utf8_lossy(&replay.stderr));

    // Edit one record behind the gateway's back: verify names it.
    let victim = id_of(&sessions[0]);
    let conn = rusqlite_edit(&scene.database(), &victim);
    let out = scene.gw.cli(&["sessions", "verify", &victim]);
    assert!(!out.status.success(), "an edited record must fail verification ({conn})");
}

/// Rewrites the status of the first exchange of `session` in its stored row
/// of records (`chunks.body`, the bytes as stored, as someone with write
/// access to the file could); returns what it changed.
fn rusqlite_edit(db: &Path, session: &str) -> String {
    let script = format!(
        "import sqlite3; c=sqlite3.connect('{db}'); \
         rows=c.execute(\"select id, body from chunks where session=? order by first_seq\", ('{session}',)).fetchall(); \
         hit=[(i, b) for i, b in rows if b'\"status\":200' in b][0]; \
         c.execute(\"update chunks set body=? where id=?\", (hit[1].replace(b'\"status\":200', b'\"status\":201', 1), hit[0])); \
         c.commit(); print(hit[0])",
        db = db.display()
    );
    let out = Command::new("python3").arg("-c").arg(&script).output().expect("python3 sqlite3");
    assert!(out.status.success(), "editing the database: {}", String::from_utf8_lossy(&out.stderr));
    format!("row {}", String::from_utf8_lossy(&out.stdout).trim())
}

#[test]
fn sigkill_during_a_long_session_keeps_every_earlier_record() {
    let mut scene = Scene::start("pol-kill");
    // One keep-alive connection, many requests, then the gateway dies mid-session.
    let script = format!(
        "import http.client, ssl, sys, time\n\
         ctx = ssl.create_default_context(cafile='{ca}')\n\
         c = http.client.HTTPSConnection('{ip}', {port}, context=ctx)\n\
         c.sock = None\n\
         import socket\n\
         raw = socket.create_connection(('{ip}', {port}))\n\
         c.sock = ctx.wrap_socket(raw, server_hostname='{HOST}')\n\
         for i in range(10):\n    c.request('GET', '/long/%d' % i, headers={{'Host': '{HOST}'}})\n    r = c.getresponse(); r.read(); print(r.status, flush=True)\n\
         time.sleep(30)\n",
        ca = scene.gateway_ca.display(),
        ip = UPSTREAM_IP,
        port = scene.port,
    );
    let mut client =
        scene.gw.command_in_cgroup("python3").arg("-c").arg(&script).stdout(Stdio::piped()).spawn().expect("python");
    // Every exchange committed (the writer does so within its flush
    // interval), the session still open: then the gateway dies.
    let urls: Vec<String> = (0..10).map(|i| format!("/long/{i}")).collect();
    scene.wait_recorded(&urls.iter().map(String::as_str).collect::<Vec<_>>());
    scene.gw.stop(nix::sys::signal::Signal::SIGKILL);
    let _ = client.kill();
    let _ = client.wait();
    let sessions = scene.sessions();
    let s = sessions.iter().find(|s| s["host"] == HOST).unwrap_or_else(|| panic!("no session: {sessions:#?}"));
    let id = s["session"].as_str().or(s["id"].as_str()).expect("id").to_owned();
    let out = scene.gw.cli(&["sessions", "export", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    for i in 0..10 {
        assert!(text.contains(&format!("/long/{i}")), "exchange {i} lost after SIGKILL: {text}");
    }
    let out = scene.gw.cli(&["sessions", "verify", &id]);
    assert!(out.status.success(), "the committed part verifies: {}", String::from_utf8_lossy(&out.stdout));
    // Restart so that the scene's drop cleans up normally.
    scene.gw.spawn(false);
}

#[test]
fn invalid_policy_reload_keeps_the_old_policy_in_force() {
    let scene = Scene::start("pol-reload");
    std::fs::write(
        &scene.policy,
        "version: 1\nrules:\n  - match: { request: { path: \"/admin/**\" } }\n    action: maybe\n",
    )
    .expect("write bad policy");
    let pid = nix::unistd::Pid::from_raw(scene.gw.child.as_ref().expect("running").id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    wait_for("the rejected policy is reported", || {
        let log = scene.gw.log();
        if log.contains("policy") && log.contains("rejected") {
            Ok(())
        } else {
            Err(log)
        }
    });
    let (status, body) = scene.curl(&[&scene.url("/admin/users")]);
    assert_eq!(status, 403, "the old policy still denies: {body}");
    // A valid policy replaces it.
    std::fs::write(&scene.policy, "version: 1\nrules: []\ndefaults:\n  action: allow\n").expect("write policy");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    wait_for("the new policy takes effect", || match scene.curl(&[&scene.url("/admin/users")]) {
        (200, _) => Ok(()),
        (status, body) => Err(format!("{status} {body}")),
    });
}

#[test]
fn non_http_connections_are_judged_once_as_tcp() {
    let tcp_port = unique_port();
    let echo =
        gateway_tests::EchoServer::start(format!("{UPSTREAM_IP}:{tcp_port}").parse().expect("addr")).expect("echo");
    let scene = Scene::start_with("pol-tcp", &[&format!("{{cidr: {UPSTREAM_IP}/32, ports: [{tcp_port}]}}")]);
    let out = scene
        .gw
        .command_in_cgroup("python3")
        .arg("-c")
        .arg(format!(
            "import socket; s=socket.create_connection(('{UPSTREAM_IP}', {tcp_port})); s.settimeout(60); s.sendall(b'hello'); print(repr(s.recv(100)))"
        ))
        .output()
        .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Closed without an answer (or reset): never forwarded.
    assert!(!out.status.success() || stdout.trim() == "b''", "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(echo.peers.lock().expect("peers").is_empty(), "the denied connection reached the server");
    let events = scene.gw.wait_events(1);
    let e = events
        .iter()
        .find(|e| e["orig_dst"] == format!("{UPSTREAM_IP}:{tcp_port}"))
        .unwrap_or_else(|| panic!("no event: {events:#?}"));
    assert_eq!(e["outcome"], "blocked", "{e}");
    assert!(e["error"].as_str().unwrap_or_default().contains("no-raw-tcp"), "{e}");
    // HTTPS on the other destination is unaffected.
    assert_eq!(scene.curl(&[&scene.url("/hello")]).0, 200);
}

/// Every spelling of `/admin/...` a server would route to the admin API is
/// judged as `/admin/...` (and denied); a path servers read in more than one
/// way is refused before any rule is consulted; neither reaches upstream,
/// and an allowed request goes upstream exactly as the client wrote it.
#[test]
fn path_bypasses_are_denied_or_refused_and_clean_paths_pass_unchanged() {
    let scene = Scene::start("pol-paths");
    let denied = [
        "/admin//users",
        "//admin/users",
        "/%61dmin/users",
        "/%61%64%6D%69%6E/users",
        "/./admin/users",
        "/x/../admin/users",
        "/x/%2e%2e/admin/users",
        "/x/.%2E/admin/users",
        "/../admin/users",
        "/ADMIN/users",
        "/Admin/./Users",
    ];
    for path in denied {
        let (status, body) = scene.curl(&["--path-as-is", &scene.url(path)]);
        assert_eq!(status, 403, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!(v["rule"], "deny-admin", "{path}: {body}");
    }
    let refused = [
        ("/admin%2Fusers", "encoded_slash"),
        ("/x%2fadmin/users", "encoded_slash"),
        ("/admin%5Cusers", "encoded_backslash"),
        ("/x\\admin/users", "backslash"),
        ("/admin;jsessionid=1/users", "path_parameter"),
        ("/admin%00/users", "encoded_control"),
        ("/%2561dmin/users", "double_encoding"),
        ("/%C0%AFadmin/users", "encoded_not_utf8"),
        ("/x//../admin/users", "ambiguous_dot_segment"),
        ("/admin%zz", "invalid_percent_encoding"),
    ];
    for (path, code) in refused {
        let (status, body) = scene.curl(&["--path-as-is", &scene.url(path)]);
        assert_eq!(status, 400, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert_eq!((v["error"].as_str(), v["code"].as_str()), (Some("path_refused"), Some(code)), "{path}: {body}");
    }
    // Clean requests to allowed paths work, and go upstream as sent: the
    // normalised form is for judging only.
    for path in ["/hello", "/hello//there/./x?q=/admin/", "/admin-docs/%7Eread"] {
        let (status, body) = scene.curl(&["--path-as-is", &scene.url(path)]);
        assert_eq!(status, 200, "{path}: {body}");
    }
    let targets: Vec<String> = scene.upstream.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(
        targets,
        ["/hello", "/hello//there/./x?q=/admin/", "/admin-docs/%7Eread"],
        "upstream saw only the allowed requests, unchanged"
    );
}

/// `gateway policy explain` shows the connection-level decision for a
/// destination, `uninspectable` included (no gateway running: the CLI alone).
#[test]
fn explain_shows_the_connection_level_decision_with_uninspectable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.yaml");
    std::fs::write(
        &file,
        "version: 1\nrules:\n  - name: git-ssh-is-opaque\n    match: { destination: { cidr: 10.20.0.0/16, port: 22 } }\n    action: allow\n    uninspectable: pass\ndefaults:\n  action: allow\n",
    )
    .expect("write policy");
    let explain = |args: &[&str]| {
        let out = Command::new(gateway_tests::gateway_bin())
            .args(["policy", "explain", "--file"])
            .arg(&file)
            .args(args)
            .output()
            .expect("gateway policy explain");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = explain(&["--host", "10.20.1.5", "--port", "22", "--protocol", "tcp"]);
    assert!(text.contains("rule 0     git-ssh-is-opaque            MATCH"), "{text}");
    assert!(text.contains("uninspectable pass"), "{text}");
    let text = explain(&["--host", "10.21.1.5", "--port", "22"]);
    assert!(text.contains("no: destination.cidr: address 10.21.1.5 is in none of `10.20.0.0/16`"), "{text}");
    assert!(text.contains("uninspectable refuse"), "{text}");
    let json: Value = serde_json::from_str(&explain(&["--host", "10.20.0.9", "--port", "22", "--json"])).expect("json");
    assert_eq!(json["decision"]["uninspectable"], "pass", "{json:#}");
    assert_eq!(json["protocol"], "tcp", "{json:#}");
}
