//! Peeking at a connection's ClientHello without consuming it.
//!
//! The bytes must stay in the socket: a passed-through connection is spliced
//! to its destination byte for byte, and an intercepted one is handed to
//! `tokio_rustls`, which reads the same ClientHello again. So this module only
//! ever uses `MSG_PEEK`, re-parsing from the first byte each time more data
//! has arrived, and never reads.

use std::time::Duration;

use tokio::{io::Interest, net::TcpStream};

/// Upper bound on the ClientHello message (handshake header included). Real
/// hellos are under 2 KiB, post-quantum key shares included; this leaves room
/// for large extensions while bounding what one silent client can pin.
pub const MAX_HELLO_LEN: usize = 64 * 1024;
/// Record framing allowed on top of [`MAX_HELLO_LEN`] (a hello split into
/// many tiny records is legal but has no honest use past this).
const MAX_FRAMING: usize = 1024;
const MAX_PEEK: usize = MAX_HELLO_LEN + MAX_FRAMING;
/// TLS records carry at most 2^14 bytes of plaintext.
const MAX_RECORD_LEN: usize = 16 * 1024;
const INITIAL_PEEK: usize = 4096;
const MAX_BACKOFF: Duration = Duration::from_millis(20);

const RECORD_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;

/// What the first bytes of a connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    /// A TLS ClientHello, parsed.
    Tls(ClientHelloInfo),
    /// Not TLS: the proxy tries HTTP.
    Plaintext,
}

/// What the proxy needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The `server_name` extension's host name, as the client sent it.
    pub sni: Option<String>,
    /// Protocols from the ALPN extension, in the client's order.
    pub alpn: Vec<Vec<u8>>,
    /// The ClientHello's `legacy_version` (0x0303 for TLS 1.2 and 1.3).
    pub legacy_version: u16,
    /// The `supported_versions` extension (TLS 1.3 clients); empty if absent.
    pub supported_versions: Vec<u16>,
    /// Bytes the ClientHello occupies on the wire, record headers included.
    pub wire_len: usize,
}

/// Why no ClientHello could be obtained.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The client closed the connection before sending a complete ClientHello.
    #[error("connection closed before a complete ClientHello")]
    Eof,
    /// The client did not send a complete ClientHello in time.
    #[error("no complete ClientHello within the timeout")]
    Timeout,
    /// The bytes start like TLS but are not a valid ClientHello.
    #[error("malformed ClientHello: {0}")]
    Malformed(String),
    /// The socket failed.
    #[error("cannot read the ClientHello: {0}")]
    Io(#[from] std::io::Error),
}

/// Waits for the connection's first bytes and, if they are a TLS handshake,
/// its complete ClientHello, without consuming anything.
///
/// Returns [`Peeked::Plaintext`] as soon as the first bytes cannot start a TLS
/// record (`0x16 0x03 0x00..=0x04`).
pub async fn peek_client_hello(stream: &TcpStream, timeout: Duration) -> Result<Peeked, HelloError> {
    tokio::time::timeout(timeout, peek_loop(stream)).await.map_err(|_| HelloError::Timeout)?
}

async fn peek_loop(stream: &TcpStream) -> Result<Peeked, HelloError> {
    let mut buf = vec![0u8; INITIAL_PEEK];
    let mut backoff = Duration::from_millis(1);
    let mut seen = 0;
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(HelloError::Eof);
        }
        let want = match parse(&buf[..n]) {
            Parse::NotTls => return Ok(Peeked::Plaintext),
            Parse::Done(info) => return Ok(Peeked::Tls(info)),
            Parse::Malformed(reason) => return Err(HelloError::Malformed(reason)),
            Parse::Need(want) => want,
        };
        if n == buf.len() {
            if buf.len() >= MAX_PEEK {
                // parse() never asks for more than MAX_PEEK; this only guards the loop.
                return Err(HelloError::Malformed(format!("ClientHello larger than {MAX_PEEK} bytes")));
            }
            // The buffer, not the socket, is what ran out: look again with room.
            buf.resize(want.max(buf.len() * 2).min(MAX_PEEK), 0);
            continue;
        }
        if n > seen {
            seen = n;
            backoff = Duration::from_millis(1);
        } else if stream.ready(Interest::READABLE).await?.is_read_closed() {
            // Peek keeps returning the buffered bytes after the peer's FIN,
            // never 0, so the FIN must be read from the readiness instead. One
            // last look catches bytes that arrived together with it.
            if stream.peek(&mut buf).await? == n {
                return Err(HelloError::Eof);
            }
            continue;
        }
        // Readiness stays set while unread bytes are buffered, so waiting on it
        // would spin; a short, growing sleep bounds both latency and CPU.
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// The outcome of parsing what has arrived so far.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parse {
    NotTls,
    /// At least this many bytes (from the start) are needed to go on.
    Need(usize),
    Done(ClientHelloInfo),
    Malformed(String),
}

/// Parses the records at the start of `buf` up to a complete ClientHello.
pub(crate) fn parse(buf: &[u8]) -> Parse {
    if !starts_like_tls(buf) {
        return Parse::NotTls;
    }
    let mut pos = 0;
    let mut handshake: Vec<u8> = Vec::new();
    loop {
        if pos + 5 > MAX_PEEK {
            return Parse::Malformed(format!(
                "ClientHello spread over more than {MAX_PEEK} bytes of records (limit {MAX_HELLO_LEN} plus framing)"
            ));
        }
        let Some(header) = buf.get(pos..pos + 5) else {
            return Parse::Need(pos + 5);
        };
        let (content_type, major) = (header[0], header[1]);
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if content_type != RECORD_HANDSHAKE {
            return Parse::Malformed(format!(
                "record of content type {content_type} at offset {pos} before the ClientHello was complete"
            ));
        }
        if major != 3 {
            return Parse::Malformed(format!("record at offset {pos} has version major {major}, not 3"));
        }
        if len == 0 {
            return Parse::Malformed(format!("empty handshake record at offset {pos}"));
        }
        if len > MAX_RECORD_LEN {
            return Parse::Malformed(format!("record length {len} exceeds the TLS maximum of {MAX_RECORD_LEN}"));
        }
        let end = pos + 5 + len;
        if end > MAX_PEEK {
            return Parse::Malformed(format!(
                "ClientHello spread over more than {MAX_PEEK} bytes of records (limit {MAX_HELLO_LEN} plus framing)"
            ));
        }
        let available = &buf[pos + 5..end.min(buf.len())];
        handshake.extend_from_slice(available);
        if handshake.len() >= 4 {
            if handshake[0] != HANDSHAKE_CLIENT_HELLO {
                return Parse::Malformed(format!(
                    "first handshake message has type {}, not ClientHello (1)",
                    handshake[0]
                ));
            }
            let msg_len = usize::from(handshake[1]) << 16 | usize::from(handshake[2]) << 8 | usize::from(handshake[3]);
            if msg_len + 4 > MAX_HELLO_LEN {
                return Parse::Malformed(format!(
                    "ClientHello of {msg_len} bytes exceeds the {MAX_HELLO_LEN}-byte limit"
                ));
            }
            if handshake.len() >= msg_len + 4 {
                // Complete; whatever follows in the record is the client's next
                // flight and none of our business.
                return match parse_client_hello(&handshake[4..4 + msg_len]) {
                    Ok(mut info) => {
                        info.wire_len = end;
                        Parse::Done(info)
                    }
                    Err(reason) => Parse::Malformed(reason),
                };
            }
        }
        if end > buf.len() {
            return Parse::Need(end);
        }
        pos = end;
    }
}

/// Whether the bytes so far could begin a TLS record: `0x16 0x03 0x00..=0x04`.
fn starts_like_tls(buf: &[u8]) -> bool {
    let expected: [fn(u8) -> bool; 3] = [|b| b == RECORD_HANDSHAKE, |b| b == 3, |b| b <= 4];
    buf.iter().zip(expected).all(|(b, ok)| ok(*b))
}

/// A bounds-checked cursor; every error names the field being read.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.remaining() < n {
            return Err(format!("{what}: needs {n} bytes, only {} left", self.remaining()));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.bytes(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self, what: &str) -> Result<&'a [u8], String> {
        let len = self.u8(what)?;
        self.bytes(usize::from(len), what)
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self, what: &str) -> Result<&'a [u8], String> {
        let len = self.u16(what)?;
        self.bytes(usize::from(len), what)
    }

    fn finish(&self, what: &str) -> Result<(), String> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(format!("{what}: {n} unexpected trailing bytes")),
        }
    }
}

/// Parses a ClientHello body (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2).
fn parse_client_hello(body: &[u8]) -> Result<ClientHelloInfo, String> {
    let mut r = Reader::new(body);
    let legacy_version = r.u16("legacy_version")?;
    if legacy_version >> 8 != 3 {
        return Err(format!("legacy_version {legacy_version:#06x} is not TLS"));
    }
    r.bytes(32, "random")?;
    let session_id = r.vec8("legacy_session_id")?;
    if session_id.len() > 32 {
        return Err(format!("legacy_session_id of {} bytes (at most 32)", session_id.len()));
    }
    let suites = r.vec16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(format!("cipher_suites length {} is not a positive even number", suites.len()));
    }
    if r.vec8("legacy_compression_methods")?.is_empty() {
        return Err("legacy_compression_methods is empty".into());
    }
    let mut info =
        ClientHelloInfo { sni: None, alpn: Vec::new(), legacy_version, supported_versions: Vec::new(), wire_len: 0 };
    // Pre-TLS 1.2 clients may omit the extensions block entirely.
    if r.remaining() == 0 {
        return Ok(info);
    }
    let declared = r.u16("extensions length")?;
    if usize::from(declared) != r.remaining() {
        return Err(format!("extensions length {declared} does not match the {} bytes left", r.remaining()));
    }
    let mut seen: Vec<u16> = Vec::new();
    while r.remaining() > 0 {
        let ext_type = r.u16("extension type")?;
        let data = r.vec16(&format!("extension {ext_type}"))?;
        if seen.contains(&ext_type) {
            return Err(format!("extension {ext_type} appears twice"));
        }
        seen.push(ext_type);
        match ext_type {
            EXT_SERVER_NAME => info.sni = parse_sni(data)?,
            EXT_ALPN => info.alpn = parse_alpn(data)?,
            EXT_SUPPORTED_VERSIONS => info.supported_versions = parse_supported_versions(data)?,
            _ => {}
        }
    }
    Ok(info)
}

/// RFC 6066 §3. An empty extension is legal (servers echo it that way).
fn parse_sni(data: &[u8]) -> Result<Option<String>, String> {
    if data.is_empty() {
        return Ok(None);
    }
    let mut r = Reader::new(data);
    let list = r.vec16("server_name list")?;
    r.finish("server_name extension")?;
    let mut r = Reader::new(list);
    let mut host = None;
    while r.remaining() > 0 {
        let name_type = r.u8("server_name type")?;
        let name = r.vec16("server_name")?;
        if name_type != 0 {
            continue;
        }
        if host.is_some() {
            return Err("server_name has more than one host_name".into());
        }
        if name.is_empty() {
            return Err("server_name host_name is empty".into());
        }
        // Host names are ASCII (IDNs travel as xn--); anything else is not a
        // name we could match, mint for, or safely log.
        if !name.iter().all(|b| b.is_ascii_graphic()) {
            return Err("server_name host_name contains non-printable or non-ASCII bytes".into());
        }
        host = Some(String::from_utf8_lossy(name).into_owned());
    }
    Ok(host)
}

/// RFC 7301 §3.1.
fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut r = Reader::new(data);
    let list = r.vec16("ALPN protocol list")?;
    r.finish("ALPN extension")?;
    if list.is_empty() {
        return Err("ALPN protocol list is empty".into());
    }
    let mut r = Reader::new(list);
    let mut protocols = Vec::new();
    while r.remaining() > 0 {
        let proto = r.vec8("ALPN protocol name")?;
        if proto.is_empty() {
            return Err("ALPN protocol name is empty".into());
        }
        protocols.push(proto.to_vec());
    }
    Ok(protocols)
}

/// RFC 8446 §4.2.1.
fn parse_supported_versions(data: &[u8]) -> Result<Vec<u16>, String> {
    let mut r = Reader::new(data);
    let list = r.vec8("supported_versions list")?;
    r.finish("supported_versions extension")?;
    if list.is_empty() || list.len() % 2 != 0 {
        return Err(format!("supported_versions length {} is not a positive even number", list.len()));
    }
    Ok(list.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{
        mint::LeafCache,
        test_support::{client_config, tcp_pair, temp_ca},
    };
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn ext(ty: u16, data: &[u8]) -> Vec<u8> {
        let mut out = ty.to_be_bytes().to_vec();
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    fn sni_ext(name: &str) -> Vec<u8> {
        let mut entry = vec![0u8];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name.as_bytes());
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&entry);
        ext(EXT_SERVER_NAME, &data)
    }

    fn alpn_ext(protos: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for p in protos {
            list.push(p.len() as u8);
            list.extend_from_slice(p);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        ext(EXT_ALPN, &data)
    }

    /// A ClientHello handshake message (header included) with these extensions.
    fn hello(extensions: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(32);
        body.extend_from_slice(&[9u8; 32]);
        body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]);
        body.extend_from_slice(&[1, 0]);
        let exts: Vec<u8> = extensions.concat();
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    /// Frames a handshake message into records of at most `chunk` bytes.
    fn records(msg: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for part in msg.chunks(chunk) {
            out.extend_from_slice(&[RECORD_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out
    }

    fn typical() -> Vec<u8> {
        records(
            &hello(&[
                sni_ext("API2.cursor.sh"),
                alpn_ext(&[b"h2", b"http/1.1"]),
                ext(EXT_SUPPORTED_VERSIONS, &[4, 3, 4, 3, 3]),
                ext(0xff01, &[0]),
            ]),
            16384,
        )
    }

    fn malformed(buf: &[u8]) -> String {
        match parse(buf) {
            Parse::Malformed(reason) => reason,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn parses_sni_alpn_and_versions() {
        let wire = typical();
        let Parse::Done(info) = parse(&wire) else { panic!("not parsed") };
        assert_eq!(info.sni.as_deref(), Some("API2.cursor.sh"));
        assert_eq!(info.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(info.supported_versions, vec![0x0304, 0x0303]);
        assert_eq!(info.legacy_version, 0x0303);
        assert_eq!(info.wire_len, wire.len());
    }

    #[test]
    fn every_truncation_asks_for_more() {
        let wire = typical();
        for cut in 1..wire.len() {
            match parse(&wire[..cut]) {
                Parse::Need(n) => assert!(n > cut && n <= wire.len(), "cut {cut}: need {n}"),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_hello_split_over_many_records_parses() {
        let msg = hello(&[sni_ext("split.example"), alpn_ext(&[b"http/1.1"])]);
        for chunk in [1, 3, 7, 100] {
            let wire = records(&msg, chunk);
            let Parse::Done(info) = parse(&wire) else { panic!("chunk {chunk}") };
            assert_eq!(info.sni.as_deref(), Some("split.example"));
            assert_eq!(info.wire_len, wire.len());
        }
        // Extra bytes after the hello (the client's next flight) do not matter.
        let mut wire = records(&msg, 50);
        wire.extend_from_slice(&[0x14, 3, 3, 0, 1, 1]);
        assert!(matches!(parse(&wire), Parse::Done(_)));
    }

    #[test]
    fn plaintext_is_recognised_from_the_first_bytes() {
        for buf in [&b"GET / HTTP/1.1\r\n"[..], b"P", b"\x16\x02", b"\x16\x03\x05", b"\x00", b"\x80\x2e\x01"] {
            assert_eq!(parse(buf), Parse::NotTls, "{buf:?}");
        }
        assert_eq!(parse(b"\x16"), Parse::Need(5));
        assert_eq!(parse(b"\x16\x03\x01"), Parse::Need(5));
    }

    #[test]
    fn wrong_lengths_are_malformed_with_reasons() {
        let msg = hello(&[sni_ext("a.example")]);
        // Session ID longer than 32.
        let mut bad = msg.clone();
        bad[4 + 2 + 32] = 33;
        assert!(malformed(&records(&bad, 16384)).contains("legacy_session_id"));
        // Extensions length that does not match.
        let mut bad = msg.clone();
        let ext_len_at = 4 + 2 + 32 + 1 + 32 + 6 + 2;
        bad[ext_len_at + 1] += 1;
        assert!(malformed(&records(&bad, 16384)).contains("extensions length"));
        // Odd cipher suites length.
        let mut bad = msg.clone();
        bad[4 + 2 + 32 + 1 + 32 + 1] = 3;
        assert!(!matches!(parse(&records(&bad, 16384)), Parse::Done(_)));
        // SNI list length inconsistent with the extension.
        let mut sni = sni_ext("a.example");
        sni[5] += 1;
        assert!(malformed(&records(&hello(&[sni]), 16384)).contains("server_name"));
        // Empty ALPN list and empty protocol name.
        assert!(malformed(&records(&hello(&[ext(EXT_ALPN, &[0, 0])]), 16384)).contains("ALPN protocol list is empty"));
        assert!(
            malformed(&records(&hello(&[ext(EXT_ALPN, &[0, 1, 0])]), 16384)).contains("ALPN protocol name is empty")
        );
        // Duplicate extension.
        assert!(malformed(&records(&hello(&[alpn_ext(&[b"h2"]), alpn_ext(&[b"h2"])]), 16384)).contains("twice"));
        // Two host names.
        let two = [sni_ext("a.example"), sni_ext("b.example")];
        let mut data = Vec::new();
        for s in &two {
            data.extend_from_slice(&s[6..]);
        }
        let mut ext_data = (data.len() as u16).to_be_bytes().to_vec();
        ext_data.extend_from_slice(&data);
        assert!(malformed(&records(&hello(&[ext(EXT_SERVER_NAME, &ext_data)]), 16384)).contains("more than one"));
        // Non-printable host name.
        assert!(malformed(&records(&hello(&[sni_ext("a\0b")]), 16384)).contains("non-printable"));
        // Not a ClientHello at all.
        let mut bad = msg.clone();
        bad[0] = 2;
        assert!(malformed(&records(&bad, 16384)).contains("not ClientHello"));
        // Empty record, wrong record type after the first, wrong major.
        assert!(malformed(&[0x16, 3, 1, 0, 0]).contains("empty handshake record"));
        let mut wire = records(&msg, 10);
        wire[15] = 0x17;
        assert!(malformed(&wire).contains("content type 23"));
        let mut wire = records(&msg, 10);
        wire[16] = 2;
        assert!(malformed(&wire).contains("version major 2"));
    }

    #[test]
    fn huge_lengths_are_refused_without_waiting() {
        assert!(malformed(&[0x16, 3, 1, 0xff, 0xff]).contains("exceeds the TLS maximum"));
        assert!(malformed(&[0x16, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff]).contains("exceeds the 65536-byte limit"));
        assert!(malformed(&[0x16, 3, 1, 0x40, 0x00, 1, 0x01, 0x00, 0x00]).contains("exceeds"));
        // A legal-size hello chopped into one-byte records needs too much framing.
        let big = hello(&[ext(0x1234, &vec![0u8; 20_000])]);
        assert!(malformed(&records(&big, 1)).contains("spread over"));
        // The same hello in normal records is fine.
        assert!(matches!(parse(&records(&big, 16384)), Parse::Done(_)));
    }

    #[test]
    fn random_mutations_never_panic() {
        // A small deterministic xorshift: reproducible without a fuzzing harness.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let base = typical();
        let mut outcomes = [0usize; 4];
        for _ in 0..20_000 {
            let mut buf = base.clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % buf.len();
                buf[at] = next() as u8;
            }
            buf.truncate((next() as usize) % (base.len() + 1));
            let outcome = parse(&buf);
            outcomes[match outcome {
                Parse::NotTls => 0,
                Parse::Need(n) => {
                    assert!(n > buf.len() && n <= MAX_PEEK);
                    1
                }
                Parse::Done(info) => {
                    if let Some(sni) = info.sni {
                        assert!(sni.bytes().all(|b| b.is_ascii_graphic()));
                    }
                    2
                }
                Parse::Malformed(reason) => {
                    assert!(!reason.is_empty());
                    3
                }
            }] += 1;
        }
        assert!(outcomes.iter().all(|&n| n > 0), "every outcome exercised: {outcomes:?}");
        // Pure garbage after a TLS-looking header.
        for _ in 0..5_000 {
            let len = (next() as usize) % 300;
            let mut buf = vec![0x16, 3, 1];
            buf.extend((0..len).map(|_| next() as u8));
            let _ = parse(&buf);
        }
    }

    #[tokio::test]
    async fn peeks_a_real_rustls_hello_then_handshakes_on_the_same_stream() {
        let (_dir, ca) = temp_ca();
        let (client, server) = tcp_pair().await;
        let connector =
            tokio_rustls::TlsConnector::from(client_config(&[ca.cert_der().clone()], &[b"h2", b"http/1.1"]));
        let client_task = tokio::spawn(async move {
            let name = rustls::pki_types::ServerName::try_from("api2.cursor.sh").expect("name");
            let mut tls = connector.connect(name, client).await?;
            tls.write_all(b"hello through interception").await?;
            let mut reply = Vec::new();
            tls.read_to_end(&mut reply).await?;
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            Ok::<_, std::io::Error>((reply, alpn))
        });

        let peeked = peek_client_hello(&server, Duration::from_secs(5)).await.expect("peek");
        let Peeked::Tls(info) = peeked else { panic!("not TLS: {peeked:?}") };
        assert_eq!(info.sni.as_deref(), Some("api2.cursor.sh"));
        assert_eq!(info.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert!(info.supported_versions.contains(&0x0304));
        // Peeking twice sees the same hello: nothing was consumed.
        let again = peek_client_hello(&server, Duration::from_secs(5)).await.expect("peek again");
        assert_eq!(again, Peeked::Tls(info.clone()));

        let cache = LeafCache::new(ca, Duration::from_secs(86400), 8);
        let config = cache.server_config(info.sni.as_deref().expect("sni"), &info.alpn).expect("config");
        let mut tls = tokio_rustls::TlsAcceptor::from(config).accept(server).await.expect("server handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let mut got = [0u8; 26];
        tls.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"hello through interception");
        tls.write_all(b"ok").await.expect("write");
        tls.shutdown().await.expect("shutdown");
        let (reply, alpn) = client_task.await.expect("join").expect("client");
        assert_eq!(reply, b"ok");
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    }

    #[tokio::test]
    async fn plaintext_is_left_in_the_socket() {
        let (mut client, mut server) = tcp_pair().await;
        client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let peeked = peek_client_hello(&server, Duration::from_secs(5)).await.expect("peek");
        assert_eq!(peeked, Peeked::Plaintext);
        let mut buf = [0u8; 14];
        server.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"GET / HTTP/1.1");
    }

    #[tokio::test]
    async fn a_hello_arriving_in_pieces_is_awaited() {
        let (mut client, server) = tcp_pair().await;
        let wire = records(&hello(&[sni_ext("slow.example")]), 40);
        let writer = tokio::spawn(async move {
            for part in wire.chunks(17) {
                client.write_all(part).await.expect("write");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client
        });
        let peeked = peek_client_hello(&server, Duration::from_secs(5)).await.expect("peek");
        let Peeked::Tls(info) = peeked else { panic!("{peeked:?}") };
        assert_eq!(info.sni.as_deref(), Some("slow.example"));
        drop(writer.await);
    }

    #[tokio::test]
    async fn eof_and_timeout_are_distinguished() {
        // Closed with nothing sent.
        let (client, server) = tcp_pair().await;
        drop(client);
        assert!(matches!(peek_client_hello(&server, Duration::from_secs(5)).await, Err(HelloError::Eof)));

        // Closed after half a hello: must not wait for the timeout.
        let (mut client, server) = tcp_pair().await;
        let wire = typical();
        client.write_all(&wire[..wire.len() / 2]).await.expect("write");
        client.shutdown().await.expect("shutdown");
        let started = std::time::Instant::now();
        let result = peek_client_hello(&server, Duration::from_secs(120)).await;
        assert!(matches!(result, Err(HelloError::Eof)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(60), "{:?}", started.elapsed());

        // Half a hello and silence.
        let (mut client, server) = tcp_pair().await;
        client.write_all(&wire[..10]).await.expect("write");
        let result = peek_client_hello(&server, Duration::from_millis(200)).await;
        assert!(matches!(result, Err(HelloError::Timeout)), "{result:?}");
        drop(client);
    }

    #[tokio::test]
    async fn a_large_hello_beyond_the_first_buffer_is_read() {
        let (mut client, server) = tcp_pair().await;
        let wire = records(&hello(&[sni_ext("big.example"), ext(0x1234, &vec![1u8; 30_000])]), 16384);
        assert!(wire.len() > INITIAL_PEEK * 4);
        client.write_all(&wire).await.expect("write");
        let peeked = peek_client_hello(&server, Duration::from_secs(5)).await.expect("peek");
        let Peeked::Tls(info) = peeked else { panic!("{peeked:?}") };
        assert_eq!(info.sni.as_deref(), Some("big.example"));
        assert_eq!(info.wire_len, wire.len());
    }
}
