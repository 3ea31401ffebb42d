//! Attribution: the process behind an intercepted connection, from the
//! eBPF record captured at connect() and /proc read at accept time
//! ([`ProcessInfo`]), and the one serializable form of it that session
//! recordings, findings and approval requests keep ([`ProcessSnapshot`]).

use std::{collections::BTreeMap, path::PathBuf};

use gateway_common::ConnRecord;
use serde::{Deserialize, Serialize};

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

impl ProcessInfo {
    /// What recordings, findings and approvals keep of this process, with
    /// the CI job variables `job`.
    pub fn snapshot(&self, job: BTreeMap<String, String>) -> ProcessSnapshot {
        ProcessSnapshot {
            cgroup: self.cgroup.clone(),
            comm: self.comm.clone(),
            container: self.container.clone(),
            exe: self.exe.as_ref().map(|e| e.to_string_lossy().into_owned()),
            gid: Some(self.gid),
            job,
            pid: self.pid,
            uid: self.uid,
        }
    }
}

/// The process behind a connection as the gateway keeps it: in a session's
/// start record, in findings (and their exports) and in approval requests.
///
/// Fields are in sorted order: the recorder serializes it as canonical JSON
/// directly, so the bytes (and hashes) of start records are what they were
/// when this was the recorder's own type. Optional parts a store does not
/// keep (findings keep no gid) are left out of the JSON rather than made up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSnapshot {
    /// cgroup v2 path.
    pub cgroup: Option<String>,
    /// `comm` at connect() time.
    pub comm: String,
    /// The container the process ran in: id, runtime, and name and image
    /// when the runtime confirmed them (absent for host processes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerRef>,
    /// Executable path; `None` when the process exited before it was read.
    pub exe: Option<String>,
    /// Real gid; `None` where it is not kept (findings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Identifying CI job variables (`CI_JOB_ID`, `GITHUB_REPOSITORY`...);
    /// stores redact the value of any variable whose name suggests a secret.
    #[serde(default)]
    pub job: BTreeMap<String, String>,
    /// Process id (tgid).
    pub pid: u32,
    /// Real uid.
    pub uid: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start record's bytes depend on this shape: field names, order,
    /// and which absent parts are left out.
    #[test]
    fn snapshot_json_is_stable() {
        let mut p = ProcessSnapshot {
            cgroup: Some("/ci/job".into()),
            comm: "curl".into(),
            container: None,
            exe: Some("/usr/bin/curl".into()),
            gid: Some(1000),
            job: [("CI_JOB_ID".to_owned(), "7".to_owned())].into(),
            pid: 42,
            uid: 1001,
        };
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"cgroup":"/ci/job","comm":"curl","exe":"/usr/bin/curl","gid":1000,"job":{"CI_JOB_ID":"7"},"pid":42,"uid":1001}"#
        );
        p.gid = None;
        p.job.clear();
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"cgroup":"/ci/job","comm":"curl","exe":"/usr/bin/curl","job":{},"pid":42,"uid":1001}"#
        );
        // What approvals stored before the snapshot was shared still reads.
        let old: ProcessSnapshot =
            serde_json::from_str(r#"{"pid":4242,"uid":1500,"gid":1500,"comm":"curl","exe":null,"cgroup":"/x"}"#)
                .unwrap();
        assert_eq!((old.pid, old.gid, old.job.len(), old.container), (4242, Some(1500), 0, None));
    }
}
