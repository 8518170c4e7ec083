//! The GPU backend: OpenGL compute shaders on a headless EGL context.
//!
//! The GL context is current on one thread, which [`GpuBackend`] owns (the *worker*); callers
//! on any thread send it messages through a channel, so the backend is `Send + Sync`. A
//! synchronous call ([`GpuBackend::conv2d`]) is a streaming job that runs alone: its input
//! copied on the caller's thread into a pooled staging buffer the GPU reads, its weights found
//! among shared sets by content, its output read from the frame's staging.
//!
//! The modules, and what each may use (imports run one way, down this list):
//! - `worker.rs`: the thread's loop and its messages; the kernel-timing path
//!   ([`GpuBackend::time_kernel`]), calibration, plans and probes answered there;
//! - `executor.rs`: the `Executor`, the streaming state: frames, jobs in flight,
//!   when to record a step, failures and recovery;
//! - `step.rs`: frames, and recording one step's copies and convolution on them; `job.rs`: a
//!   streaming job and its answer;
//! - `plan.rs`: the choice policy (algorithm, tile, split-K) and plans, which `encode` records;
//!   `resident.rs`: weight sets kept on the GPU, found by content; `kept.rs`: the sets kept
//!   on the host as shared buffers, found by content, by allocation, or guessed;
//! - `shaders.rs`: the GLSL sources, their specialisation, the program cache; `knob.rs`:
//!   environment settings;
//! - below all: `gl.rs` (RAII GL objects), `context.rs` (EGL), `memory.rs`, `cu.rs`, `vk.rs`,
//!   `host_copy.rs`; `arithmetic.rs` (the arithmetic probe). `overlap.rs` and `cuda_probe.rs`
//!   are diagnostics, built with the `probes` feature.

pub mod arithmetic;
#[allow(unsafe_code)] // See tidy's list of the files that may hold unsafe code.
pub mod context;
#[allow(unsafe_code)] // See tidy's list of the files that may hold unsafe code.
pub mod cu;
#[cfg(feature = "probes")]
mod cuda_probe;
#[allow(unsafe_code)] // See tidy's list of the files that may hold unsafe code.
pub mod executor;
#[allow(unsafe_code)] // See tidy's list of the files that may hold unsafe code.
pub mod gl;
#[allow(unsafe_code)] // See tidy's list of the files that may hold unsafe code.
mod host_copy;
#[allow(unsafe_code)] // See tidy's list of the files that may hold unsafe code.
mod job;
mod kept;
pub(crate) mod knob;
#[allow(unsafe_code)] // See tidy's list of the files that may hold unsafe code.
mod memory;
#[cfg(feature = "probes")]
mod overlap;
mod plan;
mod resident;
pub mod shaders;
mod step;
#[allow(unsafe_code)] // See tidy's list of the files that may hold unsafe code.
pub mod vk;
mod worker;

pub use arithmetic::Arithmetic;
pub use context::{GpuChoice, GpuInfo};
pub use executor::{FRAMES_DEFAULT, JOBS_PER_STEP};
pub use gl::LiveObjects;
pub use host_copy::parallel_hash;
pub(crate) use job::{answer_spin, recv_soon, recv_within, JobWeights, StreamJob};
pub use job::{Output, Staged, StreamDone};
pub use plan::{
    parts_from_env, Algorithm, Dispatches, Kernel, PlanInfo, Tile, PARTS, PARTS_MIN_BYTES,
};
pub(crate) use resident::{SharedWeights, WeightsKey};
pub use shaders::StreamCopy;
pub use worker::GpuRun;

use crate::error::{Error, Result};
use crate::params::Conv2dParams;
use crate::pinned::{InputPool, PinnedShared, PooledInput, StreamInput};
use context::GlContext;
use gl::FENCE_TIMEOUT;
use kept::KeptSets;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
#[cfg(feature = "probes")]
use worker::Probe;
use worker::{Job, Msg, Worker};

/// The GPU backend (see the module docs).
pub struct GpuBackend {
    jobs: Mutex<Option<mpsc::Sender<Msg>>>,
    info: GpuInfo,
    choice: GpuChoice,
    /// Where pinned inputs send their ids to be freed (see [`crate::pinned`]).
    unpin: mpsc::Sender<u64>,
    /// This backend among the process's (a pinned input is used only by the one that maps it).
    id: u64,
    /// The arithmetic class, once probed.
    arithmetic: std::sync::OnceLock<Arithmetic>,
    /// Synchronous calls' inputs, staged where the GPU reads them (see [`InputPool`]).
    inputs: InputPool,
    /// How long [`GpuBackend::conv2d`] waits for its job's fences.
    call_timeout: Mutex<Duration>,
    /// Weight and bias sets of recent calls as shared buffers.
    sets: KeptSets,
    /// Test hook ([`GpuBackend::force_weights_guess`]).
    guess_always: std::sync::atomic::AtomicBool,
    worker: Option<JoinHandle<()>>,
}

/// A synchronous call on its way ([`GpuBackend::send_call`]).
pub(crate) struct SentCall<'g> {
    /// The staged input, lent until the job has been answered and its output read.
    pub(crate) staged: PooledInput<'g>,
    /// The job's input (for a CPU re-run), its weights and bias.
    pub(crate) input: StreamInput,
    pub(crate) weights: SharedWeights,
    pub(crate) bias: Option<Arc<[f32]>>,
    /// Wall time of the input's copy into staging (on the caller's thread).
    pub(crate) host_in_s: f64,
    pub(crate) answer: mpsc::Receiver<Result<StreamDone>>,
}

/// A synchronous call's input, staged for the executor ([`GpuBackend::stage_input`]).
struct StagedInput<'g> {
    /// The input, copied into a pooled staging buffer.
    input: PooledInput<'g>,
    /// Wall time of the copy (on the caller's thread).
    host_in_s: f64,
}

impl GpuBackend {
    /// The GPU chosen by `SPORKLE_GPU` (see [`GpuChoice`]), or why there is none.
    pub fn new() -> Result<Self> {
        Self::with_choice(GpuChoice::from_env()?)
    }

    /// The GPU for `choice`, or why there is none.
    pub fn with_choice(choice: GpuChoice) -> Result<Self> {
        let (ready_tx, ready_rx) = mpsc::channel();
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let (unpin, unpin_rx) = mpsc::channel();
        static BACKENDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = BACKENDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let worker = std::thread::Builder::new()
            .name("sporkle-gpu".into())
            .spawn(move || match GlContext::create(choice) {
                Ok(ctx) => {
                    let _ = ready_tx.send(Ok(ctx.info.clone()));
                    Worker::new(ctx, id, unpin_rx).serve(jobs_rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| Error::DeviceUnavailable(format!("cannot start the GPU thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(info)) => Ok(Self {
                jobs: Mutex::new(Some(jobs_tx)),
                info,
                choice,
                unpin,
                id,
                arithmetic: std::sync::OnceLock::new(),
                inputs: InputPool::default(),
                call_timeout: Mutex::new(FENCE_TIMEOUT),
                sets: KeptSets::default(),
                guess_always: Default::default(),
                worker: Some(worker),
            }),
            Ok(Err(e)) => {
                let _ = worker.join();
                Err(e)
            }
            Err(_) => {
                let _ = worker.join();
                Err(Error::DeviceUnavailable(
                    "the GPU thread stopped while creating its context".into(),
                ))
            }
        }
    }

    /// What the GPU is and offers.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// The choice this backend was made with (to make another like it).
    pub fn choice(&self) -> GpuChoice {
        self.choice
    }

    /// Computes `output = conv2d(input, weights) + bias` on the GPU, synchronously, through the
    /// executor as a job that runs alone (the path [`crate::Juggler::conv2d`] takes: see
    /// `GpuBackend::send_call`). Every length is checked first; on any error the output is
    /// left untouched.
    pub fn conv2d(
        &self,
        p: &Conv2dParams,
        input: &[f32],
        weights: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
    ) -> Result<GpuRun> {
        p.check_slices(input, weights, bias, output)?;
        let timeout = *self.call_timeout.lock().unwrap_or_else(|e| e.into_inner());
        let call = self.send_call(p, input, weights, bias, timeout)?;
        let mut done = recv_soon(&call.answer)
            .map_err(|_| Error::Gpu("the GPU thread stopped during a job".into()))??;
        let t = Instant::now();
        std::mem::take(&mut done.output).copy_to(output);
        let seconds = |ns: Option<u64>| ns.map_or(0.0, |ns| ns as f64 * 1e-9);
        Ok(GpuRun {
            kernel_ns: done.kernel_ns,
            upload_s: call.host_in_s + seconds(done.upload_ns),
            download_s: seconds(done.download_ns) + t.elapsed().as_secs_f64(),
            weights_uploaded: done.weights_uploaded,
        })
    }

    /// A synchronous call sent to the executor as a job that runs alone, with nothing of its
    /// data's size allocated once warm: the input copied on this thread (in parallel chunks)
    /// straight into a pooled staging buffer the GPU reads; the job sent; then, while the GPU
    /// runs it, the weights found among the kept shared sets by content (length and a hash of
    /// every byte) and sent after it. Where the same slice was keyed before, the GPU
    /// convolves with the set it held then (a guess) and the job is answered only once the
    /// hash has confirmed it, else run again with the true weights; without a guess the
    /// convolution waits for them. The caller's lengths must have been checked.
    pub(crate) fn send_call(
        &self,
        p: &Conv2dParams,
        input: &[f32],
        weights: &[f32],
        bias: Option<&[f32]>,
        timeout: Duration,
    ) -> Result<SentCall<'_>> {
        let staged = self.stage_input(input)?;
        let read = staged.input.read();
        let bias = bias.map(|b| self.sets.of_slice(b).data);
        let (send_weights, later) = mpsc::sync_channel(1);
        let job_weights = match self.sets.guess(weights) {
            Some(guess) => JobWeights::Guessed {
                guess,
                later,
                always: self.guess_always.load(std::sync::atomic::Ordering::Relaxed),
                used: false,
            },
            None => JobWeights::Later(later),
        };
        let answer = self.stream(
            p,
            StreamInput::Pinned(read.clone()),
            job_weights,
            bias.clone(),
            false,
            timeout,
        )?;
        let weights = self.sets.of_slice(weights);
        // A job that failed before it needed them has dropped the receiver.
        let _ = send_weights.send(weights.clone());
        Ok(SentCall {
            staged: staged.input,
            input: StreamInput::Pinned(read),
            weights,
            bias,
            host_in_s: staged.host_in_s,
            answer,
        })
    }

    /// Kernel timing, the way a GPU kernel benchmark (and the cuDNN peer) measures it: the
    /// inputs are uploaded once, `warmup` untimed dispatches bring the clocks up, then
    /// `dispatches` identical dispatches run back to back, each timed by its own
    /// `GL_TIME_ELAPSED` query; the output of the
    /// last is read back into `output` for the caller to verify. Returns the per-dispatch times
    /// in nanoseconds (empty on a software renderer, whose timers mean nothing). Each dispatch
    /// does the whole convolution: nothing is divided, and no figure counts work twice.
    pub fn time_kernel(
        &self,
        p: &Conv2dParams,
        input: &[f32],
        weights: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        dispatches: Dispatches,
    ) -> Result<Vec<u64>> {
        let dispatches = Dispatches {
            timed: dispatches.timed.max(1),
            ..dispatches
        };
        Ok(self.submit(p, input, weights, bias, output, dispatches)?.1)
    }

    /// A synchronous call's input, ready for [`GpuBackend::stream`] without a copy of its size
    /// allocated once warm: copied (in parallel chunks, on this thread) straight into a pooled
    /// staging buffer the GPU reads (pinned where the GPU maps one, else plain host memory).
    fn stage_input(&self, input: &[f32]) -> Result<StagedInput<'_>> {
        let t = Instant::now();
        let mut staged = self.inputs.take(input.len(), |len| {
            Ok(self.pin(len).unwrap_or_else(|_| PinnedShared::host(len)))
        })?;
        host_copy::copy_to_staging(input, staged.as_mut_slice()?);
        Ok(StagedInput {
            input: staged,
            host_in_s: t.elapsed().as_secs_f64(),
        })
    }

    /// `weights`, a shared buffer of the caller's, as a kept set (see [`KeptSets::of_shared`]):
    /// a caller that passes the same `Arc` again (a stream, a model's layer) pays no hash after
    /// the first call.
    pub(crate) fn shared_weights_of(&self, weights: Arc<[f32]>) -> SharedWeights {
        self.sets.of_shared(weights)
    }

    fn submit(
        &self,
        p: &Conv2dParams,
        input: &[f32],
        weights: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        dispatches: Dispatches,
    ) -> Result<(GpuRun, Vec<u64>)> {
        p.check_slices(input, weights, bias, output)?;
        let (y, run, times) = self.ask("a job", |reply| {
            Msg::Call(Job {
                p: *p,
                x: input.to_vec(),
                w: weights.to_vec(),
                key: WeightsKey::of(weights),
                b: bias.map(<[f32]>::to_vec),
                dispatches,
                reply,
            })
        })?;
        output.copy_from_slice(&y);
        Ok((run, times))
    }
}

impl GpuBackend {
    /// Sends the worker the message `make` builds around a reply channel, and waits for the
    /// answer (`during` names the request if the worker stops).
    fn ask<T>(&self, during: &str, make: impl FnOnce(mpsc::Sender<Result<T>>) -> Msg) -> Result<T> {
        let (reply, answer) = mpsc::channel();
        self.send(make(reply))?;
        answer
            .recv()
            .map_err(|_| Error::Gpu(format!("the GPU thread stopped during {during}")))?
    }

    fn send(&self, msg: Msg) -> Result<()> {
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|tx| tx.send(msg).is_ok());
        if sent {
            Ok(())
        } else {
            Err(Error::Gpu("the GPU thread has stopped".into()))
        }
    }

    /// The GFLOP/s of a fixed FMA workload (`shaders/calibrate.comp`) by timer query, best of
    /// three: the GPU's speed at this moment, sharing no code with the convolution kernels, for
    /// performance baselines. `None` on a software renderer (its timers mean nothing).
    pub fn calibrate(&self) -> Result<Option<f64>> {
        self.ask("calibration", Msg::Calibrate)
    }

    /// Diagnostics: DMA and host-read speeds of download staging buffers made with different
    /// flags (see `executor::probe_staging`), for `floats` floats.
    #[cfg(feature = "probes")]
    pub fn probe_staging(&self, floats: usize) -> Result<String> {
        self.probe(Probe::Staging, floats)
    }

    /// Diagnostics: whether uploads, downloads and compute overlap when each runs in its own
    /// shared context (see `overlap`), with copies of `floats` floats.
    #[cfg(feature = "probes")]
    pub fn probe_overlap(&self, floats: usize) -> Result<String> {
        self.probe(Probe::Overlap, floats)
    }

    /// Zero-copy probe: shader copies across the bus and their overlap with compute in one
    /// context (see `overlap::probe_zero_copy`), for `floats` floats.
    #[cfg(feature = "probes")]
    pub fn probe_zero_copy(&self, floats: usize) -> Result<String> {
        self.probe(Probe::ZeroCopy, floats)
    }

    /// Streaming with CUDA's copy engines (see `cuda_probe.rs`): `batches` of `p` a run.
    #[cfg(feature = "probes")]
    pub fn probe_cuda(&self, p: &Conv2dParams, batches: usize) -> Result<String> {
        self.probe(Probe::Cuda(*p), batches)
    }

    /// What a call of `p` (with a bias or not) runs here: its algorithm, tile, split and
    /// passes. With [`GpuBackend::arithmetic`], this fixes the output's bits.
    pub fn plan_info(&self, p: &Conv2dParams, bias: bool) -> Result<PlanInfo> {
        self.plan_info_with(p, bias, None)
    }

    /// [`GpuBackend::plan_info`] with the algorithm forced (as [`Dispatches::algorithm`] forces
    /// it); forcing Winograd where it does not apply is an error.
    pub fn plan_info_with(
        &self,
        p: &Conv2dParams,
        bias: bool,
        algorithm: Option<Algorithm>,
    ) -> Result<PlanInfo> {
        p.validate()?;
        self.ask("planning", |reply| Msg::Plan(*p, bias, algorithm, reply))
    }

    /// The GPU's arithmetic class (see [`arithmetic`]), probed once per backend.
    pub fn arithmetic(&self) -> Result<Arithmetic> {
        if let Some(a) = self.arithmetic.get() {
            return Ok(*a);
        }
        let a = self.ask("the arithmetic probe", Msg::Arithmetic)?;
        Ok(*self.arithmetic.get_or_init(|| a))
    }

    /// How long a synchronous call ([`conv2d`](Self::conv2d), [`time_kernel`](Self::time_kernel))
    /// waits for its fence before it fails with [`Error::FenceTimeout`] (default 60 s); nothing
    /// is read from a job whose fence did not pass.
    pub fn set_fence_timeout(&self, timeout: Duration) -> Result<()> {
        *self.call_timeout.lock().unwrap_or_else(|e| e.into_inner()) = timeout;
        self.ask("setting the fence timeout", |reply| {
            Msg::SyncTimeout(timeout, reply)
        })
    }

    /// Test hook: with `on`, this backend's fences are never seen to pass, as on a hung GPU,
    /// so every wait lasts its whole timeout and fails; `false` restores them.
    #[doc(hidden)]
    pub fn inject_fence_fault(&self, on: bool) -> Result<()> {
        self.ask("injecting a fence fault", |reply| {
            Msg::FenceFault(on, reply)
        })
    }

    /// Returns once the GPU thread has freed every pinned input dropped before this call. A
    /// dropped [`crate::PinnedInput`] is freed by that thread when it next handles anything (any
    /// GPU call, or this); a thread that waits for work does not wake for it.
    pub fn settle(&self) -> Result<()> {
        self.ask("settling", Msg::Settle)
    }

    /// Test hook: with `on`, a synchronous call whose weights slice was keyed before always
    /// convolves with the set it held then (a guess), even where its hash is done first, so
    /// that the check of the guess (and the re-run when it is wrong) runs on every such call.
    #[doc(hidden)]
    pub fn force_weights_guess(&self, on: bool) {
        (self.guess_always).store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// A pinned input buffer of `len` floats (see [`crate::pinned`]).
    pub(crate) fn pin(&self, len: usize) -> Result<crate::pinned::PinnedShared> {
        let (id, ptr) = self.ask("pinning an input", |reply| Msg::Pin(len, reply))?;
        Ok(job::pinned_shared(
            self.id,
            id,
            ptr,
            len,
            self.unpin.clone(),
        ))
    }

    #[cfg(feature = "probes")]
    fn probe(&self, probe: Probe, floats: usize) -> Result<String> {
        self.ask("the probe", |reply| Msg::Probe(probe, floats, reply))
    }

    /// Streams one convolution through the async executor (see [`executor`]): returns at once;
    /// the answer arrives on the returned channel. With `pipelined`, its phases share the
    /// executor's steps with other jobs ([`JOBS_PER_STEP`] per step); without, it runs alone, each phase
    /// a step of its own. A fence that does not pass within `timeout`
    /// fails the job (nothing is read from its buffers) and marks the GPU unhealthy.
    pub(crate) fn stream(
        &self,
        p: &Conv2dParams,
        input: crate::pinned::StreamInput,
        weights: JobWeights,
        bias: Option<Arc<[f32]>>,
        pipelined: bool,
        timeout: Duration,
    ) -> Result<mpsc::Receiver<Result<StreamDone>>> {
        p.check_buffers(
            input.len(),
            match &weights {
                JobWeights::Ready(w) => w.data.len(),
                // The caller checks what it sends.
                JobWeights::Later(_) | JobWeights::Guessed { .. } => p.weights_len(),
            },
            bias.as_deref().map(<[f32]>::len),
            p.output_len(),
        )?;
        // One slot: the one answer, allocated once (an unbounded channel allocates a block of 31).
        let (reply, answer) = mpsc::sync_channel(1);
        self.send(Msg::Stream(StreamJob {
            p: *p,
            x: input,
            w: weights,
            b: bias,
            pipelined,
            timeout,
            reply,
            sent: Instant::now(),
        }))?;
        Ok(answer)
    }
}

impl Drop for GpuBackend {
    /// Stops the worker, which deletes every GL object and the context before it exits.
    fn drop(&mut self) {
        // Staged inputs are the worker's memory: given back before it stops, so none outlives it.
        self.inputs.clear();
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
