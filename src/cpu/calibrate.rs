//! Which microkernel this CPU runs, chosen by measurement once per process, never by a model
//! or vendor name: every supported variant runs the same small rows problem (B in L2, A
//! streaming, as in a convolution), interleaved over a few rounds; the fastest round of each
//! counts and the fastest variant wins. Beside it, the core's FMA peak is measured with a
//! register-only loop (`fma_peak_threads`, on one thread there, on all of a backend's threads
//! at once for reports), so reports can say what fraction of the machine a shape reaches.
//! Takes about 30 ms, on the first thread that asks.

use super::kernel::{fma_peak, Microkernel, RowsOut, TapOffsets, FMA_LOOP_FLOPS, MR};
use std::sync::OnceLock;
use std::time::Instant;

/// What the calibration measured (one core) and chose.
#[derive(Clone, Debug)]
pub struct Calibration {
    /// The register-only FMA peak of one core, GFLOP/s; `None` without AVX-512 (no SIMD loop
    /// is measured for the portable kernel).
    pub fma_peak_gflops: Option<f64>,
    /// Each supported variant's rate on the calibration problem, GFLOP/s, fastest first.
    pub rates: Vec<(Microkernel, f64)>,
    /// The fastest variant: what [`Microkernel::detect`] returns.
    pub chosen: Microkernel,
}

impl Calibration {
    /// One line for reports: the choice and the measured rates.
    pub fn describe(&self) -> String {
        let rates: Vec<String> = (self.rates.iter())
            .map(|(k, r)| format!("{} {r:.0}", k.name()))
            .collect();
        let peak = match self.fma_peak_gflops {
            Some(p) => format!("; FMA peak {p:.0} GFLOP/s per core"),
            None => String::new(),
        };
        format!(
            "{} (fastest measured here, GFLOP/s on one core: {}{peak})",
            self.chosen.name(),
            rates.join(", ")
        )
    }
}

/// The process's calibration, measured on first use.
pub fn calibration() -> &'static Calibration {
    static CALIBRATION: OnceLock<Calibration> = OnceLock::new();
    CALIBRATION.get_or_init(measure)
}

/// Taps of the calibration problem (a 3×3 layer of 32 channels).
const TAPS: usize = 288;
/// Interleaved rounds; the best of each variant counts.
const ROUNDS: usize = 7;
/// Rows-tile calls (14 positions × 32 filters) per round.
const CALLS: usize = 200;

fn measure() -> Calibration {
    let kernels: Vec<Microkernel> = (Microkernel::ALL.into_iter())
        .filter(|k| k.supported())
        .collect();
    // Two panels of weights, B spread over 48 KiB like a convolution's taps.
    let a: Vec<f32> = (0..2 * TAPS * MR).map(|i| (i % 7) as f32 * 0.125).collect();
    let b: Vec<f32> = (0..12 * 1024).map(|i| (i % 5) as f32 * 0.25).collect();
    let mut offsets = TapOffsets::default();
    offsets.fill((0..TAPS).map(|k| (k * 173) % (b.len() - 32)));
    let n = 14;
    let mut c = vec![0.0f32; 2 * MR * n];
    let flops = (2 * TAPS * 2 * MR * n * CALLS) as f64;
    let mut best = vec![0.0f64; kernels.len()];
    for _ in 0..ROUNDS {
        for (kernel, best) in kernels.iter().zip(&mut best) {
            let per_call = kernel.rows_filters();
            let start = Instant::now();
            for call in 0..CALLS {
                for p in 0..2 * MR / per_call {
                    let b = &b[(call % 16)..];
                    let c = &mut c[p * per_call * n..];
                    let a = &a[p * TAPS * MR..];
                    kernel.run_rows(n, a, &offsets, b, c, n, per_call, None, RowsOut::ByFilter);
                }
            }
            let rate = flops / start.elapsed().as_secs_f64().max(1e-9) / 1e9;
            *best = best.max(rate);
        }
    }
    std::hint::black_box(&c);
    let mut rates: Vec<(Microkernel, f64)> = kernels.into_iter().zip(best).collect();
    rates.sort_by(|x, y| y.1.total_cmp(&x.1));
    let chosen = rates.first().map_or(Microkernel::Portable, |r| r.0);
    Calibration {
        fma_peak_gflops: fma_peak_threads(1),
        rates,
        chosen,
    }
}

/// The FMA peak of `threads` cores at once, GFLOP/s in all: the register-only loop on that
/// many threads started together, the best of a few rounds (each round's rate: the FLOPs of
/// every thread over the slowest thread's time). Where two threads share a core, or the
/// machine's cores slow down when busy together, this is less than `threads` times the
/// one-core peak; it is what a call on `threads` threads can reach. `None` without AVX-512.
pub fn fma_peak_threads(threads: usize) -> Option<f64> {
    let threads = threads.max(1);
    let iters = 1_000_000;
    let barrier = std::sync::Barrier::new(threads);
    let mut best: Option<f64> = None;
    for _ in 0..ROUNDS {
        let slowest = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        let start = Instant::now();
                        std::hint::black_box(fma_peak(std::hint::black_box(iters))?);
                        Some(start.elapsed().as_secs_f64())
                    })
                })
                .collect();
            let times: Option<Vec<f64>> = handles
                .into_iter()
                .map(|h| h.join().expect("the FMA loop does not panic"))
                .collect();
            times.map(|t| t.into_iter().fold(0.0, f64::max))
        })?;
        let rate = (threads * iters * FMA_LOOP_FLOPS) as f64 / slowest.max(1e-9) / 1e9;
        best = Some(best.map_or(rate, |b: f64| b.max(rate)));
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_choice_is_supported_and_the_fastest_measured() {
        let c = calibration();
        assert!(c.chosen.supported());
        assert_eq!(c.rates[0].0, c.chosen);
        assert!(c.rates.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(c.rates.iter().all(|(k, r)| k.supported() && *r > 0.0));
        let supported = Microkernel::ALL.iter().filter(|k| k.supported()).count();
        assert_eq!(c.rates.len(), supported, "every supported variant measured");
        assert_eq!(c.fma_peak_gflops.is_some(), Microkernel::Avx512.supported());
        assert!(c.describe().starts_with(c.chosen.name()));
        // The rates count the calibration's FLOPs: the chosen kernel runs at a sizeable
        // fraction of the FMA peak measured beside it (a quarter to a half here, test build
        // or release) and cannot beat it (loose bounds, both best of a few rounds: the
        // machine may be shared; a mutation sample found a miscounted FLOP total uncaught).
        if let Some(peak) = c.fma_peak_gflops {
            let rate = c.rates[0].1;
            assert!(
                rate > 0.05 * peak && rate < 1.5 * peak,
                "{rate} GFLOP/s against a peak of {peak}"
            );
        }
    }

    /// The peak of several threads at once: one thread reads about the one-core peak, two at
    /// most two cores' worth (loose: the machine may be shared, and other tests run beside this
    /// one, so two threads may share one core here and read as one).
    #[test]
    fn the_peak_of_threads_at_once_counts_every_thread() {
        let Some(core) = calibration().fma_peak_gflops else {
            assert_eq!(
                fma_peak_threads(2),
                None,
                "no AVX-512: no SIMD loop to time"
            );
            return;
        };
        let one = fma_peak_threads(1).expect("AVX-512 here");
        assert!(one > 0.3 * core && one < 1.5 * core, "{one} against {core}");
        let two = fma_peak_threads(2).expect("AVX-512 here");
        assert!(
            two > 0.3 * core && two < 2.0 * 1.5 * core,
            "{two} against {core} per core"
        );
    }
}
