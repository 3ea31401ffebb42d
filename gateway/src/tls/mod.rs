//! TLS interception (owned by the TLS work stream).

use serde::Deserialize;

/// TLS interception settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {}
pub mod cli;
