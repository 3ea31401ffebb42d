//! Per-exchange accounting: one `gateway::http` event and one
//! [`Inspector::on_exchange`](super::Inspector::on_exchange) call per
//! request, emitted when the response is done (or abandoned).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::sync::watch;

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
#[derive(Clone)]
pub(crate) struct Activity(Arc<watch::Sender<usize>>);

/// One exchange in progress; the count goes down on drop.
pub(crate) struct Active(Arc<watch::Sender<usize>>);

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity(Arc::new(watch::Sender::new(0)))
    }

    /// An exchange starts.
    pub(crate) fn begin(&self) -> Active {
        self.0.send_modify(|n| *n += 1);
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
        let mut rx = self.0.subscribe();
        loop {
            if *rx.borrow_and_update() > 0 {
                // The sender lives as long as `self`: `changed` cannot fail.
                let _ = rx.changed().await;
                continue;
            }
            let mut waited = Duration::ZERO;
            if let Some((early, on_early)) = first.as_mut() {
                if tokio::time::timeout(*early, rx.changed()).await.is_ok() {
                    continue;
                }
                on_early();
                waited = *early;
            }
            match timeout {
                Some(t) => {
                    if tokio::time::timeout(t - waited, rx.changed()).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = rx.changed().await;
                }
            }
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
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
