//! Pinned input buffers: host memory that the GPU reads across the bus directly, so a batch
//! written there streams to the GPU with no host copy (CUDA's pinned memory, in GL: a
//! persistently mapped buffer in client storage, `GL_ARB_buffer_storage`).
//!
//! [`PinnedInput`] is what callers hold ([`crate::Juggler::pinned_input`]); it borrows the
//! Juggler, so it cannot outlive the GL context that maps it. Every job submitted with it (and
//! the job's ticket) holds a `PinnedRead`; while any exists the buffer cannot be written
//! ([`PinnedInput::as_mut_slice`] says so), so the GPU never reads a half-written batch. The
//! memory itself belongs to the GPU worker, which frees it when the last holder is gone. Without
//! a GPU (or where mapping fails) the buffer is plain host memory and everything else is the
//! same.

use crate::error::{Error, Result};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

/// Where the floats live.
enum Storage {
    /// Plain host memory (no GPU, or mapping failed).
    Host(Box<[f32]>),
    /// A mapped GL buffer of a GPU worker (`owner`), by its id; dropping sends the id back to
    /// free it.
    Mapped {
        owner: u64,
        id: u64,
        ptr: *mut f32,
        free: mpsc::Sender<u64>,
    },
}

/// The buffer, shared by its owner and every reader.
pub(crate) struct PinnedShared {
    storage: Storage,
    len: usize,
    /// Jobs and tickets reading it.
    readers: AtomicUsize,
}

// SAFETY: the mapping is plain host memory that stays mapped until the worker frees it, which it
// does only after this (the last holder) is dropped; writes need the owner's exclusive borrow and
// no reader (PinnedInput::as_mut_slice), so no thread reads while another writes.
unsafe impl Send for PinnedShared {}
// SAFETY: as for Send: shared access only reads.
unsafe impl Sync for PinnedShared {}

impl PinnedShared {
    /// A mapping of `len` floats at `ptr`, GL buffer `id` of GPU worker `owner`, freed through
    /// `free`.
    ///
    /// # Safety
    /// `ptr` must stay valid for `len` floats, and unwritten by anyone but this buffer's owner,
    /// until `id` arrives on `free`'s receiver.
    pub(crate) unsafe fn mapped(
        owner: u64,
        id: u64,
        ptr: *mut f32,
        len: usize,
        free: mpsc::Sender<u64>,
    ) -> Self {
        Self {
            storage: Storage::Mapped {
                owner,
                id,
                ptr,
                free,
            },
            len,
            readers: AtomicUsize::new(0),
        }
    }

    /// Plain host memory of `len` floats.
    pub(crate) fn host(len: usize) -> Self {
        Self {
            storage: Storage::Host(vec![0.0; len].into_boxed_slice()),
            len,
            readers: AtomicUsize::new(0),
        }
    }

    fn as_slice(&self) -> &[f32] {
        match &self.storage {
            Storage::Host(b) => b,
            // SAFETY: valid for len floats while self lives (PinnedShared::mapped's contract);
            // writes happen only through as_mut_slice, which excludes every shared borrow.
            Storage::Mapped { ptr, .. } => unsafe { std::slice::from_raw_parts(*ptr, self.len) },
        }
    }
}

impl Drop for PinnedShared {
    fn drop(&mut self) {
        if let Storage::Mapped { id, free, .. } = &self.storage {
            // A closed channel means the worker has gone, and the mapping with it.
            let _ = free.send(*id);
        }
    }
}

/// A reader's hold on a pinned buffer: a job in the GPU worker, or its ticket (for a CPU re-run).
pub(crate) struct PinnedRead(Arc<PinnedShared>);

impl PinnedRead {
    fn new(shared: &Arc<PinnedShared>) -> Self {
        shared.readers.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(shared))
    }

    /// The floats.
    pub(crate) fn as_slice(&self) -> &[f32] {
        self.0.as_slice()
    }

    /// The GPU worker that maps it and its GL buffer id there, if it is mapped GPU memory.
    pub(crate) fn gl_id(&self) -> Option<(u64, u64)> {
        match self.0.storage {
            Storage::Mapped { owner, id, .. } => Some((owner, id)),
            Storage::Host(_) => None,
        }
    }
}

impl Clone for PinnedRead {
    fn clone(&self) -> Self {
        Self::new(&self.0)
    }
}

impl Drop for PinnedRead {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A job's input: shared host memory, or a pinned buffer.
#[derive(Clone)]
pub(crate) enum StreamInput {
    /// Host memory, copied into the executor's staging.
    Host(Arc<[f32]>),
    /// A pinned buffer, which the GPU reads directly.
    Pinned(PinnedRead),
}

impl StreamInput {
    /// The floats.
    pub(crate) fn as_slice(&self) -> &[f32] {
        match self {
            StreamInput::Host(x) => x,
            StreamInput::Pinned(x) => x.as_slice(),
        }
    }

    /// Floats it holds.
    pub(crate) fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// The GPU worker and GL buffer id of a pinned input in mapped GPU memory (a worker uses
    /// only its own: another's it copies like host memory).
    pub(crate) fn gl_id(&self) -> Option<(u64, u64)> {
        match self {
            StreamInput::Pinned(x) => x.gl_id(),
            StreamInput::Host(_) => None,
        }
    }
}

/// An input buffer in pinned host memory that the GPU reads directly (see the module docs):
/// write a batch with [`PinnedInput::as_mut_slice`], submit it with
/// [`crate::Juggler::submit_pinned`] as often as wanted, write the next batch once those jobs'
/// tickets have been waited.
pub struct PinnedInput<'j> {
    shared: Arc<PinnedShared>,
    _juggler: PhantomData<&'j ()>,
}

impl PinnedInput<'_> {
    pub(crate) fn new(shared: PinnedShared) -> Self {
        Self {
            shared: Arc::new(shared),
            _juggler: PhantomData,
        }
    }

    /// Floats it holds.
    pub fn len(&self) -> usize {
        self.shared.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.shared.len == 0
    }

    /// Whether it is GPU-mapped memory (false: plain host memory, as without a GPU; it works
    /// the same, and GPU jobs copy it into their staging).
    pub fn is_mapped(&self) -> bool {
        matches!(self.shared.storage, Storage::Mapped { .. })
    }

    /// The floats.
    pub fn as_slice(&self) -> &[f32] {
        self.shared.as_slice()
    }

    /// The floats, to write: an error while jobs submitted with it (or their tickets) are alive,
    /// since the GPU may still be reading them.
    pub fn as_mut_slice(&mut self) -> Result<&mut [f32]> {
        let readers = self.shared.readers.load(Ordering::Acquire);
        if readers > 0 {
            return Err(Error::InUse(format!(
                "the pinned input is still read by {readers} job(s) or ticket(s): wait for \
                 their tickets before writing it"
            )));
        }
        let len = self.shared.len;
        match Arc::get_mut(&mut self.shared).map(|s| &mut s.storage) {
            Some(Storage::Host(b)) => Ok(b),
            // SAFETY: valid for len floats while the shared buffer lives; this Arc is the only
            // one (get_mut), so no reader exists, and the exclusive borrow of self bounds it.
            Some(Storage::Mapped { ptr, .. }) => {
                Ok(unsafe { std::slice::from_raw_parts_mut(*ptr, len) })
            }
            None => Err(Error::InUse(
                "the pinned input is still held by a finished job's ticket".into(),
            )),
        }
    }

    /// A reader's hold, for a job.
    pub(crate) fn read(&self) -> PinnedRead {
        PinnedRead::new(&self.shared)
    }
}

impl std::fmt::Debug for PinnedInput<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PinnedInput {{ len: {}, mapped: {} }}",
            self.len(),
            self.is_mapped()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader (a job, a ticket) bars writing; once every reader is gone, writing works and
    /// readers see what was written.
    #[test]
    fn readers_bar_writing_until_they_are_gone() {
        let mut input = PinnedInput::new(PinnedShared::host(8));
        assert!(!input.is_mapped());
        input.as_mut_slice().unwrap().fill(2.0);
        let job = StreamInput::Pinned(input.read());
        let ticket = job.clone();
        assert!(matches!(input.as_mut_slice(), Err(Error::InUse(_))));
        assert_eq!(job.as_slice(), &[2.0; 8]);
        assert_eq!(job.gl_id(), None);
        drop(job);
        assert!(input.as_mut_slice().is_err(), "the ticket still reads it");
        drop(ticket);
        input.as_mut_slice().unwrap()[0] = 3.0;
        assert_eq!(input.as_slice()[0], 3.0);
        assert_eq!(input.read().as_slice().len(), 8);
    }

    /// The last holder of a mapped buffer sends its id back to be freed, and only the last.
    #[test]
    fn the_last_holder_frees_a_mapped_buffer() {
        let (free, freed) = mpsc::channel();
        let mut backing = vec![0.0f32; 4];
        // SAFETY: `backing` outlives every holder below and nothing else writes it.
        let shared = unsafe { PinnedShared::mapped(1, 7, backing.as_mut_ptr(), 4, free) };
        let input = PinnedInput::new(shared);
        let job = input.read();
        assert_eq!(job.gl_id(), Some((1, 7)));
        drop(input);
        assert!(freed.try_recv().is_err(), "a job still holds it");
        drop(job);
        assert_eq!(freed.try_recv(), Ok(7));
    }
}
