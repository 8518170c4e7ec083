//! `sporkle`: the command-line tool. One convolution on `.npy` files (`conv2d`), the benchmark
//! shape set (`bench`), and what this machine offers (`devices`).
//!
//! Errors are one line on stderr and a non-zero exit; `conv2d` checks everything before it
//! writes, so a failed run leaves no output file.

#![forbid(unsafe_code)]

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sporkle::cpu::{CpuPath, Microkernel};
use sporkle::gpu::Dispatches;
use sporkle::juggler::{Config as JugglerConfig, DeviceKind};
use sporkle::params::PaddingSpec;
use sporkle::suite::Suite;
use sporkle::tolerance::check_sample;
use sporkle::{npy, Conv2dParams, CpuBackend, GpuBackend, Juggler, Preference};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

/// `println!` that ends the program quietly when stdout's reader has gone (`sporkle ... | head`)
/// instead of panicking on the broken pipe.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout().lock();
        if let Err(e) = writeln!(o, $($t)*).and_then(|()| o.flush()) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// The benchmark shape set, built in so the binary works from any directory.
const PERF_SUITE: &str = include_str!("../../../suites/perf.toml");

#[derive(Parser)]
#[command(
    name = "sporkle",
    version,
    about = "fp32 2-D convolution (NCHW) on the CPU and GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One convolution: reads .npy inputs, writes the output .npy, prints one JSON object.
    Conv2d(Conv2dArgs),
    /// Times the benchmark shapes; one JSON line per shape ({"shape", "device", "ms", "gflops"}).
    Bench(BenchArgs),
    /// Lists the devices this machine offers.
    Devices,
    /// Diagnostics: DMA and host-read speeds of staging buffers (64 MiB).
    #[cfg(feature = "probes")]
    #[command(hide = true)]
    ProbeStaging,
    /// Diagnostics: do uploads, downloads and compute overlap in separate shared contexts?
    #[cfg(feature = "probes")]
    #[command(hide = true)]
    ProbeOverlap,
    /// Diagnostics: shader copies across the bus, and their overlap with compute, in one context.
    #[cfg(feature = "probes")]
    #[command(hide = true)]
    ProbeZeroCopy {
        /// Floats per copy (#7's batch is 6422528).
        #[arg(default_value_t = 6_422_528)]
        floats: usize,
    },
    /// Diagnostics: streaming a benchmark shape with CUDA's copy engines and GL compute.
    #[cfg(feature = "probes")]
    #[command(hide = true)]
    ProbeCuda {
        /// The shape's name (or number) in suites/perf.toml.
        shape: String,
        /// Batches a timed run.
        #[arg(long, default_value_t = 12)]
        batches: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    /// Let sporkle choose.
    Auto,
    /// The CPU backend.
    Cpu,
    /// The OpenGL compute backend.
    Gpu,
}

#[derive(clap::Args)]
struct Conv2dArgs {
    /// Input, float32 n×c_in×h×w.
    #[arg(long)]
    input: PathBuf,
    /// Weights, float32 c_out×(c_in/groups)×k_h×k_w.
    #[arg(long)]
    weights: PathBuf,
    /// Bias, float32 K.
    #[arg(long)]
    bias: Option<PathBuf>,
    /// Stride: S or SH,SW.
    #[arg(long, value_parser = parse_pair, default_value = "1", allow_hyphen_values = true)]
    stride: (usize, usize),
    /// Zero padding: P (every side), PH,PW (top and bottom, left and right), T,L,B,R (per side,
    /// ONNX's pads order), same (ONNX SAME_UPPER: output ceil(in/stride), an odd total padded
    /// more after), same-lower (more before) or valid (none).
    #[arg(long, value_parser = PaddingSpec::parse, default_value = "0", allow_hyphen_values = true)]
    padding: PaddingSpec,
    /// Dilation: D or DH,DW.
    #[arg(long, value_parser = parse_pair, default_value = "1", allow_hyphen_values = true)]
    dilation: (usize, usize),
    /// Groups.
    #[arg(long, default_value_t = 1)]
    groups: usize,
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Threads of the CPU backend (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Output file, float32 n×c_out×ho×wo.
    #[arg(long)]
    output: PathBuf,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Device.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    device: DeviceArg,
    /// Also write the JSON lines to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Threads of the CPU backend (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Time budget per shape, in seconds, after warm-up (at least 5 runs are timed).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Suite file with the shapes (default: the built-in copy of suites/perf.toml).
    #[arg(long)]
    suite: Option<PathBuf>,
    /// Force one CPU path (strips, rows, direct, winograd) instead of sporkle's choice (for diagnosis).
    #[arg(long, hide = true, value_parser = parse_cpu_path)]
    cpu_path: Option<CpuPath>,
    /// Force one CPU microkernel (avx512, avx512-wide, portable) instead of the calibrated
    /// choice (to compare variants in one run).
    #[arg(long, value_parser = parse_microkernel)]
    microkernel: Option<Microkernel>,
    /// Peer JSON lines (e.g. from shared/peers/ort_conv.py) to compare with, by shape name.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Streaming throughput instead: N batches per shape submitted through the Juggler, with
    /// async on and then off (--device auto or gpu); every output verified.
    #[arg(long, value_name = "N")]
    stream: Option<usize>,
    /// One synchronous GPU call at a time through the Juggler (GPU preferred), from ordinary
    /// memory (`conv2d`) and from a pinned input with the output read in place: wall time per
    /// call and where it went (host copies, GPU copies, kernel, and the fixed cost left over);
    /// every output verified. With --compare, against the peer's serial end-to-end lines.
    #[arg(long, conflicts_with = "stream")]
    one_call: bool,
    /// With --device auto: also time every shape on the CPU only and on the GPU only (through
    /// the Juggler as well), and compare auto's total with always picking the faster.
    #[arg(long)]
    vs_fixed: bool,
    /// Shapes by name or 1-based number (default: all).
    shapes: Vec<String>,
}

fn parse_microkernel(s: &str) -> Result<Microkernel, String> {
    let kernel = Microkernel::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Microkernel::ALL.iter().map(|k| k.name()).collect();
        format!("unknown microkernel {s:?} (one of {})", names.join(", "))
    })?;
    if kernel.supported() {
        Ok(kernel)
    } else {
        Err(format!("this CPU cannot run the {s} microkernel"))
    }
}

fn parse_cpu_path(s: &str) -> Result<CpuPath, String> {
    match s {
        "strips" => Ok(CpuPath::GemmStrips),
        "rows" => Ok(CpuPath::GemmRows),
        "direct" => Ok(CpuPath::RowSums),
        "winograd" | "winograd-f2x2" => Ok(CpuPath::Winograd),
        "winograd-f4x4" => Ok(CpuPath::WinogradF4),
        _ => Err(format!(
            "{s:?} is not one of strips, rows, direct, winograd (winograd-f2x2), winograd-f4x4"
        )),
    }
}

fn parse_pair(s: &str) -> Result<(usize, usize), String> {
    let num = |t: &str| {
        t.trim()
            .parse::<usize>()
            .map_err(|_| format!("{t:?} is not a non-negative integer"))
    };
    match s.split_once(',') {
        None => num(s).map(|v| (v, v)),
        Some((a, b)) => Ok((num(a)?, num(b)?)),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's message is several lines (the problem, then usage and hints); the contract
            // is one line, so keep the lines before the usage, joined.
            let text = e.to_string();
            let problem: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            let problem = problem.join(" ");
            eprintln!(
                "sporkle: {} (see sporkle --help)",
                problem.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Conv2d(a) => conv2d(a),
        Command::Bench(a) => bench(a),
        Command::Devices => devices(),
        #[cfg(feature = "probes")]
        Command::ProbeStaging => GpuBackend::new()
            .and_then(|g| g.probe_staging(16 << 20))
            .map(|report| out!("{}", report.trim_end()))
            .map_err(Into::into),
        #[cfg(feature = "probes")]
        Command::ProbeOverlap => GpuBackend::new()
            .and_then(|g| g.probe_overlap(16 << 20))
            .map(|report| out!("{}", report.trim_end()))
            .map_err(Into::into),
        #[cfg(feature = "probes")]
        Command::ProbeZeroCopy { floats } => GpuBackend::new()
            .and_then(|g| g.probe_zero_copy(floats))
            .map(|report| out!("{}", report.trim_end()))
            .map_err(Into::into),
        #[cfg(feature = "probes")]
        Command::ProbeCuda { shape, batches } => probe_cuda(&shape, batches),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sporkle: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// The FMA peak of the cores a CPU backend's threads can run on: the calibration's one-core
/// figure times min(threads, cores); `None` where no SIMD peak is measured.
fn cpu_peak(cpu: &CpuBackend) -> Option<f64> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_core = sporkle::cpu::calibration().fma_peak_gflops?;
    Some(per_core * cpu.threads().min(cores) as f64)
}

fn cpu_backend(threads: Option<usize>) -> Result<CpuBackend> {
    Ok(match threads {
        Some(t) => CpuBackend::with_threads(t)?,
        None => CpuBackend::new()?,
    })
}

/// The device that runs a benchmark.
enum Engine {
    Cpu(CpuBackend),
    /// The backend times the kernel; a Juggler that prefers the GPU times whole calls (the
    /// path `sporkle conv2d` and library callers take).
    Gpu(GpuBackend, Box<Juggler>),
    Auto(Juggler),
}

/// The engine for a `--device` choice.
fn engine(device: DeviceArg, threads: Option<usize>) -> Result<Engine> {
    Ok(match device {
        DeviceArg::Cpu => Engine::Cpu(cpu_backend(threads)?),
        DeviceArg::Gpu => Engine::Gpu(
            GpuBackend::new().context("--device gpu")?,
            Box::new(juggler(Preference::Gpu, threads)?),
        ),
        DeviceArg::Auto => Engine::Auto(juggler(Preference::Auto, threads)?),
    })
}

/// A Juggler for the CLI; with `Preference::Gpu`, no GPU is an error rather than a CPU run.
fn juggler(preference: Preference, threads: Option<usize>) -> Result<Juggler> {
    let j = Juggler::with_config(JugglerConfig {
        preference,
        cpu_threads: threads,
        ..JugglerConfig::default()
    })?;
    if preference == Preference::Gpu {
        if let Err(why) = j.gpu_description() {
            bail!("--device gpu: no GPU: {why}");
        }
    }
    Ok(j)
}

fn dims4(a: &npy::Array, path: &Path, what: &str) -> Result<[usize; 4]> {
    <[usize; 4]>::try_from(a.shape.as_slice()).map_err(|_| {
        anyhow!(
            "{}: {what} must be 4-D, got shape {:?}",
            path.display(),
            a.shape
        )
    })
}

fn conv2d(a: Conv2dArgs) -> Result<()> {
    let x = npy::read(&a.input)?;
    let w = npy::read(&a.weights)?;
    let [n, c_in, h, wd] = dims4(&x, &a.input, "the input (n×c_in×h×w)")?;
    let [c_out, c_per_group, k_h, k_w] =
        dims4(&w, &a.weights, "the weights (c_out×(c_in/groups)×k_h×k_w)")?;
    let p = a.padding.apply(
        Conv2dParams::new(n, c_in, h, wd, c_out, k_h, k_w)
            .with_stride(a.stride.0, a.stride.1)
            .with_dilation(a.dilation.0, a.dilation.1)
            .with_groups(a.groups),
    );
    p.validate()?;
    if c_per_group != p.c_in_per_group() {
        bail!(
            "{}: weights have {c_per_group} input channels per filter, but the input has c_in = {c_in} and groups = {} (so {})",
            a.weights.display(),
            p.groups,
            p.c_in_per_group()
        );
    }
    let bias = match &a.bias {
        Some(path) => {
            let b = npy::read(path)?;
            if b.shape != [c_out] {
                bail!(
                    "{}: bias must have shape [{c_out}] (one per filter), got {:?}",
                    path.display(),
                    b.shape
                );
            }
            Some(b.data)
        }
        None => None,
    };
    let preference = match a.device {
        DeviceArg::Auto => Preference::Auto,
        DeviceArg::Cpu => Preference::Cpu,
        DeviceArg::Gpu => Preference::Gpu,
    };
    let juggler = juggler(preference, a.threads)?;
    let (ho, wo) = p.out_hw();
    let mut y = sporkle::host_mem::zeroed(p.output_len(), "the output")?;
    let run = juggler.conv2d(&p, &x.data, &w.data, bias.as_deref(), &mut y)?;
    let mut info = serde_json::json!({
        "device": run.device.to_string(),
        "reason": run.reason,
        "wall_ms": run.wall_s * 1e3,
        "gflops": run.gflops,
    });
    if run.device == DeviceKind::Gpu {
        info["renderer"] = juggler.gpu_description().unwrap_or_default().into();
        info["kernel_ms"] = run.gpu_kernel_s.map(|s| s * 1e3).into();
    }
    if let Some(why) = &run.fallback {
        info["gpu_failed"] = why.clone().into();
    }
    npy::write(&a.output, &[n, c_out, ho, wo], &y)?;
    out!("{info}");
    Ok(())
}

/// Streaming warm-up jobs in flight together: more than the executor's frames (at most 16).
const WARM_UP_JOBS: usize = 17;

/// The built-in copy of suites/perf.toml.
fn perf_suite() -> Result<Suite> {
    Ok(Suite::parse(
        Path::new("suites/perf.toml (built in)"),
        PERF_SUITE,
    )?)
}

/// The case of `suite` named `shape`, or numbered so (from 1).
fn find_shape<'a>(suite: &'a Suite, shape: &str) -> Result<&'a sporkle::suite::Case> {
    (suite.cases.iter().enumerate())
        .find(|(i, c)| c.name == shape || (i + 1).to_string() == shape)
        .map(|(_, c)| c)
        .ok_or_else(|| anyhow!("no shape {shape:?} in the suite"))
}

/// `sporkle probe-cuda`: the shape from the built-in benchmark suite.
#[cfg(feature = "probes")]
fn probe_cuda(shape: &str, batches: usize) -> Result<()> {
    let suite = perf_suite()?;
    let case = find_shape(&suite, shape)?;
    let report = GpuBackend::new()?.probe_cuda(&case.params, batches.max(1))?;
    out!("{}", report.trim_end());
    Ok(())
}

/// Output points checked after each benchmark: corners, edges and a seeded sample.
const BENCH_CHECKS: usize = 256;

fn bench(a: BenchArgs) -> Result<()> {
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
            let threads = a
                .threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let kernel = kernel.unwrap_or_else(Microkernel::detect);
            let cpu = CpuBackend::with_options(threads, kernel)?;
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
                if let Some(peak) = cpu_peak(cpu) {
                    // FLOPs are the direct convolution's whatever ran (BENCHMARKS.md): on the
                    // Winograd path the fraction counts multiplies it never did.
                    let path = cpu.path_for(&p);
                    eprintln!(
                        "# {}: {:.0}% of the measured FMA peak ({peak:.0} GFLOP/s), path {}{}",
                        case.name,
                        100.0 * gflops / peak,
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
                let mut times = timed(a.seconds, || {
                    devices.insert(j.conv2d(&p, &x, &w, bias, &mut y)?.device);
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
                        "# {}: auto {ms:.3} ms ({}), cpu only {:.3} ms, gpu only {:.3} ms",
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

/// `--stream N`: per shape, N batches submitted through the Juggler with async on (all
/// submitted, then all waited), and the same N with async off, one call at a time, the two
/// modes' runs alternating; every output is verified.
/// Prints one JSON line per shape and mode, and the stage times U (host copy in + GPU copy in),
/// C (kernel), D (GPU copy out + host copy out), from the synchronous run where each is a step
/// of its own, with the overlap bound (U+C+D)/max(U,C,D).
fn stream(a: &BenchArgs, cases: &[&sporkle::suite::Case], batches: usize) -> Result<()> {
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
            let bound = (u + c + d) / u.max(c).max(d).max(1e-9);
            let speedup = ms[1] / ms[0];
            report_steps(&case.name, "async", &per_mode[0]);
            eprintln!(
                "# {}: U {u:.3} ms (host {:.3} + GPU copy {:.3}), C {c:.3} ms, D {d:.3} ms (GPU copy {:.3} + host {:.3}); bound {bound:.2}x, async/sync {speedup:.2}x = {:.2} of the bound; at most {} in flight",
                case.name,
                med(&|s| s.host_in_s),
                med(&|s| s.upload_s.unwrap_or(0.0)),
                med(&|s| s.download_s.unwrap_or(0.0)),
                med(&|s| s.host_out_s),
                speedup / bound,
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
fn one_call(
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
    let fixed = per_call(&|s, i| {
        i.wall_s
            - s.host_in_s
            - s.upload_s.unwrap_or(0.0)
            - s.kernel_s.unwrap_or(0.0)
            - s.download_s.unwrap_or(0.0)
            - s.host_out_s
    });
    // The fixed cost's parts: the trip to the worker, the GPU's wall time beyond its timed
    // work, the fence to the answer, the answer to the caller, and the rest (the caller's own).
    let queued = per_call(&|s, _| s.queued_s);
    let gpu_gaps = per_call(&|s, _| {
        s.gpu_wall_s
            - s.upload_s.unwrap_or(0.0)
            - s.kernel_s.unwrap_or(0.0)
            - s.download_s.unwrap_or(0.0)
    });
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
        "# {shape} {mode}: {wall:.3} ms a call (median of the calls) = host in {host_in:.3} + copy in {up:.3} + kernel {kernel:.3} + copy out {down:.3} + host out {host_out:.3} + fixed cost {fixed:.1} µs ({copies}; {} calls)\n#   fixed cost, µs: to the worker {queued:.1}, GPU wall time beyond its timed work {gpu_gaps:.1}, fence to answer {settle:.1}, answer to caller {wake:.1}, in the caller {caller:.1}",
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

/// The median of `v` (0 when empty).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The median over `stages` of one stage time `f`, in ms.
fn stage_ms(stages: &[sporkle::Stages], f: &dyn Fn(&sporkle::Stages) -> f64) -> f64 {
    median(&mut stages.iter().map(f).collect::<Vec<_>>()) * 1e3
}

/// Prints JSON lines, and writes them to `path` too when given.
fn json_lines(path: Option<&Path>) -> Result<impl FnMut(serde_json::Value) -> Result<()>> {
    let mut file = match path {
        Some(p) => Some(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        ),
        None => None,
    };
    Ok(move |line: serde_json::Value| -> Result<()> {
        out!("{line}");
        if let Some(f) = file.as_mut() {
            writeln!(f, "{line}")?;
        }
        Ok(())
    })
}

/// Two warm-up runs, then timed runs until at least 5 and `seconds` have passed; the wall
/// times, in seconds (the caller checks a run's result afterwards).
fn timed(seconds: f64, mut run: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    run()?;
    run()?;
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || start.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        run()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(times)
}

fn round4(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}

fn round2(v: f64) -> f64 {
    (v * 1e2).round() / 1e2
}

/// Checks corners and a seeded sample of outputs against the reference (the full reference is
/// far too slow for the large shapes).
fn verify_sample(
    p: &Conv2dParams,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &[f32],
) -> Result<()> {
    // Whichever device and algorithm ran it.
    let tol = sporkle::tolerance::Tolerance::for_params(p);
    check_sample(p, x, w, bias, y, BENCH_CHECKS, tol)
        .map(|_| ())
        .map_err(|m| anyhow!("{m}"))
}

/// Streaming warm-up: programs compiled, weights resident, the model calibrated, and every
/// frame's staging and device buffers allocated (pinned allocations cost milliseconds): more
/// jobs than the executor has frames (at most 16), in flight together, `rounds` times.
fn warm_up(
    submit: &dyn Fn(usize) -> sporkle::Result<sporkle::Ticket>,
    rounds: usize,
) -> Result<()> {
    for _ in 0..rounds {
        let tickets = (0..WARM_UP_JOBS)
            .map(submit)
            .collect::<sporkle::Result<Vec<_>>>()?;
        for t in tickets {
            t.wait()?;
        }
    }
    Ok(())
}

/// Outputs read for a later check: `(flat index, value)`.
type Sample = Vec<(usize, f32)>;

/// Waits for `tickets` in order, reading each output's sample where it lies (in its staging
/// frame, which goes back to the executor at once): the checks against the reference, which
/// cost far more than reading (#7: ~3 ms a batch), come after the timing
/// ([`verify_in_place`]).
fn read_in_place(tickets: Vec<sporkle::Ticket>) -> Result<(Vec<sporkle::RunInfo>, Vec<Sample>)> {
    let mut infos = Vec::new();
    let mut samples = Vec::new();
    for ticket in tickets {
        let (sample, info) =
            ticket.wait_with(|y| sporkle::tolerance::read_sample(y, BENCH_CHECKS))?;
        samples.push(sample);
        infos.push(info);
    }
    Ok((infos, samples))
}

/// Checks the samples [`read_in_place`] read (batch `i` used input `i % inputs.len()`).
fn verify_in_place(
    p: &Conv2dParams,
    inputs: &[Arc<[f32]>],
    w: &[f32],
    bias: Option<&[f32]>,
    samples: &[Sample],
    infos: &[sporkle::RunInfo],
    shape: &str,
) -> Result<()> {
    let tol = sporkle::gpu::Algorithm::for_params(p).tolerance();
    for (i, (sample, info)) in samples.iter().zip(infos).enumerate() {
        sporkle::tolerance::check_points(p, &inputs[i % inputs.len()], w, bias, sample, tol)
            .map_err(|m| anyhow!("{m}"))
            .with_context(|| format!("shape {shape}: batch {i} ({}) is wrong", info.device))?;
    }
    Ok(())
}

/// `(shape, device, gflops)` from JSON lines in the peers' format.
fn read_peer_lines(path: &Path) -> Result<Vec<(String, String, f64)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with('{'))
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let field = |k: &str| {
            v.get(k)
                .ok_or_else(|| anyhow!("{}:{}: no {k:?}", path.display(), i + 1))
        };
        let shape = field("shape")?.as_str().unwrap_or_default().to_owned();
        let device = field("device")?.as_str().unwrap_or_default().to_owned();
        let gflops = field("gflops")?
            .as_f64()
            .ok_or_else(|| anyhow!("{}:{}: gflops is not a number", path.display(), i + 1))?;
        out.push((shape, device, gflops));
    }
    Ok(out)
}

/// A table of sporkle against each peer device, with the geometric mean of the ratios; a
/// peer's end-to-end figures ("e2e" in its device name) are compared with ours end to end.
fn print_comparison(rows: &[(String, f64, f64)], peers: &[(String, String, f64)]) {
    let mut devices: Vec<&str> = peers.iter().map(|p| p.1.as_str()).collect();
    devices.sort_unstable();
    devices.dedup();
    for dev in devices {
        let e2e = dev.contains("e2e");
        let ours = if e2e { "sporkle end to end" } else { "sporkle" };
        out!("\n| shape | {ours} GFLOP/s | {dev} GFLOP/s | ratio |\n| --- | ---: | ---: | ---: |");
        let mut logs = Vec::new();
        for (name, kernel, end_to_end) in rows {
            let mine = if e2e { *end_to_end } else { *kernel };
            if let Some((_, _, theirs)) = peers.iter().find(|p| p.0 == *name && p.1 == dev) {
                let ratio = mine / theirs;
                logs.push(ratio.ln());
                out!("| {name} | {mine:.1} | {theirs:.1} | {ratio:.2} |");
            }
        }
        if !logs.is_empty() {
            let geo = (logs.iter().sum::<f64>() / logs.len() as f64).exp();
            let min = logs.iter().copied().fold(f64::INFINITY, f64::min).exp();
            out!("| **geometric mean** | | | **{geo:.2}** (min {min:.2}) |");
        }
    }
}

fn devices() -> Result<()> {
    let model = sporkle::cpu::cpu_model();
    let backend = CpuBackend::new()?;
    out!("cpu: {model}");
    out!("  threads: {}", backend.threads());
    out!("  microkernel: {}", sporkle::cpu::calibration().describe());
    match sporkle::GpuBackend::new() {
        Ok(gpu) => {
            out!("{}", gpu.info().to_string().trim_end());
            // Measured, with the plan of each call: what fixes the GPU's output bits.
            match gpu.arithmetic() {
                Ok(a) => out!(
                    "  arithmetic: {} (fma() {}; subnormal results {})",
                    a.name(),
                    match a.fma {
                        sporkle::gpu::arithmetic::Fma::Fused => "rounds once",
                        sporkle::gpu::arithmetic::Fma::Unfused => "rounds twice",
                        sporkle::gpu::arithmetic::Fma::Mixed => "rounds once or twice by form",
                    },
                    if a.flushes_subnormals {
                        "flushed to zero"
                    } else {
                        "kept"
                    }
                ),
                Err(e) => out!("  arithmetic: not probed ({e})"),
            }
        }
        Err(e) => out!("gpu: none ({e})"),
    }
    Ok(())
}
