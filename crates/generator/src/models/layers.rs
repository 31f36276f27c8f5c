//! The transformer that the llama and qwen2 copies share: RMS-normed
//! pre-norm blocks of rotary self-attention and a SiLU-gated feed-forward,
//! token embeddings in, the last position's logits out.
//!
//! Both candle-transformers 0.11 files (`quantized_llama`, `quantized_qwen2`)
//! spell this out separately, line for line the same apart from qwen2's q/k/v
//! biases, llama's optional mixture of experts, and how many positions the
//! rotary tables cover. Here it is once; [`super::llama`] and [`super::qwen2`]
//! keep only what differs (metadata keys, the feed-forward, rope convention and
//! table length, biases). The operations, their order and their dtypes are
//! those of the candle code, so outputs are bit-for-bit what the two copies
//! produced before they were merged.
//!
//! This is a module of its own rather than part of [`super::attention`]:
//! that one holds the two pieces that *replace* candle's code (the in-place KV
//! cache and grouped-query attention) and their tests; this one holds the
//! structure copied from candle around them, including the GGUF tensor names.
//! A new architecture (gemma3) can take the pieces it shares ([`Gguf`],
//! [`Hparams`], [`Rope`], [`Attention`], [`Mlp`]) and write its own block and
//! model loop where its layout differs (extra norms, per-layer rope bases,
//! sliding-window masks; [`Model`]'s mask cache is causal-only).

use std::collections::HashMap;
use std::io::{Read, Seek};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, IndexOp, Result, Tensor};
use candle_nn::Module;
use candle_transformers::quantized_nn::RmsNorm;

use super::attention::{grouped_attention, KvCache};
use crate::prepared::Preparation;
use crate::q8_0::{Linear, TokenEmbedding};
use ragd_kernels::prepared::SharedBytes;
use ragd_kernels::rows::FileTable;

/// A model file's bytes, memory-mapped (`shared`: the map itself, which
/// K-quant weights keep), the file, and its prepared weights (read from them
/// where valid, else recorded to write them).
#[derive(Clone, Copy)]
pub(crate) struct Mapped<'a> {
    pub(crate) bytes: &'a [u8],
    pub(crate) shared: &'a std::sync::Arc<memmap2::Mmap>,
    pub(crate) file: &'a std::fs::File,
    pub(crate) prepared: &'a Preparation,
}

/// A GGUF file being read into a model: its header, the file, the device,
/// and the file's bytes where it is memory-mapped.
pub(crate) struct Gguf<'a, R> {
    ct: gguf_file::Content,
    reader: &'a mut R,
    device: &'a Device,
    map: Option<Mapped<'a>>,
}

impl<'a, R: Read + Seek> Gguf<'a, R> {
    pub(crate) fn new(
        ct: gguf_file::Content,
        reader: &'a mut R,
        device: &'a Device,
        map: Option<Mapped<'a>>,
    ) -> Self {
        Self {
            ct,
            reader,
            device,
            map,
        }
    }

    /// A tensor's header entry and its bytes in the mapped file (`None`: not
    /// mapped, unknown, or not inside the file).
    fn mapped(&self, name: &str) -> Option<(&gguf_file::TensorInfo, &'a [u8])> {
        let map = self.map?.bytes;
        let info = self.ct.tensor_infos.get(name)?;
        let dtype = info.ggml_dtype;
        let elems = info.shape.elem_count();
        if !elems.is_multiple_of(dtype.block_size()) {
            return None;
        }
        let bytes = elems / dtype.block_size() * dtype.type_size();
        let start = usize::try_from(self.ct.tensor_data_offset.checked_add(info.offset)?).ok()?;
        map.get(start..start.checked_add(bytes)?)
            .map(|data| (info, data))
    }

    /// A K-quant tensor `name` read in place from the mapped file, as a
    /// linear layer or (`table`) a token table; `None`: not mapped, not a
    /// 2-D K-quant tensor, or the kernels do not run here.
    fn mapped_kquant<T>(
        &self,
        name: &str,
        make: impl FnOnce(GgmlDType, usize, usize, SharedBytes, usize) -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        let (Some(map), Some((dtype, n, k, data))) = (self.map, self.raw(name)) else {
            return Ok(None);
        };
        if !matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K) {
            return Ok(None);
        }
        let offset = data.as_ptr() as usize - map.bytes.as_ptr() as usize;
        let shared: SharedBytes = std::sync::Arc::clone(map.shared) as SharedBytes;
        make(dtype, n, k, shared, offset)
    }

    /// A tensor's type, shape `(rows, cols)` and bytes in the mapped file,
    /// for a 2-D tensor inside it (`None`: read it the usual way).
    fn raw(&self, name: &str) -> Option<(GgmlDType, usize, usize, &'a [u8])> {
        let (info, data) = self.mapped(name)?;
        let (n, k) = info.shape.dims2().ok()?;
        Some((info.ggml_dtype, n, k, data))
    }

    pub(crate) fn device(&self) -> &'a Device {
        self.device
    }

    /// A metadata value, an error if missing.
    pub(crate) fn metadata(&self, key: &str) -> Result<&gguf_file::Value> {
        match self.ct.metadata.get(key) {
            None => candle_core::bail!("cannot find {key} in metadata"),
            Some(v) => Ok(v),
        }
    }

    /// A tensor as candle's `QTensor`: from the mapped file's bytes where it
    /// is mapped (one copy), else read from the file. Reading through the
    /// file copied every byte twice, into a fresh buffer and from there into
    /// the tensor, and the kernel zeroed both: Qwen2.5-Coder-1.5B (K-quants,
    /// 1.1 GB) loaded in 0.49-2.80 s, now 0.40-0.44 s (`ragd bench generate`,
    /// the two builds alternating).
    pub(crate) fn tensor(&mut self, name: &str) -> Result<QTensor> {
        if let Some((info, data)) = self.mapped(name) {
            return candle_core::quantized::ggml_file::qtensor_from_ggml(
                info.ggml_dtype,
                data,
                info.shape.dims().to_vec(),
                self.device,
            );
        }
        self.ct.tensor(self.reader, name, self.device)
    }

    /// A linear layer. Q8_0 and Q5_0 weights are read in place from the
    /// prepared file where there is one, else re-laid out straight from the
    /// mapped model file (reading them into a `QTensor` first allocated and
    /// copied the whole model once more, a quarter of the load time in page
    /// faults alone) and recorded for the prepared file.
    pub(crate) fn linear(&mut self, name: &str) -> Result<Linear> {
        if let (Some(map), Some((dtype, n, k, data))) = (self.map, self.raw(name)) {
            let prepared = map.prepared.laid(name, dtype, n, k);
            if let Some(linear) = prepared.and_then(Linear::from_laid) {
                return Ok(linear);
            }
            if let Some(linear) = Linear::from_raw(dtype, n, k, data)? {
                if let Some(laid) = linear.laid() {
                    map.prepared.record(name, n, k, laid);
                }
                return Ok(linear);
            }
        }
        if let Some(linear) = self.mapped_kquant(name, Linear::from_mapped_kquant)? {
            return Ok(linear);
        }
        Linear::from_qtensor(self.tensor(name)?)
    }

    pub(crate) fn rms_norm(&mut self, name: &str, eps: f64) -> Result<RmsNorm> {
        RmsNorm::from_qtensor(self.tensor(name)?, eps)
    }

    /// `token_embd.weight`, `output_norm.weight` and the output head:
    /// `output.weight`, or with tied embeddings the embedding table again
    /// (the same weights, shared when they stay quantized).
    pub(crate) fn embeddings_and_head(
        &mut self,
        eps: f64,
    ) -> Result<(TokenEmbedding, RmsNorm, Linear)> {
        // With an output head of its own the table is only looked up: its
        // rows are read from the file as tokens need them.
        let raw = match (self.map, self.raw("token_embd.weight")) {
            (Some(map), Some((dtype, n, k, data)))
                if self.ct.tensor_infos.contains_key("output.weight") =>
            {
                let offset = data.as_ptr() as usize - map.bytes.as_ptr() as usize;
                let table = FileTable::new(map.file.try_clone()?, offset as u64, dtype, n, k)?;
                Some(TokenEmbedding::File(std::sync::Arc::new(table)))
            }
            (Some(map), Some((dtype, n, k, data))) => {
                match map.prepared.laid("token_embd.weight", dtype, n, k) {
                    Some(laid) => Some(TokenEmbedding::from_laid(laid)),
                    None => {
                        let table = TokenEmbedding::from_raw(dtype, n, k, data)?;
                        if let Some(laid) = table.as_ref().and_then(TokenEmbedding::laid) {
                            map.prepared.record("token_embd.weight", n, k, laid);
                        }
                        table
                    }
                }
            }
            _ => None,
        };
        let raw = match raw {
            Some(table) => Some(table),
            None => self.mapped_kquant("token_embd.weight", TokenEmbedding::from_mapped_kquant)?,
        };
        let tok_embeddings = match raw {
            Some(table) => table,
            None => TokenEmbedding::from_qtensor(self.tensor("token_embd.weight")?)?,
        };
        let norm = self.rms_norm("output_norm.weight", eps)?;
        let output = match self.linear("output.weight") {
            Ok(output) => output,
            Err(_) => match tok_embeddings.as_linear() {
                Some(output) => output,
                None => self.linear("token_embd.weight")?,
            },
        };
        Ok((tok_embeddings, norm, output))
    }
}

/// The hyperparameters both architectures read, under `{arch}.…`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hparams {
    pub(crate) head_count: usize,
    pub(crate) head_count_kv: usize,
    pub(crate) embedding_length: usize,
    pub(crate) block_count: usize,
    pub(crate) rms_norm_eps: f64,
    /// `{arch}.rope.freq_base`, 10000 when absent.
    pub(crate) rope_freq_base: f32,
    /// `{arch}.attention.key_length` where the file says (gemma3: 256 with a
    /// 640-wide model of 4 heads); else `embedding_length / head_count`.
    pub(crate) key_length: Option<usize>,
}

impl Hparams {
    pub(crate) fn read<R: Read + Seek>(gg: &Gguf<'_, R>, arch: &str) -> Result<Self> {
        let u = |key: &str| -> Result<usize> {
            Ok(gg.metadata(&format!("{arch}.{key}"))?.to_u32()? as usize)
        };
        Ok(Self {
            head_count: u("attention.head_count")?,
            head_count_kv: u("attention.head_count_kv")?,
            embedding_length: u("embedding_length")?,
            block_count: u("block_count")?,
            rms_norm_eps: gg
                .metadata(&format!("{arch}.attention.layer_norm_rms_epsilon"))?
                .to_f32()? as f64,
            rope_freq_base: gg
                .metadata(&format!("{arch}.rope.freq_base"))
                .and_then(|m| m.to_f32())
                .unwrap_or(10000f32),
            key_length: gg
                .metadata(&format!("{arch}.attention.key_length"))
                .and_then(|m| m.to_u32())
                .ok()
                .map(|k| k as usize),
        })
    }

    pub(crate) fn head_dim(&self) -> usize {
        self.key_length
            .unwrap_or(self.embedding_length / self.head_count)
    }
}

/// Rotary embedding tables for positions `0..positions` and their application.
#[derive(Debug, Clone)]
pub(crate) struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// RoPE convention: true = NEOX (non-interleaved, pairs i with i+d/2),
    /// false = NORM (interleaved, pairs 2i with 2i+1).
    /// Must match the model architecture — using the wrong convention corrupts
    /// attention patterns and causes severe output degradation.
    neox: bool,
}

impl Rope {
    /// candle's `precomput_freqs_cis`, with the number of positions a parameter
    /// (llama: `MAX_SEQ_LEN`, qwen2: the file's context length).
    pub(crate) fn new(
        dim: usize,
        freq_base: f32,
        positions: usize,
        neox: bool,
        device: &Device,
    ) -> Result<Self> {
        Self::scaled(dim, freq_base, 1.0, positions, neox, device)
    }

    /// With linear position scaling (`rope.scaling.type = linear`): position
    /// `p` turns as `p · freq_scale` would (llama.cpp's `freq_scale`).
    pub(crate) fn scaled(
        dim: usize,
        freq_base: f32,
        freq_scale: f32,
        positions: usize,
        neox: bool,
        device: &Device,
    ) -> Result<Self> {
        let theta: Vec<_> = (0..dim)
            .step_by(2)
            .map(|i| freq_scale / freq_base.powf(i as f32 / dim as f32))
            .collect();
        let theta = Tensor::new(theta.as_slice(), device)?;
        let idx_theta = Tensor::arange(0, positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?
            .matmul(&theta.reshape((1, theta.elem_count()))?)?;
        let cos = idx_theta.cos()?;
        let sin = idx_theta.sin()?;
        Ok(Self { cos, sin, neox })
    }

    /// Rotates `x` `(b, heads, seq, head_dim)` for positions `index_pos..`.
    fn apply(&self, x: &Tensor, index_pos: usize) -> Result<Tensor> {
        let (_b_sz, _n_head, seq_len, _n_embd) = x.dims4()?;
        let cos = self.cos.narrow(0, index_pos, seq_len)?;
        let sin = self.sin.narrow(0, index_pos, seq_len)?;
        let x = x.contiguous()?;
        if self.neox {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)
        }
    }
}

/// How a forward pass's query rows see the keys (causally either way).
#[derive(Clone, Copy)]
pub(crate) enum Causal<'a> {
    /// All rows at once, under this mask (none for a single row).
    Masked(Option<&'a Tensor>),
    /// Each row as it would attend in a one-token step at its position: the
    /// cache narrowed to the keys it may see, no mask — the same operations
    /// on the same shapes, so the same bits as decoding the tokens one by
    /// one. [`Model::forward_rows`] checks drafted tokens so.
    PerRow,
}

/// Self-attention: q/k/v projections (with biases for qwen2), rotary
/// embeddings, the layer's KV cache, grouped attention, output projection.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    /// q, k, v biases (qwen2).
    biases: Option<[Tensor; 3]>,
    /// RMS norms of each query and key head before rotation (gemma3).
    qk_norms: Option<[RmsNorm; 2]>,
    /// Sliding window: a query sees only the keys less than this many
    /// positions before it (gemma3's local layers), masked as llama.cpp's
    /// `LLAMA_SWA_TYPE_STANDARD`.
    window: Option<usize>,
    /// The attention scale where it is not `1/√head_dim` (gemma3 27B).
    scale: Option<f64>,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    rope: Rope,
    neg_inf: Tensor,
    kv_cache: KvCache,
    span_attn: tracing::Span,
    span_rot: tracing::Span,
}

impl Attention {
    pub(crate) fn new(
        [wq, wk, wv, wo]: [Linear; 4],
        n_head: usize,
        n_kv_head: usize,
        head_dim: usize,
        rope: Rope,
    ) -> Result<Self> {
        let neg_inf = Tensor::new(f32::NEG_INFINITY, rope.cos.device())?;
        Ok(Self {
            wq,
            wk,
            wv,
            wo,
            biases: None,
            qk_norms: None,
            window: None,
            scale: None,
            n_head,
            n_kv_head,
            head_dim,
            rope,
            neg_inf,
            kv_cache: KvCache::new(),
            span_attn: tracing::span!(tracing::Level::TRACE, "attn"),
            span_rot: tracing::span!(tracing::Level::TRACE, "attn-rot"),
        })
    }

    /// `{prefix}.attn_{q,k,v,output}.weight`, and with `qkv_bias`
    /// `{prefix}.attn_{q,k,v}.bias`.
    pub(crate) fn from_gguf<R: Read + Seek>(
        gg: &mut Gguf<'_, R>,
        prefix: &str,
        hp: &Hparams,
        rope: &Rope,
        qkv_bias: bool,
    ) -> Result<Self> {
        let mut weight = |name: &str| gg.linear(&format!("{prefix}.{name}.weight"));
        let projections = [
            weight("attn_q")?,
            weight("attn_k")?,
            weight("attn_v")?,
            weight("attn_output")?,
        ];
        let mut attention = Self::new(
            projections,
            hp.head_count,
            hp.head_count_kv,
            hp.head_dim(),
            rope.clone(),
        )?;
        if qkv_bias {
            let device = gg.device();
            let mut bias = |name: &str| {
                gg.tensor(&format!("{prefix}.{name}.bias"))?
                    .dequantize(device)
            };
            attention.biases = Some([bias("attn_q")?, bias("attn_k")?, bias("attn_v")?]);
        }
        Ok(attention)
    }

    /// Gemma3's extras: per-head q/k norms, a sliding window, its own scale.
    pub(crate) fn with_gemma(
        mut self,
        qk_norms: [RmsNorm; 2],
        window: Option<usize>,
        scale: Option<f64>,
    ) -> Self {
        self.qk_norms = Some(qk_norms);
        self.window = window;
        self.scale = scale;
        self
    }

    /// The first key a query at `pos` sees.
    fn first_key(&self, pos: usize) -> usize {
        match self.window {
            Some(w) => (pos + 1).saturating_sub(w),
            None => 0,
        }
    }

    fn rotate(&self, x: &Tensor, index_pos: usize) -> Result<Tensor> {
        let _enter = self.span_rot.enter();
        self.rope.apply(x, index_pos)
    }

    fn forward(&mut self, x: &Tensor, causal: Causal<'_>, index_pos: usize) -> Result<Tensor> {
        let _enter = self.span_attn.enter();
        let (b_sz, seq_len, _) = x.dims3()?;
        let q = self.wq.forward(x)?;
        let k = self.wk.forward(x)?;
        let v = self.wv.forward(x)?;
        let (q, k, v) = match &self.biases {
            None => (q, k, v),
            Some([bq, bk, bv]) => (
                q.broadcast_add(bq)?,
                k.broadcast_add(bk)?,
                v.broadcast_add(bv)?,
            ),
        };

        let q = q.reshape((b_sz, seq_len, self.n_head, self.head_dim))?;
        let k = k.reshape((b_sz, seq_len, self.n_kv_head, self.head_dim))?;
        let (q, k) = match &self.qk_norms {
            None => (q, k),
            Some([q_norm, k_norm]) => (q_norm.forward(&q)?, k_norm.forward(&k)?),
        };
        let q = q.transpose(1, 2)?;
        let k = k.transpose(1, 2)?;
        let v = v
            .reshape((b_sz, seq_len, self.n_kv_head, self.head_dim))?
            .transpose(1, 2)?
            // This call to contiguous ensures that the fast kernel can be called below. It's
            // actually a no-op except when processing the initial prompt so has no significant
            // impact on performance.
            .contiguous()?;

        // `rotate` makes q and k contiguous (qwen2's copy did so one step
        // earlier; the values are the same).
        let q = self.rotate(&q, index_pos)?;
        let k = self.rotate(&k, index_pos)?;
        let q = match self.scale {
            // grouped_attention divides by √head_dim; this makes it `scale`.
            Some(scale) => (q * (scale * (self.head_dim as f64).sqrt()))?,
            None => q,
        };

        let (k, v) = self.kv_cache.append(index_pos, &k, &v)?;
        let kv_len = index_pos + seq_len;
        let y = if let (Causal::PerRow, 2..) = (causal, seq_len) {
            let mut ys = Vec::with_capacity(seq_len);
            for i in 0..seq_len {
                let seen = index_pos + i + 1;
                let from = self.first_key(seen - 1);
                ys.push(grouped_attention(
                    &q.narrow(2, i, 1)?,
                    &k.narrow(2, from, seen - from)?,
                    &v.narrow(2, from, seen - from)?,
                    None,
                    &self.neg_inf,
                )?);
            }
            Tensor::cat(&ys, 2)?
        } else if let Some(w) = self.window.filter(|&w| kv_len > w) {
            // Some query here is a window or more past a key: keys from the
            // first one the first query sees, the rest masked per row (one
            // row needs no mask: it sees exactly those, which is also how
            // `PerRow` narrows, so decoding and checking drafts agree).
            let from = self.first_key(index_pos);
            let mask = (seq_len > 1)
                .then(|| window_mask(seq_len, index_pos, from, w, q.device()))
                .transpose()?;
            grouped_attention(
                &q,
                &k.narrow(2, from, kv_len - from)?,
                &v.narrow(2, from, kv_len - from)?,
                mask.as_ref(),
                &self.neg_inf,
            )?
        } else {
            let mask = match causal {
                Causal::Masked(mask) => mask,
                Causal::PerRow => None,
            };
            grouped_attention(&q, &k, &v, mask, &self.neg_inf)?
        };

        let y = y
            .transpose(1, 2)?
            .reshape((b_sz, seq_len, self.n_head * self.head_dim))?;
        self.wo.forward(&y)
    }
}

/// The mask for queries at `index_pos..index_pos + seq_len` over keys at
/// `from..index_pos + seq_len` with a sliding window of `w`: 1 where the key
/// is after the query or `w` or more positions before it.
fn window_mask(
    seq_len: usize,
    index_pos: usize,
    from: usize,
    w: usize,
    device: &Device,
) -> Result<Tensor> {
    let keys = index_pos + seq_len - from;
    let mask: Vec<u8> = (0..seq_len)
        .flat_map(|i| {
            let q = index_pos + i;
            (0..keys).map(move |j| {
                let k = from + j;
                u8::from(k > q || q - k >= w)
            })
        })
        .collect();
    Tensor::from_slice(&mask, (seq_len, keys), device)
}

/// The feed-forward: `down(act(gate(x)) · up(x))`, `act` SiLU (llama, qwen2)
/// or GELU with the tanh approximation (gemma3; ggml's `gelu`).
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    gate: Linear,
    down: Linear,
    up: Linear,
    gelu: bool,
}

impl Mlp {
    /// `{prefix}.ffn_{gate,down,up}{suffix}.weight` (`suffix` `.{i}` for
    /// expert `i` of a mixture, else empty).
    pub(crate) fn from_gguf<R: Read + Seek>(
        gg: &mut Gguf<'_, R>,
        prefix: &str,
        suffix: &str,
    ) -> Result<Self> {
        let mut weight = |name: &str| gg.linear(&format!("{prefix}.{name}{suffix}.weight"));
        Ok(Self {
            gate: weight("ffn_gate")?,
            down: weight("ffn_down")?,
            up: weight("ffn_up")?,
            gelu: false,
        })
    }

    pub(crate) fn new(gate: Linear, down: Linear, up: Linear) -> Self {
        Self {
            gate,
            down,
            up,
            gelu: false,
        }
    }

    /// The same with GELU (tanh approximation) in place of SiLU.
    pub(crate) fn with_gelu(mut self) -> Self {
        self.gelu = true;
        self
    }
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let w1 = self.gate.forward(xs)?;
        let w3 = self.up.forward(xs)?;
        let x = if self.gelu {
            (w1.gelu()? * w3)?
        } else if w1.dtype() == candle_core::DType::F32 {
            ragd_kernels::dense::silu_mul(&w1, &w3)?
        } else {
            (candle_nn::ops::silu(&w1)? * w3)?
        };
        self.down.forward(&x)
    }
}

/// A pre-norm transformer block, generic over its feed-forward (qwen2:
/// [`Mlp`]; llama: an [`Mlp`] or a mixture of experts).
#[derive(Debug, Clone)]
pub(crate) struct Block<F> {
    attention_norm: RmsNorm,
    attention: Attention,
    ffn_norm: RmsNorm,
    ffn: F,
    /// Norms of the attention's and the feed-forward's outputs before each
    /// is added to the residual (gemma3's `post_attention_norm`, `post_ffw_norm`).
    post_norms: Option<[RmsNorm; 2]>,
    span_mlp: tracing::Span,
}

impl<F: Module> Block<F> {
    pub(crate) fn new(
        attention_norm: RmsNorm,
        attention: Attention,
        ffn_norm: RmsNorm,
        ffn: F,
    ) -> Self {
        Self {
            attention_norm,
            attention,
            ffn_norm,
            ffn,
            post_norms: None,
            span_mlp: tracing::span!(tracing::Level::TRACE, "attn-mlp"),
        }
    }

    pub(crate) fn with_post_norms(mut self, post_norms: [RmsNorm; 2]) -> Self {
        self.post_norms = Some(post_norms);
        self
    }

    fn forward(&mut self, x: &Tensor, causal: Causal<'_>, index_pos: usize) -> Result<Tensor> {
        let residual = x;
        let x = self.attention_norm.forward(x)?;
        let mut attn = self.attention.forward(&x, causal, index_pos)?;
        if let Some([post, _]) = &self.post_norms {
            attn = post.forward(&attn)?;
        }
        let x = (attn + residual)?;

        // MLP
        let _enter = self.span_mlp.enter();
        let residual = &x;
        let x = self.ffn_norm.forward(&x)?;
        let mut x = self.ffn.forward(&x)?;
        if let Some([_, post]) = &self.post_norms {
            x = post.forward(&x)?;
        }
        x + residual
    }
}

/// Causal masks keyed by (seq_len, kv_len), kv_len = index_pos + seq_len
/// (rectangular when a prefix is in the KV cache), at most [`MASKS`] of them.
/// Every prompt length makes another shape: kept without a bound, a server
/// held one mask per question it had answered (about 0.2 MB for a 400-token
/// prompt), and each generation's copy of the model copied the map.
#[derive(Debug, Clone, Default)]
struct MaskCache(HashMap<(usize, usize), Tensor>);

/// Most masks a [`MaskCache`] holds; building one is a few microseconds
/// against the prefill it serves.
const MASKS: usize = 8;

impl MaskCache {
    fn get(&mut self, seq_len: usize, index_pos: usize, device: &Device) -> Result<Tensor> {
        let key = (seq_len, index_pos + seq_len);
        if let Some(mask) = self.0.get(&key) {
            return Ok(mask.clone());
        }
        let mask = candle_transformers::utils::build_causal_mask(seq_len, index_pos, device)?;
        if self.0.len() >= MASKS {
            self.0.clear();
        }
        self.0.insert(key, mask.clone());
        Ok(mask)
    }
}

/// Embeddings, blocks, final norm and output head, with the causal masks
/// of recent prompt shapes.
#[derive(Debug, Clone)]
pub(crate) struct Model<F> {
    tok_embeddings: TokenEmbedding,
    layers: Vec<Block<F>>,
    norm: RmsNorm,
    output: Linear,
    /// Causal masks of recent prompt shapes.
    masks: MaskCache,
    /// Token embeddings are multiplied by this (gemma3: √embedding_length).
    embed_scale: Option<f64>,
    /// Final logit soft-capping: `c · tanh(logits / c)` (gemma2-style files).
    softcap: Option<f64>,
    span: tracing::Span,
    span_output: tracing::Span,
}

impl<F: Module> Model<F> {
    pub(crate) fn new(
        tok_embeddings: TokenEmbedding,
        layers: Vec<Block<F>>,
        norm: RmsNorm,
        output: Linear,
    ) -> Self {
        Self {
            tok_embeddings,
            layers,
            norm,
            output,
            masks: MaskCache::default(),
            embed_scale: None,
            softcap: None,
            span: tracing::span!(tracing::Level::TRACE, "model"),
            span_output: tracing::span!(tracing::Level::TRACE, "output"),
        }
    }

    pub(crate) fn with_embed_scale(mut self, scale: f64, softcap: Option<f64>) -> Self {
        self.embed_scale = Some(scale);
        self.softcap = softcap;
        self
    }

    fn head(&self, x: &Tensor) -> Result<Tensor> {
        let _enter = self.span_output.enter();
        let logits = self.output.forward(x)?;
        match self.softcap {
            Some(c) => (logits / c)?.tanh()? * c,
            None => Ok(logits),
        }
    }

    /// Reads the embeddings, output head and `hp.block_count` blocks
    /// `blk.{i}` (`attn_norm`, `ffn_norm` and [`Attention::from_gguf`]'s
    /// tensors); `ffn` reads block `blk.{i}`'s feed-forward.
    pub(crate) fn read_gguf<R: Read + Seek>(
        gg: &mut Gguf<'_, R>,
        hp: &Hparams,
        rope: &Rope,
        qkv_bias: bool,
        mut ffn: impl FnMut(&mut Gguf<'_, R>, &str) -> Result<F>,
    ) -> Result<Self> {
        let (tok_embeddings, norm, output) = gg.embeddings_and_head(hp.rms_norm_eps)?;
        let mut layers = Vec::with_capacity(hp.block_count);
        for layer_idx in 0..hp.block_count {
            let prefix = format!("blk.{layer_idx}");
            let attention = Attention::from_gguf(gg, &prefix, hp, rope, qkv_bias)?;
            let feed_forward = ffn(gg, &prefix)?;
            let attention_norm =
                gg.rms_norm(&format!("{prefix}.attn_norm.weight"), hp.rms_norm_eps)?;
            let ffn_norm = gg.rms_norm(&format!("{prefix}.ffn_norm.weight"), hp.rms_norm_eps)?;
            layers.push(Block::new(
                attention_norm,
                attention,
                ffn_norm,
                feed_forward,
            ));
        }
        Ok(Self::new(tok_embeddings, layers, norm, output))
    }

    /// Build a causal attention mask of shape `(seq_len, kv_len)` where
    /// `kv_len = index_pos + seq_len`.
    ///
    /// When `index_pos == 0` the mask is square `(seq_len, seq_len)` — the
    /// classic case with an empty KV cache.
    ///
    /// When `index_pos > 0` the KV cache already holds `index_pos` entries from
    /// a previously fed prefix.  The mask becomes rectangular: the first
    /// `index_pos` columns are all 0 (every query attends to every prefix key)
    /// and the remaining `seq_len` columns form the standard causal triangle
    /// (query at global position `index_pos + i` cannot attend to keys at global
    /// positions `> index_pos + i`).
    ///
    /// # Shape example  (index_pos=65, seq_len=4)
    /// ```text
    ///              kv 0..64 (prefix)   kv 65  kv 66  kv 67  kv 68
    /// query 65:       0  0 … 0           0      1      1      1
    /// query 66:       0  0 … 0           0      0      1      1
    /// query 67:       0  0 … 0           0      0      0      1
    /// query 68:       0  0 … 0           0      0      0      0
    /// ```
    fn mask(&mut self, seq_len: usize, index_pos: usize, device: &Device) -> Result<Tensor> {
        self.masks.get(seq_len, index_pos, device)
    }

    /// Clear the KV cache across all layers.
    ///
    /// Call this between independent conversations to free cached attention
    /// state without recreating the model.
    pub(crate) fn clear_kv_cache(&mut self) {
        for layer in self.layers.iter_mut() {
            layer.attention.kv_cache.clear();
        }
    }

    /// Logits for the last of the tokens `x` `(batch, seq)`, which sit at
    /// positions `index_pos..` (the KV cache holds the positions before).
    pub(crate) fn forward(&mut self, x: &Tensor, index_pos: usize) -> Result<Tensor> {
        let (_b_sz, seq_len) = x.dims2()?;
        let mask = if seq_len == 1 {
            None
        } else {
            Some(self.mask(seq_len, index_pos, x.device())?)
        };
        let hidden = self.hidden(x, Causal::Masked(mask.as_ref()), index_pos)?;
        let x = self.norm.forward(&hidden)?;
        let x = x.i((.., seq_len - 1, ..))?;
        self.head(&x)
    }

    /// Logits after each of the tokens `x` `(batch, seq)` at positions
    /// `index_pos..`, `(batch, seq, vocabulary)`, each row bit for bit what
    /// [`Model::forward`] gives when the tokens are fed one at a time (every
    /// other operation works row by row; attention is done per row). This is
    /// how drafted tokens are checked: several positions for one pass over
    /// the weights.
    pub(crate) fn forward_rows(&mut self, x: &Tensor, index_pos: usize) -> Result<Tensor> {
        let hidden = self.hidden(x, Causal::PerRow, index_pos)?;
        let x = self.norm.forward(&hidden)?;
        self.head(&x)
    }

    /// The last block's output for the tokens `x`.
    fn hidden(&mut self, x: &Tensor, causal: Causal<'_>, index_pos: usize) -> Result<Tensor> {
        let _enter = self.span.enter();
        let mut layer_in = self.tok_embeddings.forward(x)?;
        if let Some(scale) = self.embed_scale {
            layer_in = (layer_in * scale)?;
        }
        for layer in self.layers.iter_mut() {
            layer_in = layer.forward(&layer_in, causal, index_pos)?;
        }
        Ok(layer_in)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Result};
    use candle_transformers::utils::build_causal_mask;

    // ── Mask shape tests ──────────────────────────────────────────────────────

    /// The cache gives the masks `build_causal_mask` builds, and holds no
    /// more than `MASKS` however many prompt shapes go through it.
    #[test]
    fn the_mask_cache_is_bounded() -> Result<()> {
        let mut cache = super::MaskCache::default();
        for round in 0..2 {
            for seq_len in 2..60 {
                let index_pos = (seq_len * 7 + round) % 13;
                let got = cache.get(seq_len, index_pos, &Device::Cpu)?;
                let want = build_causal_mask(seq_len, index_pos, &Device::Cpu)?;
                assert_eq!(got.to_vec2::<u8>()?, want.to_vec2::<u8>()?);
                assert!(
                    cache.0.len() <= super::MASKS,
                    "{} masks held",
                    cache.0.len()
                );
            }
        }
        // A repeated shape is served from the cache.
        let a = cache.get(5, 3, &Device::Cpu)?;
        let b = cache.get(5, 3, &Device::Cpu)?;
        assert_eq!(a.id(), b.id());
        Ok(())
    }

    /// Classic square mask: index_pos=0 produces (seq_len, seq_len).
    #[test]
    fn causal_mask_square_shape() -> Result<()> {
        let mask = build_causal_mask(4, 0, &Device::Cpu)?;
        assert_eq!(mask.dims(), [4, 4]);
        Ok(())
    }

    /// Rectangular mask: index_pos=N produces (seq_len, N + seq_len).
    #[test]
    fn causal_mask_rectangular_shape() -> Result<()> {
        let mask = build_causal_mask(4, 65, &Device::Cpu)?;
        assert_eq!(mask.dims(), [4, 69]);
        Ok(())
    }

    // ── Mask value tests ──────────────────────────────────────────────────────

    /// Square mask values: standard lower-triangular pattern (0=attend, 1=block).
    ///
    /// For seq_len=3, index_pos=0:
    ///   row 0 (global pos 0): attend to pos 0             → [0, 1, 1]
    ///   row 1 (global pos 1): attend to pos 0..1           → [0, 0, 1]
    ///   row 2 (global pos 2): attend to pos 0..2           → [0, 0, 0]
    #[test]
    fn causal_mask_square_values() -> Result<()> {
        let mask = build_causal_mask(3, 0, &Device::Cpu)?;
        let data: Vec<u8> = mask.flatten_all()?.to_vec1()?;
        assert_eq!(data, [0, 1, 1, 0, 0, 1, 0, 0, 0]);
        Ok(())
    }

    /// Rectangular mask values: prefix columns are all-zero, user columns
    /// form the causal triangle.
    ///
    /// For seq_len=3, index_pos=2 → kv_len=5:
    ///   row 0 (global pos 2): attend to kv 0..2  → [0,0, 0,1,1]
    ///   row 1 (global pos 3): attend to kv 0..3  → [0,0, 0,0,1]
    ///   row 2 (global pos 4): attend to kv 0..4  → [0,0, 0,0,0]
    #[test]
    fn causal_mask_rectangular_values() -> Result<()> {
        let mask = build_causal_mask(3, 2, &Device::Cpu)?;
        let data: Vec<u8> = mask.flatten_all()?.to_vec1()?;
        #[rustfmt::skip]
        assert_eq!(data, [
            0, 0,  0, 1, 1,
            0, 0,  0, 0, 1,
            0, 0,  0, 0, 0,
        ]);
        Ok(())
    }

    /// A single-token query (seq_len=1) with prefix produces a single row
    /// of all zeros — it can attend to every key including itself.
    #[test]
    fn causal_mask_single_query_with_prefix() -> Result<()> {
        let mask = build_causal_mask(1, 10, &Device::Cpu)?;
        assert_eq!(mask.dims(), [1, 11]);
        let data: Vec<u8> = mask.flatten_all()?.to_vec1()?;
        assert!(
            data.iter().all(|&v| v == 0),
            "single-query mask should be all-zero"
        );
        Ok(())
    }

    // ── Mask broadcast compatibility test ─────────────────────────────────────

    /// Verify the mask can be broadcast to (batch, heads, seq_len, kv_len) —
    /// the exact shape produced by `Q @ K^T` in the attention forward pass.
    /// This is the broadcast that previously panicked when index_pos > 0.
    #[test]
    fn causal_mask_broadcasts_to_attention_shape() -> Result<()> {
        let batch = 1usize;
        let heads = 8usize;
        let seq_len = 4usize;
        let index_pos = 10usize;

        let mask = build_causal_mask(seq_len, index_pos, &Device::Cpu)?;
        // Simulate the attention score shape Q @ K^T → (batch, heads, seq_len, kv_len)
        let kv_len = index_pos + seq_len;
        let att_shape = &[batch, heads, seq_len, kv_len];
        let broadcasted = mask.broadcast_as(att_shape.as_slice())?;
        assert_eq!(broadcasted.dims(), att_shape);
        Ok(())
    }
}
