//! Connection admission: which accepted connections the gateway takes on,
//! so that one job can never exhaust what other jobs need.
//!
//! Every accepted socket is counted against the gateway's connection
//! capacity, derived from its descriptor table (RLIMIT_NOFILE, raised to
//! the hard limit at start, less what is open at start and
//! `proxy.limits.fd_reserve`, two descriptors per connection: the client's
//! and the upstream one). Once attributed, it is also counted against its
//! cgroup (the cgroup id the kernel recorded at connect), which may hold at
//! most `proxy.limits.max_connections_per_cgroup` connections and never
//! more than `cgroup_fd_share_percent` of the capacity. Beyond either the
//! connection is refused at once with a [`LimitExceeded`]. Each admitted
//! cgroup also gets its own pool for buffered request bodies, nested in
//! the gateway's ([`Admission::budget_for`]).
//!
//! Every listener's accept loop goes through [`Admission::accept`] and
//! [`Admitted::attribute`]; the count is given back when the [`Admitted`]
//! ticket is dropped (the connection closed).

use std::{
    collections::HashMap,
    io,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use crate::{
    config::ProxyLimits,
    limits::{Budget, Limit, LimitExceeded},
};

/// Descriptors one connection takes: the client's socket and the upstream one.
pub const FDS_PER_CONNECTION: u64 = 2;

/// The gateway's descriptor table, as admission sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptors {
    /// RLIMIT_NOFILE's soft limit (after raising it).
    pub limit: u64,
    /// Descriptors open when it was read (stores, eBPF objects, listeners).
    pub in_use: u64,
}

impl Descriptors {
    /// Raises RLIMIT_NOFILE's soft limit to the hard limit (a proxy needs
    /// descriptors more than anything else) and counts what is open.
    pub fn raise() -> io::Result<Descriptors> {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
        let limit = if soft < hard {
            match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => hard,
                Err(e) => {
                    tracing::warn!(soft, hard, error = %e, "cannot raise the descriptor limit; keeping the soft limit");
                    soft
                }
            }
        } else {
            soft
        };
        let in_use = std::fs::read_dir("/proc/self/fd")?.count() as u64;
        Ok(Descriptors { limit, in_use })
    }

    /// Connections that fit beside `reserve` descriptors kept for upstream
    /// dials beyond one per connection, stores, the admin API and logs.
    pub fn connections(&self, reserve: u64) -> u64 {
        self.limit.saturating_sub(self.in_use).saturating_sub(reserve) / FDS_PER_CONNECTION
    }
}

/// Admission state shared by every listener of the proxy.
pub struct Admission {
    /// Connections admitted in all.
    capacity: usize,
    /// Connections one cgroup may hold at once.
    per_cgroup: usize,
    /// Size of each cgroup's body pool.
    buffered_per_cgroup: usize,
    /// The gateway's body pool; cgroups' pools nest in it.
    total: Budget,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Accepted connections not yet closed (attributed or not).
    open: usize,
    cgroups: HashMap<u64, CgroupEntry>,
    /// Attributed connections: conn id -> cgroup id.
    conns: HashMap<u64, u64>,
}

struct CgroupEntry {
    open: usize,
    budget: Budget,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("capacity", &self.capacity)
            .field("per_cgroup", &self.per_cgroup)
            .field("open", &self.lock().open)
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// Admission for `limits` on a descriptor table of `fds`.
    pub fn new(limits: &ProxyLimits, fds: Descriptors) -> Arc<Admission> {
        let capacity = usize::try_from(fds.connections(limits.fd_reserve)).unwrap_or(usize::MAX);
        let share = capacity.saturating_mul(usize::from(limits.cgroup_fd_share_percent)) / 100;
        let per_cgroup = limits.max_connections_per_cgroup.min(share).max(1);
        let total = Budget::new(Limit::BufferedTotal, limits.max_buffered_total_bytes);
        tracing::info!(
            fd_limit = fds.limit,
            fds_open = fds.in_use,
            fd_reserve = limits.fd_reserve,
            capacity,
            per_cgroup,
            "connection admission"
        );
        if capacity == 0 {
            tracing::error!(
                "the descriptor table has no room for connections beside proxy.limits.fd_reserve: every connection will be refused"
            );
        }
        Arc::new(Admission {
            capacity,
            per_cgroup,
            buffered_per_cgroup: limits.max_buffered_per_cgroup_bytes,
            total,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain counters: a panic elsewhere cannot leave them half-updated.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a freshly accepted connection; refused when the gateway's
    /// capacity is taken.
    pub fn accept(self: &Arc<Self>, conn_id: u64) -> Result<Admitted, LimitExceeded> {
        let mut state = self.lock();
        if state.open >= self.capacity {
            return Err(LimitExceeded::new(Limit::Connections, self.capacity));
        }
        state.open += 1;
        Ok(Admitted { admission: self.clone(), conn_id, cgroup: None })
    }

    /// The body pool of `conn_id`'s cgroup (the gateway's pool for a
    /// connection that was never attributed).
    pub fn budget_for(&self, conn_id: u64) -> Budget {
        let state = self.lock();
        state
            .conns
            .get(&conn_id)
            .and_then(|cgroup| state.cgroups.get(cgroup))
            .map_or_else(|| self.total.clone(), |e| e.budget.clone())
    }

    /// Connections one cgroup may hold at once.
    pub fn per_cgroup(&self) -> usize {
        self.per_cgroup
    }

    /// Connections admitted in all.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Connections open right now (in all, and of `cgroup_id`).
    pub fn open(&self, cgroup_id: u64) -> (usize, usize) {
        let state = self.lock();
        (state.open, state.cgroups.get(&cgroup_id).map_or(0, |e| e.open))
    }
}

/// An admitted connection; gives its place back on drop.
pub struct Admitted {
    admission: Arc<Admission>,
    conn_id: u64,
    cgroup: Option<u64>,
}

impl std::fmt::Debug for Admitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admitted").field("conn_id", &self.conn_id).field("cgroup", &self.cgroup).finish()
    }
}

impl Admitted {
    /// Counts the connection against the cgroup that made it; refused when
    /// that cgroup already holds its share.
    pub fn attribute(&mut self, cgroup_id: u64) -> Result<(), LimitExceeded> {
        if self.cgroup.is_some() {
            return Ok(());
        }
        let admission = &self.admission;
        let mut state = admission.lock();
        let open = state.cgroups.get(&cgroup_id).map_or(0, |e| e.open);
        if open >= admission.per_cgroup {
            return Err(LimitExceeded::new(Limit::ConnectionsPerCgroup, admission.per_cgroup));
        }
        let entry = state.cgroups.entry(cgroup_id).or_insert_with(|| CgroupEntry {
            open: 0,
            budget: admission.total.nested(Limit::BufferedPerCgroup, admission.buffered_per_cgroup),
        });
        entry.open += 1;
        state.conns.insert(self.conn_id, cgroup_id);
        self.cgroup = Some(cgroup_id);
        Ok(())
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut state = self.admission.lock();
        state.open = state.open.saturating_sub(1);
        if let Some(cgroup) = self.cgroup {
            state.conns.remove(&self.conn_id);
            if let Some(entry) = state.cgroups.get_mut(&cgroup) {
                entry.open -= 1;
                if entry.open == 0 {
                    state.cgroups.remove(&cgroup);
                }
            }
        }
    }
}

/// Accept failures (EMFILE, ENFILE, ENOBUFS...) logged at a bounded rate:
/// the first at once, then one line per `interval` with how many there
/// were, and a growing pause between attempts so the loop never spins.
#[derive(Debug)]
pub struct AcceptErrors {
    interval: Duration,
    /// Failures since the last line.
    unlogged: u64,
    last_logged: Option<Instant>,
    /// Failures in a row, for the pause.
    streak: u32,
}

/// First pause after a failed accept; doubles per failure in a row.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between failed accepts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl AcceptErrors {
    /// Logs at most one line per `interval`.
    pub fn new(interval: Duration) -> AcceptErrors {
        AcceptErrors { interval, unlogged: 0, last_logged: None, streak: 0 }
    }

    /// An accept failed at `now`: returns how many failures the log line
    /// due now reports (`None`: no line now), and how long to pause.
    pub fn failed(&mut self, now: Instant) -> (Option<u64>, Duration) {
        self.unlogged += 1;
        self.streak = self.streak.saturating_add(1);
        let pause = ACCEPT_BACKOFF_MIN.saturating_mul(1 << (self.streak - 1).min(16)).min(ACCEPT_BACKOFF_MAX);
        let due = self.last_logged.is_none_or(|t| now.duration_since(t) >= self.interval);
        if !due {
            return (None, pause);
        }
        self.last_logged = Some(now);
        (Some(std::mem::take(&mut self.unlogged)), pause)
    }

    /// An accept succeeded: the next failure pauses briefly again.
    pub fn succeeded(&mut self) {
        self.streak = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_cgroup: usize, share: u8, reserve: u64) -> ProxyLimits {
        ProxyLimits {
            max_connections_per_cgroup: per_cgroup,
            cgroup_fd_share_percent: share,
            fd_reserve: reserve,
            ..ProxyLimits::default()
        }
    }

    #[test]
    fn capacity_comes_from_the_descriptor_table_less_what_is_open_and_the_reserve() {
        let fds = Descriptors { limit: 1100, in_use: 50 };
        assert_eq!(fds.connections(50), 500);
        let a = Admission::new(&limits(10_000, 50, 50), fds);
        assert_eq!((a.capacity(), a.per_cgroup()), (500, 250), "a cgroup gets its share of the table");
        let a = Admission::new(&limits(16, 50, 50), fds);
        assert_eq!(a.per_cgroup(), 16, "or the configured maximum, if smaller");
    }

    #[tokio::test]
    async fn one_cgroup_is_refused_beyond_its_share_while_another_is_admitted() {
        let fds = Descriptors { limit: 1000 + 2 * 10, in_use: 1000 };
        let a = Admission::new(&limits(100, 50, 0), fds);
        assert_eq!((a.capacity(), a.per_cgroup()), (10, 5));
        let mut hostile = Vec::new();
        for id in 0..5 {
            let mut t = a.accept(id).unwrap();
            t.attribute(7).unwrap();
            hostile.push(t);
        }
        let mut sixth = a.accept(5).unwrap();
        let refused = sixth.attribute(7).unwrap_err();
        assert_eq!(refused, LimitExceeded::new(Limit::ConnectionsPerCgroup, 5u64));
        drop(sixth);
        let mut other = a.accept(6).unwrap();
        other.attribute(8).unwrap();
        assert_eq!(a.open(7), (6, 5));
        assert_eq!(a.open(8).1, 1);
        // Each cgroup's bodies count in a pool of its own, inside the gateway's.
        let held = a.budget_for(0).reserve(100, Duration::ZERO).await.unwrap();
        assert_eq!((a.budget_for(4).in_use(), a.budget_for(6).in_use(), a.total.in_use()), (100, 0, 100));
        drop(held);
        drop(hostile);
        assert_eq!(a.open(7), (1, 0), "closing gives the places back");
    }

    #[test]
    fn the_gateway_refuses_every_cgroup_once_its_table_is_taken() {
        let fds = Descriptors { limit: 100 + 2 * 4, in_use: 100 };
        let a = Admission::new(&limits(100, 100, 0), fds);
        let held: Vec<_> = (0..4).map(|id| a.accept(id).unwrap()).collect();
        assert_eq!(a.accept(9).unwrap_err(), LimitExceeded::new(Limit::Connections, 4u64));
        drop(held);
        assert!(a.accept(9).is_ok());
    }

    #[test]
    fn accept_errors_are_logged_once_per_interval_with_a_count_and_back_off() {
        let mut errors = AcceptErrors::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let (line, pause) = errors.failed(t0);
        assert_eq!(line, Some(1), "the first failure is logged at once");
        assert_eq!(pause, ACCEPT_BACKOFF_MIN);
        let mut lines = 0;
        let mut now = t0;
        let mut last_pause = pause;
        for _ in 0..1000 {
            let (line, pause) = errors.failed(now);
            assert!(pause >= last_pause && pause <= ACCEPT_BACKOFF_MAX);
            last_pause = pause;
            now += pause;
            if let Some(n) = line {
                lines += 1;
                assert!(n > 1, "a later line reports how many failures it stands for");
            }
        }
        let elapsed = now.duration_since(t0);
        assert_eq!(last_pause, ACCEPT_BACKOFF_MAX);
        assert!(lines <= elapsed.as_secs() / 10 + 1, "{lines} lines in {elapsed:?}");
        errors.succeeded();
        assert_eq!(errors.failed(now).1, ACCEPT_BACKOFF_MIN, "success resets the pause");
    }
}
