//! End-to-end tests: real hyper clients and servers over loopback TCP (and
//! TLS with rcgen certificates where ALPN matters), with the engine between.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    ClientConfig, RootCertStore, ServerConfig,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::http::error::BoxError;

type TestBody = BoxBody<Bytes, BoxError>;

fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

fn empty() -> TestBody {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// A body fed by hand, frame by frame: chunked framing, delays, trailers.
struct ChanBody(mpsc::Receiver<Frame<Bytes>>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

fn chan_body() -> (mpsc::Sender<Frame<Bytes>>, TestBody) {
    let (tx, rx) = mpsc::channel(16);
    (tx, ChanBody(rx).boxed())
}

/// Generates `remaining` bytes lazily, counting what it produced.
struct GenBody {
    remaining: u64,
    chunk: Bytes,
    produced: Arc<AtomicU64>,
}

impl Body for GenBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        self.produced.fetch_add(n as u64, Ordering::SeqCst);
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }
    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

// ---------- inspectors ----------

/// What the test inspector does with an upgraded connection.
#[derive(Default, Clone, Copy)]
enum TunnelMode {
    /// Relays it untouched.
    #[default]
    Pass,
    /// The engine's default: refused.
    Default,
    /// Inspects the client's bytes, closing the tunnel on this pattern.
    Close(&'static [u8]),
}

/// Closes a tunnel whose client sends `pattern`, releasing bytes only once
/// seen (holding back a possible start of the pattern).
struct PatternTunnel {
    pattern: &'static [u8],
    seen: Vec<u8>,
    released: usize,
}

impl PatternTunnel {
    fn verdict(&mut self, all: bool) -> TunnelVerdict {
        if self.seen.windows(self.pattern.len()).any(|w| w == self.pattern) {
            return TunnelVerdict::Close(Bytes::from_static(b"refused"));
        }
        let until = if all { self.seen.len() } else { self.seen.len().saturating_sub(self.pattern.len() - 1) };
        let n = until.saturating_sub(self.released);
        self.released += n;
        TunnelVerdict::Release(n)
    }
}

impl TunnelInspector for PatternTunnel {
    fn feed<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, TunnelVerdict> {
        self.seen.extend_from_slice(data);
        Box::pin(std::future::ready(self.verdict(false)))
    }
    fn idle(&mut self) -> BoxFuture<'_, TunnelVerdict> {
        Box::pin(std::future::ready(self.verdict(true)))
    }
    fn finish(&mut self) -> BoxFuture<'_, TunnelVerdict> {
        Box::pin(std::future::ready(self.verdict(true)))
    }
}

/// Blocks on a header value and/or a body pattern; records exchanges.
#[derive(Default)]
struct TestInspector {
    tunnel: TunnelMode,
    block_header: Option<(&'static str, &'static str)>,
    pattern: Option<&'static [u8]>,
    inspect_body: bool,
    fed: Arc<AtomicU64>,
    exchanges: Mutex<Vec<Exchange>>,
    /// Response bodies: this pattern becomes `[X]`, also across chunks.
    mask: Option<&'static [u8]>,
    /// (status, outcome) of each exchange, as the response inspector saw it.
    finished: Arc<Mutex<Vec<(u16, ExchangeOutcome)>>>,
    at_upstream: Arc<Mutex<Vec<u64>>>,
    /// Response body bytes seen in `Observe` mode (requests to `/observe`).
    observed: Arc<AtomicU64>,
}

/// Replaces a pattern in response bodies, holding back `pattern.len() - 1`
/// bytes so that a pattern split across chunks is still replaced.
struct Masker {
    tunnel: TunnelMode,
    pattern: Option<&'static [u8]>,
    held: Vec<u8>,
    finished: Arc<Mutex<Vec<(u16, ExchangeOutcome)>>>,
    observe: bool,
    observed: Arc<AtomicU64>,
}

impl Masker {
    fn replace_all(&self, data: &[u8]) -> (Vec<u8>, usize) {
        let Some(p) = self.pattern else { return (data.to_vec(), 0) };
        let (mut out, mut i, mut consumed) = (Vec::new(), 0, 0);
        while i + p.len() <= data.len() {
            if &data[i..i + p.len()] == p {
                out.extend_from_slice(&data[consumed..i]);
                out.extend_from_slice(b"[X]");
                i += p.len();
                consumed = i;
            } else {
                i += 1;
            }
        }
        out.extend_from_slice(&data[consumed..]);
        (out, consumed)
    }
}

impl ResponseInspector for Masker {
    fn head(&mut self, parts: &mut http::response::Parts) -> ResponseVerdict {
        if parts.headers.get("x-refuse").is_some() {
            return ResponseVerdict::Replace(forbidden("response"));
        }
        if self.observe {
            return ResponseVerdict::Observe;
        }
        if self.pattern.is_some() {
            ResponseVerdict::Filter
        } else {
            ResponseVerdict::Pass
        }
    }
    fn observe(&mut self, data: &Bytes) {
        self.observed.fetch_add(data.len() as u64, Ordering::SeqCst);
    }
    fn chunk(&mut self, data: Bytes) -> Result<Bytes, String> {
        if data.as_ref() == b"POISON" {
            return Err("poisoned chunk".into());
        }
        let Some(p) = self.pattern else { return Ok(data) };
        self.held.extend_from_slice(&data);
        // Everything but a possible pattern prefix at the end may go.
        let keep = (p.len() - 1).min(self.held.len());
        let cut = self.held.len() - keep;
        let (mut out, consumed) = self.replace_all(&self.held[..]);
        if consumed > cut {
            // A replacement ended inside the kept tail: nothing is held.
            self.held.clear();
            return Ok(out.into());
        }
        let tail_len = self.held.len() - cut;
        out.truncate(out.len() - tail_len);
        self.held.drain(..cut);
        Ok(out.into())
    }
    fn trailers(&mut self, trailers: &mut http::HeaderMap) {
        trailers.insert("x-filtered", http::HeaderValue::from_static("1"));
    }
    fn end(&mut self) -> Result<Bytes, String> {
        let held = std::mem::take(&mut self.held);
        let (out, _) = self.replace_all(&held);
        Ok(out.into())
    }
    fn finish(&mut self, exchange: &Exchange) {
        self.finished.lock().unwrap().push((exchange.status, exchange.outcome));
    }
    fn upgraded(&mut self, headers: &http::HeaderMap) -> Tunnel {
        match self.tunnel {
            TunnelMode::Pass => Tunnel::Pass,
            TunnelMode::Default => PassResponses.upgraded(headers),
            TunnelMode::Close(pattern) => {
                Tunnel::Inspect(Box::new(PatternTunnel { pattern, seen: Vec::new(), released: 0 }))
            }
        }
    }
}

impl TestInspector {
    fn pass() -> Arc<TestInspector> {
        Arc::new(TestInspector { inspect_body: true, ..Default::default() })
    }
}

fn forbidden(why: &str) -> Response<Bytes> {
    let mut r = Response::new(Bytes::from(format!("blocked: {why}")));
    *r.status_mut() = StatusCode::FORBIDDEN;
    r
}

struct Scanner {
    pattern: Option<&'static [u8]>,
    tail: Vec<u8>,
    fed: Arc<AtomicU64>,
    /// Bytes fed when upstream was about to be contacted; refuses when the
    /// request carried `x-hold: refuse`.
    at_upstream: Arc<Mutex<Vec<u64>>>,
    refuse_at_upstream: bool,
}

impl BodyInspector for Scanner {
    async fn feed(&mut self, chunk: &[u8]) -> BodyVerdict {
        self.fed.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        let Some(p) = self.pattern else { return BodyVerdict::Continue };
        // Only the tail of the previous chunk plus a bounded prefix of
        // this one is ever copied: memory stays small for huge bodies.
        let mut window = std::mem::take(&mut self.tail);
        window.extend_from_slice(&chunk[..chunk.len().min(p.len())]);
        let found = window.windows(p.len()).any(|w| w == p) || chunk.windows(p.len()).any(|w| w == p);
        let keep = chunk.len().min(p.len() - 1);
        self.tail = chunk[chunk.len() - keep..].to_vec();
        if found {
            BodyVerdict::Respond(forbidden("body"))
        } else {
            BodyVerdict::Continue
        }
    }
    async fn finish(&mut self) -> BodyVerdict {
        BodyVerdict::Continue
    }
    async fn before_upstream(&mut self) -> BodyVerdict {
        self.at_upstream.lock().unwrap().push(self.fed.load(Ordering::SeqCst));
        if self.refuse_at_upstream {
            return BodyVerdict::Respond(forbidden("held"));
        }
        BodyVerdict::Continue
    }
}

impl Inspector for TestInspector {
    type Body = Scanner;
    type Response = Masker;
    async fn inspect_head(&self, _ctx: &HttpContext, parts: &mut http::request::Parts) -> HeadVerdict<Scanner, Masker> {
        if let Some((name, value)) = self.block_header {
            if parts.headers.get(name).is_some_and(|v| v == value) {
                return HeadVerdict::Respond(forbidden("header"));
            }
        }
        let body = self.inspect_body.then(|| Scanner {
            pattern: self.pattern,
            tail: Vec::new(),
            fed: self.fed.clone(),
            at_upstream: self.at_upstream.clone(),
            refuse_at_upstream: parts.headers.get("x-hold").is_some_and(|v| v == "refuse"),
        });
        let response = Masker {
            tunnel: self.tunnel,
            pattern: self.mask,
            held: Vec::new(),
            finished: self.finished.clone(),
            observe: parts.uri.path() == "/observe",
            observed: self.observed.clone(),
        };
        HeadVerdict::Forward { body, response: Some(response) }
    }
    fn on_exchange(&self, _ctx: &HttpContext, exchange: &Exchange) {
        self.exchanges.lock().unwrap().push(exchange.clone());
    }
}

// ---------- TLS ----------

struct Pki {
    server: Arc<ServerConfig>,
    roots: RootCertStore,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pki() -> Pki {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut roots = RootCertStore::empty();
    roots.add(cert).unwrap();
    Pki { server: Arc::new(server), roots }
}

fn client_config(roots: RootCertStore, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(c)
}

// ---------- upstream servers ----------

struct Upstream {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    /// Connections open now.
    open: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

async fn upstream<F, Fut>(tls: Option<Arc<ServerConfig>>, handler: F) -> Upstream
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let (c, r, o) = (conns.clone(), requests.clone(), open.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            c.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            let r = r.clone();
            let tls = tls.clone();
            let o = o.clone();
            tokio::spawn(async move {
                o.fetch_add(1, Ordering::SeqCst);
                let _open = scopeguard(move || {
                    o.fetch_sub(1, Ordering::SeqCst);
                });
                let svc = service_fn(move |req| {
                    r.fetch_add(1, Ordering::SeqCst);
                    let fut = handler(req);
                    async move { Ok::<_, std::convert::Infallible>(fut.await) }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let _ = match tls {
                    Some(cfg) => {
                        let Ok(s) = TlsAcceptor::from(cfg).accept(tcp).await else { return };
                        builder.serve_connection_with_upgrades(TokioIo::new(s), svc).await
                    }
                    None => builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc).await,
                };
            });
        }
    });
    Upstream { addr, conns, open, requests }
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[derive(Clone)]
struct TestConnector {
    addr: SocketAddr,
    /// (offering h2 and http/1.1, offering http/1.1 only)
    tls: Option<(Arc<ClientConfig>, Arc<ClientConfig>)>,
    h2c: bool,
}

impl TestConnector {
    fn plain(addr: SocketAddr) -> TestConnector {
        TestConnector { addr, tls: None, h2c: false }
    }
    fn h2c(addr: SocketAddr) -> TestConnector {
        TestConnector { addr, tls: None, h2c: true }
    }
    fn tls(addr: SocketAddr, roots: RootCertStore) -> TestConnector {
        let both = client_config(roots.clone(), &[b"h2", b"http/1.1"]);
        let h1 = client_config(roots, &[b"http/1.1"]);
        TestConnector { addr, tls: Some((both, h1)), h2c: false }
    }
}

impl UpstreamConnector for TestConnector {
    async fn connect(&self, hint: ConnectHint) -> std::io::Result<(BoxedIo, bool)> {
        let tcp = TcpStream::connect(self.addr).await?;
        match &self.tls {
            Some((both, h1)) => {
                let cfg = if hint.allow_h2 { both.clone() } else { h1.clone() };
                let name = ServerName::try_from("localhost").unwrap();
                let s = TlsConnector::from(cfg).connect(name, tcp).await?;
                let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                Ok((Box::new(s), h2))
            }
            None => Ok((Box::new(tcp), self.h2c && hint.allow_h2 && hint.client_h2)),
        }
    }
}

// ---------- the proxy under test ----------

struct Front {
    addr: SocketAddr,
    results: mpsc::UnboundedReceiver<Result<ServeStats, HttpError>>,
}

impl Front {
    async fn next_result(&mut self) -> Result<ServeStats, HttpError> {
        tokio::time::timeout(Duration::from_secs(60), self.results.recv())
            .await
            .expect("serve did not finish")
            .expect("front gone")
    }
}

async fn front<I: Inspector>(
    inspector: Arc<I>,
    connector: TestConnector,
    tls: Option<Arc<ServerConfig>>,
    limits: Limits,
) -> Front {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, results) = mpsc::unbounded_channel();
    let conn_ids = AtomicU64::new(1);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let ctx = HttpContext {
                conn_id: conn_ids.fetch_add(1, Ordering::Relaxed),
                server_name: "localhost".into(),
                orig_dst: connector.addr,
                tls: tls.is_some(),
            };
            let (inspector, connector, limits, tx) = (inspector.clone(), connector.clone(), limits.clone(), tx.clone());
            let tls = tls.clone();
            tokio::spawn(async move {
                let r = match tls {
                    Some(cfg) => {
                        let s = TlsAcceptor::from(cfg).accept(tcp).await.unwrap();
                        let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                        serve(s, Some(h2), ctx, inspector, connector, limits).await
                    }
                    None => serve(tcp, None, ctx, inspector, connector, limits).await,
                };
                let _ = tx.send(r);
            });
        }
    });
    Front { addr, results }
}

// ---------- clients ----------

async fn h1_client(addr: SocketAddr) -> http1::SendRequest<TestBody> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = http1::handshake(TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    tx
}

async fn h2c_client(addr: SocketAddr) -> http2::SendRequest<TestBody> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    tx
}

async fn h2_tls_client(addr: SocketAddr, roots: RootCertStore) -> http2::SendRequest<TestBody> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let cfg = client_config(roots, &[b"h2"]);
    let name = ServerName::try_from("localhost").unwrap();
    let s = TlsConnector::from(cfg).connect(name, tcp).await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (tx, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(s)).await.unwrap();
    tokio::spawn(conn);
    tx
}

fn get(path: &str) -> Request<TestBody> {
    Request::get(path).header("host", "localhost").body(empty()).unwrap()
}

async fn text(resp: Response<Incoming>) -> String {
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// Upstream answering `<method> <path> host=<host> v=<version> body=<len>`.
async fn echo_upstream(tls: Option<Arc<ServerConfig>>) -> Upstream {
    upstream(tls, |req: Request<Incoming>| async move {
        let head = format!(
            "{} {} host={} v={:?}",
            req.method(),
            req.uri().path(),
            req.headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .or(req.uri().authority().map(|a| a.as_str()))
                .unwrap_or("-"),
            req.version()
        );
        let body = req.into_body().collect().await.unwrap().to_bytes();
        Response::new(full(format!("{head} body={}", body.len())))
    })
    .await
}

// ---------- HTTP/1.1 ----------

#[tokio::test]
async fn h1_keep_alive_three_requests_share_one_upstream_connection() {
    let up = echo_upstream(None).await;
    let inspector = TestInspector::pass();
    let mut front = front(inspector.clone(), TestConnector::plain(up.addr), None, Limits::default()).await;
    let mut client = h1_client(front.addr).await;
    for i in 0..3 {
        client.ready().await.unwrap();
        let resp = client.send_request(get(&format!("/r{i}?key=sekrit"))).await.unwrap();
        assert_eq!(resp.status(), 200);
        let port = up.addr.port();
        assert_eq!(text(resp).await, format!("GET /r{i} host=localhost:{port} v=HTTP/1.1 body=0"));
    }
    drop(client);
    let stats = front.next_result().await.unwrap();
    assert_eq!(stats.requests, 3);
    assert!(stats.bytes_up > 0 && stats.bytes_down > 0);
    assert_eq!(up.conns.load(Ordering::SeqCst), 1, "upstream connection reused");
    let ex = inspector.exchanges.lock().unwrap().clone();
    assert_eq!(ex.len(), 3);
    assert_eq!(ex[0].path, "/r0", "no query string in exchanges");
    assert_eq!(ex[2].status, 200);
    assert_eq!(ex[2].outcome, ExchangeOutcome::Forwarded);
}

/// Under a multi-threaded runtime the pooled connection must be back in the
/// pool before the client's next request needs it: a keep-alive client gets
/// exactly one upstream connection, however the tasks are scheduled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_keep_alive_many_requests_one_upstream_connection_on_many_threads() {
    let up = echo_upstream(None).await;
    let mut front = front(TestInspector::pass(), TestConnector::plain(up.addr), None, Limits::default()).await;
    let mut client = h1_client(front.addr).await;
    for i in 0..300 {
        client.ready().await.unwrap();
        let resp = client.send_request(get(&format!("/r{i}"))).await.unwrap();
        assert_eq!(resp.status(), 200);
        text(resp).await;
    }
    drop(client);
    assert_eq!(front.next_result().await.unwrap().requests, 300);
    assert_eq!(up.conns.load(Ordering::SeqCst), 1, "one upstream connection for one keep-alive client");
}

/// A client connection idle past `upstream_idle_timeout` gives its pooled
/// upstream connection back (an idle client then costs only its own
/// socket); its next request opens a new one. Busier than that, it keeps it.
#[tokio::test]
async fn h1_idle_client_releases_its_upstream_connection() {
    let up = echo_upstream(None).await;
    let limits = Limits { upstream_idle_timeout: Some(Duration::from_millis(150)), ..Limits::default() };
    let mut front = front(TestInspector::pass(), TestConnector::plain(up.addr), None, limits).await;
    let mut client = h1_client(front.addr).await;
    let mut get_once = async |path: &str| {
        client.ready().await.unwrap();
        let resp = client.send_request(get(path)).await.unwrap();
        assert_eq!(resp.status(), 200);
        text(resp).await;
    };
    get_once("/a").await;
    tokio::time::sleep(Duration::from_millis(40)).await;
    get_once("/b").await;
    assert_eq!(up.conns.load(Ordering::SeqCst), 1, "reused within the timeout");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(up.open.load(Ordering::SeqCst), 0, "the idle upstream connection was closed");
    get_once("/c").await;
    assert_eq!(up.conns.load(Ordering::SeqCst), 2, "a new upstream connection after the idle release");
    drop(client);
    assert_eq!(front.next_result().await.unwrap().requests, 3);
}

#[tokio::test]
async fn h1_chunked_request_and_response() {
    let up = upstream(None, |req: Request<Incoming>| async move {
        assert!(req.headers().get("content-length").is_none());
        assert_eq!(req.headers()["transfer-encoding"], "chunked");
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let (tx, resp_body) = chan_body();
        tokio::spawn(async move {
            for part in [&b"got:"[..], &body[..], b":done"] {
                tx.send(Frame::data(Bytes::copy_from_slice(part))).await.unwrap();
            }
        });
        Response::new(resp_body)
    })
    .await;
    let mut front = front(TestInspector::pass(), TestConnector::plain(up.addr), None, Limits::default()).await;
    let mut client = h1_client(front.addr).await;
    let (tx, body) = chan_body();
    let req = Request::post("/upload").header("host", "localhost").body(body).unwrap();
    tokio::spawn(async move {
        for part in ["one,", "two,", "three"] {
            tx.send(Frame::data(Bytes::from(part))).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    assert_eq!(text(resp).await, "got:one,two,three:done");
    drop(client);
    front.next_result().await.unwrap();
}

#[tokio::test]
async fn h1_expect_100_continue_like_curl() {
    let up = echo_upstream(None).await;
    let mut front = front(TestInspector::pass(), TestConnector::plain(up.addr), None, Limits::default()).await;
    let mut tcp = TcpStream::connect(front.addr).await.unwrap();
    tcp.write_all(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.unwrap().unwrap();
    let interim = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(interim.starts_with("HTTP/1.1 100 Continue\r\n"), "{interim}");
    tcp.write_all(b"hello").await.unwrap();
    let mut response = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.unwrap().unwrap();
        response.extend_from_slice(&buf[..n]);
        if n == 0 || response.ends_with(b"body=5") {
            break;
        }
    }
    let response = String::from_utf8_lossy(&response).to_string();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.contains("POST /upload host=localhost:"), "{response}");
    assert!(response.ends_with("body=5"), "{response}");
    drop(tcp);
    front.next_result().await.unwrap();
}

#[tokio::test]
async fn h1_websocket_style_upgrade_is_spliced() {
    let up = upstream(None, |mut req: Request<Incoming>| async move {
        assert_eq!(req.headers()["upgrade"], "websocket");
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = TokioIo::new(on.await.unwrap());
            let mut buf = [0u8; 64];
            loop {
                let n = io.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                io.write_all(&buf[..n]).await.unwrap();
            }
        });
        Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(empty())
            .unwrap()
    })
    .await;
    let mut front = front(TestInspector::pass(), TestConnector::plain(up.addr), None, Limits::default()).await;
    let mut client = h1_client(front.addr).await;
    let req = Request::get("/ws")
        .header("host", "localhost")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .body(empty())
        .unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers()["upgrade"], "websocket");
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    for msg in [&b"ping"[..], b"second message"] {
        io.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(got, msg);
    }
    drop(io);
    drop(client);
    let stats = front.next_result().await.unwrap();
    assert_eq!(stats.requests, 1);
    assert!(stats.bytes_up > 18, "tunnel bytes counted: {stats:?}");
}

/// An upstream that answers `Upgrade` with 101 and logs what the tunnel
/// brings it, echoing it back.
async fn upgrading_upstream(got: Arc<Mutex<Vec<u8>>>) -> Upstream {
    upstream(None, move |mut req: Request<Incoming>| {
        let got = got.clone();
        async move {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on.await.unwrap());
                let mut buf = [0u8; 64];
                loop {
                    let n = io.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.lock().unwrap().extend_from_slice(&buf[..n]);
                    if io.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "custom")
                .body(empty())
                .unwrap()
        }
    })
    .await
}

fn upgrade_request() -> Request<TestBody> {
    Request::get("/up")
        .header("host", "localhost")
        .header("connection", "Upgrade")
        .header("upgrade", "custom")
        .body(empty())
        .unwrap()
}

#[tokio::test]
async fn h1_upgrade_is_refused_unless_the_inspector_follows_it() {
    let got = Arc::new(Mutex::new(Vec::new()));
    let up = upgrading_upstream(got.clone()).await;
    let inspector = Arc::new(TestInspector { tunnel: TunnelMode::Default, inspect_body: true, ..Default::default() });
    let mut front = front(inspector, TestConnector::plain(up.addr), None, Limits::default()).await;
    let mut client = h1_client(front.addr).await;
    let resp = client.send_request(upgrade_request()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "no tunnel the inspector does not follow");
    drop(client);
    front.next_result().await.unwrap();
    assert!(got.lock().unwrap().is_empty());
}

#[tokio::test]
async fn h1_upgrade_tunnel_bytes_are_inspected_before_upstream() {
    let got = Arc::new(Mutex::new(Vec::new()));
    let up = upgrading_upstream(got.clone()).await;
    let inspector =
        Arc::new(TestInspector { tunnel: TunnelMode::Close(b"SECRET"), inspect_body: true, ..Default::default() });
    let mut front = front(inspector, TestConnector::plain(up.addr), None, Limits::default()).await;
    let mut client = h1_client(front.addr).await;
    let resp = client.send_request(upgrade_request()).await.unwrap();
    assert_eq!(resp.status(), 101);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
    // A clean message goes through (released after a pause) and is echoed.
    io.write_all(b"hello there").await.unwrap();
    let mut echo = vec![0u8; 11];
    io.read_exact(&mut echo).await.unwrap();
    assert_eq!(echo, b"hello there");
    // A pattern split across two writes never reaches upstream whole.
    io.write_all(b"xxSEC").await.unwrap();
    io.write_all(b"RETyy").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), io.read_to_end(&mut rest)).await;
    assert!(rest.ends_with(b"refused"), "the client is told: {:?}", String::from_utf8_lossy(&rest));
    drop(io);
    drop(client);
    front.next_result().await.unwrap();
    let got = got.lock().unwrap().clone();
    assert!(!got.windows(6).any(|w| w == b"SECRET"), "upstream got {:?}", String::from_utf8_lossy(&got));
    assert!(got.starts_with(b"hello there"));
}

// ---------- HTTP/2 ----------

#[tokio::test]
async fn h2_fifty_concurrent_streams_over_tls_alpn() {
    let pki = pki();
    let up = echo_upstream(Some(pki.server.clone())).await;
    let connector = TestConnector::tls(up.addr, pki.roots.clone());
    let mut front = front(TestInspector::pass(), connector, Some(pki.server.clone()), Limits::default()).await;
    let client = h2_tls_client(front.addr, pki.roots.clone()).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::post(format!("https://localhost/s{i}")).body(full(vec![b'x'; i])).unwrap();
            let resp = client.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            text(resp).await
        }));
    }
    let port = up.addr.port();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), format!("POST /s{i} host=localhost:{port} v=HTTP/2.0 body={i}"));
    }
    assert_eq!(up.conns.load(Ordering::SeqCst), 1, "one multiplexed upstream connection");
    drop(client);
    assert_eq!(front.next_result().await.unwrap().requests, 50);
}

#[tokio::test]
async fn h2_grpc_like_trailers_both_ways() {
    let up = upstream(None, |req: Request<Incoming>| async move {
        assert_eq!(req.headers()["te"], "trailers");
        let collected = req.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let data = collected.to_bytes();
        let (tx, body) = chan_body();
        tokio::spawn(async move {
            tx.send(Frame::data(Bytes::from(format!("echo:{}", String::from_utf8_lossy(&data))))).await.unwrap();
            let mut t = http::HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            if let Some(v) = trailers.get("x-req-trailer") {
                t.insert("x-seen-req-trailer", v.clone());
            }
            tx.send(Frame::trailers(t)).await.unwrap();
        });
        Response::builder().header("content-type", "application/grpc").body(body).unwrap()
    })
    .await;
    // Both the buffered (inspected) and the pass-through body paths, and
    // a response filter (which also sees the trailers).
    for (inspect_body, mask) in [(true, None), (false, None), (true, Some(&b"ZZZ"[..]))] {
        let inspector = Arc::new(TestInspector { inspect_body, mask, ..Default::default() });
        let mut front = front(inspector, TestConnector::h2c(up.addr), None, Limits::default()).await;
        let mut client = h2c_client(front.addr).await;
        let (tx, body) = chan_body();
        let req = Request::post("http://localhost/pkg.Svc/Method")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap();
        tokio::spawn(async move {
            tx.send(Frame::data(Bytes::from_static(b"msg"))).await.unwrap();
            let mut t = http::HeaderMap::new();
            t.insert("x-req-trailer", "yes".parse().unwrap());
            tx.send(Frame::trailers(t)).await.unwrap();
        });
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("response trailers");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-seen-req-trailer"], "yes", "request trailers reached upstream");
        assert_eq!(trailers.contains_key("x-filtered"), mask.is_some(), "the filter saw the trailers");
        assert_eq!(collected.to_bytes(), "echo:msg");
        drop(client);
        front.next_result().await.unwrap();
    }
}

#[tokio::test]
async fn streamed_response_first_chunk_arrives_before_last_is_sent() {
    let last_sent = Arc::new(AtomicBool::new(false));
    let flag = last_sent.clone();
    let up = upstream(None, move |_req: Request<Incoming>| {
        let flag = flag.clone();
        async move {
            let (tx, body) = chan_body();
            tokio::spawn(async move {
                for i in 0..3 {
                    if i == 2 {
                        flag.store(true, Ordering::SeqCst);
                    }
                    tx.send(Frame::data(Bytes::from(format!("chunk{i};")))).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            Response::new(body)
        }
    })
    .await;
    for h2 in [false, true] {
        let mut front = front(TestInspector::pass(), TestConnector::h2c(up.addr), None, Limits::default()).await;
        let resp = if h2 {
            h2c_client(front.addr).await.send_request(get("http://localhost/stream")).await
        } else {
            h1_client(front.addr).await.send_request(get("/stream")).await
        };
        let mut body = resp.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "chunk0;");
        // Causal, not timed: the upstream had not produced the last chunk
        // yet (it does 400 ms after the first).
        assert!(!last_sent.load(Ordering::SeqCst), "first chunk waited for the last (h2={h2})");
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "chunk1;chunk2;");
        last_sent.store(false, Ordering::SeqCst);
        drop(front.results.try_recv());
    }
}

#[tokio::test]
async fn h2_exchanges_have_finished_when_serve_returns() {
    // The response streams on; the client goes away after its first chunk.
    let up = upstream(None, |_req: Request<Incoming>| async move {
        let (tx, body) = chan_body();
        tokio::spawn(async move {
            let _ = tx.send(Frame::data(Bytes::from_static(b"first;"))).await;
            tokio::time::sleep(Duration::from_secs(600)).await;
        });
        Response::new(body)
    })
    .await;
    let inspector = TestInspector::pass();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (upstream_addr, seen) = (up.addr, inspector.clone());
    let server = tokio::spawn(async move {
        let (conn, _) = listener.accept().await.unwrap();
        let ctx = HttpContext { conn_id: 5, server_name: "localhost".into(), orig_dst: upstream_addr, tls: false };
        let connector = TestConnector::h2c(upstream_addr);
        let _ = serve(conn, Some(true), ctx, seen.clone(), connector, Limits::default()).await;
        // What the connection's owner (which ends the session recording
        // then) sees the moment serve returns.
        seen.exchanges.lock().unwrap().len()
    });
    let tcp = TcpStream::connect(addr).await.unwrap().into_std().unwrap();
    let cut = tcp.try_clone().unwrap();
    let (mut client, conn) =
        http2::handshake(TokioExecutor::new(), TokioIo::new(TcpStream::from_std(tcp).unwrap())).await.unwrap();
    tokio::spawn(conn);
    let resp = client.send_request(get("http://localhost/slow")).await.unwrap();
    let mut body = resp.into_body();
    assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), "first;");
    // Gone without a word (no RST_STREAM, no GOAWAY): the stream ends with
    // the connection.
    cut.shutdown(std::net::Shutdown::Both).unwrap();
    let logged = tokio::time::timeout(Duration::from_secs(60), server).await.unwrap().unwrap();
    assert_eq!(logged, 1, "the exchange must be logged (and recorded) before serve returns");
}

#[tokio::test]
async fn bridges_h1_client_to_h2_upstream_and_h2_client_to_h1_pool() {
    let pki = pki();
    // h1 client -> TLS upstream that negotiates h2.
    let up = echo_upstream(Some(pki.server.clone())).await;
    let connector = TestConnector::tls(up.addr, pki.roots.clone());
    let mut front1 = front(TestInspector::pass(), connector, None, Limits::default()).await;
    let mut client = h1_client(front1.addr).await;
    let req = Request::post("/a?q=1").header("host", "localhost").body(full("xyz")).unwrap();
    let resp = client.send_request(req).await.unwrap();
    let port = up.addr.port();
    assert_eq!(text(resp).await, format!("POST /a host=localhost:{port} v=HTTP/2.0 body=3"));
    drop(client);
    front1.next_result().await.unwrap();

    // h2 client -> plaintext HTTP/1.1 upstream: concurrent streams share a
    // pool of keep-alive connections.
    let up = echo_upstream(None).await;
    let mut front2 = front(TestInspector::pass(), TestConnector::plain(up.addr), None, Limits::default()).await;
    let client = h2c_client(front2.addr).await;
    let port = up.addr.port();
    let mut first_round = 0;
    for round in 0..2 {
        let mut tasks = Vec::new();
        for i in 0..10 {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                let resp = client.send_request(get(&format!("http://localhost/p{i}"))).await.unwrap();
                text(resp).await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), format!("GET /p{i} host=localhost:{port} v=HTTP/1.1 body=0"));
        }
        let conns = up.conns.load(Ordering::SeqCst);
        if round == 0 {
            assert!((1..=10).contains(&conns), "{conns} upstream connections");
            first_round = conns;
        } else {
            // Up to max_idle_upstream (8) of them were kept and reused.
            let reusable = first_round.min(Limits::default().max_idle_upstream);
            assert!(conns <= first_round + 10 - reusable, "{first_round} then {conns}");
        }
        // Let the pooled connections settle back into the idle list.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(client);
    assert_eq!(front2.next_result().await.unwrap().requests, 20);
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_connection() {
    let up = echo_upstream(None).await;
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let token = shutdown.clone();
    let upstream_addr = up.addr;
    let server = tokio::spawn(async move {
        let (conn, _) = tcp.accept().await.unwrap();
        let ctx = HttpContext { conn_id: 3, server_name: "localhost".into(), orig_dst: upstream_addr, tls: false };
        let connector = TestConnector::plain(upstream_addr);
        serve_with_shutdown(conn, None, ctx, TestInspector::pass(), connector, Limits::default(), token).await
    });
    let mut client = h1_client(addr).await;
    assert_eq!(client.send_request(get("/x")).await.unwrap().status(), 200);
    shutdown.cancel();
    let stats = tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap().unwrap();
    assert_eq!(stats.requests, 1);
}

#[tokio::test]
async fn connect_method_is_refused() {
    let up = echo_upstream(None).await;
    let mut front = front(TestInspector::pass(), TestConnector::plain(up.addr), None, Limits::default()).await;
    let mut client = h1_client(front.addr).await;
    let req = Request::connect("example.com:443").body(empty()).unwrap();
    assert_eq!(client.send_request(req).await.unwrap().status(), 501);
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);
    drop(client);
    let _ = front.next_result().await;
}

// ---------- blocking ----------

#[tokio::test]
async fn blocked_header_gets_403_and_never_reaches_upstream() {
    let up = echo_upstream(None).await;
    let inspector = Arc::new(TestInspector {
        block_header: Some(("x-api-key", "sk-live-123")),
        inspect_body: true,
        ..Default::default()
    });
    let mut front = front(inspector.clone(), TestConnector::plain(up.addr), None, Limits::default()).await;
    let mut client = h1_client(front.addr).await;
    let req = Request::get("/x").header("x-api-key", "sk-live-123").body(empty()).unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(text(resp).await, "blocked: header");
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);
    assert_eq!(up.conns.load(Ordering::SeqCst), 0);
    // The connection keeps serving.
    client.ready().await.unwrap();
    let resp = client.send_request(get("/ok")).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(client);
    front.next_result().await.unwrap();
    let ex = inspector.exchanges.lock().unwrap().clone();
    assert_eq!(ex[0].outcome, ExchangeOutcome::Blocked);
    assert_eq!(ex[0].status, 403);
}

#[tokio::test]
async fn blocked_body_pattern_split_across_chunks_never_reaches_upstream() {
    let up = echo_upstream(None).await;
    let inspector = Arc::new(TestInspector { pattern: Some(b"SECRETKEY"), inspect_body: true, ..Default::default() });
    let mut front = front(inspector, TestConnector::plain(up.addr), None, Limits::default()).await;
    let mut client = h1_client(front.addr).await;
    let (tx, body) = chan_body();
    let req = Request::post("/x").header("host", "localhost").body(body).unwrap();
    tokio::spawn(async move {
        tx.send(Frame::data(Bytes::from_static(b"aaaa SECRE"))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(Frame::data(Bytes::from_static(b"TKEY bbbb"))).await.unwrap();
    });
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(text(resp).await, "blocked: body");
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);
    assert_eq!(up.conns.load(Ordering::SeqCst), 0);
    drop(client);
    front.next_result().await.unwrap();
}

#[tokio::test]
async fn blocked_while_streaming_holds_back_the_key_and_aborts_upstream() {
    let received = Arc::new(Mutex::new(Vec::<u8>::new()));
    let body_failed = Arc::new(AtomicBool::new(false));
    let (rcv, failed) = (received.clone(), body_failed.clone());
    let up = upstream(None, move |req: Request<Incoming>| {
        let (rcv, failed) = (rcv.clone(), failed.clone());
        async move {
            let mut body = req.into_body();
            while let Some(f) = body.frame().await {
                match f {
                    Ok(f) => rcv.lock().unwrap().extend_from_slice(f.data_ref().unwrap_or(&Bytes::new())),
                    Err(_) => {
                        failed.store(true, Ordering::SeqCst);
                        break;
                    }
                }
            }
            Response::new(full("upstream answered"))
        }
    })
    .await;
    let inspector = Arc::new(TestInspector { pattern: Some(b"SECRETKEY"), inspect_body: true, ..Default::default() });
    let limits = Limits { max_buffered_body: 64, hold_back: 32, ..Limits::default() };
    let mut front = front(inspector.clone(), TestConnector::plain(up.addr), None, limits).await;
    let mut client = h1_client(front.addr).await;
    let (tx, body) = chan_body();
    let req = Request::post("/x").header("host", "localhost").body(body).unwrap();
    tokio::spawn(async move {
        tx.send(Frame::data(Bytes::from(vec![b'a'; 200]))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(Frame::data(Bytes::from_static(b"xxSECRE"))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = tx.send(Frame::data(Bytes::from_static(b"TKEYyy"))).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(text(resp).await, "blocked: body");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !body_failed.load(Ordering::SeqCst) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(body_failed.load(Ordering::SeqCst), "upstream body was aborted, not completed");
    let got = received.lock().unwrap().clone();
    assert!(got.len() >= 200 - 32, "streaming had started: {}", got.len());
    assert!(got.iter().all(|&b| b == b'a'), "no held-back byte leaked: {:?}", String::from_utf8_lossy(&got));
    drop(client);
    let _ = front.next_result().await;
    let ex = inspector.exchanges.lock().unwrap().clone();
    assert_eq!(ex[0].outcome, ExchangeOutcome::Blocked);
}

#[tokio::test]
async fn h2_blocked_stream_does_not_break_concurrent_stream() {
    let up = upstream(None, |req: Request<Incoming>| async move {
        let slow = req.uri().path() == "/slow";
        let (tx, body) = chan_body();
        tokio::spawn(async move {
            tx.send(Frame::data(Bytes::from_static(b"part1;"))).await.unwrap();
            if slow {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            tx.send(Frame::data(Bytes::from_static(b"part2"))).await.unwrap();
        });
        Response::new(body)
    })
    .await;
    let inspector = Arc::new(TestInspector {
        block_header: Some(("x-api-key", "sk-live-123")),
        pattern: Some(b"SECRETKEY"),
        inspect_body: true,
        ..Default::default()
    });
    let mut front = front(inspector, TestConnector::h2c(up.addr), None, Limits::default()).await;
    let mut client = h2c_client(front.addr).await;
    let slow = client.send_request(get("http://localhost/slow")).await.unwrap();
    let mut slow_body = slow.into_body();
    assert_eq!(slow_body.frame().await.unwrap().unwrap().into_data().unwrap(), "part1;");

    let blocked = Request::get("http://localhost/bad").header("x-api-key", "sk-live-123").body(empty()).unwrap();
    assert_eq!(client.send_request(blocked).await.unwrap().status(), 403);
    let blocked = Request::post("http://localhost/bad").body(full("a SECRETKEY b")).unwrap();
    assert_eq!(client.send_request(blocked).await.unwrap().status(), 403);

    assert_eq!(slow_body.collect().await.unwrap().to_bytes(), "part2");
    let resp = client.send_request(get("http://localhost/after")).await.unwrap();
    assert_eq!(text(resp).await, "part1;part2");
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);
    drop(client);
    assert_eq!(front.next_result().await.unwrap().requests, 4);
}

#[tokio::test]
async fn connection_buffer_budget_switches_to_streaming() {
    let up = echo_upstream(None).await;
    let limits = Limits { max_buffered_per_connection: 64, hold_back: 16, ..Limits::default() };
    let inspector = Arc::new(TestInspector { pattern: Some(b"SECRETKEY"), inspect_body: true, ..Default::default() });
    let mut front = front(inspector.clone(), TestConnector::h2c(up.addr), None, limits).await;
    let client = h2c_client(front.addr).await;
    let mut tasks = Vec::new();
    for i in 0..5 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let (tx, body) = chan_body();
            tokio::spawn(async move {
                for _ in 0..10 {
                    tx.send(Frame::data(Bytes::from(vec![b'a'; 100]))).await.unwrap();
                }
                if i == 0 {
                    tx.send(Frame::data(Bytes::from_static(b"SECRETKEY"))).await.unwrap();
                }
            });
            let req = Request::post(format!("http://localhost/b{i}")).body(body).unwrap();
            let resp = client.send_request(req).await.unwrap();
            (resp.status(), text(resp).await)
        }));
    }
    let port = up.addr.port();
    for (i, t) in tasks.into_iter().enumerate() {
        let (status, body) = t.await.unwrap();
        if i == 0 {
            assert_eq!(status, 403);
        } else {
            assert_eq!(body, format!("POST /b{i} host=localhost:{port} v=HTTP/2.0 body=1000"));
        }
    }
    drop(client);
    front.next_result().await.unwrap();
}

// ---------- large bodies ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_request_body_streams_with_bounded_memory() {
    const TOTAL: u64 = 256 * 1024 * 1024;
    let produced = Arc::new(AtomicU64::new(0));
    let max_outstanding = Arc::new(AtomicU64::new(0));
    let (p, m) = (produced.clone(), max_outstanding.clone());
    let up = upstream(None, move |req: Request<Incoming>| {
        let (p, m) = (p.clone(), m.clone());
        async move {
            let mut body = req.into_body();
            let mut consumed = 0u64;
            while let Some(f) = body.frame().await {
                if let Some(d) = f.unwrap().data_ref() {
                    consumed += d.len() as u64;
                    let outstanding = p.load(Ordering::SeqCst) - consumed;
                    m.fetch_max(outstanding, Ordering::SeqCst);
                }
            }
            Response::new(full(consumed.to_string()))
        }
    })
    .await;
    let inspector = Arc::new(TestInspector { pattern: Some(b"SECRETKEY"), inspect_body: true, ..Default::default() });
    let mut front = front(inspector.clone(), TestConnector::plain(up.addr), None, Limits::default()).await;
    let mut client = h1_client(front.addr).await;
    let body = GenBody { remaining: TOTAL, chunk: Bytes::from(vec![b'z'; 64 * 1024]), produced: produced.clone() };
    let req = Request::post("/big").header("host", "localhost").body(body.boxed()).unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(text(resp).await, TOTAL.to_string());
    assert_eq!(inspector.fed.load(Ordering::SeqCst), TOTAL, "every byte inspected");
    let max = max_outstanding.load(Ordering::SeqCst);
    eprintln!("256 MiB body: peak bytes produced but not yet consumed upstream: {max}");
    // Socket buffers of two loopback hops plus hyper's buffers; far below
    // the body size, which is what matters.
    assert!(max < 48 * 1024 * 1024, "outstanding bytes peaked at {max}");
    drop(client);
    let stats = front.next_result().await.unwrap();
    assert!(stats.bytes_up >= TOTAL);
    let ex = inspector.exchanges.lock().unwrap().clone();
    assert_eq!(ex[0].bytes_up, TOTAL);
}

// ---------- failures ----------

async fn serve_raw(input: &'static [u8], client_h2: Option<bool>) -> Result<ServeStats, HttpError> {
    let (mut ours, theirs) = tokio::io::duplex(4096);
    let ctx = HttpContext {
        conn_id: 7,
        server_name: "localhost".into(),
        orig_dst: "127.0.0.1:9".parse().unwrap(),
        tls: false,
    };
    let task = tokio::spawn(serve(
        theirs,
        client_h2,
        ctx,
        TestInspector::pass(),
        TestConnector::plain("127.0.0.1:9".parse().unwrap()),
        Limits::default(),
    ));
    ours.write_all(input).await.unwrap();
    ours.shutdown().await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), ours.read_to_end(&mut sink)).await;
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap()
}

#[tokio::test]
async fn malformed_client_input_is_an_error_not_a_panic() {
    let cases: [(&[u8], Option<bool>); 5] = [
        (b"GARBAGE GARBAGE GARBAGE\r\n\r\n", None),
        (b"\x00\x01\x02\x03\x04\x05\x06\x07 not http at all\r\n\r\n", Some(false)),
        (b"PRI * HTTP/2.0\r\n", None),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00", Some(true)),
        (b"definitely not a preface, longer than one", Some(true)),
    ];
    for (input, h2) in cases {
        let err = serve_raw(input, h2).await.expect_err("malformed input accepted");
        assert!(matches!(err, HttpError::Client(_)), "{err:?}");
        assert!(!err.to_string().is_empty());
    }
}

#[tokio::test]
async fn upstream_down_gives_502_and_connection_keeps_working() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let mut front = front(TestInspector::pass(), TestConnector::plain(addr), None, Limits::default()).await;
    let mut client = h1_client(front.addr).await;
    for _ in 0..2 {
        client.ready().await.unwrap();
        let resp = client.send_request(get("/x")).await.unwrap();
        assert_eq!(resp.status(), 502);
        assert_eq!(resp.headers()["content-type"], "application/json");
        let v: serde_json::Value = serde_json::from_str(&text(resp).await).unwrap();
        assert_eq!(v["conn_id"], 1);
        assert!(v["error"].as_str().unwrap().contains("connect"), "{v}");
    }
    drop(client);
    assert_eq!(front.next_result().await.unwrap().requests, 2);
}

#[tokio::test]
async fn upstream_tls_verification_failure_gives_502() {
    let pki = pki();
    let up = echo_upstream(Some(pki.server.clone())).await;
    // Trusts a different CA than the one upstream's certificate chains to.
    let connector = TestConnector::tls(up.addr, pki_roots_of_other_ca());
    let mut front = front(TestInspector::pass(), connector, None, Limits::default()).await;
    let mut client = h1_client(front.addr).await;
    let resp = client.send_request(get("/x")).await.unwrap();
    assert_eq!(resp.status(), 502);
    assert!(text(resp).await.contains("certificate"));
    drop(client);
    front.next_result().await.unwrap();
}

fn pki_roots_of_other_ca() -> RootCertStore {
    pki().roots
}

/// Waits (generously) until the response inspector was told the outcome of
/// `n` exchanges; returns what it was told by then. An exchange finishes
/// on its connection's task, which may run after the client got the body.
async fn wait_until_finished(inspector: &TestInspector, n: usize) -> Vec<(u16, ExchangeOutcome)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let finished = inspector.finished.lock().unwrap().clone();
        if finished.len() >= n || Instant::now() >= deadline {
            return finished;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An upstream that sends `chunks` as separate data frames, 20 ms apart,
/// with a Content-Length when `length` is set; header `x-refuse` on `/refuse`.
async fn chunked_upstream(chunks: &'static [&'static str], length: bool) -> Upstream {
    upstream(None, move |req: Request<Incoming>| async move {
        let (tx, body) = chan_body();
        tokio::spawn(async move {
            for c in chunks {
                tx.send(Frame::data(Bytes::from_static(c.as_bytes()))).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let mut resp = Response::new(body);
        if length {
            let total: usize = chunks.iter().map(|c| c.len()).sum();
            resp.headers_mut().insert(http::header::CONTENT_LENGTH, total.into());
        }
        if req.uri().path() == "/refuse" {
            resp.headers_mut().insert("x-refuse", http::HeaderValue::from_static("1"));
        }
        resp
    })
    .await
}

#[tokio::test]
async fn response_filter_rewrites_split_patterns_and_reframes_h1_and_h2() {
    static CHUNKS: &[&str] = &["hello SEC", "RET and SECR", "ET", " bye"];
    let up = chunked_upstream(CHUNKS, true).await;
    for h2 in [false, true] {
        let inspector = Arc::new(TestInspector { mask: Some(b"SECRET"), ..Default::default() });
        let mut front = front(inspector.clone(), TestConnector::h2c(up.addr), None, Limits::default()).await;
        let resp = if h2 {
            h2c_client(front.addr).await.send_request(get("http://localhost/r")).await
        } else {
            h1_client(front.addr).await.send_request(get("/r")).await
        }
        .unwrap();
        assert_eq!(resp.status(), 200);
        // The length changed, so upstream's Content-Length must not survive.
        assert!(resp.headers().get(http::header::CONTENT_LENGTH).is_none(), "h2={h2}");
        assert_eq!(text(resp).await, "hello [X] and [X] bye", "h2={h2}");
        // The client is gone: wait for the exchange to finish and its
        // connection to be served to the end (a second finish would be
        // there by then).
        wait_until_finished(&inspector, 1).await;
        drop(front.next_result().await);
        let finished = inspector.finished.lock().unwrap().clone();
        assert_eq!(finished, vec![(200, ExchangeOutcome::Forwarded)], "finish once (h2={h2})");
    }
    // Observing sees every byte and keeps upstream's framing.
    let inspector = Arc::new(TestInspector { mask: Some(b"SECRET"), ..Default::default() });
    let mut front = front(inspector.clone(), TestConnector::h2c(up.addr), None, Limits::default()).await;
    let resp = h1_client(front.addr).await.send_request(get("/observe")).await.unwrap();
    assert_eq!(
        resp.headers().get(http::header::CONTENT_LENGTH).map(|v| v.to_str().unwrap().to_owned()),
        Some("27".into())
    );
    assert_eq!(text(resp).await, "hello SECRET and SECRET bye");
    assert_eq!(inspector.observed.load(Ordering::SeqCst), 27);
    drop(front.results.try_recv());
}

#[tokio::test]
async fn response_filter_error_cuts_the_response_and_replace_answers_locally() {
    static CHUNKS: &[&str] = &["fine so far;", "POISON", "never seen"];
    let up = chunked_upstream(CHUNKS, false).await;
    let inspector = Arc::new(TestInspector { mask: Some(b"SECRET"), ..Default::default() });
    let front = front(inspector.clone(), TestConnector::h2c(up.addr), None, Limits::default()).await;
    let mut client = h1_client(front.addr).await;
    let resp = client.send_request(get("/poison")).await.unwrap();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let err = loop {
        match body.frame().await {
            Some(Ok(f)) => got.extend_from_slice(&f.into_data().unwrap_or_default()),
            Some(Err(e)) => break e,
            None => panic!("the response must not end normally after a filter error"),
        }
    };
    let got = String::from_utf8_lossy(&got).into_owned();
    assert!(!got.contains("never seen") && !got.contains("POISON"), "{got} / {err}");

    let mut client = h2c_client(front.addr).await;
    let resp = client.send_request(get("http://localhost/refuse")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(text(resp).await, "blocked: response");
    // Both clients are still connected: wait for the two exchanges to finish.
    let finished = wait_until_finished(&inspector, 2).await;
    assert!(finished.contains(&(200, ExchangeOutcome::Aborted)), "{finished:?}");
    assert!(finished.contains(&(403, ExchangeOutcome::Blocked)), "{finished:?}");
}

#[tokio::test]
async fn before_upstream_runs_once_after_the_buffered_body_and_can_refuse() {
    let up = echo_upstream(None).await;
    let inspector = TestInspector::pass();
    let limits = Limits { max_buffered_body: 1000, ..Limits::default() };
    let mut front = front(inspector.clone(), TestConnector::plain(up.addr), None, limits).await;
    let mut client = h1_client(front.addr).await;
    // Small body: seen whole before upstream.
    let resp = client.send_request(Request::post("/small").body(full("x".repeat(300))).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    text(resp).await;
    // Large body: its buffered prefix (just over the limit) was seen first.
    client.ready().await.unwrap();
    let resp = client.send_request(Request::post("/large").body(full("y".repeat(50_000))).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    text(resp).await;
    let seen = inspector.at_upstream.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0], 300);
    assert!(seen[1] > 1000 && seen[1] < 50_000, "{seen:?}");
    // Refused there: upstream never sees the request.
    let before = up.requests.load(Ordering::SeqCst);
    client.ready().await.unwrap();
    let req = Request::post("/held").header("x-hold", "refuse").body(full("z".repeat(10))).unwrap();
    let resp = client.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert_eq!(text(resp).await, "blocked: held");
    assert_eq!(up.requests.load(Ordering::SeqCst), before);
    drop(client);
    drop(front.next_result().await);
}

// ---------- limits that hold against a hostile client ----------

/// A pool of `max` bytes shared by the connections of one test.
fn pool(max: usize) -> (crate::limits::Budget, BodyPool) {
    let b = crate::limits::Budget::new(crate::limits::Limit::BufferedTotal, max);
    (b.clone(), BodyPool::Shared(b))
}

/// Sends `n` bytes on a fresh stream and keeps the body open (no
/// END_STREAM) until the returned sender is dropped.
async fn open_body(
    client: &mut http2::SendRequest<TestBody>,
    path: &str,
    n: usize,
) -> (mpsc::Sender<Frame<Bytes>>, tokio::task::JoinHandle<Result<Response<Incoming>, hyper::Error>>) {
    let (tx, body) = chan_body();
    let req = Request::post(format!("http://localhost{path}")).body(body).unwrap();
    client.ready().await.unwrap();
    let sending = client.send_request(req);
    let task = tokio::spawn(sending);
    for _ in 0..n / 1024 {
        tx.send(Frame::data(Bytes::from(vec![b'h'; 1024]))).await.unwrap();
    }
    (tx, task)
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not the case after 60s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_full_pool_holds_the_client_back_then_refuses_and_never_streams_early() {
    let up = echo_upstream(None).await;
    let (budget, body_pool) = pool(64 * 1024);
    let limits = Limits { body_pool, buffer_wait: Duration::from_millis(300), ..Limits::default() };
    let inspector = Arc::new(TestInspector { pattern: Some(b"SECRETKEY"), inspect_body: true, ..Default::default() });
    let mut front = front(inspector.clone(), TestConnector::h2c(up.addr), None, limits).await;
    let mut client = h2c_client(front.addr).await;
    // A hostile stream fills the pool and stalls mid-body.
    let (hostile, hostile_resp) = open_body(&mut client, "/hostile", 60 * 1024).await;
    wait_until("the hostile body is buffered", || budget.in_use() >= 60 * 1024).await;
    // A small body no longer fits: it waits (not read), then is refused
    // with a JSON body naming the limit. It never streams early.
    let resp = client.send_request(Request::post("http://localhost/small").body(full(vec![b's'; 8 * 1024])).unwrap());
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = serde_json::from_str(&text(resp).await).unwrap();
    assert_eq!((body["error"].as_str(), body["limit"].as_str()), (Some("limit"), Some("buffered_total")));
    assert_eq!(up.requests.load(Ordering::SeqCst), 0, "nothing reached upstream");
    // Room freed within the wait lets a waiting body through.
    let waiting = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let req = Request::post("http://localhost/patient").body(full(vec![b'p'; 8 * 1024])).unwrap();
            let resp = client.send_request(req).await.unwrap();
            (resp.status(), text(resp).await)
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(hostile);
    let hostile_resp = hostile_resp.await.unwrap().unwrap();
    assert_eq!(
        text(hostile_resp).await,
        format!("POST /hostile host=localhost:{} v=HTTP/2.0 body=61440", up.addr.port())
    );
    let (status, body) = waiting.await.unwrap();
    assert_eq!((status.as_u16(), body.ends_with("body=8192")), (200, true), "{body}");
    drop(client);
    front.next_result().await.unwrap();
    assert_eq!(budget.in_use(), 0, "every buffered byte was given back");
    let outcomes: Vec<_> = inspector.exchanges.lock().unwrap().iter().map(|e| e.outcome).collect();
    assert!(outcomes.contains(&ExchangeOutcome::Refused), "{outcomes:?}");
}

/// The adversarial finding, scaled down: many HTTP/2 connections with many
/// streams holding bodies open without END_STREAM. Buffered bytes stay
/// within the pool and are all given back when the clients go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_streams_without_end_stream_stay_within_the_pool() {
    const CONNS: usize = 10;
    const STREAMS: usize = 32;
    const BODY: usize = 64 * 1024;
    let up = echo_upstream(None).await;
    let (budget, body_pool) = pool(2 * 1024 * 1024);
    let limits = Limits {
        body_pool,
        buffer_wait: Duration::from_millis(200),
        max_buffered_body: 1024 * 1024,
        ..Limits::default()
    };
    let mut front = front(TestInspector::pass(), TestConnector::h2c(up.addr), None, limits).await;
    let mut held = Vec::new();
    let mut responses: Vec<tokio::task::JoinHandle<Result<Response<Incoming>, hyper::Error>>> = Vec::new();
    let peak = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (budget, peak) = (budget.clone(), peak.clone());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(budget.in_use(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    for _ in 0..CONNS {
        let mut client = h2c_client(front.addr).await;
        for s in 0..STREAMS {
            let (tx, body) = chan_body();
            client.ready().await.unwrap();
            responses.push(tokio::spawn(
                client.send_request(Request::post(format!("http://localhost/{s}")).body(body).unwrap()),
            ));
            // Best effort: a stream held back by the pool stops accepting.
            let tx2 = tx.clone();
            tokio::spawn(async move {
                for _ in 0..BODY / 1024 {
                    if tx2.send(Frame::data(Bytes::from(vec![b'x'; 1024]))).await.is_err() {
                        return;
                    }
                }
            });
            held.push(tx);
        }
        held.push(mpsc::channel(1).0);
        drop(client);
    }
    // Every stream ends one way or the other: refused (503) once the pool
    // stays full, or still waiting.
    let mut refused = 0;
    let rest = responses.split_off(CONNS * STREAMS / 2);
    for r in responses {
        if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(60), r).await.unwrap() {
            if resp.status() == 503 {
                refused += 1;
            }
        }
    }
    let peak = peak.load(Ordering::SeqCst);
    eprintln!("{CONNS}x{STREAMS} open bodies of {BODY} bytes: peak buffered {peak}, {refused} refused");
    assert!(peak <= 2 * 1024 * 1024, "buffered bytes peaked at {peak}, beyond the pool");
    assert!(refused > 0, "once the pool stayed full, streams were refused");
    assert_eq!(up.requests.load(Ordering::SeqCst), 0, "no unfinished body went upstream");
    drop(held);
    for r in rest {
        let _ = r.await;
    }
    wait_until("every buffered byte is given back", || budget.in_use() == 0).await;
    watcher.abort();
    for _ in 0..CONNS {
        let _ = front.next_result().await;
    }
}

#[tokio::test]
async fn idle_connections_are_closed_h2_with_goaway_and_h1_between_requests() {
    let up = echo_upstream(None).await;
    let limits = Limits { idle_timeout: Some(Duration::from_millis(300)), ..Limits::default() };
    let mut front = front(TestInspector::pass(), TestConnector::h2c(up.addr), None, limits).await;
    // HTTP/2 (h2c): one exchange, then silence. The client's connection
    // task ends because the gateway sent GOAWAY and closed.
    let tcp = TcpStream::connect(front.addr).await.unwrap();
    let (mut h2, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    let h2_conn = tokio::spawn(conn);
    let resp = h2.send_request(get("http://localhost/once")).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(60), h2_conn)
        .await
        .expect("the idle h2 connection was closed")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250), "not before it was idle");
    assert_eq!(front.next_result().await.unwrap().requests, 1, "an idle close is a normal end");
    // An h2 connection with a stream in progress is not idle.
    let mut h2 = h2c_client(front.addr).await;
    let (tx, body) = chan_body();
    let pending = tokio::spawn(h2.send_request(Request::post("http://localhost/slow").body(body).unwrap()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    tx.send(Frame::data(Bytes::from_static(b"late"))).await.unwrap();
    drop(tx);
    assert_eq!(pending.await.unwrap().unwrap().status(), 200, "a busy connection stays open");
    // HTTP/1.1 keep-alive: closed between requests.
    let tcp = TcpStream::connect(front.addr).await.unwrap();
    let (mut h1, conn) = http1::handshake::<_, TestBody>(TokioIo::new(tcp)).await.unwrap();
    let h1_conn = tokio::spawn(conn);
    let resp = h1.send_request(get("/once")).await.unwrap();
    assert!(!text(resp).await.is_empty());
    tokio::time::timeout(Duration::from_secs(60), h1_conn)
        .await
        .expect("the idle h1 connection was closed")
        .unwrap()
        .unwrap();
    drop(h2);
    let mut ended = 0;
    while ended < 2 {
        front.next_result().await.unwrap();
        ended += 1;
    }
}

#[tokio::test]
async fn a_body_that_stalls_is_refused_with_408_and_its_buffer_given_back() {
    let up = echo_upstream(None).await;
    let (budget, body_pool) = pool(1024 * 1024);
    let limits = Limits { body_pool, body_idle_timeout: Duration::from_millis(300), ..Limits::default() };
    let inspector = TestInspector::pass();
    let mut front = front(inspector.clone(), TestConnector::plain(up.addr), None, limits).await;
    let mut client = h1_client(front.addr).await;
    let (tx, body) = chan_body();
    let req = Request::post("/stall").header("host", "localhost").header("content-length", "100").body(body).unwrap();
    let sending = tokio::spawn(client.send_request(req));
    tx.send(Frame::data(Bytes::from_static(b"0123456789"))).await.unwrap();
    let resp = sending.await.unwrap().unwrap();
    assert_eq!(resp.status(), 408);
    let body: serde_json::Value = serde_json::from_str(&text(resp).await).unwrap();
    assert_eq!(body["limit"], "body_idle");
    assert_eq!(up.requests.load(Ordering::SeqCst), 0);
    assert_eq!(budget.in_use(), 0, "the stalled body's buffer was given back");
    drop((tx, client));
    let _ = front.next_result().await;
    assert_eq!(inspector.exchanges.lock().unwrap()[0].outcome, ExchangeOutcome::Refused);
}

#[tokio::test]
async fn a_streaming_body_that_stalls_is_cut_off_and_upstream_reset() {
    let body_failed = Arc::new(AtomicBool::new(false));
    let failed = body_failed.clone();
    let up = upstream(None, move |req: Request<Incoming>| {
        let failed = failed.clone();
        async move {
            if req.into_body().collect().await.is_err() {
                failed.store(true, Ordering::SeqCst);
            }
            Response::new(full("upstream answered"))
        }
    })
    .await;
    let limits = Limits {
        max_buffered_body: 64,
        hold_back: 16,
        body_idle_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let mut front = front(TestInspector::pass(), TestConnector::plain(up.addr), None, limits).await;
    let mut client = h1_client(front.addr).await;
    let (tx, body) = chan_body();
    let req = Request::post("/stall").header("host", "localhost").body(body).unwrap();
    let sending = tokio::spawn(client.send_request(req));
    tx.send(Frame::data(Bytes::from(vec![b'a'; 200]))).await.unwrap();
    let resp = sending.await.unwrap().unwrap();
    assert_eq!(resp.status(), 408);
    wait_until("upstream's request was reset", || body_failed.load(Ordering::SeqCst)).await;
    drop((tx, client));
    let _ = front.next_result().await;
}

#[tokio::test]
async fn an_h2_client_gets_at_most_n_upstream_h1_connections() {
    let up = upstream(None, |req: Request<Incoming>| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Response::new(full(req.uri().path().to_owned()))
    })
    .await;
    let limits = Limits { max_upstream_per_connection: 2, ..Limits::default() };
    // h2 client, HTTP/1.1 upstream: without the cap, one connection each.
    let mut front = front(TestInspector::pass(), TestConnector::plain(up.addr), None, limits).await;
    let client = h2c_client(front.addr).await;
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                text(client.send_request(get(&format!("http://localhost/r{i}"))).await.unwrap()).await
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), format!("/r{i}"));
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 10);
    assert!(up.conns.load(Ordering::SeqCst) <= 2, "{} upstream connections", up.conns.load(Ordering::SeqCst));
    drop(client);
    front.next_result().await.unwrap();
}

#[tokio::test]
async fn an_h2_peer_that_stops_answering_pings_is_dropped() {
    let up = echo_upstream(None).await;
    let limits = Limits {
        idle_timeout: None,
        h2_keep_alive_interval: Some(Duration::from_millis(200)),
        h2_keep_alive_timeout: Duration::from_millis(200),
        ..Limits::default()
    };
    let mut front = front(TestInspector::pass(), TestConnector::h2c(up.addr), None, limits).await;
    // A raw peer: the preface and an empty SETTINGS frame, then nothing
    // (no SETTINGS ack, no PING ack), as a dead or frozen client.
    let mut raw = TcpStream::connect(front.addr).await.unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let started = Instant::now();
    let result = front.next_result().await;
    assert!(result.is_err(), "a keep-alive timeout ends the connection with an error: {result:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    drop(raw);
}
