//! Classifications a session remembers: by exact text (drivers send the same
//! statement again and again: a Parse per execution), and by *shape*, the
//! query's tokens with every literal's text left out.
//!
//! A client that sends its values as literals (pgbench's simple protocol,
//! most ORMs' "simple" mode, `psql -c` in a loop) never repeats a text, so
//! the exact memory misses and each statement would be parsed: the parse and
//! the walk over its tree are most of what the relay spends per statement.
//! Lexing is several times cheaper than parsing (benches/benches/sql.rs), and
//! two queries with the same shape classify the same:
//!
//! - PostgreSQL's grammar sees token *types* and the values of identifiers,
//!   keywords, operators and parameters, all of which the shape keeps (their
//!   text, byte for byte). A literal's value only ever becomes a constant in
//!   the tree; nothing the classification reads (kind, relations, `WHERE`,
//!   inner statements, column reads) comes from a constant.
//! - The statements' byte spans do depend on the literals' lengths, so the
//!   template keeps each span boundary as a token position and maps it onto
//!   the new text.
//! - Backslashes are where lexing depends on the session
//!   (`standard_conforming_strings`): a query holding one is never
//!   classified by shape, nor is one the lexer rejects; both take the full
//!   path. A parse error is never remembered by shape either.
//!
//! The detector still scans every query's full text, literals included:
//! the shape only spares the parse.

use std::{collections::HashMap, ops::Range, sync::Arc};

use pg_query::protobuf::{ScanToken, Token};

use super::{classify, SqlError, Statement};

/// What classification made of a query.
pub type Classified = Result<Vec<Statement>, SqlError>;

/// Queries (and shapes) a session remembers, and the longest one remembered.
const MAX_REMEMBERED: usize = 256;
const MAX_REMEMBERED_QUERY: usize = 8 * 1024;

/// A session's remembered classifications.
#[derive(Default)]
pub struct Memo {
    exact: HashMap<Box<str>, Arc<Classified>>,
    shapes: HashMap<Box<str>, Template>,
    stats: MemoStats,
}

/// How a [`Memo`]'s queries were classified.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemoStats {
    /// Remembered by exact text.
    pub exact: u64,
    /// Remembered by shape.
    pub shape: u64,
    /// Parsed.
    pub parsed: u64,
}

impl Memo {
    /// `query` classified: remembered by text, else by shape, else parsed
    /// (and remembered both ways).
    pub fn classify(&mut self, query: &str) -> Arc<Classified> {
        if let Some(known) = self.exact.get(query) {
            self.stats.exact += 1;
            return Arc::clone(known);
        }
        if query.len() > MAX_REMEMBERED_QUERY {
            self.stats.parsed += 1;
            return Arc::new(classify(query));
        }
        let shape = Shape::of(query);
        if let Some(shape) = &shape {
            if let Some(statements) = self.shapes.get(&*shape.key).and_then(|t| t.instantiate(query, &shape.tokens)) {
                self.stats.shape += 1;
                return Arc::new(Ok(statements));
            }
        }
        self.stats.parsed += 1;
        let fresh = Arc::new(classify(query));
        if let (Some(shape), Ok(statements)) = (shape, fresh.as_ref()) {
            if let Some(template) = Template::of(statements, query, &shape.tokens) {
                remember(&mut self.shapes, shape.key.into_boxed_str(), template);
            }
        }
        remember(&mut self.exact, query.into(), Arc::clone(&fresh));
        fresh
    }

    /// How its queries were classified so far.
    pub fn stats(&self) -> MemoStats {
        self.stats
    }
}

/// Inserts into a bounded memory: full, it starts over (a session's working
/// set is small; one that is not gains nothing from eviction order).
fn remember<V>(memory: &mut HashMap<Box<str>, V>, key: Box<str>, value: V) {
    if memory.len() >= MAX_REMEMBERED {
        memory.clear();
    }
    memory.insert(key, value);
}

/// A query's tokens, and its shape key: each token's type, with its text
/// for every token that is not a literal or a comment.
struct Shape {
    key: String,
    tokens: Vec<ScanToken>,
}

impl Shape {
    /// `None` when the shape cannot stand for the query (see the module doc).
    fn of(query: &str) -> Option<Shape> {
        if query.contains('\\') {
            return None;
        }
        // Only whitespace (PostgreSQL's: space, \t, \n, \r, \f, \v) lexes
        // to no token, and `scan_tokens` then builds a slice from a null
        // pointer (undefined behaviour in pg_query 18.1): never ask it.
        // Comments are tokens, so anything else has one.
        if query.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)) {
            return None;
        }
        let tokens = pg_query::scan_tokens(query).ok()?;
        let mut key = String::with_capacity(query.len() + tokens.len());
        for t in &tokens {
            let kind = Token::try_from(t.token).ok()?;
            // Unicode escapes (`U&'...'`, `U&"..."`, `UESCAPE`) are decoded
            // by the parser, not the lexer, and can fail there: such a query
            // is parsed every time, so the gateway never passes on one it
            // could not parse.
            if matches!(kind, Token::Usconst | Token::Uident | Token::Uescape) {
                return None;
            }
            // The type first, so `'1'` and `1` differ, and a separator no
            // token text holds outside a literal or a quoted identifier.
            push_decimal(&mut key, i64::from(t.token));
            key.push('\u{1}');
            if !matches!(
                kind,
                Token::Sconst
                    | Token::Bconst
                    | Token::Xconst
                    | Token::Iconst
                    | Token::Fconst
                    | Token::SqlComment
                    | Token::CComment
            ) {
                // A quoted identifier may hold \u{1}: its length goes first.
                let text = query.get(span(t)?)?;
                push_decimal(&mut key, text.len() as i64);
                key.push('\u{1}');
                key.push_str(text);
            }
            key.push('\u{2}');
        }
        Some(Shape { key, tokens })
    }
}

/// Appends `n` in decimal, as `write!` would, without the formatting
/// machinery (every token of every query goes through here).
fn push_decimal(out: &mut String, n: i64) {
    if n < 0 {
        out.push('-');
    }
    let mut n = n.unsigned_abs();
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
}

/// A token's byte range, when it is a valid one.
fn span(t: &ScanToken) -> Option<Range<usize>> {
    let (start, end) = (usize::try_from(t.start).ok()?, usize::try_from(t.end).ok()?);
    (start <= end).then_some(start..end)
}

/// Where a statement span boundary lies, in terms every query of a shape
/// shares.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bound {
    /// The start of the text.
    Zero,
    /// The end of the text.
    End,
    /// The start of token `n`.
    Start(usize),
    /// The end of token `n`.
    After(usize),
}

impl Bound {
    fn of(at: usize, query: &str, tokens: &[ScanToken]) -> Option<Bound> {
        if at == 0 {
            return Some(Bound::Zero);
        }
        if at == query.len() {
            return Some(Bound::End);
        }
        tokens.iter().enumerate().find_map(|(n, t)| {
            let s = span(t)?;
            if s.start == at {
                Some(Bound::Start(n))
            } else if s.end == at {
                Some(Bound::After(n))
            } else {
                None
            }
        })
    }

    fn at(self, query: &str, tokens: &[ScanToken]) -> Option<usize> {
        match self {
            Bound::Zero => Some(0),
            Bound::End => Some(query.len()),
            Bound::Start(n) => span(tokens.get(n)?).map(|s| s.start),
            Bound::After(n) => span(tokens.get(n)?).map(|s| s.end),
        }
    }
}

/// A classification for every query of one shape: the statements, and each
/// one's span (depth first) as token positions.
struct Template {
    statements: Vec<Statement>,
    spans: Vec<(Bound, Bound)>,
}

impl Template {
    /// `None` when a span boundary is not at a token (nothing to map it by).
    fn of(statements: &[Statement], query: &str, tokens: &[ScanToken]) -> Option<Template> {
        let mut spans = Vec::new();
        let mut ok = true;
        for s in statements {
            s.visit(&mut |s| match (Bound::of(s.span.start, query, tokens), Bound::of(s.span.end, query, tokens)) {
                (Some(a), Some(b)) => spans.push((a, b)),
                _ => ok = false,
            });
        }
        ok.then(|| Template { statements: statements.to_vec(), spans })
    }

    /// The statements of `query` (of this template's shape, lexed into
    /// `tokens`).
    fn instantiate(&self, query: &str, tokens: &[ScanToken]) -> Option<Vec<Statement>> {
        let mut out = self.statements.clone();
        let mut spans = self.spans.iter();
        let mut ok = true;
        for s in &mut out {
            visit_mut(
                s,
                &mut |s| match spans.next().and_then(|(a, b)| Some(a.at(query, tokens)?..b.at(query, tokens)?)) {
                    Some(range) => s.span = range,
                    None => ok = false,
                },
            );
        }
        ok.then_some(out)
    }
}

/// [`Statement::visit`], mutably, in the same order.
fn visit_mut(s: &mut Statement, f: &mut impl FnMut(&mut Statement)) {
    f(s);
    for inner in &mut s.inner {
        visit_mut(inner, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every query classifies by shape exactly as it parses.
    fn same_as_parsed(memo: &mut Memo, query: &str) {
        let remembered = memo.classify(query);
        let parsed = classify(query);
        assert_eq!(remembered.as_ref().as_ref().ok(), parsed.as_ref().ok(), "{query}");
        assert_eq!(remembered.is_err(), parsed.is_err(), "{query}");
    }

    #[test]
    fn push_decimal_writes_what_format_writes() {
        for n in [0, 7, 10, 99, 100, 4096, -1, -42, i64::from(i32::MAX), i64::MAX, i64::MIN] {
            let mut out = String::from("k");
            push_decimal(&mut out, n);
            assert_eq!(out, format!("k{n}"));
        }
    }

    #[test]
    fn literals_of_another_length_map_the_spans() {
        let mut memo = Memo::default();
        for q in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 4821377;",
            "UPDATE t SET a = 'x' WHERE id = 1; DELETE FROM u WHERE n = 'long string here'",
            "UPDATE t SET a = 'a much longer value' WHERE id = 123456; DELETE FROM u WHERE n = ''",
            "  /* lead */ EXPLAIN ANALYZE DELETE FROM t WHERE a = 1 ; SELECT 'x' -- tail",
            "  /* a longer comment */ EXPLAIN ANALYZE DELETE FROM t WHERE a = 99999 ; SELECT 'xyz' -- t",
            "WITH d AS (DELETE FROM a WHERE x = $$dollar$$ RETURNING *) SELECT * FROM d",
            "WITH d AS (DELETE FROM a WHERE x = $$other dollar body$$ RETURNING *) SELECT * FROM d",
        ] {
            same_as_parsed(&mut memo, q);
        }
        assert_eq!(memo.stats(), MemoStats { exact: 0, shape: 4, parsed: 4 }, "the second of each pair by shape");
        assert_eq!(memo.shapes.len(), 4, "one template per shape");
        same_as_parsed(&mut memo, "SELECT abalance FROM pgbench_accounts WHERE aid = 1;");
        assert_eq!(memo.stats().exact, 1);
    }

    proptest::proptest! {
        /// Whatever the literals, a query classified by shape is classified
        /// (kind, relations, WHERE, inner statements, column reads, spans)
        /// exactly as its parse is.
        #[test]
        fn any_literals_classify_as_parsed(
            template in 0usize..TEMPLATES.len(),
            ints in proptest::collection::vec(0u64..10_000_000_000, 4),
            strs in proptest::collection::vec("[a-z ']{0,12}", 4),
        ) {
            let mut memo = Memo::default();
            same_as_parsed(&mut memo, &fill(TEMPLATES[template], &[1, 2, 3, 4], &["a", "b", "c", "d"]));
            let strs: Vec<String> = strs.iter().map(|s| s.replace('\'', "''")).collect();
            let strs: Vec<&str> = strs.iter().map(String::as_str).collect();
            same_as_parsed(&mut memo, &fill(TEMPLATES[template], &ints, &strs));
        }
    }

    /// Queries with `{i}` (an integer) and `{s}` (a string's text) holes.
    const TEMPLATES: &[&str] = &[
        "SELECT abalance FROM pgbench_accounts WHERE aid = {i};",
        "UPDATE pgbench_accounts SET abalance = abalance + -{i} WHERE aid = {i};",
        "INSERT INTO h (a, b, c) VALUES ({i}, '{s}', {i}.{i}); SELECT '{s}'",
        "WITH d AS (DELETE FROM a WHERE x = '{s}' RETURNING *) SELECT * FROM d LIMIT {i}",
        "SELECT ssn, upper(name) AS n FROM people p WHERE p.id = {i} ORDER BY {i} -- {s}",
        "SELECT * FROM people GROUP BY {i}, name ORDER BY {i}",
        "/* {s} */ EXPLAIN DELETE FROM t WHERE a = {i}; DELETE FROM u",
        "SELECT * FROM t WHERE a IN ({i}, {i}, {i}) AND b = $${s}$$",
        "COPY (SELECT * FROM t WHERE a = '{s}') TO STDOUT",
        "PREPARE p AS UPDATE t SET a = '{s}' WHERE id = {i}",
        "SELECT {i}::bigint, '{s}'::text, B'1010', X'{i}'",
    ];

    fn fill(template: &str, ints: &[u64], strs: &[&str]) -> String {
        let (mut i, mut s) = (ints.iter().cycle(), strs.iter().cycle());
        let mut out = String::new();
        let mut rest = template;
        while let Some(at) = rest.find('{') {
            out.push_str(&rest[..at]);
            match &rest[at..at + 3] {
                "{i}" => out.push_str(&i.next().map(u64::to_string).unwrap_or_default()),
                _ => out.push_str(s.next().copied().unwrap_or_default()),
            }
            rest = &rest[at + 3..];
        }
        out + rest
    }

    #[test]
    fn identifiers_keywords_and_operators_are_part_of_the_shape() {
        let mut memo = Memo::default();
        for q in [
            "SELECT a FROM t WHERE id = 1",
            "SELECT a FROM u WHERE id = 1",
            "SELECT a FROM \"T\" WHERE id = 1",
            "SELECT a FROM t WHERE id = '1'",
            "DELETE FROM t WHERE id = 1",
            "DELETE FROM t",
            "SELECT ssn FROM people WHERE id = 2",
            "SELECT ssn AS x FROM people WHERE id = 2",
            "SELECT upper(ssn) FROM people WHERE id = 2",
            "SET ROLE 'admin'",
            "SET search_path = 'x'",
            "COPY t FROM STDIN",
            "COPY t FROM '/tmp/file'",
        ] {
            same_as_parsed(&mut memo, q);
        }
    }

    #[test]
    fn backslashes_errors_and_unlexable_text_take_the_full_path() {
        let mut memo = Memo::default();
        for q in
            ["SELECT 'a\\' FROM t", "SELECT E'a\\'' FROM t", "SELEC 1", "SELECT 'unterminated", "SELECT 1 FROM t WHERE"]
        {
            same_as_parsed(&mut memo, q);
        }
        // Unicode escapes are decoded by the parser and can fail there.
        same_as_parsed(&mut memo, "SELECT U&'!0061' UESCAPE '!' FROM t");
        same_as_parsed(&mut memo, "SELECT U&'!zzzz' UESCAPE '!' FROM t");
        same_as_parsed(&mut memo, "SELECT U&\"!0061\" UESCAPE '!' FROM t");
        same_as_parsed(&mut memo, "SELECT U&\"!0061\" UESCAPE 'xx' FROM t");
        // A parse error is not a template, whatever the literal.
        same_as_parsed(&mut memo, "SELECT 1 FROM t WHERE a = 1 AND");
        same_as_parsed(&mut memo, "SELECT 1 FROM t WHERE a = 2 AND");
        assert!(memo.shapes.is_empty(), "{:?}", memo.shapes.keys().collect::<Vec<_>>());
        // No token at all (pg_query's scan would build a slice from a null
        // pointer: this test aborts in a debug build if it is asked), and
        // comments alone, which are tokens.
        for q in ["", " \t\r\n\x0b\x0c", "-- only a comment", "/* only a comment */", ";", "  "] {
            same_as_parsed(&mut memo, q);
        }
        assert_eq!(memo.stats().shape, 0);
    }
}
