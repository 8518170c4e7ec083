//! Shader sources (`shaders/*.comp`, built in with `include_str!`), their specialisation by
//! `#version` and `#define`s prepended from Rust, tile-variant choice, and a program cache
//! keyed by the full specialised source.

#![forbid(unsafe_code)]

use super::gl::Program;
use crate::error::Result;
use crate::params::Conv2dParams;
use std::collections::HashMap;
use std::rc::Rc;

/// The fast tiled implicit-GEMM convolution (groups of 16 or more filters).
pub const CONV2D_TILED: &str = include_str!("../../shaders/conv2d_tiled.comp");
/// The implicit-GEMM convolution for narrow and depthwise groups.
pub const CONV2D_NARROW: &str = include_str!("../../shaders/conv2d_narrow.comp");

/// Which shader a tile variant runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `conv2d_tiled.comp`: vec4 shared-memory tiles, register double buffering.
    Tiled,
    /// `conv2d_narrow.comp`: scalar tiles of any size.
    Narrow,
}

/// A tile variant of the convolution shader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    /// The shader.
    pub kernel: Kernel,
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
        use Kernel::{Narrow, Tiled};
        if p.c_out_per_group() >= 16 {
            if let Some(tile) = Self::from_env() {
                return tile;
            }
        }
        // Measured on the H100 (SPORKLE_GPU_TILE sweeps over shapes #5-#10 of BENCHMARKS.md):
        // 64x64x16 with 4x4 per thread is best or within 10% of best on every wide shape there;
        // 128-wide tiles with 8x8 per thread were slower with this GLSL compiler.
        match p.c_out_per_group() {
            64.. => Tile {
                kernel: Tiled,
                bm: 64,
                bn: 64,
                bk: 16,
                tm: 4,
                tn: 4,
            },
            16..=63 => Tile {
                kernel: Narrow,
                bm: 16,
                bn: 128,
                bk: 16,
                tm: 2,
                tn: 4,
            },
            2..=15 => Tile {
                kernel: Narrow,
                bm: 4,
                bn: 64,
                bk: 16,
                tm: 1,
                tn: 1,
            },
            _ => Tile {
                kernel: Narrow,
                bm: 1,
                bn: 256,
                bk: 16,
                tm: 1,
                tn: 1,
            },
        }
    }

    /// The tuning override `SPORKLE_GPU_TILE=kernel:BMxBNxBK:TMxTN` (e.g. `narrow:64x64x16:4x4`)
    /// for groups of 16 or more filters, read once. An invalid value is reported and ignored.
    pub fn from_env() -> Option<Self> {
        static TILE: std::sync::OnceLock<Option<Tile>> = std::sync::OnceLock::new();
        *TILE.get_or_init(|| {
            let v = std::env::var("SPORKLE_GPU_TILE").ok()?;
            match Self::parse(&v) {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!("sporkle: ignoring SPORKLE_GPU_TILE={v:?}: {e}");
                    None
                }
            }
        })
    }

    /// Parses `kernel:BMxBNxBK:TMxTN` and checks the shader's constraints.
    pub fn parse(v: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = v.split(':').collect();
        let nums = |s: &str| -> std::result::Result<Vec<u32>, String> {
            s.split('x')
                .map(|n| {
                    n.parse::<u32>()
                        .map_err(|_| format!("{n:?} is not a number"))
                })
                .collect()
        };
        let (kernel, b, t) = match parts.as_slice() {
            [k, b, t] => (*k, nums(b)?, nums(t)?),
            _ => return Err("expected kernel:BMxBNxBK:TMxTN".into()),
        };
        let kernel = match kernel {
            "tiled" => Kernel::Tiled,
            "narrow" => Kernel::Narrow,
            k => return Err(format!("unknown kernel {k:?} (tiled or narrow)")),
        };
        let (&[bm, bn, bk], &[tm, tn]) = (b.as_slice(), t.as_slice()) else {
            return Err("expected 3 tile and 2 thread sizes".into());
        };
        let tile = Tile {
            kernel,
            bm,
            bn,
            bk,
            tm,
            tn,
        };
        let threads = if tm > 0 && tn > 0 { tile.threads() } else { 0 };
        if [bm, bn, bk, tm, tn].contains(&0) || bm % tm != 0 || bn % tn != 0 || threads > 1024 {
            return Err(format!(
                "{tile:?}: sizes must be positive, BM % TM = BN % TN = 0, at most 1024 threads"
            ));
        }
        if kernel == Kernel::Tiled
            && (tm % 4 != 0 || tn % 4 != 0 || threads % bm != 0 || threads % bn != 0)
        {
            return Err(format!("{tile:?}: the tiled kernel needs TM, TN multiples of 4 and threads a multiple of BM and BN"));
        }
        if tile.shared_bytes() > 32 << 10 {
            return Err(format!(
                "{tile:?}: {} bytes of shared memory, more than 32 KiB",
                tile.shared_bytes()
            ));
        }
        Ok(tile)
    }

    /// Threads per workgroup.
    pub fn threads(&self) -> u32 {
        (self.bm / self.tm) * (self.bn / self.tn)
    }

    /// Shared memory per workgroup, bytes.
    pub fn shared_bytes(&self) -> u32 {
        4 * self.bk * (self.bm + self.bn)
    }

    /// Workgroups for a convolution. The tiled kernel takes filter tiles on x and position
    /// tiles on y (tiles sharing an input window run together); the narrow kernel the reverse.
    pub fn groups(&self, p: &Conv2dParams) -> [u64; 3] {
        let (ho, wo) = p.out_hw();
        let positions = ((p.n * ho * wo) as u64).div_ceil(u64::from(self.bn));
        let filters = (p.c_out_per_group() as u64).div_ceil(u64::from(self.bm));
        match self.kernel {
            Kernel::Tiled => [filters, positions, p.groups as u64],
            Kernel::Narrow => [positions, filters, p.groups as u64],
        }
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
    s.push_str(match tile.kernel {
        Kernel::Tiled => CONV2D_TILED,
        Kernel::Narrow => CONV2D_NARROW,
    });
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
