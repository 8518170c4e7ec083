//! The GEMM microkernels: blocks of outputs accumulated over `kc` taps, with B (the phase
//! planes, see `planes.rs`) read through a tap-offset table (implicit GEMM). `A` is a packed
//! weight panel (`[kc][16]`, 16 filters innermost). Two orientations:
//!
//! - **strips** ([`Microkernel::run`]): 16 filters × 16 consecutive positions of the output grid,
//!   `C[i][j] (+)= Σ_k A[k][i] · B[offs[k] + j]`; positions in the vector lanes, filters
//!   broadcast. Junk columns of the grid and the rounding of a tile to 16 are computed too.
//! - **rows** ([`Microkernel::run_rows`]): `n ≤ 16` consecutive *valid* positions of one output
//!   row × 16 filters, `C[j][i] = Σ_k B[offs[k] + i] · A[k][j]` over every tap; filters in the
//!   vector lanes, positions broadcast, the tile transposed on its one store. Nothing is
//!   computed twice or for nothing.
//!
//! Two implementations with one contract: AVX-512 intrinsics (16 zmm accumulators, the A values
//! broadcast from memory), and a portable one in plain Rust for every other machine. The safe
//! entry point [`Microkernel::run`] checks every bound once per call, in O(1), through
//! [`TapOffsets`], whose construction proves that no offset exceeds its recorded maximum;
//! this file holds the crate's only CPU `unsafe`.

/// Rows of A (filters) and columns of B (output positions) in one microkernel call.
pub const MR: usize = 16;
/// See [`MR`].
pub const NR: usize = 16;

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

/// Which instruction set the microkernel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Microkernel {
    /// AVX-512F intrinsics (checked at run time).
    Avx512,
    /// Plain Rust; the compiler vectorises it for the baseline target.
    Portable,
}

impl Microkernel {
    /// The fastest kernel this CPU supports.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Microkernel::Avx512;
        }
        Microkernel::Portable
    }

    /// Name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Microkernel::Avx512 => "avx512",
            Microkernel::Portable => "portable",
        }
    }

    /// Rows orientation, over every tap:
    /// `C[j·ldc + i] = Σ_k b[offs[k] + i] · a[k·16 + j] (+ bias[j])` for `i < n ≤ 16` positions
    /// and `j < filters ≤ 16`. The tile is accumulated in registers over all taps (one vector of
    /// A per tap streams well from L2) and stored transposed, so each filter's `n` outputs are
    /// contiguous; rows `j ≥ filters` are computed but not stored.
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
    ) {
        let kdim = offsets.len();
        assert!((1..=NR).contains(&n), "microkernel: {n} positions per call");
        assert!(
            (1..=MR).contains(&filters),
            "microkernel: {filters} filters per call"
        );
        assert!(a.len() >= kdim * MR, "microkernel: A panel too short");
        assert!(
            offsets.max() + n <= b.len(),
            "microkernel: B reads past the planes"
        );
        assert!(
            ldc >= n && (filters - 1) * ldc + n <= c.len(),
            "microkernel: C tile out of bounds"
        );
        let mut bias16 = [0.0f32; MR];
        if let Some(bias) = bias {
            bias16[..filters].copy_from_slice(&bias[..filters]);
        }
        let offs = offsets.as_slice();
        /// Dispatches to the instance for the runtime `n` (the accumulator count is a constant).
        macro_rules! by_n {
            ($f:ident, $($args:expr),*) => {
                match n {
                    1 => $f::<1>($($args),*), 2 => $f::<2>($($args),*), 3 => $f::<3>($($args),*),
                    4 => $f::<4>($($args),*), 5 => $f::<5>($($args),*), 6 => $f::<6>($($args),*),
                    7 => $f::<7>($($args),*), 8 => $f::<8>($($args),*), 9 => $f::<9>($($args),*),
                    10 => $f::<10>($($args),*), 11 => $f::<11>($($args),*), 12 => $f::<12>($($args),*),
                    13 => $f::<13>($($args),*), 14 => $f::<14>($($args),*), 15 => $f::<15>($($args),*),
                    _ => $f::<16>($($args),*),
                }
            };
        }
        match self {
            #[cfg(target_arch = "x86_64")]
            Microkernel::Avx512 => {
                assert!(
                    std::arch::is_x86_feature_detected!("avx512f"),
                    "AVX-512 kernel on a CPU without it"
                );
                let (a, offs, b, c) = (a.as_ptr(), offs.as_ptr(), b.as_ptr(), c.as_mut_ptr());
                use avx512::rows;
                // SAFETY: the CPU has AVX-512F (checked above); A reads kdim·16 floats (a.len()
                // checked), B reads offs[k]+0..n with every offset ≤ offsets.max() and
                // max+n ≤ b.len(), C writes j·ldc+0..n for j < filters with
                // (filters−1)·ldc+n ≤ c.len().
                unsafe { by_n!(rows, kdim, a, offs, b, c, ldc, filters, &bias16) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Microkernel::Avx512 => unreachable!("AVX-512 kernel selected on a non-x86 CPU"),
            Microkernel::Portable => {
                by_n!(portable_rows, kdim, a, offs, b, c, ldc, filters, &bias16)
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
            Microkernel::Avx512 => {
                assert!(
                    std::arch::is_x86_feature_detected!("avx512f"),
                    "AVX-512 kernel on a CPU without it"
                );
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
            Microkernel::Avx512 => unreachable!("AVX-512 kernel selected on a non-x86 CPU"),
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

#[allow(clippy::too_many_arguments)]
fn portable_rows<const N: usize>(
    kdim: usize,
    a: &[f32],
    offs: &[usize],
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    filters: usize,
    bias: &[f32; MR],
) {
    let mut acc = [*bias; N];
    for (ak, &off) in a.chunks_exact(MR).zip(offs).take(kdim) {
        for (row, &bi) in acc.iter_mut().zip(&b[off..off + N]) {
            for (r, &aj) in row.iter_mut().zip(ak) {
                *r += bi * aj;
            }
        }
    }
    store_transposed(&acc, c, ldc, filters);
}

/// Stores filters `0..filters` of an `N×16` tile (positions × filters) as rows of `c` with
/// pitch `ldc`.
#[inline(always)]
fn store_transposed<const N: usize>(
    acc: &[[f32; MR]; N],
    c: &mut [f32],
    ldc: usize,
    filters: usize,
) {
    for j in 0..filters {
        for (dst, src) in c[j * ldc..j * ldc + N].iter_mut().zip(acc) {
            *dst = src[j];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// How many taps ahead B rows are prefetched (each tap is about 16 cycles of FMAs).
    const PREFETCH: usize = 8;

    /// The AVX-512 body of [`super::Microkernel::run`]; see there for the contract.
    ///
    /// # Safety
    /// The CPU supports AVX-512F; `a` is valid for `kc·16` reads; `offs` for `kc` reads;
    /// `b` for reads at `offs[k] + 0..16`; `c` for reads and writes at `i·ldc + 0..lanes`,
    /// `i < filters`; `lanes ≤ 16`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn kernel(
        kc: usize,
        a: *const f32,
        offs: *const usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        filters: usize,
        lanes: usize,
        start: super::Start,
    ) {
        let mask: __mmask16 = ((1u32 << lanes) - 1) as __mmask16;
        let mut acc = [_mm512_setzero_ps(); MR];
        for (i, v) in acc.iter_mut().enumerate() {
            *v = match start {
                super::Start::Values(s) => _mm512_set1_ps(s[i]),
                // SAFETY: row i < filters of C, lanes under the mask, is in bounds (caller's contract).
                super::Start::Accumulate if i < filters => unsafe {
                    _mm512_maskz_loadu_ps(mask, c.add(i * ldc))
                },
                super::Start::Accumulate => _mm512_setzero_ps(),
            };
        }
        for k in 0..kc {
            // The B rows of a tap table jump between planes, which hardware prefetchers do not
            // follow: ask for the row PREFETCH taps ahead (a hint; wrapping_add keeps the
            // address computation defined, and prefetches never fault).
            // SAFETY: min(k + PREFETCH, kc − 1) < kc, so the offset read is in bounds.
            let ahead = unsafe { *offs.add((k + PREFETCH).min(kc - 1)) };
            _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(ahead).cast::<i8>());
            // SAFETY: k < kc, so offs[k], the 16 floats of B at offs[k] and A's row k are in bounds.
            let (bv, ak) = unsafe { (_mm512_loadu_ps(b.add(*offs.add(k))), a.add(k * MR)) };
            for (i, v) in acc.iter_mut().enumerate() {
                // SAFETY: i < 16 = MR, inside A's row k.
                let av = unsafe { _mm512_set1_ps(*ak.add(i)) };
                *v = _mm512_fmadd_ps(av, bv, *v);
            }
        }
        for (i, v) in acc.iter().enumerate().take(filters) {
            // SAFETY: row i < filters of C, lanes under the mask, is in bounds (caller's contract).
            unsafe { _mm512_mask_storeu_ps(c.add(i * ldc), mask, *v) };
        }
        debug_assert_eq!(NR, 16);
    }

    /// The AVX-512 body of [`super::Microkernel::run_rows`] for `N` positions.
    ///
    /// # Safety
    /// The CPU supports AVX-512F; `a` is valid for `kdim·16` reads; `offs` for `kdim` reads;
    /// `b` for reads at `offs[k] + 0..N`; `c` for writes at `j·ldc + 0..N`, `j < filters ≤ 16`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows<const N: usize>(
        kdim: usize,
        a: *const f32,
        offs: *const usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        filters: usize,
        bias: &[f32; MR],
    ) {
        // SAFETY: bias is 16 floats.
        let mut acc = [unsafe { _mm512_loadu_ps(bias.as_ptr()) }; N];
        for k in 0..kdim {
            // SAFETY: k < kdim: A's row k and offs[k] are in bounds, and so are the N floats of B
            // at offs[k] (caller's contract).
            let (av, bk) = unsafe { (_mm512_loadu_ps(a.add(k * MR)), b.add(*offs.add(k))) };
            for (i, v) in acc.iter_mut().enumerate() {
                // SAFETY: i < N, inside the N floats of B at offs[k].
                let bv = unsafe { _mm512_set1_ps(*bk.add(i)) };
                *v = _mm512_fmadd_ps(bv, av, *v);
            }
        }
        // Transpose through a small stack tile: N vector stores, then `filters` rows of N.
        let mut tile = [[0.0f32; MR]; N];
        for (row, v) in tile.iter_mut().zip(&acc) {
            // SAFETY: row is 16 floats.
            unsafe { _mm512_storeu_ps(row.as_mut_ptr(), *v) };
        }
        for j in 0..filters {
            for (i, row) in tile.iter().enumerate() {
                // SAFETY: j < filters and i < N: inside row j of C (caller's contract).
                unsafe { *c.add(j * ldc + i) = row[j] };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fill_uniform;

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
        for kernel in [Microkernel::detect(), Microkernel::Portable] {
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
                        assert!((got - expect).abs() < 1e-4, "{kernel:?} ({i},{j})");
                    }
                }
            }
        }
    }

    #[test]
    fn every_rows_kernel_matches_the_naive_product() {
        let kdim = 29;
        let mut a = vec![0.0; kdim * MR];
        let mut b = vec![0.0; 400];
        fill_uniform(5, &mut a);
        fill_uniform(6, &mut b);
        let mut offsets = TapOffsets::default();
        offsets.fill((0..kdim).map(|k| (k * 53) % 380));
        let offs = offsets.as_slice();
        for kernel in [Microkernel::detect(), Microkernel::Portable] {
            for n in 1..=NR {
                let ldc = n + 3;
                let filters = 17 - n;
                let bias: Vec<f32> = (0..filters).map(|j| j as f32).collect();
                let mut c = vec![f32::NAN; (filters - 1) * ldc + n];
                kernel.run_rows(n, &a, &offsets, &b, &mut c, ldc, filters, Some(&bias));
                for i in 0..n {
                    for j in 0..filters {
                        let want: f64 = (0..kdim)
                            .map(|k| f64::from(b[offs[k] + i]) * f64::from(a[k * MR + j]))
                            .sum();
                        let got = f64::from(c[j * ldc + i]);
                        assert!(
                            (got - want - j as f64).abs() < 1e-4,
                            "{kernel:?} n={n} ({i},{j})"
                        );
                    }
                }
            }
        }
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
