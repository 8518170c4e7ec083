//! The `Juggler`: one convolution API over the CPU and the GPU. It picks the device per call
//! from a cost model of measured throughput, streams GPU jobs through the async executor
//! ([`crate::gpu::executor`]), falls back to the CPU when the GPU fails (nothing is lost), and
//! keeps statistics that move.
//!
//! Device choice (`Preference::Auto`), in order:
//! 1. no GPU, or an unhealthy one: the CPU, with the reason;
//! 2. below the floor (500 MFLOP by default, the original's): the CPU;
//! 3. a shape already timed on both devices: the faster, by its measured times (moving
//!    averages, from each device's second call of the shape on); the loser is re-measured
//!    once every `64 × ratio` choices (`ratio`: its time over the winner's), so one unlucky
//!    measurement cannot decide forever and the re-runs cost at most 1/64 of the time;
//! 4. a shape timed on one device only: the other is tried (two calls: a warm-up and a
//!    measurement) when the model predicts it within 4×, else the measured one;
//! 5. a new shape: the model, `t = flops / rate` on the CPU and
//!    `t = overhead + bytes_in / upload + flops / rate + bytes_out / download` on the GPU, with
//!    rates calibrated on first use (one 231 MFLOP convolution on each device) and refined by
//!    every job.
//!
//! A llvmpipe GPU is a GPU for the model like any other: it measures slow, so `Auto` leaves it.

mod model;
mod stats;
mod ticket;

pub use stats::{DeviceStats, RunInfo, Stages, Stats};
pub use ticket::Ticket;

use crate::cpu::{CpuBackend, CpuWeights};
use crate::error::{Error, Result};
use crate::gpu::{GpuBackend, GpuChoice, JobWeights, SharedWeights, StreamDone};
use crate::params::Conv2dParams;
use crate::pinned::{PinnedInput, PinnedShared, StreamInput};
use model::{remeasure_period, Model, CALIBRATION, EXPLORE};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

/// Which device a caller wants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preference {
    /// The cost model chooses.
    #[default]
    Auto,
    /// Always the CPU.
    Cpu,
    /// The GPU when there is a healthy one (else the CPU, and `RunInfo` says why).
    Gpu,
}

/// A device that ran a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceKind {
    /// The CPU backend.
    Cpu,
    /// The GPU backend.
    Gpu,
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Gpu => "gpu",
        })
    }
}

/// How a `Juggler` is set up.
#[derive(Clone, Debug)]
pub struct Config {
    /// Device preference for every call.
    pub preference: Preference,
    /// Which GPU (default: from `SPORKLE_GPU`).
    pub gpu: Option<GpuChoice>,
    /// CPU threads (default: all cores).
    pub cpu_threads: Option<usize>,
    /// How long a GPU job's fence may take before the job is re-run on the CPU and the GPU is
    /// marked unhealthy.
    pub fence_timeout: Duration,
    /// Below this many FLOPs, `Auto` runs on the CPU.
    pub min_gpu_flops: u64,
    /// Testing and tuning: the cost model's rates, fixed (never calibrated, never refined by
    /// jobs). `None` (the default): calibrated on first use and refined by every job.
    pub fixed_rates: Option<Rates>,
}

/// Rates of the cost model (see the module docs), for [`Config::fixed_rates`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    /// CPU compute, FLOP/s.
    pub cpu_flops: f64,
    /// GPU kernel compute, FLOP/s.
    pub gpu_flops: f64,
    /// Host to GPU and back (host copy and GPU copy together), bytes/s each way.
    pub transfer_bytes: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            preference: Preference::Auto,
            gpu: None,
            cpu_threads: None,
            fence_timeout: Duration::from_secs(60),
            min_gpu_flops: 500_000_000,
            fixed_rates: None,
        }
    }
}

/// Bytes of prepared CPU weights kept at once.
const CPU_WEIGHTS_BUDGET: usize = 256 << 20;

/// Prepared CPU weight sets, least recently used first out.
#[derive(Default)]
struct CpuCache {
    entries: Vec<CpuCached>,
    clock: u64,
}

struct CpuCached {
    key: (Conv2dParams, usize, u64),
    weights: Arc<CpuWeights>,
    bytes: usize,
    last_used: u64,
}

/// What the Juggler shares with its tickets.
struct Inner {
    config: Config,
    cpu: CpuBackend,
    /// Taken out on drop, so that dropping the Juggler releases every GL object even while
    /// tickets are alive (they then finish on the CPU).
    gpu: RwLock<Option<GpuBackend>>,
    /// Why there is no GPU, or why it is no longer used.
    gpu_unavailable: Mutex<Option<String>>,
    software_gpu: bool,
    /// The CPU's prepared weights.
    cpu_cache: Mutex<CpuCache>,
    async_on: std::sync::atomic::AtomicBool,
    model: Mutex<Model>,
    stats: Mutex<StatsState>,
}

#[derive(Default)]
struct StatsState {
    stats: Stats,
    first: Option<Instant>,
    last: Option<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device-juggling convolution engine (see the module docs). `Send + Sync`: share it
/// between threads by reference or in an `Arc`.
pub struct Juggler {
    inner: Arc<Inner>,
}

impl Inner {
    fn touch(&self, start: Instant) {
        let mut s = lock(&self.stats);
        s.first = Some(s.first.map_or(start, |f| f.min(start)));
        let now = Instant::now();
        s.last = Some(now);
        if let Some(first) = s.first {
            s.stats.window_s = now.duration_since(first).as_secs_f64();
        }
    }

    fn record_gpu(
        &self,
        p: &Conv2dParams,
        wall_s: f64,
        done: &StreamDone,
        host_out_s: f64,
        sync: bool,
    ) {
        lock(&self.model).observe_gpu(p, wall_s, done, host_out_s, sync);
        {
            let mut s = lock(&self.stats);
            let g = &mut s.stats.gpu;
            g.calls += 1;
            g.flops += p.flops();
            g.busy_s += done.busy_s;
            g.bytes_up += done.bytes_up;
            g.bytes_down += done.bytes_down;
            g.fence_waits += u64::from(done.fence_waited);
            g.fence_wait_s += done.fence_wait_s;
            g.weight_uploads += u64::from(done.weights_uploaded);
            g.cache_hits += u64::from(!done.weights_uploaded);
            s.stats.max_in_flight = s.stats.max_in_flight.max(done.in_flight);
            s.stats.reruns += u64::from(done.reruns);
        }
        self.touch(Instant::now() - Duration::from_secs_f64(wall_s));
    }

    /// How long a synchronous GPU call of shape `p` is expected to take: its measured wall
    /// time, on a hardware GPU (a software renderer's threads need the cores a polling caller
    /// would take).
    fn expected_gpu_wait(&self, p: &Conv2dParams) -> Option<Duration> {
        if self.software_gpu {
            return None;
        }
        let m = lock(&self.model);
        let t = m.shapes.get(p)?.time[DeviceKind::Gpu as usize]?;
        Some(Duration::from_secs_f64(t))
    }

    /// Counts a GPU failure; any failure but a job over a GL limit marks the GPU unhealthy.
    fn gpu_failed(&self, e: &Error) {
        let why = e.to_string();
        let mut s = lock(&self.stats);
        s.stats.fallbacks += 1;
        if matches!(e, Error::FenceTimeout(_)) {
            s.stats.timeouts += 1;
        }
        drop(s);
        if matches!(e, Error::GpuLimit(_)) {
            return;
        }
        let mut u = lock(&self.gpu_unavailable);
        if u.is_none() {
            *u = Some(format!("unhealthy: {why}"));
        }
    }

    fn run_cpu(
        &self,
        p: &Conv2dParams,
        input: &[f32],
        weights: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        reason: String,
    ) -> Result<RunInfo> {
        let t = Instant::now();
        let (wall_s, fresh) = self.cpu_measured(p, input, weights, bias, output)?;
        {
            let mut s = lock(&self.stats);
            s.stats.cpu.calls += 1;
            s.stats.cpu.flops += p.flops();
            s.stats.cpu.busy_s += wall_s;
            s.stats.cpu.weight_uploads += u64::from(fresh);
            s.stats.cpu.cache_hits += u64::from(!fresh);
        }
        self.touch(t);
        Ok(RunInfo {
            device: DeviceKind::Cpu,
            reason,
            wall_s,
            gpu_kernel_s: None,
            gflops: p.flops() as f64 / wall_s.max(1e-12) / 1e9,
            fallback: None,
            stages: None,
        })
    }

    /// One CPU convolution with resident weights, its wall time taught to the model; returns
    /// the wall time and whether the weights were laid out now. [`Inner::run_cpu`] adds the
    /// statistics; the calibration does not count as a user's job.
    fn cpu_measured(
        &self,
        p: &Conv2dParams,
        input: &[f32],
        weights: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
    ) -> Result<(f64, bool)> {
        let t = Instant::now();
        let (prepared, fresh) = self.cpu_weights(p, weights)?;
        self.cpu
            .conv2d_prepared(p, input, &prepared, bias, output)?;
        let wall_s = t.elapsed().as_secs_f64();
        lock(&self.model).observe_cpu(p, wall_s);
        Ok((wall_s, fresh))
    }

    /// The CPU's laid-out copy of `weights` for `p`, prepared on first use and kept (like the
    /// GPU's resident weights: identified by length and an xxh3 hash of every byte, with the
    /// parameters, least recently used evicted past a byte budget); whether it was prepared now.
    fn cpu_weights(&self, p: &Conv2dParams, weights: &[f32]) -> Result<(Arc<CpuWeights>, bool)> {
        let key = (
            *p,
            weights.len(),
            crate::gpu::parallel_hash(bytemuck::cast_slice(weights)),
        );
        let mut cache = lock(&self.cpu_cache);
        cache.clock += 1;
        let clock = cache.clock;
        if let Some(entry) = cache.entries.iter_mut().find(|e| e.key == key) {
            entry.last_used = clock;
            return Ok((Arc::clone(&entry.weights), false));
        }
        let weights = Arc::new(self.cpu.prepare_weights(p, weights)?);
        let bytes = |c: &CpuCache| c.entries.iter().map(|e| e.bytes).sum::<usize>();
        let size = weights.bytes();
        while !cache.entries.is_empty() && bytes(&cache) + size > CPU_WEIGHTS_BUDGET {
            let lru = (0..cache.entries.len())
                .min_by_key(|&i| cache.entries[i].last_used)
                .unwrap_or(0);
            cache.entries.swap_remove(lru);
        }
        cache.entries.push(CpuCached {
            key,
            weights: Arc::clone(&weights),
            bytes: size,
            last_used: clock,
        });
        Ok((weights, true))
    }

    /// Measures both devices on the calibration convolution (once).
    fn calibrate(&self) {
        if lock(&self.model).calibrated {
            return;
        }
        if let Some(r) = self.config.fixed_rates {
            let mut m = lock(&self.model);
            (m.cpu_rate, m.gpu_rate) = (Some(r.cpu_flops), Some(r.gpu_flops));
            (m.up_rate, m.down_rate) = (Some(r.transfer_bytes), Some(r.transfer_bytes));
            (m.calibrated, m.fixed) = (true, true);
            return;
        }
        let p = CALIBRATION;
        let mut x = vec![0.0f32; p.input_len()];
        let mut w = vec![0.0f32; p.weights_len()];
        crate::data::fill_uniform(1, &mut x);
        crate::data::fill_uniform(2, &mut w);
        let mut y = vec![0.0f32; p.output_len()];
        // Twice each: a device's first call of a shape is a warm-up (see ShapeTimes).
        for _ in 0..2 {
            let _ = self.cpu_measured(&p, &x, &w, None, &mut y);
        }
        let (x, w): (Arc<[f32]>, SharedWeights) = (x.into(), SharedWeights::new(w.into()));
        // Twice: the first call compiles the program and uploads the weights.
        for _ in 0..2 {
            let t = Instant::now();
            let answer = self
                .gpu
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|g| {
                    g.stream(
                        &p,
                        StreamInput::Host(Arc::clone(&x)),
                        JobWeights::Ready(w.clone()),
                        None,
                        false,
                        self.config.fence_timeout,
                    )
                });
            if let Some(Ok(rx)) = answer {
                if let Ok(Ok(mut done)) = rx.recv() {
                    let t_out = Instant::now();
                    std::mem::take(&mut done.output).copy_to(&mut y);
                    let host_out_s = t_out.elapsed().as_secs_f64();
                    let wall_s = t.elapsed().as_secs_f64();
                    lock(&self.model).observe_gpu(&p, wall_s, &done, host_out_s, true);
                }
            }
        }
        let mut m = lock(&self.model);
        m.calibrated = true;
        // The calibration shape's own times are not a user's shape.
        m.shapes.remove(&p);
    }

    /// The device for `p`, and why.
    fn choose(&self, p: &Conv2dParams) -> (DeviceKind, String) {
        let unavailable = lock(&self.gpu_unavailable).clone();
        let has_gpu = self.gpu.read().unwrap_or_else(|e| e.into_inner()).is_some();
        let gpu_ok = has_gpu && unavailable.is_none();
        let why_not = || unavailable.clone().unwrap_or_else(|| "no GPU".into());
        match self.config.preference {
            Preference::Cpu => return (DeviceKind::Cpu, "preference: cpu".into()),
            Preference::Gpu if gpu_ok => return (DeviceKind::Gpu, "preference: gpu".into()),
            Preference::Gpu => {
                return (
                    DeviceKind::Cpu,
                    format!("preference gpu, but {}", why_not()),
                )
            }
            Preference::Auto => {}
        }
        if !gpu_ok {
            return (DeviceKind::Cpu, why_not());
        }
        if p.flops() < self.config.min_gpu_flops {
            return (
                DeviceKind::Cpu,
                format!(
                    "{:.1} MFLOP is below the GPU floor of {:.0} MFLOP",
                    p.flops() as f64 / 1e6,
                    self.config.min_gpu_flops as f64 / 1e6
                ),
            );
        }
        self.calibrate();
        let mut m = lock(&self.model);
        let ms = |t: f64| t * 1e3;
        let shape = m.shapes.entry(*p).or_default();
        shape.choices += 1;
        let (choices, calls) = (shape.choices, shape.calls);
        let measured = shape.time;
        match measured {
            [Some(c), Some(g)] => {
                let (fast, slow, t_fast, t_slow) = if g < c {
                    (DeviceKind::Gpu, DeviceKind::Cpu, g, c)
                } else {
                    (DeviceKind::Cpu, DeviceKind::Gpu, c, g)
                };
                // The loser is measured again now and then: one unlucky measurement must not
                // decide forever (on the H200 a GPU call that made buffers was once timed at
                // several times its worth, and Auto kept vgg on the CPU at 3.4x the GPU's
                // time). Once every 64 choices times the ratio of the times, so that the
                // re-runs cost at most 1/64 of the faster device's time whatever the ratio.
                let period = remeasure_period(t_slow / t_fast);
                let d = if choices % period == 0 { slow } else { fast };
                (
                    d,
                    format!(
                        "measured on this shape: cpu {:.3} ms, gpu {:.3} ms{}",
                        ms(c),
                        ms(g),
                        if d == slow {
                            " (re-measuring the slower)"
                        } else {
                            ""
                        }
                    ),
                )
            }
            [Some(t), None] | [None, Some(t)] => {
                let (seen, other) = if measured[0].is_some() {
                    (DeviceKind::Cpu, DeviceKind::Gpu)
                } else {
                    (DeviceKind::Gpu, DeviceKind::Cpu)
                };
                let predicted = m.predict(p, other).unwrap_or(f64::INFINITY);
                // Two calls measure a device (the first is a warm-up); at most that many tries.
                if predicted < EXPLORE * t && calls[other as usize] < 2 {
                    (
                        other,
                        format!(
                            "trying {other}: measured {seen} {:.3} ms, model predicts {other} {:.3} ms",
                            ms(t),
                            ms(predicted)
                        ),
                    )
                } else {
                    (
                        seen,
                        format!(
                            "measured {seen} {:.3} ms; model predicts {other} {:.3} ms",
                            ms(t),
                            ms(predicted)
                        ),
                    )
                }
            }
            [None, None] => {
                let c = m.predict(p, DeviceKind::Cpu).unwrap_or(f64::INFINITY);
                let g = m.predict(p, DeviceKind::Gpu).unwrap_or(f64::INFINITY);
                let d = if g < c {
                    DeviceKind::Gpu
                } else {
                    DeviceKind::Cpu
                };
                (
                    d,
                    format!("model predicts cpu {:.3} ms, gpu {:.3} ms", ms(c), ms(g)),
                )
            }
        }
    }
}

impl Juggler {
    /// A Juggler with the default [`Config`]. Never fails for lack of a GPU: it then works on
    /// the CPU and [`Stats::gpu_unavailable`] says why.
    pub fn new() -> Result<Self> {
        Self::with_config(Config::default())
    }

    /// A Juggler set up by `config`.
    pub fn with_config(config: Config) -> Result<Self> {
        let cpu = match config.cpu_threads {
            Some(t) => CpuBackend::with_threads(t)?,
            None => CpuBackend::new()?,
        };
        let choice = match config.gpu {
            Some(c) => Ok(c),
            None => GpuChoice::from_env(),
        };
        let (gpu, unavailable) = match choice.and_then(|c| match c {
            GpuChoice::Off => Err(Error::DeviceUnavailable("SPORKLE_GPU=off".into())),
            c => GpuBackend::with_choice(c),
        }) {
            Ok(g) => (Some(g), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let software_gpu = gpu.as_ref().is_some_and(|g| g.info().software);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                cpu,
                gpu: RwLock::new(gpu),
                gpu_unavailable: Mutex::new(unavailable),
                software_gpu,
                cpu_cache: Mutex::new(CpuCache::default()),
                async_on: std::sync::atomic::AtomicBool::new(true),
                model: Mutex::new(Model::default()),
                stats: Mutex::new(StatsState::default()),
            }),
        })
    }

    /// Whether streaming jobs are pipelined (several in flight); on by default.
    pub fn is_async(&self) -> bool {
        self.inner
            .async_on
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Turns pipelining on or off; jobs already submitted finish as they were submitted.
    pub fn set_async(&self, on: bool) {
        self.inner
            .async_on
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// `f` of its GPU backend, if it has one.
    fn with_gpu<T>(&self, f: impl FnOnce(&GpuBackend) -> T) -> Option<T> {
        self.inner
            .gpu
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(f)
    }

    /// The GPU's renderer, or why there is none.
    pub fn gpu_description(&self) -> std::result::Result<String, String> {
        self.with_gpu(|g| g.info().renderer.clone()).ok_or_else(|| {
            lock(&self.inner.gpu_unavailable)
                .clone()
                .unwrap_or_else(|| "no GPU".into())
        })
    }

    /// The wall times measured for `p` so far (moving averages), `[cpu, gpu]`, seconds; GPU
    /// times only from calls that ran alone (synchronous ones).
    pub fn measured(&self, p: &Conv2dParams) -> [Option<f64>; 2] {
        lock(&self.inner.model)
            .shapes
            .get(p)
            .map(|s| s.time)
            .unwrap_or_default()
    }

    /// Returns once its GPU has freed every pinned input dropped before this call (see
    /// [`GpuBackend::settle`]); at once without a GPU.
    pub fn settle_gpu(&self) -> Result<()> {
        self.with_gpu(GpuBackend::settle).unwrap_or(Ok(()))
    }

    /// Test hook: its GPU's synchronous calls always convolve with a guess at their weights
    /// where they have one (see [`GpuBackend::force_weights_guess`]); an error where there is
    /// no GPU.
    #[doc(hidden)]
    pub fn force_gpu_weights_guess(&self, on: bool) -> Result<()> {
        self.with_gpu(|g| g.force_weights_guess(on))
            .ok_or_else(|| Error::DeviceUnavailable("this Juggler has no GPU".into()))
    }

    /// Test hook: its GPU's fences never seen to pass (see [`GpuBackend::inject_fence_fault`]);
    /// an error where there is no GPU.
    #[doc(hidden)]
    pub fn inject_gpu_fence_fault(&self, on: bool) -> Result<()> {
        self.with_gpu(|g| g.inject_fence_fault(on))
            .unwrap_or_else(|| Err(Error::DeviceUnavailable("this Juggler has no GPU".into())))
    }

    /// Whether its GPU is a software renderer (llvmpipe: for testing, never fast).
    pub fn gpu_is_software(&self) -> bool {
        self.inner.software_gpu
    }

    /// A snapshot of the statistics.
    pub fn stats(&self) -> Stats {
        let mut s = lock(&self.inner.stats).stats.clone();
        s.gpu_unavailable = lock(&self.inner.gpu_unavailable).clone();
        s.gpu_timed = !self.inner.software_gpu;
        s
    }

    /// Computes `output = conv2d(input, weights) + bias` on the chosen device, synchronously.
    /// Lengths are checked first; on error the output is untouched.
    pub fn conv2d(
        &self,
        p: &Conv2dParams,
        input: &[f32],
        weights: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
    ) -> Result<RunInfo> {
        p.check_slices(input, weights, bias, output)?;
        let (device, reason) = self.inner.choose(p);
        match device {
            DeviceKind::Cpu => self.inner.run_cpu(p, input, weights, bias, output, reason),
            DeviceKind::Gpu => {
                let submitted = Instant::now();
                // The input staged, the weights sent after the job (GpuBackend::send_call): a
                // warm call allocates nothing of its data's size. The lock is held until the
                // staged input is back in its pool.
                let gpu = self.inner.gpu.read().unwrap_or_else(|e| e.into_inner());
                let timeout = self.inner.config.fence_timeout;
                let sent = (gpu.as_ref().ok_or_else(released))
                    .and_then(|g| g.send_call(p, input, weights, bias, timeout));
                // Lent until the ticket has been waited.
                let mut lent = None;
                let ticket = match sent {
                    Ok(call) => {
                        lent = Some(call.staged);
                        let job = GpuCall {
                            input: call.input,
                            weights: call.weights,
                            bias: call.bias,
                            host_in_s: call.host_in_s,
                        };
                        Ticket::gpu(&self.inner, p, job, reason, call.answer, submitted, true)
                    }
                    // The ticket re-runs it on the CPU, as after any GPU failure.
                    Err(why) => {
                        let job = GpuCall::copied(input, weights, bias);
                        let answer = failed_answer(why);
                        Ticket::gpu(&self.inner, p, job, reason, answer, submitted, true)
                    }
                };
                let info = ticket.wait_into(output);
                drop(lent);
                info
            }
        }
    }

    /// Submits a job and returns at once when it goes to the GPU (with async on, the executor's
    /// steps run [`crate::gpu::JOBS_PER_STEP`] jobs at once, and more wait in its frames); a CPU job is
    /// computed before this returns. Lengths are checked first. The data are copied; to stream
    /// without that copy, see [`Juggler::submit_shared`].
    pub fn submit(
        &self,
        p: &Conv2dParams,
        input: &[f32],
        weights: &[f32],
        bias: Option<&[f32]>,
    ) -> Result<Ticket> {
        // submit_shared checks the lengths.
        self.submit_shared(p, input.into(), weights.into(), bias.map(Into::into))
    }

    /// [`Juggler::submit`] with shared buffers, which the job keeps (for a CPU re-run if the GPU
    /// fails) instead of copying: one weight set shared by every batch of a stream costs nothing
    /// per call.
    pub fn submit_shared(
        &self,
        p: &Conv2dParams,
        input: Arc<[f32]>,
        weights: Arc<[f32]>,
        bias: Option<Arc<[f32]>>,
    ) -> Result<Ticket> {
        self.submit_input(p, StreamInput::Host(input), weights, bias)
    }

    /// An input buffer of `len` floats in pinned host memory, which GPU jobs read directly
    /// (no host copy into staging: see [`PinnedInput`]). Without a GPU, or where the GPU cannot
    /// map one, it is plain host memory ([`PinnedInput::is_mapped`] says which).
    pub fn pinned_input(&self, len: usize) -> Result<PinnedInput<'_>> {
        let gpu = self.inner.gpu.read().unwrap_or_else(|e| e.into_inner());
        let shared = match gpu.as_ref().map(|g| g.pin(len)) {
            Some(Ok(shared)) => shared,
            _ => PinnedShared::host(len),
        };
        Ok(PinnedInput::new(shared))
    }

    /// [`Juggler::submit_shared`] with the input in a pinned buffer: the GPU reads it where it
    /// is. The buffer cannot be written until this job's ticket has been waited (or dropped and
    /// the job finished).
    pub fn submit_pinned(
        &self,
        p: &Conv2dParams,
        input: &PinnedInput<'_>,
        weights: Arc<[f32]>,
        bias: Option<Arc<[f32]>>,
    ) -> Result<Ticket> {
        self.submit_input(p, StreamInput::Pinned(input.read()), weights, bias)
    }

    fn submit_input(
        &self,
        p: &Conv2dParams,
        input: StreamInput,
        weights: Arc<[f32]>,
        bias: Option<Arc<[f32]>>,
    ) -> Result<Ticket> {
        p.check_buffers(
            input.len(),
            weights.len(),
            bias.as_deref().map(<[f32]>::len),
            p.output_len(),
        )?;
        let (device, reason) = self.inner.choose(p);
        match device {
            DeviceKind::Cpu => {
                let mut output = crate::host_mem::zeroed(p.output_len(), "the output")?;
                let info = self.inner.run_cpu(
                    p,
                    input.as_slice(),
                    &weights,
                    bias.as_deref(),
                    &mut output,
                    reason,
                )?;
                Ok(Ticket::done(output, info))
            }
            DeviceKind::Gpu => {
                let sync = !self.is_async();
                Ok(self.submit_gpu(p, input, weights, bias, reason, sync))
            }
        }
    }

    fn submit_gpu(
        &self,
        p: &Conv2dParams,
        input: StreamInput,
        weights: Arc<[f32]>,
        bias: Option<Arc<[f32]>>,
        reason: String,
        sync: bool,
    ) -> Ticket {
        let submitted = Instant::now();
        let gpu = self.inner.gpu.read().unwrap_or_else(|e| e.into_inner());
        // A job that runs alone is sent before its weights are keyed, and the weights follow
        // on their own channel: a hash (a full pass over them, about 75 µs for 2.4 MiB, needed
        // unless the backend keeps this same allocation) then overlaps the copy of the input,
        // and the convolution, the first phase that needs them, waits for it. A pipelined job
        // carries them: the worker must never wait on one caller while other jobs are in flight.
        let (weights, answer) = if sync {
            let (send_weights, weights_later) = mpsc::sync_channel(1);
            let answer = self.stream_on(
                gpu.as_ref(),
                p,
                input.clone(),
                JobWeights::Later(weights_later),
                bias.clone(),
                sync,
            );
            let weights = shared_weights(gpu.as_ref(), weights);
            // A job that failed before it needed them has dropped the receiver.
            let _ = send_weights.send(weights.clone());
            (weights, answer)
        } else {
            let weights = shared_weights(gpu.as_ref(), weights);
            let answer = self.stream_on(
                gpu.as_ref(),
                p,
                input.clone(),
                JobWeights::Ready(weights.clone()),
                bias.clone(),
                sync,
            );
            (weights, answer)
        };
        let job = GpuCall {
            input,
            weights,
            bias,
            host_in_s: 0.0,
        };
        Ticket::gpu(&self.inner, p, job, reason, answer, submitted, sync)
    }

    /// Sends a job to `gpu`'s executor (none: it was released); its answer. A job the GPU
    /// cannot even take gets an answer that fails, so its ticket re-runs it on the CPU like any
    /// other GPU failure.
    fn stream_on(
        &self,
        gpu: Option<&GpuBackend>,
        p: &Conv2dParams,
        input: StreamInput,
        weights: JobWeights,
        bias: Option<Arc<[f32]>>,
        sync: bool,
    ) -> mpsc::Receiver<Result<StreamDone>> {
        let answer = match gpu {
            Some(g) => g.stream(
                p,
                input,
                weights,
                bias,
                !sync,
                self.inner.config.fence_timeout,
            ),
            None => Err(released()),
        };
        answer.unwrap_or_else(failed_answer)
    }
}

/// The answer of a GPU job that failed before it started (`why`).
fn failed_answer(why: Error) -> mpsc::Receiver<Result<StreamDone>> {
    let (tx, rx) = mpsc::channel();
    let _ = tx.send(Err(why));
    rx
}

/// `weights` keyed for a GPU job: by `gpu`'s kept sets (no hash for an allocation it keeps),
/// or hashed where the GPU was released (the job then fails and re-runs on the CPU).
fn shared_weights(gpu: Option<&GpuBackend>, weights: Arc<[f32]>) -> SharedWeights {
    match gpu {
        Some(g) => g.shared_weights_of(weights),
        None => SharedWeights::new(weights),
    }
}

/// Why a GPU job did not start: the Juggler released its GPU.
fn released() -> Error {
    Error::Gpu("the GPU was released".into())
}

/// A GPU job's data, kept by its ticket for a CPU re-run.
struct GpuCall {
    input: StreamInput,
    weights: SharedWeights,
    bias: Option<Arc<[f32]>>,
    /// Wall time of a host copy into staging done before submitting (0: none, or the
    /// executor's own).
    host_in_s: f64,
}

impl GpuCall {
    /// The data copied into shared buffers (where nothing was staged).
    fn copied(input: &[f32], weights: &[f32], bias: Option<&[f32]>) -> Self {
        Self {
            input: StreamInput::Host(input.into()),
            weights: SharedWeights::new(weights.into()),
            bias: bias.map(Into::into),
            host_in_s: 0.0,
        }
    }
}

impl Drop for Juggler {
    /// Releases the GPU (its worker deletes every GL object and the context) and the CPU
    /// threads once the last ticket is gone; tickets still waiting finish on the CPU.
    fn drop(&mut self) {
        let gpu = self
            .inner
            .gpu
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        drop(gpu);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_only() -> Juggler {
        Juggler::with_config(Config {
            gpu: Some(GpuChoice::Off),
            cpu_threads: Some(1),
            ..Config::default()
        })
        .unwrap()
    }

    /// A GPU job's answer moves every GPU statistic by exactly its own share, and the CPU's not
    /// at all: two synthetic answers recorded one after the other add up (a counter that
    /// subtracts, or forgets one, fails).
    #[test]
    fn a_gpu_job_moves_each_statistic_by_its_share() {
        let j = cpu_only();
        let p = Conv2dParams::new(1, 8, 10, 10, 8, 3, 3);
        let done = |waited: bool, uploaded: bool, in_flight: usize| StreamDone {
            busy_s: 0.25,
            bytes_up: 1000,
            bytes_down: 300,
            fence_waited: waited,
            fence_wait_s: if waited { 0.125 } else { 0.0 },
            weights_uploaded: uploaded,
            in_flight,
            ..StreamDone::default()
        };
        j.inner
            .record_gpu(&p, 0.5, &done(true, true, 2), 0.0, false);
        j.inner
            .record_gpu(&p, 0.5, &done(false, false, 3), 0.0, false);
        let s = j.stats();
        let g = &s.gpu;
        assert_eq!((g.calls, g.flops), (2, 2 * p.flops()), "{s}");
        assert_eq!((g.bytes_up, g.bytes_down), (2000, 600), "{s}");
        assert_eq!((g.fence_waits, g.fence_wait_s), (1, 0.125), "{s}");
        assert_eq!((g.weight_uploads, g.cache_hits), (1, 1), "{s}");
        assert_eq!(g.busy_s, 0.5, "{s}");
        assert_eq!(s.max_in_flight, 3, "{s}");
        assert_eq!(
            s.cpu,
            DeviceStats::default(),
            "the CPU's statistics moved: {s}"
        );
    }

    #[test]
    fn juggler_is_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        fn sent<T: Send>() {}
        shared::<Juggler>();
        sent::<Ticket>();
    }

    #[test]
    fn gpu_off_gives_a_cpu_only_juggler_that_says_why() {
        let j = cpu_only();
        assert!(j.gpu_description().unwrap_err().contains("SPORKLE_GPU=off"));
        let p = CALIBRATION;
        let x = vec![1.0f32; p.input_len()];
        let w = vec![0.5f32; p.weights_len()];
        let mut y = vec![0.0f32; p.output_len()];
        let info = j.conv2d(&p, &x, &w, None, &mut y).unwrap();
        assert_eq!(info.device, DeviceKind::Cpu);
        assert!(info.reason.contains("SPORKLE_GPU=off"), "{}", info.reason);
        // Centre outputs see all 9 taps of all 64 channels: 64 * 9 * 0.5.
        assert_eq!(y[56 + 1], 288.0);
        let s = j.stats();
        assert_eq!((s.cpu.calls, s.gpu.calls), (1, 0));
        assert!(s.cpu.busy_s > 0.0 && s.window_s >= s.cpu.busy_s * 0.5);
    }

    /// The CPU rate is learnt from a shape's second call on (the first warms up), and never
    /// when the configuration fixed the rates.
    #[test]
    fn the_model_learns_the_cpu_rate_from_warm_calls_unless_fixed() {
        let p = CALIBRATION;
        let flops = p.flops() as f64;
        let mut m = Model::default();
        m.observe_cpu(&p, 1.0);
        assert_eq!(m.cpu_rate, None, "a first call measures nothing");
        m.observe_cpu(&p, 0.5);
        assert_eq!(m.cpu_rate, Some(flops / 0.5));
        assert_eq!(m.predict(&p, DeviceKind::Cpu), Some(0.5));
        let mut fixed = Model {
            fixed: true,
            cpu_rate: Some(1.0),
            ..Model::default()
        };
        fixed.observe_cpu(&p, 1.0);
        fixed.observe_cpu(&p, 0.5);
        assert_eq!(fixed.cpu_rate, Some(1.0));
    }

    #[test]
    fn async_can_be_switched_off_and_on() {
        let j = cpu_only();
        assert!(j.is_async(), "on by default");
        j.set_async(false);
        assert!(!j.is_async());
        j.set_async(true);
        assert!(j.is_async());
    }

    #[test]
    fn bad_lengths_are_errors_and_leave_the_output_alone() {
        let j = cpu_only();
        let p = CALIBRATION;
        let x = vec![1.0f32; 10];
        let w = vec![0.5f32; p.weights_len()];
        let mut y = vec![7.0f32; p.output_len()];
        assert!(j.conv2d(&p, &x, &w, None, &mut y).is_err());
        assert!(y.iter().all(|&v| v == 7.0));
        assert!(j.submit(&p, &x, &w, None).is_err());
        assert_eq!(j.stats().cpu.calls, 0);
    }
}
