//! The streaming JSON lexer: whatever the input, no panic, and feeding it
//! in chunks emits exactly what feeding it whole does.
#![no_main]
use arbitrary::Arbitrary;
use gateway::fuzzing::json_lex;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    cuts: Vec<u16>,
    data: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let whole = json_lex([input.data.as_slice()]);
    let mut cuts: Vec<usize> = input.cuts.iter().map(|&c| usize::from(c) % (input.data.len() + 1)).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut chunks = Vec::new();
    let mut at = 0;
    for c in cuts {
        chunks.push(&input.data[at..c]);
        at = c;
    }
    chunks.push(&input.data[at..]);
    let chunked = json_lex(chunks);
    assert_eq!(whole, chunked, "chunking changed what the lexer emits");
});
