//! The GEMM microkernels: blocks of outputs accumulated over `kc` taps, with B (the phase
//! planes, see `planes.rs`) read through a tap-offset table (implicit GEMM). `A` is a packed
//! weight panel (`[kc][16]`, 16 filters innermost). Two orientations:
//!
//! - **strips** ([`Microkernel::run`]): 16 filters × 16 consecutive positions of the output grid,
//!   `C[i][j] (+)= Σ_k A[k][i] · B[offs[k] + j]`; positions in the vector lanes, filters
//!   broadcast. Junk columns of the grid and the rounding of a tile to 16 are computed too.
//! - **rows** ([`Microkernel::run_rows`]): `n ≤ 16` consecutive *valid* positions of one output
//!   row × 16 filters (a call takes a whole row and cuts it into such chunks),
//!   `C[j][i] = Σ_k B[offs[k] + i] · A[k][j]` over every tap; filters in the vector lanes,
//!   positions broadcast, the tile transposed on its one store. Nothing is computed twice or
//!   for nothing.
//!
//! Two implementations with one contract: AVX-512 intrinsics (16 zmm accumulators, the A values
//! broadcast from memory), and a portable one in plain Rust for every other machine. The safe
//! entry point [`Microkernel::run`] checks every bound once per call, in O(1), through
//! [`TapOffsets`], whose construction proves that no offset exceeds its recorded maximum;
//! this file holds the crate's only CPU `unsafe` (with the FMA peak loop, [`prefetch`],
//! Winograd F(4×4)'s tile store, [`store_tiles4x4`], a 16×16 register transpose, and the
//! Winograd transforms' 16-lane driver, [`transform_rows`]).

/// Rows of A (filters) and columns of B (output positions) in one microkernel call.
pub const MR: usize = 16;
/// Positions per call of [`Microkernel::Avx512Wide`]'s rows tile (2 × 14 accumulators, two
/// vectors of A, four registers spare).
pub const WIDE_POSITIONS: usize = 14;
/// See [`MR`].
pub const NR: usize = 16;

/// How the rows kernel cuts `n` consecutive positions into calls of at most `max`:
/// `(chunks, positions per chunk)`, the last chunk taking the remainder (balanced, so that no
/// call is left with a few positions, which FMA latency would bound).
pub fn row_chunks(n: usize, max: usize) -> (usize, usize) {
    let chunks = n.div_ceil(max);
    (chunks, n.div_ceil(chunks))
}

/// Tap offsets into the phase planes, with a proven maximum.
#[derive(Debug, Default)]
pub struct TapOffsets {
    offs: Vec<usize>,
    max: usize,
}

impl TapOffsets {
    /// Replaces the content (reusing the allocation) and records the maximum.
    pub fn fill(&mut self, offs: impl Iterator<Item = usize>) {
        self.offs.clear();
        self.offs.extend(offs);
        self.max = self.offs.iter().copied().max().unwrap_or(0);
    }

    /// Number of taps.
    pub fn len(&self) -> usize {
        self.offs.len()
    }

    /// Whether there are no taps.
    pub fn is_empty(&self) -> bool {
        self.offs.is_empty()
    }

    /// The largest offset.
    pub fn max(&self) -> usize {
        self.max
    }

    /// All offsets.
    pub fn as_slice(&self) -> &[usize] {
        &self.offs
    }
}

/// Which microkernels run: an instruction set and a rows tile. Both AVX-512 variants compute
/// every output as the same chain of FMAs in the same order, so their bits are identical (one
/// numerics key, [`Microkernel::numerics`]); the portable one multiplies and adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Microkernel {
    /// AVX-512F, 16 accumulators: one load (a broadcast or a vector) per FMA. Enough where
    /// 512-bit FMAs issue at one per cycle (AMD Zen 4 splits them in two).
    Avx512,
    /// AVX-512F with a rows tile of up to 14 positions × 32 filters (28 accumulators, two
    /// vectors of filters per broadcast): 16 loads per 28 FMAs, for cores with two 512-bit FMA
    /// ports, which one load per FMA cannot feed. Strips are as in [`Microkernel::Avx512`].
    Avx512Wide,
    /// Plain Rust; the compiler vectorises it for the baseline target.
    Portable,
}

impl Microkernel {
    /// Every variant, supported here or not.
    pub const ALL: [Microkernel; 3] = [
        Microkernel::Avx512,
        Microkernel::Avx512Wide,
        Microkernel::Portable,
    ];

    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Microkernel::Avx512 | Microkernel::Avx512Wide => {
                std::arch::is_x86_feature_detected!("avx512f")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Microkernel::Avx512 | Microkernel::Avx512Wide => false,
            Microkernel::Portable => true,
        }
    }

    /// The fastest kernel on this CPU, as measured once per process (see `calibrate.rs`).
    pub fn detect() -> Self {
        super::calibrate::calibration().chosen
    }

    /// Name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Microkernel::Avx512 => "avx512",
            Microkernel::Avx512Wide => "avx512-wide",
            Microkernel::Portable => "portable",
        }
    }

    /// The kernel with this [`name`](Self::name).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// What determines its output bits (fingerprints are keyed by it): the AVX-512 variants
    /// share one FMA chain per output.
    pub fn numerics(self) -> &'static str {
        match self {
            Microkernel::Avx512 | Microkernel::Avx512Wide => "avx512",
            Microkernel::Portable => "portable",
        }
    }

    /// The rows tile: at most this many positions per chunk of a call...
    pub fn rows_positions(self) -> usize {
        match self {
            Microkernel::Avx512Wide => WIDE_POSITIONS,
            Microkernel::Avx512 | Microkernel::Portable => NR,
        }
    }

    /// ...and this many filters (16 or 32: one or two packed panels).
    pub fn rows_filters(self) -> usize {
        match self {
            Microkernel::Avx512Wide => 2 * MR,
            Microkernel::Avx512 | Microkernel::Portable => MR,
        }
    }

    /// Rows orientation, over every tap:
    /// `C[j·ldc + i] = Σ_k b[offs[k] + i] · A_j[k] (+ bias[j])` (or `C[i·ldc + j]` with
    /// `RowsOut::ByPosition`) for `i < n` positions (any number: the call cuts them into
    /// `row_chunks` of at most [`rows_positions`](Self::rows_positions), checking every bound
    /// once) and `j < filters` (at most [`rows_filters`](Self::rows_filters)), where filters
    /// 0..16 come from the packed panel `a[k·16 + j]` and filters 16..32 from the next panel,
    /// `a[kdim·16 + k·16 + j − 16]`. Each chunk's tile is accumulated in registers over all
    /// taps (one vector of A per panel and tap streams well from L2) and stored transposed, so
    /// each filter's outputs are contiguous (`RowsOut::ByFilter`), or as it is, each position's
    /// filters contiguous (`RowsOut::ByPosition`, vector stores); filters past `filters` are
    /// computed but not stored.
    /// Panics (a bug in the caller) if any access would leave its slice.
    #[allow(clippy::too_many_arguments)]
    pub fn run_rows(
        self,
        n: usize,
        a: &[f32],
        offsets: &TapOffsets,
        b: &[f32],
        c: &mut [f32],
        ldc: usize,
        filters: usize,
        bias: Option<&[f32]>,
        out: RowsOut,
    ) {
        let kdim = offsets.len();
        assert!(n >= 1, "microkernel: no positions");
        assert!(
            (1..=self.rows_filters()).contains(&filters),
            "microkernel: {filters} filters per call"
        );
        let panels = filters.div_ceil(MR);
        assert!(
            a.len() >= panels * kdim * MR,
            "microkernel: A panel too short"
        );
        assert!(
            offsets.max() + n <= b.len(),
            "microkernel: B reads past the planes"
        );
        let (rows, cols) = match out {
            RowsOut::ByFilter => (filters, n),
            RowsOut::ByPosition => (n, filters),
        };
        assert!(
            ldc >= cols && (rows - 1) * ldc + cols <= c.len(),
            "microkernel: C tile out of bounds"
        );
        let mut bias32 = [0.0f32; 2 * MR];
        if let Some(bias) = bias {
            bias32[..filters].copy_from_slice(&bias[..filters]);
        }
        let offs = offsets.as_slice();
        let (_, chunk) = row_chunks(n, self.rows_positions());
        // Where chunk x0's tile starts in C.
        let c_at = |x0: usize| match out {
            RowsOut::ByFilter => x0,
            RowsOut::ByPosition => x0 * ldc,
        };
        /// Dispatches to the instance for the runtime `m` ≤ 14 (the accumulator count is a
        /// constant), with `$p` panels; `$more` adds the arms for 15 and 16.
        macro_rules! by_n {
            ($m:expr, $f:ident, $p:literal, [$($more:literal),*], $args:tt) => {
                match $m {
                    1 => $f::<1, $p>$args, 2 => $f::<2, $p>$args,
                    3 => $f::<3, $p>$args, 4 => $f::<4, $p>$args,
                    5 => $f::<5, $p>$args, 6 => $f::<6, $p>$args,
                    7 => $f::<7, $p>$args, 8 => $f::<8, $p>$args,
                    9 => $f::<9, $p>$args, 10 => $f::<10, $p>$args,
                    11 => $f::<11, $p>$args, 12 => $f::<12, $p>$args,
                    13 => $f::<13, $p>$args, 14 => $f::<14, $p>$args,
                    $($more => $f::<$more, $p>$args,)*
                    _ => unreachable!("chunks hold at most rows_positions"),
                }
            };
        }
        let a_stride = kdim * MR;
        assert!(
            self.supported(),
            "{} kernel on a CPU without it",
            self.name()
        );
        for x0 in (0..n).step_by(chunk) {
            let m = chunk.min(n - x0);
            match self {
                #[cfg(target_arch = "x86_64")]
                Microkernel::Avx512 | Microkernel::Avx512Wide => {
                    let (a, offs) = (a.as_ptr(), offs.as_ptr());
                    let (b, c) = (b[x0..].as_ptr(), c[c_at(x0)..].as_mut_ptr());
                    use avx512::rows;
                    // SAFETY: the CPU has AVX-512F (checked above); A reads panels·kdim·16
                    // floats (a.len() checked); the chunk's B reads x0 + offs[k] + 0..m with
                    // every offset ≤ offsets.max() and max + n ≤ b.len(); its C writes start
                    // at c_at(x0) and cover positions x0..x0 + m of rows·cols, inside
                    // (rows−1)·ldc + cols ≤ c.len() (rows and cols by `out`); m ≤ chunk ≤
                    // rows_positions, so two panels only with m ≤ 14.
                    unsafe {
                        if panels == 1 {
                            by_n!(
                                m,
                                rows,
                                1,
                                [15, 16],
                                (kdim, a, a_stride, offs, b, c, ldc, filters, &bias32, out)
                            )
                        } else {
                            by_n!(
                                m,
                                rows,
                                2,
                                [],
                                (kdim, a, a_stride, offs, b, c, ldc, filters, &bias32, out)
                            )
                        }
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                Microkernel::Avx512 | Microkernel::Avx512Wide => {
                    unreachable!("AVX-512 kernel selected on a non-x86 CPU")
                }
                Microkernel::Portable => {
                    let (b, c) = (&b[x0..], &mut c[c_at(x0)..]);
                    by_n!(
                        m,
                        portable_rows,
                        1,
                        [15, 16],
                        (kdim, a, a_stride, offs, b, c, ldc, filters, &bias32, out)
                    )
                }
            }
        }
    }

    /// Strips orientation: `C[i·ldc + j] = start[i] + Σ_{k<kc} a[k·16 + i] · b[offs[k0 + k] + j]`
    /// for `i < tile.filters` and `j < tile.lanes` (both ≤ 16); the other rows and lanes are
    /// computed but neither read nor written.
    /// Panics (a bug in the caller) if any access would leave its slice.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        self,
        a: &[f32],
        offsets: &TapOffsets,
        k0: usize,
        kc: usize,
        b: &[f32],
        tile: Tile,
        start: Start,
    ) {
        let Tile {
            c,
            ldc,
            filters,
            lanes,
        } = tile;
        assert!(a.len() >= kc * MR, "microkernel: A panel too short");
        assert!(
            k0 + kc <= offsets.len(),
            "microkernel: tap range out of bounds"
        );
        assert!(
            offsets.max() + NR <= b.len(),
            "microkernel: B reads past the planes"
        );
        assert!(
            (1..=MR).contains(&filters) && (1..=NR).contains(&lanes),
            "microkernel: empty tile"
        );
        assert!(
            ldc >= lanes && (filters - 1) * ldc + lanes <= c.len(),
            "microkernel: C tile out of bounds"
        );
        let offs = &offsets.as_slice()[k0..k0 + kc];
        match self {
            #[cfg(target_arch = "x86_64")]
            Microkernel::Avx512 | Microkernel::Avx512Wide => {
                assert!(self.supported(), "AVX-512 kernel on a CPU without it");
                // SAFETY: the CPU has AVX-512F (checked above); every pointer access stays in its
                // slice: A reads kc·16 floats (a.len() checked), B reads offs[k]+0..16 with every
                // offset ≤ offsets.max() and max+16 ≤ b.len(), C reads and writes (masked)
                // i·ldc+0..lanes for i < filters with (filters−1)·ldc+lanes ≤ c.len().
                unsafe {
                    avx512::kernel(
                        kc,
                        a.as_ptr(),
                        offs.as_ptr(),
                        b.as_ptr(),
                        c.as_mut_ptr(),
                        ldc,
                        filters,
                        lanes,
                        start,
                    )
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Microkernel::Avx512 | Microkernel::Avx512Wide => {
                unreachable!("AVX-512 kernel selected on a non-x86 CPU")
            }
            Microkernel::Portable => portable(kc, a, offs, b, c, ldc, filters, lanes, start),
        }
    }
}

/// Where a strips call writes: `filters` rows of `lanes` floats, rows `ldc` apart.
pub struct Tile<'c> {
    /// The destination, starting at row 0, lane 0.
    pub c: &'c mut [f32],
    /// Distance between rows (filters).
    pub ldc: usize,
    /// Rows stored (≤ 16).
    pub filters: usize,
    /// Lanes stored per row (≤ 16).
    pub lanes: usize,
}

/// What a strips call starts from.
#[derive(Clone, Copy)]
pub enum Start<'a> {
    /// One value per filter (the bias, or zeros).
    Values(&'a [f32; MR]),
    /// The values already in C (a later block of taps).
    Accumulate,
}

/// Sixteen zeros: the start of a tile without bias.
pub const ZEROS: [f32; MR] = [0.0; MR];

#[allow(clippy::too_many_arguments)]
fn portable(
    kc: usize,
    a: &[f32],
    offs: &[usize],
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    filters: usize,
    lanes: usize,
    start: Start,
) {
    let mut acc = [[0.0f32; NR]; MR];
    for (i, row) in acc.iter_mut().enumerate() {
        match start {
            Start::Values(v) => row.fill(v[i]),
            Start::Accumulate if i < filters => {
                row[..lanes].copy_from_slice(&c[i * ldc..i * ldc + lanes])
            }
            Start::Accumulate => {}
        }
    }
    for (ak, &off) in a.chunks_exact(MR).zip(offs).take(kc) {
        let bv: &[f32; NR] = b[off..off + NR].try_into().expect("16 floats");
        for (row, &av) in acc.iter_mut().zip(ak) {
            for (r, &bj) in row.iter_mut().zip(bv) {
                *r += av * bj;
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(filters) {
        c[i * ldc..i * ldc + lanes].copy_from_slice(&row[..lanes]);
    }
}

/// The portable body of [`Microkernel::run_rows`] for `N` positions and `P` panels.
#[allow(clippy::too_many_arguments)]
fn portable_rows<const N: usize, const P: usize>(
    kdim: usize,
    a: &[f32],
    a_stride: usize,
    offs: &[usize],
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    filters: usize,
    bias: &[f32; 2 * MR],
    out: RowsOut,
) {
    let start: [[f32; MR]; P] =
        std::array::from_fn(|p| bias[p * MR..(p + 1) * MR].try_into().expect("16 floats"));
    let mut acc = [start; N];
    for (k, &off) in offs.iter().enumerate().take(kdim) {
        for (row, &bi) in acc.iter_mut().zip(&b[off..off + N]) {
            for (p, panel) in row.iter_mut().enumerate() {
                let ak = &a[p * a_stride + k * MR..][..MR];
                for (r, &aj) in panel.iter_mut().zip(ak) {
                    *r += bi * aj;
                }
            }
        }
    }
    match out {
        RowsOut::ByFilter => store_transposed(&acc, c, ldc, filters),
        RowsOut::ByPosition => {
            for (i, row) in acc.iter().enumerate() {
                for (j, dst) in c[i * ldc..i * ldc + filters].iter_mut().enumerate() {
                    *dst = row[j / MR][j % MR];
                }
            }
        }
    }
}

/// How the rows kernel stores its `n × filters` tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowsOut {
    /// Transposed: each filter's `n` outputs contiguous, filters `ldc` apart (output planes).
    ByFilter,
    /// As accumulated: each position's filters contiguous, positions `ldc` apart.
    ByPosition,
}

/// Stores filters `0..filters` of an `N×P·16` tile (positions × filters) as rows of `c` with
/// pitch `ldc`.
#[inline(always)]
fn store_transposed<const N: usize, const P: usize>(
    acc: &[[[f32; MR]; P]; N],
    c: &mut [f32],
    ldc: usize,
    filters: usize,
) {
    for j in 0..filters {
        for (dst, src) in c[j * ldc..j * ldc + N].iter_mut().zip(acc) {
            *dst = src[j / MR][j % MR];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Asks for the cache lines of `data` ahead of their use (a hint: it changes no value and never
/// faults); nothing where the CPU has no prefetch instruction.
pub fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: SSE (baseline on x86-64) has PREFETCHT0, which reads nothing architecturally
        // and never faults; the address is inside `data` anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Stores 4×4 output tiles of up to 16 filters: `outs[f][at + i·wo + j] = y[(4i + j)·ldy + f] +
/// bias[f]` for `f < outs.len()` (≤ 16), `i, j < 4`; `y` holds the tile's 16 outputs, each a
/// row of filters (`ldy` apart). The same adds as a scalar loop, so the same bits; on AVX-512
/// the 16×16 block is transposed in registers, so each filter's row of four outputs is one
/// 128-bit store instead of four scalar ones (Winograd F(4×4)'s output scatter).
pub fn store_tiles4x4(
    y: &[f32],
    ldy: usize,
    bias: &[f32; 16],
    outs: &mut [&mut [f32]],
    (at, wo): (usize, usize),
) {
    let filters = outs.len();
    assert!(filters <= 16, "store_tiles4x4: {filters} filters");
    assert!(
        filters == 0 || y.len() >= 15 * ldy + filters,
        "store_tiles4x4: y too short"
    );
    assert!(
        outs.iter().all(|o| o.len() >= at + 3 * wo + 4) && wo >= 4,
        "store_tiles4x4: output rows out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && filters > 0 {
        let mut dst = [std::ptr::null_mut::<f32>(); 16];
        for (d, o) in dst.iter_mut().zip(outs.iter_mut()) {
            *d = o[at..].as_mut_ptr();
        }
        // SAFETY: AVX-512F is present (checked); y reads rows 0..16 of `ldy`, `filters` lanes
        // each (masked; length checked), and each of the first `filters` pointers writes
        // i·wo + 0..4 for i < 4 inside its slice (checked above).
        unsafe { avx512::store_tiles4x4(y.as_ptr(), ldy, bias, &dst, filters, wo) };
        return;
    }
    for (f, out) in outs.iter_mut().enumerate() {
        for i in 0..4 {
            for j in 0..4 {
                out[at + i * wo + j] = y[(4 * i + j) * ldy + f] + bias[f];
            }
        }
    }
}

/// What a 1-D transform computes lane by lane: adds, subtracts and scalings, on a scalar or on a
/// whole vector of lanes (the same operations in the same order either way, so the same bits).
pub trait Lanes:
    Copy
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<f32, Output = Self>
{
}

impl Lanes for f32 {}

/// A 1-D transform of `I` rows into `O` rows, one lane at a time (Winograd's `Bᵀ` and `Aᵀ`):
/// written once, run by [`transform_rows`] on scalars or on 16 lanes at once.
pub trait RowTransform<const I: usize, const O: usize> {
    /// The `O` results of one lane from its `I` inputs.
    fn apply<T: Lanes>(d: [T; I]) -> [T; O];
}

/// `v[o][j] = F(d[0][j], …, d[I−1][j])[o]` for `j < v[0].len()`: on AVX-512, 16 lanes per step
/// with a masked tail (the rows of a Winograd transform are often 14 or 60 floats long, which
/// an auto-vectorised loop runs mostly in its scalar remainder); elsewhere lane by lane.
/// Panics (a bug in the caller) if a row is shorter than the first output row.
pub fn transform_rows<F: RowTransform<I, O>, const I: usize, const O: usize>(
    d: [&[f32]; I],
    mut v: [&mut [f32]; O],
) {
    let n = v.first().map_or(0, |r| r.len());
    assert!(
        d.iter().all(|r| r.len() >= n) && v.iter().all(|r| r.len() >= n),
        "transform_rows: a row shorter than {n}"
    );
    #[cfg(target_arch = "x86_64")]
    if Microkernel::Avx512.supported() {
        let src: [*const f32; I] = std::array::from_fn(|i| d[i].as_ptr());
        let dst: [*mut f32; O] = std::array::from_fn(|o| v[o].as_mut_ptr());
        // SAFETY: AVX-512F is present (checked); every row is valid for n floats (checked
        // above), inputs read and outputs written (distinct: `&` and `&mut` slices).
        unsafe { avx512::transform_rows::<F, I, O>(src, dst, n) };
        return;
    }
    for j in 0..n {
        let out = F::apply::<f32>(std::array::from_fn(|i| d[i][j]));
        for (row, x) in v.iter_mut().zip(out) {
            row[j] = x;
        }
    }
}

/// FLOPs of `iters` rounds of the FMA peak loop.
pub const FMA_LOOP_FLOPS: usize = 16 * 16 * 2;

/// Runs the register-only FMA loop (`iters · FMA_LOOP_FLOPS` FLOPs) where the CPU has
/// AVX-512F; `None` elsewhere (no SIMD peak is measured for the portable kernel).
pub fn fma_peak(iters: usize) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    if Microkernel::Avx512.supported() {
        // SAFETY: the CPU has AVX-512F (checked above); the loop touches only registers.
        return Some(unsafe { avx512::fma_loop(iters) });
    }
    let _ = iters;
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fill_uniform;
    use approx::abs_diff_eq;

    /// The tile store writes exactly the scalar loop's values (bits), every filter count, and
    /// nothing outside each filter's four rows of four.
    #[test]
    fn tile_stores_match_the_scalar_loop() {
        let ldy = 40;
        let y: Vec<f32> = (0..16 * ldy).map(|i| i as f32 * 0.37 - 50.0).collect();
        let bias: [f32; 16] = std::array::from_fn(|f| f as f32 * 1.5 - 3.0);
        let (at, wo) = (3, 9);
        for filters in 0..=16 {
            let mut planes = vec![vec![f32::NAN; at + 4 * wo]; filters];
            let mut outs: Vec<&mut [f32]> = planes.iter_mut().map(|p| &mut p[..]).collect();
            store_tiles4x4(&y[5..], ldy, &bias, &mut outs, (at, wo));
            for (f, plane) in planes.iter().enumerate() {
                for (q, &v) in plane.iter().enumerate() {
                    let (i, j) = ((q.wrapping_sub(at)) / wo, (q.wrapping_sub(at)) % wo);
                    if q >= at && i < 4 && j < 4 {
                        let want = y[5 + (4 * i + j) * ldy + f] + bias[f];
                        assert_eq!(
                            v.to_bits(),
                            want.to_bits(),
                            "{filters} filters: ({f}, {i}, {j})"
                        );
                    } else {
                        assert!(v.is_nan(), "{filters} filters: wrote {q} of filter {f}");
                    }
                }
            }
        }
    }

    /// `FMA_LOOP_FLOPS` is what one round of the peak loop computes: every lane of every
    /// chain runs the same `v = v·m + a`, so the loop's sum is the lanes times one chain's
    /// value (computed here in scalars), and each lane's FMA is two FLOPs.
    #[test]
    fn the_fma_loop_does_the_flops_it_is_credited_with() {
        let Some(sum) = fma_peak(100) else {
            eprintln!("no AVX-512F here: the FMA peak loop does not run (nothing to count)");
            return;
        };
        let mut v = 1.0f32;
        for _ in 0..100 {
            v = v.mul_add(0.999_9, 1e-6);
        }
        let lanes = (f64::from(sum) / f64::from(v)).round() as usize;
        assert_eq!(FMA_LOOP_FLOPS, 2 * lanes, "the loop summed {lanes} lanes");
    }

    fn naive(kc: usize, a: &[f32], offs: &[usize], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0.0; MR * NR];
        for k in 0..kc {
            for i in 0..MR {
                for j in 0..NR {
                    c[i * NR + j] += f64::from(a[k * MR + i]) * f64::from(b[offs[k] + j]);
                }
            }
        }
        c
    }

    #[test]
    fn every_kernel_matches_the_naive_product() {
        let kc = 37;
        let mut a = vec![0.0; kc * MR];
        let mut b = vec![0.0; 500];
        fill_uniform(3, &mut a);
        fill_uniform(4, &mut b);
        let mut offsets = TapOffsets::default();
        offsets.fill((0..kc).map(|k| (k * 97) % 480));
        let want = naive(kc, &a, offsets.as_slice(), &b);
        let start: [f32; MR] = std::array::from_fn(|i| i as f32);
        for kernel in Microkernel::ALL.into_iter().filter(|k| k.supported()) {
            for (filters, lanes) in [(16, 16), (5, 16), (16, 3), (1, 1), (9, 14)] {
                let ldc = 20;
                let mut c = vec![f32::NAN; (filters - 1) * ldc + lanes];
                let tile = Tile {
                    c: &mut c,
                    ldc,
                    filters,
                    lanes,
                };
                kernel.run(&a, &offsets, 0, kc, &b, tile, Start::Values(&start));
                // Accumulating a second pass adds the product again.
                let tile = Tile {
                    c: &mut c,
                    ldc,
                    filters,
                    lanes,
                };
                kernel.run(&a, &offsets, 0, kc, &b, tile, Start::Accumulate);
                for i in 0..filters {
                    for j in 0..lanes {
                        let got = f64::from(c[i * ldc + j]);
                        let expect = 2.0 * want[i * NR + j] + i as f64;
                        assert!(
                            abs_diff_eq!(got, expect, epsilon = 1e-4),
                            "{kernel:?} ({i},{j}): {got} against {expect}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_rows_kernel_matches_the_naive_product() {
        // Tap counts below the prefetch distance, odd and even, shorter and longer than the
        // taps that prefetch C (32 or 64), so that every loop of the kernel and its tails run.
        for kdim in [3, 29, 75, 76] {
            rows_match_the_naive_product(kdim);
        }
    }

    fn rows_match_the_naive_product(kdim: usize) {
        use RowsOut::{ByFilter, ByPosition};
        let mut a = vec![0.0; 2 * kdim * MR];
        let mut b = vec![0.0; 420];
        fill_uniform(5, &mut a);
        fill_uniform(6, &mut b);
        let mut offsets = TapOffsets::default();
        offsets.fill((0..kdim).map(|k| (k * 53) % 380));
        let offs = offsets.as_slice();
        // Filter j's weight for tap k: panel j / 16, lane j % 16.
        let weight = |k: usize, j: usize| f64::from(a[(j / MR) * kdim * MR + k * MR + j % MR]);
        for kernel in Microkernel::ALL.into_iter().filter(|k| k.supported()) {
            // One chunk, then rows the call cuts into two and three chunks.
            for n in 1..=2 * kernel.rows_positions() + 3 {
                let most = kernel.rows_filters();
                for filters in [(most + 1).saturating_sub(n).max(1), 1, most] {
                    let ldc = n + 3;
                    let bias: Vec<f32> = (0..filters).map(|j| j as f32).collect();
                    let mut c = vec![f32::NAN; (filters - 1) * ldc + n];
                    let bias = Some(&bias[..]);
                    kernel.run_rows(n, &a, &offsets, &b, &mut c, ldc, filters, bias, ByFilter);
                    // By position: the same tile, each position's filters contiguous.
                    let ldp = filters + 2;
                    let mut cp = vec![f32::NAN; (n - 1) * ldp + filters];
                    kernel.run_rows(n, &a, &offsets, &b, &mut cp, ldp, filters, bias, ByPosition);
                    for i in 0..n {
                        for j in 0..filters {
                            let want: f64 = (0..kdim)
                                .map(|k| f64::from(b[offs[k] + i]) * weight(k, j))
                                .sum();
                            let got = f64::from(c[j * ldc + i]);
                            assert!(
                                abs_diff_eq!(got, want + j as f64, epsilon = 1e-4),
                                "{kernel:?} kdim={kdim} n={n} filters={filters} ({i},{j})"
                            );
                            assert_eq!(got.to_bits(), f64::from(cp[i * ldp + j]).to_bits());
                        }
                    }
                }
            }
        }
    }

    /// The AVX-512 variants compute one FMA chain per output: their bits must agree.
    #[test]
    fn avx512_variants_give_identical_bits() {
        if !Microkernel::Avx512.supported() {
            eprintln!("SKIPPED: this CPU has no AVX-512; nothing to compare");
            return;
        }
        let kdim = 300;
        let mut a = vec![0.0; 2 * kdim * MR];
        let mut b = vec![0.0; 4000];
        fill_uniform(7, &mut a);
        fill_uniform(8, &mut b);
        let mut offsets = TapOffsets::default();
        offsets.fill((0..kdim).map(|k| (k * 131) % 3900));
        let bias: Vec<f32> = (0..32).map(|j| j as f32 * 0.25).collect();
        let n = Microkernel::Avx512Wide.rows_positions();
        let run = |kernel: Microkernel| {
            let mut c = vec![0.0f32; 32 * n];
            for p in 0..32 / kernel.rows_filters() {
                let f = kernel.rows_filters();
                let a = &a[p * kdim * MR..];
                let c = &mut c[p * f * n..];
                let bias = Some(&bias[p * f..]);
                kernel.run_rows(n, a, &offsets, &b, c, n, f, bias, RowsOut::ByFilter);
            }
            c
        };
        let wide = run(Microkernel::Avx512Wide);
        let narrow = run(Microkernel::Avx512);
        assert!(wide
            .iter()
            .zip(&narrow)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn tap_offsets_record_their_length_and_maximum() {
        let mut offsets = TapOffsets::default();
        assert!(offsets.is_empty() && offsets.max() == 0);
        assert_eq!(offsets.as_slice().len(), 0);
        offsets.fill([3, 90, 7].into_iter());
        assert!(!offsets.is_empty());
        assert_eq!((offsets.len(), offsets.max()), (3, 90));
        assert_eq!(offsets.as_slice(), &[3, 90, 7]);
    }

    #[test]
    #[should_panic(expected = "B reads past the planes")]
    fn out_of_bounds_offsets_are_refused() {
        let mut offsets = TapOffsets::default();
        offsets.fill([0, 90].into_iter());
        let mut c = vec![0.0; MR * NR];
        let tile = Tile {
            c: &mut c,
            ldc: NR,
            filters: MR,
            lanes: NR,
        };
        Microkernel::detect().run(
            &[0.0; 2 * MR],
            &offsets,
            0,
            2,
            &[0.0; 100],
            tile,
            Start::Values(&ZEROS),
        );
    }
}
