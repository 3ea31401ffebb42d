//! An incremental, lenient JSON lexer that unescapes string values and knows
//! their path (`$.auth.token`, `$.items[3].key`).
//!
//! It validates only as much as it needs to track nesting; anything that is
//! clearly not JSON makes [`JsonLexer::feed`] give up so the caller can scan
//! the rest as raw text.

use super::body::{Emit, MAX_NAME};

/// Nesting deeper than this is still lexed, but paths stop growing.
const MAX_DEPTH: usize = 64;

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
    /// Inside a number or `true`/`false`/`null`.
    Literal,
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
    in_key: bool,
    key: Vec<u8>,
    escape: Escape,
    high_surrogate: Option<u16>,
    out: Vec<u8>,
}

impl Default for JsonLexer {
    fn default() -> Self {
        Self {
            stack: Vec::new(),
            state: State::Start,
            in_key: false,
            key: Vec::new(),
            escape: Escape::None,
            high_surrogate: None,
            out: Vec::new(),
        }
    }
}

impl JsonLexer {
    /// Lexes the next chunk. `Err(i)` means the input is not JSON from byte `i` on.
    pub(crate) fn feed(&mut self, data: &[u8], sink: &mut impl Emit) -> Result<(), usize> {
        for (i, &b) in data.iter().enumerate() {
            if self.state == State::Str {
                self.string_byte(b, sink);
                continue;
            }
            if self.state == State::Literal {
                if matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace() {
                    self.state = State::After;
                } else {
                    continue;
                }
            }
            if b.is_ascii_whitespace() {
                continue;
            }
            match (self.state, b) {
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
                (State::Key, b'"') => {
                    self.in_key = true;
                    self.key.clear();
                    self.state = State::Str;
                }
                (State::Start | State::Value | State::After, b'"') => {
                    self.in_key = false;
                    self.begin_value(sink);
                    self.state = State::Str;
                }
                (State::Value | State::After, b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => self.state = State::Literal,
                _ => return Err(i),
            }
        }
        self.flush(sink);
        Ok(())
    }

    /// Ends the document.
    pub(crate) fn finish(&mut self, sink: &mut impl Emit) {
        self.flush(sink);
    }

    fn begin_value(&mut self, sink: &mut impl Emit) {
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
                b'"' => self.end_string(sink),
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
        if self.in_key {
            if self.key.len() < MAX_NAME {
                self.key.push(b);
            }
        } else {
            self.out.push(b);
            if self.out.len() >= 8192 {
                self.flush(sink);
            }
        }
    }

    fn end_string(&mut self, sink: &mut impl Emit) {
        self.high_surrogate = None;
        if self.in_key {
            let key = String::from_utf8_lossy(&self.key).into_owned();
            if let Some(Frame::Object { key: k }) = self.stack.last_mut() {
                *k = key;
            }
            self.in_key = false;
        } else {
            self.out.extend_from_slice(b"\"");
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
