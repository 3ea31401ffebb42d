//! The gateway's eBPF programs.
//!
//! * `gw_connect4` / `gw_connect6` (cgroup/connect4, cgroup/connect6): a TCP
//!   connect() bound for the intercept set is rewritten to the proxy's
//!   listener, and who made it is recorded under the socket cookie.
//! * `gw_sock_ops` (sock_ops): once such a socket is established its record is
//!   moved to a key the proxy can compute from the accepted socket (the
//!   client's address and port). This runs before the final ACK of the
//!   handshake is sent, so the record is there before accept() returns.
//! * `gw_sock_release` (cgroup/sock_release): a socket that never got
//!   established (refused, timed out) drops its pending record.
//! * `gw_exec` / `gw_exit` (raw tracepoints sched_process_exec / _exit): delete
//!   a process's entry in `PROCESS_EPOCH` when it execs or its leader
//!   exits, so the gateway knows when an attestation it keeps goes stale.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Only the bpfel-unknown-none build of this crate means anything; the host
    // build exists so `cargo check --workspace` works.
}

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
