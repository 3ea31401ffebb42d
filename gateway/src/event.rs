//! Structured events: one per intercepted connection.
//!
//! Events are tracing events with target [`CONNECTION_TARGET`]; with
//! `log.format: json` each is one JSON object per line with every field at
//! the top level, which is what log pipelines (and the tests) read.

use std::{net::SocketAddr, time::Duration};

use crate::process::ProcessInfo;

/// tracing target of connection events.
pub const CONNECTION_TARGET: &str = "gateway::connection";

/// How a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions completed.
    Closed,
    /// No eBPF record for the accepted socket: closed without forwarding.
    Unattributed,
    /// The original destination could not be reached.
    UpstreamFailed,
    /// An I/O error ended the relay.
    Error,
    /// Refused by the gateway's policy or detector.
    Blocked,
    /// Refused at once because a resource limit was reached (see the
    /// event's `limit`); nothing was forwarded.
    Refused,
}

impl Outcome {
    /// Every outcome, in declaration order (`ALL[o as usize] == o`).
    pub const ALL: [Outcome; 6] = [
        Outcome::Closed,
        Outcome::Unattributed,
        Outcome::UpstreamFailed,
        Outcome::Error,
        Outcome::Blocked,
        Outcome::Refused,
    ];

    /// The name used in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::Unattributed => "unattributed",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::Error => "error",
            Outcome::Blocked => "blocked",
            Outcome::Refused => "refused",
        }
    }
}

/// How the proxy handled a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Protocol {
    /// Bytes the gateway does not parse (relayed, scanned raw, or refused).
    Tcp,
    /// TLS the gateway does not terminate.
    TlsPassthrough,
    /// TLS the gateway terminated, carrying HTTP.
    Https,
    /// Plaintext HTTP.
    Http,
    /// TLS that ended before the protocol inside was known (a malformed
    /// hello, a failed handshake).
    Tls,
    /// PostgreSQL (frontend/backend protocol 3.0), over TLS or not.
    Postgres,
}

impl Protocol {
    /// Every protocol, in declaration order (`ALL[p as usize] == p`).
    pub const ALL: [Protocol; 6] =
        [Protocol::Tcp, Protocol::TlsPassthrough, Protocol::Https, Protocol::Http, Protocol::Tls, Protocol::Postgres];

    /// The name used in events and recordings.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::TlsPassthrough => "tls-passthrough",
            Protocol::Https => "https",
            Protocol::Http => "http",
            Protocol::Tls => "tls",
            Protocol::Postgres => "postgres",
        }
    }
}

/// The summary of one intercepted connection.
#[derive(Debug, Clone)]
pub struct ConnectionEvent<'a> {
    /// Gateway-assigned connection id.
    pub id: u64,
    /// The client as the proxy saw it.
    pub peer: SocketAddr,
    /// Where the client meant to go.
    pub orig_dst: Option<SocketAddr>,
    /// How it was captured: `destination` (intercept set) or `port` (port capture).
    pub capture: Option<&'static str>,
    /// How the process was attested: `fresh` (from /proc), `cached` (kept
    /// from an earlier connection of the same unchanged process) or
    /// `unattested`.
    pub attestation: Option<&'static str>,
    /// Who the client is.
    pub process: Option<&'a ProcessInfo>,
    /// The identity the process is pinned to.
    pub identity: Option<&'a str>,
    /// How the proxy handled it.
    pub protocol: Option<Protocol>,
    /// TLS server name the client asked for.
    pub sni: Option<String>,
    /// HTTP requests served (intercepted HTTP only).
    pub requests: Option<u64>,
    /// Bytes client -> upstream.
    pub bytes_up: u64,
    /// Bytes upstream -> client.
    pub bytes_down: u64,
    /// Time from accept to close.
    pub duration: Duration,
    /// How it ended.
    pub outcome: Outcome,
    /// Error text when it ended badly.
    pub error: Option<String>,
    /// The limit that refused it (with outcome `refused`).
    pub limit: Option<crate::limits::LimitExceeded>,
}

impl ConnectionEvent<'_> {
    /// Emits the event and counts it in `metrics` (connections by protocol
    /// and outcome, refusals by a limit): the metrics are derived from the
    /// events, so they cannot disagree.
    pub fn emit(&self, metrics: &crate::metrics::Metrics) {
        metrics.connection(self.protocol, self.outcome, self.limit.is_some());
        let p = self.process;
        let exe = p.and_then(|p| p.exe.as_ref()).map(|e| e.display().to_string());
        let orig_dst = self.orig_dst.map(|d| d.to_string());
        let container = p.and_then(|p| p.container.as_ref());
        tracing::info!(
            target: CONNECTION_TARGET,
            conn_id = self.id,
            peer = %self.peer,
            orig_dst = orig_dst.as_deref(),
            capture = self.capture,
            pid = p.map(|p| p.pid),
            tid = p.map(|p| p.tid),
            uid = p.map(|p| p.uid),
            gid = p.map(|p| p.gid),
            comm = p.map(|p| p.comm.as_str()),
            identity = self.identity,
            attestation = self.attestation,
            protocol = self.protocol.map(Protocol::as_str),
            sni = self.sni.as_deref(),
            requests = self.requests,
            exe = exe.as_deref(),
            cgroup = p.and_then(|p| p.cgroup.as_deref()),
            cgroup_id = p.map(|p| p.cgroup_id),
            netns = p.map(|p| p.netns_cookie),
            container_id = container.map(|c| c.id.as_str()),
            container_name = container.and_then(|c| c.name.as_deref()),
            container_image = container.and_then(|c| c.image.as_deref()),
            container_runtime = container.map(|c| c.runtime.as_str()),
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms = self.duration.as_secs_f64() * 1000.0,
            outcome = self.outcome.as_str(),
            reason = self.limit.map(|_| "limit"),
            limit = self.limit.map(|l| l.limit.as_str()),
            limit_max = self.limit.map(|l| l.max),
            error = self.error.as_deref(),
            "connection"
        );
    }
}
