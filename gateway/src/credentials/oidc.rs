//! Validation of OIDC ID tokens that jobs present (e.g. the CI system's job
//! token), so the gateway can trust attributes such as the repository and
//! workflow a job claims to run for.
//!
//! Signatures are checked with `jsonwebtoken`; time, issuer and audience are
//! checked here against the injectable [`Clock`], so expiry is testable and
//! every failure maps to one clear [`OidcError`].
//!
//! Each issuer's JWKS is cached. It is fetched on first use, again after
//! `refresh`, and again when a token names an unknown `kid` (the issuer
//! rotated) — but at most once per [`MIN_REFETCH_INTERVAL`], so a stream of
//! tokens with made-up key ids cannot turn the gateway into a request
//! amplifier against the issuer. A failed fetch keeps the previous keys.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    str::FromStr,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use base64::Engine;
use jsonwebtoken::{
    jwk::{AlgorithmParameters, EllipticCurve, Jwk},
    Algorithm, DecodingKey, Validation,
};
use serde_json::Value;

use super::{
    clock::{to_system_time, Clock},
    config::{OidcProvider, SUPPORTED_OIDC_ALGORITHMS},
    http_fetch,
};
use crate::tls::UpstreamTls;

/// Unknown-`kid` refetches happen at most this often per issuer (seconds).
pub const MIN_REFETCH_INTERVAL: u64 = 10;
/// A JWKS endpoint that has not answered by then is treated as down.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Attacker-controlled strings (issuer, kid) are cut to this in error messages.
const MAX_ECHO: usize = 80;

/// Why a token was rejected. The `Display` text is suitable for a 401 body:
/// it never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    /// Not a compact JWS, or its header or payload is not JSON.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `alg` is `none`, not accepted for this issuer, or does not fit the key.
    #[error("signature algorithm `{0}` is not accepted")]
    AlgorithmNotAllowed(String),
    /// `iss` names no configured issuer.
    #[error("issuer mismatch: `{0}` is not a trusted issuer")]
    IssuerMismatch(String),
    /// The issuer's JWKS has no key with the token's `kid`, even after a refetch.
    #[error("unknown key id `{0}`")]
    UnknownKid(String),
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `exp` has passed (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` or `iat` lies in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `aud` names none of the accepted audiences.
    #[error("wrong audience")]
    WrongAudience,
    /// A required claim is absent or has the wrong type.
    #[error("missing or invalid claim `{0}`")]
    MissingClaim(&'static str),
    /// The issuer's keys could not be obtained.
    #[error("cannot obtain the issuer's keys: {0}")]
    JwksUnavailable(String),
    /// The validator's configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
}

impl OidcError {
    /// A short stable code for metrics, logs and machine-readable 401 bodies.
    pub fn code(&self) -> &'static str {
        match self {
            OidcError::Malformed(_) => "malformed",
            OidcError::AlgorithmNotAllowed(_) => "algorithm_not_allowed",
            OidcError::IssuerMismatch(_) => "issuer_mismatch",
            OidcError::UnknownKid(_) => "unknown_kid",
            OidcError::BadSignature => "bad_signature",
            OidcError::Expired => "expired",
            OidcError::NotYetValid => "not_yet_valid",
            OidcError::WrongAudience => "wrong_audience",
            OidcError::MissingClaim(_) => "missing_claim",
            OidcError::JwksUnavailable(_) => "jwks_unavailable",
            OidcError::Config(_) => "configuration",
        }
    }
}

/// What a valid token vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedClaims {
    /// `sub`.
    pub subject: String,
    /// `iss` (one of the configured issuers).
    pub issuer: String,
    /// Configured claims, by attribute name. A configured claim the token
    /// lacks is absent; numbers and booleans are rendered as text.
    pub attributes: BTreeMap<String, String>,
    /// `exp`.
    pub expires_at: SystemTime,
}

/// A key from an issuer's JWKS.
#[derive(Clone)]
struct CachedKey {
    key: DecodingKey,
    /// Which header algorithms this key can verify.
    kind: KeyKind,
    /// The JWK's own `alg`, if it pins one.
    alg: Option<Algorithm>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::P256 => alg == ES256,
            KeyKind::P384 => alg == ES384,
            KeyKind::Ed25519 => alg == EdDSA,
        }
    }
}

#[derive(Default)]
struct JwksCache {
    /// By `kid`; a key without `kid` is stored under "".
    keys: HashMap<String, CachedKey>,
    fetched_at: Option<u64>,
    last_attempt: Option<u64>,
}

struct Provider {
    config: OidcProvider,
    algorithms: Vec<Algorithm>,
    leeway: u64,
    refresh: u64,
    cache: RwLock<JwksCache>,
    /// Serialises fetches so a burst of tokens with a new `kid` causes one request.
    fetching: tokio::sync::Mutex<()>,
}

/// Validates ID tokens from the configured issuers.
pub struct OidcValidator {
    providers: Vec<Provider>,
    clock: Arc<dyn Clock>,
    tls: Option<UpstreamTls>,
}

impl fmt::Debug for OidcValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let issuers: Vec<&str> = self.providers.iter().map(|p| p.config.issuer.as_str()).collect();
        f.debug_struct("OidcValidator").field("issuers", &issuers).finish_non_exhaustive()
    }
}

impl OidcValidator {
    /// A validator for `providers` (already checked by
    /// [`CredentialsConfig::validate`](super::CredentialsConfig::validate)).
    ///
    /// `tls` verifies https JWKS endpoints; pass the proxy's upstream TLS so
    /// extra CAs apply. Without it, the system roots are used.
    pub fn new(
        providers: Vec<OidcProvider>,
        clock: Arc<dyn Clock>,
        tls: Option<UpstreamTls>,
    ) -> Result<Self, OidcError> {
        let needs_tls = providers.iter().any(|p| p.jwks_url.as_deref().is_some_and(|u| u.starts_with("https:")));
        let tls = match tls {
            Some(tls) => Some(tls),
            None if needs_tls => Some(
                UpstreamTls::new(&crate::tls::TlsConfig::default()).map_err(|e| OidcError::Config(e.to_string()))?,
            ),
            None => None,
        };
        let providers = providers
            .into_iter()
            .map(|config| {
                config
                    .validate()
                    .map_err(|(field, reason)| OidcError::Config(format!("{}: {field}: {reason}", config.issuer)))?;
                let algorithms = config
                    .algorithms
                    .iter()
                    .filter(|a| SUPPORTED_OIDC_ALGORITHMS.contains(&a.as_str()))
                    .map(|a| Algorithm::from_str(a).map_err(|_| OidcError::Config(format!("unknown algorithm `{a}`"))))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Provider {
                    algorithms,
                    leeway: config.leeway.as_secs(),
                    refresh: config.refresh.as_secs().max(1),
                    config,
                    cache: RwLock::new(JwksCache::default()),
                    fetching: tokio::sync::Mutex::new(()),
                })
            })
            .collect::<Result<Vec<_>, OidcError>>()?;
        Ok(Self { providers, clock, tls })
    }

    /// Validates `token` and returns what it vouches for.
    pub async fn validate(&self, token: &str) -> Result<VerifiedClaims, OidcError> {
        let (header, payload) = split_unverified(token)?;
        let alg_name = header.get("alg").and_then(Value::as_str).ok_or(OidcError::MissingClaim("alg"))?;
        // Checked before anything else: an unsigned token gets no further.
        if alg_name.eq_ignore_ascii_case("none") {
            return Err(OidcError::AlgorithmNotAllowed("none".into()));
        }
        let issuer = payload.get("iss").and_then(Value::as_str).ok_or(OidcError::MissingClaim("iss"))?;
        let provider = self
            .providers
            .iter()
            .find(|p| p.config.issuer == issuer)
            .ok_or_else(|| OidcError::IssuerMismatch(echo(issuer)))?;
        let alg = Algorithm::from_str(alg_name)
            .ok()
            .filter(|a| provider.algorithms.contains(a))
            .ok_or_else(|| OidcError::AlgorithmNotAllowed(echo(alg_name)))?;
        let kid = header.get("kid").and_then(Value::as_str);

        let key = self.key_for(provider, kid).await?;
        if !key.kind.fits(alg) || key.alg.is_some_and(|pinned| pinned != alg) {
            return Err(OidcError::AlgorithmNotAllowed(echo(alg_name)));
        }
        // Signature only: time, issuer and audience are checked below against
        // our clock, where each failure gets its own error.
        let mut validation = Validation::new(alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<Value>(token, &key.key, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::InvalidSignature => OidcError::BadSignature,
                jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => OidcError::AlgorithmNotAllowed(echo(alg_name)),
                jsonwebtoken::errors::ErrorKind::Base64(_)
                | jsonwebtoken::errors::ErrorKind::Json(_)
                | jsonwebtoken::errors::ErrorKind::Utf8(_)
                | jsonwebtoken::errors::ErrorKind::InvalidToken => OidcError::Malformed(e.to_string()),
                // Key/signature encoding problems: from the caller's side the
                // signature simply does not verify.
                _ => OidcError::BadSignature,
            })?
            .claims;
        let verified = self.check_claims(provider, &claims)?;
        tracing::debug!(iss = %verified.issuer, sub = %verified.subject, kid = kid.unwrap_or(""), "OIDC token verified");
        Ok(verified)
    }

    fn check_claims(&self, provider: &Provider, claims: &Value) -> Result<VerifiedClaims, OidcError> {
        let now = self.clock.now();
        let leeway = provider.leeway;
        if claims.get("iss").and_then(Value::as_str) != Some(provider.config.issuer.as_str()) {
            return Err(OidcError::IssuerMismatch(echo(claims.get("iss").and_then(Value::as_str).unwrap_or(""))));
        }
        let exp = numeric_date(claims, "exp")?.ok_or(OidcError::MissingClaim("exp"))?;
        if now >= exp.saturating_add(leeway) {
            return Err(OidcError::Expired);
        }
        for name in ["nbf", "iat"] {
            if let Some(t) = numeric_date(claims, name)? {
                if t > now.saturating_add(leeway) {
                    return Err(OidcError::NotYetValid);
                }
            }
        }
        let audiences: Vec<&str> = match claims.get("aud") {
            Some(Value::String(a)) => vec![a.as_str()],
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !audiences.iter().any(|a| provider.config.audiences.iter().any(|ok| ok == a)) {
            return Err(OidcError::WrongAudience);
        }
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or(OidcError::MissingClaim("sub"))?;
        let attributes = provider
            .config
            .claims
            .iter()
            .filter_map(|(attr, claim)| {
                let value = match claims.get(claim)? {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return None,
                };
                Some((attr.clone(), value))
            })
            .collect();
        Ok(VerifiedClaims {
            subject: subject.to_owned(),
            issuer: provider.config.issuer.clone(),
            attributes,
            expires_at: to_system_time(exp),
        })
    }

    /// Fetches every issuer's JWKS now (subject to the refetch rate limit);
    /// for a periodic task or a warm-up at start. Errors are per issuer.
    pub async fn refresh_all(&self) -> Vec<(String, OidcError)> {
        let mut errors = Vec::new();
        for provider in &self.providers {
            if let Err(e) = self.refresh(provider).await {
                errors.push((provider.config.issuer.clone(), e));
            }
        }
        errors
    }

    async fn key_for(&self, provider: &Provider, kid: Option<&str>) -> Result<CachedKey, OidcError> {
        let now = self.clock.now();
        let stale = read_cache(provider, |c| c.fetched_at.is_none_or(|t| now >= t.saturating_add(provider.refresh)));
        let mut fetch_error = None;
        if stale {
            // A failed periodic refresh keeps the old keys; only report the
            // failure if it leaves us without the key we need.
            fetch_error = self.refresh(provider).await.err();
        }
        if let Some(key) = read_cache(provider, |c| lookup(c, kid)) {
            return Ok(key);
        }
        if !stale {
            fetch_error = self.refresh(provider).await.err();
        }
        if let Some(key) = read_cache(provider, |c| lookup(c, kid)) {
            return Ok(key);
        }
        let have_keys = read_cache(provider, |c| !c.keys.is_empty());
        match fetch_error {
            Some(e) if !have_keys => Err(e),
            _ => Err(OidcError::UnknownKid(echo(kid.unwrap_or("")))),
        }
    }

    /// Fetches the issuer's JWKS unless one was fetched within
    /// [`MIN_REFETCH_INTERVAL`]; keeps the old keys on failure.
    async fn refresh(&self, provider: &Provider) -> Result<(), OidcError> {
        let _one_at_a_time = provider.fetching.lock().await;
        let now = self.clock.now();
        // Whoever held the lock before us may just have fetched.
        if read_cache(provider, |c| c.last_attempt.is_some_and(|t| now < t.saturating_add(MIN_REFETCH_INTERVAL))) {
            return Ok(());
        }
        write_cache(provider, |c| c.last_attempt = Some(now));
        let source = provider
            .config
            .jwks_url
            .clone()
            .or_else(|| provider.config.jwks_file.as_ref().map(|p| p.display().to_string()))
            .unwrap_or_default();
        match self.fetch(provider).await.and_then(|body| parse_jwks(&body)) {
            Ok(keys) => {
                tracing::debug!(issuer = %provider.config.issuer, keys = keys.len(), "fetched OIDC JWKS");
                write_cache(provider, |c| {
                    c.keys = keys;
                    c.fetched_at = Some(now);
                });
                Ok(())
            }
            Err(reason) => {
                tracing::warn!(issuer = %provider.config.issuer, %source, %reason, "cannot refresh OIDC JWKS; keeping the previous keys");
                Err(OidcError::JwksUnavailable(reason))
            }
        }
    }

    async fn fetch(&self, provider: &Provider) -> Result<Vec<u8>, String> {
        if let Some(url) = &provider.config.jwks_url {
            let (status, body) = http_fetch::get(url, self.tls.as_ref(), FETCH_TIMEOUT).await?;
            if !status.is_success() {
                return Err(format!("{url}: HTTP {status}"));
            }
            return Ok(body.to_vec());
        }
        if let Some(path) = &provider.config.jwks_file {
            let bytes = tokio::fs::read(path).await.map_err(|e| format!("{}: {e}", path.display()))?;
            if bytes.len() > http_fetch::MAX_BODY {
                return Err(format!("{}: larger than {} bytes", path.display(), http_fetch::MAX_BODY));
            }
            return Ok(bytes);
        }
        Err("no JWKS source configured".into())
    }
}

fn read_cache<T>(provider: &Provider, f: impl FnOnce(&JwksCache) -> T) -> T {
    // The cache is only ever replaced field by field under the lock; a
    // poisoned lock still holds usable keys.
    f(&provider.cache.read().unwrap_or_else(|e| e.into_inner()))
}

fn write_cache(provider: &Provider, f: impl FnOnce(&mut JwksCache)) {
    f(&mut provider.cache.write().unwrap_or_else(|e| e.into_inner()))
}

fn lookup(cache: &JwksCache, kid: Option<&str>) -> Option<CachedKey> {
    match kid {
        Some(kid) => cache.keys.get(kid).cloned(),
        // A token without `kid` is only unambiguous against a one-key set.
        None if cache.keys.len() == 1 => cache.keys.values().next().cloned(),
        None => None,
    }
}

/// Keys usable for signatures; HMAC (`oct`) keys and encryption keys are
/// skipped, so a public JWKS can never become a shared secret.
fn parse_jwks(body: &[u8]) -> Result<HashMap<String, CachedKey>, String> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    let list = doc.get("keys").and_then(Value::as_array).ok_or("JWKS has no `keys` array")?;
    let mut keys = HashMap::new();
    for raw in list {
        if raw.get("use").and_then(Value::as_str).is_some_and(|u| u != "sig") {
            continue;
        }
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw.clone()) else {
            tracing::debug!("skipping an unparsable JWKS entry");
            continue;
        };
        let kind = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => KeyKind::Rsa,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => KeyKind::P256,
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => KeyKind::P384,
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => KeyKind::Ed25519,
            _ => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else { continue };
        let alg = raw.get("alg").and_then(Value::as_str).and_then(|a| Algorithm::from_str(a).ok());
        let kid = jwk.common.key_id.clone().unwrap_or_default();
        keys.insert(kid, CachedKey { key, kind, alg });
    }
    if keys.is_empty() {
        return Err("JWKS holds no usable signing key".into());
    }
    Ok(keys)
}

/// Header and payload as JSON, before any verification: used only to pick
/// the issuer, algorithm and key.
fn split_unverified(token: &str) -> Result<(Value, Value), OidcError> {
    let token = token.trim();
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(_sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(OidcError::Malformed("expected three dot-separated parts".into()));
    };
    let decode = |part: &str, what: &str| -> Result<Value, OidcError> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| OidcError::Malformed(format!("{what} is not base64url")))?;
        let value: Value =
            serde_json::from_slice(&bytes).map_err(|_| OidcError::Malformed(format!("{what} is not JSON")))?;
        if value.is_object() {
            Ok(value)
        } else {
            Err(OidcError::Malformed(format!("{what} is not a JSON object")))
        }
    };
    Ok((decode(h, "header")?, decode(p, "payload")?))
}

/// A `NumericDate` claim; fractional seconds are truncated.
fn numeric_date(claims: &Value, name: &'static str) -> Result<Option<u64>, OidcError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f as u64))
            .map(Some)
            .ok_or(OidcError::MissingClaim(name)),
        Some(_) => Err(OidcError::MissingClaim(name)),
    }
}

fn echo(s: &str) -> String {
    let cut: String = s.chars().filter(|c| !c.is_control()).take(MAX_ECHO).collect();
    if cut.len() < s.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

#[cfg(test)]
mod tests;
