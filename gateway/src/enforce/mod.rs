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

use crate::{
    credentials::{apply_swap, prepare, CredentialStore, MintRequest, Minter, OidcValidator, SwapTarget},
    detect::{
        http_scan::{self, BodyLimits, BodyScanner, Hit},
        Detector, FingerprintKey,
    },
    findings::{Action, FindingsConfig, FindingsHandle, NewFinding, ProcessSnapshot},
    http::{BodyInspector, BodyVerdict, HeadVerdict, HttpContext, Inspector, PassResponses},
    identity::Identity,
    process::ProcessInfo,
};

/// tracing target of finding events.
pub const FINDING_TARGET: &str = "gateway::finding";
/// tracing target of ID token validation events.
pub const OIDC_TARGET: &str = "gateway::oidc";

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
}

impl Enforcer {
    /// Enforcement for a connection made by `caller`.
    pub fn new(shared: Arc<Enforcement>, caller: Arc<Caller>) -> Enforcer {
        Enforcer { shared, caller, blocked: Arc::new(AtomicU64::new(0)) }
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
        host: &str,
        hits: Vec<Hit>,
        head: Option<&mut http::request::Parts>,
        verified: &BTreeMap<String, String>,
    ) -> Option<http::Response<Bytes>> {
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
            let action = match self.shared.actions.action_for(host, &hit.detection.rule_id) {
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
                Ok(recorded) => Some(recorded.id.to_string()),
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
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
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
    type Response = PassResponses;

    async fn inspect_head(&self, ctx: &HttpContext, parts: &mut http::request::Parts) -> HeadVerdict<BodyEnforcer, PassResponses> {
        let host = request_host(ctx, parts);
        let verified = match self.verify_presented_token(ctx, parts).await {
            Ok(v) => v,
            Err(response) => return HeadVerdict::Respond(response),
        };
        let detector = &self.shared.detector;
        let mut hits = http_scan::scan_head(detector, &parts.method, &parts.uri, &parts.headers);
        // The gateway issues no credentials of its own yet, so every
        // credential in an authentication header is a static one.
        hits.extend(http_scan::unknown_credentials(detector, &parts.headers, |_| false));
        if !hits.is_empty() {
            if let Some(response) = self.judge(ctx, &host, hits, Some(&mut *parts), &verified).await {
                return HeadVerdict::Respond(response);
            }
        }
        let scanner = BodyScanner::new(detector.clone(), &parts.headers, self.shared.body_limits);
        HeadVerdict::Forward {
            body: Some(BodyEnforcer { enforcer: self.clone(), ctx: ctx.clone(), host, scanner, verified }),
            response: None,
        }
    }
}

/// Scans one request body as it streams.
pub struct BodyEnforcer {
    enforcer: Enforcer,
    ctx: HttpContext,
    host: String,
    scanner: BodyScanner,
    verified: BTreeMap<String, String>,
}

impl BodyEnforcer {
    async fn verdict(&self, hits: Vec<Hit>) -> BodyVerdict {
        if hits.is_empty() {
            return BodyVerdict::Continue;
        }
        match self.enforcer.judge(&self.ctx, &self.host, hits, None, &self.verified).await {
            Some(response) => BodyVerdict::Respond(response),
            None => BodyVerdict::Continue,
        }
    }
}

impl BodyInspector for BodyEnforcer {
    async fn feed(&mut self, chunk: &[u8]) -> BodyVerdict {
        let hits = self.scanner.feed(chunk);
        self.verdict(hits).await
    }

    async fn finish(&mut self) -> BodyVerdict {
        let hits = self.scanner.finish();
        self.verdict(hits).await
    }
}
