//! One request's journey past the policy: masks the response when the
//! policy says so and records the exchange at the level it says, secrets
//! masked whatever the policy.
//!
//! Captured bodies run [`MASK_SLACK`] bytes past what is kept: they are
//! decoded and masked whole, and only then cut, so a key (or an escaped,
//! longer form of one) that straddles the cut is masked rather than kept in
//! part.

use std::{
    borrow::Cow,
    cell::RefCell,
    collections::HashMap,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use bytes::Bytes;
use serde_json::json;

use super::masks::decode_prefix;
use crate::{
    http::{Exchange, ResponseInspector, ResponseVerdict},
    mask::{BodyMasker, Masker},
    record::{redact_header_pairs, DecisionFacts, EventKind, ExchangeRecord, RecordLevel, SessionRecorder},
    redact::is_sensitive_header,
};

/// Bytes captured past a recording's or preview's cut: room for the
/// longest key the masker must see whole, in its longest (escaped) form.
pub const MASK_SLACK: usize = 16 * 1024;

/// What a request's body inspector learns that its recording needs.
#[derive(Debug, Default)]
pub struct RequestCapture {
    /// The first `cap` + [`MASK_SLACK`] bytes of the request body as the
    /// client sent it.
    pub body: Vec<u8>,
    /// All request body bytes seen.
    pub total: u64,
    /// Ids of the findings the request produced.
    pub findings: Vec<String>,
    /// Content-Encoding of the request body.
    pub encoding: Option<String>,
}

impl RequestCapture {
    /// Keeps the start of the body: what a recording or preview of `cap`
    /// bytes needs (`cap` + [`MASK_SLACK`]).
    pub fn push(&mut self, chunk: &[u8], cap: usize) {
        self.total += chunk.len() as u64;
        let room = cap.saturating_add(MASK_SLACK).saturating_sub(self.body.len());
        self.body.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    /// The start of the body as approvers may see it: decoded, masked, then
    /// cut to at most `max` bytes.
    pub fn masked_preview(&self, masker: &Masker, max: usize) -> String {
        match masked_prefix(masker, &self.body, self.encoding.as_deref(), max) {
            Some(masked) => String::from_utf8_lossy(&masked).into_owned(),
            None => format!("[{} bytes in an undecodable content encoding]", self.total),
        }
    }
}

/// The first `cap` bytes of a captured body (`encoding` undone), masked
/// before the cut; `None` when the encoding cannot be decoded.
fn masked_prefix(masker: &Masker, data: &[u8], encoding: Option<&str>, cap: usize) -> Option<Vec<u8>> {
    let encoding = encoding.unwrap_or("");
    let seen = cap.saturating_add(MASK_SLACK);
    let plain = if is_identity(encoding) {
        // Plain already: mask the capture itself, not a decoded copy.
        Cow::Borrowed(&data[..data.len().min(seen)])
    } else {
        Cow::Owned(decode_prefix(encoding, data, seen)?)
    };
    let mut masked = masker.mask_bytes(&plain).0;
    if masked.len() > cap {
        // On a character boundary, so that a text body stays text.
        let mut end = cap;
        while end > 0 && masked[end] & 0xc0 == 0x80 {
            end -= 1;
        }
        masked.truncate(if end == 0 { cap } else { end });
    }
    Some(masked)
}

/// Shared between a request's body inspector and its [`ExchangeWatch`].
pub type SharedCapture = Arc<Mutex<RequestCapture>>;

/// Locks a capture; a poisoned lock still holds usable data.
pub fn lock(capture: &SharedCapture) -> std::sync::MutexGuard<'_, RequestCapture> {
    match capture.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// How a request head looked, for its recording (masked already).
pub struct RequestSummary {
    /// Request method.
    pub method: String,
    /// Path and query, secrets masked.
    pub url: String,
    /// gRPC or Connect `service/method`.
    pub rpc: Option<String>,
    /// Headers, credentials redacted and secrets masked.
    pub headers: Vec<(String, String)>,
    /// When the request arrived.
    pub started: SystemTime,
}

/// The [`ResponseInspector`] of one forwarded request.
pub struct ExchangeWatch {
    conn_id: u64,
    stream: u64,
    session: Option<Arc<SessionRecorder>>,
    level: RecordLevel,
    decision: DecisionFacts,
    request: RequestSummary,
    capture: SharedCapture,
    /// The policy's mask for this request: compiled, or why it could not be.
    mask: Option<Result<Arc<Masker>, String>>,
    body_masker: Option<BodyMasker>,
    recording: Arc<Masker>,
    cap: usize,
    response_headers: Vec<(String, String)>,
    response_encoding: Option<String>,
    response_body: Vec<u8>,
    masked_in_headers: usize,
}

/// Everything an [`ExchangeWatch`] is built from.
pub struct WatchSpec {
    /// The connection.
    pub conn_id: u64,
    /// Sequence number of the request on its connection.
    pub stream: u64,
    /// The connection's session, when it is recorded.
    pub session: Option<Arc<SessionRecorder>>,
    /// How much of the exchange is recorded.
    pub level: RecordLevel,
    /// The deciding policy rule and its action.
    pub decision: DecisionFacts,
    /// The request head, masked.
    pub request: RequestSummary,
    /// Filled in by the body inspector.
    pub capture: SharedCapture,
    /// Response masking the policy asks for.
    pub mask: Option<Result<Arc<Masker>, String>>,
    /// Masks recordings.
    pub recording: Arc<Masker>,
    /// Body bytes kept per direction.
    pub cap: usize,
}

impl ExchangeWatch {
    /// A watch for one request.
    pub fn new(spec: WatchSpec) -> ExchangeWatch {
        ExchangeWatch {
            conn_id: spec.conn_id,
            stream: spec.stream,
            session: spec.session,
            level: spec.level,
            decision: spec.decision,
            request: spec.request,
            capture: spec.capture,
            mask: spec.mask,
            body_masker: None,
            recording: spec.recording,
            cap: spec.cap,
            response_headers: Vec::new(),
            response_encoding: None,
            response_body: Vec::new(),
            masked_in_headers: 0,
        }
    }

    fn full(&self) -> bool {
        self.session.is_some() && self.level == RecordLevel::Full
    }

    fn keep(&mut self, data: &[u8]) {
        if self.full() {
            let room = self.cap.saturating_add(MASK_SLACK).saturating_sub(self.response_body.len());
            self.response_body.extend_from_slice(&data[..data.len().min(room)]);
        }
    }

    /// A captured body as a recording may hold it: decoded, masked, cut.
    fn for_recording(&self, data: &[u8], encoding: Option<&str>) -> Bytes {
        if data.is_empty() {
            return Bytes::new();
        }
        match masked_prefix(&self.recording, data, encoding, self.cap) {
            Some(masked) => Bytes::from(masked),
            None => Bytes::from(format!("[{} bytes in an undecodable encoding: not recorded]", data.len())),
        }
    }
}

/// Names remembered per thread by [`redact_response_headers`]; a response
/// with ever new names only makes the memory start over.
const MAX_REMEMBERED_NAMES: usize = 1024;

thread_local! {
    /// Which header names carry credentials, as `is_sensitive_header` says.
    /// (foldhash: SipHash cost more per request than the decisions it saved;
    /// the memory is bounded, so forced collisions only slow it down.)
    static SENSITIVE_NAMES: RefCell<HashMap<http::HeaderName, bool, foldhash::fast::RandomState>> =
        RefCell::new(HashMap::default());
}

/// What `record::redact_headers` returns, for every request and response
/// recorded at `full`: they bring the same few names, so whether a name is a credential
/// name is remembered rather than decided again (a lowercase copy and a
/// dozen substring searches per header).
#[cfg(test)]
pub(crate) fn redact_response_headers(headers: &http::HeaderMap) -> Vec<(String, String)> {
    SENSITIVE_NAMES.with(|known| {
        // Never borrowed re-entrantly: nothing below calls back.
        let mut known = known.borrow_mut();
        headers.iter().map(|(name, value)| redacted_pair(&mut known, name, value)).collect()
    })
}

/// A head's headers as a recording keeps them: masked by the recording
/// masker (lines it passed clean before are remembered, see
/// [`Masker::masked_headers_remembered`]), then credentials redacted as
/// [`redact_response_headers`] does. The same pairs as masking a copy of
/// the map and redacting it, without the copy.
pub(crate) fn recorded_headers(recording: &Arc<Masker>, headers: &http::HeaderMap) -> Vec<(String, String)> {
    let mut pairs = Vec::with_capacity(headers.len());
    SENSITIVE_NAMES.with(|known| {
        // Never borrowed re-entrantly: nothing below calls back.
        let mut known = known.borrow_mut();
        recording.masked_headers_remembered(headers, |name, value| pairs.push(redacted_pair(&mut known, name, value)));
    });
    pairs
}

/// One header as a recording keeps it: credentials redacted (whether a name
/// is a credential's is remembered in `known`).
fn redacted_pair(
    known: &mut HashMap<http::HeaderName, bool, foldhash::fast::RandomState>,
    name: &http::HeaderName,
    value: &http::HeaderValue,
) -> (String, String) {
    let sensitive = match known.get(name) {
        Some(&sensitive) => sensitive,
        None => {
            let sensitive = is_sensitive_header(name.as_str());
            if known.len() >= MAX_REMEMBERED_NAMES {
                known.clear();
            }
            known.insert(name.clone(), sensitive);
            sensitive
        }
    };
    let pair = (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned());
    match sensitive {
        false => pair,
        true => redact_header_pairs(&[pair]).pop().unwrap_or_default(),
    }
}

/// Whether a `Content-Encoding` value means no encoding (as `decode_prefix`
/// reads it).
fn is_identity(encoding: &str) -> bool {
    let encoding = encoding.trim();
    encoding.is_empty() || encoding.eq_ignore_ascii_case("identity")
}

fn refuse(conn_id: u64, reason: &str) -> http::Response<Bytes> {
    let body = json!({
        "error": "response_not_maskable",
        "message": format!("The CI gateway must mask this response but cannot ({reason}); it was not delivered."),
        "conn_id": conn_id,
    });
    super::json_response(http::StatusCode::BAD_GATEWAY, &body)
}

impl ResponseInspector for ExchangeWatch {
    fn head(&mut self, parts: &mut http::response::Parts) -> ResponseVerdict {
        let encoding =
            parts.headers.get(http::header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let verdict = match &self.mask {
            Some(Err(reason)) => return ResponseVerdict::Replace(refuse(self.conn_id, reason)),
            Some(Ok(masker)) => {
                self.masked_in_headers = masker.mask_headers(&mut parts.headers).len();
                match masker.body(encoding.as_deref()) {
                    Ok(body) => {
                        self.body_masker = Some(body);
                        ResponseVerdict::Filter
                    }
                    // Never deliver what could not be masked.
                    Err(e) => return ResponseVerdict::Replace(refuse(self.conn_id, &e.to_string())),
                }
            }
            None if self.full() => ResponseVerdict::Observe,
            None => ResponseVerdict::Pass,
        };
        self.response_encoding = encoding;
        if self.full() {
            self.response_headers = recorded_headers(&self.recording, &parts.headers);
        }
        verdict
    }

    fn observe(&mut self, data: &Bytes) {
        self.keep(data);
    }

    fn chunk(&mut self, data: Bytes) -> Result<Bytes, String> {
        let Some(masker) = self.body_masker.as_mut() else { return Ok(data) };
        let out = masker.push(&data).map_err(|e| e.to_string())?;
        self.keep(&out);
        Ok(out)
    }

    fn trailers(&mut self, trailers: &mut http::HeaderMap) {
        if let Some(Ok(masker)) = &self.mask {
            self.masked_in_headers += masker.mask_headers(trailers).len();
        }
    }

    fn end(&mut self) -> Result<Bytes, String> {
        let Some(masker) = self.body_masker.as_mut() else { return Ok(Bytes::new()) };
        let out = masker.finish().map_err(|e| e.to_string())?;
        self.keep(&out);
        Ok(out)
    }

    fn finish(&mut self, exchange: &Exchange) {
        let masked = self.body_masker.as_mut().map(|m| m.take_masked()).unwrap_or_default();
        let masked_total = self.body_masker.as_ref().map_or(0, |m| m.masked_count()) as usize + self.masked_in_headers;
        let Some(session) = self.session.clone() else { return };
        if masked_total > 0 {
            let mut rules: Vec<&str> = masked.iter().map(|m| &*m.rule).collect();
            rules.sort_unstable();
            rules.dedup();
            session.event(EventKind::Masked, json!({ "stream": self.stream, "count": masked_total, "rules": rules }));
        }
        if self.level == RecordLevel::None {
            return;
        }
        let (request_body, request_body_size, findings) = {
            let mut capture = lock(&self.capture);
            let body =
                if self.full() { self.for_recording(&capture.body, capture.encoding.as_deref()) } else { Bytes::new() };
            (body, capture.total, std::mem::take(&mut capture.findings))
        };
        let response_body = self.for_recording(&self.response_body, self.response_encoding.as_deref());
        // A watch finishes once: what it recorded can be moved out.
        session.exchange(ExchangeRecord {
            level: self.level,
            stream: self.stream,
            started: self.request.started,
            duration: exchange.duration,
            method: std::mem::take(&mut self.request.method),
            url: std::mem::take(&mut self.request.url),
            status: exchange.status,
            outcome: exchange.outcome,
            rpc: self.request.rpc.take(),
            request_headers: std::mem::take(&mut self.request.headers),
            request_body,
            request_body_size,
            response_headers: std::mem::take(&mut self.response_headers),
            response_body,
            // What the client received (the watch counts bytes only when
            // it sees the body, at `full` or when masking).
            response_body_size: exchange.bytes_down,
            decision: Some(std::mem::take(&mut self.decision)),
            findings,
        });
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderName, HeaderValue};

    use super::*;

    #[test]
    fn response_headers_are_redacted_as_redact_headers_does() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("content-type", "application/json"),
            ("set-cookie", "sid=s3cr3t; HttpOnly"),
            ("set-cookie", "theme=dark"),
            ("authorization", "Bearer s3cr3t"),
            ("x-upstream-token", "s3cr3t"),
            ("x-request-id", "abc"),
            ("www-authenticate", "Basic realm=x"),
        ] {
            headers.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        headers.append("x-binary", HeaderValue::from_bytes(b"\xff\xfeok").unwrap());
        // Twice: the second time from the remembered names.
        for _ in 0..2 {
            assert_eq!(redact_response_headers(&headers), crate::record::redact_headers(&headers));
        }
        let redacted = redact_response_headers(&headers);
        assert!(redacted.iter().all(|(_, v)| !v.contains("s3cr3t")), "{redacted:?}");
        // Past the memory's bound it starts over and stays right.
        for i in 0..MAX_REMEMBERED_NAMES + 10 {
            let mut one = HeaderMap::new();
            one.insert(HeaderName::try_from(format!("x-h{i}")).unwrap(), HeaderValue::from_static("v"));
            assert_eq!(redact_response_headers(&one), vec![(format!("x-h{i}"), "v".to_owned())]);
        }
        assert_eq!(redact_response_headers(&headers), crate::record::redact_headers(&headers));
        SENSITIVE_NAMES.with(|known| assert!(known.borrow().len() <= MAX_REMEMBERED_NAMES));
    }

    fn recording_masker() -> Masker {
        let detector = std::sync::Arc::new(crate::detect::Detector::builtin().expect("built-in rules"));
        Masker::new(detector, &crate::mask::MaskSpec::default()).expect("masker")
    }

    /// A fake OpenAI project key, made up at run time.
    fn fake_key() -> String {
        use rand::{distr::Alphanumeric, Rng as _};
        let random = |n| rand::rng().sample_iter(&Alphanumeric).take(n).map(char::from).collect::<String>();
        format!("sk-proj-{}T3BlbkFJ{}", random(40), random(40))
    }

    #[test]
    fn recorded_headers_are_a_masked_and_redacted_copy() {
        let masker = Arc::new(recording_masker());
        let key = fake_key();
        let mut headers = HeaderMap::new();
        headers.append("content-type", HeaderValue::from_static("application/json"));
        headers.append("authorization", HeaderValue::from_str(&format!("Bearer {key}")).unwrap());
        headers.append("x-note", HeaderValue::from_str(&format!("see {key} here")).unwrap());
        headers.append("set-cookie", HeaderValue::from_static("sid=1"));
        headers.append("x-note", HeaderValue::from_static("second"));
        let mut masked = headers.clone();
        masker.mask_headers(&mut masked);
        let expected = redact_response_headers(&masked);
        // The first time fills the memory of clean lines; later ones use it.
        for round in 0..3 {
            let got = recorded_headers(&masker, &headers);
            assert_eq!(got, expected, "round {round}");
            assert!(got.iter().all(|(_, v)| !v.contains(&key)), "round {round}: {got:?}");
        }
        // Both values of a repeated name are kept, the keyed one masked.
        let notes: Vec<&str> = expected.iter().filter(|(n, _)| n == "x-note").map(|(_, v)| v.as_str()).collect();
        assert!(notes.len() == 2 && notes[0].starts_with("see [MASKED:") && notes[1] == "second", "{expected:?}");
    }

    #[test]
    fn a_key_across_the_cut_is_masked_not_kept_in_part() {
        let masker = recording_masker();
        let key = fake_key();
        let lead = "x ".repeat(50);
        for escaped in [false, true] {
            let written = if escaped { key.replace('-', "\\u002d") } else { key.clone() };
            let body = format!("{{\"pad\": \"{lead}\", \"key\": \"{written}\", \"end\": 1}}");
            let cap = body.find(&written).expect("key in body") + 20;
            let mut capture = RequestCapture::default();
            capture.push(body.as_bytes(), cap);
            let kept = masked_prefix(&masker, &capture.body, None, cap).expect("identity");
            assert!(kept.len() <= cap);
            let kept = String::from_utf8(kept).expect("text");
            assert!(kept.contains("[MASKED:"), "escaped {escaped}: {kept}");
            assert!(!kept.contains(&written[..12]), "the start of the key is kept (escaped {escaped})");
        }
    }

    #[test]
    fn previews_and_recordings_decode_before_masking() {
        use std::io::Write as _;
        let masker = recording_masker();
        let key = fake_key();
        let doc = format!("{{\"a\": \"\\u0073{}\", \"b\": \"{}\"}}", &key[1..], key.replace('-', "%2D"));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(doc.as_bytes()).expect("gzip");
        let mut capture = RequestCapture { encoding: Some("gzip".into()), ..RequestCapture::default() };
        capture.push(&gz.finish().expect("gzip"), 4096);
        let preview = capture.masked_preview(&masker, 4096);
        assert_eq!(preview, "{\"a\": \"[MASKED:openai-project-key]\", \"b\": \"[MASKED:openai-project-key]\"}");
        let unknown =
            RequestCapture { encoding: Some("zstd".into()), body: b"(zstd)".to_vec(), total: 6, ..Default::default() };
        assert_eq!(unknown.masked_preview(&masker, 4096), "[6 bytes in an undecodable content encoding]");
    }

    #[test]
    fn identity_encodings() {
        for identity in ["", " ", "identity", "Identity "] {
            assert!(is_identity(identity), "{identity:?}");
        }
        for other in ["gzip", "br", "identity, gzip"] {
            assert!(!is_identity(other), "{other:?}");
        }
    }
}
