//! Keeping credentials and unbounded job-controlled text out of everything
//! the gateway stores (findings, approvals, recordings): header values and
//! CI job variables whose names say they carry one are replaced by
//! [`REDACTED`], and stored strings are capped ([`cap`]).
//!
//! Names decide, not values: the detector finds keys by their shape, this
//! catches what has no recognizable shape (session cookies, opaque tokens).
//! Over-redacting a harmless header costs an auditor a detail; the reverse
//! leaks a credential into a database kept for weeks.

use std::collections::BTreeMap;

/// What a redacted value becomes.
pub const REDACTED: &str = "[REDACTED]";

/// Header names that always carry credentials.
const SENSITIVE_NAMES: &[&str] =
    &["authorization", "proxy-authorization", "cookie", "set-cookie", "dpop", "x-amz-security-token"];

/// Substrings of header or variable names that suggest a credential.
const SENSITIVE_MARKERS: &[&str] = &[
    "token",
    "secret",
    "passw",
    "passphrase",
    "auth",
    "cookie",
    "session",
    "credential",
    "signature",
    "api-key",
    "api_key",
    "apikey",
    "private",
    "jwt",
    "access-key",
    "access_key",
];

/// Authentication schemes kept in front of a redacted credential, so an
/// auditor still sees how the client authenticated. Only known words: the
/// first word of an arbitrary value may itself be the secret.
const SCHEMES: &[&str] = &[
    "basic",
    "bearer",
    "digest",
    "negotiate",
    "ntlm",
    "token",
    "oauth",
    "hoba",
    "mutual",
    "vapid",
    "dpop",
    "apikey",
    "sharedkey",
    "sharedkeylite",
    "hawk",
    "aws4-hmac-sha256",
    "aws",
    "gssapi",
    "scram-sha-1",
    "scram-sha-256",
    "private-token",
    "googlelogin",
];

/// Redacted copies of `headers`, in the map's order. Values of credential
/// headers (`authorization`, `cookie`, `x-api-key`, `*-token`, `*-secret`,
/// ...) become [`REDACTED`], keeping a known scheme word (`Bearer
/// [REDACTED]`). Values that are not UTF-8 are kept lossily.
pub fn redact_headers(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let name = name.as_str();
            (name.to_owned(), redact_value(name, &String::from_utf8_lossy(value.as_bytes())))
        })
        .collect()
}

/// [`redact_headers`] for headers already turned into pairs. Idempotent:
/// redacting a redacted list changes nothing.
pub fn redact_header_pairs(headers: &[(String, String)]) -> Vec<(String, String)> {
    headers.iter().map(|(name, value)| (name.clone(), redact_value(name, value))).collect()
}

/// Whether a header named `name` carries a credential.
pub(crate) fn is_sensitive_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SENSITIVE_NAMES.contains(&name.as_str())
        || SENSITIVE_MARKERS.iter().any(|m| name.contains(m))
        || name == "key"
        || name.ends_with("-key")
        || name.ends_with("_key")
}

fn redact_value(name: &str, value: &str) -> String {
    if !is_sensitive_header(name) {
        return value.to_owned();
    }
    let trimmed = value.trim_start();
    if let Some((scheme, rest)) = trimmed.split_once(char::is_whitespace) {
        if !rest.trim().is_empty() && SCHEMES.iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
            return format!("{scheme} {REDACTED}");
        }
    }
    REDACTED.to_owned()
}

/// CI job variables safe to store: values of credential-looking names
/// (`CI_JOB_TOKEN`, `CI_REGISTRY_PASSWORD`, `*_KEY`...) are redacted and
/// `user:password@` is cut out of URLs (GitLab's `CI_REPOSITORY_URL` embeds
/// the job token that way).
pub fn redact_job(job: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    job.iter().map(|(name, value)| (name.clone(), redact_variable(name, value))).collect()
}

/// One CI variable's value as [`redact_job`] stores it.
pub fn redact_variable(name: &str, value: &str) -> String {
    if is_sensitive_variable(name) {
        REDACTED.to_owned()
    } else {
        strip_userinfo(value)
    }
}

/// Whether a variable (or command-line option) named `name` holds a secret.
pub(crate) fn is_sensitive_variable(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    is_sensitive_header(&lower) || lower.ends_with("_pass") || lower.ends_with("_pwd")
}

/// Replaces the `user:password@` of every URL in `value` by `[REDACTED]@`.
pub fn strip_userinfo(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(pos) = rest.find("://") {
        let (head, tail) = rest.split_at(pos + 3);
        out.push_str(head);
        let authority_end = tail.find(['/', '?', '#', ' ']).unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(at) => {
                out.push_str(REDACTED);
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// At most `max` bytes of `s`, cut on a character boundary.
pub fn cap(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_userinfo_cases() {
        assert_eq!(strip_userinfo("plain"), "plain");
        assert_eq!(strip_userinfo("https://host/a@b"), "https://host/a@b");
        assert_eq!(strip_userinfo("https://u:p@host/x https://h2"), "https://[REDACTED]@host/x https://h2");
        assert_eq!(strip_userinfo("a://x@y b://z@w"), "a://[REDACTED]@y b://[REDACTED]@w");
    }

    #[test]
    fn credential_variables_are_redacted_and_others_kept() {
        for name in ["CI_JOB_TOKEN", "CI_REGISTRY_PASSWORD", "DEPLOY_KEY", "KEY", "DB_PASS", "X_PWD", "CI_JOB_JWT"] {
            assert_eq!(redact_variable(name, "s3cr3t"), REDACTED, "{name}");
        }
        assert_eq!(redact_variable("GITHUB_REPOSITORY", "acme/api"), "acme/api");
        assert_eq!(cap("héllo", 2), "h");
        assert_eq!(cap("héllo", 3), "hé");
    }
}
