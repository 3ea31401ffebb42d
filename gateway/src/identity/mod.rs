//! Machine identity: pins each intercepted connection's process to an
//! operator-defined identity (a SPIFFE-style URI plus labels).
//!
//! Two steps, kept apart so the proxy can cache or log each:
//! [`Attestor::attest`] turns the eBPF [`gateway_common::ConnRecord`] plus
//! `/proc` into verified [`Attested`] attributes (or refuses: pid reuse, exited
//! process, uid mismatch), and [`IdentityResolver::resolve`] maps those
//! attributes through the operator's rule file ([`MappingFile`]) to an
//! [`Identity`]. See `docs/identity.md` for the file format and trust model.

mod attest;
mod cache;
mod container;
mod mapping;
mod matchset;
mod procfs;
mod resolver;
mod runtime;
mod template;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use attest::{
    record_for_live_pid, Ancestor, AttestError, AttestNeeds, Attestation, Attested, Attestor, ExeInfo, MAX_HASH_BYTES,
};
pub use cache::{AttestationCache, CacheStats, ProcessEpochs};
pub use container::{parse_container, ContainerRef, Runtime};
pub use mapping::{MappingError, MappingFile};
pub use resolver::{Explanation, Identity, IdentityResolver, RuleExplanation, RuleOutcome};
pub use runtime::{under_any, ContainerRuntimes, RuntimeContainer, RuntimeError, SocketListing};

/// Environment variables collected by default: CI systems' job coordinates.
/// Everything else in a job's environment may be a secret and is never kept.
pub const DEFAULT_ENV_ALLOWLIST: &[&str] = &[
    "GITHUB_REPOSITORY",
    "GITHUB_WORKFLOW",
    "GITHUB_RUN_ID",
    "GITHUB_REF",
    "GITHUB_ACTOR",
    "GITHUB_JOB",
    "CI_PROJECT_PATH",
    "CI_JOB_ID",
    "CI_PIPELINE_ID",
    "CI_COMMIT_REF_NAME",
    "BUILDKITE_PIPELINE_SLUG",
    "BUILDKITE_BUILD_NUMBER",
    "BUILDKITE_JOB_ID",
    "JENKINS_URL",
    "JOB_NAME",
    "BUILD_NUMBER",
    "CIRCLE_PROJECT_REPONAME",
    "CIRCLE_BUILD_NUM",
];

/// Path segment of the identity given to attested processes no rule matches:
/// `spiffe://<trust_domain>/unmapped`.
pub const UNMAPPED_SEGMENT: &str = "unmapped";
/// Path segment of the identity given when attestation failed:
/// `spiffe://<trust_domain>/unattested`.
pub const UNATTESTED_SEGMENT: &str = "unattested";

/// The `identity:` section of the gateway configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// Mapping file; `None` maps every attested process to `unmapped`.
    pub mappings: Option<PathBuf>,
    /// Environment variable names collected in addition to
    /// [`DEFAULT_ENV_ALLOWLIST`].
    pub env_allowlist: Vec<String>,
    /// How many ancestors (parent, grandparent, ...) to attest.
    pub parent_depth: usize,
    /// Trust domain of the built-in `unmapped`/`unattested` identities and
    /// of `{trust_domain}` in templates.
    pub trust_domain: String,
    /// Maximum number of executables whose SHA-256 is remembered.
    pub exe_hash_cache_size: usize,
    /// Keep each process's attestation while the kernel reports no exec or
    /// exit of it (or of the ancestors rules look at), so later connections
    /// of the same process skip /proc.
    pub attestation_cache: bool,
    /// Unix sockets of container runtimes speaking the Docker Engine API
    /// (dockerd, podman's compatibility socket), asked in order for the
    /// name and image of a container a connecting process runs in. Sockets
    /// that do not exist are skipped; empty: never ask.
    pub container_runtimes: Vec<PathBuf>,
    /// How long a connection waits for a runtime's answer before it is
    /// attributed without name and image (the answer is kept for the next).
    #[serde(with = "humantime_serde")]
    pub container_lookup_timeout: Duration,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            mappings: None,
            env_allowlist: Vec::new(),
            parent_depth: 4,
            trust_domain: "ci-gateway.local".to_owned(),
            exe_hash_cache_size: 4096,
            attestation_cache: true,
            container_runtimes: vec![PathBuf::from("/var/run/docker.sock")],
            container_lookup_timeout: Duration::from_millis(250),
        }
    }
}

impl IdentityConfig {
    /// The attestation part of this configuration.
    pub fn attest_config(&self) -> AttestConfig {
        AttestConfig {
            env_allowlist: self.env_allowlist.clone(),
            parent_depth: self.parent_depth,
            exe_hash_cache_size: self.exe_hash_cache_size,
        }
    }

    /// The container runtimes to ask about containers.
    pub fn container_runtimes(&self) -> ContainerRuntimes {
        ContainerRuntimes::new(self.container_runtimes.clone(), self.container_lookup_timeout)
    }

    /// Default plus operator environment names, sorted and deduplicated.
    pub fn effective_env_allowlist(&self) -> Vec<String> {
        effective_allowlist(&self.env_allowlist)
    }
}

/// What [`Attestor`] collects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttestConfig {
    /// Environment variable names collected in addition to
    /// [`DEFAULT_ENV_ALLOWLIST`].
    pub env_allowlist: Vec<String>,
    /// How many ancestors to attest (0: none).
    pub parent_depth: usize,
    /// Maximum number of executables whose SHA-256 is remembered.
    pub exe_hash_cache_size: usize,
}

impl Default for AttestConfig {
    fn default() -> Self {
        IdentityConfig::default().attest_config()
    }
}

fn effective_allowlist(extra: &[String]) -> Vec<String> {
    let mut all: Vec<String> = DEFAULT_ENV_ALLOWLIST.iter().map(|s| (*s).to_owned()).collect();
    all.extend(extra.iter().cloned());
    all.sort();
    all.dedup();
    all
}
