//! Weights read from `model.safetensors` without copying the whole file.
//!
//! Why: a multilingual vocabulary makes the word-embedding table most of a
//! small encoder (multilingual-e5-small: 250,037 × 384 f32 = 384 MB of its
//! 470 MB). Copied into the heap, as candle's `VarBuilder` does with every
//! tensor it is asked for, all of it stays resident whether or not its rows are
//! used — and a text uses a few hundred rows. [`FileTable`] reads only the
//! rows looked up, from the file (the kernel's page cache, not the process's
//! memory). The values are the file's own: the fp32 path stays exact.
//!
//! The other weights are still copied (they are read on every text), but from
//! the memory-mapped file rather than from a 470 MB buffer read first.
//!
//! `unsafe` here, as in every memory map: the map is only sound while no one
//! changes the file under it. ragd never writes a model file in place (an
//! import writes a new file and renames it over the old one, which leaves a
//! mapped file's contents alone); an operator truncating the file while ragd
//! runs would make a lookup fault, as it would for llama.cpp's mapped GGUF
//! files.
#![allow(unsafe_code)]

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use ragd_kernels::rows;

/// Maps `path` (a safetensors file) for candle's `VarBuilder`, which copies
/// each tensor it is asked for out of the map.
pub(crate) fn var_builder(path: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: see the module documentation.
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, device) }
}

/// A 2-D f32 table (rows × cols) in a safetensors file, its rows read from
/// the file as they are looked up ([`rows::FileTable`]: positioned reads, not the
/// map, whose touched pages grew `ragd serve`'s file-backed resident memory
/// from 0.02 to 0.13 GB over 2,000 ingested Wikipedia summaries,
/// `bench/serve-memory --docs 2000`).
pub(crate) struct FileTable(rows::FileTable);

/// A tensor's entry in a safetensors header.
#[derive(serde::Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

impl FileTable {
    /// The tensor whose name ends with `suffix` in `path`, when it is stored as
    /// little-endian f32 with shape `(rows, cols)`; `None` otherwise (the caller
    /// then loads it the usual way).
    pub(crate) fn open(
        path: &Path,
        suffix: &str,
        rows: usize,
        cols: usize,
    ) -> std::io::Result<Option<Self>> {
        use std::io::Read;
        let mut file = std::fs::File::open(path)?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len)?;
        let header_len = u64::from_le_bytes(len);
        if header_len > 100 << 20 {
            return Ok(None);
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)?;
        let Ok(entries) =
            serde_json::from_slice::<std::collections::HashMap<String, serde_json::Value>>(&header)
        else {
            return Ok(None);
        };
        let found = entries.into_iter().find_map(|(name, value)| {
            let entry: HeaderEntry = serde_json::from_value(value).ok()?;
            (name.ends_with(suffix)
                && entry.dtype == "F32"
                && entry.shape == [rows, cols]
                && entry.data_offsets.1.checked_sub(entry.data_offsets.0)
                    == Some((rows * cols * 4) as u64))
            .then_some(entry.data_offsets.0)
        });
        let Some(start) = found else {
            return Ok(None);
        };
        let offset = 8 + header_len + start;
        Ok(
            rows::FileTable::new(file, offset, GgmlDType::F32, rows, cols)
                .ok()
                .map(Self),
        )
    }

    /// The rows `ids`, `(ids.len(), cols)`; an id outside the table is an error.
    pub(crate) fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        self.0.lookup(ids)?.to_device(device)
    }
}

/// A table kept in memory or read from the file.
pub(crate) enum Table {
    /// Copied into memory (a file whose table is not plain f32).
    Loaded(Tensor),
    /// Read from the file as rows are looked up.
    File(FileTable),
}

impl Table {
    /// Rows `ids` of the table.
    pub(crate) fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Self::Loaded(t) => t.index_select(&Tensor::new(ids, device)?, 0),
            Self::File(m) => m.lookup(ids, device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn mapped_rows_are_the_file_values() -> Result<()> {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("model.safetensors");
        let table = Tensor::randn(0f32, 1.0, (50, 12), &dev)?;
        let other = Tensor::randn(0f32, 1.0, (50, 12), &dev)?.to_dtype(DType::F16)?;
        let tensors = HashMap::from([
            (
                "bert.embeddings.word_embeddings.weight".to_string(),
                table.clone(),
            ),
            (
                "bert.embeddings.position_embeddings.weight".to_string(),
                other,
            ),
        ]);
        candle_core::safetensors::save(&tensors, &path)?;

        let mapped = FileTable::open(&path, "embeddings.word_embeddings.weight", 50, 12)?
            .expect("an f32 table of that shape");
        let ids = [0u32, 49, 7, 7];
        let got: Vec<Vec<f32>> = mapped.lookup(&ids, &dev)?.to_vec2()?;
        let want: Vec<Vec<f32>> = table
            .index_select(&Tensor::new(&ids, &dev)?, 0)?
            .to_vec2()?;
        assert_eq!(got, want);
        assert!(mapped.lookup(&[50], &dev).is_err(), "outside the table");
        // Another shape, or a table that is not f32, is left to the usual loader.
        assert!(FileTable::open(&path, "embeddings.word_embeddings.weight", 51, 12)?.is_none());
        assert!(FileTable::open(&path, "position_embeddings.weight", 50, 12)?.is_none());
        Ok(())
    }
}
