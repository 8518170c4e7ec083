//! Plans: what one convolution runs on this GPU, chosen once per shape and kept.
//!
//! The choice policy lives here: the algorithm ([`Algorithm::for_params`]: Winograd F(2×2, 3×3)
//! or the direct implicit GEMM), the tile variant and its split-K ([`Tile::for_params`]), each
//! overridable by a knob (`SPORKLE_GPU_ALGO`, `SPORKLE_GPU_TILE`). A [`Plan`] is a shape checked
//! against the GL limits, its passes' specialised sources compiled; [`Planner::encode`] records
//! one on buffers the caller binds ([`Bindings`]). The executor and the worker's kernel-timing
//! path both run plans; neither chooses anything itself.

#![forbid(unsafe_code)]

use super::context::GpuInfo;
use super::gl::{self, Buffer};
use super::knob::knob;
use super::shaders::{
    self, ProgramCache, StreamCopy, CONV2D_NARROW, CONV2D_TILED, WINOGRAD_VARIANT,
};
use crate::error::{Error, Result};
use crate::params::Conv2dParams;
use std::collections::HashMap;
use std::rc::Rc;

/// Workgroups that keep a large GPU busy (the H100 has 132 SMs, two resident workgroups each);
/// shapes with fewer output tiles split the taps (split-K) to reach it.
const BUSY_WORKGROUPS: u64 = 264;
/// At most this many slices of the taps.
const MAX_SPLIT: u64 = 16;

/// Parts a large job's batch runs in along n with CUDA copies, by default (see
/// `Planner::parts`): the first part's convolution starts while the rest is still copied
/// in, and its copy out while the rest convolves, which shortens a stream's start and end.
pub const PARTS: usize = 2;

/// Parts wanted from `SPORKLE_STREAM_PARTS` (1 to 16; see `Planner::parts`), if set.
pub fn parts_from_env() -> Option<usize> {
    knob("SPORKLE_STREAM_PARTS", |v| match v.parse::<usize>() {
        Ok(n) if (1..=16).contains(&n) => Ok(n),
        _ => Err("expected 1 to 16 parts".into()),
    })
}

/// The least bytes in and out of a job that runs in [`PARTS`] parts by default: below, a
/// part's copies would be too short to be worth their own waits.
pub const PARTS_MIN_BYTES: usize = 8 << 20;

/// Which shader a tile variant runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `conv2d_tiled.comp`: vec4 shared-memory tiles, register double buffering.
    Tiled,
    /// `conv2d_narrow.comp`: scalar tiles of any size.
    Narrow,
}

/// A tile variant of the convolution shader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// Slices of the taps (split-K, tiled kernel only; 1: none).
    pub split: u32,
}

impl Tile {
    /// The variant for a shape: wide tiles when a group has many filters, thin ones for
    /// narrow and depthwise groups (where a wide tile would compute mostly nothing).
    pub fn for_params(p: &Conv2dParams) -> Self {
        let tile = match p.c_out_per_group() {
            16.. => Self::from_env().unwrap_or_else(|| Self::wide(p)),
            2..=15 => Self::narrow(4, 64, 1, 1),
            _ => Self::narrow(1, 256, 1, 1),
        };
        tile.with_split(p)
    }

    /// The default for groups of 16 or more filters.
    fn wide(p: &Conv2dParams) -> Self {
        let tiled = |bm, bn, bk, tm, tn| Tile {
            kernel: Kernel::Tiled,
            bm,
            bn,
            bk,
            tm,
            tn,
            split: 0,
        };
        // From H100 sweeps (SPORKLE_GPU_TILE over shapes #5-#10 of BENCHMARKS.md, with the
        // lean main loop). Big 8x8-per-thread tiles win when there are enough of them to fill
        // the GPU (vgg: 29.8 TFLOP/s with 128x128 against 25.4 with 64x64; l3 n32: 30.1 with
        // 64x128 against 25.9); 4x8 per thread wins on wide outputs with 64-127 filters (l1 n32:
        // 28.1 against 22.6; stem n32: 24.0 against 22.0); 64x64 with 4x4 elsewhere (it was
        // within 10% of the best on the remaining shapes and keeps small layers busy).
        let mg = p.c_out_per_group() as u64;
        let (ho, wo) = p.out_hw();
        let npos = (p.n * ho * wo) as u64;
        let tiles = |bm: u64, bn: u64| mg.div_ceil(bm) * npos.div_ceil(bn) * p.groups as u64;
        match mg {
            128.. if tiles(128, 128) >= 256 => tiled(128, 128, 8, 8, 8),
            128.. if tiles(64, 128) >= 132 => tiled(64, 128, 8, 8, 8),
            64..=127 if npos >= 50_000 => tiled(64, 64, 16, 4, 8),
            64.. => tiled(64, 64, 16, 4, 4),
            _ => Self::narrow(16, 128, 2, 4),
        }
    }

    fn narrow(bm: u32, bn: u32, tm: u32, tn: u32) -> Self {
        Tile {
            kernel: Kernel::Narrow,
            bm,
            bn,
            bk: 16,
            tm,
            tn,
            split: 1,
        }
    }

    /// This variant made ready for `p`: its split chosen when it says 0 (see `with_split`).
    pub fn resolved(self, p: &Conv2dParams) -> Self {
        self.with_split(p)
    }

    /// Fills in the split (0: choose) for `p`: the tiled kernel splits the taps of shapes with
    /// too few output tiles to keep the GPU busy, keeping at least four steps per slice.
    fn with_split(mut self, p: &Conv2dParams) -> Self {
        if self.kernel != Kernel::Tiled {
            self.split = 1;
        } else if self.split == 0 {
            let [filters, positions, groups] = self.groups(p);
            let tiles = filters * positions * groups;
            let steps = (p.reduction_len() as u64).div_ceil(u64::from(self.bk));
            let split = BUSY_WORKGROUPS
                .div_ceil(tiles)
                .min(steps / 4)
                .clamp(1, MAX_SPLIT);
            // No empty slice: every slice gets at least one step.
            let per = steps.div_ceil(split);
            self.split = steps.div_ceil(per) as u32;
        }
        self
    }

    /// The tuning override `SPORKLE_GPU_TILE=kernel:BMxBNxBK:TMxTN[:SPLIT]` (e.g.
    /// `tiled:64x64x16:4x4:2`; without SPLIT the tiled kernel chooses) for groups of 16 or more
    /// filters, read once. An invalid value is reported and ignored.
    pub fn from_env() -> Option<Self> {
        static TILE: std::sync::OnceLock<Option<Tile>> = std::sync::OnceLock::new();
        *TILE.get_or_init(|| knob("SPORKLE_GPU_TILE", Self::parse))
    }

    /// Parses `kernel:BMxBNxBK:TMxTN[:SPLIT]` and checks the shader's constraints.
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
        let (kernel, b, t, split) = match parts.as_slice() {
            [k, b, t] => (*k, nums(b)?, nums(t)?, 0),
            [k, b, t, split] => (
                *k,
                nums(b)?,
                nums(t)?,
                split
                    .parse::<u32>()
                    .ok()
                    .filter(|&s| s > 0)
                    .ok_or_else(|| format!("split {split:?} is not a positive number"))?,
            ),
            _ => return Err("expected kernel:BMxBNxBK:TMxTN[:SPLIT]".into()),
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
            split,
        };
        let threads = if tm > 0 && tn > 0 { tile.threads() } else { 0 };
        if [bm, bn, bk, tm, tn].contains(&0) || bm % tm != 0 || bn % tn != 0 || threads > 1024 {
            return Err(format!(
                "{tile:?}: sizes must be positive, BM % TM = BN % TN = 0, at most 1024 threads"
            ));
        }
        if kernel == Kernel::Tiled
            && (tm % 4 != 0
                || tn % 4 != 0
                || threads % (bm / 4) != 0
                || threads % (bn / 4) != 0
                || (bk * bm / 4) % threads != 0
                || (bk * bn / 4) % threads != 0)
        {
            return Err(format!(
                "{tile:?}: the tiled kernel needs TM, TN multiples of 4, and the quads of A \
                 (BK*BM/4) and of B (BK*BN/4) each a whole number of loads per thread"
            ));
        }
        if kernel == Kernel::Narrow && split > 1 {
            return Err(format!("{tile:?}: only the tiled kernel splits the taps"));
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

    /// Shared memory per workgroup, bytes (the tiled kernel double-buffers it).
    pub fn shared_bytes(&self) -> u32 {
        let buffers = if self.kernel == Kernel::Tiled { 2 } else { 1 };
        buffers * 4 * self.bk * (self.bm + self.bn)
    }

    /// Workgroups for a convolution. The tiled kernel takes filter tiles on x and position
    /// tiles on y (tiles sharing an input window run together); the narrow kernel the reverse.
    pub fn groups(&self, p: &Conv2dParams) -> [u64; 3] {
        let (ho, wo) = p.out_hw();
        let positions = ((p.n * ho * wo) as u64).div_ceil(u64::from(self.bn));
        let filters = (p.c_out_per_group() as u64).div_ceil(u64::from(self.bm));
        match self.kernel {
            Kernel::Tiled => [
                filters,
                positions,
                p.groups as u64 * u64::from(self.split.max(1)),
            ],
            Kernel::Narrow => [positions, filters, p.groups as u64],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// The implicit GEMM over the taps (`conv2d_tiled.comp` or `conv2d_narrow.comp`).
    Direct,
    /// Winograd F(2x2, 3x3) (see [`crate::winograd`]): input transform, 16 GEMMs, output
    /// transform; for 3x3 taps with stride 1, no dilation and one group.
    Winograd,
}

impl Algorithm {
    /// The algorithm for `p`: Winograd where it applies to a wide layer with enough tiles to
    /// fill the GPU (`SPORKLE_GPU_ALGO=direct|winograd` overrides where it applies; an invalid
    /// value is reported and ignored).
    pub fn for_params(p: &Conv2dParams) -> Self {
        if !crate::winograd::applies(p) {
            return Self::Direct;
        }
        static FORCED: std::sync::OnceLock<Option<Algorithm>> = std::sync::OnceLock::new();
        let forced = *FORCED.get_or_init(|| {
            knob("SPORKLE_GPU_ALGO", |v| match v {
                "direct" => Ok(Self::Direct),
                "winograd" => Ok(Self::Winograd),
                _ => Err("direct or winograd".into()),
            })
        });
        forced.unwrap_or_else(|| {
            // From H100 measurements (kernel TFLOP/s, Winograd against direct): l3 n32 (256
            // channels, 1568 tiles) 49.5 against 29.9, vgg (256, 25088 tiles) 64 against 29.6;
            // but l1 n32 (64 channels) 22.2 against 28.3 and l3 n1 (49 tiles) 6.8 against 9.3.
            // The transforms move the input and output through memory 4 times their size,
            // which pays off only when many channels make the GEMMs long.
            if p.c_in >= 128
                && p.c_out >= 128
                && crate::winograd::positions(p, WINOGRAD_VARIANT) >= 1024
            {
                Self::Winograd
            } else {
                Self::Direct
            }
        })
    }

    /// The tolerance a result of this algorithm is checked with.
    pub fn tolerance(self) -> crate::tolerance::Tolerance {
        match self {
            Self::Direct => crate::tolerance::Tolerance::Fp32,
            Self::Winograd => crate::tolerance::Tolerance::Winograd,
        }
    }
}

/// How a job dispatches the convolution: `warmup` untimed dispatches, then `timed` back to back,
/// each timed on its own. A normal call is one timed dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dispatches {
    /// Untimed dispatches first, to bring the clocks up.
    pub warmup: usize,
    /// Dispatches timed one by one (at least 1).
    pub timed: usize,
    /// The tile variant (`None`: the default for the shape); trials force each variant.
    /// With Winograd, the tile of its GEMM.
    pub tile: Option<Tile>,
    /// The algorithm (`None`: the default for the shape, [`Algorithm::for_params`]); forcing
    /// Winograd where it does not apply is an error.
    pub algorithm: Option<Algorithm>,
}

impl Dispatches {
    /// One timed dispatch, nothing else: a normal call.
    pub const ONE: Self = Self {
        warmup: 0,
        timed: 1,
        tile: None,
        algorithm: None,
    };
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
    if tile.kernel == Kernel::Tiled {
        def("SPLIT", format!("{}u", tile.split));
        let full = p.c_out_per_group().is_multiple_of(tile.bm as usize);
        def("A_FULL", u8::from(full).to_string());
        s.push_str(&tiled_code(tile));
    }
    s.push_str("#line 1\n");
    s.push_str(match tile.kernel {
        Kernel::Tiled => CONV2D_TILED,
        Kernel::Narrow => CONV2D_NARROW,
    });
    s
}

/// The register code of the tiled kernel for `tile`, written out (see conv2d_tiled.comp for why):
/// `DECL_ACC`, `DECL_PREFETCH`, `LOAD_GLOBAL(k0)`, `STORE_SHARED(buf)`, `STEP(buf)`, `STORE_ACC`.
fn tiled_code(t: Tile) -> String {
    let (tmv, tnv) = (t.tm / 4, t.tn / 4);
    let a_loads = t.bk * t.bm / 4 / t.threads();
    let b_loads = t.bk * t.bn / 4 / t.threads();
    let (a_step, b_step) = (t.threads() / (t.bm / 4), t.threads() / (t.bn / 4));
    let (m_threads, n_threads) = (t.bm / t.tm, t.bn / t.tn);
    let mut decl_acc = String::new();
    let mut store_acc = String::new();
    for iv in 0..tmv {
        for ii in 0..4 {
            for j in 0..tnv {
                let acc = format!("acc_{}_{j}", iv * 4 + ii);
                decl_acc += &format!("vec4 {acc} = vec4(0.0); ");
                store_acc += &format!(
                    "store(m0 + {iv}u * {m_threads}u + ty + {ii}u * QA, \
                     q0 + {j}u * {n_threads}u + tx, {acc}); "
                );
            }
        }
    }
    let mut prefetch = String::new();
    let mut load = String::new();
    let mut stash = String::new();
    for i in 0..a_loads {
        prefetch += &format!("vec4 pa{i}; ");
        load += &format!("pa{i} = load_a((k0) + a_row + {}u); ", i * a_step);
        stash += &format!("As[buf][a_row + {}u][a_quad] = pa{i}; ", i * a_step);
    }
    for i in 0..b_loads {
        prefetch += &format!("vec4 pb{i}; ");
        load += &format!("pb{i} = load_b((k0) + b_row + {}u); ", i * b_step);
        stash += &format!("Bs[buf][b_row + {}u][b_quad] = pb{i}; ", i * b_step);
    }
    let mut step = String::new();
    for kk in 0..t.bk {
        step += "{ ";
        for iv in 0..tmv {
            step += &format!("vec4 a{iv} = As[buf][{kk}u][{iv}u * {m_threads}u + ty]; ");
        }
        for j in 0..tnv {
            step += &format!("vec4 b{j} = Bs[buf][{kk}u][{j}u * {n_threads}u + tx]; ");
        }
        for iv in 0..tmv {
            for (ii, c) in ["x", "y", "z", "w"].iter().enumerate() {
                for j in 0..tnv {
                    let acc = format!("acc_{}_{j}", iv * 4 + ii as u32);
                    step += &format!("{acc} = fma(vec4(a{iv}.{c}), b{j}, {acc}); ");
                }
            }
        }
        step += "} ";
    }
    format!(
        "#define DECL_ACC {decl_acc}\n#define DECL_PREFETCH {prefetch}\n\
         #define LOAD_GLOBAL(k0) {load}\n#define STORE_SHARED(buf) {stash}\n\
         #define STEP(buf) {step}\n#define STORE_ACC {store_acc}\n"
    )
}

/// Plans made and programs compiled on one context, and its limits; owned by the worker, lent
/// to the executor.
pub(super) struct Planner {
    gl: Rc<glow::Context>,
    info: GpuInfo,
    /// Compiled programs by specialised source (the plans' and the executor's copies').
    pub(super) programs: ProgramCache,
    /// Plans made, by what they were made from.
    plans: HashMap<PlanKey, Rc<Plan>>,
    /// Parts of a job's batch wanted by `SPORKLE_STREAM_PARTS` ([`Planner::parts`]).
    stream_parts: Option<usize>,
}

impl Planner {
    /// A planner for the context whose functions are `gl` and whose limits `info` gives.
    pub(super) fn new(gl: Rc<glow::Context>, info: GpuInfo) -> Self {
        Self {
            gl,
            info,
            programs: ProgramCache::default(),
            plans: HashMap::new(),
            stream_parts: parts_from_env(),
        }
    }

    /// The program for `source`, compiled now if it is not in the cache.
    pub(super) fn program(&mut self, source: &str) -> Result<&Rc<gl::Program>> {
        self.programs.get(&self.gl, source)
    }

    /// A pass of `groups` workgroups running `source`, compiled now (or found compiled).
    fn pass(&mut self, source: String, groups: [u32; 3]) -> Result<Pass> {
        let program = Rc::clone(self.program(&source)?);
        Ok(Pass {
            source,
            program,
            groups,
        })
    }

    /// The plan of a convolution ([`Planner::make_plan`]), made once per shape and kept: making
    /// one writes its shaders' sources, which cost a stream step more host time than the rest of
    /// it (about 50 to 100 µs).
    pub(super) fn plan(
        &mut self,
        p: &Conv2dParams,
        lens: (usize, usize),
        bias: bool,
        dispatches: &Dispatches,
    ) -> Result<Rc<Plan>> {
        let key = PlanKey {
            p: *p,
            lens,
            bias,
            tile: dispatches.tile,
            algorithm: dispatches.algorithm,
        };
        if let Some(plan) = self.plans.get(&key) {
            return Ok(Rc::clone(plan));
        }
        let plan = Rc::new(self.make_plan(p, lens, bias, dispatches)?);
        if self.plans.len() >= PLANS_KEPT {
            // Many shapes: start again rather than grow without bound (the programs stay).
            self.plans.clear();
        }
        self.plans.insert(key, Rc::clone(&plan));
        Ok(plan)
    }

    /// Checks `p` against the GL limits, chooses its algorithm and tile, and compiles its
    /// programs. Winograd falls back to the direct algorithm where its intermediates would not
    /// fit a storage buffer.
    pub(super) fn make_plan(
        &mut self,
        p: &Conv2dParams,
        lens: (usize, usize),
        bias: bool,
        dispatches: &Dispatches,
    ) -> Result<Plan> {
        let (x_len, w_len) = lens;
        let max_block = self.info.max_storage_block;
        let algorithm = match dispatches.algorithm {
            Some(Algorithm::Winograd) => {
                crate::winograd::check_applies(p)?;
                Algorithm::Winograd
            }
            Some(a) => a,
            None => Algorithm::for_params(p),
        };
        // Winograd's intermediates (transformed input, products), where they fit a buffer.
        let winograd_sizes = (algorithm == Algorithm::Winograd)
            .then(|| {
                let per_channel =
                    WINOGRAD_VARIANT.xi() * crate::winograd::positions(p, WINOGRAD_VARIANT);
                [per_channel * p.c_in, per_channel * p.c_out]
            })
            .filter(|sizes| sizes.iter().all(|&len| len as i64 * 4 <= max_block));
        let winograd = winograd_sizes.is_some();
        // The convolution (or Winograd's GEMM) that the tiled or narrow kernel runs.
        let (conv_p, conv_bias) = if winograd {
            (crate::winograd::gemm_params(p, WINOGRAD_VARIANT), false)
        } else {
            (*p, bias)
        };
        let mut tile = dispatches
            .tile
            .map_or_else(|| Tile::for_params(&conv_p), |t| t.resolved(&conv_p));
        if winograd {
            // Its output is the transform's input: no split-K (its partials would need a
            // third intermediate).
            tile.split = 1;
        }
        let info = &self.info;
        let groups = tile.groups(&conv_p);
        for (axis, (&n, &max)) in groups.iter().zip(&info.max_groups).enumerate() {
            if n > max as u64 {
                return Err(Error::GpuLimit(format!(
                    "{n} workgroups on axis {axis} exceed the GL limit of {max} for {p}"
                )));
            }
        }
        let split = tile.split.max(1) as usize;
        let out_len = p.output_len();
        let scratch = match winograd_sizes {
            Some(sizes) => sizes,
            None if split > 1 => [out_len * split, 0],
            None => [0, 0],
        };
        let biggest = x_len
            .max(w_len)
            .max(out_len)
            .max(scratch[0])
            .max(scratch[1]) as i64
            * 4;
        if biggest > max_block {
            return Err(Error::GpuLimit(format!(
                "a buffer of {biggest} bytes exceeds GL_MAX_SHADER_STORAGE_BLOCK_SIZE ({max_block})"
            )));
        }
        // The one-dimensional passes (reduction, transforms): a grid-stride loop over their
        // elements, with at most the GL limit of workgroups.
        let max_line = info.max_groups[0].max(1);
        let line = |elements: usize| {
            (elements as u64)
                .div_ceil(u64::from(shaders::REDUCE_THREADS))
                .min(max_line as u64) as u32
        };
        let conv = self.pass(
            conv2d_source(&conv_p, tile, conv_bias),
            groups.map(|g| g as u32),
        )?;
        let passes = match winograd_sizes {
            Some([transformed, products]) => {
                let (input, output) = shaders::winograd_sources(p, bias);
                let xi = WINOGRAD_VARIANT.xi();
                vec![
                    self.pass(input, [line(transformed / xi), 1, 1])?,
                    conv,
                    self.pass(output, [line(products / xi), 1, 1])?,
                ]
            }
            None if split > 1 => vec![
                conv,
                self.pass(
                    shaders::reduce_source(p, tile.split, bias),
                    [line(out_len), 1, 1],
                )?,
            ],
            None => vec![conv],
        };
        Ok(Plan {
            algorithm: if winograd {
                Algorithm::Winograd
            } else {
                Algorithm::Direct
            },
            tile,
            out_len,
            passes,
            scratch,
        })
    }

    /// Records one whole convolution: every pass of `plan` in order, with barriers between
    /// them; pass `i` reads the input (first) or intermediate `i - 1`, and writes intermediate
    /// `i` or the output (last).
    ///
    /// With `fused` (a one-pass plan in a streaming step), the pass runs as the convolution fused
    /// with the step's copies: that program, its copying layers of workgroups in front.
    pub(super) fn encode(
        &self,
        plan: &Plan,
        b: &Bindings,
        fused: Option<&FusedPass<'_>>,
    ) -> Result<()> {
        let gl = &self.gl;
        let scratch = |i: usize| {
            (b.scratch.get(i).copied().flatten())
                .ok_or_else(|| Error::Gpu("an intermediate buffer is missing".into()))
        };
        if fused.is_some() && plan.passes.len() != 1 {
            return Err(Error::Gpu(
                "copies fused into a plan of several passes (executor bug)".into(),
            ));
        }
        b.weights.bind(1);
        b.bias.bind(2);
        let last = plan.passes.len().saturating_sub(1);
        for (i, pass) in plan.passes.iter().enumerate() {
            if i > 0 {
                gl::storage_barrier(gl);
            }
            // The first pass reads the input, the last writes the output: the part's floats of
            // them where the batch runs in parts.
            match (i, &b.part) {
                (0, Some((input, _))) => b.input.bind_range(0, input.start, input.len())?,
                (0, None) => b.input.bind(0),
                _ => scratch(i - 1)?.bind(0),
            }
            match (i == last, &b.part) {
                (true, Some((_, output))) => b.output.bind_range(3, output.start, output.len())?,
                (true, None) => b.output.bind(3),
                _ => scratch(i)?.bind(3),
            }
            match fused {
                Some(f) if i == 0 => {
                    let [gx, gy, gz] = pass.groups;
                    self.compiled(f.source)?.dispatch_with(
                        [gx, gy, gz + f.copy_z],
                        "copies",
                        f.copies,
                    )?;
                }
                _ => pass.program.dispatch(pass.groups)?,
            }
        }
        Ok(())
    }

    /// For a one-pass plan with shader copies: the source of its convolution fused with the
    /// copies, compiled, and the copying layers of workgroups put before the convolution's.
    pub(super) fn fused_program(
        &mut self,
        plan: &Plan,
        copy_mode: StreamCopy,
    ) -> Result<Option<(String, u32)>> {
        let StreamCopy::Shader { groups } = copy_mode else {
            return Ok(None);
        };
        let [pass] = &plan.passes[..] else {
            return Ok(None);
        };
        let layer = (pass.groups[0] * pass.groups[1]).max(1);
        let copy_z = groups.div_ceil(layer);
        if u64::from(pass.groups[2]) + u64::from(copy_z) > self.info.max_groups[2] as u64 {
            return Ok(None);
        }
        let source = shaders::fused_source(&pass.source, copy_z);
        self.program(&source)?;
        Ok(Some((source, copy_z)))
    }

    /// Parts to run a streaming job of shape `p` (`x_len` floats in) in along n, its copies made
    /// by `copy_mode`: the most, up to those wanted, that divide n and start every part at an
    /// offset that storage buffers can be bound at. Wanted: one with shader copies (fused into
    /// one dispatch); else `SPORKLE_STREAM_PARTS`, or with CUDA copies [`PARTS`] for jobs of at
    /// least [`PARTS_MIN_BYTES`] in and out. A job that runs alone (a synchronous call) is
    /// planned the same way: its second part's copy in then overlaps its first part's
    /// convolution, and its first part's copy out the second's convolution (pinned, H200, same
    /// call: l1 n32 1.28 -> 1.01 ms a call, vgg n32 5.70 -> 3.94; `docs/experiments.md`).
    pub(super) fn parts(&self, p: Conv2dParams, x_len: usize, copy_mode: StreamCopy) -> usize {
        let out_len = p.output_len();
        let wanted = match (copy_mode, self.stream_parts) {
            (StreamCopy::Shader { .. }, _) => 1,
            (_, Some(parts)) => parts,
            (StreamCopy::Cuda { .. }, None) if (x_len + out_len) * 4 >= PARTS_MIN_BYTES => PARTS,
            _ => 1,
        };
        let align = self.info.storage_offset_alignment.max(4) as usize;
        (1..=wanted.min(p.n))
            .rev()
            .find(|&d| {
                p.n.is_multiple_of(d)
                    && (x_len / d * 4).is_multiple_of(align)
                    && (out_len / d * 4).is_multiple_of(align)
            })
            .unwrap_or(1)
    }

    /// The compiled program for `source` (compiled when the plan was made).
    pub(super) fn compiled(&self, source: &str) -> Result<&gl::Program> {
        self.programs
            .peek(source)
            .ok_or_else(|| Error::Gpu("program missing from the cache".into()))
    }
}

/// A scratch buffer of at least `len` floats (grown, never shrunk).
pub(super) fn scratch(
    gl: &std::rc::Rc<glow::Context>,
    slot: &mut Option<Buffer>,
    len: usize,
    immutable: bool,
) -> Result<()> {
    gl::ensure_len(slot, len, || Buffer::new(gl, len, immutable))
}

/// Allocates `plan`'s intermediates in `slots` (grown, never shrunk).
pub(super) fn scratch_for(
    gl: &std::rc::Rc<glow::Context>,
    slots: &mut [Option<Buffer>; 2],
    plan: &Plan,
    immutable: bool,
) -> Result<()> {
    for (slot, &len) in slots.iter_mut().zip(&plan.scratch) {
        if len > 0 {
            scratch(gl, slot, len, immutable)?;
        }
    }
    Ok(())
}

/// What a plan is made from (see [`Planner::plan`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    p: Conv2dParams,
    /// Floats of the input and the weights.
    lens: (usize, usize),
    bias: bool,
    tile: Option<Tile>,
    algorithm: Option<Algorithm>,
}

/// Plans kept at most ([`Planner::plan`]).
const PLANS_KEPT: usize = 256;

/// A convolution checked against the limits, its programs compiled.
pub(super) struct Plan {
    /// What runs (Winograd only where its intermediates fit).
    pub(super) algorithm: Algorithm,
    /// The convolution's tile (Winograd's GEMM's), its split chosen: a plan for part of the
    /// batch made with this tile and algorithm sums every output in the same order.
    pub(super) tile: Tile,
    pub(super) out_len: usize,
    /// The passes in order, each reading what the one before wrote: the convolution alone;
    /// split-K's slices into intermediate 0, then their reduction; or Winograd's input
    /// transform into intermediate 0, its GEMM into intermediate 1, its output transform.
    pub(super) passes: Vec<Pass>,
    /// Floats of the two intermediate buffers (0: not needed).
    pub(super) scratch: [usize; 2],
}

/// What a plan runs, for callers: with the arithmetic class, what fixes a result's bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanInfo {
    /// The algorithm that runs (Winograd falls back to direct where it does not fit).
    pub algorithm: Algorithm,
    /// The convolution's tile (Winograd's GEMM's), its split chosen.
    pub tile: Tile,
    /// Dispatches in order (the convolution; split-K's reduction; Winograd's transforms).
    pub passes: usize,
}

impl PlanInfo {
    /// A name for keys: `direct-tiled-64x64x16-4x4-split1-passes1`.
    pub fn key(&self) -> String {
        let t = self.tile;
        let algorithm = match self.algorithm {
            Algorithm::Direct => "direct",
            Algorithm::Winograd => "winograd",
        };
        let kernel = match t.kernel {
            Kernel::Tiled => "tiled",
            Kernel::Narrow => "narrow",
        };
        format!(
            "{algorithm}-{kernel}-{}x{}x{}-{}x{}-split{}-passes{}",
            t.bm, t.bn, t.bk, t.tm, t.tn, t.split, self.passes
        )
    }
}

/// One compute dispatch of a plan.
pub(super) struct Pass {
    /// The specialised source (the program cache's key).
    pub(super) source: String,
    /// Its program, compiled when the plan is made (a dispatch looks nothing up: hashing an
    /// 8 KB source costs microseconds).
    pub(super) program: Rc<gl::Program>,
    /// Workgroups.
    pub(super) groups: [u32; 3],
}

/// The buffers one convolution reads and writes.
pub(super) struct Bindings<'a> {
    pub(super) input: &'a Buffer,
    pub(super) weights: &'a Buffer,
    pub(super) bias: &'a Buffer,
    pub(super) output: &'a Buffer,
    /// The plan's intermediates.
    pub(super) scratch: [Option<&'a Buffer>; 2],
    /// Where the batch runs in parts along n (the executor's): the floats of this part in the
    /// input and in the output (else the whole buffers).
    pub(super) part: Option<(std::ops::Range<usize>, std::ops::Range<usize>)>,
}

/// A one-pass plan's convolution fused with a step's copies (see [`Planner::encode`]).
pub(super) struct FusedPass<'a> {
    /// The fused program's source (the program cache's key).
    pub(super) source: &'a str,
    /// Layers of copying workgroups in front of the convolution's.
    pub(super) copy_z: u32,
    /// The `copies` uniform: workgroups copying in and out, vec4s in and out.
    pub(super) copies: [u32; 4],
}
