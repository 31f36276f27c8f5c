//! Bidirectional attention over texts packed without padding (the
//! embedder's BERT layers): `qkv` is (tokens, 3·hidden), the texts' rows one
//! after another, each text attending over its own rows only.
//!
//! Why by hand: with candle's tensors, each text's Q, K and V were cut out of
//! `qkv` and copied head-major (three copies), the scores got a fresh
//! (heads, L, L) buffer, the context was copied back token-major and then
//! once more into the batch's (tokens, hidden) matrix: copies and fresh pages
//! were about 8 % of an int8 embedding batch (`perf`, all-MiniLM-L6-v2, 128
//! texts of 256 tokens). Here `gemm` reads each head's Q, K and V where they
//! lie in `qkv` (through strides), writes each head's context straight into
//! its columns of the output, and each thread reuses one scores buffer.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::contiguous_f32;
use crate::q8_0::SendPtr;
use crate::softmax::softmax_row_in_place;

/// Softmax attention of each text over itself, per head: for `qkv` of shape
/// (tokens, 3·heads·head_dim) holding Q (already scaled by 1/√head_dim), K
/// and V side by side, and texts of `lens` tokens (summing to `tokens`),
/// returns the context (tokens, heads·head_dim).
pub fn packed_attention(
    qkv: &Tensor,
    lens: &[usize],
    heads: usize,
    head_dim: usize,
) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1_no_bwd(&PackedAttention {
        lens: lens.to_vec(),
        heads,
        head_dim,
    })
}

struct PackedAttention {
    lens: Vec<usize>,
    heads: usize,
    head_dim: usize,
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "ragd-packed-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(storage, layout, self.name())?;
        let (heads, hd) = (self.heads, self.head_dim);
        let h = heads * hd;
        let tokens: usize = self.lens.iter().sum();
        if layout.shape().dims() != [tokens, 3 * h] {
            candle_core::bail!(
                "{}: qkv {:?} for {tokens} tokens of 3 x {h}",
                self.name(),
                layout.shape()
            )
        }
        let mut out = vec![0f32; tokens * h];
        let mut starts = Vec::with_capacity(self.lens.len());
        let mut start = 0;
        for &len in &self.lens {
            starts.push(start);
            start += len;
        }
        let longest = self.lens.iter().copied().max().unwrap_or(0);
        let jobs = self.lens.len() * heads;
        // Each (text, head) job writes its own rows × columns of the output.
        let dst = SendPtr(out.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(jobs, |range| {
            let dst = &dst;
            let mut scores = vec![0f32; longest * longest];
            for job in range {
                let (text, head) = (job / heads, job % heads);
                let (t0, len) = (starts[text], self.lens[text]);
                if len == 0 {
                    continue;
                }
                let q = qkv[t0 * 3 * h + head * hd..].as_ptr();
                let k = qkv[t0 * 3 * h + h + head * hd..].as_ptr();
                let v = qkv[t0 * 3 * h + 2 * h + head * hd..].as_ptr();
                let s = &mut scores[..len * len];
                let (h3, len_s) = (3 * h as isize, len as isize);
                // SAFETY: Q, K and V of this text and head are `len` rows
                // 3h apart of `hd` values within qkv (its shape checked
                // above); the scores are len × len; the context goes to
                // rows t0..t0+len, columns head·hd.. of the tokens × h
                // output, which no other job writes.
                #[allow(unsafe_code)]
                unsafe {
                    // scores = Q · Kᵀ: (len × hd) · (hd × len), K read by columns.
                    let scores = Strided::new(s.as_mut_ptr(), len_s, 1);
                    product(
                        len,
                        len,
                        hd,
                        scores,
                        Strided::new(q, h3, 1),
                        Strided::new(k, 1, h3),
                    );
                    s.chunks_mut(len).for_each(softmax_row_in_place);
                    // context = P · V: (len × len) · (len × hd), into its columns of the output.
                    let context = Strided::new(dst.0.add(t0 * h + head * hd), h as isize, 1);
                    product(
                        len,
                        hd,
                        len,
                        context,
                        Strided::new(s.as_ptr(), len_s, 1),
                        Strided::new(v, h3, 1),
                    );
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((tokens, h))))
    }
}

/// A matrix by its first element and its row and column strides.
#[derive(Clone, Copy)]
struct Strided<P> {
    at: P,
    row: isize,
    col: isize,
}

impl<P> Strided<P> {
    fn new(at: P, row: isize, col: isize) -> Self {
        Self { at, row, col }
    }
}

/// `dst = lhs · rhs` for an (m × k) `lhs` and a (k × n) `rhs`, on this
/// thread (the caller spreads its jobs over the cores).
///
/// # Safety
/// Every element the strides reach, m × k of `lhs`, k × n of `rhs` and m × n
/// of `dst`, must be in bounds, and `dst` written by no one else meanwhile.
#[allow(unsafe_code)]
unsafe fn product(
    m: usize,
    n: usize,
    k: usize,
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
) {
    // SAFETY: as the caller promises.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.at,
            dst.col,
            dst.row,
            false,
            lhs.at,
            lhs.col,
            lhs.row,
            rhs.at,
            rhs.col,
            rhs.row,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::pseudo_random;
    use candle_core::Device;

    /// Against the same attention written with candle's tensors, per text.
    #[test]
    fn matches_attention_per_text() -> Result<()> {
        let (heads, hd) = (3, 8);
        let h = heads * hd;
        let lens = [5usize, 1, 17, 0, 9];
        let tokens: usize = lens.iter().sum();
        let qkv = Tensor::from_vec(
            pseudo_random(tokens * 3 * h, 9),
            (tokens, 3 * h),
            &Device::Cpu,
        )?;
        let got = packed_attention(&qkv, &lens, heads, hd)?;
        let mut want = Vec::new();
        let mut t0 = 0;
        for &len in &lens {
            if len == 0 {
                continue;
            }
            let t = qkv.narrow(0, t0, len)?;
            t0 += len;
            let split = |i: usize| -> Result<Tensor> {
                t.narrow(1, i * h, h)?
                    .reshape((len, heads, hd))?
                    .transpose(0, 1)?
                    .contiguous()
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let p = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?;
            want.push(p.matmul(&v)?.transpose(0, 1)?.reshape((len, h))?);
        }
        let want = Tensor::cat(&want, 0)?;
        assert_eq!(got.dims(), want.dims());
        let diff = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "off by {diff}");
        // A shape that does not match the lengths is an error.
        assert!(packed_attention(&qkv, &[3, 4], heads, hd).is_err());
        Ok(())
    }
}
