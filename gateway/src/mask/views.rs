//! Encoded forms of secrets, for what the gateway stores or logs: a key
//! written as `\u0073k-…` (JSON), `sk%2D…` (URL), `sk-…` cut by a
//! quoted-printable soft line break, or base64 of a header value is not a
//! key to the detector on the raw bytes, yet it is one in the record.
//!
//! Each *view* decodes one encoding and keeps a map back to the source
//! bytes; the detector scans the view, and every detection becomes a source
//! range to mask:
//!
//! * bytewise views (percent-encoding, percent-encoding with `+` as space,
//!   backslash escapes including `\uXXXX` surrogate pairs, quoted-printable):
//!   every decoded byte comes from a known run of source bytes, so the range
//!   is exact and always covers whole escape sequences (never half of one,
//!   which keeps JSON and URLs well-formed around the replacement);
//! * base64 runs (standard and URL-safe alphabets, padded or not, wrapped at
//!   line ends as MIME does): a detection anywhere in a run's decoded bytes
//!   masks the whole run, since a secret's bits do not map onto whole base64
//!   characters.
//!
//! Views nest ([`MAX_DEPTH`] deep): `%2B` inside base64, base64 of escaped
//! JSON, double percent-encoding. Cost stays proportional to what is
//! actually encoded: a bytewise view decodes only the neighbourhood
//! ([`CONTEXT`] bytes) of its escapes, base64 is tried on runs of at least
//! [`MIN_RUN`] characters only, and text without escapes or long runs
//! costs one pass of `memchr`-class searches. A hostile text built to make
//! views multiply stops at [`Budget`]; the caller then withholds the text
//! rather than keep it unmasked.

use std::ops::Range;

use base64::{
    alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
    Engine as _,
};

use crate::detect::{Detection, Detector};

/// Views of views, at most this deep (a view of the text is depth 1).
const MAX_DEPTH: u8 = 3;
/// Raw bytes decoded on each side of an escape: room for the longest
/// ordinary key and the assignment before it (`"password": "…`).
const CONTEXT: usize = 1024;
/// Shortest base64 run decoded (12 bytes). A floor for cost, not derived
/// from the detector: shorter runs are mostly words and identifiers. The
/// detector's [`Detector::min_match_len`] applies on top of it (a run whose
/// decoded bytes are fewer is not decoded either), which only matters for
/// rule sets whose shortest match exceeds 12 bytes; the built-in rules'
/// shortest matches are shorter than that (`-u a:bcd`, URL credentials),
/// so deriving the floor from the bound would decode more runs, not fewer.
const MIN_RUN: usize = 16;
/// Shortest hex run decoded (16 bytes): a floor for cost, as [`MIN_RUN`].
const MIN_HEX_RUN: usize = 32;
/// Distinct `UESCAPE` characters of one text given a view each, at most.
const MAX_UESCAPES: usize = 4;
/// Decoded view bytes allowed per source byte, beyond [`BUDGET_SLACK`].
const BUDGET_FACTOR: usize = 16;
/// View bytes always allowed.
const BUDGET_SLACK: usize = 64 << 10;

/// A secret found in a decoded view: where it sits in the source text.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    /// Source bytes to mask (whole escape sequences, whole base64 runs).
    pub range: Range<usize>,
    /// The detection in its decoded view: the rule, and the secret as
    /// decoded (what a finding fingerprints); its offsets are the view's.
    pub detection: Detection,
}

/// The views' output was cut short: the text holds more encodings than the
/// budget allows decoding, so what it hides is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OverBudget;

/// Decoded bytes the views of one text may produce in all.
#[derive(Debug)]
struct Budget(usize);

impl Budget {
    fn for_text(len: usize) -> Budget {
        Budget(len.saturating_mul(BUDGET_FACTOR).saturating_add(BUDGET_SLACK))
    }

    fn spend(&mut self, n: usize) -> Result<(), OverBudget> {
        self.0 = self.0.checked_sub(n).ok_or(OverBudget)?;
        Ok(())
    }
}

/// Every secret in `text`: the detector's detections in the raw bytes and
/// in every decoded view, as source ranges. One key seen both raw and
/// through a view (a view decodes the neighbourhood of an escape, which may
/// hold a raw key too) is reported once, where the raw pass found it.
pub(crate) fn find_all(detector: &Detector, text: &[u8]) -> Result<Vec<Found>, OverBudget> {
    let mut out: Vec<Found> = detector
        .scan(text)
        .into_iter()
        .map(|d| Found { range: d.start as usize..d.end as usize, detection: d })
        .collect();
    for f in find(detector, text)? {
        let known =
            out.iter().any(|o| o.detection.rule_id == f.detection.rule_id && o.detection.secret == f.detection.secret);
        if !known {
            out.push(f);
        }
    }
    Ok(out)
}

/// Every secret the detector finds in a decoded view of `text` (not in
/// `text` itself: the raw pass is the caller's), as source ranges.
pub(crate) fn find(detector: &Detector, text: &[u8]) -> Result<Vec<Found>, OverBudget> {
    let mut out = Vec::new();
    let mut budget = Budget::for_text(text.len());
    find_in(detector, text, 1, &mut budget, &mut out)?;
    Ok(out)
}

fn find_in(
    detector: &Detector,
    text: &[u8],
    depth: u8,
    budget: &mut Budget,
    out: &mut Vec<Found>,
) -> Result<(), OverBudget> {
    // No view decodes to more bytes than its source (every escape and run
    // is at least as long as what it stands for), so a text shorter than
    // the shortest match has no view, at any depth, that holds one.
    let min_match = detector.min_match_len();
    if text.len() < min_match {
        return Ok(());
    }
    let fixed =
        [Escapes::Percent, Escapes::Form, Escapes::Backslash, Escapes::QuotedPrintable, Escapes::Unicode(b'\\')];
    for escapes in fixed.into_iter().chain(uescapes(text).map(Escapes::Unicode)) {
        let Some(view) = ByteView::build(escapes, text, budget)? else { continue };
        let mut found = Vec::new();
        scan(detector, &view.bytes, depth, budget, &mut found)?;
        out.extend(found.into_iter().map(|f| Found { range: view.source(f.range), detection: f.detection }));
    }
    let runs = [RunView::base64(text, min_match, budget)?, RunView::hex(text, min_match, budget)?];
    for view in runs.into_iter().flatten() {
        for d in detector.scan(&view.bytes) {
            out.push(Found { range: view.source(d.start as usize..d.end as usize), detection: d });
        }
        if depth < MAX_DEPTH {
            // Only decoded text can hold further encodings worth decoding;
            // binary segments (hashes, compressed data) are scanned above.
            for seg in view.segments.iter().filter(|s| is_text(&view.bytes[s.view.clone()])) {
                let mut inner = Vec::new();
                find_in(detector, &view.bytes[seg.view.clone()], depth + 1, budget, &mut inner)?;
                out.extend(inner.into_iter().map(|f| Found { range: seg.src.clone(), detection: f.detection }));
            }
        }
    }
    Ok(())
}

/// The detector's findings in `bytes` (a view), and in its own views while
/// `depth` allows, in `bytes` coordinates.
fn scan(
    detector: &Detector,
    bytes: &[u8],
    depth: u8,
    budget: &mut Budget,
    out: &mut Vec<Found>,
) -> Result<(), OverBudget> {
    if bytes.len() < detector.min_match_len() {
        // Nor can its own views (see `find_in`).
        return Ok(());
    }
    for d in detector.scan(bytes) {
        out.push(Found { range: d.start as usize..d.end as usize, detection: d });
    }
    if depth < MAX_DEPTH {
        find_in(detector, bytes, depth + 1, budget, out)?;
    }
    Ok(())
}

/// Valid UTF-8 without control characters other than whitespace.
fn is_text(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|s| s.chars().all(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r')))
}

/// Escape syntaxes decoded byte by byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escapes {
    /// `%XX` (URLs, cookies).
    Percent,
    /// `%XX` and `+` for a space (query strings, form bodies).
    Form,
    /// `\n`, `\"`, `\uXXXX` (surrogate pairs too), `\u{X…}`, `\xXX`, and
    /// `\c` for any other `c` (JSON, JavaScript, Python, Rust `Debug`).
    Backslash,
    /// `=XX` and soft line breaks (`=` at a line end), as in MIME parts.
    QuotedPrintable,
    /// `<c>XXXX` and `<c>+XXXXXX` code points, `<c><c>` for `c` itself:
    /// SQL's Unicode escape strings (`U&'\0067'`, and with `UESCAPE '!'`
    /// `U&'!0067'`), CSS-like `\0067`.
    Unicode(u8),
}

/// The characters a text names with `UESCAPE '<c>'` (SQL, any case), each
/// once, at most [`MAX_UESCAPES`].
fn uescapes(text: &[u8]) -> impl Iterator<Item = u8> {
    let mut found: Vec<u8> = Vec::new();
    for at in memchr::memchr2_iter(b'u', b'U', text) {
        if found.len() >= MAX_UESCAPES {
            break;
        }
        let Some(word) = text.get(at..at + 7) else { break };
        if !word.eq_ignore_ascii_case(b"uescape") {
            continue;
        }
        let rest = &text[at + 7..];
        let skip = rest.iter().take_while(|b| b.is_ascii_whitespace()).count();
        if let Some(&[b'\'', c, b'\'']) = rest.get(skip..skip + 3) {
            if c != b'\\' && !found.contains(&c) {
                found.push(c);
            }
        }
    }
    found.into_iter()
}

impl Escapes {
    /// Where an escape may start at or after `from`.
    fn next_trigger(self, text: &[u8], from: usize) -> Option<usize> {
        let rest = text.get(from..)?;
        let at = match self {
            Escapes::Percent => memchr::memchr(b'%', rest),
            Escapes::Form => memchr::memchr2(b'%', b'+', rest),
            Escapes::Backslash => memchr::memchr(b'\\', rest),
            Escapes::QuotedPrintable => memchr::memchr(b'=', rest),
            Escapes::Unicode(c) => memchr::memchr(c, rest),
        };
        at.map(|i| from + i)
    }

    /// Whether an escape at `at` makes this view worth building. Views that
    /// would equal another one are not: `Form` differs from `Percent` only
    /// by its `+`, and quoted-printable is recognized by its soft line
    /// breaks (`=XX` alone is everywhere in query strings).
    fn marks_view(self, text: &[u8], at: usize) -> bool {
        match self {
            Escapes::Form => text[at] == b'+',
            Escapes::QuotedPrintable => soft_break_len(&text[at..]).is_some(),
            Escapes::Percent | Escapes::Backslash => self.decode(text, at, &mut Vec::new()).is_some(),
            // A code point, not a doubled escape character.
            Escapes::Unicode(c) => text.get(at + 1) != Some(&c) && self.decode(text, at, &mut Vec::new()).is_some(),
        }
    }

    /// Decodes the escape starting at `text[at]` onto `out`; returns the
    /// source bytes it took, or `None` (and writes nothing) when none
    /// starts there.
    fn decode(self, text: &[u8], at: usize, out: &mut Vec<u8>) -> Option<usize> {
        let rest = &text[at..];
        match (self, rest.first()?) {
            (Escapes::Percent | Escapes::Form, b'%') => {
                let byte = hex_byte(rest.get(1..3)?)?;
                out.push(byte);
                Some(3)
            }
            (Escapes::Form, b'+') => {
                out.push(b' ');
                Some(1)
            }
            (Escapes::Backslash, b'\\') => backslash(rest, out),
            (Escapes::Unicode(c), &first) if first == c => {
                if rest.get(1) == Some(&c) {
                    out.push(c);
                    return Some(2);
                }
                let (digits, skip) =
                    if rest.get(1) == Some(&b'+') { (rest.get(2..8)?, 8) } else { (rest.get(1..5)?, 5) };
                let value = digits.iter().try_fold(0u32, |acc, &b| Some(acc << 4 | u32::from(hex_digit(b)?)))?;
                push_char(char::from_u32(value)?, out);
                Some(skip)
            }
            (Escapes::QuotedPrintable, b'=') => {
                if let Some(n) = soft_break_len(rest) {
                    return Some(n);
                }
                let byte = hex_byte(rest.get(1..3)?)?;
                out.push(byte);
                Some(3)
            }
            _ => None,
        }
    }
}

/// `=\r\n` or `=\n` at the start of `rest`: its length.
fn soft_break_len(rest: &[u8]) -> Option<usize> {
    match rest {
        [b'=', b'\r', b'\n', ..] => Some(3),
        [b'=', b'\n', ..] => Some(2),
        _ => None,
    }
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    match pair {
        [h, l] => Some(hex_digit(*h)? << 4 | hex_digit(*l)?),
        _ => None,
    }
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Four hex digits at the start of `s`.
fn hex_u16(s: &[u8]) -> Option<u16> {
    let d = s.get(..4)?;
    d.iter().try_fold(0u16, |acc, &b| Some(acc << 4 | u16::from(hex_digit(b)?)))
}

/// One backslash escape at the start of `rest` (which starts with `\`).
fn backslash(rest: &[u8], out: &mut Vec<u8>) -> Option<usize> {
    let c = *rest.get(1)?;
    let simple = |b: u8, out: &mut Vec<u8>| {
        out.push(b);
        Some(2)
    };
    match c {
        b'n' => simple(b'\n', out),
        b'r' => simple(b'\r', out),
        b't' => simple(b'\t', out),
        b'b' => simple(0x08, out),
        b'f' => simple(0x0c, out),
        // `\147`: three octal digits (C, Python, PostgreSQL's `E'…'`).
        b'0'..=b'3' if rest.get(2..4).is_some_and(|d| d.iter().all(|b| (b'0'..=b'7').contains(b))) => {
            out.push(((c - b'0') << 6) | ((rest[2] - b'0') << 3) | (rest[3] - b'0'));
            Some(4)
        }
        b'0' => simple(0, out),
        b'x' => {
            out.push(hex_byte(rest.get(2..4)?)?);
            Some(4)
        }
        b'u' if rest.get(2) == Some(&b'{') => {
            // `\u{1F600}` (Rust, ES2015).
            let close = rest.iter().take(11).position(|&b| b == b'}')?;
            let digits = &rest[3..close];
            if digits.is_empty() || digits.len() > 6 {
                return None;
            }
            let value = digits.iter().try_fold(0u32, |acc, &b| Some(acc << 4 | u32::from(hex_digit(b)?)))?;
            push_char(char::from_u32(value).unwrap_or('\u{FFFD}'), out);
            Some(close + 1)
        }
        b'u' => {
            let unit = hex_u16(&rest[2..])?;
            if (0xD800..0xDC00).contains(&unit) {
                // A high surrogate: with its low half, one character.
                if let (Some(b'\\'), Some(b'u')) = (rest.get(6), rest.get(7)) {
                    if let Some(low @ 0xDC00..=0xDFFF) = rest.get(8..).and_then(hex_u16) {
                        let value = 0x10000 + ((u32::from(unit) - 0xD800) << 10) + (u32::from(low) - 0xDC00);
                        push_char(char::from_u32(value).unwrap_or('\u{FFFD}'), out);
                        return Some(12);
                    }
                }
            }
            push_char(char::from_u32(u32::from(unit)).unwrap_or('\u{FFFD}'), out);
            Some(6)
        }
        // `\"`, `\\`, `\/`, and whatever else: the character itself, as the
        // detector's JSON reader and JavaScript take it.
        other => simple(other, out),
    }
}

fn push_char(c: char, out: &mut Vec<u8>) {
    let mut buf = [0u8; 4];
    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
}

/// A bytewise view: the decoded neighbourhoods of a text's escapes.
#[derive(Debug)]
struct ByteView {
    /// Decoded clusters, separated by `\n`.
    bytes: Vec<u8>,
    /// Source offset of each decoded byte (a separator: the end of the
    /// cluster before it), plus the source end of the last cluster.
    starts: Vec<usize>,
}

impl ByteView {
    /// The view of `text`, or `None` when no escape of this kind is in it.
    fn build(escapes: Escapes, text: &[u8], budget: &mut Budget) -> Result<Option<ByteView>, OverBudget> {
        let mut at = 0;
        let mut clusters: Vec<Range<usize>> = Vec::new();
        let mut marked = false;
        while let Some(i) = escapes.next_trigger(text, at) {
            at = i + 1;
            if !marked && escapes.marks_view(text, i) {
                marked = true;
            }
            let from = i.saturating_sub(CONTEXT);
            let to = (i + CONTEXT).min(text.len());
            match clusters.last_mut() {
                Some(last) if from <= last.end => last.end = to,
                _ => clusters.push(from..to),
            }
        }
        if !marked {
            return Ok(None);
        }
        let size: usize = clusters.iter().map(|c| c.len() + 1).sum();
        budget.spend(size)?;
        let mut view = ByteView { bytes: Vec::with_capacity(size), starts: Vec::with_capacity(size + 1) };
        for (n, cluster) in clusters.iter().enumerate() {
            if n > 0 {
                view.bytes.push(b'\n');
                view.starts.push(clusters[n - 1].end);
            }
            let mut i = cluster.start;
            while i < cluster.end {
                let before = view.bytes.len();
                let taken = escapes.decode(text, i, &mut view.bytes).unwrap_or_else(|| {
                    view.bytes.push(text[i]);
                    1
                });
                // An escape may end past the cluster: it still maps whole.
                view.starts.extend(std::iter::repeat_n(i, view.bytes.len() - before));
                i += taken;
            }
        }
        view.starts.push(clusters.last().map_or(0, |c| c.end.max(view.starts.last().copied().unwrap_or(0))));
        Ok(Some(view))
    }

    /// The source bytes that decoded to `view[range]`: from the start of
    /// the escape of its first byte to the end of the escape of its last.
    fn source(&self, range: Range<usize>) -> Range<usize> {
        let n = self.bytes.len();
        if n == 0 {
            return 0..0;
        }
        let start = range.start.min(n - 1);
        let end = range.end.clamp(start + 1, n);
        let last = self.starts[end - 1];
        // The bytes of one escape share its start; the next start is its end
        // (`starts[n]` is the end of the last cluster).
        let mut j = end;
        while j < n && self.starts[j] <= last {
            j += 1;
        }
        self.starts[start]..self.starts[j].max(last + 1)
    }
}

/// Base64 or hex runs of a text, decoded.
#[derive(Debug)]
struct RunView {
    /// Decoded runs (base64: one per tried alignment), separated by `\n`.
    bytes: Vec<u8>,
    /// Where each decoded run is, in order.
    segments: Vec<Segment>,
}

#[derive(Debug, Clone)]
struct Segment {
    view: Range<usize>,
    /// The whole run, padding included.
    src: Range<usize>,
}

/// Standard alphabet (URL-safe characters are mapped onto it), any
/// padding, stray low bits tolerated: what lenient decoders accept.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn is_b64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_')
}

impl RunView {
    /// The view of `text`'s runs of at least [`MIN_RUN`] base64 characters
    /// that decode to at least `min_len` bytes, or `None` when it has none.
    ///
    /// A shorter run cannot hold a match on its own. The view joins runs
    /// with `\n`, so a match could in principle span two of them (a
    /// keyword decoded from one run, the key from the next); those are
    /// separate values in the text, and such a match is an artifact of the
    /// join, not something this skip has to keep.
    fn base64(text: &[u8], min_len: usize, budget: &mut Budget) -> Result<Option<RunView>, OverBudget> {
        let mut view = RunView { bytes: Vec::new(), segments: Vec::new() };
        let mut chars = Vec::new();
        let mut i = 0;
        while i < text.len() {
            if !is_b64(text[i]) {
                i += 1;
                continue;
            }
            let start = i;
            chars.clear();
            // Characters of the run (normalized to the standard alphabet)
            // and the alignments worth trying: the run's own, and the one
            // after each separator-like character, since `/v1/`, `x-` or
            // `a_` before the encoded part belong to the run too.
            let mut alignments = 1u8;
            let mut line = 0;
            loop {
                match text.get(i) {
                    Some(&b) if is_b64(b) => {
                        if matches!(b, b'+' | b'/' | b'-' | b'_') {
                            alignments |= 1 << ((chars.len() + 1) % 4);
                        }
                        chars.push(match b {
                            b'-' => b'+',
                            b'_' => b'/',
                            b => b,
                        });
                        line += 1;
                        i += 1;
                    }
                    // MIME and PEM wrap base64 at a fixed width: a long
                    // line continuing on the next is one run.
                    Some(b'\r' | b'\n') if line >= MIN_RUN => {
                        let next = if text[i] == b'\r' && text.get(i + 1) == Some(&b'\n') { i + 2 } else { i + 1 };
                        if !text.get(next).copied().is_some_and(is_b64) {
                            break;
                        }
                        line = 0;
                        i = next;
                    }
                    _ => break,
                }
            }
            let mut end = i;
            while end < text.len() && end - i < 2 && text[end] == b'=' {
                end += 1;
            }
            i = end;
            if chars.len() < MIN_RUN {
                continue;
            }
            for offset in 0..4usize {
                if alignments & (1 << offset) == 0 || chars.len() - offset < MIN_RUN {
                    continue;
                }
                let mut usable = &chars[offset..];
                if usable.len() % 4 == 1 {
                    // A lone last character carries no whole byte.
                    usable = &usable[..usable.len() - 1];
                }
                // 4 characters are 3 bytes, 3 are 2, 2 are 1.
                if usable.len() * 3 / 4 < min_len {
                    continue;
                }
                budget.spend(usable.len() / 4 * 3 + 3)?;
                if !view.bytes.is_empty() {
                    view.bytes.push(b'\n');
                }
                let from = view.bytes.len();
                if LENIENT.decode_vec(usable, &mut view.bytes).is_err() {
                    // Only the characters checked above reach the decoder.
                    view.bytes.truncate(from);
                    continue;
                }
                view.segments.push(Segment { view: from..view.bytes.len(), src: start..end });
            }
        }
        Ok((!view.segments.is_empty()).then_some(view))
    }

    /// The view of `text`'s runs of at least [`MIN_HEX_RUN`] hex digits
    /// (`decode(…, 'hex')`, `bytea`'s `\x…`, hex dumps) that decode to at
    /// least `min_len` bytes, or `None`. An odd run's last digit is left
    /// out. Shorter runs are skipped as in [`RunView::base64`].
    fn hex(text: &[u8], min_len: usize, budget: &mut Budget) -> Result<Option<RunView>, OverBudget> {
        let mut view = RunView { bytes: Vec::new(), segments: Vec::new() };
        let mut i = 0;
        while i < text.len() {
            if !text[i].is_ascii_hexdigit() {
                i += 1;
                continue;
            }
            let start = i;
            while i < text.len() && text[i].is_ascii_hexdigit() {
                i += 1;
            }
            if i - start < MIN_HEX_RUN || (i - start) / 2 < min_len {
                continue;
            }
            budget.spend((i - start) / 2 + 1)?;
            if !view.bytes.is_empty() {
                view.bytes.push(b'\n');
            }
            let from = view.bytes.len();
            view.bytes.extend(text[start..i].chunks_exact(2).filter_map(hex_byte));
            view.segments.push(Segment { view: from..view.bytes.len(), src: start..i });
        }
        Ok((!view.segments.is_empty()).then_some(view))
    }

    /// The runs whose decoded bytes `view[range]` touches, as one source
    /// range (runs between them included: masking more, never less).
    fn source(&self, range: Range<usize>) -> Range<usize> {
        let first = self.segments.partition_point(|s| s.view.end <= range.start);
        let last = self.segments.partition_point(|s| s.view.start < range.end.max(range.start + 1));
        let first = first.min(self.segments.len().saturating_sub(1));
        let last = last.saturating_sub(1).max(first);
        match (self.segments.get(first), self.segments.get(last)) {
            (Some(a), Some(b)) => a.src.start.min(b.src.start)..a.src.end.max(b.src.end),
            _ => 0..0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(escapes: Escapes, text: &str) -> Option<(String, ByteView)> {
        let v = ByteView::build(escapes, text.as_bytes(), &mut Budget::for_text(text.len())).unwrap()?;
        Some((String::from_utf8_lossy(&v.bytes).into_owned(), v))
    }

    fn src<'a>(text: &'a str, v: &ByteView, decoded: &str, needle: &str) -> &'a str {
        let at = decoded.find(needle).unwrap();
        &text[v.source(at..at + needle.len())]
    }

    #[test]
    fn percent_views_map_whole_escapes() {
        let text = "/a/sk%2Dproj%2dx?q=a+b%20c";
        let (decoded, v) = view(Escapes::Percent, text).unwrap();
        assert_eq!(decoded, "/a/sk-proj-x?q=a+b c");
        assert_eq!(src(text, &v, &decoded, "k-p"), "k%2Dp");
        assert_eq!(src(text, &v, &decoded, "-"), "%2D");
        let (decoded, v) = view(Escapes::Form, text).unwrap();
        assert_eq!(decoded, "/a/sk-proj-x?q=a b c");
        assert_eq!(src(text, &v, &decoded, "a b"), "a+b");
        // Nothing to decode, or a `+`-less text the percent view covers.
        assert!(view(Escapes::Percent, "100% sure").is_none());
        assert!(view(Escapes::Form, "a%20b").is_none());
    }

    #[test]
    fn backslash_views_decode_json_and_friends() {
        let text = r#"{"k":"\u0073k\u002dx \ud83d\ude00 \n\"\/ \x41 \u{1F600} \q"}"#;
        let (decoded, v) = view(Escapes::Backslash, text).unwrap();
        assert_eq!(decoded, "{\"k\":\"sk-x 😀 \n\"/ A 😀 q\"}");
        assert_eq!(src(text, &v, &decoded, "sk-x"), r"\u0073k\u002dx");
        assert_eq!(src(text, &v, &decoded, "😀"), r"\ud83d\ude00");
        // Half of a multi-byte character still maps to its whole escape.
        let at = decoded.find('😀').unwrap();
        assert_eq!(&text[v.source(at + 1..at + 2)], r"\ud83d\ude00");
        // A lone surrogate becomes U+FFFD, one escape long.
        let (decoded, v) = view(Escapes::Backslash, r"a\ud800b").unwrap();
        assert_eq!(decoded, "a\u{FFFD}b");
        assert_eq!(&r"a\ud800b"[v.source(1..4)], r"\ud800");
    }

    #[test]
    fn keys_spelled_in_escapes_are_found() {
        let detector = Detector::builtin().unwrap();
        let body: String = (0..30).map(|i| char::from(b"aB3dEf6hIj9kLm2nOp5qRs8tUv1wXy"[i])).collect();
        let check = crate::detect::confirm::base62_crc32(body.as_bytes());
        let key = format!("ghp_{body}{}", String::from_utf8_lossy(&check));
        let each = |f: &dyn Fn(u8) -> String| key.bytes().map(f).collect::<String>();
        let forms = [
            format!("E'{}'", each(&|b| format!("\\x{b:02x}"))),
            format!("E'{}'", each(&|b| format!("\\{b:03o}"))),
            format!("E'{}'", key.replacen("ghp_", "gh\\160_", 1)),
            format!("U&'{}'", each(&|b| format!("\\{b:04x}"))),
            format!("U&'{}'", each(&|b| format!("\\+{b:06X}"))),
            format!("U&'{}' UESCAPE '!'", each(&|b| format!("!{b:04x}"))),
            format!("u&\"{}\" uescape '#'", key.replacen("ghp_", "#0067hp_", 1)),
            format!("decode('{}', 'hex')", each(&|b| format!("{b:02x}"))),
            format!("'\\x{}'::bytea", each(&|b| format!("{b:02X}"))),
        ];
        for form in &forms {
            let text = format!("insert into t values ({form})");
            let found = find_all(&detector, text.as_bytes()).unwrap();
            let hit = found.iter().find(|f| &*f.detection.rule_id == "github-pat");
            let hit = hit.unwrap_or_else(|| panic!("{form}: {found:?}"));
            assert_eq!(hit.detection.secret.as_bytes(), key.as_bytes(), "{form}");
            let masked = &text[hit.range.clone()];
            assert!(form.contains(masked) && masked.len() >= key.len(), "{form}: masks {masked}");
        }
        // A doubled escape character is the character, not a code point.
        assert!(find_all(&detector, br"U&'\\0067 no key'").unwrap().is_empty());
    }

    #[test]
    fn quoted_printable_views_need_a_soft_break() {
        let text = "key: sk-pr=\r\noj=2Dx=\nyz";
        let (decoded, v) = view(Escapes::QuotedPrintable, text).unwrap();
        assert_eq!(decoded, "key: sk-proj-xyz");
        assert_eq!(src(text, &v, &decoded, "sk-proj-xyz"), "sk-pr=\r\noj=2Dx=\nyz");
        assert!(view(Escapes::QuotedPrintable, "a=1&b=20&c=3D").is_none());
    }

    #[test]
    fn views_decode_only_around_escapes() {
        let far = "x".repeat(3 * CONTEXT);
        let text = format!("{far}%41{far}%42{far}");
        let (decoded, v) = view(Escapes::Percent, &text).unwrap();
        assert_eq!(decoded.len(), 2 * (2 * CONTEXT - 2) + 1, "two clusters and a separator");
        assert_eq!(src(&text, &v, &decoded, "A"), "%41");
        assert_eq!(src(&text, &v, &decoded, "B"), "%42");
    }

    fn b64(data: &[u8], url: bool) -> String {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        if url {
            URL_SAFE_NO_PAD.encode(data)
        } else {
            STANDARD.encode(data)
        }
    }

    fn base64_decoded(text: &str) -> Option<(Vec<u8>, RunView)> {
        let v = RunView::base64(text.as_bytes(), 0, &mut Budget::for_text(text.len())).unwrap()?;
        Some((v.bytes.clone(), v))
    }

    #[test]
    fn base64_runs_decode_in_both_alphabets_and_map_to_the_whole_run() {
        let plain = b"\xfb\xff\xfe hello base64 world ?>";
        for url in [false, true] {
            let encoded = b64(plain, url);
            let text = format!("a {encoded} b");
            let (bytes, v) = base64_decoded(&text).unwrap();
            let at = bytes.windows(5).position(|w| w == b"hello").unwrap();
            assert_eq!(&text[v.source(at..at + 5)], encoded, "url-safe: {url}");
        }
        // Too short to hold a key: not decoded.
        assert!(base64_decoded("abc aGVsbG8gd29ybGQ= xyz").is_none());
    }

    #[test]
    fn base64_after_a_prefix_in_the_same_run_is_found_at_its_alignment() {
        let plain = b"the quick brown fox jumps";
        for prefix in ["/v1/", "/v2x/", "/a/bc/", "x-", "id_"] {
            let text = format!("{prefix}{}", b64(plain, prefix.contains(['-', '_'])));
            let (bytes, v) = base64_decoded(&text).unwrap();
            let at = bytes.windows(5).position(|w| w == b"quick").unwrap_or_else(|| panic!("prefix {prefix}"));
            assert_eq!(v.source(at..at + 5), 0..text.len(), "prefix {prefix}");
        }
    }

    #[test]
    fn wrapped_base64_is_one_run() {
        let plain = "the quick brown fox jumps over the lazy dog ".repeat(4);
        let encoded = b64(plain.as_bytes(), false);
        let wrapped: Vec<&str> = encoded.as_bytes().chunks(76).map(|c| std::str::from_utf8(c).unwrap()).collect();
        let text = format!("--b\r\n\r\n{}\r\n--b--", wrapped.join("\r\n"));
        let (bytes, v) = base64_decoded(&text).unwrap();
        let at = bytes.windows(8).position(|w| w == b"lazy dog").unwrap();
        let run = v.source(at..at + 8);
        assert_eq!(&text[run], wrapped.join("\r\n"));
    }

    /// A detector whose one rule's shortest match is 24 bytes, longer
    /// than a [`MIN_RUN`] run decodes to, so the bound alone decides.
    fn long_key_detector() -> Detector {
        let specs = crate::detect::rules::parse_rule_file(
            "test rules",
            "rules:\n- id: tok\n  pattern: 'tok_[a-z0-9]{20}'\n  confidence: high\n",
        )
        .unwrap();
        let det = Detector::from_specs(&specs.into_iter().map(|s| ("test rules".to_string(), s)).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(det.min_match_len(), 24);
        det
    }

    /// A key of exactly the rule's shortest length.
    const KEY: &str = "tok_k3j4h5g6f7d8s9a0q1w2";

    fn found_once(detector: &Detector, text: &str) -> Range<usize> {
        let found = find_all(detector, text.as_bytes()).unwrap();
        assert_eq!(found.len(), 1, "{text}: {found:?}");
        assert_eq!(found[0].detection.secret.as_bytes(), KEY.as_bytes(), "{text}");
        found[0].range.clone()
    }

    #[test]
    fn runs_shorter_than_the_shortest_match_are_not_decoded() {
        assert_eq!(KEY.len(), 24);
        let b = |n: usize| RunView::base64(b64(&KEY.as_bytes()[..n], false).as_bytes(), 24, &mut Budget(1 << 20));
        // 32 characters decode to 24 bytes: decoded; 23 bytes are not (but
        // would be without the bound: they pass MIN_RUN).
        assert!(b(24).unwrap().is_some());
        assert!(b(23).unwrap().is_none());
        assert!(RunView::base64(b64(&KEY.as_bytes()[..23], false).as_bytes(), 0, &mut Budget(1 << 20))
            .unwrap()
            .is_some());
        let h = |n: usize| {
            let hex: String = KEY.bytes().take(n).map(|b| format!("{b:02x}")).collect();
            RunView::hex(hex.as_bytes(), 24, &mut Budget(1 << 20))
        };
        assert!(h(24).unwrap().is_some());
        assert!(h(23).unwrap().is_none());
    }

    #[test]
    fn a_key_at_the_shortest_match_length_is_found_in_the_shortest_run_decoded() {
        let detector = long_key_detector();
        // Base64 of exactly the key: the shortest run that must be decoded.
        let encoded = b64(KEY.as_bytes(), false);
        assert_eq!(encoded.len(), 32);
        let text = format!("select '{encoded}';");
        assert_eq!(&text[found_once(&detector, &text)], encoded);
        // URL-safe, unpadded, after a prefix that shifts the alignment.
        let text = format!("/v1/x-{}", b64(KEY.as_bytes(), true));
        assert_eq!(found_once(&detector, &text), 0..text.len());
        // Hex: 48 digits, 24 bytes.
        let hex: String = KEY.bytes().map(|b| format!("{b:02x}")).collect();
        let text = format!("decode('{hex}', 'hex')");
        assert_eq!(&text[found_once(&detector, &text)], hex);
        // And masked.
        let masker =
            crate::mask::Masker::new(std::sync::Arc::new(long_key_detector()), &crate::mask::MaskSpec::default())
                .unwrap();
        let text = format!("select '{encoded}';");
        let masked = masker.mask_text(&text);
        assert!(!masked.contains(&encoded) && masked.starts_with("select '"), "{masked}");
    }

    #[test]
    fn nested_views_keep_keys_at_the_shortest_match_length() {
        let detector = long_key_detector();
        // Base64 of the percent-encoded key: the inner view is 24 bytes.
        let escaped = KEY.replacen('_', "%5F", 1);
        let text = format!("q={}", b64(escaped.as_bytes(), false));
        assert_eq!(found_once(&detector, &text), 2..text.len());
        // Base64 of the JSON-escaped key.
        let escaped = format!(r#"{{"k":"{}"}}"#, KEY.replacen('t', r"\u0074", 1));
        let text = b64(escaped.as_bytes(), true);
        assert_eq!(found_once(&detector, &text), 0..text.len());
        // Percent-encoded base64 of the key: the run appears in the
        // percent view, 32 characters long, decoding to 24 bytes.
        let encoded = b64(KEY.as_bytes(), false);
        let text = format!("a=%{:02X}{}", encoded.as_bytes()[0], &encoded[1..]);
        let range = found_once(&detector, &text);
        assert_eq!(&text[range], &text[2..]);
        // Base64 of base64 of the key (three deep with the raw text).
        let twice = b64(b64(KEY.as_bytes(), false).as_bytes(), false);
        assert_eq!(found_once(&detector, &twice), 0..twice.len());
        // One byte short of a key, at every depth: nothing.
        let short = &KEY[..23];
        for text in [b64(short.as_bytes(), false), b64(b64(short.as_bytes(), false).as_bytes(), false)] {
            assert!(find_all(&detector, text.as_bytes()).unwrap().is_empty());
        }
    }

    #[test]
    fn hostile_nesting_runs_out_of_budget() {
        let detector = Detector::builtin().unwrap();
        // Every view of this text is as long as the text and holds every
        // trigger again.
        let unit = "%25%5C+\\u0025\\\\=\r\nQUJDREVGR0hJSktMTU5PUFFSU1RVVldY ";
        let text = unit.repeat(4096);
        assert!(matches!(find(&detector, text.as_bytes()), Err(OverBudget)));
        // Ordinary escaped text is nowhere near it.
        let json =
            r#"{"msg":"caf\u00e9 \"quoted\" line\nnext","path":"a%2Fb","id":"3f2c9a4e5b1d4c8e9f0a7e6d5c4b3a21"} "#;
        assert!(find(&detector, json.repeat(1000).as_bytes()).is_ok());
    }
}
