//! Upstream connections of one client connection: a single multiplexed
//! HTTP/2 connection when upstream negotiates h2, else a small pool of
//! HTTP/1.1 keep-alive connections.

use std::{
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::{body::RequestBody, headers, ConnectHint, HttpError, Limits, UpstreamConnector};

type H1 = http1::SendRequest<RequestBody>;
type H2 = http2::SendRequest<RequestBody>;

/// A freshly connected upstream.
enum Conn {
    H1(H1),
    H2(H2),
}

/// Where the next request goes.
enum Sender {
    H1 {
        tx: H1,
        /// Taken from the idle pool (may have gone stale meanwhile).
        reused: bool,
        /// Returns to the pool after the exchange (not for upgrades, whose
        /// connection becomes a tunnel).
        pooled: bool,
    },
    H2(H2),
}

#[derive(Default)]
struct State {
    h2: Option<H2>,
    /// Upstream answered with HTTP/1.1 before: connect in parallel instead
    /// of one at a time.
    known_h1: bool,
}

/// The upstream side of one client connection.
pub(crate) struct Upstreams<U> {
    connector: U,
    limits: Limits,
    /// Held across the first connect (and h2 reconnects) so that a burst
    /// of HTTP/2 streams shares one connection instead of racing to open
    /// one each.
    state: tokio::sync::Mutex<State>,
    idle: Arc<Mutex<Vec<H1>>>,
}

impl<U: UpstreamConnector> Upstreams<U> {
    pub(crate) fn new(connector: U, limits: Limits) -> Upstreams<U> {
        Upstreams {
            connector,
            limits,
            state: tokio::sync::Mutex::new(State::default()),
            idle: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Sends `req` (already stripped of hop-by-hop headers), retrying on a
    /// fresh connection when a pooled one turns out to be dead before the
    /// request was written.
    pub(crate) async fn send(
        &self,
        mut req: Request<RequestBody>,
        hint: ConnectHint,
        authority: &str,
        tls: bool,
    ) -> Result<Response<Incoming>, HttpError> {
        let max_attempts = self.limits.max_idle_upstream + 2;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (result, retry_ok) = match self.acquire(hint).await? {
                Sender::H2(mut tx) => {
                    headers::prepare(&mut req, true, authority, tls).map_err(HttpError::Request)?;
                    let r = tx.try_send_request(req).await;
                    if r.is_err() {
                        self.forget_h2(&tx).await;
                    }
                    (r, attempt < 2)
                }
                Sender::H1 { mut tx, reused, pooled } => {
                    headers::prepare(&mut req, false, authority, tls).map_err(HttpError::Request)?;
                    let r = tx.try_send_request(req).await;
                    if let Ok(resp) = &r {
                        if pooled && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                            self.recycle(tx);
                        }
                    }
                    (r, reused || attempt < 2)
                }
            };
            match result {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    // Never written: safe to replay, body untouched.
                    Some(back) if retry_ok && attempt < max_attempts => {
                        tracing::debug!(error = %e.error(), "upstream connection was stale, retrying");
                        req = back;
                    }
                    _ => return Err(HttpError::Upstream(e.into_error())),
                },
            }
        }
    }

    async fn acquire(&self, hint: ConnectHint) -> Result<Sender, HttpError> {
        if !hint.allow_h2 {
            return match self.connect(hint).await? {
                Conn::H1(tx) => Ok(Sender::H1 { tx, reused: false, pooled: false }),
                Conn::H2(_) => Err(HttpError::Upgrade("upstream negotiated HTTP/2 for an HTTP/1.1 upgrade".into())),
            };
        }
        if let Some(tx) = self.take_idle() {
            return Ok(Sender::H1 { tx, reused: true, pooled: true });
        }
        let mut state = self.state.lock().await;
        if let Some(h2) = &state.h2 {
            if !h2.is_closed() {
                return Ok(Sender::H2(h2.clone()));
            }
            state.h2 = None;
        }
        if state.known_h1 {
            drop(state);
            if let Some(tx) = self.take_idle() {
                return Ok(Sender::H1 { tx, reused: true, pooled: true });
            }
            return Ok(match self.connect(hint).await? {
                Conn::H1(tx) => Sender::H1 { tx, reused: false, pooled: true },
                Conn::H2(tx) => {
                    self.state.lock().await.h2 = Some(tx.clone());
                    Sender::H2(tx)
                }
            });
        }
        Ok(match self.connect(hint).await? {
            Conn::H1(tx) => {
                state.known_h1 = true;
                Sender::H1 { tx, reused: false, pooled: true }
            }
            Conn::H2(tx) => {
                state.h2 = Some(tx.clone());
                Sender::H2(tx)
            }
        })
    }

    async fn connect(&self, hint: ConnectHint) -> Result<Conn, HttpError> {
        let timeout = self.limits.connect_timeout;
        tokio::time::timeout(timeout, self.connect_inner(hint)).await.map_err(|_| HttpError::ConnectTimeout(timeout))?
    }

    async fn connect_inner(&self, hint: ConnectHint) -> Result<Conn, HttpError> {
        let (io, h2) = self.connector.connect(hint).await.map_err(HttpError::Connect)?;
        let io = TokioIo::new(io);
        if h2 {
            let (tx, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .handshake(io)
                .await
                .map_err(HttpError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream h2 connection ended");
                }
            });
            Ok(Conn::H2(tx))
        } else {
            let (tx, conn) = http1::Builder::new().handshake(io).await.map_err(HttpError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream h1 connection ended");
                }
            });
            Ok(Conn::H1(tx))
        }
    }

    fn take_idle(&self) -> Option<H1> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(tx) = idle.pop() {
            if !tx.is_closed() && tx.is_ready() {
                return Some(tx);
            }
        }
        None
    }

    /// Returns `tx` to the pool once its exchange is over (response body
    /// read to the end). A connection whose exchange breaks off closes and
    /// is never pooled.
    fn recycle(&self, mut tx: H1) {
        let idle: Weak<Mutex<Vec<H1>>> = Arc::downgrade(&self.idle);
        let max = self.limits.max_idle_upstream;
        tokio::spawn(async move {
            if tx.ready().await.is_err() {
                return;
            }
            if let Some(idle) = idle.upgrade() {
                let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
                if idle.len() < max {
                    idle.push(tx);
                }
            }
        });
    }

    /// Drops the shared h2 connection if it is the one that failed, so the
    /// next request reconnects.
    async fn forget_h2(&self, failed: &H2) {
        if failed.is_closed() {
            let mut state = self.state.lock().await;
            if state.h2.as_ref().is_some_and(|h| h.is_closed()) {
                state.h2 = None;
            }
        }
    }
}
