//! The async executor: streaming convolutions through a pipeline of steps, [`FRAMES`] jobs per
//! step.
//!
//! It runs on the GPU worker thread, which owns the context. Each job has a frame: an upload
//! and a download staging buffer in host memory, and device buffers for input, output, bias
//! and a plan's intermediates (`memory.rs`: with CUDA copies, CUDA's pinned memory and device
//! memory shared with CUDA; otherwise persistently, coherently mapped GL buffers,
//! `GL_ARB_buffer_storage`, and GL storage buffers). A job goes through three phases, each in
//! a different *step*:
//!
//! 1. copy in: its input (copied into the upload staging on a copy thread, in parallel chunks
//!    with streaming stores, `host_copy.rs`; or read where it is from a pinned input) into its
//!    device input buffer;
//! 2. convolve (its weights made resident then);
//! 3. copy out: its output into the download staging.
//!
//! A step runs phase 1 of the newest job, phase 2 of the one before and phase 3 of the one
//! before that. How the copies run is the worker's [`StreamCopy`]:
//! - CUDA copies (the default where CUDA opens, `cu.rs`): on two CUDA streams (in, out), timed
//!   by events, while GL only convolves. The host orders the APIs: a step starts the copy in,
//!   starts the copy out once the previous step's convolution has passed its fence, and
//!   dispatches the convolution once the previous step's copy in has passed its event; a step
//!   without a new job is recorded as soon as it would not block, or where only its copy out
//!   could start, that copy out alone (`Worker::step_copy_out_early`). (Ordering the APIs on
//!   the GPU with shared semaphores was slower: README.)
//! - Shader copies (the default otherwise): workgroups of the convolution's own dispatch where
//!   its plan is one pass, after one barrier, then one fence, so the GPU moves data both ways
//!   while it convolves (one context runs DMA copies and dispatches one after another:
//!   measured, `overlap::probe_zero_copy`). A step without a new job is recorded only when the
//!   GPU has finished every step so far (and, if a job is about to join, `IDLE_GRACE` has
//!   passed), so that a steady stream keeps its phases together.
//!
//! A big pipelined job runs its batch in parts along n ([`PARTS`], with CUDA copies): each part
//! of each phase ends at its own event or fence, and each part of the next phase waits only for
//! its own part of the one before, so a job's convolution starts on the first part of its input
//! and its copy out on the first part of its output (a shorter start and end of a stream). A
//! part runs the whole batch's tile and algorithm, on buffer ranges; a job alone runs whole.
//!
//! Timer queries time each step's GL work, and each job reports the steps of its phases; a job
//! that shared steps reports their whole times (`steps_shared`), except CUDA copies, timed alone.
//!
//! A new job records a step at once. Once a job's copy out has passed (its step's fence, or its
//! CUDA copy's event), the caller's thread reads the output straight out of the download
//! staging ([`Staged`]) and releases the frame; the worker reuses a frame only after that
//! release, and waits for every release before it deletes the buffers. A fence or event that
//! does not pass within the job's timeout, or a step that fails, fails every job in flight (the
//! caller re-runs them on the CPU) and marks the executor broken: their buffers may still be in
//! use, so a later job fails at once with the reason, until the GPU is seen to have finished
//! everything it was given before (`Worker::recover`: a new fence passes, and CUDA's copy
//! streams are idle); then the executor works again.

use super::cu::{elapsed_ns, CudaCopies, TimedCopy};
use super::gl::{self, Buffer, Direction, Fence, MappedBuffer, MappedView, TimerQuery};
pub use super::host_copy::{parallel_copy, parallel_hash};
use super::memory::{DeviceMem, HostMem};
use super::shaders::{self, StreamCopy};
use super::{Bindings, Plan, SharedWeights, Worker};
use crate::error::{Error, Result};
use crate::params::Conv2dParams;
use crate::pinned::{PinnedShared, StreamInput};
use std::ops::Range;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Jobs in one step of the pipeline, and so on the GPU at once: while one convolves, the next
/// is copied in and the one before it copied out.
pub const FRAMES: usize = 3;

/// Frames (buffer sets) in all, by default (`SPORKLE_STREAM_FRAMES` sets it, at least
/// [`FRAMES`]): a job holds one from its start until its caller has read its output, so beyond
/// the [`FRAMES`] jobs of a step, two more may be queued for the next step or being read.
pub const SLOTS: usize = FRAMES + 2;

/// How long the GPU may sit idle, with jobs in flight that need more steps and a job about to
/// join (its input being copied in, or a frame about to come back for it), before the worker
/// records a step without a new job: if the job joins in that time, it shares the step instead.
pub(super) const IDLE_GRACE: Duration = Duration::from_micros(100);

/// Parts a large job's batch runs in along n with CUDA copies, by default (see
/// `Worker::parts_for`): the first part's convolution starts while the rest is still copied
/// in, and its copy out while the rest convolves, which shortens a stream's start and end.
pub const PARTS: usize = 2;

/// How long a broken executor waits for the GPU to finish its earlier work before it takes a
/// new job ([`Worker::recover`]).
const RECOVER_WAIT: Duration = Duration::from_millis(50);

/// Parts wanted from `SPORKLE_STREAM_PARTS` (1 to 16; see `Worker::parts_for`), if set.
pub fn parts_from_env() -> Option<usize> {
    super::shaders::knob("SPORKLE_STREAM_PARTS", |v| match v.parse::<usize>() {
        Ok(n) if (1..=16).contains(&n) => Ok(n),
        _ => Err("expected 1 to 16 parts".into()),
    })
}

/// The least bytes in and out of a job that runs in [`PARTS`] parts by default: below, a
/// part's copies would be too short to be worth their own waits.
pub const PARTS_MIN_BYTES: usize = 8 << 20;

/// A streaming job.
pub(crate) struct StreamJob {
    pub(super) p: Conv2dParams,
    pub(super) x: StreamInput,
    pub(super) w: JobWeights,
    pub(super) b: Option<Arc<[f32]>>,
    /// False: the job runs alone (synchronous mode), with no other frame in flight.
    pub(super) pipelined: bool,
    /// How long its fence may take, from submission to the GPU.
    pub(super) timeout: Duration,
    pub(super) reply: mpsc::SyncSender<Result<StreamDone>>,
    /// When it was sent to the worker.
    pub(super) sent: Instant,
}

/// A job's weights: known when it is sent, or sent by the caller later on their own channel
/// (a synchronous call hashes its weights while the GPU copies its input in: the convolution
/// is the first phase that needs them).
pub(crate) enum JobWeights {
    Ready(SharedWeights),
    Later(mpsc::Receiver<SharedWeights>),
}

impl JobWeights {
    /// The weights, waiting for the caller to send them if they come later.
    fn get(&mut self) -> Result<&SharedWeights> {
        if let JobWeights::Later(rx) = self {
            let w = rx.recv().map_err(|_| {
                Error::Gpu("the caller stopped before sending the job's weights".into())
            })?;
            *self = JobWeights::Ready(w);
        }
        match self {
            JobWeights::Ready(w) => Ok(w),
            JobWeights::Later(_) => unreachable!("resolved above"),
        }
    }
}

/// The caller's side of pinned input `id` of `len` floats at address `ptr` (from
/// [`Worker::pin`]), which sends `id` back on `free` when its last holder is gone.
pub(super) fn pinned_shared(
    owner: u64,
    id: u64,
    ptr: usize,
    len: usize,
    free: mpsc::Sender<u64>,
) -> PinnedShared {
    // SAFETY: the worker keeps buffer `id` mapped (persistent mapping of immutable storage) and
    // never writes it; it deletes it only when the id comes back on `free`, which PinnedShared
    // sends when dropped, and at exit leaves the context alive while any is still held.
    unsafe { PinnedShared::mapped(owner, id, ptr as *mut f32, len, free) }
}

/// Answers `job` with `result`, after dropping the job (its hold on a pinned input goes first,
/// so a caller whose ticket has returned can write that input at once).
fn answer(job: StreamJob, result: Result<StreamDone>) {
    let reply = job.reply.clone();
    drop(job);
    let _ = reply.send(result);
}

/// The error of a job refused or failed because the executor is broken (`why`).
/// A job's fence timeout, naming the job's deadline (other errors as they are).
fn past_deadline(e: Error, deadline: Duration) -> Error {
    match e {
        Error::FenceTimeout(why) => {
            Error::FenceTimeout(format!("the job's deadline of {deadline:?}: {why}"))
        }
        other => other,
    }
}

fn unhealthy(why: &str) -> Error {
    Error::Gpu(format!("the GPU is unhealthy: {why}"))
}

/// A job's output in its frame's download staging buffer, readable from any thread; dropping it
/// gives the frame back to the executor.
pub struct Staged {
    view: MappedView,
    slot: usize,
    release: mpsc::Sender<usize>,
}

impl Staged {
    /// The output, `N×K×Ho×Wo`.
    pub fn as_slice(&self) -> &[f32] {
        self.view.as_slice()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // A closed channel means the worker has gone, which it does only after every release.
        let _ = self.release.send(self.slot);
    }
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Staged {{ slot: {}, len: {} }}",
            self.slot,
            self.as_slice().len()
        )
    }
}

/// Where a finished job's output is.
#[derive(Debug)]
pub enum Output {
    /// In the frame's staging buffer (the executor's path).
    Staged(Staged),
    /// In host memory (the plain path, without `GL_ARB_buffer_storage`).
    Owned(Vec<f32>),
}

impl Default for Output {
    fn default() -> Self {
        Output::Owned(Vec::new())
    }
}

impl Output {
    /// The output, `N×K×Ho×Wo`.
    pub fn as_slice(&self) -> &[f32] {
        match self {
            Output::Staged(s) => s.as_slice(),
            Output::Owned(v) => v,
        }
    }

    /// Copies it into `dst` (in parallel chunks), releasing the frame.
    pub fn copy_to(self, dst: &mut [f32]) {
        parallel_copy(self.as_slice(), dst);
    }

    /// The output as a vector (a copy into fresh memory unless it already is one).
    pub fn into_vec(self) -> Vec<f32> {
        match self {
            Output::Owned(v) => v,
            Output::Staged(s) => {
                let mut v = vec![0.0f32; s.as_slice().len()];
                parallel_copy(s.as_slice(), &mut v);
                v
            }
        }
    }
}

/// A finished streaming job: the output and where the time went.
#[derive(Debug, Default)]
pub struct StreamDone {
    /// The output.
    pub output: Output,
    /// GPU time of the steps that copied its input in, convolved and copied its output out
    /// (timer queries; `None` on a software renderer, whose timers mean nothing): its own times
    /// when it ran alone, those of whole steps when they ran other jobs' phases too
    /// (`steps_shared`).
    pub upload_ns: Option<u64>,
    /// See `upload_ns`.
    pub kernel_ns: Option<u64>,
    /// See `upload_ns`.
    pub download_ns: Option<u64>,
    /// GPU times (ns) at the start of its copy in and the end of its copy out (`None` on a
    /// software renderer): GL timestamps, or with CUDA copies, times of the copies' CUDA events
    /// on a clock chained from job to job (`Worker::cuda_span`). Either way, comparable between
    /// the jobs of one executor.
    pub gpu_span_ns: Option<(u64, u64)>,
    /// Wall time of the host copy into staging, on a copy thread (0 for a pinned input; the copy
    /// out happens in the caller's thread).
    pub host_in_s: f64,
    /// Wall time from the frame's submission to its fence passing.
    pub gpu_wall_s: f64,
    /// Wall time from the job's sending to the worker starting it.
    pub queued_s: f64,
    /// Wall time from its fence passing to its answer.
    pub settle_s: f64,
    /// When it was answered.
    pub answered: Option<Instant>,
    /// GPU busy time of this job: the steps charged to it (each step to the oldest job in it), at
    /// most its share of the wall time during which some job was on the GPU (that share alone on
    /// a software renderer), so jobs in flight together are never counted twice.
    pub busy_s: f64,
    /// Whether the executor had to block on the fence, and for how long.
    pub fence_waited: bool,
    /// See `fence_waited`.
    pub fence_wait_s: f64,
    /// Whether its steps ran other jobs' phases too (pipelined): then the upload, kernel and
    /// download times are those of whole steps, not its own.
    pub steps_shared: bool,
    /// Whether its copies ran inside a convolution's dispatch (shader copies, fused).
    pub fused: bool,
    /// Whether CUDA's copy engines moved its input and output (`cu.rs`).
    pub cuda_copies: bool,
    /// Whether the weights had to be uploaded (false: resident).
    pub weights_uploaded: bool,
    /// Jobs in flight when this one was started, itself included (1: it ran alone).
    pub in_flight: usize,
    /// Parts its batch ran in along n (1: whole; see `Worker::parts_for`).
    pub parts: usize,
    /// Bytes copied host → GPU (input, bias, and weights when uploaded) and GPU → host.
    pub bytes_up: u64,
    /// See `bytes_up`.
    pub bytes_down: u64,
}

/// One frame's buffers, and the job in it. Staging and device buffers hold whole vec4s (the
/// shader copies move vec4s).
#[derive(Default)]
pub(crate) struct Frame {
    upload: Option<HostMem>,
    download: Option<HostMem>,
    input: Option<DeviceMem>,
    output: Option<DeviceMem>,
    bias: Option<Buffer>,
    /// The plan's intermediates (split-K partial sums, Winograd's transforms).
    scratch: [Option<Buffer>; 2],
    flight: Option<Flight>,
}

/// A job in the pipeline, from its start until it is answered.
struct Flight {
    job: StreamJob,
    /// The plan of one part of its batch (all of it where it runs in one part).
    plan: Rc<Plan>,
    /// Parts its batch runs in along n ([`Worker::parts_for`]): each part's copies and
    /// convolution are waited for on their own, so the next phase starts on the first part
    /// while the others are still in the one before.
    parts: usize,
    /// Its convolution fused with the copies: the program's source and its copying layers.
    fused: Option<(String, u32)>,
    /// Steps recorded for it: 0 to 3 (copy in, convolution, copy out); at 3 its fence decides.
    phases: usize,
    /// What passes when its output has been copied out: the fence after that step, or (CUDA
    /// copies) the copy's own end.
    fence: Option<Marker>,
    /// The steps that ran its phases.
    steps: [Option<Rc<StepTimes>>; 3],
    /// Steps whose GPU time counts as its busy time (each step counts for the oldest job in it).
    charged: Vec<Rc<StepTimes>>,
    begun: Instant,
    done: StreamDone,
}

impl Flight {
    /// Floats of its output, all parts.
    fn out_len(&self) -> usize {
        self.plan.out_len * self.parts
    }

    /// The float ranges of its parts in its input buffer (the last one takes the vec4 padding).
    fn input_parts(&self) -> Vec<Range<usize>> {
        let len = self.job.x.len();
        part_ranges(len / self.parts, self.parts, padded(len))
    }

    /// The float ranges of its parts in its output buffer, as `input_parts`.
    fn output_parts(&self) -> Vec<Range<usize>> {
        part_ranges(self.plan.out_len, self.parts, padded(self.out_len()))
    }
}

/// `parts` ranges of `part` floats in a buffer of `len` floats, the last running to `len`.
fn part_ranges(part: usize, parts: usize, len: usize) -> Vec<Range<usize>> {
    (0..parts)
        .map(|i| i * part..if i + 1 == parts { len } else { (i + 1) * part })
        .collect()
}

/// What a job's frame was made ready with ([`Worker::try_fill`]).
struct Planned {
    /// One part's plan.
    plan: Rc<Plan>,
    parts: usize,
    /// As [`Flight`]'s.
    fused: Option<(String, u32)>,
    done: StreamDone,
}

/// A job whose input is being copied into its frame's upload staging on another thread.
pub(super) struct Filling {
    slot: usize,
    flight: Flight,
    /// The copy's wall time (s), when it is done.
    copied: mpsc::Receiver<f64>,
}

/// The address and length of a frame's upload staging, for the thread that copies into it.
struct StagingPtr(*mut f32, usize);

// SAFETY: the copy thread is the only one touching that memory while it runs (see
// Worker::start_host_copy), and the mapping outlives it.
unsafe impl Send for StagingPtr {}

/// A one-pass plan's convolution fused with a step's copies (see `Worker::encode`).
pub(super) struct FusedPass<'a> {
    /// The fused program's source (the program cache's key).
    pub(super) source: &'a str,
    /// Layers of copying workgroups in front of the convolution's.
    pub(super) copy_z: u32,
    /// The `copies` uniform: workgroups copying in and out, vec4s in and out.
    pub(super) copies: [u32; 4],
}

/// A step's timer queries: timestamps before and after its GL work, and its elapsed time;
/// with CUDA copies, the copies in and out as well, each timed by its own events.
struct StepTimes {
    start: TimerQuery,
    /// The GPU time of its GL work: one query, or with CUDA copies, one per part of its
    /// convolution (not counting the time between parts, when the GPU may wait for the host).
    elapsed: Vec<TimerQuery>,
    end: TimerQuery,
    /// The fence after its GL work.
    fence: Rc<Fence>,
    /// With CUDA copies and a convolution in parts: the fence after each part.
    conv_parts: Vec<Rc<Fence>>,
    copy_in: Option<TimedCopy>,
    copy_out: Option<TimedCopy>,
    /// A job's three phases in this one step, each timed by its own query in `elapsed`
    /// ([`Worker::encode_alone`]).
    alone: bool,
}

/// A step's GL work as it is encoded ([`Worker::encode_step`]): see [`StepTimes`].
#[derive(Default)]
struct GlWork {
    elapsed: Vec<TimerQuery>,
    conv_parts: Vec<Rc<Fence>>,
}

impl StepTimes {
    /// The GPU time of the step (ns): its GL work, or its longest part when CUDA copies ran
    /// beside it.
    fn gpu_ns(&self) -> u64 {
        let copy = |phase| self.copy(phase).and_then(TimedCopy::nanoseconds);
        (self.gl_ns())
            .max(copy(0).unwrap_or(0))
            .max(copy(2).unwrap_or(0))
    }

    /// The GPU time (ns) of its GL work.
    fn gl_ns(&self) -> u64 {
        self.elapsed.iter().map(TimerQuery::nanoseconds).sum()
    }

    /// The CUDA copy that ran phase `phase` (0: copy in, 1: convolution, 2: copy out) of a job
    /// in this step, if CUDA copied.
    fn copy(&self, phase: usize) -> Option<&TimedCopy> {
        match phase {
            0 => self.copy_in.as_ref(),
            2 => self.copy_out.as_ref(),
            _ => None,
        }
    }

    /// The GPU time (ns) of phase `phase` of a job in this step: a CUDA copy's own time, else
    /// the step's GL time.
    fn phase_ns(&self, phase: usize) -> Option<u64> {
        if self.alone {
            return self.elapsed.get(phase).map(TimerQuery::nanoseconds);
        }
        self.copy(phase)
            .map_or_else(|| Some(self.gl_ns()), TimedCopy::nanoseconds)
    }

    /// What passes when phase `phase` of a job in this step has finished on the GPU: a CUDA
    /// copy's end, else the step's fence.
    fn phase_end(&self, phase: usize) -> Marker {
        self.copy(phase).map_or_else(
            || Marker::Fence(Rc::clone(&self.fence)),
            |c| Marker::Event(Rc::clone(&c.end)),
        )
    }

    /// What passes when part `part` of phase `phase` of a job in this step has finished: a
    /// CUDA copy's part, a convolution part's fence, else as `phase_end`.
    fn part_end(&self, phase: usize, part: usize) -> Marker {
        if let Some(c) = self.copy(phase) {
            return Marker::Event(Rc::clone(c.part_end(part)));
        }
        match self.conv_parts.get(part).filter(|_| phase == 1) {
            Some(fence) => Marker::Fence(Rc::clone(fence)),
            None => self.phase_end(phase),
        }
    }
}

/// A point in the GPU's work that the worker waits for: a GL fence, or a CUDA copy's end.
enum Marker {
    Fence(Rc<Fence>),
    Event(Rc<super::cu::Event>),
}

impl Marker {
    /// Whether it has passed.
    fn signaled(&self) -> Result<bool> {
        match self {
            Marker::Fence(f) => f.signaled(),
            Marker::Event(e) => e.passed(),
        }
    }

    /// Waits at most `timeout` for it to pass; an error if it did not.
    fn wait(&self, timeout: Duration) -> Result<()> {
        match self {
            Marker::Fence(f) => f.wait(timeout),
            Marker::Event(e) => match e.wait(timeout)? {
                true => Ok(()),
                false => Err(Error::FenceTimeout(format!(
                    "a CUDA copy had not finished after {timeout:?}"
                ))),
            },
        }
    }
}

/// A frame's buffer, which a job in flight always has.
fn buffer(b: &Option<Buffer>) -> Result<&Buffer> {
    b.as_ref()
        .ok_or_else(|| Error::Gpu("a frame in flight lacks a buffer".into()))
}

/// A frame's input or output buffer, which a job in flight always has.
fn device(b: &Option<DeviceMem>) -> Result<&DeviceMem> {
    b.as_ref()
        .ok_or_else(|| Error::Gpu("a frame in flight lacks a buffer".into()))
}

/// A frame's staging buffer, which a job in flight always has.
fn mapped(b: &Option<HostMem>) -> Result<&HostMem> {
    b.as_ref()
        .ok_or_else(|| Error::Gpu("a frame in flight lacks its staging".into()))
}

/// `len` floats rounded up to whole vec4s.
fn padded(len: usize) -> usize {
    len.div_ceil(4) * 4
}

impl Worker {
    /// Whether a frame is free for a new job (neither in flight nor read by a caller).
    pub(super) fn frame_free(&self) -> bool {
        self.filling.is_none() && self.in_flight.len() + self.held.len() < self.frames.len()
    }

    /// Takes the releases of frames that callers have finished reading, and frees the pinned
    /// inputs whose last holder has gone.
    pub(super) fn take_releases(&mut self) {
        while let Ok(slot) = self.release_rx.try_recv() {
            self.held.retain(|&h| h != slot);
        }
        while let Ok(id) = self.unpin_rx.try_recv() {
            self.pinned.remove(&id);
        }
    }

    /// A pinned input of `len` floats: its id and mapping (as an address, to cross threads).
    pub(super) fn pin(&mut self, len: usize) -> Result<(u64, usize)> {
        if !self.immutable {
            return Err(Error::Gpu(
                "no persistent mapping without GL_ARB_buffer_storage".into(),
            ));
        }
        self.open_cuda()?;
        let mut buffer = match &self.cuda {
            Some(c) => HostMem::Cuda(c.pinned(padded(len))?),
            None => HostMem::Gl(MappedBuffer::new(
                &self.ctx.gl,
                padded(len),
                Direction::Pinned,
            )?),
        };
        let ptr = buffer.as_mut_slice().as_mut_ptr() as usize;
        self.next_pin += 1;
        self.pinned.insert(self.next_pin, buffer);
        Ok((self.next_pin, ptr))
    }

    /// Waits (at most `timeout`) for a caller to release a frame.
    pub(super) fn wait_release(&mut self, timeout: Duration) {
        if let Ok(slot) = self.release_rx.recv_timeout(timeout) {
            self.held.retain(|&h| h != slot);
        }
        self.take_releases();
    }

    /// Waits for every caller reading a frame to release it (before the frames are deleted).
    pub(super) fn wait_all_releases(&mut self) {
        while !self.held.is_empty() {
            match self.release_rx.recv() {
                Ok(slot) => self.held.retain(|&h| h != slot),
                // Every view holds a sender, and the worker holds one too: never closed here.
                Err(_) => break,
            }
        }
    }

    /// Jobs in flight.
    pub(super) fn frames_busy(&self) -> usize {
        self.in_flight.len()
    }

    /// The job in flight in frame `slot`.
    fn flight(&self, slot: usize) -> &Flight {
        self.frames[slot]
            .flight
            .as_ref()
            .expect("a frame in flight holds its job")
    }

    /// Whether some job in flight still has a phase to record.
    pub(super) fn steps_pending(&self) -> bool {
        self.in_flight.iter().any(|&s| self.flight(s).phases < 3)
    }

    /// Whether the GPU has finished every step recorded (so that waiting for more jobs to
    /// share the next step with would leave it idle). With CUDA copies, whose phases need not
    /// share a dispatch: whether the next step's convolution and copy out can start (what they
    /// wait for has finished), so that the copy engines never wait for a whole step.
    pub(super) fn gpu_idle(&self) -> bool {
        if self.cuda.is_some() {
            // A job's next phase (convolution or copy out) waits for the end of its last one.
            return self.in_flight.iter().all(|&slot| {
                let phases = self.flight(slot).phases;
                !(1..3).contains(&phases) || self.phase_started_done(slot, phases - 1)
            });
        }
        self.last_step
            .as_ref()
            .is_none_or(|f| f.signaled().unwrap_or(true))
    }

    /// Frames to make: [`SLOTS`], or `SPORKLE_STREAM_FRAMES`.
    pub(super) fn slots() -> usize {
        super::shaders::knob("SPORKLE_STREAM_FRAMES", |v| match v.parse::<usize>() {
            Ok(n) if (FRAMES..=16).contains(&n) => Ok(n),
            _ => Err(format!("expected {FRAMES} to 16 frames")),
        })
        .unwrap_or(SLOTS)
    }

    /// How long the GPU has been seen idle (every step recorded has finished).
    pub(super) fn gpu_idle_for(&mut self) -> Duration {
        if !self.gpu_idle() {
            self.idle_since = None;
            return Duration::ZERO;
        }
        self.idle_since.get_or_insert_with(Instant::now).elapsed()
    }

    /// With CUDA copies chosen ([`StreamCopy::Cuda`]) and not opened yet: opens them, or
    /// falls back to shader copies (saying why on stderr where a CUDA driver is present), or
    /// where CUDA was required fails. Runs before the first frame or pinned input is made, so all are of one kind.
    pub(super) fn open_cuda(&mut self) -> Result<()> {
        let StreamCopy::Cuda { required } = self.copy_mode else {
            return Ok(());
        };
        if self.cuda.is_some() {
            return Ok(());
        }
        match CudaCopies::open(&self.ctx) {
            Ok(c) => {
                self.cuda = Some(c);
                Ok(())
            }
            Err(e) if required => Err(Error::Gpu(format!(
                "SPORKLE_STREAM_COPY=cuda, but CUDA copies are unavailable: {e}"
            ))),
            Err(e) => {
                if super::cu::driver_present() {
                    // An NVIDIA machine expected to stream through its copy engines: say why not.
                    eprintln!(
                        "sporkle: CUDA copies unavailable ({e}); streaming with shader copies"
                    );
                }
                self.copy_mode = StreamCopy::SHADER;
                Ok(())
            }
        }
    }

    /// After a failure (the executor broken): whether everything the GPU was given before it
    /// has finished, so that its frames can be used again; then the executor works again.
    /// Nothing is in flight by then (the failure failed every job), so a new fence that passes
    /// within [`RECOVER_WAIT`] means every earlier GL command has finished, and with CUDA
    /// copies an event recorded on each copy stream must pass too. A GPU that is still hung
    /// (or fences that never pass) keeps it broken.
    fn recover(&mut self) -> bool {
        if !self.in_flight.is_empty() || self.filling.is_some() {
            return false;
        }
        let gl = Rc::clone(&self.ctx.gl);
        let Ok(fence) = Fence::new(&gl) else {
            return false;
        };
        gl::flush(&gl);
        if fence.wait(RECOVER_WAIT).is_err() {
            return false;
        }
        if let Some(c) = &self.cuda {
            if !c.idle(RECOVER_WAIT).unwrap_or(false) {
                return false;
            }
        }
        self.broken = None;
        true
    }

    /// Starts `job` in a free frame and records a step; a job that cannot start is answered
    /// with the error.
    pub(super) fn stream_begin(&mut self, job: StreamJob) {
        if self.broken.is_some() && !self.recover() {
            let why = self.broken.clone().unwrap_or_default();
            answer(job, Err(unhealthy(&why)));
            return;
        }
        if let Err(e) = self.open_cuda() {
            answer(job, Err(e));
            return;
        }
        if !self.immutable {
            // No persistent mapping without GL_ARB_buffer_storage: the plain synchronous path.
            let mut job = job;
            let result = (job.w.get().cloned())
                .and_then(|w| {
                    self.conv2d(
                        &job.p,
                        job.x.as_slice(),
                        &w.data,
                        w.key,
                        job.b.as_deref(),
                        super::Dispatches::ONE,
                    )
                })
                .map(|(output, run, _)| StreamDone {
                    bytes_up: (job.x.len() * 4) as u64,
                    bytes_down: (output.len() * 4) as u64,
                    output: Output::Owned(output),
                    kernel_ns: run.kernel_ns,
                    host_in_s: run.upload_s + run.download_s,
                    weights_uploaded: run.weights_uploaded,
                    parts: 1,
                    ..StreamDone::default()
                });
            answer(job, result);
            return;
        }
        let filling = self.filling.as_ref().map(|f| f.slot);
        let Some(slot) = (0..self.frames.len()).find(|&i| {
            !self.in_flight.contains(&i) && !self.held.contains(&i) && filling != Some(i)
        }) else {
            answer(job, Err(Error::Gpu("no free frame (executor bug)".into())));
            return;
        };
        let mut frame = std::mem::take(&mut self.frames[slot]);
        let started = self.try_fill(&mut frame, &job);
        self.frames[slot] = frame;
        match started {
            Ok(Planned {
                plan,
                parts,
                fused,
                mut done,
            }) => {
                done.queued_s = job.sent.elapsed().as_secs_f64();
                let flight = Flight {
                    job,
                    plan,
                    parts,
                    fused,
                    phases: 0,
                    fence: None,
                    steps: [None, None, None],
                    charged: Vec::new(),
                    begun: Instant::now(),
                    done,
                };
                if self.pinned_buffer(&flight.job.x).is_some() {
                    self.start_flight(slot, flight);
                } else if !flight.job.pipelined {
                    self.host_copy_here(slot, flight);
                } else {
                    self.start_host_copy(slot, flight);
                }
            }
            Err(e) => answer(job, Err(e)),
        }
    }

    /// Puts `flight` (its input in place) in the pipeline and records a step.
    fn start_flight(&mut self, slot: usize, mut flight: Flight) {
        flight.begun = Instant::now();
        flight.done.in_flight = self.in_flight.len() + 1;
        let alone = !flight.job.pipelined && self.cuda.is_none();
        self.frames[slot].flight = Some(flight);
        self.in_flight.push_back(slot);
        if alone {
            self.step_or_fail_with([Some(slot); 3]);
        } else {
            self.step_or_fail();
        }
    }

    /// Frame `slot`'s upload staging, with `flight`; `None` once `flight` has been answered
    /// that the frame lacks one.
    fn upload_staging(&mut self, slot: usize, flight: Flight) -> Option<(Flight, &mut HostMem)> {
        match self.frames[slot].upload.as_mut() {
            Some(upload) => Some((flight, upload)),
            None => {
                answer(
                    flight.job,
                    Err(Error::Gpu("a frame lacks its staging".into())),
                );
                None
            }
        }
    }

    /// A job that runs alone: copies its input into its frame's upload staging on this thread
    /// (in parallel chunks, as the copy thread would; nothing else is in flight to record
    /// meanwhile, and handing the copy to another thread and back costs two wake-ups), then
    /// starts it.
    fn host_copy_here(&mut self, slot: usize, flight: Flight) {
        let Some((mut flight, upload)) = self.upload_staging(slot, flight) else {
            return;
        };
        let len = flight.job.x.len();
        let t = Instant::now();
        parallel_copy(flight.job.x.as_slice(), &mut upload.as_mut_slice()[..len]);
        flight.done.host_in_s = t.elapsed().as_secs_f64();
        self.start_flight(slot, flight);
    }

    /// Copies `flight`'s input into its frame's upload staging on another thread (in parallel
    /// chunks), so that the worker meanwhile records steps and answers jobs; the job enters the
    /// pipeline when the copy is done ([`Worker::take_filled`]).
    fn start_host_copy(&mut self, slot: usize, flight: Flight) {
        let Some((flight, upload)) = self.upload_staging(slot, flight) else {
            return;
        };
        let len = flight.job.x.len();
        let dst = StagingPtr(upload.as_mut_slice()[..len].as_mut_ptr(), len);
        let x = flight.job.x.clone();
        let (done, copied) = mpsc::channel();
        let copy = move || {
            let dst = dst;
            let t = Instant::now();
            // SAFETY: the frame's staging stays mapped, and nothing else touches it, until this
            // copy's answer has been received: the frame is reserved for the job while it
            // fills (Worker::filling), and the worker waits for the answer before it drains,
            // fails or exits.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst.0, dst.1) };
            parallel_copy(x.as_slice(), dst);
            let _ = done.send(t.elapsed().as_secs_f64());
        };
        if let Err(e) = self.copy_thread.run(copy) {
            answer(
                flight.job,
                Err(Error::Gpu(format!("cannot start a copy thread: {e}"))),
            );
            return;
        }
        self.filling = Some(Filling {
            slot,
            flight,
            copied,
        });
    }

    /// Moves the job whose input is being copied into the pipeline once the copy is done,
    /// waiting at most `timeout`; whether it did.
    pub(super) fn take_filled(&mut self, timeout: Duration) -> bool {
        let Some(f) = &self.filling else {
            return false;
        };
        let copied = if timeout.is_zero() {
            f.copied
                .try_recv()
                .map_err(|e| e == mpsc::TryRecvError::Disconnected)
        } else {
            f.copied
                .recv_timeout(timeout)
                .map_err(|e| e == mpsc::RecvTimeoutError::Disconnected)
        };
        match copied {
            Err(false) => false,
            Ok(host_in_s) => {
                let Filling {
                    slot, mut flight, ..
                } = self.filling.take().expect("checked above");
                flight.done.host_in_s = host_in_s;
                self.start_flight(slot, flight);
                true
            }
            Err(true) => {
                let f = self.filling.take().expect("checked above");
                answer(
                    f.flight.job,
                    Err(Error::Gpu("the host copy thread failed".into())),
                );
                true
            }
        }
    }

    /// Plans `job` (one part of its batch), sizes `frame`'s buffers for it (an upload staging
    /// unless its input is pinned) and uploads its bias. Its weights are made resident by the
    /// step that convolves.
    fn try_fill(&mut self, frame: &mut Frame, job: &StreamJob) -> Result<Planned> {
        let p = &job.p;
        let lens = (job.x.len(), p.weights_len());
        let whole = self.plan(p, lens, job.b.is_some(), &super::Dispatches::ONE)?;
        let parts = self.parts_for(job);
        // A part runs the whole batch's algorithm and tile, so that its outputs are the same
        // bits as the synchronous path's.
        let plan = match parts {
            1 => whole,
            _ => self.plan(
                &Conv2dParams {
                    n: p.n / parts,
                    ..*p
                },
                (lens.0 / parts, lens.1),
                job.b.is_some(),
                &super::Dispatches {
                    tile: Some(whole.tile),
                    algorithm: Some(whole.algorithm),
                    ..super::Dispatches::ONE
                },
            )?,
        };
        let gl = Rc::clone(&self.ctx.gl);
        let fused = self.fused_program(&plan)?;
        if matches!(self.copy_mode, StreamCopy::Shader { .. }) {
            self.programs.get(&gl, shaders::stream_copy_source())?;
        }
        let (x_len, out_len) = (padded(job.x.len()), padded(plan.out_len * parts));
        // Staging and input and output buffers: CUDA's pinned and shared memory with CUDA
        // copies, GL's otherwise.
        let cuda = self.cuda.as_ref();
        let host = |len: usize, direction: Direction| match cuda {
            Some(c) => c.pinned(len).map(HostMem::Cuda),
            None => MappedBuffer::new(&gl, len, direction).map(HostMem::Gl),
        };
        let device = |len: usize| match cuda {
            Some(c) => c.device_buffer(len).map(DeviceMem::Shared),
            None => Buffer::new(&gl, len, true).map(DeviceMem::Gl),
        };
        if self.pinned_buffer(&job.x).is_none() {
            gl::ensure_len(&mut frame.upload, x_len, || host(x_len, Direction::Upload))?;
        }
        gl::ensure_len(&mut frame.download, out_len, || {
            host(out_len, Direction::Download)
        })?;
        gl::ensure_len(&mut frame.input, x_len, || device(x_len))?;
        gl::ensure_len(&mut frame.output, out_len, || device(out_len))?;
        Self::scratch(&gl, &mut frame.bias, p.c_out, true)?;
        Self::scratch_for(&gl, &mut frame.scratch, &plan, true)?;
        let mut bytes_up = (job.x.len() * 4) as u64;
        if let Some(b) = &job.b {
            frame.bias.as_ref().expect("allocated above").upload(b)?;
            bytes_up += (b.len() * 4) as u64;
        }
        let done = StreamDone {
            bytes_up,
            bytes_down: (plan.out_len * parts * 4) as u64,
            parts,
            ..StreamDone::default()
        };
        Ok(Planned {
            plan,
            parts,
            fused,
            done,
        })
    }

    /// Parts to run `job` in along n: the most, up to those wanted, that divide n and start
    /// every part at an offset that storage buffers can be bound at. Wanted: one for a job that
    /// runs alone (synchronous mode: each of its phases a step of its own, so its stage times
    /// are its own, never overlapped), and with shader copies (fused into one dispatch); else
    /// `SPORKLE_STREAM_PARTS`, or with CUDA copies [`PARTS`] for jobs of at least
    /// [`PARTS_MIN_BYTES`] in and out.
    fn parts_for(&self, job: &StreamJob) -> usize {
        let (p, x_len) = (&job.p, job.x.len());
        let out_len = p.output_len();
        let wanted = match (self.copy_mode, self.stream_parts) {
            _ if !job.pipelined => 1,
            (StreamCopy::Shader { .. }, _) => 1,
            (_, Some(parts)) => parts,
            (StreamCopy::Cuda { .. }, None) if (x_len + out_len) * 4 >= PARTS_MIN_BYTES => PARTS,
            _ => 1,
        };
        let align = self.ctx.info.storage_offset_alignment.max(4) as usize;
        (1..=wanted.min(p.n))
            .rev()
            .find(|&d| {
                p.n.is_multiple_of(d)
                    && (x_len / d * 4).is_multiple_of(align)
                    && (out_len / d * 4).is_multiple_of(align)
            })
            .unwrap_or(1)
    }

    /// For a one-pass plan with shader copies: the source of its convolution fused with the
    /// copies, compiled, and the copying layers of workgroups put before the convolution's.
    fn fused_program(&mut self, plan: &Plan) -> Result<Option<(String, u32)>> {
        let StreamCopy::Shader { groups } = self.copy_mode else {
            return Ok(None);
        };
        let [pass] = &plan.passes[..] else {
            return Ok(None);
        };
        let layer = (pass.groups[0] * pass.groups[1]).max(1);
        let copy_z = groups.div_ceil(layer);
        if u64::from(pass.groups[2]) + u64::from(copy_z) > self.ctx.info.max_groups[2] as u64 {
            return Ok(None);
        }
        let source = shaders::fused_source(&pass.source, copy_z);
        self.programs.get(&self.ctx.gl, &source)?;
        Ok(Some((source, copy_z)))
    }

    /// Records the next step of the pipeline (see [`Worker::step`]).
    pub(super) fn step_or_fail(&mut self) {
        self.step_or_fail_with(self.roles());
    }

    /// Records a step of the phases of the jobs in `role` ([`Worker::step`]); a failure fails
    /// every job in flight, since their buffers may be half written, and marks the executor
    /// broken.
    fn step_or_fail_with(&mut self, role: [Option<usize>; 3]) {
        if let Err(e) = self.step(role) {
            self.fail_all(&e, format!("a streaming step failed: {e}"));
        }
    }

    /// The jobs whose phases the next step runs: [copy in, convolve, copy out].
    fn roles(&self) -> [Option<usize>; 3] {
        let mut role: [Option<usize>; 3] = [None; 3];
        for &slot in &self.in_flight {
            let phases = self.flight(slot).phases;
            if phases < 3 {
                role[phases] = Some(slot);
            }
        }
        role
    }

    /// With CUDA copies, where the next step's copy out could start (its convolution has
    /// finished) but its convolution not yet (its copy in is still running): records a step of
    /// the copy out alone, so that the copy engine does not idle until both can start. Whether
    /// it did. (Jobs stay in distinct phases: the job copied out is the oldest, done after it.)
    pub(super) fn step_copy_out_early(&mut self) -> bool {
        if self.cuda.is_none() {
            return false;
        }
        let role = self.roles();
        let (Some(out), Some(conv)) = (role[2], role[1]) else {
            return false;
        };
        if !self.phase_started_done(out, 1) || self.phase_started_done(conv, 0) {
            return false;
        }
        self.step_or_fail_with([None, None, Some(out)]);
        true
    }

    /// Whether the first part of phase `phase` (0: copy in, 1: convolution, 2: copy out) of the
    /// job in frame `slot` has finished on the GPU, so that its next phase can start (or was
    /// never recorded, or cannot be asked: then waiting for it would not help).
    fn phase_started_done(&self, slot: usize, phase: usize) -> bool {
        self.flight(slot).steps[phase]
            .as_ref()
            .is_none_or(|s| s.part_end(phase, 0).signaled().unwrap_or(true))
    }

    /// Records one step of the pipeline for the jobs in `role` ([copy in, convolve, copy out],
    /// normally [`Worker::roles`]): the newest job copies its input in, the one before
    /// convolves, the one before that copies its output out, all after one barrier (each reads
    /// what the step before wrote), then a fence. Jobs advance one phase per step, so no two jobs
    /// in a step are in the same phase.
    fn step(&mut self, role: [Option<usize>; 3]) -> Result<()> {
        if role.iter().all(Option::is_none) {
            return Ok(());
        }
        let gl = Rc::clone(&self.ctx.gl);
        // One job in every role: it runs alone, its three phases in this step.
        let alone = role[0].is_some() && role.iter().all(|r| *r == role[0]);
        // With CUDA copies: the newest job's copy in starts at once (its frame is free); the
        // oldest job's copy out as soon as its convolution (the step before) has finished,
        // which is before the copy in of the next job to convolve (it was shorter), so the
        // copy engines always have work queued; then the convolution, once its input's copy in
        // (the step before) has finished. The host orders the APIs.
        // A job in parts has each part's copy out wait for that part's convolution, and each
        // part's convolution for that part's copy in.
        let copy_in = match role[0] {
            Some(slot) if self.cuda.is_some() => Some(self.cuda_copy_in(slot)?),
            _ => None,
        };
        let copy_out = match role[2] {
            Some(slot) if self.cuda.is_some() => Some(self.cuda_copy_out(slot)?),
            _ => None,
        };
        // The convolution's weights, made resident now: an earlier step may have evicted them.
        let weights = match role[1] {
            Some(slot) => {
                let f =
                    (self.frames[slot].flight.as_mut()).expect("a frame in flight holds its job");
                let (p, algorithm) = (f.job.p, f.plan.algorithm);
                let w = f.job.w.get()?.clone();
                Some(self.resident(&p, w.key, &w.data, algorithm)?)
            }
            None => None,
        };
        gl::storage_barrier(&gl);
        let start = TimerQuery::timestamp(&gl)?;
        let mut work = GlWork::default();
        let fused = match role[0] {
            Some(slot) if alone => {
                self.encode_alone(slot, weights.map(|w| w.0), &mut work)?;
                false
            }
            _ => self.encode_step(role, weights.map(|w| w.0), &mut work)?,
        };
        // Shader writes to mapped staging reach the host once the fence has passed.
        gl::client_mapped_barrier(&gl);
        let end = TimerQuery::timestamp(&gl)?;
        let fence = Rc::new(Fence::new(&gl)?);
        gl::flush(&gl);
        let times = Rc::new(StepTimes {
            start,
            elapsed: work.elapsed,
            end,
            fence: Rc::clone(&fence),
            conv_parts: work.conv_parts,
            copy_in,
            copy_out,
            alone,
        });
        let shared = !alone && role.iter().flatten().count() > 1;
        // The oldest job in the step: the one copying out, else convolving, else copying in.
        let oldest = role.iter().rev().flatten().next().copied();
        for (phase, slot) in role.iter().enumerate() {
            let Some(slot) = *slot else { continue };
            let f = self.frames[slot]
                .flight
                .as_mut()
                .expect("a frame in flight holds its job");
            f.steps[phase] = Some(Rc::clone(&times));
            f.phases += 1;
            f.done.steps_shared |= shared;
            f.done.fused |= fused;
            f.done.cuda_copies |= times.copy(phase).is_some();
            if phase == 1 && weights.is_some_and(|w| w.1) {
                f.done.weights_uploaded = true;
                f.done.bytes_up += (f.job.p.weights_len() * 4) as u64;
            }
            if phase == 2 {
                f.fence = Some(times.phase_end(2));
            }
            if Some(slot) == oldest {
                f.charged.push(Rc::clone(&times));
            }
        }
        self.last_step = Some(fence);
        self.idle_since = None;
        Ok(())
    }

    /// Starts the CUDA copy of the input of the job in frame `slot` into its device buffer,
    /// part by part.
    fn cuda_copy_in(&self, slot: usize) -> Result<TimedCopy> {
        let c = self.cuda.as_ref().expect("CUDA copies are open");
        let f = &self.frames[slot];
        let parts = self.flight(slot).input_parts();
        c.copy_in(
            self.copy_source(f)?.cuda()?,
            device(&f.input)?.cuda()?,
            &parts,
        )
    }

    /// Starts the CUDA copy of the output of the job in frame `slot` into its download staging,
    /// each part once its convolution has finished.
    fn cuda_copy_out(&self, slot: usize) -> Result<TimedCopy> {
        let c = self.cuda.as_ref().expect("CUDA copies are open");
        let f = &self.frames[slot];
        let parts = self.flight(slot).output_parts();
        c.copy_out(
            device(&f.output)?.cuda()?,
            mapped(&f.download)?.cuda()?,
            &parts,
            |part| self.wait_part(slot, 1, part),
        )
    }

    /// Waits, within the job's deadline, until part `part` of phase `phase` (0: copy in, 1:
    /// convolution) of the job in frame `slot` has finished on the GPU (CUDA copies order the
    /// APIs on the host).
    fn wait_part(&self, slot: usize, phase: usize, part: usize) -> Result<()> {
        let f = self.flight(slot);
        let Some(step) = &f.steps[phase] else {
            return Err(Error::Gpu(
                "a phase waited for was never recorded (executor bug)".into(),
            ));
        };
        let marker = step.part_end(phase, part);
        let left = f.job.timeout.saturating_sub(f.begun.elapsed());
        marker
            .wait(left)
            .map_err(|e| past_deadline(e, f.job.timeout))
    }

    /// Encodes the convolution of the job in frame `slot` with resident weights `weights`,
    /// part by part, the copies in `fused` where they run in its dispatch. With `cuda` (CUDA
    /// copies), each part first waits for its input's copy, and is timed and fenced on its own
    /// in it, so that its copy out can start before the next part has run.
    fn convolve(
        &self,
        slot: usize,
        weights: Option<usize>,
        fused: Option<&FusedPass<'_>>,
        mut cuda: Option<&mut GlWork>,
    ) -> Result<()> {
        let gl = &self.ctx.gl;
        let f = &self.frames[slot];
        let flight = self.flight(slot);
        let wi = weights.ok_or_else(|| Error::Gpu("no resident weights".into()))?;
        let bindings = |part| -> Result<Bindings<'_>> {
            Ok(Bindings {
                input: device(&f.input)?.gl(),
                weights: &self.weights[wi].buffer,
                bias: buffer(&f.bias)?,
                output: device(&f.output)?.gl(),
                scratch: [f.scratch[0].as_ref(), f.scratch[1].as_ref()],
                part,
            })
        };
        if flight.parts == 1 && cuda.is_none() {
            return self.encode(&flight.plan, &bindings(None)?, fused);
        }
        if fused.is_some() {
            return Err(Error::Gpu(
                "copies fused into a convolution in parts or beside CUDA's (executor bug)".into(),
            ));
        }
        let parts = flight.input_parts().into_iter().zip(flight.output_parts());
        for (i, (input, output)) in parts.enumerate() {
            let b = bindings((flight.parts > 1).then_some((input, output)))?;
            if i > 0 && flight.plan.passes.len() > 1 {
                // The parts share the plan's intermediates: the next writes what this one read.
                gl::storage_barrier(gl);
            }
            let Some(work) = cuda.as_deref_mut() else {
                self.encode(&flight.plan, &b, None)?;
                continue;
            };
            self.wait_part(slot, 0, i)?;
            let elapsed = TimerQuery::begin(gl)?;
            let encoded = self.encode(&flight.plan, &b, None);
            elapsed.end();
            work.elapsed.push(elapsed);
            encoded?;
            if flight.parts > 1 {
                work.conv_parts.push(Rc::new(Fence::new(gl)?));
                gl::flush(gl);
            }
        }
        Ok(())
    }

    /// Encodes a step's work for the jobs in frames `role` ([copy in, convolve, copy out]),
    /// its timer queries and fences into `work`; `weights` is the convolution's resident
    /// weights. Returns whether the copies ran in the convolution's own dispatch.
    fn encode_step(
        &self,
        role: [Option<usize>; 3],
        weights: Option<usize>,
        work: &mut GlWork,
    ) -> Result<bool> {
        if self.cuda.is_some() {
            // CUDA copies: the step's GL work is the convolution alone, timed part by part.
            if let Some(slot) = role[1] {
                self.convolve(slot, weights, None, Some(work))?;
            }
            return Ok(false);
        }
        let elapsed = TimerQuery::begin(&self.ctx.gl)?;
        let encoded = self.encode_copies_and_convolution(role, weights);
        elapsed.end();
        work.elapsed.push(elapsed);
        encoded
    }

    /// Without CUDA copies, a job that runs alone: encodes its copy in, its convolution and its
    /// copy out one after another in this one step, each behind a barrier and timed by its own
    /// query, so that a synchronous call costs one submission and one fence.
    fn encode_alone(&self, slot: usize, weights: Option<usize>, work: &mut GlWork) -> Result<()> {
        let gl = &self.ctx.gl;
        let f = &self.frames[slot];
        let (x_len, out_len) = (
            padded(self.flight(slot).job.x.len()),
            padded(self.flight(slot).out_len()),
        );
        let (source, input) = (self.copy_source(f)?.gl()?, device(&f.input)?.gl());
        let (output, download) = (device(&f.output)?.gl(), mapped(&f.download)?.gl()?);
        let timed = |work: &mut GlWork, encode: &dyn Fn() -> Result<()>| -> Result<()> {
            let elapsed = TimerQuery::begin(gl)?;
            let encoded = encode();
            elapsed.end();
            work.elapsed.push(elapsed);
            encoded
        };
        match self.copy_mode {
            StreamCopy::Shader { groups } => {
                let copy = self.compiled(shaders::stream_copy_source())?;
                timed(work, &|| {
                    // Bindings 6 and 7 take the partners (the copy out is empty).
                    source.bind(4);
                    input.bind(5);
                    input.bind(6);
                    source.bind(7);
                    copy.dispatch_with([groups, 1, 1], "copies", [groups, 0, (x_len / 4) as u32, 0])
                })?;
                gl::storage_barrier(gl);
                timed(work, &|| self.convolve(slot, weights, None, None))?;
                gl::storage_barrier(gl);
                timed(work, &|| {
                    download.bind(4);
                    output.bind(5);
                    output.bind(6);
                    download.bind(7);
                    copy.dispatch_with(
                        [groups, 1, 1],
                        "copies",
                        [0, groups, 0, (out_len / 4) as u32],
                    )
                })
            }
            _ => {
                timed(work, &|| {
                    gl::copy_buffer(gl, source.raw(), input.raw(), x_len)
                })?;
                timed(work, &|| self.convolve(slot, weights, None, None))?;
                gl::storage_barrier(gl);
                timed(work, &|| {
                    gl::copy_buffer(gl, output.raw(), download.raw(), out_len)
                })
            }
        }
    }

    /// Without CUDA copies: encodes a step's copies (DMA, or shader copies fused into the
    /// convolution's dispatch where its plan allows) and its convolution; whether they were
    /// fused.
    fn encode_copies_and_convolution(
        &self,
        role: [Option<usize>; 3],
        weights: Option<usize>,
    ) -> Result<bool> {
        let gl = &self.ctx.gl;
        let frame = |slot: Option<usize>| slot.map(|s| &self.frames[s]);
        let (f_in, f_out) = (frame(role[0]), frame(role[2]));
        let x_len = role[0].map_or(0, |s| padded(self.flight(s).job.x.len()));
        let out_len = role[2].map_or(0, |s| padded(self.flight(s).out_len()));
        // Where the newest job's input is: its pinned buffer, or its frame's upload staging.
        let source = |f| self.copy_source(f).and_then(HostMem::gl);
        let StreamCopy::Shader { groups } = self.copy_mode else {
            // DMA copies: one context runs them one after another with the convolution.
            if let Some(f) = f_in {
                gl::copy_buffer(gl, source(f)?.raw(), device(&f.input)?.gl().raw(), x_len)?;
            }
            if let Some(slot) = role[1] {
                self.convolve(slot, weights, None, None)?;
            }
            if let Some(f) = f_out {
                gl::copy_buffer(
                    gl,
                    device(&f.output)?.gl().raw(),
                    mapped(&f.download)?.gl()?.raw(),
                    out_len,
                )?;
            }
            return Ok(false);
        };
        // Copy buffers on bindings 4 to 7; an absent copy binds its partner (nothing reads it).
        if let Some(f) = f_in {
            source(f)?.bind(4);
            device(&f.input)?.gl().bind(5);
        }
        if let Some(f) = f_out {
            device(&f.output)?.gl().bind(6);
            mapped(&f.download)?.gl()?.bind(7);
        }
        match (f_in, f_out) {
            (Some(f), None) => {
                device(&f.input)?.gl().bind(6);
                source(f)?.bind(7);
            }
            (None, Some(f)) => {
                mapped(&f.download)?.gl()?.bind(4);
                device(&f.output)?.gl().bind(5);
            }
            _ => {}
        }
        // Copying workgroups split by bytes, at least one for each copy.
        let (n_in, n_out) = ((x_len / 4) as u64, (out_len / 4) as u64);
        let copy_groups = match (n_in, n_out) {
            (0, 0) => [0, 0],
            (_, 0) => [groups, 0],
            (0, _) => [0, groups],
            _ => {
                let g_in =
                    (u64::from(groups) * n_in / (n_in + n_out)).clamp(1, u64::from(groups) - 1);
                [g_in as u32, groups - g_in as u32]
            }
        };
        let copies = [copy_groups[0], copy_groups[1], n_in as u32, n_out as u32];
        let copying = n_in + n_out > 0;
        // The copies go into the convolution's dispatch where its plan allows, else alongside.
        let fused = role[1]
            .and_then(|s| self.flight(s).fused.as_ref())
            .filter(|_| copying)
            .map(|(source, copy_z)| FusedPass {
                source,
                copy_z: *copy_z,
                copies,
            });
        if copying && fused.is_none() {
            self.compiled(shaders::stream_copy_source())?
                .dispatch_with([groups, 1, 1], "copies", copies)?;
        }
        if let Some(slot) = role[1] {
            self.convolve(slot, weights, fused.as_ref(), None)?;
        }
        Ok(fused.is_some())
    }

    /// Where the input of `f`'s job is: its pinned buffer, or the frame's upload staging.
    fn copy_source<'a>(&'a self, f: &'a Frame) -> Result<&'a HostMem> {
        match f.flight.as_ref().and_then(|j| self.pinned_buffer(&j.job.x)) {
            Some(b) => Ok(b),
            None => mapped(&f.upload),
        }
    }

    /// The mapped buffer of a pinned input of this worker's (another worker's, or plain host
    /// memory, is copied into staging like any host input).
    fn pinned_buffer(&self, x: &StreamInput) -> Option<&HostMem> {
        let (owner, id) = x.gl_id()?;
        (owner == self.backend_id)
            .then(|| self.pinned.get(&id))
            .flatten()
    }

    /// Fails every job in flight with `why` (caused by `cause`, whose kind each job's error
    /// keeps: a fence timeout stays one) and marks the executor broken: their buffers may
    /// still be in use, so none is read.
    fn fail_all(&mut self, cause: &Error, why: String) {
        let failed = |why: &str| match cause {
            Error::FenceTimeout(_) => Error::FenceTimeout(format!("the GPU is unhealthy: {why}")),
            Error::ContextLost(_) => Error::ContextLost(format!("the GPU is unhealthy: {why}")),
            _ => unhealthy(why),
        };
        self.broken = Some(why.clone());
        if let Some(f) = self.filling.take() {
            // Its copy writes the frame's staging: wait for it before the frame can be reused.
            let _ = f.copied.recv();
            answer(f.flight.job, Err(failed(&why)));
        }
        while let Some(slot) = self.in_flight.pop_front() {
            if let Some(f) = self.frames[slot].flight.take() {
                answer(f.job, Err(failed(&why)));
            }
        }
        self.last_step = None;
    }

    /// Whether finishing the oldest job in flight will not block: all its steps are recorded and
    /// it has finished on the GPU, or it has run out of time.
    pub(super) fn oldest_ready(&self) -> bool {
        let Some(&slot) = self.in_flight.front() else {
            return false;
        };
        let f = self.flight(slot);
        // Out of time, finished or not, with its steps recorded or not: a GPU that never gets
        // idle (hung) would otherwise keep its remaining steps unrecorded and the job waiting
        // for ever (found by the injected fence fault, `fault/fence_never_passes`).
        f.begun.elapsed() >= f.job.timeout
            || f.phases == 3
                && f.fence
                    .as_ref()
                    .is_none_or(|f| f.signaled().unwrap_or(true))
    }

    /// Waits (at most `timeout`) for the oldest job's fence, if all its steps are recorded.
    pub(super) fn wait_oldest(&self, timeout: Duration) -> bool {
        let Some(&slot) = self.in_flight.front() else {
            return false;
        };
        let f = self.flight(slot);
        match &f.fence {
            Some(fence) if f.phases == 3 => {
                let _ = fence.wait(timeout.min(f.job.timeout.saturating_sub(f.begun.elapsed())));
                true
            }
            _ => false,
        }
    }

    /// Waits for the oldest job in flight (within its timeout), recording the steps it still
    /// needs first, and answers it. A fence that does not pass marks the executor broken and
    /// fails every job in flight.
    pub(super) fn stream_finish_oldest(&mut self) {
        let Some(&slot) = self.in_flight.front() else {
            return;
        };
        while self.in_flight.front() == Some(&slot) && self.flight(slot).phases < 3 {
            self.step_or_fail();
        }
        if self.in_flight.front() != Some(&slot) {
            return;
        }
        self.in_flight.pop_front();
        let Some(flight) = self.frames[slot].flight.take() else {
            return;
        };
        let out_len = flight.out_len();
        let Flight {
            job,
            fence,
            steps,
            charged,
            begun,
            mut done,
            ..
        } = flight;
        let fence = fence.expect("a job with its three steps has the fence of the last");
        let waited_from = Instant::now();
        let already = fence.signaled().unwrap_or(false);
        let left = job.timeout.saturating_sub(begun.elapsed());
        // The deadline counts from the submission to the GPU: a fence that passed, but only
        // after it, fails the job too (as observed here; only a tiny timeout can see that).
        let waited = if already {
            let took = begun.elapsed();
            if took > job.timeout {
                Err(Error::FenceTimeout(format!(
                    "the fence passed only after {took:?}, past the deadline of {:?}",
                    job.timeout
                )))
            } else {
                Ok(())
            }
        } else if left.is_zero() {
            // The deadline has passed and the fence had not: polling again now could see it
            // pass late and accept it (seen on the H100 with a 1 ns deadline).
            Err(Error::FenceTimeout(format!(
                "the fence had not passed when its deadline did, {:?} after submission",
                job.timeout
            )))
        } else {
            fence.wait(left)
        };
        if let Err(e) = waited {
            let e = past_deadline(e, job.timeout);
            let why = e.to_string();
            // The other frames' buffers may be in use too: fail their jobs, never read them.
            self.fail_all(&e, why);
            answer(job, Err(e));
            return;
        }
        done.fence_waited = !already;
        done.fence_wait_s = if already {
            0.0
        } else {
            waited_from.elapsed().as_secs_f64()
        };
        done.gpu_wall_s = begun.elapsed().as_secs_f64();
        // Busy time without double counting: the part of [submission, fence] after the
        // previous job's fence (jobs finish in order).
        let end = Instant::now();
        let start = self.busy_until.map_or(begun, |u| u.max(begun));
        done.busy_s = end.saturating_duration_since(start).as_secs_f64();
        self.busy_until = Some(end);
        let download = self.frames[slot]
            .download
            .as_ref()
            .expect("a frame in flight has staging");
        // SAFETY: the fence of the copy into it has passed; the frame stays held (not reused,
        // not deleted) until the Staged's release arrives (wait_all_releases before exit).
        let view = unsafe { download.view(out_len) };
        self.held.push(slot);
        done.output = Output::Staged(Staged {
            view,
            slot,
            release: self.release_tx.clone(),
        });
        if !self.ctx.info.software {
            let [up, conv, down] = [0, 1, 2].map(|p| steps[p].as_ref().and_then(|s| s.phase_ns(p)));
            (done.upload_ns, done.kernel_ns, done.download_ns) = (up, conv, down);
            // Timer queries say how long the GPU worked; never more than the wall share.
            let timed = charged.iter().map(|s| s.gpu_ns()).sum::<u64>() as f64 * 1e-9;
            done.busy_s = done.busy_s.min(timed);
            if let (Some(first), Some(last)) = (&steps[0], &steps[2]) {
                done.gpu_span_ns = match (&first.copy_in, &last.copy_out) {
                    // GL timestamps span its GPU work where GL ran all of it.
                    (None, None) => Some((first.start.nanoseconds(), last.end.nanoseconds())),
                    (Some(copy_in), Some(copy_out)) => self.cuda_span(copy_in, copy_out),
                    _ => None,
                };
            }
        }
        // GL objects go before the answer, so a caller that counts them sees them gone (those
        // of steps shared with later jobs go with the last of them).
        drop((fence, steps, charged));
        if self.in_flight.is_empty() {
            self.last_step = None;
        }
        done.settle_s = end.elapsed().as_secs_f64();
        done.answered = Some(Instant::now());
        answer(job, Ok(done));
    }

    /// The GPU span (ns) of a job whose copies CUDA ran, from the start of `copy_in` to the end
    /// of `copy_out`, on the executor's CUDA clock; moves that clock on to this job. CUDA times
    /// events only relative to each other, so the clock is chained from job to job (jobs finish
    /// in order, and copies in run in order on one stream): each link is short, so precise, and
    /// the error of a long one (an idle gap) shifts every later job alike.
    fn cuda_span(&mut self, copy_in: &TimedCopy, copy_out: &TimedCopy) -> Option<(u64, u64)> {
        let start = match &self.cuda_clock {
            Some((previous, at)) => at + elapsed_ns(previous, &copy_in.start)?.max(0),
            None => 0,
        };
        let end = start + elapsed_ns(&copy_in.start, &copy_out.end)?.max(0);
        self.cuda_clock = Some((Rc::clone(&copy_in.start), start));
        Some((start as u64, end as u64))
    }

    /// Finishes every job in flight, oldest first (a job still being copied in first joins).
    pub(super) fn stream_drain(&mut self) {
        while self.filling.is_some() {
            self.take_filled(Duration::from_secs(1));
        }
        while !self.in_flight.is_empty() {
            self.stream_finish_oldest();
        }
    }
}

/// Diagnostics: for download staging buffers made with each combination of the coherent and
/// client-storage flags, the time of a DMA copy of `floats` floats from a device buffer into
/// the staging buffer, and of the host reading it (into a buffer already touched, and into a
/// fresh allocation, in parallel chunks); a plain host copy for reference. One line per
/// variant, medians of 5.
#[cfg(feature = "probes")]
pub(super) fn probe_staging(gl: &Rc<glow::Context>, floats: usize) -> Result<String> {
    let mb = (floats * 4) as f64 / 1e6;
    let device = Buffer::new(gl, floats, true)?;
    device.upload(&vec![1.5f32; floats])?;
    let mut warm = vec![0.0f32; floats];
    let src = vec![2.5f32; floats];
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] * 1e3
    };
    let mut out = String::new();
    let t: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            parallel_copy(&src, &mut warm);
            t.elapsed().as_secs_f64()
        })
        .collect();
    out += &format!(
        "host copy {mb:.1} MB, parallel, warm destination: {:.3} ms\n",
        med(t)
    );
    for (coherent, client) in [(true, true), (true, false), (false, true), (false, false)] {
        let staging = MappedBuffer::with_flags(gl, floats, Direction::Download, coherent, client)?;
        let (mut dma, mut read_warm, mut read_fresh) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..5 {
            let t = Instant::now();
            gl::copy_buffer(gl, device.raw(), staging.raw(), floats)?;
            if !coherent {
                gl::client_mapped_barrier(gl);
            }
            Fence::new(gl)?.wait(Duration::from_secs(10))?;
            dma.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            parallel_copy(staging.as_slice(), &mut warm);
            read_warm.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let mut fresh = vec![0.0f32; floats];
            parallel_copy(staging.as_slice(), &mut fresh);
            read_fresh.push(t.elapsed().as_secs_f64());
            if fresh[floats / 2] != 1.5 || warm[floats - 1] != 1.5 {
                return Err(Error::Gpu("staging probe read wrong data".into()));
            }
        }
        out += &format!(
            "coherent {coherent}, client storage {client}: DMA+fence {:.3} ms, host read into warm {:.3} ms, into fresh {:.3} ms\n",
            med(dma),
            med(read_warm),
            med(read_fresh)
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Weights sent later are waited for, then kept; a caller that stops before sending them
    /// fails the job with an error, never a hang or a panic.
    #[test]
    fn weights_sent_later_arrive_or_fail_the_job() {
        let (tx, rx) = mpsc::sync_channel(1);
        let mut later = JobWeights::Later(rx);
        let sent = SharedWeights::new(vec![1.0f32, 2.0].into());
        let sender = std::thread::spawn(move || tx.send(sent).unwrap());
        assert_eq!(&*later.get().unwrap().data, &[1.0, 2.0]);
        sender.join().unwrap();
        assert_eq!(
            &*later.get().unwrap().data,
            &[1.0, 2.0],
            "kept once resolved"
        );
        let (tx, rx) = mpsc::sync_channel::<SharedWeights>(1);
        drop(tx);
        assert!(matches!(JobWeights::Later(rx).get(), Err(Error::Gpu(_))));
    }
}
