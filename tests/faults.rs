//! Faults injected into a running gateway (issue 17): its stores' disk
//! fills up and frees again, it is killed over and over, its upstream fails,
//! its intercepted cgroup goes away, its own cgroup is frozen, its clock
//! jumps, the device under its stores fails every I/O. Real eBPF redirect,
//! a real gateway, curl in the intercepted cgroup, a real HTTPS upstream,
//! and the session and findings databases on a small file system the test
//! mounts (a tmpfs, or ext4 on a loop device it can make fail).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use gateway_tests::{
    keys::github_token,
    unique_port,
    upstream::{TestPki, Upstream},
    wait_for, GatewayOptions, TestGateway,
};
use serde_json::Value;

const HOST: &str = "api.test.internal";
const UPSTREAM_IP: &str = "127.0.0.9";

/// Everything is recorded in full, except what `/unrecorded/` says.
const POLICY: &str = r#"version: 1
rules:
  - name: not-recorded
    match: { request: { path: "/unrecorded/**" } }
    action: allow
    record: none
defaults:
  action: allow
  record: full
"#;

/// A tmpfs of a few MiB, unmounted at drop: a disk the test can fill.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(mib: u32) -> SmallDisk {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=0755"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(out.status.success(), "mount tmpfs: {}", String::from_utf8_lossy(&out.stderr));
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills what is left of the disk with one file.
    fn fill(&self) {
        let filler = self.path().join("filler");
        let out = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k", "status=none"])
            .arg(format!("of={}", filler.display()))
            .output()
            .expect("run dd");
        // dd stops with "No space left on device": that is the point.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("No space left"), "dd should have filled the disk: {err}");
    }

    /// Gives the space back.
    fn free(&self) {
        std::fs::remove_file(self.path().join("filler")).expect("remove the filler");
    }
}

impl AsRef<Path> for SmallDisk {
    fn as_ref(&self) -> &Path {
        self.path()
    }
}

/// A small ext4 file system (no journal, `errors=continue`, `sync`: every
/// write reaches the device at once) on a loop device the test can make
/// fail every I/O and work again: a failing disk, without root's power to
/// read past permissions. The device's size limit (`LOOP_SET_STATUS64`) is
/// cut to one block, so everything past the superblock is beyond its end
/// (I/O error), then lifted. (device-mapper's `error` target would be the
/// usual tool; the test machines' kernels are built without device-mapper.)
/// Torn down at drop.
struct FailingDisk {
    dir: tempfile::TempDir,
    _image_dir: tempfile::TempDir,
    loop_dev: String,
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Sets a loop device's size limit (0: the whole backing file), keeping
/// the rest of its `loop_info64` (`lo_sizelimit` is at byte 32).
const SET_LOOP_LIMIT: &str = "import fcntl, struct, sys\n\
                              with open(sys.argv[1], 'rb') as f:\n\
                              \x20   info = bytearray(232)\n\
                              \x20   fcntl.ioctl(f, 0x4C05, info)\n\
                              \x20   struct.pack_into('<Q', info, 32, int(sys.argv[2]))\n\
                              \x20   fcntl.ioctl(f, 0x4C04, bytes(info))\n";

impl FailingDisk {
    fn mount(mib: u64) -> FailingDisk {
        let image_dir = tempfile::tempdir().expect("tempdir");
        let image = image_dir.path().join("disk.img");
        std::fs::File::create(&image).and_then(|f| f.set_len(mib << 20)).expect("create the image");
        let loop_dev = run_ok(Command::new("losetup").args(["--find", "--show"]).arg(&image));
        let disk = FailingDisk { dir: tempfile::tempdir().expect("tempdir"), _image_dir: image_dir, loop_dev };
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-O", "^has_journal", &disk.loop_dev]));
        run_ok(Command::new("mount").args(["-o", "sync,errors=continue", &disk.loop_dev]).arg(disk.dir.path()));
        disk
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn limit(&self, bytes: u64) {
        run_ok(Command::new("python3").args(["-c", SET_LOOP_LIMIT, &self.loop_dev, &bytes.to_string()]));
    }

    /// Every read and write fails from now on; the databases' cached pages
    /// are dropped so that reading them fails too (the shared-memory index,
    /// mapped by SQLite, keeps its pages).
    fn fail(&self) {
        self.limit(4096);
        for file in ["sessions.db", "sessions.db-wal", "findings.db", "findings.db-wal"] {
            let path = self.path().join(file);
            if path.exists() {
                // dd with iflag=nocache and no count drops the file's cache.
                run_ok(Command::new("dd").arg(format!("if={}", path.display())).args([
                    "iflag=nocache",
                    "count=0",
                    "status=none",
                ]));
            }
        }
    }

    /// The device works again.
    fn heal(&self) {
        self.limit(0);
    }
}

impl AsRef<Path> for FailingDisk {
    fn as_ref(&self) -> &Path {
        self.path()
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = Command::new("python3").args(["-c", SET_LOOP_LIMIT, &self.loop_dev, "0"]).status();
        let _ = Command::new("umount").arg(self.dir.path()).status();
        let _ = Command::new("losetup").args(["-d", &self.loop_dev]).status();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

struct Scene {
    gw: TestGateway,
    upstream: Upstream,
    port: u16,
    gateway_ca: PathBuf,
    _pki_dir: tempfile::TempDir,
}

impl Scene {
    fn start(name: &str, disk: &impl AsRef<Path>, on_failure: &str) -> Scene {
        Scene::start_with(name, disk, on_failure, |_| {})
    }

    /// [`Scene::start`] with the gateway's options adjusted by `tweak`.
    fn start_with(
        name: &str,
        disk: &impl AsRef<Path>,
        on_failure: &str,
        tweak: impl FnOnce(&mut GatewayOptions),
    ) -> Scene {
        let disk = disk.as_ref();
        let pki_dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(pki_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let pki = TestPki::new(pki_dir.path(), &[HOST]);
        let port = unique_port();
        let upstream = Upstream::start(format!("{UPSTREAM_IP}:{port}").parse().expect("addr"), &pki);
        let dest = format!("{{cidr: {UPSTREAM_IP}/32, ports: [{port}]}}");
        let mut opts = GatewayOptions::new(name, &[dest.as_str()]);
        opts.policy_yaml = Some(POLICY.to_owned());
        opts.extra_yaml = format!(
            "tls:\n  intercept: ['*.test.internal']\n  extra_upstream_cas: [{ca}]\n\
             record:\n  flush_interval: 20ms\n  database: {sessions}\n  on_failure: {on_failure}\n\
             findings:\n  database: {findings}\n",
            ca = pki.ca_path.display(),
            sessions = disk.join("sessions.db").display(),
            findings = disk.join("findings.db").display(),
        );
        tweak(&mut opts);
        let gw = TestGateway::start(opts);
        let gateway_ca = gw.dir.path().join("gateway-ca.pem");
        let out = gw.cli(&["ca", "export", "--out", gateway_ca.to_str().expect("utf8")]);
        assert!(out.status.success(), "ca export: {}", String::from_utf8_lossy(&out.stderr));
        Scene { gw, upstream, port, gateway_ca, _pki_dir: pki_dir }
    }

    /// A POST of `body_kib` KiB from curl in the intercepted cgroup: the
    /// status and the body the job saw.
    fn post(&self, path: &str, body_kib: usize, header: Option<&str>) -> (u16, String) {
        let body = "x".repeat(body_kib * 1024);
        let mut cmd = self.gw.command_in_cgroup("curl");
        cmd.args(["-sS", "--resolve", &format!("{HOST}:{}:{UPSTREAM_IP}", self.port), "--cacert"])
            .arg(&self.gateway_ca)
            .args(gateway_tests::CURL_STATUS)
            .args(["--data-binary", "@-", "-H", "content-type: text/plain"]);
        if let Some(h) = header {
            cmd.args(["-H", h]);
        }
        cmd.arg(format!("https://{HOST}:{}{path}", self.port));
        cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("curl");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(body.as_bytes()).expect("write the body");
        }
        let out = child.wait_with_output().expect("curl");
        gateway_tests::curl_reply(&out.stdout)
    }

    fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.gw.cli(args);
        assert!(out.status.success(), "gateway {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("gateway {args:?}: not JSON ({e})"))
    }

    /// The URLs of every exchange committed so far, all sessions.
    fn recorded_urls(&self) -> Vec<String> {
        let sessions = self.cli_json(&["sessions", "list", "--json", "--limit", "1000000"]);
        let mut urls = Vec::new();
        for s in sessions.as_array().into_iter().flatten() {
            let id = s["id"].as_str().or(s["session"].as_str()).expect("session id").to_owned();
            let out = self.gw.cli(&["sessions", "export", &id]);
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let Ok(record) = serde_json::from_str::<Value>(line) else { continue };
                let Some(data) = record["data"].as_str().and_then(|d| serde_json::from_str::<Value>(d).ok()) else {
                    continue;
                };
                if let Some(url) = data["url"].as_str() {
                    urls.push(url.to_owned());
                }
            }
        }
        urls
    }

    /// Asserts that every session's chain verifies.
    fn verify_all(&self) {
        let out = self.gw.cli(&["sessions", "verify", "--all"]);
        assert!(
            out.status.success(),
            "sessions verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The state `gateway_recorder_health` reports as 1 on `/metrics`.
    fn recorder_health(&self) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.gw.api_port);
        let out = Command::new("curl").args(["-sS", "--max-time", "10", &url]).output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().filter_map(|l| l.strip_prefix("gateway_recorder_health{state=\"")).find_map(|rest| {
            rest.split_once("\"} ").filter(|(_, v)| v.trim() == "1").map(|(state, _)| state.to_owned())
        })
    }

    fn log_has(&self, event: &str) -> bool {
        self.gw.log().lines().any(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| v["event"] == event || v["fields"]["event"] == event)
        })
    }
}

/// The disk under both stores fills while jobs send; then space returns.
/// With `refuse`, what the policy records is refused (503, and the reason)
/// while the recorder cannot commit, what it does not record still passes,
/// and every request that reached its server is in the recording once the
/// disk has room again; a key sent meanwhile is blocked and its finding is
/// written once the findings database recovers. With `serve`, everything is
/// served and everything is recorded after recovery.
/// What keeps the stores from writing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StoreFault {
    /// The disk under them is full.
    DiskFull,
    /// Another process holds their write lock (SQLite busy).
    Locked,
    /// Their device fails every read and write (I/O errors).
    IoError,
}

/// The disk under the stores in a [`store_fault`] test.
enum Disk {
    Small(SmallDisk),
    Failing(FailingDisk),
}

impl AsRef<Path> for Disk {
    fn as_ref(&self) -> &Path {
        match self {
            Disk::Small(d) => d.path(),
            Disk::Failing(d) => d.path(),
        }
    }
}

/// Another process holding both databases' write locks (`BEGIN
/// EXCLUSIVE`) until dropped: the gateway's writers get SQLITE_BUSY once
/// their `busy_timeout` runs out.
struct StoreLock {
    child: std::process::Child,
}

impl StoreLock {
    fn hold(dir: &Path) -> StoreLock {
        use std::io::BufRead as _;
        let script = "import sqlite3, sys\n\
                      held = [sqlite3.connect(p, isolation_level=None, timeout=30) for p in sys.argv[1:]]\n\
                      for c in held: c.execute('BEGIN EXCLUSIVE')\n\
                      print('locked', flush=True)\n\
                      sys.stdin.read()\n";
        let mut child = Command::new("python3")
            .args(["-c", script])
            .arg(dir.join("sessions.db"))
            .arg(dir.join("findings.db"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
        assert_eq!(line.trim(), "locked", "the lock holder did not take the locks");
        StoreLock { child }
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn full_disk(name: &str, on_failure: &str) {
    store_fault(name, on_failure, StoreFault::DiskFull);
}

fn store_fault(name: &str, on_failure: &str, fault: StoreFault) {
    let disk = match fault {
        StoreFault::DiskFull => Disk::Small(SmallDisk::mount(6)),
        StoreFault::Locked => Disk::Small(SmallDisk::mount(64)),
        StoreFault::IoError => Disk::Failing(FailingDisk::mount(64)),
    };
    let scene = Scene::start(name, &disk, on_failure);
    let refuse = on_failure == "refuse";

    let mut forwarded = Vec::new();
    for i in 0..3 {
        let path = format!("/before/{i}");
        assert_eq!(scene.post(&path, 4, None).0, 200, "{path} before the disk fills");
        forwarded.push(path);
    }
    wait_for("the first exchanges are committed", || {
        let urls = scene.recorded_urls();
        if forwarded.iter().all(|p| urls.iter().any(|u| u.ends_with(p.as_str()))) {
            Ok(())
        } else {
            Err(format!("recorded so far: {urls:?}"))
        }
    });

    let mut lock = None;
    match (fault, &disk) {
        (StoreFault::DiskFull, Disk::Small(d)) => d.fill(),
        (StoreFault::Locked, _) => lock = Some(StoreLock::hold(disk.as_ref())),
        (StoreFault::IoError, Disk::Failing(d)) => d.fail(),
        _ => unreachable!("each fault has its disk"),
    }
    // Bodies big enough that the write-ahead log must grow: the first
    // commit that needs space fails.
    let mut refused_body = None;
    // A locked database fails a commit only after the writer's busy
    // timeout (10 s): until then requests are served and queued.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let body_kib = if fault == StoreFault::DiskFull { 48 } else { 4 };
    for i in 0.. {
        assert!(std::time::Instant::now() < deadline, "the stores' failure was never noticed");
        if fault == StoreFault::DiskFull && i >= 200 {
            break;
        }
        let path = format!("/while-full/{i}");
        let (status, body) = scene.post(&path, body_kib, None);
        match status {
            200 => forwarded.push(path),
            503 if refuse => {
                refused_body = Some(body);
                break;
            }
            other => panic!("{path}: unexpected status {other}: {body}"),
        }
        if !refuse && scene.log_has("recording_failed") && i >= 5 {
            break;
        }
    }
    assert!(scene.log_has("recording_failed"), "no recording_failed event:\n{}", scene.gw.log_errors());
    if fault == StoreFault::IoError {
        // SQLite's own word for it: the device, not space or a lock.
        assert!(
            scene.gw.log().contains("disk I/O error"),
            "the failure is not an I/O error:\n{}",
            scene.gw.log_errors()
        );
    }
    if refuse {
        let body = refused_body.expect("nothing was refused while the disk was full");
        assert!(body.contains("recording_unavailable"), "the refusal says why: {body}");
        // Refused requests never reach the server.
        let before = scene.upstream.requests().len();
        assert_eq!(scene.post("/while-full/refused", 1, None).0, 503);
        assert_eq!(scene.upstream.requests().len(), before, "a refused request reached the server");
        // What the policy does not record is not held up by the recorder.
        assert_eq!(scene.post("/unrecorded/ok", 1, None).0, 200, "record: none traffic is refused");
    } else {
        assert_eq!(scene.post("/while-full/served", 1, None).0, 200);
        forwarded.push("/while-full/served".into());
    }
    // A key sent while the findings database cannot write: never let
    // through for want of a finding. With `refuse` the request is refused
    // before it is inspected; with `serve` it is blocked as a key.
    let token = github_token();
    let before = scene.upstream.requests().len();
    let (status, _) = scene.post("/keyed", 1, Some(&format!("authorization: token {token}")));
    assert_eq!(status, if refuse { 503 } else { 403 }, "a key is blocked whatever the disk says");
    assert_eq!(scene.upstream.requests().len(), before, "the keyed request reached the server");

    // The recorder says it is failing in its metric too.
    let health = scene.recorder_health();
    assert_eq!(health.as_deref(), Some("failing"), "gateway_recorder_health while the stores fail");
    match (fault, &disk) {
        (StoreFault::DiskFull, Disk::Small(d)) => d.free(),
        (StoreFault::Locked, _) => drop(lock.take()),
        (StoreFault::IoError, Disk::Failing(d)) => d.heal(),
        _ => unreachable!("each fault has its disk"),
    }
    wait_for("requests pass again once the stores can write", || {
        let path = "/after/probe".to_owned();
        match scene.post(&path, 1, None) {
            (200, _) => Ok(()),
            (status, body) => Err(format!("{status}: {body}")),
        }
    });
    forwarded.push("/after/probe".into());
    wait_for("a recording_recovered event", || {
        if scene.log_has("recording_recovered") {
            Ok(())
        } else {
            Err(scene.gw.log_errors())
        }
    });

    // Nothing the server received is missing from the recording.
    wait_for("every forwarded request is recorded", || {
        let urls = scene.recorded_urls();
        let missing: Vec<&String> =
            forwarded.iter().filter(|p| !urls.iter().any(|u| u.ends_with(p.as_str()))).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("{} of {} missing, e.g. {:?}", missing.len(), forwarded.len(), missing.first()))
        }
    });
    // The finding of the key sent while the disk was full is written now.
    wait_for("the finding is written after recovery", || {
        if refuse {
            // Refused before inspection: there is no finding to write.
            return Ok(());
        }
        let findings = scene.cli_json(&["findings", "list", "--json"]);
        let n = findings.as_array().map_or(0, Vec::len);
        if n >= 1 {
            Ok(())
        } else {
            Err(format!("{findings}"))
        }
    });
    if !refuse {
        // It did fail while the disk was full, and was written again after.
        let log = scene.gw.log();
        assert!(log.contains("recording a finding failed"), "the finding's first write should have failed");
        assert!(log.contains("a finding the database refused earlier is recorded now"));
    }
    assert_eq!(scene.recorder_health().as_deref(), Some("recording"), "gateway_recorder_health after recovery");
    // Every chain verifies; the key itself was never written anywhere.
    scene.verify_all();
    for file in ["sessions.db", "sessions.db-wal", "findings.db", "findings.db-wal"] {
        if let Ok(bytes) = std::fs::read(disk.as_ref().join(file)) {
            assert!(!bytes.windows(token.len()).any(|w| w == token.as_bytes()), "{file} holds the key in clear");
        }
    }
    assert!(!scene.gw.log().contains(&token), "the log holds the key in clear");
}

#[test]
fn a_full_disk_refuses_what_must_be_recorded_and_loses_nothing_it_acknowledged() {
    full_disk("disk-refuse", "refuse");
}

#[test]
fn a_full_disk_with_on_failure_serve_keeps_serving_and_records_everything_after() {
    full_disk("disk-serve", "serve");
}

/// The same while another process holds both databases' write locks
/// (SQLite busy), with `refuse` and with `serve`.
#[test]
fn locked_stores_refuse_what_must_be_recorded_and_lose_nothing_once_released() {
    store_fault("busy-refuse", "refuse", StoreFault::Locked);
    store_fault("busy-serve", "serve", StoreFault::Locked);
}

/// The device under both stores fails every I/O while jobs send (a dying
/// disk; root reads past permissions, so this is how a store becomes
/// unreadable), then works again: as for the full disk, with `refuse` and
/// with `serve`.
#[test]
fn stores_on_a_failing_device_refuse_what_must_be_recorded_and_lose_nothing_once_it_works() {
    store_fault("eio-refuse", "refuse", StoreFault::IoError);
    store_fault("eio-serve", "serve", StoreFault::IoError);
}

/// The finding ids (`F-<n>`) a refusal names.
fn finding_ids(body: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.find("F-") {
        let digits: String = rest[at + 2..].chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty() {
            ids.push(format!("F-{digits}"));
        }
        rest = &rest[at + 2..];
    }
    ids.sort();
    ids.dedup();
    ids
}

/// SIGKILL at random points while jobs send clean and keyed requests, 50
/// times in a row, each time restarted: the stores open every time, every
/// session that had ended before a kill is still there, every finding a
/// job was told about exists, and every chain verifies.
#[test]
fn fifty_sigkills_while_recording_lose_nothing_acknowledged() {
    use rand::Rng as _;
    use std::io::BufRead as _;

    let disk = SmallDisk::mount(256);
    let mut scene = Scene::start("kill50", &disk, "refuse");
    let keys: Vec<String> = (0..400).map(|_| github_token()).collect();
    let keys_file = scene.gw.dir.path().join("keys.txt");
    std::fs::write(&keys_file, keys.join("\n")).expect("write keys");
    let stop_file = scene.gw.dir.path().join("stop");
    // One job for the whole test: a new connection per request, a clean one
    // then a keyed one, each answer (or error) a JSON line.
    let script = format!(
        r#"import http.client, json, os, socket, ssl, sys, time
ctx = ssl.create_default_context(cafile='{ca}')
keys = open('{keys}').read().split()
i = 0
while not os.path.exists('{stop}'):
    for path, headers in (('/clean/%d' % i, {{}}), ('/keyed/%d' % i, {{'Authorization': 'token ' + keys[i % len(keys)]}})):
        try:
            raw = socket.create_connection(('{ip}', {port}), timeout=10)
            c = http.client.HTTPSConnection('{host}', {port}, context=ctx, timeout=10)
            c.sock = ctx.wrap_socket(raw, server_hostname='{host}')
            c.request('GET', path, headers=dict(headers, Host='{host}'))
            r = c.getresponse()
            body = r.read().decode('utf-8', 'replace')
            print(json.dumps({{'path': path, 'status': r.status, 'body': body[:4000]}}), flush=True)
            c.close()
        except Exception as e:
            print(json.dumps({{'path': path, 'error': type(e).__name__}}), flush=True)
            time.sleep(0.02)
    i += 1
"#,
        ca = scene.gateway_ca.display(),
        keys = keys_file.display(),
        stop = stop_file.display(),
        ip = UPSTREAM_IP,
        port = scene.port,
        host = HOST,
    );
    let mut job = scene
        .gw
        .command_in_cgroup("python3")
        .arg("-c")
        .arg(&script)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    let stdout = job.stdout.take().expect("stdout");
    let answers = std::thread::spawn(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
            .collect::<Vec<_>>()
    });

    let mut rng = rand::rng();
    let rounds: usize = std::env::var("FAULTS_KILL_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(50);
    let mut ended_before_kills = std::collections::BTreeSet::new();
    for round in 0..rounds {
        std::thread::sleep(std::time::Duration::from_millis(rng.random_range(100..800)));
        if round % 10 == 9 {
            // Sessions that had ended before this kill must all survive it.
            for s in
                scene.cli_json(&["sessions", "list", "--json", "--limit", "1000000"]).as_array().into_iter().flatten()
            {
                if s["state"] == "ended" {
                    ended_before_kills.insert(s["id"].as_str().expect("id").to_owned());
                }
            }
        }
        scene.gw.stop(nix::sys::signal::Signal::SIGKILL);
        scene.gw.spawn(false);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    std::fs::write(&stop_file, b"").expect("stop the job");
    let _ = job.wait();
    let answers = answers.join().expect("reader");

    let answered = answers.iter().filter(|a| a.get("status").is_some()).count();
    assert!(
        answered >= 50,
        "too few requests were answered to test anything: {answered} of {}; first: {:?}; gateway errors:\n{}",
        answers.len(),
        answers.iter().take(3).collect::<Vec<_>>(),
        scene.gw.log_errors()
    );
    for a in &answers {
        if let Some(status) = a["status"].as_u64() {
            let path = a["path"].as_str().unwrap_or_default();
            let expected = if path.starts_with("/keyed/") { 403 } else { 200 };
            assert_eq!(status, expected, "{path}: {}", a["body"]);
        }
    }
    // Every finding a job was told about survived every kill.
    let told: std::collections::BTreeSet<String> =
        answers.iter().filter_map(|a| a["body"].as_str()).flat_map(finding_ids).collect();
    assert!(!told.is_empty(), "no refusal named a finding");
    let findings = scene.cli_json(&["findings", "list", "--json"]);
    let stored: std::collections::BTreeSet<String> =
        findings.as_array().into_iter().flatten().filter_map(|f| f["id"].as_str().map(str::to_owned)).collect();
    let lost: Vec<&String> = told.difference(&stored).collect();
    assert!(lost.is_empty(), "findings named to jobs and then lost: {lost:?}");
    // Every session that had ended before a kill is still there, and every
    // chain (interrupted ones up to their last committed record) verifies.
    let now: std::collections::BTreeSet<String> = scene
        .cli_json(&["sessions", "list", "--json", "--limit", "1000000"])
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect();
    let lost: Vec<&String> = ended_before_kills.difference(&now).collect();
    assert!(!ended_before_kills.is_empty() && lost.is_empty(), "ended sessions lost: {lost:?}");
    scene.verify_all();
    for key in &keys {
        assert!(!scene.gw.log().contains(key.as_str()), "the log holds a key in clear");
    }
}

/// A server that fails in each way the issue lists: by path on its first
/// port (trusted certificate), with a certificate nobody trusts on the
/// second, and by closing during the handshake on the third.
const FAULTY_UPSTREAM: &str = r#"
import socket, ssl, struct, sys, threading, time
ip, ports, cert, key, other_cert, other_key = sys.argv[1], [int(p) for p in sys.argv[2:5]], *sys.argv[5:9]

def context(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(['http/1.1'])
    return ctx

def reset(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
    sock.close()

def http(conn, ctx):
    try:
        tls = ctx.wrap_socket(conn, server_side=True)
        head = b''
        while b'\r\n\r\n' not in head:
            data = tls.recv(65536)
            if not data:
                return
            head += data
        path = head.split(b' ')[1].decode()
        if path.startswith('/reset-before-head'):
            reset(tls)
        elif path.startswith('/reset-mid-request'):
            tls.recv(1024)
            reset(tls)
        elif path.startswith('/reset-mid-body'):
            tls.sendall(b'HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n' + b'a' * 1000)
            time.sleep(0.3)
            reset(tls)
        elif path.startswith('/malformed'):
            tls.sendall(b'HTTP/1.1 200 OK\r\nthis is not a header\r\n\r\n')
            time.sleep(0.5)
            tls.close()
        elif path.startswith('/stall'):
            time.sleep(60)
        else:
            tls.sendall(b'HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok')
            tls.close()
    except (OSError, ssl.SSLError):
        pass

def close_at_once(conn, ctx):
    conn.close()

def serve(port, ctx, handler):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.listen(64)
    def loop():
        while True:
            conn, _ = s.accept()
            threading.Thread(target=handler, args=(conn, ctx), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()

serve(ports[0], context(cert, key), http)
serve(ports[1], context(other_cert, other_key), http)
serve(ports[2], None, close_at_once)
print('ready', flush=True)
while True:
    time.sleep(3600)
"#;

/// Upstream faults: resets before the response and in the middle of the
/// request and of the response, a malformed response, a server that stalls,
/// a certificate the gateway does not trust, a handshake cut short. The job
/// gets a clear error each time (502, or 504 for the stall, with the
/// cause), the session records the exchange as `upstream_failed` with that
/// status, and the gateway keeps serving.
#[test]
fn an_upstream_that_fails_in_every_way_gives_the_job_a_clear_error_and_a_recorded_one() {
    use std::io::BufRead as _;

    let pki_dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(pki_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let pki = TestPki::new(pki_dir.path(), &[HOST]);
    let other_dir = pki_dir.path().join("other");
    std::fs::create_dir(&other_dir).expect("mkdir");
    let untrusted = TestPki::new(&other_dir, &[HOST]);
    let (cert, key) = pki.write_leaf(pki_dir.path());
    let (other_cert, other_key) = untrusted.write_leaf(&other_dir);
    let ports = [unique_port(), unique_port(), unique_port()];
    let mut server = KillOnDrop(
        Command::new("python3")
            .arg("-c")
            .arg(FAULTY_UPSTREAM)
            .arg(UPSTREAM_IP)
            .args(ports.map(|p| p.to_string()))
            .args([&cert, &key, &other_cert, &other_key])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3"),
    );
    let mut ready = String::new();
    std::io::BufReader::new(server.0.stdout.take().expect("stdout")).read_line(&mut ready).expect("read");
    assert_eq!(ready.trim(), "ready", "the faulty upstream did not start");

    let dest = format!("{{cidr: {UPSTREAM_IP}/32, ports: [{}, {}, {}]}}", ports[0], ports[1], ports[2]);
    let mut opts = GatewayOptions::new("upstream-faults", &[dest.as_str()]);
    opts.policy_yaml = Some(POLICY.to_owned());
    opts.proxy_yaml = "  limits:\n    upstream_response_timeout: 2s\n".into();
    opts.extra_yaml = format!(
        "tls:\n  intercept: ['*.test.internal']\n  extra_upstream_cas: [{ca}]\nrecord:\n  flush_interval: 20ms\n",
        ca = pki.ca_path.display(),
    );
    let gw = TestGateway::start(opts);
    let gateway_ca = gw.dir.path().join("gateway-ca.pem");
    let out = gw.cli(&["ca", "export", "--out", gateway_ca.to_str().expect("utf8")]);
    assert!(out.status.success(), "ca export: {}", String::from_utf8_lossy(&out.stderr));
    let curl = |port: u16, path: &str, upload_kib: usize| {
        let mut cmd = gw.command_in_cgroup("curl");
        cmd.args(["-sS", "--max-time", "20", "--resolve", &format!("{HOST}:{port}:{UPSTREAM_IP}"), "--cacert"])
            .arg(&gateway_ca)
            .args(gateway_tests::CURL_STATUS);
        if upload_kib > 0 {
            cmd.args(["--data-binary", "@-"]);
        }
        cmd.arg(format!("https://{HOST}:{port}{path}"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("curl");
        let mut stdin = child.stdin.take().expect("stdin");
        let feeder = std::thread::spawn(move || {
            use std::io::Write as _;
            let chunk = vec![b'u'; 1024];
            for _ in 0..upload_kib {
                if stdin.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let out = child.wait_with_output().expect("curl");
        let _ = feeder.join();
        let (status, body) = gateway_tests::curl_reply(&out.stdout);
        (status, body, out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };

    let (status, body, ..) = curl(ports[0], "/ok", 0);
    assert_eq!((status, body.as_str()), (200, "ok"));
    // (port, path, upload KiB, status the job sees, what the error says)
    let cases: [(u16, &str, usize, u16, &str); 6] = [
        (ports[0], "/reset-before-head", 0, 502, "upstream"),
        (ports[0], "/reset-mid-request", 8192, 502, "upstream"),
        (ports[0], "/malformed", 0, 502, "upstream"),
        (ports[0], "/stall", 0, 504, "timed out"),
        (ports[1], "/untrusted", 0, 502, "certificate"),
        (ports[2], "/cut-handshake", 0, 502, "upstream"),
    ];
    for (port, path, upload, want, says) in cases {
        let started = std::time::Instant::now();
        let (status, body, code, stderr) = curl(port, path, upload);
        if upload > 0 && status == 0 {
            // The 502 is sent while the job is still uploading; curl over
            // HTTP/2 may then report the stream's reset instead of the
            // answer. Never a success, and recorded as the 502 below.
            assert_ne!(code, Some(0), "{path}: an upload the server reset must not succeed");
            continue;
        }
        assert_eq!(
            status,
            want,
            "{path}: curl exit {code:?} {stderr}, body {body}; gateway log:\n{}",
            gw.log().lines().rev().take(12).collect::<Vec<_>>().join("\n")
        );
        let error: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: not JSON: {body}"));
        let text = error["error"].as_str().unwrap_or_default().to_ascii_lowercase();
        assert!(text.contains(says), "{path}: the error should say `{says}`: {error}");
        if path == "/stall" {
            assert!(started.elapsed() < std::time::Duration::from_secs(15), "the stall was not cut");
        }
    }
    // A response cut in its middle: the job sees the transfer fail (it
    // cannot be told otherwise once the head is sent), never a complete one.
    let (status, _, code, stderr) = curl(ports[0], "/reset-mid-body", 0);
    assert!(status == 200 && code != Some(0), "/reset-mid-body: status {status}, curl exit {code:?}: {stderr}");
    // The gateway still serves.
    let (status, body, ..) = curl(ports[0], "/ok", 0);
    assert_eq!((status, body.as_str()), (200, "ok"), "the gateway stopped serving after the faults");

    // Each failure is in the recording, with the status the job saw.
    let scene_cli = |args: &[&str]| {
        let out = gw.cli(args);
        assert!(out.status.success(), "gateway {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_for("every failure is recorded", || {
        let sessions: Value =
            serde_json::from_str(&scene_cli(&["sessions", "list", "--json", "--limit", "1000000"])).expect("json");
        let mut exchanges = Vec::new();
        for s in sessions.as_array().into_iter().flatten() {
            let id = s["id"].as_str().expect("id");
            for line in scene_cli(&["sessions", "export", id]).lines() {
                let Ok(record) = serde_json::from_str::<Value>(line) else { continue };
                if let Some(data) = record["data"].as_str().and_then(|d| serde_json::from_str::<Value>(d).ok()) {
                    if data.get("url").is_some() {
                        exchanges.push(data);
                    }
                }
            }
        }
        let mut missing = Vec::new();
        for (_, path, _, want, _) in cases {
            let found = exchanges.iter().any(|e| {
                e["url"].as_str().is_some_and(|u| u.ends_with(path))
                    && e["outcome"] == "upstream_failed"
                    && e["status"] == want
            });
            if !found {
                missing.push(path);
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            let urls: Vec<String> =
                exchanges.iter().map(|e| format!("{} {} {}", e["url"], e["outcome"], e["status"])).collect();
            Err(format!("not recorded as upstream_failed: {missing:?}; recorded: {urls:?}"))
        }
    });
    drop(server);
}

/// A child process killed when the test ends, however it ends (a server
/// left running would hold the test's output open).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An intercepted cgroup removed while the gateway runs (its programs go
/// with it) and created again at the same path, by the gateway (it was
/// configured with `create: true`) or by whoever removed it: each time the
/// programs are on the new cgroup before a job starts in it, with an event
/// saying so, and a job's key is still blocked rather than sent around the
/// gateway.
#[test]
fn an_intercepted_cgroup_removed_and_created_again_is_intercepted_again() {
    let disk = SmallDisk::mount(64);
    let scene = Scene::start("cgroup-again", &disk, "refuse");
    let token = github_token();
    let auth = format!("authorization: token {token}");
    assert_eq!(scene.post("/first", 1, Some(&auth)).0, 403, "intercepted at start");
    let events = |event: &str| scene.gw.log_messages_with("event", event).len();

    // Removed: the gateway puts it back (create: true) and attaches.
    std::fs::remove_dir(&scene.gw.cgroup_dir).expect("remove the (empty) intercepted cgroup");
    wait_for("the removal is reported and the cgroup attached again", || {
        match (events("intercepted_cgroup_removed"), events("intercepted_cgroup_reattached")) {
            (1, 1) => Ok(()),
            other => Err(format!("events (removed, reattached): {other:?}")),
        }
    });
    assert!(scene.gw.cgroup_dir.is_dir(), "the gateway did not create the cgroup again");
    let before = scene.upstream.requests().len();
    assert_eq!(scene.post("/after-removal", 1, Some(&auth)).0, 403, "a job in the new cgroup went around the gateway");

    // Removed and created again at once, as a runner would between jobs.
    std::fs::remove_dir(&scene.gw.cgroup_dir).expect("remove the intercepted cgroup");
    match std::fs::create_dir(&scene.gw.cgroup_dir) {
        Ok(()) => {}
        // The gateway was faster.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => panic!("create the cgroup again: {e}"),
    }
    wait_for("the new cgroup is attached", || match events("intercepted_cgroup_reattached") {
        2 => Ok(()),
        n => Err(format!("{n} reattached events")),
    });
    assert_eq!(
        scene.post("/after-recreation", 1, Some(&auth)).0,
        403,
        "a job in the new cgroup went around the gateway"
    );
    assert_eq!(scene.upstream.requests().len(), before, "a keyed request reached the server");
    assert_eq!(scene.post("/clean", 1, None).0, 200, "clean requests still pass");
}

/// A cgroup of its own for the gateway process, to freeze it: thawed and
/// removed at drop (after the gateway, declared before it, has exited).
struct OwnCgroup {
    dir: PathBuf,
}

impl OwnCgroup {
    fn holding(name: &str, pid: u32) -> OwnCgroup {
        let dir = gateway_tests::cgroup2_mount().join("gateway-tests").join(format!("{name}-self"));
        std::fs::create_dir_all(&dir).expect("create the gateway's own cgroup");
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).expect("move the gateway into its own cgroup");
        OwnCgroup { dir }
    }

    fn freeze(&self, frozen: bool) {
        std::fs::write(self.dir.join("cgroup.freeze"), if frozen { "1" } else { "0" }).expect("cgroup.freeze");
        let want = format!("frozen {}", u8::from(frozen));
        wait_for("the freezer to settle", || {
            let events = std::fs::read_to_string(self.dir.join("cgroup.events")).expect("cgroup.events");
            if events.lines().any(|l| l == want) {
                Ok(())
            } else {
                Err(events)
            }
        });
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("cgroup.freeze"), "0");
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

/// The gateway's own cgroup frozen for a few seconds while jobs connect:
/// their connections wait (nothing reaches the server, nothing goes around
/// the gateway), and once thawed each is inspected as usual: the keyed one
/// blocked, the clean one served. The gateway then reports the stall.
#[test]
fn a_frozen_gateway_holds_jobs_back_and_reports_the_stall() {
    let disk = SmallDisk::mount(64);
    let token = github_token();
    let auth = format!("authorization: token {token}");
    let own;
    let scene = Scene::start("frozen", &disk, "refuse");
    let pid = scene.gw.child.as_ref().expect("gateway").id();
    own = OwnCgroup::holding("frozen", pid);
    assert_eq!(scene.post("/before", 1, None).0, 200);
    let before = scene.upstream.requests().len();

    own.freeze(true);
    let (keyed, clean) = std::thread::scope(|s| {
        let keyed = s.spawn(|| scene.post("/while-frozen/keyed", 1, Some(&auth)));
        let clean = s.spawn(|| scene.post("/while-frozen/clean", 1, None));
        std::thread::sleep(std::time::Duration::from_secs(4));
        assert_eq!(
            scene.upstream.requests().len(),
            before,
            "a request reached the server while the gateway was frozen"
        );
        assert!(!keyed.is_finished() && !clean.is_finished(), "the jobs wait for the gateway");
        own.freeze(false);
        (keyed.join().expect("keyed"), clean.join().expect("clean"))
    });
    assert_eq!(keyed.0, 403, "the keyed request is inspected after the thaw: {}", keyed.1);
    assert!(!keyed.1.contains(&token));
    assert_eq!(clean.0, 200, "the clean request is served after the thaw: {}", clean.1);
    assert_eq!(scene.upstream.requests().len(), before + 1, "only the clean request reached the server");
    wait_for("the stall is reported", || match scene.gw.log_messages_with("event", "gateway_stalled").as_slice() {
        [one] if one["stalled_s"].as_f64().is_some_and(|s| s >= 3.0) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    scene.verify_all();
}

/// The gateway's wall clock jumps forward, then back past where it was
/// (libfaketime, for the gateway process only; its monotonic clock runs
/// on): each jump is an event, a job's key is still blocked after each, and
/// every recorded session still verifies although its timestamps went back.
#[test]
fn clock_jumps_are_reported_and_let_nothing_through() {
    const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "{LIBFAKETIME} is missing: install Debian's `faketime` (cargo xtask test does)"
    );
    let disk = SmallDisk::mount(64);
    let clock = disk.path().join("faketime");
    std::fs::write(&clock, "+0\n").expect("write the clock offset");
    let scene = Scene::start_with("clock-jump", &disk, "refuse", |opts| {
        opts.env.extend([
            ("LD_PRELOAD".to_owned(), LIBFAKETIME.to_owned()),
            ("FAKETIME_TIMESTAMP_FILE".to_owned(), clock.display().to_string()),
            ("FAKETIME_NO_CACHE".to_owned(), "1".to_owned()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
        ]);
    });
    let token = github_token();
    let auth = format!("authorization: token {token}");
    let jumps = || scene.gw.log_messages_with("event", "clock_jumped");
    assert_eq!(scene.post("/before", 1, Some(&auth)).0, 403);
    assert!(jumps().is_empty(), "no jump yet: {:?}", jumps());
    let served = scene.upstream.requests().len();

    // Forward two minutes (less than minted leaves are backdated, so jobs
    // still accept them), then back four.
    for (offset, by, n) in [("+120", 120.0, 1), ("-120", -240.0, 2)] {
        std::fs::write(&clock, format!("{offset}\n")).expect("jump");
        let seen = wait_for("the jump is reported", || match jumps().as_slice() {
            all if all.len() == n => Ok(all[n - 1].clone()),
            other => Err(format!("{other:?}")),
        });
        let got = seen["by_s"].as_f64().expect("by_s");
        assert!((got - by).abs() < 5.0, "jumped by {got} s, expected about {by}");
        assert_eq!(
            scene.post(&format!("/after{offset}/keyed"), 1, Some(&auth)).0,
            403,
            "a key went through after a jump"
        );
        assert_eq!(scene.post(&format!("/after{offset}/clean"), 1, None).0, 200);
    }
    assert_eq!(scene.upstream.requests().len(), served + 2, "only the clean requests reached the server");
    scene.verify_all();
}

/// A bpf file system of the test's own, unmounted at drop.
struct PrivateBpffs {
    dir: tempfile::TempDir,
}

impl PrivateBpffs {
    fn mount() -> PrivateBpffs {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(dir.path()).output().expect("run mount");
        assert!(out.status.success(), "mount bpffs: {}", String::from_utf8_lossy(&out.stderr));
        PrivateBpffs { dir }
    }

    fn unmount(&self) {
        let out = Command::new("umount").arg("-l").arg(self.dir.path()).output().expect("run umount");
        assert!(out.status.success(), "umount bpffs: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A new, empty bpffs at the same place (after [`Self::unmount`]).
    fn mount_again(&self) {
        let out = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(self.dir.path()).output().expect("run mount");
        assert!(out.status.success(), "mount bpffs again: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).output();
    }
}

/// The bpf file system holding the gateway's pins unmounted while it runs:
/// jobs are still captured (the gateway holds the links), a keyed request
/// is still blocked, and a `pins_lost` event says that a stop would now
/// leave jobs uncaptured. Then a new bpffs is mounted at the same place:
/// the gateway pins its links and maps there again (`pins_restored`), so
/// that after a clean stop (`on_shutdown: enforce`) the programs stay
/// attached and refuse the jobs' connections.
#[test]
fn bpffs_unmounted_under_the_gateway_is_reported_and_lets_nothing_through() {
    let disk = SmallDisk::mount(64);
    let bpffs = PrivateBpffs::mount();
    let pins = bpffs.dir.path().join("gw");
    let mut scene = Scene::start_with("bpffs-gone", &disk, "refuse", |opts| opts.bpffs_dir = Some(pins.clone()));
    let token = github_token();
    let auth = format!("authorization: token {token}");
    assert_eq!(scene.post("/before", 1, Some(&auth)).0, 403);
    let pinned = |dir: &str| std::fs::read_dir(pins.join(dir)).map_or(0, |entries| entries.count());
    let links = pinned("links");
    assert!(links > 0, "the links are pinned on the private bpffs");
    let maps = pinned("maps");

    bpffs.unmount();
    wait_for("the lost pins are reported", || match scene.gw.log_messages_with("event", "pins_lost").as_slice() {
        [one] if one["missing"].as_u64() == Some(links as u64) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    let served = scene.upstream.requests().len();
    assert_eq!(scene.post("/after/keyed", 1, Some(&auth)).0, 403, "a key went through after bpffs was unmounted");
    assert_eq!(scene.post("/after/clean", 1, None).0, 200, "jobs are still served");
    assert_eq!(scene.upstream.requests().len(), served + 1, "only the clean request reached the server");
    // Reported once, not at every check; nothing pinned on what lies under the mount.
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(scene.gw.log_messages_with("event", "pins_lost").len(), 1, "pins_lost is reported once");
    assert!(!pins.exists(), "the gateway created its pin directory off bpffs");

    // bpffs is back (empty): the gateway pins everything there again.
    bpffs.mount_again();
    wait_for("the pins are restored", || match scene.gw.log_messages_with("event", "pins_restored").as_slice() {
        [one] if one["links"].as_u64() == Some(links as u64) && one["maps"].as_u64() == Some(maps as u64) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    assert_eq!((pinned("links"), pinned("maps")), (links, maps), "every link and map is pinned again");
    assert_eq!(scene.post("/restored/keyed", 1, Some(&auth)).0, 403);
    assert_eq!(scene.post("/restored/clean", 1, None).0, 200);
    let served = scene.upstream.requests().len();

    // A clean stop (on_shutdown: enforce): the pins hold the programs,
    // which now refuse the jobs' connections outright.
    scene.gw.stop(nix::sys::signal::Signal::SIGTERM);
    assert!(scene.gw.log_messages_with("event", "pins_lost").len() == 1, "no pins_lost at exit: the pins are in place");
    let status = scene.gw.status();
    assert_eq!(status["mode"], "deny", "the pinned maps say the gateway stopped: {status}");
    assert_eq!(status["links"].as_u64(), Some(links as u64), "{status}");
    let denied = |status: &Value| status["stats"]["denied_stopped"].as_u64().expect("denied_stopped");
    let denied_before = denied(&status);
    for (path, header) in [("/stopped/keyed", Some(auth.as_str())), ("/stopped/clean", None)] {
        // --insecure: were the programs gone, curl would reach the server itself.
        let mut cmd = scene.gw.command_in_cgroup("curl");
        cmd.args([
            "-sS",
            "--insecure",
            "--max-time",
            "10",
            "--resolve",
            &format!("{HOST}:{}:{UPSTREAM_IP}", scene.port),
        ]);
        if let Some(h) = header {
            cmd.args(["-H", h]);
        }
        let out = cmd.arg(format!("https://{HOST}:{}{path}", scene.port)).output().expect("curl");
        // 7: failed to connect (refused).
        assert_eq!(out.status.code(), Some(7), "{path} after the stop: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(scene.upstream.requests().len(), served, "a request reached the server after the gateway stopped");
    assert!(denied(&scene.gw.status()) >= denied_before + 2, "the pinned programs refused the connections");
    // The test's cgroup, pins and mounts go with `scene` (detach) and `bpffs`.
}

/// Writes garbage over all of `file` and drops its write-ahead log: what a
/// failing disk or a bad restore leaves. (Garbage over the first page alone
/// is not damage while the log still holds that page: SQLite reads it from
/// there and the next checkpoint rewrites it.)
fn damage(file: &Path) {
    let len = std::fs::metadata(file).unwrap_or_else(|e| panic!("{}: {e}", file.display())).len() as usize;
    let garbage = b"not a database, only damage. ".iter().copied().cycle().take(len.max(4096)).collect::<Vec<u8>>();
    std::fs::write(file, garbage).expect("write the damage");
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
    }
}

/// Runs `gateway run` on `config` for at most 60 s: its exit status
/// (`None`: still running, then killed) and its stderr.
fn run_briefly(config: &Path) -> (Option<std::process::ExitStatus>, String) {
    let mut child = Command::new(gateway_tests::gateway_bin())
        .arg("--config")
        .arg(config)
        .arg("run")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the gateway");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the gateway") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr).expect("read stderr");
    (status, stderr)
}

/// A store damaged while the gateway was stopped (a disk error, a bad
/// restore): the gateway refuses to start and says which file and what to
/// do, the programs its last run left pinned keep refusing the jobs'
/// connections meanwhile (nothing goes uncaptured because a store is
/// broken), and once the operator moves the file aside as told, it starts
/// on a new store and serves again, leaving the damaged file for
/// investigation. For each store: sessions, findings, approvals.
#[test]
fn a_damaged_store_keeps_the_gateway_from_starting_and_lets_nothing_through() {
    let disk = SmallDisk::mount(64);
    let mut scene = Scene::start("damaged-store", &disk, "refuse");
    assert_eq!(scene.post("/before", 1, None).0, 200);
    // A clean stop: the programs stay attached and refuse (on_shutdown: enforce).
    scene.gw.stop(nix::sys::signal::Signal::SIGTERM);
    let served = scene.upstream.requests().len();
    let state = scene.gw.dir.path().join("state");
    let stores = [
        ("sessions", disk.path().join("sessions.db")),
        ("findings", disk.path().join("findings.db")),
        ("approvals", state.join("approvals.db")),
    ];
    for (what, file) in &stores {
        assert!(file.is_file(), "the {what} store {} exists after a run", file.display());
        let intact: Vec<(String, Vec<u8>)> = ["", "-wal", "-shm"]
            .into_iter()
            .filter_map(|suffix| {
                let path = format!("{}{suffix}", file.display());
                std::fs::read(&path).ok().map(|bytes| (path, bytes))
            })
            .collect();
        damage(file);
        let (status, stderr) = run_briefly(&scene.gw.config_path);
        assert!(!status.is_some_and(|s| s.success()), "the gateway started on a damaged {what} store:\n{stderr}");
        assert!(status.is_some(), "the gateway was still running after 60 s on a damaged {what} store:\n{stderr}");
        assert!(
            stderr.contains(&file.display().to_string())
                && stderr.contains("corrupt")
                && stderr.contains("move it aside"),
            "the error names the damaged {what} store and what to do:\n{stderr}"
        );
        // Fail closed: the job's connection is refused while no gateway runs.
        let (status, body) = scene.post(&format!("/while-down/{what}"), 1, None);
        assert_ne!(status, 200, "a request went through while the gateway could not start: {body}");
        assert_eq!(scene.upstream.requests().len(), served, "a request reached the server while no gateway ran");
        for (path, bytes) in intact {
            std::fs::write(path, bytes).expect("restore the store");
        }
    }

    // The operator moves the damaged sessions store aside: a new one is made.
    let (_, sessions) = &stores[0];
    damage(sessions);
    let aside = sessions.with_extension("db.damaged");
    std::fs::rename(sessions, &aside).expect("move the store aside");
    scene.gw.spawn(false);
    assert_eq!(scene.post("/after", 1, None).0, 200, "served again on a new store");
    assert!(aside.is_file(), "the damaged file is left for investigation");
    wait_for("the new store records", || {
        let urls = scene.recorded_urls();
        if urls.iter().any(|u| u.ends_with("/after")) {
            Ok(())
        } else {
            Err(format!("{urls:?}"))
        }
    });
    scene.verify_all();
}

/// Runs the program after the flag file's path (the gateway) with its
/// stderr piped through this script, which passes every line on to its own
/// stderr except while the flag file exists: then it stops reading, as a
/// stalled journald or a container runtime that does not drain a log does.
/// SIGTERM is passed on; if the script is killed, the gateway is too
/// (`PR_SET_PDEATHSIG`), so a failed test leaves no gateway running.
const STALLING_LOG_READER: &str = r#"
import ctypes, os, signal, subprocess, sys, time
flag = sys.argv[1]
PR_SET_PDEATHSIG = 1
child = subprocess.Popen(sys.argv[2:], stderr=subprocess.PIPE,
    preexec_fn=lambda: ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL))
signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
for line in child.stderr:
    sys.stderr.buffer.write(line)
    sys.stderr.flush()
    while os.path.exists(flag):
        time.sleep(0.05)
sys.exit(child.wait())
"#;

/// The log's reader stops reading while jobs keep sending (a stalled
/// journald, a pipe nobody drains): connections are served on regardless,
/// since the daemon never waits for the log's reader (lines queue while it
/// is behind), and every line gets through once the reader reads again.
#[test]
fn a_stalled_log_reader_holds_no_connection_back() {
    let disk = SmallDisk::mount(64);
    let flag = disk.path().join("stall-the-log");
    let mut scene = Scene::start_with("log-stalled", &disk, "refuse", |opts| {
        opts.wrapper =
            vec!["python3".to_owned(), "-c".to_owned(), STALLING_LOG_READER.to_owned(), flag.display().to_string()];
    });
    assert_eq!(scene.post("/before", 1, None).0, 200);
    std::fs::write(&flag, b"").expect("stall the log's reader");
    // Each connection logs a line of about 1 KiB: far more than a pipe holds.
    const REQUESTS: usize = 200;
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let scene = &scene;
        s.spawn(move || {
            for i in 0..REQUESTS {
                if tx.send(scene.post(&format!("/while-stalled/{i}"), 1, None)).is_err() {
                    return;
                }
            }
        });
        let mut stuck = None;
        for i in 0..REQUESTS {
            match rx.recv_timeout(std::time::Duration::from_secs(10)) {
                Ok((200, _)) => {}
                Ok((status, body)) => {
                    stuck = Some(format!("request {i} while the log was stalled: {status} {body}"));
                    break;
                }
                Err(_) => {
                    stuck =
                        Some(format!("request {i} did not complete within 10 s while the log's reader was stalled"));
                    break;
                }
            }
        }
        // Let the reader go on either way, so that a stuck gateway comes loose.
        std::fs::remove_file(&flag).expect("let the log's reader go on");
        drop(rx);
        if let Some(why) = stuck {
            panic!("{why}");
        }
    });
    assert_eq!(scene.upstream.requests().len(), REQUESTS + 1, "every request reached the server");
    wait_for("every connection's line reaches the log", || {
        let logged = scene.gw.connection_events().len();
        if logged > REQUESTS {
            Ok(())
        } else {
            Err(format!("{logged} connection events so far"))
        }
    });
    // Through the reader, which passes SIGTERM on: a clean stop.
    scene.gw.stop(nix::sys::signal::Signal::SIGTERM);
}

/// Requests sent one after another from a thread until stopped: traffic
/// flowing while a fault is injected. Each reply with when it was sent.
struct Flow<'a> {
    stop: &'a std::sync::atomic::AtomicBool,
    replies: std::sync::Mutex<Vec<(String, std::time::Instant, u16)>>,
}

impl<'a> Flow<'a> {
    fn run(&self, scene: &Scene, prefix: &str) {
        for i in 0.. {
            if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let path = format!("{prefix}/{i}");
            let sent = std::time::Instant::now();
            let (status, _) = scene.post(&path, 1, None);
            self.replies.lock().expect("replies").push((path, sent, status));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// A store damaged while the gateway runs and traffic flows: garbage over
/// the whole file and its write-ahead log deleted (SQLite goes on
/// committing into the deleted log it still holds open, and would lose it
/// all at close). The gateway notices at its next commit and fails closed:
/// `recording_failed` naming the file and saying it is corrupt, the health
/// metric failing, recorded traffic refused (`on_failure: refuse`) without
/// reaching the server, a key still blocked, the damaged file left where it
/// is. Once the operator moves it aside, the gateway opens a new store at
/// the path by itself and every request it served after the damage is in
/// it. Then the same for the findings store: a key is blocked meanwhile,
/// and its finding is written once the damaged file is moved aside.
#[test]
fn a_store_damaged_while_running_fails_closed_and_keeps_what_it_acknowledged() {
    let disk = SmallDisk::mount(64);
    let scene = Scene::start("damaged-live", &disk, "refuse");
    let token = github_token();
    let auth = format!("authorization: token {token}");
    for i in 0..3 {
        assert_eq!(scene.post(&format!("/before/{i}"), 1, None).0, 200);
    }
    let sessions = disk.path().join("sessions.db");
    let findings = disk.path().join("findings.db");

    // The sessions store, while requests flow.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let flow = Flow { stop: &stop, replies: std::sync::Mutex::new(Vec::new()) };
    let damaged_at = std::thread::scope(|s| {
        s.spawn(|| flow.run(&scene, "/flow"));
        std::thread::sleep(std::time::Duration::from_millis(500));
        damage(&sessions);
        let damaged_at = std::time::Instant::now();
        wait_for("the damage is reported", || {
            match scene.gw.log_messages_with("event", "recording_failed").as_slice() {
                [one] => {
                    let error = one["error"].as_str().unwrap_or_default();
                    if error.contains(&sessions.display().to_string()) && error.contains("corrupt") {
                        Ok(())
                    } else {
                        Err(format!("the event does not name the file or say corrupt: {one}"))
                    }
                }
                other => Err(format!("{other:?}")),
            }
        });
        // Requests go on failing (refused) for a while.
        std::thread::sleep(std::time::Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        damaged_at
    });
    let replies = flow.replies.into_inner().expect("replies");
    assert!(replies.iter().any(|(_, _, status)| *status == 503), "nothing was refused after the damage: {replies:?}");
    assert!(
        replies.iter().all(|(_, _, status)| *status == 200 || *status == 503),
        "only served or refused: {replies:?}"
    );
    assert_eq!(scene.recorder_health().as_deref(), Some("failing"), "gateway_recorder_health with a damaged store");
    let before = scene.upstream.requests().len();
    let (status, body) = scene.post("/damaged/recorded", 1, None);
    assert_eq!(status, 503, "recorded traffic is refused: {body}");
    assert!(body.contains("recording_unavailable"), "{body}");
    assert_eq!(scene.post("/damaged/keyed", 1, Some(&auth)).0, 503, "a key is refused");
    assert_eq!(scene.upstream.requests().len(), before, "a refused request reached the server");
    assert_eq!(scene.post("/unrecorded/damaged", 1, None).0, 200, "record: none traffic still passes");
    // The gateway waits for the operator: the damaged file stays as it is.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let garbage = std::fs::read(&sessions).expect("the damaged file is still there");
    assert!(garbage.starts_with(b"not a database"), "the damaged file was rewritten");
    assert_eq!(scene.recorder_health().as_deref(), Some("failing"));

    // The operator moves it aside: a new store at the path, nothing served since the damage missing.
    let aside = disk.path().join("sessions.db.damaged");
    std::fs::rename(&sessions, &aside).expect("move the damaged store aside");
    wait_for("recording recovers on a new store", || {
        match (scene.log_has("recording_store_reopened"), scene.log_has("recording_recovered")) {
            (true, true) => Ok(()),
            other => Err(format!("(reopened, recovered): {other:?}\n{}", scene.gw.log_errors())),
        }
    });
    assert_eq!(scene.post("/after/sessions", 1, None).0, 200, "served again");
    assert_eq!(scene.recorder_health().as_deref(), Some("recording"));
    // The old connection left the new store's log alone.
    for suffix in ["-wal", "-shm"] {
        assert!(disk.path().join(format!("sessions.db{suffix}")).exists(), "the new store's {suffix} is gone");
    }
    assert_eq!(std::fs::read(&aside).expect("the damaged file is kept"), garbage, "the damaged file was changed");
    let mut served_since: Vec<String> = replies
        .iter()
        .filter(|(_, sent, status)| *sent > damaged_at && *status == 200)
        .map(|(p, _, _)| p.clone())
        .collect();
    served_since.push("/after/sessions".to_owned());
    wait_for("everything served since the damage is recorded", || {
        let urls = scene.recorded_urls();
        let missing: Vec<&String> =
            served_since.iter().filter(|p| !urls.iter().any(|u| u.ends_with(p.as_str()))).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("missing {missing:?} of {served_since:?}; recorded {urls:?}"))
        }
    });
    // Every chain in the new store verifies, except a session the flow had
    // open across the change: its start is in the damaged file, and
    // verification says so rather than passing it.
    let out = scene.gw.cli(&["sessions", "verify", "--all"]);
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    let broken: Vec<&str> = report.lines().filter(|l| l.contains("BROKEN")).collect();
    assert!(
        broken.len() <= 1 && broken.iter().all(|l| l.contains("records without a sessions row")),
        "sessions verify: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.success(), broken.is_empty(), "{report}");

    // The findings store, while requests flow.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let flow = Flow { stop: &stop, replies: std::sync::Mutex::new(Vec::new()) };
    std::thread::scope(|s| {
        s.spawn(|| flow.run(&scene, "/flow-findings"));
        std::thread::sleep(std::time::Duration::from_millis(300));
        damage(&findings);
        let before = scene.upstream.requests().len();
        let (status, body) = scene.post("/findings-damaged/keyed", 1, Some(&auth));
        assert_eq!(status, 403, "a key is blocked though its finding cannot be written: {body}");
        assert!(!body.contains(&token));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // Only the flow's clean requests reached the server meanwhile.
        let keyed_reached =
            scene.upstream.requests().iter().skip(before).any(|r| r.target.starts_with("/findings-damaged/"));
        assert!(!keyed_reached, "the keyed request reached the server");
    });
    let replies = flow.replies.into_inner().expect("replies");
    assert!(replies.iter().all(|(_, _, status)| *status == 200), "clean traffic is served: {replies:?}");
    wait_for("the failed finding is reported", || {
        let log = scene.gw.log();
        if log.lines().any(|l| {
            l.contains("recording a finding failed")
                && l.contains("corrupt")
                && l.contains(&findings.display().to_string())
        }) {
            Ok(())
        } else {
            Err(scene.gw.log_errors())
        }
    });
    assert!(findings.is_file(), "the damaged findings store is left where it is");
    let aside = disk.path().join("findings.db.damaged");
    std::fs::rename(&findings, &aside).expect("move the damaged findings store aside");
    wait_for("the finding is written to a new store", || {
        match (
            scene.log_has("findings_store_reopened"),
            scene.gw.log().contains("a finding the database refused earlier is recorded now"),
        ) {
            (true, true) => Ok(()),
            other => Err(format!("(reopened, recorded): {other:?}\n{}", scene.gw.log_errors())),
        }
    });
    let listed = scene.cli_json(&["findings", "list", "--json"]);
    assert_eq!(listed.as_array().map_or(0, Vec::len), 1, "the finding is in the new store: {listed}");
    assert!(aside.is_file(), "the damaged findings store is kept");
    for suffix in ["-wal", "-shm"] {
        assert!(disk.path().join(format!("findings.db{suffix}")).exists(), "the new store's {suffix} is gone");
    }
    for file in [&sessions, &findings] {
        for suffix in ["", "-wal"] {
            if let Ok(bytes) = std::fs::read(format!("{}{suffix}", file.display())) {
                assert!(!bytes.windows(token.len()).any(|w| w == token.as_bytes()), "{} holds the key", file.display());
            }
        }
    }
    assert!(!scene.gw.log().contains(&token), "the log holds the key in clear");
}
