//! A Q8_0 matrix multiplication for x86-64 with AVX2 and FMA.
//!
//! Written by hand because candle 0.11's CPU path for Q8_0 weights on a machine
//! without AVX-512 VNNI is one dot product per (row, column) pair, each a single
//! FMA chain over the whole row (`k_quants::matmul` → `vec_dot_q8_0_q8_0`); its
//! repacked tiles (`repack_x86`) are switched off for Q8_0 on plain AVX2. On a
//! 512-token prompt that is where most of the prefill time went (perf: 62 % in
//! `BlockQ8_0::vec_dot`). llama.cpp's answer on the same CPUs is register
//! tiling (llamafile's tinyBLAS): each block of weights loaded once is
//! multiplied with several prompt rows, and each prompt block with several
//! weight rows, into independent accumulators. This module does the same:
//!
//! * weights keep the file's values (32 signed bytes per block, the block
//!   scales widened to `f32` once at load), laid out so that one vector holds
//!   four values of each of eight weight rows: four prompt values broadcast to
//!   every lane give eight rows' sums side by side (`_mm256_maddubs_epi16` on
//!   |w| and sign-adjusted activations, as ggml), with no horizontal additions
//!   (before, each of 4 weight rows × 3 prompt rows had its own accumulator and
//!   a horizontal sum: 512-token prefill of Qwen2.5-0.5B went from 1.06× to
//!   1.3–1.7× llama.cpp's, the products from 59–64 to 82–100 billion
//!   multiply-adds per second in `examples/matmul_speed.rs`);
//! * the activations are quantized to Q8_0 exactly the way ggml does it (scale
//!   `max|x| / 127` rounded to f16, values rounded to nearest), so results
//!   differ from candle's only in the order of float additions;
//! * a tile is [`RM`] prompt rows × [`RN`] weight rows: `RM` float
//!   accumulators and `RM` integer block sums fill AVX2's registers;
//! * the work is split over candle's own thread pool (the one its other CPU ops
//!   use), by panels of weight rows, so each thread reads each weight once per
//!   call and keeps its panel in cache while it walks the prompt rows.
//!
//! [`Linear`] uses it for Q8_0 weights when the CPU has AVX2 and FMA and falls
//! back to candle's `QMatMul` for everything else.
//!
//! The `unsafe` code here: SIMD intrinsics behind a run-time
//! CPU check, and raw pointers so the pool's threads can write disjoint parts
//! of one output buffer.
#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use std::sync::Arc;

use crate::kquant::KMatrix;
use crate::prepared::{Groups, SharedBytes};
use crate::q5_0::Q5Matrix;
use crate::rows::FileTable;

pub(crate) const QK: usize = 32;
/// Bytes of one Q8_0 block in a GGUF file: an f16 scale and 32 signed bytes.
const BLOCK_BYTES: usize = 2 + QK;

/// A linear layer without bias: `x · Wᵀ`.
#[derive(Clone, Debug)]
pub enum Linear {
    /// Q8_0 weights through this module's kernel.
    Q8(Arc<Q8Matrix>),
    /// Q5_0 weights through [`crate::q5_0`].
    Q5(Arc<Q5Matrix>),
    /// Q4_K, Q5_K and Q6_K weights: up to [`FEW_ROWS`] rows (decoding,
    /// drafted tokens) through [`crate::kquant`], which reads the weights as
    /// compact as they are in the file; prompts where
    /// [`KMatrix::takes_prompts`] (through [`crate::kquant_prompt`]: every
    /// K-quant on AVX2 without VNNI, Q4_K and Q5_K with it; Q5_K always);
    /// other prompts (Q6_K on VNNI) through candle, whose repacked tiles are
    /// faster there
    /// (`crates/kernels/examples/matmul_speed.rs`).
    K(Arc<KMatrix>),
    /// Anything else through candle.
    Candle(QMatMul),
}

impl Linear {
    /// Wraps a quantized tensor, taking the fast path where it applies.
    pub fn from_qtensor(t: QTensor) -> Result<Self> {
        if t.dtype() == GgmlDType::Q8_0 && t.device().is_cpu() && kernel_available() {
            if let Some(m) = Q8Matrix::from_qtensor(&t)? {
                return Ok(Self::Q8(Arc::new(m)));
            }
        }
        if t.dtype() == GgmlDType::Q5_0 && kernel_available() {
            if let Some(m) = Q5Matrix::from_qtensor(&t)? {
                return Ok(Self::Q5(Arc::new(m)));
            }
        }
        let t = Arc::new(t);
        if kernel_available() && kquant_enabled() {
            if let Some(m) = KMatrix::from_qtensor(&t)? {
                return Ok(Self::K(Arc::new(m)));
            }
        }
        Ok(Self::Candle(QMatMul::from_arc(t)?))
    }

    /// A Q4_K, Q5_K or Q6_K matrix `(n, k)` read in place from a mapped
    /// model file's `bytes` at `offset` ([`KMatrix::from_mapped`]); `None`
    /// for other types, where the kernels do not run, and where candle's
    /// product takes its prompts (Q6_K on AVX-512 VNNI): that needs the
    /// tensor in memory anyway, and the mapped pages the decoding rows read
    /// would be a second copy of it in the process's resident set. Read the
    /// tensor instead.
    pub fn from_mapped_kquant(
        dtype: GgmlDType,
        n: usize,
        k: usize,
        bytes: SharedBytes,
        offset: usize,
    ) -> Result<Option<Self>> {
        if !(kernel_available() && kquant_enabled() && KMatrix::takes_prompts_for(dtype)) {
            return Ok(None);
        }
        Ok(KMatrix::from_mapped(dtype, n, k, bytes, offset)?.map(|m| Self::K(Arc::new(m))))
    }
}

impl Linear {
    /// The fast path for a tensor's bytes as GGUF stores them, `(n, k)` of
    /// `dtype`: `Some` for Q8_0 and Q5_0 where the kernels run, `None` for
    /// the caller to read the tensor into a `QTensor` instead.
    pub fn from_raw(dtype: GgmlDType, n: usize, k: usize, data: &[u8]) -> Result<Option<Self>> {
        if !kernel_available() {
            return Ok(None);
        }
        Ok(Laid::from_bytes(dtype, n, k, data)?.and_then(Self::from_laid))
    }
}

/// A Q8_0 or Q5_0 matrix in the kernels' layout: what a prepared file keeps
/// ([`crate::prepared`]).
#[derive(Clone, Debug)]
pub enum Laid {
    /// Q8_0 groups.
    Q8(Arc<Q8Matrix>),
    /// Q5_0 groups.
    Q5(Arc<Q5Matrix>),
}

impl Laid {
    /// Lays out the bytes of a Q8_0 or Q5_0 tensor of shape `(n, k)` as GGUF
    /// stores them (`None` for other types and shapes).
    pub fn from_bytes(dtype: GgmlDType, n: usize, k: usize, data: &[u8]) -> Result<Option<Self>> {
        if !k.is_multiple_of(QK) || n == 0 {
            return Ok(None);
        }
        Ok(match dtype {
            GgmlDType::Q8_0 => Some(Self::Q8(Arc::new(Q8Matrix::from_bytes(n, k, data)?))),
            GgmlDType::Q5_0 => Some(Self::Q5(Arc::new(Q5Matrix::from_bytes(n, k, data)?))),
            _ => None,
        })
    }

    /// `dtype`'s groups for an `(n, k)` matrix at `offset` of a prepared
    /// file's `bytes`, read in place (`None` for other types).
    pub fn read(
        dtype: GgmlDType,
        n: usize,
        k: usize,
        bytes: SharedBytes,
        offset: usize,
    ) -> Result<Option<Self>> {
        Ok(match dtype {
            GgmlDType::Q8_0 => Some(Self::Q8(Arc::new(Q8Matrix::from_prepared(
                n, k, bytes, offset,
            )?))),
            GgmlDType::Q5_0 => Some(Self::Q5(Arc::new(Q5Matrix::from_prepared(
                n, k, bytes, offset,
            )?))),
            _ => None,
        })
    }

    /// The GGUF type the groups were laid out from.
    pub fn dtype(&self) -> GgmlDType {
        match self {
            Self::Q8(_) => GgmlDType::Q8_0,
            Self::Q5(_) => GgmlDType::Q5_0,
        }
    }

    /// The groups' bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Self::Q8(m) => m.prepared_bytes(),
            Self::Q5(m) => m.prepared_bytes(),
        }
    }
}

impl Linear {
    /// The layer over laid-out weights; `None` where this CPU does not run
    /// the kernels.
    pub fn from_laid(m: Laid) -> Option<Self> {
        kernel_available().then_some(match m {
            Laid::Q8(m) => Self::Q8(m),
            Laid::Q5(m) => Self::Q5(m),
        })
    }

    /// The laid-out weights (`None`: the file's blocks are used as they are).
    pub fn laid(&self) -> Option<Laid> {
        match self {
            Self::Q8(m) => Some(Laid::Q8(Arc::clone(m))),
            Self::Q5(m) => Some(Laid::Q5(Arc::clone(m))),
            Self::K(..) | Self::Candle(_) => None,
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Q8(m) => {
                let xs = xs.contiguous()?;
                xs.apply_op1_no_bwd(&**m)
            }
            Self::Q5(m) => {
                let xs = xs.contiguous()?;
                xs.apply_op1_no_bwd(&**m)
            }
            Self::K(m) => {
                let rows = xs.elem_count() / xs.dim(candle_core::D::Minus1)?.max(1);
                if rows <= FEW_ROWS || m.takes_prompts() {
                    xs.contiguous()?.apply_op1_no_bwd(&**m)
                } else {
                    m.candle()?.forward(xs)
                }
            }
            Self::Candle(m) => {
                // candle's kernels take another path for one row than for
                // several (Q6_K: compact dot products for one row, repacked
                // tiles for more), so a row's result would depend on the rows
                // beside it. A few rows (drafted tokens being checked) go one
                // at a time so that each is exactly what decoding it alone
                // gives; prompts go whole.
                let rows = xs.elem_count() / xs.dim(candle_core::D::Minus1)?.max(1);
                if rows > 1 && rows <= FEW_ROWS {
                    let dims = xs.dims().to_vec();
                    let flat = xs.reshape((rows, 1, dims[dims.len() - 1]))?;
                    let outs = (0..rows)
                        .map(|i| m.forward(&flat.get(i)?))
                        .collect::<Result<Vec<_>>>()?;
                    let out = Tensor::cat(&outs, 0)?;
                    let mut shape = dims;
                    *shape.last_mut().expect("at least one dim") = out.dim(1)?;
                    out.reshape(shape)
                } else {
                    m.forward(xs)
                }
            }
        }
    }
}

/// A token embedding table. Q8_0 tables stay quantized (rows are
/// dequantized as they are looked up) and can double as the output layer of
/// a model with tied embeddings; anything else is dequantized once, as candle
/// does. For Qwen2.5-0.5B that is 150 MB instead of 545 MB of f32.
#[derive(Clone, Debug)]
pub enum TokenEmbedding {
    /// Kept quantized.
    Q8(Arc<Q8Matrix>),
    /// Q5_0, kept quantized.
    Q5(Arc<Q5Matrix>),
    /// Q4_K or Q6_K, kept quantized (for Qwen2.5-1.5B's Q4_K table, 131 MB
    /// instead of 933 MB of f32).
    K(Arc<KMatrix>),
    /// Dequantized.
    Dense(candle_nn::Embedding),
    /// Read from the model file as rows are looked up, in any type candle
    /// reads: for a model with an output head of its own, the table is only
    /// looked up (Qwen2.5-0.5B's Q5_0 table: 94 MB not held; see
    /// [`crate::rows`]).
    File(Arc<FileTable>),
}

impl TokenEmbedding {
    /// The table from its quantized tensor `(vocabulary, hidden)`.
    pub fn from_qtensor(t: QTensor) -> Result<Self> {
        if t.dtype() == GgmlDType::Q8_0 && t.device().is_cpu() {
            if let Some(m) = Q8Matrix::from_qtensor(&t)? {
                return Ok(Self::Q8(Arc::new(m)));
            }
        }
        if let Some(m) = Q5Matrix::from_qtensor(&t)? {
            return Ok(Self::Q5(Arc::new(m)));
        }
        let t = Arc::new(t);
        if let Some(m) = KMatrix::from_qtensor(&t)? {
            return Ok(Self::K(Arc::new(m)));
        }
        let hidden = t.shape().dims2()?.1;
        Ok(Self::Dense(candle_nn::Embedding::new(
            t.dequantize(&t.device())?,
            hidden,
        )))
    }

    /// A Q4_K, Q5_K or Q6_K table read in place from a mapped model file
    /// (as [`Linear::from_mapped_kquant`]); `None` for other types.
    pub fn from_mapped_kquant(
        dtype: GgmlDType,
        n: usize,
        k: usize,
        bytes: SharedBytes,
        offset: usize,
    ) -> Result<Option<Self>> {
        Ok(KMatrix::from_mapped(dtype, n, k, bytes, offset)?.map(|m| Self::K(Arc::new(m))))
    }

    /// [`TokenEmbedding::from_qtensor`] for a Q8_0 or Q5_0 table's bytes as
    /// GGUF stores them; `None` for other types.
    pub fn from_raw(dtype: GgmlDType, n: usize, k: usize, data: &[u8]) -> Result<Option<Self>> {
        Ok(Laid::from_bytes(dtype, n, k, data)?.map(Self::from_laid))
    }

    /// The table over laid-out weights.
    pub fn from_laid(m: Laid) -> Self {
        match m {
            Laid::Q8(m) => Self::Q8(m),
            Laid::Q5(m) => Self::Q5(m),
        }
    }

    /// The laid-out weights (`None`: kept otherwise).
    pub fn laid(&self) -> Option<Laid> {
        match self {
            Self::Q8(m) => Some(Laid::Q8(Arc::clone(m))),
            Self::Q5(m) => Some(Laid::Q5(Arc::clone(m))),
            Self::K(_) | Self::Dense(_) | Self::File(_) => None,
        }
    }

    /// The same weights as an output layer, where they are kept quantized
    /// and the kernel runs on this CPU (`None`: load the tensor again).
    pub fn as_linear(&self) -> Option<Linear> {
        match self {
            Self::Q8(m) if kernel_available() => Some(Linear::Q8(Arc::clone(m))),
            Self::Q5(m) if kernel_available() => Some(Linear::Q5(Arc::clone(m))),
            Self::K(m) if kernel_available() && kquant_enabled() => Some(Linear::K(Arc::clone(m))),
            _ => None,
        }
    }
}

impl Module for TokenEmbedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(e) => e.forward(ids),
            Self::Q8(m) => lookup(ids, m.n, m.k, |id, row| {
                m.dequantize_row(id, row);
                Ok(())
            }),
            Self::Q5(m) => lookup(ids, m.rows(), m.cols(), |id, row| {
                m.dequantize_row(id, row);
                Ok(())
            }),
            Self::K(m) => lookup(ids, m.rows(), m.cols(), |id, row| m.dequantize_row(id, row)),
            Self::File(t) => {
                let flat: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                let mut dims = ids.dims().to_vec();
                dims.push(t.cols());
                t.lookup(&flat)?.to_device(ids.device())?.reshape(dims)
            }
        }
    }
}

/// The rows of a `vocabulary × hidden` table for `ids`, each dequantized by `row`.
fn lookup(
    ids: &Tensor,
    vocabulary: usize,
    hidden: usize,
    row: impl Fn(usize, &mut [f32]) -> Result<()>,
) -> Result<Tensor> {
    let flat: Vec<u32> = ids.flatten_all()?.to_vec1()?;
    let mut out = vec![0f32; flat.len() * hidden];
    for (&id, dst) in flat.iter().zip(out.chunks_exact_mut(hidden)) {
        let id = id as usize;
        if id >= vocabulary {
            candle_core::bail!("token id {id} is outside the vocabulary of {vocabulary}")
        }
        row(id, dst)?;
    }
    let mut dims = ids.dims().to_vec();
    dims.push(hidden);
    Tensor::from_vec(out, dims, ids.device())
}

/// Whether this CPU runs the kernel (AVX2, FMA and F16C, checked at run time).
pub fn kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether Q4_K and Q6_K weights take [`crate::kquant`]'s kernels
/// (`RAGD_NO_KQUANT=1` leaves them to candle, to compare the two).
fn kquant_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RAGD_NO_KQUANT").map_or(true, |v| v.is_empty() || v == "0"))
}

/// Whether the CPU has AVX-512 VNNI with 256-bit forms (checked once;
/// `RAGD_NO_VNNI=1` turns them off, to measure what an AVX2-only CPU gets).
pub(crate) fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *VNNI.get_or_init(|| {
            std::env::var("RAGD_NO_VNNI").map_or(true, |v| v.is_empty() || v == "0")
                && std::is_x86_feature_detected!("avx512vnni")
                && std::is_x86_feature_detected!("avx512vl")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// An `n × k` Q8_0 weight matrix, one row per output, stored in groups of
/// [`RN`] rows whose blocks are interleaved four values at a time: one
/// 32-byte vector holds values `4t..4t+4` of block `l` of each of the group's
/// eight rows, so a product with four activation values broadcast to all
/// lanes gives the eight rows' partial sums side by side, with no horizontal
/// additions (the layout of llamafile's and candle's repacked tiles). The last
/// group is padded with zero rows.
pub struct Q8Matrix {
    n: usize,
    k: usize,
    /// `ceil(n/RN) · k/32` interleaved blocks, group-major.
    groups: Groups<Group>,
}

/// Block `l` of [`RN`] consecutive weight rows: `qs[t][4r + b]` is value
/// `4t + b` of the block of row `r`.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
struct Group {
    qs: [[i8; 4 * RN]; QK / 4],
    d: [f32; RN],
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Matrix({}x{})", self.n, self.k)
    }
}

impl Q8Matrix {
    /// Copies a Q8_0 tensor of shape `(n, k)`; `None` for other shapes.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let Ok((n, k)) = t.shape().dims2() else {
            return Ok(None);
        };
        if t.dtype() != GgmlDType::Q8_0 || k % QK != 0 || n == 0 {
            return Ok(None);
        }
        Self::from_bytes(n, k, &t.data()?).map(Some)
    }

    /// From the bytes of a Q8_0 tensor of shape `(n, k)` as GGUF stores it
    /// (read in place from a mapped file, without a copy in a `QTensor`).
    pub fn from_bytes(n: usize, k: usize, data: &[u8]) -> Result<Self> {
        if !k.is_multiple_of(QK) || n == 0 {
            candle_core::bail!("a Q8_0 matrix of {n}x{k}: columns must be a multiple of {QK}");
        }
        let blocks = n * k / QK;
        if data.len() != blocks * BLOCK_BYTES {
            candle_core::bail!(
                "Q8_0 tensor of {n}x{k} has {} bytes, expected {}",
                data.len(),
                blocks * BLOCK_BYTES
            );
        }
        let kb = k / QK;
        let zero = Group {
            qs: [[0; 4 * RN]; QK / 4],
            d: [0.0; RN],
        };
        let mut groups = vec![zero; n.div_ceil(RN) * kb];
        // Re-laying a model's weights out one block at a time on one thread was
        // most of loading Qwen2.5-0.5B (267 MB of Q5_0, 146 MB of Q8_0).
        crate::par_chunks_mut(&mut groups, kb, |rg, groups| {
            for row in rg * RN..(rg * RN + RN).min(n) {
                let r = row % RN;
                let blocks = &data[row * kb * BLOCK_BYTES..(row + 1) * kb * BLOCK_BYTES];
                for (g, block) in groups.iter_mut().zip(blocks.chunks_exact(BLOCK_BYTES)) {
                    g.d[r] = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
                    for (v, &byte) in block[2..].iter().enumerate() {
                        g.qs[v / 4][4 * r + v % 4] = byte as i8;
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
            candle_core::bail!("a Q8_0 matrix of {n}x{k}: columns must be a multiple of {QK}");
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

    /// Weight row `j` as f32 values.
    fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        let kb = self.k / QK;
        let groups = &self.groups[(j / RN) * kb..(j / RN + 1) * kb];
        let r = j % RN;
        for (g, out) in groups.iter().zip(out.chunks_exact_mut(QK)) {
            let d = g.d[r];
            for (v, o) in out.iter_mut().enumerate() {
                *o = g.qs[v / 4][4 * r + v % 4] as f32 * d;
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
            "the Q8_0 kernel needs AVX2, FMA and F16C"
        );
        let kb = self.k / QK;
        let mut a_qs = vec![[0i8; QK]; m * kb];
        let mut a_d = vec![0f32; m * kb];
        quantize_rows(lhs, &mut a_qs, &mut a_d);
        // The VNNI kernel's correction per activation block (see `tile_vnni`).
        let offsets: Vec<i32> = if vnni {
            block_sums(&a_qs, -128)
        } else {
            Vec::new()
        };
        #[cfg(target_arch = "x86_64")]
        {
            let a = Operand {
                qs: a_qs.as_ptr(),
                d: a_d.as_ptr(),
                offsets: offsets.as_ptr(),
                rows: m,
                kb,
                add,
            };
            let w = Weights {
                groups: self.groups.as_ptr(),
                n: self.n,
            };
            let out = SendPtr(dst.as_mut_ptr());
            // Work items are groups of RN weight rows; the pool hands each thread
            // contiguous ranges of them (a panel), walked over all prompt rows.
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

impl CustomOp1 for Q8Matrix {
    fn name(&self) -> &'static str {
        "q8_0-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        matmul_op(self.name(), self.k, self.n, storage, layout, |x, m, dst| {
            self.matmul(x, m, dst);
            Ok(())
        })
    }
}

/// The body of every kernel's `CustomOp1::cpu_fwd`: checks that the input is
/// contiguous f32 ending in `k`, runs `matmul` (rows, `m`, output) on it and
/// returns the output with its last dimension `n`.
pub(crate) fn matmul_op(
    name: &str,
    k: usize,
    n: usize,
    storage: &CpuStorage,
    layout: &Layout,
    matmul: impl FnOnce(&[f32], usize, &mut [f32]) -> Result<()>,
) -> Result<(CpuStorage, Shape)> {
    let CpuStorage::F32(xs) = storage else {
        candle_core::bail!(
            "{name}: input must be f32, got {:?}",
            candle_core::backend::BackendStorage::dtype(storage)
        )
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{name}: input must be contiguous")
    };
    let dims = layout.shape().dims();
    if dims.last() != Some(&k) {
        candle_core::bail!("{name}: input {:?} does not end in {}", dims, k)
    }
    let m = layout.shape().elem_count() / k;
    let mut dst = vec![0f32; m * n];
    matmul(&xs[start..end], m, &mut dst)?;
    let mut out = dims.to_vec();
    *out.last_mut().expect("checked above") = n;
    Ok((CpuStorage::F32(dst), Shape::from(out)))
}

/// Walks a panel of weight-row groups over all `rows` prompt rows: few rows
/// (decoding, drafted tokens) all at once per group, more in blocks of
/// [`ROW_BLOCK`], so each group's weights are read once per block from L1
/// while the block's activations stay in L2. `tile(i, g)` computes up to
/// [`RM`] rows from `i` against group `g`.
#[inline(always)]
pub(crate) fn walk_panel(
    rows: usize,
    groups: std::ops::Range<usize>,
    tile: impl FnMut(usize, usize),
) {
    walk_panel_by(RM, rows, groups, tile)
}

/// [`walk_panel`] with tiles of `step` rows (a divisor of [`ROW_BLOCK`]).
#[inline(always)]
pub(crate) fn walk_panel_by(
    step: usize,
    rows: usize,
    groups: std::ops::Range<usize>,
    mut tile: impl FnMut(usize, usize),
) {
    let block = if rows <= FEW_ROWS { rows } else { ROW_BLOCK };
    for r0 in (0..rows).step_by(block.max(1)) {
        let r1 = (r0 + block).min(rows);
        for g in groups.clone() {
            for i in (r0..r1).step_by(step) {
                tile(i, g);
            }
        }
    }
}

/// Quantizes rows of 32-value blocks the way ggml's `quantize_row_q8_0` does,
/// over the pool's threads when there are many blocks, with AVX2 where the
/// CPU has it (the same values as [`quantize_blocks_scalar`]: the same
/// multiplication, rounding to nearest even). Single-threaded scalar code was
/// a few percent of a prefill with the other core idle, and about a fifth of
/// a wide matrix product on few output rows.
pub(crate) fn quantize_rows(xs: &[f32], qs: &mut [[i8; QK]], d: &mut [f32]) {
    let blocks = qs.len();
    debug_assert_eq!(xs.len(), blocks * QK);
    debug_assert_eq!(d.len(), blocks);
    let simd = kernel_available();
    let run = |xs: &[f32], qs: &mut [[i8; QK]], d: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: AVX2 was checked at run time.
            unsafe { quantize_blocks_avx2(xs, qs, d) };
            return;
        }
        let _ = simd;
        quantize_blocks_scalar(xs, qs, d)
    };
    // Below this many blocks (a few decode rows) threads cost more than they save.
    if blocks < 1024 {
        return run(xs, qs, d);
    }
    struct Out(*mut [i8; QK], *mut f32);
    // SAFETY: each range below is written by one thread only.
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}
    let out = Out(qs.as_mut_ptr(), d.as_mut_ptr());
    let chunks = blocks.div_ceil(256);
    candle_core::utils::barrier_pool().execute_chunked(chunks, |range| {
        let out = &out;
        let (b0, b1) = (range.start * 256, (range.end * 256).min(blocks));
        // SAFETY: blocks b0..b1 of qs and d belong to this range alone, and
        // the buffers outlive the pool call.
        let (qs, d) = unsafe {
            (
                std::slice::from_raw_parts_mut(out.0.add(b0), b1 - b0),
                std::slice::from_raw_parts_mut(out.1.add(b0), b1 - b0),
            )
        };
        run(&xs[b0 * QK..b1 * QK], qs, d);
    });
}

/// `times` × each quantized block's sum: the integer correction of a
/// weight offset (Q4_0's 8, Q5_0's 16, the VNNI kernel's 128) per block.
pub(crate) fn block_sums(qs: &[[i8; QK]], times: i32) -> Vec<i32> {
    qs.iter()
        .map(|q| times * q.iter().map(|&v| v as i32).sum::<i32>())
        .collect()
}

/// Bit `t` (0–7) of each byte of `bits`, moved to bit 4: a 5-bit value's
/// fifth bit, stored apart, to or into its nibble (Q5_0, Q5_K). The mask
/// keeps one bit per byte, so no bit crosses into the next byte under the
/// 16-bit shift.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn fifth_bit(bits: __m256i, t: usize) -> __m256i {
    let bit = _mm256_and_si256(bits, _mm256_set1_epi8((1u8 << t) as i8));
    match t {
        0 => _mm256_slli_epi16(bit, 4),
        1 => _mm256_slli_epi16(bit, 3),
        2 => _mm256_slli_epi16(bit, 2),
        3 => _mm256_slli_epi16(bit, 1),
        4 => bit,
        5 => _mm256_srli_epi16(bit, 1),
        6 => _mm256_srli_epi16(bit, 2),
        _ => _mm256_srli_epi16(bit, 3),
    }
}

/// [`quantize_rows`] one block at a time, without SIMD.
fn quantize_blocks_scalar(xs: &[f32], qs: &mut [[i8; QK]], d: &mut [f32]) {
    for ((x, q), d) in xs.chunks_exact(QK).zip(qs.iter_mut()).zip(d.iter_mut()) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        *d = half::f16::from_f32(scale).to_f32();
        for (q, &v) in q.iter_mut().zip(x) {
            *q = (v * inv).round_ties_even() as i8;
        }
    }
}

/// [`quantize_blocks_scalar`] with AVX2 (ggml's vector form of it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_blocks_avx2(xs: &[f32], qs: &mut [[i8; QK]], d: &mut [f32]) {
    let sign = _mm256_set1_ps(-0.0);
    for ((x, q), d) in xs.chunks_exact(QK).zip(qs.iter_mut()).zip(d.iter_mut()) {
        let v = [
            _mm256_loadu_ps(x.as_ptr()),
            _mm256_loadu_ps(x.as_ptr().add(8)),
            _mm256_loadu_ps(x.as_ptr().add(16)),
            _mm256_loadu_ps(x.as_ptr().add(24)),
        ];
        let abs = |v| _mm256_andnot_ps(sign, v);
        let m = _mm256_max_ps(
            _mm256_max_ps(abs(v[0]), abs(v[1])),
            _mm256_max_ps(abs(v[2]), abs(v[3])),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        let scale = _mm_cvtss_f32(m) / 127.0;
        let inv = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
        *d = half::f16::from_f32(scale).to_f32();
        // Round to nearest even (the default rounding mode), to i32, then
        // packed to i8 (the packs interleave 128-bit lanes; the permutation
        // puts them back in order). |v·inv| ≤ 127: no saturation.
        let i = [
            _mm256_cvtps_epi32(_mm256_mul_ps(v[0], inv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[1], inv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[2], inv)),
            _mm256_cvtps_epi32(_mm256_mul_ps(v[3], inv)),
        ];
        let p = _mm256_packs_epi16(
            _mm256_packs_epi32(i[0], i[1]),
            _mm256_packs_epi32(i[2], i[3]),
        );
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, p);
    }
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Rows of weights per tile: one per lane of a vector of eight i32 or f32.
pub(crate) const RN: usize = 8;
/// Prompt rows per tile.
pub(crate) const RM: usize = 4;
/// Up to this many rows (decode, drafted tokens), a panel walks its weights
/// once, all rows per weight group; beyond, [`ROW_BLOCK`] rows at a time. The
/// tiles compute the same sums either way.
pub(crate) const FEW_ROWS: usize = 16;
/// Prompt rows per block (a multiple of [`RM`]): 48 rows of the widest input
/// (Qwen's 4,864) are 233 KB of activations, within L2.
pub(crate) const ROW_BLOCK: usize = 48;

/// The quantized prompt rows.
#[derive(Clone, Copy)]
struct Operand {
    qs: *const [i8; QK],
    d: *const f32,
    /// For the VNNI kernel: −128 × the sum of each block's values.
    offsets: *const i32,
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

/// The output buffer, shared by the pool's threads.
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: the kernels' threads write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Stores an accumulator's lanes (outputs `g·RN ..`) to `dst`, only the first
/// `cols` where the group is the padded last one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn store_lanes(acc: __m256, dst: *mut f32, cols: usize) {
    unsafe {
        if cols == RN {
            _mm256_storeu_ps(dst, acc);
        } else {
            let mut lanes = [0f32; RN];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, cols);
        }
    }
}

/// Adds an accumulator's lanes to `dst`, as [`store_lanes`] stores them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn add_lanes(acc: __m256, dst: *mut f32, cols: usize) {
    unsafe {
        if cols == RN {
            _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), acc));
        } else {
            let mut lanes = [0f32; RN];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
            for (c, lane) in lanes.iter().take(cols).enumerate() {
                *dst.add(c) += lane;
            }
        }
    }
}

/// Adds each row's integer block sums (block `l` against `block`), times
/// the weights' and the row's block scales, to the row's accumulator.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn scale_block<const M: usize>(
    acc: &mut [__m256; M],
    isum: &[__m256i; M],
    block: &Group,
    a: &Operand,
    i0: usize,
    l: usize,
) {
    unsafe {
        let wd = _mm256_loadu_ps(block.d.as_ptr());
        for (i, acc) in acc.iter_mut().enumerate() {
            let ad = _mm256_broadcast_ss(&*a.d.add((i0 + i) * a.kb + l));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), _mm256_mul_ps(wd, ad), *acc);
        }
    }
}

/// Asks for a tile's outputs (rows `i0..i0 + M`, the outputs of group `g`)
/// ahead of the block loop, when the tile will add to them: in the
/// embedder's layers (`crate::dense`) the output rows hold the bias and
/// residual, written in an earlier pass over a matrix of megabytes, and a
/// tile walks a column strip of it, which the hardware prefetchers do not
/// follow. Without it the adds waited on memory for 17 % of an e5 batch on
/// the Q4_0 kernel (`perf`, 256 texts, 2 threads).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn prefetch_outputs<const M: usize>(
    add: bool,
    out: *mut f32,
    n: usize,
    i0: usize,
    g: usize,
) {
    if add {
        for i in 0..M {
            // SAFETY: a prefetch never faults; the address is the tile's
            // first output of row i0 + i, in bounds as the panel walks them.
            _mm_prefetch::<_MM_HINT_T0>(out.wrapping_add((i0 + i) * n + g * RN) as *const i8);
        }
    }
}

/// Stores (or adds, for [`Q8Matrix::matmul_add`]) a tile's accumulators:
/// rows `i0..i0 + M`, the outputs of group `g`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store_tile<const M: usize>(
    acc: &[__m256; M],
    a: &Operand,
    w: &Weights,
    i0: usize,
    g: usize,
    out: *mut f32,
) {
    let cols = RN.min(w.n - g * RN);
    for (i, &acc) in acc.iter().enumerate() {
        // SAFETY: row i0 + i < rows and the group's first output g·RN < n,
        // as the panel walks them; `cols` stops at the matrix's last output.
        unsafe {
            let dst = out.add((i0 + i) * w.n + g * RN);
            if a.add {
                add_lanes(acc, dst, cols);
            } else {
                store_lanes(acc, dst, cols);
            }
        }
    }
}

/// All prompt rows against the weight row groups `groups`, with AVX2:
/// |w| times the activations with w's sign, by `maddubs`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel_avx2(a: &Operand, w: &Weights, groups: std::ops::Range<usize>, out: *mut f32) {
    let tile = |i: usize, g: usize| {
        // SAFETY: as for the panel (the caller checked the features).
        unsafe {
            match RM.min(a.rows - i) {
                4 => tile_avx2::<4>(a, w, i, g, out),
                3 => tile_avx2::<3>(a, w, i, g, out),
                2 => tile_avx2::<2>(a, w, i, g, out),
                _ => tile_avx2::<1>(a, w, i, g, out),
            }
        }
    };
    walk_panel(a.rows, groups, tile);
}

/// `M` prompt rows from `i0` against the [`RN`] weight rows of group `g`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_avx2<const M: usize>(a: &Operand, w: &Weights, i0: usize, g: usize, out: *mut f32) {
    let kb = a.kb;
    unsafe {
        prefetch_outputs::<M>(a.add, out, w.n, i0, g);
        // M f32 accumulators and M block sums (lane r: weight row r)
        // plus the weights, their absolute values and two temporaries
        // fit AVX2's sixteen registers.
        let mut acc = [_mm256_setzero_ps(); M];
        let group = w.groups.add(g * kb);
        for l in 0..kb {
            let block = &*group.add(l);
            let mut isum = [_mm256_setzero_si256(); M];
            for t in 0..QK / 4 {
                let wq = _mm256_loadu_si256(block.qs[t].as_ptr() as *const __m256i);
                let wabs = _mm256_sign_epi8(wq, wq);
                for (i, isum) in isum.iter_mut().enumerate() {
                    // Values 4t..4t+4 of prompt row i0+i, in every lane.
                    let aq = (a.qs.add((i0 + i) * kb + l) as *const i8).add(4 * t);
                    let aq = _mm256_set1_epi32(std::ptr::read_unaligned(aq as *const i32));
                    // |w| · (a with w's sign) = w · a (neither side is ever -128).
                    // u8·i8 pairs to i16 (cannot saturate: at most 2·128·127), then to i32.
                    *isum = _mm256_add_epi32(
                        *isum,
                        _mm256_madd_epi16(
                            _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(aq, wq)),
                            _mm256_set1_epi16(1),
                        ),
                    );
                }
            }
            scale_block(&mut acc, &isum, block, a, i0, l);
        }
        store_tile(&acc, a, w, i0, g, out);
    }
}

/// Prompt rows per VNNI tile: AVX-512VL's 32 vector registers hold eight
/// f32 accumulators, eight block sums and the weights.
const RM_VNNI: usize = 8;

/// All prompt rows against the weight row groups `groups`, with AVX-512
/// VNNI, [`RM_VNNI`] rows per tile.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
unsafe fn panel_vnni(a: &Operand, w: &Weights, groups: std::ops::Range<usize>, out: *mut f32) {
    let tile = |i: usize, g: usize| {
        // SAFETY: as for the panel (the caller checked the features).
        unsafe {
            match RM_VNNI.min(a.rows - i) {
                8 => tile_vnni::<8>(a, w, i, g, out),
                7 => tile_vnni::<7>(a, w, i, g, out),
                6 => tile_vnni::<6>(a, w, i, g, out),
                5 => tile_vnni::<5>(a, w, i, g, out),
                4 => tile_vnni::<4>(a, w, i, g, out),
                3 => tile_vnni::<3>(a, w, i, g, out),
                2 => tile_vnni::<2>(a, w, i, g, out),
                _ => tile_vnni::<1>(a, w, i, g, out),
            }
        }
    };
    walk_panel_by(RM_VNNI, a.rows, groups, tile);
}

/// `M` prompt rows from `i0` against the [`RN`] weight rows of group `g`,
/// with `vpdpbusd` (unsigned × signed bytes, four per lane, into i32).
///
/// The weights are made unsigned by adding 128 (flipping their top bit, one
/// instruction per four values of eight rows, shared by the tile's rows), so
/// the activations go in as they are, broadcast straight from memory:
/// Σ (w + 128)·a = Σ w·a + 128·Σ a, and each block sum starts at −128·Σ a
/// (`Operand::offsets`). The sums are the same integers as the AVX2
/// kernel's, so the results are the same to the bit. Before (|w| and the
/// activations' signs adjusted per row, as the AVX2 kernel does, four rows
/// per tile): three instructions per row and step instead of one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
#[inline]
unsafe fn tile_vnni<const M: usize>(a: &Operand, w: &Weights, i0: usize, g: usize, out: *mut f32) {
    let kb = a.kb;
    unsafe {
        prefetch_outputs::<M>(a.add, out, w.n, i0, g);
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_ps(); M];
        let group = w.groups.add(g * kb);
        for l in 0..kb {
            let block = &*group.add(l);
            let mut isum = [_mm256_setzero_si256(); M];
            for (i, isum) in isum.iter_mut().enumerate() {
                *isum = _mm256_set1_epi32(*a.offsets.add((i0 + i) * kb + l));
            }
            for t in 0..QK / 4 {
                let wq = _mm256_loadu_si256(block.qs[t].as_ptr() as *const __m256i);
                let wu = _mm256_xor_si256(wq, flip);
                for (i, isum) in isum.iter_mut().enumerate() {
                    let aq = (a.qs.add((i0 + i) * kb + l) as *const i8).add(4 * t);
                    let aq = _mm256_set1_epi32(std::ptr::read_unaligned(aq as *const i32));
                    *isum = _mm256_dpbusd_epi32(*isum, wu, aq);
                }
            }
            scale_block(&mut acc, &isum, block, a, i0, l);
        }
        store_tile(&acc, a, w, i0, g, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::pseudo_random;
    use candle_core::{Device, Tensor};

    /// The kernel against candle's own Q8_0 matmul on the same weights, for
    /// shapes that exercise every tile edge.
    #[test]
    fn matches_candle_q8_0_matmul() -> Result<()> {
        if !kernel_available() {
            eprintln!("skipped: no AVX2/FMA/F16C");
            return Ok(());
        }
        let dev = Device::Cpu;
        for &(m, k, n) in crate::tests::EDGE_SHAPES {
            let w = Tensor::from_vec(pseudo_random(n * k, (n * k) as u64), (n, k), &dev)?;
            let qt = QTensor::quantize(&w, GgmlDType::Q8_0)?;
            let ours = Q8Matrix::from_qtensor(&qt)?.expect("a Q8_0 matrix");
            let theirs = QMatMul::from_qtensor(qt)?;
            let x = Tensor::from_vec(pseudo_random(m * k, 7 + m as u64), (m, k), &dev)?;
            let want: Vec<f32> = theirs.forward(&x)?.flatten_all()?.to_vec1()?;
            let got: Vec<f32> = x.apply_op1_no_bwd(&ours)?.flatten_all()?.to_vec1()?;
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(0f32, |s, v| s.max(v.abs())).max(1e-6);
            for (idx, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-3 * scale,
                    "({m},{k},{n}) element {idx}: {g} vs {w}"
                );
            }
            // The AVX2 path (what a CPU without AVX-512 VNNI runs) gives the
            // same sums as the VNNI one: both are exact in integers.
            let lhs: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let (mut avx2, mut vnni) = (vec![0f32; m * n], vec![0f32; m * n]);
            ours.matmul_with(&lhs, m, &mut avx2, false, false);
            ours.matmul_with(&lhs, m, &mut vnni, true, false);
            assert_eq!(avx2, vnni, "({m},{k},{n})");
            assert_eq!(avx2, got, "({m},{k},{n})");
            // Adding into a prepared output gives that output plus the
            // product, to the bit, on both paths.
            let init = pseudo_random(m * n, 11);
            let want: Vec<f32> = init.iter().zip(&got).map(|(a, b)| a + b).collect();
            for vnni in [false, true] {
                let mut sum = init.clone();
                ours.matmul_with(&lhs, m, &mut sum, vnni, true);
                assert_eq!(sum, want, "({m},{k},{n}) added, vnni {vnni}");
            }
        }
        Ok(())
    }

    /// The vector and threaded quantization gives the scalar one's values.
    #[test]
    fn quantizing_activations_matches_the_scalar_form() {
        for blocks in [1usize, 3, 1500] {
            let mut xs = pseudo_random(blocks * QK, blocks as u64);
            xs[5] = 0.0;
            if blocks > 1 {
                // An all-zero block and exact halves (ties).
                xs[QK..2 * QK].iter_mut().for_each(|v| *v = 0.0);
                xs[2 * QK] = 127.0;
                xs[2 * QK + 1] = 0.5;
                xs[2 * QK + 2] = -2.5;
            }
            let (mut q1, mut d1) = (vec![[0i8; QK]; blocks], vec![0f32; blocks]);
            let (mut q2, mut d2) = (vec![[0i8; QK]; blocks], vec![0f32; blocks]);
            quantize_rows(&xs, &mut q1, &mut d1);
            quantize_blocks_scalar(&xs, &mut q2, &mut d2);
            assert_eq!(q1, q2);
            assert_eq!(d1, d2);
        }
    }

    /// A K-quant layer gives each of up to [`FEW_ROWS`] rows (decoding,
    /// drafted tokens) exactly what that row gives alone, whichever kernel
    /// this CPU takes for it.
    #[test]
    fn k_quant_rows_are_what_they_are_alone() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k) = (48, 512);
        let w = Tensor::from_vec(pseudo_random(n * k, 9), (n, k), &dev)?;
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let layer = Linear::from_qtensor(QTensor::quantize(&w, dtype)?)?;
            for m in [2, 3, 8, FEW_ROWS] {
                let x = Tensor::from_vec(pseudo_random(m * k, m as u64), (m, k), &dev)?;
                let all: Vec<Vec<f32>> = layer.forward(&x)?.to_vec2()?;
                for (i, row) in all.iter().enumerate() {
                    let alone: Vec<f32> = layer
                        .forward(&x.narrow(0, i, 1)?)?
                        .flatten_all()?
                        .to_vec1()?;
                    assert_eq!(row, &alone, "{dtype:?}: row {i} of {m}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn batched_input_keeps_its_leading_dims() -> Result<()> {
        if !kernel_available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let w = Tensor::from_vec(pseudo_random(6 * 64, 3), (6, 64), &dev)?;
        let lin = Linear::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?;
        assert!(matches!(lin, Linear::Q8(_)));
        let x = Tensor::from_vec(pseudo_random(2 * 3 * 64, 9), (2, 3, 64), &dev)?;
        let y = lin.forward(&x)?;
        assert_eq!(y.dims(), &[2, 3, 6]);
        // Row by row gives the same numbers as the batch.
        let row = lin.forward(&x.get(1)?.get(2)?.unsqueeze(0)?)?;
        let a: Vec<f32> = row.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = y.get(1)?.get(2)?.to_vec1()?;
        assert_eq!(a, b);
        // Non-Q8_0 weights go through candle.
        let f = Linear::from_qtensor(QTensor::quantize(&w, GgmlDType::Q4_0)?)?;
        assert!(matches!(f, Linear::Candle(_)));
        Ok(())
    }

    /// Against the exact product of the same (dequantized) weights, the
    /// kernel's error is no more than candle's, within 5 % (the rounding of
    /// activations differs in ties and in the order of sums; where candle takes
    /// its VNNI tiles, k a multiple of 256, its activations are coarser).
    #[test]
    fn at_least_as_accurate_as_candle() -> Result<()> {
        if !kernel_available() {
            return Ok(());
        }
        let dev = Device::Cpu;
        for (m, k, n) in [
            (4, 576, 1536),
            (4, 1536, 576),
            (1, 1536, 576),
            (1, 576, 4096),
        ] {
            let w = Tensor::from_vec(pseudo_random(n * k, 11), (n, k), &dev)?;
            let qt = QTensor::quantize(&w, GgmlDType::Q8_0)?;
            let exact_w = qt.dequantize(&dev)?;
            let ours = Q8Matrix::from_qtensor(&qt)?.expect("a Q8_0 matrix");
            let theirs = QMatMul::from_qtensor(qt)?;
            let x = Tensor::from_vec(pseudo_random(m * k, 5), (m, k), &dev)?;
            let exact = x.matmul(&exact_w.t()?)?;
            let err =
                |y: Tensor| -> Result<f32> { (y - &exact)?.abs()?.mean_all()?.to_scalar::<f32>() };
            let (a, b) = (err(x.apply_op1_no_bwd(&ours)?)?, err(theirs.forward(&x)?)?);
            assert!(
                a <= b * 1.05,
                "({m},{k},{n}): mean error {a} vs candle's {b}"
            );
        }
        Ok(())
    }

    #[test]
    fn quantized_embedding_equals_the_dequantized_table() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(pseudo_random(10 * 64, 4), (10, 64), &dev)?;
        let qt = QTensor::quantize(&w, GgmlDType::Q8_0)?;
        let dense = candle_nn::Embedding::new(qt.dequantize(&dev)?, 64);
        let ours = TokenEmbedding::from_qtensor(qt)?;
        assert!(matches!(ours, TokenEmbedding::Q8(_)));
        let ids = Tensor::new(&[[0u32, 9, 4], [5, 5, 1]], &dev)?;
        let a: Vec<f32> = ours.forward(&ids)?.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = dense.forward(&ids)?.flatten_all()?.to_vec1()?;
        assert_eq!(ours.forward(&ids)?.dims(), &[2, 3, 64]);
        assert_eq!(a, b);
        assert!(ours.forward(&Tensor::new(&[[10u32]], &dev)?).is_err());
        Ok(())
    }

    /// A table read from the file row by row gives the rows the table held
    /// in memory gives, for the types the files hold (after bytes before it,
    /// as in a GGUF file), and refuses ids outside it.
    #[test]
    fn a_table_read_from_the_file_equals_the_table_in_memory() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(pseudo_random(12 * 256, 5), (12, 256), &dev)?;
        for dtype in [
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let qt = QTensor::quantize(&w, dtype)?;
            let bytes = qt.data()?;
            let path = std::env::temp_dir().join(format!(
                "ragd-kernels-file-table-{}-{dtype:?}",
                std::process::id()
            ));
            let mut file = vec![7u8; 100];
            file.extend_from_slice(&bytes);
            std::fs::write(&path, &file)?;
            let table = FileTable::new(std::fs::File::open(&path)?, 100, dtype, 12, 256)?;
            std::fs::remove_file(&path)?;
            let ours = TokenEmbedding::File(Arc::new(table));
            let dense = candle_nn::Embedding::new(qt.dequantize(&dev)?, 256);
            let ids = Tensor::new(&[[0u32, 11, 4], [5, 5, 1]], &dev)?;
            assert_eq!(ours.forward(&ids)?.dims(), &[2, 3, 256]);
            let a: Vec<f32> = ours.forward(&ids)?.flatten_all()?.to_vec1()?;
            let b: Vec<f32> = dense.forward(&ids)?.flatten_all()?.to_vec1()?;
            assert_eq!(a, b, "{dtype:?}");
            assert!(ours.forward(&Tensor::new(&[[12u32]], &dev)?).is_err());
            assert!(ours.as_linear().is_none());
        }
        // A file shorter than the table it should hold is refused.
        let path = std::env::temp_dir().join(format!("ragd-kernels-short-{}", std::process::id()));
        std::fs::write(&path, [0u8; 64])?;
        let short = FileTable::new(std::fs::File::open(&path)?, 0, GgmlDType::Q8_0, 2, 32);
        std::fs::remove_file(&path)?;
        assert!(short.is_err());
        Ok(())
    }
}
