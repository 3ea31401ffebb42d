//! "What is it" scanning of a whole decoded payload (a gRPC message, a
//! WebSocket message, a protobuf body, a base64 run): the bytes are always
//! scanned as they are, and then through every view that fits them —
//! gzip/zstd by magic number, JSON (UTF-8 or UTF-16, lenient) when it looks
//! like JSON, protobuf when the wire format parses (each length-delimited
//! field scanned and tried as an embedded message), base64 runs decoded —
//! recursively up to [`MAX_DEPTH`] views deep.
//!
//! One key seen through several views (the raw bytes of a message and the
//! string field inside it, the JSON text and its unescaped string) is one
//! occurrence: a hit is dropped when a deeper view found the same rule and
//! secret in an overlapping span of the payload, so it is reported once,
//! where it is most precisely located.

use std::io::Read;

use super::{
    b64,
    collect::{join, Budget, Emit},
    json::{looks_like_json, JsonLexer},
    protobuf,
    status::{ScanStatus, Uninspectable},
    utf16, Detection, Detector,
};

/// Views nested deeper than this are not opened (the bytes at that depth
/// are still scanned as they are).
pub(crate) const MAX_DEPTH: u8 = 8;

struct Found {
    detection: Detection,
    path: String,
    /// Bytes of the top payload the detection comes from.
    span: (usize, usize),
    depth: u8,
}

struct Walker<'a> {
    detector: &'a Detector,
    budget: &'a mut Budget,
    status: &'a mut ScanStatus,
    found: Vec<Found>,
}

/// Scans `bytes` and every view of it; returns each detection with its
/// location path (under `path`).
pub(crate) fn scan(
    detector: &Detector,
    budget: &mut Budget,
    status: &mut ScanStatus,
    bytes: &[u8],
    path: &str,
) -> Vec<(Detection, String)> {
    let mut walker = Walker { detector, budget, status, found: Vec::new() };
    walker.walk(bytes, 0, None, path, 0);
    dedup(walker.found)
}

/// Decoded text of a JSON document with the path of each field.
#[derive(Default)]
struct TextBuf {
    text: Vec<u8>,
    marks: Vec<(usize, String)>,
}

impl Emit for TextBuf {
    fn begin(&mut self, path: &str) {
        if !self.text.is_empty() {
            self.text.push(b'\n');
        }
        self.marks.push((self.text.len(), path.to_string()));
    }

    fn data(&mut self, bytes: &[u8]) {
        self.text.extend_from_slice(bytes);
    }
}

impl TextBuf {
    fn path_at(&self, offset: usize) -> &str {
        let idx = self.marks.partition_point(|(start, _)| *start <= offset);
        idx.checked_sub(1).and_then(|i| self.marks.get(i)).map_or("", |(_, p)| p.as_str())
    }
}

/// The document as UTF-8 without a byte-order mark, if it is text that
/// looks like JSON.
fn json_text(bytes: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    if let Some((endian, bom)) = utf16::sniff(bytes) {
        let text = utf16::to_utf8(&bytes[bom..], endian);
        return looks_like_json(&text).then_some(std::borrow::Cow::Owned(text));
    }
    let body = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    looks_like_json(body).then_some(std::borrow::Cow::Borrowed(body))
}

impl Walker<'_> {
    fn fail(&mut self, why: Uninspectable) {
        if self.status.is_complete() {
            *self.status = ScanStatus::Uninspectable(why);
        }
    }

    /// `base` is where `bytes` start in the top payload; `derived` is the
    /// span of the top payload that a decoded view as a whole comes from.
    fn walk(&mut self, bytes: &[u8], base: usize, derived: Option<(usize, usize)>, path: &str, depth: u8) {
        let span = |s: usize, e: usize| derived.unwrap_or((base + s, base + e));
        for detection in self.detector.scan(bytes) {
            let span = span(detection.start as usize, detection.end as usize);
            self.found.push(Found { detection, path: path.to_string(), span, depth });
        }
        if depth >= MAX_DEPTH || bytes.is_empty() {
            return;
        }
        let whole = span(0, bytes.len());
        if let Some(plain) = self.decompress(bytes) {
            self.walk(&plain, 0, Some(whole), &join(path, "decompressed"), depth + 1);
            return;
        }
        if let Some(text) = json_text(bytes) {
            self.json(&text, whole, path, depth + 1);
            return;
        }
        if let Some(fields) = protobuf::len_fields(bytes) {
            for f in fields {
                let sub = derived.map(|_| whole);
                self.walk(&bytes[f.start..f.end], base + f.start, sub, &join(path, &f.number.to_string()), depth + 1);
            }
        }
        for (s, e) in b64::runs(bytes) {
            let decoded = b64::decode_run(&bytes[s..e], 0);
            self.walk(&decoded, 0, Some(span(s, e)), &join(path, "base64"), depth + 1);
        }
    }

    fn json(&mut self, text: &[u8], whole: (usize, usize), path: &str, depth: u8) {
        let mut buf = TextBuf::default();
        let mut lexer = JsonLexer::default();
        match lexer.feed(text, &mut buf) {
            Ok(()) => lexer.finish(&mut buf),
            // The raw scan of these bytes already covers what follows.
            Err(_) => lexer.finish(&mut buf),
        }
        for detection in self.detector.scan(&buf.text) {
            let p = join(path, buf.path_at(detection.start as usize));
            self.found.push(Found { detection, path: p, span: whole, depth });
        }
        if depth >= MAX_DEPTH {
            return;
        }
        for (s, e) in b64::runs(&buf.text) {
            let decoded = b64::decode_run(&buf.text[s..e], 0);
            let p = join(&join(path, buf.path_at(s)), "base64");
            self.walk(&decoded, 0, Some(whole), &p, depth + 1);
        }
    }

    /// gzip and zstd recognized by their magic numbers, decoded within the
    /// budget. Other bytes, and data that only looks compressed, give `None`.
    fn decompress(&mut self, bytes: &[u8]) -> Option<Vec<u8>> {
        let room = self.budget.limit.saturating_sub(self.budget.used);
        let mut out = Vec::new();
        let read = if bytes.starts_with(&[0x1f, 0x8b, 0x08]) {
            flate2::read::MultiGzDecoder::new(bytes).take(room as u64 + 1).read_to_end(&mut out)
        } else if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            zstd::stream::read::Decoder::new(bytes).and_then(|d| d.take(room as u64 + 1).read_to_end(&mut out))
        } else {
            return None;
        };
        if out.len() > room {
            self.budget.used = self.budget.limit;
            self.fail(Uninspectable::TooLarge { limit: self.budget.limit });
            out.truncate(room);
            return Some(out);
        }
        self.budget.used += out.len();
        // A guess from two bytes that did not decode: the raw scan stands.
        read.ok().map(|_| out)
    }
}

/// Drops hits that a deeper view found again (same rule and secret,
/// overlapping span), then exact duplicates of `(rule, secret, path)`.
fn dedup(mut found: Vec<Found>) -> Vec<(Detection, String)> {
    found.sort_by(|a, b| {
        (&*a.detection.rule_id, a.detection.secret.as_bytes(), a.span.0).cmp(&(
            &*b.detection.rule_id,
            b.detection.secret.as_bytes(),
            b.span.0,
        ))
    });
    let mut keep = vec![true; found.len()];
    let mut group = 0;
    while group < found.len() {
        let same = |f: &Found| {
            f.detection.rule_id == found[group].detection.rule_id && f.detection.secret == found[group].detection.secret
        };
        let end = group + found[group..].iter().take_while(|f| same(f)).count();
        for i in group..end {
            let a = &found[i];
            let shadowed = found[group..end].iter().any(|b| {
                b.depth > a.depth && b.span.0 < a.span.1.max(a.span.0 + 1) && a.span.0 < b.span.1.max(b.span.0 + 1)
            });
            if shadowed {
                keep[i] = false;
            }
        }
        group = end;
    }
    let mut seen = std::collections::HashSet::new();
    found
        .into_iter()
        .zip(keep)
        .filter(|(_, k)| *k)
        .filter_map(|(f, _)| {
            seen.insert((f.detection.rule_id.clone(), f.detection.secret.clone(), f.path.clone()))
                .then_some((f.detection, f.path))
        })
        .collect()
}
