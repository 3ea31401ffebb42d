//! Rule-set and HTTP scanning tests. Failure messages show previews and
//! fingerprints, never the (fake) secrets themselves.

use std::{io::Write, sync::Arc};

use base64::Engine;
use http::{HeaderMap, HeaderValue, Method, Uri};

use super::{
    http_scan::{self, BodyLimits, BodyScanner, Location},
    rules, DetectConfig, DetectError, Detector, FingerprintKey, ScanStatus, Secret, Uninspectable,
};

fn redact(s: &str) -> String {
    let secret = Secret::new(s.as_bytes());
    format!("{} ({} bytes, {})", secret.preview(), s.len(), secret.fingerprint(&FingerprintKey::from_bytes([7; 32])))
}

fn detector() -> Arc<Detector> {
    static DET: std::sync::OnceLock<Arc<Detector>> = std::sync::OnceLock::new();
    Arc::clone(DET.get_or_init(|| Arc::new(Detector::builtin().expect("built-in rules compile"))))
}

#[test]
fn builtin_rule_set_is_large_enough() {
    assert!(detector().rule_count() >= 60, "{}", detector().rule_count());
}

#[test]
fn every_rule_detects_its_examples_and_no_rule_detects_negatives() {
    let det = detector();
    let specs = rules::builtin_specs().unwrap();
    let mut failures = Vec::new();
    for spec in &specs {
        if spec.examples.is_empty() {
            failures.push(format!("{}: no examples", spec.id));
        }
        for ex in &spec.examples {
            if !det.scan(ex.as_bytes()).iter().any(|d| *d.rule_id == *spec.id) {
                let got: Vec<String> = det.scan(ex.as_bytes()).iter().map(|d| d.rule_id.to_string()).collect();
                failures.push(format!("{}: example {} not detected (got {got:?})", spec.id, redact(ex)));
            }
        }
        for neg in &spec.negatives {
            let found = det.scan(neg.as_bytes());
            if !found.is_empty() {
                let by: Vec<String> = found.iter().map(|d| format!("{} {}", d.rule_id, d.secret.preview())).collect();
                failures.push(format!("{}: negative {} detected by {by:?}", spec.id, redact(neg)));
            }
        }
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn examples_survive_embedding_in_traffic() {
    // Each example inside a JSON body and between unrelated text, scanned whole.
    let det = detector();
    for spec in rules::builtin_specs().unwrap() {
        for ex in &spec.examples {
            let text = format!("GET /x HTTP/1.1\nhost: a\n\nlead text {ex} trailing text\n");
            assert!(
                det.scan(text.as_bytes()).iter().any(|d| *d.rule_id == *spec.id),
                "{}: {} not found in context",
                spec.id,
                redact(ex)
            );
        }
    }
}

#[test]
fn detector_is_send_sync_and_stream_is_send() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Detector>();
    send::<super::StreamScanner>();
    send::<BodyScanner>();
}

#[test]
fn concurrent_scans_share_one_detector() {
    let det = detector();
    let token = cursor_key();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let det = Arc::clone(&det);
            let data = format!("k={token}\n").repeat(50);
            std::thread::spawn(move || (0..50).map(|_| det.scan(data.as_bytes()).len()).collect::<Vec<_>>())
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap().iter().all(|&n| n == 50));
    }
}

fn cursor_key() -> String {
    // No typed run (`a1b2c3d4`, `abcdef`): those read as placeholders.
    format!("key_{}", "3f9a1c7e5b2d8046".repeat(3) + "9e0d7c1b5a3f6248")
}

fn write_rules(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.yaml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[test]
fn custom_rules_and_disabled_rules() {
    let (_dir, path) = write_rules(
        "rules:\n- id: acme-token\n  pattern: 'acme_[a-z0-9]{24}'\n  keywords: [acme_]\n  entropy: 3.0\n  confidence: high\n",
    );
    let config =
        DetectConfig { custom_rules: Some(path), disabled_rules: vec!["cursor-api-key".into()], ..Default::default() };
    let det = Detector::new(&config).unwrap();
    assert_eq!(det.rule_count(), detector().rule_count());
    let found = det.scan(b"ACME=acme_k3j4h5g6f7d8s9a0q1w2e3r4 and ".as_slice());
    assert_eq!(found.iter().map(|d| &*d.rule_id).collect::<Vec<_>>(), ["acme-token"]);
    assert!(det.scan(cursor_key().as_bytes()).is_empty());
}

#[test]
fn invalid_custom_rules_name_file_rule_and_reason() {
    let (_dir, path) = write_rules("rules:\n- id: broken\n  pattern: 'abc(['\n");
    let err = Detector::new(&DetectConfig { custom_rules: Some(path.clone()), ..Default::default() }).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DetectError::Rule { .. }), "{msg}");
    assert!(msg.contains(&path.display().to_string()) && msg.contains("broken"), "{msg}");

    let (_dir, path) = write_rules("rules:\n- id: x\n  pattern: 'abc'\n  entropy: high\n");
    let msg = Detector::new(&DetectConfig { custom_rules: Some(path.clone()), ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(msg.contains(&path.display().to_string()) && msg.contains("entropy"), "{msg}");

    let (_dir, path) = write_rules("rules:\n- id: github-pat\n  pattern: 'abcdef'\n");
    let msg = Detector::new(&DetectConfig { custom_rules: Some(path), ..Default::default() }).unwrap_err().to_string();
    assert!(msg.contains("duplicate"), "{msg}");

    let err = Detector::new(&DetectConfig { disabled_rules: vec!["nope".into()], ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("nope"));
}

#[test]
fn head_scanning_covers_query_headers_and_basic_auth() {
    let det = detector();
    let key = cursor_key();
    let uri: Uri = format!("/v1/things?api_key={}&x=1", key.replacen("key_", "key%5F", 1)).parse().unwrap();
    let mut headers = HeaderMap::new();
    let other_key = key.replace('3', "7");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{other_key}:"));
    headers.insert("authorization", HeaderValue::from_str(&format!("Basic {basic}")).unwrap());
    headers.insert("x-api-key", HeaderValue::from_static("Zx8Q2mL0pR7vT4nB6wK1yH3jQ9"));
    let hits = http_scan::scan_head(&det, &Method::GET, &uri, &headers);
    let locs: Vec<String> = hits.iter().map(|h| format!("{} {}", h.detection.rule_id, h.location)).collect();
    assert!(locs.contains(&"cursor-api-key query:api_key".to_string()), "{locs:?}");
    assert!(locs.contains(&"cursor-api-key header:authorization:basic-user".to_string()), "{locs:?}");
    assert!(locs.contains(&"generic-api-key header:x-api-key".to_string()), "{locs:?}");
    // The raw request line repeats the query secret: each secret is reported once.
    assert_eq!(hits.len(), 3, "{locs:?}");
}

#[test]
fn bearer_and_unknown_credentials() {
    let det = detector();
    let mut headers = HeaderMap::new();
    headers.insert("authorization", HeaderValue::from_str(&format!("Bearer {}", cursor_key())).unwrap());
    headers.insert("private-token", HeaderValue::from_static("opaque-Format-7Hq2Lx9Vz3Kp"));
    headers.insert("x-csrf-token", HeaderValue::from_static("not-a-credential-123456"));
    let creds = http_scan::auth_credentials(&headers);
    assert_eq!(creds.len(), 2, "{creds:?}");
    let unknown = http_scan::unknown_credentials(&det, &headers, |_| false);
    assert_eq!(unknown.len(), 1);
    assert_eq!(&*unknown[0].detection.rule_id, http_scan::UNKNOWN_AUTH_RULE);
    assert_eq!(unknown[0].location, Location::Header("private-token".into()));
    assert!(http_scan::unknown_credentials(&det, &headers, |s| s.as_bytes().starts_with(b"opaque")).is_empty());
}

#[test]
fn placeholders_and_weak_unknown_credentials_are_low_confidence() {
    let det = detector();
    let confidence = |value: &str| {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_str(value).unwrap());
        let hits = http_scan::unknown_credentials(&det, &headers, |_| false);
        hits.first().map(|h| h.detection.confidence)
    };
    for placeholder in [
        "Bearer ",
        "Bearer none",
        "Bearer null",
        "Bearer xxx",
        "Bearer <token>",
        "Bearer changeme",
        "Bearer abc123",
        "Bearer aaaaaaaaaaaaaaaaaaaaaaaa",
        "Bearer <your-api-key-goes-here>",
        "Bearer ${OPENAI_API_KEY_PLACEHOLDER}",
        "Bearer xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    ] {
        let c = confidence(placeholder);
        assert!(c.is_none_or(|c| c == crate::detect::Confidence::Low), "{placeholder}: {c:?}");
    }
    assert_eq!(confidence("Bearer q8Zr2LwV9xKp3TnB7mYc4HsJ6dFa"), Some(crate::detect::Confidence::Medium));
}

fn body_hits(headers: &HeaderMap, body: &[u8], chunk: usize) -> Vec<http_scan::Hit> {
    let mut scanner = BodyScanner::new(detector(), headers, BodyLimits::default());
    let mut hits = Vec::new();
    for c in body.chunks(chunk) {
        hits.extend(scanner.feed(c));
    }
    hits.extend(scanner.finish());
    assert_eq!(scanner.status(), ScanStatus::Complete);
    hits
}

fn headers(content_type: &str, encoding: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_str(content_type).unwrap());
    if let Some(e) = encoding {
        h.insert("content-encoding", HeaderValue::from_str(e).unwrap());
    }
    h
}

#[test]
fn json_body_with_escapes_reports_path() {
    let key = cursor_key();
    // `\u005f` is `_`, `\/` is `/`: the key only exists after unescaping.
    let escaped = key.replacen('_', "\\u005f", 1);
    let body = format!(r#"{{"items":[1,{{"x":true}}],"auth":{{"token":"{escaped}","n":null}}}}"#);
    for chunk in [1, 5, 4096] {
        let hits = body_hits(&headers("application/json; charset=utf-8", None), body.as_bytes(), chunk);
        let locs: Vec<String> = hits.iter().map(|h| format!("{} {}", h.detection.rule_id, h.location)).collect();
        assert_eq!(locs, ["cursor-api-key body:$.auth.token"], "chunk {chunk}");
    }
}

#[test]
fn compressed_bodies_are_decoded_in_chunks() {
    let key = cursor_key();
    let body = format!("{}api_key={key}&other=1", "filler=abc&".repeat(5000));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    zl.write_all(body.as_bytes()).unwrap();
    let zl = zl.finish().unwrap();
    let mut raw = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    raw.write_all(body.as_bytes()).unwrap();
    let raw = raw.finish().unwrap();
    let mut br = Vec::new();
    {
        let mut w = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
        w.write_all(body.as_bytes()).unwrap();
    }
    for (enc, data) in [("gzip", gz), ("deflate", zl), ("deflate", raw), ("br", br)] {
        for chunk in [7, 1000] {
            let hits = body_hits(&headers("application/x-www-form-urlencoded", Some(enc)), &data, chunk);
            let locs: Vec<String> = hits.iter().map(|h| format!("{} {}", h.detection.rule_id, h.location)).collect();
            assert_eq!(locs, ["cursor-api-key body:form.api_key"], "{enc} chunk {chunk}");
        }
    }
}

#[test]
fn decoded_size_is_capped() {
    let body = vec![b'a'; 1 << 20];
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&body).unwrap();
    let gz = gz.finish().unwrap();
    let mut scanner =
        BodyScanner::new(detector(), &headers("text/plain", Some("gzip")), BodyLimits { max_decoded: 4096 });
    scanner.feed(&gz);
    scanner.finish();
    assert_eq!(scanner.status(), ScanStatus::Uninspectable(Uninspectable::TooLarge { limit: 4096 }));
    assert_eq!(scanner.decoded_bytes(), 4096);
}

#[test]
fn multipart_fields_are_located() {
    let key = cursor_key();
    let body = format!(
        "--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n--XyZ\r\nContent-Disposition: form-data; name=\"cfg\"; filename=\"a.env\"\r\nContent-Type: text/plain\r\n\r\nCURSOR={key}\n\r\n--XyZ--\r\n"
    );
    for chunk in [1, 3, 64, 4096] {
        let hits = body_hits(&headers("multipart/form-data; boundary=XyZ", None), body.as_bytes(), chunk);
        let locs: Vec<String> = hits.iter().map(|h| format!("{} {}", h.detection.rule_id, h.location)).collect();
        assert_eq!(locs, ["cursor-api-key body:multipart.cfg"], "chunk {chunk}");
    }
}

#[test]
fn invalid_json_falls_back_to_raw() {
    let body = format!("not json at all {}", cursor_key());
    let hits = body_hits(&headers("application/json", None), body.as_bytes(), 3);
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].location, Location::Body(String::new()));
}

/// A connection's remembered clean header lines change nothing: every
/// head gets the hits `scan_head` gives it, a line with a key is never
/// remembered, and the same name with another value is scanned again.
#[test]
fn remembered_clean_header_lines_give_the_same_hits() {
    let det = detector();
    let key = cursor_key();
    let uri: Uri = "/v1/things".parse().unwrap();
    let clean = [("host", "api.example.com"), ("user-agent", "curl/8.5.0"), ("accept", "*/*")];
    let head = |extra: &[(&'static str, String)]| {
        let mut headers = HeaderMap::new();
        for (n, v) in clean {
            headers.append(n, HeaderValue::from_static(v));
        }
        for (n, v) in extra {
            headers.append(*n, HeaderValue::from_str(v).unwrap());
        }
        headers
    };
    let heads = [
        head(&[]),
        head(&[("x-note", format!("deploy with {key}"))]),
        head(&[("x-note", format!("deploy with {key}"))]),
        head(&[("x-note", "nothing here".to_string())]),
        head(&[("x-note", format!("again {key}"))]),
        head(&[("user-agent", key.clone())]),
    ];
    let summary = |hits: &[http_scan::Hit]| {
        let mut v: Vec<String> = hits
            .iter()
            .map(|h| {
                let fp = h.detection.secret.fingerprint(&FingerprintKey::from_bytes([7; 32]));
                format!("{} {} {fp}", h.detection.rule_id, h.location)
            })
            .collect();
        v.sort();
        v
    };
    let mut memo = http_scan::CleanHeaders::default();
    for (i, headers) in heads.iter().enumerate() {
        let plain = http_scan::scan_head(&det, &Method::GET, &uri, headers);
        let remembered = http_scan::scan_head_remembering(&det, &Method::GET, &uri, headers, &mut memo);
        assert_eq!(summary(&plain), summary(&remembered), "head {i}");
        if i > 0 && i != 3 {
            assert!(!plain.is_empty(), "head {i} carries a key: {}", redact(&key));
        }
    }
}

fn spec_detector(yaml: &str) -> Detector {
    let specs = rules::parse_rule_file("test rules", yaml).unwrap();
    Detector::from_specs(&specs.into_iter().map(|s| ("test rules".to_string(), s)).collect::<Vec<_>>()).unwrap()
}

#[test]
fn min_match_len_is_the_shortest_confirm_match() {
    let one = |pattern: &str, confirm: Option<&str>| {
        let confirm = confirm.map_or(String::new(), |c| format!("  confirm: '{c}'\n"));
        spec_detector(&format!("rules:\n- id: a\n  pattern: '{pattern}'\n{confirm}")).min_match_len()
    };
    // No confirm regex: the pattern is the confirm regex.
    assert_eq!(one("tok_[a-z0-9]{20}", None), 24);
    // A confirm match shorter than any prefilter match: the confirm's
    // (the whole match, not only the secret's group).
    assert_eq!(one("tok_[a-z0-9]{20}", Some("(?:^|x)(k_[a-z0-9]{20})")), 22);
    assert_eq!(one("tok_[a-z0-9]{20}", Some("tok_(?P<secret>[a-z0-9]{1,20})")), 5);
    // A prefilter shorter than the confirm match: still the confirm's,
    // since only a confirm match in the buffer makes a detection.
    assert_eq!(one("(?i)psexec", Some("(?i)psexec\\s-p\\s(?P<secret>\\S{3,128})")), 13);
    // Alternatives and optional parts count at their shortest.
    assert_eq!(one("(?:ab[0-9]{3}|abcd[0-9]{10})x?", None), 5);
    // The shortest rule bounds the detector.
    let two = spec_detector("rules:\n- id: a\n  pattern: 'tok_[a-z0-9]{20}'\n- id: b\n  pattern: 'zz[0-9]{7}'\n");
    assert_eq!(two.min_match_len(), 9);
}

#[test]
fn no_builtin_known_positive_is_shorter_than_the_bound() {
    let bound = detector().min_match_len();
    // Pinned so that a rule change moving it is seen: the views skip
    // base64 and hex runs that decode to fewer bytes (`mask::views`).
    assert_eq!(bound, BUILTIN_MIN_MATCH, "built-in rules' shortest match changed");
    let mut shortest = usize::MAX;
    for spec in rules::builtin_specs().unwrap() {
        let rule = spec.compile(rules::BUILTIN_SOURCE, rules::MAX_LOOKBACK).unwrap();
        for ex in &spec.examples {
            // What a detection of this example spans: its confirm match.
            let whole = rule.confirm.find_iter(ex.as_bytes()).map(|m| m.len()).min();
            let whole = whole.unwrap_or_else(|| panic!("{}: example {} has no confirm match", spec.id, redact(ex)));
            assert!(whole >= bound, "{}: example {} matches {whole} bytes < {bound}", spec.id, redact(ex));
            shortest = shortest.min(whole);
        }
    }
    assert!(shortest >= bound && shortest < usize::MAX, "{shortest}");
}

/// The built-in rules' shortest possible match: curl's `-u a:bcd`
/// (`curl-user-credentials`).
const BUILTIN_MIN_MATCH: usize = 8;
