//! Path normalisation, differentially against a second implementation
//! written here from RFC 3986: decode escapes of unreserved characters
//! (§6.2.2.2), upper-case the others (§6.2.2.1), remove dot segments
//! exactly as §5.2.4 states it, and merge runs of `/`. Whatever the
//! gateway accepts must equal that (the gateway refuses the paths where
//! the order of dot removal and slash merging matters), and normalising is
//! idempotent.
#![no_main]
use gateway::policy::normalize;
use libfuzzer_sys::fuzz_target;

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn decode(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = &path[i + 1..i + 3];
            let v = u8::from_str_radix(hex, 16).expect("the gateway accepted it: valid hex");
            if unreserved(v) {
                out.push(char::from(v));
            } else {
                out.push('%');
                out.push_str(&hex.to_ascii_uppercase());
            }
            i += 3;
        } else {
            let c = path[i..].chars().next().expect("in bounds");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// RFC 3986 §5.2.4 as written: rules A to E until the input is empty.
fn remove_dot_segments(path: &str) -> String {
    let mut input = path.to_owned();
    let mut output = String::new();
    fn drop_last(output: &mut String) {
        let cut = output.rfind('/').unwrap_or(0);
        output.truncate(cut);
    }
    while !input.is_empty() {
        if let Some(rest) = input.strip_prefix("../") {
            input = rest.to_owned();
        } else if let Some(rest) = input.strip_prefix("./") {
            input = rest.to_owned();
        } else if let Some(rest) = input.strip_prefix("/./") {
            input = format!("/{rest}");
        } else if input == "/." {
            input = "/".to_owned();
        } else if let Some(rest) = input.strip_prefix("/../") {
            input = format!("/{rest}");
            drop_last(&mut output);
        } else if input == "/.." {
            input = "/".to_owned();
            drop_last(&mut output);
        } else if input == "." || input == ".." {
            input.clear();
        } else {
            let start = usize::from(input.starts_with('/'));
            let end = input[start..].find('/').map_or(input.len(), |i| i + start);
            output.push_str(&input[..end]);
            input = input[end..].to_owned();
        }
    }
    output
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

fuzz_target!(|raw: &str| {
    let Ok(normalized) = normalize(raw) else { return };
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    assert_eq!(normalized.query(), query);
    if path == "*" || path.is_empty() {
        return;
    }
    let decoded = decode(path);
    let mut reference = merge_slashes(&remove_dot_segments(&decoded));
    if reference.is_empty() {
        reference.push('/');
    }
    assert_eq!(normalized.as_str(), reference, "normalising {raw:?}");
    let again = normalize(normalized.as_str()).expect("a normalised path is accepted");
    assert_eq!(again.as_str(), normalized.as_str(), "normalising is idempotent");
});
