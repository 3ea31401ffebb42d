//! Protocol dispatch: the first bytes of an attributed connection decide
//! whether it is TLS (intercepted or passed through by server name), plain
//! HTTP (inspected), or anything else (passed through).
//!
//! A client that says nothing within `proxy.client_first_timeout` is either
//! talking a server-speaks-first protocol or just slow (a loaded host, or a
//! job pausing on purpose). Only the server can tell: upstream is dialled
//! (no byte relayed) and whoever speaks first decides. A client that then
//! sends a TLS hello or an HTTP request is inspected like any other, so
//! waiting is never a way around inspection.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use serde_json::json;
use tokio::net::TcpStream;

use super::{connect_upstream, Intercepted, PlainConnector, Proxy, TlsConnector};
use crate::{
    enforce::{ApprovalAsk, Enforcer},
    event::Outcome,
    http::{self, HttpContext},
    policy::{self, RequestFacts},
    record::{ProcessFacts, SessionEnd, SessionRecorder, SessionStart, TlsFacts},
    relay,
    tls::{self, Peeked, TlsAction},
};

/// Upper bound on the client's TLS handshake with the gateway.
const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// What the first bytes say.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Sniffed {
    /// A TLS handshake record.
    Tls,
    /// An HTTP/1.x request line or the HTTP/2 preface.
    Http,
    /// Something else.
    Other,
    /// Too few bytes yet: they begin like an HTTP method.
    Partial,
    /// Nothing within `proxy.client_first_timeout`.
    Silent,
    /// The client closed without sending anything.
    Closed,
}

const METHODS: [&[u8]; 9] =
    [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"TRACE ", b"PRI * "];

/// Longest thing [`classify`] needs to see.
const SNIFF_LEN: usize = 8;

fn classify(first: &[u8]) -> Sniffed {
    match first {
        [] => Sniffed::Closed,
        [0x16, ..] => Sniffed::Tls,
        _ if METHODS.iter().any(|m| first.starts_with(m)) => Sniffed::Http,
        // A request line sent a byte at a time must not be mistaken for
        // another protocol and spliced through uninspected.
        _ if METHODS.iter().any(|m| m.starts_with(first)) => Sniffed::Partial,
        _ => Sniffed::Other,
    }
}

/// Waits up to `wait` for the client's first bytes and classifies them.
/// Bytes that begin like an HTTP method are waited on until they decide; if
/// they never do, the connection goes to the HTTP parser (which rejects
/// what is not HTTP), never around it.
async fn sniff(client: &TcpStream, wait: Duration) -> std::io::Result<Sniffed> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; SNIFF_LEN];
    // Bound the peek itself: readiness alone can be reported before any
    // byte is there, and a server-speaks-first client sends nothing.
    let n = match tokio::time::timeout_at(deadline, client.peek(&mut buf)).await {
        Err(_) => return Ok(Sniffed::Silent),
        Ok(r) => r?,
    };
    sniff_more(client, &mut buf, n, deadline).await
}

/// Classifies the `n` bytes already peeked into `buf`, peeking again while
/// they are only the beginning of a method (peek returns at once while
/// data is queued, so this polls briefly).
async fn sniff_more(
    client: &TcpStream,
    buf: &mut [u8; SNIFF_LEN],
    mut n: usize,
    deadline: tokio::time::Instant,
) -> std::io::Result<Sniffed> {
    loop {
        match classify(&buf[..n]) {
            Sniffed::Partial if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(2)).await;
                // Returns at once with the queued bytes (so a close after a
                // fragment shows only at the deadline, as a fragment).
                n = client.peek(buf).await?.max(n);
            }
            Sniffed::Partial => return Ok(Sniffed::Http),
            decided => return Ok(decided),
        }
    }
}

/// Who spoke first on a connection whose client was silent at first.
enum FirstWord {
    /// The client, saying this.
    Client(Sniffed),
    /// The server (or it closed).
    Server,
}

/// The result of handling one connection, for its event.
pub(super) struct Handled {
    pub protocol: &'static str,
    pub sni: Option<String>,
    pub requests: Option<u64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub outcome: Outcome,
    pub error: Option<String>,
}

impl Handled {
    fn new(protocol: &'static str) -> Handled {
        Handled {
            protocol,
            sni: None,
            requests: None,
            bytes_up: 0,
            bytes_down: 0,
            outcome: Outcome::Closed,
            error: None,
        }
    }

    fn failed(mut self, outcome: Outcome, error: impl std::fmt::Display) -> Handled {
        self.outcome = outcome;
        self.error = Some(error.to_string());
        self
    }
}

impl Proxy {
    pub(super) async fn dispatch(&self, conn: Intercepted) -> Handled {
        let sniffed = match sniff(&conn.client, self.config.client_first_timeout).await {
            Ok(s) => s,
            Err(e) => return Handled::new("tcp").failed(Outcome::Error, format!("reading from the client: {e}")),
        };
        if sniffed != Sniffed::Silent {
            return self.handle_sniffed(conn, sniffed, None).await;
        }
        let upstream = match connect_upstream(conn.orig_dst, self.config.upstream_mark, self.config.connect_timeout)
            .await
        {
            Ok(u) => u,
            Err(e) => return Handled::new("tcp").failed(Outcome::UpstreamFailed, format!("connecting upstream: {e}")),
        };
        match self.first_word(&conn.client, &upstream).await {
            Ok(FirstWord::Server) => self.handle_sniffed(conn, Sniffed::Other, Some(upstream)).await,
            Ok(FirstWord::Client(sniffed @ (Sniffed::Tls | Sniffed::Http))) => {
                tracing::debug!(conn_id = conn.id, ?sniffed, "a slow client spoke first: inspected as usual");
                // The inspecting handlers dial their own upstream.
                drop(upstream);
                self.handle_sniffed(conn, sniffed, None).await
            }
            Ok(FirstWord::Client(sniffed)) => self.handle_sniffed(conn, sniffed, Some(upstream)).await,
            Err(e) => Handled::new("tcp").failed(Outcome::Error, format!("reading from the client: {e}")),
        }
    }

    /// Waits for the first bytes from either side of a connection whose
    /// client was silent at first.
    async fn first_word(&self, client: &TcpStream, upstream: &TcpStream) -> std::io::Result<FirstWord> {
        let mut c = [0u8; SNIFF_LEN];
        let mut u = [0u8; 1];
        tokio::select! {
            biased;
            n = client.peek(&mut c) => {
                let deadline = tokio::time::Instant::now() + self.config.client_first_timeout;
                Ok(FirstWord::Client(sniff_more(client, &mut c, n?, deadline).await?))
            }
            _ = upstream.peek(&mut u) => Ok(FirstWord::Server),
        }
    }

    /// Hands the connection to the handler its first bytes call for;
    /// `upstream` is an already dialled server connection, for passthrough.
    async fn handle_sniffed(&self, conn: Intercepted, sniffed: Sniffed, upstream: Option<TcpStream>) -> Handled {
        match sniffed {
            Sniffed::Closed => Handled::new("tcp"),
            Sniffed::Silent | Sniffed::Other => self.passthrough(conn, Handled::new("tcp"), upstream).await,
            // (`sniff_more` never leaves a fragment undecided; if it did, the
            // HTTP parser is the safe side.)
            Sniffed::Http | Sniffed::Partial => self.serve_plain_http(conn).await,
            Sniffed::Tls => {
                let hello = match tls::peek_client_hello(&conn.client, self.services.tls.client_hello_timeout).await {
                    Ok(Peeked::Tls(hello)) => hello,
                    // Not a parseable TLS hello although it started like one:
                    // without a server name nothing can be decided, so the
                    // connection is refused rather than forwarded blind.
                    Ok(Peeked::Plaintext) => {
                        return Handled::new("tls").failed(Outcome::Error, "invalid TLS record header");
                    }
                    Err(e) => {
                        return Handled::new("tls").failed(Outcome::Error, format!("malformed TLS ClientHello: {e}"))
                    }
                };
                let mut handled = Handled::new("tls-passthrough");
                handled.sni = hello.sni.clone();
                match self.services.tls.action_for(hello.sni.as_deref()) {
                    TlsAction::Passthrough => self.passthrough(conn, handled, None).await,
                    TlsAction::Intercept => self.intercept_tls(conn, hello).await,
                }
            }
        }
    }

    /// Plain TCP forwarding, both directions, half-close honoured, after
    /// the policy allowed the connection (content is not inspected, so the
    /// policy judges it once, as protocol `tcp`). `dialled` is an upstream
    /// connection opened to see who speaks first: used when the policy
    /// allows at once, dropped otherwise (a held connection dials afresh
    /// once approved, so a server-first greeting is not lost to a timeout).
    async fn passthrough(&self, conn: Intercepted, mut handled: Handled, dialled: Option<TcpStream>) -> Handled {
        let host = handled.sni.clone().unwrap_or_else(|| conn.orig_dst.ip().to_string()).to_ascii_lowercase();
        let (action, rule, level) = {
            let policy = self.services.enforcement.policy.current();
            let identity = &conn.caller.identity;
            let facts = RequestFacts {
                identity_uri: &identity.uri,
                labels: &identity.labels,
                claims: &policy::NO_ATTRIBUTES,
                unmapped: identity.rule.is_none(),
                host: &host,
                addr: conn.orig_dst.ip(),
                port: conn.orig_dst.port(),
                tls: handled.protocol == "tls-passthrough",
                request: None,
            };
            let d = policy.evaluate(&facts);
            (d.action.clone(), d.rule.to_owned(), d.record)
        };
        let session = (level != policy::RecordLevel::None)
            .then(|| self.start_session(Who::of(&conn), &host, handled.sni.clone(), None, handled.protocol))
            .flatten();
        if let Some(s) = &session {
            s.event("decision", json!({ "rule": rule, "action": action.name() }));
        }
        let mut dialled = dialled;
        let refused = match &action {
            policy::Action::Allow => None,
            policy::Action::Deny { reason } => Some(format!("denied by policy rule {rule}: {reason}")),
            policy::Action::RequireApproval(spec) => {
                dialled = None;
                let ask = ApprovalAsk {
                    rule: &rule,
                    spec,
                    method: "CONNECT".into(),
                    url: format!("tcp://{host}:{}", conn.orig_dst.port()),
                    destination: format!("{host}:{}", conn.orig_dst.port()),
                    body_preview: String::new(),
                };
                let enforcement = &self.services.enforcement;
                let asked = enforcement.ask_approval(conn.id, &conn.caller, session.as_deref(), ask).await;
                asked.err().map(|refusal| refusal.message)
            }
        };
        if let Some(reason) = refused {
            tracing::info!(target: crate::enforce::POLICY_TARGET, conn_id = conn.id, rule, host, reason, "connection refused by policy");
            end_session(session.as_deref(), &handled, "refused");
            return handled.failed(Outcome::Blocked, reason);
        }
        let upstream = match dialled {
            Some(u) => u,
            None => match connect_upstream(conn.orig_dst, self.config.upstream_mark, self.config.connect_timeout).await
            {
                Ok(u) => u,
                Err(e) => {
                    end_session(session.as_deref(), &handled, "upstream_failed");
                    return handled.failed(Outcome::UpstreamFailed, format!("connecting upstream: {e}"));
                }
            },
        };
        let counters = relay::Counters::default();
        let result = relay::relay(&conn.client, &upstream, &counters).await;
        handled.bytes_up = counters.up.load(Ordering::Relaxed);
        handled.bytes_down = counters.down.load(Ordering::Relaxed);
        end_session(session.as_deref(), &handled, if result.is_ok() { "closed" } else { "error" });
        match result {
            Ok(()) => handled,
            Err(e) => handled.failed(Outcome::Error, format!("relay: {e}")),
        }
    }

    /// Starts the recording of a connection; `None` when recording is off.
    fn start_session(
        &self,
        conn: Who<'_>,
        host: &str,
        sni: Option<String>,
        tls: Option<TlsFacts>,
        protocol: &str,
    ) -> Option<Arc<SessionRecorder>> {
        let caller = conn.caller;
        let session = self.services.enforcement.recorder.start(SessionStart {
            conn_id: conn.id,
            identity: caller.identity.uri.clone(),
            identity_labels: caller.identity.labels.clone(),
            process: ProcessFacts::new(&caller.process, caller.job.clone()),
            host: host.to_owned(),
            orig_dst: conn.orig_dst,
            sni,
            tls,
            protocol: protocol.to_owned(),
        });
        session.is_recording().then(|| Arc::new(session))
    }

    async fn intercept_tls(&self, conn: Intercepted, hello: tls::ClientHelloInfo) -> Handled {
        let mut handled = Handled::new("https");
        // Without SNI (intercepted by configuration) the certificate names the address.
        let name = hello.sni.clone().unwrap_or_else(|| conn.orig_dst.ip().to_string());
        handled.sni = hello.sni.clone();
        let server_config = match self.services.leaf_cache.server_config(&name, &hello.alpn) {
            Ok(c) => c,
            Err(e) => return handled.failed(Outcome::Error, format!("minting a certificate for {name}: {e}")),
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
        let stream = match tokio::time::timeout(CLIENT_HANDSHAKE_TIMEOUT, acceptor.accept(conn.client)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return handled.failed(Outcome::Error, format!("client TLS handshake: {e}")),
            Err(_) => return handled.failed(Outcome::Error, "client TLS handshake timed out"),
        };
        let tls_conn = stream.get_ref().1;
        let client_h2 = tls_conn.alpn_protocol() == Some(b"h2".as_slice());
        let tls_facts = TlsFacts {
            version: tls_conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default(),
            cipher: tls_conn.negotiated_cipher_suite().map(|c| format!("{:?}", c.suite())).unwrap_or_default(),
            alpn: tls_conn.alpn_protocol().map(|a| String::from_utf8_lossy(a).into_owned()),
        };
        let who = Who { id: conn.id, caller: &conn.caller, orig_dst: conn.orig_dst };
        let session = self.start_session(who, &name.to_ascii_lowercase(), hello.sni.clone(), Some(tls_facts), "https");
        let connector = TlsConnector {
            dst: conn.orig_dst,
            mark: self.config.upstream_mark,
            timeout: self.config.connect_timeout,
            server_name: name.clone(),
            tls: self.services.upstream_tls.clone(),
        };
        let ctx = HttpContext { conn_id: conn.id, server_name: name, orig_dst: conn.orig_dst, tls: true };
        self.serve_http(stream, Some(client_h2), HttpConn { ctx, caller: conn.caller, session }, connector, handled)
            .await
    }

    async fn serve_plain_http(&self, conn: Intercepted) -> Handled {
        let connector = PlainConnector {
            dst: conn.orig_dst,
            mark: self.config.upstream_mark,
            timeout: self.config.connect_timeout,
        };
        // The Host header names the server; the engine falls back to it.
        let ctx = HttpContext { conn_id: conn.id, server_name: String::new(), orig_dst: conn.orig_dst, tls: false };
        let session = self.start_session(Who::of(&conn), &conn.orig_dst.ip().to_string(), None, None, "http");
        let client = conn.client;
        self.serve_http(client, None, HttpConn { ctx, caller: conn.caller, session }, connector, Handled::new("http"))
            .await
    }

    async fn serve_http<IO, U>(
        &self,
        io: IO,
        client_h2: Option<bool>,
        conn: HttpConn,
        connector: U,
        mut handled: Handled,
    ) -> Handled
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        U: http::UpstreamConnector,
    {
        let HttpConn { ctx, caller, session } = conn;
        let enforcer = Arc::new(Enforcer::new(self.services.enforcement.clone(), caller, session.clone()));
        let result =
            http::serve(io, client_h2, ctx, enforcer.clone(), connector, self.services.http_limits.clone()).await;
        if enforcer.blocked() > 0 {
            handled.outcome = Outcome::Blocked;
        }
        let handled = match result {
            Ok(stats) => {
                handled.requests = Some(stats.requests);
                handled.bytes_up = stats.bytes_up;
                handled.bytes_down = stats.bytes_down;
                handled
            }
            Err(e) => {
                if let Some(s) = &session {
                    s.event("error", json!({ "error": e.to_string() }));
                }
                handled.failed(Outcome::Error, e)
            }
        };
        end_session(session.as_deref(), &handled, handled.outcome.as_str());
        handled
    }
}

/// An HTTP connection's context, caller and recording.
struct HttpConn {
    ctx: HttpContext,
    caller: Arc<crate::enforce::Caller>,
    session: Option<Arc<SessionRecorder>>,
}

/// Who a session belongs to (the parts of an [`Intercepted`] that outlive
/// handing its socket to TLS).
#[derive(Clone, Copy)]
struct Who<'a> {
    id: u64,
    caller: &'a crate::enforce::Caller,
    orig_dst: std::net::SocketAddr,
}

impl<'a> Who<'a> {
    fn of(conn: &'a Intercepted) -> Who<'a> {
        Who { id: conn.id, caller: &conn.caller, orig_dst: conn.orig_dst }
    }
}

fn end_session(session: Option<&SessionRecorder>, handled: &Handled, outcome: &str) {
    if let Some(s) = session {
        s.end(SessionEnd { bytes_up: handled.bytes_up, bytes_down: handled.bytes_down, outcome: outcome.to_owned() });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b""), Sniffed::Closed);
        assert_eq!(classify(&[0x16, 3, 1]), Sniffed::Tls);
        assert_eq!(classify(b"GET /x H"), Sniffed::Http);
        assert_eq!(classify(b"PRI * HT"), Sniffed::Http);
        assert_eq!(classify(b"SSH-2.0-"), Sniffed::Other);
        assert_eq!(classify(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"), Sniffed::Other, "postgres SSLRequest");
        assert_eq!(classify(b"G"), Sniffed::Partial);
        assert_eq!(classify(b"OPTION"), Sniffed::Partial);
        assert_eq!(classify(b"PI"), Sniffed::Other, "redis PING shares only the first letter");
    }

    use tokio::io::AsyncWriteExt as _;

    /// (the client application's socket, the proxy's accepted socket)
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (proxy, _) = listener.accept().await.unwrap();
        (app, proxy)
    }

    /// Writes `bytes` one at a time with a pause between them.
    fn trickle(mut app: TcpStream, bytes: &'static [u8]) -> tokio::task::JoinHandle<TcpStream> {
        tokio::spawn(async move {
            for b in bytes {
                app.write_all(std::slice::from_ref(b)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            app
        })
    }

    #[tokio::test]
    async fn a_request_line_sent_a_byte_at_a_time_is_http() {
        let (app, proxy) = pair().await;
        let _app = trickle(app, b"OPTIONS * HTTP/1.1\r\n");
        assert_eq!(sniff(&proxy, Duration::from_secs(10)).await.unwrap(), Sniffed::Http);
    }

    #[tokio::test]
    async fn another_protocol_sharing_a_first_letter_is_not() {
        let (app, proxy) = pair().await;
        let _app = trickle(app, b"PING\r\n");
        assert_eq!(sniff(&proxy, Duration::from_secs(10)).await.unwrap(), Sniffed::Other);
    }

    #[tokio::test]
    async fn a_stalled_method_prefix_goes_to_the_http_parser_not_around_it() {
        let (app, proxy) = pair().await;
        let app = trickle(app, b"GE").await.unwrap();
        assert_eq!(sniff(&proxy, Duration::from_millis(200)).await.unwrap(), Sniffed::Http);
        // Closing after a fragment: the same (peek keeps returning the
        // queued fragment, so the close only shows once it is read).
        drop(app);
        let (app, proxy) = pair().await;
        drop(trickle(app, b"P").await.unwrap());
        assert_eq!(sniff(&proxy, Duration::from_millis(200)).await.unwrap(), Sniffed::Http);
    }

    #[tokio::test]
    async fn silence_and_close_are_told_apart() {
        let (app, proxy) = pair().await;
        assert_eq!(sniff(&proxy, Duration::from_millis(100)).await.unwrap(), Sniffed::Silent);
        drop(app);
        assert_eq!(sniff(&proxy, Duration::from_secs(10)).await.unwrap(), Sniffed::Closed);
    }
}
