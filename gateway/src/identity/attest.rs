//! Attestation: the verified attributes of the process behind a connection.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Read;
use std::sync::{Arc, Mutex};

use gateway_common::ConnRecord;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::container::{parse_container, ContainerRef};
use super::procfs::{self, ProcDir, ProcError};
use super::{effective_allowlist, AttestConfig};

/// Outcome of attesting a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Attestation {
    /// The process was found and verified to be the one that connected.
    Attested(Box<Attested>),
    /// Nothing about the process can be vouched for.
    Unattested {
        /// Why (shown in explain output and logs).
        reason: String,
    },
}

/// An executable as seen through `/proc/<pid>/exe`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExeInfo {
    /// Path in the process's mount namespace (without ` (deleted)`).
    pub path: String,
    /// SHA-256 of the mapped file's contents, lowercase hex. Empty for
    /// ancestors (only their paths are matched, and hashing every parent,
    /// such as a large runner agent, would cost more than it tells) and for
    /// files over [`MAX_HASH_BYTES`].
    pub sha256: String,
    /// The file and every directory above it are owned by root and not
    /// group/other writable, so a non-root job cannot have placed it there:
    /// only then does a path glob count as trustworthy evidence.
    pub root_owned: bool,
    /// The file was deleted (or replaced) after exec.
    pub deleted: bool,
}

/// One ancestor of the attested process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Ancestor {
    /// Its pid.
    pub pid: u32,
    /// Its executable; `None` for kernel threads or when unreadable.
    pub exe: Option<ExeInfo>,
    /// Its start time, clock ticks since boot (with the pid, names it for
    /// the life of the boot).
    pub start_ticks: u64,
}

/// Everything attestation established about a connecting process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Attested {
    /// Process id (tgid).
    pub pid: u32,
    /// Thread that called connect().
    pub tid: u32,
    /// Real uid (checked against /proc).
    pub uid: u32,
    /// Real gid (checked against /proc).
    pub gid: u32,
    /// Host user name of `uid`, if /etc/passwd has one.
    pub user: Option<String>,
    /// `comm` at connect() time (job-controlled).
    pub comm: String,
    /// The executable.
    pub exe: ExeInfo,
    /// Command line (job-controlled).
    pub cmdline: Vec<String>,
    /// Working directory (job-controlled).
    pub cwd: Option<String>,
    /// cgroup v2 path.
    pub cgroup: Option<String>,
    /// cgroup id at connect() time.
    pub cgroup_id: u64,
    /// Container implied by the cgroup path.
    pub container: Option<ContainerRef>,
    /// Allowlisted environment variables (job-controlled).
    pub env: BTreeMap<String, String>,
    /// Parent first, up to the configured depth.
    pub ancestors: Vec<Ancestor>,
    /// Start time, clock ticks since boot.
    pub start_ticks: u64,
    /// CLOCK_MONOTONIC nanoseconds at connect().
    pub connect_ns: u64,
}

/// Why attestation failed; rendered into [`Attestation::Unattested`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    /// The process exited before it could be examined.
    #[error("process {0} exited before attestation")]
    Exited(u32),
    /// The pid names a process that started after the connect.
    #[error("pid {pid} was reused: process started at {start_ns} ns after boot, connect at {connect_ns} ns")]
    PidReused {
        /// The pid.
        pid: u32,
        /// Process start, boottime ns.
        start_ns: u64,
        /// Connect, boottime ns.
        connect_ns: u64,
    },
    /// /proc shows other credentials than the kernel recorded at connect().
    #[error("pid {pid}: /proc shows uid {proc_uid} gid {proc_gid}, connect recorded uid {uid} gid {gid}")]
    CredentialMismatch {
        /// The pid.
        pid: u32,
        /// Recorded uid.
        uid: u32,
        /// Recorded gid.
        gid: u32,
        /// uid in /proc.
        proc_uid: u32,
        /// gid in /proc.
        proc_gid: u32,
    },
    /// The connecting thread's name changed since connect(): most likely an
    /// exec, after which /proc describes another program.
    #[error("pid {pid}: thread {tid} is now `{now}`, was `{then}` at connect (exec since?)")]
    CommChanged {
        /// The pid.
        pid: u32,
        /// The thread.
        tid: u32,
        /// comm at connect.
        then: String,
        /// comm now.
        now: String,
    },
    /// Any other /proc failure.
    #[error(transparent)]
    Proc(ProcError),
}

impl From<ProcError> for AttestError {
    fn from(e: ProcError) -> Self {
        match e {
            ProcError::Gone(pid) => AttestError::Exited(pid),
            e => AttestError::Proc(e),
        }
    }
}

/// Identity of an executable file's contents as far as the kernel tells:
/// ctime is included because, unlike mtime, a file owner cannot set it back
/// after rewriting the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ExeKey {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl ExeKey {
    fn of(st: &nix::sys::stat::FileStat) -> ExeKey {
        ExeKey {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        }
    }
}

#[derive(Debug)]
struct ExeDigest {
    /// `None` until someone needed the hash.
    sha256: Option<String>,
    root_owned: bool,
}

/// Executables larger than this are not hashed: a job could otherwise make
/// every one of its connections cost a multi-gigabyte hash. Their
/// `sha256` is empty, so `exe_sha256` selectors never match them.
pub const MAX_HASH_BYTES: u64 = 1 << 30;

/// Bounded FIFO cache: eviction order does not matter much because misses
/// only cost one hash of a binary.
struct ExeCache {
    map: HashMap<ExeKey, Arc<ExeDigest>>,
    order: VecDeque<ExeKey>,
    cap: usize,
}

impl ExeCache {
    fn get(&self, key: &ExeKey) -> Option<Arc<ExeDigest>> {
        self.map.get(key).cloned()
    }

    fn insert(&mut self, key: ExeKey, digest: Arc<ExeDigest>) {
        if self.cap == 0 {
            return;
        }
        if let Some(slot) = self.map.get_mut(&key) {
            // Upgrades an ancestor's hashless entry.
            *slot = digest;
            return;
        }
        while self.map.len() >= self.cap {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        self.map.insert(key, digest);
        self.order.push_back(key);
    }
}

/// (pid, start ticks): names one process for the life of the boot.
type AncestorKey = (u32, u64);

/// Which optional attributes an attestation collects. Every /proc read
/// costs a few microseconds on the per-connection path, so the proxy reads
/// only what the loaded mapping rules can use ([`IdentityResolver::needs`]);
/// `identity explain` reads everything.
///
/// [`IdentityResolver::needs`]: super::IdentityResolver::needs
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttestNeeds {
    /// The parent chain (for `parent_exe` / `ancestor_exe` selectors).
    pub ancestors: bool,
    /// Command line and working directory (shown by explain; no selector
    /// or template uses them).
    pub cmdline: bool,
}

impl AttestNeeds {
    /// Everything.
    pub const ALL: AttestNeeds = AttestNeeds { ancestors: true, cmdline: true };
}

/// cgroup ids are never reused while the host is up, so a path resolved
/// (and verified) once for an id stays right; the bound guards memory
/// against hosts creating cgroups endlessly.
const CGROUP_CACHE_CAP: usize = 16_384;

/// Attests connections. Cheap to share (`&self` everywhere).
pub struct Attestor {
    env_allowlist: Vec<String>,
    parent_depth: usize,
    tick_ns: u64,
    exe_cache: Mutex<ExeCache>,
    users: Mutex<HashMap<u32, Option<String>>>,
    ancestor_cache: Mutex<HashMap<AncestorKey, (String, Option<ExeInfo>)>>,
    cgroup_cache: Mutex<HashMap<u64, Arc<str>>>,
    cgroup_root: Option<std::path::PathBuf>,
}

impl Attestor {
    /// Builds an attestor from its configuration.
    pub fn new(config: &AttestConfig) -> Attestor {
        Attestor {
            env_allowlist: effective_allowlist(&config.env_allowlist),
            parent_depth: config.parent_depth,
            tick_ns: 1_000_000_000 / procfs::clock_ticks_per_sec().max(1),
            exe_cache: Mutex::new(ExeCache {
                map: HashMap::new(),
                order: VecDeque::new(),
                cap: config.exe_hash_cache_size,
            }),
            users: Mutex::new(HashMap::new()),
            ancestor_cache: Mutex::new(HashMap::new()),
            cgroup_cache: Mutex::new(HashMap::new()),
            cgroup_root: crate::intercept::cgroup::cgroup2_mount().ok(),
        }
    }

    /// Attests the process that made a connection, collecting everything.
    /// Never guesses: any doubt that /proc still describes the connecting
    /// process yields `Unattested`.
    pub fn attest(&self, record: &ConnRecord) -> Attestation {
        self.attest_with(record, AttestNeeds::ALL)
    }

    /// [`Attestor::attest`], collecting only the optional attributes in
    /// `needs` (the checks against pid reuse, credential change and exec
    /// are always made).
    pub fn attest_with(&self, record: &ConnRecord, needs: AttestNeeds) -> Attestation {
        match self.try_attest_with(record, needs) {
            Ok(a) => Attestation::Attested(Box::new(a)),
            Err(e) => Attestation::Unattested { reason: e.to_string() },
        }
    }

    /// Like [`Attestor::attest`], with the failure as a typed error.
    pub fn try_attest(&self, record: &ConnRecord) -> Result<Attested, AttestError> {
        self.try_attest_with(record, AttestNeeds::ALL)
    }

    /// Like [`Attestor::attest_with`], with the failure as a typed error.
    pub fn try_attest_with(&self, record: &ConnRecord, needs: AttestNeeds) -> Result<Attested, AttestError> {
        let pid = record.tgid;
        let dir = ProcDir::open(pid)?;
        // Large enough for a typical CI job's environment in one read.
        let mut buf = Vec::with_capacity(16 * 1024);

        let stat = dir.stat(&mut buf)?;
        if matches!(stat.state, b'Z' | b'X' | b'x') {
            return Err(AttestError::Exited(pid));
        }
        self.check_start_time(pid, stat.start_ticks, record.ts_ns)?;
        let comm = comm_of(record);
        // The main thread's name is in `stat` already: one file fewer.
        let stat_comm = (record.pid == record.tgid).then(|| procfs::stat_comm(&buf)).flatten();

        self.check_ids(&dir, record, &mut buf)?;
        match stat_comm {
            Some(now) if now == comm => {}
            Some(now) => {
                return Err(AttestError::CommChanged { pid, tid: record.pid, then: comm, now });
            }
            None => self.check_comm(&dir, record, &comm, &mut buf)?,
        }

        let exe = self.exe_info(&dir, true)?;

        let (cmdline, cwd) = if needs.cmdline {
            dir.read_into("cmdline", &mut buf, 64 * 1024)?;
            (procfs::split_nul(&buf), dir.readlink("cwd").ok())
        } else {
            (Vec::new(), None)
        };
        let cgroup = self.cgroup_path(&dir, record.cgroup_id, &mut buf)?;
        let container = cgroup.as_deref().and_then(parse_container);
        let env = self.read_env(&dir, &mut buf)?;
        let ancestors = if needs.ancestors { self.ancestors(stat.ppid, &mut buf) } else { Vec::new() };

        Ok(Attested {
            pid,
            tid: record.pid,
            uid: record.uid,
            gid: record.gid,
            user: self.user_name(record.uid),
            comm,
            exe,
            cmdline,
            cwd,
            cgroup: cgroup.map(|c| c.to_string()),
            cgroup_id: record.cgroup_id,
            container,
            env,
            ancestors,
            start_ticks: stat.start_ticks,
            connect_ns: record.ts_ns,
        })
    }

    /// The credential guard: /proc must show the real ids the kernel
    /// recorded at connect(). `/proc/<pid>` itself is owned by the effective
    /// ids (or root for non-dumpable processes); when those equal the
    /// recorded ones, as for nearly every job, one `fstat` replaces parsing
    /// `status`. Otherwise `status` decides.
    fn check_ids(&self, dir: &ProcDir, record: &ConnRecord, buf: &mut Vec<u8>) -> Result<(), AttestError> {
        if dir.owner().is_ok_and(|ids| ids == (record.uid, record.gid)) {
            return Ok(());
        }
        let (proc_uid, proc_gid) = dir.real_ids(buf)?;
        if proc_uid != record.uid || proc_gid != record.gid {
            return Err(AttestError::CredentialMismatch {
                pid: record.tgid,
                uid: record.uid,
                gid: record.gid,
                proc_uid,
                proc_gid,
            });
        }
        Ok(())
    }

    /// The cgroup the connection was made from. The eBPF record names it by
    /// id at connect() time; the path is read from /proc once per id and
    /// kept only after checking that it still names that id (a process
    /// that moved since connect() is described as it is now, uncached).
    fn cgroup_path(&self, dir: &ProcDir, cgroup_id: u64, buf: &mut Vec<u8>) -> Result<Option<Arc<str>>, AttestError> {
        if cgroup_id != 0 {
            if let Some(hit) = self.cgroup_cache.lock().ok().and_then(|c| c.get(&cgroup_id).cloned()) {
                return Ok(Some(hit));
            }
        }
        dir.read_into("cgroup", buf, 64 * 1024)?;
        let Some(path) = procfs::parse_cgroup(buf) else { return Ok(None) };
        let path: Arc<str> = Arc::from(path);
        let verified = cgroup_id != 0
            && self.cgroup_root.as_ref().is_some_and(|root| {
                let dir = root.join(path.trim_start_matches('/'));
                std::fs::metadata(dir).is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == cgroup_id)
            });
        if verified {
            if let Ok(mut c) = self.cgroup_cache.lock() {
                if c.len() >= CGROUP_CACHE_CAP {
                    c.clear();
                }
                c.insert(cgroup_id, path.clone());
            }
        }
        Ok(Some(path))
    }

    /// The pid-reuse guard: a process that started after the connect cannot
    /// have made it.
    fn check_start_time(&self, pid: u32, start_ticks: u64, connect_mono_ns: u64) -> Result<(), AttestError> {
        let start_ns = start_ticks.saturating_mul(self.tick_ns);
        let connect_ns = connect_mono_ns.saturating_add(procfs::suspend_offset_ns());
        // /proc truncates start times to a tick and the clock offset is
        // sampled, so one tick of slack avoids rejecting genuine processes.
        if start_ns > connect_ns.saturating_add(self.tick_ns) {
            return Err(AttestError::PidReused { pid, start_ns, connect_ns });
        }
        Ok(())
    }

    /// Detects an exec between connect() and now when the connecting thread
    /// still exists: exec renames it after the new program.
    fn check_comm(&self, dir: &ProcDir, record: &ConnRecord, comm: &str, buf: &mut Vec<u8>) -> Result<(), AttestError> {
        let file = if record.pid == record.tgid || record.pid == 0 {
            "comm".to_owned()
        } else {
            format!("task/{}/comm", record.pid)
        };
        match dir.read_into(&file, buf, 64) {
            Ok(()) => {
                let now = String::from_utf8_lossy(buf.strip_suffix(b"\n").unwrap_or(buf));
                if now != comm {
                    return Err(AttestError::CommChanged {
                        pid: record.tgid,
                        tid: record.pid,
                        then: comm.to_owned(),
                        now: now.into_owned(),
                    });
                }
                Ok(())
            }
            // The thread alone may have exited; the process is still checked.
            Err(ProcError::Gone(_)) if file != "comm" => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn exe_info(&self, dir: &ProcDir, want_hash: bool) -> Result<ExeInfo, AttestError> {
        let link = dir.readlink("exe")?;
        let (path, deleted) = match link.strip_suffix(" (deleted)") {
            Some(p) => (p.to_owned(), true),
            None => (link, false),
        };
        let key = ExeKey::of(&dir.stat_target("exe")?);
        let cached = self.exe_cache.lock().ok().and_then(|c| c.get(&key));
        let digest = match cached {
            Some(d) if d.sha256.is_some() || !want_hash => d,
            _ => {
                let (key, digest) = examine_exe(dir, &path, deleted, want_hash)?;
                let digest = Arc::new(digest);
                if let Ok(mut c) = self.exe_cache.lock() {
                    c.insert(key, digest.clone());
                }
                digest
            }
        };
        let sha256 = if want_hash { digest.sha256.clone().unwrap_or_default() } else { String::new() };
        Ok(ExeInfo { path, sha256, root_owned: digest.root_owned && !deleted, deleted })
    }

    fn read_env(&self, dir: &ProcDir, buf: &mut Vec<u8>) -> Result<BTreeMap<String, String>, AttestError> {
        let read = dir.read_into("environ", buf, 4 * 1024 * 1024);
        let env = read.map(|()| filter_env(buf, &self.env_allowlist));
        // The buffer held the job's whole environment, secrets included.
        procfs::wipe(buf);
        Ok(env?)
    }

    /// Ancestors are long-lived (runner agent, shell), so their executable
    /// is remembered per (pid, start time); the name in `stat` must also be
    /// unchanged, as an exec renames the process.
    fn ancestors(&self, mut ppid: u32, buf: &mut Vec<u8>) -> Vec<Ancestor> {
        let mut out = Vec::with_capacity(self.parent_depth);
        while out.len() < self.parent_depth && ppid != 0 {
            let Ok((stat, comm)) = procfs::stat_of(ppid, buf) else { break };
            let key = (ppid, stat.start_ticks);
            let cached = self
                .ancestor_cache
                .lock()
                .ok()
                .and_then(|c| c.get(&key).filter(|(n, _)| *n == comm).map(|(_, e)| e.clone()));
            let exe = match cached {
                Some(exe) => exe,
                None => {
                    let exe = ProcDir::open(ppid).ok().and_then(|dir| self.exe_info(&dir, false).ok());
                    if let Ok(mut c) = self.ancestor_cache.lock() {
                        // Crude bound: ancestors are few, a full reset is rare and cheap.
                        if c.len() >= 4096 {
                            c.clear();
                        }
                        c.insert(key, (comm, exe.clone()));
                    }
                    exe
                }
            };
            out.push(Ancestor { pid: ppid, exe, start_ticks: stat.start_ticks });
            ppid = stat.ppid;
        }
        out
    }

    /// The parent chain of `pid` as (pid, start ticks), as far as
    /// [`Attestor::ancestors`] would walk it, reading only `stat` files.
    pub(super) fn lineage(&self, pid: u32) -> Vec<(u32, u64)> {
        let mut buf = Vec::with_capacity(1024);
        let mut out = Vec::with_capacity(self.parent_depth);
        let Ok((stat, _)) = procfs::stat_of(pid, &mut buf) else { return out };
        let mut ppid = stat.ppid;
        while out.len() < self.parent_depth && ppid != 0 {
            let Ok((stat, _)) = procfs::stat_of(ppid, &mut buf) else { break };
            out.push((ppid, stat.start_ticks));
            ppid = stat.ppid;
        }
        out
    }

    fn user_name(&self, uid: u32) -> Option<String> {
        if let Some(hit) = self.users.lock().ok().and_then(|m| m.get(&uid).cloned()) {
            return hit;
        }
        let name = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten().map(|u| u.name);
        if let Ok(mut m) = self.users.lock() {
            // Uids on a runner host are few; the bound only guards against abuse.
            if m.len() < 65_536 {
                m.insert(uid, name.clone());
            }
        }
        name
    }
}

/// Hashes the executable (if `want_hash`) through the process's own `exe`
/// link so the digest is of the file actually mapped (also across mount
/// namespaces), and takes the cache key from the same open file.
fn examine_exe(dir: &ProcDir, path: &str, deleted: bool, want_hash: bool) -> Result<(ExeKey, ExeDigest), AttestError> {
    let mut file = dir.open_target("exe")?;
    let st =
        nix::sys::stat::fstat(&file).map_err(|errno| ProcError::Io { pid: dir.pid(), file: "exe".into(), errno })?;
    let file_safe = st.st_uid == 0 && st.st_mode & 0o022 == 0;
    let root_owned = file_safe && !deleted && dirs_root_owned(dir, path);
    let sha256 = if want_hash && (st.st_size as u64) <= MAX_HASH_BYTES {
        Some(hash_file(dir, &mut file)?)
    } else {
        want_hash.then(String::new)
    };
    Ok((ExeKey::of(&st), ExeDigest { sha256, root_owned }))
}

fn hash_file(dir: &ProcDir, file: &mut std::fs::File) -> Result<String, AttestError> {
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut chunk).map_err(|e| ProcError::Io {
            pid: dir.pid(),
            file: "exe".into(),
            errno: nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&chunk[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Every directory above `path`, seen from the process's root, is owned by
/// root and not writable by group or others (sticky world-writable dirs such
/// as /tmp included: anyone may create files there).
fn dirs_root_owned(dir: &ProcDir, path: &str) -> bool {
    let mut p = std::path::Path::new(path);
    while let Some(parent) = p.parent() {
        let rel = format!("root{}", parent.display());
        match dir.stat_target(&rel) {
            Ok(st) if st.st_uid == 0 && st.st_mode & 0o022 == 0 => {}
            _ => return false,
        }
        p = parent;
    }
    true
}

/// Keeps allowlisted, UTF-8, unambiguous variables. A name present twice
/// with different values is dropped: libc's getenv returns the first, other
/// runtimes the last, so neither value can be trusted to be the one used.
fn filter_env(buf: &[u8], allow: &[String]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let mut ambiguous: Vec<String> = Vec::new();
    for entry in buf.split(|&b| b == 0) {
        let Some(eq) = entry.iter().position(|&b| b == b'=') else { continue };
        let Ok(name) = std::str::from_utf8(&entry[..eq]) else { continue };
        if allow.binary_search_by(|a| a.as_str().cmp(name)).is_err() {
            continue;
        }
        let Ok(value) = std::str::from_utf8(&entry[eq + 1..]) else { continue };
        match env.get(name) {
            Some(prev) if prev != value => ambiguous.push(name.to_owned()),
            Some(_) => {}
            None => {
                env.insert(name.to_owned(), value.to_owned());
            }
        }
    }
    for name in ambiguous {
        env.remove(&name);
    }
    env
}

pub(super) fn comm_of(record: &ConnRecord) -> String {
    let len = record.comm.iter().position(|&b| b == 0).unwrap_or(record.comm.len());
    String::from_utf8_lossy(&record.comm[..len]).into_owned()
}

/// A record as if `pid` connected now, for attesting a live process from the
/// command line (explain). Credentials and comm come from /proc.
pub fn record_for_live_pid(pid: u32) -> Result<ConnRecord, AttestError> {
    let dir = ProcDir::open(pid)?;
    let mut buf = Vec::new();
    let (uid, gid) = dir.real_ids(&mut buf)?;
    dir.read_into("comm", &mut buf, 64)?;
    let mut comm = [0u8; gateway_common::COMM_LEN];
    let name = buf.strip_suffix(b"\n").unwrap_or(&buf);
    let n = name.len().min(gateway_common::COMM_LEN - 1);
    comm[..n].copy_from_slice(&name[..n]);
    // What connect() would have recorded: the id (inode) of its cgroup.
    dir.read_into("cgroup", &mut buf, 64 * 1024)?;
    let cgroup_id = procfs::parse_cgroup(&buf)
        .zip(crate::intercept::cgroup::cgroup2_mount().ok())
        .and_then(|(path, root)| std::fs::metadata(root.join(path.trim_start_matches('/'))).ok())
        .map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m));
    Ok(ConnRecord {
        orig_addr: [0; 4],
        orig_port: 0,
        orig_family: 0,
        tgid: pid,
        pid,
        uid,
        gid,
        capture: 0,
        cgroup_id,
        netns_cookie: 0,
        ts_ns: procfs::monotonic_ns(),
        comm,
    })
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn env_filter_keeps_only_allowlisted_and_unambiguous() {
        let allow = effective_allowlist(&["EXTRA".into()]);
        let buf = b"AWS_SECRET_ACCESS_KEY=x\0GITHUB_REPOSITORY=a/b\0EXTRA=1\0GITHUB_REF=r1\0GITHUB_REF=r2\0GITHUB_JOB=j\0GITHUB_JOB=j\0";
        let env = filter_env(buf, &allow);
        let keys: Vec<&str> = env.keys().map(String::as_str).collect();
        assert_eq!(keys, ["EXTRA", "GITHUB_JOB", "GITHUB_REPOSITORY"]);
    }

    #[test]
    fn cache_is_bounded() {
        let mut c = ExeCache { map: HashMap::new(), order: VecDeque::new(), cap: 2 };
        for ino in 0..5 {
            let key = ExeKey { dev: 1, ino, size: 0, mtime: (0, 0), ctime: (0, 0) };
            c.insert(key, Arc::new(ExeDigest { sha256: None, root_owned: false }));
        }
        assert_eq!(c.map.len(), 2);
        assert!(c.get(&ExeKey { dev: 1, ino: 4, size: 0, mtime: (0, 0), ctime: (0, 0) }).is_some());
    }
}
