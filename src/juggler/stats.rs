//! What the Juggler reports: each job's [`RunInfo`] (device, reason, times, stages) and the
//! running [`Stats`] per device.

use super::DeviceKind;

/// What happened to one job.
#[derive(Clone, Debug, PartialEq)]
pub struct RunInfo {
    /// The device that produced the output.
    pub device: DeviceKind,
    /// Why that device.
    pub reason: String,
    /// Wall time from submission to the output in host memory.
    pub wall_s: f64,
    /// GPU time of the convolution (timer query), where measured.
    pub gpu_kernel_s: Option<f64>,
    /// FLOPs / wall time, in GFLOP/s.
    pub gflops: f64,
    /// When the GPU failed and the CPU re-ran the job: the GPU's error.
    pub fallback: Option<String>,
    /// Where a GPU job's time went.
    pub stages: Option<Stages>,
}

/// Where a GPU job's time went: host copies (wall time) and GPU stages (timer queries; `None`
/// on a software renderer). The GPU stages are the executor's steps that ran the job's copy in,
/// convolution and copy out: the job's own times when it ran alone (`steps_shared` false),
/// otherwise those of whole steps, which ran other jobs' phases too.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stages {
    /// Input into the upload staging buffer.
    pub host_in_s: f64,
    /// Copy staging → device (DMA or shader copy; see `StreamCopy`).
    pub upload_s: Option<f64>,
    /// The convolution.
    pub kernel_s: Option<f64>,
    /// Copy device → staging.
    pub download_s: Option<f64>,
    /// Whether its steps ran other jobs' phases too.
    pub steps_shared: bool,
    /// Whether its copies ran inside a convolution's dispatch.
    pub fused: bool,
    /// Whether CUDA's copy engines moved its input and output.
    pub cuda_copies: bool,
    /// Times the GPU ran it again because it had convolved with a guess at its weights (the
    /// set the caller's slice held last time) that the weights' hash did not confirm; its
    /// times are those of the last run.
    pub reruns: u32,
    /// Output out of the download staging buffer.
    pub host_out_s: f64,
    /// GPU jobs in flight when it started, itself included.
    pub in_flight: usize,
    /// Parts its batch ran in along n on the GPU, each part's copies and convolution waited for
    /// on their own (1: whole).
    pub parts: usize,
    /// GPU times (ns) at the start of its copy in and the end of its copy out, comparable
    /// between the jobs of one Juggler (GL timestamps, or CUDA event times when CUDA copied).
    pub gpu_span_ns: Option<(u64, u64)>,
    /// Where the rest of the wall time went, for a call's fixed cost: from the job's sending to
    /// the GPU worker starting it; from its start to its fence passing (everything on the GPU,
    /// waits between its steps included); from the fence to its answer (timer queries read,
    /// objects freed); from the answer to the caller having it.
    pub queued_s: f64,
    /// See `queued_s`.
    pub gpu_wall_s: f64,
    /// See `queued_s`.
    pub settle_s: f64,
    /// See `queued_s`.
    pub wake_s: f64,
}

/// Counters of one device.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceStats {
    /// Jobs that ran there.
    pub calls: u64,
    /// Their FLOPs.
    pub flops: u64,
    /// Time busy: CPU wall time of its jobs; GPU time from timer queries (the executor's steps,
    /// each counted once), never more than the wall time some job was on the GPU (that wall time
    /// alone on a software renderer).
    pub busy_s: f64,
    /// Bytes host → device and device → host (GPU only).
    pub bytes_up: u64,
    /// See `bytes_up`.
    pub bytes_down: u64,
    /// Times the executor blocked on a fence, and the time it blocked (GPU only).
    pub fence_waits: u64,
    /// See `fence_waits`.
    pub fence_wait_s: f64,
    /// Weight sets uploaded (GPU) or laid out (CPU), and jobs that found theirs resident.
    pub weight_uploads: u64,
    /// See `weight_uploads`.
    pub cache_hits: u64,
}

/// The `Juggler`'s statistics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// The CPU's counters.
    pub cpu: DeviceStats,
    /// The GPU's counters.
    pub gpu: DeviceStats,
    /// From the first submission to the last completion, seconds.
    pub window_s: f64,
    /// GPU jobs whose fence timed out.
    pub timeouts: u64,
    /// GPU jobs re-run on the CPU after a GPU failure.
    pub fallbacks: u64,
    /// GPU jobs the GPU ran again because it had convolved with a wrong guess at their
    /// weights (see [`Stages::reruns`]).
    pub reruns: u64,
    /// Why there is no GPU, or why it is no longer used.
    pub gpu_unavailable: Option<String>,
    /// Whether GPU busy time comes from timer queries (false: wall time, software renderer).
    pub gpu_timed: bool,
    /// The most GPU jobs seen in flight together (1: no pipelining happened).
    pub max_in_flight: usize,
}

impl Stats {
    /// `busy / window` of a device (0 when nothing ran).
    pub fn utilisation(&self, d: DeviceKind) -> f64 {
        let busy = match d {
            DeviceKind::Cpu => self.cpu.busy_s,
            DeviceKind::Gpu => self.gpu.busy_s,
        };
        if self.window_s > 0.0 {
            busy / self.window_s
        } else {
            0.0
        }
    }

    /// `window - busy` of a device.
    pub fn idle_s(&self, d: DeviceKind) -> f64 {
        (self.window_s - self.utilisation(d) * self.window_s).max(0.0)
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "window {:.3} s", self.window_s)?;
        for (d, s) in [(DeviceKind::Cpu, &self.cpu), (DeviceKind::Gpu, &self.gpu)] {
            write!(
                f,
                "{d}: {} calls, {:.3} GFLOP, busy {:.3} s, idle {:.3} s, utilisation {:.1}%",
                s.calls,
                s.flops as f64 / 1e9,
                s.busy_s,
                self.idle_s(d),
                100.0 * self.utilisation(d)
            )?;
            if d == DeviceKind::Cpu {
                write!(
                    f,
                    ", {} weight sets laid out, {} cache hits",
                    s.weight_uploads, s.cache_hits
                )?;
            }
            if d == DeviceKind::Gpu {
                write!(
                    f,
                    "{}, {:.1} MB up, {:.1} MB down, {} fence waits ({:.3} s), {} weight uploads, {} cache hits",
                    if self.gpu_timed { "" } else { " (busy from wall time: software renderer)" },
                    s.bytes_up as f64 / 1e6,
                    s.bytes_down as f64 / 1e6,
                    s.fence_waits,
                    s.fence_wait_s,
                    s.weight_uploads,
                    s.cache_hits
                )?;
            }
            writeln!(f)?;
        }
        write!(
            f,
            "{} timeouts, {} CPU fallbacks, {} GPU re-runs (weights guessed wrong), at most {} GPU jobs in flight",
            self.timeouts, self.fallbacks, self.reruns, self.max_in_flight
        )?;
        if let Some(why) = &self.gpu_unavailable {
            write!(f, "; GPU unavailable: {why}")?;
        }
        Ok(())
    }
}
