//! `cargo xtask package`: the Debian package, and the cached Debian root the
//! packaging test installs it into.
//!
//! Two packages come out: `ci-gateway` (the stripped binary, the systemd
//! unit, the default configuration as a conffile, the docs, the maintainer
//! scripts in `deploy/debian/`) and `ci-gateway-dbgsym` (the debug info split
//! off with `objcopy --only-keep-debug`, found by gdb through the binary's
//! `.gnu_debuglink`). `Depends` is computed by `dpkg-shlibdeps` from the
//! binary's shared libraries (libhyperscan5 among them), never hand-kept.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use super::{cache_dir, cargo, output, status};

/// The package name.
pub const NAME: &str = "ci-gateway";
/// Debian release the packaging test's root is made from (this host's).
pub const SUITE: &str = "bookworm";
/// Where debootstrap fetches Debian's packages.
pub const MIRROR: &str = "http://deb.debian.org/debian";

/// How to build the package.
pub struct Options {
    /// A gateway binary to package as it is (the test packages the debug
    /// build); `None` builds the release binary.
    pub binary: Option<PathBuf>,
    /// Where the .deb files go.
    pub out: PathBuf,
    /// gzip -1 instead of xz (the test's packages are thrown away).
    pub fast: bool,
}

/// Builds both packages, prints their paths and returns the main one's.
pub fn build(root: &Path, opts: &Options) -> Result<PathBuf> {
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => {
            status(cargo().args(["build", "--release", "-p", "gateway", "--bins"]))?;
            root.join("target/release/gateway")
        }
    };
    let version = output(Command::new(&binary).arg("--version"))?
        .split_whitespace()
        .nth(1)
        .context("`gateway --version` printed no version")?
        .to_owned();
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?.trim().to_owned();
    let work = opts.out.join("work");
    let _ = fs::remove_dir_all(&work);
    let pkg = work.join(NAME);
    let dbg = work.join(format!("{NAME}-dbgsym"));

    // The binary: debug info split off, then stripped with a link to it.
    let bin_dir = pkg.join("usr/bin");
    let dbg_dir = dbg.join("usr/lib/debug/usr/bin");
    mkdirs(&[&bin_dir, &dbg_dir])?;
    let debug_file = dbg_dir.join("gateway.debug");
    status(
        Command::new("objcopy").arg("--only-keep-debug").arg("--compress-debug-sections").arg(&binary).arg(&debug_file),
    )?;
    fs::set_permissions(&debug_file, fs::Permissions::from_mode(0o644))?;
    let stripped = bin_dir.join("gateway");
    status(
        Command::new("objcopy")
            .args(["--strip-debug", "--strip-unneeded"])
            .arg(format!("--add-gnu-debuglink={}", debug_file.display()))
            .arg(&binary)
            .arg(&stripped),
    )?;
    fs::set_permissions(&stripped, fs::Permissions::from_mode(0o755))?;

    // Unit, configuration, docs.
    let deploy = root.join("deploy");
    let unit_dir = pkg.join("lib/systemd/system");
    let etc = pkg.join("etc/ci-gateway");
    let doc = pkg.join(format!("usr/share/doc/{NAME}"));
    let examples = doc.join("examples");
    mkdirs(&[&unit_dir, &etc, &examples])?;
    copy(&deploy.join("ci-gateway.service"), &unit_dir.join("ci-gateway.service"))?;
    copy(&deploy.join("debian/gateway.yaml"), &etc.join("gateway.yaml"))?;
    for md in ["README.md", "CHANGELOG.md"] {
        copy(&root.join(md), &doc.join(md))?;
    }
    for entry in fs::read_dir(root.join("docs"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "md") {
            copy(&path, &doc.join(path.file_name().context("file name")?))?;
        }
    }
    for entry in fs::read_dir(deploy.join("examples"))? {
        let path = entry?.path();
        copy(&path, &examples.join(path.file_name().context("file name")?))?;
    }
    copy(&deploy.join("gateway.yaml"), &examples.join("gateway-runner.yaml"))?;
    fs::write(doc.join("copyright"), COPYRIGHT)?;

    // Control files.
    let control_dir = pkg.join("DEBIAN");
    let dbg_control_dir = dbg.join("DEBIAN");
    mkdirs(&[&control_dir, &dbg_control_dir])?;
    let depends = shlib_depends(&work, &stripped)?;
    let installed_kb = du_kb(&pkg)?;
    fs::write(
        control_dir.join("control"),
        format!(
            "Package: {NAME}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: CI Gateway maintainers <ci-gateway@localhost>\n\
             Installed-Size: {installed_kb}\nDepends: {depends}\nRecommends: ca-certificates\nSection: net\nPriority: optional\n\
             Description: transparent interception gateway for shared CI runner hosts\n \
             eBPF programs redirect CI jobs' connections into a local proxy that attributes\n \
             the process, detects hard-coded keys, applies policy and records sessions.\n"
        ),
    )?;
    fs::write(control_dir.join("conffiles"), "/etc/ci-gateway/gateway.yaml\n")?;
    for script in ["postinst", "prerm", "postrm"] {
        let target = control_dir.join(script);
        copy(&deploy.join("debian").join(script), &target)?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
    }
    let dbg_kb = du_kb(&dbg)?;
    fs::write(
        dbg_control_dir.join("control"),
        format!(
            "Package: {NAME}-dbgsym\nVersion: {version}\nArchitecture: {arch}\nMaintainer: CI Gateway maintainers <ci-gateway@localhost>\n\
             Installed-Size: {dbg_kb}\nDepends: {NAME} (= {version})\nSection: debug\nPriority: optional\n\
             Description: debug symbols for {NAME}\n"
        ),
    )?;

    fs::create_dir_all(&opts.out)?;
    let compress: &[&str] = if opts.fast { &["-Zgzip", "-z1"] } else { &["-Zxz"] };
    let deb = opts.out.join(format!("{NAME}_{version}_{arch}.deb"));
    let dbgsym = opts.out.join(format!("{NAME}-dbgsym_{version}_{arch}.deb"));
    for (dir, file) in [(&pkg, &deb), (&dbg, &dbgsym)] {
        status(Command::new("dpkg-deb").args(compress).args(["--root-owner-group", "--build"]).arg(dir).arg(file))?;
    }
    fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    println!("{}\n{}", deb.display(), dbgsym.display());
    Ok(deb)
}

const COPYRIGHT: &str = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
Upstream-Name: ci-gateway\n\nFiles: *\nLicense: Apache-2.0\n \
On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.\n";

/// `Depends` from the binary's shared libraries, by `dpkg-shlibdeps` (which
/// wants a `debian/control` in its working directory).
fn shlib_depends(work: &Path, binary: &Path) -> Result<String> {
    let debian = work.join("shlibdeps/debian");
    fs::create_dir_all(&debian)?;
    fs::write(debian.join("control"), format!("Source: {NAME}\n\nPackage: {NAME}\nArchitecture: any\n"))?;
    let out = output(Command::new("dpkg-shlibdeps").arg("-O").arg(binary).current_dir(work.join("shlibdeps")))?;
    fs::remove_dir_all(work.join("shlibdeps"))?;
    let depends = out
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps printed no shlibs:Depends")?
        .trim()
        .to_owned();
    if !depends.contains("libhyperscan") {
        bail!("dpkg-shlibdeps found no Hyperscan library in {}: {depends}", binary.display());
    }
    Ok(depends)
}

fn du_kb(dir: &Path) -> Result<u64> {
    let out = output(Command::new("du").args(["-sk", "--exclude=DEBIAN"]).arg(dir))?;
    out.split_whitespace().next().and_then(|n| n.parse().ok()).context("du printed no size")
}

fn mkdirs(dirs: &[&Path]) -> Result<()> {
    for dir in dirs {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// A Debian root made by `debootstrap` (minbase plus `include`), cached as
/// a tarball below [`cache_dir`]: made once from Debian's mirror, then
/// unpacked in seconds by every user.
#[derive(Clone, Copy)]
pub struct DebianRoot {
    /// Names the tarball.
    pub name: &'static str,
    /// Packages added to minbase.
    pub include: &'static str,
}

/// The clean Debian root the packaging test installs into and the gateway
/// image is made from: minbase plus the runtime libraries the package
/// depends on, so `dpkg -i` resolves offline.
pub const MINBASE: DebianRoot = DebianRoot { name: "minbase", include: "libhyperscan5,ca-certificates" };

/// The quick start's second image (`ci-gateway-demo`): the job (curl), the
/// stand-in backend (python3's http.server with TLS) and the one-shot that
/// makes the demo's certificates (openssl).
pub const DEMO: DebianRoot = DebianRoot { name: "demo", include: "ca-certificates,curl,python3,openssl" };

impl DebianRoot {
    /// Where the tarball is cached.
    pub fn tarball(self) -> PathBuf {
        cache_dir().join(format!("debian-{SUITE}-{}.tar.gz", self.name))
    }

    /// Makes [`DebianRoot::tarball`] when it is missing.
    pub fn ensure(self) -> Result<PathBuf> {
        let tarball = self.tarball();
        if tarball.exists() {
            return Ok(tarball);
        }
        let dir = cache_dir().join(format!("debian-{SUITE}-{}.tmp", self.name));
        let _ = fs::remove_dir_all(&dir);
        eprintln!("xtask: making a Debian {SUITE} root ({}) with debootstrap from {MIRROR} (once)", self.name);
        status(
            Command::new("debootstrap")
                .arg("--variant=minbase")
                .arg(format!("--include={}", self.include))
                .arg(SUITE)
                .arg(&dir)
                .arg(MIRROR),
        )
        .context("debootstrap failed: is the Debian mirror reachable?")?;
        // Downloaded packages and package lists are not part of a clean root.
        status(Command::new("find").arg(dir.join("var/cache/apt/archives")).args(["-name", "*.deb", "-delete"]))?;
        let partial = tarball.with_extension("partial");
        status(Command::new("tar").arg("-C").arg(&dir).arg("-czf").arg(&partial).arg("."))?;
        fs::rename(&partial, &tarball)?;
        fs::remove_dir_all(&dir)?;
        Ok(tarball)
    }
}

/// Makes the packaging test's root ([`MINBASE`]) when it is missing.
pub fn debootstrap_cache() -> Result<()> {
    MINBASE.ensure().map(|_| ())
}
