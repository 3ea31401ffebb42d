//! The response masker, differentially: streamed in arbitrary chunks
//! through the body masker (identity, gzip, deflate, br or zstd), the output
//! decodes to the input with every match of the masked pattern replaced
//! (`regex::replace_all` is the reference), whatever the chunking; and the
//! built-in rules never panic on arbitrary bytes.
#![no_main]
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use gateway::{
    detect::Detector,
    mask::{MaskPattern, MaskRules, MaskSpec, Masker},
};
use libfuzzer_sys::fuzz_target;

#[path = "../common/codings.rs"]
mod codings;
use codings::{decode, encode, Coding};

/// The masked pattern: bounded length, so a match never spans more than
/// the masker holds back between chunks.
const PATTERN: &str = "KEY[0-9A-F]{6}";

#[derive(Arbitrary, Debug)]
struct Input {
    coding: Coding,
    builtin: bool,
    cuts: Vec<u16>,
    body: Vec<u8>,
}

fn detector() -> Arc<Detector> {
    static D: OnceLock<Arc<Detector>> = OnceLock::new();
    D.get_or_init(|| Arc::new(Detector::builtin().expect("built-in rules compile"))).clone()
}

fn pattern_masker() -> Arc<Masker> {
    static M: OnceLock<Arc<Masker>> = OnceLock::new();
    M.get_or_init(|| {
        let spec = MaskSpec {
            rules: MaskRules::Only(Vec::new()),
            patterns: vec![MaskPattern { name: "k".into(), regex: PATTERN.into() }],
            json_fields: Vec::new(),
        };
        Arc::new(Masker::new(detector(), &spec).expect("spec is valid"))
    })
    .clone()
}

fn builtin_masker() -> Arc<Masker> {
    static M: OnceLock<Arc<Masker>> = OnceLock::new();
    M.get_or_init(|| Arc::new(Masker::new(detector(), &MaskSpec::default()).expect("spec is valid"))).clone()
}

fuzz_target!(|input: Input| {
    let masker = if input.builtin { builtin_masker() } else { pattern_masker() };
    let wire = encode(input.coding, &input.body);
    let Ok(mut body) = masker.body(input.coding.name()) else { return };
    let mut cuts: Vec<usize> = input.cuts.iter().map(|&c| usize::from(c) % (wire.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0;
    for c in cuts.into_iter().chain([wire.len()]) {
        match body.push(&wire[at..c]) {
            Ok(b) => out.extend_from_slice(&b),
            Err(_) => return,
        }
        at = c;
    }
    match body.finish() {
        Ok(b) => out.extend_from_slice(&b),
        Err(_) => return,
    }
    if input.builtin {
        return;
    }
    let re = regex::bytes::Regex::new(PATTERN).expect("valid");
    let expected = re.replace_all(&input.body, &b"[MASKED:k]"[..]);
    assert!(decode(input.coding, &out) == expected.as_ref(), "masked output differs from the reference");
});
