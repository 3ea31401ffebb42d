//! cgroup v2: finding the mount, resolving and creating the intercepted
//! cgroups, moving processes into them.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::config::CgroupSpec;

/// Errors about cgroups; each names the cgroup and the reason.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 file system is mounted.
    #[error("no cgroup v2 file system is mounted (checked /proc/self/mountinfo): the gateway needs cgroup v2 (on hybrid hosts usually /sys/fs/cgroup/unified)")]
    NoCgroup2,
    /// The configured cgroup does not exist and may not be created.
    #[error("cgroup {0} does not exist (set `create: true` for it in intercept.cgroups to let the gateway create it)")]
    Missing(PathBuf),
    /// An I/O error on a cgroup path.
    #[error("cgroup {path}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error (permission denied without root, ...).
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.to_owned(), source }
}

/// Finds the cgroup2 mount point from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let info = fs::read_to_string(path).map_err(io_err(path))?;
    find_mount(&info, "cgroup2").ok_or(CgroupError::NoCgroup2)
}

/// Returns the mount point of the first mount of `fstype` in a mountinfo text.
pub(crate) fn find_mount(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`
        let (pre, post) = line.split_once(" - ")?;
        let mount_point = pre.split(' ').nth(4)?;
        (post.split(' ').next()? == fstype).then(|| PathBuf::from(unescape_mount(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A cgroup the gateway intercepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    /// Absolute path under the cgroup2 mount.
    pub dir: PathBuf,
    /// Path relative to the mount, as /proc/PID/cgroup shows it (`/a/b`).
    pub name: String,
    /// The cgroup id (the directory's inode number), as `bpf_get_current_cgroup_id` reports it.
    pub id: u64,
    /// Whether the gateway created it.
    pub created: bool,
}

impl Cgroup {
    /// Resolves a configured cgroup below `mount`, creating it when allowed.
    pub fn resolve(mount: &Path, spec: &CgroupSpec, create: bool) -> Result<Cgroup, CgroupError> {
        let rel = spec.path.strip_prefix("/").unwrap_or(&spec.path);
        let rel = rel.strip_prefix(mount.strip_prefix("/").unwrap_or(mount)).unwrap_or(rel);
        let dir = mount.join(rel);
        let mut created = false;
        if !dir.is_dir() {
            if !(spec.create && create) {
                return Err(CgroupError::Missing(dir));
            }
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            created = true;
        }
        let id = fs::metadata(&dir).map_err(io_err(&dir))?.ino();
        Ok(Cgroup { name: format!("/{}", rel.display()), dir, id, created })
    }

    /// Moves process `pid` into this cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        let procs = self.dir.join("cgroup.procs");
        let mut f = fs::OpenOptions::new().write(true).open(&procs).map_err(io_err(&procs))?;
        f.write_all(pid.to_string().as_bytes()).map_err(io_err(&procs))
    }

    /// Opens the cgroup directory (what program attachment takes).
    pub fn open(&self) -> Result<fs::File, CgroupError> {
        fs::File::open(&self.dir).map_err(io_err(&self.dir))
    }
}

/// The cgroup v2 path of a process (`/a/b`), from /proc/PID/cgroup.
pub fn cgroup_of(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

/// The paths (`/a/b`) of the cgroups with the given ids, found by walking
/// the cgroup2 tree below `mount` (ids that are not found are left out).
pub fn paths_of_ids(mount: &Path, ids: &[u64]) -> std::collections::HashMap<u64, String> {
    let mut found = std::collections::HashMap::new();
    let mut stack = vec![mount.to_owned()];
    while let Some(dir) = stack.pop() {
        if found.len() == ids.len() {
            break;
        }
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.filter_map(Result::ok) {
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_dir() {
                continue;
            }
            if ids.contains(&meta.ino()) {
                let rel = entry.path().strip_prefix(mount).map(|p| p.display().to_string()).unwrap_or_default();
                found.insert(meta.ino(), format!("/{rel}"));
            }
            stack.push(entry.path());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_hosts() {
        let info = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(find_mount(info, "cgroup2"), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(find_mount(info, "bpf"), None);
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_mount(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mount(r"/x\\"), r"/x\\");
    }
}
