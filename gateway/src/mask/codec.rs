//! Response bodies: undo the content encoding, mask the plaintext stream and
//! encode it again, chunk by chunk.
//!
//! Decoders write their output straight into the masking window and the
//! window's output straight into the encoder, so neither the compressed nor
//! the decoded body is ever held whole: memory stays at the window plus one
//! decoder buffer whatever the body expands to. Each push ends with a flush of
//! the encoder (gzip and deflate: sync flush; brotli: `BROTLI_OPERATION_FLUSH`),
//! so what a push returns decodes, together with what came before, to the
//! masked text released so far, and streamed responses keep streaming.

use std::{
    io::{self, Write},
    sync::Arc,
};

use bytes::{Bytes, BytesMut};
use flate2::{
    write::{DeflateDecoder, GzEncoder, MultiGzDecoder, ZlibDecoder, ZlibEncoder},
    Compression,
};

use super::{plain::PlainMasker, MaskError, Masked, Masker};

/// Decoded bytes always accepted, whatever the compression ratio.
const EXPANSION_SLACK: u64 = 64 << 20;
/// Beyond [`EXPANSION_SLACK`], most decoded bytes per encoded byte (deflate
/// cannot exceed about 1032:1; brotli can, which is how its bombs work).
const MAX_EXPANSION: u64 = 1024;
/// Brotli output quality: fast, as the body is recompressed in the data path.
const BROTLI_QUALITY: u32 = 4;
/// Brotli window (log2), as in common servers.
const BROTLI_LGWIN: u32 = 22;
const BROTLI_BUFFER: usize = 16 * 1024;

/// The content encodings a [`BodyMasker`] handles, as an `Accept-Encoding`
/// value (for requests whose responses will be masked).
pub fn supported_encodings() -> &'static str {
    "gzip, deflate, br"
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
}

impl Encoding {
    fn parse(header: Option<&str>) -> Result<Self, MaskError> {
        let codings: Vec<String> = header
            .unwrap_or("")
            .split(',')
            .map(|c| c.trim().to_ascii_lowercase())
            .filter(|c| !c.is_empty() && c != "identity")
            .collect();
        match codings.as_slice() {
            [] => Ok(Encoding::Identity),
            [one] => match one.as_str() {
                "gzip" | "x-gzip" => Ok(Encoding::Gzip),
                "deflate" => Ok(Encoding::Deflate),
                "br" => Ok(Encoding::Brotli),
                other => Err(MaskError::UnsupportedEncoding(other.to_string())),
            },
            // Stacked encodings are legal but rare; refusing them is safe.
            many => Err(MaskError::UnsupportedEncoding(many.join(", "))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Gzip => "gzip",
            Encoding::Deflate => "deflate",
            Encoding::Brotli => "br",
        }
    }
}

/// Masks one response body fed in chunks, keeping its content encoding.
///
/// Any error is final: later calls return [`MaskError::Closed`], and the
/// caller must abort the response rather than pass unmasked bytes on.
pub struct BodyMasker {
    encoding: Encoding,
    pipe: Pipe,
    /// Encoded bytes received.
    received: u64,
    open: bool,
}

impl std::fmt::Debug for BodyMasker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyMasker")
            .field("encoding", &self.encoding.name())
            .field("received", &self.received)
            .field("open", &self.open)
            .finish()
    }
}

enum Pipe {
    Identity {
        masker: Arc<Masker>,
        plain: Box<PlainMasker>,
        out: BytesMut,
    },
    Gzip(Box<MultiGzDecoder<Reencode>>),
    /// `deflate` should be zlib-wrapped but raw deflate is common: the first
    /// two bytes tell which.
    DeflateHead(Vec<u8>, Option<Box<Reencode>>),
    Zlib(Box<ZlibDecoder<Reencode>>),
    RawDeflate(Box<DeflateDecoder<Reencode>>),
    Brotli(Box<brotli::DecompressorWriter<Reencode>>),
}

impl BodyMasker {
    pub(crate) fn new(masker: Arc<Masker>, content_encoding: Option<&str>) -> Result<Self, MaskError> {
        let encoding = Encoding::parse(content_encoding)?;
        let sink = |encoder| Reencode {
            masker: Arc::clone(&masker),
            plain: PlainMasker::new(&masker, true),
            encoder,
            scratch: BytesMut::new(),
            decoded: 0,
            received: 0,
            dirty: false,
            failure: None,
            encoding,
            slack: EXPANSION_SLACK,
            ratio: MAX_EXPANSION,
        };
        let pipe = match encoding {
            Encoding::Identity => Pipe::Identity {
                masker: Arc::clone(&masker),
                plain: Box::new(PlainMasker::new(&masker, true)),
                out: BytesMut::new(),
            },
            Encoding::Gzip => Pipe::Gzip(Box::new(MultiGzDecoder::new(sink(Encoder::Gzip(GzEncoder::new(
                Vec::new(),
                Compression::fast(),
            )))))),
            Encoding::Deflate => Pipe::DeflateHead(
                Vec::with_capacity(2),
                Some(Box::new(sink(Encoder::Zlib(ZlibEncoder::new(Vec::new(), Compression::fast()))))),
            ),
            Encoding::Brotli => Pipe::Brotli(Box::new(brotli::DecompressorWriter::new(
                sink(Encoder::Brotli(Some(Box::new(brotli::CompressorWriter::new(
                    Vec::new(),
                    BROTLI_BUFFER,
                    BROTLI_QUALITY,
                    BROTLI_LGWIN,
                ))))),
                BROTLI_BUFFER,
            ))),
        };
        Ok(Self { encoding, pipe, received: 0, open: true })
    }

    /// Masks the next chunk of the (encoded) body; returns the (encoded)
    /// bytes to send now, possibly none.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Bytes, MaskError> {
        if !self.open {
            return Err(MaskError::Closed);
        }
        self.received += chunk.len() as u64;
        let result = self.push_inner(chunk);
        self.open = result.is_ok();
        result
    }

    /// Ends the body: returns the held-back rest and the encoding's trailer.
    /// A truncated compressed body is an error.
    pub fn finish(&mut self) -> Result<Bytes, MaskError> {
        if !self.open {
            return Err(MaskError::Closed);
        }
        self.open = false;
        if self.received == 0 {
            // A HEAD or 304 response declares an encoding but has no body,
            // and neither has an empty body of any encoding.
            return Ok(Bytes::new());
        }
        self.finish_inner()
    }

    /// Replacements made since the last call (at most 1024 are kept between
    /// calls; [`masked_count`](Self::masked_count) counts them all).
    pub fn take_masked(&mut self) -> Vec<Masked> {
        match &mut self.pipe {
            Pipe::Identity { plain, .. } => plain.log.take(),
            _ => self.sink_mut().map_or_else(Vec::new, |s| s.plain.log.take()),
        }
    }

    /// Number of replacements made so far.
    pub fn masked_count(&self) -> u64 {
        match &self.pipe {
            Pipe::Identity { plain, .. } => plain.log.total(),
            Pipe::Gzip(d) => d.get_ref().plain.log.total(),
            Pipe::DeflateHead(_, s) => s.as_ref().map_or(0, |s| s.plain.log.total()),
            Pipe::Zlib(d) => d.get_ref().plain.log.total(),
            Pipe::RawDeflate(d) => d.get_ref().plain.log.total(),
            Pipe::Brotli(d) => d.get_ref().plain.log.total(),
        }
    }

    /// Lower expansion limits, to test them without huge bodies.
    #[cfg(test)]
    pub(crate) fn with_expansion_limit(mut self, slack: u64, ratio: u64) -> Self {
        if let Some(sink) = self.sink_mut() {
            sink.slack = slack;
            sink.ratio = ratio;
        }
        self
    }

    /// Plaintext bytes the window holds.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        match &self.pipe {
            Pipe::Identity { plain, .. } => plain.held(),
            Pipe::Gzip(d) => d.get_ref().plain.held(),
            Pipe::DeflateHead(_, s) => s.as_ref().map_or(0, |s| s.plain.held()),
            Pipe::Zlib(d) => d.get_ref().plain.held(),
            Pipe::RawDeflate(d) => d.get_ref().plain.held(),
            Pipe::Brotli(d) => d.get_ref().plain.held(),
        }
    }

    fn push_inner(&mut self, chunk: &[u8]) -> Result<Bytes, MaskError> {
        if let Pipe::DeflateHead(head, sink) = &mut self.pipe {
            let take = chunk.len().min(2usize.saturating_sub(head.len()));
            head.extend_from_slice(&chunk[..take]);
            if head.len() < 2 {
                return Ok(Bytes::new());
            }
            let mut rest = std::mem::take(head);
            let sink = sink.take().ok_or(MaskError::Closed)?;
            self.pipe = if is_zlib_header(&rest) {
                Pipe::Zlib(Box::new(ZlibDecoder::new(*sink)))
            } else {
                Pipe::RawDeflate(Box::new(DeflateDecoder::new(*sink)))
            };
            rest.extend_from_slice(&chunk[take..]);
            return self.push_inner(&rest);
        }
        let encoding = self.encoding;
        if let Some(sink) = self.sink_mut() {
            sink.received += chunk.len() as u64;
        }
        let written = match &mut self.pipe {
            Pipe::Identity { masker, plain, out } => {
                plain.push(masker, chunk, out);
                return Ok(out.split().freeze());
            }
            Pipe::Gzip(d) => d.write_all(chunk).and_then(|()| d.flush()),
            Pipe::Zlib(d) => d.write_all(chunk).and_then(|()| d.flush()),
            Pipe::RawDeflate(d) => d.write_all(chunk).and_then(|()| d.flush()),
            Pipe::Brotli(d) => d.write_all(chunk).and_then(|()| d.flush()),
            Pipe::DeflateHead(..) => return Err(MaskError::Closed),
        };
        self.take_output(written, encoding)
    }

    fn finish_inner(&mut self) -> Result<Bytes, MaskError> {
        let encoding = self.encoding;
        let finished = match &mut self.pipe {
            Pipe::Identity { masker, plain, out } => {
                plain.finish(masker, out);
                return Ok(out.split().freeze());
            }
            Pipe::Gzip(d) => d.try_finish(),
            Pipe::Zlib(d) => d.try_finish(),
            Pipe::RawDeflate(d) => d.try_finish(),
            Pipe::Brotli(d) => d.close(),
            Pipe::DeflateHead(..) => {
                Err(io::Error::new(io::ErrorKind::UnexpectedEof, "body ends inside the deflate header"))
            }
        };
        let sink = self.decode_result(finished, encoding)?;
        sink.finish()
    }

    /// After data went into the decoder: the encoder's output so far.
    fn take_output(&mut self, written: io::Result<()>, encoding: Encoding) -> Result<Bytes, MaskError> {
        let sink = self.decode_result(written, encoding)?;
        sink.flush_output()
    }

    /// The sink, or the error that stopped the pipeline (the sink's own
    /// failure first: a decoder reports it only as an I/O error).
    fn decode_result(&mut self, result: io::Result<()>, encoding: Encoding) -> Result<&mut Reencode, MaskError> {
        let sink = self.sink_mut().ok_or(MaskError::Closed)?;
        if let Some(failure) = sink.failure.take() {
            return Err(failure);
        }
        result.map_err(|e| MaskError::Decode { encoding: encoding.name(), reason: e.to_string() })?;
        Ok(sink)
    }

    fn sink_mut(&mut self) -> Option<&mut Reencode> {
        match &mut self.pipe {
            Pipe::Identity { .. } => None,
            Pipe::Gzip(d) => Some(d.get_mut()),
            Pipe::DeflateHead(_, s) => s.as_deref_mut(),
            Pipe::Zlib(d) => Some(d.get_mut()),
            Pipe::RawDeflate(d) => Some(d.get_mut()),
            Pipe::Brotli(d) => Some(d.get_mut()),
        }
    }
}

fn is_zlib_header(head: &[u8]) -> bool {
    head.len() >= 2 && head[0] & 0x0f == 8 && (u16::from(head[0]) << 8 | u16::from(head[1])) % 31 == 0
}

/// The re-encoder.
enum Encoder {
    Gzip(GzEncoder<Vec<u8>>),
    Zlib(ZlibEncoder<Vec<u8>>),
    /// Taken out to finish the stream (brotli finishes only by consuming it).
    Brotli(Option<Box<brotli::CompressorWriter<Vec<u8>>>>),
}

impl Encoder {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.write_all(data),
            Encoder::Zlib(e) => e.write_all(data),
            Encoder::Brotli(Some(e)) => e.write_all(data),
            Encoder::Brotli(None) => Err(io::Error::other("encoder already finished")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zlib(e) => e.flush(),
            Encoder::Brotli(Some(e)) => e.flush(),
            Encoder::Brotli(None) => Ok(()),
        }
    }

    /// Ends the compressed stream; returns the output not yet taken.
    fn finish(&mut self) -> io::Result<Vec<u8>> {
        match self {
            Encoder::Gzip(e) => {
                e.try_finish()?;
                Ok(std::mem::take(e.get_mut()))
            }
            Encoder::Zlib(e) => {
                e.try_finish()?;
                Ok(std::mem::take(e.get_mut()))
            }
            Encoder::Brotli(e) => match e.take() {
                Some(e) => Ok(e.into_inner()),
                None => Ok(Vec::new()),
            },
        }
    }

    fn output(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            Encoder::Gzip(e) => Some(e.get_mut()),
            Encoder::Zlib(e) => Some(e.get_mut()),
            Encoder::Brotli(Some(e)) => Some(e.get_mut()),
            Encoder::Brotli(None) => None,
        }
    }
}

/// Where a decoder writes: masks the plaintext and feeds the encoder.
struct Reencode {
    masker: Arc<Masker>,
    plain: PlainMasker,
    encoder: Encoder,
    /// Masked plaintext on its way to the encoder (reused).
    scratch: BytesMut,
    /// Plaintext bytes decoded so far.
    decoded: u64,
    /// Encoded bytes received so far.
    received: u64,
    /// Whether the encoder got data since its last flush.
    dirty: bool,
    failure: Option<MaskError>,
    encoding: Encoding,
    /// Decoded bytes always accepted.
    slack: u64,
    /// Beyond `slack`, most decoded bytes per encoded byte.
    ratio: u64,
}

impl Reencode {
    fn encode_scratch(&mut self) -> Result<(), MaskError> {
        if self.scratch.is_empty() {
            return Ok(());
        }
        self.dirty = true;
        let result = self.encoder.write_all(&self.scratch);
        self.scratch.clear();
        result.map_err(|e| self.encode_error(e))
    }

    fn encode_error(&self, e: io::Error) -> MaskError {
        MaskError::Encode { encoding: self.encoding.name(), reason: e.to_string() }
    }

    /// Flushes the encoder if it has new data and takes its output.
    fn flush_output(&mut self) -> Result<Bytes, MaskError> {
        if self.dirty {
            self.dirty = false;
            self.encoder.flush().map_err(|e| self.encode_error(e))?;
        }
        Ok(match self.encoder.output() {
            Some(buf) if !buf.is_empty() => {
                let bytes = Bytes::copy_from_slice(buf);
                buf.clear();
                bytes
            }
            _ => Bytes::new(),
        })
    }

    fn finish(&mut self) -> Result<Bytes, MaskError> {
        self.plain.finish(&self.masker, &mut self.scratch);
        self.encode_scratch()?;
        let rest = self.encoder.finish().map_err(|e| self.encode_error(e))?;
        Ok(Bytes::from(rest))
    }
}

impl Write for Reencode {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.failure.is_some() {
            return Err(io::Error::other("masking stopped"));
        }
        self.decoded += buf.len() as u64;
        if self.decoded > self.slack && self.decoded > self.received.saturating_mul(self.ratio) {
            self.failure =
                Some(MaskError::Expansion { encoding: self.encoding.name(), ratio: self.ratio, slack: self.slack });
            return Err(io::Error::other("decompression bomb"));
        }
        self.plain.push(&self.masker, buf, &mut self.scratch);
        if let Err(e) = self.encode_scratch() {
            self.failure = Some(e);
            return Err(io::Error::other("re-encoding failed"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
