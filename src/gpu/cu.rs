//! Transfers through CUDA's copy engines beside GL compute: the streaming executor's copies
//! where CUDA is there (`SPORKLE_STREAM_COPY=cuda`, the default where it works).
//!
//! GL's shader copies reach 77 GB/s both ways together on the H100 and Vulkan's transfer
//! queues 58, where CUDA's copy engines reach 99 (`docs/experiments.md`). This module opens CUDA (the driver
//! library, loaded at run time through `cudarc`) on the GL context's GPU, matched by device
//! UUID, and imports device memory that Vulkan exported and GL imported too (`vk.rs`), so that
//! CUDA streams copy into and out of the buffers GL computes on ([`CudaCopies`]). Host memory
//! is pinned for CUDA: by default the process's own memory in 2 MiB pages, registered with
//! `cuMemHostRegister` ([`Cuda::pinned`]). The convolution stays GL's.
//!
//! Ordering between the APIs is the caller's: a CUDA copy into a shared buffer may start only
//! once GL has finished with it (a GL fence has passed), and GL may read it only once the
//! copy's event has passed. Every CUDA object here must be dropped on the thread that opened
//! CUDA (its context is current there), before the [`Cuda`] itself.

use super::context::GlContext;
use super::gl::{Buffer, Floats, WAIT_SPIN};
use super::vk::{SharedBuffer, VkMemory};
use crate::error::{Error, Result};
use cudarc::driver::{result as cu, sys};
use std::ffi::c_void;
use std::ops::Range;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Whether this machine has a CUDA driver library (cheap: opens it once).
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { sys::is_culib_present() }
}

fn cuda_err(what: &str) -> impl Fn(cu::DriverError) -> Error + '_ {
    move |e| Error::Gpu(format!("CUDA: {what}: {e:?}"))
}

/// One of [`Cuda`]'s two streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Copies into the GPU.
    Up,
    /// Copies out of the GPU.
    Down,
}

/// CUDA on one GPU: its primary context, current on the thread that made it, and two streams
/// (copies in, copies out).
pub struct Cuda {
    device: sys::CUdevice,
    up: sys::CUstream,
    down: sys::CUstream,
    /// The device's name.
    pub name: String,
}

impl Cuda {
    /// CUDA on the GPU whose UUID is `uuid`, its context made current on this thread; fails
    /// with [`Error::DeviceUnavailable`] where there is no such GPU. The caller has checked
    /// [`driver_present`] (`cudarc` panics on a missing library).
    fn new(uuid: [u8; 16]) -> Result<Self> {
        cu::init().map_err(cuda_err("cuInit"))?;
        let count = cu::device::get_count().map_err(cuda_err("counting devices"))?;
        let device = (0..count)
            .filter_map(|i| cu::device::get(i).ok())
            .find(|&d| cu::device::get_uuid(d).is_ok_and(|u| u.bytes.map(|b| b as u8) == uuid))
            .ok_or_else(|| {
                Error::DeviceUnavailable("no CUDA device has the GL device's UUID".into())
            })?;
        let name = cu::device::get_name(device).unwrap_or_default();
        // SAFETY: retaining the primary context of a valid device and making it current on this
        // thread; Drop releases it.
        unsafe {
            let ctx = cu::primary_ctx::retain(device).map_err(cuda_err("retaining a context"))?;
            cu::ctx::set_current(ctx).map_err(cuda_err("making the context current"))?;
        }
        let stream = || {
            cu::stream::create(cu::stream::StreamKind::NonBlocking)
                .map_err(cuda_err("creating a stream"))
        };
        let up = stream()?;
        let down = stream()?;
        Ok(Self {
            device,
            up,
            down,
            name,
        })
    }

    /// The device memory of `shared` as a CUDA device pointer.
    fn import(&self, shared: &SharedBuffer) -> Result<Imported> {
        let (fd, size, dedicated) = shared.export_fd()?;
        let desc = sys::CUDA_EXTERNAL_MEMORY_HANDLE_DESC {
            type_: sys::CUexternalMemoryHandleType::CU_EXTERNAL_MEMORY_HANDLE_TYPE_OPAQUE_FD,
            handle: sys::CUDA_EXTERNAL_MEMORY_HANDLE_DESC_st__bindgen_ty_1 { fd },
            size,
            flags: if dedicated {
                sys::CUDA_EXTERNAL_MEMORY_DEDICATED
            } else {
                0
            },
            reserved: [0; 16],
        };
        let mut memory = std::mem::MaybeUninit::uninit();
        // SAFETY: a valid descriptor of an fd Vulkan exported for `size` bytes; CUDA owns the fd
        // once the import succeeds.
        let imported = unsafe { sys::cuImportExternalMemory(memory.as_mut_ptr(), &desc).result() };
        if let Err(e) = imported {
            // SAFETY: the import failed, so the fd is still ours to close.
            unsafe { libc_close(fd) };
            return Err(cuda_err("importing memory")(e));
        }
        // SAFETY: the import succeeded and wrote the handle.
        let memory = unsafe { memory.assume_init() };
        // SAFETY: mapping the whole imported object once; Imported's Drop frees the mapping and
        // then the object.
        match unsafe { cu::external_memory::get_mapped_buffer(memory, 0, size) } {
            Ok(ptr) => Ok(Imported { memory, ptr }),
            Err(e) => {
                // SAFETY: nothing is mapped onto the object.
                unsafe {
                    let _ = cu::external_memory::destroy_external_memory(memory);
                }
                Err(cuda_err("mapping imported memory")(e))
            }
        }
    }

    /// Pinned host memory for `len` floats, from `cuMemHostAlloc` (`flags`), or (`registered`)
    /// the process's own memory in 2 MiB pages, registered with `cuMemHostRegister`.
    pub fn pinned_with(&self, len: usize, registered: bool, flags: u32) -> Result<Pinned> {
        let bytes = len.max(1) * 4;
        let (ptr, layout) = if registered {
            let layout = std::alloc::Layout::from_size_align(bytes.next_multiple_of(HUGE), HUGE)
                .map_err(|e| Error::Gpu(format!("pinned memory of {bytes} bytes: {e}")))?;
            // SAFETY: a non-zero size; freed with the same layout in Drop.
            let ptr = unsafe { std::alloc::alloc(layout) };
            if ptr.is_null() {
                return Err(Error::Gpu(format!("cannot allocate {bytes} bytes")));
            }
            // SAFETY: advice on memory just allocated (failure only loses large pages);
            // registering it pins it for copies; Drop unregisters it before freeing.
            let registered = unsafe {
                libc_madvise(ptr.cast(), layout.size(), MADV_HUGEPAGE);
                std::ptr::write_bytes(ptr, 0, layout.size());
                sys::cuMemHostRegister_v2(ptr.cast(), layout.size(), 0).result()
            };
            if let Err(e) = registered {
                // SAFETY: allocated above with this layout and not registered.
                unsafe { std::alloc::dealloc(ptr, layout) };
                return Err(cuda_err("registering host memory")(e));
            }
            (ptr.cast::<f32>(), Some(layout))
        } else {
            // SAFETY: allocating pinned memory in the current context; Pinned's Drop frees it.
            let ptr = unsafe { cu::malloc_host(bytes, flags) }
                .map_err(cuda_err("allocating pinned memory"))?;
            // SAFETY: the allocation holds at least `len` floats; zeroed, it is never read
            // uninitialised.
            unsafe { std::ptr::write_bytes(ptr.cast::<f32>(), 0, len) };
            (ptr.cast::<f32>(), None)
        };
        Ok(Pinned { ptr, len, layout })
    }

    /// Pinned host memory for `len` floats (see [`Cuda::pinned_with`]; `SPORKLE_CUDA_HOST`:
    /// `alloc`, `wc` (write-combined) or `registered`, the default).
    pub fn pinned(&self, len: usize) -> Result<Pinned> {
        match std::env::var("SPORKLE_CUDA_HOST").as_deref() {
            Ok("alloc") => self.pinned_with(len, false, 0),
            Ok("wc") => self.pinned_with(len, false, sys::CU_MEMHOSTALLOC_WRITECOMBINED),
            _ => self.pinned_with(len, true, 0),
        }
    }

    /// Device memory of CUDA's own for `len` floats (for comparison with imported memory).
    pub fn device_memory(&self, len: usize) -> Result<Imported> {
        // SAFETY: allocating device memory in the current context; Drop frees it.
        let ptr = unsafe { cu::malloc_sync(len.max(1) * 4) }
            .map_err(cuda_err("allocating device memory"))?;
        Ok(Imported {
            memory: std::ptr::null_mut(),
            ptr,
        })
    }

    /// A new event (no timing).
    pub fn event(&self) -> Result<Event> {
        cu::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(Event)
            .map_err(cuda_err("creating an event"))
    }

    /// A new event that can time (see [`TimedCopy`]).
    fn timing_event(&self) -> Result<Event> {
        cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map(Event)
            .map_err(cuda_err("creating an event"))
    }

    fn stream(&self, stream: Stream) -> sys::CUstream {
        match stream {
            Stream::Up => self.up,
            Stream::Down => self.down,
        }
    }

    /// Copies floats `range` of `src` into the same floats of `dst` (at least as long) on the
    /// stream for copies in.
    pub fn upload(&self, src: &Pinned, dst: &Imported, range: Range<usize>) -> Result<()> {
        let (offset, bytes) = byte_span(range, src.len);
        // SAFETY: `src` is pinned and holds the bytes copied (clamped to its length), `dst` is
        // device memory of this context at least as long (the caller's); the caller keeps both
        // alive until the copy has finished.
        unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                dst.ptr + offset as u64,
                src.ptr.cast::<u8>().add(offset).cast(),
                bytes,
                self.up,
            )
            .result()
        }
        .map_err(cuda_err("copying in"))
    }

    /// Copies floats `range` of `src` into the same floats of `dst` on the stream for copies
    /// out.
    pub fn download(&self, src: &Imported, dst: &Pinned, range: Range<usize>) -> Result<()> {
        let (offset, bytes) = byte_span(range, dst.len);
        // SAFETY: as in upload; the host side is written, and nothing reads it until the copy's
        // event has passed (the caller's).
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                dst.ptr.cast::<u8>().add(offset).cast(),
                src.ptr + offset as u64,
                bytes,
                self.down,
            )
            .result()
        }
        .map_err(cuda_err("copying out"))
    }

    /// Records `event` on `stream`.
    pub fn record(&self, event: &Event, stream: Stream) -> Result<()> {
        // SAFETY: a live event and stream.
        unsafe { cu::event::record(event.0, self.stream(stream)) }
            .map_err(cuda_err("recording an event"))
    }

    /// Waits until the work before `event`'s last record has finished.
    pub fn wait(&self, event: &Event) -> Result<()> {
        // SAFETY: a live event.
        unsafe { cu::event::synchronize(event.0) }.map_err(cuda_err("waiting for an event"))
    }

    /// Waits until all of `stream`'s work has finished.
    pub fn sync(&self, stream: Stream) -> Result<()> {
        // SAFETY: a live stream.
        unsafe { cu::stream::synchronize(self.stream(stream)) }
            .map_err(cuda_err("waiting for a stream"))
    }
}

/// The byte offset and length of floats `range`, clamped to a host buffer of `len` floats.
fn byte_span(range: Range<usize>, len: usize) -> (usize, usize) {
    let end = range.end.min(len);
    let start = range.start.min(end);
    (start * 4, (end - start) * 4)
}

impl Drop for Cuda {
    fn drop(&mut self) {
        // SAFETY: waiting for the streams before destroying them; every buffer and event is
        // the caller's to have dropped first (they free themselves in the current context).
        unsafe {
            for s in [self.up, self.down] {
                let _ = cu::stream::synchronize(s);
                let _ = cu::stream::destroy(s);
            }
            let _ = cu::primary_ctx::release(self.device);
        }
    }
}

/// Large pages (2 MiB) for registered host memory.
const HUGE: usize = 2 << 20;
/// `MADV_HUGEPAGE`.
const MADV_HUGEPAGE: i32 = 14;

extern "C" {
    #[link_name = "close"]
    fn libc_close(fd: i32) -> i32;
    #[link_name = "madvise"]
    fn libc_madvise(addr: *mut c_void, len: usize, advice: i32) -> i32;
}

/// Device memory as CUDA sees it: imported (mapped as one buffer), or (diagnostics,
/// `cuda_probe.rs`) CUDA's own allocation, with no external object.
pub struct Imported {
    memory: sys::CUexternalMemory,
    ptr: sys::CUdeviceptr,
}

impl Drop for Imported {
    fn drop(&mut self) {
        // SAFETY: the caller has waited for every copy that used it; the mapping (or CUDA's own
        // allocation) is freed before the object.
        unsafe {
            let _ = cu::memory_free(self.ptr);
            if !self.memory.is_null() {
                let _ = cu::external_memory::destroy_external_memory(self.memory);
            }
        }
    }
}

/// Pinned host memory.
pub struct Pinned {
    ptr: *mut f32,
    len: usize,
    /// Registered memory of the process's own, and its layout (else `cuMemHostAlloc`'s).
    layout: Option<std::alloc::Layout>,
}

impl Floats for Pinned {
    fn floats(&self) -> usize {
        self.len
    }
}

impl Pinned {
    /// The floats. The caller makes sure (with the copy's event) that no copy uses them.
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: the allocation holds `len` floats and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// See [`Pinned::as_slice`].
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in as_slice; `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: the caller has waited for every copy that used it; registered memory is
        // unregistered before it is freed with its layout.
        unsafe {
            match self.layout {
                Some(layout) => {
                    let _ = sys::cuMemHostUnregister(self.ptr.cast());
                    std::alloc::dealloc(self.ptr.cast(), layout);
                }
                None => {
                    let _ = cu::free_host(self.ptr.cast::<c_void>());
                }
            }
        }
    }
}

/// A CUDA event.
pub struct Event(sys::CUevent);

impl Event {
    /// Whether the work before its last record has finished.
    pub fn passed(&self) -> Result<bool> {
        // SAFETY: a live event.
        match unsafe { cu::event::query(self.0) } {
            Ok(()) => Ok(true),
            Err(cu::DriverError(sys::CUresult::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(e) => Err(cuda_err("querying an event")(e)),
        }
    }

    /// Waits until it has passed, or at most `timeout`; whether it passed. Polls (CUDA's own
    /// wait has no deadline): yielding for the first [`WAIT_SPIN`], then sleeping 50 µs at a
    /// time.
    pub fn wait(&self, timeout: Duration) -> Result<bool> {
        let start = Instant::now();
        loop {
            if self.passed()? {
                return Ok(true);
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Ok(false);
            }
            if waited < WAIT_SPIN {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50).min(timeout - waited));
            }
        }
    }
}

/// The GPU time (ns) from timing event `from` to timing event `to`, both passed (negative
/// where `to` came first); `None` where CUDA cannot say (an event not recorded or not passed).
/// CUDA gives it as an f32 of ms: about 0.5 µs resolution, coarser beyond seconds.
pub fn elapsed_ns(from: &Event, to: &Event) -> Option<i64> {
    // SAFETY: two live events.
    let ms = unsafe { cu::event::elapsed(from.0, to.0) }.ok()?;
    Some((f64::from(ms) * 1e6).round() as i64)
}

/// A copy on a CUDA stream, between two timing events, in parts (see
/// [`CudaCopies::copy_in`]), each ending at an event of its own.
pub struct TimedCopy {
    /// Passes when the copy has started.
    pub start: Rc<Event>,
    /// Passes when the copy has finished.
    pub end: Rc<Event>,
    /// Where each part ends, in order (the last is `end`).
    parts: Vec<Rc<Event>>,
}

impl TimedCopy {
    /// The copy's GPU time (ns), once `end` has passed.
    pub fn nanoseconds(&self) -> Option<u64> {
        elapsed_ns(&self.start, &self.end).and_then(|ns| u64::try_from(ns).ok())
    }

    /// Passes when part `part` has been copied (past the last part: the whole copy).
    pub fn part_end(&self, part: usize) -> &Rc<Event> {
        self.parts.get(part).unwrap_or(&self.end)
    }
}

/// Device memory that GL and CUDA both see: a GL storage buffer (over Vulkan memory) and the
/// same memory as a CUDA device pointer.
pub struct SharedMemory {
    // Field order is drop order: CUDA's mapping before the memory.
    cuda: Imported,
    shared: SharedBuffer,
}

impl SharedMemory {
    /// The GL storage buffer.
    pub fn gl(&self) -> &Buffer {
        self.shared.gl()
    }

    /// The same memory as CUDA sees it.
    pub fn imported(&self) -> &Imported {
        &self.cuda
    }
}

impl Floats for SharedMemory {
    fn floats(&self) -> usize {
        self.gl().len()
    }
}

/// The streaming executor's copies through CUDA: Vulkan for memory that GL and CUDA share,
/// CUDA for the copies. Lives on the GL worker thread.
pub struct CudaCopies {
    // Field order is drop order: CUDA (its streams waited for), then Vulkan.
    cuda: Cuda,
    vk: VkMemory,
}

/// An error unless every range lies within `len` floats (a copy past a buffer's end would
/// write another's memory).
fn check_within(parts: &[Range<usize>], len: usize) -> Result<()> {
    match parts.iter().find(|r| r.end > len || r.start > r.end) {
        Some(r) => Err(Error::Gpu(format!(
            "a copy of floats {r:?} of a buffer of {len} (sporkle bug)"
        ))),
        None => Ok(()),
    }
}

impl CudaCopies {
    /// Opens Vulkan and CUDA on the GPU of `ctx` (current on this thread); fails with
    /// [`Error::DeviceUnavailable`] (saying why) where either is missing or cannot share
    /// memory with GL.
    pub fn open(ctx: &GlContext) -> Result<Self> {
        if !driver_present() {
            // Before Vulkan: no device to open, no instance to make, where CUDA cannot follow.
            return Err(Error::DeviceUnavailable(
                "no CUDA driver library (libcuda)".into(),
            ));
        }
        let vk = VkMemory::new(ctx)?;
        let cuda = Cuda::new(vk.uuid)?;
        let copies = Self { cuda, vk };
        // One small shared buffer proves the whole chain (export, GL and CUDA imports).
        copies.device_buffer(4)?;
        Ok(copies)
    }

    /// The CUDA device's name.
    pub fn name(&self) -> &str {
        &self.cuda.name
    }

    /// CUDA itself (diagnostics: `cuda_probe.rs` copies without timing, and waits on events).
    pub fn cuda(&self) -> &Cuda {
        &self.cuda
    }

    /// Device memory for `len` floats that GL and CUDA share.
    pub fn device_buffer(&self, len: usize) -> Result<SharedMemory> {
        let shared = self.vk.shared_buffer(len)?;
        let cuda = self.cuda.import(&shared)?;
        Ok(SharedMemory { cuda, shared })
    }

    /// Pinned host memory for `len` floats.
    pub fn pinned(&self, len: usize) -> Result<Pinned> {
        self.cuda.pinned(len)
    }

    /// Copies floats `parts` (ranges, in order) of `src` into the same floats of `dst` on the
    /// stream for copies in, one copy per range, timed as one.
    pub fn copy_in(
        &self,
        src: &Pinned,
        dst: &SharedMemory,
        parts: &[Range<usize>],
    ) -> Result<TimedCopy> {
        check_within(parts, src.floats().min(dst.floats()))?;
        self.timed(
            Stream::Up,
            parts,
            |_| Ok(()),
            |c, r| c.upload(src, &dst.cuda, r),
        )
    }

    /// Copies floats `parts` of `src` into the same floats of `dst` on the stream for copies
    /// out, as `copy_in`; `before(i)` runs before part `i` is issued (to wait until it is
    /// written).
    pub fn copy_out(
        &self,
        src: &SharedMemory,
        dst: &Pinned,
        parts: &[Range<usize>],
        before: impl FnMut(usize) -> Result<()>,
    ) -> Result<TimedCopy> {
        check_within(parts, src.floats().min(dst.floats()))?;
        self.timed(Stream::Down, parts, before, |c, r| {
            c.download(&src.cuda, dst, r)
        })
    }

    /// Issues the copy of each of `parts` on `stream` (after `before` of its index), an event
    /// after each, between two timing events: the first recorded once `before(0)` has
    /// returned, so that the time is the copies' own (and the host's waits between parts).
    fn timed(
        &self,
        stream: Stream,
        parts: &[Range<usize>],
        mut before: impl FnMut(usize) -> Result<()>,
        copy: impl Fn(&Cuda, Range<usize>) -> Result<()>,
    ) -> Result<TimedCopy> {
        let start = self.cuda.timing_event()?;
        let end = Rc::new(self.cuda.timing_event()?);
        if parts.is_empty() {
            self.cuda.record(&start, stream)?;
        }
        let mut ends = Vec::with_capacity(parts.len());
        for (i, range) in parts.iter().enumerate() {
            before(i)?;
            if i == 0 {
                // Timed from when the first part may start: a copy out waits on the host for
                // its convolution first, which is not the copy's time.
                self.cuda.record(&start, stream)?;
            }
            copy(&self.cuda, range.clone())?;
            let part_end = match i + 1 == parts.len() {
                true => Rc::clone(&end),
                false => Rc::new(self.cuda.event()?),
            };
            self.cuda.record(&part_end, stream)?;
            ends.push(part_end);
        }
        Ok(TimedCopy {
            start: Rc::new(start),
            end,
            parts: ends,
        })
    }

    /// Whether every copy issued so far has finished, waiting at most `timeout`: an event
    /// recorded now on each stream has passed.
    pub fn idle(&self, timeout: Duration) -> Result<bool> {
        for stream in [Stream::Up, Stream::Down] {
            let event = self.cuda.event()?;
            self.cuda.record(&event, stream)?;
            if !event.wait(timeout)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Waits for every copy issued so far (before buffers they use are freed).
    pub fn finish(&self) {
        let _ = self.cuda.sync(Stream::Up);
        let _ = self.cuda.sync(Stream::Down);
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: destroying a live event once (CUDA defers it until its work is done).
        unsafe {
            let _ = cu::event::destroy(self.0);
        }
    }
}
