//! The GGUF tokenizers against llama.cpp's own tokenizer test files
//! (`models/ggml-vocab-*.gguf` with `.inp` texts and `.out` ids, made by
//! llama.cpp from the models' reference tokenizers; the test its
//! `test-tokenizer-0` runs): SentencePiece (Llama 2, Phi-3), Llama 3's
//! pre-tokenizer, Qwen 2's. Needs `scripts/fetch-models llama-cpp-vocabs`
//! (part of the test set).

use std::path::PathBuf;

use candle_core::quantized::gguf_file;
use ragd_generator::GgufTokenizer;

fn dir() -> PathBuf {
    let models = std::env::var_os("RAGD_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    models.join("llama.cpp-vocab")
}

/// The cases of `ggml-vocab-{name}.gguf.inp`/`.out`, as llama.cpp's test reads them.
fn cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let base = dir().join(format!("ggml-vocab-{name}.gguf"));
    let read = |ext: &str| {
        let path = base.with_extension(format!("gguf.{ext}"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run scripts/fetch-models llama-cpp-vocabs)",
                path.display()
            )
        })
    };
    let (inp, out) = (read("inp"), read("out"));
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    // The input file ends with a separator after its last text.
    let texts = &texts[..ids.len()];
    assert!(ids.len() > 30, "{name}: {} cases", ids.len());
    texts.iter().map(|t| t.to_string()).zip(ids).collect()
}

fn tokenizer(name: &str) -> GgufTokenizer {
    let path = dir().join(format!("ggml-vocab-{name}.gguf"));
    let mut file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let ct = gguf_file::Content::read(&mut file).unwrap();
    GgufTokenizer::from_gguf(&ct).unwrap()
}

fn check(name: &str) {
    let tok = tokenizer(name);
    let mut wrong = Vec::new();
    let cases = cases(name);
    for (text, want) in &cases {
        let got = tok.encode_plain(text).unwrap();
        if &got != want {
            wrong.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    println!(
        "{name}: {}/{} texts tokenized as llama.cpp does",
        cases.len() - wrong.len(),
        cases.len()
    );
    assert!(wrong.is_empty(), "{name}:\n{}", wrong.join("\n"));
}

#[test]
fn sentencepiece_llama2_matches_llama_cpp() {
    check("llama-spm");
}

#[test]
fn sentencepiece_phi3_matches_llama_cpp() {
    check("phi-3");
}

#[test]
fn llama3_pre_tokenizer_matches_llama_cpp() {
    check("llama-bpe");
}

#[test]
fn qwen2_pre_tokenizer_matches_llama_cpp() {
    check("qwen2");
}
