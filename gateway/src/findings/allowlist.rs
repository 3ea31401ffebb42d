//! Waivers: what stops a known key from being blocked.
//!
//! Two reviewer decisions waive blocking: marking a finding a false positive
//! (its key is not a credential: waived everywhere, for good, until the
//! finding is reopened) and an allowlist entry (`gateway findings allow`:
//! accepted risk for the key in a scope -- everywhere, one destination or
//! one identity -- until an expiry). Both are durable in the findings
//! database; the gate consults [`Waivers`], an in-memory snapshot of them
//! swapped whole when they change, so deciding a request never touches
//! SQLite. Expiry is checked against the clock at decision time, so an
//! entry stops waiving the instant it expires, whether or not the snapshot
//! was refreshed since.

use std::{collections::HashMap, sync::Arc};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize, Serializer};
use time::OffsetDateTime;

use super::FindingId;

/// Identifier of an allowlist entry, shown and accepted as `A-<n>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowId(pub i64);

impl std::fmt::Display for AllowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "A-{}", self.0)
    }
}

impl std::str::FromStr for AllowId {
    type Err = String;

    /// Accepts `A-3`, `a-3` and `3`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix("A-").or_else(|| s.strip_prefix("a-")).unwrap_or(s);
        match digits.parse::<i64>() {
            Ok(n) if n > 0 && digits.bytes().all(|b| b.is_ascii_digit()) => Ok(AllowId(n)),
            _ => Err(format!("`{s}` is not an allowlist entry id (A-<number>)")),
        }
    }
}

impl Serialize for AllowId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for AllowId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Where an allowlist entry waives blocking.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every destination and identity.
    Everywhere,
    /// Requests to this host (lower case, no root dot).
    Destination(String),
    /// Requests by this workload identity.
    Identity(String),
}

impl Scope {
    /// The stored kind name.
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::Everywhere => "everywhere",
            Scope::Destination(_) => "destination",
            Scope::Identity(_) => "identity",
        }
    }

    /// The host or identity, `None` for everywhere.
    pub fn value(&self) -> Option<&str> {
        match self {
            Scope::Everywhere => None,
            Scope::Destination(v) | Scope::Identity(v) => Some(v),
        }
    }

    /// Rebuilds a scope from its stored columns.
    pub fn from_parts(kind: &str, value: Option<String>) -> Result<Scope, String> {
        match (kind, value) {
            ("everywhere", None) => Ok(Scope::Everywhere),
            ("destination", Some(v)) => Ok(Scope::Destination(v)),
            ("identity", Some(v)) => Ok(Scope::Identity(v)),
            (kind, value) => Err(format!("scope `{kind}` with value {value:?}")),
        }
    }

    fn covers(&self, host: &str, identity: Option<&str>) -> bool {
        match self {
            Scope::Everywhere => true,
            Scope::Destination(h) => *h == normalize_host(host),
            Scope::Identity(i) => identity == Some(i.as_str()),
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Everywhere => f.write_str("everywhere"),
            Scope::Destination(h) => write!(f, "destination={h}"),
            Scope::Identity(i) => write!(f, "identity={i}"),
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    /// `everywhere`, `destination=<host>` or `identity=<identity>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not a scope (everywhere, destination=<host>, identity=<identity>)");
        if s == "everywhere" {
            return Ok(Scope::Everywhere);
        }
        let (kind, value) = s.split_once('=').ok_or_else(bad)?;
        let value = value.trim();
        if value.is_empty() {
            return Err(bad());
        }
        match kind {
            "destination" | "host" => {
                if value.contains(|c: char| c.is_whitespace() || c == '/' || c == '*') {
                    return Err(format!("`{value}` is not a host name (no scheme, path or glob)"));
                }
                Ok(Scope::Destination(normalize_host(value)))
            }
            "identity" => Ok(Scope::Identity(value.to_owned())),
            _ => Err(bad()),
        }
    }
}

impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A stored allowlist entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowEntry {
    /// Id.
    pub id: AllowId,
    /// The finding it was made for.
    pub finding: FindingId,
    /// The key it waives.
    pub fingerprint: String,
    /// Where.
    pub scope: Scope,
    /// Until when; `None` until revoked.
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// Why the risk is accepted.
    pub reason: String,
    /// Who decided (the kernel-vouched user when made through the admin socket).
    pub created_by: String,
    /// When.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// Who revoked it, if anyone.
    pub revoked_by: Option<String>,
    /// When it was revoked.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

impl AllowEntry {
    /// Whether it waives blocking at `now`.
    pub fn active(&self, now: OffsetDateTime) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }
}

/// One waiver of a key, as the gate checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Waiver {
    /// What a sighting names as the reason it passed: `A-3` or `F-2 (false positive)`.
    by: String,
    scope: Scope,
    expires_at: Option<OffsetDateTime>,
}

/// The waivers in force, by fingerprint: an immutable snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Waivers {
    by_fingerprint: HashMap<String, Vec<Waiver>>,
}

impl Waivers {
    /// Adds the waiver of an allowlist entry (inactive ones are ignored).
    pub fn add_entry(&mut self, entry: &AllowEntry, now: OffsetDateTime) {
        if entry.active(now) {
            self.by_fingerprint.entry(entry.fingerprint.clone()).or_default().push(Waiver {
                by: entry.id.to_string(),
                scope: entry.scope.clone(),
                expires_at: entry.expires_at,
            });
        }
    }

    /// Adds the waiver of a false-positive finding: everywhere, no expiry.
    pub fn add_false_positive(&mut self, finding: FindingId, fingerprint: &str) {
        self.by_fingerprint.entry(fingerprint.to_owned()).or_default().push(Waiver {
            by: format!("{finding} (false positive)"),
            scope: Scope::Everywhere,
            expires_at: None,
        });
    }

    /// What waives blocking key `fingerprint` sent to `host` by `identity`
    /// at `now`, if anything.
    pub fn waiver(&self, fingerprint: &str, host: &str, identity: Option<&str>, now: OffsetDateTime) -> Option<&str> {
        self.by_fingerprint
            .get(fingerprint)?
            .iter()
            .find(|w| w.expires_at.is_none_or(|e| now < e) && w.scope.covers(host, identity))
            .map(|w| w.by.as_str())
    }

    /// Number of waived keys.
    pub fn len(&self) -> usize {
        self.by_fingerprint.len()
    }

    /// Whether nothing is waived.
    pub fn is_empty(&self) -> bool {
        self.by_fingerprint.is_empty()
    }
}

/// The gate's view of the waivers: a snapshot swapped whole when they
/// change; cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct WaiverSet(Arc<ArcSwap<Waivers>>);

impl WaiverSet {
    /// The snapshot in force.
    pub fn current(&self) -> Arc<Waivers> {
        self.0.load_full()
    }

    /// Replaces the snapshot; returns whether it changed.
    pub fn replace(&self, waivers: Waivers) -> bool {
        if *self.0.load_full() == waivers {
            return false;
        }
        self.0.store(Arc::new(waivers));
        true
    }
}

/// How often the gateway re-reads the waivers, so decisions made by a
/// reviewer's CLI straight on the database (not through the admin socket,
/// which refreshes at once) take effect.
pub const REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Loads the waivers from `store` into `set` now, then every
/// [`REFRESH_INTERVAL`] on a thread of its own (SQLite blocks; the gate
/// never waits for it). The thread lives as long as the process.
pub fn start_refresher(store: super::FindingStore, set: WaiverSet) -> Result<(), super::FindingsError> {
    set.replace(store.waivers(OffsetDateTime::now_utc())?);
    let path = store.path().to_owned();
    std::thread::Builder::new()
        .name("findings-waivers".into())
        .spawn(move || loop {
            std::thread::sleep(REFRESH_INTERVAL);
            match store.waivers(OffsetDateTime::now_utc()) {
                Ok(waivers) => {
                    let keys = waivers.len();
                    if set.replace(waivers) {
                        tracing::info!(keys, "findings waivers (false positives, allowlist) reloaded");
                    }
                }
                // The previous snapshot stays: a waiver is only ever a
                // reviewer's relaxation, and expiry is checked per request.
                Err(e) => {
                    tracing::error!(error = %e, "reloading the findings waivers failed; keeping the previous ones")
                }
            }
        })
        .map(drop)
        .map_err(|e| super::FindingsError::Open { path, reason: format!("cannot start the waiver thread: {e}") })
}

fn normalize_host(host: &str) -> String {
    host.trim().trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::{macros::datetime, Duration};

    const T0: OffsetDateTime = datetime!(2026-01-01 12:00 UTC);

    fn entry(id: i64, scope: Scope, expires_at: Option<OffsetDateTime>) -> AllowEntry {
        AllowEntry {
            id: AllowId(id),
            finding: FindingId(1),
            fingerprint: "fp".into(),
            scope,
            expires_at,
            reason: "test fixture".into(),
            created_by: "alice".into(),
            created_at: T0,
            revoked_by: None,
            revoked_at: None,
        }
    }

    #[test]
    fn scopes_parse_and_print() {
        assert_eq!("everywhere".parse::<Scope>(), Ok(Scope::Everywhere));
        assert_eq!("destination=API.Example.com.".parse::<Scope>(), Ok(Scope::Destination("api.example.com".into())));
        assert_eq!("identity=spiffe://ci/p".parse::<Scope>(), Ok(Scope::Identity("spiffe://ci/p".into())));
        for bad in ["", "destination=", "destination=https://a/b", "destination=*.a", "project=x", "anywhere"] {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
        assert_eq!(Scope::Destination("a.com".into()).to_string(), "destination=a.com");
        assert_eq!("A-3".parse::<AllowId>(), Ok(AllowId(3)));
        assert!("F-3".parse::<AllowId>().is_err());
    }

    #[test]
    fn waivers_respect_scope_expiry_and_revocation() {
        let mut w = Waivers::default();
        w.add_entry(&entry(1, Scope::Destination("a.com".into()), Some(T0 + Duration::minutes(5))), T0);
        w.add_entry(&entry(2, Scope::Identity("id-b".into()), None), T0);
        let mut revoked = entry(3, Scope::Everywhere, None);
        revoked.revoked_at = Some(T0);
        w.add_entry(&revoked, T0);
        w.add_entry(&entry(4, Scope::Everywhere, Some(T0)), T0);

        assert_eq!(w.waiver("fp", "A.com.", None, T0), Some("A-1"));
        assert_eq!(w.waiver("fp", "a.com", None, T0 + Duration::minutes(5)), None, "expired");
        assert_eq!(w.waiver("fp", "b.com", Some("id-b"), T0 + Duration::days(9)), Some("A-2"));
        assert_eq!(w.waiver("fp", "b.com", Some("id-c"), T0), None);
        assert_eq!(w.waiver("other", "a.com", Some("id-b"), T0), None);

        w.add_false_positive(FindingId(7), "fp2");
        assert_eq!(w.waiver("fp2", "any", None, T0), Some("F-7 (false positive)"));

        let set = WaiverSet::default();
        assert!(set.replace(w.clone()));
        assert!(!set.replace(w));
        assert_eq!(set.current().len(), 2);
    }
}
