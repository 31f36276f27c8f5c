//! Q4_K, Q5_K and Q6_K matrix products for x86-64 with AVX2 and FMA, on the
//! weights exactly as the GGUF file stores them.
//!
//! Written by hand because candle 0.11's kernels for these types were half of
//! llama.cpp's decode speed on the K-quant files people download
//! (Qwen2.5-Coder-1.5B Q4_K_M on a 2-core AMD EPYC, AVX2: 7.6 against 14.9
//! tokens/s, `bench/compare-llamacpp`). perf put 47 % of decode in
//! `repack_x86::matmul_unit_256`: candle re-lays Q4_K weights into 16-row tiles
//! whose block scales are widened to `f32` (4.5 bits per weight become 6.5,
//! and decoding is bound by reading the weights), and its Q6_K path for one row
//! is a per-row dot product.
//!
//! What this module does instead, the way ggml's own CPU kernels do:
//!
//! * the weights stay in the file's blocks (256 values, 144 bytes for Q4_K,
//!   176 for Q5_K and 210 for Q6_K), so decoding reads as few bytes as
//!   llama.cpp;
//! * the activations are quantized per 256 values (`Q8_K`: an `f32` scale,
//!   signed bytes, and the sums of each 16 of them), so a block's whole dot
//!   product is integer arithmetic: `_mm256_maddubs_epi16` on the unsigned
//!   weight values and the signed activations, `_mm256_madd_epi16` with the
//!   6-bit (Q4_K, Q5_K) or 8-bit (Q6_K) sub-block scales, and the minimums (Q4_K, Q5_K) or
//!   the offset of 32 (Q6_K) taken off through the activation sums — one
//!   conversion to float per block;
//! * a weight row's block is unpacked once and multiplied with up to [`RM`]
//!   prompt rows; prompt rows go in blocks of 48 (`q8_0::ROW_BLOCK`) so a thread's
//!   weights are read once per block, from L1, while the block's activations
//!   stay in L2 (as the Q8_0 kernel);
//! * each output is computed by the same sequence of operations whatever the
//!   number of rows, so a drafted token checked among others gets exactly the
//!   logits it gets alone.
//!
//! The `unsafe` code here: SIMD intrinsics behind a run-time CPU check, and raw
//! pointers so the pool's threads write disjoint parts of one output.
#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use std::sync::Arc;

use crate::kquant_prompt::{Q4Tiles, Q5Tiles, Q6Tiles};
use crate::prepared::SharedBytes;
#[cfg(target_arch = "x86_64")]
use crate::q8_0::walk_panel;
use crate::q8_0::{matmul_op, SendPtr, FEW_ROWS, RM};

/// Values per block (ggml's `QK_K`).
const QK: usize = 256;

/// The K-quant types this module runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// 4-bit values, 6-bit scales and minimums per 32 values.
    Q4K,
    /// 5-bit values (a fifth bit beside Q4_K's nibbles), Q4_K's scales and
    /// minimums.
    Q5K,
    /// 6-bit values, 8-bit scales per 16 values.
    Q6K,
}

impl Kind {
    /// The GGUF type.
    fn dtype(self) -> GgmlDType {
        match self {
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q5K => Some(Self::Q5K),
            GgmlDType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    /// Bytes of one block of 256 values.
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }
}

/// An `n × k` Q4_K or Q6_K weight matrix, one row per output, in the file's
/// blocks.
pub struct KMatrix {
    kind: Kind,
    n: usize,
    k: usize,
    /// Where the file's blocks are.
    source: Source,
    /// candle's product, for prompts this module does not take
    /// ([`Self::takes_prompts`]): made on the first such prompt, from the
    /// tensor or a copy of the mapped bytes.
    candle: std::sync::OnceLock<QMatMul>,
    /// The weights laid out for prompts where [`crate::kquant_prompt::pays`],
    /// made on the first prompt.
    prompt: std::sync::OnceLock<PromptTiles>,
}

impl std::fmt::Debug for KMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KMatrix({:?}, {}x{})", self.kind, self.n, self.k)
    }
}

/// The blocks of a [`KMatrix`].
enum Source {
    /// A tensor read into memory.
    Tensor(Arc<QTensor>),
    /// `len` bytes at `offset` of a memory-mapped model file: nothing read
    /// or copied at load, the pages read as the products first touch them
    /// (as llama.cpp maps its files), and the page cache's rather than the
    /// process's own (Qwen2.5-Coder-1.5B: about 1 GB of K-quant weights).
    Mapped {
        bytes: SharedBytes,
        offset: usize,
        len: usize,
    },
}

/// A K-quant matrix laid out for prompts ([`crate::kquant_prompt`]).
enum PromptTiles {
    Q4(Q4Tiles),
    Q5(Q5Tiles),
    Q6(Q6Tiles),
}

/// Unpacks Q4_K's eight 6-bit scales and minimums (ggml's `get_scale_min_k4`),
/// byte by byte: the reference [`q4k_scales_packed`] is checked against.
#[cfg(test)]
fn q4k_scales(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        if j < 4 {
            sc[j] = s[j] & 63;
            mn[j] = s[j + 4] & 63;
        } else {
            sc[j] = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
            mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        }
    }
    (sc, mn)
}

/// Q4_K's eight 6-bit scales and minimums (ggml's `get_scale_min_k4`)
/// without branches, on three 32-bit words (ggml's `utmp` form): the scales
/// in bytes 0–7, the minimums in 8–15.
#[inline(always)]
pub(crate) fn q4k_scales_packed(s: &[u8]) -> [u8; 16] {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (u0, u1, u2) = (w(0), w(1), w(2));
    let sc_lo = u0 & KMASK1;
    let sc_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let mn_lo = u1 & KMASK1;
    let mn_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    let mut out = [0u8; 16];
    for (i, word) in [sc_lo, sc_hi, mn_lo, mn_hi].into_iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&word.to_le_bytes());
    }
    out
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

impl KMatrix {
    fn new(kind: Kind, n: usize, k: usize, source: Source) -> Self {
        Self {
            kind,
            n,
            k,
            source,
            candle: std::sync::OnceLock::new(),
            prompt: std::sync::OnceLock::new(),
        }
    }

    /// Wraps a Q4_K or Q6_K tensor of shape `(n, k)` (no copy); `None` for
    /// other types and shapes.
    pub fn from_qtensor(t: &Arc<QTensor>) -> Result<Option<Self>> {
        let Some(kind) = Kind::of(t.dtype()) else {
            return Ok(None);
        };
        let Ok((n, k)) = t.shape().dims2() else {
            return Ok(None);
        };
        if k % QK != 0 || n == 0 || !t.device().is_cpu() {
            return Ok(None);
        }
        let bytes = t.data()?.len();
        let want = n * k / QK * kind.block_bytes();
        if bytes != want {
            candle_core::bail!("{kind:?} tensor of {n}x{k} has {bytes} bytes, expected {want}");
        }
        Ok(Some(Self::new(kind, n, k, Source::Tensor(Arc::clone(t)))))
    }

    /// A `dtype` matrix of shape `(n, k)` whose blocks are `bytes[offset..]`
    /// (a memory-mapped model file), read in place; `None` for other types
    /// and shapes, an error where the bytes fall short.
    pub fn from_mapped(
        dtype: GgmlDType,
        n: usize,
        k: usize,
        bytes: SharedBytes,
        offset: usize,
    ) -> Result<Option<Self>> {
        let Some(kind) = Kind::of(dtype) else {
            return Ok(None);
        };
        if !k.is_multiple_of(QK) || n == 0 {
            return Ok(None);
        }
        let len = n * k / QK * kind.block_bytes();
        let have = (*bytes).as_ref().len();
        if offset.checked_add(len).is_none_or(|end| end > have) {
            candle_core::bail!(
                "{kind:?} tensor of {n}x{k} needs {len} bytes at {offset}, the file has {have}"
            );
        }
        Ok(Some(Self::new(
            kind,
            n,
            k,
            Source::Mapped { bytes, offset, len },
        )))
    }

    /// The file's blocks, row by row.
    fn data(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        match &self.source {
            Source::Tensor(t) => t.data(),
            Source::Mapped { bytes, offset, len } => Ok(std::borrow::Cow::Borrowed(
                &(**bytes).as_ref()[*offset..offset + len],
            )),
        }
    }

    /// candle's product over the same weights (see [`Self::candle`]).
    pub fn candle(&self) -> Result<&QMatMul> {
        if let Some(m) = self.candle.get() {
            return Ok(m);
        }
        let tensor = match &self.source {
            Source::Tensor(t) => Arc::clone(t),
            Source::Mapped { .. } => {
                Arc::new(candle_core::quantized::ggml_file::qtensor_from_ggml(
                    self.kind.dtype(),
                    &self.data()?,
                    vec![self.n, self.k],
                    &candle_core::Device::Cpu,
                )?)
            }
        };
        let m = QMatMul::from_arc(tensor)?;
        // Another thread may have made it meanwhile: the same.
        let _ = self.candle.set(m);
        Ok(self.candle.get().expect("set above"))
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Weight row `j` as f32 values (ggml's `dequantize_row_q4_K` / `_q6_K`).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) -> Result<()> {
        let bb = self.kind.block_bytes();
        let data = self.data()?;
        let row = &data[j * (self.k / QK) * bb..(j + 1) * (self.k / QK) * bb];
        for (b, y) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
            match self.kind {
                Kind::Q4K => {
                    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                    let scm = q4k_scales_packed(&b[4..16]);
                    let (sc, mn) = (&scm[..8], &scm[8..]);
                    let qs = &b[16..144];
                    for c in 0..4 {
                        let q = &qs[32 * c..32 * c + 32];
                        let (d1, m1) = (d * sc[2 * c] as f32, dmin * mn[2 * c] as f32);
                        let (d2, m2) = (d * sc[2 * c + 1] as f32, dmin * mn[2 * c + 1] as f32);
                        for l in 0..32 {
                            y[64 * c + l] = d1 * (q[l] & 0xF) as f32 - m1;
                            y[64 * c + 32 + l] = d2 * (q[l] >> 4) as f32 - m2;
                        }
                    }
                }
                Kind::Q5K => {
                    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                    let scm = q4k_scales_packed(&b[4..16]);
                    let (sc, mn) = (&scm[..8], &scm[8..]);
                    let (qh, qs) = (&b[16..48], &b[48..176]);
                    for c in 0..4 {
                        let q = &qs[32 * c..32 * c + 32];
                        let (d1, m1) = (d * sc[2 * c] as f32, dmin * mn[2 * c] as f32);
                        let (d2, m2) = (d * sc[2 * c + 1] as f32, dmin * mn[2 * c + 1] as f32);
                        for l in 0..32 {
                            let h1 = ((qh[l] >> (2 * c)) & 1) << 4;
                            let h2 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
                            y[64 * c + l] = d1 * ((q[l] & 0xF) | h1) as f32 - m1;
                            y[64 * c + 32 + l] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
                        }
                    }
                }
                Kind::Q6K => {
                    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                    let d = f16_at(b, 208);
                    for h in 0..2 {
                        let (ql, qh) = (&ql[64 * h..], &qh[32 * h..]);
                        let sc = &sc[8 * h..];
                        let y = &mut y[128 * h..];
                        for l in 0..32 {
                            let is = l / 16;
                            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// `dst[i][j] = Σ_l lhs[i][l] · W[j][l]` for `m` rows of `lhs` (`m × k`).
    pub fn matmul(&self, lhs: &[f32], m: usize, dst: &mut [f32]) -> Result<()> {
        if m > FEW_ROWS && self.tiles_prompts() {
            if self.prompt.get().is_none() {
                let data = self.data()?;
                let tiles = match self.kind {
                    Kind::Q4K => PromptTiles::Q4(Q4Tiles::from_blocks(self.n, self.k, &data)),
                    Kind::Q6K => PromptTiles::Q6(Q6Tiles::from_blocks(self.n, self.k, &data)),
                    Kind::Q5K => PromptTiles::Q5(Q5Tiles::from_blocks(self.n, self.k, &data)),
                };
                // Another thread may have laid them out meanwhile: the same.
                let _ = self.prompt.set(tiles);
            }
            if let Some(tiles) = self.prompt.get() {
                match tiles {
                    PromptTiles::Q4(t) => t.matmul(lhs, m, dst),
                    PromptTiles::Q5(t) => t.matmul(lhs, m, dst),
                    PromptTiles::Q6(t) => t.matmul(lhs, m, dst),
                }
                return Ok(());
            }
        }
        self.matmul_with(lhs, m, dst, zmm_available())
    }

    /// Whether prompts (more than [`FEW_ROWS`] rows) are multiplied here
    /// rather than by candle's repacked tiles: where [`crate::kquant_prompt`]
    /// pays, in its tiles (every K-quant on AVX2 without VNNI, Q4_K and Q5_K
    /// with VNNI); Q5_K everywhere (elsewhere on the file's blocks) —
    /// candle 0.11 has no tiles for it, and this module's file-block kernel
    /// is faster on prompts too (`matmul_speed 256`: 60–67 billion
    /// multiply-adds per second against candle's 38–40, on the AVX2-only
    /// host).
    pub fn takes_prompts(&self) -> bool {
        Self::takes_prompts_of(self.kind)
    }

    /// [`Self::takes_prompts`] for a matrix of `kind`.
    fn takes_prompts_of(kind: Kind) -> bool {
        kind == Kind::Q5K || Self::tiles_prompts_of(kind)
    }

    /// Whether a `dtype` matrix's prompts are multiplied here
    /// ([`Self::takes_prompts`]; `false` for other types).
    pub fn takes_prompts_for(dtype: GgmlDType) -> bool {
        Kind::of(dtype).is_some_and(Self::takes_prompts_of)
    }

    /// Whether prompts go to [`crate::kquant_prompt`]'s tiles.
    fn tiles_prompts(&self) -> bool {
        Self::tiles_prompts_of(self.kind)
    }

    fn tiles_prompts_of(kind: Kind) -> bool {
        crate::kquant_prompt::pays() || (kind != Kind::Q6K && crate::kquant_prompt::pays_vnni())
    }

    /// [`Self::matmul`] with the 512-bit Q4_K tile on or off (`zmm` is only
    /// honoured where the CPU has it); the results are the same bits.
    fn matmul_with(&self, lhs: &[f32], m: usize, dst: &mut [f32], zmm: bool) -> Result<()> {
        let zmm = zmm && zmm_available();
        assert_eq!(lhs.len(), m * self.k, "lhs is not {m}x{}", self.k);
        assert_eq!(dst.len(), m * self.n, "dst is not {m}x{}", self.n);
        assert!(
            crate::q8_0::kernel_available(),
            "the K-quant kernels need AVX2, FMA and F16C"
        );
        let group = match self.kind {
            Kind::Q4K | Kind::Q5K => 32,
            Kind::Q6K => 16,
        };
        let a = Q8K::quantize(lhs, m, self.k, group);
        let data = self.data()?;
        #[cfg(target_arch = "x86_64")]
        {
            let view = View {
                a: &a,
                w: data.as_ptr(),
                row_bytes: self.k / QK * self.kind.block_bytes(),
                n: self.n,
                kind: self.kind,
            };
            let out = SendPtr(dst.as_mut_ptr());
            // Work items are weight rows; the pool hands each thread a
            // contiguous range of them, walked over all prompt rows.
            candle_core::utils::barrier_pool().execute_chunked(self.n, |rows| {
                let out = &out;
                // SAFETY: the CPU features were checked above; each (row, col)
                // of dst is written by exactly one range, all indices in bounds.
                if zmm {
                    unsafe { panel_zmm(&view, rows, out.0) }
                } else {
                    unsafe { panel(&view, rows, out.0) }
                }
            });
        }
        Ok(())
    }
}

impl CustomOp1 for KMatrix {
    fn name(&self) -> &'static str {
        "k-quant-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        matmul_op(self.name(), self.k, self.n, storage, layout, |x, m, dst| {
            self.matmul(x, m, dst)
        })
    }
}

/// Activation rows quantized per 256 values, as ggml's `quantize_row_q8_K`:
/// one `f32` scale per block and signed bytes; besides, each group of
/// `group` values' sum times the block's scale, which the minimums (Q4_K,
/// groups of 32) or the offset of 32 (Q6_K, groups of 16) are multiplied with.
struct Q8K {
    qs: Vec<i8>,
    d: Vec<f32>,
    /// `k/group` scaled sums per row.
    sums: Vec<f32>,
    /// Blocks per row.
    kb: usize,
}

impl Q8K {
    fn quantize(xs: &[f32], m: usize, k: usize, group: usize) -> Self {
        let kb = k / QK;
        let mut a = Self {
            qs: vec![0; m * k],
            d: vec![0.0; m * kb],
            sums: vec![0.0; m * k / group],
            kb,
        };
        for (((x, q), d), s) in xs
            .chunks_exact(QK)
            .zip(a.qs.chunks_exact_mut(QK))
            .zip(a.d.iter_mut())
            .zip(a.sums.chunks_exact_mut(QK / group))
        {
            *d = q8k_block(x, q);
            if *d == 0.0 {
                continue;
            }
            for (s, q) in s.iter_mut().zip(q.chunks_exact(group)) {
                *s = q.iter().map(|&v| v as i32).sum::<i32>() as f32 * *d;
            }
        }
        a
    }
}

/// Quantizes one block of 256 values into `q` as ggml's `quantize_row_q8_K`
/// does and returns its scale (0 for an all-zero block, `q` left as it is).
pub(crate) fn q8k_block(x: &[f32], q: &mut [i8]) -> f32 {
    // The value of largest magnitude, with its sign, maps to -127.
    let max = x
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    if max == 0.0 {
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (q, &v) in q.iter_mut().zip(x) {
        *q = ((iscale * v).round_ties_even() as i32).clamp(-127, 127) as i8;
    }
    1.0 / iscale
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The operands of one product, shared by the pool's threads.
struct View<'a> {
    a: &'a Q8K,
    w: *const u8,
    row_bytes: usize,
    n: usize,
    kind: Kind,
}

// SAFETY: read-only views of buffers that outlive the pool call.
unsafe impl Send for View<'_> {}
unsafe impl Sync for View<'_> {}

/// All prompt rows against the weight rows `rows`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel(v: &View, rows: std::ops::Range<usize>, out: *mut f32) {
    let m = v.a.d.len() / v.a.kb;
    walk_panel(m, rows, |i, j| {
        // SAFETY: as for the panel.
        unsafe {
            match (v.kind, m - i) {
                (Kind::Q4K, 4..) => tile_q45k::<4, false>(v, i, j, out),
                (Kind::Q4K, 3) => tile_q45k::<3, false>(v, i, j, out),
                (Kind::Q4K, 2) => tile_q45k::<2, false>(v, i, j, out),
                (Kind::Q4K, _) => tile_q45k::<1, false>(v, i, j, out),
                (Kind::Q5K, 4..) => tile_q45k::<4, true>(v, i, j, out),
                (Kind::Q5K, 3) => tile_q45k::<3, true>(v, i, j, out),
                (Kind::Q5K, 2) => tile_q45k::<2, true>(v, i, j, out),
                (Kind::Q5K, _) => tile_q45k::<1, true>(v, i, j, out),
                (Kind::Q6K, 4..) => tile_q6k::<4>(v, i, j, out),
                (Kind::Q6K, 3) => tile_q6k::<3>(v, i, j, out),
                (Kind::Q6K, 2) => tile_q6k::<2>(v, i, j, out),
                (Kind::Q6K, _) => tile_q6k::<1>(v, i, j, out),
            }
        }
    });
}

/// [`q4k_scales_packed`] in a vector register, from a Q4_K block's first
/// byte (the 12 scale bytes start at 4; 16 bytes are read, all inside the
/// block): the scales in bytes 0–7, the minimums in 8–15, for the 512-bit
/// tile, which needs them in a vector (the word form's four 32-bit stores,
/// read back as one 128-bit vector, are a store-to-load forward that fails).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn q4k_scales_vec(block: *const u8) -> __m128i {
    unsafe {
        // [u0, u1, u2, -]: ggml's utmp words.
        let x = _mm_loadu_si128(block.add(4) as *const __m128i);
        let lo = _mm_and_si128(x, _mm_set1_epi32(0x3f3f_3f3f));
        // [u2, u2 >> 4] & 0x0f… | (([u0, u1] >> 6) & 0x03…) << 4
        let u2 = _mm_srlv_epi32(
            _mm_shuffle_epi32::<0b10_10_10_10>(x),
            _mm_set_epi32(0, 0, 4, 0),
        );
        let top = _mm_slli_epi32::<4>(_mm_and_si128(
            _mm_srli_epi32::<6>(x),
            _mm_set1_epi32(0x0303_0303),
        ));
        let hi = _mm_or_si128(_mm_and_si128(u2, _mm_set1_epi32(0x0f0f_0f0f)), top);
        // [sc_lo, sc_hi, mn_lo, mn_hi]
        _mm_unpacklo_epi32(lo, hi)
    }
}

/// Whether the CPU has what the 512-bit Q4_K tile needs: AVX-512 F and BW
/// and VNNI (checked once; `RAGD_NO_VNNI=1` turns it off with the others).
pub(crate) fn zmm_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ZMM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ZMM.get_or_init(|| {
            crate::q8_0::vnni_available()
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`panel`] with Q4_K rows through [`tile_q4k_zmm`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
unsafe fn panel_zmm(v: &View, rows: std::ops::Range<usize>, out: *mut f32) {
    let m = v.a.d.len() / v.a.kb;
    walk_panel(m, rows, |i, j| {
        // SAFETY: as for the panel.
        unsafe {
            match (v.kind, m - i) {
                (Kind::Q4K, 4..) => tile_q4k_zmm::<4>(v, i, j, out),
                (Kind::Q4K, 3) => tile_q4k_zmm::<3>(v, i, j, out),
                (Kind::Q4K, 2) => tile_q4k_zmm::<2>(v, i, j, out),
                (Kind::Q4K, _) => tile_q4k_zmm::<1>(v, i, j, out),
                (Kind::Q5K, 4..) => tile_q45k::<4, true>(v, i, j, out),
                (Kind::Q5K, 3) => tile_q45k::<3, true>(v, i, j, out),
                (Kind::Q5K, 2) => tile_q45k::<2, true>(v, i, j, out),
                (Kind::Q5K, _) => tile_q45k::<1, true>(v, i, j, out),
                (Kind::Q6K, 4..) => tile_q6k::<4>(v, i, j, out),
                (Kind::Q6K, 3) => tile_q6k::<3>(v, i, j, out),
                (Kind::Q6K, 2) => tile_q6k::<2>(v, i, j, out),
                (Kind::Q6K, _) => tile_q6k::<1>(v, i, j, out),
            }
        }
    });
}

/// [`tile_q45k`] (Q4_K) on 512-bit vectors: each step of 64 values is one vector of
/// both nibble halves (the low nibbles in the lower 256 bits, the high in the
/// upper, by one variable shift of the broadcast bytes), one `vpmaddubsw` with
/// the 64 activations as they lie, and one `vpdpwssd` that multiplies by the
/// two sub-blocks' scales (picked from the block's by one byte shuffle) and
/// accumulates: half the AVX2 tile's instructions for the same values.
/// Qwen2.5-Coder-1.5B (Q4_K_M) decoded at 29.3-30.2 tokens/s with it against
/// 28.8-29.2 with the AVX2 tile (`RAGD_NO_VNNI=1`), runs alternating: small,
/// as decoding is mostly bound by memory, but steady.
///
/// The two halves' integer sums are added before anything else, so each
/// lane's block sum is the AVX2 tile's integer and the float steps are the
/// same: the results are bit-identical (tested).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn tile_q4k_zmm<const M: usize>(v: &View, i0: usize, j: usize, out: *mut f32) {
    debug_assert!(M <= RM);
    let (a, kb) = (v.a, v.a.kb);
    unsafe {
        let low = _mm512_set1_epi8(0xF);
        let shifts = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4));
        // Byte-shuffle controls giving scale 2c in the lower 256 bits and
        // 2c + 1 in the upper, as 16-bit lanes (0x80 zeroes the high byte).
        let pick = |c: u16| {
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_set1_epi16((0x8000 | (2 * c)) as i16)),
                _mm256_set1_epi16((0x8000 | (2 * c + 1)) as i16),
            )
        };
        let picks = [pick(0), pick(1), pick(2), pick(3)];
        let mut acc = [_mm256_setzero_ps(); M];
        let row = v.w.add(j * v.row_bytes);
        for l in 0..kb {
            let b = row.add(l * 144);
            prefetch_ahead::<3>(b);
            let dd = _mm_cvtph_ps(_mm_cvtsi32_si128((b as *const i32).read_unaligned()));
            let vd = _mm256_broadcastss_ps(dd);
            let vdmin = _mm256_broadcastss_ps(_mm_movehdup_ps(dd));
            let scm = q4k_scales_vec(b);
            let mins = _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(scm, scm))),
                vdmin,
            );
            let scales = _mm512_broadcast_i32x4(scm);
            let mut isum = [_mm512_setzero_si512(); M];
            for (c, pick) in picks.iter().enumerate() {
                let q = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                    b.add(16 + 32 * c) as *const __m256i
                ));
                let q = _mm512_and_si512(_mm512_srlv_epi16(q, shifts), low);
                let s = _mm512_shuffle_epi8(scales, *pick);
                for (i, isum) in isum.iter_mut().enumerate() {
                    let aq = a.qs.as_ptr().add(((i0 + i) * kb + l) * QK + 64 * c);
                    let az = _mm512_loadu_si512(aq as *const __m512i);
                    // At most 2·15·127 per pair, times a scale under 64.
                    *isum = _mm512_dpwssd_epi32(*isum, _mm512_maddubs_epi16(q, az), s);
                }
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let idx = (i0 + i) * kb + l;
                let isum = _mm256_add_epi32(
                    _mm512_castsi512_si256(isum[i]),
                    _mm512_extracti64x4_epi64::<1>(isum[i]),
                );
                let ad = _mm256_broadcast_ss(&*a.d.as_ptr().add(idx));
                let sums = _mm256_loadu_ps(a.sums.as_ptr().add(idx * 8));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(vd, ad), *acc);
                *acc = _mm256_fnmadd_ps(mins, sums, *acc);
            }
        }
        for (i, &acc) in acc.iter().enumerate() {
            *out.add((i0 + i) * v.n + j) = hsum(acc);
        }
    }
}

/// `M` prompt rows from `i0` against Q4_K weight row `j` (`FIVE` false) or
/// Q5_K weight row `j` (`FIVE`: the same block with 32 bytes of fifth bits
/// before the nibbles — bit `2c` of `qh[l]` for value `l` of chunk `c`'s
/// first 32, bit `2c + 1` for its second, as ggml's `dequantize_row_q5_K`
/// — or-ed into each value).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_q45k<const M: usize, const FIVE: bool>(
    v: &View,
    i0: usize,
    j: usize,
    out: *mut f32,
) {
    debug_assert!(M <= RM);
    let (a, kb) = (v.a, v.a.kb);
    let (bytes, nibbles) = if FIVE { (176, 48) } else { (144, 16) };
    unsafe {
        let low = _mm256_set1_epi8(0xF);
        let mut acc = [_mm256_setzero_ps(); M];
        let row = v.w.add(j * v.row_bytes);
        for l in 0..kb {
            prefetch_ahead::<3>(row.add(l * bytes));
            let b = std::slice::from_raw_parts(row.add(l * bytes), bytes);
            // d and dmin by F16C, and the 6-bit scales by word operations:
            // per block this was scalar code (half's conversion checks the
            // CPU per call), worth most of a one-row product.
            let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(
                (b.as_ptr() as *const i32).read_unaligned(),
            ));
            let vd = _mm256_broadcastss_ps(dd);
            let vdmin = _mm256_broadcastss_ps(_mm_movehdup_ps(dd));
            let scm = q4k_scales_packed(&b[4..16]);
            let sc = &scm[..8];
            // The minimums, one per 32 values, times dmin: against the
            // activations' scaled sums they are the part each value's
            // minimum takes off.
            let mins = _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    scm.as_ptr().add(8) as *const __m128i
                ))),
                vdmin,
            );
            let qh = if FIVE {
                _mm256_loadu_si256(b.as_ptr().add(16) as *const __m256i)
            } else {
                _mm256_setzero_si256()
            };
            let mut isum = [_mm256_setzero_si256(); M];
            for c in 0..4 {
                let q = _mm256_loadu_si256(b.as_ptr().add(nibbles + 32 * c) as *const __m256i);
                let mut q1 = _mm256_and_si256(q, low);
                let mut q2 = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
                if FIVE {
                    q1 = _mm256_or_si256(q1, crate::q8_0::fifth_bit(qh, 2 * c));
                    q2 = _mm256_or_si256(q2, crate::q8_0::fifth_bit(qh, 2 * c + 1));
                }
                let s1 = _mm256_set1_epi16(sc[2 * c] as i16);
                let s2 = _mm256_set1_epi16(sc[2 * c + 1] as i16);
                for (i, isum) in isum.iter_mut().enumerate() {
                    let aq = a.qs.as_ptr().add(((i0 + i) * kb + l) * QK + 64 * c);
                    let a1 = _mm256_loadu_si256(aq as *const __m256i);
                    let a2 = _mm256_loadu_si256(aq.add(32) as *const __m256i);
                    // At most 2·31·127 per pair: no saturation.
                    let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(q1, a1), s1);
                    let p2 = _mm256_madd_epi16(_mm256_maddubs_epi16(q2, a2), s2);
                    *isum = _mm256_add_epi32(*isum, _mm256_add_epi32(p1, p2));
                }
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let idx = (i0 + i) * kb + l;
                let ad = _mm256_broadcast_ss(&*a.d.as_ptr().add(idx));
                let sums = _mm256_loadu_ps(a.sums.as_ptr().add(idx * 8));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), _mm256_mul_ps(vd, ad), *acc);
                *acc = _mm256_fnmadd_ps(mins, sums, *acc);
            }
        }
        for (i, &acc) in acc.iter().enumerate() {
            *out.add((i0 + i) * v.n + j) = hsum(acc);
        }
    }
}

/// `M` prompt rows from `i0` against Q6_K weight row `j`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_q6k<const M: usize>(v: &View, i0: usize, j: usize, out: *mut f32) {
    debug_assert!(M <= RM);
    let (a, kb) = (v.a, v.a.kb);
    unsafe {
        let low = _mm256_set1_epi8(0xF);
        let two = _mm256_set1_epi8(3);
        let mut acc = [_mm256_setzero_ps(); M];
        let row = v.w.add(j * v.row_bytes);
        for l in 0..kb {
            let b = row.add(l * 210);
            prefetch_ahead::<3>(b);
            let scales = b.add(192) as *const i8;
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                (b.add(208) as *const u16).read_unaligned() as i32,
            )));
            // The offset of 32: Σ d·sc·(q-32)·a = Σ d·sc·q·a - Σ 32·d·sc·(a's
            // scaled sums of 16).
            let off = _mm256_set1_ps(32.0 * d);
            let sc_lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                scales as *const __m128i,
            )));
            let sc_hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                scales.add(8) as *const __m128i
            )));
            let (off_lo, off_hi) = (_mm256_mul_ps(sc_lo, off), _mm256_mul_ps(sc_hi, off));
            let vd = _mm256_set1_ps(d);
            let sc_bytes = _mm_loadu_si128(scales as *const __m128i);
            let mut isum = [_mm256_setzero_si256(); M];
            for h in 0..2 {
                let ql1 = _mm256_loadu_si256(b.add(64 * h) as *const __m256i);
                let ql2 = _mm256_loadu_si256(b.add(64 * h + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(b.add(128 + 32 * h) as *const __m256i);
                let qs = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, low),
                        _mm256_slli_epi16(_mm256_and_si256(qh, two), 4),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql2, low),
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), two), 4),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low),
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), two), 4),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql2, 4), low),
                        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), two), 4),
                    ),
                ];
                for (c, &q) in qs.iter().enumerate() {
                    // Values 0–15 of the 32 take one scale, 16–31 the next:
                    // both picked from the block's 16 by one byte shuffle.
                    let t = (8 * h + 2 * c) as i8;
                    let pick = _mm_set_epi64x(
                        i64::from_ne_bytes([t as u8 + 1; 8]),
                        i64::from_ne_bytes([t as u8; 8]),
                    );
                    let s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc_bytes, pick));
                    for (i, isum) in isum.iter_mut().enumerate() {
                        let aq =
                            a.qs.as_ptr()
                                .add(((i0 + i) * kb + l) * QK + 128 * h + 32 * c);
                        let aq = _mm256_loadu_si256(aq as *const __m256i);
                        // At most 2·63·127 per pair: no saturation.
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, aq), s);
                        *isum = _mm256_add_epi32(*isum, p);
                    }
                }
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let idx = (i0 + i) * kb + l;
                let ad = _mm256_broadcast_ss(&*a.d.as_ptr().add(idx));
                let sums = a.sums.as_ptr().add(idx * 16);
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), _mm256_mul_ps(vd, ad), *acc);
                *acc = _mm256_fnmadd_ps(off_lo, _mm256_loadu_ps(sums), *acc);
                *acc = _mm256_fnmadd_ps(off_hi, _mm256_loadu_ps(sums.add(8)), *acc);
            }
        }
        for (i, &acc) in acc.iter().enumerate() {
            *out.add((i0 + i) * v.n + j) = hsum(acc);
        }
    }
}

/// How far ahead of the weights being multiplied the tiles ask for more.
/// Decoding is bound by reading the weights, and the hardware prefetchers
/// alone left bandwidth unused: Qwen2.5-Coder-1.5B (Q4_K_M) decoded at
/// 28.3-29.2 tokens/s without, 29.9-30.3 with 2 KB or 3 KB ahead, 28.0-28.2
/// with 1 KB and 29.0-29.2 with 4-8 KB (`ragd bench generate --prompt-tokens
/// 16`, builds alternating; AMD EPYC, 34 GB/s from memory on two cores).
/// The same prefetch in the Q5_0 and Q8_0 tiles made Qwen2.5-Coder-0.5B's
/// decode slower (67-68 against 72.6-73.0 tokens/s), so they have none.
const PREFETCH: usize = 2048;

/// Asks for `LINES` cache lines from [`PREFETCH`] bytes after `at` (the
/// lines of a weight block of up to `64 · LINES` bytes). A prefetch past the
/// weights' end is harmless, so the address is computed, never checked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn prefetch_ahead<const LINES: usize>(at: *const u8) {
    let ahead = at.wrapping_add(PREFETCH) as *const i8;
    for line in 0..LINES {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::pseudo_random;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    fn matrices(n: usize, k: usize, seed: u64) -> Result<Vec<(Arc<QTensor>, KMatrix)>> {
        let w = Tensor::from_vec(pseudo_random(n * k, seed), (n, k), &Device::Cpu)?;
        [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K]
            .into_iter()
            .map(|t| {
                let qt = Arc::new(QTensor::quantize(&w, t)?);
                let ours = KMatrix::from_qtensor(&qt)?.expect("a K-quant matrix");
                Ok((qt, ours))
            })
            .collect()
    }

    /// The branch-free scale unpacking gives ggml's scales and minimums for
    /// every bit pattern of each byte position.
    #[test]
    fn packed_scales_are_ggmls() {
        let mut s = [0u8; 12];
        for seed in 0..4096u32 {
            for (i, b) in s.iter_mut().enumerate() {
                *b = (seed.wrapping_mul(2654435761).rotate_left(i as u32 * 5) >> (i % 8)) as u8
                    ^ (seed >> (i % 12)) as u8;
            }
            let (sc, mn) = q4k_scales(&s);
            let packed = q4k_scales_packed(&s);
            assert_eq!(&packed[..8], &sc, "{s:?}");
            assert_eq!(&packed[8..], &mn, "{s:?}");
        }
    }

    #[test]
    fn rows_dequantize_as_candle_does() -> Result<()> {
        for (qt, ours) in matrices(5, 512, 3)? {
            let want: Vec<Vec<f32>> = qt.dequantize(&Device::Cpu)?.to_vec2()?;
            for (j, want) in want.iter().enumerate() {
                let mut got = vec![0f32; 512];
                ours.dequantize_row(j, &mut got)?;
                assert_eq!(&got, want, "{:?} row {j}", ours.kind);
            }
        }
        Ok(())
    }

    /// Against the exact product of the dequantized weights the kernel errs
    /// no more than candle's own K-quant matmul (both quantize activations per
    /// 256 values), and every row's result is the same alone or among up to
    /// [`FEW_ROWS`] others (drafted tokens); prompts may take
    /// [`crate::kquant_prompt`]'s path, whose float sums run in another order.
    #[test]
    fn matches_the_exact_product_and_rows_are_independent() -> Result<()> {
        if !crate::q8_0::kernel_available() {
            eprintln!("skipped: no AVX2/FMA/F16C");
            return Ok(());
        }
        let dev = Device::Cpu;
        for &(m, k, n) in &[
            (1, 256, 1),
            (2, 512, 7),
            (5, 768, 33),
            (17, 1536, 64),
            (53, 256, 40),
        ] {
            for (qt, ours) in matrices(n, k, (n * k) as u64)? {
                let exact_w = qt.dequantize(&dev)?;
                let theirs = QMatMul::from_arc(qt)?;
                let x = Tensor::from_vec(pseudo_random(m * k, 7 + m as u64), (m, k), &dev)?;
                let exact = x.matmul(&exact_w.t()?)?;
                let got = x.apply_op1_no_bwd(&ours)?;
                let err = |y: &Tensor| -> Result<f32> {
                    (y - &exact)?.abs()?.mean_all()?.to_scalar::<f32>()
                };
                let scale = exact.abs()?.mean_all()?.to_scalar::<f32>()?;
                let (a, b) = (err(&got)?, err(&theirs.forward(&x)?)?);
                assert!(
                    a <= b * 1.1 + 1e-6 && a <= 0.05 * scale,
                    "{:?} ({m},{k},{n}): mean error {a} vs candle's {b} (values ~{scale})",
                    ours.kind
                );
                if m > FEW_ROWS && ours.tiles_prompts() {
                    continue;
                }
                let all: Vec<Vec<f32>> = got.to_vec2()?;
                for (i, want) in all.iter().enumerate() {
                    let one: Vec<f32> = x
                        .get(i)?
                        .unsqueeze(0)?
                        .apply_op1_no_bwd(&ours)?
                        .flatten_all()?
                        .to_vec1()?;
                    assert_eq!(&one, want, "{:?} ({m},{k},{n}) row {i}", ours.kind);
                }
            }
        }
        Ok(())
    }

    /// The vector scale unpacking gives the word form's bytes.
    #[test]
    fn vector_scales_are_the_packed_ones() {
        if !crate::q8_0::kernel_available() {
            return;
        }
        let mut block = [0u8; 144];
        for seed in 0..4096u32 {
            for (i, b) in block[4..16].iter_mut().enumerate() {
                *b = (seed.wrapping_mul(2654435761).rotate_left(i as u32 * 5) >> (i % 8)) as u8
                    ^ (seed >> (i % 12)) as u8;
            }
            let mut got = [0u8; 16];
            // SAFETY: AVX2 checked above; 16 bytes are read from block[4..20].
            unsafe {
                _mm_storeu_si128(
                    got.as_mut_ptr() as *mut __m128i,
                    q4k_scales_vec(block.as_ptr()),
                )
            };
            assert_eq!(got, q4k_scales_packed(&block[4..16]), "{:?}", &block[4..16]);
        }
    }

    /// The 512-bit Q4_K tile gives the AVX2 tile's bits, for every number
    /// of rows a tile takes.
    #[test]
    fn the_512_bit_tile_is_the_avx2_tile() -> Result<()> {
        if !zmm_available() {
            eprintln!("skipped: no AVX-512 BW/VNNI");
            return Ok(());
        }
        for &(m, k, n) in &[
            (1, 256, 3),
            (2, 512, 7),
            (3, 768, 9),
            (4, 256, 5),
            (9, 1536, 17),
        ] {
            for (_, ours) in matrices(n, k, (n * k + m) as u64)? {
                let x = pseudo_random(m * k, 11 + m as u64);
                let (mut wide, mut narrow) = (vec![0f32; m * n], vec![0f32; m * n]);
                ours.matmul_with(&x, m, &mut wide, true)?;
                ours.matmul_with(&x, m, &mut narrow, false)?;
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&wide), bits(&narrow), "{:?} ({m},{k},{n})", ours.kind);
            }
        }
        Ok(())
    }

    /// A matrix read in place from a mapped file's bytes multiplies as the
    /// tensor it was read from does — decoding rows, prompts, and candle's
    /// product (made from a copy of the bytes on first use) — and bytes that
    /// fall short of the shape are an error, not a read past them.
    #[test]
    fn mapped_blocks_multiply_as_the_tensor_does() -> Result<()> {
        let (n, k) = (24, 512);
        for (qt, ours) in matrices(n, k, 17)? {
            // The blocks 40 bytes into a "file", as a GGUF file's tensor data.
            let mut file = vec![0xAAu8; 40];
            file.extend_from_slice(&qt.data()?);
            let len = file.len();
            let bytes: SharedBytes = Arc::new(file);
            let mapped = KMatrix::from_mapped(qt.dtype(), n, k, Arc::clone(&bytes), 40)?
                .expect("a K-quant matrix");
            assert!(KMatrix::from_mapped(qt.dtype(), n, k, Arc::clone(&bytes), 41).is_err());
            assert!(KMatrix::from_mapped(qt.dtype(), n, k, Arc::clone(&bytes), len).is_err());
            assert!(KMatrix::from_mapped(GgmlDType::Q8_0, n, k, bytes, 40)?.is_none());
            let mut row = vec![0f32; k];
            let mut want_row = vec![0f32; k];
            mapped.dequantize_row(n - 1, &mut row)?;
            ours.dequantize_row(n - 1, &mut want_row)?;
            assert_eq!(row, want_row);
            if !crate::q8_0::kernel_available() {
                continue;
            }
            for m in [1, 40] {
                let x = pseudo_random(m * k, 5 + m as u64);
                let (mut got, mut want) = (vec![0f32; m * n], vec![0f32; m * n]);
                mapped.matmul(&x, m, &mut got)?;
                ours.matmul(&x, m, &mut want)?;
                assert_eq!(got, want, "{:?} {m} rows", ours.kind);
            }
            let x = Tensor::from_vec(pseudo_random(40 * k, 9), (40, k), &Device::Cpu)?;
            let got: Vec<f32> = mapped.candle()?.forward(&x)?.flatten_all()?.to_vec1()?;
            let want: Vec<f32> = ours.candle()?.forward(&x)?.flatten_all()?.to_vec1()?;
            assert_eq!(got, want, "{:?} through candle", ours.kind);
        }
        Ok(())
    }

    #[test]
    fn zero_rows_and_other_types_are_handled() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(pseudo_random(4 * 256, 1), (4, 256), &dev)?;
        let q8 = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?);
        assert!(KMatrix::from_qtensor(&q8)?.is_none());
        // k not a multiple of 256.
        let w = Tensor::from_vec(pseudo_random(4 * 96, 1), (4, 96), &dev)?;
        let q4 = Arc::new(QTensor::quantize(&w, GgmlDType::Q4_0)?);
        assert!(KMatrix::from_qtensor(&q4)?.is_none());
        if !crate::q8_0::kernel_available() {
            return Ok(());
        }
        // An all-zero activation row gives zeros, not NaN.
        let (_, ours) = matrices(3, 256, 2)?.remove(0);
        let mut dst = vec![1f32; 3];
        ours.matmul(&[0f32; 256], 1, &mut dst)?;
        assert_eq!(dst, vec![0f32; 3]);
        Ok(())
    }
}
