//! The tolerance policy: how far a device's fp32 result may be from the f64 reference.
//!
//! **The bound.** Any evaluation of a sum of `K` products in fp32, in any order, with or without
//! fused multiply-adds, errs by at most `γ_K · Σ|x·w|` where `γ_K = K·u / (1 − K·u)` and
//! `u = ε/2` is the unit round-off (Higham, *Accuracy and Stability of Numerical Algorithms*,
//! §3.1). Adding the bias and rounding the result once more adds a few `u`. sporkle therefore
//! accepts
//!
//! ```text
//! |got − ref| ≤ (K + 2) · ε_f32 · (Σ|x·w| + |b|)        with K = (c_in / groups) · k_h · k_w
//! ```
//!
//! which is the worst case with a factor-two margin: a correct kernel can never fail it, whatever
//! its summation order. It is still tight enough to catch real bugs: a wrong tap, a shifted
//! window or a missing channel changes an output by the size of one product, `≈ Σ|x·w| / K`,
//! which is `K²·ε` times larger than the bound (for `K ≤ 4096`, over ten thousand times).
//!
//! **Exact mode.** With small-integer data (see [`crate::data::fill_small_ints`]) every product
//! and partial sum is an integer below 2²⁴, so every order of evaluation gives the same float:
//! results must be bit-identical to the reference.
//!
//! Non-finite values: a NaN or infinity where the reference is finite is always a mismatch.

#![forbid(unsafe_code)]

use crate::params::Conv2dParams;
use crate::reference::{OutIndex, RefOutput, RefValue};

/// Machine epsilon of f32 (2⁻²³).
pub const EPS_F32: f64 = f32::EPSILON as f64;

/// How a result is compared with the reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tolerance {
    /// Bit-identical to the reference rounded to f32 (small-integer data only).
    Exact,
    /// Within `(K + 2)·ε·(Σ|x·w| + |b|)` of the reference (see the module docs).
    Fp32,
    /// Within `(max(K, C + 14) + 2)·ε·M_W` of the reference, `C = c_in / groups` and `M_W` the
    /// Winograd magnitude (see [`crate::winograd`]), which the reference value must carry as
    /// its magnitude: for outputs that Winograd F(2×2, 3×3) may have computed, whose rounding
    /// the direct magnitude does not bound. Since `M_W ≥ Σ|x·w| + |b|`, it accepts whatever
    /// the direct policy accepts, so it also holds where a device chose the direct algorithm.
    Winograd,
    /// [`Winograd`](Self::Winograd)'s bound with the larger of the F(2×2, 3×3) and F(4×4, 3×3)
    /// magnitudes (see [`crate::winograd`]): for outputs that the CPU's F(4×4) may have
    /// computed. It accepts whatever `Winograd` accepts.
    #[serde(rename = "winograd-f4x4")]
    WinogradF4,
}

impl Tolerance {
    /// The tolerance for a result of `p` from a backend's own choice of algorithm: Winograd's
    /// where the CPU ([`crate::cpu::CpuPath::for_params`]) or the GPU
    /// ([`crate::gpu::Algorithm::for_params`]) may run Winograd on `p` (it holds for the direct
    /// sum too), the direct bound everywhere else.
    pub fn for_params(p: &Conv2dParams) -> Self {
        let cpu = crate::cpu::CpuPath::for_params(p).tolerance();
        let gpu = crate::gpu::Algorithm::for_params(p).tolerance();
        // The looser of the two: each accepts whatever the ones before it in this list accept.
        [Tolerance::WinogradF4, Tolerance::Winograd, Tolerance::Fp32]
            .into_iter()
            .find(|&t| t == cpu || t == gpu)
            .unwrap_or(Tolerance::Fp32)
    }

    /// The Winograd variants whose magnitude the reference carries for this tolerance (none:
    /// the direct magnitude).
    pub fn winograd_variants(self) -> &'static [crate::winograd::Variant] {
        use crate::winograd::Variant;
        match self {
            Tolerance::Exact | Tolerance::Fp32 => &[],
            Tolerance::Winograd => &[Variant::F2x2],
            Tolerance::WinogradF4 => &Variant::ALL,
        }
    }

    /// The allowed absolute error for one output of a convolution with parameters `p`.
    pub fn bound(self, p: &Conv2dParams, r: RefValue) -> f64 {
        match self {
            Tolerance::Exact => 0.0,
            Tolerance::Fp32 => (p.reduction_len() as f64 + 2.0) * EPS_F32 * r.magnitude,
            Tolerance::Winograd | Tolerance::WinogradF4 => {
                let k = p.reduction_len().max(p.c_in_per_group() + 14);
                (k as f64 + 2.0) * EPS_F32 * r.magnitude
            }
        }
    }

    /// Whether `got` is acceptable for the reference value `r`.
    pub fn accepts(self, p: &Conv2dParams, got: f32, r: RefValue) -> bool {
        match self {
            Tolerance::Exact => got.to_bits() == (r.value as f32).to_bits(),
            Tolerance::Fp32 | Tolerance::Winograd | Tolerance::WinogradF4 => {
                got.is_finite() && (f64::from(got) - r.value).abs() <= self.bound(p, r)
            }
        }
    }
}

/// Summary of a comparison: the worst errors seen (over all outputs).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ErrorStats {
    /// Outputs compared.
    pub checked: usize,
    /// Largest `|got − ref|`.
    pub max_abs: f64,
    /// Largest `|got − ref| / |ref|` (over outputs with `ref ≠ 0`).
    pub max_rel: f64,
    /// Largest `|got − ref| / bound`: below 1 everywhere means a pass.
    pub max_ratio: f64,
}

/// The first output outside tolerance, with everything needed to debug it.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    /// Where.
    pub at: OutIndex,
    /// What the device gave.
    pub got: f32,
    /// What the reference gives.
    pub expected: f64,
    /// The bound at that output.
    pub bound: f64,
    /// Errors over all outputs.
    pub stats: ErrorStats,
    /// How many outputs failed.
    pub failures: usize,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} outputs outside tolerance; first at {}: got {:e}, expected {:e} (bound {:e}); max abs error {:e}, max rel error {:e}",
            self.failures,
            self.stats.checked,
            self.at,
            self.got,
            self.expected,
            self.bound,
            self.stats.max_abs,
            self.stats.max_rel
        )
    }
}

/// Compares a whole output with the reference.
pub fn compare(
    p: &Conv2dParams,
    got: &[f32],
    reference: &RefOutput,
    tol: Tolerance,
) -> Result<ErrorStats, Box<Mismatch>> {
    assert_eq!(
        got.len(),
        reference.value.len(),
        "compare: output and reference lengths differ"
    );
    let points = (0..got.len()).map(|i| {
        (
            OutIndex::from_flat(p, i),
            got[i],
            RefValue {
                value: reference.value[i],
                magnitude: reference.magnitude[i],
            },
        )
    });
    compare_points(p, points, tol)
}

/// Compares selected outputs `(index, got, reference)` (used where the full reference is too slow).
pub fn compare_points(
    p: &Conv2dParams,
    points: impl IntoIterator<Item = (OutIndex, f32, RefValue)>,
    tol: Tolerance,
) -> Result<ErrorStats, Box<Mismatch>> {
    let mut stats = ErrorStats::default();
    let mut first: Option<Mismatch> = None;
    let mut failures = 0;
    for (at, got, r) in points {
        stats.checked += 1;
        let err = (f64::from(got) - r.value).abs();
        let err = if err.is_nan() { f64::INFINITY } else { err };
        stats.max_abs = stats.max_abs.max(err);
        if r.value != 0.0 {
            stats.max_rel = stats.max_rel.max(err / r.value.abs());
        }
        let bound = tol.bound(p, r);
        stats.max_ratio = stats.max_ratio.max(if bound > 0.0 {
            err / bound
        } else if err > 0.0 {
            f64::INFINITY
        } else {
            0.0
        });
        if !tol.accepts(p, got, r) {
            failures += 1;
            if first.is_none() {
                first = Some(Mismatch {
                    at,
                    got,
                    expected: r.value,
                    bound,
                    stats,
                    failures: 0,
                });
            }
        }
    }
    match first {
        None => Ok(stats),
        Some(m) => Err(Box::new(Mismatch {
            stats,
            failures,
            ..m
        })),
    }
}

/// The whole reference output with the magnitudes `tol` needs (Winograd's where it names them).
pub fn reference(
    p: &Conv2dParams,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    tol: Tolerance,
) -> crate::Result<RefOutput> {
    match tol.winograd_variants() {
        [] => crate::reference::conv2d_f64(p, x, w, bias),
        variants => crate::winograd::reference(p, x, w, bias, variants),
    }
}

/// Checks the corners and `count` seeded random outputs of `got` against the reference, for
/// outputs too large for the whole reference to be computed (benchmarks, perf trials), with
/// `tol` ([`Tolerance::Winograd`] and [`Tolerance::WinogradF4`] compute the Winograd
/// magnitudes themselves, and so need a shape Winograd applies to:
/// [`crate::winograd::applies`]).
pub fn check_sample(
    p: &Conv2dParams,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    got: &[f32],
    count: usize,
    tol: Tolerance,
) -> Result<ErrorStats, Box<Mismatch>> {
    check_points(p, x, w, bias, &read_sample(got, count), tol)
}

/// The outputs that [`check_sample`] checks, read out of `got` as `(flat index, value)`: the
/// first and last, and `count` seeded random ones. Reading them is cheap; checking them against
/// the reference ([`check_points`]) is not, so a caller that must give the output back quickly
/// (a streaming frame) reads now and checks later.
pub fn read_sample(got: &[f32], count: usize) -> Vec<(usize, f32)> {
    let mut rng = crate::data::SplitMix64::new(0xC0FFEE);
    let len = got.len();
    if len == 0 {
        return Vec::new();
    }
    [0, len - 1]
        .into_iter()
        .chain((0..count).map(|_| rng.below(len as u64) as usize))
        .map(|i| (i, got[i]))
        .collect()
}

/// Checks outputs read by [`read_sample`] against the reference (see [`check_sample`]).
pub fn check_points(
    p: &Conv2dParams,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    sample: &[(usize, f32)],
    tol: Tolerance,
) -> Result<ErrorStats, Box<Mismatch>> {
    let points = sample.iter().map(|&(i, got)| {
        let at = OutIndex::from_flat(p, i);
        let r = match tol.winograd_variants() {
            [] => crate::reference::output_at(p, x, w, bias, at),
            variants => crate::winograd::output_at(p, x, w, bias, at, variants),
        };
        (at, got, r)
    });
    compare_points(p, points, tol)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;

    #[test]
    fn rounding_passes_but_a_shifted_tap_fails() {
        let p = Conv2dParams::new(1, 8, 9, 9, 4, 3, 3).with_padding(1, 1);
        let mut x = vec![0.0; p.input_len()];
        let mut w = vec![0.0; p.weights_len()];
        crate::data::fill_uniform(1, &mut x);
        crate::data::fill_uniform(2, &mut w);
        let r = reference::conv2d_f64(&p, &x, &w, None).unwrap();
        // The reference rounded to f32 is within tolerance.
        let stats = compare(&p, &r.to_f32(), &r, Tolerance::Fp32).unwrap();
        assert!(stats.max_ratio < 0.01, "{stats:?}");
        // An output with one product dropped is not.
        let mut bad = r.to_f32();
        let i = OutIndex {
            n: 0,
            k: 2,
            y: 4,
            x: 5,
        };
        bad[i.flat(&p)] += (x[(4 * 9 + 4) * 9 + 5] * w[(2 * 8 + 4) * 9 + 4])
            .abs()
            .max(1e-3);
        let m = compare(&p, &bad, &r, Tolerance::Fp32).unwrap_err();
        assert_eq!(m.at, i);
        assert_eq!(m.failures, 1);
        assert!(m.to_string().contains("(n=0, k=2, y=4, x=5)"), "{m}");
        // NaN fails.
        let mut nan = r.to_f32();
        nan[0] = f32::NAN;
        assert!(compare(&p, &nan, &r, Tolerance::Fp32).is_err());
    }

    /// The statistics a comparison reports are the ratios they name: an error of half the
    /// bound reports half (a mutation sample found `err / bound` -> `err % bound` uncaught).
    #[test]
    fn error_stats_report_the_ratios_they_name() {
        let p = Conv2dParams::new(1, 8, 9, 9, 4, 3, 3).with_padding(1, 1);
        let r = RefValue {
            value: 0.5,
            magnitude: 1000.0,
        };
        let bound = Tolerance::Fp32.bound(&p, r);
        let got = (r.value + bound / 2.0) as f32;
        let err = f64::from(got) - r.value;
        let at = OutIndex {
            n: 0,
            k: 1,
            y: 2,
            x: 3,
        };
        let stats = compare_points(&p, [(at, got, r)], Tolerance::Fp32).unwrap();
        assert_eq!(stats.checked, 1);
        assert_eq!(stats.max_abs, err);
        assert_eq!(stats.max_rel, err / r.value);
        assert_eq!(stats.max_ratio, err / bound);
        assert!((stats.max_ratio - 0.5).abs() < 0.01, "{stats:?}");
    }

    /// The bounds are exactly the documented formulas: a loosened factor (the bound times 10,
    /// say) fails here, though no realistic kernel error would show it.
    #[test]
    fn bounds_are_pinned() {
        let eps = 1.0 / 8_388_608.0; // 2^-23
        let r = |magnitude: f64| RefValue {
            value: 0.5,
            magnitude,
        };
        // K = c_in / groups · k_h · k_w; the bound is (K + 2)·ε·magnitude.
        for (p, k) in [
            (Conv2dParams::new(1, 1, 1, 1, 1, 1, 1), 1.0),
            (Conv2dParams::new(1, 8, 5, 5, 4, 3, 3), 72.0),
            (Conv2dParams::new(1, 8, 5, 5, 4, 3, 3).with_groups(4), 18.0),
            (Conv2dParams::new(1, 512, 5, 5, 4, 3, 3), 4608.0),
        ] {
            assert_eq!(Tolerance::Fp32.bound(&p, r(1.0)), (k + 2.0) * eps, "{p}");
            assert_eq!(
                Tolerance::Fp32.bound(&p, r(3.0)),
                (k + 2.0) * eps * 3.0,
                "{p}"
            );
            assert_eq!(Tolerance::Exact.bound(&p, r(3.0)), 0.0);
        }
        // Winograd: (max(K, C + 14) + 2)·ε·M_W.
        let one = Conv2dParams::new(1, 1, 6, 6, 2, 3, 3);
        assert_eq!(Tolerance::Winograd.bound(&one, r(1.0)), 17.0 * eps);
        let wide = Conv2dParams::new(1, 64, 6, 6, 2, 3, 3);
        assert_eq!(Tolerance::Winograd.bound(&wide, r(2.0)), 578.0 * eps * 2.0);
        // F(4×4) has the same bound (its magnitude differs).
        assert_eq!(Tolerance::WinogradF4.bound(&one, r(1.0)), 17.0 * eps);
        assert_eq!(
            Tolerance::WinogradF4.bound(&wide, r(2.0)),
            578.0 * eps * 2.0
        );
        // At the bound accepted, one step past it refused.
        let p = Conv2dParams::new(1, 8, 5, 5, 4, 3, 3);
        let at = 0.5 + 74.0 * eps;
        assert!(Tolerance::Fp32.accepts(&p, 0.5, r(1.0)));
        assert!(!Tolerance::Fp32.accepts(&p, (at + 2.0 * eps) as f32, r(1.0)));
    }

    /// Every output moved by the smallest product in its window (data of magnitude 0.5 to 1,
    /// so no product hides below the rounding) fails the comparison, at that output alone.
    #[test]
    fn one_product_off_fails_at_every_output() {
        let p = Conv2dParams::new(1, 6, 7, 7, 5, 3, 3).with_padding(1, 1);
        let fill = |seed: u64, len: usize| -> Vec<f32> {
            let mut rng = crate::data::SplitMix64::new(seed);
            (0..len)
                .map(|_| {
                    let m = 0.5 + (rng.below(1 << 20) as f32) / (1 << 21) as f32;
                    if rng.below(2) == 0 {
                        m
                    } else {
                        -m
                    }
                })
                .collect()
        };
        let (x, w) = (fill(1, p.input_len()), fill(2, p.weights_len()));
        let r = reference::conv2d_f64(&p, &x, &w, None).unwrap();
        let good = r.to_f32();
        compare(&p, &good, &r, Tolerance::Fp32).unwrap();
        for i in 0..good.len() {
            let at = OutIndex::from_flat(&p, i);
            let mut smallest = f32::INFINITY;
            for c in 0..p.c_in {
                for kr in 0..3 {
                    for ks in 0..3 {
                        let (iy, ix) = (at.y + kr, at.x + ks);
                        if iy < 1 || ix < 1 || iy > p.h || ix > p.w {
                            continue; // padding: no product
                        }
                        let xv = x[(c * p.h + iy - 1) * p.w + ix - 1];
                        let wv = w[((at.k * p.c_in + c) * 3 + kr) * 3 + ks];
                        smallest = smallest.min((xv * wv).abs());
                    }
                }
            }
            let mut bad = good.clone();
            bad[i] += smallest;
            let m = compare(&p, &bad, &r, Tolerance::Fp32).unwrap_err();
            assert_eq!((m.at, m.failures), (at, 1), "output {i}");
        }
    }

    #[test]
    fn exact_mode_demands_identical_bits() {
        let p = Conv2dParams::new(1, 1, 1, 1, 1, 1, 1);
        let r = reference::conv2d_f64(&p, &[3.0], &[2.0], None).unwrap();
        assert!(compare(&p, &[6.0], &r, Tolerance::Exact).is_ok());
        assert!(compare(
            &p,
            &[f32::from_bits(6.0f32.to_bits() + 1)],
            &r,
            Tolerance::Exact
        )
        .is_err());
    }
}
