//! PostgreSQL wire framing (protocol 3.0), without I/O: bytes in, messages
//! out, and the few messages the gateway writes itself.
//!
//! The frontend side is parsed completely, field by field, because every
//! client message is judged before it goes upstream: a message that does
//! not parse is an error, never something relayed blind. The backend side
//! is only framed here (tag and length); the messages the gateway acts on
//! are parsed with `postgres-protocol`.
//!
//! Every message has a length cap: a client announcing a larger one is
//! refused before its bytes are buffered.

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

/// Protocol version 3.0, as a StartupMessage carries it.
pub const PROTOCOL_3_0: u32 = 3 << 16;
/// The SSLRequest code (a startup packet asking for TLS).
pub const SSL_REQUEST: u32 = 80_877_103;
/// The GSSENCRequest code (a startup packet asking for GSSAPI encryption).
pub const GSSENC_REQUEST: u32 = 80_877_104;
/// The CancelRequest code.
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// The largest startup packet accepted, as the server's own limit
/// (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;
/// The largest password message accepted before authentication.
pub const MAX_PASSWORD_LEN: usize = 4096;

/// Why bytes are no valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The announced length is over the cap.
    #[error("a `{tag}` message of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// The message type (`startup` for startup packets).
        tag: String,
        /// Its announced length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The message does not parse.
    #[error("malformed `{tag}` message: {detail}")]
    Malformed {
        /// The message type.
        tag: String,
        /// What is wrong.
        detail: &'static str,
    },
    /// A message type the handler does not know (or not in this phase).
    #[error("unexpected message type {0:?}")]
    Unexpected(char),
    /// A protocol version other than 3.x.
    #[error("unsupported protocol version {major}.{minor}")]
    Version {
        /// Major version.
        major: u16,
        /// Minor version.
        minor: u16,
    },
}

fn malformed(tag: impl Into<String>, detail: &'static str) -> CodecError {
    CodecError::Malformed { tag: tag.into(), detail }
}

/// A packet a client sends before its first typed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// SSLRequest.
    Ssl,
    /// GSSENCRequest.
    GssEnc,
    /// CancelRequest.
    Cancel {
        /// The backend process id the client was given.
        process_id: i32,
        /// The secret key the client was given.
        secret_key: i32,
    },
    /// StartupMessage.
    Params {
        /// Minor protocol version asked for (the gateway speaks 3.0).
        minor: u16,
        /// Parameters in order (`user`, `database`, `options`, ...).
        params: Vec<(String, String)>,
    },
}

impl Startup {
    /// The value of parameter `name`.
    pub fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
        params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Whether `first` (at least 8 bytes) begins a PostgreSQL startup packet.
pub fn looks_like_startup(first: &[u8]) -> bool {
    let Some((len, code)) = startup_header(first) else { return false };
    match code {
        SSL_REQUEST | GSSENC_REQUEST => len == 8,
        CANCEL_REQUEST => len == 16,
        v => v >> 16 == 3 && len > 8 && len <= MAX_STARTUP_LEN,
    }
}

fn startup_header(buf: &[u8]) -> Option<(usize, u32)> {
    let len = u32::from_be_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    let code = u32::from_be_bytes(buf.get(4..8)?.try_into().ok()?);
    Some((len, code))
}

/// Takes one startup packet off `buf` when it is complete.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<Startup>, CodecError> {
    let Some((len, code)) = startup_header(buf) else { return Ok(None) };
    if len > MAX_STARTUP_LEN {
        return Err(CodecError::TooLarge { tag: "startup".into(), len, max: MAX_STARTUP_LEN });
    }
    if len < 8 {
        return Err(malformed("startup", "length below 8"));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mut body = buf.split_to(len).freeze();
    body.advance(8);
    let startup = match code {
        SSL_REQUEST | GSSENC_REQUEST if !body.is_empty() => return Err(malformed("startup", "request with a body")),
        SSL_REQUEST => Startup::Ssl,
        GSSENC_REQUEST => Startup::GssEnc,
        CANCEL_REQUEST => {
            if body.len() != 8 {
                return Err(malformed("cancel", "length is not 16"));
            }
            Startup::Cancel { process_id: body.get_i32(), secret_key: body.get_i32() }
        }
        v if v >> 16 == 3 => {
            let mut params = Vec::new();
            let mut r = Reader::new("startup", body);
            loop {
                let key = r.cstr()?;
                if key.is_empty() {
                    break;
                }
                let value = r.cstr()?;
                params.push((key, value));
            }
            r.end()?;
            Startup::Params { minor: (v & 0xffff) as u16, params }
        }
        v => return Err(CodecError::Version { major: (v >> 16) as u16, minor: (v & 0xffff) as u16 }),
    };
    Ok(Some(startup))
}

/// One framed message: its type byte and its body (without the length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The type byte.
    pub tag: u8,
    /// The body.
    pub body: Bytes,
}

/// The header of the typed message at the start of `buf`: (tag, body
/// length); `None` until 5 bytes are there.
pub fn header(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, CodecError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(malformed(tag_name(tag), "length below 4"));
    }
    if len > max {
        return Err(CodecError::TooLarge { tag: tag_name(tag), len, max });
    }
    Ok(Some((tag, len - 4)))
}

/// Takes one typed message off `buf` when it is complete.
pub fn decode_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, CodecError> {
    let Some((tag, len)) = header(buf, max)? else { return Ok(None) };
    if buf.len() < 5 + len {
        // Room for the rest, so the reader fills it in few calls.
        buf.reserve(5 + len - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(5 + len).freeze();
    frame.advance(5);
    Ok(Some(Frame { tag, body: frame }))
}

fn tag_name(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        (tag as char).to_string()
    } else {
        format!("0x{tag:02x}")
    }
}

/// What a frontend message's parameter value is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// Bytes (text or binary format).
    Bytes(Bytes),
}

/// Statement or portal, as Describe and Close name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A prepared statement (`S`).
    Statement,
    /// A portal (`P`).
    Portal,
}

/// A frontend message after authentication, parsed completely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend {
    /// Simple query (`Q`).
    Query {
        /// The SQL text (one or more statements).
        sql: String,
    },
    /// Parse (`P`).
    Parse {
        /// Statement name (empty: unnamed).
        name: String,
        /// The SQL text.
        sql: String,
        /// Parameter type OIDs.
        param_types: Vec<u32>,
    },
    /// Bind (`B`).
    Bind {
        /// Portal name.
        portal: String,
        /// Statement name.
        statement: String,
        /// Parameter values.
        params: Vec<Value>,
    },
    /// Describe (`D`).
    Describe(Target, String),
    /// Execute (`E`).
    Execute {
        /// Portal name.
        portal: String,
        /// Row limit (0: all).
        max_rows: i32,
    },
    /// Close (`C`).
    Close(Target, String),
    /// Sync (`S`).
    Sync,
    /// Flush (`H`).
    Flush,
    /// CopyData (`d`).
    CopyData(Bytes),
    /// CopyDone (`c`).
    CopyDone,
    /// CopyFail (`f`).
    CopyFail(String),
    /// FunctionCall (`F`).
    FunctionCall {
        /// The function's OID.
        oid: u32,
        /// Argument values.
        args: Vec<Value>,
    },
    /// Terminate (`X`).
    Terminate,
}

impl Frontend {
    /// Parses a frame a client sent after authentication. Unknown types
    /// and anything malformed (short fields, trailing bytes, invalid UTF-8
    /// in SQL or names, negative counts) are errors.
    pub fn parse(frame: &Frame) -> Result<Frontend, CodecError> {
        let name = tag_name(frame.tag);
        let mut r = Reader::new(&name, frame.body.clone());
        let msg = match frame.tag {
            b'Q' => Frontend::Query { sql: r.cstr()? },
            b'P' => {
                let name = r.cstr()?;
                let sql = r.cstr()?;
                let n = r.count()?;
                let mut param_types = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    param_types.push(r.u32()?);
                }
                Frontend::Parse { name, sql, param_types }
            }
            b'B' => {
                let portal = r.cstr()?;
                let statement = r.cstr()?;
                let formats = r.count()?;
                for _ in 0..formats {
                    r.format()?;
                }
                let params = r.values()?;
                let results = r.count()?;
                for _ in 0..results {
                    r.format()?;
                }
                Frontend::Bind { portal, statement, params }
            }
            b'D' => {
                let target = r.target()?;
                Frontend::Describe(target, r.cstr()?)
            }
            b'E' => Frontend::Execute { portal: r.cstr()?, max_rows: r.i32()? },
            b'C' => {
                let target = r.target()?;
                Frontend::Close(target, r.cstr()?)
            }
            b'S' => Frontend::Sync,
            b'H' => Frontend::Flush,
            b'd' => {
                let data = r.rest();
                Frontend::CopyData(data)
            }
            b'c' => Frontend::CopyDone,
            b'f' => Frontend::CopyFail(r.cstr()?),
            b'F' => {
                let oid = r.u32()?;
                let formats = r.count()?;
                for _ in 0..formats {
                    r.format()?;
                }
                let args = r.values()?;
                r.format()?;
                Frontend::FunctionCall { oid, args }
            }
            b'X' => Frontend::Terminate,
            other => return Err(CodecError::Unexpected(other as char)),
        };
        r.end()?;
        Ok(msg)
    }
}

/// Reads the fields of one message body.
struct Reader {
    tag: String,
    buf: Bytes,
}

impl Reader {
    fn new(tag: &str, buf: Bytes) -> Reader {
        Reader { tag: tag.to_owned(), buf }
    }

    fn err(&self, detail: &'static str) -> CodecError {
        malformed(self.tag.clone(), detail)
    }

    fn cstr(&mut self) -> Result<String, CodecError> {
        let end = memchr::memchr(0, &self.buf).ok_or_else(|| self.err("unterminated string"))?;
        let s = self.buf.split_to(end);
        self.buf.advance(1);
        String::from_utf8(s.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }

    fn i16(&mut self) -> Result<i16, CodecError> {
        if self.buf.len() < 2 {
            return Err(self.err("truncated"));
        }
        Ok(self.buf.get_i16())
    }

    fn i32(&mut self) -> Result<i32, CodecError> {
        if self.buf.len() < 4 {
            return Err(self.err("truncated"));
        }
        Ok(self.buf.get_i32())
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        self.i32().map(|v| v as u32)
    }

    fn count(&mut self) -> Result<usize, CodecError> {
        usize::try_from(self.i16()?).map_err(|_| self.err("negative count"))
    }

    fn format(&mut self) -> Result<(), CodecError> {
        match self.i16()? {
            0 | 1 => Ok(()),
            _ => Err(self.err("format code is neither text nor binary")),
        }
    }

    fn target(&mut self) -> Result<Target, CodecError> {
        if self.buf.is_empty() {
            return Err(self.err("truncated"));
        }
        match self.buf.get_u8() {
            b'S' => Ok(Target::Statement),
            b'P' => Ok(Target::Portal),
            _ => Err(self.err("target is neither statement nor portal")),
        }
    }

    fn values(&mut self) -> Result<Vec<Value>, CodecError> {
        let n = self.count()?;
        let mut values = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let len = self.i32()?;
            if len == -1 {
                values.push(Value::Null);
                continue;
            }
            let len = usize::try_from(len).map_err(|_| self.err("negative value length"))?;
            if self.buf.len() < len {
                return Err(self.err("value runs past the message"));
            }
            values.push(Value::Bytes(self.buf.split_to(len)));
        }
        Ok(values)
    }

    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    fn end(&self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.err("trailing bytes"))
        }
    }
}

/// One column of a RowDescription (`T`), as far as masking needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The column's name (its alias when the query gave one).
    pub name: String,
    /// The column's type OID.
    pub type_oid: u32,
    /// Whether its values come in binary format (format code 1).
    pub binary: bool,
}

/// The columns a RowDescription body describes.
pub fn row_description(body: &Bytes) -> Result<Vec<Field>, CodecError> {
    let mut r = Reader::new("T", body.clone());
    let n = r.count()?;
    let mut fields = Vec::with_capacity(n.min(1664));
    for _ in 0..n {
        let name = r.cstr()?;
        let _table = r.u32()?;
        let _column = r.i16()?;
        let type_oid = r.u32()?;
        let _size = r.i16()?;
        let _modifier = r.i32()?;
        let binary = match r.i16()? {
            0 => false,
            1 => true,
            _ => return Err(r.err("format code is neither text nor binary")),
        };
        fields.push(Field { name, type_oid, binary });
    }
    r.end()?;
    Ok(fields)
}

/// The values of a DataRow (`D`) body, `None` for NULL, borrowed from it.
pub fn data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, CodecError> {
    let err = |detail| malformed("D", detail);
    let (count, mut rest) = body.split_first_chunk::<2>().ok_or_else(|| err("truncated"))?;
    let count = usize::try_from(i16::from_be_bytes(*count)).map_err(|_| err("negative count"))?;
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(|| err("truncated"))?;
        let len = i32::from_be_bytes(*len);
        if len == -1 {
            values.push(None);
            rest = tail;
            continue;
        }
        let len = usize::try_from(len).map_err(|_| err("negative value length"))?;
        if tail.len() < len {
            return Err(err("value runs past the message"));
        }
        let (value, tail) = tail.split_at(len);
        values.push(Some(value));
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(err("trailing bytes"));
    }
    Ok(values)
}

/// The password of a PasswordMessage (`p`) answering a cleartext request.
pub fn password(frame: &Frame) -> Result<Bytes, CodecError> {
    if frame.tag != b'p' {
        return Err(CodecError::Unexpected(frame.tag as char));
    }
    let body = &frame.body;
    match memchr::memchr(0, body) {
        Some(end) if end + 1 == body.len() => Ok(body.slice(..end)),
        _ => Err(malformed("p", "password is not one terminated string")),
    }
}

// ---------- messages the gateway writes ----------

fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_u32(0);
    body(out);
    let len = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    // A NUL would end the field early: the client would misread the rest.
    out.extend(s.bytes().filter(|&b| b != 0));
    out.put_u8(0);
}

/// Severity of an ErrorResponse the gateway sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends.
    Fatal,
}

/// An ErrorResponse with SQLSTATE `code` and `text`.
pub fn error_response(out: &mut BytesMut, severity: Severity, code: &str, text: &str) {
    let severity = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    message(out, b'E', |b| {
        for (field, value) in [(b'S', severity), (b'V', severity), (b'C', code), (b'M', text)] {
            b.put_u8(field);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
}

/// AuthenticationCleartextPassword.
pub fn auth_cleartext(out: &mut BytesMut) {
    message(out, b'R', |b| b.put_i32(3));
}

/// AuthenticationOk.
pub fn auth_ok(out: &mut BytesMut) {
    message(out, b'R', |b| b.put_i32(0));
}

/// BackendKeyData.
pub fn backend_key_data(out: &mut BytesMut, process_id: i32, secret_key: i32) {
    message(out, b'K', |b| {
        b.put_i32(process_id);
        b.put_i32(secret_key);
    });
}

/// NegotiateProtocolVersion: the gateway speaks 3.0 and none of `unknown`
/// (`_pq_.` options).
pub fn negotiate_protocol_version(out: &mut BytesMut, unknown: &[&str]) {
    message(out, b'v', |b| {
        b.put_i32(0);
        b.put_i32(unknown.len() as i32);
        for name in unknown {
            put_cstr(b, name);
        }
    });
}

/// A DataRow of `values` (`None`: NULL), its length computed.
pub fn put_data_row<'a>(out: &mut BytesMut, values: impl ExactSizeIterator<Item = Option<&'a [u8]>>) {
    message(out, b'D', |b| {
        b.put_i16(values.len() as i16);
        for value in values {
            match value {
                None => b.put_i32(-1),
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.extend_from_slice(v);
                }
            }
        }
    });
}

/// A Describe of the portal `name`.
pub fn describe_portal(out: &mut BytesMut, name: &str) {
    message(out, b'D', |b| {
        b.put_u8(b'P');
        put_cstr(b, name);
    });
}

/// Sync.
pub fn sync(out: &mut BytesMut) {
    message(out, b'S', |_| {});
}

/// CopyFail with `text`.
pub fn copy_fail(out: &mut BytesMut, text: &str) {
    message(out, b'f', |b| put_cstr(b, text));
}

/// A CancelRequest packet.
pub fn cancel_request(out: &mut BytesMut, process_id: i32, secret_key: i32) {
    out.put_i32(16);
    out.put_u32(CANCEL_REQUEST);
    out.put_i32(process_id);
    out.put_i32(secret_key);
}

/// A StartupMessage for protocol 3.0 with `params`.
pub fn startup_message<'a>(out: &mut BytesMut, params: impl IntoIterator<Item = (&'a str, &'a str)>) {
    let at = out.len();
    out.put_u32(0);
    out.put_u32(PROTOCOL_3_0);
    for (k, v) in params {
        put_cstr(out, k);
        put_cstr(out, v);
    }
    out.put_u8(0);
    let len = (out.len() - at) as u32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// The SQLSTATE and message of an ErrorResponse body (for the recording).
pub fn error_fields(body: &[u8]) -> (Option<String>, Option<String>) {
    let (mut code, mut text) = (None, None);
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let Some(end) = memchr::memchr(0, tail) else { break };
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match field {
            b'C' => code = Some(value),
            b'M' => text = Some(value),
            _ => {}
        }
        rest = &tail[end + 1..];
    }
    (code, text)
}

/// The text of a CommandComplete body.
pub fn command_tag(body: &[u8]) -> String {
    let end = memchr::memchr(0, body).unwrap_or(body.len());
    String::from_utf8_lossy(&body[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn startup_packets() {
        let mut buf = BytesMut::new();
        startup_message(&mut buf, [("user", "ci"), ("database", "app")]);
        assert!(looks_like_startup(&buf));
        let parsed = decode_startup(&mut buf.clone()).unwrap().unwrap();
        let Startup::Params { minor: 0, params } = parsed else { panic!("{parsed:?}") };
        assert_eq!(Startup::param(&params, "database"), Some("app"));
        // Every prefix waits for more.
        for cut in 0..buf.len() {
            assert_eq!(decode_startup(&mut BytesMut::from(&buf[..cut])).unwrap(), None, "cut {cut}");
        }
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert!(looks_like_startup(&ssl));
        assert_eq!(decode_startup(&mut BytesMut::from(&ssl[..])).unwrap(), Some(Startup::Ssl));
        let gss = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
        assert_eq!(decode_startup(&mut BytesMut::from(&gss[..])).unwrap(), Some(Startup::GssEnc));
        let mut cancel = BytesMut::new();
        cancel_request(&mut cancel, 7, -9);
        assert!(looks_like_startup(&cancel));
        assert_eq!(decode_startup(&mut cancel).unwrap(), Some(Startup::Cancel { process_id: 7, secret_key: -9 }));
        assert!(!looks_like_startup(b"GET / HTTP/1.1\r\n"));
        assert!(!looks_like_startup(&[0, 0, 0x40, 0, 0, 3, 0, 0]), "over the startup cap");
        let huge = [0, 1, 0, 0, 0, 3, 0, 0];
        assert!(matches!(decode_startup(&mut BytesMut::from(&huge[..])), Err(CodecError::TooLarge { .. })));
        let unterminated = [0, 0, 0, 12, 0, 3, 0, 0, b'u', b's', b'e', b'r'];
        assert!(decode_startup(&mut BytesMut::from(&unterminated[..])).is_err());
    }

    #[test]
    fn frontend_messages_parse_and_split_at_every_byte() {
        let mut bind = Vec::new();
        bind.extend_from_slice(b"p1\0s1\0");
        bind.extend_from_slice(&1i16.to_be_bytes());
        bind.extend_from_slice(&0i16.to_be_bytes());
        bind.extend_from_slice(&2i16.to_be_bytes());
        bind.extend_from_slice(&3i32.to_be_bytes());
        bind.extend_from_slice(b"abc");
        bind.extend_from_slice(&(-1i32).to_be_bytes());
        bind.extend_from_slice(&0i16.to_be_bytes());
        let mut stream = Vec::new();
        stream.extend(framed(b'Q', b"select 1\0"));
        stream.extend(framed(b'P', b"s1\0select $1\0\0\x01\0\0\0\x19"));
        stream.extend(framed(b'B', &bind));
        stream.extend(framed(b'E', b"p1\0\0\0\0\0"));
        stream.extend(framed(b'S', b""));
        let expected = vec![
            Frontend::Query { sql: "select 1".into() },
            Frontend::Parse { name: "s1".into(), sql: "select $1".into(), param_types: vec![25] },
            Frontend::Bind {
                portal: "p1".into(),
                statement: "s1".into(),
                params: vec![Value::Bytes(Bytes::from_static(b"abc")), Value::Null],
            },
            Frontend::Execute { portal: "p1".into(), max_rows: 0 },
            Frontend::Sync,
        ];
        for cut in 0..=stream.len() {
            let mut buf = BytesMut::from(&stream[..cut]);
            let mut got = Vec::new();
            while let Some(f) = decode_frame(&mut buf, 1 << 20).unwrap() {
                got.push(Frontend::parse(&f).unwrap());
            }
            buf.extend_from_slice(&stream[cut..]);
            while let Some(f) = decode_frame(&mut buf, 1 << 20).unwrap() {
                got.push(Frontend::parse(&f).unwrap());
            }
            assert_eq!(got, expected, "split at {cut}");
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn malformed_and_oversized_messages_are_errors() {
        let parse = |tag, body: &[u8]| {
            let mut buf = BytesMut::from(&framed(tag, body)[..]);
            Frontend::parse(&decode_frame(&mut buf, 1 << 20).unwrap().unwrap())
        };
        assert!(parse(b'Q', b"select 1").is_err(), "unterminated");
        assert!(parse(b'Q', b"select 1\0x").is_err(), "trailing");
        assert!(parse(b'Q', b"select \xff\0").is_err(), "not UTF-8");
        assert!(parse(b'B', b"\0\0\0\0\0\x01\0\0\0\x09ab\0\0").is_err(), "value past the end");
        assert!(parse(b'D', b"Xname\0").is_err(), "bad target");
        assert_eq!(parse(b'z', b""), Err(CodecError::Unexpected('z')));
        let mut big = BytesMut::from(&[b'Q', 0x10, 0, 0, 0][..]);
        assert!(matches!(decode_frame(&mut big, 1 << 20), Err(CodecError::TooLarge { .. })));
        let mut short = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert!(decode_frame(&mut short, 1 << 20).is_err());
    }

    #[test]
    fn written_messages() {
        let mut out = BytesMut::new();
        error_response(&mut out, Severity::Error, "42501", "no\0pe");
        let mut buf = out.clone();
        let f = decode_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag, b'E');
        assert_eq!(error_fields(&f.body), (Some("42501".into()), Some("nope".into())));
        let password_msg = framed(b'p', b"hunter2\0");
        let f = decode_frame(&mut BytesMut::from(&password_msg[..]), 1 << 20).unwrap().unwrap();
        assert_eq!(password(&f).unwrap(), Bytes::from_static(b"hunter2"));
    }
}
