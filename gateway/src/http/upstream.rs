//! Upstream connections of one client connection: a single multiplexed
//! HTTP/2 connection when upstream negotiates h2, else a small pool of
//! HTTP/1.1 keep-alive connections. At most
//! [`Limits::max_upstream_per_connection`] are open at once, so one client
//! connection (an HTTP/2 client with many streams towards an HTTP/1.1
//! upstream) cannot take a descriptor per stream.

use std::{
    future::Future,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use http::{Request, Response, StatusCode};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

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
    /// One permit per open upstream connection, held by its task.
    slots: Arc<Semaphore>,
    /// Wakes requests waiting for a slot when a connection returns to the pool.
    recycled: Arc<Notify>,
}

/// What a request waiting to connect got.
enum Slot {
    /// Room for a new connection.
    New(OwnedSemaphorePermit),
    /// A pooled connection came free meanwhile.
    Idle(H1),
}

impl<U: UpstreamConnector> Upstreams<U> {
    pub(crate) fn new(connector: U, limits: Limits) -> Upstreams<U> {
        Upstreams {
            connector,
            state: tokio::sync::Mutex::new(State::default()),
            idle: Arc::new(Mutex::new(Vec::new())),
            slots: Arc::new(Semaphore::new(limits.max_upstream_per_connection.max(1))),
            recycled: Arc::new(Notify::new()),
            limits,
        }
    }

    /// Sends `req` (already stripped of hop-by-hop headers), retrying on a
    /// fresh connection when a pooled one turns out to be dead before the
    /// request was written.
    ///
    /// An `async move` block, not an `async fn`, which would keep a second
    /// copy of `req` in its future (part of every request's).
    #[allow(clippy::manual_async_fn)] // an `async fn` would copy its arguments
    pub(crate) fn send<'a>(
        &'a self,
        mut req: Request<RequestBody>,
        hint: ConnectHint,
        authority: &'a str,
        tls: bool,
    ) -> impl Future<Output = Result<(Response<Incoming>, Option<PoolReturn>), HttpError>> + Send + 'a {
        async move {
            let max_attempts = self.limits.max_idle_upstream + 2;
            let mut attempt = 0;
            loop {
                attempt += 1;
                let (result, retry_ok, back) = match self.acquire(hint).await? {
                    Sender::H2(mut tx) => {
                        headers::prepare(&mut req, true, authority, tls).map_err(HttpError::Request)?;
                        let r = tx.try_send_request(req).await;
                        if r.is_err() {
                            self.forget_h2(&tx).await;
                        }
                        (r, attempt < 2, None)
                    }
                    Sender::H1 { mut tx, reused, pooled } => {
                        headers::prepare(&mut req, false, authority, tls).map_err(HttpError::Request)?;
                        let r = tx.try_send_request(req).await;
                        let back = match &r {
                            Ok(resp) if pooled && resp.status() != StatusCode::SWITCHING_PROTOCOLS => {
                                Some(self.pool_return(tx))
                            }
                            _ => None,
                        };
                        (r, reused || attempt < 2, back)
                    }
                };
                match result {
                    Ok(resp) => return Ok((resp, back)),
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
    }

    async fn acquire(&self, hint: ConnectHint) -> Result<Sender, HttpError> {
        if !hint.allow_h2 {
            // An upgrade needs a connection of its own; an idle pooled one
            // gives its slot up for it.
            let permit = match self.slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    drop(self.take_idle());
                    self.slots.clone().acquire_owned().await.map_err(|_| HttpError::SlotsClosed)?
                }
            };
            return match Box::pin(self.connect(hint, permit)).await? {
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
            let permit = match self.slot().await? {
                Slot::Idle(tx) => return Ok(Sender::H1 { tx, reused: true, pooled: true }),
                Slot::New(permit) => permit,
            };
            return Ok(match Box::pin(self.connect(hint, permit)).await? {
                Conn::H1(tx) => Sender::H1 { tx, reused: false, pooled: true },
                Conn::H2(tx) => {
                    self.state.lock().await.h2 = Some(tx.clone());
                    Sender::H2(tx)
                }
            });
        }
        let permit = match self.slot().await? {
            Slot::Idle(tx) => return Ok(Sender::H1 { tx, reused: true, pooled: true }),
            Slot::New(permit) => permit,
        };
        Ok(match Box::pin(self.connect(hint, permit)).await? {
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

    /// Waits for room to open a connection, or for a pooled one to come
    /// free, whichever is first.
    async fn slot(&self) -> Result<Slot, HttpError> {
        loop {
            let recycled = self.recycled.notified();
            tokio::pin!(recycled);
            // Registered before looking, so a recycle in between is not missed.
            recycled.as_mut().enable();
            if let Some(tx) = self.take_idle() {
                return Ok(Slot::Idle(tx));
            }
            tokio::select! {
                permit = self.slots.clone().acquire_owned() => {
                    return permit.map(Slot::New).map_err(|_| HttpError::SlotsClosed);
                }
                _ = &mut recycled => {}
            }
        }
    }

    /// Opens a connection. Callers box its future: it holds a TLS
    /// handshake and is large, and every request's future would otherwise
    /// have room for it (and be copied whole), pooled connection or not.
    async fn connect(&self, hint: ConnectHint, permit: OwnedSemaphorePermit) -> Result<Conn, HttpError> {
        let timeout = self.limits.connect_timeout;
        tokio::time::timeout(timeout, self.connect_inner(hint, permit))
            .await
            .map_err(|_| HttpError::ConnectTimeout(timeout))?
    }

    async fn connect_inner(&self, hint: ConnectHint, permit: OwnedSemaphorePermit) -> Result<Conn, HttpError> {
        let (io, h2) = self.connector.connect(hint).await.map_err(HttpError::Connect)?;
        let io = TokioIo::new(io);
        // The permit lives as long as the connection's task: the slot comes
        // free when the connection closes.
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
                drop(permit);
            });
            Ok(Conn::H2(tx))
        } else {
            let (tx, conn) = http1::Builder::new().handshake(io).await.map_err(HttpError::Handshake)?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream h1 connection ended");
                }
                drop(permit);
            });
            Ok(Conn::H1(tx))
        }
    }

    /// Closes the idle pooled connections (the client connection has been
    /// idle a while): dropping a connection's last sender ends its task.
    pub(crate) fn release_idle(&self) {
        let released = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|p| p.into_inner()));
        if !released.is_empty() {
            tracing::debug!(connections = released.len(), "client idle: closing its idle upstream connections");
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

    /// The way back to the pool for `tx`, whose response is being read.
    fn pool_return(&self, tx: H1) -> PoolReturn {
        PoolReturn {
            tx: Some(tx),
            idle: Arc::downgrade(&self.idle),
            recycled: self.recycled.clone(),
            max: self.limits.max_idle_upstream,
        }
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

/// A pooled HTTP/1.1 connection whose response body is still being read:
/// it goes back to the pool when the body ends.
///
/// The response body calls [`PoolReturn::body_ended`] as it hands the end of
/// the body on, so the connection is idle again before the client can send
/// its next request: a keep-alive client keeps exactly one upstream
/// connection. (Waiting for readiness in a task of its own raced that next
/// request on a multi-threaded runtime and opened a second connection.)
/// Dropped otherwise (a body that hyper never polls, a local reply), it is
/// returned once hyper says it is ready; a connection whose exchange broke
/// off never becomes ready and closes.
pub(crate) struct PoolReturn {
    tx: Option<H1>,
    idle: Weak<Mutex<Vec<H1>>>,
    recycled: Arc<Notify>,
    max: usize,
}

impl PoolReturn {
    /// The response body was read to its end.
    pub(crate) fn body_ended(mut self) {
        // The connection's task marks it ready as soon as it has read the
        // last byte, which is before the end reached this body.
        if let Some(tx) = self.tx.take_if(|tx| tx.is_ready()) {
            put_back(&self.idle, &self.recycled, self.max, tx);
        }
    }
}

impl Drop for PoolReturn {
    fn drop(&mut self) {
        let Some(mut tx) = self.tx.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (idle, recycled, max) = (self.idle.clone(), self.recycled.clone(), self.max);
        runtime.spawn(async move {
            if tx.ready().await.is_ok() {
                put_back(&idle, &recycled, max, tx);
            }
        });
    }
}

/// Adds `tx` to the idle list if the connection's [`Upstreams`] still
/// exists and has room.
fn put_back(idle: &Weak<Mutex<Vec<H1>>>, recycled: &Notify, max: usize, tx: H1) {
    let Some(idle) = idle.upgrade() else { return };
    let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
    if idle.len() < max && !tx.is_closed() {
        idle.push(tx);
        drop(idle);
        recycled.notify_one();
    }
}
