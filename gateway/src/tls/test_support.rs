//! Helpers shared by the TLS module's tests: real sockets, real handshakes.

use std::sync::Arc;

use rustls::{pki_types::CertificateDer, ClientConfig, RootCertStore};
use tokio::net::{TcpListener, TcpStream};

use super::CertificateAuthority;

/// A fresh CA in its own temporary state directory (kept alive by the guard).
pub(crate) fn temp_ca() -> (tempfile::TempDir, Arc<CertificateAuthority>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::load_or_create(dir.path()).expect("CA");
    (dir, ca)
}

/// A connected loopback TCP pair: (client side, server side).
pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.expect("connect"), accepted.expect("accept").0)
}

/// A client configuration trusting exactly `roots`, offering `alpn`.
pub(crate) fn client_config(roots: &[CertificateDer<'static>], alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).expect("root");
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}
