//! JSON field values by field name, found in a stream.
//!
//! A key (`"name"` with the exact, case-sensitive bytes of a configured
//! field name, no escape sequences) is found by a literal search anywhere in
//! the text, so JSON embedded in other text (NDJSON, SSE `data:` lines, HTML)
//! is covered too. After `ws* : ws*` the value is read by a small state
//! machine: a string's content (up to the closing quote, or a raw newline,
//! which valid JSON never has inside a string), a number or `true`/`false`
//! literal, or a whole object or array. `null` and anything that is not a
//! value are left alone. The key search resumes after the value.
//!
//! A value may be arbitrarily long: it is reported in pieces as it arrives,
//! each overlapping the previous by one byte so that they merge into a single
//! replacement, and the window never has to hold a whole value.

use super::{
    pattern::{BoundedRegex, RegexStream, LOOK},
    window::{LabelId, Range, Window},
};

/// Longest field name accepted.
pub const MAX_FIELD_LEN: usize = 256;

/// The configured field names, compiled.
#[derive(Debug)]
pub(crate) struct JsonFields {
    keys: BoundedRegex,
    fields: Vec<Field>,
}

#[derive(Debug)]
pub(crate) struct Field {
    pub name: Box<[u8]>,
    /// Replaces a string's content (inside the quotes).
    pub string_label: LabelId,
    /// Replaces a number, literal, object or array (a quoted token).
    pub value_label: LabelId,
}

impl JsonFields {
    /// Compiles the key search for `fields` (already validated).
    pub fn new(fields: Vec<Field>) -> Result<Self, String> {
        // The names alone, not the quotes: a search led by `"` would stop at
        // every string in a JSON body. Longest first, so that of two names
        // where one is a prefix of the other the longer is tried first at a
        // position; the quotes are checked afterwards.
        let mut names: Vec<&[u8]> = fields.iter().map(|f| &*f.name).collect();
        names.sort_by_key(|n| std::cmp::Reverse(n.len()));
        let alternatives: Vec<String> = names.iter().map(|n| regex::escape(&String::from_utf8_lossy(n))).collect();
        let keys = BoundedRegex::new(&format!("(?:{})", alternatives.join("|")))?;
        Ok(Self { keys, fields })
    }

    /// Number of field names.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Longest key with its quotes, for the hold-back.
    pub fn max_key_len(&self) -> usize {
        self.keys.max_len + 2
    }

    fn field_of(&self, name: &[u8]) -> Option<usize> {
        self.fields.iter().position(|f| &*f.name == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    String { escaped: bool },
    Literal,
    Composite { depth: u32, in_string: bool, escaped: bool },
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Looking for a key.
    Seek,
    /// After a key, before `:`.
    Key { field: usize },
    /// After `:`, before the value.
    Colon { field: usize },
    /// Inside a value that started at `start`; pieces up to `reported` are out.
    Value { field: usize, kind: Kind, start: u64, reported: u64 },
}

/// How a value read ends.
enum Outcome {
    /// The value (if any) ended; the key search resumes here.
    Resume(u64),
    /// Need more data.
    More,
}

/// Where the field matcher stands in a stream.
#[derive(Debug)]
pub(crate) struct JsonStream {
    keys: RegexStream,
    state: State,
    /// Next byte the value state machine reads.
    pos: u64,
}

impl Default for JsonStream {
    fn default() -> Self {
        Self { keys: RegexStream::default(), state: State::Seek, pos: 0 }
    }
}

impl JsonStream {
    /// Reads what `win` holds, reporting ranges through `add`; returns the
    /// safe point (no later range starts before it).
    pub fn run(&mut self, spec: &JsonFields, win: &mut Window, at_end: bool) -> u64 {
        loop {
            if let State::Seek = self.state {
                let Some((start, end)) = self.keys.next_match(&spec.keys, win, at_end) else {
                    return self.keys.safe();
                };
                // A name can hold no quote, so a name match that is not a
                // key hides no key; the search goes on after it. The byte
                // after the match is there (the search's look-ahead), the one
                // before it too (its look-behind).
                let quoted = start > 0
                    && win.slice_from(start - 1).first() == Some(&b'"')
                    && win.slice_from(end).first() == Some(&b'"');
                let name = &win.slice_from(start)[..(end - start) as usize];
                match spec.field_of(name) {
                    Some(field) if quoted => {
                        self.state = State::Key { field };
                        self.pos = end + 1;
                    }
                    _ => continue,
                }
            }
            match self.read_value(spec, win) {
                Outcome::Resume(at) => {
                    self.state = State::Seek;
                    self.keys.resume_at(at);
                }
                Outcome::More if at_end => {
                    if let State::Value { .. } = self.state {
                        self.report(spec, win, win.end());
                    }
                    self.state = State::Seek;
                    self.keys.resume_at(win.end());
                }
                Outcome::More => {
                    return match self.state {
                        State::Value { start, reported, .. } if reported > start => reported - 1,
                        State::Value { start, .. } => start,
                        _ => self.pos,
                    };
                }
            }
        }
    }

    /// Oldest byte still needed.
    pub fn needed_from(&self) -> u64 {
        match self.state {
            State::Seek => self.keys.needed_from(),
            _ => self.pos.saturating_sub(LOOK as u64),
        }
    }

    fn read_value(&mut self, spec: &JsonFields, win: &mut Window) -> Outcome {
        let data_start = self.pos.max(win.base());
        let len = win.slice_from(data_start).len();
        let mut i = 0;
        while i < len {
            let b = win.slice_from(data_start)[i];
            let at = data_start + i as u64;
            i += 1;
            self.state = match self.state {
                State::Seek => return Outcome::Resume(at),
                State::Key { field } => match b {
                    b' ' | b'\t' | b'\r' | b'\n' => State::Key { field },
                    b':' => State::Colon { field },
                    _ => return Outcome::Resume(at),
                },
                State::Colon { field } => {
                    let kind = match b {
                        b' ' | b'\t' | b'\r' | b'\n' => {
                            continue;
                        }
                        b'"' => Kind::String { escaped: false },
                        b'{' | b'[' => Kind::Composite { depth: 1, in_string: false, escaped: false },
                        b'-' | b'0'..=b'9' | b't' | b'f' => Kind::Literal,
                        _ => return Outcome::Resume(at),
                    };
                    // A string's replacement goes inside its quotes.
                    let start = if matches!(kind, Kind::String { .. }) { at + 1 } else { at };
                    State::Value { field, kind, start, reported: start }
                }
                State::Value { field, kind, start, reported } => {
                    let (kind, end) = step(kind, b, at);
                    if let Some((end, resume)) = end {
                        self.report(spec, win, end);
                        self.pos = resume;
                        return Outcome::Resume(resume);
                    }
                    State::Value { field, kind, start, reported }
                }
            };
        }
        self.pos = data_start + len as u64;
        if let State::Value { .. } = self.state {
            self.report(spec, win, self.pos);
        }
        Outcome::More
    }

    /// Reports the current value up to `upto` as a piece overlapping the
    /// previous one, so that all pieces merge into one replacement.
    fn report(&mut self, spec: &JsonFields, win: &mut Window, upto: u64) {
        let State::Value { field, kind, start, reported } = &mut self.state else {
            return;
        };
        if upto <= *reported {
            return;
        }
        let Some(f) = spec.fields.get(*field) else {
            return;
        };
        let label = match kind {
            Kind::String { .. } => f.string_label,
            _ => f.value_label,
        };
        let from = if *reported > *start { *reported - 1 } else { *start };
        win.add(Range { start: from, end: upto, label });
        *reported = upto;
    }
}

/// One byte of a value: the new kind, and `(value end, resume offset)` when
/// the value ends.
fn step(kind: Kind, b: u8, at: u64) -> (Kind, Option<(u64, u64)>) {
    match kind {
        Kind::String { escaped: true } => (Kind::String { escaped: false }, None),
        Kind::String { escaped: false } => match b {
            b'\\' => (Kind::String { escaped: true }, None),
            b'"' => (kind, Some((at, at + 1))),
            b'\n' => (kind, Some((at, at))),
            _ => (kind, None),
        },
        Kind::Literal => match b {
            b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'.' | b'+' | b'-' => (kind, None),
            _ => (kind, Some((at, at))),
        },
        Kind::Composite { depth, in_string, escaped } => {
            let next = |depth, in_string, escaped| Kind::Composite { depth, in_string, escaped };
            if in_string {
                return match (escaped, b) {
                    (true, _) => (next(depth, true, false), None),
                    (false, b'\\') => (next(depth, true, true), None),
                    (false, b'"') => (next(depth, false, false), None),
                    _ => (kind, None),
                };
            }
            match b {
                b'"' => (next(depth, true, false), None),
                b'{' | b'[' => (next(depth.saturating_add(1), false, false), None),
                b'}' | b']' if depth <= 1 => (kind, Some((at + 1, at + 1))),
                b'}' | b']' => (next(depth - 1, false, false), None),
                _ => (kind, None),
            }
        }
    }
}
