//! Gemma 3 (`general.architecture = "gemma3"`), as llama.cpp runs it
//! (`src/models/gemma3.cpp`), on the pieces [`super::layers`] shares with
//! llama and qwen2. What is gemma3's own:
//! - token embeddings scaled by √embedding_length;
//! - RMS norms of each query and key head before rotation, and of the
//!   attention's and the feed-forward's outputs before the residual adds
//!   (the file's norm weights already include Gemma's `1 +`);
//! - GELU (tanh approximation) in the gated feed-forward;
//! - local layers with a sliding window (`attention.sliding_window`) and their
//!   own rope base (`rope.freq_base_swa`, 10000), and every
//!   `attention.sliding_window_pattern`-th layer (6) global with
//!   `rope.freq_base` and linear rope scaling where the file says;
//! - heads wider than `embedding_length / head_count` (`attention.key_length`),
//!   NEOX rope, the output head tied to the embeddings, optional final logit
//!   soft-capping.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::{Device, Result};

use super::layers::{Attention, Block, Gguf, Hparams, Mapped, Mlp, Model, Rope};

/// A gemma3 model: the shared [`Model`] with a GELU feed-forward.
pub(crate) type ModelWeights = Model<Mlp>;

const ARCH: &str = "gemma3";

/// Which layers use the sliding window: `attention.sliding_window_pattern` as
/// an array of flags, or as `n` (every layer but each `n`-th; llama.cpp's
/// `set_swa_pattern`), 6 when absent.
fn local_layers(pattern: Option<&Value>, blocks: usize) -> Vec<bool> {
    if let Some(Ok(flags)) = pattern.map(|v| v.to_vec()) {
        let flags: Vec<bool> = flags.iter().filter_map(|f| f.to_bool().ok()).collect();
        if flags.len() == blocks {
            return flags;
        }
    }
    let n = pattern.and_then(|v| v.to_u32().ok()).unwrap_or(6) as usize;
    (0..blocks).map(|i| n == 0 || i % n < n - 1).collect()
}

/// Reads a gemma3 file (a free function: the type is qwen2's too).
pub(crate) fn from_gguf<R: std::io::Seek + std::io::Read>(
    ct: gguf_file::Content,
    reader: &mut R,
    device: &Device,
    map: Option<Mapped<'_>>,
) -> Result<ModelWeights> {
    let mut gg = Gguf::new(ct, reader, device, map);
    let hp = Hparams::read(&gg, ARCH)?;
    let f32_of = |gg: &Gguf<'_, R>, key: &str| {
        gg.metadata(&format!("{ARCH}.{key}"))
            .and_then(|v| v.to_f32())
            .ok()
    };
    let context_length = gg.metadata(&format!("{ARCH}.context_length"))?.to_u32()? as usize;
    let window = gg
        .metadata(&format!("{ARCH}.attention.sliding_window"))
        .and_then(|v| v.to_u32())
        .ok()
        .filter(|&w| w > 0)
        .map(|w| w as usize);
    let local = match window {
        Some(_) => local_layers(
            gg.metadata(&format!("{ARCH}.attention.sliding_window_pattern"))
                .ok(),
            hp.block_count,
        ),
        None => vec![false; hp.block_count],
    };
    let linear_scale = match gg
        .metadata(&format!("{ARCH}.rope.scaling.type"))
        .and_then(|v| v.to_string())
    {
        Ok(kind) if kind == "linear" => f32_of(&gg, "rope.scaling.factor")
            .filter(|&f| f > 0.0)
            .map_or(1.0, |f| 1.0 / f),
        _ => 1.0,
    };
    let head_dim = hp.head_dim();
    let global_rope = Rope::scaled(
        head_dim,
        hp.rope_freq_base,
        linear_scale,
        context_length,
        true,
        device,
    )?;
    let local_rope = Rope::new(
        head_dim,
        f32_of(&gg, "rope.freq_base_swa").unwrap_or(10000.0),
        context_length,
        true,
        device,
    )?;
    // llama.cpp: 1/√(embedding_length / head_count) for the 27B model
    // (62 blocks), 1/√head_dim (grouped_attention's own) otherwise.
    let scale =
        (hp.block_count == 62).then(|| 1.0 / ((hp.embedding_length / hp.head_count) as f64).sqrt());
    let softcap = f32_of(&gg, "final_logit_softcapping")
        .filter(|&c| c > 0.0)
        .map(f64::from);

    let eps = hp.rms_norm_eps;
    let (tok_embeddings, norm, output) = gg.embeddings_and_head(eps)?;
    let mut layers = Vec::with_capacity(hp.block_count);
    for (i, &is_local) in local.iter().enumerate() {
        let prefix = format!("blk.{i}");
        let rope = if is_local { &local_rope } else { &global_rope };
        let mut norm = |name: &str| gg.rms_norm(&format!("{prefix}.{name}.weight"), eps);
        let qk_norms = [norm("attn_q_norm")?, norm("attn_k_norm")?];
        let post_norms = [norm("post_attention_norm")?, norm("post_ffw_norm")?];
        let attention_norm = norm("attn_norm")?;
        let ffn_norm = norm("ffn_norm")?;
        let attention = Attention::from_gguf(&mut gg, &prefix, &hp, rope, false)?.with_gemma(
            qk_norms,
            window.filter(|_| is_local),
            scale,
        );
        let mlp = Mlp::from_gguf(&mut gg, &prefix, "")?.with_gelu();
        layers
            .push(Block::new(attention_norm, attention, ffn_norm, mlp).with_post_norms(post_norms));
    }
    Ok(Model::new(tok_embeddings, layers, norm, output)
        .with_embed_scale((hp.embedding_length as f64).sqrt(), softcap))
}

#[cfg(test)]
mod tests {
    use super::local_layers;
    use candle_core::quantized::gguf_file::Value;

    #[test]
    fn every_sixth_layer_is_global_unless_the_file_says() {
        let six = local_layers(None, 18);
        let globals: Vec<usize> = (0..18).filter(|&i| !six[i]).collect();
        assert_eq!(globals, [5, 11, 17]);
        let four = local_layers(Some(&Value::U32(4)), 8);
        assert_eq!(four, [true, true, true, false, true, true, true, false]);
        let flags = Value::Array(vec![Value::Bool(false), Value::Bool(true)]);
        assert_eq!(local_layers(Some(&flags), 2), [false, true]);
    }
}
