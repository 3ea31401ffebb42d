//! The fuzz targets in `fuzz/`, built two ways.
//!
//! * [`long`] (`cargo xtask fuzz`): cargo-fuzz, release, every crate
//!   instrumented; for runs of minutes to hours.
//! * [`quick`] (`cargo xtask fuzz --quick`, and the fuzz step of `cargo
//!   xtask test`): a debug build in the test build's target directory. Only
//!   the gateway crate (its `fuzzing` feature gives it its own copy) and the
//!   targets are instrumented, by this binary acting as cargo's
//!   `RUSTC_WRAPPER` ([`as_rustc_wrapper`]); every other crate is the very
//!   artifact the test build made, so the step costs the gateway crate, the
//!   targets and libFuzzer, not the dependency tree in release
//!   (docs/reliability.md has the figures).
//!
//! Either way a crash, panic, leak or timeout fails with the reproducer's
//! path.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, output, status, workspace_root};

/// Seconds per target in `cargo xtask test`'s fuzz step.
pub const CI_SECONDS: u64 = 10;

/// Set in the environment of the quick build: tells this binary, started
/// by cargo as `xtask <rustc> <args>`, to act as the rustc wrapper.
const WRAPPER_ENV: &str = "XTASK_SANCOV_WRAPPER";

/// What cargo-fuzz passes to rustc for libFuzzer's coverage feedback
/// (`--sanitizer none`): 8-bit edge counters, the PC table, comparison
/// tracing, and `cfg(fuzzing)`. All stable `-C` options.
const SANCOV_FLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg",
    "fuzzing",
];

/// How cargo-fuzz builds the targets for long runs: no sanitizer (safe
/// Rust; ASan would double the build time on CI's two cores and the run's
/// cost per input), debug assertions on (overflow checks), release
/// optimisation.
const LONG_BUILD_FLAGS: &[&str] = &["--sanitizer", "none", "--debug-assertions", "--features", "run"];

/// When started by cargo as the rustc wrapper of the quick build: runs
/// rustc, adding [`SANCOV_FLAGS`] for the fuzz crate and the gateway's
/// fuzzing copy (not its build script), and returns its exit status.
pub fn as_rustc_wrapper() -> Option<ExitCode> {
    env::var_os(WRAPPER_ENV)?;
    let mut args = env::args_os().skip(1);
    let rustc = args.next()?;
    let args: Vec<_> = args.collect();
    let has = |s: &str| args.iter().any(|a| a == s);
    let package = env::var("CARGO_PKG_NAME").unwrap_or_default();
    let instrument = !has("build_script_build")
        && (package == "gateway-fuzz" || (package == "gateway" && has("feature=\"fuzzing\"")));
    let mut cmd = Command::new(rustc);
    cmd.args(&args);
    if instrument {
        cmd.args(SANCOV_FLAGS);
    }
    if package == "gateway-fuzz" {
        // Linked with every dependency's debug info, the fourteen targets
        // take over 8 GiB; a panic still names its file and line.
        cmd.arg("-Cstrip=debuginfo");
    }
    match cmd.status() {
        Ok(st) => Some(ExitCode::from(st.code().and_then(|c| u8::try_from(c).ok()).unwrap_or(1))),
        Err(e) => {
            eprintln!("xtask (rustc wrapper): running rustc: {e}");
            Some(ExitCode::FAILURE)
        }
    }
}

/// The fuzz targets: `fuzz/fuzz_targets/*.rs`.
fn targets() -> Result<Vec<String>> {
    let dir = workspace_root().join("fuzz/fuzz_targets");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                names.push(stem.to_owned());
            }
        }
    }
    names.sort();
    if names.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    Ok(names)
}

fn chosen(targets: &[String]) -> Result<Vec<String>> {
    let all = self::targets()?;
    if let Some(unknown) = targets.iter().find(|t| !all.contains(t)) {
        bail!("no fuzz target {unknown:?} (there are: {})", all.join(", "));
    }
    Ok(if targets.is_empty() { all } else { targets.to_vec() })
}

/// Where a target's inputs live: its corpus (seeds checked in, what runs
/// add ignored) and its reproducers.
fn dirs(target: &str) -> Result<(PathBuf, PathBuf)> {
    let root = workspace_root();
    let corpus = root.join("fuzz/corpus").join(target);
    let artifacts = root.join("fuzz/artifacts").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    std::fs::create_dir_all(&artifacts).with_context(|| format!("creating {}", artifacts.display()))?;
    Ok((corpus, artifacts))
}

/// libFuzzer's options for a bounded run writing reproducers to `artifacts`.
fn libfuzzer_args(seconds: u64, artifacts: &Path) -> Vec<String> {
    vec![
        format!("-max_total_time={seconds}"),
        "-timeout=10".to_owned(),
        "-rss_limit_mb=2048".to_owned(),
        format!("-artifact_prefix={}/", artifacts.display()),
    ]
}

fn new_entries(dir: &Path, before: &[PathBuf]) -> Result<Vec<String>> {
    Ok(dir_entries(dir)?.into_iter().filter(|p| !before.contains(p)).map(|p| p.display().to_string()).collect())
}

fn dir_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        out.push(entry?.path());
    }
    Ok(out)
}

/// cargo-fuzz (the long runs' runner), from crates.io.
fn cargo_fuzz() -> Result<()> {
    if output(Command::new("rustup").args(["run", "nightly", "cargo", "fuzz", "--version"])).is_ok() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz");
    status(cargo().args(["install", "cargo-fuzz", "--locked"]))
}

fn cargo_fuzz_cmd() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz"]).current_dir(workspace_root());
    cmd
}

/// Builds every fuzz target with cargo-fuzz (release), then runs each
/// (`targets`, or all) for `seconds` from its corpus, one after another.
pub fn long(seconds: u64, targets: &[String]) -> Result<()> {
    let chosen = chosen(targets)?;
    cargo_fuzz()?;
    let started = Instant::now();
    status(cargo_fuzz_cmd().arg("build").args(LONG_BUILD_FLAGS))?;
    println!("xtask: fuzz targets built in {:.0?}", started.elapsed());
    for target in &chosen {
        let (corpus, artifacts) = dirs(target)?;
        let before = dir_entries(&artifacts)?;
        let st = cargo_fuzz_cmd()
            .args(["run"])
            .args(LONG_BUILD_FLAGS)
            .arg(target)
            .arg(&corpus)
            .arg("--")
            .args(libfuzzer_args(seconds, &artifacts))
            .status()
            .with_context(|| format!("running fuzz target {target}"))?;
        if !st.success() {
            let new = new_entries(&artifacts, &before)?;
            bail!(
                "fuzz target {target} failed ({st}); reproducer: {}; rerun with \
                 `cargo +nightly fuzz run {} {target} <reproducer>`",
                if new.is_empty() { "none written".to_owned() } else { new.join(", ") },
                LONG_BUILD_FLAGS.join(" ")
            );
        }
    }
    println!("xtask: {} fuzz targets ran {seconds} s each, no crash ({:.0?} in all)", chosen.len(), started.elapsed());
    Ok(())
}

/// How one quick run ended.
struct Ran {
    target: String,
    /// libFuzzer's closing "Done N runs" count, if it got there.
    runs: Option<u64>,
    failure: Option<String>,
}

/// A copy of this binary for cargo to run as the rustc wrapper. Not the
/// binary itself: `cargo xtask test` builds the workspace, xtask included,
/// before this step, and a relinked target/debug/xtask leaves the running
/// one deleted (`current_exe()` then names `xtask (deleted)`). The kernel
/// still serves the running image as /proc/self/exe.
fn wrapper_copy() -> Result<PathBuf> {
    let dir = workspace_root().join("target/fuzz-wrapper");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let copy = dir.join("xtask-rustc-wrapper");
    // Replaced, not overwritten in place: a wrapper still running from an
    // earlier step keeps its own file.
    let _ = std::fs::remove_file(&copy);
    std::fs::copy("/proc/self/exe", &copy)
        .with_context(|| format!("copying the xtask binary to {}", copy.display()))?;
    Ok(copy)
}

/// The CI step: builds the targets in debug beside the test build (see the
/// module docs), then runs each (`targets`, or all) for `seconds`, as many
/// at once as there are cores. Fails on the first target that crashed,
/// naming the reproducer and the log.
pub fn quick(seconds: u64, targets: &[String]) -> Result<()> {
    let chosen = chosen(targets)?;
    let started = Instant::now();
    let wrapper = wrapper_copy()?;
    // The whole workspace but the gateway package is selected (only the
    // targets are built) so that features resolve as in the test build and
    // every dependency is the test build's artifact.
    let mut build = cargo();
    build.args(["build", "--workspace", "--exclude", "gateway", "--features", "gateway-fuzz/run"]);
    for target in &chosen {
        build.args(["--bin", target]);
    }
    status(build.env("RUSTC_WRAPPER", &wrapper).env(WRAPPER_ENV, "1"))?;
    let built = started.elapsed();
    println!("xtask: fuzz targets built (debug, instrumented) in {built:.0?}");
    let bin_dir = workspace_root().join("target/debug");
    let logs = workspace_root().join("target/fuzz-logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(chosen.len());
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(target) = chosen.get(i) else { break };
                let ran = run_one(&bin_dir.join(target), target, seconds, &logs);
                let ran =
                    ran.unwrap_or_else(|e| Ran { target: target.clone(), runs: None, failure: Some(format!("{e:#}")) });
                if let Ok(mut r) = results.lock() {
                    r.push(ran);
                }
            });
        }
    });
    let mut results = results.into_inner().map_err(|_| anyhow::anyhow!("a fuzz worker panicked"))?;
    results.sort_by(|a, b| a.target.cmp(&b.target));
    let mut failed = Vec::new();
    for r in &results {
        match &r.failure {
            None => println!("xtask: fuzz {:<14} {seconds} s, {} runs, no crash", r.target, r.runs.unwrap_or(0)),
            Some(why) => {
                println!("xtask: fuzz {:<14} FAILED: {why}", r.target);
                failed.push(r.target.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    println!(
        "xtask: {} fuzz targets ran {seconds} s each, no crash (build {built:.0?}, {:.0?} in all)",
        chosen.len(),
        started.elapsed()
    );
    Ok(())
}

/// Runs one quick target, its output to `logs/<target>.log`.
fn run_one(bin: &Path, target: &str, seconds: u64, logs: &Path) -> Result<Ran> {
    let (corpus, artifacts) = dirs(target)?;
    let before = dir_entries(&artifacts)?;
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let st = Command::new(bin)
        .arg(&corpus)
        .args(libfuzzer_args(seconds, &artifacts))
        .stdout(log.try_clone()?)
        .stderr(log)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let runs = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("Done ").and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()));
    let failure = (!st.success()).then(|| {
        let new = new_entries(&artifacts, &before).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        format!(
            "{st}; reproducer: {}; log: {}; rerun: `{} <reproducer>`\n{}",
            if new.is_empty() { "none written".to_owned() } else { new.join(", ") },
            log_path.display(),
            bin.display(),
            tail.join("\n")
        )
    });
    Ok(Ran { target: target.to_owned(), runs, failure })
}
