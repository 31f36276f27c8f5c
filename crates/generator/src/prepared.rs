//! A model's weights as the kernels lay them out, kept in a file beside the
//! model (`NAME.ragd-prepared`) and mapped at later starts instead of being
//! laid out again.
//!
//! The first load lays the Q8_0 and Q5_0 weights out in memory as it always
//! did, then writes them here (under a temporary name, synced and renamed into
//! place, as the re-quantized copy is). Later loads map this file and read the
//! weights in place: no fresh memory to zero, no re-laying, and the pages are
//! the page cache's, shared by every process serving the same model. See
//! [`ragd_kernels::prepared`] for the figures that asked for it.
//!
//! The file is only a cache of what the model file holds, so anything wrong
//! with it is never an error: a file made from another model file (its size,
//! modification time or the CRC-32 of its first 16 MB differ), by a ragd whose layout differs, truncated, or
//! whose bytes do not match their CRC-32 is set aside with a warning, and the
//! weights are laid out from the model and the file written again. A directory
//! that cannot be written to only means the weights are laid out at every
//! start, as before.
//!
//! Format: the 8 bytes `RAGDPREP`, the header's length (u64, little-endian),
//! the header (JSON: [`Header`]), then each tensor's bytes at the offset the
//! header gives, 64-byte aligned.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::GgmlDType;
use ragd_kernels::prepared::{SharedBytes, LAYOUT};
use ragd_kernels::q8_0::Laid;
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"RAGDPREP";
/// Tensors start at multiples of this (a cache line; the groups need 4).
const ALIGN: u64 = 64;

/// The path of `model`'s prepared file.
pub fn path_for(model: &Path) -> PathBuf {
    crate::requant::beside(model, ".ragd-prepared")
}

/// What the file was made from and how.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct Header {
    /// [`LAYOUT`] of the kernels that wrote it.
    layout: String,
    source: Source,
    tensors: Vec<Entry>,
}

/// The model file, as far as telling a changed file apart goes.
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone, Copy)]
struct Source {
    bytes: u64,
    /// Modification time, nanoseconds since the epoch.
    modified_ns: u128,
    /// CRC-32 of the file's first [`HEAD_BYTES`] (its GGUF header: every
    /// tensor's name, type, shape and offset, the tokenizer, and the first
    /// weights), so that another model file of the same size copied with its
    /// time kept is still told apart.
    head_crc32: u32,
}

/// How much of the model file [`Source::head_crc32`] covers (a few
/// milliseconds to read from the page cache).
const HEAD_BYTES: u64 = 16 << 20;

impl Source {
    fn of(model: &Path) -> std::io::Result<Self> {
        use std::io::Read;
        let meta = fs::metadata(model)?;
        let modified_ns = meta
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        // In pieces through one small buffer: a 16 MB buffer was fresh
        // memory at every load, zeroed by the kernel page by page (7 % of
        // a Qwen2.5-Coder-0.5B load's samples in `perf`, though the load's
        // wall time did not measurably change: 0.27-0.54 s either way).
        let mut file = fs::File::open(model)?.take(HEAD_BYTES);
        let mut hasher = crc32fast::Hasher::new();
        let mut piece = vec![0u8; 256 << 10];
        loop {
            let n = file.read(&mut piece)?;
            if n == 0 {
                break;
            }
            hasher.update(&piece[..n]);
        }
        Ok(Self {
            bytes: meta.len(),
            modified_ns,
            head_crc32: hasher.finalize(),
        })
    }
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq, Clone)]
struct Entry {
    name: String,
    dtype: String,
    rows: usize,
    cols: usize,
    offset: u64,
    bytes: u64,
    crc32: u32,
}

fn dtype_name(t: GgmlDType) -> Option<&'static str> {
    match t {
        GgmlDType::Q8_0 => Some("Q8_0"),
        GgmlDType::Q5_0 => Some("Q5_0"),
        _ => None,
    }
}

/// One load's use of the prepared file: the file where a valid one was
/// found, else the weights laid out now, to write it afterwards.
pub(crate) struct Preparation {
    file: Option<Mapped>,
    laid: Mutex<Vec<(String, usize, usize, Laid)>>,
}

/// A valid prepared file, mapped.
struct Mapped {
    bytes: SharedBytes,
    tensors: HashMap<String, Entry>,
}

impl Preparation {
    /// Nothing prepared: every weight is laid out, and nothing is recorded.
    pub(crate) fn none() -> Self {
        Self {
            file: None,
            laid: Mutex::new(Vec::new()),
        }
    }

    /// Opens `model`'s prepared file where a valid one exists (else logs why
    /// it is not used, when one is there).
    pub(crate) fn open(model: &Path) -> Self {
        let path = path_for(model);
        let file = match open_valid(model, &path) {
            Ok(Some(m)) => Some(m),
            Ok(None) => None,
            Err(why) => {
                tracing::warn!(file = %path.display(), %why, "prepared weights not used; laying the weights out again and rewriting the file");
                None
            }
        };
        Self {
            file,
            laid: Mutex::new(Vec::new()),
        }
    }

    /// Whether the weights are read from a prepared file.
    pub(crate) fn mapped(&self) -> bool {
        self.file.is_some()
    }

    /// `name`, an `(n, k)` matrix of `dtype`, read in place from the
    /// prepared file (`None`: lay it out).
    pub(crate) fn laid(&self, name: &str, dtype: GgmlDType, n: usize, k: usize) -> Option<Laid> {
        let file = self.file.as_ref()?;
        let e = file.tensors.get(name)?;
        if Some(e.dtype.as_str()) != dtype_name(dtype) || e.rows != n || e.cols != k {
            return None;
        }
        Laid::read(dtype, n, k, Arc::clone(&file.bytes), e.offset as usize)
            .ok()
            .flatten()
    }

    /// Notes a weight laid out now, for [`Preparation::write`].
    pub(crate) fn record(&self, name: &str, n: usize, k: usize, laid: Laid) {
        if self.file.is_none() {
            if let Ok(mut v) = self.laid.lock() {
                if !v.iter().any(|(seen, ..)| seen == name) {
                    v.push((name.to_string(), n, k, laid));
                }
            }
        }
    }

    /// Writes the prepared file for `model` from the weights laid out during
    /// this load, where there are any and no valid file was read.
    pub(crate) fn write(&self, model: &Path) {
        if self.file.is_some() {
            return;
        }
        let laid = match self.laid.lock() {
            Ok(v) => v.clone(),
            Err(_) => return,
        };
        if laid.is_empty() {
            return;
        }
        let path = path_for(model);
        let started = std::time::Instant::now();
        match write_file(model, &path, &laid) {
            Ok(bytes) => tracing::info!(
                file = %path.display(),
                mb = bytes as f64 / 1e6,
                secs = started.elapsed().as_secs_f64(),
                "wrote the prepared weights: later starts map them"
            ),
            Err(e) => tracing::info!(
                file = %path.display(),
                error = %e,
                "cannot write the prepared weights: they are laid out at every start"
            ),
        }
    }
}

/// The mapped file, `Ok(None)` where there is none, `Err` with the reason a
/// file that is there cannot be used.
fn open_valid(model: &Path, path: &Path) -> Result<Option<Mapped>, String> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let map = map_populated(&file).map_err(|e| format!("cannot map it: {e}"))?;
    let header = read_header(&map)?;
    if header.layout != LAYOUT {
        return Err(format!(
            "made for layout {:?}, this ragd lays out {LAYOUT:?}",
            header.layout
        ));
    }
    let source = Source::of(model).map_err(|e| e.to_string())?;
    if header.source != source {
        return Err(format!(
            "made from another {} ({:?}, now {:?})",
            model.display(),
            header.source,
            source
        ));
    }
    // The whole file is checked once here: a flipped bit in a cache would
    // otherwise be a wrong answer nobody can trace. CRC-32 runs at several
    // GB/s, a few hundredths of a second for Qwen2.5-0.5B's 0.4 GB.
    for e in &header.tensors {
        let range = usize::try_from(e.offset)
            .ok()
            .zip(usize::try_from(e.bytes).ok())
            .and_then(|(o, b)| Some(o..o.checked_add(b)?))
            .ok_or_else(|| format!("{}: offset out of range", e.name))?;
        let data = map
            .get(range)
            .ok_or_else(|| format!("{} runs past the end of the file (truncated?)", e.name))?;
        if crc32fast::hash(data) != e.crc32 {
            return Err(format!(
                "{}: contents do not match their CRC-32 (damaged?)",
                e.name
            ));
        }
    }
    let tensors = header
        .tensors
        .into_iter()
        .map(|e| (e.name.clone(), e))
        .collect();
    Ok(Some(Mapped {
        bytes: Arc::new(map),
        tensors,
    }))
}

fn read_header(map: &[u8]) -> Result<Header, String> {
    if map.get(..8) != Some(&MAGIC[..]) {
        return Err("not a prepared-weights file".into());
    }
    let len = map
        .get(8..16)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .and_then(|l| usize::try_from(l).ok())
        .ok_or("truncated header")?;
    let json = 16usize
        .checked_add(len)
        .and_then(|end| map.get(16..end))
        .ok_or("truncated header")?;
    serde_json::from_slice(json).map_err(|e| format!("unreadable header: {e}"))
}

/// Maps `file` with its pages read in now (`MAP_POPULATE`, as llama.cpp maps
/// its model files), so the load, not the first question, pays for reading.
#[allow(unsafe_code)]
fn map_populated(file: &fs::File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: ragd never writes a prepared file in place: a new one is
    // written under another name and renamed over it, so this mapping keeps
    // the old one. Another program truncating it while mapped would fault
    // the process, as a truncated model file under llama.cpp's map would.
    unsafe { memmap2::MmapOptions::new().populate().map(file) }
}

/// Writes the file; its size in bytes.
fn write_file(
    model: &Path,
    path: &Path,
    laid: &[(String, usize, usize, Laid)],
) -> std::io::Result<u64> {
    let source = Source::of(model)?;
    // Offsets depend on the header's length, which depends on the offsets'
    // digits: lay the tensors out after a header size that is then checked.
    let mut tensors = Vec::with_capacity(laid.len());
    for (name, n, k, l) in laid {
        let Some(dtype) = dtype_name(l.dtype()) else {
            continue;
        };
        let bytes = l.bytes();
        tensors.push(Entry {
            name: name.clone(),
            dtype: dtype.to_string(),
            rows: *n,
            cols: *k,
            offset: 0,
            bytes: bytes.len() as u64,
            crc32: crc32fast::hash(bytes),
        });
    }
    let mut header = Header {
        layout: LAYOUT.to_string(),
        source,
        tensors,
    };
    let mut reserved = serde_json::to_vec(&header)?.len() as u64 + 4096;
    let json = loop {
        let mut at = (16 + reserved).next_multiple_of(ALIGN);
        for e in &mut header.tensors {
            e.offset = at;
            at = (at + e.bytes).next_multiple_of(ALIGN);
        }
        let json = serde_json::to_vec(&header)?;
        if json.len() as u64 <= reserved {
            break json;
        }
        reserved = json.len() as u64 + 4096;
    };

    let by_name: HashMap<&str, &[u8]> = laid
        .iter()
        .map(|(name, _, _, l)| (name.as_str(), l.bytes()))
        .collect();
    let mut at = 16 + json.len() as u64;
    crate::requant::replace_file(path, |out| {
        out.write_all(MAGIC)?;
        out.write_all(&(json.len() as u64).to_le_bytes())?;
        out.write_all(&json)?;
        for e in &header.tensors {
            out.write_all(&vec![0u8; (e.offset - at) as usize])?;
            out.write_all(by_name[e.name.as_str()])?;
            at = e.offset + e.bytes;
        }
        Ok(())
    })?;
    Ok(at)
}
