//! The content codings the targets put a body in (body_scan, mask_diff,
//! redact_diff), and the differential ones take the gateway's output out
//! of: a reference implementation on the same crates the gateway uses,
//! independent of the gateway's own codec code.

// Each target includes this file (`#[path]`) and uses part of it.
#![allow(dead_code)]

use std::io::{Read as _, Write as _};

use arbitrary::Arbitrary;

/// A body's content coding.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq)]
pub enum Coding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

impl Coding {
    /// Its `Content-Encoding` token (`None`: the header is left out).
    pub fn name(self) -> Option<&'static str> {
        match self {
            Coding::Identity => None,
            Coding::Gzip => Some("gzip"),
            Coding::Deflate => Some("deflate"),
            Coding::Brotli => Some("br"),
            Coding::Zstd => Some("zstd"),
        }
    }
}

/// `data` in coding `c`.
pub fn encode(c: Coding, data: &[u8]) -> Vec<u8> {
    match c {
        Coding::Identity => data.to_vec(),
        Coding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).expect("in memory");
            e.finish().expect("in memory")
        }
        Coding::Deflate => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).expect("in memory");
            e.finish().expect("in memory")
        }
        Coding::Brotli => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 1, 18);
                w.write_all(data).expect("in memory");
            }
            out
        }
        Coding::Zstd => zstd::bulk::compress(data, 1).expect("in memory"),
    }
}

/// The gateway's output `data`, decoded from coding `c`; panics (a finding)
/// when the gateway wrote something that is not valid in `c`.
pub fn decode(c: Coding, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match c {
        Coding::Identity => out.extend_from_slice(data),
        Coding::Gzip => {
            flate2::read::MultiGzDecoder::new(data).read_to_end(&mut out).expect("the gateway's output is valid gzip");
        }
        Coding::Deflate => {
            flate2::read::ZlibDecoder::new(data).read_to_end(&mut out).expect("the gateway's output is valid deflate");
        }
        Coding::Brotli => {
            brotli::Decompressor::new(data, 4096).read_to_end(&mut out).expect("the gateway's output is valid br");
        }
        Coding::Zstd => out = zstd::stream::decode_all(data).expect("the gateway's output is valid zstd"),
    }
    out
}
