//! Property tests: random shapes, strides, paddings, dilations and groups, the CPU backend
//! (its own choice of path, and each path forced; each microkernel; several thread counts)
//! against the naive reference, in fp32 tolerance and
//! in exact mode. Failing cases are persisted in `tests/properties.proptest-regressions`.

use proptest::prelude::*;
use sporkle::cpu::{CpuPath, Microkernel};
use sporkle::tolerance::{compare, Tolerance};
use sporkle::{data, reference, Conv2dParams, CpuBackend};
use sporkle_tools::props::params;
use std::sync::OnceLock;

fn backends() -> &'static [CpuBackend] {
    static B: OnceLock<Vec<CpuBackend>> = OnceLock::new();
    B.get_or_init(|| {
        let mut all = vec![
            CpuBackend::with_threads(2).unwrap(),
            CpuBackend::with_options(1, Microkernel::Portable).unwrap(),
        ];
        for path in [CpuPath::GemmStrips, CpuPath::GemmRows, CpuPath::RowSums] {
            all.push(
                CpuBackend::with_options(3, Microkernel::detect())
                    .unwrap()
                    .with_path(path),
            );
            all.push(
                CpuBackend::with_options(2, Microkernel::Portable)
                    .unwrap()
                    .with_path(path),
            );
        }
        all
    })
}

fn run(
    p: &Conv2dParams,
    seed: u64,
    exact: bool,
    bias: bool,
    backend: usize,
) -> Result<(), TestCaseError> {
    let (x, w, b) = data::conv_data(p, seed, exact);
    let bias = bias.then_some(&b[..]);
    let r = reference::conv2d_f64(p, &x, &w, bias).unwrap();
    let mut y = vec![f32::NAN; p.output_len()];
    let cpu = &backends()[backend];
    cpu.conv2d(p, &x, &w, bias, &mut y).unwrap();
    let tol = if exact {
        Tolerance::Exact
    } else {
        Tolerance::Fp32
    };
    if let Err(m) = compare(p, &y, &r, tol) {
        return Err(TestCaseError::fail(format!(
            "{p} on {} thread(s), {:?}: {m}",
            cpu.threads(),
            cpu.microkernel()
        )));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn cpu_matches_the_reference(p in params(), seed in any::<u64>(), bias in any::<bool>(), backend in 0usize..8) {
        run(&p, seed, false, bias, backend)?;
    }

    #[test]
    fn cpu_is_exact_on_small_integers(p in params(), seed in any::<u64>(), bias in any::<bool>(), backend in 0usize..8) {
        run(&p, seed, true, bias, backend)?;
    }
}
