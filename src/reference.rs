//! The naive reference convolution: the oracle every backend is checked against.
//!
//! Plain loops over the definition, f64 accumulation, no `unsafe`, no threads, no cleverness.
//! For each output it also returns the *magnitude* `Σ|x·w| + |b|`, which the tolerance policy
//! ([`crate::tolerance`]) scales its bound by.

#![forbid(unsafe_code)]

use crate::error::Result;
use crate::params::Conv2dParams;

/// Index of one output element: image, output channel, row, column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutIndex {
    /// Image.
    pub n: usize,
    /// Output channel.
    pub k: usize,
    /// Output row.
    pub y: usize,
    /// Output column.
    pub x: usize,
}

impl OutIndex {
    /// The element at flat position `i` of an `n×c_out×ho×wo` output.
    pub fn from_flat(p: &Conv2dParams, i: usize) -> Self {
        let (ho, wo) = p.out_hw();
        Self {
            n: i / (p.c_out * ho * wo),
            k: i / (ho * wo) % p.c_out,
            y: i / wo % ho,
            x: i % wo,
        }
    }

    /// Flat position in an `n×c_out×ho×wo` output.
    pub fn flat(&self, p: &Conv2dParams) -> usize {
        let (ho, wo) = p.out_hw();
        ((self.n * p.c_out + self.k) * ho + self.y) * wo + self.x
    }
}

impl std::fmt::Display for OutIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "(n={}, k={}, y={}, x={})",
            self.n, self.k, self.y, self.x
        )
    }
}

/// One output computed by the reference: the exact-as-f64 value and its magnitude.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RefValue {
    /// `Σ x·w + b`, accumulated in f64.
    pub value: f64,
    /// `Σ |x·w| + |b|`: the scale of the rounding error any fp32 evaluation may make.
    pub magnitude: f64,
}

/// The whole reference output.
#[derive(Clone, Debug, PartialEq)]
pub struct RefOutput {
    /// `n×c_out×ho×wo` values in f64.
    pub value: Vec<f64>,
    /// The matching magnitudes.
    pub magnitude: Vec<f64>,
}

impl RefOutput {
    /// The values rounded to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        self.value.iter().map(|&v| v as f32).collect()
    }
}

/// Computes one output element straight from the definition.
/// The caller has checked the buffers (`Conv2dParams::check_buffers`).
pub fn output_at(
    p: &Conv2dParams,
    input: &[f32],
    weights: &[f32],
    bias: Option<&[f32]>,
    at: OutIndex,
) -> RefValue {
    let cg = p.c_in_per_group();
    let kg = p.c_out_per_group();
    let group = at.k / kg;
    let (mut value, mut magnitude) = match bias {
        Some(b) => (f64::from(b[at.k]), f64::from(b[at.k]).abs()),
        None => (0.0, 0.0),
    };
    for ci in 0..cg {
        let c = group * cg + ci;
        for r in 0..p.k_h {
            // Input row = y·sh − ph + r·dh; outside [0, h) it is padding (zero).
            let iy = (at.y * p.stride.0 + r * p.dilation.0) as i64 - p.padding.0 as i64;
            if iy < 0 || iy >= p.h as i64 {
                continue;
            }
            for s in 0..p.k_w {
                let ix = (at.x * p.stride.1 + s * p.dilation.1) as i64 - p.padding.1 as i64;
                if ix < 0 || ix >= p.w as i64 {
                    continue;
                }
                let xv =
                    f64::from(input[((at.n * p.c_in + c) * p.h + iy as usize) * p.w + ix as usize]);
                let wv = f64::from(weights[((at.k * cg + ci) * p.k_h + r) * p.k_w + s]);
                value += xv * wv;
                magnitude += (xv * wv).abs();
            }
        }
    }
    RefValue { value, magnitude }
}

/// The whole convolution by the definition, in f64, with magnitudes.
pub fn conv2d_f64(
    p: &Conv2dParams,
    input: &[f32],
    weights: &[f32],
    bias: Option<&[f32]>,
) -> Result<RefOutput> {
    whole(p, (input, weights, bias), |at| {
        output_at(p, input, weights, bias, at)
    })
}

/// The whole output of `p`, `value_at` each output, once the buffers `(input, weights, bias)`
/// are checked against `p` (the direct reference here, and Winograd's magnitudes).
pub fn whole(
    p: &Conv2dParams,
    (input, weights, bias): (&[f32], &[f32], Option<&[f32]>),
    value_at: impl Fn(OutIndex) -> RefValue,
) -> Result<RefOutput> {
    let len = p.output_len();
    p.check_buffers(input.len(), weights.len(), bias.map(<[f32]>::len), len)?;
    let (value, magnitude) = (0..len)
        .map(|i| {
            let r = value_at(OutIndex::from_flat(p, i));
            (r.value, r.magnitude)
        })
        .unzip();
    Ok(RefOutput { value, magnitude })
}

/// The whole convolution by the definition, rounded to f32.
pub fn conv2d(
    p: &Conv2dParams,
    input: &[f32],
    weights: &[f32],
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    Ok(conv2d_f64(p, input, weights, bias)?.to_f32())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_3x3_with_padding_and_bias() {
        // 1 image, 1 channel 3×3 = 1..9, one 3×3 filter of ones, padding 1, bias 0.5.
        let p = Conv2dParams::new(1, 1, 3, 3, 1, 3, 3).with_padding(1, 1);
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let y = conv2d(&p, &x, &[1.0; 9], Some(&[0.5])).unwrap();
        // Corner (0,0) sums 1+2+4+5; centre sums all 45.
        assert_eq!(
            y,
            vec![12.5, 21.5, 16.5, 27.5, 45.5, 33.5, 24.5, 39.5, 28.5]
        );
    }

    #[test]
    fn stride_dilation_and_groups_by_hand() {
        // 2 channels, 2 groups (depthwise), 1×5 input, kernel 1×2, dilation 2, stride 2.
        let p = Conv2dParams::new(1, 2, 1, 5, 2, 1, 2)
            .with_dilation(1, 2)
            .with_stride(1, 2)
            .with_groups(2);
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0];
        let w = [1.0, -1.0, 2.0, 1.0];
        // wo = (5 − 2 − 1)/2 + 1 = 2; channel 0: x0−x2, x2−x4; channel 1: 2·x0+x2, 2·x2+x4.
        assert_eq!(
            conv2d(&p, &x, &w, None).unwrap(),
            vec![-2.0, -2.0, 50.0, 110.0]
        );
    }

    #[test]
    fn magnitude_sums_absolute_products() {
        let p = Conv2dParams::new(1, 1, 1, 2, 1, 1, 2);
        let r = conv2d_f64(&p, &[3.0, -4.0], &[2.0, 1.0], Some(&[-1.0])).unwrap();
        assert_eq!(r.value, vec![1.0]);
        assert_eq!(r.magnitude, vec![11.0]);
    }

    #[test]
    fn bad_lengths_are_errors() {
        let p = Conv2dParams::new(1, 1, 3, 3, 1, 3, 3);
        assert!(conv2d(&p, &[0.0; 8], &[0.0; 9], None).is_err());
        assert!(conv2d(&p, &[0.0; 9], &[0.0; 9], Some(&[])).is_err());
    }

    #[test]
    fn flat_index_round_trips() {
        let p = Conv2dParams::new(2, 3, 6, 7, 5, 2, 3);
        for i in 0..p.output_len() {
            assert_eq!(OutIndex::from_flat(&p, i).flat(&p), i);
        }
    }
}
