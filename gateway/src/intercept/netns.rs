//! Per-namespace listeners: the proxy listens inside every network namespace
//! that holds an intercepted process (a container on a bridge, an `ip netns`
//! namespace, `unshare -n`), so a connect rewritten to `127.0.0.1:PORT`
//! there reaches the gateway and not the namespace's own loopback.
//!
//! Like Istio ambient's in-pod redirection, the listening sockets are opened
//! from the gateway: a short-lived thread enters the namespace (`setns` on
//! `/proc/PID/ns/net`), binds the proxy address there, and hands the socket
//! back; a socket stays in the namespace it was created in. The namespace's
//! cookie (`SO_NETNS_COOKIE` of the listener) then goes into the kernel's
//! `SERVED_NETNS` map, and from that moment the connect hooks redirect that
//! namespace's captured connects instead of refusing them.
//!
//! Namespaces are found when the kernel reports a job's thread entering one
//! (`setns`, `unshare`: a container runtime joins the container's namespace
//! after moving the process into the job's cgroup, so this is what serves
//! a container before its job runs), a process moved into the tree, or a
//! connect refused from an unserved namespace; and by walking the
//! intercepted cgroup trees at start and every
//! `intercept.netns_scan_interval`, which catches anything missed.
//! A namespace without an intercepted process left loses its listener (a
//! listening socket keeps a namespace alive) and its map entry.

use std::{
    collections::{HashMap, HashSet},
    fs, io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gateway_common::{ServedNetns, SERVED_V4, SERVED_V6};
use tokio_util::sync::CancellationToken;

use super::{Cgroup, Interceptor};

/// `SO_NETNS_COOKIE` (Linux 5.14+); not in every libc release yet.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Why a namespace could not be served. Its captured connects stay refused.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The process (and perhaps its namespace) is gone.
    #[error("process {pid} is gone")]
    Gone {
        /// The process.
        pid: u32,
    },
    /// The namespace's loopback interface is down (a fresh `unshare -n`) and
    /// `intercept.bring_up_loopback` is off.
    #[error("the loopback interface of the namespace of process {pid} is down (a fresh `unshare -n`?): its intercepted connects are refused; set intercept.bring_up_loopback: true to let the gateway bring it up")]
    LoopbackDown {
        /// A process in the namespace.
        pid: u32,
    },
    /// Something else failed (entering the namespace, binding, ...).
    #[error("namespace of process {pid}: {what}")]
    Io {
        /// A process in the namespace.
        pid: u32,
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Identity of a network namespace as the file system shows it (device and
/// inode of `/proc/PID/ns/net`), known before any socket exists in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NsId {
    /// Device of the nsfs file.
    pub dev: u64,
    /// Inode of the nsfs file (what `ip netns identify` and `lsns` show).
    pub ino: u64,
}

impl NsId {
    /// The network namespace of `pid`.
    pub fn of_pid(pid: u32) -> io::Result<NsId> {
        let meta = fs::metadata(format!("/proc/{pid}/ns/net"))?;
        Ok(NsId { dev: meta.dev(), ino: meta.ino() })
    }

    fn of_file(file: &fs::File) -> io::Result<NsId> {
        let meta = file.metadata()?;
        Ok(NsId { dev: meta.dev(), ino: meta.ino() })
    }
}

/// The cookie of the namespace a socket lives in.
pub fn socket_netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid fd, and a u64 out-buffer whose length is passed alongside.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The cookie of the calling thread's network namespace.
pub fn current_netns_cookie() -> io::Result<u64> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    socket_netns_cookie(sock.as_fd())
}

/// Where the proxy listens, in every namespace alike.
#[derive(Debug, Clone, Copy)]
pub struct ListenSpec {
    /// IPv4 loopback address.
    pub v4: Ipv4Addr,
    /// IPv6 loopback address, if the proxy listens on IPv6.
    pub v6: Option<Ipv6Addr>,
    /// Port.
    pub port: u16,
}

/// Binds one listening socket of the proxy (non-blocking, IPv6-only on IPv6
/// so the two families never clash) in the calling thread's namespace.
pub fn bind_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock =
        socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into()).map_err(|e| io::Error::new(e.kind(), format!("binding the proxy listener {addr}: {e}")))?;
    sock.listen(4096)?;
    Ok(sock.into())
}

/// Listeners opened inside one namespace.
#[derive(Debug)]
pub struct Opened {
    /// The namespace, as the file system names it.
    pub id: NsId,
    /// Its cookie, as the eBPF programs see it.
    pub cookie: u64,
    /// The IPv4 listener (always present on success).
    pub v4: std::net::TcpListener,
    /// The IPv6 listener, when the proxy listens on IPv6 and the namespace has `::1`.
    pub v6: Option<std::net::TcpListener>,
    /// Whether the gateway brought the namespace's loopback up.
    pub brought_up_loopback: bool,
}

/// Opens the proxy's listeners inside the network namespace of `pid`.
pub fn open_in(pid: u32, spec: ListenSpec, bring_up_loopback: bool) -> Result<Opened, NetnsError> {
    let file = fs::File::open(format!("/proc/{pid}/ns/net")).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => NetnsError::Gone { pid },
        _ => NetnsError::Io { pid, what: "opening /proc/PID/ns/net".into(), source: e },
    })?;
    let id =
        NsId::of_file(&file).map_err(|source| NetnsError::Io { pid, what: "reading the namespace".into(), source })?;
    // setns changes the namespace of the calling thread only, and sockets
    // stay in the namespace they were created in: a throwaway thread keeps
    // the runtime's threads where they are.
    let worker = std::thread::Builder::new()
        .name("gateway-netns".into())
        .spawn(move || -> Result<Opened, NetnsError> {
            let io_err = |what: &str| {
                let what = what.to_owned();
                move |source: io::Error| NetnsError::Io { pid, what, source }
            };
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| io_err("entering the network namespace")(io::Error::from(e)))?;
            // A fresh namespace (`unshare -n`) has its loopback down: 127.0.0.1
            // binds, but nothing can connect to it.
            let mut brought_up_loopback = false;
            if !loopback_is_up().map_err(io_err("reading the loopback interface"))? {
                if !bring_up_loopback {
                    return Err(NetnsError::LoopbackDown { pid });
                }
                set_loopback_up().map_err(io_err("bringing the loopback interface up"))?;
                brought_up_loopback = true;
            }
            let v4 = bind_listener(SocketAddr::from((spec.v4, spec.port))).map_err(io_err("binding"))?;
            let v6 = match spec.v6 {
                // No ::1 (IPv6 disabled in the namespace): the programs
                // refuse its IPv6 connects instead.
                Some(v6) => bind_listener(SocketAddr::from((v6, spec.port))).ok(),
                None => None,
            };
            let cookie = socket_netns_cookie(v4.as_fd()).map_err(io_err("reading SO_NETNS_COOKIE"))?;
            Ok(Opened { id, cookie, v4, v6, brought_up_loopback })
        })
        .map_err(|source| NetnsError::Io { pid, what: "starting the namespace thread".into(), source })?;
    worker.join().unwrap_or_else(|_| {
        Err(NetnsError::Io { pid, what: "namespace thread".into(), source: io::Error::other("panicked") })
    })
}

/// `struct ifreq` with the flags member, as SIOCGIFFLAGS/SIOCSIFFLAGS use it.
#[repr(C)]
struct IfreqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn lo_request() -> IfreqFlags {
    let mut req = IfreqFlags { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
    for (slot, b) in req.name.iter_mut().zip(b"lo") {
        *slot = *b as libc::c_char;
    }
    req
}

fn loopback_is_up() -> io::Result<bool> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let mut req = lo_request();
    // SAFETY: a valid socket and an ifreq-sized buffer naming "lo".
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(req.flags & libc::IFF_UP as libc::c_short != 0)
}

/// `ip link set lo up` in the calling thread's namespace.
fn set_loopback_up() -> io::Result<()> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let mut req = lo_request();
    // SAFETY: as above; SIOCSIFFLAGS reads the same structure.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(io::Error::last_os_error());
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Where listeners opened in other namespaces go: the proxy accepts on them
/// exactly as on its main listeners, until `stop` fires.
pub trait ListenerSink: Send + Sync {
    /// Starts accepting on `listener`.
    fn accept_on(self: Arc<Self>, listener: std::net::TcpListener, stop: CancellationToken);
}

/// A namespace the gateway serves (besides its own).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServedNamespace {
    /// Its cookie, as connection events (`netns`) and `gateway status` show it.
    pub cookie: u64,
    /// Its nsfs inode (`lsns`, `ip netns identify`).
    pub inode: u64,
    /// An intercepted process in it.
    pub pid: u32,
    /// That process's cgroup (`/a/b`).
    pub cgroup: String,
    /// Whether it has an IPv6 listener.
    pub v6: bool,
    /// Whether the gateway brought its loopback up.
    pub brought_up_loopback: bool,
}

struct Entry {
    info: ServedNamespace,
    stop: CancellationToken,
}

#[derive(Default)]
struct State {
    served: HashMap<NsId, Entry>,
    /// Namespaces that could not be served, with the reason last logged,
    /// so a scan every few seconds does not repeat it.
    failed: HashMap<NsId, String>,
    /// Processes seen in the intercepted trees (by the last scans and by
    /// cgroup moves into them): a move out of the tree is reported.
    jobs: HashSet<u32>,
    last_scan: Option<Instant>,
    /// Set once at shutdown (under `opening`): no namespace is served
    /// after the listeners were closed, so none is left marked served.
    closed: bool,
}

/// What [`NamespaceServer::serve_pid`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// The process is not in an intercepted tree, or is in the host's
    /// namespace: nothing to serve.
    NotAJob,
    /// Its namespace is served (now or already).
    Served,
    /// The process is gone before its cgroup or namespace could be read.
    Gone,
    /// Its namespace could not be served (logged); its connects stay refused.
    Failed,
}

/// Serves every network namespace that holds an intercepted process.
pub struct NamespaceServer {
    interceptor: Arc<Interceptor>,
    roots: Vec<Cgroup>,
    mount: PathBuf,
    listen: ListenSpec,
    bring_up_loopback: bool,
    sink: Arc<dyn ListenerSink>,
    host: NsId,
    state: Mutex<State>,
    /// Held while a namespace is being opened, so a scan and an alert never
    /// open the same namespace twice (the second bind would fail).
    opening: Mutex<()>,
    wake: tokio::sync::Notify,
}

impl NamespaceServer {
    /// A server for the namespaces of processes under `roots`.
    pub fn new(
        interceptor: Arc<Interceptor>,
        roots: Vec<Cgroup>,
        listen: ListenSpec,
        bring_up_loopback: bool,
        sink: Arc<dyn ListenerSink>,
    ) -> Result<Arc<NamespaceServer>, NetnsError> {
        let me = std::process::id();
        let host = NsId::of_pid(me).map_err(|source| NetnsError::Io {
            pid: me,
            what: "reading own namespace".into(),
            source,
        })?;
        let mount = super::cgroup::cgroup2_mount().map_err(|e| NetnsError::Io {
            pid: me,
            what: e.to_string(),
            source: io::Error::other("no cgroup2"),
        })?;
        Ok(Arc::new(NamespaceServer {
            interceptor,
            roots,
            mount,
            listen,
            bring_up_loopback,
            sink,
            host,
            state: Mutex::new(State::default()),
            opening: Mutex::new(()),
            wake: tokio::sync::Notify::new(),
        }))
    }

    /// The namespaces served now, besides the gateway's own.
    pub fn served(&self) -> Vec<ServedNamespace> {
        let Ok(state) = self.state.lock() else { return Vec::new() };
        let mut out: Vec<ServedNamespace> = state.served.values().map(|e| e.info.clone()).collect();
        out.sort_by_key(|n| n.cookie);
        out
    }

    /// Asks for a scan as soon as possible.
    pub fn request_scan(&self) {
        self.wake.notify_one();
    }

    /// Scans at once, then on every request and every `interval`, until
    /// `shutdown`; then closes every listener it opened.
    pub async fn run(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        loop {
            let me = self.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || me.scan()).await {
                tracing::error!(error = %e, "namespace scan failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(interval) => {}
            }
        }
        // Under `opening`: a serve in progress finishes first, and none
        // starts after this (an alert handled during shutdown must not
        // mark a namespace served once its listener is closed).
        let _opening = self.opening.lock();
        if let Ok(mut state) = self.state.lock() {
            state.closed = true;
            for (_, entry) in state.served.drain() {
                entry.stop.cancel();
            }
        }
    }

    /// Walks the intercepted trees: serves namespaces with an intercepted
    /// process, stops serving those without one.
    pub fn scan(&self) {
        let mut found: HashMap<NsId, (u32, String)> = HashMap::new();
        let mut jobs = HashSet::new();
        for root in &self.roots {
            for (pid, cgroup) in pids_in_tree(&root.dir) {
                jobs.insert(pid);
                let Ok(ns) = NsId::of_pid(pid) else { continue };
                if ns == self.host {
                    continue;
                }
                found.entry(ns).or_insert_with(|| (pid, self.cgroup_name(&cgroup)));
            }
        }
        let (new, gone): (Vec<(NsId, u32, String)>, Vec<Entry>) = {
            let Ok(mut state) = self.state.lock() else { return };
            state.jobs.extend(jobs.iter().copied());
            state.jobs.retain(|pid| jobs.contains(pid) || Path::new(&format!("/proc/{pid}")).exists());
            state.last_scan = Some(Instant::now());
            let gone_ids: Vec<NsId> = state.served.keys().filter(|id| !found.contains_key(id)).copied().collect();
            let gone = gone_ids.iter().filter_map(|id| state.served.remove(id)).collect();
            state.failed.retain(|id, _| found.contains_key(id));
            let new = found
                .into_iter()
                .filter(|(id, _)| !state.served.contains_key(id))
                .map(|(id, (pid, cg))| (id, pid, cg))
                .collect();
            (new, gone)
        };
        for entry in gone {
            self.close(entry);
        }
        for (_, pid, cgroup) in new {
            let _ = self.serve(pid, cgroup);
        }
    }

    /// Serves the namespace of `pid` now, if `pid` is in an intercepted
    /// tree and its namespace is not served yet (a connect from it was
    /// just refused).
    pub fn serve_pid(&self, pid: u32) -> Serve {
        let Some(cgroup) = super::cgroup::cgroup_of(pid) else { return Serve::Gone };
        if !self.in_tree(&cgroup) {
            return Serve::NotAJob;
        }
        let Ok(ns) = NsId::of_pid(pid) else { return Serve::Gone };
        if ns == self.host {
            return Serve::NotAJob;
        }
        if self.state.lock().map(|s| s.served.contains_key(&ns)).unwrap_or(false) {
            return Serve::Served;
        }
        self.serve(pid, cgroup)
    }

    /// A process moved to another cgroup. Into the tree: serve its
    /// namespace. Out of the tree, after the gateway saw it inside: report
    /// it (only a privileged job can do that).
    pub fn on_cgroup_move(&self, pid: u32, dst_cgroup_id: u64, mover_comm: &str) {
        let Some(cgroup) = super::cgroup::cgroup_of(pid) else { return };
        if self.in_tree(&cgroup) {
            if let Ok(mut state) = self.state.lock() {
                state.jobs.insert(pid);
            }
            let _ = self.serve_pid(pid);
            return;
        }
        let was_job = self.state.lock().map(|mut s| s.jobs.remove(&pid)).unwrap_or(false);
        if was_job {
            tracing::warn!(
                target: super::alerts::ALERT_TARGET,
                kind = "left_intercepted_cgroup",
                pid,
                cgroup = %cgroup,
                cgroup_id = dst_cgroup_id,
                mover_comm,
                "a process of an intercepted job moved out of the intercepted cgroups: its connections are no longer captured"
            );
        }
    }

    fn in_tree(&self, cgroup: &str) -> bool {
        self.roots.iter().any(|r| cgroup == r.name || cgroup.starts_with(&format!("{}/", r.name)))
    }

    fn cgroup_name(&self, dir: &Path) -> String {
        format!("/{}", dir.strip_prefix(&self.mount).unwrap_or(dir).display())
    }

    fn serve(&self, pid: u32, cgroup: String) -> Serve {
        let Ok(_opening) = self.opening.lock() else { return Serve::Failed };
        match self.state.lock() {
            Ok(s) if s.closed => return Serve::Failed,
            Ok(s) => {
                if NsId::of_pid(pid).is_ok_and(|ns| s.served.contains_key(&ns)) {
                    return Serve::Served;
                }
            }
            Err(_) => return Serve::Failed,
        }
        let opened = match open_in(pid, self.listen, self.bring_up_loopback) {
            Ok(o) => o,
            Err(NetnsError::Gone { .. }) => return Serve::Gone,
            Err(e) => {
                let reason = e.to_string();
                let ns = NsId::of_pid(pid).ok();
                let repeated = self.state.lock().ok().and_then(|mut s| {
                    let ns = ns?;
                    let same = s.failed.get(&ns) == Some(&reason);
                    s.failed.insert(ns, reason.clone());
                    Some(same)
                });
                if repeated != Some(true) {
                    tracing::warn!(
                        target: super::alerts::ALERT_TARGET,
                        kind = "netns_unserved",
                        pid,
                        cgroup = %cgroup,
                        reason = %reason,
                        "cannot serve a job's network namespace: its intercepted connects are refused"
                    );
                }
                return Serve::Failed;
            }
        };
        let cgroup_id = fs::metadata(self.mount.join(cgroup.trim_start_matches('/'))).map(|m| m.ino()).unwrap_or(0);
        let info = ServedNamespace {
            cookie: opened.cookie,
            inode: opened.id.ino,
            pid,
            cgroup,
            v6: opened.v6.is_some(),
            brought_up_loopback: opened.brought_up_loopback,
        };
        let stop = CancellationToken::new();
        {
            let Ok(mut state) = self.state.lock() else { return Serve::Failed };
            if state.served.contains_key(&opened.id) {
                // Served meanwhile (a scan and an alert raced): drop ours.
                return Serve::Served;
            }
            // Accept first, then tell the programs: a connect redirected
            // from now on finds a listener.
            self.sink.clone().accept_on(opened.v4, stop.clone());
            if let Some(v6) = opened.v6 {
                self.sink.clone().accept_on(v6, stop.clone());
            }
            let flags = SERVED_V4 | if info.v6 { SERVED_V6 } else { 0 };
            if let Err(e) = self.interceptor.serve_netns(info.cookie, ServedNetns { flags, pid, cgroup_id }) {
                tracing::error!(error = %e, pid, "cannot mark a namespace as served; its connects stay refused");
                stop.cancel();
                return Serve::Failed;
            }
            state.failed.remove(&opened.id);
            state.served.insert(opened.id, Entry { info: info.clone(), stop });
        }
        tracing::info!(
            target: super::alerts::ALERT_TARGET,
            kind = "netns_served",
            netns = info.cookie,
            inode = info.inode,
            pid,
            cgroup = %info.cgroup,
            v6 = info.v6,
            brought_up_loopback = info.brought_up_loopback,
            "serving a job's network namespace"
        );
        Serve::Served
    }

    fn close(&self, entry: Entry) {
        // Refuse first, then close: no connect is redirected to a listener
        // that is going away.
        if let Err(e) = self.interceptor.unserve_netns(entry.info.cookie) {
            tracing::error!(error = %e, netns = entry.info.cookie, "cannot remove a namespace from the served map");
        }
        entry.stop.cancel();
        tracing::info!(
            target: super::alerts::ALERT_TARGET,
            kind = "netns_released",
            netns = entry.info.cookie,
            inode = entry.info.inode,
            "no intercepted process left in a namespace: its listener is closed"
        );
    }
}

/// Every process in the cgroup tree below `dir`, with its cgroup directory.
fn pids_in_tree(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()).map(|pid| (pid, d.clone())));
        }
        if let Ok(entries) = fs::read_dir(&d) {
            stack.extend(
                entries.filter_map(Result::ok).filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_has_a_cookie_and_an_id() {
        let cookie = current_netns_cookie().expect("SO_NETNS_COOKIE needs Linux 5.14+");
        assert_ne!(cookie, 0);
        assert_eq!(current_netns_cookie().expect("cookie"), cookie, "stable within a namespace");
        let id = NsId::of_pid(std::process::id()).expect("own namespace");
        assert_eq!(NsId::of_pid(std::process::id()).expect("again"), id);
    }

    #[test]
    fn ifreq_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<IfreqFlags>(), 40);
    }
}
