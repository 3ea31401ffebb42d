//! Protocol dispatch: sniffs the first bytes of an attributed connection
//! and chooses its handler. Nothing is decided here: TLS goes to the TLS
//! handler (terminated and served as HTTP when its server name is
//! intercepted, else handed to the gate as bytes it cannot inspect), a
//! prefix of an HTTP/1.x request or the HTTP/2 preface goes to the HTTP
//! handler, a PostgreSQL startup packet (StartupMessage 3.x, SSLRequest,
//! GSSENCRequest, CancelRequest) to the PostgreSQL handler, and anything else goes to the gate as an unknown protocol,
//! which refuses it unless the policy opted the destination out.
//!
//! A client that says nothing is waited for, never dialled around: only
//! where the policy lets opaque traffic through (`uninspectable: pass |
//! scan_raw`, or a destination that is not protected) is upstream dialled
//! after `proxy.client_first_timeout`, to let a server that speaks first
//! (SSH, SMTP, MySQL) do so. A client that then sends a TLS hello or an
//! HTTP request is inspected like any other, so waiting is never a way
//! around inspection; silence on both sides ends at
//! `proxy.client_silence_timeout`.

use std::time::Duration;

use tokio::net::TcpStream;

use super::{connect_upstream, Handled, Intercepted, Proxy};
use crate::{
    enforce::{ConnFacts, Passage, Uninspectable},
    event::{Outcome, Protocol},
    tls::{self, Peeked, TlsAction},
};

/// What the first bytes say.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Sniffed {
    /// A TLS handshake record.
    Tls,
    /// The start of an HTTP/1.x request (any method, leading empty lines
    /// allowed as RFC 9112 §2.2 says) or the HTTP/2 preface.
    Http,
    /// A PostgreSQL startup packet.
    Postgres,
    /// Something else.
    Other,
    /// Too few bytes yet: a valid prefix of an HTTP request line.
    Partial,
    /// Nothing within the wait.
    Silent,
    /// The client closed without sending anything.
    Closed,
}

/// How many bytes [`classify`] looks at: a request line longer than this
/// that is still valid goes to the HTTP parser, which has the last word.
const SNIFF_LEN: usize = 512;

/// The HTTP/2 connection preface (RFC 9113 §3.4), which httparse (an
/// HTTP/1 parser) rejects for its version.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub(crate) fn classify(first: &[u8]) -> Sniffed {
    if first.is_empty() {
        return Sniffed::Closed;
    }
    if first[0] == 0x16 {
        return Sniffed::Tls;
    }
    // A startup packet's length is below 10000: its first byte is 0, which
    // no HTTP request starts with.
    if first[0] == 0 {
        return match first.len() {
            ..8 => Sniffed::Partial,
            _ if crate::postgres::codec::looks_like_startup(first) => Sniffed::Postgres,
            _ => Sniffed::Other,
        };
    }
    if first.starts_with(H2_PREFACE) {
        return Sniffed::Http;
    }
    if H2_PREFACE.starts_with(first) {
        return Sniffed::Partial;
    }
    // httparse is what hyper parses requests with: whatever it accepts as
    // the start of a request is HTTP, whatever the method's name.
    let mut headers = [httparse::EMPTY_HEADER; 32];
    match httparse::Request::new(&mut headers).parse(first) {
        Ok(httparse::Status::Complete(_)) | Err(httparse::Error::TooManyHeaders) => Sniffed::Http,
        Ok(httparse::Status::Partial) => {
            let line = first.iter().position(|&b| b != b'\r' && b != b'\n').map_or(&[][..], |i| &first[i..]);
            if line.contains(&b'\n') || first.len() >= SNIFF_LEN {
                Sniffed::Http
            } else {
                Sniffed::Partial
            }
        }
        Err(_) => Sniffed::Other,
    }
}

/// Waits up to `wait` for the client's first bytes and classifies them.
/// Bytes that begin like an HTTP request are waited on until they decide;
/// if they never do, a started request line goes to the HTTP parser (which
/// rejects what is not HTTP) and a lone word counts as another protocol:
/// neither goes around the gate.
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

/// Classifies `buf[..n]`, peeking again while the bytes are an undecided
/// prefix and `deadline` has not passed.
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
            // A request line under way (a method and a space already) goes
            // to the HTTP parser; a lone word that stops (`hello`, an
            // echo or line protocol waiting for its answer) is not HTTP.
            // Either way it is judged: unknown protocols are refused unless
            // the policy opts the destination out.
            Sniffed::Partial if buf[..n].contains(&b' ') => return Ok(Sniffed::Http),
            Sniffed::Partial => return Ok(Sniffed::Other),
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
    /// Nobody, for `proxy.client_silence_timeout`.
    Nobody,
}

impl Proxy {
    /// Opens the gate for the connection and hands it to the handler its
    /// first bytes call for.
    ///
    /// Each handler's future is boxed: a task's future is as large as its
    /// largest state, so inline, every idle connection would carry the
    /// biggest handler's state (26 KiB) whatever protocol it speaks.
    pub(super) async fn dispatch(&self, conn: Intercepted) -> Handled {
        let facts = ConnFacts { id: conn.id, caller: conn.caller.clone(), dst: conn.orig_dst, capture: conn.capture };
        let passage = self.services.gate.open(facts);
        match sniff(&conn.client, self.config.client_first_timeout).await {
            Ok(Sniffed::Silent) => Box::pin(self.silent(conn, passage)).await,
            Ok(sniffed) => self.handle_sniffed(conn, passage, sniffed, None).await,
            Err(e) => Handled::new(Protocol::Tcp).failed(Outcome::Error, format!("reading from the client: {e}")),
        }
    }

    /// A client that said nothing within `client_first_timeout`.
    async fn silent(&self, conn: Intercepted, passage: Passage) -> Handled {
        let waited = self.config.client_first_timeout + self.config.client_silence_timeout;
        if !passage.may_pass_opaque() {
            // Nothing but the client's own bytes could be let through here:
            // wait for them (bounded), never dial upstream for a silent client.
            return match sniff(&conn.client, self.config.client_silence_timeout).await {
                Ok(Sniffed::Silent) => {
                    let why = Uninspectable::Silent { waited };
                    self.opaque(conn, passage, why, Handled::new(Protocol::Tcp), None).await
                }
                Ok(sniffed) => self.handle_sniffed(conn, passage, sniffed, None).await,
                Err(e) => Handled::new(Protocol::Tcp).failed(Outcome::Error, format!("reading from the client: {e}")),
            };
        }
        let upstream = match connect_upstream(
            conn.orig_dst,
            self.config.upstream_mark,
            self.config.connect_timeout,
            &self.services.gate.metrics,
        )
        .await
        {
            Ok(u) => u,
            Err(e) => {
                return Handled::new(Protocol::Tcp).failed(Outcome::UpstreamFailed, format!("connecting upstream: {e}"))
            }
        };
        match self.first_word(&conn.client, &upstream).await {
            Ok(FirstWord::Server) => {
                let why = Uninspectable::ServerSpeaksFirst;
                self.opaque(conn, passage, why, Handled::new(Protocol::Tcp), Some(upstream)).await
            }
            Ok(FirstWord::Nobody) => {
                let why = Uninspectable::Silent { waited };
                self.opaque(conn, passage, why, Handled::new(Protocol::Tcp), None).await
            }
            Ok(FirstWord::Client(sniffed @ (Sniffed::Tls | Sniffed::Http | Sniffed::Partial | Sniffed::Postgres))) => {
                tracing::debug!(conn_id = conn.id, ?sniffed, "a slow client spoke first: inspected as usual");
                // The inspecting handlers dial their own upstream.
                drop(upstream);
                self.handle_sniffed(conn, passage, sniffed, None).await
            }
            Ok(FirstWord::Client(sniffed)) => self.handle_sniffed(conn, passage, sniffed, Some(upstream)).await,
            Err(e) => Handled::new(Protocol::Tcp).failed(Outcome::Error, format!("reading from the client: {e}")),
        }
    }

    /// Waits for the first bytes from either side of a connection whose
    /// client was silent at first, for at most `client_silence_timeout`.
    async fn first_word(&self, client: &TcpStream, upstream: &TcpStream) -> std::io::Result<FirstWord> {
        let mut c = [0u8; SNIFF_LEN];
        let mut u = [0u8; 1];
        let first = async {
            tokio::select! {
                biased;
                n = client.peek(&mut c) => {
                    let deadline = tokio::time::Instant::now() + self.config.client_first_timeout;
                    Ok(FirstWord::Client(sniff_more(client, &mut c, n?, deadline).await?))
                }
                _ = upstream.peek(&mut u) => Ok(FirstWord::Server),
            }
        };
        match tokio::time::timeout(self.config.client_silence_timeout, first).await {
            Ok(word) => word,
            Err(_) => Ok(FirstWord::Nobody),
        }
    }

    /// Hands the connection to the handler its first bytes call for;
    /// `upstream` is an already dialled server connection, used if the
    /// gate lets opaque bytes through.
    async fn handle_sniffed(
        &self,
        conn: Intercepted,
        passage: Passage,
        sniffed: Sniffed,
        upstream: Option<TcpStream>,
    ) -> Handled {
        match sniffed {
            Sniffed::Closed => Handled::new(Protocol::Tcp),
            Sniffed::Silent | Sniffed::Other => {
                let why = Uninspectable::UnknownProtocol;
                Box::pin(self.opaque(conn, passage, why, Handled::new(Protocol::Tcp), upstream)).await
            }
            // (`sniff_more` never leaves a fragment undecided; if it did, the
            // HTTP parser is the safe side.)
            Sniffed::Http | Sniffed::Partial => Box::pin(self.serve_plain_http(conn, passage)).await,
            Sniffed::Postgres => Box::pin(self.serve_postgres(conn, passage, false)).await,
            Sniffed::Tls => {
                let hello = match tls::peek_client_hello(&conn.client, self.services.tls.client_hello_timeout).await {
                    Ok(Peeked::Tls(hello)) => hello,
                    // Not a parseable TLS hello although it started like one:
                    // without a server name nothing can be decided, so the
                    // connection is refused rather than forwarded blind.
                    Ok(Peeked::Plaintext) => {
                        return Handled::new(Protocol::Tls).failed(Outcome::Error, "invalid TLS record header");
                    }
                    Err(e) => {
                        return Handled::new(Protocol::Tls)
                            .failed(Outcome::Error, format!("malformed TLS ClientHello: {e}"))
                    }
                };
                // PostgreSQL 17's direct TLS: ALPN says what is inside.
                if hello.alpn.iter().any(|p| p == super::postgres::ALPN) {
                    return Box::pin(self.serve_postgres(conn, passage, true)).await;
                }
                match self.services.tls.action_for(hello.sni.as_deref()) {
                    TlsAction::Intercept => Box::pin(self.intercept_tls(conn, passage, hello)).await,
                    TlsAction::Passthrough => {
                        let mut handled = Handled::new(Protocol::TlsPassthrough);
                        handled.sni = hello.sni.clone();
                        let why = Uninspectable::TlsNotIntercepted { sni: hello.sni };
                        Box::pin(self.opaque(conn, passage, why, handled, None)).await
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b""), Sniffed::Closed);
        assert_eq!(classify(&[0x16, 3, 1]), Sniffed::Tls);
        assert_eq!(classify(b"GET /x H"), Sniffed::Partial);
        assert_eq!(classify(b"GET /x HTTP/1.1\r\n"), Sniffed::Http);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Sniffed::Http);
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2\r\n"), Sniffed::Other);
        assert_eq!(classify(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"), Sniffed::Postgres, "postgres SSLRequest");
        assert_eq!(classify(b"\x00\x00\x00\x08\x04\xd2\x16\x30"), Sniffed::Postgres, "postgres GSSENCRequest");
        assert_eq!(classify(b"\x00\x00\x00\x10\x04\xd2\x16\x2e\0\0\0\x01\0\0\0\x02"), Sniffed::Postgres, "cancel");
        assert_eq!(classify(b"\x00\x00\x00\x29\x00\x03\x00\x00user\0"), Sniffed::Postgres, "startup 3.0");
        assert_eq!(classify(b"\x00\x00\x00"), Sniffed::Partial, "a startup packet under way");
        assert_eq!(classify(b"\x00\x00\x00\x29\x00\x02\x00\x00"), Sniffed::Other, "protocol 2");
        assert_eq!(classify(b"G"), Sniffed::Partial);
        assert_eq!(classify(b"OPTION"), Sniffed::Partial);
        assert_eq!(classify(b"PING\r\n"), Sniffed::Other, "redis PING is no request line");
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Sniffed::Other, "redis RESP");
        assert_eq!(classify(b"SET key value\r\n"), Sniffed::Other, "no HTTP version");
        // Any method, any case, after empty lines: HTTP (RFC 9112 §2.2).
        assert_eq!(classify(b"PROPFIND /x HTTP/1.1\r\n"), Sniffed::Http);
        assert_eq!(classify(b"FOOBAR /x HTTP/1.1\r\nHost: a\r\n"), Sniffed::Http);
        assert_eq!(classify(b"get / HTTP/1.1\r\n"), Sniffed::Http);
        assert_eq!(classify(b"\r\n\r\nGET / HTTP/1.1\r\n"), Sniffed::Http);
        assert_eq!(classify(b"\r\nPOST /long-path-not-finished"), Sniffed::Partial);
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
    async fn a_stalled_fragment_is_never_passed_around_the_gate() {
        // A request line under way goes to the HTTP parser...
        let (app, proxy) = pair().await;
        let app = trickle(app, b"GET /x").await.unwrap();
        assert_eq!(sniff(&proxy, Duration::from_millis(200)).await.unwrap(), Sniffed::Http);
        drop(app);
        // ...a lone word that stops is another protocol (refused unless the
        // policy opts the destination out), not HTTP.
        let (app, proxy) = pair().await;
        let app = trickle(app, b"GE").await.unwrap();
        assert_eq!(sniff(&proxy, Duration::from_millis(200)).await.unwrap(), Sniffed::Other);
        drop(app);
        // Closing after a fragment: the same (peek keeps returning the
        // queued fragment, so the close only shows once it is read).
        let (app, proxy) = pair().await;
        drop(trickle(app, b"P").await.unwrap());
        assert_eq!(sniff(&proxy, Duration::from_millis(200)).await.unwrap(), Sniffed::Other);
    }

    #[tokio::test]
    async fn silence_and_close_are_told_apart() {
        let (app, proxy) = pair().await;
        assert_eq!(sniff(&proxy, Duration::from_millis(100)).await.unwrap(), Sniffed::Silent);
        drop(app);
        assert_eq!(sniff(&proxy, Duration::from_secs(10)).await.unwrap(), Sniffed::Closed);
    }
}
