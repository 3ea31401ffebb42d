//! Enforcement of the static-key policy on intercepted HTTP: every request
//! head and body is scanned by the detector before anything goes upstream;
//! each hit becomes a durable finding, and the configured action decides
//! whether the request is blocked (403, nothing reaches upstream) or
//! forwarded and flagged.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use serde_json::json;

use crate::{
    detect::{
        http_scan::{self, BodyLimits, BodyScanner, Hit},
        Detector, FingerprintKey,
    },
    findings::{Action, FindingsConfig, FindingsHandle, NewFinding, ProcessSnapshot},
    http::{BodyInspector, BodyVerdict, HeadVerdict, HttpContext, Inspector},
    process::ProcessInfo,
};

/// tracing target of finding events.
pub const FINDING_TARGET: &str = "gateway::finding";

/// What every connection's enforcement shares.
pub struct Policy {
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
}

/// The [`Inspector`] of one intercepted connection.
#[derive(Clone)]
pub struct Enforcer {
    policy: Arc<Policy>,
    process: Arc<ProcessInfo>,
    blocked: Arc<AtomicU64>,
}

impl Enforcer {
    /// Enforcement for a connection made by `process`.
    pub fn new(policy: Arc<Policy>, process: Arc<ProcessInfo>) -> Enforcer {
        Enforcer { policy, process, blocked: Arc::new(AtomicU64::new(0)) }
    }

    /// Requests blocked so far on this connection.
    pub fn blocked(&self) -> u64 {
        self.blocked.load(Ordering::Relaxed)
    }

    /// Records every hit as a finding; returns the response that blocks the
    /// request when any hit's action says so.
    async fn judge(&self, ctx: &HttpContext, host: &str, hits: Vec<Hit>) -> Option<http::Response<Bytes>> {
        let mut seen = HashSet::new();
        let mut blocked = Vec::new();
        for hit in hits {
            let fingerprint = hit.detection.secret.fingerprint(&self.policy.fingerprint_key);
            let location = hit.location.to_string();
            if !seen.insert((fingerprint.clone(), location.clone())) {
                continue;
            }
            let rule = hit.detection.rule_id.to_string();
            let action = self.policy.actions.action_for(host, &rule);
            // `swap` needs a credential held for the job's identity, which
            // does not exist yet: until it does, swap fails closed.
            let enforced = match action {
                Action::Flag => Action::Flag,
                Action::Block | Action::Swap => Action::Block,
            };
            let preview = hit.detection.secret.preview();
            let finding = NewFinding {
                rule_id: rule.clone(),
                confidence: hit.detection.confidence.to_string(),
                fingerprint: fingerprint.clone(),
                preview: preview.clone(),
                location: location.clone(),
                dest_host: host.to_owned(),
                dest_port: ctx.orig_dst.port(),
                process: snapshot(&self.process),
                identity: None,
                action: enforced,
                seen_at: time::OffsetDateTime::now_utc(),
            };
            let id = match self.policy.findings.record(finding).await {
                Ok(recorded) => Some(recorded.id.to_string()),
                Err(e) => {
                    // Losing the finding must not let the key through.
                    tracing::error!(target: FINDING_TARGET, error = %e, rule, "recording a finding failed; blocking the request");
                    blocked.push(json!({"id": null, "rule": rule, "location": location, "fingerprint": fingerprint, "preview": preview}));
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
                pid = self.process.pid,
                uid = self.process.uid,
                exe = self.process.exe.as_ref().map(|e| e.display().to_string()),
                action = enforced.as_str(),
                "static credential"
            );
            if enforced == Action::Block {
                blocked.push(json!({"id": id, "rule": rule, "location": location, "fingerprint": fingerprint, "preview": preview}));
            }
        }
        if blocked.is_empty() {
            return None;
        }
        self.blocked.fetch_add(1, Ordering::Relaxed);
        Some(blocked_response(ctx.conn_id, blocked))
    }
}

fn snapshot(p: &ProcessInfo) -> ProcessSnapshot {
    ProcessSnapshot {
        pid: p.pid,
        uid: p.uid,
        exe: p.exe.as_ref().map(|e| e.display().to_string()),
        comm: p.comm.clone(),
        cgroup: p.cgroup.clone(),
        job: Default::default(),
    }
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
    let mut response = http::Response::new(Bytes::from(body.to_string()));
    *response.status_mut() = http::StatusCode::FORBIDDEN;
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
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

    async fn inspect_head(&self, ctx: &HttpContext, parts: &mut http::request::Parts) -> HeadVerdict<BodyEnforcer> {
        let host = request_host(ctx, parts);
        let detector = &self.policy.detector;
        let mut hits = http_scan::scan_head(detector, &parts.method, &parts.uri, &parts.headers);
        // The gateway issues no credentials of its own yet, so every
        // credential in an authentication header is a static one.
        hits.extend(http_scan::unknown_credentials(detector, &parts.headers, |_| false));
        if !hits.is_empty() {
            if let Some(response) = self.judge(ctx, &host, hits).await {
                return HeadVerdict::Respond(response);
            }
        }
        let scanner = BodyScanner::new(detector.clone(), &parts.headers, self.policy.body_limits);
        HeadVerdict::Forward {
            body: Some(BodyEnforcer { enforcer: self.clone(), ctx: ctx.clone(), host, scanner }),
        }
    }
}

/// Scans one request body as it streams.
pub struct BodyEnforcer {
    enforcer: Enforcer,
    ctx: HttpContext,
    host: String,
    scanner: BodyScanner,
}

impl BodyEnforcer {
    async fn verdict(&self, hits: Vec<Hit>) -> BodyVerdict {
        if hits.is_empty() {
            return BodyVerdict::Continue;
        }
        match self.enforcer.judge(&self.ctx, &self.host, hits).await {
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
