//! The AVX-512 microkernels (x86-64 only): the strips and rows orientations, the F(4×4) tile
//! store and the FMA peak loop, each behind its safe wrapper in the parent module, which checks
//! every bound its `# Safety` section names.

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
        // C's rows, one a tap over the first 16: the stores at the end then find their lines in
        // L1 instead of each waiting for a read for ownership (output planes are written once,
        // far apart, and rarely cached: exp1x1 n8 +15% here).
        _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(k.min(MR - 1) * ldc).cast::<i8>());
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

/// The AVX-512 body of [`super::Microkernel::run_rows`] for `N` positions and `P` panels
/// (`N·P` accumulators, `P` vectors of A per tap, the B values broadcast from memory).
///
/// # Safety
/// The CPU supports AVX-512F; `a` is valid for reads at `p·a_stride + k·16 + 0..16` for
/// `p < P`, `k < kdim`; `offs` for `kdim` reads; `b` for reads at `offs[k] + 0..N`; `c` for
/// writes at `j·ldc + 0..N`, `j < filters ≤ 16·P` (by filter) or `i·ldc + 0..filters`,
/// `i < N` (by position).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn rows<const N: usize, const P: usize>(
    kdim: usize,
    a: *const f32,
    a_stride: usize,
    offs: *const usize,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    filters: usize,
    bias: &[f32; 2 * MR],
    out: super::RowsOut,
) {
    let mut start = [_mm512_setzero_ps(); P];
    for (p, v) in start.iter_mut().enumerate() {
        // SAFETY: p < P ≤ 2: 16 floats inside the 32 of bias.
        *v = unsafe { _mm512_loadu_ps(bias.as_ptr().add(p * MR)) };
    }
    let mut acc = [start; N];
    // C's lines, one a tap over the first 2·16·P taps (both ends of each filter's N
    // positions): the stores at the end then find them in L1 instead of each waiting for a
    // read for ownership, which made a pointwise layer's stores cost as much as its FMAs
    // (exp1x1 n8 on the rows kernel 1.4x faster with it, stems 1.05-1.4x). A loop of its own,
    // so that the other taps pay nothing for it.
    let c_lines = match out {
        super::RowsOut::ByFilter => kdim.min(2 * P * MR),
        super::RowsOut::ByPosition => 0,
    };
    // One tap of those, with its line of C asked for.
    let c_line_tap = |k: usize, acc: &mut [[__m512; P]; N]| {
        let line = (k / 2) * ldc + (k % 2) * (N - 1);
        _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(line).cast::<i8>());
        let ahead = Some((k + PREFETCH).min(kdim - 1));
        // SAFETY: k < c_lines ≤ kdim and ahead < kdim (the caller's contract covers the taps).
        unsafe { rows_tap(k, ahead, a, a_stride, offs, b, acc) };
    };
    let mut k = 0;
    while k + 2 <= c_lines {
        c_line_tap(k, &mut acc);
        c_line_tap(k + 1, &mut acc);
        k += 2;
    }
    if k < c_lines {
        c_line_tap(k, &mut acc);
    }
    // The other taps two at a time too, and the last PREFETCH without a prefetch (nothing is
    // left to ask for): the scalar work of a tap (its loop step, the clamp of the tap ahead)
    // competes for the FMA ports of cores where 512-bit FMAs use two, and this halves it (on
    // one Emerald Rapids core the calibration problem 160-163 -> 172-173 GFLOP/s; 2 threads,
    // 3 interleaved rounds, ratio to onnxruntime: stem n1 0.998 -> 1.094, pw1x1 0.948 ->
    // 1.030, geomean of the ten 1.189 -> 1.239).
    let main_end = kdim.saturating_sub(PREFETCH).max(c_lines);
    let mut k = c_lines;
    while k + 2 <= main_end {
        // SAFETY: the loop runs only where main_end = kdim − PREFETCH, so k + 1 < kdim and the
        // taps ahead, k + 1 + PREFETCH < kdim.
        unsafe {
            rows_tap(k, Some(k + PREFETCH), a, a_stride, offs, b, &mut acc);
            rows_tap(
                k + 1,
                Some(k + 1 + PREFETCH),
                a,
                a_stride,
                offs,
                b,
                &mut acc,
            );
        }
        k += 2;
    }
    for k in k..kdim {
        // SAFETY: k < kdim.
        unsafe { rows_tap(k, None, a, a_stride, offs, b, &mut acc) };
    }
    if out == super::RowsOut::ByPosition {
        for (i, vs) in acc.iter().enumerate() {
            for (p, v) in vs.iter().enumerate() {
                let lanes = filters.saturating_sub(p * MR).min(MR);
                let mask: __mmask16 = ((1u32 << lanes) - 1) as __mmask16;
                // SAFETY: i < N and the lanes under the mask are filters < `filters`:
                // inside row i of C (caller's contract).
                unsafe { _mm512_mask_storeu_ps(c.add(i * ldc + p * MR), mask, *v) };
            }
        }
        return;
    }
    // Each panel's N×16 block transposed in registers (padded to 16×16), then one masked
    // store of N positions per filter.
    let positions: __mmask16 = ((1u32 << N) - 1) as __mmask16;
    for p in 0..P {
        let mut r = [_mm512_setzero_ps(); 16];
        for (v, vs) in r.iter_mut().zip(&acc) {
            *v = vs[p];
        }
        transpose16(&mut r);
        let lanes = filters.saturating_sub(p * MR).min(MR);
        for (j, v) in r.iter().enumerate().take(lanes) {
            // SAFETY: filter p·16 + j < filters and the N lanes under the mask: inside row
            // p·16 + j of C (caller's contract).
            unsafe { _mm512_mask_storeu_ps(c.add((p * MR + j) * ldc), positions, *v) };
        }
    }
}

/// One tap of [`rows`]: `acc[i][p] += b[offs[k] + i] · a[p·a_stride + k·16..][..16]`, with the
/// B row of tap `ahead` asked for, if any.
///
/// # Safety
/// As [`rows`], and `k < kdim`, `ahead < kdim`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn rows_tap<const N: usize, const P: usize>(
    k: usize,
    ahead: Option<usize>,
    a: *const f32,
    a_stride: usize,
    offs: *const usize,
    b: *const f32,
    acc: &mut [[__m512; P]; N],
) {
    let mut av = [_mm512_setzero_ps(); P];
    for (p, v) in av.iter_mut().enumerate() {
        // SAFETY: p < P and k < kdim: panel p's row k (caller's contract).
        *v = unsafe { _mm512_loadu_ps(a.add(p * a_stride + k * MR)) };
    }
    // B rows jump between planes: ask for the one PREFETCH taps ahead, both its lines (as in
    // `kernel`; stem n1 and l2 n8 +10-25% here).
    if let Some(ahead) = ahead {
        // SAFETY: ahead < kdim (the caller's contract), so the offset read is in bounds.
        let ahead = unsafe { *offs.add(ahead) };
        _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(ahead).cast::<i8>());
        _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(ahead + N - 1).cast::<i8>());
    }
    // SAFETY: k < kdim: offs[k] is in bounds, and so are the N floats of B at offs[k].
    let bk = unsafe { b.add(*offs.add(k)) };
    for (i, row) in acc.iter_mut().enumerate() {
        // SAFETY: i < N, inside the N floats of B at offs[k].
        let bv = unsafe { _mm512_set1_ps(*bk.add(i)) };
        for (v, &a) in row.iter_mut().zip(&av) {
            *v = _mm512_fmadd_ps(bv, a, *v);
        }
    }
}

/// See [`super::store_tiles4x4`].
///
/// # Safety
/// The CPU supports AVX-512F; `y` is valid for reads of `filters` floats at `r·ldy` for
/// `r < 16`; each of `dst[..filters]` is valid for writes at `i·wo + 0..4`, `i < 4`.
#[target_feature(enable = "avx512f")]
pub unsafe fn store_tiles4x4(
    y: *const f32,
    ldy: usize,
    bias: &[f32; 16],
    dst: &[*mut f32; 16],
    filters: usize,
    wo: usize,
) {
    let mask: __mmask16 = ((1u32 << filters) - 1) as __mmask16;
    let mut r = [_mm512_setzero_ps(); 16];
    for (row, v) in r.iter_mut().enumerate() {
        // SAFETY: row < 16, the lanes under the mask are < filters (caller's contract).
        *v = unsafe { _mm512_maskz_loadu_ps(mask, y.add(row * ldy)) };
    }
    transpose16(&mut r);
    for (f, (v, &d)) in r.iter().zip(dst).take(filters).enumerate() {
        // Lane 4i + j of v is output (i, j) of filter f: four rows of four.
        let v = _mm512_add_ps(*v, _mm512_set1_ps(bias[f]));
        // SAFETY: f < filters: d is valid for writes at i·wo + 0..4 (caller's contract).
        unsafe {
            _mm_storeu_ps(d, _mm512_extractf32x4_ps::<0>(v));
            _mm_storeu_ps(d.add(wo), _mm512_extractf32x4_ps::<1>(v));
            _mm_storeu_ps(d.add(2 * wo), _mm512_extractf32x4_ps::<2>(v));
            _mm_storeu_ps(d.add(3 * wo), _mm512_extractf32x4_ps::<3>(v));
        }
    }
}

/// 16 lanes of a [`super::Lanes`] computation. Only the AVX-512 functions of this file make
/// one, so its operations run only where the CPU has AVX-512F.
#[derive(Clone, Copy)]
pub struct Z(__m512);

impl std::ops::Add for Z {
    type Output = Z;
    #[inline(always)]
    fn add(self, o: Z) -> Z {
        // SAFETY: a Z exists only inside AVX-512 functions (see the type).
        Z(unsafe { _mm512_add_ps(self.0, o.0) })
    }
}

impl std::ops::Sub for Z {
    type Output = Z;
    #[inline(always)]
    fn sub(self, o: Z) -> Z {
        // SAFETY: a Z exists only inside AVX-512 functions (see the type).
        Z(unsafe { _mm512_sub_ps(self.0, o.0) })
    }
}

impl std::ops::Mul<f32> for Z {
    type Output = Z;
    #[inline(always)]
    fn mul(self, k: f32) -> Z {
        // SAFETY: a Z exists only inside AVX-512 functions (see the type).
        Z(unsafe { _mm512_mul_ps(self.0, _mm512_set1_ps(k)) })
    }
}

impl super::Lanes for Z {}

/// See [`super::transform_rows`]: 16 lanes a step, the last step masked.
///
/// # Safety
/// The CPU supports AVX-512F; each of `d` is valid for reading `n` floats and each of `v` for
/// writing `n` floats, and no output row overlaps an input row.
#[target_feature(enable = "avx512f")]
pub unsafe fn transform_rows<F: super::RowTransform<I, O>, const I: usize, const O: usize>(
    d: [*const f32; I],
    v: [*mut f32; O],
    n: usize,
) {
    for j in (0..n).step_by(16) {
        let mask: __mmask16 = ((1u32 << (n - j).min(16)) - 1) as __mmask16;
        // SAFETY: lanes j..min(j + 16, n) under the mask, inside each row (caller's contract).
        let x: [Z; I] =
            std::array::from_fn(|i| Z(unsafe { _mm512_maskz_loadu_ps(mask, d[i].add(j)) }));
        for (row, y) in v.iter().zip(F::apply::<Z>(x)) {
            // SAFETY: as above, on the output rows.
            unsafe { _mm512_mask_storeu_ps(row.add(j), mask, y.0) };
        }
    }
}

/// Transposes a 16×16 block held as 16 rows: afterwards `r[l]` lane `i` is the old `r[i]`
/// lane `l` (unpacks, then 128-bit lane shuffles).
#[target_feature(enable = "avx512f")]
fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        r[4 * i] = _mm512_shuffle_ps::<0x44>(a, c);
        r[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(a, c);
        r[4 * i + 2] = _mm512_shuffle_ps::<0x44>(b, d);
        r[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(b, d);
    }
    for h in 0..2 {
        for j in 0..4 {
            let (a, b) = (r[8 * h + j], r[8 * h + 4 + j]);
            t[8 * h + j] = _mm512_shuffle_f32x4::<0x88>(a, b);
            t[8 * h + 4 + j] = _mm512_shuffle_f32x4::<0xDD>(a, b);
        }
    }
    for j in 0..8 {
        r[j] = _mm512_shuffle_f32x4::<0x88>(t[j], t[8 + j]);
        r[8 + j] = _mm512_shuffle_f32x4::<0xDD>(t[j], t[8 + j]);
    }
}

/// Nothing but register FMAs, `iters·16` of them, 16 lanes each: the loop behind
/// [`super::fma_peak`].
///
/// # Safety
/// The CPU supports AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn fma_loop(iters: usize) -> f32 {
    // 16 independent chains: enough to cover FMA latency on two ports.
    let mut acc = [_mm512_set1_ps(1.0); 16];
    let m = _mm512_set1_ps(0.999_9);
    let add = _mm512_set1_ps(1e-6);
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, m, add);
        }
    }
    let mut sum = _mm512_setzero_ps();
    for v in acc {
        sum = _mm512_add_ps(sum, v);
    }
    _mm512_reduce_add_ps(sum)
}
