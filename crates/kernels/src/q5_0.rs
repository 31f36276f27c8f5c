//! A Q5_0 matrix multiplication for x86-64 with AVX2 and FMA, at the file's
//! 5.5 bits per weight.
//!
//! Written by hand because candle 0.11 runs Q5_0 with scalar code, and the
//! packaged Qwen2.5-Coder-0.5B file is mostly Q5_0. Until this module ragd
//! served a Q8_0 copy of it (exact: every Q5_0 value is a Q8_0 value), but
//! decoding is bound by reading the weights, and the copy is 9 bits per weight
//! against llama.cpp's 5.5: decode stayed at 0.8–1.0× llama.cpp's.
//!
//! The weights are laid out as the Q8_0 kernel's ([`crate::q8_0`]): groups of
//! [`RN`] rows, one vector step holding four values of each of the eight rows,
//! prompt values broadcast to every lane. What differs is the unpacking: a
//! 32-byte vector of low nibbles gives two steps (`& 0xF` and `>> 4`), and one
//! 32-byte vector of fifth bits (bit `t` of lane byte `4r + b` is the fifth bit
//! of value `4t + b` of row `r`) gives each step's by one mask and one shift.
//! The values are then unsigned (0–31), so they multiply the signed
//! activations directly (`_mm256_maddubs_epi16`, no sign trick), and the
//! offset of 16 is taken off each block's integer sum with the block's sum of
//! activations: each block's dot product is exact in integers, as in ggml's
//! `vec_dot_q5_0_q8_0` (the Q8_0 copy was not quite the file: re-quantizing
//! rounds each value again).
#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};

use crate::prepared::{Groups, SharedBytes};
use crate::q8_0::{kernel_available, matmul_op, quantize_rows, vnni_available, QK, RM, RN};
#[cfg(target_arch = "x86_64")]
use crate::q8_0::{store_lanes, walk_panel, SendPtr};

/// Bytes of one Q5_0 block in a GGUF file: an f16 scale, 32 fifth bits and
/// 16 bytes of low nibbles.
const BLOCK_BYTES: usize = 2 + 4 + QK / 2;

/// An `n × k` Q5_0 weight matrix in groups of [`RN`] rows (the last padded
/// with zero rows).
pub struct Q5Matrix {
    n: usize,
    k: usize,
    /// `ceil(n/RN) · k/32` groups, group-major.
    groups: Groups<Group>,
}

/// Block `l` of [`RN`] consecutive weight rows. For row `r` and value `v`
/// (0–31) of the block, value `q = nibble | fifth << 4`:
/// * `lo[t][4r + b]` holds the low nibbles of values `4t + b` (bits 0–3) and
///   `16 + 4t + b` (bits 4–7), `t` in 0..4;
/// * bit `t` of `hi[4r + b]` is the fifth bit of value `4t + b`, `t` in 0..8;
/// * `d[r]` is the row's block scale (f16 bits).
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Group {
    lo: [[u8; 4 * RN]; 4],
    hi: [u8; 4 * RN],
    d: [u16; RN],
}

impl std::fmt::Debug for Q5Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q5Matrix({}x{})", self.n, self.k)
    }
}

/// The 32 values (0–31, before the offset of 16) and the scale of a GGUF
/// Q5_0 block, as ggml's `dequantize_row_q5_0` reads them.
fn block_values(block: &[u8]) -> ([u8; QK], u16) {
    let d = u16::from_le_bytes([block[0], block[1]]);
    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    let qs = &block[6..];
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = (qs[j] & 0xF) | ((((qh >> j) & 1) as u8) << 4);
        q[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
    }
    (q, d)
}

impl Q5Matrix {
    /// Re-lays a Q5_0 tensor of shape `(n, k)`; `None` for other types and
    /// shapes.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let Ok((n, k)) = t.shape().dims2() else {
            return Ok(None);
        };
        if t.dtype() != GgmlDType::Q5_0 || k % QK != 0 || n == 0 || !t.device().is_cpu() {
            return Ok(None);
        }
        Self::from_bytes(n, k, &t.data()?).map(Some)
    }

    /// From the bytes of a Q5_0 tensor of shape `(n, k)` as GGUF stores it
    /// (read in place from a mapped file, without a copy in a `QTensor`).
    pub fn from_bytes(n: usize, k: usize, data: &[u8]) -> Result<Self> {
        if !k.is_multiple_of(QK) || n == 0 {
            candle_core::bail!("a Q5_0 matrix of {n}x{k}: columns must be a multiple of {QK}");
        }
        let blocks = n * k / QK;
        if data.len() != blocks * BLOCK_BYTES {
            candle_core::bail!(
                "Q5_0 tensor of {n}x{k} has {} bytes, expected {}",
                data.len(),
                blocks * BLOCK_BYTES
            );
        }
        let kb = k / QK;
        let zero = Group {
            lo: [[0; 4 * RN]; 4],
            hi: [0; 4 * RN],
            d: [0; RN],
        };
        let mut groups = vec![zero; n.div_ceil(RN) * kb];
        crate::par_chunks_mut(&mut groups, kb, |rg, groups| {
            for row in rg * RN..(rg * RN + RN).min(n) {
                let r = row % RN;
                let blocks = &data[row * kb * BLOCK_BYTES..(row + 1) * kb * BLOCK_BYTES];
                for (g, block) in groups.iter_mut().zip(blocks.chunks_exact(BLOCK_BYTES)) {
                    let (q, d) = block_values(block);
                    g.d[r] = d;
                    for t in 0..4 {
                        for b in 0..4 {
                            g.lo[t][4 * r + b] =
                                (q[4 * t + b] & 0xF) | ((q[16 + 4 * t + b] & 0xF) << 4);
                        }
                    }
                    for t in 0..8 {
                        for b in 0..4 {
                            g.hi[4 * r + b] |= ((q[4 * t + b] >> 4) & 1) << t;
                        }
                    }
                }
            }
        });
        Ok(Self {
            n,
            k,
            groups: Groups::Owned(groups),
        })
    }

    /// The matrix as an earlier load laid it out, read in place from a
    /// prepared file: its groups at `offset` of `bytes` (see
    /// [`crate::prepared`]).
    pub fn from_prepared(n: usize, k: usize, bytes: SharedBytes, offset: usize) -> Result<Self> {
        if !k.is_multiple_of(QK) || n == 0 {
            candle_core::bail!("a Q5_0 matrix of {n}x{k}: columns must be a multiple of {QK}");
        }
        let groups = Groups::mapped(bytes, offset, n.div_ceil(RN) * (k / QK))?;
        Ok(Self { n, k, groups })
    }

    /// The laid-out groups' bytes, which a prepared file keeps.
    pub fn prepared_bytes(&self) -> &[u8] {
        self.groups.as_bytes()
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Weight row `j` as f32 values.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let kb = self.k / QK;
        let groups = &self.groups[(j / RN) * kb..(j / RN + 1) * kb];
        let r = j % RN;
        for (g, out) in groups.iter().zip(out.chunks_exact_mut(QK)) {
            let d = half::f16::from_bits(g.d[r]).to_f32();
            for (v, o) in out.iter_mut().enumerate() {
                let (t, b) = (v / 4, v % 4);
                let nibble = if t < 4 {
                    g.lo[t][4 * r + b] & 0xF
                } else {
                    g.lo[t - 4][4 * r + b] >> 4
                };
                let q = nibble | (((g.hi[4 * r + b] >> t) & 1) << 4);
                *o = (q as i32 - 16) as f32 * d;
            }
        }
    }

    /// `dst[i][j] = Σ_l lhs[i][l] · W[j][l]` for `m` rows of `lhs` (`m × k`).
    pub fn matmul(&self, lhs: &[f32], m: usize, dst: &mut [f32]) {
        self.matmul_with(lhs, m, dst, vnni_available())
    }

    /// [`Self::matmul`] with the AVX-512 VNNI instructions on or off.
    fn matmul_with(&self, lhs: &[f32], m: usize, dst: &mut [f32], vnni: bool) {
        let vnni = vnni && vnni_available();
        assert_eq!(lhs.len(), m * self.k, "lhs is not {m}x{}", self.k);
        assert_eq!(dst.len(), m * self.n, "dst is not {m}x{}", self.n);
        assert!(
            kernel_available(),
            "the Q5_0 kernel needs AVX2, FMA and F16C"
        );
        let kb = self.k / QK;
        let mut a_qs = vec![[0i8; QK]; m * kb];
        let mut a_d = vec![0f32; m * kb];
        quantize_rows(lhs, &mut a_qs, &mut a_d);
        // 16 × each block's sum of activations: the offset of the weights.
        let a_off = crate::q8_0::block_sums(&a_qs, 16);
        #[cfg(target_arch = "x86_64")]
        {
            let a = Operand {
                qs: a_qs.as_ptr(),
                d: a_d.as_ptr(),
                off: a_off.as_ptr(),
                rows: m,
                kb,
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

impl CustomOp1 for Q5Matrix {
    fn name(&self) -> &'static str {
        "q5_0-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        matmul_op(self.name(), self.k, self.n, storage, layout, |x, m, dst| {
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
    /// 16 × each block's sum.
    off: *const i32,
    rows: usize,
    kb: usize,
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

/// Generates a panel and a tile function for one instruction set; `$dot` adds
/// to eight i32 sums the products of unsigned weights and signed activations,
/// four per lane.
macro_rules! kernel {
    ($panel:ident, $tile:ident, $features:literal, $dot:expr) => {
        /// All prompt rows against the weight row groups `groups`.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $panel(a: &Operand, w: &Weights, groups: std::ops::Range<usize>, out: *mut f32) {
            let tile = |i: usize, g: usize| {
                // SAFETY: as for the panel (the caller checked the features).
                unsafe {
                    match RM.min(a.rows - i) {
                        4 => $tile::<4>(a, w, i, g, out),
                        3 => $tile::<3>(a, w, i, g, out),
                        2 => $tile::<2>(a, w, i, g, out),
                        _ => $tile::<1>(a, w, i, g, out),
                    }
                }
            };
            walk_panel(a.rows, groups, tile);
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
                let low = _mm256_set1_epi8(0xF);
                let mut acc = [_mm256_setzero_ps(); M];
                let group = w.groups.add(g * kb);
                for l in 0..kb {
                    let block = &*group.add(l);
                    let hi = _mm256_loadu_si256(block.hi.as_ptr() as *const __m256i);
                    let mut isum = [_mm256_setzero_si256(); M];
                    for t in 0..QK / 4 {
                        let lo = _mm256_loadu_si256(block.lo[t % 4].as_ptr() as *const __m256i);
                        let nibble = if t < 4 {
                            _mm256_and_si256(lo, low)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16(lo, 4), low)
                        };
                        let wq = _mm256_or_si256(nibble, crate::q8_0::fifth_bit(hi, t));
                        for (i, isum) in isum.iter_mut().enumerate() {
                            // Values 4t..4t+4 of prompt row i0+i, in every lane.
                            let aq = (a.qs.add((i0 + i) * kb + l) as *const i8).add(4 * t);
                            let aq = _mm256_set1_epi32(std::ptr::read_unaligned(aq as *const i32));
                            // At most 2·31·127 per pair: no saturation.
                            *isum = $dot(*isum, wq, aq);
                        }
                    }
                    let wd = _mm256_cvtph_ps(_mm_loadu_si128(block.d.as_ptr() as *const __m128i));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let idx = (i0 + i) * kb + l;
                        // Σ (q - 16)·a = Σ q·a - 16·Σ a, exactly.
                        let sum = _mm256_sub_epi32(isum[i], _mm256_set1_epi32(*a.off.add(idx)));
                        let ad = _mm256_broadcast_ss(&*a.d.add(idx));
                        *acc =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(wd, ad), *acc);
                    }
                }
                let cols = RN.min(w.n - g * RN);
                for (i, &acc) in acc.iter().enumerate() {
                    store_lanes(acc, out.add((i0 + i) * w.n + g * RN), cols);
                }
            }
        }
    };
}

kernel!(panel_avx2, tile_avx2, "avx2,fma,f16c", |acc, u, s| {
    _mm256_add_epi32(
        acc,
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)),
    )
});
kernel!(
    panel_vnni,
    tile_vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    |acc, u, s| _mm256_dpbusd_epi32(acc, u, s)
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::pseudo_random;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    #[test]
    fn rows_dequantize_as_candle_does() -> Result<()> {
        let w = Tensor::from_vec(pseudo_random(13 * 96, 3), (13, 96), &Device::Cpu)?;
        let qt = QTensor::quantize(&w, GgmlDType::Q5_0)?;
        let want: Vec<Vec<f32>> = qt.dequantize(&Device::Cpu)?.to_vec2()?;
        let ours = Q5Matrix::from_qtensor(&qt)?.expect("a Q5_0 matrix");
        for (j, want) in want.iter().enumerate() {
            let mut got = vec![0f32; 96];
            ours.dequantize_row(j, &mut got);
            assert_eq!(&got, want, "row {j}");
        }
        Ok(())
    }

    /// Against candle's Q5_0 product (scalar, the same activation
    /// quantization) within float rounding, AVX2 and VNNI alike, and each row
    /// the same alone as among others; shapes exercise every tile edge.
    #[test]
    fn matches_candle_and_rows_are_independent() -> Result<()> {
        if !kernel_available() {
            eprintln!("skipped: no AVX2/FMA/F16C");
            return Ok(());
        }
        let dev = Device::Cpu;
        for &(m, k, n) in crate::tests::EDGE_SHAPES {
            let w = Tensor::from_vec(pseudo_random(n * k, (n * k) as u64), (n, k), &dev)?;
            let qt = QTensor::quantize(&w, GgmlDType::Q5_0)?;
            let ours = Q5Matrix::from_qtensor(&qt)?.expect("a Q5_0 matrix");
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
            ours.matmul_with(&xs, m, &mut vnni, true);
            assert_eq!(got, vnni, "({m},{k},{n}) AVX2 and VNNI");
            for i in 0..m {
                let mut one = vec![0f32; n];
                ours.matmul(&xs[i * k..(i + 1) * k], 1, &mut one);
                assert_eq!(one, got[i * n..(i + 1) * n], "({m},{k},{n}) row {i}");
            }
        }
        Ok(())
    }
}
