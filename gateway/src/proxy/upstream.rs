//! Connections to the original destination, for the HTTP engine.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use crate::{
    http::{BoxedIo, ConnectHint, UpstreamConnector},
    tls::UpstreamTls,
};

use super::connect_upstream;

const H2: &[u8] = b"h2";
const HTTP11: &[u8] = b"http/1.1";

/// Plain TCP to the original destination (intercepted plaintext HTTP).
#[derive(Clone)]
pub struct PlainConnector {
    /// The original destination.
    pub dst: SocketAddr,
    /// Mark for the upstream socket.
    pub mark: u32,
    /// Connect timeout.
    pub timeout: Duration,
    /// Where the connect time is observed.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl UpstreamConnector for PlainConnector {
    async fn connect(&self, hint: ConnectHint) -> io::Result<(BoxedIo, bool)> {
        let tcp = connect_upstream(self.dst, self.mark, self.timeout, &self.metrics).await?;
        // Plaintext has no ALPN: mirror the client (h2c with prior knowledge).
        Ok((Box::new(tcp), hint.allow_h2 && hint.client_h2))
    }
}

/// TLS to the original destination, verified against the system roots and
/// the configured extra CAs; a verification failure is an error, never a
/// downgrade.
#[derive(Clone)]
pub struct TlsConnector {
    /// The original destination.
    pub dst: SocketAddr,
    /// Mark for the upstream socket.
    pub mark: u32,
    /// Connect and handshake timeout.
    pub timeout: Duration,
    /// The name the client asked for: SNI and verification name upstream.
    pub server_name: String,
    /// The verifying client.
    pub tls: Arc<UpstreamTls>,
    /// Where the connect time is observed.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl UpstreamConnector for TlsConnector {
    async fn connect(&self, hint: ConnectHint) -> io::Result<(BoxedIo, bool)> {
        let tcp = connect_upstream(self.dst, self.mark, self.timeout, &self.metrics).await?;
        // Mirror the client: an HTTP/1.1 client gets an HTTP/1.1 upstream, so
        // what the server sees is what the job sent.
        let alpn =
            if hint.allow_h2 && hint.client_h2 { vec![H2.to_vec(), HTTP11.to_vec()] } else { vec![HTTP11.to_vec()] };
        let handshake = self.tls.connect(tcp, &self.server_name, alpn);
        let stream = tokio::time::timeout(self.timeout, handshake)
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, format!("TLS handshake with {} timed out", self.server_name))
            })?
            .map_err(io::Error::other)?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(H2);
        Ok((Box::new(stream), h2))
    }
}
