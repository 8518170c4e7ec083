//! RAII wrappers over the GL objects sporkle uses (storage buffers, compute programs, timer
//! queries, fences), with live-object counters that the leak trials read.
//!
//! Each object holds the shared `glow::Context` and deletes itself on drop, on the thread that
//! owns the context (these types are not `Send`). GL errors are checked at the boundaries
//! (after allocation, dispatch and readback) and become [`Error::Gpu`]. Together with
//! `context.rs`, this file holds the GPU's `unsafe`: every block says why it is sound.

use crate::error::{Error, Result};
use glow::HasContext;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

static BUFFERS: AtomicUsize = AtomicUsize::new(0);
static PROGRAMS: AtomicUsize = AtomicUsize::new(0);
static QUERIES: AtomicUsize = AtomicUsize::new(0);
static FENCES: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Fault injection (`GpuBackend::inject_fence_fault`): on this thread's context no fence is
    /// ever seen to pass, as on a hung GPU, so every wait lasts its whole timeout and fails.
    static NEVER_SIGNAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Turns the fence fault of this thread's context on or off (see `NEVER_SIGNAL`).
pub(crate) fn set_fences_never_signal(on: bool) {
    NEVER_SIGNAL.with(|f| f.set(on));
}

/// GL objects alive in this process, by type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveObjects {
    /// Buffers.
    pub buffers: usize,
    /// Programs.
    pub programs: usize,
    /// Queries.
    pub queries: usize,
    /// Fences.
    pub fences: usize,
}

impl LiveObjects {
    /// The counts now.
    pub fn now() -> Self {
        Self {
            buffers: BUFFERS.load(Relaxed),
            programs: PROGRAMS.load(Relaxed),
            queries: QUERIES.load(Relaxed),
            fences: FENCES.load(Relaxed),
        }
    }

    /// Whether nothing is alive.
    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

/// Turns pending GL errors into an [`Error::Gpu`] naming `what` was being done.
pub fn check(gl: &glow::Context, what: &str) -> Result<()> {
    let mut codes = Vec::new();
    loop {
        // SAFETY: glGetError has no preconditions on a current context.
        let code = unsafe { gl.get_error() };
        if code == glow::NO_ERROR || codes.len() > 8 {
            break;
        }
        codes.push(match code {
            glow::OUT_OF_MEMORY => "GL_OUT_OF_MEMORY".to_owned(),
            glow::INVALID_VALUE => "GL_INVALID_VALUE".to_owned(),
            glow::INVALID_OPERATION => "GL_INVALID_OPERATION".to_owned(),
            glow::INVALID_ENUM => "GL_INVALID_ENUM".to_owned(),
            c => format!("GL error 0x{c:x}"),
        });
    }
    if codes.is_empty() {
        Ok(())
    } else {
        Err(Error::Gpu(format!("{what}: {}", codes.join(", "))))
    }
}

/// Default wait for a fence before the job it ends counts as failed.
pub const FENCE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the executor's waits (a GL fence's, a CUDA event's) poll before they block or
/// sleep: most of its waits are shorter.
pub const WAIT_SPIN: Duration = Duration::from_millis(1);

/// A buffer of a known number of floats ([`Buffer`], [`MappedBuffer`]).
pub trait Floats {
    /// Floats it holds.
    fn floats(&self) -> usize;
}

impl Floats for Buffer {
    fn floats(&self) -> usize {
        self.len
    }
}

impl Floats for MappedBuffer {
    fn floats(&self) -> usize {
        self.len
    }
}

/// Makes `slot` hold a buffer of at least `len` floats: the one there if it is large enough,
/// else a new one from `make` (the old one deleted first, so both never exist at once). Buffers
/// kept between calls only grow.
pub fn ensure_len<T: Floats>(
    slot: &mut Option<T>,
    len: usize,
    make: impl FnOnce() -> Result<T>,
) -> Result<()> {
    if slot.as_ref().is_none_or(|b| b.floats() < len) {
        *slot = None;
        *slot = Some(make()?);
    }
    Ok(())
}

/// A shader storage buffer of f32s.
pub struct Buffer {
    gl: Rc<glow::Context>,
    raw: glow::Buffer,
    len: usize,
}

impl Buffer {
    /// A buffer of `len` floats (contents undefined). With `immutable` (GL_ARB_buffer_storage),
    /// the storage is fixed and never mapped by the CPU, so the driver keeps it in device memory;
    /// a mutable `glBufferData` buffer rewritten every call may be placed in host memory, where
    /// every shader read crosses the bus.
    pub fn new(gl: &Rc<glow::Context>, len: usize, immutable: bool) -> Result<Self> {
        Self::with_storage(gl, len, |gl, bytes| {
            // SAFETY: sizing the buffer bound to the storage target on the current context.
            unsafe {
                if immutable {
                    gl.buffer_storage(
                        glow::SHADER_STORAGE_BUFFER,
                        bytes,
                        None,
                        glow::DYNAMIC_STORAGE_BIT,
                    );
                } else {
                    gl.buffer_data_size(glow::SHADER_STORAGE_BUFFER, bytes, glow::DYNAMIC_COPY);
                }
            }
        })
    }

    /// A buffer of `len` floats whose storage `define` gives it: called with the buffer bound
    /// to `GL_SHADER_STORAGE_BUFFER` and its size in bytes (for storage from a memory object,
    /// see `vk.rs`).
    pub(crate) fn with_storage(
        gl: &Rc<glow::Context>,
        len: usize,
        define: impl FnOnce(&glow::Context, i32),
    ) -> Result<Self> {
        let bytes = i32::try_from(len.max(1) * 4).map_err(|_| {
            Error::GpuLimit(format!(
                "a buffer of {len} floats is over the 2 GiB GL size limit"
            ))
        })?;
        // SAFETY: creating and binding a buffer on the current context; the name is deleted in
        // Drop.
        let raw = unsafe {
            let raw = gl.create_buffer().map_err(Error::Gpu)?;
            gl.bind_buffer(glow::SHADER_STORAGE_BUFFER, Some(raw));
            raw
        };
        BUFFERS.fetch_add(1, Relaxed);
        let buffer = Self {
            gl: Rc::clone(gl),
            raw,
            len,
        };
        define(gl, bytes);
        check(gl, &format!("allocating a buffer of {bytes} bytes"))?;
        Ok(buffer)
    }

    /// Floats it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `data` at the start.
    pub fn upload(&self, data: &[f32]) -> Result<()> {
        assert!(data.len() <= self.len, "upload larger than the buffer");
        // SAFETY: the buffer is alive and at least data.len() floats long (checked above).
        unsafe {
            self.gl
                .bind_buffer(glow::SHADER_STORAGE_BUFFER, Some(self.raw));
            self.gl.buffer_sub_data_u8_slice(
                glow::SHADER_STORAGE_BUFFER,
                0,
                bytemuck::cast_slice(data),
            );
        }
        check(&self.gl, "uploading")
    }

    /// Reads the first `out.len()` floats (after the writes that a barrier made visible).
    pub fn download(&self, out: &mut [f32]) -> Result<()> {
        assert!(out.len() <= self.len, "download larger than the buffer");
        // SAFETY: the buffer is alive and at least out.len() floats long (checked above).
        unsafe {
            self.gl
                .bind_buffer(glow::SHADER_STORAGE_BUFFER, Some(self.raw));
            self.gl.get_buffer_sub_data(
                glow::SHADER_STORAGE_BUFFER,
                0,
                bytemuck::cast_slice_mut(out),
            );
        }
        check(&self.gl, "reading back")
    }

    /// The GL name, for copies.
    pub(crate) fn raw(&self) -> glow::Buffer {
        self.raw
    }

    /// Binds it to storage binding point `index`.
    pub fn bind(&self, index: u32) {
        // SAFETY: the buffer is alive.
        unsafe {
            self.gl
                .bind_buffer_base(glow::SHADER_STORAGE_BUFFER, index, Some(self.raw))
        };
    }

    /// Binds `len` floats of it from float `offset` to storage binding point `index` (the
    /// shader sees them as the whole buffer). `offset * 4` must be a multiple of
    /// `GL_SHADER_STORAGE_BUFFER_OFFSET_ALIGNMENT` (`GpuInfo::storage_offset_alignment`).
    pub fn bind_range(&self, index: u32, offset: usize, len: usize) -> Result<()> {
        if offset + len > self.len || len == 0 {
            return Err(Error::Gpu(format!(
                "binding floats {offset}..{} of a buffer of {} (sporkle bug)",
                offset + len,
                self.len
            )));
        }
        // SAFETY: the buffer is alive and the range lies within it (checked above).
        unsafe {
            self.gl.bind_buffer_range(
                glow::SHADER_STORAGE_BUFFER,
                index,
                Some(self.raw),
                (offset * 4) as i32,
                (len * 4) as i32,
            )
        };
        check(&self.gl, "binding a buffer range")
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: the name was created by this context and is deleted once.
        unsafe { self.gl.delete_buffer(self.raw) };
        BUFFERS.fetch_sub(1, Relaxed);
    }
}

/// Which way a [`MappedBuffer`] moves data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The host writes, the GPU copies from it.
    Upload,
    /// The GPU copies into it, the host reads.
    Download,
    /// The host writes and reads it, the GPU reads it (a pinned input).
    Pinned,
}

/// A staging buffer in host-visible memory, persistently and coherently mapped
/// (`GL_ARB_buffer_storage`): the host reads or writes the mapping while the GPU copies to or
/// from it with `glCopyBufferSubData` (DMA), which runs an order of magnitude faster on NVIDIA
/// than `glBufferSubData`/`glGetBufferSubData`. Whoever touches the mapping must first make sure
/// (with a fence) that no GPU copy still uses that range.
pub struct MappedBuffer {
    gl: Rc<glow::Context>,
    raw: glow::Buffer,
    ptr: *mut f32,
    len: usize,
}

impl MappedBuffer {
    /// A staging buffer of `len` floats, mapped for the host to write (`Upload`) or read.
    pub fn new(gl: &Rc<glow::Context>, len: usize, direction: Direction) -> Result<Self> {
        Self::with_flags(gl, len, direction, true, true)
    }

    /// A staging buffer with the coherent and client-storage flags chosen (diagnostics: the
    /// staging probe compares them). A non-coherent mapping needs
    /// [`client_mapped_barrier`] after the GPU writes it, before the fence.
    pub fn with_flags(
        gl: &Rc<glow::Context>,
        len: usize,
        direction: Direction,
        coherent: bool,
        client_storage: bool,
    ) -> Result<Self> {
        let bytes = i32::try_from(len.max(1) * 4).map_err(|_| {
            Error::GpuLimit(format!(
                "a staging buffer of {len} floats is over the 2 GiB GL size limit"
            ))
        })?;
        let access = match direction {
            Direction::Upload => glow::MAP_WRITE_BIT,
            Direction::Download => glow::MAP_READ_BIT,
            Direction::Pinned => glow::MAP_READ_BIT | glow::MAP_WRITE_BIT,
        } | glow::MAP_PERSISTENT_BIT
            | if coherent { glow::MAP_COHERENT_BIT } else { 0 };
        let flags = access
            | if client_storage {
                glow::CLIENT_STORAGE_BIT
            } else {
                0
            };
        // SAFETY: creating, sizing and mapping a buffer on the current context; the storage is
        // immutable, so the mapping stays valid until the buffer is deleted in Drop.
        let (raw, ptr) = unsafe {
            let raw = gl.create_buffer().map_err(Error::Gpu)?;
            gl.bind_buffer(glow::COPY_WRITE_BUFFER, Some(raw));
            gl.buffer_storage(glow::COPY_WRITE_BUFFER, bytes, None, flags);
            let ptr = gl.map_buffer_range(glow::COPY_WRITE_BUFFER, 0, bytes, access);
            (raw, ptr.cast::<f32>())
        };
        BUFFERS.fetch_add(1, Relaxed);
        let buffer = Self {
            gl: Rc::clone(gl),
            raw,
            ptr,
            len,
        };
        check(gl, &format!("allocating a mapped buffer of {bytes} bytes"))?;
        if buffer.ptr.is_null() || !buffer.ptr.is_aligned() {
            return Err(Error::Gpu(format!(
                "mapping a staging buffer of {bytes} bytes failed"
            )));
        }
        Ok(buffer)
    }

    /// Floats it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapping, to read. The caller must have waited for the fence of every GPU copy into
    /// it (the executor does: a frame's staging is touched only after its fence).
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: the mapping is valid for len floats while the buffer lives (persistent
        // mapping of immutable storage, checked non-null and aligned at creation); GPU writes
        // are finished by the caller's fence wait, and the borrow of self bounds the slice.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The mapping, to write (same condition as [`MappedBuffer::as_slice`]).
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in as_slice; the exclusive borrow of self makes the slice unique on the host.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The GL name, for copies.
    pub(crate) fn raw(&self) -> glow::Buffer {
        self.raw
    }

    /// Binds it to storage binding point `index`, for a shader to read or write host memory
    /// across the bus (no DMA copy).
    pub fn bind(&self, index: u32) {
        // SAFETY: the buffer is alive.
        unsafe {
            self.gl
                .bind_buffer_base(glow::SHADER_STORAGE_BUFFER, index, Some(self.raw))
        };
    }
}

/// A read-only view of a staging buffer, sendable to another thread (see `MappedView::new` for
/// the contract that keeps it valid).
pub struct MappedView {
    ptr: *const f32,
    len: usize,
}

// SAFETY: the view only reads plain floats; the memory stays mapped and unwritten for the view's
// life by the contract of MappedView::new, whichever thread reads it.
unsafe impl Send for MappedView {}

impl MappedView {
    /// A view of `len` floats at `ptr`, host memory that a GPU copy wrote (a mapped buffer or
    /// CUDA's pinned memory: `memory.rs`).
    ///
    /// # Safety
    /// The memory must stay allocated and unwritten, and the copy into it must have finished,
    /// for as long as the view exists.
    pub(crate) unsafe fn new(ptr: *const f32, len: usize) -> Self {
        Self { ptr, len }
    }

    /// The floats.
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: by MappedView::new's contract the mapping is alive, finished and not
        // written for as long as this view (and so this borrow) exists.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for MappedBuffer {
    fn drop(&mut self) {
        // SAFETY: the name was created by this context and is deleted once; deleting a buffer
        // unmaps it.
        unsafe { self.gl.delete_buffer(self.raw) };
        BUFFERS.fetch_sub(1, Relaxed);
    }
}

/// Copies `floats` floats from the start of `from` to the start of `to` on the GPU (a DMA copy,
/// ordered with the other commands of the context).
pub fn copy_buffer(
    gl: &glow::Context,
    from: glow::Buffer,
    to: glow::Buffer,
    floats: usize,
) -> Result<()> {
    let bytes = i32::try_from(floats * 4)
        .map_err(|_| Error::Gpu(format!("a copy of {floats} floats is over 2 GiB")))?;
    // SAFETY: both names are live buffers of this context (the callers hold them) and at least
    // `bytes` long (the executor sizes them from the same job).
    unsafe {
        gl.bind_buffer(glow::COPY_READ_BUFFER, Some(from));
        gl.bind_buffer(glow::COPY_WRITE_BUFFER, Some(to));
        gl.copy_buffer_sub_data(glow::COPY_READ_BUFFER, glow::COPY_WRITE_BUFFER, 0, 0, bytes);
    }
    check(gl, "copying between buffers")
}

/// A linked compute program.
pub struct Program {
    gl: Rc<glow::Context>,
    raw: glow::Program,
}

impl Program {
    /// Compiles and links a compute shader; a failure carries the driver's log. With
    /// `retrievable`, the driver keeps the program binary for [`Program::binary`].
    pub fn compute(gl: &Rc<glow::Context>, source: &str, retrievable: bool) -> Result<Self> {
        // SAFETY: shader and program objects of the current context; the shader is deleted
        // here and the program in Drop (or here, on failure).
        unsafe {
            let shader = gl.create_shader(glow::COMPUTE_SHADER).map_err(Error::Gpu)?;
            gl.shader_source(shader, source);
            gl.compile_shader(shader);
            if !gl.get_shader_compile_status(shader) {
                let log = gl.get_shader_info_log(shader);
                gl.delete_shader(shader);
                return Err(Error::Gpu(format!(
                    "compute shader does not compile: {}",
                    log.trim()
                )));
            }
            let raw = gl.create_program().map_err(Error::Gpu)?;
            gl.program_binary_retrievable_hint(raw, retrievable);
            gl.attach_shader(raw, shader);
            gl.link_program(raw);
            gl.detach_shader(raw, shader);
            gl.delete_shader(shader);
            if !gl.get_program_link_status(raw) {
                let log = gl.get_program_info_log(raw);
                gl.delete_program(raw);
                return Err(Error::Gpu(format!(
                    "compute program does not link: {}",
                    log.trim()
                )));
            }
            PROGRAMS.fetch_add(1, Relaxed);
            Ok(Self {
                gl: Rc::clone(gl),
                raw,
            })
        }
    }

    /// The driver's program binary, if it gives one (NVIDIA's hold the generated assembly as
    /// text, which shows register use and local-memory spills).
    pub fn binary(&self) -> Option<Vec<u8>> {
        // SAFETY: the program is alive and linked; glow sizes the buffer from the driver.
        unsafe { self.gl.get_program_binary(self.raw) }.map(|b| b.buffer)
    }

    /// Dispatches `groups` workgroups with the program's `uvec4` uniform `name` set to `value`
    /// first (a program without that uniform ignores it).
    pub fn dispatch_with(&self, groups: [u32; 3], name: &str, value: [u32; 4]) -> Result<()> {
        // SAFETY: the program is alive and linked; a location it reports belongs to it.
        unsafe {
            self.gl.use_program(Some(self.raw));
            let at = self.gl.get_uniform_location(self.raw, name);
            self.gl
                .uniform_4_u32(at.as_ref(), value[0], value[1], value[2], value[3]);
        }
        self.dispatch(groups)
    }

    /// Dispatches `groups` workgroups with this program (storage buffers bound by the caller).
    pub fn dispatch(&self, groups: [u32; 3]) -> Result<()> {
        // SAFETY: the program is alive and linked.
        unsafe {
            self.gl.use_program(Some(self.raw));
            self.gl.dispatch_compute(groups[0], groups[1], groups[2]);
        }
        check(&self.gl, "dispatching the compute shader")
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the name was created by this context and is deleted once.
        unsafe { self.gl.delete_program(self.raw) };
        PROGRAMS.fetch_sub(1, Relaxed);
    }
}

/// A GPU timer query: `GL_TIME_ELAPSED` around commands (`begin` … `end`), or a `GL_TIMESTAMP`.
pub struct TimerQuery {
    gl: Rc<glow::Context>,
    raw: glow::Query,
}

impl TimerQuery {
    /// Starts timing the commands that follow.
    pub fn begin(gl: &Rc<glow::Context>) -> Result<Self> {
        // SAFETY: creating and starting a query on the current context; deleted in Drop.
        let raw = unsafe {
            let raw = gl.create_query().map_err(Error::Gpu)?;
            gl.begin_query(glow::TIME_ELAPSED, raw);
            raw
        };
        QUERIES.fetch_add(1, Relaxed);
        Ok(Self {
            gl: Rc::clone(gl),
            raw,
        })
    }

    /// Stops timing.
    pub fn end(&self) {
        // SAFETY: this query is the active TIME_ELAPSED query.
        unsafe { self.gl.end_query(glow::TIME_ELAPSED) };
    }

    /// A `GL_TIMESTAMP` query instead: the GPU's clock once the commands submitted so far have
    /// completed (never `end` it; `nanoseconds` is then that clock).
    pub fn timestamp(gl: &Rc<glow::Context>) -> Result<Self> {
        // SAFETY: creating a query on the current context and recording a timestamp into it;
        // deleted in Drop.
        let raw = unsafe {
            let raw = gl.create_query().map_err(Error::Gpu)?;
            gl.query_counter(raw, glow::TIMESTAMP);
            raw
        };
        QUERIES.fetch_add(1, Relaxed);
        Ok(Self {
            gl: Rc::clone(gl),
            raw,
        })
    }

    /// The elapsed GPU time in nanoseconds, or the timestamp (waits for the result).
    pub fn nanoseconds(&self) -> u64 {
        // SAFETY: the query has ended (or its timestamp was recorded); reading its result waits
        // for the GPU.
        unsafe {
            self.gl
                .get_query_parameter_u64(self.raw, glow::QUERY_RESULT)
        }
    }
}

impl Drop for TimerQuery {
    fn drop(&mut self) {
        // SAFETY: the name was created by this context and is deleted once.
        unsafe { self.gl.delete_query(self.raw) };
        QUERIES.fetch_sub(1, Relaxed);
    }
}

/// A fence after submitted work.
pub struct Fence {
    gl: Rc<glow::Context>,
    raw: glow::Fence,
}

impl Fence {
    /// A fence after every command submitted so far.
    pub fn new(gl: &Rc<glow::Context>) -> Result<Self> {
        // SAFETY: creating a sync object on the current context; deleted in Drop.
        let raw =
            unsafe { gl.fence_sync(glow::SYNC_GPU_COMMANDS_COMPLETE, 0) }.map_err(Error::Gpu)?;
        FENCES.fetch_add(1, Relaxed);
        Ok(Self {
            gl: Rc::clone(gl),
            raw,
        })
    }

    /// Whether the GPU has passed the fence (never waits; flushes, so it will).
    pub fn signaled(&self) -> Result<bool> {
        if NEVER_SIGNAL.with(std::cell::Cell::get) {
            return Ok(false);
        }
        // SAFETY: the fence is alive; a zero timeout only polls.
        let status = unsafe {
            self.gl
                .client_wait_sync(self.raw, glow::SYNC_FLUSH_COMMANDS_BIT, 0)
        };
        match status {
            glow::ALREADY_SIGNALED | glow::CONDITION_SATISFIED => Ok(true),
            glow::TIMEOUT_EXPIRED => Ok(false),
            _ => Err(Error::ContextLost("polling a fence failed".into())),
        }
    }

    /// Waits until the GPU passed the fence, at most `timeout`; a timeout or a lost context is
    /// an error, so nothing written after the fence is ever read early. Polls for the first
    /// [`WAIT_SPIN`], then blocks in the driver.
    pub fn wait(&self, timeout: Duration) -> Result<()> {
        if NEVER_SIGNAL.with(std::cell::Cell::get) {
            std::thread::sleep(timeout);
            return Err(Error::FenceTimeout(format!(
                "not signalled within {timeout:?} (fault injected: fences never signal)"
            )));
        }
        let start = std::time::Instant::now();
        while start.elapsed() < WAIT_SPIN.min(timeout) {
            if self.signaled()? {
                return Ok(());
            }
            std::thread::yield_now();
        }
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            // glow passes the timeout as an i32 of nanoseconds (2.1 s at most): longer waits
            // go in pieces.
            let ns = i32::try_from(left.as_nanos()).unwrap_or(i32::MAX);
            // SAFETY: the fence is alive; FLUSH makes sure it is submitted.
            let status = unsafe {
                self.gl
                    .client_wait_sync(self.raw, glow::SYNC_FLUSH_COMMANDS_BIT, ns)
            };
            match status {
                glow::ALREADY_SIGNALED | glow::CONDITION_SATISFIED => return Ok(()),
                glow::TIMEOUT_EXPIRED if start.elapsed() < timeout => continue,
                glow::TIMEOUT_EXPIRED => {
                    return Err(Error::FenceTimeout(format!(
                        "not signalled within {timeout:?}"
                    )))
                }
                _ => return Err(Error::ContextLost("waiting on a fence failed".into())),
            }
        }
    }
}

impl Drop for Fence {
    fn drop(&mut self) {
        // SAFETY: the sync object was created by this context and is deleted once.
        unsafe { self.gl.delete_sync(self.raw) };
        FENCES.fetch_sub(1, Relaxed);
    }
}

/// Submits the commands recorded so far (without waiting for them).
pub fn flush(gl: &glow::Context) {
    // SAFETY: glFlush has no preconditions on a current context.
    unsafe { gl.flush() };
}

/// Waits until the GPU has finished every command recorded so far.
pub fn finish(gl: &glow::Context) {
    // SAFETY: glFinish has no preconditions on a current context.
    unsafe { gl.finish() };
}

/// Makes GPU writes to persistently mapped, non-coherent buffers visible to the host once the
/// next fence has passed.
pub fn client_mapped_barrier(gl: &glow::Context) {
    // SAFETY: glMemoryBarrier has no preconditions on a current context.
    unsafe { gl.memory_barrier(glow::CLIENT_MAPPED_BUFFER_BARRIER_BIT) };
}

/// Makes shader writes to storage buffers visible to later reads (readback, next dispatch).
pub fn storage_barrier(gl: &glow::Context) {
    // SAFETY: glMemoryBarrier has no preconditions on a current context.
    unsafe {
        gl.memory_barrier(glow::SHADER_STORAGE_BARRIER_BIT | glow::BUFFER_UPDATE_BARRIER_BIT)
    };
}
