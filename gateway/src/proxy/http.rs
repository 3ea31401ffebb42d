//! The HTTP protocol handler: translates each intercepted HTTP request into
//! the gate's facts (judged host, method, normalised path, headers, the keys
//! in its head and body) and the gate's decisions back into HTTP (403, 401,
//! 400, 415, a swapped credential, a held request, a masked response).
//!
//! It decides nothing itself: every decision is the gate's
//! ([`crate::enforce::gate`]). What it cannot inspect (a body it cannot
//! decode, an upgrade it cannot follow) it reports to the gate as
//! [`Uninspectable`], which refuses unless the policy opted the
//! destination out.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use serde_json::json;

use crate::{
    credentials::{apply_swap, RenderedInjection, SwapTarget},
    detect::{
        http_scan::{self, BodyLimits, BodyScanner, Hit},
        ScanStatus, WsConfig, WsScanner,
    },
    enforce::redact::{redact_body, Redaction},
    enforce::{
        lock, ApprovalAsk, ExchangeWatch, HttpAsk, Judged, Passage, Reason, Refusal, RequestDecision, RequestSummary,
        SharedCapture, Uninspectable, WatchSpec, OIDC_TARGET,
    },
    event::{Outcome, Protocol},
    http::{
        BodyEdit, BodyInspector, BodyVerdict, BoxFuture, HeadVerdict, HttpContext, Inspector, ResponseInspector,
        ResponseVerdict, Tunnel, TunnelInspector, TunnelVerdict,
    },
    policy,
    record::{DecisionFacts, ExchangeRecord, RecordLevel, TlsFacts},
    tls,
};

use super::{
    http_refusal::{render, ClientKind},
    tcp::RawScan,
    Handled, Intercepted, PlainConnector, Proxy, TlsConnector,
};

/// Upper bound on the client's TLS handshake with the gateway.
const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

impl Proxy {
    /// Terminates TLS for an intercepted server name (with a leaf the
    /// gateway CA mints for it) and serves the HTTP inside.
    pub(super) async fn intercept_tls(
        &self,
        conn: Intercepted,
        mut passage: Passage,
        hello: tls::ClientHelloInfo,
    ) -> Handled {
        let mut handled = Handled::new(Protocol::Https);
        // Without SNI (intercepted by configuration) the certificate names the address.
        let name = hello.sni.clone().unwrap_or_else(|| conn.orig_dst.ip().to_string());
        handled.sni = hello.sni.clone();
        let server_config = match self.services.leaf_cache.server_config(&name, &hello.alpn) {
            Ok(c) => c,
            Err(e) => return handled.failed(Outcome::Error, format!("minting a certificate for {name}: {e}")),
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
        let stream = match tokio::time::timeout(CLIENT_HANDSHAKE_TIMEOUT, acceptor.accept(conn.client)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return handled.failed(Outcome::Error, format!("client TLS handshake: {e}")),
            Err(_) => return handled.failed(Outcome::Error, "client TLS handshake timed out"),
        };
        let tls_conn = stream.get_ref().1;
        let client_h2 = tls_conn.alpn_protocol() == Some(b"h2".as_slice());
        let tls_facts = TlsFacts {
            version: tls_conn.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default(),
            cipher: tls_conn.negotiated_cipher_suite().map(|c| format!("{:?}", c.suite())).unwrap_or_default(),
            alpn: tls_conn.alpn_protocol().map(|a| String::from_utf8_lossy(a).into_owned()),
        };
        passage.start_session(Protocol::Https, &name.to_ascii_lowercase(), hello.sni.clone(), Some(tls_facts));
        let connector = TlsConnector {
            dst: conn.orig_dst,
            mark: self.config.upstream_mark,
            timeout: self.config.connect_timeout,
            server_name: name.clone(),
            tls: self.services.upstream_tls.clone(),
            metrics: self.services.gate.metrics.clone(),
        };
        let ctx = HttpContext { conn_id: conn.id, server_name: name, orig_dst: conn.orig_dst, tls: true };
        self.serve_http(stream, Some(client_h2), ctx, passage, connector, handled).await
    }

    /// Serves plaintext HTTP (HTTP/1.x, or HTTP/2 with prior knowledge).
    pub(super) async fn serve_plain_http(&self, conn: Intercepted, mut passage: Passage) -> Handled {
        let connector = PlainConnector {
            dst: conn.orig_dst,
            mark: self.config.upstream_mark,
            timeout: self.config.connect_timeout,
            metrics: self.services.gate.metrics.clone(),
        };
        // The Host header names the server; the engine falls back to it.
        let ctx = HttpContext { conn_id: conn.id, server_name: String::new(), orig_dst: conn.orig_dst, tls: false };
        passage.start_session(Protocol::Http, &conn.orig_dst.ip().to_string(), None, None);
        self.serve_http(conn.client, None, ctx, passage, connector, Handled::new(Protocol::Http)).await
    }

    async fn serve_http<IO, U>(
        &self,
        io: IO,
        client_h2: Option<bool>,
        ctx: HttpContext,
        passage: Passage,
        connector: U,
        mut handled: Handled,
    ) -> Handled
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        U: crate::http::UpstreamConnector,
    {
        let passage = Arc::new(passage);
        let inspector = Arc::new(HttpGate::new(passage.clone(), &self.services.http_limits));
        let result =
            crate::http::serve(io, client_h2, ctx, inspector, connector, self.services.http_limits.clone()).await;
        if passage.refused() > 0 {
            handled.outcome = Outcome::Blocked;
        }
        let handled = match result {
            Ok(stats) => {
                handled.requests = Some(stats.requests);
                handled.bytes_up = stats.bytes_up;
                handled.bytes_down = stats.bytes_down;
                handled
            }
            Err(e) => {
                if let Some(s) = passage.session() {
                    s.event(crate::record::EventKind::Error, json!({ "error": e.to_string() }));
                }
                handled.failed(Outcome::Error, e)
            }
        };
        passage.end_session(handled.outcome.into(), handled.bytes_up, handled.bytes_down);
        handled
    }
}

/// Shown to approvers: enough to judge, small enough for a webhook.
const APPROVAL_PREVIEW_BYTES: usize = 4096;

/// The [`Inspector`] of one intercepted HTTP connection.
pub(super) struct HttpGate {
    passage: Arc<Passage>,
    /// Requests seen on the connection (numbers exchanges in the recording).
    requests: AtomicU64,
    /// The largest WebSocket message followed: it is held whole until
    /// judged, like a buffered body (`proxy.limits.max_buffered_body_bytes`).
    max_ws_message: usize,
    /// Request header lines of this connection found clean, not scanned
    /// again ([`http_scan::CleanHeaders`]).
    clean_headers: std::sync::Mutex<http_scan::CleanHeaders>,
}

impl HttpGate {
    /// The inspector of the connection going through `passage`.
    pub(super) fn new(passage: Arc<Passage>, limits: &crate::http::Limits) -> HttpGate {
        let max_ws_message = limits.max_buffered_body.min(passage.gate().body_limits.max_decoded);
        HttpGate { passage, requests: AtomicU64::new(0), max_ws_message, clean_headers: Default::default() }
    }
}

/// The host a request names: the TLS server name, else the request's
/// authority or `Host`, as the policy reads hosts ([`policy::judged_host`]).
/// `None` when it names none (the gate then judges it by its address); an
/// error when the name is one servers could read another way (userinfo,
/// invalid characters): refused, never judged by a guess.
pub(crate) fn judged_host(
    ctx: &HttpContext,
    parts: &http::request::Parts,
) -> Result<Option<String>, policy::HostError> {
    if !ctx.server_name.is_empty() {
        return policy::judged_host(&ctx.server_name).map(|h| Some(h.into_owned()));
    }
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()));
    match authority {
        Some(a) => policy::judged_host(a.trim()).map(|h| Some(h.into_owned())),
        None => Ok(None),
    }
}

fn path_and_query(parts: &http::request::Parts) -> &str {
    parts.uri.path_and_query().map_or("/", |p| p.as_str())
}

/// What one request carries from its head to its body inspection.
struct RequestState {
    judged: Judged,
    capture: SharedCapture,
    /// What the policy allows for content the gateway cannot decode.
    uninspectable: policy::Uninspectable,
}

impl HttpGate {
    /// Validates an ID token the job presents in the configured header. The
    /// header never goes upstream; a token that does not validate is
    /// refused. Returns the verified claims to bind to the request.
    async fn verify_presented_token(
        &self,
        parts: &mut http::request::Parts,
    ) -> Result<BTreeMap<String, String>, Refusal> {
        let gate = self.passage.gate();
        let conn_id = self.passage.conn().id;
        let caller = &self.passage.conn().caller;
        let Some(value) = parts.headers.remove(&gate.oidc_header) else {
            return Ok(BTreeMap::new());
        };
        let Some(validator) = &gate.oidc else {
            tracing::warn!(target: OIDC_TARGET, conn_id, "an ID token was presented but no OIDC issuer is configured; token dropped");
            return Ok(BTreeMap::new());
        };
        let token = value.to_str().unwrap_or_default().trim();
        let token = token.strip_prefix("Bearer ").unwrap_or(token);
        // Boxed: only requests that present a token pay for its future.
        match Box::pin(validator.validate(token)).await {
            Ok(claims) => {
                tracing::info!(
                    target: OIDC_TARGET,
                    conn_id,
                    issuer = claims.issuer,
                    subject = claims.subject,
                    identity = caller.identity.uri,
                    "ID token verified"
                );
                let mut verified = claims.attributes;
                verified.insert("sub".into(), claims.subject);
                verified.insert("iss".into(), claims.issuer);
                Ok(verified)
            }
            Err(e) => {
                tracing::warn!(
                    target: OIDC_TARGET,
                    conn_id,
                    code = e.code(),
                    reason = %e,
                    identity = caller.identity.uri,
                    pid = caller.process.pid,
                    "ID token rejected"
                );
                let message = format!("The CI gateway rejected the identity token this request presented: {e}.");
                Err(self.passage.refuse(Reason::InvalidToken { code: e.code(), message }, "oidc"))
            }
        }
    }

    /// The request line as a recording may keep it (secrets masked); empty
    /// when the connection is not recorded.
    fn summarize(&self, parts: &http::request::Parts) -> RequestSummary {
        if self.passage.session().is_none() {
            return RequestSummary {
                method: String::new(),
                url: String::new(),
                rpc: None,
                headers: Vec::new(),
                started: std::time::SystemTime::now(),
            };
        }
        RequestSummary {
            method: parts.method.to_string(),
            url: self.masked_url(parts),
            rpc: policy::rpc_method(
                parts.method.as_str(),
                path_and_query(parts),
                parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()),
            )
            .map(|rpc| self.passage.gate().recording_masker().mask_text(rpc).into_owned()),
            headers: Vec::new(),
            started: std::time::SystemTime::now(),
        }
    }

    /// Request headers as a recording may keep them: secrets masked,
    /// credentials redacted.
    fn recorded_headers(&self, headers: &http::HeaderMap) -> Vec<(String, String)> {
        crate::enforce::recorded_headers(self.passage.gate().recording_masker(), headers)
    }

    fn masked_url(&self, parts: &http::request::Parts) -> String {
        // Remembered per thread when clean: a keep-alive connection asks
        // for the same paths again and again.
        self.passage.gate().recording_masker().mask_text_remembered(path_and_query(parts)).into_owned()
    }

    /// Static keys in a request head.
    fn head_hits(&self, parts: &http::request::Parts) -> Vec<Hit> {
        let detector = &self.passage.gate().detector;
        let mut hits = {
            // Poisoned only by a panic mid-scan: what it holds is still sound.
            let mut clean = self.clean_headers.lock().unwrap_or_else(|p| p.into_inner());
            http_scan::scan_head_remembering(detector, &parts.method, &parts.uri, &parts.headers, &mut clean)
        };
        // The gateway issues no credentials of its own yet, so every
        // credential in an authentication header is a static one.
        hits.extend(http_scan::unknown_credentials(detector, &parts.headers, |_| false));
        hits
    }

    /// Records a request refused at its head (no watch follows it).
    fn record_refusal(
        &self,
        stream: u64,
        request: RequestSummary,
        response: &http::Response<Bytes>,
        refusal: &Refusal,
        rule: &str,
    ) {
        let Some(session) = self.passage.session() else { return };
        session.exchange(ExchangeRecord {
            level: RecordLevel::Metadata,
            stream,
            started: request.started,
            duration: request.started.elapsed().unwrap_or_default(),
            method: request.method,
            url: request.url,
            status: response.status().as_u16(),
            outcome: crate::http::ExchangeOutcome::Blocked,
            rpc: request.rpc,
            request_headers: Vec::new(),
            request_body: Bytes::new(),
            request_body_size: 0,
            response_headers: Vec::new(),
            response_body: Bytes::new(),
            response_body_size: response.body().len() as u64,
            decision: Some(DecisionFacts { rule: rule.to_owned(), action: refusal.reason.code().to_owned() }),
            findings: Vec::new(),
        });
    }

    /// Refuses a request at its head: renders and records the refusal, and
    /// still turns the keys in its head and body into findings (a key the
    /// job sent is one to rotate, whether or not the request went anywhere).
    async fn refuse_head(
        &self,
        stream: u64,
        summary: RequestSummary,
        parts: &http::request::Parts,
        judged: Judged,
        refusal: Refusal,
        rule: &str,
    ) -> HeadVerdict<BodyGate, GatedResponse> {
        let client = ClientKind::of(parts);
        let response = render(&refusal, client);
        self.record_refusal(stream, summary, &response, &refusal, rule);
        let judged = Judged { static_keys: Some(crate::findings::Action::Block), ..judged };
        let hits = self.head_hits(parts);
        let mut refused = refusal;
        if !hits.is_empty() {
            if let Some(more) = Box::pin(self.passage.judge(&judged, hits, None)).await.refusal {
                merge(&mut refused, more);
            }
        }
        let body = BodyGate::draining(self.passage.clone(), judged, SharedCapture::default(), parts, refused);
        HeadVerdict::RespondAfterBody { response, body, watch: None }
    }
}

/// Folds a later refusal of the same request into the first: the keys of
/// both are listed; otherwise the first reason stands.
fn merge(first: &mut Refusal, later: Refusal) {
    // A refusal for another reason that also carried keys: the keys are
    // recorded as findings; the response keeps the first reason.
    if let (Reason::StaticCredential { findings, more }, Reason::StaticCredential { findings: f, more: m }) =
        (&mut first.reason, later.reason)
    {
        findings.extend(f);
        *more += m;
    }
}

impl Inspector for HttpGate {
    type Body = BodyGate;
    type Response = GatedResponse;

    async fn inspect_head(
        &self,
        ctx: &HttpContext,
        parts: &mut http::request::Parts,
    ) -> HeadVerdict<BodyGate, GatedResponse> {
        let stream = self.requests.fetch_add(1, Ordering::Relaxed);
        // Before the OIDC header is removed; headers only once the policy
        // says the exchange is recorded in full.
        let mut summary = self.summarize(parts);
        let named = match judged_host(ctx, parts) {
            Ok(named) => named,
            Err(why) => {
                let reason = Reason::AmbiguousHost { detail: why.to_string() };
                let refusal = self.passage.refuse(reason, "host");
                let host = self.passage.destination_host(None);
                let judged = Judged { host, verified: BTreeMap::new(), static_keys: None };
                return Box::pin(self.refuse_head(stream, summary, parts, judged, refusal, "host")).await;
            }
        };
        let host_named = named.is_some();
        let host = named.unwrap_or_else(|| self.passage.destination_host(None));
        let verified = match self.verify_presented_token(parts).await {
            Ok(v) => v,
            Err(refusal) => {
                let judged = Judged { host, verified: BTreeMap::new(), static_keys: None };
                return Box::pin(self.refuse_head(stream, summary, parts, judged, refusal, "oidc")).await;
            }
        };
        let facts = HttpAsk {
            method: parts.method.as_str(),
            target: path_and_query(parts),
            headers: &parts.headers,
            host_named,
        };
        let decision = self.passage.request(&host, ctx.tls, &verified, facts);
        let RequestDecision { decided, static_keys, mask, record, approval, uninspectable, inspect, credential } =
            match decision {
                Ok(d) => d,
                Err((reason, rule)) => {
                    let refusal = self.passage.refuse(reason, &rule);
                    let judged = Judged { host, verified, static_keys: None };
                    return Box::pin(self.refuse_head(stream, summary, parts, judged, refusal, &rule)).await;
                }
            };
        let tunnel = match self.upgrade_plan(parts, uninspectable) {
            Ok(plan) => plan,
            Err(why) => {
                let refusal = self.passage.refuse(Reason::Uninspectable(why), "uninspectable");
                let judged = Judged { host, verified, static_keys };
                return Box::pin(self.refuse_head(stream, summary, parts, judged, refusal, "uninspectable")).await;
            }
        };
        if record == RecordLevel::Full && self.passage.session().is_some() {
            summary.headers = self.recorded_headers(&parts.headers);
        }
        if mask.is_some() {
            // Only encodings the masker can decode and re-encode may come back.
            restrict_accept_encoding(&mut parts.headers);
        }
        let capture = SharedCapture::default();
        lock(&capture).encoding =
            parts.headers.get(http::header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let judged = Judged { host, verified, static_keys };
        let mut tunnel = tunnel;
        if let TunnelPlan::WebSocket(_, ws, _) = &mut tunnel {
            *ws = judged.clone();
        }
        let gate = self.passage.gate();
        let watch = ExchangeWatch::new(WatchSpec {
            conn_id: ctx.conn_id,
            stream,
            session: self.passage.session().cloned(),
            level: record,
            decision: decided,
            request: summary,
            capture: capture.clone(),
            mask,
            recording: gate.recording_masker().clone(),
            cap: gate.record_body_cap,
        });
        if !inspect {
            // Not a protected destination (a name reached only because its
            // port is captured): judged by the policy, not scanned for keys.
            let response = GatedResponse { watch, tunnel: TunnelPlan::Pass };
            return HeadVerdict::Forward { body: None, response: Some(response) };
        }
        let watch = GatedResponse { watch, tunnel };
        let hits = self.head_hits(parts);
        let mut swapped = false;
        // Before anything is swapped or injected: the job's own head.
        let client = ClientKind::of(parts);
        if !hits.is_empty() {
            let mut swap = |targets: &[SwapTarget], rendered: &RenderedInjection| {
                apply_swap(parts, targets, rendered)
                    .map(|outcome| tracing::debug!(removed = outcome.removed, "credential swapped in the request head"))
                    .map_err(|e| e.to_string())
            };
            // Boxed, like every await taken only when something was found:
            // a request future is as large as its largest await, and it is
            // moved (copied whole) into place for every request.
            let judgement = Box::pin(self.passage.judge(&judged, hits, Some(&mut swap))).await;
            lock(&capture).findings.extend(judgement.findings);
            swapped = judgement.swapped;
            if let Some(refusal) = judgement.refusal {
                // The watch records the blocked exchange when it finishes;
                // the body is still read for its keys.
                let response = render(&refusal, client);
                let body = BodyGate::draining(self.passage.clone(), judged, capture, parts, refusal);
                return HeadVerdict::RespondAfterBody { response, body, watch: Some(watch) };
            }
        }
        if credential == policy::CredentialUse::Inject && !swapped {
            // The job sent no key (or a placeholder, or one flagged): the
            // held credential goes in all the same.
            let mut inject = |targets: &[SwapTarget], rendered: &RenderedInjection| {
                apply_swap(parts, targets, rendered).map(|_| ()).map_err(|e| e.to_string())
            };
            // Boxed, like every await only some requests reach.
            if let Err(refusal) = Box::pin(self.passage.inject(&judged, &mut inject)).await {
                let response = render(&refusal, client);
                let body = BodyGate::draining(self.passage.clone(), judged, capture, parts, refusal);
                return HeadVerdict::RespondAfterBody { response, body, watch: Some(watch) };
            }
        }
        let scanner = BodyScanner::new(gate.detector.clone(), &parts.headers, gate.body_limits);
        // Approvers see the URL masked; nobody else needs it here.
        let url = if approval.is_some() { self.masked_url(parts) } else { String::new() };
        let body = BodyGate {
            passage: self.passage.clone(),
            req: RequestState { judged, capture, uninspectable },
            scanner: Scan::Decoded(scanner),
            approval,
            method: parts.method.to_string(),
            url,
            refused: None,
            // The head as the job sent it (a swap or an injection changes
            // only credential headers, which do not tell clients apart).
            client,
            redactions: Vec::new(),
            streaming: false,
            framing: body_framing(&parts.headers),
        };
        HeadVerdict::Forward { body: Some(body), response: Some(watch) }
    }

    fn on_exchange(&self, _ctx: &HttpContext, exchange: &crate::http::Exchange) {
        if let Some(took) = exchange.response_head {
            self.passage.gate().metrics.upstream_response(took);
        }
    }
}

impl HttpGate {
    /// What happens if upstream accepts the request's `Upgrade`: `h2c` is
    /// declined (its headers removed: the request is served as HTTP/1.1,
    /// which RFC 9110 §7.8 allows); anything else the gateway cannot follow
    /// is refused unless the policy opted the destination out.
    fn upgrade_plan(
        &self,
        parts: &mut http::request::Parts,
        uninspectable: policy::Uninspectable,
    ) -> Result<TunnelPlan, Uninspectable> {
        let Some(upgrade) = parts.headers.get(http::header::UPGRADE) else { return Ok(TunnelPlan::None) };
        let protocol = String::from_utf8_lossy(upgrade.as_bytes()).trim().to_ascii_lowercase();
        let tokens: Vec<&str> = protocol.split(',').map(str::trim).filter(|t| !t.is_empty()).collect();
        if tokens.iter().all(|t| *t == "h2c") {
            decline_upgrade(&mut parts.headers);
            return Ok(TunnelPlan::None);
        }
        if tokens == ["websocket"] && uninspectable != policy::Uninspectable::Pass {
            // The judged request is filled in once the head is judged.
            let judged = Judged { host: String::new(), verified: BTreeMap::new(), static_keys: None };
            return Ok(TunnelPlan::WebSocket(self.passage.clone(), judged, self.max_ws_message));
        }
        match uninspectable {
            policy::Uninspectable::Pass => Ok(TunnelPlan::Pass),
            policy::Uninspectable::ScanRaw => Ok(TunnelPlan::ScanRaw(self.passage.clone())),
            policy::Uninspectable::Refuse => Err(Uninspectable::Upgrade { protocol }),
        }
    }
}

/// Removes an upgrade offer from a request head.
fn decline_upgrade(headers: &mut http::HeaderMap) {
    headers.remove(http::header::UPGRADE);
    headers.remove("http2-settings");
    let kept: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("upgrade") && !t.eq_ignore_ascii_case("http2-settings"))
        .map(str::to_owned)
        .collect();
    headers.remove(http::header::CONNECTION);
    if let Ok(v) = http::HeaderValue::from_str(&kept.join(", ")) {
        if !kept.is_empty() {
            headers.insert(http::header::CONNECTION, v);
        }
    }
}

/// What a request's tunnel would be, decided with its head.
enum TunnelPlan {
    /// The request asks for no upgrade: a 101 from upstream is refused.
    None,
    /// Relayed as is (the policy opted the destination out).
    Pass,
    /// The client's bytes are scanned raw (`uninspectable: scan_raw`).
    ScanRaw(Arc<Passage>),
    /// A WebSocket: every client message is decoded and scanned, and
    /// released only once judged.
    WebSocket(Arc<Passage>, Judged, usize),
}

/// The response side of one request: the recording watch, and what an
/// upgrade becomes.
pub(super) struct GatedResponse {
    watch: ExchangeWatch,
    tunnel: TunnelPlan,
}

impl ResponseInspector for GatedResponse {
    fn head(&mut self, parts: &mut http::response::Parts) -> ResponseVerdict {
        self.watch.head(parts)
    }
    fn observe(&mut self, data: &Bytes) {
        self.watch.observe(data)
    }
    fn chunk(&mut self, data: Bytes) -> Result<Bytes, String> {
        self.watch.chunk(data)
    }
    fn trailers(&mut self, trailers: &mut http::HeaderMap) {
        self.watch.trailers(trailers)
    }
    fn end(&mut self) -> Result<Bytes, String> {
        self.watch.end()
    }
    fn finish(&mut self, exchange: &crate::http::Exchange) {
        self.watch.finish(exchange)
    }
    fn upgraded(&mut self, headers: &http::HeaderMap) -> Tunnel {
        match &self.tunnel {
            TunnelPlan::Pass => Tunnel::Pass,
            TunnelPlan::ScanRaw(passage) => Tunnel::Inspect(Box::new(RawTunnel::new(passage.clone()))),
            TunnelPlan::WebSocket(passage, judged, max_message) => {
                let limits = BodyLimits { max_decoded: *max_message };
                let config = WsConfig::from_handshake(headers, limits);
                let scanner = WsScanner::new(passage.gate().detector.clone(), config);
                let ws = WsTunnel { passage: passage.clone(), judged: judged.clone(), scanner, released: 0 };
                Tunnel::Inspect(Box::new(ws))
            }
            TunnelPlan::None => {
                let mut this = crate::http::PassResponses;
                ResponseInspector::upgraded(&mut this, headers)
            }
        }
    }
}

/// The client's side of a tunnel the policy lets through only scanned
/// (`uninspectable: scan_raw`): a key whose action blocks ends it.
struct RawTunnel {
    passage: Arc<Passage>,
    scan: RawScan,
    judged: Judged,
}

impl RawTunnel {
    fn new(passage: Arc<Passage>) -> RawTunnel {
        let host = passage.destination_host(None);
        let scan = RawScan::new(passage.gate().detector.clone());
        RawTunnel { passage, scan, judged: Judged { host, verified: BTreeMap::new(), static_keys: None } }
    }

    async fn verdict(&mut self, hits: Vec<Hit>, release_all: bool) -> TunnelVerdict {
        if !hits.is_empty() && self.passage.judge(&self.judged, hits, None).await.refusal.is_some() {
            return TunnelVerdict::Close(Bytes::new());
        }
        TunnelVerdict::Release(self.scan.release(release_all))
    }
}

impl TunnelInspector for RawTunnel {
    fn feed<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, TunnelVerdict> {
        Box::pin(async move {
            let hits = self.scan.feed(data);
            self.verdict(hits, false).await
        })
    }
    fn idle(&mut self) -> BoxFuture<'_, TunnelVerdict> {
        Box::pin(async move { TunnelVerdict::Release(self.scan.release(true)) })
    }
    fn finish(&mut self) -> BoxFuture<'_, TunnelVerdict> {
        Box::pin(async move {
            let hits = self.scan.finish();
            self.verdict(hits, true).await
        })
    }
}

/// The client's side of a WebSocket: each message is decoded (framing,
/// masking, permessage-deflate) and scanned, and its bytes go upstream only
/// once the whole message is judged. A key whose action blocks ends the
/// connection with a close frame (1008, policy violation); so does data the
/// scanner cannot follow (broken framing, an unknown extension, a message
/// over the limit): masked frames defeat a raw scan, so `scan_raw` does not
/// help here and only `uninspectable: pass` opts a WebSocket out.
struct WsTunnel {
    passage: Arc<Passage>,
    judged: Judged,
    scanner: WsScanner,
    /// Bytes released upstream so far.
    released: u64,
}

/// A WebSocket close frame from the server side (unmasked): 1008, policy
/// violation, with a short reason.
fn ws_close(reason: &str) -> Bytes {
    let reason = &reason.as_bytes()[..reason.len().min(120)];
    let mut frame = vec![0x88, (reason.len() + 2) as u8, 0x03, 0xf0];
    frame.extend_from_slice(reason);
    Bytes::from(frame)
}

impl WsTunnel {
    async fn verdict(&mut self, hits: Vec<Hit>) -> TunnelVerdict {
        if !hits.is_empty() {
            let judgement = self.passage.judge(&self.judged, hits, None).await;
            if let Some(refusal) = judgement.refusal {
                tracing::info!(
                    conn_id = self.passage.conn().id,
                    code = refusal.reason.code(),
                    "WebSocket message refused"
                );
                return TunnelVerdict::Close(ws_close("blocked by the CI gateway: a static credential"));
            }
        }
        if let ScanStatus::Uninspectable(why) = self.scanner.status() {
            let why = Reason::Uninspectable(Uninspectable::WebSocket { detail: why.to_string() });
            let refusal = self.passage.refuse(why, "uninspectable");
            tracing::info!(conn_id = refusal.conn_id, "WebSocket refused: {}", refusal.message());
            return TunnelVerdict::Close(ws_close("refused by the CI gateway: uninspectable WebSocket data"));
        }
        let through = self.scanner.scanned_through();
        let n = usize::try_from(through - self.released).unwrap_or(usize::MAX);
        self.released = through;
        TunnelVerdict::Release(n)
    }
}

impl TunnelInspector for WsTunnel {
    fn feed<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, TunnelVerdict> {
        Box::pin(async move {
            let hits = self.scanner.feed(data);
            self.verdict(hits).await
        })
    }
    fn idle(&mut self) -> BoxFuture<'_, TunnelVerdict> {
        // Only whole messages go: an incomplete one waits for its end.
        Box::pin(async { TunnelVerdict::Release(0) })
    }
    fn finish(&mut self) -> BoxFuture<'_, TunnelVerdict> {
        Box::pin(async move {
            let hits = self.scanner.finish();
            self.verdict(hits).await
        })
    }
}

/// Keeps only the content codings the masker handles in `Accept-Encoding`
/// (`identity` when none remain), so that upstream never answers in one it
/// cannot mask.
fn restrict_accept_encoding(headers: &mut http::HeaderMap) {
    let supported: Vec<&str> = crate::mask::supported_encodings().split(',').map(str::trim).collect();
    let accepted: Vec<String> = headers
        .get_all(http::header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|item| item.trim().to_owned())
        .filter(|item| {
            let coding = item.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            supported.contains(&coding.as_str())
        })
        .collect();
    let value = if accepted.is_empty() { "identity".to_owned() } else { accepted.join(", ") };
    headers.remove(http::header::ACCEPT_ENCODING);
    if let Ok(v) = http::HeaderValue::from_str(&value) {
        headers.insert(http::header::ACCEPT_ENCODING, v);
    }
}

/// How a body is scanned.
enum Scan {
    /// Decoded as its headers and its content say.
    Decoded(BodyScanner),
    /// As raw bytes: the body could not be decoded and the policy says
    /// `uninspectable: scan_raw` for the destination.
    Raw(RawScan),
    /// Not at all: the policy says `uninspectable: pass`.
    Off,
}

/// Scans one request body as it streams, keeps its start for the
/// recording, and holds the request for approval when the policy says so.
pub(super) struct BodyGate {
    passage: Arc<Passage>,
    req: RequestState,
    scanner: Scan,
    /// (rule, spec) when the request needs approval.
    approval: Option<(String, policy::ApprovalSpec)>,
    method: String,
    url: String,
    /// Set once the request is refused: the rest of the body is still
    /// scanned (by the engine's drain) and its keys recorded and listed.
    refused: Option<Refusal>,
    /// The client, for the shape of a refusal.
    client: ClientKind,
    /// Keys the gate decided to redact, replaced once the whole body is in.
    redactions: Vec<Redaction>,
    /// Set once the body streams (too large to hold): nothing can be
    /// redacted from then on.
    streaming: bool,
    /// The request's `Content-Type` and `Content-Encoding`: how a
    /// redacted body is re-encoded and rescanned.
    framing: http::HeaderMap,
}

/// The headers a body's redaction depends on.
fn body_framing(headers: &http::HeaderMap) -> http::HeaderMap {
    let mut framing = http::HeaderMap::new();
    for name in [http::header::CONTENT_TYPE, http::header::CONTENT_ENCODING] {
        for value in headers.get_all(&name) {
            framing.append(name.clone(), value.clone());
        }
    }
    framing
}

impl BodyGate {
    /// The body inspector of a request refused at its head: it only looks
    /// for keys (each one a finding, listed in the refusal).
    fn draining(
        passage: Arc<Passage>,
        judged: Judged,
        capture: SharedCapture,
        head: &http::request::Parts,
        refusal: Refusal,
    ) -> BodyGate {
        let gate = passage.gate();
        let scanner = BodyScanner::new(gate.detector.clone(), &head.headers, gate.body_limits);
        BodyGate {
            req: RequestState { judged, capture, uninspectable: policy::Uninspectable::Pass },
            scanner: Scan::Decoded(scanner),
            approval: None,
            method: String::new(),
            url: String::new(),
            refused: Some(refusal),
            client: ClientKind::of(head),
            redactions: Vec::new(),
            streaming: false,
            framing: http::HeaderMap::new(),
            passage,
        }
    }

    async fn verdict(&mut self, hits: Vec<Hit>) -> BodyVerdict {
        if self.refused.is_none() {
            self.refused = self.understood();
        }
        if !hits.is_empty() {
            let judgement = if self.refused.is_some() {
                // Refused anyway: nothing will be forwarded to redact.
                Box::pin(self.passage.judge(&self.req.judged, hits, None)).await
            } else {
                let streaming = self.streaming;
                let pending = &mut self.redactions;
                let mut redact = |found: Vec<Redaction>| {
                    if streaming {
                        return Err("the body is larger than the gateway holds and already streams".to_owned());
                    }
                    pending.extend(found);
                    Ok(())
                };
                Box::pin(self.passage.judge_body(&self.req.judged, hits, &mut redact)).await
            };
            lock(&self.req.capture).findings.extend(judgement.findings);
            if let Some(refusal) = judgement.refusal {
                match &mut self.refused {
                    Some(first) => merge(first, refusal),
                    None => self.refused = Some(refusal),
                }
            }
        }
        match &self.refused {
            Some(refusal) => BodyVerdict::Respond(render(refusal, self.client)),
            None => BodyVerdict::Continue,
        }
    }

    /// Feeds `chunk` to the scanner in use. A decoded scan that stops
    /// understanding the body falls back, at once, to what the policy
    /// allows for the destination: raw scanning (from this chunk on, so no
    /// byte that could still go upstream escapes it) or none; by default
    /// [`understood`](Self::understood) refuses.
    fn scan(&mut self, chunk: &[u8]) -> Vec<Hit> {
        let mut hits = match &mut self.scanner {
            Scan::Decoded(s) => s.feed(chunk),
            Scan::Raw(s) => s.feed(chunk),
            Scan::Off => Vec::new(),
        };
        if matches!(&self.scanner, Scan::Decoded(s) if !s.status().is_complete()) {
            match self.req.uninspectable {
                policy::Uninspectable::Refuse => {}
                policy::Uninspectable::ScanRaw => {
                    let mut raw = RawScan::new(self.passage.gate().detector.clone());
                    hits.extend(raw.feed(chunk));
                    self.scanner = Scan::Raw(raw);
                }
                policy::Uninspectable::Pass => self.scanner = Scan::Off,
            }
        }
        hits
    }

    /// Whether everything fed so far was understood: a body the decoders
    /// gave up on is refused unless the policy opted the destination out
    /// (then [`scan`](Self::scan) already switched scanners).
    fn understood(&self) -> Option<Refusal> {
        let Scan::Decoded(scanner) = &self.scanner else { return None };
        let ScanStatus::Uninspectable(why) = scanner.status() else { return None };
        if self.req.uninspectable != policy::Uninspectable::Refuse {
            // Failed at the very end (a truncated stream): nothing is left
            // to scan another way.
            return None;
        }
        let why = Reason::Uninspectable(Uninspectable::Body { detail: why.to_string() });
        Some(self.passage.refuse(why, "uninspectable"))
    }

    /// Refuses a request whose keys must be redacted but cannot be: it fails
    /// closed, never forwarded with the keys in it.
    fn refuse_unredactable(&mut self, detail: String) -> http::Response<Bytes> {
        let why = Reason::Uninspectable(Uninspectable::Body {
            detail: format!("a key in it must be redacted but cannot be: {detail}"),
        });
        let refusal = self.passage.refuse(why, "redact");
        let response = render(&refusal, self.client);
        self.refused = Some(refusal);
        response
    }

    /// Holds the request until its approval is decided.
    async fn await_approval(&self, rule: &str, spec: &policy::ApprovalSpec) -> BodyVerdict {
        let body_preview =
            lock(&self.req.capture).masked_preview(self.passage.gate().recording_masker(), APPROVAL_PREVIEW_BYTES);
        let ask = ApprovalAsk {
            rule,
            spec,
            method: self.method.clone(),
            url: self.url.clone(),
            destination: format!("{}:{}", self.req.judged.host, self.passage.conn().dst.port()),
            body_preview,
        };
        match Box::pin(self.passage.approve(ask)).await {
            Ok(()) => BodyVerdict::Continue,
            Err(refusal) => BodyVerdict::Respond(render(&refusal, self.client)),
        }
    }
}

impl BodyInspector for BodyGate {
    async fn feed(&mut self, chunk: &[u8]) -> BodyVerdict {
        lock(&self.req.capture).push(chunk, self.passage.gate().record_body_cap.max(APPROVAL_PREVIEW_BYTES));
        let hits = self.scan(chunk);
        self.verdict(hits).await
    }

    async fn finish(&mut self) -> BodyVerdict {
        let hits = match &mut self.scanner {
            Scan::Decoded(s) => s.finish(),
            Scan::Raw(s) => s.finish(),
            Scan::Off => Vec::new(),
        };
        self.verdict(hits).await
    }

    async fn trailers(&mut self, trailers: &http::HeaderMap) -> BodyVerdict {
        if matches!(self.scanner, Scan::Off) {
            return BodyVerdict::Continue;
        }
        // Trailers are headers that come late: scanned the same way.
        let detector = &self.passage.gate().detector;
        let mut hits = http_scan::scan_head(detector, &http::Method::GET, &http::Uri::from_static("/"), trailers);
        hits.extend(http_scan::unknown_credentials(detector, trailers, |_| false));
        self.verdict(hits).await
    }

    fn streaming(&mut self) -> BodyVerdict {
        self.streaming = true;
        if self.redactions.is_empty() {
            return BodyVerdict::Continue;
        }
        let detail = "keys in it must be redacted, but it is larger than the gateway holds \
                      (proxy.limits.max_buffered_body_bytes)";
        BodyVerdict::Respond(self.refuse_unredactable(detail.to_owned()))
    }

    fn edit(&mut self, frames: &std::collections::VecDeque<http_body::Frame<Bytes>>) -> BodyEdit {
        if self.redactions.is_empty() {
            return BodyEdit::Keep;
        }
        let mut body = Vec::with_capacity(frames.iter().filter_map(|f| f.data_ref()).map(Bytes::len).sum());
        for data in frames.iter().filter_map(|f| f.data_ref()) {
            body.extend_from_slice(data);
        }
        let gate = self.passage.gate();
        match redact_body(&body, &self.framing, &self.redactions, &gate.detector, gate.body_limits) {
            Ok(edited) => {
                tracing::info!(
                    target: crate::enforce::FINDING_TARGET,
                    conn_id = self.passage.conn().id,
                    keys = self.redactions.len(),
                    "keys redacted from the request body"
                );
                BodyEdit::Replace(edited)
            }
            // No way to forward the body as it is from here.
            Err(e) => BodyEdit::Refuse(self.refuse_unredactable(e.to_string())),
        }
    }

    async fn before_upstream(&mut self) -> BodyVerdict {
        match self.approval.take() {
            Some((rule, spec)) => self.await_approval(&rule, &spec).await,
            None => BodyVerdict::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, host: Option<&str>) -> http::request::Parts {
        let mut b = http::Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn ctx(name: &str) -> HttpContext {
        HttpContext { conn_id: 1, server_name: name.into(), orig_dst: "10.0.0.1:80".parse().unwrap(), tls: false }
    }

    #[test]
    fn the_judged_host_of_every_host_form() {
        let named = |c: &HttpContext, p: &http::request::Parts| judged_host(c, p).unwrap();
        assert_eq!(named(&ctx(""), &parts("/", Some("[::1]"))).as_deref(), Some("::1"));
        assert_eq!(named(&ctx(""), &parts("/", Some("[::1]:8080"))).as_deref(), Some("::1"));
        assert_eq!(named(&ctx(""), &parts("/", Some("API.Example.com.:443"))).as_deref(), Some("api.example.com"));
        assert_eq!(named(&ctx(""), &parts("/", Some("api.example.com"))).as_deref(), Some("api.example.com"));
        assert_eq!(named(&ctx(""), &parts("/", None)), None, "no name: judged by the address");
        assert_eq!(named(&ctx("Cursor.sh"), &parts("/", Some("other.example"))).as_deref(), Some("cursor.sh"));
        // A host servers could read another way is refused, not guessed.
        assert!(judged_host(&ctx(""), &parts("http://u@h.example:1/x", None)).is_err());
        assert!(judged_host(&ctx(""), &parts("/", Some("evil@api.example.com"))).is_err());
        assert!(judged_host(&ctx(""), &parts("/", Some("api.example.com /x"))).is_err());
    }
}
