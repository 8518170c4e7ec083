//! Winograd F(2×2, 3×3) on the CPU: the transforms around the GEMM that the backend runs on its
//! rows microkernel (see `crate::winograd` for the algorithm and its error bound; the GPU runs
//! the same three steps as three passes).
//!
//! The work is cut into tasks of whole rows of tiles of one image, each small enough that its
//! transformed input `V` and its GEMM output `M` stay in the core's L2 cache; a task runs all
//! three steps on one thread:
//! 1. [`input_transform`]: `V = Bᵀ d B` of every 4×4 input patch under the task's tiles, laid
//!    out `[ξ][c][t]` (`t` = tile within the task, rows of `row` floats);
//! 2. the 16 GEMMs `M_ξ = U_ξ V_ξ` (in `mod.rs`), with the transformed weights `U`
//!    ([`crate::winograd::transform_weights`], rounded once from f64) packed like the weights
//!    of [`crate::winograd::gemm_params`], a 1×1 convolution with 16 groups; the rows kernel
//!    stores `M` as it accumulates it, `[ξ][t][k]` (no transposed store);
//! 3. [`output_transform`]: `Y = Aᵀ M A + bias` of every tile, into the output rows.
//!
//! Multiplies per output fall from `9·c_in` to `4·c_in`; the transforms only add and subtract,
//! so layers with many channels gain most. (Compiling the transforms for AVX-512 was measured
//! here: the input transform got slower, 410 against 318 µs per call on l1 n1, so they stay
//! plain loops for the baseline target.)

#![forbid(unsafe_code)]

use crate::params::Conv2dParams;

/// Scratch floats [`input_transform`] and [`output_transform`] need for `p`.
pub fn scratch_len(p: &Conv2dParams) -> usize {
    let (_, tw) = crate::winograd::tiles(p);
    (18 * (tw + 2)).max(12 * p.c_out)
}

/// `V[ξ][c][(ty − ty0)·tw + tx]` (rows of `row` floats, `ξ·c_in + c`) for the tiles of rows
/// `ty0..ty1` of image `img`; `pad` is scratch of [`scratch_len`] floats.
///
/// Each input row is split once into its even and odd columns (zero outside the image), so that
/// every step below is a unit-stride loop over the tiles of a row; the two rows a row of tiles
/// shares with the next are kept, not split again.
pub fn input_transform(
    p: &Conv2dParams,
    x: &[f32],
    img: usize,
    (ty0, ty1): (usize, usize),
    v: &mut [f32],
    row: usize,
    pad: &mut [f32],
) {
    let (_, tw) = crate::winograd::tiles(p);
    let (ph, pw) = (p.padding.0 as isize, p.padding.1 as isize);
    let half = tw + 2;
    let plane_len = p.h * p.w;
    // Four split rows (even columns, then odd), four transformed ones, and one padded line.
    let (split, rest) = pad[..18 * half].split_at_mut(8 * half);
    let (cols, line) = rest.split_at_mut(8 * half);
    // The input rows the task reads in a plane (clamped to the image).
    let rows_read = {
        let y0 = (2 * ty0).saturating_sub(ph as usize).min(p.h);
        let y1 = (2 * ty1 + 2).saturating_sub(ph as usize).min(p.h);
        y0 * p.w..y1 * p.w
    };
    for c in 0..p.c_in {
        let plane = &x[(img * p.c_in + c) * plane_len..][..plane_len];
        // The next channel's rows, asked for while this one is transformed: planes are far
        // apart, so hardware prefetchers do not follow from one to the next (vgg: 99 -> 55 ms
        // of input transform per call, both threads together).
        if c + 1 < p.c_in {
            super::kernel::prefetch(&x[(img * p.c_in + c + 1) * plane_len..][rows_read.clone()]);
        }
        // Input row `iy` split into `dst` (even columns, then odd: columns 2j − pw, 2j + 1 − pw).
        let mut split_row = |iy: isize, dst: &mut [f32]| {
            let (e, o) = dst.split_at_mut(half);
            if !(0..p.h as isize).contains(&iy) {
                e.fill(0.0);
                o.fill(0.0);
                return;
            }
            let src = &plane[iy as usize * p.w..][..p.w];
            let at = pw as usize;
            let n = p.w.min(line.len() - at);
            line[..at].fill(0.0);
            line[at..at + n].copy_from_slice(&src[..n]);
            line[at + n..].fill(0.0);
            for ((e, o), pair) in e.iter_mut().zip(o.iter_mut()).zip(line.chunks_exact(2)) {
                *e = pair[0];
                *o = pair[1];
            }
        };
        for ty in ty0..ty1 {
            // Rows a = 0, 1 of this row of tiles are rows 2, 3 of the previous one.
            let first = ty == ty0;
            if !first {
                split.copy_within(4 * half..8 * half, 0);
            }
            for a in if first { 0..4 } else { 2..4 } {
                split_row(
                    (2 * ty + a) as isize - ph,
                    &mut split[2 * a * half..][..2 * half],
                );
            }
            // Bᵀ d along the patch's columns: rows (d0 − d2, d1 + d2, d2 − d1, d1 − d3), for the
            // even and the odd columns at once (rows of 2·half).
            {
                let d = |a: usize| &split[2 * a * half..][..2 * half];
                let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
                let (t0, t) = cols.split_at_mut(2 * half);
                let (t1, t) = t.split_at_mut(2 * half);
                let (t2, t3) = t.split_at_mut(2 * half);
                for j in 0..2 * half {
                    t0[j] = d0[j] - d2[j];
                    t1[j] = d1[j] + d2[j];
                    t2[j] = d2[j] - d1[j];
                    t3[j] = d1[j] - d3[j];
                }
            }
            // ...then B along its rows: ξ = 4i + j, from columns 2tx..2tx + 3 = e[tx], o[tx],
            // e[tx + 1], o[tx + 1].
            let t0 = (ty - ty0) * tw;
            for i in 0..4 {
                let (e, o) = cols[2 * i * half..][..2 * half].split_at(half);
                let at = ((4 * i) * p.c_in + c) * row + t0;
                let (v0, rest) = v[at..].split_at_mut(p.c_in * row);
                let (v1, rest) = rest.split_at_mut(p.c_in * row);
                let (v2, v3) = rest.split_at_mut(p.c_in * row);
                let (v0, v1, v2, v3) = (&mut v0[..tw], &mut v1[..tw], &mut v2[..tw], &mut v3[..tw]);
                for tx in 0..tw {
                    let (a, b, c2, d) = (e[tx], o[tx], e[tx + 1], o[tx + 1]);
                    v0[tx] = a - c2;
                    v1[tx] = b + c2;
                    v2[tx] = c2 - b;
                    v3[tx] = b - d;
                }
            }
        }
    }
}

/// `y = Aᵀ M A + bias` for the tiles of rows `ty0..ty1` of one image, where `m` is
/// `[ξ][t][k]` (`row` tiles of `c_out` filters per `ξ`) and `outs[k]` is output rows
/// `2·ty0..min(2·ty1, ho)` of filter `k`'s plane; `pad` is scratch of [`scratch_len`] floats.
/// Each step runs over the filters of one tile (unit stride); the four outputs of each filter
/// then go to its plane.
pub fn output_transform(
    p: &Conv2dParams,
    m: &[f32],
    row: usize,
    (ty0, ty1): (usize, usize),
    bias: Option<&[f32]>,
    outs: &mut [&mut [f32]],
    pad: &mut [f32],
) {
    let (_, tw) = crate::winograd::tiles(p);
    let (ho, wo) = p.out_hw();
    let ck = p.c_out;
    let (s, y) = pad[..12 * ck].split_at_mut(8 * ck);
    // The task's output rows of every plane, asked for before the first write: the writes go
    // to c_out planes at once, too many streams for hardware prefetchers (vgg: 80 -> 69 ms of
    // output transform per call, both threads together).
    for out in outs.iter() {
        super::kernel::prefetch(out);
    }
    for ty in ty0..ty1 {
        for tx in 0..tw {
            let t = (ty - ty0) * tw + tx;
            let mv = |xi: usize| &m[(xi * row + t) * ck..][..ck];
            // Aᵀ along the columns of M: s[2j + i] = row i of Aᵀ M, column j, per filter.
            for j in 0..4 {
                let (m0, m1, m2, m3) = (mv(j), mv(4 + j), mv(8 + j), mv(12 + j));
                let (s0, s1) = s[2 * j * ck..][..2 * ck].split_at_mut(ck);
                for k in 0..ck {
                    s0[k] = m0[k] + m1[k] + m2[k];
                    s1[k] = m1[k] - m2[k] - m3[k];
                }
            }
            // ...then A along its rows: y[2i + j] = output (i, j) of the tile, per filter.
            let col = |j: usize, i: usize| &s[(2 * j + i) * ck..][..ck];
            for i in 0..2 {
                let (c0, c1, c2, c3) = (col(0, i), col(1, i), col(2, i), col(3, i));
                let (y0, y1) = y[2 * i * ck..][..2 * ck].split_at_mut(ck);
                for k in 0..ck {
                    y0[k] = c0[k] + c1[k] + c2[k];
                    y1[k] = c1[k] - c2[k] - c3[k];
                }
            }
            // The tile's outputs inside the image, plus the bias, into each filter's plane.
            for i in 0..2 {
                let oy = 2 * ty + i;
                if oy >= ho {
                    break;
                }
                for j in 0..2 {
                    let ox = 2 * tx + j;
                    if ox >= wo {
                        break;
                    }
                    let at = (oy - 2 * ty0) * wo + ox;
                    let yk = &y[(2 * i + j) * ck..][..ck];
                    for (k, (out, &v)) in outs.iter_mut().zip(yk).enumerate() {
                        out[at] = v + bias.map_or(0.0, |b| b[k]);
                    }
                }
            }
        }
    }
}
