//! Property trials: proptest inside the runner. Random valid parameters (shapes, strides,
//! paddings, dilations, groups, bias, exact or not) on every backend against the reference.
//! A failing case is shrunk and persisted in `suites/props.proptest-regressions` (committed),
//! and every later run replays it first. `props/wide_vs_reference` draws wide groups (64 to
//! 80 filters each), which take the GPU's tiled kernel and both CPU GEMM orientations, with
//! kernels 1 to 7 wide: the CPU runs each case in both orientations, forced, and the GPU with
//! a tile variant forced too.

use super::{fail, trial, Context, Device};
use libtest_mimic::Trial;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestError, TestRunner};
use sporkle::suite::Case;
use sporkle::Conv2dParams;
use std::sync::{Arc, OnceLock};

/// Random cases per trial run (each a reference convolution: keep them small).
const CASES: u32 = 64;

/// Valid parameters: up to 3 images, 4 groups, 20 filters per group, 13×13 inputs, 5×5
/// kernels, strides and dilations up to 3, padding up to 3 per side (half the cases symmetric,
/// half with each side drawn on its own). Shared with `tests/properties.rs`.
pub fn params() -> impl Strategy<Value = Conv2dParams> {
    (
        (1usize..=3, 1usize..=4, 1usize..=5, 1usize..=20),
        (1usize..=13, 1usize..=13, 1usize..=5, 1usize..=5),
        (
            1usize..=3,
            1usize..=3,
            0usize..=3,
            0usize..=3,
            1usize..=3,
            1usize..=3,
        ),
        (0usize..=3, 0usize..=3, any::<bool>()),
    )
        .prop_map(
            |(
                (n, groups, cg, kg),
                (h, w, k_h, k_w),
                (sh, sw, ph, pw, dh, dw),
                (pb, pr, uneven),
            )| {
                let p = Conv2dParams::new(n, cg * groups, h, w, kg * groups, k_h, k_w)
                    .with_groups(groups)
                    .with_stride(sh, sw)
                    .with_dilation(dh, dw);
                if uneven {
                    p.with_pads(ph, pw, pb, pr)
                } else {
                    p.with_padding(ph, pw)
                }
            },
        )
        .prop_filter("output must not be empty", |p| p.validate().is_ok())
}

/// Wide groups: 64 to 80 filters per group (the GPU's tiled kernel; the CPU's GEMM paths in
/// either orientation), 1 or 2 groups of up to 6 channels, kernels 1 to 3 high and 1 to 7 wide,
/// strides and dilations up to 2, padding up to 3 per side, up to 10×12 inputs, 1 or 2 images.
pub fn wide_params() -> impl Strategy<Value = Conv2dParams> {
    (
        (1usize..=2, 1usize..=2, 1usize..=6, 64usize..=80),
        (1usize..=10, 1usize..=12, 1usize..=3, 1usize..=7),
        (1usize..=2, 1usize..=2, 1usize..=2, 1usize..=2),
        (0usize..=3, 0usize..=3, 0usize..=3, 0usize..=3),
    )
        .prop_map(
            |((n, groups, cg, kg), (h, w, k_h, k_w), (sh, sw, dh, dw), (pt, pl, pb, pr))| {
                Conv2dParams::new(n, cg * groups, h, w, kg * groups, k_h, k_w)
                    .with_groups(groups)
                    .with_stride(sh, sw)
                    .with_dilation(dh, dw)
                    .with_pads(pt, pl, pb, pr)
            },
        )
        .prop_filter("output must not be empty", |p| p.validate().is_ok())
}

/// Random cases of the wide trial per run.
const WIDE_CASES: u32 = 12;

/// The persistence file, as the `'static` path proptest wants (made once per process).
fn persistence() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        sporkle::repo_root()
            .join("suites/props.proptest-regressions")
            .to_string_lossy()
            .into_owned()
    })
}

pub fn trials(ctx: &Arc<Context>) -> Vec<Trial> {
    let mut out = Vec::new();
    for device in ctx.devices.iter().filter(|d| d.is_backend()) {
        let dev = device.clone();
        out.push(trial(
            "props/random_vs_reference".into(),
            device,
            None,
            move || run(&dev, params(), CASES, &|_| Ok(())),
        ));
        let dev = device.clone();
        out.push(trial(
            "props/wide_vs_reference".into(),
            device,
            None,
            move || {
                let forced = Forced::for_device(&dev).map_err(fail)?;
                run(&dev, wide_params(), WIDE_CASES, &|case| forced.check(case))
            },
        ));
    }
    out
}

/// What the wide trial forces besides the device's own choice: each CPU GEMM orientation, or
/// on the GPU a tile variant (one of `tiles/every_variant`'s, by the case's seed).
enum Forced {
    Nothing,
    CpuPaths(Vec<(sporkle::cpu::CpuPath, sporkle::CpuBackend)>),
    GpuTile(Arc<sporkle::GpuBackend>),
}

impl Forced {
    fn for_device(device: &Device) -> sporkle::Result<Self> {
        use sporkle::cpu::CpuPath;
        Ok(match device {
            Device::Cpu { backend, .. } => Forced::CpuPaths(
                [CpuPath::GemmStrips, CpuPath::GemmRows]
                    .into_iter()
                    .map(|path| {
                        sporkle::CpuBackend::with_options(backend.threads(), backend.microkernel())
                            .map(|b| (path, b.with_path(path)))
                    })
                    .collect::<sporkle::Result<_>>()?,
            ),
            Device::Gpu { backend } => Forced::GpuTile(Arc::clone(backend)),
            _ => Forced::Nothing,
        })
    }

    /// Runs `case` the forced ways, each against the reference.
    fn check(&self, case: &Case) -> Result<(), String> {
        let p = &case.params;
        let (x, w, b) = sporkle::data::conv_data(p, case.seed, case.exact);
        let bias = case.bias.then_some(&b[..]);
        let tol = if case.exact {
            sporkle::tolerance::Tolerance::Exact
        } else {
            sporkle::tolerance::Tolerance::Fp32
        };
        let mut outputs = Vec::new();
        match self {
            Forced::Nothing => return Ok(()),
            Forced::CpuPaths(paths) => {
                for (path, cpu) in paths {
                    let mut y = vec![f32::NAN; p.output_len()];
                    cpu.conv2d(p, &x, &w, bias, &mut y)
                        .map_err(|e| format!("{path:?}: {e}"))?;
                    outputs.push((format!("{path:?}"), y));
                }
            }
            Forced::GpuTile(gpu) => {
                let spec = super::suites::TILES[case.seed as usize % super::suites::TILES.len()];
                let tile = sporkle::gpu::Tile::parse(spec).map_err(|e| e.to_string())?;
                let mut y = vec![f32::NAN; p.output_len()];
                let once = sporkle::gpu::Dispatches {
                    tile: Some(tile),
                    ..sporkle::gpu::Dispatches::ONE
                };
                gpu.time_kernel(p, &x, &w, bias, &mut y, once)
                    .map_err(|e| format!("{spec}: {e}"))?;
                outputs.push((spec.to_owned(), y));
            }
        }
        let r = sporkle::reference::conv2d_f64(p, &x, &w, bias).map_err(|e| e.to_string())?;
        for (how, y) in outputs {
            sporkle::tolerance::compare(p, &y, &r, tol).map_err(|m| format!("{how}: {m}"))?;
        }
        Ok(())
    }
}

/// Runs `cases` random cases of `strategy` on `device` against the reference, each also
/// through `also` (the ways the trial forces).
fn run(
    device: &Device,
    strategy: impl Strategy<Value = Conv2dParams>,
    cases: u32,
    also: &dyn Fn(&Case) -> Result<(), String>,
) -> Result<(), libtest_mimic::Failed> {
    let config = Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(persistence()))),
        ..Config::default()
    };
    let strategy = (strategy, any::<u64>(), any::<bool>(), any::<bool>());
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |(params, seed, bias, exact)| {
        let case = Case {
            name: "random".into(),
            params,
            bias,
            exact,
            seed,
            pins: None,
            xfail: Default::default(),
        };
        super::suites::check_case(&case, device)
            .map_err(|e| TestCaseError::fail(e.message().unwrap_or("").to_owned()))?;
        also(&case).map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => Ok(()),
        Err(TestError::Fail(why, (p, seed, bias, exact))) => Err(fail(format!(
            "{why}\nminimal case: {p} seed={seed} bias={bias} exact={exact}"
        ))),
        Err(e) => Err(fail(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::ValueTree;
    use sporkle::cpu::CpuPath;
    use sporkle::gpu::{Kernel, Tile};

    /// The wide strategy reaches what it is for: the GPU's tiled kernel on every case, kernels
    /// of every width 1 to 7, and shapes whose own CPU orientation is each of the two (the
    /// trial forces both anyway).
    #[test]
    fn wide_params_reach_the_tiled_kernel_and_every_width() {
        let mut runner = TestRunner::deterministic();
        let strategy = wide_params();
        let (mut widths, mut paths) = (std::collections::BTreeSet::new(), [0usize; 2]);
        for _ in 0..400 {
            let p = strategy.new_tree(&mut runner).unwrap().current();
            assert_eq!(Tile::for_params(&p).kernel, Kernel::Tiled, "{p}");
            widths.insert(p.k_w);
            match CpuPath::for_params(&p) {
                CpuPath::GemmStrips => paths[0] += 1,
                CpuPath::GemmRows => paths[1] += 1,
                CpuPath::RowSums | CpuPath::Winograd | CpuPath::WinogradF4 => {
                    panic!("{p}: wide groups take a GEMM path (the strategy's channels are few)")
                }
            }
        }
        assert_eq!(
            widths.into_iter().collect::<Vec<_>>(),
            (1..=7).collect::<Vec<_>>()
        );
        assert!(
            paths.iter().all(|&n| n > 0),
            "orientations drawn: {paths:?}"
        );
    }
}
