//! Just enough of Go to read other scanners' test samples out of their
//! source: string literals (interpreted and raw), `+`, `fmt.Sprintf` with
//! `%s`/`%v`/`%d`, named string constants, `[]string{…}` and `append(…)`,
//! and gitleaks' sample generators (`secrets.NewSecret(regex)` and the
//! `utils` pattern helpers), evaluated with a seeded generator. Anything
//! else makes the expression unknown (`None`), and the caller counts it as
//! not extracted rather than guessing.

use std::collections::HashMap;

use regex_syntax::hir::{Class, Hir, HirKind};

/// A Go token, as far as the sample extraction needs one.
#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    /// A string literal, unescaped.
    Str(String),
    /// An identifier, number or keyword.
    Ident(String),
    /// Any other single character (`.`, `,`, `(`, `{`, `+`, `=`, `:` …).
    Punct(char),
    /// `...`
    Ellipsis,
}

/// A token with the 1-based line it starts on.
#[derive(Debug, Clone)]
pub struct Token {
    /// The token.
    pub tok: Tok,
    /// Its line in the source file.
    pub line: usize,
}

/// Splits Go source into tokens, dropping comments and whitespace.
pub fn tokenize(src: &str) -> Vec<Token> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < b.len() {
        let c = b[i];
        match c {
            b'\n' => {
                line += 1;
                i += 1;
            }
            b' ' | b'\t' | b'\r' => i += 1,
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    line += usize::from(b[i] == b'\n');
                    i += 1;
                }
                i += 2;
            }
            b'`' => {
                let start = i + 1;
                let end = src[start..].find('`').map_or(b.len(), |e| start + e);
                let text = &src[start..end];
                out.push(Token { tok: Tok::Str(text.replace('\r', "")), line });
                line += text.matches('\n').count();
                i = end + 1;
            }
            b'"' | b'\'' => {
                let (s, next) = interpreted(src, i + 1, c);
                out.push(Token { tok: if c == b'"' { Tok::Str(s) } else { Tok::Ident(s) }, line });
                i = next;
            }
            b'.' if b.get(i + 1) == Some(&b'.') && b.get(i + 2) == Some(&b'.') => {
                out.push(Token { tok: Tok::Ellipsis, line });
                i += 3;
            }
            c if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80) {
                    i += 1;
                }
                out.push(Token { tok: Tok::Ident(src[start..i].to_string()), line });
            }
            _ => {
                out.push(Token { tok: Tok::Punct(c as char), line });
                i += 1;
            }
        }
    }
    out
}

/// Unescapes an interpreted Go literal starting after its quote; returns the
/// text and the index after the closing quote.
fn interpreted(src: &str, mut i: usize, quote: u8) -> (String, usize) {
    let b = src.as_bytes();
    let mut out: Vec<u8> = Vec::new();
    while i < b.len() && b[i] != quote && b[i] != b'\n' {
        if b[i] == b'\\' && i + 1 < b.len() {
            let e = b[i + 1];
            i += 2;
            match e {
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'r' => out.push(b'\r'),
                b'0'..=b'7' if i + 1 < b.len() => {
                    let oct = &src[i - 1..i + 2];
                    out.push(u8::from_str_radix(oct, 8).unwrap_or(b'?'));
                    i += 2;
                }
                b'x' | b'u' | b'U' => {
                    let n = match e {
                        b'x' => 2,
                        b'u' => 4,
                        _ => 8,
                    };
                    let hex = src.get(i..i + n).unwrap_or("");
                    let v = u32::from_str_radix(hex, 16).unwrap_or(u32::from(b'?'));
                    if e == b'x' {
                        out.push(v as u8);
                    } else {
                        let ch = char::from_u32(v).unwrap_or('?');
                        out.extend_from_slice(ch.to_string().as_bytes());
                    }
                    i += n;
                }
                other => out.push(other),
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), i + 1)
}

/// A deterministic generator for `secrets.NewSecret`, so corpus runs compare.
pub struct Rng(u64);

impl Rng {
    /// A generator with this seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// A random string matching `pattern` (Go/RE2 syntax, which `regex-syntax`
/// reads for the patterns scanners use in tests); `None` if it does not parse.
pub fn sample_regex(pattern: &str, rng: &mut Rng) -> Option<String> {
    let hir = regex_syntax::ParserBuilder::new().build().parse(pattern).ok()?;
    let mut out = String::new();
    gen(&hir, rng, &mut out);
    Some(out)
}

fn gen(hir: &Hir, rng: &mut Rng, out: &mut String) {
    match hir.kind() {
        HirKind::Empty | HirKind::Look(_) => {}
        HirKind::Literal(lit) => out.push_str(&String::from_utf8_lossy(&lit.0)),
        HirKind::Class(Class::Unicode(cls)) => {
            // Stay in ASCII where the class allows: `\w` and `.` would
            // otherwise produce arbitrary code points.
            let ascii: Vec<(u32, u32)> = cls
                .ranges()
                .iter()
                .filter(|r| (r.start() as u32) < 0x7f)
                .map(|r| ((r.start() as u32).max(0x21), (r.end() as u32).min(0x7e)))
                .filter(|(s, e)| s <= e)
                .collect();
            let ranges: Vec<(u32, u32)> = if ascii.is_empty() {
                cls.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect()
            } else {
                ascii
            };
            out.push(pick(&ranges, rng));
        }
        HirKind::Class(Class::Bytes(cls)) => {
            let ranges: Vec<(u32, u32)> =
                cls.ranges().iter().map(|r| (u32::from(r.start()), u32::from(r.end()))).collect();
            out.push(pick(&ranges, rng));
        }
        HirKind::Repetition(rep) => {
            let max = rep.max.unwrap_or(rep.min + 8).min(rep.min + 8);
            let n = rep.min + rng.below(u64::from(max - rep.min + 1)) as u32;
            for _ in 0..n {
                gen(&rep.sub, rng, out);
            }
        }
        HirKind::Capture(cap) => gen(&cap.sub, rng, out),
        HirKind::Concat(items) => items.iter().for_each(|h| gen(h, rng, out)),
        HirKind::Alternation(items) => {
            let i = rng.below(items.len() as u64) as usize;
            gen(&items[i], rng, out);
        }
    }
}

fn pick(ranges: &[(u32, u32)], rng: &mut Rng) -> char {
    let total: u64 = ranges.iter().map(|(s, e)| u64::from(e - s + 1)).sum();
    let mut k = rng.below(total);
    for (s, e) in ranges {
        let width = u64::from(e - s + 1);
        if k < width {
            return char::from_u32(s + k as u32).unwrap_or('x');
        }
        k -= width;
    }
    'x'
}

/// The forms gitleaks' `utils.GenerateSampleSecrets` wraps a secret in (a
/// representative subset of its table: INI, JSON, YAML, Go, shell).
const SAMPLE_FORMS: &[&str] = &[
    "{i}Token=\"{s}\"",
    "{\n    \"{i}_token\": \"{s}\"\n}",
    "{i}_token: '{s}'",
    "{i}Token := \"{s}\"",
    "export {I}_TOKEN={s}",
];

/// A value: one string or a list of them.
#[derive(Debug, Clone)]
pub enum Value {
    /// A string.
    Str(String),
    /// A `[]string`.
    List(Vec<String>),
}

/// Evaluates expressions over a token slice, with named string constants.
pub struct Eval<'a> {
    /// The tokens.
    pub toks: &'a [Token],
    /// Known string constants and variables.
    pub env: HashMap<String, Value>,
    /// Generator for `secrets.NewSecret`.
    pub rng: Rng,
}

impl<'a> Eval<'a> {
    /// An evaluator over `toks`.
    pub fn new(toks: &'a [Token], seed: u64) -> Self {
        Eval { toks, env: HashMap::new(), rng: Rng::new(seed) }
    }

    fn tok(&self, i: usize) -> Option<&Tok> {
        self.toks.get(i).map(|t| &t.tok)
    }

    fn is_punct(&self, i: usize, c: char) -> bool {
        self.tok(i) == Some(&Tok::Punct(c))
    }

    /// Index just past the expression starting at `i` (at depth 0, up to a
    /// `,`, `;`, or a closing bracket that it did not open, or a new line at depth 0).
    pub fn skip_expr(&self, mut i: usize) -> usize {
        let mut depth = 0i32;
        let start_line = self.toks.get(i).map_or(0, |t| t.line);
        let mut last_line = start_line;
        while let Some(t) = self.toks.get(i) {
            match &t.tok {
                Tok::Punct('(' | '[' | '{') => depth += 1,
                Tok::Punct(')' | ']' | '}') => {
                    if depth == 0 {
                        return i;
                    }
                    depth -= 1;
                }
                Tok::Punct(',' | ';') if depth == 0 => return i,
                _ if depth == 0 && t.line > last_line && !self.continues(i) => return i,
                _ => {}
            }
            last_line = self.toks.get(i).map_or(last_line, |t| t.line);
            i += 1;
        }
        i
    }

    /// Whether the token at `i` continues the expression on the previous line
    /// (Go inserts a semicolon after a line ending in an operand otherwise).
    fn continues(&self, i: usize) -> bool {
        i > 0 && matches!(self.tok(i - 1), Some(Tok::Punct('+' | '(' | ',' | '{' | '.' | '=')))
    }

    /// Evaluates the expression at `i`; returns its value (if understood) and the index after it.
    pub fn expr(&mut self, i: usize) -> (Option<Value>, usize) {
        let end = self.skip_expr(i);
        (self.eval_range(i, end), end)
    }

    fn eval_range(&mut self, i: usize, end: usize) -> Option<Value> {
        // Split on top-level `+`.
        let mut parts = Vec::new();
        let (mut depth, mut start) = (0i32, i);
        for j in i..end {
            match self.tok(j) {
                Some(Tok::Punct('(' | '[' | '{')) => depth += 1,
                Some(Tok::Punct(')' | ']' | '}')) => depth -= 1,
                Some(Tok::Punct('+')) if depth == 0 => {
                    parts.push((start, j));
                    start = j + 1;
                }
                _ => {}
            }
        }
        parts.push((start, end));
        if parts.len() > 1 {
            let mut s = String::new();
            for (a, b) in parts {
                match self.term(a, b)? {
                    Value::Str(t) => s.push_str(&t),
                    Value::List(_) => return None,
                }
            }
            return Some(Value::Str(s));
        }
        self.term(i, end)
    }

    fn term(&mut self, i: usize, end: usize) -> Option<Value> {
        if i >= end {
            return None;
        }
        match self.tok(i)?.clone() {
            Tok::Str(s) if end == i + 1 => Some(Value::Str(s)),
            Tok::Punct('(') if self.is_punct(end - 1, ')') => self.eval_range(i + 1, end - 1),
            Tok::Punct('[') if self.is_punct(i + 1, ']') && self.tok(i + 2) == Some(&Tok::Ident("string".into())) => {
                // []string{ a, b, … }
                if !self.is_punct(i + 3, '{') {
                    return None;
                }
                let items = self.args(i + 4, '}')?;
                Some(Value::List(items.into_iter().flat_map(flatten).collect()))
            }
            Tok::Ident(name) => {
                // Dotted name, then maybe a call.
                let mut j = i + 1;
                let mut full = name;
                while self.is_punct(j, '.') {
                    if let Some(Tok::Ident(n)) = self.tok(j + 1) {
                        full = format!("{full}.{n}");
                        j += 2;
                    } else {
                        return None;
                    }
                }
                if j == end {
                    return self.env.get(&full).cloned();
                }
                if !self.is_punct(j, '(') || !self.is_punct(end - 1, ')') {
                    return None;
                }
                let args = self.args(j + 1, ')')?;
                self.call(&full, args)
            }
            _ => None,
        }
    }

    /// Arguments up to the closing `close`; an argument followed by `...` is spread.
    fn args(&mut self, mut i: usize, close: char) -> Option<Vec<Value>> {
        let mut out = Vec::new();
        loop {
            if self.is_punct(i, close) {
                return Some(out);
            }
            let end = self.skip_expr(i);
            let spread = end > i && self.tok(end - 1) == Some(&Tok::Ellipsis);
            let v = self.eval_range(i, if spread { end - 1 } else { end })?;
            out.push(v);
            i = end;
            if self.is_punct(i, ',') {
                i += 1;
            } else if !self.is_punct(i, close) {
                return None;
            }
        }
    }

    fn call(&mut self, name: &str, args: Vec<Value>) -> Option<Value> {
        let s = |k: usize| match args.get(k) {
            Some(Value::Str(s)) => Some(s.clone()),
            _ => None,
        };
        let class = |c: &str| Some(Value::Str(format!("{c}{{{}}}", s(0)?)));
        match name {
            "secrets.NewSecret" => Some(Value::Str(sample_regex(&s(0)?, &mut self.rng)?)),
            "utils.Numeric" => class("[0-9]"),
            "utils.Hex" => class("[a-f0-9]"),
            "utils.AlphaNumeric" => class("[a-z0-9]"),
            "utils.AlphaNumericExtendedShort" => class("[a-z0-9_-]"),
            "utils.AlphaNumericExtended" => class(r"[a-z0-9=_\-]"),
            "utils.AlphaNumericExtendedLong" => class(r"[a-z0-9\/=_\+\-]"),
            "utils.Hex8_4_4_4_12" => {
                Some(Value::Str("[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}".into()))
            }
            "utils.GenerateSampleSecret" => Some(Value::Str(format!("{}_api_token = \"{}\"", s(0)?, s(1)?))),
            "utils.GenerateSampleSecrets" => {
                let (id, secret) = (s(0)?, s(1)?);
                Some(Value::List(
                    SAMPLE_FORMS
                        .iter()
                        .map(|f| f.replace("{i}", &id).replace("{I}", &id.to_uppercase()).replace("{s}", &secret))
                        .collect(),
                ))
            }
            "fmt.Sprintf" => {
                let fmt = s(0)?;
                let mut rest = args.iter().skip(1);
                let mut out = String::new();
                let mut chars = fmt.chars().peekable();
                while let Some(c) = chars.next() {
                    if c != '%' {
                        out.push(c);
                        continue;
                    }
                    match chars.next()? {
                        '%' => out.push('%'),
                        's' | 'v' | 'd' | 'q' => match rest.next()? {
                            Value::Str(v) => out.push_str(v),
                            Value::List(_) => return None,
                        },
                        _ => return None,
                    }
                }
                Some(Value::Str(out))
            }
            "strings.Repeat" => {
                let n: usize = match args.get(1) {
                    Some(Value::Str(n)) => n.parse().ok()?,
                    _ => return None,
                };
                Some(Value::Str(s(0)?.repeat(n.min(4096))))
            }
            "append" => {
                let mut items = Vec::new();
                for a in args {
                    items.extend(flatten(a));
                }
                Some(Value::List(items))
            }
            _ => None,
        }
    }
}

fn flatten(v: Value) -> Vec<String> {
    match v {
        Value::Str(s) => vec![s],
        Value::List(l) => l,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(src: &str) -> Option<Value> {
        let toks = tokenize(src);
        let mut ev = Eval::new(&toks, 1);
        ev.env.insert("k".into(), Value::Str("KEY".into()));
        ev.expr(0).0
    }

    #[test]
    fn evaluates_the_forms_scanners_use() {
        let Some(Value::Str(s)) = eval(r#"fmt.Sprintf("%s = '%s'", k, "a\tb" + `c`)"#) else { panic!("not evaluated") };
        assert_eq!(s, "KEY = 'a\tbc'");
        let Some(Value::Str(s)) = eval(r#""p_" + secrets.NewSecret(utils.Hex("8"))"#) else { panic!("not evaluated") };
        assert!(s.len() == 10 && s[2..].bytes().all(|b| b.is_ascii_hexdigit()), "{s}");
        let Some(Value::List(l)) = eval(r#"[]string{"a", k, utils.GenerateSampleSecret("x", "y"),}"#) else {
            panic!("not evaluated")
        };
        assert_eq!(l, ["a", "KEY", "x_api_token = \"y\""]);
        assert!(eval("unknown(1)").is_none());
    }
}
