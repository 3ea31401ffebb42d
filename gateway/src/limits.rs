//! Resource limits that hold against a hostile job: which limit a refusal
//! is about ([`Limit`], [`LimitExceeded`], rendered for HTTP clients by
//! [`LimitExceeded::http_response`]), and the nested byte pools request
//! bodies are buffered in ([`Budget`]).
//!
//! A leaf module: the proxy (connection admission), the HTTP engine (body
//! buffering) and approvals (pending requests) all speak this vocabulary,
//! and it depends on nothing else in the crate. See `docs/limits.md`.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

/// Which limit refused something. Names (`as_str`) appear in events, logs
/// and the JSON body the job sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// Concurrent connections of one cgroup
    /// (`proxy.limits.max_connections_per_cgroup`, or the cgroup's share of
    /// the descriptor table if that is smaller).
    ConnectionsPerCgroup,
    /// Concurrent connections of the whole gateway: its descriptor table,
    /// less `proxy.limits.fd_reserve`, is taken.
    Connections,
    /// Request body bytes buffered for inspection by one cgroup's
    /// connections together (`proxy.limits.max_buffered_per_cgroup_bytes`).
    BufferedPerCgroup,
    /// Request body bytes buffered for inspection by the whole gateway
    /// (`proxy.limits.max_buffered_total_bytes`).
    BufferedTotal,
    /// A request body sent nothing for `proxy.limits.body_idle_timeout`.
    BodyIdle,
    /// Approval requests open for one cgroup at once
    /// (`approvals.max_pending_per_cgroup`).
    PendingApprovalsPerCgroup,
    /// Approval requests open in the whole gateway (`approvals.max_pending`).
    PendingApprovals,
}

impl Limit {
    /// The name used in events and refusals.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::ConnectionsPerCgroup => "connections_per_cgroup",
            Limit::Connections => "connections",
            Limit::BufferedPerCgroup => "buffered_per_cgroup",
            Limit::BufferedTotal => "buffered_total",
            Limit::BodyIdle => "body_idle",
            Limit::PendingApprovalsPerCgroup => "pending_approvals_per_cgroup",
            Limit::PendingApprovals => "pending_approvals",
        }
    }

    /// The HTTP status a refusal for this limit carries: 429 when the job
    /// itself holds too much, 503 when the gateway as a whole is full, 408
    /// for a body that stalled.
    pub fn http_status(self) -> http::StatusCode {
        match self {
            Limit::ConnectionsPerCgroup | Limit::BufferedPerCgroup | Limit::PendingApprovalsPerCgroup => {
                http::StatusCode::TOO_MANY_REQUESTS
            }
            Limit::Connections | Limit::BufferedTotal | Limit::PendingApprovals => {
                http::StatusCode::SERVICE_UNAVAILABLE
            }
            Limit::BodyIdle => http::StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// What the limit counts, for messages.
    fn what(self) -> &'static str {
        match self {
            Limit::ConnectionsPerCgroup => "concurrent connections of this job's cgroup",
            Limit::Connections => "concurrent connections of the gateway",
            Limit::BufferedPerCgroup => "request body bytes buffered for this job's cgroup",
            Limit::BufferedTotal => "request body bytes buffered by the gateway",
            Limit::BodyIdle => "seconds a request body may send nothing",
            Limit::PendingApprovalsPerCgroup => "approval requests open for this job's cgroup",
            Limit::PendingApprovals => "approval requests open in the gateway",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal because a limit was reached: the typed reason a protocol
/// handler renders (HTTP: [`LimitExceeded::http_response`]; other
/// protocols: the connection is closed) and events report (`outcome:
/// refused`, `reason: limit`, `limit: <name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("limit {limit} reached: at most {max} {}", limit.what())]
pub struct LimitExceeded {
    /// Which limit.
    pub limit: Limit,
    /// Its configured (or derived) value.
    pub max: u64,
}

impl LimitExceeded {
    /// A limit reached at `max`.
    pub fn new(limit: Limit, max: impl TryInto<u64>) -> LimitExceeded {
        LimitExceeded { limit, max: max.try_into().unwrap_or(u64::MAX) }
    }

    /// The JSON body the job sees: `{"error": "limit", "limit": ..., "max": ..., "message": ...}`.
    pub fn to_json(&self, conn_id: u64) -> serde_json::Value {
        serde_json::json!({
            "error": "limit",
            "limit": self.limit.as_str(),
            "max": self.max,
            "message": format!("The CI gateway refused this request: {self}. Nothing was sent upstream."),
            "conn_id": conn_id,
        })
    }

    /// The HTTP response for the job: [`Limit::http_status`] with
    /// [`LimitExceeded::to_json`]; `Retry-After` for the limits that clear
    /// by themselves.
    pub fn http_response(&self, conn_id: u64) -> http::Response<Bytes> {
        let mut resp = http::Response::new(Bytes::from(self.to_json(conn_id).to_string()));
        *resp.status_mut() = self.limit.http_status();
        let headers = resp.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        if self.limit != Limit::BodyIdle {
            headers.insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// A pool of bytes that buffered request bodies are counted in, possibly
/// inside a larger pool (a cgroup's pool inside the gateway's). Reserving
/// from a pool reserves from every pool it is nested in; bytes come back
/// when the [`Reservation`] is dropped. Cheap to clone (shared).
#[derive(Clone)]
pub struct Budget {
    pool: Arc<Pool>,
}

struct Pool {
    limit: Limit,
    max: usize,
    bytes: Arc<Semaphore>,
    parent: Option<Budget>,
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget")
            .field("limit", &self.pool.limit)
            .field("max", &self.pool.max)
            .field("in_use", &self.in_use())
            .finish()
    }
}

impl Budget {
    /// A top-level pool of `max` bytes; running out of it is `limit`.
    pub fn new(limit: Limit, max: usize) -> Budget {
        let max = max.min(Semaphore::MAX_PERMITS);
        Budget { pool: Arc::new(Pool { limit, max, bytes: Arc::new(Semaphore::new(max)), parent: None }) }
    }

    /// A pool of `max` bytes inside this one.
    pub fn nested(&self, limit: Limit, max: usize) -> Budget {
        let max = max.min(Semaphore::MAX_PERMITS);
        let pool = Pool { limit, max, bytes: Arc::new(Semaphore::new(max)), parent: Some(self.clone()) };
        Budget { pool: Arc::new(pool) }
    }

    /// Bytes reserved from this pool right now.
    pub fn in_use(&self) -> usize {
        self.pool.max - self.pool.bytes.available_permits()
    }

    /// Reserves `n` bytes from this pool and every pool around it, waiting
    /// up to `wait` for room (the caller stops reading from its client
    /// meanwhile: backpressure). Pools are taken innermost first, always in
    /// that order, so waiters never deadlock. After `wait`, or at once if
    /// `n` can never fit, the pool that had no room is named.
    pub async fn reserve(&self, n: usize, wait: Duration) -> Result<Reservation, LimitExceeded> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut reservation = Reservation::default();
        let mut level = Some(self);
        while let Some(budget) = level {
            let pool = &budget.pool;
            let full = LimitExceeded::new(pool.limit, pool.max);
            let permits = u32::try_from(n).map_err(|_| full)?;
            if n > pool.max {
                return Err(full);
            }
            let permit = match pool.bytes.clone().try_acquire_many_owned(permits) {
                Ok(p) => p,
                Err(TryAcquireError::Closed) => return Err(full),
                Err(TryAcquireError::NoPermits) => {
                    match tokio::time::timeout_at(deadline, pool.bytes.clone().acquire_many_owned(permits)).await {
                        Ok(Ok(p)) => p,
                        _ => return Err(full),
                    }
                }
            };
            reservation.permits.push(permit);
            level = pool.parent.as_ref();
        }
        Ok(reservation)
    }
}

/// Bytes reserved from a [`Budget`] (and the pools around it), given back
/// on drop.
#[derive(Default)]
pub struct Reservation {
    /// One permit per pool level, innermost first.
    permits: Vec<OwnedSemaphorePermit>,
}

impl Reservation {
    /// Adds `other` (reserved from the same budget) to this reservation.
    pub fn absorb(&mut self, other: Reservation) {
        if self.permits.is_empty() {
            *self = other;
            return;
        }
        for (mine, theirs) in self.permits.iter_mut().zip(other.permits) {
            mine.merge(theirs);
        }
    }

    /// Bytes held (0 for an empty reservation).
    pub fn bytes(&self) -> usize {
        self.permits.first().map_or(0, |p| p.num_permits())
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation").field("bytes", &self.bytes()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nested_pools_reserve_all_levels_and_give_back_on_drop() {
        let total = Budget::new(Limit::BufferedTotal, 100);
        let a = total.nested(Limit::BufferedPerCgroup, 60);
        let b = total.nested(Limit::BufferedPerCgroup, 60);
        let mut held = a.reserve(40, Duration::ZERO).await.unwrap();
        held.absorb(a.reserve(20, Duration::ZERO).await.unwrap());
        assert_eq!((held.bytes(), a.in_use(), total.in_use()), (60, 60, 60));
        let e = a.reserve(1, Duration::ZERO).await.unwrap_err();
        assert_eq!(e, LimitExceeded::new(Limit::BufferedPerCgroup, 60u64), "a's own pool is full");
        let e = b.reserve(41, Duration::ZERO).await.unwrap_err();
        assert_eq!(e.limit, Limit::BufferedTotal, "b has room but the total has not");
        assert_eq!(b.in_use(), 0, "a failed reservation keeps nothing");
        let b40 = b.reserve(40, Duration::ZERO).await.unwrap();
        drop(held);
        assert_eq!((a.in_use(), total.in_use()), (0, 40));
        drop(b40);
        assert_eq!(total.in_use(), 0);
        assert_eq!(a.reserve(61, Duration::from_secs(60)).await.unwrap_err().limit, Limit::BufferedPerCgroup);
    }

    #[tokio::test]
    async fn a_waiter_gets_room_freed_within_its_wait_and_not_after() {
        let total = Budget::new(Limit::BufferedTotal, 10);
        let held = total.reserve(10, Duration::ZERO).await.unwrap();
        let waiter = {
            let total = total.clone();
            tokio::spawn(async move { total.reserve(5, Duration::from_secs(60)).await.map(|r| r.bytes()) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "no room yet: the waiter waits");
        drop(held);
        assert_eq!(waiter.await.unwrap().unwrap(), 5);
        let _held = total.reserve(10, Duration::ZERO).await.unwrap();
        let started = std::time::Instant::now();
        let e = total.reserve(1, Duration::from_millis(200)).await.unwrap_err();
        assert_eq!(e.limit, Limit::BufferedTotal);
        assert!(started.elapsed() >= Duration::from_millis(200), "it waited its full wait first");
    }

    #[test]
    fn refusals_render_status_and_json_naming_the_limit() {
        let e = LimitExceeded::new(Limit::BufferedPerCgroup, 64u64);
        let r = e.http_response(7);
        assert_eq!(r.status(), 429);
        let body: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(body["error"], "limit");
        assert_eq!(body["limit"], "buffered_per_cgroup");
        assert_eq!(body["max"], 64);
        assert_eq!(LimitExceeded::new(Limit::BufferedTotal, 1u64).http_response(1).status(), 503);
        assert_eq!(LimitExceeded::new(Limit::BodyIdle, 30u64).http_response(1).status(), 408);
    }
}
