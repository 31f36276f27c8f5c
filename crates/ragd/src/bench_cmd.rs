//! `ragd bench ...`: figures for the models and the service on this machine.
//!
//! ```text
//! ragd bench embed    [--corpus DIR] [--model DIR] [--texts N] [--texts-file F] [--runs N] [--json] [--vectors F]
//! ragd bench generate --model FILE [--prompt-tokens N] [--new-tokens N] [--runs N] [--json]
//! ragd bench ingest   [--corpus DIR] [--batch N] [--limit N] [--config FILE | --url URL]
//! ragd bench search   (--data-dir DIR [--config FILE] [--replicas N] | --url URL...) [--corpus DIR] [--clients N]
//! ragd bench ask      [--corpus DIR] [--model FILE] [--questions N]
//! ```
//! `--corpus` is a BEIR folder (`corpus.jsonl`, `queries.jsonl`), by default the
//! Debian FAQ set in `../shared/data/debian-faq-en` (wiki-en-10k for ingest and
//! search). Every command prints its figures; none asserts anything.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::eval_cmd::read_jsonl;
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use ragd_embedder::{Embedder, EmbedderConfig};
use ragd_generator::Generator;
use serde_json::{json, Value};

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// Embedding throughput over corpus texts.
    Embed {
        #[arg(long, default_value = "../shared/data/debian-faq-en")]
        corpus: PathBuf,
        #[arg(long, default_value = "models/all-MiniLM-L6-v2")]
        model: PathBuf,
        /// Texts to embed.
        #[arg(long, default_value_t = 256)]
        texts: usize,
        /// Embed these texts instead (a JSON array of strings), as a peer
        /// benchmark does (bench/compare-embeddings).
        #[arg(long)]
        texts_file: Option<PathBuf>,
        /// Texts per forward pass.
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Timed runs; the figure is the median.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Machine-readable output (one JSON object).
        #[arg(long)]
        json: bool,
        /// Write the vectors here (a JSON array of arrays, in the texts' order).
        #[arg(long)]
        vectors: Option<PathBuf>,
        /// Int8 linear layers (`embedder.int8`).
        #[arg(long)]
        int8: bool,
    },
    /// Prefill and decode speed of a GGUF model.
    Generate {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "../shared/data/debian-faq-en")]
        corpus: PathBuf,
        /// Prompt length for the prefill measurement.
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        /// Tokens decoded one at a time after the prompt.
        #[arg(long, alias = "decode-tokens", default_value_t = 64)]
        new_tokens: usize,
        /// Runs; the figures are the medians.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Machine-readable output (one JSON object).
        #[arg(long)]
        json: bool,
        /// Load the file's Q8_0 copy (made now if missing), as `ragd serve` does
        /// with `generation.requantize = true`, instead of the file itself.
        #[arg(long)]
        requantize: bool,
        /// Lay the weights out in fresh memory, as with
        /// `generation.prepared_weights = false`, instead of mapping the
        /// prepared file beside the model.
        #[arg(long)]
        no_prepared: bool,
        /// Answer prompts instead: a JSON-lines file of `{"prompt_ids": [...]}`
        /// (`ragd bench ask --json` writes them), each answered as `/ask` does
        /// (default settings, concise length, steering) twice: one token per
        /// forward pass, then with drafting. Prints decode speed of both, the
        /// drafted and accepted tokens, and checks the answers are the same.
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// Most tokens drafted per forward pass, with --prompts.
        #[arg(long, default_value_t = ragd_generator::DEFAULT_DRAFT_TOKENS)]
        draft_tokens: usize,
    },
    /// Ingest throughput (cold, then unchanged) and restart time with and without
    /// the index dump, on a fresh data directory; or, with --url, through a
    /// running server's POST /ingest (e.g. the scale profile's balancer).
    Ingest {
        #[arg(long, default_value = "../shared/data/wiki-en-10k")]
        corpus: PathBuf,
        /// Documents per ingest request.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Only the first N documents (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Config file (the store, the embedder), as for `ragd serve`; with
        /// store.backend = "postgres" the database must hold no documents.
        #[arg(long, conflicts_with = "url")]
        config: Option<PathBuf>,
        /// A running server to send the documents to (it should hold none of
        /// them for the cold figure).
        #[arg(long)]
        url: Option<String>,
        /// API key for --url (a write key), if the server has keys.
        #[arg(long, env = "RAGD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// Soak test: a `ragd serve` child on loopback under concurrent clients
    /// mixing ingest, update, delete, search and questions (JSON, streamed,
    /// streams dropped mid-answer) for a bounded time and request count; prints
    /// requests by status, latency percentiles and resident memory, then checks
    /// that every acknowledged document is whole and every deleted one gone.
    /// Exits non-zero on a lost document, a 5xx, or memory growth past the bound.
    Soak {
        /// Minutes of load.
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
        /// Concurrent clients.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// At most this many requests in all.
        #[arg(long, default_value_t = 100_000)]
        max_requests: usize,
        /// Config file for the server, as for `ragd serve` (its data directory
        /// is replaced by a temporary one).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Seed of the clients' choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Allowed growth of resident memory from ready to the end (0.5 = 50 %).
        #[arg(long, default_value_t = 0.5)]
        memory_growth: f64,
    },
    /// `/search` over HTTP: queries/s and latency per retrieval mode, with several
    /// concurrent clients, on a corpus ingested into `--data-dir` (ingested there
    /// first when the directory holds no documents; kept for the next run), or
    /// on running servers given with --url (the corpus is ingested through the
    /// first when it holds no documents).
    Search {
        #[arg(long, default_value = "../shared/data/wiki-en-10k")]
        corpus: PathBuf,
        /// Data directory; reused when it already holds the corpus.
        #[arg(long, required_unless_present = "url", conflicts_with = "url")]
        data_dir: Option<PathBuf>,
        /// Running servers (repeat the option for several); the clients spread
        /// over them.
        #[arg(long)]
        url: Vec<String>,
        /// API key for --url, if the servers have keys.
        #[arg(long, env = "RAGD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Config file (for example to choose the embedder), as for `ragd serve`.
        #[arg(long, conflicts_with = "url")]
        config: Option<PathBuf>,
        /// Concurrent clients.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Requests per mode.
        #[arg(long, default_value_t = 400)]
        requests: usize,
        /// Results per query.
        #[arg(long, default_value_t = 10)]
        top_k: usize,
        /// Servers started on the same store (store.backend = "postgres"),
        /// the clients spread over them.
        #[arg(long, default_value_t = 1, conflicts_with = "url")]
        replicas: usize,
    },
    /// Sync throughput of a folder source: the corpus written out as one
    /// Markdown file per document and synced cold, unchanged, and with a share
    /// of the files edited (and a few deleted and added).
    Sources {
        #[arg(long, default_value = "../shared/data/wiki-en-10k")]
        corpus: PathBuf,
        /// Only the first N documents (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
        /// Share of the files edited before the changed sync.
        #[arg(long, default_value_t = 0.1)]
        changed: f64,
        /// Config file (the store, the embedder), as for `ragd serve`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Time to first token of streamed /ask requests over an ingested corpus.
    Ask {
        #[arg(long, default_value = "../shared/data/debian-faq-en")]
        corpus: PathBuf,
        /// Generator model (default: the configured one).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Questions to ask (the first N of queries.jsonl).
        #[arg(long, default_value_t = 3)]
        questions: usize,
        /// One JSON object per question, with the prompt's token ids (rebuilt
        /// from the sources the answer reports) for a peer engine to prefill.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn corpus_texts(corpus: &Path) -> Result<Vec<Value>> {
    read_jsonl(&corpus.join("corpus.jsonl"))
}

pub(crate) async fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Embed {
            corpus,
            model,
            texts,
            texts_file,
            batch_size,
            runs,
            json,
            vectors,
            int8,
        } => {
            let texts: Vec<String> = match texts_file {
                Some(f) => serde_json::from_slice(&std::fs::read(&f)?).map_err(|e| {
                    anyhow::anyhow!("{}: not a JSON array of strings: {e}", f.display())
                })?,
                None => corpus_texts(&corpus)?
                    .iter()
                    .filter_map(|d| d["text"].as_str().map(str::to_string))
                    .cycle()
                    .take(texts)
                    .collect(),
            };
            bench_embed(
                &texts,
                &model,
                batch_size,
                int8,
                runs.max(1),
                json,
                vectors.as_deref(),
            )
        }
        BenchCommand::Generate {
            model,
            corpus,
            prompt_tokens,
            new_tokens,
            runs,
            json,
            requantize,
            no_prepared,
            prompts,
            draft_tokens,
        } => {
            let load = ragd_generator::LoadOptions {
                prepared_weights: !no_prepared,
            };
            let model = if requantize {
                ragd_generator::requant::fast_copy(&model)?.0
            } else {
                model
            };
            if let Some(prompts) = prompts {
                return bench_answers(&model, &load, &prompts, draft_tokens, json);
            }
            bench_generate(
                &model,
                &load,
                &corpus,
                prompt_tokens,
                new_tokens,
                runs.max(1),
                json,
            )
        }
        BenchCommand::Ingest {
            corpus,
            batch,
            limit,
            url: Some(url),
            api_key,
            ..
        } => bench_ingest_http(&corpus, batch.max(1), limit, &Http::new(url, api_key)).await,
        BenchCommand::Ingest {
            corpus,
            batch,
            limit,
            config,
            ..
        } => bench_ingest(&corpus, batch.max(1), limit, config.as_deref()).await,
        BenchCommand::Search {
            corpus,
            data_dir,
            url,
            api_key,
            config,
            clients,
            requests,
            top_k,
            replicas,
        } => {
            let load = Load {
                clients,
                requests,
                top_k,
            };
            match data_dir {
                Some(dir) if url.is_empty() => {
                    bench_search(&corpus, &dir, config.as_deref(), replicas, load).await
                }
                _ => {
                    let servers: Vec<Http> = url
                        .into_iter()
                        .map(|u| Http::new(u, api_key.clone()))
                        .collect();
                    bench_search_http(&corpus, &servers, load).await
                }
            }
        }
        BenchCommand::Ask {
            corpus,
            model,
            questions,
            json,
        } => bench_ask(&corpus, model, questions, json).await,
        BenchCommand::Sources {
            corpus,
            limit,
            changed,
            config,
        } => {
            crate::bench_sources::run(crate::bench_sources::Args {
                corpus: &corpus,
                limit,
                changed,
                config: config.as_deref(),
            })
            .await
        }
        BenchCommand::Soak {
            minutes,
            clients,
            max_requests,
            config,
            seed,
            memory_growth,
        } => {
            crate::soak_cmd::run(crate::soak_cmd::Soak {
                minutes,
                clients,
                max_requests,
                config,
                seed,
                memory_growth,
            })
            .await
        }
    }
}

fn bench_embed(
    texts: &[String],
    model: &Path,
    batch_size: usize,
    int8: bool,
    runs: usize,
    json: bool,
    vectors_out: Option<&Path>,
) -> Result<()> {
    let started = Instant::now();
    let embedder = Embedder::load(
        model,
        &EmbedderConfig {
            batch_size: batch_size.max(1),
            int8,
            ..EmbedderConfig::default()
        },
    )?;
    let load_s = started.elapsed().as_secs_f64();
    if texts.is_empty() {
        bail!("no texts to embed");
    }
    let tokens: usize = texts
        .iter()
        .map(|t| {
            embedder
                .tokenizer()
                .encode(t.as_str())
                .map(|e| e.len())
                .unwrap_or(0)
        })
        .sum();
    embedder.embed(&texts[..texts.len().min(8)])?; // warm-up
    let mut times = Vec::new();
    let mut vectors = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        vectors = embedder.embed(texts)?;
        times.push(started.elapsed().as_secs_f64());
    }
    let secs = median(times);
    if let Some(path) = vectors_out {
        std::fs::write(path, serde_json::to_vec(&vectors)?)?;
    }
    if json {
        println!(
            "{}",
            json!({
                "engine": if int8 { "ragd int8" } else { "ragd" },
                "model": embedder.name(),
                "texts": texts.len(),
                "tokens": tokens,
                "max_length": embedder.max_length(),
                "batch_size": batch_size,
                "threads": rayon_threads(),
                "runs": runs,
                "load_s": load_s,
                "seconds": secs,
                "texts_per_s": texts.len() as f64 / secs,
                "tokens_per_s": tokens as f64 / secs,
            })
        );
    } else {
        println!(
            "embed: {} texts ({} tokens after truncation to {}) in {:.2} s = {:.1} texts/s, {:.0} tokens/s [{}]",
            texts.len(),
            tokens,
            embedder.max_length(),
            secs,
            texts.len() as f64 / secs,
            tokens as f64 / secs,
            embedder.name()
        );
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench_generate(
    model: &Path,
    load: &ragd_generator::LoadOptions,
    corpus: &Path,
    prompt_tokens: usize,
    new_tokens: usize,
    runs: usize,
    json_out: bool,
) -> Result<()> {
    let started = Instant::now();
    let mut g = Generator::load_with(model, load)?;
    let load_s = started.elapsed().as_secs_f64();
    // The prompt: the first N tokens of the corpus texts, the same ids llama.cpp
    // gives (bench/compare-llamacpp feeds it the same text).
    let text: String = corpus_texts(corpus)?
        .iter()
        .filter_map(|d| d["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n\n");
    let mut ids = g.tokenizer().encode_plain(&text)?;
    ids.truncate(prompt_tokens);
    if ids.len() < prompt_tokens {
        bail!("the corpus has only {} tokens", ids.len());
    }
    g.feed(&ids[..16.min(ids.len())], 0)?; // warm-up
    let (mut prefill, mut decode, mut ttft) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let started = Instant::now();
        let mut logits = g.feed(&ids, 0)?;
        let prefill_s = started.elapsed().as_secs_f64();
        let argmax = |l: &[f32]| {
            l.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .unwrap_or(0)
        };
        let mut next = argmax(&logits);
        ttft.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        for pos in ids.len()..ids.len() + new_tokens {
            logits = g.feed(&[next], pos)?;
            next = argmax(&logits);
        }
        let decode_s = started.elapsed().as_secs_f64();
        prefill.push(ids.len() as f64 / prefill_s);
        decode.push(new_tokens as f64 / decode_s);
    }
    let threads = rayon_threads();
    let (prefill, decode, ttft) = (median(prefill), median(decode), median(ttft));
    if json_out {
        println!(
            "{}",
            json!({
                "engine": "ragd (candle)", "model": g.name(), "file": model.display().to_string(),
                "architecture": g.architecture(),
                "threads": threads, "runs": runs, "prompt_tokens": ids.len(), "new_tokens": new_tokens,
                "load_s": load_s, "prefill_tok_s": prefill, "decode_tok_s": decode, "ttft_s": ttft,
            })
        );
    } else {
        println!(
            "generate: {} ({}), {threads} threads, loaded in {load_s:.2} s; prompt {} tokens: prefill {prefill:.1} tokens/s, \
             time to first token {ttft:.2} s; decode {new_tokens} tokens: {decode:.1} tokens/s (medians of {runs} runs)",
            g.name(),
            g.architecture(),
            ids.len(),
        );
    }
    Ok(())
}

/// Answers each prompt of `prompts` as `/ask` does, without and with
/// drafting; see `BenchCommand::Generate::prompts`.
fn bench_answers(
    model: &Path,
    load: &ragd_generator::LoadOptions,
    prompts: &Path,
    draft_tokens: usize,
    json_out: bool,
) -> Result<()> {
    let mut g = Generator::load_with(model, load)?;
    let config = ragd::Config::defaults();
    let mut params = config.generation.defaults();
    params.max_tokens = config.generation.concise_max_tokens;
    params.steer = Some(ragd_pipeline::check::steer_answer);
    let prompts: Vec<Vec<u32>> = read_jsonl(prompts)?
        .iter()
        .map(|p| serde_json::from_value(p["prompt_ids"].clone()))
        .collect::<Result<_, _>>()
        .context("each line needs prompt_ids: an array of token ids")?;
    anyhow::ensure!(!prompts.is_empty(), "no prompts");
    g.feed(&prompts[0][..16.min(prompts[0].len())], 0)?; // warm-up
    let (mut tokens, mut plain_s, mut draft_s, mut drafted, mut accepted) = (0, 0.0, 0.0, 0, 0);
    for (i, prompt) in prompts.iter().enumerate() {
        g.set_draft_tokens(0);
        let plain = g.generate(prompt, &params, |_| true)?;
        g.set_draft_tokens(draft_tokens);
        let fast = g.generate(prompt, &params, |_| true)?;
        anyhow::ensure!(
            fast.text == plain.text,
            "prompt {i}: drafting changed the answer:\n{:?}\n{:?}",
            plain.text,
            fast.text
        );
        // Decode time covers the tokens after the first (which prefill yields).
        let decoded = plain.completion_tokens.saturating_sub(1);
        tokens += decoded;
        plain_s += plain.decode_ms / 1e3;
        draft_s += fast.decode_ms / 1e3;
        drafted += fast.drafted_tokens;
        accepted += fast.accepted_tokens;
        if json_out {
            println!(
                "{}",
                json!({ "prompt_tokens": prompt.len(), "completion_tokens": plain.completion_tokens,
                        "decoded_tokens": decoded,
                        "plain_decode_s": plain.decode_ms / 1e3, "draft_decode_s": fast.decode_ms / 1e3,
                        "drafted_tokens": fast.drafted_tokens, "accepted_tokens": fast.accepted_tokens })
            );
        } else {
            println!(
                "answer {i}: {} tokens; decode {:.1} tokens/s one by one, {:.1} with drafting \
                 ({} drafted, {} accepted)",
                plain.completion_tokens,
                decoded as f64 / (plain.decode_ms / 1e3),
                decoded as f64 / (fast.decode_ms / 1e3),
                fast.drafted_tokens,
                fast.accepted_tokens
            );
        }
    }
    let summary = json!({
        "engine": "ragd (candle)", "model": g.name(), "threads": rayon_threads(),
        "answers": prompts.len(), "decoded_tokens": tokens, "draft_tokens": draft_tokens,
        "plain_decode_tok_s": tokens as f64 / plain_s, "draft_decode_tok_s": tokens as f64 / draft_s,
        "drafted_tokens": drafted, "accepted_tokens": accepted,
        "acceptance": accepted as f64 / drafted.max(1) as f64,
    });
    if json_out {
        println!("{summary}");
    } else {
        println!(
            "{} answers, {tokens} tokens decoded: {:.1} tokens/s one by one, {:.1} with drafting ({:.2}x); \
             {drafted} tokens drafted, {accepted} accepted ({:.0} %); the same answers",
            prompts.len(),
            summary["plain_decode_tok_s"].as_f64().unwrap_or(0.0),
            summary["draft_decode_tok_s"].as_f64().unwrap_or(0.0),
            plain_s / draft_s,
            100.0 * summary["acceptance"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}

/// Threads candle's CPU kernels use (its rayon pool: RAYON_NUM_THREADS or the cores).
fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}

/// The configuration in `file` (merged over the defaults), or the defaults.
pub(crate) fn config_from(file: Option<&Path>) -> Result<ragd::Config> {
    match file {
        Some(f) => ragd::Config::from_file(f).map_err(|e| anyhow::anyhow!("{e}")),
        None => Ok(ragd::Config::defaults()),
    }
}

/// A running server, for the benchmarks that go through its HTTP API.
#[derive(Clone)]
struct Http {
    base: String,
    api_key: Option<String>,
    client: reqwest::Client,
}

impl Http {
    fn new(base: String, api_key: Option<String>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_string(),
            api_key,
            client: reqwest::Client::new(),
        }
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let r = self.client.post(format!("{}{path}", self.base));
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    /// The server's document count (GET /ready).
    async fn documents(&self) -> Result<u64> {
        let ready: Value = self
            .client
            .get(format!("{}/ready", self.base))
            .send()
            .await?
            .json()
            .await?;
        Ok(ready["documents"].as_u64().unwrap_or(0))
    }

    /// POST /ingest of one batch: (documents, chunks, statuses).
    async fn ingest(&self, documents: &[Value]) -> Result<Vec<(String, usize)>> {
        let res = self
            .post("/ingest")
            .json(&json!({ "documents": documents }))
            .send()
            .await?;
        let status = res.status();
        let body: Value = res.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(
            status.is_success(),
            "{}/ingest answered {status}: {body}",
            self.base
        );
        Ok(body["documents"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|d| {
                        (
                            d["status"].as_str().unwrap_or("?").to_string(),
                            d["chunks"].as_u64().unwrap_or(0) as usize,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// A corpus document as an ingest request's document.
fn document_json(d: &Value) -> Value {
    json!({
        "id": d["_id"], "title": d["title"], "text": d["text"],
        "metadata": d.get("metadata").cloned().unwrap_or(json!({}))
    })
}

async fn bench_ingest_http(corpus: &Path, batch: usize, limit: usize, server: &Http) -> Result<()> {
    let mut docs: Vec<Value> = corpus_texts(corpus)?.iter().map(document_json).collect();
    if limit > 0 {
        docs.truncate(limit);
    }
    println!(
        "POST {}/ingest, {} documents in batches of {batch}",
        server.base,
        docs.len()
    );
    for label in ["cold", "unchanged"] {
        let started = Instant::now();
        let (mut n_docs, mut n_chunks, mut statuses) =
            (0usize, 0usize, std::collections::BTreeMap::new());
        for b in docs.chunks(batch) {
            for (status, chunks) in server.ingest(b).await? {
                n_docs += 1;
                n_chunks += chunks;
                *statuses.entry(status).or_insert(0usize) += 1;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "ingest ({label}): {n_docs} documents, {n_chunks} chunks in {secs:.1} s = {:.1} documents/s, {:.1} chunks/s {statuses:?}",
            n_docs as f64 / secs,
            n_chunks as f64 / secs
        );
    }
    Ok(())
}

async fn bench_ingest(
    corpus: &Path,
    batch: usize,
    limit: usize,
    config_file: Option<&Path>,
) -> Result<()> {
    let data = std::env::temp_dir().join(format!("ragd-bench-ingest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let mut config = config_from(config_file)?;
    config.server.data_dir = data.clone();
    println!(
        "store {}, embedder {} ({})",
        config.store.backend,
        config.embedder.backend,
        if config.embedder.backend == "openai" {
            config.embedder.url.clone()
        } else {
            config.models.embedder.display().to_string()
        }
    );
    let mut docs = corpus_texts(corpus)?;
    if limit > 0 {
        docs.truncate(limit);
    }
    let requests: Vec<ragd_pipeline::IngestRequest> = docs
        .chunks(batch)
        .map(|c| {
            let documents = c
                .iter()
                .map(|d| serde_json::from_value(document_json(d)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(ragd_pipeline::IngestRequest { documents })
        })
        .collect::<Result<_>>()?;

    let engine = ragd::open_for_ingest(config.clone()).await?;
    for (label, reqs) in [("cold", requests.clone()), ("unchanged", requests)] {
        let started = Instant::now();
        let (mut n_docs, mut n_chunks, mut statuses) =
            (0usize, 0usize, std::collections::BTreeMap::new());
        for req in reqs {
            let res = engine
                .ingest(req)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for d in res.documents {
                n_docs += 1;
                n_chunks += d.chunks;
                *statuses
                    .entry(format!("{:?}", d.status).to_lowercase())
                    .or_insert(0usize) += 1;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "ingest ({label}): {n_docs} documents, {n_chunks} chunks in {secs:.1} s = {:.1} documents/s, {:.1} chunks/s {statuses:?}",
            n_docs as f64 / secs,
            n_chunks as f64 / secs
        );
    }
    engine.flush().await?;
    drop(engine);
    if config.store.backend != "sqlite" {
        // No index dump to time: the index is the database's.
        return Ok(());
    }

    for (label, remove_dump) in [
        ("with the index dump", false),
        ("without the dump (rebuild)", true),
    ] {
        if remove_dump {
            std::fs::remove_dir_all(data.join("index"))?;
        }
        let started = Instant::now();
        let engine = ragd::open_for_ingest(config.clone()).await?;
        let secs = started.elapsed().as_secs_f64();
        println!(
            "restart {label}: ready in {secs:.2} s ({})",
            engine.status().await.index_at_start.unwrap_or("?")
        );
    }
    let _ = std::fs::remove_dir_all(data);
    Ok(())
}

/// The load `bench search` puts on the servers.
#[derive(Clone, Copy)]
struct Load {
    clients: usize,
    requests: usize,
    top_k: usize,
}

async fn bench_search(
    corpus: &Path,
    data_dir: &Path,
    config_file: Option<&Path>,
    replicas: usize,
    load: Load,
) -> Result<()> {
    let mut config = config_from(config_file)?;
    anyhow::ensure!(
        replicas <= 1 || config.store.backend == "postgres",
        "--replicas {replicas} needs store.backend = \"postgres\" (replicas share its database)"
    );
    config.server.port = 0;
    config.server.data_dir = data_dir.to_path_buf();
    {
        let engine = ragd::open_for_ingest(config.clone()).await?;
        if engine.status().await.documents.unwrap_or(0) == 0 {
            let started = Instant::now();
            let docs = corpus_texts(corpus)?;
            for batch in docs.chunks(256) {
                let documents = batch
                    .iter()
                    .map(|d| serde_json::from_value(document_json(d)))
                    .collect::<Result<Vec<_>, _>>()?;
                engine
                    .ingest(ragd_pipeline::IngestRequest { documents })
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            println!(
                "ingested {} documents in {:.1} s",
                docs.len(),
                started.elapsed().as_secs_f64()
            );
            engine.flush().await?;
        }
    }
    let mut servers = Vec::new();
    for _ in 0..replicas.max(1) {
        let mut server = ragd::start(config.clone()).await?;
        server.wait_ready().await?;
        servers.push(server);
    }
    let status = match servers[0].state.pipeline.get() {
        Some(pipeline) => serde_json::to_value(pipeline.status().await)?,
        None => Value::Null,
    };
    let bases: Vec<Http> = servers
        .iter()
        .map(|s| Http::new(format!("http://{}", s.addr), None))
        .collect();
    println!(
        "serving {} documents, {} chunks from the {} store",
        status["documents"], status["chunks"], config.store.backend,
    );
    search_load(corpus, &bases, load).await?;
    for server in servers {
        server.shutdown().await?;
    }
    Ok(())
}

async fn bench_search_http(corpus: &Path, servers: &[Http], load: Load) -> Result<()> {
    anyhow::ensure!(!servers.is_empty(), "give --data-dir or --url");
    if servers[0].documents().await? == 0 {
        let started = Instant::now();
        let docs: Vec<Value> = corpus_texts(corpus)?.iter().map(document_json).collect();
        for b in docs.chunks(256) {
            servers[0].ingest(b).await?;
        }
        println!(
            "ingested {} documents through {} in {:.1} s",
            docs.len(),
            servers[0].base,
            started.elapsed().as_secs_f64()
        );
    }
    println!("serving {} documents", servers[0].documents().await?);
    search_load(corpus, servers, load).await
}

/// `load.clients` concurrent clients spread over `servers`, `load.requests`
/// `/search` requests per mode: queries/s and latency percentiles.
async fn search_load(corpus: &Path, servers: &[Http], load: Load) -> Result<()> {
    let Load {
        clients,
        requests,
        top_k,
    } = load;
    let queries: Vec<String> = read_jsonl(&corpus.join("queries.jsonl"))?
        .iter()
        .filter_map(|q| q["text"].as_str().map(str::to_string))
        .collect();
    anyhow::ensure!(!queries.is_empty(), "no queries in {}", corpus.display());
    println!(
        "{clients} clients over {}, {requests} requests per mode, top_k {top_k}",
        servers
            .iter()
            .map(|s| s.base.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("mode      queries/s  p50 ms  p95 ms");
    for mode in ["dense", "lexical", "hybrid"] {
        // Warm-up: every query once, so caches are the same for each mode.
        for (i, q) in queries.iter().take(20).enumerate() {
            servers[i % servers.len()]
                .post("/search")
                .json(&json!({ "query": q, "mode": mode }))
                .send()
                .await?;
        }
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let started = Instant::now();
        let tasks: Vec<_> = (0..clients.max(1))
            .map(|c| {
                let server = servers[c % servers.len()].clone();
                let (queries, next) = (queries.clone(), next.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= requests {
                            break;
                        }
                        let t = Instant::now();
                        let res = server
                            .post("/search")
                            .json(&json!({ "query": queries[i % queries.len()], "mode": mode, "top_k": top_k }))
                            .send()
                            .await?;
                        anyhow::ensure!(res.status().is_success(), "/search answered {}", res.status());
                        res.bytes().await?;
                        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    Ok::<_, anyhow::Error>(latencies)
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for t in tasks {
            latencies.extend(t.await??);
        }
        let secs = started.elapsed().as_secs_f64();
        latencies.sort_by(f64::total_cmp);
        anyhow::ensure!(!latencies.is_empty(), "no requests made (--requests 0)");
        let pct =
            |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        println!(
            "{mode:<9} {:>9.1} {:>7.1} {:>7.1}",
            latencies.len() as f64 / secs,
            pct(0.5),
            pct(0.95)
        );
    }
    Ok(())
}

async fn bench_ask(
    corpus: &Path,
    model: Option<PathBuf>,
    questions: usize,
    json_out: bool,
) -> Result<()> {
    let data = std::env::temp_dir().join(format!("ragd-bench-{}", std::process::id()));
    let mut config = ragd::Config::defaults();
    config.server.port = 0;
    config.server.data_dir = data.clone();
    if let Some(m) = model {
        config.models.generator = m;
    }
    // The prompt's token ids are rebuilt with the model's own template and
    // tokenizer (a second copy of the model, loaded only for that).
    let tokenizer = if json_out {
        let path = config.models.generator.clone();
        Some(tokio::task::spawn_blocking(move || ragd_generator::Generator::load(&path)).await??)
    } else {
        None
    };
    let mut server = ragd::start(config).await?;
    server.wait_ready().await?;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();

    let documents: Vec<Value> = corpus_texts(corpus)?
        .into_iter()
        .map(|d| json!({ "id": d["_id"], "title": d["title"], "text": d["text"] }))
        .collect();
    let started = Instant::now();
    let res: Value = client
        .post(format!("{base}/ingest"))
        .json(&json!({ "documents": documents }))
        .send()
        .await?
        .json()
        .await?;
    let chunks: u64 = res["documents"]
        .as_array()
        .map(|d| d.iter().filter_map(|x| x["chunks"].as_u64()).sum())
        .unwrap_or(0);
    eprintln!(
        "ingest: {} documents, {} chunks in {:.2} s",
        documents.len(),
        chunks,
        started.elapsed().as_secs_f64()
    );

    for q in read_jsonl(&corpus.join("queries.jsonl"))?
        .iter()
        .take(questions)
    {
        let question = q["text"].as_str().unwrap_or_default();
        let started = Instant::now();
        let mut res = client
            .post(format!("{base}/ask"))
            .header("accept", "text/event-stream")
            .json(&json!({ "question": question }))
            .send()
            .await?;
        let mut first_token = None;
        let mut body = String::new();
        while let Some(bytes) = res.chunk().await? {
            body.push_str(&String::from_utf8_lossy(&bytes));
            if first_token.is_none() && body.contains("event: token") {
                first_token = Some(started.elapsed().as_secs_f64());
            }
        }
        let total = started.elapsed().as_secs_f64();
        let done = body
            .split("\n\n")
            .find(|b| b.contains("event: done"))
            .and_then(|b| b.lines().find_map(|l| l.strip_prefix("data: ")))
            .and_then(|d| serde_json::from_str::<Value>(d).ok())
            .unwrap_or(Value::Null);
        if let Some(g) = &tokenizer {
            if done["usage"]["prompt_tokens"].as_u64() == Some(0) {
                // Declined before the model was asked (no passage close enough).
                eprintln!("ask: {question:?}: answered without the model, left out");
                continue;
            }
            // The prompt's passages are the answer's sources, in order.
            let passages: Vec<ragd_pipeline::prompt::Passage> = done["sources"]
                .as_array()
                .map(|sources| {
                    sources
                        .iter()
                        .map(|s| {
                            ragd_pipeline::prompt::Passage::located(
                                s["title"].as_str(),
                                s["section"].as_str(),
                                s["text"].as_str().unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let ids = g.encode_chat(&ragd_pipeline::prompt::messages(
                question,
                &passages,
                ragd_pipeline::prompt::Style::default(),
                ragd_pipeline::language::detect(question),
                &[],
            ))?;
            anyhow::ensure!(
                done["usage"]["prompt_tokens"].as_u64() == Some(ids.len() as u64),
                "the rebuilt prompt has {} tokens, the answer reports {}",
                ids.len(),
                done["usage"]["prompt_tokens"]
            );
            println!(
                "{}",
                json!({ "question": question, "ttft_s": first_token, "total_s": total,
                        "prompt_tokens": ids.len(), "cached_tokens": done["usage"]["cached_tokens"],
                        "completion_tokens": done["usage"]["completion_tokens"], "prompt_ids": ids })
            );
            continue;
        }
        println!(
            "ask: {question:?}: time to first token {:.2} s, total {:.2} s, prompt {} tokens, {} answer tokens, top source {}",
            first_token.unwrap_or(f64::NAN),
            total,
            done["usage"]["prompt_tokens"],
            done["usage"]["completion_tokens"],
            done["sources"][0]["document_id"]
        );
    }
    server.shutdown().await?;
    let _ = std::fs::remove_dir_all(data);
    Ok(())
}
