//! The operator-written YAML files: main configuration, policy, identity
//! mapping (with its templates). Any text: an error or a value, never a
//! panic.
#![no_main]
use std::path::Path;

use gateway::{config::Config, identity::MappingFile, policy::Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    match which % 3 {
        0 => {
            let _ = Config::parse(Path::new("fuzz.yaml"), text);
        }
        1 => {
            let _ = Policy::parse(Path::new("policy.yaml"), text);
        }
        _ => {
            let _ = MappingFile::parse(Path::new("mapping.yaml"), text);
        }
    }
});
