//! The `gateway` binary: every command lives in [`gateway::cli`]; this file
//! chooses the global allocator.
//!
//! jemalloc (feature `jemalloc`, the default) for Rust's allocations; the C
//! libraries (SQLite, Hyperscan, libpg_query) keep glibc's malloc, so a
//! preloaded library that allocates while it starts (libfaketime) never
//! starts jemalloc inside its own start. Measured against glibc's malloc
//! on the same code (docs/reliability.md, "Soak"; docs/benchmarks.md): about 5% fewer
//! instructions per request (9% with full recording), less memory per idle
//! connection, and an exact live-heap figure for `/metrics`
//! (`gateway_heap_allocated_bytes`), which is how the soak's RSS sawtooth
//! was traced to a bounded cache rather than a leak.

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
