//! What a job's log shows when the gateway refuses, and credentials the
//! gateway injects, end to end: real eBPF redirect, a real gateway, and the
//! real clients CI jobs use (git, the `openai` and `anthropic` SDKs,
//! grpcio, pip, npm, node's fetch) in the intercepted cgroup, against a real
//! HTTPS upstream. Each client's own output must name the finding; keys are
//! compared by presence only, never printed.

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use gateway_tests::{
    keys::{self, random},
    unique_port,
    upstream::{TestPki, Upstream},
    GatewayOptions, TestGateway,
};
use serde_json::Value;

const HOST: &str = "api.test.internal";
const UPSTREAM_IP: &str = "127.0.0.8";
/// A host whose held credential expires every few seconds.
const EXPIRING: &str = "exp.test.internal";

struct Scene {
    gw: TestGateway,
    upstream: Upstream,
    port: u16,
    gateway_ca: PathBuf,
    dir: tempfile::TempDir,
}

impl Scene {
    /// A gateway intercepting `HOST` with `policy` (YAML) and extra
    /// configuration built from the scene's directory.
    fn start(name: &str, policy: Option<&str>, extra: impl FnOnce(&Path) -> String) -> Scene {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let pki = TestPki::new(dir.path(), &[HOST, EXPIRING]);
        let port = unique_port();
        let upstream = Upstream::start(format!("{UPSTREAM_IP}:{port}").parse().expect("addr"), &pki);
        let mut opts = GatewayOptions::new(name, &[&format!("{{cidr: {UPSTREAM_IP}/32, ports: [{port}]}}")]);
        opts.proxy_yaml = "  client_first_timeout: 30s\n".to_owned();
        opts.policy_yaml = policy.map(str::to_owned);
        opts.extra_yaml = format!(
            "tls:\n  intercept: ['*.test.internal']\n  extra_upstream_cas: [{}]\n{}",
            pki.ca_path.display(),
            extra(dir.path())
        );
        let gw = TestGateway::start(opts);
        let gateway_ca = gw.dir.path().join("gateway-ca.pem");
        let out = gw.cli(&["ca", "export", "--out", gateway_ca.to_str().expect("utf8")]);
        assert!(out.status.success(), "ca export: {}", String::from_utf8_lossy(&out.stderr));
        Scene { gw, upstream, port, gateway_ca, dir }
    }

    fn ca(&self) -> &str {
        self.gateway_ca.to_str().expect("utf8")
    }

    /// A Python program in the intercepted cgroup, with `HOST` resolving to
    /// the upstream's address; returns its output (stdout and stderr).
    fn python(&self, python: &str, program: &str) -> (bool, String) {
        let prelude = format!(
            "import socket\n_gai = socket.getaddrinfo\n\
             def _resolve(host, *a, **k):\n    return _gai('{UPSTREAM_IP}' if host == '{HOST}' else host, *a, **k)\n\
             socket.getaddrinfo = _resolve\n"
        );
        let out = self
            .gw
            .command_in_cgroup(python)
            .arg("-c")
            .arg(format!("{prelude}{program}"))
            // requests lets these override the CA pip is given.
            .env("REQUESTS_CA_BUNDLE", &self.gateway_ca)
            .env("CURL_CA_BUNDLE", &self.gateway_ca)
            .output()
            .expect("python");
        output(&out)
    }

    /// A node program (or npm) in the intercepted cgroup, with `HOST`
    /// resolving to the upstream's address and the gateway CA trusted.
    fn node(&self, program: &str, args: &[&str]) -> (bool, String) {
        let hook = self.dir.path().join("resolve.js");
        std::fs::write(
            &hook,
            format!(
                "const dns = require('dns'); const lookup = dns.lookup;\n\
                 dns.lookup = function (host, ...rest) {{ return lookup.call(this, host === '{HOST}' ? '{UPSTREAM_IP}' : host, ...rest); }};\n"
            ),
        )
        .expect("write hook");
        let out = self
            .gw
            .command_in_cgroup(program)
            .args(args)
            .env("NODE_OPTIONS", format!("--require {}", hook.display()))
            .env("NODE_EXTRA_CA_CERTS", &self.gateway_ca)
            .env("HOME", self.dir.path())
            .env("npm_config_cache", self.dir.path().join("npm-cache"))
            .env("npm_config_update_notifier", "false")
            .output()
            .expect("node");
        output(&out)
    }

    fn findings(&self) -> Vec<Value> {
        let out = self.gw.cli(&["findings", "list", "--json"]);
        assert!(out.status.success(), "findings list: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).expect("findings json").as_array().cloned().unwrap_or_default()
    }

    /// The id of the finding for `rule` (the only one the test made).
    fn finding_id(&self, rule: &str) -> String {
        let findings = self.findings();
        let f = findings.iter().find(|f| f["rule_id"] == rule).unwrap_or_else(|| panic!("no {rule} finding"));
        f["id"].as_str().expect("id").to_owned()
    }

    fn received_with(&self, needle: &str) -> usize {
        self.upstream
            .requests()
            .iter()
            .filter(|r| r.target.contains(needle) || r.headers.iter().any(|(_, v)| v.contains(needle)))
            .count()
    }
}

fn output(out: &Output) -> (bool, String) {
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `text` (a client's output) shows `id` and never `key`; printed only
/// once known to be free of the key.
fn assert_shows(client: &str, text: &str, id: &str, key: &str) {
    assert!(!text.contains(key), "{client}: the key appears in the client's output");
    assert!(text.contains(id), "{client}'s output does not name {id}:\n{text}");
    eprintln!("--- {client} shows:\n{}", text.trim());
}

#[test]
fn each_client_shows_the_refusal_naming_the_finding() {
    gateway_tests::require_root();
    let scene = Scene::start("refuse-shapes", None, |_| String::new());
    let ca = scene.ca();
    let port = scene.port;

    // git: a text/plain body, printed as `remote:` lines.
    let key = keys::cursor_key();
    let out = scene
        .gw
        .command_in_cgroup("git")
        .args(["-c", &format!("http.curloptResolve={HOST}:{port}:{UPSTREAM_IP}"), "ls-remote"])
        .arg(format!("https://{key}@{HOST}:{port}/git/repo.git"))
        .env("GIT_SSL_CAINFO", &scene.gateway_ca)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("HOME", scene.dir.path())
        .output()
        .expect("git");
    let (ok, text) = output(&out);
    assert!(!ok, "git must fail");
    let id = scene.finding_id("cursor-api-key");
    assert_shows("git", &text, &id, &key);
    assert!(text.lines().any(|l| l.starts_with("remote: ") && l.contains(&id)), "git prints `remote:` lines: {text}");

    // The openai SDK: the provider's error shape.
    let key = keys::openai_key();
    let (ok, text) = scene.python(
        "python3",
        &format!(
            "import openai\n\
             c = openai.OpenAI(api_key='{key}', base_url='https://{HOST}:{port}/v1', max_retries=0, http_client=openai.DefaultHttpxClient(verify='{ca}'))\n\
             try:\n    c.chat.completions.create(model='gpt-4o', messages=[{{'role': 'user', 'content': 'hi'}}])\n\
             except openai.APIStatusError as e:\n    print(type(e).__name__, e.status_code, e.message)\n"
        ),
    );
    assert!(ok, "python: {}", text.replace(&key, "<key>"));
    let id = scene.finding_id("openai-project-key");
    assert_shows("openai", &text, &id, &key);
    assert!(text.contains("PermissionDeniedError 403"), "{text}");

    // The anthropic SDK (key in x-api-key).
    let key = keys::github_token();
    let (ok, text) = scene.python(
        "python3",
        &format!(
            "import anthropic\n\
             c = anthropic.Anthropic(api_key='{key}', base_url='https://{HOST}:{port}', max_retries=0, http_client=anthropic.DefaultHttpxClient(verify='{ca}'))\n\
             try:\n    c.messages.create(model='claude-sonnet-4-5', max_tokens=8, messages=[{{'role': 'user', 'content': 'hi'}}])\n\
             except anthropic.APIStatusError as e:\n    print(type(e).__name__, e.status_code, e.message)\n"
        ),
    );
    assert!(ok, "python: {}", text.replace(&key, "<key>"));
    let github = scene.finding_id("github-pat");
    assert_shows("anthropic", &text, &github, &key);
    assert!(text.contains("PermissionDeniedError 403"), "{text}");

    // grpcio (Debian's python3 has it): trailers-only PERMISSION_DENIED.
    let (ok, text) = scene.python(
        "/usr/bin/python3",
        &format!(
            "import grpc\n\
             creds = grpc.ssl_channel_credentials(root_certificates=open('{ca}', 'rb').read())\n\
             ch = grpc.secure_channel('{UPSTREAM_IP}:{port}', creds, options=[('grpc.ssl_target_name_override', '{HOST}'), ('grpc.default_authority', '{HOST}')])\n\
             try:\n    ch.unary_unary('/pkg.Svc/Call')(b'\\x0a\\x02hi', metadata=[('authorization', 'Bearer {}')], timeout=20)\n\
             except grpc.RpcError as e:\n    print(e.code(), e.details())\n",
            keys::openai_key()
        ),
    );
    assert!(ok, "grpc python failed: {text}");
    assert!(text.contains("StatusCode.PERMISSION_DENIED"), "grpc shows the status: {text}");
    assert!(text.contains("F-") && text.contains("hard-coded credential"), "grpc shows the message: {text}");
    eprintln!("--- grpcio shows:\n{}", text.trim());

    // pip: the reason phrase.
    let key = keys::cursor_key();
    let dl = scene.dir.path().join("pip-dl");
    let (ok, text) = scene.python(
        "python3",
        &format!(
            "import sys\nfrom pip._internal.cli.main import main\n\
             sys.exit(main(['download', '--no-deps', '--no-cache-dir', '--disable-pip-version-check', '-d', '{}', '--cert', '{ca}', \
             'https://__token__:{key}@{HOST}:{port}/packages/demo-1.0.tar.gz']))\n",
            dl.display()
        ),
    );
    assert!(!ok, "pip must fail");
    let findings = scene.findings();
    let cursor: Vec<String> = findings
        .iter()
        .filter(|f| f["rule_id"] == "cursor-api-key")
        .filter_map(|f| f["id"].as_str().map(str::to_owned))
        .collect();
    assert!(
        cursor.iter().any(|id| text.contains(id.as_str())),
        "pip's output names the finding: {}",
        text.replace(&key, "<key>")
    );
    assert_shows("pip", &text, "blocked this request", &key);

    // npm: the JSON body's `error` string.
    let key = keys::openai_key();
    let registry = format!("https://{HOST}:{port}/npm/");
    let (ok, text) = scene.node(
        "npm",
        &[
            "view",
            "left-pad",
            "--registry",
            &registry,
            &format!("--//{HOST}:{port}/npm/:_authToken={key}"),
            "--fetch-retries",
            "0",
            "--cafile",
            ca,
        ],
    );
    assert!(!ok, "npm must fail");
    assert!(text.contains("E403"), "npm reports the 403: {}", text.replace(&key, "<key>"));
    assert_shows("npm", &text, "hard-coded credential", &key);
    assert!(text.contains("finding F-"), "npm names the finding: {text}");

    // node's fetch: prints what the program prints (the body).
    let key = keys::cursor_key();
    let script = format!(
        "fetch('https://{HOST}:{port}/v1/search', {{ headers: {{ authorization: 'Bearer {key}' }} }})\
         .then(async r => console.log(r.status, await r.text())).catch(e => {{ console.error(e); process.exit(1); }})"
    );
    let (ok, text) = scene.node("node", &["-e", &script]);
    assert!(ok, "node: {}", text.replace(&key, "<key>"));
    assert!(text.starts_with("403 "), "{text}");
    assert_shows("node fetch", &text, "static_credential_blocked", &key);
    assert!(text.contains("\"id\":\"F-"), "{text}");

    assert_eq!(
        scene.upstream.requests().iter().filter(|r| r.target.starts_with("/git")).count(),
        1,
        "only git's unauthenticated probe went upstream"
    );
    assert_eq!(scene.received_with("sk-proj-"), 0);
}

#[test]
fn injected_credentials_reach_upstream_and_missing_ones_are_refused_with_the_reason() {
    gateway_tests::require_root();
    let held = format!("held-{}", random(40));
    let held_for_config = held.clone();
    let policy = "version: 1\nrules:\n  - name: inject-api\n    match:\n      request:\n        path: ['/v1/**']\n    action: allow\n    credential: inject\n  - name: swap-other\n    match:\n      request:\n        path: ['/swap/**']\n    action: allow\n    static_keys: swap\ndefaults:\n  action: allow\n";
    let scene = Scene::start("refuse-inject", Some(policy), move |dir| {
        let file = dir.join("api-credential");
        std::fs::write(&file, format!("{held_for_config}\n")).expect("write credential");
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
        // Held for the test's identity and HOST only: requests naming
        // another host have none.
        // A credential that expires every 4 s, refreshed 1 s ahead, until
        // `fail` exists.
        let script = dir.join("expiring.sh");
        std::fs::write(
            &script,
            format!(
                "d={}\n[ -e $d/fail ] && exit 3\nn=$(cat $d/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > $d/n\n\
                 printf '{{\"credential\": \"exp-%s\", \"expires_in\": 4}}' $n\n",
                dir.display()
            ),
        )
        .expect("write script");
        format!(
            "credentials:\n  credentials:\n    - identity: 'spiffe://ci-gateway.local/unmapped'\n      host: '{HOST}'\n      source: {{file: {}}}\n      inject: {{bearer: '{{credential}}'}}\n\
             \x20   - identity: '**'\n      host: '{EXPIRING}'\n      source: {{command: {{argv: [/bin/sh, {}], output: json}}}}\n      refresh_before: 1s\n",
            file.display(),
            script.display()
        )
    });
    let curl = |args: &[&str]| {
        let out = scene
            .gw
            .command_in_cgroup("curl")
            .args(["-sS", "--resolve", &format!("{HOST}:{}:{UPSTREAM_IP}", scene.port), "--cacert", scene.ca()])
            .args(gateway_tests::CURL_STATUS)
            .args(args)
            .output()
            .expect("curl");
        gateway_tests::curl_reply(&out.stdout)
    };
    let url = |path: &str| format!("https://{HOST}:{}{path}", scene.port);

    // No credential sent, and a placeholder an SDK requires: both get the held one.
    let (status, body) = curl(&[&url("/v1/none")]);
    assert_eq!(status, 200, "{body}");
    let (status, body) = curl(&["-H", "Authorization: Bearer none", &url("/v1/placeholder")]);
    assert_eq!(status, 200, "{body}");
    let received = scene.upstream.requests();
    assert_eq!(received.len(), 2);
    for r in &received {
        let auth: Vec<&String> = r.headers.iter().filter(|(k, _)| k == "authorization").map(|(_, v)| v).collect();
        assert_eq!(auth, vec![&format!("Bearer {held}")], "{}: upstream receives the held credential, once", r.target);
    }
    assert!(scene.gw.log().contains("injected the gateway-held credential"));
    assert!(!scene.gw.log().contains(&held), "the held credential is never logged");
    drop(received);

    // The explain command names the entry that would be used, and says so
    // when there is none.
    let explain = |identity: &str| {
        let out = scene.gw.cli(&["policy", "explain", "--url", &url("/v1/x"), "--identity", identity]);
        assert!(out.status.success(), "explain: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = explain("spiffe://ci-gateway.local/unmapped");
    assert!(text.contains("credential   inject") && text.contains("credentials.credentials[0]"), "{text}");
    let text = explain("spiffe://ci.example/other");
    assert!(text.contains("WARNING no credential held for this identity and destination"), "{text}");
    let out = scene.gw.cli(&["policy", "check"]);
    assert!(out.status.success(), "check: {}", String::from_utf8_lossy(&out.stderr));

    // No credential held for this destination (a host name the entry does
    // not cover, sent to the same address): refused, saying so, in the log too.
    let other = "other.test.internal";
    let out = scene
        .gw
        .command_in_cgroup("curl")
        .args(["-sS", "-k", "--resolve", &format!("{other}:{}:{UPSTREAM_IP}", scene.port)])
        .args(gateway_tests::CURL_STATUS)
        .arg(format!("https://{other}:{}/v1/x", scene.port))
        .output()
        .expect("curl");
    let (status, body) = gateway_tests::curl_reply(&out.stdout);
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["error"], "no_credential_held", "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains("no credential held for this identity and destination"),
        "{v}"
    );
    assert_eq!(scene.upstream.requests().len(), 2, "the refused request did not go upstream");
    gateway_tests::wait_for("the refusal is logged", || {
        if scene.gw.log().contains("no_credential_held") {
            Ok(())
        } else {
            Err("not yet")
        }
    });

    // swap with no credential: the job's key is a finding and the refusal
    // says why the swap could not happen.
    let key = keys::cursor_key();
    let out = scene
        .gw
        .command_in_cgroup("curl")
        .args(["-sS", "-k", "--resolve", &format!("{other}:{}:{UPSTREAM_IP}", scene.port)])
        .args(gateway_tests::CURL_STATUS)
        .args(["-H", &format!("Authorization: Bearer {key}")])
        .arg(format!("https://{other}:{}/swap/x", scene.port))
        .output()
        .expect("curl");
    let (status, body) = gateway_tests::curl_reply(&out.stdout);
    assert!(!body.contains(&key));
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["error"], "no_credential_held", "{v}");
    let id = v["findings"][0]["id"].as_str().expect("the key is a finding").to_owned();
    assert!(v["message"].as_str().unwrap_or("").contains(&id), "{v}");
    assert!(scene.gw.log().contains("static_keys says swap but the gateway cannot supply a credential"));
    assert_eq!(scene.received_with(&key), 0);

    // An expiring credential: refreshed ahead of its expiry while its
    // command works, never sent once expired when it stops working.
    let expiring = |path: &str| {
        let out = scene
            .gw
            .command_in_cgroup("curl")
            .args(["-sS", "-k", "--resolve", &format!("{EXPIRING}:{}:{UPSTREAM_IP}", scene.port)])
            .args(gateway_tests::CURL_STATUS)
            .arg(format!("https://{EXPIRING}:{}{path}", scene.port))
            .output()
            .expect("curl");
        gateway_tests::curl_reply(&out.stdout)
    };
    std::thread::sleep(Duration::from_secs(5));
    let (status, body) = expiring("/v1/fresh");
    assert_eq!(status, 200, "{body}");
    let sent: Vec<String> = scene
        .upstream
        .requests()
        .iter()
        .filter(|r| r.target == "/v1/fresh")
        .flat_map(|r| r.headers.iter().filter(|(k, _)| k == "authorization").map(|(_, v)| v.clone()))
        .collect();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].starts_with("Bearer exp-") && sent[0] != "Bearer exp-1", "refreshed at least once: {sent:?}");
    assert!(scene.gw.log().contains("credential refreshed ahead of its expiry"));
    std::fs::write(scene.dir.path().join("fail"), "").expect("write flag");
    std::thread::sleep(Duration::from_secs(6));
    let (status, body) = expiring("/v1/stale");
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["error"], "credential_expired", "{v}");
    assert!(scene.upstream.requests().iter().all(|r| r.target != "/v1/stale"), "nothing went upstream");
    let log = scene.gw.log();
    assert!(log.contains("refreshing an expiring credential failed"));
    assert!(log.contains("the held credential has expired and was not refreshed"));
}

#[test]
fn per_session_credentials_are_issued_for_each_session_and_revoked_when_it_ends() {
    gateway_tests::require_root();
    // Values unique to this run, so "never logged" means something.
    let tag = random(24);
    let policy = "version: 1\nrules:\n  - name: inject-api\n    match:\n      request:\n        path: ['/v1/**']\n    action: allow\n    credential: inject\ndefaults:\n  action: allow\n";
    let tag_for_config = tag.clone();
    let scene = Scene::start("refuse-lease", Some(policy), move |dir| {
        // A stand-in for a dynamic-secrets engine: each run issues a new
        // value with a lease id; the revoke command appends what it is
        // given, and fails (echoing the value on stderr) while `rfail` exists.
        let issue = dir.join("issue.sh");
        std::fs::write(
            &issue,
            format!(
                "d={d}\n[ -e $d/fail ] && {{ echo 'engine sealed' >&2; exit 3; }}\n\
                 n=$(cat $d/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > $d/n\n\
                 printf '{{\"credential\": \"sess-{tag_for_config}-%s\", \"expires_in\": 300, \"lease_id\": \"lease-%s\"}}' $n $n\n",
                d = dir.display()
            ),
        )
        .expect("write issue");
        let revoke = dir.join("revoke.sh");
        std::fs::write(
            &revoke,
            format!(
                "d={d}\nin=$(cat)\n[ -e $d/rfail ] && {{ echo \"cannot revoke $in\" >&2; exit 4; }}\n\
                 printf '%s\\n' \"$in\" >> $d/revoked.jsonl\n",
                d = dir.display()
            ),
        )
        .expect("write revoke");
        format!(
            "credentials:\n  credentials:\n    - identity: '**'\n      host: '{HOST}'\n      source: {{command: {{argv: [/bin/sh, {}], output: json}}}}\n      inject: {{bearer: '{{credential}}'}}\n      revoke: {{argv: [/bin/sh, {}]}}\n",
            issue.display(),
            revoke.display()
        )
    });
    let url = |path: &str| format!("https://{HOST}:{}{path}", scene.port);
    // One curl, one connection: every URL it is given is one session.
    let curl = |paths: &[&str]| {
        // `-o` applies to one URL: each gets its own.
        let urls: Vec<String> = paths.iter().flat_map(|p| ["-o".to_owned(), "/dev/null".to_owned(), url(p)]).collect();
        scene
            .gw
            .command_in_cgroup("curl")
            .args(["-sS", "--resolve", &format!("{HOST}:{}:{UPSTREAM_IP}", scene.port), "--cacert", scene.ca()])
            .args(["-w", "%{http_code} %{num_connects}\n"])
            .args(&urls)
            .output()
            .expect("curl")
    };
    let sent = |path: &str| -> Vec<String> {
        scene
            .upstream
            .requests()
            .iter()
            .filter(|r| r.target == path)
            .flat_map(|r| r.headers.iter().filter(|(k, _)| k == "authorization").map(|(_, v)| v.clone()))
            .collect()
    };
    let revoked = || -> Vec<Value> {
        std::fs::read_to_string(scene.dir.path().join("revoked.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("revoke input is JSON"))
            .collect()
    };

    // First session: two requests on one connection share one issued value.
    let out = curl(&["/v1/a", "/v1/b"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 1\n200 0\n", "{}", String::from_utf8_lossy(&out.stderr));
    let first = format!("Bearer sess-{tag}-1");
    assert_eq!(sent("/v1/a"), vec![first.clone()]);
    assert_eq!(sent("/v1/b"), vec![first]);
    // The session ended with curl: its value is revoked, with its lease.
    let input = gateway_tests::wait_for("the first session's credential is revoked", || match revoked().as_slice() {
        [one] => Ok(one.clone()),
        other => Err(format!("{} revocations", other.len())),
    });
    assert_eq!(input["credential"], format!("sess-{tag}-1"));
    assert_eq!(input["lease_id"], "lease-1");
    assert_eq!(input["destination"], HOST);
    assert!(input["identity"].as_str().is_some_and(|i| i.starts_with("spiffe://")), "{input}");

    // A request that is blocked (a key where the policy says block) issues
    // nothing: no database user or lease is made for it.
    let issued = || std::fs::read_to_string(scene.dir.path().join("n")).unwrap_or_default().trim().to_owned();
    let before = issued();
    let out = scene
        .gw
        .command_in_cgroup("curl")
        .args(["-sS", "--resolve", &format!("{HOST}:{}:{UPSTREAM_IP}", scene.port), "--cacert", scene.ca()])
        .args(gateway_tests::CURL_STATUS)
        .args(["-H", &format!("Authorization: Bearer {}", keys::cursor_key()), &url("/v1/keyed")])
        .output()
        .expect("curl");
    assert_eq!(gateway_tests::curl_reply(&out.stdout).0, 403);
    assert_eq!(issued(), before, "a blocked request caused an issuance");

    // Second session: a value of its own, revoked in turn.
    let out = curl(&["/v1/c"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 1\n");
    assert_eq!(sent("/v1/c"), vec![format!("Bearer sess-{tag}-2")]);
    gateway_tests::wait_for("the second session's credential is revoked", || match revoked().as_slice() {
        [_, two] if two["lease_id"] == "lease-2" => Ok(()),
        other => Err(format!("{} revocations", other.len())),
    });

    // A revoke command that fails is retried, then reported, and its
    // stderr never brings the value into the log.
    std::fs::write(scene.dir.path().join("rfail"), "").expect("flag");
    let out = curl(&["/v1/d"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 1\n");
    gateway_tests::wait_for("the failed revocation is reported", || {
        if scene.gw.log().contains("revoking a per-session credential failed: it stays valid") {
            Ok(())
        } else {
            Err("not yet")
        }
    });
    std::fs::remove_file(scene.dir.path().join("rfail")).expect("unflag");

    // A source that cannot issue: the request is refused, nothing goes up.
    std::fs::write(scene.dir.path().join("fail"), "").expect("flag");
    let out = scene
        .gw
        .command_in_cgroup("curl")
        .args(["-sS", "--resolve", &format!("{HOST}:{}:{UPSTREAM_IP}", scene.port), "--cacert", scene.ca()])
        .args(gateway_tests::CURL_STATUS)
        .arg(url("/v1/sealed"))
        .output()
        .expect("curl");
    let (status, body) = gateway_tests::curl_reply(&out.stdout);
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["error"], "credential_unusable", "{v}");
    assert!(v["message"].as_str().unwrap_or("").contains("could not be issued"), "{v}");
    assert!(sent("/v1/sealed").is_empty(), "nothing went upstream");

    let log = scene.gw.log();
    assert!(log.contains("issued a per-session credential"));
    assert!(log.contains("revoked a per-session credential"));
    assert!(log.contains("issuing a per-session credential failed"));
    assert!(!log.contains(&format!("sess-{tag}")), "no issued value is ever logged");
}
