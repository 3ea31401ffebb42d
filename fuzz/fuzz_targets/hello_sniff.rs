//! ClientHello parsing and the dispatcher's first-bytes classification on
//! the same bytes, with the invariants between them.
#![no_main]
use gateway::fuzzing::{client_hello, sniff, Hello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let kind = sniff(data);
    match client_hello(data) {
        Hello::Need(n) => assert!(n > data.len(), "asks for {n} bytes with {} there", data.len()),
        Hello::Done { sni, .. } => {
            assert_eq!(kind, "tls", "a complete ClientHello not sniffed as TLS");
            if let Some(sni) = sni {
                assert!(!sni.is_empty());
            }
        }
        Hello::NotTls | Hello::Malformed => {}
    }
    // Every prefix of the input classifies without panicking.
    for cut in [0, 1, 3, 5, 8, 16, 24] {
        if cut <= data.len() {
            let _ = sniff(&data[..cut]);
            let _ = client_hello(&data[..cut]);
        }
    }
});
