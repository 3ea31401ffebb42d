//! WebSocket framing (client frames: masking, fragmentation, control
//! frames, permessage-deflate) as the scanner reads it, in arbitrary chunks.
#![no_main]
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use gateway::detect::{body::BodyLimits, Detector, WsConfig, WsScanner};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    deflate: bool,
    no_context_takeover: bool,
    small_limit: bool,
    cuts: Vec<u16>,
    bytes: Vec<u8>,
}

fn detector() -> Arc<Detector> {
    static D: OnceLock<Arc<Detector>> = OnceLock::new();
    D.get_or_init(|| Arc::new(Detector::builtin().expect("built-in rules compile"))).clone()
}

fuzz_target!(|input: Input| {
    let mut headers = HeaderMap::new();
    if input.deflate {
        let v = if input.no_context_takeover {
            "permessage-deflate; client_no_context_takeover"
        } else {
            "permessage-deflate"
        };
        headers.insert("sec-websocket-extensions", HeaderValue::from_static(v));
    }
    let limits = BodyLimits { max_decoded: if input.small_limit { 64 } else { 1 << 20 } };
    let config = WsConfig::from_handshake(&headers, limits);
    let mut scanner = WsScanner::new(detector(), config);
    let data = &input.bytes;
    let mut cuts: Vec<usize> = input.cuts.iter().map(|&c| usize::from(c) % (data.len() + 1)).collect();
    cuts.sort_unstable();
    let mut at = 0;
    for c in cuts {
        let _ = scanner.feed(&data[at..c]);
        at = c;
    }
    let _ = scanner.feed(&data[at..]);
    assert!(scanner.scanned_through() <= data.len() as u64);
    let _ = scanner.finish();
    let _ = scanner.status();
});
