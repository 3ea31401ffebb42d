//! WebSocket (RFC 6455) scanning of the client-to-server direction after an
//! `Upgrade`: frames are parsed and unmasked, fragmented messages
//! reassembled, `permessage-deflate` (RFC 7692) undone when the handshake
//! negotiated it, and each message — text or binary — scanned whole by
//! [`payload`](super::payload) (JSON, protobuf, base64… as it looks) under
//! location `ws[N]` (N counts data messages from 0); close reasons and ping
//! payloads are scanned too.
//!
//! Whatever cannot be parsed makes the scanner [`Uninspectable`] for good:
//! unmasked client frames, reserved bits without a negotiated extension,
//! unknown opcodes, control frames that are fragmented or too long,
//! continuation frames out of place, messages larger than the limit, and an
//! extension the scanner does not know.

use std::sync::Arc;

use http::HeaderMap;

use super::{
    body::BodyLimits,
    collect::{Collector, Emit},
    http_scan::Hit,
    status::{bounded_name, EncodingLayer, Format, ScanStatus, Uninspectable},
    Detector,
};

/// `permessage-deflate` as negotiated for the client's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// The client resets its compression context for every message.
    pub client_no_context_takeover: bool,
}

/// How the scanner reads a connection, from its handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsConfig {
    /// Compression negotiated for client messages, if any.
    pub permessage_deflate: Option<DeflateParams>,
    /// Largest message (after decompression) scanned; larger ones make the
    /// connection uninspectable.
    pub max_message: usize,
    /// An extension the server accepted that the scanner cannot undo.
    pub unsupported_extension: Option<String>,
}

impl Default for WsConfig {
    fn default() -> Self {
        Self { permessage_deflate: None, max_message: super::DEFAULT_MAX_DECODED_BODY, unsupported_extension: None }
    }
}

impl WsConfig {
    /// The configuration the server's `101 Switching Protocols` response
    /// agreed to (its `Sec-WebSocket-Extensions`), with `limits` bounding
    /// each message.
    pub fn from_handshake(response_headers: &HeaderMap, limits: BodyLimits) -> Self {
        let mut config = WsConfig { max_message: limits.max_decoded, ..WsConfig::default() };
        for value in response_headers.get_all(http::header::SEC_WEBSOCKET_EXTENSIONS) {
            let value = String::from_utf8_lossy(value.as_bytes());
            for extension in value.split(',') {
                let mut params = extension.split(';').map(str::trim);
                let name = params.next().unwrap_or("").to_ascii_lowercase();
                if name.is_empty() {
                    continue;
                }
                if name == "permessage-deflate" && config.permessage_deflate.is_none() {
                    let client_no_context_takeover =
                        params.any(|p| p.eq_ignore_ascii_case("client_no_context_takeover"));
                    config.permessage_deflate = Some(DeflateParams { client_no_context_takeover });
                } else if config.unsupported_extension.is_none() {
                    config.unsupported_extension = Some(bounded_name(&name));
                }
            }
        }
        config
    }
}

/// Largest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL: usize = 125;

#[derive(Debug, Clone, Copy)]
struct FrameHead {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    len: usize,
}

/// Scans the client-to-server bytes of a WebSocket connection.
pub struct WsScanner {
    config: WsConfig,
    out: Collector,
    /// Bytes of an incomplete frame head.
    head: Vec<u8>,
    frame: Option<(FrameHead, usize)>,
    /// The data message being reassembled: opcode, compressed, bytes.
    message: Option<(u8, bool, Vec<u8>)>,
    control: Vec<u8>,
    inflater: Option<flate2::Decompress>,
    index: u64,
    /// Framing lost: the rest is scanned as plain bytes.
    lost: bool,
    /// Bytes fed so far.
    fed: u64,
    /// Bytes fed up to the end of the last whole message (or control frame
    /// outside a message): everything before it was scanned.
    boundary: u64,
}

impl std::fmt::Debug for WsScanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsScanner").field("messages", &self.index).field("status", self.out.status()).finish()
    }
}

impl WsScanner {
    /// A scanner for a connection whose handshake gave `config`.
    pub fn new(detector: Arc<Detector>, config: WsConfig) -> Self {
        let mut out = Collector::new(detector, config.max_message);
        if let Some(name) = &config.unsupported_extension {
            out.fail(Uninspectable::UnknownEncoding { layer: EncodingLayer::WebSocketExtension, name: name.clone() });
        }
        let inflater = config.permessage_deflate.map(|_| flate2::Decompress::new(false));
        Self {
            config,
            out,
            head: Vec::with_capacity(14),
            frame: None,
            message: None,
            control: Vec::new(),
            inflater,
            index: 0,
            lost: false,
            fed: 0,
            boundary: 0,
        }
    }

    /// Feeds client-to-server bytes; returns the hits of messages they completed.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Vec<Hit> {
        while !bytes.is_empty() {
            if self.lost {
                self.out.data(bytes);
                break;
            }
            match self.frame {
                None => {
                    let take = self.head_needed().saturating_sub(self.head.len()).clamp(1, bytes.len());
                    self.head.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    self.fed += take as u64;
                    if self.head.len() >= self.head_needed() {
                        self.start_frame();
                    }
                }
                Some((head, done)) => {
                    let take = (head.len - done).min(bytes.len());
                    self.payload(&bytes[..take], head, done);
                    bytes = &bytes[take..];
                    self.fed += take as u64;
                    self.frame = Some((head, done + take));
                    if done + take == head.len {
                        self.end_frame(head);
                    }
                }
            }
            if !self.lost && self.frame.is_none() && self.head.is_empty() && self.message.is_none() {
                self.boundary = self.fed;
            }
        }
        self.out.take_hits()
    }

    /// How many of the bytes fed so far end at a message boundary: all of
    /// them were scanned as whole messages, so they may be forwarded once
    /// their hits are judged. Bytes of a message still arriving are not.
    pub fn scanned_through(&self) -> u64 {
        self.boundary
    }

    /// The connection ended: a frame or message cut short is scanned as far
    /// as it got and makes the connection uninspectable.
    pub fn finish(&mut self) -> Vec<Hit> {
        if !self.lost && (self.frame.is_some() || !self.head.is_empty() || self.message.is_some()) {
            self.out.fail(Uninspectable::Malformed {
                format: Format::WebSocket,
                reason: "connection ended inside a frame".into(),
            });
            if let Some((_, _, bytes)) = self.message.take() {
                self.out.payload(&bytes, &format!("ws[{}]", self.index));
            }
        }
        self.out.finish();
        self.out.take_hits()
    }

    /// Whether every byte fed so far was understood.
    pub fn status(&self) -> ScanStatus {
        self.out.status().clone()
    }

    /// Distinct hits not reported because their message already had
    /// [`MAX_HITS_PER_MESSAGE`](super::collect::MAX_HITS_PER_MESSAGE).
    pub fn dropped_hits(&self) -> u64 {
        self.out.dropped()
    }

    /// Bytes of frame head needed given what is there.
    fn head_needed(&self) -> usize {
        let Some(&second) = self.head.get(1) else { return 2 };
        let ext = match second & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + ext + if second & 0x80 != 0 { 4 } else { 0 }
    }

    fn malformed(&mut self, reason: &str) {
        self.out.fail(Uninspectable::Malformed { format: Format::WebSocket, reason: reason.to_string() });
        self.lost = true;
        self.frame = None;
        let head = std::mem::take(&mut self.head);
        self.out.begin("ws");
        self.out.data(&head);
        if let Some((_, _, bytes)) = self.message.take() {
            self.out.data(&bytes);
        }
    }

    fn start_frame(&mut self) {
        let h = &self.head;
        let (fin, rsv1, rsv23, opcode) = (h[0] & 0x80 != 0, h[0] & 0x40 != 0, h[0] & 0x30, h[0] & 0x0f);
        let masked = h[1] & 0x80 != 0;
        let (len, at) = match h[1] & 0x7f {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
            127 => (u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]), 10),
            n => (u64::from(n), 2),
        };
        if !masked {
            return self.malformed("unmasked client frame");
        }
        let mask = [h[at], h[at + 1], h[at + 2], h[at + 3]];
        if rsv23 != 0 {
            return self.malformed("reserved bits set");
        }
        let control = opcode & 0x08 != 0;
        match opcode {
            0 | 1 | 2 | 8 | 9 | 10 => {}
            _ => return self.malformed("unknown opcode"),
        }
        if rsv1 && (self.config.permessage_deflate.is_none() || control || opcode == 0) {
            return self.malformed("compressed bit without negotiated permessage-deflate");
        }
        if control && (!fin || len > MAX_CONTROL as u64) {
            return self.malformed("fragmented or oversize control frame");
        }
        let so_far = self.message.as_ref().map_or(0, |m| m.2.len());
        let Some(len) = usize::try_from(len).ok().filter(|&l| l <= self.config.max_message.saturating_sub(so_far))
        else {
            self.out.fail(Uninspectable::TooLarge { limit: self.config.max_message });
            return self.malformed("message larger than the inspection limit");
        };
        match (opcode, &self.message) {
            (0, None) => return self.malformed("continuation frame without a message"),
            (1 | 2, Some(_)) => return self.malformed("new message inside a fragmented one"),
            (1 | 2, None) => self.message = Some((opcode, rsv1, Vec::new())),
            _ => {}
        }
        self.head.clear();
        let head = FrameHead { fin, opcode, mask, len };
        self.frame = Some((head, 0));
        if len == 0 {
            self.end_frame(head);
        }
    }

    fn payload(&mut self, bytes: &[u8], head: FrameHead, done: usize) {
        let target = if head.opcode & 0x08 != 0 {
            &mut self.control
        } else {
            match &mut self.message {
                Some((_, _, buf)) => buf,
                None => return,
            }
        };
        target.extend(bytes.iter().enumerate().map(|(i, b)| b ^ head.mask[(done + i) % 4]));
    }

    fn end_frame(&mut self, head: FrameHead) {
        self.frame = None;
        match head.opcode {
            8..=10 => {
                let control = std::mem::take(&mut self.control);
                // A close frame's status code is binary; its reason is text.
                let body = if head.opcode == 8 { control.get(2..).unwrap_or_default() } else { &control };
                self.out.payload(body, if head.opcode == 8 { "ws.close" } else { "ws.ping" });
            }
            _ if head.fin => self.end_message(),
            _ => {}
        }
    }

    fn end_message(&mut self) {
        let Some((_, compressed, bytes)) = self.message.take() else { return };
        let path = format!("ws[{}]", self.index);
        self.index += 1;
        let plain = if compressed {
            match self.inflate(&bytes) {
                Ok(plain) => plain,
                Err(why) => {
                    self.out.fail(why);
                    self.lost = true;
                    self.out.payload(&bytes, &path);
                    return;
                }
            }
        } else {
            bytes
        };
        self.out.reset_message();
        self.out.payload(&plain, &path);
    }

    fn inflate(&mut self, data: &[u8]) -> Result<Vec<u8>, Uninspectable> {
        let no_takeover = self.config.permessage_deflate.is_some_and(|p| p.client_no_context_takeover);
        let limit = self.config.max_message;
        let inflater = self.inflater.get_or_insert_with(|| flate2::Decompress::new(false));
        if no_takeover {
            inflater.reset(false);
        }
        let error = |reason: String| Uninspectable::DecodeError { encoding: "permessage-deflate".into(), reason };
        // RFC 7692 §7.2.2: the sender removed this empty block's tail.
        let mut input = data.to_vec();
        input.extend_from_slice(&[0x00, 0x00, 0xff, 0xff]);
        let mut out = Vec::with_capacity(input.len() * 2);
        let mut pos = 0;
        loop {
            if out.capacity() - out.len() < 4096 {
                out.reserve(32 * 1024);
            }
            let (in_before, out_before) = (inflater.total_in(), out.len());
            let status = inflater
                .decompress_vec(&input[pos..], &mut out, flate2::FlushDecompress::Sync)
                .map_err(|e| error(e.to_string()))?;
            pos += (inflater.total_in() - in_before) as usize;
            if out.len() > limit {
                return Err(Uninspectable::TooLarge { limit });
            }
            if status == flate2::Status::StreamEnd {
                // A final block ends this compressor's stream; the next
                // message starts a new one. Only the tail we appended may follow.
                inflater.reset(false);
                return if input.len() - pos <= 4 {
                    Ok(out)
                } else {
                    Err(error("data after the end of the deflate stream".into()))
                };
            }
            if pos >= input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if inflater.total_in() == in_before && out.len() == out_before {
                return Err(error("the deflate stream makes no progress".into()));
            }
        }
    }
}
