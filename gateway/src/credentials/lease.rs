//! Per-session credentials: issued when a session first needs one, revoked
//! when it ends.
//!
//! A credential entry with `revoke` is not a shared value: each session (an
//! intercepted connection) runs the entry's `command` source for a value of
//! its own, the first time a request or login of that session needs it, and
//! keeps it for the session's later requests. When the session ends (its
//! [`SessionLeases`] is dropped, however the connection ended) every value
//! it was issued is handed to the entry's revoke command. A value that
//! expires within the session is replaced by a new one and the old one is
//! revoked at once. So a credential lives no longer than the job's
//! connection that used it, which is what a dynamic secret (a Vault lease, a
//! database user made for one job) is for.
//!
//! Revocation runs on threads of its own, with retries; the daemon waits for
//! what is still running at shutdown ([`wait_for_revocations`]).

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde_json::json;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use super::{
    secret::SecretString,
    store::{run_command, SessionIssue},
};

/// Attempts of a revoke command before the failure is left to the operator.
const REVOKE_ATTEMPTS: u32 = 3;
/// Pause after the first failed attempt, doubled after each.
const REVOKE_BACKOFF: Duration = Duration::from_millis(500);

/// Revocations started and not yet finished, across the process.
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// Who a session's credentials were issued to, for the revoke command.
#[derive(Debug, Clone)]
pub struct LeaseHolder {
    /// The job's identity URI.
    pub identity: String,
    /// The destination host the credential was issued for.
    pub destination: String,
}

/// One issued value.
struct Lease {
    issue: Arc<SessionIssue>,
    value: SecretString,
    expires_at: Option<SystemTime>,
    lease_id: Option<String>,
    holder: LeaseHolder,
}

/// The per-session credentials one session holds.
#[derive(Default)]
pub struct SessionLeases {
    // An async lock: concurrent requests of one session (HTTP/2 streams)
    // wait for the one issuance instead of each running the command.
    leases: Mutex<Vec<Lease>>,
}

impl std::fmt::Debug for SessionLeases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLeases").finish_non_exhaustive()
    }
}

impl SessionLeases {
    /// The session's value for `issue`'s entry: the one it already holds if
    /// that has not expired, else a new one from the source (the expired one
    /// is revoked now). Errors name the source, never the value.
    pub async fn credential(
        &self,
        issue: &Arc<SessionIssue>,
        holder: LeaseHolder,
    ) -> Result<(SecretString, Option<SystemTime>), String> {
        let mut leases = self.leases.lock().await;
        let now = SystemTime::now();
        if let Some(i) =
            leases.iter().position(|l| l.issue.entry == issue.entry && l.holder.destination == holder.destination)
        {
            if leases[i].expires_at.is_none_or(|at| at > now) {
                return Ok((leases[i].value.clone(), leases[i].expires_at));
            }
            let expired = leases.swap_remove(i);
            tracing::info!(credential_entry = issue.entry, "a per-session credential expired: issuing another");
            revoke_all(vec![expired]);
        }
        let source = issue.clone();
        let issued = tokio::task::spawn_blocking(move || source.issue())
            .await
            .map_err(|e| format!("the credential command's task failed: {e}"))??;
        tracing::info!(
            credential_entry = issue.entry,
            identity = holder.identity,
            destination = holder.destination,
            "issued a per-session credential"
        );
        let out = (issued.value.clone(), issued.expires_at);
        leases.push(Lease {
            issue: issue.clone(),
            value: issued.value,
            expires_at: issued.expires_at,
            lease_id: issued.lease_id,
            holder,
        });
        Ok(out)
    }
}

impl Drop for SessionLeases {
    fn drop(&mut self) {
        let leases = std::mem::take(self.leases.get_mut());
        revoke_all(leases);
    }
}

/// Starts revoking `leases` on a thread of their own.
fn revoke_all(leases: Vec<Lease>) {
    if leases.is_empty() {
        return;
    }
    PENDING.fetch_add(leases.len(), Ordering::SeqCst);
    let spawned = thread::Builder::new().name("credential-revoke".into()).spawn({
        let count = leases.len();
        move || {
            for lease in leases {
                revoke(&lease);
                PENDING.fetch_sub(1, Ordering::SeqCst);
            }
            tracing::debug!(count, "session credentials revoked");
        }
    });
    if let Err(e) = spawned {
        // No thread, no revocation: say so loudly, the value stays valid
        // until its own expiry.
        tracing::error!(error = %e, "cannot start revoking session credentials");
    }
}

/// Runs the revoke command for one lease, retrying with back-off.
fn revoke(lease: &Lease) {
    let input = json!({
        "credential": lease.value.expose(),
        "lease_id": lease.lease_id,
        "entry": lease.issue.entry,
        "identity": lease.holder.identity,
        "destination": lease.holder.destination,
    });
    let input = Zeroizing::new(input.to_string().into_bytes());
    let mut pause = REVOKE_BACKOFF;
    for attempt in 1..=REVOKE_ATTEMPTS {
        // The command's stderr ends up in the error: never let it echo the value.
        let result = run_command(&lease.issue.revoke.argv, lease.issue.revoke.timeout, Some(input.clone()))
            .map_err(|e| e.replace(lease.value.expose(), "[credential]"));
        match result {
            Ok(_) => {
                tracing::info!(
                    credential_entry = lease.issue.entry,
                    identity = lease.holder.identity,
                    destination = lease.holder.destination,
                    "revoked a per-session credential"
                );
                return;
            }
            Err(e) if attempt < REVOKE_ATTEMPTS => {
                tracing::warn!(credential_entry = lease.issue.entry, attempt, error = %e, "revoking a per-session credential failed; retrying");
                thread::sleep(pause);
                pause *= 2;
            }
            Err(e) => tracing::error!(
                credential_entry = lease.issue.entry,
                identity = lease.holder.identity,
                destination = lease.holder.destination,
                attempts = REVOKE_ATTEMPTS,
                error = %e,
                "revoking a per-session credential failed: it stays valid until its own expiry"
            ),
        }
    }
}

/// Waits up to `limit` for revocations still running (at shutdown, after
/// the connections closed); returns how many were left unfinished.
pub fn wait_for_revocations(limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let pending = PENDING.load(Ordering::SeqCst);
        if pending == 0 || Instant::now() >= deadline {
            return pending;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
