//! Winograd F(m×m, 3×3) on the CPU, m = 2 or 4: the transforms around the GEMM that the backend
//! runs on its rows microkernel (see `crate::winograd` for the algorithm, its matrices and its
//! error bound; the GPU runs F(2×2) as three passes).
//!
//! The work is cut into tasks of whole rows of tiles of one image, each small enough that its
//! transformed input `V` and its GEMM output `M` stay in the core's L2 cache; a task runs all
//! three steps on one thread:
//! 1. [`input_transform`]: `V = Bᵀ d B` of every `α×α` input patch under the task's tiles, laid
//!    out `[ξ][c][t]` (`t` = tile within the task, rows of `row` floats);
//! 2. the `α²` GEMMs `M_ξ = U_ξ V_ξ` ([`gemm`]), with the transformed weights `U`
//!    ([`crate::winograd::transform_weights`], rounded once from f64) packed like the weights
//!    of [`crate::winograd::gemm_params`], a 1×1 convolution with `α²` groups; the rows kernel
//!    stores `M` as it accumulates it, `[ξ][t][k]` (no transposed store);
//! 3. [`output_transform`]: `Y = Aᵀ M A + bias` of every tile, into the output rows.
//!
//! Both transforms are separable: one 1-D transform down the columns of a patch, then one along
//! its rows, each a unit-stride pass over many patches at once. The 1-D transforms (`Bt2`/`Bt4`,
//! `At2`/`At4`: the matrices of `crate::winograd` written out with shared terms; every result
//! is at most three roundings deep, as the error bound assumes) are written once, lane by lane,
//! and run by `kernel::transform_rows`: 16 lanes a step with a masked tail on AVX-512, the same
//! operations in the same order, so the same bits as one lane at a time. Multiplies per output
//! fall from `9·c_in` to `4·c_in` (F(2×2)) or `2.25·c_in` (F(4×4)); the transforms only add,
//! subtract and scale, so layers with many channels gain most. (The rows of a pass are short,
//! 14 to 60 floats on l1: auto-vectorised for AVX-512 they ran mostly in their scalar remainder
//! and lost, 410 against 318 µs of F(2×2) input transform per call on l1 n1; with the masked
//! tail they won, Ice Lake-SP, 2 threads, best of 3 interleaved rounds, GFLOP/s: l1 n1 265
//! against 246, l3 n1 290 against 220, l1 n32 308 against 217, l3 n32 367 against 356.)

#![forbid(unsafe_code)]

use super::kernel::{transform_rows, Lanes, Microkernel, RowTransform, RowsOut, TapOffsets, MR};
use super::{lock, CpuBackend};
use crate::error::Result;
use crate::params::Conv2dParams;
use crate::winograd::Variant;

/// One task of an image: tile rows `rows` and filters `filters`.
type TaskSpan = (std::ops::Range<usize>, std::ops::Range<usize>);

/// Where the threads are a whole number of times the images (one image of a small layer), the tasks
/// of one image, shared equally among its threads: each thread's run of `len / (threads / n)`
/// consecutive tasks costs the same, so that [`Team::spread`](super::team::Team::spread) can hand
/// each thread its own. Each share is `th / shares` whole rows cut into tasks of at most
/// `max_rows`, and, where the rows do not divide, a slice of the filters over the rows left over
/// (each such task transforms those rows' input itself: one row of l3 n1's seven). `None` elsewhere
/// (tasks of whole rows, taken from one queue), or where the filters do not split into whole
/// panels. (On two threads, l1 n1's 14 tile rows ran as 4+4+4+2 by work stealing, 1.70x from one
/// thread to two; as 3+4 and 3+4, one share a thread, 301 -> 404 GFLOP/s, 1.64 -> 1.86 of
/// onnxruntime, 7 interleaved rounds on Zen 4. l3 n1's 7 rows ran as 2+2+2+1, 1.73x.)
fn shares(
    n: usize,
    th: usize,
    c_out: usize,
    max_rows: usize,
    threads: usize,
) -> Option<Vec<TaskSpan>> {
    if threads == 1 || !threads.is_multiple_of(n) {
        return None;
    }
    let shares = threads / n;
    let (share, left) = (th / shares, th % shares);
    let part = c_out / shares;
    if share == 0 || (left > 0 && !(c_out.is_multiple_of(shares) && part.is_multiple_of(MR))) {
        return None;
    }
    let cuts = share.div_ceil(max_rows.max(1));
    let mut tasks = Vec::new();
    for s in 0..shares {
        // `cuts` tasks of near-equal whole rows...
        let row = |c: usize| s * share + c * share / cuts;
        tasks.extend((0..cuts).map(|c| (row(c)..row(c + 1), 0..c_out)));
        // ...and this share's filters over the rows left over.
        if left > 0 {
            tasks.push((shares * share..th, s * part..(s + 1) * part));
        }
    }
    Some(tasks)
}

/// A Winograd task takes whole rows of tiles adding up to about this many tiles: four calls of
/// the wide rows kernel per transform position and panel pair. Measured here (GFLOP/s, two
/// interleaved rounds of budgets that happened to give these sizes): vgg 477 with 28 tiles
/// against 500 with 56; l3 n32 480 with 14 against 536 with 49; l1 n1 and n32 370-386 with 56
/// against 346-369 with 196 and 252.
const WINOGRAD_TASK_POSITIONS: usize = 56;
/// ...while its transformed input and GEMM output take at most this many floats together
/// (2 MiB, a core's L2 cache), unless one row of tiles needs more.
const WINOGRAD_TASK_FLOATS: usize = 512 << 10;

/// One Winograd call: tasks of whole tile rows of one image, each running the input transform,
/// the `α²` GEMMs on the rows kernel (`weights` are the packed `U`) and the output transform
/// (with the bias) in its thread's scratch.
pub(super) fn run(
    cpu: &CpuBackend,
    p: &Conv2dParams,
    variant: Variant,
    (input, weights, bias): (&[f32], &[f32], Option<&[f32]>),
    output: &mut [f32],
    offsets: &mut TapOffsets,
) -> Result<()> {
    crate::winograd::check_applies(p)?;
    let (xi, m) = (variant.xi(), variant.m());
    let (th, tw) = crate::winograd::tiles(p, variant);
    let (ho, wo) = p.out_hw();
    // Tile rows per task: V and M within the budget, at least two tasks per thread, and the
    // tasks of a batch a whole number of rounds of the threads where the rows allow (one
    // short task would leave a thread idle at the end).
    let per_tile_row = xi * (p.c_in + p.c_out) * tw;
    let by_positions = WINOGRAD_TASK_POSITIONS.div_ceil(tw);
    let by_budget = (WINOGRAD_TASK_FLOATS / per_tile_row).max(1);
    let mut tasks_per_image = th.div_ceil(by_positions.min(by_budget).clamp(1, th));
    while p.n * tasks_per_image < 2 * cpu.threads() && tasks_per_image < th {
        tasks_per_image += 1;
    }
    let rounds = (p.n * tasks_per_image).next_multiple_of(cpu.threads());
    if rounds.is_multiple_of(p.n) && rounds / p.n <= th {
        tasks_per_image = rounds / p.n;
    }
    let tr = th.div_ceil(tasks_per_image);
    let shared = shares(p.n, th, p.c_out, by_positions.min(by_budget), cpu.threads());
    // Each thread's share costs the same where the rows were shared out, or where every task
    // has `tr` rows.
    let even = shared.is_some() || th.is_multiple_of(tr);
    let spans = shared.unwrap_or_else(|| {
        (0..th)
            .step_by(tr)
            .map(|y| (y..th.min(y + tr), 0..p.c_out))
            .collect()
    });
    let most = spans.iter().map(|(ys, _)| ys.len()).max().unwrap_or(1);
    let row = most * tw;
    let floats = xi * (p.c_in + p.c_out) * row + scratch_len(p, variant);
    cpu.grow_scratch(floats)?;
    offsets.fill((0..p.c_in).map(|c| c * row));
    // Output rows m·ty0..m·ty1 of every plane, one slice per (image, filter, row range); each
    // task takes its filters' slices of its rows.
    let mut bounds: Vec<usize> = spans
        .iter()
        .flat_map(|(ys, _)| [ys.start, ys.end])
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    let ranges = bounds.len() - 1;
    let mut grid: Vec<Option<&mut [f32]>> = Vec::with_capacity(p.n * p.c_out * ranges);
    for mut plane in output.chunks_mut(ho * wo) {
        for w in bounds.windows(2) {
            let rows = (m * w[1]).min(ho) - m * w[0];
            let (mine, rest) = std::mem::take(&mut plane).split_at_mut(rows * wo);
            grid.push(Some(mine));
            plane = rest;
        }
    }
    let mut tasks = Vec::with_capacity(p.n * spans.len());
    for img in 0..p.n {
        for (ys, ks) in &spans {
            let at = bounds
                .binary_search(&ys.start)
                .expect("a row range's start");
            let outs: Vec<&mut [f32]> = ks
                .clone()
                .map(|k| {
                    grid[(img * p.c_out + k) * ranges + at]
                        .take()
                        .expect("each output tile has one owner")
                })
                .collect();
            tasks.push((img, (ys.start, ys.end), ks.clone(), outs));
        }
    }
    let offsets = &*offsets;
    cpu.team.spread(
        tasks,
        even,
        || (),
        |(), slot, (img, tys, ks, mut outs)| {
            let mut scratch = lock(&cpu.scratch[slot]);
            let (v, rest) = scratch[..floats].split_at_mut(xi * p.c_in * row);
            let (m, pad) = rest.split_at_mut(xi * ks.len() * row);
            input_transform(p, variant, input, img, tys, v, row, pad);
            let positions = (tys.1 - tys.0) * tw;
            let bias = bias.map(|b| &b[ks.clone()]);
            gemm(
                cpu.kernel,
                p,
                xi,
                (positions, row),
                v,
                weights,
                offsets,
                ks,
                m,
            );
            output_transform(p, variant, m, row, tys, bias, &mut outs, pad);
        },
    );
    Ok(())
}

/// `M_ξ = U_ξ V_ξ` for `ξ < xi`, the filters `ks` (starting on a panel) and the first
/// `positions` of each row of `v` (`[ξ][c]`, rows of `row` floats) into `m`
/// (`[ξ][t][k − ks.start]`: each tile's filters contiguous, no transposed store), on the rows
/// kernel; `weights` are `U`, packed `[ξ][panel][c][16]`, and `offsets` are `c·row`.
#[allow(clippy::too_many_arguments)]
fn gemm(
    kernel: Microkernel,
    p: &Conv2dParams,
    xi_count: usize,
    (positions, row): (usize, usize),
    v: &[f32],
    weights: &[f32],
    offsets: &TapOffsets,
    ks: std::ops::Range<usize>,
    m: &mut [f32],
) {
    debug_assert!(ks.start.is_multiple_of(MR) && ks.end <= p.c_out);
    let per_call = kernel.rows_filters();
    let panels = p.c_out.div_ceil(MR);
    let ldm = ks.len();
    for xi in 0..xi_count {
        let group = &weights[xi * panels * p.c_in * MR..][..panels * p.c_in * MR];
        for pi in (ks.start / MR..ks.end.div_ceil(MR)).step_by(per_call / MR) {
            let filters = per_call.min(ks.end - pi * MR);
            let a = &group[pi * p.c_in * MR..][..filters.div_ceil(MR) * p.c_in * MR];
            // One call for all the positions: the kernel cuts them into chunks.
            let b = &v[xi * p.c_in * row..];
            let c = &mut m[xi * row * ldm + pi * MR - ks.start..];
            let out = RowsOut::ByPosition;
            kernel.run_rows(positions, a, offsets, b, c, ldm, filters, None, out);
        }
    }
}

/// Scratch floats [`input_transform`] and [`output_transform`] need for `p` with `v`.
pub fn scratch_len(p: &Conv2dParams, v: Variant) -> usize {
    let (_, tw) = crate::winograd::tiles(p, v);
    let (m, a) = (v.m(), v.alpha());
    ((2 * a + 1) * m * (tw + 1)).max((m * a + m * m) * p.c_out)
}

/// `V[ξ][c][(ty − ty0)·tw + tx]` (rows of `row` floats, `ξ·c_in + c`) for the tiles of rows
/// `ty0..ty1` of image `img`; `pad` is scratch of [`scratch_len`] floats.
#[allow(clippy::too_many_arguments)]
pub fn input_transform(
    p: &Conv2dParams,
    v: Variant,
    x: &[f32],
    img: usize,
    tys: (usize, usize),
    out: &mut [f32],
    row: usize,
    pad: &mut [f32],
) {
    let (_, tw) = crate::winograd::tiles(p, v);
    let at = (img, tw);
    match v {
        Variant::F2x2 => input_with::<2, 4>(p, x, at, tys, out, row, pad, bt2),
        Variant::F4x4 => input_with::<4, 6>(p, x, at, tys, out, row, pad, bt4),
    }
}

/// [`input_transform`] for `M×M` tiles of `A×A` patches (`tw` per row), with `bt` the 1-D `Bᵀ`.
///
/// Each input row is split once into its `M` column phases (column `M·j + k − pw` in phase `k`,
/// zero outside the image), so that patch columns `0..A` of tile `tx` are phase `0..M` at `tx`
/// and phases `0, 1` at `tx + 1`: every step is then a unit-stride loop over the tiles of a
/// row. The two rows a row of tiles shares with the next are kept, not split again.
#[allow(clippy::too_many_arguments)]
fn input_with<const M: usize, const A: usize>(
    p: &Conv2dParams,
    x: &[f32],
    (img, tw): (usize, usize),
    (ty0, ty1): (usize, usize),
    v: &mut [f32],
    row: usize,
    pad: &mut [f32],
    bt: fn([&[f32]; A], [&mut [f32]; A]),
) {
    let (ph, pw) = (p.padding.0 as isize, p.padding.1 as isize);
    let q = tw + 1;
    let line_len = M * q;
    let plane_len = p.h * p.w;
    // A split rows, A transformed ones, and one padded line.
    let (split, rest) = pad[..(2 * A + 1) * line_len].split_at_mut(A * line_len);
    let (cols, line) = rest.split_at_mut(A * line_len);
    // The input rows the task reads in a plane (clamped to the image).
    let rows_read = {
        let y0 = (M * ty0).saturating_sub(ph as usize).min(p.h);
        let y1 = (M * ty1 + A - M).saturating_sub(ph as usize).min(p.h);
        y0 * p.w..y1 * p.w
    };
    for c in 0..p.c_in {
        let plane = &x[(img * p.c_in + c) * plane_len..][..plane_len];
        // The next channel's rows, asked for while this one is transformed: planes are far
        // apart, so hardware prefetchers do not follow from one to the next (vgg, F(2×2):
        // 99 -> 55 ms of input transform per call, both threads together).
        if c + 1 < p.c_in {
            super::kernel::prefetch(&x[(img * p.c_in + c + 1) * plane_len..][rows_read.clone()]);
        }
        // Input row `iy` split into its M phases in `dst`.
        let mut split_row = |iy: isize, dst: &mut [f32]| {
            if !(0..p.h as isize).contains(&iy) {
                dst.fill(0.0);
                return;
            }
            let src = &plane[iy as usize * p.w..][..p.w];
            let at = pw as usize;
            let n = p.w.min(line.len() - at);
            line[..at].fill(0.0);
            line[at..at + n].copy_from_slice(&src[..n]);
            line[at + n..].fill(0.0);
            let mut rows = dst.chunks_exact_mut(q);
            super::planes::deinterleave::<M>(
                line,
                std::array::from_fn(|_| rows.next().expect("M rows of q floats")),
            );
        };
        for ty in ty0..ty1 {
            // Rows 0, 1 of this row of tiles are rows M, M + 1 of the previous one.
            let first = ty == ty0;
            if !first {
                split.copy_within(M * line_len..A * line_len, 0);
            }
            for a in if first { 0..A } else { A - M..A } {
                split_row(
                    (M * ty + a) as isize - ph,
                    &mut split[a * line_len..][..line_len],
                );
            }
            // Bᵀ d down the patch's columns, every phase at once (rows of line_len)...
            {
                let mut d = split.chunks_exact(line_len);
                let mut t = cols.chunks_exact_mut(line_len);
                bt(
                    std::array::from_fn(|_| d.next().expect("A rows")),
                    std::array::from_fn(|_| t.next().expect("A rows")),
                );
            }
            // ...then B along its rows: ξ = A·i + j.
            let t0 = (ty - ty0) * tw;
            for i in 0..A {
                let phases = &cols[i * line_len..][..line_len];
                let d: [&[f32]; A] = std::array::from_fn(|b| {
                    let (k, shift) = (b % M, b / M);
                    &phases[k * q + shift..][..tw]
                });
                let mut rows = v[((A * i) * p.c_in + c) * row + t0..].chunks_mut(p.c_in * row);
                bt(
                    d,
                    std::array::from_fn(|_| &mut rows.next().expect("A rows")[..tw]),
                );
            }
        }
    }
}

/// `y = Aᵀ M A + bias` for the tiles of rows `ty0..ty1` of one image and some filters, where
/// `m` is `[ξ][t][k]` (`row` tiles of `outs.len()` filters per `ξ`), `outs[k]` is output rows
/// `M·ty0..min(M·ty1, ho)` of the `k`-th filter's plane and `bias` holds those filters' biases;
/// `pad` is scratch of [`scratch_len`] floats.
#[allow(clippy::too_many_arguments)]
pub fn output_transform(
    p: &Conv2dParams,
    v: Variant,
    m: &[f32],
    row: usize,
    tys: (usize, usize),
    bias: Option<&[f32]>,
    outs: &mut [&mut [f32]],
    pad: &mut [f32],
) {
    let (_, tw) = crate::winograd::tiles(p, v);
    let m = (m, row, tw);
    match v {
        Variant::F2x2 => output_with::<2, 4>(p, m, tys, bias, outs, pad, at2),
        Variant::F4x4 => output_with::<4, 6>(p, m, tys, bias, outs, pad, at4),
    }
}

/// [`output_transform`] for `M×M` tiles of `A×A` patches (`m` with its row length and `tw` tiles
/// per row), with `at` the 1-D `Aᵀ`. Each step runs over the filters of one tile (unit stride);
/// each filter's outputs then go to its plane. (That scatter into `c_out` planes is a quarter of
/// l1 n1's time; transposing 16 filters at a time through a small array lost 7-11% on the
/// F(2×2) shapes, so only whole F(4×4) tiles are transposed, in registers.)
#[allow(clippy::too_many_arguments)]
fn output_with<const M: usize, const A: usize>(
    p: &Conv2dParams,
    (m, row, tw): (&[f32], usize, usize),
    (ty0, ty1): (usize, usize),
    bias: Option<&[f32]>,
    outs: &mut [&mut [f32]],
    pad: &mut [f32],
    at: fn([&[f32]; A], [&mut [f32]; M]),
) {
    let (ho, wo) = p.out_hw();
    // The task's filters: `outs` and `bias` hold theirs, and `m` is laid out for them.
    let ck = outs.len();
    let (s, y) = pad[..(M * A + M * M) * ck].split_at_mut(M * A * ck);
    // The task's output rows of every plane, asked for before the first write: the writes go
    // to c_out planes at once, too many streams for hardware prefetchers (vgg, F(2×2): 80 ->
    // 69 ms of output transform per call, both threads together).
    for out in outs.iter() {
        super::kernel::prefetch(out);
    }
    for ty in ty0..ty1 {
        for tx in 0..tw {
            let t = (ty - ty0) * tw + tx;
            // Aᵀ down the columns of M: s[A·i + j] = row i of Aᵀ M, column j, per filter...
            for j in 0..A {
                let mut rows = s.chunks_exact_mut(ck).skip(j).step_by(A);
                at(
                    std::array::from_fn(|a| &m[((A * a + j) * row + t) * ck..][..ck]),
                    std::array::from_fn(|_| rows.next().expect("M rows")),
                );
            }
            // ...then A along its rows: y[M·i + j] = output (i, j) of the tile, per filter.
            for i in 0..M {
                let mut rows = y[M * i * ck..].chunks_exact_mut(ck);
                at(
                    std::array::from_fn(|b| &s[(A * i + b) * ck..][..ck]),
                    std::array::from_fn(|_| rows.next().expect("M rows")),
                );
            }
            // The tile's outputs inside the image, plus the bias, into each filter's plane
            // (up to M consecutive outputs per row).
            let rows = M.min(ho - M * ty);
            let cols = M.min(wo - M * tx);
            if M == 4 && rows == 4 && cols == 4 {
                // Whole 4×4 tiles: sixteen filters at a time, transposed in registers.
                let at = (M * (ty - ty0)) * wo + M * tx;
                for (k0, outs) in (0..ck).step_by(16).zip(outs.chunks_mut(16)) {
                    let mut b = [0.0f32; 16];
                    if let Some(bias) = bias {
                        b[..outs.len()].copy_from_slice(&bias[k0..k0 + outs.len()]);
                    }
                    super::kernel::store_tiles4x4(&y[k0..], ck, &b, outs, (at, wo));
                }
                continue;
            }
            for (k, out) in outs.iter_mut().enumerate() {
                let b = bias.map_or(0.0, |b| b[k]);
                for i in 0..rows {
                    let at = (M * (ty - ty0) + i) * wo + M * tx;
                    for (j, o) in out[at..at + cols].iter_mut().enumerate() {
                        *o = y[(M * i + j) * ck + k] + b;
                    }
                }
            }
        }
    }
}

/// `Bᵀ` of F(2×2, 3×3) over rows `d` into rows `v` (all of one length).
fn bt2(d: [&[f32]; 4], v: [&mut [f32]; 4]) {
    transform_rows::<Bt2, 4, 4>(d, v);
}

/// `Bᵀ` of F(4×4, 3×3) over rows `d` into rows `v`.
fn bt4(d: [&[f32]; 6], v: [&mut [f32]; 6]) {
    transform_rows::<Bt4, 6, 6>(d, v);
}

/// `Aᵀ` of F(2×2, 3×3) over rows `m` into rows `y`.
fn at2(m: [&[f32]; 4], y: [&mut [f32]; 2]) {
    transform_rows::<At2, 4, 2>(m, y);
}

/// `Aᵀ` of F(4×4, 3×3) over rows `m` into rows `y`.
fn at4(m: [&[f32]; 6], y: [&mut [f32]; 4]) {
    transform_rows::<At4, 6, 4>(m, y);
}

/// `Bᵀ` of F(2×2, 3×3), one lane.
struct Bt2;

impl RowTransform<4, 4> for Bt2 {
    #[inline(always)]
    fn apply<T: Lanes>([d0, d1, d2, d3]: [T; 4]) -> [T; 4] {
        [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
    }
}

/// `Bᵀ` of F(4×4, 3×3), one lane, with shared terms (each result at most three roundings
/// deep).
struct Bt4;

impl RowTransform<6, 6> for Bt4 {
    #[inline(always)]
    fn apply<T: Lanes>([d0, d1, d2, d3, d4, d5]: [T; 6]) -> [T; 6] {
        let (a, b, c) = (d4 - d2, d3 - d1, d1 + d2);
        [
            (d4 - d2 * 5.0) + d0 * 4.0,
            (d3 + d4) - c * 4.0,
            (d4 - d3) + (d1 - d2) * 4.0,
            a + b * 2.0,
            a - b * 2.0,
            (d5 - d3 * 5.0) + d1 * 4.0,
        ]
    }
}

/// `Aᵀ` of F(2×2, 3×3), one lane.
struct At2;

impl RowTransform<4, 2> for At2 {
    #[inline(always)]
    fn apply<T: Lanes>([m0, m1, m2, m3]: [T; 4]) -> [T; 2] {
        [m0 + m1 + m2, m1 - m2 - m3]
    }
}

/// `Aᵀ` of F(4×4, 3×3), one lane, with shared terms (each result at most three roundings
/// deep).
struct At4;

impl RowTransform<6, 4> for At4 {
    #[inline(always)]
    fn apply<T: Lanes>([m0, m1, m2, m3, m4, m5]: [T; 6]) -> [T; 4] {
        let (a, b) = (m1 + m2, m1 - m2);
        let (c, d) = (m3 + m4, m3 - m4);
        [(m0 + a) + c, b + d * 2.0, a + c * 4.0, (b + d * 8.0) + m5]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transforms as run (16 lanes a step with a masked tail, where the CPU has AVX-512)
    /// give the bits of the same formula on one scalar lane, for every length around the
    /// vector width, and write nothing past a row's end.
    #[test]
    fn the_row_transforms_give_the_scalar_bits() {
        fn check<F: RowTransform<I, O>, const I: usize, const O: usize>() {
            for n in 0..=40 {
                let rows: Vec<Vec<f32>> = (0..I)
                    .map(|i| {
                        let mut r = vec![0.0; n];
                        crate::data::fill_uniform(100 + i as u64, &mut r);
                        r
                    })
                    .collect();
                let mut out = vec![vec![f32::NAN; n + 3]; O];
                {
                    let mut o = out.iter_mut().map(|r| &mut r[..n]);
                    transform_rows::<F, I, O>(
                        std::array::from_fn(|i| &rows[i][..]),
                        std::array::from_fn(|_| o.next().unwrap()),
                    );
                }
                for j in 0..n {
                    let want = F::apply::<f32>(std::array::from_fn(|i| rows[i][j]));
                    for (o, w) in out.iter().zip(want) {
                        assert_eq!(o[j].to_bits(), w.to_bits(), "length {n}, lane {j}");
                    }
                }
                assert!(
                    out.iter().all(|r| r[n..].iter().all(|x| x.is_nan())),
                    "length {n}"
                );
            }
        }
        check::<Bt2, 4, 4>();
        check::<Bt4, 6, 6>();
        check::<At2, 4, 2>();
        check::<At4, 6, 4>();
    }

    /// The written-out 1-D transforms are the matrices of `crate::winograd`: each row of the
    /// result is the matrix row applied to the inputs (integers, so every order is exact).
    #[test]
    fn the_written_out_transforms_are_the_matrices() {
        for v in Variant::ALL {
            let a = v.alpha();
            let inputs: Vec<Vec<f32>> = (0..a)
                .map(|r| {
                    (0..5)
                        .map(|j| ((r * 7 + j * 3) % 11) as f32 - 5.0)
                        .collect()
                })
                .collect();
            let d: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
            let mut bt_out = vec![vec![0.0f32; 5]; a];
            let mut at_out = vec![vec![0.0f32; 5]; v.m()];
            {
                let mut b = bt_out.iter_mut().map(Vec::as_mut_slice);
                let mut o = at_out.iter_mut().map(Vec::as_mut_slice);
                match v {
                    Variant::F2x2 => {
                        bt2(
                            std::array::from_fn(|i| d[i]),
                            std::array::from_fn(|_| b.next().unwrap()),
                        );
                        at2(
                            std::array::from_fn(|i| d[i]),
                            std::array::from_fn(|_| o.next().unwrap()),
                        );
                    }
                    Variant::F4x4 => {
                        bt4(
                            std::array::from_fn(|i| d[i]),
                            std::array::from_fn(|_| b.next().unwrap()),
                        );
                        at4(
                            std::array::from_fn(|i| d[i]),
                            std::array::from_fn(|_| o.next().unwrap()),
                        );
                    }
                }
            }
            for j in 0..5 {
                for (i, got) in bt_out.iter().enumerate() {
                    let want: f64 = (0..a).map(|r| v.bt(i, r) * f64::from(d[r][j])).sum();
                    assert_eq!(f64::from(got[j]), want, "{v:?} Bᵀ row {i}");
                }
                for (i, got) in at_out.iter().enumerate() {
                    let want: f64 = (0..a).map(|r| v.at(i, r) * f64::from(d[r][j])).sum();
                    assert_eq!(f64::from(got[j]), want, "{v:?} Aᵀ row {i}");
                }
            }
        }
    }

    /// One image's tasks shared equally among the threads: whole rows, each share cut into
    /// tasks of at most `max_rows`, and the rows left over split by filters; every (row,
    /// filter) in exactly one task; no sharing where the threads are not a whole number of times
    /// the images or the filters do not split into panels.
    #[test]
    fn tile_rows_share_equally_among_the_threads() {
        assert_eq!(
            shares(1, 14, 64, 4, 2),
            Some(vec![
                (0..3, 0..64),
                (3..7, 0..64),
                (7..10, 0..64),
                (10..14, 0..64)
            ])
        );
        assert_eq!(
            shares(1, 7, 256, 8, 2),
            Some(vec![
                (0..3, 0..256),
                (6..7, 0..128),
                (3..6, 0..256),
                (6..7, 128..256)
            ])
        );
        assert_eq!(shares(1, 7, 40, 8, 2), None, "20 filters: not whole panels");
        assert_eq!(shares(1, 14, 64, 4, 16), None, "more threads than rows");
        assert_eq!(shares(32, 7, 64, 8, 2), None, "more images than threads");
        assert_eq!(shares(1, 14, 64, 4, 1), None, "one thread");
        let cases = [
            (1, 56, 64, 8, 2),
            (1, 31, 96, 4, 3),
            (2, 9, 64, 2, 4),
            (1, 5, 256, 2, 4),
        ];
        for (n, th, c_out, max_rows, threads) in cases {
            let tasks = shares(n, th, c_out, max_rows, threads).expect("shares");
            let mut owner = vec![0u32; th * c_out];
            for (ys, ks) in &tasks {
                assert!(ys.len() <= max_rows && ks.start % MR == 0, "{tasks:?}");
                for y in ys.clone() {
                    ks.clone().for_each(|k| owner[y * c_out + k] += 1);
                }
            }
            assert!(owner.iter().all(|&o| o == 1), "{tasks:?}");
            let per = tasks.len() / (threads / n);
            let work: Vec<usize> = (tasks.chunks(per))
                .map(|run| run.iter().map(|(ys, ks)| ys.len() * ks.len()).sum())
                .collect();
            assert!(work.iter().all(|&w| w == work[0]), "{work:?}: {tasks:?}");
        }
    }
}
