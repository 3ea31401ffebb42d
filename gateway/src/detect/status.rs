//! Whether everything a scanner was fed was understood: the fail-closed
//! contract between the scanners and the gate.
//!
//! A scanner that meets something it cannot decode does not guess: it keeps
//! scanning what it can (findings are still worth having) but its
//! [`ScanStatus`] turns [`Uninspectable`] for good, with the first reason.
//! The gate refuses the message unless the operator opted the destination
//! out of inspection.

use std::fmt;

/// What a scanner can say about everything fed to it so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanStatus {
    /// Every byte fed so far was decoded and scanned.
    Complete,
    /// Some bytes could not be inspected; forwarding them would be blind.
    Uninspectable(Uninspectable),
}

impl ScanStatus {
    /// Whether everything so far was inspected.
    pub fn is_complete(&self) -> bool {
        matches!(self, ScanStatus::Complete)
    }
}

/// Why (part of) a message could not be inspected. The first reason met is
/// kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Uninspectable {
    /// A content, transfer or message encoding the scanner does not decode
    /// (`Content-Encoding: foo`, `grpc-encoding: snappy`,
    /// `Content-Transfer-Encoding: x-uuencode`, an unnegotiated WebSocket
    /// extension).
    #[error("unknown {layer} `{name}`")]
    UnknownEncoding {
        /// Which header or mechanism named it.
        layer: EncodingLayer,
        /// The encoding as named (lowercased, at most 64 bytes).
        name: String,
    },
    /// Bytes that claim an encoding but do not decode (not gzip at all,
    /// garbage after the compressed stream, truncated data).
    #[error("cannot decode {encoding}: {reason}")]
    DecodeError {
        /// The encoding.
        encoding: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// Decoded bytes passed the configured limit (`detect.max_decoded_body`);
    /// the rest was not scanned.
    #[error("decoded data exceeds the {limit}-byte inspection limit")]
    TooLarge {
        /// The limit, in decoded bytes.
        limit: usize,
    },
    /// A framing the scanner parses was violated (a truncated gRPC frame, a
    /// WebSocket frame with reserved bits set, a multipart body that never
    /// reaches its first boundary).
    #[error("malformed {format}: {reason}")]
    Malformed {
        /// The framing.
        format: Format,
        /// What is wrong.
        reason: String,
    },
}

/// Where an encoding was named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EncodingLayer {
    /// `Content-Encoding`.
    Content,
    /// A multipart part's `Content-Transfer-Encoding`.
    Transfer,
    /// gRPC / Connect per-message compression (`grpc-encoding`,
    /// `connect-content-encoding`).
    Message,
    /// A WebSocket extension or compression not negotiated.
    WebSocketExtension,
}

impl fmt::Display for EncodingLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EncodingLayer::Content => "content-encoding",
            EncodingLayer::Transfer => "content-transfer-encoding",
            EncodingLayer::Message => "message encoding",
            EncodingLayer::WebSocketExtension => "websocket extension",
        })
    }
}

/// A framing the scanners parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// gRPC length-prefixed messages.
    Grpc,
    /// gRPC-web (binary or base64 text).
    GrpcWeb,
    /// Connect streaming envelopes.
    Connect,
    /// `multipart/*` bodies.
    Multipart,
    /// RFC 6455 frames.
    WebSocket,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Grpc => "gRPC framing",
            Format::GrpcWeb => "gRPC-web framing",
            Format::Connect => "Connect framing",
            Format::Multipart => "multipart body",
            Format::WebSocket => "WebSocket framing",
        })
    }
}

/// Trims an attacker-chosen name for storage in a status.
pub(crate) fn bounded_name(name: &str) -> String {
    let mut out: String = name.chars().filter(|c| !c.is_control()).collect();
    while out.len() > 64 {
        out.pop();
    }
    out
}
