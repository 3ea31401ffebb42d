//! Masking: secrets are replaced with `[MASKED:<rule>]` in upstream
//! responses before the client sees them (when the policy says so), and in
//! everything the gateway stores or logs about a request (always).
//!
//! A [`Masker`] is compiled once per policy rule from a [`MaskSpec`]: which
//! detector rules to apply, named regex patterns and JSON field names. It
//! masks bodies streamed in chunks ([`Masker::body`] → [`BodyMasker`]),
//! which undoes and redoes `gzip`, `deflate` and `br` content encodings.
//! Streaming holds back the last bytes of the data seen (at most
//! [`Masker::max_hold_back`]) until it is certain that no secret starts in
//! them, so a secret split across chunks is still replaced whole and the
//! output never depends on how the body was chunked.
//!
//! What is stored or logged goes through the one-shot methods instead:
//! whole buffers ([`Masker::mask_bytes`], [`Masker::mask_text`]) and header
//! values ([`Masker::mask_headers`]). They also find the detector's secrets
//! in their encoded forms (`views`: percent-encoding, form encoding,
//! backslash escapes, quoted-printable, base64) and mask those where they
//! stand, so no recording, approval, finding or log line keeps a key in any
//! encoding. The log itself is masked line by line ([`log`]). See
//! `docs/masking.md`.

use std::{borrow::Cow, cell::RefCell, collections::HashMap, fmt, hash::BuildHasher as _, sync::Arc};

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::detect::{
    rules::{MAX_LOOKBACK, MAX_WINDOW},
    Detector,
};

mod codec;
mod json;
pub mod log;
mod pattern;
mod plain;
pub(crate) mod views;
mod window;

#[cfg(test)]
mod tests;

pub use codec::{supported_encodings, BodyMasker};
pub use json::MAX_FIELD_LEN;
pub use pattern::MAX_PATTERN_LEN;

use json::{Field, JsonFields};
use pattern::{BoundedRegex, LOOK};
use plain::PlainMasker;
use window::{LabelId, Range};

/// Longest pattern name accepted.
pub const MAX_NAME_LEN: usize = 64;
/// The rule named when a text holds more nested encodings than the one-shot
/// methods decode: the whole text is replaced rather than kept unmasked.
pub const TOO_MANY_ENCODINGS: &str = "too-many-encodings";
/// [`Masked`] records kept per stream until taken; the count goes on.
const MAX_LOGGED: usize = 1024;
/// Header lines [`Masker::mask_headers_remembered`] remembers per thread;
/// when full, the memory starts over.
const MAX_REMEMBERED_LINES: usize = 256;
/// Longest header value remembered (longer ones are masked every time).
const MAX_REMEMBERED_VALUE: usize = 512;

/// A remembered line: the header name (empty for a text) and the value.
type CleanLine = (Box<str>, Box<[u8]>);

/// Header lines one masker passed unchanged, for
/// [`Masker::mask_headers_remembered`]: owned copies (a parsed value would
/// pin its whole read buffer), found by a hash and compared in full.
#[derive(Default)]
struct CleanLines {
    /// The masker they passed; held, so that its address is not reused.
    masker: Option<Arc<Masker>>,
    /// Seeded per memory; foldhash rather than SipHash: a collision (found
    /// or forced) only costs a re-scan, since lines are compared in full,
    /// and the memory is bounded.
    hasher: foldhash::fast::RandomState,
    lines: HashMap<u64, CleanLine, foldhash::fast::RandomState>,
}

impl CleanLines {
    /// Starts over unless the memory is `masker`'s.
    fn serve(&mut self, masker: &Arc<Masker>) {
        if !self.masker.as_ref().is_some_and(|m| Arc::ptr_eq(m, masker)) {
            *self = CleanLines { masker: Some(Arc::clone(masker)), ..CleanLines::default() };
        }
    }

    fn key(&self, name: &HeaderName, value: &HeaderValue) -> u64 {
        self.hasher.hash_one((name.as_str(), value.as_bytes()))
    }

    fn contains(&self, key: u64, name: &HeaderName, value: &HeaderValue) -> bool {
        self.lines.get(&key).is_some_and(|(n, v)| **n == *name.as_str() && **v == *value.as_bytes())
    }
}

thread_local! {
    static CLEAN_LINES: RefCell<CleanLines> = RefCell::new(CleanLines::default());
}

/// What to mask, as a policy rule states it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaskSpec {
    /// Which detector rules' matches are masked.
    pub rules: MaskRules,
    /// Named regular expressions whose matches are masked.
    pub patterns: Vec<MaskPattern>,
    /// JSON field names whose values are masked (exact, case-sensitive).
    pub json_fields: Vec<String>,
}

/// Detector rules whose matches are masked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum MaskRules {
    /// Every rule of the detector.
    #[default]
    All,
    /// Only these rule ids (none: the detector is not used).
    Only(Vec<String>),
}

/// A named regular expression (Rust `regex` syntax) to mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskPattern {
    /// Name shown in the replacement, `[MASKED:<name>]`: letters, digits,
    /// `_`, `.` and `-`.
    pub name: String,
    /// The expression; its matches must be between 1 and
    /// [`MAX_PATTERN_LEN`] bytes long.
    pub regex: String,
}

/// A literal for [`Masker::replacing`]: every occurrence of `needle` is
/// replaced by `text`.
#[derive(Clone, PartialEq, Eq)]
pub struct Replacement {
    /// The bytes to find (a secret: never logged).
    pub needle: Vec<u8>,
    /// What replaces them (visible ASCII).
    pub text: String,
}

impl fmt::Debug for Replacement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replacement").field("needle_len", &self.needle.len()).field("text", &self.text).finish()
    }
}

/// Why a masker could not be built or a body could not be masked.
#[derive(Debug, thiserror::Error)]
pub enum MaskError {
    /// A pattern is unusable.
    #[error("mask pattern `{name}`: {reason}")]
    Pattern {
        /// The pattern's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A rule id in [`MaskRules::Only`] is not one of the detector's rules.
    #[error("mask rule `{0}` is not an active detector rule")]
    UnknownRule(String),
    /// A JSON field name is unusable.
    #[error("mask json field {name:?}: {reason}")]
    JsonField {
        /// The field name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The body's `Content-Encoding` cannot be decoded and re-encoded.
    #[error("unsupported content-encoding `{0}` (supported: gzip, deflate, br)")]
    UnsupportedEncoding(String),
    /// The compressed body is malformed or truncated.
    #[error("cannot decode the {encoding} body: {reason}")]
    Decode {
        /// The content encoding.
        encoding: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
    /// The masked body could not be compressed again.
    #[error("cannot re-encode the masked body as {encoding}: {reason}")]
    Encode {
        /// The content encoding.
        encoding: &'static str,
        /// The encoder's complaint.
        reason: String,
    },
    /// The body decompresses to far more than it is (a decompression bomb).
    #[error("the {encoding} body expands more than {ratio}:1 beyond its first {slack} decoded bytes")]
    Expansion {
        /// The content encoding.
        encoding: &'static str,
        /// Largest decoded-to-encoded ratio accepted.
        ratio: u64,
        /// Decoded bytes always accepted.
        slack: u64,
    },
    /// The masker failed before or was finished; nothing more comes out.
    #[error("body masker already failed or finished")]
    Closed,
}

/// One replacement: which rule matched and where. Never holds the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masked {
    /// Detector rule id, pattern name, or `json:<field>`.
    pub rule: Arc<str>,
    /// Where the replaced text was.
    pub location: MaskLocation,
}

/// Where a replacement was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskLocation {
    /// In the value of this header.
    Header(HeaderName),
    /// In the (decoded) body, at this byte offset of the original plaintext.
    Body {
        /// Offset of the first replaced byte.
        offset: u64,
    },
}

impl fmt::Display for MaskLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MaskLocation::Header(name) => write!(f, "header:{name}"),
            MaskLocation::Body { offset } => write!(f, "body@{offset}"),
        }
    }
}

/// Replacements made so far in one stream: the first [`MAX_LOGGED`] not yet
/// taken, and the total count.
#[derive(Debug, Default)]
pub(crate) struct MaskedLog {
    items: Vec<Masked>,
    total: u64,
}

impl MaskedLog {
    pub(crate) fn push(&mut self, masked: Masked) {
        self.total += 1;
        if self.items.len() < MAX_LOGGED {
            self.items.push(masked);
        }
    }

    pub(crate) fn take(&mut self) -> Vec<Masked> {
        std::mem::take(&mut self.items)
    }

    pub(crate) fn total(&self) -> u64 {
        self.total
    }
}

/// A replacement: the rule it names and the bytes written instead.
#[derive(Debug, Clone)]
pub(crate) struct Label {
    pub rule: Arc<str>,
    pub text: Box<[u8]>,
}

impl Label {
    fn new(rule: &str, quoted: bool) -> Self {
        let text = if quoted { format!("\"[MASKED:{rule}]\"") } else { format!("[MASKED:{rule}]") };
        Self { rule: Arc::from(rule), text: text.into_bytes().into_boxed_slice() }
    }
}

#[derive(Debug)]
pub(crate) struct CompiledPattern {
    regex: BoundedRegex,
    label: LabelId,
}

/// A compiled [`MaskSpec`]. Build it once and share it (`Arc<Masker>`):
/// it is `Send + Sync`, and per-response state lives in [`BodyMasker`].
pub struct Masker {
    /// Absent when no detector rule is selected.
    detector: Option<Arc<Detector>>,
    /// Selected detector rules and their labels.
    rule_labels: HashMap<Arc<str>, LabelId>,
    patterns: Vec<CompiledPattern>,
    json: Option<JsonFields>,
    /// Replacement texts; a lower id wins when ranges start together.
    labels: Vec<Label>,
    hold_back: usize,
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Masker")
            .field("rules", &self.rule_labels.len())
            .field("patterns", &self.patterns.len())
            .field("json_fields", &self.json.as_ref().map_or(0, |j| j.len()))
            .field("hold_back", &self.hold_back)
            .finish()
    }
}

impl Masker {
    /// Compiles `spec` against `detector`. Errors name the offending
    /// pattern, field or rule id.
    pub fn new(detector: Arc<Detector>, spec: &MaskSpec) -> Result<Masker, MaskError> {
        let mut labels = Vec::new();
        let mut rule_labels = HashMap::new();
        let selected: Option<&[String]> = match &spec.rules {
            MaskRules::All => None,
            MaskRules::Only(ids) => {
                if let Some(unknown) = ids.iter().find(|id| !detector.rule_ids().any(|r| r == id.as_str())) {
                    return Err(MaskError::UnknownRule(unknown.clone()));
                }
                Some(ids)
            }
        };
        // Detector priority order, so that the more specific rule names a
        // replacement when two matches start at the same byte.
        for id in detector.rule_ids() {
            if selected.is_none_or(|s| s.iter().any(|x| x == id)) {
                rule_labels.insert(Arc::from(id), label_id(labels.len()));
                labels.push(Label::new(id, false));
            }
        }
        let mut patterns = Vec::with_capacity(spec.patterns.len());
        for p in &spec.patterns {
            let err = |reason: String| MaskError::Pattern { name: p.name.clone(), reason };
            if p.name.is_empty()
                || p.name.len() > MAX_NAME_LEN
                || !p.name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            {
                return Err(err(format!("the name must be 1 to {MAX_NAME_LEN} letters, digits, '_', '.' or '-'")));
            }
            let regex = BoundedRegex::new(&p.regex).map_err(|e| err(format!("regex {e}")))?;
            patterns.push(CompiledPattern { regex, label: label_id(labels.len()) });
            labels.push(Label::new(&p.name, false));
        }
        let json = if spec.json_fields.is_empty() {
            None
        } else {
            let mut fields = Vec::with_capacity(spec.json_fields.len());
            for name in &spec.json_fields {
                let err = |reason: &str| MaskError::JsonField { name: name.clone(), reason: reason.to_string() };
                if name.is_empty() || name.len() > MAX_FIELD_LEN {
                    return Err(err(&format!("must be 1 to {MAX_FIELD_LEN} bytes")));
                }
                if name.bytes().any(|b| b == b'"' || b == b'\\' || b.is_ascii_control()) {
                    return Err(err("must not contain quotes, backslashes or control characters"));
                }
                let rule = format!("json:{name}");
                fields.push(Field {
                    name: name.as_bytes().into(),
                    string_label: label_id(labels.len()),
                    value_label: label_id(labels.len() + 1),
                });
                labels.push(Label::new(&rule, false));
                labels.push(Label::new(&rule, true));
            }
            Some(
                JsonFields::new(fields)
                    .map_err(|reason| MaskError::JsonField { name: spec.json_fields.join(", "), reason })?,
            )
        };
        let detector = (!rule_labels.is_empty()).then_some(detector);
        // The detector's stream keeps at most this much (see
        // `detect::stream`), the regexes their longest match plus look-around.
        let mut hold_back = detector.as_ref().map_or(0, |_| MAX_WINDOW + 2 * MAX_LOOKBACK);
        for p in &patterns {
            hold_back = hold_back.max(p.regex.max_len + LOOK);
        }
        if let Some(j) = &json {
            hold_back = hold_back.max(j.max_key_len() + LOOK);
        }
        Ok(Masker { detector, rule_labels, patterns, json, labels, hold_back })
    }

    /// A masker that replaces literal byte strings, each by its own text
    /// (request redaction: `[REDACTED:<rule>:<fingerprint>]`), through the
    /// same streaming window and content-encoding round trip as response
    /// masking. Each [`Masked`] it reports names the replacement's text as
    /// its rule, so a caller can tell which literals were found.
    pub fn replacing(replacements: &[Replacement]) -> Result<Masker, MaskError> {
        let mut labels = Vec::with_capacity(replacements.len());
        let mut patterns = Vec::with_capacity(replacements.len());
        let mut hold_back = 0;
        for r in replacements {
            let err = |reason: String| MaskError::Pattern { name: r.text.clone(), reason };
            // Every byte escaped: the literal is data, never syntax, and may
            // not be UTF-8.
            let mut source = String::with_capacity(6 + 4 * r.needle.len());
            source.push_str("(?-u:");
            for b in &r.needle {
                source.push_str(&format!("\\x{b:02x}"));
            }
            source.push(')');
            let regex = BoundedRegex::new(&source).map_err(|e| err(format!("literal {e}")))?;
            hold_back = usize::max(hold_back, regex.max_len + LOOK);
            patterns.push(CompiledPattern { regex, label: label_id(labels.len()) });
            labels.push(Label { rule: Arc::from(r.text.as_str()), text: r.text.as_bytes().into() });
        }
        Ok(Masker { detector: None, rule_labels: HashMap::new(), patterns, json: None, labels, hold_back })
    }

    /// Whether the spec masks anything at all.
    pub fn is_empty(&self) -> bool {
        self.detector.is_none() && self.patterns.is_empty() && self.json.is_none()
    }

    /// Most bytes a stream holds back: output lags input by at most this much
    /// until the stream ends. The usual lag is far less (about the
    /// detector's [`overlap`](Detector::overlap)); it grows only while a
    /// candidate such as a PEM block awaits its end.
    pub fn max_hold_back(&self) -> usize {
        self.hold_back
    }

    /// A streaming masker for a response body with this `Content-Encoding`
    /// (the header's value, several headers joined by commas). Fails for
    /// encodings it cannot decode and re-encode: the caller must then not
    /// pass the body through.
    pub fn body(self: &Arc<Self>, content_encoding: Option<&str>) -> Result<BodyMasker, MaskError> {
        BodyMasker::new(Arc::clone(self), content_encoding)
    }

    /// Masks a whole buffer as a stored or logged copy may hold it (a
    /// recorded body, a URL, an approval preview, a log line): what
    /// streaming it through [`body`](Self::body) masks, plus the detector's
    /// secrets in their encoded forms (see `views`), masked where they
    /// stand: exactly the escape sequences of a JSON-escaped or
    /// percent-encoded key, the whole base64 run holding one. A buffer with
    /// more nested encodings than can be decoded within bounds is replaced
    /// whole by `[MASKED:too-many-encodings]`.
    pub fn mask_bytes(&self, data: &[u8]) -> (Vec<u8>, Vec<Masked>) {
        let mut log = MaskedLog::default();
        let out = self.mask_stored(data, &mut log).into_owned();
        (out, log.take())
    }

    /// [`mask_bytes`](Self::mask_bytes) for text, borrowing it back when
    /// nothing needed masking (the usual case for a log line or a URL).
    pub fn mask_text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match self.mask_stored(text.as_bytes(), &mut MaskedLog::default()) {
            Cow::Borrowed(_) => Cow::Borrowed(text),
            // Ranges cover whole characters and labels are ASCII; lossy only
            // in name.
            Cow::Owned(bytes) => Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()),
        }
    }

    /// Masks header values in place (all headers, `Set-Cookie` included) and
    /// returns what was replaced. Detector rules see `name: value`, so rules
    /// keyed on a name (`x-api-key: …`) apply, encoded forms included (a
    /// base64 value is masked whole); only the value is changed.
    pub fn mask_headers(&self, headers: &mut HeaderMap) -> Vec<Masked> {
        let mut masked = Vec::new();
        let mut text = Vec::new();
        for (name, value) in headers.iter_mut() {
            self.mask_header(name, value, &mut text, &mut masked);
        }
        masked
    }

    /// [`mask_headers`](Self::mask_headers) for a masker that sees the same
    /// header lines again and again (the recording masker: `Host`,
    /// `User-Agent`, `Server`, `Content-Type` on every request of a
    /// connection). Masking is a function of the masker and the bytes
    /// alone, so a line this masker passed unchanged passes unchanged again:
    /// each thread remembers up to [`MAX_REMEMBERED_LINES`] such lines and
    /// skips the detector and its views for them. Only lines that needed no
    /// masking are remembered, and only to be compared with.
    pub fn mask_headers_remembered(self: &Arc<Self>, headers: &mut HeaderMap) -> Vec<Masked> {
        CLEAN_LINES.with(|memory| {
            // Never borrowed re-entrantly: masking does not call back here.
            let mut memory = memory.borrow_mut();
            memory.serve(self);
            let mut masked = Vec::new();
            let mut text = Vec::new();
            for (name, value) in headers.iter_mut() {
                let key = memory.key(name, value);
                if memory.contains(key, name, value) {
                    continue;
                }
                let before = masked.len();
                self.mask_header(name, value, &mut text, &mut masked);
                if masked.len() == before && value.len() <= MAX_REMEMBERED_VALUE {
                    if memory.lines.len() >= MAX_REMEMBERED_LINES {
                        memory.lines.clear();
                    }
                    memory.lines.insert(key, (name.as_str().into(), value.as_bytes().into()));
                }
            }
            masked
        })
    }

    /// What [`mask_headers_remembered`](Self::mask_headers_remembered) would
    /// leave in `headers`, without changing them or copying the map (a
    /// recording's copy of a head): `each` gets every header in order with
    /// its masked value, the original one when nothing needed masking. Only
    /// values that are not remembered clean are copied, to be masked.
    /// `each` must not mask (the memory is borrowed meanwhile).
    pub fn masked_headers_remembered(
        self: &Arc<Self>,
        headers: &HeaderMap,
        mut each: impl FnMut(&HeaderName, &HeaderValue),
    ) {
        CLEAN_LINES.with(|memory| {
            // Never borrowed re-entrantly: masking does not call back here,
            // and `each` does not mask.
            let mut memory = memory.borrow_mut();
            memory.serve(self);
            let mut masked = Vec::new();
            let mut text = Vec::new();
            for (name, value) in headers {
                let key = memory.key(name, value);
                if memory.contains(key, name, value) {
                    each(name, value);
                    continue;
                }
                let mut copy = value.clone();
                let before = masked.len();
                self.mask_header(name, &mut copy, &mut text, &mut masked);
                if masked.len() == before && value.len() <= MAX_REMEMBERED_VALUE {
                    if memory.lines.len() >= MAX_REMEMBERED_LINES {
                        memory.lines.clear();
                    }
                    memory.lines.insert(key, (name.as_str().into(), value.as_bytes().into()));
                }
                each(name, &copy);
            }
        });
    }

    /// [`mask_text`](Self::mask_text) for a masker that sees the same texts
    /// again and again (a keep-alive connection's request paths): a text of
    /// up to [`MAX_REMEMBERED_VALUE`] bytes that this masker passed unchanged
    /// is remembered per thread, in the memory of
    /// [`mask_headers_remembered`](Self::mask_headers_remembered) (under an
    /// empty name, which no header line has), and passes again without the
    /// detector and its views. Masking is a function of the masker and the
    /// bytes alone, so the result is the same.
    pub fn mask_text_remembered<'a>(self: &Arc<Self>, text: &'a str) -> Cow<'a, str> {
        if text.len() > MAX_REMEMBERED_VALUE {
            return self.mask_text(text);
        }
        CLEAN_LINES.with(|memory| {
            // Never borrowed re-entrantly: masking does not call back here.
            let mut memory = memory.borrow_mut();
            memory.serve(self);
            let key = memory.hasher.hash_one(("", text.as_bytes()));
            if memory.lines.get(&key).is_some_and(|(n, v)| n.is_empty() && **v == *text.as_bytes()) {
                return Cow::Borrowed(text);
            }
            let masked = self.mask_text(text);
            if matches!(masked, Cow::Borrowed(_)) {
                if memory.lines.len() >= MAX_REMEMBERED_LINES {
                    memory.lines.clear();
                }
                memory.lines.insert(key, (Box::from(""), text.as_bytes().into()));
            }
            masked
        })
    }

    /// Masks one header value in place, adding what it replaced to `masked`
    /// (`text` is scratch space).
    fn mask_header(&self, name: &HeaderName, value: &mut HeaderValue, text: &mut Vec<u8>, masked: &mut Vec<Masked>) {
        let mut ranges = Vec::new();
        if self.detector.is_some() {
            text.clear();
            text.extend_from_slice(name.as_str().as_bytes());
            text.extend_from_slice(b": ");
            let offset = text.len() as u64;
            text.extend_from_slice(value.as_bytes());
            match self.secret_ranges(text) {
                Ok(found) => {
                    ranges.extend(found.into_iter().filter(|r| r.end > offset).map(|r| Range {
                        start: r.start.saturating_sub(offset),
                        end: r.end - offset,
                        ..r
                    }));
                }
                Err(views::OverBudget) => {
                    let rule: Arc<str> = Arc::from(TOO_MANY_ENCODINGS);
                    *value = HeaderValue::from_static("[MASKED:too-many-encodings]");
                    masked.push(Masked { rule, location: MaskLocation::Header(name.clone()) });
                    return;
                }
            }
        }
        if ranges.is_empty() && self.patterns.is_empty() && self.json.is_none() {
            // Nothing can match: the value passes as it is (what the stream
            // below would release unchanged).
            return;
        }
        let mut plain = PlainMasker::new(self, false);
        for r in ranges {
            plain.add_range(r);
        }
        let mut out = BytesMut::with_capacity(value.len());
        plain.push(self, value.as_bytes(), &mut out);
        plain.finish(self, &mut out);
        let found = plain.log.take();
        if found.is_empty() {
            return;
        }
        // Replacements are visible ASCII, so this only fails if the value
        // was already invalid; never keep the original then.
        *value = HeaderValue::from_maybe_shared(out.freeze()).unwrap_or_else(|_| HeaderValue::from_static("[MASKED]"));
        masked.extend(found.into_iter().map(|m| Masked { rule: m.rule, location: MaskLocation::Header(name.clone()) }));
    }

    /// The one-shot masking behind [`mask_bytes`](Self::mask_bytes): `data`
    /// itself when nothing matched.
    fn mask_stored<'a>(&self, data: &'a [u8], log: &mut MaskedLog) -> Cow<'a, [u8]> {
        let ranges = match self.secret_ranges(data) {
            Ok(ranges) => ranges,
            Err(views::OverBudget) => {
                log.push(Masked { rule: Arc::from(TOO_MANY_ENCODINGS), location: MaskLocation::Body { offset: 0 } });
                return Cow::Owned(b"[MASKED:too-many-encodings]".to_vec());
            }
        };
        if ranges.is_empty() && self.patterns.is_empty() && self.json.is_none() {
            return Cow::Borrowed(data);
        }
        let mut plain = PlainMasker::new(self, false);
        for r in ranges {
            plain.add_range(r);
        }
        let mut out = BytesMut::with_capacity(data.len());
        plain.push(self, data, &mut out);
        plain.finish(self, &mut out);
        let found = plain.log.take();
        if found.is_empty() {
            return Cow::Borrowed(data);
        }
        for m in found {
            log.push(m);
        }
        Cow::Owned(out.to_vec())
    }

    /// Masks `data` for a stored copy from a scan the caller already made
    /// of it with `detector` (raw and through every view:
    /// `views::find_all`), which found `found`: each found range is replaced
    /// by its rule's label, and the masker itself runs only where it could
    /// find more (its own patterns or JSON fields, or a detector other than
    /// the scan's). Scan once: what the gate found is what the recording
    /// masks. Ranges past the end of `data` (a scan of a longer text than
    /// is kept) are cut at its end.
    pub(crate) fn mask_scanned<'a>(
        &self,
        detector: &Arc<Detector>,
        data: &'a [u8],
        found: &[views::Found],
    ) -> Cow<'a, [u8]> {
        let replaced = replace_ranges(data, found);
        let more = !self.patterns.is_empty()
            || self.json.is_some()
            || self.detector.as_ref().is_some_and(|d| !Arc::ptr_eq(d, detector));
        if !more {
            return replaced;
        }
        let mut log = MaskedLog::default();
        match self.mask_stored(&replaced, &mut log) {
            Cow::Borrowed(_) => replaced,
            Cow::Owned(masked) => Cow::Owned(masked),
        }
    }

    /// Where the selected detector rules find secrets in `text`, raw or
    /// encoded; sorted by start.
    fn secret_ranges(&self, text: &[u8]) -> Result<Vec<Range>, views::OverBudget> {
        let Some(detector) = &self.detector else { return Ok(Vec::new()) };
        let mut ranges = Vec::new();
        for d in detector.scan(text) {
            if let Some(&label) = self.rule_labels.get(&*d.rule_id) {
                ranges.push(Range { start: d.start, end: d.end, label });
            }
        }
        for found in views::find(detector, text)? {
            if let Some(&label) = self.rule_labels.get(&*found.detection.rule_id) {
                if found.range.end > found.range.start {
                    ranges.push(Range { start: found.range.start as u64, end: found.range.end as u64, label });
                }
            }
        }
        ranges.sort_unstable_by_key(|r| (r.start, r.label, r.end));
        Ok(ranges)
    }
}

fn label_id(index: usize) -> LabelId {
    LabelId::try_from(index).unwrap_or(LabelId::MAX)
}

/// `data` with each found range (overlapping ones merged, the first one's
/// rule naming it) replaced by `[MASKED:<rule>]`.
fn replace_ranges<'a>(data: &'a [u8], found: &[views::Found]) -> Cow<'a, [u8]> {
    if found.is_empty() {
        return Cow::Borrowed(data);
    }
    let mut ranges: Vec<(usize, usize, &str)> = found
        .iter()
        .map(|f| {
            let start = f.range.start.min(data.len());
            (start, f.range.end.clamp(start, data.len()), &*f.detection.rule_id)
        })
        .collect();
    ranges.sort_unstable_by_key(|r| (r.0, r.1));
    let mut out = Vec::with_capacity(data.len());
    let mut at = 0;
    for (start, end, rule) in ranges {
        if end <= at {
            continue;
        }
        if start >= at {
            out.extend_from_slice(&data[at..start]);
            out.extend_from_slice(b"[MASKED:");
            out.extend_from_slice(rule.as_bytes());
            out.push(b']');
        }
        at = end;
    }
    out.extend_from_slice(&data[at..]);
    Cow::Owned(out)
}
