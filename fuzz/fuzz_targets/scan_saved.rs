//! `gateway scan`'s readers of saved traffic: raw HTTP messages (a request
//! or a response as sent, chunked or not, its body compressed or not) and
//! HAR files, each either built from arbitrary parts with synthetic keys
//! in its head and body (so the parsers are passed and the scanners
//! reached) or arbitrary bytes. Checks: the output is one JSON object a
//! line; every reported line and column lies in the file; no inserted key
//! the scanner reported is ever printed in clear (only fingerprints and
//! previews are), in any field, its location included.
#![no_main]
use std::{
    io::Write,
    sync::{Arc, OnceLock},
};

use arbitrary::Arbitrary;
use base64::Engine as _;
use gateway::detect::{
    secret::{FingerprintKey, Secret},
    Detector,
};
use libfuzzer_sys::fuzz_target;

#[path = "../common/keys.rs"]
mod keys;

#[derive(Arbitrary, Debug)]
enum Piece {
    Text(String),
    Key(keys::Key),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Type {
    Json,
    Form,
    Text,
    None,
}

#[derive(Arbitrary, Debug)]
struct Header {
    name: String,
    value: Vec<Piece>,
}

#[derive(Arbitrary, Debug)]
struct Message {
    response: bool,
    method: String,
    target: Vec<Piece>,
    headers: Vec<Header>,
    content_type: Type,
    gzip: bool,
    /// Sent chunked, cut at these offsets.
    chunks: Option<Vec<u16>>,
    body: Vec<Piece>,
}

#[derive(Arbitrary, Debug)]
struct Entry {
    method: String,
    url: Vec<Piece>,
    request_headers: Vec<Header>,
    post: Option<(Type, Vec<Piece>)>,
    params: Vec<(String, Vec<Piece>)>,
    response_headers: Vec<Header>,
    content: Option<(Type, bool, Vec<Piece>)>,
}

#[derive(Arbitrary, Debug)]
enum Input {
    Message(Message),
    Har(Vec<Entry>),
    RawMessage(Vec<u8>),
    RawHar(Vec<u8>),
}

fn detector() -> Arc<Detector> {
    static D: OnceLock<Arc<Detector>> = OnceLock::new();
    D.get_or_init(|| Arc::new(Detector::builtin().expect("built-in rules compile"))).clone()
}

fn mime(t: Type) -> Option<&'static str> {
    match t {
        Type::Json => Some("application/json"),
        Type::Form => Some("application/x-www-form-urlencoded"),
        Type::Text => Some("text/plain"),
        Type::None => None,
    }
}

/// The pieces' text; each key's secret is added to `secrets`.
fn join(pieces: &[Piece], secrets: &mut Vec<String>) -> String {
    let mut out = String::new();
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Key(k) => {
                out.push_str(&k.text());
                secrets.push(k.secret());
            }
        }
    }
    out
}

/// A header line's text: no line breaks (they would end the head).
fn one_line(s: &str) -> String {
    s.chars().filter(|c| *c != '\r' && *c != '\n').collect()
}

fn body_of(t: Type, text: &str) -> String {
    match t {
        Type::Json => serde_json::json!({ "prompt": text }).to_string(),
        Type::Form => format!("prompt={}", text.replace(['&', '='], " ")),
        Type::Text | Type::None => text.to_owned(),
    }
}

fn message(m: &Message, secrets: &mut Vec<String>) -> Vec<u8> {
    let mut head = if m.response {
        "HTTP/1.1 200 OK\r\n".to_owned()
    } else {
        let method: String = m.method.chars().filter(char::is_ascii_uppercase).take(10).collect();
        let method = if method.is_empty() { "POST".to_owned() } else { method };
        let target: String = join(&m.target, secrets).chars().filter(|c| c.is_ascii_graphic()).collect();
        format!("{method} /{target} HTTP/1.1\r\n")
    };
    for h in &m.headers {
        let name: String = h.name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
        if name.is_empty() {
            continue;
        }
        head.push_str(&format!("{name}: {}\r\n", one_line(&join(&h.value, secrets))));
    }
    if let Some(t) = mime(m.content_type) {
        head.push_str(&format!("Content-Type: {t}\r\n"));
    }
    let mut body = body_of(m.content_type, &join(&m.body, secrets)).into_bytes();
    if m.gzip {
        head.push_str("Content-Encoding: gzip\r\n");
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&body).expect("in memory");
        body = e.finish().expect("in memory");
    }
    let mut out = head.into_bytes();
    match &m.chunks {
        None => {
            out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            out.extend_from_slice(&body);
        }
        Some(cuts) => {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            let mut cuts: Vec<usize> = cuts.iter().map(|&c| usize::from(c) % (body.len() + 1)).collect();
            cuts.sort_unstable();
            cuts.dedup();
            let mut at = 0;
            for c in cuts.into_iter().chain([body.len()]) {
                if c > at {
                    out.extend_from_slice(format!("{:x}\r\n", c - at).as_bytes());
                    out.extend_from_slice(&body[at..c]);
                    out.extend_from_slice(b"\r\n");
                    at = c;
                }
            }
            out.extend_from_slice(b"0\r\n\r\n");
        }
    }
    out
}

fn headers_json(list: &[Header], secrets: &mut Vec<String>) -> serde_json::Value {
    list.iter().map(|h| serde_json::json!({ "name": h.name, "value": join(&h.value, secrets) })).collect()
}

fn har(entries: &[Entry], secrets: &mut Vec<String>) -> Vec<u8> {
    let entries: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            let mut request = serde_json::json!({
                "method": e.method,
                "url": format!("https://api.example.test/{}", join(&e.url, secrets)),
                "headers": headers_json(&e.request_headers, secrets),
            });
            if let Some((t, text)) = &e.post {
                let text = body_of(*t, &join(text, secrets));
                request["postData"] = serde_json::json!({ "mimeType": mime(*t), "text": text });
            } else if !e.params.is_empty() {
                let params: Vec<_> =
                    e.params.iter().map(|(n, v)| serde_json::json!({ "name": n, "value": join(v, secrets) })).collect();
                request["postData"] = serde_json::json!({ "mimeType": mime(Type::Form), "params": params });
            }
            let mut response = serde_json::json!({
                "status": 200,
                "headers": headers_json(&e.response_headers, secrets),
            });
            if let Some((t, b64, text)) = &e.content {
                let text = body_of(*t, &join(text, secrets));
                response["content"] = if *b64 {
                    serde_json::json!({
                        "mimeType": mime(*t),
                        "encoding": "base64",
                        "text": base64::engine::general_purpose::STANDARD.encode(text),
                    })
                } else {
                    serde_json::json!({ "mimeType": mime(*t), "text": text })
                };
            }
            serde_json::json!({ "request": request, "response": response })
        })
        .collect();
    serde_json::to_vec_pretty(&serde_json::json!({ "log": { "version": "1.2", "entries": entries } })).expect("json")
}

fuzz_target!(|input: Input| {
    let mut secrets = Vec::new();
    let (name, data) = match &input {
        Input::Message(m) => ("saved.http", message(m, &mut secrets)),
        Input::Har(entries) => ("saved.har", har(entries, &mut secrets)),
        Input::RawMessage(d) => ("saved.http", d.clone()),
        Input::RawHar(d) => ("saved.har", d.clone()),
    };
    // A fixed key: the check below tells the reported keys by fingerprint.
    let key = FingerprintKey::from_bytes([7; 32]);
    let out = gateway::fuzzing::scan_saved(detector(), key.clone(), name, &data);
    let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).expect("each report is one JSON object");
        let (Some(l), Some(c)) = (v["line"].as_u64(), v["column"].as_u64()) else {
            panic!("a report without line and column");
        };
        assert!(l >= 1 && c >= 1, "lines and columns are 1-based");
        let text = lines.get(l as usize - 1).expect("the reported line is in the file");
        assert!(c as usize <= text.len() + 1, "the reported column is on its line");
    }
    // Keys the scanner reported (by their fingerprint: previews collide, a
    // longer token ending in a key has the key's): never printed in clear,
    // anywhere in the output. (A key it did not find anywhere, glued inside
    // a longer name say, is not a finding, and its surroundings are printed
    // as they are.)
    let fingerprints: Vec<String> = out
        .split(|&b| b == b'\n')
        .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fingerprint"].as_str().map(str::to_owned))
        .collect();
    for s in secrets.iter().filter(|s| fingerprints.contains(&Secret::new(s.as_bytes()).fingerprint(&key))) {
        if let Some(line) = out.split(|&b| b == b'\n').find(|l| l.windows(s.len()).any(|w| w == s.as_bytes())) {
            // Name the field, not the key.
            let v: serde_json::Value = serde_json::from_slice(line).expect("JSON");
            let fields: Vec<&String> = v
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, x)| x.to_string().contains(s.as_str()))
                .map(|(k, _)| k)
                .collect();
            panic!("a key was printed in clear, in {fields:?} (rule {})", v["rule_id"]);
        }
    }
});
