//! Replacing a job's hard-coded key in a request head with the credential
//! the gateway holds for the job's identity.
//!
//! Two steps so that a request is never left half-modified: [`Injection::render`]
//! builds the header or parameter (and fails on a value that cannot go on the
//! wire) before [`apply_swap`] touches the request, and `apply_swap` itself
//! cannot fail after it starts removing.

use std::fmt;

use base64::Engine;
use http::{header::AUTHORIZATION, request::Parts, HeaderName, HeaderValue, Uri};

use super::{
    config::{Injection, PLACEHOLDER_CREDENTIAL, PLACEHOLDER_JWT},
    jwt::{JwtError, MintRequest, Minter},
    secret::SecretString,
    store::Credential,
};
use crate::detect::http_scan::Location;

/// Why a swap could not be prepared or applied. Never contains a credential.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// The template uses `{credential}` but the entry has no value.
    #[error("the injection template uses {{credential}} but no credential is loaded")]
    MissingCredential,
    /// The template uses `{jwt}` but no token was minted.
    #[error("the injection template uses {{jwt}} but no token was minted")]
    MissingJwt,
    /// The configured header name is not a valid header name.
    #[error("`{0}` is not a valid header name")]
    InvalidHeaderName(String),
    /// The rendered value cannot be sent in a header (control characters).
    #[error("the rendered value for `{0}` is not a valid header value")]
    InvalidHeaderValue(String),
    /// The request URI could not be rebuilt with the new query.
    #[error("cannot rebuild the request URI: {0}")]
    InvalidUri(String),
    /// A database login cannot go into an HTTP request, nor a header into a
    /// database login.
    #[error("the credential's injection does not fit this protocol")]
    NotHttp,
    /// The template uses `{jwt}` and minting failed.
    #[error("cannot mint a token: {0}")]
    Mint(#[from] JwtError),
}

/// Renders a looked-up credential for one request: mints a token for
/// `mint.subject` with audience `mint.audience` when the template uses `{jwt}`
/// (and only then, so tokens are not minted for nothing).
pub fn prepare(
    credential: &Credential,
    minter: Option<&Minter>,
    mint: &MintRequest,
) -> Result<RenderedInjection, SwapError> {
    let jwt = if credential.inject.uses_jwt() {
        let minter = minter.ok_or(SwapError::MissingJwt)?;
        Some(minter.mint(mint)?.token)
    } else {
        None
    };
    credential.inject.render(credential.value.as_ref(), jwt.as_ref())
}

/// Where the job's hard-coded key was found, i.e. what to remove.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SwapTarget {
    /// Every value of this header (case-insensitive name).
    Header(String),
    /// `Basic` credentials in this header (usually `authorization`); the whole
    /// header goes, since user and password are one encoded value.
    BasicAuth(String),
    /// Every query parameter with this (percent-decoded) name.
    Query(String),
    /// The password of a PostgreSQL login (the gateway authenticates
    /// upstream with the injection's login instead).
    PostgresPassword,
}

impl SwapTarget {
    /// The target for a detection's location; `None` where a key cannot be
    /// swapped out of the head (path, body), which the caller must block or
    /// leave alone instead.
    pub fn from_location(location: &Location) -> Option<Self> {
        match location {
            Location::Header(name) => Some(SwapTarget::Header(name.clone())),
            Location::BasicAuthUser(name) | Location::BasicAuthPassword(name) => {
                Some(SwapTarget::BasicAuth(name.clone()))
            }
            Location::Query(name) => Some(SwapTarget::Query(name.clone())),
            Location::PostgresPassword { .. } => Some(SwapTarget::PostgresPassword),
            Location::RequestLine | Location::Path | Location::Body(_) | Location::Postgres(_) => None,
        }
    }
}

/// An injection with its value filled in, ready for [`apply_swap`].
#[derive(Clone)]
pub enum RenderedInjection {
    /// Set this header (replacing every existing value).
    Header {
        /// Header name.
        name: HeaderName,
        /// Value, marked sensitive so HTTP/2 HPACK never indexes it.
        value: HeaderValue,
    },
    /// Set this query parameter (replacing every existing one of that name).
    Query {
        /// Parameter name (unencoded).
        name: String,
        /// Value (unencoded).
        value: SecretString,
    },
    /// Log in to a database with this user (or the client's own) and password.
    Login {
        /// The user name, when the credential names one.
        user: Option<SecretString>,
        /// The password.
        password: SecretString,
    },
}

impl fmt::Debug for RenderedInjection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RenderedInjection::Header { name, .. } => write!(f, "Header({name}: [redacted])"),
            RenderedInjection::Query { name, .. } => write!(f, "Query({name}=[redacted])"),
            RenderedInjection::Login { .. } => f.write_str("Login([redacted])"),
        }
    }
}

/// What a swap did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwapOutcome {
    /// Header values and query parameters removed (targets and the injection's
    /// own header or parameter if the job had set it).
    pub removed: usize,
}

impl Injection {
    /// Fills the template(s) in: `credential` replaces `{credential}`, `jwt`
    /// replaces `{jwt}`. Placeholders are substituted in one pass, so a value
    /// that itself contains `{jwt}` is never expanded again.
    pub fn render(
        &self,
        credential: Option<&SecretString>,
        jwt: Option<&SecretString>,
    ) -> Result<RenderedInjection, SwapError> {
        let fill = |t: &str| fill_template(t, credential, jwt);
        let header = |name: HeaderName, value: SecretString| {
            let mut v = HeaderValue::from_str(value.expose())
                .map_err(|_| SwapError::InvalidHeaderValue(name.as_str().to_owned()))?;
            v.set_sensitive(true);
            Ok(RenderedInjection::Header { name, value: v })
        };
        match self {
            Injection::Bearer(t) => header(AUTHORIZATION, SecretString::new(format!("Bearer {}", fill(t)?.expose()))),
            Injection::BasicUser(t) => header(AUTHORIZATION, basic(&fill(t)?, "")),
            Injection::Basic { user, password } => header(AUTHORIZATION, basic(&fill(user)?, fill(password)?.expose())),
            Injection::Header { name, value } => {
                let name =
                    HeaderName::from_bytes(name.as_bytes()).map_err(|_| SwapError::InvalidHeaderName(name.clone()))?;
                header(name, fill(value)?)
            }
            Injection::Query { name, value } => {
                Ok(RenderedInjection::Query { name: name.clone(), value: fill(value)? })
            }
            Injection::Postgres { user, password } => {
                Ok(RenderedInjection::Login { user: user.as_deref().map(fill).transpose()?, password: fill(password)? })
            }
        }
    }
}

fn basic(user: &SecretString, password: &str) -> SecretString {
    let mut plain = zeroize::Zeroizing::new(String::with_capacity(user.len() + 1 + password.len()));
    plain.push_str(user.expose());
    plain.push(':');
    plain.push_str(password);
    SecretString::new(format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(plain.as_bytes())))
}

fn fill_template(
    template: &str,
    credential: Option<&SecretString>,
    jwt: Option<&SecretString>,
) -> Result<SecretString, SwapError> {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        if let Some(after) = tail.strip_prefix(PLACEHOLDER_CREDENTIAL) {
            out.push_str(credential.ok_or(SwapError::MissingCredential)?.expose());
            rest = after;
        } else if let Some(after) = tail.strip_prefix(PLACEHOLDER_JWT) {
            out.push_str(jwt.ok_or(SwapError::MissingJwt)?.expose());
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(SecretString::new(out))
}

/// Removes the job's key from every `remove` location and injects the
/// gateway-held credential. Afterwards the injected header or parameter is
/// present exactly once.
///
/// Only the head is touched; `content-length` and the body stay valid.
pub fn apply_swap(
    parts: &mut Parts,
    remove: &[SwapTarget],
    inject: &RenderedInjection,
) -> Result<SwapOutcome, SwapError> {
    let mut remove_params: Vec<&str> = Vec::new();
    let mut remove_headers: Vec<HeaderName> = Vec::new();
    for target in remove {
        match target {
            SwapTarget::Header(name) | SwapTarget::BasicAuth(name) => {
                // A name that is not a valid header name cannot be in the map.
                if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                    remove_headers.push(name);
                }
            }
            SwapTarget::Query(name) => remove_params.push(name),
            SwapTarget::PostgresPassword => return Err(SwapError::NotHttp),
        }
    }
    let (inject_header, inject_param) = match inject {
        RenderedInjection::Header { name, value } => (Some((name, value)), None),
        RenderedInjection::Query { name, value } => (None, Some((name.as_str(), value))),
        RenderedInjection::Login { .. } => return Err(SwapError::NotHttp),
    };
    if let Some((name, _)) = inject_header {
        remove_headers.push(name.clone());
    }
    if let Some((name, _)) = inject_param {
        remove_params.push(name);
    }

    // The URI is rebuilt first: it is the only step that can fail, and
    // failing before the headers change leaves the request untouched.
    let mut removed = 0;
    let query_changes = !remove_params.is_empty();
    if query_changes {
        let (uri, n) = rewrite_query(&parts.uri, &remove_params, inject_param)?;
        parts.uri = uri;
        removed += n;
    }
    for name in &remove_headers {
        if let http::header::Entry::Occupied(entry) = parts.headers.entry(name) {
            removed += entry.remove_entry_mult().1.count();
        }
    }
    if let Some((name, value)) = inject_header {
        parts.headers.insert(name.clone(), value.clone());
    }
    Ok(SwapOutcome { removed })
}

/// Drops every parameter named in `remove` and appends `inject`, keeping the
/// other parameters byte for byte (re-encoding them could break signatures).
fn rewrite_query(uri: &Uri, remove: &[&str], inject: Option<(&str, &SecretString)>) -> Result<(Uri, usize), SwapError> {
    let mut kept: Vec<String> = Vec::new();
    let mut removed = 0;
    if let Some(query) = uri.query() {
        for field in query.split('&') {
            let raw_name = field.split('=').next().unwrap_or(field);
            let name = percent_decode(raw_name);
            if !field.is_empty() && remove.iter().any(|r| r.as_bytes() == name.as_slice()) {
                removed += 1;
            } else if !field.is_empty() {
                kept.push(field.to_owned());
            }
        }
    }
    if let Some((name, value)) = inject {
        kept.push(format!("{}={}", percent_encode(name), percent_encode(value.expose())));
    }
    let path = uri.path();
    let path_and_query = if kept.is_empty() { path.to_owned() } else { format!("{path}?{}", kept.join("&")) };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query =
        Some(path_and_query.parse().map_err(|e: http::uri::InvalidUri| SwapError::InvalidUri(e.to_string()))?);
    let uri = Uri::from_parts(parts).map_err(|e| SwapError::InvalidUri(e.to_string()))?;
    Ok((uri, removed))
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    out
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "sk-old-hardcoded-key-123";
    const NEW: &str = "sk-new-gateway-held-456";

    fn request(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method("POST").uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    /// Every place a value can hide in a head: header values, Basic-decoded
    /// credentials, raw and decoded query.
    fn occurrences(parts: &Parts, needle: &str) -> usize {
        let mut n = 0;
        for value in parts.headers.values() {
            let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
            n += text.matches(needle).count();
            if let Some(b64) = text.strip_prefix("Basic ") {
                let decoded = base64::engine::general_purpose::STANDARD.decode(b64).unwrap_or_default();
                n += String::from_utf8_lossy(&decoded).matches(needle).count();
            }
        }
        let raw = parts.uri.to_string();
        n += raw.matches(needle).count();
        let decoded = String::from_utf8_lossy(&percent_decode(&raw)).into_owned();
        if decoded != raw {
            n += decoded.matches(needle).count();
        }
        n
    }

    fn secret(s: &str) -> SecretString {
        SecretString::from(s)
    }

    #[test]
    fn bearer_replaces_key_in_header_and_query() {
        let mut parts = request(
            &format!("https://api.example.com/v1/chat?key={OLD}&model=gpt&key=%73k-old-hardcoded-key-123"),
            &[("authorization", &format!("Bearer {OLD}")), ("x-api-key", OLD), ("x-api-key", OLD), ("accept", "*/*")],
        );
        let inject = Injection::Bearer("{credential}".into()).render(Some(&secret(NEW)), None).unwrap();
        let outcome = apply_swap(
            &mut parts,
            &[
                SwapTarget::Header("authorization".into()),
                SwapTarget::Header("X-Api-Key".into()),
                SwapTarget::Query("key".into()),
            ],
            &inject,
        )
        .unwrap();
        assert_eq!(occurrences(&parts, OLD), 0, "{parts:?}");
        assert_eq!(occurrences(&parts, NEW), 1);
        assert_eq!(parts.headers.get_all("authorization").iter().count(), 1);
        assert_eq!(parts.headers["authorization"], format!("Bearer {NEW}").as_str());
        assert!(parts.headers["authorization"].is_sensitive());
        assert_eq!(parts.headers["accept"], "*/*");
        assert_eq!(parts.uri, "https://api.example.com/v1/chat?model=gpt");
        assert_eq!(outcome.removed, 5);
    }

    #[test]
    fn basic_user_replaces_basic_credentials() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{OLD}:"));
        let mut parts = request("/v1/models", &[("authorization", &format!("Basic {b64}"))]);
        let inject = Injection::BasicUser("{credential}".into()).render(Some(&secret(NEW)), None).unwrap();
        apply_swap(&mut parts, &[SwapTarget::BasicAuth("authorization".into())], &inject).unwrap();
        assert_eq!(occurrences(&parts, OLD), 0);
        assert_eq!(occurrences(&parts, NEW), 1);
        let expected = base64::engine::general_purpose::STANDARD.encode(format!("{NEW}:"));
        assert_eq!(parts.headers["authorization"], format!("Basic {expected}").as_str());
        assert_eq!(parts.uri, "/v1/models");
    }

    #[test]
    fn custom_header_replaces_key_moved_from_authorization() {
        let mut parts = request(
            "/v1/messages?stream=true",
            &[("authorization", &format!("Bearer {OLD}")), ("x-api-key", "job-set")],
        );
        let inject = Injection::Header { name: "x-api-key".into(), value: "{credential}".into() }
            .render(Some(&secret(NEW)), None)
            .unwrap();
        apply_swap(&mut parts, &[SwapTarget::Header("authorization".into())], &inject).unwrap();
        assert_eq!(occurrences(&parts, OLD), 0);
        assert_eq!(occurrences(&parts, NEW), 1);
        assert!(parts.headers.get("authorization").is_none());
        assert_eq!(parts.headers.get_all("x-api-key").iter().count(), 1);
        assert_eq!(parts.uri, "/v1/messages?stream=true");
    }

    #[test]
    fn query_injection_and_jwt_placeholder() {
        let mut parts = request(&format!("/v1/x?a=1&api_key={OLD}&b=%20two"), &[("host", "api.example.com")]);
        let jwt = secret("eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.sig");
        let inject = Injection::Query { name: "api_key".into(), value: "{credential}".into() }
            .render(Some(&secret("new key/+&")), None)
            .unwrap();
        apply_swap(&mut parts, &[SwapTarget::Query("api_key".into())], &inject).unwrap();
        assert_eq!(occurrences(&parts, OLD), 0);
        assert_eq!(parts.uri, "/v1/x?a=1&b=%20two&api_key=new%20key%2F%2B%26");

        let mut parts = request("/", &[("x-api-key", OLD)]);
        let inject = Injection::Bearer("{jwt}".into()).render(None, Some(&jwt)).unwrap();
        apply_swap(&mut parts, &[SwapTarget::Header("x-api-key".into())], &inject).unwrap();
        assert_eq!(occurrences(&parts, OLD), 0);
        assert_eq!(parts.headers["authorization"], format!("Bearer {}", jwt.expose()).as_str());
    }

    #[test]
    fn render_errors_leave_nothing_half_done() {
        assert!(matches!(
            Injection::Bearer("{credential}".into()).render(None, None),
            Err(SwapError::MissingCredential)
        ));
        assert!(matches!(
            Injection::Bearer("{jwt}".into()).render(Some(&secret("x")), None),
            Err(SwapError::MissingJwt)
        ));
        let e = Injection::Bearer("{credential}".into()).render(Some(&secret("bad\r\nvalue")), None).unwrap_err();
        assert!(matches!(e, SwapError::InvalidHeaderValue(_)));
        assert!(!e.to_string().contains("bad"));
        // A credential containing a placeholder is not expanded again.
        let r = Injection::Header { name: "x-k".into(), value: "{credential}".into() }
            .render(Some(&secret("{jwt}")), None)
            .unwrap();
        let RenderedInjection::Header { value, .. } = &r else { panic!() };
        assert_eq!(value, "{jwt}");
        assert!(!format!("{r:?}").contains("{jwt}"));
    }

    #[test]
    fn prepare_mints_only_when_the_template_needs_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::credentials::JwtConfig { issuer: "https://gw".into(), ..Default::default() };
        let minter =
            Minter::open(&cfg, dir.path(), std::sync::Arc::new(crate::credentials::ManualClock::starting_now()))
                .unwrap();
        let mint =
            MintRequest { subject: "spiffe://ci/x".into(), audience: "api.example".into(), ..Default::default() };
        let static_cred = Credential {
            value: Some(secret(NEW)),
            inject: Injection::default(),
            entry: 0,
            expires_at: None,
            per_session: None,
        };
        let RenderedInjection::Header { value, .. } = prepare(&static_cred, None, &mint).unwrap() else { panic!() };
        assert_eq!(value, format!("Bearer {NEW}").as_str());

        let jwt_cred = Credential {
            value: None,
            inject: Injection::Bearer("{jwt}".into()),
            entry: 1,
            expires_at: None,
            per_session: None,
        };
        assert!(matches!(prepare(&jwt_cred, None, &mint), Err(SwapError::MissingJwt)));
        let RenderedInjection::Header { value, .. } = prepare(&jwt_cred, Some(&minter), &mint).unwrap() else {
            panic!()
        };
        let token = value.to_str().unwrap().strip_prefix("Bearer ").unwrap();
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.kid, Some(minter.current_kid()));
    }

    #[test]
    fn targets_from_detector_locations() {
        assert_eq!(
            SwapTarget::from_location(&Location::Header("x-api-key".into())),
            Some(SwapTarget::Header("x-api-key".into()))
        );
        assert_eq!(
            SwapTarget::from_location(&Location::BasicAuthPassword("authorization".into())),
            Some(SwapTarget::BasicAuth("authorization".into()))
        );
        assert_eq!(SwapTarget::from_location(&Location::Query("key".into())), Some(SwapTarget::Query("key".into())));
        assert_eq!(SwapTarget::from_location(&Location::Body("$.key".into())), None);
    }
}
