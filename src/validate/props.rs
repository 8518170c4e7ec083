//! Property trials: proptest inside the runner. Random valid parameters (shapes, strides,
//! paddings, dilations, groups, bias, exact or not) on every backend against the reference.
//! A failing case is shrunk and persisted in `suites/props.proptest-regressions` (committed),
//! and every later run replays it first.

use super::{fail, trial, Context, Device};
use crate::suite::Case;
use crate::Conv2dParams;
use libtest_mimic::Trial;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestError, TestRunner};
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

/// The persistence file, as the `'static` path proptest wants (made once per process).
fn persistence() -> &'static str {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        crate::repo_root()
            .join("suites/props.proptest-regressions")
            .to_string_lossy()
            .into_owned()
    })
}

pub fn trials(ctx: &Arc<Context>) -> Vec<Trial> {
    ctx.devices
        .iter()
        .filter(|d| d.is_backend())
        .map(|device| {
            let dev = device.clone();
            trial(
                "props/random_vs_reference".into(),
                device,
                None,
                move || run(&dev),
            )
        })
        .collect()
}

fn run(device: &Device) -> Result<(), libtest_mimic::Failed> {
    let config = Config {
        cases: CASES,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(persistence()))),
        ..Config::default()
    };
    let strategy = (params(), any::<u64>(), any::<bool>(), any::<bool>());
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
            .map_err(|e| TestCaseError::fail(e.message().unwrap_or("").to_owned()))
    });
    match result {
        Ok(()) => Ok(()),
        Err(TestError::Fail(why, (p, seed, bias, exact))) => Err(fail(format!(
            "{why}\nminimal case: {p} seed={seed} bias={bias} exact={exact}"
        ))),
        Err(e) => Err(fail(e)),
    }
}
