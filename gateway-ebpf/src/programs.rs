use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
        generated::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    macros::{cgroup_sock, cgroup_sock_addr, map, raw_tracepoint, sock_ops},
    maps::{lpm_trie::Key, Array, LpmTrie, LruHashMap, PerCpuArray},
    programs::{RawTracePointContext, SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};
use gateway_common::{
    v4_mapped, ConnRecord, Mode, PortSet, RedirectConfig, SockKey, Stat, AF_INET, AF_INET6, COMM_LEN, PROCESS_EPOCHS,
    STATS_LEN,
};

/// Return value of cgroup hooks that lets the operation proceed.
const PROCEED: i32 = 1;
/// Return value of cgroup hooks that fails the operation with EPERM.
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const RECORDS: u32 = 65536;

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

#[cgroup_sock_addr(connect4)]
pub fn gw_connect4(ctx: SockAddrContext) -> i32 {
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return PROCEED;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return REFUSE;
    };
    let ip = sa.user_ip4;
    let port = u16::from_be(sa.user_port as u16);
    if ip == cfg.proxy_v4 && port == cfg.proxy_port {
        return PROCEED;
    }
    if !intercepted_v4(ip, port) {
        return PROCEED;
    }
    let dst = Destination { addr: v4_mapped(ip), port, family: AF_INET as u16 };
    match claim(&ctx, sa, cfg, &dst) {
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
    if sa.type_ != SOCK_STREAM {
        return PROCEED;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return REFUSE;
    };
    // One 32-bit word at a time: the verifier rejects wider context loads.
    let w0 = sa.user_ip6[0];
    let w1 = sa.user_ip6[1];
    let w2 = sa.user_ip6[2];
    let w3 = sa.user_ip6[3];
    let port = u16::from_be(sa.user_port as u16);
    let mapped = v4_mapped(0)[2];

    if w0 == 0 && w1 == 0 && w2 == mapped {
        // A dual-stack socket dialling an IPv4 address.
        if w3 == cfg.proxy_v4 && port == cfg.proxy_port {
            return PROCEED;
        }
        if !intercepted_v4(w3, port) {
            return PROCEED;
        }
        let dst = Destination { addr: [w0, w1, w2, w3], port, family: AF_INET as u16 };
        return match claim(&ctx, sa, cfg, &dst) {
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
        Some(ports) if ports.contains(port) => {}
        _ => return PROCEED,
    }
    let dst = Destination { addr, port, family: AF_INET6 as u16 };
    match claim(&ctx, sa, cfg, &dst) {
        Verdict::Redirect if cfg.v6_enabled == 0 => {
            // Intercepted, but the proxy has no IPv6 listener: refuse rather
            // than let the connection around the gateway.
            let _ = PENDING.remove(&unsafe { bpf_get_socket_cookie(ctx.as_ptr()) });
            REFUSE
        }
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

#[inline(always)]
fn intercepted_v4(ip_be: u32, port: u16) -> bool {
    match INTERCEPT_V4.get(&Key::new(32, ip_be.to_ne_bytes())) {
        Some(ports) => ports.contains(port),
        None => false,
    }
}

/// Decides what happens to a connect() bound for the intercept set and, when
/// it is to be redirected, records who made it.
#[inline(always)]
fn claim(ctx: &SockAddrContext, sa: &bpf_sock_addr, cfg: &RedirectConfig, dst: &Destination) -> Verdict {
    if is_gateway(sa, cfg) {
        count(Stat::SkippedSelf);
        return Verdict::Leave;
    }
    if cfg.mode() == Mode::Deny {
        count(Stat::DeniedStopped);
        return Verdict::Refuse;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if cfg.host_netns_cookie != 0 && netns != cfg.host_netns_cookie {
        // 127.0.0.1 in another namespace is not our listener: refusing is
        // the only way not to bypass the gateway silently.
        count(Stat::DeniedNetns);
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
        _pad: 0,
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
    Verdict::Redirect
}

/// Whether the calling socket is the gateway's own (its tgid or its upstream
/// mark): those are never redirected.
#[inline(always)]
fn is_gateway(sa: &bpf_sock_addr, cfg: &RedirectConfig) -> bool {
    if (bpf_get_current_pid_tgid() >> 32) as u32 == cfg.gateway_tgid {
        return true;
    }
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    if !sk.is_null() && cfg.upstream_mark != 0 {
        let mark = unsafe { (*sk).mark };
        if mark == cfg.upstream_mark {
            return true;
        }
    }
    false
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
