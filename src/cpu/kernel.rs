//! The GEMM microkernels: a 16×16 block of outputs (16 filters × 16 output positions)
//! accumulated over `kc` taps, with B read through a tap-offset table (implicit GEMM).
//!
//! `C[i][j] (+)= Σ_k A[k][i] · B[offs[k] + j]` for `i, j < 16`, where `A` is a packed weight
//! panel (`[kc][16]`, filters innermost) and `B` is the phase-plane buffer (see `planes.rs`).
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

    /// `C[i·ldc + j] (+)= Σ_{k<kc} a[k·16 + i] · b[offs[k0 + k] + j]` for `i, j < 16`.
    ///
    /// `accumulate` adds to C instead of overwriting it.
    /// Panics (a bug in the caller) if any access would leave its slice.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        self,
        a: &[f32],
        offsets: &TapOffsets,
        k0: usize,
        kc: usize,
        b: &[f32],
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
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
            ldc >= NR && (MR - 1) * ldc + NR <= c.len(),
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
                // offset ≤ offsets.max() and max+16 ≤ b.len(), C touches rows i·ldc+0..16 for i < 16
                // with 15·ldc+16 ≤ c.len().
                unsafe {
                    avx512::kernel(
                        kc,
                        a.as_ptr(),
                        offs.as_ptr(),
                        b.as_ptr(),
                        c.as_mut_ptr(),
                        ldc,
                        accumulate,
                    )
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Microkernel::Avx512 => unreachable!("AVX-512 kernel selected on a non-x86 CPU"),
            Microkernel::Portable => portable(kc, a, offs, b, c, ldc, accumulate),
        }
    }
}

fn portable(
    kc: usize,
    a: &[f32],
    offs: &[usize],
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[0.0f32; NR]; MR];
    if accumulate {
        for (i, row) in acc.iter_mut().enumerate() {
            row.copy_from_slice(&c[i * ldc..i * ldc + NR]);
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
    for (i, row) in acc.iter().enumerate() {
        c[i * ldc..i * ldc + NR].copy_from_slice(row);
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
    /// `b` for reads at `offs[k] + 0..16`; `c` for reads and writes at `i·ldc + 0..16`, `i < 16`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel(
        kc: usize,
        a: *const f32,
        offs: *const usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [_mm512_setzero_ps(); MR];
        if accumulate {
            for (i, v) in acc.iter_mut().enumerate() {
                // SAFETY: row i of C is in bounds (caller's contract).
                *v = unsafe { _mm512_loadu_ps(c.add(i * ldc)) };
            }
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
        for (i, v) in acc.iter().enumerate() {
            // SAFETY: row i of C is in bounds (caller's contract).
            unsafe { _mm512_storeu_ps(c.add(i * ldc), *v) };
        }
        debug_assert_eq!(NR, 16);
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
        for kernel in [Microkernel::detect(), Microkernel::Portable] {
            let ldc = 20;
            let mut c = vec![f32::NAN; 15 * ldc + NR];
            kernel.run(&a, &offsets, 0, kc, &b, &mut c, ldc, false);
            // Accumulating a second pass doubles the result.
            kernel.run(&a, &offsets, 0, kc, &b, &mut c, ldc, true);
            for i in 0..MR {
                for j in 0..NR {
                    let got = f64::from(c[i * ldc + j]);
                    assert!(
                        (got - 2.0 * want[i * NR + j]).abs() < 1e-4,
                        "{kernel:?} ({i},{j})"
                    );
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
        Microkernel::detect().run(
            &[0.0; 2 * MR],
            &offsets,
            0,
            2,
            &[0.0; 100],
            &mut c,
            NR,
            false,
        );
    }
}
