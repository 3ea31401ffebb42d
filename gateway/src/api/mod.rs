//! The gateway's HTTP APIs.
//!
//! Four listeners, three audiences:
//! - [`serve`]: read-only and public, on a loopback TCP address: what
//!   internal backends need to verify the gateway's tokens (the JWKS
//!   document and OIDC discovery), a health check and the Prometheus
//!   metrics (`/metrics`, [`crate::metrics`]).
//! - [`JwksServer`] (optional, `api.jwks`): the JWKS and discovery alone,
//!   on any address, over TLS off loopback, for backends on other hosts.
//! - [`serve_admin`]: privileged, on a unix socket, where the kernel tells
//!   who is calling (peer credentials): approval decisions
//!   (`docs/approvals.md`). [`AdminClient`] is its client, used by the CLI.
//! - [`serve_review`]: the reviewers' findings API, on a unix socket of its
//!   own whose group is the reviewers' (`docs/findings.md`).

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

mod admin;
mod client;
mod jwks;
mod public;
mod review;

pub use admin::{bind_admin, serve_admin, AdminListener, IdentityLookup};
pub use client::{AdminClient, ClientError};
pub use jwks::{JwksError, JwksListenerConfig, JwksServer};
pub use public::{serve, DISCOVERY_PATH, JWKS_PATH};
pub use review::{serve_review, ReviewDesk};

/// Where the admin socket lives when `api.admin_socket` is not set.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/ci-gateway/admin.sock";

/// `api:` in the configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address of the public API; `null` disables it.
    pub listen: Option<SocketAddr>,
    /// Unix socket of the admin API; `null` disables it (and with it every
    /// way to decide approvals).
    pub admin_socket: Option<PathBuf>,
    /// Unix group given access to the admin socket (mode 0660); without
    /// it only root can connect.
    pub admin_group: Option<String>,
    /// A listener of its own for the JWKS and discovery, reachable by
    /// backends on other hosts; `null` (the default) serves them only on
    /// `listen`.
    pub jwks: Option<JwksListenerConfig>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 15080))),
            admin_socket: Some(PathBuf::from(DEFAULT_ADMIN_SOCKET)),
            admin_group: None,
            jwks: None,
        }
    }
}

impl ApiConfig {
    /// Checks what the schema cannot express; errors are (dotted field,
    /// reason) like `Config::validate`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if let Some(socket) = &self.admin_socket {
            admin::check_socket_path(socket).map_err(|reason| ("api.admin_socket".to_owned(), reason))?;
        }
        if let Some(group) = &self.admin_group {
            if group.is_empty() || group.contains(|c: char| c.is_whitespace() || c == ':' || c == '/') {
                return Err(("api.admin_group".into(), format!("`{group}` is not a unix group name")));
            }
        }
        Ok(())
    }
}

/// Why an API listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket path is not usable.
    #[error("{path}: admin socket: {reason}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Another process already serves this socket.
    #[error("{path}: another process (another gateway?) is already serving the admin socket")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
}

#[cfg(test)]
mod tests;
