//! Deterministic test data: seeded fills used by tests, benchmarks and the validation suites,
//! so that a failing case can be reproduced from its seed alone.

#![forbid(unsafe_code)]

/// SplitMix64: a tiny, well-mixed generator; quality is ample for test data.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    pub fn next_f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Uniform in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }
}

/// Fills with values uniform in `[-1, 1)`.
pub fn fill_uniform(seed: u64, out: &mut [f32]) {
    let mut g = SplitMix64::new(seed);
    out.iter_mut().for_each(|v| *v = g.next_f32());
}

/// Fills with integers in `-range..=range`: with them every partial sum of a convolution is an
/// exactly representable integer (while `K·range² < 2²⁴`), so any summation order is exact.
pub fn fill_small_ints(seed: u64, range: i32, out: &mut [f32]) {
    let mut g = SplitMix64::new(seed);
    let span = (2 * range + 1) as u64;
    out.iter_mut()
        .for_each(|v| *v = (g.below(span) as i32 - range) as f32);
}

/// Input, weights and bias for parameters `p`, seeded; `exact` picks small integers.
pub fn conv_data(
    p: &crate::Conv2dParams,
    seed: u64,
    exact: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut x = vec![0.0; p.input_len()];
    let mut w = vec![0.0; p.weights_len()];
    let mut b = vec![0.0; p.bias_len()];
    if exact {
        fill_small_ints(seed, 3, &mut x);
        fill_small_ints(seed ^ 0x5151, 3, &mut w);
        fill_small_ints(seed ^ 0xB1A5, 8, &mut b);
    } else {
        fill_uniform(seed, &mut x);
        fill_uniform(seed ^ 0x5151, &mut w);
        fill_uniform(seed ^ 0xB1A5, &mut b);
    }
    (x, w, b)
}
