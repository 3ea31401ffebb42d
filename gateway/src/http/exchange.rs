//! Per-exchange accounting: one `gateway::http` event and one
//! [`Inspector::on_exchange`](super::Inspector::on_exchange) call per
//! request, emitted when the response is done (or abandoned).

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use super::{Exchange, ExchangeOutcome, ResponseInspector, HTTP_TARGET};

/// Receives finished exchanges (wraps the inspector's `on_exchange`).
pub(crate) type Hook = Arc<dyn Fn(&Exchange) + Send + Sync>;

/// An exchange in flight. Emits exactly once: on [`ExchangeLog::emit`] or,
/// failing that, on drop (hyper drops response bodies it gives up on).
pub(crate) struct ExchangeLog {
    exchange: Exchange,
    started: Instant,
    /// Shared with the upstream request body, which may still be counting.
    bytes_up: Arc<AtomicU64>,
    hook: Option<Hook>,
    /// The request's response inspector: filters the body while it
    /// streams and is told the outcome when the log emits.
    response: Option<Box<dyn ResponseInspector>>,
    /// Keeps the connection from counting as idle while the exchange runs.
    _active: Option<Active>,
}

/// Exchanges in progress on one connection, for its idle timeout.
///
/// Starting and ending an exchange only updates two atomics: the idle
/// watcher is not woken per request (a `watch` channel woke the connection
/// task and re-armed a timer twice per request). The watcher instead sleeps
/// until the idle deadline the last change implies and re-reads the state
/// when it wakes, so the deadline is the same: `timeout` after the last
/// exchange ended.
#[derive(Clone)]
pub(crate) struct Activity(Arc<ActivityState>);

struct ActivityState {
    /// Exchanges in progress.
    busy: AtomicUsize,
    /// When an exchange last started or ended, in ns after `epoch`.
    changed: AtomicU64,
    /// tokio's clock, which tests can pause.
    epoch: tokio::time::Instant,
}

impl ActivityState {
    /// Marks a start or an end now.
    fn touch(&self) {
        let ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.changed.fetch_max(ns, Ordering::SeqCst);
    }
}

/// One exchange in progress; the count goes down on drop.
pub(crate) struct Active(Arc<ActivityState>);

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity(Arc::new(ActivityState {
            busy: AtomicUsize::new(0),
            changed: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
        }))
    }

    /// An exchange starts.
    pub(crate) fn begin(&self) -> Active {
        self.0.busy.fetch_add(1, Ordering::SeqCst);
        self.0.touch();
        Active(self.0.clone())
    }

    /// Resolves once no exchange has been in progress for `timeout` (the
    /// clock restarts whenever one starts or ends); `None` never resolves.
    /// Each time the connection has been idle for `first.0` (shorter than
    /// `timeout`), calls `first.1` once on the way.
    pub(crate) async fn idle_for(&self, timeout: Option<Duration>, mut first: Option<(Duration, impl FnMut())>) {
        if let (Some((early, _)), Some(t)) = (&first, timeout) {
            if *early >= t {
                first = None;
            }
        }
        // How often a busy (or, with only `first`, an idle) connection
        // looks again; nothing wakes it when exchanges start or end.
        let recheck = match (&first, timeout) {
            (Some((early, _)), _) => *early,
            (None, Some(t)) => t,
            (None, None) => return std::future::pending().await,
        };
        let s = &self.0;
        // The idle stretch (its start) `first` was called for.
        let mut called_for = None;
        loop {
            // Busy first: an exchange ends by marking the time, then
            // leaving, so once none is seen busy its end time is seen too.
            if s.busy.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(recheck).await;
                continue;
            }
            let since = s.changed.load(Ordering::SeqCst);
            let idle_since = s.epoch + Duration::from_nanos(since);
            let deadline = match (&mut first, timeout) {
                (Some((early, on_early)), _) if called_for != Some(since) => {
                    let at = idle_since + *early;
                    if tokio::time::Instant::now() >= at {
                        on_early();
                        called_for = Some(since);
                        continue;
                    }
                    at
                }
                (_, Some(t)) => {
                    let at = idle_since + t;
                    if tokio::time::Instant::now() >= at {
                        return;
                    }
                    at
                }
                // `first` done for this stretch and no timeout: look again
                // later for the next stretch.
                (_, None) => tokio::time::Instant::now() + recheck,
            };
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ExchangeLog {
    pub(crate) fn new(
        conn_id: u64,
        method: http::Method,
        host: String,
        path: String,
        started: Instant,
        hook: Hook,
    ) -> ExchangeLog {
        ExchangeLog {
            exchange: Exchange {
                conn_id,
                method,
                host,
                path,
                status: 0,
                // Until upstream answers: a handler dropped before that
                // (client reset the stream) was aborted.
                outcome: ExchangeOutcome::Aborted,
                duration: Default::default(),
                response_head: None,
                bytes_up: 0,
                bytes_down: 0,
            },
            started,
            bytes_up: Arc::new(AtomicU64::new(0)),
            hook: Some(hook),
            response: None,
            _active: None,
        }
    }

    /// Counts the exchange as in progress until the log is dropped.
    pub(crate) fn hold_active(&mut self, active: Active) {
        self._active = Some(active);
    }

    /// Attaches the request's response inspector.
    pub(crate) fn set_response_inspector(&mut self, inspector: Box<dyn ResponseInspector>) {
        self.response = Some(inspector);
    }

    /// The request's response inspector, if any.
    pub(crate) fn response_inspector(&mut self) -> Option<&mut (dyn ResponseInspector + 'static)> {
        self.response.as_deref_mut()
    }

    /// The counter the upstream request body adds to.
    pub(crate) fn bytes_up(&self) -> Arc<AtomicU64> {
        self.bytes_up.clone()
    }

    pub(crate) fn set_status(&mut self, status: u16) {
        self.exchange.status = status;
    }

    /// Upstream's response head arrived now.
    pub(crate) fn response_head_received(&mut self) {
        self.exchange.response_head = Some(self.started.elapsed());
    }

    pub(crate) fn set_outcome(&mut self, outcome: ExchangeOutcome) {
        self.exchange.outcome = outcome;
    }

    pub(crate) fn outcome(&self) -> ExchangeOutcome {
        self.exchange.outcome
    }

    pub(crate) fn add_down(&mut self, n: usize) {
        self.exchange.bytes_down += n as u64;
    }

    pub(crate) fn emit(&mut self) {
        let Some(hook) = self.hook.take() else { return };
        let e = &mut self.exchange;
        e.duration = self.started.elapsed();
        e.bytes_up = self.bytes_up.load(Ordering::Relaxed);
        tracing::info!(
            target: HTTP_TARGET,
            conn_id = e.conn_id,
            method = %e.method,
            host = %e.host,
            path = %e.path,
            status = e.status,
            outcome = e.outcome.as_str(),
            duration_ms = e.duration.as_secs_f64() * 1000.0,
            bytes_up = e.bytes_up,
            bytes_down = e.bytes_down,
            "http exchange"
        );
        hook(e);
        if let Some(mut r) = self.response.take() {
            r.finish(e);
        }
    }
}

impl Drop for ExchangeLog {
    fn drop(&mut self) {
        self.emit();
    }
}
