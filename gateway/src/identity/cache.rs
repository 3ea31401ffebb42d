//! Attestations kept per process for as long as the kernel vouches that the
//! process is unchanged.
//!
//! A CI job's tools open many connections from one process (a `git fetch`,
//! a package manager, a test runner). Everything attestation reads from
//! /proc (executable, environment, cgroup path, parent chain) stays the same
//! until the process execs or exits, and the kernel tells exactly when that
//! happens: an eBPF program on the `sched_process_exec` / `_exit`
//! tracepoints deletes the process's entry in an epoch map. So a process's
//! attestation is kept beside an epoch token written into that map before
//! /proc was read, and reused for a later connection only when
//!
//! * the token is still in the map (no exec, no exit of the process or of
//!   any ancestor the attestation vouches for, since before /proc was read),
//! * the connection was made after the token was written (so it was made by
//!   the image that was attested, not by an earlier one under the same pid),
//! * the kernel recorded the same uid, gid and cgroup at connect() as the
//!   attestation verified.
//!
//! Anything else is a miss and goes through the full attestation.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use gateway_common::ConnRecord;

use super::attest::{comm_of, AttestNeeds, Attestation, Attested, Attestor};
use super::procfs;

/// The kernel's view of which processes kept the image the gateway attested.
pub trait ProcessEpochs: Send + Sync {
    /// The token of `tgid`'s running epoch; `None` once it exec'd or exited
    /// (or was never tracked, or was evicted).
    fn current(&self, tgid: u32) -> Option<u64>;
    /// Starts an epoch for `tgid` with `token` unless one is running, and
    /// returns the running epoch's token; `None` if the kernel could not
    /// track it.
    fn begin(&self, tgid: u32, token: u64) -> Option<u64>;
}

/// Bound on kept attestations; entries of exited processes are dropped when
/// next looked up or at the next sweep, the bound covers the rest.
const CAPACITY: usize = 16_384;

/// Attestations kept between two sweeps for entries of processes that
/// exited or exec'd. A CI job starts many short processes whose pids are
/// never looked up again: without sweeps their entries (about 640 bytes
/// each) piled up to [`CAPACITY`] before the map was cleared, the 10 MiB
/// sawtooth in the soak's heap (docs/reliability.md, "Soak").
const SWEEP_EVERY: u64 = 256;

/// One kept attestation.
struct Entry {
    /// Epoch of the process itself.
    epoch: u64,
    /// (pid, epoch) of each ancestor the attestation vouches for.
    ancestors: Vec<(u32, u64)>,
    /// Connections made before this (CLOCK_MONOTONIC ns, read once every
    /// epoch was in the map) may come from an earlier image.
    since: u64,
    /// What the attestation collected.
    needs: AttestNeeds,
    attested: Attested,
}

/// Counters for `gateway status` and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Connections attested from a kept attestation.
    pub hits: u64,
    /// Connections that needed a full attestation.
    pub misses: u64,
    /// Attestations kept now.
    pub entries: u64,
}

/// Attestations of live processes, validated against [`ProcessEpochs`].
pub struct AttestationCache {
    epochs: Arc<dyn ProcessEpochs>,
    entries: Mutex<HashMap<u32, Arc<Entry>>>,
    last_token: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Attestations kept so far, for [`SWEEP_EVERY`].
    kept: AtomicU64,
}

impl AttestationCache {
    /// An empty cache trusting `epochs`.
    pub fn new(epochs: Arc<dyn ProcessEpochs>) -> AttestationCache {
        AttestationCache {
            epochs,
            entries: Mutex::new(HashMap::new()),
            last_token: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            kept: AtomicU64::new(0),
        }
    }

    /// The kept attestation of the process behind `record`, if it still
    /// holds for this connection (see the module documentation). Cheap
    /// enough for the async path: a hash lookup and one map lookup per
    /// epoch, no /proc access.
    pub fn lookup(&self, record: &ConnRecord, needs: AttestNeeds) -> Option<Attested> {
        let found = self.find(record, needs);
        if found.is_none() {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    fn find(&self, record: &ConnRecord, needs: AttestNeeds) -> Option<Attested> {
        let entry = self.entries.lock().ok()?.get(&record.tgid).cloned()?;
        let a = &entry.attested;
        let fits = record.ts_ns >= entry.since
            && (a.uid, a.gid, a.cgroup_id) == (record.uid, record.gid, record.cgroup_id)
            && (entry.needs.ancestors || !needs.ancestors)
            && (entry.needs.cmdline || !needs.cmdline);
        if !fits {
            return None;
        }
        let current = |pid, epoch| self.epochs.current(pid) == Some(epoch);
        if !current(record.tgid, entry.epoch) || !entry.ancestors.iter().all(|&(pid, epoch)| current(pid, epoch)) {
            // That process (or its lineage) is gone or changed: the entry
            // can never be used again.
            if let Ok(mut entries) = self.entries.lock() {
                if entries.get(&record.tgid).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                    entries.remove(&record.tgid);
                }
            }
            return None;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        let mut attested = entry.attested.clone();
        // Per-connection facts come from this connection's record.
        attested.tid = record.pid;
        attested.comm = comm_of(record);
        attested.connect_ns = record.ts_ns;
        Some(attested)
    }

    /// Attests `record` in full and keeps the result when the kernel tracked
    /// the process (and the ancestors it vouches for) from before /proc was
    /// read. Blocking: reads /proc, may hash an executable.
    pub fn attest(&self, attestor: &Attestor, record: &ConnRecord, needs: AttestNeeds) -> Attestation {
        let Some(epoch) = self.begin(record.tgid) else {
            return attestor.attest_with(record, needs);
        };
        // The chain is tracked before attestation walks it again; the two
        // walks must agree, or something exited in between.
        let mut ancestors = Vec::new();
        let mut lineage = Vec::new();
        if needs.ancestors {
            lineage = attestor.lineage(record.tgid);
            for &(pid, _) in &lineage {
                match self.begin(pid) {
                    Some(e) => ancestors.push((pid, e)),
                    None => return attestor.attest_with(record, needs),
                }
            }
        }
        // Every epoch is in the map now: a connection made from here on was
        // made by the image about to be attested, or its epoch ended.
        let since = procfs::monotonic_ns();
        let attestation = attestor.attest_with(record, needs);
        if let Attestation::Attested(a) = &attestation {
            let same_lineage = !needs.ancestors
                || (a.ancestors.len() == lineage.len()
                    && a.ancestors
                        .iter()
                        .zip(&lineage)
                        .all(|(x, &(pid, start))| x.pid == pid && x.start_ticks == start));
            if same_lineage {
                self.keep(Entry { epoch, ancestors, since, needs, attested: (**a).clone() });
            }
        }
        attestation
    }

    /// Hit, miss and size counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.entries.lock().map_or(0, |e| e.len() as u64),
        }
    }

    /// Starts (or joins) the epoch of `pid`. Tokens are strictly increasing
    /// (CLOCK_MONOTONIC times, bumped on ties), so a pid whose epoch ended
    /// and that is tracked again never gets a token an old entry holds.
    fn begin(&self, pid: u32) -> Option<u64> {
        let now = procfs::monotonic_ns();
        let prev = self.last_token.fetch_max(now, Ordering::AcqRel);
        let token = if prev >= now { self.last_token.fetch_add(1, Ordering::AcqRel) + 1 } else { now };
        self.epochs.begin(pid, token)
    }

    fn keep(&self, entry: Entry) {
        if self.kept.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.sweep();
        }
        let Ok(mut entries) = self.entries.lock() else { return };
        if entries.len() >= CAPACITY && !entries.contains_key(&entry.attested.pid) {
            // Crude but bounded: a full reset only costs a round of misses.
            entries.clear();
        }
        entries.insert(entry.attested.pid, Arc::new(entry));
    }

    /// Drops the entries whose process (or an ancestor they vouch for) is
    /// gone: they can never be used again. The kernel is asked outside the
    /// lock; an entry replaced meanwhile is left alone.
    fn sweep(&self) {
        let kept: Vec<(u32, Arc<Entry>)> = match self.entries.lock() {
            Ok(entries) => entries.iter().map(|(&pid, e)| (pid, Arc::clone(e))).collect(),
            Err(_) => return,
        };
        let current = |pid, epoch| self.epochs.current(pid) == Some(epoch);
        let dead: Vec<(u32, Arc<Entry>)> = kept
            .into_iter()
            .filter(|(pid, e)| !current(*pid, e.epoch) || !e.ancestors.iter().all(|&(p, epoch)| current(p, epoch)))
            .collect();
        if dead.is_empty() {
            return;
        }
        let Ok(mut entries) = self.entries.lock() else { return };
        for (pid, entry) in dead {
            if entries.get(&pid).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                entries.remove(&pid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The epoch map as a plain hash map the test edits like the kernel would.
    #[derive(Default)]
    struct FakeEpochs(Mutex<HashMap<u32, u64>>);

    impl FakeEpochs {
        fn end(&self, pid: u32) {
            self.0.lock().unwrap().remove(&pid);
        }
    }

    impl ProcessEpochs for FakeEpochs {
        fn current(&self, tgid: u32) -> Option<u64> {
            self.0.lock().unwrap().get(&tgid).copied()
        }
        fn begin(&self, tgid: u32, token: u64) -> Option<u64> {
            Some(*self.0.lock().unwrap().entry(tgid).or_insert(token))
        }
    }

    fn cache() -> (Arc<FakeEpochs>, AttestationCache) {
        let epochs = Arc::new(FakeEpochs::default());
        (epochs.clone(), AttestationCache::new(epochs))
    }

    fn record(pid: u32, ts_ns: u64) -> ConnRecord {
        let mut r = super::super::record_for_live_pid(pid).unwrap();
        r.ts_ns = ts_ns;
        r
    }

    const NO_ANCESTORS: AttestNeeds = AttestNeeds { ancestors: false, cmdline: false };
    const WITH_ANCESTORS: AttestNeeds = AttestNeeds { ancestors: true, cmdline: false };

    fn attestor() -> Attestor {
        Attestor::new(&super::super::AttestConfig::default())
    }

    #[test]
    fn a_later_connection_of_the_same_process_is_a_hit_with_its_own_facts() {
        let (_, cache) = cache();
        let attestor = attestor();
        let me = std::process::id();
        let first = record(me, procfs::monotonic_ns());
        assert!(cache.lookup(&first, NO_ANCESTORS).is_none());
        let Attestation::Attested(full) = cache.attest(&attestor, &first, NO_ANCESTORS) else { panic!("unattested") };

        let mut second = record(me, procfs::monotonic_ns());
        second.pid = me + 1;
        second.comm[..5].copy_from_slice(b"other");
        let hit = cache.lookup(&second, NO_ANCESTORS).expect("a hit");
        assert_eq!(hit.exe, full.exe);
        assert_eq!(hit.env, full.env);
        assert_eq!(hit.cgroup, full.cgroup);
        assert_eq!(hit.tid, me + 1);
        assert_eq!(hit.comm, comm_of(&second));
        assert_eq!(hit.connect_ns, second.ts_ns);
        assert_eq!(cache.stats(), CacheStats { hits: 1, misses: 1, entries: 1 });
    }

    #[test]
    fn entries_of_exited_processes_are_swept_though_never_looked_up_again() {
        let (epochs, cache) = cache();
        let me = std::process::id();
        let Attestation::Attested(mine) = cache.attest(&attestor(), &record(me, procfs::monotonic_ns()), NO_ANCESTORS)
        else {
            panic!("unattested")
        };
        // Short-lived processes, each attested once and never seen again.
        let pids = (1..3 * SWEEP_EVERY as u32).map(|i| 4_000_000 + i);
        for pid in pids.clone() {
            let epoch = cache.begin(pid).expect("tracked");
            let mut attested = (*mine).clone();
            attested.pid = pid;
            cache.keep(Entry { epoch, ancestors: Vec::new(), since: 0, needs: NO_ANCESTORS, attested });
            epochs.end(pid);
        }
        // Each sweep dropped every ended process: what is left is this
        // process and those kept since the last sweep.
        let entries = cache.stats().entries;
        assert!(entries <= SWEEP_EVERY, "{entries} entries kept");
        assert!(cache.lookup(&record(me, procfs::monotonic_ns()), NO_ANCESTORS).is_some(), "the live one stays");
    }

    #[test]
    fn an_ended_epoch_or_an_older_connection_is_a_miss() {
        let (epochs, cache) = cache();
        let attestor = attestor();
        let me = std::process::id();
        let before = procfs::monotonic_ns();
        let first = record(me, procfs::monotonic_ns());
        assert!(matches!(cache.attest(&attestor, &first, NO_ANCESTORS), Attestation::Attested(_)));
        // Made before the epoch began: perhaps by an earlier image of the pid.
        assert!(cache.lookup(&record(me, before), NO_ANCESTORS).is_none());
        assert!(cache.lookup(&record(me, procfs::monotonic_ns()), NO_ANCESTORS).is_some());

        // exec or exit: the kernel deleted the entry.
        epochs.end(me);
        assert!(cache.lookup(&record(me, procfs::monotonic_ns()), NO_ANCESTORS).is_none());
        assert_eq!(cache.stats().entries, 0, "the dead entry is dropped");
        // A new epoch for the same pid gets a new token: the old entry could
        // not have matched it.
        let again = record(me, procfs::monotonic_ns());
        assert!(matches!(cache.attest(&attestor, &again, NO_ANCESTORS), Attestation::Attested(_)));
        let token = epochs.current(me).unwrap();
        assert!(token > first.ts_ns, "tokens only grow");
        assert!(cache.lookup(&record(me, procfs::monotonic_ns()), NO_ANCESTORS).is_some());
    }

    #[test]
    fn other_credentials_cgroup_or_wider_needs_are_a_miss() {
        let (_, cache) = cache();
        let attestor = attestor();
        let me = std::process::id();
        assert!(matches!(
            cache.attest(&attestor, &record(me, procfs::monotonic_ns()), NO_ANCESTORS),
            Attestation::Attested(_)
        ));
        let mut r = record(me, procfs::monotonic_ns());
        r.uid += 1;
        assert!(cache.lookup(&r, NO_ANCESTORS).is_none(), "setuid since");
        let mut r = record(me, procfs::monotonic_ns());
        r.cgroup_id += 1;
        assert!(cache.lookup(&r, NO_ANCESTORS).is_none(), "moved to another cgroup");
        let r = record(me, procfs::monotonic_ns());
        assert!(cache.lookup(&r, WITH_ANCESTORS).is_none(), "rules now use the parent chain");
        assert!(cache.lookup(&r, NO_ANCESTORS).is_some());
    }

    #[test]
    fn ancestors_are_vouched_for_by_their_own_epochs() {
        let (epochs, cache) = cache();
        let attestor = attestor();
        let me = std::process::id();
        let Attestation::Attested(a) = cache.attest(&attestor, &record(me, procfs::monotonic_ns()), WITH_ANCESTORS)
        else {
            panic!("unattested")
        };
        let parent = a.ancestors.first().expect("the test runner has a parent").pid;
        let r = record(me, procfs::monotonic_ns());
        assert_eq!(cache.lookup(&r, WITH_ANCESTORS).expect("a hit").ancestors, a.ancestors);
        assert!(cache.lookup(&r, NO_ANCESTORS).is_some(), "narrower needs are served too");
        // The parent exits (this process is reparented) or execs.
        epochs.end(parent);
        assert!(cache.lookup(&record(me, procfs::monotonic_ns()), WITH_ANCESTORS).is_none());
    }

    #[test]
    fn an_untracked_process_is_attested_but_not_kept() {
        struct Refusing;
        impl ProcessEpochs for Refusing {
            fn current(&self, _: u32) -> Option<u64> {
                None
            }
            fn begin(&self, _: u32, _: u64) -> Option<u64> {
                None
            }
        }
        let cache = AttestationCache::new(Arc::new(Refusing));
        let me = std::process::id();
        assert!(matches!(
            cache.attest(&attestor(), &record(me, procfs::monotonic_ns()), NO_ANCESTORS),
            Attestation::Attested(_)
        ));
        assert_eq!(cache.stats().entries, 0);
        assert!(cache.lookup(&record(me, procfs::monotonic_ns()), NO_ANCESTORS).is_none());
    }
}
