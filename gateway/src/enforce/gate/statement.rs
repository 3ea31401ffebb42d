//! The gate for PostgreSQL: a session judged at startup, then every query
//! judged statement by statement (each statement and every statement it
//! carries), in protocol-neutral terms the wire-protocol handler renders.
//!
//! A query is decided as a whole by its strictest statement: one denied
//! statement refuses the query (nothing of it goes upstream), one needing
//! approval holds it. A statement the gateway cannot classify (a parse
//! failure, or a statement kind it does not know) is refused unless a rule
//! naming `kind: unknown` allows it.

use std::sync::Arc;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::{record_level, ApprovalAsk, Passage};
use crate::{
    enforce::refusal::{Reason, Refusal},
    findings::Action,
    mask::Masker,
    metrics::{Decision, RequestKind},
    policy::{self, PostgresFacts},
    postgres::sql::{SqlError, Statement, StatementKind},
    record::{DecisionFacts, RecordLevel},
};

/// A PostgreSQL session, and the query judged (if any).
#[derive(Debug, Clone, Copy)]
pub struct StatementAsk<'a> {
    /// The judged destination host ([`Passage::destination_host`]).
    pub host: &'a str,
    /// Whether the client's leg is TLS.
    pub tls: bool,
    /// The database of the startup message.
    pub database: &'a str,
    /// The user of the startup message.
    pub user: &'a str,
    /// The query's statements, as [`crate::postgres::sql::classify_with`]
    /// returned them (`Err`: judged as one statement of kind `unknown`).
    pub statements: Result<&'a [Statement], &'a SqlError>,
}

/// The gate's decision for a PostgreSQL session or query that may go on.
#[derive(Debug)]
pub struct StatementDecision {
    /// The query's deciding rule and action (its strictest statement's), for
    /// the recording.
    pub decided: DecisionFacts,
    /// One per top-level statement, in order: what masks its result rows.
    pub statements: Vec<StatementVerdict>,
    /// Hold the query for approval before anything of it goes upstream:
    /// (rule, spec). See [`Passage::approve_statement`].
    pub approval: Option<(String, policy::ApprovalSpec)>,
    /// The fullest record level of any statement.
    pub record: RecordLevel,
    /// The policy's static-key action (of the deciding statement),
    /// overriding `findings.actions` for keys in the query.
    pub static_keys: Option<Action>,
}

/// One top-level statement's outcome.
#[derive(Debug)]
pub struct StatementVerdict {
    /// What the statement is.
    pub kind: StatementKind,
    /// Its deciding rule and action (the strictest of it and the
    /// statements it carries).
    pub decided: DecisionFacts,
    /// How to mask its result rows; `None`: unmasked.
    pub mask: Option<ResultMask>,
}

/// Masking for a statement's result rows: whole columns by name, and the
/// policy's detector rules and patterns inside every other value.
#[derive(Debug, Clone)]
pub struct ResultMask {
    /// The column globs as written, for the recording.
    pub columns: Vec<String>,
    /// `None`: a column glob did not compile, so every column is masked.
    columns_set: Option<GlobSet>,
    /// Applied to the text of every value of columns not masked whole: the
    /// compiled masker, or why it could not be (then refuse the rows). `None`
    /// when the mask names only columns.
    pub values: Option<Result<Arc<Masker>, String>>,
}

impl ResultMask {
    /// Masks the columns matching `columns` (globs) whole, and applies
    /// `values` inside every other value.
    pub fn new(columns: Vec<String>, values: Option<Result<Arc<Masker>, String>>) -> ResultMask {
        result_mask(columns, values)
    }

    /// Whether every value of the column `name` (as `RowDescription` names
    /// it) is masked.
    pub fn masks_column(&self, name: &str) -> bool {
        self.columns_set.as_ref().is_none_or(|set| set.is_match(name))
    }
}

impl Passage {
    /// Judges a PostgreSQL session at startup (`ask.statements` is
    /// `Ok(&[])`) or a query: every statement and every statement it
    /// carries, as protocol `postgres` ([`policy::Policy::evaluate_postgres`]).
    /// `Err` is the refusal reason and deciding rule (not yet recorded:
    /// pass them to [`Passage::refuse`]).
    pub fn statements(&self, ask: StatementAsk<'_>) -> Result<StatementDecision, (Reason, String)> {
        // The startup's judgement (no statement) is not a query.
        if matches!(ask.statements, Ok([])) {
            return self.decide_statements(ask);
        }
        let started = std::time::Instant::now();
        let decided = self.decide_statements(ask);
        let decision = match &decided {
            Ok(d) if d.approval.is_some() => Decision::RequireApproval,
            Ok(_) => Decision::Allow,
            Err((Reason::Denied { .. }, _)) => Decision::Deny,
            Err(_) => Decision::Refused,
        };
        self.gate.metrics.request(RequestKind::Postgres, decision, started.elapsed());
        decided
    }

    fn decide_statements(&self, ask: StatementAsk<'_>) -> Result<StatementDecision, (Reason, String)> {
        let unparsed;
        let (statements, syntax_error) = match ask.statements {
            Ok(s) => (s, None),
            Err(e) => {
                unparsed = [Statement {
                    kind: StatementKind::Unknown,
                    relations: Vec::new(),
                    has_where: None,
                    span: 0..0,
                    inner: Vec::new(),
                    columns: Default::default(),
                }];
                (&unparsed[..], Some(e.to_string()))
            }
        };
        let policy = self.gate.policy.current();
        let facts = self.facts(ask.host, ask.tls, &policy::NO_ATTRIBUTES, None);
        let judge = |statement: Option<&Statement>| {
            let pg = PostgresFacts { database: ask.database, user: ask.user, statement };
            policy.evaluate_postgres(&facts, &pg)
        };
        if statements.is_empty() {
            let d = judge(None);
            if let policy::Action::Deny { reason } = d.action {
                return Err((Reason::Denied { rule: d.rule.to_owned(), reason: reason.clone() }, d.rule.to_owned()));
            }
            if let Some(reason) = self.unrecordable(d.action, d.record) {
                return Err((reason, d.rule.to_owned()));
            }
            return Ok(StatementDecision {
                decided: decided(&d),
                statements: Vec::new(),
                approval: approval(&d),
                record: record_level(d.record),
                static_keys: d.static_keys,
            });
        }
        let mut query: Option<policy::Decision<'_>> = None;
        let mut record = policy::RecordLevel::None;
        let mut verdicts = Vec::with_capacity(statements.len());
        for top in statements {
            let mut strictest: Option<policy::Decision<'_>> = None;
            let mut columns: Vec<String> = Vec::new();
            // The first rule masking columns whole: it refuses a read of them it cannot mask.
            let mut column_rule: Option<String> = None;
            let mut values = None;
            let mut refusal = None;
            top.visit(&mut |st| {
                if refusal.is_some() {
                    return;
                }
                let d = judge(Some(st));
                if d.rule == policy::UNCLASSIFIED_RULE {
                    let detail = syntax_error.clone();
                    refusal = Some((Reason::UnclassifiedStatement { syntax_error: detail }, d.rule.to_owned()));
                    return;
                }
                if let policy::Action::Deny { reason } = d.action {
                    refusal =
                        Some((Reason::Denied { rule: d.rule.to_owned(), reason: reason.clone() }, d.rule.to_owned()));
                    return;
                }
                record = fuller(record, d.record);
                if let (Some(m), Some(id)) = (d.mask, d.mask_id) {
                    if column_rule.is_none() && !m.columns.is_empty() {
                        column_rule = Some(d.rule.to_owned());
                    }
                    for c in &m.columns {
                        if !columns.contains(c) {
                            columns.push(c.clone());
                        }
                    }
                    let masks_values = m.rules != policy::MaskRules::Only(Vec::new()) || !m.patterns.is_empty();
                    if masks_values && values.is_none() {
                        values = Some(self.gate.masks.get(&policy, id, m));
                    }
                }
                if strictest.is_none_or(|s| d.action.strictness() > s.action.strictness()) {
                    strictest = Some(d);
                }
            });
            if let Some(refused) = refusal {
                return Err(refused);
            }
            let Some(d) = strictest else { continue };
            let mask = (!columns.is_empty() || values.is_some()).then(|| result_mask(columns, values));
            if let (Some(m), Some(rule)) = (&mask, column_rule) {
                if let Some(reason) = unmaskable_read(top, m) {
                    return Err((Reason::Denied { rule: rule.clone(), reason }, rule));
                }
            }
            verdicts.push(StatementVerdict { kind: top.kind, decided: decided(&d), mask });
            if query.is_none_or(|q| d.action.strictness() > q.action.strictness()) {
                query = Some(d);
            }
        }
        let Some(d) = query else {
            // Unreachable: every statement yields a decision or a refusal.
            return Err((Reason::UnclassifiedStatement { syntax_error }, policy::UNCLASSIFIED_RULE.to_owned()));
        };
        if let Some(reason) = self.unrecordable(d.action, record) {
            return Err((reason, d.rule.to_owned()));
        }
        Ok(StatementDecision {
            decided: decided(&d),
            statements: verdicts,
            approval: approval(&d),
            record: record_level(record),
            static_keys: d.static_keys,
        })
    }

    /// Holds a query that [`Passage::statements`] said needs approval
    /// (`approval`: the rule and its spec) until approvers decide. One
    /// approval is one execution: approvers see `query` and the values bound
    /// to it (`params`, `None` for NULL), every detected key masked, and the
    /// destination as `postgres://user@host:port/database`.
    pub async fn approve_statement(
        &self,
        ask: &StatementAsk<'_>,
        approval: &(String, policy::ApprovalSpec),
        query: &str,
        params: &[Option<&[u8]>],
    ) -> Result<(), Refusal> {
        let (rule, spec) = approval;
        let port = self.conn.dst.port();
        let masker = self.gate.masks.recording();
        let mut shown = masker.mask_text(query).into_owned();
        for (i, value) in params.iter().enumerate() {
            shown.push_str(&format!("\n${} = {}", i + 1, shown_value(masker, *value)));
        }
        self.approve(ApprovalAsk {
            rule,
            spec,
            method: "SQL".into(),
            url: format!("postgres://{}@{}:{port}/{}", ask.user, ask.host, ask.database),
            destination: format!("{}:{port}", ask.host),
            body_preview: shown,
        })
        .await
    }
}

/// How much of one bound value approvers see, after masking.
const SHOWN_VALUE: usize = 256;

/// A bound value as approvers see it: text quoted, anything else (a binary
/// format value, control characters) as `\x` hex, which the masker's hex
/// view reads. Masked before it is cut short, so a cut cannot leave part of
/// a key the masker would no longer recognise.
fn shown_value(masker: &Masker, value: Option<&[u8]>) -> String {
    let Some(bytes) = value else { return "NULL".into() };
    let text = match std::str::from_utf8(bytes) {
        Ok(t) if !t.chars().any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) => format!("'{t}'"),
        _ => format!("\\x{}", hex::encode(bytes)),
    };
    let masked = masker.mask_text(&text);
    if masked.len() <= SHOWN_VALUE {
        return masked.into_owned();
    }
    let cut = (0..=SHOWN_VALUE).rev().find(|&i| masked.is_char_boundary(i)).unwrap_or(0);
    format!("{}... ({} bytes)", &masked[..cut], bytes.len())
}

/// Why `statement` reads a column `mask` masks where the mask cannot follow
/// it (see [`crate::postgres::sql::ColumnReads`]): under an alias, in an
/// expression, a subquery or a condition, or in a whole row. A column mask
/// matches the name the server gives a result column, so such a read would
/// come back in clear, or leak through the rows a condition selects.
fn unmaskable_read(statement: &Statement, mask: &ResultMask) -> Option<String> {
    const FIX: &str = "select masked columns only by name in the outer select list (`SELECT col` or \
                       `SELECT t.col`, no alias, expression, subquery or condition on them), and no whole \
                       rows (`SELECT t`, `row(t.*)`, `to_json(t)`)";
    let reads = &statement.columns;
    if reads.whole_row {
        return Some(format!(
            "the statement reads whole rows or every column other than as plain output columns, and \
             the policy masks columns ({}): {FIX}",
            mask.columns.join(", ")
        ));
    }
    reads.names().find(|name| mask.masks_column(name)).map(|name| {
        format!(
            "the statement reads the masked column `{name}` other than as a plain output column (an \
             alias, an expression, a subquery, a condition, an ordering or grouping): {FIX}"
        )
    })
}

fn decided(d: &policy::Decision<'_>) -> DecisionFacts {
    DecisionFacts { rule: d.rule.to_owned(), action: d.action.name().to_owned() }
}

fn approval(d: &policy::Decision<'_>) -> Option<(String, policy::ApprovalSpec)> {
    match d.action {
        policy::Action::RequireApproval(spec) => Some((d.rule.to_owned(), spec.clone())),
        _ => None,
    }
}

/// The level that keeps more.
fn fuller(a: policy::RecordLevel, b: policy::RecordLevel) -> policy::RecordLevel {
    use policy::RecordLevel::{Full, Metadata, None};
    match (a, b) {
        (Full, _) | (_, Full) => Full,
        (Metadata, _) | (_, Metadata) => Metadata,
        (None, None) => None,
    }
}

fn result_mask(columns: Vec<String>, values: Option<Result<Arc<Masker>, String>>) -> ResultMask {
    // Validated when the policy was compiled; a set that does not build
    // masks every column rather than none.
    let set = columns.iter().try_fold(GlobSetBuilder::new(), |mut set, c| {
        set.add(GlobBuilder::new(c).literal_separator(false).backslash_escape(true).build()?);
        Ok::<_, globset::Error>(set)
    });
    let columns_set = set.and_then(|s| s.build()).ok();
    ResultMask { columns, columns_set, values }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        approval::{ApprovalConfig, Approvals},
        credentials::CredentialStore,
        detect::{body::BodyLimits, DetectConfig, Detector, FingerprintKey},
        enforce::{Caller, ConnFacts, Gate, MaskCache, ProtectedNames},
        findings::{FindingsConfig, FindingsHandle},
        identity::Identity,
        intercept::Capture,
        policy::{Policy, PolicyHandle},
        postgres::sql::classify,
        process::ProcessInfo,
        record::Recorder,
    };

    const POLICY: &str = r#"
version: 1
rules:
  - name: no-unfiltered-writes
    match: { postgres: { kind: [update, delete], where: false } }
    action: deny
    reason: "UPDATE and DELETE need a WHERE clause"
  - name: replica
    match: { postgres: { database: replica } }
    action: deny
  - name: migrations
    match: { postgres: { user: migrator, kind: ddl } }
    action: require_approval
    approval: { group: dba }
  - name: people
    match: { postgres: { kind: select, only_relations: "public.people" } }
    action: allow
    mask: { columns: [ssn, "*_token"] }
    record: full
  - name: reads
    match: { postgres: { kind: [select, insert, update, delete] } }
    action: allow
    record: metadata
  - name: legacy
    match: { postgres: { user: legacy, kind: unknown } }
    action: allow
defaults: { action: allow, record: none }
"#;

    fn passage(dir: &Path) -> Passage {
        let detector = Arc::new(Detector::builtin().expect("detector"));
        let policy = Policy::parse(Path::new("pg.yaml"), POLICY).expect("policy");
        let gate = Arc::new(Gate {
            fingerprint_key: Arc::new(FingerprintKey::load_or_create(dir).expect("key")),
            findings: FindingsHandle::open(&dir.join("findings.db")).expect("findings"),
            actions: FindingsConfig::default(),
            waivers: Default::default(),
            notifier: Default::default(),
            body_limits: BodyLimits::from_config(&DetectConfig::default()),
            credentials: Arc::new(CredentialStore::load(Vec::new()).expect("credentials")),
            minter: None,
            oidc: None,
            oidc_header: http::HeaderName::from_static("x-ci-oidc"),
            policy: PolicyHandle::new(policy, None),
            approvals: Approvals::open(&ApprovalConfig::default(), dir, None).expect("approvals"),
            recorder: Recorder::disabled(),
            masks: MaskCache::new(detector.clone()).expect("masks"),
            record_body_cap: 0,
            protected: ProtectedNames::new(Vec::new()),
            destinations: Default::default(),
            metrics: Default::default(),
            detector,
        });
        let process = ProcessInfo {
            pid: 1,
            tid: 1,
            uid: 0,
            gid: 0,
            comm: "psql".into(),
            exe: None,
            cgroup: None,
            cgroup_id: 0,
            container: None,
            netns_cookie: 0,
            connect_ns: 0,
        };
        let identity = Identity {
            uri: "spiffe://ci.example/repo/acme/web".into(),
            labels: Default::default(),
            rule: Some("ci".into()),
            attested: true,
        };
        let caller = Arc::new(Caller { process: Arc::new(process), identity, job: Default::default() });
        gate.open(ConnFacts {
            id: 7,
            caller,
            dst: "10.0.0.5:5432".parse().expect("addr"),
            capture: Capture::Destination,
        })
    }

    fn ask<'a>(
        database: &'a str,
        user: &'a str,
        statements: Result<&'a [Statement], &'a SqlError>,
    ) -> StatementAsk<'a> {
        StatementAsk { host: "db.internal", tls: true, database, user, statements }
    }

    #[test]
    fn bound_values_are_shown_masked_and_cut_after_masking() {
        let masker =
            Masker::new(Arc::new(Detector::builtin().expect("detector")), &Default::default()).expect("masker");
        // An OpenAI project key made up here (the detector's shape).
        let key = format!("sk-proj-{}T3BlbkFJ{}", "a1B2c3D4".repeat(6), "Z9y8X7w6".repeat(6));
        assert_eq!(shown_value(&masker, None), "NULL");
        assert_eq!(shown_value(&masker, Some(b"42")), "'42'");
        // A binary value (int4 0) as hex; a key in binary form masked too.
        assert_eq!(shown_value(&masker, Some(&[0, 0, 0, 0])), "\\x00000000");
        let mut binary = vec![0u8, 1];
        binary.extend_from_slice(key.as_bytes());
        for value in [key.clone(), format!("deploy {key}")].iter().map(|v| v.as_bytes()).chain([&binary[..]]) {
            let shown = shown_value(&masker, Some(value));
            assert!(shown.contains("[MASKED:"), "{shown}");
            assert!(!shown.contains(&key) && !shown.contains(&hex::encode(&key)), "{shown}");
        }
        // A long value: masked first, then cut, so the key cannot be cut
        // into a prefix the masker would not know.
        let long = format!("{}{key}", "x".repeat(SHOWN_VALUE - 20));
        let shown = shown_value(&masker, Some(long.as_bytes()));
        assert!(!shown.contains(&key[..20]), "{shown}");
        assert!(shown.ends_with(&format!("... ({} bytes)", long.len())), "{shown}");
    }

    #[tokio::test]
    async fn reads_a_column_mask_cannot_follow_are_refused_by_the_masking_rule() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = passage(dir.path());
        let judge = |sql: &str| {
            let parsed = classify(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            p.statements(ask("app", "ci", Ok(&parsed))).map(|d| d.statements.len())
        };
        for sql in [
            "SELECT ssn AS x FROM public.people",
            "SELECT upper(api_token) FROM public.people",
            "SELECT name FROM public.people WHERE ssn LIKE '1%'",
            "SELECT to_json(p) FROM public.people p",
            "SELECT x FROM (SELECT * FROM public.people) s",
            "SELECT 1; SELECT ssn || '' FROM public.people",
        ] {
            match judge(sql) {
                Err((Reason::Denied { rule, reason }, _)) => {
                    assert_eq!(rule, "people", "{sql}");
                    assert!(reason.contains("plain output column"), "{sql}: {reason}");
                }
                other => panic!("{sql}: {other:?}"),
            }
        }
        // Plain output columns are masked, and columns no mask names are
        // free anywhere; statements no column mask covers are not looked at.
        for sql in [
            "SELECT ssn, name FROM public.people",
            "SELECT * FROM public.people p",
            "SELECT upper(name) AS n FROM public.people WHERE id = 1 ORDER BY name",
            "SELECT ssn AS x FROM t",
        ] {
            assert!(judge(sql).is_ok(), "{sql}: {:?}", judge(sql));
        }
    }

    #[tokio::test]
    async fn queries_are_decided_by_their_strictest_statement() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = passage(dir.path());
        let judge = |database: &str, user: &str, sql: &str| {
            let parsed = classify(sql);
            let statements = parsed.as_deref().map_err(|e| e.clone());
            match &statements {
                Ok(s) => p.statements(ask(database, user, Ok(s))),
                Err(e) => p.statements(ask(database, user, Err(e))),
            }
        };

        // The session at startup.
        let d = p.statements(ask("app", "ci", Ok(&[]))).expect("session");
        assert_eq!(d.decided.rule, "default");
        assert!(
            matches!(p.statements(ask("replica", "ci", Ok(&[]))), Err((Reason::Denied { .. }, rule)) if rule == "replica")
        );

        // Denied: the whole query, by its denied statement, however nested.
        for sql in [
            "DELETE FROM t",
            "SELECT 1; UPDATE t SET a = 1",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
            "EXPLAIN ANALYZE DELETE FROM t",
        ] {
            match judge("app", "ci", sql) {
                Err((Reason::Denied { rule, reason }, _)) => {
                    assert_eq!(rule, "no-unfiltered-writes", "{sql}");
                    assert_eq!(reason, "UPDATE and DELETE need a WHERE clause");
                }
                other => panic!("{sql}: {other:?}"),
            }
        }

        // Allowed, with per-statement masks and the fullest record level.
        let d = judge("app", "ci", "SELECT ssn, name FROM public.people; SELECT 1 FROM t").expect("allowed");
        assert_eq!(d.statements.len(), 2);
        let mask = d.statements[0].mask.as_ref().expect("people are masked");
        assert!(mask.masks_column("ssn") && mask.masks_column("api_token") && !mask.masks_column("name"));
        assert!(mask.values.is_none());
        assert!(d.statements[1].mask.is_none());
        assert_eq!(d.statements[1].decided.rule, "reads");
        assert_eq!(d.record, RecordLevel::Full);
        assert!(d.approval.is_none());

        // Held for approval.
        let d = judge("app", "migrator", "SELECT 1 FROM t; CREATE TABLE x (a int)").expect("held");
        assert_eq!(
            d.approval.as_ref().map(|(rule, spec)| (rule.as_str(), spec.group.as_str())),
            Some(("migrations", "dba"))
        );
        assert_eq!(d.decided.action, "require_approval");

        // What the gateway cannot classify: refused unless a rule allows `unknown`.
        match judge("app", "ci", "SELEC 1") {
            Err((Reason::UnclassifiedStatement { syntax_error: Some(e) }, rule)) => {
                assert!(e.contains("syntax error"), "{e}");
                assert_eq!(rule, policy::UNCLASSIFIED_RULE);
            }
            other => panic!("{other:?}"),
        }
        let d = judge("app", "legacy", "SELEC 1").expect("legacy may");
        assert_eq!(d.decided.rule, "legacy");

        // Every query's decision is counted once; the startup's judgements are not queries.
        let text = p.gate().metrics.encode().expect("metrics");
        for (decision, n) in [("allow", 2), ("deny", 4), ("require_approval", 1), ("refused", 1)] {
            let line = format!("gateway_requests_total{{kind=\"postgres\",decision=\"{decision}\"}} {n}");
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        let line = "gateway_policy_evaluation_duration_seconds_count{kind=\"postgres\"} 8";
        assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
    }
}
