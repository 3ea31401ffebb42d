//! The `#[repr(C)]` contract between the eBPF programs and the gateway.
//!
//! Every type here is written by one side and read by the other through a BPF
//! map, so field order, sizes and byte orders are part of the ABI. Addresses
//! are always stored as IPv6 (IPv4 as `::ffff:a.b.c.d`) in network byte order,
//! one `u32` word at a time exactly as the kernel hands them over; ports are in
//! host byte order.
#![no_std]

/// Length of a task's `comm`, including the trailing NUL.
pub const COMM_LEN: usize = 16;

/// Maximum number of ports one intercept-set entry can restrict itself to.
pub const MAX_PORTS: usize = 16;

/// `AF_INET`, as the kernel reports it in socket contexts.
pub const AF_INET: u32 = 2;
/// `AF_INET6`, as the kernel reports it in socket contexts.
pub const AF_INET6: u32 = 10;

/// Names of the maps and programs in the object, shared so neither side can
/// drift from the other.
pub mod names {
    /// LPM trie of IPv4 destinations to intercept.
    pub const INTERCEPT_V4: &str = "INTERCEPT_V4";
    /// LPM trie of IPv6 destinations to intercept.
    pub const INTERCEPT_V6: &str = "INTERCEPT_V6";
    /// Single-entry array holding [`super::RedirectConfig`].
    pub const CONFIG: &str = "CONFIG";
    /// LRU map: socket cookie -> [`super::ConnRecord`] between connect() and establishment.
    pub const PENDING: &str = "PENDING";
    /// LRU map: [`super::SockKey`] -> [`super::ConnRecord`] until the proxy accepts.
    pub const ORIGINAL: &str = "ORIGINAL";
    /// Per-CPU array of counters indexed by [`super::Stat`].
    pub const STATS: &str = "STATS";
    /// cgroup/connect4 program.
    pub const PROG_CONNECT4: &str = "gw_connect4";
    /// cgroup/connect6 program.
    pub const PROG_CONNECT6: &str = "gw_connect6";
    /// sock_ops program that re-keys records by 4-tuple once a connection is established.
    pub const PROG_SOCK_OPS: &str = "gw_sock_ops";
    /// cgroup/sock_release program that drops records of sockets that never connected.
    pub const PROG_SOCK_RELEASE: &str = "gw_sock_release";
    /// LRU map: tgid -> epoch token of a process the gateway has attested;
    /// the kernel deletes the entry when the process execs or exits.
    pub const PROCESS_EPOCH: &str = "PROCESS_EPOCH";
    /// Raw tracepoint program (sched_process_exec) that ends an epoch.
    pub const PROG_EXEC: &str = "gw_exec";
    /// Raw tracepoint program (sched_process_exit) that ends an epoch.
    pub const PROG_EXIT: &str = "gw_exit";
    /// Hash map: network namespace cookie -> [`super::ServedNetns`], the
    /// namespaces in which the gateway has a listener.
    pub const SERVED_NETNS: &str = "SERVED_NETNS";
    /// Ring buffer of [`super::Alert`]s: what the programs refused or noticed.
    pub const ALERTS: &str = "ALERTS";
    /// cgroup/sendmsg4 program: refuses UDP datagrams to captured destinations.
    pub const PROG_SENDMSG4: &str = "gw_sendmsg4";
    /// cgroup/sendmsg6 program: refuses UDP datagrams to captured destinations.
    pub const PROG_SENDMSG6: &str = "gw_sendmsg6";
    /// Tracepoint program (cgroup/cgroup_attach_task): reports processes moved between cgroups.
    pub const PROG_CGROUP_ATTACH: &str = "gw_cgroup_attach";
    /// Tracepoint program (syscalls/sys_exit_setns and sys_exit_unshare):
    /// reports threads that entered namespaces.
    pub const PROG_NAMESPACE_ENTERED: &str = "gw_namespace_entered";
}

/// Layout of the `cgroup:cgroup_attach_task` tracepoint record the
/// programs read (checked against the kernel's format file before attaching).
pub mod attach_tp {
    /// Offset of `int dst_root` (the hierarchy id; 0 is cgroup v2).
    pub const DST_ROOT: usize = 8;
    /// Offset of `u64 dst_id` (the destination cgroup's id).
    pub const DST_ID: usize = 16;
    /// Offset of `int pid` (the task that moved).
    pub const PID: usize = 24;
}

/// Layout of the `syscalls:sys_exit_*` tracepoint records the programs read
/// (checked against the kernel's format files before attaching).
pub mod sys_exit_tp {
    /// Offset of `long ret` (the syscall's return value).
    pub const RET: usize = 16;
}

/// UDP port left alone even when captured: DNS must keep working.
pub const DNS_PORT: u16 = 53;

/// Capacity of the `PROCESS_EPOCH` map: processes whose attestation the
/// gateway can keep at once.
pub const PROCESS_EPOCHS: u32 = 65536;

/// What the connect hooks do with a connection bound for the intercept set.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Rewrite the destination to the proxy's listener.
    Redirect = 1,
    /// Refuse the connect() with EPERM: the gateway has stopped but
    /// enforcement stays (fail closed).
    Deny = 2,
}

/// Global settings of the redirect programs (the single entry of `CONFIG`).
///
/// The proxy listens on the same address and port in every namespace it
/// serves, so one target serves all of them; which namespaces have a
/// listener is `SERVED_NETNS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectConfig {
    /// The proxy's IPv4 listener address, network byte order.
    pub proxy_v4: u32,
    /// The proxy's IPv6 listener address, network byte order words.
    pub proxy_v6: [u32; 4],
    /// The proxy's listener port, host byte order.
    pub proxy_port: u16,
    /// Padding, always zero.
    pub _pad0: u16,
    /// A [`Mode`] value; zero (unset) behaves as `Deny` so a half-filled
    /// configuration never lets traffic around the gateway.
    pub mode: u32,
    /// The gateway's own tgid: its connections are never redirected.
    pub gateway_tgid: u32,
    /// Socket mark the gateway sets on upstream sockets. Only a socket of
    /// the gateway's own tgid is trusted with it; on any other socket it is
    /// counted as spoofed and ignored.
    pub upstream_mark: u32,
    /// Ports captured whatever the address (port capture); an empty set
    /// (`len == 0`) turns port capture off.
    pub capture_ports: PortSet,
    /// Padding, always zero.
    pub _pad1: u16,
}

impl RedirectConfig {
    /// The mode as an enum; unknown values fail closed.
    pub fn mode(&self) -> Mode {
        if self.mode == Mode::Redirect as u32 {
            Mode::Redirect
        } else {
            Mode::Deny
        }
    }

    /// Whether port capture takes `port` (host byte order) whatever the address.
    #[inline(always)]
    pub fn captures_port(&self, port: u16) -> bool {
        // An empty `capture_ports` means "port capture off", not "every
        // port" as it does for an intercept-set entry.
        self.capture_ports.len != 0 && self.capture_ports.contains(port)
    }
}

/// One intercept-set entry: which ports of a CIDR are intercepted.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSet {
    /// Ports in host byte order; only the first `len` are meaningful.
    pub ports: [u16; MAX_PORTS],
    /// Number of ports in use; zero means every port.
    pub len: u16,
}

impl PortSet {
    /// Every port of the prefix.
    pub const ALL: PortSet = PortSet { ports: [0; MAX_PORTS], len: 0 };

    /// Whether `port` (host byte order) is intercepted.
    #[inline(always)]
    pub fn contains(&self, port: u16) -> bool {
        if self.len == 0 {
            return true;
        }
        let mut i = 0;
        while i < MAX_PORTS {
            if i >= self.len as usize {
                return false;
            }
            if self.ports[i] == port {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// What the kernel knew about a redirected connection at connect() time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRecord {
    /// Original destination address (IPv4 mapped into IPv6), network byte order words.
    pub orig_addr: [u32; 4],
    /// Original destination port, host byte order.
    pub orig_port: u16,
    /// Address family of the original destination ([`AF_INET`] or [`AF_INET6`]).
    pub orig_family: u16,
    /// Thread group id (the user-space pid).
    pub tgid: u32,
    /// Thread id that called connect().
    pub pid: u32,
    /// Real uid of the caller.
    pub uid: u32,
    /// Real gid of the caller.
    pub gid: u32,
    /// How the connection was captured: a [`Capture`] value.
    pub capture: u32,
    /// cgroup v2 id of the caller.
    pub cgroup_id: u64,
    /// Network namespace cookie of the socket.
    pub netns_cookie: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at connect().
    pub ts_ns: u64,
    /// The caller's `comm`, NUL padded.
    pub comm: [u8; COMM_LEN],
}

/// Why a connect() was sent to the proxy (the `capture` of a [`ConnRecord`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capture {
    /// The address is in the intercept set: a protected destination.
    Destination = 1,
    /// Captured only because of its port (port capture).
    Port = 2,
}

impl Capture {
    /// The kind a record carries; anything unknown is treated as the
    /// stricter `Destination`.
    pub fn from_raw(raw: u32) -> Capture {
        if raw == Capture::Port as u32 {
            Capture::Port
        } else {
            Capture::Destination
        }
    }

    /// The name used in events: `destination` or `port`.
    pub fn as_str(self) -> &'static str {
        match self {
            Capture::Destination => "destination",
            Capture::Port => "port",
        }
    }
}

/// Key of `ORIGINAL`: the redirected socket as the proxy sees its peer.
/// The namespace cookie keeps `127.0.0.1:port` of two namespaces apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// The client's (peer's) address, IPv4 mapped into IPv6, network byte order words.
    pub addr: [u32; 4],
    /// The client's port, host byte order.
    pub port: u16,
    /// The proxy listener port the client was sent to, host byte order.
    pub proxy_port: u16,
    /// Padding, always zero (part of the hash key).
    pub _pad: u32,
    /// Network namespace cookie of the client's socket.
    pub netns_cookie: u64,
}

/// Value of `SERVED_NETNS`: a namespace in which the proxy listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServedNetns {
    /// [`SERVED_V4`] and/or [`SERVED_V6`]: which listener addresses exist there.
    pub flags: u32,
    /// A process of the namespace the gateway found it through.
    pub pid: u32,
    /// That process's cgroup id.
    pub cgroup_id: u64,
}

/// `ServedNetns::flags`: the IPv4 listener exists in the namespace.
pub const SERVED_V4: u32 = 1;
/// `ServedNetns::flags`: the IPv6 listener exists in the namespace.
pub const SERVED_V6: u32 = 2;
/// `ServedNetns::flags`: the gateway's own namespace (its main listeners).
pub const SERVED_HOST: u32 = 4;

/// What an [`Alert`] reports.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertKind {
    /// A connect() from a namespace without a listener was refused.
    UnservedNetns = 1,
    /// A UDP datagram (or UDP connect) to a captured destination was refused.
    UdpRefused = 2,
    /// A socket not owned by the gateway carried the gateway's upstream mark.
    SpoofedMark = 3,
    /// A process was moved to another cgroup (v2); `other` is the destination cgroup id.
    CgroupAttach = 4,
    /// A thread's `setns` or `unshare` succeeded: it may now be in a network
    /// namespace the gateway does not serve yet. `tgid` holds the thread id,
    /// `other` the process id.
    NamespaceEntered = 5,
}

/// One entry of the `ALERTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alert {
    /// An [`AlertKind`] value.
    pub kind: u32,
    /// The process concerned (the caller, or the task that moved).
    pub tgid: u32,
    /// cgroup id of the caller.
    pub cgroup_id: u64,
    /// Network namespace cookie of the socket (0 when not about a socket).
    pub netns_cookie: u64,
    /// Destination address (IPv4 mapped), network byte order words.
    pub addr: [u32; 4],
    /// Destination port, host byte order.
    pub port: u16,
    /// Address family of the destination.
    pub family: u16,
    /// Padding, always zero.
    pub _pad: u32,
    /// Kind-specific: the destination cgroup id of a [`AlertKind::CgroupAttach`],
    /// the process id of a [`AlertKind::NamespaceEntered`].
    pub other: u64,
    /// The caller's `comm`, NUL padded.
    pub comm: [u8; COMM_LEN],
}

/// Size of the `ALERTS` ring buffer in bytes (a power of two, page aligned).
pub const ALERTS_BYTES: u32 = 256 * 1024;

/// Indices of the `STATS` counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Connects rewritten to the proxy.
    Redirected = 0,
    /// Connects refused because the gateway is stopped.
    DeniedStopped = 1,
    /// Connects refused because their network namespace has no listener (yet).
    DeniedNetns = 2,
    /// Connects left alone because the gateway made them.
    SkippedSelf = 3,
    /// Redirected sockets re-keyed by 4-tuple at establishment.
    Established = 4,
    /// Redirected sockets released before they were established.
    ReleasedUnestablished = 5,
    /// Connects redirected only because of their port (a subset of `Redirected`).
    RedirectedPort = 6,
    /// UDP datagrams or UDP connects refused because their destination is captured.
    DeniedUdp = 7,
    /// Sockets that carried the upstream mark without belonging to the gateway.
    SpoofedMark = 8,
    /// Connects refused because the namespace has no IPv6 listener.
    DeniedNoV6 = 9,
}

/// Number of `STATS` slots.
pub const STATS_LEN: u32 = 10;

/// Maps `family:addr` words for an IPv4 address (network byte order u32) to the
/// IPv4-mapped IPv6 form used in every key and record.
#[inline(always)]
pub const fn v4_mapped(addr_be: u32) -> [u32; 4] {
    // 0000:0000:0000:0000:0000:ffff: in network byte order is the byte
    // sequence 00 00 ff ff, which as a native little- or big-endian word is
    // the same bytes: build it from bytes so the constant is endian-free.
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), addr_be]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], contain only integers and arrays
    // of integers, and have no padding the kernel could leave uninitialised
    // (explicit `_pad` fields cover alignment holes).
    unsafe impl aya::Pod for super::RedirectConfig {}
    unsafe impl aya::Pod for super::PortSet {}
    unsafe impl aya::Pod for super::ConnRecord {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::ServedNetns {}
    unsafe impl aya::Pod for super::Alert {}
}
