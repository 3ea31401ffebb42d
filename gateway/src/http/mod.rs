//! HTTP/1.1 and HTTP/2 intercepting proxy engine.
//!
//! [`serve`] speaks HTTP to one (already TLS-terminated, if applicable)
//! client connection with hyper, shows every request to an [`Inspector`]
//! before anything reaches upstream, and forwards what the inspector lets
//! through to the original destination over connections opened by an
//! [`UpstreamConnector`]. Everything streams: response frames reach the
//! client as they arrive, and request bodies are held in memory only up to
//! [`Limits::max_buffered_body`].
//!
//! The guarantee the engine exists for: bytes the inspector blocks never
//! leave for upstream. Small bodies are inspected completely before the
//! upstream request starts; large bodies are fed to the inspector chunk by
//! chunk *before* each chunk is forwarded, with the last
//! [`Limits::hold_back`] bytes held back so that a key split across chunks
//! is caught before any part of it goes out.
//!
//! See `docs/http.md` for the design.

mod body;
mod error;
mod exchange;
mod headers;
mod server;
mod upgrade;
mod upstream;

#[cfg(test)]
mod tests;

use std::{collections::VecDeque, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

pub use error::HttpError;

use crate::limits::{Budget, Limit};
pub use server::{serve, serve_with_shutdown};
pub use upgrade::TUNNEL_LINGER;

/// tracing target of per-request events.
pub const HTTP_TARGET: &str = "gateway::http";

/// Per-connection facts the inspector sees.
#[derive(Debug, Clone)]
pub struct HttpContext {
    /// Gateway-assigned connection id (also in connection events).
    pub conn_id: u64,
    /// SNI, or the `Host` of a plaintext connection. Becomes the authority
    /// of every upstream request, so what the inspector judged by is what
    /// upstream sees. Empty means "use the request's own Host".
    pub server_name: String,
    /// Where the client meant to connect.
    pub orig_dst: SocketAddr,
    /// Whether the client spoke TLS to us (decides `https` vs `http`).
    pub tls: bool,
}

/// Verdict on a request head, before anything is sent upstream.
#[derive(Debug)]
pub enum HeadVerdict<B, R> {
    /// Send the request on. With `Some`, every body chunk is fed to the
    /// body inspector before it can go upstream; with `None` the body
    /// streams through uninspected.
    Forward {
        /// The body inspector for this request.
        body: Option<B>,
        /// Follows the request to its response (masking, recording).
        response: Option<R>,
    },
    /// Answer the client with this response; nothing goes upstream.
    Respond(http::Response<Bytes>),
    /// Answer the client, but first show the request's body (what the
    /// client sends of it within [`Limits::drain_after_refusal`]) to `body`,
    /// so that every key in a refused request is still seen; a `Respond`
    /// from it replaces `response`. Nothing goes upstream. `watch`, if
    /// any, is told how the exchange ended.
    RespondAfterBody {
        /// The answer, unless the body inspector gives a later one.
        response: http::Response<Bytes>,
        /// Sees the body.
        body: B,
        /// Learns how the exchange ended (recording).
        watch: Option<R>,
    },
}

/// Verdict after some body bytes.
#[derive(Debug)]
pub enum BodyVerdict {
    /// Keep going.
    Continue,
    /// Abort the request: if upstream has not been contacted yet, it never
    /// will be; otherwise the upstream request is reset. The client gets
    /// this response if its response has not started (else its stream is
    /// aborted).
    Respond(http::Response<Bytes>),
}

/// What [`BodyInspector::edit`] does with a buffered request body.
#[derive(Debug)]
pub enum BodyEdit {
    /// Send it as received.
    Keep,
    /// Send these bytes instead (already in the body's content encoding).
    Replace(Bytes),
    /// Refuse the request with this response; nothing goes upstream.
    Refuse(http::Response<Bytes>),
}

/// What happens to a response before the client sees it.
#[derive(Debug)]
pub enum ResponseVerdict {
    /// Pass the body through untouched.
    Pass,
    /// Pass the body through untouched and framed as upstream sent it, but
    /// show every chunk to [`ResponseInspector::observe`] (recording).
    Observe,
    /// Pass every body chunk through [`ResponseInspector::chunk`] (and
    /// [`ResponseInspector::end`]); the body is re-framed, since its length
    /// may change.
    Filter,
    /// Answer with this instead; upstream's body is dropped.
    Replace(http::Response<Bytes>),
}

/// Follows one forwarded request to its response: may rewrite the response
/// head and body (masking) and learns how the exchange ended (recording).
/// Object-safe: the engine boxes it.
pub trait ResponseInspector: Send + 'static {
    /// Sees (and may edit) upstream's response head. Not called for
    /// responses made by the engine (blocks, 502s).
    fn head(&mut self, parts: &mut http::response::Parts) -> ResponseVerdict;

    /// Sees one body chunk on its way to the client (after
    /// [`ResponseVerdict::Observe`]).
    fn observe(&mut self, _data: &Bytes) {}

    /// Rewrites one body chunk (after [`ResponseVerdict::Filter`]). An error
    /// cuts the client's response off: nothing unprocessed goes out.
    fn chunk(&mut self, data: Bytes) -> Result<Bytes, String> {
        Ok(data)
    }

    /// Rewrites the response's trailers (after [`ResponseVerdict::Filter`]).
    fn trailers(&mut self, _trailers: &mut http::HeaderMap) {}

    /// The body ended: whatever the inspector still held back.
    fn end(&mut self) -> Result<Bytes, String> {
        Ok(Bytes::new())
    }

    /// The exchange is over (answered, blocked, failed or abandoned); called
    /// exactly once.
    fn finish(&mut self, _exchange: &Exchange) {}

    /// Upstream switched protocols (101) with these response headers: how
    /// the client's bytes of the tunnel are inspected. The default refuses,
    /// so an inspector that does not follow tunnels never gets one
    /// uninspected.
    fn upgraded(&mut self, _headers: &http::HeaderMap) -> Tunnel {
        let mut r = http::Response::new(Bytes::from_static(b"{\"error\":\"upgrade_refused\"}"));
        *r.status_mut() = http::StatusCode::FORBIDDEN;
        Tunnel::Refuse(r)
    }
}

/// What happens to an upgraded connection (WebSocket and the like).
pub enum Tunnel {
    /// The client's bytes go through this inspector before upstream.
    Inspect(Box<dyn TunnelInspector>),
    /// Bytes are relayed untouched (the operator opted the destination out).
    Pass,
    /// The client gets this response instead of the 101; upstream's side
    /// is closed.
    Refuse(http::Response<Bytes>),
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tunnel::Inspect(_) => f.write_str("Inspect"),
            Tunnel::Pass => f.write_str("Pass"),
            Tunnel::Refuse(r) => write!(f, "Refuse({})", r.status()),
        }
    }
}

/// A boxed future, for the object-safe [`TunnelInspector`].
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Judges the client's side of an upgraded connection. The engine keeps
/// the bytes fed but not yet released, and sends upstream only what a
/// verdict releases, so nothing leaves before it was seen.
pub trait TunnelInspector: Send + 'static {
    /// Sees the next bytes from the client.
    fn feed<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, TunnelVerdict>;
    /// No more bytes arrived for a moment: release what can be released
    /// without seeing more (an interactive protocol waits for an answer).
    fn idle(&mut self) -> BoxFuture<'_, TunnelVerdict>;
    /// The client closed its side.
    fn finish(&mut self) -> BoxFuture<'_, TunnelVerdict>;
}

/// A [`TunnelInspector`]'s verdict.
#[derive(Debug)]
pub enum TunnelVerdict {
    /// The first `n` bytes fed and not yet released may go upstream.
    Release(usize),
    /// End the tunnel: send these bytes to the client (a WebSocket close
    /// frame, say), then close both sides. Nothing unreleased goes upstream.
    Close(Bytes),
}

/// Judges requests. One instance serves a whole connection (and, if the
/// caller likes, many connections), so it must be shareable.
pub trait Inspector: Send + Sync + 'static {
    /// Inspects one request's body; created per request by
    /// [`Inspector::inspect_head`].
    type Body: BodyInspector;
    /// Follows one request to its response; created per request by
    /// [`Inspector::inspect_head`].
    type Response: ResponseInspector;

    /// Judges a request head. May modify `parts` (e.g. swap credentials);
    /// the modified head is what goes upstream, after hop-by-hop headers
    /// are removed.
    fn inspect_head(
        &self,
        ctx: &HttpContext,
        parts: &mut http::request::Parts,
    ) -> impl Future<Output = HeadVerdict<Self::Body, Self::Response>> + Send;

    /// Called once per finished exchange (after the response body ended or
    /// was abandoned). The default does nothing.
    fn on_exchange(&self, _ctx: &HttpContext, _exchange: &Exchange) {}
}

/// Judges one request body, chunk by chunk.
pub trait BodyInspector: Send + 'static {
    /// Sees the next chunk. Chunks arrive in order and are not repeated; a
    /// pattern may straddle two chunks, so implementations keep whatever
    /// tail they need.
    fn feed(&mut self, chunk: &[u8]) -> impl Future<Output = BodyVerdict> + Send;

    /// The body ended (also called for requests without a body). Held-back
    /// bytes go upstream only after this returns `Continue`.
    fn finish(&mut self) -> impl Future<Output = BodyVerdict> + Send;

    /// The body ended with these trailers (HTTP/1.1 chunked trailers or
    /// HTTP/2 trailing headers), which go upstream only if this returns
    /// `Continue`. The default lets them through unseen.
    fn trailers(&mut self, _trailers: &http::HeaderMap) -> impl Future<Output = BodyVerdict> + Send {
        std::future::ready(BodyVerdict::Continue)
    }

    /// The whole body was read and inspected (it fit
    /// [`Limits::max_buffered_body`]) and upstream is about to be
    /// contacted: the inspector may replace the body's data (`frames`, as
    /// received; trailers stay) with an edited copy, for example with keys
    /// redacted. Called after [`before_upstream`](Self::before_upstream).
    /// The engine corrects the framing (`Content-Length`).
    fn edit(&mut self, _frames: &VecDeque<http_body::Frame<Bytes>>) -> BodyEdit {
        BodyEdit::Keep
    }

    /// The body is larger than [`Limits::max_buffered_body`]: from now on
    /// it streams, so it can no longer be edited. Called once, before
    /// [`before_upstream`](Self::before_upstream); `Respond` refuses.
    fn streaming(&mut self) -> BodyVerdict {
        BodyVerdict::Continue
    }

    /// Upstream is about to be contacted: called once, after the whole body
    /// (if it fit [`Limits::max_buffered_body`]) or its buffered prefix was
    /// fed. The last point where the request can be held (for example for
    /// a human approval) or refused with nothing sent upstream.
    fn before_upstream(&mut self) -> impl Future<Output = BodyVerdict> + Send {
        std::future::ready(BodyVerdict::Continue)
    }
}

/// A [`ResponseInspector`] for inspectors that leave responses alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassResponses;

impl ResponseInspector for PassResponses {
    fn head(&mut self, _parts: &mut http::response::Parts) -> ResponseVerdict {
        ResponseVerdict::Pass
    }
}

/// An upstream byte stream: TCP, TLS, or anything else.
pub trait UpstreamIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> UpstreamIo for T {}

/// A boxed [`UpstreamIo`].
pub type BoxedIo = Box<dyn UpstreamIo>;

/// What the engine needs from the next upstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectHint {
    /// HTTP/2 may be negotiated (TLS connectors offer `h2` in ALPN only
    /// then). False for HTTP/1.1 upgrades such as WebSocket, which cannot
    /// ride an HTTP/2 connection.
    pub allow_h2: bool,
    /// The client speaks HTTP/2. Plaintext connectors may mirror it (h2c
    /// with prior knowledge) when `allow_h2` is set; gRPC over h2c needs
    /// that.
    pub client_h2: bool,
}

/// Opens fresh upstream transports to the original destination.
pub trait UpstreamConnector: Clone + Send + Sync + 'static {
    /// Connects (and, for TLS, handshakes) and reports whether HTTP/2 was
    /// negotiated. TLS verification failures are reported as `io::Error`
    /// and become a 502 for the client.
    fn connect(&self, hint: ConnectHint) -> impl Future<Output = std::io::Result<(BoxedIo, bool)>> + Send;
}

/// Where a connection's buffered request bodies are counted, besides its
/// own [`Limits::max_buffered_per_connection`]: a pool shared with other
/// connections (see [`crate::limits::Budget`]).
#[derive(Clone)]
pub enum BodyPool {
    /// One pool for every connection served with these limits.
    Shared(Budget),
    /// Chosen per connection by the caller (the proxy gives each
    /// connection its cgroup's pool, nested in the gateway's).
    PerConnection(Arc<dyn Fn(&HttpContext) -> Budget + Send + Sync>),
}

impl BodyPool {
    /// The pool `ctx`'s connection draws from.
    pub fn for_connection(&self, ctx: &HttpContext) -> Budget {
        match self {
            BodyPool::Shared(b) => b.clone(),
            BodyPool::PerConnection(pick) => pick(ctx),
        }
    }
}

impl std::fmt::Debug for BodyPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyPool::Shared(b) => f.debug_tuple("Shared").field(b).finish(),
            BodyPool::PerConnection(_) => f.write_str("PerConnection"),
        }
    }
}

/// Resource limits and timeouts of one connection. Every one holds against
/// a client that tries to exhaust the gateway; `docs/limits.md` says what
/// the client sees when it hits each.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request bodies up to this size are inspected completely before the
    /// upstream request starts. Larger ones stream with hold-back.
    pub max_buffered_body: usize,
    /// Cap on request body bytes buffered by all streams of one connection
    /// together. Past it, further bodies of that connection start streaming
    /// (every byte still inspected before it is forwarded, with hold-back)
    /// before they were inspected completely, so upstream may see the
    /// (inspected, clean) head of a request that is blocked later. Only the
    /// connection's own streams are affected; the pools in `body_pool`
    /// never cause this (they wait, then refuse).
    pub max_buffered_per_connection: usize,
    /// The pools buffered bodies are also counted in. When one has no room,
    /// the request stops reading its body for up to `buffer_wait`, then is
    /// refused (503/429 with a JSON body naming the limit); it never streams
    /// early because of them.
    pub body_pool: BodyPool,
    /// How long a request may wait for room in `body_pool`.
    pub buffer_wait: Duration,
    /// While streaming an inspected body, this many already-inspected bytes
    /// are held back until the next chunk (or the end) was inspected too.
    /// Must be at least the longest pattern the body inspector looks for.
    pub hold_back: usize,
    /// HTTP/1 clients must send a complete request head within this time
    /// (counted from the end of the previous response on a kept-alive
    /// connection: hyper's timer).
    pub header_read_timeout: Duration,
    /// hyper's HTTP/1 read (and write) buffer per connection: the most a
    /// client's bytes can occupy before the engine reads them. Also bounds
    /// a request head. At least 8192.
    pub h1_max_buffer: usize,
    /// A connection with no exchange in progress for this long is closed
    /// gracefully (HTTP/1.1: closed between requests; HTTP/2 and h2c:
    /// GOAWAY). `None` keeps idle connections open.
    pub idle_timeout: Option<Duration>,
    /// A request body that sends nothing for this long mid-body is aborted:
    /// 408 if the response has not started, else the stream is cut (and
    /// upstream's request reset).
    pub body_idle_timeout: Duration,
    /// HTTP/2 PING interval towards the client; a client that does not
    /// answer within `h2_keep_alive_timeout` is dropped. `None` disables.
    pub h2_keep_alive_interval: Option<Duration>,
    /// How long an HTTP/2 PING may go unanswered.
    pub h2_keep_alive_timeout: Duration,
    /// HTTP/2 receive window per stream granted to clients: the most a
    /// stream can push into the gateway's memory while nobody reads it.
    pub h2_stream_window: u32,
    /// HTTP/2 receive window per connection granted to clients (all streams).
    pub h2_connection_window: u32,
    /// Response bytes queued per HTTP/2 stream for a client that does not
    /// read them (hyper's send buffer).
    pub h2_send_buffer: usize,
    /// Connecting (and TLS/HTTP2 handshaking) upstream must finish within
    /// this time, else the client gets a 502.
    pub connect_timeout: Duration,
    /// Idle upstream HTTP/1 connections kept for reuse per client
    /// connection.
    pub max_idle_upstream: usize,
    /// A client connection with no exchange in progress for this long lets
    /// its idle upstream HTTP/1 connections go (HAProxy's pool-purge-delay):
    /// an idle client then holds only its own socket's state. `None` keeps
    /// them as long as the client connection.
    pub upstream_idle_timeout: Option<Duration>,
    /// Upstream HTTP/1 connections open at once for one client connection
    /// (an HTTP/2 client's streams to an HTTP/1.1 upstream would otherwise
    /// open one each); further requests wait for one to be free.
    pub max_upstream_per_connection: usize,
    /// Concurrent streams an HTTP/2 client may open.
    pub max_concurrent_streams: u32,
    /// After a request is refused, up to this many more of its body bytes
    /// are read and inspected (never forwarded), within
    /// [`Limits::drain_timeout`], so every key it carries is found.
    pub drain_after_refusal: usize,
    /// How long reading the rest of a refused request's body may take.
    pub drain_timeout: Duration,
    /// Longest wait for upstream's response head, from when the request is
    /// sent (its upload included): a server that stalls gets the job a 504
    /// rather than a hang.
    pub response_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_buffered_body: 1024 * 1024,
            max_buffered_per_connection: 32 * 1024 * 1024,
            body_pool: BodyPool::Shared(Budget::new(Limit::BufferedTotal, 256 * 1024 * 1024)),
            buffer_wait: Duration::from_secs(5),
            hold_back: 4 * 1024,
            header_read_timeout: Duration::from_secs(30),
            h1_max_buffer: 64 * 1024,
            idle_timeout: Some(Duration::from_secs(20)),
            body_idle_timeout: Duration::from_secs(30),
            h2_keep_alive_interval: Some(Duration::from_secs(30)),
            h2_keep_alive_timeout: Duration::from_secs(20),
            h2_stream_window: 128 * 1024,
            h2_connection_window: 256 * 1024,
            h2_send_buffer: 64 * 1024,
            connect_timeout: Duration::from_secs(10),
            max_idle_upstream: 8,
            upstream_idle_timeout: Some(Duration::from_secs(5)),
            max_upstream_per_connection: 8,
            max_concurrent_streams: 256,
            drain_after_refusal: 8 * 1024 * 1024,
            drain_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(300),
        }
    }
}

/// Totals of one client connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServeStats {
    /// Requests received (forwarded, blocked or failed).
    pub requests: u64,
    /// Bytes read from the client (wire bytes: TLS-decrypted HTTP,
    /// including upgraded tunnels).
    pub bytes_up: u64,
    /// Bytes written to the client (same accounting).
    pub bytes_down: u64,
}

/// How an exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeOutcome {
    /// Forwarded and answered by upstream.
    Forwarded,
    /// Refused by the inspector (head or body).
    Blocked,
    /// Upstream could not be reached or failed; the client got a 502.
    UpstreamFailed,
    /// Upstream answered 101 and the connection became a tunnel.
    Upgraded,
    /// The response body broke off (client gone, upstream reset).
    Aborted,
    /// A resource limit refused it (no room to buffer the body, a body
    /// that stalled); nothing was sent upstream.
    Refused,
}

impl ExchangeOutcome {
    /// The name used in events.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeOutcome::Forwarded => "forwarded",
            ExchangeOutcome::Blocked => "blocked",
            ExchangeOutcome::UpstreamFailed => "upstream_failed",
            ExchangeOutcome::Upgraded => "upgraded",
            ExchangeOutcome::Aborted => "aborted",
            ExchangeOutcome::Refused => "refused",
        }
    }
}

/// One request/response exchange, as reported to
/// [`Inspector::on_exchange`] and in the `gateway::http` event.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The connection's id.
    pub conn_id: u64,
    /// Request method.
    pub method: http::Method,
    /// The authority the request was (or would have been) sent to.
    pub host: String,
    /// Request path without the query string (queries may hold keys).
    pub path: String,
    /// Status sent to the client.
    pub status: u16,
    /// How it ended.
    pub outcome: ExchangeOutcome,
    /// From request head to the end of the response body.
    pub duration: Duration,
    /// From request head to the upstream response's head, when upstream
    /// answered.
    pub response_head: Option<Duration>,
    /// Request body bytes sent upstream.
    pub bytes_up: u64,
    /// Response body bytes sent to the client.
    pub bytes_down: u64,
}
