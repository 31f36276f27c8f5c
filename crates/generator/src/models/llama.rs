//! Quantized llama, from candle-transformers 0.11.1
//! (`candle_transformers::models::quantized_llama`, MIT OR Apache-2.0, by the
//! candle authors), with two changes: its linear layers are
//! [`crate::q8_0::Linear`], so Q8_0 weights go through this crate's kernel
//! (candle's `QMatMul` tracing wrapper is gone), and the KV cache and
//! attention are [`super::attention`]'s (written in place, no per-head copies).
//! To drop when candle's own Q8_0 matmul is as fast on AVX2 / AVX-512 VNNI.
//!
//! What llama has in common with qwen2 (attention, rotary tables, the SiLU
//! feed-forward, blocks, the model loop, causal masks, reading `blk.{i}.*`)
//! is in [`super::layers`]. What stays here is llama's own: the metadata keys,
//! the mixture-of-experts feed-forward, the choice of rope convention from
//! `general.architecture`, rotary tables for [`MAX_SEQ_LEN`] positions of
//! `rope.dimension_count`, and candle's loader for the older GGML format.

use candle_core::quantized::{ggml_file, gguf_file};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Embedding, Module};
use candle_transformers::quantized_nn::RmsNorm;

use super::layers::{Attention, Block, Gguf, Hparams, Mapped, Mlp, Model, Rope};
use crate::q8_0::{Linear, TokenEmbedding};

/// Positions the rotary tables cover (candle's constant; the generator caps
/// a llama model's context here).
pub(crate) const MAX_SEQ_LEN: usize = 4096;

/// A llama model: the shared [`Model`] with llama's feed-forward.
pub(crate) type ModelWeights = Model<MlpOrMoe>;

#[derive(Debug, Clone)]
pub(crate) enum MlpOrMoe {
    Mlp(Mlp),
    MoE {
        n_expert_used: usize,
        feed_forward_gate_inp: Linear,
        experts: Vec<Mlp>,
    },
}

impl Module for MlpOrMoe {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::MoE {
                feed_forward_gate_inp,
                experts,
                n_expert_used,
            } => {
                let (b_size, seq_len, hidden_dim) = xs.dims3()?;
                let xs = xs.reshape(((), hidden_dim))?;
                let router_logits = feed_forward_gate_inp.forward(&xs)?;
                let routing_weights = candle_nn::ops::softmax_last_dim(&router_logits)?;

                // In order to extract topk, we extract the data from the tensor and manipulate it
                // directly. Maybe we will want to use some custom ops instead at some point.
                let routing_weights = routing_weights.to_dtype(DType::F32)?.to_vec2::<f32>()?;

                // routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
                // top_x contains the row indexes to evaluate for each expert.
                let mut top_x = vec![vec![]; experts.len()];
                let mut selected_rws = vec![vec![]; experts.len()];
                for (row_idx, rw) in routing_weights.iter().enumerate() {
                    let mut dst = (0..rw.len() as u32).collect::<Vec<u32>>();
                    dst.sort_by(|&i, &j| rw[j as usize].total_cmp(&rw[i as usize]));
                    let mut sum_routing_weights = 0f32;
                    for &expert_idx in dst.iter().take(*n_expert_used) {
                        let expert_idx = expert_idx as usize;
                        let routing_weight = rw[expert_idx];
                        sum_routing_weights += routing_weight;
                        top_x[expert_idx].push(row_idx as u32);
                    }
                    for &expert_idx in dst.iter().take(*n_expert_used) {
                        let expert_idx = expert_idx as usize;
                        let routing_weight = rw[expert_idx];
                        selected_rws[expert_idx].push(routing_weight / sum_routing_weights)
                    }
                }

                // routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
                // expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)

                let mut ys = xs.zeros_like()?;
                for (expert_idx, expert_layer) in experts.iter().enumerate() {
                    let top_x = &top_x[expert_idx];
                    if top_x.is_empty() {
                        continue;
                    }
                    let top_x = Tensor::new(top_x.as_slice(), xs.device())?;
                    let selected_rws =
                        Tensor::new(selected_rws[expert_idx].as_slice(), xs.device())?
                            .reshape(((), 1))?;
                    // Index the correct hidden states and compute the expert hidden state for
                    // the current expert. We need to make sure to multiply the output hidden
                    // states by `routing_weights` on the corresponding tokens (top-1 and top-2)
                    let current_state = xs.index_select(&top_x, 0)?.reshape(((), hidden_dim))?;
                    // current_hidden_states = expert_layer(current_state, routing_weights[top_x_list, idx_list, None])
                    let current_hidden_states = expert_layer.forward(&current_state)?;
                    let current_hidden_states =
                        current_hidden_states.broadcast_mul(&selected_rws)?;
                    ys = ys.index_add(&top_x, &current_hidden_states, 0)?;
                }

                let ys = ys.reshape((b_size, seq_len, hidden_dim))?;
                Ok(ys)
            }
            Self::Mlp(mlp) => mlp.forward(xs),
        }
    }
}

impl ModelWeights {
    /// candle's loader for GGML (pre-GGUF) files; this crate only reads GGUF.
    #[allow(dead_code)]
    pub(crate) fn from_ggml(mut ct: ggml_file::Content, gqa: usize) -> Result<Self> {
        let head_dim = (ct.hparams.n_embd / ct.hparams.n_head) as usize;
        let n_head = ct.hparams.n_head as usize;
        // GGML format = standard Llama = interleaved
        let rope = Rope::new(head_dim, 10000., MAX_SEQ_LEN, false, &ct.device)?;
        let tok_embeddings = ct.remove("tok_embeddings.weight")?;
        let tok_embeddings = tok_embeddings.dequantize(&ct.device)?;
        let norm = RmsNorm::from_qtensor(ct.remove("norm.weight")?, 1e-5)?;
        let output = Linear::from_qtensor(ct.remove("output.weight")?)?;
        let mut layers = Vec::with_capacity(ct.hparams.n_layer as usize);
        for layer_idx in 0..ct.hparams.n_layer {
            let prefix = format!("layers.{layer_idx}");
            let mut linear =
                |name: &str| Linear::from_qtensor(ct.remove(&format!("{prefix}.{name}.weight"))?);
            let attention = Attention::new(
                [
                    linear("attention.wq")?,
                    linear("attention.wk")?,
                    linear("attention.wv")?,
                    linear("attention.wo")?,
                ],
                n_head,
                n_head / gqa,
                head_dim,
                rope.clone(),
            )?;
            let mlp_or_moe = MlpOrMoe::Mlp(Mlp::new(
                linear("feed_forward.w1")?,
                linear("feed_forward.w2")?,
                linear("feed_forward.w3")?,
            ));
            let mut norm = |name: &str| {
                RmsNorm::from_qtensor(ct.remove(&format!("{prefix}.{name}.weight"))?, 1e-5)
            };
            let attention_norm = norm("attention_norm")?;
            let ffn_norm = norm("ffn_norm")?;
            layers.push(Block::new(attention_norm, attention, ffn_norm, mlp_or_moe));
        }
        let tok_embeddings =
            TokenEmbedding::Dense(Embedding::new(tok_embeddings, ct.hparams.n_embd as usize));
        Ok(Model::new(tok_embeddings, layers, norm, output))
    }

    pub(crate) fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: gguf_file::Content,
        reader: &mut R,
        device: &Device,
        map: Option<Mapped<'_>>,
    ) -> Result<Self> {
        let mut gg = Gguf::new(ct, reader, device, map);

        // Parameter extraction from metadata.
        let n_expert = gg
            .metadata("llama.expert_count")
            .and_then(|v| v.to_u32())
            .unwrap_or(0) as usize;
        let n_expert_used = gg
            .metadata("llama.expert_used_count")
            .and_then(|v| v.to_u32())
            .unwrap_or(0) as usize;
        // Strangely the rms epsilon is generally 1e-6 in GGUF file but used to be 1e-5 by default.
        let hp = Hparams::read(&gg, "llama")?;
        let rope_dim = gg.metadata("llama.rope.dimension_count")?.to_u32()? as usize;

        // Determine RoPE convention from model architecture (matching llama.cpp).
        // NEOX (non-interleaved): pairs (i, i+d/2) — Qwen, Qwen2, Falcon, Phi, etc.
        // NORM (interleaved): pairs (2i, 2i+1) — Llama, Mistral, DeepSeek, etc.
        // See llama_model_rope_type() in llama.cpp for the authoritative mapping.
        let arch = gg
            .metadata("general.architecture")
            .and_then(|v| v.to_string())
            .ok()
            .cloned()
            .unwrap_or_default();
        let rope_is_neox = matches!(
            arch.as_str(),
            "qwen"
                | "qwen2"
                | "qwen2moe"
                | "qwen3"
                | "qwen3moe"
                | "falcon"
                | "grok"
                | "dbrx"
                | "phi2"
                | "phi3"
                | "phimoe"
                | "stablelm"
                | "starcoder2"
                | "bert"
                | "nomic-bert"
                | "jina-bert-v2"
                | "olmo2"
                | "olmoe"
                | "codeshell"
                | "plamo"
        );
        let rope = Rope::new(
            rope_dim,
            hp.rope_freq_base,
            MAX_SEQ_LEN,
            rope_is_neox,
            device,
        )?;

        Model::read_gguf(&mut gg, &hp, &rope, false, |gg, prefix| {
            if n_expert <= 1 {
                return Ok(MlpOrMoe::Mlp(Mlp::from_gguf(gg, prefix, "")?));
            }
            let feed_forward_gate_inp = gg.linear(&format!("{prefix}.ffn_gate_inp.weight"))?;
            let mut experts = Vec::with_capacity(n_expert);
            for i in 0..n_expert {
                experts.push(Mlp::from_gguf(gg, prefix, &format!(".{i}"))?);
            }
            Ok(MlpOrMoe::MoE {
                n_expert_used,
                feed_forward_gate_inp,
                experts,
            })
        })
    }
}
