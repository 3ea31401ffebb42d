//! The request/response body scanner with every content type it parses
//! (JSON, multipart, form, protobuf, gRPC / Connect framing, text, UTF-16)
//! under every content-encoding chain (gzip, deflate, br, zstd), fed in
//! arbitrary chunks. The body is either encoded here (so the decoders get
//! valid streams and the parsers behind them get reached) or passed raw.
#![no_main]
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use gateway::detect::{body::BodyLimits, body::BodyScanner, Detector};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

#[path = "../common/codings.rs"]
mod codings;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Type {
    Json,
    Multipart,
    Form,
    Protobuf,
    Grpc,
    GrpcWeb,
    ConnectJson,
    Text,
    Octets,
    None,
}

/// A compressing coding (the scanner is fed bodies that declare one).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Coding {
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

impl Coding {
    /// The shared reference codec's coding.
    fn codec(self) -> codings::Coding {
        match self {
            Coding::Gzip => codings::Coding::Gzip,
            Coding::Deflate => codings::Coding::Deflate,
            Coding::Brotli => codings::Coding::Brotli,
            Coding::Zstd => codings::Coding::Zstd,
        }
    }

    /// Its `Content-Encoding` token.
    fn name(self) -> &'static str {
        self.codec().name().unwrap_or("identity")
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    content_type: Type,
    grpc_encoding: Option<Coding>,
    encodings: Vec<Coding>,
    encode_here: bool,
    small_limit: bool,
    cuts: Vec<u16>,
    body: Vec<u8>,
}

fn detector() -> Arc<Detector> {
    static D: OnceLock<Arc<Detector>> = OnceLock::new();
    D.get_or_init(|| Arc::new(Detector::builtin().expect("built-in rules compile"))).clone()
}

fuzz_target!(|input: Input| {
    let mut headers = HeaderMap::new();
    let ct = match input.content_type {
        Type::Json => Some("application/json"),
        Type::Multipart => Some("multipart/form-data; boundary=XyZ"),
        Type::Form => Some("application/x-www-form-urlencoded"),
        Type::Protobuf => Some("application/x-protobuf"),
        Type::Grpc => Some("application/grpc"),
        Type::GrpcWeb => Some("application/grpc-web+proto"),
        Type::ConnectJson => Some("application/connect+json"),
        Type::Text => Some("text/plain; charset=utf-16"),
        Type::Octets => Some("application/octet-stream"),
        Type::None => None,
    };
    if let Some(ct) = ct {
        headers.insert("content-type", HeaderValue::from_static(ct));
    }
    if let Some(c) = input.grpc_encoding {
        headers.insert("grpc-encoding", HeaderValue::from_static(c.name()));
    }
    let encodings: Vec<Coding> = input.encodings.iter().copied().take(3).collect();
    if !encodings.is_empty() {
        let value = encodings.iter().map(|&c| c.name()).collect::<Vec<_>>().join(", ");
        headers.insert("content-encoding", HeaderValue::from_str(&value).expect("ascii"));
    }
    let mut body = input.body;
    if input.encode_here {
        for &c in &encodings {
            body = codings::encode(c.codec(), &body);
        }
    }
    let limits = BodyLimits { max_decoded: if input.small_limit { 256 } else { 1 << 20 } };
    let mut scanner = BodyScanner::new(detector(), &headers, limits);
    let mut cuts: Vec<usize> = input.cuts.iter().map(|&c| usize::from(c) % (body.len() + 1)).collect();
    cuts.sort_unstable();
    let mut at = 0;
    for c in cuts {
        let _ = scanner.feed(&body[at..c]);
        at = c;
    }
    let _ = scanner.feed(&body[at..]);
    let _ = scanner.finish();
    let _ = scanner.status();
});
