//! What the eBPF programs refused or noticed, read from their `ALERTS` ring
//! buffer and turned into log events (target [`ALERT_TARGET`], with a
//! `kind` field) and actions: a connect refused because its namespace is
//! not served makes the gateway serve it; a process moved between cgroups
//! is checked against the intercepted trees; a thread that entered a
//! namespace has that namespace served if it is a job's.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use gateway_common::{Alert, AlertKind};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use super::{
    netns::{NamespaceServer, Serve},
    words_addr,
};

/// tracing target of interception events (refusals, namespaces served).
pub const ALERT_TARGET: &str = "gateway::intercept";

/// The same refusal (process, destination) is logged at most this often;
/// the kernel counters count every one.
const REPEAT_EVERY: Duration = Duration::from_secs(10);

/// An alert, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelAlert {
    /// A captured connect from a namespace without a listener was refused.
    UnservedNetns {
        /// The caller.
        tgid: u32,
        /// Its `comm`.
        comm: String,
        /// Its namespace.
        netns: u64,
        /// Where it was going.
        dst: SocketAddr,
    },
    /// UDP to a captured destination was refused.
    UdpRefused {
        /// The caller.
        tgid: u32,
        /// Its `comm`.
        comm: String,
        /// Its namespace.
        netns: u64,
        /// Where it was going.
        dst: SocketAddr,
    },
    /// A socket carried the upstream mark without belonging to the gateway.
    SpoofedMark {
        /// The caller.
        tgid: u32,
        /// Its `comm`.
        comm: String,
        /// Where it was going.
        dst: SocketAddr,
    },
    /// A task moved to another cgroup v2.
    CgroupAttach {
        /// The task that moved.
        pid: u32,
        /// Its new cgroup's id.
        dst_cgroup_id: u64,
        /// Who moved it.
        mover: String,
    },
    /// A thread's `setns` or `unshare` succeeded.
    NamespaceEntered {
        /// The thread (its `/proc/TID/ns/net` is the namespace it entered).
        tid: u32,
        /// Its process.
        tgid: u32,
    },
}

impl KernelAlert {
    /// Decodes one ring-buffer entry; `None` for a short or unknown one.
    pub fn decode(bytes: &[u8]) -> Option<KernelAlert> {
        if bytes.len() < std::mem::size_of::<Alert>() {
            return None;
        }
        // SAFETY: Alert is plain old data of this size; the read is unaligned-safe.
        let a: Alert = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let comm = String::from_utf8_lossy(a.comm.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
        let dst = SocketAddr::new(words_addr(a.addr), a.port);
        Some(match a.kind {
            k if k == AlertKind::UnservedNetns as u32 => {
                KernelAlert::UnservedNetns { tgid: a.tgid, comm, netns: a.netns_cookie, dst }
            }
            k if k == AlertKind::UdpRefused as u32 => {
                KernelAlert::UdpRefused { tgid: a.tgid, comm, netns: a.netns_cookie, dst }
            }
            k if k == AlertKind::SpoofedMark as u32 => KernelAlert::SpoofedMark { tgid: a.tgid, comm, dst },
            k if k == AlertKind::CgroupAttach as u32 => {
                KernelAlert::CgroupAttach { pid: a.tgid, dst_cgroup_id: a.other, mover: comm }
            }
            k if k == AlertKind::NamespaceEntered as u32 => {
                KernelAlert::NamespaceEntered { tid: a.tgid, tgid: a.other as u32 }
            }
            _ => return None,
        })
    }
}

/// Reads alerts until `shutdown` and acts on them.
pub async fn run(ring: RingBuf<MapData>, namespaces: Arc<NamespaceServer>, shutdown: CancellationToken) {
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged,
    // for as long as it lives; the AsyncFd owns the ring buffer.
    let registered = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut ring = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the alert ring buffer: refusals are counted but not reported");
            return;
        }
    };
    let mut last_logged: HashMap<(u32, IpAddr, u16, u8), Instant> = HashMap::new();
    loop {
        let mut guard = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = ring.readable_mut() => match r {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "alert ring buffer failed");
                    return;
                }
            },
        };
        let mut batch = Vec::new();
        while let Some(item) = guard.get_inner_mut().next() {
            if let Some(alert) = KernelAlert::decode(&item) {
                batch.push(alert);
            }
        }
        guard.clear_ready();
        drop(guard);
        if last_logged.len() > 4096 {
            last_logged.retain(|_, t| t.elapsed() < REPEAT_EVERY);
        }
        for alert in batch {
            handle(alert, &namespaces, &mut last_logged).await;
        }
    }
}

async fn handle(
    alert: KernelAlert,
    namespaces: &Arc<NamespaceServer>,
    last_logged: &mut HashMap<(u32, IpAddr, u16, u8), Instant>,
) {
    let mut first_in_a_while = |tgid: u32, dst: SocketAddr, kind: u8| {
        let key = (tgid, dst.ip(), dst.port(), kind);
        let now = Instant::now();
        match last_logged.get(&key) {
            Some(t) if now.duration_since(*t) < REPEAT_EVERY => false,
            _ => {
                last_logged.insert(key, now);
                true
            }
        }
    };
    match alert {
        KernelAlert::UnservedNetns { tgid, comm, netns, dst } => {
            if first_in_a_while(tgid, dst, 1) {
                tracing::warn!(
                    target: ALERT_TARGET,
                    kind = "refused_unserved_netns",
                    pid = tgid,
                    comm = %comm,
                    netns,
                    orig_dst = %dst,
                    "refused a connect from a network namespace the gateway does not serve yet; serving it now"
                );
            }
            let ns = namespaces.clone();
            let _ = tokio::task::spawn_blocking(move || ns.serve_pid(tgid)).await;
        }
        KernelAlert::UdpRefused { tgid, comm, netns, dst } => {
            if first_in_a_while(tgid, dst, 2) {
                tracing::warn!(
                    target: ALERT_TARGET,
                    kind = "refused_udp",
                    pid = tgid,
                    comm = %comm,
                    netns,
                    orig_dst = %dst,
                    "refused UDP to a captured destination (QUIC/HTTP3 cannot be inspected; clients fall back to TCP)"
                );
            }
        }
        KernelAlert::SpoofedMark { tgid, comm, dst } => {
            if first_in_a_while(tgid, dst, 3) {
                tracing::warn!(
                    target: ALERT_TARGET,
                    kind = "spoofed_mark",
                    pid = tgid,
                    comm = %comm,
                    orig_dst = %dst,
                    "a job's socket carried the gateway's upstream mark; it was captured like any other"
                );
            }
        }
        KernelAlert::CgroupAttach { pid, dst_cgroup_id, mover } => {
            let ns = namespaces.clone();
            let _ = tokio::task::spawn_blocking(move || ns.on_cgroup_move(pid, dst_cgroup_id, &mover)).await;
        }
        // The gateway's own threads enter namespaces to open listeners.
        KernelAlert::NamespaceEntered { tgid, .. } if tgid == std::process::id() => {}
        KernelAlert::NamespaceEntered { tid, .. } => {
            let ns = namespaces.clone();
            let _ = tokio::task::spawn_blocking(move || {
                // A runtime's helper thread may be gone already (runc's
                // intermediate process forks the container's init and
                // exits): its children are in the namespace, so walk the tree.
                if ns.serve_pid(tid) == Serve::Gone {
                    ns.scan();
                }
            })
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_the_programs_write() {
        let alert = Alert {
            kind: AlertKind::UdpRefused as u32,
            tgid: 42,
            cgroup_id: 7,
            netns_cookie: 9,
            addr: super::super::addr_words("10.1.2.3".parse().unwrap()),
            port: 443,
            family: gateway_common::AF_INET as u16,
            _pad: 0,
            other: 0,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        // SAFETY: reading the bytes of a plain-old-data value.
        let bytes =
            unsafe { std::slice::from_raw_parts((&alert as *const Alert).cast::<u8>(), std::mem::size_of::<Alert>()) };
        assert_eq!(
            KernelAlert::decode(bytes),
            Some(KernelAlert::UdpRefused {
                tgid: 42,
                comm: "curl".into(),
                netns: 9,
                dst: "10.1.2.3:443".parse().unwrap()
            })
        );
        assert_eq!(KernelAlert::decode(&bytes[..10]), None);

        let entered = Alert { kind: AlertKind::NamespaceEntered as u32, tgid: 43, other: 42, ..alert };
        // SAFETY: as above.
        let bytes = unsafe {
            std::slice::from_raw_parts((&entered as *const Alert).cast::<u8>(), std::mem::size_of::<Alert>())
        };
        assert_eq!(KernelAlert::decode(bytes), Some(KernelAlert::NamespaceEntered { tid: 43, tgid: 42 }));
    }
}
