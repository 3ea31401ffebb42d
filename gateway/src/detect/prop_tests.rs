//! The placement property: every built-in rule's positive examples are
//! found, and its negative examples stay clean, wherever and however a job
//! may put them — in each header form, the query, the path, JSON (plain and
//! `\u`-escaped), a form, multipart parts of each transfer encoding, a
//! base64 body, each compression, a protobuf field in gRPC / Connect /
//! gRPC-web text framing, WebSocket messages (masked, fragmented,
//! compressed) — split into chunks anywhere.
//!
//! Every (example, placement) pair is checked whole and split at three
//! pseudo-random points; proptest then splits random pairs at arbitrary
//! boundaries, and one placement is split at every boundary for each rule.
//! Failure messages show previews, never the (fake) keys.

use std::io::Write;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::{
    decode_tests::{b64, contains, detector, frame, gzip, ws_deflate, ws_frame, zstd},
    http_scan::{self, BodyLimits, BodyScanner, Hit},
    protobuf::encode,
    rules, ScanStatus, Secret, WsConfig, WsScanner,
};

/// A message as the gateway would see it.
enum Message {
    Http { uri: String, headers: Vec<(String, Vec<u8>)>, body: Vec<u8> },
    Ws { deflate: bool, bytes: Vec<u8> },
}

type Build = fn(&[u8]) -> Option<Message>;

fn pct(data: &[u8]) -> String {
    data.iter()
        .map(|&b| if b.is_ascii_alphanumeric() || b == b'-' { char::from(b).to_string() } else { format!("%{b:02X}") })
        .collect()
}

fn header_ok(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
}

fn json_escape(data: &[u8], all: bool) -> Vec<u8> {
    let text = String::from_utf8_lossy(data);
    let mut out = String::new();
    for c in text.chars() {
        match c {
            _ if all => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.into_bytes()
}

fn json_doc(ex: &[u8], all: bool) -> Vec<u8> {
    [&b"{\"build\": 7, \"note\": \""[..], &json_escape(ex, all), b"\", \"tags\": [\"ci\"]}"].concat()
}

fn http(uri: &str, headers: &[(&str, &[u8])], body: Vec<u8>) -> Option<Message> {
    let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect();
    Some(Message::Http { uri: uri.to_string(), headers, body })
}

fn qp(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, &b) in data.iter().enumerate() {
        if b == b'=' || b == b'_' || !(0x20..0x7f).contains(&b) || i % 7 == 3 {
            out.extend_from_slice(format!("={b:02X}").as_bytes());
        } else {
            out.push(b);
        }
        if i % 20 == 19 {
            out.extend_from_slice(b"=\r\n");
        }
    }
    out
}

fn multipart(ex: &[u8], transfer: &str) -> Option<Message> {
    let (cte, content) = match transfer {
        "base64" => ("Content-Transfer-Encoding: base64\r\n", b64(ex).into_bytes()),
        "quoted-printable" => ("Content-Transfer-Encoding: quoted-printable\r\n", qp(ex)),
        _ => ("", ex.to_vec()),
    };
    let body = [
        &b"--b0undary\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nfirst\r\n--b0undary\r\nContent-Disposition: form-data; name=\"cfg\"; filename=\"ci.txt\"\r\nContent-Type: text/plain\r\n"[..],
        cte.as_bytes(),
        b"\r\n",
        &content,
        b"\r\n--b0undary--\r\n",
    ]
    .concat();
    http("/upload", &[("content-type", b"multipart/form-data; boundary=b0undary")], body)
}

fn compressed(ex: &[u8], encoding: &str) -> Option<Message> {
    let doc = json_doc(ex, false);
    let body = match encoding {
        "gzip" => gzip(&doc),
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&doc).ok()?;
            e.finish().ok()?
        }
        "br" => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                w.write_all(&doc).ok()?;
            }
            out
        }
        _ => zstd(&doc),
    };
    http("/v1/items", &[("content-type", b"application/json"), ("content-encoding", encoding.as_bytes())], body)
}

fn proto(ex: &[u8]) -> Vec<u8> {
    let mut inner = Vec::new();
    encode::varint_field(1, 3, &mut inner);
    encode::bytes_field(2, ex, &mut inner);
    let mut msg = Vec::new();
    encode::bytes_field(1, b"ci-runner", &mut msg);
    encode::bytes_field(4, &inner, &mut msg);
    msg
}

fn ws_text(ex: &[u8], fragmented: bool, deflate: bool) -> Option<Message> {
    let mask = [0x9a, 0x01, 0x7e, 0x33];
    let mut payload = [&b"{\"op\": \"send\", \"text\": \""[..], &json_escape(ex, false), b"\"}"].concat();
    let mut bytes = ws_frame(true, false, 1, b"{\"op\": \"hello\"}", mask);
    let mut c = flate2::Compress::new(flate2::Compression::default(), false);
    if deflate {
        bytes = ws_frame(true, true, 1, &ws_deflate(&mut c, b"{\"op\": \"hello\"}"), mask);
        payload = ws_deflate(&mut c, &payload);
    }
    if fragmented {
        let (a, b) = payload.split_at(payload.len() / 3);
        let (b, c) = b.split_at(b.len() / 2);
        bytes.extend(ws_frame(false, deflate, 1, a, mask));
        bytes.extend(ws_frame(true, false, 9, b"keepalive", mask));
        bytes.extend(ws_frame(false, false, 0, b, mask));
        bytes.extend(ws_frame(true, false, 0, c, mask));
    } else {
        bytes.extend(ws_frame(true, deflate, 1, &payload, mask));
    }
    Some(Message::Ws { deflate, bytes })
}

/// Every placement and encoding, by name.
const PLACEMENTS: &[(&str, Build)] = &[
    ("header authorization bearer", |ex| {
        header_ok(ex).then(|| http("/", &[("authorization", &[&b"Bearer "[..], ex].concat())], Vec::new()))?
    }),
    ("header authorization basic", |ex| {
        let value = format!("Basic {}", b64(&[&b"ci:"[..], ex].concat()));
        http("/", &[("authorization", value.as_bytes())], Vec::new())
    }),
    ("header custom", |ex| header_ok(ex).then(|| http("/", &[("x-ci-note", ex)], Vec::new()))?),
    ("header custom base64", |ex| http("/", &[("x-ci-data", b64(ex).as_bytes())], Vec::new())),
    ("query", |ex| http(&format!("/v1/search?page=2&note={}", pct(ex)), &[], Vec::new())),
    ("path", |ex| http(&format!("/v1/notes/{}/view", pct(ex)), &[], Vec::new())),
    ("json", |ex| http("/v1/items", &[("content-type", b"application/json")], json_doc(ex, false))),
    ("json \\u-escaped", |ex| http("/v1/items", &[("content-type", b"application/json")], json_doc(ex, true))),
    ("form", |ex| {
        let body = format!("build=7&note={}&x=1", pct(ex)).into_bytes();
        http("/submit", &[("content-type", b"application/x-www-form-urlencoded")], body)
    }),
    ("multipart", |ex| multipart(ex, "")),
    ("multipart base64", |ex| multipart(ex, "base64")),
    ("multipart quoted-printable", |ex| multipart(ex, "quoted-printable")),
    ("body base64", |ex| http("/blob", &[("content-type", b"text/plain")], b64(ex).into_bytes())),
    ("json gzip", |ex| compressed(ex, "gzip")),
    ("json deflate", |ex| compressed(ex, "deflate")),
    ("json br", |ex| compressed(ex, "br")),
    ("json zstd", |ex| compressed(ex, "zstd")),
    ("grpc protobuf", |ex| {
        let body = [frame(0, b""), frame(0, &proto(ex))].concat();
        http("/pkg.Svc/Call", &[("content-type", b"application/grpc")], body)
    }),
    ("grpc protobuf gzip", |ex| {
        let body = frame(1, &gzip(&proto(ex)));
        http("/pkg.Svc/Call", &[("content-type", b"application/grpc+proto"), ("grpc-encoding", b"gzip")], body)
    }),
    ("connect protobuf zstd", |ex| {
        let body = [frame(1, &zstd(&proto(ex))), frame(2, b"{}")].concat();
        let h: [(&str, &[u8]); 2] =
            [("content-type", b"application/connect+proto"), ("connect-content-encoding", b"zstd")];
        http("/pkg.Svc/Stream", &h, body)
    }),
    ("grpc-web-text protobuf", |ex| {
        let framed = [frame(0, &proto(ex)), frame(0x80, b"grpc-status: 0\r\n")].concat();
        let (a, b) = framed.split_at(framed.len() / 2);
        let body = [b64(a), b64(b)].concat().into_bytes();
        http("/pkg.Svc/Call", &[("content-type", b"application/grpc-web-text")], body)
    }),
    ("websocket masked", |ex| ws_text(ex, false, false)),
    ("websocket fragmented", |ex| ws_text(ex, true, false)),
    ("websocket permessage-deflate fragmented", |ex| ws_text(ex, true, true)),
];

/// `(rule, example, secret)`; `secret` is `None` for a negative example.
fn examples() -> &'static [(String, String, Option<String>)] {
    static EXAMPLES: std::sync::OnceLock<Vec<(String, String, Option<String>)>> = std::sync::OnceLock::new();
    EXAMPLES.get_or_init(load_examples)
}

fn load_examples() -> Vec<(String, String, Option<String>)> {
    let det = detector();
    let mut out = Vec::new();
    for spec in rules::builtin_specs().unwrap() {
        for ex in &spec.examples {
            let found = det.scan(ex.as_bytes());
            let d = found.iter().find(|d| *d.rule_id == *spec.id).expect("examples are detected");
            out.push((spec.id.clone(), ex.clone(), Some(String::from_utf8(d.secret.as_bytes().to_vec()).unwrap())));
        }
        for neg in &spec.negatives {
            out.push((spec.id.clone(), neg.clone(), None));
        }
    }
    out
}

/// Hits and status of `message`, its body (or WebSocket bytes) split at `splits`.
fn scan(message: &Message, splits: &[usize]) -> (Vec<Hit>, ScanStatus) {
    let det = detector();
    let chunks = |data: &[u8]| -> Vec<Vec<u8>> {
        let mut points: Vec<usize> = splits.iter().map(|&s| s % (data.len() + 1)).collect();
        points.sort_unstable();
        let mut out = Vec::new();
        let mut at = 0;
        for p in points.into_iter().chain([data.len()]) {
            out.push(data[at..p.max(at)].to_vec());
            at = p.max(at);
        }
        out
    };
    match message {
        Message::Http { uri, headers, body } => {
            let uri: Uri = uri.parse().expect("test uri");
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                map.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_bytes(v).unwrap());
            }
            let mut hits = http_scan::scan_head(&det, &Method::POST, &uri, &map);
            let mut scanner = BodyScanner::new(det, &map, BodyLimits::default());
            for c in chunks(body) {
                hits.extend(scanner.feed(&c));
            }
            hits.extend(scanner.finish());
            (hits, scanner.status())
        }
        Message::Ws { deflate, bytes } => {
            let config = if *deflate {
                let mut h = HeaderMap::new();
                h.insert("sec-websocket-extensions", HeaderValue::from_static("permessage-deflate"));
                WsConfig::from_handshake(&h, BodyLimits::default())
            } else {
                WsConfig::default()
            };
            let mut s = WsScanner::new(det, config);
            let mut hits = Vec::new();
            for c in chunks(bytes) {
                hits.extend(s.feed(&c));
            }
            hits.extend(s.finish());
            (hits, s.status())
        }
    }
}

/// `None` when the placement behaves; otherwise what went wrong.
fn check(rule: &str, secret: Option<&str>, placement: &str, message: &Message, splits: &[usize]) -> Option<String> {
    let (hits, status) = scan(message, splits);
    if status != ScanStatus::Complete {
        return Some(format!("{placement} {splits:?}: status {status:?}"));
    }
    match secret {
        Some(secret) => {
            // The same key, possibly running on into a neighbour, or unescaped
            // where a JSON example was sniffed as JSON.
            let unescaped = secret.replace("\\n", "\n");
            let found = hits.iter().any(|h| {
                let got = h.detection.secret.as_bytes();
                *h.detection.rule_id == *rule
                    && [secret.as_bytes(), unescaped.as_bytes()].iter().any(|s| contains(got, s) || contains(s, got))
            });
            (!found).then(|| {
                let got: Vec<String> = hits.iter().map(|h| format!("{} {}", h.detection.rule_id, h.location)).collect();
                format!("{placement} {splits:?}: {} not found (got {got:?})", Secret::new(secret.as_bytes()).preview())
            })
        }
        None => (!hits.is_empty()).then(|| {
            let got: Vec<String> = hits
                .iter()
                .map(|h| format!("{} {} {}", h.detection.rule_id, h.location, h.detection.secret.preview()))
                .collect();
            format!("{placement} {splits:?}: negative detected: {got:?}")
        }),
    }
}

/// Every example of every rule in every placement, whole and split at three
/// pseudo-random points (about a fifth of the pairs per test, so the four
/// tests share the cores).
fn every_placement(part: usize) {
    let mut rng = StdRng::seed_from_u64(0x9e37 + part as u64);
    let mut failures = Vec::new();
    let mut pairs = 0;
    for (i, (rule, example, secret)) in examples().iter().enumerate() {
        if i % 4 != part {
            continue;
        }
        for (name, build) in PLACEMENTS {
            let Some(message) = build(example.as_bytes()) else { continue };
            pairs += 1;
            let random: Vec<usize> = (0..3).map(|_| rng.random_range(0..4096)).collect();
            for splits in [&[][..], &random] {
                if let Some(f) = check(rule, secret.as_deref(), name, &message, splits) {
                    failures.push(format!("{rule} {}: {f}", if secret.is_some() { "example" } else { "negative" }));
                }
            }
        }
    }
    assert!(pairs > 0);
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_example_in_every_placement_0() {
    every_placement(0);
}

#[test]
fn every_example_in_every_placement_1() {
    every_placement(1);
}

#[test]
fn every_example_in_every_placement_2() {
    every_placement(2);
}

#[test]
fn every_example_in_every_placement_3() {
    every_placement(3);
}

#[test]
fn every_placement_covers_every_rule() {
    let examples = examples();
    let rules: std::collections::HashSet<&str> = examples.iter().map(|(r, _, _)| r.as_str()).collect();
    assert_eq!(rules.len(), detector().rule_count());
    for (name, build) in PLACEMENTS {
        let covered: std::collections::HashSet<&str> = examples
            .iter()
            .filter(|(_, ex, s)| s.is_some() && build(ex.as_bytes()).is_some())
            .map(|(r, _, _)| r.as_str())
            .collect();
        // Raw header values cannot hold a line break: the PEM rule is covered
        // there through the base64 and Basic placements.
        let missing: Vec<&&str> = rules.difference(&covered).collect();
        assert!(missing.iter().all(|r| **r == "private-key") && missing.len() <= 1, "{name}: {missing:?}");
    }
}

#[test]
fn a_key_split_at_every_boundary_is_found() {
    // One placement per kind of stream: plain JSON, and gzip under gRPC.
    let mut failures = Vec::new();
    let mut done = std::collections::HashSet::new();
    for (rule, example, secret) in examples() {
        let Some(secret) = secret else { continue };
        // The first example of each rule.
        if !done.insert(rule) {
            continue;
        }
        for placement in ["json", "grpc protobuf gzip"] {
            let build = PLACEMENTS.iter().find(|(n, _)| *n == placement).map(|(_, b)| b).unwrap();
            let message = build(example.as_bytes()).unwrap();
            let Message::Http { body, .. } = &message else { continue };
            // In plain JSON only splits inside the key (and next to it) can
            // hide it; compressed, any split can.
            let splits: Vec<usize> = match body.windows(secret.len()).position(|w| w == secret.as_bytes()) {
                Some(at) if placement == "json" => {
                    (at.saturating_sub(2)..=(at + secret.len() + 2).min(body.len())).collect()
                }
                _ => (0..=body.len()).collect(),
            };
            for split in splits {
                if let Some(f) = check(rule, Some(secret), placement, &message, &[split]) {
                    failures.push(format!("{rule}: {f}"));
                    break;
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_example_any_placement_any_chunking(
        example in any::<proptest::sample::Index>(),
        placement in 0..PLACEMENTS.len(),
        splits in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let examples = examples();
        let (rule, ex, secret) = &examples[example.index(examples.len())];
        let (name, build) = PLACEMENTS[placement];
        if let Some(message) = build(ex.as_bytes()) {
            let failure = check(rule, secret.as_deref(), name, &message, &splits);
            prop_assert!(failure.is_none(), "{rule}: {}", failure.unwrap_or_default());
        }
    }
}
