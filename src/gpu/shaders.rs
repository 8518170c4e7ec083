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
/// The second pass of a split-K convolution: partial sums in slice order, then the bias.
pub const CONV2D_REDUCE: &str = include_str!("../../shaders/conv2d_reduce.comp");

/// First pass of Winograd F(2x2, 3x3): the input transform.
pub const WINOGRAD_INPUT: &str = include_str!("../../shaders/winograd_input.comp");
/// Last pass of Winograd F(2x2, 3x3): the output transform and the bias.
pub const WINOGRAD_OUTPUT: &str = include_str!("../../shaders/winograd_output.comp");

/// The GPU calibration workload (performance baselines).
pub const CALIBRATE: &str = include_str!("../../shaders/calibrate.comp");

/// Threads per workgroup, iterations per thread and workgroups of the calibration workload:
/// 2 · 32 (FMA lanes per iteration) · ITERS · THREADS · GROUPS FLOPs.
pub const CALIBRATE_SHAPE: (u32, u32, u32) = (256, 4096, 1024);

/// The specialised source of the calibration workload.
pub fn calibrate_source() -> String {
    let (threads, iters, _) = CALIBRATE_SHAPE;
    format!("#version 430\n#define THREADS {threads}\n#define ITERS {iters}u\n#line 1\n{CALIBRATE}")
}

/// Workgroups that keep a large GPU busy (the H100 has 132 SMs, two resident workgroups each);
/// shapes with fewer output tiles split the taps (split-K) to reach it.
const BUSY_WORKGROUPS: u64 = 264;
/// At most this many slices of the taps.
const MAX_SPLIT: u64 = 16;

/// The tuning knob `name` from the environment, parsed; an invalid value is reported and
/// ignored (the callers keep the answer, so it is read once).
pub(super) fn knob<T>(
    name: &str,
    parse: impl Fn(&str) -> std::result::Result<T, String>,
) -> Option<T> {
    let v = std::env::var(name).ok()?;
    parse(&v)
        .map_err(|e| eprintln!("sporkle: ignoring {name}={v:?}: {e}"))
        .ok()
}

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

/// Writes a program's source and the driver's binary to `dir` (diagnostics for kernel tuning,
/// enabled by `SPORKLE_GPU_DUMP=dir`); a failure to write is reported and otherwise ignored.
fn dump_program(dir: &std::path::Path, source: &str, program: &Program) {
    let name = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(source.as_bytes()));
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(dir.join(format!("{name}.comp")), source))
        .and_then(|()| {
            std::fs::write(
                dir.join(format!("{name}.bin")),
                program.binary().unwrap_or_default(),
            )
        });
    if let Err(e) = written {
        eprintln!(
            "sporkle: cannot dump program {name} to {}: {e}",
            dir.display()
        );
    }
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

/// The specialised source of the split-K reduction for a shape split `split` ways.
pub fn reduce_source(p: &Conv2dParams, split: u32, bias: bool) -> String {
    let (ho, wo) = p.out_hw();
    format!(
        "#version 430\n#define THREADS {REDUCE_THREADS}\n#define SPLIT {split}u\n#define OUT_LEN {}u\n\
         #define C_OUT {}u\n#define HOWO {}u\n#define HAS_BIAS {}\n#line 1\n{CONV2D_REDUCE}",
        p.output_len(),
        p.c_out,
        ho * wo,
        u8::from(bias)
    )
}

/// Threads per workgroup of the reduction and of the Winograd transforms.
pub const REDUCE_THREADS: u32 = 256;

/// The Winograd variant the GPU runs (its transform shaders are F(2×2, 3×3)'s).
pub const WINOGRAD_VARIANT: crate::winograd::Variant = crate::winograd::Variant::F2x2;

/// How the GPU computes a convolution.
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

/// The specialised sources of Winograd's input and output transforms for `p`.
pub fn winograd_sources(p: &Conv2dParams, bias: bool) -> (String, String) {
    let (ho, wo) = p.out_hw();
    let (th, tw) = crate::winograd::tiles(p, WINOGRAD_VARIANT);
    let input = format!(
        "#version 430\n#define THREADS {REDUCE_THREADS}\n#define N {}u\n#define C_IN {}u\n\
         #define H {}u\n#define W {}u\n#define PH {}u\n#define PW {}u\n#define TH {th}u\n\
         #define TW {tw}u\n#line 1\n{WINOGRAD_INPUT}",
        p.n, p.c_in, p.h, p.w, p.padding.0, p.padding.1
    );
    let output = format!(
        "#version 430\n#define THREADS {REDUCE_THREADS}\n#define N {}u\n#define C_OUT {}u\n\
         #define HO {ho}u\n#define WO {wo}u\n#define TH {th}u\n#define TW {tw}u\n\
         #define HAS_BIAS {}\n#line 1\n{WINOGRAD_OUTPUT}",
        p.n,
        p.c_out,
        u8::from(bias)
    );
    (input, output)
}

/// Compiled programs by their full source; lives with the context.
#[derive(Default)]
pub struct ProgramCache {
    programs: HashMap<String, Program>,
}

impl ProgramCache {
    /// The program for `source`, compiled on first use (the source is copied only then).
    pub fn get(&mut self, gl: &Rc<glow::Context>, source: &str) -> Result<&Program> {
        if !self.programs.contains_key(source) {
            let dump = std::env::var_os("SPORKLE_GPU_DUMP");
            let program = Program::compute(gl, source, dump.is_some())?;
            if let Some(dir) = dump {
                dump_program(std::path::Path::new(&dir), source, &program);
            }
            self.programs.insert(source.to_owned(), program);
        }
        Ok(&self.programs[source])
    }

    /// The program for `source` if it has been compiled.
    pub fn peek(&self, source: &str) -> Option<&Program> {
        self.programs.get(source)
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

/// The streaming executor's copies across the bus, a function (`shaders/stream_copy.glsl`).
pub const STREAM_COPY: &str = include_str!("../../shaders/stream_copy.glsl");
/// Those copies alone (`shaders/stream_copy.comp`).
pub const STREAM_COPY_MAIN: &str = include_str!("../../shaders/stream_copy.comp");

/// Invocations per workgroup of the copies alone.
pub const STREAM_COPY_THREADS: u32 = 256;

/// A program whose `main` (source `main`, after `defines`) calls the streaming copies.
fn with_stream_copy(defines: &str, main: &str) -> String {
    format!("#version 430\n{defines}#line 1\n{STREAM_COPY}#line 1\n{main}")
}

/// The source of the streaming copies alone (made once: every streaming job looks it up).
pub fn stream_copy_source() -> &'static str {
    static SOURCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SOURCE.get_or_init(|| {
        with_stream_copy(
            &format!("#define THREADS {STREAM_COPY_THREADS}u\n"),
            STREAM_COPY_MAIN,
        )
    })
}

/// A convolution pass's source fused with the streaming copies: its first `copy_z` layers of
/// workgroups copy (`stream_copy.glsl`, inserted after the `#define`s), the rest convolve.
pub fn fused_source(conv_source: &str, copy_z: u32) -> String {
    let at = conv_source.rfind("#line 1\n").unwrap_or(0);
    format!(
        "{}#define COPY_Z {copy_z}u\n#line 1\n{STREAM_COPY}{}",
        &conv_source[..at],
        &conv_source[at..]
    )
}

/// How the streaming executor moves data between its staging buffers (host memory) and the
/// device buffers (`SPORKLE_STREAM_COPY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamCopy {
    /// CUDA's copy engines on memory shared with GL (`cu.rs`), opened with the first streaming
    /// job or pinned input: the default. Where CUDA cannot be opened, shader copies, unless
    /// `required` (`SPORKLE_STREAM_COPY=cuda`): then streaming jobs fail, saying why.
    Cuda {
        /// Set explicitly: no fallback to shader copies.
        required: bool,
    },
    /// Shader copies (`stream_copy.glsl`), in the convolution's own dispatch where the plan is
    /// one pass. `groups` workgroups copy (`SPORKLE_STREAM_COPY=shader` or `shader:N`).
    Shader {
        /// Workgroups that copy, in and out together.
        groups: u32,
    },
    /// DMA copies (`glCopyBufferSubData`), which one context runs one after another with the
    /// convolution (`SPORKLE_STREAM_COPY=dma`).
    Dma,
}

impl StreamCopy {
    /// Copying workgroups by default: one per SM of an H100, so that the convolution keeps
    /// most of the GPU (measured: 66 + 66 move 25.7 MB each way in 0.72 ms on the H100, alone).
    pub const GROUPS: u32 = 132;

    /// Shader copies with [`StreamCopy::GROUPS`] workgroups.
    pub const SHADER: Self = StreamCopy::Shader {
        groups: Self::GROUPS,
    };

    /// From `SPORKLE_STREAM_COPY` (unset: CUDA where it can be opened, else shader copies).
    pub fn from_env() -> Self {
        knob("SPORKLE_STREAM_COPY", |v| match v.split_once(':') {
            _ if v == "dma" => Ok(StreamCopy::Dma),
            _ if v == "cuda" => Ok(StreamCopy::Cuda { required: true }),
            _ if v == "shader" => Ok(Self::SHADER),
            Some(("shader", n)) => match n.parse::<u32>() {
                Ok(groups) if groups >= 2 => Ok(StreamCopy::Shader { groups }),
                _ => Err("expected shader:N with N at least 2".into()),
            },
            _ => Err("expected cuda, shader, shader:N or dma".into()),
        })
        .unwrap_or(StreamCopy::Cuda { required: false })
    }
}

/// The role-partitioned probe shader (`shaders/probe_roles.comp`, diagnostics only).
#[cfg(feature = "probes")]
pub const PROBE_ROLES: &str = include_str!("../../shaders/probe_roles.comp");

/// The probe shader specialised: copies as the `copies` uniform says, then FMA workgroups of
/// `iters` iterations.
#[cfg(feature = "probes")]
pub fn probe_roles_source(iters: u32) -> String {
    with_stream_copy(
        &format!("#define THREADS 256u\n#define ITERS {iters}u\n"),
        PROBE_ROLES,
    )
}
