//! PostgreSQL statement classification cost per statement: what the
//! PostgreSQL relay pays for every query whose exact text is not in the
//! session's classification cache (pgbench's simple protocol sends each
//! statement with new literals, so every one is a miss).
//!
//! * `classify/<name>`: `gateway::postgres::sql::classify` (parse with
//!   libpg_query, then the walk over the tree for kind, relations, `WHERE`
//!   and nested modifications), for pgbench's statements and a few complex
//!   ones;
//! * `parse/<name>`: `pg_query::parse` alone, the floor the walk adds to;
//! * `scan/<name>`: `pg_query::scan` alone (libpg_query's lexer);
//! * `memo/<name>`: what the relay pays now for a statement whose text it has
//!   not seen but whose shape it has (`gateway::postgres::sql::Memo`: lex,
//!   look the shape up, map the spans): the same statement with a new
//!   literal every iteration, as pgbench sends it.
//!
//! Run with `cargo bench -p gateway-benches --bench sql`.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use gateway::postgres::sql::{classify, Memo};

/// pgbench's built-in scripts as its simple protocol sends them (literals
/// substituted), and statements that exercise every part of the walk.
const STATEMENTS: &[(&str, &str)] = &[
    ("pgbench_select", "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;"),
    ("pgbench_update", "UPDATE pgbench_accounts SET abalance = abalance + -3214 WHERE aid = 48213;"),
    (
        "pgbench_insert",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 48213, -3214, CURRENT_TIMESTAMP);",
    ),
    ("pgbench_begin", "BEGIN;"),
    (
        "cte_delete_returning",
        "WITH moved AS (DELETE FROM billing.invoices WHERE due < now() - interval '90 days' RETURNING *), \
         counted AS (SELECT count(*) AS n FROM moved) \
         INSERT INTO archive.invoices SELECT m.* FROM moved m JOIN counted c ON c.n > 0 \
         ON CONFLICT (id) DO UPDATE SET due = EXCLUDED.due RETURNING id",
    ),
    (
        "join_subqueries",
        "SELECT u.id, u.name, (SELECT count(*) FROM orders o WHERE o.user_id = u.id AND o.total > 100) AS big, \
         coalesce(p.balance, 0) FROM public.users u LEFT JOIN LATERAL (SELECT balance FROM payments.accounts a \
         WHERE a.owner = u.id ORDER BY a.updated DESC LIMIT 1) p ON true WHERE u.id IN (SELECT user_id FROM \
         sessions WHERE expires > now()) AND EXISTS (SELECT 1 FROM audit.events e WHERE e.actor = u.id) \
         GROUP BY u.id, u.name, p.balance HAVING count(*) > 1 ORDER BY u.name LIMIT 50 OFFSET 10",
    ),
    (
        "recursive_cte",
        "WITH RECURSIVE tree(id, parent, depth) AS (SELECT id, parent, 0 FROM nodes WHERE parent IS NULL \
         UNION ALL SELECT n.id, n.parent, t.depth + 1 FROM nodes n JOIN tree t ON n.parent = t.id) \
         SELECT * FROM tree WHERE depth < 10",
    ),
    (
        "ddl_create_table",
        "CREATE TABLE IF NOT EXISTS app.events (id bigserial PRIMARY KEY, kind text NOT NULL CHECK (kind <> ''), \
         payload jsonb DEFAULT '{}'::jsonb, created timestamptz NOT NULL DEFAULT now(), \
         owner int REFERENCES app.users(id) ON DELETE CASCADE)",
    ),
];

fn benches(c: &mut Criterion) {
    for (name, sql) in STATEMENTS {
        // Fail loudly if a statement stopped classifying: a bench of an error path measures nothing.
        let classified = classify(sql).unwrap_or_else(|e| panic!("{name} does not classify: {e}"));
        assert!(!classified.is_empty(), "{name} classified to no statement");
        c.bench_function(&format!("classify/{name}"), |b| b.iter(|| classify(black_box(sql))));
        c.bench_function(&format!("parse/{name}"), |b| {
            b.iter(|| pg_query::parse(black_box(sql), pg_query::ParserOptions::DEFAULT))
        });
        c.bench_function(&format!("scan/{name}"), |b| b.iter(|| pg_query::scan(black_box(sql))));
        // New literals every time: 4,096 variants, more than the memo keeps
        // by exact text, so none is found by text.
        let variants: Vec<String> = (0..4096).map(|n| with_new_literals(sql, n)).collect();
        let mut memo = Memo::default();
        memo.classify(sql);
        let mut next = variants.iter().cycle();
        c.bench_function(&format!("memo/{name}"), |b| {
            b.iter(|| memo.classify(black_box(next.next().map(String::as_str).unwrap_or(sql))))
        });
        let stats = memo.stats();
        assert!(stats.shape > stats.parsed, "{name}: the memo must find most variants by shape: {stats:?}");
    }
}

/// `sql` with every integer literal replaced by one derived from `n` (a
/// different length now and then, so spans move).
fn with_new_literals(sql: &str, n: usize) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut digits = false;
    for c in sql.chars() {
        let starts_number = c.is_ascii_digit() && !digits && !out.ends_with(|p: char| p.is_alphanumeric() || p == '_');
        if starts_number {
            out.push_str(&(n * 7919 % 1_000_003).to_string());
            digits = true;
        } else if !(digits && c.is_ascii_digit()) {
            digits = false;
            out.push(c);
        }
    }
    out
}

criterion_group!(sql, benches);
criterion_main!(sql);
