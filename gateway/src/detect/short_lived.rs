//! Credentials that are short-lived by construction, recognised so they are
//! reported as such rather than as static keys (see `docs/detection.md`).
//!
//! The rule, and only it:
//! - a JWT (compact JWS: three base64url segments whose header is a JSON
//!   object with `alg`) whose payload's numeric `exp` is at most
//!   [`MAX_JWT_REMAINING`] after now (or already past): whoever hard-coded
//!   it, it stops working on its own;
//! - an AWS access key id of STS temporary credentials (`ASIA…`, matched by
//!   rule `aws-access-key-id`): session credentials expire by design
//!   (long-term keys are `AKIA…`).
//!
//! A JWT with no `exp`, or one that lives longer, is a static credential
//! like any other. The JWT's signature is not checked (the gateway holds no
//! key for it): a job could forge a near `exp` into a token, but a forged
//! token is not a working credential for an honest verifier either.

use base64::Engine as _;
use time::OffsetDateTime;

use super::Secret;

/// Longest remaining lifetime of a JWT that counts as short-lived.
pub const MAX_JWT_REMAINING: time::Duration = time::Duration::hours(1);

/// Why a credential is short-lived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShortLived {
    /// A JWT expiring at this Unix time.
    Jwt {
        /// `exp`.
        expires_at: i64,
    },
    /// AWS STS session credentials.
    AwsSession,
}

impl ShortLived {
    /// A name for logs and events.
    pub fn kind(self) -> &'static str {
        match self {
            ShortLived::Jwt { .. } => "jwt",
            ShortLived::AwsSession => "aws-sts-session",
        }
    }
}

/// Whether `secret`, matched by `rule_id`, is short-lived by construction at `now`.
pub fn classify(rule_id: &str, secret: &Secret, now: OffsetDateTime) -> Option<ShortLived> {
    let bytes = secret.as_bytes();
    if rule_id == "aws-access-key-id" && bytes.starts_with(b"ASIA") {
        return Some(ShortLived::AwsSession);
    }
    let expires_at = jwt_exp(bytes)?;
    (expires_at - now.unix_timestamp() <= MAX_JWT_REMAINING.whole_seconds()).then_some(ShortLived::Jwt { expires_at })
}

/// The `exp` of a compact JWS, if `token` is one and has a numeric `exp`.
fn jwt_exp(token: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(token).ok()?;
    let mut parts = text.split('.');
    let (header, payload, signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || signature.is_empty() {
        return None;
    }
    let decode = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok();
    let header: serde_json::Value = serde_json::from_slice(&decode(header)?).ok()?;
    header.get("alg")?.as_str()?;
    let payload: serde_json::Value = serde_json::from_slice(&decode(payload)?).ok()?;
    let exp = payload.get("exp")?;
    exp.as_i64().or_else(|| exp.as_f64().map(|f| f as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &serde_json::Value) -> Secret {
        let enc = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let token =
            format!("{}.{}.c2lnbmF0dXJl", enc(&serde_json::json!({"alg": "RS256", "typ": "JWT"})), enc(payload));
        Secret::new(token.as_bytes())
    }

    #[test]
    fn the_documented_rule() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let t = now.unix_timestamp();
        let near = jwt(&serde_json::json!({"sub": "job", "exp": t + 600}));
        assert_eq!(classify("unknown-auth-credential", &near, now), Some(ShortLived::Jwt { expires_at: t + 600 }));
        let expired = jwt(&serde_json::json!({"exp": t - 5}));
        assert!(classify("unknown-auth-credential", &expired, now).is_some());
        let long = jwt(&serde_json::json!({"exp": t + 30 * 86_400}));
        assert_eq!(classify("unknown-auth-credential", &long, now), None, "a month-long JWT is static");
        let no_exp = jwt(&serde_json::json!({"sub": "job"}));
        assert_eq!(classify("unknown-auth-credential", &no_exp, now), None);
        assert_eq!(classify("x", &Secret::new(b"a.b.c"), now), None);
        assert_eq!(
            classify("aws-access-key-id", &Secret::new(b"ASIA45IJLQ53XGZ5LQO4"), now),
            Some(ShortLived::AwsSession)
        );
        assert_eq!(classify("aws-access-key-id", &Secret::new(b"AKIAPON5FAKCYYWSWEXV"), now), None);
    }
}
