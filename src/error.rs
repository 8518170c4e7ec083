//! The one error type of the crate: everything a caller can cause or must handle.
//!
//! Broken internal invariants are bugs and panic with a message; everything here is a
//! condition a correct program can meet (bad shapes, bad files, a missing device).

use std::path::PathBuf;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error sporkle reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The convolution parameters are inconsistent (zero sizes, groups that do not divide, …).
    #[error("invalid convolution parameters: {0}")]
    InvalidParams(String),

    /// A buffer is still in use (a pinned input that jobs are reading).
    #[error("in use: {0}")]
    InUse(String),

    /// A buffer's length does not match what the parameters require.
    #[error("{what} has {got} elements, but the parameters need {expected}")]
    BufferLength {
        /// Which buffer ("input", "weights", "bias", "output").
        what: &'static str,
        /// Length the parameters imply.
        expected: u64,
        /// Length given.
        got: u64,
    },

    /// A `.npy` file could not be read or written, or holds something sporkle does not accept.
    #[error("{}: {problem}", path.display())]
    Npy {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// A suite file (`suites/*.toml`) is malformed.
    #[error("{}: {problem}", path.display())]
    Suite {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },

    /// A benchdnn-style problem descriptor (see [`crate::desc`]) that sporkle cannot run.
    #[error("problem descriptor {desc:?}: {problem}")]
    Descriptor {
        /// The descriptor as given.
        desc: String,
        /// What is wrong with it.
        problem: String,
    },

    /// The requested device does not exist on this machine, or cannot be used.
    #[error("device unavailable: {0}")]
    DeviceUnavailable(String),

    /// The GPU failed a job: a GL error, a shader that does not compile (with its log),
    /// an allocation the driver refused, a fence that timed out, a lost context.
    #[error("GPU: {0}")]
    Gpu(String),

    /// A GPU job whose fence (or CUDA copy) had not passed by its deadline: nothing it wrote
    /// was read, and the GPU is marked unhealthy.
    #[error("fence timeout: {0}")]
    FenceTimeout(String),

    /// The GL context was lost (a reset, a driver fault): waits fail, nothing can be trusted.
    #[error("GPU context lost: {0}")]
    ContextLost(String),

    /// A job the GPU cannot take because it is larger than a GL limit (buffer size, workgroup
    /// count). The GPU is fine: smaller jobs still go there, and the Juggler runs this one on
    /// the CPU.
    #[error("GPU limit: {0}")]
    GpuLimit(String),

    /// A buffer larger than the host memory this machine can give (checked before allocating).
    #[error("out of memory: {0}")]
    OutOfMemory(String),

    /// The CPU backend could not start (e.g. its thread pool).
    #[error("CPU backend: {0}")]
    Cpu(String),
}
