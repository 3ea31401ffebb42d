//! Minimal, allocation-conscious readers for `/proc/<pid>`.
//!
//! Every read goes through one directory fd opened once per attestation: once
//! a pid is reused, reads through the old fd fail with `ESRCH` instead of
//! silently returning the new process's data, so everything we collect
//! belongs to the same process.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read as _;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStringExt;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode};

/// Why a /proc read failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcError {
    /// The process no longer exists (or its pid now names another process).
    #[error("process {0} has exited")]
    Gone(u32),
    /// Any other failure, with the file that failed.
    #[error("reading /proc/{pid}/{file}: {errno}")]
    Io {
        /// Process id.
        pid: u32,
        /// File under `/proc/<pid>`.
        file: String,
        /// The error.
        errno: Errno,
    },
    /// The file's contents could not be parsed.
    #[error("malformed /proc/{pid}/{file}")]
    Malformed {
        /// Process id.
        pid: u32,
        /// File under `/proc/<pid>`.
        file: &'static str,
    },
}

/// The fields of `/proc/<pid>/stat` attestation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Field 3: `R`, `S`, `Z`, ...
    pub state: u8,
    /// Field 4.
    pub ppid: u32,
    /// Field 22: start time in clock ticks since boot (CLOCK_BOOTTIME based).
    pub start_ticks: u64,
}

/// An open `/proc/<pid>` directory.
pub struct ProcDir {
    fd: OwnedFd,
    pid: u32,
}

impl ProcDir {
    /// Opens `/proc/<pid>`; a missing directory means the process is gone.
    pub fn open(pid: u32) -> Result<ProcDir, ProcError> {
        let path = format!("/proc/{pid}");
        match nix::fcntl::open(path.as_str(), OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()) {
            Ok(fd) => Ok(ProcDir { fd, pid }),
            Err(e) => Err(map_err(pid, "", e)),
        }
    }

    /// The pid this directory describes.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Reads at most `limit` bytes of a file into `buf` (cleared first).
    pub fn read_into(&self, file: &str, buf: &mut Vec<u8>, limit: usize) -> Result<(), ProcError> {
        buf.clear();
        let fd = nix::fcntl::openat(&self.fd, file, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| map_err(self.pid, file, e))?;
        read_bounded(File::from(fd), buf, limit).map_err(|e| map_err(self.pid, file, e))
    }

    /// `readlink` of an entry (`exe`, `cwd`).
    pub fn readlink(&self, file: &str) -> Result<String, ProcError> {
        let target: OsString = nix::fcntl::readlinkat(&self.fd, file).map_err(|e| map_err(self.pid, file, e))?;
        Ok(String::from_utf8_lossy(&target.into_vec()).into_owned())
    }

    /// `stat` of what an entry points to (the executable itself for `exe`,
    /// even when it was deleted or lives in another mount namespace).
    pub fn stat_target(&self, file: &str) -> Result<FileStat, ProcError> {
        nix::sys::stat::fstatat(&self.fd, file, AtFlags::empty()).map_err(|e| map_err(self.pid, file, e))
    }

    /// Opens what an entry points to for reading.
    pub fn open_target(&self, file: &str) -> Result<File, ProcError> {
        nix::fcntl::openat(&self.fd, file, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
            .map(File::from)
            .map_err(|e| map_err(self.pid, file, e))
    }

    /// Parses `stat`.
    pub fn stat(&self, buf: &mut Vec<u8>) -> Result<Stat, ProcError> {
        self.read_into("stat", buf, 4096)?;
        parse_stat(buf).ok_or(ProcError::Malformed { pid: self.pid, file: "stat" })
    }

    /// Owner uid and gid of `/proc/<pid>`: the effective ids of a dumpable
    /// process, root otherwise.
    pub fn owner(&self) -> Result<(u32, u32), ProcError> {
        let st = nix::sys::stat::fstat(&self.fd).map_err(|e| map_err(self.pid, "", e))?;
        Ok((st.st_uid, st.st_gid))
    }

    /// Real uid and gid from `status`.
    pub fn real_ids(&self, buf: &mut Vec<u8>) -> Result<(u32, u32), ProcError> {
        self.read_into("status", buf, 16 * 1024)?;
        parse_real_ids(buf).ok_or(ProcError::Malformed { pid: self.pid, file: "status" })
    }
}

/// Reads at most `limit` bytes (bounding memory for hostile processes with
/// huge command lines or environments). /proc files produce their whole
/// content per read when the buffer is large enough, so a short read is the
/// end: this saves the extra `read` returning 0 on the per-connection path.
fn read_bounded(mut f: File, buf: &mut Vec<u8>, limit: usize) -> Result<(), Errno> {
    loop {
        if buf.len() >= limit {
            return Ok(());
        }
        if buf.capacity() - buf.len() < 512 {
            buf.reserve((buf.capacity().max(4096)).min(limit - buf.len()));
        }
        let start = buf.len();
        let want = (buf.capacity() - start).min(limit - start);
        buf.resize(start + want, 0);
        match f.read(&mut buf[start..]) {
            Ok(n) => {
                buf.truncate(start + n);
                if n < want {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => buf.truncate(start),
            Err(e) => {
                buf.truncate(start);
                return Err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)));
            }
        }
    }
}

/// Reads `/proc/<pid>/stat` without opening the directory (three syscalls):
/// enough for ancestors, whose identity is re-checked by start time.
pub fn stat_of(pid: u32, buf: &mut Vec<u8>) -> Result<(Stat, String), ProcError> {
    buf.clear();
    let path = format!("/proc/{pid}/stat");
    let f =
        File::open(&path).map_err(|e| map_err(pid, "stat", Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))?;
    read_bounded(f, buf, 4096).map_err(|e| map_err(pid, "stat", e))?;
    let stat = parse_stat(buf).ok_or(ProcError::Malformed { pid, file: "stat" })?;
    Ok((stat, stat_comm(buf).unwrap_or_default()))
}

/// The name (`comm`) field of `stat` contents.
pub fn stat_comm(text: &[u8]) -> Option<String> {
    let open = text.iter().position(|&b| b == b'(')?;
    let close = text.iter().rposition(|&b| b == b')')?;
    Some(String::from_utf8_lossy(text.get(open + 1..close)?).into_owned())
}

fn map_err(pid: u32, file: &str, e: Errno) -> ProcError {
    match e {
        Errno::ESRCH | Errno::ENOENT => ProcError::Gone(pid),
        errno => ProcError::Io { pid, file: file.to_owned(), errno },
    }
}

/// Parses `/proc/<pid>/stat`. `comm` may contain spaces and parentheses, so
/// fields are counted from the last `)`.
pub fn parse_stat(text: &[u8]) -> Option<Stat> {
    let close = text.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(text.get(close + 1..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = *fields.next()?.as_bytes().first()?;
    let ppid = fields.next()?.parse().ok()?;
    // After ppid (field 4) come fields 5..=21; starttime is field 22.
    let start_ticks = fields.nth(17)?.parse().ok()?;
    Some(Stat { state, ppid, start_ticks })
}

/// Real uid and gid: the first number on the `Uid:` and `Gid:` lines.
pub fn parse_real_ids(text: &[u8]) -> Option<(u32, u32)> {
    let text = std::str::from_utf8(text).ok()?;
    let mut uid = None;
    let mut gid = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Uid:") {
            uid = v.split_ascii_whitespace().next()?.parse().ok();
        } else if let Some(v) = line.strip_prefix("Gid:") {
            gid = v.split_ascii_whitespace().next()?.parse().ok();
            break;
        }
    }
    Some((uid?, gid?))
}

/// The cgroup v2 path from `/proc/<pid>/cgroup` contents.
pub fn parse_cgroup(text: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(text).ok()?;
    text.lines().find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

/// Splits a NUL-separated buffer (cmdline) into strings.
pub fn split_nul(buf: &[u8]) -> Vec<String> {
    buf.split(|&b| b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

/// Overwrites a buffer that held secrets before it is freed or reused.
/// Volatile writes keep the compiler from eliding the wipe as a dead store.
pub fn wipe(buf: &mut Vec<u8>) {
    for b in buf.iter_mut() {
        // SAFETY: `b` is a valid, aligned, exclusive reference into the vector.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
    buf.clear();
}

fn clock_ns(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; both clock ids exist on every
    // kernel that can run the eBPF side.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// CLOCK_MONOTONIC now, in nanoseconds (the clock of `bpf_ktime_get_ns`).
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_BOOTTIME minus CLOCK_MONOTONIC, now: the time the host has spent
/// suspended. eBPF timestamps are monotonic, /proc start times are boottime
/// based, so this converts one into the other. Sampling monotonic on both
/// sides of the boottime read bounds the measurement error.
pub fn suspend_offset_ns() -> u64 {
    let m1 = clock_ns(libc::CLOCK_MONOTONIC);
    let b = clock_ns(libc::CLOCK_BOOTTIME);
    let m2 = clock_ns(libc::CLOCK_MONOTONIC);
    b.saturating_sub(m1 / 2 + m2 / 2)
}

/// Clock ticks per second of /proc times (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        // Every Linux ABI defines USER_HZ as 100.
        100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_hostile_comm() {
        let mut s = b"42 (a) b) (c) S 7 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 100".to_vec();
        s.extend_from_slice(b" 0 0 0\n");
        let st = parse_stat(&s).expect("parses");
        assert_eq!(st, Stat { state: b'S', ppid: 7, start_ticks: 123456 });
    }

    #[test]
    fn status_real_ids() {
        let s = b"Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t100\t0\t0\t0\n";
        assert_eq!(parse_real_ids(s), Some((1000, 100)));
    }

    #[test]
    fn wipe_zeroes() {
        let mut v = b"SECRET=x".to_vec();
        wipe(&mut v);
        assert!(v.is_empty());
    }
}
