//! The review console, used as a person uses it: Debian's Chromium (headless,
//! driven by playwright-core, `tests/console/driver.js`) signs in through a
//! real OpenID Connect provider run locally (node-oidc-provider,
//! `tests/console/idp.mjs`) into the console a real gateway serves over TLS.
//! A real client (curl in the intercepted cgroup) is blocked for a planted
//! key; the reviewer sees the finding, opens its sighting timeline,
//! allowlists the key for that destination, and the next request passes.
//! A request held for approval is approved in the console while curl
//! waits (the queue updates live), a session's replay and chain state are
//! shown, a viewer cannot approve, a wrong CSRF token is refused, the
//! security headers are on every page, and no page ever holds the key.
//! Screenshots of each page go to `target/console-screenshots/`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use gateway_tests::{
    keys, unique_port,
    upstream::{TestPki, Upstream},
    wait_for, GatewayOptions, TestGateway,
};
use serde_json::{json, Value};

const HOST: &str = "api.test.internal";
const UPSTREAM_IP: &str = "127.0.0.9";
const CLIENT_ID: &str = "ci-gateway-console";
const CHROMIUM: &str = "/usr/bin/chromium";

const POLICY: &str = "version: 1
rules:
  - name: deploy-needs-approval
    match: { request: { method: [POST], path: \"/deploy/**\" } }
    action: require_approval
    approval: { group: release, min_approvals: 1, timeout: 120s }
defaults:
  action: allow
  record: full
";

/// The npm packages' directory (`cargo xtask setup` installs them).
fn node_modules() -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME");
    let dir = Path::new(&home).join(".cache/ci-gateway/npm/node_modules");
    for package in ["playwright-core", "oidc-provider"] {
        assert!(
            dir.join(package).is_dir(),
            "{package} is not installed under {}: run `cargo xtask setup`",
            dir.display()
        );
    }
    dir
}

fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The local identity provider.
fn start_idp(port: u16, secret_file: &Path, redirect: &str) -> Killed {
    let mut child = Command::new("node")
        .arg(tests_dir().join("console/idp.mjs"))
        .env("NODE_PATH", node_modules())
        .env("IDP_PORT", port.to_string())
        .env("CLIENT_ID", CLIENT_ID)
        .env("CLIENT_SECRET_FILE", secret_file)
        .env("REDIRECT_URI", redirect)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node must be installed (cargo xtask setup)");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("idp output");
    assert!(line.starts_with("ready "), "the identity provider did not start: {line:?}");
    // Keep reading: a closed pipe would kill the provider at its next line.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::stderr()));
    Killed(child)
}

/// The browser, through the driver's line protocol.
struct Browser {
    _child: Killed,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The planted key: no answer may contain it.
    key: String,
}

impl Browser {
    fn start(console_url: &str, shots: &Path, key: &str) -> Browser {
        assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: apt-get install chromium (cargo xtask setup)");
        // ESM resolution ignores NODE_PATH: the driver is CommonJS.
        let mut child = Command::new("node")
            .arg(tests_dir().join("console/driver.js"))
            .env("NODE_PATH", node_modules())
            .env("CONSOLE_URL", console_url)
            .env("CHROMIUM", CHROMIUM)
            .env("SCREENSHOTS", shots)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut browser = Browser { _child: Killed(child), stdin, stdout, key: key.to_owned() };
        let ready = browser.read();
        assert_eq!(ready["ready"], true, "the browser driver did not start: {ready}");
        browser
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("driver answer");
        let answer: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("driver said {line:?}: {e}"));
        assert!(!line.contains(&self.key), "the key appears in what the console sent the browser: {line}");
        answer
    }

    fn run(&mut self, cmd: Value) -> Value {
        writeln!(self.stdin, "{cmd}").expect("driver stdin");
        let answer = self.read();
        assert_eq!(answer["ok"], true, "browser command {cmd} failed: {}", answer["error"].as_str().unwrap_or(""));
        answer
    }

    fn content(&mut self, who: &str) -> String {
        self.run(json!({"cmd": "content", "who": who}))["content"].as_str().expect("content").to_owned()
    }

    fn shot(&mut self, who: &str, name: &str) {
        self.run(json!({"cmd": "screenshot", "who": who, "name": name}));
    }
}

struct Scene {
    gw: TestGateway,
    upstream: Upstream,
    port: u16,
    gateway_ca: PathBuf,
    console_url: String,
    _idp: Killed,
    _dir: tempfile::TempDir,
}

impl Scene {
    fn start() -> Scene {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let pki = TestPki::new(dir.path(), &[HOST]);
        let port = unique_port();
        let upstream = Upstream::start(format!("{UPSTREAM_IP}:{port}").parse().expect("addr"), &pki);
        // The console's own certificate (the browser is told to accept it).
        let console_dir = dir.path().join("console");
        std::fs::create_dir(&console_dir).expect("mkdir");
        let (cert, key) = TestPki::new(&console_dir, &["127.0.0.1", "localhost"]).write_leaf(&console_dir);
        let secret_file = dir.path().join("oidc-secret");
        std::fs::write(&secret_file, format!("{}\n", keys::random(40))).expect("secret");
        let (console_port, idp_port) = (unique_port(), unique_port());
        let console_url = format!("https://127.0.0.1:{console_port}");
        let redirect = format!("{console_url}/auth/callback");
        let idp = start_idp(idp_port, &secret_file, &redirect);

        let mut opts = GatewayOptions::new("console", &[&format!("{{cidr: {UPSTREAM_IP}/32, ports: [{port}]}}")]);
        opts.proxy_yaml = "  client_first_timeout: 30s\n".into();
        opts.policy_yaml = Some(POLICY.into());
        opts.extra_yaml = format!(
            "tls:\n  intercept: ['*.test.internal']\n  extra_upstream_cas: [{ca}]\n\
             record:\n  flush_interval: 50ms\n\
             approvals:\n  groups: {{ release: [alice@example.test, deployer@example.test] }}\n\
             console:\n  listen: 127.0.0.1:{console_port}\n  tls_cert: {cert}\n  tls_key: {key}\n  oidc:\n    \
             issuer: http://127.0.0.1:{idp_port}\n    client_id: {CLIENT_ID}\n    client_secret_file: {secret}\n    \
             redirect_url: {redirect}\n    \
             roles: {{ security-team: reviewer, release-approvers: approver, everyone: viewer }}\n",
            ca = pki.ca_path.display(),
            cert = cert.display(),
            key = key.display(),
            secret = secret_file.display(),
        );
        let gw = TestGateway::start(opts);
        let gateway_ca = gw.dir.path().join("gateway-ca.pem");
        let out = gw.cli(&["ca", "export", "--out", gateway_ca.to_str().expect("utf8")]);
        assert!(out.status.success(), "ca export: {}", String::from_utf8_lossy(&out.stderr));
        Scene { gw, upstream, port, gateway_ca, console_url, _idp: idp, _dir: dir }
    }

    /// curl in the intercepted cgroup: `extra` arguments, then the URL path.
    fn curl_cmd(&self, extra: &[&str], path: &str) -> Command {
        let mut cmd = self.gw.command_in_cgroup("curl");
        cmd.args(["-sS", "--max-time", "120", "--resolve", &format!("{HOST}:{}:{UPSTREAM_IP}", self.port), "--cacert"])
            .arg(&self.gateway_ca)
            .args(gateway_tests::CURL_STATUS)
            .args(extra)
            .arg(format!("https://{HOST}:{}{path}", self.port));
        cmd
    }

    fn curl(&self, authorization: &str) -> (u16, String) {
        let out =
            self.curl_cmd(&["-H", &format!("Authorization: {authorization}")], "/v1/models").output().expect("curl");
        gateway_tests::curl_reply(&out.stdout)
    }
}

fn screenshots_dir() -> PathBuf {
    let dir = tests_dir().join("../target/console-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshots dir");
    dir
}

fn header<'a>(answer: &'a Value, name: &str) -> &'a str {
    answer["headers"][name].as_str().unwrap_or_else(|| panic!("no {name} header in {answer}"))
}

#[test]
fn a_reviewer_signs_in_allowlists_a_blocked_key_approves_a_held_request_and_replays_a_session() {
    gateway_tests::require_root();
    let scene = Scene::start();
    let key = keys::openai_key();
    let bearer = format!("Bearer {key}");
    let mut b = Browser::start(&scene.console_url, &screenshots_dir(), &key);

    // A real client is blocked for the planted key.
    let (code, body) = scene.curl(&bearer);
    assert_eq!(code, 403, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("403 body ({e}): {body}"));
    let finding = v["findings"][0]["id"].as_str().unwrap_or_else(|| panic!("no finding id in {body}")).to_owned();

    // Not signed in: pages send the browser to sign in; POSTs are refused.
    let anonymous = b.run(json!({"cmd": "get", "who": "nobody", "path": "/findings"}));
    assert_eq!(anonymous["status"], 303, "{anonymous}");
    assert_eq!(header(&anonymous, "location"), "/auth/login");
    assert_eq!(header(&anonymous, "content-security-policy"), gateway::console::CSP);

    // Sign in through the provider.
    let signed = b.run(json!({"cmd": "signIn", "who": "alice", "user": "alice"}));
    let page = signed["content"].as_str().expect("content");
    assert!(page.contains("alice@example.test") && page.contains("approver"), "{page}");
    let cookies = b.run(json!({"cmd": "cookies", "who": "alice"}));
    let session = cookies["cookies"]
        .as_array()
        .expect("cookies")
        .iter()
        .find(|c| c["name"] == "__Host-cgw-session")
        .unwrap_or_else(|| panic!("no session cookie: {cookies}"));
    assert_eq!((session["secure"].as_bool(), session["httpOnly"].as_bool()), (Some(true), Some(true)), "{session}");
    assert_eq!(session["sameSite"], "Lax", "{session}");

    // The findings list, filtered by destination, shows the finding.
    let list = b.run(json!({"cmd": "goto", "who": "alice", "path": format!("/findings?host={HOST}")}));
    assert_eq!(list["status"], 200);
    let html = list["content"].as_str().expect("content");
    assert!(html.contains(&finding) && html.contains("open"), "{html}");
    b.shot("alice", "1-findings");

    // Its timeline: curl, the masked command line, the session.
    let shown =
        b.run(json!({"cmd": "click", "who": "alice", "selector": format!("a.finding-link:text-is(\"{finding}\")")}));
    let html = shown["content"].as_str().expect("content").to_owned();
    assert!(shown["url"].as_str().is_some_and(|u| u.ends_with(&format!("/findings/{finding}"))), "{}", shown["url"]);
    assert!(html.contains("curl") && html.contains("Bearer [REDACTED]") && html.contains(HOST), "{html}");
    assert!(html.contains("/sessions/"), "no session link in the timeline: {html}");
    b.shot("alice", "2-finding-timeline");

    // A forged POST (wrong CSRF token) is refused and changes nothing.
    let forged = b.run(json!({"cmd": "post", "who": "alice", "path": format!("/findings/{finding}/status"),
        "form": {"csrf": "0".repeat(64), "status": "false_positive", "comment": "forged"}}));
    assert_eq!(forged["status"], 403, "{forged}");
    assert!(forged["body"].as_str().is_some_and(|b| b.contains("CSRF")), "{forged}");
    let missing = b.run(json!({"cmd": "post", "who": "alice", "path": format!("/findings/{finding}/status"),
        "form": {"status": "false_positive", "comment": "no token"}}));
    assert!(missing["status"].as_u64().is_some_and(|s| s >= 400), "{missing}");
    assert!(!b.content("alice").contains("forged"));

    // Allow the key for this destination, through the page's form.
    b.run(json!({"cmd": "select", "who": "alice", "selector": "#allow-form select[name=scope]", "value": format!("destination={HOST}")}));
    b.run(json!({"cmd": "select", "who": "alice", "selector": "#allow-form select[name=expires]", "value": "1d"}));
    b.run(json!({"cmd": "fill", "who": "alice", "selector": "#allow-form input[name=reason]", "value": "test fixture key, rotation tracked in SEC-1"}));
    let allowed = b.run(json!({"cmd": "click", "who": "alice", "selector": "#allow-form button[type=submit]"}));
    let html = allowed["content"].as_str().expect("content");
    assert!(html.contains(&format!("destination={HOST}")) && html.contains("active"), "{html}");
    assert!(html.contains("oidc:alice@example.test"), "the entry is not recorded under the signed-in user: {html}");
    b.shot("alice", "3-finding-allowed");

    // The next request passes (the waiver is in force when the POST returns).
    let (code, body) = scene.curl(&bearer);
    assert_eq!(code, 200, "the allowlisted key is still blocked: {body}");
    // The entry is audited like the CLI's: the findings store names the user.
    let out = scene.gw.cli(&["findings", "allowlist", "--json"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("oidc:alice@example.test"), "{listed}");
    let allowlist = b.run(json!({"cmd": "goto", "who": "alice", "path": "/allowlist"}));
    assert!(allowlist["content"].as_str().is_some_and(|h| h.contains(&finding)));
    b.shot("alice", "4-allowlist");

    // A viewer cannot see findings nor approve.
    let viewer = b.run(json!({"cmd": "signIn", "who": "victor", "user": "victor"}));
    assert!(viewer["content"].as_str().is_some_and(|h| h.contains("viewer")), "{viewer}");
    let refused = b.run(json!({"cmd": "goto", "who": "victor", "path": "/findings"}));
    assert_eq!(refused["status"], 403, "{refused}");

    // A request held for approval while curl waits: the open approvals page
    // shows it without a reload.
    b.run(json!({"cmd": "goto", "who": "alice", "path": "/approvals"}));
    b.run(json!({"cmd": "goto", "who": "victor", "path": "/approvals"}));
    let held = scene
        .curl_cmd(&["-X", "POST", "-d", "{\"version\": \"1.2.3\"}"], "/deploy/prod")
        .env("GITHUB_ACTOR", "deployer")
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl");
    let live =
        b.run(json!({"cmd": "waitFor", "who": "alice", "selector": "#pending tbody tr form.decide", "timeout": 30000}));
    let html = live["content"].as_str().expect("content");
    assert!(html.contains("/deploy/prod") && html.contains("deploy-needs-approval"), "{html}");
    b.run(json!({"cmd": "waitFor", "who": "victor", "selector": "#pending tbody tr", "timeout": 30000}));
    assert!(!b.content("victor").contains("form class=\"decide\""), "a viewer is offered the approve form");
    b.shot("alice", "5-approvals-pending");
    let pending = scene.gw.cli(&["approvals", "list", "--json"]);
    let pending: Value = serde_json::from_slice(&pending.stdout).expect("approvals list json");
    let id = pending
        .as_array()
        .or_else(|| pending["approvals"].as_array())
        .and_then(|a| a.iter().find(|a| a["state"] == "pending"))
        .and_then(|a| a["id"].as_str())
        .unwrap_or_else(|| panic!("no pending approval: {pending}"))
        .to_owned();
    // The viewer's own valid token does not make them an approver.
    let token = b.run(json!({"cmd": "csrf", "who": "victor"}))["csrf"].as_str().expect("csrf").to_owned();
    let by_viewer = b.run(json!({"cmd": "post", "who": "victor", "path": format!("/approvals/{id}/decide"),
        "form": {"csrf": token, "verdict": "approve", "comment": "me too"}}));
    assert_eq!(by_viewer["status"], 403, "{by_viewer}");
    // The user behind the request (the CI actor) cannot approve it even
    // though they are an approver in the approver group.
    b.run(json!({"cmd": "signIn", "who": "deployer", "user": "deployer"}));
    b.run(json!({"cmd": "goto", "who": "deployer", "path": "/approvals"}));
    let token = b.run(json!({"cmd": "csrf", "who": "deployer"}))["csrf"].as_str().expect("csrf").to_owned();
    let own = b.run(json!({"cmd": "post", "who": "deployer", "path": format!("/approvals/{id}/decide"),
        "form": {"csrf": token, "verdict": "approve", "comment": "my own"}}));
    assert_eq!(own["status"], 403, "{own}");
    assert!(own["body"].as_str().is_some_and(|b| b.contains("behind")), "{own}");
    // Alice approves with a comment; curl gets its answer.
    b.run(json!({"cmd": "fill", "who": "alice", "selector": "#pending form.decide input[name=comment]", "value": "release 1.2.3 ok"}));
    let decided =
        b.run(json!({"cmd": "click", "who": "alice", "selector": "#pending form.decide button[value=approve]"}));
    let html = decided["content"].as_str().expect("content");
    assert!(html.contains("approve by oidc:alice@example.test: release 1.2.3 ok"), "{html}");
    b.shot("alice", "6-approvals-decided");
    let out = held.wait_with_output().expect("curl");
    let (code, body) = gateway_tests::curl_reply(&out.stdout);
    assert_eq!(code, 200, "the approved request did not pass: {body}");
    assert!(scene.upstream.requests().iter().any(|r| r.target.starts_with("/deploy/prod")), "not forwarded");

    // Sessions: the list, a replay, the chain's state.
    let sessions = wait_for("the sessions page lists the deploy session", || {
        let page = b.run(json!({"cmd": "goto", "who": "alice", "path": format!("/sessions?host={HOST}")}));
        let html = page["content"].as_str().unwrap_or_default().to_owned();
        if html.matches("session-link").count() >= 3 {
            Ok(html)
        } else {
            Err(html)
        }
    });
    assert!(sessions.contains(HOST));
    b.shot("alice", "7-sessions");
    let replay = b.run(json!({"cmd": "click", "who": "alice", "selector": "a.session-link >> nth=0"}));
    let html = replay["content"].as_str().expect("content");
    assert!(html.contains("intact"), "the chain is not shown intact: {html}");
    assert!(html.contains("stream") && html.contains(HOST), "no replay: {html}");
    b.shot("alice", "8-session-replay");
    // The blocked request's session (the key was in its Authorization header).
    let blocked = b.run(json!({"cmd": "goto", "who": "alice", "path": format!("/findings/{finding}")}));
    assert!(blocked["content"].as_str().is_some_and(|h| h.contains("/sessions/")));
    let replay =
        b.run(json!({"cmd": "click", "who": "alice", "selector": "#sightings a[href^='/sessions/'] >> nth=0"}));
    let html = replay["content"].as_str().expect("content");
    assert!(html.contains("/v1/models") && html.contains("intact"), "{html}");
    b.shot("alice", "9-blocked-session-replay");

    // Every page ran without script or CSP errors.
    for who in ["alice", "victor"] {
        let errors = b.run(json!({"cmd": "errors", "who": who}));
        let ours: Vec<&str> = errors["errors"]
            .as_array()
            .expect("errors")
            .iter()
            .filter_map(Value::as_str)
            .filter(|e| e.starts_with(&scene.console_url))
            // Refused pages (403s) are logged as failed loads; expected.
            .filter(|e| !e.contains("Failed to load resource"))
            .collect();
        assert!(ours.is_empty(), "{who}: script or CSP errors on console pages: {ours:?}");
    }
    // Sign-out ends the session server-side.
    let out = b.run(json!({"cmd": "click", "who": "alice", "selector": "header form button"}));
    assert!(out["content"].as_str().is_some_and(|h| h.contains("Signed out")));
    let after = b.run(json!({"cmd": "get", "who": "alice", "path": "/findings"}));
    assert_eq!(after["status"], 303, "{after}");
    std::thread::sleep(Duration::from_millis(10));
    // Every answer from the console was checked for the key by Browser::read;
    // the gateway's log is checked too.
    assert!(!scene.gw.log().contains(&key), "the key is in the gateway log");
}
