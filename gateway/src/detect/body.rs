//! Streaming body scanning: undo `Content-Encoding`, interpret the content
//! type (JSON, urlencoded and multipart forms) and scan the decoded text.
//!
//! Everything is incremental: compressed input goes through streaming
//! decoders whose output is parsed and scanned as it is produced, so a body is
//! never held in memory, and decoded output beyond [`BodyLimits::max_decoded`]
//! is not scanned (which also defuses decompression bombs).

use std::{collections::VecDeque, io::Write, sync::Arc};

use http::HeaderMap;

use super::{
    http_scan::{hex_val, Hit, Location},
    json::JsonLexer,
    multipart::MultipartParser,
    DetectConfig, Detector, StreamScanner,
};

/// Bounds on body scanning.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Decoded bytes scanned per body; the rest is ignored.
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

/// How much of a body was scanned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyStatus {
    /// Everything fed so far was decoded and scanned.
    Complete,
    /// The decoded size passed [`BodyLimits::max_decoded`]; the rest was not scanned.
    Truncated,
    /// A content decoder failed; what was decoded before was scanned.
    DecodeError(String),
}

/// Receives decoded text from a content parser: `begin` starts a field named
/// by its location path, `data` continues it.
pub(crate) trait Emit {
    fn begin(&mut self, path: &str);
    fn data(&mut self, bytes: &[u8]);
}

/// Scans a request or response body fed in chunks, as its headers describe it.
pub struct BodyScanner {
    stage: Stage,
    status: BodyStatus,
}

impl std::fmt::Debug for BodyScanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyScanner").field("status", &self.status).finish()
    }
}

impl BodyScanner {
    /// A scanner for a body with these headers (`Content-Encoding`, `Content-Type`).
    pub fn new(detector: Arc<Detector>, headers: &HeaderMap, limits: BodyLimits) -> Self {
        let content_type =
            headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let sink = Sink {
            parser: Parser::for_content_type(&content_type),
            segments: Segments::new(detector),
            decoded: 0,
            limit: limits.max_decoded,
            truncated: false,
        };
        let mut stage = Stage::Sink(Box::new(sink));
        // Encodings are listed in the order applied; undo the last one first,
        // so it ends up outermost.
        let encodings: Vec<String> = headers
            .get_all(http::header::CONTENT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|e| e.trim().to_ascii_lowercase())
            .filter(|e| !e.is_empty() && e != "identity")
            .collect();
        let mut status = BodyStatus::Complete;
        for enc in encodings {
            stage = match enc.as_str() {
                "gzip" | "x-gzip" => Stage::Gzip(Box::new(flate2::write::GzDecoder::new(stage))),
                "deflate" => Stage::Deflate(Box::new(DeflateAuto::Undecided(Vec::new(), Some(stage)))),
                "br" => Stage::Brotli(Box::new(brotli::DecompressorWriter::new(stage, 16 * 1024))),
                other => {
                    // Unknown encodings are scanned as they are: better than nothing.
                    status = BodyStatus::DecodeError(format!("unsupported content-encoding `{other}`"));
                    stage
                }
            };
        }
        Self { stage, status }
    }

    /// Feeds the next chunk of the (encoded) body.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<Hit> {
        if self.accepting() {
            if let Err(e) = self.stage.write_all(chunk) {
                self.fail(e);
            }
        }
        std::mem::take(&mut self.stage.sink_mut().segments.hits)
    }

    /// Ends the body: flushes decoders and reports what was held back.
    pub fn finish(&mut self) -> Vec<Hit> {
        if self.accepting() {
            if let Err(e) = self.stage.finish() {
                self.fail(e);
            }
        }
        let sink = self.stage.sink_mut();
        sink.parser.finish(&mut sink.segments);
        sink.segments.finish();
        std::mem::take(&mut sink.segments.hits)
    }

    /// Whether everything was scanned.
    pub fn status(&self) -> BodyStatus {
        if matches!(self.status, BodyStatus::Complete) && self.stage.sink().truncated {
            return BodyStatus::Truncated;
        }
        self.status.clone()
    }

    /// Decoded bytes scanned so far.
    pub fn decoded_bytes(&self) -> usize {
        self.stage.sink().decoded
    }

    fn accepting(&self) -> bool {
        !self.stage.sink().truncated && !matches!(self.status, BodyStatus::DecodeError(_))
    }

    fn fail(&mut self, e: std::io::Error) {
        if !self.stage.sink().truncated {
            self.status = BodyStatus::DecodeError(e.to_string());
        }
    }
}

/// A decoding pipeline stage; the innermost is the [`Sink`].
enum Stage {
    Sink(Box<Sink>),
    Gzip(Box<flate2::write::GzDecoder<Stage>>),
    Deflate(Box<DeflateAuto>),
    Brotli(Box<brotli::DecompressorWriter<Stage>>),
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

impl Stage {
    fn sink(&self) -> &Sink {
        let mut stage = self;
        loop {
            stage = match stage {
                Stage::Sink(s) => return s,
                Stage::Gzip(d) => d.get_ref(),
                Stage::Brotli(d) => d.get_ref(),
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
            Stage::Deflate(d) => match d.next_mut() {
                Some(next) => next.sink_mut(),
                None => unreachable!("deflate stage without a successor"),
            },
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
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stage::Sink(_) => Ok(()),
            Stage::Gzip(d) => d.flush(),
            Stage::Deflate(d) => d.flush(),
            Stage::Brotli(d) => d.flush(),
        }
    }
}

/// Decoded bytes arrive here: counted against the limit, parsed, scanned.
struct Sink {
    parser: Parser,
    segments: Segments,
    decoded: usize,
    limit: usize,
    truncated: bool,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.limit.saturating_sub(self.decoded);
        let take = buf.len().min(room);
        self.decoded += take;
        self.parser.feed(&buf[..take], &mut self.segments);
        if take < buf.len() {
            self.truncated = true;
            // Stops the decoders: decompressing further would be wasted work.
            return Err(std::io::Error::other("decoded body limit reached"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Content-type specific parsing of decoded bytes.
enum Parser {
    Raw { started: bool },
    Json(Box<JsonLexer>),
    Form(FormParser),
    Multipart(Box<MultipartParser>),
}

impl Parser {
    fn for_content_type(content_type: &str) -> Parser {
        let lower = content_type.to_ascii_lowercase();
        let essence = lower.split(';').next().unwrap_or("").trim();
        if essence == "application/json" || essence.ends_with("+json") || essence == "application/x-ndjson" {
            Parser::Json(Box::default())
        } else if essence == "application/x-www-form-urlencoded" {
            Parser::Form(FormParser::default())
        } else if essence == "multipart/form-data" || essence == "multipart/mixed" {
            match multipart_boundary(content_type) {
                Some(b) => Parser::Multipart(Box::new(MultipartParser::new(&b))),
                None => Parser::Raw { started: false },
            }
        } else {
            Parser::Raw { started: false }
        }
    }

    fn feed(&mut self, data: &[u8], out: &mut Segments) {
        match self {
            Parser::Raw { started } => {
                if !*started {
                    out.begin("");
                    *started = true;
                }
                out.data(data);
            }
            Parser::Json(lexer) => {
                if let Err(rest) = lexer.feed(data, out) {
                    // Not JSON after all: scan the rest as it is.
                    *self = Parser::Raw { started: false };
                    self.feed(&data[rest..], out);
                }
            }
            Parser::Form(form) => form.feed(data, out),
            Parser::Multipart(mp) => mp.feed(data, out),
        }
    }

    fn finish(&mut self, out: &mut Segments) {
        match self {
            Parser::Form(form) => form.finish(out),
            Parser::Json(lexer) => lexer.finish(out),
            Parser::Multipart(mp) => mp.finish(out),
            Parser::Raw { .. } => {}
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

/// Decoded text of all fields in one stream, with where each field starts,
/// so that secrets split across chunks are still found and each detection is
/// attributed to its field.
struct Segments {
    scanner: StreamScanner,
    /// `(absolute start, location path)` of recent fields.
    marks: VecDeque<(u64, Arc<str>)>,
    hits: Vec<Hit>,
}

impl Segments {
    fn new(detector: Arc<Detector>) -> Self {
        Self { scanner: detector.stream(), marks: VecDeque::new(), hits: Vec::new() }
    }

    fn location(&self, offset: u64) -> Location {
        let idx = self.marks.partition_point(|(start, _)| *start <= offset);
        let path = idx.checked_sub(1).and_then(|i| self.marks.get(i)).map_or("", |(_, p)| &**p);
        Location::Body(path.to_string())
    }

    fn collect(&mut self, detections: Vec<super::Detection>) {
        for detection in detections {
            let location = self.location(detection.start);
            self.hits.push(Hit { detection, location });
        }
        // Marks before the scanner's retained tail can no longer be needed, but
        // the one covering its first byte still is.
        let keep = self.scanner.retained_from();
        while self.marks.len() > 1 && self.marks[1].0 <= keep {
            self.marks.pop_front();
        }
    }

    fn finish(&mut self) {
        let d = self.scanner.finish();
        self.collect(d);
    }
}

impl Emit for Segments {
    fn begin(&mut self, path: &str) {
        // A separator keeps fields from running into each other.
        if self.scanner.offset() > 0 {
            let d = self.scanner.feed(b"\n");
            self.collect(d);
        }
        self.marks.push_back((self.scanner.offset(), Arc::from(path)));
    }

    fn data(&mut self, bytes: &[u8]) {
        let d = self.scanner.feed(bytes);
        self.collect(d);
    }
}

/// Longest field name kept for locations.
pub(crate) const MAX_NAME: usize = 256;

/// `application/x-www-form-urlencoded`, percent-decoded incrementally. Each
/// field is emitted as `name=value` so assignment rules see the name.
#[derive(Default)]
struct FormParser {
    name: Vec<u8>,
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
        }
    }

    fn flush(&mut self, sink: &mut impl Emit) {
        if !self.out.is_empty() {
            sink.data(&self.out);
            self.out.clear();
        }
    }

    fn end_field(&mut self, sink: &mut impl Emit) {
        if !self.in_value && !self.name.is_empty() {
            // A bare field (`?token`) may itself be the secret.
            sink.begin("form");
            self.out.extend_from_slice(&self.name);
        }
        self.flush(sink);
        self.name.clear();
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
