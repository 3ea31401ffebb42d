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
//!
//! Before the lexer, a *quick shape* ([`Quick`]): one pass over the bytes
//! that recognises only the simplest literals (`'...'` strings without a
//! prefix, decimal integers) and gives up on everything whose lexing it does
//! not follow exactly (comments, dollar quotes, backslashes, prefixed strings
//! (`E''`, `B''`, `X''`, `N''`, `U&''`), Unicode escapes, non-ASCII text
//! outside strings, numbers touching letters, dots or underscores). Its key
//! is the query's bytes with each literal replaced by its token type, so two
//! queries of one quick key are the same bytes outside literals the server's
//! lexer reads as single tokens of the same type: the quick key is a
//! stricter shape than the lexer's, and needs no lex. A query the quick pass
//! gives up on takes the lexer's shape as before.

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
    quick: HashMap<Box<str>, QuickTemplate>,
    shapes: HashMap<Box<str>, Template>,
    stats: MemoStats,
}

/// How a [`Memo`]'s queries were classified.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MemoStats {
    /// Remembered by exact text.
    pub exact: u64,
    /// Remembered by shape (the quick one or the lexer's).
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
        let quick = Quick::of(query);
        if let Some(quick) = &quick {
            if let Some(statements) = self.quick.get(&*quick.key).and_then(|t| t.instantiate(&quick.literals)) {
                self.stats.shape += 1;
                return Arc::new(Ok(statements));
            }
        }
        let shape = Shape::of(query);
        let known = shape.as_ref().and_then(|s| self.shapes.get(&*s.key)?.instantiate(query, &s.tokens));
        let fresh = match known {
            Some(statements) => {
                self.stats.shape += 1;
                Arc::new(Ok(statements))
            }
            None => {
                self.stats.parsed += 1;
                let fresh = Arc::new(classify(query));
                if let (Some(shape), Ok(statements)) = (shape, fresh.as_ref()) {
                    if let Some(template) = Template::of(statements, query, &shape.tokens) {
                        remember(&mut self.shapes, shape.key.into_boxed_str(), template);
                    }
                }
                fresh
            }
        };
        match (quick, fresh.as_ref()) {
            // The quick shape serves this text again as cheaply as the exact
            // memory would (one pass, one lookup), without keeping the text.
            (Some(quick), Ok(statements)) => {
                if let Some(template) = QuickTemplate::of(statements, &quick.literals) {
                    remember(&mut self.quick, quick.key.into_boxed_str(), template);
                }
            }
            _ => remember(&mut self.exact, query.into(), Arc::clone(&fresh)),
        }
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

/// A query's literals as the quick pass finds them (see the module doc), and
/// its quick key: the query's bytes with each literal replaced by `\u{1}`
/// and its token type (`S`: string, `I`: integer that fits 32 bits, `F`:
/// larger integer, a numeric constant to the server).
struct Quick {
    key: String,
    /// Each literal's byte range, quotes included, in order.
    literals: Vec<Range<usize>>,
}

/// Bytes that continue an identifier (or would make a number trailing
/// junk): ASCII letters, digits, `_`, `$`, and any non-ASCII byte.
fn ident_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Where the quoted string or identifier opening at `open` (its quote
/// doubled inside) ends: the index after its closing quote. `None` when it
/// is not closed, or holds a backslash (an escape with
/// `standard_conforming_strings` off) or a NUL (the text's end to the
/// parser): not the quick pass's.
fn quoted_end(b: &[u8], open: usize) -> Option<usize> {
    let quote = b[open];
    let mut i = open + 1;
    loop {
        let at = i + memchr::memchr3(quote, b'\\', 0, &b[i..])?;
        if b[at] != quote {
            return None;
        }
        if b.get(at + 1) == Some(&quote) {
            i = at + 2;
        } else {
            return Some(at + 1);
        }
    }
}

impl Quick {
    /// `None` when the quick pass does not follow the query's lexing
    /// exactly: it then takes the lexer's shape.
    fn of(query: &str) -> Option<Quick> {
        let b = query.as_bytes();
        let mut key = String::with_capacity(query.len());
        let mut literals = Vec::new();
        // Start of the bytes not yet copied into the key.
        let mut copied = 0;
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'\'' => {
                    // A prefix (`E`, `B`, `X`, `N`, `U&`, or an identifier
                    // ending in one) changes what the string is.
                    if i > 0 && (ident_byte(b[i - 1]) || b[i - 1] == b'&') {
                        return None;
                    }
                    let start = i;
                    i = quoted_end(b, i)?;
                    key.push_str(&query[copied..start]);
                    key.push_str("\u{1}S");
                    literals.push(start..i);
                    copied = i;
                }
                b'0'..=b'9' => {
                    // After a dot: a fraction, or a field (`t.1`), either way
                    // not a lone integer.
                    if i > 0 && b[i - 1] == b'.' {
                        return None;
                    }
                    let start = i;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                    // `1e5`, `1.5`, `0x1f`, `1_000`, `1abc`: not this pass's.
                    if i < b.len() && (ident_byte(b[i]) || b[i] == b'.') {
                        return None;
                    }
                    let digits = &query[start..i];
                    // The server's lexer: an integer that does not fit an
                    // int4 is a numeric constant (another token type).
                    let small = digits.len() <= 10 && digits.parse::<u64>().is_ok_and(|v| v <= i32::MAX as u64);
                    key.push_str(&query[copied..start]);
                    key.push_str(if small { "\u{1}I" } else { "\u{1}F" });
                    literals.push(start..i);
                    copied = i;
                }
                b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                    let start = i;
                    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$') {
                        i += 1;
                    }
                    // Non-ASCII identifiers, and `UESCAPE` (only meaningful
                    // after a Unicode escape, given up on anyway).
                    if (i < b.len() && b[i] >= 0x80) || query[start..i].eq_ignore_ascii_case("uescape") {
                        return None;
                    }
                }
                b'"' => {
                    // A quoted identifier is copied as it is; `U&"` is not
                    // this pass's.
                    if i > 0 && (ident_byte(b[i - 1]) || b[i - 1] == b'&') {
                        return None;
                    }
                    i = quoted_end(b, i)?;
                    // Non-ASCII inside stays in the key byte for byte.
                }
                b'$' => {
                    // A parameter (`$1`) is copied; anything else after `$`
                    // is a dollar quote (or an error).
                    i += 1;
                    let digits = i;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                    if i == digits || (i < b.len() && (ident_byte(b[i]) || b[i] == b'.')) {
                        return None;
                    }
                }
                // Comments (`--`, `/*`, also inside a run of operator
                // characters), where the lexer reads to the line's end or
                // the matching `*/`.
                b'-' if b.get(i + 1) == Some(&b'-') => return None,
                b'/' if b.get(i + 1) == Some(&b'*') => return None,
                // Whitespace, operators and punctuation, copied.
                b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c => i += 1,
                b'!'..=b'~' if b[i] != b'\\' && b[i] != b'`' => i += 1,
                // Control characters (the key's separator among them),
                // backslashes, backquotes, non-ASCII bytes outside strings.
                _ => return None,
            }
        }
        key.push_str(&query[copied..]);
        Some(Quick { key, literals })
    }
}

/// Where a statement span boundary lies for every query of a quick shape:
/// `after` literals come before it, and it lies `offset` bytes after the
/// last of them (after the start of the text when `after` is 0). The bytes
/// between are the same in every such query.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct QuickBound {
    after: usize,
    offset: usize,
}

impl QuickBound {
    /// `None` when `at` lies inside a literal.
    fn of(at: usize, literals: &[Range<usize>]) -> Option<QuickBound> {
        let after = literals.partition_point(|l| l.end <= at);
        if literals.get(after).is_some_and(|l| l.start < at) {
            return None;
        }
        let base = if after == 0 { 0 } else { literals[after - 1].end };
        Some(QuickBound { after, offset: at - base })
    }

    fn at(self, literals: &[Range<usize>]) -> Option<usize> {
        let base = match self.after {
            0 => 0,
            n => literals.get(n - 1)?.end,
        };
        Some(base + self.offset)
    }
}

/// A classification for every query of one quick shape, each statement's
/// span (depth first) as [`QuickBound`]s.
struct QuickTemplate {
    statements: Vec<Statement>,
    spans: Vec<(QuickBound, QuickBound)>,
}

impl QuickTemplate {
    fn of(statements: &[Statement], literals: &[Range<usize>]) -> Option<QuickTemplate> {
        let mut spans = Vec::new();
        let mut ok = true;
        for s in statements {
            s.visit(&mut |s| match (QuickBound::of(s.span.start, literals), QuickBound::of(s.span.end, literals)) {
                (Some(a), Some(b)) => spans.push((a, b)),
                _ => ok = false,
            });
        }
        ok.then(|| QuickTemplate { statements: statements.to_vec(), spans })
    }

    /// The statements of a query of this shape whose literals lie at
    /// `literals` (as many as the template's: the keys are equal).
    fn instantiate(&self, literals: &[Range<usize>]) -> Option<Vec<Statement>> {
        let mut out = self.statements.clone();
        let mut spans = self.spans.iter();
        let mut ok = true;
        for s in &mut out {
            visit_mut(s, &mut |s| match spans.next().and_then(|(a, b)| Some(a.at(literals)?..b.at(literals)?)) {
                Some(range) => s.span = range,
                None => ok = false,
            });
        }
        ok.then_some(out)
    }
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
        // A text seen before: by its quick shape (texts with one are not
        // kept), the others by the text.
        same_as_parsed(&mut memo, "SELECT abalance FROM pgbench_accounts WHERE aid = 1;");
        assert_eq!(memo.stats(), MemoStats { exact: 0, shape: 5, parsed: 4 });
        same_as_parsed(&mut memo, "WITH d AS (DELETE FROM a WHERE x = $$dollar$$ RETURNING *) SELECT * FROM d");
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
    fn the_quick_shape_gives_up_on_what_it_does_not_follow() {
        for q in [
            "SELECT 1 -- comment",
            "SELECT 1 /* comment */",
            "SELECT 1 /* outer /* nested */ still comment ' */",
            "SELECT 1 +-- comment\n 2",
            "SELECT 1 */* comment */ 2",
            "SELECT $$dollar ' quoted$$",
            "SELECT $tag$x$tag$",
            "SELECT $",
            "SELECT $1abc",
            "SELECT E'x'",
            "SELECT e'x'",
            "SELECT B'101'",
            "SELECT X'1f'",
            "SELECT N'x'",
            "SELECT U&'x'",
            "SELECT u&'x'",
            "SELECT U&\"x\"",
            "SELECT foo'x'",
            "SELECT 1'x'",
            "SELECT 1e5",
            "SELECT 1.5",
            "SELECT .5",
            "SELECT t.1",
            "SELECT 1.",
            "SELECT 0x1f",
            "SELECT 0o17",
            "SELECT 0b101",
            "SELECT 1_000",
            "SELECT 1abc",
            "SELECT 1$",
            "SELECT é FROM t",
            "SELECT aé FROM t",
            "SELECT 'a\\' FROM t",
            "SELECT 'a' UESCAPE '!'",
            "SELECT 'a\u{0}'",
            "SELECT \u{1}S FROM t",
            "SELECT `a`",
            "SELECT 'unterminated",
            "SELECT \"unterminated",
        ] {
            assert!(Quick::of(q).is_none(), "{q:?}");
        }
    }

    #[test]
    fn the_quick_key_keeps_all_but_the_literals() {
        let key = |q: &str| Quick::of(q).map(|s| s.key);
        assert_eq!(key("SELECT a FROM t WHERE id = 1"), key("SELECT a FROM t WHERE id = 4821377"));
        assert_eq!(key("SELECT 'x''y', \"q'\" FROM t"), key("SELECT '--/*$$\u{1}é\n', \"q'\" FROM t"));
        for (a, b) in [
            ("SELECT a FROM t WHERE id = 1", "SELECT a FROM u WHERE id = 1"),
            ("SELECT a FROM t WHERE id = 1", "SELECT a FROM t WHERE id = '1'"),
            ("SELECT a FROM t WHERE id = 1", "SELECT a FROM t WHERE id = 2147483648"),
            ("SELECT a FROM t WHERE id = 1", "SELECT a FROM t WHERE id = $1"),
            ("SELECT a FROM t WHERE id = 1", "select a from t where id = 1"),
            ("SELECT 'a'\n'b'", "SELECT 'a' 'b'"),
            ("SELECT \"T\" FROM t", "SELECT \"t\" FROM t"),
            ("SELECT 1 FROM t", "SELECT 1  FROM t"),
        ] {
            assert!(key(a).is_some() && key(b).is_some(), "{a:?} {b:?}");
            assert_ne!(key(a), key(b), "{a:?} {b:?}");
        }
        // The largest int4 is an integer to the server, one more a numeric.
        assert_eq!(key("SELECT 2147483647"), key("SELECT 0000000001"));
        assert_ne!(key("SELECT 2147483647"), key("SELECT 2147483648"));
        assert_ne!(key("SELECT 1"), key("SELECT 00000000001"));
    }

    #[test]
    fn adversarial_literals_classify_as_parsed() {
        let mut memo = Memo::default();
        for q in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 1;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 2147483648;",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 7;",
            "SELECT 'x' FROM t; DELETE FROM u WHERE a = 'y'",
            "SELECT '; DELETE FROM u --' FROM t; DELETE FROM u WHERE a = '/* x'",
            "SELECT ''';DROP TABLE v;''' FROM t; DELETE FROM u WHERE a = ''",
            "SELECT 'a'\n'b' FROM t WHERE c = 1",
            "SELECT 'a'\n'bcdef' FROM t WHERE c = 22",
            "SELECT 'a' 'b' FROM t WHERE c = 1",
            "SELECT 'a' 'bcdef' FROM t WHERE c = 22",
            "SELECT \"a\"\"b\"'x' FROM t WHERE c = 1",
            "SELECT \"a\"\"b\"'xyz' FROM t WHERE c = 12",
            "SELECT \"it's\" FROM \"t;u\" WHERE x = 'it''s'",
            "SELECT \"it's\" FROM \"t;u\" WHERE x = 'é \u{1} $$ --'",
            "PREPARE p AS DELETE FROM t WHERE a = 1; EXECUTE p",
            "PREPARE p AS DELETE FROM t WHERE a = 123456; EXECUTE p",
            "EXPLAIN ANALYZE DELETE FROM t WHERE a = 'x'; SELECT 1",
            "EXPLAIN ANALYZE DELETE FROM t WHERE a = 'xyzzy'; SELECT 99",
            "SELECT * FROM t ORDER BY 1",
            "SELECT * FROM t ORDER BY 2",
            "SELECT * FROM t LIMIT 1 OFFSET 2; SELECT 3",
            "SELECT * FROM t LIMIT 10 OFFSET 200; SELECT 3000",
            "SELECT interval '1 day', date '2020-01-01'",
            "SELECT interval 'not an interval', date 'not a date'",
            "SELECT $1 FROM t WHERE a = 1",
            "SELECT $1 FROM t WHERE a = 11",
            "SELECT 1 FROM t WHERE",
            "SELECT 2 FROM t WHERE",
            "",
            "   ",
        ] {
            same_as_parsed(&mut memo, q);
        }
        assert!(memo.stats().shape >= 10, "{:?}", memo.stats());
    }

    /// Fragments, literal and not, that a query is built from.
    const FRAGMENTS: &[&str] = &[
        "SELECT ",
        "DELETE FROM t",
        "UPDATE t SET a = ",
        " WHERE b = ",
        ";",
        " ",
        "\n",
        ", ",
        "(",
        ")",
        "-",
        "+",
        "* ",
        "t",
        "\"q'\"",
        "'{s}'",
        "{i}",
        "'{s}'\n'{s}'",
        " FROM u",
        "$1",
        "E'{s}'",
        "--c\n",
        "/* c */",
        "$$ {s} $$",
        "U&'{s}'",
        "1.{i}",
        "::int",
        " ORDER BY ",
        " LIMIT ",
        "x.{i}",
        "PREPARE p AS ",
        "EXPLAIN ",
        " RETURNING *",
        "WITH d AS (DELETE FROM v RETURNING *) SELECT * FROM d",
    ];

    proptest::proptest! {
        /// Built from fragments (adversarial ones among them) and filled with
        /// any literals, a query the memo classifies by a shape is classified
        /// as it parses.
        #[test]
        fn fragments_with_any_literals_classify_as_parsed(
            parts in proptest::collection::vec(0usize..FRAGMENTS.len(), 1..12),
            ints in proptest::collection::vec(0u64..10_000_000_000, 4),
            strs in proptest::collection::vec("[a-z '\"$;/*\u{1}é\n-]{0,8}", 4),
        ) {
            let template: String = parts.iter().map(|&p| FRAGMENTS[p]).collect();
            let mut memo = Memo::default();
            same_as_parsed(&mut memo, &fill(&template, &[1, 2, 3, 4], &["a", "b", "c", "d"]));
            let strs: Vec<String> = strs.iter().map(|s| s.replace('\'', "''")).collect();
            let strs: Vec<&str> = strs.iter().map(String::as_str).collect();
            same_as_parsed(&mut memo, &fill(&template, &ints, &strs));
        }
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
