//! Transparent interception: loading the eBPF programs, attaching them to
//! the intercepted cgroups, filling their maps, and handing the proxy the
//! record of each redirected connection.
//!
//! Links and maps are pinned under `intercept.bpffs_dir`, so enforcement
//! outlives the gateway process: after a crash, intercepted connects are
//! redirected to a dead listener and refused; after a clean shutdown (mode
//! `enforce`) the programs refuse them outright. A new gateway takes the pins
//! over: it attaches its own programs first and only then drops the old ones,
//! so there is no window in which traffic goes around it.
//!
//! A connect is captured because its address is in the intercept set
//! ([`Capture::Destination`]) or, with port capture, because of its port
//! ([`Capture::Port`]); it is redirected to the proxy's listener in the
//! caller's own network namespace ([`netns`] opens those), and refused when
//! that namespace has no listener yet. UDP to a captured destination is
//! refused. What the programs refuse or notice reaches the gateway as
//! [`alerts`].

pub mod alerts;
pub mod bpffs;
pub mod cgroup;
pub mod cgroup_watch;
pub mod destinations;
pub mod epochs;
pub mod netns;

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, TracePoint,
    },
    Ebpf,
};
pub use gateway_common::Capture;
use gateway_common::{
    names, ConnRecord, Mode, PortSet, RedirectConfig, ServedNetns, SockKey, Stat, MAX_PORTS, SERVED_HOST, SERVED_V4,
    SERVED_V6, STATS_LEN,
};
use ipnet::IpNet;

pub use cgroup::{Cgroup, CgroupError};
pub use destinations::{InterceptSet, TooManyPorts};
pub use epochs::ExecWatch;

/// The eBPF object, built by `build.rs` from `gateway-ebpf/`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway-ebpf"));

/// Programs in attach order, with the name of their pin files.
const PROGRAMS: [&str; 6] = [
    names::PROG_SOCK_RELEASE,
    names::PROG_SOCK_OPS,
    names::PROG_SENDMSG4,
    names::PROG_SENDMSG6,
    names::PROG_CONNECT4,
    names::PROG_CONNECT6,
];

/// Maps pinned for `gateway status` and `gateway exec`.
const PINNED_MAPS: [&str; 5] = [names::CONFIG, names::PENDING, names::ORIGINAL, names::STATS, names::SERVED_NETNS];

/// The `cgroup:cgroup_attach_task` record layout the program assumes, as
/// the kernel's format file must show it.
const ATTACH_FORMAT: [&str; 3] =
    ["field:int dst_root;\toffset:8;", "field:u64 dst_id;\toffset:16;", "field:int pid;\toffset:24;"];

/// The syscalls after which a thread may be in another network namespace.
const NAMESPACE_SYSCALLS: [&str; 2] = ["sys_exit_setns", "sys_exit_unshare"];

/// The `syscalls:sys_exit_*` field the namespace program reads.
const SYS_EXIT_RET: &str = "field:long ret;\toffset:16;";

/// Checks that a tracepoint's record has the fields (name and offset) a
/// program reads; a different kernel layout would make it read garbage.
fn check_format(event: &str, fields: &[&str]) -> Result<(), InterceptError> {
    let path = PathBuf::from(format!("/sys/kernel/tracing/events/{event}/format"));
    let format = fs::read_to_string(&path)
        .or_else(|_| fs::read_to_string(format!("/sys/kernel/debug/tracing/events/{event}/format")))
        .map_err(|source| InterceptError::Io { what: format!("reading {}", path.display()), source })?;
    match fields.iter().find(|field| !format.contains(*field)) {
        Some(missing) => Err(InterceptError::Pin {
            path,
            reason: format!("unexpected tracepoint layout (no `{}`)", missing.replace('\t', " ")),
        }),
        None => Ok(()),
    }
}

/// Everything that can go wrong while setting up or tearing down interception.
#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    /// A cgroup problem.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The object did not load.
    #[error("loading the eBPF programs failed (the gateway needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)")]
    Load(#[source] aya::EbpfError),
    /// A program did not load or attach.
    #[error("eBPF program {name}")]
    Program {
        /// The program.
        name: &'static str,
        /// The error.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("eBPF map {name}")]
    Map {
        /// The map.
        name: &'static str,
        /// The error.
        #[source]
        source: aya::maps::MapError,
    },
    /// A pin could not be created, read or removed.
    #[error("bpffs pin {path}: {reason}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The object lacks a program or map the gateway expects (stale build).
    #[error("the eBPF object has no {0}; rebuild the gateway")]
    Missing(&'static str),
    /// The intercept set does not fit the maps.
    #[error(transparent)]
    Ports(#[from] TooManyPorts),
    /// Too many port-capture ports.
    #[error("intercept.capture_ports: {0} distinct ports; at most {MAX_PORTS} fit")]
    CapturePorts(usize),
    /// Some other I/O failure.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> InterceptError {
    move |source| InterceptError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> InterceptError {
    move |source| InterceptError::Program { name, source }
}

/// Where the proxy listens, what is captured by port, and how the programs
/// recognise the gateway.
#[derive(Debug, Clone)]
pub struct RedirectTarget {
    /// IPv4 listener.
    pub v4: Ipv4Addr,
    /// IPv6 listener, if any.
    pub v6: Option<Ipv6Addr>,
    /// Listener port.
    pub port: u16,
    /// Mark of the gateway's upstream sockets.
    pub upstream_mark: u32,
    /// Ports captured whatever the address; empty turns port capture off.
    pub capture_ports: Vec<u16>,
}

/// Port-capture ports as the map value the programs read.
fn capture_port_set(ports: &[u16]) -> Result<PortSet, InterceptError> {
    let mut unique: Vec<u16> = ports.to_vec();
    unique.sort_unstable();
    unique.dedup();
    if unique.len() > MAX_PORTS {
        return Err(InterceptError::CapturePorts(unique.len()));
    }
    let mut set = PortSet { ports: [0; MAX_PORTS], len: unique.len() as u16 };
    for (slot, port) in set.ports.iter_mut().zip(&unique) {
        *slot = *port;
    }
    Ok(set)
}

/// Address words in the layout the programs use (network byte order).
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    [0, 1, 2, 3].map(|i| u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]))
}

/// The inverse of [`addr_words`]; IPv4-mapped addresses come back as IPv4.
pub fn words_addr(words: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// The IPv4 and IPv6 intercept-set tries, updated together.
type Tries = (LpmTrie<MapData, [u8; 4], PortSet>, LpmTrie<MapData, [u8; 16], PortSet>);

/// The live interception: loaded programs, pinned links, and the maps the
/// gateway writes (intercept set, mode, served namespaces) and reads
/// (connection records, alerts).
pub struct Interceptor {
    /// Locked only to attach (start-up, a re-created cgroup) and to read counters.
    ebpf: Mutex<Ebpf>,
    pin_dir: PathBuf,
    /// The links this gateway attached and pinned: a descriptor of each
    /// (which keeps it attached while the gateway runs) and its pin path.
    links: Mutex<Vec<HeldLink>>,
    /// A handle of each pinned map, to pin it again ([`Self::restore_pins`]).
    pinned_maps: Vec<(&'static str, MapData)>,
    config: Mutex<Array<MapData, RedirectConfig>>,
    tries: Mutex<Tries>,
    original: Mutex<BpfHashMap<MapData, SockKey, ConnRecord>>,
    served: Mutex<BpfHashMap<MapData, u64, ServedNetns>>,
    alerts: Mutex<Option<RingBuf<MapData>>>,
    redirect: RedirectConfig,
    host_netns_cookie: u64,
}

impl Interceptor {
    /// Loads the programs and fills `CONFIG`; nothing is attached yet.
    pub fn load(pin_dir: &Path, target: RedirectTarget) -> Result<Interceptor, InterceptError> {
        bpffs::ensure_mounted(pin_dir)?;
        let mut ebpf = Ebpf::load(OBJECT).map_err(InterceptError::Load)?;
        for name in PROGRAMS {
            let prog = ebpf.program_mut(name).ok_or(InterceptError::Missing(name))?;
            let loaded = match prog {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                aya::programs::Program::CgroupSock(p) => p.load(),
                _ => return Err(InterceptError::Missing(name)),
            };
            loaded.map_err(prog_err(name))?;
        }
        pin_maps(&ebpf, &pin_dir.join("maps"))?;
        // Handles of their own, since the typed maps below take the
        // object's: they outlive the pins and can pin the maps again.
        let pinned_maps = PINNED_MAPS
            .into_iter()
            .map(|name| {
                MapData::from_pin(pin_dir.join("maps").join(name)).map(|data| (name, data)).map_err(map_err(name))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let take = |ebpf: &mut Ebpf, name: &'static str| ebpf.take_map(name).ok_or(InterceptError::Missing(name));
        let mut config: Array<MapData, RedirectConfig> =
            Array::try_from(take(&mut ebpf, names::CONFIG)?).map_err(map_err(names::CONFIG))?;
        let v4 = LpmTrie::try_from(take(&mut ebpf, names::INTERCEPT_V4)?).map_err(map_err(names::INTERCEPT_V4))?;
        let v6 = LpmTrie::try_from(take(&mut ebpf, names::INTERCEPT_V6)?).map_err(map_err(names::INTERCEPT_V6))?;
        let original = BpfHashMap::try_from(take(&mut ebpf, names::ORIGINAL)?).map_err(map_err(names::ORIGINAL))?;
        let mut served: BpfHashMap<MapData, u64, ServedNetns> =
            BpfHashMap::try_from(take(&mut ebpf, names::SERVED_NETNS)?).map_err(map_err(names::SERVED_NETNS))?;
        let alerts = RingBuf::try_from(take(&mut ebpf, names::ALERTS)?).map_err(map_err(names::ALERTS))?;

        let redirect = RedirectConfig {
            proxy_v4: addr_words(IpAddr::V4(target.v4))[3],
            proxy_v6: target.v6.map(|v6| addr_words(IpAddr::V6(v6))).unwrap_or([0; 4]),
            proxy_port: target.port,
            _pad0: 0,
            mode: Mode::Redirect as u32,
            gateway_tgid: std::process::id(),
            upstream_mark: target.upstream_mark,
            capture_ports: capture_port_set(&target.capture_ports)?,
            _pad1: 0,
        };
        config.set(0, redirect, 0).map_err(map_err(names::CONFIG))?;
        // The gateway's own namespace is served by the listeners `run`
        // bound before loading; other namespaces are added by `netns`.
        let host_netns_cookie = netns::current_netns_cookie().map_err(|source| InterceptError::Io {
            what: "reading SO_NETNS_COOKIE (needs Linux 5.14+)".into(),
            source,
        })?;
        let host = ServedNetns {
            flags: SERVED_HOST | SERVED_V4 | if target.v6.is_some() { SERVED_V6 } else { 0 },
            pid: std::process::id(),
            cgroup_id: 0,
        };
        served.insert(host_netns_cookie, host, 0).map_err(map_err(names::SERVED_NETNS))?;

        let interceptor = Interceptor {
            pin_dir: pin_dir.to_owned(),
            links: Mutex::new(Vec::new()),
            pinned_maps,
            config: Mutex::new(config),
            tries: Mutex::new((v4, v6)),
            original: Mutex::new(original),
            served: Mutex::new(served),
            alerts: Mutex::new(Some(alerts)),
            redirect,
            host_netns_cookie,
            ebpf: Mutex::new(ebpf),
        };
        Ok(interceptor)
    }

    /// Attaches the host-wide tracepoints that tell the gateway about
    /// processes entering or leaving the intercepted tree
    /// (`cgroup_attach_task`) and threads entering namespaces
    /// (`sys_exit_setns`, `sys_exit_unshare`). They only report, so the links
    /// are not pinned: they end with the gateway. Fails when the kernel's
    /// record layout is not the expected one.
    pub fn watch_tasks(&mut self) -> Result<(), InterceptError> {
        mount_tracefs();
        check_format("cgroup/cgroup_attach_task", &ATTACH_FORMAT)?;
        let ebpf = self.ebpf.get_mut().map_err(|_| InterceptError::Missing("ebpf lock"))?;
        for syscall in NAMESPACE_SYSCALLS {
            check_format(&format!("syscalls/{syscall}"), &[SYS_EXIT_RET])?;
        }
        let name = names::PROG_CGROUP_ATTACH;
        let prog: &mut TracePoint =
            ebpf.program_mut(name).ok_or(InterceptError::Missing(name))?.try_into().map_err(prog_err(name))?;
        prog.load().map_err(prog_err(name))?;
        prog.attach("cgroup", "cgroup_attach_task").map_err(prog_err(name))?;
        let name = names::PROG_NAMESPACE_ENTERED;
        let prog: &mut TracePoint =
            ebpf.program_mut(name).ok_or(InterceptError::Missing(name))?.try_into().map_err(prog_err(name))?;
        prog.load().map_err(prog_err(name))?;
        for syscall in NAMESPACE_SYSCALLS {
            prog.attach("syscalls", syscall).map_err(prog_err(name))?;
        }
        Ok(())
    }

    /// Hands out the alert ring buffer (once: it has one reader).
    pub fn take_alerts(&self) -> Option<RingBuf<MapData>> {
        self.alerts.lock().ok()?.take()
    }

    /// The gateway's own network namespace (served by the main listeners).
    pub fn host_netns_cookie(&self) -> u64 {
        self.host_netns_cookie
    }

    /// Marks a namespace as served: from now on its captured connects are
    /// redirected to the listener in it instead of refused.
    pub fn serve_netns(&self, cookie: u64, served: ServedNetns) -> Result<(), InterceptError> {
        let mut map = self.served.lock().map_err(|_| InterceptError::Missing("served namespaces lock"))?;
        map.insert(cookie, served, 0).map_err(map_err(names::SERVED_NETNS))
    }

    /// Stops serving a namespace: its captured connects are refused again.
    pub fn unserve_netns(&self, cookie: u64) -> Result<(), InterceptError> {
        let mut map = self.served.lock().map_err(|_| InterceptError::Missing("served namespaces lock"))?;
        match map.remove(&cookie) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::SERVED_NETNS)(e)),
        }
    }

    /// Attaches every program to every cgroup, pins the links, and then
    /// drops whatever an earlier gateway had pinned.
    pub fn attach(&mut self, cgroups: &[Cgroup]) -> Result<(), InterceptError> {
        let links_dir = self.links_dir()?;
        let stale = pins_in(&links_dir)?;
        let mut fresh: Vec<HeldLink> = Vec::new();
        for cg in cgroups {
            fresh.extend(self.link_cgroup(cg, &links_dir)?);
        }
        // Our programs are live on every cgroup: now the old ones can go.
        for path in stale {
            remove_link_pin(&path)?;
        }
        self.pin_links(fresh)
    }

    /// Attaches every program to `cg`, a configured cgroup that was removed
    /// and created again under the same path (a new cgroup, with nothing
    /// attached), and drops the pins of the one it replaces (`old_id`),
    /// whose links the kernel ended with it.
    pub fn reattach(&self, cg: &Cgroup, old_id: u64) -> Result<(), InterceptError> {
        let links_dir = self.links_dir()?;
        let fresh = self.link_cgroup(cg, &links_dir)?;
        self.pin_links(fresh)?;
        let prefix = format!("{old_id}-");
        for path in pins_in(&links_dir)? {
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix)) {
                remove_link_pin(&path)?;
            }
        }
        let mut links = self.links.lock().map_err(|_| InterceptError::Missing("links lock"))?;
        links.retain(|HeldLink { path, .. }| {
            !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix))
        });
        Ok(())
    }

    fn links_dir(&self) -> Result<PathBuf, InterceptError> {
        let links_dir = self.pin_dir.join("links");
        fs::create_dir_all(&links_dir)
            .map_err(|source| InterceptError::Io { what: format!("creating {}", links_dir.display()), source })?;
        Ok(links_dir)
    }

    /// Attaches every program to `cg`; the links, unpinned yet, with the
    /// pin each gets.
    fn link_cgroup(&self, cg: &Cgroup, links_dir: &Path) -> Result<Vec<HeldLink>, InterceptError> {
        let file = cg.open()?;
        let mut ebpf = self.ebpf.lock().map_err(|_| InterceptError::Missing("ebpf lock"))?;
        let mut fresh = Vec::with_capacity(PROGRAMS.len());
        for name in PROGRAMS {
            let prog = ebpf.program_mut(name).ok_or(InterceptError::Missing(name))?;
            // Single mode goes through bpf_link on current kernels, which
            // coexists with other programs attached to the same cgroup.
            // The three program types share no trait for this: one body, three types.
            macro_rules! attach {
                ($p:expr) => {{
                    let id = $p.attach(&file, CgroupAttachMode::Single).map_err(prog_err(name))?;
                    let link = $p.take_link(id).map_err(prog_err(name))?;
                    FdLink::try_from(link).map_err(|e| InterceptError::Pin {
                        path: cg.dir.clone(),
                        reason: format!("{name} was not attached with a bpf_link: {e}"),
                    })?
                }};
            }
            let link: FdLink = match prog {
                aya::programs::Program::CgroupSockAddr(p) => attach!(p),
                aya::programs::Program::SockOps(p) => attach!(p),
                aya::programs::Program::CgroupSock(p) => attach!(p),
                _ => return Err(InterceptError::Missing(name)),
            };
            // A descriptor of our own (see `bpffs`): aya's goes when this
            // `FdLink` is dropped, ours keeps the link attached.
            let fd = link
                .info()
                .map_err(|e| e.to_string())
                .and_then(|info| bpffs::link_fd(info.id()).map_err(|e| e.to_string()))
                .map_err(|reason| InterceptError::Pin {
                    path: cg.dir.clone(),
                    reason: format!("opening {name}'s link: {reason}"),
                })?;
            fresh.push(HeldLink { path: links_dir.join(format!("{}-{name}", cg.id)), fd });
        }
        Ok(fresh)
    }

    fn pin_links(&self, fresh: Vec<HeldLink>) -> Result<(), InterceptError> {
        let mut links = self.links.lock().map_err(|_| InterceptError::Missing("links lock"))?;
        for link in fresh {
            link.pin()?;
            links.push(link);
        }
        Ok(())
    }

    /// How many of this gateway's link pins are gone (bpffs unmounted, or
    /// the files removed). The links stay attached while the gateway holds
    /// them, but with `on_shutdown: enforce` nothing would keep them once it
    /// exits: jobs would then connect uncaptured.
    pub fn missing_pins(&self) -> usize {
        let Ok(links) = self.links.lock() else { return 0 };
        links.iter().filter(|link| !link.is_pinned()).count()
    }

    /// Pins again whatever of this gateway's links and maps lost its pin,
    /// when a bpf file system is mounted over `intercept.bpffs_dir` (bpffs
    /// was unmounted and mounted again, or the pin files were removed).
    /// With no bpffs there, nothing is created: the pins would be plain
    /// files that hold nothing.
    pub fn restore_pins(&self) -> Result<PinRepair, InterceptError> {
        let links = self.links.lock().map_err(|_| InterceptError::Missing("links lock"))?;
        let maps_dir = self.pin_dir.join("maps");
        let lost_links: Vec<&HeldLink> = links.iter().filter(|link| !link.is_pinned()).collect();
        let lost_maps: Vec<&(&'static str, MapData)> =
            self.pinned_maps.iter().filter(|(name, _)| fs::symlink_metadata(maps_dir.join(name)).is_err()).collect();
        if lost_links.is_empty() && lost_maps.is_empty() {
            return Ok(PinRepair::Intact);
        }
        if !bpffs::is_mounted(&self.pin_dir)? {
            return Ok(PinRepair::NoBpffs { links: lost_links.len(), maps: lost_maps.len() });
        }
        for dir in [self.pin_dir.join("links"), maps_dir.clone()] {
            fs::create_dir_all(&dir)
                .map_err(|source| InterceptError::Io { what: format!("creating {}", dir.display()), source })?;
        }
        for link in &lost_links {
            link.pin()?;
        }
        for (name, data) in &lost_maps {
            let path = maps_dir.join(name);
            data.pin(&path).map_err(|e| InterceptError::Pin { path, reason: e.to_string() })?;
        }
        Ok(PinRepair::Restored { links: lost_links.len(), maps: lost_maps.len() })
    }

    /// Writes the intercept set to the tries: new entries first, then
    /// stale ones removed, so no intercepted destination is ever missing.
    pub fn set_destinations(&self, set: &InterceptSet) -> Result<(), InterceptError> {
        let entries = set.map_entries()?;
        let mut guard = self.tries.lock().map_err(|_| InterceptError::Missing("intercept trie lock"))?;
        let (v4, v6) = &mut *guard;
        let mut want_v4 = Vec::new();
        let mut want_v6 = Vec::new();
        for (net, ports) in entries {
            match net {
                IpNet::V4(n) => {
                    let key = Key::new(u32::from(n.prefix_len()), n.network().octets());
                    v4.insert(&key, ports, 0).map_err(map_err(names::INTERCEPT_V4))?;
                    want_v4.push((key.prefix_len(), key.data()));
                }
                IpNet::V6(n) => {
                    let key = Key::new(u32::from(n.prefix_len()), n.network().octets());
                    v6.insert(&key, ports, 0).map_err(map_err(names::INTERCEPT_V6))?;
                    want_v6.push((key.prefix_len(), key.data()));
                }
            }
        }
        let stale_v4: Vec<Key<[u8; 4]>> =
            v4.keys().filter_map(Result::ok).filter(|k| !want_v4.contains(&(k.prefix_len(), k.data()))).collect();
        for key in stale_v4 {
            v4.remove(&key).map_err(map_err(names::INTERCEPT_V4))?;
        }
        let stale_v6: Vec<Key<[u8; 16]>> =
            v6.keys().filter_map(Result::ok).filter(|k| !want_v6.contains(&(k.prefix_len(), k.data()))).collect();
        for key in stale_v6 {
            v6.remove(&key).map_err(map_err(names::INTERCEPT_V6))?;
        }
        Ok(())
    }

    /// Takes (looks up and deletes) the record of a connection accepted on
    /// `local_port` in the namespace `netns_cookie`.
    pub fn take_record(&self, peer: SocketAddr, local_port: u16, netns_cookie: u64) -> Option<ConnRecord> {
        let key =
            SockKey { addr: addr_words(peer.ip()), port: peer.port(), proxy_port: local_port, _pad: 0, netns_cookie };
        let mut map = self.original.lock().ok()?;
        let record = map.get(&key, 0).ok()?;
        // A failed delete only leaves the entry to the LRU.
        let _ = map.remove(&key);
        Some(record)
    }

    /// The redirect settings the programs run with.
    pub fn redirect_config(&self) -> RedirectConfig {
        self.redirect
    }

    /// Ends this gateway's interception according to `mode`.
    pub fn shutdown(mut self, mode: crate::config::ShutdownMode) -> Result<(), InterceptError> {
        match mode {
            crate::config::ShutdownMode::Enforce => {
                // A bpffs mounted again since the watcher's last look: pin there now.
                match self.restore_pins() {
                    Ok(PinRepair::Restored { links, maps }) => tracing::warn!(
                        target: "gateway::intercept",
                        event = "pins_restored",
                        links,
                        maps,
                        pin_dir = %self.pin_dir.display(),
                        "pinned the links and maps again on the bpf file system mounted at the pin directory"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::error!(
                        target: "gateway::intercept",
                        error = %format!("{:#}", anyhow::Error::new(e)),
                        "cannot pin the links again"
                    ),
                }
                let missing = self.missing_pins();
                if missing > 0 {
                    tracing::error!(
                        target: "gateway::intercept",
                        event = "pins_lost",
                        missing,
                        pin_dir = %self.pin_dir.display(),
                        "exiting with link pins gone (bpffs unmounted?): those programs detach with this process, \
                         so jobs connect uncaptured until a gateway starts again"
                    );
                }
                // The pins keep the programs attached; from now on they refuse.
                let stopped = RedirectConfig { mode: Mode::Deny as u32, gateway_tgid: 0, ..self.redirect };
                let mut config = self.config.lock().map_err(|_| InterceptError::Missing("config lock"))?;
                config.set(0, stopped, 0).map_err(map_err(names::CONFIG))
            }
            crate::config::ShutdownMode::Detach => {
                // Unpinning (in detach_all) drops the last reference to each link.
                self.links.get_mut().map(Vec::clear).map_err(|_| InterceptError::Missing("links lock"))?;
                detach_all(&self.pin_dir)
            }
        }
    }
}

/// A link this gateway attached: its own descriptor of it and its pin.
struct HeldLink {
    path: PathBuf,
    fd: OwnedFd,
}

impl HeldLink {
    fn is_pinned(&self) -> bool {
        fs::symlink_metadata(&self.path).is_ok()
    }

    /// Pins the link at its path; the descriptor stays, whatever happens.
    fn pin(&self) -> Result<(), InterceptError> {
        bpffs::pin(self.fd.as_fd(), &self.path)
            .map_err(|e| InterceptError::Pin { path: self.path.clone(), reason: format!("BPF_OBJ_PIN: {e}") })
    }
}

/// What [`Interceptor::restore_pins`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinRepair {
    /// Every pin is where it was put.
    Intact,
    /// Pins are gone and no bpffs is mounted at the pin directory: nothing done.
    NoBpffs {
        /// Link pins gone.
        links: usize,
        /// Map pins gone.
        maps: usize,
    },
    /// Pins were gone and are back, on the bpffs mounted there now.
    Restored {
        /// Links pinned again.
        links: usize,
        /// Maps pinned again.
        maps: usize,
    },
}

/// Pins the maps `gateway status` reads, replacing an earlier gateway's pins.
fn pin_maps(ebpf: &Ebpf, maps_dir: &Path) -> Result<(), InterceptError> {
    fs::create_dir_all(maps_dir)
        .map_err(|source| InterceptError::Io { what: format!("creating {}", maps_dir.display()), source })?;
    for name in PINNED_MAPS {
        let path = maps_dir.join(name);
        let pin_err = |reason: String| InterceptError::Pin { path: path.clone(), reason };
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(pin_err(e.to_string())),
        }
        let map = ebpf.map(name).ok_or(InterceptError::Missing(name))?;
        map.pin(&path).map_err(|e| pin_err(e.to_string()))?;
    }
    Ok(())
}

fn pins_in(dir: &Path) -> Result<Vec<PathBuf>, InterceptError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(InterceptError::Io { what: format!("listing {}", dir.display()), source }),
    };
    Ok(entries.filter_map(Result::ok).map(|e| e.path()).collect())
}

fn remove_link_pin(path: &Path) -> Result<(), InterceptError> {
    match PinnedLink::from_pin(path) {
        // Unpinning drops the last reference: the kernel detaches the link.
        Ok(link) => {
            link.unpin().map(drop).map_err(|e| InterceptError::Pin { path: path.to_owned(), reason: e.to_string() })
        }
        // Not a link (or already gone): remove the file so it cannot confuse the next start.
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "removing unreadable pin");
            match fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(err) => Err(InterceptError::Pin { path: path.to_owned(), reason: err.to_string() }),
            }
        }
    }
}

/// Detaches every program pinned under `pin_dir` and removes the pins
/// (`gateway detach`, and clean shutdown in `detach` mode).
pub fn detach_all(pin_dir: &Path) -> Result<(), InterceptError> {
    for path in pins_in(&pin_dir.join("links"))? {
        remove_link_pin(&path)?;
    }
    for path in pins_in(&pin_dir.join("maps"))? {
        fs::remove_file(&path).map_err(|e| InterceptError::Pin { path: path.clone(), reason: e.to_string() })?;
    }
    for dir in [pin_dir.join("links"), pin_dir.join("maps"), pin_dir.to_owned()] {
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(InterceptError::Io { what: format!("removing {}", dir.display()), source }),
        }
    }
    Ok(())
}

/// A served namespace as `gateway status` lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NamespaceStatus {
    /// Its cookie (what connection events report as `netns`).
    pub cookie: u64,
    /// A process the gateway found it through.
    pub pid: u32,
    /// That process's cgroup id.
    pub cgroup_id: u64,
    /// That cgroup's path (`/a/b`), when it still exists.
    pub cgroup: Option<String>,
    /// Whether it is the gateway's own namespace.
    pub host: bool,
    /// Whether it has an IPv4 listener.
    pub v4: bool,
    /// Whether it has an IPv6 listener.
    pub v6: bool,
}

/// The `STATS` counters by the name `gateway status` and the metrics give
/// them, in slot order.
pub const STAT_NAMES: [(Stat, &str); STATS_LEN as usize] = [
    (Stat::Redirected, "redirected"),
    (Stat::DeniedStopped, "denied_stopped"),
    (Stat::DeniedNetns, "denied_netns"),
    (Stat::SkippedSelf, "skipped_self"),
    (Stat::Established, "established"),
    (Stat::ReleasedUnestablished, "released_unestablished"),
    (Stat::RedirectedPort, "redirected_port"),
    (Stat::DeniedUdp, "denied_udp"),
    (Stat::SpoofedMark, "spoofed_mark"),
    (Stat::DeniedNoV6, "denied_no_v6"),
];

/// Every `STATS` counter summed over CPUs, named as in [`STAT_NAMES`].
fn sum_stats<T: std::borrow::Borrow<MapData>>(
    stats: &PerCpuArray<T, u64>,
) -> Result<Vec<(&'static str, u64)>, InterceptError> {
    STAT_NAMES
        .iter()
        .map(|&(stat, name)| {
            let values = stats.get(&(stat as u32), 0).map_err(map_err(names::STATS))?;
            Ok((name, values.iter().sum()))
        })
        .collect()
}

impl Interceptor {
    /// The programs' counters (`STATS`, summed over CPUs), read now: what
    /// `gateway status` prints and `/metrics` exports.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, InterceptError> {
        let ebpf = self.ebpf.lock().map_err(|_| InterceptError::Missing("ebpf lock"))?;
        let map = ebpf.map(names::STATS).ok_or(InterceptError::Missing(names::STATS))?;
        let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_err(names::STATS))?;
        sum_stats(&stats)
    }
}

/// What `gateway status` reports, read from the pinned maps.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// `redirect` while a gateway runs, `deny` after a clean shutdown.
    pub mode: String,
    /// The tgid the programs treat as the gateway (0 when stopped).
    pub gateway_tgid: u32,
    /// The mark on the gateway's upstream sockets (chosen at start unless configured).
    pub upstream_mark: u32,
    /// Ports captured whatever the address (empty: port capture off).
    pub capture_ports: Vec<u16>,
    /// Namespaces with a proxy listener.
    pub namespaces: Vec<NamespaceStatus>,
    /// Number of links pinned (programs x cgroups).
    pub links: usize,
    /// Records waiting for establishment (by socket cookie).
    pub pending: usize,
    /// Records waiting for the proxy to accept (by 4-tuple).
    pub original: usize,
    /// Counters summed over CPUs.
    pub stats: std::collections::BTreeMap<String, u64>,
}

impl Status {
    /// Reads the pinned state under `pin_dir`; `None` when nothing is pinned.
    pub fn read(pin_dir: &Path) -> Result<Option<Status>, InterceptError> {
        let maps = pin_dir.join("maps");
        if !maps.join(names::CONFIG).exists() {
            return Ok(None);
        }
        let open = |name: &'static str| -> Result<Map, InterceptError> {
            let data = MapData::from_pin(maps.join(name)).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        };
        let config: Array<MapData, RedirectConfig> =
            Array::try_from(open(names::CONFIG)?).map_err(map_err(names::CONFIG))?;
        let cfg = config.get(&0, 0).map_err(map_err(names::CONFIG))?;
        let pending: BpfHashMap<MapData, u64, ConnRecord> =
            BpfHashMap::try_from(open(names::PENDING)?).map_err(map_err(names::PENDING))?;
        let original: BpfHashMap<MapData, SockKey, ConnRecord> =
            BpfHashMap::try_from(open(names::ORIGINAL)?).map_err(map_err(names::ORIGINAL))?;
        let stats: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(open(names::STATS)?).map_err(map_err(names::STATS))?;
        let served: BpfHashMap<MapData, u64, ServedNetns> =
            BpfHashMap::try_from(open(names::SERVED_NETNS)?).map_err(map_err(names::SERVED_NETNS))?;
        let mut namespaces: Vec<NamespaceStatus> = served
            .iter()
            .filter_map(Result::ok)
            .map(|(cookie, s)| NamespaceStatus {
                cookie,
                pid: s.pid,
                cgroup_id: s.cgroup_id,
                cgroup: None,
                host: s.flags & SERVED_HOST != 0,
                v4: s.flags & SERVED_V4 != 0,
                v6: s.flags & SERVED_V6 != 0,
            })
            .collect();
        namespaces.sort_by_key(|n| (!n.host, n.cookie));
        if namespaces.iter().any(|n| !n.host) {
            if let Ok(mount) = cgroup::cgroup2_mount() {
                let ids: Vec<u64> = namespaces.iter().filter(|n| !n.host).map(|n| n.cgroup_id).collect();
                let paths = cgroup::paths_of_ids(&mount, &ids);
                for ns in namespaces.iter_mut() {
                    ns.cgroup = paths.get(&ns.cgroup_id).cloned();
                }
            }
        }
        let counters = sum_stats(&stats)?.into_iter().map(|(name, value)| (name.to_owned(), value)).collect();
        Ok(Some(Status {
            mode: match cfg.mode() {
                Mode::Redirect => "redirect".into(),
                Mode::Deny => "deny".into(),
            },
            gateway_tgid: cfg.gateway_tgid,
            upstream_mark: cfg.upstream_mark,
            capture_ports: if cfg.capture_ports.len == 0 {
                Vec::new()
            } else {
                cfg.capture_ports.ports[..usize::from(cfg.capture_ports.len).min(MAX_PORTS)].to_vec()
            },
            namespaces,
            links: pins_in(&pin_dir.join("links"))?.len(),
            pending: pending.keys().filter(Result::is_ok).count(),
            original: original.keys().filter(Result::is_ok).count(),
            stats: counters,
        }))
    }
}

/// Mounts tracefs at its usual place when nothing is there (minimal hosts
/// and fresh containers boot without it): tracepoints are found through it.
/// Failing is not fatal; the caller reports what it could not read.
fn mount_tracefs() {
    let at = Path::new("/sys/kernel/tracing");
    if at.join("events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return;
    }
    let flags = nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC;
    match nix::mount::mount(Some("tracefs"), at, Some("tracefs"), flags, None::<&str>) {
        Ok(()) => tracing::info!(path = %at.display(), "mounted tracefs to watch cgroup moves and namespace changes"),
        Err(e) => tracing::warn!(path = %at.display(), error = %e, "cannot mount tracefs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_words_round_trip() {
        for ip in ["127.0.0.1", "10.1.2.3", "::1", "fd00::1234", "::ffff:1.2.3.4"] {
            let ip: IpAddr = ip.parse().unwrap();
            let back = words_addr(addr_words(ip));
            let expect = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
                v4 => v4,
            };
            assert_eq!(back, expect);
        }
        // The same words as the eBPF side builds for an IPv4 socket.
        let v4: Ipv4Addr = "127.0.0.1".parse().unwrap();
        let be = u32::from_ne_bytes(v4.octets());
        assert_eq!(addr_words(IpAddr::V4(v4)), gateway_common::v4_mapped(be));
    }
}
