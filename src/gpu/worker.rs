//! The GPU worker: the thread that owns the GL context, its loop and its messages.
//!
//! Callers on any thread send [`Msg`]s (through [`super::GpuBackend`]); the worker answers each
//! on its reply channel. Streaming jobs go to the [`Executor`]; the rest (kernel timing,
//! calibration, plans, pins, probes) the worker answers itself, each with no streaming job in
//! flight but pins and plans. What outlives a job (plans, compiled programs, resident weights)
//! is the worker's [`Resources`], lent to the executor's calls.

#![forbid(unsafe_code)]

use super::arithmetic::{self, Arithmetic};
use super::context::GlContext;
#[cfg(feature = "probes")]
use super::cuda_probe;
use super::executor::{Executor, Resources, IDLE_GRACE};
use super::gl::{self, Buffer, Fence, TimerQuery, FENCE_TIMEOUT};
use super::job::{answer, Output, StreamDone, StreamJob};
#[cfg(feature = "probes")]
use super::overlap;
use super::plan::{scratch, scratch_for, Algorithm, Bindings, Dispatches, PlanInfo, Planner};
use super::resident::{ResidentWeights, WeightsKey};
use super::shaders;
use crate::error::Result;
use crate::params::Conv2dParams;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

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

pub(super) struct Job {
    pub(super) p: Conv2dParams,
    pub(super) x: Vec<f32>,
    pub(super) w: Vec<f32>,
    pub(super) key: WeightsKey,
    pub(super) b: Option<Vec<f32>>,
    pub(super) dispatches: Dispatches,
    pub(super) reply: mpsc::Sender<JobResult>,
}

/// A job's answer: the output, its run, and the per-dispatch kernel times.
type JobResult = Result<(Vec<f32>, GpuRun, Vec<u64>)>;

/// What the worker is asked to do.
pub(super) enum Msg {
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
    /// Nothing but the answer: every message is answered after the pinned inputs dropped
    /// before it was sent have been freed (`GpuBackend::settle`).
    Settle(mpsc::Sender<Result<()>>),
}

/// The diagnostic probes (hidden CLI commands, feature `probes`).
#[cfg(feature = "probes")]
#[derive(Clone, Copy, Debug)]
pub(super) enum Probe {
    /// `executor::probe_staging`.
    Staging,
    /// `overlap::probe_overlap`.
    Overlap,
    /// `overlap::probe_zero_copy`.
    ZeroCopy,
    /// `Worker::probe_cuda` (`cuda_probe.rs`), on this shape; the size is batches.
    Cuda(Conv2dParams),
}

/// The thread that owns the context, and what it keeps between jobs.
pub(super) struct Worker {
    // Field order is drop order: every GL object before the context.
    /// The streaming state.
    exec: Executor,
    /// Plans, programs and resident weights.
    res: Resources,
    /// The kernel-timing path's buffers ([`Worker::conv2d`]): grown, never shrunk.
    input: Option<Buffer>,
    output: Option<Buffer>,
    bias: Option<Buffer>,
    /// Intermediates: split-K partial outputs, or Winograd's transformed input and products.
    scratch: [Option<Buffer>; 2],
    /// Buffers get immutable storage (GL_ARB_buffer_storage), which the driver keeps on the GPU.
    immutable: bool,
    /// How long the synchronous path waits for a fence (`GpuBackend::set_fence_timeout`).
    sync_timeout: Duration,
    ctx: GlContext,
}

impl Worker {
    /// The worker of context `ctx`, for backend `backend_id`, whose pinned inputs' ids come back
    /// on `unpin`.
    pub(super) fn new(ctx: GlContext, backend_id: u64, unpin: mpsc::Receiver<u64>) -> Self {
        let immutable = ctx
            .info
            .extensions
            .iter()
            .any(|&(e, present)| e == "GL_ARB_buffer_storage" && present);
        let gl = Rc::clone(&ctx.gl);
        Self {
            exec: Executor::new(
                Rc::clone(&gl),
                ctx.info.clone(),
                immutable,
                backend_id,
                unpin,
            ),
            res: Resources {
                plans: Planner::new(Rc::clone(&gl), ctx.info.clone()),
                weights: ResidentWeights::new(gl, immutable),
            },
            input: None,
            output: None,
            bias: None,
            scratch: [None, None],
            immutable,
            sync_timeout: FENCE_TIMEOUT,
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
    pub(super) fn serve(mut self, jobs: mpsc::Receiver<Msg>) {
        let mut pending: Option<Msg> = None;
        let mut open = true;
        loop {
            self.exec.take_releases();
            if self.exec.take_filled(&mut self.res, Duration::ZERO) {
                continue;
            }
            if self.exec.oldest_ready() {
                self.exec.stream_finish_oldest(&mut self.res);
                continue;
            }
            if pending.is_none() && open {
                pending = if self.exec.frames_busy() == 0 && !self.exec.filling() {
                    match super::job::recv_soon(&jobs) {
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
                    if self.exec.frame_free() {
                        self.begin(job);
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
            let joining = self.exec.filling() || (pending.is_some() && !self.exec.frame_free());
            let grace = if joining { IDLE_GRACE } else { Duration::ZERO };
            if self.exec.steps_pending()
                && self.exec.gpu_idle()
                && self.exec.gpu_idle_for() >= grace
            {
                self.exec.step_or_fail(&mut self.res);
            } else if self.exec.step_copy_out_early(&mut self.res)
                || self.exec.wait_oldest(poll)
                || self.exec.take_filled(&mut self.res, poll)
            {
                // A copy out started early, or something was waited for: look again.
            } else if pending.is_some() {
                // Every frame is read by a caller or in flight: wait for one to come back.
                self.exec.wait_release(poll);
            } else if open {
                match jobs.recv_timeout(poll) {
                    Ok(msg) => pending = Some(msg),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
                }
            }
        }
        self.exec.stream_drain(&mut self.res);
        if let Some(c) = self.exec.cuda() {
            // Jobs failed in flight may have left copies running into their frames.
            c.finish();
        }
        // Callers may still be reading staging buffers: the frames outlive every view.
        self.exec.wait_all_releases();
        self.exec.take_releases();
        if self.exec.pinned_held() > 0 {
            // Tickets that outlived the Juggler still hold pinned inputs (for a CPU re-run):
            // their mappings must stay valid, so the context and its objects are left alive.
            eprintln!(
                "sporkle: {} pinned input(s) outlived the GPU backend; its GL context is left \
                 alive so that they stay valid",
                self.exec.pinned_held()
            );
            std::mem::forget(self);
        }
    }

    /// Handles a message other than a pipelined streaming job. Each runs with no streaming job
    /// in flight, but a pin request: a new buffer touches nothing in flight.
    fn serve_one(&mut self, msg: Msg) {
        // Pinned inputs dropped while the worker waited for this message are freed first.
        self.exec.take_releases();
        // Questions that dispatch nothing of a job's need not wait for the stream.
        if !matches!(msg, Msg::Pin(..) | Msg::Plan(..) | Msg::Settle(..)) {
            self.exec.stream_drain(&mut self.res);
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
                let pinned = (self.exec.open_cuda(&self.ctx)).and_then(|()| self.exec.pin(len));
                let _ = reply.send(pinned);
            }
            Msg::Plan(p, bias, algorithm, reply) => {
                let lens = (p.input_len(), p.weights_len());
                let forced = Dispatches {
                    algorithm,
                    ..Dispatches::ONE
                };
                let plan = self.res.plans.plan(&p, lens, bias, &forced);
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
            Msg::Settle(reply) => {
                let _ = reply.send(Ok(()));
            }
            Msg::Arithmetic(reply) => {
                let gl = Rc::clone(&self.ctx.gl);
                let _ = reply.send(arithmetic::probe(
                    &gl,
                    &mut self.res.plans.programs,
                    self.immutable,
                    FENCE_TIMEOUT,
                ));
            }
            #[cfg(feature = "probes")]
            Msg::Probe(probe, floats, reply) => {
                let _ = reply.send(match probe {
                    Probe::Staging => overlap::probe_staging(&self.ctx.gl, floats),
                    Probe::Overlap => overlap::probe_overlap(&self.ctx, floats),
                    Probe::ZeroCopy => overlap::probe_zero_copy(&self.ctx, floats),
                    Probe::Cuda(p) => self.probe_cuda(&p, floats),
                });
            }
            Msg::Stream(job) => {
                // Synchronous mode: the job alone, its copy in, convolution and copy out each
                // a step of its own (so their times are its own). Frames that callers have
                // given back may not have been taken yet.
                self.exec.take_releases();
                while !self.exec.frame_free() {
                    self.exec.wait_release(Duration::from_millis(100));
                }
                self.begin(job);
                self.exec.stream_drain(&mut self.res);
            }
        }
    }

    /// Starts a streaming job: on the executor (its CUDA copies opened first, where chosen), or
    /// without `GL_ARB_buffer_storage` (no persistent mapping) on the plain path.
    fn begin(&mut self, mut job: StreamJob) {
        if !self.immutable {
            let result = (job.w.get().cloned())
                .and_then(|w| {
                    self.conv2d(
                        &job.p,
                        job.x.as_slice(),
                        &w.data,
                        w.key,
                        job.b.as_deref(),
                        Dispatches::ONE,
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
        if let Err(e) = self.exec.open_cuda(&self.ctx) {
            answer(job, Err(e));
            return;
        }
        self.exec.stream_begin(&mut self.res, job);
    }

    /// See [`super::GpuBackend::calibrate`].
    fn calibrate(&mut self) -> Result<Option<f64>> {
        if self.ctx.info.software {
            return Ok(None);
        }
        let (threads, iters, groups) = shaders::CALIBRATE_SHAPE;
        let gl = std::rc::Rc::clone(&self.ctx.gl);
        let out = Buffer::new(&gl, (threads * groups) as usize, self.immutable)?;
        out.bind(3);
        let program = self.res.plans.program(&shaders::calibrate_source())?;
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

    fn conv2d(
        &mut self,
        p: &Conv2dParams,
        x: &[f32],
        w: &[f32],
        key: WeightsKey,
        b: Option<&[f32]>,
        dispatches: Dispatches,
    ) -> JobResult {
        let plan = self
            .res
            .plans
            .plan(p, (x.len(), w.len()), b.is_some(), &dispatches)?;
        let gl = std::rc::Rc::clone(&self.ctx.gl);
        let t0 = Instant::now();
        let immutable = self.immutable;
        scratch(&gl, &mut self.input, x.len(), immutable)?;
        scratch(&gl, &mut self.output, plan.out_len, immutable)?;
        scratch(&gl, &mut self.bias, p.c_out, immutable)?;
        scratch_for(&gl, &mut self.scratch, &plan, immutable)?;
        let input = self.input.as_ref().expect("allocated above");
        input.upload(x)?;
        if let (Some(b), Some(buf)) = (b, self.bias.as_ref()) {
            buf.upload(b)?;
        }
        let (wi, weights_uploaded) = self.res.weights.get(p, key, w, plan.algorithm)?;
        let upload_s = t0.elapsed().as_secs_f64();
        let output = self.output.as_ref().expect("allocated above");
        let bindings = Bindings {
            input: self.input.as_ref().expect("allocated above"),
            weights: self.res.weights.buffer(wi),
            bias: self.bias.as_ref().expect("allocated above"),
            output,
            scratch: [self.scratch[0].as_ref(), self.scratch[1].as_ref()],
            part: None,
        };
        for _ in 0..dispatches.warmup {
            self.res.plans.encode(&plan, &bindings, None)?;
            gl::storage_barrier(&gl);
        }
        let mut queries = Vec::with_capacity(dispatches.timed);
        for _ in 0..dispatches.timed {
            let query = TimerQuery::begin(&gl)?;
            let encoded = self.res.plans.encode(&plan, &bindings, None);
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

    /// The CUDA streaming probe (`cuda_probe.rs`) on shape `p`, its outputs checked against
    /// this worker's kernel-timing path.
    #[cfg(feature = "probes")]
    fn probe_cuda(&mut self, p: &Conv2dParams, batches: usize) -> Result<String> {
        let data = cuda_probe::data(p);
        let key = WeightsKey::of(&data.0);
        let expected = (data.1.iter())
            .map(|x| Ok(self.conv2d(p, x, &data.0, key, None, Dispatches::ONE)?.0))
            .collect::<Result<Vec<_>>>()?;
        cuda_probe::probe_cuda(&self.ctx, &mut self.res, p, batches, &data, &expected)
    }
}
