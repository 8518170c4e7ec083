//! Diagnostics: do uploads, compute and downloads overlap on this GPU when each runs in its own
//! (shared) GL context on its own thread? (`sporkle probe-overlap`.)
//!
//! In one context they do not (the executor's timestamps show consecutive frames' GPU spans
//! never overlapping on the H100), so a pipelined executor would need a context per stage. This
//! probe measures whether that would help before the executor is built around it: each *lane*
//! repeats one operation (a DMA copy from persistently mapped host memory to a device buffer,
//! the reverse, or a fixed compute workload) in its own shared context, alone and then together
//! with other lanes, started at one barrier. Overlap shows as a combined wall time below the
//! sum of the lanes' times alone.

use super::context::{GlContext, SharedContext};
use super::gl::{self, Buffer, Fence, Program};
use super::gl::{Direction, MappedBuffer};
use super::shaders;
use crate::error::{Error, Result};
use std::rc::Rc;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// What a lane repeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lane {
    /// Mapped host buffer → device buffer.
    Upload,
    /// Device buffer → mapped host buffer.
    Download,
    /// The calibration workload (`shaders/calibrate.comp`).
    Compute,
}

/// Repetitions per lane.
const REPS: usize = 20;

/// Runs `lane` REPS times in `ctx` (current on this thread) after `start`; returns its wall
/// time in seconds, from the barrier to its last fence.
fn run_lane(ctx: &GlContext, lane: Lane, floats: usize, start: &Barrier) -> Result<f64> {
    let gl = Rc::clone(&ctx.gl);
    let device = Buffer::new(&gl, floats, true)?;
    let op: Box<dyn Fn() -> Result<()>> = match lane {
        Lane::Upload | Lane::Download => {
            let direction = if lane == Lane::Upload {
                Direction::Upload
            } else {
                Direction::Download
            };
            let staging = MappedBuffer::new(&gl, floats, direction)?;
            let gl = Rc::clone(&gl);
            let device_raw = device.raw();
            Box::new(move || match lane {
                Lane::Upload => gl::copy_buffer(&gl, staging.raw(), device_raw, floats),
                _ => gl::copy_buffer(&gl, device_raw, staging.raw(), floats),
            })
        }
        Lane::Compute => {
            let (threads, _, groups) = shaders::CALIBRATE_SHAPE;
            let out = Buffer::new(&gl, (threads * groups) as usize, true)?;
            let program = Program::compute(&gl, &shaders::calibrate_source(), false)?;
            Box::new(move || {
                out.bind(3);
                program.dispatch([groups, 1, 1])
            })
        }
    };
    // A warm-up round (first-use costs), then the barrier.
    op()?;
    Fence::new(&gl)?.wait(Duration::from_secs(30))?;
    start.wait();
    let t = Instant::now();
    for _ in 0..REPS {
        op()?;
        gl::flush(&gl);
    }
    Fence::new(&gl)?.wait(Duration::from_secs(60))?;
    Ok(t.elapsed().as_secs_f64())
}

/// Runs `lanes` together, each on its own thread in its own shared context; returns each
/// lane's wall time (s) and the wall time of all (s).
fn together(ctx: &GlContext, lanes: &[Lane], floats: usize) -> Result<(Vec<f64>, f64)> {
    let shared: Vec<SharedContext> = lanes.iter().map(|_| ctx.shared()).collect::<Result<_>>()?;
    let start = Arc::new(Barrier::new(lanes.len() + 1));
    let handles: Vec<_> = lanes
        .iter()
        .zip(shared)
        .map(|(&lane, shared)| {
            let start = Arc::clone(&start);
            std::thread::spawn(move || -> Result<f64> {
                let ctx = shared.make_current();
                // Every lane reaches the barrier, even one that failed to start.
                match ctx {
                    Ok(ctx) => run_lane(&ctx, lane, floats, &start),
                    Err(e) => {
                        start.wait();
                        Err(e)
                    }
                }
            })
        })
        .collect();
    start.wait();
    let t = Instant::now();
    let times = handles
        .into_iter()
        .map(|h| {
            h.join()
                .map_err(|_| Error::Gpu("a probe lane panicked".into()))?
        })
        .collect::<Result<Vec<f64>>>()?;
    Ok((times, t.elapsed().as_secs_f64()))
}

/// The report: each lane alone, then in combinations, in ms per repetition.
pub(super) fn probe_overlap(ctx: &GlContext, floats: usize) -> Result<String> {
    let mb = (floats * 4) as f64 / 1e6;
    let mut out = format!(
        "{REPS} repetitions per lane; copies of {mb:.1} MB; each lane in its own shared context \
         and thread\n"
    );
    let name = |l: &Lane| format!("{l:?}").to_lowercase();
    let mut alone = Vec::new();
    for lane in [Lane::Upload, Lane::Download, Lane::Compute] {
        let (_, wall) = together(ctx, &[lane], floats)?;
        let ms = wall * 1e3 / REPS as f64;
        let rate = if lane == Lane::Compute {
            String::new()
        } else {
            format!(" ({:.1} GB/s)", mb / ms)
        };
        out += &format!("{} alone: {ms:.3} ms{rate}\n", name(&lane));
        alone.push((lane, wall));
    }
    let alone_s = |l: Lane| alone.iter().find(|(a, _)| *a == l).map_or(0.0, |a| a.1);
    for lanes in [
        &[Lane::Upload, Lane::Compute][..],
        &[Lane::Download, Lane::Compute],
        &[Lane::Upload, Lane::Download],
        &[Lane::Upload, Lane::Download, Lane::Compute],
    ] {
        let (times, wall) = together(ctx, lanes, floats)?;
        let serial: f64 = lanes.iter().map(|&l| alone_s(l)).sum();
        let longest = lanes.iter().map(|&l| alone_s(l)).fold(0.0, f64::max);
        let each: Vec<String> = lanes
            .iter()
            .zip(&times)
            .map(|(l, t)| format!("{} {:.3} ms", name(l), t * 1e3 / REPS as f64))
            .collect();
        // 0: no overlap (the sum of the times alone); 1: perfect (the longest lane alone).
        let overlap = if serial > longest {
            (serial - wall) / (serial - longest)
        } else {
            0.0
        };
        out += &format!(
            "together [{}]: wall {:.3} ms per repetition (alone: serial {:.3}, longest {:.3}); \
             overlap {overlap:.2}\n",
            each.join(", "),
            wall * 1e3 / REPS as f64,
            serial * 1e3 / REPS as f64,
            longest * 1e3 / REPS as f64
        );
    }
    Ok(out)
}
