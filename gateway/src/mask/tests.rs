//! Masking tests. Keys come from the built-in rules' (fake) examples;
//! failure messages show previews, never the keys.

use std::{
    io::{Read, Write},
    sync::{Arc, OnceLock},
};

use http::{HeaderMap, HeaderValue};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::*;
use crate::detect::{rules, Detector, Secret};

fn detector() -> Arc<Detector> {
    static DET: OnceLock<Arc<Detector>> = OnceLock::new();
    Arc::clone(DET.get_or_init(|| Arc::new(Detector::builtin().expect("built-in rules compile"))))
}

/// The secret in the first example of built-in rule `rule`.
fn key(rule: &str) -> Vec<u8> {
    let specs = rules::builtin_specs().unwrap();
    let spec = specs.iter().find(|s| s.id == rule).unwrap();
    let example = spec.examples[0].as_bytes();
    let d = detector().scan(example);
    let d = d.iter().find(|d| &*d.rule_id == rule).unwrap();
    d.secret.as_bytes().to_vec()
}

fn preview(b: &[u8]) -> String {
    Secret::new(b).preview()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[track_caller]
fn assert_absent(out: &[u8], secret: &[u8]) {
    assert!(!contains(out, secret), "secret {} leaked", preview(secret));
}

fn masker(spec: MaskSpec) -> Arc<Masker> {
    Arc::new(Masker::new(detector(), &spec).unwrap())
}

fn all_rules() -> Arc<Masker> {
    masker(MaskSpec::default())
}

/// Streams `chunks` through a body masker; the concatenated output.
fn stream<'a>(
    m: &Arc<Masker>,
    encoding: Option<&str>,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<u8>, MaskError> {
    let mut body = m.body(encoding)?;
    let mut out = Vec::new();
    for c in chunks {
        out.extend_from_slice(&body.push(c)?);
    }
    out.extend_from_slice(&body.finish()?);
    Ok(out)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(data).read_to_end(&mut out).unwrap();
    out
}

fn brotli_encode(data: &[u8]) -> Vec<u8> {
    let mut e = brotli::CompressorWriter::new(Vec::new(), 4096, 9, 22);
    e.write_all(data).unwrap();
    e.into_inner()
}

fn brotli_decode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    brotli::Decompressor::new(data, 4096).read_to_end(&mut out).unwrap();
    out
}

#[test]
fn secret_in_one_chunk_is_replaced() {
    let ghp = key("github-pat");
    let body = cat(&[b"token is ", &ghp, b" ok"]);
    let out = stream(&all_rules(), None, [&body[..]]).unwrap();
    assert_eq!(text(&out), "token is [MASKED:github-pat] ok");
}

#[test]
fn secret_split_across_two_chunks_at_every_point() {
    let m = all_rules();
    let ghp = key("github-pat");
    let body = cat(&[b"{\"data\": \"", &ghp, b"\"}\n"]);
    let expected = "{\"data\": \"[MASKED:github-pat]\"}\n";
    for split in 0..=body.len() {
        let out = stream(&m, None, [&body[..split], &body[split..]]).unwrap();
        assert_eq!(text(&out), expected, "split at {split}");
    }
}

#[test]
fn secret_in_one_byte_chunks() {
    let m = all_rules();
    let ghp = key("github-pat");
    let sk = key("stripe-secret-key");
    let body = cat(&[b"a=", &ghp, b"\nb=", &sk, b"\n"]);
    let out = stream(&m, None, body.chunks(1)).unwrap();
    assert_eq!(text(&out), "a=[MASKED:github-pat]\nb=[MASKED:stripe-secret-key]\n");
}

#[test]
fn output_never_holds_a_secret_prefix_while_streaming() {
    let m = all_rules();
    let ghp = key("github-pat");
    let body = cat(&[&[b'.'; 3000][..], b" ", &ghp, b" ", &[b'.'; 3000][..]]);
    let mut bm = m.body(None).unwrap();
    let mut out = Vec::new();
    for c in body.chunks(7) {
        out.extend_from_slice(&bm.push(c).unwrap());
        // Not even the rule's fixed prefix plus one random character.
        assert_absent(&out, &ghp[..5]);
    }
    out.extend_from_slice(&bm.finish().unwrap());
    assert_eq!(out.len(), body.len() - ghp.len() + "[MASKED:github-pat]".len());
}

#[test]
fn several_and_overlapping_matches() {
    let ghp = key("github-pat");
    let sk = key("stripe-secret-key");
    // The pattern overlaps the end of the GitHub token and runs past it.
    let tail = &ghp[ghp.len() - 6..];
    let m = masker(MaskSpec {
        patterns: vec![MaskPattern {
            name: "tail".into(),
            regex: format!("{}-[0-9]{{4}}", regex::escape(&text(tail))),
        }],
        ..MaskSpec::default()
    });
    let body = cat(&[b"x ", &ghp, b"-1234 y ", &sk, b" ", &sk, b" z"]);
    let expected = "x [MASKED:github-pat] y [MASKED:stripe-secret-key] [MASKED:stripe-secret-key] z";
    let (out, masked) = m.mask_bytes(&body);
    assert_eq!(text(&out), expected);
    let rules: Vec<&str> = masked.iter().map(|m| &*m.rule).collect();
    assert_eq!(rules, ["github-pat", "stripe-secret-key", "stripe-secret-key"]);
    assert_eq!(masked[0].location, MaskLocation::Body { offset: 2 });
    for chunk in [1, 2, 5, 13] {
        assert_eq!(text(&stream(&m, None, body.chunks(chunk)).unwrap()), expected);
    }
}

#[test]
fn only_selected_rules_are_masked() {
    let ghp = key("github-pat");
    let sk = key("stripe-secret-key");
    let m = masker(MaskSpec { rules: MaskRules::Only(vec!["stripe-secret-key".into()]), ..MaskSpec::default() });
    let body = cat(&[&ghp, b" ", &sk]);
    let (out, _) = m.mask_bytes(&body);
    assert_eq!(out, cat(&[&ghp, b" [MASKED:stripe-secret-key]"]));

    let none = masker(MaskSpec { rules: MaskRules::Only(vec![]), ..MaskSpec::default() });
    assert!(none.is_empty());
    assert_eq!(none.mask_bytes(&body).0, body);
    assert_eq!(none.max_hold_back(), 0);

    let err = Masker::new(
        detector(),
        &MaskSpec { rules: MaskRules::Only(vec!["no-such-rule".into()]), ..MaskSpec::default() },
    )
    .unwrap_err();
    assert!(matches!(&err, MaskError::UnknownRule(id) if id == "no-such-rule"), "{err}");
}

fn patterns_only(patterns: &[(&str, &str)]) -> Result<Masker, MaskError> {
    Masker::new(
        detector(),
        &MaskSpec {
            rules: MaskRules::Only(vec![]),
            patterns: patterns.iter().map(|(n, r)| MaskPattern { name: n.to_string(), regex: r.to_string() }).collect(),
            json_fields: vec![],
        },
    )
}

#[test]
fn policy_patterns_are_masked_with_find_iter_semantics() {
    let m = Arc::new(patterns_only(&[("corp", r"\bcorp_[0-9a-f]{8}\b"), ("pin", "PIN:[0-9]{4}")]).unwrap());
    let body = b"corp_deadbeef xcorp_deadbeef corp_deadbeefcafe PIN:12345 PIN:1";
    let expected = "[MASKED:corp] xcorp_deadbeef corp_deadbeefcafe [MASKED:pin]5 PIN:1";
    assert_eq!(text(&m.mask_bytes(body).0), expected);
    for chunk in 1..8 {
        assert_eq!(text(&stream(&m, None, body.chunks(chunk)).unwrap()), expected, "chunk {chunk}");
    }
    // `$` only matches at the real end, not at the end of a chunk.
    let m = Arc::new(patterns_only(&[("end", "x{2,3}$")]).unwrap());
    let body = b"xx xxx yxx";
    for chunk in 1..4 {
        assert_eq!(text(&stream(&m, None, body.chunks(chunk)).unwrap()), "xx xxx y[MASKED:end]");
    }
}

#[test]
fn unusable_patterns_are_rejected_by_name() {
    for (name, re, why) in [
        ("open", "tok_[a-z]+", "no maximum match length"),
        ("star", "a.*b", "no maximum match length"),
        ("empty", "x?", "empty string"),
        ("huge", "[a-z]{5000}", "more than the maximum"),
        ("broken", "tok_(", "does not parse"),
    ] {
        let err = patterns_only(&[(name, re)]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("`{name}`")) && msg.contains(why), "{msg}");
    }
    let err = patterns_only(&[("bad name", "x")]).unwrap_err();
    assert!(err.to_string().contains("name"), "{err}");
}

fn json_masker(fields: &[&str]) -> Arc<Masker> {
    masker(MaskSpec {
        rules: MaskRules::Only(vec![]),
        patterns: vec![],
        json_fields: fields.iter().map(|f| f.to_string()).collect(),
    })
}

#[test]
fn json_field_values_are_masked() {
    let m = json_masker(&["password", "pin", "creds", "token"]);
    let cases: &[(&str, &str)] = &[
        (
            r#"{"user": {"name": "a", "password": "hunter2"}}"#,
            r#"{"user": {"name": "a", "password": "[MASKED:json:password]"}}"#,
        ),
        (r#"{"password":"a\"b\\","x":1}"#, r#"{"password":"[MASKED:json:password]","x":1}"#),
        (r#"{"pin" :  1234, "p": 2}"#, r#"{"pin" :  "[MASKED:json:pin]", "p": 2}"#),
        (r#"{"pin": true}"#, r#"{"pin": "[MASKED:json:pin]"}"#),
        (r#"{"pin": null}"#, r#"{"pin": null}"#),
        (r#"{"password": ""}"#, r#"{"password": ""}"#),
        (r#"{"creds": {"a": [1, "}"], "b": "x\"]"}, "next": "v"}"#, r#"{"creds": "[MASKED:json:creds]", "next": "v"}"#),
        (r#"["password", "pin", {"Password": "x"}]"#, r#"["password", "pin", {"Password": "x"}]"#),
        (r#"{"xpassword": "a", "password2": "b"}"#, r#"{"xpassword": "a", "password2": "b"}"#),
        (
            "data: {\"token\": \"abc\"}\n\ndata: {\"token\": \"def\"}\n\n",
            "data: {\"token\": \"[MASKED:json:token]\"}\n\ndata: {\"token\": \"[MASKED:json:token]\"}\n\n",
        ),
        // Unterminated at the end: still masked.
        (r#"{"password": "abc"#, r#"{"password": "[MASKED:json:password]"#),
    ];
    for (input, expected) in cases {
        assert_eq!(text(&m.mask_bytes(input.as_bytes()).0), *expected, "{input}");
        for chunk in [1, 2, 3, 5] {
            let out = stream(&m, None, input.as_bytes().chunks(chunk)).unwrap();
            assert_eq!(text(&out), *expected, "{input} in chunks of {chunk}");
        }
    }
}

#[test]
fn json_value_split_at_every_point() {
    let m = json_masker(&["secret"]);
    let body = br#"{"a": "\"secret\": no", "secret" : "s3cr\"et\\", "b": 2}"#;
    let expected = r#"{"a": "\"secret\": no", "secret" : "[MASKED:json:secret]", "b": 2}"#;
    for split in 0..=body.len() {
        let out = stream(&m, None, [&body[..split], &body[split..]]).unwrap();
        assert_eq!(text(&out), expected, "split at {split}");
    }
}

#[test]
fn long_json_value_streams_with_bounded_memory() {
    let m = json_masker(&["blob"]);
    let mut body = br#"{"blob": ""#.to_vec();
    body.extend(std::iter::repeat_n(b'a', 1 << 20));
    body.extend_from_slice(br#"", "after": 1}"#);
    let mut bm = m.body(None).unwrap();
    let mut out = Vec::new();
    for c in body.chunks(4096) {
        out.extend_from_slice(&bm.push(c).unwrap());
        assert!(bm.held() <= m.max_hold_back() + 4096, "held {}", bm.held());
    }
    out.extend_from_slice(&bm.finish().unwrap());
    assert_eq!(text(&out), r#"{"blob": "[MASKED:json:blob]", "after": 1}"#);
}

#[test]
fn detector_and_json_matches_merge() {
    let ghp = key("github-pat");
    let m = masker(MaskSpec { json_fields: vec!["token".into()], ..MaskSpec::default() });
    let body = cat(&[b"{\"token\": \"", &ghp, b"\", \"other\": \"", &ghp, b"\"}"]);
    let expected = "{\"token\": \"[MASKED:github-pat]\", \"other\": \"[MASKED:github-pat]\"}";
    assert_eq!(text(&m.mask_bytes(&body).0), expected);
    let with_prefix = cat(&[b"{\"token\": \"pre-", &ghp, b"\"}"]);
    assert_eq!(text(&m.mask_bytes(&with_prefix).0), "{\"token\": \"[MASKED:json:token]\"}");
}

#[test]
fn headers_are_masked_in_place() {
    let ghp = key("github-pat");
    let sk = key("stripe-secret-key");
    let m = masker(MaskSpec {
        patterns: vec![MaskPattern { name: "session".into(), regex: "sess-[0-9]{6}".into() }],
        ..MaskSpec::default()
    });
    let mut headers = HeaderMap::new();
    headers.insert("x-token", HeaderValue::from_bytes(&ghp).unwrap());
    headers.append("set-cookie", HeaderValue::from_bytes(&cat(&[b"k=", &sk, b"; Path=/; HttpOnly"])).unwrap());
    headers.append("set-cookie", HeaderValue::from_static("id=sess-123456; Secure"));
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let masked = m.mask_headers(&mut headers);
    assert_eq!(headers["x-token"], "[MASKED:github-pat]");
    let cookies: Vec<_> = headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies[0], "k=[MASKED:stripe-secret-key]; Path=/; HttpOnly");
    assert_eq!(cookies[1], "id=[MASKED:session]; Secure");
    assert_eq!(headers["content-type"], "application/json");
    let got: Vec<String> = masked.iter().map(|m| format!("{}@{}", m.rule, m.location)).collect();
    assert_eq!(got, ["github-pat@header:x-token", "stripe-secret-key@header:set-cookie", "session@header:set-cookie"]);
}

#[test]
fn remembered_header_lines_mask_as_mask_headers_does() {
    let ghp = key("github-pat");
    let sk = key("stripe-secret-key");
    let headers = || {
        let mut h = HeaderMap::new();
        h.insert("user-agent", HeaderValue::from_static("curl/8.5.0"));
        h.insert("x-token", HeaderValue::from_bytes(&ghp).unwrap());
        h.append("set-cookie", HeaderValue::from_bytes(&cat(&[b"k=", &sk, b"; Path=/"])).unwrap());
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h
    };
    let m = all_rules();
    let mut expected = headers();
    let expected_masked = m.mask_headers(&mut expected);
    assert_eq!(expected_masked.len(), 2);
    // The first call remembers the clean lines; later ones skip them and
    // still mask the keys every time.
    for round in 0..3 {
        let mut got = headers();
        let masked = m.mask_headers_remembered(&mut got);
        assert_eq!(got, expected, "round {round}");
        assert_eq!(masked, expected_masked, "round {round}");
        for v in got.values() {
            assert_absent(v.as_bytes(), &ghp);
            assert_absent(v.as_bytes(), &sk);
        }
    }
    // A line remembered as clean for one masker is not clean for another:
    // a pattern masker masks the user agent the first masker passed.
    let other = masker(MaskSpec {
        patterns: vec![MaskPattern { name: "agent".into(), regex: "curl/[0-9.]{1,16}".into() }],
        ..MaskSpec::default()
    });
    let mut got = headers();
    other.mask_headers_remembered(&mut got);
    assert_eq!(got["user-agent"], "[MASKED:agent]");
    // And back: the first masker starts over and still masks the keys.
    let mut got = headers();
    m.mask_headers_remembered(&mut got);
    assert_eq!(got, expected);
    CLEAN_LINES.with(|memory| assert!(memory.borrow().lines.len() <= MAX_REMEMBERED_LINES));
}

#[test]
fn remembered_texts_mask_as_mask_text_does() {
    let ghp = String::from_utf8(key("github-pat")).unwrap();
    let m = all_rules();
    let clean = "/v1/repos/acme/app/issues?state=open";
    let keyed = format!("/v1/hook?token={ghp}");
    let expected = m.mask_text(&keyed).into_owned();
    assert_ne!(expected, keyed, "the key is masked");
    for round in 0..3 {
        assert!(matches!(m.mask_text_remembered(clean), Cow::Borrowed(t) if t == clean), "round {round}");
        let got = m.mask_text_remembered(&keyed);
        assert_eq!(got, expected, "round {round}");
        assert_absent(got.as_bytes(), ghp.as_bytes());
    }
    // A header line with the same bytes as a remembered text (or the other
    // way round) is not taken for it: texts are remembered under no name.
    let mut h = HeaderMap::new();
    h.insert("x-token", HeaderValue::from_str(&ghp).unwrap());
    assert!(m.mask_text_remembered(&ghp) != ghp);
    m.mask_headers_remembered(&mut h);
    assert_absent(h["x-token"].as_bytes(), ghp.as_bytes());
    // Another masker does not use this one's memory: a pattern masker masks
    // the path the first one passed.
    let other = masker(MaskSpec {
        patterns: vec![MaskPattern { name: "repo".into(), regex: "acme/app".into() }],
        ..MaskSpec::default()
    });
    assert_eq!(other.mask_text_remembered(clean), "/v1/repos/[MASKED:repo]/issues?state=open");
    // Texts longer than what is remembered are masked every time.
    let long = format!("/{}?k={ghp}", "p".repeat(MAX_REMEMBERED_VALUE));
    for _ in 0..2 {
        assert_absent(m.mask_text_remembered(&long).as_bytes(), ghp.as_bytes());
    }
    CLEAN_LINES.with(|memory| assert!(memory.borrow().lines.len() <= MAX_REMEMBERED_LINES));
}

#[test]
fn remembered_lines_are_bounded() {
    let m = all_rules();
    for i in 0..MAX_REMEMBERED_LINES + 10 {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_str(&format!("req-{i}")).unwrap());
        m.mask_headers_remembered(&mut h);
        assert_eq!(h["x-request-id"], format!("req-{i}").as_str());
    }
    CLEAN_LINES.with(|memory| assert!(memory.borrow().lines.len() <= MAX_REMEMBERED_LINES));
}

#[test]
fn header_rules_keyed_on_the_name_apply() {
    let specs = rules::builtin_specs().unwrap();
    let basic = &specs.iter().find(|s| s.id == "http-basic-auth-header").unwrap().examples[0];
    let (name, value) = basic.split_once(": ").unwrap();
    let name = name.to_ascii_lowercase();
    let name = name.as_str();
    let mut headers = HeaderMap::new();
    headers.insert(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
    let masked = all_rules().mask_headers(&mut headers);
    assert_eq!(headers[name], "Basic [MASKED:http-basic-auth-header]");
    assert_eq!(masked.len(), 1);
}

fn mixed_body() -> Vec<u8> {
    let ghp = key("github-pat");
    let sk = key("stripe-secret-key");
    let xoxb = key("slack-bot-token");
    let openai = key("openai-api-key");
    let mut body = Vec::new();
    for i in 0..12u32 {
        body.extend_from_slice(format!("line {i} lorem ipsum dolor sit amet\n").as_bytes());
        match i % 6 {
            0 => body.extend_from_slice(&cat(&[b"GITHUB_TOKEN=", &ghp, b"\n"])),
            1 => body.extend_from_slice(&cat(&[b"{\"password\": \"p\\\"w", &xoxb, b"\", \"n\": 5}\n"])),
            2 => body.extend_from_slice(&cat(&[&sk, b" ", &openai, b" corp_0123abcd corp_0123abcd\n"])),
            3 => body.extend_from_slice(b"{\"pin\": 123456, \"nested\": {\"password\": [1, 2]}}\n"),
            4 => body.extend_from_slice(&cat(&[b"<a href=\"x\">", &openai, b"</a>", &ghp, b"\n"])),
            _ => body.extend(std::iter::repeat_n(b'z', 700 + i as usize * 40)),
        }
    }
    body
}

fn mixed_masker() -> Arc<Masker> {
    masker(MaskSpec {
        rules: MaskRules::All,
        patterns: vec![MaskPattern { name: "corp".into(), regex: r"corp_[0-9a-f]{8}".into() }],
        json_fields: vec!["password".into(), "pin".into()],
    })
}

fn random_chunks(data: &[u8], rng: &mut StdRng, max: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let n = rng.random_range(0..=max).min(data.len() - at);
        out.push(data[at..at + n].to_vec());
        at += n;
    }
    out
}

#[test]
fn random_chunkings_give_the_one_shot_result() {
    let m = mixed_masker();
    let body = mixed_body();
    let (expected, masked) = m.mask_bytes(&body);
    for secret in [key("github-pat"), key("stripe-secret-key"), key("slack-bot-token"), key("openai-api-key")] {
        assert_absent(&expected, &secret);
    }
    assert!(masked.len() >= 20, "{}", masked.len());
    assert!(contains(&expected, b"{\"pin\": \"[MASKED:json:pin]\""));
    let mut rng = StdRng::seed_from_u64(0x6d61736b);
    // Tiny chunks are slow in debug builds (each rescans the detector's tail).
    for round in 0..24 {
        let max = [1, 3, 3, 17, 100, 2000][round % 6].max(if round >= 6 { 8 } else { 0 });
        let chunks = random_chunks(&body, &mut rng, max);
        let out = stream(&m, None, chunks.iter().map(|c| &c[..])).unwrap();
        assert!(out == expected, "round {round} (chunks up to {max}) differs from the one-shot result");
    }
}

#[test]
fn gzip_deflate_and_brotli_round_trip() {
    let m = mixed_masker();
    let body = mixed_body();
    let (expected, _) = m.mask_bytes(&body);
    let ghp = key("github-pat");
    let zlib = {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&body).unwrap();
        e.finish().unwrap()
    };
    let raw = {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&body).unwrap();
        e.finish().unwrap()
    };
    let cases = [
        ("gzip", gzip(&body)),
        ("x-gzip", gzip(&body)),
        ("deflate", zlib),
        ("deflate", raw),
        ("br", brotli_encode(&body)),
    ];
    let mut rng = StdRng::seed_from_u64(7);
    for (encoding, encoded) in cases {
        // The key is in the compressed input (checked via its plaintext)...
        assert!(contains(&decode_any(encoding, &encoded), &ghp));
        for max in [1, 50, 4096, 1 << 20] {
            let chunks = random_chunks(&encoded, &mut rng, max);
            let out = stream(&m, Some(encoding), chunks.iter().map(|c| &c[..])).unwrap();
            // ...and gone from the decompressed output, where the mask is.
            let plain = decode_any(encoding, &out);
            assert_absent(&plain, &ghp);
            assert!(plain == expected, "{encoding} (chunks up to {max}) differs from the one-shot result");
        }
    }
}

fn decode_any(encoding: &str, data: &[u8]) -> Vec<u8> {
    match encoding {
        "br" => brotli_decode(data),
        "deflate" => {
            let mut out = Vec::new();
            if flate2::read::ZlibDecoder::new(data).read_to_end(&mut out).is_err() {
                out.clear();
                flate2::read::DeflateDecoder::new(data).read_to_end(&mut out).unwrap();
            }
            out
        }
        _ => gunzip(data),
    }
}

/// Decodes a compressed stream prefix as far as it goes.
fn decode_prefix(encoding: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => {
            let mut d = flate2::write::GzDecoder::new(&mut out);
            d.write_all(data).unwrap();
            d.flush().unwrap();
        }
        "deflate" => {
            let mut d = flate2::write::ZlibDecoder::new(&mut out);
            d.write_all(data).unwrap();
            d.flush().unwrap();
        }
        _ => {
            let mut d = brotli::DecompressorWriter::new(&mut out, 4096);
            d.write_all(data).unwrap();
            d.flush().unwrap();
        }
    }
    out
}

#[test]
fn each_compressed_push_decodes_so_far() {
    let m = mixed_masker();
    let body = mixed_body();
    let (expected, _) = m.mask_bytes(&body);
    for (encoding, encoded) in [
        ("gzip", gzip(&body)),
        ("br", brotli_encode(&body)),
        ("deflate", {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&body).unwrap();
            e.finish().unwrap()
        }),
    ] {
        let mut bm = m.body(Some(encoding)).unwrap();
        let mut out = Vec::new();
        let mut seen = 0;
        for c in encoded.chunks(64) {
            out.extend_from_slice(&bm.push(c).unwrap());
            let so_far = decode_prefix(encoding, &out);
            assert!(expected.starts_with(&so_far), "{encoding}: not a prefix of the masked body");
            assert!(so_far.len() >= seen);
            seen = so_far.len();
        }
        // Everything but the hold-back was already out before the end.
        assert!(seen + m.max_hold_back() >= expected.len() && seen > 0, "{encoding}: {seen}");
        out.extend_from_slice(&bm.finish().unwrap());
        assert!(decode_any(encoding, &out) == expected, "{encoding}");
    }
}

#[test]
fn malformed_or_truncated_compressed_bodies_fail_closed() {
    let m = all_rules();
    let ghp = key("github-pat");
    let body = cat(&[&[b'x'; 5000][..], &ghp]);
    let mut bad = gzip(&body);
    bad[20] ^= 0xff;
    bad[21] ^= 0x55;
    let mut bm = m.body(Some("gzip")).unwrap();
    let err = bm.push(&bad).and_then(|_| bm.finish()).unwrap_err();
    assert!(matches!(err, MaskError::Decode { encoding: "gzip", .. }), "{err}");
    assert!(matches!(bm.push(b"more"), Err(MaskError::Closed)));

    let err = stream(&m, Some("gzip"), [&b"definitely not gzip"[..]]).unwrap_err();
    assert!(matches!(err, MaskError::Decode { .. }), "{err}");

    let good = gzip(&body);
    let err = stream(&m, Some("gzip"), [&good[..good.len() - 10]]).unwrap_err();
    assert!(matches!(err, MaskError::Decode { .. }), "{err}");

    let br = brotli_encode(&body);
    let err = stream(&m, Some("br"), [&br[..br.len() / 2]]).unwrap_err();
    assert!(matches!(err, MaskError::Decode { encoding: "br", .. }), "{err}");

    let err = stream(&m, Some("deflate"), [&b"\x78"[..]]).unwrap_err();
    assert!(matches!(err, MaskError::Decode { .. }), "{err}");

    // Trailing garbage after the compressed stream.
    let mut trailing = gzip(b"hello");
    trailing.extend_from_slice(b"garbage");
    assert!(stream(&m, Some("gzip"), [&trailing[..]]).is_err());

    // No body at all (HEAD, 304): nothing out, no error.
    assert_eq!(stream(&m, Some("gzip"), []).unwrap(), b"");
}

#[test]
fn unsupported_encodings_are_refused() {
    let m = all_rules();
    for enc in ["zstd", "gzip, br", "compress", "gzip,gzip"] {
        let err = m.body(Some(enc)).unwrap_err();
        assert!(matches!(err, MaskError::UnsupportedEncoding(_)), "{enc}: {err}");
    }
    for enc in [None, Some(""), Some("identity"), Some("GZIP"), Some(" br "), Some("identity, deflate")] {
        assert!(m.body(enc).is_ok(), "{enc:?}");
    }
    assert_eq!(supported_encodings(), "gzip, deflate, br");
}

#[test]
fn decompression_bombs_are_stopped() {
    let m = all_rules();
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..8 {
        e.write_all(&zeros).unwrap();
    }
    let bomb = e.finish().unwrap();
    let mut bm = m.body(Some("gzip")).unwrap().with_expansion_limit(1 << 20, 100);
    let err = bm.push(&bomb).and_then(|_| bm.finish()).unwrap_err();
    assert!(matches!(err, MaskError::Expansion { .. }), "{err}");
}

#[test]
fn hold_back_is_bounded() {
    let m = all_rules();
    // A private key that never ends keeps a candidate open.
    let mut body = b"-----BEGIN RSA PRIVATE KEY-----\n".to_vec();
    let mut x: u32 = 99;
    while body.len() < 300_000 {
        x = x.wrapping_mul(1103515245).wrapping_add(12345);
        body.push(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[(x >> 16) as usize % 64]);
        if body.len().is_multiple_of(65) {
            body.push(b'\n');
        }
    }
    let mut bm = m.body(None).unwrap();
    let (mut fed, mut out) = (0, 0);
    let mut max_lag = 0;
    for c in body.chunks(1000) {
        fed += c.len();
        out += bm.push(c).unwrap().len();
        max_lag = max_lag.max(fed - out);
        assert!(fed - out <= m.max_hold_back(), "lag {} > {}", fed - out, m.max_hold_back());
    }
    assert!(max_lag > detector().overlap() * 4, "the open candidate should hold more: {max_lag}");
    out += bm.finish().unwrap().len();
    assert_eq!(out, body.len());

    // Plain text lags by about the detector's overlap.
    let mut bm = m.body(None).unwrap();
    let (mut fed, mut out) = (0, 0);
    for c in [b"lorem ipsum dolor sit amet ".repeat(100), b"x".repeat(5000)].concat().chunks(1000) {
        fed += c.len();
        out += bm.push(c).unwrap().len();
    }
    assert!(fed - out <= detector().overlap() + 64, "lag {}", fed - out);
}

#[test]
fn nothing_secret_in_debug_output() {
    let ghp = key("github-pat");
    let m = all_rules();
    let body = cat(&[b"t=", &ghp]);
    let mut bm = m.body(None).unwrap();
    let _ = bm.push(&body).unwrap();
    let _ = bm.finish().unwrap();
    let masked = m.mask_bytes(&body).1;
    let mut gz = gzip(&body);
    gz.truncate(gz.len() - 3);
    let err = stream(&m, Some("gzip"), [&gz[..]]).unwrap_err();
    let shown = format!("{masked:?} {bm:?} {m:?} {err:?} {err}");
    assert_absent(shown.as_bytes(), &ghp);
    assert!(shown.contains("github-pat"), "{shown}");
}

#[test]
fn masked_records_are_taken_and_counted() {
    let ghp = key("github-pat");
    let m = all_rules();
    let body = cat(&[b"a ", &ghp, b" b ", &ghp, b" c"]);
    let mut bm = m.body(None).unwrap();
    let _ = bm.push(&body).unwrap();
    let _ = bm.finish().unwrap();
    assert_eq!(bm.masked_count(), 2);
    let taken = bm.take_masked();
    assert_eq!(
        taken.iter().map(|m| m.location.clone()).collect::<Vec<_>>(),
        [MaskLocation::Body { offset: 2 }, MaskLocation::Body { offset: 5 + ghp.len() as u64 }]
    );
    assert!(bm.take_masked().is_empty());
    assert_eq!(bm.masked_count(), 2);
}

#[test]
fn maskers_can_be_shared_and_bodies_sent() {
    fn shared<T: Send + Sync>() {}
    fn sent<T: Send>() {}
    shared::<Masker>();
    sent::<BodyMasker>();
    // Sync too, so it can sit in a `BoxBody`.
    shared::<BodyMasker>();
}

/// Patterns alone, against an independent reference: `find_iter` of each
/// pattern over the whole text, ranges merged in (start, pattern) order.
#[test]
fn streamed_patterns_match_a_whole_text_reference() {
    let patterns: &[(&str, &str)] = &[
        ("p0", "a{1,3}b"),
        ("p1", r"\bab\b"),
        ("p2", "x$"),
        ("p3", "^a"),
        ("p4", r"(?m)^b_"),
        ("p5", r"_[ab]{2}\b"),
        ("p6", "é{1,2}"),
    ];
    let m = Arc::new(patterns_only(patterns).unwrap());
    let regexes: Vec<regex::bytes::Regex> =
        patterns.iter().map(|(_, r)| regex::bytes::Regex::new(r).unwrap()).collect();
    let reference = |data: &[u8]| -> Vec<u8> {
        let mut ranges: Vec<(usize, usize, usize)> = Vec::new();
        for (i, re) in regexes.iter().enumerate() {
            ranges.extend(re.find_iter(data).map(|f| (f.start(), i, f.end())));
        }
        ranges.sort();
        let mut out = Vec::new();
        let (mut at, mut until) = (0, 0);
        for (start, i, end) in ranges {
            if start < until {
                until = until.max(end);
                continue;
            }
            out.extend_from_slice(&data[at.max(until)..start]);
            out.extend_from_slice(format!("[MASKED:{}]", patterns[i].0).as_bytes());
            until = end;
            at = start;
        }
        out.extend_from_slice(&data[at.max(until)..]);
        out
    };
    let alphabet: &[&[u8]] = &[b"a", b"b", b"_", b" ", b"x", b"\n", "é".as_bytes()];
    let mut rng = StdRng::seed_from_u64(42);
    for round in 0..300 {
        let len = rng.random_range(0..120);
        let data: Vec<u8> =
            (0..len).flat_map(|_| alphabet[rng.random_range(0..alphabet.len())].iter().copied()).collect();
        let expected = reference(&data);
        assert_eq!(text(&m.mask_bytes(&data).0), text(&expected), "round {round}: {:?}", text(&data));
        let chunks = random_chunks(&data, &mut rng, 1 + round % 9);
        let out = stream(&m, None, chunks.iter().map(|c| &c[..])).unwrap();
        assert_eq!(text(&out), text(&expected), "round {round} chunked: {:?}", text(&data));
    }
}

// ---------- What the gateway stores or logs: every encoding ----------

fn b64_std(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn b64_url(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Every byte as `%XX` (or `%xx`).
fn percent_all(data: &[u8], upper: bool) -> String {
    data.iter().map(|b| if upper { format!("%{b:02X}") } else { format!("%{b:02x}") }).collect()
}

/// Every byte as `\u00XX` (or `\u00xx`).
fn json_escape_all(data: &[u8], upper: bool) -> String {
    data.iter().map(|b| if upper { format!("\\u{b:04X}") } else { format!("\\u{b:04x}") }).collect()
}

/// The characters of base64(`data`) that depend on `data` alone when it
/// starts `align` bytes into the encoded text.
fn b64_core(data: &[u8], align: usize, url: bool) -> String {
    let mut padded = vec![0u8; align];
    padded.extend_from_slice(data);
    let encoded = if url { b64_url(&padded) } else { b64_std(&padded) };
    let first = (8 * align).div_ceil(6);
    let last = 8 * (align + data.len()) / 6;
    encoded[first..last].to_owned()
}

/// The forms a key must not appear in: raw, every 16-byte window of it,
/// fully JSON-escaped and percent-encoded (both hex cases), base64 in both
/// alphabets at each of the three alignments.
fn forms(key: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![("raw".to_owned(), key.to_vec())];
    for (i, w) in key.windows(16).enumerate() {
        out.push((format!("raw window at {i}"), w.to_vec()));
    }
    for upper in [false, true] {
        out.push((format!("json-escaped (upper {upper})"), json_escape_all(key, upper).into_bytes()));
        out.push((format!("percent-encoded (upper {upper})"), percent_all(key, upper).into_bytes()));
    }
    for align in 0..3 {
        out.push((format!("base64 at {align}"), b64_core(key, align, false).into_bytes()));
        out.push((format!("base64url at {align}"), b64_core(key, align, true).into_bytes()));
    }
    out
}

#[track_caller]
fn assert_no_form(out: &[u8], key: &[u8], what: &str) {
    for (form, bytes) in forms(key) {
        assert!(!contains(out, &bytes), "{what}: key {} survives {form}", preview(key));
    }
}

/// The key in the texts a job can send it in, one encoding each.
fn encoded_texts(k: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    let ks = text(k);
    let dash_escaped = ks.replace('-', "\\u002d");
    let first_escaped = format!("\\u{:04x}{}", k[0], &ks[1..]);
    let pct_dashes = ks.replace('-', "%2D").replace('_', "%5f");
    let mut qp = format!("{}=\r\n{}", &ks[..ks.len() / 2], &ks[ks.len() / 2..]);
    qp = qp.replacen('-', "=2D", 1);
    let mut wrapped_doc = b64_std(format!("{{\"user\": \"ci\", \"note\": \"{ks}\", \"n\": 1}}").as_bytes());
    wrapped_doc = wrapped_doc.as_bytes().chunks(76).map(text).collect::<Vec<_>>().join("\r\n");
    let pct_b64: String = b64_std(&cat(&[b"\xff\xfe", k]))
        .chars()
        .map(|c| match c {
            '+' => "%2B".to_owned(),
            '/' => "%2F".to_owned(),
            '=' => "%3D".to_owned(),
            c => c.to_string(),
        })
        .collect();
    vec![
        ("json \\u lower", format!("{{\"note\":\"{}\"}}", json_escape_all(k, false)).into_bytes()),
        ("json \\u upper", format!("{{\"note\":\"{}\"}}", json_escape_all(k, true)).into_bytes()),
        ("json first char escaped", format!("{{\"note\": \"{first_escaped}\"}}").into_bytes()),
        ("json dashes escaped", format!("{{\"note\": \"{dash_escaped}\"}}").into_bytes()),
        (
            "json inside a json string",
            format!("{{\"doc\": \"{{\\\"k\\\": \\\"\\\\u{:04x}{}\\\"}}\"}}", k[0], &ks[1..]).into_bytes(),
        ),
        ("rust debug \\u{..}", format!("key=\"\\u{{{:x}}}{}\"", k[0], &ks[1..]).into_bytes()),
        ("percent upper", format!("/v1/x?k={}&n=1", percent_all(k, true)).into_bytes()),
        ("percent lower", format!("/v1/x?k={}&n=1", percent_all(k, false)).into_bytes()),
        ("percent dashes", format!("/v1/{pct_dashes}/items").into_bytes()),
        ("double percent", format!("/v1/x?k={}", pct_dashes.replace('%', "%25")).into_bytes()),
        ("form body", format!("a=1&note={}&b=2", percent_all(k, true)).into_bytes()),
        ("json holding a url", format!("{{\"url\":\"https://h/cb?k={pct_dashes}\"}}").into_bytes()),
        ("base64 std", format!("data: {}\n", b64_std(k)).into_bytes()),
        ("base64 url", format!("data: {}\n", b64_url(k)).into_bytes()),
        // Non-word neighbours: today's rules want a boundary around a key.
        ("base64 at 1", format!("{{\"blob\":\"{}\"}}", b64_std(&cat(&[b"\"", k, b"\""]))).into_bytes()),
        ("base64url at 2", format!("{{\"blob\":\"{}\"}}", b64_url(&cat(&[b": ", k, b"\n"]))).into_bytes()),
        ("base64 in a path", format!("/api/v2x/{}/run", b64_url(k)).into_bytes()),
        (
            "mime-wrapped base64",
            format!("--b\r\nContent-Transfer-Encoding: base64\r\n\r\n{wrapped_doc}\r\n--b--").into_bytes(),
        ),
        (
            "quoted-printable",
            format!("--b\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n{qp}\r\n--b--").into_bytes(),
        ),
        ("percent-encoded base64", format!("/cb?state={pct_b64}").into_bytes()),
        ("base64 of escaped json", b64_std(format!("{{\"k\":\"{first_escaped}\"}}").as_bytes()).into_bytes()),
    ]
}

#[test]
fn stored_copies_keep_no_encoded_form_of_a_key() {
    let m = all_rules();
    for rule in ["openai-project-key", "github-pat", "stripe-secret-key"] {
        let k = key(rule);
        for (what, body) in encoded_texts(&k) {
            let (out, masked) = m.mask_bytes(&body);
            assert_no_form(&out, &k, &format!("{rule}: {what}"));
            assert!(masked.iter().any(|x| &*x.rule == rule), "{rule}: {what}: {masked:?}");
            assert!(contains(&out, format!("[MASKED:{rule}]").as_bytes()), "{rule}: {what}: {}", text(&out));
        }
    }
}

#[test]
fn escaped_keys_are_masked_exactly_where_the_mapping_is_exact() {
    let m = all_rules();
    let k = key("openai-project-key");
    let ks = text(&k);
    let cases = [
        (
            format!("{{\"a\":\"\\u{:04x}{}\",\"b\":\"c\\n\"}}", k[0], &ks[1..]),
            "{\"a\":\"[MASKED:openai-project-key]\",\"b\":\"c\\n\"}",
        ),
        (format!("/v1/{}?x=1", ks.replace('-', "%2D")), "/v1/[MASKED:openai-project-key]?x=1"),
        (format!("/v1/x?k={}&n=1", percent_all(&k, false)), "/v1/x?k=[MASKED:openai-project-key]&n=1"),
        // A base64 run is masked whole.
        (format!("x-data: {} end", b64_std(&k)), "x-data: [MASKED:openai-project-key] end"),
    ];
    for (input, want) in cases {
        assert_eq!(m.mask_text(&input), want);
    }
}

#[test]
fn form_encoding_spaces_are_decoded_for_assignment_rules() {
    let specs = rules::builtin_specs().unwrap();
    let example = &specs.iter().find(|s| s.id == "generic-password").unwrap().examples[0];
    let (_, value) = example.split_once('=').unwrap();
    let form = format!("user=ci&note=DB_PASSWORD+%3D+{}", percent_all(value.as_bytes(), true));
    let out = all_rules().mask_text(&form).into_owned();
    assert!(out.contains("[MASKED:generic-password]"), "{out}");
    assert!(!out.contains(&percent_all(value.as_bytes(), true)), "{out}");
}

#[test]
fn header_values_in_every_encoding_are_masked() {
    let m = all_rules();
    let k = key("openai-project-key");
    let mut headers = HeaderMap::new();
    headers.insert("x-data", HeaderValue::from_str(&b64_std(&k)).unwrap());
    headers.insert("x-data-url", HeaderValue::from_str(&b64_url(&cat(&[b"k:", &k]))).unwrap());
    headers.insert("x-callback", HeaderValue::from_str(&format!("https://h/?k={}", percent_all(&k, true))).unwrap());
    headers.insert("x-json", HeaderValue::from_str(&format!("{{\"k\":\"{}\"}}", json_escape_all(&k, false))).unwrap());
    headers.insert("accept", HeaderValue::from_static("application/json"));
    let masked = m.mask_headers(&mut headers);
    assert_eq!(masked.len(), 4, "{masked:?}");
    for (name, value) in &headers {
        assert_no_form(value.as_bytes(), &k, name.as_str());
    }
    assert_eq!(headers["x-data"], "[MASKED:openai-project-key]");
    assert_eq!(headers["accept"], "application/json");
}

#[test]
fn clean_text_is_returned_as_it_is() {
    let m = all_rules();
    let texts = [
        "/api/v4/projects/1234/pipelines?ref=main&per_page=50&q=a+b%20c",
        r#"{"msg":"caf\u00e9 \"quoted\"\nnext","path":"a%2Fb","sha":"3f2c9a4e5b1d4c8e9f0a7e6d5c4b3a21f0e1d2c3"}"#,
        "Content-Transfer-Encoding: base64\r\n\r\nVGhlIHF1aWNrIGJyb3duIGZveCBqdW1wcyBvdmVyIHRoZSBsYXp5IGRvZy4=\r\n",
        "line one=\r\nstill line one",
    ];
    for t in texts {
        assert!(matches!(m.mask_text(t), std::borrow::Cow::Borrowed(_)), "{t}");
        assert_eq!(m.mask_bytes(t.as_bytes()).0, t.as_bytes());
    }
}

#[test]
fn text_with_too_many_nested_encodings_is_withheld_whole() {
    let unit = "%25%5C+\\u0025\\\\=\r\nQUJDREVGR0hJSktMTU5PUFFSU1RVVldY ";
    let hostile = unit.repeat(4096);
    let (out, masked) = all_rules().mask_bytes(hostile.as_bytes());
    assert_eq!(text(&out), "[MASKED:too-many-encodings]");
    assert_eq!(&*masked[0].rule, TOO_MANY_ENCODINGS);
    let mut headers = HeaderMap::new();
    headers.insert("x-h", HeaderValue::from_str(&unit.replace("\r\n", "").repeat(2048)).unwrap());
    all_rules().mask_headers(&mut headers);
    assert_eq!(headers["x-h"], "[MASKED:too-many-encodings]");
}

#[test]
fn log_lines_are_masked_json_and_text_alike() {
    let k = key("openai-project-key");
    let ks = text(&k);
    let mut sink = Vec::new();
    {
        let mut w = log::MaskedWriter::with_masker(&mut sink, all_rules());
        let json =
            serde_json::json!({"target": "gateway::http", "path": format!("/v1/{ks}"), "q": format!("\u{0}{ks}")});
        w.write_all(format!("{json}\n").as_bytes()).unwrap();
        w.write_all(format!("INFO gateway::http: path=/v1/{}\n", ks.replace('-', "%2D")).as_bytes()).unwrap();
    }
    assert_no_form(&sink, &k, "log");
    let lines: Vec<&str> = std::str::from_utf8(&sink).unwrap().lines().collect();
    assert_eq!(lines.len(), 2);
    let first: serde_json::Value = serde_json::from_str(lines[0]).expect("still one JSON object per line");
    assert_eq!(first["path"], "/v1/[MASKED:openai-project-key]");
    assert_eq!(lines[1], "INFO gateway::http: path=/v1/[MASKED:openai-project-key]");
}

#[test]
fn mask_scanned_masks_what_the_scan_found_and_runs_only_for_more() {
    let stripe = key("stripe-secret-key");
    let text = cat(&[b"a \xff binary ", &stripe, b" and more"]);
    let found = views::find_all(&detector(), &text).unwrap();
    assert_eq!(found.len(), 1);
    // Rules only: the scan's ranges, byte-exact even around invalid UTF-8.
    let out = all_rules().mask_scanned(&detector(), &text, &found);
    assert_eq!(out.as_ref(), b"a \xff binary [MASKED:stripe-secret-key] and more");
    // Nothing found, nothing else to look for: borrowed, not scanned again.
    assert!(matches!(all_rules().mask_scanned(&detector(), b"clean", &[]), Cow::Borrowed(_)));
    // A pattern of the masker's own still applies.
    let m = masker(MaskSpec {
        patterns: vec![MaskPattern { name: "ticket".into(), regex: "TICKET-[0-9]{1,8}".into() }],
        ..MaskSpec::default()
    });
    let out = m.mask_scanned(&detector(), b"see TICKET-42", &[]);
    assert_eq!(text_of(&out), "see [MASKED:ticket]");
    // A scan cut short (a longer text than is kept): cut at the end.
    let kept = &text[..text.len() - 12];
    let out = all_rules().mask_scanned(&detector(), kept, &found);
    assert_absent(&out, &stripe[..stripe.len() - 3]);
}

fn text_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
