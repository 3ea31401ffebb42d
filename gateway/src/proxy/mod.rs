//! The local proxy: accepts redirected connections, admits them within the
//! limits of their cgroup and of the gateway ([`admission`]), attributes
//! them, hands them to the protocol handler their first bytes call for
//! ([`dispatch`]: `http` for HTTP and terminated TLS, `postgres` for
//! PostgreSQL, `tcp` for what the gateway does not parse), and emits one event per connection. Handlers
//! translate; the gate ([`crate::enforce::gate`]) decides.

use std::{
    io,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use std::os::fd::AsFd as _;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use crate::{
    config::ProxyConfig,
    enforce::{Caller, Gate, Refusal},
    event::{ConnectionEvent, Outcome, Protocol},
    identity::{Attestation, AttestationCache, Attestor, ContainerRuntimes, IdentityResolver},
    intercept::{netns, words_addr, Capture, Interceptor},
    limits::LimitExceeded,
    process::ProcessInfo,
    tls::{LeafCache, TlsConfig, UpstreamTls},
};

pub mod admission;
pub(crate) mod dispatch;
mod http;
mod http_refusal;
mod postgres;
mod tcp;
mod upstream;

pub use admission::{Admission, Admitted, Descriptors};
pub use postgres::PASSWORD_RULE as POSTGRES_PASSWORD_RULE;
pub use upstream::{PlainConnector, TlsConnector};

/// How long in-flight connections may finish after shutdown is requested.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Accept failures are logged at most once per this interval (with a count).
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A redirected connection, attributed and ready to be handled.
#[derive(Debug)]
pub struct Intercepted {
    /// Gateway-assigned id, also in every event of the connection.
    pub id: u64,
    /// The client side.
    pub client: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    /// Where the client meant to go.
    pub orig_dst: SocketAddr,
    /// How the connection was captured: a protected destination (anything
    /// not understood is refused) or only its port (the TLS server name or
    /// HTTP Host decides whether it is inspected or passed through).
    pub capture: Capture,
    /// Network namespace cookie of the client's socket.
    pub netns: u64,
    /// Who the client is and the identity it is pinned to.
    pub caller: Arc<Caller>,
}

/// What the protocol handlers share: TLS interception, upstream TLS, and
/// the static-key policy.
pub struct Services {
    /// Which hosts are intercepted, which passed through.
    pub tls: TlsConfig,
    /// Leaf certificates for intercepted names.
    pub leaf_cache: LeafCache,
    /// Verifying TLS client for upstreams.
    pub upstream_tls: Arc<UpstreamTls>,
    /// The gate: every decision about connections and requests.
    pub gate: Arc<Gate>,
    /// Attestation of connecting processes.
    pub attestor: Arc<Attestor>,
    /// Attestations kept while the kernel vouches the process is unchanged;
    /// `None` attests every connection in full.
    pub attestations: Option<Arc<AttestationCache>>,
    /// Operator mappings from attested processes to identities.
    pub identities: Arc<IdentityResolver>,
    /// Container runtimes asked for the name and image of a caller's container.
    pub containers: Arc<ContainerRuntimes>,
    /// HTTP engine limits.
    pub http_limits: crate::http::Limits,
}

/// Shared state of the proxy's accept loops.
pub struct Proxy {
    interceptor: Arc<Interceptor>,
    config: ProxyConfig,
    services: Services,
    admission: Arc<Admission>,
    next_id: AtomicU64,
    /// Accept loops and connections, of the main listeners and of those
    /// opened in other namespaces alike: shutdown drains them all.
    tracker: TaskTracker,
    /// Fires at shutdown (set by `serve`): stops every accept loop.
    shutdown: CancellationToken,
    /// The PostgreSQL cancel keys issued to open sessions.
    pg_cancel: crate::postgres::cancel::CancelKeys,
}

impl Proxy {
    /// A proxy taking records from `interceptor`, admitting connections
    /// within `config.limits` on a descriptor table of `fds` (see
    /// [`Descriptors::raise`]). Bodies buffered by the HTTP engine are
    /// counted per cgroup, in pools nested in the gateway's.
    pub fn new(
        interceptor: Arc<Interceptor>,
        config: ProxyConfig,
        mut services: Services,
        fds: Descriptors,
    ) -> Arc<Proxy> {
        let admission = Admission::new(&config.limits, fds);
        let pools = admission.clone();
        services.http_limits.body_pool =
            crate::http::BodyPool::PerConnection(Arc::new(move |ctx: &crate::http::HttpContext| {
                pools.budget_for(ctx.conn_id)
            }));
        Arc::new(Proxy {
            interceptor,
            config,
            services,
            admission,
            next_id: AtomicU64::new(1),
            tracker: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            pg_cancel: Default::default(),
        })
    }

    /// Accepts on `listeners` until `shutdown` fires, then gives in-flight
    /// connections [`DRAIN_TIMEOUT`] to finish.
    pub async fn serve(self: Arc<Self>, listeners: Vec<TcpListener>, shutdown: CancellationToken) {
        for listener in listeners {
            self.tracker.spawn(self.clone().accept_loop(listener, shutdown.clone()));
        }
        shutdown.cancelled().await;
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, self.tracker.wait()).await.is_err() {
            tracing::warn!("in-flight connections did not finish within {DRAIN_TIMEOUT:?}; closing them");
        }
    }

    /// Accepts on one listener until `stop` fires or the proxy shuts down;
    /// every connection goes to [`Proxy::handle`]. Every listener (host or
    /// per namespace) runs this loop, so admission and error handling are
    /// the same for all: accept failures (EMFILE...) pause the loop, growing
    /// pauses while they last, and are logged once per
    /// [`ACCEPT_ERROR_LOG_INTERVAL`] with a count.
    async fn accept_loop(self: Arc<Self>, listener: TcpListener, stop: CancellationToken) {
        let mut errors = admission::AcceptErrors::new(ACCEPT_ERROR_LOG_INTERVAL);
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.shutdown.cancelled() => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((client, peer)) => {
                    errors.succeeded();
                    // As on the upstream leg: what the proxy writes (a
                    // relayed PostgreSQL message, a TLS flight, a response
                    // head) goes out at once, not held by Nagle for the
                    // client's delayed ACK.
                    if let Err(e) = client.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY on the client socket");
                    }
                    let proxy = self.clone();
                    self.tracker.spawn(async move { proxy.handle(client, peer).await });
                }
                Err(e) => {
                    let (line, pause) = errors.failed(std::time::Instant::now());
                    if let Some(failures) = line {
                        let open = self.admission.open(0).0;
                        tracing::error!(error = %e, failures, open_connections = open, "accept failed");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// The proxy's connection admission.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("conn", id, %peer);
        async move {
            let started = Instant::now();
            let mut event = ConnectionEvent {
                id,
                peer,
                orig_dst: None,
                capture: None,
                attestation: None,
                process: None,
                identity: None,
                protocol: None,
                sni: None,
                requests: None,
                bytes_up: 0,
                bytes_down: 0,
                duration: Duration::ZERO,
                outcome: Outcome::Closed,
                error: None,
                limit: None,
            };
            let refuse = |mut event: ConnectionEvent<'_>, limit: LimitExceeded| {
                // Closed at once: the gate renders refusals per protocol
                // (HTTP 429 with the JSON of `LimitExceeded::http_response`).
                tracing::warn!(conn_id = id, limit = %limit.limit, max = limit.max, "connection refused: {limit}");
                event.outcome = Outcome::Refused;
                event.error = Some(limit.to_string());
                event.limit = Some(limit);
                event.duration = started.elapsed();
                event.emit(&self.services.gate.metrics);
            };
            let mut admitted = match self.admission.accept(id) {
                Ok(a) => a,
                Err(limit) => {
                    // The record is left to the map's LRU: reading it
                    // would keep the descriptor longer.
                    drop(client);
                    return refuse(event, limit);
                }
            };
            let local_port = client.local_addr().map(|a| a.port()).unwrap_or(self.config.port);
            // The accepted socket lives in the client's namespace (the
            // listener's): that names the record among namespaces.
            let netns = netns::socket_netns_cookie(client.as_fd()).unwrap_or(0);
            let Some(record) = self.await_record(peer, local_port, netns).await else {
                // Without a record we do not know where the client meant to
                // go: closing is the only safe choice.
                event.outcome = Outcome::Unattributed;
                event.duration = started.elapsed();
                event.emit(&self.services.gate.metrics);
                return;
            };
            let orig_dst = SocketAddr::new(words_addr(record.orig_addr), record.orig_port);
            event.orig_dst = Some(orig_dst);
            if let Err(limit) = admitted.attribute(record.cgroup_id) {
                drop(client);
                let process = ProcessInfo::from_record(&record);
                event.process = Some(&process);
                return refuse(event, limit);
            }
            let (caller, attestation) = self.identify(record).await;
            let caller = Arc::new(caller);
            event.attestation = Some(attestation);
            let capture = Capture::from_raw(record.capture);
            event.capture = Some(capture.as_str());
            let conn = Intercepted { id, client, peer, orig_dst, capture, netns, caller: caller.clone() };
            let handled = self.dispatch(conn).await;
            event.process = Some(&caller.process);
            event.identity = Some(&caller.identity.uri);
            event.protocol = Some(handled.protocol);
            event.sni = handled.sni;
            event.requests = handled.requests;
            event.bytes_up = handled.bytes_up;
            event.bytes_down = handled.bytes_down;
            event.outcome = handled.outcome;
            event.error = handled.error;
            event.duration = started.elapsed();
            event.emit(&self.services.gate.metrics);
            drop(admitted);
        }
        .instrument(span)
        .await
    }

    /// Attributes and attests the connecting process and resolves its
    /// identity; also says how (`cached`, `fresh`, `unattested`). A kept
    /// attestation is checked inline; a full one reads /proc and may hash
    /// an executable, so it runs on the blocking pool. A container's name
    /// and image come from its runtime (bounded wait) before the mappings
    /// are consulted, as rules may select on them.
    async fn identify(&self, record: gateway_common::ConnRecord) -> (Caller, &'static str) {
        let needs = self.services.identities.needs();
        let cache = self.services.attestations.clone();
        let (mut attestation, how) = match cache.as_ref().and_then(|c| c.lookup(&record, needs)) {
            Some(kept) => (Attestation::Attested(Box::new(kept)), "cached"),
            None => {
                let attestor = self.services.attestor.clone();
                let started = Instant::now();
                let attested = tokio::task::spawn_blocking(move || match cache {
                    Some(cache) => cache.attest(&attestor, &record, needs),
                    None => attestor.attest_with(&record, needs),
                })
                .await
                .unwrap_or_else(|e| Attestation::Unattested { reason: format!("attestation task failed: {e}") });
                self.services.gate.metrics.attestation(started.elapsed());
                (attested, "fresh")
            }
        };
        if self.services.attestations.is_some() {
            self.services.gate.metrics.attestation_cache(how == "cached");
        }
        if let Attestation::Attested(a) = &mut attestation {
            self.services.containers.enrich(a).await;
        }
        let identity = self.services.identities.resolve(&attestation);
        match attestation {
            Attestation::Attested(a) => {
                let process = Arc::new(ProcessInfo::from_attested(&record, &a));
                (Caller { process, identity, job: a.env }, how)
            }
            Attestation::Unattested { reason } => {
                tracing::warn!(pid = record.tgid, reason, "connection is unattested");
                // Whatever /proc still shows, for the event; never used for identity.
                let process = Arc::new(ProcessInfo::from_record(&record));
                (Caller { process, identity, job: Default::default() }, "unattested")
            }
        }
    }

    /// The record is written before the handshake completes, so it is
    /// normally there at once; the retries cover scheduling hiccups.
    async fn await_record(&self, peer: SocketAddr, local_port: u16, netns: u64) -> Option<gateway_common::ConnRecord> {
        let deadline = Instant::now() + self.config.attribution_timeout;
        let mut pause = Duration::from_micros(200);
        loop {
            if let Some(record) = self.interceptor.take_record(peer, local_port, netns) {
                return Some(record);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

/// The result of handling one connection, for its event.
pub(super) struct Handled {
    pub protocol: Protocol,
    pub sni: Option<String>,
    pub requests: Option<u64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub outcome: Outcome,
    pub error: Option<String>,
}

impl Handled {
    fn new(protocol: Protocol) -> Handled {
        Handled {
            protocol,
            sni: None,
            requests: None,
            bytes_up: 0,
            bytes_down: 0,
            outcome: Outcome::Closed,
            error: None,
        }
    }

    fn failed(mut self, outcome: Outcome, error: impl std::fmt::Display) -> Handled {
        self.outcome = outcome;
        self.error = Some(error.to_string());
        self
    }

    /// The gate refused the connection.
    fn refused(self, refusal: &Refusal) -> Handled {
        self.failed(Outcome::Blocked, refusal)
    }
}

/// Connects to `dst` from a socket carrying the gateway's mark, so the
/// connect hooks never redirect it back into the proxy.
/// Observes the connect's duration in `metrics` when it succeeds.
pub async fn connect_upstream(
    dst: SocketAddr,
    mark: u32,
    timeout: Duration,
    metrics: &crate::metrics::Metrics,
) -> io::Result<TcpStream> {
    let started = Instant::now();
    let sock =
        socket2::Socket::new(socket2::Domain::for_address(dst), socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    sock.set_mark(mark)?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    let std_stream: std::net::TcpStream = sock.into();
    let socket = tokio::net::TcpSocket::from_std_stream(std_stream);
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(result) => {
            if result.is_ok() {
                metrics.upstream_connect(started.elapsed());
            }
            result
        }
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {dst} timed out after {timeout:?}"))),
    }
}

/// Listeners opened in other network namespaces feed the same accept loop.
impl netns::ListenerSink for Proxy {
    fn accept_on(self: Arc<Self>, listener: std::net::TcpListener, stop: CancellationToken) {
        match TcpListener::from_std(listener) {
            // Stops with the namespace or with the gateway, whichever is first.
            Ok(listener) => {
                let tracker = self.tracker.clone();
                tracker.spawn(self.accept_loop(listener, stop));
            }
            Err(e) => tracing::error!(error = %e, "cannot register a namespace listener"),
        }
    }
}

/// Binds the proxy's listeners in the gateway's own namespace.
pub fn bind_listeners(config: &ProxyConfig) -> io::Result<Vec<TcpListener>> {
    let mut addrs = vec![SocketAddr::from((config.listen_v4, config.port))];
    if let Some(v6) = config.listen_v6 {
        addrs.push(SocketAddr::from((v6, config.port)));
    }
    addrs.into_iter().map(|addr| TcpListener::from_std(netns::bind_listener(addr)?)).collect()
}
