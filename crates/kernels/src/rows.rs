//! Tables whose rows are read from the model file as they are looked up.
//!
//! A token-embedding table is read a few hundred rows per text or prompt, yet
//! loaded into memory it is one of a model's largest tensors (the embedder's
//! multilingual-e5-small: 384 MB of f32; Qwen2.5-0.5B's Q5_0 table: 94 MB).
//! Positioned reads copy just the rows looked up (a system call per token,
//! about a microsecond beside the model's work per token) and leave the file
//! to the kernel's page cache, which is not the process's memory. Not a
//! memory map: a map's touched pages count in the process's resident memory,
//! and the kernel maps the cached pages around each faulting one (64 KB).

use std::os::unix::fs::FileExt;

use candle_core::quantized::{ggml_file, GgmlDType};
use candle_core::{Device, Result, Tensor};

/// `rows × cols` values of `dtype` (f32 or any GGUF block type candle reads),
/// stored row after row from byte `offset` of `file`.
#[derive(Debug)]
pub struct FileTable {
    file: std::fs::File,
    offset: u64,
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
}

impl FileTable {
    /// The table, after checking that its rows are whole blocks and that the
    /// file holds all of it.
    pub fn new(
        file: std::fs::File,
        offset: u64,
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        if rows == 0 || !cols.is_multiple_of(dtype.block_size()) {
            candle_core::bail!("a table of {rows} rows of {cols} values of {dtype:?}")
        }
        let row_bytes = cols / dtype.block_size() * dtype.type_size();
        let end = (rows as u64)
            .checked_mul(row_bytes as u64)
            .and_then(|b| b.checked_add(offset));
        match end {
            Some(end) if file.metadata()?.len() >= end => Ok(Self {
                file,
                offset,
                dtype,
                rows,
                cols,
                row_bytes,
            }),
            _ => candle_core::bail!(
                "the file ends before its table of {rows} rows of {row_bytes} bytes at byte {offset}"
            ),
        }
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows `ids` as f32, `(ids.len(), cols)` on the CPU, dequantized by
    /// candle's own code for the type (f32 rows are the file's values); an id
    /// outside the table is an error.
    pub fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        let cpu = Device::Cpu;
        if ids.is_empty() {
            return Tensor::zeros((0, self.cols), candle_core::DType::F32, &cpu);
        }
        let mut bytes = vec![0u8; ids.len() * self.row_bytes];
        for (&id, row) in ids.iter().zip(bytes.chunks_exact_mut(self.row_bytes)) {
            let id = id as usize;
            if id >= self.rows {
                candle_core::bail!("token id {id} is outside the vocabulary of {}", self.rows)
            }
            self.file
                .read_exact_at(row, self.offset + (id * self.row_bytes) as u64)?;
        }
        ggml_file::qtensor_from_ggml(self.dtype, &bytes, vec![ids.len(), self.cols], &cpu)?
            .dequantize(&cpu)
    }
}
