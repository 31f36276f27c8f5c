//! A linear layer with its bias, and the residual connection after it where
//! there is one, written into one output buffer: `y = x·Wᵀ + b (+ r)`. The
//! embedder's BERT layers are built from it; its weights are f32 (products
//! by `gemm`, the crate candle's own matmul calls), int8 ([`Q8Matrix`]) or,
//! where they are 4-bit values, 4-bit ([`Q4Matrix`]).
//!
//! Why not candle's `Linear` and a tensor add: the product goes into a fresh
//! zeroed buffer, the bias add makes a second and the residual add a third,
//! each a pass over (tokens × outputs) — 50 MB for the up projection of a
//! batch of 32 texts of 256 tokens. Buffers that size come from the kernel
//! as zeroed pages: page clearing, `memset` and the element-wise adds were
//! 12 % of an all-MiniLM-L6-v2 batch (`perf`, 128 texts of 256 tokens, 2
//! threads). Here the output starts as the bias (plus residual) rows and the
//! product is added into it by the matmul's own stores.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use crate::contiguous_f32;
use crate::q4_0::Q4Matrix;
use crate::q8_0::Q8Matrix;
use crate::softmax::exp_neg;

enum Weights {
    /// Row-major (outputs × inputs).
    F32(Vec<f32>),
    Int8(Q8Matrix),
    /// Weights that are 4-bit values, multiplied as they are.
    Q4(Q4Matrix),
}

/// `x·Wᵀ + b`, and with [`Dense::forward_residual`] `+ r`.
pub struct Dense {
    weights: Weights,
    bias: Vec<f32>,
    /// Inputs.
    k: usize,
    /// Outputs.
    n: usize,
    /// Whether the output goes through [`gelu_erf`] (in place).
    gelu: bool,
}

impl Dense {
    /// From candle's `(outputs, inputs)` weight and `(outputs)` bias; with
    /// `int8` (quantized activations), where the CPU has the kernels and the
    /// inputs are a multiple of 32, the weights as they are when every block
    /// of them is 4-bit values ([`Q4Matrix`]: multilingual-e5-small's), else
    /// quantized to Q8_0; otherwise f32.
    pub fn new(weight: &Tensor, bias: &Tensor, int8: bool) -> Result<Self> {
        Self::scaled(weight, bias, int8, 0..0, 1.0)
    }

    /// [`Dense::new`] with the weights and bias of outputs `rows` multiplied
    /// by `s` (attention's 1/√head_dim folded into the query rows; on the
    /// 4-bit weights, into their block scales, so their values stay).
    pub fn scaled(
        weight: &Tensor,
        bias: &Tensor,
        int8: bool,
        rows: std::ops::Range<usize>,
        s: f32,
    ) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let mut bias: Vec<f32> = bias.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        if bias.len() != n {
            candle_core::bail!("bias of {} for {n} outputs", bias.len());
        }
        let rows = rows.start.min(n)..rows.end.min(n);
        bias[rows.clone()].iter_mut().for_each(|b| *b *= s);
        let mut w: Vec<f32> = weight
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let quantized = int8 && k % 32 == 0 && crate::q8_0::kernel_available();
        if quantized {
            if let Some(mut m) = Q4Matrix::from_exact(&w, n, k) {
                m.scale_rows(rows, s);
                return Ok(Self::of(Weights::Q4(m), bias, k, n));
            }
        }
        w[rows.start * k..rows.end * k]
            .iter_mut()
            .for_each(|v| *v *= s);
        if quantized {
            let q = candle_core::quantized::QTensor::quantize(
                &Tensor::from_slice(&w, (n, k), &candle_core::Device::Cpu)?,
                candle_core::quantized::GgmlDType::Q8_0,
            )?;
            if let Some(m) = Q8Matrix::from_qtensor(&q)? {
                return Ok(Self::of(Weights::Int8(m), bias, k, n));
            }
        }
        Ok(Self::of(Weights::F32(w), bias, k, n))
    }

    fn of(weights: Weights, bias: Vec<f32>, k: usize, n: usize) -> Self {
        Self {
            weights,
            bias,
            k,
            n,
            gelu: false,
        }
    }

    /// The precision the products run at: "f32", "int8" or "q4_0".
    pub fn precision(&self) -> &'static str {
        match self.weights {
            Weights::F32(_) => "f32",
            Weights::Int8(_) => "int8",
            Weights::Q4(_) => "q4_0",
        }
    }

    /// The same layer followed by the exact GELU (BERT's up projection),
    /// applied to the output in place: no second buffer of (tokens × outputs).
    pub fn with_gelu(mut self, gelu: bool) -> Self {
        self.gelu = gelu;
        self
    }

    /// `x·Wᵀ + b` for `x` of shape `(…, inputs)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }

    /// `x·Wᵀ + b + r`, `r` of the output's shape.
    pub fn forward_residual(&self, x: &Tensor, r: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op2_no_bwd(&r.contiguous()?, self)
    }

    /// The output for `m` rows `x`: the bias (plus `r`) rows, then the
    /// product added to them.
    fn run(&self, x: &[f32], m: usize, r: Option<&[f32]>) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        // Rows filled over the pool's threads: a fresh output's pages are
        // faulted in (zeroed by the kernel) as they are first written, which
        // on one thread left the other core idle.
        let mut y: Vec<f32> = Vec::with_capacity(m * n);
        crate::par_chunks_mut(&mut y.spare_capacity_mut()[..m * n], n, |i, row| match r {
            None => {
                for (y, &b) in row.iter_mut().zip(&self.bias) {
                    y.write(b);
                }
            }
            Some(r) => {
                let r = &r[i * n..(i + 1) * n];
                for ((y, &b), &r) in row.iter_mut().zip(&self.bias).zip(r) {
                    y.write(r + b);
                }
            }
        });
        // SAFETY: every one of the m rows of n values was written above.
        #[allow(unsafe_code)]
        unsafe {
            y.set_len(m * n)
        };
        match &self.weights {
            Weights::Int8(w) => w.matmul_add(x, m, &mut y),
            Weights::Q4(w) => w.matmul_add(x, m, &mut y),
            Weights::F32(w) => {
                let threads = candle_core::utils::get_num_threads();
                let parallelism = if threads > 1 {
                    gemm::Parallelism::Rayon(threads)
                } else {
                    gemm::Parallelism::None
                };
                // SAFETY: x is m × k row-major, w is n × k row-major (read as
                // its transpose, k × n, through the strides) and y is m × n
                // row-major; the lengths are checked by the callers
                // (`inputs`), and gemm reads and writes only within them.
                #[allow(unsafe_code)]
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        y.as_mut_ptr(),
                        1,
                        n as isize,
                        true,
                        x.as_ptr(),
                        1,
                        k as isize,
                        w.as_ptr(),
                        k as isize,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism,
                    )
                }
            }
        }
        if self.gelu {
            // At least 64 Ki values per piece: below that a thread costs more than it saves.
            let piece = n.max(1) * (1usize << 16).div_ceil(n.max(1));
            let pieces = y.len() / piece;
            let (whole, rest) = y.split_at_mut(pieces * piece);
            crate::par_chunks_mut(whole, piece, |_, v| gelu_in_place(v));
            gelu_in_place(rest);
        }
        y
    }

    /// The rows of a contiguous f32 input ending in `inputs`, and their count.
    fn inputs<'a>(&self, storage: &'a CpuStorage, layout: &Layout) -> Result<(&'a [f32], usize)> {
        let x = contiguous_f32(storage, layout, "ragd-dense")?;
        if layout.shape().dims().last() != Some(&self.k) {
            candle_core::bail!(
                "ragd-dense: input {:?} does not end in {}",
                layout.shape(),
                self.k
            )
        }
        Ok((x, x.len() / self.k))
    }

    fn output_shape(&self, layout: &Layout) -> Shape {
        let mut dims = layout.shape().dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.n;
        }
        Shape::from(dims)
    }
}

/// GELU with the exact (erf) form, as BERT models use: `0.5 x (1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// [`gelu_erf`] over a slice, in a loop the compiler vectorises (candle's
/// calls libm's scalar `erff` per element, on one thread: with softmax's
/// `expf`, a fifth of an embedding batch).
fn gelu_in_place(xs: &mut [f32]) {
    xs.iter_mut().for_each(|x| *x = gelu_erf(*x));
}

/// `x · sigmoid(x)`, with [`exp_neg`] on `-|x|` (so it never overflows)
/// and a select instead of a branch, so that a loop over it vectorises.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    let e = exp_neg(-x.abs());
    let r = 1.0 / (1.0 + e);
    x * if x >= 0.0 { r } else { e * r }
}

/// `silu(gate) · up`, element by element: the gated feed-forward of
/// llama-style models, in one pass over the pool's threads. candle's `silu`
/// calls libm's scalar `expf` per element into a fresh tensor, then the
/// product makes another: 2.6 % and 1.5 % of a 512-token Qwen2.5-0.5B prefill
/// (`perf`), besides zeroing their pages.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &SiluMul)
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        g_s: &CpuStorage,
        g_l: &Layout,
        u_s: &CpuStorage,
        u_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if g_l.shape() != u_l.shape() {
            candle_core::bail!("silu-mul: {:?} and {:?}", g_l.shape(), u_l.shape())
        }
        let gate = contiguous_f32(g_s, g_l, self.name())?;
        let up = contiguous_f32(u_s, u_l, self.name())?;
        let mut out = vec![0f32; gate.len()];
        // Pieces of 4,096 values over the pool, the last, shorter one on
        // this thread; a decoded token's few thousand values all on this
        // thread (a pool call costs more than they do).
        const PIECE: usize = 4096;
        let whole = if gate.len() >= 8 * PIECE {
            gate.len() / PIECE * PIECE
        } else {
            0
        };
        crate::par_chunks_mut(&mut out[..whole], PIECE, |i, out| {
            let (g, u) = (
                &gate[i * PIECE..(i + 1) * PIECE],
                &up[i * PIECE..(i + 1) * PIECE],
            );
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = silu(g) * u;
            }
        });
        for ((o, &g), &u) in out[whole..]
            .iter_mut()
            .zip(&gate[whole..])
            .zip(&up[whole..])
        {
            *o = silu(g) * u;
        }
        Ok((CpuStorage::F32(out), g_l.shape().clone()))
    }
}

/// erf by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7, under
/// f32's resolution of the 1 it is added to), branch-free so that it
/// vectorises.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let poly = t * 1.061_405_4f32
        .mul_add(t, -1.453_152_1)
        .mul_add(t, 1.421_413_8)
        .mul_add(t, -0.284_496_74)
        .mul_add(t, 0.254_829_6);
    let y = 1.0 - poly * exp_neg(-a * a);
    y.copysign(x)
}

impl CustomOp1 for Dense {
    fn name(&self) -> &'static str {
        "ragd-dense"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, m) = self.inputs(storage, layout)?;
        Ok((
            CpuStorage::F32(self.run(x, m, None)),
            self.output_shape(layout),
        ))
    }
}

impl CustomOp2 for Dense {
    fn name(&self) -> &'static str {
        "ragd-dense-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, m) = self.inputs(s1, l1)?;
        let r = contiguous_f32(s2, l2, "ragd-dense-residual")?;
        let shape = self.output_shape(l1);
        if l2.shape() != &shape {
            candle_core::bail!(
                "ragd-dense-residual: residual {:?} for output {:?}",
                l2.shape(),
                shape
            )
        }
        Ok((CpuStorage::F32(self.run(x, m, Some(r))), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::pseudo_random;
    use candle_core::{Device, Module};

    /// Both kinds against candle's `Linear` plus the residual, over shapes
    /// with partial tiles.
    #[test]
    fn matches_candle_linear_plus_residual() -> Result<()> {
        for &(m, k, n) in crate::tests::EDGE_SHAPES {
            let dev = Device::Cpu;
            let w = Tensor::from_vec(pseudo_random(n * k, 1), (n, k), &dev)?;
            let b = Tensor::from_vec(pseudo_random(n, 2), n, &dev)?;
            let x = Tensor::from_vec(pseudo_random(m * k, 3), (m, k), &dev)?;
            let r = Tensor::from_vec(pseudo_random(m * n, 4), (m, n), &dev)?;
            let linear = candle_nn::Linear::new(w.clone(), Some(b.clone()));
            let want = linear.forward(&x)?;
            let want_r = (&want + &r)?;
            for int8 in [false, true] {
                let dense = Dense::new(&w, &b, int8)?;
                // int8: Q8_0 weights and activations (about 1 % relative error
                // on sums of k products of values in ±0.5).
                let tol = if int8 {
                    0.02 * (k as f32).sqrt() / 4.0
                } else {
                    1e-4
                };
                for (got, want) in [
                    (dense.forward(&x)?, &want),
                    (dense.forward_residual(&x, &r)?, &want_r),
                ] {
                    assert_eq!(got.dims(), want.dims());
                    let diff = (got - want)?.abs()?.max_keepdim(1)?.max(0)?;
                    let diff = diff.to_vec1::<f32>()?[0];
                    assert!(diff <= tol, "{m}x{k}x{n} int8 {int8}: off by {diff}");
                }
            }
        }
        Ok(())
    }

    /// Weights that are Q4_0 values run on the 4-bit kernel with `int8`
    /// (others on Q8_0, all on f32 without), and `scaled` multiplies the
    /// chosen rows of weights and bias at every precision.
    #[test]
    fn four_bit_weights_run_as_they_are_and_scaled_rows_fold() -> Result<()> {
        use candle_core::quantized::{GgmlDType, QTensor};
        let (m, k, n) = (9, 96, 20);
        let dev = Device::Cpu;
        let plain = Tensor::from_vec(pseudo_random(n * k, 1), (n, k), &dev)?;
        let q4 = QTensor::quantize(&plain, GgmlDType::Q4_0)?.dequantize(&dev)?;
        let b = Tensor::from_vec(pseudo_random(n, 2), n, &dev)?;
        let x = Tensor::from_vec(pseudo_random(m * k, 3), (m, k), &dev)?;
        // Rows 4..11 of weights and bias times 0.3, as candle computes it.
        let s = 0.3f32;
        let mask: Vec<f32> = (0..n)
            .map(|j| if (4..11).contains(&j) { s } else { 1.0 })
            .collect();
        let mask = Tensor::from_vec(mask, n, &dev)?;
        for (w, int8, precision) in [
            (&q4, true, "q4_0"),
            (&q4, false, "f32"),
            (&plain, true, "int8"),
            (&plain, false, "f32"),
        ] {
            let dense = Dense::scaled(w, &b, int8, 4..11, s)?;
            if crate::q8_0::kernel_available() {
                assert_eq!(dense.precision(), precision);
            }
            let ws = w.broadcast_mul(&mask.unsqueeze(1)?)?;
            let want = candle_nn::Linear::new(ws, Some((&b * &mask)?)).forward(&x)?;
            let got = dense.forward(&x)?;
            // Activations quantized to 8 bits: about 1 % of sums of k
            // products of values in ±0.5.
            let tol = if int8 {
                0.02 * (k as f32).sqrt() / 4.0
            } else {
                1e-5
            };
            let diff = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff <= tol, "{precision}: off by {diff}");
        }
        Ok(())
    }

    #[test]
    fn gelu_matches_candles_exact_gelu() -> Result<()> {
        let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 / 400.0).collect();
        let t = Tensor::new(xs.as_slice(), &Device::Cpu)?;
        let theirs = t.gelu_erf()?.to_vec1::<f32>()?;
        for (&x, b) in xs.iter().zip(&theirs) {
            let a = gelu_erf(x);
            assert!(
                (a - b).abs() <= 2e-6 * b.abs().max(1.0),
                "gelu({x}) = {a}, candle {b}"
            );
        }
        // Large inputs: gelu(x) = x, gelu(-x) = 0.
        let big: Vec<f32> = [100f32, -100.0, 1e30, -1e30].map(gelu_erf).to_vec();
        assert_eq!(big, vec![100.0, -0.0, 1e30, -0.0]);
        // In a layer: the product, then GELU on every output, in pieces
        // over the threads and a remainder.
        let (m, k, n) = (300, 64, 250);
        let w = Tensor::from_vec(pseudo_random(n * k, 5), (n, k), &Device::Cpu)?;
        let b = Tensor::from_vec(pseudo_random(n, 6), n, &Device::Cpu)?;
        let x = Tensor::from_vec(pseudo_random(m * k, 7), (m, k), &Device::Cpu)?;
        let plain = Dense::new(&w, &b, false)?.forward(&x)?;
        let want: Vec<f32> = plain
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(gelu_erf)
            .collect();
        let got: Vec<f32> = Dense::new(&w, &b, false)?
            .with_gelu(true)
            .forward(&x)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(got, want);
        Ok(())
    }

    #[test]
    fn refuses_mismatched_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let dense = Dense::new(
            &Tensor::zeros((4, 32), candle_core::DType::F32, &dev)?,
            &Tensor::zeros(4, candle_core::DType::F32, &dev)?,
            false,
        )?;
        assert!(dense
            .forward(&Tensor::zeros((2, 31), candle_core::DType::F32, &dev)?)
            .is_err());
        let x = Tensor::zeros((2, 32), candle_core::DType::F32, &dev)?;
        assert!(dense
            .forward_residual(&x, &Tensor::zeros((2, 5), candle_core::DType::F32, &dev)?)
            .is_err());
        Ok(())
    }

    /// Against candle's `silu` times `up`, over the whole useful range and
    /// beyond (no overflow at ±100).
    #[test]
    fn silu_mul_is_candles() -> Result<()> {
        let n = 10_000 + 17;
        let g: Vec<f32> = (0..n)
            .map(|i| (i as f32 / n as f32 - 0.5) * 40.0)
            .chain([100.0, -100.0])
            .collect();
        let u: Vec<f32> = (0..g.len())
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0)
            .collect();
        let dev = Device::Cpu;
        let (gt, ut) = (
            Tensor::from_slice(&g, g.len(), &dev)?,
            Tensor::from_slice(&u, u.len(), &dev)?,
        );
        let want: Vec<f32> = (candle_nn::ops::silu(&gt)? * &ut)?.to_vec1()?;
        let got: Vec<f32> = silu_mul(&gt, &ut)?.to_vec1()?;
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{i}: {} -> {a} vs {b}",
                g[i]
            );
        }
        assert!(silu_mul(&gt, &gt.narrow(0, 0, 5)?).is_err());
        Ok(())
    }
}
