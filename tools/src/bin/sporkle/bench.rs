//! `sporkle bench`: the benchmark shape set, one JSON line per shape (the peers' format), kernel
//! and end-to-end times apart, every output checked; and the comparison with peers' lines.

use super::stream::{one_call, stream};
use super::{
    cpu_backend_with, cpu_peak, engine, find_shape, json_lines, juggler, median, perf_suite,
    print_comparison, read_peer_lines, round2, round4, timed, verify_sample, BenchArgs, DeviceArg,
    Engine, BENCH_CHECKS,
};
use anyhow::{bail, Context, Result};
use sporkle::cpu::{CpuPath, Microkernel};
use sporkle::gpu::Dispatches;
use sporkle::juggler::DeviceKind;
use sporkle::suite::Suite;
use sporkle::Preference;
use std::time::Instant;

pub(super) fn bench(a: BenchArgs) -> Result<()> {
    let suite = match &a.suite {
        Some(path) => Suite::load(path)?,
        None => perf_suite()?,
    };
    let cases: Vec<_> = if a.shapes.is_empty() {
        suite.cases.iter().collect()
    } else {
        (a.shapes.iter())
            .map(|s| find_shape(&suite, s))
            .collect::<Result<_>>()?
    };
    let peers = match &a.compare {
        Some(path) => read_peer_lines(path)?,
        None => Vec::new(),
    };
    if let Some(batches) = a.stream {
        return stream(&a, &cases, batches);
    }
    if a.one_call {
        return one_call(&a, &cases, &peers);
    }
    let engine = match (a.device, a.cpu_path, a.microkernel) {
        (DeviceArg::Cpu, path, kernel) if path.is_some() || kernel.is_some() => {
            let cpu = cpu_backend_with(a.threads, kernel.unwrap_or_else(Microkernel::detect))?;
            Engine::Cpu(match path {
                Some(path) => cpu.with_path(path),
                None => cpu,
            })
        }
        (_, Some(_), _) | (_, _, Some(_)) => {
            bail!("--cpu-path and --microkernel need --device cpu")
        }
        (device, None, None) => engine(device, a.threads)?,
    };
    match &engine {
        Engine::Cpu(cpu) => eprintln!(
            "# cpu: {} threads, {} microkernel; weights prepared once per shape; median wall time of input -> output runs after warm-up; every shape verified at {} points",
            cpu.threads(),
            cpu.microkernel().name(),
            BENCH_CHECKS + 2
        ),
        Engine::Gpu(gpu, _) => eprintln!(
                        "# gpu: {}{}; kernel = median GL_TIME_ELAPSED of back-to-back dispatches, each timed alone; e2e = median wall time of synchronous Juggler::conv2d calls, host input -> host output (weights resident); both outputs verified at {} points",
            gpu.info().renderer,
            if gpu.info().software { " (software: timings mean nothing)" } else { "" },
            BENCH_CHECKS + 2
        ),
        Engine::Auto(j) => eprintln!(
            "# auto: the Juggler picks per call (GPU: {}); median wall time of whole calls after warm-up (the first calls measure and may try both devices); every shape verified at {} points",
            j.gpu_description().unwrap_or_else(|e| format!("none, {e}")),
            BENCH_CHECKS + 2
        ),
    }
    let mut emit = json_lines(a.json.as_deref())?;
    // Per shape: our GFLOP/s by kernel time (GPU) or wall time (CPU), and end to end.
    let mut rows: Vec<(String, f64, f64)> = Vec::new();
    if a.vs_fixed && !matches!(engine, Engine::Auto(_)) {
        bail!("--vs-fixed needs --device auto");
    }
    let fixed = if a.vs_fixed {
        Some((
            juggler(Preference::Cpu, a.threads)?,
            juggler(Preference::Gpu, a.threads)?,
        ))
    } else {
        None
    };
    // Auto's median and the fixed devices' medians per shape, ms.
    let mut totals = [0.0f64; 3];
    for case in cases {
        let p = case.params;
        let (x, w, b) = sporkle::data::conv_data(&p, 42, false);
        let bias = case.bias.then_some(&b[..]);
        let mut y = vec![0.0f32; p.output_len()];
        match &engine {
            Engine::Cpu(cpu) => {
                // Weights are laid out once per shape, as an inference engine does when it
                // loads a model (onnxruntime packs them at session creation).
                let prepared = cpu.prepare_weights(&p, &w)?;
                let mut times = timed(a.seconds, || {
                    Ok(cpu.conv2d_prepared(&p, &x, &prepared, bias, &mut y)?)
                })?;
                verify_sample(&p, &x, &w, bias, &y)
                    .with_context(|| format!("shape {}: result is wrong", case.name))?;
                let ms = median(&mut times) * 1e3;
                let gflops = p.flops() as f64 / ms / 1e6;
                let device = format!("sporkle-cpu-{}t", cpu.threads());
                emit(
                    serde_json::json!({"shape": case.name, "device": device, "ms": round4(ms), "gflops": round2(gflops)}),
                )?;
                if let Some((threads, peak)) = cpu_peak(cpu) {
                    // FLOPs are the direct convolution's whatever ran (BENCHMARKS.md): on the
                    // Winograd path the fraction counts multiplies it never did.
                    let path = cpu.path_for(&p);
                    eprintln!(
                        "# {}: {:.0}% of the FMA peak measured on {} threads at once ({peak:.0} GFLOP/s), path {}{}",
                        case.name,
                        100.0 * gflops / peak,
                        threads,
                        path.name(),
                        match path {
                            CpuPath::Winograd => {
                                " (direct-convolution FLOPs: Winograd F(2x2) does 4/9 of the multiplies)"
                            }
                            CpuPath::WinogradF4 => {
                                " (direct-convolution FLOPs: Winograd F(4x4) does 1/4 of the multiplies)"
                            }
                            _ => "",
                        }
                    );
                }
                rows.push((case.name.clone(), gflops, gflops));
            }
            Engine::Gpu(gpu, j) => {
                // End to end: whole calls through the Juggler, host input in, host output back.
                let mut wall = timed(a.seconds, || {
                    let info = j.conv2d(&p, &x, &w, bias, &mut y)?;
                    if info.device != DeviceKind::Gpu {
                        bail!(
                            "a GPU call ran on the {}: {}",
                            info.device,
                            info.fallback.as_deref().unwrap_or(&info.reason)
                        );
                    }
                    Ok(())
                })?;
                verify_sample(&p, &x, &w, bias, &y)
                    .with_context(|| format!("shape {}: result is wrong", case.name))?;
                // Kernel: dispatches back to back, each timed on its own; the output is checked.
                // As the cuDNN peer does: an estimate from one dispatch, then at least 0.1 s of
                // untimed dispatches to bring the clocks up, then the time budget's worth. A
                // software renderer gives no times (they mean nothing there): one dispatch.
                y.fill(f32::NAN);
                let first = gpu.time_kernel(&p, &x, &w, bias, &mut y, Dispatches::ONE)?;
                let mut kernel: Vec<f64> = match first.first() {
                    Some(&ns) => {
                        let estimate_s = (ns as f64 * 1e-9).max(1e-6);
                        let dispatches = Dispatches {
                            warmup: ((0.1 / estimate_s) as usize).clamp(3, 2000),
                            timed: ((a.seconds / estimate_s) as usize).clamp(10, 2000),
                            ..Dispatches::ONE
                        };
                        y.fill(f32::NAN);
                        gpu.time_kernel(&p, &x, &w, bias, &mut y, dispatches)?
                    }
                    None => Vec::new(),
                }
                .iter()
                .map(|&ns| ns as f64 / 1e6)
                .collect();
                verify_sample(&p, &x, &w, bias, &y).with_context(|| {
                    format!("shape {}: kernel-timing result is wrong", case.name)
                })?;
                let e_ms = median(&mut wall) * 1e3;
                let e_gf = p.flops() as f64 / e_ms / 1e6;
                let r = &gpu.info().renderer;
                // No kernel figure where the timer queries mean nothing (software renderers).
                let k_gf = if kernel.is_empty() {
                    e_gf
                } else {
                    let k_ms = median(&mut kernel);
                    // Sorted by median(): the spread, for telling a slow phase from noise.
                    let (k_min, k_max) = (kernel[0], kernel[kernel.len() - 1]);
                    let k_gf = p.flops() as f64 / k_ms / 1e6;
                    // The plan that ran (Winograd falls back where it does not fit).
                    let plan = gpu.plan_info(&p, bias.is_some())?;
                    let algorithm = format!("{:?}", plan.algorithm).to_lowercase();
                    emit(
                        serde_json::json!({"shape": case.name, "device": format!("sporkle-gpu-kernel {r}"), "ms": round4(k_ms), "gflops": round2(k_gf), "algorithm": algorithm, "plan": plan.key(), "ms_min": round4(k_min), "ms_max": round4(k_max)}),
                    )?;
                    k_gf
                };
                emit(
                    serde_json::json!({"shape": case.name, "device": format!("sporkle-gpu-e2e {r}"), "ms": round4(e_ms), "gflops": round2(e_gf)}),
                )?;
                rows.push((case.name.clone(), k_gf, e_gf));
            }
            Engine::Auto(j) => {
                let mut devices = std::collections::BTreeSet::new();
                let mut last_reason = String::new();
                let mut times = timed(a.seconds, || {
                    let info = j.conv2d(&p, &x, &w, bias, &mut y)?;
                    devices.insert(info.device);
                    last_reason = info.reason;
                    Ok(())
                })?;
                verify_sample(&p, &x, &w, bias, &y)
                    .with_context(|| format!("shape {}: result is wrong", case.name))?;
                let ms = median(&mut times) * 1e3;
                let gflops = p.flops() as f64 / ms / 1e6;
                let used: Vec<String> = devices.iter().map(ToString::to_string).collect();
                if let Some((cpu, gpu)) = &fixed {
                    let mut fixed_ms = [0.0; 2];
                    for (k, jf) in [cpu, gpu].into_iter().enumerate() {
                        y.fill(f32::NAN);
                        // A software GPU is timed by one call: it is slower by orders of
                        // magnitude, and the full timing would take minutes per shape.
                        let mut t = if jf.gpu_is_software() && k == 1 {
                            let t = Instant::now();
                            jf.conv2d(&p, &x, &w, bias, &mut y)?;
                            vec![t.elapsed().as_secs_f64()]
                        } else {
                            timed(a.seconds, || {
                                jf.conv2d(&p, &x, &w, bias, &mut y).map(|_| ())?;
                                Ok(())
                            })?
                        };
                        verify_sample(&p, &x, &w, bias, &y)
                            .with_context(|| format!("shape {}: result is wrong", case.name))?;
                        fixed_ms[k] = median(&mut t) * 1e3;
                    }
                    eprintln!(
                        "# {}: auto {ms:.3} ms ({}), cpu only {:.3} ms, gpu only {:.3} ms; auto's last choice: {last_reason}",
                        case.name,
                        used.join("+"),
                        fixed_ms[0],
                        fixed_ms[1]
                    );
                    totals[0] += ms;
                    totals[1] += fixed_ms[0];
                    totals[2] += fixed_ms[0].min(fixed_ms[1]);
                }
                emit(
                    serde_json::json!({"shape": case.name, "device": format!("sporkle-auto {}", used.join("+")), "ms": round4(ms), "gflops": round2(gflops)}),
                )?;
                rows.push((case.name.clone(), gflops, gflops));
            }
        }
    }
    if let Engine::Auto(j) = &engine {
        eprintln!("# {}", j.stats().to_string().replace('\n', "\n# "));
        if fixed.is_some() {
            eprintln!(
                "# auto total {:.3} ms; always the faster device {:.3} ms; auto / faster = {:.3}; cpu only {:.3} ms",
                totals[0],
                totals[2],
                totals[0] / totals[2],
                totals[1]
            );
        }
    }
    if !peers.is_empty() {
        print_comparison(&rows, &peers);
    }
    Ok(())
}
