//! A private Docker daemon for the container tests: real dockerd, real
//! containerd and runc (Debian's `docker.io`), real containers.
//!
//! One daemon per test binary process, started on first use and shared by
//! its tests: its own data root, exec root, pid file and socket under
//! `/tmp/gateway-tests-docker/<pid>/`, its own bridge (`gwtd<pid>`) on a
//! /24 no other interface of the host uses, no iptables rules, no IP
//! forwarding change. It never meets another dockerd or another test
//! binary's daemon.
//!
//! No registry is reachable, so the image is built locally: an almost
//! empty root file system (`/bin` -> `usr/bin` and friends, `/etc/passwd`,
//! CA certificates) imported with `docker import`; containers run with the
//! host's `/usr` bind-mounted read-only, which brings curl, git and python.
//!
//! Cleanup: each [`Container`] is removed when dropped (also when its test
//! panics); the daemon, its mounts, bridge, data and the cgroups docker
//! created in the v1 hierarchies are removed when the test process exits
//! (`atexit`, which runs after the test harness reports, failing or not).
//! A process killed outright cannot clean up: the next start removes what
//! dead processes left behind.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use crate::PATIENCE;

/// Where every test process keeps its daemon.
const BASE: &str = "/tmp/gateway-tests-docker";
/// The image every container runs.
pub const IMAGE: &str = "gateway-test:1";

/// The daemon of this test process.
pub struct Docker {
    dir: PathBuf,
    socket: PathBuf,
    bridge: String,
    host_ip: Ipv4Addr,
    cli: PathBuf,
    daemon_pid: u32,
    /// Where containers started without `--cgroup-parent` go (the daemon's
    /// own `--cgroup-parent` option).
    default_parent: String,
    /// cgroup parents containers were started under, removed at exit
    /// (docker creates them in every hierarchy).
    parents: Mutex<Vec<String>>,
}

static DOCKER: OnceLock<Docker> = OnceLock::new();

/// The shared daemon, started (and its image built) on first use. Fails
/// the test with dockerd's log if it cannot start.
pub fn docker() -> &'static Docker {
    DOCKER.get_or_init(|| match Docker::start() {
        Ok(d) => {
            // SAFETY: registering a plain `extern "C" fn` with atexit.
            let registered = unsafe { libc::atexit(stop_at_exit) };
            assert_eq!(registered, 0, "atexit refused the docker cleanup");
            d
        }
        Err(e) => panic!("{e:#}"),
    })
}

extern "C" fn stop_at_exit() {
    if let Some(d) = DOCKER.get() {
        d.stop();
    }
}

/// What [`Docker::run`] starts.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    /// `--name`.
    pub name: String,
    /// `--cgroup-parent` (a cgroup path such as `/gateway-tests/x`); `None`
    /// leaves it to the daemon's default.
    pub cgroup_parent: Option<String>,
    /// `--network host` instead of the bridge.
    pub host_network: bool,
    /// Host directories mounted read-only: (host path, container path).
    pub mounts: Vec<(PathBuf, String)>,
}

/// A running container; removed (`docker rm -f`) on drop.
pub struct Container {
    /// Full id.
    pub id: String,
    /// Name.
    pub name: String,
    docker: &'static Docker,
}

impl Docker {
    fn start() -> anyhow::Result<Docker> {
        use anyhow::Context as _;
        crate::require_root();
        clean_stale();
        let pid = std::process::id();
        let dir = PathBuf::from(BASE).join(pid.to_string());
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let cli = which("docker").context("the docker CLI is not installed (run `cargo xtask setup`)")?;
        let dockerd = which("dockerd").context("dockerd is not installed (run `cargo xtask setup`: docker.io)")?;
        let bridge = format!("gwtd{pid}");
        let host_ip = create_bridge(&bridge)?;
        let socket = dir.join("docker.sock");
        let default_parent = format!("/gateway-tests/docker-default-{pid}");
        let log = std::fs::File::create(dir.join("dockerd.log"))?;
        let child = Command::new(dockerd)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args(["--bridge", &bridge, "--iptables=false", "--ip6tables=false", "--ip-forward=false"])
            .args(["--ip-masq=false", "--userland-proxy=false", "--exec-opt", "native.cgroupdriver=cgroupfs"])
            .args(["--cgroup-parent", &default_parent])
            .env("DOCKER_CONFIG", dir.join("cli"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning dockerd")?;
        let docker = Docker {
            dir,
            socket,
            bridge,
            host_ip,
            cli,
            daemon_pid: child.id(),
            default_parent,
            parents: Mutex::new(Vec::new()),
        };
        // The Child is not kept: the daemon is stopped by pid at exit.
        drop(child);
        let deadline = Instant::now() + PATIENCE;
        loop {
            let ok = docker.cmd().args(["version", "--format", "{{.Server.Version}}"]).output();
            if ok.as_ref().is_ok_and(|o| o.status.success()) {
                break;
            }
            let exited = !Path::new(&format!("/proc/{}", docker.daemon_pid)).exists()
                || std::fs::read_to_string(format!("/proc/{}/stat", docker.daemon_pid))
                    .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')));
            if exited || Instant::now() > deadline {
                let why = if exited { "exited" } else { "did not answer within PATIENCE" };
                let log = docker.daemon_log();
                docker.stop();
                anyhow::bail!("dockerd {why}; its log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Err(e) = docker.build_image() {
            let log = docker.daemon_log();
            docker.stop();
            anyhow::bail!("building the test image: {e:#}\ndockerd's log:\n{log}");
        }
        Ok(docker)
    }

    /// The daemon's API socket (what `identity.container_runtimes` lists).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The host's address on the daemon's bridge: bridge containers reach
    /// the host there.
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// The daemon's own `--cgroup-parent`: where containers started without
    /// one land (how GitHub Actions or Buildkite job containers are put
    /// under an intercepted cgroup).
    pub fn default_cgroup_parent(&self) -> &str {
        &self.default_parent
    }

    /// The docker CLI talking to this daemon.
    pub fn cmd(&self) -> Command {
        let mut cmd = Command::new(&self.cli);
        cmd.arg("-H").arg(format!("unix://{}", self.socket.display())).env("DOCKER_CONFIG", self.dir.join("cli"));
        cmd
    }

    /// What dockerd logged so far.
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// Starts a container of [`IMAGE`] that sleeps until removed; commands
    /// run in it with [`Container::exec`].
    pub fn run(&'static self, spec: &RunSpec) -> Container {
        let out = self.run_command(spec, &["-d"]).args([IMAGE, "sleep", "3600"]).output().expect("docker run");
        assert!(
            out.status.success(),
            "docker run failed: {}\ndockerd's log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(id.len(), 64, "docker run printed no container id: {id}");
        Container { id, name: spec.name.clone(), docker: self }
    }

    /// Runs `args` as the container's own command, in the foreground
    /// (`docker run --rm IMAGE args...`), as a CI job's container does:
    /// the job starts working the moment the container starts.
    pub fn run_job(&self, spec: &RunSpec, args: &[&str]) -> Output {
        self.run_command(spec, &["--rm"]).arg(IMAGE).args(args).output().expect("docker run")
    }

    /// `docker run` with `options` and everything `spec` asks for.
    fn run_command(&self, spec: &RunSpec, options: &[&str]) -> Command {
        let mut cmd = self.cmd();
        cmd.arg("run").args(options).args(["--name", &spec.name, "-v", "/usr:/usr:ro"]);
        if let Some(parent) = &spec.cgroup_parent {
            cmd.arg("--cgroup-parent").arg(parent);
            self.parents.lock().expect("parents").push(parent.clone());
        }
        if spec.host_network {
            cmd.args(["--network", "host"]);
        }
        for (host, inside) in &spec.mounts {
            cmd.arg("-v").arg(format!("{}:{inside}:ro", host.display()));
        }
        cmd
    }

    fn build_image(&self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let root = self.dir.join("rootfs");
        for d in ["etc/ssl/certs", "tmp", "proc", "sys", "dev", "root", "run", "var/tmp", "usr"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        for (link, target) in [("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")] {
            std::os::unix::fs::symlink(target, root.join(link))?;
        }
        for f in ["etc/passwd", "etc/group", "etc/ssl/certs/ca-certificates.crt"] {
            std::fs::copy(Path::new("/").join(f), root.join(f)).with_context(|| format!("copying /{f}"))?;
        }
        let tar = Command::new("tar").arg("-C").arg(&root).args(["-c", "."]).stdout(Stdio::piped()).spawn()?;
        let out = self
            .cmd()
            .args(["import", "-", IMAGE])
            .stdin(tar.stdout.context("tar output")?)
            .output()
            .context("docker import")?;
        anyhow::ensure!(out.status.success(), "docker import: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    /// Removes everything: containers, daemon, mounts, bridge, data, the
    /// cgroups docker made. Never panics (it runs at exit).
    fn stop(&self) {
        if let Ok(out) = self.cmd().args(["ps", "-aq"]).output() {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect();
            if !ids.is_empty() {
                let _ = self.cmd().args(["rm", "-f"]).args(&ids).output();
            }
        }
        stop_daemon(self.daemon_pid, &self.dir);
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
        let mut parents = self.parents.lock().map(|p| p.clone()).unwrap_or_default();
        parents.push(self.default_parent.clone());
        for parent in &parents {
            remove_cgroups(parent);
        }
        let _ = std::io::stderr().flush();
    }
}

impl Container {
    /// Runs `args` inside the container (`docker exec`), returning its output.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_with(&[], args)
    }

    /// Runs `args` inside the container with `docker exec` options
    /// (`-e NAME=value`, `-u uid`...).
    pub fn exec_with(&self, options: &[&str], args: &[&str]) -> Output {
        self.docker.cmd().arg("exec").args(options).arg(&self.id).args(args).output().expect("docker exec")
    }

    /// The host pid of the container's init process.
    pub fn pid(&self) -> u32 {
        let out =
            self.docker.cmd().args(["inspect", "--format", "{{.State.Pid}}", &self.id]).output().expect("inspect");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("a pid")
    }

    /// Its address on the bridge.
    pub fn ip(&self) -> Option<Ipv4Addr> {
        let out = self
            .docker
            .cmd()
            .args(["inspect", "--format", "{{.NetworkSettings.IPAddress}}", &self.id])
            .output()
            .expect("inspect");
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// Removes the container now (drop does it otherwise).
    pub fn remove(&self) {
        let out = self.docker.cmd().args(["rm", "-f", &self.id]).output().expect("docker rm");
        assert!(out.status.success(), "docker rm: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.docker.cmd().args(["rm", "-f", &self.id]).output();
    }
}

/// SIGTERM, then SIGKILL after a while; then its containerd (a child it
/// normally stops itself), the mounts left under `dir`, and `dir`.
fn stop_daemon(pid: u32, dir: &Path) {
    use nix::sys::signal::{kill, Signal};
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
    };
    let containerd = std::fs::read_to_string(dir.join("exec/containerd/containerd.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok());
    if pid != 0 && alive(pid) {
        let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(pid) {
            let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        // Reap it if it is our child (it is, unless it was a stale one).
        let _ =
            nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
    }
    if let Some(c) = containerd.filter(|&c| alive(c)) {
        // Only if it still serves this daemon's state (pids are reused).
        let cmdline = std::fs::read(format!("/proc/{c}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&dir.display().to_string()) {
            let _ = kill(nix::unistd::Pid::from_raw(c as i32), Signal::SIGKILL);
        }
    }
    unmount_below(dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// Detaches every mount at or below `dir`, deepest first (overlay roots,
/// network namespace files).
fn unmount_below(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let prefix = dir.display().to_string();
    let mut points: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| *p == prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Removes `parent` (and its now empty ancestors) from every cgroup
/// hierarchy: docker's cgroupfs driver creates it in each v1 hierarchy and
/// in cgroup2. Runs at exit, once the tests' gateways removed theirs; a
/// cgroup still in use elsewhere is not empty and stays.
fn remove_cgroups(parent: &str) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let hierarchies: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let point = pre.split(' ').nth(4)?;
            matches!(post.split(' ').next()?, "cgroup" | "cgroup2").then(|| PathBuf::from(point))
        })
        .collect();
    for h in hierarchies {
        let mut rel = PathBuf::from(parent.trim_start_matches('/'));
        loop {
            if rel.as_os_str().is_empty() || std::fs::remove_dir(h.join(&rel)).is_err() {
                break;
            }
            if !rel.pop() {
                break;
            }
        }
    }
}

/// Creates bridge `name` with the first free 172.30.N.1/24 (N from 0..=255,
/// chosen under a host-wide lock so two test processes never pick the same).
fn create_bridge(name: &str) -> anyhow::Result<Ipv4Addr> {
    use anyhow::Context as _;
    std::fs::create_dir_all(BASE)?;
    let lock =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(Path::new(BASE).join(".lock"))?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {BASE}/.lock: {e}"))?;
    let used = Command::new("ip").args(["-4", "-o", "route", "show", "table", "all"]).output()?;
    let used = String::from_utf8_lossy(&used.stdout).into_owned();
    let start = std::process::id() % 256;
    for k in 0..256u32 {
        let n = ((start + k) % 256) as u8;
        let net = format!("172.30.{n}.");
        if used.lines().any(|l| l.contains(&net)) {
            continue;
        }
        let ip = Ipv4Addr::new(172, 30, n, 1);
        let run = |args: &[&str]| -> anyhow::Result<()> {
            let out = Command::new("ip").args(args).output().context("running ip")?;
            anyhow::ensure!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            Ok(())
        };
        run(&["link", "add", name, "type", "bridge"])?;
        run(&["addr", "add", &format!("{ip}/24"), "dev", name])?;
        run(&["link", "set", name, "up"])?;
        return Ok(ip);
    }
    anyhow::bail!("no free /24 in 172.30.0.0/16 for the test bridge")
}

/// Removes what test processes that no longer exist left behind.
fn clean_stale() {
    let Ok(entries) = std::fs::read_dir(BASE) else { return };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = e.path();
        let daemon = std::fs::read_to_string(dir.join("dockerd.pid")).ok().and_then(|p| p.trim().parse::<u32>().ok());
        // Only a daemon still running on this directory's state.
        let daemon = daemon.filter(|d| {
            let cmdline = std::fs::read(format!("/proc/{d}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(&dir.display().to_string())
        });
        stop_daemon(daemon.unwrap_or(0), &dir);
        let _ = Command::new("ip").args(["link", "del", &format!("gwtd{pid}")]).output();
        remove_cgroups(&format!("/gateway-tests/docker-default-{pid}"));
    }
}

fn which(program: &str) -> Option<PathBuf> {
    // Debian's packaged binaries first: they match the daemon's version.
    for dir in ["/usr/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(program);
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file()))
}
