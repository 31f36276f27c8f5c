//! Weights read in place from the memory-mapped `model.safetensors`.
//!
//! Why: a multilingual vocabulary makes the word-embedding table most of a
//! small encoder (multilingual-e5-small: 250,037 × 384 f32 = 384 MB of its
//! 470 MB). Copied into the heap, as candle's `VarBuilder` does with every
//! tensor it is asked for, all of it stays resident whether or not its rows are
//! used — and a text uses a few hundred rows. Read from the mapped file, only
//! the pages of rows looked up are ever read, and they are the kernel's page
//! cache (shared with other processes mapping the file, dropped under memory
//! pressure and read again), not the process's heap. The values are the file's
//! own: the fp32 path stays exact.
//!
//! The other weights are still copied (they are read on every text), but from
//! the mapped file rather than from a 470 MB buffer read first.
//!
//! `unsafe` here, as in every memory map: the map is only sound while no one
//! changes the file under it. ragd never writes a model file in place (an
//! import writes a new file and renames it over the old one, which leaves a
//! mapped file's contents alone); an operator truncating the file while ragd
//! runs would make a lookup fault, as it would for llama.cpp's mapped GGUF
//! files.
#![allow(unsafe_code)]

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

/// Maps `path` (a safetensors file) for candle's `VarBuilder`, which copies
/// each tensor it is asked for out of the map.
pub(crate) fn var_builder(path: &Path, device: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: see the module documentation.
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], DType::F32, device) }
}

/// A 2-D f32 table (rows × cols) in a mapped safetensors file, looked up by row.
pub(crate) struct MappedTable {
    map: memmap2::Mmap,
    /// Byte offset of row 0 in the map.
    offset: usize,
    rows: usize,
    cols: usize,
}

impl MappedTable {
    /// The tensor whose name ends with `suffix` in `path`, when it is stored as
    /// little-endian f32 with shape `(rows, cols)`; `None` otherwise (the caller
    /// then loads it the usual way).
    pub(crate) fn open(
        path: &Path,
        suffix: &str,
        rows: usize,
        cols: usize,
    ) -> std::io::Result<Option<Self>> {
        let file = std::fs::File::open(path)?;
        // SAFETY: see the module documentation.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        let offset = {
            let Ok(tensors) = safetensors::SafeTensors::deserialize(&map) else {
                return Ok(None);
            };
            let found = tensors.tensors().into_iter().find(|(name, view)| {
                name.ends_with(suffix)
                    && view.dtype() == safetensors::Dtype::F32
                    && view.shape() == [rows, cols]
            });
            match found {
                Some((_, view)) => view.data().as_ptr() as usize - map.as_ptr() as usize,
                None => return Ok(None),
            }
        };
        // Rows are read at random: no read-ahead of neighbouring pages.
        let _ = map.advise(memmap2::Advice::Random);
        Ok(Some(Self {
            map,
            offset,
            rows,
            cols,
        }))
    }

    /// The rows `ids`, `(ids.len(), cols)`; an id outside the table is an error.
    pub(crate) fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        let row_bytes = self.cols * 4;
        let mut out = Vec::with_capacity(ids.len() * self.cols);
        for &id in ids {
            let id = id as usize;
            if id >= self.rows {
                candle_core::bail!("token id {id} is outside the vocabulary of {}", self.rows)
            }
            let start = self.offset + id * row_bytes;
            let row = &self.map[start..start + row_bytes];
            out.extend(
                row.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Tensor::from_vec(out, (ids.len(), self.cols), device)
    }
}

/// A table kept in memory or read from the mapped file.
pub(crate) enum Table {
    /// Copied into memory (a file whose table is not plain f32).
    Loaded(Tensor),
    /// Read in place.
    Mapped(MappedTable),
}

impl Table {
    /// Rows `ids` of the table.
    pub(crate) fn lookup(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Self::Loaded(t) => t.index_select(&Tensor::new(ids, device)?, 0),
            Self::Mapped(m) => m.lookup(ids, device),
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

        let mapped = MappedTable::open(&path, "embeddings.word_embeddings.weight", 50, 12)?
            .expect("an f32 table of that shape");
        let ids = [0u32, 49, 7, 7];
        let got: Vec<Vec<f32>> = mapped.lookup(&ids, &dev)?.to_vec2()?;
        let want: Vec<Vec<f32>> = table
            .index_select(&Tensor::new(&ids, &dev)?, 0)?
            .to_vec2()?;
        assert_eq!(got, want);
        assert!(mapped.lookup(&[50], &dev).is_err(), "outside the table");
        // Another shape, or a table that is not f32, is left to the usual loader.
        assert!(MappedTable::open(&path, "embeddings.word_embeddings.weight", 51, 12)?.is_none());
        assert!(MappedTable::open(&path, "position_embeddings.weight", 50, 12)?.is_none());
        Ok(())
    }
}
