//! Winograd F(m×m, 3×3) convolution: its transforms, where it applies, and its error bound.
//!
//! For 3×3 taps with stride 1 and no dilation, each `m×m` block of outputs ("tile") of one
//! filter is `Y = Aᵀ [Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B)] A`, where `d_c` is the `α×α` input patch
//! (`α = m + 2`) under the tile in channel `c` and `g_c` the filter's 3×3 taps there. Two
//! variants ([`Variant`]):
//! - **F(2×2, 3×3)**: 16 multiplies per tile and channel instead of 36 (4/9). The GPU runs it
//!   as three passes (`shaders/winograd_input.comp`, a GEMM per transform position `ξ` done by
//!   `conv2d_tiled.comp` as a 1×1 convolution with 16 groups, `shaders/winograd_output.comp`);
//!   the CPU runs it in `cpu/winograd.rs`. Its transforms are exact on small integers.
//! - **F(4×4, 3×3)** (Lavin and Gray's, points 0, ±1, ±2): 36 multiplies per tile of 16
//!   outputs instead of 144 (1/4); CPU only. `G` holds 1/6 and 1/24, so it is never exact.
//!
//! FLOPs are still counted as the direct convolution's (BENCHMARKS.md), whatever runs.
//!
//! **The error bound.** Winograd is not a reordering of the direct sum: the transforms add and
//! subtract inputs (and weights) that the direct sum never pairs, so the direct policy's
//! magnitude `Σ|x·w|` does not bound its rounding error. Following the steps (the weight
//! transform in f64, rounded once; `Bᵀ d B`, at most two roundings per pass for F(2×2) and
//! three for F(4×4), counting a product by 5; the product; the sum over the `C = c_in`
//! channels; `Aᵀ M A`, two or three roundings per pass, and the bias), the error of an output is
//! at most `γ_{C+14} · M_W` to first order for either variant, with the Winograd magnitude
//!
//! ```text
//! M_W = Σ_c Σ_ξ |Aᵀ|_{iξ₁} |Aᵀ|_{jξ₂} (|G| |g_c| |G|ᵀ)_ξ (|B|ᵀ |d_c| |B|)_ξ + |b|
//! ```
//!
//! for the output at position `(i, j)` of its tile, with the variant's matrices:
//! `(C + 14)·ε·M_W` leaves a factor-two margin (`γ_k ≈ k·ε/2`), like the direct policy's.
//! `M_W` is never below `Σ|x·w| + |b|`, so [`crate::tolerance::Tolerance::Winograd`], which
//! accepts `(max(9C, C + 14) + 2)·ε·M_W`, holds for both algorithms: a caller that does not
//! know which one the GPU chose uses it. F(4×4)'s `M_W` is larger than F(2×2)'s (its `Bᵀ` rows
//! sum to 10, its `Aᵀ` rows to 18): [`crate::tolerance::Tolerance::WinogradF4`] takes the
//! larger of the two magnitudes, so that it too accepts whatever the others accept.

#![forbid(unsafe_code)]

use crate::params::Conv2dParams;
use crate::reference::{OutIndex, RefValue};

/// `Bᵀ` of F(2×2, 3×3) (input transform).
const BT2: [[f64; 4]; 4] = [
    [1.0, 0.0, -1.0, 0.0],
    [0.0, 1.0, 1.0, 0.0],
    [0.0, -1.0, 1.0, 0.0],
    [0.0, 1.0, 0.0, -1.0],
];
/// `G` of F(2×2, 3×3) (filter transform).
const G2: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];
/// `Aᵀ` of F(2×2, 3×3) (output transform).
const AT2: [[f64; 4]; 2] = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];

/// `Bᵀ` of F(4×4, 3×3).
const BT4: [[f64; 6]; 6] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];
/// `G` of F(4×4, 3×3).
const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];
/// `Aᵀ` of F(4×4, 3×3).
const AT4: [[f64; 6]; 4] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
    [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
    [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
];

/// Largest patch side `α` of any variant.
const MAX_ALPHA: usize = 6;
/// An `α×α` array of the largest variant (smaller ones use its top-left corner).
type Square = [[f64; MAX_ALPHA]; MAX_ALPHA];

/// Which Winograd algorithm: the side of its output tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// F(2×2, 3×3): 2×2 outputs from 4×4 patches, 16 transform positions.
    F2x2,
    /// F(4×4, 3×3): 4×4 outputs from 6×6 patches, 36 transform positions.
    F4x4,
}

impl Variant {
    /// Every variant.
    pub const ALL: [Variant; 2] = [Variant::F2x2, Variant::F4x4];

    /// Outputs per tile side, `m`.
    pub fn m(self) -> usize {
        match self {
            Variant::F2x2 => 2,
            Variant::F4x4 => 4,
        }
    }

    /// Patch side, `α = m + 2`.
    pub fn alpha(self) -> usize {
        self.m() + 2
    }

    /// Transform positions `ξ` (GEMMs), `α²`.
    pub fn xi(self) -> usize {
        self.alpha() * self.alpha()
    }

    /// The name in messages: `F(2x2, 3x3)`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::F2x2 => "F(2x2, 3x3)",
            Variant::F4x4 => "F(4x4, 3x3)",
        }
    }

    /// `Bᵀ[i][a]`.
    pub fn bt(self, i: usize, a: usize) -> f64 {
        match self {
            Variant::F2x2 => BT2[i][a],
            Variant::F4x4 => BT4[i][a],
        }
    }

    /// `G[i][r]`.
    pub fn g(self, i: usize, r: usize) -> f64 {
        match self {
            Variant::F2x2 => G2[i][r],
            Variant::F4x4 => G4[i][r],
        }
    }

    /// `Aᵀ[i][a]`.
    pub fn at(self, i: usize, a: usize) -> f64 {
        match self {
            Variant::F2x2 => AT2[i][a],
            Variant::F4x4 => AT4[i][a],
        }
    }
}

/// Whether Winograd F(m×m, 3×3) computes `p`: 3×3 taps, stride 1, dilation 1, one group.
pub fn applies(p: &Conv2dParams) -> bool {
    (p.k_h, p.k_w) == (3, 3) && p.stride == (1, 1) && p.dilation == (1, 1) && p.groups == 1
}

/// Tiles per output column and per output row: `(⌈ho/m⌉, ⌈wo/m⌉)`.
pub fn tiles(p: &Conv2dParams, v: Variant) -> (usize, usize) {
    let (ho, wo) = p.out_hw();
    (ho.div_ceil(v.m()), wo.div_ceil(v.m()))
}

/// Tiles over the whole batch: the GEMM's positions.
pub fn positions(p: &Conv2dParams, v: Variant) -> usize {
    let (th, tw) = tiles(p, v);
    p.n * th * tw
}

/// The per-position GEMMs `M_ξ[k][t] = Σ_c U_ξ[k][c] V_ξ[c][t]` as one convolution: 1×1 taps,
/// one group per `ξ`, one image of `1 × positions`. Its input is the transformed input
/// (`[ξ][c][t]`), its weights [`transform_weights`] (`[ξ][k][c]`), its output `[ξ][k][t]`.
pub fn gemm_params(p: &Conv2dParams, v: Variant) -> Conv2dParams {
    let xi = v.xi();
    Conv2dParams::new(1, xi * p.c_in, 1, positions(p, v), xi * p.c_out, 1, 1).with_groups(xi)
}

/// `|G| |g| |G|ᵀ` or `G g Gᵀ` of one 3×3 filter plane (`abs` takes absolute values first), in
/// the top-left `α×α` corner.
fn filter_transform(v: Variant, g: &[f32], abs: bool) -> Square {
    let f = |x: f64| if abs { x.abs() } else { x };
    let alpha = v.alpha();
    // G g, then (G g) Gᵀ.
    let mut gg = [[0.0; 3]; MAX_ALPHA];
    for (i, row) in gg.iter_mut().enumerate().take(alpha) {
        for (s, out) in row.iter_mut().enumerate() {
            *out = (0..3)
                .map(|r| f(v.g(i, r)) * f(f64::from(g[r * 3 + s])))
                .sum();
        }
    }
    let mut u = [[0.0; MAX_ALPHA]; MAX_ALPHA];
    for (u_row, gg_row) in u.iter_mut().zip(&gg).take(alpha) {
        for (j, out) in u_row.iter_mut().enumerate().take(alpha) {
            *out = (0..3).map(|s| gg_row[s] * f(v.g(j, s))).sum();
        }
    }
    u
}

/// The weights of [`gemm_params`]: `U_ξ[k][c] = (G g_{k,c} Gᵀ)_ξ`, in f64 rounded once, laid
/// out `[ξ][k][c]` (its filters are `ξ·c_out + k`). `w` is `c_out × c_in × 3 × 3`.
pub fn transform_weights(p: &Conv2dParams, w: &[f32], v: Variant) -> Vec<f32> {
    let (k_count, c_count, alpha) = (p.c_out, p.c_in, v.alpha());
    let mut out = vec![0.0f32; v.xi() * k_count * c_count];
    for k in 0..k_count {
        for c in 0..c_count {
            let at = (k * c_count + c) * 9;
            let u = filter_transform(v, &w[at..at + 9], false);
            for xi in 0..v.xi() {
                out[(xi * k_count + k) * c_count + c] = u[xi / alpha][xi % alpha] as f32;
            }
        }
    }
    out
}

/// The `α×α` input patch of channel `c` of image `n` under tile `(ty, tx)`, zero outside.
fn patch(
    p: &Conv2dParams,
    v: Variant,
    x: &[f32],
    n: usize,
    c: usize,
    (ty, tx): (usize, usize),
) -> Square {
    let mut d = [[0.0; MAX_ALPHA]; MAX_ALPHA];
    for (a, row) in d.iter_mut().enumerate().take(v.alpha()) {
        for (b, out) in row.iter_mut().enumerate().take(v.alpha()) {
            let iy = (v.m() * ty + a) as i64 - p.padding.0 as i64;
            let ix = (v.m() * tx + b) as i64 - p.padding.1 as i64;
            if (0..p.h as i64).contains(&iy) && (0..p.w as i64).contains(&ix) {
                *out = f64::from(x[((n * p.c_in + c) * p.h + iy as usize) * p.w + ix as usize]);
            }
        }
    }
    d
}

/// `|B|ᵀ |d| |B|` or `Bᵀ d B`.
fn input_transform(v: Variant, d: &Square, abs: bool) -> Square {
    let f = |x: f64| if abs { x.abs() } else { x };
    let alpha = v.alpha();
    // Bᵀ d, then (Bᵀ d) B.
    let mut bd = [[0.0; MAX_ALPHA]; MAX_ALPHA];
    for (i, row) in bd.iter_mut().enumerate().take(alpha) {
        for (b, out) in row.iter_mut().enumerate().take(alpha) {
            *out = (0..alpha).map(|a| f(v.bt(i, a)) * f(d[a][b])).sum();
        }
    }
    let mut out = [[0.0; MAX_ALPHA]; MAX_ALPHA];
    for (out_row, bd_row) in out.iter_mut().zip(&bd).take(alpha) {
        for (j, out) in out_row.iter_mut().enumerate().take(alpha) {
            *out = (0..alpha).map(|b| bd_row[b] * f(v.bt(j, b))).sum();
        }
    }
    out
}

/// The Winograd magnitude `M_W` of one output for variant `v` (see the module docs).
fn magnitude(
    p: &Conv2dParams,
    v: Variant,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    at: OutIndex,
) -> f64 {
    let (m, alpha) = (v.m(), v.alpha());
    let (i, j) = (at.y % m, at.x % m);
    let mut magnitude = bias.map_or(0.0, |b| f64::from(b[at.k]).abs());
    for c in 0..p.c_in {
        let wo = (at.k * p.c_in + c) * 9;
        let u = filter_transform(v, &w[wo..wo + 9], true);
        let d = input_transform(v, &patch(p, v, x, at.n, c, (at.y / m, at.x / m)), true);
        for a in 0..alpha {
            for b in 0..alpha {
                magnitude += v.at(i, a).abs() * v.at(j, b).abs() * u[a][b] * d[a][b];
            }
        }
    }
    magnitude
}

/// The reference value of one output with the largest Winograd magnitude `M_W` of the
/// `variants` that may have computed it (see the module docs). The caller has checked the
/// buffers and that [`applies`] holds.
pub fn output_at(
    p: &Conv2dParams,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    at: OutIndex,
    variants: &[Variant],
) -> RefValue {
    let direct = crate::reference::output_at(p, x, w, bias, at);
    let magnitude = variants
        .iter()
        .map(|&v| magnitude(p, v, x, w, bias, at))
        .fold(0.0, f64::max);
    RefValue {
        value: direct.value,
        magnitude,
    }
}

/// The whole reference output with Winograd magnitudes of `variants`, for
/// [`crate::tolerance::Tolerance::Winograd`] and
/// [`WinogradF4`](crate::tolerance::Tolerance::WinogradF4). Errors where [`applies`] does not
/// hold.
pub fn reference(
    p: &Conv2dParams,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    variants: &[Variant],
) -> crate::Result<crate::reference::RefOutput> {
    check_applies(p)?;
    crate::reference::whole(p, (x, w, bias), |at| output_at(p, x, w, bias, at, variants))
}

/// [`applies`] as a result: an error that names `p` where it does not hold.
pub fn check_applies(p: &Conv2dParams) -> crate::Result<()> {
    if applies(p) {
        Ok(())
    } else {
        Err(crate::Error::InvalidParams(format!(
            "Winograd needs 3x3 taps, stride 1, dilation 1 and one group: it does not apply to {p}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tolerance::{compare_points, Tolerance};

    /// The tolerance that checks variant `v`'s results.
    fn tolerance(v: Variant) -> Tolerance {
        match v {
            Variant::F2x2 => Tolerance::Winograd,
            Variant::F4x4 => Tolerance::WinogradF4,
        }
    }

    /// The algorithm in f32 the way the GPU runs it (transforms, GEMM, output transform), with
    /// the f64 transforms rounded to f32: checks the matrices and layouts without a GPU.
    fn conv2d_f32(
        p: &Conv2dParams,
        v: Variant,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let (th, tw) = tiles(p, v);
        let (ho, wo) = p.out_hw();
        let (m_side, alpha, xis) = (v.m(), v.alpha(), v.xi());
        let npos = positions(p, v);
        let u = transform_weights(p, w, v);
        let mut tv = vec![0.0f32; xis * p.c_in * npos];
        for n in 0..p.n {
            for c in 0..p.c_in {
                for t in 0..th * tw {
                    let d = patch(p, v, x, n, c, (t / tw, t % tw));
                    let dv = input_transform(v, &d, false);
                    for xi in 0..xis {
                        tv[(xi * p.c_in + c) * npos + n * th * tw + t] =
                            dv[xi / alpha][xi % alpha] as f32;
                    }
                }
            }
        }
        let mut y = vec![0.0f32; p.output_len()];
        for k in 0..p.c_out {
            for t in 0..npos {
                let mut m = vec![0.0f32; xis];
                for (xi, mv) in m.iter_mut().enumerate() {
                    for c in 0..p.c_in {
                        *mv +=
                            u[(xi * p.c_out + k) * p.c_in + c] * tv[(xi * p.c_in + c) * npos + t];
                    }
                }
                let (n, ty, tx) = (t / (th * tw), t % (th * tw) / tw, t % tw);
                for i in 0..m_side {
                    for j in 0..m_side {
                        let (oy, ox) = (m_side * ty + i, m_side * tx + j);
                        if oy < ho && ox < wo {
                            let mut s = bias.map_or(0.0, |b| b[k]);
                            for a in 0..alpha {
                                for b in 0..alpha {
                                    s += (v.at(i, a) * v.at(j, b)) as f32 * m[a * alpha + b];
                                }
                            }
                            y[((n * p.c_out + k) * ho + oy) * wo + ox] = s;
                        }
                    }
                }
            }
        }
        y
    }

    fn check(p: &Conv2dParams, v: Variant, seed: u64, bias: bool) -> crate::tolerance::ErrorStats {
        assert!(applies(p));
        let (x, w, b) = crate::data::conv_data(p, seed, false);
        let b = bias.then_some(&b[..]);
        let y = conv2d_f32(p, v, &x, &w, b);
        let points = (0..y.len()).map(|i| {
            let at = OutIndex::from_flat(p, i);
            (at, y[i], output_at(p, &x, &w, b, at, &[v]))
        });
        compare_points(p, points, tolerance(v)).unwrap_or_else(|m| panic!("{p}: {m}"))
    }

    #[test]
    fn emulated_winograd_matches_the_reference() {
        for v in Variant::ALL {
            // Odd and even output sizes (ragged tiles), padding 0, 1 and 2, several images and
            // channels.
            check(&Conv2dParams::new(1, 1, 4, 4, 1, 3, 3), v, 1, false);
            check(&Conv2dParams::new(1, 1, 6, 6, 1, 3, 3), v, 1, false);
            check(
                &Conv2dParams::new(2, 3, 7, 6, 5, 3, 3).with_padding(1, 1),
                v,
                2,
                true,
            );
            check(
                &Conv2dParams::new(1, 8, 9, 5, 4, 3, 3).with_padding(2, 0),
                v,
                3,
                true,
            );
            let stats = check(
                &Conv2dParams::new(1, 64, 10, 10, 2, 3, 3).with_padding(1, 1),
                v,
                4,
                false,
            );
            // Rounding uses a small part of the bound.
            assert!(stats.max_ratio < 0.1, "{v:?}: {stats:?}");
        }
    }

    /// The matrices are the algorithm's: on one tile, with random data, every variant's
    /// transforms in f64 give the direct convolution to f64 rounding (a wrong coefficient in
    /// any of `Bᵀ`, `G`, `Aᵀ` is off by far more).
    #[test]
    fn each_variant_is_the_convolution_in_f64() {
        for v in Variant::ALL {
            let a = v.alpha();
            let p = Conv2dParams::new(1, 1, a, a, 1, 3, 3);
            let (x, w, _) = crate::data::conv_data(&p, 11, false);
            let u = filter_transform(v, &w, false);
            let d = input_transform(v, &patch(&p, v, &x, 0, 0, (0, 0)), false);
            for i in 0..v.m() {
                for j in 0..v.m() {
                    let mut y = 0.0;
                    for xa in 0..a {
                        for xb in 0..a {
                            y += v.at(i, xa) * v.at(j, xb) * u[xa][xb] * d[xa][xb];
                        }
                    }
                    let at = OutIndex {
                        n: 0,
                        k: 0,
                        y: i,
                        x: j,
                    };
                    let direct = crate::reference::output_at(&p, &x, &w, None, at).value;
                    assert!(
                        (y - direct).abs() < 1e-12,
                        "{v:?} {at}: {y} against {direct}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_wrong_transform_fails_the_bound() {
        let p = Conv2dParams::new(1, 16, 8, 8, 4, 3, 3).with_padding(1, 1);
        let (x, w, _) = crate::data::conv_data(&p, 9, false);
        for v in Variant::ALL {
            let mut y = conv2d_f32(&p, v, &x, &w, None);
            // One output off by one product of its window.
            let at = OutIndex {
                n: 0,
                k: 1,
                y: 3,
                x: 4,
            };
            y[at.flat(&p)] += x[(2 * 8 + 3) * 8 + 4] * w[(16 + 2) * 9 + 4];
            let points = [(at, y[at.flat(&p)], output_at(&p, &x, &w, None, at, &[v]))];
            assert!(compare_points(&p, points, tolerance(v)).is_err(), "{v:?}");
        }
    }

    /// `M_W` lies between the direct magnitude and a bound from the transforms' absolute row
    /// sums: per output, each transform position `(a, b)` adds at most
    /// `|Aᵀ|_{ia} |Aᵀ|_{jb} · (row sums of |G|)_a (…)_b · max|g| · (row sums of |Bᵀ|)_a (…)_b ·
    /// max|d|` per channel (for F(2×2) that is `64 · C · max|w| · max|x| + |b|`).
    #[test]
    fn the_winograd_magnitude_lies_between_the_direct_one_and_its_bound() {
        let p = Conv2dParams::new(1, 4, 9, 9, 3, 3, 3).with_padding(1, 1);
        let (x, w, b) = crate::data::conv_data(&p, 5, false);
        let max = |v: &[f32]| v.iter().fold(0.0f64, |m, &e| m.max(f64::from(e).abs()));
        let (max_x, max_w) = (max(&x), max(&w));
        for v in Variant::ALL {
            let a = v.alpha();
            let g_sum = |i: usize| (0..3).map(|r| v.g(i, r).abs()).sum::<f64>();
            let b_sum = |i: usize| (0..a).map(|r| v.bt(i, r).abs()).sum::<f64>();
            let per = |i: usize| {
                (0..a)
                    .map(|r| v.at(i, r).abs() * g_sum(r) * b_sum(r))
                    .sum::<f64>()
            };
            let worst = (0..v.m()).map(per).fold(0.0, f64::max);
            if v == Variant::F2x2 {
                assert_eq!(worst, 8.0);
            }
            for i in 0..p.output_len() {
                let at = OutIndex::from_flat(&p, i);
                let direct = crate::reference::output_at(&p, &x, &w, Some(&b), at);
                let wino = output_at(&p, &x, &w, Some(&b), at, &[v]);
                assert_eq!(direct.value, wino.value);
                assert!(wino.magnitude >= direct.magnitude * (1.0 - 1e-12), "{at}");
                let bound =
                    worst * worst * p.c_in as f64 * max_w * max_x + f64::from(b[at.k]).abs();
                assert!(
                    wino.magnitude <= bound,
                    "{v:?} {at}: {} > {bound}",
                    wino.magnitude
                );
                // Both variants together: the larger magnitude.
                let both = output_at(&p, &x, &w, Some(&b), at, &Variant::ALL).magnitude;
                assert!(both >= wino.magnitude);
            }
        }
    }

    /// Each filter's magnitude comes from its own weights: with every weight of filter k equal
    /// to k + 1 (and the same input), `M_W` scales exactly with k + 1.
    #[test]
    fn the_winograd_magnitude_uses_each_filters_own_weights() {
        let p = Conv2dParams::new(1, 2, 6, 6, 3, 3, 3);
        let x = vec![1.0f32; p.input_len()];
        let w: Vec<f32> = (0..p.weights_len()).map(|i| (i / 18 + 1) as f32).collect();
        for v in Variant::ALL {
            for i in 0..p.output_len() {
                let at = OutIndex::from_flat(&p, i);
                let first = output_at(&p, &x, &w, None, OutIndex { k: 0, ..at }, &[v]).magnitude;
                let m = output_at(&p, &x, &w, None, at, &[v]).magnitude;
                assert!(first > 0.0);
                assert_eq!(m, first * (at.k + 1) as f64, "{v:?} {at}");
            }
        }
    }

    #[test]
    fn applies_only_to_unit_stride_3x3() {
        let p = Conv2dParams::new(1, 4, 8, 8, 4, 3, 3);
        assert!(applies(&p));
        assert!(!applies(&p.with_stride(2, 2)));
        assert!(!applies(&p.with_dilation(2, 1)));
        assert!(!applies(&p.with_groups(2)));
        assert!(!applies(&Conv2dParams::new(1, 4, 8, 8, 4, 1, 1)));
        let g = gemm_params(&p.with_padding(1, 1), Variant::F2x2);
        assert_eq!((g.c_in, g.c_out, g.w, g.groups), (64, 64, 16, 16));
        let g = gemm_params(&p.with_padding(1, 1), Variant::F4x4);
        assert_eq!((g.c_in, g.c_out, g.w, g.groups), (144, 144, 4, 36));
    }
}
