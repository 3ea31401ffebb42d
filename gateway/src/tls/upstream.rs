//! TLS to the real upstream server, always verified.
//!
//! The job trusted the gateway CA only because the gateway promises to check
//! the real server on its behalf; so a verification failure is an error for
//! that connection, never a reason to continue unverified.

use std::{path::Path, sync::Arc};

use rustls::{pki_types::ServerName, ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::{client::TlsStream, TlsConnector};

use super::{TlsConfig, TlsError};

/// Opens verified TLS connections to upstream servers.
#[derive(Clone)]
pub struct UpstreamTls {
    config: Arc<ClientConfig>,
    root_count: usize,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls").field("root_count", &self.root_count).finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Trusts the system roots plus `config.extra_upstream_cas`.
    ///
    /// Unparsable system certificates are logged and skipped (one bad file in
    /// `/etc/ssl/certs` must not stop the gateway); an unusable extra CA file
    /// is an error, since the operator asked for it explicitly.
    pub fn new(config: &TlsConfig) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(%error, "cannot load some system root certificates; continuing without them");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        if ignored > 0 {
            tracing::warn!(ignored, "skipped unparsable system root certificates");
        }
        for path in &config.extra_upstream_cas {
            add_pem_roots(&mut roots, path)?;
        }
        tracing::debug!(system = added, total = roots.len(), "upstream root certificates loaded");
        if roots.is_empty() {
            return Err(TlsError::NoUpstreamRoots);
        }
        Self::with_roots(roots)
    }

    /// Trusts exactly `roots` (tests, or callers with their own store).
    pub fn with_roots(roots: RootCertStore) -> Result<Self, TlsError> {
        let root_count = roots.len();
        let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::UpstreamHandshake { server: "(configuration)".into(), reason: e.to_string() })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self { config: Arc::new(config), root_count })
    }

    /// How many trust anchors verification uses.
    pub fn root_count(&self) -> usize {
        self.root_count
    }

    /// Performs a verified TLS handshake with `server_name` over `tcp`,
    /// offering `alpn` (normally the protocols the intercepted client offered).
    ///
    /// `server_name` is a DNS name (sent as SNI and matched against the
    /// certificate) or an IP address (matched against IP SANs, no SNI). The
    /// negotiated protocol is `stream.get_ref().1.alpn_protocol()`.
    pub async fn connect(
        &self,
        tcp: TcpStream,
        server_name: &str,
        alpn: Vec<Vec<u8>>,
    ) -> Result<TlsStream<TcpStream>, TlsError> {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| TlsError::InvalidServerName { server: server_name.to_owned() })?;
        let config = if alpn.is_empty() {
            self.config.clone()
        } else {
            // A clone shares the session cache (it is behind an Arc), so
            // resumption still works across ALPN variants.
            let mut config = (*self.config).clone();
            config.alpn_protocols = alpn;
            Arc::new(config)
        };
        TlsConnector::from(config).connect(name, tcp).await.map_err(|e| classify(server_name, e))
    }
}

/// Separates "the server is not who it claims" from other handshake failures:
/// callers report the first as a possible attack, the second as an outage.
fn classify(server: &str, error: std::io::Error) -> TlsError {
    let server = server.to_owned();
    match error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(reason)) => {
            TlsError::UpstreamVerify { server, reason: reason.to_string() }
        }
        Some(rustls::Error::NoCertificatesPresented) => {
            TlsError::UpstreamVerify { server, reason: "the server presented no certificate".into() }
        }
        Some(other) => TlsError::UpstreamHandshake { server, reason: other.to_string() },
        None => TlsError::UpstreamHandshake { server, reason: error.to_string() },
    }
}

fn add_pem_roots(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsError> {
    let fail = |reason: String| TlsError::UpstreamCaFile { path: path.to_owned(), reason };
    let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(format!("not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(fail("no PEM certificates in the file".into()));
    }
    for (i, cert) in certs.into_iter().enumerate() {
        roots.add(cert).map_err(|e| fail(format!("certificate #{}: {e}", i + 1)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{
        mint::LeafCache,
        test_support::{tcp_pair, temp_ca},
        CertificateAuthority,
    };
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A real TLS server on one side of a loopback pair, presenting a leaf for
    /// `name` from `ca` and offering h2 and http/1.1; echoes one line.
    async fn serve(ca: Arc<CertificateAuthority>, name: &str) -> (TcpStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tcp_pair().await;
        let config = LeafCache::new(ca, Duration::from_secs(86400), 4)
            .server_config(name, &[b"h2".to_vec(), b"http/1.1".to_vec()])
            .expect("config");
        let task = tokio::spawn(async move {
            if let Ok(mut tls) = tokio_rustls::TlsAcceptor::from(config).accept(server).await {
                let mut buf = [0u8; 5];
                if tls.read_exact(&mut buf).await.is_ok() {
                    let _ = tls.write_all(&buf).await;
                    let _ = tls.shutdown().await;
                }
            }
        });
        (client, task)
    }

    fn roots_of(ca: &CertificateAuthority) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).expect("root");
        roots
    }

    #[tokio::test]
    async fn verified_connection_negotiates_the_requested_alpn() {
        let (_dir, ca) = temp_ca();
        let upstream = UpstreamTls::with_roots(roots_of(&ca)).expect("upstream");
        assert_eq!(upstream.root_count(), 1);
        for (offered, expected) in [(vec![b"h2".to_vec()], Some(&b"h2"[..])), (vec![], None)] {
            let (tcp, server) = serve(ca.clone(), "api2.cursor.sh").await;
            let mut tls = upstream.connect(tcp, "api2.cursor.sh", offered).await.expect("connect");
            assert_eq!(tls.get_ref().1.alpn_protocol(), expected);
            tls.write_all(b"hello").await.expect("write");
            let mut echo = Vec::new();
            tls.read_to_end(&mut echo).await.expect("read");
            assert_eq!(echo, b"hello");
            server.await.expect("server");
        }
    }

    #[tokio::test]
    async fn an_untrusted_issuer_is_a_verification_error() {
        let (_dir, ca) = temp_ca();
        let (_other_dir, other) = temp_ca();
        let upstream = UpstreamTls::with_roots(roots_of(&other)).expect("upstream");
        let (tcp, _server) = serve(ca, "api2.cursor.sh").await;
        let err = upstream.connect(tcp, "api2.cursor.sh", vec![]).await.expect_err("must fail");
        let TlsError::UpstreamVerify { server, reason } = &err else { panic!("{err}") };
        assert_eq!(server, "api2.cursor.sh");
        assert!(reason.to_lowercase().contains("unknown issuer") || reason.contains("UnknownIssuer"), "{reason}");
        assert!(err.to_string().starts_with("upstream api2.cursor.sh: certificate verification failed"), "{err}");
    }

    #[tokio::test]
    async fn a_certificate_for_another_name_is_a_verification_error() {
        let (_dir, ca) = temp_ca();
        let upstream = UpstreamTls::with_roots(roots_of(&ca)).expect("upstream");
        let (tcp, _server) = serve(ca, "other.example").await;
        let err = upstream.connect(tcp, "api2.cursor.sh", vec![]).await.expect_err("must fail");
        assert!(matches!(err, TlsError::UpstreamVerify { .. }), "{err}");
        assert!(err.to_string().contains("api2.cursor.sh"), "{err}");
    }

    #[tokio::test]
    async fn a_non_tls_server_is_a_handshake_error() {
        let (_dir, ca) = temp_ca();
        let upstream = UpstreamTls::with_roots(roots_of(&ca)).expect("upstream");
        let (tcp, mut server) = tcp_pair().await;
        let responder = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let _ = server.read(&mut buf).await;
            let _ = server.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        });
        let err = upstream.connect(tcp, "plain.example", vec![]).await.expect_err("must fail");
        assert!(matches!(err, TlsError::UpstreamHandshake { .. }), "{err}");
        responder.await.expect("responder");
        let (tcp, _) = tcp_pair().await;
        let err = upstream.connect(tcp, "not a name", vec![]).await.expect_err("bad name");
        assert!(matches!(err, TlsError::InvalidServerName { .. }), "{err}");
    }

    #[tokio::test]
    async fn extra_upstream_cas_are_trusted_and_bad_files_named() {
        let (dir, ca) = temp_ca();
        let pem = dir.path().join("extra.pem");
        std::fs::write(&pem, ca.cert_pem()).expect("write");
        let config = TlsConfig { extra_upstream_cas: vec![pem], ..TlsConfig::default() };
        let upstream = UpstreamTls::new(&config).expect("upstream");
        assert!(upstream.root_count() >= 1);
        let (tcp, server) = serve(ca, "private.example").await;
        let mut tls = upstream.connect(tcp, "private.example", vec![]).await.expect("connect");
        tls.write_all(b"hello").await.expect("write");
        drop(tls);
        let _ = server.await;

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").expect("write");
        let missing = dir.path().join("missing.pem");
        for path in [garbage, missing] {
            let config = TlsConfig { extra_upstream_cas: vec![path.clone()], ..TlsConfig::default() };
            let err = UpstreamTls::new(&config).expect_err("bad file").to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
        }
    }
}
