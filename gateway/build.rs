//! Builds the eBPF object from `gateway-ebpf/` with nightly and bpf-linker,
//! and rebuilds it whenever anything under that directory changes, so the
//! gateway never embeds a stale object. `cargo xtask setup` installs what
//! this needs.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    // The fuzz targets' copy of the crate (feature `fuzzing`) never loads
    // the programs: an empty object spares that build a second eBPF build.
    if std::env::var_os("CARGO_FEATURE_FUZZING").is_some() {
        let out = std::env::var("OUT_DIR").context("OUT_DIR not set")?;
        std::fs::write(std::path::Path::new(&out).join("gateway-ebpf"), b"").context("writing the empty object")?;
        return Ok(());
    }
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../gateway-ebpf");
    let ebpf_dir =
        ebpf_dir.canonicalize().with_context(|| format!("eBPF crate not found at {}", ebpf_dir.display()))?;
    let root_dir = ebpf_dir.to_str().ok_or_else(|| anyhow!("non UTF-8 path {}", ebpf_dir.display()))?;
    if which_bpf_linker().is_none() {
        return Err(anyhow!(
            "bpf-linker is not on PATH: run `cargo xtask setup` (it installs bpf-linker, \
             nightly rust-src and the system packages the gateway needs)"
        ));
    }
    aya_build::build_ebpf(
        [aya_build::Package { name: "gateway-ebpf", root_dir, ..Default::default() }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF programs (gateway-ebpf) failed")
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("bpf-linker")).find(|p| p.is_file())
}
