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

/// A reader's hold on the first `len` floats of a pinned buffer: a job in the GPU worker, or its
/// ticket (for a CPU re-run).
pub(crate) struct PinnedRead(Arc<PinnedShared>, usize);

impl PinnedRead {
    fn new(shared: &Arc<PinnedShared>, len: usize) -> Self {
        assert!(len <= shared.len, "a pinned read past the buffer's end");
        shared.readers.fetch_add(1, Ordering::AcqRel);
        Self(Arc::clone(shared), len)
    }

    /// The floats.
    pub(crate) fn as_slice(&self) -> &[f32] {
        &self.0.as_slice()[..self.1]
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
        Self::new(&self.0, self.1)
    }
}

impl Drop for PinnedRead {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Buffers that synchronous GPU calls stage the caller's input in (pinned where the GPU maps
/// them, else plain host memory), kept for the next call: a warm call allocates nothing
/// input-sized, and the GPU reads the input where this copy put it.
#[derive(Default)]
pub(crate) struct InputPool {
    free: std::sync::Mutex<Vec<Arc<PinnedShared>>>,
}

/// Buffers an [`InputPool`] keeps at most (calls from more threads at once allocate more, and
/// the smallest go when they come back).
const POOL_MAX: usize = 4;

impl InputPool {
    /// A buffer of at least `len` floats that no one else holds: the smallest kept one that
    /// fits, else a new one from `make` (which gets `len`).
    pub(crate) fn take(
        &self,
        len: usize,
        make: impl Fn(usize) -> Result<PinnedShared>,
    ) -> Result<PooledInput<'_>> {
        let kept = {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let best = (free.iter().enumerate())
                .filter(|(_, b)| b.len >= len)
                .min_by_key(|(_, b)| b.len)
                .map(|(i, _)| i);
            best.map(|i| free.swap_remove(i))
        };
        let mut shared = match kept {
            Some(b) => b,
            None => Arc::new(make(len)?),
        };
        // A job answers before its worker drops the job's hold; wait the moment that takes.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
        while Arc::get_mut(&mut shared).is_none() {
            if std::time::Instant::now() > deadline {
                shared = Arc::new(make(len)?);
                break;
            }
            std::thread::yield_now();
        }
        Ok(PooledInput {
            pool: self,
            shared: Some(shared),
            len,
        })
    }

    /// Drops every kept buffer (their memory goes back to the GPU worker that maps it).
    pub(crate) fn clear(&self) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Buffers kept now.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A buffer lent by an [`InputPool`] for one call: written through [`PooledInput::as_mut_slice`]
/// while no job reads it, read by jobs through [`PooledInput::read`]; back to the pool on drop.
pub(crate) struct PooledInput<'p> {
    pool: &'p InputPool,
    shared: Option<Arc<PinnedShared>>,
    /// Floats of this call (the buffer may be longer).
    len: usize,
}

impl PooledInput<'_> {
    fn shared(&self) -> &Arc<PinnedShared> {
        self.shared
            .as_ref()
            .expect("a pooled input is lent until dropped")
    }

    /// The call's floats, to write; an error while a job reads them.
    pub(crate) fn as_mut_slice(&mut self) -> Result<&mut [f32]> {
        let len = self.len;
        let shared = self
            .shared
            .as_mut()
            .expect("a pooled input is lent until dropped");
        match Arc::get_mut(shared).map(|s| &mut s.storage) {
            Some(Storage::Host(b)) => Ok(&mut b[..len]),
            // SAFETY: valid for the buffer's length (>= len) while the shared buffer lives; this
            // Arc is the only one (get_mut), so no reader exists, and the borrow of self bounds it.
            Some(Storage::Mapped { ptr, .. }) => {
                Ok(unsafe { std::slice::from_raw_parts_mut(*ptr, len) })
            }
            None => Err(Error::InUse("a staged input is still read by a job".into())),
        }
    }

    /// A reader's hold on the call's floats, for a job.
    pub(crate) fn read(&self) -> PinnedRead {
        PinnedRead::new(self.shared(), self.len)
    }
}

impl Drop for PooledInput<'_> {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        let mut free = self.pool.free.lock().unwrap_or_else(|e| e.into_inner());
        free.push(shared);
        if free.len() > POOL_MAX {
            let smallest = (free.iter().enumerate())
                .min_by_key(|(_, b)| b.len)
                .map(|(i, _)| i);
            if let Some(i) = smallest {
                free.swap_remove(i);
            }
        }
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
/// tickets have been waited. Dropped (and its jobs finished), its memory is freed by the GPU
/// thread when that next handles anything: the next GPU call, or
/// [`crate::Juggler::settle_gpu`].
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
        PinnedRead::new(&self.shared, self.shared.len)
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

    /// A pool lends the smallest kept buffer that fits, reads see only the call's floats, a
    /// buffer a job still reads is not written, and what comes back is kept for the next call
    /// (no new buffer), at most `POOL_MAX` of them.
    #[test]
    fn a_pool_reuses_its_buffers() {
        let pool = InputPool::default();
        let made = AtomicUsize::new(0);
        let make = |len| {
            made.fetch_add(1, Ordering::Relaxed);
            Ok(PinnedShared::host(len))
        };
        let mut a = pool.take(8, make).unwrap();
        a.as_mut_slice().unwrap().fill(1.0);
        let job = a.read();
        assert_eq!(job.as_slice(), &[1.0; 8]);
        assert!(matches!(a.as_mut_slice(), Err(Error::InUse(_))));
        drop(job);
        drop(a);
        assert_eq!(pool.kept(), 1);
        // Shorter calls reuse it and see their own length.
        let mut b = pool.take(5, make).unwrap();
        b.as_mut_slice().unwrap().fill(2.0);
        assert_eq!(b.read().as_slice(), &[2.0; 5]);
        assert_eq!(made.load(Ordering::Relaxed), 1);
        // A longer one while b is lent: a new buffer.
        let c = pool.take(16, make).unwrap();
        assert_eq!(made.load(Ordering::Relaxed), 2);
        drop((b, c));
        assert_eq!(pool.kept(), 2);
        let lent: Vec<_> = (0..POOL_MAX + 2)
            .map(|_| pool.take(4, make).unwrap())
            .collect();
        drop(lent);
        assert_eq!(pool.kept(), POOL_MAX);
        pool.clear();
        assert_eq!(pool.kept(), 0);
    }
}
