//! Unit tests of the CPU backend: every path and kernel against the reference, bits that do not
//! depend on threads, plans or alignment, and the choice of path.

use super::*;
use crate::data::conv_data;
use crate::tolerance::{compare, Tolerance};

fn check(p: Conv2dParams, backend: &CpuBackend, exact: bool, with_bias: bool) {
    let (x, w, b) = conv_data(&p, 7, exact);
    let bias = with_bias.then_some(&b[..]);
    let mut y = vec![f32::NAN; p.output_len()];
    backend.conv2d(&p, &x, &w, bias, &mut y).unwrap();
    let path = backend.path_for(&p);
    // Small integers are exact on every path but F(4×4) Winograd (whose G has 1/6).
    let tol = if exact && path.exact_on_small_integers() {
        Tolerance::Exact
    } else {
        path.tolerance()
    };
    let r = crate::tolerance::reference(&p, &x, &w, bias, tol);
    if let Err(m) = compare(&p, &y, &r.unwrap(), tol) {
        panic!(
            "{p} ({:?}, {:?}): {m}",
            backend.path_for(&p),
            backend.microkernel()
        );
    }
}

/// Every path with the best microkernel and with the portable one, and the default choice.
fn backends() -> Vec<CpuBackend> {
    let mut all = vec![];
    for (i, kernel) in supported().into_iter().enumerate() {
        all.push(CpuBackend::with_options(2 + i, kernel).unwrap());
        for path in [CpuPath::GemmStrips, CpuPath::GemmRows, CpuPath::RowSums] {
            all.push(
                CpuBackend::with_options(1 + i, kernel)
                    .unwrap()
                    .with_path(path),
            );
        }
    }
    all
}

/// Every microkernel this CPU runs.
fn supported() -> Vec<Microkernel> {
    (Microkernel::ALL.into_iter())
        .filter(|k| k.supported())
        .collect()
}

#[test]
fn gemm_and_row_sums_paths_cover_every_feature() {
    let cases = [
        Conv2dParams::new(2, 5, 9, 11, 20, 3, 3).with_padding(1, 1),
        Conv2dParams::new(1, 3, 23, 23, 17, 7, 7)
            .with_stride(2, 2)
            .with_padding(3, 3),
        Conv2dParams::new(3, 16, 6, 7, 33, 1, 1),
        Conv2dParams::new(1, 8, 13, 9, 16, 3, 2)
            .with_stride(2, 3)
            .with_padding(2, 1)
            .with_dilation(2, 1),
        Conv2dParams::new(2, 12, 10, 10, 12, 3, 3)
            .with_padding(1, 1)
            .with_groups(12),
        Conv2dParams::new(1, 8, 9, 9, 16, 3, 3)
            .with_padding(2, 2)
            .with_dilation(2, 2)
            .with_groups(2),
        Conv2dParams::new(1, 6, 7, 7, 12, 3, 3)
            .with_stride(2, 1)
            .with_groups(3),
        Conv2dParams::new(1, 1, 1, 1, 1, 1, 1),
        Conv2dParams::new(1, 300, 5, 5, 18, 3, 3).with_padding(1, 1),
        // Strides larger than the kernel: phases no tap reads get no plane.
        Conv2dParams::new(2, 3, 20, 23, 16, 2, 3)
            .with_stride(7, 5)
            .with_padding(1, 1),
        Conv2dParams::new(1, 4, 9, 9, 6, 2, 2)
            .with_stride(4, 3)
            .with_dilation(2, 1)
            .with_groups(2),
        // Enough images for a task each: every task builds its own image's (group's) planes.
        Conv2dParams::new(7, 6, 11, 9, 20, 3, 3)
            .with_stride(2, 2)
            .with_padding(1, 1)
            .with_groups(2),
    ];
    for b in backends() {
        for p in cases {
            check(p, &b, false, true);
            check(p, &b, true, false);
            check(p, &b, true, true);
        }
    }
}

/// Padding that differs between the two sides of an axis (ONNX pads, SAME with even
/// kernels or strides): more after than before, more before than after, one side only, on
/// every path and microkernel, in tolerance and bit-exact.
#[test]
fn uneven_padding_on_every_path() {
    let cases = [
        Conv2dParams::new(1, 4, 8, 8, 16, 2, 2).with_pads(0, 0, 1, 1),
        Conv2dParams::new(2, 5, 9, 11, 20, 3, 3).with_pads(2, 0, 0, 3),
        Conv2dParams::new(1, 3, 15, 13, 17, 4, 4)
            .with_stride(2, 2)
            .with_pads(1, 1, 2, 2),
        Conv2dParams::new(1, 8, 13, 9, 16, 3, 2)
            .with_stride(2, 3)
            .with_pads(0, 2, 3, 0)
            .with_dilation(2, 1),
        Conv2dParams::new(2, 12, 10, 10, 12, 3, 3)
            .with_pads(1, 0, 2, 1)
            .with_groups(12),
        Conv2dParams::new(1, 16, 6, 7, 32, 1, 1).with_pads(0, 0, 1, 2),
        // The last rows read only padding, past a plane's guard row.
        Conv2dParams::new(1, 4, 6, 6, 16, 3, 3).with_pads(0, 1, 3, 0),
    ];
    for b in backends() {
        for p in cases {
            check(p, &b, false, true);
            check(p, &b, true, false);
        }
    }
}

/// Regression (found by the property tests): the last row of a phase plane read past its
/// end into the next plane, whose first column held data (stride 2, padding 1 on w).
#[test]
fn regression_row_spill_across_phase_planes() {
    for b in backends() {
        check(
            Conv2dParams::new(1, 1, 3, 3, 1, 2, 3)
                .with_stride(1, 2)
                .with_padding(0, 1),
            &b,
            true,
            false,
        );
        check(
            Conv2dParams::new(1, 2, 3, 7, 9, 2, 3)
                .with_stride(3, 2)
                .with_padding(0, 1),
            &b,
            false,
            true,
        );
    }
}

/// Where the output starts in memory moves where the strips of a task that stores straight
/// into its planes begin (on the planes' cache lines): never which bits come out, and
/// nothing outside the output is written.
#[test]
fn results_do_not_depend_on_the_outputs_alignment() {
    // Planes of 64 and of 48 floats (whole strips), and of 35 (not: no shift).
    let cases = [
        Conv2dParams::new(2, 8, 8, 8, 32, 1, 1),
        Conv2dParams::new(1, 16, 8, 6, 24, 3, 3).with_padding(1, 1),
        Conv2dParams::new(1, 4, 7, 5, 16, 1, 1),
    ];
    for p in cases {
        let (x, w, b) = conv_data(&p, 4, false);
        let len = p.output_len();
        let mut runs = Vec::new();
        for kernel in supported() {
            let cpu = CpuBackend::with_options(2, kernel)
                .unwrap()
                .with_path(CpuPath::GemmStrips);
            for offset in 0..NR {
                let mut buf = vec![-7.0f32; len + 2 * NR];
                let y = &mut buf[offset..offset + len];
                cpu.conv2d(&p, &x, &w, Some(&b), y).unwrap();
                assert!(buf[..offset].iter().all(|&v| v == -7.0), "{p}: {offset}");
                assert!(
                    buf[offset + len..].iter().all(|&v| v == -7.0),
                    "{p}: {offset}"
                );
                let bits: Vec<u32> = buf[offset..][..len].iter().map(|v| v.to_bits()).collect();
                runs.push((kernel.numerics(), bits));
            }
        }
        for pair in runs.windows(2) {
            if pair[0].0 == pair[1].0 {
                assert!(pair[0].1 == pair[1].1, "{p}: bits depend on alignment");
            }
        }
        let r = crate::reference::conv2d_f64(&p, &x, &w, Some(&b)).unwrap();
        for (_, bits) in &runs {
            let y: Vec<f32> = bits.iter().map(|&v| f32::from_bits(v)).collect();
            compare(&p, &y, &r, Tolerance::Fp32).unwrap();
        }
    }
}

/// An output's bits never depend on the thread count (which changes how work is cut into
/// tasks and which outputs go through scratch): fingerprints are valid on any machine.
#[test]
fn results_are_bit_identical_for_every_thread_count() {
    let cases = [
        Conv2dParams::new(2, 16, 14, 14, 32, 3, 3).with_padding(1, 1),
        Conv2dParams::new(1, 16, 17, 15, 32, 3, 3)
            .with_padding(2, 2)
            .with_dilation(2, 2)
            .with_groups(4),
        Conv2dParams::new(1, 3, 30, 30, 16, 7, 7)
            .with_stride(2, 2)
            .with_padding(3, 3),
        Conv2dParams::new(2, 24, 9, 9, 24, 3, 3)
            .with_padding(1, 1)
            .with_groups(24),
        Conv2dParams::new(1, 256, 7, 7, 40, 1, 1),
        // Planes built by each task for its own image (or image and group) on 1 to 3 threads,
        // and for the whole batch first on 5 (too few tasks: filters or rows split).
        Conv2dParams::new(6, 8, 13, 11, 24, 3, 3)
            .with_stride(2, 2)
            .with_padding(1, 1),
        Conv2dParams::new(4, 8, 9, 9, 32, 3, 3)
            .with_padding(1, 1)
            .with_groups(2),
    ];
    for p in cases {
        let (x, w, b) = conv_data(&p, 9, false);
        for path in [None, Some(CpuPath::GemmStrips), Some(CpuPath::GemmRows)] {
            // Every thread count, and every variant with the best kernel's numerics.
            let best = Microkernel::detect().numerics();
            let runs = [1, 2, 3, 5].into_iter().flat_map(|threads| {
                (supported().into_iter())
                    .filter(move |k| k.numerics() == best)
                    .map(move |k| (threads, k))
            });
            let outputs: Vec<Vec<u32>> = runs
                .map(|(threads, kernel)| {
                    let mut cpu = CpuBackend::with_options(threads, kernel).unwrap();
                    if let Some(path) = path {
                        cpu = cpu.with_path(path);
                    }
                    let mut y = vec![0.0; p.output_len()];
                    cpu.conv2d(&p, &x, &w, Some(&b), &mut y).unwrap();
                    y.iter().map(|v| v.to_bits()).collect()
                })
                .collect();
            assert!(
                outputs.windows(2).all(|o| o[0] == o[1]),
                "{p} {path:?}: bits differ between thread counts or kernel variants"
            );
        }
    }
}

/// Winograd forced, with every microkernel and several thread counts: odd and even output
/// sizes, padding 0, 1, 2 and per side, filters that are not whole panels or pairs,
/// several images (tasks split tile rows within images), one image shared among the threads
/// (by rows, and by filters for the rows left over); exact on small integers; the same bits for
/// every thread count and for prepared weights.
#[test]
fn winograd_matches_the_reference_on_every_kernel() {
    let cases = [
        Conv2dParams::new(2, 20, 9, 7, 24, 3, 3).with_padding(1, 1),
        Conv2dParams::new(1, 33, 6, 10, 40, 3, 3),
        Conv2dParams::new(3, 16, 5, 5, 70, 3, 3).with_padding(2, 2),
        Conv2dParams::new(1, 3, 4, 4, 1, 3, 3),
        Conv2dParams::new(2, 20, 9, 8, 24, 3, 3).with_pads(0, 2, 3, 1),
        Conv2dParams::new(1, 8, 30, 3, 16, 3, 3).with_padding(1, 1),
        Conv2dParams::new(1, 8, 7, 7, 32, 3, 3),
        // Two threads, 7 rows of F(2×2) tiles: the row left over split by filters (`shares`).
        Conv2dParams::new(1, 16, 14, 6, 64, 3, 3).with_padding(1, 1),
    ];
    for (kernel, path) in supported()
        .into_iter()
        .flat_map(|k| [(k, CpuPath::Winograd), (k, CpuPath::WinogradF4)])
    {
        for (i, p) in cases.iter().enumerate() {
            let cpu = CpuBackend::with_options(1 + i % 3, kernel)
                .unwrap()
                .with_path(path);
            check(*p, &cpu, false, i % 2 == 0);
            check(*p, &cpu, true, true);
            let (x, w, b) = conv_data(p, 3, false);
            let bits = |cpu: &CpuBackend, prepared: bool| {
                let mut y = vec![0.0f32; p.output_len()];
                if prepared {
                    let pw = cpu.prepare_weights(p, &w).unwrap();
                    cpu.conv2d_prepared(p, &x, &pw, Some(&b), &mut y).unwrap();
                } else {
                    cpu.conv2d(p, &x, &w, Some(&b), &mut y).unwrap();
                }
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let one = bits(&cpu, false);
            assert_eq!(one, bits(&cpu, true), "{p}: prepared weights differ");
            let five = CpuBackend::with_options(5, kernel).unwrap().with_path(path);
            assert_eq!(one, bits(&five, false), "{p}: bits depend on threads");
        }
    }
}

/// The CPU's name keys perf baselines: never empty (the architecture where the model is
/// unknown).
#[test]
fn the_cpu_has_a_name() {
    let model = cpu_model();
    assert!(!model.trim().is_empty());
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
        if info.contains("model name") {
            assert!(info.contains(&model), "{model:?} is not in /proc/cpuinfo");
        }
    }
}

#[test]
fn winograd_where_it_pays_and_only_where_it_applies() {
    let big = Conv2dParams::new(1, 256, 14, 14, 256, 3, 3).with_padding(1, 1);
    assert_eq!(CpuPath::for_params(&big), CpuPath::Winograd);
    assert_eq!(
        CpuPath::for_params(&big.with_stride(2, 2)),
        CpuPath::GemmRows
    );
    // F(4×4) where a row has 14 tiles of it (56 outputs).
    let wide = Conv2dParams::new(1, 64, 56, 56, 64, 3, 3).with_padding(1, 1);
    assert_eq!(CpuPath::for_params(&wide), CpuPath::WinogradF4);
    let narrower = Conv2dParams::new(1, 64, 56, 52, 64, 3, 3).with_padding(1, 1);
    assert_eq!(CpuPath::for_params(&narrower), CpuPath::Winograd);
    let narrow = Conv2dParams::new(1, 32, 56, 56, 64, 3, 3).with_padding(1, 1);
    assert_eq!(CpuPath::for_params(&narrow).winograd(), None);
    let small = Conv2dParams::new(1, 64, 5, 5, 64, 3, 3).with_padding(1, 1);
    assert_eq!(CpuPath::for_params(&small).winograd(), None);
    // Forced where it does not apply: an error, and the output untouched.
    let strided = Conv2dParams::new(1, 8, 9, 9, 16, 3, 3).with_stride(2, 2);
    for path in [CpuPath::Winograd, CpuPath::WinogradF4] {
        let cpu = CpuBackend::with_threads(2).unwrap().with_path(path);
        let (x, w, _) = conv_data(&strided, 1, false);
        let mut y = vec![7.0; strided.output_len()];
        let err = cpu.conv2d(&strided, &x, &w, None, &mut y).unwrap_err();
        assert!(err.to_string().contains("does not apply"), "{err}");
        assert!(y.iter().all(|&v| v == 7.0));
        assert!(cpu.prepare_weights(&strided, &w).is_err());
    }
}

#[test]
fn errors_leave_the_output_untouched() {
    let b = CpuBackend::with_threads(1).unwrap();
    let p = Conv2dParams::new(1, 2, 4, 4, 2, 3, 3);
    let mut y = vec![7.0; 8];
    assert!(b.conv2d(&p, &[0.0; 31], &[0.0; 36], None, &mut y).is_err());
    assert!(b
        .conv2d(&p, &[0.0; 32], &[0.0; 36], None, &mut y[..7])
        .is_err());
    assert!(b
        .conv2d(&Conv2dParams { c_in: 0, ..p }, &[], &[], None, &mut y)
        .is_err());
    assert_eq!(y, vec![7.0; 8]);
}

#[test]
fn prepared_weights_give_the_same_result_and_must_fit() {
    let b = CpuBackend::with_threads(2).unwrap();
    for p in [
        Conv2dParams::new(2, 6, 9, 9, 20, 3, 3).with_padding(1, 1),
        Conv2dParams::new(1, 6, 9, 9, 6, 3, 3).with_groups(6),
    ] {
        let (x, w, bias) = conv_data(&p, 3, false);
        let mut y1 = vec![0.0; p.output_len()];
        let mut y2 = vec![1.0; p.output_len()];
        b.conv2d(&p, &x, &w, Some(&bias), &mut y1).unwrap();
        let prepared = b.prepare_weights(&p, &w).unwrap();
        b.conv2d_prepared(&p, &x, &prepared, Some(&bias), &mut y2)
            .unwrap();
        assert_eq!(y1, y2, "{p}");
        // The same filters on other images fit; other filters do not.
        let other = Conv2dParams {
            n: 1,
            h: 5,
            w: 7,
            ..p
        };
        let (x, _, _) = conv_data(&other, 3, false);
        let mut y = vec![0.0; other.output_len()];
        b.conv2d_prepared(&other, &x, &prepared, None, &mut y)
            .unwrap();
        let wrong = Conv2dParams { k_w: 1, ..p };
        let e = b
            .conv2d_prepared(&wrong, &x, &prepared, None, &mut y)
            .unwrap_err();
        assert!(e.to_string().contains("prepared weights"), "{e}");
    }
    assert!(b
        .prepare_weights(&Conv2dParams::new(1, 1, 3, 3, 8, 3, 3), &[0.0; 71])
        .is_err());
}

#[test]
fn bad_options_are_errors() {
    assert!(CpuBackend::with_threads(0).is_err());
}

/// One backend called from several threads at once, plain threads and another rayon pool's
/// workers (the caller works beside the backend's own workers and must neither deadlock nor
/// share a scratch slot): every call gives the bits of a one-thread backend. A deadlock (a
/// workspace lock held across a call deadlocked the rayon callers) fails it within a minute
/// instead of hanging the run.
#[test]
fn concurrent_callers_get_the_same_bits() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        concurrent_calls();
        done.send(()).ok();
    });
    match finished.recv_timeout(std::time::Duration::from_secs(60)) {
        Ok(()) => {}
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("concurrent calls still running after 60 s: deadlocked")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            panic!("a concurrent call failed (its panic is printed above)")
        }
    }
}

fn concurrent_calls() {
    use rayon::prelude::*;
    let cases = [
        Conv2dParams::new(2, 8, 12, 12, 40, 3, 3).with_padding(1, 1),
        Conv2dParams::new(1, 64, 14, 14, 64, 3, 3).with_padding(1, 1),
        Conv2dParams::new(3, 16, 9, 9, 24, 1, 1),
    ];
    let shared = CpuBackend::with_threads(3).unwrap();
    let expected: Vec<Vec<f32>> = cases
        .iter()
        .map(|p| {
            let (x, w, b) = conv_data(p, 11, false);
            let mut y = vec![f32::NAN; p.output_len()];
            let alone = CpuBackend::with_options(1, shared.microkernel()).unwrap();
            alone.conv2d(p, &x, &w, Some(&b), &mut y).unwrap();
            y
        })
        .collect();
    let call = |i: usize| {
        let p = &cases[i % cases.len()];
        let (x, w, b) = conv_data(p, 11, false);
        let mut y = vec![f32::NAN; p.output_len()];
        shared.conv2d(p, &x, &w, Some(&b), &mut y).unwrap();
        let same = y
            .iter()
            .zip(&expected[i % cases.len()])
            .all(|(a, e)| a.to_bits() == e.to_bits());
        assert!(same, "call {i} ({p}) differs from the one-thread result");
    };
    std::thread::scope(|s| {
        for t in 0..4 {
            s.spawn(move || (0..6).for_each(|i| call(t + i)));
        }
    });
    let other = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    other.install(|| (0..24).into_par_iter().for_each(call));
}
