//! Quantized Qwen2, from candle-transformers 0.11.1
//! (`candle_transformers::models::quantized_qwen2`, MIT OR Apache-2.0, by the
//! candle authors), with three changes: `ModelWeights` is `Clone`, the linear
//! layers go through [`crate::q8_0::Linear`] (a faster Q8_0 kernel), and the
//! KV cache and attention are [`super::attention`]'s (written in place, no
//! per-head copies).
//!
//! A clone shares the weights (`Arc`-backed tensors) and copies the KV cache's
//! tensor handles, so a model whose cache holds the fixed start of every prompt
//! can be cloned per request instead of reading that start again. candle's
//! `quantized_llama::ModelWeights` is already `Clone`; the qwen2 one is not in
//! 0.11, hence this copy (to drop when upstream derives it).
//!
//! Everything but the loader is shared with llama in [`super::layers`]; what
//! is qwen2's own is here: the metadata keys, q/k/v biases
//! (`blk.{i}.attn_{q,k,v}.bias`), NEOX rope, rotary tables for the file's whole
//! `context_length` and a plain SiLU feed-forward.

use candle_core::{quantized::gguf_file, Device, Result};

use super::layers::{Gguf, Hparams, Mapped, Mlp, Model, Rope};

/// A qwen2 model: the shared [`Model`] with a plain feed-forward.
pub(crate) type ModelWeights = Model<Mlp>;

impl ModelWeights {
    pub(crate) fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: gguf_file::Content,
        reader: &mut R,
        device: &Device,
        map: Option<Mapped<'_>>,
    ) -> Result<Self> {
        let mut gg = Gguf::new(ct, reader, device, map);
        let hp = Hparams::read(&gg, "qwen2")?;
        let context_length = gg.metadata("qwen2.context_length")?.to_u32()? as usize;
        let rope = Rope::new(
            hp.head_dim(),
            hp.rope_freq_base,
            context_length,
            true,
            device,
        )?;
        Model::read_gguf(&mut gg, &hp, &rope, true, |gg, prefix| {
            Mlp::from_gguf(gg, prefix, "")
        })
    }
}
