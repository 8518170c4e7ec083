//! The GPU's arithmetic class, measured: whether GLSL's `fma()` rounds once (fused) or twice,
//! and whether subnormal results are flushed to zero (`shaders/arithmetic.comp`).
//!
//! With the plan that runs (algorithm, tile, split-K, passes: [`super::PlanInfo`]), these fix
//! the output bits of sporkle's kernels, since every output is summed in an order the plan
//! alone decides. The validation harness keys fingerprints by them
//! (`tools/src/golden.rs`), never by a renderer's name: two GPUs, drivers or Mesa builds
//! of one class that run one plan give the same bits.

#![forbid(unsafe_code)]

use super::gl::{Buffer, Fence};
use super::shaders::ProgramCache;
use crate::error::{Error, Result};
use std::rc::Rc;
use std::time::Duration;

/// The probe's shader.
const ARITHMETIC: &str = include_str!("../../shaders/arithmetic.comp");

/// How `fma()` rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fma {
    /// Once: a fused multiply-add.
    Fused,
    /// Twice: the product, then the sum.
    Unfused,
    /// Fused in one form (scalar or vec4) and not in the other.
    Mixed,
}

/// What determines a kernel's rounding on this GPU, besides its plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Arithmetic {
    /// How `fma()` rounds.
    pub fma: Fma,
    /// Whether subnormal results are flushed to zero.
    pub flushes_subnormals: bool,
}

impl Arithmetic {
    /// A short name for keys and reports: `fma`, `mul-add` or `fma-mixed`, then `-ftz` where
    /// subnormals are flushed.
    pub fn name(&self) -> String {
        let fma = match self.fma {
            Fma::Fused => "fma",
            Fma::Unfused => "mul-add",
            Fma::Mixed => "fma-mixed",
        };
        format!("{fma}{}", if self.flushes_subnormals { "-ftz" } else { "" })
    }

    /// Reads the class off the probe's outputs `[scalar fma, vec4 fma, s * s]`.
    fn from_outputs([scalar, vector, square]: [f32; 3]) -> Result<Self> {
        let fused = |v: f32| {
            if v == TWO_POW_M24 {
                Ok(true)
            } else if v == 0.0 {
                Ok(false)
            } else {
                Err(Error::Gpu(format!(
                    "arithmetic probe: fma(1+2^-12, 1+2^-12, -(1+2^-11)) gave {v:e}, \
                     neither 2^-24 (fused) nor 0 (rounded twice)"
                )))
            }
        };
        let fma = match (fused(scalar)?, fused(vector)?) {
            (true, true) => Fma::Fused,
            (false, false) => Fma::Unfused,
            _ => Fma::Mixed,
        };
        let flushes_subnormals = if square == 0.0 {
            true
        } else if square == TWO_POW_M140 {
            false
        } else {
            return Err(Error::Gpu(format!(
                "arithmetic probe: 2^-70 * 2^-70 gave {square:e}, neither 2^-140 nor 0"
            )));
        };
        Ok(Self {
            fma,
            flushes_subnormals,
        })
    }
}

const TWO_POW_M24: f32 = 1.0 / 16_777_216.0;
// 2^-140, a subnormal f32 (the smallest normal is 2^-126).
const TWO_POW_M140: f32 = f32::from_bits(1 << (149 - 140));

/// Runs the probe on the current context.
pub(super) fn probe(
    gl: &Rc<glow::Context>,
    programs: &mut ProgramCache,
    immutable: bool,
    timeout: Duration,
) -> Result<Arithmetic> {
    let a = 1.0 + 1.0 / 4096.0;
    let inputs = [a, a, -(1.0 + 1.0 / 2048.0), 1.0 / (2.0f32).powi(70)];
    let buffer = Buffer::new(gl, 8, immutable)?;
    buffer.upload(&[
        inputs[0], inputs[1], inputs[2], inputs[3], -1.0, -1.0, -1.0, -1.0,
    ])?;
    buffer.bind(0);
    let source = format!("#version 430\n#line 1\n{ARITHMETIC}");
    programs.get(gl, &source)?.dispatch([1, 1, 1])?;
    super::gl::storage_barrier(gl);
    Fence::new(gl)?.wait(timeout)?;
    let mut out = [0.0f32; 8];
    buffer.download(&mut out)?;
    Arithmetic::from_outputs([out[4], out[5], out[6]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe's constants are what its shader's comments say, and the host (which never
    /// contracts `a * b + c` in Rust) rounds twice where `mul_add` rounds once.
    #[test]
    fn the_probe_values_separate_the_classes() {
        let a = 1.0f32 + 1.0 / 4096.0;
        let c = -(1.0f32 + 1.0 / 2048.0);
        assert_eq!(a.mul_add(a, c), TWO_POW_M24);
        assert_eq!(std::hint::black_box(a) * a + c, 0.0);
        let s = 1.0 / (2.0f32).powi(70);
        assert_eq!(s * s, TWO_POW_M140);
        assert!(TWO_POW_M140.is_subnormal());
    }

    #[test]
    fn outputs_name_the_class() {
        let class = |o| Arithmetic::from_outputs(o).unwrap().name();
        assert_eq!(class([TWO_POW_M24, TWO_POW_M24, 0.0]), "fma-ftz");
        assert_eq!(class([0.0, 0.0, TWO_POW_M140]), "mul-add");
        assert_eq!(class([TWO_POW_M24, 0.0, TWO_POW_M140]), "fma-mixed");
        assert!(Arithmetic::from_outputs([1.0, 0.0, 0.0]).is_err());
        assert!(Arithmetic::from_outputs([0.0, 0.0, 1.0]).is_err());
    }
}
