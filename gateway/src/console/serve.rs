//! The console's listener: TCP, TLS (rustls) unless on loopback without a
//! certificate, HTTP/1.1 and HTTP/2 (hyper) into the axum router.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{auth::Provider, routes, session::Sessions, ConsoleConfig};
use crate::{api::ReviewDesk, approval::Approvals};

/// What the console works on: the same services the admin and review
/// sockets use.
#[derive(Clone)]
pub struct ConsoleServices {
    /// Findings decisions (the review socket's desk).
    pub desk: ReviewDesk,
    /// The approval service.
    pub approvals: Approvals,
    /// The sessions database (opened per request, read-only use).
    pub sessions_db: std::path::PathBuf,
    /// The fleet's central store, when `fleet.store` is configured.
    pub fleet: Option<Arc<FleetDesk>>,
}

/// What the console's fleet pages need: where the central store is and
/// how to reach it, this host's id (decisions taken here say so), and the
/// approver groups the CLI checks a central decision against.
pub struct FleetDesk {
    /// `fleet:` of the configuration.
    pub config: crate::fleet::FleetConfig,
    /// This host's id.
    pub host_id: String,
    /// `approvals.groups`.
    pub groups: std::collections::BTreeMap<String, Vec<String>>,
}

/// Binds the console (fails the start when the address, certificate or
/// secret is unusable) and serves it on a task until `shutdown` fires.
/// `None` when `console.listen` is not set.
pub async fn serve_console(
    config: &ConsoleConfig,
    services: ConsoleServices,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(addr) = config.listen else {
        return Ok(None);
    };
    let oidc = config.oidc.as_ref().context("console.oidc is required")?;
    let provider = Provider::new(oidc)?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        _ => None,
    };
    let redirect = openidconnect::url::Url::parse(&oidc.redirect_url).context("console.oidc.redirect_url")?;
    let fleet = services.fleet.is_some();
    let state = routes::Console {
        services,
        provider: Arc::new(provider),
        sessions: Arc::new(Sessions::new(config.session_ttl).showing_fleet(fleet)),
        tls: tls.is_some(),
        origin: redirect.origin().ascii_serialization(),
        callback: redirect.path().to_owned(),
    };
    let app = routes::router(state);
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding the console on {addr}"))?;
    tracing::info!(%addr, tls = tls.is_some(), "review console listening");
    Ok(Some(tokio::spawn(accept(listener, tls, app, shutdown))))
}

fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let cert_pem = std::fs::read(cert).with_context(|| format!("console.tls_cert {}", cert.display()))?;
    let key_pem = std::fs::read(key).with_context(|| format!("console.tls_key {}", key.display()))?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("console.tls_cert {}", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("console.tls_key {}", key.display()))?
        .with_context(|| format!("console.tls_key {}: no private key in it", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("console TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("console TLS certificate and key")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections until `shutdown`; each is served on its own task
/// (a slow TLS handshake holds up nobody else).
async fn accept(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: axum::Router,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "console: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let app = app.clone();
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = TowerToHyperService::new(app);
            let builder = auto::Builder::new(TokioExecutor::new());
            let served = match tls {
                Some(tls) => {
                    let handshake = tokio::time::timeout(std::time::Duration::from_secs(10), tls.accept(stream)).await;
                    match handshake {
                        Ok(Ok(stream)) => {
                            let conn = builder.serve_connection(TokioIo::new(stream), service);
                            tokio::select! { r = conn => r, () = shutdown.cancelled() => Ok(()) }
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, %peer, "console: TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    }
                }
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! { r = conn => r, () = shutdown.cancelled() => Ok(()) }
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, %peer, "console connection ended with an error");
            }
        });
    }
}
