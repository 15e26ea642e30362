//! A zeroed byte buffer aligned for direct I/O: a large read of a local replica can then go
//! from the disk straight into the buffer the FUSE reply is sent from (`O_DIRECT`), with no
//! copy through the page cache.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of the buffer, enough for `O_DIRECT` on any disk (logical blocks up to 4 KiB).
pub const DIRECT_IO_ALIGN: usize = 4096;

pub struct AlignedBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively, like a `Vec<u8>`.
unsafe impl Send for AlignedBuffer {}
// SAFETY: shared references only read, like `&Vec<u8>`.
unsafe impl Sync for AlignedBuffer {}

impl AlignedBuffer {
    /// `len` zero bytes starting at a multiple of [`DIRECT_IO_ALIGN`].
    pub fn zeroed(len: usize) -> AlignedBuffer {
        if len == 0 {
            return AlignedBuffer { ptr: NonNull::dangling(), len: 0 };
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(ptr) else { alloc::handle_alloc_error(layout) };
        AlignedBuffer { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, DIRECT_IO_ALIGN).expect("buffer size within isize")
    }
}

impl Drop for AlignedBuffer {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with this very layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl Deref for AlignedBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` initialized (zeroed) bytes owned by this buffer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuffer({} bytes)", self.len)
    }
}

/// Whether `buf` may be the target of an `O_DIRECT` read.
pub fn is_direct_io_aligned(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(DIRECT_IO_ALIGN) && buf.len().is_multiple_of(DIRECT_IO_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_aligned_and_writable() {
        for len in [0, 1, 4096, 640 * 1024 + 512] {
            let mut buf = AlignedBuffer::zeroed(len);
            assert_eq!(buf.len(), len);
            assert!(buf.iter().all(|b| *b == 0));
            assert!(len == 0 || (buf.as_ptr() as usize).is_multiple_of(DIRECT_IO_ALIGN));
            if len > 0 {
                buf[len - 1] = 7;
                assert_eq!(buf[len - 1], 7);
            }
        }
        assert!(is_direct_io_aligned(&AlignedBuffer::zeroed(8192)));
        assert!(!is_direct_io_aligned(&AlignedBuffer::zeroed(8192)[1..4097]));
    }
}
