//! The `gateway` binary: every command lives in [`gateway::cli`]; this file
//! chooses the global allocator.
//!
//! jemalloc (feature `jemalloc`, the default), unprefixed: Rust's and the C
//! libraries' allocations alike. Under glibc's malloc the release soak's
//! RSS rose as a sawtooth (+253 KiB/min over 30 minutes) while the live
//! heap did not: each of the blocking pool's threads took an arena of its
//! own and kept what it freed. jemalloc returns freed pages on a timer
//! (dirty and muzzy decay) and counts the live heap exactly
//! (docs/reliability.md, "Soak").

#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    #[cfg(feature = "jemalloc")]
    {
        gateway::metrics::observe_heap(jemalloc_heap);
        purge_in_background();
    }
    #[cfg(all(not(feature = "jemalloc"), target_os = "linux", target_env = "gnu"))]
    gateway::metrics::observe_heap(gateway::metrics::glibc_heap);
    gateway::cli::main()
}

/// One jemalloc background thread returns freed pages on the decay
/// schedule (10 s) also while the gateway is idle: without it purging runs
/// only inside allocations, and an idle gateway kept the ~20 MiB of pages
/// that compiling the detection rules had freed at start-up. A failure
/// leaves purging to allocations, as without the thread.
#[cfg(feature = "jemalloc")]
fn purge_in_background() {
    use tikv_jemalloc_ctl::{background_thread, max_background_threads};
    let _ = max_background_threads::write(1).and_then(|()| background_thread::write(true));
}

/// jemalloc's own counters, refreshed (`epoch`) at each read: `allocated`
/// is what the program holds, `resident` the pages jemalloc keeps mapped
/// and touched (its metadata included).
#[cfg(feature = "jemalloc")]
fn jemalloc_heap() -> Option<gateway::metrics::HeapStats> {
    use tikv_jemalloc_ctl::{epoch, stats};
    let read = || -> Result<gateway::metrics::HeapStats, tikv_jemalloc_ctl::Error> {
        epoch::advance()?;
        Ok(gateway::metrics::HeapStats {
            allocated: stats::allocated::read()? as u64,
            resident: stats::resident::read()? as u64,
        })
    };
    match read() {
        Ok(stats) => Some(stats),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot read jemalloc's statistics");
            None
        }
    }
}
