//! One request's journey past the policy: masks the response when the
//! policy says so and records the exchange at the level it says, secrets
//! masked whatever the policy.

use std::{
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
    record::{redact_header_pairs, DecisionFacts, ExchangeRecord, RecordLevel, SessionRecorder},
    redact::is_sensitive_header,
};

/// What a request's body inspector learns that its recording needs.
#[derive(Debug, Default)]
pub struct RequestCapture {
    /// The first `cap` bytes of the request body as the client sent it.
    pub body: Vec<u8>,
    /// All request body bytes seen.
    pub total: u64,
    /// Ids of the findings the request produced.
    pub findings: Vec<String>,
    /// Content-Encoding of the request body.
    pub encoding: Option<String>,
}

impl RequestCapture {
    /// Keeps the start of the body, up to `cap`.
    pub fn push(&mut self, chunk: &[u8], cap: usize) {
        self.total += chunk.len() as u64;
        let room = cap.saturating_sub(self.body.len());
        self.body.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
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
            let room = self.cap.saturating_sub(self.response_body.len());
            self.response_body.extend_from_slice(&data[..data.len().min(room)]);
        }
    }

    /// A captured body as a recording may hold it: decoded and masked.
    fn for_recording(&self, data: &[u8], encoding: Option<&str>) -> Bytes {
        if data.is_empty() {
            return Bytes::new();
        }
        let encoding = encoding.unwrap_or("");
        if is_identity(encoding) {
            // Plain already: mask the capture itself, not a decoded copy.
            return Bytes::from(self.recording.mask_bytes(&data[..data.len().min(self.cap)]).0);
        }
        match decode_prefix(encoding, data, self.cap) {
            Some(plain) => Bytes::from(self.recording.mask_bytes(&plain).0),
            None => Bytes::from(format!("[{} bytes in an undecodable encoding: not recorded]", data.len())),
        }
    }
}

/// Names remembered per thread by [`redact_response_headers`]; a response
/// with ever new names only makes the memory start over.
const MAX_REMEMBERED_NAMES: usize = 1024;

thread_local! {
    /// Which header names carry credentials, as `is_sensitive_header` says.
    static SENSITIVE_NAMES: RefCell<HashMap<http::HeaderName, bool>> = RefCell::new(HashMap::new());
}

/// What `record::redact_headers` returns, for every response at `full`:
/// responses bring the same few names, so whether a name is a credential
/// name is remembered rather than decided again (a lowercase copy and a
/// dozen substring searches per header).
fn redact_response_headers(headers: &http::HeaderMap) -> Vec<(String, String)> {
    SENSITIVE_NAMES.with(|known| {
        // Never borrowed re-entrantly: nothing below calls back.
        let mut known = known.borrow_mut();
        headers
            .iter()
            .map(|(name, value)| {
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
            })
            .collect()
    })
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
            let mut headers = parts.headers.clone();
            self.recording.mask_headers(&mut headers);
            self.response_headers = redact_response_headers(&headers);
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
            session.event("masked", json!({ "stream": self.stream, "count": masked_total, "rules": rules }));
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
            outcome: exchange.outcome.as_str().to_owned(),
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
