//! Redaction of keys in request bodies (`static_keys: redact`): the gate
//! decides which keys are redacted ([`super::Passage::judge_body`]); the
//! handler applies the edit to the buffered body with [`redact_body`],
//! which reuses the response masker's streaming window and its content
//! encoding round trip (`mask::Masker::replacing`), so the body keeps its
//! encoding and only its length changes.
//!
//! Fail closed: a body that cannot be decoded and re-encoded, a key that
//! is not found where the detector saw it (it was only in an encoded form
//! the literal replacement cannot reach, base64 say), or a key still found
//! after the edit is an error, and the caller refuses the request.

use std::sync::Arc;

use bytes::Bytes;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};

use crate::{
    detect::{
        http_scan::{BodyLimits, BodyScanner},
        secret::FINGERPRINT_PREFIX,
        Detector, Secret,
    },
    mask::{MaskError, Masker, Replacement},
};

/// Hex digits of the fingerprint a placeholder shows: enough to tell keys
/// apart in a prompt and to find the finding, too few to matter.
pub const PLACEHOLDER_FINGERPRINT_LEN: usize = 12;

/// What `application/x-www-form-urlencoded` leaves unescaped besides
/// letters and digits.
const FORM: &AsciiSet = &NON_ALPHANUMERIC.remove(b'*').remove(b'-').remove(b'.').remove(b'_');

/// The handler's part of a redaction: takes the keys to replace in the body
/// it is holding, or says why it cannot (then the request is blocked).
pub type RedactFn<'a> = dyn FnMut(Vec<Redaction>) -> Result<(), String> + Send + 'a;

/// One key the gate decided to redact. Holds the secret (to find it); its
/// `Debug` shows only the placeholder.
#[derive(Clone)]
pub struct Redaction {
    secret: Secret,
    placeholder: String,
}

impl std::fmt::Debug for Redaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redaction").field("placeholder", &self.placeholder).finish_non_exhaustive()
    }
}

impl Redaction {
    /// The key `secret`, found by `rule`, with the finding's `fingerprint`.
    pub fn new(rule: &str, fingerprint: &str, secret: Secret) -> Redaction {
        Redaction { secret, placeholder: placeholder(rule, fingerprint) }
    }

    /// What replaces the key: `[REDACTED:<rule>:<fingerprint prefix>]`.
    pub fn placeholder(&self) -> &str {
        &self.placeholder
    }

    /// The forms the key may take in a body: as it is, JSON-escaped and
    /// form-encoded (each only if it differs).
    fn needles(&self) -> Vec<Vec<u8>> {
        let raw = self.secret.as_bytes();
        let mut out = vec![raw.to_vec()];
        if let Ok(text) = std::str::from_utf8(raw) {
            if let Ok(quoted) = serde_json::to_string(text) {
                let inner = quoted.as_bytes()[1..quoted.len() - 1].to_vec();
                if !out.contains(&inner) {
                    out.push(inner);
                }
            }
        }
        let form = percent_encoding::percent_encode(raw, FORM).to_string().into_bytes();
        if !out.contains(&form) {
            out.push(form);
        }
        out
    }
}

/// The placeholder for a key found by `rule` with `fingerprint`
/// (`hmac-sha256:<hex>`): `[REDACTED:<rule>:<first hex digits>]`.
pub fn placeholder(rule: &str, fingerprint: &str) -> String {
    let hex = fingerprint.strip_prefix(FINGERPRINT_PREFIX).unwrap_or(fingerprint);
    let short: String = hex.chars().take(PLACEHOLDER_FINGERPRINT_LEN).collect();
    format!("[REDACTED:{rule}:{short}]")
}

/// Why a body could not be redacted: the request must not go upstream.
#[derive(Debug, thiserror::Error)]
pub enum RedactError {
    /// Decoding, replacing or re-encoding failed.
    #[error("{0}")]
    Mask(#[from] MaskError),
    /// A key was not found in any form a literal replacement reaches.
    #[error("the key for {placeholder} is not in the body in a form that can be replaced")]
    NotFound {
        /// The key's placeholder.
        placeholder: String,
    },
    /// A key is still in the rewritten body (in another encoding).
    #[error("the key for {placeholder} is still in the body after redaction")]
    Remains {
        /// The key's placeholder.
        placeholder: String,
    },
}

/// The request body `body` (as sent: encoded per `content_encoding`) with
/// every key of `redactions` replaced by its placeholder, encoded the same
/// way. Rescanned with `detector` as the proxy scans bodies (`headers` give
/// the encoding and type): any redacted key still found is an error.
pub fn redact_body(
    body: &[u8],
    headers: &http::HeaderMap,
    redactions: &[Redaction],
    detector: &Arc<Detector>,
    limits: BodyLimits,
) -> Result<Bytes, RedactError> {
    let mut replacements = Vec::new();
    for r in redactions {
        for needle in r.needles() {
            let replacement = Replacement { needle, text: r.placeholder.clone() };
            if !replacements.contains(&replacement) {
                replacements.push(replacement);
            }
        }
    }
    let masker = Arc::new(Masker::replacing(&replacements)?);
    let encoding = content_encoding(headers);
    let mut edit = masker.body(encoding.as_deref())?;
    let mut out = Vec::with_capacity(body.len());
    out.extend_from_slice(&edit.push(body)?);
    out.extend_from_slice(&edit.finish()?);
    let replaced: Vec<_> = edit.take_masked().into_iter().map(|m| m.rule).collect();
    if let Some(missing) = redactions.iter().find(|r| !replaced.iter().any(|m| **m == *r.placeholder)) {
        return Err(RedactError::NotFound { placeholder: missing.placeholder.clone() });
    }
    let mut scanner = BodyScanner::new(detector.clone(), headers, limits);
    let mut hits = scanner.feed(&out);
    hits.extend(scanner.finish());
    for hit in hits {
        if let Some(r) = redactions.iter().find(|r| r.secret.as_bytes() == hit.detection.secret.as_bytes()) {
            return Err(RedactError::Remains { placeholder: r.placeholder.clone() });
        }
    }
    Ok(Bytes::from(out))
}

/// The `Content-Encoding` header values joined, as the masker reads them.
fn content_encoding(headers: &http::HeaderMap) -> Option<String> {
    let values: Vec<&str> =
        headers.get_all(http::header::CONTENT_ENCODING).iter().filter_map(|v| v.to_str().ok()).collect();
    (!values.is_empty()).then(|| values.join(", "))
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    const AWS: &str = "aws_secret_access_key = tylc/Y3oLOr0GlsP5S+KXv5Zzjhe3p1g1aKfux6f";

    fn detector() -> Arc<Detector> {
        Arc::new(Detector::new(&crate::detect::DetectConfig::default()).expect("detector"))
    }

    fn redaction(secret: &str) -> Redaction {
        Redaction::new("aws-secret-access-key", "hmac-sha256:0123456789abcdef0123", Secret::new(secret.as_bytes()))
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_placeholder_names_the_rule_and_a_fingerprint_prefix() {
        assert_eq!(placeholder("github-pat", "hmac-sha256:0123456789abcdefff"), "[REDACTED:github-pat:0123456789ab]");
        assert_eq!(placeholder("x", "abc"), "[REDACTED:x:abc]");
        let r = redaction("secret");
        assert!(!format!("{r:?}").contains("secret\""), "Debug never shows the key");
    }

    #[test]
    fn a_json_body_is_rewritten_with_its_new_length_and_no_key() {
        let secret = "tylc/Y3oLOr0GlsP5S+KXv5Zzjhe3p1g1aKfux6f";
        let body = serde_json::json!({"messages": [{"role": "user", "content": format!("fix this:\n{AWS}\n")}]});
        let body = serde_json::to_vec(&body).expect("json");
        let r = redaction(secret);
        let h = headers(&[("content-type", "application/json")]);
        let out =
            redact_body(&body, &h, std::slice::from_ref(&r), &detector(), BodyLimits::default()).expect("redacted");
        let text = String::from_utf8(out.to_vec()).expect("utf8");
        assert!(!text.contains(secret));
        assert!(text.contains("[REDACTED:aws-secret-access-key:0123456789ab]"), "{text}");
        assert_eq!(out.len(), body.len() - secret.len() + r.placeholder().len(), "only the key's length changes");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("still JSON");
        assert!(v["messages"][0]["content"].as_str().is_some_and(|c| c.contains("[REDACTED:")));
    }

    #[test]
    fn a_gzip_body_is_decoded_redacted_and_encoded_again() {
        let secret = "tylc/Y3oLOr0GlsP5S+KXv5Zzjhe3p1g1aKfux6f";
        let plain = format!("{{\"prompt\": \"{AWS}\"}}");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(plain.as_bytes()).expect("gzip");
        let body = gz.finish().expect("gzip");
        let h = headers(&[("content-type", "application/json"), ("content-encoding", "gzip")]);
        let out = redact_body(&body, &h, &[redaction(secret)], &detector(), BodyLimits::default()).expect("redacted");
        let mut decoded = String::new();
        flate2::read::MultiGzDecoder::new(&out[..]).read_to_string(&mut decoded).expect("still gzip");
        assert!(!decoded.contains(secret) && decoded.contains("[REDACTED:aws-secret-access-key:"), "{decoded}");
    }

    #[test]
    fn what_cannot_be_redacted_is_an_error() {
        let secret = "tylc/Y3oLOr0GlsP5S+KXv5Zzjhe3p1g1aKfux6f";
        let r = [redaction(secret)];
        let d = detector();
        // An encoding the masker cannot re-encode.
        let h = headers(&[("content-encoding", "compress")]);
        assert!(matches!(redact_body(b"x", &h, &r, &d, BodyLimits::default()), Err(RedactError::Mask(_))));
        // The key only in base64: not reachable by a literal replacement.
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(AWS);
        let body = format!("data={b64}");
        let out = redact_body(body.as_bytes(), &http::HeaderMap::new(), &r, &d, BodyLimits::default());
        assert!(matches!(out, Err(RedactError::NotFound { .. })), "{out:?}");
        // Replaced raw but still present in base64 elsewhere.
        let body = format!("{AWS}\ncopy: {b64}");
        let out = redact_body(body.as_bytes(), &http::HeaderMap::new(), &r, &d, BodyLimits::default());
        assert!(matches!(out, Err(RedactError::Remains { .. })), "{out:?}");
    }

    #[test]
    fn form_and_json_escaped_forms_are_replaced_too() {
        let secret = "ab+c/d\"e";
        let r = redaction(secret);
        let forms = r.needles();
        assert!(forms.contains(&b"ab%2Bc%2Fd%22e".to_vec()), "form-encoded");
        assert!(forms.contains(&b"ab+c/d\\\"e".to_vec()), "JSON-escaped");
    }
}
