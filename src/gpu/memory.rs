//! Where the streaming executor's buffers live: GL's own (mapped staging, storage buffers), or
//! memory shared with CUDA, whose copy engines then move the data (`cu.rs`). One frame, or one
//! pinned input, is all of one kind: the kind of the worker's copy mode.

use super::cu::{Pinned, SharedMemory};
use super::gl::{Buffer, Floats, MappedBuffer, MappedView};
use crate::error::{Error, Result};

/// Host memory the GPU copies from or to.
pub(crate) enum HostMem {
    /// A persistently mapped GL buffer (shader or DMA copies).
    Gl(MappedBuffer),
    /// CUDA's pinned memory (CUDA copies).
    Cuda(Pinned),
}

impl HostMem {
    /// The floats (the caller makes sure no copy writes them meanwhile).
    pub fn as_slice(&self) -> &[f32] {
        match self {
            HostMem::Gl(b) => b.as_slice(),
            HostMem::Cuda(p) => p.as_slice(),
        }
    }

    /// See [`HostMem::as_slice`].
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        match self {
            HostMem::Gl(b) => b.as_mut_slice(),
            HostMem::Cuda(p) => p.as_mut_slice(),
        }
    }

    /// The GL buffer (shader and DMA copies).
    pub fn gl(&self) -> Result<&MappedBuffer> {
        match self {
            HostMem::Gl(b) => Ok(b),
            HostMem::Cuda(_) => Err(mixed()),
        }
    }

    /// The pinned memory (CUDA copies).
    pub fn cuda(&self) -> Result<&Pinned> {
        match self {
            HostMem::Cuda(p) => Ok(p),
            HostMem::Gl(_) => Err(mixed()),
        }
    }

    /// A read-only view of the first `len` floats that another thread may read.
    ///
    /// # Safety
    /// The caller must keep this buffer alive, and every copy from writing that range, until
    /// the view is dropped (the executor holds the frame until the view's release arrives, and
    /// waits for every release before dropping its frames), and must have waited for the end
    /// of the last copy into it.
    pub unsafe fn view(&self, len: usize) -> MappedView {
        let floats = self.as_slice();
        assert!(len <= floats.len(), "view larger than the buffer");
        // SAFETY: the caller's contract, for `len` floats inside the buffer.
        unsafe { MappedView::new(floats.as_ptr(), len) }
    }
}

impl Floats for HostMem {
    fn floats(&self) -> usize {
        match self {
            HostMem::Gl(b) => b.floats(),
            HostMem::Cuda(p) => p.floats(),
        }
    }
}

/// Device memory a convolution reads or writes.
pub(crate) enum DeviceMem {
    /// A GL storage buffer.
    Gl(Buffer),
    /// Memory GL and CUDA share.
    Shared(SharedMemory),
}

impl DeviceMem {
    /// The GL storage buffer over it.
    pub fn gl(&self) -> &Buffer {
        match self {
            DeviceMem::Gl(b) => b,
            DeviceMem::Shared(s) => s.gl(),
        }
    }

    /// The shared memory (CUDA copies).
    pub fn cuda(&self) -> Result<&SharedMemory> {
        match self {
            DeviceMem::Shared(s) => Ok(s),
            DeviceMem::Gl(_) => Err(mixed()),
        }
    }
}

impl Floats for DeviceMem {
    fn floats(&self) -> usize {
        self.gl().len()
    }
}

/// A buffer of the other copy mode's kind.
fn mixed() -> Error {
    Error::Gpu("a buffer of another copy mode than the executor's (executor bug)".into())
}
