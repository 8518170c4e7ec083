//! The CPU backend: every feature of the reference, fast, on rayon threads.
//!
//! How a call runs (see `planes.rs` for the layout trick that makes it an implicit GEMM):
//! 1. the input of a chunk of images is copied once into phase planes (zero-padded, split by
//!    stride phase), and the offset of every tap `(c, r, s)` is tabulated; a pointwise layer
//!    on the rows kernel reads its input in place instead (`Geometry::pointwise`);
//! 2. the output is cut into tasks (image, group, a tile of whole output rows, a range of
//!    filters), run in parallel, about two per thread; [`CpuPath::for_params`] picks the path:
//!    - **GEMM, strips** (`kernel.rs`): for each panel of 16 filters and each block of at most
//!      [`KC`] taps, the 16×16 microkernel runs over every strip of 16 grid positions (junk
//!      columns included);
//!    - **GEMM, rows**: up to 16 valid positions of one row × 16 filters over every tap, the
//!      tile stored transposed; chosen where it computes fewer lanes than strips;
//!    - **direct** (fewer than [`GEMM_MIN_FILTERS`] filters per group: depthwise and narrow
//!      grouped layers, where a GEMM would waste most of each 16-wide panel): each output plane
//!      is a sum of shifted rows of the planes (`acc[q] += w · planes[q + off]`), four taps at
//!      a time;
//! 3. a task that owns whole output planes has the GEMM kernels store straight into them;
//!    otherwise it computes into a per-thread scratch tile and copies the valid outputs into
//!    its own disjoint slices (split safely with `chunks_mut`; no raw pointers cross threads).
//!    Every GEMM sum starts from the bias, so an output's bits do not depend on the plan or the
//!    thread count; the direct path adds the bias when it copies out.
//!
//! Weights are packed `[group][panel of 16 filters][tap][16]` once per call, or once for good
//! with [`CpuBackend::prepare_weights`]. Workspaces (the planes, the offsets, one scratch buffer
//! per thread) belong to the backend and are reused: a warm call allocates only a few small
//! task vectors.
//! Why not a GEMM crate: every crate takes B as a strided matrix, which forces an im2col copy
//! `k_h·k_w` times the input; an implicit GEMM needs B read through a tap-offset table.

#![deny(unsafe_code)]

mod calibrate;
#[allow(unsafe_code)] // The SIMD microkernel; every block carries a SAFETY line.
mod kernel;
mod planes;
mod winograd;

pub use calibrate::{calibration, Calibration};
pub use kernel::Microkernel;

use crate::error::{Error, Result};
use crate::params::Conv2dParams;
use kernel::{RowsOut, Start, TapOffsets, Tile, MR, NR, ZEROS};
use planes::Geometry;
use rayon::prelude::*;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Largest number of taps in one weight block (keeps a 16×KC panel of weights in L1).
pub const KC: usize = 256;
/// Groups with fewer filters than this use the direct path instead of the GEMM.
pub const GEMM_MIN_FILTERS: usize = 8;
/// Strips of 16 output positions computed together inside a task (their B data stays in L2).
const BLOCK_STRIPS: usize = 16;
/// Output positions per block.
const BLOCK_Q: usize = BLOCK_STRIPS * NR;
/// Phase planes are built for at most this many floats of images at once (128 MiB).
const PLANES_BUDGET: usize = 32 << 20;

/// The CPU convolution backend. Cheap to call repeatedly: its workspaces are kept.
pub struct CpuBackend {
    /// Always `Some` until drop.
    pool: Option<rayon::ThreadPool>,
    /// Pool threads still running: drop waits for them, so nothing outlives the backend.
    running: Arc<(Mutex<usize>, Condvar)>,
    threads: usize,
    kernel: Microkernel,
    path: Option<CpuPath>,
    workspace: Mutex<Workspace>,
    scratch: Vec<Mutex<Vec<f32>>>,
}

#[derive(Default)]
struct Workspace {
    planes: Vec<f32>,
    offsets: TapOffsets,
    /// The weights packed for the microkernel: `[group][panel of 16 filters][tap][16]`.
    packed: Vec<f32>,
}

/// The CPU's model name (Linux `/proc/cpuinfo`), or the architecture where that is unknown.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

/// Which algorithm a call uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuPath {
    /// Implicit GEMM, strips orientation: 16 filters × 16 consecutive grid positions.
    GemmStrips,
    /// Implicit GEMM, rows orientation: up to 16 valid positions of one row × 16 filters.
    GemmRows,
    /// Direct shifted-row sums (depthwise and narrow groups).
    Direct,
    /// Winograd F(2×2, 3×3) (3×3 taps, stride 1, no dilation, one group; see `winograd.rs`):
    /// its GEMM on the rows kernel.
    Winograd,
    /// Winograd F(4×4, 3×3), where F(2×2) applies: fewer multiplies, larger rounding
    /// ([`crate::tolerance::Tolerance::WinogradF4`]), never exact.
    WinogradF4,
}

impl CpuPath {
    /// The path sporkle takes for these parameters: the direct path for narrow groups, else
    /// the GEMM orientation that computes fewer lanes per image. Strips compute the junk
    /// columns and round the grid up to 16; rows compute only valid positions, but a call with
    /// few positions is bound by FMA latency (counted as at least `ROWS_MIN_LANES`).
    pub fn for_params(p: &Conv2dParams) -> Self {
        if p.c_out_per_group() < GEMM_MIN_FILTERS {
            return CpuPath::Direct;
        }
        // Winograd where the channels are many enough for its GEMMs to dominate the transforms.
        let (ho, wo) = p.out_hw();
        if crate::winograd::applies(p)
            && p.c_in >= WINOGRAD_MIN_CHANNELS
            && p.c_out >= WINOGRAD_MIN_CHANNELS
            && p.n * ho * wo >= WINOGRAD_MIN_POSITIONS
        {
            return if wo.div_ceil(4) >= WINOGRAD_F4_MIN_ROW_TILES {
                CpuPath::WinogradF4
            } else {
                CpuPath::Winograd
            };
        }
        // Pointwise layers with a long enough reduction: the rows kernel reads the input in
        // place (no phase planes at all); with short reductions its transposed store costs more
        // than the copy saves.
        if Geometry::pointwise(p).is_some() && p.reduction_len() >= POINTWISE_ROWS_MIN_TAPS {
            return CpuPath::GemmRows;
        }
        let g = Geometry::new(p);
        let strips = (g.ho * g.wq).next_multiple_of(NR);
        let (chunks, chunk) = row_chunks(g.wo, NR);
        let rows = g.ho * chunks * chunk.max(ROWS_MIN_LANES);
        if rows < strips {
            CpuPath::GemmRows
        } else {
            CpuPath::GemmStrips
        }
    }

    /// A name for reports and fingerprint keys.
    pub fn name(self) -> &'static str {
        match self {
            CpuPath::GemmStrips => "gemm-strips",
            CpuPath::GemmRows => "gemm-rows",
            CpuPath::Direct => "row-sums",
            CpuPath::Winograd => "winograd-f2x2",
            CpuPath::WinogradF4 => "winograd-f4x4",
        }
    }

    /// The Winograd variant this path runs, if any.
    pub fn winograd(self) -> Option<crate::winograd::Variant> {
        match self {
            CpuPath::Winograd => Some(crate::winograd::Variant::F2x2),
            CpuPath::WinogradF4 => Some(crate::winograd::Variant::F4x4),
            CpuPath::GemmStrips | CpuPath::GemmRows | CpuPath::Direct => None,
        }
    }

    /// How this path's weights are laid out.
    fn layout(self) -> Layout {
        match self {
            CpuPath::GemmStrips | CpuPath::GemmRows => Layout::Packed,
            CpuPath::Direct => Layout::Given,
            CpuPath::Winograd | CpuPath::WinogradF4 => {
                Layout::Winograd(self.winograd().expect("a Winograd path"))
            }
        }
    }

    /// Whether this path gives the reference's bits on small-integer data (see
    /// [`crate::tolerance`]'s exact mode): every path but F(4×4) Winograd, whose `G` holds 1/6.
    pub fn exact_on_small_integers(self) -> bool {
        self != CpuPath::WinogradF4
    }

    /// The tolerance a result of this path is checked with: Winograd's bound for Winograd
    /// (see `crate::winograd`), the direct bound otherwise.
    pub fn tolerance(self) -> crate::tolerance::Tolerance {
        match self {
            CpuPath::Winograd => crate::tolerance::Tolerance::Winograd,
            CpuPath::WinogradF4 => crate::tolerance::Tolerance::WinogradF4,
            _ => crate::tolerance::Tolerance::Fp32,
        }
    }
}

/// How weights are laid out for a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// `[filter][tap]`, as the caller gave them (the direct path).
    Given,
    /// `[group][panel of 16 filters][tap][16]` (the GEMM paths).
    Packed,
    /// Transformed (`U_ξ = G g Gᵀ`) for a variant, then packed as the weights of its GEMM.
    Winograd(crate::winograd::Variant),
}

/// Winograd needs at least this many input and output channels (measured here, two interleaved
/// rounds against the rows kernel: 64 channels 1.09-1.19x (l1 n1, n32), 256 channels 1.1-1.3x;
/// before the transforms prefetched their planes, 64 channels lost, 0.9x)...
const WINOGRAD_MIN_CHANNELS: usize = 64;
/// ...and this many output positions over the batch.
const WINOGRAD_MIN_POSITIONS: usize = 196;
/// F(4×4) Winograd where a row of its tiles is at least this many, so that its GEMMs' calls of
/// the rows kernel are full: measured here against F(2×2) (two interleaved rounds, GFLOP/s):
/// vgg (56×56, 256 channels, 14 tiles a row) 785 against 518, l1 n32 (56×56, 64 channels) 413
/// against 342, l1 n1 the same; at 14×14 (4 tiles a row) F(4×4) lost, l3 n1 274 against 393,
/// l3 n32 490 against 526.
const WINOGRAD_F4_MIN_ROW_TILES: usize = 14;
/// A Winograd task takes whole rows of tiles adding up to about this many tiles: four calls of
/// the wide rows kernel per transform position and panel pair. Measured here (GFLOP/s, two
/// interleaved rounds of budgets that happened to give these sizes): vgg 477 with 28 tiles
/// against 500 with 56; l3 n32 480 with 14 against 536 with 49; l1 n1 and n32 370-386 with 56
/// against 346-369 with 196 and 252.
const WINOGRAD_TASK_POSITIONS: usize = 56;
/// ...while its transformed input and GEMM output take at most this many floats together
/// (2 MiB, a core's L2 cache), unless one row of tiles needs more.
const WINOGRAD_TASK_FLOATS: usize = 512 << 10;

/// Pointwise layers reduce over at least this many taps to read their input in place.
const POINTWISE_ROWS_MIN_TAPS: usize = 128;

/// Below this many positions per call, the rows kernel's few accumulators wait on FMA latency.
const ROWS_MIN_LANES: usize = 8;

/// How the rows kernel cuts an output row of `wo` positions into calls of at most `max`:
/// `(chunks, positions per chunk)`, the last chunk taking the remainder.
fn row_chunks(wo: usize, max: usize) -> (usize, usize) {
    let chunks = wo.div_ceil(max);
    (chunks, wo.div_ceil(chunks))
}

/// Weights laid out for the CPU backend by [`CpuBackend::prepare_weights`].
pub struct CpuWeights {
    shape: WeightShape,
    layout: Layout,
    data: Vec<f32>,
    /// Where in `data` the laid-out weights are (packed panels start on a cache line).
    range: std::ops::Range<usize>,
}

impl CpuWeights {
    /// Bytes of laid-out weights held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// What prepared weights fit: the filter bank's shape and grouping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct WeightShape {
    c_out: usize,
    c_in: usize,
    k_h: usize,
    k_w: usize,
    groups: usize,
}

impl WeightShape {
    fn of(p: &Conv2dParams) -> Self {
        Self {
            c_out: p.c_out,
            c_in: p.c_in,
            k_h: p.k_h,
            k_w: p.k_w,
            groups: p.groups,
        }
    }
}

/// One unit of parallel work: a block of outputs and the output slices it owns.
struct Task<'o> {
    /// Image, counted within the current chunk.
    img: usize,
    group: usize,
    /// Output rows `y0..y1`.
    y0: usize,
    y1: usize,
    /// Filters `m0..m0 + filters`.
    m0: usize,
    filters: usize,
    out: TaskOut<'o>,
}

/// The output a task owns.
enum TaskOut<'o> {
    /// Whole images: the task's filters' `ho × wo` planes, contiguous (one slice).
    Planes(&'o mut [f32]),
    /// Row tiles: `[i]` holds rows `y0..y1` of filter `m0 + i`.
    Tiles(Vec<&'o mut [f32]>),
}

impl TaskOut<'_> {
    /// Rows `y0..y1` of the task's `i`-th filter (`plane` = `ho·wo`).
    fn filter(&mut self, i: usize, plane: usize) -> &mut [f32] {
        match self {
            TaskOut::Planes(all) => &mut all[i * plane..(i + 1) * plane],
            TaskOut::Tiles(tiles) => tiles[i],
        }
    }
}

/// Everything a task reads.
struct Shared<'a> {
    p: &'a Conv2dParams,
    geo: &'a Geometry,
    planes: &'a [f32],
    offsets: &'a TapOffsets,
    /// Laid out for `path`: packed panels for the GEMM, as given for the direct path.
    weights: &'a [f32],
    bias: Option<&'a [f32]>,
    path: CpuPath,
}

impl CpuBackend {
    /// A backend with one thread per available core and the best microkernel of this CPU.
    pub fn new() -> Result<Self> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_options(threads, Microkernel::detect())
    }

    /// A backend with `threads` threads and the best microkernel of this CPU.
    pub fn with_threads(threads: usize) -> Result<Self> {
        Self::with_options(threads, Microkernel::detect())
    }

    /// A backend with `threads` threads and a chosen microkernel (tests use the portable one to
    /// cover it on machines that have AVX-512).
    pub fn with_options(threads: usize, kernel: Microkernel) -> Result<Self> {
        if threads == 0 {
            return Err(Error::Cpu("thread count must be at least 1".into()));
        }
        if !kernel.supported() {
            return Err(Error::Cpu(format!(
                "the {} microkernel is not supported by this CPU",
                kernel.name()
            )));
        }
        let running = Arc::new((Mutex::new(threads), Condvar::new()));
        let exits = Arc::clone(&running);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("sporkle-cpu-{i}"))
            .exit_handler(move |_| {
                let (count, done) = &*exits;
                *lock(count) -= 1;
                done.notify_all();
            })
            .build()
            .map_err(|e| Error::Cpu(format!("cannot start {threads} threads: {e}")))?;
        Ok(Self {
            pool: Some(pool),
            running,
            threads,
            kernel,
            path: None,
            workspace: Mutex::default(),
            scratch: (0..threads).map(|_| Mutex::default()).collect(),
        })
    }

    fn pool(&self) -> &rayon::ThreadPool {
        self.pool.as_ref().expect("the pool lives until drop")
    }

    /// Threads this backend uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The microkernel in use.
    pub fn microkernel(&self) -> Microkernel {
        self.kernel
    }

    /// Forces one path for every call (tests use it to cover every path on every shape).
    pub fn with_path(mut self, path: CpuPath) -> Self {
        self.path = Some(path);
        self
    }

    /// The path a call with these parameters takes.
    pub fn path_for(&self, p: &Conv2dParams) -> CpuPath {
        self.path.unwrap_or_else(|| CpuPath::for_params(p))
    }

    /// Computes `output = conv2d(input, weights) + bias` (NCHW / KCRS / NKHW, f32).
    ///
    /// Every length is checked against `p` first; nothing is written on error.
    /// The weights are laid out for the microkernel on every call; to reuse that work across
    /// calls with the same weights, see [`prepare_weights`](Self::prepare_weights).
    pub fn conv2d(
        &self,
        p: &Conv2dParams,
        input: &[f32],
        weights: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
    ) -> Result<()> {
        p.check_slices(input, weights, bias, output)?;
        let mut ws = lock(&self.workspace);
        let mut packed = std::mem::take(&mut ws.packed);
        let path = self.path_for(p);
        let result = self
            .lay_out(p, path, weights, &mut packed)
            .and_then(|range| {
                let laid_out = range.map_or(weights, |r| &packed[r]);
                self.run(p, path, input, laid_out, bias, output, &mut ws)
            });
        // Kept for the next call, whatever happened (an error leaves the workspace whole).
        ws.packed = packed;
        result
    }

    /// Lays out weights for repeated calls with parameters like `p` (same `c_out`, `c_in`,
    /// kernel size and groups): what [`conv2d`](Self::conv2d) does on every call, done once.
    pub fn prepare_weights(&self, p: &Conv2dParams, weights: &[f32]) -> Result<CpuWeights> {
        p.validate()?;
        if weights.len() != p.weights_len() {
            return Err(Error::BufferLength {
                what: "weights",
                expected: p.weights_len() as u64,
                got: weights.len() as u64,
            });
        }
        let path = self.path_for(p);
        let mut data = Vec::new();
        let range = match self.lay_out(p, path, weights, &mut data)? {
            Some(range) => range,
            None => {
                data = weights.to_vec();
                0..data.len()
            }
        };
        Ok(CpuWeights {
            shape: WeightShape::of(p),
            layout: path.layout(),
            data,
            range,
        })
    }

    /// Lays out `weights` for `path` into `into` and returns where they are, or `None` where
    /// the path takes them as given. Errors where the path cannot compute `p` (a forced
    /// Winograd).
    fn lay_out(
        &self,
        p: &Conv2dParams,
        path: CpuPath,
        weights: &[f32],
        into: &mut Vec<f32>,
    ) -> Result<Option<std::ops::Range<usize>>> {
        let range = match path.layout() {
            Layout::Given => return Ok(None),
            Layout::Packed => self.pool().install(|| pack_weights(p, weights, into)),
            Layout::Winograd(v) => {
                crate::winograd::check_applies(p)?;
                let u = crate::winograd::transform_weights(p, weights, v);
                let gp = crate::winograd::gemm_params(p, v);
                self.pool().install(|| pack_weights(&gp, &u, into))
            }
        };
        Ok(Some(range))
    }

    /// [`conv2d`](Self::conv2d) with weights from [`prepare_weights`](Self::prepare_weights).
    pub fn conv2d_prepared(
        &self,
        p: &Conv2dParams,
        input: &[f32],
        weights: &CpuWeights,
        bias: Option<&[f32]>,
        output: &mut [f32],
    ) -> Result<()> {
        p.validate()?;
        let path = self.path_for(p);
        if weights.shape != WeightShape::of(p) || weights.layout != path.layout() {
            return Err(Error::InvalidParams(format!(
                "the prepared weights are for {:?}, but the call has {:?}",
                weights.shape,
                WeightShape::of(p)
            )));
        }
        p.check_buffers(
            input.len(),
            p.weights_len(),
            bias.map(<[f32]>::len),
            output.len(),
        )?;
        let mut ws = lock(&self.workspace);
        let laid_out = &weights.data[weights.range.clone()];
        self.run(p, path, input, laid_out, bias, output, &mut ws)
    }

    /// Runs a checked call on `path`; `weights` are laid out for it.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        p: &Conv2dParams,
        path: CpuPath,
        input: &[f32],
        weights: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        ws: &mut Workspace,
    ) -> Result<()> {
        if let Some(v) = path.winograd() {
            return self.run_winograd(p, v, input, weights, bias, output, ws);
        }
        // Pointwise layers on the rows kernel read the input in place (see Geometry::pointwise).
        let (geo, in_place) = match (path == CpuPath::GemmRows)
            .then(|| Geometry::pointwise(p))
            .flatten()
        {
            Some(geo) => (geo, true),
            None => (Geometry::new(p), false),
        };
        let Workspace {
            planes, offsets, ..
        } = ws;
        geo.fill_offsets(p, offsets);
        let per_image_out = p.c_out * geo.ho * geo.wo;
        let images_per_chunk = (PLANES_BUDGET / geo.image_stride.max(1)).clamp(1, p.n);
        if !in_place {
            // The planes of one chunk, refused before any work if the machine cannot hold them.
            let len = images_per_chunk
                .saturating_mul(geo.image_stride)
                .saturating_add(geo.slack);
            crate::host_mem::grow(planes, len, "the CPU backend's phase planes")?;
        }
        self.pool().install(|| -> Result<()> {
            for (chunk, out) in output
                .chunks_mut(images_per_chunk * per_image_out)
                .enumerate()
            {
                let images = out.len() / per_image_out;
                let first = chunk * images_per_chunk;
                let planes: &[f32] = if in_place {
                    &input[first * geo.image_stride..(first + images) * geo.image_stride]
                } else {
                    let len = images * geo.image_stride + geo.slack;
                    geo.transform(p, input, first, images, &mut planes[..len]);
                    &planes[..len]
                };
                let shared = Shared {
                    p,
                    geo: &geo,
                    planes,
                    offsets,
                    weights,
                    bias,
                    path,
                };
                self.run_tasks(&shared, images, out)?;
            }
            Ok(())
        })
    }

    /// Winograd (see `winograd.rs`): tasks of whole tile rows of one image, each running the
    /// input transform, the `α²` GEMMs on the rows kernel (`weights` are the packed `U`) and the
    /// output transform (with the bias) in its thread's scratch.
    #[allow(clippy::too_many_arguments)]
    fn run_winograd(
        &self,
        p: &Conv2dParams,
        variant: crate::winograd::Variant,
        input: &[f32],
        weights: &[f32],
        bias: Option<&[f32]>,
        output: &mut [f32],
        ws: &mut Workspace,
    ) -> Result<()> {
        crate::winograd::check_applies(p)?;
        let (xi, m) = (variant.xi(), variant.m());
        let (th, tw) = crate::winograd::tiles(p, variant);
        let (ho, wo) = p.out_hw();
        // Tile rows per task: V and M within the budget, at least two tasks per thread, and the
        // tasks of a batch a whole number of rounds of the threads where the rows allow (one
        // short task would leave a thread idle at the end).
        let per_tile_row = xi * (p.c_in + p.c_out) * tw;
        let by_positions = WINOGRAD_TASK_POSITIONS.div_ceil(tw);
        let by_budget = (WINOGRAD_TASK_FLOATS / per_tile_row).max(1);
        let mut tasks_per_image = th.div_ceil(by_positions.min(by_budget).clamp(1, th));
        while p.n * tasks_per_image < 2 * self.threads && tasks_per_image < th {
            tasks_per_image += 1;
        }
        let rounds = (p.n * tasks_per_image).next_multiple_of(self.threads);
        if rounds.is_multiple_of(p.n) && rounds / p.n <= th {
            tasks_per_image = rounds / p.n;
        }
        let tr = th.div_ceil(tasks_per_image);
        let row = tr * tw;
        let pad = winograd::scratch_len(p, variant);
        let scratch_len = xi * (p.c_in + p.c_out) * row + pad;
        self.grow_scratch(scratch_len)?;
        let offsets = &mut ws.offsets;
        offsets.fill((0..p.c_in).map(|c| c * row));
        // Output rows m·ty0.. of every plane, one slice per (image, filter, task).
        let ntr = th.div_ceil(tr);
        let mut grid: Vec<Option<&mut [f32]>> = output
            .chunks_mut(ho * wo)
            .flat_map(|plane| plane.chunks_mut(m * tr * wo))
            .map(Some)
            .collect();
        let mut tasks = Vec::with_capacity(p.n * ntr);
        for img in 0..p.n {
            for t in 0..ntr {
                let outs: Vec<&mut [f32]> = (0..p.c_out)
                    .map(|k| {
                        grid[(img * p.c_out + k) * ntr + t]
                            .take()
                            .expect("each output tile has one owner")
                    })
                    .collect();
                tasks.push((img, (t * tr, ((t + 1) * tr).min(th)), outs));
            }
        }
        let offsets = &*offsets;
        self.pool().install(|| {
            tasks.into_par_iter().for_each(|(img, tys, mut outs)| {
                let slot = rayon::current_thread_index().expect("tasks run on the backend's pool");
                let mut scratch = lock(&self.scratch[slot]);
                let (v, rest) = scratch[..scratch_len].split_at_mut(xi * p.c_in * row);
                let (m, pad) = rest.split_at_mut(xi * p.c_out * row);
                winograd::input_transform(p, variant, input, img, tys, v, row, pad);
                let positions = (tys.1 - tys.0) * tw;
                self.winograd_gemm(p, xi, (positions, row), v, weights, offsets, m);
                winograd::output_transform(p, variant, m, row, tys, bias, &mut outs, pad);
            });
        });
        Ok(())
    }

    /// `M_ξ = U_ξ V_ξ` for `ξ < xi` and the first `positions` of each row of `v` (`[ξ][c]`,
    /// rows of `row` floats) into `m` (`[ξ][t][k]`: each tile's filters contiguous, no
    /// transposed store), on the rows kernel; `weights` are `U`, packed `[ξ][panel][c][16]`, and
    /// `offsets` are `c·row`.
    #[allow(clippy::too_many_arguments)]
    fn winograd_gemm(
        &self,
        p: &Conv2dParams,
        xi_count: usize,
        (positions, row): (usize, usize),
        v: &[f32],
        weights: &[f32],
        offsets: &TapOffsets,
        m: &mut [f32],
    ) {
        let (_, chunk) = row_chunks(positions, self.kernel.rows_positions());
        let per_call = self.kernel.rows_filters();
        let panels = p.c_out.div_ceil(MR);
        for xi in 0..xi_count {
            let group = &weights[xi * panels * p.c_in * MR..][..panels * p.c_in * MR];
            for pi in (0..panels).step_by(per_call / MR) {
                let filters = per_call.min(p.c_out - pi * MR);
                let a = &group[pi * p.c_in * MR..][..filters.div_ceil(MR) * p.c_in * MR];
                for x0 in (0..positions).step_by(chunk) {
                    let n = chunk.min(positions - x0);
                    let b = &v[xi * p.c_in * row + x0..];
                    let c = &mut m[(xi * row + x0) * p.c_out + pi * MR..];
                    let out = RowsOut::ByPosition;
                    (self.kernel).run_rows(n, a, offsets, b, c, p.c_out, filters, None, out);
                }
            }
        }
    }

    /// Cuts the output of `images` images into tasks and runs them on the pool.
    fn run_tasks(&self, s: &Shared, images: usize, out: &mut [f32]) -> Result<()> {
        let (p, geo) = (s.p, s.geo);
        let (rows, m_rows) = self.plan(s, images);
        let mg = p.c_out_per_group();
        let tiles = geo.ho.div_ceil(rows);
        let plane = geo.ho * geo.wo;
        self.grow_scratch(m_rows.next_multiple_of(MR) * BLOCK_Q.max(geo.wo))?;
        let mut tasks = Vec::with_capacity(images * p.groups * tiles * mg.div_ceil(m_rows));
        let chunks = |group: usize| {
            (group * mg..(group + 1) * mg)
                .step_by(m_rows)
                .map(move |m0| (m0, m_rows.min((group + 1) * mg - m0)))
        };
        if tiles == 1 {
            // Whole images: each task's filters are one contiguous run of planes.
            for (img, mut rest) in out.chunks_mut(p.c_out * plane).enumerate() {
                for group in 0..p.groups {
                    for (m0, filters) in chunks(group) {
                        let (mine, others) =
                            std::mem::take(&mut rest).split_at_mut(filters * plane);
                        rest = others;
                        tasks.push(Task {
                            img,
                            group,
                            y0: 0,
                            y1: geo.ho,
                            m0,
                            filters,
                            out: TaskOut::Planes(mine),
                        });
                    }
                }
            }
        } else {
            // Row tiles: image → filter → tile of `rows` rows, each handed to exactly one task.
            let mut grid: Vec<Option<&mut [f32]>> = out
                .chunks_mut(plane)
                .flat_map(|plane| plane.chunks_mut(rows * geo.wo))
                .map(Some)
                .collect();
            for img in 0..images {
                for group in 0..p.groups {
                    for t in 0..tiles {
                        for (m0, filters) in chunks(group) {
                            let outs = (m0..m0 + filters)
                                .map(|k| {
                                    grid[(img * p.c_out + k) * tiles + t]
                                        .take()
                                        .expect("each output tile has one owner")
                                })
                                .collect();
                            let (y0, y1) = (t * rows, ((t + 1) * rows).min(geo.ho));
                            tasks.push(Task {
                                img,
                                group,
                                y0,
                                y1,
                                m0,
                                filters,
                                out: TaskOut::Tiles(outs),
                            });
                        }
                    }
                }
            }
        }
        tasks.into_par_iter().for_each(|mut task| {
            let slot = rayon::current_thread_index().expect("tasks run on the backend's pool");
            let mut scratch = lock(&self.scratch[slot]);
            self.run_task(s, &mut task, &mut scratch[..]);
        });
        Ok(())
    }

    /// Grows every thread's scratch to at least `len` floats, before a call's tasks run (or
    /// refuses with an error where the machine cannot hold them). Work stealing decides which
    /// threads run tasks, so a slot grown inside a task could first grow many calls into a
    /// stream, which a leak check rightly sees as growth (leak/submit_wait_1000 saw exactly
    /// 16 KiB, one 16 × 256 tile, in some runs).
    fn grow_scratch(&self, len: usize) -> Result<()> {
        for slot in &self.scratch {
            crate::host_mem::grow(&mut lock(slot), len, "the CPU backend's scratch")?;
        }
        Ok(())
    }

    /// Rows per tile and filters per task: whole images and whole groups where that gives
    /// enough tasks to keep every thread busy; otherwise filters are split first (free, as the
    /// weights are packed once per call), then rows (each row tile re-reads the planes).
    fn plan(&self, s: &Shared, images: usize) -> (usize, usize) {
        let (p, geo) = (s.p, s.geo);
        let mg = p.c_out_per_group();
        let mut rows = geo.ho;
        // Split filters no finer than one kernel call takes (32 on the wide rows kernel).
        let min_filters = match s.path {
            CpuPath::GemmRows | CpuPath::Winograd | CpuPath::WinogradF4 => {
                self.kernel.rows_filters()
            }
            CpuPath::GemmStrips | CpuPath::Direct => MR,
        };
        let mut m_rows = match s.path {
            CpuPath::Direct => mg,
            _ => mg.next_multiple_of(MR),
        };
        loop {
            let tasks = images * p.groups * geo.ho.div_ceil(rows) * mg.div_ceil(m_rows);
            if tasks >= 2 * self.threads {
                break;
            } else if s.path.layout() != Layout::Given && m_rows > min_filters {
                m_rows = (m_rows / 2).next_multiple_of(min_filters);
            } else if rows > 1 {
                rows = rows.div_ceil(2);
            } else {
                break;
            }
        }
        (rows, m_rows)
    }

    /// Computes one task block by block, each block into scratch, then adds the bias and
    /// stores the valid outputs into the task's slices.
    fn run_task(&self, s: &Shared, task: &mut Task, scratch: &mut [f32]) {
        let (p, geo) = (s.p, s.geo);
        let rows_pad = task.filters.next_multiple_of(MR);
        let len = rows_pad * BLOCK_Q.max(geo.wo);
        // Grown for every slot by run_tasks (grow_scratch).
        let tile = &mut scratch[..len];
        let base = task.img * geo.image_stride
            + task.group * p.c_in_per_group() * geo.chan_stride
            + task.y0 * geo.wq;
        let b = &s.planes[base..];
        match s.path {
            // (Winograd never reaches here: `run` hands it to `run_winograd`, whose GEMMs call
            // the rows kernel themselves; it is grouped with the rows path it resembles.)
            CpuPath::GemmRows | CpuPath::Winograd | CpuPath::WinogradF4 => {
                self.task_rows(s, task, b, tile)
            }
            CpuPath::GemmStrips | CpuPath::Direct => self.task_strips(s, task, b, tile),
        }
    }

    /// The first packed panel of a task's filters, and the tap-block length.
    fn panels(&self, s: &Shared, task: &Task) -> (usize, usize) {
        let (p, kdim) = (s.p, s.p.reduction_len());
        let mg = p.c_out_per_group();
        let first = task.group * mg.div_ceil(MR) + (task.m0 - task.group * mg) / MR;
        (first, kdim.div_ceil(kdim.div_ceil(KC)))
    }

    /// Strips (and the direct path): blocks of [`BLOCK_Q`] consecutive grid positions.
    fn task_strips(&self, s: &Shared, task: &mut Task, b: &[f32], tile: &mut [f32]) {
        let geo = s.geo;
        let kdim = s.p.reduction_len();
        let rows = task.filters;
        let plane = geo.ho * geo.wo;
        let tq = (task.y1 - task.y0) * geo.wq;
        // Without junk columns, a task that owns whole planes needs no scratch and no copy.
        let direct =
            geo.wq == geo.wo && s.path != CpuPath::Direct && matches!(task.out, TaskOut::Planes(_));
        let (first_panel, kc_len) = self.panels(s, task);
        // Storing straight into planes whose length is a whole number of strips, the strips
        // start where the planes' cache lines do (one short strip first): each store then fills
        // whole cache lines instead of straddling two (exp1x1 n8 +5-15% here; the caller's
        // output is rarely 64-byte aligned). Which strip computes an output changes no bits.
        let shift = match &task.out {
            TaskOut::Planes(out) if direct && plane.is_multiple_of(NR) => {
                (NR - (out.as_ptr() as usize / std::mem::size_of::<f32>()) % NR) % NR
            }
            _ => 0,
        };
        let head = (shift > 0).then_some((0, shift.min(tq)));
        let blocks = (shift.min(tq)..tq)
            .step_by(BLOCK_Q)
            .map(|qa| (qa, tq.min(qa + BLOCK_Q)));
        for (qa, qb) in head.into_iter().chain(blocks) {
            if s.path == CpuPath::Direct {
                for (i, acc) in tile.chunks_exact_mut(BLOCK_Q).take(rows).enumerate() {
                    let w = &s.weights[(task.m0 + i) * kdim..][..kdim];
                    direct_sum(&mut acc[..qb - qa], w, s.offsets.as_slice(), &b[qa..]);
                }
            } else {
                for pi in 0..rows.div_ceil(MR) {
                    let a = &s.weights[(first_panel + pi) * kdim * MR..][..kdim * MR];
                    let filters = MR.min(rows - pi * MR);
                    // Every sum starts from the bias, whichever way the tile is stored, so an
                    // output's bits never depend on how the work was planned (threads, tiles).
                    let mut bias = ZEROS;
                    if let Some(b) = s.bias {
                        bias[..filters].copy_from_slice(&b[task.m0 + pi * MR..][..filters]);
                    }
                    for k0 in (0..kdim).step_by(kc_len) {
                        let kc = kc_len.min(kdim - k0);
                        let start = if k0 == 0 {
                            Start::Values(&bias)
                        } else {
                            Start::Accumulate
                        };
                        for j in (0..qb - qa).step_by(NR) {
                            let tile = match &mut task.out {
                                // Grid positions are output positions: store straight into the planes.
                                TaskOut::Planes(out) if direct => Tile {
                                    c: &mut out[pi * MR * plane + qa + j..],
                                    ldc: plane,
                                    filters,
                                    lanes: NR.min(qb - qa - j),
                                },
                                _ => Tile {
                                    c: &mut tile[pi * MR * BLOCK_Q + j..],
                                    ldc: BLOCK_Q,
                                    filters: MR,
                                    lanes: NR,
                                },
                            };
                            self.kernel.run(
                                &a[k0 * MR..],
                                s.offsets,
                                k0,
                                kc,
                                &b[qa + j..],
                                tile,
                                start,
                            );
                        }
                    }
                }
                if direct {
                    continue;
                }
            }
            // The valid columns of the block's rows into the task's output slices; the direct
            // path adds its bias here (the GEMM started from it).
            for i in 0..rows {
                let out = task.out.filter(i, plane);
                let bias = if s.path == CpuPath::Direct {
                    s.bias.map(|b| b[task.m0 + i])
                } else {
                    None
                };
                let src = &tile[i * BLOCK_Q..][..qb - qa];
                for y in qa / geo.wq..qb.div_ceil(geo.wq) {
                    let x0 = (y * geo.wq).max(qa) - y * geo.wq;
                    let x1 = (qb - y * geo.wq).min(geo.wo);
                    if x0 < x1 {
                        let from = &src[y * geo.wq + x0 - qa..][..x1 - x0];
                        let to = &mut out[y * geo.wo + x0..y * geo.wo + x1];
                        match bias {
                            Some(bias) => to.iter_mut().zip(from).for_each(|(o, &v)| *o = v + bias),
                            None => to.copy_from_slice(from),
                        }
                    }
                }
            }
        }
    }

    /// Rows: blocks of whole output rows (about [`BLOCK_Q`] positions), each row in chunks of
    /// at most 16 valid positions. A task that owns whole planes has the kernel add the bias and
    /// store straight into the output; otherwise the kernel leaves `[filter][position]` in the
    /// scratch tile, which is then copied into the task's row tiles.
    fn task_rows(&self, s: &Shared, task: &mut Task, b: &[f32], tile: &mut [f32]) {
        let geo = s.geo;
        let kdim = s.p.reduction_len();
        let rows = task.filters;
        let plane = geo.ho * geo.wo;
        let (first_panel, _) = self.panels(s, task);
        let (_, chunk) = row_chunks(geo.wo, self.kernel.rows_positions());
        let block_rows = (BLOCK_Q / geo.wo).max(1);
        for ya in (0..task.y1 - task.y0).step_by(block_rows) {
            let yb = (task.y1 - task.y0).min(ya + block_rows);
            let positions = (yb - ya) * geo.wo;
            // Panels of 16 filters, as many per call as the kernel takes (the task's filters
            // are in one group, whose panels are contiguous).
            for pi in (0..rows.div_ceil(MR)).step_by(self.kernel.rows_filters() / MR) {
                let filters = self.kernel.rows_filters().min(rows - pi * MR);
                let a = &s.weights[(first_panel + pi) * kdim * MR..]
                    [..filters.div_ceil(MR) * kdim * MR];
                let bias = s.bias.map(|bias| &bias[task.m0 + pi * MR..][..filters]);
                for y in ya..yb {
                    for x0 in (0..geo.wo).step_by(chunk) {
                        let n = chunk.min(geo.wo - x0);
                        let b = &b[y * geo.wq + x0..];
                        match &mut task.out {
                            TaskOut::Planes(out) => {
                                let c = &mut out[pi * MR * plane + y * geo.wo + x0..];
                                self.kernel.run_rows(
                                    n,
                                    a,
                                    s.offsets,
                                    b,
                                    c,
                                    plane,
                                    filters,
                                    bias,
                                    RowsOut::ByFilter,
                                );
                            }
                            TaskOut::Tiles(_) => {
                                let c = &mut tile[pi * MR * positions + (y - ya) * geo.wo + x0..];
                                self.kernel.run_rows(
                                    n,
                                    a,
                                    s.offsets,
                                    b,
                                    c,
                                    positions,
                                    filters,
                                    bias,
                                    RowsOut::ByFilter,
                                );
                            }
                        }
                    }
                }
            }
            if let TaskOut::Tiles(outs) = &mut task.out {
                // Each filter's contiguous outputs (bias included) into the task's row tiles.
                for (i, out) in outs.iter_mut().enumerate() {
                    out[ya * geo.wo..yb * geo.wo]
                        .copy_from_slice(&tile[i * positions..][..positions]);
                }
            }
        }
    }
}

/// Packs the weights `[filter][tap]` into `[group][panel of 16 filters][tap][16]`, in parallel;
/// rows past the last filter of a group repeat it (computed, never stored).
///
/// Returns where in `packed` the panels are: from its first 64-byte boundary, so that each row of
/// a panel (16 floats) is one cache line and no vector load of A splits across two (an A
/// misaligned by 16 bytes cost the rows kernel 7% here).
fn pack_weights(
    p: &Conv2dParams,
    weights: &[f32],
    packed: &mut Vec<f32>,
) -> std::ops::Range<usize> {
    let (kdim, mg) = (p.reduction_len(), p.c_out_per_group());
    let panels = mg.div_ceil(MR);
    let len = p.groups * panels * kdim * MR;
    packed.resize(len + MR, 0.0);
    let start = packed.as_ptr().align_offset(64).min(MR);
    packed[start..start + len]
        .par_chunks_mut(kdim * MR)
        .enumerate()
        .for_each(|(idx, panel)| {
            let (g, pi) = (idx / panels, idx % panels);
            for i in 0..MR {
                let m = g * mg + (pi * MR + i).min(mg - 1);
                for (k, &v) in weights[m * kdim..][..kdim].iter().enumerate() {
                    panel[k * MR + i] = v;
                }
            }
        });
    start..start + len
}

/// `acc[q] = Σ_t w[t] · b[q + offs[t]]`, four taps at a time.
fn direct_sum(acc: &mut [f32], w: &[f32], offs: &[usize], b: &[f32]) {
    let n = acc.len();
    acc.fill(0.0);
    let src = |t: usize| &b[offs[t]..][..n];
    let mut t = 0;
    while t + 4 <= w.len() {
        let (s0, s1, s2, s3) = (src(t), src(t + 1), src(t + 2), src(t + 3));
        let (w0, w1, w2, w3) = (w[t], w[t + 1], w[t + 2], w[t + 3]);
        for i in 0..n {
            acc[i] += w0 * s0[i] + w1 * s1[i] + w2 * s2[i] + w3 * s3[i];
        }
        t += 4;
    }
    for (t, &w0) in w.iter().enumerate().skip(t) {
        let s0 = src(t);
        for i in 0..n {
            acc[i] += w0 * s0[i];
        }
    }
}

impl Drop for CpuBackend {
    /// Ends the pool and waits (up to ten seconds, never forever) until its threads have
    /// exited, so that a dropped backend leaves no thread and no allocation behind.
    fn drop(&mut self) {
        drop(self.pool.take());
        let (count, done) = &*self.running;
        let guard = lock(count);
        let (left, _) = done
            .wait_timeout_while(guard, Duration::from_secs(10), |n| *n > 0)
            .unwrap_or_else(|e| e.into_inner());
        debug_assert_eq!(*left, 0, "CPU pool threads still running after drop");
    }
}

/// Locks a workspace; a panic in an earlier call leaves nothing that the next call relies on
/// (every call re-initialises what it reads), so a poisoned lock is taken over.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::conv_data;
    use crate::tolerance::{compare, Tolerance};

    fn check(p: Conv2dParams, backend: &CpuBackend, exact: bool, with_bias: bool) {
        let (x, w, b) = conv_data(&p, 7, exact);
        let bias = with_bias.then_some(&b[..]);
        let mut y = vec![f32::NAN; p.output_len()];
        backend.conv2d(&p, &x, &w, bias, &mut y).unwrap();
        let path = backend.path_for(&p);
        // Small integers are exact on every path but F(4×4) Winograd (whose G has 1/6).
        let tol = if exact && path.exact_on_small_integers() {
            Tolerance::Exact
        } else {
            path.tolerance()
        };
        let r = crate::tolerance::reference(&p, &x, &w, bias, tol);
        if let Err(m) = compare(&p, &y, &r.unwrap(), tol) {
            panic!(
                "{p} ({:?}, {:?}): {m}",
                backend.path_for(&p),
                backend.microkernel()
            );
        }
    }

    /// Every path with the best microkernel and with the portable one, and the default choice.
    fn backends() -> Vec<CpuBackend> {
        let mut all = vec![];
        for (i, kernel) in supported().into_iter().enumerate() {
            all.push(CpuBackend::with_options(2 + i, kernel).unwrap());
            for path in [CpuPath::GemmStrips, CpuPath::GemmRows, CpuPath::Direct] {
                all.push(
                    CpuBackend::with_options(1 + i, kernel)
                        .unwrap()
                        .with_path(path),
                );
            }
        }
        all
    }

    /// Every microkernel this CPU runs.
    fn supported() -> Vec<Microkernel> {
        (Microkernel::ALL.into_iter())
            .filter(|k| k.supported())
            .collect()
    }

    #[test]
    fn gemm_and_direct_paths_cover_every_feature() {
        let cases = [
            Conv2dParams::new(2, 5, 9, 11, 20, 3, 3).with_padding(1, 1),
            Conv2dParams::new(1, 3, 23, 23, 17, 7, 7)
                .with_stride(2, 2)
                .with_padding(3, 3),
            Conv2dParams::new(3, 16, 6, 7, 33, 1, 1),
            Conv2dParams::new(1, 8, 13, 9, 16, 3, 2)
                .with_stride(2, 3)
                .with_padding(2, 1)
                .with_dilation(2, 1),
            Conv2dParams::new(2, 12, 10, 10, 12, 3, 3)
                .with_padding(1, 1)
                .with_groups(12),
            Conv2dParams::new(1, 8, 9, 9, 16, 3, 3)
                .with_padding(2, 2)
                .with_dilation(2, 2)
                .with_groups(2),
            Conv2dParams::new(1, 6, 7, 7, 12, 3, 3)
                .with_stride(2, 1)
                .with_groups(3),
            Conv2dParams::new(1, 1, 1, 1, 1, 1, 1),
            Conv2dParams::new(1, 300, 5, 5, 18, 3, 3).with_padding(1, 1),
            // Strides larger than the kernel: phases no tap reads get no plane.
            Conv2dParams::new(2, 3, 20, 23, 16, 2, 3)
                .with_stride(7, 5)
                .with_padding(1, 1),
            Conv2dParams::new(1, 4, 9, 9, 6, 2, 2)
                .with_stride(4, 3)
                .with_dilation(2, 1)
                .with_groups(2),
        ];
        for b in backends() {
            for p in cases {
                check(p, &b, false, true);
                check(p, &b, true, false);
                check(p, &b, true, true);
            }
        }
    }

    /// Padding that differs between the two sides of an axis (ONNX pads, SAME with even
    /// kernels or strides): more after than before, more before than after, one side only, on
    /// every path and microkernel, in tolerance and bit-exact.
    #[test]
    fn uneven_padding_on_every_path() {
        let cases = [
            Conv2dParams::new(1, 4, 8, 8, 16, 2, 2).with_pads(0, 0, 1, 1),
            Conv2dParams::new(2, 5, 9, 11, 20, 3, 3).with_pads(2, 0, 0, 3),
            Conv2dParams::new(1, 3, 15, 13, 17, 4, 4)
                .with_stride(2, 2)
                .with_pads(1, 1, 2, 2),
            Conv2dParams::new(1, 8, 13, 9, 16, 3, 2)
                .with_stride(2, 3)
                .with_pads(0, 2, 3, 0)
                .with_dilation(2, 1),
            Conv2dParams::new(2, 12, 10, 10, 12, 3, 3)
                .with_pads(1, 0, 2, 1)
                .with_groups(12),
            Conv2dParams::new(1, 16, 6, 7, 32, 1, 1).with_pads(0, 0, 1, 2),
            // The last rows read only padding, past a plane's guard row.
            Conv2dParams::new(1, 4, 6, 6, 16, 3, 3).with_pads(0, 1, 3, 0),
        ];
        for b in backends() {
            for p in cases {
                check(p, &b, false, true);
                check(p, &b, true, false);
            }
        }
    }

    /// Regression (found by the property tests): the last row of a phase plane read past its
    /// end into the next plane, whose first column held data (stride 2, padding 1 on w).
    #[test]
    fn regression_row_spill_across_phase_planes() {
        for b in backends() {
            check(
                Conv2dParams::new(1, 1, 3, 3, 1, 2, 3)
                    .with_stride(1, 2)
                    .with_padding(0, 1),
                &b,
                true,
                false,
            );
            check(
                Conv2dParams::new(1, 2, 3, 7, 9, 2, 3)
                    .with_stride(3, 2)
                    .with_padding(0, 1),
                &b,
                false,
                true,
            );
        }
    }

    /// Where the output starts in memory moves where the strips of a task that stores straight
    /// into its planes begin (on the planes' cache lines): never which bits come out, and
    /// nothing outside the output is written.
    #[test]
    fn results_do_not_depend_on_the_outputs_alignment() {
        // Planes of 64 and of 48 floats (whole strips), and of 35 (not: no shift).
        let cases = [
            Conv2dParams::new(2, 8, 8, 8, 32, 1, 1),
            Conv2dParams::new(1, 16, 8, 6, 24, 3, 3).with_padding(1, 1),
            Conv2dParams::new(1, 4, 7, 5, 16, 1, 1),
        ];
        for p in cases {
            let (x, w, b) = conv_data(&p, 4, false);
            let len = p.output_len();
            let mut runs = Vec::new();
            for kernel in supported() {
                let cpu = CpuBackend::with_options(2, kernel)
                    .unwrap()
                    .with_path(CpuPath::GemmStrips);
                for offset in 0..NR {
                    let mut buf = vec![-7.0f32; len + 2 * NR];
                    let y = &mut buf[offset..offset + len];
                    cpu.conv2d(&p, &x, &w, Some(&b), y).unwrap();
                    assert!(buf[..offset].iter().all(|&v| v == -7.0), "{p}: {offset}");
                    assert!(
                        buf[offset + len..].iter().all(|&v| v == -7.0),
                        "{p}: {offset}"
                    );
                    let bits: Vec<u32> = buf[offset..][..len].iter().map(|v| v.to_bits()).collect();
                    runs.push((kernel.numerics(), bits));
                }
            }
            for pair in runs.windows(2) {
                if pair[0].0 == pair[1].0 {
                    assert!(pair[0].1 == pair[1].1, "{p}: bits depend on alignment");
                }
            }
            let r = crate::reference::conv2d_f64(&p, &x, &w, Some(&b)).unwrap();
            for (_, bits) in &runs {
                let y: Vec<f32> = bits.iter().map(|&v| f32::from_bits(v)).collect();
                compare(&p, &y, &r, Tolerance::Fp32).unwrap();
            }
        }
    }

    /// An output's bits never depend on the thread count (which changes how work is cut into
    /// tasks and which outputs go through scratch): fingerprints are valid on any machine.
    #[test]
    fn results_are_bit_identical_for_every_thread_count() {
        let cases = [
            Conv2dParams::new(2, 16, 14, 14, 32, 3, 3).with_padding(1, 1),
            Conv2dParams::new(1, 16, 17, 15, 32, 3, 3)
                .with_padding(2, 2)
                .with_dilation(2, 2)
                .with_groups(4),
            Conv2dParams::new(1, 3, 30, 30, 16, 7, 7)
                .with_stride(2, 2)
                .with_padding(3, 3),
            Conv2dParams::new(2, 24, 9, 9, 24, 3, 3)
                .with_padding(1, 1)
                .with_groups(24),
            Conv2dParams::new(1, 256, 7, 7, 40, 1, 1),
        ];
        for p in cases {
            let (x, w, b) = conv_data(&p, 9, false);
            for path in [None, Some(CpuPath::GemmStrips), Some(CpuPath::GemmRows)] {
                // Every thread count, and every variant with the best kernel's numerics.
                let best = Microkernel::detect().numerics();
                let runs = [1, 2, 3, 5].into_iter().flat_map(|threads| {
                    (supported().into_iter())
                        .filter(move |k| k.numerics() == best)
                        .map(move |k| (threads, k))
                });
                let outputs: Vec<Vec<u32>> = runs
                    .map(|(threads, kernel)| {
                        let mut cpu = CpuBackend::with_options(threads, kernel).unwrap();
                        if let Some(path) = path {
                            cpu = cpu.with_path(path);
                        }
                        let mut y = vec![0.0; p.output_len()];
                        cpu.conv2d(&p, &x, &w, Some(&b), &mut y).unwrap();
                        y.iter().map(|v| v.to_bits()).collect()
                    })
                    .collect();
                assert!(
                    outputs.windows(2).all(|o| o[0] == o[1]),
                    "{p} {path:?}: bits differ between thread counts or kernel variants"
                );
            }
        }
    }

    /// Winograd forced, with every microkernel and several thread counts: odd and even output
    /// sizes, padding 0, 1, 2 and per side, filters that are not whole panels or pairs,
    /// several images (tasks split tile rows within images); exact on small integers; the
    /// same bits for every thread count and for prepared weights.
    #[test]
    fn winograd_matches_the_reference_on_every_kernel() {
        let cases = [
            Conv2dParams::new(2, 20, 9, 7, 24, 3, 3).with_padding(1, 1),
            Conv2dParams::new(1, 33, 6, 10, 40, 3, 3),
            Conv2dParams::new(3, 16, 5, 5, 70, 3, 3).with_padding(2, 2),
            Conv2dParams::new(1, 3, 4, 4, 1, 3, 3),
            Conv2dParams::new(2, 20, 9, 8, 24, 3, 3).with_pads(0, 2, 3, 1),
            Conv2dParams::new(1, 8, 30, 3, 16, 3, 3).with_padding(1, 1),
        ];
        for (kernel, path) in supported()
            .into_iter()
            .flat_map(|k| [(k, CpuPath::Winograd), (k, CpuPath::WinogradF4)])
        {
            for (i, p) in cases.iter().enumerate() {
                let cpu = CpuBackend::with_options(1 + i % 3, kernel)
                    .unwrap()
                    .with_path(path);
                check(*p, &cpu, false, i % 2 == 0);
                check(*p, &cpu, true, true);
                let (x, w, b) = conv_data(p, 3, false);
                let bits = |cpu: &CpuBackend, prepared: bool| {
                    let mut y = vec![0.0f32; p.output_len()];
                    if prepared {
                        let pw = cpu.prepare_weights(p, &w).unwrap();
                        cpu.conv2d_prepared(p, &x, &pw, Some(&b), &mut y).unwrap();
                    } else {
                        cpu.conv2d(p, &x, &w, Some(&b), &mut y).unwrap();
                    }
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                let one = bits(&cpu, false);
                assert_eq!(one, bits(&cpu, true), "{p}: prepared weights differ");
                let five = CpuBackend::with_options(5, kernel).unwrap().with_path(path);
                assert_eq!(one, bits(&five, false), "{p}: bits depend on threads");
            }
        }
    }

    /// The CPU's name keys perf baselines: never empty (the architecture where the model is
    /// unknown).
    #[test]
    fn the_cpu_has_a_name() {
        let model = cpu_model();
        assert!(!model.trim().is_empty());
        if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
            if info.contains("model name") {
                assert!(info.contains(&model), "{model:?} is not in /proc/cpuinfo");
            }
        }
    }

    #[test]
    fn winograd_where_it_pays_and_only_where_it_applies() {
        let big = Conv2dParams::new(1, 256, 14, 14, 256, 3, 3).with_padding(1, 1);
        assert_eq!(CpuPath::for_params(&big), CpuPath::Winograd);
        assert_eq!(
            CpuPath::for_params(&big.with_stride(2, 2)),
            CpuPath::GemmRows
        );
        // F(4×4) where a row has 14 tiles of it (56 outputs).
        let wide = Conv2dParams::new(1, 64, 56, 56, 64, 3, 3).with_padding(1, 1);
        assert_eq!(CpuPath::for_params(&wide), CpuPath::WinogradF4);
        let narrower = Conv2dParams::new(1, 64, 56, 52, 64, 3, 3).with_padding(1, 1);
        assert_eq!(CpuPath::for_params(&narrower), CpuPath::Winograd);
        let narrow = Conv2dParams::new(1, 32, 56, 56, 64, 3, 3).with_padding(1, 1);
        assert_eq!(CpuPath::for_params(&narrow).winograd(), None);
        let small = Conv2dParams::new(1, 64, 5, 5, 64, 3, 3).with_padding(1, 1);
        assert_eq!(CpuPath::for_params(&small).winograd(), None);
        // Forced where it does not apply: an error, and the output untouched.
        let strided = Conv2dParams::new(1, 8, 9, 9, 16, 3, 3).with_stride(2, 2);
        for path in [CpuPath::Winograd, CpuPath::WinogradF4] {
            let cpu = CpuBackend::with_threads(2).unwrap().with_path(path);
            let (x, w, _) = conv_data(&strided, 1, false);
            let mut y = vec![7.0; strided.output_len()];
            let err = cpu.conv2d(&strided, &x, &w, None, &mut y).unwrap_err();
            assert!(err.to_string().contains("does not apply"), "{err}");
            assert!(y.iter().all(|&v| v == 7.0));
            assert!(cpu.prepare_weights(&strided, &w).is_err());
        }
    }

    #[test]
    fn errors_leave_the_output_untouched() {
        let b = CpuBackend::with_threads(1).unwrap();
        let p = Conv2dParams::new(1, 2, 4, 4, 2, 3, 3);
        let mut y = vec![7.0; 8];
        assert!(b.conv2d(&p, &[0.0; 31], &[0.0; 36], None, &mut y).is_err());
        assert!(b
            .conv2d(&p, &[0.0; 32], &[0.0; 36], None, &mut y[..7])
            .is_err());
        assert!(b
            .conv2d(&Conv2dParams { c_in: 0, ..p }, &[], &[], None, &mut y)
            .is_err());
        assert_eq!(y, vec![7.0; 8]);
    }

    #[test]
    fn prepared_weights_give_the_same_result_and_must_fit() {
        let b = CpuBackend::with_threads(2).unwrap();
        for p in [
            Conv2dParams::new(2, 6, 9, 9, 20, 3, 3).with_padding(1, 1),
            Conv2dParams::new(1, 6, 9, 9, 6, 3, 3).with_groups(6),
        ] {
            let (x, w, bias) = conv_data(&p, 3, false);
            let mut y1 = vec![0.0; p.output_len()];
            let mut y2 = vec![1.0; p.output_len()];
            b.conv2d(&p, &x, &w, Some(&bias), &mut y1).unwrap();
            let prepared = b.prepare_weights(&p, &w).unwrap();
            b.conv2d_prepared(&p, &x, &prepared, Some(&bias), &mut y2)
                .unwrap();
            assert_eq!(y1, y2, "{p}");
            // The same filters on other images fit; other filters do not.
            let other = Conv2dParams {
                n: 1,
                h: 5,
                w: 7,
                ..p
            };
            let (x, _, _) = conv_data(&other, 3, false);
            let mut y = vec![0.0; other.output_len()];
            b.conv2d_prepared(&other, &x, &prepared, None, &mut y)
                .unwrap();
            let wrong = Conv2dParams { k_w: 1, ..p };
            let e = b
                .conv2d_prepared(&wrong, &x, &prepared, None, &mut y)
                .unwrap_err();
            assert!(e.to_string().contains("prepared weights"), "{e}");
        }
        assert!(b
            .prepare_weights(&Conv2dParams::new(1, 1, 3, 3, 8, 3, 3), &[0.0; 71])
            .is_err());
    }

    #[test]
    fn bad_options_are_errors() {
        assert!(CpuBackend::with_threads(0).is_err());
    }
}
