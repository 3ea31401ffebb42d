//! HTTP/1.1 upgrades (WebSocket and friends): once upstream answered 101,
//! both connections stop being HTTP. The client's bytes go through the
//! request's [`TunnelInspector`] before upstream (only what it releases
//! leaves); upstream's bytes reach the client untouched. A tunnel the
//! inspector opted out of (`Tunnel::Pass`) is copied both ways as is.

use std::{sync::Arc, time::Duration};

use bytes::BytesMut;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::Mutex,
};

use super::{Tunnel, TunnelInspector, TunnelVerdict};

/// With unreleased client bytes pending, how long the tunnel waits for
/// more before asking the inspector to release what it can: short enough
/// for interactive protocols, long enough to see most of a message.
pub const TUNNEL_LINGER: Duration = Duration::from_millis(20);

/// Waits for both sides to finish the 101 handshake, then runs the tunnel
/// until both sides are done. An inspected tunnel holds at most
/// `max_pending` client bytes its inspector has not released (a message
/// waiting to be judged whole); past that it is closed, never forwarded
/// unjudged.
pub(crate) async fn run(conn_id: u64, client: OnUpgrade, upstream: OnUpgrade, tunnel: Tunnel, max_pending: usize) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(conn_id, error = %e, "upgrade handshake failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    let result = match tunnel {
        Tunnel::Pass => tokio::io::copy_bidirectional(&mut client, &mut upstream).await.map(|_| ()),
        Tunnel::Inspect(inspector) => inspected(conn_id, client, upstream, inspector, max_pending).await,
        // Refused tunnels never get here.
        Tunnel::Refuse(_) => Ok(()),
    };
    match result {
        Ok(()) => tracing::debug!(conn_id, "upgraded tunnel closed"),
        Err(e) => tracing::debug!(conn_id, error = %e, "upgraded tunnel failed"),
    }
}

async fn inspected(
    conn_id: u64,
    client: TokioIo<Upgraded>,
    upstream: TokioIo<Upgraded>,
    mut inspector: Box<dyn TunnelInspector>,
    max_pending: usize,
) -> std::io::Result<()> {
    let (mut client_r, client_w) = tokio::io::split(client);
    let (mut upstream_r, mut upstream_w) = tokio::io::split(upstream);
    // Shared so that a refusal can still reach the client after the
    // downstream copy is stopped.
    let client_w = Arc::new(Mutex::new(client_w));
    let writer = client_w.clone();
    let mut down = Box::pin(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = upstream_r.read(&mut buf).await?;
            let mut w = writer.lock().await;
            if n == 0 {
                return w.shutdown().await;
            }
            w.write_all(&buf[..n]).await?;
        }
    });
    let up = async {
        let mut pending = BytesMut::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let read = if pending.is_empty() {
                Some(client_r.read(&mut buf).await?)
            } else {
                tokio::time::timeout(TUNNEL_LINGER, client_r.read(&mut buf)).await.ok().transpose()?
            };
            let verdict = match read {
                Some(0) => inspector.finish().await,
                Some(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    inspector.feed(&buf[..n]).await
                }
                None => inspector.idle().await,
            };
            match verdict {
                TunnelVerdict::Release(n) => {
                    let n = n.min(pending.len());
                    if n > 0 {
                        let out = pending.split_to(n);
                        upstream_w.write_all(&out).await?;
                    }
                }
                TunnelVerdict::Close(to_client) => return Ok::<_, std::io::Error>(Some(to_client)),
            }
            if pending.len() > max_pending {
                tracing::info!(
                    conn_id,
                    held = pending.len(),
                    max_pending,
                    "tunnel closed: too much unjudged data held"
                );
                return Ok(Some(bytes::Bytes::new()));
            }
            if read == Some(0) {
                upstream_w.shutdown().await?;
                return Ok(None);
            }
        }
    };
    tokio::pin!(up);
    let mut down_done = false;
    let closing = loop {
        tokio::select! {
            r = &mut up => break r?,
            r = &mut down, if !down_done => {
                down_done = true;
                r?;
            }
        }
    };
    match closing {
        // The client finished: let upstream finish too.
        None if !down_done => down.await,
        None => Ok(()),
        Some(to_client) => {
            // Stop relaying downstream (releasing the writer), then tell
            // the client and close.
            drop(down);
            let mut w = client_w.lock().await;
            w.write_all(&to_client).await?;
            w.shutdown().await
        }
    }
}
