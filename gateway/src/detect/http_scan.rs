//! HTTP-aware scanning: request line, query parameters, headers (with Basic
//! credentials and base64 values decoded) and, through [`BodyScanner`],
//! decoded bodies; [`WsScanner`] for WebSocket messages after an upgrade.

use std::{collections::HashSet, fmt, sync::Arc};

use base64::Engine;
use http::{HeaderMap, HeaderName, Method, Uri};

use super::{b64, collect::Budget, confirm::shannon_entropy, payload, Confidence, Detection, Detector, Secret};
pub use super::{
    body::{BodyLimits, BodyScanner},
    collect::MAX_HITS_PER_MESSAGE,
    status::{EncodingLayer, Format, ScanStatus, Uninspectable},
    websocket::{DeflateParams, WsConfig, WsScanner},
};

/// Decoded bytes a base64 header value may expand to (it may be compressed).
const HEADER_DECODE_BUDGET: usize = 1 << 20;

/// Rule id of credentials presented in authentication headers that match no rule.
pub const UNKNOWN_AUTH_RULE: &str = "unknown-auth-credential";

/// Shortest unknown credential reported at medium confidence.
pub const MIN_STRONG_UNKNOWN: usize = 16;

/// Least Shannon entropy (bits per byte) of an unknown credential reported
/// at medium confidence.
pub const MIN_UNKNOWN_ENTROPY: f64 = 3.0;

/// A detection and where in the HTTP message it was found.
#[derive(Debug, Clone)]
pub struct Hit {
    /// The detection; its offsets are relative to the scanned field (the
    /// decoded value of a header, parameter or body part) or, for bodies, to the
    /// decoded body text.
    pub detection: Detection,
    /// Where it was found.
    pub location: Location,
}

/// Where in an HTTP message a secret was found.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// The raw request line (method and request target).
    RequestLine,
    /// A query parameter (percent-decoded), by name.
    Query(String),
    /// The percent-decoded path.
    Path,
    /// A header value, by lowercase header name.
    Header(String),
    /// The user name of `Basic` credentials in the named header.
    BasicAuthUser(String),
    /// The password of `Basic` credentials in the named header.
    BasicAuthPassword(String),
    /// The body: a JSON path (`$.auth.token`), a form field name
    /// (`form.api_key`), a multipart part (`multipart.file`), or empty for raw text.
    Body(String),
    /// The password a PostgreSQL client authenticated with, for this
    /// database user and database.
    PostgresPassword {
        /// The database user.
        user: String,
        /// The database.
        database: String,
    },
    /// A PostgreSQL message after authentication: `query`, `parse`,
    /// `bind:$n`, `copy`, `function-call:$n`.
    Postgres(String),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::RequestLine => f.write_str("request-line"),
            Location::Query(name) => write!(f, "query:{name}"),
            Location::Path => f.write_str("path"),
            Location::Header(name) => write!(f, "header:{name}"),
            Location::BasicAuthUser(name) => write!(f, "header:{name}:basic-user"),
            Location::BasicAuthPassword(name) => write!(f, "header:{name}:basic-password"),
            Location::Body(path) if path.is_empty() => f.write_str("body"),
            Location::Body(path) => write!(f, "body:{path}"),
            Location::PostgresPassword { user, database } => {
                write!(f, "postgres:password(user={user},database={database})")
            }
            Location::Postgres(what) => write!(f, "postgres:{what}"),
        }
    }
}

/// Scans everything before the body: path and query parameters
/// (percent-decoded, base64 runs in values decoded), then every header
/// (Basic credentials decoded, bearer and other schemes' tokens on their
/// own, base64 runs in other headers' values decoded), then the raw request
/// line for anything the decoded views missed. Each `(rule, secret,
/// location)` is reported once; the request line only adds secrets not
/// found elsewhere.
pub fn scan_head(detector: &Detector, method: &Method, uri: &Uri, headers: &HeaderMap) -> Vec<Hit> {
    scan_head_inner(detector, method, uri, headers, None)
}

/// Header lines (`name: value`) in which a detector found nothing, for one
/// connection: the same lines come with every request on a keep-alive
/// connection (`host`, `user-agent`, `accept`), and scanning a line is a
/// function of the detector and its bytes alone, so a line found clean is
/// clean again and is not scanned again. Bounded; owned copies compared in
/// full; tied to one detector (a reloaded one starts over). Credentials
/// headers are never remembered.
#[derive(Default)]
pub struct CleanHeaders {
    detector: Option<Arc<Detector>>,
    lines: Vec<(HeaderName, Vec<u8>)>,
}

/// Lines a [`CleanHeaders`] keeps, and the longest value it keeps.
const CLEAN_LINES: usize = 16;
const CLEAN_VALUE_MAX: usize = 256;

impl CleanHeaders {
    fn holds(&self, name: &HeaderName, value: &[u8]) -> bool {
        self.lines.iter().any(|(n, v)| n == name && v == value)
    }

    fn remember(&mut self, name: &HeaderName, value: &[u8]) {
        if value.len() <= CLEAN_VALUE_MAX && self.lines.len() < CLEAN_LINES {
            self.lines.push((name.clone(), value.to_vec()));
        }
    }

    /// Forgets everything when `detector` is not the one remembered for.
    fn for_detector(&mut self, detector: &Arc<Detector>) {
        if !self.detector.as_ref().is_some_and(|d| Arc::ptr_eq(d, detector)) {
            self.detector = Some(Arc::clone(detector));
            self.lines.clear();
        }
    }
}

/// [`scan_head`], skipping the header lines `clean` remembers as clean and
/// remembering the ones found clean now: the same hits.
pub fn scan_head_remembering(
    detector: &Arc<Detector>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    clean: &mut CleanHeaders,
) -> Vec<Hit> {
    clean.for_detector(detector);
    scan_head_inner(detector, method, uri, headers, Some(clean))
}

fn scan_head_inner(
    detector: &Detector,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    mut clean: Option<&mut CleanHeaders>,
) -> Vec<Hit> {
    let mut hits = Vec::new();
    let mut seen: HashSet<(Arc<str>, Secret, Location)> = HashSet::new();
    let mut secrets: HashSet<(Arc<str>, Secret)> = HashSet::new();
    let mut push = |hits: &mut Vec<Hit>, detection: Detection, location: Location| {
        if location == Location::RequestLine
            && secrets.contains(&(Arc::clone(&detection.rule_id), detection.secret.clone()))
        {
            return;
        }
        secrets.insert((Arc::clone(&detection.rule_id), detection.secret.clone()));
        if seen.insert((Arc::clone(&detection.rule_id), detection.secret.clone(), location.clone())) {
            hits.push(Hit { detection, location });
        }
    };

    for d in detector.scan(&percent_decode(uri.path().as_bytes(), false)) {
        push(&mut hits, d, Location::Path);
    }
    if let Some(query) = uri.query() {
        for field in query.split('&').filter(|f| !f.is_empty()) {
            let decoded = percent_decode(field.as_bytes(), true);
            let name_len = decoded.iter().position(|&b| b == b'=').unwrap_or(decoded.len());
            let name = String::from_utf8_lossy(&decoded[..name_len]).into_owned();
            // Scanned as `name=value` so assignment rules see the parameter name.
            for d in detector.scan(&decoded) {
                push(&mut hits, d, Location::Query(name.clone()));
            }
            for d in base64_views(detector, decoded.get(name_len + 1..).unwrap_or_default(), 1) {
                push(&mut hits, d, Location::Query(name.clone()));
            }
        }
    }
    for (name, value) in headers {
        let memo = clean.as_deref_mut().filter(|_| !is_authorization(name) && !is_key_header(name.as_str()));
        if memo.as_ref().is_some_and(|m| m.holds(name, value.as_bytes())) {
            continue;
        }
        let found = scan_header(detector, name, value.as_bytes());
        match memo {
            Some(m) if found.is_empty() => m.remember(name, value.as_bytes()),
            _ => {}
        }
        for (d, location) in found {
            push(&mut hits, d, location);
        }
    }
    let mut line = method.as_str().as_bytes().to_vec();
    line.push(b' ');
    line.extend_from_slice(uri.to_string().as_bytes());
    for d in detector.scan(&line) {
        push(&mut hits, d, Location::RequestLine);
    }
    hits
}

/// Detections in the base64 runs of `value`, each decoded from its start
/// and, up to `alignments`, from its next characters (a run that starts
/// before its base64 does), through every view of the decoded bytes.
fn base64_views(detector: &Detector, value: &[u8], alignments: usize) -> Vec<Detection> {
    let mut out = Vec::new();
    for (s, e) in b64::runs(value) {
        for skip in 0..alignments {
            let decoded = b64::decode_run(&value[s..e], skip);
            let mut budget = Budget { used: 0, limit: HEADER_DECODE_BUDGET };
            // A header has no status of its own: what does not decode here
            // was scanned as it is above.
            let mut status = ScanStatus::Complete;
            out.extend(payload::scan(detector, &mut budget, &mut status, &decoded, "").into_iter().map(|(d, _)| d));
        }
    }
    out
}

fn scan_header(detector: &Detector, name: &HeaderName, value: &[u8]) -> Vec<(Detection, Location)> {
    let lname = name.as_str().to_string();
    let mut out = Vec::new();
    if is_authorization(name) {
        match parse_authorization(value) {
            Some(Auth::Basic { user, password }) => {
                for d in detector.scan(&user) {
                    out.push((d, Location::BasicAuthUser(lname.clone())));
                }
                for d in detector.scan(&password) {
                    out.push((d, Location::BasicAuthPassword(lname.clone())));
                }
            }
            Some(Auth::Token(token)) => {
                for d in detector.scan(&token) {
                    out.push((d, Location::Header(lname.clone())));
                }
            }
            None => {}
        }
        // The raw value too: schemes with parameters (`Digest`, SigV4) or keys
        // glued to the scheme.
        for d in detector.scan(value) {
            out.push((d, Location::Header(lname.clone())));
        }
        return out;
    }
    // `name: value`, so assignment rules (`x-api-key: …`) see the header name;
    // only secrets inside the value count.
    let mut text = Vec::with_capacity(lname.len() + 2 + value.len());
    text.extend_from_slice(lname.as_bytes());
    text.extend_from_slice(b": ");
    let offset = text.len() as u64;
    text.extend_from_slice(value);
    for mut d in detector.scan(&text) {
        if d.start >= offset {
            d.start -= offset;
            d.end -= offset;
            out.push((d, Location::Header(lname.clone())));
        }
    }
    // Values are short: every alignment of every base64 run is affordable.
    for d in base64_views(detector, value, 4) {
        out.push((d, Location::Header(lname.clone())));
    }
    out
}

fn is_authorization(name: &HeaderName) -> bool {
    name == http::header::AUTHORIZATION || name == http::header::PROXY_AUTHORIZATION
}

enum Auth {
    Basic { user: Vec<u8>, password: Vec<u8> },
    Token(Vec<u8>),
}

fn parse_authorization(value: &[u8]) -> Option<Auth> {
    let value = value.trim_ascii();
    let (scheme, rest) = match value.iter().position(|b| b.is_ascii_whitespace()) {
        Some(i) => (&value[..i], value[i..].trim_ascii()),
        None => (&[][..], value),
    };
    if rest.is_empty() {
        return None;
    }
    if scheme.eq_ignore_ascii_case(b"basic") {
        if let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) {
            let colon = decoded.iter().position(|&b| b == b':').unwrap_or(decoded.len());
            let password = decoded.get(colon + 1..).unwrap_or_default().to_vec();
            return Some(Auth::Basic { user: decoded[..colon].to_vec(), password });
        }
    }
    Some(Auth::Token(rest.to_vec()))
}

/// Headers that carry API keys or tokens by convention.
const KEY_HEADERS: &[&str] = &[
    "x-api-key",
    "api-key",
    "apikey",
    "x-apikey",
    "x-auth-token",
    "x-access-token",
    "x-token",
    "x-api-token",
    "private-token",
    "job-token",
    "deploy-token",
    "x-goog-api-key",
    "x-functions-key",
    "ocp-apim-subscription-key",
    "x-figma-token",
    "x-shopify-access-token",
    "x-vault-token",
    "x-jfrog-art-api",
    "x-auth-key",
    "x-auth-user",
    "dd-api-key",
    "dd-application-key",
    "x-honeycomb-team",
    "x-postmark-server-token",
    "circle-token",
    "x-gitlab-token",
    "x-npm-token",
    "x-pypi-token",
    "authentication",
    "x-authorization",
    "x-secret",
    "x-client-secret",
    "x-amz-security-token",
    "x-sentry-auth",
];

/// Name parts that mark anti-forgery or tracing tokens rather than credentials.
const NOT_CREDENTIAL_PARTS: &[&str] = &["csrf", "xsrf", "request", "trace", "correlation", "idempotency", "nonce"];

/// Every name [`is_key_header`] accepts contains one of these (a test
/// checks it), so most headers (`host`, `accept`...) are answered with a
/// few short searches instead of the whole list, on every request.
const KEY_HEADER_HINTS: &[&str] = &["key", "token", "secret", "auth", "api", "team"];

fn is_key_header(name: &str) -> bool {
    if !has_key_hint(name.as_bytes()) {
        return false;
    }
    if KEY_HEADERS.contains(&name) {
        return true;
    }
    if NOT_CREDENTIAL_PARTS.iter().any(|p| name.contains(p)) {
        return false;
    }
    KEY_HEADER_PARTS.iter().any(|p| name.contains(p))
}

/// Whether `name` contains one of [`KEY_HEADER_HINTS`], in one pass over
/// its bytes: a `str::contains` per hint set up a substring searcher each
/// time, about 1,000 instructions per header name, and every request
/// header is asked twice per request (the head scan, the unknown
/// credentials).
fn has_key_hint(name: &[u8]) -> bool {
    (0..name.len()).any(|i| {
        let rest = &name[i..];
        KEY_HEADER_HINTS.iter().any(|h| h.as_bytes()[0] == rest[0] && rest.starts_with(h.as_bytes()))
    })
}

/// Name parts that make any header a key header.
const KEY_HEADER_PARTS: &[&str] = &["api-key", "apikey", "access-key", "secret", "-token", "-auth-key"];

/// Every credential presented in authentication headers, whatever its format:
/// `Authorization`/`Proxy-Authorization` (`Basic` decoded: the password, or the
/// user name when the password is empty as with key-as-user APIs; other
/// schemes' token), and key headers such as `x-api-key` or `private-token`.
/// The caller decides which are its own (see [`unknown_credentials`]).
pub fn auth_credentials(headers: &HeaderMap) -> Vec<(Location, Secret)> {
    let mut out = Vec::new();
    for (name, value) in headers {
        // Owned only for what is returned: most headers are neither.
        let lname = || name.as_str().to_string();
        if is_authorization(name) {
            match parse_authorization(value.as_bytes()) {
                Some(Auth::Basic { password, .. }) if !password.is_empty() => {
                    out.push((Location::BasicAuthPassword(lname()), Secret::new(&password)));
                }
                Some(Auth::Basic { user, .. }) if !user.is_empty() => {
                    out.push((Location::BasicAuthUser(lname()), Secret::new(&user)));
                }
                Some(Auth::Token(token)) => out.push((Location::Header(lname()), Secret::new(&token))),
                _ => {}
            }
        } else if is_key_header(name.as_str()) {
            let v = value.as_bytes().trim_ascii();
            if !v.is_empty() {
                out.push((Location::Header(lname()), Secret::new(v)));
            }
        }
    }
    out
}

/// Credentials from [`auth_credentials`] that no rule recognizes and that
/// `is_issued` does not claim as the gateway's own, as hits of rule
/// [`UNKNOWN_AUTH_RULE`]: a static credential in an unknown format. Medium
/// confidence when long and random-looking and not a placeholder, low
/// otherwise.
pub fn unknown_credentials(detector: &Detector, headers: &HeaderMap, is_issued: impl Fn(&Secret) -> bool) -> Vec<Hit> {
    let rule_id: Arc<str> = Arc::from(UNKNOWN_AUTH_RULE);
    auth_credentials(headers)
        .into_iter()
        .filter(|(_, secret)| !is_issued(secret) && detector.scan(secret.as_bytes()).is_empty())
        .map(|(location, secret)| {
            // Placeholders SDKs demand (`none`, `<token>`, `changeme`...),
            // short and low-entropy values are low confidence: below the
            // rule's default threshold (`findings.min_confidence`), so they
            // are not blocked as keys.
            let strong = secret.len() >= MIN_STRONG_UNKNOWN
                && shannon_entropy(secret.as_bytes()) >= MIN_UNKNOWN_ENTROPY
                && !crate::detect::confirm::is_placeholder(secret.as_bytes());
            let detection = Detection {
                rule_id: Arc::clone(&rule_id),
                confidence: if strong { Confidence::Medium } else { Confidence::Low },
                start: 0,
                end: secret.len() as u64,
                secret,
            };
            Hit { detection, location }
        })
        .collect()
}

/// Percent-decodes; with `plus_is_space`, `+` means a space (query strings, forms).
pub(crate) fn percent_decode(input: &[u8], plus_is_space: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'%' => match (hex_val(input.get(i + 1)), hex_val(input.get(i + 2))) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

pub(crate) fn hex_val(b: Option<&u8>) -> Option<u8> {
    match b? {
        b @ b'0'..=b'9' => Some(b - b'0'),
        b @ b'a'..=b'f' => Some(b - b'a' + 10),
        b @ b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod key_header_tests {
    use super::*;

    #[test]
    fn every_key_header_passes_the_hints() {
        for name in KEY_HEADERS.iter().chain(KEY_HEADER_PARTS) {
            assert!(
                KEY_HEADER_HINTS.iter().any(|h| name.contains(h)),
                "{name} has no hint: is_key_header would miss it"
            );
        }
        for name in ["x-api-key", "x-my-secret", "x-custom-token", "x-honeycomb-team", "x-auth-user"] {
            assert!(is_key_header(name), "{name}");
        }
        for name in ["host", "user-agent", "accept", "content-type", "x-csrf-token", "x-request-id"] {
            assert!(!is_key_header(name), "{name}");
        }
        for name in [
            "host",
            "user-agent",
            "accept",
            "x-api-key",
            "tokens",
            "x-team",
            "a",
            "",
            "secre",
            "k",
            "authority",
            "capi",
        ] {
            let slow = KEY_HEADER_HINTS.iter().any(|h| name.contains(h));
            assert_eq!(has_key_hint(name.as_bytes()), slow, "{name}");
        }
    }
}
