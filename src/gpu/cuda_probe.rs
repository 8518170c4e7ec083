//! Diagnostics: streaming with CUDA's copy engines moving the bytes and GL
//! computing (`sporkle probe-cuda SHAPE`).
//!
//! Device memory is allocated and exported by Vulkan, imported by GL (as storage buffers the
//! convolution binds) and by CUDA (as device pointers its streams copy to and from); see
//! `vk.rs` and `cu.rs`. The probe reports the copy rates (CUDA's own memory and the imported
//! memory, one way and both, with a GL convolution running), then streams batches of the shape
//! through three frames: CUDA copies each batch in, GL convolves it, CUDA copies it out, the
//! APIs ordered by the host (a CUDA event waited before the dispatch, a GL fence before the
//! copy out). Every batch's output is compared with the GL backend's own result for its input.

use super::context::GlContext;
use super::cu::{CudaCopies, Event, Imported, Pinned, SharedMemory, Stream};
use super::executor::Resources;
use super::gl::{self, Buffer, Fence, FENCE_TIMEOUT};
use super::plan::{scratch, scratch_for, Bindings, Dispatches};
use super::resident::WeightsKey;
use crate::error::{Error, Result};
use crate::params::Conv2dParams;
use std::rc::Rc;
use std::time::Instant;

/// Distinct inputs (batch `i` reads input `i % INPUTS`).
pub(super) const INPUTS: usize = 3;
/// Frames in flight.
const FRAMES: usize = 3;
/// Repetitions of each copy-rate measurement.
const REPS: usize = 20;
/// Timed runs of the stream (the median is reported).
const RUNS: usize = 5;

/// One frame: the shared input and output buffers.
struct Frame {
    input: SharedMemory,
    output: SharedMemory,
    /// Passes when the frame's input has arrived.
    uploaded: Event,
    /// Passes when the frame's output has been copied out.
    downloaded: Event,
    /// Passes when the frame's convolution has finished.
    computed: Option<Fence>,
}

/// The probe's weights and its [`INPUTS`] inputs for shape `p` (the worker computes their
/// expected outputs on its own path before the probe runs).
pub(super) fn data(p: &Conv2dParams) -> (Vec<f32>, Vec<Vec<f32>>) {
    let mut w = vec![0.0f32; p.weights_len()];
    crate::data::fill_uniform(7, &mut w);
    let inputs = (0..INPUTS)
        .map(|j| {
            let mut x = vec![0.0f32; p.input_len()];
            crate::data::fill_uniform(100 + j as u64, &mut x);
            x
        })
        .collect();
    (w, inputs)
}

/// See the module docs; `batches` per timed stream. `w` and `data` are [`data`]'s, `expected`
/// the outputs of its inputs.
pub(super) fn probe_cuda(
    ctx: &GlContext,
    res: &mut Resources,
    p: &Conv2dParams,
    batches: usize,
    (w, data): &(Vec<f32>, Vec<Vec<f32>>),
    expected: &[Vec<f32>],
) -> Result<String> {
    {
        let gl = Rc::clone(&ctx.gl);
        let copies = CudaCopies::open(ctx)?;
        let cuda = copies.cuda();
        let (x_len, w_len, y_len) = (p.input_len(), p.weights_len(), p.output_len());
        let mut out = format!(
            "{p}: CUDA device {}; {:.1} MB in, {:.1} MB out a batch\n",
            copies.name(),
            (x_len * 4) as f64 / 1e6,
            (y_len * 4) as f64 / 1e6
        );
        let key = WeightsKey::of(w);
        let mut inputs = Vec::new();
        for x in data {
            let mut pinned = cuda.pinned(x_len)?;
            pinned.as_mut_slice().copy_from_slice(x);
            inputs.push(pinned);
        }
        let (mut bias, mut scratch_bufs): (Option<Buffer>, [Option<Buffer>; 2]) =
            (None, [None, None]);
        let plan = res.plans.plan(p, (x_len, w_len), false, &Dispatches::ONE)?;
        let (wi, _) = res.weights.get(p, key, w, plan.algorithm)?;
        scratch(&gl, &mut bias, p.c_out, true)?;
        scratch_for(&gl, &mut scratch_bufs, &plan, true)?;
        let mut frames = Vec::new();
        for _ in 0..FRAMES {
            frames.push(Frame {
                input: copies.device_buffer(x_len)?,
                output: copies.device_buffer(y_len)?,
                uploaded: cuda.event()?,
                downloaded: cuda.event()?,
                computed: None,
            });
        }
        let mut outputs = (0..batches)
            .map(|_| cuda.pinned(y_len))
            .collect::<Result<Vec<Pinned>>>()?;
        let bias = bias.as_ref().expect("allocated above");
        let res = &*res;
        let convolve = |f: &Frame| -> Result<Fence> {
            let bindings = Bindings {
                input: f.input.gl(),
                weights: res.weights.buffer(wi),
                bias,
                output: f.output.gl(),
                scratch: [scratch_bufs[0].as_ref(), scratch_bufs[1].as_ref()],
                part: None,
            };
            gl::storage_barrier(&gl);
            res.plans.encode(&plan, &bindings, None)?;
            let fence = Fence::new(&gl)?;
            gl::flush(&gl);
            Ok(fence)
        };

        // Copy rates: REPS copies each, all issued, then all waited for.
        let own_in = cuda.device_memory(x_len)?;
        let own_out = cuda.device_memory(y_len)?;
        let f0 = &frames[0];
        let f1 = &frames[1];
        let mut rate = |what: &str, up: Option<&Imported>, down: Option<&Imported>, conv: bool| {
            let round = || -> Result<Option<Fence>> {
                if let Some(dst) = up {
                    cuda.upload(&inputs[0], dst, 0..x_len)?;
                }
                if let Some(src) = down {
                    cuda.download(src, &outputs[0], 0..y_len)?;
                }
                conv.then(|| convolve(f1)).transpose()
            };
            let finish = |fence: Option<Fence>| -> Result<()> {
                cuda.sync(Stream::Up)?;
                cuda.sync(Stream::Down)?;
                fence.map_or(Ok(()), |f| f.wait(FENCE_TIMEOUT))
            };
            finish(round()?)?;
            let t = Instant::now();
            let mut last = None;
            for _ in 0..REPS {
                last = round()?;
            }
            finish(last)?;
            let ms = t.elapsed().as_secs_f64() * 1e3 / REPS as f64;
            let bytes = (usize::from(up.is_some()) * x_len + usize::from(down.is_some()) * y_len)
                as f64
                * 4.0;
            out += &format!("{what}: {ms:.3} ms ({:.1} GB/s)\n", bytes / ms / 1e6);
            Ok::<_, Error>(())
        };
        let (shared_in, shared_out) = (f0.input.imported(), f0.output.imported());
        for (what, up, down, conv) in [
            ("gl convolution alone", None, None, true),
            ("cuda in, own memory", Some(&own_in), None, false),
            ("cuda out, own memory", None, Some(&own_out), false),
            (
                "cuda in + out, own memory",
                Some(&own_in),
                Some(&own_out),
                false,
            ),
            ("cuda in, imported", Some(shared_in), None, false),
            ("cuda out, imported", None, Some(shared_out), false),
            (
                "cuda in + out, imported",
                Some(shared_in),
                Some(shared_out),
                false,
            ),
            (
                "cuda in + out, imported, + gl convolution",
                Some(shared_in),
                Some(shared_out),
                true,
            ),
        ] {
            rate(what, up, down, conv)?;
        }

        // A synchronous call's copy out, GPU copy then host copy into pageable memory, into
        // staging the host read the time before (calls 100 µs apart): as the executor copies
        // out, the staging flushed from the caches after (timed apart), the copy in 4 pieces
        // each copied by the host as it lands, and two staging buffers in turn. Found:
        // docs/experiments.md, "GPU: a synchronous call's copy out".
        {
            let dev = f0.output.imported();
            let mut fill = cuda.pinned(y_len)?;
            crate::data::fill_uniform(5, fill.as_mut_slice());
            cuda.upload(&fill, dev, 0..y_len)?;
            cuda.sync(Stream::Up)?;
            let mut dst = vec![0.0f32; y_len];
            use super::host_copy::{parallel_flush, split_copy_always};
            for (what, mode, pieces) in [
                ("registered, plain loads", 0, 1),
                ("registered, plain loads, flushed after", 2, 1),
                ("registered, plain loads, 4 pieces", 0, 4),
                ("two registered in turn, plain loads", 3, 1),
                ("registered, plain loads", 0, 1),
                ("registered, plain loads, flushed after", 2, 1),
            ] {
                let stagings = [
                    cuda.pinned_with(y_len, true, 0)?,
                    cuda.pinned_with(y_len, true, 0)?,
                ];
                let per = y_len.div_ceil(pieces).next_multiple_of(16);
                let ranges: Vec<std::ops::Range<usize>> = (0..pieces)
                    .map(|i| (i * per).min(y_len)..((i + 1) * per).min(y_len))
                    .collect();
                let events = (0..pieces)
                    .map(|_| cuda.event())
                    .collect::<Result<Vec<Event>>>()?;
                let (mut landed, mut total, mut flush) = (Vec::new(), Vec::new(), vec![0.0]);
                for rep in 0..=REPS {
                    let staging = &stagings[if mode == 3 { rep % 2 } else { 0 }];
                    dst.fill(f32::NAN);
                    let t0 = Instant::now();
                    for (r, e) in ranges.iter().zip(&events) {
                        cuda.download(dev, staging, r.clone())?;
                        cuda.record(e, Stream::Down)?;
                    }
                    let mut first = None;
                    for (r, e) in ranges.iter().zip(&events) {
                        if !e.wait(FENCE_TIMEOUT)? {
                            return Err(Error::Gpu("probe-cuda: a copy out hung".into()));
                        }
                        first.get_or_insert(t0.elapsed().as_secs_f64() * 1e3);
                        split_copy_always(&staging.as_slice()[r.clone()], &mut dst[r.clone()]);
                    }
                    if rep > 0 {
                        landed.push(first.unwrap_or(0.0));
                        total.push(t0.elapsed().as_secs_f64() * 1e3);
                    }
                    if mode == 2 {
                        let t = Instant::now();
                        parallel_flush(staging.as_slice());
                        flush.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    // The time a call spends between its copies out (copy in, kernel, hops).
                    let gap = Instant::now();
                    while gap.elapsed().as_micros() < 100 {
                        std::hint::spin_loop();
                    }
                }
                let wrong = (dst.iter().zip(fill.as_slice()))
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                if wrong > 0 {
                    return Err(Error::Gpu(format!(
                        "probe-cuda: {what}: {wrong} floats wrong"
                    )));
                }
                let median = |v: &mut Vec<f64>| {
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2]
                };
                out += &format!(
                    "copy out {what}: {:.3} ms in all, first piece landed at {:.3} ms, flush \
                     {:.3} ms (medians)\n",
                    median(&mut total),
                    median(&mut landed),
                    median(&mut flush)
                );
            }
        }

        // Host copies (parallel, streaming stores) into and out of each kind of host memory.
        {
            let src = vec![1.0f32; x_len];
            let mut dst = vec![0.0f32; x_len];
            let mut time = |what: &str, buf: &mut [f32]| {
                let med = |f: &mut dyn FnMut()| {
                    let mut t: Vec<f64> = (0..7)
                        .map(|_| {
                            let t0 = Instant::now();
                            f();
                            t0.elapsed().as_secs_f64() * 1e3
                        })
                        .collect();
                    t.sort_by(f64::total_cmp);
                    t[3]
                };
                let into = med(&mut || super::host_copy::parallel_copy(&src, buf));
                let from = med(&mut || super::host_copy::parallel_copy(buf, &mut dst));
                let gb = (x_len * 4) as f64 / 1e6;
                out += &format!(
                    "host copy {what}: in {into:.3} ms ({:.1} GB/s), out {from:.3} ms ({:.1} GB/s)\n",
                    gb / into,
                    gb / from
                );
            };
            let mut plain = vec![0.0f32; x_len];
            time("plain memory", &mut plain);
            for (what, registered, flags) in [
                ("cuMemHostAlloc", false, 0),
                (
                    "cuMemHostAlloc write-combined",
                    false,
                    cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED,
                ),
                ("registered 2 MiB pages", true, 0),
            ] {
                let mut p = cuda.pinned_with(x_len, registered, flags)?;
                time(what, p.as_mut_slice());
            }
            for direction in [gl::Direction::Upload, gl::Direction::Download] {
                let mut m = gl::MappedBuffer::new(&gl, x_len, direction)?;
                time(&format!("GL mapped {direction:?}"), m.as_mut_slice());
            }
        }

        // The stream: step t copies batch t in, convolves batch t - 1, copies batch t - 2 out.
        let stream = |frames: &mut [Frame], outputs: &[Pinned]| -> Result<f64> {
            let t0 = Instant::now();
            for t in 0..batches + 2 {
                if t < batches {
                    // Its input buffer was last read by batch t - 3's convolution, whose fence
                    // passed before that batch was copied out (step t - 1).
                    let f = &frames[t % FRAMES];
                    cuda.upload(&inputs[t % INPUTS], f.input.imported(), 0..x_len)?;
                    cuda.record(&f.uploaded, Stream::Up)?;
                }
                if (1..=batches).contains(&t) {
                    let f = &mut frames[(t - 1) % FRAMES];
                    cuda.wait(&f.uploaded)?;
                    // Its output buffer was last read by batch t - 4's copy out.
                    cuda.wait(&f.downloaded)?;
                    f.computed = Some(convolve(f)?);
                }
                if t >= 2 {
                    let b = t - 2;
                    let f = &mut frames[b % FRAMES];
                    if let Some(fence) = f.computed.take() {
                        fence.wait(FENCE_TIMEOUT)?;
                    }
                    cuda.download(f.output.imported(), &outputs[b], 0..y_len)?;
                    cuda.record(&f.downloaded, Stream::Down)?;
                }
            }
            cuda.sync(Stream::Down)?;
            Ok(t0.elapsed().as_secs_f64() * 1e3 / batches as f64)
        };
        let check = |outputs: &[Pinned]| -> (usize, f32) {
            let mut wrong = 0;
            let mut worst = 0.0f32;
            for (b, y) in outputs.iter().enumerate() {
                for (a, e) in y.as_slice().iter().zip(&expected[b % INPUTS]) {
                    if a.to_bits() != e.to_bits() {
                        wrong += 1;
                        worst = worst.max((a - e).abs());
                    }
                }
            }
            (wrong, worst)
        };
        stream(&mut frames, &outputs)?;
        let mut times = Vec::new();
        for run in 0..RUNS {
            // Every output must be written again by this run.
            for y in outputs.iter_mut() {
                y.as_mut_slice().fill(f32::NAN);
            }
            let ms = stream(&mut frames, &outputs)?;
            let (wrong, worst) = check(&outputs);
            out += &format!(
                "stream run {run}: {ms:.3} ms a batch ({batches} batches); {wrong} of {} \
                 outputs differ from the GL backend's (largest difference {worst:e})\n",
                batches * y_len
            );
            if wrong > 0 {
                return Err(Error::Gpu(format!("probe-cuda: wrong outputs\n{out}")));
            }
            times.push(ms);
        }
        times.sort_by(f64::total_cmp);
        out += &format!(
            "cuda-stream median {:.3} ms a batch ({:.1} GB/s in and out together)\n",
            times[RUNS / 2],
            ((x_len + y_len) * 4) as f64 / times[RUNS / 2] / 1e6
        );
        // Buffers before the CUDA context (drop order): frames, outputs, inputs, own memory.
        drop(frames);
        drop(outputs);
        drop(inputs);
        drop((own_in, own_out));
        drop(copies);
        Ok(out)
    }
}
