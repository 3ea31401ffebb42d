//! Project automation. Every command first runs `setup`, which installs
//! whatever a fresh machine lacks and skips, in seconds, what is there.
//!
//! * `cargo xtask setup` — system packages, nightly rust-src, bpf-linker,
//!   the Python and npm packages the end-to-end clients use.
//! * `cargo xtask run [-- ARGS]` — build and run the gateway (embedded
//!   defaults, but Ctrl-C detaches); installs only what building and
//!   running need.
//! * `cargo xtask test` — build and run every test (what CI runs), then
//!   every fuzz target briefly (`XTASK_FUZZ_SECONDS`, default
//!   [`fuzz::CI_SECONDS`]; 0 skips).
//! * `cargo xtask fuzz [--quick] [--seconds N] [TARGET...]` — the fuzz
//!   targets alone (cargo-fuzz release build, or the CI step's).
//! * `cargo xtask package` — build the Debian package (release).
//! * `cargo xtask image` — the container image `ci-gateway:<version>`, from
//!   a debootstrapped Debian root with the package installed (no registry).
//! * `cargo xtask demo` — the Docker Compose quick start (deploy/compose/):
//!   builds the images, shows a job's hard-coded key blocked and found.
//! * `cargo xtask bench` — run the benchmarks (and install their tools).

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod fuzz;
mod image;
mod package;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything the build and the tests need (idempotent).
    Setup,
    /// Build the gateway (release) and run it; extra arguments go to `gateway`.
    Run {
        /// Arguments for the gateway binary (default: `run`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit, eBPF and end-to-end (needs root).
    Test {
        /// Extra arguments for `cargo test` (a test name filter, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the Debian package (release binary, split debug info, systemd
    /// unit, configuration, docs) into target/package/.
    Package {
        /// Directory for the .deb files (default: target/package).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Package this gateway binary instead of building the release one
        /// (the packaging test packages the debug build).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Compress with gzip -1 instead of xz (throw-away packages).
        #[arg(long)]
        fast: bool,
    },
    /// Build the container image ci-gateway:<version> (and :latest) from a
    /// debootstrapped Debian root with the package installed, with the
    /// docker CLI's daemon (DOCKER_HOST); no registry is used.
    Image {
        /// Install the package of this gateway binary instead of the release one.
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Compress the package with gzip -1 (throw-away images).
        #[arg(long)]
        fast: bool,
    },
    /// The Docker Compose quick start: build the images, run
    /// deploy/compose/ and show the job's key blocked, the finding and the
    /// session; then remove everything it started.
    Demo {
        /// Use the package of this gateway binary instead of the release one.
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Compress the package with gzip -1.
        #[arg(long)]
        fast: bool,
        /// Leave the demo running afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Run the fuzz targets in fuzz/ (cargo-fuzz, release), each for a
    /// bounded time; a crash fails with the reproducer's path.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// The CI step's build instead: debug, sharing the test build's
        /// dependencies, only the gateway and the targets instrumented.
        #[arg(long)]
        quick: bool,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Run the benchmarks (criterion and the interception harness).
    Bench {
        /// Extra arguments for `cargo bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// Debian packages building and running the gateway needs: `run` installs
/// only these.
const APT_BUILD: &[&str] = &[
    "pkg-config",
    // Hyperscan: the static-key detector (headers to build, libhyperscan5 to run).
    "libhyperscan-dev",
    // bindgen in pg_query's build (libpg_query: PostgreSQL's own SQL grammar) needs libclang.
    "libclang-dev",
    // `gateway trust install` runs update-ca-certificates.
    "ca-certificates",
];

/// Debian packages the tests add.
const APT_TEST: &[&str] = &[
    "iproute2",
    "iptables",
    "nftables",
    "curl",
    "git",
    "python3",
    "python3-pip",
    // python requests and grpc: `gateway doctor` and the trust tests check
    // that these runtimes trust the gateway CA.
    "python3-requests",
    "python3-grpcio",
    // dockerd, containerd and runc: the container tests start their own daemon.
    "docker.io",
    // The PostgreSQL tests' server (initdb, postgres) and clients (psql, pgbench).
    "postgresql",
    "postgresql-client",
    // The postgres benchmark's baseline proxy (pool_mode session, TLS both sides).
    "pgbouncer",
    // More real PostgreSQL clients: pgjdbc, run by the JDK's single-file
    // source launcher; node for node-postgres (installed by npm below). The
    // JDK's keytool and java are also what the Java trust test uses.
    "libpostgresql-jdbc-java",
    "default-jdk-headless",
    "nodejs",
    // The packaging tests: systemd-analyze verify on the unit, a Debian root
    // made by debootstrap, dpkg-shlibdeps (dpkg-dev) and objcopy (binutils).
    "systemd",
    "debootstrap",
    "dpkg-dev",
    "binutils",
    // The quick start's test runs `cargo xtask demo` (Compose v1 in bookworm).
    "docker-compose",
    // The console test's browser (driven headless by playwright-core).
    "chromium",
    // promtool: tests/metrics.rs checks deploy/prometheus/alerts.yml with
    // `promtool check rules` (the package also ships the server, unused).
    "prometheus",
    // libfaketime: tests/faults.rs jumps the gateway's wall clock.
    "faketime",
];

/// Debian packages `cargo xtask package` uses: objcopy, dpkg-shlibdeps.
const APT_PACKAGING: &[&str] = &["binutils", "dpkg-dev"];

/// Debian packages `cargo xtask image` and `demo` use: debootstrap for the
/// roots, dpkg-dev and binutils for the package, dockerd and Compose
/// (Debian's docker-compose is Compose v1, 1.29).
const APT_IMAGE: &[&str] = &["debootstrap", "binutils", "dpkg-dev", "docker.io", "docker-compose"];

/// Debian packages only the benchmarks use.
const APT_BENCH: &[&str] = &[
    "nginx-light",
    // The HTTPS benchmark's second peer proxy (issue 13), next to nginx;
    // the PostgreSQL benchmark's TCP relay (the floor, issue 12).
    "haproxy",
    "wrk",
    // valgrind (callgrind): instruction counts per request, HTTPS_BENCH_MODE=callgrind.
    "valgrind",
];

/// What a command needs installed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// Building and running the gateway.
    Run,
    /// The tests (and packaging).
    Test,
    /// The benchmarks.
    Bench,
    /// Everything (`cargo xtask setup`).
    All,
}

fn main() -> ExitCode {
    // `cargo xtask fuzz --quick` makes this binary cargo's RUSTC_WRAPPER.
    if let Some(code) = fuzz::as_rustc_wrapper() {
        return code;
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup(Needs::All),
        // Root first: minutes of set-up and building must not end in "needs root".
        Cmd::Run { args } => {
            require_root("the gateway attaches eBPF programs to cgroups and needs root: run `sudo cargo xtask run`")
                .and_then(|()| setup(Needs::Run))
                .and_then(|()| run(&args))
        }
        Cmd::Test { args } => {
            require_root("the tests attach real eBPF programs to cgroups they create: run `cargo xtask test` as root")
                .and_then(|()| setup(Needs::Test))
                .and_then(|()| test(&args))
        }
        Cmd::Bench { args } => setup(Needs::Bench).and_then(|()| bench(&args)),
        Cmd::Package { out, binary, fast } => {
            let opts =
                package::Options { out: out.unwrap_or_else(|| workspace_root().join("target/package")), binary, fast };
            // A given binary needs nothing built (the tests call this).
            let ready = if opts.binary.is_some() { Ok(()) } else { setup(Needs::Run) };
            let ready = ready.and_then(|()| apt_packages(APT_PACKAGING));
            ready.and_then(|()| package::build(&workspace_root(), &opts)).map(|_| ())
        }
        Cmd::Image { binary, fast } => {
            let ready = if binary.is_some() { Ok(()) } else { setup(Needs::Run) };
            ready
                .and_then(|()| apt_packages(APT_IMAGE))
                .and_then(|()| image::gateway_image(&workspace_root(), &image::ImageOptions { binary, fast }))
                .map(|_| ())
        }
        Cmd::Demo { binary, fast, keep } => {
            require_root("the demo's gateway attaches eBPF programs and its images are built with chroot: run `sudo cargo xtask demo`")
                .and_then(|()| if binary.is_some() { Ok(()) } else { setup(Needs::Run) })
                .and_then(|()| apt_packages(APT_IMAGE))
                .and_then(|()| {
                    image::demo(&workspace_root(), &image::DemoOptions { image: image::ImageOptions { binary, fast }, keep })
                })
        }
        Cmd::Fuzz { seconds, quick, targets } => setup(Needs::Run).and_then(|()| {
            if quick {
                fuzz::quick(seconds, &targets)
            } else {
                fuzz::long(seconds, &targets)
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    // xtask/ lives directly under the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    // What `cargo run` set for this process describes xtask, not the build:
    // build scripts that watch these (ring's does, through the cc crate)
    // would otherwise rerun, and rebuild their dependents, whenever a build
    // alternates between `cargo xtask ...` and a plain `cargo build`.
    for (name, _) in env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("CARGO_PKG_")
            || matches!(
                name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_RUSTC_CURRENT_DIR"
            )
        {
            cmd.env_remove(name);
        }
    }
    // Incremental state is a second copy of every workspace crate's build
    // (gigabytes here) that a one-off build (CI's clean clone, a test run)
    // never reuses; a developer who wants it sets CARGO_INCREMENTAL=1.
    if env::var_os("CARGO_INCREMENTAL").is_none() {
        cmd.env("CARGO_INCREMENTAL", "0");
    }
    cmd
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).map(|s| s.trim() == "0").unwrap_or(false)
}

fn cache_dir() -> PathBuf {
    let home = env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/ci-gateway")
}

fn require_root(why: &str) -> Result<()> {
    if !is_root() {
        bail!("{why}");
    }
    Ok(())
}

fn setup(needs: Needs) -> Result<()> {
    let mut apt: Vec<&str> = APT_BUILD.to_vec();
    if matches!(needs, Needs::Test | Needs::All) {
        apt.extend(APT_TEST);
    }
    if matches!(needs, Needs::Bench | Needs::All) {
        apt.extend(APT_BENCH);
    }
    apt_packages(&apt)?;
    nightly_rust_src()?;
    bpf_linker()?;
    if matches!(needs, Needs::Test | Needs::All) {
        python_packages()?;
        npm_packages()?;
        package::debootstrap_cache()?;
        package::DEMO.ensure()?;
    }
    Ok(())
}

/// Python packages the end-to-end tests' clients use (a real QUIC client
/// and server for the UDP refusal test, PostgreSQL drivers, the OpenAI and
/// Anthropic SDKs), installed for
/// the `python3` the tests run.
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("aioquic", "aioquic"),
    ("psycopg", "psycopg[binary]"),
    ("asyncpg", "asyncpg"),
    // The AI SDKs whose error output tests/refusals.rs checks.
    ("openai", "openai"),
    ("anthropic", "anthropic"),
    // Validates deploy/kubernetes/ against the vendored Kubernetes schemas.
    ("jsonschema", "jsonschema"),
    // tests/metrics.rs parses `/metrics` with the Prometheus client's own
    // OpenMetrics parser.
    ("prometheus_client", "prometheus-client"),
];

/// The pythons the tests run: Debian's (what clients running as other uids
/// use; a pyenv first on root's PATH is not readable by them) and whatever
/// `python3` is first on PATH (what the other tests spawn).
fn tests_pythons() -> Vec<&'static str> {
    let mut pythons = vec!["python3"];
    if Path::new("/usr/bin/python3").exists() {
        pythons.push("/usr/bin/python3");
    }
    pythons
}

fn python_packages() -> Result<()> {
    for python in tests_pythons() {
        for (module, package) in PYTHON_PACKAGES {
            if output(Command::new(python).args(["-c", &format!("import {module}")])).is_ok() {
                continue;
            }
            eprintln!("xtask: installing the Python package {package} for {python}");
            let pip = Command::new(python).args(["-m", "pip", "install", "--quiet", package]).status();
            if !pip.is_ok_and(|s| s.success()) {
                // Debian's own python3 refuses pip into the system site.
                status(Command::new(python).args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--break-system-packages",
                    package,
                ]))?;
            }
        }
    }
    Ok(())
}

/// npm packages the end-to-end tests use, as (module, package): node-postgres
/// as a client, with pg-copy-streams for its COPY; playwright-core (driving Debian's chromium) and
/// oidc-provider (a local identity provider; v9 is ESM, which node's
/// `require` loads from 20.19 on) for the console test. Installed below
/// [`cache_dir`]`/npm`, where the tests look for them
/// (`$HOME/.cache/ci-gateway/npm/node_modules`).
const NPM_PACKAGES: &[(&str, &str)] = &[
    ("pg", "pg"),
    ("pg-copy-streams", "pg-copy-streams"),
    ("playwright-core", "playwright-core@1"),
    ("oidc-provider", "oidc-provider@9"),
];

fn npm_packages() -> Result<()> {
    let prefix = cache_dir().join("npm");
    let modules = prefix.join("node_modules");
    let missing: Vec<&str> = NPM_PACKAGES
        .iter()
        .filter(|(module, _)| {
            output(Command::new("node").env("NODE_PATH", &modules).args(["-e", &format!("require('{module}')")]))
                .is_err()
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if output(Command::new("npm").arg("--version")).is_err() {
        // NodeSource's nodejs bundles npm; Debian's ships it apart.
        eprintln!("xtask: installing npm");
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", "npm"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    std::fs::create_dir_all(&prefix).with_context(|| format!("creating {}", prefix.display()))?;
    eprintln!("xtask: installing the npm packages {missing:?}");
    status(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
            .arg(&prefix)
            .args(&missing),
    )
}

fn apt_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| {
            output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
                .map(|s| !s.contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}: run `cargo xtask setup` as root (or install them)");
    }
    eprintln!("xtask: installing {missing:?}");
    status(Command::new("apt-get").args(["update", "-qq"]))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn nightly_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask: installing the nightly toolchain (eBPF programs need it)");
        status(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let installed =
        output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly");
        status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

/// bpf-linker must link against the same LLVM major as nightly rustc; it is
/// built against nightly's own libLLVM (no matching system LLVM exists).
fn bpf_linker() -> Result<()> {
    let rustc = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm_major = rustc
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("nightly rustc does not report its LLVM version")?
        .to_owned();
    let stamp = cache_dir().join("bpf-linker.stamp");
    let want = format!("llvm-{llvm_major}\n{rustc}");
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    // bpf-linker loads nightly's libLLVM at run time; rustc finds it through
    // the toolchain's library path, so check it the same way.
    let have_binary = output(Command::new("bpf-linker").arg("--version").env("LD_LIBRARY_PATH", &libdir)).is_ok();
    if have_binary && std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(());
    }
    let libllvm = std::fs::read_dir(&libdir)
        .with_context(|| format!("listing {}", libdir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.")))
        .min()
        .with_context(|| format!("no libLLVM.so.* in {}", libdir.display()))?;
    let prefix = cache_dir().join("llvm");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link).with_context(|| format!("linking {}", link.display()))?;
    eprintln!("xtask: building bpf-linker against {} (LLVM {llvm_major})", libllvm.display());
    status(
        Command::new("cargo")
            .args(["+nightly", "install", "bpf-linker", "--locked", "--force", "--no-default-features", "--features"])
            .arg(format!("llvm-{llvm_major}"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    std::fs::write(&stamp, want).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

/// The development gateway's configuration: the embedded defaults except
/// that a clean shutdown (Ctrl-C) detaches everything, so a developer's
/// host is left as it was. The embedded default (`enforce`) is what
/// production gets.
const DEV_CONFIG: &str = "\
# Written by `cargo xtask run`: the embedded defaults, except that Ctrl-C
# detaches the programs instead of leaving them refusing connections.
intercept:
  on_shutdown: detach
";

fn run(args: &[String]) -> Result<()> {
    status(cargo().args(["build", "--release", "-p", "gateway", "--bins"]))?;
    let root = workspace_root();
    let bin = root.join("target/release/gateway");
    let config = root.join("target/xtask-run/gateway.yaml");
    if let Some(dir) = config.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&config, DEV_CONFIG).with_context(|| format!("writing {}", config.display()))?;
    let mut cmd = Command::new(bin);
    // An explicit --config among the arguments wins (clap refuses two).
    if !args.iter().any(|a| a == "--config" || a.starts_with("--config=")) {
        cmd.arg("--config").arg(&config);
    }
    if args.is_empty() {
        cmd.arg("run");
    }
    status(cmd.args(args))
}

fn test(args: &[String]) -> Result<()> {
    // The end-to-end tests drive the gateway binary; build it first so they
    // test what was just compiled. Building tests in the same command keeps
    // feature unification identical to `cargo test`, so nothing builds twice.
    status(cargo().args(["build", "--workspace", "--bins", "--tests"]))?;
    let bin = workspace_root().join("target/debug/gateway");
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--no-fail-fast"]).args(args).env("GATEWAY_BIN", bin);
    run_counting_tests(cmd)?;
    // A filtered run is someone iterating on some tests: no fuzzing then.
    if !args.is_empty() {
        return Ok(());
    }
    // Every target, briefly, on every run: a debug build beside the tests'
    // that shares their dependencies (minutes, not the quarter hour a
    // cargo-fuzz build takes). XTASK_FUZZ_SECONDS=0 turns it off.
    let seconds: u64 = match env::var("XTASK_FUZZ_SECONDS") {
        Ok(s) => s.parse().with_context(|| format!("XTASK_FUZZ_SECONDS={s:?} is not a number of seconds"))?,
        Err(_) => fuzz::CI_SECONDS,
    };
    if seconds == 0 {
        println!("xtask: fuzzing not run (XTASK_FUZZ_SECONDS=0)");
        return Ok(());
    }
    fuzz::quick(seconds, &[])
}

/// Runs `cargo test`, echoing its output, and ends with one total line over
/// every test binary (cargo's own last line is that of some crate's doc
/// tests, often "0 passed", which says nothing about the run).
fn run_counting_tests(mut cmd: Command) -> Result<()> {
    use std::io::BufRead as _;
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().with_context(|| format!("running {cmd:?}"))?;
    let stdout = child.stdout.take().context("test output")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse::<u64>().ok()), words.next()) {
                    match what {
                        "passed" => passed += n,
                        "failed" => failed += n,
                        "ignored" => ignored += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let st = child.wait()?;
    // The plain closing line CI systems read: "N passed, N failed[, N skipped]".
    if ignored > 0 {
        println!("\nxtask: {passed} passed, {failed} failed, {ignored} skipped");
    } else {
        println!("\nxtask: {passed} passed, {failed} failed");
    }
    if !st.success() || failed > 0 {
        bail!("tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn bench(args: &[String]) -> Result<()> {
    status(cargo().args(["build", "--release", "-p", "gateway", "--bins"]))?;
    let bin = workspace_root().join("target/release/gateway");
    status(cargo().args(["bench", "-p", "gateway-benches"]).args(args).env("GATEWAY_BIN", bin))
}
