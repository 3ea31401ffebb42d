//! Incremental `multipart/*` parsing. Each part is decoded by its own
//! headers: `Content-Transfer-Encoding` (base64, quoted-printable) undone,
//! then its `Content-Type` (or its first bytes) decides how it is parsed —
//! JSON, a form, a nested multipart, plain text emitted as `name=content` —
//! under location `multipart.<name>`. The preamble, part headers and
//! epilogue are scanned as text too: nothing between the boundaries is
//! skipped.

use super::{
    b64::StrictDecoder,
    body::Parser,
    collect::{Collector, Emit, MAX_NAME},
    http_scan::hex_val,
    status::{bounded_name, EncodingLayer, Format, Uninspectable},
};

/// Part headers longer than this are not a header block.
const MAX_HEADERS: usize = 16 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Preamble,
    AfterDelimiter,
    Headers,
    Body,
    Epilogue,
}

/// See the module documentation.
pub(crate) struct MultipartParser {
    /// `\r\n--boundary`.
    delimiter: Vec<u8>,
    state: State,
    buf: Vec<u8>,
    depth: u8,
    part: Option<Part>,
    /// The first delimiter was found.
    opened: bool,
}

/// The current part's decoding pipeline.
struct Part {
    transfer: Transfer,
    parser: Parser,
}

enum Transfer {
    Identity,
    Base64(StrictDecoder),
    QuotedPrintable(Vec<u8>),
}

impl MultipartParser {
    pub(crate) fn new(boundary: &str, depth: u8) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        // The first delimiter has no CRLF before it; pretend it has one.
        Self { delimiter, state: State::Preamble, buf: b"\r\n".to_vec(), depth, part: None, opened: false }
    }

    pub(crate) fn feed(&mut self, data: &[u8], out: &mut Collector) {
        self.buf.extend_from_slice(data);
        loop {
            match self.state {
                State::Preamble | State::Body | State::Epilogue => match find(&self.buf, &self.delimiter) {
                    Some(i) if self.state != State::Epilogue => {
                        let content = self.buf[..i].to_vec();
                        self.content(&content, out);
                        self.end_part(out);
                        self.buf.drain(..i + self.delimiter.len());
                        self.opened = true;
                        self.state = State::AfterDelimiter;
                    }
                    _ => {
                        // All but what could be the start of a split delimiter.
                        let safe = self.buf.len().saturating_sub(self.delimiter.len() - 1);
                        let content = self.buf[..safe].to_vec();
                        self.content(&content, out);
                        self.buf.drain(..safe);
                        return;
                    }
                },
                State::AfterDelimiter => {
                    if self.buf.len() < 2 {
                        return;
                    }
                    if self.buf.starts_with(b"--") {
                        self.buf.drain(..2);
                        self.state = State::Epilogue;
                        out.begin("multipart.epilogue");
                        continue;
                    }
                    match find(&self.buf, b"\r\n") {
                        Some(i) => {
                            // What precedes CRLF is transport padding (scanned with the headers).
                            let padding = self.buf[..i].to_vec();
                            self.buf.drain(..i + 2);
                            if !padding.trim_ascii().is_empty() {
                                out.begin("multipart");
                                out.data(&padding);
                            }
                            self.state = State::Headers;
                        }
                        None if self.buf.len() > MAX_HEADERS => self.malformed("delimiter line too long", out),
                        None => return,
                    }
                }
                State::Headers => {
                    let end = if self.buf.starts_with(b"\r\n") {
                        Some((0, 2))
                    } else {
                        find(&self.buf, b"\r\n\r\n").map(|i| (i, 4))
                    };
                    match end {
                        Some((i, sep)) => {
                            let headers = self.buf[..i].to_vec();
                            self.buf.drain(..i + sep);
                            self.start_part(&headers, out);
                        }
                        None if self.buf.len() > MAX_HEADERS => self.malformed("part headers too long", out),
                        None => return,
                    }
                }
            }
        }
    }

    pub(crate) fn finish(&mut self, out: &mut Collector) {
        let rest = std::mem::take(&mut self.buf);
        match self.state {
            State::Body | State::Preamble | State::Epilogue => self.content(&rest, out),
            State::AfterDelimiter | State::Headers => {
                out.begin("multipart");
                out.data(&rest);
            }
        }
        self.end_part(out);
        if !self.opened {
            // Not multipart at all: every byte went through as text, but
            // whatever the job meant by it was not understood.
            out.fail(Uninspectable::Malformed { format: Format::Multipart, reason: "no boundary delimiter".into() });
        }
    }

    /// Header or delimiter junk: scanned as text, the rest treated as one part.
    fn malformed(&mut self, reason: &str, out: &mut Collector) {
        out.fail(Uninspectable::Malformed { format: Format::Multipart, reason: reason.to_string() });
        out.begin("multipart");
        let rest = std::mem::take(&mut self.buf);
        out.data(&rest);
        self.part =
            Some(Part { transfer: Transfer::Identity, parser: Parser::Raw { started: true, lead: Vec::new() } });
        self.state = State::Body;
    }

    fn content(&mut self, data: &[u8], out: &mut Collector) {
        if data.is_empty() {
            return;
        }
        match (&mut self.part, self.state) {
            (Some(part), State::Body) => part.feed(data, out),
            (_, State::Preamble) => {
                // Starts with the CRLF pretended above; only real bytes matter.
                let data = if self.opened { data } else { data.strip_prefix(b"\r\n").unwrap_or(data) };
                if !data.is_empty() {
                    out.begin("multipart.preamble");
                    out.data(data);
                }
            }
            _ => out.data(data),
        }
    }

    fn start_part(&mut self, headers: &[u8], out: &mut Collector) {
        let text = String::from_utf8_lossy(headers);
        // Header values are text a job chooses (a file name, a name): scanned.
        out.begin("multipart");
        out.data(headers);
        let field = |name: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let name = field("content-disposition").and_then(|d| part_name(&d));
        let content_type = field("content-type").unwrap_or_default();
        let transfer = field("content-transfer-encoding").unwrap_or_default().to_ascii_lowercase();
        let path = match &name {
            Some(n) => format!("multipart.{n}"),
            None => "multipart".to_string(),
        };
        out.push_prefix(&path);
        // `name=` so assignment rules see the field name.
        let lead = name.map(|n| format!("{n}=").into_bytes()).unwrap_or_default();
        let parser = Parser::for_part(&content_type, self.depth, lead, out);
        let transfer = match transfer.as_str() {
            "" | "7bit" | "8bit" | "binary" => Transfer::Identity,
            "base64" => Transfer::Base64(StrictDecoder::default()),
            "quoted-printable" => Transfer::QuotedPrintable(Vec::new()),
            other => {
                out.fail(Uninspectable::UnknownEncoding { layer: EncodingLayer::Transfer, name: bounded_name(other) });
                Transfer::Identity
            }
        };
        self.part = Some(Part { transfer, parser });
        self.state = State::Body;
    }

    fn end_part(&mut self, out: &mut Collector) {
        if let Some(mut part) = self.part.take() {
            part.finish(out);
            out.pop_prefix();
        }
    }
}

impl Part {
    fn feed(&mut self, data: &[u8], out: &mut Collector) {
        match &mut self.transfer {
            Transfer::Identity => self.parser.feed(data, out),
            Transfer::Base64(decoder) => {
                let mut decoded = Vec::with_capacity(data.len() / 4 * 3 + 3);
                if let Err(reason) = decoder.feed(data, &mut decoded) {
                    out.fail(Uninspectable::DecodeError { encoding: "base64".into(), reason });
                    self.transfer = Transfer::Identity;
                    out.begin("");
                    out.data(data);
                    return;
                }
                self.parser.feed(&decoded, out);
            }
            Transfer::QuotedPrintable(pending) => {
                let decoded = quoted_printable(pending, data, false);
                self.parser.feed(&decoded, out);
            }
        }
    }

    fn finish(&mut self, out: &mut Collector) {
        match &mut self.transfer {
            Transfer::Identity => {}
            Transfer::Base64(decoder) => {
                let mut decoded = Vec::new();
                if let Err(reason) = decoder.finish(&mut decoded) {
                    out.fail(Uninspectable::DecodeError { encoding: "base64".into(), reason });
                }
                self.parser.feed(&decoded, out);
            }
            Transfer::QuotedPrintable(pending) => {
                let decoded = quoted_printable(pending, &[], true);
                self.parser.feed(&decoded, out);
            }
        }
        self.parser.finish(out);
    }
}

/// Decodes quoted-printable (RFC 2045): `=XX` escapes and `=` soft line
/// breaks; an `=` not followed by either stays as it is. An escape split
/// across chunks waits in `pending` unless `at_end`.
fn quoted_printable(pending: &mut Vec<u8>, data: &[u8], at_end: bool) -> Vec<u8> {
    let mut input = std::mem::take(pending);
    input.extend_from_slice(data);
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] != b'=' {
            out.push(input[i]);
            i += 1;
            continue;
        }
        let rest = &input[i + 1..];
        if rest.len() < 2 && !at_end {
            pending.extend_from_slice(&input[i..]);
            break;
        }
        if let (Some(h), Some(l)) = (hex_val(rest.first()), hex_val(rest.get(1))) {
            out.push(h << 4 | l);
            i += 3;
        } else if rest.starts_with(b"\r\n") {
            i += 3;
        } else if rest.starts_with(b"\n") {
            i += 2;
        } else {
            out.push(b'=');
            i += 1;
        }
    }
    out
}

/// The `name` parameter of `Content-Disposition`.
fn part_name(disposition: &str) -> Option<String> {
    disposition.split(';').skip(1).find_map(|param| {
        let (k, v) = param.split_once('=')?;
        (k.trim().eq_ignore_ascii_case("name")).then(|| {
            let mut v = v.trim().trim_matches('"').to_string();
            // `truncate` would panic inside a multi-byte character.
            while v.len() > MAX_NAME {
                v.pop();
            }
            v
        })
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_printable_streams() {
        let text = b"a=3Db=\r\nc=4\x31=\nd=zz";
        let mut pending = Vec::new();
        let mut out = Vec::new();
        for c in text.chunks(1) {
            out.extend(quoted_printable(&mut pending, c, false));
        }
        out.extend(quoted_printable(&mut pending, &[], true));
        assert_eq!(out, b"a=bcAd=zz");
    }
}
