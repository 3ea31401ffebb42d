//! The BPF file system that holds the gateway's pins.

use std::path::{Path, PathBuf};

use super::InterceptError;

/// Where bpffs is conventionally mounted.
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Makes sure `pin_dir` lies on a mounted bpffs, mounting one at
/// /sys/fs/bpf when that is where it should be and nothing is mounted there.
pub fn ensure_mounted(pin_dir: &Path) -> Result<(), InterceptError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| InterceptError::Io { what: "reading /proc/self/mountinfo".into(), source })?;
    if bpf_mounts(&info).iter().any(|m| pin_dir.starts_with(m)) {
        return Ok(());
    }
    if !pin_dir.starts_with(DEFAULT_BPFFS) {
        return Err(InterceptError::Pin {
            path: pin_dir.to_owned(),
            reason: "no bpf file system is mounted above this directory".into(),
        });
    }
    std::fs::create_dir_all(DEFAULT_BPFFS)
        .map_err(|source| InterceptError::Io { what: format!("creating {DEFAULT_BPFFS}"), source })?;
    nix::mount::mount(Some("bpf"), DEFAULT_BPFFS, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>).map_err(
        |e| InterceptError::Io { what: format!("mounting bpffs at {DEFAULT_BPFFS}"), source: std::io::Error::from(e) },
    )?;
    tracing::info!(path = DEFAULT_BPFFS, "mounted the bpf file system");
    Ok(())
}

fn bpf_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mount_point = pre.split(' ').nth(4)?;
            (post.split(' ').next()? == "bpf").then(|| PathBuf::from(mount_point))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_bpf_mounts() {
        let info = "50 23 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw\n41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(super::bpf_mounts(info), vec![std::path::PathBuf::from("/sys/fs/bpf")]);
    }
}
