//! Shared machinery of the end-to-end tests: a real gateway process on its
//! own cgroup, bpffs directory and port, plus clients placed in that cgroup.
//!
//! Every test needs root (eBPF, cgroups). Nothing here skips: a missing
//! privilege or kernel feature fails the test with the reason.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU16, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

pub mod docker;
pub mod keys;
pub mod pg;
pub mod upstream;
use serde_json::Value;

/// Fails the calling test unless it runs as root, saying why it must.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test attaches real eBPF programs to cgroups it creates and must run as root (use `cargo xtask test`)"
    );
}

/// The gateway binary under test (`GATEWAY_BIN`, set by `cargo xtask test`,
/// or target/<profile>/gateway next to this test executable).
pub fn gateway_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("GATEWAY_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> -> target/debug/gateway
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("gateway")).expect("target dir");
    assert!(
        bin.is_file(),
        "gateway binary not found at {}: build it (`cargo build -p gateway`) or run `cargo xtask test`",
        bin.display()
    );
    bin
}

/// The cgroup2 mount (never hard-coded: hybrid hosts put it under /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> PathBuf {
    gateway::intercept::cgroup::cgroup2_mount().expect("cgroup v2 must be mounted for these tests")
}

/// How long a test waits for something that happens in the background (a
/// connection event, a log line, a commit, a reload) before it fails. A
/// passing test never waits this long; CI machines are small and loaded, and
/// a shorter bound only turns a slow moment into a failure.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Polls `probe` every 20 ms until it returns `Ok`, and fails the test
/// naming `what` (with the last `Err` the probe gave) after [`PATIENCE`].
pub fn wait_for<T, E: std::fmt::Display>(what: &str, mut probe: impl FnMut() -> Result<T, E>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) => assert!(Instant::now() < deadline, "{what}: still not the case after {PATIENCE:?}: {last}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// Ports handed out by [`unique_port`]: below Linux's default ephemeral range
/// (32768-60999), so no outgoing connection of this or another test can take
/// the port between the probe and the bind that uses it.
const PORTS: std::ops::Range<u16> = 20000..32000;

/// The median of `values` (the mean of the middle two for an even count);
/// NaN when there are none. Benchmarks report the median over rounds.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A port unlikely to collide with another test in this process or another
/// test binary running at the same time.
pub fn unique_port() -> u16 {
    let span = u32::from(PORTS.end - PORTS.start);
    let offset = std::process::id() % 1000 * 12;
    let n = u32::from(NEXT_PORT.fetch_add(1, Ordering::Relaxed));
    // Probe so a port another process holds is skipped.
    for k in 0..200u32 {
        let port = PORTS.start + ((offset + n * 7 + k) % span) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found");
}

/// Options of a test gateway.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    /// Short test name; used in cgroup and bpffs paths.
    pub name: String,
    /// YAML list items for `intercept.destinations` (already indented by the caller as list entries).
    pub destinations: Vec<String>,
    /// Extra top-level YAML appended to the config.
    pub extra_yaml: String,
    /// Extra lines under `proxy:` (each indented by two spaces).
    pub proxy_yaml: String,
    /// Extra lines under `intercept:` (each indented by two spaces).
    pub intercept_yaml: String,
    /// Extra lines under `api:` (each indented by two spaces).
    pub api_yaml: String,
    /// The bpffs pin directory; `None`: one of the tests' own below
    /// /sys/fs/bpf/gateway-tests.
    pub bpffs_dir: Option<PathBuf>,
    /// Start the gateway process itself inside the intercepted cgroup.
    pub gateway_in_cgroup: bool,
    /// A policy file's content; `None` runs the built-in policy.
    pub policy_yaml: Option<String>,
    /// More cgroups to intercept (paths relative to the cgroup2 mount,
    /// created if missing and removed at drop).
    pub extra_cgroups: Vec<String>,
    /// RLIMIT_NOFILE (soft and hard) the gateway starts with; `None`
    /// inherits the test's.
    pub nofile: Option<u64>,
    /// Extra environment variables of the gateway process.
    pub env: Vec<(String, String)>,
    /// A program (and its arguments) the gateway is started through, e.g.
    /// `setpriv` limiting its capabilities; empty: started directly.
    pub wrapper: Vec<String>,
    /// How long the gateway may take to start ([`PATIENCE`]; longer under
    /// valgrind).
    pub start_patience: Duration,
}

impl GatewayOptions {
    /// Options with the given name and destinations.
    pub fn new(name: &str, destinations: &[&str]) -> Self {
        GatewayOptions {
            name: name.to_owned(),
            destinations: destinations.iter().map(|s| (*s).to_owned()).collect(),
            extra_yaml: String::new(),
            proxy_yaml: String::new(),
            intercept_yaml: String::new(),
            api_yaml: String::new(),
            bpffs_dir: None,
            gateway_in_cgroup: false,
            policy_yaml: None,
            extra_cgroups: Vec::new(),
            nofile: None,
            env: Vec::new(),
            wrapper: Vec::new(),
            start_patience: PATIENCE,
        }
    }

    /// Options for tests of interception itself, whose clients speak no
    /// protocol the gateway inspects: the policy opts every destination out
    /// of inspection (`uninspectable: pass`), as an operator would for such
    /// traffic. Without it the gateway refuses what it cannot inspect.
    pub fn opaque(name: &str, destinations: &[&str]) -> Self {
        let mut opts = GatewayOptions::new(name, destinations);
        opts.policy_yaml = Some(OPAQUE_POLICY.to_owned());
        opts
    }
}

/// A policy that lets traffic the gateway cannot inspect through to every
/// destination.
pub const OPAQUE_POLICY: &str = "version: 1\nrules: []\ndefaults:\n  action: allow\n  uninspectable: pass\n";

/// A running gateway process with its own cgroup, pins and port.
pub struct TestGateway {
    /// The process.
    pub child: Option<Child>,
    /// Its configuration file.
    pub config_path: PathBuf,
    /// The intercepted cgroup's directory.
    pub cgroup_dir: PathBuf,
    /// Parent directory of the test cgroups (removed at drop when empty).
    cgroup_parent: PathBuf,
    /// [`GatewayOptions::extra_cgroups`] (removed at drop).
    extra_cgroup_dirs: Vec<PathBuf>,
    /// bpffs pin directory.
    pub bpffs_dir: PathBuf,
    /// The proxy port.
    pub proxy_port: u16,
    /// The admin API port.
    pub api_port: u16,
    /// Temp dir holding config and state.
    pub dir: tempfile::TempDir,
    /// JSON log lines collected from the gateway's stderr.
    lines: Arc<Mutex<Vec<String>>>,
    /// RLIMIT_NOFILE the gateway starts with.
    nofile: Option<u64>,
    /// Extra environment of the gateway process.
    env: Vec<(String, String)>,
    /// [`GatewayOptions::wrapper`].
    wrapper: Vec<String>,
    /// [`GatewayOptions::start_patience`].
    start_patience: Duration,
}

impl TestGateway {
    /// Writes a config and starts `gateway run`, waiting until it is attached.
    pub fn start(opts: GatewayOptions) -> TestGateway {
        require_root();
        let dir = tempfile::tempdir().expect("tempdir");
        // Clients run as other uids too and exec links placed here.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let tag = format!("{}-{}", opts.name, std::process::id());
        let cgroup_parent = cgroup2_mount().join("gateway-tests");
        let cgroup_rel = format!("gateway-tests/{tag}");
        let bpffs_dir =
            opts.bpffs_dir.clone().unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/gateway-tests/{tag}")));
        let proxy_port = unique_port();
        let api_port = unique_port();
        let mut cgroups = format!("{{path: {cgroup_rel}, create: true}}");
        for extra in &opts.extra_cgroups {
            cgroups.push_str(&format!(", {{path: {extra}, create: true}}"));
        }
        let mut yaml = format!(
            "state_dir: {state}\nintercept:\n  cgroups: [{cgroups}]\n  bpffs_dir: {bpffs}\n{extra}  destinations:\n",
            state = dir.path().join("state").display(),
            bpffs = bpffs_dir.display(),
            extra = opts.intercept_yaml,
        );
        for d in &opts.destinations {
            yaml.push_str(&format!("    - {d}\n"));
        }
        yaml.push_str(&format!("proxy:\n  port: {proxy_port}\n{}", opts.proxy_yaml));
        yaml.push_str(&format!(
            "api:\n  listen: 127.0.0.1:{api_port}\n  admin_socket: {socket}\n{api}log:\n  format: json\n  level: info\n",
            socket = dir.path().join("admin.sock").display(),
            api = opts.api_yaml,
        ));
        if let Some(policy) = &opts.policy_yaml {
            let path = dir.path().join("policy.yaml");
            std::fs::write(&path, policy).expect("write policy");
            yaml.push_str(&format!("policy:\n  file: {}\n  watch: false\n", path.display()));
        }
        yaml.push_str(&opts.extra_yaml);
        let config_path = dir.path().join("gateway.yaml");
        std::fs::write(&config_path, &yaml).expect("write config");
        let cgroup_dir = cgroup2_mount().join(&cgroup_rel);
        let mut gw = TestGateway {
            child: None,
            config_path,
            cgroup_dir,
            cgroup_parent,
            extra_cgroup_dirs: opts
                .extra_cgroups
                .iter()
                .map(|c| cgroup2_mount().join(c.trim_start_matches('/')))
                .collect(),
            bpffs_dir,
            proxy_port,
            api_port,
            dir,
            lines: Arc::new(Mutex::new(Vec::new())),
            nofile: opts.nofile,
            env: opts.env.clone(),
            wrapper: opts.wrapper.clone(),
            start_patience: opts.start_patience,
        };
        // The harness makes the test's cgroup, not the gateway: the shared
        // parent (`gateway-tests`) comes and goes as other tests of the
        // binary end (each removes it when empty), and creating it again
        // under the cgroup2 root (mode 0555) needs CAP_DAC_OVERRIDE, which a
        // gateway limited to the unit's capabilities does not have. The
        // child keeps the parent from being removed meanwhile.
        std::fs::create_dir_all(&gw.cgroup_dir).expect("create cgroup");
        gw.spawn(opts.gateway_in_cgroup);
        gw
    }

    /// Starts (or restarts) the gateway process and waits until it runs.
    pub fn spawn(&mut self, in_cgroup: bool) {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(gateway_bin());
                cmd
            }
            None => Command::new(gateway_bin()),
        };
        cmd.arg("--config").arg(&self.config_path).arg("run");
        cmd.stdout(Stdio::null()).stderr(Stdio::piped()).env_remove("RUST_LOG");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if in_cgroup {
            in_cgroup_pre_exec(&mut cmd, &self.cgroup_dir);
        }
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setrlimit is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)
                        .map_err(std::io::Error::from)
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn gateway");
        let stderr = child.stderr.take().expect("stderr");
        let lines = self.lines.clone();
        let start = lines.lock().expect("lines").len();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().expect("lines").push(line);
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + self.start_patience;
        loop {
            if self.lines.lock().expect("lines")[start..].iter().any(|l| l.contains("\"gateway running\"")) {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("gateway exited with {status} before it was running:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not start within {:?}:\n{}",
                self.start_patience,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The intercepted cgroup as /proc shows it (`/gateway-tests/<tag>`):
    /// what `docker run --cgroup-parent` takes.
    pub fn cgroup_path(&self) -> String {
        let rel = self.cgroup_dir.strip_prefix(cgroup2_mount()).expect("the cgroup is below the cgroup2 mount");
        format!("/{}", rel.display())
    }

    /// Everything the gateway logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    /// The warnings and errors logged so far (for failure messages).
    pub fn log_errors(&self) -> String {
        let lines = self.lines.lock().expect("lines");
        let bad = lines.iter().filter(|l| l.contains("\"level\":\"ERROR\"") || l.contains("\"level\":\"WARN\""));
        bad.cloned().collect::<Vec<_>>().join("\n")
    }

    /// Connection events logged so far.
    pub fn connection_events(&self) -> Vec<Value> {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "gateway::connection")
            .collect()
    }

    /// Interception events (target `gateway::intercept`) of `kind` logged so
    /// far (`refused_unserved_netns`, `netns_served`...).
    pub fn intercept_events(&self, kind: &str) -> Vec<Value> {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "gateway::intercept" && v["kind"] == kind)
            .collect()
    }

    /// Waits (up to [`PATIENCE`]) until at least `n` connection events were
    /// logged, and returns the events logged by then. A connection's event is
    /// logged when it closes, after the client may already have exited.
    pub fn wait_events(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let events = self.connection_events();
            if events.len() >= n || Instant::now() >= deadline {
                return events;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `gateway status --json`.
    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        assert!(out.status.success(), "gateway status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// Runs a gateway sub-command with this gateway's config.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(gateway_bin()).arg("--config").arg(&self.config_path).args(args).output().expect("run gateway cli")
    }

    /// Sends `signal` to the gateway and waits for it to exit.
    pub fn stop(&mut self, signal: nix::sys::signal::Signal) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, signal);
            let deadline = Instant::now() + PATIENCE;
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("gateway did not exit after {signal}:\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// The gateway's resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.as_ref().expect("gateway running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("gateway status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Log lines (JSON objects) with this message.
    pub fn log_messages(&self, message: &str) -> Vec<Value> {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["message"] == message)
            .collect()
    }

    /// Log lines (JSON objects) whose `field` is `value` (e.g. `event`).
    pub fn log_messages_with(&self, field: &str, value: &str) -> Vec<Value> {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v[field] == value)
            .collect()
    }

    /// A cgroup below the intercepted one (intercepted too, with a cgroup
    /// id of its own: a second job), removed when the guard is dropped.
    pub fn child_cgroup(&self, name: &str) -> ChildCgroup {
        let dir = self.cgroup_dir.join(name);
        std::fs::create_dir_all(&dir).expect("create child cgroup");
        ChildCgroup { dir }
    }

    /// A command that runs inside the intercepted cgroup.
    pub fn command_in_cgroup(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        in_cgroup_pre_exec(&mut cmd, &self.cgroup_dir);
        cmd
    }
}

/// A cgroup made by [`TestGateway::child_cgroup`]; drop it before the
/// gateway (its processes must have exited).
pub struct ChildCgroup {
    /// Its directory.
    pub dir: PathBuf,
}

impl ChildCgroup {
    /// A command that runs inside this cgroup.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        in_cgroup_pre_exec(&mut cmd, &self.dir);
        cmd
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        for _ in 0..250 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Moves the child into `cgroup_dir` between fork and exec, so every
/// connection it makes is subject to the cgroup's programs.
pub fn in_cgroup_pre_exec(cmd: &mut Command, cgroup_dir: &Path) {
    use std::os::unix::process::CommandExt as _;
    let procs = cgroup_dir.join("cgroup.procs");
    // SAFETY: only async-signal-safe work (open/write/close) between fork and exec.
    unsafe {
        cmd.pre_exec(move || std::fs::write(&procs, b"0"));
    }
}

/// Switches the child to `uid`/`gid` after it joined its cgroup (std's
/// `Command::uid` switches before pre_exec hooks run, and an unprivileged
/// process may not move itself into the cgroup).
pub fn run_as(cmd: &mut Command, uid: u32, gid: u32) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: setgroups/setgid/setuid are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setgroups(&[]).map_err(std::io::Error::from)?;
            nix::unistd::setgid(nix::unistd::Gid::from_raw(gid)).map_err(std::io::Error::from)?;
            nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).map_err(std::io::Error::from)
        });
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Never leave programs attached: detach everything this gateway pinned.
        let _ = Command::new(gateway_bin())
            .arg("--config")
            .arg(&self.config_path)
            .arg("detach")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = gateway::intercept::detach_all(&self.bpffs_dir);
        // Children of the test have exited by now; give the kernel a moment
        // to drop them from the cgroup before removing it.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.cgroup_dir).is_ok() || !self.cgroup_dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for dir in &self.extra_cgroup_dirs {
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::remove_dir(&self.cgroup_parent);
        let _ = std::fs::remove_dir("/sys/fs/bpf/gateway-tests");
    }
}

/// A TCP server on `addr` that answers every connection with one JSON line:
/// the peer address it saw and the first bytes it received.
pub struct EchoServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Peers seen, in order.
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl EchoServer {
    /// Starts the server on a thread.
    pub fn start(addr: SocketAddr) -> Result<EchoServer> {
        let listener = std::net::TcpListener::bind(addr).with_context(|| format!("binding echo server on {addr}"))?;
        let addr = listener.local_addr()?;
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (peers.clone(), stop.clone());
        listener.set_nonblocking(true)?;
        std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        p.lock().expect("peers").push(peer);
                        std::thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
                            let mut buf = vec![0u8; 4096];
                            let n = conn.read(&mut buf).unwrap_or(0);
                            let reply = serde_json::json!({
                                "peer": peer.to_string(),
                                "got": String::from_utf8_lossy(&buf[..n]),
                            });
                            let _ = conn.write_all(format!("{reply}\n").as_bytes());
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => break,
                }
            }
        });
        Ok(EchoServer { addr, peers, stop })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Python client script: connects to each `host port` argument pair (with
/// `--threads N` concurrent connections each), sends `hello`, prints one
/// JSON object per connection: local address, reply, or error.
pub const PY_CLIENT: &str = r#"
import json, socket, sys, threading
args = sys.argv[1:]
threads = 1
if args and args[0] == "--threads":
    threads = int(args[1]); args = args[2:]
targets = [(args[i], int(args[i + 1])) for i in range(0, len(args), 2)]
lock = threading.Lock()
def one(host, port):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(60)
    out = {"target": f"{host}:{port}"}
    try:
        s.connect((host, port))
        out["local_port"] = s.getsockname()[1]
        s.sendall(b"hello")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        out["reply"] = json.loads(data) if data else None
    except OSError as e:
        out["error"] = e.errno
    finally:
        s.close()
    with lock:
        print(json.dumps(out), flush=True)
ts = [threading.Thread(target=one, args=t) for t in targets for _ in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
"#;

/// Result of one client connection.
#[derive(Debug, Clone)]
pub struct ClientResult {
    /// `host:port` it dialled.
    pub target: String,
    /// Its local port (when connected).
    pub local_port: Option<u16>,
    /// The peer address the server saw (when it answered).
    pub server_saw: Option<SocketAddr>,
    /// errno of a failed connect.
    pub errno: Option<i64>,
}

impl ClientResult {
    /// True when the connection went through the proxy: the server saw a
    /// different source port than the client's own socket had.
    pub fn proxied(&self) -> bool {
        match (self.local_port, self.server_saw) {
            (Some(local), Some(saw)) => saw.port() != local,
            _ => false,
        }
    }
}

/// Runs the Python client as `cmd` (already set up with program python3 or a
/// link to it) and parses its output.
pub fn run_client(mut cmd: Command, targets: &[SocketAddr], threads: usize) -> Result<(u32, Vec<ClientResult>)> {
    cmd.arg("-c").arg(PY_CLIENT).arg("--threads").arg(threads.to_string());
    for t in targets {
        cmd.arg(t.ip().to_string()).arg(t.port().to_string());
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().context("spawning the python client")?;
    let pid = child.id();
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("client failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut results = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line).with_context(|| format!("client output {line}"))?;
        results.push(ClientResult {
            target: v["target"].as_str().unwrap_or_default().to_owned(),
            local_port: v["local_port"].as_u64().map(|p| p as u16),
            server_saw: v["reply"]["peer"].as_str().and_then(|p| p.parse().ok()),
            errno: v["error"].as_i64(),
        });
    }
    Ok((pid, results))
}

/// A symlink to python3 with a recognisable name, so the client's `comm` is known.
pub fn python_named(dir: &Path, comm: &str) -> PathBuf {
    let python = which_python();
    let link = dir.join(comm);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&python, &link).expect("symlink python");
    link
}

fn which_python() -> PathBuf {
    // Debian's python3: readable by every uid (a pyenv under /root is not),
    // and a real binary (a shim script would make the comm the shell's).
    if let Ok(system) = std::fs::canonicalize("/usr/bin/python3") {
        return system;
    }
    let out = Command::new("python3")
        .args(["-c", "import os, sys; print(os.path.realpath(sys.executable))"])
        .output()
        .expect("python3 must be installed for the end-to-end tests");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// curl arguments that append the response's status code on a line of its
/// own; [`curl_reply`] reads it back.
pub const CURL_STATUS: [&str; 2] = ["-w", "\n%{http_code}"];

/// The status code and body of a curl run with [`CURL_STATUS`] (status 0
/// when curl got no response).
pub fn curl_reply(stdout: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}
