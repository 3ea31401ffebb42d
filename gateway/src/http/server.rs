//! The client side: hyper serves the connection, and every request goes
//! through inspection before it may reach upstream.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Instant,
};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::{body::Incoming, server::conn as hyper_conn, service::service_fn, upgrade::OnUpgrade};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::oneshot,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::limits::LimitExceeded;

use super::{
    body::{self, BodyBudgets, BodyFilter, ConnBuffered, Counters, CountingIo, Inspected, RequestBody, ResponseBody},
    error::BoxError,
    exchange::{Activity, ExchangeLog, Hook},
    headers, upgrade,
    upstream::{PoolReturn, Upstreams},
    ConnectHint, Exchange, ExchangeOutcome, HeadVerdict, HttpContext, HttpError, Inspector, Limits, ResponseInspector,
    ResponseVerdict, ServeStats, Tunnel, UpstreamConnector, HTTP_TARGET,
};

/// Serves one client connection until it closes.
///
/// `client_h2`: `Some` when TLS ALPN decided the protocol, `None` to detect
/// it from the first bytes (HTTP/2 prior-knowledge preface or HTTP/1.x).
/// Upgraded tunnels (WebSocket) and HTTP/2 streams are waited for before
/// this returns, so the byte counts include them and every exchange of the
/// connection has finished (been logged and recorded) by then. Upstream
/// failures do not end the connection (the client gets a 502 for that
/// request); malformed client HTTP does, with [`HttpError::Client`]. A
/// connection without an exchange in progress for [`Limits::idle_timeout`]
/// is shut down gracefully (HTTP/2: GOAWAY), and ends normally.
pub async fn serve<IO, I, U>(
    client: IO,
    client_h2: Option<bool>,
    ctx: HttpContext,
    inspector: Arc<I>,
    upstream: U,
    limits: Limits,
) -> Result<ServeStats, HttpError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    I: Inspector,
    U: UpstreamConnector,
{
    let never = CancellationToken::new();
    serve_with_shutdown(client, client_h2, ctx, inspector, upstream, limits, never).await
}

/// [`serve`], and when `shutdown` fires, shuts down gracefully: in-flight
/// requests finish, HTTP/1 stops keep-alive, HTTP/2 sends GOAWAY. Tunnels
/// are not cut; callers bound the drain with a timeout of their own.
pub async fn serve_with_shutdown<IO, I, U>(
    client: IO,
    client_h2: Option<bool>,
    ctx: HttpContext,
    inspector: Arc<I>,
    upstream: U,
    limits: Limits,
    shutdown: CancellationToken,
) -> Result<ServeStats, HttpError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    I: Inspector,
    U: UpstreamConnector,
{
    let counters = Arc::new(Counters::default());
    let io = TokioIo::new(CountingIo::new(client, counters.clone()));
    let tunnels = TaskTracker::new();
    let hook: Hook = {
        let inspector = inspector.clone();
        let ctx = ctx.clone();
        Arc::new(move |e: &Exchange| inspector.on_exchange(&ctx, e))
    };
    let activity = Activity::new();
    let shared = Arc::new(Shared {
        upstreams: Upstreams::new(upstream, limits.clone()),
        pool: limits.body_pool.for_connection(&ctx),
        ctx,
        inspector,
        limits: limits.clone(),
        requests: AtomicU64::new(0),
        buffered: ConnBuffered::default(),
        tunnels: tunnels.clone(),
        hook,
        activity: activity.clone(),
    });
    let service = {
        let shared = shared.clone();
        // Boxed: hyper keeps room for one in-flight request future per
        // connection, so an inline one (11 KiB) would sit in every idle
        // keep-alive connection; boxed it exists only while a request does.
        service_fn(move |req| Box::pin(shared.clone().handle(req)))
    };

    let idle = async {
        let release = limits.upstream_idle_timeout.map(|t| (t, || shared.upstreams.release_idle()));
        activity.idle_for(limits.idle_timeout, release).await;
    };
    // With ALPN's answer the explicit builders; auto's http1_only and
    // http2_only are ignored when serving with upgrades.
    // Each arm's connection is boxed so that an HTTP/1.1 connection does
    // not carry room for HTTP/2's (or auto's) state.
    let result: Result<(), BoxError> = match client_h2 {
        Some(false) => {
            let mut b = hyper_conn::http1::Builder::new();
            h1_limits(&mut b, &limits);
            let conn = b.serve_connection(io, service).with_upgrades();
            Box::pin(drive(conn, &shutdown, idle, |c| c.graceful_shutdown())).await
        }
        Some(true) => {
            let mut b = hyper_conn::http2::Builder::new(StreamExecutor(tunnels.clone()));
            h2_limits(&mut b, &limits);
            let conn = b.serve_connection(io, service);
            Box::pin(drive(conn, &shutdown, idle, |c| c.graceful_shutdown())).await
        }
        None => {
            let mut b = auto::Builder::new(StreamExecutor(tunnels.clone()));
            h1_limits(&mut b.http1(), &limits);
            h2_limits(&mut b.http2(), &limits);
            let conn = b.serve_connection_with_upgrades(io, service);
            Box::pin(drive(conn, &shutdown, idle, |c| c.graceful_shutdown())).await
        }
    };

    tunnels.close();
    tunnels.wait().await;
    result.map_err(HttpError::Client)?;
    Ok(ServeStats {
        requests: shared.requests.load(Ordering::Relaxed),
        bytes_up: counters.up.load(Ordering::Relaxed),
        bytes_down: counters.down.load(Ordering::Relaxed),
    })
}

/// Spawns hyper's HTTP/2 stream tasks where `serve` waits for them. A
/// stream's exchange finishes when its task drops the response body, which
/// can be after the connection itself closed: untracked, its record reached
/// the session recorder after the session had ended, and was lost.
#[derive(Clone)]
struct StreamExecutor(TaskTracker);

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// Runs a hyper connection, switching it to graceful shutdown once
/// `shutdown` fires or the connection has been `idle` long enough.
async fn drive<C, E>(
    conn: C,
    shutdown: &CancellationToken,
    idle: impl Future<Output = ()>,
    graceful: impl FnOnce(Pin<&mut C>),
) -> Result<(), BoxError>
where
    C: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r.map_err(Into::into),
        _ = shutdown.cancelled() => {}
        _ = idle => tracing::debug!(target: HTTP_TARGET, "connection idle; closing it"),
    }
    graceful(conn.as_mut());
    conn.await.map_err(Into::into)
}

/// HTTP/1.1 limits: a request head must arrive within
/// `header_read_timeout` (also while kept alive, as hyper counts it), and
/// hyper's buffers stay within `h1_max_buffer`.
fn h1_limits<T>(b: &mut T, limits: &Limits)
where
    T: H1Knobs,
{
    b.knobs(limits);
}

/// HTTP/2 limits: concurrent streams, receive windows (what a client can
/// push into memory unread), send buffers (what a client that does not
/// read can make the gateway queue), and PINGs that drop dead peers.
fn h2_limits<T>(b: &mut T, limits: &Limits)
where
    T: H2Knobs,
{
    b.knobs(limits);
}

/// The HTTP/1 settings, on both of hyper's builder types.
trait H1Knobs {
    fn knobs(&mut self, limits: &Limits);
}

impl H1Knobs for hyper_conn::http1::Builder {
    fn knobs(&mut self, limits: &Limits) {
        self.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.h1_max_buffer.max(MIN_H1_BUFFER))
            .keep_alive(true);
    }
}

/// hyper refuses smaller HTTP/1 buffers.
const MIN_H1_BUFFER: usize = 8192;

impl<E> H1Knobs for auto::Http1Builder<'_, E> {
    fn knobs(&mut self, limits: &Limits) {
        self.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.h1_max_buffer.max(MIN_H1_BUFFER))
            .keep_alive(true);
    }
}

/// The HTTP/2 settings, on both of hyper's builder types.
trait H2Knobs {
    fn knobs(&mut self, limits: &Limits);
}

impl<E> H2Knobs for hyper_conn::http2::Builder<E> {
    fn knobs(&mut self, limits: &Limits) {
        self.timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .initial_stream_window_size(limits.h2_stream_window)
            .initial_connection_window_size(limits.h2_connection_window)
            .max_send_buf_size(limits.h2_send_buffer)
            .keep_alive_interval(limits.h2_keep_alive_interval)
            .keep_alive_timeout(limits.h2_keep_alive_timeout);
    }
}

impl<E> H2Knobs for auto::Http2Builder<'_, E> {
    fn knobs(&mut self, limits: &Limits) {
        self.timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .initial_stream_window_size(limits.h2_stream_window)
            .initial_connection_window_size(limits.h2_connection_window)
            .max_send_buf_size(limits.h2_send_buffer)
            .keep_alive_interval(limits.h2_keep_alive_interval)
            .keep_alive_timeout(limits.h2_keep_alive_timeout);
    }
}

/// State shared by all requests of one client connection.
struct Shared<I, U> {
    ctx: HttpContext,
    inspector: Arc<I>,
    upstreams: Upstreams<U>,
    limits: Limits,
    requests: AtomicU64,
    /// Request body bytes buffered for inspection, all streams together.
    buffered: ConnBuffered,
    /// The pools (cgroup, gateway) buffered bytes are also counted in.
    pool: crate::limits::Budget,
    tunnels: TaskTracker,
    hook: Hook,
    /// Exchanges in progress, for the idle timeout.
    activity: Activity,
}

impl<I: Inspector, U: UpstreamConnector> Shared<I, U> {
    /// One request, from its head to the response head sent back.
    ///
    /// Shaped for the size of its future, which is moved (copied whole)
    /// into its box for every request (`docs/benchmarks.md`, "The request
    /// future"): rustc gives every local alive across two or more awaits a
    /// place of its own, and overlaps only what lives across one. So each
    /// phase is one future awaited once (the head, the body, the upstream
    /// exchange), a phase's result is matched in the statement that awaits
    /// it (a `let` of the result would stay alive, half moved, to the end),
    /// nothing is awaited inside those matches, and what one phase hands
    /// the next is moved. The phases are `async move` blocks rather than
    /// `async fn`s: an `async fn` keeps a second copy of every argument.
    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<ResponseBody>, HttpError>> + Send + 'static {
        let started = Instant::now();
        let active = self.activity.begin();
        self.requests.fetch_add(1, Ordering::Relaxed);
        let (mut parts, body) = req.into_parts();
        async move {
            let version = parts.version;
            let client_h2 = version == Version::HTTP_2;
            let path = parts.uri.path().to_string();

            // A match, not `let verdict = ...await`: a `let` would keep the
            // verdict (1 KiB) alive, half moved, across every later await.
            #[allow(clippy::match_single_binding)]
            let (step, mut log, authority, upgrade) = match self.inspector.inspect_head(&self.ctx, &mut parts).await {
                verdict => {
                    // After the inspector, which may have declined an
                    // upgrade by removing its headers (h2c, say).
                    let upgrade = headers::is_upgrade_request(version, &parts.headers);
                    let authority = headers::authority(&self.ctx, headers::request_host(&parts).as_deref());
                    let mut log = ExchangeLog::new(
                        self.ctx.conn_id,
                        parts.method.clone(),
                        authority.clone(),
                        path,
                        started,
                        self.hook.clone(),
                    );
                    log.hold_active(active);
                    let step = match verdict {
                        HeadVerdict::Respond(r) => return Ok(local(r, log, ExchangeOutcome::Blocked, version)),
                        HeadVerdict::RespondAfterBody { response, body: inspector, watch } => {
                            if let Some(w) = watch {
                                log.set_response_inspector(Box::new(w));
                            }
                            BodyStep::Drain { inspector, response }
                        }
                        HeadVerdict::Forward { body, response } => {
                            if let Some(r) = response {
                                log.set_response_inspector(Box::new(r));
                            }
                            match body {
                                Some(inspector) => BodyStep::Inspect(inspector),
                                None => BodyStep::Pass,
                            }
                        }
                    };
                    (step, log, authority, upgrade)
                }
            };
            let refused = matches!(step, BodyStep::Drain { .. });
            let bodyless_response = parts.method == Method::HEAD;
            if !refused && parts.method == Method::CONNECT {
                // Tunnels inside an intercepted connection would bypass
                // inspection; transparent clients have no reason to send one.
                let mut r = Response::new(Bytes::from_static(b"CONNECT is not supported\n"));
                *r.status_mut() = StatusCode::NOT_IMPLEMENTED;
                return Ok(local(r, log, ExchangeOutcome::Blocked, version));
            }
            let client_upgrade = if upgrade && !refused { parts.extensions.remove::<OnUpgrade>() } else { None };
            if !refused {
                headers::strip_hop_by_hop(&mut parts.headers, upgrade);
            }

            let abort = CancellationToken::new();
            let (body, blocked) = match self.body_phase(body, step, log.bytes_up(), abort.clone()).await {
                BodyOutcome::Forward { body, blocked, edited } => {
                    if let Some(len) = edited {
                        // Edited (keys redacted): a length the client
                        // declared is now wrong; a chunked body stays
                        // chunked.
                        if parts.headers.remove(header::CONTENT_LENGTH).is_some() {
                            parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                        }
                    }
                    (body, blocked)
                }
                BodyOutcome::Blocked(r) => return Ok(local(r, log, ExchangeOutcome::Blocked, version)),
                BodyOutcome::Refused(limit) => {
                    let mut r = limit.http_response(self.ctx.conn_id);
                    if version < Version::HTTP_2 {
                        // The body was not read to its end: the
                        // connection cannot carry another request.
                        r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    return Ok(local(r, log, ExchangeOutcome::Refused, version));
                }
                BodyOutcome::Failed(e) => {
                    log.set_outcome(ExchangeOutcome::Aborted);
                    return Err(e);
                }
            };
            let streaming = blocked.is_some();

            let hint = ConnectHint { allow_h2: !upgrade, client_h2 };
            let req = Request::from_parts(parts, body);
            let (mut resp, pool_return) = match self.send_phase(req, hint, &authority, blocked, &abort).await {
                Sent::Response(resp, pool_return) => {
                    log.response_head_received();
                    (resp, pool_return)
                }
                Sent::Blocked(r) => return Ok(local(r, log, ExchangeOutcome::Blocked, version)),
                Sent::Aborted(e) => {
                    log.set_outcome(ExchangeOutcome::Aborted);
                    return Err(e);
                }
                Sent::Failed(e) => return Ok(self.bad_gateway(&e, log, version)),
            };

            let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            if switching {
                match client_upgrade {
                    Some(client_up) if upgrade => {
                        let tunnel = match log.response_inspector() {
                            Some(inspector) => inspector.upgraded(resp.headers()),
                            None => ResponseInspector::upgraded(&mut super::PassResponses, resp.headers()),
                        };
                        if let Tunnel::Refuse(r) = tunnel {
                            // Upstream's side of the tunnel is dropped unused.
                            return Ok(local(r, log, ExchangeOutcome::Blocked, version));
                        }
                        let upstream_up = hyper::upgrade::on(&mut resp);
                        let max_pending = self.limits.max_buffered_body;
                        self.tunnels.spawn(upgrade::run(self.ctx.conn_id, client_up, upstream_up, tunnel, max_pending));
                        log.set_outcome(ExchangeOutcome::Upgraded);
                    }
                    _ => {
                        let e = HttpError::Upgrade("upstream switched protocols unasked".into());
                        return Ok(self.bad_gateway(&e, log, version));
                    }
                }
            }
            let (mut parts, body) = resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers, switching);
            let verdict = log.response_inspector().map(|r| r.head(&mut parts));
            let filter = match verdict {
                // A tunnel's bytes are not HTTP: nothing to filter.
                _ if switching => BodyFilter::Off,
                None | Some(ResponseVerdict::Pass) => BodyFilter::Off,
                Some(ResponseVerdict::Observe) => BodyFilter::Observe,
                Some(ResponseVerdict::Filter) => {
                    let has_body = !bodyless_response
                        && !matches!(parts.status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
                    // The filter may change the length; hyper re-frames
                    // (chunked on HTTP/1.1). A HEAD answer's length describes a
                    // body never sent, so it stays.
                    if has_body {
                        parts.headers.remove(header::CONTENT_LENGTH);
                        BodyFilter::Rewrite
                    } else {
                        BodyFilter::Off
                    }
                }
                Some(ResponseVerdict::Replace(r)) => {
                    return Ok(local(r, log, ExchangeOutcome::Blocked, version));
                }
            };
            parts.version = version;
            log.set_status(parts.status.as_u16());
            if !switching {
                log.set_outcome(ExchangeOutcome::Forwarded);
            }
            let abort = streaming.then_some(abort);
            Ok(Response::from_parts(parts, ResponseBody::upstream(body, pool_return, abort, log, filter)))
        }
    }

    /// The request body's phase of [`handle`](Self::handle): inspected
    /// (buffered or streaming), drained after a refusal, or passed on.
    #[allow(clippy::manual_async_fn)] // an `async fn` would copy its arguments
    fn body_phase(
        &self,
        incoming: Incoming,
        step: BodyStep<I::Body>,
        sent: Arc<AtomicU64>,
        abort: CancellationToken,
    ) -> impl Future<Output = BodyOutcome> + Send + '_ {
        async move {
            match step {
                BodyStep::Pass => {
                    BodyOutcome::Forward { body: RequestBody::incoming(incoming, sent), blocked: None, edited: None }
                }
                BodyStep::Drain { inspector, response } => {
                    // Boxed, like every await only a refused request
                    // reaches: it would make every request's future larger.
                    BodyOutcome::Blocked(Box::pin(body::drain(incoming, inspector, response, &self.limits)).await)
                }
                BodyStep::Inspect(inspector) => {
                    let budgets = BodyBudgets {
                        limits: &self.limits,
                        conn: &self.buffered,
                        pool: &self.pool,
                        conn_id: self.ctx.conn_id,
                    };
                    match body::inspect(incoming, inspector, budgets, abort, sent).await {
                        Ok(Inspected::Blocked(r)) => BodyOutcome::Blocked(r),
                        Ok(Inspected::Refused(limit)) => BodyOutcome::Refused(limit),
                        Ok(Inspected::Buffered { body, edited }) => {
                            BodyOutcome::Forward { body, blocked: None, edited }
                        }
                        Ok(Inspected::Streaming { body, blocked }) => {
                            BodyOutcome::Forward { body, blocked: Some(blocked), edited: None }
                        }
                        Err(e) => BodyOutcome::Failed(e),
                    }
                }
            }
        }
    }

    /// The upstream exchange's phase of [`handle`](Self::handle): sends
    /// the request and waits for the response head, within the response
    /// timeout; a streaming body's late refusal (`blocked`) wins.
    #[allow(clippy::manual_async_fn)] // an `async fn` would copy its arguments
    fn send_phase<'a>(
        &'a self,
        req: Request<RequestBody>,
        hint: ConnectHint,
        authority: &'a str,
        blocked: Option<oneshot::Receiver<Response<Bytes>>>,
        abort: &'a CancellationToken,
    ) -> impl Future<Output = Sent> + Send + 'a {
        async move {
            let limit = self.limits.response_timeout;
            let timed_out = |_| Err(HttpError::ResponseTimeout(limit));
            let send = |req| tokio::time::timeout(limit, self.upstreams.send(req, hint, authority, self.ctx.tls));
            // Made in each arm: made before the match, it would be alive
            // across more than one await, with room of its own.
            let result = match blocked {
                None => send(req).await.unwrap_or_else(timed_out),
                // Boxed: only streaming (large) request bodies race a late
                // refusal, and the race's future is the larger one.
                Some(rx) => {
                    let send = send(req);
                    let send = async move { send.await.unwrap_or_else(timed_out) };
                    match Box::pin(race_refusal(send, rx, abort)).await {
                        Ok(r) => r,
                        Err(refused) => return refused,
                    }
                }
            };
            match result {
                Ok((resp, pool_return)) => Sent::Response(resp, pool_return),
                Err(e) if abort.is_cancelled() => Sent::Aborted(e),
                Err(e) => Sent::Failed(e),
            }
        }
    }

    fn bad_gateway(&self, err: &HttpError, log: ExchangeLog, version: Version) -> Response<ResponseBody> {
        tracing::warn!(target: HTTP_TARGET, conn_id = self.ctx.conn_id, error = %err, "upstream failed");
        let body = serde_json::json!({ "error": err.to_string(), "conn_id": self.ctx.conn_id });
        let mut resp = Response::new(Bytes::from(body.to_string()));
        *resp.status_mut() = match err {
            HttpError::ConnectTimeout(_) | HttpError::ResponseTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        local(resp, log, ExchangeOutcome::UpstreamFailed, version)
    }
}

/// Waits for upstream's answer to a request whose body still streams
/// while its inspection goes on: a refusal from the inspection (`rx`)
/// wins. `Err` is how the exchange ended instead of upstream's answer.
async fn race_refusal<F, T>(
    send: F,
    mut rx: oneshot::Receiver<Response<Bytes>>,
    abort: &CancellationToken,
) -> Result<Result<T, HttpError>, Sent>
where
    F: Future<Output = Result<T, HttpError>>,
{
    tokio::pin!(send);
    tokio::select! {
        r = &mut send => match r {
            Err(e) if abort.is_cancelled() => {
                // The body was aborted under the request: either blocked
                // (the verdict is on its way) or the client's body failed.
                match rx.await {
                    Ok(r) => Err(Sent::Blocked(r)),
                    Err(_) => Err(Sent::Aborted(e)),
                }
            }
            r => Ok(r),
        },
        verdict = &mut rx => match verdict {
            Ok(r) => Err(Sent::Blocked(r)),
            // The pump finished without objection.
            Err(_) => Ok(send.await),
        },
    }
}

/// A response made here rather than by upstream.
fn local(
    resp: Response<Bytes>,
    mut log: ExchangeLog,
    outcome: ExchangeOutcome,
    version: Version,
) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    parts.version = version;
    log.set_status(parts.status.as_u16());
    log.set_outcome(outcome);
    Response::from_parts(parts, ResponseBody::full(body, log))
}

/// What the head phase of [`Shared::handle`] leaves for the body's.
enum BodyStep<B> {
    /// Forwarded uninspected (the inspector did not ask to see it).
    Pass,
    /// Inspected before (and while) it goes upstream.
    Inspect(B),
    /// Refused at its head: read into `inspector` for its keys, then
    /// answered with `response` (or the inspector's later answer).
    Drain { inspector: B, response: Response<Bytes> },
}

/// How the body phase of [`Shared::handle`] ended.
enum BodyOutcome {
    /// Upstream gets `body`; `blocked` yields a streaming body's late
    /// refusal; `edited` is the data's new length when it was edited.
    Forward { body: RequestBody, blocked: Option<oneshot::Receiver<Response<Bytes>>>, edited: Option<u64> },
    /// The inspector refused: the client gets this, nothing went upstream.
    Blocked(Response<Bytes>),
    /// A limit refused the body.
    Refused(LimitExceeded),
    /// The client's body failed.
    Failed(HttpError),
}

/// How the upstream phase of [`Shared::handle`] ended.
enum Sent {
    /// Upstream answered.
    Response(Response<Incoming>, Option<PoolReturn>),
    /// The streaming body was refused on the way: the client gets this.
    Blocked(Response<Bytes>),
    /// The client's body failed under the request.
    Aborted(HttpError),
    /// Upstream failed (or timed out): a 502 or 504.
    Failed(HttpError),
}
