//! Operating the gateway on a real runner host: configuration selection and
//! `config check`, the systemd unit (`systemd-analyze verify`, readiness
//! over a real `NOTIFY_SOCKET`), and the Debian package installed with dpkg
//! into a clean Debian root made by debootstrap, then upgraded over itself.

use std::{
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, SystemTime},
};

use gateway_tests::{gateway_bin, require_root, GatewayOptions, TestGateway, PATIENCE};

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_named_configuration_file_that_does_not_exist_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("gatway.yaml");
    for args in [&["status"][..], &["run"], &["config", "check"], &["findings", "list"]] {
        let out = run(Command::new(gateway_bin()).arg("--config").arg(&missing).args(args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(&missing.display().to_string()) && err.contains("no such configuration file"), "{err}");
    }
    // The same through the environment, and as `config check FILE`.
    let out = run(Command::new(gateway_bin()).env("GATEWAY_CONFIG", &missing).arg("status"));
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(Command::new(gateway_bin()).args(["config", "check"]).arg(&missing));
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn config_check_prints_the_effective_configuration_as_yaml_without_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.yaml");
    let token = "xoxb-1234567890-abcdefghijklmnop";
    std::fs::write(
        &path,
        format!(
            "proxy:\n  port: 15077\napprovals:\n  webhook:\n    url: https://hooks.example.com/services/{token}\n    headers:\n      Authorization: Bearer {token}\n"
        ),
    )
    .expect("write");
    let out = run(Command::new(gateway_bin()).arg("--config").arg(&path).args(["config", "check"]));
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("OK"));
    assert!(!yaml.contains(token), "a secret of the configuration is printed in clear");
    assert!(yaml.contains("port: 15077"), "the file's value: {yaml}");
    assert!(yaml.contains("on_shutdown: enforce"), "defaults are filled in: {yaml}");
    assert!(yaml.contains("url: https://hooks.example.com/[redacted]"), "{yaml}");
    assert!(yaml.contains("Authorization: '[redacted]'") || yaml.contains("Authorization: \"[redacted]\""), "{yaml}");
    // What it prints is itself a configuration file (secrets aside).
    let again = dir.path().join("effective.yaml");
    std::fs::write(&again, yaml.replace("/[redacted]", "/x")).expect("write");
    let out = run(Command::new(gateway_bin()).arg("--config").arg(&again).args(["config", "check"]));
    assert!(out.status.success(), "the printed configuration does not load: {}", String::from_utf8_lossy(&out.stderr));
}

/// `cargo xtask run` says it needs root before installing or building
/// anything (it used to build for minutes first).
#[test]
fn xtask_run_refuses_a_non_root_user_at_once() {
    require_root();
    let xtask = gateway_bin().parent().expect("target dir").join("xtask");
    assert!(xtask.is_file(), "{} missing: `cargo build --workspace --bins` builds it", xtask.display());
    let started = std::time::Instant::now();
    let out = run(Command::new("runuser").args(["-u", "nobody", "--"]).arg(&xtask).arg("run"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("needs root"), "{}: {err}", out.status);
    assert!(!err.contains("Compiling") && !err.contains("installing"), "it set up or built first: {err}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
}

/// The unit as shipped, with the binary path pointed at the one under test
/// (`verify` checks that ExecStart's program exists).
#[test]
fn the_systemd_unit_verifies() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ci-gateway.service");
    let text = std::fs::read_to_string(&unit).expect("read the unit");
    for needed in [
        "Type=notify",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_SYS_ADMIN CAP_SYS_PTRACE CAP_DAC_READ_SEARCH CAP_CHOWN\n",
        "ReadWritePaths=/var/lib/ci-gateway",
    ] {
        assert!(text.contains(needed), "the unit lacks `{needed}`");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("ci-gateway.service");
    std::fs::write(&copy, text.replace("/usr/bin/gateway", &gateway_bin().display().to_string())).expect("write");
    let out = run(Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&copy));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Other units named in Before=/After= need not exist on this host.
    let complaints: Vec<&str> = said.lines().filter(|l| !l.contains("not found") && !l.trim().is_empty()).collect();
    assert!(out.status.success() && complaints.is_empty(), "systemd-analyze verify: {said}");
}

/// The unit's capability bounding set is enough: a gateway started with
/// exactly those capabilities (and no-new-privileges, as the unit does)
/// attaches, serves an intercepted connection of a job run by another user
/// and attests it in full (its executable read through /proc), with no
/// warning logged.
#[test]
fn the_units_capabilities_are_enough_to_intercept_and_attest() {
    require_root();
    let unit = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ci-gateway.service"))
        .expect("read the unit");
    let caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit sets CapabilityBoundingSet")
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let port = gateway_tests::unique_port();
    let server = echo_once(port);
    let mut opts = GatewayOptions::opaque("caps", &[&format!("{{cidr: 127.0.0.9/32, ports: [{port}]}}")]);
    opts.wrapper = vec![
        "setpriv".into(),
        format!("--bounding-set=-all,{}", caps.join(",")),
        "--inh-caps=-all".into(),
        "--no-new-privs".into(),
    ];
    let gw = TestGateway::start(opts);
    let client = format!(
        "import socket; s = socket.create_connection(('127.0.0.9', {port})); s.sendall(b'ping'); assert s.recv(4) == b'ping'"
    );
    let out = gw
        .command_in_cgroup("runuser")
        .args(["-u", "nobody", "--", "python3", "-c", &client])
        .output()
        .expect("client");
    assert!(out.status.success(), "the job's connection failed: {}", String::from_utf8_lossy(&out.stderr));
    server.join().expect("server");
    let events = gw.wait_events(1);
    assert_eq!(events.len(), 1, "{}", gw.log());
    let e = &events[0];
    assert_eq!(e["uid"], 65534, "{e}");
    assert!(e["exe"].as_str().is_some_and(|x| x.contains("python3")), "the executable is attested: {e}");
    assert_eq!(e["attestation"], "fresh", "{e}");
    // The opaque test policy's own warning aside.
    let errors = gw.log_errors();
    let other: Vec<&str> = errors.lines().filter(|l| !l.contains("uninspectable: pass")).collect();
    assert!(other.is_empty(), "warnings with the unit's capabilities:\n{}", other.join("\n"));
}

/// A destination on 127.0.0.9:`port` that echoes one 4-byte message.
fn echo_once(port: u16) -> std::thread::JoinHandle<()> {
    let listener = std::net::TcpListener::bind(("127.0.0.9", port)).expect("bind the destination");
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).expect("read");
        s.write_all(&buf).expect("echo");
    })
}

/// systemd's side of `Type=notify`: a datagram socket named by
/// `NOTIFY_SOCKET`. READY=1 must come only once the gateway is running (its
/// "gateway running" line: programs attached, listeners bound), and
/// STOPPING=1 when it shuts down.
#[test]
fn systemd_hears_ready_only_once_the_gateway_runs_and_stopping_at_shutdown() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let receiver = std::thread::spawn(move || {
        let mut got: Vec<(SystemTime, String)> = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.iter().any(|(_, m)| m.lines().any(|l| l == "STOPPING=1")) {
            match socket.recv(&mut buf) {
                Ok(n) => got.push((SystemTime::now(), String::from_utf8_lossy(&buf[..n]).into_owned())),
                Err(e) => panic!("no STOPPING=1 within {PATIENCE:?} ({e}); got {got:?}"),
            }
        }
        got
    });
    let mut opts = GatewayOptions::opaque("notify", &[]);
    opts.env.push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    let mut gw = TestGateway::start(opts);
    let running = gw
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "gateway running" || v["message"] == "gateway running")
        .and_then(|v| v["timestamp"].as_str().map(str::to_owned))
        .expect("the gateway running line has a timestamp");
    let running = humantime::parse_rfc3339(&running).expect("timestamp");
    let child = gw.child.as_ref().expect("child");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
    let got = receiver.join().expect("receiver");
    let status = gw.child.as_mut().expect("child").wait().expect("wait");
    assert!(status.success(), "the gateway did not stop cleanly: {status}\n{}", gw.log());
    assert_eq!(got.len(), 2, "one READY, one STOPPING: {got:?}");
    let (ready_at, ready) = &got[0];
    assert!(ready.lines().any(|l| l == "READY=1"), "the first message is READY=1: {ready:?}");
    assert!(
        *ready_at + Duration::from_millis(1) >= running,
        "READY=1 arrived before the gateway was running ({ready_at:?} < {running:?})"
    );
    assert!(got[1].1.lines().any(|l| l == "STOPPING=1"), "{got:?}");
    let _ = gw.child.take();
}

/// Where `cargo xtask setup` caches the debootstrapped Debian root.
fn debian_root_tarball() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/ci-gateway/debian-bookworm-minbase.tar.gz")
}

/// A root for `chroot`, unpacked from the cached debootstrap tarball.
fn clean_debian_root(dir: &Path) -> PathBuf {
    let tarball = debian_root_tarball();
    assert!(
        tarball.is_file(),
        "{} is missing: `cargo xtask setup` makes it with debootstrap from Debian's mirror",
        tarball.display()
    );
    let root = dir.join("root");
    std::fs::create_dir_all(&root).expect("mkdir");
    ok(Command::new("tar").arg("-C").arg(&root).arg("-xzf").arg(&tarball));
    root
}

fn chroot(root: &Path, args: &[&str]) -> Output {
    run(Command::new("chroot").arg(root).args(args).env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"))
}

fn chroot_ok(root: &Path, args: &[&str]) -> String {
    let out = chroot(root, args);
    assert!(
        out.status.success(),
        "chroot {args:?} failed with {}:\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The package of the binary under test (the debug build: a release build
/// here would cost CI minutes; `cargo xtask package` makes the release one
/// the same way).
#[test]
fn the_package_installs_into_a_clean_debian_root_and_upgrades_over_itself() {
    require_root();
    let xtask = gateway_bin().parent().expect("target dir").join("xtask");
    assert!(xtask.is_file(), "{} missing: `cargo build --workspace --bins` builds it", xtask.display());
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("debs");
    ok(Command::new(&xtask).args(["package", "--fast", "--binary"]).arg(gateway_bin()).arg("--out").arg(&out_dir));
    let find = |prefix: &str| {
        std::fs::read_dir(&out_dir)
            .expect("list debs")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
            .unwrap_or_else(|| panic!("no {prefix}*.deb in {}", out_dir.display()))
    };
    let deb = find("ci-gateway_");
    let dbgsym = find("ci-gateway-dbgsym_");

    // Contents and metadata.
    let depends = ok(Command::new("dpkg-deb").args(["--field"]).arg(&deb).arg("Depends"));
    assert!(depends.contains("libhyperscan5") && depends.contains("libc6"), "Depends: {depends}");
    let files = ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for needed in [
        "./usr/bin/gateway",
        "./lib/systemd/system/ci-gateway.service",
        "./etc/ci-gateway/gateway.yaml",
        "./usr/share/doc/ci-gateway/operations.md",
        "./usr/share/doc/ci-gateway/README.md",
    ] {
        assert!(files.contains(needed), "the package lacks {needed}:\n{files}");
    }
    let conffiles = dir.path().join("control");
    ok(Command::new("dpkg-deb").arg("--control").arg(&deb).arg(&conffiles));
    assert_eq!(
        std::fs::read_to_string(conffiles.join("conffiles")).expect("conffiles"),
        "/etc/ci-gateway/gateway.yaml\n"
    );
    let dbg_files = ok(Command::new("dpkg-deb").arg("--contents").arg(&dbgsym));
    assert!(dbg_files.contains("./usr/lib/debug/usr/bin/gateway.debug"), "{dbg_files}");
    let unpacked = dir.path().join("unpacked");
    ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked));
    let sections = ok(Command::new("readelf").args(["-S", "-W"]).arg(unpacked.join("usr/bin/gateway")));
    assert!(!sections.contains(".debug_info"), "the packaged binary still carries its debug info");
    assert!(sections.contains(".gnu_debuglink"), "the packaged binary does not name its debug file");

    // Installed with dpkg into a clean Debian root.
    let root = clean_debian_root(dir.path());
    for file in [&deb, &dbgsym] {
        std::fs::copy(file, root.join("tmp").join(file.file_name().expect("name"))).expect("copy deb");
    }
    let in_root = |p: &Path| format!("/tmp/{}", p.file_name().and_then(|n| n.to_str()).expect("name"));
    chroot_ok(&root, &["dpkg", "-i", &in_root(&deb), &in_root(&dbgsym)]);
    let version = chroot_ok(&root, &["gateway", "--version"]);
    assert!(version.starts_with("gateway "), "{version}");
    let effective = chroot_ok(&root, &["gateway", "config", "check"]);
    assert!(effective.contains("on_shutdown: enforce"), "the packaged configuration enforces: {effective}");
    let state = std::fs::metadata(root.join("var/lib/ci-gateway")).expect("the state directory exists");
    assert_eq!(state.permissions().mode() & 0o777, 0o700);
    assert!(root.join("lib/systemd/system/ci-gateway.service").is_file());

    // An operator's edit to the conffile survives an upgrade over itself.
    let conf = root.join("etc/ci-gateway/gateway.yaml");
    let edited = format!("{}\n# edited by the operator\n", std::fs::read_to_string(&conf).expect("conf"));
    std::fs::write(&conf, &edited).expect("edit");
    chroot_ok(&root, &["dpkg", "-i", &in_root(&deb)]);
    assert_eq!(std::fs::read_to_string(&conf).expect("conf"), edited);
    chroot_ok(&root, &["gateway", "--version"]);
    let status = chroot_ok(&root, &["dpkg-query", "-W", "-f=${Status}", "ci-gateway"]);
    assert_eq!(status, "install ok installed");
}

/// A gateway started in a private cgroup namespace (what container runtimes
/// give a container on cgroup-v2 hosts, the DaemonSet's case) joins the
/// host's, so a job's cgroup reads as the configured host path: the job is
/// attributed to its cgroup and its connection served.
#[test]
fn a_gateway_started_in_a_private_cgroup_namespace_sees_jobs_by_their_host_cgroup() {
    require_root();
    let port = gateway_tests::unique_port();
    let server = echo_once(port);
    let mut opts = GatewayOptions::opaque("cgroupns", &[&format!("{{cidr: 127.0.0.9/32, ports: [{port}]}}")]);
    // A new cgroup namespace rooted at the test's own cgroup; the test's
    // namespace stands for the host's (this machine's init may not be
    // readable, as without the host's PID namespace).
    opts.wrapper = vec!["unshare".into(), "--cgroup".into()];
    let host_ns = format!("/proc/{}/ns/cgroup", std::process::id());
    opts.intercept_yaml = format!("  cgroup_namespace: {host_ns}\n");
    let gw = TestGateway::start(opts);
    let pid = gw.child.as_ref().expect("running").id();
    let own = std::fs::read_link(format!("/proc/{pid}/ns/cgroup")).expect("the gateway's cgroup namespace");
    let host = std::fs::read_link(&host_ns).expect("the test's cgroup namespace");
    assert_eq!(own, host, "the gateway did not join the host's cgroup namespace");
    let client = format!(
        "import socket; s = socket.create_connection(('127.0.0.9', {port})); s.sendall(b'ping'); assert s.recv(4) == b'ping'"
    );
    let out = gw.command_in_cgroup("python3").args(["-c", &client]).output().expect("client");
    assert!(out.status.success(), "the job's connection failed: {}", String::from_utf8_lossy(&out.stderr));
    server.join().expect("server");
    let events = gw.wait_events(1);
    assert_eq!(events[0]["cgroup"], gw.cgroup_path(), "the job's cgroup as the gateway read it: {}", events[0]);
    assert!(gw.log().contains("joined the host's cgroup namespace"), "{}", gw.log());
}
