//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): thin public
//! wrappers over parsers that are crate-private, so the targets call the
//! very code the gateway runs. Not an API: hidden from the docs, and
//! nothing in the gateway calls it.

use crate::detect::{b64, collect::Emit, json::JsonLexer, protobuf, utf16};

/// What [`client_hello`] made of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Not a TLS handshake record.
    NotTls,
    /// At least this many bytes are needed.
    Need(usize),
    /// A complete ClientHello: its SNI and ALPN protocols.
    Done {
        /// The server name, if any.
        sni: Option<String>,
        /// The offered ALPN protocols.
        alpn: Vec<Vec<u8>>,
    },
    /// Refused as malformed.
    Malformed,
}

/// Parses the TLS records at the start of `buf` as the proxy does when it
/// peeks a ClientHello.
pub fn client_hello(buf: &[u8]) -> Hello {
    match crate::tls::hello::parse(buf) {
        crate::tls::hello::Parse::NotTls => Hello::NotTls,
        crate::tls::hello::Parse::Need(n) => Hello::Need(n),
        crate::tls::hello::Parse::Done(info) => Hello::Done { sni: info.sni, alpn: info.alpn },
        crate::tls::hello::Parse::Malformed(_) => Hello::Malformed,
    }
}

/// The dispatcher's first-bytes classification, as a name (`tls`, `http`,
/// `postgres`, `other`, `partial`, `closed`).
pub fn sniff(first: &[u8]) -> String {
    format!("{:?}", crate::proxy::dispatch::classify(first)).to_ascii_lowercase()
}

/// The length-delimited fields `(number, start, end)` of a protobuf
/// message, as the schema-less walker finds them.
pub fn protobuf_len_fields(msg: &[u8]) -> Option<Vec<(u64, usize, usize)>> {
    protobuf::len_fields(msg).map(|fields| fields.into_iter().map(|f| (f.number, f.start, f.end)).collect())
}

/// A base64 run's `(start, end)` and its decodings at each alignment.
pub type Base64Run = ((usize, usize), [Vec<u8>; 4]);

/// The base64 runs of `data` and each run decoded at every alignment.
pub fn base64_runs(data: &[u8]) -> Vec<Base64Run> {
    b64::runs(data)
        .into_iter()
        .map(|(s, e)| {
            let run = data.get(s..e).unwrap_or_default();
            ((s, e), [0, 1, 2, 3].map(|skip| b64::decode_run(run, skip)))
        })
        .collect()
}

/// UTF-16 sniffing of a body's head, and the whole body transcoded
/// (little-endian when nothing was sniffed).
pub fn utf16(data: &[u8]) -> (Option<usize>, Vec<u8>) {
    let sniffed = utf16::sniff(data);
    let endian = sniffed.map_or(utf16::Endian::Little, |(e, _)| e);
    (sniffed.map(|(_, bom)| bom), utf16::to_utf8(data, endian))
}

/// UTF-16LE transcoded, for comparison with the standard library.
pub fn utf16le_to_utf8(data: &[u8]) -> Vec<u8> {
    utf16::to_utf8(data, utf16::Endian::Little)
}

/// Collects what the JSON lexer emits: `(field path, text)` pairs.
#[derive(Default)]
struct Fields(Vec<(String, Vec<u8>)>);

impl Emit for Fields {
    fn begin(&mut self, path: &str) {
        self.0.push((path.to_owned(), Vec::new()));
    }
    fn data(&mut self, bytes: &[u8]) {
        match self.0.last_mut() {
            Some((_, text)) => text.extend_from_slice(bytes),
            None => self.0.push((String::new(), bytes.to_vec())),
        }
    }
}

/// What the streaming JSON lexer emits for `chunks` (fed one after the
/// other), ended as the body scanner ends it: the fields, and when it
/// stopped taking the input for JSON, the offset (in the whole input) and
/// the bytes it had swallowed without emitting.
pub fn json_lex<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> JsonLexed {
    let mut lexer = JsonLexer::default();
    let mut sink = Fields::default();
    let mut offset = 0;
    for chunk in chunks {
        if let Err(i) = lexer.feed(chunk, &mut sink) {
            let pending = lexer.take_pending();
            lexer.finish(&mut sink);
            return (sink.0, Some((offset + i, pending)));
        }
        offset += chunk.len();
    }
    lexer.finish(&mut sink);
    (sink.0, None)
}

/// See [`json_lex`].
pub type JsonLexed = (Vec<(String, Vec<u8>)>, Option<(usize, Vec<u8>)>);

/// What `gateway scan --json` prints for a saved file named `name` (its
/// extension matters: `.har` is read as HAR) holding `data`: one JSON
/// object a line, each key fingerprinted with `key`.
pub fn scan_saved(
    detector: std::sync::Arc<crate::detect::Detector>,
    key: crate::detect::secret::FingerprintKey,
    name: &str,
    data: &[u8],
) -> Vec<u8> {
    crate::cli::scan::json_report(detector, key, std::path::Path::new(name), data)
}

/// The keys the PostgreSQL handler finds in a SQL text (`postgres::encoded`):
/// each as (rule, found range). `None` when the text holds more nested
/// encodings than are decoded (the handler refuses it).
pub fn sql_keys(detector: &crate::detect::Detector, sql: &str) -> Option<Vec<(String, std::ops::Range<usize>)>> {
    let found = crate::postgres::encoded::find_in_sql(detector, sql).ok()?;
    Some(found.into_iter().map(|f| (f.detection.rule_id.to_string(), f.range)).collect())
}

/// COPY text-format escapes decoded (`postgres::encoded::copy_unescape`).
pub fn copy_unescape(block: &[u8]) -> Option<Vec<u8>> {
    crate::postgres::encoded::copy_unescape(block)
}

/// Decodes a stored row of session records (`n` records from seq
/// `first_seq`) as `sessions verify` does: how many it held and the row
/// encoded again from them, or the seq of the first record it could not
/// read.
pub fn record_row(body: &[u8], first_seq: u64, n: u64) -> Result<(usize, Vec<u8>), u64> {
    use crate::record::{chunk, SessionId, GENESIS_HASH};
    let session = SessionId::from_stored("0123456789ab-0123456789ab".into());
    let records = chunk::decode(&session, first_seq, GENESIS_HASH.to_owned(), n, body).map_err(|e| e.seq(first_seq))?;
    let mut again = chunk::Chunk::new(session, first_seq, GENESIS_HASH.to_owned());
    for r in &records {
        again.push(r.ts, &r.kind, &r.hash, &r.data);
    }
    Ok((records.len(), again.body))
}
