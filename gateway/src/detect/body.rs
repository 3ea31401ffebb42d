//! Streaming body scanning: undo `Content-Encoding`, work out what the
//! content is (from its headers and from its first bytes) and scan every
//! decoded field.
//!
//! Everything is incremental: compressed input goes through streaming
//! decoders whose output is parsed and scanned as it is produced, so a body is
//! never held in memory whole (framed messages are, one at a time), and
//! decoded output beyond [`BodyLimits::max_decoded`] is not scanned (which
//! also defuses decompression bombs). Nothing is forwarded blind: whatever
//! cannot be decoded turns [`BodyScanner::status`] into
//! [`ScanStatus::Uninspectable`], which the gate refuses.

use std::{io::Write, sync::Arc};

use http::HeaderMap;

use super::{
    b64::StrictDecoder,
    collect::{Collector, Emit, MAX_NAME},
    grpc::{Framer, Framing},
    http_scan::{hex_val, Hit},
    json::JsonLexer,
    multipart::MultipartParser,
    status::{bounded_name, EncodingLayer, Format, ScanStatus, Uninspectable},
    utf16::{self, Utf16Decoder},
    DetectConfig, Detector,
};

/// Bounds on body scanning.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Decoded bytes scanned per body; more makes the body uninspectable.
    pub max_decoded: usize,
}

impl Default for BodyLimits {
    fn default() -> Self {
        Self { max_decoded: super::DEFAULT_MAX_DECODED_BODY }
    }
}

impl BodyLimits {
    /// The limits configured in `detect:`.
    pub fn from_config(config: &DetectConfig) -> Self {
        Self { max_decoded: config.max_decoded_body }
    }
}

/// Multipart bodies nested deeper than this are scanned as text.
const MAX_NESTING: u8 = 4;
/// Bytes looked at before deciding what a text body is.
const SNIFF_BYTES: usize = 512;
/// Protobuf bodies held whole for walking; a larger one goes on as a plain
/// stream (every byte still scanned, keys found after any length byte), so
/// one request cannot pin the whole decoded-body budget in memory.
const MAX_WHOLE: usize = 4 << 20;

/// Scans a request or response body fed in chunks, as its headers and its
/// first bytes describe it. [`status`](Self::status) says after every
/// [`feed`](Self::feed) whether everything so far was understood.
pub struct BodyScanner {
    stage: Stage,
}

impl std::fmt::Debug for BodyScanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyScanner").field("status", self.stage.sink().out.status()).finish()
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

impl BodyScanner {
    /// A scanner for a body with these headers (`Content-Encoding`,
    /// `Content-Type`, and for gRPC / Connect the message encoding).
    pub fn new(detector: Arc<Detector>, headers: &HeaderMap, limits: BodyLimits) -> Self {
        let mut out = Collector::new(detector, limits.max_decoded);
        let content_type = header(headers, "content-type");
        let message_encoding = match header(headers, "grpc-encoding") {
            "" => header(headers, "connect-content-encoding"),
            e => e,
        };
        let parser = Parser::for_content_type(content_type, message_encoding, 0, &mut out);
        let mut stage = Stage::Sink(Box::new(Sink { parser, out }));
        // Encodings are listed in the order applied; undo the last one first,
        // so it ends up outermost.
        let encodings: Vec<String> = headers
            .get_all(http::header::CONTENT_ENCODING)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .flat_map(|v| v.split(',').map(|e| e.trim().to_ascii_lowercase()).collect::<Vec<_>>())
            .filter(|e| !e.is_empty() && e != "identity")
            .collect();
        for enc in encodings {
            stage = match enc.as_str() {
                "gzip" | "x-gzip" => Stage::Gzip(Box::new(flate2::write::MultiGzDecoder::new(stage))),
                "deflate" => Stage::Deflate(Box::new(DeflateAuto::Undecided(Vec::new(), Some(stage)))),
                "br" => Stage::Brotli(Box::new(brotli::DecompressorWriter::new(stage, 16 * 1024))),
                "zstd" => match ZstdStage::new(stage) {
                    Ok(z) => Stage::Zstd(Box::new(z)),
                    Err((mut stage, e)) => {
                        stage.sink_mut().out.fail(decode_error("zstd", &e));
                        stage
                    }
                },
                other => {
                    // Not understood: what follows is scanned as it is, for
                    // findings' sake, but the body is uninspectable.
                    stage.sink_mut().out.fail(Uninspectable::UnknownEncoding {
                        layer: EncodingLayer::Content,
                        name: bounded_name(other),
                    });
                    stage
                }
            };
        }
        Self { stage }
    }

    /// Feeds the next chunk of the (encoded) body; returns the hits it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Hit> {
        if self.accepting() {
            if let Err(e) = self.stage.write_all(chunk) {
                self.fail(&e);
            }
        }
        self.stage.sink_mut().out.take_hits()
    }

    /// Ends the body: flushes decoders, checks that every stream and frame
    /// ended properly, and reports what was held back.
    pub fn finish(&mut self) -> Vec<Hit> {
        if self.accepting() {
            if let Err(e) = self.stage.finish() {
                self.fail(&e);
            }
        }
        let sink = self.stage.sink_mut();
        sink.parser.finish(&mut sink.out);
        sink.out.finish();
        sink.out.take_hits()
    }

    /// Whether everything fed so far was decoded and scanned.
    pub fn status(&self) -> ScanStatus {
        self.stage.sink().out.status().clone()
    }

    /// Decoded bytes counted against the limit so far.
    pub fn decoded_bytes(&self) -> usize {
        self.stage.sink().out.budget.used
    }

    /// Distinct hits not reported because the body already had
    /// [`MAX_HITS_PER_MESSAGE`](super::collect::MAX_HITS_PER_MESSAGE).
    pub fn dropped_hits(&self) -> u64 {
        self.stage.sink().out.dropped()
    }

    fn accepting(&self) -> bool {
        // After a decoder failed, what follows cannot be decoded either.
        !matches!(
            self.stage.sink().out.status(),
            ScanStatus::Uninspectable(Uninspectable::DecodeError { .. } | Uninspectable::TooLarge { .. })
        )
    }

    fn fail(&mut self, e: &std::io::Error) {
        let encoding = self.stage.outer_name();
        self.stage.sink_mut().out.fail(decode_error(encoding, e));
    }
}

fn decode_error(encoding: &str, e: &std::io::Error) -> Uninspectable {
    Uninspectable::DecodeError { encoding: encoding.to_string(), reason: e.to_string() }
}

/// A decoding pipeline stage; the innermost is the [`Sink`].
enum Stage {
    Sink(Box<Sink>),
    Gzip(Box<flate2::write::MultiGzDecoder<Stage>>),
    Deflate(Box<DeflateAuto>),
    Brotli(Box<brotli::DecompressorWriter<Stage>>),
    Zstd(Box<ZstdStage>),
}

/// `Content-Encoding: deflate` is meant to be zlib, but raw deflate is common;
/// the first two bytes tell which.
enum DeflateAuto {
    Undecided(Vec<u8>, Option<Stage>),
    Zlib(flate2::write::ZlibDecoder<Stage>),
    Raw(flate2::write::DeflateDecoder<Stage>),
}

impl DeflateAuto {
    fn decide(&mut self) -> std::io::Result<()> {
        if let DeflateAuto::Undecided(head, next) = self {
            let Some(next) = next.take() else {
                return Ok(());
            };
            let head = std::mem::take(head);
            let zlib =
                head.len() >= 2 && head[0] & 0x0f == 8 && (u16::from(head[0]) << 8 | u16::from(head[1])) % 31 == 0;
            *self = if zlib {
                DeflateAuto::Zlib(flate2::write::ZlibDecoder::new(next))
            } else {
                DeflateAuto::Raw(flate2::write::DeflateDecoder::new(next))
            };
            self.write_all(&head)?;
        }
        Ok(())
    }

    fn next(&self) -> Option<&Stage> {
        match self {
            DeflateAuto::Undecided(_, next) => next.as_ref(),
            DeflateAuto::Zlib(d) => Some(d.get_ref()),
            DeflateAuto::Raw(d) => Some(d.get_ref()),
        }
    }

    fn next_mut(&mut self) -> Option<&mut Stage> {
        match self {
            DeflateAuto::Undecided(_, next) => next.as_mut(),
            DeflateAuto::Zlib(d) => Some(d.get_mut()),
            DeflateAuto::Raw(d) => Some(d.get_mut()),
        }
    }
}

impl Write for DeflateAuto {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            DeflateAuto::Undecided(head, _) => {
                let take = buf.len().min(2 - head.len());
                head.extend_from_slice(&buf[..take]);
                if head.len() == 2 {
                    self.decide()?;
                }
                Ok(take)
            }
            DeflateAuto::Zlib(d) => d.write(buf),
            DeflateAuto::Raw(d) => d.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            DeflateAuto::Undecided(..) => Ok(()),
            DeflateAuto::Zlib(d) => d.flush(),
            DeflateAuto::Raw(d) => d.flush(),
        }
    }
}

/// zstd frames (several in a row, as concatenated streams are) decoded into
/// the next stage; knows whether the last frame ended.
struct ZstdStage {
    decoder: zstd::stream::raw::Decoder<'static>,
    next: Stage,
    buf: Vec<u8>,
    frame_done: bool,
}

impl ZstdStage {
    fn new(next: Stage) -> Result<Self, (Stage, std::io::Error)> {
        match zstd::stream::raw::Decoder::new() {
            Ok(decoder) => Ok(Self { decoder, next, buf: vec![0; 32 * 1024], frame_done: true }),
            Err(e) => Err((next, e)),
        }
    }

    fn run(&mut self, mut input: &[u8]) -> std::io::Result<()> {
        use zstd::stream::raw::Operation;
        loop {
            let status = self.decoder.run_on_buffers(input, &mut self.buf)?;
            input = &input[status.bytes_read..];
            if status.bytes_read > 0 || status.bytes_written > 0 {
                self.frame_done = status.remaining == 0;
            }
            self.next.write_all(&self.buf[..status.bytes_written])?;
            if input.is_empty() && status.bytes_written < self.buf.len() {
                return Ok(());
            }
        }
    }

    fn finish(&mut self) -> std::io::Result<()> {
        self.run(&[])?;
        if !self.frame_done {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "truncated zstd frame"));
        }
        self.next.finish()
    }
}

impl Stage {
    fn sink(&self) -> &Sink {
        let mut stage = self;
        loop {
            stage = match stage {
                Stage::Sink(s) => return s,
                Stage::Gzip(d) => d.get_ref(),
                Stage::Brotli(d) => d.get_ref(),
                Stage::Zstd(z) => &z.next,
                Stage::Deflate(d) => match d.next() {
                    Some(next) => next,
                    // Only transiently empty inside `decide`, which never calls this.
                    None => unreachable!("deflate stage without a successor"),
                },
            };
        }
    }

    fn sink_mut(&mut self) -> &mut Sink {
        match self {
            Stage::Sink(s) => s,
            Stage::Gzip(d) => d.get_mut().sink_mut(),
            Stage::Brotli(d) => d.get_mut().sink_mut(),
            Stage::Zstd(z) => z.next.sink_mut(),
            Stage::Deflate(d) => match d.next_mut() {
                Some(next) => next.sink_mut(),
                None => unreachable!("deflate stage without a successor"),
            },
        }
    }

    fn outer_name(&self) -> &'static str {
        match self {
            Stage::Sink(_) => "body",
            Stage::Gzip(_) => "gzip",
            Stage::Deflate(_) => "deflate",
            Stage::Brotli(_) => "br",
            Stage::Zstd(_) => "zstd",
        }
    }

    /// Flushes every decoder and checks the compressed stream ended properly.
    fn finish(&mut self) -> std::io::Result<()> {
        match self {
            Stage::Sink(_) => Ok(()),
            Stage::Gzip(d) => {
                d.try_finish()?;
                d.get_mut().finish()
            }
            Stage::Brotli(d) => {
                d.close()?;
                d.get_mut().finish()
            }
            Stage::Zstd(z) => z.finish(),
            Stage::Deflate(d) => {
                d.decide()?;
                match &mut **d {
                    DeflateAuto::Zlib(z) => z.try_finish()?,
                    DeflateAuto::Raw(r) => r.try_finish()?,
                    DeflateAuto::Undecided(..) => {}
                }
                d.next_mut().map_or(Ok(()), Stage::finish)
            }
        }
    }
}

impl Write for Stage {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stage::Sink(s) => s.write(buf),
            Stage::Gzip(d) => d.write(buf),
            Stage::Deflate(d) => d.write(buf),
            Stage::Brotli(d) => d.write(buf),
            Stage::Zstd(z) => z.run(buf).map(|()| buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stage::Sink(_) | Stage::Zstd(_) => Ok(()),
            Stage::Gzip(d) => d.flush(),
            Stage::Deflate(d) => d.flush(),
            Stage::Brotli(d) => d.flush(),
        }
    }
}

/// Decoded bytes arrive here: counted against the limit, parsed, scanned.
struct Sink {
    parser: Parser,
    out: Collector,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let take = self.out.charge_partial(buf.len());
        self.parser.feed(&buf[..take], &mut self.out);
        if take < buf.len() {
            // Stops the decoders: decompressing further would be wasted work.
            return Err(std::io::Error::other("decoded body limit reached"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the content type says a body is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Kind {
    Json,
    Form,
    Multipart(String),
    Framed(Framing),
    GrpcWebText,
    Protobuf,
    /// Anything else: sniffed.
    Other,
}

impl Kind {
    fn of(content_type: &str) -> Kind {
        let lower = content_type.to_ascii_lowercase();
        let essence = lower.split(';').next().unwrap_or("").trim();
        let base = essence.split('+').next().unwrap_or("");
        match base {
            "application/grpc" => return Kind::Framed(Framing::Grpc),
            "application/grpc-web" => return Kind::Framed(Framing::GrpcWeb),
            "application/grpc-web-text" => return Kind::GrpcWebText,
            "application/connect" => return Kind::Framed(Framing::Connect),
            _ => {}
        }
        if essence == "application/json"
            || essence.ends_with("+json")
            || essence == "application/x-ndjson"
            || essence == "application/jsonl"
            || essence == "text/json"
        {
            Kind::Json
        } else if essence == "application/x-www-form-urlencoded" {
            Kind::Form
        } else if essence.starts_with("multipart/") {
            match multipart_boundary(content_type) {
                Some(b) => Kind::Multipart(b),
                None => Kind::Other,
            }
        } else if matches!(
            essence,
            "application/proto"
                | "application/protobuf"
                | "application/x-protobuf"
                | "application/x-google-protobuf"
                | "application/vnd.google.protobuf"
        ) {
            Kind::Protobuf
        } else {
            Kind::Other
        }
    }
}

/// Content-type specific parsing of decoded bytes.
pub(crate) enum Parser {
    /// Deciding between JSON, UTF-16 and plain text from the first bytes.
    Sniff {
        kind: Kind,
        head: Vec<u8>,
        lead: Vec<u8>,
    },
    /// Plain text or binary: scanned as it is, after `lead` (`name=`).
    Raw {
        started: bool,
        lead: Vec<u8>,
    },
    Json(Box<JsonLexer>),
    Utf16 {
        decoder: Utf16Decoder,
        buf: Vec<u8>,
        inner: Box<Parser>,
    },
    Form(FormParser),
    Multipart(Box<MultipartParser>),
    Framed(Box<Framer>),
    Base64 {
        decoder: StrictDecoder,
        buf: Vec<u8>,
        inner: Box<Parser>,
        format: Format,
    },
    /// Held whole and scanned as one payload at the end (protobuf, binary).
    Whole {
        buf: Vec<u8>,
    },
}

impl Parser {
    /// The parser for a content type; `depth` counts multipart nesting.
    pub(crate) fn for_content_type(
        content_type: &str,
        message_encoding: &str,
        depth: u8,
        out: &mut Collector,
    ) -> Parser {
        Self::for_kind(Kind::of(content_type), message_encoding, depth, Vec::new(), out)
    }

    /// The parser of a multipart part; `lead` (`name=`) goes before plain content.
    pub(crate) fn for_part(content_type: &str, depth: u8, lead: Vec<u8>, out: &mut Collector) -> Parser {
        Self::for_kind(Kind::of(content_type), "", depth, lead, out)
    }

    fn for_kind(kind: Kind, message_encoding: &str, depth: u8, lead: Vec<u8>, out: &mut Collector) -> Parser {
        match kind {
            Kind::Form => Parser::Form(FormParser::default()),
            Kind::Multipart(boundary) if depth < MAX_NESTING => {
                Parser::Multipart(Box::new(MultipartParser::new(&boundary, depth + 1)))
            }
            Kind::Framed(framing) => Parser::Framed(Box::new(Framer::new(framing, message_encoding, out))),
            Kind::GrpcWebText => Parser::Base64 {
                decoder: StrictDecoder::default(),
                buf: Vec::new(),
                inner: Box::new(Parser::Framed(Box::new(Framer::new(Framing::GrpcWeb, message_encoding, out)))),
                format: Format::GrpcWeb,
            },
            Kind::Protobuf => Parser::Whole { buf: Vec::new() },
            kind => Parser::Sniff { kind, head: Vec::new(), lead },
        }
    }

    pub(crate) fn feed(&mut self, data: &[u8], out: &mut Collector) {
        match self {
            Parser::Sniff { kind, head, lead } => {
                head.extend_from_slice(data);
                let decided = head.len() >= SNIFF_BYTES
                    || (head.len() >= 4 && head.iter().any(|b| !b.is_ascii_whitespace() && *b != 0));
                if decided {
                    let head = std::mem::take(head);
                    *self = Self::decide(kind.clone(), &head, std::mem::take(lead));
                    self.feed(&head, out);
                }
            }
            Parser::Raw { started, lead } => {
                if !*started {
                    out.begin("");
                    out.data(lead);
                    *started = true;
                }
                out.data(data);
            }
            Parser::Json(lexer) => {
                if let Err(rest) = lexer.feed(data, out) {
                    // Not JSON after all: what the lexer swallowed and the
                    // rest are scanned as they are.
                    let pending = lexer.take_pending();
                    lexer.finish(out);
                    *self = Parser::Raw { started: false, lead: pending };
                    self.feed(&data[rest..], out);
                }
            }
            Parser::Utf16 { decoder, buf, inner } => {
                decoder.feed(data, buf);
                inner.feed(buf, out);
                buf.clear();
            }
            Parser::Form(form) => form.feed(data, out),
            Parser::Multipart(mp) => mp.feed(data, out),
            Parser::Framed(framer) => framer.feed(data, out),
            Parser::Base64 { decoder, buf, inner, format } => {
                if let Err(reason) = decoder.feed(data, buf) {
                    out.fail(Uninspectable::Malformed { format: *format, reason: format!("base64: {reason}") });
                    // The bytes are still scanned as they are.
                    out.begin("");
                    out.data(data);
                }
                inner.feed(buf, out);
                buf.clear();
            }
            Parser::Whole { buf } => {
                if buf.len() + data.len() <= MAX_WHOLE {
                    buf.extend_from_slice(data);
                } else {
                    let held = std::mem::take(buf);
                    *self = Parser::Raw { started: false, lead: held };
                    self.feed(data, out);
                }
            }
        }
    }

    fn decide(kind: Kind, head: &[u8], lead: Vec<u8>) -> Parser {
        if let Some((endian, _)) = utf16::sniff(head) {
            // The byte-order mark, if any, comes out as U+FEFF, which the
            // inner sniffing skips.
            return Parser::Utf16 {
                decoder: Utf16Decoder::new(endian),
                buf: Vec::new(),
                inner: Box::new(Parser::Sniff { kind, head: Vec::new(), lead }),
            };
        }
        // The lexer skips a UTF-8 byte-order mark.
        let text = head.strip_prefix("\u{feff}".as_bytes()).unwrap_or(head);
        if kind == Kind::Json || super::json::looks_like_json(text) {
            return Parser::Json(Box::default());
        }
        Parser::Raw { started: false, lead }
    }

    pub(crate) fn finish(&mut self, out: &mut Collector) {
        match self {
            Parser::Sniff { kind, head, lead } => {
                let head = std::mem::take(head);
                *self = Self::decide(kind.clone(), &head, std::mem::take(lead));
                self.feed(&head, out);
                self.finish(out);
            }
            Parser::Raw { started, lead } => {
                if !*started && !lead.is_empty() {
                    out.begin("");
                    out.data(lead);
                    *started = true;
                }
            }
            Parser::Json(lexer) => lexer.finish(out),
            Parser::Utf16 { decoder, buf, inner } => {
                decoder.finish(buf);
                inner.feed(buf, out);
                buf.clear();
                inner.finish(out);
            }
            Parser::Form(form) => form.finish(out),
            Parser::Multipart(mp) => mp.finish(out),
            Parser::Framed(framer) => framer.finish(out),
            Parser::Base64 { decoder, buf, inner, format } => {
                if let Err(reason) = decoder.finish(buf) {
                    out.fail(Uninspectable::Malformed { format: *format, reason: format!("base64: {reason}") });
                }
                inner.feed(buf, out);
                buf.clear();
                inner.finish(out);
            }
            Parser::Whole { buf } => {
                let buf = std::mem::take(buf);
                if !buf.is_empty() {
                    out.payload(&buf, "");
                }
            }
        }
    }
}

fn multipart_boundary(content_type: &str) -> Option<String> {
    content_type
        .split(';')
        .skip(1)
        .find_map(|param| {
            let (k, v) = param.split_once('=')?;
            k.trim().eq_ignore_ascii_case("boundary").then(|| v.trim().trim_matches('"').to_string())
        })
        .filter(|b| !b.is_empty() && b.len() <= 200)
}

/// `application/x-www-form-urlencoded`, percent-decoded incrementally. Each
/// field is emitted as `name=value` so assignment rules see the name.
#[derive(Default)]
pub(crate) struct FormParser {
    name: Vec<u8>,
    /// The name, whole, when it outgrew [`MAX_NAME`]: scanned as text.
    long_name: bool,
    in_value: bool,
    /// A `%` escape split across chunks.
    pending: Vec<u8>,
    out: Vec<u8>,
}

impl FormParser {
    fn feed(&mut self, data: &[u8], sink: &mut impl Emit) {
        for &b in data {
            if !self.pending.is_empty() {
                self.pending.push(b);
                if self.pending.len() == 3 {
                    let decoded = match (hex_val(self.pending.get(1)), hex_val(self.pending.get(2))) {
                        (Some(h), Some(l)) => vec![h << 4 | l],
                        _ => std::mem::take(&mut self.pending),
                    };
                    self.pending.clear();
                    for d in decoded {
                        self.push(d, sink);
                    }
                }
                continue;
            }
            match b {
                b'%' => self.pending.push(b),
                b'&' => self.end_field(sink),
                b'=' if !self.in_value => {
                    self.in_value = true;
                    let path = format!("form.{}", String::from_utf8_lossy(&self.name));
                    sink.begin(&path);
                    self.out.extend_from_slice(&self.name);
                    self.out.push(b'=');
                }
                b'+' => self.push(b' ', sink),
                _ => self.push(b, sink),
            }
        }
        self.flush(sink);
    }

    fn push(&mut self, b: u8, sink: &mut impl Emit) {
        if self.in_value {
            self.out.push(b);
            if self.out.len() >= 8192 {
                self.flush(sink);
            }
        } else if self.name.len() < MAX_NAME {
            self.name.push(b);
        } else {
            // A name this long is content, not a name: scan it.
            if !self.long_name {
                self.long_name = true;
                sink.begin("form");
                sink.data(&self.name);
            }
            sink.data(&[b]);
        }
    }

    fn flush(&mut self, sink: &mut impl Emit) {
        if !self.out.is_empty() {
            sink.data(&self.out);
            self.out.clear();
        }
    }

    fn end_field(&mut self, sink: &mut impl Emit) {
        if !self.in_value && !self.name.is_empty() && !self.long_name {
            // A bare field (`?token`) may itself be the secret.
            sink.begin("form");
            self.out.extend_from_slice(&self.name);
        }
        self.flush(sink);
        self.name.clear();
        self.long_name = false;
        self.in_value = false;
    }

    fn finish(&mut self, sink: &mut impl Emit) {
        let pending = std::mem::take(&mut self.pending);
        for b in pending {
            self.push(b, sink);
        }
        self.end_field(sink);
    }
}
