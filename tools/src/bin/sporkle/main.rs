//! `sporkle`: the command-line tool. One convolution on `.npy` files (`conv2d`), the benchmark
//! shape set (`bench`), and what this machine offers (`devices`).
//!
//! Errors are one line on stderr and a non-zero exit; `conv2d` checks everything before it
//! writes, so a failed run leaves no output file.

#![forbid(unsafe_code)]

mod bench;
mod stream;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sporkle::cpu::{CpuPath, Microkernel};
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
const PERF_SUITE: &str = include_str!("../../../../suites/perf.toml");

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
    /// Diagnostics: CPU paths (or microkernels) on one shape, interleaved call by call, so that
    /// a shared machine's drifting clock hits each alike: the median of each round's ratio.
    #[cfg(feature = "probes")]
    #[command(hide = true)]
    ProbeCpuPaths {
        /// The shape's name (or number) in the suite.
        shape: String,
        /// Comma-separated paths (strips, rows, direct, winograd, winograd-f4x4, auto) or
        /// microkernels (avx512, avx512-wide, portable), the first the baseline.
        #[arg(long, default_value = "auto,rows")]
        paths: String,
        /// Rounds (each times every path on a few calls).
        #[arg(long, default_value_t = 15)]
        rounds: usize,
        /// Threads of each backend.
        #[arg(long)]
        threads: Option<usize>,
        /// Suite file with the shape (default: the built-in copy of suites/perf.toml).
        #[arg(long)]
        suite: Option<std::path::PathBuf>,
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
        Command::Bench(a) => bench::bench(a),
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
        #[cfg(feature = "probes")]
        Command::ProbeCpuPaths {
            shape,
            paths,
            rounds,
            threads,
            suite,
        } => probe_cpu_paths(&shape, &paths, rounds, threads, suite.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sporkle: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// The FMA peak a CPU call can reach, GFLOP/s, and the threads it was measured on: the
/// backend's threads (at most one a core) running the FMA loop at once, not the one-core peak
/// times the threads (two threads on one core, or cores that slow down together, reach less).
/// Measured once a process: the bench runs one backend. `None` where no SIMD peak is measured.
fn cpu_peak(cpu: &CpuBackend) -> Option<(usize, f64)> {
    static PEAK: std::sync::OnceLock<Option<(usize, f64)>> = std::sync::OnceLock::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cpu.threads().min(cores);
    *PEAK.get_or_init(|| Some((threads, sporkle::cpu::fma_peak_threads(threads)?)))
}

fn cpu_backend(threads: Option<usize>) -> Result<CpuBackend> {
    Ok(match threads {
        Some(t) => CpuBackend::with_threads(t)?,
        None => CpuBackend::new()?,
    })
}

/// A CPU backend with a chosen microkernel (as many threads as cores unless given).
fn cpu_backend_with(threads: Option<usize>, kernel: Microkernel) -> Result<CpuBackend> {
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    Ok(CpuBackend::with_options(threads, kernel)?)
}

/// The device that runs a benchmark.
enum Engine {
    Cpu(CpuBackend),
    /// The backend times the kernel; a Juggler that prefers the GPU times whole calls (the
    /// path `sporkle conv2d` and library callers take).
    Gpu(Box<GpuBackend>, Box<Juggler>),
    Auto(Juggler),
}

/// The engine for a `--device` choice.
fn engine(device: DeviceArg, threads: Option<usize>) -> Result<Engine> {
    Ok(match device {
        DeviceArg::Cpu => Engine::Cpu(cpu_backend(threads)?),
        DeviceArg::Gpu => Engine::Gpu(
            Box::new(GpuBackend::new().context("--device gpu")?),
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

/// Output points checked after each benchmark: corners, edges and a seeded sample.
const BENCH_CHECKS: usize = 256;

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

/// `sporkle probe-cpu-paths`: each path's median GFLOP/s and its median ratio to the first,
/// over rounds that time every path in turn (best of three calls each).
#[cfg(feature = "probes")]
fn probe_cpu_paths(
    shape: &str,
    paths: &str,
    rounds: usize,
    threads: Option<usize>,
    suite: Option<&Path>,
) -> Result<()> {
    let suite = match suite {
        Some(path) => Suite::load(path)?,
        None => perf_suite()?,
    };
    let p = find_shape(&suite, shape)?.params;
    let mut input = vec![0.0f32; p.input_len()];
    let mut weights = vec![0.0f32; p.weights_len()];
    sporkle::data::fill_uniform(1, &mut input);
    sporkle::data::fill_uniform(2, &mut weights);
    let mut output = vec![0.0f32; p.output_len()];
    let mut runs = Vec::new();
    for name in paths.split(',') {
        let cpu = match name {
            "auto" => cpu_backend(threads)?,
            // A microkernel's name: the calibrated choice's paths with that kernel.
            name if Microkernel::from_name(name).is_some() => {
                cpu_backend_with(threads, parse_microkernel(name).map_err(|e| anyhow!(e))?)?
            }
            path => cpu_backend(threads)?.with_path(parse_cpu_path(path).map_err(|e| anyhow!(e))?),
        };
        let w = cpu.prepare_weights(&p, &weights)?;
        cpu.conv2d_prepared(&p, &input, &w, None, &mut output)?;
        runs.push((name, cpu, w, Vec::new()));
    }
    for _ in 0..rounds.max(1) {
        for (_, cpu, w, times) in &mut runs {
            let mut best = f64::INFINITY;
            for _ in 0..3 {
                let start = std::time::Instant::now();
                cpu.conv2d_prepared(&p, &input, w, None, &mut output)?;
                best = best.min(start.elapsed().as_secs_f64());
            }
            times.push(best);
        }
    }
    let gflops = p.flops() as f64 / 1e9;
    for (name, cpu, _, times) in &runs {
        let mut ratios: Vec<f64> = (runs[0].3.iter().zip(times)).map(|(b, t)| b / t).collect();
        out!(
            "{shape} {name} ({}): {:.1} GFLOP/s, {:.3}x the first",
            cpu.path_for(&p).name(),
            gflops / median(&mut times.clone()),
            median(&mut ratios)
        );
    }
    Ok(())
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

/// The peer's figure for `shape` on `device`: the median of its lines (a peer run before and
/// after ours, on a shared host whose load drifts; of an even count the faster middle one,
/// so that the comparison never favours us), and how many there were.
fn peer_figure(peers: &[(String, String, f64)], shape: &str, device: &str) -> Option<(f64, usize)> {
    let mut v: Vec<f64> = (peers.iter())
        .filter(|p| p.0 == shape && p.1 == device)
        .map(|p| p.2)
        .collect();
    (!v.is_empty()).then(|| (median(&mut v), v.len()))
}

/// A table of sporkle against each peer device, with the geometric mean of the ratios; a
/// peer's end-to-end figures ("e2e" in its device name) are compared with ours end to end.
/// Where the peer's file holds several runs of a shape, their median counts.
fn print_comparison(rows: &[(String, f64, f64)], peers: &[(String, String, f64)]) {
    let mut devices: Vec<&str> = peers.iter().map(|p| p.1.as_str()).collect();
    devices.sort_unstable();
    devices.dedup();
    for dev in devices {
        let e2e = dev.contains("e2e");
        let ours = if e2e { "sporkle end to end" } else { "sporkle" };
        out!("\n| shape | {ours} GFLOP/s | {dev} GFLOP/s | ratio |\n| --- | ---: | ---: | ---: |");
        let (mut logs, mut runs) = (Vec::new(), 0);
        for (name, kernel, end_to_end) in rows {
            let mine = if e2e { *end_to_end } else { *kernel };
            if let Some((theirs, n)) = peer_figure(peers, name, dev) {
                let ratio = mine / theirs;
                logs.push(ratio.ln());
                runs = runs.max(n);
                out!("| {name} | {mine:.1} | {theirs:.1} | {ratio:.2} |");
            }
        }
        if !logs.is_empty() {
            let geo = (logs.iter().sum::<f64>() / logs.len() as f64).exp();
            let min = logs.iter().copied().fold(f64::INFINITY, f64::min).exp();
            out!("| **geometric mean** | | | **{geo:.2}** (min {min:.2}) |");
        }
        if runs > 1 {
            out!("(the peer's figure: the median of its runs of each shape, up to {runs})");
        }
    }
}

fn devices() -> Result<()> {
    let model = sporkle::cpu::cpu_model();
    let backend = CpuBackend::new()?;
    out!("cpu: {model}");
    out!("  threads: {}", backend.threads());
    out!("  microkernel: {}", sporkle::cpu::calibration().describe());
    if let Some(all) = sporkle::cpu::fma_peak_threads(backend.threads()) {
        out!(
            "  FMA peak on {} threads at once: {all:.0} GFLOP/s in all",
            backend.threads()
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_run_several_times_counts_by_its_median_never_below_the_middle() {
        let line = |shape: &str, dev: &str, g: f64| (shape.to_owned(), dev.to_owned(), g);
        let peers = [
            line("a", "gpu", 100.0),
            line("b", "gpu", 7.0),
            line("a", "gpu", 300.0),
            line("a", "cpu", 1.0),
            line("a", "gpu", 200.0),
            line("b", "gpu", 9.0),
        ];
        assert_eq!(peer_figure(&peers, "a", "gpu"), Some((200.0, 3)));
        assert_eq!(
            peer_figure(&peers, "b", "gpu"),
            Some((9.0, 2)),
            "the faster of two"
        );
        assert_eq!(peer_figure(&peers, "a", "cpu"), Some((1.0, 1)));
        assert_eq!(peer_figure(&peers, "c", "gpu"), None);
    }
}
