//! Tests of the holes adversarial testing found (issue 9): decoders that
//! failed open, keys next to word characters or binary length bytes,
//! encodings that hid keys, and findings lost from large messages. Keys are
//! built at run time; failure messages show previews, never keys.

use std::{io::Write, sync::Arc};

use base64::Engine;
use http::{HeaderMap, HeaderValue, Method, Uri};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::{
    http_scan::{self, BodyLimits, BodyScanner, Hit},
    protobuf::encode,
    rules,
    status::{EncodingLayer, Format},
    Detector, ScanStatus, Secret, Uninspectable, WsConfig, WsScanner, MAX_HITS_PER_MESSAGE,
};

pub(super) fn detector() -> Arc<Detector> {
    static DET: std::sync::OnceLock<Arc<Detector>> = std::sync::OnceLock::new();
    Arc::clone(DET.get_or_init(|| Arc::new(Detector::builtin().expect("built-in rules compile"))))
}

/// A fresh random Cursor key.
pub(super) fn cursor_key(rng: &mut StdRng) -> String {
    let hex: String = (0..64).map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16)])).collect();
    format!("key_{hex}")
}

pub(super) fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub(super) fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub(super) fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::stream::encode_all(data, 3).unwrap()
}

pub(super) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
    }
    h
}

/// Hits and final status of a body fed in `chunk`-byte pieces.
pub(super) fn scan_body(h: &HeaderMap, body: &[u8], chunk: usize) -> (Vec<Hit>, ScanStatus) {
    let mut scanner = BodyScanner::new(detector(), h, BodyLimits::default());
    let mut hits = Vec::new();
    for c in body.chunks(chunk.max(1)) {
        hits.extend(scanner.feed(c));
    }
    hits.extend(scanner.finish());
    (hits, scanner.status())
}

pub(super) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn has(hits: &[Hit], secret: &str) -> bool {
    hits.iter().any(|h| h.detection.secret.as_bytes() == secret.as_bytes())
}

fn show(hits: &[Hit]) -> Vec<String> {
    hits.iter().map(|h| format!("{} {} {}", h.detection.rule_id, h.location, h.detection.secret.preview())).collect()
}

#[track_caller]
fn assert_found(hits: &[Hit], status: &ScanStatus, secret: &str, what: &str) {
    assert!(
        has(hits, secret),
        "{what}: {} not found in {:?} ({status:?})",
        Secret::new(secret.as_bytes()).preview(),
        show(hits)
    );
    assert_eq!(*status, ScanStatus::Complete, "{what}");
}

// --- 1. decoders never fail open ---------------------------------------

#[test]
fn unknown_and_broken_content_encodings_are_uninspectable() {
    let mut rng = StdRng::seed_from_u64(1);
    let key = cursor_key(&mut rng);
    let plain = format!("token={key}");
    let gz = gzip(plain.as_bytes());
    let mut member_then_raw = gz.clone();
    member_then_raw.extend_from_slice(format!("&more={key}").as_bytes());
    let mut zstd_truncated = zstd(plain.as_bytes());
    zstd_truncated.truncate(zstd_truncated.len() - 3);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("foo", plain.clone().into_bytes()),
        ("gzip", plain.clone().into_bytes()),
        ("gzip", member_then_raw),
        ("gzip", gz[..gz.len() - 4].to_vec()),
        ("zstd", plain.clone().into_bytes()),
        ("zstd", zstd_truncated),
        ("br", plain.clone().into_bytes()),
        ("deflate", plain.clone().into_bytes()),
        ("gzip, snappy", gz.clone()),
    ];
    for (encoding, body) in cases {
        for chunk in [1, 7, 4096] {
            let h = headers(&[("content-type", "text/plain"), ("content-encoding", encoding)]);
            let (_, status) = scan_body(&h, &body, chunk);
            assert!(
                matches!(
                    status,
                    ScanStatus::Uninspectable(
                        Uninspectable::DecodeError { .. } | Uninspectable::UnknownEncoding { .. }
                    )
                ),
                "{encoding} chunk {chunk}: {status:?}"
            );
        }
    }
    // The status is known after the first feed, before anything is forwarded.
    let mut scanner = BodyScanner::new(detector(), &headers(&[("content-encoding", "foo")]), BodyLimits::default());
    assert_eq!(
        scanner.status(),
        ScanStatus::Uninspectable(Uninspectable::UnknownEncoding { layer: EncodingLayer::Content, name: "foo".into() })
    );
    scanner.feed(b"x");
    let mut scanner = BodyScanner::new(detector(), &headers(&[("content-encoding", "gzip")]), BodyLimits::default());
    scanner.feed(b"this is not gzip at all");
    assert!(!scanner.status().is_complete());
}

#[test]
fn multi_member_gzip_and_zstd_are_decoded_whole() {
    let mut rng = StdRng::seed_from_u64(2);
    let (k1, k2) = (cursor_key(&mut rng), cursor_key(&mut rng));
    let mut two = gzip(format!("a={k1}\n").as_bytes());
    two.extend(gzip(format!("b={k2}\n").as_bytes()));
    let mut zz = zstd(format!("a={k1}\n").as_bytes());
    zz.extend(zstd(format!("b={k2}\n").as_bytes()));
    for (encoding, body) in [("gzip", two), ("zstd", zz)] {
        for chunk in [1, 5, 100_000] {
            let (hits, status) = scan_body(&headers(&[("content-encoding", encoding)]), &body, chunk);
            assert_found(&hits, &status, &k1, encoding);
            assert_found(&hits, &status, &k2, encoding);
        }
    }
}

#[test]
fn decoded_bytes_beyond_the_limit_are_too_large() {
    let body = gzip(&vec![b'a'; 1 << 20]);
    let h = headers(&[("content-encoding", "gzip")]);
    let mut scanner = BodyScanner::new(detector(), &h, BodyLimits { max_decoded: 4096 });
    scanner.feed(&body);
    assert_eq!(scanner.status(), ScanStatus::Uninspectable(Uninspectable::TooLarge { limit: 4096 }));
    scanner.finish();
    assert_eq!(scanner.status(), ScanStatus::Uninspectable(Uninspectable::TooLarge { limit: 4096 }));
    // Plain bodies too: nothing beyond the limit passes as scanned.
    let mut scanner = BodyScanner::new(detector(), &HeaderMap::new(), BodyLimits { max_decoded: 10 });
    scanner.feed(b"0123456789");
    assert!(scanner.status().is_complete());
    scanner.feed(b"x");
    assert!(!scanner.status().is_complete());
}

// --- 2. keys next to any byte ------------------------------------------

/// The secret each example of each rule yields, by rule id.
/// `(rule, example, secret, standalone)`: `standalone` when the rule finds
/// the secret without the context around it (it has no `confirm` regex).
pub(super) fn example_secrets() -> Vec<(String, String, String, bool)> {
    let det = detector();
    let mut out = Vec::new();
    for spec in rules::builtin_specs().unwrap() {
        for ex in &spec.examples {
            let found = det.scan(ex.as_bytes());
            let d = found.iter().find(|d| *d.rule_id == *spec.id).expect("examples are detected");
            let secret = String::from_utf8(d.secret.as_bytes().to_vec()).unwrap();
            out.push((spec.id.clone(), ex.clone(), secret, spec.confirm.is_none()));
        }
    }
    out
}

/// Generic assignment rules keep a boundary before the name.
pub(super) fn is_generic(rule: &str) -> bool {
    rule.starts_with("generic-")
}

#[test]
fn keys_are_found_whatever_byte_surrounds_them() {
    let det = detector();
    // Binary framing bytes, word characters, the protobuf length of a
    // Cursor key (0x44, `D`), high bytes.
    let around: Vec<u8> = vec![
        0x00, 0x01, 0x0a, 0x12, 0x1a, 0x22, b'-', b'.', b'0', b'9', b'A', b'D', b'Z', b'_', b'a', b'x', b'z', 0x7f,
        0x80, 0xff,
    ];
    let mut failures = Vec::new();
    for (rule, example, secret, standalone) in example_secrets() {
        for &b in &around {
            let generic = is_generic(&rule);
            if generic && (b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')) {
                continue;
            }
            // Before the whole example, and before the bare secret.
            let mut inputs = vec![[&[b][..], example.as_bytes()].concat()];
            if standalone && example != secret {
                inputs.push([&[b][..], secret.as_bytes(), &[b][..]].concat());
            }
            let after_ok = !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'=' | b'/' | b'+'));
            if after_ok || !generic {
                inputs.push([example.as_bytes(), &[b][..]].concat());
            }
            for input in inputs {
                // A rule whose format runs on (a subdomain, a variable-length
                // token) may take the neighbour in: still this key.
                let found = det.scan(&input);
                if !found.iter().any(|d| *d.rule_id == *rule && contains(d.secret.as_bytes(), secret.as_bytes())) {
                    failures.push(format!("{rule}: {} next to 0x{b:02x}", Secret::new(secret.as_bytes()).preview()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn a_cursor_key_in_a_protobuf_string_is_found_raw() {
    let mut rng = StdRng::seed_from_u64(3);
    let key = cursor_key(&mut rng);
    let mut msg = Vec::new();
    encode::varint_field(1, 7, &mut msg);
    encode::bytes_field(2, key.as_bytes(), &mut msg);
    assert_eq!(msg[3], b'D', "68 bytes: the length byte is `D`");
    encode::bytes_field(8, b"next", &mut msg);
    let found = detector().scan(&msg);
    assert!(found.iter().any(|d| d.secret.as_bytes() == key.as_bytes()), "{found:?}");
}

// --- 3. encodings --------------------------------------------------------

#[test]
fn lenient_json_and_json_by_its_looks() {
    let mut rng = StdRng::seed_from_u64(4);
    let key = cursor_key(&mut rng);
    // The key only exists after unescaping.
    let esc = key.replacen('_', "\\u005f", 1);
    let docs = [
        format!(r#"{{"n": NaN, "auth": {{"token": "{esc}"}}}}"#),
        format!("\u{feff}{{\"auth\": {{\"token\": \"{esc}\"}}}}"),
        format!("{{ // a comment\n \"a\": 1, /* another */ \"auth\": {{\"token\": \"{esc}\"}}}}"),
        format!("{{'auth': {{token: '{esc}', x: -Infinity,}},}}"),
        format!("[1, 2e5, true, null, {{\"auth\": {{\"token\": \"{esc}\"}}}}]"),
    ];
    for doc in &docs {
        for ct in [Some("application/json"), Some("text/plain"), Some("application/octet-stream; x=1"), None] {
            let h = match ct {
                Some(ct) => headers(&[("content-type", ct)]),
                None => HeaderMap::new(),
            };
            for chunk in [1, 3, 4096] {
                let (hits, status) = scan_body(&h, doc.as_bytes(), chunk);
                assert_found(&hits, &status, &key, &format!("{ct:?} chunk {chunk}"));
            }
        }
    }
    // UTF-16, both byte orders, with and without a byte-order mark.
    let doc = format!(r#"{{"auth": {{"token": "{esc}"}}}}"#);
    let le: Vec<u8> = doc.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let be: Vec<u8> = doc.encode_utf16().flat_map(u16::to_be_bytes).collect();
    for body in [le.clone(), be.clone(), [&[0xff, 0xfe][..], &le].concat(), [&[0xfe, 0xff][..], &be].concat()] {
        for chunk in [1, 3, 4096] {
            let (hits, status) = scan_body(&headers(&[("content-type", "application/json")]), &body, chunk);
            assert_found(&hits, &status, &key, &format!("utf-16 chunk {chunk}"));
            assert!(hits.iter().any(|h| h.location.to_string() == "body:$.auth.token"), "{:?}", show(&hits));
        }
    }
}

#[test]
fn json_that_stops_being_json_is_scanned_raw_including_what_was_swallowed() {
    let mut rng = StdRng::seed_from_u64(5);
    let key = cursor_key(&mut rng);
    for body in [format!(r#"{{"a": n{key}}}"#), format!(r#"{{"a": 1{key}}}"#), format!("[/{key}]")] {
        for chunk in [1, 4096] {
            let (hits, _) = scan_body(&headers(&[("content-type", "application/json")]), body.as_bytes(), chunk);
            assert!(has(&hits, &key), "chunk {chunk}: {:?}", show(&hits));
        }
    }
    // Keys of objects are scanned, however long.
    let body = format!(r#"{{"{}{key}": 1}}"#, "k".repeat(300));
    let (hits, status) = scan_body(&headers(&[("content-type", "application/json")]), body.as_bytes(), 7);
    assert_found(&hits, &status, &key, "long object key");
}

fn multipart(parts: &[(&str, &str, &[u8])]) -> Vec<u8> {
    let mut body = b"preamble\r\n".to_vec();
    for (name, extra_headers, content) in parts {
        body.extend_from_slice(
            format!("--XyZ\r\nContent-Disposition: form-data; name=\"{name}\"\r\n{extra_headers}\r\n").as_bytes(),
        );
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--XyZ--\r\n");
    body
}

#[test]
fn multipart_parts_are_decoded_by_their_own_headers() {
    let mut rng = StdRng::seed_from_u64(6);
    let keys: Vec<String> = (0..5).map(|_| cursor_key(&mut rng)).collect();
    let json = format!(r#"{{"token": "{}"}}"#, keys[0].replacen('_', "\\u005f", 1));
    let b64_text = b64(format!("CURSOR={}", keys[1]).as_bytes());
    let wrapped: String =
        b64_text.as_bytes().chunks(10).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join("\r\n");
    let qp = format!("CURSOR={}", keys[2]).replace('_', "=5F").replace('a', "=\r\na");
    let b64_json = b64(format!(r#"{{"k": "{}"}}"#, keys[3].replacen('_', "\\u005f", 1)).as_bytes());
    let body = multipart(&[
        ("j", "Content-Type: application/json\r\n", json.as_bytes()),
        ("b", "Content-Transfer-Encoding: base64\r\n", wrapped.as_bytes()),
        ("q", "Content-Transfer-Encoding: quoted-printable\r\n", qp.as_bytes()),
        ("bj", "Content-Type: application/json\r\nContent-Transfer-Encoding: BASE64\r\n", b64_json.as_bytes()),
        ("sniffed", "", format!(r#"{{"t": "{}"}}"#, keys[4].replacen('_', "\\u005f", 1)).as_bytes()),
    ]);
    let h = headers(&[("content-type", "multipart/form-data; boundary=XyZ")]);
    for chunk in [1, 3, 64, 4096] {
        let (hits, status) = scan_body(&h, &body, chunk);
        for (i, key) in keys.iter().enumerate() {
            assert_found(&hits, &status, key, &format!("part {i} chunk {chunk}"));
        }
        let locs = show(&hits);
        assert!(hits.iter().any(|h| h.location.to_string() == "body:multipart.j/$.token"), "{locs:?}");
        assert!(hits.iter().any(|h| h.location.to_string() == "body:multipart.b"), "{locs:?}");
    }
    let bad = multipart(&[("u", "Content-Transfer-Encoding: x-uuencode\r\n", b"begin 644 x")]);
    let (_, status) = scan_body(&h, &bad, 4096);
    assert!(
        matches!(
            status,
            ScanStatus::Uninspectable(Uninspectable::UnknownEncoding { layer: EncodingLayer::Transfer, .. })
        ),
        "{status:?}"
    );
    let (_, status) = scan_body(&h, b"no boundary anywhere", 4096);
    assert!(matches!(status, ScanStatus::Uninspectable(Uninspectable::Malformed { format: Format::Multipart, .. })));
}

#[test]
fn base64_in_headers_query_and_body_strings_is_decoded() {
    let mut rng = StdRng::seed_from_u64(7);
    let key = cursor_key(&mut rng);
    let det = detector();
    let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{{\"k\":\"{key}\"}}"));
    for value in [
        b64(key.as_bytes()),
        b64(format!("ci:{key}").as_bytes()),
        url_safe.clone(),
        format!("x{}", b64(key.as_bytes())),
        format!("v1.{}", b64(&gzip(key.as_bytes()))),
    ] {
        let h = headers(&[("x-custom-data", &value)]);
        let hits = http_scan::scan_head(&det, &Method::GET, &Uri::from_static("/"), &h);
        assert!(has(&hits, &key), "header {}: {:?}", value.len(), show(&hits));
        let uri: Uri = format!("/x?data={}", value.replace('+', "%2B").replace('/', "%2F")).parse().unwrap();
        let hits = http_scan::scan_head(&det, &Method::GET, &uri, &HeaderMap::new());
        if !value.starts_with('x') {
            assert!(has(&hits, &key), "query: {:?}", show(&hits));
        }
    }
    let body = format!(
        r#"{{"content": "{}", "data": "data:text/plain;base64,{}"}}"#,
        b64(format!("CURSOR={key}").as_bytes()),
        url_safe
    );
    for chunk in [1, 4096] {
        let (hits, status) = scan_body(&headers(&[("content-type", "application/json")]), body.as_bytes(), chunk);
        assert_found(&hits, &status, &key, "json base64");
        assert!(hits.iter().any(|h| h.location.to_string() == "body:$.content/base64"), "{:?}", show(&hits));
    }
}

/// A gRPC-style frame.
pub(super) fn frame(flags: u8, message: &[u8]) -> Vec<u8> {
    let mut f = vec![flags];
    f.extend_from_slice(&(message.len() as u32).to_be_bytes());
    f.extend_from_slice(message);
    f
}

/// A protobuf request carrying `key` two messages deep.
pub(super) fn proto_with(key: &[u8]) -> Vec<u8> {
    let mut inner = Vec::new();
    encode::varint_field(1, 1, &mut inner);
    encode::bytes_field(2, key, &mut inner);
    let mut msg = Vec::new();
    encode::bytes_field(1, b"model-name", &mut msg);
    encode::bytes_field(5, &inner, &mut msg);
    msg
}

#[test]
fn grpc_connect_and_grpc_web_messages_are_walked() {
    let mut rng = StdRng::seed_from_u64(8);
    let key = cursor_key(&mut rng);
    let msg = proto_with(key.as_bytes());
    let plain = [frame(0, b"\x0a\x02hi"), frame(0, &msg)].concat();
    let compressed = [frame(1, &gzip(b"\x0a\x02hi")), frame(1, &gzip(&msg))].concat();
    let zstd_frames = [frame(0, b""), frame(1, &zstd(&msg))].concat();
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<u8>, &'a str);
    let cases: Vec<Case> = vec![
        (vec![("content-type", "application/grpc")], plain.clone(), "body:grpc[1]/5/2"),
        (
            vec![("content-type", "application/grpc+proto"), ("grpc-encoding", "gzip")],
            compressed.clone(),
            "body:grpc[1]/5/2",
        ),
        (vec![("content-type", "application/grpc"), ("grpc-encoding", "zstd")], zstd_frames, "body:grpc[1]/5/2"),
        (
            vec![("content-type", "application/connect+proto"), ("connect-content-encoding", "gzip")],
            compressed.clone(),
            "body:connect[1]/5/2",
        ),
        (vec![("content-type", "application/grpc-web+proto")], plain.clone(), "body:grpc-web[1]/5/2"),
        (
            vec![("content-type", "application/grpc-web-text")],
            [b64(&plain[..7]), b64(&plain[7..])].concat().into_bytes(),
            "body:grpc-web[1]/5/2",
        ),
        (vec![("content-type", "application/proto")], msg.clone(), "body:5/2"),
        (vec![("content-type", "application/x-protobuf"), ("content-encoding", "gzip")], gzip(&msg), "body:5/2"),
    ];
    for (h, body, location) in cases {
        let h = headers(&h);
        for chunk in [1, 6, 4096] {
            let (hits, status) = scan_body(&h, &body, chunk);
            assert_found(&hits, &status, &key, &format!("{h:?} chunk {chunk}"));
            // One occurrence, one hit, where it is most precisely located.
            let locs: Vec<String> = hits.iter().map(|h| h.location.to_string()).collect();
            assert_eq!(locs, [location], "{h:?} chunk {chunk}");
        }
    }
    // JSON over gRPC, escaped.
    let json = format!(r#"{{"key": "{}"}}"#, key.replacen('_', "\\u005f", 1));
    let (hits, status) =
        scan_body(&headers(&[("content-type", "application/grpc+json")]), &frame(0, json.as_bytes()), 3);
    assert_found(&hits, &status, &key, "grpc+json");
}

#[test]
fn grpc_framing_it_cannot_follow_is_uninspectable() {
    let msg = proto_with(b"nothing secret here");
    let ct = [("content-type", "application/grpc")];
    let truncated = frame(0, &msg)[..10].to_vec();
    let reserved = frame(0x04, &msg);
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<u8>);
    let cases: Vec<Case> = vec![
        (ct.to_vec(), truncated),
        (ct.to_vec(), reserved),
        (vec![ct[0], ("grpc-encoding", "snappy")], frame(1, &msg)),
        (ct.to_vec(), frame(1, &gzip(&msg))),
        (vec![ct[0], ("grpc-encoding", "gzip")], frame(1, &msg)),
        (vec![("content-type", "application/grpc-web-text")], b"AAAA!!!!".to_vec()),
    ];
    for (h, body) in cases {
        let (_, status) = scan_body(&headers(&h), &body, 4096);
        assert!(!status.is_complete(), "{h:?}");
    }
    // An oversize frame length is refused at once.
    let mut scanner = BodyScanner::new(detector(), &headers(&ct), BodyLimits { max_decoded: 1000 });
    scanner.feed(&[0, 0, 1, 0, 0]);
    assert_eq!(scanner.status(), ScanStatus::Uninspectable(Uninspectable::TooLarge { limit: 1000 }));
}

// --- 4. every key of a message -----------------------------------------

#[test]
fn every_distinct_key_of_a_message_is_reported() {
    let mut rng = StdRng::seed_from_u64(9);
    let keys: Vec<String> = (0..200).map(|_| cursor_key(&mut rng)).collect();
    let layouts: Vec<(HeaderMap, Vec<u8>)> = vec![
        (headers(&[("content-type", "application/json")]), serde_json::to_vec(&keys).unwrap()),
        (headers(&[("content-type", "text/plain")]), keys.join("\n").into_bytes()),
        (headers(&[("content-type", "text/plain")]), keys.concat().into_bytes()),
        (
            headers(&[("content-type", "application/x-www-form-urlencoded")]),
            keys.iter().enumerate().map(|(i, k)| format!("k{i}={k}")).collect::<Vec<_>>().join("&").into_bytes(),
        ),
        (
            headers(&[("content-type", "application/grpc")]),
            keys.iter().map(|k| frame(0, &proto_with(k.as_bytes()))).collect::<Vec<_>>().concat(),
        ),
    ];
    for (i, (h, body)) in layouts.iter().enumerate() {
        for chunk in [100, 1 << 20] {
            let (hits, status) = scan_body(h, body, chunk);
            assert!(status.is_complete());
            let missing = keys.iter().filter(|k| !has(&hits, k)).count();
            assert_eq!(missing, 0, "layout {i} chunk {chunk}: {} hits", hits.len());
            assert_eq!(hits.len(), 200, "layout {i}: {:?}", &show(&hits)[..3]);
        }
    }
    // Beyond the cap: counted, not reported.
    let many: Vec<String> = (0..MAX_HITS_PER_MESSAGE + 250).map(|_| cursor_key(&mut rng)).collect();
    let mut scanner = BodyScanner::new(detector(), &headers(&[("content-type", "text/plain")]), BodyLimits::default());
    let mut hits = scanner.feed(many.join(" ").as_bytes());
    hits.extend(scanner.finish());
    assert_eq!(hits.len(), MAX_HITS_PER_MESSAGE);
    assert_eq!(scanner.dropped_hits(), 250);
    // Exact duplicates collapse, the same key elsewhere does not.
    let body = format!(r#"{{"a": "{0}", "b": "{0}", "a": "{0}"}}"#, keys[0]);
    let (hits, _) = scan_body(&headers(&[("content-type", "application/json")]), body.as_bytes(), 4096);
    assert_eq!(hits.len(), 2, "{:?}", show(&hits));
}

// --- WebSocket -----------------------------------------------------------

/// A masked client frame.
pub(super) fn ws_frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = vec![(u8::from(fin) << 7) | (u8::from(rsv1) << 6) | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// permessage-deflate of one message with a persistent compressor.
pub(super) fn ws_deflate(c: &mut flate2::Compress, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, flate2::FlushCompress::Sync).unwrap();
    while out.capacity() - out.len() < 64 {
        out.reserve(64);
        c.compress_vec(&[], &mut out, flate2::FlushCompress::Sync).unwrap();
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn ws_scan(config: WsConfig, bytes: &[u8], chunk: usize) -> (Vec<Hit>, ScanStatus) {
    let mut s = WsScanner::new(detector(), config);
    let mut hits = Vec::new();
    for c in bytes.chunks(chunk.max(1)) {
        hits.extend(s.feed(c));
    }
    hits.extend(s.finish());
    (hits, s.status())
}

fn deflate_config(no_takeover: bool) -> WsConfig {
    let value = if no_takeover { "permessage-deflate; client_no_context_takeover" } else { "permessage-deflate" };
    WsConfig::from_handshake(&headers(&[("sec-websocket-extensions", value)]), BodyLimits::default())
}

#[test]
fn websocket_messages_are_unmasked_reassembled_inflated_and_scanned() {
    let mut rng = StdRng::seed_from_u64(10);
    let keys: Vec<String> = (0..4).map(|_| cursor_key(&mut rng)).collect();
    let json = format!(r#"{{"type": "auth", "token": "{}"}}"#, keys[0].replacen('_', "\\u005f", 1));
    let proto = proto_with(keys[1].as_bytes());
    let text = format!("hello {}", keys[2]);
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let plain = [
        ws_frame(false, false, 1, &json.as_bytes()[..10], mask),
        ws_frame(true, false, 9, b"ping", mask),
        ws_frame(false, false, 0, &json.as_bytes()[10..30], mask),
        ws_frame(true, false, 0, &json.as_bytes()[30..], mask),
        ws_frame(true, false, 2, &proto, mask),
        ws_frame(true, false, 1, text.as_bytes(), mask),
        ws_frame(true, false, 8, &[&[3, 232][..], format!("bye {}", keys[3]).as_bytes()].concat(), mask),
    ]
    .concat();
    for chunk in [1, 5, 4096] {
        let (hits, status) = ws_scan(WsConfig::default(), &plain, chunk);
        for key in &keys {
            assert_found(&hits, &status, key, &format!("chunk {chunk}"));
        }
        let locs: Vec<String> = hits.iter().map(|h| h.location.to_string()).collect();
        assert_eq!(locs, ["body:ws[0]/$.token", "body:ws[1]/5/2", "body:ws[2]", "body:ws.close"], "chunk {chunk}");
    }
    for no_takeover in [false, true] {
        let mut c = flate2::Compress::new(flate2::Compression::default(), false);
        let mut frames = Vec::new();
        for message in [json.as_bytes(), &proto, text.as_bytes(), json.as_bytes()] {
            if no_takeover {
                c.reset();
            }
            let z = ws_deflate(&mut c, message);
            let half = z.len() / 2;
            frames.push(ws_frame(false, true, 1, &z[..half], mask));
            frames.push(ws_frame(true, false, 0, &z[half..], mask));
        }
        for chunk in [1, 7, 4096] {
            let (hits, status) = ws_scan(deflate_config(no_takeover), &frames.concat(), chunk);
            for key in &keys[..3] {
                assert_found(&hits, &status, key, &format!("deflate no_takeover={no_takeover} chunk {chunk}"));
            }
            assert_eq!(hits.iter().filter(|h| has(std::slice::from_ref(h), &keys[0])).count(), 2);
        }
    }
}

#[test]
fn websocket_framing_it_cannot_follow_is_uninspectable() {
    let mask = [1, 2, 3, 4];
    let msg = b"{\"a\": 1}";
    let mut unmasked = ws_frame(true, false, 1, msg, mask);
    unmasked[1] &= 0x7f;
    let cases: Vec<(WsConfig, Vec<u8>, &str)> = vec![
        (WsConfig::default(), ws_frame(true, true, 1, msg, mask), "rsv1 without deflate"),
        (
            deflate_config(false),
            ws_frame(true, false, 1, msg, mask)
                .into_iter()
                .enumerate()
                .map(|(i, b)| if i == 0 { b | 0x20 } else { b })
                .collect(),
            "rsv2",
        ),
        (WsConfig::default(), ws_frame(true, false, 3, msg, mask), "opcode 3"),
        (WsConfig::default(), ws_frame(false, false, 9, b"x", mask), "fragmented ping"),
        (WsConfig::default(), ws_frame(true, false, 0, msg, mask), "stray continuation"),
        (
            WsConfig::default(),
            [ws_frame(false, false, 1, msg, mask), ws_frame(true, false, 2, msg, mask)].concat(),
            "interleaved",
        ),
        (WsConfig::default(), unmasked, "unmasked"),
        (WsConfig::default(), ws_frame(true, false, 1, msg, mask)[..6].to_vec(), "truncated"),
        (deflate_config(false), ws_frame(true, true, 1, b"\xff\xff\xff garbage", mask), "bad deflate"),
        (WsConfig { max_message: 4, ..WsConfig::default() }, ws_frame(true, false, 1, msg, mask), "too large"),
        (
            WsConfig::from_handshake(
                &headers(&[("sec-websocket-extensions", "x-webkit-deflate-frame")]),
                BodyLimits::default(),
            ),
            Vec::new(),
            "unknown extension",
        ),
    ];
    for (config, bytes, what) in cases {
        let (_, status) = ws_scan(config, &bytes, 4096);
        assert!(!status.is_complete(), "{what}");
    }
}

#[test]
fn websocket_bytes_are_released_only_at_message_boundaries() {
    let mut scanner = WsScanner::new(detector(), WsConfig::default());
    let first = ws_frame(false, false, 1, b"hello ", [1, 2, 3, 4]);
    let ping = ws_frame(true, false, 9, b"p", [5, 6, 7, 8]);
    let last = ws_frame(true, false, 0, b"world", [9, 9, 9, 9]);
    scanner.feed(&first);
    assert_eq!(scanner.scanned_through(), 0, "a fragment is not a whole message");
    scanner.feed(&ping);
    assert_eq!(scanner.scanned_through(), 0, "a ping inside a fragmented message is no boundary");
    scanner.feed(&last[..3]);
    assert_eq!(scanner.scanned_through(), 0);
    scanner.feed(&last[3..]);
    let total = (first.len() + ping.len() + last.len()) as u64;
    assert_eq!(scanner.scanned_through(), total, "the message is complete");
    let next = ws_frame(true, false, 2, b"bin", [0, 0, 0, 1]);
    scanner.feed(&next[..2]);
    assert_eq!(scanner.scanned_through(), total);
    scanner.feed(&next[2..]);
    assert_eq!(scanner.scanned_through(), total + next.len() as u64);
    assert!(scanner.status().is_complete());
}
