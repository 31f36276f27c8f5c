//! ragd's BERT encoder forward: the same weights and arithmetic (fp32) as
//! candle-transformers' `BertModel`, arranged for embedding batches on a CPU.
//!
//! Why not candle's model as it is (profiled with `perf` on 64 texts of 256
//! tokens, all-MiniLM-L6-v2, 2 threads): it pads every text of a batch to the
//! longest and computes attention for the whole batch at once, so one layer's
//! scores are a (32, 12, 256, 256) tensor — 100 MB — made four times over
//! (scores, scaled, masked, softmax). Buffers that large come fresh from the
//! kernel each time: 18 % of the run was the kernel zeroing pages. Here:
//! - texts are packed without padding: the token-wise parts (embeddings, every
//!   linear layer, layer norms, GELU) run on a (tokens, hidden) matrix holding
//!   only real tokens, so a short text costs its own length, not the longest's;
//! - attention runs per text on its own length (no mask needed, buffers of
//!   L × L), each head read from and written to the batch's matrices in
//!   place (`ragd_kernels::attention`);
//! - Q, K and V are one matrix product (their weights concatenated at load) and
//!   the 1/√d scale is folded into Q's weights (or their block scales);
//! - each linear layer adds its bias, and the residual after it, in its own
//!   output buffer (`ragd_kernels::dense`): no separate passes or buffers
//!   for them;
//! - layer norm is candle's fused kernel;
//! - GELU (applied in place to the up projection's output,
//!   `ragd_kernels::dense::gelu_erf`) and softmax
//!   (`ragd_kernels::softmax`) use a
//!   branch-free exp the compiler vectorises: candle's call libm's scalar
//!   `erff` and `expf` per element (GELU on one thread), which was a fifth of
//!   the run once the page zeroing was gone, and softmax's `expf` another 7 %.
//!
//! The reference (candle's `BertModel`, padded) is kept for the tests, which
//! check that both give the same vectors.
//!
//! With `int8` the four linear layers of each block run on ragd's Q8_0 kernel
//! (`ragd_kernels::q8_0`): weights quantized per 32 values at load, activations
//! per 32 values as each product runs (dynamic quantization), integer dot
//! products, AVX2 or AVX-512 VNNI. Weights that are already 4-bit values
//! (multilingual-e5-small's, dequantized from its Q4_0 image) are not
//! quantized again: they run as they are on the Q4_0 kernel
//! (`ragd_kernels::q4_0`), exact and faster. The rest (embeddings, layer
//! norms, attention, GELU) stays fp32.

use candle_core::{Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};
use candle_transformers::models::bert::{Config, HiddenAct};
use ragd_kernels::attention::packed_attention;
use ragd_kernels::dense::Dense;

use crate::mapped::{FileTable, Table};
use crate::Pooling;

struct Layer {
    /// Q, K, V in one: hidden → 3 × hidden, Q pre-scaled by 1/√head_dim.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: LayerNorm,
    up: Dense,
    down: Dense,
    output_norm: LayerNorm,
}

pub(crate) struct Bert {
    /// The word embeddings, read from the mapped weights file where they are
    /// plain f32 ([`crate::mapped`]: most of a multilingual model's memory).
    word: Table,
    position: Tensor,
    token_type: Tensor,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    act: HiddenAct,
}

/// A linear layer's (outputs × inputs) weight and its bias.
fn linear(vb: &VarBuilder, inp: usize, out: usize) -> Result<(Tensor, Tensor)> {
    Ok((vb.get((out, inp), "weight")?, vb.get(out, "bias")?))
}

fn dense(vb: &VarBuilder, inp: usize, out: usize, int8: bool) -> Result<Dense> {
    let (w, b) = linear(vb, inp, out)?;
    Dense::new(&w, &b, int8)
}

fn norm(vb: &VarBuilder, size: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(
        vb.get(size, "weight")?,
        vb.get(size, "bias")?,
        eps,
    ))
}

impl Bert {
    /// Loads the weights as candle's `BertModel::load` finds them (with or
    /// without a `bert.` / model-type prefix); the word embeddings are `word`
    /// when given.
    pub(crate) fn load(
        vb: VarBuilder,
        c: &Config,
        word: Option<FileTable>,
        int8: bool,
    ) -> Result<Self> {
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else if let Some(t) = c
            .model_type
            .as_ref()
            .filter(|t| vb.contains_tensor(&format!("{t}.embeddings.word_embeddings.weight")))
        {
            vb.pp(t)
        } else {
            vb
        };
        let h = c.hidden_size;
        let heads = c.num_attention_heads;
        if heads == 0 || !h.is_multiple_of(heads) {
            candle_core::bail!("hidden_size {h} is not a multiple of num_attention_heads {heads}");
        }
        let head_dim = h / heads;
        let e = vb.pp("embeddings");
        let word = match word {
            Some(table) => Table::File(table),
            None => Table::Loaded(e.get((c.vocab_size, h), "word_embeddings.weight")?),
        };
        let position = e.get((c.max_position_embeddings, h), "position_embeddings.weight")?;
        let token_type = e.get((c.type_vocab_size, h), "token_type_embeddings.weight")?;
        let embedding_norm = norm(&e.pp("LayerNorm"), h, c.layer_norm_eps)?;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let s = l.pp("attention.self");
            let ((qw, q_bias), (kw, k_bias), (vw, v_bias)) = (
                linear(&s.pp("query"), h, h)?,
                linear(&s.pp("key"), h, h)?,
                linear(&s.pp("value"), h, h)?,
            );
            let w = Tensor::cat(&[qw, kw, vw], 0)?;
            let b = Tensor::cat(&[q_bias, k_bias, v_bias], 0)?;
            layers.push(Layer {
                qkv: Dense::scaled(&w, &b, int8, 0..h, scale as f32)?,
                attention_out: dense(&l.pp("attention.output.dense"), h, h, int8)?,
                attention_norm: norm(&l.pp("attention.output.LayerNorm"), h, c.layer_norm_eps)?,
                up: dense(&l.pp("intermediate.dense"), h, c.intermediate_size, int8)?
                    .with_gelu(matches!(c.hidden_act, HiddenAct::Gelu)),
                down: dense(&l.pp("output.dense"), c.intermediate_size, h, int8)?,
                output_norm: norm(&l.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
            });
        }
        Ok(Self {
            word,
            position,
            token_type,
            embedding_norm,
            layers,
            heads,
            head_dim,
            act: c.hidden_act,
        })
    }

    /// The precision of the linear layers (all are built alike).
    pub(crate) fn precision(&self) -> &'static str {
        self.layers.first().map_or("f32", |l| l.up.precision())
    }

    /// One pooled vector per text (not normalised): `texts` are (token ids,
    /// token type ids) of equal lengths, each at most the position table long.
    pub(crate) fn embed(&self, texts: &[(&[u32], &[u32])], pooling: Pooling) -> Result<Tensor> {
        let device = self.position.device();
        let lens: Vec<usize> = texts.iter().map(|(ids, _)| ids.len()).collect();
        let total: usize = lens.iter().sum();
        if texts.is_empty() || total == 0 {
            candle_core::bail!("nothing to embed");
        }
        let ids: Vec<u32> = texts.iter().flat_map(|(i, _)| i.iter().copied()).collect();
        let words = self.word.lookup(&ids, device)?;
        let types: Vec<u32> = texts.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        let positions: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
        let types = Tensor::from_vec(types, total, device)?;
        let positions = Tensor::from_vec(positions, total, device)?;
        let x = (words + self.token_type.index_select(&types, 0)?)?;
        let x = (x + self.position.index_select(&positions, 0)?)?;
        let mut x = self.embedding_norm.forward(&x)?;
        for layer in &self.layers {
            x = self.layer(layer, &x, &lens)?;
        }
        // Pooling per text over its own rows.
        let mut pooled = Vec::with_capacity(texts.len());
        let mut offset = 0;
        for &len in &lens {
            let rows = x.narrow(0, offset, len)?;
            offset += len;
            pooled.push(match pooling {
                Pooling::Cls => rows.get(0)?,
                Pooling::Mean => rows.mean(0)?,
                Pooling::MeanSqrtLen => (rows.sum(0)? / (len as f64).sqrt())?,
                Pooling::Max => rows.max(0)?,
            });
        }
        Tensor::stack(&pooled, 0)
    }

    fn layer(&self, l: &Layer, x: &Tensor, lens: &[usize]) -> Result<Tensor> {
        // (tokens, 3h); then each text over its own rows, the texts' heads
        // spread over the cores.
        let qkv = l.qkv.forward(x)?;
        let context = packed_attention(&qkv, lens, self.heads, self.head_dim)?;
        let x = l
            .attention_norm
            .forward(&l.attention_out.forward_residual(&context, x)?)?;
        let up = l.up.forward(&x)?;
        let up = match self.act {
            // Applied to the up projection's output in place (`with_gelu`).
            HiddenAct::Gelu => up,
            HiddenAct::GeluApproximate => up.gelu()?,
            HiddenAct::Relu => up.relu()?,
        };
        l.output_norm.forward(&l.down.forward_residual(&up, &x)?)
    }
}
