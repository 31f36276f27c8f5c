//! Weights in the kernels' own layout, either built at load (owned) or read
//! in place from a prepared file that an earlier load wrote (mapped).
//!
//! The Q8_0 and Q5_0 kernels re-lay a GGUF file's blocks into groups of eight
//! rows ([`crate::q8_0`], [`crate::q5_0`]). Doing that at every start wrote
//! 0.4 GB of fresh memory for Qwen2.5-Coder-0.5B, and most of the load time
//! was the kernel zeroing those new pages (perf: 43 % in `clear_page_erms`;
//! 1.33-1.43 s against llama.cpp's 0.33-0.37 s when the two ran one after the
//! other). A prepared file holds the groups exactly as they lie in memory, so
//! a later load maps it instead: the pages come from the page cache, shared
//! and never zeroed, as llama.cpp maps its GGUF file. Writing and validating
//! the file is the generator's business (`ragd_generator::prepared`); this
//! module only holds the bytes and checks they fit the type.

use std::marker::PhantomData;
use std::sync::Arc;

use bytemuck::Pod;
use candle_core::Result;

/// The bytes of a mapped prepared file (a `memmap2::Mmap` in the generator),
/// shared by every matrix read from it.
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// What the layouts written to a prepared file depend on; a file made under
/// another value is not read. Raise the number when a group's layout changes.
pub const LAYOUT: &str = "q8_0-groups-8x32-i8-f32/q5_0-groups-8x32-u4u1-f16/v1";

/// A matrix's weight groups.
pub(crate) enum Groups<G> {
    /// Built at load.
    Owned(Vec<G>),
    /// `count` groups at `offset` of a prepared file's bytes.
    Mapped {
        bytes: SharedBytes,
        offset: usize,
        count: usize,
        group: PhantomData<G>,
    },
}

impl<G: Pod> Groups<G> {
    /// `count` groups at `offset` of `bytes`: an error if they do not lie
    /// inside it or are not aligned for `G` (a damaged or foreign file).
    pub(crate) fn mapped(bytes: SharedBytes, offset: usize, count: usize) -> Result<Self> {
        let size = std::mem::size_of::<G>();
        let all: &[u8] = (*bytes).as_ref();
        let Some(end) = count.checked_mul(size).and_then(|b| b.checked_add(offset)) else {
            candle_core::bail!("prepared weights: {count} groups at {offset} overflow")
        };
        let Some(slice) = all.get(offset..end) else {
            candle_core::bail!(
                "prepared weights: {count} groups at {offset} run past the file's {} bytes",
                all.len()
            )
        };
        if bytemuck::try_cast_slice::<u8, G>(slice).is_err() {
            candle_core::bail!("prepared weights at {offset} are not aligned for their type")
        }
        Ok(Self::Mapped {
            bytes,
            offset,
            count,
            group: PhantomData,
        })
    }

    /// The groups' bytes, as a prepared file holds them.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        bytemuck::cast_slice::<G, u8>(self)
    }
}

impl<G: Pod> std::ops::Deref for Groups<G> {
    type Target = [G];

    fn deref(&self) -> &[G] {
        match self {
            Self::Owned(v) => v,
            Self::Mapped {
                bytes,
                offset,
                count,
                ..
            } => {
                let all: &[u8] = (**bytes).as_ref();
                // Range and alignment were checked in `Groups::mapped`.
                bytemuck::cast_slice(&all[*offset..*offset + count * std::mem::size_of::<G>()])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable, PartialEq, Debug)]
    #[repr(C)]
    struct G {
        a: [u8; 4],
        b: u32,
    }

    #[test]
    fn mapped_groups_read_what_owned_ones_wrote() {
        let owned = Groups::Owned(vec![
            G {
                a: [1, 2, 3, 4],
                b: 5,
            },
            G { a: [6; 4], b: 7 },
        ]);
        let mut file = vec![0u8; 8];
        file.extend_from_slice(owned.as_bytes());
        let bytes: SharedBytes = Arc::new(file);
        let mapped = Groups::<G>::mapped(bytes, 8, 2).unwrap();
        assert_eq!(&*mapped, &*owned);
    }

    #[test]
    fn groups_outside_the_file_or_misaligned_are_refused() {
        let bytes: SharedBytes = Arc::new(vec![0u8; 64]);
        assert!(Groups::<G>::mapped(Arc::clone(&bytes), 56, 2).is_err());
        assert!(Groups::<G>::mapped(Arc::clone(&bytes), usize::MAX - 4, 2).is_err());
        assert!(Groups::<G>::mapped(Arc::clone(&bytes), 8, 7).is_ok());
        // A Vec<u8>'s start is not promised to be 4-aligned, so test the
        // offset relative to an aligned base.
        let base = (*bytes).as_ref().as_ptr() as usize;
        let odd = (1..4).find(|o| !(base + o).is_multiple_of(4)).unwrap();
        assert!(Groups::<G>::mapped(bytes, odd, 1).is_err());
    }
}
