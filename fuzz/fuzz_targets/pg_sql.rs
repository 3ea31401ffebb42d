//! SQL classification (pg_query parse, statement kinds, tables, the
//! `standard_conforming_strings` readings) on arbitrary text, and the
//! session memo (shape by lexing) against the parse: a query classified
//! by shape must classify exactly as it parses. Then the handler's key
//! search in SQL's encodings (`postgres::encoded`: views and the parse
//! tree's strings) and COPY's text-format unescaping on the same bytes:
//! found ranges lie within the text.
#![no_main]
use std::sync::{Arc, OnceLock};

use gateway::{
    detect::Detector,
    fuzzing,
    postgres::sql::{classify, classify_with, Memo, ParseOptions},
};
use libfuzzer_sys::fuzz_target;

fn detector() -> &'static Arc<Detector> {
    static DETECTOR: OnceLock<Arc<Detector>> = OnceLock::new();
    DETECTOR.get_or_init(|| Arc::new(Detector::builtin().expect("built-in rules")))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Ok(query) = std::str::from_utf8(rest) else { return };
    let standard_conforming_strings = match mode % 3 {
        0 => None,
        1 => Some(true),
        _ => Some(false),
    };
    if let Ok(statements) = classify_with(query, ParseOptions { standard_conforming_strings }) {
        for s in &statements {
            let _ = s.text(query);
        }
    }
    // The memo, twice (the second by text), and with every digit changed
    // (by shape when the shape holds).
    let mut memo = Memo::default();
    let parsed = classify(query);
    let other: String = query.chars().map(|c| if c.is_ascii_digit() { '7' } else { c }).collect();
    for q in [query, query, other.as_str()] {
        let remembered = memo.classify(q);
        let direct = if q == query { parsed.clone() } else { classify(q) };
        assert_eq!(remembered.as_ref().as_ref().ok(), direct.as_ref().ok(), "{q:?}");
    }
    if let Some(found) = fuzzing::sql_keys(detector(), query) {
        for (rule, range) in found {
            assert!(range.start <= range.end && range.end <= query.len(), "{rule} at {range:?}");
        }
    }
    if let Some(decoded) = fuzzing::copy_unescape(rest) {
        assert!(decoded.len() <= rest.len(), "unescaping never grows the data");
    }
});
