//! Which algorithm a CPU call runs ([`CpuPath`]) and the measurements behind the choice; how
//! each path lays out its weights.

#![forbid(unsafe_code)]

use super::kernel::{row_chunks, NR};
use super::planes::Geometry;
use super::GEMM_MIN_FILTERS;
use crate::params::Conv2dParams;

/// Which algorithm a call uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuPath {
    /// Implicit GEMM, strips orientation: 16 filters × 16 consecutive grid positions.
    GemmStrips,
    /// Implicit GEMM, rows orientation: up to 16 valid positions of one row × 16 filters.
    GemmRows,
    /// Shifted-row sums (depthwise and narrow groups): no GEMM.
    RowSums,
    /// Winograd F(2×2, 3×3) (3×3 taps, stride 1, no dilation, one group; see `winograd.rs`):
    /// its GEMM on the rows kernel.
    Winograd,
    /// Winograd F(4×4, 3×3), where F(2×2) applies: fewer multiplies, larger rounding
    /// ([`crate::tolerance::Tolerance::WinogradF4`]), never exact.
    WinogradF4,
}

impl CpuPath {
    /// The path sporkle takes for these parameters: the row-sums path for narrow groups, else
    /// the GEMM orientation that computes fewer lanes per image. Strips compute the junk
    /// columns and round the grid up to 16; rows compute only valid positions, but a call with
    /// few positions is bound by FMA latency (counted as at least `ROWS_MIN_LANES`).
    pub fn for_params(p: &Conv2dParams) -> Self {
        if p.c_out_per_group() < GEMM_MIN_FILTERS {
            return CpuPath::RowSums;
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
            CpuPath::RowSums => "row-sums",
            CpuPath::Winograd => "winograd-f2x2",
            CpuPath::WinogradF4 => "winograd-f4x4",
        }
    }

    /// The Winograd variant this path runs, if any.
    pub fn winograd(self) -> Option<crate::winograd::Variant> {
        match self {
            CpuPath::Winograd => Some(crate::winograd::Variant::F2x2),
            CpuPath::WinogradF4 => Some(crate::winograd::Variant::F4x4),
            CpuPath::GemmStrips | CpuPath::GemmRows | CpuPath::RowSums => None,
        }
    }

    /// How this path's weights are laid out.
    pub(super) fn layout(self) -> Layout {
        match self {
            CpuPath::GemmStrips | CpuPath::GemmRows => Layout::Packed,
            CpuPath::RowSums => Layout::Given,
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
pub(super) enum Layout {
    /// `[filter][tap]`, as the caller gave them (the row-sums path).
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

/// Pointwise layers reduce over at least this many taps to read their input in place: measured
/// here (Ice Lake-SP, 2 threads, best of interleaved rounds, rows against strips) 64 channels
/// 1.5-1.9x (exp1x1 n8 148 against 99 GFLOP/s), 256 channels 2.4x; at 16 and 32 channels
/// neither won clearly (1.0x, 0.7x).
const POINTWISE_ROWS_MIN_TAPS: usize = 64;

/// Below this many positions per call, the rows kernel's few accumulators wait on FMA latency.
const ROWS_MIN_LANES: usize = 8;
