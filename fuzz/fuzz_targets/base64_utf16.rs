//! The base64 run finder and lenient decoder, and UTF-16 sniffing and
//! transcoding (differentially against the standard library).
#![no_main]
use gateway::fuzzing::{base64_runs, utf16, utf16le_to_utf8};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut last_end = 0;
    for ((start, end), decoded) in base64_runs(data) {
        assert!(last_end <= start && start < end && end <= data.len(), "run {start}..{end} out of order");
        last_end = end;
        for d in decoded {
            assert!(d.len() <= (end - start) * 3 / 4 + 3);
        }
    }
    let (bom, _) = utf16(data);
    if let Some(bom) = bom {
        assert!(bom <= data.len());
    }
    let even = &data[..data.len() & !1];
    let units: Vec<u16> = even.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    assert_eq!(
        String::from_utf16_lossy(&units).into_bytes(),
        utf16le_to_utf8(even),
        "UTF-16LE transcoding differs from the standard library"
    );
});
