//! The stored form of each record: text from the traffic capped, headers
//! redacted, bodies cut and encoded, all written straight to canonical JSON.
//!
//! Canonical JSON (no whitespace, object keys sorted by code point, see
//! `chain`) is what the hash chain covers. Rather than building a
//! `serde_json::Value` tree and sorting it, which cost the writer thread most
//! of its time and allocations, the records are serialized from borrowing
//! structs whose fields are declared in sorted key order: serde_json's
//! compact output of them is canonical as it is. Maps are `BTreeMap`s
//! (sorted), and free-form event details go through [`Canonical`], which
//! sorts object keys whatever order a `Value` map keeps them in. The bytes
//! are exactly those of the `Value`-based encoding of earlier versions, so
//! the chain format did not change; tests compare the two for every kind.

use std::{borrow::Cow, cell::RefCell, collections::HashMap};

use base64::Engine as _;
use serde::{ser::SerializeMap as _, Serialize, Serializer};

use crate::redact::{is_sensitive_header, redact_header_pairs};

use super::{model::nanos, ExchangeRecord, PostgresExchange, PostgresMessage, PostgresResult, RecordLevel, REDACTED};

/// Caps on text that comes from the traffic or the job (attacker-controlled
/// on a shared runner), so one hostile job cannot bloat the database with
/// megabyte URLs or thousands of headers.
pub(crate) mod limits {
    pub const SHORT: usize = 256;
    pub const TEXT: usize = 4096;
    pub const URL: usize = 8192;
    pub const HEADERS: usize = 256;
    pub const HEADER_VALUE: usize = 8192;
    pub const LABELS: usize = 64;
    pub const JOB_VARS: usize = 128;
    pub const FINDINGS: usize = 256;
    /// A free-form event larger than this is replaced by its size.
    pub const EVENT: usize = 256 * 1024;
}

/// Log target of the recorder.
const TARGET: &str = "gateway::record";

/// `value` as canonical JSON, for types whose fields are declared in sorted
/// order (and whose maps are sorted). The recorder's own types always
/// serialize; the fallback only keeps a record if that ever changes.
pub(crate) fn to_json<T: Serialize>(value: &T) -> String {
    match serde_json::to_string(value) {
        Ok(json) => json,
        Err(e) => {
            tracing::error!(target: TARGET, error = %e, "a session record does not serialize");
            let mut out = String::from("{\"unserializable\":");
            out.push_str(&serde_json::Value::String(e.to_string()).to_string());
            out.push('}');
            out
        }
    }
}

/// The data of an `exchange` record at the exchange's level.
pub(crate) fn exchange(e: &ExchangeRecord, max_body_bytes: usize, names: &SensitiveNames) -> String {
    to_json(&Exchange::new(e, max_body_bytes, names))
}

/// The data of a PostgreSQL `exchange` record: the round trip's text
/// capped (the proxy masked it), written canonically like the others.
pub(crate) fn postgres(e: &PostgresExchange) -> String {
    to_json(&Postgres {
        duration_ns: u64::try_from(e.duration.as_nanos()).unwrap_or(u64::MAX),
        messages: PgMessages(&e.messages),
        outcome: e.outcome.as_str(),
        protocol: "postgres",
        results: PgResults(&e.results),
        started: nanos(e.started),
        stream: e.stream,
    })
}

/// Which header names carry credentials, remembered: every exchange brings
/// the same few names, and deciding takes a lowercase copy and a dozen
/// substring searches.
#[derive(Debug, Default)]
pub(crate) struct SensitiveNames(RefCell<HashMap<Box<str>, bool>>);

/// Names remembered at most; a job sending ever new names only makes the
/// memory start over.
const MAX_NAMES: usize = 1024;

impl SensitiveNames {
    fn get(&self, name: &str) -> bool {
        // Never borrowed re-entrantly: nothing below calls back.
        let mut known = self.0.borrow_mut();
        if let Some(&sensitive) = known.get(name) {
            return sensitive;
        }
        let sensitive = is_sensitive_header(name);
        if known.len() >= MAX_NAMES {
            known.clear();
        }
        known.insert(name.into(), sensitive);
        sensitive
    }
}

/// The data of an `event` record; an event whose data would exceed
/// [`limits::EVENT`] is replaced by its size.
pub(crate) fn event(name: &str, detail: &serde_json::Value) -> String {
    let name = capped(name, limits::SHORT);
    let data = to_json(&Event { detail: Canonical(detail), name });
    if data.len() <= limits::EVENT {
        return data;
    }
    let oversized = serde_json::json!({ "oversized_bytes": data.len() });
    to_json(&Event { detail: Canonical(&oversized), name })
}

/// At most `max` bytes of `s`, cut on a character boundary; borrowed, unlike
/// [`crate::redact::cap`].
pub(crate) fn capped(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// Every struct below lists its fields in sorted order: that order is the
// canonical one (see the module comment).

#[derive(Serialize)]
struct Event<'a> {
    detail: Canonical<'a>,
    name: &'a str,
}

#[derive(Serialize)]
struct Exchange<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    decision: Option<Decision<'a>>,
    duration_ns: u64,
    findings: Findings<'a>,
    level: RecordLevel,
    method: &'a str,
    outcome: &'a str,
    request: Message<'a>,
    response: Message<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rpc: Option<&'a str>,
    started: i64,
    status: u16,
    stream: u64,
    url: &'a str,
}

#[derive(Serialize)]
struct Postgres<'a> {
    duration_ns: u64,
    messages: PgMessages<'a>,
    outcome: &'static str,
    protocol: &'static str,
    results: PgResults<'a>,
    started: i64,
    stream: u64,
}

/// A round trip's client messages, text capped. Their number is bounded by
/// the proxy, which writes a long pipeline in several records rather than
/// leaving any statement out.
struct PgMessages<'a>(&'a [PostgresMessage]);

#[derive(Serialize)]
struct PgMessage<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    decision: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    keys: Option<u64>,
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    masked: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<PgParams<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sql: Option<&'a str>,
}

impl Serialize for PgMessages<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|m| PgMessage {
            decision: m.decision.as_deref().map(|v| capped(v, limits::SHORT)),
            keys: m.keys,
            kind: capped(&m.kind, limits::SHORT),
            masked: m.masked,
            params: m.params.as_deref().map(PgParams),
            rule: m.rule.as_deref().map(|v| capped(v, limits::SHORT)),
            sql: m.sql.as_deref().map(|v| capped(v, limits::TEXT)),
        }))
    }
}

/// Bind parameters: the first [`limits::HEADERS`], each capped.
struct PgParams<'a>(&'a [Option<String>]);

impl Serialize for PgParams<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer
            .collect_seq(self.0.iter().take(limits::HEADERS).map(|p| p.as_deref().map(|v| capped(v, limits::TEXT))))
    }
}

/// The server's answers, text capped.
struct PgResults<'a>(&'a [PostgresResult]);

#[derive(Serialize)]
struct PgResult<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rows: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sqlstate: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<&'a str>,
}

impl Serialize for PgResults<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|r| PgResult {
            message: r.message.as_deref().map(|v| capped(v, limits::TEXT)),
            rows: r.rows,
            sqlstate: r.sqlstate.as_deref().map(|v| capped(v, limits::SHORT)),
            tag: r.tag.as_deref().map(|v| capped(v, limits::SHORT)),
        }))
    }
}

#[derive(Serialize)]
struct Decision<'a> {
    action: &'a str,
    rule: &'a str,
}

#[derive(Serialize)]
struct Message<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<Body<'a>>,
    body_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    headers: Option<Headers<'a>>,
}

/// A stored (possibly cut) body; [`super::BodyData`] is its owned, readable
/// form.
#[derive(Serialize)]
pub(crate) struct Body<'a> {
    content: Cow<'a, str>,
    encoding: &'static str,
    stored: u64,
    truncated: bool,
}

impl<'a> Exchange<'a> {
    fn new(e: &'a ExchangeRecord, max_body_bytes: usize, names: &'a SensitiveNames) -> Exchange<'a> {
        let full = e.level == RecordLevel::Full;
        let message = |headers: &'a [(String, String)], body: &'a [u8], size: u64| Message {
            body: full.then(|| Body::new(body, size, max_body_bytes)),
            body_size: size,
            headers: full.then_some(Headers { pairs: headers, names }),
        };
        Exchange {
            decision: e
                .decision
                .as_ref()
                .map(|d| Decision { action: capped(&d.action, limits::SHORT), rule: capped(&d.rule, limits::SHORT) }),
            duration_ns: u64::try_from(e.duration.as_nanos()).unwrap_or(u64::MAX),
            findings: Findings(&e.findings),
            level: e.level,
            method: capped(&e.method, limits::SHORT),
            outcome: e.outcome.as_str(),
            request: message(&e.request_headers, &e.request_body, e.request_body_size),
            response: message(&e.response_headers, &e.response_body, e.response_body_size),
            rpc: e.rpc.as_deref().map(|v| capped(v, limits::TEXT)),
            started: nanos(e.started),
            status: e.status,
            stream: e.stream,
            url: capped(&e.url, limits::URL),
        }
    }
}

impl<'a> Body<'a> {
    /// At most `max` bytes of `body` (whose full size is `size`); text when
    /// the kept part is UTF-8 (cut on a character boundary), base64
    /// otherwise.
    pub(crate) fn new(body: &'a [u8], size: u64, max: usize) -> Body<'a> {
        let mut kept = &body[..body.len().min(max)];
        let size = size.max(body.len() as u64);
        let text = match std::str::from_utf8(kept) {
            Ok(text) => Some(text),
            // Only a character cut in half by the cap: keep the text before it.
            Err(e) if e.error_len().is_none() && (kept.len() as u64) < size => {
                kept = &kept[..e.valid_up_to()];
                std::str::from_utf8(kept).ok()
            }
            Err(_) => None,
        };
        let (content, encoding) = match text {
            Some(text) => (Cow::Borrowed(text), "utf8"),
            None => (Cow::Owned(base64::engine::general_purpose::STANDARD.encode(kept)), "base64"),
        };
        Body { content, encoding, stored: kept.len() as u64, truncated: (kept.len() as u64) < size }
    }
}

/// The first [`limits::FINDINGS`] finding ids, capped.
struct Findings<'a>(&'a [String]);

impl Serialize for Findings<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().take(limits::FINDINGS).map(|f| capped(f, limits::SHORT)))
    }
}

/// Headers as `[name, value]` pairs, in order: the first
/// [`limits::HEADERS`], names and values capped, then redacted (again,
/// whatever the proxy did). Only redacted values are copied.
struct Headers<'a> {
    pairs: &'a [(String, String)],
    names: &'a SensitiveNames,
}

impl Serialize for Headers<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.pairs.iter().take(limits::HEADERS).map(|(name, value)| {
            let name = capped(name, limits::SHORT);
            let value = capped(value, limits::HEADER_VALUE);
            (name, if self.names.get(name) { redacted(name, value) } else { Cow::Borrowed(value) })
        }))
    }
}

/// `value` as stored under `name`, a credential header.
fn redacted<'a>(name: &str, value: &'a str) -> Cow<'a, str> {
    let pair = [(name.to_owned(), value.to_owned())];
    redact_header_pairs(&pair).into_iter().next().map_or(Cow::Borrowed(REDACTED), |(_, v)| Cow::Owned(v))
}

/// A free-form JSON value serialized canonically: object keys sorted by code
/// point at every depth, whatever order the map keeps them in.
pub(crate) struct Canonical<'a>(pub(crate) &'a serde_json::Value);

impl Serialize for Canonical<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde_json::Value;
        match self.0 {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                // serde_json's default map is sorted already; this keeps the
                // encoding canonical should a dependency turn on
                // `preserve_order`.
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                let mut out = serializer.serialize_map(Some(entries.len()))?;
                for (key, value) in entries {
                    out.serialize_entry(key, &Canonical(value))?;
                }
                out.end()
            }
            Value::Array(items) => serializer.collect_seq(items.iter().map(Canonical)),
            scalar => scalar.serialize(serializer),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        time::{Duration, SystemTime, UNIX_EPOCH},
    };

    use bytes::Bytes;
    use serde_json::json;

    use super::*;
    use crate::{
        process::ProcessSnapshot,
        record::{
            chain::canonical_json, BodyData, DecisionFacts, EventData, ExchangeData, MessageData, SessionEnd,
            SessionId, SessionMeta, TlsFacts,
        },
        redact::cap,
    };

    /// The encoding of earlier versions, kept as the reference: owned data
    /// built field by field, turned into a `serde_json::Value` and written
    /// by `canonical_json`. Chains written by those versions must hash the
    /// same, so the new encoder must produce exactly these bytes.
    mod v1 {
        use super::*;

        pub fn exchange(e: &ExchangeRecord, max_body_bytes: usize) -> String {
            canonical_json(&serde_json::to_value(exchange_data(e, max_body_bytes)).unwrap())
        }

        pub fn event(name: &str, detail: serde_json::Value) -> String {
            let data =
                canonical_json(&serde_json::to_value(EventData { name: cap(name, limits::SHORT), detail }).unwrap());
            if data.len() > limits::EVENT {
                let detail = json!({ "oversized_bytes": data.len() });
                return canonical_json(
                    &serde_json::to_value(EventData { name: cap(name, limits::SHORT), detail }).unwrap(),
                );
            }
            data
        }

        fn exchange_data(e: &ExchangeRecord, max_body_bytes: usize) -> ExchangeData {
            let full = e.level == RecordLevel::Full;
            let message = |headers: &[(String, String)], body: &Bytes, size: u64| MessageData {
                body_size: size,
                headers: full.then(|| {
                    let kept: Vec<_> = headers
                        .iter()
                        .take(limits::HEADERS)
                        .map(|(k, v)| (cap(k, limits::SHORT), cap(v, limits::HEADER_VALUE)))
                        .collect();
                    redact_header_pairs(&kept)
                }),
                body: full.then(|| body_data(body, size, max_body_bytes)),
            };
            ExchangeData {
                level: e.level,
                stream: e.stream,
                started: nanos(e.started),
                duration_ns: u64::try_from(e.duration.as_nanos()).unwrap_or(u64::MAX),
                method: cap(&e.method, limits::SHORT),
                url: cap(&e.url, limits::URL),
                status: e.status,
                outcome: e.outcome.as_str().to_owned(),
                rpc: e.rpc.as_deref().map(|v| cap(v, limits::TEXT)),
                request: message(&e.request_headers, &e.request_body, e.request_body_size),
                response: message(&e.response_headers, &e.response_body, e.response_body_size),
                decision: e.decision.as_ref().map(|d| DecisionFacts {
                    rule: cap(&d.rule, limits::SHORT),
                    action: cap(&d.action, limits::SHORT),
                }),
                findings: e.findings.iter().take(limits::FINDINGS).map(|f| cap(f, limits::SHORT)).collect(),
            }
        }

        fn body_data(body: &[u8], size: u64, max: usize) -> BodyData {
            let mut kept = &body[..body.len().min(max)];
            if let Err(e) = std::str::from_utf8(kept) {
                if e.error_len().is_none() && (kept.len() as u64) < size.max(body.len() as u64) {
                    kept = &kept[..e.valid_up_to()];
                }
            }
            let size = size.max(body.len() as u64);
            let truncated = (kept.len() as u64) < size;
            match std::str::from_utf8(kept) {
                Ok(text) => {
                    BodyData { stored: kept.len() as u64, truncated, encoding: "utf8".into(), content: text.to_owned() }
                }
                Err(_) => BodyData {
                    stored: kept.len() as u64,
                    truncated,
                    encoding: "base64".into(),
                    content: base64::engine::general_purpose::STANDARD.encode(kept),
                },
            }
        }
    }

    /// Text that exercises escaping: quotes, backslashes, control
    /// characters, non-ASCII (kept as UTF-8), U+2028.
    const AWKWARD: &str = "a\"b\\c\n\t\u{1}\u{7f}é€😀\u{2028}</script>";

    fn rich_exchange() -> ExchangeRecord {
        let mut request_headers = vec![
            ("host".to_owned(), "api.example.com".to_owned()),
            ("authorization".to_owned(), "Bearer sk-live-abcdef0123456789".to_owned()),
            ("Authorization".to_owned(), "Mystery sk-live-abcdef0123456789".to_owned()),
            ("cookie".to_owned(), "sid=1; theme=dark".to_owned()),
            ("x-api-key".to_owned(), "k".to_owned()),
            ("x-note".to_owned(), AWKWARD.to_owned()),
            // A value cut by the cap inside a multi-byte character.
            ("x-long".to_owned(), format!("{}é tail", "v".repeat(limits::HEADER_VALUE - 1))),
            (format!("x-{}", "n".repeat(limits::SHORT)), "long name".to_owned()),
        ];
        request_headers.extend((0..limits::HEADERS).map(|i| (format!("x-h{i}"), i.to_string())));
        ExchangeRecord {
            level: RecordLevel::Full,
            stream: u64::MAX,
            started: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            duration: Duration::MAX,
            method: format!("PATCH{AWKWARD}"),
            url: format!("/v1/{AWKWARD}?q={}", "u".repeat(limits::URL)),
            status: 503,
            outcome: crate::http::ExchangeOutcome::UpstreamFailed,
            rpc: Some("/pkg.Service/Method".into()),
            request_headers,
            request_body: Bytes::from(format!("{{\"k\":\"{AWKWARD}\"}}")),
            request_body_size: 1_000_000,
            response_headers: vec![("set-cookie".into(), "sid=2".into()), ("content-type".into(), "text/plain".into())],
            response_body: Bytes::from_static(&[0xff, 0x00, 0xfe, 0x10, 0x80, b'"']),
            response_body_size: 6,
            decision: Some(DecisionFacts { rule: AWKWARD.into(), action: "approve".into() }),
            findings: (0..limits::FINDINGS + 5).map(|i| format!("F-{i}")).collect(),
        }
    }

    #[test]
    fn exchanges_encode_exactly_as_before() {
        let rich = rich_exchange();
        let bare = ExchangeRecord {
            level: RecordLevel::Full,
            stream: 0,
            started: UNIX_EPOCH - Duration::from_secs(5),
            duration: Duration::ZERO,
            method: String::new(),
            url: String::new(),
            status: 0,
            outcome: crate::http::ExchangeOutcome::Forwarded,
            rpc: None,
            request_headers: Vec::new(),
            request_body: Bytes::new(),
            request_body_size: 0,
            response_headers: Vec::new(),
            response_body: Bytes::new(),
            response_body_size: 0,
            decision: None,
            findings: Vec::new(),
        };
        let cases = [
            (rich.clone(), 65_536),
            (rich.clone(), 7),
            (rich.clone(), 0),
            (ExchangeRecord { level: RecordLevel::Metadata, ..rich.clone() }, 65_536),
            // A body that ends inside a character and is not cut: binary.
            (ExchangeRecord { request_body: Bytes::from_static(b"ab\xc3"), request_body_size: 3, ..bare.clone() }, 64),
            (ExchangeRecord { started: SystemTime::now(), ..bare.clone() }, 64),
            (bare, 64),
        ];
        // One memory of names across cases, as in the writer.
        let names = SensitiveNames::default();
        for (i, (e, max)) in cases.iter().enumerate() {
            let new = exchange(e, *max, &names);
            assert_eq!(new, v1::exchange(e, *max), "case {i}");
            assert_eq!(canonical_json(&serde_json::from_str(&new).unwrap()), new, "case {i} is canonical");
        }
        // And it reads back as the model type.
        let data: ExchangeData = serde_json::from_str(&exchange(&rich, 64, &names)).unwrap();
        assert_eq!(data.request.headers.as_ref().map(Vec::len), Some(limits::HEADERS));
        assert_eq!(data.request.headers.unwrap()[1], ("authorization".to_owned(), "Bearer [REDACTED]".to_owned()));
        assert_eq!(data.findings.len(), limits::FINDINGS);
    }

    #[test]
    fn events_encode_exactly_as_before() {
        let detail = json!({
            "zeta": [3, {"b": null, "a": -1.5, "é": true, "Z": u64::MAX, "_": i64::MIN}],
            "alpha": {"nested": {"y": 1e300, "x": "x\n"}},
            "rules": ["b", "a"],
            AWKWARD: AWKWARD,
        });
        for (name, detail) in [
            ("masked", detail),
            (AWKWARD, json!(null)),
            ("list", json!([{"b": 1, "a": 2}])),
            ("huge", json!({ "blob": "x".repeat(limits::EVENT) })),
        ] {
            let new = event(name, &detail);
            assert_eq!(new, v1::event(name, detail), "{name}");
        }
        assert!(event("huge", &json!({ "blob": "x".repeat(limits::EVENT) })).contains("oversized_bytes"));
    }

    #[test]
    fn start_and_end_records_encode_exactly_as_before() {
        let canonical = |v: serde_json::Value| canonical_json(&v);
        let job = BTreeMap::from([("CI_JOB_ID".to_owned(), "42".to_owned()), ("A_B".to_owned(), AWKWARD.to_owned())]);
        let process = ProcessSnapshot {
            pid: 1,
            uid: 2,
            gid: Some(3),
            comm: AWKWARD.into(),
            exe: Some("/usr/bin/curl".into()),
            cgroup: None,
            container: None,
            job,
        };
        let meta = SessionMeta {
            session: SessionId::generate(SystemTime::now()),
            conn_id: u64::MAX,
            started: -1,
            identity: "spiffe://ci.example/p".into(),
            identity_labels: BTreeMap::from([("b".to_owned(), "1".to_owned()), ("a".to_owned(), "2".to_owned())]),
            process,
            host: "h".into(),
            orig_dst: "203.0.113.7:443".into(),
            sni: None,
            tls: Some(TlsFacts { version: "TLSv1.3".into(), cipher: "c".into(), alpn: None }),
            protocol: "https".into(),
        };
        assert_eq!(to_json(&meta), canonical(serde_json::to_value(&meta).unwrap()));
        let meta = SessionMeta { sni: Some("s".into()), tls: None, ..meta };
        assert_eq!(to_json(&meta), canonical(serde_json::to_value(&meta).unwrap()));
        // A container job's start record is canonical too.
        let mut container = crate::identity::parse_container(&format!("/ci/{}", "b".repeat(64))).unwrap();
        container.name = Some(AWKWARD.into());
        container.image = Some("alpine:3.20".into());
        container.image_id = Some("sha256:00".into());
        let process = ProcessSnapshot { container: Some(container), ..meta.process.clone() };
        let meta = SessionMeta { process, ..meta };
        assert_eq!(to_json(&meta), canonical(serde_json::to_value(&meta).unwrap()));
        let end = SessionEnd { bytes_up: 1, bytes_down: u64::MAX, outcome: AWKWARD.into() };
        assert_eq!(to_json(&end), canonical(serde_json::to_value(&end).unwrap()));
    }

    #[test]
    fn postgres_exchanges_are_canonical_and_capped() {
        use crate::record::{AnyExchange, PostgresExchange, PostgresMessage, PostgresOutcome, PostgresResult};
        let long = format!("select '{}'", "x".repeat(limits::TEXT));
        let e = PostgresExchange {
            stream: 3,
            started: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            duration: Duration::from_micros(1500),
            messages: vec![
                PostgresMessage {
                    decision: Some("allow".into()),
                    keys: Some(0),
                    kind: "parse".into(),
                    masked: Some(false),
                    rule: Some(AWKWARD.into()),
                    sql: Some(long),
                    ..PostgresMessage::default()
                },
                PostgresMessage {
                    kind: "bind".into(),
                    params: Some(vec![None, Some(AWKWARD.into())]),
                    ..PostgresMessage::default()
                },
            ],
            results: vec![
                PostgresResult { tag: Some("UPDATE 2".into()), rows: Some(2), ..PostgresResult::default() },
                PostgresResult { sqlstate: Some("42P01".into()), message: Some(AWKWARD.into()), ..Default::default() },
            ],
            outcome: PostgresOutcome::Running,
        };
        let data = postgres(&e);
        assert_eq!(canonical_json(&serde_json::from_str(&data).unwrap()), data, "canonical");
        let Ok(AnyExchange::Postgres(read)) = AnyExchange::parse(&data) else { panic!("reads back: {data}") };
        assert_eq!((read.stream, read.outcome.as_str(), read.duration_ns), (3, "running", 1_500_000));
        assert_eq!(read.messages[0].sql.as_ref().map(String::len), Some(limits::TEXT));
        assert_eq!(read.messages[1].params, Some(vec![None, Some(AWKWARD.into())]));
        assert_eq!(read.results, e.results);
        // An HTTP exchange still reads as one.
        let http = exchange(&rich_exchange(), 64, &SensitiveNames::default());
        assert!(matches!(AnyExchange::parse(&http), Ok(AnyExchange::Http(_))));
    }

    #[test]
    fn sensitive_names_are_remembered_and_bounded() {
        let names = SensitiveNames::default();
        for round in 0..2 {
            assert!(names.get("authorization") && names.get("x-api-key") && names.get("X-Auth-Token"), "{round}");
            assert!(!names.get("content-type") && !names.get("host"), "{round}");
        }
        for i in 0..3 * MAX_NAMES {
            assert!(!names.get(&format!("x-h{i}")));
            assert!(names.0.borrow().len() <= MAX_NAMES);
        }
        assert!(names.get("cookie") && !names.get("date"));
    }

    #[test]
    fn capped_cuts_on_character_boundaries() {
        assert_eq!(capped("héllo", 2), "h");
        assert_eq!(capped("héllo", 3), "hé");
        assert_eq!(capped("abc", 3), "abc");
        assert_eq!(capped("abc", 0), "");
    }
}
