//! The PostgreSQL protocol handler: translates a PostgreSQL connection into
//! the gate's facts and the gate's decisions back into PostgreSQL messages.
//!
//! * Negotiation: an SSLRequest is answered `S` and TLS is terminated with
//!   a leaf the gateway CA mints for the destination; a GSSENCRequest is
//!   answered `N` (GSSAPI encryption would hide everything from the
//!   gateway), so clients fall back to what it can inspect.
//! * Authentication: the gateway answers the client's startup itself and
//!   asks for the password in cleartext (over the TLS leg, or the loopback
//!   one), turns it into a `postgres-password` finding and applies the
//!   static-key action: block (authentication fails naming the finding),
//!   flag (upstream gets the job's password) or swap (upstream gets the
//!   credential the gateway holds for the identity and destination). It
//!   then logs in upstream itself (TLS whenever the server accepts it,
//!   verified as for HTTPS; SCRAM-SHA-256 with channel binding over TLS,
//!   MD5 or cleartext, as the server asks) and hands the client the
//!   server's parameters and a cancel key of its own.
//! * After authentication every client message is parsed and judged
//!   before it goes upstream (SQL text, bind parameters, COPY data and
//!   function arguments are scanned for keys); what does not parse, or is
//!   of a type the handler does not know, ends the session with an
//!   ErrorResponse and a recorded refusal. Nothing is relayed blind.
//! * Result rows of a statement the policy masks are rewritten one DataRow
//!   at a time (`postgres::rows`): the mask goes from a Query's statement,
//!   or a Parse, to its portals; before a masked Execute the handler sends
//!   its own Describe of the portal to learn the columns and formats, and
//!   keeps its answer. A FIFO of what the server owes (`Pending`) matches
//!   the server's answers to what asked for them.
//!
//! Each round trip (a Query, or an extended batch up to its Sync, with the
//! server's answers up to ReadyForQuery) is recorded as one `exchange`
//! record (`postgres::rounds`), handed over before the ReadyForQuery is
//! relayed.
//!
//! A statement refused is answered with an ErrorResponse (SQLSTATE 42501)
//! in the place of its results: the handler sends a Sync upstream instead
//! of the refused message (or of the rest of an extended-protocol batch up
//! to the client's Sync), and puts the error before the ReadyForQuery that
//! Sync produces, so the client sees the server's own transaction status.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

use bytes::{BufMut as _, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use serde_json::json;
use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadHalf, WriteHalf};

use super::{connect_upstream, Handled, Intercepted, Proxy};
use crate::{
    credentials::{RenderedInjection, SecretString, SwapTarget},
    detect::{
        http_scan::{Hit, Location},
        Confidence, Detection, Detector, Secret,
    },
    enforce::{ConnectionDecision, Judged, Passage, Reason, Refusal, StatementAsk, StatementVerdict, Uninspectable},
    event::{Outcome, Protocol},
    http::BoxedIo,
    mask::{
        views::{self, Found, OverBudget},
        Masker,
    },
    policy,
    postgres::{
        cancel::CancelTarget,
        clean::{CleanTexts, Known},
        codec::{self, CodecError, Frame, Frontend, Severity, Startup, Target, Value},
        encoded,
        rounds::{self, Rounds},
        rows::{MaskCounts, RowMask, RowPlan},
        sql,
    },
    record::{EventKind, PostgresExchange, PostgresMessage, PostgresResult, SessionOutcome, TlsFacts},
    tls,
};

/// The ALPN protocol id of PostgreSQL over TLS.
pub const ALPN: &[u8] = b"postgresql";

/// Rule id of the finding a client's database password becomes.
pub const PASSWORD_RULE: &str = "postgres-password";

/// Upper bound on each step of the negotiation and authentication.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// SSLRequest / GSSENCRequest rounds before the startup message.
const MAX_NEGOTIATION_ROUNDS: usize = 4;
/// Backend messages the handler parses (authentication, ErrorResponse,
/// CommandComplete) are at most this long; the others stream through.
const MAX_PARSED_BACKEND: usize = 1 << 20;
/// The server's own cap on a message (`PQ_LARGE_MESSAGE_LIMIT` is 1 GiB).
const MAX_BACKEND_MESSAGE: usize = 1 << 30;
/// A Terminate message.
const TERMINATE: &[u8] = b"X\0\0\0\x04";
/// SQL text and values a recording keeps per statement.
const RECORDED_TEXT: usize = 4096;

/// SQLSTATE `insufficient_privilege`: a statement the gateway refused.
const SQLSTATE_REFUSED: &str = "42501";

/// `syntax_error`: a query PostgreSQL's grammar rejects.
const SQLSTATE_SYNTAX_ERROR: &str = "42601";
/// SQLSTATE `invalid_password`: a password the gateway refused.
const SQLSTATE_INVALID_PASSWORD: &str = "28P01";
/// SQLSTATE `invalid_authorization_specification`: a connection refused.
const SQLSTATE_INVALID_AUTHORIZATION: &str = "28000";
/// SQLSTATE `protocol_violation`.
const SQLSTATE_PROTOCOL_VIOLATION: &str = "08P01";
/// SQLSTATE `cannot_connect_now`: a connection refused because the gateway
/// cannot record it now (drivers treat it as transient).
const SQLSTATE_CANNOT_CONNECT_NOW: &str = "57P03";
/// SQLSTATE `insufficient_resources`: a statement refused because the
/// gateway cannot record it now.
const SQLSTATE_INSUFFICIENT_RESOURCES: &str = "53000";

/// How a connection's negotiation ended.
enum Negotiated {
    /// A startup message: the session starts.
    Startup { io: BoxedIo, tls: Option<TlsFacts>, minor: u16, params: Vec<(String, String)>, rest: BytesMut },
    /// A CancelRequest.
    Cancel { process_id: i32, secret_key: i32 },
}

/// Why a session ended early.
#[derive(Debug)]
enum End {
    /// The gate refused; the client was told with this message.
    Refused(Refusal),
    /// An error (I/O, the server's), for the connection event.
    Failed(Outcome, String),
}

impl End {
    fn failed(what: impl std::fmt::Display) -> End {
        End::Failed(Outcome::Error, what.to_string())
    }
}

/// The upstream session once logged in.
struct Upstream {
    io: BoxedIo,
    /// What the server sent after AuthenticationOk (ParameterStatus,
    /// notices, ReadyForQuery), to relay to the client.
    greeting: BytesMut,
    /// The server's BackendKeyData.
    key: Option<(i32, i32)>,
    /// The upstream leg's TLS, when it has one.
    tls: Option<TlsFacts>,
    /// How the gateway authenticated (`SCRAM-SHA-256-PLUS`, `md5`, ...).
    auth: &'static str,
    /// Bytes read past the greeting.
    rest: BytesMut,
}

impl Proxy {
    /// Serves a connection whose first bytes are a PostgreSQL startup
    /// packet, or (`direct`) a TLS ClientHello offering ALPN `postgresql`.
    pub(super) async fn serve_postgres(&self, conn: Intercepted, mut passage: Passage, direct: bool) -> Handled {
        let mut handled = Handled::new(Protocol::Postgres);
        let host = passage.destination_host(None);
        let negotiation = self.negotiate(conn.client, &host, direct);
        let negotiated = match tokio::time::timeout(HANDSHAKE_TIMEOUT * 2, negotiation).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return handled.failed(Outcome::Error, format!("PostgreSQL negotiation: {e}")),
            Err(_) => return handled.failed(Outcome::Error, "PostgreSQL negotiation timed out"),
        };
        match negotiated {
            Negotiated::Cancel { process_id, secret_key } => {
                self.forward_cancel(&passage, process_id, secret_key).await;
                handled
            }
            Negotiated::Startup { io, tls, minor, params, rest } => {
                let result = self.session(&mut passage, io, tls, minor, params, rest, &mut handled).await;
                let outcome = match result {
                    Ok(()) => SessionOutcome::Closed,
                    Err(End::Refused(refusal)) => {
                        handled = handled.refused(&refusal);
                        SessionOutcome::Refused
                    }
                    Err(End::Failed(outcome, error)) => {
                        if let Some(s) = passage.session() {
                            s.event(EventKind::Error, json!({ "error": error }));
                        }
                        handled = handled.failed(outcome, error);
                        SessionOutcome::Error
                    }
                };
                if passage.refused() > 0 && handled.outcome == Outcome::Closed {
                    handled.outcome = Outcome::Blocked;
                }
                passage.end_session(outcome, handled.bytes_up, handled.bytes_down);
                handled
            }
        }
    }

    /// Reads startup packets: TLS on SSLRequest (or at once, for a client
    /// that starts with TLS: `direct`), `N` to GSSENCRequest, until a
    /// StartupMessage or a CancelRequest.
    async fn negotiate(&self, client: tokio::net::TcpStream, host: &str, direct: bool) -> Result<Negotiated, String> {
        let mut plain = Some(client);
        let mut io: Option<BoxedIo> = None;
        let mut tls = None;
        let mut buf = BytesMut::with_capacity(1024);
        if direct {
            let (stream, facts) = self.accept_tls(plain.take(), host).await?;
            io = Some(stream);
            tls = Some(facts);
        }
        for _ in 0..MAX_NEGOTIATION_ROUNDS {
            let startup = loop {
                if let Some(s) = codec::decode_startup(&mut buf).map_err(|e| e.to_string())? {
                    break s;
                }
                let read = match (&mut io, &mut plain) {
                    (Some(io), _) => io.read_buf(&mut buf).await,
                    (None, Some(tcp)) => tcp.read_buf(&mut buf).await,
                    (None, None) => return Err("no connection".into()),
                };
                if read.map_err(|e| e.to_string())? == 0 {
                    return Err("the client closed during negotiation".into());
                }
            };
            match startup {
                Startup::Ssl | Startup::GssEnc if tls.is_some() => {
                    return Err("encryption requested again inside TLS".into());
                }
                // Bytes sent after the request but before the handshake
                // would be read as if they came over TLS (CVE-2021-23222).
                Startup::Ssl | Startup::GssEnc if !buf.is_empty() => {
                    return Err("bytes after an encryption request, before its answer".into());
                }
                Startup::Ssl => {
                    if let Some(tcp) = &mut plain {
                        tcp.write_all(b"S").await.map_err(|e| e.to_string())?;
                    }
                    let (stream, facts) = self.accept_tls(plain.take(), host).await?;
                    io = Some(stream);
                    tls = Some(facts);
                }
                Startup::GssEnc => {
                    if let Some(tcp) = &mut plain {
                        tcp.write_all(b"N").await.map_err(|e| e.to_string())?;
                    }
                }
                Startup::Cancel { process_id, secret_key } => return Ok(Negotiated::Cancel { process_id, secret_key }),
                Startup::Params { minor, params } => {
                    let io = match (io, plain) {
                        (Some(io), _) => io,
                        (None, Some(tcp)) => Box::new(tcp),
                        (None, None) => return Err("no connection".into()),
                    };
                    return Ok(Negotiated::Startup { io, tls, minor, params, rest: buf });
                }
            }
        }
        Err("too many negotiation rounds".into())
    }

    /// Terminates the client's TLS with a leaf for the name it asks for
    /// (its server name, else the destination's `host`), offering ALPN
    /// `postgresql` (PostgreSQL 17's direct TLS requires it).
    async fn accept_tls(
        &self,
        client: Option<tokio::net::TcpStream>,
        host: &str,
    ) -> Result<(BoxedIo, TlsFacts), String> {
        let client = client.ok_or("TLS requested twice")?;
        let hello = match tls::peek_client_hello(&client, HANDSHAKE_TIMEOUT).await {
            Ok(tls::Peeked::Tls(hello)) => hello,
            Ok(tls::Peeked::Plaintext) => return Err("no TLS ClientHello after the SSLRequest".into()),
            Err(e) => return Err(format!("malformed TLS ClientHello: {e}")),
        };
        let name = hello.sni.as_deref().unwrap_or(host);
        let config = self
            .services
            .leaf_cache
            .server_config(name, &[])
            .map_err(|e| format!("minting a certificate for {name}: {e}"))?;
        let mut config = (*config).clone();
        config.alpn_protocols = vec![ALPN.to_vec()];
        let stream = tokio_rustls::TlsAcceptor::from(Arc::new(config))
            .accept(client)
            .await
            .map_err(|e| format!("client TLS handshake: {e}"))?;
        let facts = tls_facts(stream.get_ref().1);
        Ok((Box::new(stream), facts))
    }

    /// Sends a client's CancelRequest to the upstream session its key
    /// stands for, if the key is one the gateway issued to this identity.
    async fn forward_cancel(&self, passage: &Passage, process_id: i32, secret_key: i32) {
        let identity = &passage.conn().caller.identity.uri;
        let Some(target) = self.pg_cancel.lookup(process_id, secret_key).filter(|t| &t.identity == identity) else {
            tracing::info!(
                conn_id = passage.conn().id,
                identity,
                "PostgreSQL cancel request with an unknown key ignored"
            );
            return;
        };
        let mut packet = BytesMut::new();
        codec::cancel_request(&mut packet, target.process_id, target.secret_key);
        let sent = async {
            let mut upstream = connect_upstream(
                target.dst,
                self.config.upstream_mark,
                self.config.connect_timeout,
                &self.services.gate.metrics,
            )
            .await?;
            upstream.write_all(&packet).await?;
            // The server answers by closing; wait for it so the cancel is
            // delivered before the client's connection ends.
            let mut sink = [0u8; 16];
            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, upstream.read(&mut sink)).await;
            std::io::Result::Ok(())
        };
        match sent.await {
            Ok(()) => {
                tracing::info!(conn_id = passage.conn().id, dst = %target.dst, "PostgreSQL cancel request forwarded")
            }
            Err(e) => {
                tracing::warn!(conn_id = passage.conn().id, error = %e, "forwarding a PostgreSQL cancel request failed")
            }
        }
    }

    /// One PostgreSQL session from its StartupMessage to its end.
    #[allow(clippy::too_many_arguments)]
    async fn session(
        &self,
        passage: &mut Passage,
        mut client: BoxedIo,
        tls: Option<TlsFacts>,
        minor: u16,
        mut params: Vec<(String, String)>,
        mut rest: BytesMut,
        handled: &mut Handled,
    ) -> Result<(), End> {
        let mut out = BytesMut::new();
        // Protocol 3.x options the gateway does not speak are declined the
        // way the server declines them, and never forwarded.
        let unknown: Vec<String> =
            params.iter().filter(|(k, _)| k.starts_with("_pq_.")).map(|(k, _)| k.clone()).collect();
        if minor > 0 || !unknown.is_empty() {
            let names: Vec<&str> = unknown.iter().map(String::as_str).collect();
            codec::negotiate_protocol_version(&mut out, &names);
            params.retain(|(k, _)| !k.starts_with("_pq_."));
        }
        let Some(user) = Startup::param(&params, "user").map(str::to_owned) else {
            return fatal(
                &mut client,
                out,
                SQLSTATE_INVALID_AUTHORIZATION,
                "no PostgreSQL user name specified in the startup packet",
            )
            .await;
        };
        let database = Startup::param(&params, "database").unwrap_or(&user).to_owned();
        let decision = match passage.postgres_connection(tls.clone(), &database, &user).await {
            Ok(d) => d,
            Err(refusal) => {
                let sqlstate = match refusal.reason {
                    Reason::RecordingUnavailable { .. } => SQLSTATE_CANNOT_CONNECT_NOW,
                    _ => SQLSTATE_INVALID_AUTHORIZATION,
                };
                codec::error_response(&mut out, Severity::Fatal, sqlstate, &refusal.message());
                let _ = send(&mut *client, &out).await;
                return Err(End::Refused(refusal));
            }
        };
        if let Some(replication) = Startup::param(&params, "replication") {
            if !matches!(replication.to_ascii_lowercase().as_str(), "false" | "off" | "no" | "0") {
                // Replication streams WAL, which the gateway cannot judge.
                let why = Uninspectable::Postgres { detail: "a replication connection".into() };
                let refusal = passage.refuse(Reason::Uninspectable(why), "uninspectable");
                codec::error_response(&mut out, Severity::Fatal, SQLSTATE_INVALID_AUTHORIZATION, &refusal.message());
                let _ = send(&mut *client, &out).await;
                return Err(End::Refused(refusal));
            }
        }

        // The password, in cleartext: the gateway must see it to judge it.
        codec::auth_cleartext(&mut out);
        send(&mut *client, &out).await.map_err(End::failed)?;
        out.clear();
        let frame =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut client, &mut rest, codec::MAX_PASSWORD_LEN))
                .await
            {
                Ok(Ok(Some(f))) => f,
                // A client without a password hangs up to ask its user for one.
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(e)) => return fatal(&mut client, out, SQLSTATE_PROTOCOL_VIOLATION, &e.to_string()).await,
                Err(_) => return Err(End::failed("the client sent no password in time")),
            };
        let password = match codec::password(&frame) {
            Ok(p) if !p.is_empty() => SecretString::new(String::from_utf8_lossy(&p).into_owned()),
            Ok(_) => return fatal(&mut client, out, SQLSTATE_INVALID_PASSWORD, "empty password").await,
            Err(e) => return fatal(&mut client, out, SQLSTATE_PROTOCOL_VIOLATION, &e.to_string()).await,
        };
        drop(frame);
        let (login_user, login_password) = match judge_password(passage, &decision, &user, &database, &password).await {
            Ok(Some((swapped_user, swapped_password))) => {
                (swapped_user.unwrap_or_else(|| SecretString::new(user.clone())), swapped_password)
            }
            Ok(None) => (SecretString::new(user.clone()), password),
            Err(refusal) => {
                codec::error_response(&mut out, Severity::Fatal, SQLSTATE_INVALID_PASSWORD, &refusal.message());
                let _ = send(&mut *client, &out).await;
                return Err(End::Refused(refusal));
            }
        };

        let upstream = match self.login_upstream(passage, &decision.host, &params, &login_user, &login_password).await {
            Ok(u) => u,
            Err(LoginError::Server(error)) => {
                // The server's own words (wrong password, no such database).
                let _ = send(&mut *client, &error).await;
                return Err(End::Failed(Outcome::UpstreamFailed, "the server refused the login".into()));
            }
            Err(LoginError::Other(outcome, e)) => {
                let text = format!("The CI gateway could not log in to the database server: {e}");
                codec::error_response(&mut out, Severity::Fatal, "08006", &text);
                let _ = send(&mut *client, &out).await;
                return Err(End::Failed(outcome, e));
            }
        };
        drop(login_password);
        if let Some(s) = passage.session() {
            s.event(
                EventKind::PostgresLogin,
                json!({
                    "user": user, "database": database,
                    "upstream_user_swapped": login_user.expose() != user,
                    "client_tls": tls, "upstream_tls": upstream.tls, "upstream_auth": upstream.auth,
                }),
            );
        }
        let Upstream { io: upstream_io, greeting, key, rest: upstream_rest, .. } = upstream;
        let issued = key.map(|(process_id, secret_key)| {
            self.pg_cancel.issue(CancelTarget {
                dst: passage.conn().dst,
                process_id,
                secret_key,
                identity: passage.conn().caller.identity.uri.clone(),
            })
        });
        codec::auth_ok(&mut out);
        if let Some(issued) = &issued {
            codec::backend_key_data(&mut out, issued.key.0, issued.key.1);
        }
        out.extend_from_slice(&greeting);
        send(&mut *client, &out).await.map_err(End::failed)?;

        let relay = Relay {
            passage,
            judged: Judged {
                host: decision.host.clone(),
                verified: BTreeMap::new(),
                static_keys: decision.static_keys,
            },
            database: database.clone(),
            user: user.clone(),
            tls: tls.is_some(),
            classified: Mutex::new(sql::Memo::default()),
            clean: Mutex::new(CleanTexts::default()),
            max_message: self.services.http_limits.max_buffered_body.min(self.services.gate.body_limits.max_decoded),
            pipeline: Mutex::new(VecDeque::new()),
            prepared: Mutex::new(Prepared::default()),
            rounds: passage.session().map(|_| Mutex::new(Rounds::default())),
            round_begun: tokio::sync::Notify::new(),
            watch_idle: AtomicBool::new(true),
        };
        let result = relay.run(client, rest, upstream_io, upstream_rest).await;
        handled.bytes_up = result.up;
        handled.bytes_down = result.down;
        handled.requests = Some(result.statements);
        drop(issued);
        result.end.map_or(Ok(()), Err)
    }

    /// Connects and logs in upstream as `user` with `password`, with TLS
    /// when the server accepts it.
    async fn login_upstream(
        &self,
        passage: &Passage,
        host: &str,
        params: &[(String, String)],
        user: &SecretString,
        password: &SecretString,
    ) -> Result<Upstream, LoginError> {
        let dst = passage.conn().dst;
        let other = |e: String| LoginError::Other(Outcome::UpstreamFailed, e);
        let mut tcp =
            connect_upstream(dst, self.config.upstream_mark, self.config.connect_timeout, &self.services.gate.metrics)
                .await
                .map_err(|e| other(format!("connecting to {dst}: {e}")))?;
        let mut ssl = BytesMut::new();
        ssl.put_u32(8);
        ssl.put_u32(codec::SSL_REQUEST);
        tcp.write_all(&ssl).await.map_err(|e| other(e.to_string()))?;
        let mut answer = [0u8; 1];
        tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.read_exact(&mut answer))
            .await
            .map_err(|_| other("the server did not answer the SSLRequest".into()))?
            .map_err(|e| other(format!("reading the server's SSL answer: {e}")))?;
        let (mut io, tls, binding): (BoxedIo, _, _) = match answer[0] {
            b'S' => {
                let stream =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, self.services.upstream_tls.connect(tcp, host, Vec::new()))
                        .await
                        .map_err(|_| other("the upstream TLS handshake timed out".into()))?
                        .map_err(|e| LoginError::Other(Outcome::UpstreamFailed, e.to_string()))?;
                let conn = stream.get_ref().1;
                let binding = conn.peer_certificates().and_then(|c| c.first()).and_then(|c| end_point_hash(c));
                let facts = tls_facts(conn);
                (Box::new(stream), Some(facts), binding)
            }
            b'N' => (Box::new(tcp), None, None),
            other_byte => return Err(other(format!("unexpected answer {other_byte:#04x} to the SSLRequest"))),
        };
        let mut startup = BytesMut::new();
        let forwarded = params
            .iter()
            .filter(|(k, _)| k != "user" && k != "replication")
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain([("user", user.expose())]);
        codec::startup_message(&mut startup, forwarded);
        send(&mut io, &startup).await.map_err(|e| other(e.to_string()))?;

        let mut buf = BytesMut::with_capacity(4096);
        let mut scram: Option<ScramSha256> = None;
        let mut auth = "trust";
        let mut out = BytesMut::new();
        // Authentication.
        loop {
            let frame = next_backend(&mut io, &mut buf).await.map_err(other)?;
            match frame.tag {
                b'R' => {}
                b'E' => return Err(LoginError::Server(raw(&frame))),
                b'v' | b'N' => continue,
                t => return Err(other(format!("unexpected message {:?} during authentication", t as char))),
            }
            let body = &frame.body;
            let code = body.get(..4).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            let data = body.get(4..).unwrap_or_default();
            out.clear();
            match code {
                Some(0) => break,
                Some(3) => {
                    postgres_protocol::message::frontend::password_message(password.expose().as_bytes(), &mut out)
                        .map_err(|e| other(e.to_string()))?
                }
                Some(5) => {
                    auth = "md5";
                    let salt: [u8; 4] = data.try_into().map_err(|_| other("malformed MD5 request".into()))?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        user.expose().as_bytes(),
                        password.expose().as_bytes(),
                        salt,
                    );
                    postgres_protocol::message::frontend::password_message(hash.as_bytes(), &mut out)
                        .map_err(|e| other(e.to_string()))?;
                }
                Some(10) => {
                    let mechanisms: Vec<&[u8]> = data.split(|&b| b == 0).filter(|m| !m.is_empty()).collect();
                    let plus = mechanisms.contains(&sasl::SCRAM_SHA_256_PLUS.as_bytes());
                    let (mechanism, binding) = match (&binding, plus) {
                        (Some(hash), true) => {
                            (sasl::SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(hash.clone()))
                        }
                        (Some(_), false) => (sasl::SCRAM_SHA_256, ChannelBinding::unrequested()),
                        (None, _) if tls.is_some() => (sasl::SCRAM_SHA_256, ChannelBinding::unrequested()),
                        (None, _) => (sasl::SCRAM_SHA_256, ChannelBinding::unsupported()),
                    };
                    if !mechanisms.contains(&mechanism.as_bytes()) {
                        return Err(other("the server offers no SASL mechanism the gateway speaks".into()));
                    }
                    auth = mechanism;
                    let s = ScramSha256::new(password.expose().as_bytes(), binding);
                    postgres_protocol::message::frontend::sasl_initial_response(mechanism, s.message(), &mut out)
                        .map_err(|e| other(e.to_string()))?;
                    scram = Some(s);
                }
                Some(11) => {
                    let s = scram.as_mut().ok_or_else(|| other("SASL continue without a start".into()))?;
                    s.update(data).map_err(|e| other(format!("SCRAM: {e}")))?;
                    postgres_protocol::message::frontend::sasl_response(s.message(), &mut out)
                        .map_err(|e| other(e.to_string()))?;
                }
                Some(12) => {
                    let s = scram.as_mut().ok_or_else(|| other("SASL final without a start".into()))?;
                    // Proves the server knew the password too.
                    s.finish(data).map_err(|e| other(format!("SCRAM server signature: {e}")))?;
                    continue;
                }
                other_code => {
                    return Err(other(format!("authentication method {other_code:?} is not supported by the gateway")));
                }
            }
            send(&mut io, &out).await.map_err(|e| other(e.to_string()))?;
        }
        // The server's greeting, up to its first ReadyForQuery.
        let mut greeting = BytesMut::new();
        let mut key = None;
        loop {
            let frame = next_backend(&mut io, &mut buf).await.map_err(other)?;
            match frame.tag {
                b'K' if frame.body.len() == 8 => {
                    let b = &frame.body;
                    key = Some((
                        i32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                        i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                    ));
                }
                b'K' => return Err(other("malformed BackendKeyData".into())),
                b'E' => return Err(LoginError::Server(raw(&frame))),
                b'S' | b'N' | b'v' => greeting.extend_from_slice(&raw(&frame)),
                b'Z' => {
                    greeting.extend_from_slice(&raw(&frame));
                    break;
                }
                t => return Err(other(format!("unexpected message {:?} after authentication", t as char))),
            }
        }
        Ok(Upstream { io, greeting, key, tls, auth, rest: buf })
    }
}

/// Why logging in upstream failed.
enum LoginError {
    /// The server said no: its ErrorResponse, for the client.
    Server(Bytes),
    /// Anything else.
    Other(Outcome, String),
}

/// Writes `bytes` and flushes them: a TLS stream keeps what it was given
/// until flushed.
async fn send<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

/// Tells the client why its session ends, and ends it.
async fn fatal(client: &mut BoxedIo, mut out: BytesMut, code: &str, text: &str) -> Result<(), End> {
    codec::error_response(&mut out, Severity::Fatal, code, text);
    let _ = send(&mut *client, &out).await;
    Err(End::failed(text))
}

/// The TLS parameters of a connection, for the recording.
fn tls_facts<D>(conn: &rustls::ConnectionCommon<D>) -> TlsFacts {
    TlsFacts {
        version: conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default(),
        cipher: conn.negotiated_cipher_suite().map(|c| format!("{:?}", c.suite())).unwrap_or_default(),
        alpn: conn.alpn_protocol().map(|a| String::from_utf8_lossy(a).into_owned()),
    }
}

/// The `tls-server-end-point` channel binding of a certificate (RFC 5929
/// §4.1): its hash with the signature's hash function, SHA-256 for MD5 and
/// SHA-1; `None` where that is undefined (EdDSA), so no binding is offered.
fn end_point_hash(cert: &[u8]) -> Option<Vec<u8>> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let oid = parsed.signature_algorithm.algorithm.to_id_string();
    match oid.as_str() {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Some(sha2::Sha384::digest(cert).to_vec()),
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Some(sha2::Sha512::digest(cert).to_vec()),
        // Ed25519, Ed448, RSASSA-PSS (hash in parameters): not bound.
        "1.3.101.112" | "1.3.101.113" | "1.2.840.113549.1.1.10" => None,
        _ => Some(sha2::Sha256::digest(cert).to_vec()),
    }
}

/// A frame as it goes on the wire.
fn raw(frame: &Frame) -> Bytes {
    let mut out = BytesMut::with_capacity(frame.body.len() + 5);
    out.put_u8(frame.tag);
    out.put_u32(frame.body.len() as u32 + 4);
    out.extend_from_slice(&frame.body);
    out.freeze()
}

/// Appends a frame as it goes on the wire.
fn put_frame(out: &mut BytesMut, frame: &Frame) {
    out.put_u8(frame.tag);
    out.put_u32(frame.body.len() as u32 + 4);
    out.extend_from_slice(&frame.body);
}

/// Reads one typed message (at most `max` long); `None` when the peer
/// closed between messages.
async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Frame>, CodecError> {
    loop {
        if let Some(frame) = codec::decode_frame(buf, max)? {
            return Ok(Some(frame));
        }
        match io.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) | Err(_) => {
                return Err(CodecError::Malformed { tag: "?".into(), detail: "the connection ended inside a message" })
            }
            Ok(_) => {}
        }
    }
}

/// One backend message during the upstream login.
async fn next_backend(io: &mut BoxedIo, buf: &mut BytesMut) -> Result<Frame, String> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(io, buf, MAX_PARSED_BACKEND))
        .await
        .map_err(|_| "the server did not answer in time".to_owned())?
        .map_err(|e| format!("from the server: {e}"))?
        .ok_or_else(|| "the server closed the connection".to_owned())
}

/// Turns the client's password into a finding and applies its action:
/// `Ok(Some(login))` when it is swapped for the credential the gateway
/// holds, `Ok(None)` when the job's own goes upstream, a refusal when it
/// is blocked (or a swap was due and could not be made).
async fn judge_password(
    passage: &Passage,
    decision: &ConnectionDecision,
    user: &str,
    database: &str,
    password: &SecretString,
) -> Result<Option<(Option<SecretString>, SecretString)>, Refusal> {
    let secret = Secret::new(password.expose().as_bytes());
    let detection = Detection {
        rule_id: Arc::from(PASSWORD_RULE),
        confidence: Confidence::High,
        start: 0,
        end: secret.len() as u64,
        secret,
    };
    let location = Location::PostgresPassword { user: user.to_owned(), database: database.to_owned() };
    let judged = Judged { host: decision.host.clone(), verified: BTreeMap::new(), static_keys: decision.static_keys };
    let mut login = None;
    let mut swap =
        |targets: &[SwapTarget], rendered: &RenderedInjection| match rendered {
            RenderedInjection::Login { user, password } if targets == [SwapTarget::PostgresPassword] => {
                login = Some((user.clone(), password.clone()));
                Ok(())
            }
            _ => Err("the credential held for this destination is no PostgreSQL login (`inject: {postgres: ...}`)"
                .to_owned()),
        };
    let judgement = passage.judge(&judged, vec![Hit { detection, location }], Some(&mut swap)).await;
    if let Some(refusal) = judgement.refusal {
        record_refusal(passage, &refusal, "static_keys");
        return Err(refusal);
    }
    if let Some(s) = passage.session() {
        s.event(EventKind::PostgresPassword, json!({ "findings": judgement.findings, "swapped": login.is_some() }));
    }
    Ok(login)
}

/// Records a refusal the gate already counted (a judged key).
fn record_refusal(passage: &Passage, refusal: &Refusal, rule: &str) {
    if let Some(s) = passage.session() {
        let mut detail = refusal.detail();
        detail["reason"] = json!(refusal.reason.code());
        detail["rule"] = json!(rule);
        s.event(EventKind::Refused, detail);
    }
}

/// What the statement judge says about one piece of SQL (or data).
enum Verdict {
    /// It may go upstream.
    Allow,
    /// It may not: the client gets this ErrorResponse in its results' place.
    Deny(Bytes),
}

/// What the server owes the client for a message sent upstream, in order:
/// the server side matches the server's answers to it.
enum Pending {
    /// A ReadyForQuery (for a Query, Sync or FunctionCall).
    Ready {
        /// An ErrorResponse for a refused statement, sent just before.
        error: Option<Bytes>,
        /// For a Query whose results are masked: its statements' masks.
        query: Option<QueryMasks>,
    },
    /// The client's Describe: its RowDescription or NoData is relayed.
    Describe,
    /// A Describe of a portal the gateway sent before a masked Execute: its
    /// answer is the gateway's, to learn the columns it masks.
    Learn(Arc<RowMask>),
    /// An Execute, its rows masked with this.
    Execute(Option<Arc<RowMask>>),
}

/// The result masks of a simple Query's statements, in order.
struct QueryMasks {
    masks: Vec<Option<Arc<RowMask>>>,
    /// The statement whose results come now.
    at: usize,
}

impl QueryMasks {
    /// The mask of the statement whose results come now. Past the
    /// statements the gateway classified (which the server's own grammar
    /// should never give), every mask of the query applies.
    fn current(&self) -> Option<Arc<RowMask>> {
        match self.masks.get(self.at) {
            Some(m) => m.clone(),
            None => RowMask::union(self.masks.iter().flatten().flat_map(|m| m.parts())).map(Arc::new),
        }
    }
}

/// Masks of the session's prepared statements and portals, by name.
#[derive(Default)]
struct Prepared {
    statements: HashMap<String, PreparedStatement>,
    portals: HashMap<String, Option<Arc<RowMask>>>,
    /// Every mask of a statement whose rows a later one returns (`PREPARE`,
    /// `DECLARE ... CURSOR`): applied to `EXECUTE`, `FETCH` and to portals
    /// the client did not Bind (cursors).
    deferred: Option<Arc<RowMask>>,
    /// The approval a `PREPARE` of this session needed: every `EXECUTE`
    /// after it needs one too (the gateway does not follow SQL-level
    /// statement names, so any `EXECUTE` may run it).
    execute_approval: Option<Arc<HeldStatement>>,
}

/// A statement the client Parsed (extended protocol).
#[derive(Default, Clone)]
struct PreparedStatement {
    /// How to mask its rows.
    mask: Option<Arc<RowMask>>,
    /// Held for approval at each Bind: one approval is one execution, and
    /// approvers see the values bound.
    approval: Option<Arc<HeldStatement>>,
}

/// A statement that needs approval each time it runs.
struct HeldStatement {
    /// The deciding rule and its approval settings.
    approval: (String, policy::ApprovalSpec),
    /// The text approvers see (masked when shown).
    text: String,
}

/// The masking of the result whose rows pass now.
struct Active {
    plan: RowPlan,
    counts: MaskCounts,
}

/// The relay of one logged-in session.
struct Relay<'a> {
    passage: &'a Passage,
    judged: Judged,
    /// The session's database and user, as its startup message named them.
    database: String,
    user: String,
    /// Whether the client's leg is TLS.
    tls: bool,
    /// Queries already classified in this session, by text and by shape
    /// (literals left out): drivers send the same statements again and
    /// again, with the same or new literals.
    classified: Mutex<sql::Memo>,
    /// Texts the detector found nothing in, and how the recording shows
    /// them (`postgres::clean`: why remembering them is sound).
    clean: Mutex<CleanTexts<Detector, Masker>>,
    max_message: usize,
    /// What the server owes for each message sent upstream that it
    /// answers (a ReadyForQuery per Query, Sync or FunctionCall; results of
    /// Describe and Execute), in order.
    pipeline: Mutex<VecDeque<Pending>>,
    /// Result masks of prepared statements and portals.
    prepared: Mutex<Prepared>,
    /// The round trips being recorded, one record each (`None`: the
    /// session is not recorded).
    rounds: Option<Mutex<Rounds>>,
    /// Wakes the watch for overdue round trips (`watch_rounds`) when one
    /// begins while it idles.
    round_begun: tokio::sync::Notify,
    /// Whether that watch idles (waits for `round_begun`).
    watch_idle: AtomicBool,
}

/// How the relay ended.
struct RelayEnd {
    up: u64,
    down: u64,
    statements: u64,
    end: Option<End>,
}

type Half = WriteHalf<BoxedIo>;

impl Relay<'_> {
    async fn run(
        &self,
        client: BoxedIo,
        client_rest: BytesMut,
        upstream: BoxedIo,
        upstream_rest: BytesMut,
    ) -> RelayEnd {
        let (client_read, mut client_write) = tokio::io::split(client);
        let (upstream_read, mut upstream_write) = tokio::io::split(upstream);
        let mut counts = (0u64, 0u64, 0u64);
        let end = {
            let up = self.client_side(client_read, client_rest, &mut upstream_write, &mut counts.0, &mut counts.2);
            let down = self.server_side(upstream_read, upstream_rest, &mut client_write, &mut counts.1);
            let watch = self.watch_rounds();
            tokio::pin!(up, down, watch);
            tokio::select! {
                // Never ends.
                () = &mut watch => None,
                r = &mut up => match r {
                    // The client is done: let the server's last answers out.
                    Ok(()) => {
                        let _ = tokio::time::timeout(Duration::from_secs(5), &mut down).await;
                        None
                    }
                    Err(end) => Some(end),
                },
                r = &mut down => r.err(),
            }
        };
        self.finish_rounds();
        if let Some(End::Refused(refusal)) = &end {
            let mut out = BytesMut::new();
            codec::error_response(&mut out, Severity::Fatal, SQLSTATE_PROTOCOL_VIOLATION, &refusal.message());
            let _ = send(&mut client_write, &out).await;
        }
        let _ = client_write.shutdown().await;
        let _ = upstream_write.shutdown().await;
        RelayEnd { up: counts.0, down: counts.1, statements: counts.2, end }
    }

    /// Client to server: every message parsed and judged before it goes.
    async fn client_side(
        &self,
        mut reader: ReadHalf<BoxedIo>,
        mut buf: BytesMut,
        upstream: &mut Half,
        bytes_up: &mut u64,
        statements: &mut u64,
    ) -> Result<(), End> {
        let mut out = BytesMut::new();
        // Set after a refused extended-protocol message: the batch is
        // dropped up to its Sync, then answered with this error.
        let mut discarding: Option<Bytes> = None;
        // Set after refused COPY data: the rest of the copy is dropped.
        let mut copy_refused = false;
        let mut copy_scan: Option<encoded::CopyScanner> = None;
        loop {
            let frame = match codec::decode_frame(&mut buf, self.max_message) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    if !out.is_empty() {
                        send(upstream, &out).await.map_err(End::failed)?;
                        *bytes_up += out.len() as u64;
                        out.clear();
                    }
                    match reader.read_buf(&mut buf).await {
                        Ok(0) if buf.is_empty() => {
                            // Gone without a Terminate: end the server's
                            // session the way the client should have.
                            let _ = send(upstream, TERMINATE).await;
                            return Ok(());
                        }
                        Ok(0) => return Err(self.refuse_message("the connection ended inside a message".into())),
                        Ok(_) => continue,
                        Err(e) => return Err(End::failed(e)),
                    }
                }
                Err(e) => return Err(self.refuse_message(e.to_string())),
            };
            let message = Frontend::parse(&frame).map_err(|e| self.refuse_message(e.to_string()))?;
            if let Some(error) = &discarding {
                if message == Frontend::Sync {
                    self.owe(Some(error.clone()));
                    codec::sync(&mut out);
                    discarding = None;
                }
                continue;
            }
            let copying = matches!(message, Frontend::CopyData(_) | Frontend::CopyDone | Frontend::CopyFail(_));
            if copy_refused {
                if copying {
                    continue;
                }
                copy_refused = false;
            }
            if !copying {
                copy_scan = None;
            }
            match &message {
                Frontend::Query { sql } | Frontend::Parse { sql, .. } => {
                    *statements += 1;
                    let kind = if matches!(message, Frontend::Query { .. }) { "query" } else { "parse" };
                    let (verdict, masks, held) = self.judge_statements(kind, sql).await;
                    match (verdict, kind) {
                        (Verdict::Allow, "query") => {
                            let query = masks.iter().any(Option::is_some).then_some(QueryMasks { masks, at: 0 });
                            self.expect(Pending::Ready { error: None, query });
                            put_frame(&mut out, &frame);
                        }
                        (Verdict::Allow, _) => {
                            if let Frontend::Parse { name, .. } = &message {
                                // One statement (the server refuses more):
                                // all the masks, to be sure.
                                let mask = RowMask::union(masks.iter().flatten().flat_map(|m| m.parts())).map(Arc::new);
                                let statement = PreparedStatement { mask, approval: held };
                                self.prepared().statements.insert(name.clone(), statement);
                            }
                            put_frame(&mut out, &frame);
                        }
                        (Verdict::Deny(error), "query") => {
                            self.owe(Some(error));
                            codec::sync(&mut out);
                        }
                        (Verdict::Deny(error), _) => discarding = Some(error),
                    }
                }
                Frontend::Bind { params, .. } | Frontend::FunctionCall { args: params, .. } => {
                    let call = matches!(message, Frontend::FunctionCall { .. });
                    let prefix = if call { "function-call" } else { "bind" };
                    let mut verdict = match self.scan_values(prefix, params) {
                        Ok(found) => {
                            self.record_values(prefix, params, Some(&found));
                            let hits = found.into_iter().flat_map(|k| k.hits).collect();
                            self.judge_keys(hits).await
                        }
                        Err(OverBudget) => {
                            self.record_values(prefix, params, None);
                            self.refuse_encodings("a parameter")
                        }
                    };
                    match (&verdict, &message) {
                        (Verdict::Allow, Frontend::FunctionCall { oid, .. }) => verdict = self.judge_call(*oid).await,
                        (Verdict::Allow, Frontend::Bind { statement, .. }) => {
                            let held = self.prepared().statements.get(statement).and_then(|s| s.approval.clone());
                            if let Some(held) = held {
                                verdict = self.approve_execution(&held, params).await;
                            }
                        }
                        _ => {}
                    }
                    match (verdict, call) {
                        (Verdict::Allow, true) => {
                            self.owe(None);
                            put_frame(&mut out, &frame);
                        }
                        (Verdict::Allow, false) => {
                            if let Frontend::Bind { portal, statement, .. } = &message {
                                let mut prepared = self.prepared();
                                // Every statement is Parsed through the
                                // gateway; one it did not see gets every
                                // deferred mask, to be sure.
                                let mask = match prepared.statements.get(statement) {
                                    Some(s) => s.mask.clone(),
                                    None => prepared.deferred.clone(),
                                };
                                prepared.portals.insert(portal.clone(), mask);
                            }
                            put_frame(&mut out, &frame)
                        }
                        (Verdict::Deny(error), true) => {
                            self.owe(Some(error));
                            codec::sync(&mut out);
                        }
                        (Verdict::Deny(error), false) => discarding = Some(error),
                    }
                }
                Frontend::CopyData(data) => {
                    let detector = &self.passage.gate().detector;
                    let scanner = copy_scan.get_or_insert_with(|| encoded::CopyScanner::new(detector));
                    let verdict = match scanner.feed(data) {
                        Ok(found) => self.judge_keys(copy_hits(found)).await,
                        Err(OverBudget) => self.refuse_encodings("the COPY data"),
                    };
                    match verdict {
                        Verdict::Allow => put_frame(&mut out, &frame),
                        Verdict::Deny(_) => {
                            // The server ends the COPY with its own error, and
                            // the session stays in step.
                            codec::copy_fail(&mut out, COPY_REFUSED);
                            copy_refused = true;
                        }
                    }
                }
                Frontend::CopyDone => {
                    if let Some(mut scanner) = copy_scan.take() {
                        let verdict = match scanner.finish() {
                            Ok(found) => self.judge_keys(copy_hits(found)).await,
                            Err(OverBudget) => self.refuse_encodings("the COPY data"),
                        };
                        if let Verdict::Deny(_) = verdict {
                            codec::copy_fail(&mut out, COPY_REFUSED);
                            continue;
                        }
                    }
                    put_frame(&mut out, &frame);
                }
                Frontend::Sync => {
                    self.owe(None);
                    put_frame(&mut out, &frame);
                }
                Frontend::Terminate => {
                    put_frame(&mut out, &frame);
                    send(upstream, &out).await.map_err(End::failed)?;
                    *bytes_up += out.len() as u64;
                    return Ok(());
                }
                Frontend::Execute { portal, .. } => {
                    let mask = {
                        let prepared = self.prepared();
                        // A portal not Bound here is a cursor (`DECLARE`).
                        match prepared.portals.get(portal) {
                            Some(m) => m.clone(),
                            None => prepared.deferred.clone(),
                        }
                    };
                    if let Some(mask) = &mask {
                        // The portal's columns and formats, for the gateway.
                        self.expect(Pending::Learn(Arc::clone(mask)));
                        codec::describe_portal(&mut out, portal);
                    }
                    self.expect(Pending::Execute(mask));
                    put_frame(&mut out, &frame);
                }
                Frontend::Describe(..) => {
                    self.expect(Pending::Describe);
                    put_frame(&mut out, &frame);
                }
                Frontend::Close(target, name) => {
                    let mut prepared = self.prepared();
                    match target {
                        Target::Statement => drop(prepared.statements.remove(name)),
                        Target::Portal => drop(prepared.portals.remove(name)),
                    }
                    drop(prepared);
                    put_frame(&mut out, &frame);
                }
                Frontend::Flush | Frontend::CopyFail(_) => put_frame(&mut out, &frame),
            }
        }
    }

    /// Server to client: relayed as it comes (large rows stream through),
    /// the gateway's errors put before the ReadyForQuery they belong to,
    /// rows of masked results rewritten one by one, results recorded.
    async fn server_side(
        &self,
        mut reader: ReadHalf<BoxedIo>,
        mut buf: BytesMut,
        client: &mut Half,
        bytes_down: &mut u64,
    ) -> Result<(), End> {
        let mut out = BytesMut::with_capacity(16 * 1024);
        // Bytes of a streamed message still to pass through.
        let mut streaming = 0usize;
        // The masking of the rows passing now.
        let mut active: Option<Active> = None;
        loop {
            loop {
                if streaming > 0 {
                    let n = streaming.min(buf.len());
                    if n == 0 {
                        break;
                    }
                    out.extend_from_slice(&buf.split_to(n));
                    streaming -= n;
                    continue;
                }
                let Some((tag, len)) = codec::header(&buf, MAX_BACKEND_MESSAGE)
                    .map_err(|e| End::failed(format!("from the server: {e}")))?
                else {
                    break;
                };
                let parsed = match tag {
                    b'Z' | b'C' | b'E' | b'K' | b'T' | b'n' | b'I' | b's' => true,
                    b'D' => match &active {
                        Some(a) => !a.plan.is_noop(),
                        None if self.masking_now() => {
                            return Err(End::failed("the server sent rows of a masked result before describing them"));
                        }
                        None => false,
                    },
                    b'H' | b'W' if active.as_ref().is_some_and(|a| !a.plan.is_noop()) || self.masking_now() => {
                        // Refused at the gate (COPY ... TO of masked data).
                        return Err(End::failed("the server started a COPY of masked results"));
                    }
                    _ => false,
                };
                if !parsed {
                    out.extend_from_slice(&buf.split_to(5));
                    streaming = len;
                    continue;
                }
                let cap = if tag == b'D' { self.max_message } else { MAX_PARSED_BACKEND };
                if len > cap {
                    return Err(End::failed(format!("the server sent a {:?} message of {len} bytes", tag as char)));
                }
                let Some(frame) = codec::decode_frame(&mut buf, cap).map_err(End::failed)? else {
                    break;
                };
                match frame.tag {
                    b'D' => {
                        if let Some(a) = &mut active {
                            a.plan
                                .mask_row(&frame.body, &mut out, &mut a.counts)
                                .map_err(|e| End::failed(format!("from the server: {e}")))?;
                        }
                    }
                    b'T' | b'n' => {
                        // Whose description this is: the gateway's own
                        // (a Describe it added), a masked Query statement's,
                        // or the client's.
                        let (mask, ours) = {
                            let mut pipeline = self.pipeline.lock().unwrap_or_else(PoisonError::into_inner);
                            match pipeline.front() {
                                Some(Pending::Learn(mask)) => {
                                    let mask = Arc::clone(mask);
                                    pipeline.pop_front();
                                    (Some(mask), true)
                                }
                                Some(Pending::Describe) => {
                                    pipeline.pop_front();
                                    (None, false)
                                }
                                Some(Pending::Ready { query: Some(q), .. }) => (q.current(), false),
                                _ => (None, false),
                            }
                        };
                        if let Some(mask) = mask {
                            let fields = match frame.tag {
                                b'T' => codec::row_description(&frame.body)
                                    .map_err(|e| End::failed(format!("from the server: {e}")))?,
                                _ => Vec::new(),
                            };
                            let plan = mask.plan(&fields).map_err(End::failed)?;
                            self.finish(active.replace(Active { plan, counts: MaskCounts::default() }));
                        }
                        if !ours {
                            put_frame(&mut out, &frame);
                        }
                    }
                    b'Z' => {
                        self.finish(active.take());
                        let owed = {
                            let mut pipeline = self.pipeline.lock().unwrap_or_else(PoisonError::into_inner);
                            loop {
                                match pipeline.pop_front() {
                                    Some(Pending::Ready { error, .. }) => break error,
                                    Some(_) => continue,
                                    None => break None,
                                }
                            }
                        };
                        if let Some(error) = owed {
                            out.extend_from_slice(&error);
                        }
                        // Recorded before the client learns it is done.
                        self.round_answered();
                        put_frame(&mut out, &frame);
                    }
                    b'C' | b'I' | b's' => {
                        self.finish(active.take());
                        {
                            let mut pipeline = self.pipeline.lock().unwrap_or_else(PoisonError::into_inner);
                            match pipeline.front_mut() {
                                Some(Pending::Execute(_)) => {
                                    pipeline.pop_front();
                                }
                                Some(Pending::Ready { query: Some(q), .. }) if frame.tag != b's' => q.at += 1,
                                _ => {}
                            }
                        }
                        if frame.tag == b'C' && self.rounds.is_some() {
                            self.record_result(rounds::tag_result(codec::command_tag(&frame.body)));
                        }
                        put_frame(&mut out, &frame);
                    }
                    b'E' => {
                        self.finish(active.take());
                        {
                            // The server skips the rest of an extended batch.
                            let mut pipeline = self.pipeline.lock().unwrap_or_else(PoisonError::into_inner);
                            while matches!(
                                pipeline.front(),
                                Some(Pending::Execute(_) | Pending::Describe | Pending::Learn(_))
                            ) {
                                pipeline.pop_front();
                            }
                        }
                        if self.rounds.is_some() {
                            let (sqlstate, text) = codec::error_fields(&frame.body);
                            let masker = self.passage.gate().recording_masker();
                            let message = text.map(|t| masker.mask_text(&t).into_owned());
                            self.record_result(PostgresResult { sqlstate, message, ..PostgresResult::default() });
                        }
                        put_frame(&mut out, &frame);
                    }
                    // The client has the gateway's key; the server's stays here.
                    _ => {}
                }
            }
            if !out.is_empty() {
                send(&mut *client, &out).await.map_err(End::failed)?;
                *bytes_down += out.len() as u64;
                out.clear();
            }
            if out.capacity() > 1 << 20 {
                out = BytesMut::with_capacity(16 * 1024);
            }
            match reader.read_buf(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(End::failed(e)),
            }
        }
    }

    /// Whether the result the server answers now is masked (its rows must
    /// not pass before its description).
    fn masking_now(&self) -> bool {
        match self.pipeline.lock().unwrap_or_else(PoisonError::into_inner).front() {
            Some(Pending::Execute(Some(_)) | Pending::Learn(_)) => true,
            Some(Pending::Ready { query: Some(q), .. }) => q.current().is_some(),
            _ => false,
        }
    }

    /// Records what a result's masking replaced (counts, never values).
    fn finish(&self, active: Option<Active>) {
        let Some(Active { counts, .. }) = active else { return };
        if !counts.any() {
            return;
        }
        if let Some(s) = self.passage.session() {
            s.event(
                EventKind::Masked,
                json!({
                    "stream": "postgres_rows", "rows": counts.rows, "columns": counts.columns,
                    "nulled": counts.nulled, "count": counts.rules.values().sum::<u64>(), "rules": counts.rules,
                }),
            );
        }
    }

    /// Notes a ReadyForQuery the server will send, before what asks for it
    /// goes upstream.
    fn owe(&self, error: Option<Bytes>) {
        self.expect(Pending::Ready { error, query: None });
    }

    /// Notes an answer the server will send, before what asks for it goes
    /// upstream.
    fn expect(&self, pending: Pending) {
        if matches!(pending, Pending::Ready { .. }) {
            self.round_sent();
        }
        self.pipeline.lock().unwrap_or_else(PoisonError::into_inner).push_back(pending);
    }

    fn prepared(&self) -> std::sync::MutexGuard<'_, Prepared> {
        self.prepared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A message the handler cannot understand: refused, and the session ends.
    fn refuse_message(&self, detail: String) -> End {
        let why = Uninspectable::Postgres { detail };
        End::Refused(self.passage.refuse(Reason::Uninspectable(why), "uninspectable"))
    }

    /// The keys in each value, in every encoding `postgres::encoded`
    /// knows (values without any left out).
    fn scan_values(&self, prefix: &str, values: &[Value]) -> Result<Vec<ValueKeys>, OverBudget> {
        let detector = &self.passage.gate().detector;
        let mut out = Vec::new();
        for (i, value) in values.iter().enumerate() {
            if let Value::Bytes(bytes) = value {
                let found = views::find_all(detector, bytes)?;
                if found.is_empty() {
                    continue;
                }
                let location = Location::Postgres(format!("{prefix}:${}", i + 1));
                let hits =
                    found.iter().map(|f| Hit { detection: f.detection.clone(), location: location.clone() }).collect();
                out.push(ValueKeys { index: i, found, hits });
            }
        }
        Ok(out)
    }

    /// Records a Bind's or FunctionCall's values, masked from their scan
    /// (`found`, by index); `None`: the scan was cut short, every value is
    /// withheld.
    fn record_values(&self, prefix: &str, values: &[Value], found: Option<&[ValueKeys]>) {
        if self.rounds.is_none() {
            return;
        }
        let detector = &self.passage.gate().detector;
        let masker = self.passage.gate().recording_masker();
        let shown = values
            .iter()
            .enumerate()
            .map(|(i, v)| match (v, found) {
                (Value::Null, _) => None,
                (Value::Bytes(_), None) => Some("[MASKED:too-many-encodings]".to_owned()),
                (Value::Bytes(b), Some(found)) => {
                    let kept = &b[..b.len().min(RECORDED_TEXT)];
                    let ranges = found.iter().find(|k| k.index == i).map_or(&[][..], |k| k.found.as_slice());
                    Some(String::from_utf8_lossy(&masker.mask_scanned(detector, kept, ranges)).into_owned())
                }
            })
            .collect();
        self.record_message(PostgresMessage {
            kind: prefix.to_owned(),
            params: Some(shown),
            ..PostgresMessage::default()
        });
    }

    /// A message holding more nested encodings than the gateway decodes
    /// within bounds: what it hides is unknown, so it is refused.
    fn refuse_encodings(&self, what: &str) -> Verdict {
        let detail = format!("{what} holds more nested encodings than the gateway decodes");
        let refusal = self.passage.refuse(Reason::Uninspectable(Uninspectable::Postgres { detail }), "uninspectable");
        record_refusal(self.passage, &refusal, "uninspectable");
        Verdict::Deny(error_bytes(&refusal.message()))
    }

    /// Records a statement refused unread (its text withheld).
    fn record_refused_text(&self, kind: &str, sql: &str) {
        if self.rounds.is_none() {
            return;
        }
        self.record_message(PostgresMessage {
            decision: Some("deny".to_owned()),
            kind: kind.to_owned(),
            sql: Some(format!("[MASKED:too-many-encodings] ({} bytes)", sql.len())),
            ..PostgresMessage::default()
        });
    }

    /// A client message joins the round trip being recorded.
    fn record_message(&self, message: PostgresMessage) {
        let Some(rounds) = &self.rounds else { return };
        let full = rounds.lock().unwrap_or_else(PoisonError::into_inner).message(message);
        if let Some(exchange) = full {
            self.write_round(exchange);
        }
        // Cheap when the watch is already running: one atomic load.
        if self.watch_idle.load(Ordering::SeqCst) && self.watch_idle.swap(false, Ordering::SeqCst) {
            self.round_begun.notify_one();
        }
    }

    /// A command tag or error of the server's joins its round trip.
    fn record_result(&self, result: PostgresResult) {
        if let Some(rounds) = &self.rounds {
            rounds.lock().unwrap_or_else(PoisonError::into_inner).result(result);
        }
    }

    /// The client sent what the server answers with ReadyForQuery.
    fn round_sent(&self) {
        if let Some(rounds) = &self.rounds {
            rounds.lock().unwrap_or_else(PoisonError::into_inner).close();
        }
    }

    /// The server's ReadyForQuery: its round trip's record is written.
    fn round_answered(&self) {
        let Some(rounds) = &self.rounds else { return };
        let done = rounds.lock().unwrap_or_else(PoisonError::into_inner).ready();
        if let Some(exchange) = done {
            self.write_round(exchange);
        }
    }

    /// The session ended: what is left of its round trips is written.
    fn finish_rounds(&self) {
        let Some(rounds) = &self.rounds else { return };
        let left = rounds.lock().unwrap_or_else(PoisonError::into_inner).finish();
        for exchange in left {
            self.write_round(exchange);
        }
    }

    fn write_round(&self, exchange: PostgresExchange) {
        if let Some(s) = self.passage.session() {
            s.postgres(exchange);
        }
    }

    /// Writes round trips the server has not answered within
    /// [`rounds::OVERDUE`] (see `postgres::rounds`). Idles while no round
    /// trip waits, so an idle session costs no timer; never returns.
    async fn watch_rounds(&self) {
        let Some(rounds) = &self.rounds else { return std::future::pending().await };
        loop {
            self.round_begun.notified().await;
            loop {
                tokio::time::sleep(rounds::OVERDUE).await;
                let (overdue, waiting) = {
                    let mut rounds = rounds.lock().unwrap_or_else(PoisonError::into_inner);
                    (rounds.overdue(Instant::now(), rounds::OVERDUE), rounds.waiting())
                };
                for exchange in overdue {
                    self.write_round(exchange);
                }
                if waiting {
                    continue;
                }
                self.watch_idle.store(true, Ordering::SeqCst);
                // A round trip that began since `waiting` was read, whose
                // sender saw the watch running: keep watching.
                let begun = rounds.lock().unwrap_or_else(PoisonError::into_inner).waiting();
                if !(begun && self.watch_idle.swap(false, Ordering::SeqCst)) {
                    break;
                }
            }
        }
    }

    async fn judge_keys(&self, hits: Vec<Hit>) -> Verdict {
        judge_keys(self.passage, &self.judged, hits).await
    }
}

/// Judges the keys found in a message: each is a finding; a blocking one
/// denies the message with an ErrorResponse naming the findings.
async fn judge_keys(passage: &Passage, judged: &Judged, hits: Vec<Hit>) -> Verdict {
    if hits.is_empty() {
        return Verdict::Allow;
    }
    let judgement = passage.judge(judged, hits, None).await;
    match judgement.refusal {
        Some(refusal) => {
            record_refusal(passage, &refusal, "static_keys");
            Verdict::Deny(error_bytes(&refusal.message()))
        }
        None => Verdict::Allow,
    }
}

/// The keys found in one parameter value.
struct ValueKeys {
    /// The value's position (0-based).
    index: usize,
    /// Where in the value, for its recording.
    found: Vec<Found>,
    /// The same keys as the gate's hits.
    hits: Vec<Hit>,
}

/// What the server is told when the gateway ends a COPY.
const COPY_REFUSED: &str = "refused by the CI gateway: the data carries a hard-coded credential";

/// A COPY's detections as the gate's hits.
fn copy_hits(found: Vec<Detection>) -> Vec<Hit> {
    found.into_iter().map(|detection| Hit { detection, location: Location::Postgres("copy".into()) }).collect()
}

fn error_bytes(text: &str) -> Bytes {
    error_bytes_with(SQLSTATE_REFUSED, text)
}

/// When a statement that needs approval is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Approve {
    /// Before it goes upstream (a simple Query, a function call).
    Now,
    /// At each Bind of it (a Parse, which runs nothing).
    EachBind,
}

/// The policy's verdict on a query, its deciding rule, its statements'
/// result masks and, for [`Approve::EachBind`], what each Bind is held for.
type Judgement = (Verdict, String, Vec<Option<Arc<RowMask>>>, Option<Arc<HeldStatement>>);

fn error_bytes_with(sqlstate: &str, text: &str) -> Bytes {
    let mut out = BytesMut::new();
    codec::error_response(&mut out, Severity::Error, sqlstate, text);
    out.freeze()
}

impl Relay<'_> {
    /// Judges every piece of SQL a client sends (a simple Query, or a
    /// Parse) before it goes upstream, and records it: keys in the text are
    /// findings (a blocking one denies), then each statement, classified
    /// with PostgreSQL's own grammar, is judged by the policy's
    /// `protocol: postgres` rules at the gate, held for approval where a
    /// rule says so. A query the parser cannot classify is refused unless a
    /// rule allows `unknown`. With an allowing verdict come the result
    /// masks of the statements, in order, and for a Parse whose statement
    /// needs approval what to hold each Bind of it for (a Parse runs
    /// nothing; approvers decide on each execution, with its values).
    async fn judge_statements(
        &self,
        kind: &str,
        sql: &str,
    ) -> (Verdict, Vec<Option<Arc<RowMask>>>, Option<Arc<HeldStatement>>) {
        let passage = self.passage;
        let detector = &passage.gate().detector;
        let masker = passage.gate().recording_masker();
        let known = self.clean.lock().unwrap_or_else(PoisonError::into_inner).get(detector, masker, sql);
        let found: Vec<Found> = match known {
            // The same text, the same detector: nothing to find again.
            Known::Clean(_) => Vec::new(),
            Known::Unknown => match encoded::find_in_sql(detector, sql) {
                Ok(found) => found,
                Err(OverBudget) => {
                    let verdict = self.refuse_encodings("the SQL text");
                    self.record_refused_text(kind, sql);
                    return (verdict, Vec::new(), None);
                }
            },
        };
        let location = Location::Postgres(kind.to_owned());
        let hits: Vec<Hit> =
            found.iter().map(|f| Hit { detection: f.detection.clone(), location: location.clone() }).collect();
        let found_keys = hits.len();
        let mut verdict = judge_keys(passage, &self.judged, hits).await;
        let mut rule = None;
        let mut masks = Vec::new();
        let mut held = None;
        if matches!(verdict, Verdict::Allow) {
            let when = if kind == "parse" { Approve::EachBind } else { Approve::Now };
            let (v, r, m, h) = self.judge_policy(sql, when).await;
            verdict = v;
            rule = Some(r);
            masks = m;
            held = h;
        }
        let recorded = match &self.rounds {
            Some(_) => {
                let shown: Arc<str> = match &known {
                    Known::Clean(Some(shown)) => Arc::clone(shown),
                    _ => {
                        let text = &sql[..floor_char_boundary(sql, RECORDED_TEXT)];
                        // Scan once: the recording masks what the gate found.
                        Arc::from(String::from_utf8_lossy(&masker.mask_scanned(detector, text.as_bytes(), &found)))
                    }
                };
                let decision = match verdict {
                    Verdict::Allow => "allow",
                    Verdict::Deny(_) => "deny",
                };
                self.record_message(PostgresMessage {
                    decision: Some(decision.to_owned()),
                    keys: Some(found_keys as u64),
                    kind: kind.to_owned(),
                    masked: Some(masks.iter().any(Option::is_some)),
                    params: None,
                    rule,
                    sql: Some(shown.to_string()),
                });
                Some(shown)
            }
            None => None,
        };
        let learned = match known {
            Known::Unknown => found_keys == 0,
            // Masked now for the first time.
            Known::Clean(None) => recorded.is_some(),
            Known::Clean(Some(_)) => false,
        };
        // A whole text scanned clean (the recorded form is all of it: the
        // memory keeps no text longer than RECORDED_TEXT).
        if learned && sql.len() <= RECORDED_TEXT {
            self.clean.lock().unwrap_or_else(PoisonError::into_inner).remember(detector, masker, sql, recorded);
        }
        (verdict, masks, held)
    }

    /// `sql` classified, from the session's memory when it was seen before.
    fn classify(&self, sql: &str) -> Arc<sql::Classified> {
        self.classified.lock().unwrap_or_else(|p| p.into_inner()).classify(sql)
    }

    /// The policy's verdict on `sql`'s statements, the deciding rule and the
    /// statements' result masks.
    async fn judge_policy(&self, sql: &str, when: Approve) -> Judgement {
        let classified = self.classify(sql);
        self.judge_parsed(classified.as_ref().as_deref(), sql, when).await
    }

    /// The policy's verdict on a fastpath FunctionCall, which runs a
    /// function without any SQL: judged as a statement of kind `call` that
    /// names no relation, so a policy that does not allow calls refuses it.
    async fn judge_call(&self, oid: u32) -> Verdict {
        let call = [sql::Statement {
            kind: sql::StatementKind::Call,
            relations: Vec::new(),
            has_where: None,
            span: 0..0,
            inner: Vec::new(),
            columns: Default::default(),
        }];
        let (verdict, rule, masks, _) =
            self.judge_parsed(Ok(&call), &format!("-- FunctionCall, function oid {oid}"), Approve::Now).await;
        if masks.iter().any(Option::is_some) {
            // A function's result names no column: nothing to mask it by.
            let reason = Reason::Uninspectable(Uninspectable::Postgres {
                detail: "the policy masks this function call's result, which has no columns to mask".into(),
            });
            let refusal = self.passage.refuse(reason, &rule);
            return Verdict::Deny(error_bytes(&refusal.message()));
        }
        verdict
    }

    /// The policy's verdict on `statements` (classified from `text`, which
    /// approvers see masked), the deciding rule, and (allowed) the
    /// statements' result masks.
    async fn judge_parsed(
        &self,
        statements: Result<&[sql::Statement], &sql::SqlError>,
        text: &str,
        when: Approve,
    ) -> Judgement {
        let passage = self.passage;
        let ask = StatementAsk {
            host: &self.judged.host,
            tls: self.tls,
            database: &self.database,
            user: &self.user,
            statements,
        };
        let decision = match passage.statements(ask) {
            Ok(d) => d,
            Err((reason, rule)) => {
                let sqlstate = match &reason {
                    Reason::UnclassifiedStatement { syntax_error: Some(_) } => SQLSTATE_SYNTAX_ERROR,
                    Reason::RecordingUnavailable { .. } => SQLSTATE_INSUFFICIENT_RESOURCES,
                    _ => SQLSTATE_REFUSED,
                };
                let refusal = passage.refuse(reason, &rule);
                return (Verdict::Deny(error_bytes_with(sqlstate, &refusal.message())), rule, Vec::new(), None);
            }
        };
        let rule = decision.decided.rule.clone();
        let masks = match self.result_masks(&decision.statements) {
            Ok(m) => m,
            Err(detail) => {
                let refusal = passage.refuse(Reason::Uninspectable(Uninspectable::Postgres { detail }), &rule);
                return (Verdict::Deny(error_bytes(&refusal.message())), rule, Vec::new(), None);
            }
        };
        let has = |kind: sql::StatementKind| decision.statements.iter().any(|v| v.kind == kind);
        let held = match &decision.approval {
            Some(approval) => Some(Arc::new(HeldStatement { approval: approval.clone(), text: text.to_owned() })),
            // A PREPAREd statement that needed approval runs again with each
            // EXECUTE: each is held as the PREPARE was.
            None if has(sql::StatementKind::Execute) => self.prepared().execute_approval.clone().map(|prepared| {
                let text = format!("{text}\n-- may run what was prepared as: {}", prepared.text);
                Arc::new(HeldStatement { approval: prepared.approval.clone(), text })
            }),
            None => None,
        };
        let Some(held) = held else { return (Verdict::Allow, rule, masks, None) };
        if when == Approve::EachBind {
            return (Verdict::Allow, rule, masks, Some(held));
        }
        match passage.approve_statement(&ask, &held.approval, &held.text, &[]).await {
            Ok(()) => {
                if decision.approval.is_some() && has(sql::StatementKind::Prepare) {
                    let mut prepared = self.prepared();
                    // The statement needing the most approvers decides.
                    let stricter = prepared
                        .execute_approval
                        .as_ref()
                        .is_none_or(|p| p.approval.1.min_approvals < held.approval.1.min_approvals);
                    if stricter {
                        prepared.execute_approval = Some(Arc::clone(&held));
                    }
                }
                (Verdict::Allow, rule, masks, None)
            }
            Err(refusal) => (Verdict::Deny(error_bytes(&refusal.message())), rule, Vec::new(), None),
        }
    }

    /// Holds one execution of a Parsed statement that needs approval (its
    /// Bind) until approvers decide on it and the values bound.
    async fn approve_execution(&self, held: &HeldStatement, params: &[Value]) -> Verdict {
        let ask = StatementAsk {
            host: &self.judged.host,
            tls: self.tls,
            database: &self.database,
            user: &self.user,
            statements: Ok(&[]),
        };
        let values: Vec<Option<&[u8]>> = params
            .iter()
            .map(|v| match v {
                Value::Bytes(b) => Some(&b[..]),
                Value::Null => None,
            })
            .collect();
        match self.passage.approve_statement(&ask, &held.approval, &held.text, &values).await {
            Ok(()) => Verdict::Allow,
            Err(refusal) => Verdict::Deny(error_bytes(&refusal.message())),
        }
    }

    /// The result mask of each statement: its own, and for a statement that
    /// returns rows another one selected (`EXECUTE`, `FETCH`) every mask of
    /// the statements and cursors it may run (`PREPARE`, `DECLARE`), which
    /// the session keeps. `Err`: the rows could not be masked (`COPY ... TO`,
    /// whose data the gateway does not mask; a masker that did not compile).
    fn result_masks(&self, verdicts: &[StatementVerdict]) -> Result<Vec<Option<Arc<RowMask>>>, String> {
        let mut masks = Vec::with_capacity(verdicts.len());
        for v in verdicts {
            let own = v.mask.clone().map(Arc::new);
            if let Some(mask) = &own {
                if let sql::StatementKind::Copy { direction: sql::CopyDirection::To, .. } = v.kind {
                    return Err("the policy masks this COPY's data, which the gateway does not mask; \
                                SELECT the rows instead"
                        .into());
                }
                if let Some(e) = RowMask::union([Arc::clone(mask)]).and_then(|m| m.unusable()) {
                    return Err(format!("the policy's mask for these results cannot be applied: {e}"));
                }
            }
            let mut prepared = self.prepared();
            let mask = match v.kind {
                sql::StatementKind::Prepare | sql::StatementKind::Cursor | sql::StatementKind::Execute => {
                    if let Some(mask) = &own {
                        let parts = prepared.deferred.iter().flat_map(|d| d.parts()).chain([Arc::clone(mask)]);
                        prepared.deferred = RowMask::union(parts.collect::<Vec<_>>()).map(Arc::new);
                    }
                    let parts = prepared.deferred.iter().flat_map(|d| d.parts()).chain(own);
                    RowMask::union(parts.collect::<Vec<_>>()).map(Arc::new)
                }
                _ => own.and_then(|m| RowMask::union([m])).map(Arc::new),
            };
            masks.push(mask);
        }
        Ok(masks)
    }
}

fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    (0..=max).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
}
