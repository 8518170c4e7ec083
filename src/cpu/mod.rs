//! The CPU backend: every feature of the reference, fast, on rayon threads.
//!
//! How a call runs (see `planes.rs` for the layout trick that makes it an implicit GEMM):
//! 1. the input of a chunk of images is copied once into phase planes (zero-padded, split by
//!    stride phase), and the offset of every tap `(c, r, s)` is tabulated; a pointwise layer
//!    on the rows kernel reads its input in place instead (`Geometry::pointwise`); where each
//!    task computes a whole image (or group), the task builds its planes itself, on its thread,
//!    right before it reads them (`Planes::PerTask`);
//! 2. the output is cut into tasks (image, group, a tile of whole output rows, a range of
//!    filters), run in parallel, about two per thread; [`CpuPath::for_params`] picks the path:
//!    - **GEMM, strips** (`kernel/`): for each panel of 16 filters and each block of at most
//!      [`KC`] taps, the 16×16 microkernel runs over every strip of 16 grid positions (junk
//!      columns included);
//!    - **GEMM, rows**: up to 16 valid positions of one row × 16 filters over every tap, the
//!      tile stored transposed; chosen where it computes fewer lanes than strips;
//!    - **row sums** (fewer than [`GEMM_MIN_FILTERS`] filters per group: depthwise and narrow
//!      grouped layers, where a GEMM would waste most of each 16-wide panel): each output plane
//!      is a sum of shifted rows of the planes (`acc[q] += w · planes[q + off]`), four taps at
//!      a time;
//!    - **Winograd** F(2×2, 3×3) or F(4×4, 3×3) for wide 3×3 stride-1 layers: tasks of its own,
//!      whole tile rows of one image through the input transform, the GEMMs on the rows kernel
//!      and the output transform (`winograd.rs`);
//! 3. a task that owns whole output planes has the GEMM kernels store straight into them;
//!    otherwise it computes into a per-thread scratch tile and copies the valid outputs into
//!    its own disjoint slices (split safely with `chunks_mut`; no raw pointers cross threads).
//!    Every GEMM sum starts from the bias, so an output's bits do not depend on the plan or the
//!    thread count; the row-sums path adds the bias when it copies out.
//!
//! Weights are packed `[group][panel of 16 filters][tap][16]` once per call, or once for good
//! with [`CpuBackend::prepare_weights`]. Workspaces (the planes, the offsets, one scratch buffer
//! and one image's planes per thread) belong to the backend and are reused: a warm call
//! allocates only a few small task vectors.
//! Why not a GEMM crate: every crate takes B as a strided matrix, which forces an im2col copy
//! `k_h·k_w` times the input; an implicit GEMM needs B read through a tap-offset table.

#![deny(unsafe_code)]

mod calibrate;
#[allow(unsafe_code)] // The SIMD microkernel; every block carries a SAFETY line.
mod kernel;
mod path;
mod planes;
mod team;
mod winograd;

pub use calibrate::{calibration, fma_peak_threads, Calibration};
pub use kernel::Microkernel;
pub use path::CpuPath;

use crate::error::{Error, Result};
use crate::params::Conv2dParams;
use kernel::{RowsOut, Start, TapOffsets, Tile, MR, NR, ZEROS};
use path::Layout;
use planes::Geometry;
use std::sync::{Mutex, MutexGuard};
use team::Team;

/// Largest number of taps in one weight block (keeps a 16×KC panel of weights in L1).
pub const KC: usize = 256;
/// Groups with fewer filters than this use the row-sums path instead of the GEMM.
pub const GEMM_MIN_FILTERS: usize = 8;
/// Strips of 16 output positions computed together inside a task (their B data stays in L2).
const BLOCK_STRIPS: usize = 16;
/// Output positions per block.
const BLOCK_Q: usize = BLOCK_STRIPS * NR;
/// Whether tasks that compute whole images build their own planes ([`Planes::PerTask`]):
/// `SPORKLE_CPU_PLANES=shared` builds them for the whole chunk first (for measuring).
fn per_task_planes() -> bool {
    static PER_TASK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PER_TASK.get_or_init(|| {
        crate::gpu::knob::knob("SPORKLE_CPU_PLANES", |v| match v {
            "shared" => Ok(false),
            "per-task" => Ok(true),
            _ => Err("expected shared or per-task".into()),
        })
        .unwrap_or(true)
    })
}

/// Phase planes are built for at most this many floats of images at once (128 MiB).
const PLANES_BUDGET: usize = 32 << 20;

/// The CPU convolution backend. Cheap to call repeatedly: its workspaces are kept.
pub struct CpuBackend {
    team: Team,
    kernel: Microkernel,
    path: Option<CpuPath>,
    /// Workspaces no call holds: a call takes one (or a new one) and puts it back, so no lock
    /// is held across a call. A caller on another rayon pool's worker may run a second call on
    /// the same thread while it waits for the first one's workers (rayon's waits take other
    /// jobs); a lock held across the call deadlocked it.
    idle: Mutex<Vec<Workspace>>,
    scratch: Vec<Mutex<Vec<f32>>>,
    /// Each thread's phase planes of one image ([`Planes::PerTask`]) and its row buffer.
    own_planes: Vec<Mutex<(Vec<f32>, Vec<f32>)>>,
}

/// A workspace taken by one call; it goes back to the backend's idle ones on drop.
struct Lease<'a> {
    idle: &'a Mutex<Vec<Workspace>>,
    ws: Workspace,
}

impl std::ops::Deref for Lease<'_> {
    type Target = Workspace;
    fn deref(&self) -> &Workspace {
        &self.ws
    }
}

impl std::ops::DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Workspace {
        &mut self.ws
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        lock(self.idle).push(std::mem::take(&mut self.ws));
    }
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

/// Where a task's phase planes come from.
#[derive(Clone, Copy)]
enum Planes<'a> {
    /// Built for the whole chunk before its tasks run (or the input itself, pointwise).
    Built(&'a [f32]),
    /// Built by each task, for its own image and group, on its thread into that thread's
    /// buffer, right before it reads them (the images from `first` on of `input`), so that
    /// they stay in the core's cache: planes built for a whole chunk first had gone out to
    /// memory and come back (l2 s2 n8 spent a fifth of its time building them on the GPU
    /// machine's Intel host, at 0.7 GB/s, and on one thread its GEMM ran 1.3-1.5x faster on
    /// planes not just rebuilt). Only where no two tasks share an image's planes.
    PerTask { input: &'a [f32], first: usize },
}

/// Everything a task reads.
struct Shared<'a> {
    p: &'a Conv2dParams,
    geo: &'a Geometry,
    planes: Planes<'a>,
    offsets: &'a TapOffsets,
    /// Laid out for `path`: packed panels for the GEMM, as given for the row-sums path.
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
        if !kernel.supported() {
            return Err(Error::Cpu(format!(
                "the {} microkernel is not supported by this CPU",
                kernel.name()
            )));
        }
        Ok(Self {
            team: Team::new(threads)?,
            kernel,
            path: None,
            idle: Mutex::default(),
            scratch: (0..threads).map(|_| Mutex::default()).collect(),
            own_planes: (0..threads).map(|_| Mutex::default()).collect(),
        })
    }

    /// An idle workspace (or a new one) for one call, put back when the call ends.
    fn workspace(&self) -> Lease<'_> {
        let ws = lock(&self.idle).pop().unwrap_or_default();
        Lease {
            idle: &self.idle,
            ws,
        }
    }

    /// Threads this backend uses.
    pub fn threads(&self) -> usize {
        self.team.threads()
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
        let mut ws = self.workspace();
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
            Layout::Packed => pack_weights(&self.team, p, weights, into),
            Layout::Winograd(v) => {
                crate::winograd::check_applies(p)?;
                let u = crate::winograd::transform_weights(p, weights, v);
                let gp = crate::winograd::gemm_params(p, v);
                pack_weights(&self.team, &gp, &u, into)
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
        let mut ws = self.workspace();
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
            return winograd::run(self, p, v, (input, weights, bias), output, &mut ws.offsets);
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
        // The plans of a whole chunk and of the last one, which may be smaller.
        let last = p.n - (p.n.div_ceil(images_per_chunk) - 1) * images_per_chunk;
        let plans = [images_per_chunk, last].map(|images| self.plan(p, &geo, path, images));
        // Each task builds its own planes where it computes a whole image (or group).
        let per_task = |(rows, m_rows): (usize, usize)| {
            !in_place && per_task_planes() && rows == geo.ho && m_rows >= p.c_out_per_group()
        };
        if plans.into_iter().any(per_task) {
            let len = geo.image_stride.saturating_add(geo.slack);
            for slot in &self.own_planes {
                crate::host_mem::grow(&mut lock(slot).0, len, "the CPU backend's phase planes")?;
            }
        }
        if !in_place && !plans.into_iter().all(per_task) {
            // The planes of one chunk, refused before any work if the machine cannot hold them.
            let len = images_per_chunk
                .saturating_mul(geo.image_stride)
                .saturating_add(geo.slack);
            crate::host_mem::grow(planes, len, "the CPU backend's phase planes")?;
        }
        for (chunk, out) in output
            .chunks_mut(images_per_chunk * per_image_out)
            .enumerate()
        {
            let images = out.len() / per_image_out;
            let first = chunk * images_per_chunk;
            let plan = plans[usize::from(images < images_per_chunk)];
            let planes = if in_place {
                Planes::Built(&input[first * geo.image_stride..(first + images) * geo.image_stride])
            } else if per_task(plan) {
                Planes::PerTask { input, first }
            } else {
                let len = images * geo.image_stride + geo.slack;
                geo.transform(&self.team, p, input, first, images, &mut planes[..len]);
                Planes::Built(&planes[..len])
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
            self.run_tasks(&shared, images, plan, out)?;
        }
        Ok(())
    }

    /// Cuts the output of `images` images into tasks and runs them on the team.
    fn run_tasks(
        &self,
        s: &Shared,
        images: usize,
        (rows, m_rows): (usize, usize),
        out: &mut [f32],
    ) -> Result<()> {
        let (p, geo) = (s.p, s.geo);
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
        let run = |(): &mut (), slot: usize, mut task: Task| {
            let task = &mut task;
            let mut scratch = lock(&self.scratch[slot]);
            match s.planes {
                Planes::Built(planes) => self.run_task(s, task, planes, &mut scratch[..]),
                Planes::PerTask { input, first } => {
                    let mut own = lock(&self.own_planes[slot]);
                    let (planes, line) = &mut *own;
                    let planes = &mut planes[..geo.image_stride + geo.slack];
                    let cpg = p.c_in_per_group();
                    let channels = task.group * cpg..(task.group + 1) * cpg;
                    geo.transform_channels(p, input, first + task.img, channels, planes, line);
                    self.run_task(s, task, planes, &mut scratch[..]);
                }
            }
        };
        let cost = |t: &Task| (t.y1 - t.y0) * t.filters.next_multiple_of(MR);
        let even = tasks.iter().all(|t| cost(t) == cost(&tasks[0]));
        self.team.spread(tasks, even, || (), run);
        Ok(())
    }

    /// Grows every thread's scratch to at least `len` floats, before a call's tasks run (or refuses
    /// with an error where the machine cannot hold them). Which threads run tasks is decided as
    /// they run (a queue, a late worker), so a slot grown inside a task could first grow many calls
    /// into a stream, which a leak check rightly sees as growth (leak/submit_wait_1000 saw exactly
    /// 16 KiB, one 16 × 256 tile, in some runs).
    fn grow_scratch(&self, len: usize) -> Result<()> {
        for slot in &self.scratch {
            crate::host_mem::grow(&mut lock(slot), len, "the CPU backend's scratch")?;
        }
        Ok(())
    }

    /// Rows per tile and filters per task: whole images and whole groups where that gives
    /// enough tasks to keep every thread busy; otherwise filters are split first (free, as the
    /// weights are packed once per call), then, unless the whole planes already share evenly
    /// among the threads, rows (each row tile re-reads the planes).
    fn plan(
        &self,
        p: &Conv2dParams,
        geo: &Geometry,
        path: CpuPath,
        images: usize,
    ) -> (usize, usize) {
        let mg = p.c_out_per_group();
        let mut rows = geo.ho;
        // Split filters no finer than one kernel call takes (32 on the wide rows kernel).
        let min_filters = match path {
            CpuPath::GemmRows | CpuPath::Winograd | CpuPath::WinogradF4 => {
                self.kernel.rows_filters()
            }
            CpuPath::GemmStrips | CpuPath::RowSums => MR,
        };
        let mut m_rows = match path {
            CpuPath::RowSums => mg,
            _ => mg.next_multiple_of(MR),
        };
        loop {
            let tasks = images * p.groups * geo.ho.div_ceil(rows) * mg.div_ceil(m_rows);
            if tasks >= 2 * self.threads() {
                break;
            } else if path.layout() != Layout::Given && m_rows > min_filters {
                m_rows = (m_rows / 2).next_multiple_of(min_filters);
            } else if rows == geo.ho
                && tasks >= self.threads()
                && tasks.is_multiple_of(self.threads())
            {
                // Whole planes shared evenly: better than row tiles, whose outputs go through
                // the scratch tile and a copy (stem n1, two tasks of 32 filters against four
                // of 32 filters × 56 rows: 1.04-1.10x here, interleaved).
                break;
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
    /// `planes` hold the task's image (as image `task.img`), or are its own ([`Planes::PerTask`]:
    /// image 0).
    fn run_task(&self, s: &Shared, task: &mut Task, planes: &[f32], scratch: &mut [f32]) {
        let (p, geo) = (s.p, s.geo);
        let rows_pad = task.filters.next_multiple_of(MR);
        let len = rows_pad * BLOCK_Q.max(geo.wo);
        // Grown for every slot by run_tasks (grow_scratch).
        let tile = &mut scratch[..len];
        let img = match s.planes {
            Planes::Built(_) => task.img,
            Planes::PerTask { .. } => 0,
        };
        let base = img * geo.image_stride
            + task.group * p.c_in_per_group() * geo.chan_stride
            + task.y0 * geo.wq;
        let b = &planes[base..];
        match s.path {
            // (Winograd never reaches here: `run` hands it to `run_winograd`, whose GEMMs call
            // the rows kernel themselves; it is grouped with the rows path it resembles.)
            CpuPath::GemmRows | CpuPath::Winograd | CpuPath::WinogradF4 => {
                self.task_rows(s, task, b, tile)
            }
            CpuPath::GemmStrips | CpuPath::RowSums => self.task_strips(s, task, b, tile),
        }
    }

    /// The first packed panel of a task's filters, and the tap-block length.
    fn panels(&self, s: &Shared, task: &Task) -> (usize, usize) {
        let (p, kdim) = (s.p, s.p.reduction_len());
        let mg = p.c_out_per_group();
        let first = task.group * mg.div_ceil(MR) + (task.m0 - task.group * mg) / MR;
        (first, kdim.div_ceil(kdim.div_ceil(KC)))
    }

    /// Strips (and the row-sums path): blocks of [`BLOCK_Q`] consecutive grid positions.
    fn task_strips(&self, s: &Shared, task: &mut Task, b: &[f32], tile: &mut [f32]) {
        let geo = s.geo;
        let kdim = s.p.reduction_len();
        let rows = task.filters;
        let plane = geo.ho * geo.wo;
        let tq = (task.y1 - task.y0) * geo.wq;
        // Without junk columns, a task that owns whole planes needs no scratch and no copy.
        let in_place = geo.wq == geo.wo
            && s.path != CpuPath::RowSums
            && matches!(task.out, TaskOut::Planes(_));
        let (first_panel, kc_len) = self.panels(s, task);
        // Storing straight into planes whose length is a whole number of strips, the strips
        // start where the planes' cache lines do (one short strip first): each store then fills
        // whole cache lines instead of straddling two (exp1x1 n8 +5-15% here; the caller's
        // output is rarely 64-byte aligned). Which strip computes an output changes no bits.
        let shift = match &task.out {
            TaskOut::Planes(out) if in_place && plane.is_multiple_of(NR) => {
                (NR - (out.as_ptr() as usize / std::mem::size_of::<f32>()) % NR) % NR
            }
            _ => 0,
        };
        let head = (shift > 0).then_some((0, shift.min(tq)));
        let blocks = (shift.min(tq)..tq)
            .step_by(BLOCK_Q)
            .map(|qa| (qa, tq.min(qa + BLOCK_Q)));
        for (qa, qb) in head.into_iter().chain(blocks) {
            if s.path == CpuPath::RowSums {
                for (i, acc) in tile.chunks_exact_mut(BLOCK_Q).take(rows).enumerate() {
                    let w = &s.weights[(task.m0 + i) * kdim..][..kdim];
                    row_sum(&mut acc[..qb - qa], w, s.offsets.as_slice(), &b[qa..]);
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
                                TaskOut::Planes(out) if in_place => Tile {
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
                if in_place {
                    continue;
                }
            }
            // The valid columns of the block's rows into the task's output slices; the row-sums
            // path adds its bias here (the GEMM started from it).
            for i in 0..rows {
                let out = task.out.filter(i, plane);
                let bias = if s.path == CpuPath::RowSums {
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
                    // One call a row: the kernel cuts it into chunks.
                    let (c, ldc) = match &mut task.out {
                        TaskOut::Planes(out) => (&mut out[pi * MR * plane + y * geo.wo..], plane),
                        TaskOut::Tiles(_) => (
                            &mut tile[pi * MR * positions + (y - ya) * geo.wo..],
                            positions,
                        ),
                    };
                    let b = &b[y * geo.wq..];
                    let out = RowsOut::ByFilter;
                    self.kernel
                        .run_rows(geo.wo, a, s.offsets, b, c, ldc, filters, bias, out);
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
    team: &Team,
    p: &Conv2dParams,
    weights: &[f32],
    packed: &mut Vec<f32>,
) -> std::ops::Range<usize> {
    let (kdim, mg) = (p.reduction_len(), p.c_out_per_group());
    let panels = mg.div_ceil(MR);
    let len = p.groups * panels * kdim * MR;
    packed.resize(len + MR, 0.0);
    let start = packed.as_ptr().align_offset(64).min(MR);
    let panels_of = packed[start..start + len].chunks_mut(kdim * MR).enumerate();
    team.spread(
        panels_of.collect(),
        false,
        || (),
        |(), _, (idx, panel): (usize, &mut [f32])| {
            let (g, pi) = (idx / panels, idx % panels);
            for i in 0..MR {
                let m = g * mg + (pi * MR + i).min(mg - 1);
                for (k, &v) in weights[m * kdim..][..kdim].iter().enumerate() {
                    panel[k * MR + i] = v;
                }
            }
        },
    );
    start..start + len
}

/// `acc[q] = Σ_t w[t] · b[q + offs[t]]`, four taps at a time.
fn row_sum(acc: &mut [f32], w: &[f32], offs: &[usize], b: &[f32]) {
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

/// Locks a workspace; a panic in an earlier call leaves nothing that the next call relies on
/// (every call re-initialises what it reads), so a poisoned lock is taken over.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
