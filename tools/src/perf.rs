//! Performance trials and baselines: `perf/{case}` for each case of `suites/perf.toml`, as
//! libtest benchmarks.
//!
//! - Plain runs (`cargo test`, `sporkle-validate`) run each case once and check a sample of its
//!   outputs: a smoke test that the fast paths still run and are right.
//! - `--bench` (handled by sporkle, not libtest: these are ordinary tests that measure in that
//!   mode, and only they run) runs three rounds; each round measures a *calibration* and the
//!   case, and keeps the ratio `case GFLOP/s / calibration GFLOP/s`. Machines are shared and
//!   noisy; the ratio carries the machine's speed of the moment out of the comparison.
//!   - CPU: the calibration is a fixed, naive f32 matrix product on the same threads
//!     (independent of sporkle's kernels); the case is the median wall time of input → output
//!     runs after warm-up, weights prepared once.
//!   - GPU (hardware only): the calibration is `shaders/calibrate.comp`, fixed FMA chains timed
//!     by a timer query; the case is the median kernel time of back-to-back dispatches.
//! - Baselines live in `golden/perf/<device-key>.json` (key: device kind, microkernel, CPU model,
//!   threads; for the GPU, its renderer: speed, unlike numerics, belongs to the device). A
//!   regression is a ratio below the baseline's by more than [`BAND`] in all three rounds.
//!   Without a baseline (a new device or case) the trial is ignored, never passed or failed:
//!   its reason gives the command that records one ([`RECORD`]) and, for information, the ratio
//!   against the closest known device's (by calibration speed). Only `SPORKLE_BLESS=1` writes.
//! - `--report DIR` writes `perf.json` and `perf.svg` (per shape: this run, the baseline, and
//!   every peer given with `--peers FILE`, JSON lines as printed by `shared/peers/*.py`).

use super::{fail, named, Context, Device};
use libtest_mimic::{Completion, Failed, Trial};
use serde::{Deserialize, Serialize};
use sporkle::gpu::Algorithm;
use sporkle::suite::Case;
use sporkle::tolerance::check_sample;
use sporkle::{data, CpuBackend};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Allowed drop of the ratio below its baseline before a round counts as slow.
pub const BAND: f64 = 0.25;
/// Rounds per case; a regression needs every one of them slow.
const ROUNDS: usize = 3;
/// Minimum timed runs and time per measurement.
const MIN_RUNS: usize = 5;
const MIN_SECS: f64 = 0.3;
/// Outputs checked against the reference after each case.
const CHECKS: usize = 64;

/// One result, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    shape: String,
    device: String,
    gflops: f64,
    ratio: f64,
    baseline_gflops: Option<f64>,
    baseline_ratio: Option<f64>,
    status: String,
}

/// A baseline file: per case, the figures of the run that was blessed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Baselines {
    device_key: String,
    calibration: String,
    cases: BTreeMap<String, Baseline>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct Baseline {
    gflops: f64,
    ratio: f64,
}

/// Serialises baseline-file updates between trials.
static BASELINE_LOCK: Mutex<()> = Mutex::new(());

pub fn trials(ctx: &Arc<Context>) -> sporkle::Result<Vec<Trial>> {
    let cases = super::suites::load("perf")?.cases;
    let mut out = Vec::new();
    // Baselines are for the devices users run; the portable fallback is covered for correctness.
    for device in ctx
        .devices
        .iter()
        .filter(|d| matches!(d.kind(), "cpu" | "gpu"))
    {
        // A software GPU runs the six smallest shapes only, and only for correctness.
        let take = if device.is_software() { 6 } else { cases.len() };
        for case in cases.iter().take(take) {
            let (ctx, dev, case) = (Arc::clone(ctx), device.clone(), case.clone());
            let name = format!("perf/{}", case.name);
            let measure = ctx.opts.bench;
            out.push(Trial::ignorable_test(
                named(device.kind(), name),
                move || run(&ctx, &dev, &case, !measure),
            ));
        }
    }
    Ok(out)
}

fn run(ctx: &Context, device: &Device, case: &Case, test_mode: bool) -> Result<Completion, Failed> {
    let Device::Cpu { backend, .. } = device else {
        if test_mode {
            return gpu_smoke(device, case).map(|()| Completion::Completed);
        }
        return match device {
            Device::Gpu { backend } => gpu_bench(ctx, device, backend, case),
            _ => Ok(Completion::ignored_with("no baselines for this device")),
        };
    };
    let p = &case.params;
    let (x, w, b) = data::conv_data(p, case.seed, false);
    let bias = case.bias.then_some(&b[..]);
    let prepared = backend.prepare_weights(p, &w).map_err(fail)?;
    let mut y = vec![0.0f32; p.output_len()];
    let mut once = || {
        backend
            .conv2d_prepared(p, &x, &prepared, bias, &mut y)
            .map_err(fail)
    };
    let mut verdict = Completion::Completed;
    if test_mode {
        once()?;
    } else {
        let key = device_key(device, backend);
        let mut ratios = Vec::new();
        let mut times = Vec::new();
        let mut gflops = Vec::new();
        for _ in 0..ROUNDS {
            let cal = calibrate(backend.threads());
            once()?;
            let mut t = Vec::new();
            let start = Instant::now();
            while t.len() < MIN_RUNS || start.elapsed().as_secs_f64() < MIN_SECS {
                let s = Instant::now();
                once()?;
                t.push(s.elapsed().as_secs_f64());
            }
            t.sort_by(f64::total_cmp);
            let median = t[t.len() / 2];
            times.extend(t);
            gflops.push(p.flops() as f64 / median / 1e9);
            ratios.push(gflops.last().copied().unwrap_or(0.0) / cal);
        }
        let result = judge(ctx, (&key, CPU_CALIBRATION), device, case, &gflops, &ratios);
        times.sort_by(f64::total_cmp);
        let ns: Vec<f64> = times.iter().map(|t| t * 1e9).collect();
        let avg = ns[ns.len() / 2];
        let variance = ns.iter().map(|v| (v - avg).powi(2)).sum::<f64>() / ns.len() as f64;
        eprintln!(
            "{}: {:.1} GFLOP/s (median {:.3} ms, sd {:.3} ms over {} runs)",
            case.name,
            p.flops() as f64 / avg,
            avg / 1e6,
            variance.sqrt() / 1e6,
            ns.len()
        );
        verdict = result?;
    }
    // The tolerance of the path that ran (Winograd's for the CPU's Winograd).
    check_sample(p, &x, &w, bias, &y, CHECKS, backend.path_for(p).tolerance())
        .map(|_| verdict)
        .map_err(|m| fail(format!("{}: wrong result: {m}", case.name)))
}

/// What the CPU baselines' ratios are relative to.
const CPU_CALIBRATION: &str = "naive f32 matrix product 128x128x128, one per thread";
/// What the GPU baselines' ratios are relative to.
const GPU_CALIBRATION: &str =
    "shaders/calibrate.comp: fixed FMA chains, GFLOP/s by timer query, best of three";

/// `--bench` on a hardware GPU: three rounds of (calibration, kernel time of the case: the
/// median of back-to-back dispatches each timed alone, after 0.1 s of untimed ones), ratios
/// against `golden/perf/gpu-<renderer>.json`; the output is checked afterwards.
fn gpu_bench(
    ctx: &Context,
    device: &Device,
    gpu: &sporkle::GpuBackend,
    case: &Case,
) -> Result<Completion, Failed> {
    if gpu.info().software {
        return Ok(Completion::ignored_with(
            "software renderer: its timers mean nothing, so no GPU baselines here",
        ));
    }
    let p = &case.params;
    let (x, w, b) = data::conv_data(p, case.seed, false);
    let bias = case.bias.then_some(&b[..]);
    let mut y = vec![0.0f32; p.output_len()];
    let key = format!("gpu-{}", super::devices::slug(&gpu.info().renderer));
    let (mut gflops, mut ratios) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let cal = gpu
            .calibrate()
            .map_err(fail)?
            .ok_or("no GPU calibration on this renderer")?;
        let first = gpu
            .time_kernel(p, &x, &w, bias, &mut y, sporkle::gpu::Dispatches::ONE)
            .map_err(fail)?;
        let estimate_s = (first.first().copied().unwrap_or(1_000_000) as f64 * 1e-9).max(1e-6);
        let mut times = gpu
            .time_kernel(
                p,
                &x,
                &w,
                bias,
                &mut y,
                sporkle::gpu::Dispatches {
                    warmup: ((0.1 / estimate_s) as usize).clamp(3, 2000),
                    timed: ((MIN_SECS / estimate_s) as usize).clamp(10, 2000),
                    tile: None,
                    algorithm: None,
                },
            )
            .map_err(fail)?;
        times.sort_unstable();
        let median_ns = times.get(times.len() / 2).copied().unwrap_or(1).max(1);
        let g = p.flops() as f64 / median_ns as f64;
        gflops.push(g);
        ratios.push(g / cal);
    }
    let result = judge(ctx, (&key, GPU_CALIBRATION), device, case, &gflops, &ratios);
    eprintln!(
        "{}: {:.1} GFLOP/s kernel (medians of 3 rounds: {})",
        case.name,
        gflops.iter().copied().fold(0.0, f64::max),
        gflops
            .iter()
            .map(|g| format!("{g:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let verdict = result?;
    check_gpu_sample(case, (&x, &w, bias), &y).map(|()| verdict)
}

/// A sampled check of a GPU result of `case` with inputs `(x, w, bias)` (the Winograd tolerance
/// where the GPU may have chosen Winograd).
fn check_gpu_sample(
    case: &Case,
    (x, w, bias): (&[f32], &[f32], Option<&[f32]>),
    y: &[f32],
) -> Result<(), Failed> {
    let p = &case.params;
    let tol = Algorithm::for_params(p).tolerance();
    check_sample(p, x, w, bias, y, CHECKS, tol)
        .map(|_| ())
        .map_err(|m| fail(format!("{}: wrong result: {m}", case.name)))
}

/// One run of a case on the GPU, with a sampled check of its output.
fn gpu_smoke(device: &Device, case: &Case) -> Result<(), Failed> {
    let p = &case.params;
    let (x, w, b) = data::conv_data(p, case.seed, false);
    let bias = case.bias.then_some(&b[..]);
    let y = device.conv2d(p, &x, &w, bias).map_err(fail)?;
    check_gpu_sample(case, (&x, &w, bias), &y)
}

/// The command that records (or rewrites) performance baselines.
const RECORD: &str = "SPORKLE_BLESS=1 cargo run --release --bin sporkle-validate -- --bench";

/// Compares three rounds with the baseline and records the row; writes the baseline when
/// blessing. Without a baseline (a device or case not seen before) the trial is ignored, with
/// the command that records one and, as information, this run against the closest known
/// device's baseline (both ratios to their own calibration); it neither passes nor fails.
fn judge(
    ctx: &Context,
    (key, calibration): (&str, &str),
    device: &Device,
    case: &Case,
    gflops: &[f64],
    ratios: &[f64],
) -> Result<Completion, Failed> {
    let mid = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (g, r) = (mid(gflops), mid(ratios));
    let _guard = BASELINE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = baseline_path(key);
    let mut file = read_baselines(&path).map_err(fail)?;
    let old = file.cases.get(&case.name).copied();
    let (status, verdict) = match old {
        _ if ctx.opts.bless => {
            file.device_key = key.to_owned();
            file.calibration = calibration.into();
            file.cases.insert(
                case.name.clone(),
                Baseline {
                    gflops: g,
                    ratio: r,
                },
            );
            write_baselines(&path, &file).map_err(fail)?;
            eprintln!(
                "{}: baseline {g:.1} GFLOP/s, ratio {r:.4} written ({})",
                case.name,
                path.display()
            );
            ("new".to_owned(), Ok(Completion::Completed))
        }
        Some(base) => {
            let floor = base.ratio * (1.0 - BAND);
            if ratios.iter().all(|&x| x < floor) {
                let msg = format!(
                    "performance regression: ratio to calibration {} in all {ROUNDS} rounds, below the baseline's {:.4} by more than {:.0}% ({g:.1} GFLOP/s now, {:.1} at the baseline); if intended, re-bless: {RECORD}",
                    ratios.iter().map(|x| format!("{x:.4}")).collect::<Vec<_>>().join(", "),
                    base.ratio,
                    BAND * 100.0,
                    base.gflops
                );
                ("regression".to_owned(), Err(msg.into()))
            } else if r > base.ratio * (1.0 + BAND) {
                let msg = format!(
                    "{}: faster than its baseline ({r:.4} vs {:.4}); consider re-blessing",
                    case.name, base.ratio
                );
                eprintln!("{msg}");
                ("faster".to_owned(), Ok(Completion::Completed))
            } else {
                ("ok".to_owned(), Ok(Completion::Completed))
            }
        }
        None => {
            let closest = closest_baseline(key, &case.name, g / r).map_err(fail)?;
            let compared = match closest {
                Some((other, base)) => format!(
                    "; for information, ratio {r:.4} here against {:.4} on the closest known device, {other} (calibration {:.0} GFLOP/s there, {:.0} here): {:.2}x",
                    base.ratio,
                    base.gflops / base.ratio,
                    g / r,
                    r / base.ratio
                ),
                None => "; no other device has a baseline for it".to_owned(),
            };
            (
                "no baseline".to_owned(),
                Ok(Completion::ignored_with(format!(
                    "no baseline for {} on {key} ({g:.1} GFLOP/s measured, output checked); record one: {RECORD}{compared}",
                    case.name
                ))),
            )
        }
    };
    ctx.perf_rows
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Row {
            shape: case.name.clone(),
            device: format!("sporkle-{}", device.kind()),
            gflops: g,
            ratio: r,
            baseline_gflops: old.map(|b| b.gflops),
            baseline_ratio: old.map(|b| b.ratio),
            status,
        });
    verdict
}

/// Among the other devices of `key`'s family (the part before its first dash: `cpu`, `gpu`)
/// with a baseline for `case`, the one whose calibration (GFLOP/s = gflops / ratio) was
/// closest to `calibration`: its key and baseline.
fn closest_baseline(
    key: &str,
    case: &str,
    calibration: f64,
) -> Result<Option<(String, Baseline)>, String> {
    let dir = sporkle::repo_root().join("golden/perf");
    let family = key.split('-').next().unwrap_or(key);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    let mut best: Option<(f64, String, Baseline)> = None;
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        let Some(other) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        if other == key || other.split('-').next() != Some(family) {
            continue;
        }
        let Some(base) = read_baselines(&path)?.cases.get(case).copied() else {
            continue;
        };
        if !(base.ratio > 0.0 && base.gflops > 0.0) {
            continue;
        }
        let distance = (calibration / (base.gflops / base.ratio)).ln().abs();
        if best.as_ref().is_none_or(|(d, _, _)| distance < *d) {
            best = Some((distance, other.to_owned(), base));
        }
    }
    Ok(best.map(|(_, k, b)| (k, b)))
}

/// The key of a device's baselines: kind, microkernel, CPU model and threads.
fn device_key(device: &Device, backend: &CpuBackend) -> String {
    let model = sporkle::cpu::cpu_model();
    format!(
        "{}-{}-{}-{}t",
        device.kind(),
        backend.microkernel().name(),
        super::devices::slug(&model),
        backend.threads()
    )
}

fn baseline_path(key: &str) -> PathBuf {
    sporkle::repo_root()
        .join("golden/perf")
        .join(format!("{key}.json"))
}

fn read_baselines(path: &Path) -> Result<Baselines, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Baselines::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn write_baselines(path: &Path, b: &Baselines) -> Result<(), String> {
    let dir = path.parent().ok_or("no directory")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let text = serde_json::to_string_pretty(b).map_err(|e| e.to_string())? + "\n";
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// GFLOP/s of a fixed naive matrix product (128³, i-k-j order, f32) run on `threads` threads
/// at once: a measure of the machine's speed at this moment that shares no code with sporkle.
/// Best of three runs of about 40 ms each (noise only ever slows a run down).
pub fn calibrate(threads: usize) -> f64 {
    (0..3).map(|_| calibrate_once(threads)).fold(0.0, f64::max)
}

fn calibrate_once(threads: usize) -> f64 {
    const N: usize = 128;
    const REPS: usize = 256;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut a = vec![0.0f32; N * N];
                let mut b = vec![0.0f32; N * N];
                data::fill_uniform(t as u64, &mut a);
                data::fill_uniform(t as u64 + 99, &mut b);
                let mut c = vec![0.0f32; N * N];
                for _ in 0..REPS {
                    for i in 0..N {
                        let row = &mut c[i * N..(i + 1) * N];
                        for k in 0..N {
                            let aik = a[i * N + k];
                            for (cv, &bv) in row.iter_mut().zip(&b[k * N..(k + 1) * N]) {
                                *cv += aik * bv;
                            }
                        }
                    }
                    std::hint::black_box(&mut c);
                }
            });
        }
    });
    (2 * N * N * N * REPS * threads) as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// Writes `perf.json` and `perf.svg` into `dir`.
pub fn write_report(ctx: &Context, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let rows = ctx
        .perf_rows
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut peers: Vec<(String, String, f64)> = Vec::new();
    for path in &ctx.opts.peers {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("{}: {e}", path.display()))?;
            if let (Some(s), Some(d), Some(g)) = (
                v["shape"].as_str(),
                v["device"].as_str(),
                v["gflops"].as_f64(),
            ) {
                peers.push((s.to_owned(), d.to_owned(), g));
            }
        }
    }
    let json = serde_json::json!({
        "rows": rows,
        "peers": peers.iter().map(|(s, d, g)| serde_json::json!({"shape": s, "device": d, "gflops": g})).collect::<Vec<_>>(),
        "band": BAND,
        "rounds": ROUNDS,
    });
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("perf.json"), text + "\n").map_err(|e| e.to_string())?;
    std::fs::write(dir.join("perf.svg"), svg(&rows, &peers)).map_err(|e| e.to_string())?;
    if rows.is_empty() {
        eprintln!("sporkle-validate: the report has no measurements (run with --bench)");
    }
    Ok(())
}

/// A grouped horizontal bar chart: per shape, this run, the baseline, and each peer.
fn svg(rows: &[Row], peers: &[(String, String, f64)]) -> String {
    let mut series: Vec<String> = vec!["this run".into(), "baseline".into()];
    for (_, d, _) in peers {
        if !series.contains(d) {
            series.push(d.clone());
        }
    }
    let colours = [
        "#1f77b4", "#aec7e8", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    ];
    let bar = 12.0;
    let group = bar * series.len() as f64 + 10.0;
    let (left, width) = (230.0, 520.0);
    let height = 60.0 + group * rows.len() as f64 + 20.0 * series.len() as f64;
    let value = |row: &Row, s: usize| -> Option<f64> {
        match s {
            0 => Some(row.gflops),
            1 => row.baseline_gflops,
            _ => peers
                .iter()
                .find(|p| p.0 == row.shape && p.1 == series[s])
                .map(|p| p.2),
        }
    };
    let max = rows
        .iter()
        .flat_map(|r| (0..series.len()).filter_map(move |s| value(r, s)))
        .fold(1.0f64, f64::max);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<text x=\"10\" y=\"20\" font-size=\"14\">sporkle performance, GFLOP/s (longer is faster)</text>\n",
        left + width + 80.0
    );
    for (i, row) in rows.iter().enumerate() {
        let y0 = 40.0 + group * i as f64;
        out += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{} [{}]</text>\n",
            left - 6.0,
            y0 + group / 2.0,
            row.shape,
            row.status
        );
        for s in 0..series.len() {
            if let Some(v) = value(row, s) {
                let y = y0 + bar * s as f64;
                let w = width * v / max;
                out += &format!(
                    "<rect x=\"{left}\" y=\"{y}\" width=\"{w:.1}\" height=\"{}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{}\">{v:.1}</text>\n",
                    bar - 2.0,
                    colours[s % colours.len()],
                    left + w + 4.0,
                    y + bar - 3.0
                );
            }
        }
    }
    let ly = 50.0 + group * rows.len() as f64;
    for (s, name) in series.iter().enumerate() {
        let y = ly + 18.0 * s as f64;
        out += &format!(
            "<rect x=\"{left}\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            colours[s % colours.len()],
            left + 18.0,
            y + 10.0
        );
    }
    out + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device without baselines is compared with the stored one of its family whose
    /// calibration is nearest; its own file and other families never count.
    #[test]
    fn the_closest_baseline_is_of_the_same_family() {
        let case = "vgg_3x3_56_256_n32";
        let (gpu, base) = closest_baseline("gpu-unseen", case, 60_000.0)
            .unwrap()
            .expect("a stored GPU baseline");
        assert!(gpu.starts_with("gpu-"), "{gpu}");
        assert!(base.ratio > 0.0);
        let (cpu, _) = closest_baseline("cpu-avx512-unseen-2t", case, 30.0)
            .unwrap()
            .expect("a stored CPU baseline");
        assert!(cpu.starts_with("cpu-"), "{cpu}");
        let own = closest_baseline(&gpu, case, 60_000.0).unwrap();
        assert!(
            own.is_none_or(|(k, _)| k != gpu),
            "its own file is not another device"
        );
        assert!(closest_baseline("gpu-unseen", "no_such_case", 1.0)
            .unwrap()
            .is_none());
    }
}
