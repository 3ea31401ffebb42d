//! The handler for bytes the gateway does not understand: a protocol it
//! does not parse, a server that speaks first, TLS it does not terminate.
//!
//! It asks the gate ([`Passage::opaque`]) and does what it says: refuse
//! (close, or a TLS alert for TLS), relay the bytes untouched (kernel
//! splice), or scan the client's bytes with every rule on their way up
//! (`uninspectable: scan_raw`). Relaying raw bytes only ever follows an
//! explicit yes from the gate.

use std::sync::{atomic::Ordering, Arc};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{connect_upstream, Handled, Intercepted, Proxy};
use crate::{
    detect::{
        http_scan::{Hit, Location},
        Detector, StreamScanner,
    },
    enforce::{Judged, Opaque, Passage, Refusal, Uninspectable},
    event::{Outcome, Protocol},
    record::SessionOutcome,
    relay,
};

/// A TLS alert record: fatal `access_denied` (RFC 8446 §6.2), so the
/// client's TLS library reports the refusal rather than a reset.
const TLS_ACCESS_DENIED: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31];

impl Proxy {
    /// Decides and handles a connection the gateway cannot parse, judged
    /// as protocol `tcp` for `host`. `dialled` is an upstream connection
    /// opened to see who speaks first, used if the gate lets it through.
    pub(super) async fn opaque(
        &self,
        conn: Intercepted,
        mut passage: Passage,
        why: Uninspectable,
        mut handled: Handled,
        dialled: Option<TcpStream>,
    ) -> Handled {
        let verdict = passage.opaque(why, handled.protocol, handled.sni.clone()).await;
        let opaque = match verdict {
            Ok(o) => o,
            Err(refusal) => {
                refuse(&conn.client, handled.protocol).await;
                passage.end_session(SessionOutcome::Refused, 0, 0);
                return handled.refused(&refusal);
            }
        };
        let upstream = match dialled {
            Some(u) => u,
            None => match connect_upstream(
                conn.orig_dst,
                self.config.upstream_mark,
                self.config.connect_timeout,
                &self.services.gate.metrics,
            )
            .await
            {
                Ok(u) => u,
                Err(e) => {
                    passage.end_session(SessionOutcome::UpstreamFailed, 0, 0);
                    return handled.failed(Outcome::UpstreamFailed, format!("connecting upstream: {e}"));
                }
            },
        };
        let counters = relay::Counters::default();
        let result = match opaque {
            Opaque::Pass => relay::relay(&conn.client, &upstream, &counters).await.map_err(ScanEnd::from),
            Opaque::ScanRaw => {
                let host = passage.destination_host(handled.sni.as_deref());
                scan_raw(&passage, &host, conn.client, upstream, &counters).await
            }
        };
        handled.bytes_up = counters.up.load(Ordering::Relaxed);
        handled.bytes_down = counters.down.load(Ordering::Relaxed);
        let (outcome, handled) = match result {
            Ok(()) => (SessionOutcome::Closed, handled),
            Err(ScanEnd::Refused(refusal)) => (SessionOutcome::Refused, handled.refused(&refusal)),
            Err(ScanEnd::Io(e)) => (SessionOutcome::Error, handled.failed(Outcome::Error, format!("relay: {e}"))),
        };
        passage.end_session(outcome, handled.bytes_up, handled.bytes_down);
        handled
    }
}

/// Closes a refused connection in its protocol's way.
async fn refuse(client: &TcpStream, protocol: Protocol) {
    if protocol == Protocol::TlsPassthrough {
        // The client is waiting for a ServerHello: an alert tells it why
        // nothing follows. Best effort: it may already be gone.
        let _ = client.try_write(&TLS_ACCESS_DENIED);
    }
    // Unread bytes make close() send a reset, which is what a refused
    // connection should look like to a client that kept sending.
}

/// How a scanned relay ended early.
enum ScanEnd {
    /// A key was found and its action blocks.
    Refused(Refusal),
    /// The relay failed.
    Io(String),
}

impl From<std::io::Error> for ScanEnd {
    fn from(e: std::io::Error) -> Self {
        ScanEnd::Io(e.to_string())
    }
}

/// Scanning raw bytes on their way somewhere: every byte is scanned before
/// it may be released, and the last [`Detector::overlap`] bytes (as many as
/// the longest key) wait for more data, or for the end, so a key split
/// across reads is found before it is complete on the other side.
pub(super) struct RawScan {
    scanner: StreamScanner,
    hold_back: u64,
    fed: u64,
    released: u64,
}

impl RawScan {
    /// A scan with `detector`.
    pub(super) fn new(detector: Arc<Detector>) -> RawScan {
        let hold_back = detector.overlap() as u64;
        RawScan { scanner: StreamScanner::new(detector), hold_back, fed: 0, released: 0 }
    }

    /// Scans the next bytes; returns the keys now found.
    pub(super) fn feed(&mut self, data: &[u8]) -> Vec<Hit> {
        self.fed += data.len() as u64;
        hits(self.scanner.feed(data))
    }

    /// The end of the stream: the keys still held back.
    pub(super) fn finish(&mut self) -> Vec<Hit> {
        hits(self.scanner.finish())
    }

    /// How many of the bytes fed and not yet released may go now (all of
    /// them with `all`: the end, or a pause), and marks them released.
    pub(super) fn release(&mut self, all: bool) -> usize {
        let until = if all { self.fed } else { self.fed.saturating_sub(self.hold_back) };
        let n = until.saturating_sub(self.released);
        self.released += n;
        n as usize
    }
}

fn hits(detections: Vec<crate::detect::Detection>) -> Vec<Hit> {
    detections.into_iter().map(|detection| Hit { detection, location: Location::Body("raw".into()) }).collect()
}

/// Relays with the client's bytes scanned on their way up: each read is
/// scanned before it is forwarded, and the last bytes (as many as the
/// longest key) wait for the next read, or [`SCAN_RAW_LINGER`], so a key
/// split across reads is found before it is complete upstream.
async fn scan_raw(
    passage: &Passage,
    host: &str,
    client: TcpStream,
    upstream: TcpStream,
    counters: &relay::Counters,
) -> Result<(), ScanEnd> {
    let mut scan = RawScan::new(passage.gate().detector.clone());
    let judged = Judged { host: host.to_owned(), verified: Default::default(), static_keys: None };
    let (mut client_r, mut client_w) = client.into_split();
    let (mut upstream_r, mut upstream_w) = upstream.into_split();
    let down = async {
        let n = tokio::io::copy(&mut upstream_r, &mut client_w).await?;
        counters.down.fetch_add(n, Ordering::Relaxed);
        client_w.shutdown().await?;
        Ok::<(), ScanEnd>(())
    };
    let up = async {
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let read = if pending.is_empty() {
                Some(client_r.read(&mut buf).await?)
            } else {
                tokio::time::timeout(crate::http::TUNNEL_LINGER, client_r.read(&mut buf)).await.ok().transpose()?
            };
            let end = read == Some(0);
            let hits = match read {
                Some(0) => scan.finish(),
                Some(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    scan.feed(&buf[..n])
                }
                // Nothing more for a while: release the tail.
                None => Vec::new(),
            };
            if !hits.is_empty() {
                let judgement = passage.judge(&judged, hits, None).await;
                if let Some(refusal) = judgement.refusal {
                    return Err(ScanEnd::Refused(refusal));
                }
            }
            let release = scan.release(end || read.is_none());
            if release > 0 {
                upstream_w.write_all(&pending[..release]).await?;
                counters.up.fetch_add(release as u64, Ordering::Relaxed);
                pending.drain(..release);
            }
            if end {
                upstream_w.shutdown().await?;
                return Ok(());
            }
        }
    };
    tokio::try_join!(up, down).map(|_| ())
}
