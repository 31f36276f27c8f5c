//! Attention of one new position over the KV cache: what each decoded token
//! (and each drafted token checked on its own) computes in every layer.
//!
//! Written by hand because candle's matmul hands these products to `gemm`,
//! which first packs its operands into blocks: the whole of each key and
//! value head was copied at every layer for every token, for a product with
//! one row per query head (6 for Qwen2.5-1.5B). Decoding slowed with the
//! context far more than reading the cache explains: Qwen2.5-Coder-1.5B
//! decoded 28.2 tokens/s after a 16-token prompt and 25.7 after 512
//! (`ragd bench generate`), 3.5 ms more per token for 2 MB more of keys and
//! values read per layer at most; llama.cpp lost far less.
//!
//! Here each key/value head is read in place, once per group of up to four
//! query heads that share it (grouped-query attention): the scores of a
//! group's queries against each key row are fused multiply-adds on that row,
//! softmax runs in place on them, and the weighted sum of value rows is kept
//! in registers, sixteen columns at a time. Work items are the key/value
//! heads, spread over the thread pool. Decoding after a 512-token prompt went
//! from 25.4-25.7 to 30.1 tokens/s for the 1.5B and from 55.7 to 71.6 for
//! Qwen2.5-Coder-0.5B; after 16 tokens the 1.5B went to 31.7.
//!
//! The `unsafe` code here: SIMD intrinsics behind a run-time CPU check, and
//! raw pointers so the pool's threads write disjoint heads of one output.
#![allow(unsafe_code)]

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};

#[cfg(target_arch = "x86_64")]
use crate::kquant::hsum;
use crate::q8_0::{kernel_available, SendPtr};
use crate::softmax::softmax_row_in_place;

/// `softmax(scale · q·Kᵀ) · V` for queries `(batch, heads, 1, d)` over keys
/// and values `(batch, kv_heads, positions, d)`; query head `h` reads
/// key/value head `h / (heads / kv_heads)`. The keys and values may be views
/// of a larger cache (rows of `d` contiguous values, any head stride).
#[derive(Debug, Clone, Copy)]
pub struct CachedAttention {
    /// Multiplies the scores before the softmax (1/√d).
    pub scale: f32,
}

impl CachedAttention {
    /// Whether this CPU runs it (AVX2 and FMA).
    pub fn available() -> bool {
        kernel_available()
    }
}

/// Where a `(batch, heads, rows, d)` operand's rows lie: each row's `d`
/// values are contiguous.
#[derive(Clone, Copy)]
struct Rows {
    start: usize,
    batch: usize,
    head: usize,
    row: usize,
}

fn rows_of(name: &str, layout: &Layout, d: usize) -> Result<Rows> {
    let stride = layout.stride();
    if stride.len() != 4 || (stride[3] != 1 && d > 1) {
        candle_core::bail!("cached attention: {name} rows must be contiguous, strides {stride:?}")
    }
    Ok(Rows {
        start: layout.start_offset(),
        batch: stride[0],
        head: stride[1],
        row: stride[2],
    })
}

impl CustomOp3 for CachedAttention {
    fn name(&self) -> &'static str {
        "cached-attention"
    }

    fn cpu_fwd(
        &self,
        q_s: &CpuStorage,
        q_l: &Layout,
        k_s: &CpuStorage,
        k_l: &Layout,
        v_s: &CpuStorage,
        v_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (q_s, k_s, v_s) else {
            candle_core::bail!("cached attention: q, k and v must be f32")
        };
        let (b, heads, one, d) = q_l.shape().dims4()?;
        let (kb, kv_heads, len, kd) = k_l.shape().dims4()?;
        if one != 1 || kb != b || kd != d || v_l.shape() != k_l.shape() {
            candle_core::bail!(
                "cached attention: q {:?}, k {:?}, v {:?}",
                q_l.shape(),
                k_l.shape(),
                v_l.shape()
            )
        }
        if kv_heads == 0 || heads % kv_heads != 0 || len == 0 || !d.is_multiple_of(16) {
            candle_core::bail!(
                "cached attention: {heads} heads over {kv_heads}, {len} positions, d = {d}"
            )
        }
        if !kernel_available() {
            candle_core::bail!("cached attention needs AVX2 and FMA")
        }
        let (qr, kr, vr) = (
            rows_of("q", q_l, d)?,
            rows_of("k", k_l, d)?,
            rows_of("v", v_l, d)?,
        );
        let rep = heads / kv_heads;
        let mut out = vec![0f32; b * heads * d];
        let dst = SendPtr(out.as_mut_ptr());
        let scale = self.scale;
        candle_core::utils::barrier_pool().execute_chunked(b * kv_heads, |items| {
            let dst = &dst;
            let mut scores = vec![0f32; rep.min(GROUP) * len];
            for item in items {
                let (bi, h) = (item / kv_heads, item % kv_heads);
                let k0 = kr.start + bi * kr.batch + h * kr.head;
                let v0 = vr.start + bi * vr.batch + h * vr.head;
                for r0 in (0..rep).step_by(GROUP) {
                    let g = GROUP.min(rep - r0);
                    let q0 = |r: usize| qr.start + bi * qr.batch + (h * rep + r0 + r) * qr.head;
                    let o0 = (bi * heads + h * rep + r0) * d;
                    // SAFETY: AVX2/FMA checked above; every row read lies in
                    // its tensor's storage (its layout's offsets), and each
                    // item writes only its own heads' rows of `out`.
                    unsafe {
                        let queries: [*const f32; GROUP] =
                            std::array::from_fn(|r| q.as_ptr().add(q0(r.min(g - 1))));
                        scores_avx2(
                            &queries,
                            g,
                            k.as_ptr().add(k0),
                            kr.row,
                            len,
                            d,
                            scale,
                            &mut scores,
                        );
                        for row in scores.chunks_exact_mut(len).take(g) {
                            softmax_row_in_place(row);
                        }
                        weigh_avx2(
                            &scores,
                            g,
                            v.as_ptr().add(v0),
                            vr.row,
                            len,
                            d,
                            dst.0.add(o0),
                        );
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, heads, 1, d))))
    }
}

/// Query heads whose scores are made from one pass over a key row and whose
/// outputs from one pass over a value row: 4 × 2 accumulators of the
/// weighted sum, their value loads and a broadcast fill AVX2's registers.
const GROUP: usize = 4;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// `scores[r·len + j] = scale · q_r · k_j` for the first `g` queries.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_avx2(
    queries: &[*const f32; GROUP],
    g: usize,
    k: *const f32,
    k_row: usize,
    len: usize,
    d: usize,
    scale: f32,
    scores: &mut [f32],
) {
    unsafe {
        for j in 0..len {
            let kj = k.add(j * k_row);
            let mut acc = [_mm256_setzero_ps(); GROUP];
            for c in (0..d).step_by(8) {
                let kc = _mm256_loadu_ps(kj.add(c));
                for (r, acc) in acc.iter_mut().enumerate().take(g) {
                    *acc = _mm256_fmadd_ps(_mm256_loadu_ps(queries[r].add(c)), kc, *acc);
                }
            }
            for (r, acc) in acc.iter().enumerate().take(g) {
                scores[r * len + j] = hsum(*acc) * scale;
            }
        }
    }
}

/// `out[r] = Σ_j weights[r·len + j] · v_j` for the first `g` queries, into
/// `g` rows of `d` at `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weigh_avx2(
    weights: &[f32],
    g: usize,
    v: *const f32,
    v_row: usize,
    len: usize,
    d: usize,
    out: *mut f32,
) {
    unsafe {
        for c in (0..d).step_by(16) {
            let mut acc = [[_mm256_setzero_ps(); 2]; GROUP];
            for j in 0..len {
                let vj = v.add(j * v_row + c);
                let (v0, v1) = (_mm256_loadu_ps(vj), _mm256_loadu_ps(vj.add(8)));
                for (r, acc) in acc.iter_mut().enumerate().take(g) {
                    let p = _mm256_broadcast_ss(&weights[r * len + j]);
                    acc[0] = _mm256_fmadd_ps(p, v0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(p, v1, acc[1]);
                }
            }
            for (r, acc) in acc.iter().enumerate().take(g) {
                _mm256_storeu_ps(out.add(r * d + c), acc[0]);
                _mm256_storeu_ps(out.add(r * d + c + 8), acc[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::pseudo_random;
    use candle_core::{Device, Tensor, D};

    /// Against softmax(q·Kᵀ/√d)·V by candle's ops, with the heads grouped as
    /// `repeat_kv` groups them, on cache views narrower than their buffers.
    #[test]
    fn matches_candle_on_views_of_a_cache() -> Result<()> {
        if !CachedAttention::available() {
            eprintln!("skipped: no AVX2/FMA");
            return Ok(());
        }
        let dev = Device::Cpu;
        for &(heads, kv_heads, len, cap, d) in &[
            (14, 2, 37, 64, 64),
            (12, 2, 300, 320, 128),
            (4, 1, 5, 5, 256),
            (9, 3, 1, 8, 64),
            (3, 3, 70, 80, 32),
        ] {
            let q = Tensor::from_vec(pseudo_random(heads * d, 1), (1, heads, 1, d), &dev)?;
            let cache = |seed| {
                Tensor::from_vec(
                    pseudo_random(kv_heads * cap * d, seed),
                    (1, kv_heads, cap, d),
                    &dev,
                )
            };
            let (kc, vc) = (cache(2)?, cache(3)?);
            let (k, v) = (kc.narrow(2, 0, len)?, vc.narrow(2, 0, len)?);
            let scale = 1.0 / (d as f32).sqrt();
            let got = q.apply_op3_no_bwd(&k, &v, &CachedAttention { scale })?;
            let rep = heads / kv_heads;
            let expand = |t: &Tensor| -> Result<Tensor> {
                let t = t.contiguous()?;
                Tensor::cat(&vec![&t; rep], 2)?.reshape((1, kv_heads * rep, len, d))
            };
            let (ke, ve) = (expand(&k)?, expand(&v)?);
            let att = (q.matmul(&ke.t()?)? * scale as f64)?;
            let want = candle_nn::ops::softmax(&att, D::Minus1)?.matmul(&ve)?;
            let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff < 1e-5,
                "({heads},{kv_heads},{len},{cap},{d}): off by {diff}"
            );
        }
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() -> Result<()> {
        if !CachedAttention::available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let op = CachedAttention { scale: 1.0 };
        let q = Tensor::zeros((1, 3, 1, 16), candle_core::DType::F32, &dev)?;
        let k = Tensor::zeros((1, 2, 4, 16), candle_core::DType::F32, &dev)?;
        assert!(q.apply_op3_no_bwd(&k, &k, &op).is_err(), "3 heads over 2");
        let q2 = Tensor::zeros((1, 2, 2, 16), candle_core::DType::F32, &dev)?;
        assert!(q2.apply_op3_no_bwd(&k, &k, &op).is_err(), "two query rows");
        Ok(())
    }
}
