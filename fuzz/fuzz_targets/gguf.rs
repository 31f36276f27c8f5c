//! A GGUF file's header and metadata as ragd reads them (candle's reader),
//! then the tokenizer built from that metadata, then encoding and decoding a
//! string with it. A hostile model file may be refused; it must not panic,
//! hang or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut cursor = std::io::Cursor::new(data);
    let Ok(content) = candle_core::quantized::gguf_file::Content::read(&mut cursor) else {
        return;
    };
    if let Ok(tokenizer) = ragd_generator::GgufTokenizer::from_gguf(&content) {
        if let Ok(ids) = tokenizer.encode_plain("Hello, 世界! 123") {
            let _ = tokenizer.decode(&ids);
        }
    }
});
