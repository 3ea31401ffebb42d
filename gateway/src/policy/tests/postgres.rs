//! `match.postgres`: sessions and statements judged as protocol `postgres`.

use super::*;
use crate::postgres::sql::{classify, Statement, StatementKind};

/// The first statement of `sql`.
fn stmt(sql: &str) -> Statement {
    classify(sql).unwrap_or_else(|e| panic!("{sql}: {e}")).remove(0)
}

/// The rule deciding `sql`'s first statement (itself only) for `user` on `database`.
fn rule_of(p: &Policy, database: &str, user: &str, sql: &str) -> String {
    let st = stmt(sql);
    let f = F::tcp("db.internal", 5432);
    let pg = PostgresFacts { database, user, statement: Some(&st) };
    p.evaluate_postgres(&f.facts(), &pg).rule.to_owned()
}

/// The rule whose decision is strictest over every statement `sql` holds
/// (inner ones included), as the gate and `explain --sql` take it.
fn verdict(p: &Policy, sql: &str) -> String {
    let f = F::tcp("db.internal", 5432);
    let e = p.explain_sql(&f.facts(), "app", "ci", sql).unwrap();
    let i = e.verdict.unwrap();
    e.statements[i].explanation.decision.rule.to_owned()
}

const PG: &str = r#"
version: 1
rules:
  - name: no-unfiltered-writes
    match:
      postgres: { kind: [update, delete], where: false }
    action: deny
    reason: "UPDATE and DELETE need a WHERE clause"
  - name: secrets
    match:
      postgres: { relations: ["vault.keys", "vault.tokens", "secrets"] }
    action: deny
  - name: migrations
    match:
      postgres: { database: "app*", user: migrator, kind: [ddl, truncate] }
    action: require_approval
    approval: { group: dba, timeout: 5m }
  - name: reads
    match:
      destination: { protocol: postgres }
      postgres: { kind: [select, explain, prepare, show, set, transaction], only_relations: ["public.*", "*.reports", "audit"] }
    action: allow
    mask: { columns: [ssn, "*_token"], rules: all }
  - name: writes
    match:
      postgres: { database: ["app", "app_*"], kind: [insert, update, delete, copy] }
    action: allow
    record: metadata
  - name: legacy
    match:
      postgres: { user: legacy, kind: unknown }
    action: allow
defaults:
  action: deny
  reason: "not in the database policy"
"#;

#[test]
fn statements_are_judged_by_kind_database_user_and_where() {
    let p = parse(PG);
    assert_eq!(rule_of(&p, "app", "ci", "DELETE FROM orders"), "no-unfiltered-writes");
    assert_eq!(rule_of(&p, "app", "ci", "UPDATE orders SET paid = true"), "no-unfiltered-writes");
    assert_eq!(rule_of(&p, "app", "ci", "DELETE FROM orders WHERE id = 1"), "writes");
    assert_eq!(rule_of(&p, "app_test", "ci", "INSERT INTO orders VALUES (1)"), "writes");
    assert_eq!(rule_of(&p, "other", "ci", "INSERT INTO orders VALUES (1)"), DEFAULT_RULE);
    assert_eq!(rule_of(&p, "app", "ci", "COPY orders FROM STDIN"), "writes");
    assert_eq!(rule_of(&p, "app", "migrator", "ALTER TABLE orders ADD c int"), "migrations");
    assert_eq!(rule_of(&p, "app", "ci", "ALTER TABLE orders ADD c int"), DEFAULT_RULE);
    // Database and user names are case-sensitive, as PostgreSQL keeps them.
    assert_eq!(rule_of(&p, "App", "migrator", "TRUNCATE orders"), DEFAULT_RULE);
    assert_eq!(rule_of(&p, "app", "Migrator", "TRUNCATE orders"), DEFAULT_RULE);
    assert_eq!(rule_of(&p, "app", "ci", "SHOW work_mem"), "reads");
    assert_eq!(rule_of(&p, "app", "ci", "BEGIN"), "reads");
}

#[test]
fn relations_may_match_for_relations_and_must_match_for_only_relations() {
    let p = parse(PG);
    // `relations`: an unqualified name may resolve to any schema.
    assert_eq!(rule_of(&p, "app", "ci", "SELECT * FROM vault.keys"), "secrets");
    assert_eq!(rule_of(&p, "app", "ci", "SELECT * FROM vault.other"), DEFAULT_RULE);
    assert_eq!(rule_of(&p, "app", "ci", "SELECT * FROM private.keys"), DEFAULT_RULE);
    // Unqualified `keys` may be `vault.keys` (`SET search_path = vault`).
    assert_eq!(rule_of(&p, "app", "ci", "SELECT * FROM keys"), "secrets");
    assert_eq!(rule_of(&p, "app", "ci", "SELECT * FROM secrets"), "secrets");
    assert_eq!(rule_of(&p, "app", "ci", "SELECT * FROM anything.secrets"), "secrets");
    assert_eq!(rule_of(&p, "app", "ci", "SELECT 1 WHERE EXISTS (SELECT 1 FROM vault.tokens)"), "secrets");
    // A whole schema: every unqualified name may be in it.
    let q = parse(
        "version: 1\nrules:\n  - match: { postgres: { relations: \"vault.*\" } }\n    action: deny\ndefaults: { action: allow }\n",
    );
    assert_eq!(rule_of(&q, "app", "ci", "SELECT * FROM orders"), "#0");
    assert_eq!(rule_of(&q, "app", "ci", "SELECT * FROM public.orders"), DEFAULT_RULE);
    // ...and a pattern with a schema may be any unqualified relation of that name.
    let q = parse(
        "version: 1\nrules:\n  - match: { postgres: { relations: \"vault.keys\" } }\n    action: deny\ndefaults: { action: allow }\n",
    );
    assert_eq!(rule_of(&q, "app", "ci", "SELECT * FROM keys"), "#0");
    assert_eq!(rule_of(&q, "app", "ci", "SELECT * FROM public.keys"), DEFAULT_RULE);
    assert_eq!(rule_of(&q, "app", "ci", r#"SELECT * FROM "vault"."keys""#), "#0");

    // `only_relations`: every relation surely among the patterns.
    assert_eq!(rule_of(&p, "app", "ci", "SELECT * FROM public.orders"), "reads");
    assert_eq!(rule_of(&p, "app", "ci", "SELECT * FROM public.orders JOIN x.reports USING (id)"), "reads");
    assert_eq!(rule_of(&p, "app", "ci", "SELECT * FROM public.orders JOIN private.o USING (id)"), DEFAULT_RULE);
    // Unqualified: could be in any schema, so not surely `public.*`...
    assert_eq!(rule_of(&p, "app", "ci", "SELECT * FROM orders"), DEFAULT_RULE);
    // ...but surely `*.reports` and `audit`, which admit every schema.
    assert_eq!(rule_of(&p, "app", "ci", "SELECT * FROM reports JOIN audit ON true"), "reads");
    // No relation at all: nothing outside the list.
    assert_eq!(rule_of(&p, "app", "ci", "SELECT 1"), "reads");
    // `*` crosses every character, `/` included.
    let q = parse(
        "version: 1\nrules:\n  - match: { postgres: { relations: \"sec*\" } }\n    action: deny\ndefaults: { action: allow }\n",
    );
    assert_eq!(rule_of(&q, "app", "ci", r#"SELECT * FROM "sec/rets""#), "#0");
    assert_eq!(rule_of(&q, "app", "ci", r#"SELECT * FROM "Secrets""#), DEFAULT_RULE);
}

#[test]
fn the_strictest_statement_decides_the_query() {
    let p = parse(PG);
    // An allowed read carrying a delete without WHERE.
    assert_eq!(
        verdict(&p, "WITH d AS (DELETE FROM public.orders RETURNING *) SELECT * FROM d"),
        "no-unfiltered-writes"
    );
    assert_eq!(verdict(&p, "WITH d AS (SELECT * FROM public.orders) SELECT * FROM d"), "reads");
    assert_eq!(verdict(&p, "EXPLAIN ANALYZE DELETE FROM public.orders"), "no-unfiltered-writes");
    assert_eq!(verdict(&p, "EXPLAIN SELECT * FROM public.orders"), "reads");
    assert_eq!(verdict(&p, "COPY (SELECT * FROM vault.keys) TO STDOUT"), "secrets");
    assert_eq!(verdict(&p, "COPY public.orders TO STDOUT"), "writes");
    assert_eq!(verdict(&p, "PREPARE q AS SELECT * FROM public.orders"), "reads");
    assert_eq!(verdict(&p, "PREPARE q AS DELETE FROM public.orders"), "no-unfiltered-writes");
    // Several statements: the strictest wins (deny over approval over allow).
    assert_eq!(verdict(&p, "SELECT 1; DELETE FROM orders WHERE id = 1; SELECT * FROM secrets"), "secrets");
    let f = F::tcp("db.internal", 5432);
    let e = p.explain_sql(&f.facts(), "app", "migrator", "SELECT 1; CREATE TABLE x (a int)").unwrap();
    assert_eq!(e.statements[e.verdict.unwrap()].explanation.decision.action.name(), "require_approval");
    assert!(e.render().contains("verdict      require_approval (statement 2, rule `migrations`)"), "{}", e.render());
}

#[test]
fn unknown_statements_are_refused_unless_a_rule_names_unknown() {
    let p = parse(PG);
    let unknown = Statement {
        kind: StatementKind::Unknown,
        relations: vec![],
        has_where: None,
        span: 0..0,
        inner: vec![],
        columns: Default::default(),
    };
    let f = F::tcp("db.internal", 5432);
    let judge = |policy: &Policy, user: &str| {
        let pg = PostgresFacts { database: "app", user, statement: Some(&unknown) };
        let d = policy.evaluate_postgres(&f.facts(), &pg);
        (d.rule.to_owned(), d.action.name())
    };
    assert_eq!(judge(&p, "legacy"), ("legacy".to_owned(), "allow"));
    // The default denies it anyway (with its own reason).
    assert_eq!(judge(&p, "ci"), (DEFAULT_RULE.to_owned(), "deny"));
    // An allow that does not name `unknown` (here: the default) refuses it.
    let open = parse("version: 1\nrules: []\ndefaults: { action: allow }\n");
    assert_eq!(judge(&open, "ci"), (UNCLASSIFIED_RULE.to_owned(), "deny"));
    assert_eq!(
        Policy::builtin()
            .evaluate_postgres(&f.facts(), &PostgresFacts { database: "a", user: "b", statement: Some(&unknown) })
            .rule,
        UNCLASSIFIED_RULE
    );
    let by_db = parse(
        "version: 1\nrules:\n  - match: { postgres: { database: app } }\n    action: allow\ndefaults: { action: deny }\n",
    );
    assert_eq!(judge(&by_db, "ci"), (UNCLASSIFIED_RULE.to_owned(), "deny"));
    // The explanation says so.
    let pg = PostgresFacts { database: "app", user: "ci", statement: Some(&unknown) };
    assert_eq!(open.explain_postgres(&f.facts(), &pg).decision.rule, UNCLASSIFIED_RULE);
}

#[test]
fn postgres_rules_and_other_protocols_never_mix() {
    let p = parse(PG);
    // HTTP and TCP facts never match postgres selectors.
    let http = F::https("db.internal", "/");
    assert_eq!(rule_for(&p, &http), DEFAULT_RULE);
    assert_eq!(rule_for(&p, &F::tcp("db.internal", 5432)), DEFAULT_RULE);
    // A session judged at startup matches protocol and database/user
    // selectors, never statement selectors.
    let text = r#"
version: 1
rules:
  - name: http-only
    match: { request: { method: GET } }
    action: deny
  - name: statements
    match: { postgres: { kind: select } }
    action: deny
  - name: replica
    match: { postgres: { database: replica } }
    action: deny
  - name: pg
    match: { destination: { protocol: postgres } }
    action: allow
    record: metadata
  - name: tcp
    match: { destination: { protocol: tcp } }
    action: deny
defaults: { action: deny }
"#;
    let q = parse(text);
    let f = F::tcp("db.internal", 5432);
    let session = |database| PostgresFacts { database, user: "ci", statement: None };
    assert_eq!(q.evaluate_postgres(&f.facts(), &session("app")).rule, "pg");
    assert_eq!(q.evaluate_postgres(&f.facts(), &session("replica")).rule, "replica");
    assert_eq!(rule_for(&q, &f), "tcp");
    // HTTP request facts handed to evaluate_postgres are ignored.
    let h = F::https("db.internal", "/");
    assert_eq!(q.evaluate_postgres(&h.facts(), &session("app")).rule, "pg");
    let e = q.explain_postgres(&f.facts(), &session("app"));
    assert_eq!(e.protocol, Protocol::Postgres);
    let misses: Vec<(&str, &str)> = e.skipped.iter().map(|m| (m.rule, m.selector.as_str())).collect();
    assert_eq!(misses, [("http-only", "request"), ("statements", "postgres"), ("replica", "postgres.database")]);
}

#[test]
fn explain_says_why_each_earlier_rule_misses_a_statement() {
    let p = parse(PG);
    let f = F::tcp("db.internal", 5432);
    let e = p.explain_sql(&f.facts(), "app", "ci", "SELECT * FROM orders").unwrap();
    let misses: Vec<(&str, &str, &str)> =
        e.statements[0].explanation.skipped.iter().map(|m| (m.rule, m.selector.as_str(), m.detail.as_str())).collect();
    assert_eq!(misses[0], ("no-unfiltered-writes", "postgres.kind", "`select` is not any of `update`, `delete`"));
    assert_eq!(misses[1].1, "postgres.relations");
    assert!(misses[1].2.contains("it names `orders`"), "{}", misses[1].2);
    assert_eq!(misses[2].1, "postgres.kind");
    assert_eq!(misses[3].1, "postgres.only_relations");
    assert!(misses[3].2.contains("`orders` is unqualified"), "{}", misses[3].2);
    let text = e.render();
    assert!(text.contains("session      postgres database `app` user `ci`"), "{text}");
    assert!(text.contains("verdict      deny (statement 1, by `default`): not in the database policy"), "{text}");
    let e = p.explain_sql(&f.facts(), "app", "ci", "DELETE FROM t WHERE true").unwrap();
    assert_eq!(e.statements[0].explanation.skipped[0].detail, "the delete has a WHERE clause");
    assert!(p.explain_sql(&f.facts(), "app", "ci", "DELET FROM t").is_err());
}

#[test]
fn mask_columns_are_carried_in_the_decision() {
    let p = parse(PG);
    let st = stmt("SELECT ssn, api_token FROM public.people");
    let f = F::tcp("db.internal", 5432);
    let d = p.evaluate_postgres(&f.facts(), &PostgresFacts { database: "app", user: "ci", statement: Some(&st) });
    assert_eq!(d.rule, "reads");
    let m = d.mask.unwrap();
    assert_eq!(m.columns, ["ssn", "*_token"]);
    assert_eq!(m.rules, MaskRules::All);
    // Columns alone are a mask.
    parse("version: 1\nrules: []\ndefaults: { action: allow, mask: { columns: [ssn] } }\n");
}

#[test]
fn invalid_postgres_selectors_are_errors_with_positions() {
    let e = errs(
        r#"
version: 1
rules:
  - match: { postgres: { kind: [select, drop] } }
    action: allow
  - match: { postgres: { relations: "a.b.c" } }
    action: deny
  - match: { postgres: { kind: select, where: false } }
    action: deny
  - match:
      destination: { protocol: https }
      postgres: { database: app }
    action: deny
  - match:
      request: { method: GET }
      postgres: { user: ci }
    action: deny
  - name: unclassified
    action: allow
  - match: { postgres: { only_relations: [".x"], database: [] } }
    action: allow
  - match: { postgres: { kind: select } }
    action: allow
    uninspectable: pass
  - match: { postgres: { colour: red } }
    action: allow
defaults: { action: allow }
"#,
    );
    let got: Vec<(usize, String)> = e.iter().map(|e| (e.line, e.message.clone())).collect();
    let has = |line: usize, text: &str| {
        assert!(got.iter().any(|(l, m)| *l == line && m.contains(text)), "line {line}: `{text}` not in {got:#?}")
    };
    has(4, "`drop` is not a statement kind");
    has(6, "must be `name` or `schema.name`");
    has(8, "`where` only matches `update` and `delete`");
    has(12, "only matches `protocol: postgres`");
    has(16, "cannot match both `request` (HTTP) and `postgres`");
    has(18, "reserved");
    has(20, "empty schema or name");
    has(20, "empty list");
    has(24, "can never apply");
    has(25, "unknown field `colour`");
    // Upper case in a relation only matches quoted names: a warning.
    let p = parse(
        "version: 1\nrules:\n  - match: { postgres: { relations: Secrets } }\n    action: deny\ndefaults: { action: allow }\n",
    );
    assert!(p.warnings().iter().any(|w| w.message.contains("upper-case")), "{:?}", p.warnings());
    // Rules with statement selectors are not catch-alls.
    let p = parse(
        "version: 1\nrules:\n  - match: { postgres: { kind: select } }\n    action: allow\n  - action: deny\ndefaults: { action: allow }\n",
    );
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
}

#[test]
fn explain_cli_judges_sql() {
    use crate::cli::policy::{run_with as run, PolicyArgs};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, PG).unwrap();
    let args = |extra: &[&str]| {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: PolicyArgs,
        }
        let mut argv = vec!["gateway", "explain", "--host", "db.internal", "--port", "5432"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.a)
    };
    let none = PolicyContext::default();
    for extra in [
        &["--database", "app", "--db-user", "ci", "--sql", "SELECT 1; DELETE FROM t"][..],
        &["--database", "app", "--sql", "WITH d AS (DELETE FROM t RETURNING 1) SELECT 1", "--json"],
        &["--database", "app", "--sql", "NOT SQL AT ALL"],
        &["--database", "app", "--sql", "NOT SQL AT ALL", "--json"],
    ] {
        let a = args(extra).unwrap();
        assert_eq!(run(&a, Some(&file), &none).unwrap(), std::process::ExitCode::SUCCESS, "{extra:?}");
    }
    // `--sql` needs a database.
    assert!(args(&["--sql", "SELECT 1"]).is_err());
    assert!(args(&["--database", "app"]).is_err());
}
