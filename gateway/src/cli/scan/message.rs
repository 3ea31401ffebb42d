//! Saved HTTP traffic for `gateway scan`: raw HTTP messages (a request or
//! a response as it went over the wire) and HAR files.
//!
//! Both are scanned the way the proxy scans live traffic, with the same
//! code: the head with `http_scan::scan_head` (query parameters, headers,
//! Basic credentials, unknown credentials in auth headers) and the body
//! with `BodyScanner` (content encodings undone, JSON, forms, multipart
//! and the rest decoded), so a gzip body in a saved request is read as the
//! proxy would have read it.

use std::{io::Write, path::Path};

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use serde_json::Value;

use super::{position, Place, Scan};
use crate::detect::{
    http_scan::{self, BodyScanner, Hit, Location},
    Detection,
};

/// Most headers read from one saved message.
const MAX_HEADERS: usize = 256;

/// Whether `data` starts like an HTTP/1 request or response.
pub(super) fn is_http_message(data: &[u8]) -> bool {
    let first = data.split(|&b| b == b'\n').next().unwrap_or_default();
    let first = first.strip_suffix(b"\r").unwrap_or(first);
    let Ok(first) = std::str::from_utf8(first) else { return false };
    if let Some(rest) = first.strip_prefix("HTTP/") {
        return rest.split(' ').nth(1).is_some_and(|code| code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()));
    }
    let parts: Vec<&str> = first.split(' ').collect();
    matches!(parts.as_slice(), [method, _, version]
        if !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase()) && version.starts_with("HTTP/"))
}

/// Whether `data` (at `path`) is a HAR file: named `*.har`, or a JSON
/// object whose start mentions `"log"`.
pub(super) fn is_har(path: &Path, data: &[u8]) -> bool {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("har")) {
        return true;
    }
    let head = &data[..data.len().min(512)];
    head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && head.windows(5).any(|w| w == b"\"log\"")
        && data.windows(9).any(|w| w == b"\"entries\"")
}

/// Scans a raw HTTP message. `Err` when it does not parse as one (the
/// caller scans it as text instead).
pub(super) fn scan_http_message<W: Write>(scan: &mut Scan<W>, name: &str, data: &[u8]) -> Result<(), String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (head_len, request, parsed) = if data.starts_with(b"HTTP/") {
        let mut r = httparse::Response::new(&mut headers);
        match r.parse(data) {
            Ok(httparse::Status::Complete(n)) => (n, None, header_map(r.headers)),
            Ok(httparse::Status::Partial) => return Err("incomplete head".into()),
            Err(e) => return Err(e.to_string()),
        }
    } else {
        let mut r = httparse::Request::new(&mut headers);
        match r.parse(data) {
            Ok(httparse::Status::Complete(n)) => {
                let method = r.method.unwrap_or("GET").to_owned();
                let target = r.path.unwrap_or("/").to_owned();
                (n, Some((method, target)), header_map(r.headers))
            }
            Ok(httparse::Status::Partial) => return Err("incomplete head".into()),
            Err(e) => return Err(e.to_string()),
        }
    };
    let headers = parsed;
    let head = &data[..head_len];
    let mut hits = match &request {
        Some((method, target)) => {
            let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
            let uri: Uri = target.parse().unwrap_or_else(|_| Uri::from_static("/"));
            let mut hits = http_scan::scan_head(&scan.detector, &method, &uri, &headers);
            hits.extend(http_scan::unknown_credentials(&scan.detector, &headers, |_| false));
            hits
        }
        None => http_scan::scan_head(&scan.detector, &Method::GET, &Uri::from_static("/"), &headers),
    };
    let raw_body = &data[head_len..];
    let chunked = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.to_ascii_lowercase().contains("chunked")));
    let body = if chunked { dechunk(raw_body).unwrap_or_else(|| raw_body.to_vec()) } else { raw_body.to_vec() };
    let mut scanner = BodyScanner::new(scan.detector.clone(), &headers, scan.limits);
    hits.extend(scanner.feed(&body));
    hits.extend(scanner.finish());
    let status = scanner.status();
    if !status.is_complete() {
        eprintln!(
            "gateway scan: {}: the body was not fully understood ({status:?}); scanned what was",
            super::safe(name)
        );
    }
    let mut found = Vec::new();
    for hit in dedup(hits) {
        let offset = match &hit.location {
            Location::Header(h) | Location::BasicAuthUser(h) | Location::BasicAuthPassword(h) => {
                header_line_offset(head, h)
            }
            Location::Body(_) => head_len + find(raw_body, hit.detection.secret.as_bytes()).unwrap_or(0),
            _ => 0,
        };
        let offset = find(&data[offset..], hit.detection.secret.as_bytes()).map_or(offset, |at| {
            // The literal on the place's own line (or in the body), if it is there.
            if matches!(hit.location, Location::Body(_)) || !data[offset..offset + at].contains(&b'\n') {
                offset + at
            } else {
                offset
            }
        });
        let (line, column) = position(data, offset);
        let place = Place { path: name, line, column, commit: None, location: Some(hit.location.to_string()) };
        found.push((place, hit.detection));
    }
    scan.report_found(&found);
    Ok(())
}

/// Scans a HAR file: every entry's request (URL, headers, post data) and
/// response (headers, content, base64 or not). `Err` when it is not HAR.
pub(super) fn scan_har<W: Write>(scan: &mut Scan<W>, name: &str, data: &[u8]) -> Result<(), String> {
    let doc: Value = serde_json::from_slice(data).map_err(|e| e.to_string())?;
    let entries = doc["log"]["entries"].as_array().ok_or("no log.entries")?;
    // Reported together at the end, each location masked with every key of
    // the file (`Scan::report_found`).
    let mut found = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let req = &entry["request"];
        let headers = har_headers(&req["headers"]);
        let method = req["method"].as_str().and_then(|m| Method::from_bytes(m.as_bytes()).ok()).unwrap_or(Method::GET);
        let uri: Uri = req["url"].as_str().and_then(|u| u.parse().ok()).unwrap_or_else(|| Uri::from_static("/"));
        let mut hits = http_scan::scan_head(&scan.detector, &method, &uri, &headers);
        hits.extend(http_scan::unknown_credentials(&scan.detector, &headers, |_| false));
        let post = &req["postData"];
        let mut text = post["text"].as_str().unwrap_or_default().as_bytes().to_vec();
        if text.is_empty() {
            // Some tools keep only the parsed parameters.
            for p in post["params"].as_array().into_iter().flatten() {
                let (n, v) = (p["name"].as_str().unwrap_or_default(), p["value"].as_str().unwrap_or_default());
                text.extend_from_slice(format!("{n}={v}\n").as_bytes());
            }
        }
        hits.extend(har_body(scan, &headers, post["mimeType"].as_str(), &text));
        found.extend(har_places(name, data, &format!("entries[{i}].request"), hits));

        let resp = &entry["response"];
        let headers = har_headers(&resp["headers"]);
        let mut hits = http_scan::scan_head(&scan.detector, &Method::GET, &Uri::from_static("/"), &headers);
        let content = &resp["content"];
        let text = content["text"].as_str().unwrap_or_default();
        let body = if content["encoding"].as_str().is_some_and(|e| e.eq_ignore_ascii_case("base64")) {
            let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            base64::engine::general_purpose::STANDARD.decode(compact).unwrap_or_else(|_| text.as_bytes().to_vec())
        } else {
            text.as_bytes().to_vec()
        };
        hits.extend(har_body(scan, &headers, content["mimeType"].as_str(), &body));
        found.extend(har_places(name, data, &format!("entries[{i}].response"), hits));
    }
    scan.report_found(&found);
    Ok(())
}

/// Scans a HAR body: its text is already decoded (HAR keeps content
/// decoded), so only its type is passed on.
fn har_body<W: Write>(scan: &Scan<W>, headers: &HeaderMap, mime: Option<&str>, body: &[u8]) -> Vec<Hit> {
    if body.is_empty() {
        return Vec::new();
    }
    let mut typed = HeaderMap::new();
    let content_type = mime
        .map(str::to_owned)
        .or_else(|| headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned));
    if let Some(v) = content_type.and_then(|ct| HeaderValue::from_str(&ct).ok()) {
        typed.insert(http::header::CONTENT_TYPE, v);
    }
    let mut scanner = BodyScanner::new(scan.detector.clone(), &typed, scan.limits);
    let mut hits = scanner.feed(body);
    hits.extend(scanner.finish());
    hits
}

/// Places HAR hits at the line where the secret (or its JSON-escaped
/// form) first appears in the file.
fn har_places<'a>(name: &'a str, data: &[u8], part: &str, hits: Vec<Hit>) -> Vec<(Place<'a>, Detection)> {
    let mut found = Vec::new();
    for hit in dedup(hits) {
        let secret = hit.detection.secret.as_bytes();
        let escaped = std::str::from_utf8(secret).ok().and_then(|s| serde_json::to_string(s).ok());
        let at = find(data, secret)
            .or_else(|| escaped.as_deref().and_then(|e| find(data, &e.as_bytes()[1..e.len() - 1])))
            .unwrap_or(0);
        let (line, column) = position(data, at);
        let place =
            Place { path: name, line, column, commit: None, location: Some(format!("{part}.{}", hit.location)) };
        found.push((place, hit.detection));
    }
    found
}

fn har_headers(list: &Value) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for h in list.as_array().into_iter().flatten() {
        let (Some(n), Some(v)) = (h["name"].as_str(), h["value"].as_str()) else { continue };
        // HTTP/2 pseudo-headers (`:authority`) are not headers.
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_str(v)) {
            headers.append(n, v);
        }
    }
    headers
}

fn header_map(parsed: &[httparse::Header<'_>]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for h in parsed {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value)) {
            headers.append(n, v);
        }
    }
    headers
}

/// Offset of the first line of `head` naming header `name`.
fn header_line_offset(head: &[u8], name: &str) -> usize {
    let mut at = 0;
    for line in head.split(|&b| b == b'\n') {
        let colon = line.iter().position(|&b| b == b':').unwrap_or(0);
        if line[..colon].eq_ignore_ascii_case(name.as_bytes()) {
            return at;
        }
        at += line.len() + 1;
    }
    0
}

/// The body of a chunked message; `None` when malformed.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(raw.len());
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size..)?.strip_prefix(b"\r\n")?;
    }
}

/// Each (rule, secret, location) once.
fn dedup(hits: Vec<Hit>) -> Vec<Hit> {
    let mut seen = std::collections::HashSet::new();
    hits.into_iter()
        .filter(|h| {
            seen.insert((h.detection.rule_id.clone(), h.detection.secret.as_bytes().to_vec(), h.location.clone()))
        })
        .collect()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > hay.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_messages_and_har() {
        assert!(is_http_message(b"POST /v1/chat HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(is_http_message(b"HTTP/1.1 200 OK\r\n\r\n"));
        assert!(is_http_message(b"HTTP/2 200\n"));
        assert!(!is_http_message(b"Hello world\n"));
        assert!(!is_http_message(b"post /x HTTP/1.1\r\n"));
        assert!(is_har(Path::new("a.har"), b""));
        assert!(is_har(Path::new("a.json"), b"{\"log\": {\"entries\": []}}"));
        assert!(!is_har(Path::new("a.json"), b"{\"x\": 1}"));
    }

    /// A made-up OpenAI-shaped key: two runs of `len` letters and digits
    /// from a fixed LCG started at `seed`.
    fn made_up_key(seed: u32, len: usize) -> String {
        let mut x = seed;
        let mut part = || -> String {
            (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    char::from(
                        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"[(x >> 16) as usize % 62],
                    )
                })
                .collect()
        };
        format!("sk-proj-{}T3BlbkFJ{}", part(), part())
    }

    /// Found by the `scan_saved` fuzz target: a key used as a query
    /// parameter's name was printed in clear in the report's location.
    #[test]
    fn a_key_used_as_a_name_is_masked_in_the_location() {
        let key = made_up_key(0x2545_f491, 48);
        let detector = std::sync::Arc::new(crate::detect::Detector::builtin().expect("rules"));
        for (msg, location) in [
            (format!("GET /v1?{key}=1 HTTP/1.1\r\nHost: x\r\n\r\n"), "\"location\":\"query:[MASKED:openai"),
            (
                format!("POST /v1 HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{{\"{key}\": 1}}"),
                "\"location\":\"body:$[",
            ),
        ] {
            let out = super::super::json_report(
                detector.clone(),
                crate::detect::secret::FingerprintKey::ephemeral(),
                Path::new("saved.http"),
                msg.as_bytes(),
            );
            let out = String::from_utf8(out).expect("utf8");
            assert!(out.contains("openai"), "the key is reported ({} lines)", out.lines().count());
            assert!(!out.contains(&key), "the key is printed in clear");
            // Printed only once the key is known not to be in it.
            assert!(out.contains(location), "the location shows where: {out}");
        }
    }

    /// Found by the `scan_saved` fuzz target (finding 5): a key found in
    /// the body also stood glued inside a query parameter's name (not found
    /// there), and another finding's location printed that name, the key
    /// in it, in clear. Every location is now masked with every key of the
    /// file. The same in a HAR file, the key found in a later entry.
    #[test]
    fn a_key_found_anywhere_in_the_file_is_masked_in_every_location() {
        let key = made_up_key(0x1b87_3593, 40);
        let other = made_up_key(0x0a5c_e1d7, 40);
        let detector = std::sync::Arc::new(crate::detect::Detector::builtin().expect("rules"));
        // Glued to a long low-entropy run, the key in the name is not found
        // there (the match would be mostly padding).
        let glue = "z".repeat(170);
        let body = format!("token {key}\n");
        let message = format!(
            "GET /v1?{key}{glue}={other} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let har = serde_json::json!({ "log": { "version": "1.2", "entries": [
            { "request": { "method": "GET", "url": format!("https://x.test/v1?{key}{glue}={other}"), "headers": [] },
              "response": { "status": 200, "headers": [] } },
            { "request": { "method": "POST", "url": "https://x.test/v2", "headers": [],
                           "postData": { "mimeType": "text/plain", "text": format!("token {key}") } },
              "response": { "status": 200, "headers": [] } },
        ] } })
        .to_string();
        for (name, data) in [("saved.http", message), ("saved.har", har)] {
            let out = super::super::json_report(
                detector.clone(),
                crate::detect::secret::FingerprintKey::ephemeral(),
                Path::new(name),
                data.as_bytes(),
            );
            let out = String::from_utf8(out).expect("utf8");
            assert_eq!(out.lines().count(), 2, "{name}: the two keys are reported, the glued one is not found");
            assert!(!out.contains(&key) && !out.contains(&other), "{name}: a key is printed in clear");
            assert!(out.contains("query:[MASKED:openai-project-key]zzz"), "{name}: the location shows where");
        }
    }

    #[test]
    fn dechunks() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").as_deref(), Some(&b"abcde"[..]));
        assert_eq!(dechunk(b"zz\r\n"), None);
        assert_eq!(dechunk(b"5\r\nab"), None);
    }

    #[test]
    fn finds_header_lines() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: x\r\n\r\n";
        assert_eq!(header_line_offset(head, "authorization"), 25);
    }
}
