//! The kernel side of [`crate::identity::AttestationCache`]: raw tracepoints
//! on `sched_process_exec` and `sched_process_exit` that delete a process's
//! entry in the `PROCESS_EPOCH` map when it execs or its leader exits.
//!
//! The programs are attached host-wide (tracepoints cannot be scoped to a
//! cgroup), but all they do is delete entries the gateway wrote, at the cost
//! of one hash lookup per exec or exit. Their links belong to this process
//! and are never pinned: when the gateway exits they detach, and so does the
//! map with everything in it.

use std::sync::RwLock;

use aya::{
    maps::{HashMap as BpfHashMap, MapData, MapError},
    programs::RawTracePoint,
    Ebpf, EbpfLoader,
};
use gateway_common::names;

use super::{map_err, prog_err, InterceptError, OBJECT};
use crate::identity::ProcessEpochs;

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// Maps of the shared object that this loader never uses: one entry each
/// instead of their real sizes, so the second copy of the object costs no
/// kernel memory worth mentioning.
const UNUSED_MAPS: [&str; 7] = [
    names::INTERCEPT_V4,
    names::INTERCEPT_V6,
    names::PENDING,
    names::ORIGINAL,
    names::STATS,
    names::CONFIG,
    names::SERVED_NETNS,
];

/// The smallest ring buffer the kernel accepts (one page).
const UNUSED_RING_BYTES: u32 = 4096;

/// Live exec/exit tracking of attested processes.
pub struct ExecWatch {
    // Owns the programs and their links: dropping it detaches them.
    _ebpf: Ebpf,
    epochs: RwLock<BpfHashMap<MapData, u32, u64>>,
}

impl ExecWatch {
    /// Loads and attaches the tracepoint programs.
    pub fn load() -> Result<ExecWatch, InterceptError> {
        let mut loader = EbpfLoader::new();
        for name in UNUSED_MAPS {
            loader.map_max_entries(name, 1);
        }
        loader.map_max_entries(names::ALERTS, UNUSED_RING_BYTES);
        let mut ebpf = loader.load(OBJECT).map_err(InterceptError::Load)?;
        for (name, tracepoint) in [(names::PROG_EXEC, "sched_process_exec"), (names::PROG_EXIT, "sched_process_exit")] {
            let prog: &mut RawTracePoint =
                ebpf.program_mut(name).ok_or(InterceptError::Missing(name))?.try_into().map_err(prog_err(name))?;
            prog.load().map_err(prog_err(name))?;
            prog.attach(tracepoint).map_err(prog_err(name))?;
        }
        let map = ebpf.take_map(names::PROCESS_EPOCH).ok_or(InterceptError::Missing(names::PROCESS_EPOCH))?;
        let epochs = BpfHashMap::try_from(map).map_err(map_err(names::PROCESS_EPOCH))?;
        Ok(ExecWatch { _ebpf: ebpf, epochs: RwLock::new(epochs) })
    }
}

impl ProcessEpochs for ExecWatch {
    fn current(&self, tgid: u32) -> Option<u64> {
        self.epochs.read().ok()?.get(&tgid, 0).ok()
    }

    fn begin(&self, tgid: u32, token: u64) -> Option<u64> {
        let mut map = self.epochs.write().ok()?;
        match map.insert(tgid, token, BPF_NOEXIST) {
            Ok(()) => Some(token),
            // Already tracked (another connection of the same process), or
            // ended again in between: then there is nothing to join.
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => map.get(&tgid, 0).ok(),
            Err(e) => {
                tracing::debug!(tgid, error = %e, "cannot track a process's epoch; its attestation is not kept");
                None
            }
        }
    }
}
