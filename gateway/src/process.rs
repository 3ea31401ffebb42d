//! Attribution: the process behind an intercepted connection, from the
//! eBPF record captured at connect() and /proc read at accept time.

use std::path::PathBuf;

use gateway_common::ConnRecord;
use serde::Serialize;

use crate::identity::{parse_container, ContainerRef};

/// The process that opened an intercepted connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessInfo {
    /// Process id (tgid).
    pub pid: u32,
    /// Thread that called connect().
    pub tid: u32,
    /// Real uid.
    pub uid: u32,
    /// Real gid.
    pub gid: u32,
    /// `comm` at connect() time.
    pub comm: String,
    /// Executable, read from /proc at accept time; `None` when the process
    /// had already exited (never guessed).
    pub exe: Option<PathBuf>,
    /// cgroup v2 path (`/a/b`), from /proc at accept time.
    pub cgroup: Option<String>,
    /// cgroup id at connect() time.
    pub cgroup_id: u64,
    /// The container the process runs in: id from the cgroup path, name
    /// and image when the runtime confirmed them.
    pub container: Option<ContainerRef>,
    /// Network namespace cookie of the socket.
    pub netns_cookie: u64,
    /// CLOCK_MONOTONIC nanoseconds at connect().
    pub connect_ns: u64,
}

impl ProcessInfo {
    /// Builds the attribution of a record, reading what /proc still shows.
    pub fn from_record(record: &ConnRecord) -> ProcessInfo {
        let pid = record.tgid;
        let cgroup = crate::intercept::cgroup::cgroup_of(pid);
        // The path alone: the runtime is asked only for attested processes.
        let container = cgroup.as_deref().and_then(parse_container);
        Self::with(record, std::fs::read_link(format!("/proc/{pid}/exe")).ok(), cgroup, container)
    }

    /// Builds the attribution from what attestation already read from /proc
    /// (so the per-connection path reads it once).
    pub fn from_attested(record: &ConnRecord, attested: &crate::identity::Attested) -> ProcessInfo {
        Self::with(record, Some(PathBuf::from(&attested.exe.path)), attested.cgroup.clone(), attested.container.clone())
    }

    fn with(
        record: &ConnRecord,
        exe: Option<PathBuf>,
        cgroup: Option<String>,
        container: Option<ContainerRef>,
    ) -> ProcessInfo {
        let comm_len = record.comm.iter().position(|&b| b == 0).unwrap_or(record.comm.len());
        ProcessInfo {
            pid: record.tgid,
            tid: record.pid,
            uid: record.uid,
            gid: record.gid,
            comm: String::from_utf8_lossy(&record.comm[..comm_len]).into_owned(),
            exe,
            cgroup,
            cgroup_id: record.cgroup_id,
            container,
            netns_cookie: record.netns_cookie,
            connect_ns: record.ts_ns,
        }
    }
}
