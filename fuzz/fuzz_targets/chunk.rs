//! The chunker on any text, with small chunk sizes and overlaps chosen by the
//! input: every chunk must be the verbatim slice of the text its offsets say.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ragd_pipeline::chunk::ChunkerConfig;

fuzz_target!(|data: &[u8]| {
    let Some((&[size, overlap], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let config = ChunkerConfig {
        max_tokens: 1 + size as usize % 64,
        overlap: overlap as usize % 16,
    };
    // Words as tokens: a stand-in for the embedder's tokenizer.
    let count = |s: &str| s.split_whitespace().count();
    if let Ok(chunks) = ragd_pipeline::chunk::chunk_text(count, text, &config) {
        for c in &chunks {
            assert_eq!(text.get(c.start..c.end), Some(c.text.as_str()));
        }
    }
});
