//! Glob patterns for identities and host names.
//!
//! `*` matches within one segment (a `/`-separated path segment of an
//! identity URI, a `.`-separated label of a host name), `**` matches across
//! segments, and a pattern that is only `*` or `**` matches everything. Kept
//! this small on purpose: operators read these patterns to answer "which jobs
//! get this credential", and a richer syntax makes that harder.

/// Whether `text` matches `pattern`, with `sep` as the segment separator.
pub(crate) fn matches(pattern: &str, text: &str, sep: u8) -> bool {
    if pattern == "*" || pattern == "**" {
        return true;
    }
    matches_bytes(pattern.as_bytes(), text.as_bytes(), sep)
}

/// Host names compare case-insensitively and ignore a trailing dot.
pub(crate) fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.strip_suffix('.').unwrap_or(pattern).to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    !host.is_empty() && matches(&pattern, &host, b'.')
}

fn matches_bytes(p: &[u8], t: &[u8], sep: u8) -> bool {
    match p.first() {
        None => t.is_empty(),
        Some(b'*') => {
            let (any_sep, rest) = if p.get(1) == Some(&b'*') { (true, &p[2..]) } else { (false, &p[1..]) };
            // Try every split point; patterns are short, so backtracking is cheap.
            for i in 0..=t.len() {
                if matches_bytes(rest, &t[i..], sep) {
                    return true;
                }
                if i < t.len() && !any_sep && t[i] == sep {
                    return false;
                }
            }
            false
        }
        Some(&c) => t.first() == Some(&c) && matches_bytes(&p[1..], &t[1..], sep),
    }
}

/// Explains why a pattern is unusable: empty, or `***`.
pub(crate) fn validate(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("empty pattern".into());
    }
    if pattern.contains("***") {
        return Err(format!("`{pattern}`: use `*` (one segment) or `**` (any number of segments)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_globs() {
        let id = "spiffe://ci.example/repo/acme/api";
        assert!(matches(id, id, b'/'));
        assert!(matches("spiffe://ci.example/repo/acme/*", id, b'/'));
        assert!(matches("spiffe://ci.example/repo/*/api", id, b'/'));
        assert!(!matches("spiffe://ci.example/repo/*", id, b'/'));
        assert!(matches("spiffe://ci.example/repo/**", id, b'/'));
        assert!(matches("spiffe://ci.example/**", id, b'/'));
        assert!(matches("*", id, b'/'));
        assert!(!matches("spiffe://ci.example/repo/acme", id, b'/'));
        assert!(!matches("spiffe://ci.example/repo/acme/ap", id, b'/'));
        assert!(matches("spiffe://ci.example/repo/acme/a*", id, b'/'));
    }

    #[test]
    fn host_globs() {
        assert!(host_matches("api.openai.com", "API.OpenAI.com."));
        assert!(host_matches("*.openai.com", "api.openai.com"));
        assert!(!host_matches("*.openai.com", "a.b.openai.com"));
        assert!(host_matches("**.openai.com", "a.b.openai.com"));
        assert!(!host_matches("*.openai.com", "openai.com"));
        assert!(!host_matches("*.openai.com", "evilopenai.com"));
        assert!(host_matches("*", "anything.example"));
        assert!(!host_matches("*", ""));
    }
}
