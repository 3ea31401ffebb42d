//! Findings store (owned by the findings work stream).

use serde::Deserialize;

/// Findings settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FindingsConfig {}
pub mod cli;
