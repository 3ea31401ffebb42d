//! Compiled response maskers per policy rule, and the masker that keeps
//! secrets out of recordings whatever the policy says.

use std::{
    collections::HashMap,
    io::Read as _,
    sync::{Arc, Mutex},
};

use crate::{
    detect::Detector,
    mask::{MaskPattern, MaskRules, MaskSpec, Masker},
    policy::{self, MaskRule, Policy},
};

/// Maskers are compiled on first use per (policy version, rule) rather than
/// on every request: compiling regexes and a Hyperscan database is far too
/// slow for the request path.
pub struct MaskCache {
    detector: Arc<Detector>,
    compiled: Mutex<Compiled>,
    recording: Arc<Masker>,
}

#[derive(Default)]
struct Compiled {
    digest: String,
    by_rule: HashMap<usize, Result<Arc<Masker>, String>>,
}

impl MaskCache {
    /// An empty cache over `detector`.
    pub fn new(detector: Arc<Detector>) -> Result<MaskCache, crate::mask::MaskError> {
        let recording = Arc::new(Masker::new(detector.clone(), &MaskSpec::default())?);
        Ok(MaskCache { detector, compiled: Mutex::new(Compiled::default()), recording })
    }

    /// Masks every detector rule: applied to everything a recording keeps.
    pub fn recording(&self) -> &Arc<Masker> {
        &self.recording
    }

    /// The masker of rule `mask_id` of `policy`. An error (a pattern the
    /// masker refuses) is remembered, so it is reported once per policy.
    pub fn get(&self, policy: &Policy, mask_id: usize, rule: &MaskRule) -> Result<Arc<Masker>, String> {
        let mut compiled = match self.compiled.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if compiled.digest != policy.digest() {
            compiled.digest = policy.digest().to_owned();
            compiled.by_rule.clear();
        }
        compiled
            .by_rule
            .entry(mask_id)
            .or_insert_with(|| {
                let spec = spec_of(rule);
                Masker::new(self.detector.clone(), &spec).map(Arc::new).map_err(|e| {
                    tracing::error!(target: super::FINDING_TARGET, error = %e, "a policy mask cannot be compiled; responses it covers are refused");
                    e.to_string()
                })
            })
            .clone()
    }
}

fn spec_of(rule: &MaskRule) -> MaskSpec {
    MaskSpec {
        rules: match &rule.rules {
            policy::MaskRules::All => MaskRules::All,
            policy::MaskRules::Only(ids) => MaskRules::Only(ids.clone()),
        },
        patterns: rule.patterns.iter().map(|p| MaskPattern { name: p.name.clone(), regex: p.regex.clone() }).collect(),
        json_fields: rule.json_fields.clone(),
    }
}

/// Decodes the first `cap` bytes of a compressed body prefix for a
/// recording. A truncated stream (the prefix was capped) yields what could
/// be decoded; an unknown encoding yields `None`.
pub fn decode_prefix(encoding: &str, data: &[u8], cap: usize) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let limit = cap as u64;
    let result = match encoding.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => return Some(data[..data.len().min(cap)].to_vec()),
        "gzip" | "x-gzip" => flate2::read::MultiGzDecoder::new(data).take(limit).read_to_end(&mut out),
        "deflate" => {
            // Servers send zlib-wrapped or raw deflate under this name.
            let zlib = flate2::read::ZlibDecoder::new(data).take(limit).read_to_end(&mut out);
            if zlib.is_err() && out.is_empty() {
                flate2::read::DeflateDecoder::new(data).take(limit).read_to_end(&mut out)
            } else {
                zlib
            }
        }
        "br" => brotli::Decompressor::new(data, 4096).take(limit).read_to_end(&mut out),
        _ => return None,
    };
    match result {
        Ok(_) => Some(out),
        // Cut off by the capture cap: keep what decoded.
        Err(_) if !out.is_empty() => Some(out),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn decodes_capped_prefixes_of_every_supported_encoding() {
        // Text that does not compress to nothing, so half a stream decodes to something.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let plain: Vec<u8> = (0..20_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                b'a' + (state % 26) as u8
            })
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&plain).expect("gzip");
        let gz = gz.finish().expect("gzip");
        assert_eq!(decode_prefix("gzip", &gz, 1 << 20).as_deref(), Some(&plain[..]));
        assert_eq!(decode_prefix("gzip", &gz, 100).map(|v| v.len()), Some(100));
        // A truncated capture still yields its decodable start.
        let cut = decode_prefix("gzip", &gz[..gz.len() / 2], 1 << 20).expect("prefix");
        assert!(plain.starts_with(&cut));
        let mut br = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
        br.write_all(&plain).expect("br");
        assert_eq!(decode_prefix("br", &br.into_inner(), 1 << 20).as_deref(), Some(&plain[..]));
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&plain).expect("zlib");
        assert_eq!(decode_prefix("deflate", &z.finish().expect("zlib"), 1 << 20).as_deref(), Some(&plain[..]));
        assert_eq!(decode_prefix("zstd", b"whatever", 10), None);
        assert_eq!(decode_prefix("gzip", b"not gzip at all", 10), None);
    }
}
