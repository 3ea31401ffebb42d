//! The review console: a web interface served by the gateway daemon on its
//! own listener (`console:`, off by default) for findings, allowlists,
//! approvals and recorded sessions (`docs/console.md`).
//!
//! Sign-in is OpenID Connect (authorization code with PKCE, nonce and
//! state; the ID token verified against the provider's keys found by
//! discovery) through the `openidconnect` crate; roles come from the
//! provider's groups claim. Sessions live in memory on the server behind a
//! random cookie; every POST carries the session's CSRF token. Pages are
//! rendered on the server with maud (escaped by default) and served with a
//! strict Content-Security-Policy; the only script is one embedded file.
//!
//! The console holds no decision logic of its own: findings decisions go
//! through [`crate::api::ReviewDesk`] (as the review socket's do), approval
//! decisions through [`crate::approval::Approvals::decide`] (the same rules:
//! approver groups, N distinct approvers, no self-approval), session replay
//! and verification through the session store and the CLI's replay. With
//! a fleet store configured, the fleet pages read every host's findings,
//! sessions and approval requests there and decide approvals through it
//! (`fleet::approvals::decide`, as `gateway approvals approve --store`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

mod auth;
mod fleet;
mod pages;
mod routes;
mod serve;
mod session;

pub use routes::CSP;
pub use serve::{serve_console, ConsoleServices, FleetDesk};
pub use session::Role;

/// `console:` in the configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Listen address; `null` (the default) disables the console. Any
    /// address, but TLS (`tls_cert`, `tls_key`) is required unless it is a
    /// loopback address.
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain the console presents.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// The organisation's identity provider.
    pub oidc: Option<OidcConfig>,
    /// How long a sign-in lasts.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            listen: None,
            tls_cert: None,
            tls_key: None,
            oidc: None,
            session_ttl: Duration::from_secs(8 * 3600),
        }
    }
}

/// `console.oidc`: the OpenID Connect client the console is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// Issuer URL; discovery reads `<issuer>/.well-known/openid-configuration`.
    /// `https`, or `http` on a loopback address only.
    pub issuer: String,
    /// The console's client id at the provider.
    pub client_id: String,
    /// File holding the client secret (never inline in the configuration);
    /// absent for a public client (PKCE only).
    pub client_secret_file: Option<PathBuf>,
    /// Where the provider sends the browser back: the console's own URL
    /// ending in the callback path, e.g. `https://runner-1.example.com:9443/auth/callback`.
    pub redirect_url: String,
    /// Name of the ID token claim listing the user's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Provider group -> console role; a user gets the highest role of
    /// their groups, and cannot sign in with none.
    pub roles: std::collections::BTreeMap<String, Role>,
    /// PEM CA bundle to trust for the provider in addition to the public
    /// roots (an internal identity provider).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_groups_claim() -> String {
    "groups".into()
}

/// Path the provider redirects back to when `redirect_url` has none.
pub const CALLBACK_PATH: &str = "/auth/callback";

impl ConsoleConfig {
    /// Checks what the schema cannot express; errors are (dotted field,
    /// reason) like `Config::validate`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let Some(listen) = self.listen else {
            return Ok(());
        };
        let err = |field: &str, reason: String| Err((format!("console.{field}"), reason));
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return err("tls_key", "required with tls_cert".into()),
            (None, Some(_)) => return err("tls_cert", "required with tls_key".into()),
            (None, None) if !listen.ip().is_loopback() => {
                return err(
                    "listen",
                    format!("{listen} is not a loopback address: the console needs tls_cert and tls_key there"),
                )
            }
            _ => {}
        }
        for (field, path) in [("tls_cert", &self.tls_cert), ("tls_key", &self.tls_key)] {
            if let Some(path) = path {
                if !path.is_absolute() {
                    return err(field, format!("`{}` must be an absolute path", path.display()));
                }
            }
        }
        if self.session_ttl < Duration::from_secs(60) || self.session_ttl > Duration::from_secs(7 * 24 * 3600) {
            return err("session_ttl", "must be between 1m and 7d".into());
        }
        let Some(oidc) = &self.oidc else {
            return err("oidc", "required when console.listen is set: the console only has OIDC sign-in".into());
        };
        let issuer = url_of(&oidc.issuer).map_err(|r| ("console.oidc.issuer".to_owned(), r))?;
        if issuer.scheme() != "https" && !(issuer.scheme() == "http" && is_loopback_url(&issuer)) {
            return err("oidc.issuer", "must be https (http only on a loopback address)".into());
        }
        let redirect = url_of(&oidc.redirect_url).map_err(|r| ("console.oidc.redirect_url".to_owned(), r))?;
        let tls = self.tls_cert.is_some();
        if redirect.scheme() != if tls { "https" } else { "http" } {
            return err(
                "oidc.redirect_url",
                format!(
                    "must be {}: the console serves {}",
                    if tls { "https" } else { "http" },
                    if tls { "TLS" } else { "plain HTTP on loopback" }
                ),
            );
        }
        if redirect.path().len() <= 1 {
            return err("oidc.redirect_url", format!("must name the callback path, e.g. {CALLBACK_PATH}"));
        }
        if oidc.client_id.trim().is_empty() {
            return err("oidc.client_id", "must not be empty".into());
        }
        if let Some(path) = &oidc.client_secret_file {
            if !path.is_absolute() {
                return err("oidc.client_secret_file", format!("`{}` must be an absolute path", path.display()));
            }
        }
        if oidc.groups_claim.trim().is_empty() {
            return err("oidc.groups_claim", "must not be empty".into());
        }
        if oidc.roles.is_empty() {
            return err("oidc.roles", "map at least one provider group to a role, or nobody can sign in".into());
        }
        Ok(())
    }
}

fn url_of(text: &str) -> Result<openidconnect::url::Url, String> {
    openidconnect::url::Url::parse(text).map_err(|e| format!("`{text}` is not a URL: {e}"))
}

fn is_loopback_url(url: &openidconnect::url::Url) -> bool {
    match url.host() {
        Some(openidconnect::url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(openidconnect::url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(openidconnect::url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// Reads a secret file, trimming the trailing newline editors add.
fn read_secret(path: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim_end_matches(['\n', '\r']).to_owned())
}

#[cfg(test)]
mod tests;
