//! The central store's connection and schema: connecting with the
//! gateway's own credential over verified TLS, the versioned migrations
//! (embedded SQL files, a `schema_version` table, each applied in its own
//! transaction), and the version check the shipper makes before it ships.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_postgres::{config::SslMode, AsyncMessage, Client, NoTls, Notification};

use super::{FleetConfig, FleetError, TlsMode, FLEET_TARGET};

/// The migrations, in order: entry `i` is version `i + 1`.
const MIGRATIONS: &[(&str, &str)] = &[
    ("initial schema", include_str!("sql/0001_initial.sql")),
    ("central approvals", include_str!("sql/0002_central_approvals.sql")),
    ("fingerprint key id per host", include_str!("sql/0003_fingerprint_key_id.sql")),
];

/// The central schema version this gateway ships against (and the newest it knows).
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Key of the advisory lock that serialises migrations (any constant the
/// store's other users do not take).
const MIGRATION_LOCK: i64 = 0x6369_6777_666c_7431; // "cigwflt1"

/// Connects to the central store: `url` (or `fleet.store`), the password
/// from `fleet.password` unless the connection string has one (only a
/// `--store` given on the command line may), TLS as `fleet.tls` says
/// (verify-full: required, never a silent fallback to plaintext). The
/// connection's driver runs on a task of the current runtime.
pub async fn connect(config: &FleetConfig, url: Option<&str>) -> Result<Client, FleetError> {
    connect_with(config, url, None).await
}

/// Like [`connect`], and forwards the connection's notifications (`LISTEN`)
/// to the returned channel, which closes when the connection does.
pub async fn connect_listening(
    config: &FleetConfig,
) -> Result<(Client, mpsc::UnboundedReceiver<Notification>), FleetError> {
    let (tx, rx) = mpsc::unbounded_channel();
    Ok((connect_with(config, None, Some(tx)).await?, rx))
}

async fn connect_with(
    config: &FleetConfig,
    url: Option<&str>,
    notifications: Option<mpsc::UnboundedSender<Notification>>,
) -> Result<Client, FleetError> {
    let url = url.or(config.store.as_deref()).ok_or(FleetError::NotConfigured)?;
    let mut pg: tokio_postgres::Config =
        url.parse().map_err(|e: tokio_postgres::Error| FleetError::BadUrl(e.to_string()))?;
    if pg.get_password().is_none() {
        if let Some(source) = &config.password {
            let secret = crate::credentials::store::read_gateway_secret(source).map_err(FleetError::Password)?;
            pg.password(secret.expose());
        }
    }
    if pg.get_application_name().is_none() {
        pg.application_name("ci-gateway");
    }
    // The outbox moves its cursor once the store acknowledges a commit: that
    // acknowledgement must mean durable, whatever the server's default
    // (`synchronous_commit = off` acknowledges commits a crash then loses).
    let options = match pg.get_options() {
        Some(given) => format!("{given} -c synchronous_commit=on"),
        None => "-c synchronous_commit=on".to_owned(),
    };
    pg.options(&options);
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(std::time::Duration::from_secs(10));
    }
    match config.tls.mode {
        TlsMode::VerifyFull => {
            pg.ssl_mode(SslMode::Require);
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_tls(config)?);
            let (client, connection) = pg.connect(tls).await.map_err(FleetError::pg("connecting"))?;
            tokio::spawn(drive(connection, notifications));
            Ok(client)
        }
        TlsMode::Disable => {
            pg.ssl_mode(SslMode::Disable);
            let (client, connection) = pg.connect(NoTls).await.map_err(FleetError::pg("connecting"))?;
            tokio::spawn(drive(connection, notifications));
            Ok(client)
        }
    }
}

/// Runs a connection until it closes, handing its notifications to
/// `notifications` (when somebody listens; otherwise they are dropped).
async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    notifications: Option<mpsc::UnboundedSender<Notification>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(n))) => {
                if let Some(tx) = &notifications {
                    // The listener has gone: nothing left to tell.
                    let _ = tx.send(n);
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(target: FLEET_TARGET, error = %e, "central store connection closed");
                return;
            }
            None => return,
        }
    }
}

/// rustls client settings: `fleet.tls.ca_file`, else the system roots.
fn client_tls(config: &FleetConfig) -> Result<rustls::ClientConfig, FleetError> {
    let mut roots = rustls::RootCertStore::empty();
    match &config.tls.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| FleetError::Tls(format!("{}: {e}", path.display())))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| FleetError::Tls(format!("{}: {e}", path.display())))?;
                roots.add(cert).map_err(|e| FleetError::Tls(format!("{}: {e}", path.display())))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    if roots.is_empty() {
        return Err(FleetError::Tls("no trusted CA certificates (fleet.tls.ca_file)".into()));
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| FleetError::Tls(e.to_string()))
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// The store's schema version: 0 when it was never migrated.
pub async fn schema_version(client: &Client) -> Result<i32, FleetError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
        .await
        .map_err(FleetError::pg("reading the schema version"))?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await
        .map_err(FleetError::pg("reading the schema version"))?;
    Ok(row.get(0))
}

/// The fingerprint keys the fleet's hosts registered (schema 3 on): each
/// key id with its hosts, the most shared first. More than one entry means
/// a secret seen on hosts of different entries is several findings.
pub async fn fingerprint_keys(client: &Client) -> Result<Vec<(String, Vec<String>)>, FleetError> {
    let rows = client
        .query(
            "SELECT fingerprint_key_id, array_agg(host_id ORDER BY host_id) FROM fleet_hosts
             WHERE fingerprint_key_id IS NOT NULL GROUP BY 1 ORDER BY count(*) DESC, 1",
            &[],
        )
        .await
        .map_err(FleetError::pg("reading the hosts' fingerprint keys"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Fails unless the store's schema is exactly the one this gateway ships
/// against.
pub async fn check_schema(client: &Client) -> Result<(), FleetError> {
    match schema_version(client).await? {
        v if v == SCHEMA_VERSION => Ok(()),
        v if v > SCHEMA_VERSION => Err(FleetError::SchemaTooNew { found: v, known: SCHEMA_VERSION }),
        v => Err(FleetError::SchemaTooOld { found: v, known: SCHEMA_VERSION }),
    }
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// The version before.
    pub from: i32,
    /// The version now.
    pub to: i32,
}

/// Applies the migrations the store has not seen, each in its own
/// transaction under an advisory lock (two gateways migrating at once are
/// serialised). Refuses a store whose schema is newer than this build.
pub async fn migrate(client: &mut Client) -> Result<Migrated, FleetError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (
                 version     integer     PRIMARY KEY,
                 description text        NOT NULL,
                 applied_at  timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(FleetError::pg("creating schema_version"))?;
    let from = schema_version(client).await?;
    if from > SCHEMA_VERSION {
        return Err(FleetError::SchemaTooNew { found: from, known: SCHEMA_VERSION });
    }
    for (i, (description, sql)) in MIGRATIONS.iter().enumerate() {
        let version = i as i32 + 1;
        let tx = client.transaction().await.map_err(FleetError::pg("starting a migration"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(FleetError::pg("taking the migration lock"))?;
        // Read again under the lock: another migrator may have been first.
        let done: bool = tx
            .query_one("SELECT EXISTS (SELECT 1 FROM schema_version WHERE version = $1)", &[&version])
            .await
            .map_err(FleetError::pg("reading the schema version"))?
            .get(0);
        if done {
            continue;
        }
        tx.batch_execute(sql).await.map_err(FleetError::pg("applying a migration"))?;
        tx.execute("INSERT INTO schema_version (version, description) VALUES ($1, $2)", &[&version, description])
            .await
            .map_err(FleetError::pg("recording the schema version"))?;
        tx.commit().await.map_err(FleetError::pg("committing a migration"))?;
        tracing::info!(target: FLEET_TARGET, version, description, "central store migrated");
    }
    Ok(Migrated { from, to: schema_version(client).await? })
}
