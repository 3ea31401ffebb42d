//! The request-body redactor (`static_keys: redact`,
//! `enforce::redact::redact_body`, which reuses the masker's literal
//! replacement and its codecs), differentially: a body of arbitrary text
//! and synthetic keys, shaped as plain text, JSON or a form and sent
//! identity, gzip, deflate, br or zstd encoded, is scanned as the proxy
//! scans it; every key found is redacted. When the redactor succeeds, its
//! output decodes to the decoded input with each found key (as it is,
//! JSON-escaped, form-encoded) replaced by its placeholder (a reference
//! written here: leftmost non-overlapping occurrences, overlapping ones
//! merged into the first), and no found key survives. When it refuses
//! because a key is "not found", the reference agrees that no occurrence
//! of it was replaced. A garbage body under a claimed encoding must fail
//! cleanly or pass through. (zstd is decoded but not re-encoded by the
//! masker: a zstd body with a key to redact is refused.)
#![no_main]
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use gateway::{
    detect::{
        body::{BodyLimits, BodyScanner},
        secret::Secret,
        Detector,
    },
    enforce::redact::{redact_body, RedactError, Redaction},
};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

#[path = "../common/codings.rs"]
mod codings;
use codings::{decode, encode, Coding};

#[path = "../common/keys.rs"]
mod keys;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Shape {
    /// The pieces as they are, `text/plain` or no type.
    Plain,
    /// `{"prompt": <the pieces as one string>}`.
    Json,
    /// `prompt=<the pieces form-encoded>`.
    Form,
}

#[derive(Arbitrary, Debug)]
enum Piece {
    Text(Vec<u8>),
    Key(keys::Key),
}

#[derive(Arbitrary, Debug)]
struct Input {
    shape: Shape,
    coding: Coding,
    typed: bool,
    pieces: Vec<Piece>,
    /// Sent instead of the encoded body (a broken stream).
    garbage: Option<Vec<u8>>,
}

fn detector() -> Arc<Detector> {
    static D: OnceLock<Arc<Detector>> = OnceLock::new();
    D.get_or_init(|| Arc::new(Detector::builtin().expect("built-in rules compile"))).clone()
}

/// `application/x-www-form-urlencoded` as browsers write it, written
/// here apart from the gateway's `percent_encoding` use.
fn form_encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    for &b in data {
        if b.is_ascii_alphanumeric() || b"*-._".contains(&b) {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

/// The forms of a key a literal replacement must reach: as it is,
/// JSON-escaped and form-encoded (each once).
fn needles(secret: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![secret.to_vec()];
    if let Ok(text) = std::str::from_utf8(secret) {
        let quoted = serde_json::to_string(text).expect("a string");
        let inner = quoted.as_bytes()[1..quoted.len() - 1].to_vec();
        if !out.contains(&inner) {
            out.push(inner);
        }
    }
    let form = form_encode(secret);
    if !out.contains(&form) {
        out.push(form);
    }
    out
}

/// The reference: every leftmost non-overlapping occurrence of each
/// needle, ordered by (start, needle), overlapping ones merged into the
/// first. Returns the output and which needles' labels were written.
fn reference(data: &[u8], needles: &[(Vec<u8>, usize)], labels: &[String]) -> (Vec<u8>, Vec<bool>) {
    let mut ranges = Vec::new();
    for (id, (needle, _)) in needles.iter().enumerate() {
        let mut at = 0;
        while at + needle.len() <= data.len() {
            match data[at..].windows(needle.len()).position(|w| w == needle.as_slice()) {
                Some(p) => {
                    ranges.push((at + p, id, at + p + needle.len()));
                    at += p + needle.len();
                }
                None => break,
            }
        }
    }
    ranges.sort_unstable();
    let mut out = Vec::new();
    let mut written = vec![false; labels.len()];
    let (mut cursor, mut suppress) = (0, 0);
    for (start, id, end) in ranges {
        if start < suppress {
            suppress = suppress.max(end);
            continue;
        }
        out.extend_from_slice(&data[cursor.max(suppress)..start]);
        let key = needles[id].1;
        out.extend_from_slice(labels[key].as_bytes());
        written[key] = true;
        suppress = end;
        cursor = start;
    }
    out.extend_from_slice(&data[cursor.max(suppress).min(data.len())..]);
    (out, written)
}

fuzz_target!(|input: Input| {
    let mut text = Vec::new();
    for piece in &input.pieces {
        match piece {
            Piece::Text(t) => text.extend_from_slice(t),
            Piece::Key(k) => text.extend_from_slice(k.text().as_bytes()),
        }
    }
    let (plain, content_type) = match input.shape {
        Shape::Plain => (text, "text/plain"),
        Shape::Json => {
            let v = serde_json::json!({ "prompt": String::from_utf8_lossy(&text) });
            (serde_json::to_vec(&v).expect("json"), "application/json")
        }
        Shape::Form => {
            let mut body = b"prompt=".to_vec();
            body.extend_from_slice(&form_encode(&text));
            (body, "application/x-www-form-urlencoded")
        }
    };
    let mut headers = HeaderMap::new();
    if input.typed {
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    if let Some(name) = input.coding.name() {
        headers.insert(http::header::CONTENT_ENCODING, HeaderValue::from_static(name));
    }
    let wire = match &input.garbage {
        Some(g) => g.clone(),
        None => encode(input.coding, &plain),
    };

    // What the proxy finds in the body, as it scans it.
    let detector = detector();
    let mut scanner = BodyScanner::new(detector.clone(), &headers, BodyLimits::default());
    let mut hits = scanner.feed(&wire);
    hits.extend(scanner.finish());
    let mut secrets: Vec<(Secret, String)> = Vec::new();
    for hit in hits {
        if !secrets.iter().any(|(s, _)| s == &hit.detection.secret) {
            secrets.push((hit.detection.secret.clone(), hit.detection.rule_id.to_string()));
        }
    }
    if secrets.is_empty() {
        return;
    }
    let redactions: Vec<Redaction> = secrets
        .iter()
        .enumerate()
        .map(|(i, (s, rule))| Redaction::new(rule, &format!("hmac-sha256:{i:012x}"), s.clone()))
        .collect();
    let labels: Vec<String> = redactions.iter().map(|r| r.placeholder().to_owned()).collect();
    let result = redact_body(&wire, &headers, &redactions, &detector, BodyLimits::default());
    if input.garbage.is_some() {
        // Anything but a panic; a body that came out must decode.
        if let (Ok(out), Coding::Identity) = (&result, input.coding) {
            for (s, _) in &secrets {
                assert!(
                    out.windows(s.as_bytes().len()).all(|w| w != s.as_bytes()),
                    "a redacted key is still in the body"
                );
            }
        }
        return;
    }
    let mut all_needles = Vec::new();
    for (key, (s, _)) in secrets.iter().enumerate() {
        for n in needles(s.as_bytes()) {
            if !n.is_empty() && !all_needles.iter().any(|(m, k)| m == &n && *k == key) {
                all_needles.push((n, key));
            }
        }
    }
    let (expected, written) = reference(&plain, &all_needles, &labels);
    match result {
        Ok(out) => {
            let decoded = decode(input.coding, &out);
            assert!(decoded == expected, "redacted body differs from the reference");
            for (s, _) in &secrets {
                assert!(
                    decoded.windows(s.as_bytes().len()).all(|w| w != s.as_bytes()),
                    "a redacted key is still in the body"
                );
            }
        }
        Err(RedactError::NotFound { placeholder }) => {
            let key = labels.iter().position(|l| *l == placeholder).expect("a placeholder of ours");
            assert!(!written[key], "the redactor says a key is not in the body, but the reference replaced it");
        }
        Err(RedactError::Remains { .. }) => {}
        // The masker re-encodes gzip, deflate and br; a zstd body with a
        // key to redact is refused (fail closed), anything else is a bug.
        Err(RedactError::Mask(e)) => {
            assert!(input.coding == Coding::Zstd, "a valid {:?} body could not be redacted: {e}", input.coding)
        }
    }
});
