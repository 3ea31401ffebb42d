//! An incremental, lenient JSON lexer that unescapes strings and knows their
//! path (`$.auth.token`, `$.items[3].key`).
//!
//! Lenient the way real clients are: `NaN`/`Infinity`, comments (`//`,
//! `/* */`), single-quoted strings, unquoted keys, trailing or missing
//! commas, several documents in a row (NDJSON). It validates only as much as
//! it needs to track nesting. Nothing it consumes goes unscanned: keys,
//! string values and comments are emitted, and literals are checked to be
//! literals. Anything that is clearly not JSON makes [`JsonLexer::feed`]
//! give up, and [`JsonLexer::take_pending`] returns what it had consumed but
//! not emitted, so the caller can scan that and the rest as raw text.

use super::collect::{Emit, MAX_NAME};

/// Nesting deeper than this is still lexed, but paths stop growing.
const MAX_DEPTH: usize = 64;
/// Longest literal (number, `true`, `Infinity`…) accepted.
const MAX_LITERAL: usize = 64;

enum Frame {
    Object { key: String },
    Array { index: usize },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first byte of the document.
    Start,
    /// Expecting a value.
    Value,
    /// In an object, expecting a key or `}`.
    Key,
    /// After a key or a value, expecting a delimiter.
    After,
    /// Inside a string (key or value).
    Str,
    /// Inside a number or `true`/`false`/`null`/`NaN`/`Infinity`.
    Literal,
    /// Inside an unquoted key.
    Ident,
    /// After a `/` that starts a comment.
    Slash,
    /// Inside a `//` comment.
    LineComment,
    /// Inside a `/* */` comment; `true` after a `*`.
    BlockComment(bool),
}

#[derive(Clone, Copy)]
enum Escape {
    None,
    Backslash,
    /// `\u` and the hex digits read so far.
    Unicode {
        digits: u8,
        value: u16,
    },
}

/// See the module documentation.
pub(crate) struct JsonLexer {
    stack: Vec<Frame>,
    state: State,
    /// Where a comment returns to.
    resume: State,
    in_key: bool,
    quote: u8,
    key: Vec<u8>,
    literal: Vec<u8>,
    escape: Escape,
    high_surrogate: Option<u16>,
    out: Vec<u8>,
}

impl Default for JsonLexer {
    fn default() -> Self {
        Self {
            stack: Vec::new(),
            state: State::Start,
            resume: State::Start,
            in_key: false,
            quote: b'"',
            key: Vec::new(),
            literal: Vec::new(),
            escape: Escape::None,
            high_surrogate: None,
            out: Vec::new(),
        }
    }
}

fn literal_ok(lit: &[u8]) -> bool {
    const WORDS: &[&[u8]] =
        &[b"true", b"false", b"null", b"NaN", b"Infinity", b"-Infinity", b"+Infinity", b"-NaN", b"+NaN", b"undefined"];
    WORDS.contains(&lit)
        || (lit.first().is_some_and(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.'))
            && lit.iter().all(|b| b.is_ascii_hexdigit() || matches!(b, b'-' | b'+' | b'.' | b'x' | b'X')))
}

impl JsonLexer {
    /// Lexes the next chunk. `Err(i)` means the input is not JSON from byte
    /// `i` on; [`take_pending`](Self::take_pending) then has the bytes
    /// consumed before `i` that were not emitted.
    pub(crate) fn feed(&mut self, data: &[u8], sink: &mut impl Emit) -> Result<(), usize> {
        for (i, &b) in data.iter().enumerate() {
            match self.state {
                State::Str => {
                    self.string_byte(b, sink);
                    continue;
                }
                State::LineComment => {
                    if b == b'\n' {
                        self.state = self.resume;
                    } else {
                        self.push_out(b, sink);
                    }
                    continue;
                }
                State::BlockComment(star) => {
                    if star && b == b'/' {
                        self.state = self.resume;
                    } else {
                        self.state = State::BlockComment(b == b'*');
                        self.push_out(b, sink);
                    }
                    continue;
                }
                State::Slash => {
                    self.state = match b {
                        b'/' => State::LineComment,
                        b'*' => State::BlockComment(false),
                        _ => {
                            self.literal = b"/".to_vec();
                            return Err(i);
                        }
                    };
                    self.flush(sink);
                    let path = self.path();
                    sink.begin(&path);
                    continue;
                }
                State::Literal => {
                    if matches!(b, b',' | b'}' | b']' | b'/') || b.is_ascii_whitespace() {
                        if !literal_ok(&self.literal) {
                            return Err(i);
                        }
                        self.literal.clear();
                        self.state = State::After;
                    } else {
                        self.literal.push(b);
                        if self.literal.len() > MAX_LITERAL {
                            return Err(i + 1);
                        }
                        continue;
                    }
                }
                State::Ident => {
                    if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'-') {
                        self.push(b, sink);
                        continue;
                    }
                    self.end_key(sink);
                    if b == b':' {
                        self.state = State::Value;
                        continue;
                    }
                }
                _ => {}
            }
            // A byte-order mark (UTF-8, or UTF-16 transcoded) may open the document.
            if b.is_ascii_whitespace() || (self.state == State::Start && matches!(b, 0xef | 0xbb | 0xbf)) {
                continue;
            }
            match (self.state, b) {
                (_, b'/') => {
                    self.resume = self.state;
                    self.state = State::Slash;
                }
                // `After` too: lenient about missing commas, and NDJSON documents.
                (State::Start | State::Value | State::After, b'{') => {
                    self.stack.push(Frame::Object { key: String::new() });
                    self.state = State::Key;
                }
                (State::Start | State::Value | State::After, b'[') => {
                    self.stack.push(Frame::Array { index: 0 });
                    self.state = State::Value;
                }
                (State::Key | State::After | State::Value, b'}' | b']') if !self.stack.is_empty() => {
                    self.stack.pop();
                    self.state = State::After;
                }
                (State::After, b',') => match self.stack.last_mut() {
                    Some(Frame::Array { index }) => {
                        *index += 1;
                        self.state = State::Value;
                    }
                    Some(Frame::Object { .. }) => self.state = State::Key,
                    None => return Err(i),
                },
                (State::After, b':') => self.state = State::Value,
                (State::Key, b'"' | b'\'') => {
                    self.start_key(b, sink);
                    self.state = State::Str;
                }
                (State::Key, b) if b.is_ascii_alphabetic() || matches!(b, b'_' | b'$') => {
                    self.start_key(0, sink);
                    self.push(b, sink);
                    self.state = State::Ident;
                }
                (State::Start | State::Value | State::After, b'"' | b'\'') => {
                    self.in_key = false;
                    self.quote = b;
                    self.begin_value(sink);
                    self.state = State::Str;
                }
                (
                    State::Start | State::Value | State::After,
                    b'-' | b'+' | b'.' | b'0'..=b'9' | b't' | b'f' | b'n' | b'N' | b'I' | b'u',
                ) => {
                    self.literal.clear();
                    self.literal.push(b);
                    self.state = State::Literal;
                }
                _ => return Err(i),
            }
        }
        self.flush(sink);
        Ok(())
    }

    /// Bytes consumed but not emitted before the input stopped being JSON
    /// (a would-be literal, a lone `/`).
    pub(crate) fn take_pending(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.literal)
    }

    /// Ends the document.
    pub(crate) fn finish(&mut self, sink: &mut impl Emit) {
        if self.state == State::Ident {
            self.end_key(sink);
        }
        if self.state == State::Literal && !literal_ok(&self.literal) {
            // What is buffered (a comment's text) belongs to the field before,
            // as it would had a chunk ended here.
            self.flush(sink);
            // Not a literal after all: its bytes are scanned as text.
            let lit = std::mem::take(&mut self.literal);
            sink.begin("");
            sink.data(&lit);
        }
        self.flush(sink);
    }

    fn start_key(&mut self, quote: u8, sink: &mut impl Emit) {
        self.in_key = true;
        self.quote = quote;
        self.key.clear();
        // Keys are text a job chooses: scanned like values, at the object's path.
        self.flush(sink);
        let path = self.path();
        sink.begin(&path);
    }

    fn begin_value(&mut self, sink: &mut impl Emit) {
        self.flush(sink);
        let path = self.path();
        sink.begin(&path);
        // `"key": "` so assignment rules (`"password": "…"`) see the key.
        if let Some(Frame::Object { key }) = self.stack.last() {
            self.out.push(b'"');
            self.out.extend_from_slice(key.as_bytes());
            self.out.extend_from_slice(b"\": \"");
        } else {
            self.out.push(b'"');
        }
    }

    fn path(&self) -> String {
        let mut path = String::from("$");
        for frame in self.stack.iter().take(MAX_DEPTH) {
            match frame {
                Frame::Object { key }
                    if !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
                {
                    path.push('.');
                    path.push_str(key);
                }
                Frame::Object { key } => {
                    path.push_str("[\"");
                    path.push_str(&key.replace('\\', "\\\\").replace('"', "\\\""));
                    path.push_str("\"]");
                }
                Frame::Array { index } => {
                    path.push('[');
                    path.push_str(&index.to_string());
                    path.push(']');
                }
            }
        }
        if self.stack.len() > MAX_DEPTH {
            path.push('…');
        }
        path
    }

    fn string_byte(&mut self, b: u8, sink: &mut impl Emit) {
        match self.escape {
            Escape::None => match b {
                b'\\' => self.escape = Escape::Backslash,
                _ if b == self.quote => self.end_string(sink),
                _ => self.push(b, sink),
            },
            Escape::Backslash => {
                self.escape = Escape::None;
                let c = match b {
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'u' => {
                        self.escape = Escape::Unicode { digits: 0, value: 0 };
                        return;
                    }
                    other => other,
                };
                self.push(c, sink);
            }
            Escape::Unicode { digits, value } => {
                let Some(v) = super::http_scan::hex_val(Some(&b)) else {
                    // Malformed escape: keep the byte rather than lose data.
                    self.escape = Escape::None;
                    self.push(b, sink);
                    return;
                };
                let value = value << 4 | u16::from(v);
                if digits < 3 {
                    self.escape = Escape::Unicode { digits: digits + 1, value };
                } else {
                    self.escape = Escape::None;
                    self.code_unit(value, sink);
                }
            }
        }
    }

    fn code_unit(&mut self, unit: u16, sink: &mut impl Emit) {
        let c = match (self.high_surrogate.take(), unit) {
            (None, 0xD800..=0xDBFF) => {
                self.high_surrogate = Some(unit);
                return;
            }
            (Some(high), 0xDC00..=0xDFFF) => {
                char::from_u32(0x10000 + ((u32::from(high) - 0xD800) << 10) + (u32::from(unit) - 0xDC00))
            }
            (Some(_), _) | (None, 0xDC00..=0xDFFF) => Some('\u{FFFD}'),
            (None, _) => char::from_u32(u32::from(unit)),
        };
        let mut buf = [0u8; 4];
        for &b in c.unwrap_or('\u{FFFD}').encode_utf8(&mut buf).as_bytes() {
            self.push(b, sink);
        }
    }

    fn push(&mut self, b: u8, sink: &mut impl Emit) {
        if self.in_key && self.key.len() < MAX_NAME {
            self.key.push(b);
        }
        self.push_out(b, sink);
    }

    fn push_out(&mut self, b: u8, sink: &mut impl Emit) {
        self.out.push(b);
        if self.out.len() >= 8192 {
            self.flush(sink);
        }
    }

    fn end_key(&mut self, sink: &mut impl Emit) {
        let key = String::from_utf8_lossy(&self.key).into_owned();
        if let Some(Frame::Object { key: k }) = self.stack.last_mut() {
            *k = key;
        }
        self.in_key = false;
        self.flush(sink);
        self.state = State::After;
    }

    fn end_string(&mut self, sink: &mut impl Emit) {
        self.high_surrogate = None;
        if self.in_key {
            self.end_key(sink);
        } else {
            self.out.push(self.quote);
            self.flush(sink);
        }
        self.state = State::After;
    }

    fn flush(&mut self, sink: &mut impl Emit) {
        if !self.out.is_empty() {
            sink.data(&self.out);
            self.out.clear();
        }
    }
}

/// Whether a buffer looks like a JSON document: an object or array after
/// optional whitespace (a byte-order mark already removed).
pub(crate) fn looks_like_json(data: &[u8]) -> bool {
    matches!(data.iter().find(|b| !b.is_ascii_whitespace()), Some(b'{' | b'['))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(path, text)` per field, as emitted.
    #[derive(Default)]
    struct Fields(Vec<(String, Vec<u8>)>);

    impl Emit for Fields {
        fn begin(&mut self, path: &str) {
            self.0.push((path.to_owned(), Vec::new()));
        }
        fn data(&mut self, bytes: &[u8]) {
            match self.0.last_mut() {
                Some((_, text)) => text.extend_from_slice(bytes),
                None => self.0.push((String::new(), bytes.to_vec())),
            }
        }
    }

    /// Lexes `chunks` and ends as the body scanner does when the input
    /// stops being JSON.
    fn lex(chunks: &[&[u8]]) -> Vec<(String, Vec<u8>)> {
        let mut lexer = JsonLexer::default();
        let mut sink = Fields::default();
        for chunk in chunks {
            if lexer.feed(chunk, &mut sink).is_err() {
                lexer.take_pending();
                break;
            }
        }
        lexer.finish(&mut sink);
        sink.0
    }

    /// Found by fuzz target json_lex: a comment's text still buffered when
    /// a would-be literal turned out not to be one went to the next field
    /// (`""`) unless a chunk had ended after the comment.
    #[test]
    fn chunking_does_not_move_comment_text_to_another_field() {
        let doc: &[u8] = b"/* c */tru,";
        let whole = lex(&[doc]);
        assert_eq!(whole, lex(&[&doc[..7], &doc[7..]]));
        assert!(whole.iter().any(|(path, text)| !path.is_empty() && text.as_slice() == b" c *"), "{whole:?}");
    }
}
