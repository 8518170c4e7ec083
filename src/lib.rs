//! sporkle: fp32 2-D convolution (NCHW) on the CPU and on the GPU through OpenGL compute
//! shaders, with the validation harness that proves it correct.
//!
//! # Architecture in a few lines
//!
//! - [`Conv2dParams`] ([`params`]) describes one convolution: shape, stride, padding, dilation,
//!   groups. It validates itself, computes the output size, the buffer lengths and the FLOPs,
//!   all in 64-bit arithmetic.
//! - [`reference`](mod@reference) is the oracle: direct loops, f64 accumulation, no `unsafe`, no threads.
//!   Every backend is checked against it with the policy of [`tolerance`].
//! - [`cpu`] is the fast CPU backend: an implicit GEMM over "phase planes" (the zero-padded
//!   input split by stride phase, so every kernel tap is a constant offset and no im2col
//!   matrix is ever built), two AVX-512 microkernels with portable twins, a row-sums path for
//!   depthwise and narrow grouped convolutions, rayon threads and reusable workspaces.
//! - [`gpu`] is the GPU backend: a headless EGL context owned by a worker thread, RAII GL
//!   objects, implicit-GEMM compute shaders specialised by `#define`s, resident weights
//!   identified by a hash of every byte, a fenced synchronous path.
//!   Its async executor ([`gpu::executor`]) streams jobs through a pipeline of steps (copy in
//!   the newest, convolve the one before, copy out the one before that), with the copies
//!   across the bus done by CUDA's copy engines where a CUDA driver is present (on memory that
//!   Vulkan allocates and GL and CUDA both import; the convolution stays GL's), else by the
//!   convolution's own dispatch; [`pinned`] inputs are read by the GPU where they are.
//! - [`juggler`] is the API for users: [`Juggler`] picks the device per call from a cost model
//!   calibrated on first use and refined by every job, streams GPU jobs (`submit`/`Ticket`),
//!   re-runs a failed GPU job on the CPU, and keeps [`Stats`].
//! - [`winograd`] is the math of Winograd F(2×2, 3×3) and F(4×4, 3×3): transforms, where they
//!   apply, and their error bound (the GPU runs F(2×2) for wide 3×3 layers, the CPU either).
//! - [`npy`] reads and writes `.npy` files (float32, little-endian, C order).
//! - [`suite`] reads the device-independent case files in `suites/*.toml`.
//! - [`data`] makes deterministic test data (seeded uniform and small-integer fills).
//! - [`desc`] reads cases written as benchdnn problem descriptors.
//! - The workspace's other crate, `sporkle-tools` (`tools/`), holds the binaries and the
//!   validation harness, so that their crates stay out of a library user's build: `sporkle`
//!   (`conv2d`, `bench`, `devices`), `sporkle-validate` (suites × devices, goldens,
//!   fingerprints keyed by arithmetic class and plan, leaks, stress, performance; `cargo test`
//!   runs it as `tools/tests/validate.rs`) and `sporkle-leak-child` (the leak trials' child).
//!
//! Layouts: input `n×c_in×h×w`, weights `c_out×(c_in/groups)×k_h×k_w`, optional bias `c_out`,
//! output `n×c_out×ho×wo`, all contiguous row-major f32.
//!
//! # Example
//!
//! ```
//! use sporkle::{Conv2dParams, Juggler};
//!
//! // 1 image of 3 channels, 8×8; 4 filters of 3×3, padded to keep 8×8.
//! let p = Conv2dParams::new(1, 3, 8, 8, 4, 3, 3).with_padding(1, 1);
//! let x = vec![1.0f32; p.input_len()];
//! let w = vec![0.5f32; p.weights_len()];
//! let bias = vec![0.25f32; p.bias_len()];
//! let mut y = vec![0.0f32; p.output_len()];
//! let juggler = Juggler::new()?; // a GPU if there is one; the CPU alone otherwise
//! let info = juggler.conv2d(&p, &x, &w, Some(&bias), &mut y)?;
//! // An inner output sums 3 channels × 9 taps of 1 × 0.5, plus the bias; a corner sees 4 taps.
//! assert_eq!(y[9], 13.75);
//! assert_eq!(y[0], 6.25);
//! println!("ran on {} ({}), {:.3} ms", info.device, info.reason, info.wall_s * 1e3);
//! # Ok::<(), sporkle::Error>(())
//! ```

#![deny(unsafe_code)]
// `unsafe` only where GL, CUDA, Vulkan, mapped memory or SIMD need it: the modules that allow it
// below (and, inside them, only their files on tidy's list).

pub mod cpu;
pub mod data;
pub mod desc;
pub mod error;
pub mod gpu;
pub mod host_mem;
pub mod juggler;
pub mod npy;
pub mod params;
#[allow(unsafe_code)] // The caller's view of memory the GPU worker maps.
pub mod pinned;
pub mod reference;
pub mod suite;
pub mod tolerance;
pub mod winograd;

pub use cpu::{CpuBackend, CpuWeights};
pub use gpu::GpuBackend;
pub use juggler::{Juggler, Preference, RunInfo, Stages, Stats, Ticket};

/// The project's root, where `suites/` and `golden/` live: the source tree this crate was
/// built from if it is still there, else the current directory (binaries carried to another
/// machine run from a copy of the checkout).
pub fn repo_root() -> std::path::PathBuf {
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    if built.join("suites").is_dir() {
        built.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_else(|_| ".".into())
    }
}
pub use error::{Error, Result};
pub use params::Conv2dParams;
pub use pinned::PinnedInput;
