//! Console sign-ins kept on the server: a random session id in a cookie,
//! the user and role it stands for, and the session's CSRF token; plus the
//! short-lived state of sign-ins under way (PKCE verifier and nonce).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use openidconnect::{Nonce, PkceCodeVerifier};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};

/// A console role; each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads approvals and recorded sessions.
    Viewer,
    /// Also reads and works findings and the allowlist.
    Reviewer,
    /// Also approves or denies held requests (still subject to the
    /// approval rules: approver groups, no self-approval).
    Approver,
    /// Everything.
    Admin,
}

impl Role {
    /// The name shown and configured.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Reviewer => "reviewer",
            Role::Approver => "approver",
            Role::Admin => "admin",
        }
    }
}

/// A signed-in user, from a verified ID token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The name decisions are taken under: the e-mail address, else the
    /// preferred user name, else the subject.
    pub name: String,
    /// Every other name the provider gave (subject, preferred user name,
    /// e-mail local part): none may be behind a request the user approves.
    pub aliases: Vec<String>,
    /// Highest role of the user's groups.
    pub role: Role,
}

impl User {
    /// How the user's actions are audited: `oidc:<name>`.
    pub fn audit_name(&self) -> String {
        format!("oidc:{}", self.name)
    }
}

/// A signed-in session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who.
    pub user: User,
    /// The synchronizer token every POST of this session must carry.
    pub csrf: String,
    /// The console also shows the fleet's central store (`fleet.store`).
    pub fleet: bool,
    expires: Instant,
}

/// A sign-in under way, keyed by its `state`.
pub struct Pending {
    /// PKCE verifier of the authorization request.
    pub verifier: PkceCodeVerifier,
    /// Nonce the ID token must carry.
    pub nonce: Nonce,
    started: Instant,
}

/// Most sign-ins under way at once (each is a few hundred bytes; anyone can
/// start one, so they are bounded).
const MAX_PENDING: usize = 1024;
/// Most sessions at once.
const MAX_SESSIONS: usize = 4096;
/// How long a sign-in may take at the provider.
const PENDING_TTL: Duration = Duration::from_secs(600);

/// The server-side session table.
pub struct Sessions {
    ttl: Duration,
    fleet: bool,
    sessions: Mutex<HashMap<String, Session>>,
    pending: Mutex<HashMap<String, Pending>>,
}

/// 32 random bytes, hex: session ids and CSRF tokens.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Compares two tokens in time independent of where they differ.
pub fn same_token(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Sessions {
    /// An empty table whose sessions last `ttl`.
    pub fn new(ttl: Duration) -> Sessions {
        Sessions { ttl, fleet: false, sessions: Mutex::new(HashMap::new()), pending: Mutex::new(HashMap::new()) }
    }

    /// Sessions of a console that also shows the fleet's central store.
    pub fn showing_fleet(self, fleet: bool) -> Sessions {
        Sessions { fleet, ..self }
    }

    /// How long a session lasts.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Remembers a sign-in under way; `false` when too many are.
    pub fn start_sign_in(&self, state: String, verifier: PkceCodeVerifier, nonce: Nonce) -> bool {
        let Ok(mut pending) = self.pending.lock() else {
            return false;
        };
        let now = Instant::now();
        pending.retain(|_, p| now.duration_since(p.started) < PENDING_TTL);
        if pending.len() >= MAX_PENDING {
            return false;
        }
        pending.insert(state, Pending { verifier, nonce, started: now });
        true
    }

    /// Takes (once) the sign-in started with `state`.
    pub fn finish_sign_in(&self, state: &str) -> Option<Pending> {
        let mut pending = self.pending.lock().ok()?;
        pending.remove(state).filter(|p| p.started.elapsed() < PENDING_TTL)
    }

    /// Opens a session for `user`: its id (the cookie value); `None` when
    /// the table is full.
    pub fn open(&self, user: User) -> Option<String> {
        let mut sessions = self.sessions.lock().ok()?;
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            return None;
        }
        let id = random_token();
        sessions.insert(id.clone(), Session { user, csrf: random_token(), fleet: self.fleet, expires: now + self.ttl });
        Some(id)
    }

    /// The live session with id `id`.
    pub fn get(&self, id: &str) -> Option<Session> {
        let sessions = self.sessions.lock().ok()?;
        sessions.get(id).filter(|s| s.expires > Instant::now()).cloned()
    }

    /// Ends session `id`.
    pub fn close(&self, id: &str) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User { name: "alice@example.com".into(), aliases: vec![], role: Role::Viewer }
    }

    #[test]
    fn roles_are_ordered_and_sessions_expire_and_close() {
        assert!(Role::Viewer < Role::Reviewer && Role::Reviewer < Role::Approver && Role::Approver < Role::Admin);
        let sessions = Sessions::new(Duration::from_millis(50));
        let id = sessions.open(user()).unwrap();
        let s = sessions.get(&id).unwrap();
        assert_eq!(s.csrf.len(), 64);
        assert_ne!(s.csrf, id);
        assert!(sessions.get("nope").is_none());
        std::thread::sleep(Duration::from_millis(80));
        assert!(sessions.get(&id).is_none(), "expired");
        let id = Sessions::new(Duration::from_secs(60)).open(user()).unwrap();
        let table = Sessions::new(Duration::from_secs(60));
        let other = table.open(user()).unwrap();
        assert_ne!(id, other);
        table.close(&other);
        assert!(table.get(&other).is_none());
    }

    #[test]
    fn a_sign_in_state_is_taken_once() {
        let sessions = Sessions::new(Duration::from_secs(60));
        assert!(sessions.start_sign_in("s1".into(), PkceCodeVerifier::new("v".into()), Nonce::new("n".into())));
        assert!(sessions.finish_sign_in("s2").is_none());
        assert!(sessions.finish_sign_in("s1").is_some());
        assert!(sessions.finish_sign_in("s1").is_none(), "replayed state");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "ab"));
    }
}
