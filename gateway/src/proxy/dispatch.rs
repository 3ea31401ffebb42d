//! Protocol dispatch: the first bytes of an attributed connection decide
//! whether it is TLS (intercepted or passed through by server name), plain
//! HTTP (inspected), or anything else (passed through).

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
#[derive(Debug, PartialEq, Eq)]
enum Sniffed {
    /// A TLS handshake record.
    Tls,
    /// An HTTP/1.x request line or the HTTP/2 preface.
    Http,
    /// Something else.
    Other,
    /// Nothing within `proxy.client_first_timeout`.
    Silent,
    /// The client closed without sending anything.
    Closed,
}

const METHODS: [&[u8]; 9] =
    [b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"OPTIONS ", b"PATCH ", b"TRACE ", b"PRI * "];

fn classify(first: &[u8]) -> Sniffed {
    match first {
        [] => Sniffed::Closed,
        [0x16, ..] => Sniffed::Tls,
        _ if METHODS.iter().any(|m| first.starts_with(m)) => Sniffed::Http,
        _ => Sniffed::Other,
    }
}

async fn sniff(client: &TcpStream, wait: Duration) -> std::io::Result<Sniffed> {
    // Bound the peek itself: readiness alone can be reported before any
    // byte is there, and a server-speaks-first client sends nothing.
    let mut buf = [0u8; 8];
    match tokio::time::timeout(wait, client.peek(&mut buf)).await {
        Err(_) => Ok(Sniffed::Silent),
        Ok(Ok(n)) => Ok(classify(&buf[..n])),
        Ok(Err(e)) => Err(e),
    }
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
        match sniffed {
            Sniffed::Closed => Handled::new("tcp"),
            Sniffed::Silent | Sniffed::Other => self.passthrough(conn, Handled::new("tcp")).await,
            Sniffed::Http => self.serve_plain_http(conn).await,
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
                    TlsAction::Passthrough => self.passthrough(conn, handled).await,
                    TlsAction::Intercept => self.intercept_tls(conn, hello).await,
                }
            }
        }
    }

    /// Plain TCP forwarding, both directions, half-close honoured, after
    /// the policy allowed the connection (content is not inspected, so the
    /// policy judges it once, as protocol `tcp`).
    async fn passthrough(&self, conn: Intercepted, mut handled: Handled) -> Handled {
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
        let refused = match &action {
            policy::Action::Allow => None,
            policy::Action::Deny { reason } => Some(format!("denied by policy rule {rule}: {reason}")),
            policy::Action::RequireApproval(spec) => {
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
        let upstream =
            match connect_upstream(conn.orig_dst, self.config.upstream_mark, self.config.connect_timeout).await {
                Ok(u) => u,
                Err(e) => {
                    end_session(session.as_deref(), &handled, "upstream_failed");
                    return handled.failed(Outcome::UpstreamFailed, format!("connecting upstream: {e}"));
                }
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
    }
}
