//! HTTP/1.1 upgrades (WebSocket and friends): once upstream answered 101,
//! both connections stop being HTTP and are spliced byte for byte.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// Waits for both sides to finish the 101 handshake, then copies bytes
/// both ways until either side closes. Tunnelled bytes are not inspected.
pub(crate) async fn splice(conn_id: u64, client: OnUpgrade, upstream: OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(conn_id, error = %e, "upgrade handshake failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => tracing::debug!(conn_id, up, down, "upgraded tunnel closed"),
        Err(e) => tracing::debug!(conn_id, error = %e, "upgraded tunnel failed"),
    }
}
