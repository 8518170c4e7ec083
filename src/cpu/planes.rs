//! Phase planes: the input rearranged so that a convolution becomes an implicit GEMM in which
//! every kernel tap is one constant offset, and no im2col matrix is ever built.
//!
//! Rows of the zero-padded input are laid out with a pitch of `wv ≥ w + max(pl, pr)` columns
//! (`pl`, `pr`: the left and right padding): `pl` zeros, the `w` values, zeros up to `wv`.
//! Consecutive rows *share* their padding: a read that runs past the end of a row (the right
//! padding) lands in the trailing zeros and then the next row's leading zeros, so a row costs
//! `w + max(pl, pr)` columns instead of `w + pl + pr`. Each channel is then split by stride phase
//! into planes of `hq × wq` (`hq = ⌈(h + pt + pb)/sh⌉`, `wq = wv/sw`), one for each phase
//! `(py, px)` that some tap reads (`py = (r·dh) % sh`, `px = (s·dw) % sw`: at most `sh·sw`, and at
//! most `k_h·k_w`, so a stride far larger than the kernel costs no memory for the rows and columns
//! no window reads), each followed by one
//! guard row of zeros (the spill of a plane's last row must not reach the next plane, whose
//! first column may hold data):
//! `plane[c][phase(py, px)][yy][xx] = padded[c][yy·sh + py][xx·sw + px]`.
//! The outputs are computed on a grid of `ho` rows of `wq` positions (`q = y·wq + x`; columns
//! `x ≥ wo` are junk and never stored). Output `(y, x)` reads, for tap `(c, r, s)`,
//! `padded[c][y·sh + r·dh][x·sw + s·dw] = plane[c][phase((r·dh) % sh, (s·dw) % sw)][y + r·dh/sh][x + s·dw/sw]`,
//! which is `planes[q + off(c, r, s)]`: 16 consecutive outputs read 16 consecutive floats.
//! A stride-1 layer has one phase, and a 1×1 layer's planes are its input.
//!
//! The copy costs one pass over the input; the price is `wq − wo` junk columns per row
//! (about `(k_w − 1)·dw − pr`: one column for a 3×3 "same" layer, none for a 1×1).

#![forbid(unsafe_code)]

use super::team::Team;
use crate::params::Conv2dParams;

use super::kernel::{TapOffsets, NR};

/// Floats of one phase plane: `hq` rows and a guard row of zeros, `wq` columns each.
fn plane_len(hq: usize, wq: usize) -> usize {
    (hq + 1).saturating_mul(wq)
}

/// The sizes and strides of the phase planes for one convolution.
#[derive(Clone, Debug)]
pub struct Geometry {
    /// Output rows.
    pub ho: usize,
    /// Output columns.
    pub wo: usize,
    /// Rows of one phase plane (without its guard row).
    pub hq: usize,
    /// Columns of one phase plane, and the row pitch of the output grid.
    pub wq: usize,
    /// Floats per channel: one plane of `(hq + 1)·wq` (with its guard row) per phase.
    pub chan_stride: usize,
    /// The row phases some tap reads, ascending (`(r·dh) % sh`).
    phases_h: Vec<usize>,
    /// The column phases some tap reads, ascending (`(s·dw) % sw`).
    phases_w: Vec<usize>,
    /// Floats per image: `c_in · chan_stride`.
    pub image_stride: usize,
    /// Zeros kept after the last image, so that junk lanes of the last strip stay in bounds.
    pub slack: usize,
}

impl Geometry {
    /// For a pointwise layer (1×1, stride 1, no padding) the input itself can serve as the
    /// planes, with no copy: `h` rows of `w` per channel, no junk columns, no guard row. Only
    /// the rows kernel may read it, because it reads nothing past a row's valid positions.
    pub fn pointwise(p: &Conv2dParams) -> Option<Self> {
        let is_pointwise = (p.k_h, p.k_w, p.stride, p.pads()) == (1, 1, (1, 1), [0; 4]);
        is_pointwise.then(|| Self {
            ho: p.h,
            wo: p.w,
            hq: p.h,
            wq: p.w,
            chan_stride: p.h * p.w,
            phases_h: vec![0],
            phases_w: vec![0],
            image_stride: p.c_in * p.h * p.w,
            slack: 0,
        })
    }

    /// The geometry of a validated convolution.
    pub fn new(p: &Conv2dParams) -> Self {
        let (ho, wo) = p.out_hw();
        let (sh, sw) = p.stride;
        let [pt, pl, pb, pr] = p.pads();
        let hq = (p.h + pt + pb).div_ceil(sh);
        // Row pitch: room for the left padding and the row, and for the right padding, which
        // reads past the row into its trailing zeros and the next row's `pl` leading ones
        // (`wv − w − pl + pl ≥ pr`); at least wo·sw so that output rows do not overlap, and a
        // multiple of sw so that every row splits into phases alike.
        let wv = (p.w + pl.max(pr)).max(wo * sw).next_multiple_of(sw);
        let wq = wv / sw;
        let phases = |k: usize, d: usize, s: usize| {
            let mut v: Vec<usize> = (0..k).map(|r| (r * d) % s).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let phases_h = phases(p.k_h, p.dilation.0, sh);
        let phases_w = phases(p.k_w, p.dilation.1, sw);
        // Saturating: a geometry too large for memory is refused by the allocation that uses it.
        let chan_stride = (phases_h.len() * phases_w.len()).saturating_mul(plane_len(hq, wq));
        // A valid output reads inside its plane (see the module docs); a strip that starts at a
        // valid row may run up to wq + NR floats past the last plane (junk lanes only).
        Self {
            ho,
            wo,
            hq,
            wq,
            chan_stride,
            phases_h,
            phases_w,
            image_stride: p.c_in.saturating_mul(chan_stride),
            slack: wq + 2 * NR,
        }
    }

    /// The index of phase `(py, px)` among the planes of a channel.
    fn phase(&self, py: usize, px: usize) -> usize {
        let at = |v: &[usize], x: usize| v.binary_search(&x).expect("a phase some tap reads");
        at(&self.phases_h, py) * self.phases_w.len() + at(&self.phases_w, px)
    }

    /// Offsets of the taps `(c, r, s)` of one group, in weight order (`c` slowest).
    pub fn fill_offsets(&self, p: &Conv2dParams, offsets: &mut TapOffsets) {
        let (sh, sw) = p.stride;
        let (dh, dw) = p.dilation;
        let plane = plane_len(self.hq, self.wq);
        offsets.fill((0..p.c_in_per_group()).flat_map(move |c| {
            (0..p.k_h).flat_map(move |r| {
                (0..p.k_w).map(move |s| {
                    let phase = self.phase((r * dh) % sh, (s * dw) % sw);
                    c * self.chan_stride + phase * plane + (r * dh / sh) * self.wq + s * dw / sw
                })
            })
        }));
    }

    /// Fills `planes` (exactly `images·image_stride + slack` floats) from images
    /// `first..first + images` of `input`, in parallel on `team`.
    pub fn transform(
        &self,
        team: &Team,
        p: &Conv2dParams,
        input: &[f32],
        first: usize,
        images: usize,
        planes: &mut [f32],
    ) {
        let data = self.split_slack(images, planes);
        let piece_len = plane_len(self.hq, self.wq) * self.phases_w.len();
        // One job per channel and row phase (the stem's three channels gave two threads three
        // jobs: one thread did two).
        team.spread(
            data.chunks_mut(piece_len).enumerate().collect(),
            false,
            Vec::new,
            |line: &mut Vec<f32>, _, (piece, planes): (usize, &mut [f32])| {
                self.fill_piece(p, input, first, piece, planes, line);
            },
        );
    }

    /// Fills the planes of channels `channels` of image `image` of `input` on this thread, into
    /// `planes` laid out for one image (`image_stride + slack` floats; the other channels'
    /// planes are left as they are). A task that computes a whole image (or group) builds its
    /// planes so, right before it reads them: they stay in the core's cache.
    pub fn transform_channels(
        &self,
        p: &Conv2dParams,
        input: &[f32],
        image: usize,
        channels: std::ops::Range<usize>,
        planes: &mut [f32],
        line: &mut Vec<f32>,
    ) {
        let data = self.split_slack(1, planes);
        let piece_len = plane_len(self.hq, self.wq) * self.phases_w.len();
        let n_h = self.phases_h.len();
        let pieces = data.chunks_mut(piece_len).enumerate();
        for (piece, planes) in pieces.skip(channels.start * n_h).take(channels.len() * n_h) {
            self.fill_piece(p, input, image, piece, planes, line);
        }
    }

    /// The body of `images` images' planes, with the slack after it zeroed.
    fn split_slack<'a>(&self, images: usize, planes: &'a mut [f32]) -> &'a mut [f32] {
        let body = images * self.image_stride;
        assert_eq!(
            planes.len(),
            body + self.slack,
            "phase planes: wrong buffer size"
        );
        let (data, slack) = planes.split_at_mut(body);
        slack.fill(0.0);
        data
    }

    /// Fills piece `piece` (a channel of an image and a row phase: the planes of every column
    /// phase of it, `planes`) from the images of `input` from `first` on; `line` is scratch.
    fn fill_piece(
        &self,
        p: &Conv2dParams,
        input: &[f32],
        first: usize,
        piece: usize,
        planes: &mut [f32],
        line: &mut Vec<f32>,
    ) {
        let (sh, sw) = p.stride;
        // Only the leading padding places the data; the trailing one is zeros the geometry
        // leaves room for.
        let (ph, pw) = p.padding;
        let plane = plane_len(self.hq, self.wq);
        let chan = p.h * p.w;
        let n_w = self.phases_w.len();
        let n_h = self.phases_h.len();
        let wv = self.wq * sw;
        // One padded input row (`pw` zeros, the row, zeros up to `wv`) at a time, so that
        // every column phase of a plane row is a unit-stride split of it: plane column `xx` of
        // phase `px` is `line[xx·sw + px]`, input column `xx·sw + px − pw` where that is in
        // `0..w`, zero elsewhere. (A strided gather per phase was scalar: 18% of l2 s2 n8.)
        line.resize(wv, 0.0);
        let at = (first * p.c_in + piece / n_h) * chan;
        let src = &input[at..][..chan];
        if piece.is_multiple_of(n_h) {
            // The channel after next, asked for while this one is read: channels lie a plane
            // apart, and the row phases read every sh-th row, which hardware prefetchers do not
            // run far enough ahead of (Emerald Rapids, 2 threads, 3 interleaved rounds, ratio
            // to onnxruntime: l2 s2 n8 0.944 -> 0.970, stem n1 1.027 -> 1.059; the next
            // channel instead, 0.959 and 1.029).
            if let Some(next) = input.get(at + 2 * chan..at + 3 * chan) {
                super::kernel::prefetch(next);
            }
        }
        let py = self.phases_h[piece % n_h];
        let wq = self.wq;
        for yy in 0..plane / wq {
            let at = yy * wq;
            let y = (yy * sh + py) as isize - ph as isize;
            if y < 0 || y >= p.h as isize {
                for k in 0..n_w {
                    planes[k * plane + at..][..wq].fill(0.0);
                }
                continue;
            }
            let src_row = &src[y as usize * p.w..][..p.w];
            if sw == 1 {
                // One phase: the row goes in as it is, between its zeros.
                let row = &mut planes[at..][..wq];
                let n = p.w.min(wq - pw);
                row[..pw].fill(0.0);
                row[pw..pw + n].copy_from_slice(&src_row[..n]);
                row[pw + n..].fill(0.0);
                continue;
            }
            let n = p.w.min(wv - pw);
            line[..pw].fill(0.0);
            line[pw..pw + n].copy_from_slice(&src_row[..n]);
            line[pw + n..].fill(0.0);
            if sw == 2 && n_w == 2 {
                // Both phases of stride 2 in one pass.
                let (first, second) = planes.split_at_mut(plane);
                deinterleave::<2>(line, [&mut first[at..][..wq], &mut second[at..][..wq]]);
                continue;
            }
            for (k, &px) in self.phases_w.iter().enumerate() {
                let row = &mut planes[k * plane + at..][..wq];
                for (d, chunk) in row.iter_mut().zip(line.chunks_exact(sw)) {
                    *d = chunk[px];
                }
            }
        }
    }
}

/// Splits `line` into its `M` column phases: `rows[k][j] = line[M·j + k]`, as far as the
/// shortest of `line / M` and the rows. Zipped loops, which vectorise for M = 2 and 4 (an
/// indexed or strided gather did not: 18% of l2 s2 n8's time); shared by the phase planes and
/// Winograd's input transform.
pub(super) fn deinterleave<const M: usize>(line: &[f32], mut rows: [&mut [f32]; M]) {
    match &mut rows[..] {
        [d0, d1] => {
            for ((a, b), g) in d0.iter_mut().zip(d1.iter_mut()).zip(line.chunks_exact(2)) {
                (*a, *b) = (g[0], g[1]);
            }
        }
        [d0, d1, d2, d3] => {
            let quads = line.chunks_exact(4);
            let rows = d0
                .iter_mut()
                .zip(d1.iter_mut())
                .zip(d2.iter_mut())
                .zip(d3.iter_mut());
            for ((((a, b), c), d), g) in rows.zip(quads) {
                (*a, *b, *c, *d) = (g[0], g[1], g[2], g[3]);
            }
        }
        rows => {
            let len = rows.iter().map(|r| r.len()).min().unwrap_or(0);
            for (j, group) in line.chunks_exact(M).take(len).enumerate() {
                for (row, &value) in rows.iter_mut().zip(group) {
                    row[j] = value;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row count splits the line the same way: `rows[k][j] = line[M·j + k]`, and rows
    /// longer than the line keep what they held past it.
    #[test]
    fn deinterleave_splits_into_column_phases() {
        fn check<const M: usize>() {
            let line: Vec<f32> = (0..5 * M).map(|i| i as f32).collect();
            let mut store = vec![vec![-1.0f32; 6]; M];
            let mut it = store.iter_mut();
            deinterleave::<M>(&line, std::array::from_fn(|_| &mut it.next().unwrap()[..]));
            for (k, row) in store.iter().enumerate() {
                let want: Vec<f32> = (0..5).map(|j| (M * j + k) as f32).chain([-1.0]).collect();
                assert_eq!(row, &want, "M = {M}, phase {k}");
            }
        }
        check::<2>();
        check::<3>();
        check::<4>();
    }

    /// A plane per phase that some tap reads: a stride far larger than the kernel costs the
    /// planes no more than the windows it reads (it once allocated sh·sw planes: 10¹⁰ for a
    /// stride of 100,000 on a 32×32 input).
    #[test]
    fn planes_only_for_the_phases_taps_read() {
        let p = Conv2dParams::new(1, 4, 32, 32, 2, 3, 3).with_stride(100_000, 100_000);
        let g = Geometry::new(&p);
        assert_eq!((g.phases_h.len(), g.phases_w.len()), (3, 3));
        assert!(g.image_stride < 1000, "{g:?}");
        let dense = Conv2dParams::new(1, 4, 32, 32, 2, 3, 3).with_stride(2, 2);
        let g = Geometry::new(&dense);
        assert_eq!((g.phases_h, g.phases_w), (vec![0, 1], vec![0, 1]));
        // Dilation 2 at stride 2: every tap on phase 0.
        let g = Geometry::new(&dense.with_dilation(2, 2));
        assert_eq!((g.phases_h, g.phases_w), (vec![0], vec![0]));
    }
}
