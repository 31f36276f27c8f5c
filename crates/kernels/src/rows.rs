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

use candle_core::Result;

/// `rows` rows of `row_bytes` bytes each, row 0 at byte `offset` of `file`.
#[derive(Debug)]
pub struct FileRows {
    file: std::fs::File,
    offset: u64,
    rows: usize,
    row_bytes: usize,
}

impl FileRows {
    /// The table, after checking that the file holds all of it.
    pub fn new(file: std::fs::File, offset: u64, rows: usize, row_bytes: usize) -> Result<Self> {
        let end = (rows as u64)
            .checked_mul(row_bytes as u64)
            .and_then(|b| b.checked_add(offset));
        match end {
            Some(end) if file.metadata()?.len() >= end => Ok(Self {
                file,
                offset,
                rows,
                row_bytes,
            }),
            _ => candle_core::bail!(
                "the file ends before its table of {rows} rows of {row_bytes} bytes at byte {offset}"
            ),
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Reads row `id` into `buf` (`row_bytes` long); an id outside the table
    /// is an error.
    pub fn read(&self, id: usize, buf: &mut [u8]) -> Result<()> {
        if id >= self.rows {
            candle_core::bail!("token id {id} is outside the vocabulary of {}", self.rows)
        }
        debug_assert_eq!(buf.len(), self.row_bytes);
        self.file
            .read_exact_at(buf, self.offset + (id * self.row_bytes) as u64)?;
        Ok(())
    }
}
