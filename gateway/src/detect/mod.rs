//! Static-key detection with Hyperscan (owned by the detect work stream).

use serde::Deserialize;

/// Detector settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectConfig {}
pub mod cli;
