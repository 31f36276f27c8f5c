//! File extraction (`POST /ingest` with files): any bytes under any name and
//! declared type. It may refuse; it must not panic or hang.
//!
//! pdf-extract panics on some malformed PDFs; ragd's PDF reader catches those
//! (`catch_unwind`) and refuses the file as unreadable. libFuzzer's panic
//! hook would abort on the caught panic too, so this target replaces it with
//! a silent one: a panic that escapes `extract` still fails the run
//! (libfuzzer-sys aborts on any panic that reaches it).
#![no_main]

use libfuzzer_sys::fuzz_target;

/// Names and types that steer the first byte's choice of parser.
const NAMES: &[(&str, Option<&str>)] = &[
    ("a.txt", None),
    ("a.md", Some("text/markdown")),
    ("a.html", None),
    ("a.pdf", Some("application/pdf")),
    ("a.docx", None),
    ("a.odt", Some("application/vnd.oasis.opendocument.text")),
    ("a", Some("text/html")),
    ("a", None),
];

fuzz_target!(|data: &[u8]| {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let (name, content_type) = NAMES[pick as usize % NAMES.len()];
    if let Ok(e) = ragd_pipeline::extract::extract(name, content_type, bytes) {
        assert!(!e.text.trim().is_empty(), "an accepted file has text");
    }
});
