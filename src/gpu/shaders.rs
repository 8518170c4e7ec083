//! Shader sources (`shaders/*.comp`, built in with `include_str!`), their specialisation by
//! `#version` and `#define`s prepended from Rust (the convolution's own, by tile, is in
//! `plan.rs`), the executor's copy modes, and a program cache keyed by the full specialised source.

#![forbid(unsafe_code)]

use super::gl::Program;
use super::knob::knob;
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
    programs: HashMap<String, Rc<Program>>,
}

impl ProgramCache {
    /// The program for `source`, compiled on first use (the source is copied only then).
    pub fn get(&mut self, gl: &Rc<glow::Context>, source: &str) -> Result<&Rc<Program>> {
        if !self.programs.contains_key(source) {
            let dump = std::env::var_os("SPORKLE_GPU_DUMP");
            let program = Program::compute(gl, source, dump.is_some())?;
            if let Some(dir) = dump {
                dump_program(std::path::Path::new(&dir), source, &program);
            }
            self.programs.insert(source.to_owned(), Rc::new(program));
        }
        Ok(&self.programs[source])
    }

    /// The program for `source` if it has been compiled.
    pub fn peek(&self, source: &str) -> Option<&Program> {
        self.programs.get(source).map(|p| &**p)
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
