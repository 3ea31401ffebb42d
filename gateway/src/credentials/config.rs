//! Configuration of credential swapping, token minting and OIDC validation.
//!
//! Every field is documented in `docs/credentials.md`; keep the two in step.
//! Unknown fields are errors, so a typo never silently falls back to a default.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::glob;

/// Header in which jobs present an OIDC ID token to the gateway by default.
pub const DEFAULT_OIDC_HEADER: &str = "x-ci-oidc-token";

/// The `credentials` section.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CredentialsConfig {
    /// Upstream credentials, first match (identity and host) wins.
    pub credentials: Vec<CredentialEntry>,
    /// Tokens the gateway mints for identities (`{jwt}` in templates).
    pub jwt: JwtConfig,
    /// Issuers whose ID tokens jobs may present.
    pub oidc: Vec<OidcProvider>,
    /// Request header in which a job presents its ID token. The gateway
    /// validates it, removes it, and binds the verified claims to the request.
    pub oidc_header: String,
}

impl Default for CredentialsConfig {
    fn default() -> Self {
        CredentialsConfig {
            credentials: Vec::new(),
            jwt: JwtConfig::default(),
            oidc: Vec::new(),
            oidc_header: DEFAULT_OIDC_HEADER.to_owned(),
        }
    }
}

/// One upstream credential and where it applies.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CredentialEntry {
    /// Glob over identity URIs: `*` within one `/` segment, `**` across segments.
    pub identity: String,
    /// Glob over destination host names: `*` within one label, `**` across labels.
    pub host: String,
    /// Where the credential's value comes from. Optional only when `inject`
    /// uses nothing but `{jwt}`.
    // YAML maps (`file: /path`) rather than YAML tags (`!file /path`) for enums.
    #[serde(with = "serde_yaml_ng::with::singleton_map")]
    pub source: Option<Source>,
    /// How the credential goes into the request.
    #[serde(with = "serde_yaml_ng::with::singleton_map")]
    pub inject: Injection,
    /// For a source that says when its value expires (`command` with
    /// `output: json`): how long before the expiry it is read again.
    #[serde(with = "humantime_serde")]
    pub refresh_before: Duration,
    /// Makes the credential per session: with it, the `command` source runs
    /// when a session (an intercepted connection) first needs the
    /// credential, the value serves that session only, and this command
    /// revokes it when the session ends (`docs/credentials.md`).
    pub revoke: Option<RevokeCommand>,
}

/// A command that revokes a per-session credential when its session ends.
/// It gets a JSON document on its standard input (never in its arguments,
/// which other users can read in `/proc`): `credential`, `lease_id` when
/// the source gave one, `entry`, `identity` and `destination`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RevokeCommand {
    /// Program and arguments; the program is an absolute path.
    pub argv: Vec<String>,
    /// How long one attempt may run before it is killed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for RevokeCommand {
    fn default() -> Self {
        Self { argv: Vec::new(), timeout: Duration::from_secs(10) }
    }
}

/// Default [`CredentialEntry::refresh_before`].
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(60);

/// Where a credential's value is read from. Values are trimmed of surrounding
/// whitespace; an empty value is an error.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// A file that must be a regular file owned by root with mode 0600 or 0400.
    File(PathBuf),
    /// An environment variable of the gateway process.
    Env(String),
    /// A command run (without a shell) at load and on every reload; its stdout is the value.
    Command(CommandSource),
}

impl Default for CredentialEntry {
    fn default() -> Self {
        CredentialEntry {
            identity: String::new(),
            host: String::new(),
            source: None,
            inject: Injection::default(),
            refresh_before: DEFAULT_REFRESH_BEFORE,
            revoke: None,
        }
    }
}

/// A command whose standard output is a credential.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandSource {
    /// Program and arguments; the program is an absolute path.
    pub argv: Vec<String>,
    /// How long the command may run before it is killed and the load fails.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// What its standard output is.
    pub output: CommandOutput,
}

impl Default for CommandSource {
    fn default() -> Self {
        Self { argv: Vec::new(), timeout: Duration::from_secs(10), output: CommandOutput::Text }
    }
}

/// The form of a credential command's output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandOutput {
    /// The credential itself.
    #[default]
    Text,
    /// A JSON object: `credential` and when it expires, `expires_at`
    /// (RFC 3339) or `expires_in` (seconds from now), and optionally a
    /// `lease_id` handed to the revoke command. The gateway reads it again
    /// `refresh_before` the expiry and never sends it after.
    Json,
}

/// How a credential is written into a request. Templates may contain
/// `{credential}` (the value from `source`) and `{jwt}` (a token minted for the
/// job's identity with the destination host as audience).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Injection {
    /// `Authorization: Bearer <template>`.
    Bearer(String),
    /// `Authorization: Basic base64(<template>:)`: the key as user name and an
    /// empty password, as Cursor's APIs expect.
    BasicUser(String),
    /// `Authorization: Basic base64(<user>:<password>)`.
    Basic {
        /// User name template.
        user: String,
        /// Password template.
        password: String,
    },
    /// A header of its own, e.g. `x-api-key: {credential}`.
    Header {
        /// Header name.
        name: String,
        /// Header value template.
        value: String,
    },
    /// A query parameter, e.g. `key={credential}` (percent-encoded).
    Query {
        /// Parameter name.
        name: String,
        /// Parameter value template.
        value: String,
    },
    /// A PostgreSQL login: the gateway authenticates upstream with this
    /// password (and user, when set) instead of the job's.
    Postgres {
        /// User name template; the client's own user when absent.
        #[serde(default)]
        user: Option<String>,
        /// Password template.
        password: String,
    },
}

impl Default for Injection {
    fn default() -> Self {
        Injection::Bearer("{credential}".into())
    }
}

/// The placeholders a template may use.
pub(crate) const PLACEHOLDER_CREDENTIAL: &str = "{credential}";
/// A token minted for the identity, audience = destination host.
pub(crate) const PLACEHOLDER_JWT: &str = "{jwt}";

impl Injection {
    /// The templates, for validation and rendering.
    pub(crate) fn templates(&self) -> Vec<&str> {
        match self {
            Injection::Bearer(t) | Injection::BasicUser(t) => vec![t],
            Injection::Basic { user, password } => vec![user, password],
            Injection::Header { value, .. } | Injection::Query { value, .. } => vec![value],
            Injection::Postgres { user, password } => {
                user.iter().map(String::as_str).chain([password.as_str()]).collect()
            }
        }
    }

    /// Whether rendering needs the credential from `source`.
    pub fn uses_credential(&self) -> bool {
        self.templates().iter().any(|t| t.contains(PLACEHOLDER_CREDENTIAL))
    }

    /// Whether rendering needs a minted JWT.
    pub fn uses_jwt(&self) -> bool {
        self.templates().iter().any(|t| t.contains(PLACEHOLDER_JWT))
    }
}

/// Signature algorithm of minted tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum JwtAlgorithm {
    /// ECDSA P-256 with SHA-256: the most widely supported by verifiers.
    #[default]
    #[serde(rename = "ES256")]
    Es256,
    /// Ed25519.
    #[serde(rename = "EdDSA")]
    EdDsa,
}

impl JwtAlgorithm {
    /// The `alg` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::Es256 => "ES256",
            JwtAlgorithm::EdDsa => "EdDSA",
        }
    }
}

/// Minting of short-lived tokens.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtConfig {
    /// `iss` of minted tokens: the gateway's issuer URL or ID. Required when
    /// any template uses `{jwt}`.
    pub issuer: String,
    /// Lifetime of a token.
    #[serde(with = "humantime_serde")]
    pub lifetime: Duration,
    /// Signature algorithm of new keys.
    pub algorithm: JwtAlgorithm,
    /// Where signing keys are kept; `state_dir/jwt` when absent.
    pub key_dir: Option<PathBuf>,
    /// Age after which the current signing key is replaced.
    #[serde(with = "humantime_serde")]
    pub rotate_every: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            lifetime: Duration::from_secs(15 * 60),
            algorithm: JwtAlgorithm::Es256,
            key_dir: None,
            rotate_every: Duration::from_secs(24 * 3600),
        }
    }
}

impl JwtConfig {
    /// The key directory for a given state directory.
    pub fn key_dir(&self, state_dir: &std::path::Path) -> PathBuf {
        self.key_dir.clone().unwrap_or_else(|| state_dir.join("jwt"))
    }
}

/// An OIDC issuer whose ID tokens jobs may present.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OidcProvider {
    /// Expected `iss`, compared exactly.
    pub issuer: String,
    /// Accepted `aud` values; a token must name at least one.
    pub audiences: Vec<String>,
    /// URL of the issuer's JWKS: https, or http to a loopback address.
    pub jwks_url: Option<String>,
    /// A file holding the issuer's JWKS, instead of `jwks_url`.
    pub jwks_file: Option<PathBuf>,
    /// Clock skew tolerated on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// How often the JWKS is fetched again even if no unknown key id shows up.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// Accepted signature algorithms (`none` and HMAC are never accepted).
    pub algorithms: Vec<String>,
    /// Verified attributes: attribute name -> claim name, e.g. `repository: repository`.
    pub claims: BTreeMap<String, String>,
}

impl Default for OidcProvider {
    fn default() -> Self {
        Self {
            issuer: String::new(),
            audiences: Vec::new(),
            jwks_url: None,
            jwks_file: None,
            leeway: Duration::from_secs(60),
            refresh: Duration::from_secs(3600),
            algorithms: vec!["RS256".into(), "ES256".into()],
            claims: BTreeMap::new(),
        }
    }
}

/// Asymmetric algorithms a JWKS can back; HMAC is excluded because a public
/// JWKS must never be usable as a shared secret (algorithm confusion).
pub(crate) const SUPPORTED_OIDC_ALGORITHMS: &[&str] =
    &["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"];

/// Longer than this and an expired token stays usable for too long.
const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// Tokens live minutes; longer-lived tokens are what this feature replaces.
const MAX_JWT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

impl CredentialsConfig {
    /// Checks what the schema cannot express; the error is `(field, reason)`
    /// with the field's dotted path below the configuration root (this section
    /// is `credentials`).
    pub fn validate(&self) -> Result<(), (String, String)> {
        if http::HeaderName::from_bytes(self.oidc_header.as_bytes()).is_err() {
            return Err(("credentials.oidc_header".into(), format!("`{}` is not a header name", self.oidc_header)));
        }
        let mut needs_jwt = false;
        for (i, entry) in self.credentials.iter().enumerate() {
            let at = |f: &str| format!("credentials.credentials[{i}].{f}");
            glob::validate(&entry.identity).map_err(|r| (at("identity"), r))?;
            glob::validate(&entry.host).map_err(|r| (at("host"), r))?;
            validate_injection(&entry.inject).map_err(|(f, r)| (at(&format!("inject.{f}")), r))?;
            needs_jwt |= entry.inject.uses_jwt();
            match (&entry.source, entry.inject.uses_credential()) {
                (None, true) => {
                    return Err((at("source"), "`inject` uses {credential} but no `source` is given".into()))
                }
                (Some(_), false) => {
                    return Err((at("source"), "`inject` never uses {credential}, so `source` would be unused".into()))
                }
                _ => {}
            }
            match &entry.source {
                Some(Source::File(path)) if !path.is_absolute() => {
                    return Err((at("source.file"), format!("`{}` must be an absolute path", path.display())))
                }
                Some(Source::Env(name)) if name.is_empty() || name.contains('=') || name.contains('\0') => {
                    return Err((at("source.env"), format!("`{name}` is not an environment variable name")))
                }
                Some(Source::Command(cmd)) => {
                    validate_argv(&cmd.argv).map_err(|r| (at("source.command.argv"), r))?;
                    if cmd.timeout.is_zero() || cmd.timeout > Duration::from_secs(300) {
                        return Err((at("source.command.timeout"), "must be between 1ms and 5m".into()));
                    }
                    if entry.refresh_before < Duration::from_secs(1) {
                        return Err((at("refresh_before"), "must be at least 1s".into()));
                    }
                }
                _ => {}
            }
            if let Some(revoke) = &entry.revoke {
                if !matches!(entry.source, Some(Source::Command(_))) {
                    return Err((
                        at("revoke"),
                        "a per-session credential needs a `command` source that issues one value per session".into(),
                    ));
                }
                validate_argv(&revoke.argv).map_err(|r| (at("revoke.argv"), r))?;
                if revoke.timeout.is_zero() || revoke.timeout > Duration::from_secs(300) {
                    return Err((at("revoke.timeout"), "must be between 1ms and 5m".into()));
                }
            }
        }
        self.jwt.validate(needs_jwt)?;
        for (i, provider) in self.oidc.iter().enumerate() {
            provider.validate().map_err(|(f, r)| (format!("credentials.oidc[{i}].{f}"), r))?;
            if self.oidc[..i].iter().any(|p| p.issuer == provider.issuer) {
                return Err((
                    format!("credentials.oidc[{i}].issuer"),
                    format!("`{}` is listed twice", provider.issuer),
                ));
            }
        }
        Ok(())
    }
}

impl JwtConfig {
    fn validate(&self, needed: bool) -> Result<(), (String, String)> {
        if needed && self.issuer.trim().is_empty() {
            return Err(("credentials.jwt.issuer".into(), "required because a template uses {jwt}".into()));
        }
        if self.lifetime < Duration::from_secs(60) || self.lifetime > MAX_JWT_LIFETIME {
            return Err(("credentials.jwt.lifetime".into(), "must be between 1m and 24h".into()));
        }
        if self.rotate_every < Duration::from_secs(60) {
            return Err(("credentials.jwt.rotate_every".into(), "must be at least 1m".into()));
        }
        if let Some(dir) = &self.key_dir {
            if !dir.is_absolute() {
                return Err((
                    "credentials.jwt.key_dir".into(),
                    format!("`{}` must be an absolute path", dir.display()),
                ));
            }
        }
        Ok(())
    }
}

impl OidcProvider {
    /// Checks one provider; the field in the error is relative to the provider.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.issuer.is_empty() {
            return Err(("issuer".into(), "required".into()));
        }
        if self.audiences.is_empty() || self.audiences.iter().any(String::is_empty) {
            return Err(("audiences".into(), "at least one non-empty audience is required".into()));
        }
        match (&self.jwks_url, &self.jwks_file) {
            (Some(url), None) => validate_jwks_url(url).map_err(|r| ("jwks_url".to_string(), r))?,
            (None, Some(path)) if !path.is_absolute() => {
                return Err(("jwks_file".into(), format!("`{}` must be an absolute path", path.display())))
            }
            (None, Some(_)) => {}
            _ => return Err(("jwks_url".into(), "exactly one of `jwks_url` and `jwks_file` is required".into())),
        }
        if self.leeway > MAX_LEEWAY {
            return Err(("leeway".into(), "must be at most 5m".into()));
        }
        if self.refresh < Duration::from_secs(1) {
            return Err(("refresh".into(), "must be at least 1s".into()));
        }
        if self.algorithms.is_empty() {
            return Err(("algorithms".into(), "at least one algorithm is required".into()));
        }
        for (i, alg) in self.algorithms.iter().enumerate() {
            if !SUPPORTED_OIDC_ALGORITHMS.contains(&alg.as_str()) {
                return Err((
                    format!("algorithms[{i}]"),
                    format!("`{alg}` is not accepted; use one of {}", SUPPORTED_OIDC_ALGORITHMS.join(", ")),
                ));
            }
        }
        for (attr, claim) in &self.claims {
            if attr.is_empty() || claim.is_empty() {
                return Err(("claims".into(), "attribute and claim names must not be empty".into()));
            }
        }
        Ok(())
    }
}

/// A credential command's program: present, and an absolute path (no PATH
/// lookup, so the environment cannot choose what runs).
fn validate_argv(argv: &[String]) -> Result<(), String> {
    match argv.first() {
        None => Err("empty command".into()),
        Some(p) if !p.starts_with('/') => {
            Err(format!("`{p}` must be an absolute path (no PATH lookup for credential commands)"))
        }
        Some(_) => Ok(()),
    }
}

/// Where `url` is acceptable as a JWKS location: https anywhere, plain http
/// only to loopback (a JWKS fetched in clear could be swapped by anyone on path).
pub(crate) fn validate_jwks_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("`{url}` has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if is_loopback(host) => Ok(()),
        Some("http") => Err(format!("`{url}`: plain http is only allowed to loopback addresses")),
        _ => Err(format!("`{url}` must be an https URL")),
    }
}

pub(crate) fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn validate_injection(inject: &Injection) -> Result<(), (String, String)> {
    let (field, name) = match inject {
        Injection::Bearer(_) => ("bearer", None),
        Injection::BasicUser(_) => ("basic_user", None),
        Injection::Basic { .. } => ("basic", None),
        Injection::Header { name, .. } => ("header", Some(name)),
        Injection::Query { name, .. } => ("query", Some(name)),
        Injection::Postgres { .. } => ("postgres", None),
    };
    if let Some(name) = name {
        if name.is_empty() {
            return Err((format!("{field}.name"), "empty name".into()));
        }
        if matches!(inject, Injection::Header { .. }) && http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err((format!("{field}.name"), format!("`{name}` is not a header name")));
        }
    }
    for template in inject.templates() {
        validate_template(template).map_err(|r| (field.to_string(), r))?;
    }
    if !inject.uses_credential() && !inject.uses_jwt() {
        return Err((field.into(), "the template uses neither {credential} nor {jwt}".into()));
    }
    Ok(())
}

/// Only the two placeholders exist; anything else in braces is most likely a
/// typo that would otherwise send a literal `{credentail}` upstream.
fn validate_template(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let tail = &rest[start..];
        if let Some(after) = tail.strip_prefix(PLACEHOLDER_CREDENTIAL) {
            rest = after;
        } else if let Some(after) = tail.strip_prefix(PLACEHOLDER_JWT) {
            rest = after;
        } else {
            return Err(format!("`{template}`: only {{credential}} and {{jwt}} may appear in braces"));
        }
    }
    if template.contains(['\r', '\n', '\0']) {
        return Err("templates must not contain line breaks or NUL".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> CredentialsConfig {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = CredentialsConfig::default();
        c.validate().unwrap();
        assert_eq!(c.jwt.lifetime, Duration::from_secs(900));
        assert_eq!(c.jwt.algorithm, JwtAlgorithm::Es256);
        assert_eq!(parse("{}"), c);
    }

    #[test]
    fn full_example_parses_and_validates() {
        let c = parse(
            r#"
credentials:
  - identity: "spiffe://ci.example/repo/acme/*"
    host: api.openai.com
    source: { file: /etc/ci-gateway/creds/openai }
  - identity: "**"
    host: "*.cursor.sh"
    source: { env: CURSOR_KEY }
    inject: { basic_user: "{credential}" }
  - identity: "spiffe://ci.example/**"
    host: api.anthropic.com
    source: { command: { argv: [/usr/local/bin/vault-get, anthropic], timeout: 5s } }
    inject: { header: { name: x-api-key, value: "{credential}" } }
  - identity: "spiffe://ci.example/**"
    host: internal.example
    inject: { bearer: "{jwt}" }
jwt:
  issuer: https://gateway.ci.example
  lifetime: 10m
  algorithm: EdDSA
  rotate_every: 12h
oidc:
  - issuer: https://token.actions.githubusercontent.com
    audiences: [ci-gateway]
    jwks_url: https://token.actions.githubusercontent.com/.well-known/jwks
    claims: { repository: repository, ref: ref, run_id: run_id }
"#,
        );
        c.validate().unwrap();
        assert_eq!(c.credentials[1].inject, Injection::BasicUser("{credential}".into()));
        assert_eq!(c.jwt.algorithm, JwtAlgorithm::EdDsa);
        assert_eq!(c.oidc[0].leeway, Duration::from_secs(60));
    }

    #[test]
    fn unknown_fields_are_errors() {
        assert!(serde_yaml_ng::from_str::<CredentialsConfig>("jwt: { isuer: x }").is_err());
        assert!(serde_yaml_ng::from_str::<CredentialsConfig>(
            "credentials: [{identity: a, host: b, source: {file: /x}, inject: {bearer: '{credential}', extra: 1}}]"
        )
        .is_err());
    }

    #[test]
    fn validate_names_field_and_reason() {
        let cases = [
            (
                "credentials: [{identity: a, host: b, inject: {bearer: '{credential}'}}]",
                "credentials.credentials[0].source",
            ),
            ("credentials: [{identity: a, host: b, source: {file: rel}}]", "credentials.credentials[0].source.file"),
            (
                "credentials: [{identity: a, host: b, source: {env: X}, inject: {bearer: '{credentail}'}}]",
                "credentials.credentials[0].inject.bearer",
            ),
            ("credentials: [{identity: a, host: '', source: {env: X}}]", "credentials.credentials[0].host"),
            (
                "credentials: [{identity: a, host: b, source: {command: {argv: [vault]}}}]",
                "credentials.credentials[0].source.command.argv",
            ),
            (
                "credentials: [{identity: a, host: b, source: {env: X}, revoke: {argv: [/bin/revoke]}}]",
                "credentials.credentials[0].revoke",
            ),
            (
                "credentials: [{identity: a, host: b, source: {command: {argv: [/bin/issue]}}, revoke: {argv: [revoke]}}]",
                "credentials.credentials[0].revoke.argv",
            ),
            (
                "credentials: [{identity: a, host: b, source: {command: {argv: [/bin/issue]}}, revoke: {argv: [/bin/r], timeout: 0s}}]",
                "credentials.credentials[0].revoke.timeout",
            ),
            ("credentials: [{identity: a, host: b, inject: {bearer: '{jwt}'}}]", "credentials.jwt.issuer"),
            ("jwt: { lifetime: 30s }", "credentials.jwt.lifetime"),
            (
                "oidc: [{issuer: x, audiences: [a], jwks_url: 'http://issuer.example/jwks'}]",
                "credentials.oidc[0].jwks_url",
            ),
            ("oidc: [{issuer: x, audiences: [a]}]", "credentials.oidc[0].jwks_url"),
            ("oidc: [{issuer: x, audiences: [], jwks_file: /j}]", "credentials.oidc[0].audiences"),
            (
                "oidc: [{issuer: x, audiences: [a], jwks_file: /j, algorithms: [none]}]",
                "credentials.oidc[0].algorithms[0]",
            ),
            (
                "oidc: [{issuer: x, audiences: [a], jwks_file: /j, algorithms: [HS256]}]",
                "credentials.oidc[0].algorithms[0]",
            ),
        ];
        for (yaml, field) in cases {
            let (f, reason) = parse(yaml).validate().unwrap_err();
            assert_eq!(f, field, "{yaml}: {reason}");
            assert!(!reason.is_empty());
        }
        parse("credentials: [{identity: a, host: b, source: {command: {argv: [/bin/issue], output: json}}, revoke: {argv: [/bin/revoke]}}]")
            .validate()
            .unwrap();
        parse("oidc: [{issuer: x, audiences: [a], jwks_url: 'http://127.0.0.1:8080/jwks'}]").validate().unwrap();
        parse("oidc: [{issuer: x, audiences: [a], jwks_url: 'http://[::1]:8080/jwks'}]").validate().unwrap();
    }
}
