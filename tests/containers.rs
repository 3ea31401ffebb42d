//! Container jobs under a real container runtime, end to end: a private
//! dockerd (tests/support/docker.rs), containers placed under the test
//! gateway's intercepted cgroup with `--cgroup-parent` (as GitLab runner's
//! `cgroup_parent` does) or by the daemon's own default parent (as an
//! operator configures dockerd for GitHub Actions or Buildkite), real curl,
//! git and python inside them, and a real HTTPS upstream on the host's
//! bridge address, which bridge containers reach like any remote service.
//!
//! Every test shares the one daemon and image of this test process.

use std::{path::PathBuf, process::Output};

use gateway_tests::{
    docker::{docker, Container, Docker, RunSpec, IMAGE},
    unique_port,
    upstream::{TestPki, Upstream},
    wait_for, GatewayOptions, TestGateway,
};
use serde_json::Value;

const HOST: &str = "api.test.internal";

/// A gateway intercepting an HTTPS upstream on the bridge's host address,
/// asking the test daemon about containers, with its CA where containers
/// can mount it.
struct Scene {
    gw: TestGateway,
    upstream: Upstream,
    port: u16,
    docker: &'static Docker,
    /// Holds `gateway-ca.pem`; mounted at `/pki` in containers.
    pki_dir: tempfile::TempDir,
}

impl Scene {
    fn start(name: &str) -> Scene {
        Scene::start_with(name, Vec::new(), |_| String::new())
    }

    /// `extra_cgroups` are intercepted too; `extra` adds top-level YAML.
    fn start_with(name: &str, extra_cgroups: Vec<String>, extra: impl FnOnce(&std::path::Path) -> String) -> Scene {
        let docker = docker();
        let pki_dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(pki_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let pki = TestPki::new(pki_dir.path(), &[HOST]);
        let port = unique_port();
        let upstream = Upstream::start(format!("{}:{port}", docker.host_ip()).parse().expect("addr"), &pki);
        let mut opts = GatewayOptions::new(name, &[&format!("{{cidr: {}/32, ports: [{port}]}}", docker.host_ip())]);
        opts.extra_cgroups = extra_cgroups;
        // Every client here speaks first; a loaded machine must not turn a
        // slow client into an upstream dial.
        opts.proxy_yaml = "  client_first_timeout: 30s\n".into();
        // A generous wait for the runtime's answer: the tests assert the
        // name and image, and dockerd on a loaded 2-core machine can be slow.
        opts.extra_yaml = format!(
            "tls:\n  intercept: ['*.test.internal']\n  extra_upstream_cas: [{}]\nidentity:\n  container_runtimes: [{}]\n  container_lookup_timeout: 20s\n{}",
            pki.ca_path.display(),
            docker.socket().display(),
            extra(pki_dir.path()),
        );
        let gw = TestGateway::start(opts);
        let out = gw.cli(&["ca", "export", "--out", pki_dir.path().join("gateway-ca.pem").to_str().expect("utf8")]);
        assert!(out.status.success(), "ca export: {}", String::from_utf8_lossy(&out.stderr));
        Scene { gw, upstream, port, docker, pki_dir }
    }

    /// A container under the gateway's intercepted cgroup.
    /// A container of the job, its namespace served by the running gateway.
    fn container(&self, name: &str, host_network: bool) -> Container {
        let c = self.start_container(name, host_network);
        if !host_network {
            self.wait_served(&c);
        }
        c
    }

    /// A container of the job, started without waiting for the gateway.
    fn start_container(&self, name: &str, host_network: bool) -> Container {
        self.docker.run(&RunSpec {
            name: format!("{name}-{}", std::process::id()),
            cgroup_parent: Some(self.gw.cgroup_path()),
            host_network,
            mounts: vec![(self.pki_dir.path().to_owned(), "/pki".into())],
        })
    }

    /// Waits until the gateway serves `c`'s network namespace. It starts to
    /// when the runtime enters the container's namespace (the kernel reports
    /// the `setns`), before the container's command runs; these tests are
    /// about inspection, so under a loaded suite they wait for it anyway
    /// (`a_container_job_that_connects_as_it_starts_is_served` does not).
    fn wait_served(&self, c: &Container) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let status = self.gw.status();
            let served = status["namespaces"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|ns| ns["cgroup"].as_str().is_some_and(|cg| cg.contains(c.id.as_str())));
            if served {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the gateway never served the namespace of {}: {status:#}",
                c.name
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn resolve(&self) -> String {
        format!("{HOST}:{}:{}", self.port, self.docker.host_ip())
    }

    fn url(&self, path: &str) -> String {
        format!("https://{HOST}:{}{path}", self.port)
    }

    /// curl inside `c`, trusting only the gateway CA: (status, body, output).
    fn curl(&self, c: &Container, args: &[&str]) -> (u16, String, Output) {
        let resolve = self.resolve();
        let mut all = vec!["curl", "-sS", "--max-time", "60", "--resolve", &resolve, "--cacert", "/pki/gateway-ca.pem"];
        all.extend(gateway_tests::CURL_STATUS);
        all.extend(args);
        let out = c.exec(&all);
        let (code, body) = gateway_tests::curl_reply(&out.stdout);
        (code, body, out)
    }

    /// Python's standard library inside `c`: POSTs `body` as JSON.
    fn python_post(&self, c: &Container, path: &str, body: &str) -> Value {
        let spec = serde_json::json!({
            "ip": self.docker.host_ip().to_string(), "host": HOST, "port": self.port, "path": path, "body": body,
        });
        let out = c.exec(&["python3", "-c", PY_POST, &spec.to_string()]);
        assert!(out.status.success(), "python in the container failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("python output")
    }

    /// `git ls-remote` inside `c` with credentials in the URL.
    fn git(&self, c: &Container, user: &str) -> Output {
        let url = format!("https://{user}@{HOST}:{}/git/repo.git", self.port);
        c.exec_with(
            &["-e", "GIT_SSL_CAINFO=/pki/gateway-ca.pem", "-e", "GIT_TERMINAL_PROMPT=0", "-e", "HOME=/tmp"],
            &["git", "-c", &format!("http.curloptResolve={}", self.resolve()), "ls-remote", &url],
        )
    }

    fn findings(&self) -> Vec<Value> {
        let out = self.gw.cli(&["findings", "list", "--json"]);
        assert!(out.status.success(), "findings list: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).expect("findings json").as_array().cloned().unwrap_or_default()
    }

    /// The start record of every recorded session.
    fn session_starts(&self) -> Vec<Value> {
        let out = self.gw.cli(&["sessions", "list", "--json"]);
        assert!(out.status.success(), "sessions list: {}", String::from_utf8_lossy(&out.stderr));
        let list: Value = serde_json::from_slice(&out.stdout).expect("sessions json");
        let mut starts = Vec::new();
        for s in list.as_array().cloned().unwrap_or_default() {
            let id = s["id"].as_str().expect("session id").to_owned();
            let out = self.gw.cli(&["sessions", "show", &id, "--json"]);
            assert!(out.status.success(), "sessions show: {}", String::from_utf8_lossy(&out.stderr));
            let shown: Value = serde_json::from_slice(&out.stdout).expect("session json");
            starts.push(shown);
        }
        starts
    }

    /// The gateway's log and state never hold `key`.
    fn assert_no_key_in_clear(&self, key: &str) {
        assert!(!self.gw.log().contains(key), "a key appears in clear in the gateway log");
        for path in walk(&self.gw.dir.path().join("state")) {
            let bytes = std::fs::read(&path).unwrap_or_default();
            assert!(
                !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
                "a key appears in clear in {}",
                path.display()
            );
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
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

const PY_POST: &str = r#"
import http.client, json, socket, ssl, sys
spec = json.loads(sys.argv[1])
real = socket.create_connection
socket.create_connection = lambda address, *a, **kw: real((spec["ip"], address[1]), *a, **kw)
ctx = ssl.create_default_context(cafile="/pki/gateway-ca.pem")
conn = http.client.HTTPSConnection(spec["host"], spec["port"], context=ctx, timeout=60)
try:
    conn.request("POST", spec["path"], body=spec["body"].encode(), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    print(json.dumps({"status": resp.status, "body": resp.read().decode(errors="replace")}))
except Exception as e:
    print(json.dumps({"error": repr(e)}))
"#;

/// A 403 naming a static-key finding; returns the finding id.
fn assert_blocked(status: u16, body: &str) -> String {
    assert_eq!(status, 403, "expected a block, got {status}: {body}");
    let v: Value = serde_json::from_str(body).expect("403 body is JSON");
    assert_eq!(v["error"], "static_credential_blocked", "{v}");
    v["findings"][0]["id"].as_str().expect("finding id").to_owned()
}

/// The finding `id` names container `c` (id, name, image, runtime).
fn assert_names_container(findings: &[Value], id: &str, c: &Container) {
    let f = findings.iter().find(|f| f["id"] == id).unwrap_or_else(|| panic!("finding {id} in {findings:#?}"));
    let got = &f["process"]["container"];
    assert_eq!(got["id"], c.id.as_str(), "{f}");
    assert_eq!(got["name"], c.name.as_str(), "{f}");
    assert_eq!(got["image"], IMAGE, "{f}");
    assert!(got["image_id"].as_str().is_some_and(|i| i.starts_with("sha256:")), "{f}");
    assert_eq!(got["runtime"], "docker", "{f}");
}

/// A container sharing the host's network namespace (GitLab's
/// `network_mode = "host"`, `docker run --network host`): its connects are
/// redirected like a host process's, and everything it is attributed
/// with names the container.
#[test]
fn a_host_network_container_job_is_attributed_to_its_container() {
    let scene = Scene::start_with("ctr-hostnet", Vec::new(), |dir| {
        let mappings = dir.join("mappings.yaml");
        std::fs::write(
            &mappings,
            "rules:\n  - name: test-image\n    match:\n      container: '*'\n      container_image: 'gateway-test:*'\n    identity: 'spiffe://ci.example/container/{container.name}'\n",
        )
        .expect("write mappings");
        format!("  mappings: {}\n", mappings.display())
    });
    // The mapping line above continues the `identity:` section.
    let c = scene.container("hostnet", true);
    let key = gateway_tests::keys::cursor_key();

    let (status, body, out) = scene.curl(&c, &[&scene.url("/clean")]);
    assert_eq!(
        status,
        200,
        "clean request: {body} {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        scene.gw.log_errors()
    );
    let (status, body, _) = scene.curl(&c, &["-H", &format!("Authorization: Bearer {key}"), &scene.url("/v1/chat")]);
    let curl_finding = assert_blocked(status, &body);
    let r = scene.python_post(&c, "/v1/py", &format!("{{\"api_key\": \"{key}\"}}"));
    let python_finding = assert_blocked(r["status"].as_u64().unwrap_or(0) as u16, r["body"].as_str().unwrap_or(""));
    let git = scene.git(&c, &key);
    assert!(!git.status.success(), "git must fail: the key is blocked");
    assert!(
        String::from_utf8_lossy(&git.stderr).contains("403"),
        "git reports the 403: {}",
        String::from_utf8_lossy(&git.stderr)
    );
    assert_eq!(
        scene.upstream.requests().iter().filter(|r| r.headers.iter().any(|(_, v)| v.contains(&key))).count(),
        0,
        "no request with the key reached upstream"
    );

    let findings = scene.findings();
    assert_names_container(&findings, &curl_finding, &c);
    assert_names_container(&findings, &python_finding, &c);
    let git_finding = findings
        .iter()
        .find(|f| f["process"]["comm"].as_str().is_some_and(|c| c.contains("git")))
        .unwrap_or_else(|| panic!("a finding for git in {findings:#?}"));
    assert_names_container(&findings, git_finding["id"].as_str().expect("id"), &c);
    let expected_identity = format!("spiffe://ci.example/container/{}", c.name);
    assert_eq!(git_finding["identity"], expected_identity.as_str(), "container_image/name select the identity");

    let events = scene.gw.wait_events(4);
    let mine: Vec<&Value> = events.iter().filter(|e| e["container_id"] == c.id.as_str()).collect();
    assert!(mine.len() >= 4, "every connection event names the container: {events:#?}");
    for e in &mine {
        assert_eq!(e["container_name"], c.name.as_str(), "{e}");
        assert_eq!(e["container_image"], IMAGE, "{e}");
        assert_eq!(e["container_runtime"], "docker", "{e}");
        assert_eq!(e["identity"], expected_identity.as_str(), "{e}");
    }

    let starts = scene.session_starts();
    assert!(!starts.is_empty(), "sessions were recorded");
    let text = serde_json::to_string(&starts).expect("json");
    assert!(text.contains(&c.id) && text.contains(&c.name), "the recording's start names the container: {text}");
    scene.assert_no_key_in_clear(&key);
}

/// The daemon's own `--cgroup-parent` (how an operator puts GitHub Actions
/// or Buildkite job containers, which docker starts with the daemon's
/// defaults, under an intercepted cgroup) covers containers started without
/// one; `gateway status` lists every running container and warns about the
/// one outside the intercepted cgroups.
#[test]
fn the_daemon_default_parent_is_intercepted_and_status_warns_about_containers_outside() {
    let docker = docker();
    let default_parent = docker.default_cgroup_parent().trim_start_matches('/').to_owned();
    let scene = Scene::start_with("ctr-default", vec![default_parent], |_| String::new());
    let inside = docker.run(&RunSpec {
        name: format!("default-parent-{}", std::process::id()),
        cgroup_parent: None,
        host_network: true,
        mounts: vec![(scene.pki_dir.path().to_owned(), "/pki".into())],
    });
    let outside = docker.run(&RunSpec {
        name: format!("outside-{}", std::process::id()),
        cgroup_parent: Some(format!("/gateway-tests/outside-{}", std::process::id())),
        host_network: true,
        mounts: Vec::new(),
    });
    let key = gateway_tests::keys::cursor_key();
    let (status, body, _) = scene.curl(&inside, &["-H", &format!("Authorization: Bearer {key}"), &scene.url("/x")]);
    let id = assert_blocked(status, &body);
    assert_names_container(&scene.findings(), &id, &inside);

    let status = scene.gw.status();
    let listed = status["containers"].as_array().cloned().unwrap_or_default();
    let line = |c: &Container| {
        listed.iter().find(|l| l["id"] == c.id.as_str()).cloned().unwrap_or_else(|| panic!("{} in {status:#}", c.name))
    };
    assert_eq!(line(&inside)["intercepted"], true, "{status:#}");
    assert_eq!(line(&inside)["image"], IMAGE);
    assert_eq!(line(&outside)["intercepted"], false, "{status:#}");
    assert_eq!(line(&outside)["name"], outside.name.as_str());
    let warnings: Vec<&str> = status["warnings"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    assert!(warnings.iter().any(|w| w.contains(&outside.name) && w.contains("not inspected")), "{warnings:#?}");
    assert!(!warnings.iter().any(|w| w.contains(&inside.name)), "{warnings:#?}");
    let text = scene.gw.cli(&["status"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("NOT INTERCEPTED"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
}

/// While the gateway is stopped, what its pinned programs leave behind
/// refuses a container job's intercepted connects: nothing reaches the
/// destination uninspected.
#[test]
fn while_the_gateway_is_stopped_container_connects_are_refused() {
    let mut scene = Scene::start("ctr-stopped");
    let bridge = scene.container("stopped-bridge", false);
    let host = scene.container("stopped-host", true);
    scene.gw.stop(nix::sys::signal::Signal::SIGTERM);
    let key = gateway_tests::keys::cursor_key();
    for c in [&bridge, &host] {
        let (status, _, out) = scene.curl(c, &["-H", &format!("Authorization: Bearer {key}"), &scene.url("/stopped")]);
        assert_eq!(status, 0, "no HTTP answer while the gateway is stopped ({})", c.name);
        assert!(!out.status.success(), "curl fails to connect ({})", c.name);
    }
    assert!(scene.upstream.requests().is_empty(), "nothing reached upstream");
}

/// A container job on docker's bridge network (its own network namespace,
/// the default for GitLab's docker executor, GitHub Actions `container:`
/// jobs and service containers): curl, git and python reach the upstream
/// through the gateway, a hard-coded key is blocked, and the finding names
/// the container.
#[test]
fn bridge_container_jobs_are_inspected_like_host_jobs() {
    let scene = Scene::start("ctr-bridge");
    let c = scene.container("bridge", false);
    let key = gateway_tests::keys::cursor_key();

    let (status, body, out) = scene.curl(&c, &[&scene.url("/clean")]);
    assert_eq!(
        status,
        200,
        "clean request: {body} {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        scene.gw.log_errors()
    );
    let (status, body, _) = scene.curl(&c, &["-u", &format!("{key}:"), &scene.url("/v1/models")]);
    let curl_finding = assert_blocked(status, &body);
    let r = scene.python_post(&c, "/v1/py", &format!("{{\"token\": \"{key}\"}}"));
    let python_finding = assert_blocked(r["status"].as_u64().unwrap_or(0) as u16, r["body"].as_str().unwrap_or(""));
    let git = scene.git(&c, &key);
    assert!(String::from_utf8_lossy(&git.stderr).contains("403"), "{}", String::from_utf8_lossy(&git.stderr));
    assert!(!scene.upstream.requests().iter().any(|r| r.headers.iter().any(|(k, _)| k == "authorization")));

    let findings = scene.findings();
    assert_names_container(&findings, &curl_finding, &c);
    assert_names_container(&findings, &python_finding, &c);
    let events = scene.gw.wait_events(4);
    assert!(events.iter().filter(|e| e["container_id"] == c.id.as_str()).count() >= 4, "{events:#?}");
    scene.assert_no_key_in_clear(&key);
}

/// A container whose command is the job (`docker run IMAGE curl ...`)
/// connects the moment it starts. The gateway learns of the container's
/// namespace when the runtime enters it, before the command runs, so the
/// first connect is served, not refused. Several times: it is a race the
/// gateway must win every time.
#[test]
fn a_container_job_that_connects_as_it_starts_is_served() {
    let scene = Scene::start("ctr-first");
    let resolve = scene.resolve();
    let url = scene.url("/first-connect");
    for round in 0..4 {
        let spec = RunSpec {
            name: format!("first-{round}-{}", std::process::id()),
            cgroup_parent: Some(scene.gw.cgroup_path()),
            host_network: false,
            mounts: vec![(scene.pki_dir.path().to_owned(), "/pki".into())],
        };
        let mut args =
            vec!["curl", "-sS", "--max-time", "60", "--resolve", &resolve, "--cacert", "/pki/gateway-ca.pem"];
        args.extend(gateway_tests::CURL_STATUS);
        args.push(&url);
        let out = scene.docker.run_job(&spec, &args);
        let (status, body) = gateway_tests::curl_reply(&out.stdout);
        assert_eq!(
            status,
            200,
            "round {round}: the container's first connect: {body} {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            scene.gw.log_errors()
        );
    }
    let refused = scene.gw.intercept_events("refused_unserved_netns");
    assert!(refused.is_empty(), "no connect may be refused for want of a listener: {refused:#?}");
    assert_eq!(scene.upstream.requests().iter().filter(|r| r.target == "/first-connect").count(), 4);
}

/// A container that was already running when the gateway started (a
/// gateway restart in the middle of a job) is served as soon as the gateway
/// says it runs.
#[test]
fn a_container_started_before_the_gateway_is_served() {
    let mut scene = Scene::start("ctr-before");
    scene.gw.stop(nix::sys::signal::Signal::SIGTERM);
    let c = scene.start_container("before", false);
    scene.gw.spawn(false);
    let (status, body, out) = scene.curl(&c, &[&scene.url("/after-start")]);
    assert_eq!(status, 200, "{body} {}\n{}", String::from_utf8_lossy(&out.stderr), scene.gw.log_errors());
    let events = scene.gw.wait_events(1);
    assert!(events.iter().any(|e| e["container_id"] == c.id.as_str()), "{events:#?}");
}

/// Once a container exits, nothing of the gateway keeps its network
/// namespace alive: no socket the gateway holds (a listener opened inside
/// the namespace) is in it any more.
#[test]
fn nothing_is_left_of_a_container_after_it_exits() {
    let scene = Scene::start("ctr-exit");
    let c = scene.container("exit", false);
    let (status, body, _) = scene.curl(&c, &[&scene.url("/served")]);
    assert_eq!(status, 200, "{body}\n{}", scene.gw.log_errors());
    let netns = netns_inode(&format!("/proc/{}/ns/net", c.pid()));
    let gateway = scene.gw.child.as_ref().expect("gateway").id();
    assert!(
        socket_namespaces(gateway).contains(&netns),
        "while the container runs the gateway serves it from a socket in its namespace"
    );
    c.remove();
    wait_for("the gateway lets go of the container's network namespace", || {
        if socket_namespaces(gateway).contains(&netns) {
            Err(format!("gateway {gateway} still holds a socket in network namespace {netns}"))
        } else {
            Ok(())
        }
    });
}

fn netns_inode(path: &str) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}")))
}

/// The network namespace (inode) of every socket process `pid` holds,
/// asked of each socket itself (SIOCGSKNS on a copy taken with
/// pidfd_getfd): a listening socket keeps its namespace alive even when
/// no process is left in it.
fn socket_namespaces(pid: u32) -> Vec<u64> {
    const SIOCGSKNS: libc::c_ulong = 0x894c;
    // SAFETY: plain syscalls on integers; every fd obtained is closed.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) } as libc::c_int;
    assert!(pidfd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<libc::c_int>().ok()) else { continue };
        if !is_socket {
            continue;
        }
        // SAFETY: as above.
        let local = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) } as libc::c_int;
        if local < 0 {
            continue;
        }
        // SAFETY: SIOCGSKNS takes no argument and returns a new fd.
        let ns = unsafe { libc::ioctl(local, SIOCGSKNS as _) };
        if ns >= 0 {
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: valid fd and a stat buffer.
            if unsafe { libc::fstat(ns, &mut st) } == 0 {
                out.push(st.st_ino);
            }
            unsafe { libc::close(ns) };
        }
        unsafe { libc::close(local) };
    }
    unsafe { libc::close(pidfd) };
    out
}
