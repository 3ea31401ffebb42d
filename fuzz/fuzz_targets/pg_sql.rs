//! SQL classification (pg_query parse, statement kinds, tables, the
//! `standard_conforming_strings` readings) on arbitrary text.
#![no_main]
use gateway::postgres::sql::{classify_with, ParseOptions};
use libfuzzer_sys::fuzz_target;

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
});
