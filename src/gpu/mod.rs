//! The GPU backend: OpenGL compute shaders on a headless EGL context.
//!
//! The GL context is current on one thread, which [`GpuBackend`] owns (the *worker*); callers
//! on any thread send it jobs through a channel, so the backend is `Send + Sync`. The worker
//! keeps everything that should outlive a call: compiled programs (by specialised source),
//! scratch buffers that only grow, and resident weights.
//!
//! Resident weights are identified exactly: by their length and an xxh3-64 hash of every byte
//! (measured on the development machine, one core: 2.36 MiB, the largest benchmark's weights,
//! in 0.079 ms = 31 GB/s; 64 MiB in 2.8 ms = 24 GB/s; a changed element changes the key except
//! with probability 2⁻⁶⁴, and the unit test below checks every single-element change). Several sets stay resident up to a byte
//! budget, the least recently used evicted first.
//!
//! A synchronous call uploads the input, dispatches the shader between a `GL_TIME_ELAPSED`
//! query, fences, waits on the fence with a timeout (a timeout is an error: nothing is read
//! early), and reads the output back. Kernel time and end-to-end time are reported apart.

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
mod memory;
#[cfg(feature = "probes")]
mod overlap;
pub mod shaders;
#[allow(unsafe_code)] // See tidy's list of the files that may hold unsafe code.
pub mod vk;

pub use arithmetic::Arithmetic;
pub use context::{GpuChoice, GpuInfo};
pub use executor::{parts_from_env, Output, StreamDone, FRAMES, SLOTS};
pub use gl::LiveObjects;
pub use shaders::{Algorithm, StreamCopy, Tile};

use crate::error::{Error, Result};
use crate::params::Conv2dParams;
use crate::pinned::{InputPool, PinnedShared, PooledInput, StreamInput};
use context::GlContext;
pub(crate) use executor::JobWeights;
use executor::{Frame, StreamJob};
use gl::{Buffer, Fence, TimerQuery};
use shaders::{ProgramCache, WINOGRAD_VARIANT};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes of weights kept resident at once.
const WEIGHTS_BUDGET: usize = 512 << 20;
/// Default wait for a job's fence before it counts as failed.
const FENCE_TIMEOUT: Duration = Duration::from_secs(60);

/// Timings of one GPU convolution.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GpuRun {
    /// GPU time of the dispatch (`GL_TIME_ELAPSED`); `None` on a software renderer, whose
    /// timer queries return nonsense (about 1 ns).
    pub kernel_ns: Option<u64>,
    /// Wall time of the uploads (input, and weights when not resident).
    pub upload_s: f64,
    /// Wall time from the fence to the output back in host memory.
    pub download_s: f64,
    /// Whether the weights had to be uploaded (false: they were resident).
    pub weights_uploaded: bool,
}

/// How a job dispatches the convolution: `warmup` untimed dispatches, then `timed` back to back,
/// each timed on its own. A normal call is one timed dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dispatches {
    /// Untimed dispatches first, to bring the clocks up.
    pub warmup: usize,
    /// Dispatches timed one by one (at least 1).
    pub timed: usize,
    /// The tile variant (`None`: the default for the shape); trials force each variant.
    /// With Winograd, the tile of its GEMM.
    pub tile: Option<Tile>,
    /// The algorithm (`None`: the default for the shape, [`Algorithm::for_params`]); forcing
    /// Winograd where it does not apply is an error.
    pub algorithm: Option<Algorithm>,
}

impl Dispatches {
    /// One timed dispatch, nothing else: a normal call.
    pub const ONE: Self = Self {
        warmup: 0,
        timed: 1,
        tile: None,
        algorithm: None,
    };
}

/// The identity of a weight set: length and a hash of every byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct WeightsKey {
    len: usize,
    hash: u64,
}

impl WeightsKey {
    pub(crate) fn of(w: &[f32]) -> Self {
        Self {
            len: w.len(),
            hash: host_copy::parallel_hash(bytemuck::cast_slice(w)),
        }
    }
}

struct Job {
    p: Conv2dParams,
    x: Vec<f32>,
    w: Vec<f32>,
    key: WeightsKey,
    b: Option<Vec<f32>>,
    dispatches: Dispatches,
    reply: mpsc::Sender<JobResult>,
}

/// A job's answer: the output, its run, and the per-dispatch kernel times.
type JobResult = Result<(Vec<f32>, GpuRun, Vec<u64>)>;

/// What the worker is asked to do.
enum Msg {
    /// Kernel timing, with its own buffers.
    Call(Job),
    /// A streaming job for the executor.
    Stream(StreamJob),
    /// A diagnostic probe, with its size in floats.
    #[cfg(feature = "probes")]
    Probe(Probe, usize, mpsc::Sender<Result<String>>),
    /// A pinned input buffer of so many floats: its id and address.
    Pin(usize, mpsc::Sender<Result<(u64, usize)>>),
    /// The calibration workload: its GFLOP/s by timer query, best of three.
    Calibrate(mpsc::Sender<Result<Option<f64>>>),
    /// The plan a synchronous call of this shape (with a bias or not) runs.
    Plan(
        Conv2dParams,
        bool,
        Option<Algorithm>,
        mpsc::Sender<Result<PlanInfo>>,
    ),
    /// The arithmetic probe (`arithmetic.rs`).
    Arithmetic(mpsc::Sender<Result<Arithmetic>>),
    /// How long the synchronous path waits for a fence.
    SyncTimeout(Duration, mpsc::Sender<Result<()>>),
    /// Fault injection: fences never seen to pass (on) or as they are (off).
    FenceFault(bool, mpsc::Sender<Result<()>>),
}

/// The diagnostic probes (hidden CLI commands, feature `probes`).
#[cfg(feature = "probes")]
#[derive(Clone, Copy, Debug)]
enum Probe {
    /// `executor::probe_staging`.
    Staging,
    /// `overlap::probe_overlap`.
    Overlap,
    /// `overlap::probe_zero_copy`.
    ZeroCopy,
    /// `Worker::probe_cuda` (`cuda_probe.rs`), on this shape; the size is batches.
    Cuda(Conv2dParams),
}

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
    /// Weight and bias sets of recent synchronous calls as shared buffers, by key (see
    /// [`GpuBackend::shared_weights`]), most recently used last.
    sets: Mutex<Vec<(WeightsKey, Arc<[f32]>)>>,
    worker: Option<JoinHandle<()>>,
}

/// A weight set shared with the jobs that use it, and its key.
#[derive(Clone)]
pub(crate) struct SharedWeights {
    pub(crate) data: Arc<[f32]>,
    pub(crate) key: WeightsKey,
}

impl SharedWeights {
    /// `data`, keyed (a hash of every byte).
    pub(crate) fn new(data: Arc<[f32]>) -> Self {
        Self {
            key: WeightsKey::of(&data),
            data,
        }
    }
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

/// Shared weight and bias sets a backend keeps: at most this many ...
const SETS_MAX: usize = 16;
/// ... and this many bytes (the oldest go first; the newest always stays).
const SETS_BYTES: usize = 256 << 20;

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
                sets: Mutex::default(),
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
        let mut done = (call.answer.recv())
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
    /// copies the input in (the convolution is the first phase that needs them), the weights
    /// found among the kept shared sets by content (length and a hash of every byte) and sent
    /// after it. The caller's lengths must have been checked.
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
        let bias = bias.map(|b| self.shared_bias(b));
        let (send_weights, weights_later) = mpsc::sync_channel(1);
        let answer = self.stream(
            p,
            StreamInput::Pinned(read.clone()),
            JobWeights::Later(weights_later),
            bias.clone(),
            false,
            timeout,
        )?;
        let weights = self.shared_weights(weights);
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
        executor::parallel_copy(input, staged.as_mut_slice()?);
        Ok(StagedInput {
            input: staged,
            host_in_s: t.elapsed().as_secs_f64(),
        })
    }

    /// `weights` as a shared buffer kept by content (length and a hash of every byte, the key
    /// resident weights are found by): the kept one with its key, else a copy, kept.
    fn shared_weights(&self, weights: &[f32]) -> SharedWeights {
        let (key, data) = self.shared_set(weights);
        SharedWeights { data, key }
    }

    /// `bias` as a shared buffer kept by content (see [`GpuBackend::shared_weights`]).
    fn shared_bias(&self, bias: &[f32]) -> Arc<[f32]> {
        self.shared_set(bias).1
    }

    /// `v` as a shared buffer: the kept one with the same key, or a new one, kept.
    fn shared_set(&self, v: &[f32]) -> (WeightsKey, Arc<[f32]>) {
        let key = WeightsKey::of(v);
        let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
        let set = match sets.iter().position(|(k, _)| *k == key) {
            Some(i) => sets.remove(i).1,
            None => v.into(),
        };
        sets.push((key, Arc::clone(&set)));
        let bytes = |sets: &[(WeightsKey, Arc<[f32]>)]| -> usize {
            sets.iter().map(|(_, s)| s.len() * 4).sum()
        };
        while sets.len() > 1 && (sets.len() > SETS_MAX || bytes(&sets) > SETS_BYTES) {
            sets.remove(0);
        }
        (key, set)
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

    /// A pinned input buffer of `len` floats (see [`crate::pinned`]).
    pub(crate) fn pin(&self, len: usize) -> Result<crate::pinned::PinnedShared> {
        let (id, ptr) = self.ask("pinning an input", |reply| Msg::Pin(len, reply))?;
        Ok(executor::pinned_shared(
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
    /// executor's steps with other jobs ([`FRAMES`] per step); without, it runs alone, each phase
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
                JobWeights::Later(_) => p.weights_len(),
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

/// One resident weight set, laid out for one algorithm.
struct Resident {
    key: WeightsKey,
    algorithm: Algorithm,
    buffer: Buffer,
    last_used: u64,
}

/// The thread that owns the context, and what it keeps between jobs.
struct Worker {
    // Field order is drop order: every GL object before the context.
    /// The executor's frames, and the slots in flight, oldest first.
    frames: Vec<Frame>,
    /// Pinned input buffers by id, and the channel their last holders free them on.
    pinned: std::collections::HashMap<u64, memory::HostMem>,
    next_pin: u64,
    unpin_rx: mpsc::Receiver<u64>,
    /// The backend's id, which its pinned inputs carry.
    backend_id: u64,
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
    last_step: Option<std::rc::Rc<gl::Fence>>,
    /// Since when the GPU has been seen idle with steps still to record.
    idle_since: Option<Instant>,
    /// The job whose input the copy thread is writing into its staging.
    filling: Option<executor::Filling>,
    /// The thread that copies inputs into staging.
    copy_thread: host_copy::CopyThread,
    /// How the executor's steps copy between staging and device buffers.
    copy_mode: shaders::StreamCopy,
    /// Parts of a job's batch wanted by `SPORKLE_STREAM_PARTS` (`Worker::parts_for`).
    stream_parts: Option<usize>,
    programs: ProgramCache,
    /// Plans made, by what they were made from.
    plans: std::collections::HashMap<PlanKey, Rc<Plan>>,
    weights: Vec<Resident>,
    input: Option<Buffer>,
    output: Option<Buffer>,
    bias: Option<Buffer>,
    /// Intermediates: split-K partial outputs, or Winograd's transformed input and products.
    scratch: [Option<Buffer>; 2],
    clock: u64,
    /// The copy-in start event of the last job finished with CUDA copies, and its time (ns) on
    /// the executor's CUDA clock (`Worker::cuda_span`).
    cuda_clock: Option<(std::rc::Rc<cu::Event>, i64)>,
    /// CUDA copies, once opened (`copy_mode`); after every buffer they made, before the context.
    cuda: Option<cu::CudaCopies>,
    /// Buffers get immutable storage (GL_ARB_buffer_storage), which the driver keeps on the GPU.
    immutable: bool,
    /// How long the synchronous path waits for a fence (`GpuBackend::set_fence_timeout`).
    sync_timeout: Duration,
    ctx: GlContext,
}

impl Worker {
    fn new(ctx: GlContext, backend_id: u64, unpin_rx: mpsc::Receiver<u64>) -> Self {
        let (release_tx, release_rx) = mpsc::channel();
        Self {
            frames: (0..Self::slots()).map(|_| Frame::default()).collect(),
            pinned: std::collections::HashMap::new(),
            next_pin: 0,
            unpin_rx,
            backend_id,
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
            copy_mode: shaders::StreamCopy::from_env(),
            stream_parts: executor::parts_from_env(),
            cuda_clock: None,
            programs: ProgramCache::default(),
            plans: std::collections::HashMap::new(),
            weights: Vec::new(),
            input: None,
            output: None,
            bias: None,
            scratch: [None, None],
            clock: 0,
            cuda: None,
            sync_timeout: FENCE_TIMEOUT,
            immutable: ctx
                .info
                .extensions
                .iter()
                .any(|&(e, present)| e == "GL_ARB_buffer_storage" && present),
            ctx,
        }
    }

    /// Answers messages until the backend is dropped.
    ///
    /// Streaming jobs go through the executor's steps: each new job records a step (its copy in,
    /// the previous job's convolution, the one before's copy out). Between jobs the worker
    /// answers finished jobs in order; it records a step without a new job (to move the others
    /// on) only when the GPU has finished every step so far (with CUDA copies: what the step
    /// waits for), or when a job waits for a frame, so that a steady stream's phases share steps;
    /// with CUDA copies, a copy out that could start while the next convolution could not goes
    /// at once, alone.
    fn serve(mut self, jobs: mpsc::Receiver<Msg>) {
        let mut pending: Option<Msg> = None;
        let mut open = true;
        loop {
            self.take_releases();
            if self.take_filled(Duration::ZERO) {
                continue;
            }
            if self.oldest_ready() {
                self.stream_finish_oldest();
                continue;
            }
            if pending.is_none() && open {
                pending = if self.frames_busy() == 0 && self.filling.is_none() {
                    match jobs.recv() {
                        Ok(msg) => Some(msg),
                        Err(_) => break,
                    }
                } else {
                    match jobs.try_recv() {
                        Ok(msg) => Some(msg),
                        Err(mpsc::TryRecvError::Empty) => None,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            open = false;
                            None
                        }
                    }
                };
            }
            if !open && pending.is_none() {
                break;
            }
            match pending.take() {
                Some(Msg::Stream(job)) if job.pipelined => {
                    if self.frame_free() {
                        self.stream_begin(job);
                        continue;
                    }
                    pending = Some(Msg::Stream(job));
                }
                Some(msg) => {
                    self.serve_one(msg);
                    continue;
                }
                None => {}
            }
            // Nothing can start now. A step without a new job moves the others on, but shares
            // nothing new: it is recorded once the GPU is idle, and when a job is about to join
            // (and would share the step) only once it has been idle for a while.
            let poll = Duration::from_micros(50);
            // A job about to join: one whose input is being copied in, or one waiting for a
            // frame that a caller is about to give back.
            let joining = self.filling.is_some() || (pending.is_some() && !self.frame_free());
            let grace = if joining {
                executor::IDLE_GRACE
            } else {
                Duration::ZERO
            };
            if self.steps_pending() && self.gpu_idle() && self.gpu_idle_for() >= grace {
                self.step_or_fail();
            } else if self.step_copy_out_early() || self.wait_oldest(poll) || self.take_filled(poll)
            {
                // A copy out started early, or something was waited for: look again.
            } else if pending.is_some() {
                // Every frame is read by a caller or in flight: wait for one to come back.
                self.wait_release(poll);
            } else if open {
                match jobs.recv_timeout(poll) {
                    Ok(msg) => pending = Some(msg),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
                }
            }
        }
        self.stream_drain();
        if let Some(c) = &self.cuda {
            // Jobs failed in flight may have left copies running into their frames.
            c.finish();
        }
        // Callers may still be reading staging buffers: the frames outlive every view.
        self.wait_all_releases();
        self.take_releases();
        if !self.pinned.is_empty() {
            // Tickets that outlived the Juggler still hold pinned inputs (for a CPU re-run):
            // their mappings must stay valid, so the context and its objects are left alive.
            eprintln!(
                "sporkle: {} pinned input(s) outlived the GPU backend; its GL context is left \
                 alive so that they stay valid",
                self.pinned.len()
            );
            std::mem::forget(self);
        }
    }

    /// Handles a message other than a pipelined streaming job. Each runs with no streaming job
    /// in flight, but a pin request: a new buffer touches nothing in flight.
    fn serve_one(&mut self, msg: Msg) {
        // Questions that dispatch nothing of a job's need not wait for the stream.
        if !matches!(msg, Msg::Pin(..) | Msg::Plan(..)) {
            self.stream_drain();
        }
        match msg {
            Msg::Call(job) => {
                let result = self.conv2d(
                    &job.p,
                    &job.x,
                    &job.w,
                    job.key,
                    job.b.as_deref(),
                    job.dispatches,
                );
                let _ = job.reply.send(result);
            }
            Msg::Calibrate(reply) => {
                let _ = reply.send(self.calibrate());
            }
            Msg::Pin(len, reply) => {
                let _ = reply.send(self.pin(len));
            }
            Msg::Plan(p, bias, algorithm, reply) => {
                let lens = (p.input_len(), p.weights_len());
                let forced = Dispatches {
                    algorithm,
                    ..Dispatches::ONE
                };
                let plan = self.plan(&p, lens, bias, &forced);
                let _ = reply.send(plan.map(|plan| PlanInfo {
                    algorithm: plan.algorithm,
                    tile: plan.tile,
                    passes: plan.passes.len(),
                }));
            }
            Msg::SyncTimeout(timeout, reply) => {
                self.sync_timeout = timeout;
                let _ = reply.send(Ok(()));
            }
            Msg::FenceFault(on, reply) => {
                gl::set_fences_never_signal(on);
                let _ = reply.send(Ok(()));
            }
            Msg::Arithmetic(reply) => {
                let gl = Rc::clone(&self.ctx.gl);
                let _ = reply.send(arithmetic::probe(
                    &gl,
                    &mut self.programs,
                    self.immutable,
                    FENCE_TIMEOUT,
                ));
            }
            #[cfg(feature = "probes")]
            Msg::Probe(probe, floats, reply) => {
                let _ = reply.send(match probe {
                    Probe::Staging => executor::probe_staging(&self.ctx.gl, floats),
                    Probe::Overlap => overlap::probe_overlap(&self.ctx, floats),
                    Probe::ZeroCopy => overlap::probe_zero_copy(&self.ctx, floats),
                    Probe::Cuda(p) => self.probe_cuda(&p, floats),
                });
            }
            Msg::Stream(job) => {
                // Synchronous mode: the job alone, its copy in, convolution and copy out each
                // a step of its own (so their times are its own). Frames that callers have
                // given back may not have been taken yet.
                self.take_releases();
                while !self.frame_free() {
                    self.wait_release(Duration::from_millis(100));
                }
                self.stream_begin(job);
                self.stream_drain();
            }
        }
    }

    /// A scratch buffer of at least `len` floats (grown, never shrunk).
    fn scratch(
        gl: &std::rc::Rc<glow::Context>,
        slot: &mut Option<Buffer>,
        len: usize,
        immutable: bool,
    ) -> Result<()> {
        gl::ensure_len(slot, len, || Buffer::new(gl, len, immutable))
    }

    /// Index of the resident copy of `w` for `algorithm`, uploading (and evicting) as needed.
    /// Resident weights are transposed to `[group][tap][filter]`, so the shaders read them
    /// coalesced; Winograd's are transformed first (they are its GEMM's weights).
    fn resident(
        &mut self,
        p: &Conv2dParams,
        key: WeightsKey,
        w: &[f32],
        algorithm: Algorithm,
    ) -> Result<(usize, bool)> {
        self.clock += 1;
        if let Some(i) = self
            .weights
            .iter()
            .position(|r| r.key == key && r.algorithm == algorithm)
        {
            self.weights[i].last_used = self.clock;
            return Ok((i, false));
        }
        let (p, w) = match algorithm {
            Algorithm::Direct => (*p, std::borrow::Cow::Borrowed(w)),
            Algorithm::Winograd => (
                crate::winograd::gemm_params(p, WINOGRAD_VARIANT),
                std::borrow::Cow::Owned(crate::winograd::transform_weights(p, w, WINOGRAD_VARIANT)),
            ),
        };
        let bytes = |v: &Vec<Resident>| v.iter().map(|r| r.buffer.len() * 4).sum::<usize>();
        while !self.weights.is_empty() && bytes(&self.weights) + w.len() * 4 > WEIGHTS_BUDGET {
            let lru = (0..self.weights.len())
                .min_by_key(|&i| self.weights[i].last_used)
                .unwrap_or(0);
            self.weights.swap_remove(lru);
        }
        let (mg, kdim) = (p.c_out_per_group(), p.reduction_len());
        let mut transposed = vec![0.0f32; w.len()];
        for (g, (dst, src)) in transposed
            .chunks_exact_mut(mg * kdim)
            .zip(w.chunks_exact(mg * kdim))
            .enumerate()
        {
            debug_assert!(g < p.groups);
            for (m, row) in src.chunks_exact(kdim).enumerate() {
                for (k, &v) in row.iter().enumerate() {
                    dst[k * mg + m] = v;
                }
            }
        }
        let buffer = Buffer::new(&self.ctx.gl, w.len(), self.immutable)?;
        buffer.upload(&transposed)?;
        self.weights.push(Resident {
            key,
            algorithm,
            buffer,
            last_used: self.clock,
        });
        Ok((self.weights.len() - 1, true))
    }

    /// See [`GpuBackend::calibrate`].
    fn calibrate(&mut self) -> Result<Option<f64>> {
        if self.ctx.info.software {
            return Ok(None);
        }
        let (threads, iters, groups) = shaders::CALIBRATE_SHAPE;
        let gl = std::rc::Rc::clone(&self.ctx.gl);
        let out = Buffer::new(&gl, (threads * groups) as usize, self.immutable)?;
        out.bind(3);
        let program = self.programs.get(&gl, &shaders::calibrate_source())?;
        let flops = 2.0 * 32.0 * f64::from(iters) * f64::from(threads) * f64::from(groups);
        let mut best: f64 = 0.0;
        // A warm-up dispatch, then three timed ones.
        for round in 0..4 {
            let query = TimerQuery::begin(&gl)?;
            let dispatched = program.dispatch([groups, 1, 1]);
            query.end();
            dispatched?;
            let fence = Fence::new(&gl)?;
            fence.wait(FENCE_TIMEOUT)?;
            let ns = query.nanoseconds().max(1);
            if round > 0 {
                best = best.max(flops / ns as f64);
            }
        }
        Ok(Some(best))
    }

    /// The plan of a convolution ([`Worker::make_plan`]), made once per shape and kept: making
    /// one writes its shaders' sources, which cost a stream step more host time than the rest of
    /// it (about 50 to 100 µs).
    fn plan(
        &mut self,
        p: &Conv2dParams,
        lens: (usize, usize),
        bias: bool,
        dispatches: &Dispatches,
    ) -> Result<Rc<Plan>> {
        let key = PlanKey {
            p: *p,
            lens,
            bias,
            tile: dispatches.tile,
            algorithm: dispatches.algorithm,
        };
        if let Some(plan) = self.plans.get(&key) {
            return Ok(Rc::clone(plan));
        }
        let plan = Rc::new(self.make_plan(p, lens, bias, dispatches)?);
        if self.plans.len() >= PLANS_KEPT {
            // Many shapes: start again rather than grow without bound (the programs stay).
            self.plans.clear();
        }
        self.plans.insert(key, Rc::clone(&plan));
        Ok(plan)
    }

    /// Checks `p` against the GL limits, chooses its algorithm and tile, and compiles its
    /// programs. Winograd falls back to the direct algorithm where its intermediates would not
    /// fit a storage buffer.
    fn make_plan(
        &mut self,
        p: &Conv2dParams,
        lens: (usize, usize),
        bias: bool,
        dispatches: &Dispatches,
    ) -> Result<Plan> {
        let (x_len, w_len) = lens;
        let max_block = self.ctx.info.max_storage_block;
        let algorithm = match dispatches.algorithm {
            Some(Algorithm::Winograd) => {
                crate::winograd::check_applies(p)?;
                Algorithm::Winograd
            }
            Some(a) => a,
            None => Algorithm::for_params(p),
        };
        // Winograd's intermediates (transformed input, products), where they fit a buffer.
        let winograd_sizes = (algorithm == Algorithm::Winograd)
            .then(|| {
                let per_channel =
                    WINOGRAD_VARIANT.xi() * crate::winograd::positions(p, WINOGRAD_VARIANT);
                [per_channel * p.c_in, per_channel * p.c_out]
            })
            .filter(|sizes| sizes.iter().all(|&len| len as i64 * 4 <= max_block));
        let winograd = winograd_sizes.is_some();
        // The convolution (or Winograd's GEMM) that the tiled or narrow kernel runs.
        let (conv_p, conv_bias) = if winograd {
            (crate::winograd::gemm_params(p, WINOGRAD_VARIANT), false)
        } else {
            (*p, bias)
        };
        let mut tile = dispatches
            .tile
            .map_or_else(|| Tile::for_params(&conv_p), |t| t.resolved(&conv_p));
        if winograd {
            // Its output is the transform's input: no split-K (its partials would need a
            // third intermediate).
            tile.split = 1;
        }
        let info = &self.ctx.info;
        let groups = tile.groups(&conv_p);
        for (axis, (&n, &max)) in groups.iter().zip(&info.max_groups).enumerate() {
            if n > max as u64 {
                return Err(Error::GpuLimit(format!(
                    "{n} workgroups on axis {axis} exceed the GL limit of {max} for {p}"
                )));
            }
        }
        let split = tile.split.max(1) as usize;
        let out_len = p.output_len();
        let scratch = match winograd_sizes {
            Some(sizes) => sizes,
            None if split > 1 => [out_len * split, 0],
            None => [0, 0],
        };
        let biggest = x_len
            .max(w_len)
            .max(out_len)
            .max(scratch[0])
            .max(scratch[1]) as i64
            * 4;
        if biggest > max_block {
            return Err(Error::GpuLimit(format!(
                "a buffer of {biggest} bytes exceeds GL_MAX_SHADER_STORAGE_BLOCK_SIZE ({max_block})"
            )));
        }
        // The one-dimensional passes (reduction, transforms): a grid-stride loop over their
        // elements, with at most the GL limit of workgroups.
        let line = |elements: usize| {
            (elements as u64)
                .div_ceil(u64::from(shaders::REDUCE_THREADS))
                .min(info.max_groups[0].max(1) as u64) as u32
        };
        let conv = Pass {
            source: shaders::conv2d_source(&conv_p, tile, conv_bias),
            groups: groups.map(|g| g as u32),
        };
        let passes = match winograd_sizes {
            Some([transformed, products]) => {
                let (input, output) = shaders::winograd_sources(p, bias);
                let xi = WINOGRAD_VARIANT.xi();
                vec![
                    Pass {
                        source: input,
                        groups: [line(transformed / xi), 1, 1],
                    },
                    conv,
                    Pass {
                        source: output,
                        groups: [line(products / xi), 1, 1],
                    },
                ]
            }
            None if split > 1 => vec![
                conv,
                Pass {
                    source: shaders::reduce_source(p, tile.split, bias),
                    groups: [line(out_len), 1, 1],
                },
            ],
            None => vec![conv],
        };
        let gl = std::rc::Rc::clone(&self.ctx.gl);
        for pass in &passes {
            self.programs.get(&gl, &pass.source)?;
        }
        Ok(Plan {
            algorithm: if winograd {
                Algorithm::Winograd
            } else {
                Algorithm::Direct
            },
            tile,
            out_len,
            passes,
            scratch,
        })
    }

    /// Allocates `plan`'s intermediates in `slots` (grown, never shrunk).
    fn scratch_for(
        gl: &std::rc::Rc<glow::Context>,
        slots: &mut [Option<Buffer>; 2],
        plan: &Plan,
        immutable: bool,
    ) -> Result<()> {
        for (slot, &len) in slots.iter_mut().zip(&plan.scratch) {
            if len > 0 {
                Self::scratch(gl, slot, len, immutable)?;
            }
        }
        Ok(())
    }

    /// Records one whole convolution: every pass of `plan` in order, with barriers between
    /// them; pass `i` reads the input (first) or intermediate `i - 1`, and writes intermediate
    /// `i` or the output (last).
    ///
    /// With `fused` (a one-pass plan in a streaming step), the pass runs as the convolution fused
    /// with the step's copies: that program, its copying layers of workgroups in front.
    fn encode(
        &self,
        plan: &Plan,
        b: &Bindings,
        fused: Option<&executor::FusedPass<'_>>,
    ) -> Result<()> {
        let gl = &self.ctx.gl;
        let scratch = |i: usize| {
            (b.scratch.get(i).copied().flatten())
                .ok_or_else(|| Error::Gpu("an intermediate buffer is missing".into()))
        };
        if fused.is_some() && plan.passes.len() != 1 {
            return Err(Error::Gpu(
                "copies fused into a plan of several passes (executor bug)".into(),
            ));
        }
        b.weights.bind(1);
        b.bias.bind(2);
        let last = plan.passes.len().saturating_sub(1);
        for (i, pass) in plan.passes.iter().enumerate() {
            if i > 0 {
                gl::storage_barrier(gl);
            }
            // The first pass reads the input, the last writes the output: the part's floats of
            // them where the batch runs in parts.
            match (i, &b.part) {
                (0, Some((input, _))) => b.input.bind_range(0, input.start, input.len())?,
                (0, None) => b.input.bind(0),
                _ => scratch(i - 1)?.bind(0),
            }
            match (i == last, &b.part) {
                (true, Some((_, output))) => b.output.bind_range(3, output.start, output.len())?,
                (true, None) => b.output.bind(3),
                _ => scratch(i)?.bind(3),
            }
            match fused {
                Some(f) if i == 0 => {
                    let [gx, gy, gz] = pass.groups;
                    self.compiled(f.source)?.dispatch_with(
                        [gx, gy, gz + f.copy_z],
                        "copies",
                        f.copies,
                    )?;
                }
                _ => self.compiled(&pass.source)?.dispatch(pass.groups)?,
            }
        }
        Ok(())
    }

    /// The compiled program for `source` (compiled when the plan was made).
    fn compiled(&self, source: &str) -> Result<&gl::Program> {
        self.programs
            .peek(source)
            .ok_or_else(|| Error::Gpu("program missing from the cache".into()))
    }

    fn conv2d(
        &mut self,
        p: &Conv2dParams,
        x: &[f32],
        w: &[f32],
        key: WeightsKey,
        b: Option<&[f32]>,
        dispatches: Dispatches,
    ) -> JobResult {
        let plan = self.plan(p, (x.len(), w.len()), b.is_some(), &dispatches)?;
        let gl = std::rc::Rc::clone(&self.ctx.gl);
        let t0 = Instant::now();
        let immutable = self.immutable;
        Self::scratch(&gl, &mut self.input, x.len(), immutable)?;
        Self::scratch(&gl, &mut self.output, plan.out_len, immutable)?;
        Self::scratch(&gl, &mut self.bias, p.c_out, immutable)?;
        Self::scratch_for(&gl, &mut self.scratch, &plan, immutable)?;
        let input = self.input.as_ref().expect("allocated above");
        input.upload(x)?;
        if let (Some(b), Some(buf)) = (b, self.bias.as_ref()) {
            buf.upload(b)?;
        }
        let (wi, weights_uploaded) = self.resident(p, key, w, plan.algorithm)?;
        let upload_s = t0.elapsed().as_secs_f64();
        let output = self.output.as_ref().expect("allocated above");
        let bindings = Bindings {
            input: self.input.as_ref().expect("allocated above"),
            weights: &self.weights[wi].buffer,
            bias: self.bias.as_ref().expect("allocated above"),
            output,
            scratch: [self.scratch[0].as_ref(), self.scratch[1].as_ref()],
            part: None,
        };
        for _ in 0..dispatches.warmup {
            self.encode(&plan, &bindings, None)?;
            gl::storage_barrier(&gl);
        }
        let mut queries = Vec::with_capacity(dispatches.timed);
        for _ in 0..dispatches.timed {
            let query = TimerQuery::begin(&gl)?;
            let encoded = self.encode(&plan, &bindings, None);
            query.end();
            queries.push(query);
            encoded?;
            gl::storage_barrier(&gl);
        }
        let fence = Fence::new(&gl)?;
        fence.wait(self.sync_timeout)?;
        let t1 = Instant::now();
        let mut y = vec![0.0f32; plan.out_len];
        output.download(&mut y)?;
        let download_s = t1.elapsed().as_secs_f64();
        let times: Vec<u64> = if self.ctx.info.software {
            Vec::new()
        } else {
            queries.iter().map(TimerQuery::nanoseconds).collect()
        };
        let kernel_ns = times.last().copied();
        Ok((
            y,
            GpuRun {
                kernel_ns,
                upload_s,
                download_s,
                weights_uploaded,
            },
            times,
        ))
    }
}

/// What a plan is made from (see [`Worker::plan`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    p: Conv2dParams,
    /// Floats of the input and the weights.
    lens: (usize, usize),
    bias: bool,
    tile: Option<Tile>,
    algorithm: Option<Algorithm>,
}

/// Plans kept at most ([`Worker::plan`]).
const PLANS_KEPT: usize = 256;

/// A convolution checked against the limits, its programs compiled.
struct Plan {
    /// What runs (Winograd only where its intermediates fit).
    algorithm: Algorithm,
    /// The convolution's tile (Winograd's GEMM's), its split chosen: a plan for part of the
    /// batch made with this tile and algorithm sums every output in the same order.
    tile: Tile,
    out_len: usize,
    /// The passes in order, each reading what the one before wrote: the convolution alone;
    /// split-K's slices into intermediate 0, then their reduction; or Winograd's input
    /// transform into intermediate 0, its GEMM into intermediate 1, its output transform.
    passes: Vec<Pass>,
    /// Floats of the two intermediate buffers (0: not needed).
    scratch: [usize; 2],
}

/// What a plan runs, for callers: with the arithmetic class, what fixes a result's bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanInfo {
    /// The algorithm that runs (Winograd falls back to direct where it does not fit).
    pub algorithm: Algorithm,
    /// The convolution's tile (Winograd's GEMM's), its split chosen.
    pub tile: Tile,
    /// Dispatches in order (the convolution; split-K's reduction; Winograd's transforms).
    pub passes: usize,
}

impl PlanInfo {
    /// A name for keys: `direct-tiled-64x64x16-4x4-split1-passes1`.
    pub fn key(&self) -> String {
        let t = self.tile;
        let algorithm = match self.algorithm {
            Algorithm::Direct => "direct",
            Algorithm::Winograd => "winograd",
        };
        let kernel = match t.kernel {
            shaders::Kernel::Tiled => "tiled",
            shaders::Kernel::Narrow => "narrow",
        };
        format!(
            "{algorithm}-{kernel}-{}x{}x{}-{}x{}-split{}-passes{}",
            t.bm, t.bn, t.bk, t.tm, t.tn, t.split, self.passes
        )
    }
}

/// One compute dispatch of a plan.
struct Pass {
    /// The specialised source (the program cache's key).
    source: String,
    /// Workgroups.
    groups: [u32; 3],
}

/// The buffers one convolution reads and writes.
struct Bindings<'a> {
    input: &'a Buffer,
    weights: &'a Buffer,
    bias: &'a Buffer,
    output: &'a Buffer,
    /// The plan's intermediates.
    scratch: [Option<&'a Buffer>; 2],
    /// Where the batch runs in parts along n (the executor's): the floats of this part in the
    /// input and in the output (else the whole buffers).
    part: Option<(std::ops::Range<usize>, std::ops::Range<usize>)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Identification is exact: a change to any one element (its lowest bit) changes the key.
    #[test]
    fn every_single_element_change_changes_the_weights_key() {
        let mut w = vec![0.0f32; 1000];
        crate::data::fill_uniform(5, &mut w);
        let base = WeightsKey::of(&w);
        for i in 0..w.len() {
            let old = w[i];
            w[i] = f32::from_bits(old.to_bits() ^ 1);
            assert_ne!(WeightsKey::of(&w), base, "element {i}");
            w[i] = old;
        }
        assert_eq!(WeightsKey::of(&w), base);
        assert_ne!(WeightsKey::of(&w[..999]), base, "length is part of the key");
    }
}
