//! Quantized matrix products for x86-64, written by hand where candle's are
//! slow on the CPUs ragd runs on (each module says why, with the figure):
//!
//! * [`q8_0`]: Q8_0 weights, and [`q8_0::Linear`] / [`q8_0::TokenEmbedding`],
//!   the layers the generator's models are built from, which pick a kernel per
//!   weight type;
//! * [`q5_0`]: Q5_0 weights at the file's 5.5 bits per weight;
//! * [`q4_0`]: weights that are Q4_0 values (multilingual-e5-small's), in
//!   tiles whose 16-bit sums span a block;
//! * [`kquant`]: Q4_K, Q5_K and Q6_K on the file's own blocks;
//! * [`kquant_prompt`]: K-quant prompts on AVX2 without AVX-512 VNNI, in
//!   tiles whose 16-bit sums span a sub-block, and Q4_K and Q5_K prompts with
//!   it (32-bit sums by `vpdpbusd`);
//! * [`softmax`]: attention's softmax with a vectorisable exp (and, for the
//!   generator, the scale and the causal mask in the same pass);
//! * [`prepared`]: the Q8_0 and Q5_0 layouts read in place from a file an
//!   earlier load wrote, instead of laid out again at every start;
//! * [`rows`]: token-embedding tables read from the model file row by row;
//! * [`cached_attention`]: one decoded position's attention over the KV
//!   cache, reading each key/value head in place;
//! * [`attention`]: the embedder's attention over texts packed without
//!   padding, each head read and written in place;
//! * [`dense`]: a linear layer with its bias and residual added in the
//!   product's own output (f32 by `gemm`, or int8 by [`q8_0::Q8Matrix`]).
//!
//! The generator runs GGUF models on them; the embedder's layers are
//! [`dense::Dense`].

pub mod attention;
pub mod cached_attention;
pub mod dense;
pub mod kquant;
pub mod kquant_prompt;
pub mod prepared;
pub mod q4_0;
pub mod q5_0;
pub mod q8_0;
pub mod rows;
pub mod softmax;

use candle_core::{CpuStorage, Layout, Result};

/// The elements of a contiguous f32 tensor, for custom ops' `cpu_fwd`.
pub fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op} needs a contiguous tensor"),
    }
}

/// Calls `fill(i, chunk)` for each `chunk`-long piece `i` of `buf` (a
/// matrix's row groups, a tensor's rows), the pieces spread over candle's
/// pool of threads.
#[allow(unsafe_code)] // the pool's threads write disjoint pieces of one buffer
pub(crate) fn par_chunks_mut<T: Send>(
    buf: &mut [T],
    chunk: usize,
    fill: impl Fn(usize, &mut [T]) + Sync,
) {
    if chunk == 0 {
        return;
    }
    let pieces = buf.len() / chunk;
    struct Out<T>(*mut T);
    // SAFETY: each piece is written by one thread only.
    unsafe impl<T> Send for Out<T> {}
    unsafe impl<T> Sync for Out<T> {}
    let out = Out(buf.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(pieces, |range| {
        let out = &out;
        for i in range {
            // SAFETY: piece `i` belongs to this range alone, and the buffer
            // outlives the pool call.
            let mine = unsafe { std::slice::from_raw_parts_mut(out.0.add(i * chunk), chunk) };
            fill(i, mine);
        }
    });
}

/// What the kernels' tests share.
#[cfg(test)]
pub(crate) mod tests {
    /// `n` values in -0.5..0.5, the same for the same seed.
    pub(crate) fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    /// (rows, inputs, outputs) that exercise every tile edge of the 32-value
    /// block kernels: one row and column, partial groups of 8, partial tiles
    /// of 4, several row blocks of 48.
    pub(crate) const EDGE_SHAPES: &[(usize, usize, usize)] = &[
        (1, 32, 1),
        (1, 64, 7),
        (2, 96, 5),
        (3, 128, 8),
        (5, 64, 13),
        (17, 896, 130),
        (64, 256, 33),
    ];
}
