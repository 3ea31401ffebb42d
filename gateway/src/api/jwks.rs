//! The JWKS and OIDC discovery on a listener of their own (`api.jwks`), for
//! backends on other hosts that verify the tokens the gateway mints.
//!
//! The public API stays on loopback (it also serves the metrics); this
//! listener serves only the two documents and a health check. Anywhere but
//! loopback it speaks only TLS, with the operator's certificate: a JWKS
//! fetched in clear could be swapped by anyone on the path, and with it
//! every token the backend accepts. The certificate and key files are read
//! again when they change (a renewal needs no restart).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use axum::Router;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulConnection},
    service::TowerToHyperService,
};
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::credentials::{Minter, Source};

/// `api.jwks`: where backends elsewhere fetch the JWKS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JwksListenerConfig {
    /// Listen address (any address; TLS is required unless it is loopback).
    pub listen: SocketAddr,
    /// PEM certificate chain presented to backends.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`: owned by root, mode 0600 or 0400.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The base URL backends use, which discovery advertises
    /// (`<url>/.well-known/jwks.json`); by default `credentials.jwt.issuer`,
    /// as OIDC discovery expects.
    #[serde(default)]
    pub url: Option<String>,
}

impl JwksListenerConfig {
    /// Checks the section alone; `issuer` is `credentials.jwt.issuer`.
    pub fn validate(&self, issuer: &str) -> Result<(), (String, String)> {
        let at = |f: &str| format!("api.jwks.{f}");
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                for (field, path) in [("cert_file", cert), ("key_file", key)] {
                    if !path.is_absolute() {
                        return Err((at(field), format!("`{}` must be an absolute path", path.display())));
                    }
                }
            }
            (None, None) if self.listen.ip().is_loopback() => {}
            (None, None) => {
                return Err((
                    at("cert_file"),
                    "TLS (cert_file and key_file) is required off loopback: a JWKS served in clear can be swapped"
                        .into(),
                ))
            }
            (Some(_), None) => return Err((at("key_file"), "required with cert_file".into())),
            (None, Some(_)) => return Err((at("cert_file"), "required with key_file".into())),
        }
        let url = self.base_url(issuer).ok_or_else(|| {
            (at("url"), "required: the URL backends use (or set credentials.jwt.issuer to an https URL)".into())
        })?;
        let uri: http::Uri = url.parse().map_err(|e| (at("url"), format!("`{url}` is not a URL: {e}")))?;
        let tls = self.cert_file.is_some();
        match uri.scheme_str() {
            Some("https") if tls => Ok(()),
            Some("http") if !tls => Ok(()),
            _ => Err((
                at("url"),
                format!("`{url}` must be an {} URL for this listener", if tls { "https" } else { "http" }),
            )),
        }
    }

    /// The base URL discovery advertises: `url`, else the issuer when it is
    /// a URL of the scheme this listener speaks.
    pub fn base_url(&self, issuer: &str) -> Option<String> {
        let scheme = if self.cert_file.is_some() { "https://" } else { "http://" };
        self.url
            .clone()
            .or_else(|| issuer.starts_with(scheme).then(|| issuer.to_owned()))
            .map(|u| u.trim_end_matches('/').to_owned())
    }
}

/// Why the JWKS listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// A certificate or key file could not be used.
    #[error("api.jwks: {0}")]
    Tls(String),
    /// The section is incomplete (checked by `config check` too).
    #[error("{0}: {1}")]
    Config(String, String),
}

/// The JWKS listener, ready to serve: its certificate is loaded.
pub struct JwksServer {
    listener: TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl JwksServer {
    /// Prepares the JWKS, discovery and `/healthz` on `listener`, TLS when
    /// the configuration has a certificate: errors here (an unreadable key)
    /// stop the gateway's start, not its first handshake.
    pub fn new(listener: TcpListener, config: &JwksListenerConfig, minter: Arc<Minter>) -> Result<Self, JwksError> {
        let base = config.base_url(minter.issuer()).ok_or_else(|| {
            JwksError::Config("api.jwks.url".into(), "required (or an https credentials.jwt.issuer)".into())
        })?;
        let app = super::public::documents(minter, format!("{base}{}", super::JWKS_PATH));
        let tls = match (&config.cert_file, &config.key_file) {
            (Some(cert), Some(key)) => {
                let resolver = Arc::new(FileCert::load(cert.clone(), key.clone())?);
                let mut tls = rustls::ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| JwksError::Tls(e.to_string()))?
                    .with_no_client_auth()
                    .with_cert_resolver(resolver);
                tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls)))
            }
            _ => None,
        };
        Ok(Self { listener, app, tls })
    }

    /// Serves until `shutdown` fires.
    pub async fn serve(self, shutdown: CancellationToken) {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "JWKS listener: accept failed");
                        continue;
                    }
                },
            };
            tokio::spawn(serve_one(tcp, peer, self.tls.clone(), self.app.clone(), shutdown.clone()));
        }
    }
}

async fn serve_one(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    shutdown: CancellationToken,
) {
    let service = TowerToHyperService::new(app);
    let builder = auto::Builder::new(TokioExecutor::new());
    let served = match tls {
        Some(acceptor) => {
            let handshake = tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await;
            match handshake {
                Ok(Ok(stream)) => serve_until(builder.serve_connection(TokioIo::new(stream), service), &shutdown).await,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "JWKS listener: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
        None => serve_until(builder.serve_connection(TokioIo::new(tcp), service), &shutdown).await,
    };
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "JWKS listener: connection ended with an error");
    }
}

/// Drives a connection, closing it gracefully when `shutdown` fires.
async fn serve_until<C: GracefulConnection>(conn: C, shutdown: &CancellationToken) -> Result<(), C::Error> {
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// The certificate from `cert_file`/`key_file`, read again when either
/// file's modification time changes.
#[derive(Debug)]
struct FileCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: Mutex<(Option<SystemTime>, Option<SystemTime>, Arc<CertifiedKey>)>,
}

impl FileCert {
    fn load(cert_file: PathBuf, key_file: PathBuf) -> Result<Self, JwksError> {
        let key = read_certified(&cert_file, &key_file)?;
        let stamps = (modified(&cert_file), modified(&key_file));
        Ok(Self { cert_file, key_file, current: Mutex::new((stamps.0, stamps.1, key)) })
    }
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let stamps = (modified(&self.cert_file), modified(&self.key_file));
        if (stamps.0, stamps.1) != (current.0, current.1) {
            match read_certified(&self.cert_file, &self.key_file) {
                Ok(key) => {
                    tracing::info!(cert = %self.cert_file.display(), "JWKS listener: certificate reloaded");
                    *current = (stamps.0, stamps.1, key);
                }
                // Half-written renewal: keep serving the old pair, try again
                // at the next handshake.
                Err(e) => tracing::warn!(error = %e, "JWKS listener: keeping the previous certificate"),
            }
        }
        Some(current.2.clone())
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn read_certified(cert_file: &Path, key_file: &Path) -> Result<Arc<CertifiedKey>, JwksError> {
    let pem = std::fs::read(cert_file).map_err(|e| JwksError::Tls(format!("{}: {e}", cert_file.display())))?;
    let chain: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| JwksError::Tls(format!("{}: {e}", cert_file.display())))?;
    if chain.is_empty() {
        return Err(JwksError::Tls(format!("{}: no certificate in it", cert_file.display())));
    }
    // The key file gets the checks of a credential file: root's, 0600/0400.
    let key_pem =
        crate::credentials::store::read_gateway_secret(&Source::File(key_file.to_owned())).map_err(JwksError::Tls)?;
    let key = rustls_pemfile::private_key(&mut key_pem.expose().as_bytes())
        .map_err(|e| JwksError::Tls(format!("{}: {e}", key_file.display())))?
        .ok_or_else(|| JwksError::Tls(format!("{}: no private key in it", key_file.display())))?;
    let certified = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| JwksError::Tls(format!("{} and {}: {e}", cert_file.display(), key_file.display())))?;
    Ok(Arc::new(certified))
}

/// The crypto provider the gateway uses everywhere.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> JwksListenerConfig {
        serde_yaml_ng::from_str(yaml).expect("yaml")
    }

    #[test]
    fn off_loopback_only_tls_and_an_advertised_url_of_its_scheme() {
        let tls = "listen: 0.0.0.0:15443\ncert_file: /etc/c.pem\nkey_file: /etc/k.pem\n";
        // The issuer is the URL backends use, as OIDC discovery expects.
        config(tls).validate("https://runner-7.ci.example:15443").unwrap();
        assert_eq!(
            config(tls).base_url("https://runner-7.ci.example:15443/").as_deref(),
            Some("https://runner-7.ci.example:15443")
        );
        let cases = [
            ("listen: 0.0.0.0:15443\n", "https://x", "api.jwks.cert_file"),
            ("listen: 0.0.0.0:15443\ncert_file: /etc/c.pem\n", "https://x", "api.jwks.key_file"),
            ("listen: 0.0.0.0:15443\ncert_file: c.pem\nkey_file: /k\n", "https://x", "api.jwks.cert_file"),
            (tls, "ci-gateway", "api.jwks.url"),
            (&format!("{tls}url: http://runner-7:15443\n"), "", "api.jwks.url"),
            ("listen: 127.0.0.1:15443\nurl: https://x\n", "", "api.jwks.url"),
        ];
        for (yaml, issuer, field) in cases {
            let (f, reason) = config(yaml).validate(issuer).expect_err(yaml);
            assert_eq!(f, field, "{yaml}: {reason}");
        }
        // Plain http is for loopback only, with an http URL.
        config("listen: 127.0.0.1:15443\nurl: http://127.0.0.1:15443\n").validate("").unwrap();
        assert!(serde_yaml_ng::from_str::<JwksListenerConfig>("listen: 127.0.0.1:1\nport: 2\n").is_err());
    }
}
