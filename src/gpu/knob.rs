//! Tuning knobs: settings read once from the environment (`SPORKLE_GPU_TILE`,
//! `SPORKLE_GPU_ALGO`, `SPORKLE_STREAM_*`, `SPORKLE_COPY_PARALLEL_MIN`, `SPORKLE_SPIN_US`,
//! `SPORKLE_DEMOTE`, and the CPU's `SPORKLE_CPU_PLANES`),
//! where a bad value is said and ignored.

#![forbid(unsafe_code)]

/// The tuning knob `name` from the environment, parsed; an invalid value is reported and
/// ignored (the callers keep the answer, so it is read once).
pub(crate) fn knob<T>(
    name: &str,
    parse: impl Fn(&str) -> std::result::Result<T, String>,
) -> Option<T> {
    let v = std::env::var(name).ok()?;
    parse(&v)
        .map_err(|e| eprintln!("sporkle: ignoring {name}={v:?}: {e}"))
        .ok()
}
