//! The BPF file system that holds the gateway's pins, and the two bpf(2)
//! object commands the gateway issues itself to pin a link it keeps.
//!
//! Why not aya: aya 0.14's `FdLink::pin` consumes the link (the descriptor
//! moves into the `PinnedLink`), `FdLink` exposes no descriptor (no `AsFd`,
//! no `try_clone`), and a failed `pin` drops it, detaching the link if that
//! was its last reference. To pin a link again after its bpffs was lost,
//! the gateway needs a descriptor of the link that no pin attempt can take
//! away: it opens its own (`BPF_LINK_GET_FD_BY_ID`, by the id aya reports)
//! and pins that (`BPF_OBJ_PIN`, which borrows the descriptor).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

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

/// Whether a bpf file system is mounted at or above `dir` now (after a
/// lazy unmount it is not, whatever the directory still holds).
pub fn is_mounted(dir: &Path) -> Result<bool, InterceptError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| InterceptError::Io { what: "reading /proc/self/mountinfo".into(), source })?;
    Ok(bpf_mounts(&info).iter().any(|m| dir.starts_with(m)))
}

/// `BPF_OBJ_PIN` (include/uapi/linux/bpf.h, `enum bpf_cmd`).
const BPF_OBJ_PIN: libc::c_long = 6;
/// `BPF_LINK_GET_FD_BY_ID`.
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// The `bpf_attr` member of the object commands (`BPF_OBJ_*`).
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// The `bpf_attr` member of the `*_GET_FD_BY_ID` commands.
#[repr(C)]
#[derive(Default)]
struct GetFdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// bpf(2) with `attr`; the kernel reads `size_of::<T>()` bytes of it and
/// takes the rest of its `bpf_attr` as zero.
fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised, repr(C) value of the size
    // passed, living across the call; the kernel reads (and for some
    // commands writes) only within that size.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as libc::c_uint) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A new descriptor of the link with kernel id `id` (held by this process,
/// so it cannot go away meanwhile).
pub(super) fn link_fd(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdAttr { id, ..GetFdAttr::default() };
    let fd = sys_bpf(BPF_LINK_GET_FD_BY_ID, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("bpf(2) returned an impossible descriptor"))?;
    // SAFETY: on success the command returns a new descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins the object behind `fd` at `path` (on a bpffs); `fd` stays open.
pub(super) fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let name = CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjAttr {
        pathname: name.as_ptr() as u64,
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        ..ObjAttr::default()
    };
    sys_bpf(BPF_OBJ_PIN, &mut attr).map(drop)
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
