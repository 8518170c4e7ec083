//! The whole validation harness as a `cargo test` target (`harness = false`): the same trials
//! as `sporkle-validate`, with libtest's command line (filters, `--list`, `--exact`, …).
//!
//! dhat's allocator is the global allocator so that leak trials (which re-run this binary as a
//! child) can measure the heap; without a running profiler it forwards to the system allocator.

#![forbid(unsafe_code)]

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() -> std::process::ExitCode {
    sporkle::validate::main()
}
