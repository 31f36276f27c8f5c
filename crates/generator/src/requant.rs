//! Re-quantization of GGUF tensors into types candle runs fast on this CPU.
//!
//! candle 0.11 has AVX2 kernels for Q4_0, Q8_0 and the K-quants but runs Q4_1,
//! Q5_0 and Q5_1 with scalar code. ragd's own kernels cover Q8_0, Q5_0 (the
//! packaged Qwen2.5-Coder-0.5B file is mostly Q5_0, served as it is since
//! [`crate::q5_0`]) and the K-quants; SmolLM2-135M is Q4_1, which would spend
//! its time in the slow path. A copy of the file with such tensors converted
//! to Q8_0 (dequantize, then quantize with 32-element blocks) runs on the
//! Q8_0 kernel. Q8_0 keeps 8 bits per weight, more than the 4 or 5 of the
//! source, so the conversion loses almost nothing; the copy is larger on disk
//! and in memory.
//!
//! The copy is written next to the original under a temporary name and renamed
//! into place; the original is kept, and the copy's metadata records what was
//! done (`ragd.requantized`).

use std::fs;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Device;

use crate::GenerateError;

/// Tensor types that run without SIMD on x86-64: neither candle 0.11 nor ragd
/// has a vector kernel for them (Q5_0 has ragd's where the CPU has AVX2).
fn slow(t: GgmlDType) -> bool {
    match t {
        GgmlDType::Q4_1 | GgmlDType::Q5_1 => true,
        GgmlDType::Q5_0 => !crate::q8_0::kernel_available(),
        _ => false,
    }
}

/// What a conversion did: (tensor type before, after, how many tensors).
pub type Conversions = Vec<(String, String, usize)>;

/// The path of the re-quantized copy of `original`.
pub fn copy_path(original: &Path) -> PathBuf {
    beside(original, ".ragd-q8_0.gguf")
}

/// A file beside `model` named after its stem with `suffix`.
pub(crate) fn beside(model: &Path, suffix: &str) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    model.with_file_name(format!("{stem}{suffix}"))
}

/// How many tensors of `path` have a slow type, by type.
pub fn slow_tensors(path: &Path) -> Result<Conversions, GenerateError> {
    let io = |source| GenerateError::Io {
        path: path.to_owned(),
        source,
    };
    // Buffered: GGUF metadata is read a few bytes at a time (see Generator::load).
    let mut file = std::io::BufReader::with_capacity(1 << 20, fs::File::open(path).map_err(io)?);
    let ct = gguf_file::Content::read(&mut file).map_err(|e| {
        GenerateError::Unsupported(format!(
            "{} is not a readable GGUF file: {e}",
            path.display()
        ))
    })?;
    Ok(count(
        ct.tensor_infos
            .values()
            .map(|t| t.ggml_dtype)
            .filter(|&d| slow(d)),
    ))
}

fn count(types: impl Iterator<Item = GgmlDType>) -> Conversions {
    let mut out: Conversions = Vec::new();
    for t in types {
        let name = format!("{t:?}");
        match out.iter_mut().find(|(from, _, _)| *from == name) {
            Some(e) => e.2 += 1,
            None => out.push((name, "Q8_0".into(), 1)),
        }
    }
    out.sort();
    out
}

/// Returns the file to load for `original`: itself when it has no slow tensors,
/// else its Q8_0 copy, made now when it does not exist yet.
pub fn fast_copy(original: &Path) -> Result<(PathBuf, Conversions), GenerateError> {
    let slow = slow_tensors(original)?;
    if slow.is_empty() {
        return Ok((original.to_path_buf(), slow));
    }
    let copy = copy_path(original);
    let fresh = |copy: &Path| -> bool {
        let (Ok(c), Ok(o)) = (fs::metadata(copy), fs::metadata(original)) else {
            return false;
        };
        // A copy older than its original is stale.
        matches!((c.modified(), o.modified()), (Ok(cm), Ok(om)) if cm >= om)
    };
    if !fresh(&copy) {
        requantize(original, &copy)?;
    }
    Ok((copy, slow))
}

/// Writes `dst` by `write` under a name of its own beside it, synced, then
/// renamed into place: a reader sees the old file or the whole new one, and
/// two processes (or tests) making the same file at once each rename a
/// complete one. The partial file is removed when anything fails.
pub(crate) fn replace_file(
    dst: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    static WRITERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut partial = dst.as_os_str().to_owned();
    partial.push(format!(
        ".partial-{}-{}",
        std::process::id(),
        WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let partial = PathBuf::from(partial);
    let result = (|| {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(&partial)?);
        write(&mut out)?;
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        fs::rename(&partial, dst)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result
}

/// Writes `dst`: `src` with every slow tensor converted to Q8_0.
pub fn requantize(src: &Path, dst: &Path) -> Result<Conversions, GenerateError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| GenerateError::Io { path, source }
    };
    let started = std::time::Instant::now();
    let mut file =
        std::io::BufReader::with_capacity(1 << 20, fs::File::open(src).map_err(io(src))?);
    let ct = gguf_file::Content::read(&mut file).map_err(|e| {
        GenerateError::Unsupported(format!(
            "{} is not a readable GGUF file: {e}",
            src.display()
        ))
    })?;
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    let mut converted = Vec::new();
    for name in names {
        let t = ct.tensor(&mut file, name, &Device::Cpu)?;
        let t = if slow(t.dtype()) && t.shape().dims().last().is_some_and(|&d| d % 32 == 0) {
            converted.push(t.dtype());
            QTensor::quantize(&t.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?
        } else {
            t
        };
        tensors.push((name.clone(), t));
    }
    let conversions = count(converted.into_iter());
    let record = conversions
        .iter()
        .map(|(f, t, n)| format!("{n} {f} -> {t}"))
        .collect::<Vec<_>>()
        .join(", ");
    let note = gguf_file::Value::String(format!(
        "{record} by ragd from {}",
        src.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let mut metadata: Vec<(&str, &gguf_file::Value)> = ct
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment" && k.as_str() != "ragd.requantized")
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.sort_by_key(|(k, _)| *k);
    metadata.push(("ragd.requantized", &note));
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();

    replace_file(dst, |out| {
        gguf_file::write(out, &metadata, &refs).map_err(std::io::Error::other)
    })
    .map_err(|source| GenerateError::Io {
        path: dst.to_owned(),
        source,
    })?;
    tracing::info!(
        src = %src.display(),
        dst = %dst.display(),
        converted = %record,
        secs = started.elapsed().as_secs_f64(),
        "re-quantized the model for fast CPU kernels"
    );
    Ok(conversions)
}
