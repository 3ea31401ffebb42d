//! The policy in force, shared by every connection, and its hot reload.
//!
//! Readers take the current policy with one atomic load ([`arc_swap`]); a
//! reload compiles the new file completely before swapping it in, so a
//! request is always judged by one whole policy, and a broken file never
//! replaces a working one.
//!
//! The watcher polls: every interval it reads the file and compares its
//! SHA-256 with the last version seen. Polling catches every way files get
//! replaced (in-place writes, editors' rename-over, Kubernetes ConfigMap
//! symlink swaps) without inotify's per-inode bookkeeping, and unlike
//! mtime+size it cannot miss a same-size rewrite within one timestamp tick.
//! Reading and hashing a policy file once a second costs microseconds.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::compiled::{digest, Policy};
use super::error::PolicyError;
use super::{PolicyConfig, PolicyContext};

/// Errors logged one by one per failed reload; the rest are counted.
const LOGGED_ERRORS: usize = 20;

/// A cheap-to-clone handle on the policy in force.
#[derive(Debug, Clone)]
pub struct PolicyHandle {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    file: Option<PathBuf>,
    context: PolicyContext,
    current: ArcSwap<Policy>,
    generation: AtomicU64,
    /// Serialises reloads so an older file never overwrites a newer one.
    reloading: Mutex<()>,
}

/// What a successful [`PolicyHandle::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// No policy file is configured: the built-in policy stays.
    NoFile,
    /// The file has not changed since it was last loaded.
    Unchanged {
        /// Digest of the policy in force.
        digest: String,
    },
    /// A new policy is in force.
    Replaced {
        /// Digest of the policy replaced.
        previous: String,
        /// Digest of the new policy.
        digest: String,
        /// Its number of rules.
        rules: usize,
    },
}

impl PolicyHandle {
    /// A handle on `policy`, reloadable from `file` when given.
    pub fn new(policy: Policy, file: Option<PathBuf>) -> PolicyHandle {
        PolicyHandle::with_context(policy, file, PolicyContext::default())
    }

    /// A handle on `policy`, reloadable from `file` when given, every
    /// reload checked against `context`.
    pub fn with_context(policy: Policy, file: Option<PathBuf>, context: PolicyContext) -> PolicyHandle {
        PolicyHandle {
            inner: Arc::new(Inner {
                file,
                context,
                current: ArcSwap::from_pointee(policy),
                generation: AtomicU64::new(0),
                reloading: Mutex::new(()),
            }),
        }
    }

    /// A handle on the built-in policy.
    pub fn builtin() -> PolicyHandle {
        PolicyHandle::new(Policy::builtin(), None)
    }

    /// Loads the configured policy (or the built-in one). A broken file is
    /// an error here: the gateway should not start with a policy other
    /// than the one configured.
    pub fn load(config: &PolicyConfig) -> Result<PolicyHandle, Vec<PolicyError>> {
        PolicyHandle::load_in(config, PolicyContext::default())
    }

    /// [`PolicyHandle::load`], checking the file (now and at every reload)
    /// against `context`.
    pub fn load_in(config: &PolicyConfig, context: PolicyContext) -> Result<PolicyHandle, Vec<PolicyError>> {
        let Some(file) = &config.file else {
            let handle = PolicyHandle::builtin();
            tracing::info!(
                target: "gateway::policy",
                digest = handle.current().short_digest(),
                errors = 0,
                "no policy file configured: the built-in policy (allow everything) is in force"
            );
            return Ok(handle);
        };
        let policy = Policy::load_in(file, &context)?;
        tracing::info!(
            target: "gateway::policy",
            file = %file.display(),
            digest = policy.short_digest(),
            rules = policy.len(),
            warnings = policy.warnings().len(),
            errors = 0,
            "policy loaded"
        );
        log_warnings(&policy);
        Ok(PolicyHandle::with_context(policy, Some(file.clone()), context))
    }

    /// The policy in force. Hold it for one connection or request, not
    /// longer: a reload does not wait for holders.
    pub fn current(&self) -> Arc<Policy> {
        self.inner.current.load_full()
    }

    /// The policy file, if one is configured.
    pub fn file(&self) -> Option<&Path> {
        self.inner.file.as_deref()
    }

    /// How many times a reload replaced the policy.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Relaxed)
    }

    /// Re-reads the policy file and, when it changed and is valid, puts it
    /// in force. On errors the previous policy stays in force and the
    /// errors are returned (and logged). Compiles synchronously: call it
    /// from a blocking context (`spawn_blocking`) in async code.
    pub fn reload(&self) -> Result<ReloadOutcome, Vec<PolicyError>> {
        let Some(file) = self.file() else { return Ok(ReloadOutcome::NoFile) };
        match std::fs::read(file) {
            Ok(bytes) => self.reload_bytes(file, &bytes),
            Err(e) => {
                let errors = vec![PolicyError::file(file.to_owned(), format!("reading the policy file: {e}"))];
                self.log_failure(file, None, &errors);
                Err(errors)
            }
        }
    }

    fn reload_bytes(&self, file: &Path, bytes: &[u8]) -> Result<ReloadOutcome, Vec<PolicyError>> {
        let _serial = self.inner.reloading.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let new_digest = digest(bytes);
        let previous = self.current();
        if previous.digest() == new_digest {
            tracing::info!(
                target: "gateway::policy",
                file = %file.display(),
                digest = previous.short_digest(),
                errors = 0,
                "policy unchanged"
            );
            return Ok(ReloadOutcome::Unchanged { digest: new_digest });
        }
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                let errors = vec![PolicyError::file(file.to_owned(), format!("the policy file is not UTF-8: {e}"))];
                self.log_failure(file, Some(&new_digest), &errors);
                return Err(errors);
            }
        };
        match Policy::parse_in(file, text, &self.inner.context) {
            Ok(policy) => {
                let rules = policy.len();
                tracing::info!(
                    target: "gateway::policy",
                    file = %file.display(),
                    digest = policy.short_digest(),
                    previous = previous.short_digest(),
                    rules,
                    warnings = policy.warnings().len(),
                    errors = 0,
                    "policy reloaded"
                );
                log_warnings(&policy);
                self.inner.current.store(Arc::new(policy));
                self.inner.generation.fetch_add(1, Ordering::Relaxed);
                Ok(ReloadOutcome::Replaced { previous: previous.digest().to_owned(), digest: new_digest, rules })
            }
            Err(errors) => {
                self.log_failure(file, Some(&new_digest), &errors);
                Err(errors)
            }
        }
    }

    fn log_failure(&self, file: &Path, rejected: Option<&str>, errors: &[PolicyError]) {
        let current = self.current();
        tracing::warn!(
            target: "gateway::policy",
            file = %file.display(),
            rejected = rejected.map_or("-", |d| d.get(..12).unwrap_or(d)),
            digest = current.short_digest(),
            errors = errors.len(),
            "policy reload failed; the previous policy stays in force"
        );
        for e in errors.iter().take(LOGGED_ERRORS) {
            tracing::warn!(target: "gateway::policy", "{e}");
        }
    }
}

fn log_warnings(policy: &Policy) {
    for w in policy.warnings() {
        tracing::warn!(target: "gateway::policy", "warning: {w}");
    }
}

/// Reloads `handle` whenever its file's content changes, checking every
/// `interval`, until `cancel` fires. Returns at once when no file is
/// configured.
pub async fn watch(handle: PolicyHandle, interval: Duration, cancel: CancellationToken) {
    let Some(file) = handle.file().map(Path::to_path_buf) else { return };
    let mut seen = handle.current().digest().to_owned();
    let mut read_error: Option<String> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let bytes = match tokio::fs::read(&file).await {
            Ok(b) => b,
            Err(e) => {
                // Once per distinct problem, not once per tick.
                let message = e.to_string();
                if read_error.as_deref() != Some(message.as_str()) {
                    tracing::warn!(
                        target: "gateway::policy",
                        file = %file.display(),
                        digest = handle.current().short_digest(),
                        errors = 1,
                        "cannot read the policy file ({message}); the previous policy stays in force"
                    );
                    read_error = Some(message);
                }
                continue;
            }
        };
        read_error = None;
        let d = digest(&bytes);
        if d == seen {
            continue;
        }
        seen = d;
        let h = handle.clone();
        let path = file.clone();
        // Compiling a large policy takes milliseconds: off the runtime.
        let outcome = tokio::task::spawn_blocking(move || h.reload_bytes(&path, &bytes)).await;
        if let Err(e) = outcome {
            tracing::error!(target: "gateway::policy", file = %file.display(), "policy reload task failed: {e}");
        }
    }
}
