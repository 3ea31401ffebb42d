//! Validation and compilation of a policy file: every rule is checked, and
//! every error is reported with its line and column.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use http::HeaderName;
use ipnet::{IpNet, Ipv4Net};

use super::compiled::{digest, Outcome, Policy, PolicySource, RelationGlobs, Rule, Selectors};
use super::decision::{
    Action, ApprovalSpec, MaskRule, MaskRules, NamedPattern, RecordLevel, Uninspectable, DEFAULT_RULE,
    UNCLASSIFIED_RULE,
};
use super::error::{segments, strip_location, Locator, PolicyError, Seg};
use super::facts::Protocol;
use super::glob::GlobList;
use super::model::{
    ActionKind, ApprovalSpecRaw, DefaultsSpec, FileSpec, MaskRulesSpec, MaskSetting, MaskSpec, MatchSpec, OneOrMany,
    PostgresSpec, RuleSpec,
};
use super::PolicyContext;
use crate::postgres::sql::StatementKind;

/// The only `version` this gateway reads.
pub const POLICY_VERSION: u32 = 1;

/// How long a held request waits for approval when `approval.timeout` is
/// not given.
pub const DEFAULT_APPROVAL_TIMEOUT: Duration = Duration::from_secs(600);

/// Compiles `text`, naming `path` in errors.
pub(super) fn compile(path: &Path, text: &str, context: &PolicyContext) -> Result<Policy, Vec<PolicyError>> {
    let mut c = Compiler {
        path,
        context,
        locator: Locator::new(text),
        errors: Vec::new(),
        warnings: Vec::new(),
        masks: Vec::new(),
    };
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let spec: FileSpec = match serde_path_to_error::deserialize(de) {
        Ok(spec) => spec,
        Err(e) => {
            let message = match e.path().to_string().as_str() {
                "." => strip_location(&e.inner().to_string()),
                at => format!("{at}: {}", strip_location(&e.inner().to_string())),
            };
            let (line, column) = match e.inner().location() {
                Some(l) => (l.line(), l.column()),
                None => c.locator.locate(&segments(e.path()), false),
            };
            return Err(vec![PolicyError { file: path.to_owned(), line, column, rule: None, message }]);
        }
    };
    if spec.version != POLICY_VERSION {
        c.err(
            None,
            vec![Seg::key("version")],
            false,
            format!("unsupported version {} (expected {POLICY_VERSION})", spec.version),
        );
    }
    let default = c.defaults(spec.defaults);
    let mut names = HashMap::new();
    let specs = spec.rules.unwrap_or_default();
    let mut rules = Vec::with_capacity(specs.len());
    for (index, value) in specs.into_iter().enumerate() {
        if let Some(rule) = c.rule(index, value, &default, &mut names) {
            rules.push(rule);
        }
    }
    let Some(default) = default.filter(|_| c.errors.is_empty()) else {
        // In file order, whatever order the checks ran in.
        c.errors.sort_by_key(|e| (e.line, e.column));
        return Err(c.errors);
    };
    let mut warnings = std::mem::take(&mut c.warnings);
    warnings.extend(unreachable(&c, &rules));
    warnings.sort_by_key(|e| (e.line, e.column));
    Ok(Policy {
        source: PolicySource::File(path.to_owned()),
        digest: digest(text.as_bytes()),
        rules,
        default,
        masks: c.masks,
        warnings,
        unclassified: super::compiled::unclassified_action(),
    })
}

/// Rules after one that matches everything can never decide.
fn unreachable(c: &Compiler<'_>, rules: &[Rule]) -> Vec<PolicyError> {
    let Some(at) = rules.iter().position(|r| r.selectors.is_empty()) else { return Vec::new() };
    if at + 1 >= rules.len() {
        return Vec::new();
    }
    let next = at + 1;
    let (line, column) = c.locator.locate(&rule_path(next), false);
    vec![PolicyError {
        file: c.path.to_owned(),
        line,
        column,
        rule: Some(next),
        message: format!(
            "this rule and the {} after it are unreachable: rule `{}` matches every request",
            rules.len() - next - 1,
            rules[at].name
        ),
    }]
}

fn rule_path(index: usize) -> Vec<Seg> {
    vec![Seg::key("rules"), Seg::Index(index)]
}

fn with(base: &[Seg], more: &[&str]) -> Vec<Seg> {
    let mut p = base.to_vec();
    p.extend(more.iter().map(|k| Seg::key(k)));
    p
}

fn push(mut path: Vec<Seg>, seg: Seg) -> Vec<Seg> {
    path.push(seg);
    path
}

/// The defaults every rule inherits from.
struct Inherited {
    static_keys: Option<super::decision::StaticKeyAction>,
    credential: super::decision::CredentialUse,
    mask_id: Option<usize>,
    record: RecordLevel,
    uninspectable: Uninspectable,
}

struct Compiler<'a> {
    path: &'a Path,
    context: &'a PolicyContext,
    locator: Locator<'a>,
    errors: Vec<PolicyError>,
    warnings: Vec<PolicyError>,
    masks: Vec<MaskRule>,
}

impl Compiler<'_> {
    fn err(&mut self, rule: Option<usize>, at: Vec<Seg>, at_key: bool, message: String) {
        let (line, column) = self.locator.locate(&at, at_key);
        self.errors.push(PolicyError { file: self.path.to_owned(), line, column, rule, message });
    }

    fn warn(&mut self, rule: Option<usize>, at: Vec<Seg>, message: String) {
        let (line, column) = self.locator.locate(&at, false);
        self.warnings.push(PolicyError { file: self.path.to_owned(), line, column, rule, message });
    }

    /// Types a rule or `defaults` from its YAML value.
    fn typed<T: serde::de::DeserializeOwned>(
        &mut self,
        rule: Option<usize>,
        base: &[Seg],
        value: serde_yaml_ng::Value,
    ) -> Option<T> {
        match serde_path_to_error::deserialize(value) {
            Ok(t) => Some(t),
            Err(e) => {
                let message = e.inner().to_string();
                let mut at = base.to_vec();
                at.extend(segments(e.path()));
                let relative = e.path().to_string();
                let message = if relative == "." { message } else { format!("{relative}: {message}") };
                let at_key = message.contains("unknown field");
                self.err(rule, at, at_key, strip_location(&message));
                None
            }
        }
    }

    fn defaults(&mut self, value: serde_yaml_ng::Value) -> Option<Outcome> {
        let base = vec![Seg::key("defaults")];
        let spec: DefaultsSpec = self.typed(None, &base, value)?;
        let before = self.errors.len();
        let action = match spec.action {
            ActionKind::Allow => {
                if spec.reason.is_some() {
                    self.err(None, with(&base, &["reason"]), true, "`reason` is only used with `action: deny`".into());
                }
                Action::Allow
            }
            ActionKind::Deny => {
                Action::Deny { reason: spec.reason.unwrap_or_else(|| "denied by the policy's default rule".into()) }
            }
            ActionKind::RequireApproval => {
                self.err(None, with(&base, &["action"]), false, "the default action must be `allow` or `deny`".into());
                Action::Allow
            }
        };
        let mask_id = match spec.mask {
            None | Some(MaskSetting::Off) => None,
            Some(MaskSetting::On(m)) => self.mask(None, &with(&base, &["mask"]), m),
        };
        let uninspectable = spec.uninspectable.unwrap_or_default();
        if uninspectable == Uninspectable::Pass {
            self.warn(
                None,
                with(&base, &["uninspectable"]),
                "`uninspectable: pass` in `defaults` passes every intercepted destination the gateway cannot \
                 inspect unless a rule says otherwise: opt destinations out in rules instead"
                    .into(),
            );
        }
        let outcome = Outcome {
            action,
            static_keys: spec.static_keys,
            credential: spec.credential.unwrap_or_default(),
            mask_id,
            record: spec.record.unwrap_or_default(),
            uninspectable,
        };
        if self.errors.len() == before {
            self.check_credentials(None, &base, DEFAULT_RULE, &outcome, None);
        }
        (self.errors.len() == before).then_some(outcome)
    }

    fn rule(
        &mut self,
        index: usize,
        value: serde_yaml_ng::Value,
        default: &Option<Outcome>,
        names: &mut HashMap<String, usize>,
    ) -> Option<Rule> {
        let base = rule_path(index);
        let spec: RuleSpec = self.typed(Some(index), &base, value)?;
        let before = self.errors.len();
        let name = match spec.name {
            Some(name) => {
                let problem = if name.trim().is_empty() {
                    Some("empty rule name".to_owned())
                } else if name.starts_with('#') {
                    Some(format!("rule names may not start with `#` (reserved for unnamed rules: `#{index}`)"))
                } else if name == DEFAULT_RULE {
                    Some(format!("`{DEFAULT_RULE}` is reserved for the closing default rule"))
                } else if name == UNCLASSIFIED_RULE {
                    Some(format!(
                        "`{UNCLASSIFIED_RULE}` is reserved for refusals of statements the gateway cannot classify"
                    ))
                } else {
                    names.get(&name).map(|first| format!("duplicate rule name `{name}` (first at rule #{first})"))
                };
                match problem {
                    Some(m) => self.err(Some(index), with(&base, &["name"]), false, m),
                    None => {
                        names.insert(name.clone(), index);
                    }
                }
                name
            }
            None => format!("#{index}"),
        };
        let selectors = self.selectors(index, &with(&base, &["match"]), spec.selectors);
        let kind = spec.action;
        let action = self.action(index, &base, &name, kind, spec.reason, spec.approval);
        self.check_uninspectable(index, &base, kind, spec.uninspectable, selectors.as_ref());
        let inherited = match default {
            Some(d) => Inherited {
                static_keys: d.static_keys,
                credential: d.credential,
                mask_id: d.mask_id,
                record: d.record,
                uninspectable: d.uninspectable,
            },
            None => Inherited {
                static_keys: None,
                credential: super::decision::CredentialUse::AsSent,
                mask_id: None,
                record: RecordLevel::Full,
                uninspectable: Uninspectable::Refuse,
            },
        };
        let mask_id = match spec.mask {
            None => inherited.mask_id,
            Some(MaskSetting::Off) => None,
            Some(MaskSetting::On(m)) => self.mask(Some(index), &with(&base, &["mask"]), m),
        };
        if self.errors.len() > before {
            return None;
        }
        let outcome = Outcome {
            action: action?,
            static_keys: spec.static_keys.or(inherited.static_keys),
            credential: spec.credential.unwrap_or(inherited.credential),
            mask_id,
            record: spec.record.unwrap_or(inherited.record),
            uninspectable: spec.uninspectable.unwrap_or(inherited.uninspectable),
        };
        let selectors = selectors?;
        self.check_credentials(Some(index), &base, &name, &outcome, selectors.host.as_ref());
        Some(Rule { name, selectors, outcome })
    }

    /// A rule that swaps or injects credentials needs a held credential for
    /// its hosts: warned about (naming the hosts) when the configuration's
    /// `credentials.credentials` names none of them, since such requests
    /// would be refused. Host patterns with wildcards are only checked
    /// against an empty credential list: entry globs and rule globs cannot
    /// be compared exactly.
    fn check_credentials(
        &mut self,
        index: Option<usize>,
        base: &[Seg],
        name: &str,
        outcome: &Outcome,
        hosts: Option<&super::glob::GlobList>,
    ) {
        use super::decision::{CredentialUse, StaticKeyAction};
        let Some(entries) = self.context.credentials.clone() else { return };
        if matches!(outcome.action, Action::Deny { .. }) {
            return;
        }
        let what = match (outcome.credential, outcome.static_keys) {
            (CredentialUse::Inject, _) => "injects",
            (_, Some(StaticKeyAction::Swap)) => "swaps in",
            _ => return,
        };
        let uncovered: Vec<&str> = match hosts {
            _ if entries.is_empty() => vec!["any host"],
            None => return,
            Some(hosts) => hosts
                .sources()
                .iter()
                .filter(|h| !h.contains('*') && !crate::credentials::store::any_entry_for_host(&entries, h))
                .map(String::as_str)
                .collect(),
        };
        if uncovered.is_empty() {
            return;
        }
        let message = format!(
            "rule `{name}` {what} the gateway-held credential, but no `credentials.credentials` entry is held for {}: \
             its requests will be refused (\"no credential held for this identity and destination\")",
            uncovered.iter().map(|h| format!("`{h}`")).collect::<Vec<_>>().join(", ")
        );
        self.warn(index, base.to_vec(), message);
    }

    /// A rule's own `uninspectable` must be able to apply: not on a `deny`
    /// (refused either way), and `pass` not behind request selectors, which
    /// connection-level judgements never match and which test what the job
    /// itself sends.
    fn check_uninspectable(
        &mut self,
        index: usize,
        base: &[Seg],
        kind: ActionKind,
        value: Option<Uninspectable>,
        selectors: Option<&Selectors>,
    ) {
        let Some(value) = value else { return };
        let at = with(base, &["uninspectable"]);
        if kind == ActionKind::Deny {
            self.err(
                Some(index),
                at,
                false,
                format!(
                    "`uninspectable: {}` has no effect with `action: deny`: the destination is refused either way",
                    value.as_str()
                ),
            );
        } else if value == Uninspectable::Pass && selectors.is_some_and(|s| s.needs_request() || s.needs_statement()) {
            self.err(
                Some(index),
                at,
                false,
                "`uninspectable: pass` can never apply to a rule with `match.request` or statement selectors: \
                 what the gateway cannot understand is judged per connection, without a request (use \
                 `scan_raw`, or a rule matching on identity and destination only)"
                    .into(),
            );
        }
    }

    fn action(
        &mut self,
        index: usize,
        base: &[Seg],
        name: &str,
        kind: ActionKind,
        reason: Option<String>,
        approval: Option<ApprovalSpecRaw>,
    ) -> Option<Action> {
        let rule = Some(index);
        if kind != ActionKind::RequireApproval && approval.is_some() {
            self.err(
                rule,
                with(base, &["approval"]),
                true,
                "`approval` is only used with `action: require_approval`".into(),
            );
        }
        match kind {
            ActionKind::Allow => {
                if reason.is_some() {
                    self.err(
                        rule,
                        with(base, &["reason"]),
                        true,
                        "`reason` is only used with `deny` and `require_approval`".into(),
                    );
                }
                Some(Action::Allow)
            }
            ActionKind::Deny => {
                Some(Action::Deny { reason: reason.unwrap_or_else(|| format!("denied by policy rule `{name}`")) })
            }
            ActionKind::RequireApproval => {
                let Some(a) = approval else {
                    self.err(
                        rule,
                        with(base, &["action"]),
                        false,
                        "`require_approval` needs an `approval` section (group, min_approvals, timeout)".into(),
                    );
                    return None;
                };
                let at = with(base, &["approval"]);
                let before = self.errors.len();
                if a.group.trim().is_empty() {
                    self.err(rule, with(&at, &["group"]), false, "empty approval group".into());
                }
                let min = a.min_approvals.unwrap_or(1);
                let min_approvals = match u32::try_from(min) {
                    Ok(n) if n >= 1 => n,
                    _ => {
                        self.err(
                            rule,
                            with(&at, &["min_approvals"]),
                            false,
                            format!("min_approvals must be at least 1 (got {min})"),
                        );
                        1
                    }
                };
                let timeout = a.timeout.unwrap_or(DEFAULT_APPROVAL_TIMEOUT);
                if timeout.is_zero() {
                    self.err(rule, with(&at, &["timeout"]), false, "approval timeout must be longer than 0s".into());
                }
                let reason =
                    reason.unwrap_or_else(|| format!("approval by `{}` required by policy rule `{name}`", a.group));
                let spec = ApprovalSpec { group: a.group, min_approvals, timeout, reason };
                // Only a spec that is valid in itself is judged by the configuration.
                if let Some(check) = self.context.approval_check.as_ref().filter(|_| self.errors.len() == before) {
                    if let Err(message) = check(&spec) {
                        self.err(rule, at, true, format!("{message} (see `approvals` in the gateway configuration)"));
                    }
                }
                Some(Action::RequireApproval(spec))
            }
        }
    }

    /// Compiles `values` into a glob list, reporting errors at the value
    /// (or the failing element of a list).
    fn globs(
        &mut self,
        rule: usize,
        at: Vec<Seg>,
        spec: Option<OneOrMany<String>>,
        case_insensitive: bool,
        check: impl Fn(&str) -> Option<String>,
    ) -> Option<Option<GlobList>> {
        let Some(spec) = spec else { return Some(None) };
        let (values, is_list) = spec.into_parts();
        let element = |i: usize| if is_list { push(at.clone(), Seg::Index(i)) } else { at.clone() };
        if values.is_empty() {
            self.err(Some(rule), at.clone(), false, "empty list: give at least one value, or omit the selector".into());
            return None;
        }
        let mut ok = true;
        for (i, v) in values.iter().enumerate() {
            if let Some(m) = check(v) {
                self.err(Some(rule), element(i), false, m);
                ok = false;
            }
        }
        if !ok {
            return None;
        }
        match GlobList::new(values, case_insensitive) {
            Ok(g) => Some(Some(g)),
            Err(e) => {
                let at = e.index.map_or_else(|| at.clone(), element);
                self.err(Some(rule), at, false, e.message);
                None
            }
        }
    }

    fn selectors(&mut self, rule: usize, base: &[Seg], spec: MatchSpec) -> Option<Selectors> {
        let before = self.errors.len();
        let mut s = Selectors::default();
        if let Some(id) = spec.identity {
            let at = with(base, &["identity"]);
            s.uri = self.globs(rule, with(&at, &["uri"]), id.uri, false, |_| None).flatten();
            for (what, map) in [("labels", id.labels), ("claims", id.claims)] {
                let mut out = Vec::with_capacity(map.len());
                for (key, values) in map {
                    let key_at = with(&at, &[what, &key]);
                    if key.is_empty() {
                        self.err(Some(rule), key_at.clone(), true, format!("empty {what} key"));
                    }
                    if let Some(g) = self.globs(rule, key_at, Some(values), false, |_| None).flatten() {
                        out.push((key, g));
                    }
                }
                if what == "labels" {
                    s.labels = out;
                } else {
                    s.claims = out;
                }
            }
            s.unmapped = id.unmapped;
        }
        if let Some(dst) = spec.destination {
            let at = with(base, &["destination"]);
            let hosts = dst.host.map(|h| match h {
                OneOrMany::One(v) => OneOrMany::One(normalize_host(&v)),
                OneOrMany::Many(v) => OneOrMany::Many(v.iter().map(|h| normalize_host(h)).collect()),
            });
            s.host = self.globs(rule, with(&at, &["host"]), hosts, true, check_host).flatten();
            if let Some(ports) = dst.port {
                let (ports, is_list) = ports.into_parts();
                if ports.is_empty() {
                    self.err(
                        Some(rule),
                        with(&at, &["port"]),
                        false,
                        "empty list: give at least one port, or omit the selector".into(),
                    );
                }
                for (i, p) in ports.into_iter().enumerate() {
                    match u16::try_from(p) {
                        Ok(p) if p > 0 => s.ports.push(p),
                        _ => {
                            let mut where_ = with(&at, &["port"]);
                            if is_list {
                                where_.push(Seg::Index(i));
                            }
                            self.err(Some(rule), where_, false, format!("port {p} is out of range (1-65535)"));
                        }
                    }
                }
            }
            if let Some(cidrs) = dst.cidr {
                let (cidrs, is_list) = cidrs.into_parts();
                if cidrs.is_empty() {
                    self.err(
                        Some(rule),
                        with(&at, &["cidr"]),
                        false,
                        "empty list: give at least one network, or omit the selector".into(),
                    );
                }
                for (i, c) in cidrs.iter().enumerate() {
                    match parse_cidr(c) {
                        Ok(net) => s.cidrs.push(net),
                        Err(m) => {
                            let where_ =
                                if is_list { push(with(&at, &["cidr"]), Seg::Index(i)) } else { with(&at, &["cidr"]) };
                            self.err(Some(rule), where_, false, m);
                        }
                    }
                }
            }
            if let Some(protocols) = dst.protocol {
                let (protocols, _) = protocols.into_parts();
                if protocols.is_empty() {
                    self.err(
                        Some(rule),
                        with(&at, &["protocol"]),
                        false,
                        "empty list: give at least one protocol, or omit the selector".into(),
                    );
                }
                s.protocols = protocols.iter().fold(0, |bits, p| bits | p.bit());
            }
        }
        if let Some(req) = spec.request {
            let at = with(base, &["request"]);
            if let Some(methods) = req.method {
                let (methods, is_list) = methods.into_parts();
                if methods.is_empty() {
                    self.err(
                        Some(rule),
                        with(&at, &["method"]),
                        false,
                        "empty list: give at least one method, or omit the selector".into(),
                    );
                }
                for (i, m) in methods.into_iter().enumerate() {
                    if m.is_empty() || http::Method::from_bytes(m.as_bytes()).is_err() {
                        let mut where_ = with(&at, &["method"]);
                        if is_list {
                            where_.push(Seg::Index(i));
                        }
                        self.err(Some(rule), where_, false, format!("`{m}` is not an HTTP method"));
                    } else {
                        s.methods.push(m.to_ascii_uppercase());
                    }
                }
            }
            let case_sensitive = req.case_sensitive.unwrap_or(false);
            if req.case_sensitive.is_some() && req.path.is_none() && req.rpc.is_none() {
                self.err(
                    Some(rule),
                    with(&at, &["case_sensitive"]),
                    true,
                    "`case_sensitive` applies to `path` and `rpc`: give one of them".into(),
                );
            }
            s.path = self.globs(rule, with(&at, &["path"]), req.path, !case_sensitive, check_path).flatten();
            s.rpc = self.globs(rule, with(&at, &["rpc"]), req.rpc, !case_sensitive, check_rpc).flatten();
            if let Some(h) = req.headers {
                s.present = self.header_names(rule, with(&at, &["headers", "present"]), h.present);
                s.absent = self.header_names(rule, with(&at, &["headers", "absent"]), h.absent);
            }
            if s.protocols == Protocol::Tcp.bit() && s.needs_request() {
                self.err(
                    Some(rule),
                    at,
                    true,
                    "request selectors never match `protocol: tcp` (a tcp connection has no HTTP request)".into(),
                );
            }
        }
        if let Some(pg) = spec.postgres {
            self.postgres(rule, &with(base, &["postgres"]), pg, &mut s);
        }
        (self.errors.len() == before).then_some(s)
    }

    /// `match.postgres`: database and user globs, statement kinds,
    /// relation patterns and `where`.
    fn postgres(&mut self, rule: usize, at: &[Seg], spec: PostgresSpec, s: &mut Selectors) {
        s.databases = self.name_globs(rule, with(at, &["database"]), spec.database, "database");
        s.users = self.name_globs(rule, with(at, &["user"]), spec.user, "user");
        if let Some(kinds) = spec.kind {
            let (kinds, is_list) = kinds.into_parts();
            if kinds.is_empty() {
                self.err(
                    Some(rule),
                    with(at, &["kind"]),
                    false,
                    "empty list: give at least one statement kind, or omit the selector".into(),
                );
            }
            for (i, k) in kinds.iter().enumerate() {
                match StatementKind::bits_of_name(k) {
                    Some(bits) => s.kinds |= bits,
                    None => {
                        let where_ =
                            if is_list { push(with(at, &["kind"]), Seg::Index(i)) } else { with(at, &["kind"]) };
                        self.err(
                            Some(rule),
                            where_,
                            false,
                            format!("`{k}` is not a statement kind (one of {})", StatementKind::NAMES.join(", ")),
                        );
                    }
                }
            }
        }
        s.relations = self.relation_globs(rule, with(at, &["relations"]), spec.relations);
        s.only_relations = self.relation_globs(rule, with(at, &["only_relations"]), spec.only_relations);
        if let Some(w) = spec.has_where {
            s.has_where = Some(w);
            let row_kinds =
                StatementKind::bits_of_name("update").unwrap_or(0) | StatementKind::bits_of_name("delete").unwrap_or(0);
            if s.kinds != 0 && s.kinds & row_kinds == 0 {
                self.err(
                    Some(rule),
                    with(at, &["where"]),
                    true,
                    "`where` only matches `update` and `delete` statements: add one of them to `kind`".into(),
                );
            }
        }
        if s.protocols != 0 && s.protocols & Protocol::Postgres.bit() == 0 {
            self.err(
                Some(rule),
                at.to_vec(),
                true,
                "`match.postgres` only matches `protocol: postgres`: this rule's protocols exclude it".into(),
            );
        }
        if s.needs_request() {
            self.err(
                Some(rule),
                at.to_vec(),
                true,
                "a rule cannot match both `request` (HTTP) and `postgres`: split it in two".into(),
            );
        }
    }

    /// Case-sensitive globs over PostgreSQL names (databases, users,
    /// columns), which are stored as written.
    fn name_globs(
        &mut self,
        rule: usize,
        at: Vec<Seg>,
        spec: Option<OneOrMany<String>>,
        what: &str,
    ) -> Option<GlobList> {
        let spec = spec?;
        let (values, is_list) = spec.into_parts();
        if values.is_empty() {
            self.err(Some(rule), at, false, format!("empty list: give at least one {what}, or omit the selector"));
            return None;
        }
        match GlobList::names(values, false) {
            Ok(g) => Some(g),
            Err(e) => {
                let at = match e.index {
                    Some(i) if is_list => push(at, Seg::Index(i)),
                    _ => at,
                };
                self.err(Some(rule), at, false, e.message);
                None
            }
        }
    }

    /// `relations` / `only_relations`: `name` or `schema.name` globs.
    fn relation_globs(&mut self, rule: usize, at: Vec<Seg>, spec: Option<OneOrMany<String>>) -> Option<RelationGlobs> {
        let spec = spec?;
        let (values, is_list) = spec.into_parts();
        if values.is_empty() {
            self.err(Some(rule), at, false, "empty list: give at least one relation, or omit the selector".into());
            return None;
        }
        let mut patterns = Vec::with_capacity(values.len());
        let mut ok = true;
        for (i, v) in values.iter().enumerate() {
            let element = if is_list { push(at.clone(), Seg::Index(i)) } else { at.clone() };
            let (schema, name) = match v.split_once('.') {
                Some((schema, name)) => (Some(schema), name),
                None => (None, v.as_str()),
            };
            let problem = if name.contains('.') {
                Some(format!(
                    "relation `{v}` must be `name` or `schema.name` (the database is `match.postgres.database`)"
                ))
            } else if schema == Some("") || name.is_empty() {
                Some(format!("relation `{v}` has an empty schema or name"))
            } else {
                None
            };
            if let Some(m) = problem {
                self.err(Some(rule), element, false, m);
                ok = false;
                continue;
            }
            if v.chars().any(|c| c.is_ascii_uppercase()) {
                self.warn(
                    Some(rule),
                    element.clone(),
                    format!(
                        "relation `{v}` has upper-case letters: it only matches quoted identifiers \
                         (PostgreSQL folds unquoted names to lower case)"
                    ),
                );
            }
            // `*.name` admits every schema: the same as `name`.
            let schema = schema.filter(|s| *s != "*");
            let schema = match schema.map(|s| GlobList::names(vec![s.to_owned()], false)).transpose() {
                Ok(g) => g,
                Err(e) => {
                    self.err(Some(rule), element, false, e.message);
                    ok = false;
                    continue;
                }
            };
            match GlobList::names(vec![name.to_owned()], false) {
                Ok(n) => patterns.push((schema, n)),
                Err(e) => {
                    self.err(Some(rule), element, false, e.message);
                    ok = false;
                }
            }
        }
        ok.then_some(RelationGlobs { sources: values, patterns })
    }

    fn header_names(&mut self, rule: usize, at: Vec<Seg>, spec: Option<OneOrMany<String>>) -> Vec<HeaderName> {
        let Some(spec) = spec else { return Vec::new() };
        let (names, is_list) = spec.into_parts();
        let mut out = Vec::with_capacity(names.len());
        for (i, n) in names.into_iter().enumerate() {
            match HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes()) {
                Ok(h) => out.push(h),
                Err(_) => {
                    let where_ = if is_list { push(at.clone(), Seg::Index(i)) } else { at.clone() };
                    self.err(Some(rule), where_, false, format!("`{n}` is not a header name"));
                }
            }
        }
        out
    }

    /// Validates a masking spec and returns its id in `masks` (identical
    /// specs share one id).
    fn mask(&mut self, rule: Option<usize>, at: &[Seg], spec: MaskSpec) -> Option<usize> {
        let before = self.errors.len();
        let rules = match spec.rules {
            None => MaskRules::Only(Vec::new()),
            Some(MaskRulesSpec::All) => MaskRules::All,
            Some(MaskRulesSpec::Only(ids)) => {
                for (i, id) in ids.iter().enumerate() {
                    if id.trim().is_empty() || id.chars().any(char::is_whitespace) {
                        self.err(
                            rule,
                            push(with(at, &["rules"]), Seg::Index(i)),
                            false,
                            format!("`{id}` is not a rule id"),
                        );
                    }
                }
                MaskRules::Only(ids)
            }
        };
        let mut patterns: Vec<NamedPattern> = Vec::with_capacity(spec.patterns.len());
        for (i, p) in spec.patterns.into_iter().enumerate() {
            let p_at = push(with(at, &["patterns"]), Seg::Index(i));
            if p.name.trim().is_empty() {
                self.err(rule, with(&p_at, &["name"]), false, "empty pattern name".into());
            } else if patterns.iter().any(|q| q.name == p.name) {
                self.err(rule, with(&p_at, &["name"]), false, format!("duplicate pattern name `{}`", p.name));
            }
            match regex::Regex::new(&p.regex) {
                Err(e) => {
                    let why = e.to_string().lines().last().unwrap_or("invalid").trim().to_owned();
                    self.err(rule, with(&p_at, &["regex"]), false, format!("bad regex: {why}"));
                }
                Ok(r) if r.is_match("") => {
                    self.err(rule, with(&p_at, &["regex"]), false, "regex matches the empty string".into());
                }
                Ok(_) => {}
            }
            patterns.push(NamedPattern { name: p.name, regex: p.regex });
        }
        for (i, f) in spec.json_fields.iter().enumerate() {
            if f.is_empty() {
                self.err(rule, push(with(at, &["json_fields"]), Seg::Index(i)), false, "empty JSON field name".into());
            }
        }
        for (i, c) in spec.columns.iter().enumerate() {
            if let Err(e) = GlobList::names(vec![c.clone()], false) {
                self.err(rule, push(with(at, &["columns"]), Seg::Index(i)), false, e.message);
            }
        }
        let m = MaskRule { rules, patterns, json_fields: spec.json_fields, columns: spec.columns };
        if m.rules == MaskRules::Only(Vec::new())
            && m.patterns.is_empty()
            && m.json_fields.is_empty()
            && m.columns.is_empty()
        {
            self.err(
                rule,
                at.to_vec(),
                false,
                "mask masks nothing: give rules, patterns, json_fields or columns (or `mask: false`)".into(),
            );
        }
        if self.errors.len() > before {
            return None;
        }
        Some(self.masks.iter().position(|x| *x == m).unwrap_or_else(|| {
            self.masks.push(m);
            self.masks.len() - 1
        }))
    }
}

/// Host patterns compare lowercase; a trailing dot and IPv6 brackets are
/// dropped as they are from facts.
fn normalize_host(h: &str) -> String {
    let h = h.strip_suffix('.').unwrap_or(h);
    let h = h.strip_prefix('[').and_then(|x| x.strip_suffix(']')).unwrap_or(h);
    h.to_ascii_lowercase()
}

fn check_host(h: &str) -> Option<String> {
    if h.contains('/') {
        return Some(format!("host `{h}` must be a host name or IP address glob, without scheme or path"));
    }
    let colons = h.matches(':').count();
    if colons == 1 {
        return Some(format!("host `{h}` has a port: put it in `port`"));
    }
    None
}

fn check_path(p: &str) -> Option<String> {
    if !p.starts_with('/') && !p.starts_with('*') {
        return Some(format!("path `{p}` must start with `/`"));
    }
    // Requests are judged normalised (`super::path`): a glob spelled
    // otherwise would silently never match.
    let never = |why: &str| Some(format!("path `{p}` can never match: requests are judged normalised ({why})"));
    if p.contains("//") {
        return never("`//` is merged into `/`");
    }
    if p.split('/').any(|seg| seg == "." || seg == "..") {
        return never("dot segments are removed");
    }
    if p.contains(';') {
        return never("paths with `;` are refused");
    }
    let bytes = p.as_bytes();
    for (i, _) in p.match_indices('%') {
        let escape = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        let Some(value) = escape.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
            return never("`%` must start an escape such as `%20`");
        };
        if value.is_ascii_alphanumeric() || matches!(value, b'-' | b'.' | b'_' | b'~') {
            return never(&format!("`%{}` is judged decoded: write `{}`", escape.unwrap_or(""), char::from(value)));
        }
        if matches!(value, b'/' | b'\\') || value < 0x20 || value == 0x7f {
            return never("encoded slashes, backslashes and control characters are refused");
        }
        if escape.is_some_and(|h| h.bytes().any(|b| b.is_ascii_lowercase())) {
            return never("escapes are judged with upper-case hex digits");
        }
    }
    None
}

/// A `destination.cidr` value: a network, or one address. IPv4-mapped
/// IPv6 networks become IPv4 networks, as addresses are judged.
fn parse_cidr(c: &str) -> Result<IpNet, String> {
    let net = match (c.parse::<IpNet>(), c.parse::<IpAddr>()) {
        (Ok(net), _) => net,
        (_, Ok(ip)) => IpNet::from(ip),
        _ => return Err(format!("`{c}` is not a network (`10.0.0.0/8`, `fd00::/8`) or an IP address")),
    };
    if net.trunc() != net {
        return Err(format!("`{c}` has bits set after the prefix: write `{}`", net.trunc()));
    }
    Ok(match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.addr().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, n.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    })
}

fn check_rpc(r: &str) -> Option<String> {
    if r.starts_with('/') {
        Some(format!("rpc `{r}` is written `package.Service/Method`, without the leading `/`"))
    } else if !r.contains('/') && !r.contains("**") {
        Some(format!("rpc `{r}` must be `package.Service/Method` (use `package.Service/*` for any method)"))
    } else {
        None
    }
}
