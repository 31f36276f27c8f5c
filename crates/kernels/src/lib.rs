//! Quantized matrix products for x86-64, written by hand where candle's are
//! slow on the CPUs ragd runs on (each module says why, with the figure):
//!
//! * [`q8_0`]: Q8_0 weights, and [`q8_0::Linear`] / [`q8_0::TokenEmbedding`],
//!   the layers the generator's models are built from, which pick a kernel per
//!   weight type;
//! * [`q5_0`]: Q5_0 weights at the file's 5.5 bits per weight;
//! * [`kquant`]: Q4_K and Q6_K on the file's own blocks.
//!
//! The generator runs GGUF models on them; the embedder's int8 mode runs its
//! linear layers through [`q8_0::Q8Matrix`].

pub mod kquant;
pub mod q5_0;
pub mod q8_0;
