//! The fleet: every gateway ships what it records to one central PostgreSQL
//! store (see `docs/fleet.md`).
//!
//! The local SQLite stores stay the first write (a host never loses a
//! record because the central store is down). An outbox ([`outbox`]) reads
//! what was committed locally after a per-stream high-water mark kept in
//! `state_dir/fleet.db` and ships it in batches, one PostgreSQL transaction
//! each, keyed by (host id, local id) so that shipping twice changes
//! nothing: at-least-once, idempotent, in order per session, resumable
//! after a crash. [`approvals`] lets a request held on one host be decided
//! from any host through the store. [`central`] connects (rustls, verify-full) and migrates the
//! central schema; [`verify`] checks the shipped hash chains there;
//! [`read`] lists the fleet's sessions and findings for reviewers.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

pub mod approvals;
pub mod central;
pub mod outbox;
pub mod prune;
pub mod read;
pub mod verify;

pub use central::{connect, fingerprint_keys, migrate, schema_version, SCHEMA_VERSION};
pub use outbox::{backlog, Backlog, Shipper, Stream};

/// File name of the shipping cursors (high-water marks) inside `state_dir`.
pub const CURSOR_FILE: &str = "fleet.db";

/// tracing target of fleet events (store reachable or not, backlog alarm,
/// unknown schema).
pub const FLEET_TARGET: &str = "gateway::fleet";

/// `fleet:` in the configuration file: the central store and shipping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// The central store: a libpq-style connection string (`host=db
    /// port=5432 dbname=ci_gateway user=gateway`) or URL
    /// (`postgres://gateway@db/ci_gateway`), without a password. `None`
    /// (the default) turns shipping off.
    pub store: Option<String>,
    /// Where the gateway's own password for the store is read from (a
    /// credential source: `file`, `env` or `command`), at every connection.
    /// Never from a job.
    // YAML maps (`file: /path`) rather than YAML tags, as in `credentials`.
    #[serde(with = "serde_yaml_ng::with::singleton_map")]
    pub password: Option<crate::credentials::Source>,
    /// TLS towards the store.
    pub tls: FleetTls,
    /// This host's id in the central store; `None` is the host name.
    pub host_id: Option<String>,
    /// A backlog (rows recorded locally, not yet shipped) above this raises
    /// an alarm event (`fleet_backlog`), and another when it drains below.
    pub backlog_alarm: u64,
    /// Rows per shipped batch (one PostgreSQL transaction).
    pub batch_size: usize,
    /// How often the outbox looks for new rows when it has caught up.
    #[serde(with = "humantime_serde")]
    pub ship_interval: Duration,
    /// Ended sessions shipped this long ago are deleted locally (their
    /// central copy stays); `None` leaves local retention to
    /// `record.retention`. Unshipped sessions are never deleted for this.
    #[serde(with = "humantime_serde")]
    pub shipped_retention: Option<Duration>,
    /// Apply approval decisions taken on other hosts (through the central
    /// store) to requests held here. On by default when `store` is set;
    /// off, requests held here are decided on this host only.
    pub central_approvals: bool,
    /// How often the central decisions for this host are read even without
    /// a notification (the fallback when a notification is lost).
    #[serde(with = "humantime_serde")]
    pub approval_poll: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            store: None,
            password: None,
            tls: FleetTls::default(),
            host_id: None,
            backlog_alarm: 10_000,
            batch_size: 500,
            ship_interval: Duration::from_secs(1),
            shipped_retention: None,
            central_approvals: true,
            approval_poll: Duration::from_secs(2),
        }
    }
}

/// `fleet.tls`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct FleetTls {
    /// `verify_full` (the default): TLS required, the server's certificate
    /// verified against `ca_file` (or the system roots) and its name
    /// against the connection string's host. `disable`: no TLS, for a unix
    /// socket on the same host only.
    pub mode: TlsMode,
    /// PEM file of the CA(s) that issued the store's certificate; `None`
    /// trusts the system roots.
    pub ca_file: Option<PathBuf>,
}

/// How the gateway talks TLS to the central store.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// TLS with the certificate and host name verified (libpq's `verify-full`).
    #[default]
    VerifyFull,
    /// No TLS: only for a unix-socket connection string.
    Disable,
}

/// Most characters in a host id.
const MAX_HOST_ID: usize = 255;

impl FleetConfig {
    /// Whether shipping is configured.
    pub fn enabled(&self) -> bool {
        self.store.is_some()
    }

    /// This host's id: `host_id`, else the host name.
    pub fn host_id(&self) -> Result<String, FleetError> {
        if let Some(id) = &self.host_id {
            return Ok(id.clone());
        }
        // The UTS namespace's name, as uname(2) and hostname(1) give it.
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_err(|e| FleetError::HostId(format!("/proc/sys/kernel/hostname: {e}")))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(FleetError::HostId("the host name is empty".into()));
        }
        Ok(name.to_owned())
    }

    /// Checks what the schema cannot express; errors are (dotted field,
    /// reason) like `Config::validate`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |field: &str, reason: String| Err((format!("fleet.{field}"), reason));
        if let Some(store) = &self.store {
            let parsed: tokio_postgres::Config = match store.parse() {
                Ok(c) => c,
                // The parser's message never quotes the string (it may hold a password).
                Err(e) => return err("store", format!("not a PostgreSQL connection string: {e}")),
            };
            if parsed.get_password().is_some() {
                return err(
                    "store",
                    "must not contain a password: give it as a credential source in fleet.password".into(),
                );
            }
            if parsed.get_hosts().is_empty() {
                return err("store", "names no host".into());
            }
            let unix = parsed.get_hosts().iter().all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
            if self.tls.mode == TlsMode::Disable && !unix {
                return err(
                    "tls.mode",
                    "`disable` is only for unix-socket connection strings: the store is reached over the network"
                        .into(),
                );
            }
        }
        if let Some(id) = &self.host_id {
            if id.is_empty() || id.len() > MAX_HOST_ID || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return err("host_id", format!("must be 1 to {MAX_HOST_ID} characters without spaces"));
            }
        }
        if let Some(ca) = &self.tls.ca_file {
            if !ca.is_absolute() {
                return err("tls.ca_file", "must be an absolute path".into());
            }
        }
        if self.backlog_alarm == 0 {
            return err("backlog_alarm", "must be at least 1".into());
        }
        if !(1..=10_000).contains(&self.batch_size) {
            return err("batch_size", "must be between 1 and 10000".into());
        }
        if self.ship_interval < Duration::from_millis(10) || self.ship_interval > Duration::from_secs(3600) {
            return err("ship_interval", "must be between 10ms and 1h".into());
        }
        if self.approval_poll < Duration::from_millis(100) || self.approval_poll > Duration::from_secs(60) {
            return err("approval_poll", "must be between 100ms and 1m".into());
        }
        if self.shipped_retention.is_some_and(|d| d.is_zero()) {
            return err("shipped_retention", "must be positive (omit it to keep record.retention)".into());
        }
        Ok(())
    }

    /// Where the shipping cursors live.
    pub fn cursor_path(&self, state_dir: &std::path::Path) -> PathBuf {
        state_dir.join(CURSOR_FILE)
    }
}

/// What can go wrong between the gateway and the central store.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// `fleet.store` is not set (and no `--store` was given).
    #[error("no central store configured (fleet.store, or --store)")]
    NotConfigured,
    /// The host id could not be determined.
    #[error("cannot determine the host id (set fleet.host_id): {0}")]
    HostId(String),
    /// The connection string does not parse.
    #[error("the central store's connection string is invalid: {0}")]
    BadUrl(String),
    /// The gateway's password could not be read from its source.
    #[error("cannot read the central store password (fleet.password): {0}")]
    Password(String),
    /// The TLS settings cannot be used.
    #[error("central store TLS: {0}")]
    Tls(String),
    /// PostgreSQL said no, or the connection failed.
    #[error("central store: {doing}: {}", pg_message(source))]
    Postgres {
        /// What the gateway was doing.
        doing: &'static str,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The connection to the store closed (the server went away).
    #[error("central store: the connection closed while {0}")]
    Closed(&'static str),
    /// The central schema is newer than this gateway knows.
    #[error("the central store has schema version {found}; this gateway knows up to {known}: upgrade the gateway (it ships nothing until then)")]
    SchemaTooNew {
        /// The store's version.
        found: i32,
        /// The newest this build knows.
        known: i32,
    },
    /// The central schema is missing or older than this gateway needs.
    #[error("the central store has schema version {found}; this gateway needs {known}: run `gateway store migrate`")]
    SchemaTooOld {
        /// The store's version (0: never migrated).
        found: i32,
        /// The version this build ships against.
        known: i32,
    },
    /// A local SQLite store could not be read or the cursor written.
    #[error("{path}: {doing}: {source}")]
    Local {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        doing: &'static str,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The local cursor database cannot be opened.
    #[error("{path}: cannot open the fleet cursor database: {reason}")]
    Cursor {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The driver's error with what the server said: its `Display` alone is
/// only "db error" for a server-side error.
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

impl FleetError {
    /// Shorthand for [`FleetError::Postgres`].
    pub(crate) fn pg(doing: &'static str) -> impl FnOnce(tokio_postgres::Error) -> FleetError {
        move |source| FleetError::Postgres { doing, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<FleetConfig, String> {
        let c: FleetConfig = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        c.validate().map_err(|(f, r)| format!("{f}: {r}"))?;
        Ok(c)
    }

    #[test]
    fn defaults_are_off_and_valid() {
        let c = FleetConfig::default();
        assert!(!c.enabled());
        assert_eq!(c.validate(), Ok(()));
        assert!(c.host_id().is_ok_and(|h| !h.is_empty()), "the host name is the default host id");
    }

    #[test]
    fn store_settings_are_checked() {
        let c = parse("store: host=db.example port=5432 dbname=ci user=gw\npassword: {file: /etc/ci-gateway/db}\ntls: {ca_file: /etc/ci-gateway/db-ca.pem}\nhost_id: runner-7\n").unwrap();
        assert!(c.enabled());
        assert_eq!(c.host_id().unwrap(), "runner-7");
        assert_eq!(c.tls.mode, TlsMode::VerifyFull);
        parse("store: postgres://gw@db.example/ci\n").unwrap();
        let e = parse("store: postgres://gw:hunter2@db.example/ci\n").unwrap_err();
        assert!(e.contains("fleet.store: must not contain a password") && !e.contains("hunter2"), "{e}");
        let e = parse("store: host=db.example\ntls: {mode: disable}\n").unwrap_err();
        assert!(e.contains("fleet.tls.mode"), "{e}");
        parse("store: host=/var/run/postgresql dbname=ci\ntls: {mode: disable}\n").unwrap();
        assert!(parse("store: \"host=db port=notaport\"\n").unwrap_err().contains("fleet.store"));
        assert!(parse("host_id: \"a b\"\n").unwrap_err().contains("fleet.host_id"));
        assert!(parse("batch_size: 0\n").unwrap_err().contains("fleet.batch_size"));
        assert!(parse("tls: {ca_file: relative.pem}\n").unwrap_err().contains("fleet.tls.ca_file"));
        assert!(parse("shipped_retention: 0s\n").unwrap_err().contains("fleet.shipped_retention"));
        assert!(parse("stor: x\n").unwrap_err().contains("unknown field"));
    }
}
