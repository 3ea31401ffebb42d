//! OpenID Connect sign-in through the `openidconnect` crate: discovery of the
//! provider's endpoints and keys, the authorization request (code flow with
//! PKCE S256, nonce and state), the code exchange and the ID token's
//! verification (signature against the discovered JWKS, issuer, audience,
//! expiry, nonce). What this module adds is only the mapping from the
//! verified claims to a console [`User`] and [`Role`].

use std::time::{Duration, Instant};

use openidconnect::{
    core::{
        CoreAuthDisplay, CoreAuthPrompt, CoreErrorResponseType, CoreGenderClaim, CoreJsonWebKey,
        CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm, CoreProviderMetadata, CoreRevocableToken,
        CoreRevocationErrorResponse, CoreTokenIntrospectionResponse, CoreTokenType,
    },
    reqwest, AdditionalClaims, AuthenticationFlow, AuthorizationCode, Client, ClientId, ClientSecret, CsrfToken,
    EmptyExtraTokenFields, EndpointMaybeSet, EndpointNotSet, EndpointSet, IdTokenFields, IssuerUrl, Nonce,
    PkceCodeChallenge, RedirectUrl, Scope, StandardErrorResponse, StandardTokenResponse,
};
use serde::{Deserialize, Serialize};

use super::{
    session::{Pending, Role, User},
    OidcConfig,
};

/// Claims beyond the standard ones, kept whole so the configured groups
/// claim can be read whatever its name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExtraClaims {
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

impl AdditionalClaims for ExtraClaims {}

type TokenResponse = StandardTokenResponse<
    IdTokenFields<
        ExtraClaims,
        EmptyExtraTokenFields,
        CoreGenderClaim,
        CoreJweContentEncryptionAlgorithm,
        CoreJwsSigningAlgorithm,
    >,
    CoreTokenType,
>;

/// The client as built from discovered metadata: authorization endpoint
/// set, token and userinfo endpoints possibly set.
type OidcClient = Client<
    ExtraClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    TokenResponse,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// How long discovered metadata (and the provider's keys) are reused
/// before they are fetched again (key rotation).
const DISCOVERY_TTL: Duration = Duration::from_secs(900);
/// Bound on each request to the provider.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a sign-in failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The provider's configuration could not be read.
    #[error("OIDC discovery at {issuer} failed: {reason}")]
    Discovery {
        /// The issuer.
        issuer: String,
        /// Why.
        reason: String,
    },
    /// The code exchange failed.
    #[error("the provider refused the code exchange: {0}")]
    Exchange(String),
    /// The ID token was missing or did not verify.
    #[error("the ID token did not verify: {0}")]
    IdToken(String),
    /// The user has no group mapped to a role.
    #[error("{user} has no group mapped to a console role")]
    NoRole {
        /// Who.
        user: String,
    },
    /// A configuration value is unusable.
    #[error("{0}")]
    Config(String),
}

/// The identity provider, as the console uses it.
pub struct Provider {
    config: OidcConfig,
    secret: Option<ClientSecret>,
    http: reqwest::Client,
    discovered: tokio::sync::Mutex<Option<(Instant, OidcClient)>>,
}

impl Provider {
    /// A provider for `config`; reads the client secret and CA files now
    /// (discovery waits for the first sign-in, so a provider that is down
    /// does not stop the gateway).
    pub fn new(config: &OidcConfig) -> Result<Provider, AuthError> {
        let secret =
            match &config.client_secret_file {
                Some(path) => Some(ClientSecret::new(super::read_secret(path).map_err(|e| {
                    AuthError::Config(format!("console.oidc.client_secret_file {}: {e}", path.display()))
                })?)),
                None => None,
            };
        // No redirects: a provider's endpoint redirecting elsewhere is not
        // followed (the SSRF advice of the openidconnect crate).
        let mut http =
            reqwest::ClientBuilder::new().redirect(reqwest::redirect::Policy::none()).timeout(PROVIDER_TIMEOUT);
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| AuthError::Config(format!("console.oidc.ca_file {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| AuthError::Config(format!("console.oidc.ca_file {}: {e}", path.display())))?;
            for cert in certs {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http.build().map_err(|e| AuthError::Config(format!("building the OIDC HTTP client: {e}")))?;
        Ok(Provider { config: config.clone(), secret, http, discovered: tokio::sync::Mutex::new(None) })
    }

    /// The client, from cached or fresh discovery.
    async fn client(&self) -> Result<OidcClient, AuthError> {
        let mut cached = self.discovered.lock().await;
        if let Some((at, client)) = cached.as_ref() {
            if at.elapsed() < DISCOVERY_TTL {
                return Ok(client.clone());
            }
        }
        let fail = |reason: String| AuthError::Discovery { issuer: self.config.issuer.clone(), reason };
        let issuer = IssuerUrl::new(self.config.issuer.clone()).map_err(|e| fail(e.to_string()))?;
        let metadata =
            CoreProviderMetadata::discover_async(issuer, &self.http).await.map_err(|e| fail(error_chain(&e)))?;
        let redirect = RedirectUrl::new(self.config.redirect_url.clone()).map_err(|e| fail(e.to_string()))?;
        let client: OidcClient =
            Client::from_provider_metadata(metadata, ClientId::new(self.config.client_id.clone()), self.secret.clone())
                .set_redirect_uri(redirect);
        *cached = Some((Instant::now(), client.clone()));
        Ok(client)
    }

    /// Starts a sign-in: the provider URL to send the browser to, the
    /// `state` it will come back with and what to keep until then.
    pub async fn begin(&self) -> Result<(String, String, openidconnect::PkceCodeVerifier, Nonce), AuthError> {
        let client = self.client().await?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state, nonce) = client
            .authorize_url(
                AuthenticationFlow::<openidconnect::core::CoreResponseType>::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .add_scope(Scope::new("email".into()))
            .add_scope(Scope::new("profile".into()))
            .set_pkce_challenge(challenge)
            .url();
        Ok((url.to_string(), state.secret().clone(), verifier, nonce))
    }

    /// Finishes a sign-in: exchanges `code` (with the PKCE verifier),
    /// verifies the ID token (with the nonce) and maps it to a user.
    pub async fn finish(&self, code: String, pending: Pending) -> Result<User, AuthError> {
        let client = self.client().await?;
        let response = client
            .exchange_code(AuthorizationCode::new(code))
            .map_err(|e| AuthError::Exchange(e.to_string()))?
            .set_pkce_verifier(pending.verifier)
            .request_async(&self.http)
            .await
            .map_err(|e| AuthError::Exchange(error_chain(&e)))?;
        let id_token = response
            .extra_fields()
            .id_token()
            .ok_or_else(|| AuthError::IdToken("the provider returned no ID token".into()))?;
        let verifier = client.id_token_verifier();
        let claims = id_token.claims(&verifier, &pending.nonce).map_err(|e| AuthError::IdToken(error_chain(&e)))?;
        let subject = claims.subject().as_str().to_owned();
        // An e-mail address names the user only when the provider vouches
        // for it: an unverified one could be anybody's.
        let email = claims.email().filter(|_| claims.email_verified() == Some(true)).map(|e| e.as_str().to_owned());
        let username = claims.preferred_username().map(|u| u.as_str().to_owned());
        let groups = groups_of(claims.additional_claims(), &self.config.groups_claim);
        user_of(subject, email, username, &groups, &self.config.roles)
    }
}

/// The groups in claim `name`: an array of strings, or one string.
fn groups_of(extra: &ExtraClaims, name: &str) -> Vec<String> {
    match extra.rest.get(name) {
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        Some(serde_json::Value::String(one)) => vec![one.clone()],
        _ => Vec::new(),
    }
}

/// The console user for verified claims: named by e-mail, else preferred
/// user name, else subject; with the highest role of their groups.
fn user_of(
    subject: String,
    email: Option<String>,
    username: Option<String>,
    groups: &[String],
    roles: &std::collections::BTreeMap<String, Role>,
) -> Result<User, AuthError> {
    let name = email.clone().or_else(|| username.clone()).unwrap_or_else(|| subject.clone());
    let role = groups.iter().filter_map(|g| roles.get(g)).max().copied();
    let Some(role) = role else {
        return Err(AuthError::NoRole { user: name });
    };
    let mut aliases: Vec<String> = Vec::new();
    let local = email.as_deref().and_then(|e| e.split_once('@')).map(|(local, _)| local.to_owned());
    for alias in [Some(subject), email, username, local].into_iter().flatten() {
        if alias != name && !aliases.contains(&alias) {
            aliases.push(alias);
        }
    }
    Ok(User { name, aliases, role })
}

/// An error and its causes, in one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn users_get_their_highest_role_and_every_alias() {
        let roles = BTreeMap::from([
            ("sec".to_owned(), Role::Reviewer),
            ("release".to_owned(), Role::Approver),
            ("all".to_owned(), Role::Viewer),
        ]);
        let user = user_of(
            "sub-1".into(),
            Some("alice@example.com".into()),
            Some("alice-gh".into()),
            &["all".into(), "release".into(), "unmapped".into()],
            &roles,
        )
        .unwrap();
        assert_eq!(user.name, "alice@example.com");
        assert_eq!(user.role, Role::Approver);
        assert_eq!(user.aliases, ["sub-1", "alice-gh", "alice"]);
        assert_eq!(user.audit_name(), "oidc:alice@example.com");
        let bare = user_of("sub-2".into(), None, None, &["sec".into()], &roles).unwrap();
        assert_eq!((bare.name.as_str(), bare.role), ("sub-2", Role::Reviewer));
        assert!(matches!(user_of("sub-3".into(), None, None, &["x".into()], &roles), Err(AuthError::NoRole { .. })));
    }

    #[test]
    fn groups_are_an_array_or_one_string() {
        let extra: ExtraClaims = serde_json::from_str(r#"{"groups": ["a", 3, "b"], "team": "c"}"#).unwrap();
        assert_eq!(groups_of(&extra, "groups"), ["a", "b"]);
        assert_eq!(groups_of(&extra, "team"), ["c"]);
        assert!(groups_of(&extra, "none").is_empty());
    }
}
