//! The Winograd F(2×2, 3×3) convolution: its transforms, where it applies, and its error bound.
//!
//! For 3×3 taps with stride 1 and no dilation, each 2×2 block of outputs ("tile") of one filter
//! is `Y = Aᵀ [Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B)] A`, where `d_c` is the 4×4 input patch under the
//! tile in channel `c` and `g_c` the filter's 3×3 taps there. That is 16 multiplies per tile
//! and channel instead of 36: the GPU runs it as three passes (`shaders/winograd_input.comp`,
//! a GEMM per transform position `ξ` done by `conv2d_tiled.comp` as a 1×1 convolution with 16
//! groups, `shaders/winograd_output.comp`). FLOPs are still counted as the direct convolution's
//! (BENCHMARKS.md), whatever runs.
//!
//! **The error bound.** Winograd is not a reordering of the direct sum: the transforms add and
//! subtract inputs (and weights) that the direct sum never pairs, so the direct policy's
//! magnitude `Σ|x·w|` does not bound its rounding error. Following the steps (the weight
//! transform in f64, rounded once; `Bᵀ d B`, two roundings; the product; the sum over the
//! `C = c_in` channels; `Aᵀ M A` and the bias, five roundings), the error of an output is at
//! most `γ_{C+9} · M_W` to first order, with the Winograd magnitude
//!
//! ```text
//! M_W = Σ_c Σ_ξ |Aᵀ|_{iξ₁} |Aᵀ|_{jξ₂} (|G| |g_c| |G|ᵀ)_ξ (|B|ᵀ |d_c| |B|)_ξ + |b|
//! ```
//!
//! for the output at position `(i, j)` of its tile: `(C + 16)·ε·M_W` would leave a factor-two
//! margin, like the direct policy's. `M_W` is never below `Σ|x·w| + |b|`, so
//! [`crate::tolerance::Tolerance::Winograd`], which accepts `(max(9C, C + 14) + 2)·ε·M_W`,
//! holds for both algorithms: a caller that does not know which one the GPU chose uses it.

#![forbid(unsafe_code)]

use crate::params::Conv2dParams;
use crate::reference::{OutIndex, RefValue};

/// `Bᵀ` (input transform).
pub const BT: [[f64; 4]; 4] = [
    [1.0, 0.0, -1.0, 0.0],
    [0.0, 1.0, 1.0, 0.0],
    [0.0, -1.0, 1.0, 0.0],
    [0.0, 1.0, 0.0, -1.0],
];
/// `G` (filter transform).
pub const G: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];
/// `Aᵀ` (output transform).
pub const AT: [[f64; 4]; 2] = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];

/// Transform positions: a 4×4 tile.
pub const XI: usize = 16;

/// Whether F(2×2, 3×3) computes `p`: 3×3 taps, stride 1, dilation 1, one group.
pub fn applies(p: &Conv2dParams) -> bool {
    (p.k_h, p.k_w) == (3, 3) && p.stride == (1, 1) && p.dilation == (1, 1) && p.groups == 1
}

/// Tiles per output column and per output row: `(⌈ho/2⌉, ⌈wo/2⌉)`.
pub fn tiles(p: &Conv2dParams) -> (usize, usize) {
    let (ho, wo) = p.out_hw();
    (ho.div_ceil(2), wo.div_ceil(2))
}

/// Tiles over the whole batch: the GEMM's positions.
pub fn positions(p: &Conv2dParams) -> usize {
    let (th, tw) = tiles(p);
    p.n * th * tw
}

/// The per-position GEMMs `M_ξ[k][t] = Σ_c U_ξ[k][c] V_ξ[c][t]` as one convolution: 1×1 taps,
/// 16 groups (one per `ξ`), one image of `1 × positions`. Its input is the transformed input
/// (`[ξ][c][t]`), its weights [`transform_weights`] (`[ξ][k][c]`), its output `[ξ][k][t]`.
pub fn gemm_params(p: &Conv2dParams) -> Conv2dParams {
    Conv2dParams::new(1, XI * p.c_in, 1, positions(p), XI * p.c_out, 1, 1).with_groups(XI)
}

/// `|G| |g| |G|ᵀ` or `G g Gᵀ` of one 3×3 filter plane (`abs` takes absolute values first).
fn filter_transform(g: &[f32], abs: bool) -> [[f64; 4]; 4] {
    let f = |v: f64| if abs { v.abs() } else { v };
    let mut u = [[0.0; 4]; 4];
    for (i, row) in u.iter_mut().enumerate() {
        for (j, out) in row.iter_mut().enumerate() {
            for r in 0..3 {
                for s in 0..3 {
                    *out += f(G[i][r]) * f(f64::from(g[r * 3 + s])) * f(G[j][s]);
                }
            }
        }
    }
    u
}

/// The weights of [`gemm_params`]: `U_ξ[k][c] = (G g_{k,c} Gᵀ)_ξ`, in f64 rounded once, laid
/// out `[ξ][k][c]` (its filters are `ξ·c_out + k`). `w` is `c_out × c_in × 3 × 3`.
pub fn transform_weights(p: &Conv2dParams, w: &[f32]) -> Vec<f32> {
    let (k_count, c_count) = (p.c_out, p.c_in);
    let mut out = vec![0.0f32; XI * k_count * c_count];
    for k in 0..k_count {
        for c in 0..c_count {
            let at = (k * c_count + c) * 9;
            let u = filter_transform(&w[at..at + 9], false);
            for xi in 0..XI {
                out[(xi * k_count + k) * c_count + c] = u[xi / 4][xi % 4] as f32;
            }
        }
    }
    out
}

/// The 4×4 input patch of channel `c` of image `n` under tile `(ty, tx)`, zero outside.
fn patch(p: &Conv2dParams, x: &[f32], n: usize, c: usize, ty: usize, tx: usize) -> [[f64; 4]; 4] {
    let mut d = [[0.0; 4]; 4];
    for (a, row) in d.iter_mut().enumerate() {
        for (b, v) in row.iter_mut().enumerate() {
            let iy = (2 * ty + a) as i64 - p.padding.0 as i64;
            let ix = (2 * tx + b) as i64 - p.padding.1 as i64;
            if (0..p.h as i64).contains(&iy) && (0..p.w as i64).contains(&ix) {
                *v = f64::from(x[((n * p.c_in + c) * p.h + iy as usize) * p.w + ix as usize]);
            }
        }
    }
    d
}

/// `|B|ᵀ |d| |B|` or `Bᵀ d B`.
fn input_transform(d: &[[f64; 4]; 4], abs: bool) -> [[f64; 4]; 4] {
    let f = |v: f64| if abs { v.abs() } else { v };
    let mut v = [[0.0; 4]; 4];
    for (i, row) in v.iter_mut().enumerate() {
        for (j, out) in row.iter_mut().enumerate() {
            for (a, d_row) in d.iter().enumerate() {
                for (b, &dv) in d_row.iter().enumerate() {
                    *out += f(BT[i][a]) * f(dv) * f(BT[j][b]);
                }
            }
        }
    }
    v
}

/// The Winograd magnitude `M_W` of one output (see the module docs), with the reference value.
/// The caller has checked the buffers and that [`applies`] holds.
pub fn output_at(
    p: &Conv2dParams,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    at: OutIndex,
) -> RefValue {
    let direct = crate::reference::output_at(p, x, w, bias, at);
    let (i, j) = (at.y % 2, at.x % 2);
    let mut magnitude = bias.map_or(0.0, |b| f64::from(b[at.k]).abs());
    for c in 0..p.c_in {
        let wo = (at.k * p.c_in + c) * 9;
        let u = filter_transform(&w[wo..wo + 9], true);
        let v = input_transform(&patch(p, x, at.n, c, at.y / 2, at.x / 2), true);
        for (a, (u_row, v_row)) in u.iter().zip(&v).enumerate() {
            for (b, (&uv, &vv)) in u_row.iter().zip(v_row).enumerate() {
                magnitude += AT[i][a].abs() * AT[j][b].abs() * uv * vv;
            }
        }
    }
    RefValue {
        value: direct.value,
        magnitude,
    }
}

/// The whole reference output with Winograd magnitudes, for
/// [`crate::tolerance::Tolerance::Winograd`]. Errors where [`applies`] does not hold.
pub fn reference(
    p: &Conv2dParams,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
) -> crate::Result<crate::reference::RefOutput> {
    check_applies(p)?;
    crate::reference::whole(p, (x, w, bias), |at| output_at(p, x, w, bias, at))
}

/// [`applies`] as a result: an error that names `p` where it does not hold.
pub fn check_applies(p: &Conv2dParams) -> crate::Result<()> {
    if applies(p) {
        Ok(())
    } else {
        Err(crate::Error::InvalidParams(format!(
            "Winograd F(2x2, 3x3) does not apply to {p}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tolerance::{compare_points, Tolerance};

    /// The algorithm in f32 the way the GPU runs it (transforms, GEMM, output transform):
    /// checks the matrices and layouts without a GPU.
    fn conv2d_f32(p: &Conv2dParams, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let (th, tw) = tiles(p);
        let (ho, wo) = p.out_hw();
        let npos = positions(p);
        let u = transform_weights(p, w);
        let mut v = vec![0.0f32; XI * p.c_in * npos];
        for n in 0..p.n {
            for c in 0..p.c_in {
                for t in 0..th * tw {
                    let d = patch(p, x, n, c, t / tw, t % tw);
                    let tv = input_transform(&d, false);
                    for xi in 0..XI {
                        v[(xi * p.c_in + c) * npos + n * th * tw + t] = tv[xi / 4][xi % 4] as f32;
                    }
                }
            }
        }
        let mut y = vec![0.0f32; p.output_len()];
        for k in 0..p.c_out {
            for t in 0..npos {
                let mut m = [[0.0f32; 4]; 4];
                for (xi, mv) in m.iter_mut().flatten().enumerate() {
                    for c in 0..p.c_in {
                        *mv += u[(xi * p.c_out + k) * p.c_in + c] * v[(xi * p.c_in + c) * npos + t];
                    }
                }
                let (n, ty, tx) = (t / (th * tw), t % (th * tw) / tw, t % tw);
                for (i, at_row) in AT.iter().enumerate() {
                    for (j, at_col) in AT.iter().enumerate() {
                        let (oy, ox) = (2 * ty + i, 2 * tx + j);
                        if oy < ho && ox < wo {
                            let mut s = bias.map_or(0.0, |b| b[k]);
                            for a in 0..4 {
                                for b in 0..4 {
                                    s += (at_row[a] * at_col[b]) as f32 * m[a][b];
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

    fn check(p: &Conv2dParams, seed: u64, bias: bool) -> crate::tolerance::ErrorStats {
        assert!(applies(p));
        let (x, w, b) = crate::data::conv_data(p, seed, false);
        let b = bias.then_some(&b[..]);
        let y = conv2d_f32(p, &x, &w, b);
        let points = (0..y.len()).map(|i| {
            let at = OutIndex::from_flat(p, i);
            (at, y[i], output_at(p, &x, &w, b, at))
        });
        compare_points(p, points, Tolerance::Winograd).unwrap_or_else(|m| panic!("{p}: {m}"))
    }

    #[test]
    fn emulated_winograd_matches_the_reference() {
        // Odd and even output sizes, padding 0, 1 and 2, several images and channels.
        check(&Conv2dParams::new(1, 1, 4, 4, 1, 3, 3), 1, false);
        check(
            &Conv2dParams::new(2, 3, 7, 6, 5, 3, 3).with_padding(1, 1),
            2,
            true,
        );
        check(
            &Conv2dParams::new(1, 8, 9, 5, 4, 3, 3).with_padding(2, 0),
            3,
            true,
        );
        let stats = check(
            &Conv2dParams::new(1, 64, 6, 6, 2, 3, 3).with_padding(1, 1),
            4,
            false,
        );
        // Rounding uses a small part of the bound.
        assert!(stats.max_ratio < 0.1, "{stats:?}");
    }

    #[test]
    fn a_wrong_transform_fails_the_bound() {
        let p = Conv2dParams::new(1, 16, 8, 8, 4, 3, 3).with_padding(1, 1);
        let (x, w, _) = crate::data::conv_data(&p, 9, false);
        let mut y = conv2d_f32(&p, &x, &w, None);
        // One output off by one product of its window.
        let at = OutIndex {
            n: 0,
            k: 1,
            y: 3,
            x: 4,
        };
        y[at.flat(&p)] += x[(2 * 8 + 3) * 8 + 4] * w[(16 + 2) * 9 + 4];
        let points = [(at, y[at.flat(&p)], output_at(&p, &x, &w, None, at))];
        assert!(compare_points(&p, points, Tolerance::Winograd).is_err());
    }

    /// `M_W` lies between the direct magnitude and a bound from the transforms' absolute row
    /// sums: per output, 9 transform positions with a nonzero `|Aᵀ| ⊗ |Aᵀ|` coefficient (at most
    /// 1), each at most `1.5² · max|g|` (`|G|` rows sum to 1.5 at most) times `2² · max|d|`
    /// (`|B|ᵀ` rows sum to 2), per channel: `M_W ≤ 81 · C · max|w| · max|x| + |b|`.
    #[test]
    fn the_winograd_magnitude_lies_between_the_direct_one_and_its_bound() {
        let p = Conv2dParams::new(1, 4, 6, 6, 3, 3, 3).with_padding(1, 1);
        let (x, w, b) = crate::data::conv_data(&p, 5, false);
        let max = |v: &[f32]| v.iter().fold(0.0f64, |m, &e| m.max(f64::from(e).abs()));
        let (max_x, max_w) = (max(&x), max(&w));
        for i in 0..p.output_len() {
            let at = OutIndex::from_flat(&p, i);
            let direct = crate::reference::output_at(&p, &x, &w, Some(&b), at);
            let wino = output_at(&p, &x, &w, Some(&b), at);
            assert_eq!(direct.value, wino.value);
            assert!(wino.magnitude >= direct.magnitude * (1.0 - 1e-12), "{at}");
            let bound = 81.0 * p.c_in as f64 * max_w * max_x + f64::from(b[at.k]).abs();
            assert!(
                wino.magnitude <= bound,
                "{at}: {} > {bound}",
                wino.magnitude
            );
        }
    }

    /// Each filter's magnitude comes from its own weights: with every weight of filter k equal
    /// to k + 1 (and the same input), `M_W` scales exactly with k + 1.
    #[test]
    fn the_winograd_magnitude_uses_each_filters_own_weights() {
        let p = Conv2dParams::new(1, 2, 4, 4, 3, 3, 3);
        let x = vec![1.0f32; p.input_len()];
        let w: Vec<f32> = (0..p.weights_len()).map(|i| (i / 18 + 1) as f32).collect();
        for i in 0..p.output_len() {
            let at = OutIndex::from_flat(&p, i);
            let first = output_at(&p, &x, &w, None, OutIndex { k: 0, ..at }).magnitude;
            let m = output_at(&p, &x, &w, None, at).magnitude;
            assert!(first > 0.0);
            assert_eq!(m, first * (at.k + 1) as f64, "{at}");
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
        let g = gemm_params(&p.with_padding(1, 1));
        assert_eq!((g.c_in, g.c_out, g.w, g.groups), (64, 64, 16, 16));
    }
}
