//! Enforcement on intercepted HTTP, per request: the policy decides
//! (allow, deny, hold for approval, mask, record level), every request head
//! and body is scanned by the detector before anything goes upstream, each
//! hit becomes a durable finding, and the static-key action blocks the
//! request (403, nothing reaches upstream), flags it, or swaps the key.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use serde_json::json;

mod approve;
mod exchange;
mod masks;

pub use approve::{ApprovalAsk, Refusal};
pub use exchange::{ExchangeWatch, RequestCapture, RequestSummary, SharedCapture, WatchSpec};
pub use masks::{decode_prefix, MaskCache};

use crate::{
    approval::Approvals,
    credentials::{apply_swap, prepare, CredentialStore, MintRequest, Minter, OidcValidator, SwapTarget},
    detect::{
        http_scan::{self, BodyLimits, BodyScanner, Hit},
        Detector, FingerprintKey,
    },
    findings::{Action, FindingsConfig, FindingsHandle, NewFinding, ProcessSnapshot},
    http::{BodyInspector, BodyVerdict, HeadVerdict, HttpContext, Inspector},
    identity::Identity,
    policy::{self, HttpRequestFacts, PolicyHandle, RequestFacts},
    process::ProcessInfo,
    record::{DecisionFacts, RecordLevel, Recorder, SessionRecorder},
};

/// tracing target of finding events.
pub const FINDING_TARGET: &str = "gateway::finding";
/// tracing target of ID token validation events.
pub const OIDC_TARGET: &str = "gateway::oidc";
/// tracing target of policy decisions (denials, approvals).
pub const POLICY_TARGET: &str = "gateway::policy";

/// What every connection's enforcement shares.
pub struct Enforcement {
    /// The detector.
    pub detector: Arc<Detector>,
    /// Per-installation key for fingerprints.
    pub fingerprint_key: Arc<FingerprintKey>,
    /// Durable findings.
    pub findings: FindingsHandle,
    /// Actions per destination and rule.
    pub actions: FindingsConfig,
    /// Body decoding limits.
    pub body_limits: BodyLimits,
    /// Credentials the gateway holds per identity and destination (`swap`).
    pub credentials: Arc<CredentialStore>,
    /// Short-lived tokens for `{jwt}` injections.
    pub minter: Option<Arc<Minter>>,
    /// Validates ID tokens jobs present in `oidc_header` (none configured: `None`).
    pub oidc: Option<Arc<OidcValidator>>,
    /// The header jobs present ID tokens in.
    pub oidc_header: http::HeaderName,
    /// Who may do what where (reloadable).
    pub policy: PolicyHandle,
    /// Requests held for just-in-time approval.
    pub approvals: Approvals,
    /// Session recording.
    pub recorder: Recorder,
    /// Compiled response maskers of the policy in force.
    pub masks: MaskCache,
    /// Body bytes a recording keeps per direction.
    pub record_body_cap: usize,
}

/// Who is calling: the attributed process and the identity it is pinned to.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The process.
    pub process: Arc<ProcessInfo>,
    /// Its identity.
    pub identity: Identity,
    /// Allowlisted CI job variables of the process.
    pub job: std::collections::BTreeMap<String, String>,
}

/// The [`Inspector`] of one intercepted connection.
#[derive(Clone)]
pub struct Enforcer {
    shared: Arc<Enforcement>,
    caller: Arc<Caller>,
    blocked: Arc<AtomicU64>,
    /// The connection's recording, if it is recorded.
    session: Option<Arc<SessionRecorder>>,
    /// Requests seen on the connection (numbers exchanges in the recording).
    requests: Arc<AtomicU64>,
}

/// What one request carries from its head to its body inspection.
struct RequestState {
    host: String,
    verified: BTreeMap<String, String>,
    /// The policy's static-key action, overriding `findings.actions`.
    static_keys: Option<Action>,
    capture: SharedCapture,
}

impl Enforcer {
    /// Enforcement for a connection made by `caller`, recorded in `session`.
    pub fn new(shared: Arc<Enforcement>, caller: Arc<Caller>, session: Option<Arc<SessionRecorder>>) -> Enforcer {
        Enforcer {
            shared,
            caller,
            blocked: Arc::new(AtomicU64::new(0)),
            session,
            requests: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Requests blocked so far on this connection.
    pub fn blocked(&self) -> u64 {
        self.blocked.load(Ordering::Relaxed)
    }

    /// Decides every hit, swaps credentials in `head` where that is the
    /// action (heads only: a key in a body cannot be swapped), records each
    /// hit as a finding, and returns the response that blocks the request
    /// when any hit's final action is `block`.
    async fn judge(
        &self,
        ctx: &HttpContext,
        req: &RequestState,
        hits: Vec<Hit>,
        head: Option<&mut http::request::Parts>,
    ) -> Option<http::Response<Bytes>> {
        let (host, verified) = (req.host.as_str(), &req.verified);
        let identity = &self.caller.identity;
        let credential = match head {
            Some(_) => self.shared.credentials.lookup(&identity.uri, host),
            None => None,
        };
        let mut seen = HashSet::new();
        let mut decided: Vec<(Hit, String, String, Action)> = Vec::new();
        let mut swap_targets = Vec::new();
        for hit in hits {
            let fingerprint = hit.detection.secret.fingerprint(&self.shared.fingerprint_key);
            let location = hit.location.to_string();
            if !seen.insert((fingerprint.clone(), location.clone())) {
                continue;
            }
            let configured =
                req.static_keys.unwrap_or_else(|| self.shared.actions.action_for(host, &hit.detection.rule_id));
            let action = match configured {
                Action::Flag => Action::Flag,
                Action::Block => Action::Block,
                // Nothing held for this identity and destination, or a key
                // where it cannot be replaced: swapping fails closed.
                Action::Swap => match (credential.is_some(), SwapTarget::from_location(&hit.location)) {
                    (true, Some(target)) => {
                        swap_targets.push(target);
                        Action::Swap
                    }
                    _ => Action::Block,
                },
            };
            decided.push((hit, fingerprint, location, action));
        }
        let blocking = decided.iter().any(|(.., a)| *a == Action::Block);
        if !blocking && !swap_targets.is_empty() {
            let swapped = match (head, credential.as_ref()) {
                (Some(parts), Some(credential)) => self.swap(parts, credential, host, &swap_targets, verified),
                _ => Err("no request head or credential to swap".to_owned()),
            };
            if let Err(reason) = swapped {
                tracing::error!(target: FINDING_TARGET, conn_id = ctx.conn_id, reason, "credential swap failed; blocking the request");
                for d in decided.iter_mut() {
                    if d.3 == Action::Swap {
                        d.3 = Action::Block;
                    }
                }
            }
        }

        let mut blocked = Vec::new();
        for (hit, fingerprint, location, action) in decided {
            let rule = hit.detection.rule_id.to_string();
            let preview = hit.detection.secret.preview();
            let entry = json!({"rule": rule, "location": location, "fingerprint": fingerprint, "preview": preview});
            let finding = NewFinding {
                rule_id: rule.clone(),
                confidence: hit.detection.confidence.to_string(),
                fingerprint: fingerprint.clone(),
                preview: preview.clone(),
                location: location.clone(),
                dest_host: host.to_owned(),
                dest_port: ctx.orig_dst.port(),
                process: snapshot(&self.caller, verified),
                identity: Some(identity.uri.clone()),
                action,
                seen_at: time::OffsetDateTime::now_utc(),
            };
            let id = match self.shared.findings.record(finding).await {
                Ok(recorded) => {
                    exchange::lock(&req.capture).findings.push(recorded.id.to_string());
                    Some(recorded.id.to_string())
                }
                Err(e) => {
                    // Losing the finding must not let the key through.
                    tracing::error!(target: FINDING_TARGET, error = %e, rule, "recording a finding failed; blocking the request");
                    blocked.push(entry);
                    continue;
                }
            };
            tracing::warn!(
                target: FINDING_TARGET,
                conn_id = ctx.conn_id,
                finding = id.as_deref(),
                rule,
                confidence = %hit.detection.confidence,
                fingerprint,
                preview,
                location,
                host,
                port = ctx.orig_dst.port(),
                identity = identity.uri,
                pid = self.caller.process.pid,
                uid = self.caller.process.uid,
                exe = self.caller.process.exe.as_ref().map(|e| e.display().to_string()),
                action = action.as_str(),
                "static credential"
            );
            if action == Action::Block {
                let mut entry = entry;
                entry["id"] = json!(id);
                blocked.push(entry);
            }
        }
        if blocked.is_empty() {
            return None;
        }
        self.blocked.fetch_add(1, Ordering::Relaxed);
        Some(blocked_response(ctx.conn_id, blocked))
    }

    /// Validates an ID token the job presents in the configured header. The
    /// header never goes upstream; a token that does not validate gets a 401
    /// and an event. Returns the verified claims to bind to the request.
    async fn verify_presented_token(
        &self,
        ctx: &HttpContext,
        parts: &mut http::request::Parts,
    ) -> Result<BTreeMap<String, String>, http::Response<Bytes>> {
        let Some(value) = parts.headers.remove(&self.shared.oidc_header) else {
            return Ok(BTreeMap::new());
        };
        let Some(validator) = &self.shared.oidc else {
            tracing::warn!(target: OIDC_TARGET, conn_id = ctx.conn_id, "an ID token was presented but no OIDC issuer is configured; token dropped");
            return Ok(BTreeMap::new());
        };
        let token = value.to_str().unwrap_or_default().trim();
        let token = token.strip_prefix("Bearer ").unwrap_or(token);
        match validator.validate(token).await {
            Ok(claims) => {
                tracing::info!(
                    target: OIDC_TARGET,
                    conn_id = ctx.conn_id,
                    issuer = claims.issuer,
                    subject = claims.subject,
                    identity = self.caller.identity.uri,
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
                    conn_id = ctx.conn_id,
                    code = e.code(),
                    reason = %e,
                    identity = self.caller.identity.uri,
                    pid = self.caller.process.pid,
                    "ID token rejected"
                );
                self.blocked.fetch_add(1, Ordering::Relaxed);
                Err(invalid_token_response(ctx.conn_id, &e))
            }
        }
    }

    /// Replaces the job's static key with the credential the gateway holds.
    fn swap(
        &self,
        parts: &mut http::request::Parts,
        credential: &crate::credentials::Credential,
        host: &str,
        targets: &[SwapTarget],
        verified: &BTreeMap<String, String>,
    ) -> Result<(), String> {
        let identity = &self.caller.identity;
        let mut job = self.caller.job.clone();
        // Verified OIDC claims win over the job's own environment.
        job.extend(verified.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mint = MintRequest {
            subject: identity.uri.clone(),
            audience: host.to_owned(),
            labels: identity.labels.clone(),
            job,
        };
        let rendered = prepare(credential, self.shared.minter.as_deref(), &mint).map_err(|e| e.to_string())?;
        let outcome = apply_swap(parts, targets, &rendered).map_err(|e| e.to_string())?;
        tracing::info!(
            target: FINDING_TARGET,
            identity = identity.uri,
            host,
            credential_entry = credential.entry,
            removed = outcome.removed,
            "swapped a static credential for the gateway-held one"
        );
        Ok(())
    }
}

fn snapshot(caller: &Caller, verified: &BTreeMap<String, String>) -> ProcessSnapshot {
    let p = &caller.process;
    let mut job = caller.job.clone();
    job.extend(verified.iter().map(|(k, v)| (format!("oidc.{k}"), v.clone())));
    ProcessSnapshot {
        pid: p.pid,
        uid: p.uid,
        exe: p.exe.as_ref().map(|e| e.display().to_string()),
        comm: p.comm.clone(),
        cgroup: p.cgroup.clone(),
        container: p.container.clone(),
        job,
    }
}

/// 401 for an ID token that did not validate.
fn invalid_token_response(conn_id: u64, error: &crate::credentials::OidcError) -> http::Response<Bytes> {
    let body = json!({
        "error": "invalid_oidc_token",
        "code": error.code(),
        "message": format!("The CI gateway rejected the identity token this request presented: {error}."),
        "conn_id": conn_id,
    });
    json_response(http::StatusCode::UNAUTHORIZED, &body)
}

fn json_response(status: http::StatusCode, body: &serde_json::Value) -> http::Response<Bytes> {
    let mut response = http::Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

fn blocked_response(conn_id: u64, findings: Vec<serde_json::Value>) -> http::Response<Bytes> {
    let ids: Vec<String> = findings.iter().filter_map(|f| f["id"].as_str().map(str::to_owned)).collect();
    let body = json!({
        "error": "static_credential_blocked",
        "message": format!(
            "The CI gateway blocked this request: it carries a hard-coded credential ({}). \
             Nothing was sent to the server. Remove the key from the job, rotate it, and ask \
             the security team about finding {} if this is unexpected.",
            findings.iter().filter_map(|f| f["rule"].as_str()).collect::<Vec<_>>().join(", "),
            if ids.is_empty() { "(unrecorded)".to_owned() } else { ids.join(", ") },
        ),
        "findings": findings,
        "conn_id": conn_id,
    });
    json_response(http::StatusCode::FORBIDDEN, &body)
}

/// The authority a request goes to: SNI or Host, without the port.
fn request_host(ctx: &HttpContext, parts: &http::request::Parts) -> String {
    let authority = if !ctx.server_name.is_empty() {
        ctx.server_name.clone()
    } else if let Some(a) = parts.uri.authority() {
        a.host().to_owned()
    } else {
        parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| h.rsplit_once(':').map_or(h, |(host, _)| host).to_owned())
            .unwrap_or_else(|| ctx.orig_dst.ip().to_string())
    };
    authority.to_ascii_lowercase()
}

impl Inspector for Enforcer {
    type Body = BodyEnforcer;
    type Response = ExchangeWatch;

    async fn inspect_head(
        &self,
        ctx: &HttpContext,
        parts: &mut http::request::Parts,
    ) -> HeadVerdict<BodyEnforcer, ExchangeWatch> {
        let stream = self.requests.fetch_add(1, Ordering::Relaxed);
        let host = request_host(ctx, parts);
        // Before the OIDC header is removed; headers only once the policy
        // says the exchange is recorded in full.
        let mut summary = self.summarize(parts);
        let verified = match self.verify_presented_token(ctx, parts).await {
            Ok(v) => v,
            Err(response) => {
                self.record_refusal(stream, summary, &response, "oidc", "invalid_token");
                return HeadVerdict::Respond(response);
            }
        };

        let policy = self.shared.policy.current();
        let identity = &self.caller.identity;
        let facts = RequestFacts {
            identity_uri: &identity.uri,
            labels: &identity.labels,
            claims: &verified,
            unmapped: identity.rule.is_none(),
            host: &host,
            port: ctx.orig_dst.port(),
            tls: ctx.tls,
            request: Some(HttpRequestFacts {
                method: parts.method.as_str(),
                path: path_and_query(parts),
                headers: &parts.headers,
            }),
        };
        let decision = policy.evaluate(&facts);
        let decided = DecisionFacts { rule: decision.rule.to_owned(), action: decision.action.name().to_owned() };
        let level = record_level(decision.record);
        if level == RecordLevel::Full && self.session.is_some() {
            summary.headers = self.recorded_headers(&parts.headers);
        }
        if let policy::Action::Deny { reason } = decision.action {
            tracing::info!(target: POLICY_TARGET, conn_id = ctx.conn_id, rule = decision.rule, identity = identity.uri, host, "request denied by policy");
            self.blocked.fetch_add(1, Ordering::Relaxed);
            let response = denied_response(ctx.conn_id, decision.rule, reason);
            self.record_refusal(stream, summary, &response, decision.rule, "deny");
            // Nothing left, but a hard-coded key the job sent is still one
            // to rotate: it becomes a finding like any other (as blocked).
            let hits = self.head_hits(parts);
            if !hits.is_empty() {
                let req = RequestState {
                    host,
                    verified,
                    static_keys: Some(Action::Block),
                    capture: SharedCapture::default(),
                };
                let _ = self.judge(ctx, &req, hits, None).await;
            }
            return HeadVerdict::Respond(response);
        }
        let approval = match decision.action {
            policy::Action::RequireApproval(spec) => Some((decision.rule.to_owned(), spec.clone())),
            _ => None,
        };
        let mask = match (decision.mask, decision.mask_id) {
            (Some(rule), Some(id)) => Some(self.shared.masks.get(&policy, id, rule)),
            _ => None,
        };
        if mask.is_some() {
            // Only encodings the masker can decode and re-encode may come back.
            restrict_accept_encoding(&mut parts.headers);
        }
        let capture = SharedCapture::default();
        exchange::lock(&capture).encoding =
            parts.headers.get(http::header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let req = RequestState { host, verified, static_keys: decision.static_keys, capture: capture.clone() };
        drop(policy);

        let detector = &self.shared.detector;
        let hits = self.head_hits(parts);
        let watch = ExchangeWatch::new(WatchSpec {
            conn_id: ctx.conn_id,
            stream,
            session: self.session.clone(),
            level,
            decision: decided,
            request: summary,
            capture: capture.clone(),
            mask,
            recording: self.shared.masks.recording().clone(),
            cap: self.shared.record_body_cap,
        });
        if !hits.is_empty() {
            if let Some(response) = self.judge(ctx, &req, hits, Some(&mut *parts)).await {
                // The watch records the blocked exchange when it finishes.
                let mut watch = watch;
                let exchange = blocked_exchange(ctx, parts, &req.host, &response);
                crate::http::ResponseInspector::finish(&mut watch, &exchange);
                return HeadVerdict::Respond(response);
            }
        }
        let scanner = BodyScanner::new(detector.clone(), &parts.headers, self.shared.body_limits);
        // Approvers see the URL masked; nobody else needs it here.
        let url = if approval.is_some() { self.summarize_url(parts) } else { String::new() };
        let body = BodyEnforcer {
            enforcer: self.clone(),
            ctx: ctx.clone(),
            req,
            scanner,
            approval,
            method: parts.method.to_string(),
            url,
        };
        HeadVerdict::Forward { body: Some(body), response: Some(watch) }
    }
}

impl Enforcer {
    /// The request line as a recording may keep it (secrets masked); empty
    /// when the connection is not recorded.
    fn summarize(&self, parts: &http::request::Parts) -> RequestSummary {
        if self.session.is_none() {
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
            url: self.summarize_url(parts),
            rpc: policy::rpc_method(
                parts.method.as_str(),
                path_and_query(parts),
                parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()),
            )
            .map(str::to_owned),
            headers: Vec::new(),
            started: std::time::SystemTime::now(),
        }
    }

    /// Request headers as a recording may keep them: secrets masked,
    /// credentials redacted.
    fn recorded_headers(&self, headers: &http::HeaderMap) -> Vec<(String, String)> {
        let mut headers = headers.clone();
        self.shared.masks.recording().mask_headers(&mut headers);
        crate::record::redact_headers(&headers)
    }

    fn summarize_url(&self, parts: &http::request::Parts) -> String {
        let (masked, _) = self.shared.masks.recording().mask_bytes(path_and_query(parts).as_bytes());
        String::from_utf8_lossy(&masked).into_owned()
    }

    /// Static keys in a request head.
    fn head_hits(&self, parts: &http::request::Parts) -> Vec<Hit> {
        let detector = &self.shared.detector;
        let mut hits = http_scan::scan_head(detector, &parts.method, &parts.uri, &parts.headers);
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
        rule: &str,
        action: &str,
    ) {
        let Some(session) = &self.session else { return };
        session.event(
            "refused",
            json!({ "stream": stream, "rule": rule, "action": action, "status": response.status().as_u16() }),
        );
        session.exchange(crate::record::ExchangeRecord {
            level: RecordLevel::Metadata,
            stream,
            started: request.started,
            duration: request.started.elapsed().unwrap_or_default(),
            method: request.method,
            url: request.url,
            status: response.status().as_u16(),
            outcome: crate::http::ExchangeOutcome::Blocked.as_str().to_owned(),
            rpc: request.rpc,
            request_headers: Vec::new(),
            request_body: Bytes::new(),
            request_body_size: 0,
            response_headers: Vec::new(),
            response_body: Bytes::new(),
            response_body_size: response.body().len() as u64,
            decision: Some(DecisionFacts { rule: rule.to_owned(), action: action.to_owned() }),
            findings: Vec::new(),
        });
    }
}

/// An exchange refused at its head, as the engine would have reported it.
fn blocked_exchange(
    ctx: &HttpContext,
    parts: &http::request::Parts,
    host: &str,
    response: &http::Response<Bytes>,
) -> crate::http::Exchange {
    crate::http::Exchange {
        conn_id: ctx.conn_id,
        method: parts.method.clone(),
        host: host.to_owned(),
        path: parts.uri.path().to_owned(),
        status: response.status().as_u16(),
        outcome: crate::http::ExchangeOutcome::Blocked,
        duration: std::time::Duration::ZERO,
        bytes_up: 0,
        bytes_down: response.body().len() as u64,
    }
}

fn path_and_query(parts: &http::request::Parts) -> &str {
    parts.uri.path_and_query().map_or("/", |p| p.as_str())
}

fn record_level(level: policy::RecordLevel) -> RecordLevel {
    match level {
        policy::RecordLevel::Full => RecordLevel::Full,
        policy::RecordLevel::Metadata => RecordLevel::Metadata,
        policy::RecordLevel::None => RecordLevel::None,
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

/// 403 for a request the policy denies.
fn denied_response(conn_id: u64, rule: &str, reason: &str) -> http::Response<Bytes> {
    let body = json!({
        "error": "denied_by_policy",
        "rule": rule,
        "reason": reason,
        "message": format!("The CI gateway's policy denies this request: {reason}"),
        "conn_id": conn_id,
    });
    json_response(http::StatusCode::FORBIDDEN, &body)
}

/// 403 for a request whose approval was denied, timed out or failed, with
/// the policy's reason for needing approval.
fn not_approved_response(conn_id: u64, refusal: Refusal, reason: &str) -> http::Response<Bytes> {
    let Refusal { approval, error, message } = refusal;
    let body =
        json!({ "error": error, "approval": approval, "message": message, "reason": reason, "conn_id": conn_id });
    json_response(http::StatusCode::FORBIDDEN, &body)
}

/// Scans one request body as it streams, keeps its start for the
/// recording, and holds the request for approval when the policy says so.
pub struct BodyEnforcer {
    enforcer: Enforcer,
    ctx: HttpContext,
    req: RequestState,
    scanner: BodyScanner,
    /// (rule, spec) when the request needs approval.
    approval: Option<(String, policy::ApprovalSpec)>,
    method: String,
    url: String,
}

/// Shown to approvers: enough to judge, small enough for a webhook.
const APPROVAL_PREVIEW_BYTES: usize = 4096;

impl BodyEnforcer {
    async fn verdict(&self, hits: Vec<Hit>) -> BodyVerdict {
        if hits.is_empty() {
            return BodyVerdict::Continue;
        }
        match self.enforcer.judge(&self.ctx, &self.req, hits, None).await {
            Some(response) => BodyVerdict::Respond(response),
            None => BodyVerdict::Continue,
        }
    }

    /// Holds the request until its approval is decided.
    async fn await_approval(&self, rule: &str, spec: &policy::ApprovalSpec) -> BodyVerdict {
        let enforcer = &self.enforcer;
        let body_preview = {
            let capture = exchange::lock(&self.req.capture);
            let head = &capture.body[..capture.body.len().min(APPROVAL_PREVIEW_BYTES)];
            let plain = decode_prefix(capture.encoding.as_deref().unwrap_or(""), head, APPROVAL_PREVIEW_BYTES)
                .unwrap_or_default();
            String::from_utf8_lossy(&enforcer.shared.masks.recording().mask_bytes(&plain).0).into_owned()
        };
        let ask = ApprovalAsk {
            rule,
            spec,
            method: self.method.clone(),
            url: self.url.clone(),
            destination: format!("{}:{}", self.req.host, self.ctx.orig_dst.port()),
            body_preview,
        };
        let asked = enforcer.shared.ask_approval(self.ctx.conn_id, &enforcer.caller, enforcer.session.as_deref(), ask);
        match asked.await {
            Ok(()) => BodyVerdict::Continue,
            Err(refusal) => {
                enforcer.blocked.fetch_add(1, Ordering::Relaxed);
                BodyVerdict::Respond(not_approved_response(self.ctx.conn_id, refusal, &spec.reason))
            }
        }
    }
}

impl BodyInspector for BodyEnforcer {
    async fn feed(&mut self, chunk: &[u8]) -> BodyVerdict {
        exchange::lock(&self.req.capture).push(chunk, self.enforcer.shared.record_body_cap.max(APPROVAL_PREVIEW_BYTES));
        let hits = self.scanner.feed(chunk);
        self.verdict(hits).await
    }

    async fn finish(&mut self) -> BodyVerdict {
        let hits = self.scanner.finish();
        self.verdict(hits).await
    }

    async fn before_upstream(&mut self) -> BodyVerdict {
        match self.approval.take() {
            Some((rule, spec)) => self.await_approval(&rule, &spec).await,
            None => BodyVerdict::Continue,
        }
    }
}
