//! Q4_K, Q5_K and Q6_K products for prompts (more than
//! [`crate::q8_0::FEW_ROWS`] rows) on x86-64 CPUs with AVX2 but without
//! AVX-512 VNNI, and Q4_K and Q5_K products on CPUs with it (below).
//!
//! Written by hand because on such a CPU (a 2-core AMD EPYC, Zen 2) prefill of
//! the K-quant files people download was slower than llama.cpp's:
//! Qwen2.5-Coder-1.5B Q4_K_M, 512 prompt tokens, 53.9 against 56.0 tokens/s
//! (`bench/compare-llamacpp`), 77 % of it in candle's repacked Q4_K tiles
//! (`repack_x86::matmul_unit_256`, 76–79 billion multiply-adds per second in
//! `examples/matmul_speed.rs`). Every int8 product there, candle's, ggml's
//! and ours, is `_mm256_maddubs_epi16` (u8 × i8 pairs to i16) followed by
//! `_mm256_madd_epi16` (i16 pairs to i32), and Zen 2 issues both on one
//! execution pipe: two instructions per 32 multiply-adds, whatever the
//! layout. Q4_K leaves room that 8-bit weights do not: a pair of 4-bit
//! values (0–15) times activations (|a| ≤ 127) is at most 3,810, so eight
//! `maddubs` results add up in 16 bits (30,480) before one `madd` widens
//! them — and that `madd` applies the sub-block's scale as well, which the
//! 32 values of a sub-block share. Nine instructions on that pipe per 256
//! multiply-adds instead of sixteen.
//!
//! The layout (made from the file's blocks on the first prompt, as candle
//! makes its tiles; 5.75 bits per weight against candle's 6.5): groups of
//! [`RN`] weight rows, per 256-value block one [`Tile`] whose vectors hold
//! four consecutive values of each of the eight rows (lane `r`: row `r`), two
//! such steps per byte (low and high nibble), so four activation bytes
//! broadcast to every lane give the eight rows' sums side by side, as the
//! Q8_0 kernel does. The activations are quantized per 256 values exactly as
//! ggml's `quantize_row_q8_K` does (as [`crate::kquant`]'s), with integer sums
//! per 32 for the minimums, so each block's dot product is the same integers
//! as ggml's `vec_dot_q4_K_q8_K`: one conversion to float per block.
//!
//! Q6_K ([`Q6Tiles`]) takes the same road with the room it has: its values
//! less 32 (−32..31) are stored signed, multiplied as |w| by the activations
//! with w's sign (as the Q8_0 kernel does), pairs of at most 2·32·127, so the
//! four `maddubs` of a 16-value sub-block add up in 16 bits (32,512) before
//! one `madd` applies its scale: five instructions per 128 multiply-adds
//! instead of eight, and the offset of 32 needs no separate sums (8 bits per
//! value and 16-bit scales: 10 bits per weight, as candle's tiles).
//!
//! Q5_K ([`Q5Tiles`]) is Q4_K's tile with a vector of fifth bits per
//! sub-block, or-ed into the nibbles (values 0–31, 6.75 bits per weight):
//! pairs reach 2·31·127, so a `madd` follows every four `maddubs` (31,496),
//! ten instructions on that pipe per 256 multiply-adds. candle has no tiles
//! for Q5_K at all (38–40 billion multiply-adds per second on 256 rows).
//!
//! Measured on that host (`matmul_speed 256`, Qwen's shapes): Q4_K 130–156,
//! Q5_K 113–130
//! and Q6_K 108–111 billion multiply-adds per second against candle's 75–81;
//! `bench/compare-llamacpp --prompt-tokens 512`: Qwen2.5-Coder-1.5B prefill
//! 0.96× → 1.40× (Q4_K) → 1.54× (both) llama.cpp's, the 0.5B (Q6_K
//! tensors) 1.62× → 1.73×; the 1.5B as Q5_K_M 0.59× (candle) → 0.90×
//! (the file-block kernel) → 1.52×.
//!
//! On AVX-512 VNNI, `vpdpbusd` multiplies four unsigned bytes by four signed
//! ones and adds them into 32 bits in one instruction, so the 16-bit road
//! saves nothing there; Q4_K and Q5_K take the same tiles with 32-bit sums
//! per sub-block, the scale applied by `vpmulld`, eight prompt rows per tile
//! in AVX-512's 32 registers ([`tile_q45k_vnni`]; the same integers, the same
//! results to the bit). Why: on an AMD EPYC with AVX-512 VNNI (Zen 4), Q5_K
//! prompts ran on the file-block kernel at 73 billion multiply-adds per
//! second (candle has no tiles for it), and Qwen2.5-Coder-1.5B as Q5_K_M
//! prefilled at **0.35×** llama.cpp's speed (46 against 131 tokens/s,
//! `bench/compare-llamacpp --prompt-tokens 512`). The VNNI tiles: Q5_K
//! 207–281, Q4_K 220–295 against candle's own VNNI tiles' 192–258
//! (`matmul_speed 256`, Qwen's shapes); the Q5_K_M file's prefill 1.10× and
//! the Q4_K_M file's 1.63× → 1.81× llama.cpp's. Q6_K stays on candle's tiles
//! there: its 16-value sub-blocks and signed values would cost a `vpmulld`
//! and an offset per four `vpdpbusd`.
//!
//! The `unsafe` code here: SIMD intrinsics behind a run-time CPU check, and
//! raw pointers so the pool's threads write disjoint parts of one output.
#![allow(unsafe_code)]

use crate::kquant::q8k_block;
#[cfg(target_arch = "x86_64")]
use crate::q8_0::fifth_bit;
use crate::q8_0::{walk_panel, SendPtr, RM, RN};

/// Values per Q4_K block.
const QK: usize = 256;
/// Bytes of a Q4_K block in the file.
const BLOCK_BYTES: usize = 144;
/// Bytes of a Q5_K block in the file.
const Q5_BLOCK_BYTES: usize = 176;
/// Bytes of a Q6_K block in the file.
const Q6_BLOCK_BYTES: usize = 210;

/// One 256-value block of [`RN`] weight rows.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Tile {
    /// `qs[s][p][4r + b]`: of row `r`'s sub-block `s` (32 values), value
    /// `4p + b` in the low nibble and value `4(p + 4) + b` in the high one.
    qs: [[[u8; 4 * RN]; 4]; 8],
    /// `sc[s][2r]` and `sc[s][2r + 1]`: row `r`'s scale of sub-block `s`
    /// (6 bits), twice: the `madd` operand for the lane's two 16-bit sums.
    sc: [[i16; 2 * RN]; 8],
    /// `mn[j][2r]`, `mn[j][2r + 1]`: row `r`'s minimums of sub-blocks `2j`
    /// and `2j + 1`, against the activations' sums of those two.
    mn: [[i16; 2 * RN]; 4],
    /// Each row's block scale.
    d: [f32; RN],
    /// Each row's block scale of the minimums.
    dmin: [f32; RN],
}

/// A Q4_K matrix (`n × k`) in [`Tile`]s, group-major; the last group is
/// padded with zero rows.
pub struct Q4Tiles {
    n: usize,
    k: usize,
    tiles: Vec<Tile>,
}

impl std::fmt::Debug for Q4Tiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q4Tiles({}x{})", self.n, self.k)
    }
}

/// Whether prompts' K-quant products (all three types) take this module's
/// 16-bit road: AVX2, FMA and F16C without AVX-512 VNNI. With VNNI, Q4_K and
/// Q5_K take the VNNI tiles ([`pays_vnni`]) and Q6_K candle's, which are
/// faster there than this road. `RAGD_NO_KQUANT_TILES=1` turns it off (for
/// comparisons).
pub fn pays() -> bool {
    static PAYS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PAYS.get_or_init(|| {
        std::env::var("RAGD_NO_KQUANT_TILES").map_or(true, |v| v.is_empty() || v == "0")
            && crate::q8_0::kernel_available()
            && !crate::q8_0::vnni_available()
    })
}

/// Whether Q4_K and Q5_K prompts take this module's VNNI tiles: AVX-512
/// VNNI and VL (`RAGD_NO_VNNI=1` or `RAGD_NO_KQUANT_TILES=1` turn them off).
pub fn pays_vnni() -> bool {
    static PAYS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PAYS.get_or_init(|| {
        std::env::var("RAGD_NO_KQUANT_TILES").map_or(true, |v| v.is_empty() || v == "0")
            && crate::q8_0::kernel_available()
            && crate::q8_0::vnni_available()
    })
}

/// Lays out row `r`'s Q4_K-style block into `t`: `b` starts with d, dmin
/// and the 12 scale bytes (Q4_K's and Q5_K's header); `qs` are its 128
/// bytes of nibbles.
fn lay_q4k(t: &mut Tile, r: usize, b: &[u8], qs: &[u8]) {
    t.d[r] = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    t.dmin[r] = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
    let scm = crate::kquant::q4k_scales_packed(&b[4..16]);
    for s in 0..8 {
        t.sc[s][2 * r] = scm[s] as i16;
        t.sc[s][2 * r + 1] = scm[s] as i16;
        t.mn[s / 2][2 * r + s % 2] = scm[8 + s] as i16;
        // Sub-block s: the low (even s) or high (odd s) nibbles of the 32
        // bytes at 32·(s/2); values 4p..4p+4 go to the low nibbles of step
        // p's four bytes, 4p+16..4p+20 to their high nibbles, four bytes at
        // a time.
        let bytes = &qs[32 * (s / 2)..32 * (s / 2 + 1)];
        let word = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        for p in 0..4 {
            let (lo, hi) = (word(4 * p), word(4 * p + 16));
            let packed = if s % 2 == 0 {
                (lo & 0x0F0F_0F0F) | ((hi & 0x0F0F_0F0F) << 4)
            } else {
                ((lo >> 4) & 0x0F0F_0F0F) | (hi & 0xF0F0_F0F0)
            };
            t.qs[s][p][4 * r..4 * r + 4].copy_from_slice(&packed.to_le_bytes());
        }
    }
}

impl Q4Tiles {
    /// Lays out the bytes of a Q4_K tensor of shape `(n, k)` as the file
    /// stores them (`k` a multiple of 256, `data` of the right length: the
    /// caller's [`crate::kquant::KMatrix`] checked both).
    pub fn from_blocks(n: usize, k: usize, data: &[u8]) -> Self {
        let kb = k / QK;
        debug_assert_eq!(data.len(), n * kb * BLOCK_BYTES);
        let mut tiles = vec![bytemuck::Zeroable::zeroed(); n.div_ceil(RN) * kb];
        crate::par_chunks_mut(&mut tiles, kb, |g, tiles: &mut [Tile]| {
            for row in g * RN..(g * RN + RN).min(n) {
                let r = row % RN;
                let blocks = &data[row * kb * BLOCK_BYTES..(row + 1) * kb * BLOCK_BYTES];
                for (t, b) in tiles.iter_mut().zip(blocks.chunks_exact(BLOCK_BYTES)) {
                    lay_q4k(t, r, b, &b[16..144]);
                }
            }
        });
        Self { n, k, tiles }
    }

    /// `dst[i][j] = Σ_l lhs[i][l] · W[j][l]` for `m` rows of `lhs` (`m × k`).
    /// Needs AVX2, FMA and F16C (see [`pays`]; panics without them).
    pub fn matmul(&self, lhs: &[f32], m: usize, dst: &mut [f32]) {
        run(&self.tiles, self.n, self.k, lhs, m, dst, true);
    }

    /// [`Self::matmul`] with the VNNI tile on or off (only honoured where
    /// the CPU has it): the same results to the bit.
    #[cfg(test)]
    fn matmul_with(&self, lhs: &[f32], m: usize, dst: &mut [f32], vnni: bool) {
        run(&self.tiles, self.n, self.k, lhs, m, dst, vnni);
    }
}

/// One 256-value Q5_K block of [`RN`] weight rows: Q4_K's [`Tile`] (the low
/// four bits of each value) and the fifth bits. 6.75 bits per weight.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Tile5 {
    low: Tile,
    /// Bit `t` of `qh[s][4r + b]`: the fifth bit of row `r`'s value
    /// `4t + b` of sub-block `s`, `t` in 0..8 (the step whose low or high
    /// nibbles hold that value in `low.qs[s]`).
    qh: [[u8; 4 * RN]; 8],
}

/// A Q5_K matrix (`n × k`) in [`Tile5`]s, group-major; the last group is
/// padded with zero rows.
pub struct Q5Tiles {
    n: usize,
    k: usize,
    tiles: Vec<Tile5>,
}

impl std::fmt::Debug for Q5Tiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q5Tiles({}x{})", self.n, self.k)
    }
}

impl Q5Tiles {
    /// Lays out the bytes of a Q5_K tensor of shape `(n, k)` as the file
    /// stores them (as [`Q4Tiles::from_blocks`]): d, dmin, the scales, 32
    /// bytes of fifth bits (bit `s` of byte `l`: value `l` of sub-block
    /// `s`, as ggml's `dequantize_row_q5_K` reads them), 128 of nibbles.
    pub fn from_blocks(n: usize, k: usize, data: &[u8]) -> Self {
        let kb = k / QK;
        debug_assert_eq!(data.len(), n * kb * Q5_BLOCK_BYTES);
        let mut tiles = vec![bytemuck::Zeroable::zeroed(); n.div_ceil(RN) * kb];
        crate::par_chunks_mut(&mut tiles, kb, |g, tiles: &mut [Tile5]| {
            for row in g * RN..(g * RN + RN).min(n) {
                let r = row % RN;
                let blocks = &data[row * kb * Q5_BLOCK_BYTES..(row + 1) * kb * Q5_BLOCK_BYTES];
                for (t, b) in tiles.iter_mut().zip(blocks.chunks_exact(Q5_BLOCK_BYTES)) {
                    lay_q4k(&mut t.low, r, b, &b[48..176]);
                    let qh = &b[16..48];
                    for s in 0..8 {
                        for bb in 0..4 {
                            t.qh[s][4 * r + bb] = (0..8)
                                .map(|step| ((qh[4 * step + bb] >> s) & 1) << step)
                                .sum();
                        }
                    }
                }
            }
        });
        Self { n, k, tiles }
    }

    /// As [`Q4Tiles::matmul`].
    pub fn matmul(&self, lhs: &[f32], m: usize, dst: &mut [f32]) {
        run(&self.tiles, self.n, self.k, lhs, m, dst, true);
    }

    /// As [`Q4Tiles::matmul_with`].
    #[cfg(test)]
    fn matmul_with(&self, lhs: &[f32], m: usize, dst: &mut [f32], vnni: bool) {
        run(&self.tiles, self.n, self.k, lhs, m, dst, vnni);
    }
}

/// One 256-value Q6_K block of [`RN`] weight rows.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Tile6 {
    /// `qs[t][4r + b]`: row `r`'s value `4t + b` less 32.
    qs: [[i8; 4 * RN]; 64],
    /// `sc[s][2r]`, `sc[s][2r + 1]`: row `r`'s scale of values `16s..16s+16`.
    sc: [[i16; 2 * RN]; 16],
    /// Each row's block scale.
    d: [f32; RN],
}

/// A Q6_K matrix (`n × k`) in [`Tile6`]s, group-major; the last group is
/// padded with zero rows.
pub struct Q6Tiles {
    n: usize,
    k: usize,
    tiles: Vec<Tile6>,
}

impl std::fmt::Debug for Q6Tiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q6Tiles({}x{})", self.n, self.k)
    }
}

/// A Q6_K block's 256 values (0..63) in order, as ggml's
/// `dequantize_row_q6_K` reads them: four values from each low-bits byte
/// pair and high-bits byte of each half.
fn q6k_values(b: &[u8]) -> [u8; QK] {
    let mut v = [0u8; QK];
    for h in 0..2 {
        let (ql, qh) = (&b[64 * h..64 * h + 64], &b[128 + 32 * h..128 + 32 * h + 32]);
        let out = &mut v[128 * h..128 * h + 128];
        for l in 0..32 {
            out[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            out[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            out[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            out[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    v
}

impl Q6Tiles {
    /// Lays out the bytes of a Q6_K tensor of shape `(n, k)` as the file
    /// stores them (as [`Q4Tiles::from_blocks`]).
    pub fn from_blocks(n: usize, k: usize, data: &[u8]) -> Self {
        let kb = k / QK;
        debug_assert_eq!(data.len(), n * kb * Q6_BLOCK_BYTES);
        let mut tiles = vec![bytemuck::Zeroable::zeroed(); n.div_ceil(RN) * kb];
        crate::par_chunks_mut(&mut tiles, kb, |g, tiles: &mut [Tile6]| {
            for row in g * RN..(g * RN + RN).min(n) {
                let r = row % RN;
                let blocks = &data[row * kb * Q6_BLOCK_BYTES..(row + 1) * kb * Q6_BLOCK_BYTES];
                for (t, b) in tiles.iter_mut().zip(blocks.chunks_exact(Q6_BLOCK_BYTES)) {
                    t.d[r] = half::f16::from_le_bytes([b[208], b[209]]).to_f32();
                    for s in 0..16 {
                        t.sc[s][2 * r] = b[192 + s] as i8 as i16;
                        t.sc[s][2 * r + 1] = b[192 + s] as i8 as i16;
                    }
                    for (v, q) in q6k_values(b).into_iter().enumerate() {
                        t.qs[v / 4][4 * r + v % 4] = q as i8 - 32;
                    }
                }
            }
        });
        Self { n, k, tiles }
    }

    /// As [`Q4Tiles::matmul`] (one tile on every CPU).
    pub fn matmul(&self, lhs: &[f32], m: usize, dst: &mut [f32]) {
        run(&self.tiles, self.n, self.k, lhs, m, dst, false);
    }
}

/// A block type of this module's layouts and its tile.
trait Kernel: Sized {
    /// Whether the tile reads the activations' sums per 32 (Q4_K's
    /// minimums); Q6_K's offset is in its stored values.
    const SUMS: bool;

    /// `M` prompt rows from `i0` against the [`RN`] weight rows of group `g`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `i0 + M ≤ v.m`, `g` a group of `v`.
    unsafe fn tile<const M: usize>(v: &View<Self>, i0: usize, g: usize, out: *mut f32);

    /// Whether the type has a tile for AVX-512 VNNI ([`Self::tile_vnni`]).
    const VNNI: bool = false;

    /// [`Self::tile`] with `vpdpbusd`, up to [`VNNI_ROWS`] rows.
    ///
    /// # Safety
    /// As [`Self::tile`], and the CPU has AVX-512 VNNI and VL.
    unsafe fn tile_vnni<const M: usize>(v: &View<Self>, i0: usize, g: usize, out: *mut f32) {
        // SAFETY: the caller's.
        unsafe { Self::tile::<M>(v, i0, g, out) }
    }
}

impl Kernel for Tile {
    const SUMS: bool = true;

    unsafe fn tile<const M: usize>(v: &View<Self>, i0: usize, g: usize, out: *mut f32) {
        // SAFETY: the caller's.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            tile_q45k::<Self, M>(v, i0, g, out)
        }
    }

    const VNNI: bool = true;

    unsafe fn tile_vnni<const M: usize>(v: &View<Self>, i0: usize, g: usize, out: *mut f32) {
        // SAFETY: the caller's.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            tile_q45k_vnni::<Self, M>(v, i0, g, out)
        }
    }
}

impl Kernel for Tile5 {
    const SUMS: bool = true;

    unsafe fn tile<const M: usize>(v: &View<Self>, i0: usize, g: usize, out: *mut f32) {
        // SAFETY: the caller's.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            tile_q45k::<Self, M>(v, i0, g, out)
        }
    }

    const VNNI: bool = true;

    unsafe fn tile_vnni<const M: usize>(v: &View<Self>, i0: usize, g: usize, out: *mut f32) {
        // SAFETY: the caller's.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            tile_q45k_vnni::<Self, M>(v, i0, g, out)
        }
    }
}

impl Kernel for Tile6 {
    const SUMS: bool = false;

    unsafe fn tile<const M: usize>(v: &View<Self>, i0: usize, g: usize, out: *mut f32) {
        // SAFETY: the caller's.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            tile_q6k::<M>(v, i0, g, out)
        }
    }
}

/// `dst = lhs · Wᵀ` for the `n × k` matrix laid out in `tiles`, by the
/// VNNI tile where `vnni`, the type has one and so does the CPU.
fn run<T: Kernel>(
    tiles: &[T],
    n: usize,
    k: usize,
    lhs: &[f32],
    m: usize,
    dst: &mut [f32],
    vnni: bool,
) {
    assert_eq!(lhs.len(), m * k, "lhs is not {m}x{k}");
    assert_eq!(dst.len(), m * n, "dst is not {m}x{n}");
    assert!(
        crate::q8_0::kernel_available(),
        "the K-quant prompt kernels need AVX2, FMA and F16C"
    );
    let a = Activations::quantize(lhs, m, k, T::SUMS);
    #[cfg(target_arch = "x86_64")]
    {
        let out = SendPtr(dst.as_mut_ptr());
        let view = View {
            a: &a,
            tiles: tiles.as_ptr(),
            n,
            m,
        };
        // Work items are groups of RN weight rows, walked over all prompt
        // rows in blocks (`walk_panel`), as the Q8_0 kernel does.
        let vnni = vnni && T::VNNI && crate::q8_0::vnni_available();
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(RN), |groups| {
            let out = &out;
            // SAFETY: the CPU features were checked above; every (row, col)
            // of dst is written by exactly one range, in bounds.
            unsafe {
                if vnni {
                    panel_vnni(&view, groups, out.0)
                } else {
                    panel(&view, groups, out.0)
                }
            }
        });
    }
}

/// Prompt rows quantized per 256 values as ggml's `quantize_row_q8_K`, with
/// each 32 values' integer sum, two to a 32-bit word (the `madd` operand
/// against [`Tile::mn`]).
struct Activations {
    qs: Vec<i8>,
    d: Vec<f32>,
    /// `4` words per block: sums of sub-blocks `2j` (low half) and `2j + 1`.
    sums: Vec<i32>,
    kb: usize,
}

impl Activations {
    /// `with_sums`: also each 32 values' sums (else `sums` stays empty).
    fn quantize(xs: &[f32], m: usize, k: usize, with_sums: bool) -> Self {
        let kb = k / QK;
        let per_block = if with_sums { 4 } else { 0 };
        let mut qs = vec![0i8; m * k];
        let mut d = vec![0f32; m * kb];
        let mut sums = vec![0i32; m * kb * per_block];
        // Row by row over the pool: one thread quantizing a 512-token prompt
        // of 8,960 values would leave the other idle for milliseconds.
        let (qp, dp, sp) = (
            Rows(qs.as_mut_ptr()),
            Rows(d.as_mut_ptr()),
            Rows(sums.as_mut_ptr()),
        );
        candle_core::utils::barrier_pool().execute_chunked(m, |rows| {
            let (qp, dp, sp) = (&qp, &dp, &sp);
            for i in rows {
                // SAFETY: row i's parts of the three buffers belong to this
                // range alone, and the buffers outlive the pool call.
                let (q, d, s) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(qp.0.add(i * k), k),
                        std::slice::from_raw_parts_mut(dp.0.add(i * kb), kb),
                        std::slice::from_raw_parts_mut(
                            sp.0.add(i * kb * per_block),
                            kb * per_block,
                        ),
                    )
                };
                let x = &xs[i * k..(i + 1) * k];
                for (b, (x, q)) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).enumerate() {
                    d[b] = q8k_block(x, q);
                    for (j, s) in s[b * per_block..(b + 1) * per_block].iter_mut().enumerate() {
                        let sum = |sb: usize| -> i32 {
                            q[32 * sb..32 * sb + 32].iter().map(|&v| v as i32).sum()
                        };
                        // Each sum fits 16 bits (|Σ| ≤ 32 · 127).
                        *s = (sum(2 * j) as u16 as u32 | ((sum(2 * j + 1) as u16 as u32) << 16))
                            as i32;
                    }
                }
            }
        });
        Self { qs, d, sums, kb }
    }
}

/// A buffer the pool's threads fill, each its own rows.
struct Rows<T>(*mut T);
// SAFETY: the pool's threads write disjoint rows.
unsafe impl<T> Send for Rows<T> {}
unsafe impl<T> Sync for Rows<T> {}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// The operands of one product, shared by the pool's threads.
struct View<'a, T> {
    a: &'a Activations,
    tiles: *const T,
    n: usize,
    m: usize,
}

// SAFETY: read-only views of buffers that outlive the pool call.
unsafe impl<T> Send for View<'_, T> {}
unsafe impl<T> Sync for View<'_, T> {}

/// All prompt rows against the weight row groups `groups`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel<T: Kernel>(v: &View<T>, groups: std::ops::Range<usize>, out: *mut f32) {
    walk_panel(v.m, groups, |i, g| {
        // SAFETY: as for the panel.
        unsafe {
            match v.m - i {
                4.. => T::tile::<4>(v, i, g, out),
                3 => T::tile::<3>(v, i, g, out),
                2 => T::tile::<2>(v, i, g, out),
                _ => T::tile::<1>(v, i, g, out),
            }
        }
    });
}

/// Prompt rows per tile on AVX-512 VNNI: its 32 vector registers hold the
/// rows' float and integer sums.
const VNNI_ROWS: usize = 8;

/// [`panel`] with the VNNI tiles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn panel_vnni<T: Kernel>(v: &View<T>, groups: std::ops::Range<usize>, out: *mut f32) {
    crate::q8_0::walk_panel_by(VNNI_ROWS, v.m, groups, |i, g| {
        // SAFETY: as for the panel.
        unsafe {
            match v.m - i {
                8.. => T::tile_vnni::<8>(v, i, g, out),
                7 => T::tile_vnni::<7>(v, i, g, out),
                6 => T::tile_vnni::<6>(v, i, g, out),
                5 => T::tile_vnni::<5>(v, i, g, out),
                4 => T::tile_vnni::<4>(v, i, g, out),
                3 => T::tile_vnni::<3>(v, i, g, out),
                2 => T::tile_vnni::<2>(v, i, g, out),
                _ => T::tile_vnni::<1>(v, i, g, out),
            }
        }
    });
}

/// Q4_K's [`Tile`] and Q5_K's [`Tile5`], which share one tile function.
trait Nibbles {
    /// Whether the values have a fifth bit ([`Tile5::qh`]).
    const FIVE: bool;
    /// The low four bits of the values, the scales and minimums.
    fn low(&self) -> &Tile;
    /// The fifth bits of sub-block `s` (zeros without).
    fn qh(&self, s: usize) -> &[u8; 4 * RN];
}

impl Nibbles for Tile {
    const FIVE: bool = false;
    fn low(&self) -> &Tile {
        self
    }
    fn qh(&self, _: usize) -> &[u8; 4 * RN] {
        &[0; 4 * RN]
    }
}

impl Nibbles for Tile5 {
    const FIVE: bool = true;
    fn low(&self) -> &Tile {
        &self.low
    }
    fn qh(&self, s: usize) -> &[u8; 4 * RN] {
        &self.qh[s]
    }
}

/// `M` prompt rows from `i0` against the [`RN`] Q4_K or Q5_K weight rows of
/// group `g`. Q4_K's values are 0–15: eight `maddubs` of a 32-value
/// sub-block add up in 16 bits (at most 8·2·15·127 = 30,480) before one
/// `madd` applies its scale. Q5_K's have their fifth bit or-ed in (0–31):
/// four at a time (31,496), two `madd`s per sub-block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_q45k<T: Nibbles, const M: usize>(v: &View<T>, i0: usize, g: usize, out: *mut f32) {
    debug_assert!(M <= RM);
    let (a, kb) = (v.a, v.a.kb);
    let k = kb * QK;
    // Steps (of two `maddubs`: low and high nibbles) per 16-bit sum.
    let run = if T::FIVE { 2 } else { 4 };
    unsafe {
        let mut acc = [_mm256_setzero_ps(); M];
        let tiles = v.tiles.add(g * kb);
        for b in 0..kb {
            let tile = &*tiles.add(b);
            let t = tile.low();
            let mut isum = [_mm256_setzero_si256(); M];
            for s in 0..8 {
                let qh = _mm256_loadu_si256(tile.qh(s).as_ptr() as *const __m256i);
                let sc = _mm256_loadu_si256(t.sc[s].as_ptr() as *const __m256i);
                for p0 in (0..4).step_by(run) {
                    let mut s16 = [_mm256_setzero_si256(); M];
                    for p in p0..p0 + run {
                        let (wl, wh) = step_values::<T>(&t.qs[s][p], qh, p);
                        for (i, s16) in s16.iter_mut().enumerate() {
                            let aq = a.qs.as_ptr().add((i0 + i) * k + b * QK + 32 * s);
                            let al =
                                _mm256_set1_epi32((aq.add(4 * p) as *const i32).read_unaligned());
                            let ah = _mm256_set1_epi32(
                                (aq.add(4 * (p + 4)) as *const i32).read_unaligned(),
                            );
                            *s16 = _mm256_add_epi16(*s16, _mm256_maddubs_epi16(wl, al));
                            *s16 = _mm256_add_epi16(*s16, _mm256_maddubs_epi16(wh, ah));
                        }
                    }
                    for (isum, &s16) in isum.iter_mut().zip(&s16) {
                        *isum = _mm256_add_epi32(*isum, _mm256_madd_epi16(s16, sc));
                    }
                }
            }
            fold_block(t, a, i0, b, &isum, &mut acc);
        }
        store_tile(v.n, i0, g, &acc, out);
    }
}

/// [`tile_q45k`] on AVX-512 VNNI: `vpdpbusd` adds each step's four
/// products per lane straight into 32-bit sums, so a sub-block is eight
/// instructions per prompt row where the 16-bit road takes sixteen (eight
/// `maddubs` and their adds) and a `madd` or two; the sub-block's scale then
/// multiplies its 32-bit sum (`vpmulld`). The same integers as the 16-bit
/// road (at most 32·31·127·63 per sub-block, eight of them: 63.5 million), so
/// the same results to the bit.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
#[inline]
unsafe fn tile_q45k_vnni<T: Nibbles, const M: usize>(
    v: &View<T>,
    i0: usize,
    g: usize,
    out: *mut f32,
) {
    debug_assert!(M <= VNNI_ROWS);
    let (a, kb) = (v.a, v.a.kb);
    let k = kb * QK;
    unsafe {
        let half = _mm256_set1_epi32(0xFFFF);
        let mut acc = [_mm256_setzero_ps(); M];
        let tiles = v.tiles.add(g * kb);
        for b in 0..kb {
            let tile = &*tiles.add(b);
            let t = tile.low();
            let mut isum = [_mm256_setzero_si256(); M];
            for s in 0..8 {
                let qh = _mm256_loadu_si256(tile.qh(s).as_ptr() as *const __m256i);
                let mut sub = [_mm256_setzero_si256(); M];
                for p in 0..4 {
                    let (wl, wh) = step_values::<T>(&t.qs[s][p], qh, p);
                    for (i, sub) in sub.iter_mut().enumerate() {
                        let aq = a.qs.as_ptr().add((i0 + i) * k + b * QK + 32 * s);
                        let al = _mm256_set1_epi32((aq.add(4 * p) as *const i32).read_unaligned());
                        let ah =
                            _mm256_set1_epi32((aq.add(4 * (p + 4)) as *const i32).read_unaligned());
                        *sub = _mm256_dpbusd_epi32(*sub, wl, al);
                        *sub = _mm256_dpbusd_epi32(*sub, wh, ah);
                    }
                }
                // Each lane's scale is its pair's low half (6 bits, positive).
                let sc =
                    _mm256_and_si256(_mm256_loadu_si256(t.sc[s].as_ptr() as *const __m256i), half);
                for (isum, &sub) in isum.iter_mut().zip(&sub) {
                    *isum = _mm256_add_epi32(*isum, _mm256_mullo_epi32(sub, sc));
                }
            }
            fold_block(t, a, i0, b, &isum, &mut acc);
        }
        store_tile(v.n, i0, g, &acc, out);
    }
}

/// Step `p` of a sub-block of a Q4_K-style tile: the values in the low
/// nibbles (`4p..4p + 4` of each row) and in the high ones (`16 + 4p..`),
/// with their fifth bits from `qh` where the type has them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn step_values<T: Nibbles>(qs: &[u8; 4 * RN], qh: __m256i, p: usize) -> (__m256i, __m256i) {
    let low = _mm256_set1_epi8(0xF);
    // SAFETY: 32 bytes read from a 32-byte array.
    let packed = unsafe { _mm256_loadu_si256(qs.as_ptr() as *const __m256i) };
    let mut wl = _mm256_and_si256(packed, low);
    let mut wh = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
    if T::FIVE {
        wl = _mm256_or_si256(wl, fifth_bit(qh, p));
        wh = _mm256_or_si256(wh, fifth_bit(qh, p + 4));
    }
    (wl, wh)
}

/// Adds block `b`'s integer sums `isum` of prompt rows `i0..i0 + M` (their
/// scaled products with Q4_K-style tile `t`) to `acc` in floats, less the
/// minimums times the activations' sums per 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn fold_block<const M: usize>(
    t: &Tile,
    a: &Activations,
    i0: usize,
    b: usize,
    isum: &[__m256i; M],
    acc: &mut [__m256; M],
) {
    // SAFETY: the caller's tile checked the rows and blocks are in bounds.
    unsafe {
        let d = _mm256_loadu_ps(t.d.as_ptr());
        let dmin = _mm256_loadu_ps(t.dmin.as_ptr());
        for (i, acc) in acc.iter_mut().enumerate() {
            let idx = (i0 + i) * a.kb + b;
            let sums = a.sums.as_ptr().add(idx * 4);
            let mut msum = _mm256_setzero_si256();
            for j in 0..4 {
                let mn = _mm256_loadu_si256(t.mn[j].as_ptr() as *const __m256i);
                msum =
                    _mm256_add_epi32(msum, _mm256_madd_epi16(mn, _mm256_set1_epi32(*sums.add(j))));
            }
            let ad = _mm256_broadcast_ss(&*a.d.as_ptr().add(idx));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), _mm256_mul_ps(d, ad), *acc);
            *acc = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_mul_ps(dmin, ad), *acc);
        }
    }
}

/// Stores the `M` prompt rows from `i0` of weight group `g` (an output of
/// `n` columns).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn store_tile<const M: usize>(
    n: usize,
    i0: usize,
    g: usize,
    acc: &[__m256; M],
    out: *mut f32,
) {
    let cols = RN.min(n - g * RN);
    for (i, &acc) in acc.iter().enumerate() {
        // SAFETY: rows i0..i0 + M and group g's columns are in the output.
        unsafe { crate::q8_0::store_lanes(acc, out.add((i0 + i) * n + g * RN), cols) };
    }
}

/// `M` prompt rows from `i0` against the [`RN`] Q6_K weight rows of group `g`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile_q6k<const M: usize>(v: &View<Tile6>, i0: usize, g: usize, out: *mut f32) {
    debug_assert!(M <= RM);
    let (a, kb) = (v.a, v.a.kb);
    let k = kb * QK;
    unsafe {
        let mut acc = [_mm256_setzero_ps(); M];
        let tiles = v.tiles.add(g * kb);
        for b in 0..kb {
            let t = &*tiles.add(b);
            let mut isum = [_mm256_setzero_si256(); M];
            for s in 0..16 {
                // Four products of at most 2·32·127 each: the 16-bit sums
                // cannot overflow (32,512).
                let mut s16 = [_mm256_setzero_si256(); M];
                for u in 0..4 {
                    let step = 4 * s + u;
                    let w = _mm256_loadu_si256(t.qs[step].as_ptr() as *const __m256i);
                    let wabs = _mm256_sign_epi8(w, w);
                    for (i, s16) in s16.iter_mut().enumerate() {
                        let aq = a.qs.as_ptr().add((i0 + i) * k + b * QK + 4 * step);
                        let aq = _mm256_set1_epi32((aq as *const i32).read_unaligned());
                        // |w| · (a with w's sign) = w · a (a is never -128).
                        *s16 = _mm256_add_epi16(
                            *s16,
                            _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(aq, w)),
                        );
                    }
                }
                let sc = _mm256_loadu_si256(t.sc[s].as_ptr() as *const __m256i);
                for (isum, &s16) in isum.iter_mut().zip(&s16) {
                    *isum = _mm256_add_epi32(*isum, _mm256_madd_epi16(s16, sc));
                }
            }
            let d = _mm256_loadu_ps(t.d.as_ptr());
            for (i, acc) in acc.iter_mut().enumerate() {
                let ad = _mm256_broadcast_ss(&*a.d.as_ptr().add((i0 + i) * kb + b));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), _mm256_mul_ps(d, ad), *acc);
            }
        }
        store_tile(v.n, i0, g, &acc, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kquant::KMatrix;
    use crate::tests::pseudo_random;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use std::sync::Arc;

    /// The layout gives what the file's blocks give: against the K-quant
    /// kernel's few-row path (the same integers, float sums in another
    /// order) and against the exact product of the dequantized weights.
    #[test]
    fn prompts_equal_the_file_block_kernel_and_the_exact_product() -> candle_core::Result<()> {
        if !crate::q8_0::kernel_available() {
            return Ok(());
        }
        let shapes = [
            (1, 256, 1),
            (5, 256, 13),
            (17, 512, 8),
            (64, 768, 33),
            (100, 256, 7),
        ];
        for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            for &(m, k, n) in &shapes {
                let w = Tensor::from_vec(pseudo_random(n * k, 7 + n as u64), (n, k), &Device::Cpu)?;
                let q = Arc::new(QTensor::quantize(&w, dtype)?);
                let km = KMatrix::from_qtensor(&q)?.expect("a K-quant matrix");
                let x = pseudo_random(m * k, 99 + m as u64);
                let mut ours = vec![0f32; m * n];
                match dtype {
                    GgmlDType::Q4K => {
                        Q4Tiles::from_blocks(n, k, &q.data()?).matmul(&x, m, &mut ours)
                    }
                    GgmlDType::Q5K => {
                        Q5Tiles::from_blocks(n, k, &q.data()?).matmul(&x, m, &mut ours)
                    }
                    _ => Q6Tiles::from_blocks(n, k, &q.data()?).matmul(&x, m, &mut ours),
                }
                // The few-row kernel, a row at a time.
                let mut rows = vec![0f32; m * n];
                for i in 0..m {
                    km.matmul(&x[i * k..(i + 1) * k], 1, &mut rows[i * n..(i + 1) * n])?;
                }
                let wd = q.dequantize(&Device::Cpu)?.to_vec2::<f32>()?;
                let (mut err, mut size) = (0f32, 0f32);
                for i in 0..m {
                    for j in 0..n {
                        let exact: f32 = (0..k).map(|l| x[i * k + l] * wd[j][l]).sum();
                        let (o, r) = (ours[i * n + j], rows[i * n + j]);
                        assert!(
                            (o - r).abs() <= 1e-4 * (1.0 + r.abs()),
                            "{dtype:?} {m}x{k}x{n} [{i},{j}]: {o} vs the block kernel's {r}"
                        );
                        err += (o - exact).abs();
                        size += exact.abs();
                    }
                }
                // Only the activations' 8-bit rounding stands between them.
                assert!(
                    err <= 0.02 * size,
                    "{dtype:?} {m}x{k}x{n}: mean error {err} of {size}"
                );
            }
        }
        Ok(())
    }

    /// The VNNI tiles (32-bit sums, the scale by `vpmulld`) give the
    /// 16-bit road's results to the bit, on every tile edge (rows 1–8 and
    /// past a row block, a partial weight group).
    #[test]
    fn vnni_tiles_equal_the_avx2_tiles_to_the_bit() -> candle_core::Result<()> {
        if !crate::q8_0::kernel_available() || !crate::q8_0::vnni_available() {
            eprintln!("skipped: no AVX-512 VNNI");
            return Ok(());
        }
        for dtype in [GgmlDType::Q4K, GgmlDType::Q5K] {
            for &(m, k, n) in &[(1, 256, 8), (7, 512, 13), (57, 768, 21), (100, 256, 64)] {
                let w = Tensor::from_vec(pseudo_random(n * k, 3 + k as u64), (n, k), &Device::Cpu)?;
                let data = QTensor::quantize(&w, dtype)?.data()?.to_vec();
                let x = pseudo_random(m * k, 5 + m as u64);
                let (mut avx2, mut vnni) = (vec![0f32; m * n], vec![0f32; m * n]);
                if dtype == GgmlDType::Q4K {
                    let t = Q4Tiles::from_blocks(n, k, &data);
                    t.matmul_with(&x, m, &mut avx2, false);
                    t.matmul_with(&x, m, &mut vnni, true);
                } else {
                    let t = Q5Tiles::from_blocks(n, k, &data);
                    t.matmul_with(&x, m, &mut avx2, false);
                    t.matmul_with(&x, m, &mut vnni, true);
                }
                assert_eq!(avx2, vnni, "{dtype:?} {m}x{k}x{n}");
            }
        }
        Ok(())
    }

    /// The 16-bit sums at their bounds: blocks whose every value is 15
    /// with scale and minimum 63 (d = dmin = 1: each weight 63·15 − 63 =
    /// 882), against activations all ±1 (quantized to ±127), give the exact
    /// ±882·k.
    #[test]
    fn the_widest_sums_do_not_overflow() {
        if !crate::q8_0::kernel_available() {
            return;
        }
        let (m, k, n) = (5, 512, 9);
        let mut block = [0xFFu8; BLOCK_BYTES];
        let one = half::f16::from_f32(1.0).to_le_bytes();
        block[0..2].copy_from_slice(&one);
        block[2..4].copy_from_slice(&one);
        let data: Vec<u8> = (0..n * k / QK).flat_map(|_| block).collect();
        let tiles = Q4Tiles::from_blocks(n, k, &data);
        for sign in [1f32, -1.0] {
            let x = vec![sign; m * k];
            let mut out = vec![0f32; m * n];
            tiles.matmul(&x, m, &mut out);
            let exact = sign * 882.0 * k as f32;
            assert!(out.iter().all(|&o| o == exact), "{out:?} vs {exact}");
        }
    }

    /// Q5_K's 16-bit sums at their bounds: every value 31 (all nibbles and
    /// fifth bits set), scale and minimum 63, d = dmin = 1 (each weight
    /// 63·31 − 63 = 1,890), against activations all ±1 give the exact
    /// ±1,890·k.
    #[test]
    fn the_widest_q5_sums_do_not_overflow() {
        if !crate::q8_0::kernel_available() {
            return;
        }
        let (m, k, n) = (5, 512, 9);
        let mut block = [0xFFu8; Q5_BLOCK_BYTES];
        let one = half::f16::from_f32(1.0).to_le_bytes();
        block[0..2].copy_from_slice(&one);
        block[2..4].copy_from_slice(&one);
        let data: Vec<u8> = (0..n * k / QK).flat_map(|_| block).collect();
        let tiles = Q5Tiles::from_blocks(n, k, &data);
        for sign in [1f32, -1.0] {
            let x = vec![sign; m * k];
            let mut out = vec![0f32; m * n];
            tiles.matmul(&x, m, &mut out);
            let exact = sign * 1890.0 * k as f32;
            assert!(out.iter().all(|&o| o == exact), "{out:?} vs {exact}");
        }
    }

    /// Q6_K's 16-bit sums at their bounds: every value 0 (less 32: −32),
    /// every scale −128, d = 1 (each weight 4,096), against activations all
    /// ±1 give the exact ±4,096·k.
    #[test]
    fn the_widest_q6_sums_do_not_overflow() {
        if !crate::q8_0::kernel_available() {
            return;
        }
        let (m, k, n) = (5, 512, 9);
        let mut block = [0u8; Q6_BLOCK_BYTES];
        block[192..208].fill(0x80);
        block[208..210].copy_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
        let data: Vec<u8> = (0..n * k / QK).flat_map(|_| block).collect();
        let tiles = Q6Tiles::from_blocks(n, k, &data);
        for sign in [1f32, -1.0] {
            let x = vec![sign; m * k];
            let mut out = vec![0f32; m * n];
            tiles.matmul(&x, m, &mut out);
            let exact = sign * 4096.0 * k as f32;
            assert!(out.iter().all(|&o| o == exact), "{out:?} vs {exact}");
        }
    }
}
