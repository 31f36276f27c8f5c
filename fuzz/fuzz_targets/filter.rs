//! The metadata filter parser (`filter` of /search and /ask) on any JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = ragd_core::Filter::parse(Some(&value));
    }
});
