//! `cargo xtask image` and `cargo xtask demo`: container images built
//! without any registry, and the Docker Compose quick start.
//!
//! The gateway image (`ci-gateway:<version>`) is a Debian root made by
//! debootstrap from Debian's packages (the packaging test's cached root)
//! with the `.deb` of `cargo xtask package` installed by dpkg, imported with
//! `docker import`. The demo image (`ci-gateway-demo:<version>`) is another
//! debootstrapped root with curl, python3 and openssl: the quick start's
//! job, stand-in backend and certificate maker. Both talk to whatever
//! daemon the docker CLI does (`DOCKER_HOST`).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    output,
    package::{self, DebianRoot},
    status,
};

/// The gateway image's repository name.
pub const GATEWAY_IMAGE: &str = "ci-gateway";
/// The quick start's job/backend image.
pub const DEMO_IMAGE: &str = "ci-gateway-demo";
/// The compose project name of the quick start.
pub const PROJECT: &str = "cigwdemo";
/// The cgroup the demo's job container is put in (deploy/compose/gateway.yaml).
pub const DEMO_CGROUP: &str = "cigwdemo.slice";
/// The console's findings page in the quick start (deploy/compose/gateway.yaml).
const CONSOLE_FINDINGS: &str = "http://127.0.0.1:15343/findings";
/// The one user of the quick start's stand-in identity provider (deploy/compose/idp.py).
const CONSOLE_USER: &str = "reviewer@demo.example";

/// How to build the images.
pub struct ImageOptions {
    /// Package this gateway binary (the tests: the debug build); `None`
    /// builds the release one.
    pub binary: Option<PathBuf>,
    /// gzip -1 packages (throw-away images).
    pub fast: bool,
}

/// Builds `ci-gateway:<version>` (also tagged `latest`) and returns the version.
pub fn gateway_image(root: &Path, opts: &ImageOptions) -> Result<String> {
    docker_answers()?;
    let work = root.join("target/image");
    let debs = work.join("debs");
    let _ = fs::remove_dir_all(&debs);
    let deb =
        package::build(root, &package::Options { binary: opts.binary.clone(), out: debs.clone(), fast: opts.fast })?;
    let version = deb_field(&deb, "Version")?;
    let rootfs = unpack(&work, package::MINBASE)?;
    let inside = rootfs.join("tmp").join(deb.file_name().context("deb name")?);
    fs::copy(&deb, &inside).with_context(|| format!("copying {}", deb.display()))?;
    status(
        Command::new("chroot")
            .arg(&rootfs)
            .args(["dpkg", "-i"])
            .arg(Path::new("/tmp").join(deb.file_name().context("deb name")?))
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    )
    .context("installing the package into the image's root")?;
    fs::remove_file(&inside)?;
    slim(&rootfs)?;
    // The image's state lives in a volume; nothing of the build host's.
    import(
        &rootfs,
        GATEWAY_IMAGE,
        &version,
        &[
            r#"ENTRYPOINT ["/usr/bin/gateway"]"#,
            r#"CMD ["run"]"#,
            "ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "VOLUME /var/lib/ci-gateway",
            "LABEL org.opencontainers.image.title=ci-gateway",
        ],
    )?;
    fs::remove_dir_all(&rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    let _ = fs::remove_dir_all(&debs);
    println!("xtask: {GATEWAY_IMAGE}:{version} ({})", image_size(&format!("{GATEWAY_IMAGE}:{version}"))?);
    Ok(version)
}

/// Builds `ci-gateway-demo:<version>` (also tagged `latest`).
pub fn demo_image(root: &Path, version: &str) -> Result<()> {
    let work = root.join("target/image");
    let rootfs = unpack(&work, package::DEMO)?;
    slim(&rootfs)?;
    import(&rootfs, DEMO_IMAGE, version, &["ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin", r#"CMD ["/bin/sh"]"#])?;
    fs::remove_dir_all(&rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    println!("xtask: {DEMO_IMAGE}:{version} ({})", image_size(&format!("{DEMO_IMAGE}:{version}"))?);
    Ok(())
}

/// Fails with what to do when no Docker daemon answers.
fn docker_answers() -> Result<()> {
    output(Command::new("docker").args(["version", "--format", "{{.Server.Version}}"]))
        .context("no Docker daemon answers the docker CLI (start one: `systemctl start docker`, or set DOCKER_HOST)")?;
    Ok(())
}

fn deb_field(deb: &Path, field: &str) -> Result<String> {
    Ok(output(Command::new("dpkg-deb").arg("--field").arg(deb).arg(field))?.trim().to_owned())
}

/// A fresh copy of a cached Debian root below `work`.
fn unpack(work: &Path, root: DebianRoot) -> Result<PathBuf> {
    let tarball = root.ensure()?;
    let dir = work.join(format!("rootfs-{}", root.name));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    status(Command::new("tar").arg("-C").arg(&dir).arg("-xzf").arg(&tarball))?;
    Ok(dir)
}

/// What a container image does without: apt's package lists (no apt-get
/// in a running gateway; 49 MB), translations and manual pages (40 MB).
fn slim(rootfs: &Path) -> Result<()> {
    for dir in ["var/lib/apt/lists", "usr/share/locale", "usr/share/man", "var/cache/apt"] {
        let dir = rootfs.join(dir);
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry?.path();
            let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            removed.with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// `docker import`s `rootfs` as `name:version` and tags it `name:latest`.
fn import(rootfs: &Path, name: &str, version: &str, changes: &[&str]) -> Result<()> {
    let tag = format!("{name}:{version}");
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .args(["--numeric-owner", "-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("running tar")?;
    let mut cmd = Command::new("docker");
    cmd.arg("import");
    for change in changes {
        cmd.arg("--change").arg(change);
    }
    let out = cmd
        .args(["-", &tag])
        .stdin(tar.stdout.take().context("tar output")?)
        .output()
        .context("running docker import")?;
    let tar_status = tar.wait()?;
    if !out.status.success() || !tar_status.success() {
        bail!("docker import of {tag} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    status(Command::new("docker").args(["tag", &tag, &format!("{name}:latest")]))
}

fn image_size(tag: &str) -> Result<String> {
    let bytes: u64 = output(Command::new("docker").args(["image", "inspect", "--format", "{{.Size}}", tag]))?
        .trim()
        .parse()
        .context("docker image inspect printed no size")?;
    Ok(format!("{:.0} MB", bytes as f64 / 1e6))
}

/// How to run the quick start.
pub struct DemoOptions {
    /// Images.
    pub image: ImageOptions,
    /// Leave the containers running (`docker-compose -p cigwdemo down -v` ends them).
    pub keep: bool,
}

/// `cargo xtask demo`: builds both images, runs deploy/compose/ and shows
/// the job's blocked call, the finding and the session; fails unless the
/// key was blocked and found. Removes its containers, network, volumes and
/// cgroup afterwards (unless `keep`).
pub fn demo(root: &Path, opts: &DemoOptions) -> Result<()> {
    let started = Instant::now();
    let version = gateway_image(root, &opts.image)?;
    demo_image(root, &version)?;
    println!("xtask: images built in {:.0?}", started.elapsed());
    let compose = Compose::new(root, &version)?;
    // What an earlier run left behind (an interrupted demo).
    compose.down();
    let result = compose.run_job().and_then(|()| compose.show());
    if opts.keep {
        println!(
            "xtask: left running; the review console is {CONSOLE_FINDINGS} in a browser on this host \
             (sign in at the stand-in provider as {CONSOLE_USER}); stop it all with `docker-compose -p {PROJECT} down -v`"
        );
    } else {
        compose.down();
    }
    result?;
    println!("xtask: the quick start ran in {:.0?}", started.elapsed());
    Ok(())
}

/// `docker-compose` on deploy/compose/ with the demo's variables.
struct Compose {
    dir: PathBuf,
    version: String,
    cgroup_parent: String,
    socket: String,
}

impl Compose {
    fn new(root: &Path, version: &str) -> Result<Compose> {
        let driver = output(Command::new("docker").args(["info", "--format", "{{.CgroupDriver}}"]))?;
        // Both name the cgroup DEMO_CGROUP (deploy/compose/gateway.yaml).
        let cgroup_parent = if driver.trim() == "systemd" { DEMO_CGROUP.to_owned() } else { format!("/{DEMO_CGROUP}") };
        let socket = match std::env::var("DOCKER_HOST") {
            Ok(host) => match host.strip_prefix("unix://") {
                Some(path) => path.to_owned(),
                None => bail!("DOCKER_HOST={host}: the demo's gateway needs the daemon's unix socket"),
            },
            Err(_) => "/var/run/docker.sock".to_owned(),
        };
        Ok(Compose { dir: root.join("deploy/compose"), version: version.to_owned(), cgroup_parent, socket })
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(&self.dir)
            .args(["-p", PROJECT, "--ansi", "never"])
            .env("CI_GATEWAY_TAG", &self.version)
            .env("DEMO_CGROUP_PARENT", &self.cgroup_parent)
            .env("DOCKER_SOCKET", &self.socket);
        cmd
    }

    /// Starts everything and waits for the job to end.
    fn run_job(&self) -> Result<()> {
        status(self.cmd().args(["up", "-d"])).with_context(|| {
            format!("docker-compose up failed; the gateway's log:\n{}", self.logs("gateway").unwrap_or_default())
        })?;
        let id = output(self.cmd().args(["ps", "-q", "job"]))?.trim().to_owned();
        if id.is_empty() {
            bail!("the job container was not created");
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let state = output(Command::new("docker").args(["inspect", "--format", "{{.State.Status}}", &id]))?;
            if state.trim() == "exited" {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the job did not finish within 2 minutes; its log:\n{}", self.logs("job")?);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn logs(&self, service: &str) -> Result<String> {
        output(self.cmd().args(["logs", "--no-color", service]))
    }

    fn gateway(&self, args: &[&str]) -> Result<String> {
        output(self.cmd().args(["exec", "-T", "gateway", "gateway"]).args(args))
    }

    /// Prints what the quick start is about; fails unless the key was
    /// blocked and recorded as a finding.
    fn show(&self) -> Result<()> {
        let job = self.logs("job")?;
        println!("\n=== the job's output ===\n{}", job.trim_end());
        let findings = self.gateway(&["findings", "list"])?;
        println!("\n=== gateway findings list ===\n{}", findings.trim_end());
        let sessions = self.gateway(&["sessions", "list"])?;
        println!("\n=== gateway sessions list ===\n{}", sessions.trim_end());
        if let Some(id) = first_session_id(&sessions) {
            let session = self.gateway(&["sessions", "show", &id])?;
            println!("\n=== gateway sessions show {id} ===\n{}", session.trim_end());
        }
        // The reviewer's view: the console, signed in at the stand-in
        // identity provider as a browser would be (idp.py sign-in).
        let console =
            output(self.cmd().args(["exec", "-T", "idp", "python3", "/demo/idp.py", "sign-in", CONSOLE_FINDINGS]))
                .with_context(|| {
                    format!(
                        "signing in to the console; the gateway's log:\n{}",
                        self.logs("gateway").unwrap_or_default()
                    )
                })?;
        println!(
            "\n=== the review console, {CONSOLE_FINDINGS}, signed in as {CONSOLE_USER} ===\n{}",
            console.trim_end()
        );
        if !job.contains("job: HTTP 403") {
            bail!("the job's call was not blocked (expected HTTP 403); the gateway's log:\n{}", self.logs("gateway")?);
        }
        if !findings.contains("cursor") {
            bail!("no finding for the job's key; the gateway's log:\n{}", self.logs("gateway")?);
        }
        if !console.contains("F-1") {
            bail!("the console does not list the finding; the gateway's log:\n{}", self.logs("gateway")?);
        }
        println!("\nxtask: the key was blocked (HTTP 403), found, and the session recorded");
        Ok(())
    }

    /// Removes the containers, network and volumes, then the cgroup the
    /// job ran in (dockerd's cgroupfs driver makes it in every hierarchy).
    fn down(&self) {
        let _ = self.cmd().args(["down", "-v", "--remove-orphans", "-t", "10"]).stderr(Stdio::null()).status();
        remove_cgroup(DEMO_CGROUP);
    }
}

/// The id of the blocked session in `gateway sessions list` (else the newest).
fn first_session_id(list: &str) -> Option<String> {
    let rows: Vec<&str> = list.lines().skip(1).collect();
    let row = rows.iter().find(|l| l.split_whitespace().last() == Some("blocked")).or(rows.first())?;
    row.split_whitespace().next().map(str::to_owned)
}

/// Removes `name` (a cgroup directly below the root) from every cgroup
/// hierarchy mounted here; a cgroup still in use stays.
fn remove_cgroup(name: &str) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return };
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else { continue };
        let fstype = post.split(' ').next().unwrap_or_default();
        if let (Some(point), true) = (pre.split(' ').nth(4), matches!(fstype, "cgroup" | "cgroup2")) {
            let _ = fs::remove_dir(Path::new(point).join(name));
        }
    }
}
