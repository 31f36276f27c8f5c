//! Handing freed heap memory back to the system.
//!
//! glibc's allocator keeps what is freed inside its heaps resident until
//! something at the top of a heap happens to be freed; `malloc_trim(0)`
//! returns every whole free page of every arena. The generator slots call it
//! when a generation ends, after dropping its KV cache
//! (`Generator::release_cache`): `bench/serve-memory` on the defaults read
//! 0.95 GB resident after 300 documents and one /ask with both, 0.97 GB
//! without. (Calling it after embedding batches and after loading changed
//! nothing measurable, so it is not called there.) It costs a few
//! milliseconds.

/// Returns freed heap memory to the system where the allocator keeps it
/// (glibc); nothing elsewhere.
#[allow(unsafe_code)] // one call into the C library, no pointers involved
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists under
    // its locks; it takes no pointers from us.
    unsafe {
        libc::malloc_trim(0);
    }
}
