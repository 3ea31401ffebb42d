//! Decoding a stored row of session records (`chunks.body`, see
//! gateway/src/record/chunk.rs): never a panic, an error names a record of
//! the row, and what decodes encodes back to the same bytes.
#![no_main]
use gateway::fuzzing::record_row;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, body)) = data.split_first() else { return };
    let n = u64::from(n % 8);
    match record_row(body, 100, n) {
        Ok((records, encoded)) => {
            assert_eq!(records as u64, n);
            assert_eq!(encoded, body, "a decoded row encodes back to other bytes");
        }
        Err(seq) => assert!((100..=100 + n).contains(&seq), "error at record {seq} of a row of {n} from 100"),
    }
});
