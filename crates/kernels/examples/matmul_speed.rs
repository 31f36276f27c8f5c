//! Times the quantized matrix products on prompt- and decode-sized inputs:
//! `cargo run --release -p ragd-kernels --example matmul_speed [ROWS...]`.
//! Prints milliseconds per product and billions of multiply-adds per second for
//! ragd's kernels and candle's on the same weights (medians of 21 runs); then
//! the embedder's layer shapes (multilingual-e5-small, a batch of 2,048
//! tokens): its Q4_0 weights on [`Q4Matrix`], re-quantized to Q8_0 and to
//! Q5_0 (the kernels a weight that is not already 4-bit could take), and f32
//! by candle's matmul (`gemm`).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use ragd_kernels::kquant::KMatrix;
use ragd_kernels::q4_0::Q4Matrix;
use ragd_kernels::q5_0::Q5Matrix;
use ragd_kernels::q8_0::Q8Matrix;
use std::time::Instant;

/// `(lhs, rows, dst)`: one of ragd's kernels.
type Kernel = Box<dyn Fn(&[f32], usize, &mut [f32])>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time(mut f: impl FnMut()) -> f64 {
    f();
    median(
        (0..21)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() -> candle_core::Result<()> {
    let rows: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("ROWS are numbers"))
        .collect();
    let rows = if rows.is_empty() {
        vec![1, 4, 256]
    } else {
        rows
    };
    let dev = Device::Cpu;
    // (out, in): Qwen2.5-1.5B's feed-forward, then Qwen2.5-0.5B's down projection.
    for (n, k) in [(8960usize, 1536usize), (1536, 8960), (896, 4864)] {
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q8_0,
            GgmlDType::Q5_0,
        ] {
            let qt = std::sync::Arc::new(QTensor::quantize(&w, dtype)?);
            let ours: Kernel = match dtype {
                GgmlDType::Q8_0 => {
                    let m = Q8Matrix::from_qtensor(&qt)?.expect("Q8_0");
                    Box::new(move |x, r, d| m.matmul(x, r, d))
                }
                GgmlDType::Q5_0 => {
                    let m = Q5Matrix::from_qtensor(&qt)?.expect("Q5_0");
                    Box::new(move |x, r, d| m.matmul(x, r, d))
                }
                _ => {
                    let m = KMatrix::from_qtensor(&qt)?.expect("K-quant");
                    Box::new(move |x, r, d| m.matmul(x, r, d).expect("K-quant matmul"))
                }
            };
            let theirs = QMatMul::from_arc(qt)?;
            for &m in &rows {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
                let mut dst = vec![0f32; m * n];
                let a = time(|| ours(&xs, m, &mut dst));
                let b = time(|| {
                    theirs.forward(&x).expect("candle matmul");
                });
                let gmacs = |s: f64| (m * n * k) as f64 / s / 1e9;
                println!(
                    "{dtype:?} {m:>4}x{k}x{n}: ragd {:8.2} ms {:6.1} GMAC/s | candle {:8.2} ms {:6.1} GMAC/s | {:.2}x",
                    a * 1e3,
                    gmacs(a),
                    b * 1e3,
                    gmacs(b),
                    b / a
                );
            }
        }
    }
    let m = 2048;
    for (n, k) in [(1152usize, 384usize), (1536, 384), (384, 1536)] {
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
        let q4 = QTensor::quantize(&w, GgmlDType::Q4_0)?.dequantize(&dev)?;
        let values: Vec<f32> = q4.flatten_all()?.to_vec1()?;
        let ours = Q4Matrix::from_exact(&values, n, k).expect("Q4_0 values");
        let q8 = Q8Matrix::from_qtensor(&QTensor::quantize(&q4, GgmlDType::Q8_0)?)?.expect("Q8_0");
        let q5 = Q5Matrix::from_qtensor(&QTensor::quantize(&q4, GgmlDType::Q5_0)?)?.expect("Q5_0");
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let mut dst = vec![0f32; m * n];
        let a = time(|| ours.matmul(&xs, m, &mut dst));
        let b = time(|| q8.matmul(&xs, m, &mut dst));
        let b5 = time(|| q5.matmul(&xs, m, &mut dst));
        let wt = q4.t()?;
        let c = time(|| {
            x.matmul(&wt).expect("f32 matmul");
        });
        let gmacs = |s: f64| (m * n * k) as f64 / s / 1e9;
        println!(
            "Q4_0 {m:>4}x{k}x{n}: ragd {:6.1} GMAC/s | as Q8_0 {:6.1} GMAC/s | as Q5_0 {:6.1} GMAC/s | f32 {:6.1} GMAC/s | {:.2}x f32",
            gmacs(a),
            gmacs(b),
            gmacs(b5),
            gmacs(c),
            c / a
        );
    }
    Ok(())
}
