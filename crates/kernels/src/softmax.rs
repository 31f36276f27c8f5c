//! Softmax over the last dimension with a vectorisable exp, for the
//! embedder's attention (plain rows) and the generator's (scaled, each query
//! row limited to the keys it may see).
//!
//! candle's `softmax_last_dim` calls libm's scalar `expf` per element, and
//! the generator's attention before it made three more passes over the
//! scores, each into a fresh buffer (divide by √d, broadcast −∞ for the
//! mask, select): for Qwen2.5-0.5B reading a 512-token prompt that is 14
//! heads × 512 × 512 scores, 15 MB per layer per pass. Here the scale, the
//! mask (as each row's range of visible keys) and the softmax are one pass,
//! and a row's result depends only on its own visible keys: a query row in a
//! masked prompt and the same query decoded alone (its keys narrowed to the
//! visible ones) get the same bits.
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use crate::contiguous_f32;

/// e^x for x ≤ 0 (Cephes' expf: range reduction by ln 2, a degree-5
/// polynomial; relative error about 1e-7), branch-free so that it
/// vectorises. Below -87 it returns about 1.6e-38 instead of 0.
#[inline(always)]
pub fn exp_neg(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let p = 1.987_569_1e-4f32
        .mul_add(r, 1.398_199_9e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 1.666_666_5e-1)
        .mul_add(r, 0.5);
    let e = p.mul_add(r * r, r) + 1.0;
    // 2^n built from n + 127 in the low mantissa bits of 2^23 + n + 127,
    // shifted into the exponent field: `n as i32` is a saturating cast,
    // compiled as a scalar compare-and-convert per lane, which made this loop
    // scalar (softmax was 7.5 % of an embedding batch, then 2.5 %).
    let biased = (n + (127.0 + 8_388_608.0)).to_bits();
    f32::from_bits(biased.wrapping_shl(23)) * e
}

/// Reduces `x` with `f` over 16 independent lanes (vectorisable), then the lanes.
#[inline(always)]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = f(*a, v);
        }
    }
    let mut r = acc.into_iter().fold(init, &f);
    for &v in chunks.remainder() {
        r = f(r, v);
    }
    r
}

/// One row: `y = softmax(scale · x)` over `x`'s elements (separate passes
/// without a carried dependency, so that each one vectorises).
#[inline(always)]
fn softmax_row(x: &[f32], y: &mut [f32], scale: f32) {
    if x.is_empty() {
        return;
    }
    let max = lanes(x, f32::NEG_INFINITY, f32::max) * scale;
    for (y, &x) in y.iter_mut().zip(x) {
        *y = exp_neg(x * scale - max);
    }
    let inv = 1.0 / lanes(y, 0.0, |a, b| a + b);
    y.iter_mut().for_each(|v| *v *= inv);
}

/// [`softmax_row`] of a row in place (scale 1): the embedder's attention
/// ([`crate::attention`]) on the scores it has just made.
#[inline(always)]
pub(crate) fn softmax_row_in_place(y: &mut [f32]) {
    if y.is_empty() {
        return;
    }
    let max = lanes(y, f32::NEG_INFINITY, f32::max);
    y.iter_mut().for_each(|v| *v = exp_neg(*v - max));
    let inv = 1.0 / lanes(y, 0.0, |a, b| a + b);
    y.iter_mut().for_each(|v| *v *= inv);
}

/// Each query's visible keys, `lo..hi`.
pub type VisibleKeys = Arc<[(u32, u32)]>;

/// `softmax(scale · scores)` over the last dimension of attention scores
/// `(…, rows, keys)`, where row `r` is query `r % queries` and, with
/// `visible`, sees only keys `visible[query].0 .. visible[query].1` (the rest
/// get 0). Rows are spread over the pool's threads.
pub fn scaled_masked_softmax(
    scores: &Tensor,
    scale: f32,
    queries: usize,
    visible: Option<VisibleKeys>,
) -> Result<Tensor> {
    scores.contiguous()?.apply_op1_no_bwd(&ScaledMaskedSoftmax {
        scale,
        queries: queries.max(1),
        visible,
    })
}

struct ScaledMaskedSoftmax {
    scale: f32,
    queries: usize,
    visible: Option<VisibleKeys>,
}

impl CustomOp1 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "ragd-scaled-masked-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let data = contiguous_f32(storage, layout, self.name())?;
        let keys = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let rows = data.len() / keys;
        if let Some(v) = &self.visible {
            if v.len() != self.queries || v.iter().any(|&(lo, hi)| lo > hi || hi as usize > keys) {
                candle_core::bail!(
                    "{}: visible ranges do not fit {rows} rows of {keys} keys",
                    self.name()
                );
            }
        }
        let mut out = vec![0f32; data.len()];
        let row = |r: usize, y: &mut [f32]| {
            let x = &data[r * keys..(r + 1) * keys];
            match &self.visible {
                None => softmax_row(x, y, self.scale),
                Some(v) => {
                    let (lo, hi) = v[r % self.queries];
                    let (lo, hi) = (lo as usize, hi as usize);
                    softmax_row(&x[lo..hi], &mut y[lo..hi], self.scale);
                }
            }
        };
        // A few rows (decoding) on this thread; a prompt's over the pool.
        if rows * keys < 1 << 15 {
            for (r, y) in out.chunks_mut(keys).enumerate() {
                row(r, y);
            }
        } else {
            crate::par_chunks_mut(&mut out, keys, row);
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn exp_neg_is_expf() {
        for i in 0..=8700 {
            let x = -(i as f32) / 100.0;
            let (a, b) = (exp_neg(x), x.exp());
            assert!((a - b).abs() <= 3e-7 * b, "exp({x}) = {a}, expf {b}");
        }
    }

    #[test]
    fn softmax_matches_candles() {
        let xs: Vec<f32> = (0..3 * 5 * 37)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
            .collect();
        let t = Tensor::from_vec(xs, (3, 5, 37), &Device::Cpu).unwrap();
        let theirs: Vec<f32> = candle_nn::ops::softmax_last_dim(&t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut ours: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        ours.chunks_mut(37).for_each(softmax_row_in_place);
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() <= 1e-6 * b.max(1e-3), "{a} vs {b}");
        }
        let scaled: Vec<f32> = scaled_masked_softmax(&(t.clone() * 4.0).unwrap(), 0.25, 5, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in scaled.iter().zip(&theirs) {
            assert!((a - b).abs() <= 1e-6 * b.max(1e-3), "{a} vs {b}");
        }
    }

    /// Masked rows equal candle's softmax over −∞-masked scores, and a row
    /// equals the same query computed alone over its visible keys, bit for
    /// bit, whatever the rows beside it (big enough to run on the pool).
    #[test]
    fn a_masked_row_is_its_visible_keys_alone() {
        let (heads, queries, keys) = (6, 40, 300);
        let xs = crate::tests::pseudo_random(heads * queries * keys, 7);
        let xs: Vec<f32> = xs.iter().map(|v| v * 20.0).collect();
        let t = Tensor::from_vec(xs.clone(), (heads, queries, keys), &Device::Cpu).unwrap();
        let visible: Arc<[(u32, u32)]> = (0..queries)
            .map(|i| ((i as u32 * 3).saturating_sub(50), 260 + i as u32))
            .collect();
        let scale = 0.125f32;
        let got: Vec<f32> = scaled_masked_softmax(&t, scale, queries, Some(visible.clone()))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let masked: Vec<f32> = (0..heads * queries * keys)
            .map(|e| {
                let (r, j) = (e / keys, e % keys);
                let (lo, hi) = visible[r % queries];
                if (lo as usize..hi as usize).contains(&j) {
                    xs[e] * scale
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let want: Vec<f32> = candle_nn::ops::softmax_last_dim(
            &Tensor::from_vec(masked, (heads, queries, keys), &Device::Cpu).unwrap(),
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * b.max(1e-3), "{a} vs {b}");
        }
        for r in [0, 17, heads * queries - 1] {
            let (lo, hi) = visible[r % queries];
            let (lo, hi) = (lo as usize, hi as usize);
            let alone = Tensor::from_vec(
                xs[r * keys + lo..r * keys + hi].to_vec(),
                (1, hi - lo),
                &Device::Cpu,
            )
            .unwrap();
            let alone: Vec<f32> = scaled_masked_softmax(&alone, scale, 1, None)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(
                &got[r * keys + lo..r * keys + hi],
                alone.as_slice(),
                "row {r}"
            );
            assert!(got[r * keys..r * keys + lo].iter().all(|&v| v == 0.0));
            assert!(got[r * keys + hi..(r + 1) * keys].iter().all(|&v| v == 0.0));
        }
    }
}
