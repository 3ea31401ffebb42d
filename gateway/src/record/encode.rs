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

use super::{model::nanos, ExchangeRecord, PostgresExchange, RecordLevel, REDACTED};

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
///
/// Written by hand ([`Out`]) rather than through serde: the writer encodes
/// one of these per HTTP request, and serde_json's byte-at-a-time string
/// escaping and per-field machinery cost it about 14,000 instructions per
/// record. The bytes are the same (the tests hold it to the `Value`-based
/// reference encoding, and to serde_json's escaping for every byte).
pub(crate) fn exchange(e: &ExchangeRecord, max_body_bytes: usize, names: &SensitiveNames) -> String {
    let full = e.level == RecordLevel::Full;
    let url = capped(&e.url, limits::URL);
    let mut room = 320 + url.len() + e.findings.len() * 24;
    if full {
        let headers = |h: &[(String, String)]| h.iter().map(|(n, v)| n.len() + v.len() + 8).sum::<usize>();
        room += headers(&e.request_headers) + headers(&e.response_headers);
        room += e.request_body.len().min(max_body_bytes) + e.response_body.len().min(max_body_bytes);
    }
    let mut out = Out(String::with_capacity(room));
    out.raw("{");
    if let Some(d) = &e.decision {
        out.raw("\"decision\":{\"action\":");
        out.str(capped(&d.action, limits::SHORT));
        out.raw(",\"rule\":");
        out.str(capped(&d.rule, limits::SHORT));
        out.raw("},");
    }
    out.raw("\"duration_ns\":");
    out.u64(u64::try_from(e.duration.as_nanos()).unwrap_or(u64::MAX));
    out.raw(",\"findings\":[");
    for (i, f) in e.findings.iter().take(limits::FINDINGS).enumerate() {
        if i > 0 {
            out.raw(",");
        }
        out.str(capped(f, limits::SHORT));
    }
    out.raw("],\"level\":");
    out.str(e.level.as_str());
    out.raw(",\"method\":");
    out.str(capped(&e.method, limits::SHORT));
    out.raw(",\"outcome\":");
    out.str(e.outcome.as_str());
    out.raw(",\"request\":");
    out.message(full, &e.request_headers, &e.request_body, e.request_body_size, max_body_bytes, names);
    out.raw(",\"response\":");
    out.message(full, &e.response_headers, &e.response_body, e.response_body_size, max_body_bytes, names);
    if let Some(rpc) = &e.rpc {
        out.raw(",\"rpc\":");
        out.str(capped(rpc, limits::TEXT));
    }
    out.raw(",\"started\":");
    out.i64(nanos(e.started));
    out.raw(",\"status\":");
    out.u64(u64::from(e.status));
    out.raw(",\"stream\":");
    out.u64(e.stream);
    out.raw(",\"url\":");
    out.str(url);
    out.raw("}");
    out.0
}

/// Canonical JSON written by hand: the caller writes keys in sorted order
/// and the separators; strings are escaped exactly as serde_json escapes
/// them (`"`, `\\`, and control characters, as `\b \t \n \f \r` or
/// `\u00xx` in lower-case hex; nothing else), numbers written as serde_json
/// writes them (itoa).
struct Out(String);

impl Out {
    fn raw(&mut self, s: &str) {
        self.0.push_str(s);
    }

    fn str(&mut self, s: &str) {
        self.0.push('"');
        escape_into(&mut self.0, s);
        self.0.push('"');
    }

    fn u64(&mut self, n: u64) {
        self.0.push_str(itoa::Buffer::new().format(n));
    }

    fn i64(&mut self, n: i64) {
        self.0.push_str(itoa::Buffer::new().format(n));
    }

    /// A request or response: `{"body":…,"body_size":…,"headers":…}`, body
    /// and headers only at `full`.
    fn message(
        &mut self,
        full: bool,
        headers: &[(String, String)],
        body: &[u8],
        size: u64,
        max_body_bytes: usize,
        names: &SensitiveNames,
    ) {
        self.raw("{");
        if full {
            let body = Body::new(body, size, max_body_bytes);
            self.raw("\"body\":{\"content\":");
            self.str(&body.content);
            self.raw(",\"encoding\":");
            self.str(body.encoding);
            self.raw(",\"stored\":");
            self.u64(body.stored);
            self.raw(if body.truncated { ",\"truncated\":true}," } else { ",\"truncated\":false}," });
        }
        self.raw("\"body_size\":");
        self.u64(size);
        if full {
            // The first [`limits::HEADERS`], names and values capped, then
            // redacted (again, whatever the proxy did).
            self.raw(",\"headers\":[");
            for (i, (name, value)) in headers.iter().take(limits::HEADERS).enumerate() {
                let name = capped(name, limits::SHORT);
                let value = capped(value, limits::HEADER_VALUE);
                self.raw(if i > 0 { ",[" } else { "[" });
                self.str(name);
                self.raw(",");
                if names.get(name) {
                    self.str(&redacted(name, value));
                } else {
                    self.str(value);
                }
                self.raw("]");
            }
            self.raw("]");
        }
        self.raw("}");
    }
}

/// Whether any of the eight bytes of `w` is below 0x20, `"` or `\\`: the
/// bytes a JSON string escapes. Exact for "any" (the borrow of the
/// zero-byte test only spills past a byte that matched).
fn any_to_escape(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    control | zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\'))) != 0
}

/// `s` escaped as serde_json escapes string contents, appended to `out`.
/// Eight bytes at a time while none needs escaping (serde_json looks each
/// byte up in a table: several instructions per byte of every body).
fn escape_into(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if let Some(word) = bytes.get(i..i + 8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            if !any_to_escape(u64::from_le_bytes(w)) {
                i += 8;
                continue;
            }
        }
        let b = bytes[i];
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x09 => "\\t",
            0x0a => "\\n",
            0x0c => "\\f",
            0x0d => "\\r",
            0x00..=0x1f => "",
            _ => {
                i += 1;
                continue;
            }
        };
        // Every byte escaped is ASCII, so these cuts are on character
        // boundaries.
        out.push_str(&s[start..i]);
        if short.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(short);
        }
        i += 1;
        start = i;
    }
    out.push_str(&s[start..]);
}

/// The data of a PostgreSQL `exchange` record: the round trip's text
/// capped (the proxy masked it), written canonically like the others, by
/// hand as [`exchange`] is (the tests hold it to the serde encoding).
pub(crate) fn postgres(e: &PostgresExchange) -> String {
    let room = 192 + e.text_bytes() + e.messages.len() * 64 + e.results.len() * 48;
    let mut out = Out(String::with_capacity(room));
    out.raw("{\"duration_ns\":");
    out.u64(u64::try_from(e.duration.as_nanos()).unwrap_or(u64::MAX));
    out.raw(",\"messages\":[");
    for (i, m) in e.messages.iter().enumerate() {
        out.raw(if i > 0 { ",{" } else { "{" });
        // Fields in sorted order, absent ones left out; `kind` is always
        // there, so every other field is written after or before a comma
        // that it certainly needs.
        if let Some(decision) = &m.decision {
            out.raw("\"decision\":");
            out.str(capped(decision, limits::SHORT));
            out.raw(",");
        }
        if let Some(keys) = m.keys {
            out.raw("\"keys\":");
            out.u64(keys);
            out.raw(",");
        }
        out.raw("\"kind\":");
        out.str(capped(&m.kind, limits::SHORT));
        if let Some(masked) = m.masked {
            out.raw(if masked { ",\"masked\":true" } else { ",\"masked\":false" });
        }
        if let Some(params) = &m.params {
            out.raw(",\"params\":[");
            for (j, p) in params.iter().take(limits::HEADERS).enumerate() {
                if j > 0 {
                    out.raw(",");
                }
                match p {
                    Some(v) => out.str(capped(v, limits::TEXT)),
                    None => out.raw("null"),
                }
            }
            out.raw("]");
        }
        if let Some(rule) = &m.rule {
            out.raw(",\"rule\":");
            out.str(capped(rule, limits::SHORT));
        }
        if let Some(sql) = &m.sql {
            out.raw(",\"sql\":");
            out.str(capped(sql, limits::TEXT));
        }
        out.raw("}");
    }
    out.raw("],\"outcome\":");
    out.str(e.outcome.as_str());
    out.raw(",\"protocol\":\"postgres\",\"results\":[");
    for (i, r) in e.results.iter().enumerate() {
        out.raw(if i > 0 { ",{" } else { "{" });
        // No field is always there: a comma before every field but the first.
        let mut first = true;
        let mut field = |out: &mut Out, key: &str| {
            if !std::mem::take(&mut first) {
                out.raw(",");
            }
            out.raw(key);
        };
        if let Some(message) = &r.message {
            field(&mut out, "\"message\":");
            out.str(capped(message, limits::TEXT));
        }
        if let Some(rows) = r.rows {
            field(&mut out, "\"rows\":");
            out.u64(rows);
        }
        if let Some(sqlstate) = &r.sqlstate {
            field(&mut out, "\"sqlstate\":");
            out.str(capped(sqlstate, limits::SHORT));
        }
        if let Some(tag) = &r.tag {
            field(&mut out, "\"tag\":");
            out.str(capped(tag, limits::SHORT));
        }
        out.raw("}");
    }
    out.raw("],\"started\":");
    out.i64(nanos(e.started));
    out.raw(",\"stream\":");
    out.u64(e.stream);
    out.raw("}");
    out.0
}

/// Which header names carry credentials, remembered: every exchange brings
/// the same few names, and deciding takes a lowercase copy and a dozen
/// substring searches.
#[derive(Debug, Default)]
pub(crate) struct SensitiveNames(RefCell<HashMap<Box<str>, bool, foldhash::fast::RandomState>>);

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

/// The serde encoding of PostgreSQL records that [`postgres`] replaced,
/// kept as the reference it must match byte for byte.
#[cfg(test)]
mod pg_reference {
    use serde::{Serialize, Serializer};

    use super::{capped, limits, nanos, PostgresExchange};
    use crate::record::{PostgresMessage, PostgresResult};

    pub(crate) fn postgres(e: &PostgresExchange) -> String {
        super::to_json(&Postgres {
            duration_ns: u64::try_from(e.duration.as_nanos()).unwrap_or(u64::MAX),
            messages: PgMessages(&e.messages),
            outcome: e.outcome.as_str(),
            protocol: "postgres",
            results: PgResults(&e.results),
            started: nanos(e.started),
            stream: e.stream,
        })
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
}

/// A stored (possibly cut) body; [`super::BodyData`] is its owned, readable
/// form.
pub(crate) struct Body<'a> {
    content: Cow<'a, str>,
    encoding: &'static str,
    stored: u64,
    truncated: bool,
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
        assert_eq!(data, pg_reference::postgres(&e), "as serde encodes it");
        assert_eq!(canonical_json(&serde_json::from_str(&data).unwrap()), data, "canonical");
        // Every optional field present or absent, empty lists, long lists.
        let full_message = PostgresMessage {
            decision: Some(AWKWARD.into()),
            keys: Some(u64::MAX),
            kind: AWKWARD.into(),
            masked: Some(true),
            params: Some((0..limits::HEADERS + 3).map(|i| (i % 3 != 0).then(|| format!("{AWKWARD}{i}"))).collect()),
            rule: Some("r".into()),
            sql: Some(format!("select '{AWKWARD}'")),
        };
        let full_result = PostgresResult {
            message: Some(AWKWARD.into()),
            rows: Some(0),
            sqlstate: Some("XX000".into()),
            tag: Some(AWKWARD.into()),
        };
        let variants = [
            PostgresExchange { messages: Vec::new(), results: Vec::new(), ..e.clone() },
            PostgresExchange {
                messages: vec![full_message.clone(), PostgresMessage::default(), full_message],
                results: vec![PostgresResult::default(), full_result.clone()],
                started: UNIX_EPOCH - Duration::from_secs(1),
                duration: Duration::MAX,
                outcome: PostgresOutcome::Incomplete,
                ..e.clone()
            },
            PostgresExchange {
                messages: vec![PostgresMessage { params: Some(Vec::new()), ..PostgresMessage::default() }],
                results: vec![
                    PostgresResult { rows: Some(5), ..PostgresResult::default() },
                    PostgresResult { sqlstate: Some("1".into()), ..PostgresResult::default() },
                    PostgresResult { tag: Some("t".into()), ..PostgresResult::default() },
                    full_result,
                ],
                outcome: PostgresOutcome::Ready,
                ..e.clone()
            },
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_eq!(postgres(v), pg_reference::postgres(v), "variant {i}");
        }
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
    fn strings_escape_exactly_as_serde_json_escapes_them() {
        let serde = |s: &str| serde_json::to_string(s).unwrap();
        let ours = |s: &str| {
            let mut out = Out(String::new());
            out.str(s);
            out.0
        };
        // Every character up to U+00FF, alone and at every offset of a word.
        for c in (0u32..=0xff).filter_map(char::from_u32) {
            for lead in 0..17 {
                for tail in [0, 1, 9] {
                    let s = format!("{}{c}{}", "a".repeat(lead), "é".repeat(tail));
                    assert_eq!(ours(&s), serde(&s), "{s:?}");
                }
            }
        }
        // Runs of escapes, multi-byte characters across words, and longer
        // random texts over an alphabet rich in what is escaped.
        let alphabet: Vec<char> = "\"\\\n\t\r\u{8}\u{c}\u{0}\u{1f}\u{7f}aZ9 /é€😀\u{2028}".chars().collect();
        use rand::Rng as _;
        let mut rng = rand::rng();
        for _ in 0..2_000 {
            let len = rng.random_range(0..64);
            let s: String = (0..len).map(|_| alphabet[rng.random_range(0..alphabet.len())]).collect();
            assert_eq!(ours(&s), serde(&s), "{s:?}");
        }
        for n in [0u64, 1, 9, 10, 99, 100, u64::from(u32::MAX), u64::MAX] {
            let mut out = Out(String::new());
            out.u64(n);
            assert_eq!(out.0, serde_json::to_string(&n).unwrap());
        }
        for n in [i64::MIN, -1, 0, 1, i64::MAX] {
            let mut out = Out(String::new());
            out.i64(n);
            assert_eq!(out.0, serde_json::to_string(&n).unwrap());
        }
        for level in [RecordLevel::Full, RecordLevel::Metadata, RecordLevel::None] {
            assert_eq!(serde_json::to_string(&level).unwrap(), format!("\"{}\"", level.as_str()));
        }
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
