//! Length-prefixed message framing: gRPC, gRPC-web (binary; the text form is
//! base64 around it) and Connect streaming. Each frame is a flags byte, a
//! 32-bit big-endian length and the message; a message flagged compressed
//! is decompressed with the message encoding its headers name
//! (`grpc-encoding`, `connect-content-encoding`: gzip, deflate, zstd), then
//! scanned whole by [`payload`](super::payload) — protobuf walked
//! generically, JSON unescaped — under location `grpc[N]` (`grpc-web[N]`,
//! `connect[N]`). gRPC-web trailers and Connect end-of-stream messages are
//! scanned too. Reserved flag bits, a compressed message without a known
//! encoding and a truncated frame make the body uninspectable.

use std::io::Read;

use super::{
    collect::{Collector, Emit},
    status::{bounded_name, EncodingLayer, Format, Uninspectable},
};

/// Which framing a body uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// `application/grpc[+proto|+json…]`.
    Grpc,
    /// `application/grpc-web[+proto]` (and the decoded text variant).
    GrpcWeb,
    /// `application/connect+proto|json` streaming.
    Connect,
}

impl Framing {
    fn format(self) -> Format {
        match self {
            Framing::Grpc => Format::Grpc,
            Framing::GrpcWeb => Format::GrpcWeb,
            Framing::Connect => Format::Connect,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Framing::Grpc => "grpc",
            Framing::GrpcWeb => "grpc-web",
            Framing::Connect => "connect",
        }
    }

    /// Flag bits this framing defines.
    fn known_flags(self) -> u8 {
        match self {
            Framing::Grpc => 0x01,
            Framing::GrpcWeb => 0x81,
            Framing::Connect => 0x03,
        }
    }
}

/// A per-message compression.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Codec {
    Identity,
    Gzip,
    Deflate,
    Zstd,
    Unknown(String),
}

impl Codec {
    fn named(name: &str) -> Codec {
        match name.trim().to_ascii_lowercase().as_str() {
            "" | "identity" => Codec::Identity,
            "gzip" | "x-gzip" => Codec::Gzip,
            "deflate" => Codec::Deflate,
            "zstd" => Codec::Zstd,
            other => Codec::Unknown(bounded_name(other)),
        }
    }

    /// Decompresses one message, reading at most `room + 1` bytes so an
    /// oversize result is noticed without being produced.
    fn decode(&self, data: &[u8], room: usize) -> Result<Vec<u8>, String> {
        let cap = room as u64 + 1;
        let mut out = Vec::new();
        let result = match self {
            Codec::Gzip => flate2::read::MultiGzDecoder::new(data).take(cap).read_to_end(&mut out),
            Codec::Deflate => {
                let zlib =
                    data.len() >= 2 && data[0] & 0x0f == 8 && (u16::from(data[0]) << 8 | u16::from(data[1])) % 31 == 0;
                if zlib {
                    flate2::read::ZlibDecoder::new(data).take(cap).read_to_end(&mut out)
                } else {
                    flate2::read::DeflateDecoder::new(data).take(cap).read_to_end(&mut out)
                }
            }
            Codec::Zstd => zstd::stream::read::Decoder::new(data).and_then(|d| d.take(cap).read_to_end(&mut out)),
            Codec::Identity | Codec::Unknown(_) => return Err("no compression named".into()),
        };
        result.map_err(|e| e.to_string())?;
        Ok(out)
    }

    fn name(&self) -> &str {
        match self {
            Codec::Identity => "identity",
            Codec::Gzip => "gzip",
            Codec::Deflate => "deflate",
            Codec::Zstd => "zstd",
            Codec::Unknown(name) => name,
        }
    }
}

/// See the module documentation.
pub(crate) struct Framer {
    framing: Framing,
    codec: Codec,
    head: Vec<u8>,
    message: Vec<u8>,
    /// Length of the current message, once its head is read.
    want: Option<(u8, usize)>,
    index: u64,
    /// After an oversize frame: the rest is scanned as plain bytes.
    raw: bool,
}

impl Framer {
    pub(crate) fn new(framing: Framing, message_encoding: &str, _out: &mut Collector) -> Self {
        Self {
            framing,
            codec: Codec::named(message_encoding),
            head: Vec::with_capacity(5),
            message: Vec::new(),
            want: None,
            index: 0,
            raw: false,
        }
    }

    pub(crate) fn feed(&mut self, mut data: &[u8], out: &mut Collector) {
        while !data.is_empty() {
            if self.raw {
                out.data(data);
                return;
            }
            match self.want {
                None => {
                    let take = (5 - self.head.len()).min(data.len());
                    self.head.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.head.len() == 5 {
                        let flags = self.head[0];
                        let len = u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]) as usize;
                        self.head.clear();
                        if flags & !self.framing.known_flags() != 0 {
                            self.malformed(&format!("reserved flag bits 0x{flags:02x}"), out);
                            continue;
                        }
                        if len > out.budget.limit {
                            out.fail(Uninspectable::TooLarge { limit: out.budget.limit });
                            self.malformed_raw(out);
                            continue;
                        }
                        self.want = Some((flags, len));
                        if len == 0 {
                            self.message_done(out);
                        }
                    }
                }
                Some((_, len)) => {
                    let take = (len - self.message.len()).min(data.len());
                    self.message.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.message.len() == len {
                        self.message_done(out);
                    }
                }
            }
        }
    }

    pub(crate) fn finish(&mut self, out: &mut Collector) {
        if self.raw {
            return;
        }
        if !self.head.is_empty() || self.want.is_some() {
            out.fail(Uninspectable::Malformed { format: self.framing.format(), reason: "truncated frame".into() });
            let partial = std::mem::take(&mut self.message);
            let head = std::mem::take(&mut self.head);
            out.payload(&[head, partial].concat(), &format!("{}[{}]", self.framing.name(), self.index));
        }
    }

    fn malformed(&mut self, reason: &str, out: &mut Collector) {
        out.fail(Uninspectable::Malformed { format: self.framing.format(), reason: reason.to_string() });
        self.malformed_raw(out);
    }

    /// Framing lost: the rest of the body is scanned as it is.
    fn malformed_raw(&mut self, out: &mut Collector) {
        self.raw = true;
        out.begin(self.framing.name());
    }

    fn message_done(&mut self, out: &mut Collector) {
        let Some((flags, _)) = self.want.take() else { return };
        let message = std::mem::take(&mut self.message);
        let path = match (self.framing, flags) {
            (Framing::GrpcWeb, f) if f & 0x80 != 0 => "grpc-web.trailers".to_string(),
            (Framing::Connect, f) if f & 0x02 != 0 => "connect.end".to_string(),
            (framing, _) => format!("{}[{}]", framing.name(), self.index),
        };
        self.index += 1;
        if flags & 0x01 == 0 {
            out.payload(&message, &path);
            return;
        }
        if matches!(self.codec, Codec::Identity | Codec::Unknown(_)) {
            out.fail(Uninspectable::UnknownEncoding {
                layer: EncodingLayer::Message,
                name: self.codec.name().to_string(),
            });
            out.payload(&message, &path);
            return;
        }
        let room = out.budget.limit.saturating_sub(out.budget.used);
        match self.codec.decode(&message, room) {
            Ok(plain) => {
                let take = out.charge_partial(plain.len());
                out.payload(&plain[..take], &path);
            }
            Err(reason) => {
                out.fail(Uninspectable::DecodeError { encoding: self.codec.name().to_string(), reason });
                out.payload(&message, &path);
            }
        }
    }
}
