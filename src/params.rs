//! `Conv2dParams`: the description of one 2-D convolution, its validation, output size,
//! buffer lengths and FLOP count.
//!
//! Vocabulary (used the same way in Rust, GLSL, TOML and trial names): `n` images of
//! `c_in` channels of `h × w`; `c_out` filters of `k_h × k_w` over `c_in / groups` channels;
//! `stride = (sh, sw)`, `padding = (ph, pw)` before each axis (top, left) and
//! `padding_end = (pb, pr)` after it (bottom, right), equal in the common symmetric case;
//! `dilation = (dh, dw)`. Output size per axis: `ho = (h + ph + pb − dh·(k_h − 1) − 1) / sh + 1`.
//! Only the leading padding moves the windows (output `y` reads input rows from `y·sh − ph`);
//! the trailing padding only adds output rows, so every path honours it by its output size.
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
    /// Zero padding `(ph, pw)` before each axis: top and left.
    pub padding: (usize, usize),
    /// Zero padding `(pb, pr)` after each axis: bottom and right (equal to `padding` when
    /// symmetric, as [`with_padding`](Self::with_padding) sets it).
    pub padding_end: (usize, usize),
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
            padding_end: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }

    /// Sets the stride `(sh, sw)`.
    pub fn with_stride(mut self, sh: usize, sw: usize) -> Self {
        self.stride = (sh, sw);
        self
    }

    /// Sets symmetric padding: `ph` above and below, `pw` left and right.
    pub fn with_padding(mut self, ph: usize, pw: usize) -> Self {
        self.padding = (ph, pw);
        self.padding_end = (ph, pw);
        self
    }

    /// Sets padding per side: `top`, `left`, `bottom`, `right` (ONNX's `pads` order is
    /// `[top, left, bottom, right]` too).
    pub fn with_pads(mut self, top: usize, left: usize, bottom: usize, right: usize) -> Self {
        self.padding = (top, left);
        self.padding_end = (bottom, right);
        self
    }

    /// Padding per side: `[top, left, bottom, right]`.
    pub fn pads(&self) -> [usize; 4] {
        let ((t, l), (b, r)) = (self.padding, self.padding_end);
        [t, l, b, r]
    }

    /// Whether both sides of each axis are padded alike.
    pub fn is_symmetric(&self) -> bool {
        self.padding == self.padding_end
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
            (self.padding.0, self.padding_end.0),
            self.dilation.0,
            self.stride.0,
        )?;
        self.axis(
            "width",
            self.w,
            self.k_w,
            (self.padding.1, self.padding_end.1),
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
        (before, after): (usize, usize),
        dil: usize,
        stride: usize,
    ) -> Result<u64> {
        let overflow = || Error::InvalidParams(format!("the {name} arithmetic overflows: {self}"));
        let padded = (size as u64)
            .checked_add(before as u64)
            .and_then(|v| v.checked_add(after as u64))
            .ok_or_else(overflow)?;
        let span = (dil as u64)
            .checked_mul(k as u64 - 1)
            .and_then(|v| v.checked_add(1))
            .ok_or_else(overflow)?;
        if span > padded {
            return Err(Error::InvalidParams(format!(
                "the dilated kernel {name} {span} (kernel {k}, dilation {dil}) is larger than the padded input {name} {padded} (input {size}, padding {before} before and {after} after): the output would be empty"
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
            (self.padding.0, self.padding_end.0),
            self.dilation.0,
            self.stride.0,
        );
        let wo = self.axis(
            "width",
            self.w,
            self.k_w.max(1),
            (self.padding.1, self.padding_end.1),
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

    /// Elements of the input `n×c_in×h×w`, as buffers are sized (0 if the sizes overflow or
    /// do not fit this machine's addresses, which [`validate`](Self::validate) refuses).
    pub fn input_len(&self) -> usize {
        self.lens().map_or(0, |l| addressable(l.input))
    }

    /// Elements of the weights `c_out×(c_in/groups)×k_h×k_w`.
    pub fn weights_len(&self) -> usize {
        self.lens().map_or(0, |l| addressable(l.weights))
    }

    /// Elements of the bias `K`.
    pub fn bias_len(&self) -> usize {
        self.c_out
    }

    /// Elements of the output `n×c_out×ho×wo`.
    pub fn output_len(&self) -> usize {
        self.lens().map_or(0, |l| addressable(l.output))
    }

    /// Floating-point operations of the convolution, counted once:
    /// `2·n·c_out·ho·wo·(c_in/groups)·k_h·k_w`.
    pub fn flops(&self) -> u64 {
        self.lens().and_then(|l| l.flops).unwrap_or(0)
    }

    /// [`Conv2dParams::check_buffers`] of the slices a call is given.
    pub fn check_slices(
        &self,
        input: &[f32],
        weights: &[f32],
        bias: Option<&[f32]>,
        output: &[f32],
    ) -> Result<()> {
        self.check_buffers(
            input.len(),
            weights.len(),
            bias.map(<[f32]>::len),
            output.len(),
        )
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
        let check = |what: &'static str, expected: usize, got: usize| {
            if expected == got {
                Ok(())
            } else {
                Err(Error::BufferLength {
                    what,
                    expected: expected as u64,
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

/// Padding as a caller gives it: numbers per side, or a rule that deduces them from the shape
/// (ONNX's `auto_pad`, TensorFlow's `SAME`, PyTorch's `'same'` and `'valid'`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaddingSpec {
    /// `[top, left, bottom, right]`.
    Pads([usize; 4]),
    /// ONNX `SAME_UPPER` (TensorFlow's `SAME`; PyTorch's `'same'` at stride 1): the output is
    /// `ceil(in / stride)` per axis, and an odd total pads one more after than before.
    Same,
    /// ONNX `SAME_LOWER`: as `Same`, the odd one before.
    SameLower,
    /// No padding.
    Valid,
}

impl PaddingSpec {
    /// Parses `P`, `PH,PW`, `T,L,B,R`, `same`, `same-lower` or `valid`; a wrong count of numbers
    /// names the forms expected.
    pub fn parse(v: &str) -> std::result::Result<Self, String> {
        match v.trim().to_ascii_lowercase().as_str() {
            "same" | "same-upper" | "same_upper" => return Ok(Self::Same),
            "same-lower" | "same_lower" => return Ok(Self::SameLower),
            "valid" => return Ok(Self::Valid),
            _ => {}
        }
        let nums = v
            .split(',')
            .map(|n| {
                n.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("{:?} in {v:?} is not a non-negative integer", n.trim()))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Self::from_numbers(&nums).map_err(|e| format!("{v:?}: {e}"))
    }

    /// From 1 (`P`), 2 (`PH, PW`) or 4 (`T, L, B, R`) numbers.
    pub fn from_numbers(nums: &[usize]) -> std::result::Result<Self, String> {
        match *nums {
            [p] => Ok(Self::Pads([p, p, p, p])),
            [ph, pw] => Ok(Self::Pads([ph, pw, ph, pw])),
            [t, l, b, r] => Ok(Self::Pads([t, l, b, r])),
            _ => Err(format!(
                "padding takes 1, 2 or 4 numbers (P, PH,PW or T,L,B,R), not {}; or same, same-lower, valid",
                nums.len()
            )),
        }
    }

    /// `p` with this padding (the rules read its sizes, kernel, stride and dilation).
    pub fn apply(self, p: Conv2dParams) -> Conv2dParams {
        let axis = |size: usize, k: usize, s: usize, d: usize| {
            let out = size.div_ceil(s.max(1));
            let span = d * k.saturating_sub(1) + 1;
            ((out.saturating_sub(1)) * s + span).saturating_sub(size)
        };
        let split = |total: usize, lower: bool| {
            let small = total / 2;
            if lower {
                (total - small, small)
            } else {
                (small, total - small)
            }
        };
        match self {
            Self::Pads([t, l, b, r]) => p.with_pads(t, l, b, r),
            Self::Valid => p.with_pads(0, 0, 0, 0),
            Self::Same | Self::SameLower => {
                let lower = self == Self::SameLower;
                let (t, b) = split(axis(p.h, p.k_h, p.stride.0, p.dilation.0), lower);
                let (l, r) = split(axis(p.w, p.k_w, p.stride.1, p.dilation.1), lower);
                p.with_pads(t, l, b, r)
            }
        }
    }
}

/// `v` as a length, or 0 where it is more than this machine can address.
fn addressable(v: u64) -> usize {
    usize::try_from(v)
        .ok()
        .filter(|&n| n as u64 <= MAX_ELEMENTS)
        .unwrap_or(0)
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
            "n={} c_in={} h={} w={} c_out={} k={}x{} stride={}x{} padding={} dilation={}x{} groups={}",
            self.n,
            self.c_in,
            self.h,
            self.w,
            self.c_out,
            self.k_h,
            self.k_w,
            self.stride.0,
            self.stride.1,
            // Symmetric as before (fingerprints hold this text); per side otherwise.
            if self.is_symmetric() {
                format!("{}x{}", self.padding.0, self.padding.1)
            } else {
                let [t, l, b, r] = self.pads();
                format!("{t},{l},{b},{r}")
            },
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

    /// Padding per side: the output follows both sides, only the leading one is shown apart
    /// when uneven, and the rules give ONNX's SAME_UPPER / SAME_LOWER / VALID.
    #[test]
    fn padding_per_side_and_rules() {
        let p = Conv2dParams::new(1, 1, 9, 8, 1, 3, 3).with_pads(0, 1, 2, 1);
        assert_eq!(p.out_hw(), (9, 8));
        assert!(!p.is_symmetric());
        assert!(p.to_string().contains("padding=0,1,2,1"));
        let sym = Conv2dParams::new(1, 1, 9, 8, 1, 3, 3).with_padding(1, 2);
        assert!(sym.is_symmetric() && sym.to_string().contains("padding=1x2"));
        assert_eq!(sym.pads(), [1, 2, 1, 2]);
        let e = err(Conv2dParams::new(1, 1, 2, 2, 1, 5, 1).with_pads(1, 0, 1, 0));
        assert!(e.contains("padding 1 before and 1 after"), "{e}");
        let parse = |v: &str| PaddingSpec::parse(v);
        assert_eq!(parse("2"), Ok(PaddingSpec::Pads([2, 2, 2, 2])));
        assert_eq!(parse("1,2"), Ok(PaddingSpec::Pads([1, 2, 1, 2])));
        assert_eq!(parse("0,1,0,1"), Ok(PaddingSpec::Pads([0, 1, 0, 1])));
        assert_eq!(parse("SAME"), Ok(PaddingSpec::Same));
        assert_eq!(parse("same-lower"), Ok(PaddingSpec::SameLower));
        assert_eq!(parse("valid"), Ok(PaddingSpec::Valid));
        assert!(parse("1,2,3").unwrap_err().contains("1, 2 or 4 numbers"));
        assert!(parse("-1")
            .unwrap_err()
            .contains("not a non-negative integer"));
        // SAME: the output is ceil(in / stride) on every axis, dilation included; an odd total
        // goes after (UPPER) or before (LOWER).
        for (h, k, s, d) in [
            (7, 2, 1, 1),
            (11, 4, 2, 1),
            (13, 3, 2, 2),
            (5, 1, 3, 1),
            (6, 5, 1, 3),
        ] {
            let base = Conv2dParams::new(1, 1, h, h, 1, k, k)
                .with_stride(s, s)
                .with_dilation(d, d);
            let upper = PaddingSpec::Same.apply(base);
            let lower = PaddingSpec::SameLower.apply(base);
            assert_eq!(upper.out_hw().0, h.div_ceil(s), "{upper}");
            assert_eq!(lower.out_hw().0, h.div_ceil(s), "{lower}");
            let [t, _, b, _] = upper.pads();
            assert!(b == t || b == t + 1, "{upper}");
            assert_eq!(lower.pads()[0], b);
            assert_eq!(lower.pads()[2], t);
        }
        let v = PaddingSpec::Valid.apply(sym);
        assert_eq!(v.pads(), [0; 4]);
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
