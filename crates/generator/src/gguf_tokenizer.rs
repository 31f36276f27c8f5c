//! A `tokenizers::Tokenizer` built from a GGUF file's own metadata.
//!
//! GGUF files carry their tokenizer (`tokenizer.ggml.*`), so a model needs no
//! other file to run. candle cannot build a tokenizer from that metadata, hence
//! this module. Two kinds are supported: byte-level BPE (`tokenizer.ggml.model
//! = "gpt2"`: Qwen, SmolLM, Llama 3 and most modern chat models) and
//! SentencePiece BPE (`"llama"`: Llama 2, Gemma, Mistral's older files).
//!
//! The pre-tokenizer depends on `tokenizer.ggml.pre`; the patterns are llama.cpp's
//! (`llama-vocab.cpp`), since llama.cpp is the reference implementation of GGUF
//! tokenisation and the ids must match it exactly.
//!
//! Control tokens (`token_type` 3, e.g. `<|im_start|>`) become special added tokens;
//! user-defined tokens (type 4) become ordinary added tokens, which, as in
//! llama.cpp, are matched in any text.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::GenerateError;

// llama.cpp's token types (`llama_token_type`).
const TYPE_NORMAL: i32 = 1;
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;
const TYPE_BYTE: i32 = 6;

/// llama.cpp's pattern for `pre = "qwen2"` (also used by Qwen 2.5 and Qwen 3).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's pattern for `pre = "llama-bpe"` (Llama 3).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer of a GGUF model, with what generation needs besides ids.
#[derive(Clone)]
pub struct GgufTokenizer {
    /// Parses special tokens: for the chat template's own markup.
    pub with_special: Tokenizer,
    /// Treats special tokens as plain text: for user-supplied content.
    pub plain: Tokenizer,
    /// The raw bytes each token stands for (control tokens: empty).
    pub token_bytes: Vec<Vec<u8>>,
    /// Token texts as stored in the file.
    pub tokens: Vec<String>,
    /// Ids of control tokens.
    pub control: Vec<bool>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.eot_token_id`.
    pub eot_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (llama.cpp's default when absent: true
    /// for SentencePiece, false for byte-level BPE): a prompt starts with BOS.
    pub add_bos: bool,
}

fn md<'a>(ct: &'a Content, key: &str) -> Result<&'a Value, GenerateError> {
    ct.metadata
        .get(key)
        .ok_or_else(|| GenerateError::Unsupported(format!("GGUF metadata has no {key}")))
}

fn opt_u32(ct: &Content, key: &str) -> Option<u32> {
    ct.metadata.get(key).and_then(|v| {
        v.to_u32()
            .ok()
            .or_else(|| v.to_i32().ok().map(|x| x as u32))
    })
}

fn bad(key: &str, e: impl std::fmt::Display) -> GenerateError {
    GenerateError::Unsupported(format!("GGUF metadata {key}: {e}"))
}

/// GPT-2's reversible byte ↔ printable-character map: byte-level BPE vocabularies
/// store each byte as one of these characters.
pub fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable =
            (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        map[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\u{FFFD}')
        };
    }
    map
}

fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper, GenerateError> {
    let split = |pattern: &str| -> Result<PreTokenizerWrapper, GenerateError> {
        let split = Split::new(
            SplitPattern::Regex(pattern.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| bad("tokenizer.ggml.pre", e))?;
        Ok(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])
        .into())
    };
    match pre {
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2_PATTERN),
        "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => split(LLAMA3_PATTERN),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            Ok(Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, false, true).into(),
            ])
            .into())
        }
        "gpt2" | "default" | "gpt-2" => Ok(ByteLevel::new(false, false, true).into()),
        other => {
            tracing::warn!(
                pre = other,
                "unknown tokenizer.ggml.pre, using the GPT-2 pattern"
            );
            Ok(ByteLevel::new(false, false, true).into())
        }
    }
}

/// The vocabulary part of the metadata every tokenizer model has.
struct Vocabulary {
    tokens: Vec<String>,
    types: Vec<i32>,
}

fn vocabulary(ct: &Content) -> Result<Vocabulary, GenerateError> {
    let tokens: Vec<String> = md(ct, "tokenizer.ggml.tokens")?
        .to_vec()
        .map_err(|e| bad("tokenizer.ggml.tokens", e))?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<Result<_, _>>()
        .map_err(|e| bad("tokenizer.ggml.tokens", e))?;
    let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| bad("tokenizer.ggml.token_type", e))?
            .iter()
            .map(|v| v.to_i32())
            .collect::<Result<_, _>>()
            .map_err(|e| bad("tokenizer.ggml.token_type", e))?,
        None => vec![TYPE_NORMAL; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(bad(
            "tokenizer.ggml.token_type",
            "length differs from tokenizer.ggml.tokens",
        ));
    }
    Ok(Vocabulary { tokens, types })
}

fn bpe_vocab(tokens: &[String]) -> tokenizers::models::bpe::Vocab {
    let mut vocab = tokenizers::models::bpe::Vocab::default();
    for (id, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(id as u32);
    }
    vocab
}

/// Byte-level BPE (`"gpt2"`): merges from the file, the pre-tokenizer named by
/// `tokenizer.ggml.pre`, each byte a printable character.
fn byte_level_bpe(
    ct: &Content,
    v: &Vocabulary,
) -> Result<(Tokenizer, Vec<Vec<u8>>), GenerateError> {
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_else(|| "default".to_string());
    let merges: Vec<(String, String)> = md(ct, "tokenizer.ggml.merges")?
        .to_vec()
        .map_err(|e| bad("tokenizer.ggml.merges", e))?
        .iter()
        .map(|v| {
            let s = v.to_string().map_err(|e| bad("tokenizer.ggml.merges", e))?;
            let (a, b) = s
                .split_once(' ')
                .ok_or_else(|| bad("tokenizer.ggml.merges", format!("{s:?}")))?;
            Ok((a.to_string(), b.to_string()))
        })
        .collect::<Result<_, GenerateError>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(bpe_vocab(&v.tokens), merges)
        // llama.cpp's `ignore_merges` (Llama 3): a piece that is a whole
        // token is that token, whatever the merges would make of it.
        .ignore_merges(ignores_merges(&pre))
        .build()
        .map_err(|e| bad("tokenizer.ggml.merges", e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(&pre)?));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let char_to_byte: HashMap<char, u8> = byte_to_char()
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect();
    let token_bytes = v
        .tokens
        .iter()
        .zip(&v.types)
        .map(|(t, &ty)| match ty {
            TYPE_CONTROL => Vec::new(),
            TYPE_USER_DEFINED => t.as_bytes().to_vec(),
            // A character outside the byte map only occurs in malformed vocabularies:
            // keep its UTF-8 rather than failing the whole model.
            _ => t
                .chars()
                .flat_map(|c| match char_to_byte.get(&c) {
                    Some(&b) => vec![b],
                    None => c.to_string().into_bytes(),
                })
                .collect(),
        })
        .collect();
    Ok((tokenizer, token_bytes))
}

/// llama.cpp sets `ignore_merges` for these pre-tokenizers (`llama-vocab.cpp`).
fn ignores_merges(pre: &str) -> bool {
    matches!(pre, "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe")
}

/// SentencePiece's BPE (`"llama"`: Llama 2, Gemma, Mistral's older files): spaces
/// are `▁`, pieces merge by score, characters outside the vocabulary become
/// `<0xNN>` byte tokens.
///
/// llama.cpp merges, over the whole text, the adjacent pair whose concatenation
/// is the highest-scoring token (leftmost first), until none is left. That is
/// BPE with a merge for every split of every token into two tokens, ranked by
/// the score of the token it makes — which is how Hugging Face converts these
/// vocabularies too — so `tokenizers`' BPE runs it; the merges are derived here
/// because GGUF stores only the scores. No pre-tokenizer: SentencePiece sees
/// the text whole. `add_space_prefix` puts a `▁` before the text and after each
/// special token, as llama.cpp does.
fn sentencepiece_bpe(
    ct: &Content,
    v: &Vocabulary,
) -> Result<(Tokenizer, Vec<Vec<u8>>), GenerateError> {
    let scores: Vec<f32> = md(ct, "tokenizer.ggml.scores")?
        .to_vec()
        .map_err(|e| bad("tokenizer.ggml.scores", e))?
        .iter()
        .map(|v| v.to_f32())
        .collect::<Result<_, _>>()
        .map_err(|e| bad("tokenizer.ggml.scores", e))?;
    if scores.len() != v.tokens.len() {
        return Err(bad(
            "tokenizer.ggml.scores",
            "length differs from tokenizer.ggml.tokens",
        ));
    }
    let vocab = bpe_vocab(&v.tokens);
    let mut ranked: Vec<(f32, u32, usize)> = Vec::new();
    for (id, t) in v.tokens.iter().enumerate() {
        if vocab.get(t) != Some(&(id as u32)) {
            continue; // a duplicate text: llama.cpp finds the first
        }
        for (at, _) in t.char_indices().skip(1) {
            if vocab.contains_key(&t[..at]) && vocab.contains_key(&t[at..]) {
                ranked.push((scores[id], id as u32, at));
            }
        }
    }
    // Highest score first; equal scores in token order, then split position.
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges = ranked
        .iter()
        .map(|&(_, id, at)| {
            let t = &v.tokens[id as usize];
            (t[..at].to_string(), t[at..].to_string())
        })
        .collect();
    let byte_tokens = v.types.iter().filter(|&&t| t == TYPE_BYTE).count();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(byte_tokens == 256);
    if let Some(unk) =
        opt_u32(ct, "tokenizer.ggml.unknown_token_id").and_then(|id| v.tokens.get(id as usize))
    {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder
        .build()
        .map_err(|e| bad("tokenizer.ggml.scores", e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let add_space_prefix = ct
        .metadata
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let replace = Replace::new(" ", "\u{2581}").map_err(|e| bad("tokenizer.ggml.model", e))?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        NormalizerSequence::new(vec![Prepend::new("\u{2581}".into()).into(), replace.into()]).into()
    } else {
        replace.into()
    };
    tokenizer.with_normalizer(Some(normalizer));

    let token_bytes = v
        .tokens
        .iter()
        .zip(&v.types)
        .map(|(t, &ty)| match ty {
            TYPE_USER_DEFINED => t.as_bytes().to_vec(),
            TYPE_BYTE => t
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .map(|b| vec![b])
                .unwrap_or_default(),
            TYPE_NORMAL => t.replace('\u{2581}', " ").into_bytes(),
            // control, unknown and unused tokens print nothing (llama.cpp's
            // token_to_piece without special rendering).
            _ => Vec::new(),
        })
        .collect();
    Ok((tokenizer, token_bytes))
}

impl GgufTokenizer {
    /// Builds the tokenizer from the metadata of a parsed GGUF file.
    pub fn from_gguf(ct: &Content) -> Result<Self, GenerateError> {
        let model = md(ct, "tokenizer.ggml.model")?
            .to_string()
            .map_err(|e| bad("tokenizer.ggml.model", e))?;
        let v = vocabulary(ct)?;
        let (mut tokenizer, token_bytes) = match model.as_str() {
            "gpt2" => byte_level_bpe(ct, &v)?,
            "llama" => sentencepiece_bpe(ct, &v)?,
            other => {
                return Err(GenerateError::Unsupported(format!(
                    "tokenizer.ggml.model = {other:?}; supported: \"gpt2\" (byte-level BPE) and \"llama\" (SentencePiece BPE)"
                )))
            }
        };
        // Both kinds are matched in the raw text, before any normalizer, as
        // llama.cpp does (`tokenizer_st_partition`).
        let added = |ty: i32, special: bool| -> Vec<AddedToken> {
            v.tokens
                .iter()
                .zip(&v.types)
                .filter(|(_, &t)| t == ty)
                .map(|(s, _)| AddedToken::from(s.clone(), special).normalized(false))
                .collect()
        };
        tokenizer.add_special_tokens(&added(TYPE_CONTROL, true));
        tokenizer.add_tokens(&added(TYPE_USER_DEFINED, false));
        let with_special = tokenizer.clone();
        let mut plain = tokenizer;
        plain.set_encode_special_tokens(true);

        let control = v.types.iter().map(|&t| t == TYPE_CONTROL).collect();
        Ok(Self {
            with_special,
            plain,
            token_bytes,
            tokens: v.tokens,
            control,
            bos_id: opt_u32(ct, "tokenizer.ggml.bos_token_id"),
            eos_id: opt_u32(ct, "tokenizer.ggml.eos_token_id"),
            eot_id: opt_u32(ct, "tokenizer.ggml.eot_token_id"),
            add_bos: ct
                .metadata
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(model == "llama"),
        })
    }

    /// Token ids of `text`, special-token markup treated as plain text.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, GenerateError> {
        Ok(self
            .plain
            .encode(text, false)
            .map_err(|e| GenerateError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Token ids of `text`, special-token markup parsed as special tokens.
    pub fn encode_special(&self, text: &str) -> Result<Vec<u32>, GenerateError> {
        Ok(self
            .with_special
            .encode(text, false)
            .map_err(|e| GenerateError::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids`, control tokens left out; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| {
                self.token_bytes
                    .get(id as usize)
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Id of a token by its text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.tokens.iter().position(|t| t == text).map(|i| i as u32)
    }
}
