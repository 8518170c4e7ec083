//! Shader sources (`shaders/*.comp`, built in with `include_str!`), their specialisation by
//! `#version` and `#define`s prepended from Rust, tile-variant choice, and a program cache
//! keyed by the full specialised source.

#![forbid(unsafe_code)]

use super::gl::Program;
use crate::error::Result;
use crate::params::Conv2dParams;
use std::collections::HashMap;
use std::rc::Rc;

/// The tiled implicit-GEMM convolution.
pub const CONV2D: &str = include_str!("../../shaders/conv2d.comp");

/// A tile variant of the convolution shader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    /// Filters per workgroup.
    pub bm: u32,
    /// Output positions per workgroup.
    pub bn: u32,
    /// Taps per shared-memory step.
    pub bk: u32,
    /// Filters per thread.
    pub tm: u32,
    /// Positions per thread.
    pub tn: u32,
}

impl Tile {
    /// The variant for a shape: wide tiles when a group has many filters, thin ones for
    /// narrow and depthwise groups (where a wide tile would compute mostly nothing).
    pub fn for_params(p: &Conv2dParams) -> Self {
        match p.c_out_per_group() {
            64.. => Tile {
                bm: 64,
                bn: 64,
                bk: 16,
                tm: 4,
                tn: 4,
            },
            16..=63 => Tile {
                bm: 16,
                bn: 128,
                bk: 16,
                tm: 2,
                tn: 4,
            },
            2..=15 => Tile {
                bm: 4,
                bn: 64,
                bk: 16,
                tm: 1,
                tn: 1,
            },
            _ => Tile {
                bm: 1,
                bn: 256,
                bk: 16,
                tm: 1,
                tn: 1,
            },
        }
    }

    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        (self.bm / self.tm) * (self.bn / self.tn)
    }

    /// Shared memory per workgroup, bytes.
    pub fn shared_bytes(&self) -> u32 {
        4 * self.bk * (self.bm + self.bn)
    }

    /// Workgroups for a convolution: positions, filters, groups.
    pub fn groups(&self, p: &Conv2dParams) -> [u64; 3] {
        let (ho, wo) = p.out_hw();
        let positions = (p.n * ho * wo) as u64;
        [
            positions.div_ceil(u64::from(self.bn)),
            (p.c_out_per_group() as u64).div_ceil(u64::from(self.bm)),
            p.groups as u64,
        ]
    }
}

/// The specialised source of the convolution for a shape and tile.
pub fn conv2d_source(p: &Conv2dParams, tile: Tile, bias: bool) -> String {
    let (ho, wo) = p.out_hw();
    let mut s = String::from("#version 430\n");
    let mut def = |name: &str, v: String| s.push_str(&format!("#define {name} {v}\n"));
    for (name, v) in [
        ("BM", tile.bm),
        ("BN", tile.bn),
        ("BK", tile.bk),
        ("TM", tile.tm),
        ("TN", tile.tn),
    ] {
        def(name, format!("{v}u"));
    }
    def("THREADS", tile.threads().to_string());
    for (name, v) in [
        ("N", p.n),
        ("C_IN", p.c_in),
        ("H", p.h),
        ("W", p.w),
        ("C_OUT", p.c_out),
        ("K_H", p.k_h),
        ("K_W", p.k_w),
        ("SH", p.stride.0),
        ("SW", p.stride.1),
        ("PH", p.padding.0),
        ("PW", p.padding.1),
        ("DH", p.dilation.0),
        ("DW", p.dilation.1),
        ("GROUPS", p.groups),
        ("HO", ho),
        ("WO", wo),
    ] {
        def(name, format!("{v}u"));
    }
    def("HAS_BIAS", u8::from(bias).to_string());
    s.push_str("#line 1\n");
    s.push_str(CONV2D);
    s
}

/// Compiled programs by their full source; lives with the context.
#[derive(Default)]
pub struct ProgramCache {
    programs: HashMap<String, Program>,
}

impl ProgramCache {
    /// The program for `source`, compiled on first use.
    pub fn get(&mut self, gl: &Rc<glow::Context>, source: String) -> Result<&Program> {
        if !self.programs.contains_key(&source) {
            let program = Program::compute(gl, &source)?;
            self.programs.insert(source.clone(), program);
        }
        Ok(&self.programs[&source])
    }

    /// Programs held.
    pub fn len(&self) -> usize {
        self.programs.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.programs.is_empty()
    }
}
