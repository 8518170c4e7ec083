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
use super::host_copy::parallel_copy;
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

/// Zero-copy probe (`sporkle probe-zero-copy`): in ONE context, how fast do the streaming
/// copies (`shaders/stream_copy.glsl`) move data across the bus (mapped host memory into a
/// device buffer, a device buffer into mapped host memory), and do those copies and compute
/// overlap when they are workgroups of one dispatch, or separate dispatches with no barrier
/// between them? Compared with DMA copies. What the executor's fused steps rest on.
pub(super) fn probe_zero_copy(ctx: &GlContext, floats: usize) -> Result<String> {
    let gl = Rc::clone(&ctx.gl);
    let floats = floats / 4 * 4;
    let n4 = (floats / 4) as u32;
    let mut host_in = MappedBuffer::new(&gl, floats, Direction::Upload)?;
    for (i, x) in host_in.as_mut_slice().iter_mut().enumerate() {
        *x = i as f32;
    }
    let host_out = MappedBuffer::new(&gl, floats, Direction::Download)?;
    let dev_in = Buffer::new(&gl, floats, true)?;
    let dev_out = Buffer::new(&gl, floats, true)?;
    let sink = Buffer::new(&gl, 1 << 22, true)?;
    // The bindings of stream_copy.glsl, and the FMA workload's output.
    host_in.bind(4);
    dev_in.bind(5);
    dev_out.bind(6);
    host_out.bind(7);
    sink.bind(0);
    let compute_groups = 2048u32;
    let program = Program::compute(&gl, &shaders::probe_roles_source(2048), false)?;
    // `i` groups copy in, `o` copy out, then `fma` groups compute, in one dispatch.
    let run = |i: u32, o: u32, fma: u32| {
        program.dispatch_with([i + o + fma, 1, 1], "copies", [i, o, n4, n4])
    };
    let time = |op: &dyn Fn() -> Result<()>| -> Result<f64> {
        op()?;
        Fence::new(&gl)?.wait(Duration::from_secs(30))?;
        let t = Instant::now();
        for _ in 0..REPS {
            op()?;
            gl::flush(&gl);
        }
        Fence::new(&gl)?.wait(Duration::from_secs(60))?;
        Ok(t.elapsed().as_secs_f64() * 1e3 / REPS as f64)
    };
    let mb = (floats * 4) as f64 / 1e6;
    let mut out = format!("{REPS} repetitions; copies of {mb:.1} MB; one context\n");
    let mut line = |what: &str, ms: f64, bytes: f64| {
        let rate = if bytes > 0.0 {
            format!(" ({:.1} GB/s)", bytes / ms / 1e6)
        } else {
            String::new()
        };
        out += &format!("{what}: {ms:.3} ms{rate}\n");
    };
    let bytes = (floats * 4) as f64;
    let (hi, ho, di, dout) = (host_in.raw(), host_out.raw(), dev_in.raw(), dev_out.raw());
    line(
        "dma up",
        time(&|| gl::copy_buffer(&gl, hi, di, floats))?,
        bytes,
    );
    line(
        "dma down",
        time(&|| gl::copy_buffer(&gl, dout, ho, floats))?,
        bytes,
    );
    line(
        "dma up, then down",
        time(&|| {
            gl::copy_buffer(&gl, hi, di, floats)?;
            gl::copy_buffer(&gl, dout, ho, floats)
        })?,
        2.0 * bytes,
    );
    line("compute alone", time(&|| run(0, 0, compute_groups))?, 0.0);
    line(
        "dma up + compute dispatch",
        time(&|| {
            gl::copy_buffer(&gl, hi, di, floats)?;
            run(0, 0, compute_groups)
        })?,
        0.0,
    );
    for g in [66u32, 132, 264, 528] {
        line(
            &format!("shader in, {g} groups"),
            time(&|| run(g, 0, 0))?,
            bytes,
        );
        line(
            &format!("shader out, {g} groups"),
            time(&|| run(0, g, 0))?,
            bytes,
        );
        line(
            &format!("shader in + out, one dispatch, {g}+{g} groups"),
            time(&|| run(g, g, 0))?,
            2.0 * bytes,
        );
        line(
            &format!("shader in + out + compute, one dispatch, {g}+{g} groups"),
            time(&|| run(g, g, compute_groups))?,
            0.0,
        );
    }
    line(
        "separate dispatches, no barrier: in, compute, out (132 groups each copy)",
        time(&|| {
            run(132, 0, 0)?;
            run(0, 0, compute_groups)?;
            run(0, 132, 0)
        })?,
        0.0,
    );
    // The copies must have moved the data: in, device to device, out.
    gl::storage_barrier(&gl);
    run(132, 0, 0)?;
    gl::storage_barrier(&gl);
    gl::copy_buffer(&gl, di, dout, floats)?;
    gl::storage_barrier(&gl);
    run(0, 132, 0)?;
    gl::client_mapped_barrier(&gl);
    Fence::new(&gl)?.wait(Duration::from_secs(30))?;
    let wrong = host_out
        .as_slice()
        .iter()
        .enumerate()
        .filter(|(i, x)| **x != *i as f32)
        .count();
    out += &format!("round trip through both shader copies: {wrong} of {floats} floats wrong\n");
    Ok(out)
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
