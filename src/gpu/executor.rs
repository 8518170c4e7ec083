//! The async executor: streaming convolutions through [`FRAMES`] frames in flight.
//!
//! It runs on the GPU worker thread, which owns the context. Each frame owns its buffers: an
//! upload staging buffer and a download staging buffer (host memory, persistently and
//! coherently mapped, `GL_ARB_buffer_storage`), and device buffers for input, output, bias and
//! split-K partial sums. A job in a frame goes:
//!
//! 1. host: the input is copied into the frame's upload staging (in parallel chunks: one thread
//!    writes a mapping at only ~5 GB/s on the H100 machine);
//! 2. GPU: DMA copy staging → device input (`glCopyBufferSubData`), the convolution, DMA copy
//!    device output → download staging, each between its own timer query; then a fence;
//! 3. host, once the fence has passed: the caller's thread reads the output straight out of the
//!    download staging ([`Staged`], in parallel chunks, into the caller's buffer) and releases
//!    the frame; the worker reuses a frame only after that release, and waits for every release
//!    before it deletes the buffers.
//!
//! While one frame's work runs on the GPU, the worker fills the next frame's staging, so host
//! copies overlap GPU work. Whether the GPU's own work for different frames overlaps (one
//! context: one queue) is measured, not assumed: each job's GPU span (timestamps before its
//! upload copy and after its download copy) is reported, and `sporkle bench --stream` sums how
//! much consecutive spans overlap. A frame's buffers are touched by
//! the host only after its fence; a fence that does not pass within the job's timeout fails the
//! job (the caller re-runs it on the CPU) and marks the executor broken: its buffers may still
//! be in use, so every later stream job fails at once with the reason.

use super::gl::{self, Buffer, Direction, Fence, MappedBuffer, MappedView, TimerQuery};
use super::{Bindings, WeightsKey, Worker};
use crate::error::{Error, Result};
use crate::params::Conv2dParams;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Frames in flight: while the GPU computes one, the next is uploaded and the one before it
/// downloaded.
pub const FRAMES: usize = 3;

/// The start of the error of a job whose fence missed its deadline.
pub const FENCE_TIMEOUT: &str = "fence timeout";

/// Copies of at least this many floats are split across threads.
const PARALLEL_COPY_MIN: usize = 1 << 19;

/// A streaming job.
pub(crate) struct StreamJob {
    pub(super) p: Conv2dParams,
    pub(super) x: Arc<[f32]>,
    pub(super) w: Arc<[f32]>,
    pub(super) key: WeightsKey,
    pub(super) b: Option<Arc<[f32]>>,
    /// False: the job runs alone (synchronous mode), with no other frame in flight.
    pub(super) pipelined: bool,
    /// How long its fence may take, from submission to the GPU.
    pub(super) timeout: Duration,
    pub(super) reply: mpsc::Sender<Result<StreamDone>>,
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
    /// GPU time of the upload copy, the convolution and the download copy (timer queries;
    /// `None` on a software renderer, whose timers mean nothing).
    pub upload_ns: Option<u64>,
    /// See `upload_ns`.
    pub kernel_ns: Option<u64>,
    /// See `upload_ns`.
    pub download_ns: Option<u64>,
    /// GPU timestamps (ns) before the job's upload copy and after its download copy (`None` on a
    /// software renderer).
    pub gpu_span_ns: Option<(u64, u64)>,
    /// Wall time of the host copy into staging (the copy out happens in the caller's thread).
    pub host_in_s: f64,
    /// Wall time from the frame's submission to its fence passing.
    pub gpu_wall_s: f64,
    /// GPU busy time of this job: the sum of its timer queries, at most its share of the wall
    /// time during which some job was on the GPU (that share alone on a software renderer), so
    /// jobs in flight together are never counted twice.
    pub busy_s: f64,
    /// Whether the executor had to block on the fence, and for how long.
    pub fence_waited: bool,
    /// See `fence_waited`.
    pub fence_wait_s: f64,
    /// Whether the weights had to be uploaded (false: resident).
    pub weights_uploaded: bool,
    /// Jobs in flight when this one was started, itself included (1: it ran alone).
    pub in_flight: usize,
    /// Bytes copied host → GPU (input, bias, and weights when uploaded) and GPU → host.
    pub bytes_up: u64,
    /// See `bytes_up`.
    pub bytes_down: u64,
}

/// One frame's buffers, and the job in it.
#[derive(Default)]
pub(crate) struct Frame {
    upload: Option<MappedBuffer>,
    download: Option<MappedBuffer>,
    input: Option<Buffer>,
    output: Option<Buffer>,
    bias: Option<Buffer>,
    /// The plan's intermediates (split-K partial sums, Winograd's transforms).
    scratch: [Option<Buffer>; 2],
    flight: Option<Flight>,
}

/// A job on the GPU.
struct Flight {
    job: StreamJob,
    rec: Recorded,
}

/// A job's recorded GPU work.
struct Recorded {
    fence: Fence,
    /// Upload copy, convolution, download copy.
    queries: [TimerQuery; 3],
    /// Before the upload copy, after the download copy.
    span: [TimerQuery; 2],
    out_len: usize,
    begun: Instant,
    done: StreamDone,
}

/// `dst.copy_from_slice(src)`, split across threads when large.
pub fn parallel_copy(src: &[f32], dst: &mut [f32]) {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let threads = *THREADS.get_or_init(|| {
        std::env::var("SPORKLE_COPY_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map_or(1, usize::from)
                    .min(8)
            })
    });
    if src.len() < PARALLEL_COPY_MIN || threads < 2 {
        dst.copy_from_slice(src);
        return;
    }
    let per = src.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (d, c) in dst.chunks_mut(per).zip(src.chunks(per)) {
            s.spawn(move || d.copy_from_slice(c));
        }
    });
}

impl Worker {
    /// Whether a frame is free for a new job (neither in flight nor read by a caller).
    pub(super) fn frame_free(&self) -> bool {
        self.in_flight.len() + self.held.len() < FRAMES
    }

    /// Takes the releases of frames that callers have finished reading.
    pub(super) fn take_releases(&mut self) {
        while let Ok(slot) = self.release_rx.try_recv() {
            self.held.retain(|&h| h != slot);
        }
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

    /// Starts `job` in a free frame; a job that cannot start is answered with the error.
    pub(super) fn stream_begin(&mut self, job: StreamJob) {
        if let Some(why) = &self.broken {
            let why = why.clone();
            let _ = job
                .reply
                .send(Err(Error::Gpu(format!("the GPU is unhealthy: {why}"))));
            return;
        }
        if !self.immutable {
            // No persistent mapping without GL_ARB_buffer_storage: the plain synchronous path.
            let result = self
                .conv2d(
                    &job.p,
                    &job.x,
                    &job.w,
                    job.key,
                    job.b.as_deref(),
                    super::Dispatches::ONE,
                )
                .map(|(output, run, _)| StreamDone {
                    bytes_up: (job.x.len() * 4) as u64,
                    bytes_down: (output.len() * 4) as u64,
                    output: Output::Owned(output),
                    kernel_ns: run.kernel_ns,
                    host_in_s: run.upload_s + run.download_s,
                    weights_uploaded: run.weights_uploaded,
                    ..StreamDone::default()
                });
            let _ = job.reply.send(result);
            return;
        }
        let Some(slot) =
            (0..FRAMES).find(|i| !self.in_flight.contains(i) && !self.held.contains(i))
        else {
            let _ = job
                .reply
                .send(Err(Error::Gpu("no free frame (executor bug)".into())));
            return;
        };
        let mut frame = std::mem::take(&mut self.frames[slot]);
        match self.try_fill(&mut frame, &job) {
            Ok(mut rec) => {
                self.in_flight.push_back(slot);
                rec.done.in_flight = self.in_flight.len();
                frame.flight = Some(Flight { job, rec });
            }
            Err(e) => {
                let _ = job.reply.send(Err(e));
            }
        }
        self.frames[slot] = frame;
    }

    /// Uploads and records `job` in `frame`.
    fn try_fill(&mut self, frame: &mut Frame, job: &StreamJob) -> Result<Recorded> {
        let p = &job.p;
        let plan = self.plan(
            p,
            (job.x.len(), job.w.len()),
            job.b.is_some(),
            &super::Dispatches::ONE,
        )?;
        let gl = Rc::clone(&self.ctx.gl);
        let (x_len, out_len) = (job.x.len(), plan.out_len);
        gl::ensure_len(&mut frame.upload, x_len, || {
            MappedBuffer::new(&gl, x_len, Direction::Upload)
        })?;
        gl::ensure_len(&mut frame.download, out_len, || {
            MappedBuffer::new(&gl, out_len, Direction::Download)
        })?;
        Self::scratch(&gl, &mut frame.input, x_len, true)?;
        Self::scratch(&gl, &mut frame.output, out_len, true)?;
        Self::scratch(&gl, &mut frame.bias, p.c_out, true)?;
        Self::scratch_for(&gl, &mut frame.scratch, &plan, true)?;
        let (upload, download) = (
            frame.upload.as_mut().expect("allocated above"),
            frame.download.as_ref().expect("allocated above"),
        );
        let t = Instant::now();
        parallel_copy(&job.x, &mut upload.as_mut_slice()[..job.x.len()]);
        let host_in_s = t.elapsed().as_secs_f64();
        let bias = frame.bias.as_ref().expect("allocated above");
        let mut bytes_up = (job.x.len() * 4) as u64;
        if let Some(b) = &job.b {
            bias.upload(b)?;
            bytes_up += (b.len() * 4) as u64;
        }
        let (wi, weights_uploaded) = self.resident(p, job.key, &job.w, plan.algorithm)?;
        if weights_uploaded {
            bytes_up += (job.w.len() * 4) as u64;
        }
        let begun = Instant::now();
        let input = frame.input.as_ref().expect("allocated above");
        let output = frame.output.as_ref().expect("allocated above");
        let t_start = TimerQuery::timestamp(&gl)?;
        let q_up = TimerQuery::begin(&gl)?;
        let copied = gl::copy_buffer(&gl, upload.raw(), input.raw(), job.x.len());
        q_up.end();
        copied?;
        let q_conv = TimerQuery::begin(&gl)?;
        let encoded = self.encode(
            &plan,
            &Bindings {
                input,
                weights: &self.weights[wi].buffer,
                bias,
                output,
                scratch: [frame.scratch[0].as_ref(), frame.scratch[1].as_ref()],
            },
        );
        q_conv.end();
        encoded?;
        gl::storage_barrier(&gl);
        let q_down = TimerQuery::begin(&gl)?;
        let copied = gl::copy_buffer(&gl, output.raw(), download.raw(), plan.out_len);
        q_down.end();
        copied?;
        let t_end = TimerQuery::timestamp(&gl)?;
        let fence = Fence::new(&gl)?;
        gl::flush(&gl);
        Ok(Recorded {
            fence,
            queries: [q_up, q_conv, q_down],
            span: [t_start, t_end],
            out_len: plan.out_len,
            begun,
            done: StreamDone {
                host_in_s,
                weights_uploaded,
                bytes_up,
                bytes_down: (plan.out_len * 4) as u64,
                ..StreamDone::default()
            },
        })
    }

    /// Whether the oldest job in flight has finished on the GPU or run out of time (so that
    /// finishing it will not block).
    pub(super) fn oldest_ready(&self) -> bool {
        let Some(&slot) = self.in_flight.front() else {
            return false;
        };
        let Some(flight) = &self.frames[slot].flight else {
            return true;
        };
        flight.rec.fence.signaled().unwrap_or(true)
            || flight.rec.begun.elapsed() >= flight.job.timeout
    }

    /// Waits for the oldest job in flight (within its timeout) and answers it. A fence that
    /// does not pass marks the executor broken and fails every job in flight.
    pub(super) fn stream_finish_oldest(&mut self) {
        let Some(slot) = self.in_flight.pop_front() else {
            return;
        };
        let Some(flight) = self.frames[slot].flight.take() else {
            return;
        };
        let Flight {
            job,
            rec:
                Recorded {
                    fence,
                    queries,
                    span,
                    out_len,
                    begun,
                    mut done,
                },
        } = flight;
        let waited_from = Instant::now();
        let already = fence.signaled().unwrap_or(false);
        let left = job.timeout.saturating_sub(begun.elapsed());
        // The deadline counts from the submission to the GPU: a fence that passed, but only
        // after it, fails the job too (as observed here; only a tiny timeout can see that).
        let waited = if already {
            let took = begun.elapsed();
            if took > job.timeout {
                Err(Error::Gpu(format!("the fence passed only after {took:?}")))
            } else {
                Ok(())
            }
        } else if left.is_zero() {
            // The deadline has passed and the fence had not: polling again now could see it
            // pass late and accept it (seen on the H100 with a 1 ns deadline).
            Err(Error::Gpu(format!(
                "the fence had not passed when its deadline did, {:?} after submission",
                job.timeout
            )))
        } else {
            fence.wait(left)
        };
        if let Err(e) = waited {
            let e = e.to_string();
            let why = if e.contains("context lost") {
                e
            } else {
                format!("{FENCE_TIMEOUT} of {:?}: {e}", job.timeout)
            };
            self.broken = Some(why.clone());
            let _ = job.reply.send(Err(Error::Gpu(why.clone())));
            // The other frames' buffers may be in use too: fail their jobs, never read them.
            while let Some(slot) = self.in_flight.pop_front() {
                if let Some(f) = self.frames[slot].flight.take() {
                    let _ = f
                        .job
                        .reply
                        .send(Err(Error::Gpu(format!("the GPU is unhealthy: {why}"))));
                }
            }
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
            let [up, conv, down] = queries.each_ref().map(|q| Some(q.nanoseconds()));
            (done.upload_ns, done.kernel_ns, done.download_ns) = (up, conv, down);
            // Timer queries say how long the GPU worked; never more than the wall share.
            let timed = [up, conv, down].iter().flatten().sum::<u64>() as f64 * 1e-9;
            done.busy_s = done.busy_s.min(timed);
            done.gpu_span_ns = Some((span[0].nanoseconds(), span[1].nanoseconds()));
        }
        // GL objects go before the answer, so a caller that counts them sees them gone.
        drop((fence, queries, span));
        let _ = job.reply.send(Ok(done));
    }

    /// Finishes every job in flight, oldest first.
    pub(super) fn stream_drain(&mut self) {
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
