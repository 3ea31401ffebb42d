//! TLS interception: which connections are terminated, the gateway's CA, leaf
//! minting, ClientHello peeking and verified upstream connections.
//!
//! The proxy's flow for one redirected connection is:
//!
//! 1. [`hello::peek_client_hello`] looks at the first bytes *without consuming
//!    them*; plaintext goes to the HTTP layer as is.
//! 2. [`TlsConfig::action_for`] decides from the SNI: [`TlsAction::Passthrough`]
//!    splices the untouched bytes to the original destination;
//!    [`TlsAction::Intercept`] hands the same stream to `tokio_rustls` with the
//!    configuration from [`mint::LeafCache::server_config`].
//! 3. The upstream side is opened with [`upstream::UpstreamTls::connect`], which
//!    always verifies the real server: interception never weakens what the job
//!    would have checked itself.
//!
//! Operator documentation: `docs/tls.md`.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub mod ca;
pub mod hello;
pub mod mint;
#[cfg(test)]
mod test_support;
pub mod trust;
pub mod upstream;

pub use ca::CertificateAuthority;
pub use hello::{peek_client_hello, ClientHelloInfo, HelloError, Peeked};
pub use mint::LeafCache;
pub use upstream::UpstreamTls;

/// TLS interception settings (`tls:` in the configuration file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Host name patterns whose TLS is terminated: exact names (`cursor.sh`),
    /// `*.suffix` for any name below a suffix at any depth, or `*` for every
    /// name. Matching is case-insensitive and ignores a trailing dot.
    pub intercept: Vec<String>,
    /// Patterns that are never terminated, checked before `intercept` so an
    /// operator can carve out exceptions (pinned clients, client certificates).
    pub passthrough: Vec<String>,
    /// Whether a ClientHello without SNI is terminated (with a leaf for the
    /// destination IP). Off by default: without a name we cannot know whether
    /// the connection is one we were asked to look into.
    pub intercept_without_sni: bool,
    /// PEM files of additional CAs trusted when verifying upstream servers, on
    /// top of the system roots (a corporate proxy's CA, a private registry's).
    pub extra_upstream_cas: Vec<PathBuf>,
    /// Lifetime of minted leaf certificates.
    #[serde(with = "humantime_serde")]
    pub leaf_validity: Duration,
    /// How many minted leaves are kept in memory.
    pub leaf_cache_size: usize,
    /// Environment file written by `gateway trust install` for CI jobs.
    pub env_file: PathBuf,
    /// How long a new connection may take to send its ClientHello.
    #[serde(with = "humantime_serde")]
    pub client_hello_timeout: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            intercept: ["*.cursor.sh", "cursor.sh", "*.cursor.com", "cursor.com"]
                .into_iter()
                .map(String::from)
                .collect(),
            passthrough: Vec::new(),
            intercept_without_sni: false,
            extra_upstream_cas: Vec::new(),
            leaf_validity: Duration::from_secs(24 * 3600),
            leaf_cache_size: 1024,
            env_file: PathBuf::from("/etc/ci-gateway/ca.env"),
            client_hello_timeout: Duration::from_secs(10),
        }
    }
}

/// What the proxy does with one TLS connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsAction {
    /// Terminate with a minted leaf, inspect, and re-encrypt upstream.
    Intercept,
    /// Splice the original bytes to the destination untouched.
    Passthrough,
}

/// Leaves shorter than this would expire while cached connections still use them.
const MIN_LEAF_VALIDITY: Duration = Duration::from_secs(3600);
/// Browsers and some TLS stacks reject server certificates valid for longer.
const MAX_LEAF_VALIDITY: Duration = Duration::from_secs(397 * 24 * 3600);
/// Longer than this and a silent client pins a proxy task for no reason.
const MAX_HELLO_TIMEOUT: Duration = Duration::from_secs(300);

impl TlsConfig {
    /// Decides whether the connection with this SNI is terminated.
    ///
    /// `passthrough` wins over `intercept`; a name matching neither is passed
    /// through, so the default is never to touch traffic nobody asked about.
    pub fn action_for(&self, sni: Option<&str>) -> TlsAction {
        let Some(sni) = sni else {
            return if self.intercept_without_sni { TlsAction::Intercept } else { TlsAction::Passthrough };
        };
        if self.passthrough.iter().any(|p| pattern_matches(p, sni)) {
            return TlsAction::Passthrough;
        }
        if self.intercept.iter().any(|p| pattern_matches(p, sni)) {
            return TlsAction::Intercept;
        }
        TlsAction::Passthrough
    }

    /// Checks what the schema cannot express; the error is `(field, reason)`
    /// with the field's dotted path below the configuration root.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (list, patterns) in [("intercept", &self.intercept), ("passthrough", &self.passthrough)] {
            for (i, p) in patterns.iter().enumerate() {
                validate_pattern(p).map_err(|reason| (format!("tls.{list}[{i}]"), reason))?;
            }
        }
        for (i, path) in self.extra_upstream_cas.iter().enumerate() {
            if !path.is_absolute() {
                return Err((
                    format!("tls.extra_upstream_cas[{i}]"),
                    format!("`{}` must be an absolute path", path.display()),
                ));
            }
        }
        if self.leaf_validity < MIN_LEAF_VALIDITY || self.leaf_validity > MAX_LEAF_VALIDITY {
            return Err((
                "tls.leaf_validity".into(),
                "must be between 1h and 397days (longer leaves are rejected by some clients)".into(),
            ));
        }
        if self.leaf_cache_size == 0 {
            return Err(("tls.leaf_cache_size".into(), "must be at least 1".into()));
        }
        if !self.env_file.is_absolute() {
            return Err(("tls.env_file".into(), "must be an absolute path".into()));
        }
        if self.client_hello_timeout.is_zero() || self.client_hello_timeout > MAX_HELLO_TIMEOUT {
            return Err(("tls.client_hello_timeout".into(), "must be between 1ms and 5m".into()));
        }
        Ok(())
    }
}

/// Whether `name` matches `pattern`; both may carry a trailing dot and any case.
/// Byte-wise so no allocation happens on the per-connection path (the gate
/// matches protected names with it too).
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let pattern = pattern.strip_suffix('.').unwrap_or(pattern).as_bytes();
    let name = name.strip_suffix('.').unwrap_or(name).as_bytes();
    if name.is_empty() {
        return false;
    }
    if pattern == b"*" {
        return true;
    }
    if let Some(suffix) = pattern.strip_prefix(b"*") {
        // `suffix` keeps its leading dot, so `*.cursor.sh` never matches `evilcursor.sh`
        // and needs at least one label in front.
        return name.len() > suffix.len() && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix);
    }
    name.eq_ignore_ascii_case(pattern)
}

/// Explains why a host name pattern is unusable.
fn validate_pattern(pattern: &str) -> Result<(), String> {
    if pattern == "*" {
        return Ok(());
    }
    let body = pattern.strip_suffix('.').unwrap_or(pattern);
    let body = body.strip_prefix("*.").unwrap_or(body);
    if body.is_empty() {
        return Err(format!("`{pattern}` is not a host name pattern"));
    }
    if body.contains('*') {
        return Err(format!(
            "`{pattern}`: `*` is only allowed as a whole leading label, like `*.example.com`, or alone"
        ));
    }
    if body.len() > 253 {
        return Err(format!("`{pattern}` is longer than a host name can be (253 characters)"));
    }
    for label in body.split('.') {
        if label.is_empty() {
            return Err(format!("`{pattern}` has an empty label"));
        }
        if label.len() > 63 {
            return Err(format!("`{pattern}`: label `{label}` is longer than 63 characters"));
        }
        if let Some(c) = label.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_')) {
            return Err(format!(
                "`{pattern}`: `{c}` is not allowed in a host name (internationalised names must be written in their xn-- form)"
            ));
        }
    }
    Ok(())
}

/// Everything that can go wrong in the TLS module; messages name the file or
/// host involved and the reason.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file or directory operation failed.
    #[error("{}: cannot {op}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done (`read`, `create`, ...).
        op: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A CA file exists but its content is unusable.
    #[error("{}: unusable CA file: {reason}", path.display())]
    CaCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Only one of the CA key and certificate exists.
    #[error(
        "{} exists but {} is missing: restore it, or remove {} to create a new CA \
         (every host and image trusting the old CA must then trust the new one)",
        present.display(), missing.display(), present.display()
    )]
    CaIncomplete {
        /// The file that exists.
        present: PathBuf,
        /// The file that does not.
        missing: PathBuf,
    },
    /// Generating the CA failed.
    #[error("cannot generate the gateway CA: {0}")]
    CaGenerate(String),
    /// A leaf certificate could not be minted for this name.
    #[error("cannot mint a certificate for `{name}`: {reason}")]
    Mint {
        /// The SNI or address.
        name: String,
        /// Why.
        reason: String,
    },
    /// An extra upstream CA file could not be used.
    #[error("{}: unusable upstream CA file: {reason}", path.display())]
    UpstreamCaFile {
        /// The file from `tls.extra_upstream_cas`.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No root certificates at all: every upstream verification would fail.
    #[error(
        "no usable root certificates for verifying upstream servers \
         (the system store is empty or unreadable and tls.extra_upstream_cas adds none)"
    )]
    NoUpstreamRoots,
    /// The upstream name is neither a DNS name nor an IP address.
    #[error("`{server}` is not a valid server name for TLS")]
    InvalidServerName {
        /// The name given.
        server: String,
    },
    /// The upstream server's certificate did not verify.
    #[error("upstream {server}: certificate verification failed: {reason}")]
    UpstreamVerify {
        /// The server name that was verified.
        server: String,
        /// Why verification failed.
        reason: String,
    },
    /// The upstream TLS handshake failed for another reason.
    #[error("upstream {server}: TLS handshake failed: {reason}")]
    UpstreamHandshake {
        /// The server.
        server: String,
        /// Why.
        reason: String,
    },
    /// An external command (`update-ca-certificates`) is missing or failed.
    #[error("`{command}`: {reason}")]
    Command {
        /// The command line.
        command: String,
        /// What happened.
        reason: String,
    },
    /// No system CA bundle to base the jobs' bundle on.
    #[error(
        "no system CA bundle found (tried {tried}); without it the jobs' bundle would \
         trust only the gateway CA and break every other TLS connection"
    )]
    NoSystemBundle {
        /// The paths looked at.
        tried: String,
    },
    /// A path cannot be written into an environment file without quoting.
    #[error("{}: cannot be used in an environment file (contains whitespace, quotes, `$` or `\\`)", path.display())]
    UnsafeEnvPath {
        /// The path.
        path: PathBuf,
    },
}

impl TlsError {
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        Self::Io { path: path.to_owned(), op, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_intercepts_cursor_and_passes_everything_else() {
        let c = TlsConfig::default();
        for name in ["api2.cursor.sh", "cursor.sh", "a.b.cursor.sh", "API.Cursor.COM", "cursor.com.", "x.cursor.sh."] {
            assert_eq!(c.action_for(Some(name)), TlsAction::Intercept, "{name}");
        }
        for name in ["evilcursor.sh", "cursor.sh.evil.com", "github.com", "sh", "", ".", "cursor.shx"] {
            assert_eq!(c.action_for(Some(name)), TlsAction::Passthrough, "{name}");
        }
        assert_eq!(c.action_for(None), TlsAction::Passthrough);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn passthrough_wins_and_no_sni_is_configurable() {
        let c = TlsConfig {
            intercept: vec!["*".into()],
            passthrough: vec!["*.Pinned.example.".into(), "exact.example".into()],
            intercept_without_sni: true,
            ..TlsConfig::default()
        };
        assert_eq!(c.action_for(Some("a.pinned.example")), TlsAction::Passthrough);
        assert_eq!(c.action_for(Some("EXACT.example")), TlsAction::Passthrough);
        assert_eq!(c.action_for(Some("pinned.example")), TlsAction::Intercept);
        assert_eq!(c.action_for(Some("sub.exact.example")), TlsAction::Intercept);
        assert_eq!(c.action_for(None), TlsAction::Intercept);
    }

    #[test]
    fn validate_names_field_and_reason() {
        let bad =
            |p: &str| TlsConfig { intercept: vec!["ok.example".into(), p.into()], ..TlsConfig::default() }.validate();
        for p in ["", "*.", "api*.cursor.sh", "*.*.x", "a..b", "spa ce.com", "ü.com", "x.*.com"] {
            let (field, reason) = bad(p).expect_err(p);
            assert_eq!(field, "tls.intercept[1]", "{p}");
            assert!(reason.contains(&format!("`{p}`")), "{p}: {reason}");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(bad(&long).expect_err("long").1.contains("63"));
        let c = TlsConfig { passthrough: vec!["a/b".into()], ..TlsConfig::default() };
        assert_eq!(c.validate().expect_err("slash").0, "tls.passthrough[0]");
        let c = TlsConfig { leaf_validity: Duration::from_secs(60), ..TlsConfig::default() };
        assert_eq!(c.validate().expect_err("validity").0, "tls.leaf_validity");
        let c = TlsConfig { leaf_cache_size: 0, ..TlsConfig::default() };
        assert_eq!(c.validate().expect_err("cache").0, "tls.leaf_cache_size");
        let c = TlsConfig { extra_upstream_cas: vec!["rel.pem".into()], ..TlsConfig::default() };
        assert_eq!(c.validate().expect_err("rel").0, "tls.extra_upstream_cas[0]");
    }

    #[test]
    fn deserializes_humantime_and_rejects_unknown_fields() {
        let c: TlsConfig = serde_yaml_ng::from_str(
            "intercept: ['*.example.com']\nleaf_validity: 12h\nclient_hello_timeout: 2s\nleaf_cache_size: 5\n",
        )
        .expect("parse");
        assert_eq!(c.intercept, vec!["*.example.com".to_owned()]);
        assert_eq!(c.leaf_validity, Duration::from_secs(12 * 3600));
        assert_eq!(c.client_hello_timeout, Duration::from_secs(2));
        assert_eq!(c.leaf_cache_size, 5);
        assert_eq!(c.env_file, PathBuf::from("/etc/ci-gateway/ca.env"));
        assert!(serde_yaml_ng::from_str::<TlsConfig>("intercpt: []\n").is_err());
    }
}
