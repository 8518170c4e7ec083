//! Suite trials: every case of `suites/{basic,edge,regression,stress,benchdnn}.toml` on every
//! backend, against the reference (tolerance or bit-exact), named `{suite}/{case}`; and the
//! cases of `--problem DESC`, named `problem/{name}`.

use super::{fail, trial, Context};
use libtest_mimic::{Failed, Trial};
use sporkle::suite::{Case, Suite};
use sporkle::tolerance::{compare, Tolerance};
use sporkle::{data, reference, Error};
use std::sync::Arc;

/// The suites checked for correctness (the perf suite is too large for the reference).
pub const CORRECTNESS_SUITES: [&str; 5] = ["basic", "edge", "regression", "stress", "benchdnn"];

/// Loads a suite by name from `suites/`.
pub fn load(name: &str) -> sporkle::Result<Suite> {
    let suite = Suite::load(&Suite::dir().join(format!("{name}.toml")))?;
    if name == "regression" {
        if let Some(c) = suite
            .cases
            .iter()
            .find(|c| c.pins.as_deref().is_none_or(str::is_empty))
        {
            return Err(Error::Suite {
                path: Suite::dir().join("regression.toml"),
                problem: format!(
                    "case {:?} must say which bug it pins (pins = \"...\")",
                    c.name
                ),
            });
        }
    }
    Ok(suite)
}

/// `problem/{name}` for each `--problem` case on every backend, against the reference.
pub fn problem_trials(ctx: &Arc<Context>) -> Vec<Trial> {
    let mut out = Vec::new();
    for case in &ctx.opts.problems {
        for device in ctx.devices.iter().filter(|d| d.is_backend()) {
            let (case, dev) = (case.clone(), device.clone());
            out.push(trial(
                format!("problem/{}", case.name),
                device,
                None,
                move || check_case(&case, &dev),
            ));
        }
    }
    out
}

pub fn trials(ctx: &Arc<Context>) -> sporkle::Result<Vec<Trial>> {
    let mut out = Vec::new();
    for name in CORRECTNESS_SUITES {
        for case in load(name)?.cases {
            for device in ctx.devices.iter().filter(|d| d.is_backend()) {
                let (case, dev) = (case.clone(), device.clone());
                let xfail = case.xfail.get(device.kind()).cloned();
                out.push(trial(
                    format!("{name}/{}", case.name),
                    device,
                    xfail,
                    move || check_case(&case, &dev),
                ));
            }
        }
    }
    for device in ctx.devices.iter().filter(|d| d.is_backend()) {
        let dev = device.clone();
        out.push(trial(
            "weights/one_element_changed".into(),
            device,
            None,
            move || one_weight_changed(&dev),
        ));
    }
    for device in &ctx.devices {
        if let super::Device::Gpu { backend } = device {
            let (gpu, cases) = (Arc::clone(backend), load("basic")?.cases);
            out.push(trial(
                "tiles/every_variant".into(),
                device,
                None,
                move || every_tile(&gpu, &cases),
            ));
            let (gpu, cases) = (Arc::clone(backend), load("basic")?.cases);
            out.push(trial("winograd/forced".into(), device, None, move || {
                let run =
                    |p: &_, x: &_, w: &_, b: Option<&[f32]>, y: &mut _, tile: Option<&str>| {
                        let forced = sporkle::gpu::Dispatches {
                            algorithm: Some(sporkle::gpu::Algorithm::Winograd),
                            tile: (tile.map(sporkle::gpu::Tile::parse).transpose())
                                .map_err(sporkle::Error::InvalidParams)?,
                            ..sporkle::gpu::Dispatches::ONE
                        };
                        gpu.time_kernel(p, x, w, b, y, forced).map(|_| ())
                    };
                let tiled: Vec<&str> = TILES
                    .into_iter()
                    .filter(|s| s.starts_with("tiled:"))
                    .collect();
                forced_winograd(&run, &tiled, &cases, Tolerance::Winograd)
            }));
        }
        // The CPU's Winograd variants, forced the same way (its default takes them only for
        // large layers).
        if let super::Device::Cpu { backend, .. } = device {
            use sporkle::cpu::CpuPath;
            for (path, name) in [
                (CpuPath::Winograd, "winograd/forced"),
                (CpuPath::WinogradF4, "winograd/forced_f4x4"),
            ] {
                let cpu =
                    sporkle::CpuBackend::with_options(backend.threads(), backend.microkernel())?
                        .with_path(path);
                let cases = load("basic")?.cases;
                out.push(trial(name.into(), device, None, move || {
                    let run =
                        |p: &_, x: &_, w: &_, b: Option<&[f32]>, y: &mut _, _: Option<&str>| {
                            cpu.conv2d(p, x, w, b, y)
                        };
                    forced_winograd(&run, &[], &cases, path.tolerance())
                }));
            }
        }
    }
    Ok(out)
}

/// Tile variants the GPU heuristics choose for large shapes (which the small suites never reach),
/// and ones tuning sweeps try, forced on the wide cases of the basic suite (filters and positions
/// that are not whole tiles, groups, strides, dilations) with their split chosen, and once with
/// a split of 3.
pub(super) const TILES: [&str; 8] = [
    "tiled:64x64x16:4x4",
    "tiled:64x64x16:4x8",
    "tiled:64x128x8:8x8",
    "tiled:128x128x8:8x8",
    "tiled:128x64x16:8x4",
    "tiled:64x64x16:4x4:3",
    "narrow:16x128x16:2x4",
    "narrow:4x64x16:1x1",
];

fn every_tile(gpu: &sporkle::GpuBackend, cases: &[sporkle::suite::Case]) -> Result<(), Failed> {
    for spec in TILES {
        let tile = sporkle::gpu::Tile::parse(spec).map_err(fail)?;
        for case in cases.iter().filter(|c| c.name.starts_with("wide_")) {
            let p = &case.params;
            let (x, w, b) = data::conv_data(p, case.seed, false);
            let bias = case.bias.then_some(&b[..]);
            let mut y = vec![f32::NAN; p.output_len()];
            let once = sporkle::gpu::Dispatches {
                tile: Some(tile),
                ..sporkle::gpu::Dispatches::ONE
            };
            gpu.time_kernel(p, &x, &w, bias, &mut y, once)
                .map_err(|e| fail(format!("{spec} on {}: {e}", case.name)))?;
            let r = reference::conv2d_f64(p, &x, &w, bias).map_err(fail)?;
            compare(p, &y, &r, Tolerance::Fp32)
                .map_err(|m| fail(format!("{spec} on {} ({p}): {m}", case.name)))?;
        }
    }
    Ok(())
}

/// A convolution with Winograd forced (and a GPU tile variant, where one is named).
type ForcedRun<'a> = dyn Fn(
        &sporkle::Conv2dParams,
        &[f32],
        &[f32],
        Option<&[f32]>,
        &mut [f32],
        Option<&str>,
    ) -> sporkle::Result<()>
    + 'a;

/// Winograd, which the GPU and the CPU choose only for large layers, forced on every basic case
/// it applies to and on shapes that stress its tiling (odd output sizes, padding 0 and 2,
/// filters that are not whole GEMM tiles, one filter, padding per side), and with each of
/// `tiles` (the GPU's tiled GEMM variants); all against the whole reference with the Winograd
/// magnitudes of `tol` (F(2×2) or F(4×4)). F(2×2) must be bit-exact on small-integer data,
/// where no value through its transforms rounds; F(4×4) cannot be (its `G` holds 1/6), so
/// there small integers are held to its bound like any data.
fn forced_winograd(
    forced: &ForcedRun,
    tiles: &[&str],
    cases: &[sporkle::suite::Case],
    tol: Tolerance,
) -> Result<(), Failed> {
    use sporkle::Conv2dParams;
    let run = |p: &Conv2dParams, seed: u64, bias: bool, tile: Option<&str>| {
        let (x, w, b) = data::conv_data(p, seed, false);
        let bias = bias.then_some(&b[..]);
        let mut y = vec![f32::NAN; p.output_len()];
        let what = format!("{p} (tile {})", tile.unwrap_or("default"));
        forced(p, &x, &w, bias, &mut y, tile).map_err(|e| fail(format!("{what}: {e}")))?;
        let r = sporkle::tolerance::reference(p, &x, &w, bias, tol).map_err(fail)?;
        compare(p, &y, &r, tol)
            .map(|_| ())
            .map_err(|m| fail(format!("{what}: {m}")))
    };
    for case in cases
        .iter()
        .filter(|c| sporkle::winograd::applies(&c.params))
    {
        run(&case.params, case.seed, case.bias, None)?;
    }
    let odd = Conv2dParams::new(2, 20, 9, 7, 24, 3, 3).with_padding(1, 1);
    let ragged = Conv2dParams::new(1, 130, 6, 10, 132, 3, 3);
    run(&odd, 1, true, None)?;
    run(&ragged, 2, false, None)?;
    run(
        &Conv2dParams::new(3, 16, 5, 5, 70, 3, 3).with_padding(2, 2),
        3,
        true,
        None,
    )?;
    run(&Conv2dParams::new(1, 3, 4, 4, 1, 3, 3), 4, true, None)?;
    // Padding per side: the transforms read from the leading padding; the trailing one only
    // adds output rows and columns (odd counts, ragged last tiles).
    run(
        &Conv2dParams::new(2, 20, 9, 8, 24, 3, 3).with_pads(0, 2, 3, 1),
        6,
        true,
        None,
    )?;
    for spec in tiles {
        run(&ragged, 5, true, Some(spec))?;
    }
    // Exact mode: with small integers every value through the transforms is a multiple of 1/4
    // far below 2^22, so nothing rounds and Winograd must give the reference's bits (a
    // transform coefficient off by 2e-5 passes the Winograd bound, not this).
    for (p, seed) in [(odd, 7), (ragged, 8)] {
        let (x, w, b) = data::conv_data(&p, seed, true);
        let mut y = vec![f32::NAN; p.output_len()];
        forced(&p, &x, &w, Some(&b), &mut y, None)
            .map_err(|e| fail(format!("{p} (exact): {e}")))?;
        let exact = if tol == Tolerance::Winograd {
            Tolerance::Exact
        } else {
            tol
        };
        let r = sporkle::tolerance::reference(&p, &x, &w, Some(&b), exact).map_err(fail)?;
        compare(&p, &y, &r, exact).map_err(|m| {
            let what = if exact == Tolerance::Exact {
                "is not exact"
            } else {
                "is outside its bound"
            };
            fail(format!("{p}: Winograd on small integers {what}: {m}"))
        })?;
    }
    // Where it does not apply, forcing it is an error, not a silent direct run.
    let strided = odd.with_stride(2, 2);
    let mut y = vec![0.0; strided.output_len()];
    let (x, w, _) = data::conv_data(&strided, 6, false);
    if forced(&strided, &x, &w, None, &mut y, None).is_ok() {
        return Err(fail(
            "forcing Winograd on a strided convolution did not fail",
        ));
    }
    Ok(())
}

/// The original's weight cache sampled elements, so a changed weight could go unnoticed
/// (ORIGINAL.md #9): call, change the last weight only, call again; both must be right.
fn one_weight_changed(device: &super::Device) -> Result<(), Failed> {
    let p = sporkle::Conv2dParams::new(1, 16, 10, 10, 32, 3, 3).with_padding(1, 1);
    let (x, mut w, _) = data::conv_data(&p, 11, true);
    for round in 0..2 {
        let y = device.conv2d(&p, &x, &w, None).map_err(fail)?;
        let r = reference::conv2d_f64(&p, &x, &w, None).map_err(fail)?;
        compare(&p, &y, &r, Tolerance::Exact)
            .map_err(|m| fail(format!("call {}: {m}", round + 1)))?;
        *w.last_mut().expect("weights") += 1.0;
    }
    Ok(())
}

/// Runs a case on a device and compares it with the reference.
pub fn check_case(case: &Case, device: &super::Device) -> Result<(), Failed> {
    let p = &case.params;
    let (x, w, b) = data::conv_data(p, case.seed, case.exact);
    let bias = case.bias.then_some(&b[..]);
    let y = device.conv2d(p, &x, &w, bias).map_err(fail)?;
    let r = reference::conv2d_f64(p, &x, &w, bias).map_err(fail)?;
    let tol = if case.exact {
        Tolerance::Exact
    } else {
        Tolerance::for_params(p)
    };
    compare(p, &y, &r, tol)
        .map(|_| ())
        .map_err(|m| fail(format!("{p}: {m}")))
}
