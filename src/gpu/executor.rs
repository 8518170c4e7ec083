//! The async executor: streaming convolutions through a pipeline of steps, [`JOBS_PER_STEP`] jobs per
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
//! before that; how its copies run ([`StreamCopy`]: CUDA's copy engines or shader copies) and
//! how a big job runs in parts along n (`PARTS`, chosen by `Planner::parts`) is told in `step.rs`, which records steps.
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
//! everything it was given before (`Executor::recover`: a new fence passes, and CUDA's copy
//! streams are idle); then the executor works again. A job that ran with a guess at its
//! weights (`JobWeights::Guessed`) is answered only once the guess is confirmed, else run again.

use super::context::{GlContext, GpuInfo};
use super::cu::CudaCopies;
use super::gl::{self, Buffer, Direction, Fence, MappedBuffer, TimerQuery};
use super::host_copy::{self, copy_to_staging};
use super::job::{answer, past_deadline, unhealthy, Output, Staged, StreamDone, StreamJob};
use super::knob::knob;
use super::memory::{DeviceMem, HostMem};
use super::plan::{scratch, scratch_for, Dispatches, Plan, Planner};
use super::resident::ResidentWeights;
use super::shaders::{self, StreamCopy};
use super::step::{
    gpu_times, padded, CudaClock, Encoder, Filling, Flight, Frame, GlWork, PinnedInputs, Planned,
    StepTimes,
};
use crate::error::{Error, Result};
use crate::params::Conv2dParams;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Jobs in one step of the pipeline, and so on the GPU at once: while one convolves, the next
/// is copied in and the one before it copied out.
pub const JOBS_PER_STEP: usize = 3;

/// Frames (buffer sets) in all, by default (`SPORKLE_STREAM_FRAMES` sets it, at least
/// [`JOBS_PER_STEP`]): a job holds one from its start until its caller has read its output, so beyond
/// the [`JOBS_PER_STEP`] jobs of a step, two more may be queued for the next step or being read.
pub const FRAMES_DEFAULT: usize = JOBS_PER_STEP + 2;

/// How long the GPU may sit idle, with jobs in flight that need more steps and a job about to
/// join (its input being copied in, or a frame about to come back for it), before the worker
/// records a step without a new job: if the job joins in that time, it shares the step instead.
pub(super) const IDLE_GRACE: Duration = Duration::from_micros(100);

/// How long a broken executor waits for the GPU to finish its earlier work before it takes a
/// new job ([`Executor::recover`]).
const RECOVER_WAIT: Duration = Duration::from_millis(50);

/// The address and length of a frame's upload staging, for the thread that copies into it.
struct StagingPtr(*mut f32, usize);

// SAFETY: the copy thread is the only one touching that memory while it runs (see
// Executor::start_host_copy), and the mapping outlives it.
unsafe impl Send for StagingPtr {}

/// What outlives jobs on the context besides the executor's frames: plans (and compiled
/// programs) and resident weights. The worker owns it and lends it to the executor's calls.
pub(super) struct Resources {
    pub(super) plans: Planner,
    pub(super) weights: ResidentWeights,
}

/// The streaming state: frames, the jobs in flight in them, and how copies run.
pub(super) struct Executor {
    // Field order is drop order: every GL object before the CUDA copies that made some of them.
    /// The frames, and the slots in flight, oldest first.
    frames: Vec<Frame>,
    /// Pinned inputs, by id.
    pinned: PinnedInputs,
    in_flight: VecDeque<usize>,
    /// Frames whose output a caller is reading, and the channel their releases come back on.
    held: Vec<usize>,
    release_tx: mpsc::Sender<usize>,
    release_rx: mpsc::Receiver<usize>,
    /// Why the executor stopped taking jobs (a fence timed out or the context failed).
    broken: Option<String>,
    /// When the last streaming job's fence was seen passing (for busy time).
    busy_until: Option<Instant>,
    /// The fence after the last step recorded (none when no job is in flight).
    last_step: Option<Rc<Fence>>,
    /// Since when the GPU has been seen idle with steps still to record.
    idle_since: Option<Instant>,
    /// The job whose input the copy thread is writing into its staging.
    filling: Option<Filling>,
    /// The thread that copies inputs into staging.
    copy_thread: host_copy::CopyThread,
    /// How steps copy between staging and device buffers.
    copy_mode: StreamCopy,
    /// The clock CUDA-copied jobs' GPU spans are read on.
    cuda_clock: CudaClock,
    /// CUDA copies, once opened (`copy_mode`); after every buffer they made.
    cuda: Option<CudaCopies>,
    gl: Rc<glow::Context>,
    info: GpuInfo,
    /// Buffers get immutable storage (GL_ARB_buffer_storage): without, no persistent mapping.
    immutable: bool,
}

impl Executor {
    /// No frame yet, on the context whose functions are `gl` and whose probe `info` gave;
    /// pinned inputs of backend `backend_id` are freed through `unpin`.
    pub(super) fn new(
        gl: Rc<glow::Context>,
        info: GpuInfo,
        immutable: bool,
        backend_id: u64,
        unpin: mpsc::Receiver<u64>,
    ) -> Self {
        let (release_tx, release_rx) = mpsc::channel();
        Self {
            frames: (0..Self::slots()).map(|_| Frame::default()).collect(),
            pinned: PinnedInputs::new(backend_id, unpin),
            in_flight: VecDeque::new(),
            held: Vec::new(),
            release_tx,
            release_rx,
            broken: None,
            busy_until: None,
            last_step: None,
            idle_since: None,
            filling: None,
            copy_thread: host_copy::CopyThread::default(),
            copy_mode: StreamCopy::from_env(),
            cuda_clock: CudaClock::default(),
            cuda: None,
            gl,
            info,
            immutable,
        }
    }

    /// Whether a job's input is being copied into its staging (it joins the pipeline when done).
    pub(super) fn filling(&self) -> bool {
        self.filling.is_some()
    }

    /// Pinned inputs still held by callers.
    pub(super) fn pinned_held(&self) -> usize {
        self.pinned.len()
    }

    /// The CUDA copies, if open.
    pub(super) fn cuda(&self) -> Option<&CudaCopies> {
        self.cuda.as_ref()
    }

    /// The encoder of a step on this executor's frames.
    fn encoder<'a>(&'a self, res: &'a Resources) -> Encoder<'a> {
        Encoder {
            gl: &self.gl,
            frames: &self.frames,
            cuda: self.cuda.as_ref(),
            copy_mode: self.copy_mode,
            pinned: &self.pinned,
            plans: &res.plans,
            weights: &res.weights,
        }
    }

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
        self.pinned.free_released();
    }

    /// A pinned input of `len` floats: its id and mapping (as an address, to cross threads).
    pub(super) fn pin(&mut self, len: usize) -> Result<(u64, usize)> {
        (self.pinned).pin(&self.gl, self.cuda.as_ref(), self.immutable, len)
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

    /// Whether some job in flight still has a phase to record.
    pub(super) fn steps_pending(&self) -> bool {
        self.in_flight
            .iter()
            .any(|&s| self.frames[s].flight().phases < 3)
    }

    /// Whether the GPU has finished every step recorded (so that waiting for more jobs to
    /// share the next step with would leave it idle). With CUDA copies, whose phases need not
    /// share a dispatch: whether the next step's convolution and copy out can start (what they
    /// wait for has finished), so that the copy engines never wait for a whole step.
    pub(super) fn gpu_idle(&self) -> bool {
        if self.cuda.is_some() {
            // A job's next phase (convolution or copy out) waits for the end of its last one.
            return self.in_flight.iter().all(|&slot| {
                let phases = self.frames[slot].flight().phases;
                !(1..3).contains(&phases) || self.phase_started_done(slot, phases - 1)
            });
        }
        self.last_step
            .as_ref()
            .is_none_or(|f| f.signaled().unwrap_or(true))
    }

    /// Frames to make: [`FRAMES_DEFAULT`], or `SPORKLE_STREAM_FRAMES`.
    pub(super) fn slots() -> usize {
        knob("SPORKLE_STREAM_FRAMES", |v| match v.parse::<usize>() {
            Ok(n) if (JOBS_PER_STEP..=16).contains(&n) => Ok(n),
            _ => Err(format!("expected {JOBS_PER_STEP} to 16 frames")),
        })
        .unwrap_or(FRAMES_DEFAULT)
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
    pub(super) fn open_cuda(&mut self, ctx: &GlContext) -> Result<()> {
        let StreamCopy::Cuda { required } = self.copy_mode else {
            return Ok(());
        };
        if self.cuda.is_some() {
            return Ok(());
        }
        match CudaCopies::open(ctx) {
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
        let gl = Rc::clone(&self.gl);
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
    pub(super) fn stream_begin(&mut self, res: &mut Resources, job: StreamJob) {
        if self.broken.is_some() && !self.recover() {
            let why = self.broken.clone().unwrap_or_default();
            answer(job, Err(unhealthy(&why)));
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
        let started = self.try_fill(res, &mut frame, &job);
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
                if self.pinned.get(&flight.job.x).is_some() {
                    self.start_flight(res, slot, flight);
                } else if !flight.job.pipelined {
                    self.host_copy_here(res, slot, flight);
                } else {
                    self.start_host_copy(slot, flight);
                }
            }
            Err(e) => answer(job, Err(e)),
        }
    }

    /// Puts `flight` (its input in place) in the pipeline and records a step.
    fn start_flight(&mut self, res: &mut Resources, slot: usize, mut flight: Flight) {
        flight.begun = Instant::now();
        flight.done.in_flight = self.in_flight.len() + 1;
        self.frames[slot].flight = Some(flight);
        self.in_flight.push_back(slot);
        self.first_step(res, slot);
    }

    /// Records the first step of the job in frame `slot`: all its phases at once where it runs
    /// alone without CUDA copies, else the pipeline's next step.
    fn first_step(&mut self, res: &mut Resources, slot: usize) {
        let job = &self.frames[slot].flight().job;
        if !job.pipelined && self.cuda.is_none() {
            self.step_or_fail_with(res, [Some(slot); 3]);
        } else {
            self.step_or_fail(res);
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
    fn host_copy_here(&mut self, res: &mut Resources, slot: usize, flight: Flight) {
        let Some((mut flight, upload)) = self.upload_staging(slot, flight) else {
            return;
        };
        let len = flight.job.x.len();
        let t = Instant::now();
        copy_to_staging(flight.job.x.as_slice(), &mut upload.as_mut_slice()[..len]);
        flight.done.host_in_s = t.elapsed().as_secs_f64();
        self.start_flight(res, slot, flight);
    }

    /// Copies `flight`'s input into its frame's upload staging on another thread (in parallel
    /// chunks), so that the worker meanwhile records steps and answers jobs; the job enters the
    /// pipeline when the copy is done ([`Executor::take_filled`]).
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
            // fills (Executor::filling), and the worker waits for the answer before it drains,
            // fails or exits.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst.0, dst.1) };
            copy_to_staging(x.as_slice(), dst);
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
    pub(super) fn take_filled(&mut self, res: &mut Resources, timeout: Duration) -> bool {
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
                self.start_flight(res, slot, flight);
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
    fn try_fill(
        &mut self,
        res: &mut Resources,
        frame: &mut Frame,
        job: &StreamJob,
    ) -> Result<Planned> {
        let p = &job.p;
        let lens = (job.x.len(), p.weights_len());
        let whole = res.plans.plan(p, lens, job.b.is_some(), &Dispatches::ONE)?;
        let parts = (res.plans).parts(job.p, job.x.len(), self.copy_mode);
        // A part runs the whole batch's algorithm and tile, so that its outputs are the same
        // bits as the synchronous path's.
        let plan = match parts {
            1 => whole,
            _ => res.plans.plan(
                &Conv2dParams {
                    n: p.n / parts,
                    ..*p
                },
                (lens.0 / parts, lens.1),
                job.b.is_some(),
                &Dispatches {
                    tile: Some(whole.tile),
                    algorithm: Some(whole.algorithm),
                    ..Dispatches::ONE
                },
            )?,
        };
        let fused = res.plans.fused_program(&plan, self.copy_mode)?;
        if matches!(self.copy_mode, StreamCopy::Shader { .. }) {
            res.plans.program(shaders::stream_copy_source())?;
        }
        self.size_frame(frame, job, &plan, parts)?;
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

    /// Makes `frame`'s buffers big enough for `job` run as `plan` in `parts` (never smaller).
    fn size_frame(
        &self,
        frame: &mut Frame,
        job: &StreamJob,
        plan: &Plan,
        parts: usize,
    ) -> Result<()> {
        let gl = Rc::clone(&self.gl);
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
        if self.pinned.get(&job.x).is_none() {
            gl::ensure_len(&mut frame.upload, x_len, || host(x_len, Direction::Upload))?;
        }
        gl::ensure_len(&mut frame.download, out_len, || {
            host(out_len, Direction::Download)
        })?;
        gl::ensure_len(&mut frame.input, x_len, || device(x_len))?;
        gl::ensure_len(&mut frame.output, out_len, || device(out_len))?;
        scratch(&gl, &mut frame.bias, job.p.c_out, true)?;
        scratch_for(&gl, &mut frame.scratch, plan, true)
    }

    /// Records the next step of the pipeline (see [`Executor::step`]).
    pub(super) fn step_or_fail(&mut self, res: &mut Resources) {
        self.step_or_fail_with(res, self.roles());
    }

    /// Records a step of the phases of the jobs in `role` ([`Executor::step`]); a failure fails
    /// every job in flight, since their buffers may be half written, and marks the executor
    /// broken.
    fn step_or_fail_with(&mut self, res: &mut Resources, role: [Option<usize>; 3]) {
        if let Err(e) = self.step(res, role) {
            self.fail_all(&e, format!("a streaming step failed: {e}"));
        }
    }

    /// The jobs whose phases the next step runs: [copy in, convolve, copy out].
    fn roles(&self) -> [Option<usize>; 3] {
        let mut role: [Option<usize>; 3] = [None; 3];
        for &slot in &self.in_flight {
            let phases = self.frames[slot].flight().phases;
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
    pub(super) fn step_copy_out_early(&mut self, res: &mut Resources) -> bool {
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
        self.step_or_fail_with(res, [None, None, Some(out)]);
        true
    }

    /// Whether the first part of phase `phase` (0: copy in, 1: convolution, 2: copy out) of the
    /// job in frame `slot` has finished on the GPU, so that its next phase can start (or was
    /// never recorded, or cannot be asked: then waiting for it would not help).
    fn phase_started_done(&self, slot: usize, phase: usize) -> bool {
        self.frames[slot].flight().steps[phase]
            .as_ref()
            .is_none_or(|s| s.part_end(phase, 0).signaled().unwrap_or(true))
    }

    /// Records one step of the pipeline for the jobs in `role` ([copy in, convolve, copy out],
    /// normally [`Executor::roles`]): the newest job copies its input in, the one before
    /// convolves, the one before that copies its output out, all after one barrier (each reads
    /// what the step before wrote), then a fence. Jobs advance one phase per step, so no two jobs
    /// in a step are in the same phase.
    fn step(&mut self, res: &mut Resources, role: [Option<usize>; 3]) -> Result<()> {
        if role.iter().all(Option::is_none) {
            return Ok(());
        }
        let gl = Rc::clone(&self.gl);
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
            Some(slot) if self.cuda.is_some() => Some(self.encoder(res).cuda_copy_in(slot)?),
            _ => None,
        };
        let copy_out = match role[2] {
            Some(slot) if self.cuda.is_some() => Some(self.encoder(res).cuda_copy_out(slot)?),
            _ => None,
        };
        // The convolution's weights, made resident now: an earlier step may have evicted them.
        let weights = match role[1] {
            Some(slot) => {
                let f =
                    (self.frames[slot].flight.as_mut()).expect("a frame in flight holds its job");
                let (p, algorithm) = (f.job.p, f.plan.algorithm);
                let w = f.job.w.for_convolution()?.clone();
                Some(res.weights.get(&p, w.key, &w.data, algorithm)?)
            }
            None => None,
        };
        gl::storage_barrier(&gl);
        let start = TimerQuery::timestamp(&gl)?;
        let mut work = GlWork::default();
        let fused = match role[0] {
            Some(slot) if alone => {
                self.encoder(res)
                    .encode_alone(slot, weights.map(|w| w.0), &mut work)?;
                false
            }
            _ => self
                .encoder(res)
                .encode_step(role, weights.map(|w| w.0), &mut work)?,
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
        let f = self.frames[slot].flight();
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
        let f = self.frames[slot].flight();
        match &f.fence {
            Some(fence) if f.phases == 3 => {
                let _ = fence.wait(timeout.min(f.job.timeout.saturating_sub(f.begun.elapsed())));
                true
            }
            _ => false,
        }
    }

    /// Waits for the oldest job in flight (within its timeout), recording the steps it still
    /// needs first, and answers it; one that ran with a wrong guess at its weights runs again
    /// first. A fence that does not pass marks the executor broken and fails every job in flight.
    pub(super) fn stream_finish_oldest(&mut self, res: &mut Resources) {
        let Some(&slot) = self.in_flight.front() else {
            return;
        };
        // Whether any run's fence had to be waited for, and how long in all.
        let (mut fence_waited, mut fence_wait_s) = (false, 0.0);
        loop {
            while self.in_flight.front() == Some(&slot) && self.frames[slot].flight().phases < 3 {
                self.step_or_fail(res);
            }
            if self.in_flight.front() != Some(&slot) {
                return;
            }
            let f = self.frames[slot].flight();
            let fence =
                (f.fence.as_ref()).expect("a job with its three steps has the fence of the last");
            let waited_from = Instant::now();
            let (already, waited) = fence.wait_by_deadline(f.begun, f.job.timeout);
            if let Err(e) = waited {
                let job = self.take_oldest(slot).job;
                let e = past_deadline(e, job.timeout);
                let why = e.to_string();
                // The other frames' buffers may be in use too: fail their jobs, never read them.
                self.fail_all(&e, why);
                answer(job, Err(e));
                return;
            }
            if !already {
                fence_waited = true;
                fence_wait_s += waited_from.elapsed().as_secs_f64();
            }
            let f = self.frames[slot]
                .flight
                .as_mut()
                .expect("a frame in flight holds its job");
            match f.job.w.confirm() {
                Ok(true) => break,
                // It ran with a guess at its weights that was wrong: again, with its own, from
                // its copy in (its input is still where the first run read it).
                Ok(false) => {
                    f.rewind();
                    self.first_step(res, slot);
                }
                // Its caller is gone: the GPU is fine, only this job ends.
                Err(e) => {
                    answer(self.take_oldest(slot).job, Err(e));
                    return;
                }
            }
        }
        let flight = self.take_oldest(slot);
        let (out_len, parts) = (flight.out_len(), flight.parts);
        let Flight {
            job,
            fence,
            steps,
            charged,
            begun,
            mut done,
            ..
        } = flight;
        (done.fence_waited, done.fence_wait_s) = (fence_waited, fence_wait_s);
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
        let whole = parts == 1;
        done.output = Output::Staged(Staged::new(view, slot, self.release_tx.clone(), whole));
        if !self.info.software {
            gpu_times(&mut done, &steps, &charged, &mut self.cuda_clock);
        }
        done.settle_s = end.elapsed().as_secs_f64();
        done.answered = Some(Instant::now());
        answer(job, Ok(done));
        // Its GL objects and CUDA events go after the answer (deleting them is the worker's
        // time, not the caller's); those of steps shared with later jobs go with the last of
        // them. A caller that counts live objects settles the GPU thread first
        // (`GpuBackend::settle`): it handles the next message only after this.
        drop((fence, steps, charged));
        if self.in_flight.is_empty() {
            self.last_step = None;
        }
    }

    /// The oldest job in flight, in frame `slot`, out of the pipeline.
    fn take_oldest(&mut self, slot: usize) -> Flight {
        self.in_flight.pop_front();
        (self.frames[slot].flight.take()).expect("a frame in flight holds its job")
    }

    /// Finishes every job in flight, oldest first (a job still being copied in first joins).
    pub(super) fn stream_drain(&mut self, res: &mut Resources) {
        while self.filling.is_some() {
            self.take_filled(res, Duration::from_secs(1));
        }
        while !self.in_flight.is_empty() {
            self.stream_finish_oldest(res);
        }
    }
}
