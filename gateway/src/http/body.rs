//! Bodies: inspection with hold-back on the way up, observation on the way
//! down, and byte counting of the client connection.

use std::{
    collections::VecDeque,
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::{
    error::BoxError, exchange::ExchangeLog, upstream::PoolReturn, BodyEdit, BodyInspector, BodyVerdict,
    ExchangeOutcome, HttpError, Limits,
};
use crate::limits::{Budget, Limit, LimitExceeded, Reservation};

/// Frames in flight between the inspecting pump and hyper. Small, so that
/// a slow upstream pushes back on the client instead of filling memory.
const PUMP_CHANNEL_FRAMES: usize = 4;

/// Body of an upstream request.
pub(crate) struct RequestBody {
    kind: RequestKind,
    sent: Arc<AtomicU64>,
    /// Buffered bytes count against the connection's share and the pools
    /// until hyper is done with the body.
    _held: Option<Held>,
}

/// Bytes of request bodies buffered by one connection (all its streams).
pub(crate) type ConnBuffered = Arc<AtomicUsize>;

/// Bytes one request holds buffered: its part of the connection's count
/// and its reservation in the pools (cgroup, gateway). Given back on drop.
pub(crate) struct Held {
    conn: ConnBuffered,
    bytes: usize,
    _pools: Reservation,
}

impl Held {
    fn new(conn: ConnBuffered) -> Held {
        Held { conn, bytes: 0, _pools: Reservation::default() }
    }

    /// Adds `n` bytes reserved in `pools`; returns the connection's new total.
    fn grow(&mut self, n: usize, pools: Reservation) -> usize {
        self.bytes += n;
        self._pools.absorb(pools);
        self.conn.fetch_add(n, Ordering::Relaxed) + n
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.conn.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

enum RequestKind {
    /// Not inspected: the client's body as is.
    Incoming(Incoming),
    /// Inspected completely and buffered (at most `max_buffered_body`).
    /// `exact` keeps the client's framing: a length only if the client
    /// sent one, so chunked stays chunked (and HTTP/1 trailers survive).
    Frames { frames: VecDeque<Frame<Bytes>>, remaining: u64, exact: bool },
    /// Inspected while streaming; fed by [`pump`]. `abort` fires when the
    /// pump gives up, and the body then fails instead of ending, so that
    /// hyper resets the upstream request rather than completing it.
    Channel { rx: mpsc::Receiver<Frame<Bytes>>, abort: CancellationToken },
}

impl RequestBody {
    pub(crate) fn incoming(body: Incoming, sent: Arc<AtomicU64>) -> RequestBody {
        RequestBody { kind: RequestKind::Incoming(body), sent, _held: None }
    }

    fn frames(frames: VecDeque<Frame<Bytes>>, exact: bool, sent: Arc<AtomicU64>, held: Held) -> RequestBody {
        let remaining = frames.iter().filter_map(|f| f.data_ref()).map(|d| d.len() as u64).sum();
        RequestBody { kind: RequestKind::Frames { frames, remaining, exact }, sent, _held: Some(held) }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = match &mut this.kind {
            RequestKind::Incoming(body) => match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(f)) => Some(f),
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                None => None,
            },
            RequestKind::Frames { frames, remaining, .. } => {
                let f = frames.pop_front();
                if let Some(d) = f.as_ref().and_then(|f| f.data_ref()) {
                    *remaining -= d.len() as u64;
                }
                f
            }
            RequestKind::Channel { rx, abort } => {
                if abort.is_cancelled() {
                    return Poll::Ready(Some(Err(HttpError::BodyAborted.into())));
                }
                let f = ready!(rx.poll_recv(cx));
                // The pump cancels before it drops the sender, so a closed
                // channel after a cancel is an abort, not the end.
                if f.is_none() && abort.is_cancelled() {
                    return Poll::Ready(Some(Err(HttpError::BodyAborted.into())));
                }
                f
            }
        };
        if let Some(d) = frame.as_ref().and_then(|f| f.data_ref()) {
            this.sent.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Incoming(b) => b.is_end_stream(),
            RequestKind::Frames { frames, .. } => frames.is_empty(),
            RequestKind::Channel { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Incoming(b) => b.size_hint(),
            RequestKind::Frames { remaining, exact: true, .. } => SizeHint::with_exact(*remaining),
            RequestKind::Frames { .. } => SizeHint::default(),
            RequestKind::Channel { .. } => SizeHint::default(),
        }
    }
}

/// Result of inspecting a request body up to the buffering limit.
pub(crate) enum Inspected {
    /// The inspector refused; nothing was sent anywhere.
    Blocked(http::Response<Bytes>),
    /// A limit refused (no room to buffer, or the body stalled); nothing
    /// was sent anywhere.
    Refused(LimitExceeded),
    /// Fully read and inspected; `edited` is the new data length when the
    /// inspector replaced the data ([`BodyEdit::Replace`]).
    Buffered {
        /// The body to send.
        body: RequestBody,
        /// The new length, when edited.
        edited: Option<u64>,
    },
    /// Too large to buffer: streams on, still inspected. If the inspector
    /// (or the body idle timeout) refuses later, `blocked` yields the
    /// response for the client (after the body was aborted).
    Streaming { body: RequestBody, blocked: oneshot::Receiver<http::Response<Bytes>> },
}

/// What a request body's buffering draws on.
pub(crate) struct BodyBudgets<'a> {
    /// The connection's limits.
    pub(crate) limits: &'a Limits,
    /// Bytes buffered by the connection's streams together.
    pub(crate) conn: &'a ConnBuffered,
    /// The pools the connection's buffered bytes are counted in.
    pub(crate) pool: &'a Budget,
    /// For refusals.
    pub(crate) conn_id: u64,
}

/// Reads and inspects `incoming` until it ends or exceeds
/// `limits.max_buffered_body` (or the connection's buffered bytes exceed
/// `limits.max_buffered_per_connection`: then it streams early rather than
/// let many HTTP/2 streams pile up memory). Every buffered byte is reserved
/// in `budgets.pool` first: without room, the body is not read (the client
/// is held back) for up to `limits.buffer_wait`, then refused. A body that
/// sends nothing for `limits.body_idle_timeout` is refused too. Polling the
/// body is what makes hyper send `100 Continue`, so this must not wait for
/// anything else first.
///
/// An `async move` block, not an `async fn`: an `async fn` keeps a second
/// copy of its arguments (the inspector) in its future, which is part of
/// every request's.
#[allow(clippy::manual_async_fn)] // an `async fn` would copy its arguments
pub(crate) fn inspect<'a, B: BodyInspector>(
    mut incoming: Incoming,
    mut inspector: B,
    budgets: BodyBudgets<'a>,
    abort: CancellationToken,
    sent: Arc<AtomicU64>,
) -> impl Future<Output = Result<Inspected, HttpError>> + Send + 'a {
    async move {
        let limits = budgets.limits;
        let exact = incoming.size_hint().exact().is_some();
        let mut held = Held::new(budgets.conn.clone());
        let mut conn_buffered = 0;
        let mut frames = VecDeque::new();
        let mut buffered = 0usize;
        loop {
            let Ok(next) = tokio::time::timeout(limits.body_idle_timeout, incoming.frame()).await else {
                return Ok(Inspected::Refused(body_idle(limits)));
            };
            match next {
                None => {
                    if let BodyVerdict::Respond(r) = inspector.finish().await {
                        return Ok(Inspected::Blocked(r));
                    }
                    if let BodyVerdict::Respond(r) = inspector.before_upstream().await {
                        return Ok(Inspected::Blocked(r));
                    }
                    let edited = match inspector.edit(&frames) {
                        BodyEdit::Keep => None,
                        BodyEdit::Refuse(r) => return Ok(Inspected::Blocked(r)),
                        BodyEdit::Replace(data) => {
                            let len = data.len() as u64;
                            // The data is replaced whole; trailers stay.
                            frames.retain(|f| !f.is_data());
                            frames.push_front(Frame::data(data));
                            Some(len)
                        }
                    };
                    let body = RequestBody::frames(frames, exact, sent, held);
                    return Ok(Inspected::Buffered { body, edited });
                }
                Some(Err(e)) => return Err(HttpError::ClientBody(e)),
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        if data.is_empty() {
                            continue;
                        }
                        // Room first: while there is none, nothing more is read
                        // from this client (its window or socket fills up).
                        let reserved = match budgets.pool.reserve(data.len(), limits.buffer_wait).await {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::info!(conn_id = budgets.conn_id, limit = %e.limit, max = e.max, "request refused: no room to buffer its body");
                                return Ok(Inspected::Refused(e));
                            }
                        };
                        if let BodyVerdict::Respond(r) = inspector.feed(data).await {
                            return Ok(Inspected::Blocked(Box::pin(drain(incoming, inspector, r, limits)).await));
                        }
                        buffered += data.len();
                        conn_buffered = held.grow(data.len(), reserved);
                    } else if let Some(trailers) = frame.trailers_ref() {
                        if let BodyVerdict::Respond(r) = inspector.trailers(trailers).await {
                            return Ok(Inspected::Blocked(r));
                        }
                    }
                    // A frame is a slice of hyper's (or h2's) read buffer and
                    // would pin all of it while buffered: kept as a copy of its
                    // own size, the memory held is what the pools count.
                    let frame = match frame.into_data() {
                        Ok(data) => Frame::data(Bytes::copy_from_slice(&data)),
                        Err(other) => other,
                    };
                    frames.push_back(frame);
                    if buffered > limits.max_buffered_body || conn_buffered > limits.max_buffered_per_connection {
                        break;
                    }
                }
            }
        }
        if let BodyVerdict::Respond(r) = inspector.streaming() {
            return Ok(Inspected::Blocked(r));
        }
        if let BodyVerdict::Respond(r) = inspector.before_upstream().await {
            return Ok(Inspected::Blocked(r));
        }
        let (tx, rx) = mpsc::channel(PUMP_CHANNEL_FRAMES);
        let (blocked_tx, blocked) = oneshot::channel();
        let pump = Pump {
            incoming,
            inspector,
            tx,
            blocked: Some(blocked_tx),
            abort: abort.clone(),
            limits: limits.clone(),
            conn_id: budgets.conn_id,
        };
        tokio::spawn(pump.run(frames, held));
        Ok(Inspected::Streaming {
            body: RequestBody { kind: RequestKind::Channel { rx, abort }, sent, _held: None },
            blocked,
        })
    }
}

/// A request was refused with `response`: reads the rest of its body
/// (bounded by [`Limits::drain_after_refusal`] and
/// [`Limits::drain_timeout`]) into the inspector, so that every key in it
/// is found; nothing goes anywhere. The inspector's latest refusal (which
/// may name more findings) is the answer.
pub(crate) async fn drain<B: BodyInspector>(
    mut incoming: Incoming,
    mut inspector: B,
    mut response: http::Response<Bytes>,
    limits: &Limits,
) -> http::Response<Bytes> {
    let mut read = 0usize;
    let deadline = tokio::time::Instant::now() + limits.drain_timeout;
    loop {
        if read > limits.drain_after_refusal {
            return response;
        }
        let frame = match tokio::time::timeout_at(deadline, incoming.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            // The end, a broken body, or a client too slow to wait for.
            Ok(None) => break,
            Ok(Some(Err(_))) | Err(_) => return response,
        };
        let verdict = match frame.data_ref() {
            Some(data) => {
                read += data.len();
                inspector.feed(data).await
            }
            None => match frame.trailers_ref() {
                Some(trailers) => inspector.trailers(trailers).await,
                None => BodyVerdict::Continue,
            },
        };
        if let BodyVerdict::Respond(r) = verdict {
            response = r;
        }
    }
    if let BodyVerdict::Respond(r) = inspector.finish().await {
        response = r;
    }
    response
}

fn body_idle(limits: &Limits) -> LimitExceeded {
    LimitExceeded::new(Limit::BodyIdle, limits.body_idle_timeout.as_secs())
}

/// Moves an over-limit body from the client to upstream, inspecting every
/// chunk before it may leave and holding back the inspected tail.
struct Pump<B> {
    incoming: Incoming,
    inspector: B,
    tx: mpsc::Sender<Frame<Bytes>>,
    blocked: Option<oneshot::Sender<http::Response<Bytes>>>,
    abort: CancellationToken,
    limits: Limits,
    conn_id: u64,
}

impl<B: BodyInspector> Pump<B> {
    async fn run(mut self, initial: VecDeque<Frame<Bytes>>, buffered: Held) {
        let mut held = HoldBack::new(self.limits.hold_back);
        // Trailers of the buffered prefix were inspected already.
        let mut trailers: Option<HeaderMap> = None;
        for frame in initial {
            match frame.into_data() {
                Ok(d) => held.push(d),
                Err(f) => trailers = f.into_trailers().ok(),
            }
        }
        if !held.release(&self.tx).await {
            return;
        }
        // From here on at most hold_back + a few frames are held.
        drop(buffered);
        loop {
            let frame = tokio::select! {
                f = tokio::time::timeout(self.limits.body_idle_timeout, self.incoming.frame()) => match f {
                    Ok(f) => f,
                    Err(_) => {
                        let limit = LimitExceeded::new(Limit::BodyIdle, self.limits.body_idle_timeout.as_secs());
                        tracing::info!(conn_id = self.conn_id, limit = %limit.limit, "request body stalled; aborting the request");
                        self.block(limit.http_response(self.conn_id));
                        return;
                    }
                },
                // Upstream stopped reading (answered early or failed): no
                // point in pulling more from the client.
                _ = self.tx.closed() => return,
            };
            match frame {
                None => break,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "client request body failed");
                    self.abort.cancel();
                    return;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if data.is_empty() {
                            continue;
                        }
                        if let BodyVerdict::Respond(r) = self.inspector.feed(&data).await {
                            // Upstream's request fails at once; the rest of
                            // the body is still read for its keys.
                            self.abort.cancel();
                            let r = drain(self.incoming, self.inspector, r, &self.limits).await;
                            if let Some(tx) = self.blocked.take() {
                                let _ = tx.send(r);
                            }
                            return;
                        }
                        held.push(data);
                        if !held.release(&self.tx).await {
                            return;
                        }
                    }
                    Err(f) => {
                        if let Ok(t) = f.into_trailers() {
                            if let BodyVerdict::Respond(r) = self.inspector.trailers(&t).await {
                                self.block(r);
                                return;
                            }
                            trailers = Some(t);
                        }
                    }
                },
            }
        }
        if let BodyVerdict::Respond(r) = self.inspector.finish().await {
            self.block(r);
            return;
        }
        if !held.flush(&self.tx).await {
            return;
        }
        if let Some(t) = trailers {
            let _ = self.tx.send(Frame::trailers(t)).await;
        }
    }

    fn block(&mut self, response: http::Response<Bytes>) {
        // Abort first: by the time the handler sees the verdict, the
        // upstream body already fails instead of completing.
        self.abort.cancel();
        if let Some(tx) = self.blocked.take() {
            let _ = tx.send(response);
        }
    }
}

/// Inspected bytes not yet forwarded.
struct HoldBack {
    chunks: VecDeque<Bytes>,
    len: usize,
    keep: usize,
}

impl HoldBack {
    fn new(keep: usize) -> HoldBack {
        HoldBack { chunks: VecDeque::new(), len: 0, keep }
    }

    fn push(&mut self, data: Bytes) {
        self.len += data.len();
        self.chunks.push_back(data);
    }

    /// Forwards all but the last `keep` bytes. False if upstream is gone.
    async fn release(&mut self, tx: &mpsc::Sender<Frame<Bytes>>) -> bool {
        while self.len > self.keep {
            let excess = self.len - self.keep;
            let Some(mut chunk) = self.chunks.pop_front() else { break };
            if chunk.len() > excess {
                let rest = chunk.split_off(excess);
                self.chunks.push_front(rest);
            }
            self.len -= chunk.len();
            if tx.send(Frame::data(chunk)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Forwards everything (the inspector has seen the end).
    async fn flush(&mut self, tx: &mpsc::Sender<Frame<Bytes>>) -> bool {
        self.keep = 0;
        self.release(tx).await
    }
}

/// Body of a response to the client.
pub(crate) struct ResponseBody {
    kind: ResponseKind,
    /// Fires when the request body was blocked mid-stream: the response
    /// must then fail rather than end normally.
    abort: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    log: ExchangeLog,
    /// Whether data goes through the log's response inspector.
    filter: Filter,
    /// A frame that must follow the filter's final output (trailers).
    pending: Option<Frame<Bytes>>,
    done: bool,
}

/// What the response inspector does with upstream's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFilter {
    /// Nothing.
    Off,
    /// Sees every chunk; the body and its framing are unchanged.
    Observe,
    /// Rewrites every chunk (masking).
    Rewrite,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Filter {
    Off,
    Observe,
    On,
    /// `end` was called; only `pending` and the end remain.
    Ended,
}

enum ResponseKind {
    Full(Option<Bytes>),
    /// Upstream's body, and the way its connection goes back to the pool
    /// once the body has ended.
    Upstream(Incoming, Option<PoolReturn>),
}

impl ResponseBody {
    /// A response made up here (verdicts, 502s, 101s).
    pub(crate) fn full(data: Bytes, log: ExchangeLog) -> ResponseBody {
        let data = (!data.is_empty()).then_some(data);
        ResponseBody {
            kind: ResponseKind::Full(data),
            abort: None,
            log,
            filter: Filter::Off,
            pending: None,
            done: false,
        }
    }

    /// Upstream's response body, streamed frame by frame; `filter` says
    /// whether the response inspector sees or rewrites data frames.
    pub(crate) fn upstream(
        body: Incoming,
        pool_return: Option<PoolReturn>,
        abort: Option<CancellationToken>,
        log: ExchangeLog,
        filter: BodyFilter,
    ) -> ResponseBody {
        ResponseBody {
            kind: ResponseKind::Upstream(body, pool_return),
            abort: abort.map(|t| Box::pin(t.cancelled_owned())),
            log,
            filter: match filter {
                BodyFilter::Off => Filter::Off,
                BodyFilter::Observe => Filter::Observe,
                BodyFilter::Rewrite => Filter::On,
            },
            pending: None,
            done: false,
        }
    }

    fn finish(&mut self) {
        self.done = true;
        self.log.emit();
    }

    /// The response cannot continue: the client sees its stream fail.
    fn fail(&mut self, e: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.log.outcome() == ExchangeOutcome::Forwarded {
            self.log.set_outcome(ExchangeOutcome::Aborted);
        }
        self.finish();
        Poll::Ready(Some(Err(e)))
    }

    /// Runs the filter over a data chunk, or flushes it at the end.
    fn filtered(&mut self, data: Option<Bytes>) -> Result<Bytes, BoxError> {
        let Some(inspector) = self.log.response_inspector() else { return Ok(data.unwrap_or_default()) };
        let out = match data {
            Some(d) => inspector.chunk(d),
            None => inspector.end(),
        };
        out.map_err(|reason| HttpError::ResponseFilter(reason).into())
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(abort) = this.abort.as_mut() {
                if abort.as_mut().poll(cx).is_ready() {
                    this.log.set_outcome(ExchangeOutcome::Blocked);
                    this.finish();
                    return Poll::Ready(Some(Err(HttpError::BodyAborted.into())));
                }
            }
            if this.filter == Filter::Ended {
                let frame = this.pending.take();
                if frame.is_none() {
                    this.finish();
                }
                return Poll::Ready(frame.map(Ok));
            }
            let frame = match &mut this.kind {
                ResponseKind::Full(data) => data.take().map(Frame::data),
                ResponseKind::Upstream(body, pool_return) => {
                    let frame = match ready!(Pin::new(&mut *body).poll_frame(cx)) {
                        Some(Ok(f)) => Some(f),
                        Some(Err(e)) => return this.fail(e.into()),
                        None => None,
                    };
                    // hyper stops polling once a body says it has ended, so
                    // the end is noticed here, with the last frame.
                    if frame.is_none() || body.is_end_stream() {
                        if let Some(back) = pool_return.take() {
                            back.body_ended();
                        }
                    }
                    frame
                }
            };
            let frame = match (this.filter, frame) {
                (Filter::Off, frame) => frame,
                (Filter::Observe, frame) => {
                    if let (Some(d), Some(inspector)) =
                        (frame.as_ref().and_then(Frame::data_ref), this.log.response_inspector())
                    {
                        inspector.observe(d);
                    }
                    frame
                }
                (_, Some(f)) if f.is_data() => {
                    let data = f.into_data().unwrap_or_default();
                    match this.filtered(Some(data)) {
                        // Held back whole: nothing to send yet.
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => Some(Frame::data(out)),
                        Err(e) => return this.fail(e),
                    }
                }
                // End of data (trailers or the end): flush what the filter held.
                (_, rest) => {
                    this.filter = Filter::Ended;
                    this.pending = match rest.map(Frame::into_trailers) {
                        Some(Ok(mut trailers)) => {
                            if let Some(inspector) = this.log.response_inspector() {
                                inspector.trailers(&mut trailers);
                            }
                            Some(Frame::trailers(trailers))
                        }
                        Some(Err(other)) => Some(other),
                        None => None,
                    };
                    match this.filtered(None) {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => Some(Frame::data(out)),
                        Err(e) => return this.fail(e),
                    }
                }
            };
            match &frame {
                Some(f) => {
                    if let Some(d) = f.data_ref() {
                        this.log.add_down(d.len());
                    }
                }
                None => this.finish(),
            }
            return Poll::Ready(frame.map(Ok));
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.done {
            return true;
        }
        match (&self.kind, self.filter) {
            (_, Filter::Ended) => self.pending.is_none(),
            (_, Filter::On) => false,
            (ResponseKind::Full(d), Filter::Off | Filter::Observe) => d.is_none(),
            (ResponseKind::Upstream(b, _), Filter::Off | Filter::Observe) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.kind, self.filter) {
            (_, Filter::On | Filter::Ended) => SizeHint::default(),
            (ResponseKind::Full(d), Filter::Off | Filter::Observe) => {
                SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64))
            }
            (ResponseKind::Upstream(b, _), Filter::Off | Filter::Observe) => b.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if !self.done && !self.is_end_stream() && self.log.outcome() == ExchangeOutcome::Forwarded {
            // hyper gave up on the body: client gone or stream reset.
            self.log.set_outcome(ExchangeOutcome::Aborted);
        }
        self.finish();
    }
}

/// Bytes moved over the client connection.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) up: AtomicU64,
    pub(crate) down: AtomicU64,
}

/// Counts the bytes of the client connection (and of tunnels made from
/// it, since hyper's `Upgraded` keeps wrapping this IO).
pub(crate) struct CountingIo<T> {
    inner: T,
    counters: Arc<Counters>,
}

impl<T> CountingIo<T> {
    pub(crate) fn new(inner: T, counters: Arc<Counters>) -> CountingIo<T> {
        CountingIo { inner, counters }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        self.counters.up.fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.counters.down.fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))?;
        self.counters.down.fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    async fn drain(rx: &mut mpsc::Receiver<Frame<Bytes>>) -> Vec<u8> {
        let mut out = Vec::new();
        while let Ok(f) = rx.try_recv() {
            out.extend_from_slice(&f.into_data().unwrap());
        }
        out
    }

    #[tokio::test]
    async fn hold_back_keeps_the_inspected_tail_until_flushed() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut held = HoldBack::new(4);
        held.push(Bytes::from_static(b"0123456789"));
        assert!(held.release(&tx).await);
        assert_eq!(drain(&mut rx).await, b"012345");
        held.push(Bytes::from_static(b"ab"));
        held.push(Bytes::from_static(b"c"));
        assert!(held.release(&tx).await);
        assert_eq!(drain(&mut rx).await, b"678");
        assert_eq!(held.len, 4);
        assert!(held.flush(&tx).await);
        assert_eq!(drain(&mut rx).await, b"9abc");
        drop(rx);
        held.push(Bytes::from_static(b"0123456789"));
        assert!(!held.release(&tx).await, "a gone upstream is reported");
    }
}
