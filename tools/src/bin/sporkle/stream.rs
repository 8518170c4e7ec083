//! `sporkle bench --stream` and `--one-call`: batches through the Juggler's streaming and
//! synchronous paths, where each call's time went, every output verified.

use super::{
    json_lines, juggler, median, print_comparison, read_in_place, round2, round4, stage_ms,
    verify_in_place, verify_sample, warm_up, BenchArgs, DeviceArg, BENCH_CHECKS,
};
use anyhow::{anyhow, bail, Context, Result};
use sporkle::juggler::DeviceKind;
use sporkle::Preference;
use std::sync::Arc;
use std::time::Instant;

/// `--stream N`: per shape, N batches submitted through the Juggler with async on (all
/// submitted, then all waited), and the same N with async off, one call at a time, the two
/// modes' runs alternating; every output is verified.
/// Prints one JSON line per shape and mode, and the stage times U (host copy in + GPU copy in),
/// C (kernel), D (GPU copy out + host copy out), from the synchronous run where each is a step
/// of its own (summed over a big job's parts), and how close async comes to the ideal pipeline,
/// max(U, C, D) a batch.
pub(super) fn stream(a: &BenchArgs, cases: &[&sporkle::suite::Case], batches: usize) -> Result<()> {
    let preference = match a.device {
        DeviceArg::Auto => Preference::Auto,
        DeviceArg::Gpu => Preference::Gpu,
        DeviceArg::Cpu => bail!("--stream needs --device auto or gpu"),
    };
    if batches == 0 {
        bail!("--stream needs at least one batch");
    }
    let j = juggler(preference, a.threads)?;
    eprintln!(
        "# stream: {STREAM_RUNS} runs of {batches} batches per shape through the Juggler (GPU: {}), the median run reported; async = all submitted then all waited, sync = async off and one call at a time (their runs alternate); ms per batch, host input -> host output, every output verified at {} points",
        j.gpu_description().unwrap_or_else(|e| format!("none, {e}")),
        BENCH_CHECKS + 2
    );
    let mut emit = json_lines(a.json.as_deref())?;
    let who = j.gpu_description().unwrap_or_else(|_| "cpu".into());
    for case in cases {
        let p = case.params;
        // Distinct inputs per batch (a few, cycled), one weight set: a layer over a stream.
        // Shared buffers: the caller's data go to the GPU without a copy on submission.
        let inputs: Vec<Arc<[f32]>> = (0..batches.min(3))
            .map(|i| sporkle::data::conv_data(&p, 42 + i as u64, false).0.into())
            .collect();
        let (_, w, b) = sporkle::data::conv_data(&p, 42, false);
        let bias = case.bias.then_some(&b[..]);
        let (w_shared, b_shared): (Arc<[f32]>, Option<Arc<[f32]>>) =
            (w.clone().into(), bias.map(Into::into));
        let submit = |i: usize| {
            j.submit_shared(
                &p,
                Arc::clone(&inputs[i % inputs.len()]),
                Arc::clone(&w_shared),
                b_shared.clone(),
            )
        };
        warm_up(&submit, 2)?;
        // One output buffer per batch, written once before timing (as the peer's pinned
        // outputs are allocated before its timing): fresh memory costs a page fault per 4 KiB.
        let mut outs: Vec<Vec<f32>> = (0..batches).map(|_| vec![1.0f32; p.output_len()]).collect();
        // Async again, all submitted, then each output read where it lies (in the staging buffer,
        // host memory, with no copy into a buffer of the caller's) and checked after the timing.
        j.set_async(true);
        let mut in_place_mode = |mode: &str,
                                 submit: &dyn Fn(usize) -> sporkle::Result<sporkle::Ticket>|
         -> Result<()> {
            let mut times = Vec::new();
            let mut runs = Vec::new();
            for _ in 0..STREAM_RUNS {
                let t = Instant::now();
                let tickets = (0..batches)
                    .map(submit)
                    .collect::<sporkle::Result<Vec<_>>>()?;
                let (infos, samples) = read_in_place(tickets)?;
                times.push(t.elapsed().as_secs_f64() / batches as f64 * 1e3);
                verify_in_place(&p, &inputs, &w, bias, &samples, &infos, &case.name)?;
                runs = infos;
            }
            let ms = median(&mut times);
            report_spread(&case.name, mode, &times);
            report_steps(&case.name, mode, &runs);
            let on_gpu = runs.iter().any(|i| i.device == DeviceKind::Gpu);
            emit(serde_json::json!({
                "shape": case.name,
                "device": format!("sporkle-stream-{mode} {}", if on_gpu { who.as_str() } else { "cpu" }),
                "ms": round4(ms),
                "gflops": round2(p.flops() as f64 / ms / 1e6),
            }))
        };
        in_place_mode("async-inplace", &submit)?;
        // Pinned: the inputs in pinned buffers, written once (as the peer's pinned input is),
        // which the GPU reads directly; outputs read and verified in place.
        let pinned = inputs
            .iter()
            .map(|x| {
                let mut b = j.pinned_input(x.len())?;
                b.as_mut_slice()?.copy_from_slice(x);
                Ok(b)
            })
            .collect::<sporkle::Result<Vec<_>>>()?;
        let submit_pinned = |i: usize| {
            j.submit_pinned(
                &p,
                &pinned[i % pinned.len()],
                Arc::clone(&w_shared),
                b_shared.clone(),
            )
        };
        warm_up(&submit_pinned, 1)?;
        in_place_mode("async-pinned", &submit_pinned)?;
        drop(pinned);
        // Async and sync runs alternate, so that a change in the machine's load (the host
        // copies share its memory bandwidth with other tenants) weighs on both alike.
        let mut times: [Vec<f64>; 2] = Default::default();
        let mut per_mode: [Vec<sporkle::RunInfo>; 2] = Default::default();
        for _ in 0..STREAM_RUNS {
            for (m, on) in [true, false].into_iter().enumerate() {
                j.set_async(on);
                let t = Instant::now();
                let results = if on {
                    // Async: everything submitted, then waited in order (the executor keeps at
                    // most JOBS_PER_STEP on the GPU).
                    let tickets = (0..batches)
                        .map(submit)
                        .collect::<sporkle::Result<Vec<_>>>()?;
                    tickets
                        .into_iter()
                        .zip(outs.iter_mut())
                        .map(|(t, out)| t.wait_into(out))
                        .collect::<sporkle::Result<Vec<_>>>()?
                } else {
                    // Sync: one call at a time, each waited before the next is submitted.
                    outs.iter_mut()
                        .enumerate()
                        .map(|(i, out)| submit(i)?.wait_into(out))
                        .collect::<sporkle::Result<Vec<_>>>()?
                };
                let wall = t.elapsed().as_secs_f64();
                for (i, (y, info)) in outs.iter_mut().zip(&results).enumerate() {
                    verify_sample(&p, &inputs[i % inputs.len()], &w, bias, y).with_context(
                        || format!("shape {}: batch {i} ({}) is wrong", case.name, info.device),
                    )?;
                    y.fill(f32::NAN);
                }
                times[m].push(wall / batches as f64 * 1e3);
                per_mode[m] = results;
            }
        }
        let mut ms = [0.0; 2];
        for (m, mode) in ["async", "sync"].into_iter().enumerate() {
            ms[m] = median(&mut times[m]);
            report_spread(&case.name, mode, &times[m]);
            let devices: std::collections::BTreeSet<String> =
                per_mode[m].iter().map(|i| i.device.to_string()).collect();
            emit(serde_json::json!({
                "shape": case.name,
                "device": format!("sporkle-stream-{mode} {}", if devices.contains("gpu") { who.as_str() } else { "cpu" }),
                "ms": round4(ms[m]),
                "gflops": round2(p.flops() as f64 / ms[m] / 1e6),
            }))?;
        }
        j.set_async(true);
        // Stage times from the synchronous run (jobs alone), medians.
        let stages: Vec<_> = per_mode[1].iter().filter_map(|i| i.stages).collect();
        if stages.len() == batches {
            let med = |f: &dyn Fn(&sporkle::Stages) -> f64| stage_ms(&stages, f);
            let u = med(&|s| s.host_in_s + s.upload_s.unwrap_or(0.0));
            let c = med(&|s| s.kernel_s.unwrap_or(0.0));
            let d = med(&|s| s.download_s.unwrap_or(0.0) + s.host_out_s);
            // A perfect pipeline takes the longest stage a batch. (The synchronous run is
            // not the serial sum: big jobs overlap their own phases in parts.)
            let ideal = u.max(c).max(d);
            let speedup = ms[1] / ms[0];
            report_steps(&case.name, "async", &per_mode[0]);
            eprintln!(
                "# {}: U {u:.3} ms (host {:.3} + GPU copy {:.3}), C {c:.3} ms, D {d:.3} ms (GPU copy {:.3} + host {:.3}); async/sync {speedup:.2}x; async at {:.2} of the ideal pipeline (the longest stage, {ideal:.3} ms a batch); at most {} in flight",
                case.name,
                med(&|s| s.host_in_s),
                med(&|s| s.upload_s.unwrap_or(0.0)),
                med(&|s| s.download_s.unwrap_or(0.0)),
                med(&|s| s.host_out_s),
                ideal / ms[0],
                per_mode[0].iter().filter_map(|i| i.stages.map(|s| s.in_flight)).max().unwrap_or(0),
            );
        }
    }
    eprintln!("# {}", j.stats().to_string().replace('\n', "\n# "));
    Ok(())
}

/// `--one-call`: per shape, synchronous GPU calls one at a time through the Juggler, timed as
/// the peer times its serial calls (`wall_ms` in shared/peers/torch_conv.py: loops of calls
/// for about 50 ms, the median loop's mean), from ordinary memory and from a pinned input; one
/// JSON line per shape and mode, and on stderr where a call's time went (medians over the timed
/// calls): the fixed cost is the wall time less the host copies, the GPU copies and the kernel.
pub(super) fn one_call(
    a: &BenchArgs,
    cases: &[&sporkle::suite::Case],
    peers: &[(String, String, f64)],
) -> Result<()> {
    if a.device != DeviceArg::Gpu {
        bail!("--one-call needs --device gpu");
    }
    let j = juggler(Preference::Gpu, a.threads)?;
    j.set_async(false);
    let who = j
        .gpu_description()
        .map_err(|e| anyhow!("--one-call needs a GPU: {e}"))?;
    eprintln!(
        "# one call: synchronous GPU calls through the Juggler ({who}); ms per call = median of {ONE_CALL_LOOPS} loops of calls (about 50 ms each) of the loop's mean, host input -> host output; every output verified at {} points",
        BENCH_CHECKS + 2
    );
    let mut emit = json_lines(a.json.as_deref())?;
    // Per shape and mode (pageable, pinned): GFLOP/s.
    let mut rows: [Vec<(String, f64, f64)>; 2] = Default::default();
    for case in cases {
        let p = case.params;
        let (x, w, b) = sporkle::data::conv_data(&p, 42, false);
        let bias = case.bias.then_some(&b[..]);
        let (w_shared, b_shared): (Arc<[f32]>, Option<Arc<[f32]>>) =
            (w.clone().into(), bias.map(Into::into));
        // Written once before timing, as the peer's output is allocated before its timing.
        let mut y = vec![1.0f32; p.output_len()];
        let mut pinned = j.pinned_input(x.len())?;
        pinned.as_mut_slice()?.copy_from_slice(&x);
        let mut sample = Vec::new();
        for (m, mode) in ["pageable", "pinned"].into_iter().enumerate() {
            let mut infos = Vec::new();
            let mut call = |keep: bool| -> Result<()> {
                let info = if m == 0 {
                    j.conv2d(&p, &x, &w, bias, &mut y)?
                } else {
                    let ticket =
                        j.submit_pinned(&p, &pinned, Arc::clone(&w_shared), b_shared.clone())?;
                    let (s, info) =
                        ticket.wait_with(|y| sporkle::tolerance::read_sample(y, BENCH_CHECKS))?;
                    sample = s;
                    info
                };
                if info.device != DeviceKind::Gpu {
                    bail!(
                        "shape {}: a call ran on the {} ({})",
                        case.name,
                        info.device,
                        info.fallback.as_deref().unwrap_or(&info.reason)
                    );
                }
                if keep {
                    infos.push(info);
                }
                Ok(())
            };
            let ms = loops_ms(&mut |keep| call(keep))?;
            if m == 0 {
                verify_sample(&p, &x, &w, bias, &y)
            } else {
                let tol = sporkle::gpu::Algorithm::for_params(&p).tolerance();
                sporkle::tolerance::check_points(&p, &x, &w, bias, &sample, tol)
                    .map(|_| ())
                    .map_err(|e| anyhow!("{e}"))
            }
            .with_context(|| format!("shape {} ({mode}): result is wrong", case.name))?;
            y.fill(f32::NAN);
            report_call(&case.name, mode, &infos);
            let gflops = p.flops() as f64 / ms / 1e6;
            emit(serde_json::json!({
                "shape": case.name,
                "device": format!("sporkle-call-{mode} {who}"),
                "ms": round4(ms),
                "gflops": round2(gflops),
            }))?;
            rows[m].push((case.name.clone(), gflops, gflops));
        }
    }
    eprintln!("# {}", j.stats().to_string().replace('\n', "\n# "));
    for (m, peer_mode) in ["pageable-serial", "pinned-serial"].into_iter().enumerate() {
        let theirs: Vec<_> = (peers.iter())
            .filter(|p| p.1.contains(peer_mode))
            .cloned()
            .collect();
        if !theirs.is_empty() {
            print_comparison(&rows[m], &theirs);
        }
    }
    Ok(())
}

/// Loops a serial peer times: one call to estimate, then [`ONE_CALL_LOOPS`] loops of as many
/// calls as take about 50 ms (1 to 2000), after three warm-up calls; the median loop's mean,
/// in ms. `call(true)` is a timed call.
fn loops_ms(call: &mut dyn FnMut(bool) -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        call(false)?;
    }
    let t = Instant::now();
    call(false)?;
    let calls = ((0.05 / t.elapsed().as_secs_f64().max(1e-6)) as usize).clamp(1, 2000);
    let mut loops = Vec::new();
    for _ in 0..ONE_CALL_LOOPS {
        let t = Instant::now();
        for _ in 0..calls {
            call(true)?;
        }
        loops.push(t.elapsed().as_secs_f64() * 1e3 / calls as f64);
    }
    Ok(median(&mut loops))
}

/// Loops `--one-call` times (the peer's `wall_ms` takes the median of 5 too).
const ONE_CALL_LOOPS: usize = 5;

/// Where one-call mode `mode`'s calls went, medians over `infos`, on stderr.
fn report_call(shape: &str, mode: &str, infos: &[sporkle::RunInfo]) {
    let stages: Vec<_> = infos.iter().filter_map(|i| i.stages).collect();
    let med = |f: &dyn Fn(&sporkle::Stages) -> f64| stage_ms(&stages, f);
    let wall = median(&mut infos.iter().map(|i| i.wall_s * 1e3).collect::<Vec<_>>());
    let (host_in, up, kernel, down, host_out) = (
        med(&|s| s.host_in_s),
        med(&|s| s.upload_s.unwrap_or(0.0)),
        med(&|s| s.kernel_s.unwrap_or(0.0)),
        med(&|s| s.download_s.unwrap_or(0.0)),
        med(&|s| s.host_out_s),
    );
    // Per call, then the median: the medians of the parts need not add up to the whole's.
    let per_call = |f: &dyn Fn(&sporkle::Stages, &sporkle::RunInfo) -> f64| {
        median(
            &mut stages
                .iter()
                .zip(infos)
                .map(|(s, i)| f(s, i) * 1e6)
                .collect::<Vec<_>>(),
        )
    };
    // The fixed cost's parts: the trip to the worker, the GPU's wall time beyond its timed
    // work, the fence to the answer, the answer to the caller, and the rest (the caller's own).
    let queued = per_call(&|s, _| s.queued_s);
    let gpu_gaps = per_call(&|s, _| {
        s.gpu_wall_s
            - s.upload_s.unwrap_or(0.0)
            - s.kernel_s.unwrap_or(0.0)
            - s.download_s.unwrap_or(0.0)
    });
    // Of those gaps, where the GPU's own span (first copy started to last copy ended) is
    // known: those inside it (a phase waiting for the host to see the one before end and start
    // it), and the rest (before the first copy started and after the last ended).
    let span_s = |s: &sporkle::Stages| {
        s.gpu_span_ns
            .map(|(a, b)| b.saturating_sub(a) as f64 * 1e-9)
    };
    let spans = stages.iter().any(|s| span_s(s).is_some());
    let inside = per_call(&|s, _| {
        span_s(s).unwrap_or(0.0)
            - s.upload_s.unwrap_or(0.0)
            - s.kernel_s.unwrap_or(0.0)
            - s.download_s.unwrap_or(0.0)
    });
    let edges = per_call(&|s, _| s.gpu_wall_s - span_s(s).unwrap_or(0.0));
    // A call in parts overlaps its phases: its copies and kernels then sum to more than the
    // GPU's span, the gaps inside the span are not the hops', and the fixed cost counts the
    // span instead of the summed work.
    let parts = stages.iter().map(|s| s.parts).max().unwrap_or(1);
    let in_parts = spans && parts > 1;
    let split = if in_parts {
        let span = per_call(&|s, _| span_s(s).unwrap_or(0.0)) / 1e3;
        format!(
            " (in {parts} parts: copies and kernels overlap, {:.3} ms summed in a GPU span of {span:.3} ms; before the first copy and after the last {edges:.1})",
            up + kernel + down
        )
    } else if spans {
        format!(" (between its phases {inside:.1}, before the first and after the last {edges:.1})")
    } else {
        String::new()
    };
    let (fixed, fixed_what) = if in_parts {
        (
            per_call(&|s, i| i.wall_s - s.host_in_s - s.host_out_s - span_s(s).unwrap_or(0.0)),
            "the wall time less host copies and the GPU span",
        )
    } else {
        (
            per_call(&|s, i| {
                i.wall_s
                    - s.host_in_s
                    - s.upload_s.unwrap_or(0.0)
                    - s.kernel_s.unwrap_or(0.0)
                    - s.download_s.unwrap_or(0.0)
                    - s.host_out_s
            }),
            "the wall time less copies and kernel",
        )
    };
    let settle = per_call(&|s, _| s.settle_s);
    let wake = per_call(&|s, _| s.wake_s);
    let caller = per_call(&|s, i| {
        i.wall_s - s.host_in_s - s.host_out_s - s.queued_s - s.gpu_wall_s - s.settle_s - s.wake_s
    });
    let copies = if stages.iter().any(|s| s.cuda_copies) {
        "CUDA copies"
    } else if stages.iter().any(|s| s.fused) {
        "shader copies"
    } else {
        "GL copies"
    };
    eprintln!(
        "# {shape} {mode}: {wall:.3} ms a call (median of the calls): host in {host_in:.3}, copy in {up:.3}, kernel {kernel:.3}, copy out {down:.3}, host out {host_out:.3}; fixed cost {fixed:.1} µs ({fixed_what}; {copies}; {} calls)\n#   fixed cost, µs: to the worker {queued:.1}, GPU wall time beyond its timed work {gpu_gaps:.1}{split}, fence to answer {settle:.1}, answer to caller {wake:.1}, in the caller {caller:.1}",
        infos.len()
    );
}

/// Where a streaming mode's GPU time went, over the jobs of one run (`infos`): how much
/// consecutive jobs' GPU spans (first step start to last step end) overlapped, the run's GPU
/// window, with CUDA copies how busy each copy stream was, how many jobs shared steps or had
/// fused copies, and the median step times.
fn report_steps(shape: &str, mode: &str, infos: &[sporkle::RunInfo]) {
    let stages: Vec<_> = infos.iter().filter_map(|i| i.stages).collect();
    let mut spans: Vec<(u64, u64)> = stages.iter().filter_map(|s| s.gpu_span_ns).collect();
    spans.sort_unstable();
    let overlap_ns: u64 = spans
        .windows(2)
        .map(|w| w[0].1.min(w[1].1).saturating_sub(w[1].0))
        .sum();
    let busy_ns: u64 = spans.iter().map(|&(a, b)| b.saturating_sub(a)).sum();
    if !spans.is_empty() {
        eprintln!(
            "# {shape} {mode} GPU spans: {:.3} ms of GPU work per batch, of which {:.3} ms overlapped the previous job's",
            busy_ns as f64 / 1e6 / spans.len() as f64,
            overlap_ns as f64 / 1e6 / spans.len() as f64,
        );
    }
    // The run's GPU window (ns): first copy in started to last copy out ended.
    let window = (spans.first())
        .zip(spans.iter().map(|s| s.1).max())
        .map(|(first, last)| last - first.0);
    if let Some(window) = window {
        eprintln!(
            "# {shape} {mode} GPU window of the last run (first copy in started to last copy out ended): {:.3} ms per batch",
            window as f64 / 1e6 / spans.len() as f64
        );
    }
    // With CUDA copies, each stage is a copy's own time: how busy each copy stream was over
    // the window, and the idle gaps between consecutive copies.
    let mut by_start: Vec<_> = stages
        .iter()
        .filter(|s| s.cuda_copies)
        .filter_map(|s| Some((s.gpu_span_ns?, s.upload_s?, s.download_s?)))
        .collect();
    if by_start.len() > 1 && by_start.len() == stages.len() {
        by_start.sort_by_key(|c| c.0 .0);
        let ns = |s: f64| (s * 1e9) as u64;
        let (mut gap_in, mut gap_out) = (0u64, 0u64);
        for w in by_start.windows(2) {
            let ((a, up_a, _), (b, _, down_b)) = (w[0], w[1]);
            gap_in += b.0.saturating_sub(a.0 + ns(up_a));
            gap_out += b.1.saturating_sub(ns(down_b)).saturating_sub(a.1);
        }
        // Every job has its span here, so the window is the spans' own.
        let window = window.unwrap_or(0);
        let percent = |busy_s: f64| busy_s * 1e9 / window.max(1) as f64 * 100.0;
        eprintln!(
            "# {shape} {mode} CUDA copy streams over that window: in busy {:.0}%, out busy {:.0}%; gaps between consecutive copies: in {:.3} ms, out {:.3} ms per batch",
            percent(by_start.iter().map(|c| c.1).sum()),
            percent(by_start.iter().map(|c| c.2).sum()),
            gap_in as f64 / 1e6 / by_start.len() as f64,
            gap_out as f64 / 1e6 / by_start.len() as f64,
        );
    }
    let shared = stages.iter().filter(|s| s.steps_shared).count();
    let fused = stages.iter().filter(|s| s.fused).count();
    let cuda = stages.iter().filter(|s| s.cuda_copies).count();
    let parts = stages.iter().map(|s| s.parts).max().unwrap_or(1);
    let med = |f: &dyn Fn(&sporkle::Stages) -> f64| stage_ms(&stages, f);
    eprintln!(
        "# {shape} {mode}: {shared} of {} jobs shared steps with other jobs, {fused} had copies fused into a convolution's dispatch, {cuda} had CUDA copies (timed alone), batches in up to {parts} parts; medians (shared steps timed whole): host in {:.3} ms, copy-in step {:.3}, convolution step {:.3}, copy-out step {:.3}, host out {:.3}",
        stages.len(),
        med(&|s| s.host_in_s),
        med(&|s| s.upload_s.unwrap_or(0.0)),
        med(&|s| s.kernel_s.unwrap_or(0.0)),
        med(&|s| s.download_s.unwrap_or(0.0)),
        med(&|s| s.host_out_s),
    );
}

/// Timed runs of each streaming mode (the peer's pipeline reports the median of 5 too).
const STREAM_RUNS: usize = 5;

/// The sorted times (ms per batch) of a streaming mode's runs, for telling a change from noise.
fn report_spread(shape: &str, mode: &str, times: &[f64]) {
    let mut t = times.to_vec();
    t.sort_by(f64::total_cmp);
    let list: Vec<String> = t.iter().map(|ms| format!("{ms:.3}")).collect();
    eprintln!(
        "# {shape} {mode}: ms per batch of each run, sorted: {}",
        list.join(" ")
    );
}
