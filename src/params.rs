//! `Conv2dParams`: the description of one 2-D convolution, its validation, output size,
//! buffer lengths and FLOP count.
//!
//! Vocabulary (used the same way in Rust, GLSL, TOML and trial names): `n` images of
//! `c_in` channels of `h × w`; `c_out` filters of `k_h × k_w` over `c_in / groups` channels;
//! `stride = (sh, sw)`, `padding = (ph, pw)` (symmetric per axis), `dilation = (dh, dw)`.
//! Output size per axis: `ho = (h + 2·ph − dh·(k_h − 1) − 1) / sh + 1`.
//!
//! All sizes are computed in 64-bit arithmetic with overflow checks; [`Conv2dParams::validate`]
//! rejects anything whose buffers could not be addressed on this machine.

#![forbid(unsafe_code)]

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Largest element count of one buffer: its byte size must fit an `isize`.
const MAX_ELEMENTS: u64 = (isize::MAX as u64) / 4;

/// One 2-D convolution: shapes and hyper-parameters. Layouts are NCHW / KCRS / NKHW.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Conv2dParams {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels (filters).
    pub c_out: usize,
    /// Kernel height.
    pub k_h: usize,
    /// Kernel width.
    pub k_w: usize,
    /// Stride `(sh, sw)`.
    pub stride: (usize, usize),
    /// Zero padding `(ph, pw)`, applied on both sides of each axis.
    pub padding: (usize, usize),
    /// Dilation `(dh, dw)`.
    pub dilation: (usize, usize),
    /// Groups: `c_in` and `c_out` are split into `groups` independent convolutions.
    pub groups: usize,
}

impl Conv2dParams {
    /// A convolution with stride 1, no padding, no dilation and one group.
    pub fn new(
        n: usize,
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        k_h: usize,
        k_w: usize,
    ) -> Self {
        Self {
            n,
            c_in,
            h,
            w,
            c_out,
            k_h,
            k_w,
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }

    /// Sets the stride `(sh, sw)`.
    pub fn with_stride(mut self, sh: usize, sw: usize) -> Self {
        self.stride = (sh, sw);
        self
    }

    /// Sets the padding `(ph, pw)`.
    pub fn with_padding(mut self, ph: usize, pw: usize) -> Self {
        self.padding = (ph, pw);
        self
    }

    /// Sets the dilation `(dh, dw)`.
    pub fn with_dilation(mut self, dh: usize, dw: usize) -> Self {
        self.dilation = (dh, dw);
        self
    }

    /// Sets the number of groups.
    pub fn with_groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }

    /// Input channels seen by one filter: `c_in / groups`.
    pub fn c_in_per_group(&self) -> usize {
        self.c_in / self.groups.max(1)
    }

    /// Filters per group: `c_out / groups`.
    pub fn c_out_per_group(&self) -> usize {
        self.c_out / self.groups.max(1)
    }

    /// Length of the reduction of one output: `(c_in / groups) · k_h · k_w`.
    pub fn reduction_len(&self) -> usize {
        self.c_in_per_group() * self.k_h * self.k_w
    }

    /// Checks every rule: no zero dimension, stride or dilation; groups divide both channel
    /// counts; the output is not empty; no size overflows.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidParams(msg));
        for (name, v) in [
            ("n", self.n),
            ("c_in", self.c_in),
            ("h", self.h),
            ("w", self.w),
            ("c_out", self.c_out),
            ("k_h", self.k_h),
            ("k_w", self.k_w),
            ("groups", self.groups),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0; every dimension must be at least 1"));
            }
        }
        let (sh, sw) = self.stride;
        let (dh, dw) = self.dilation;
        if sh == 0 || sw == 0 {
            return bad(format!(
                "stride ({sh}, {sw}) has a zero; strides must be at least 1"
            ));
        }
        if dh == 0 || dw == 0 {
            return bad(format!(
                "dilation ({dh}, {dw}) has a zero; dilations must be at least 1"
            ));
        }
        if !self.c_in.is_multiple_of(self.groups) || !self.c_out.is_multiple_of(self.groups) {
            return bad(format!(
                "groups = {} must divide c_in = {} and c_out = {}",
                self.groups, self.c_in, self.c_out
            ));
        }
        self.axis(
            "height",
            self.h,
            self.k_h,
            self.padding.0,
            self.dilation.0,
            self.stride.0,
        )?;
        self.axis(
            "width",
            self.w,
            self.k_w,
            self.padding.1,
            self.dilation.1,
            self.stride.1,
        )?;
        let lens = self.lens().ok_or_else(|| {
            Error::InvalidParams(format!("sizes overflow 64-bit arithmetic: {self}"))
        })?;
        for (what, len) in [
            ("input", lens.input),
            ("weights", lens.weights),
            ("output", lens.output),
        ] {
            if len > MAX_ELEMENTS {
                return bad(format!(
                    "the {what} would have {len} elements, more than this machine can address"
                ));
            }
        }
        if lens.flops.is_none() {
            return bad(format!("the FLOP count overflows 64 bits: {self}"));
        }
        Ok(())
    }

    /// Output size of one axis, with the reason it is empty or overflows.
    fn axis(
        &self,
        name: &str,
        size: usize,
        k: usize,
        pad: usize,
        dil: usize,
        stride: usize,
    ) -> Result<u64> {
        let overflow = || Error::InvalidParams(format!("the {name} arithmetic overflows: {self}"));
        let padded = (size as u64)
            .checked_add((pad as u64).checked_mul(2).ok_or_else(overflow)?)
            .ok_or_else(overflow)?;
        let span = (dil as u64)
            .checked_mul(k as u64 - 1)
            .and_then(|v| v.checked_add(1))
            .ok_or_else(overflow)?;
        if span > padded {
            return Err(Error::InvalidParams(format!(
                "the dilated kernel {name} {span} (kernel {k}, dilation {dil}) is larger than the padded input {name} {padded} (input {size}, padding {pad} each side): the output would be empty"
            )));
        }
        Ok((padded - span) / stride as u64 + 1)
    }

    /// Output height and width `(ho, wo)`. Only meaningful for parameters that pass
    /// [`validate`](Self::validate); for others it returns `(0, 0)` rather than panicking.
    pub fn out_hw(&self) -> (usize, usize) {
        if self.stride.0 == 0 || self.stride.1 == 0 {
            return (0, 0);
        }
        let ho = self.axis(
            "height",
            self.h,
            self.k_h.max(1),
            self.padding.0,
            self.dilation.0,
            self.stride.0,
        );
        let wo = self.axis(
            "width",
            self.w,
            self.k_w.max(1),
            self.padding.1,
            self.dilation.1,
            self.stride.1,
        );
        match (ho, wo) {
            (Ok(ho), Ok(wo)) => (ho as usize, wo as usize),
            _ => (0, 0),
        }
    }

    fn lens(&self) -> Option<Lens> {
        let (ho, wo) = self.out_hw();
        let m = |a: u64, b: usize| a.checked_mul(b as u64);
        let input = m(m(m(self.n as u64, self.c_in)?, self.h)?, self.w)?;
        let kdim = m(m(self.c_in_per_group() as u64, self.k_h)?, self.k_w)?;
        let weights = m(kdim, self.c_out)?;
        let output = m(m(m(self.n as u64, self.c_out)?, ho)?, wo)?;
        let flops = output.checked_mul(kdim).and_then(|v| v.checked_mul(2));
        Some(Lens {
            input,
            weights,
            output,
            flops,
        })
    }

    /// Elements of the input `N×C×H×W` (64-bit; 0 if the sizes overflow).
    pub fn input_len(&self) -> u64 {
        self.lens().map_or(0, |l| l.input)
    }

    /// Elements of the weights `K×(C/G)×R×S`.
    pub fn weights_len(&self) -> u64 {
        self.lens().map_or(0, |l| l.weights)
    }

    /// Elements of the bias `K`.
    pub fn bias_len(&self) -> u64 {
        self.c_out as u64
    }

    /// Elements of the output `N×K×Ho×Wo`.
    pub fn output_len(&self) -> u64 {
        self.lens().map_or(0, |l| l.output)
    }

    /// Floating-point operations of the convolution, counted once:
    /// `2·n·c_out·ho·wo·(c_in/groups)·k_h·k_w`.
    pub fn flops(&self) -> u64 {
        self.lens().and_then(|l| l.flops).unwrap_or(0)
    }

    /// Validates the parameters and checks every buffer length against them.
    pub fn check_buffers(
        &self,
        input: usize,
        weights: usize,
        bias: Option<usize>,
        output: usize,
    ) -> Result<()> {
        self.validate()?;
        let check = |what: &'static str, expected: u64, got: usize| {
            if expected == got as u64 {
                Ok(())
            } else {
                Err(Error::BufferLength {
                    what,
                    expected,
                    got: got as u64,
                })
            }
        };
        check("input", self.input_len(), input)?;
        check("weights", self.weights_len(), weights)?;
        if let Some(b) = bias {
            check("bias", self.bias_len(), b)?;
        }
        check("output", self.output_len(), output)
    }
}

struct Lens {
    input: u64,
    weights: u64,
    output: u64,
    flops: Option<u64>,
}

impl std::fmt::Display for Conv2dParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} c_in={} h={} w={} c_out={} k={}x{} stride={}x{} padding={}x{} dilation={}x{} groups={}",
            self.n,
            self.c_in,
            self.h,
            self.w,
            self.c_out,
            self.k_h,
            self.k_w,
            self.stride.0,
            self.stride.1,
            self.padding.0,
            self.padding.1,
            self.dilation.0,
            self.dilation.1,
            self.groups
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(p: Conv2dParams) -> String {
        p.validate().unwrap_err().to_string()
    }

    #[test]
    fn output_size_follows_the_formula() {
        // ResNet stem: 224, k7, s2, p3 -> 112.
        let p = Conv2dParams::new(1, 3, 224, 224, 64, 7, 7)
            .with_stride(2, 2)
            .with_padding(3, 3);
        p.validate().unwrap();
        assert_eq!(p.out_hw(), (112, 112));
        assert_eq!(p.flops(), 2 * 64 * 112 * 112 * 3 * 49);
        // Per-axis: h uses (sh, ph, dh), w uses (sw, pw, dw).
        let p = Conv2dParams::new(2, 4, 10, 17, 6, 3, 2)
            .with_stride(2, 3)
            .with_padding(1, 0)
            .with_dilation(2, 4)
            .with_groups(2);
        p.validate().unwrap();
        // ho = (10 + 2 - 2*2 - 1)/2 + 1 = 4; wo = (17 - 4 - 1)/3 + 1 = 5
        assert_eq!(p.out_hw(), (4, 5));
        assert_eq!(p.input_len(), 2 * 4 * 10 * 17);
        assert_eq!(p.weights_len(), 6 * 2 * 3 * 2);
        assert_eq!(p.output_len(), 2 * 6 * 4 * 5);
        assert_eq!(p.flops(), 2 * 2 * 6 * 4 * 5 * 2 * 3 * 2);
    }

    #[test]
    fn benchmark_shapes_match_benchmarks_md() {
        // GFLOP column of BENCHMARKS.md (three decimals).
        let cases = [
            (Conv2dParams::new(1, 512, 14, 14, 512, 1, 1), 0.103),
            (
                Conv2dParams::new(32, 256, 56, 56, 256, 3, 3).with_padding(1, 1),
                118.380,
            ),
            (
                Conv2dParams::new(8, 128, 56, 56, 128, 3, 3)
                    .with_stride(2, 2)
                    .with_padding(1, 1),
                1.850,
            ),
        ];
        for (p, gflop) in cases {
            assert!(
                (p.flops() as f64 / 1e9 - gflop).abs() < 6e-4,
                "{p}: {}",
                p.flops()
            );
        }
    }

    #[test]
    fn zero_dimensions_are_rejected_by_name() {
        let base = Conv2dParams::new(1, 3, 8, 8, 4, 3, 3);
        assert!(err(Conv2dParams { n: 0, ..base }).contains("n is 0"));
        assert!(err(Conv2dParams { c_in: 0, ..base }).contains("c_in is 0"));
        assert!(err(Conv2dParams { w: 0, ..base }).contains("w is 0"));
        assert!(err(Conv2dParams { k_w: 0, ..base }).contains("k_w is 0"));
        assert!(err(base.with_groups(0)).contains("groups is 0"));
        assert!(err(base.with_stride(1, 0)).contains("stride"));
        assert!(err(base.with_dilation(0, 1)).contains("dilation"));
    }

    #[test]
    fn groups_must_divide_both_channel_counts() {
        assert!(err(Conv2dParams::new(1, 6, 8, 8, 4, 3, 3).with_groups(3)).contains("groups = 3"));
        assert!(err(Conv2dParams::new(1, 4, 8, 8, 6, 3, 3).with_groups(4)).contains("groups = 4"));
        Conv2dParams::new(1, 6, 8, 8, 6, 3, 3)
            .with_groups(6)
            .validate()
            .unwrap();
    }

    #[test]
    fn empty_output_is_rejected() {
        // Kernel 5 on input 3 with padding 0: empty.
        assert!(err(Conv2dParams::new(1, 1, 3, 3, 1, 5, 5)).contains("empty"));
        // Padding rescues it: 3 + 2·1 = 5.
        Conv2dParams::new(1, 1, 3, 3, 1, 5, 5)
            .with_padding(1, 1)
            .validate()
            .unwrap();
        // Dilation makes a 3-tap kernel span 5.
        assert!(err(Conv2dParams::new(1, 1, 4, 4, 1, 3, 3).with_dilation(2, 2)).contains("empty"));
        // The kernel exactly as large as the padded input gives 1×1.
        let p = Conv2dParams::new(1, 1, 4, 4, 1, 6, 6).with_padding(1, 1);
        assert_eq!(p.out_hw(), (1, 1));
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        let big = usize::MAX / 2;
        assert!(err(Conv2dParams::new(big, big, 4, 4, 1, 1, 1)).contains("overflow"));
        assert!(
            err(Conv2dParams::new(1, 1, 4, 4, 1, 1, 1).with_padding(usize::MAX, 0))
                .contains("overflow")
        );
        // 2^62 elements: representable in u64, but more than a byte-addressed f32 buffer can hold.
        assert!(
            err(Conv2dParams::new(1 << 21, 1 << 21, 1 << 20, 1, 1, 1, 1))
                .contains("more than this machine can address")
        );
        // Invalid parameters never panic in the size helpers either.
        let p = Conv2dParams::new(big, big, big, big, big, 1, 1);
        assert_eq!(p.input_len(), 0);
        assert_eq!(p.flops(), 0);
    }

    #[test]
    fn buffer_lengths_are_checked() {
        let p = Conv2dParams::new(2, 3, 5, 5, 4, 3, 3).with_padding(1, 1);
        p.check_buffers(150, 108, Some(4), 200).unwrap();
        let e = p
            .check_buffers(149, 108, None, 200)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("input has 149 elements") && e.contains("need 150"),
            "{e}"
        );
        assert!(p
            .check_buffers(150, 108, Some(3), 200)
            .unwrap_err()
            .to_string()
            .contains("bias"));
        assert!(p
            .check_buffers(150, 108, None, 201)
            .unwrap_err()
            .to_string()
            .contains("output"));
        assert!(p
            .check_buffers(150, 107, None, 200)
            .unwrap_err()
            .to_string()
            .contains("weights"));
    }
}
