//! Tokenization speed of the shared tokenizer (`TextTokenizer`, the compact
//! Unigram model for a Unigram vocabulary) against the `tokenizers` crate's
//! own model on the same texts: `cargo run --release -p ragd-embedder
//! --example tokenize_speed -- MODEL_DIR CORPUS.jsonl [N]`.

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: tokenize_speed MODEL_DIR CORPUS.jsonl [N]");
        std::process::exit(2);
    }
    let (dir, corpus) = (std::path::Path::new(&args[1]), &args[2]);
    let n: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2000);
    let texts: Vec<String> = std::fs::read_to_string(corpus)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let ours = ragd_embedder::TextTokenizer::from_file(&dir.join("tokenizer.json"), 512).unwrap();
    let mut theirs = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    theirs.with_truncation(None).unwrap();
    for round in 0..2 {
        let t = Instant::now();
        let a: usize = texts.iter().map(|s| ours.count(s).unwrap()).sum();
        let ours_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let b: usize = texts
            .iter()
            .map(|s| theirs.encode_fast(s.as_str(), false).unwrap().len())
            .sum();
        let theirs_s = t.elapsed().as_secs_f64();
        assert_eq!(a, b);
        println!(
            "round {round}: {} texts, {a} tokens: ragd {ours_s:.3} s, tokenizers {theirs_s:.3} s ({:.2}x)",
            texts.len(),
            theirs_s / ours_s
        );
    }
}
