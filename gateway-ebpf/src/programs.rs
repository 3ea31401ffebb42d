use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
        generated::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, raw_tracepoint, sock_ops, tracepoint},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, SockAddrContext, SockContext, SockOpsContext, TracePointContext},
    EbpfContext,
};
use gateway_common::{
    attach_tp, sys_exit_tp, v4_mapped, Alert, AlertKind, Capture, ConnRecord, Mode, PortSet, RedirectConfig,
    ServedNetns, SockKey, Stat, AF_INET, AF_INET6, ALERTS_BYTES, COMM_LEN, DNS_PORT, PROCESS_EPOCHS, SERVED_V4,
    SERVED_V6, STATS_LEN,
};

/// Return value of cgroup hooks that lets the operation proceed.
const PROCEED: i32 = 1;
/// Return value of cgroup hooks that fails the operation with EPERM.
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const RECORDS: u32 = 65536;
/// Namespaces the gateway can serve at once.
const NAMESPACES: u32 = 4096;

#[map]
static INTERCEPT_V4: LpmTrie<[u8; 4], PortSet> = LpmTrie::with_max_entries(16384, 0);

#[map]
static INTERCEPT_V6: LpmTrie<[u8; 16], PortSet> = LpmTrie::with_max_entries(16384, 0);

#[map]
static CONFIG: Array<RedirectConfig> = Array::with_max_entries(1, 0);

#[map]
static PENDING: LruHashMap<u64, ConnRecord> = LruHashMap::with_max_entries(RECORDS, 0);

#[map]
static ORIGINAL: LruHashMap<SockKey, ConnRecord> = LruHashMap::with_max_entries(RECORDS, 0);

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

/// Written by the gateway only: the namespaces in which it listens.
#[map]
static SERVED_NETNS: HashMap<u64, ServedNetns> = HashMap::with_max_entries(NAMESPACES, 0);

#[map]
static ALERTS: RingBuf = RingBuf::with_byte_size(ALERTS_BYTES, 0);

/// Written by the gateway only (tgid -> token); deleting an entry is how the
/// kernel tells it that the process it attested is no longer that image.
#[map]
static PROCESS_EPOCH: LruHashMap<u32, u64> = LruHashMap::with_max_entries(PROCESS_EPOCHS, 0);

#[inline(always)]
fn count(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // Per-CPU slot: no other CPU writes it, a plain add is enough.
        unsafe { *slot += 1 };
    }
}

/// Tells the gateway what happened; a full ring only loses the alert
/// (the counters still count it).
#[inline(always)]
fn alert(kind: AlertKind, netns: u64, dst: &Destination, other: u64) {
    let entry = Alert {
        kind: kind as u32,
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie: netns,
        addr: dst.addr,
        port: dst.port,
        family: dst.family,
        _pad: 0,
        other,
        comm: bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]),
    };
    let _ = ALERTS.output::<Alert>(&entry, 0);
}

/// What to do with an intercepted connect().
#[derive(PartialEq, Eq)]
enum Verdict {
    /// Rewrite the destination to the proxy.
    Redirect,
    /// Leave it alone (the gateway's own socket).
    Leave,
    /// Fail it with EPERM.
    Refuse,
}

/// The original destination of a connect(), before any rewrite.
struct Destination {
    addr: [u32; 4],
    port: u16,
    family: u16,
}

/// Addresses port capture never takes: the namespace's own loopback, the
/// unspecified address, link-local (per link: the gateway's upstream socket
/// could not reach the same peer) and multicast/broadcast.
#[inline(always)]
fn local_v4(ip_be: u32) -> bool {
    let o = ip_be.to_ne_bytes();
    o[0] == 127 || o[0] == 0 || (o[0] == 169 && o[1] == 254) || o[0] >= 224
}

/// IPv6 counterpart of [`local_v4`]: `::1`, `::`, `fe80::/10`, `ff00::/8`.
#[inline(always)]
fn local_v6(addr: &[u32; 4]) -> bool {
    let b0 = addr[0].to_ne_bytes();
    if b0[0] == 0xff || (b0[0] == 0xfe && (b0[1] & 0xc0) == 0x80) {
        return true;
    }
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && (addr[3] == 0 || addr[3] == u32::from_ne_bytes([0, 0, 0, 1]))
}

#[inline(always)]
fn intercepted_v4(ip_be: u32, port: u16) -> bool {
    match INTERCEPT_V4.get(&Key::new(32, ip_be.to_ne_bytes())) {
        Some(ports) => ports.contains(port),
        None => false,
    }
}

#[inline(always)]
fn intercepted_v6(addr: &[u32; 4], port: u16) -> bool {
    let mut bytes = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = addr[i].to_ne_bytes();
        bytes[i * 4] = b[0];
        bytes[i * 4 + 1] = b[1];
        bytes[i * 4 + 2] = b[2];
        bytes[i * 4 + 3] = b[3];
        i += 1;
    }
    match INTERCEPT_V6.get(&Key::new(128, bytes)) {
        Some(ports) => ports.contains(port),
        None => false,
    }
}

/// How an IPv4 destination is captured, if at all.
#[inline(always)]
fn capture_v4(cfg: &RedirectConfig, ip_be: u32, port: u16) -> Option<Capture> {
    if intercepted_v4(ip_be, port) {
        Some(Capture::Destination)
    } else if cfg.captures_port(port) && !local_v4(ip_be) {
        Some(Capture::Port)
    } else {
        None
    }
}

/// How an IPv6 destination is captured, if at all.
#[inline(always)]
fn capture_v6(cfg: &RedirectConfig, addr: &[u32; 4], port: u16) -> Option<Capture> {
    if intercepted_v6(addr, port) {
        Some(Capture::Destination)
    } else if cfg.captures_port(port) && !local_v6(addr) {
        Some(Capture::Port)
    } else {
        None
    }
}

#[inline(always)]
fn is_v4_mapped(w0: u32, w1: u32, w2: u32) -> bool {
    w0 == 0 && w1 == 0 && w2 == v4_mapped(0)[2]
}

#[cgroup_sock_addr(connect4)]
pub fn gw_connect4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(cfg) = CONFIG.get(0) else {
        return REFUSE;
    };
    let ip = sa.user_ip4;
    let port = u16::from_be(sa.user_port as u16);
    if sa.type_ == SOCK_DGRAM {
        return udp_v4(&ctx, cfg, ip, port);
    }
    if sa.type_ != SOCK_STREAM {
        return PROCEED;
    }
    if ip == cfg.proxy_v4 && port == cfg.proxy_port {
        return PROCEED;
    }
    let Some(capture) = capture_v4(cfg, ip, port) else {
        return PROCEED;
    };
    let dst = Destination { addr: v4_mapped(ip), port, family: AF_INET as u16 };
    match claim(&ctx, sa, cfg, &dst, capture, false) {
        Verdict::Redirect => {
            sa.user_ip4 = cfg.proxy_v4;
            sa.user_port = u32::from(cfg.proxy_port.to_be());
            PROCEED
        }
        Verdict::Leave => PROCEED,
        Verdict::Refuse => REFUSE,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn gw_connect6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(cfg) = CONFIG.get(0) else {
        return REFUSE;
    };
    // One 32-bit word at a time: the verifier rejects wider context loads.
    let w0 = sa.user_ip6[0];
    let w1 = sa.user_ip6[1];
    let w2 = sa.user_ip6[2];
    let w3 = sa.user_ip6[3];
    let port = u16::from_be(sa.user_port as u16);
    let mapped = is_v4_mapped(w0, w1, w2);
    if sa.type_ == SOCK_DGRAM {
        return if mapped { udp_v4(&ctx, cfg, w3, port) } else { udp_v6(&ctx, cfg, &[w0, w1, w2, w3], port) };
    }
    if sa.type_ != SOCK_STREAM {
        return PROCEED;
    }

    if mapped {
        // A dual-stack socket dialling an IPv4 address.
        if w3 == cfg.proxy_v4 && port == cfg.proxy_port {
            return PROCEED;
        }
        let Some(capture) = capture_v4(cfg, w3, port) else {
            return PROCEED;
        };
        let dst = Destination { addr: [w0, w1, w2, w3], port, family: AF_INET as u16 };
        return match claim(&ctx, sa, cfg, &dst, capture, false) {
            Verdict::Redirect => {
                sa.user_ip6[3] = cfg.proxy_v4;
                sa.user_port = u32::from(cfg.proxy_port.to_be());
                PROCEED
            }
            Verdict::Leave => PROCEED,
            Verdict::Refuse => REFUSE,
        };
    }

    let addr = [w0, w1, w2, w3];
    if addr == cfg.proxy_v6 && port == cfg.proxy_port {
        return PROCEED;
    }
    let Some(capture) = capture_v6(cfg, &addr, port) else {
        return PROCEED;
    };
    let dst = Destination { addr, port, family: AF_INET6 as u16 };
    match claim(&ctx, sa, cfg, &dst, capture, true) {
        Verdict::Redirect => {
            sa.user_ip6[0] = cfg.proxy_v6[0];
            sa.user_ip6[1] = cfg.proxy_v6[1];
            sa.user_ip6[2] = cfg.proxy_v6[2];
            sa.user_ip6[3] = cfg.proxy_v6[3];
            sa.user_port = u32::from(cfg.proxy_port.to_be());
            PROCEED
        }
        Verdict::Leave => PROCEED,
        Verdict::Refuse => REFUSE,
    }
}

/// An unconnected UDP socket's sendto()/sendmsg() to an IPv4 address.
#[cgroup_sock_addr(sendmsg4)]
pub fn gw_sendmsg4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_DGRAM {
        return PROCEED;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return REFUSE;
    };
    udp_v4(&ctx, cfg, sa.user_ip4, u16::from_be(sa.user_port as u16))
}

/// An unconnected UDP socket's sendto()/sendmsg() to an IPv6 address.
#[cgroup_sock_addr(sendmsg6)]
pub fn gw_sendmsg6(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_DGRAM {
        return PROCEED;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return REFUSE;
    };
    let w0 = sa.user_ip6[0];
    let w1 = sa.user_ip6[1];
    let w2 = sa.user_ip6[2];
    let w3 = sa.user_ip6[3];
    let port = u16::from_be(sa.user_port as u16);
    if is_v4_mapped(w0, w1, w2) {
        udp_v4(&ctx, cfg, w3, port)
    } else {
        udp_v6(&ctx, cfg, &[w0, w1, w2, w3], port)
    }
}

/// UDP cannot be inspected (QUIC is encrypted end to end): to a captured
/// destination it is refused, so clients fall back to TCP, which is
/// redirected. DNS and every other UDP destination are left alone.
#[inline(always)]
fn udp_v4(ctx: &SockAddrContext, cfg: &RedirectConfig, ip_be: u32, port: u16) -> i32 {
    if port == DNS_PORT || capture_v4(cfg, ip_be, port).is_none() {
        return PROCEED;
    }
    refuse_udp(ctx, cfg, &Destination { addr: v4_mapped(ip_be), port, family: AF_INET as u16 })
}

/// IPv6 counterpart of [`udp_v4`].
#[inline(always)]
fn udp_v6(ctx: &SockAddrContext, cfg: &RedirectConfig, addr: &[u32; 4], port: u16) -> i32 {
    if port == DNS_PORT || capture_v6(cfg, addr, port).is_none() {
        return PROCEED;
    }
    refuse_udp(ctx, cfg, &Destination { addr: *addr, port, family: AF_INET6 as u16 })
}

#[inline(always)]
fn refuse_udp(ctx: &SockAddrContext, cfg: &RedirectConfig, dst: &Destination) -> i32 {
    if (bpf_get_current_pid_tgid() >> 32) as u32 == cfg.gateway_tgid {
        return PROCEED;
    }
    count(Stat::DeniedUdp);
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    alert(AlertKind::UdpRefused, netns, dst, 0);
    REFUSE
}

/// Decides what happens to a captured connect() and, when it is to be
/// redirected, records who made it.
#[inline(always)]
fn claim(
    ctx: &SockAddrContext,
    sa: &bpf_sock_addr,
    cfg: &RedirectConfig,
    dst: &Destination,
    capture: Capture,
    v6: bool,
) -> Verdict {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == cfg.gateway_tgid {
        count(Stat::SkippedSelf);
        return Verdict::Leave;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if carries_mark(sa, cfg) {
        // The mark is no pass: a job that guessed or read it is redirected
        // like any other, and reported.
        count(Stat::SpoofedMark);
        alert(AlertKind::SpoofedMark, netns, dst, 0);
    }
    if cfg.mode() == Mode::Deny {
        count(Stat::DeniedStopped);
        return Verdict::Refuse;
    }
    let Some(served) = (unsafe { SERVED_NETNS.get(&netns) }) else {
        // 127.0.0.1 in a namespace without a listener is not the proxy:
        // refuse, and tell the gateway so it starts serving the namespace.
        count(Stat::DeniedNetns);
        alert(AlertKind::UnservedNetns, netns, dst, 0);
        return Verdict::Refuse;
    };
    let needed = if v6 { SERVED_V6 } else { SERVED_V4 };
    if served.flags & needed == 0 {
        // The namespace has no listener of this family (IPv6 disabled
        // there, or `proxy.listen_v6: null`): refusing is the only way not
        // to let the connection around the gateway.
        count(Stat::DeniedNoV6);
        return Verdict::Refuse;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let record = ConnRecord {
        orig_addr: dst.addr,
        orig_port: dst.port,
        orig_family: dst.family,
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        capture: capture as u32,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie: netns,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]),
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if PENDING.insert(&cookie, &record, 0).is_err() {
        // Without a record the proxy could not attribute the connection.
        return Verdict::Refuse;
    }
    count(Stat::Redirected);
    if capture == Capture::Port {
        count(Stat::RedirectedPort);
    }
    Verdict::Redirect
}

/// Whether the socket carries the gateway's upstream mark.
#[inline(always)]
fn carries_mark(sa: &bpf_sock_addr, cfg: &RedirectConfig) -> bool {
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if sk.is_null() || cfg.upstream_mark == 0 {
        return false;
    }
    unsafe { (*sk).mark == cfg.upstream_mark }
}

#[sock_ops]
pub fn gw_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(record) = (unsafe { PENDING.get(&cookie) }) else {
        return 1;
    };
    let record = *record;
    // Volatile loads of both address forms: otherwise LLVM merges them into
    // one load at a computed context offset, which the verifier rejects.
    let ops = ctx.ops;
    let (ip4, ip6) = unsafe {
        (
            read_volatile(addr_of!((*ops).local_ip4)),
            [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ],
        )
    };
    let addr = if ctx.family() == AF_INET { v4_mapped(ip4) } else { ip6 };
    let key = SockKey {
        addr,
        port: ctx.local_port() as u16,
        // remote_port holds the big-endian port in its upper half on
        // little-endian machines; a 32-bit swap lands it in the low half.
        proxy_port: u32::from_be(ctx.remote_port()) as u16,
        _pad: 0,
        // The socket's namespace, recorded at connect(): the proxy knows it
        // from the listener that accepted the connection.
        netns_cookie: record.netns_cookie,
    };
    if ORIGINAL.insert(&key, &record, 0).is_ok() {
        count(Stat::Established);
    }
    let _ = PENDING.remove(&cookie);
    1
}

#[cgroup_sock(sock_release)]
pub fn gw_sock_release(ctx: SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if PENDING.remove(&cookie).is_ok() {
        count(Stat::ReleasedUnestablished);
    }
    PROCEED
}

/// A process replaced its image: whatever the gateway attested about it
/// (executable, environment, command line) no longer holds.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn gw_exec(_ctx: RawTracePointContext) -> i32 {
    // After exec the current task is the thread-group leader, whichever
    // thread called execve().
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let _ = PROCESS_EPOCH.remove(&tgid);
    0
}

/// A thread exited. Only the leader's exit ends the epoch: its pid is the
/// one that can be reused, and the process's parent chain may change for
/// its children. Other threads come and go without changing the process.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn gw_exit(_ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == pid_tgid as u32 {
        let _ = PROCESS_EPOCH.remove(&tgid);
    }
    0
}

/// A task was moved to another cgroup (a write to `cgroup.procs`, or a
/// container runtime placing its process). The gateway decides whether it
/// matters: a job leaving the intercepted tree, or a new process to serve.
#[tracepoint(category = "cgroup", name = "cgroup_attach_task")]
pub fn gw_cgroup_attach(ctx: TracePointContext) -> u32 {
    let root: i32 = unsafe { ctx.read_at(attach_tp::DST_ROOT) }.unwrap_or(-1);
    if root != 0 {
        // Only the cgroup v2 hierarchy (id 0) decides interception.
        return 0;
    }
    let dst_id: u64 = unsafe { ctx.read_at(attach_tp::DST_ID) }.unwrap_or(0);
    let pid: i32 = unsafe { ctx.read_at(attach_tp::PID) }.unwrap_or(0);
    report_task(AlertKind::CgroupAttach, pid as u32, dst_id);
    0
}

/// A thread's `setns` or `unshare` returned: it may have entered a network
/// namespace. A container runtime moves its process into the job's cgroup
/// before that process joins the container's namespace, so the cgroup move
/// alone finds it still in the host namespace; this report lets the gateway
/// serve the container's namespace before the job in it can connect.
/// Attached to `sys_exit_setns` and `sys_exit_unshare`, which are rare, so
/// every success is reported and the gateway filters.
#[tracepoint]
pub fn gw_namespace_entered(ctx: TracePointContext) -> u32 {
    let ret: i64 = unsafe { ctx.read_at(sys_exit_tp::RET) }.unwrap_or(-1);
    if ret != 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    // The thread, not the process: /proc/TID/ns/net is the namespace of the
    // thread that switched.
    report_task(AlertKind::NamespaceEntered, pid_tgid as u32, pid_tgid >> 32);
    0
}

/// Tells the gateway about a task (not a socket): `task` and `other` as
/// [`Alert`] documents them for `kind`.
#[inline(always)]
fn report_task(kind: AlertKind, task: u32, other: u64) {
    let entry = Alert {
        kind: kind as u32,
        tgid: task,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie: 0,
        addr: [0; 4],
        port: 0,
        family: 0,
        _pad: 0,
        other,
        comm: bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]),
    };
    let _ = ALERTS.output::<Alert>(&entry, 0);
}
