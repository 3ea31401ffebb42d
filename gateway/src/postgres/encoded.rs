//! Keys in SQL's own encodings. A job need not write a key as it is: SQL
//! spells the same string as `E'\x67\x68…'`, `E'\147\150…'`,
//! `U&'\0067\0068…'` (with any `UESCAPE` character), or, with
//! `standard_conforming_strings` off, `'\x67…'`; a `bytea` value arrives as
//! `'\x6768…'` (hex format) or `'\147\150…'` (escape format), in a literal,
//! a bind parameter or a COPY row; and `decode('…', 'hex' | 'base64')` turns
//! text back into the key on the server. Each of these is the protocol's own
//! way of carrying the value, so the handler decodes them before the
//! detector looks, exactly as the HTTP handler decodes JSON escapes and
//! base64.
//!
//! The recording masker's views (`mask::views`: percent, backslash with
//! octal, SQL Unicode escapes with any `UESCAPE` character,
//! quoted-printable, base64 and hex runs) already read most of these in the
//! raw text, values and COPY data included. On top of them, a text with a
//! backslash or a Unicode escape string (`U&'…'`, `U&"…"`) has every string
//! of its parse tree searched, under both readings of
//! `standard_conforming_strings` (the gateway does not assume the session's
//! setting): the constants as PostgreSQL's own lexer decoded them, so no
//! escape syntax can be read differently here than on the server (one-digit
//! `\x7`, `\U0001F600`, whatever a view does not model). COPY's text format
//! has its own escapes (`copy_unescape`).
//!
//! Computed strings (`chr(103) || chr(104)`, `reverse('…')`, encryption) are
//! a job transforming its key, which no scanner can follow: see
//! docs/threat-model.md.

use std::{collections::HashSet, sync::Arc};

use bytes::{Buf as _, BytesMut};

use crate::{
    detect::{Detection, Detector, Secret, StreamScanner},
    mask::views::{self, Found, OverBudget},
};

/// Shortest parse-tree string searched: no rule finds a shorter key.
const MIN_CONSTANT: usize = 8;

/// Every key in `sql` and in the values it spells in SQL's encodings, as
/// ranges of `sql` (a key inside an escaped constant: from the constant's
/// start to its end). `Err` when the text holds more nested encodings than
/// can be decoded within bounds: what it hides is unknown.
pub(crate) fn find_in_sql(detector: &Detector, sql: &str) -> Result<Vec<Found>, OverBudget> {
    let mut found = views::find_all(detector, sql.as_bytes())?;
    if has_escapes(sql) {
        let tokens = pg_query::scan_tokens(sql).ok();
        for constant in constants(sql) {
            let span = tokens
                .as_ref()
                .and_then(|t| t.iter().find(|t| usize::try_from(t.start).ok() == Some(constant.at)))
                .and_then(|t| Some(usize::try_from(t.start).ok()?..usize::try_from(t.end).ok()?))
                .filter(|r| r.start < r.end && r.end <= sql.len())
                // Not a token start (a node's location, not its constant's):
                // from there to the end, which is sure to cover it.
                .unwrap_or(constant.at.min(sql.len())..sql.len());
            let inner = views::find_all(detector, constant.value.as_bytes())?;
            merge(&mut found, inner.into_iter().map(|f| Found { range: span.clone(), detection: f.detection }));
        }
    }
    Ok(found)
}

/// The keys in a COPY's data: the bytes as they are, as one stream across
/// CopyData messages (a key split between two is found), and each block of
/// whole lines (a row never spans lines in text format; CSV's quoted
/// newlines do not split keys) through the masker's views, as sent (its raw
/// bytes are the stream's) and with COPY's text-format escapes decoded (`\x67`, `\147`, `\\x6768…` for a
/// `bytea`). A line longer than [`COPY_WINDOW`] is searched in windows that
/// overlap by [`COPY_OVERLAP`], so padding cannot push a key out of sight.
/// Each key is reported once per COPY.
pub(crate) struct CopyScanner {
    stream: StreamScanner,
    detector: Arc<Detector>,
    /// Bytes after the last whole line.
    pending: BytesMut,
    seen: HashSet<(Arc<str>, Secret)>,
}

/// Longest run of a COPY line searched at once.
const COPY_WINDOW: usize = 256 << 10;
/// Bytes a window shares with the next: room for any encoded key.
const COPY_OVERLAP: usize = 16 << 10;

impl CopyScanner {
    /// A scanner for one COPY FROM STDIN.
    pub(crate) fn new(detector: &Arc<Detector>) -> CopyScanner {
        CopyScanner {
            stream: detector.stream(),
            detector: Arc::clone(detector),
            pending: BytesMut::new(),
            seen: HashSet::new(),
        }
    }

    /// The keys found with `data` (the next CopyData's payload).
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<Vec<Detection>, OverBudget> {
        let mut out = self.stream.feed(data);
        self.pending.extend_from_slice(data);
        if let Some(last) = memchr::memrchr(b'\n', &self.pending) {
            let block = self.pending.split_to(last + 1);
            out.extend(self.block(&block)?);
        }
        while self.pending.len() > COPY_WINDOW {
            let window = self.pending[..COPY_WINDOW].to_vec();
            out.extend(self.block(&window)?);
            self.pending.advance(COPY_WINDOW - COPY_OVERLAP);
        }
        Ok(self.once(out))
    }

    /// The keys found at the end of the data (CopyDone).
    pub(crate) fn finish(&mut self) -> Result<Vec<Detection>, OverBudget> {
        let mut out = self.stream.finish();
        let rest = std::mem::take(&mut self.pending);
        out.extend(self.block(&rest)?);
        Ok(self.once(out))
    }

    fn block(&self, block: &[u8]) -> Result<Vec<Detection>, OverBudget> {
        // The raw bytes were the stream's: only the views here.
        let mut found = views::find(&self.detector, block)?;
        if let Some(decoded) = copy_unescape(block) {
            merge(&mut found, views::find_all(&self.detector, &decoded)?);
        }
        Ok(found.into_iter().map(|f| f.detection).collect())
    }

    fn once(&mut self, found: Vec<Detection>) -> Vec<Detection> {
        found.into_iter().filter(|d| self.seen.insert((Arc::clone(&d.rule_id), d.secret.clone()))).collect()
    }
}

/// `block` with COPY's text-format escapes decoded (`\b \f \n \r \t \v`,
/// `\` and one to three octal digits, `\x` and one or two hex digits, `\c`
/// for any other `c`), when it holds a backslash.
pub(crate) fn copy_unescape(block: &[u8]) -> Option<Vec<u8>> {
    let first = memchr::memchr(b'\\', block)?;
    let mut out = Vec::with_capacity(block.len());
    out.extend_from_slice(&block[..first]);
    let mut i = first;
    while i < block.len() {
        let b = block[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let Some(&c) = block.get(i + 1) else {
            out.push(b);
            break;
        };
        i += 2;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                for _ in 0..2 {
                    match block.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push((v & 0xff) as u8);
            }
            b'x' if block.get(i).is_some_and(u8::is_ascii_hexdigit) => {
                let mut v = 0u8;
                for _ in 0..2 {
                    match block.get(i).copied().and_then(hex_digit) {
                        Some(d) => {
                            v = v << 4 | d;
                            i += 1;
                        }
                        None => break,
                    }
                }
                out.push(v);
            }
            other => out.push(other),
        }
    }
    Some(out)
}

/// Adds what `more` finds that `found` does not hold yet (one key seen
/// through several encodings is one finding).
fn merge(found: &mut Vec<Found>, more: impl IntoIterator<Item = Found>) {
    for f in more {
        let known = found
            .iter()
            .any(|k| k.detection.rule_id == f.detection.rule_id && k.detection.secret == f.detection.secret);
        if !known {
            found.push(f);
        }
    }
}

/// Whether a string constant of `sql` may differ from its spelling: a
/// backslash (`E'…'`, or `'…'` with `standard_conforming_strings` off) or a
/// Unicode escape string (`U&'…'`, `U&"…"`: the lexer wants `&` right
/// before the quote).
pub fn has_escapes(sql: &str) -> bool {
    memchr::memchr(b'\\', sql.as_bytes()).is_some() || sql.contains("&'") || sql.contains("&\"")
}

/// A string of a parse tree, decoded, and where its node starts in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constant {
    /// The value as the server reads it.
    pub value: String,
    /// Byte offset of the innermost node with a location that holds it.
    pub at: usize,
}

/// Every string (of at least [`MIN_CONSTANT`] bytes) in the parse trees of
/// `sql` under both readings of `standard_conforming_strings`: constants,
/// identifiers, everything the server will read. A reading the grammar
/// rejects gives nothing (the classification refuses such a text anyway).
pub fn constants(sql: &str) -> Vec<Constant> {
    let mut out: Vec<Constant> = Vec::new();
    for options in [
        pg_query::ParserOptions::DEFAULT,
        pg_query::ParserOptions::DEFAULT | pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS,
    ] {
        let Ok(parsed) = pg_query::parse(sql, options) else { continue };
        // The tree's own `Serialize` visits every field of every node.
        let Ok(tree) = serde_json::to_value(&parsed.protobuf) else { continue };
        strings(&tree, 0, &mut out);
    }
    out.sort_by(|a, b| (a.at, &a.value).cmp(&(b.at, &b.value)));
    out.dedup();
    out
}

fn strings(value: &serde_json::Value, at: usize, out: &mut Vec<Constant>) {
    use serde_json::Value;
    match value {
        Value::String(s) if s.len() >= MIN_CONSTANT => out.push(Constant { value: s.clone(), at }),
        Value::Array(items) => items.iter().for_each(|v| strings(v, at, out)),
        Value::Object(fields) => {
            let at = fields.get("location").and_then(Value::as_i64).and_then(|l| usize::try_from(l).ok()).unwrap_or(at);
            fields.values().for_each(|v| strings(v, at, out));
        }
        _ => {}
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_are_decoded_by_the_server_grammar() {
        let sql = r"insert into t values (E'\x67\150\u0069 and more', U&'!0067!0068 and more' UESCAPE '!')";
        let values: Vec<String> = constants(sql).into_iter().map(|c| c.value).collect();
        assert!(values.iter().any(|v| v == "ghi and more"), "{values:?}");
        assert!(values.iter().any(|v| v == "gh and more"), "{values:?}");
        // Off: a plain literal's backslashes are escapes too.
        let values: Vec<String> = constants(r"select '\x41\x42\x43 and more'").into_iter().map(|c| c.value).collect();
        assert!(values.iter().any(|v| v == "ABC and more"), "{values:?}");
        assert!(values.iter().any(|v| v == r"\x41\x42\x43 and more"), "both readings: {values:?}");
    }

    #[test]
    fn constants_point_at_their_token() {
        let sql = r"select 1, E'\x41\x42\x43 and more'";
        let c = constants(sql).into_iter().find(|c| c.value == "ABC and more").expect("constant");
        assert_eq!(&sql[c.at..c.at + 2], "E'");
    }

    #[test]
    fn copy_escapes_decode_as_the_server_reads_them() {
        assert_eq!(copy_unescape(br"\x67\150p_\t\\x41\x4").as_deref(), Some(&b"ghp_\t\\x41\x04"[..]));
        assert_eq!(copy_unescape(b"plain"), None);
    }

    #[test]
    fn text_too_costly_to_decode_is_an_error_not_a_pass() {
        // Every view of this holds every trigger again (as in
        // `mask::views`' own test): the handler refuses on `Err`.
        let detector = Arc::new(Detector::builtin().unwrap());
        let hostile = "%25%5C+\\u0025\\\\=\r\nQUJDREVGR0hJSktMTU5PUFFSU1RVVldY ".repeat(4096);
        assert!(find_in_sql(&detector, &hostile).is_err());
        let mut copy = CopyScanner::new(&detector);
        let fed = copy.feed(hostile.as_bytes()).and_then(|_| copy.finish());
        assert!(fed.is_err());
    }

    #[test]
    fn escapes_are_noticed() {
        assert!(has_escapes(r"select E'\x41'"));
        assert!(has_escapes("select U&'d\\0061t\\+000061'"));
        assert!(has_escapes("select u&\"x\""));
        assert!(!has_escapes("select 'plain', $$dollar$$"));
    }
}
