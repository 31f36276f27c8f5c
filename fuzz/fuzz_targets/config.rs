//! The configuration loader on any TOML text: a bad file is an error that
//! names the problem, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ragd::Config::from_toml_over_defaults(text, "fuzz");
    }
});
