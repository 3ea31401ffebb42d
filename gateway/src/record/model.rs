//! The recording data model: what the proxy hands over, what each record's
//! JSON holds, and what the store returns.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::process::ProcessSnapshot;

/// Identifier of a session: `<unix milliseconds, 12 hex>-<48 random bits, 12
/// hex>`. Unique across restarts, and sorting ids sorts sessions by start
/// time (to the millisecond). Cheap to clone: every record of a session
/// carries it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(Arc<str>);

impl Serialize for SessionId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(SessionId::from_stored)
    }
}

impl SessionId {
    /// A fresh id for a session starting at `at`.
    pub fn generate(at: SystemTime) -> SessionId {
        let ms = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis()) & 0xffff_ffff_ffff;
        let random = rand::random::<u64>() & 0xffff_ffff_ffff;
        SessionId(format!("{ms:012x}-{random:012x}").into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Wraps an id read from the database.
    pub(crate) fn from_stored(id: String) -> SessionId {
        SessionId(id.into())
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The negotiated TLS parameters of the client side of a session (fields in
/// sorted order, see [`SessionMeta`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFacts {
    /// Negotiated ALPN protocol, if any.
    pub alpn: Option<String>,
    /// Cipher suite (`TLS13_AES_128_GCM_SHA256`).
    pub cipher: String,
    /// Protocol version (`TLSv1.3`).
    pub version: String,
}

/// What the proxy knows when a connection is intercepted.
#[derive(Debug, Clone)]
pub struct SessionStart {
    /// The proxy's connection number (for correlating with logs).
    pub conn_id: u64,
    /// Identity URI the process is pinned to (empty when unattributed).
    pub identity: String,
    /// Labels of that identity.
    pub identity_labels: BTreeMap<String, String>,
    /// The process that connected.
    pub process: ProcessSnapshot,
    /// Destination host name (SNI, Host or the address).
    pub host: String,
    /// The original destination the connection was redirected from.
    pub orig_dst: SocketAddr,
    /// Server name the client sent, for TLS.
    pub sni: Option<String>,
    /// TLS parameters; `None` for plaintext or passed-through connections.
    pub tls: Option<TlsFacts>,
    /// How the proxy handles it (`https`, `http`, `tcp`, `tls-passthrough`...).
    pub protocol: crate::event::Protocol,
}

/// The data of a session's first record (seq 0), mirrored in the sessions
/// table for listing. Fields are in sorted order: the writer serializes it
/// as canonical JSON directly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMeta {
    /// The proxy's connection number.
    pub conn_id: u64,
    /// Destination host.
    pub host: String,
    /// Identity URI.
    pub identity: String,
    /// Identity labels.
    pub identity_labels: BTreeMap<String, String>,
    /// Original destination, `addr:port`.
    pub orig_dst: String,
    /// The process that connected.
    pub process: ProcessSnapshot,
    /// Protocol spoken.
    pub protocol: String,
    /// The session this record starts.
    pub session: SessionId,
    /// TLS server name.
    pub sni: Option<String>,
    /// Start, Unix nanoseconds.
    pub started: i64,
    /// TLS parameters (absent for plaintext).
    pub tls: Option<TlsFacts>,
}

/// How a connection ended (the data of an `end` record; fields in sorted
/// order, see [`SessionMeta`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEnd {
    /// Bytes from the upstream to the client.
    pub bytes_down: u64,
    /// Bytes from the client to the upstream.
    pub bytes_up: u64,
    /// A [`SessionOutcome`] name (`closed`, `refused`, `dropped`, ...), as
    /// stored: text, so that outcomes of older versions still read.
    pub outcome: String,
}

/// How much of one exchange is recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordLevel {
    /// Everything, headers and (capped) bodies included.
    #[default]
    Full,
    /// Request line, status, sizes, timing, decision; no headers, no bodies.
    Metadata,
    /// Nothing: the exchange is not recorded (the session still is).
    None,
}

impl RecordLevel {
    /// The stored name (as serde writes it).
    pub const fn as_str(self) -> &'static str {
        match self {
            RecordLevel::Full => "full",
            RecordLevel::Metadata => "metadata",
            RecordLevel::None => "none",
        }
    }
}

/// The policy decision taken for an exchange.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionFacts {
    /// Name of the rule that decided.
    pub rule: String,
    /// What it decided (`allow`, `deny`, `approve`...).
    pub action: String,
}

/// One HTTP (or gRPC/Connect) exchange, as the proxy hands it over. Headers
/// and bodies must already be masked; headers are redacted once more (see
/// [`redact_header_pairs`](super::redact_header_pairs)) before storage.
#[derive(Debug, Clone)]
pub struct ExchangeRecord {
    /// How much of it to keep.
    pub level: RecordLevel,
    /// Stream number within the connection (request number for HTTP/1).
    pub stream: u64,
    /// When the request started.
    pub started: SystemTime,
    /// Until the response ended (or the exchange failed).
    pub duration: Duration,
    /// Request method.
    pub method: String,
    /// Path and query, already redacted.
    pub url: String,
    /// Response status (0 when there was no response).
    pub status: u16,
    /// How the exchange ended (stored by its name: `forwarded`, `blocked`,
    /// `upstream_failed`, ...).
    pub outcome: crate::http::ExchangeOutcome,
    /// gRPC / Connect method (`/pkg.Service/Method`).
    pub rpc: Option<String>,
    /// Request headers, redacted.
    pub request_headers: Vec<(String, String)>,
    /// Request body as seen (possibly already shortened), masked.
    pub request_body: Bytes,
    /// Full size of the request body.
    pub request_body_size: u64,
    /// Response headers, redacted.
    pub response_headers: Vec<(String, String)>,
    /// Response body as seen (possibly already shortened), masked.
    pub response_body: Bytes,
    /// Full size of the response body.
    pub response_body_size: u64,
    /// Policy decision, if policy ran.
    pub decision: Option<DecisionFacts>,
    /// Finding ids raised by this exchange (`F-12`).
    pub findings: Vec<String>,
}

/// The data of an `exchange` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangeData {
    /// [`RecordLevel::Full`] or [`RecordLevel::Metadata`].
    pub level: RecordLevel,
    /// Stream number.
    pub stream: u64,
    /// Request start, Unix nanoseconds.
    pub started: i64,
    /// Duration, nanoseconds.
    pub duration_ns: u64,
    /// Request method.
    pub method: String,
    /// Path and query.
    pub url: String,
    /// Response status.
    pub status: u16,
    /// Outcome.
    pub outcome: String,
    /// gRPC / Connect method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpc: Option<String>,
    /// The request.
    pub request: MessageData,
    /// The response.
    pub response: MessageData,
    /// Policy decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<DecisionFacts>,
    /// Finding ids.
    #[serde(default)]
    pub findings: Vec<String>,
}

/// One PostgreSQL round trip as the proxy hands it over: what the client
/// sent up to the message the server answers with ReadyForQuery (a simple
/// Query, or an extended-protocol batch up to its Sync), the gate's
/// decisions on it and the server's answers. SQL text and values must
/// already be masked; the recorder only caps them. Stored as an `exchange`
/// record ([`PostgresExchangeData`]).
#[derive(Debug, Clone)]
pub struct PostgresExchange {
    /// Round trip number within the session (from 1). A round trip written
    /// before the server answered ([`PostgresOutcome::Running`]) has its
    /// answers in a later record with the same number.
    pub stream: u64,
    /// When its first message reached the gateway.
    pub started: SystemTime,
    /// Until the record was written.
    pub duration: Duration,
    /// What the client sent, in order.
    pub messages: Vec<PostgresMessage>,
    /// What the server answered, in order.
    pub results: Vec<PostgresResult>,
    /// Why the record was written.
    pub outcome: PostgresOutcome,
}

impl PostgresExchange {
    /// Bytes of text it carries (SQL, parameters, messages), which dominate
    /// its size in the recorder's queue.
    pub fn text_bytes(&self) -> usize {
        let messages: usize = self
            .messages
            .iter()
            .map(|m| {
                m.sql.as_ref().map_or(0, String::len)
                    + m.params.iter().flatten().flatten().map(String::len).sum::<usize>()
            })
            .sum();
        let results: usize = self
            .results
            .iter()
            .map(|r| r.tag.as_ref().map_or(0, String::len) + r.message.as_ref().map_or(0, String::len))
            .sum();
        messages + results
    }
}

/// Why a [`PostgresExchange`] was written. The names are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostgresOutcome {
    /// The server answered with ReadyForQuery.
    #[default]
    Ready,
    /// Still running when the record was written (so that a crash cannot
    /// lose a long statement): its answers follow in a later record.
    Running,
    /// The session ended before the server answered.
    Incomplete,
}

impl PostgresOutcome {
    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            PostgresOutcome::Ready => "ready",
            PostgresOutcome::Running => "running",
            PostgresOutcome::Incomplete => "incomplete",
        }
    }
}

/// One client message of a [`PostgresExchange`] that the recording keeps
/// (fields in sorted order: stored as they are).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostgresMessage {
    /// `allow` or `deny`, for SQL the gate judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// Keys the detector found in the SQL text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<u64>,
    /// `query`, `parse`, `bind` or `function-call`.
    pub kind: String,
    /// Whether the policy masks the statement's results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked: Option<bool>,
    /// Bind or function-call parameters, masked (`None`: SQL NULL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Vec<Option<String>>>,
    /// The rule that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The SQL text, masked and capped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
}

/// One answer of the server in a [`PostgresExchange`]: a command tag or an
/// error (fields in sorted order: stored as they are).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostgresResult {
    /// The error's message, masked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Rows the command returned or affected (the tag's count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// The error's SQLSTATE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<String>,
    /// The command tag (`SELECT 1`, `UPDATE 3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// The data of a PostgreSQL `exchange` record: one round trip. Told apart
/// from an HTTP exchange ([`ExchangeData`]) by `protocol`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostgresExchangeData {
    /// Nanoseconds from its first message to the record.
    pub duration_ns: u64,
    /// What the client sent.
    pub messages: Vec<PostgresMessage>,
    /// A [`PostgresOutcome`] name.
    pub outcome: String,
    /// Always `postgres`.
    pub protocol: String,
    /// What the server answered.
    pub results: Vec<PostgresResult>,
    /// First message, Unix nanoseconds.
    pub started: i64,
    /// Round trip number.
    pub stream: u64,
}

/// The data of an `exchange` record, whichever protocol wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnyExchange {
    /// An HTTP (gRPC, Connect) request and its response.
    Http(Box<ExchangeData>),
    /// A PostgreSQL round trip.
    Postgres(PostgresExchangeData),
}

impl AnyExchange {
    /// Decodes an `exchange` record's data.
    pub fn parse(data: &str) -> Result<AnyExchange, serde_json::Error> {
        #[derive(Deserialize)]
        struct Probe<'a> {
            #[serde(borrow, default)]
            protocol: Option<std::borrow::Cow<'a, str>>,
        }
        let probe: Probe<'_> = serde_json::from_str(data)?;
        match probe.protocol.as_deref() {
            Some("postgres") => serde_json::from_str(data).map(AnyExchange::Postgres),
            _ => serde_json::from_str(data).map(|e| AnyExchange::Http(Box::new(e))),
        }
    }

    /// When it started, Unix nanoseconds.
    pub fn started(&self) -> i64 {
        match self {
            AnyExchange::Http(e) => e.started,
            AnyExchange::Postgres(e) => e.started,
        }
    }
}

/// One side of an exchange.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageData {
    /// Full body size.
    pub body_size: u64,
    /// Headers, in order (absent at metadata level).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<(String, String)>>,
    /// The stored part of the body (absent at metadata level).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<BodyData>,
}

/// A stored (possibly cut) body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyData {
    /// Bytes stored (after the cut, before encoding).
    pub stored: u64,
    /// True when `stored` is less than the full body size.
    pub truncated: bool,
    /// `utf8` (content is the text) or `base64`.
    pub encoding: String,
    /// The stored bytes, encoded.
    pub content: String,
}

impl BodyData {
    /// The stored bytes, decoded; `None` if the content is damaged.
    pub fn bytes(&self) -> Option<Vec<u8>> {
        use base64::Engine as _;
        match self.encoding.as_str() {
            "utf8" => Some(self.content.as_bytes().to_vec()),
            "base64" => base64::engine::general_purpose::STANDARD.decode(&self.content).ok(),
            _ => None,
        }
    }
}

/// What an `event` record says happened: its `name`. The names are part of
/// the stored format; recordings read back keep the name as text
/// ([`EventData::name`]), so names of older versions still read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The policy's decision on a connection judged without a request.
    Decision,
    /// The gate refused the connection or a request.
    Refused,
    /// A request is held for approval.
    ApprovalRequested,
    /// The approvers (or the timeout) decided a held request.
    ApprovalDecided,
    /// Response parts were masked.
    Masked,
    /// The protocol handler failed.
    Error,
    /// A PostgreSQL session's startup: database, user and the decision.
    PostgresStartup,
    /// The password a PostgreSQL client presented was judged (findings,
    /// swapped or not; never the password).
    PostgresPassword,
    /// The gateway logged in upstream (method, TLS of both legs).
    PostgresLogin,
    /// A statement (masked text) and its decision. Written by earlier
    /// versions; a round trip is now one `exchange` ([`PostgresExchange`]).
    PostgresStatement,
    /// Bind or function-call parameters (masked). Earlier versions only.
    PostgresParams,
    /// A statement's command tag. Earlier versions only.
    PostgresResult,
    /// An error the server returned (SQLSTATE and message). Earlier
    /// versions only.
    PostgresError,
}

impl EventKind {
    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Decision => "decision",
            EventKind::Refused => "refused",
            EventKind::ApprovalRequested => "approval_requested",
            EventKind::ApprovalDecided => "approval_decided",
            EventKind::Masked => "masked",
            EventKind::Error => "error",
            EventKind::PostgresStartup => "postgres_startup",
            EventKind::PostgresPassword => "postgres_password",
            EventKind::PostgresLogin => "postgres_login",
            EventKind::PostgresStatement => "postgres_statement",
            EventKind::PostgresParams => "postgres_params",
            EventKind::PostgresResult => "postgres_result",
            EventKind::PostgresError => "postgres_error",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a recorded session ended: the `outcome` of its `end` record. The
/// names are part of the stored format (and the same as the connection
/// event's `outcome`); recordings read back keep the outcome as text
/// ([`SessionEnd::outcome`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionOutcome {
    /// Both directions completed.
    Closed,
    /// No eBPF record for the accepted socket.
    Unattributed,
    /// The original destination could not be reached.
    UpstreamFailed,
    /// An I/O or protocol error ended the connection.
    Error,
    /// The policy or the detector refused one of its requests.
    Blocked,
    /// The gate refused the connection.
    Refused,
    /// The recorder was dropped without an end (a proxy bug or a panicking
    /// task).
    Dropped,
}

impl SessionOutcome {
    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            SessionOutcome::Closed => "closed",
            SessionOutcome::Unattributed => "unattributed",
            SessionOutcome::UpstreamFailed => "upstream_failed",
            SessionOutcome::Error => "error",
            SessionOutcome::Blocked => "blocked",
            SessionOutcome::Refused => "refused",
            SessionOutcome::Dropped => "dropped",
        }
    }
}

impl SessionOutcome {
    /// Every outcome.
    pub const ALL: [SessionOutcome; 7] = [
        SessionOutcome::Closed,
        SessionOutcome::Unattributed,
        SessionOutcome::UpstreamFailed,
        SessionOutcome::Error,
        SessionOutcome::Blocked,
        SessionOutcome::Refused,
        SessionOutcome::Dropped,
    ];
}

impl std::str::FromStr for SessionOutcome {
    type Err = String;

    /// The stored names (`upstream-failed` also accepted).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.replace('-', "_");
        SessionOutcome::ALL.into_iter().find(|o| o.as_str() == wanted).ok_or_else(|| {
            let names: Vec<&str> = SessionOutcome::ALL.iter().map(|o| o.as_str()).collect();
            format!("`{s}` is not a session outcome ({})", names.join(", "))
        })
    }
}

impl std::fmt::Display for SessionOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<crate::event::Outcome> for SessionOutcome {
    fn from(o: crate::event::Outcome) -> Self {
        use crate::event::Outcome;
        match o {
            Outcome::Closed => SessionOutcome::Closed,
            Outcome::Unattributed => SessionOutcome::Unattributed,
            Outcome::UpstreamFailed => SessionOutcome::UpstreamFailed,
            Outcome::Error => SessionOutcome::Error,
            Outcome::Blocked => SessionOutcome::Blocked,
            Outcome::Refused => SessionOutcome::Refused,
        }
    }
}

/// The data of an `event` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventData {
    /// What happened: an [`EventKind`] name (`refused`,
    /// `approval_requested`, `masked`, ...; older recordings also hold
    /// `denied`).
    pub name: String,
    /// Free-form details from the proxy.
    pub detail: serde_json::Value,
}

/// The kind of a chain record, in the order they may appear: one `start`,
/// any number of `exchange` and `event`, at most one `end`. The names are
/// part of the hashed, stored format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// The session's metadata ([`SessionMeta`]); always record 0.
    Start,
    /// One request and its response ([`ExchangeData`]), or a PostgreSQL
    /// round trip ([`PostgresExchangeData`]); [`AnyExchange`] reads either.
    Exchange,
    /// Something the gate did ([`EventData`]).
    Event,
    /// How the connection ended ([`SessionEnd`]); always the last record.
    End,
}

impl RecordKind {
    /// Every kind.
    pub const ALL: [RecordKind; 4] = [RecordKind::Start, RecordKind::Exchange, RecordKind::Event, RecordKind::End];

    /// The stored name.
    pub const fn as_str(self) -> &'static str {
        match self {
            RecordKind::Start => "start",
            RecordKind::Exchange => "exchange",
            RecordKind::Event => "event",
            RecordKind::End => "end",
        }
    }

    /// The kind stored as `name`; `None` for anything else (a damaged or
    /// tampered record).
    pub fn parse(name: &str) -> Option<RecordKind> {
        RecordKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for RecordKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stored record of a session's hash chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The session.
    pub session: SessionId,
    /// Position in the chain; 0 is the `start` record.
    pub seq: u64,
    /// When it happened, Unix nanoseconds.
    pub ts: i64,
    /// The kind as stored: a [`RecordKind`] name, unless the record was
    /// damaged (kept as text so that verification can say so).
    pub kind: String,
    /// Canonical JSON, exactly the bytes that were hashed.
    pub data: String,
    /// `hash` of the previous record (64 zeros for seq 0).
    pub prev_hash: String,
    /// SHA-256 of this record, hex (see [`hash_record`](super::hash_record)).
    pub hash: String,
}

impl Record {
    /// The record's kind; `None` when the stored name is none of them.
    pub fn record_kind(&self) -> Option<RecordKind> {
        RecordKind::parse(&self.kind)
    }

    /// `ts` as a time.
    pub fn time(&self) -> OffsetDateTime {
        from_nanos(self.ts)
    }
}

/// Whether a session is still going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// The connection is live in the running gateway.
    Open,
    /// The connection ended and its end is recorded.
    Ended,
    /// No end was recorded and the gateway that recorded it is gone (killed
    /// or crashed): the chain stops at the last committed record.
    Interrupted,
}

impl SessionState {
    /// The name shown in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Open => "open",
            SessionState::Ended => "ended",
            SessionState::Interrupted => "interrupted",
        }
    }
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A session as listed (from the sessions table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionSummary {
    /// The session.
    pub id: SessionId,
    /// The proxy's connection number.
    pub conn_id: u64,
    /// Start.
    #[serde(with = "time::serde::rfc3339")]
    pub started: OffsetDateTime,
    /// Identity URI.
    pub identity: String,
    /// Destination host.
    pub host: String,
    /// Original destination.
    pub orig_dst: String,
    /// Protocol spoken.
    pub protocol: String,
    /// Process id.
    pub pid: u32,
    /// Process name.
    pub comm: String,
    /// Open, ended or interrupted.
    pub state: SessionState,
    /// End, if recorded.
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended: Option<OffsetDateTime>,
    /// Recorded end: bytes up.
    pub bytes_up: Option<u64>,
    /// Recorded end: bytes down.
    pub bytes_down: Option<u64>,
    /// Recorded end: outcome.
    pub outcome: Option<String>,
    /// Exchange records.
    pub exchanges: u64,
    /// Records in the chain (last seq + 1).
    pub records: u64,
    /// Time of the last committed record.
    #[serde(with = "time::serde::rfc3339")]
    pub last_activity: OffsetDateTime,
}

/// Which sessions [`SessionStore::list`](super::SessionStore::list) returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionFilter {
    /// Only identities matching this glob (`*`, `?`, `[...]`).
    pub identity: Option<String>,
    /// Only sessions started at or after this instant.
    pub since: Option<OffsetDateTime>,
    /// At most this many (the newest).
    pub limit: Option<usize>,
    /// Only sessions to hosts matching this glob (case-insensitive).
    pub host: Option<String>,
    /// Only sessions that ended this way.
    pub outcome: Option<SessionOutcome>,
    /// Only these sessions (those of a finding's sightings).
    pub ids: Option<Vec<String>>,
}

/// Unix nanoseconds of `t`, saturating outside 1677..2262.
pub(crate) fn nanos(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// The time of Unix nanoseconds `n` (always representable: i64 nanoseconds
/// span 1677..2262).
pub(crate) fn from_nanos(n: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(n)).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}
