//! The gate: the one place where a connection or a request becomes a
//! decision, for every protocol.
//!
//! Protocol handlers (`proxy::tcp`, `proxy::http`, and the ones that come
//! next) only translate: they turn what they understood of a connection or
//! a request into protocol-neutral facts, ask the gate, and render its
//! answer back into their protocol (a [`Refusal`] becomes an HTTP status, a
//! TLS alert or a closed socket). The gate evaluates the policy, turns
//! every detected key into a finding and applies the static-key action,
//! holds requests for approval, and records the session from its start to
//! its end.
//!
//! Fail closed by construction: for a protected destination the gate knows
//! one of two things. Either the handler understood the traffic (it is
//! judged request by request), or it did not ([`Uninspectable`]: an unknown
//! protocol, TLS it does not terminate, an undecodable body, an upgrade it
//! does not follow). Not understood is refused unless a policy rule for the
//! destination says `uninspectable: scan_raw` or `pass`: nothing is passed
//! by accident.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use serde_json::json;

use super::{
    refusal::{BlockedFinding, CredentialProblem, NotApproved, Reason, Refusal, Unavailable, Uninspectable},
    Caller, MaskCache, FINDING_TARGET, POLICY_TARGET,
};
use crate::{
    approval::{self, Approvals, NewApproval},
    credentials::{prepare, CredentialStore, MintRequest, Minter, OidcValidator, RenderedInjection, SwapTarget},
    detect::{
        http_scan::{BodyLimits, Hit, Location},
        Detector, FingerprintKey, Secret,
    },
    event::Protocol,
    findings::{Action, FindingsConfig, FindingsHandle, NewFinding, Notifier, WaiverSet},
    mask::Masker,
    metrics::{ApprovalOutcome, Decision, RequestKind},
    policy::{self, PolicyHandle, RequestFacts},
    record::{
        DecisionFacts, EventKind, RecordLevel, Recorder, SessionOutcome, SessionRecorder, SessionStart, TlsFacts,
    },
    tls::pattern_matches,
};

mod statement;

pub use statement::{ResultMask, StatementAsk, StatementDecision, StatementVerdict};

pub use super::redact::{RedactFn, Redaction};

/// Findings recorded one by one per request; keys beyond it are counted.
pub const MAX_FINDINGS_PER_REQUEST: usize = 256;

/// What every connection's gate shares: detection, findings, credentials,
/// policy, approvals and recording.
pub struct Gate {
    /// The detector.
    pub detector: Arc<Detector>,
    /// Per-installation key for fingerprints.
    pub fingerprint_key: Arc<FingerprintKey>,
    /// Durable findings.
    pub findings: FindingsHandle,
    /// Actions per destination and rule.
    pub actions: FindingsConfig,
    /// Reviewers' waivers (false positives, allowlist entries), in memory.
    pub waivers: WaiverSet,
    /// Announces new findings (`findings.webhook`).
    pub notifier: Notifier,
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
    /// Which names are protected wherever they are reached.
    pub protected: ProtectedNames,
    /// Configured names of intercepted addresses.
    pub destinations: Arc<DestinationNames>,
    /// Counters and histograms for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Names whose traffic is inspected at any address: the `tls.intercept`
/// patterns and the host names of `intercept.destinations`.
#[derive(Debug, Clone, Default)]
pub struct ProtectedNames {
    patterns: Vec<String>,
}

impl ProtectedNames {
    /// Protects names matching `patterns` (`tls.intercept` syntax: exact,
    /// `*.suffix`, `*`).
    pub fn new(patterns: impl IntoIterator<Item = String>) -> ProtectedNames {
        ProtectedNames { patterns: patterns.into_iter().collect() }
    }

    /// Whether `host` is protected.
    pub fn contains(&self, host: &str) -> bool {
        self.patterns.iter().any(|p| pattern_matches(p, host))
    }
}

/// The configured host names of intercepted addresses (`intercept.
/// destinations` entries by host, as last resolved). A connection to a
/// protected address is judged by these names, never by the server name
/// the client claims: opting a destination out must not be something a job
/// can do by sending another name.
#[derive(Debug, Default)]
pub struct DestinationNames(arc_swap::ArcSwap<std::collections::HashMap<std::net::IpAddr, Arc<str>>>);

impl DestinationNames {
    /// Replaces the names with those of `resolved` (host -> addresses).
    pub fn update(&self, resolved: &std::collections::HashMap<String, Vec<std::net::IpAddr>>) {
        let mut by_addr = std::collections::HashMap::new();
        // Sorted, so an address shared by two names is always judged by the same one.
        let mut hosts: Vec<_> = resolved.iter().collect();
        hosts.sort();
        for (host, addrs) in hosts {
            let name: Arc<str> = Arc::from(host.to_ascii_lowercase());
            for addr in addrs {
                by_addr.entry(canonical(*addr)).or_insert_with(|| name.clone());
            }
        }
        self.0.store(Arc::new(by_addr));
    }

    /// The configured name of `addr`, if it is one of a host destination's.
    pub fn name_of(&self, addr: std::net::IpAddr) -> Option<Arc<str>> {
        self.0.load().get(&canonical(addr)).cloned()
    }
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
fn canonical(addr: std::net::IpAddr) -> std::net::IpAddr {
    match addr {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, std::net::IpAddr::V4),
        v4 => v4,
    }
}

pub use crate::intercept::Capture;

/// What the gate knows of a connection when it opens.
#[derive(Debug, Clone)]
pub struct ConnFacts {
    /// Gateway-assigned connection id.
    pub id: u64,
    /// Who made it.
    pub caller: Arc<Caller>,
    /// Where the client meant to go.
    pub dst: SocketAddr,
    /// How it was captured.
    pub capture: Capture,
}

/// What to do with bytes the gateway does not understand, once the policy
/// allowed them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opaque {
    /// Relay them untouched.
    Pass,
    /// Scan the client's bytes with every rule; a key ends the connection.
    ScanRaw,
}

/// An HTTP request as the handler read it, before the gate normalises it.
#[derive(Debug, Clone, Copy)]
pub struct HttpAsk<'a> {
    /// The method as sent.
    pub method: &'a str,
    /// The request target as sent (`/path?query` or `*`).
    pub target: &'a str,
    /// The request headers.
    pub headers: &'a http::HeaderMap,
    /// Whether the request named its host (TLS server name, authority or
    /// `Host`); one that names none is judged by its address and, where
    /// only its port was captured, inspected as protected.
    pub host_named: bool,
}

/// The policy's decision for one request, as the handler needs it.
#[derive(Debug)]
pub struct RequestDecision {
    /// The deciding rule and action, for the recording.
    pub decided: DecisionFacts,
    /// The policy's static-key action, overriding `findings.actions`.
    pub static_keys: Option<Action>,
    /// Response masking: the compiled masker, or why it could not be.
    pub mask: Option<Result<Arc<Masker>, String>>,
    /// How much of the exchange the session keeps.
    pub record: RecordLevel,
    /// Hold for approval before upstream: (rule, spec).
    pub approval: Option<(String, policy::ApprovalSpec)>,
    /// What the request may do with content the gateway cannot inspect.
    pub uninspectable: policy::Uninspectable,
    /// Whether keys in it are looked for (the destination is protected).
    pub inspect: bool,
    /// Whether the gateway injects the credential it holds.
    pub credential: policy::CredentialUse,
}

/// The policy's decision for a connection judged as a whole at its start
/// (PostgreSQL).
#[derive(Debug, Clone)]
pub struct ConnectionDecision {
    /// The host it is judged by.
    pub host: String,
    /// The deciding rule.
    pub rule: String,
    /// The policy's static-key action, overriding `findings.actions`.
    pub static_keys: Option<Action>,
    /// How much of the session is kept.
    pub record: RecordLevel,
}

/// What a refusal says when the gateway holds no credential to swap in or
/// inject.
const NO_CREDENTIAL: &str = "no credential held for this identity and destination";

/// The handler's part of a credential swap: replaces the keys at the
/// targets in its request with the rendered credential.
pub type SwapFn<'a> = dyn FnMut(&[SwapTarget], &RenderedInjection) -> Result<(), String> + Send + 'a;

/// One judged request: what the static-key actions and findings need.
#[derive(Debug, Clone)]
pub struct Judged {
    /// The judged host.
    pub host: String,
    /// Verified OIDC claims bound to the request.
    pub verified: BTreeMap<String, String>,
    /// The policy's static-key action.
    pub static_keys: Option<Action>,
}

/// The outcome of judging the keys in (part of) a request.
#[derive(Debug, Default)]
pub struct Judgement {
    /// Ids of the findings recorded.
    pub findings: Vec<String>,
    /// Set when the request must not go on.
    pub refusal: Option<Refusal>,
    /// Whether the held credential replaced the job's key in the head.
    pub swapped: bool,
}

/// One connection's passage through the gate: its caller, destination,
/// recording and counters. Protocol handlers ask it for every decision.
pub struct Passage {
    gate: Arc<Gate>,
    conn: ConnFacts,
    session: Option<Arc<SessionRecorder>>,
    refused: AtomicU64,
    /// The destination's `uninspectable`, judged once per connection (by
    /// its address, like every connection-level decision), not per request.
    uninspectable: std::sync::OnceLock<policy::Uninspectable>,
    /// Per-session credentials this connection was issued, revoked when the
    /// passage (the connection) is dropped.
    leases: crate::credentials::SessionLeases,
}

impl Gate {
    /// Opens the gate for a connection. The session starts when the
    /// handler knows what the connection is ([`Passage::start_session`]).
    pub fn open(self: &Arc<Self>, conn: ConnFacts) -> Passage {
        Passage {
            gate: self.clone(),
            conn,
            session: None,
            refused: AtomicU64::new(0),
            uninspectable: std::sync::OnceLock::new(),
            leases: Default::default(),
        }
    }

    /// Masks every detector rule: applied to everything a recording keeps.
    pub fn recording_masker(&self) -> &Arc<Masker> {
        self.masks.recording()
    }
}

impl Passage {
    /// The connection's facts.
    pub fn conn(&self) -> &ConnFacts {
        &self.conn
    }

    /// The gate.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// The connection's recording, when it is recorded.
    pub fn session(&self) -> Option<&Arc<SessionRecorder>> {
        self.session.as_ref()
    }

    /// Requests and connections refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Whether `host` (a TLS server name or HTTP host) is protected on this
    /// connection: always when the address was captured as a destination,
    /// else when the name is.
    pub fn protects(&self, host: Option<&str>) -> bool {
        match self.conn.capture {
            Capture::Destination => true,
            // Without a name, nothing says the address is not protected.
            Capture::Port => host.is_none_or(|h| self.gate.protected.contains(h)),
        }
    }

    /// The host a connection-level decision is judged by: for a protected
    /// address its configured name (or the address), whatever the client
    /// claims; for an address captured only by port, the server name.
    pub fn destination_host(&self, sni: Option<&str>) -> String {
        let ip = self.conn.dst.ip();
        let named = match (self.conn.capture, sni) {
            (Capture::Destination, _) => self.gate.destinations.name_of(ip).map(|n| n.to_string()),
            (Capture::Port, Some(sni)) => Some(sni.to_ascii_lowercase()),
            (Capture::Port, None) => None,
        };
        named.unwrap_or_else(|| canonical(ip).to_string())
    }

    /// Starts the recording of the connection, as `protocol` to `host`.
    pub fn start_session(&mut self, protocol: Protocol, host: &str, sni: Option<String>, tls: Option<TlsFacts>) {
        let caller = &self.conn.caller;
        let session = self.gate.recorder.start(SessionStart {
            conn_id: self.conn.id,
            identity: caller.identity.uri.clone(),
            identity_labels: caller.identity.labels.clone(),
            process: caller.process.snapshot(caller.job.clone()),
            host: host.to_owned(),
            orig_dst: self.conn.dst,
            sni,
            tls,
            protocol,
        });
        self.session = session.is_recording().then(|| Arc::new(session));
    }

    /// Ends the recording with the connection's totals.
    pub fn end_session(&self, outcome: SessionOutcome, bytes_up: u64, bytes_down: u64) {
        if let Some(s) = &self.session {
            s.end(outcome, bytes_up, bytes_down);
        }
    }

    /// Policy facts about the connection and, for requests, the request.
    fn facts<'a>(
        &'a self,
        host: &'a str,
        tls: bool,
        claims: &'a BTreeMap<String, String>,
        request: Option<policy::HttpRequestFacts<'a>>,
    ) -> RequestFacts<'a> {
        let identity = &self.conn.caller.identity;
        RequestFacts {
            identity_uri: &identity.uri,
            labels: &identity.labels,
            claims,
            unmapped: identity.rule.is_none(),
            host,
            addr: self.conn.dst.ip(),
            port: self.conn.dst.port(),
            tls,
            request,
        }
    }

    /// Whether the policy would let bytes the gateway does not understand
    /// through: asked before deciding to wait for a server's greeting,
    /// without recording anything.
    pub fn may_pass_opaque(&self) -> bool {
        // Judged as [`Passage::opaque`] would judge it: without a name, an
        // address captured only by port counts as protected.
        if !self.protects(None) {
            return true;
        }
        let host = self.destination_host(None);
        let policy = self.gate.policy.current();
        let d = policy.evaluate(&self.facts(&host, false, &policy::NO_ATTRIBUTES, None));
        !matches!(d.action, policy::Action::Deny { .. }) && d.uninspectable != policy::Uninspectable::Refuse
    }

    /// What the policy allows for content of this connection the gateway
    /// cannot inspect (an undecodable body, an upgrade), judged by the
    /// destination, not by a name the client chose.
    pub fn uninspectable(&self) -> policy::Uninspectable {
        *self.uninspectable.get_or_init(|| {
            let host = self.destination_host(None);
            let policy = self.gate.policy.current();
            policy.evaluate(&self.facts(&host, false, &policy::NO_ATTRIBUTES, None)).uninspectable
        })
    }

    /// Decides a connection whose bytes the handler does not understand
    /// (`why`), judged once as protocol `tcp` for its destination (see
    /// [`Passage::destination_host`]). Starts its recording. `Ok` says how
    /// to relay it; a refusal is recorded and the handler closes the
    /// connection in its protocol's way.
    pub async fn opaque(
        &mut self,
        why: Uninspectable,
        protocol: Protocol,
        sni: Option<String>,
    ) -> Result<Opaque, Refusal> {
        let protected = self.protects(sni.as_deref());
        let tls = sni.is_some() || protocol == Protocol::TlsPassthrough;
        let host = self.destination_host(sni.as_deref());
        let host = host.as_str();
        let (action, rule, record, uninspectable) = {
            let policy = self.gate.policy.current();
            let d = policy.evaluate(&self.facts(host, tls, &policy::NO_ATTRIBUTES, None));
            (d.action.clone(), d.rule.to_owned(), d.record, d.uninspectable)
        };
        if record != policy::RecordLevel::None {
            self.start_session(protocol, host, sni, None);
        }
        if let Some(s) = &self.session {
            s.event(
                EventKind::Decision,
                json!({ "rule": rule, "action": action.name(), "uninspectable": uninspectable.as_str(), "why": why }),
            );
        }
        let refusal = if protected
            && uninspectable == policy::Uninspectable::Refuse
            && !matches!(action, policy::Action::Deny { .. })
        {
            // What cannot be inspected is refused before anyone is asked to
            // approve it; a deny still says its own reason.
            Some(Reason::Uninspectable(why))
        } else if let Some(reason) = self.unrecordable(&action, record) {
            Some(reason)
        } else {
            let port = self.conn.dst.port();
            self.connection_action(&action, &rule, host, format!("tcp://{host}:{port}")).await
        };
        if let Some(reason) = refusal {
            return Err(self.refuse(reason, &rule));
        }
        Ok(match uninspectable {
            policy::Uninspectable::ScanRaw if protected => Opaque::ScanRaw,
            _ => Opaque::Pass,
        })
    }

    /// Decides a PostgreSQL connection at its startup, judged by its
    /// destination ([`Passage::destination_host`]) as a connection with TLS
    /// or not; starts its recording (unless the policy says `record: none`)
    /// with the database and user. A deny, or an approval not granted, is a
    /// refusal (recorded); otherwise says which static-key action applies.
    pub async fn postgres_connection(
        &mut self,
        tls: Option<TlsFacts>,
        database: &str,
        user: &str,
    ) -> Result<ConnectionDecision, Refusal> {
        let host = self.destination_host(None);
        let (action, rule, record, static_keys) = {
            let policy = self.gate.policy.current();
            let facts = self.facts(&host, tls.is_some(), &policy::NO_ATTRIBUTES, None);
            // `match.postgres` rules on the database and user decide here;
            // rules on statements decide each query ([`Passage::statements`]).
            let pg = policy::PostgresFacts { database, user, statement: None };
            let d = policy.evaluate_postgres(&facts, &pg);
            (d.action.clone(), d.rule.to_owned(), d.record, d.static_keys)
        };
        if record != policy::RecordLevel::None {
            self.start_session(Protocol::Postgres, &host, None, tls);
        }
        if let Some(s) = &self.session {
            s.event(
                EventKind::PostgresStartup,
                json!({ "database": database, "user": user, "rule": rule, "action": action.name() }),
            );
        }
        let port = self.conn.dst.port();
        let url = format!("postgres://{user}@{host}:{port}/{database}");
        let refusal = match self.unrecordable(&action, record) {
            Some(reason) => Some(reason),
            None => self.connection_action(&action, &rule, &host, url).await,
        };
        if let Some(reason) = refusal {
            return Err(self.refuse(reason, &rule));
        }
        Ok(ConnectionDecision { host, rule, static_keys, record: record_level(record) })
    }

    /// Refuses what the policy records (and does not deny anyway) while the
    /// recorder cannot take records and `record.on_failure` is `refuse`:
    /// checked before approvers are asked, since the answer would not matter.
    fn unrecordable(&self, action: &policy::Action, record: policy::RecordLevel) -> Option<Reason> {
        if record == policy::RecordLevel::None || matches!(action, policy::Action::Deny { .. }) {
            return None;
        }
        self.gate.recorder.refusing().map(|health| Reason::RecordingUnavailable { health })
    }

    /// What a connection-level decision means for the connection to `host`
    /// (`url` as approvers see it): the reason to refuse it when the rule
    /// denies or approvers do not grant it.
    async fn connection_action(&self, action: &policy::Action, rule: &str, host: &str, url: String) -> Option<Reason> {
        match action {
            policy::Action::Deny { reason } => Some(Reason::Denied { rule: rule.to_owned(), reason: reason.clone() }),
            policy::Action::RequireApproval(spec) => {
                let ask = ApprovalAsk {
                    rule,
                    spec,
                    method: "CONNECT".into(),
                    url,
                    destination: format!("{host}:{}", self.conn.dst.port()),
                    body_preview: String::new(),
                };
                self.approve(ask).await.err().map(|r| r.reason)
            }
            policy::Action::Allow => None,
        }
    }

    /// Records a refusal (event, log line, counter) and returns it for the
    /// handler to render.
    pub fn refuse(&self, reason: Reason, rule: &str) -> Refusal {
        let refusal = Refusal { conn_id: self.conn.id, reason };
        self.refused.fetch_add(1, Ordering::Relaxed);
        let code = refusal.reason.code();
        self.gate.metrics.refusal(code);
        tracing::info!(
            target: POLICY_TARGET,
            conn_id = self.conn.id,
            rule,
            reason = code,
            identity = self.conn.caller.identity.uri,
            dst = %self.conn.dst,
            "refused: {}",
            refusal.message()
        );
        if let Some(s) = &self.session {
            let mut detail = refusal.detail();
            detail["reason"] = json!(code);
            detail["rule"] = json!(rule);
            s.event(EventKind::Refused, detail);
        }
        refusal
    }

    /// Evaluates the policy for a request to `host` that the handler
    /// understood. A `deny` is a refusal (recorded by the caller with the
    /// request); everything else says how to treat the request.
    pub fn request(
        &self,
        host: &str,
        tls: bool,
        claims: &BTreeMap<String, String>,
        request: HttpAsk<'_>,
    ) -> Result<RequestDecision, (Reason, String)> {
        let started = std::time::Instant::now();
        let decided = self.decide_request(host, tls, claims, request);
        let decision = match &decided {
            Ok(d) if d.approval.is_some() => Decision::RequireApproval,
            Ok(_) => Decision::Allow,
            Err((Reason::Denied { .. }, _)) => Decision::Deny,
            Err(_) => Decision::Refused,
        };
        self.gate.metrics.request(RequestKind::Http, decision, started.elapsed());
        decided
    }

    fn decide_request(
        &self,
        host: &str,
        tls: bool,
        claims: &BTreeMap<String, String>,
        request: HttpAsk<'_>,
    ) -> Result<RequestDecision, (Reason, String)> {
        // Judged on its canonical path (forwarded as sent); a path servers
        // read in more than one way is refused rather than guessed.
        let path = policy::normalize(request.target)
            .map_err(|why| (Reason::AmbiguousPath { code: why.code(), detail: why.to_string() }, "path".to_owned()))?;
        let facts = policy::HttpRequestFacts { method: request.method, path: &path, headers: request.headers };
        let policy = self.gate.policy.current();
        let d = policy.evaluate(&self.facts(host, tls, claims, Some(facts)));
        let decided = DecisionFacts { rule: d.rule.to_owned(), action: d.action.name().to_owned() };
        if let policy::Action::Deny { reason } = d.action {
            return Err((Reason::Denied { rule: d.rule.to_owned(), reason: reason.clone() }, d.rule.to_owned()));
        }
        if let Some(reason) = self.unrecordable(d.action, d.record) {
            return Err((reason, d.rule.to_owned()));
        }
        let approval = match d.action {
            policy::Action::RequireApproval(spec) => Some((d.rule.to_owned(), spec.clone())),
            _ => None,
        };
        let mask = match (d.mask, d.mask_id) {
            (Some(rule), Some(id)) => Some(self.gate.masks.get(&policy, id, rule)),
            _ => None,
        };
        let (static_keys, record, credential) = (d.static_keys, record_level(d.record), d.credential);
        drop(policy);
        Ok(RequestDecision {
            decided,
            static_keys,
            mask,
            record,
            approval,
            uninspectable: self.uninspectable(),
            inspect: self.protects(request.host_named.then_some(host)),
            credential,
        })
    }

    /// Decides every key found in a request: each becomes a durable finding
    /// (up to [`MAX_FINDINGS_PER_REQUEST`], the rest counted), the
    /// static-key action for the destination and rule says block, flag or
    /// swap, and the swap (heads only: a key in a body cannot be replaced)
    /// is applied through `swap`, the handler's protocol-specific part.
    /// A swap without a held credential, or one that fails, blocks: it
    /// fails closed. Losing a finding blocks too.
    pub async fn judge(&self, req: &Judged, hits: Vec<Hit>, swap: Option<&mut SwapFn<'_>>) -> Judgement {
        self.judge_with(req, hits, swap, None).await
    }

    /// [`judge`](Self::judge) for keys found in a request body the handler
    /// can still rewrite: where the static-key action says `redact`, the
    /// keys (each a [`Redaction`]) are handed to `redact`, the handler's
    /// part, which replaces them before the body goes upstream, or refuses
    /// (`Err`: the body already streams, say), and then they block: a key
    /// the gateway decided to redact is never forwarded as it is.
    pub async fn judge_body(&self, req: &Judged, hits: Vec<Hit>, redact: &mut RedactFn<'_>) -> Judgement {
        self.judge_with(req, hits, None, Some(redact)).await
    }

    async fn judge_with(
        &self,
        req: &Judged,
        hits: Vec<Hit>,
        swap: Option<&mut SwapFn<'_>>,
        redact: Option<&mut RedactFn<'_>>,
    ) -> Judgement {
        let host = req.host.as_str();
        let identity = &self.conn.caller.identity;
        // Only when some key would be swapped: a per-session credential is
        // issued by its source (a new database user, a Vault lease), which a
        // request that is blocked or has nothing to swap must not cause.
        let may_swap = swap.is_some()
            && hits.iter().any(|h| {
                let configured =
                    req.static_keys.unwrap_or_else(|| self.gate.actions.action_for(host, &h.detection.rule_id));
                configured == Action::Swap && SwapTarget::from_location(&h.location).is_some()
            });
        let credential = if may_swap { Some(self.usable_credential(host).await) } else { None };
        // Why the gateway could not supply the credential a swap called for.
        let mut unavailable: Option<(CredentialProblem, String)> = None;
        let mut seen = HashSet::new();
        let waivers = self.gate.waivers.current();
        let now = time::OffsetDateTime::now_utc();
        let mut decided: Vec<(Hit, String, String, Action, Option<String>)> = Vec::new();
        let mut swap_targets = Vec::new();
        // Keys beyond the cap: counted, and still blocking when their action is.
        let (mut more, mut more_block) = (0u64, false);
        for hit in hits {
            let threshold = self.gate.actions.min_confidence_for(&hit.detection.rule_id);
            if hit.detection.confidence < threshold {
                tracing::debug!(
                    target: FINDING_TARGET,
                    conn_id = self.conn.id,
                    rule = %hit.detection.rule_id,
                    confidence = %hit.detection.confidence,
                    %threshold,
                    "match below the rule's confidence threshold: not a key"
                );
                continue;
            }
            if let Some(short) =
                crate::detect::short_lived::classify(&hit.detection.rule_id, &hit.detection.secret, now)
            {
                // Expires on its own: reported, not a static-key finding.
                tracing::info!(
                    target: FINDING_TARGET,
                    conn_id = self.conn.id,
                    rule = %hit.detection.rule_id,
                    kind = short.kind(),
                    expires_at = match short {
                        crate::detect::short_lived::ShortLived::Jwt { expires_at } => Some(expires_at),
                        crate::detect::short_lived::ShortLived::AwsSession => None,
                    },
                    preview = hit.detection.secret.preview(),
                    host,
                    identity = identity.uri,
                    "short-lived credential sent by a job (not a static key)"
                );
                continue;
            }
            let fingerprint = hit.detection.secret.fingerprint(&self.gate.fingerprint_key);
            // A name can be the key itself (`?<key>`, `{"<key>": 1}`).
            let location = self.gate.masks.recording().mask_text(&hit.location.to_string()).into_owned();
            if !seen.insert((fingerprint.clone(), location.clone())) {
                continue;
            }
            let configured =
                req.static_keys.unwrap_or_else(|| self.gate.actions.action_for(host, &hit.detection.rule_id));
            let mut action = match configured {
                Action::Flag => Action::Flag,
                Action::Block => Action::Block,
                // Only a key in a body can be cut out; one presented where
                // credentials go (a header, user info, the query) is blocked.
                Action::Redact => match (&redact, &hit.location) {
                    (Some(_), Location::Body(_)) => Action::Redact,
                    _ => Action::Block,
                },
                Action::Swap => match (&credential, SwapTarget::from_location(&hit.location)) {
                    (Some(Ok(_)), Some(target)) => {
                        swap_targets.push(target);
                        Action::Swap
                    }
                    (Some(Err(problem)), Some(_)) => {
                        unavailable = Some(problem.clone());
                        Action::Block
                    }
                    _ => Action::Block,
                },
            };
            // A reviewer's waiver (false positive, accepted risk in scope)
            // lets the key through unchanged; it is still recorded.
            let mut allowed_by = None;
            if matches!(action, Action::Block | Action::Redact) {
                if let Some(by) = waivers.waiver(&fingerprint, host, Some(&identity.uri), now) {
                    action = Action::Flag;
                    allowed_by = Some(by.to_owned());
                }
            }
            if decided.len() >= MAX_FINDINGS_PER_REQUEST {
                more += 1;
                // Not recorded one by one, so not redacted either: blocks.
                more_block |= matches!(action, Action::Block | Action::Redact);
                continue;
            }
            decided.push((hit, fingerprint, location, action, allowed_by));
        }
        let blocking = more_block || decided.iter().any(|(_, _, _, a, _)| *a == Action::Block);
        if !blocking && decided.iter().any(|d| d.3 == Action::Redact) {
            let redactions: Vec<Redaction> = decided
                .iter()
                .filter(|d| d.3 == Action::Redact)
                .map(|(hit, fingerprint, ..)| {
                    Redaction::new(&hit.detection.rule_id, fingerprint, hit.detection.secret.clone())
                })
                .collect();
            let applied = match redact {
                Some(apply) => apply(redactions),
                None => Err("nothing to redact in".to_owned()),
            };
            if let Err(reason) = applied {
                tracing::warn!(target: FINDING_TARGET, conn_id = self.conn.id, reason, "keys to redact cannot be redacted; blocking the request");
                for d in decided.iter_mut() {
                    if d.3 == Action::Redact {
                        d.3 = Action::Block;
                    }
                }
            }
        }
        let blocking = blocking || decided.iter().any(|d| d.3 == Action::Block);
        let mut judgement_swapped = false;
        if !blocking && !swap_targets.is_empty() {
            let swapped = match (swap, credential.as_ref()) {
                (Some(apply), Some(Ok(credential))) => {
                    self.swap(credential, host, &req.verified).and_then(|rendered| {
                        apply(&swap_targets, &rendered)?;
                        tracing::info!(
                            target: FINDING_TARGET,
                            identity = identity.uri,
                            host,
                            credential_entry = credential.entry,
                            "swapped a static credential for the gateway-held one"
                        );
                        Ok(())
                    })
                }
                _ => Err("no request head or credential to swap".to_owned()),
            };
            judgement_swapped = swapped.is_ok();
            if let Err(reason) = swapped {
                tracing::error!(target: FINDING_TARGET, conn_id = self.conn.id, reason, "credential swap failed; blocking the request");
                unavailable = Some((
                    CredentialProblem::Unusable,
                    format!("the credential held for this identity and destination could not be used: {reason}"),
                ));
                for d in decided.iter_mut() {
                    if d.3 == Action::Swap {
                        d.3 = Action::Block;
                    }
                }
            }
        }

        let mut judgement = Judgement { swapped: judgement_swapped, ..Judgement::default() };
        let mut blocked = Vec::new();
        let secrets: Vec<(Secret, String)> =
            decided.iter().map(|(hit, ..)| (hit.detection.secret.clone(), hit.detection.secret.preview())).collect();
        // Only when there is something to record: the clean path reads no /proc.
        let origin = if decided.is_empty() { Default::default() } else { self.origin(&secrets) };
        for (hit, fingerprint, location, action, allowed_by) in decided {
            let rule = hit.detection.rule_id.to_string();
            let preview = hit.detection.secret.preview();
            let finding = NewFinding {
                rule_id: rule.clone(),
                confidence: hit.detection.confidence.to_string(),
                fingerprint: fingerprint.clone(),
                preview: preview.clone(),
                location: location.clone(),
                dest_host: host.to_owned(),
                dest_port: self.conn.dst.port(),
                process: self.snapshot(&req.verified),
                identity: Some(identity.uri.clone()),
                action,
                seen_at: time::OffsetDateTime::now_utc(),
                session_id: self.session.as_ref().map(|s| s.id().as_str().to_owned()),
                command: origin.command.clone(),
                script: origin.script.clone(),
                allowed_by: allowed_by.clone(),
            };
            let mut entry = BlockedFinding { id: None, rule, location, fingerprint, preview };
            match self.gate.findings.record(finding).await {
                Ok(recorded) => {
                    if recorded.new {
                        let p = &self.conn.caller.process;
                        self.gate.notifier.new_finding(json!({
                            "id": recorded.id,
                            "rule_id": entry.rule,
                            "confidence": hit.detection.confidence,
                            "fingerprint": entry.fingerprint,
                            "preview": entry.preview,
                            "status": "open",
                            "destination": format!("{host}:{}", self.conn.dst.port()),
                            "location": entry.location,
                            "action": action,
                            "allowed_by": allowed_by,
                            "identity": identity.uri,
                            "project": crate::findings::project_of(&self.conn.caller.job),
                            "exe": p.exe.as_ref().map(|e| e.display().to_string()),
                            "script": origin.script,
                            "session_id": self.session.as_ref().map(|s| s.id().as_str().to_owned()),
                        }));
                    }
                    let id = recorded.id.to_string();
                    judgement.findings.push(id.clone());
                    entry.id = Some(id);
                }
                Err(e) => {
                    // Losing the finding must not let the key through.
                    tracing::error!(target: FINDING_TARGET, error = %e, rule = entry.rule, "recording a finding failed; blocking the request");
                    blocked.push(entry);
                    continue;
                }
            }
            let p = &self.conn.caller.process;
            tracing::warn!(
                target: FINDING_TARGET,
                conn_id = self.conn.id,
                finding = entry.id.as_deref(),
                rule = entry.rule,
                confidence = %hit.detection.confidence,
                fingerprint = entry.fingerprint,
                preview = entry.preview,
                location = entry.location,
                host,
                port = self.conn.dst.port(),
                identity = identity.uri,
                pid = p.pid,
                uid = p.uid,
                exe = p.exe.as_ref().map(|e| e.display().to_string()),
                action = action.as_str(),
                allowed_by,
                "static credential"
            );
            self.gate.metrics.finding(&entry.rule, action);
            if action == Action::Block {
                blocked.push(entry);
            }
        }
        if more > 0 {
            tracing::warn!(target: FINDING_TARGET, conn_id = self.conn.id, more, cap = MAX_FINDINGS_PER_REQUEST, "more keys in one request than are recorded one by one");
        }
        if !blocked.is_empty() || more_block {
            let reason = match unavailable {
                Some((problem, detail)) => {
                    tracing::warn!(
                        target: FINDING_TARGET,
                        conn_id = self.conn.id,
                        identity = identity.uri,
                        host,
                        detail,
                        "static_keys says swap but the gateway cannot supply a credential: request refused"
                    );
                    Reason::CredentialUnavailable(Box::new(Unavailable {
                        identity: identity.uri.clone(),
                        host: host.to_owned(),
                        problem,
                        detail,
                        findings: blocked,
                    }))
                }
                None => Reason::StaticCredential { findings: blocked, more },
            };
            self.gate.metrics.refusal(reason.code());
            judgement.refusal = Some(Refusal { conn_id: self.conn.id, reason });
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        judgement
    }

    /// The credential held for the caller and `host`, if there is one that
    /// may be sent: an expired value (its refresh failed) is never sent.
    async fn usable_credential(
        &self,
        host: &str,
    ) -> Result<crate::credentials::Credential, (CredentialProblem, String)> {
        let identity = &self.conn.caller.identity;
        let Some(mut credential) = self.gate.credentials.lookup(&identity.uri, host) else {
            return Err((CredentialProblem::NotHeld, NO_CREDENTIAL.to_owned()));
        };
        if let Some(issue) = &credential.per_session {
            let holder =
                crate::credentials::LeaseHolder { identity: identity.uri.clone(), destination: host.to_owned() };
            match self.leases.credential(issue, holder).await {
                Ok((value, expires_at)) => (credential.value, credential.expires_at) = (Some(value), expires_at),
                Err(e) => {
                    tracing::error!(
                        target: FINDING_TARGET,
                        conn_id = self.conn.id,
                        identity = identity.uri,
                        host,
                        credential_entry = credential.entry,
                        error = %e,
                        "issuing a per-session credential failed: the request is refused"
                    );
                    return Err((
                        CredentialProblem::Unusable,
                        format!("the credential for this identity and destination could not be issued: {e}"),
                    ));
                }
            }
        }
        let now = std::time::SystemTime::now();
        if credential.expired(now) {
            let at =
                credential.expires_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()).unwrap_or_default();
            tracing::error!(
                target: FINDING_TARGET,
                conn_id = self.conn.id,
                identity = identity.uri,
                host,
                credential_entry = credential.entry,
                expired_at = at,
                "the held credential has expired and was not refreshed: not sent, the request is refused"
            );
            if let Some(s) = &self.session {
                s.event(
                    EventKind::Error,
                    json!({ "error": "credential_expired", "credential_entry": credential.entry, "expired_at": at }),
                );
            }
            return Err((
                CredentialProblem::Expired,
                format!("the credential held for this identity and destination expired at {at} and was not refreshed"),
            ));
        }
        Ok(credential)
    }

    /// Injects the credential the gateway holds for the caller and the
    /// request's host (`credential: inject`) through `apply`, the handler's
    /// protocol-specific part, replacing whatever the job put in the
    /// injection's header or parameter. Without a held credential, or when
    /// it cannot be rendered, the request is refused (and recorded as such):
    /// never sent without the credential the policy says it must carry.
    pub async fn inject(&self, req: &Judged, apply: &mut SwapFn<'_>) -> Result<(), Refusal> {
        let identity = &self.conn.caller.identity;
        let host = req.host.as_str();
        let injected = match self.usable_credential(host).await {
            Err(problem) => Err(problem),
            Ok(credential) => self
                .swap(&credential, host, &req.verified)
                .and_then(|rendered| apply(&[], &rendered))
                .map(|()| credential.entry)
                .map_err(|e| {
                    (
                        CredentialProblem::Unusable,
                        format!("the credential held for this identity and destination could not be used: {e}"),
                    )
                }),
        };
        match injected {
            Ok(entry) => {
                tracing::info!(
                    target: FINDING_TARGET,
                    conn_id = self.conn.id,
                    identity = identity.uri,
                    host,
                    credential_entry = entry,
                    "injected the gateway-held credential"
                );
                Ok(())
            }
            Err((problem, detail)) => {
                let reason = Reason::CredentialUnavailable(Box::new(Unavailable {
                    identity: identity.uri.clone(),
                    host: host.to_owned(),
                    problem,
                    detail,
                    findings: Vec::new(),
                }));
                Err(self.refuse(reason, "credential"))
            }
        }
    }

    /// Renders the credential the gateway holds for this caller and `host`.
    fn swap(
        &self,
        credential: &crate::credentials::Credential,
        host: &str,
        verified: &BTreeMap<String, String>,
    ) -> Result<RenderedInjection, String> {
        let identity = &self.conn.caller.identity;
        let mut job = self.conn.caller.job.clone();
        // Verified OIDC claims win over the job's own environment.
        job.extend(verified.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mint = MintRequest {
            subject: identity.uri.clone(),
            audience: host.to_owned(),
            labels: identity.labels.clone(),
            job,
        };
        prepare(credential, self.gate.minter.as_deref(), &mint).map_err(|e| e.to_string())
    }

    /// The sender's command line (masked) and script, read from /proc while
    /// the request's connection is still open (so the pid is still the
    /// sender's). Read only when a key was found: never on the clean path.
    fn origin(&self, secrets: &[(Secret, String)]) -> crate::findings::origin::Origin {
        let p = &self.conn.caller.process;
        let masker = self.gate.masks.recording();
        crate::findings::origin::Origin::read(p.pid, p.exe.as_deref(), secrets, |text| {
            masker.mask_text(text).into_owned()
        })
    }

    fn snapshot(&self, verified: &BTreeMap<String, String>) -> crate::process::ProcessSnapshot {
        let caller = &self.conn.caller;
        let p = &caller.process;
        let mut job = caller.job.clone();
        job.extend(verified.iter().map(|(k, v)| (format!("oidc.{k}"), v.clone())));
        p.snapshot(job)
    }

    /// Holds the caller's request until its approval is decided, recording
    /// the request and the decision. `Ok` releases it.
    pub async fn approve(&self, ask: ApprovalAsk<'_>) -> Result<(), Refusal> {
        let ApprovalAsk { rule, spec, method, url, destination, body_preview } = ask;
        let caller = &self.conn.caller;
        let session = self.session.as_deref();
        let p = &caller.process;
        let new = NewApproval {
            identity: caller.identity.uri.clone(),
            identity_labels: caller.identity.labels.clone(),
            // The job's variables are the request's own `job`.
            process: p.snapshot(BTreeMap::new()),
            job: caller.job.clone(),
            session_id: session.map(|s| s.id().as_str().to_owned()),
            method,
            url,
            destination,
            body_preview,
            rule: rule.to_owned(),
            requesters: Vec::new(),
            cgroup_id: p.cgroup_id,
        };
        let approval_spec = approval::ApprovalSpec::from(spec);
        if let Some(s) = session {
            s.event(
                EventKind::ApprovalRequested,
                json!({ "rule": rule, "group": spec.group, "min_approvals": spec.min_approvals }),
            );
        }
        tracing::info!(target: POLICY_TARGET, conn_id = self.conn.id, rule, group = spec.group, identity = caller.identity.uri, "held for approval");
        let outcome = {
            let _pending = self.gate.metrics.approval_pending();
            self.gate.approvals.request(new, &approval_spec).await
        };
        self.gate.metrics.approval_decided(match &outcome {
            approval::Outcome::Approved { .. } => ApprovalOutcome::Approved,
            approval::Outcome::Denied { .. } => ApprovalOutcome::Denied,
            approval::Outcome::TimedOut { .. } => ApprovalOutcome::TimedOut,
            approval::Outcome::Limited(_) => ApprovalOutcome::Limited,
            approval::Outcome::Failed { .. } => ApprovalOutcome::Failed,
        });
        let not_approved = |approval: Option<String>, outcome: NotApproved, message: String| Reason::NotApproved {
            approval,
            outcome,
            message,
            reason: spec.reason.clone(),
        };
        let (result, event) = match outcome {
            approval::Outcome::Approved { id, by } => {
                (Ok(()), json!({ "approval": id.to_string(), "outcome": "approved", "by": by }))
            }
            approval::Outcome::Denied { id, by, comment } => {
                let event = json!({ "approval": id.to_string(), "outcome": "denied", "by": by });
                let comment = comment.as_deref().map(|c| format!(": {c}")).unwrap_or_default();
                let message = format!("Approval {id} was denied by {by}{comment}.");
                (Err(not_approved(Some(id.to_string()), NotApproved::Denied, message)), event)
            }
            approval::Outcome::TimedOut { id } => {
                let message = format!(
                    "Nobody approved request {id} within {}; it was not sent.",
                    humantime::format_duration(spec.timeout)
                );
                let event = json!({ "approval": id.to_string(), "outcome": "timed_out" });
                (Err(not_approved(Some(id.to_string()), NotApproved::TimedOut, message)), event)
            }
            approval::Outcome::Limited(limit) => {
                let event =
                    json!({ "outcome": "refused", "reason": "limit", "limit": limit.limit.as_str(), "max": limit.max });
                let message = format!(
                    "This request needs approval, but {limit}; it was not sent. Retry once earlier requests are decided."
                );
                (Err(not_approved(None, NotApproved::Limited, message)), event)
            }
            approval::Outcome::Failed { reason } => {
                let event = json!({ "outcome": "failed", "reason": reason });
                let message =
                    format!("This request needs approval, which could not be requested ({reason}); it was not sent.");
                (Err(not_approved(None, NotApproved::Unavailable, message)), event)
            }
        };
        if let Some(s) = session {
            s.event(EventKind::ApprovalDecided, event);
        }
        result.map_err(|reason| self.refuse(reason, rule))
    }
}

/// What a held request asks approvers for.
pub struct ApprovalAsk<'a> {
    /// The policy rule that requires approval.
    pub rule: &'a str,
    /// Its approval settings.
    pub spec: &'a policy::ApprovalSpec,
    /// Request method (`CONNECT` for a non-HTTP connection).
    pub method: String,
    /// URL, secrets masked.
    pub url: String,
    /// `host:port`.
    pub destination: String,
    /// The start of the body, secrets masked.
    pub body_preview: String,
}

fn record_level(level: policy::RecordLevel) -> RecordLevel {
    match level {
        policy::RecordLevel::Full => RecordLevel::Full,
        policy::RecordLevel::Metadata => RecordLevel::Metadata,
        policy::RecordLevel::None => RecordLevel::None,
    }
}
